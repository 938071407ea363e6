//! Server frames built from what the shards send: `pusher_internal:subscription_succeeded` of a
//! presence channel from the roster in a join reply, and `member_added`/`member_removed` from a
//! Pub/Sub message.
//!
//! `gateway.protocol.messages` and `gateway.shards.contract` stay the reference: each function
//! here answers the exact text the reference builds, or `None` for input the reference would
//! refuse or treat otherwise (invalid UTF-8, a malformed message, another kind of message), so
//! the caller falls back to it. `tests/test_native.py` checks the agreement.

use crate::subscribe::quote_ascii;
use std::collections::HashMap;

/// Appends a server frame `{"event":…,"channel":…,"data":…}` whose data is the JSON string of
/// `data` (`gateway.protocol.messages._frame` with a quoted `data`).
fn frame(out: &mut String, event: &str, channel: &str, data: &str) {
    out.push_str("{\"event\":\"");
    out.push_str(event);
    out.push_str("\",\"channel\":");
    quote_ascii(out, channel);
    out.push_str(",\"data\":");
    quote_ascii(out, data);
    out.push('}');
}

/// `subscription_succeeded` of a presence channel: `flat` is the roster as the shard replies
/// it (`[user_id, user_info, ...]`, an empty `user_info` meaning none); the joining member is
/// added if missing. Members keep the order of a Python dict built from the pairs (a repeated
/// id keeps its first place and its last info). `None` when `flat` has an odd length or holds
/// invalid UTF-8.
pub fn presence_succeeded(
    channel: &str,
    flat: &[&[u8]],
    user_id: &str,
    user_info: Option<&str>,
) -> Option<String> {
    if !flat.len().is_multiple_of(2) {
        return None;
    }
    let mut members: Vec<(&str, &str)> = Vec::with_capacity(flat.len() / 2 + 1);
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(flat.len() / 2 + 1);
    for pair in flat.chunks_exact(2) {
        let id = std::str::from_utf8(pair[0]).ok()?;
        let info = std::str::from_utf8(pair[1]).ok()?;
        if let Some(&i) = index.get(id) {
            members[i].1 = info;
        } else {
            index.insert(id, members.len());
            members.push((id, info));
        }
    }
    if !index.contains_key(user_id) {
        members.push((user_id, user_info.unwrap_or("")));
    }
    let mut data = String::with_capacity(48 + flat.iter().map(|b| 2 * b.len() + 8).sum::<usize>());
    data.push_str("{\"presence\":{\"ids\":[");
    for (i, (id, _)) in members.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        quote_ascii(&mut data, id);
    }
    data.push_str("],\"hash\":{");
    for (i, (id, info)) in members.iter().enumerate() {
        if i > 0 {
            data.push(',');
        }
        quote_ascii(&mut data, id);
        data.push(':');
        data.push_str(if info.is_empty() { "null" } else { info });
    }
    data.push_str("},\"count\":");
    data.push_str(&members.len().to_string());
    data.push_str("}}");
    let mut out = String::with_capacity(2 * data.len() + channel.len() + 64);
    frame(
        &mut out,
        "pusher_internal:subscription_succeeded",
        channel,
        &data,
    );
    Some(out)
}

/// The frame of an `M` (`member_added`) or `R` (`member_removed`) Pub/Sub message for `channel`,
/// and the socket it must not go to (`M` only; `None` when none). `None` for any other kind of
/// message, or a malformed one (which `gateway.shards.contract.decode_message` drops).
pub fn member_frame(channel: &str, message: &[u8]) -> Option<(String, Option<String>)> {
    let (&kind, body) = message.split_first()?;
    let mut out = String::new();
    match kind {
        b'M' => {
            let nul = body.iter().position(|&b| b == 0)?;
            let (sock, rest) = (&body[..nul], &body[nul + 1..]);
            let colon = rest.iter().position(|&b| b == b':')?;
            let (size, rest) = (&rest[..colon], &rest[colon + 1..]);
            if size.is_empty() || !size.iter().all(u8::is_ascii_digit) {
                return None;
            }
            // Digits beyond usize are more than the rest holds: malformed either way.
            let n = std::str::from_utf8(size).ok()?.parse::<usize>().ok()?;
            if n > rest.len() {
                return None;
            }
            let user = std::str::from_utf8(&rest[..n]).ok()?;
            let info = std::str::from_utf8(&rest[n..]).ok()?;
            let sock = std::str::from_utf8(sock).ok()?;
            let mut data = String::with_capacity(user.len() + info.len() + 32);
            data.push_str("{\"user_id\":");
            quote_ascii(&mut data, user);
            data.push_str(",\"user_info\":");
            data.push_str(if info.is_empty() { "null" } else { info });
            data.push('}');
            frame(&mut out, "pusher_internal:member_added", channel, &data);
            Some((out, (!sock.is_empty()).then(|| sock.to_owned())))
        }
        b'R' => {
            let user = std::str::from_utf8(body).ok()?;
            let mut data = String::with_capacity(user.len() + 16);
            data.push_str("{\"user_id\":");
            quote_ascii(&mut data, user);
            data.push('}');
            frame(&mut out, "pusher_internal:member_removed", channel, &data);
            Some((out, None))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn succeeded_frame() {
        let flat: [&[u8]; 6] = [b"a", br#"{"n":"\u00e9"}"#, b"b", b"", b"a", b"{}"];
        assert_eq!(
            presence_succeeded("presence-r", &flat, "c", None).unwrap(),
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"presence-r","data":"{\"presence\":{\"ids\":[\"a\",\"b\",\"c\"],\"hash\":{\"a\":{},\"b\":null,\"c\":null},\"count\":3}}"}"#
        );
        assert_eq!(
            presence_succeeded("presence-r", &[], "é", Some(r#"{"x":1}"#)).unwrap(),
            r#"{"event":"pusher_internal:subscription_succeeded","channel":"presence-r","data":"{\"presence\":{\"ids\":[\"\\u00e9\"],\"hash\":{\"\\u00e9\":{\"x\":1}},\"count\":1}}"}"#
        );
        assert!(presence_succeeded("p", &[b"a"], "c", None).is_none());
        assert!(presence_succeeded("p", &[b"\xff", b""], "c", None).is_none());
    }

    #[test]
    fn member_frames() {
        assert_eq!(
            member_frame("presence-r", b"M1.2\x003:a:b{\"x\":1}").unwrap(),
            (
                r#"{"event":"pusher_internal:member_added","channel":"presence-r","data":"{\"user_id\":\"a:b\",\"user_info\":{\"x\":1}}"}"#.to_owned(),
                Some("1.2".to_owned())
            )
        );
        assert_eq!(member_frame("presence-r", b"M\x001:u").unwrap().1, None);
        assert_eq!(
            member_frame("presence-r", b"Ru\"1").unwrap(),
            (
                r#"{"event":"pusher_internal:member_removed","channel":"presence-r","data":"{\"user_id\":\"u\\\"1\"}"}"#.to_owned(),
                None
            )
        );
        for bad in [
            &b""[..],
            b"E\x00{}",
            b"C3",
            b"T",
            b"M1:u",
            b"M\x00:u",
            b"M\x00x:u",
            b"M\x002:u",
            b"M\x0099999999999999999999999:u",
            b"R\xff",
        ] {
            assert!(member_frame("c", bad).is_none(), "{bad:?}");
        }
    }
}
