// A pusher-js 8 client driven over stdin, reporting what it observes as JSON lines on stdout.
//
// Usage: node client.mjs <ws-port> <auth-base-url> <user-id> [label]
// With PG_TLS=1 in the environment it connects with forceTLS (trust the CA with
// NODE_EXTRA_CA_CERTS). PG_WATCHLIST=a,b asks the auth endpoint for that watchlist at sign-in.
//
// Commands (one JSON object per stdin line):
//   {"op":"subscribe","channel":"presence-x","events":["client-hi"]}  ("events": bound one by
//        one so their metadata (user_id) is reported; other events come via bind_global)
//   {"op":"unsubscribe","channel":"x"}
//   {"op":"trigger","channel":"private-x","event":"client-hi","data":{...}}
//   {"op":"signin"}   {"op":"disconnect"}   {"op":"connect"}   {"op":"exit"}
//   {"op":"members","channel":"presence-x"}   (reports the current member list)
// Every output line has "type": state | subscribed | subscription_error | event | member_added |
// member_removed | user_event | signin | watchlist | error | members | ack | fatal.
import { createRequire } from "node:module";
import readline from "node:readline";

const require = createRequire(import.meta.url);
const Pusher = require("pusher-js");

const [port, authBase, userId, label = userId] = process.argv.slice(2);
if (!port || !authBase || !userId) {
  console.error("usage: node client.mjs <ws-port> <auth-base-url> <user-id> [label]");
  process.exit(2);
}

function emit(type, fields = {}) {
  process.stdout.write(JSON.stringify({ type, label, t: Date.now(), ...fields }) + "\n");
}

const params = { user_id: userId, user_info: JSON.stringify({ name: `user ${userId}` }) };
if (process.env.PG_WATCHLIST) params.watchlist = process.env.PG_WATCHLIST;
const tls = process.env.PG_TLS === "1";
const pusher = new Pusher("app-key", {
  cluster: "x",
  wsHost: "127.0.0.1",
  wsPort: Number(port),
  wssPort: Number(port),
  forceTLS: tls,
  enabledTransports: ["ws"],
  disableStats: true,
  channelAuthorization: { endpoint: `${authBase}/pusher/auth`, transport: "ajax", params },
  userAuthentication: { endpoint: `${authBase}/pusher/user-auth`, transport: "ajax", params },
});

pusher.connection.bind("state_change", ({ previous, current }) => {
  emit("state", { previous, current, socket_id: pusher.connection.socket_id ?? null });
});
pusher.connection.bind("error", (err) => {
  emit("error", { error: err?.error?.data ?? err?.data ?? String(err?.type ?? err) });
});
pusher.bind("pusher:signin_success", (data) => emit("signin", { data }));
pusher.user.bind_global((event, data) => emit("user_event", { event, data }));
for (const name of ["online", "offline"]) {
  pusher.user.watchlist.bind(name, (event) => {
    emit("watchlist", { name: event.name, user_ids: event.user_ids });
  });
}

function membersOf(channel) {
  const members = [];
  channel.members.each((m) => members.push({ id: m.id, info: m.info }));
  return { count: channel.members.count, me: channel.members.me?.id ?? null, members };
}

function subscribe(name, events = []) {
  const channel = pusher.subscribe(name);
  channel.bind("pusher:subscription_succeeded", () => {
    const fields = { channel: name, count: channel.subscriptionCount ?? null };
    if (name.startsWith("presence-")) Object.assign(fields, membersOf(channel));
    emit("subscribed", fields);
  });
  channel.bind("pusher:subscription_error", (status) => {
    emit("subscription_error", { channel: name, status });
  });
  channel.bind("pusher:member_added", (m) => {
    emit("member_added", { channel: name, id: m.id, info: m.info });
  });
  channel.bind("pusher:member_removed", (m) => emit("member_removed", { channel: name, id: m.id }));
  channel.bind("pusher:subscription_count", (data) => {
    emit("subscription_count", { channel: name, count: data.subscription_count });
  });
  for (const event of events) {
    channel.bind(event, (data, metadata) => {
      emit("event", { channel: name, event, data, metadata: metadata ?? null });
    });
  }
  channel.bind_global((event, data) => {
    if (event.startsWith("pusher:") || events.includes(event)) return;
    emit("event", { channel: name, event, data, metadata: null });
  });
}

const commands = {
  subscribe: (c) => subscribe(c.channel, c.events),
  unsubscribe: (c) => pusher.unsubscribe(c.channel),
  trigger: (c) => emit("ack", { ok: pusher.channel(c.channel).trigger(c.event, c.data) }),
  signin: () => pusher.signin(),
  disconnect: () => pusher.disconnect(),
  connect: () => pusher.connect(),
  members: (c) => emit("members", { channel: c.channel, ...membersOf(pusher.channel(c.channel)) }),
  exit: () => {
    pusher.disconnect();
    setTimeout(() => process.exit(0), 100);
  },
};

readline.createInterface({ input: process.stdin }).on("line", (line) => {
  if (!line.trim()) return;
  try {
    const command = JSON.parse(line);
    commands[command.op](command);
  } catch (err) {
    emit("fatal", { error: String(err), line });
  }
});
process.stdin.on("end", () => commands.exit());
