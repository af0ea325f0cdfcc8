//! A simulated network for the path state machine: two nodes, each on its
//! own NAT (or none, or both behind one), a relay that carries call-me-maybe,
//! a virtual clock. Mirrors the NAT lab grid of issue 5: direct wherever hole
//! punching can work, relay otherwise. Deterministic, runs in milliseconds.
//!
//! NAT models (what Linux nftables gives the lab):
//! - `Easy` (`masquerade`): endpoint-independent mapping that keeps the
//!   source port; filtering by conntrack, i.e. an inbound packet passes only
//!   if the inside host sent to exactly that remote address and port.
//! - `Hard` (`masquerade random`): a fresh public port per destination;
//!   same conntrack filtering.
//!
//! No hairpinning: a packet from inside to the NAT's own public address is lost.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::{Action, Path, PathConfig, PeerPath};
use crate::disco::TxId;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NatKind {
    Public,
    Easy,
    Hard,
}

#[derive(Debug)]
struct Nat {
    kind: NatKind,
    public: IpAddr,
    /// (inside addr, remote if per-destination) → public port.
    map: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// public port → inside addr.
    back: HashMap<u16, SocketAddr>,
    /// (public port, remote) pairs that may come in.
    conntrack: HashSet<(u16, SocketAddr)>,
    next_port: u16,
}

impl Nat {
    fn new(kind: NatKind, public: IpAddr) -> Nat {
        Nat {
            kind,
            public,
            map: HashMap::new(),
            back: HashMap::new(),
            conntrack: HashSet::new(),
            next_port: 30_000,
        }
    }

    fn out(&mut self, inside: SocketAddr, dst: SocketAddr) -> SocketAddr {
        if self.kind == NatKind::Public {
            return inside;
        }
        let k = (inside, (self.kind == NatKind::Hard).then_some(dst));
        let port = match self.map.get(&k) {
            Some(p) => *p,
            None => {
                let p = if self.kind == NatKind::Easy {
                    inside.port()
                } else {
                    self.next_port += 7;
                    self.next_port
                };
                self.map.insert(k, p);
                self.back.insert(p, inside);
                p
            }
        };
        self.conntrack.insert((port, dst));
        SocketAddr::new(self.public, port)
    }

    fn inbound(&self, src: SocketAddr, dst_port: u16) -> Option<SocketAddr> {
        if !self.conntrack.contains(&(dst_port, src)) {
            return None;
        }
        self.back.get(&dst_port).copied()
    }
}

#[derive(Debug, Clone, Copy)]
enum Msg {
    Ping(TxId),
    Pong(TxId),
}

struct Node {
    lan: SocketAddr,
    nat: usize,
    path: PeerPath,
}

struct Net {
    nats: Vec<Nat>,
    nodes: [Node; 2],
    /// (deliver at, from (as seen by the receiver), to node, message)
    wire: Vec<(Instant, SocketAddr, usize, Msg)>,
    relay: Vec<(Instant, usize)>,
    latency: Duration,
}

impl Net {
    /// Where `dst` leads: the node it reaches and the source address it sees.
    fn send(&mut self, now: Instant, from: usize, dst: SocketAddr, m: Msg) {
        let me = &self.nodes[from];
        let (lan, my_nat) = (me.lan, me.nat);
        // Same LAN (same NAT, or both public on one network): straight there.
        for (i, n) in self.nodes.iter().enumerate() {
            if i != from && n.lan == dst && n.nat == my_nat {
                self.wire.push((now + self.latency / 10, lan, i, m));
                return;
            }
        }
        if self.nats[my_nat].kind != NatKind::Public && dst.ip() == self.nats[my_nat].public {
            return; // no hairpinning
        }
        let src = self.nats[my_nat].out(lan, dst);
        for (i, n) in self.nodes.iter().enumerate() {
            let nat = &self.nats[n.nat];
            if i == from || nat.public != dst.ip() {
                continue;
            }
            let inside = if nat.kind == NatKind::Public {
                (n.lan == dst).then_some(dst)
            } else {
                nat.inbound(src, dst.port())
            };
            if inside == Some(n.lan) {
                self.wire.push((now + self.latency, src, i, m));
            }
        }
    }

    fn candidates(&mut self, i: usize) -> Vec<SocketAddr> {
        // Local address, and the reflexive one a STUN server saw.
        let stun = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 3478);
        let lan = self.nodes[i].lan;
        let nat = self.nodes[i].nat;
        let refl = self.nats[nat].out(lan, stun);
        if refl == lan {
            vec![lan]
        } else {
            vec![lan, refl]
        }
    }

    fn act(&mut self, now: Instant, i: usize, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::SendPing { to, tx } => self.send(now, i, to, Msg::Ping(tx)),
                Action::SendCallMeMaybe => self.relay.push((now + self.latency * 2, 1 - i)),
                Action::PathChanged { .. } => {}
            }
        }
    }

    fn run(&mut self, t0: Instant, for_: Duration) {
        let c0 = self.candidates(0);
        let c1 = self.candidates(1);
        self.nodes[0].path.on_candidates(t0, &c1);
        self.nodes[1].path.on_candidates(t0, &c0);
        let mut now = t0;
        while now < t0 + for_ {
            // Deliveries due.
            let due: Vec<_> = {
                let (d, rest): (Vec<_>, Vec<_>) = self.wire.drain(..).partition(|w| w.0 <= now);
                self.wire = rest;
                d
            };
            for (_, from, to, m) in due {
                match m {
                    Msg::Ping(tx) => {
                        self.nodes[to].path.on_ping_received(now, from);
                        self.send(now, to, from, Msg::Pong(tx));
                    }
                    Msg::Pong(tx) => self.nodes[to].path.on_pong(now, from, tx),
                }
            }
            let (cmm, rest): (Vec<_>, Vec<_>) = self.relay.drain(..).partition(|r| r.0 <= now);
            self.relay = rest;
            for (_, to) in cmm {
                let c = self.candidates(1 - to);
                self.nodes[to].path.on_call_me_maybe(now, &c);
            }
            for i in 0..2 {
                let acts = self.nodes[i].path.tick(now);
                self.act(now, i, acts);
            }
            now += Duration::from_millis(5);
        }
    }
}

/// Builds the two-node network: `a` and `b` NAT kinds; `shared` puts both
/// behind one NAT of kind `a`.
fn net(a: NatKind, b: NatKind, shared: bool) -> Net {
    let ip = |x: u8| IpAddr::V4(Ipv4Addr::new(203, 0, 113, x));
    let nats = vec![Nat::new(a, ip(1)), Nat::new(b, ip(2))];
    let lan = |kind: NatKind, i: u8, pub_ip: IpAddr| {
        if kind == NatKind::Public {
            SocketAddr::new(pub_ip, 41641)
        } else {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10 + i)), 41641)
        }
    };
    let n1_nat = if shared { 0 } else { 1 };
    let n1_kind = if shared { a } else { b };
    let n1_pub = if shared { ip(1) } else { ip(2) };
    Net {
        nats,
        nodes: [
            Node {
                lan: lan(a, 0, ip(1)),
                nat: 0,
                path: PeerPath::new(PathConfig::default(), [0; 4]),
            },
            Node {
                lan: lan(n1_kind, 1, n1_pub),
                nat: n1_nat,
                path: PeerPath::new(PathConfig::default(), [1; 4]),
            },
        ],
        wire: Vec::new(),
        relay: Vec::new(),
        latency: Duration::from_millis(20),
    }
}

fn is_direct(p: Path) -> bool {
    matches!(p, Path::Direct(_))
}

#[test]
fn nat_grid_direct_where_punching_works_relay_otherwise() {
    use NatKind::*;
    let cells = [
        (Public, Public, true),
        (Public, Easy, true),
        (Easy, Public, true),
        (Public, Hard, true),
        (Hard, Public, true),
        (Easy, Easy, true),
        (Easy, Hard, false),
        (Hard, Easy, false),
        (Hard, Hard, false),
    ];
    for (a, b, want_direct) in cells {
        let mut n = net(a, b, false);
        let t0 = Instant::now();
        n.run(t0, Duration::from_secs(2));
        let (pa, pb) = (n.nodes[0].path.current(), n.nodes[1].path.current());
        assert_eq!(
            (is_direct(pa), is_direct(pb)),
            (want_direct, want_direct),
            "{a:?} vs {b:?}: {pa:?} / {pb:?}"
        );
    }
}

#[test]
fn behind_the_same_nat_the_lan_path_is_used() {
    for kind in [NatKind::Easy, NatKind::Hard] {
        let mut n = net(kind, kind, true);
        n.run(Instant::now(), Duration::from_secs(2));
        assert_eq!(
            n.nodes[0].path.current(),
            Path::Direct(n.nodes[1].lan),
            "{kind:?}"
        );
        assert_eq!(
            n.nodes[1].path.current(),
            Path::Direct(n.nodes[0].lan),
            "{kind:?}"
        );
    }
}

#[test]
fn easy_easy_goes_direct_within_a_few_round_trips() {
    // 40 ms RTT: the first probe of one side is lost at the other's NAT; the
    // other side's ping (prompted at the same time) opens it, and the ping
    // back crosses. Both are direct after about 1.5 RTT.
    let mut n = net(NatKind::Easy, NatKind::Easy, false);
    let t0 = Instant::now();
    n.run(t0, Duration::from_millis(100));
    assert!(is_direct(n.nodes[0].path.current()) && is_direct(n.nodes[1].path.current()));
}
