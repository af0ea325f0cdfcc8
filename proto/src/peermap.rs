//! The peer map: what the coordinator tells each node about the peers it may
//! talk to, and how a node applies it. Pure.
//!
//! A node first receives a [`Snapshot`] (its own identity, its inbound
//! filter, every visible [`Peer`]), then [`Delta`]s, each one [`PeerChange`]
//! at the next [`Version`]. [`PeerMap::apply`] takes them only in order; a gap
//! means "ask again with my version" (the coordinator answers with the missing
//! deltas or a fresh snapshot). The coordinator that produces them lives in
//! `tunnel-relay` (`coord`), the codec in [`crate::control`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::acl::FilterRules;
use crate::codec::{DecodeError, Reader, Writer};
use crate::key::PublicKey;

/// Most endpoint candidates kept per node.
pub const MAX_CANDIDATES: usize = 16;
/// Most tags per node.
pub const MAX_TAGS: usize = 32;

/// How a candidate address was learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CandidateKind {
    /// An address of one of the node's interfaces (LAN).
    Local,
    /// The address a STUN server saw (the NAT's public mapping).
    Reflexive,
}

/// One address a peer may reach the node's WireGuard socket at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Candidate {
    /// Address and port.
    pub addr: SocketAddr,
    /// Where it came from.
    pub kind: CandidateKind,
}

/// A peer-map version: the coordinator's epoch and the recipient's sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Version {
    /// Coordinator life (changes on restart).
    pub epoch: u64,
    /// Deltas delivered to this recipient in this epoch.
    pub seq: u64,
}

/// A peer as another node sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// Its key (WireGuard peer key, disco key).
    pub key: PublicKey,
    /// Its name (MagicDNS).
    pub name: String,
    /// Its tags (the receiving node's filter matches on them).
    pub tags: Vec<String>,
    /// Overlay IPv4 (AllowedIPs /32).
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 (AllowedIPs /128).
    pub ipv6: Ipv6Addr,
    /// Where to probe it directly.
    pub endpoints: Vec<Candidate>,
    /// Whether it holds a control session now.
    pub online: bool,
    /// The relay of the fleet that holds (or last held) its control
    /// session: its home relay, by the relay's `name`. `None` from a
    /// coordinator that predates the field (peer codec 0, see
    /// [`crate::control::PEER_CODEC`]).
    pub home: Option<String>,
}

/// The receiving node's own identity, as assigned by the coordinator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfInfo {
    /// Its name.
    pub name: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Overlay IPv4.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6.
    pub ipv6: Ipv6Addr,
}

/// A full peer map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The version this snapshot is at; deltas continue from `seq + 1`.
    pub version: Version,
    /// The recipient itself.
    pub me: SelfInfo,
    /// What the recipient enforces on receive.
    pub filter: FilterRules,
    /// Every peer it may talk to (in no particular order). Entries are
    /// shared with the coordinator's cache: a snapshot costs a pointer per peer.
    pub peers: Vec<Arc<Peer>>,
}

/// One change to a node's peer map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerChange {
    /// Add or replace this peer.
    Upsert(Arc<Peer>),
    /// Forget this peer.
    Remove(PublicKey),
    /// Replace the inbound filter.
    Filter(FilterRules),
}

/// One change at one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// The version after applying it (`seq` = previous + 1).
    pub version: Version,
    /// The change (shared between recipients).
    pub change: Arc<PeerChange>,
}

/// What the coordinator sends a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMapUpdate {
    /// Replace everything.
    Snapshot(Snapshot),
    /// Apply one change.
    Delta(Delta),
}

/// Why a node could not apply an update.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ApplyError {
    /// A delta arrived out of order (or from another epoch): resync from
    /// the version the map holds.
    #[error("delta {got:?} does not follow {have:?}; resync needed")]
    Gap {
        /// The map's version.
        have: Option<Version>,
        /// The delta's version.
        got: Version,
    },
}

/// The node side of a peer map: applies snapshots and deltas in order.
/// Pure; the mesh node turns its contents into WireGuard peers, the filter
/// and MagicDNS records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerMap {
    /// Version held (`None` before the first snapshot).
    pub version: Option<Version>,
    /// The node itself.
    pub me: Option<SelfInfo>,
    /// Its inbound filter.
    pub filter: FilterRules,
    /// Peers by key.
    pub peers: BTreeMap<PublicKey, Arc<Peer>>,
}

impl PeerMap {
    /// Applies one update. A snapshot always applies; a delta only if its
    /// `seq` is exactly one past the held version in the same epoch.
    pub fn apply(&mut self, u: &PeerMapUpdate) -> Result<(), ApplyError> {
        match u {
            PeerMapUpdate::Snapshot(s) => {
                self.version = Some(s.version);
                self.me = Some(s.me.clone());
                self.filter = s.filter.clone();
                self.peers = s.peers.iter().map(|p| (p.key, p.clone())).collect();
            }
            PeerMapUpdate::Delta(d) => {
                let ok = self
                    .version
                    .is_some_and(|v| v.epoch == d.version.epoch && v.seq + 1 == d.version.seq);
                if !ok {
                    return Err(ApplyError::Gap {
                        have: self.version,
                        got: d.version,
                    });
                }
                self.version = Some(d.version);
                match &*d.change {
                    PeerChange::Upsert(p) => {
                        self.peers.insert(p.key, p.clone());
                    }
                    PeerChange::Remove(k) => {
                        self.peers.remove(k);
                    }
                    PeerChange::Filter(f) => self.filter = f.clone(),
                }
            }
        }
        Ok(())
    }
}

impl Version {
    /// Wire form: epoch and seq, u64 each.
    pub fn encode(&self, w: &mut Writer) {
        w.u64(self.epoch);
        w.u64(self.seq);
    }
    /// Reads [`Version::encode`]'s form.
    pub fn decode(r: &mut Reader<'_>) -> Result<Version, DecodeError> {
        Ok(Version {
            epoch: r.u64()?,
            seq: r.u64()?,
        })
    }
}

impl CandidateKind {
    /// The wire code.
    pub fn code(self) -> u8 {
        match self {
            CandidateKind::Local => 1,
            CandidateKind::Reflexive => 2,
        }
    }
    /// The kind for a wire code.
    pub fn from_code(value: u8) -> Result<CandidateKind, DecodeError> {
        match value {
            1 => Ok(CandidateKind::Local),
            2 => Ok(CandidateKind::Reflexive),
            value => Err(DecodeError::BadValue {
                what: "candidate kind",
                value,
            }),
        }
    }
}

/// Smallest encoded candidate: kind, family, IPv4 octets, port.
const MIN_CANDIDATE: usize = 1 + 1 + 4 + 2;

/// A candidate list on the wire, at most [`MAX_CANDIDATES`] (the same in
/// every codec): each candidate a kind byte, then the socket address.
pub(crate) fn put_candidates(w: &mut Writer, c: &[Candidate]) {
    w.list(c, MAX_CANDIDATES, |w, c| {
        w.u8(c.kind.code());
        w.addr(c.addr);
    });
}

/// Reads [`put_candidates`]'s form.
pub(crate) fn get_candidates(r: &mut Reader<'_>) -> Result<Vec<Candidate>, DecodeError> {
    r.list("candidates", MAX_CANDIDATES, MIN_CANDIDATE, |r| {
        let kind = CandidateKind::from_code(r.u8()?)?;
        Ok(Candidate {
            addr: r.addr()?,
            kind,
        })
    })
}

/// The overlay's address plan, as the relay announces it when a node joins
/// (`MeshAccepted.ipv4_pool` / `ipv6_prefix`): every node routes both
/// prefixes into the mesh and answers MagicDNS on [`OverlayPools::dns_v4`].
/// The coordinator allocates from the same plan and never hands out the
/// reserved addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OverlayPools {
    /// The IPv4 pool (default `100.64.0.0/10`).
    pub v4: ipnet::Ipv4Net,
    /// The IPv6 ULA prefix (default `fd7a:7765:6674::/48`).
    pub v6: ipnet::Ipv6Net,
}

impl OverlayPools {
    /// The plan for these prefixes (host bits cleared).
    pub fn new(v4: ipnet::Ipv4Net, v6: ipnet::Ipv6Net) -> OverlayPools {
        OverlayPools {
            v4: v4.trunc(),
            v6: v6.trunc(),
        }
    }

    /// The MagicDNS resolver's IPv4 address: the pool's first host.
    pub fn dns_v4(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.v4.network()).wrapping_add(1))
    }

    /// The MagicDNS resolver's IPv6 address: the twin of [`OverlayPools::dns_v4`].
    pub fn dns_v6(&self) -> Ipv6Addr {
        self.v6_for(self.dns_v4())
    }

    /// The IPv6 twin of an IPv4 overlay address: the prefix with the IPv4
    /// address in its last 32 bits.
    pub fn v6_for(&self, v4: Ipv4Addr) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.v6.network()) | u128::from(u32::from(v4)))
    }

    /// Network, broadcast and the MagicDNS address: never given to a node.
    pub fn is_reserved(&self, a: Ipv4Addr) -> bool {
        a == self.v4.network() || a == self.v4.broadcast() || a == self.dns_v4()
    }

    /// Whether `ip` lies in either prefix.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match ip {
            std::net::IpAddr::V4(a) => self.v4.contains(&a),
            std::net::IpAddr::V6(a) => self.v6.contains(&a),
        }
    }
}

impl Default for OverlayPools {
    fn default() -> OverlayPools {
        OverlayPools::new(
            ipnet::Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default(),
            ipnet::Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x7765, 0x6674, 0, 0, 0, 0, 0), 48)
                .unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn dns_is_the_first_host_of_any_pool() {
        let d = OverlayPools::default();
        assert_eq!(d.dns_v4(), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(d.dns_v6().to_string(), "fd7a:7765:6674::6440:1");
        let p = OverlayPools::new(
            "10.200.7.9/16".parse().unwrap_or_default(),
            "fd00:abcd:1::/48".parse().unwrap_or_default(),
        );
        assert_eq!(p.v4.to_string(), "10.200.0.0/16");
        assert_eq!(p.dns_v4(), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(p.dns_v6().to_string(), "fd00:abcd:1::ac8:1");
        assert!(p.is_reserved(Ipv4Addr::new(10, 200, 255, 255)));
        assert!(!p.is_reserved(Ipv4Addr::new(10, 200, 0, 2)));
        assert!(p.contains(
            "10.200.3.4"
                .parse()
                .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        ));
        assert!(!p.contains(
            "100.64.0.1"
                .parse()
                .unwrap_or(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        ));
    }
}
