//! The managed node's control state machine: one place that reacts to the
//! coordinator's peer map, disco packets (from the UDP socket or through the
//! relay), STUN responses and time, and says what the shell must do.
//!
//! ```text
//!  peer map ─┐                       ┌─▶ Device(SetRequest)   peers / AllowedIPs
//!  disco ────┤                       ├─▶ Path{peer, Relay|Direct(addr)}
//!  STUN ─────┼─▶ Controller (pure) ──┼─▶ Udp{to, bytes}       disco pings/pongs, STUN
//!  tick(now) ┤                       ├─▶ Relay{to, bytes}     call-me-maybe via the relay
//!  counters ─┤                       ├─▶ ReportEndpoints      local + reflexive candidates
//!  local IPs ┤                       ├─▶ Overlay(Arc)         filter + MagicDNS input
//!  ping ─────┘                       │
//!                                    └─▶ PingReply / PingExpired   `mesh ping` results
//! ```
//!
//! Per peer it keeps a [`PeerPath`] (relay first, direct when a disco ping
//! is answered, back to the relay when the direct path goes quiet) and the
//! disco [`SharedKey`] derived from both node keys. Call-me-maybe travels
//! as a sealed disco message inside a relay datagram (the relay forwards
//! node-to-node datagrams only between nodes its policy lets talk), so both
//! sides probe at the same moment and open their NATs for each other.
//!
//! `mesh ping` ([`Controller::ping`]) sends one disco ping on the peer's
//! current path: to the direct address, or through the relay. A ping that
//! arrives through the relay is answered with a pong through the relay (it
//! proves the peer is alive, never a direct path); a relay pong completes
//! only a pending `mesh ping` and records the relay RTT for `mesh status`.
//!
//! The shell samples the device's [`Counters`] ([`Controller::on_counters`])
//! and the host's addresses ([`Controller::set_local_addrs`]); the decisions
//! are here: bytes sent start a direct path's liveness clock, bytes received
//! from a direct source are hearing the peer there (so a direct path whose
//! receive counter stops falls back to the relay after
//! [`PathConfig::direct_timeout`], and one whose counter moves again is
//! pinged and taken back), and changed addresses are reported once and
//! re-learn the reflexive address at once (the host may have moved).
//!
//! Pure and time-injected: the shell owns sockets, the device, the clock.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::peermap::{Candidate, CandidateKind, PeerMap};
use weft_proto::stun::StunProbe;

use crate::device::relay_index;
use crate::disco::{self, Message, SharedKey, TxId};
use crate::key::{PrivateKey, PublicKey};
use crate::managed::overlay::Overlay;
use crate::path::{Action, Path, PathConfig, PeerPath};
use crate::uapi::codec::SetRequest;

/// STUN refresh while we have no reflexive address yet.
pub(crate) const STUN_RETRY: Duration = Duration::from_secs(1);
/// STUN refresh once we have one (NAT mappings change rarely; a change is
/// also noticed by peers' pongs).
pub(crate) const STUN_REFRESH: Duration = Duration::from_secs(20);

/// Where a disco packet came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Via {
    /// The WireGuard UDP socket, from this address.
    Udp(SocketAddr),
    /// The relay, from this node.
    Relay(PublicKey),
}

/// What the shell must do.
#[derive(Debug, Clone)]
pub(crate) enum Out {
    /// Send from the WireGuard UDP socket.
    Udp {
        /// Destination.
        to: SocketAddr,
        /// Datagram.
        bytes: Vec<u8>,
    },
    /// Send through the relay to a peer.
    Relay {
        /// Destination node.
        to: PublicKey,
        /// Datagram.
        bytes: Vec<u8>,
    },
    /// Apply to the WireGuard device.
    Device(SetRequest),
    /// Point a peer's WireGuard endpoint (`Relay`: the relay path).
    Path {
        /// The peer.
        peer: PublicKey,
        /// Where its packets go now.
        path: Path,
    },
    /// Our candidates changed: report them to the coordinator.
    ReportEndpoints(Vec<Candidate>),
    /// The overlay changed (addresses, peers, filter, names).
    Overlay(Arc<Overlay>),
    /// A `mesh ping` was answered.
    PingReply(PingReply),
    /// A `mesh ping` got no answer within its timeout (or was pushed out by
    /// newer ones, see [`MAX_USER_PINGS`]).
    PingExpired {
        /// The id passed to [`Controller::ping`].
        id: u64,
    },
}

/// Most `mesh ping`s outstanding at once (the oldest expires first).
pub(crate) const MAX_USER_PINGS: usize = 64;

/// The source address a pong through the relay carries (the relay path has
/// no UDP source to report).
pub(crate) const RELAY_PONG_SRC: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// The answer to one `mesh ping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PingReply {
    /// The id passed to [`Controller::ping`].
    pub id: u64,
    /// The peer that answered.
    pub peer: PublicKey,
    /// The path the pong came back on (`Direct(its source address)`).
    pub via: Path,
    /// From sending the ping to receiving the pong.
    pub rtt: Duration,
}

/// Why [`Controller::ping`] sent nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PingError {
    /// The key is not in the peer map (unknown, or not visible under the ACL).
    #[error("peer {0} is not in this node's peer map")]
    UnknownPeer(String),
}

/// What `mesh status` shows of one peer's control state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PeerState {
    /// Where its packets go now.
    pub path: Path,
    /// Last disco RTT on the current direct path.
    pub direct_rtt: Option<Duration>,
    /// Last RTT of a `mesh ping` through the relay.
    pub relay_rtt: Option<Duration>,
}

/// One peer's WireGuard counters, as the device reports them when the shell
/// samples it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counters {
    /// The peer.
    pub peer: PublicKey,
    /// Bytes sent to it so far.
    pub tx_bytes: u64,
    /// Bytes received from it so far.
    pub rx_bytes: u64,
    /// Source of its last authenticated packet (a relay endpoint when it
    /// came through the relay).
    pub last_source: Option<SocketAddr>,
}

struct PeerCtl {
    path: PeerPath,
    key: SharedKey,
    relay_rtt: Option<Duration>,
}

/// A `mesh ping` waiting for its pong.
#[derive(Debug, Clone, Copy)]
struct UserPing {
    id: u64,
    peer: PublicKey,
    tx: TxId,
    sent: Instant,
    deadline: Instant,
}

/// The controller.
pub(crate) struct Controller {
    me: PrivateKey,
    public: PublicKey,
    cfg: PathConfig,
    overlay: Option<Arc<Overlay>>,
    peers: HashMap<PublicKey, PeerCtl>,
    device_peers: Vec<PublicKey>,
    stun: StunProbe,
    stun_server: Option<SocketAddr>,
    next_stun: Option<Instant>,
    local: Vec<SocketAddr>,
    reflexive: Option<SocketAddr>,
    reported: Option<Vec<Candidate>>,
    user_pings: Vec<UserPing>,
    /// `(tx_bytes, rx_bytes)` per peer at the last [`Controller::on_counters`].
    counters: HashMap<PublicKey, (u64, u64)>,
    rng: u64,
}

fn seed(rng: &mut u64) -> [u8; 4] {
    // xorshift: transaction ids need uniqueness per peer, not secrecy
    // (pongs are authenticated by the disco key).
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    (*rng as u32).to_le_bytes()
}

impl Controller {
    /// A controller for the node with key `me`; `rng_seed` seeds transaction
    /// ids (pass random bytes; tests pass constants).
    pub(crate) fn new(me: PrivateKey, cfg: PathConfig, rng_seed: u64) -> Controller {
        let public = me.public_key();
        Controller {
            me,
            public,
            cfg,
            overlay: None,
            peers: HashMap::new(),
            device_peers: Vec::new(),
            stun: StunProbe::new(),
            stun_server: None,
            next_stun: None,
            local: Vec::new(),
            reflexive: None,
            reported: None,
            user_pings: Vec::new(),
            counters: HashMap::new(),
            rng: rng_seed | 1,
        }
    }

    /// The overlay as of the last peer map.
    pub(crate) fn overlay(&self) -> Option<&Arc<Overlay>> {
        self.overlay.as_ref()
    }

    /// A peer's current path.
    #[cfg(test)]
    pub(crate) fn path(&self, peer: &PublicKey) -> Option<Path> {
        self.peers.get(peer).map(|p| p.path.current())
    }

    /// A peer's last measured direct RTT.
    #[cfg(test)]
    pub(crate) fn rtt(&self, peer: &PublicKey) -> Option<Duration> {
        self.peers.get(peer).and_then(|p| p.path.last_rtt())
    }

    /// A peer's control state for `mesh status`.
    pub(crate) fn peer_state(&self, peer: &PublicKey) -> Option<PeerState> {
        self.peers.get(peer).map(|p| PeerState {
            path: p.path.current(),
            direct_rtt: p.path.last_rtt(),
            relay_rtt: p.relay_rtt,
        })
    }

    /// `mesh ping`: sends one disco ping to `peer` on its current path (the
    /// direct address, or through the relay). The answer comes out of a
    /// later input as [`Out::PingReply`] with this `id`, or
    /// [`Out::PingExpired`] from [`Controller::tick`] after `timeout`.
    pub(crate) fn ping(
        &mut self,
        now: Instant,
        peer: &PublicKey,
        id: u64,
        timeout: Duration,
    ) -> Result<Vec<Out>, PingError> {
        let mut out = Vec::new();
        let Some(p) = self.peers.get(peer) else {
            return Err(PingError::UnknownPeer(peer.short()));
        };
        let mut t = [0u8; 12];
        for c in t.chunks_mut(4) {
            c.copy_from_slice(&seed(&mut self.rng));
        }
        let tx = TxId(t);
        let bytes = ping(&p.key, &self.public, tx);
        out.push(match p.path.current() {
            Path::Direct(to) => Out::Udp { to, bytes },
            Path::Relay => Out::Relay { to: *peer, bytes },
        });
        if self.user_pings.len() == MAX_USER_PINGS {
            let old = self.user_pings.remove(0);
            out.push(Out::PingExpired { id: old.id });
        }
        self.user_pings.push(UserPing {
            id,
            peer: *peer,
            tx,
            sent: now,
            deadline: now + timeout,
        });
        Ok(out)
    }

    /// Completes the `mesh ping` of `peer` with transaction `tx`, if any.
    fn user_pong(
        &mut self,
        now: Instant,
        peer: &PublicKey,
        tx: TxId,
        via: Path,
    ) -> Option<PingReply> {
        let i = self
            .user_pings
            .iter()
            .position(|u| u.tx == tx && u.peer == *peer)?;
        let u = self.user_pings.remove(i);
        Some(PingReply {
            id: u.id,
            peer: u.peer,
            via,
            rtt: now.saturating_duration_since(u.sent),
        })
    }

    /// Our candidates: interface addresses, then the reflexive one.
    pub(crate) fn candidates(&self) -> Vec<Candidate> {
        let mut c: Vec<Candidate> = self
            .local
            .iter()
            .map(|a| Candidate {
                addr: *a,
                kind: CandidateKind::Local,
            })
            .collect();
        if let Some(r) = self.reflexive.filter(|r| !self.local.contains(r)) {
            c.push(Candidate {
                addr: r,
                kind: CandidateKind::Reflexive,
            });
        }
        c
    }

    fn report_if_changed(&mut self, out: &mut Vec<Out>) {
        let c = self.candidates();
        if self.reported.as_ref() != Some(&c) {
            self.reported = Some(c.clone());
            out.push(Out::ReportEndpoints(c));
        }
    }

    /// The WireGuard socket's addresses on local interfaces (LAN
    /// candidates), as the shell lists them (at start and every few
    /// seconds). When they changed, the new candidates are reported (once)
    /// and the reflexive address is learnt again at once: the host may have
    /// moved to another network.
    pub(crate) fn set_local_addrs(&mut self, now: Instant, addrs: Vec<SocketAddr>) -> Vec<Out> {
        let mut out = Vec::new();
        if addrs == self.local {
            return out;
        }
        if !self.local.is_empty() {
            tracing::info!(from = ?self.local, to = ?addrs, "local addresses changed");
        }
        self.local = addrs;
        self.report_if_changed(&mut out);
        self.next_stun = self.stun_server.map(|_| now);
        out
    }

    /// The relay's STUN address (where to learn our reflexive address).
    pub(crate) fn set_stun_server(&mut self, now: Instant, server: Option<SocketAddr>) {
        self.stun_server = server;
        self.next_stun = server.map(|_| now);
    }

    /// A new peer map (snapshot or after deltas).
    pub(crate) fn on_peer_map(&mut self, now: Instant, map: &PeerMap) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(overlay) = Overlay::from_map(map) else {
            return out;
        };
        let overlay = Arc::new(overlay);
        out.push(Out::Device(overlay.device_request(&self.device_peers)));
        self.device_peers = overlay.peers.keys().copied().collect();
        self.peers.retain(|k, _| overlay.peers.contains_key(k));
        for k in overlay.peers.keys() {
            if !self.peers.contains_key(k) {
                let Ok(key) = SharedKey::derive(&self.me, k) else {
                    tracing::warn!(peer = %k.short(), "peer key gives no disco key; relay only");
                    continue;
                };
                let s = seed(&mut self.rng);
                self.peers.insert(
                    *k,
                    PeerCtl {
                        path: PeerPath::new(self.cfg, s),
                        key,
                        relay_rtt: None,
                    },
                );
                out.push(Out::Path {
                    peer: *k,
                    path: Path::Relay,
                });
            }
            if let Some(p) = self.peers.get_mut(k) {
                p.path.on_candidates(now, &overlay.candidates(k));
            }
        }
        out.push(Out::Overlay(overlay.clone()));
        self.overlay = Some(overlay);
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.drive(now, &k, &mut out);
        }
        out
    }

    /// The device's counters, sampled by the shell (every 200 ms). Against
    /// the previous sample: bytes sent to a peer start its direct path's
    /// liveness clock ([`Controller::on_tx`]); bytes received from a direct
    /// source (not the relay) are hearing the peer there
    /// ([`Controller::on_rx_direct`]: keeps the path alive, or gets that
    /// address pinged when it is not the current path).
    pub(crate) fn on_counters(&mut self, now: Instant, sample: &[Counters]) -> Vec<Out> {
        let mut out = Vec::new();
        let mut seen = HashMap::with_capacity(sample.len());
        for c in sample {
            let (tx, rx) = (c.tx_bytes, c.rx_bytes);
            let (prev_tx, prev_rx) = self.counters.get(&c.peer).copied().unwrap_or((tx, rx));
            seen.insert(c.peer, (tx, rx));
            if tx > prev_tx {
                self.on_tx(now, &c.peer);
            }
            // Where the peer's packets really come from: a direct source
            // other than the current path (the peer moved) gets pinged and
            // can take over.
            if let Some(src) = c.last_source.filter(|e| relay_index(e).is_none()) {
                if rx > prev_rx {
                    out.extend(self.on_rx_direct(now, &c.peer, src));
                }
            }
        }
        self.counters = seen;
        out
    }

    /// Traffic for `peer` left through the tunnel (starts the direct path's
    /// liveness clock).
    fn on_tx(&mut self, now: Instant, peer: &PublicKey) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.path.on_tx(now);
        }
    }

    /// Authenticated WireGuard traffic from `peer` arrived directly from `from`.
    fn on_rx_direct(&mut self, now: Instant, peer: &PublicKey, from: SocketAddr) -> Vec<Out> {
        let mut out = Vec::new();
        if let Some(p) = self.peers.get_mut(peer) {
            p.path.on_rx_direct(now, from);
            self.drive(now, peer, &mut out);
        }
        out
    }

    /// A datagram classified as disco.
    pub(crate) fn on_disco(&mut self, now: Instant, via: Via, packet: &[u8]) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(sender) = disco::sender(packet) else {
            return out;
        };
        if let Via::Relay(k) = via {
            if k != sender {
                return out; // the relay vouches for the sender's key
            }
        }
        let Some(p) = self.peers.get_mut(&sender) else {
            return out;
        };
        let Ok(msg) = p.key.open(packet) else {
            return out;
        };
        match (msg, via) {
            (Message::Ping { tx, .. }, Via::Udp(from)) => {
                let pong = p
                    .key
                    .seal_random(&self.public, &Message::Pong { tx, src: from });
                out.push(Out::Udp {
                    to: from,
                    bytes: pong,
                });
                p.path.on_ping_received(now, from);
            }
            (Message::Ping { tx, .. }, Via::Relay(k)) => {
                // A `mesh ping` through the relay: answer the same way. It
                // proves nothing about a direct path, so the path state
                // does not move.
                let pong = p.key.seal_random(
                    &self.public,
                    &Message::Pong {
                        tx,
                        src: RELAY_PONG_SRC,
                    },
                );
                out.push(Out::Relay { to: k, bytes: pong });
            }
            (Message::Pong { tx, src }, Via::Udp(from)) => {
                p.path.on_pong(now, from, tx);
                // The pong also tells us how the peer sees us (a reflexive
                // address for NATs that map per destination is not useful
                // to others, so it is not reported).
                let _ = src;
                if let Some(r) = self.user_pong(now, &sender, tx, Path::Direct(from)) {
                    if let Some(p) = self.peers.get_mut(&sender) {
                        // Authenticated and from that address: as good as
                        // WireGuard traffic for the path's liveness.
                        p.path.on_rx_direct(now, from);
                    }
                    out.push(Out::PingReply(r));
                }
            }
            (Message::Pong { tx, .. }, Via::Relay(_)) => {
                if let Some(r) = self.user_pong(now, &sender, tx, Path::Relay) {
                    if let Some(p) = self.peers.get_mut(&sender) {
                        p.relay_rtt = Some(r.rtt);
                    }
                    out.push(Out::PingReply(r));
                }
            }
            (Message::CallMeMaybe { endpoints }, _) => {
                p.path.on_call_me_maybe(now, &endpoints);
            }
        }
        self.drive(now, &sender, &mut out);
        out
    }

    /// A datagram classified as STUN (from the relay's STUN server).
    pub(crate) fn on_stun(&mut self, now: Instant, packet: &[u8]) -> Vec<Out> {
        let mut out = Vec::new();
        if let Ok(r) = self.stun.on_response(now, packet) {
            self.reflexive = Some(r.addr);
            self.next_stun = Some(now + STUN_REFRESH);
            self.report_if_changed(&mut out);
        }
        out
    }

    /// Timers: paths, STUN refresh.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        if let (Some(server), Some(at)) = (self.stun_server, self.next_stun) {
            if now >= at {
                let mut tx = [0u8; 12];
                for c in tx.chunks_mut(4) {
                    c.copy_from_slice(&seed(&mut self.rng));
                }
                let bytes = self.stun.request(now, tx);
                out.push(Out::Udp { to: server, bytes });
                let wait = if self.reflexive.is_some() {
                    STUN_REFRESH
                } else {
                    STUN_RETRY
                };
                self.next_stun = Some(now + wait);
            }
        }
        let keys: Vec<PublicKey> = self.peers.keys().copied().collect();
        for k in keys {
            self.drive(now, &k, &mut out);
        }
        // `mesh ping`s past their deadline, or whose peer left the map.
        let peers = &self.peers;
        self.user_pings.retain(|u| {
            let keep = now < u.deadline && peers.contains_key(&u.peer);
            if !keep {
                out.push(Out::PingExpired { id: u.id });
            }
            keep
        });
        out
    }

    /// When [`Controller::tick`] must run next.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.path.poll_timeout())
            .chain(self.next_stun)
            .chain(self.user_pings.iter().map(|u| u.deadline))
            .min()
    }

    fn drive(&mut self, now: Instant, peer: &PublicKey, out: &mut Vec<Out>) {
        let cands: Vec<std::net::SocketAddr> = self.candidates().iter().map(|c| c.addr).collect();
        let Some(p) = self.peers.get_mut(peer) else {
            return;
        };
        for a in p.path.tick(now) {
            match a {
                Action::SendPing { to, tx } => out.push(Out::Udp {
                    to,
                    bytes: ping(&p.key, &self.public, tx),
                }),
                Action::SendCallMeMaybe => out.push(Out::Relay {
                    to: *peer,
                    bytes: p.key.seal_random(
                        &self.public,
                        &Message::CallMeMaybe {
                            endpoints: cands.clone(),
                        },
                    ),
                }),
                Action::PathChanged { from, to } => {
                    tracing::info!(peer = %peer.short(), ?from, ?to, "path changed");
                    out.push(Out::Path {
                        peer: *peer,
                        path: to,
                    });
                }
            }
        }
    }
}

fn ping(key: &SharedKey, me: &PublicKey, tx: TxId) -> Vec<u8> {
    key.seal_random(me, &Message::Ping { tx, node_key: *me })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Two controllers over a simulated network: the relay always delivers,
    //! the direct path can be cut. Checks the path life cycle end to end.
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use weft_proto::acl::AclPolicy;
    use weft_proto::peermap::{PeerMapUpdate, SelfInfo, Snapshot, Version};

    struct Side {
        ctl: Controller,
        key: PublicKey,
        addr: SocketAddr,
        paths: HashMap<PublicKey, Path>,
        reported: Vec<Candidate>,
        replies: Vec<PingReply>,
    }

    fn map_for(_me: &Side, other: &Side, n: u8, m: u8, tags: &str) -> PeerMap {
        let peer = Arc::new(weft_proto::peermap::Peer {
            key: other.key,
            name: format!("n{m}"),
            tags: vec!["engineer".into()],
            ipv4: Ipv4Addr::new(100, 64, 0, m),
            ipv6: Ipv6Addr::new(0xfd7a, 0x7765, 0x6674, 0, 0, 0, 0x6440, u16::from(m)),
            endpoints: other.reported.clone(),
            online: true,
            home: None,
        });
        let snap = Snapshot {
            version: Version { epoch: 1, seq: 0 },
            me: SelfInfo {
                name: format!("n{n}"),
                tags: vec![tags.into()],
                ipv4: Ipv4Addr::new(100, 64, 0, n),
                ipv6: Ipv6Addr::new(0xfd7a, 0x7765, 0x6674, 0, 0, 0, 0x6440, u16::from(n)),
            },
            filter: AclPolicy::default().inbound_filter(&[tags.into()]),
            peers: vec![peer],
        };
        let mut map = PeerMap::default();
        map.apply(&PeerMapUpdate::Snapshot(snap)).unwrap();
        map
    }

    fn side(n: u8) -> Side {
        let k = PrivateKey::generate();
        let key = k.public_key();
        Side {
            ctl: Controller::new(k, PathConfig::default(), u64::from(n) * 7919),
            key,
            addr: SocketAddr::from(([198, 51, 100, n], 41641)),
            paths: HashMap::new(),
            reported: Vec::new(),
            replies: Vec::new(),
        }
    }

    /// Delivers `outs` from `from` (to `to` when the network allows),
    /// recursively, recording path changes.
    fn run(a: &mut Side, b: &mut Side, now: Instant, outs: Vec<Out>, a_sends: bool, direct: bool) {
        // In order, as the shell applies them.
        let mut queue: std::collections::VecDeque<(bool, Out)> =
            outs.into_iter().map(|o| (a_sends, o)).collect();
        while let Some((from_a, o)) = queue.pop_front() {
            let (src, dst) = if from_a {
                (&mut *a, &mut *b)
            } else {
                (&mut *b, &mut *a)
            };
            let more = match o {
                Out::Udp { to, bytes } if to == dst.addr && direct => {
                    dst.ctl.on_disco(now, Via::Udp(src.addr), &bytes)
                }
                Out::Udp { .. } => Vec::new(),
                Out::Relay { to, bytes } if to == dst.key => {
                    dst.ctl.on_disco(now, Via::Relay(src.key), &bytes)
                }
                Out::Path { peer, path } => {
                    src.paths.insert(peer, path);
                    Vec::new()
                }
                Out::ReportEndpoints(c) => {
                    src.reported = c;
                    Vec::new()
                }
                Out::PingReply(r) => {
                    src.replies.push(r);
                    Vec::new()
                }
                _ => Vec::new(),
            };
            queue.extend(more.into_iter().map(|o| (!from_a, o)));
        }
    }

    /// Runs both sides' timers at `now` and delivers what they send.
    fn tick_both(a: &mut Side, b: &mut Side, now: Instant, direct: bool) {
        let oa = a.ctl.tick(now);
        run(a, b, now, oa, true, direct);
        let ob = b.ctl.tick(now);
        run(a, b, now, ob, false, direct);
    }

    #[test]
    fn relay_first_then_direct_then_back_to_relay_when_cut() {
        // Probes answered within the same instant: direct both ways.
        let (mut a, mut b, mut now) = pair(true);
        assert_eq!(a.paths.get(&b.key), Some(&Path::Direct(b.addr)));
        assert_eq!(b.paths.get(&a.key), Some(&Path::Direct(a.addr)));
        assert_eq!(a.ctl.path(&b.key), Some(Path::Direct(b.addr)));
        assert!(a.ctl.rtt(&b.key).is_some());

        // The direct path is cut while traffic flows: back on the relay within 3 s (+ a tick).
        let cut = now;
        let mut back = None;
        for _ in 0..60 {
            now += Duration::from_millis(100);
            a.ctl.on_tx(now, &b.key);
            tick_both(&mut a, &mut b, now, false);
            if back.is_none() && a.paths.get(&b.key) == Some(&Path::Relay) {
                back = Some(now - cut);
            }
        }
        let back = back.expect("never fell back to the relay");
        assert!(
            back <= Duration::from_millis(3200),
            "fell back after {back:?}"
        );

        // The path heals: the periodic re-probe (or call-me-maybe) brings direct back.
        let mut healed = false;
        for _ in 0..400 {
            now += Duration::from_millis(100);
            tick_both(&mut a, &mut b, now, true);
            if a.paths.get(&b.key) == Some(&Path::Direct(b.addr)) {
                healed = true;
                break;
            }
        }
        assert!(healed, "direct path never came back");
    }

    #[test]
    fn no_direct_path_stays_on_relay_and_peers_leave() {
        let (mut a, mut b, mut now) = pair(false);
        for _ in 0..80 {
            now += Duration::from_millis(100);
            let oa = a.ctl.tick(now);
            run(&mut a, &mut b, now, oa, true, false);
        }
        let ma = map_for(&a, &b, 1, 2, "engineer");
        assert_eq!(a.paths.get(&b.key), Some(&Path::Relay));
        // The peer leaves the map: the device drops it.
        let mut empty = ma.clone();
        empty.peers.clear();
        let o = a.ctl.on_peer_map(now, &empty);
        let req = o.iter().find_map(|o| match o {
            Out::Device(r) => Some(r.clone()),
            _ => None,
        });
        let req = req.unwrap();
        assert!(req.peers.iter().all(|p| p.remove));
        assert_eq!(a.ctl.path(&b.key), None);
    }

    /// The ReportEndpoints among `out`.
    fn reports(out: &[Out]) -> Vec<Vec<Candidate>> {
        out.iter()
            .filter_map(|o| match o {
                Out::ReportEndpoints(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// Points `a` at the STUN server `server` at `t`, answers its binding
    /// request as seeing `seen` 5 ms later, and returns what the answer produced.
    fn learn_reflexive(a: &mut Side, t: Instant, server: SocketAddr, seen: SocketAddr) -> Vec<Out> {
        a.ctl.set_stun_server(t, Some(server));
        let req = a
            .ctl
            .tick(t)
            .into_iter()
            .find_map(|o| match o {
                Out::Udp { to, bytes } if to == server => Some(bytes),
                _ => None,
            })
            .expect("a binding request");
        let resp = weft_proto::stun::answer(&req, seen).unwrap();
        a.ctl.on_stun(t + Duration::from_millis(5), &resp)
    }

    #[test]
    fn stun_learns_and_reports_the_reflexive_address() {
        let mut a = side(1);
        let t0 = Instant::now();
        let _ = a.ctl.set_local_addrs(t0, vec![a.addr]);
        let server: SocketAddr = "203.0.113.2:3478".parse().unwrap();
        let seen: SocketAddr = "203.0.113.77:60000".parse().unwrap();
        let out = learn_reflexive(&mut a, t0, server, seen);
        let rep = reports(&out).pop().expect("endpoints reported");
        assert_eq!(rep.len(), 2);
        assert_eq!(rep[1].addr, seen);
        assert_eq!(rep[1].kind, CandidateKind::Reflexive);
        // Next refresh is the slow one; a repeat answer reports nothing new.
        assert!(a.ctl.poll_timeout().unwrap() >= t0 + STUN_REFRESH);
    }

    #[test]
    fn a_local_address_change_is_announced_once_and_relearns_the_reflexive_address() {
        let mut a = side(1);
        let t0 = Instant::now();
        let server: SocketAddr = "203.0.113.2:3478".parse().unwrap();
        let stun_requests = |out: &[Out]| {
            out.iter()
                .filter(|o| matches!(o, Out::Udp { to, .. } if *to == server))
                .count()
        };
        assert_eq!(reports(&a.ctl.set_local_addrs(t0, vec![a.addr])).len(), 1);
        let seen: SocketAddr = "203.0.113.77:60000".parse().unwrap();
        assert_eq!(reports(&learn_reflexive(&mut a, t0, server, seen)).len(), 1);

        // The same addresses sampled again: nothing to say, no early STUN.
        let t1 = t0 + Duration::from_secs(2);
        assert!(a.ctl.set_local_addrs(t1, vec![a.addr]).is_empty());
        assert_eq!(stun_requests(&a.ctl.tick(t1)), 0);

        // The host moved: the new candidates are announced, exactly once...
        let moved: SocketAddr = "192.168.7.2:41641".parse().unwrap();
        let t2 = t0 + Duration::from_secs(4);
        let local = Candidate {
            addr: moved,
            kind: CandidateKind::Local,
        };
        let reflexive = Candidate {
            addr: seen,
            kind: CandidateKind::Reflexive,
        };
        let out = a.ctl.set_local_addrs(t2, vec![moved]);
        assert_eq!(reports(&out), vec![vec![local, reflexive]]);
        assert_eq!(a.ctl.candidates(), vec![local, reflexive]);
        // ...the reflexive address is asked for again at once...
        assert_eq!(stun_requests(&a.ctl.tick(t2)), 1);
        // ...and later samples of the same addresses announce nothing.
        for i in 1..=5 {
            let t = t2 + Duration::from_secs(2 * i);
            assert!(reports(&a.ctl.set_local_addrs(t, vec![moved])).is_empty());
            assert!(reports(&a.ctl.tick(t)).is_empty());
        }
    }

    /// One sample of a's counters for peer b, its packets coming from b's address.
    fn counters_of(b: &Side, tx_bytes: u64, rx_bytes: u64) -> [Counters; 1] {
        [Counters {
            peer: b.key,
            tx_bytes,
            rx_bytes,
            last_source: Some(b.addr),
        }]
    }

    #[test]
    fn a_peer_whose_rx_counter_stops_is_not_live_after_the_timeout_and_live_again_when_it_moves() {
        let (mut a, mut b, mut now) = pair(true);
        assert_eq!(a.ctl.path(&b.key), Some(Path::Direct(b.addr)));
        let step = Duration::from_millis(200);
        let timeout = PathConfig::default().direct_timeout;
        let (mut tx, mut rx) = (1000, 1000);
        // The first sample is the baseline: nothing moved yet.
        assert!(a.ctl.on_counters(now, &counters_of(&b, tx, rx)).is_empty());

        // a keeps sending, nothing comes back (the direct path is cut).
        let first_send = now + step;
        let mut dead = None;
        for _ in 0..30 {
            now += step;
            tx += 500;
            let oa = a.ctl.on_counters(now, &counters_of(&b, tx, rx));
            run(&mut a, &mut b, now, oa, true, false);
            tick_both(&mut a, &mut b, now, false);
            if a.paths.get(&b.key) == Some(&Path::Relay) {
                dead = Some(now - first_send);
                break;
            }
        }
        let dead = dead.expect("the direct path was never declared dead");
        assert!(
            dead >= timeout && dead < timeout + step,
            "fell back {dead:?} after the first unanswered send"
        );

        // The network is back, but until the receive counter moves nothing
        // is sent to b's address from the counters.
        now += Duration::from_millis(1200);
        tx += 500;
        assert!(a.ctl.on_counters(now, &counters_of(&b, tx, rx)).is_empty());
        assert_eq!(a.ctl.path(&b.key), Some(Path::Relay));
        // Bytes that came through the relay are not hearing b directly.
        rx += 500;
        let relayed = [Counters {
            last_source: Some(crate::device::relay_endpoint(0)),
            ..counters_of(&b, tx, rx)[0]
        }];
        assert!(a.ctl.on_counters(now, &relayed).is_empty());
        // b's packets arrive from its address: pinged, answered, direct again.
        now += step;
        rx += 500;
        let oa = a.ctl.on_counters(now, &counters_of(&b, tx, rx));
        assert!(
            oa.iter()
                .any(|o| matches!(o, Out::Udp { to, .. } if *to == b.addr)),
            "a ping to b's address: {oa:?}"
        );
        run(&mut a, &mut b, now, oa, true, true);
        assert_eq!(a.paths.get(&b.key), Some(&Path::Direct(b.addr)));
        assert_eq!(a.ctl.path(&b.key), Some(Path::Direct(b.addr)));
    }

    /// Two sides with peer maps applied and 2 s of timers run; `direct`
    /// says whether UDP works.
    fn pair(direct: bool) -> (Side, Side, Instant) {
        let mut a = side(1);
        let mut b = side(2);
        let t0 = Instant::now();
        let oa = a.ctl.set_local_addrs(t0, vec![a.addr]);
        run(&mut a, &mut b, t0, oa, true, direct);
        let ob = b.ctl.set_local_addrs(t0, vec![b.addr]);
        run(&mut a, &mut b, t0, ob, false, direct);
        assert_eq!(a.reported.len(), 1);

        // Peer maps arrive: both start on the relay at once.
        let ma = map_for(&a, &b, 1, 2, "engineer");
        let oa = a.ctl.on_peer_map(t0, &ma);
        assert!(oa
            .iter()
            .any(|o| matches!(o, Out::Device(r) if r.peers.len() == 1)));
        run(&mut a, &mut b, t0, oa, true, direct);
        let mb = map_for(&b, &a, 2, 1, "worker");
        let ob = b.ctl.on_peer_map(t0, &mb);
        run(&mut a, &mut b, t0, ob, false, direct);
        let mut now = t0;
        for _ in 0..20 {
            now += Duration::from_millis(100);
            tick_both(&mut a, &mut b, now, direct);
        }
        (a, b, now)
    }

    #[test]
    fn user_ping_on_the_relay_path_is_answered_through_the_relay() {
        let (mut a, mut b, now) = pair(false);
        assert_eq!(a.ctl.path(&b.key), Some(Path::Relay));
        let out = a.ctl.ping(now, &b.key, 7, Duration::from_secs(2)).unwrap();
        assert!(
            matches!(&out[..], [Out::Relay { to, .. }] if *to == b.key),
            "one ping through the relay: {out:?}"
        );
        // b answers through the relay; its path does not move.
        let (bk, ak) = (b.key, a.key);
        let Out::Relay { bytes, .. } = &out[0] else {
            unreachable!()
        };
        let answer = b.ctl.on_disco(now, Via::Relay(ak), bytes);
        let pong = answer
            .iter()
            .find_map(|o| match o {
                Out::Relay { to, bytes } if *to == ak => Some(bytes.clone()),
                _ => None,
            })
            .expect("a pong through the relay");
        assert_eq!(b.ctl.path(&ak), Some(Path::Relay));
        let later = now + Duration::from_millis(40);
        let got = a.ctl.on_disco(later, Via::Relay(bk), &pong);
        let reply = got
            .iter()
            .find_map(|o| match o {
                Out::PingReply(r) => Some(r.clone()),
                _ => None,
            })
            .expect("the ping completes");
        assert_eq!(reply.id, 7);
        assert_eq!(reply.peer, bk);
        assert_eq!(reply.via, Path::Relay);
        assert_eq!(reply.rtt, Duration::from_millis(40));
        let st = a.ctl.peer_state(&bk).unwrap();
        assert_eq!(st.path, Path::Relay);
        assert_eq!(st.relay_rtt, Some(Duration::from_millis(40)));
        assert_eq!(st.direct_rtt, None);
        // The same pong again completes nothing.
        let again = a.ctl.on_disco(later, Via::Relay(bk), &pong);
        assert!(!again.iter().any(|o| matches!(o, Out::PingReply(_))));
        // A relay pong never makes a path direct.
        assert_eq!(a.ctl.path(&bk), Some(Path::Relay));
    }

    #[test]
    fn user_ping_on_a_direct_path_says_which_address_answered() {
        let (mut a, mut b, now) = pair(true);
        assert_eq!(a.ctl.path(&b.key), Some(Path::Direct(b.addr)));
        let out = a.ctl.ping(now, &b.key, 1, Duration::from_secs(2)).unwrap();
        assert!(matches!(&out[..], [Out::Udp { to, .. }] if *to == b.addr));
        run(&mut a, &mut b, now, out, true, true);
        assert_eq!(a.replies.len(), 1);
        assert_eq!(a.replies[0].id, 1);
        assert_eq!(a.replies[0].via, Path::Direct(b.addr));
        assert!(a.ctl.peer_state(&b.key).unwrap().direct_rtt.is_some());
    }

    #[test]
    fn user_ping_expires_and_unknown_peers_are_refused() {
        let (mut a, b, now) = pair(false);
        let stranger = PrivateKey::generate().public_key();
        assert!(matches!(
            a.ctl.ping(now, &stranger, 1, Duration::from_secs(1)),
            Err(PingError::UnknownPeer(_))
        ));
        // The relay loses it: expired after the timeout, not before.
        let _lost = a.ctl.ping(now, &b.key, 9, Duration::from_secs(1)).unwrap();
        assert!(a.ctl.poll_timeout().unwrap() <= now + Duration::from_secs(1));
        let early = a.ctl.tick(now + Duration::from_millis(900));
        assert!(!early.iter().any(|o| matches!(o, Out::PingExpired { .. })));
        let late = a.ctl.tick(now + Duration::from_secs(1));
        assert!(late.iter().any(|o| matches!(o, Out::PingExpired { id: 9 })));
        // Bounded: the oldest gives way.
        let mut expired = Vec::new();
        for id in 0..(MAX_USER_PINGS as u64 + 2) {
            for o in a.ctl.ping(now, &b.key, id, Duration::from_secs(5)).unwrap() {
                if let Out::PingExpired { id } = o {
                    expired.push(id);
                }
            }
        }
        assert_eq!(expired, vec![0, 1]);
    }

    #[test]
    fn relay_ping_from_a_key_the_relay_does_not_vouch_for_is_ignored() {
        let (mut a, mut b, now) = pair(false);
        let out = a.ctl.ping(now, &b.key, 3, Duration::from_secs(2)).unwrap();
        let Out::Relay { bytes, .. } = &out[0] else {
            unreachable!()
        };
        let other = PrivateKey::generate().public_key();
        assert!(b.ctl.on_disco(now, Via::Relay(other), bytes).is_empty());
    }
}
