//! The one binary codec every Weft wire format is built from. Pure.
//!
//! Conventions: integers big-endian; a flag is one byte, 0 or 1; an IP address
//! is a family byte (4 or 6) and its octets; a socket address adds a u16 port;
//! a key is its 32 raw bytes. Strings and lists carry their length first, with
//! a width chosen by the format (relay frames: u16 lengths and counts; mesh
//! control: u8 string lengths, u32 counts). Encoding never fails: strings over
//! their limit are cut at a char boundary, lists at their limit. Decoding
//! checks every length against its limit *and* against the bytes left before
//! allocating, so no input chooses an allocation, and never panics.
//!
//! Frames: a 4-byte big-endian length, then that many payload bytes, at most
//! a per-protocol limit ([`frame`], [`split_frame`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use thiserror::Error;

use crate::key::PublicKey;

/// What was malformed in a message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended inside a field.
    #[error("message truncated")]
    Truncated,
    /// Bytes were left after a complete message.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// The tag byte names no message.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// A string field is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
    /// A field, list or frame is longer than allowed.
    #[error("{what} too long ({len} > {max})")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An enumerated byte (flag, family, kind, reason, ...) is out of range.
    #[error("bad {what} value {value}")]
    BadValue {
        /// Which field.
        what: &'static str,
        /// The byte found.
        value: u8,
    },
}

/// Appends fields to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Writer {
        Writer::default()
    }
    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(b);
    }
    /// One byte.
    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    /// Big-endian u16.
    pub fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    /// Big-endian u32.
    pub fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    /// Big-endian u64.
    pub fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
    /// 0 or 1.
    pub fn flag(&mut self, v: bool) {
        self.u8(v as u8);
    }
    /// A list count as u16, clamped to `max`: returns how many items to write.
    pub fn count16(&mut self, n: usize, max: usize) -> usize {
        let n = n.min(max).min(u16::MAX as usize);
        self.u16(n as u16);
        n
    }
    /// A list count as u32, clamped to `max`: returns how many items to write.
    pub fn count32(&mut self, n: usize, max: usize) -> usize {
        let n = n.min(max).min(u32::MAX as usize);
        self.u32(n as u32);
        n
    }
    /// A string with a u8 length, cut to at most `max` (≤ 255) bytes at a char boundary.
    pub fn str8(&mut self, s: &str, max: usize) {
        let end = cut(s, max.min(u8::MAX as usize));
        self.u8(end as u8);
        self.bytes(&s.as_bytes()[..end]);
    }
    /// A string with a u16 length, cut to at most 65535 bytes at a char boundary.
    pub fn str16(&mut self, s: &str) {
        let end = cut(s, u16::MAX as usize);
        self.u16(end as u16);
        self.bytes(&s.as_bytes()[..end]);
    }
    /// An IP address: family byte and octets.
    pub fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(a) => {
                self.u8(4);
                self.bytes(&a.octets());
            }
            IpAddr::V6(a) => {
                self.u8(6);
                self.bytes(&a.octets());
            }
        }
    }
    /// A socket address: [`Writer::ip`] and a u16 port.
    pub fn addr(&mut self, a: SocketAddr) {
        self.ip(a.ip());
        self.u16(a.port());
    }
    /// A public key's 32 bytes.
    pub fn key(&mut self, k: &PublicKey) {
        self.bytes(&k.0);
    }
}

/// Longest prefix of `s` of at most `max` bytes ending at a char boundary.
fn cut(s: &str, max: usize) -> usize {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// Reads fields from a slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf }
    }
    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    /// The next `N` bytes as an array.
    pub fn arr<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    /// One byte.
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    /// Big-endian u16.
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    /// Big-endian u32.
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    /// Big-endian u64.
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    /// A flag byte: 0 or 1.
    pub fn flag(&mut self) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadValue {
                what: "flag",
                value,
            }),
        }
    }
    fn check_count(
        &self,
        what: &'static str,
        n: usize,
        max: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        if n > max {
            return Err(DecodeError::TooLong { what, len: n, max });
        }
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }
    /// A u16 list count, at most `max`, each item at least `min_item` bytes.
    pub fn count16(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u16()? as usize;
        self.check_count(what, n, max, min_item)
    }
    /// A u32 list count, at most `max`, each item at least `min_item` bytes.
    pub fn count32(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32()? as usize;
        self.check_count(what, n, max, min_item)
    }
    fn utf8(b: &[u8]) -> Result<String, DecodeError> {
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadUtf8)
    }
    /// A string with a u8 length.
    pub fn str8(&mut self) -> Result<String, DecodeError> {
        let n = self.u8()? as usize;
        Self::utf8(self.take(n)?)
    }
    /// A string with a u16 length.
    pub fn str16(&mut self) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        Self::utf8(self.take(n)?)
    }
    /// An IP address.
    pub fn ip(&mut self) -> Result<IpAddr, DecodeError> {
        match self.u8()? {
            4 => Ok(IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?))),
            6 => Ok(IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?))),
            value => Err(DecodeError::BadValue {
                what: "address family",
                value,
            }),
        }
    }
    /// A socket address.
    pub fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = self.ip()?;
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    /// A public key.
    pub fn key(&mut self) -> Result<PublicKey, DecodeError> {
        Ok(PublicKey(self.arr()?))
    }
    /// Succeeds only if everything was read.
    pub fn finish(self) -> Result<(), DecodeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.buf.len()))
        }
    }
}

/// A frame longer than the limit its protocol allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("frame too long ({len} > {max})")]
pub struct Oversize {
    /// The announced or given length.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

impl Oversize {
    /// As a decode error about `what`.
    pub fn as_decode(self, what: &'static str) -> DecodeError {
        DecodeError::TooLong {
            what,
            len: self.len,
            max: self.max,
        }
    }
}

/// Frames a payload of at most `max` bytes: a 4-byte big-endian length, then the payload.
pub fn frame(payload: &[u8], max: usize) -> Result<Vec<u8>, Oversize> {
    if payload.len() > max {
        return Err(Oversize {
            len: payload.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    Ok(out)
}

/// The payload length announced by a frame header, checked against `max`.
pub fn frame_len(head: [u8; 4], max: usize) -> Result<usize, Oversize> {
    let len = u32::from_be_bytes(head) as usize;
    if len > max {
        return Err(Oversize { len, max });
    }
    Ok(len)
}

/// Splits one frame of at most `max` bytes off the front of `buf`: `Ok(None)`
/// if more bytes are needed, else the payload and how many bytes it took.
pub fn split_frame(buf: &[u8], max: usize) -> Result<Option<(&[u8], usize)>, Oversize> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = frame_len([head[0], head[1], head[2], head[3]], max)?;
    Ok(buf.get(4..4 + len).map(|p| (p, 4 + len)))
}

/// The laws every message codec of this crate is tested against.
#[cfg(test)]
pub(crate) mod laws {
    use std::net::{IpAddr, SocketAddr};

    use proptest::prelude::*;

    use super::DecodeError;
    use crate::key::PublicKey;
    use crate::peermap::{Candidate, CandidateKind};

    /// Any key.
    pub(crate) fn key() -> impl Strategy<Value = PublicKey> {
        any::<[u8; 32]>().prop_map(PublicKey)
    }

    /// Any IPv4 or IPv6 socket address.
    pub(crate) fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(a.into()), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(a.into()), p)),
        ]
    }

    /// Any candidate.
    pub(crate) fn candidate() -> impl Strategy<Value = Candidate> {
        (addr(), any::<bool>()).prop_map(|(addr, r)| Candidate {
            addr,
            kind: if r {
                CandidateKind::Reflexive
            } else {
                CandidateKind::Local
            },
        })
    }

    /// One message `m` and its encoding `enc`: decodes back to `m`; every strict
    /// prefix is an error; trailing bytes (`extra`, non-empty) are an error; a
    /// flipped bit never panics.
    pub(crate) fn check<T: PartialEq + std::fmt::Debug>(
        m: &T,
        enc: &[u8],
        decode: impl Fn(&[u8]) -> Result<T, DecodeError>,
        cut: prop::sample::Index,
        (at, bit): (prop::sample::Index, u8),
        extra: &[u8],
    ) -> Result<(), TestCaseError> {
        let back = decode(enc);
        prop_assert_eq!(back.as_ref(), Ok(m));
        let n = cut.index(enc.len());
        prop_assert!(decode(&enc[..n]).is_err(), "prefix of {} bytes decoded", n);
        let mut long = enc.to_vec();
        long.extend_from_slice(extra);
        prop_assert!(decode(&long).is_err(), "trailing bytes accepted");
        let mut flipped = enc.to_vec();
        let i = at.index(flipped.len());
        flipped[i] ^= 1 << (bit % 8);
        let _ = decode(&flipped);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn strings_are_cut_at_char_boundaries() {
        let mut w = Writer::new();
        w.str8(&"é".repeat(200), 255);
        let b = w.into_bytes();
        assert_eq!(b[0], 254);
        let mut r = Reader::new(&b);
        assert_eq!(r.str8().map(|s| s.chars().count()), Ok(127));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn counts_are_checked_against_bytes_left() {
        let mut w = Writer::new();
        w.u32(1_000_000);
        let b = w.into_bytes();
        assert_eq!(
            Reader::new(&b).count32("peers", 1 << 20, 8),
            Err(DecodeError::Truncated)
        );
        assert!(matches!(
            Reader::new(&b).count32("peers", 10, 8),
            Err(DecodeError::TooLong { len: 1_000_000, .. })
        ));
    }

    proptest! {
        #[test]
        fn fields_roundtrip(a in any::<u8>(), b in any::<u16>(), c in any::<u32>(), d in any::<u64>(),
                            f in any::<bool>(), s in ".{0,80}", ip in any::<std::net::IpAddr>(), port in any::<u16>(),
                            key in any::<[u8; 32]>()) {
            let mut w = Writer::new();
            w.u8(a); w.u16(b); w.u32(c); w.u64(d); w.flag(f); w.str8(&s, 255); w.str16(&s);
            w.addr(SocketAddr::new(ip, port)); w.key(&PublicKey(key));
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.u8(), Ok(a));
            prop_assert_eq!(r.u16(), Ok(b));
            prop_assert_eq!(r.u32(), Ok(c));
            prop_assert_eq!(r.u64(), Ok(d));
            prop_assert_eq!(r.flag(), Ok(f));
            prop_assert_eq!(r.str8(), Ok(s.clone()));
            prop_assert_eq!(r.str16(), Ok(s));
            prop_assert_eq!(r.addr(), Ok(SocketAddr::new(ip, port)));
            prop_assert_eq!(r.key(), Ok(PublicKey(key)));
            prop_assert_eq!(r.finish(), Ok(()));
        }

        #[test]
        fn frames_split_back(payload in proptest::collection::vec(any::<u8>(), 0..300), extra in proptest::collection::vec(any::<u8>(), 0..8)) {
            let mut f = frame(&payload, 300).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let n = f.len();
            f.extend_from_slice(&extra);
            prop_assert_eq!(split_frame(&f, 300), Ok(Some((&payload[..], n))));
            prop_assert_eq!(split_frame(&f[..n - 1], 300).map(|o| o.is_none()), Ok(true));
        }

        #[test]
        fn reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut r = Reader::new(&bytes);
            let _ = r.count16("x", 4, 2);
            let _ = r.str8();
            let _ = r.str16();
            let _ = r.addr();
            let _ = r.count32("y", 1 << 20, 1);
            let _ = split_frame(&bytes, 16);
        }
    }
}
