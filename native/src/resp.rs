//! RESP2 on the wire: packing commands as arrays of bulk strings, and an incremental reply parser
//! that builds values through a caller-supplied [`Builder`] (so the Python glue builds Python
//! objects directly, and tests build plain Rust values).

use std::collections::VecDeque;
use std::fmt;

/// Largest bulk string or array length accepted from a server (Redis's `proto-max-bulk-len`).
pub const MAX_LEN: i64 = 512 * 1024 * 1024;

/// A stack-formatted decimal rendering of an integer, so packing never allocates for numbers.
pub struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    /// Formats an unsigned integer.
    #[inline]
    pub fn new(mut n: u64) -> Self {
        let mut buf = [0u8; 20];
        let mut start = buf.len();
        loop {
            start -= 1;
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        Self { buf, start }
    }

    /// Formats a signed integer (a leading `-` for negatives).
    #[inline]
    pub fn signed(n: i64) -> Self {
        let mut d = Self::new(n.unsigned_abs());
        if n < 0 {
            // 19 digits at most for |i64::MIN|, so there is always room for the sign.
            d.start -= 1;
            d.buf[d.start] = b'-';
        }
        d
    }

    /// The decimal digits.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// Somewhere RESP bytes are written: a growable `Vec<u8>` or an exactly sized [`Cursor`].
pub trait Sink {
    /// Appends `data`.
    fn put(&mut self, data: &[u8]);

    /// Appends `data` as a RESP bulk string `$<len>\r\n<data>\r\n`.
    #[inline]
    fn put_bulk(&mut self, data: &[u8]) {
        self.put(b"$");
        self.put(Decimal::new(data.len() as u64).as_bytes());
        self.put(b"\r\n");
        self.put(data);
        self.put(b"\r\n");
    }
}

impl Sink for Vec<u8> {
    #[inline]
    fn put(&mut self, data: &[u8]) {
        self.extend_from_slice(data);
    }
}

/// Writes into a preallocated buffer (such as a Python `bytes` object being built) whose size
/// was computed in advance, so the payload is written once, in place.
pub struct Cursor<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn position(&self) -> usize {
        self.pos
    }
}

impl Sink for Cursor<'_> {
    /// # Panics
    ///
    /// If the buffer is too small: the size computation and the writer disagree (a bug).
    #[inline]
    fn put(&mut self, data: &[u8]) {
        let end = self.pos + data.len();
        copy_small(&mut self.buf[self.pos..end], data);
        self.pos = end;
    }

    /// Writes the digits straight into the output: assembling the header elsewhere first and
    /// copying it cost more than the payload bytes themselves.
    #[inline]
    fn put_bulk(&mut self, data: &[u8]) {
        let n = data.len();
        let digits = decimal_len(n as u64);
        let end = self.pos + digits + n + 5;
        let out = &mut self.buf[self.pos..end];
        out[0] = b'$';
        let mut rest = n;
        for d in out[1..=digits].iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out[digits + 1] = b'\r';
        out[digits + 2] = b'\n';
        copy_small(&mut out[digits + 3..digits + 3 + n], data);
        out[digits + 3 + n] = b'\r';
        out[digits + 4 + n] = b'\n';
        self.pos = end;
    }
}

/// `dst.copy_from_slice(src)` for equal lengths, with short copies done as two overlapping
/// fixed-size moves: most RESP pieces are a few bytes, and a `memcpy` call per piece dominated
/// the cost of packing.
#[inline]
fn copy_small(dst: &mut [u8], src: &[u8]) {
    let n = src.len();
    match n {
        0 => {}
        1..=3 => {
            dst[0] = src[0];
            dst[n / 2] = src[n / 2];
            dst[n - 1] = src[n - 1];
        }
        4..=7 => {
            dst[..4].copy_from_slice(&src[..4]);
            dst[n - 4..].copy_from_slice(&src[n - 4..]);
        }
        8..=16 => {
            dst[..8].copy_from_slice(&src[..8]);
            dst[n - 8..].copy_from_slice(&src[n - 8..]);
        }
        17..=32 => {
            dst[..16].copy_from_slice(&src[..16]);
            dst[n - 16..].copy_from_slice(&src[n - 16..]);
        }
        33..=64 => {
            dst[..32].copy_from_slice(&src[..32]);
            dst[n - 32..].copy_from_slice(&src[n - 32..]);
        }
        _ => dst.copy_from_slice(src),
    }
}

/// Number of decimal digits of `n`.
#[inline]
pub fn decimal_len(mut n: u64) -> usize {
    let mut len = 1;
    while n >= 10 {
        n /= 10;
        len += 1;
    }
    len
}

/// Appends a RESP array header `*<n>\r\n`.
#[inline]
pub fn push_array_header<S: Sink>(out: &mut S, n: usize) {
    out.put(b"*");
    out.put(Decimal::new(n as u64).as_bytes());
    out.put(b"\r\n");
}

/// Bytes [`push_array_header`] writes for `n` elements.
#[inline]
pub fn array_header_size(n: usize) -> usize {
    decimal_len(n as u64) + 3
}

/// Appends a RESP bulk string `$<len>\r\n<data>\r\n`.
#[inline]
pub fn push_bulk<S: Sink>(out: &mut S, data: &[u8]) {
    out.put_bulk(data);
}

/// Appends the decimal rendering of `n` as a bulk string.
#[inline]
pub fn push_bulk_uint<S: Sink>(out: &mut S, n: u64) {
    push_bulk(out, Decimal::new(n).as_bytes());
}

/// Bytes [`push_bulk`] writes for a payload of `len` bytes.
#[inline]
pub fn bulk_size(len: usize) -> usize {
    len + decimal_len(len as u64) + 5
}

/// Bytes [`push_bulk_uint`] writes for `n`.
#[inline]
pub fn bulk_uint_size(n: u64) -> usize {
    bulk_size(decimal_len(n))
}

/// Packs one command as a RESP2 array of bulk strings.
pub fn pack_command<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let size = 16
        + args
            .iter()
            .map(|a| bulk_size(a.as_ref().len()))
            .sum::<usize>();
    let mut out = Vec::with_capacity(size);
    push_array_header(&mut out, args.len());
    for a in args {
        push_bulk(&mut out, a.as_ref());
    }
    out
}

/// Error replies the write path distinguishes, chosen by the first word of the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// `WRONGSHARD`: the server is another shard.
    WrongShard,
    /// `STALEEPOCH`: the write was prepared under an older topology.
    StaleEpoch,
    /// `NOIDENTITY`: the server was never initialised as a shard.
    NoIdentity,
    /// `READONLY`: the server is a replica.
    ReadOnly,
    /// `BADTAG`: the write tag does not match the key.
    BadTag,
    /// `BADOP`: unknown operation or wrong argument count.
    BadOp,
    /// Any other error reply.
    Other,
}

impl ErrorKind {
    /// Classifies an error reply by its code (first word).
    pub fn of(message: &[u8]) -> Self {
        match error_code(message) {
            b"WRONGSHARD" => Self::WrongShard,
            b"STALEEPOCH" => Self::StaleEpoch,
            b"NOIDENTITY" => Self::NoIdentity,
            b"READONLY" => Self::ReadOnly,
            b"BADTAG" => Self::BadTag,
            b"BADOP" => Self::BadOp,
            _ => Self::Other,
        }
    }
}

/// The code of an error reply: its first space-separated word.
pub fn error_code(message: &[u8]) -> &[u8] {
    let end = message
        .iter()
        .position(|&b| b == b' ')
        .unwrap_or(message.len());
    &message[..end]
}

/// Turns parsed RESP2 elements into values of the caller's choice.
pub trait Builder {
    /// The value type built for every reply and element.
    type Value;
    /// The error a failing build reports (propagated by [`Parser::feed`]).
    type Error;
    /// A simple string (`+...`).
    fn simple(&mut self, line: &[u8]) -> Result<Self::Value, Self::Error>;
    /// An error reply (`-...`), returned as a value, not raised.
    fn error(&mut self, line: &[u8]) -> Result<Self::Value, Self::Error>;
    /// An integer (`:...`).
    fn integer(&mut self, n: i64) -> Result<Self::Value, Self::Error>;
    /// A bulk string (`$n\r\n...`).
    fn bulk(&mut self, data: &[u8]) -> Result<Self::Value, Self::Error>;
    /// A null bulk string or null array (`$-1`, `*-1`).
    fn null(&mut self) -> Result<Self::Value, Self::Error>;
    /// An array whose elements are already built, in order.
    fn array(&mut self, items: Vec<Self::Value>) -> Result<Self::Value, Self::Error>;
}

/// Why [`Parser::feed`] failed.
#[derive(Debug, PartialEq, Eq)]
pub enum FeedError<E> {
    /// The byte stream is not valid RESP2 (or the parser failed before); the parser is unusable.
    Malformed(String),
    /// The builder failed; the parser is unusable.
    Build(E),
}

impl<E: fmt::Display> fmt::Display for FeedError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Malformed(m) => f.write_str(m),
            Self::Build(e) => e.fmt(f),
        }
    }
}

/// The message of every call on a parser that already failed.
pub const POISONED: &str = "reply reader is unusable after a previous protocol error";

struct Frame<V> {
    remaining: usize,
    items: Vec<V>,
}

/// Incremental RESP2 reply parser: feed it bytes in chunks of any size, take complete replies.
///
/// Partially received arrays keep their already-built elements, so every byte is parsed once.
pub struct Parser<V> {
    buf: Vec<u8>,
    stack: Vec<Frame<V>>,
    ready: VecDeque<V>,
    poisoned: bool,
}

impl<V> Default for Parser<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> Parser<V> {
    /// An empty parser.
    pub fn new() -> Self {
        Self {
            buf: Vec::new(),
            stack: Vec::new(),
            ready: VecDeque::new(),
            poisoned: false,
        }
    }

    /// Whether a previous error made this parser unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// Parses `data` (appended to any unparsed tail of earlier feeds).
    pub fn feed<B: Builder<Value = V>>(
        &mut self,
        data: &[u8],
        builder: &mut B,
    ) -> Result<(), FeedError<B::Error>> {
        if self.poisoned {
            return Err(FeedError::Malformed(POISONED.to_owned()));
        }
        let result = if self.buf.is_empty() {
            // Common case: parse straight from the caller's bytes, keep only the tail.
            let r = parse(data, &mut self.stack, &mut self.ready, builder);
            if let Ok(used) = r {
                self.buf.extend_from_slice(&data[used..]);
            }
            r
        } else {
            self.buf.extend_from_slice(data);
            let r = parse(&self.buf, &mut self.stack, &mut self.ready, builder);
            if let Ok(used) = r {
                self.buf.drain(..used);
            }
            r
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) => {
                self.poisoned = true;
                self.buf = Vec::new();
                self.stack = Vec::new();
                self.ready.clear();
                Err(e)
            }
        }
    }

    /// Number of complete replies waiting.
    pub fn available(&self) -> usize {
        self.ready.len()
    }

    /// Removes and returns exactly `n` replies, or `None` (consuming nothing) if fewer wait.
    pub fn take(&mut self, n: usize) -> Option<Vec<V>> {
        if self.ready.len() < n {
            return None;
        }
        Some(self.ready.drain(..n).collect())
    }
}

fn malformed<T, E>(what: &str) -> Result<T, FeedError<E>> {
    Err(FeedError::Malformed(format!("malformed RESP: {what}")))
}

/// Finds the `\r\n` ending the line that starts at `from`; `Ok(None)` if not yet received.
#[inline]
fn line_end<E>(input: &[u8], from: usize) -> Result<Option<usize>, FeedError<E>> {
    match input[from..].iter().position(|&b| b == b'\r') {
        None => Ok(None),
        Some(i) => {
            let cr = from + i;
            match input.get(cr + 1) {
                None => Ok(None),
                Some(b'\n') => Ok(Some(cr)),
                Some(_) => malformed("CR not followed by LF"),
            }
        }
    }
}

fn parse_int<E>(line: &[u8]) -> Result<i64, FeedError<E>> {
    let (neg, digits) = match line.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, line),
    };
    if digits.is_empty() {
        return malformed("empty integer");
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return malformed("non-digit in integer");
        }
        let digit = i64::from(d - b'0');
        n = match n.checked_mul(10).and_then(|n| {
            if neg {
                n.checked_sub(digit)
            } else {
                n.checked_add(digit)
            }
        }) {
            Some(n) => n,
            None => return malformed("integer overflow"),
        };
    }
    Ok(n)
}

/// Parses as many complete elements of `input` as possible; returns the bytes consumed.
fn parse<B: Builder>(
    input: &[u8],
    stack: &mut Vec<Frame<B::Value>>,
    ready: &mut VecDeque<B::Value>,
    b: &mut B,
) -> Result<usize, FeedError<B::Error>> {
    let mut pos = 0;
    while pos < input.len() {
        let kind = input[pos];
        if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
            return malformed(&format!("unexpected type byte 0x{kind:02x}"));
        }
        let Some(end) = line_end(input, pos + 1)? else {
            break;
        };
        let line = &input[pos + 1..end];
        let mut next = end + 2;
        let value = match kind {
            b'+' => b.simple(line),
            b'-' => b.error(line),
            b':' => b.integer(parse_int(line)?),
            b'$' => {
                let n = parse_int(line)?;
                if n == -1 {
                    b.null()
                } else if !(0..=MAX_LEN).contains(&n) {
                    return malformed("bad bulk length");
                } else {
                    let n = n as usize;
                    if input.len() < next + n + 2 {
                        break;
                    }
                    if &input[next + n..next + n + 2] != b"\r\n" {
                        return malformed("bulk string not terminated by CRLF");
                    }
                    let v = b.bulk(&input[next..next + n]);
                    next += n + 2;
                    v
                }
            }
            _ => {
                let n = parse_int(line)?;
                if n == -1 {
                    b.null()
                } else if !(0..=MAX_LEN).contains(&n) {
                    return malformed("bad array length");
                } else if n == 0 {
                    b.array(Vec::new())
                } else {
                    let n = n as usize;
                    stack.push(Frame {
                        remaining: n,
                        items: Vec::with_capacity(n.min(1024)),
                    });
                    pos = next;
                    continue;
                }
            }
        };
        let mut value = value.map_err(FeedError::Build)?;
        pos = next;
        // Deliver the value to its enclosing array, closing every array it completes.
        loop {
            let Some(frame) = stack.last_mut() else {
                ready.push_back(value);
                break;
            };
            frame.items.push(value);
            frame.remaining -= 1;
            if frame.remaining > 0 {
                break;
            }
            let items = stack.pop().map(|f| f.items).unwrap_or_default();
            value = b.array(items).map_err(FeedError::Build)?;
        }
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug, PartialEq)]
    enum V {
        Simple(Vec<u8>),
        Err(Vec<u8>),
        Int(i64),
        Bulk(Vec<u8>),
        Nil,
        Arr(Vec<V>),
    }

    struct B;
    impl Builder for B {
        type Value = V;
        type Error = ();
        fn simple(&mut self, l: &[u8]) -> Result<V, ()> {
            Ok(V::Simple(l.to_vec()))
        }
        fn error(&mut self, l: &[u8]) -> Result<V, ()> {
            Ok(V::Err(l.to_vec()))
        }
        fn integer(&mut self, n: i64) -> Result<V, ()> {
            Ok(V::Int(n))
        }
        fn bulk(&mut self, d: &[u8]) -> Result<V, ()> {
            Ok(V::Bulk(d.to_vec()))
        }
        fn null(&mut self) -> Result<V, ()> {
            Ok(V::Nil)
        }
        fn array(&mut self, items: Vec<V>) -> Result<V, ()> {
            Ok(V::Arr(items))
        }
    }

    fn encode(v: &V, out: &mut Vec<u8>) {
        match v {
            V::Simple(s) => {
                out.push(b'+');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            V::Err(s) => {
                out.push(b'-');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            V::Int(n) => {
                out.push(b':');
                out.extend_from_slice(Decimal::signed(*n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            V::Bulk(d) => push_bulk(out, d),
            V::Nil => out.extend_from_slice(b"$-1\r\n"),
            V::Arr(items) => {
                push_array_header(out, items.len());
                for i in items {
                    encode(i, out);
                }
            }
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Result<Vec<V>, FeedError<()>> {
        let mut p = Parser::new();
        for c in chunks {
            p.feed(c, &mut B)?;
        }
        let n = p.available();
        Ok(p.take(n).unwrap())
    }

    fn line() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            0..20,
        )
    }

    fn value() -> impl Strategy<Value = V> {
        let leaf = prop_oneof![
            line().prop_map(V::Simple),
            line().prop_map(V::Err),
            any::<i64>().prop_map(V::Int),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(V::Bulk),
            Just(V::Nil),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            proptest::collection::vec(inner, 0..8).prop_map(V::Arr)
        })
    }

    #[test]
    fn small_copies() {
        for n in 0..100usize {
            let src: Vec<u8> = (0..n).map(|i| i as u8 ^ 0x5a).collect();
            let mut dst = vec![0u8; n];
            copy_small(&mut dst, &src);
            assert_eq!(dst, src);
        }
    }

    #[test]
    fn decimal() {
        assert_eq!(Decimal::new(0).as_bytes(), b"0");
        assert_eq!(Decimal::new(u64::MAX).as_bytes(), b"18446744073709551615");
        assert_eq!(
            Decimal::signed(i64::MIN).as_bytes(),
            b"-9223372036854775808"
        );
        assert_eq!(Decimal::signed(-7).as_bytes(), b"-7");
    }

    #[test]
    fn packs_commands() {
        assert_eq!(
            pack_command(&[&b"SET"[..], b"k", b""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n".to_vec()
        );
        assert_eq!(pack_command::<&[u8]>(&[]), b"*0\r\n".to_vec());
        assert_eq!(bulk_size(10), b"$10\r\n0123456789\r\n".len());
        assert_eq!(array_header_size(12), b"*12\r\n".len());
        for n in [0, 9, 10, 99, 100, u64::MAX] {
            assert_eq!(decimal_len(n), Decimal::new(n).as_bytes().len());
        }
        for n in [0usize, 1, 9, 10, 11, 99, 100, 1000, 12345] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let mut want = Vec::new();
            push_bulk(&mut want, &data);
            let mut buf = vec![0u8; bulk_size(n)];
            let mut c = Cursor::new(&mut buf);
            push_bulk(&mut c, &data);
            assert_eq!(c.position(), buf.len());
            assert_eq!(buf, want);
        }
    }

    #[test]
    fn parses_every_type() {
        let got = parse_all(&[b"+OK\r\n-ERR bad thing\r\n:-12\r\n$3\r\nabc\r\n$-1\r\n*-1\r\n*0\r\n*2\r\n*1\r\n:1\r\n$0\r\n\r\n"]).unwrap();
        assert_eq!(
            got,
            vec![
                V::Simple(b"OK".to_vec()),
                V::Err(b"ERR bad thing".to_vec()),
                V::Int(-12),
                V::Bulk(b"abc".to_vec()),
                V::Nil,
                V::Nil,
                V::Arr(vec![]),
                V::Arr(vec![V::Arr(vec![V::Int(1)]), V::Bulk(vec![])]),
            ]
        );
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            &b"?x\r\n"[..],
            b":12a\r\n",
            b":\r\n",
            b":99999999999999999999\r\n",
            b"$3\r\nabcde\r\n",
            b"$-2\r\n",
            b"*-5\r\n",
            b"+a\rb\r\n",
            b"%1\r\n",
        ] {
            let mut p: Parser<V> = Parser::new();
            assert!(
                matches!(p.feed(bad, &mut B), Err(FeedError::Malformed(_))),
                "{bad:?}"
            );
            assert!(p.is_poisoned());
            assert!(p.feed(b"+OK\r\n", &mut B).is_err());
        }
    }

    #[test]
    fn take_is_all_or_nothing() {
        let mut p = Parser::new();
        p.feed(b"+a\r\n+b\r\n*2\r\n:1\r\n", &mut B).unwrap();
        assert_eq!(p.available(), 2);
        assert!(p.take(3).is_none());
        assert_eq!(p.available(), 2);
        assert_eq!(p.take(1).unwrap(), vec![V::Simple(b"a".to_vec())]);
        p.feed(b":2\r\n", &mut B).unwrap();
        assert_eq!(p.take(2).unwrap().len(), 2);
        assert_eq!(p.take(0).unwrap(), vec![]);
    }

    #[test]
    fn error_kinds() {
        assert_eq!(
            ErrorKind::of(b"WRONGSHARD expected x"),
            ErrorKind::WrongShard
        );
        assert_eq!(ErrorKind::of(b"STALEEPOCH"), ErrorKind::StaleEpoch);
        assert_eq!(ErrorKind::of(b"NOIDENTITY no"), ErrorKind::NoIdentity);
        assert_eq!(ErrorKind::of(b"READONLY You can't"), ErrorKind::ReadOnly);
        assert_eq!(ErrorKind::of(b"BADTAG x"), ErrorKind::BadTag);
        assert_eq!(ErrorKind::of(b"BADOP x"), ErrorKind::BadOp);
        assert_eq!(ErrorKind::of(b"BADTAGX x"), ErrorKind::Other);
        assert_eq!(ErrorKind::of(b"ERR x"), ErrorKind::Other);
        assert_eq!(error_code(b"ERR x y"), b"ERR");
        assert_eq!(error_code(b""), b"");
    }

    proptest! {
        #[test]
        fn roundtrip_any_split(values in proptest::collection::vec(value(), 1..6), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..6)) {
            let mut wire = Vec::new();
            for v in &values {
                encode(v, &mut wire);
            }
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.push(0);
            points.push(wire.len());
            points.sort_unstable();
            let chunks: Vec<&[u8]> = points.windows(2).map(|w| &wire[w[0]..w[1]]).collect();
            prop_assert_eq!(parse_all(&chunks).unwrap(), values);
        }

        #[test]
        fn never_panics(data in proptest::collection::vec(prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'*'), Just(b'$'), Just(b'1'), Just(b'-'), any::<u8>()], 0..64)) {
            let mut p: Parser<V> = Parser::new();
            let _ = p.feed(&data, &mut B);
        }
    }
}
