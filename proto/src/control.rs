//! The control-session codec between a node and the coordinator. Pure.
//!
//! Built on [`crate::codec`] (a frame is a 4-byte big-endian length and that
//! many bytes; a message is a tag byte and its fields; keys 32 raw bytes;
//! addresses a family byte (4 or 6), the address bytes and a u16 port), in
//! its own widths: strings a u8 length plus UTF-8, lists a u32 count. Frames
//! here may be larger than relay frames ([`MAX_CONTROL_FRAME`], 16 MiB)
//! because a snapshot lists every visible peer (~120 bytes each: 10,000 peers
//! ≈ 1.2 MB). Decoding checks every count against a limit and against the
//! bytes left, rejects unknown tags and trailing bytes, and never panics.
//!
//! Messages: coordinator → node [`ControlMsg::Snapshot`], [`ControlMsg::Delta`],
//! [`ControlMsg::CallMeMaybe`] (forwarded, `peer` = the sender); node →
//! coordinator [`ControlMsg::EndpointReport`], [`ControlMsg::CallMeMaybe`]
//! (`peer` = the target), [`ControlMsg::Ack`] (the version it holds; also the
//! resync request after a gap or a reconnect).
//!
//! The message codec is the [`Wire`] implementation; `tunnel_relay::wire`'s
//! `read_control` / `write_control` move one frame over any tokio stream; the
//! reader takes a size limit, so the relay accepts only small frames from nodes.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use crate::acl::{FilterRules, InboundRule, PortRange, Proto};
use crate::codec::{DecodeError, Format, FrameLimit, Reader, Width, Wire, Writer};
use crate::key::PublicKey;
use crate::peermap::{
    get_candidates, put_candidates, Candidate, Delta, Peer, PeerChange, PeerMapUpdate, SelfInfo,
    Snapshot, Version, MAX_TAGS,
};

/// Largest control frame payload.
pub const MAX_CONTROL_FRAME: usize = 16 << 20;
/// Control frames.
pub const CONTROL_FRAME: FrameLimit = FrameLimit {
    max: MAX_CONTROL_FRAME,
    what: "control frame",
};
/// Most peers in a snapshot.
pub const MAX_PEERS: usize = 1 << 20;
/// Most filter rules.
pub const MAX_RULES: usize = 4096;
/// Most ports ranges in one rule.
pub const MAX_PORT_RANGES: usize = 1024;
/// Longest string field (names and tags are labels of at most 63).
pub const MAX_STR: usize = 255;
/// u8 string lengths (at most [`MAX_STR`]: every string is a label or a
/// tag), u32 counts (a snapshot may list more than 65535 peers).
const FORMAT: Format = Format {
    count: Width::U32,
    len: Width::U8,
};

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
    /// Node → coordinator, only to a relay that announced peer codec 2 or later
    /// (`MeshAccepted.peer_codec`): the peers it has a WireGuard session with now and
    /// whether each runs direct or through the relay. The whole list, each time it changes.
    PathReport(Vec<PeerPath>),
}

/// One peer in a [`ControlMsg::PathReport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerPath {
    /// The peer.
    pub peer: PublicKey,
    /// Straight to it over UDP (else through the relay).
    pub direct: bool,
}

/// Most peers in one path report (a node talking to more reports these).
pub const MAX_PATHS: usize = 4096;

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
/// A snapshot whose peers carry their home relay (peer codec 1).
const T_SNAPSHOT_HOMES: u8 = 6;
/// A node's paths (peer codec 2).
const T_PATHS: u8 = 7;

/// The newest peer-map codec this build reads and writes. A node names the
/// newest it reads in its `MeshJoin` (`weft_proto::relay::Message::MeshJoin`'s
/// `peer_codec`); the relay writes that session's frames with
/// [`ControlMsg::encode_frame_at`] at the lower of the two. Decoding reads
/// every codec (each has its own tags), so only the writer must know.
/// - 0: the first.
/// - 1: a peer entry ends with its home relay (an optional string): snapshots
///   under tag 6, upserts under change tag 4.
/// - 2: the relay takes [`ControlMsg::PathReport`] (tag 7) from the node; frames to the
///   node are codec 1's. The relay names the codec it writes in `MeshAccepted`
///   (from 2 on), so a node never sends a report to a relay that would reset it.
pub const PEER_CODEC: u8 = 2;

/// A node's name, tags and overlay addresses (a peer's or the receiver's own).
fn put_identity(w: &mut Writer, name: &str, tags: &[String], v4: Ipv4Addr, v6: Ipv6Addr) {
    w.str(name);
    w.strs(tags, MAX_TAGS);
    w.bytes(&v4.octets());
    w.bytes(&v6.octets());
}

fn get_self(r: &mut Reader<'_>) -> Result<SelfInfo> {
    Ok(SelfInfo {
        name: r.str()?,
        tags: r.strs("tags", MAX_TAGS)?,
        ipv4: Ipv4Addr::from(r.arr::<4>()?),
        ipv6: Ipv6Addr::from(r.arr::<16>()?),
    })
}

/// A peer entry; from codec 1 on with its home relay.
fn put_peer(w: &mut Writer, p: &Peer, codec: u8) {
    w.key(&p.key);
    put_identity(w, &p.name, &p.tags, p.ipv4, p.ipv6);
    put_candidates(w, &p.endpoints);
    w.flag(p.online);
    if codec >= 1 {
        w.option(p.home.as_ref(), |w, h| w.str(h));
    }
}

fn get_peer(r: &mut Reader<'_>, codec: u8) -> Result<Peer> {
    let key = r.key()?;
    let me = get_self(r)?;
    Ok(Peer {
        key,
        name: me.name,
        tags: me.tags,
        ipv4: me.ipv4,
        ipv6: me.ipv6,
        endpoints: get_candidates(r)?,
        online: r.flag()?,
        home: if codec >= 1 {
            r.option(Reader::str)?
        } else {
            None
        },
    })
}

fn put_filter(w: &mut Writer, f: &FilterRules) {
    w.list(&f.rules, MAX_RULES, |w, rule| {
        w.str(&rule.from);
        w.u8(rule.proto.code());
        w.list(&rule.ports, MAX_PORT_RANGES, |w, p| {
            w.u16(p.lo);
            w.u16(p.hi);
        });
    });
}

fn get_filter(r: &mut Reader<'_>) -> Result<FilterRules> {
    let rules = r.list("filter rules", MAX_RULES, 6, |r| {
        let from = r.str()?;
        let value = r.u8()?;
        let proto = Proto::from_code(value).ok_or(DecodeError::BadValue {
            what: "protocol",
            value,
        })?;
        let ports = r.list("port ranges", MAX_PORT_RANGES, 4, |r| {
            Ok(PortRange {
                lo: r.u16()?,
                hi: r.u16()?,
            })
        })?;
        Ok(InboundRule { from, proto, ports })
    })?;
    Ok(FilterRules { rules })
}

const C_UPSERT: u8 = 1;
const C_REMOVE: u8 = 2;
const C_FILTER: u8 = 3;
/// An upsert whose peer carries its home relay (peer codec 1).
const C_UPSERT_HOME: u8 = 4;

fn put_change(w: &mut Writer, c: &PeerChange, codec: u8) {
    match c {
        PeerChange::Upsert(p) => {
            w.u8(if codec >= 1 { C_UPSERT_HOME } else { C_UPSERT });
            put_peer(w, p, codec);
        }
        PeerChange::Remove(k) => {
            w.u8(C_REMOVE);
            w.key(k);
        }
        PeerChange::Filter(f) => {
            w.u8(C_FILTER);
            put_filter(w, f);
        }
    }
}

fn get_change(r: &mut Reader<'_>) -> Result<PeerChange> {
    Ok(match r.u8()? {
        C_UPSERT => PeerChange::Upsert(Arc::new(get_peer(r, 0)?)),
        C_UPSERT_HOME => PeerChange::Upsert(Arc::new(get_peer(r, 1)?)),
        C_REMOVE => PeerChange::Remove(r.key()?),
        C_FILTER => PeerChange::Filter(get_filter(r)?),
        value => {
            return Err(DecodeError::BadValue {
                what: "peer change",
                value,
            })
        }
    })
}

/// Smallest encoded peer: key, name length, tag count, v4, v6, candidate count, online.
const MIN_PEER: usize = 32 + 1 + 4 + 4 + 16 + 4 + 1;

impl ControlMsg {
    /// Writes the message in peer codec `codec` (see [`PEER_CODEC`]; a
    /// codec newer than this build's writes this build's newest).
    pub fn put_at(&self, w: &mut Writer, codec: u8) {
        match self {
            ControlMsg::Snapshot(s) => {
                w.u8(if codec >= 1 {
                    T_SNAPSHOT_HOMES
                } else {
                    T_SNAPSHOT
                });
                s.version.encode(w);
                let me = &s.me;
                put_identity(w, &me.name, &me.tags, me.ipv4, me.ipv6);
                put_filter(w, &s.filter);
                w.list(&s.peers, MAX_PEERS, |w, p| put_peer(w, p, codec));
            }
            ControlMsg::Delta(d) => {
                w.u8(T_DELTA);
                d.version.encode(w);
                put_change(w, &d.change, codec);
            }
            ControlMsg::EndpointReport(c) => {
                w.u8(T_ENDPOINTS);
                put_candidates(w, c);
            }
            ControlMsg::CallMeMaybe { peer, endpoints } => {
                w.u8(T_CALL_ME_MAYBE);
                w.key(peer);
                put_candidates(w, endpoints);
            }
            ControlMsg::Ack(v) => {
                w.u8(T_ACK);
                v.encode(w);
            }
            ControlMsg::PathReport(paths) => {
                w.u8(T_PATHS);
                w.list(paths, MAX_PATHS, |w, p| {
                    w.key(&p.peer);
                    w.flag(p.direct);
                });
            }
        }
    }

    /// Encodes as one frame in peer codec `codec`.
    pub fn encode_frame_at(&self, codec: u8) -> Result<Vec<u8>> {
        let mut w = Writer::new(FORMAT);
        self.put_at(&mut w, codec);
        CONTROL_FRAME.frame(&w.into_bytes())
    }
}

fn get_snapshot(r: &mut Reader<'_>, codec: u8) -> Result<Snapshot> {
    // A peer of codec 1 is one byte longer (the home flag).
    let min = MIN_PEER + usize::from(codec >= 1);
    Ok(Snapshot {
        version: Version::decode(r)?,
        me: get_self(r)?,
        filter: get_filter(r)?,
        peers: r.list("peers", MAX_PEERS, min, |r| {
            get_peer(r, codec).map(Arc::new)
        })?,
    })
}

impl Wire for ControlMsg {
    /// This build's newest codec ([`PEER_CODEC`]).
    fn put(&self, w: &mut Writer) {
        self.put_at(w, PEER_CODEC);
    }

    fn get(r: &mut Reader<'_>) -> Result<ControlMsg> {
        Ok(match r.u8()? {
            T_SNAPSHOT => ControlMsg::Snapshot(get_snapshot(r, 0)?),
            T_SNAPSHOT_HOMES => ControlMsg::Snapshot(get_snapshot(r, 1)?),
            T_DELTA => ControlMsg::Delta(Delta {
                version: Version::decode(r)?,
                change: Arc::new(get_change(r)?),
            }),
            T_ENDPOINTS => ControlMsg::EndpointReport(get_candidates(r)?),
            T_CALL_ME_MAYBE => ControlMsg::CallMeMaybe {
                peer: r.key()?,
                endpoints: get_candidates(r)?,
            },
            T_ACK => ControlMsg::Ack(Version::decode(r)?),
            T_PATHS => ControlMsg::PathReport(r.list("paths", MAX_PATHS, 33, |r| {
                Ok(PeerPath {
                    peer: r.key()?,
                    direct: r.flag()?,
                })
            })?),
            t => return Err(DecodeError::UnknownTag(t)),
        })
    }

    const FORMAT: Format = FORMAT;
    const FRAME: FrameLimit = CONTROL_FRAME;
}

impl ControlMsg {
    /// Encodes as one frame (length prefix + message) in this build's newest codec.
    pub fn encode_frame(&self) -> Result<Vec<u8>> {
        CONTROL_FRAME.frame(&self.encode())
    }
}

/// Splits one [`CONTROL_FRAME`] off the front of `buf` ([`FrameLimit::split`]).
pub fn decode_control_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>> {
    CONTROL_FRAME.split(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::laws::{self, candidate, key, probes, version};
    use proptest::prelude::*;

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(candidate(), 0..4)
    }

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9-]{1,20}|.{0,10}"
    }

    fn self_info() -> impl Strategy<Value = SelfInfo> {
        (
            label(),
            prop::collection::vec(label(), 0..3),
            any::<[u8; 4]>(),
            any::<[u8; 16]>(),
        )
            .prop_map(|(name, tags, v4, v6)| SelfInfo {
                name,
                tags,
                ipv4: v4.into(),
                ipv6: v6.into(),
            })
    }

    fn peer() -> impl Strategy<Value = Peer> {
        (
            key(),
            self_info(),
            candidates(),
            any::<bool>(),
            prop::option::of(label()),
        )
            .prop_map(|(key, me, endpoints, online, home)| Peer {
                key,
                name: me.name,
                tags: me.tags,
                ipv4: me.ipv4,
                ipv6: me.ipv6,
                endpoints,
                online,
                home,
            })
    }

    /// `m` as a node of peer codec 0 reads it: no homes.
    fn without_homes(m: &ControlMsg) -> ControlMsg {
        let strip = |p: &Arc<Peer>| {
            Arc::new(Peer {
                home: None,
                ..(**p).clone()
            })
        };
        match m {
            ControlMsg::Snapshot(s) => ControlMsg::Snapshot(Snapshot {
                peers: s.peers.iter().map(strip).collect(),
                ..s.clone()
            }),
            ControlMsg::Delta(d) => match &*d.change {
                PeerChange::Upsert(p) => ControlMsg::Delta(Delta {
                    version: d.version,
                    change: Arc::new(PeerChange::Upsert(strip(p))),
                }),
                _ => m.clone(),
            },
            _ => m.clone(),
        }
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

    fn change() -> impl Strategy<Value = PeerChange> {
        prop_oneof![
            peer().prop_map(|p| PeerChange::Upsert(Arc::new(p))),
            key().prop_map(PeerChange::Remove),
            filter().prop_map(PeerChange::Filter),
        ]
    }

    fn msg() -> impl Strategy<Value = ControlMsg> {
        prop_oneof![
            (
                version(),
                self_info(),
                filter(),
                prop::collection::vec(peer().prop_map(Arc::new), 0..4)
            )
                .prop_map(|(version, me, filter, peers)| {
                    ControlMsg::Snapshot(Snapshot {
                        version,
                        me,
                        filter,
                        peers,
                    })
                }),
            (version(), change()).prop_map(|(version, c)| ControlMsg::Delta(Delta {
                version,
                change: Arc::new(c)
            })),
            candidates().prop_map(ControlMsg::EndpointReport),
            (key(), candidates())
                .prop_map(|(peer, endpoints)| ControlMsg::CallMeMaybe { peer, endpoints }),
            version().prop_map(ControlMsg::Ack),
            prop::collection::vec(
                (key(), any::<bool>()).prop_map(|(peer, direct)| PeerPath { peer, direct }),
                0..5
            )
            .prop_map(ControlMsg::PathReport),
        ]
    }

    proptest! {
        #[test]
        fn codec_laws(m in msg(), p in probes()) {
            laws::check(&m, &p)?;
            let enc = m.encode();
            prop_assert_eq!(m.encode_frame().map(|f| f[4..] == enc[..]), Ok(true));
            prop_assert_eq!(m.encode_frame_at(PEER_CODEC), m.encode_frame());
        }

        /// Codec 0 is what nodes before the home field read: the same
        /// message less the homes, under the original tags.
        #[test]
        fn codec_0_is_the_original_form(m in msg().prop_filter("sent to relays of codec 2 only", |m| !matches!(m, ControlMsg::PathReport(_)))) {
            let f = m.encode_frame_at(0).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let back = ControlMsg::decode(&f[4..]).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(&back, &without_homes(&m));
            prop_assert!(matches!(f[4], T_SNAPSHOT | T_DELTA | T_ENDPOINTS | T_CALL_ME_MAYBE | T_ACK));
            if let ControlMsg::Delta(d) = &m {
                if let PeerChange::Upsert(_) = &*d.change {
                    prop_assert_eq!(f[4 + 1 + 16], C_UPSERT);
                }
            }
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
        laws::check_frame_limit(CONTROL_FRAME);
    }
}
