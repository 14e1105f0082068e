//! The few gRPC-over-HTTP/2 pieces the relay reads itself: the deadline header, the message frame header
//! (to find the last response message, whose refs the router learns) and the status of a response.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::HeaderMap;

pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNAVAILABLE: u32 = 14;

/// `grpc-timeout` ("1-8 digits" + unit H/M/S/m/u/n) as a duration; None when absent or malformed (a
/// malformed one is no deadline, as grpc's own servers read it).
pub fn parse_timeout(value: &[u8]) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit[0] {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A remaining time as a `grpc-timeout` value (microseconds, or a coarser unit when it has too many digits).
pub fn format_timeout(left: Duration) -> String {
    let micros = left.as_micros().max(1);
    if micros < 100_000_000 {
        format!("{micros}u")
    } else if left.as_millis() < 100_000_000 {
        format!("{}m", left.as_millis())
    } else {
        format!("{}S", left.as_secs().min(99_999_999))
    }
}

/// The 5-byte header of a gRPC message: (compressed flag, payload length).
pub fn frame_header(b: &[u8]) -> Option<(bool, usize)> {
    if b.len() < 5 {
        return None;
    }
    Some((
        b[0] != 0,
        u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize,
    ))
}

/// `grpc-status` / `grpc-message` of trailers (or of a trailers-only response); None without a status.
pub fn status(headers: &HeaderMap) -> Option<(u32, String)> {
    let code = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .unwrap_or(UNKNOWN);
    let details = headers
        .get("grpc-message")
        .map(|v| percent_decode(v.as_bytes()))
        .unwrap_or_default();
    Some((code, details))
}

/// `grpc-message` is percent-encoded (the gRPC HTTP/2 spec); invalid sequences stay as they are.
pub fn percent_decode(v: &[u8]) -> String {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        if v[i] == b'%' && i + 2 < v.len() {
            let hex = std::str::from_utf8(&v[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(v[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `grpc-message` encoding: printable ASCII except '%' as is, the rest percent-encoded.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Follows the message frames of a response body, chunk by chunk, and keeps the last whole message
/// (its payload, without the frame header) as slices of the chunks: no copy until it is asked for.
#[derive(Default)]
pub struct LastMessage {
    header: Vec<u8>,
    left: usize,
    current: Vec<Bytes>,
    last: Option<Vec<Bytes>>,
}

impl LastMessage {
    pub fn feed(&mut self, chunk: &Bytes) {
        let mut chunk = chunk.clone();
        while chunk.has_remaining() {
            if self.left == 0 && self.header.len() < 5 {
                let take = (5 - self.header.len()).min(chunk.len());
                self.header.extend_from_slice(&chunk[..take]);
                chunk.advance(take);
                if self.header.len() == 5 {
                    let (_, len) = frame_header(&self.header).unwrap_or((false, 0));
                    self.left = len;
                    self.current.clear();
                    if len == 0 {
                        self.complete();
                    }
                }
                continue;
            }
            let take = self.left.min(chunk.len());
            self.current.push(chunk.split_to(take));
            self.left -= take;
            if self.left == 0 {
                self.complete();
            }
        }
    }

    fn complete(&mut self) {
        self.last = Some(std::mem::take(&mut self.current));
        self.header.clear();
    }

    /// The last whole message's payload.
    pub fn take(&mut self) -> Option<Bytes> {
        let parts = self.last.take()?;
        if parts.len() == 1 {
            return parts.into_iter().next();
        }
        let mut out = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
        for p in parts {
            out.extend_from_slice(&p);
        }
        Some(out.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout(b"100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5u"), Some(Duration::from_micros(5)));
        assert_eq!(parse_timeout(b"7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_timeout(b"123456789S"), None); // more than 8 digits
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"S"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
        for d in [
            Duration::from_micros(3),
            Duration::from_secs(5),
            Duration::from_secs(400_000),
        ] {
            let back = parse_timeout(format_timeout(d).as_bytes()).unwrap();
            assert!(back <= d && d - back < Duration::from_millis(1) || d.as_secs() >= 100_000);
        }
    }

    #[test]
    fn frame_headers() {
        assert_eq!(frame_header(&[0, 0, 0, 1, 2]), Some((false, 258)));
        assert_eq!(frame_header(&[1, 0, 0, 0, 0]), Some((true, 0)));
        assert_eq!(frame_header(&[0, 0, 0]), None);
    }

    #[test]
    fn last_message_across_chunks() {
        let mut m = LastMessage::default();
        let body = [&[0u8, 0, 0, 0, 3][..], b"abc", &[0, 0, 0, 0, 2], b"xy"].concat();
        for split in 0..body.len() {
            let mut m2 = LastMessage::default();
            m2.feed(&Bytes::copy_from_slice(&body[..split]));
            m2.feed(&Bytes::copy_from_slice(&body[split..]));
            assert_eq!(m2.take().as_deref(), Some(&b"xy"[..]), "split at {split}");
        }
        m.feed(&Bytes::copy_from_slice(&body[..7]));
        assert_eq!(m.take().as_deref(), None);
        m.feed(&Bytes::copy_from_slice(&body[7..]));
        assert_eq!(m.take().as_deref(), Some(&b"xy"[..]));
    }

    #[test]
    fn statuses() {
        let mut h = HeaderMap::new();
        assert_eq!(status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        h.insert("grpc-message", "draining%3A 100%25 gone".parse().unwrap());
        assert_eq!(status(&h), Some((14, "draining: 100% gone".to_string())));
        h.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(status(&h).unwrap().0, UNKNOWN);
        assert_eq!(percent_decode(b"bad%zz%4"), "bad%zz%4");
        assert_eq!(percent_encode("a%b\n"), "a%25b%0A");
    }
}
