//! The one binary codec every Weft wire format is built from. Pure.
//!
//! Conventions: integers big-endian; a flag is one byte, 0 or 1; an IP address
//! is a family byte (4 or 6) and its octets; a socket address adds a u16 port;
//! a key is its 32 raw bytes. Strings and lists carry their length first, with
//! a width chosen by the [`Format`] (relay frames: u16 lengths and counts; mesh
//! control: u8 string lengths, u32 counts); an option is a flag, then the
//! value if present. Encoding never fails: strings over
//! their limit are cut at a char boundary, lists at their limit. Decoding
//! checks every length against its limit *and* against the bytes left before
//! allocating, so no input chooses an allocation, and never panics.
//!
//! Frames: a 4-byte big-endian length, then that many payload bytes, at most
//! a per-protocol limit ([`frame`], [`split_frame`], [`FrameLimit`]).
//!
//! Messages: a tag byte and the fields it names. A message type implements
//! [`Wire`] (its tags and fields) and gets whole-message `encode`/`decode`;
//! `laws` (tests) is the one property check every message codec passes.

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

/// How wide a length or a count is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// One byte.
    U8,
    /// Big-endian u16.
    U16,
    /// Big-endian u32.
    U32,
}

impl Width {
    /// The largest value this width holds.
    pub fn max(self) -> usize {
        match self {
            Width::U8 => u8::MAX as usize,
            Width::U16 => u16::MAX as usize,
            Width::U32 => u32::MAX as usize,
        }
    }
    /// How many bytes it takes.
    pub fn bytes(self) -> usize {
        match self {
            Width::U8 => 1,
            Width::U16 => 2,
            Width::U32 => 4,
        }
    }
}

/// The length widths one wire format chose (see the module doc): every
/// [`Writer`] and [`Reader`] works in one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Width of a list count.
    pub count: Width,
    /// Width of a string length (a string is cut to what it holds).
    pub len: Width,
}

/// Appends fields to a buffer, in one [`Format`].
#[derive(Debug)]
pub struct Writer {
    buf: Vec<u8>,
    format: Format,
}

impl Writer {
    /// An empty writer for `format`.
    pub fn new(format: Format) -> Writer {
        Writer {
            buf: Vec::new(),
            format,
        }
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
    /// `n` in `width`, clamped to `max` and to what the width holds: returns the value written.
    fn len(&mut self, width: Width, n: usize, max: usize) -> usize {
        let n = n.min(max).min(width.max());
        match width {
            Width::U8 => self.u8(n as u8),
            Width::U16 => self.u16(n as u16),
            Width::U32 => self.u32(n as u32),
        }
        n
    }
    /// A list count in the format's width, clamped to `max`: returns how many items to write.
    pub fn count(&mut self, n: usize, max: usize) -> usize {
        self.len(self.format.count, n, max)
    }
    /// A list: its [`Writer::count`], then the first that many items, each as `put` writes it.
    pub fn list<T>(&mut self, items: &[T], max: usize, mut put: impl FnMut(&mut Writer, &T)) {
        let n = self.count(items.len(), max);
        for x in &items[..n] {
            put(self, x);
        }
    }
    /// A string with a length in the format's width, cut at a char boundary to what it holds.
    pub fn str(&mut self, s: &str) {
        let end = cut(s, self.format.len.max());
        self.len(self.format.len, end, usize::MAX);
        self.bytes(&s.as_bytes()[..end]);
    }
    /// A list of at most `max` strings.
    pub fn strs(&mut self, v: &[String], max: usize) {
        self.list(v, max, |w, s| w.str(s));
    }
    /// An optional value: a flag, then the value as `put` writes it if there is one.
    pub fn option<T>(&mut self, v: Option<&T>, put: impl FnOnce(&mut Writer, &T)) {
        self.flag(v.is_some());
        if let Some(v) = v {
            put(self, v);
        }
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

/// Reads fields from a slice, in one [`Format`].
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    format: Format,
}

impl<'a> Reader<'a> {
    /// Reads `buf`, written in `format`.
    pub fn new(buf: &'a [u8], format: Format) -> Reader<'a> {
        Reader { buf, format }
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
    /// A length or count in `width`.
    fn len(&mut self, width: Width) -> Result<usize, DecodeError> {
        Ok(match width {
            Width::U8 => self.u8()? as usize,
            Width::U16 => self.u16()? as usize,
            Width::U32 => self.u32()? as usize,
        })
    }
    /// A list count in the format's width, at most `max`, each item at least
    /// `min_item` bytes: checked against the bytes left before anything is allocated.
    pub fn count(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.len(self.format.count)?;
        if n > max {
            return Err(DecodeError::TooLong { what, len: n, max });
        }
        if n.saturating_mul(min_item) > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }
    /// A list written by [`Writer::list`]: its [`Reader::count`], then that many items `get` reads.
    pub fn list<T>(
        &mut self,
        what: &'static str,
        max: usize,
        min_item: usize,
        mut get: impl FnMut(&mut Reader<'a>) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let n = self.count(what, max, min_item)?;
        (0..n).map(|_| get(self)).collect()
    }
    /// A string with a length in the format's width.
    pub fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.len(self.format.len)?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::BadUtf8)
    }
    /// A list of at most `max` strings.
    pub fn strs(&mut self, what: &'static str, max: usize) -> Result<Vec<String>, DecodeError> {
        let min = self.format.len.bytes();
        self.list(what, max, min, Reader::str)
    }
    /// An optional value written by [`Writer::option`].
    pub fn option<T>(
        &mut self,
        get: impl FnOnce(&mut Reader<'a>) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        if self.flag()? {
            get(self).map(Some)
        } else {
            Ok(None)
        }
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

/// A tagged message format built on this codec: a message is a tag byte and
/// the fields that tag names. Encoding and decoding whole messages are
/// written once, here; a format writes only its tags and fields.
pub trait Wire: Sized {
    /// The widths this format's lengths and counts use.
    const FORMAT: Format;
    /// This format's frames.
    const FRAME: FrameLimit;
    /// Writes the tag byte, then the fields.
    fn put(&self, w: &mut Writer);
    /// Reads the tag byte and the fields it names ([`DecodeError::UnknownTag`] for none).
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;

    /// Encodes (without the frame header). Lists over their limits are cut.
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new(Self::FORMAT);
        self.put(&mut w);
        w.into_bytes()
    }
    /// Decodes one message; the whole slice must be the message.
    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf, Self::FORMAT);
        let msg = Self::get(&mut r)?;
        r.finish()?;
        Ok(msg)
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

/// One protocol's frame limit and what its frames are called in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimit {
    /// Largest payload.
    pub max: usize,
    /// The frame's name in a [`DecodeError::TooLong`].
    pub what: &'static str,
}

impl FrameLimit {
    /// [`frame`] under this limit.
    pub fn frame(self, payload: &[u8]) -> Result<Vec<u8>, DecodeError> {
        frame(payload, self.max).map_err(|o| o.as_decode(self.what))
    }
    /// [`split_frame`] under this limit.
    pub fn split(self, buf: &[u8]) -> Result<Option<(&[u8], usize)>, DecodeError> {
        split_frame(buf, self.max).map_err(|o| o.as_decode(self.what))
    }
}

/// The laws every message codec of this crate is tested against.
#[cfg(test)]
pub(crate) mod laws {
    use std::net::{IpAddr, SocketAddr};

    use proptest::prelude::*;

    use super::{FrameLimit, Wire};
    use crate::key::PublicKey;
    use crate::peermap::{Candidate, CandidateKind, Version};

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

    /// Any peer-map version.
    pub(crate) fn version() -> impl Strategy<Value = Version> {
        any::<(u64, u64)>().prop_map(|(epoch, seq)| Version { epoch, seq })
    }

    /// What the laws probe one message with: where to cut it, which bit to
    /// flip, what to append (non-empty), and unrelated bytes.
    #[derive(Debug, Clone)]
    pub(crate) struct Probes {
        cut: prop::sample::Index,
        at: prop::sample::Index,
        bit: u8,
        extra: Vec<u8>,
        garbage: Vec<u8>,
    }

    /// Any probes.
    pub(crate) fn probes() -> impl Strategy<Value = Probes> {
        (
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            0u8..8,
            prop::collection::vec(any::<u8>(), 1..8),
            prop::collection::vec(any::<u8>(), 0..512),
        )
            .prop_map(|(cut, at, bit, extra, garbage)| Probes {
                cut,
                at,
                bit,
                extra,
                garbage,
            })
    }

    /// One message `m` of format `T`: its encoding decodes back to `m`; every
    /// strict prefix is an error; trailing bytes are an error; a flipped bit
    /// never panics. Its frame is 4 bytes longer and splits back to the
    /// encoding; every strict prefix of the frame needs more bytes. Garbage
    /// never panics, as a message or as a frame.
    pub(crate) fn check<T: Wire + PartialEq + std::fmt::Debug>(
        m: &T,
        p: &Probes,
    ) -> Result<(), TestCaseError> {
        let enc = m.encode();
        let back = T::decode(&enc);
        prop_assert_eq!(back.as_ref(), Ok(m));
        let n = p.cut.index(enc.len());
        prop_assert!(
            T::decode(&enc[..n]).is_err(),
            "prefix of {} bytes decoded",
            n
        );
        let mut long = enc.clone();
        long.extend_from_slice(&p.extra);
        prop_assert!(T::decode(&long).is_err(), "trailing bytes accepted");
        let mut flipped = enc.clone();
        let i = p.at.index(flipped.len());
        flipped[i] ^= 1 << (p.bit % 8);
        let _ = T::decode(&flipped);

        let frame = T::FRAME
            .frame(&enc)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(frame.len(), enc.len() + 4);
        prop_assert_eq!(T::FRAME.split(&frame), Ok(Some((&enc[..], frame.len()))));
        let fc = p.cut.index(frame.len());
        prop_assert_eq!(T::FRAME.split(&frame[..fc]), Ok(None));

        let _ = T::decode(&p.garbage);
        let _ = T::FRAME.split(&p.garbage);
        Ok(())
    }

    /// A frame over `limit` is refused when encoding and as soon as its header
    /// is read; a header within it only asks for more bytes.
    pub(crate) fn check_frame_limit(limit: FrameLimit) {
        assert!(limit.frame(&vec![0u8; limit.max + 1]).is_err());
        let head = ((limit.max + 1) as u32).to_be_bytes();
        assert!(limit.split(&head).is_err());
        assert_eq!(limit.split(&[0, 0, 0, 5, 1]), Ok(None));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHORT: Format = Format {
        count: Width::U16,
        len: Width::U8,
    };
    const LONG: Format = Format {
        count: Width::U32,
        len: Width::U16,
    };

    #[test]
    fn strings_are_cut_at_char_boundaries() {
        let mut w = Writer::new(SHORT);
        w.str(&"é".repeat(200));
        let b = w.into_bytes();
        assert_eq!(b[0], 254);
        let mut r = Reader::new(&b, SHORT);
        assert_eq!(r.str().map(|s| s.chars().count()), Ok(127));
        assert_eq!(r.finish(), Ok(()));
    }

    #[test]
    fn counts_are_checked_against_bytes_left() {
        let mut w = Writer::new(LONG);
        w.u32(1_000_000);
        let b = w.into_bytes();
        assert_eq!(
            Reader::new(&b, LONG).count("peers", 1 << 20, 8),
            Err(DecodeError::Truncated)
        );
        assert!(matches!(
            Reader::new(&b, LONG).count("peers", 10, 8),
            Err(DecodeError::TooLong { len: 1_000_000, .. })
        ));
    }

    proptest! {
        #[test]
        fn fields_roundtrip(a in any::<u8>(), b in any::<u16>(), c in any::<u32>(), d in any::<u64>(),
                            f in any::<bool>(), s in ".{0,80}", ip in any::<std::net::IpAddr>(), port in any::<u16>(),
                            key in any::<[u8; 32]>()) {
            for format in [SHORT, LONG] {
                let tags = vec![s.clone(); (a % 4) as usize];
                let mut w = Writer::new(format);
                w.u8(a); w.u16(b); w.u32(c); w.u64(d); w.flag(f); w.str(&s); w.strs(&tags, 3);
                w.addr(SocketAddr::new(ip, port)); w.key(&PublicKey(key));
                w.option(Some(&b), |w, v| w.u16(*v)); w.option(None::<&u16>, |w, v| w.u16(*v));
                let bytes = w.into_bytes();
                let mut r = Reader::new(&bytes, format);
                prop_assert_eq!(r.u8(), Ok(a));
                prop_assert_eq!(r.u16(), Ok(b));
                prop_assert_eq!(r.u32(), Ok(c));
                prop_assert_eq!(r.u64(), Ok(d));
                prop_assert_eq!(r.flag(), Ok(f));
                prop_assert_eq!(r.str(), Ok(s.clone()));
                prop_assert_eq!(r.strs("tags", 3), Ok(tags[..tags.len().min(3)].to_vec()));
                prop_assert_eq!(r.addr(), Ok(SocketAddr::new(ip, port)));
                prop_assert_eq!(r.key(), Ok(PublicKey(key)));
                prop_assert_eq!(r.option(Reader::u16), Ok(Some(b)));
                prop_assert_eq!(r.option(Reader::u16), Ok(None));
                prop_assert_eq!(r.finish(), Ok(()));
            }
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
            for format in [SHORT, LONG] {
                let mut r = Reader::new(&bytes, format);
                let _ = r.count("x", 4, 2);
                let _ = r.str();
                let _ = r.strs("y", 1 << 20);
                let _ = r.addr();
                let _ = r.option(Reader::key);
                let _ = r.list("z", 1 << 20, 1, Reader::u8);
            }
            let _ = split_frame(&bytes, 16);
        }
    }
}
