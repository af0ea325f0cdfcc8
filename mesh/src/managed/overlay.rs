//! Managed mode's pure glue: turns the coordinator's peer map (what
//! `weft_proto::peermap::PeerMap` holds after applying snapshots and deltas)
//! into what the node's parts consume:
//! - the WireGuard device's peer set ([`Overlay::device_request`]: one peer
//!   per visible node, AllowedIPs = its overlay /32 and /128, no endpoint:
//!   path selection sets it, starting on the relay);
//! - the inbound ACL for the packet filter ([`Overlay::allows_new`]: the
//!   sending peer is identified by the packet's inner source address, which
//!   cryptokey routing has already tied to that peer);
//! - the MagicDNS table ([`Overlay::dns_entries`]);
//! - direct-path candidates per peer ([`Overlay::candidates`]).
//!
//! No I/O, no clock.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use weft_proto::acl::FilterRules;
use weft_proto::peermap::{self as coord, PeerMap, SelfInfo};

use crate::filter::Proto;
use crate::key::PublicKey;
use crate::uapi::codec::{PeerChange, SetRequest};

/// The node's view of the overlay at one peer-map version.
#[derive(Debug, Clone)]
pub struct Overlay {
    /// The node itself.
    pub me: SelfInfo,
    /// Visible peers by key.
    pub peers: HashMap<PublicKey, Arc<coord::Peer>>,
    by_ip: HashMap<IpAddr, Arc<coord::Peer>>,
    filter: FilterRules,
}

impl Overlay {
    /// The overlay a peer map describes (`None` before the first snapshot).
    pub fn from_map(map: &PeerMap) -> Option<Overlay> {
        let me = map.me.clone()?;
        let mut peers = HashMap::new();
        let mut by_ip = HashMap::new();
        for p in map.peers.values() {
            peers.insert(p.key, p.clone());
            by_ip.insert(IpAddr::V4(p.ipv4), p.clone());
            by_ip.insert(IpAddr::V6(p.ipv6), p.clone());
        }
        Some(Overlay {
            me,
            peers,
            by_ip,
            filter: map.filter.clone(),
        })
    }

    /// The interface's own addresses (host routes; the shell routes the
    /// overlay pools to the interface).
    pub fn addresses(&self) -> Vec<IpNet> {
        vec![
            IpNet::from(IpAddr::V4(self.me.ipv4)),
            IpNet::from(IpAddr::V6(self.me.ipv6)),
        ]
    }

    /// A UAPI `set` that turns a device holding `current` peers into this
    /// overlay's peer set: removes the peers no longer visible, adds new
    /// ones and rewrites every visible peer's AllowedIPs. Endpoints and keys
    /// of existing peers are left alone (sessions survive a delta).
    pub fn device_request(&self, current: &[PublicKey]) -> SetRequest {
        let mut req = SetRequest::default();
        let want: BTreeSet<PublicKey> = self.peers.keys().copied().collect();
        for k in current.iter().filter(|k| !want.contains(k)) {
            let mut c = PeerChange::new(*k);
            c.remove = true;
            req.peers.push(c);
        }
        for k in &want {
            let p = &self.peers[k];
            let mut c = PeerChange::new(*k);
            c.replace_allowed_ips = true;
            c.allowed_ips = vec![
                IpNet::from(IpAddr::V4(p.ipv4)),
                IpNet::from(IpAddr::V6(p.ipv6)),
            ];
            req.peers.push(c);
        }
        req
    }

    /// Whether `other` has the same inbound rules and peer tags (what the
    /// filter's decisions depend on).
    pub fn same_rules(&self, other: &Overlay) -> bool {
        self.filter == other.filter
            && self.peers.len() == other.peers.len()
            && self
                .peers
                .iter()
                .all(|(k, p)| other.peers.get(k).is_some_and(|q| q.tags == p.tags))
    }

    /// The peer that owns overlay address `ip`.
    pub fn peer_by_ip(&self, ip: IpAddr) -> Option<&Arc<coord::Peer>> {
        self.by_ip.get(&ip)
    }

    /// Whether a *new* inbound flow from overlay address `src` of `proto`
    /// to our `dst_port` is allowed (replies are the conntrack's business).
    /// Unknown sources are refused. ICMP (ping) is allowed from a peer that
    /// may open anything on this node.
    pub fn allows_new(&self, src: IpAddr, proto: Proto, dst_port: u16) -> bool {
        let Some(peer) = self.by_ip.get(&src) else {
            return false;
        };
        let p = match proto {
            Proto::Tcp => weft_proto::acl::Proto::Tcp,
            Proto::Udp => weft_proto::acl::Proto::Udp,
            // Ping: from any peer that may open something here at all (an
            // engineer expects `ping gpu1` to answer when ssh would work).
            Proto::Icmp => {
                return self
                    .filter
                    .rules
                    .iter()
                    .any(|r| r.from == "*" || peer.tags.contains(&r.from))
            }
            // Other protocols only under an `any` rule without ports.
            Proto::Other(_) => {
                return self.filter.rules.iter().any(|r| {
                    r.proto == weft_proto::acl::Proto::Any
                        && r.ports.is_empty()
                        && (r.from == "*" || peer.tags.contains(&r.from))
                })
            }
        };
        self.filter.allows(&peer.tags, p, dst_port)
    }

    /// MagicDNS entries: every visible peer and the node itself.
    pub fn dns_entries(&self) -> Vec<(String, Vec<IpAddr>)> {
        let mut v: Vec<(String, Vec<IpAddr>)> = self
            .peers
            .values()
            .map(|p| (p.name.clone(), vec![IpAddr::V4(p.ipv4), IpAddr::V6(p.ipv6)]))
            .collect();
        v.push((
            self.me.name.clone(),
            vec![IpAddr::V4(self.me.ipv4), IpAddr::V6(self.me.ipv6)],
        ));
        v.sort();
        v
    }

    /// Where to probe `key` directly (its reported candidates, LAN first).
    pub fn candidates(&self, key: &PublicKey) -> Vec<SocketAddr> {
        let Some(p) = self.peers.get(key) else {
            return Vec::new();
        };
        let mut c = p.endpoints.clone();
        c.sort_by_key(|c| c.kind != coord::CandidateKind::Local);
        c.into_iter().map(|c| c.addr).collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use weft_proto::acl::AclPolicy;
    use weft_proto::peermap::{Candidate, CandidateKind, PeerMapUpdate, Snapshot, Version};

    fn tags(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    fn peer(n: u8, name: &str, t: &[&str]) -> Arc<coord::Peer> {
        Arc::new(coord::Peer {
            key: PublicKey::from_bytes([n; 32]),
            name: name.into(),
            tags: tags(t),
            ipv4: Ipv4Addr::new(100, 64, 0, n),
            ipv6: Ipv6Addr::new(0xfd7a, 0x7765, 0x6674, 0, 0, 0, 0x6440, u16::from(n)),
            endpoints: vec![
                Candidate {
                    addr: SocketAddr::from(([203, 0, 113, n], 41641)),
                    kind: CandidateKind::Reflexive,
                },
                Candidate {
                    addr: SocketAddr::from(([192, 168, 1, n], 41641)),
                    kind: CandidateKind::Local,
                },
            ],
            online: true,
            home: None,
        })
    }

    /// A worker's view under the default policy: one engineer peer.
    fn worker_view() -> (PeerMap, Arc<coord::Peer>) {
        let eng = peer(7, "alice", &["engineer"]);
        let filter = AclPolicy::default().inbound_filter(&tags(&["worker"]));
        let snap = Snapshot {
            version: Version { epoch: 1, seq: 0 },
            me: SelfInfo {
                name: "gpu1".into(),
                tags: tags(&["worker"]),
                ipv4: Ipv4Addr::new(100, 64, 0, 5),
                ipv6: "fd7a:7765:6674::6440:5".parse().unwrap(),
            },
            filter,
            peers: vec![eng.clone()],
        };
        let mut map = PeerMap::default();
        map.apply(&PeerMapUpdate::Snapshot(snap)).unwrap();
        (map, eng)
    }

    #[test]
    fn device_request_adds_visible_and_removes_gone_peers() {
        let (map, eng) = worker_view();
        let o = Overlay::from_map(&map).unwrap();
        let stale = PublicKey::from_bytes([9; 32]);
        let req = o.device_request(&[stale, eng.key]);
        assert!(!req.replace_peers);
        assert_eq!(req.peers.len(), 2);
        assert!(req.peers[0].remove && req.peers[0].public_key == stale);
        let add = &req.peers[1];
        assert_eq!(add.public_key, eng.key);
        assert!(add.replace_allowed_ips && !add.remove && add.endpoint.is_none());
        assert_eq!(
            add.allowed_ips,
            crate::parsed(&["100.64.0.7/32", "fd7a:7765:6674::6440:7/128"])
        );
        assert_eq!(
            o.addresses(),
            crate::parsed(&["100.64.0.5/32", "fd7a:7765:6674::6440:5/128"])
        );
    }

    #[test]
    fn acl_by_inner_source_address() {
        let (map, eng) = worker_view();
        let o = Overlay::from_map(&map).unwrap();
        let from_eng = IpAddr::V4(eng.ipv4);
        // Default policy: engineers may open tcp/22 and the agent API.
        assert!(o.allows_new(from_eng, Proto::Tcp, 22));
        assert!(o.allows_new(
            IpAddr::V6(eng.ipv6),
            Proto::Tcp,
            weft_proto::acl::AGENT_API_PORT
        ));
        assert!(!o.allows_new(from_eng, Proto::Tcp, 80));
        assert!(!o.allows_new(from_eng, Proto::Udp, 22));
        assert!(o.allows_new(from_eng, Proto::Icmp, 0));
        assert!(!o.allows_new(from_eng, Proto::Other(47), 0));
        // An address no peer owns.
        assert!(!o.allows_new("100.64.0.99".parse().unwrap(), Proto::Tcp, 22));
    }

    #[test]
    fn dns_and_candidates() {
        let (map, eng) = worker_view();
        let o = Overlay::from_map(&map).unwrap();
        let names: Vec<String> = o.dns_entries().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec!["alice".to_string(), "gpu1".to_string()]);
        let c = o.candidates(&eng.key);
        assert_eq!(
            c[0],
            SocketAddr::from(([192, 168, 1, 7], 41641)),
            "LAN first"
        );
        assert_eq!(c.len(), 2);
        assert!(o.candidates(&PublicKey::from_bytes([1; 32])).is_empty());
        assert!(Overlay::from_map(&PeerMap::default()).is_none());
    }
}
