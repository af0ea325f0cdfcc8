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

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::acl::{FilterRules, InboundRule, PortRange, Proto};
use crate::codec::{self, DecodeError, Reader, Writer};
use crate::key::PublicKey;
use crate::peermap::{
    get_candidate, put_candidate, Candidate, Delta, Peer, PeerChange, PeerMapUpdate, SelfInfo,
    Snapshot, Version, MAX_CANDIDATES, MAX_TAGS,
};

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

/// A decoding error (the one [`DecodeError`] of every Weft codec).
pub type ControlWireError = DecodeError;

type Result<T> = std::result::Result<T, DecodeError>;

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

fn put_strs(w: &mut Writer, v: &[String], max: usize) {
    let n = w.count32(v.len(), max);
    for x in &v[..n] {
        w.str8(x, MAX_STR);
    }
}

fn get_strs(r: &mut Reader<'_>, what: &'static str, max: usize) -> Result<Vec<String>> {
    let n = r.count32(what, max, 1)?;
    (0..n).map(|_| r.str8()).collect()
}

fn put_candidates(w: &mut Writer, c: &[Candidate]) {
    let n = w.count32(c.len(), MAX_CANDIDATES);
    for cand in &c[..n] {
        put_candidate(w, cand);
    }
}

fn get_candidates(r: &mut Reader<'_>) -> Result<Vec<Candidate>> {
    let n = r.count32("candidates", MAX_CANDIDATES, 8)?;
    (0..n).map(|_| get_candidate(r)).collect()
}

fn put_peer(w: &mut Writer, p: &Peer) {
    w.key(&p.key);
    w.str8(&p.name, MAX_STR);
    put_strs(w, &p.tags, MAX_TAGS);
    w.bytes(&p.ipv4.octets());
    w.bytes(&p.ipv6.octets());
    put_candidates(w, &p.endpoints);
    w.flag(p.online);
}

fn get_peer(r: &mut Reader<'_>) -> Result<Peer> {
    Ok(Peer {
        key: r.key()?,
        name: r.str8()?,
        tags: get_strs(r, "tags", MAX_TAGS)?,
        ipv4: Ipv4Addr::from(r.arr::<4>()?),
        ipv6: Ipv6Addr::from(r.arr::<16>()?),
        endpoints: get_candidates(r)?,
        online: r.flag()?,
    })
}

fn put_filter(w: &mut Writer, f: &FilterRules) {
    let n = w.count32(f.rules.len(), MAX_RULES);
    for rule in &f.rules[..n] {
        w.str8(&rule.from, MAX_STR);
        w.u8(rule.proto.code());
        let m = w.count32(rule.ports.len(), MAX_PORT_RANGES);
        for p in &rule.ports[..m] {
            w.u16(p.lo);
            w.u16(p.hi);
        }
    }
}

fn get_filter(r: &mut Reader<'_>) -> Result<FilterRules> {
    let n = r.count32("filter rules", MAX_RULES, 6)?;
    let mut rules = Vec::with_capacity(n);
    for _ in 0..n {
        let from = r.str8()?;
        let value = r.u8()?;
        let proto = Proto::from_code(value).ok_or(DecodeError::BadValue {
            what: "protocol",
            value,
        })?;
        let m = r.count32("port ranges", MAX_PORT_RANGES, 4)?;
        let ports = (0..m)
            .map(|_| {
                Ok(PortRange {
                    lo: r.u16()?,
                    hi: r.u16()?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        rules.push(InboundRule { from, proto, ports });
    }
    Ok(FilterRules { rules })
}

/// Smallest encoded peer: key, name length, tag count, v4, v6, candidate count, online.
const MIN_PEER: usize = 32 + 1 + 4 + 4 + 16 + 4 + 1;

impl ControlMsg {
    /// Encodes (without the frame header). Lists over their limits are cut.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match self {
            ControlMsg::Snapshot(s) => {
                w.u8(T_SNAPSHOT);
                s.version.encode(&mut w);
                w.str8(&s.me.name, MAX_STR);
                put_strs(&mut w, &s.me.tags, MAX_TAGS);
                w.bytes(&s.me.ipv4.octets());
                w.bytes(&s.me.ipv6.octets());
                put_filter(&mut w, &s.filter);
                let n = w.count32(s.peers.len(), MAX_PEERS);
                for p in &s.peers[..n] {
                    put_peer(&mut w, p);
                }
            }
            ControlMsg::Delta(d) => {
                w.u8(T_DELTA);
                d.version.encode(&mut w);
                match &*d.change {
                    PeerChange::Upsert(p) => {
                        w.u8(C_UPSERT);
                        put_peer(&mut w, p);
                    }
                    PeerChange::Remove(k) => {
                        w.u8(C_REMOVE);
                        w.key(k);
                    }
                    PeerChange::Filter(f) => {
                        w.u8(C_FILTER);
                        put_filter(&mut w, f);
                    }
                }
            }
            ControlMsg::EndpointReport(c) => {
                w.u8(T_ENDPOINTS);
                put_candidates(&mut w, c);
            }
            ControlMsg::CallMeMaybe { peer, endpoints } => {
                w.u8(T_CALL_ME_MAYBE);
                w.key(peer);
                put_candidates(&mut w, endpoints);
            }
            ControlMsg::Ack(v) => {
                w.u8(T_ACK);
                v.encode(&mut w);
            }
        }
        w.into_bytes()
    }

    /// Decodes one message; the whole slice must be the message.
    pub fn decode(buf: &[u8]) -> Result<ControlMsg> {
        let mut r = Reader::new(buf);
        let msg = match r.u8()? {
            T_SNAPSHOT => {
                let version = Version::decode(&mut r)?;
                let me = SelfInfo {
                    name: r.str8()?,
                    tags: get_strs(&mut r, "tags", MAX_TAGS)?,
                    ipv4: Ipv4Addr::from(r.arr::<4>()?),
                    ipv6: Ipv6Addr::from(r.arr::<16>()?),
                };
                let filter = get_filter(&mut r)?;
                let n = r.count32("peers", MAX_PEERS, MIN_PEER)?;
                let peers = (0..n)
                    .map(|_| get_peer(&mut r).map(Arc::new))
                    .collect::<Result<Vec<_>>>()?;
                ControlMsg::Snapshot(Snapshot {
                    version,
                    me,
                    filter,
                    peers,
                })
            }
            T_DELTA => {
                let version = Version::decode(&mut r)?;
                let change = match r.u8()? {
                    C_UPSERT => PeerChange::Upsert(Arc::new(get_peer(&mut r)?)),
                    C_REMOVE => PeerChange::Remove(r.key()?),
                    C_FILTER => PeerChange::Filter(get_filter(&mut r)?),
                    code => {
                        return Err(DecodeError::BadValue {
                            what: "peer change",
                            value: code,
                        })
                    }
                };
                ControlMsg::Delta(Delta {
                    version,
                    change: Arc::new(change),
                })
            }
            T_ENDPOINTS => ControlMsg::EndpointReport(get_candidates(&mut r)?),
            T_CALL_ME_MAYBE => ControlMsg::CallMeMaybe {
                peer: r.key()?,
                endpoints: get_candidates(&mut r)?,
            },
            T_ACK => ControlMsg::Ack(Version::decode(&mut r)?),
            t => return Err(DecodeError::UnknownTag(t)),
        };
        r.finish()?;
        Ok(msg)
    }

    /// Encodes as one frame (length prefix + message).
    pub fn encode_frame(&self) -> Result<Vec<u8>> {
        codec::frame(&self.encode(), MAX_CONTROL_FRAME).map_err(|o| o.as_decode("control frame"))
    }
}

/// Splits one frame off the front of `buf`: `Ok(None)` if more bytes are
/// needed, else the payload and how many bytes it consumed.
pub fn decode_control_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>> {
    codec::split_frame(buf, MAX_CONTROL_FRAME).map_err(|o| o.as_decode("control frame"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::laws::{candidate, key};
    use proptest::prelude::*;

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(candidate(), 0..4)
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,20}|.{0,10}"
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
        fn codec_laws(m in msg(), cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(),
                      bit in 0u8..8, extra in prop::collection::vec(any::<u8>(), 1..8)) {
            crate::codec::laws::check(&m, &m.encode(), ControlMsg::decode, cut, (at, bit), &extra)?;
        }

        #[test]
        fn roundtrip(m in msg()) {
            let enc = m.encode();
            prop_assert_eq!(ControlMsg::decode(&enc), Ok(m.clone()));
            let frame = m.encode_frame().map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(frame.len(), enc.len() + 4);
            prop_assert_eq!(decode_control_frame(&frame), Ok(Some((&enc[..], frame.len()))));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = ControlMsg::decode(&bytes);
            let _ = decode_control_frame(&bytes);
        }
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
