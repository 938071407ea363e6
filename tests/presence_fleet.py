"""Presence users that reconnect like pusher-js, behind a simulated load balancer (a process).

Usage: ``python presence_fleet.py --ports P1,P2 --users 1000 --channels 10 --prefix X``.

Each user holds one socket in one presence channel (``users / channels`` members each) and
watches the others. A closed socket (4200 from a draining node, or any loss) reconnects at
once, like pusher-js, through the "load balancer": the nodes whose ``/ready`` answered 200 at
the last poll (every 0.25 s), round-robin, falling back to any node. It re-signs its
subscription for the new socket id.

Commands on stdin, one per line: ``steady`` (from now on any ``member_added`` or
``member_removed`` is a flap: every user stays present all along), ``stop`` (print the
figures as one JSON line and exit). Every loop stops by itself after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import urllib.request
from typing import Any

import pusher
import uvloop
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

APP = ("1", "app-key", "app-secret")


class Fleet:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ports: list[int] = [int(p) for p in args.ports.split(",")]
        self.ready = list(self.ports)
        self.signer = pusher.Pusher(app_id=APP[0], key=APP[1], secret=APP[2])
        self.steady = False
        self.stopping = asyncio.Event()
        self.joined: set[str] = set()
        self.flaps_added: list[str] = []
        self.flaps_removed: list[str] = []
        self.short_rosters: list[int] = []
        self.reconnects = 0
        self.turn = 0

    def pick(self, skip: int | None) -> int:
        choices = [p for p in self.ready if p != skip] or [p for p in self.ports if p != skip]
        choices = choices or self.ports
        self.turn += 1
        return choices[self.turn % len(choices)]

    async def poll_ready(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping.is_set():
            ready = []
            for port in self.ports:
                ok = await loop.run_in_executor(None, _ready, port)
                if ok:
                    ready.append(port)
            self.ready = ready
            await asyncio.sleep(0.25)

    async def user(self, i: int) -> None:
        per = self.args.users // self.args.channels
        channel = f"presence-{self.args.prefix}-{i % self.args.channels}"
        user_id = f"u{i}"
        last: int | None = None
        first = True
        while not self.stopping.is_set():
            port = self.pick(None if first else last)
            url = f"ws://127.0.0.1:{port}/app/{APP[1]}?protocol=7&client=js&version=8.6.0"
            try:
                async with connect(url, open_timeout=10, close_timeout=2, max_size=None) as ws:
                    last = port
                    hello = json.loads(await ws.recv())
                    socket_id = json.loads(hello["data"])["socket_id"]
                    custom = {"user_id": user_id, "user_info": {"n": i}}
                    auth = self.signer.authenticate(channel, socket_id, custom)
                    frame = {"event": "pusher:subscribe", "data": {"channel": channel, **auth}}
                    await ws.send(json.dumps(frame))
                    async for raw in ws:
                        self.on_frame(json.loads(raw), user_id, per)
                        if self.stopping.is_set():
                            return
            except (ConnectionClosed, InvalidHandshake, InvalidStatus, OSError, TimeoutError):
                pass  # reconnect at once, like pusher-js
            first = False
            self.reconnects += 1
            await asyncio.sleep(random.random() * 0.05)

    def on_frame(self, frame: dict[str, Any], user_id: str, per: int) -> None:
        event = frame.get("event")
        if event == "pusher_internal:subscription_succeeded":
            self.joined.add(user_id)
            count = json.loads(frame["data"])["presence"]["count"]
            if self.steady and count < per:
                self.short_rosters.append(count)
        elif event == "pusher_internal:member_removed" and self.steady:
            self.flaps_removed.append(json.loads(frame["data"])["user_id"])
        elif event == "pusher_internal:member_added" and self.steady:
            self.flaps_added.append(json.loads(frame["data"])["user_id"])

    async def commands(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "steady":
                self.steady = True
            elif line == "stop":
                break
        self.stopping.set()

    def report(self) -> dict[str, Any]:
        return {
            "users": self.args.users,
            "joined": len(self.joined),
            "reconnects": self.reconnects,
            "flaps_member_added": len(self.flaps_added),
            "flaps_member_removed": len(self.flaps_removed),
            "flap_examples": (self.flaps_removed + self.flaps_added)[:5],
            "short_rosters": len(self.short_rosters),
            "smallest_roster": min(self.short_rosters, default=None),
        }


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


async def main(args: argparse.Namespace) -> dict[str, Any]:
    fleet = Fleet(args)
    started = time.monotonic()
    poller = asyncio.create_task(fleet.poll_ready())
    users = [asyncio.create_task(fleet.user(i)) for i in range(args.users)]
    commands = asyncio.create_task(fleet.commands())
    try:
        await asyncio.wait_for(commands, args.max_seconds)
    except TimeoutError:
        fleet.stopping.set()
    for task in [poller, *users]:
        task.cancel()
    await asyncio.gather(poller, *users, return_exceptions=True)
    out = fleet.report()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--channels", type=int, default=10)
    parser.add_argument("--prefix", default="fleet")
    parser.add_argument("--max-seconds", type=float, default=600)
    result = uvloop.run(main(parser.parse_args()))
    print(json.dumps(result), flush=True)
