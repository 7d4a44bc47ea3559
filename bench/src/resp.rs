//! RESP2 (the Redis protocol): encoding commands and an incremental parser over a byte buffer.
//!
//! The parser never trusts the peer: every length it reads is bounded by [`Limits`], so a
//! garbage or hostile stream yields a [`ProtocolError`] instead of a huge allocation or a panic.

use thiserror::Error;

/// A RESP2 reply (or, for tests and servers, any RESP2 value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// `+OK\r\n`
    Simple(Vec<u8>),
    /// `-ERR message\r\n`
    Error(Vec<u8>),
    /// `:42\r\n`
    Integer(i64),
    /// `$3\r\nfoo\r\n`; `None` is the null bulk string `$-1\r\n` (GET of a missing key).
    Bulk(Option<Vec<u8>>),
    /// `*2\r\n...`; `None` is the null array `*-1\r\n`.
    Array(Option<Vec<Value>>),
}

/// Bounds on what the parser accepts, so a corrupt stream cannot make it allocate without limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest bulk string, in bytes.
    pub max_bulk_len: usize,
    /// Most elements in one array.
    pub max_array_len: usize,
    /// Deepest nesting of arrays.
    pub max_depth: usize,
    /// Longest `+`, `-` or `:` line, in bytes (without the CRLF).
    pub max_line_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_len: 64 << 20,
            max_array_len: 1 << 20,
            max_depth: 8,
            max_line_len: 64 << 10,
        }
    }
}

/// The peer sent something that is not RESP2 (or exceeds [`Limits`]). The connection cannot be
/// resynchronised: drop it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("unknown RESP type byte 0x{0:02x}: the peer does not speak RESP2 (is it Redis?)")]
    UnknownType(u8),
    #[error("malformed RESP line: {0}")]
    BadLine(&'static str),
    #[error("RESP line longer than {limit} bytes without CRLF: corrupt stream")]
    LineTooLong { limit: usize },
    #[error("RESP {what} length {len} exceeds the limit {limit}")]
    TooLarge {
        what: &'static str,
        len: i64,
        limit: usize,
    },
    #[error("RESP arrays nested deeper than {0}")]
    TooDeep(usize),
    #[error("RESP bulk string not terminated by CRLF")]
    MissingCrlf,
}

/// Appends one command (an array of bulk strings) to `out`.
pub fn encode_command(out: &mut Vec<u8>, args: &[&[u8]]) {
    push_header(out, b'*', args.len() as i64);
    for arg in args {
        push_header(out, b'$', arg.len() as i64);
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
}

fn push_header(out: &mut Vec<u8>, kind: u8, n: i64) {
    out.push(kind);
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

impl Value {
    /// Appends the wire form of this value to `out` (the inverse of [`parse`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Value::Simple(s) => {
                out.push(b'+');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Value::Error(s) => {
                out.push(b'-');
                out.extend_from_slice(s);
                out.extend_from_slice(b"\r\n");
            }
            Value::Integer(n) => push_header(out, b':', *n),
            Value::Bulk(None) => out.extend_from_slice(b"$-1\r\n"),
            Value::Bulk(Some(b)) => {
                push_header(out, b'$', b.len() as i64);
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Value::Array(None) => out.extend_from_slice(b"*-1\r\n"),
            Value::Array(Some(items)) => {
                push_header(out, b'*', items.len() as i64);
                for item in items {
                    item.encode(out);
                }
            }
        }
    }

    /// The server's error text, if this is an error reply.
    pub fn error_text(&self) -> Option<String> {
        match self {
            Value::Error(e) => Some(String::from_utf8_lossy(e).into_owned()),
            _ => None,
        }
    }
}

/// Parses one value from the start of `buf`.
///
/// Returns `Ok(None)` when `buf` holds only a prefix of a value (read more and call again),
/// `Ok(Some((value, consumed)))` when a whole value was parsed from the first `consumed` bytes.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut pos = 0;
    match parse_at(buf, &mut pos, limits, 0)? {
        Some(value) => Ok(Some((value, pos))),
        None => Ok(None),
    }
}

/// Parses the value at `*pos`, advancing it past the value on success.
fn parse_at(
    buf: &[u8],
    pos: &mut usize,
    limits: &Limits,
    depth: usize,
) -> Result<Option<Value>, ProtocolError> {
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    // Reject a foreign stream at its first byte, not after waiting for a CRLF that may never come.
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(ProtocolError::UnknownType(kind));
    }
    let Some(line) = read_line(buf, *pos + 1, limits.max_line_len)? else {
        return Ok(None);
    };
    let after_line = *pos + 1 + line.len() + 2;
    match kind {
        b'+' | b'-' => {
            let text = line.to_vec();
            *pos = after_line;
            Ok(Some(if kind == b'+' {
                Value::Simple(text)
            } else {
                Value::Error(text)
            }))
        }
        b':' => {
            let n = parse_int(line)?;
            *pos = after_line;
            Ok(Some(Value::Integer(n)))
        }
        b'$' => {
            let len = parse_int(line)?;
            if len == -1 {
                *pos = after_line;
                return Ok(Some(Value::Bulk(None)));
            }
            let len = checked_len(len, "bulk string", limits.max_bulk_len)?;
            let end = after_line + len;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(ProtocolError::MissingCrlf);
            }
            let data = buf[after_line..end].to_vec();
            *pos = end + 2;
            Ok(Some(Value::Bulk(Some(data))))
        }
        b'*' => {
            let len = parse_int(line)?;
            if len == -1 {
                *pos = after_line;
                return Ok(Some(Value::Array(None)));
            }
            let len = checked_len(len, "array", limits.max_array_len)?;
            if depth + 1 > limits.max_depth {
                return Err(ProtocolError::TooDeep(limits.max_depth));
            }
            let mut cursor = after_line;
            // Each element takes at least 3 bytes (type, CRLF): do not reserve for elements
            // the buffer cannot hold yet, so a lying header costs nothing.
            let mut items = Vec::with_capacity(len.min((buf.len() - cursor) / 3 + 1));
            for _ in 0..len {
                match parse_at(buf, &mut cursor, limits, depth + 1)? {
                    Some(item) => items.push(item),
                    None => return Ok(None),
                }
            }
            *pos = cursor;
            Ok(Some(Value::Array(Some(items))))
        }
        _ => unreachable!("type byte checked above"),
    }
}

/// The bytes from `start` up to (not including) the next CRLF, or `None` if no CRLF yet.
fn read_line(buf: &[u8], start: usize, max_len: usize) -> Result<Option<&[u8]>, ProtocolError> {
    let rest = buf.get(start..).unwrap_or_default();
    let search = &rest[..rest.len().min(max_len + 2)];
    match search.windows(2).position(|w| w == b"\r\n") {
        Some(end) => Ok(Some(&rest[..end])),
        None if rest.len() >= max_len + 2 => Err(ProtocolError::LineTooLong { limit: max_len }),
        None => Ok(None),
    }
}

fn parse_int(line: &[u8]) -> Result<i64, ProtocolError> {
    let text = std::str::from_utf8(line).map_err(|_| ProtocolError::BadLine("non-ASCII number"))?;
    if text.is_empty() || text.starts_with('+') {
        return Err(ProtocolError::BadLine("not a number"));
    }
    text.parse()
        .map_err(|_| ProtocolError::BadLine("not a number"))
}

fn checked_len(len: i64, what: &'static str, limit: usize) -> Result<usize, ProtocolError> {
    match usize::try_from(len) {
        Ok(n) if n <= limit => Ok(n),
        _ => Err(ProtocolError::TooLarge { what, len, limit }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_all(bytes: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
        parse(bytes, &Limits::default())
    }

    #[test]
    fn encodes_a_command_as_an_array_of_bulk_strings() {
        let mut out = Vec::new();
        encode_command(&mut out, &[b"SET", b"key:1", b""]);
        assert_eq!(out, b"*3\r\n$3\r\nSET\r\n$5\r\nkey:1\r\n$0\r\n\r\n");
    }

    #[test]
    fn parses_each_reply_type() {
        let cases: Vec<(&[u8], Value)> = vec![
            (b"+OK\r\n", Value::Simple(b"OK".to_vec())),
            (b"-ERR no\r\n", Value::Error(b"ERR no".to_vec())),
            (b":-12\r\n", Value::Integer(-12)),
            (b"$-1\r\n", Value::Bulk(None)),
            (b"$0\r\n\r\n", Value::Bulk(Some(vec![]))),
            (b"$4\r\na\r\nb\r\n", Value::Bulk(Some(b"a\r\nb".to_vec()))),
            (b"*-1\r\n", Value::Array(None)),
            (
                b"*2\r\n$1\r\nx\r\n$-1\r\n",
                Value::Array(Some(vec![
                    Value::Bulk(Some(b"x".to_vec())),
                    Value::Bulk(None),
                ])),
            ),
        ];
        for (bytes, expected) in cases {
            assert_eq!(
                parse_all(bytes),
                Ok(Some((expected, bytes.len()))),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn leaves_the_next_reply_in_the_buffer() {
        let (value, used) = parse_all(b"+OK\r\n:1\r\n").unwrap().unwrap();
        assert_eq!(value, Value::Simple(b"OK".to_vec()));
        assert_eq!(used, 5);
    }

    #[test]
    fn rejects_what_is_not_resp() {
        assert_eq!(
            parse_all(b"HTTP/1.1"),
            Err(ProtocolError::UnknownType(b'H'))
        );
        assert!(parse_all(b":abc\r\n").is_err());
        assert!(parse_all(b"$-2\r\n").is_err());
        assert_eq!(parse_all(b"$1\r\nabc"), Err(ProtocolError::MissingCrlf));
    }

    #[test]
    fn enforces_limits() {
        let limits = Limits {
            max_bulk_len: 4,
            max_array_len: 2,
            max_depth: 2,
            max_line_len: 8,
        };
        assert!(matches!(
            parse(b"$5\r\n", &limits),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert!(matches!(
            parse(b"*3\r\n", &limits),
            Err(ProtocolError::TooLarge { .. })
        ));
        assert_eq!(
            parse(b"*1\r\n*1\r\n*1\r\n:1\r\n", &limits),
            Err(ProtocolError::TooDeep(2))
        );
        assert_eq!(
            parse(b"+0123456789", &limits),
            Err(ProtocolError::LineTooLong { limit: 8 })
        );
    }

    fn value_strategy() -> impl Strategy<Value = Value> {
        let line = proptest::collection::vec(
            any::<u8>().prop_filter("no CR/LF", |b| *b != b'\r' && *b != b'\n'),
            0..20,
        );
        let leaf = prop_oneof![
            line.clone().prop_map(Value::Simple),
            line.prop_map(Value::Error),
            any::<i64>().prop_map(Value::Integer),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))
                .prop_map(Value::Bulk),
            Just(Value::Array(None)),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            proptest::collection::vec(inner, 0..6).prop_map(|v| Value::Array(Some(v)))
        })
    }

    proptest! {
        #[test]
        fn never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_all(&bytes);
        }

        #[test]
        fn never_panics_on_mutated_replies(value in value_strategy(), at in any::<usize>(), byte in any::<u8>()) {
            let mut bytes = Vec::new();
            value.encode(&mut bytes);
            let at = at % bytes.len();
            bytes[at] = byte;
            let _ = parse_all(&bytes);
        }

        #[test]
        fn round_trips(value in value_strategy()) {
            let mut bytes = Vec::new();
            value.encode(&mut bytes);
            prop_assert_eq!(parse_all(&bytes), Ok(Some((value, bytes.len()))));
        }

        #[test]
        fn every_strict_prefix_is_incomplete(value in value_strategy()) {
            let mut bytes = Vec::new();
            value.encode(&mut bytes);
            for cut in 0..bytes.len() {
                prop_assert_eq!(parse_all(&bytes[..cut]), Ok(None), "cut at {}", cut);
            }
        }
    }
}
