//! The control-session codec between a node and the coordinator. Pure.
//!
//! Same conventions as [`crate::wire`]: a frame is a 4-byte big-endian length
//! and that many bytes; a message is a tag byte and its fields; strings are a
//! u16 length plus UTF-8; keys 32 raw bytes; addresses a family byte (4 or 6),
//! the address bytes and a u16 port. Frames here may be larger than relay
//! frames ([`MAX_CONTROL_FRAME`], 16 MiB) because a snapshot lists every
//! visible peer (~120 bytes each: 10,000 peers ≈ 1.2 MB). Decoding checks every
//! count against a limit and against the bytes left, rejects unknown tags and
//! trailing bytes, and never panics.
//!
//! Messages: coordinator → node [`ControlMsg::Snapshot`], [`ControlMsg::Delta`],
//! [`ControlMsg::CallMeMaybe`] (forwarded, `peer` = the sender); node →
//! coordinator [`ControlMsg::EndpointReport`], [`ControlMsg::CallMeMaybe`]
//! (`peer` = the target), [`ControlMsg::Ack`] (the version it holds; also the
//! resync request after a gap or a reconnect).
//!
//! [`read_control`] / [`write_control`] move one frame over any tokio stream
//! (generic, like [`crate::wire::read_message`]); the reader takes a size
//! limit, so the relay accepts only small frames from nodes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::policy::{FilterRules, InboundRule, PortRange, Proto};
use super::{
    Candidate, CandidateKind, Delta, Peer, PeerChange, PeerMapUpdate, SelfInfo, Snapshot, Version,
    MAX_CANDIDATES, MAX_TAGS,
};
use crate::keys::PublicKey;

/// Largest control frame payload.
pub const MAX_CONTROL_FRAME: usize = 16 << 20;
/// Most peers in a snapshot.
pub const MAX_PEERS: usize = 1 << 20;
/// Most filter rules.
pub const MAX_RULES: usize = 4096;
/// Most ports ranges in one rule.
pub const MAX_PORT_RANGES: usize = 1024;
/// Longest string field (names and tags are labels of at most 63).
pub const MAX_STR: usize = 255;

/// A decoding error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlWireError {
    /// The input ended inside a field.
    #[error("control message truncated")]
    Truncated,
    /// Bytes left after the message.
    #[error("{0} trailing bytes after control message")]
    Trailing(usize),
    /// Unknown message tag.
    #[error("unknown control message tag {0}")]
    UnknownTag(u8),
    /// An enum byte out of range.
    #[error("bad {what} code {code}")]
    BadCode {
        /// Which field.
        what: &'static str,
        /// The byte.
        code: u8,
    },
    /// A string is not UTF-8.
    #[error("string field is not UTF-8")]
    BadUtf8,
    /// A count or length over its limit.
    #[error("{what} too long ({len} > {max})")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
}

type Result<T> = std::result::Result<T, ControlWireError>;

/// Every control-session message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlMsg {
    /// A full peer map.
    Snapshot(Snapshot),
    /// One change.
    Delta(Delta),
    /// The node's current candidates.
    EndpointReport(Vec<Candidate>),
    /// "Probe me at these candidates now": node → coordinator names the
    /// target, coordinator → node names the sender.
    CallMeMaybe {
        /// Target (upstream) or sender (downstream).
        peer: PublicKey,
        /// The sender's candidates.
        endpoints: Vec<Candidate>,
    },
    /// The version the node holds (after applying, or to resync).
    Ack(Version),
}

impl From<PeerMapUpdate> for ControlMsg {
    fn from(u: PeerMapUpdate) -> Self {
        match u {
            PeerMapUpdate::Snapshot(s) => ControlMsg::Snapshot(s),
            PeerMapUpdate::Delta(d) => ControlMsg::Delta(d),
        }
    }
}

const T_SNAPSHOT: u8 = 1;
const T_DELTA: u8 = 2;
const T_ENDPOINTS: u8 = 3;
const T_CALL_ME_MAYBE: u8 = 4;
const T_ACK: u8 = 5;

const C_UPSERT: u8 = 1;
const C_REMOVE: u8 = 2;
const C_FILTER: u8 = 3;

#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }
    /// Counts are clamped to `max`; items beyond are not written.
    fn count(&mut self, n: usize, max: usize) -> usize {
        let n = n.min(max);
        self.u32(n as u32);
        n
    }
    fn str(&mut self, s: &str) {
        let mut end = s.len().min(MAX_STR);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.u8(end as u8);
        self.0.extend_from_slice(&s.as_bytes()[..end]);
    }
    fn strs(&mut self, v: &[String], max: usize) {
        let n = self.count(v.len(), max);
        for s in &v[..n] {
            self.str(s);
        }
    }
    fn key(&mut self, k: &PublicKey) {
        self.0.extend_from_slice(&k.0);
    }
    fn version(&mut self, v: Version) {
        self.u64(v.epoch);
        self.u64(v.seq);
    }
    fn addr(&mut self, a: SocketAddr) {
        match a.ip() {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.0.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.0.extend_from_slice(&v6.octets());
            }
        }
        self.u16(a.port());
    }
    fn candidates(&mut self, c: &[Candidate]) {
        let n = self.count(c.len(), MAX_CANDIDATES);
        for cand in &c[..n] {
            self.u8(match cand.kind {
                CandidateKind::Local => 1,
                CandidateKind::Reflexive => 2,
            });
            self.addr(cand.addr);
        }
    }
    fn peer(&mut self, p: &Peer) {
        self.key(&p.key);
        self.str(&p.name);
        self.strs(&p.tags, MAX_TAGS);
        self.0.extend_from_slice(&p.ipv4.octets());
        self.0.extend_from_slice(&p.ipv6.octets());
        self.candidates(&p.endpoints);
        self.u8(p.online as u8);
    }
    fn filter(&mut self, f: &FilterRules) {
        let n = self.count(f.rules.len(), MAX_RULES);
        for r in &f.rules[..n] {
            self.str(&r.from);
            self.u8(r.proto.code());
            let m = self.count(r.ports.len(), MAX_PORT_RANGES);
            for p in &r.ports[..m] {
                self.u16(p.lo);
                self.u16(p.hi);
            }
        }
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.0.len() < n {
            return Err(ControlWireError::Truncated);
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.arr::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.arr()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.arr()?))
    }
    /// A count, checked against `max` and against the bytes left (each
    /// item takes at least `min_item` bytes), so no huge allocation happens.
    fn count(&mut self, what: &'static str, max: usize, min_item: usize) -> Result<usize> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(ControlWireError::TooLong { what, len: n, max });
        }
        if n.saturating_mul(min_item) > self.0.len() {
            return Err(ControlWireError::Truncated);
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<String> {
        let n = self.u8()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| ControlWireError::BadUtf8)
    }
    fn strs(&mut self, what: &'static str, max: usize) -> Result<Vec<String>> {
        let n = self.count(what, max, 1)?;
        (0..n).map(|_| self.str()).collect()
    }
    fn key(&mut self) -> Result<PublicKey> {
        Ok(PublicKey(self.arr()?))
    }
    fn version(&mut self) -> Result<Version> {
        Ok(Version {
            epoch: self.u64()?,
            seq: self.u64()?,
        })
    }
    fn addr(&mut self) -> Result<SocketAddr> {
        let ip = match self.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(self.arr::<4>()?)),
            6 => IpAddr::V6(Ipv6Addr::from(self.arr::<16>()?)),
            code => {
                return Err(ControlWireError::BadCode {
                    what: "address family",
                    code,
                })
            }
        };
        Ok(SocketAddr::new(ip, self.u16()?))
    }
    fn candidates(&mut self) -> Result<Vec<Candidate>> {
        let n = self.count("candidates", MAX_CANDIDATES, 8)?;
        (0..n)
            .map(|_| {
                let kind = match self.u8()? {
                    1 => CandidateKind::Local,
                    2 => CandidateKind::Reflexive,
                    code => {
                        return Err(ControlWireError::BadCode {
                            what: "candidate kind",
                            code,
                        })
                    }
                };
                Ok(Candidate {
                    addr: self.addr()?,
                    kind,
                })
            })
            .collect()
    }
    fn peer(&mut self) -> Result<Peer> {
        Ok(Peer {
            key: self.key()?,
            name: self.str()?,
            tags: self.strs("tags", MAX_TAGS)?,
            ipv4: Ipv4Addr::from(self.arr::<4>()?),
            ipv6: Ipv6Addr::from(self.arr::<16>()?),
            endpoints: self.candidates()?,
            online: self.flag()?,
        })
    }
    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            code => Err(ControlWireError::BadCode { what: "flag", code }),
        }
    }
    fn filter(&mut self) -> Result<FilterRules> {
        let n = self.count("filter rules", MAX_RULES, 6)?;
        let mut rules = Vec::with_capacity(n);
        for _ in 0..n {
            let from = self.str()?;
            let code = self.u8()?;
            let proto = Proto::from_code(code).ok_or(ControlWireError::BadCode {
                what: "protocol",
                code,
            })?;
            let m = self.count("port ranges", MAX_PORT_RANGES, 4)?;
            let ports = (0..m)
                .map(|_| {
                    Ok(PortRange {
                        lo: self.u16()?,
                        hi: self.u16()?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            rules.push(InboundRule { from, proto, ports });
        }
        Ok(FilterRules { rules })
    }
}

/// Smallest encoded peer: key, name length, tag count, v4, v6, candidate count, online.
const MIN_PEER: usize = 32 + 1 + 4 + 4 + 16 + 4 + 1;

impl ControlMsg {
    /// Encodes (without the frame header). Lists over their limits are cut.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::default();
        match self {
            ControlMsg::Snapshot(s) => {
                w.u8(T_SNAPSHOT);
                w.version(s.version);
                w.str(&s.me.name);
                w.strs(&s.me.tags, MAX_TAGS);
                w.0.extend_from_slice(&s.me.ipv4.octets());
                w.0.extend_from_slice(&s.me.ipv6.octets());
                w.filter(&s.filter);
                let n = w.count(s.peers.len(), MAX_PEERS);
                for p in &s.peers[..n] {
                    w.peer(p);
                }
            }
            ControlMsg::Delta(d) => {
                w.u8(T_DELTA);
                w.version(d.version);
                match &*d.change {
                    PeerChange::Upsert(p) => {
                        w.u8(C_UPSERT);
                        w.peer(p);
                    }
                    PeerChange::Remove(k) => {
                        w.u8(C_REMOVE);
                        w.key(k);
                    }
                    PeerChange::Filter(f) => {
                        w.u8(C_FILTER);
                        w.filter(f);
                    }
                }
            }
            ControlMsg::EndpointReport(c) => {
                w.u8(T_ENDPOINTS);
                w.candidates(c);
            }
            ControlMsg::CallMeMaybe { peer, endpoints } => {
                w.u8(T_CALL_ME_MAYBE);
                w.key(peer);
                w.candidates(endpoints);
            }
            ControlMsg::Ack(v) => {
                w.u8(T_ACK);
                w.version(*v);
            }
        }
        w.0
    }

    /// Decodes one message; the whole slice must be the message.
    pub fn decode(buf: &[u8]) -> Result<ControlMsg> {
        let mut r = R(buf);
        let msg = match r.u8()? {
            T_SNAPSHOT => {
                let version = r.version()?;
                let me = SelfInfo {
                    name: r.str()?,
                    tags: r.strs("tags", MAX_TAGS)?,
                    ipv4: Ipv4Addr::from(r.arr::<4>()?),
                    ipv6: Ipv6Addr::from(r.arr::<16>()?),
                };
                let filter = r.filter()?;
                let n = r.count("peers", MAX_PEERS, MIN_PEER)?;
                let peers = (0..n)
                    .map(|_| r.peer().map(Arc::new))
                    .collect::<Result<Vec<_>>>()?;
                ControlMsg::Snapshot(Snapshot {
                    version,
                    me,
                    filter,
                    peers,
                })
            }
            T_DELTA => {
                let version = r.version()?;
                let change = match r.u8()? {
                    C_UPSERT => PeerChange::Upsert(Arc::new(r.peer()?)),
                    C_REMOVE => PeerChange::Remove(r.key()?),
                    C_FILTER => PeerChange::Filter(r.filter()?),
                    code => {
                        return Err(ControlWireError::BadCode {
                            what: "peer change",
                            code,
                        })
                    }
                };
                ControlMsg::Delta(Delta {
                    version,
                    change: Arc::new(change),
                })
            }
            T_ENDPOINTS => ControlMsg::EndpointReport(r.candidates()?),
            T_CALL_ME_MAYBE => ControlMsg::CallMeMaybe {
                peer: r.key()?,
                endpoints: r.candidates()?,
            },
            T_ACK => ControlMsg::Ack(r.version()?),
            t => return Err(ControlWireError::UnknownTag(t)),
        };
        if !r.0.is_empty() {
            return Err(ControlWireError::Trailing(r.0.len()));
        }
        Ok(msg)
    }

    /// Encodes as one frame (length prefix + message).
    pub fn encode_frame(&self) -> Result<Vec<u8>> {
        crate::wire::frame_with_limit(&self.encode(), MAX_CONTROL_FRAME).map_err(too_long)
    }
}

fn too_long(o: crate::wire::Oversize) -> ControlWireError {
    ControlWireError::TooLong {
        what: "control frame",
        len: o.len,
        max: o.max,
    }
}

/// Splits one frame off the front of `buf`: `Ok(None)` if more bytes are
/// needed, else the payload and how many bytes it consumed.
pub fn decode_control_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>> {
    crate::wire::split_frame(buf, MAX_CONTROL_FRAME).map_err(too_long)
}

/// Reading or writing one control frame failed.
#[derive(Debug, Error)]
pub enum ControlIoError {
    /// The stream failed or ended inside a frame.
    #[error("control stream: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is not a valid control message (or over the size limit).
    #[error("control stream: {0}")]
    Wire(#[from] ControlWireError),
    /// The stream ended cleanly between frames.
    #[error("control stream ended")]
    Eof,
}

/// Reads one control frame of at most `max` payload bytes and decodes it.
pub async fn read_control<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> std::result::Result<ControlMsg, ControlIoError> {
    use crate::wire::RawFrameError;
    let payload = crate::wire::read_frame_with_limit(r, max.min(MAX_CONTROL_FRAME))
        .await
        .map_err(|e| match e {
            RawFrameError::Eof => ControlIoError::Eof,
            RawFrameError::Io(e) => ControlIoError::Io(e),
            RawFrameError::Oversize(o) => ControlIoError::Wire(too_long(o)),
        })?;
    Ok(ControlMsg::decode(&payload)?)
}

/// Encodes and writes one control frame.
pub async fn write_control<W: AsyncWrite + Unpin>(
    w: &mut W,
    msg: &ControlMsg,
) -> std::result::Result<(), ControlIoError> {
    let frame = msg.encode_frame()?;
    w.write_all(&frame).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,20}|.{0,10}"
    }

    fn key() -> impl Strategy<Value = PublicKey> {
        any::<[u8; 32]>().prop_map(PublicKey)
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(a.into()), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(a.into()), p)),
        ]
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (addr(), any::<bool>()).prop_map(|(addr, r)| Candidate {
                addr,
                kind: if r {
                    CandidateKind::Reflexive
                } else {
                    CandidateKind::Local
                },
            }),
            0..4,
        )
    }

    fn peer() -> impl Strategy<Value = Peer> {
        (
            key(),
            label(),
            prop::collection::vec(label(), 0..3),
            any::<[u8; 4]>(),
            any::<[u8; 16]>(),
            candidates(),
            any::<bool>(),
        )
            .prop_map(|(key, name, tags, v4, v6, endpoints, online)| Peer {
                key,
                name,
                tags,
                ipv4: v4.into(),
                ipv6: v6.into(),
                endpoints,
                online,
            })
    }

    fn filter() -> impl Strategy<Value = FilterRules> {
        prop::collection::vec(
            (
                label(),
                1u8..=4,
                prop::collection::vec(any::<(u16, u16)>(), 0..3),
            )
                .prop_map(|(from, p, ports)| InboundRule {
                    from,
                    proto: Proto::from_code(p).unwrap_or(Proto::Any),
                    ports: ports
                        .into_iter()
                        .map(|(lo, hi)| PortRange { lo, hi })
                        .collect(),
                }),
            0..3,
        )
        .prop_map(|rules| FilterRules { rules })
    }

    fn version() -> impl Strategy<Value = Version> {
        any::<(u64, u64)>().prop_map(|(epoch, seq)| Version { epoch, seq })
    }

    fn msg() -> impl Strategy<Value = ControlMsg> {
        prop_oneof![
            (
                version(),
                label(),
                prop::collection::vec(label(), 0..3),
                any::<[u8; 4]>(),
                any::<[u8; 16]>(),
                filter(),
                prop::collection::vec(peer().prop_map(Arc::new), 0..4)
            )
                .prop_map(|(version, name, tags, v4, v6, filter, peers)| {
                    ControlMsg::Snapshot(Snapshot {
                        version,
                        me: SelfInfo {
                            name,
                            tags,
                            ipv4: v4.into(),
                            ipv6: v6.into(),
                        },
                        filter,
                        peers,
                    })
                }),
            (version(), peer()).prop_map(|(version, p)| ControlMsg::Delta(Delta {
                version,
                change: Arc::new(PeerChange::Upsert(Arc::new(p)))
            })),
            (version(), key()).prop_map(|(version, k)| ControlMsg::Delta(Delta {
                version,
                change: Arc::new(PeerChange::Remove(k))
            })),
            (version(), filter()).prop_map(|(version, f)| ControlMsg::Delta(Delta {
                version,
                change: Arc::new(PeerChange::Filter(f))
            })),
            candidates().prop_map(ControlMsg::EndpointReport),
            (key(), candidates())
                .prop_map(|(peer, endpoints)| ControlMsg::CallMeMaybe { peer, endpoints }),
            version().prop_map(ControlMsg::Ack),
        ]
    }

    proptest! {
        #[test]
        fn roundtrip(m in msg()) {
            let enc = m.encode();
            prop_assert_eq!(ControlMsg::decode(&enc), Ok(m.clone()));
            let frame = m.encode_frame().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(frame.len(), enc.len() + 4);
            prop_assert_eq!(decode_control_frame(&frame), Ok(Some((&enc[..], frame.len()))));
        }

        #[test]
        fn every_prefix_is_an_error(m in msg(), cut in any::<prop::sample::Index>()) {
            let enc = m.encode();
            let n = cut.index(enc.len());
            prop_assert!(ControlMsg::decode(&enc[..n]).is_err());
        }

        #[test]
        fn trailing_rejected(m in msg(), extra in prop::collection::vec(any::<u8>(), 1..8)) {
            let mut enc = m.encode();
            enc.extend_from_slice(&extra);
            prop_assert!(ControlMsg::decode(&enc).is_err());
        }

        #[test]
        fn flipped_never_panics(m in msg(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut enc = m.encode();
            let i = at.index(enc.len());
            enc[i] ^= 1 << bit;
            let _ = ControlMsg::decode(&enc);
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = ControlMsg::decode(&bytes);
            let _ = decode_control_frame(&bytes);
        }
    }

    #[tokio::test]
    async fn frames_over_the_reader_limit_are_refused() {
        let mut buf = Vec::new();
        let m = ControlMsg::EndpointReport(vec![]);
        assert!(write_control(&mut buf, &m).await.is_ok());
        assert!(
            write_control(&mut buf, &ControlMsg::Ack(Version::default()))
                .await
                .is_ok()
        );
        let mut cur = std::io::Cursor::new(buf.clone());
        assert!(matches!(read_control(&mut cur, 64).await, Ok(x) if x == m));
        assert!(matches!(
            read_control(&mut cur, 64).await,
            Ok(ControlMsg::Ack(_))
        ));
        assert!(matches!(
            read_control(&mut cur, 64).await,
            Err(ControlIoError::Eof)
        ));
        let mut cur = std::io::Cursor::new(buf);
        assert!(matches!(
            read_control(&mut cur, 1).await,
            Err(ControlIoError::Wire(ControlWireError::TooLong { .. }))
        ));
    }

    #[test]
    fn huge_counts_fail_fast() {
        // A snapshot claiming 2^20 peers in a few bytes: truncated, no allocation.
        let mut m = ControlMsg::Snapshot(Snapshot {
            version: Version::default(),
            me: SelfInfo {
                name: "a".into(),
                tags: vec![],
                ipv4: Ipv4Addr::UNSPECIFIED,
                ipv6: Ipv6Addr::UNSPECIFIED,
            },
            filter: FilterRules::default(),
            peers: vec![],
        })
        .encode();
        let n = m.len();
        m[n - 4..].copy_from_slice(&(MAX_PEERS as u32).to_be_bytes());
        assert_eq!(ControlMsg::decode(&m), Err(ControlWireError::Truncated));
        m[n - 4..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            ControlMsg::decode(&m),
            Err(ControlWireError::TooLong { .. })
        ));
        let head = ((MAX_CONTROL_FRAME + 1) as u32).to_be_bytes();
        assert!(decode_control_frame(&head).is_err());
        assert_eq!(decode_control_frame(&[0, 0, 0, 5, 1]), Ok(None));
    }
}
