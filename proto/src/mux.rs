//! The relay's TCP/TLS transport framing ("weft/1" after the HTTP `Upgrade`). Pure.
//!
//! When UDP is blocked, a client reaches the relay over TLS on TCP and carries
//! everything QUIC carries on one multiplexed byte stream: bidirectional
//! streams (with credit-based flow control, half-close, reset and stop codes),
//! unreliable datagrams (the relayed WireGuard packets), keepalive pings and a
//! close with an application code. Every frame is a 9-byte header, then
//! `len` payload bytes:
//!
//! ```text
//! [kind u8][stream id u32][len u32][payload ...]      (big-endian)
//! ```
//!
//! | kind | id | payload |
//! |---|---|---|
//! | `OPEN` | new stream (client odd, relay even) | none |
//! | `DATA` | stream | bytes, 1..=[`MAX_DATA`] |
//! | `FIN` | stream | none: the sender's direction ends |
//! | `RESET` | stream | u64 code: the sender abandons its direction |
//! | `STOP` | stream | u64 code: the receiver no longer reads; sends fail |
//! | `CREDIT` | stream | u64: the receiver accepts that many more bytes |
//! | `DATAGRAM` | 0 | bytes, at most [`MAX_DATAGRAM`] |
//! | `PING` / `PONG` | 0 | u64 nonce |
//! | `CLOSE` | 0 | u64 code, then a reason of at most [`MAX_REASON`] bytes |
//!
//! A stream's sender may have at most [`STREAM_WINDOW`] bytes outstanding
//! beyond what the receiver granted with `CREDIT`; a peer that exceeds it, or
//! sends a header this module refuses, is a protocol violation and the
//! connection ends. Decoding checks the length against the kind's limit before
//! anything is allocated.

use thiserror::Error;

/// Header bytes of every frame.
pub const HEADER: usize = 9;
/// Largest `DATA` payload.
pub const MAX_DATA: usize = 64 * 1024;
/// Largest `DATAGRAM` payload (a WireGuard packet with the relay path's header fits).
pub const MAX_DATAGRAM: usize = 64 * 1024;
/// Largest `CLOSE` reason.
pub const MAX_REASON: usize = 1024;
/// Bytes a stream's sender may send before the receiver grants more.
pub const STREAM_WINDOW: u64 = 8 * 1024 * 1024;
/// The HTTP `Upgrade` token and the path a client asks for.
pub const UPGRADE: &str = "weft/1";
/// The path that upgrades to this framing.
pub const UPGRADE_PATH: &str = "/weft/v1";
/// A path that answers `204 No Content` at once (latency probes).
pub const PROBE_PATH: &str = "/weft/probe";

/// A frame's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// A new stream.
    Open = 1,
    /// Stream bytes.
    Data = 2,
    /// The sender's direction ends.
    Fin = 3,
    /// The sender abandons its direction.
    Reset = 4,
    /// The receiver stops reading.
    Stop = 5,
    /// More credit for the sender.
    Credit = 6,
    /// An unreliable datagram.
    Datagram = 7,
    /// Keepalive.
    Ping = 8,
    /// Answer to a ping.
    Pong = 9,
    /// The connection ends.
    Close = 10,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Open,
            2 => Kind::Data,
            3 => Kind::Fin,
            4 => Kind::Reset,
            5 => Kind::Stop,
            6 => Kind::Credit,
            7 => Kind::Datagram,
            8 => Kind::Ping,
            9 => Kind::Pong,
            10 => Kind::Close,
            _ => return None,
        })
    }

    /// The payload lengths this kind allows.
    fn lengths(self) -> std::ops::RangeInclusive<usize> {
        match self {
            Kind::Open | Kind::Fin => 0..=0,
            Kind::Data => 1..=MAX_DATA,
            Kind::Reset | Kind::Stop | Kind::Credit | Kind::Ping | Kind::Pong => 8..=8,
            Kind::Datagram => 0..=MAX_DATAGRAM,
            Kind::Close => 8..=8 + MAX_REASON,
        }
    }

    /// Whether frames of this kind name a stream (id ≠ 0).
    pub fn has_stream(self) -> bool {
        matches!(
            self,
            Kind::Open | Kind::Data | Kind::Fin | Kind::Reset | Kind::Stop | Kind::Credit
        )
    }
}

/// A frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What the frame is.
    pub kind: Kind,
    /// The stream (0 for connection frames).
    pub id: u32,
    /// Payload bytes that follow.
    pub len: usize,
}

/// A header this framing refuses.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Unknown kind byte.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Length outside what the kind allows.
    #[error("{kind:?} frame of {len} bytes (allowed {min}..={max})")]
    BadLength {
        /// The kind.
        kind: Kind,
        /// The announced length.
        len: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
    /// A stream frame for stream 0, or a connection frame naming a stream.
    #[error("{kind:?} frame with stream id {id}")]
    BadStream {
        /// The kind.
        kind: Kind,
        /// The id found.
        id: u32,
    },
}

impl Header {
    /// Encodes the 9 header bytes.
    pub fn encode(&self) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[0] = self.kind as u8;
        h[1..5].copy_from_slice(&self.id.to_be_bytes());
        h[5..9].copy_from_slice(&(self.len as u32).to_be_bytes());
        h
    }

    /// Decodes and checks a header (kind known, length within the kind's limit,
    /// stream id present exactly when the kind names a stream).
    pub fn decode(h: [u8; HEADER]) -> Result<Header, HeaderError> {
        let kind = Kind::from_u8(h[0]).ok_or(HeaderError::UnknownKind(h[0]))?;
        let id = u32::from_be_bytes([h[1], h[2], h[3], h[4]]);
        let len = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) as usize;
        let allowed = kind.lengths();
        if !allowed.contains(&len) {
            return Err(HeaderError::BadLength {
                kind,
                len,
                min: *allowed.start(),
                max: *allowed.end(),
            });
        }
        if kind.has_stream() != (id != 0) {
            return Err(HeaderError::BadStream { kind, id });
        }
        Ok(Header { kind, id, len })
    }
}

/// A whole frame with an 8-byte value (`RESET`, `STOP`, `CREDIT`, `PING`, `PONG`).
pub fn value_frame(kind: Kind, id: u32, v: u64) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER + 8);
    f.extend_from_slice(&Header { kind, id, len: 8 }.encode());
    f.extend_from_slice(&v.to_be_bytes());
    f
}

/// A whole frame with no payload (`OPEN`, `FIN`).
pub fn empty_frame(kind: Kind, id: u32) -> Vec<u8> {
    Header { kind, id, len: 0 }.encode().to_vec()
}

/// A whole `CLOSE` frame; a reason over [`MAX_REASON`] is cut.
pub fn close_frame(code: u64, reason: &[u8]) -> Vec<u8> {
    let reason = &reason[..reason.len().min(MAX_REASON)];
    let mut f = Vec::with_capacity(HEADER + 8 + reason.len());
    f.extend_from_slice(
        &Header {
            kind: Kind::Close,
            id: 0,
            len: 8 + reason.len(),
        }
        .encode(),
    );
    f.extend_from_slice(&code.to_be_bytes());
    f.extend_from_slice(reason);
    f
}

/// The 8-byte value of a checked `RESET`/`STOP`/`CREDIT`/`PING`/`PONG` payload.
pub fn value(payload: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = payload.len().min(8);
    b[..n].copy_from_slice(&payload[..n]);
    u64::from_be_bytes(b)
}

/// A checked `CLOSE` payload's code and reason.
pub fn close_parts(payload: &[u8]) -> (u64, &[u8]) {
    (value(payload), payload.get(8..).unwrap_or(&[]))
}

/// Whether `id` is one the client side opens (odd) rather than the relay (even).
pub fn client_opened(id: u32) -> bool {
    id % 2 == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = Kind> {
        (1u8..=10).prop_map(|v| Kind::from_u8(v).expect("1..=10 are kinds"))
    }

    proptest! {
        #[test]
        fn valid_headers_roundtrip(kind in kind(), id in 1u32.., len in 0usize..=MAX_DATA + 2000) {
            let id = if kind.has_stream() { id } else { 0 };
            let h = Header { kind, id, len };
            match Header::decode(h.encode()) {
                Ok(back) => {
                    prop_assert_eq!(back, h);
                    prop_assert!(kind.lengths().contains(&len));
                }
                Err(HeaderError::BadLength { .. }) => prop_assert!(!kind.lengths().contains(&len)),
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        #[test]
        fn any_nine_bytes_decode_or_refuse_without_panic(h in any::<[u8; HEADER]>()) {
            if let Ok(d) = Header::decode(h) {
                prop_assert_eq!(d.encode(), h);
                prop_assert!(d.len <= MAX_DATA.max(MAX_DATAGRAM).max(8 + MAX_REASON));
            }
        }

        #[test]
        fn value_and_close_frames_carry_their_fields(v in any::<u64>(), reason in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let f = value_frame(Kind::Credit, 7, v);
            let h = Header::decode(f[..HEADER].try_into().map_err(|_| TestCaseError::fail("short"))?)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(h, Header { kind: Kind::Credit, id: 7, len: 8 });
            prop_assert_eq!(value(&f[HEADER..]), v);
            let c = close_frame(v, &reason);
            let h = Header::decode(c[..HEADER].try_into().map_err(|_| TestCaseError::fail("short"))?)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(h.len + HEADER, c.len());
            let (code, r) = close_parts(&c[HEADER..]);
            prop_assert_eq!(code, v);
            prop_assert_eq!(r, &reason[..reason.len().min(MAX_REASON)]);
        }
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let bad = Header::decode(
            Header {
                kind: Kind::Data,
                id: 0,
                len: 5,
            }
            .encode(),
        );
        assert_eq!(
            bad,
            Err(HeaderError::BadStream {
                kind: Kind::Data,
                id: 0
            })
        );
        let mut h = Header {
            kind: Kind::Data,
            id: 3,
            len: 1,
        }
        .encode();
        h[5..9].copy_from_slice(&(MAX_DATA as u32 + 1).to_be_bytes());
        assert!(matches!(
            Header::decode(h),
            Err(HeaderError::BadLength {
                kind: Kind::Data,
                ..
            })
        ));
        h[0] = 0xee;
        assert_eq!(Header::decode(h), Err(HeaderError::UnknownKind(0xee)));
        assert!(client_opened(1) && !client_opened(2));
    }
}
