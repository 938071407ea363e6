//! The client-frame fast path: one text frame in; out the verified member of a presence
//! `pusher:subscribe`, or the channel of a `pusher:unsubscribe`, or `None` to let the Python
//! protocol code handle the frame.
//!
//! The Python code (`gateway.protocol`) stays the reference: this module only accepts frames it
//! can prove the reference accepts, and answers exactly what the reference would produce. Any
//! frame it is unsure of (a float or a huge integer anywhere, a duplicate key in `user_info`,
//! `data` sent as a JSON string, a lone surrogate, deep nesting, a bad signature, a channel
//! that is not a valid presence channel, a limit exceeded...) gets `None`; the reference then
//! accepts it or produces the exact error message. `tests/test_native.py` checks the agreement.

use sha2::{Digest, Sha256};
use std::fmt::Write;

/// The limits of `gateway.protocol.limits.Limits` this path checks.
#[derive(Clone, Copy, Debug)]
pub struct SubscribeLimits {
    /// `max_frame_bytes`: largest frame in UTF-8 bytes.
    pub max_frame_bytes: usize,
    /// `max_channel_name_length`: longest channel name.
    pub max_channel_name_length: usize,
    /// `max_presence_user_id_length`: longest presence user id, in characters.
    pub max_user_id_length: usize,
    /// `max_user_info_bytes`: largest `user_info` as compact ASCII JSON.
    pub max_user_info_bytes: usize,
}

/// A verified presence subscription: the channel and the member's id and compact `user_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresenceSubscribe {
    /// The channel name (valid, `presence-` prefixed).
    pub channel: String,
    /// The member's user id (an integer id in decimal).
    pub user_id: String,
    /// `user_info` as Python's `json.dumps(value, separators=(",", ":"))` writes it, or `None`.
    pub user_info: Option<String>,
}

/// Deepest nesting accepted (Python's decoder accepts far more: deeper input goes to it).
const MAX_DEPTH: usize = 32;
/// Longest integer literal accepted (Python caps conversions at 4 300 digits).
const MAX_INT_DIGITS: usize = 18;

/// A JSON value as Python's decoder sees it, without floats. Objects keep their pairs in order,
/// duplicates included.
#[derive(Debug)]
enum Json {
    Null,
    Bool(bool),
    /// The literal as written (`-?[0-9]+`, no leading zeros).
    Int(String),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    /// The value of `key` in an object: the last occurrence, as in a Python dict.
    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(pairs) => pairs.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    /// Parses a whole document (whitespace around it allowed), or `None`.
    fn document(text: &str) -> Option<Json> {
        let mut p = Parser {
            s: text.as_bytes(),
            pos: 0,
        };
        p.ws();
        let value = p.value(0)?;
        p.ws();
        (p.pos == p.s.len()).then_some(value)
    }

    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.s.get(self.pos) {
            self.pos += 1;
        }
    }

    fn literal(&mut self, word: &[u8], value: Json) -> Option<Json> {
        if self.s[self.pos..].starts_with(word) {
            self.pos += word.len();
            Some(value)
        } else {
            None
        }
    }

    fn value(&mut self, depth: usize) -> Option<Json> {
        if depth > MAX_DEPTH {
            return None;
        }
        match *self.s.get(self.pos)? {
            b'{' => self.object(depth),
            b'[' => self.array(depth),
            b'"' => self.string().map(Json::Str),
            b'n' => self.literal(b"null", Json::Null),
            b't' => self.literal(b"true", Json::Bool(true)),
            b'f' => self.literal(b"false", Json::Bool(false)),
            b'-' | b'0'..=b'9' => self.int(),
            _ => None,
        }
    }

    fn object(&mut self, depth: usize) -> Option<Json> {
        self.pos += 1;
        let mut pairs = Vec::new();
        self.ws();
        if self.s.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Some(Json::Obj(pairs));
        }
        loop {
            self.ws();
            if self.s.get(self.pos) != Some(&b'"') {
                return None;
            }
            let key = self.string()?;
            self.ws();
            if self.s.get(self.pos) != Some(&b':') {
                return None;
            }
            self.pos += 1;
            self.ws();
            let value = self.value(depth + 1)?;
            pairs.push((key, value));
            self.ws();
            match self.s.get(self.pos)? {
                b',' => self.pos += 1,
                b'}' => {
                    self.pos += 1;
                    return Some(Json::Obj(pairs));
                }
                _ => return None,
            }
        }
    }

    fn array(&mut self, depth: usize) -> Option<Json> {
        self.pos += 1;
        let mut items = Vec::new();
        self.ws();
        if self.s.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Some(Json::Arr(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.s.get(self.pos)? {
                b',' => self.pos += 1,
                b']' => {
                    self.pos += 1;
                    return Some(Json::Arr(items));
                }
                _ => return None,
            }
        }
    }

    /// An integer literal; a fraction or an exponent (a Python float) gives `None`.
    fn int(&mut self) -> Option<Json> {
        let start = self.pos;
        if self.s[self.pos] == b'-' {
            self.pos += 1;
        }
        let digits = self.pos;
        while let Some(b'0'..=b'9') = self.s.get(self.pos) {
            self.pos += 1;
        }
        let n = self.pos - digits;
        if n == 0 || n > MAX_INT_DIGITS || (n > 1 && self.s[digits] == b'0') {
            return None;
        }
        if let Some(b'.' | b'e' | b'E') = self.s.get(self.pos) {
            return None;
        }
        let text = std::str::from_utf8(&self.s[start..self.pos]).ok()?;
        // Python reads "-0" as the integer 0.
        Some(Json::Int(if text == "-0" { "0" } else { text }.to_owned()))
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.s.get(self.pos..self.pos + 4)?;
        let mut value = 0u32;
        for &d in digits {
            value = value * 16 + char::from(d).to_digit(16)?;
        }
        self.pos += 4;
        Some(value)
    }

    /// A string; control characters (refused by Python's strict decoder) and lone surrogates
    /// give `None`.
    fn string(&mut self) -> Option<String> {
        self.pos += 1;
        let mut out = String::new();
        loop {
            let start = self.pos;
            while let Some(&b) = self.s.get(self.pos) {
                if b == b'"' || b == b'\\' || b < 0x20 {
                    break;
                }
                self.pos += 1;
            }
            // The input is a &str and the run stops at ASCII bytes: a char boundary.
            out.push_str(std::str::from_utf8(&self.s[start..self.pos]).ok()?);
            match *self.s.get(self.pos)? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    self.pos += 1;
                    let escape = *self.s.get(self.pos)?;
                    self.pos += 1;
                    match escape {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'u' => {
                            let unit = self.hex4()?;
                            let code = if (0xD800..0xDC00).contains(&unit) {
                                if self.s.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                    return None;
                                }
                                self.pos += 2;
                                let low = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&low) {
                                    return None;
                                }
                                0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00)
                            } else {
                                unit
                            };
                            out.push(char::from_u32(code)?);
                        }
                        _ => return None,
                    }
                }
                _ => return None, // a control character
            }
        }
    }
}

/// Appends `text` as Python's `json.dumps` quotes it with `ensure_ascii` (the default).
pub(crate) fn quote_ascii(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Appends `value` as Python's `json.dumps(value, separators=(",", ":"))` writes it; `None`
/// for an object with a duplicate key (Python would keep one of them).
fn compact(out: &mut String, value: &Json) -> Option<()> {
    match value {
        Json::Null => out.push_str("null"),
        Json::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Json::Int(text) => out.push_str(text),
        Json::Str(s) => quote_ascii(out, s),
        Json::Arr(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                compact(out, item)?;
            }
            out.push(']');
        }
        Json::Obj(pairs) => {
            out.push('{');
            for (i, (key, item)) in pairs.iter().enumerate() {
                if pairs[..i].iter().any(|(k, _)| k == key) {
                    return None;
                }
                if i > 0 {
                    out.push(',');
                }
                quote_ascii(out, key);
                out.push(':');
                compact(out, item)?;
            }
            out.push('}');
        }
    }
    Some(())
}

/// HMAC-SHA256 of `message` keyed with `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut block = [0u8; BLOCK];
    if key.len() > BLOCK {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// Whether `signature` is the lowercase hex of `digest`, compared in constant time (for
/// signatures of the right length).
fn signature_matches(digest: &[u8; 32], signature: &[u8]) -> bool {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    if signature.len() != 64 {
        return false;
    }
    let mut diff = 0u8;
    for (i, byte) in digest.iter().enumerate() {
        diff |= HEX[usize::from(byte >> 4)] ^ signature[2 * i];
        diff |= HEX[usize::from(byte & 0xf)] ^ signature[2 * i + 1];
    }
    diff == 0
}

/// Whether `name` is a valid presence channel name (`gateway.protocol.channels.channel_error`
/// finds nothing wrong and `classify` says presence).
fn is_presence_channel(name: &str, max_length: usize) -> bool {
    name.len() <= max_length
        && name.starts_with("presence-")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b))
}

/// A client frame the fast path understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    /// A verified `pusher:subscribe` to a presence channel (see [`presence_subscribe`]).
    Subscribe(PresenceSubscribe),
    /// A `pusher:unsubscribe` with object `data`: the channel as received (not validated, as
    /// in the reference).
    Unsubscribe(String),
}

/// The frame as the fast path understands it, or `None` when the Python reference must decide
/// (see the module documentation): a presence subscribe as [`presence_subscribe`] accepts it,
/// or a `pusher:unsubscribe` whose `data` is an object with a string `channel`.
pub fn client_frame(
    text: &str,
    socket_id: &str,
    key: &str,
    secret: &[u8],
    limits: &SubscribeLimits,
) -> Option<ClientFrame> {
    if text.len() > limits.max_frame_bytes {
        return None;
    }
    let frame = Parser::document(text)?;
    let Json::Str(event) = frame.get("event")? else {
        return None;
    };
    match event.as_str() {
        "pusher:subscribe" => {
            subscribe_of(&frame, socket_id, key, secret, limits).map(ClientFrame::Subscribe)
        }
        "pusher:unsubscribe" => match frame.get("data")?.get("channel")? {
            Json::Str(channel) => Some(ClientFrame::Unsubscribe(channel.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// The member of a `pusher:subscribe` frame to a presence channel with `channel_data`, signed
/// for `socket_id` with the app's `key` and `secret`; `None` when the Python reference must
/// decide (see the module documentation).
pub fn presence_subscribe(
    text: &str,
    socket_id: &str,
    key: &str,
    secret: &[u8],
    limits: &SubscribeLimits,
) -> Option<PresenceSubscribe> {
    match client_frame(text, socket_id, key, secret, limits)? {
        ClientFrame::Subscribe(member) => Some(member),
        ClientFrame::Unsubscribe(_) => None,
    }
}

/// The verified member of a parsed `pusher:subscribe` frame (see [`presence_subscribe`]).
fn subscribe_of(
    frame: &Json,
    socket_id: &str,
    key: &str,
    secret: &[u8],
    limits: &SubscribeLimits,
) -> Option<PresenceSubscribe> {
    let data = frame.get("data")?;
    let (Some(Json::Str(channel)), Some(Json::Str(auth)), Some(Json::Str(channel_data))) = (
        data.get("channel"),
        data.get("auth"),
        data.get("channel_data"),
    ) else {
        return None;
    };
    if !is_presence_channel(channel, limits.max_channel_name_length) {
        return None;
    }
    let (token_key, signature) = auth.split_once(':')?;
    if token_key != key {
        return None;
    }
    let signed = format!("{socket_id}:{channel}:{channel_data}");
    if !signature_matches(
        &hmac_sha256(secret, signed.as_bytes()),
        signature.as_bytes(),
    ) {
        return None;
    }
    let member = Parser::document(channel_data)?;
    if !matches!(member, Json::Obj(_)) {
        return None;
    }
    let user_id = match member.get("user_id")? {
        Json::Str(s) if !s.is_empty() => s.clone(),
        Json::Int(text) => text.clone(),
        _ => return None,
    };
    if user_id.chars().count() > limits.max_user_id_length {
        return None;
    }
    let user_info = match member.get("user_info") {
        None | Some(Json::Null) => None,
        Some(info @ Json::Obj(_)) => {
            let mut out = String::new();
            compact(&mut out, info)?;
            if out.len() > limits.max_user_info_bytes {
                return None;
            }
            Some(out)
        }
        Some(_) => return None,
    };
    Some(PresenceSubscribe {
        channel: channel.clone(),
        user_id,
        user_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: SubscribeLimits = SubscribeLimits {
        max_frame_bytes: 32_768,
        max_channel_name_length: 200,
        max_user_id_length: 128,
        max_user_info_bytes: 1024,
    };

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().fold(String::new(), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
    }

    fn frame(channel: &str, channel_data: &str, secret: &[u8]) -> String {
        let signature = hex(&hmac_sha256(
            secret,
            format!("1.2:{channel}:{channel_data}").as_bytes(),
        ));
        let mut out = String::from(r#"{"event":"pusher:subscribe","data":{"channel":"#);
        quote_ascii(&mut out, channel);
        let _ = write!(out, r#","auth":"key:{signature}","channel_data":"#);
        quote_ascii(&mut out, channel_data);
        out.push_str("}}");
        out
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 and test case 6 (a key longer than the block).
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn accepts_a_signed_presence_subscribe() {
        let data = r#"{"user_id": "u-1", "user_info": {"name": "Zoë", "tags": [1, -0, true, null, "a\"b/\u007f\ud83d\ude00"]}}"#;
        let got = presence_subscribe(
            &frame("presence-room", data, b"s"),
            "1.2",
            "key",
            b"s",
            &LIMITS,
        );
        assert_eq!(
            got,
            Some(PresenceSubscribe {
                channel: "presence-room".into(),
                user_id: "u-1".into(),
                user_info: Some(
                    r#"{"name":"Zo\u00eb","tags":[1,0,true,null,"a\"b/\u007f\ud83d\ude00"]}"#
                        .into()
                ),
            })
        );
        let got = presence_subscribe(
            &frame("presence-x", r#"{"user_id":-0}"#, b"s"),
            "1.2",
            "key",
            b"s",
            &LIMITS,
        );
        assert_eq!(
            got.map(|m| (m.user_id, m.user_info)),
            Some(("0".into(), None))
        );
    }

    #[test]
    fn leaves_everything_else_to_the_reference() {
        let ok = r#"{"user_id":"u"}"#;
        for (channel, data, secret) in [
            ("private-room", ok, &b"s"[..]),              // not presence
            ("presence-ro om", ok, b"s"),                 // invalid name
            ("presence-room", ok, b"other"),              // bad signature
            ("presence-room", r#"{"user_id":""}"#, b"s"), // empty id
            ("presence-room", r#"{"user_id":1.5}"#, b"s"),
            ("presence-room", r#"{"user_id":true}"#, b"s"),
            (
                "presence-room",
                r#"{"user_id":"u","user_info":{"a":1,"a":2}}"#,
                b"s",
            ),
            (
                "presence-room",
                r#"{"user_id":"u","user_info":{"a":1e3}}"#,
                b"s",
            ),
            ("presence-room", r#"{"user_id":"u","user_info":[]}"#, b"s"),
            (
                "presence-room",
                r#"{"user_id":"u","user_info":{"a":"\ud800"}}"#,
                b"s",
            ),
            (
                "presence-room",
                r#"{"user_id":"u","user_info":{"a":NaN}}"#,
                b"s",
            ),
            ("presence-room", r#"["user_id"]"#, b"s"),
            ("presence-room", r#"{"user_id":"u"} x"#, b"s"),
        ] {
            let text = frame(channel, data, secret);
            assert_eq!(
                presence_subscribe(&text, "1.2", "key", b"s", &LIMITS),
                None,
                "{text}"
            );
        }
        let text = frame("presence-room", ok, b"s");
        assert!(presence_subscribe(&text, "1.2", "key", b"s", &LIMITS).is_some());
        assert!(presence_subscribe(&text, "1.3", "key", b"s", &LIMITS).is_none());
        assert!(presence_subscribe(&text, "1.2", "other", b"s", &LIMITS).is_none());
        let tight = SubscribeLimits {
            max_frame_bytes: text.len() - 1,
            ..LIMITS
        };
        assert!(presence_subscribe(&text, "1.2", "key", b"s", &tight).is_none());
    }

    #[test]
    fn unsubscribe_frames() {
        let take = |text: &str| client_frame(text, "1.2", "key", b"s", &LIMITS);
        assert_eq!(
            take(r#"{"event":"pusher:unsubscribe","data":{"channel":"presence-a"}}"#),
            Some(ClientFrame::Unsubscribe("presence-a".into()))
        );
        assert_eq!(
            take(r#"{"data":{"channel":"x","channel":"y\u00e9"},"event":"pusher:unsubscribe"}"#),
            Some(ClientFrame::Unsubscribe("y\u{e9}".into()))
        );
        for text in [
            r#"{"event":"pusher:unsubscribe","data":"{\"channel\":\"a\"}"}"#,
            r#"{"event":"pusher:unsubscribe","data":{"channel":1}}"#,
            r#"{"event":"pusher:unsubscribe","data":{}}"#,
            r#"{"event":"pusher:unsubscribe"}"#,
            r#"{"event":"pusher:unsubscribe","data":{"channel":"a","x":1.5}}"#,
            r#"{"event":"pusher:ping","data":{"channel":"a"}}"#,
        ] {
            assert_eq!(take(text), None, "{text}");
        }
    }
}
