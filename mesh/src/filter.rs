//! The inbound packet filter of a managed node, with connection tracking.
//!
//! The coordinator's ACL says who may *open* connections to this node
//! (`engineer` → `worker` on tcp/22, ...). Replies must still flow the other
//! way, so the node tracks the flows it opened: a packet leaving through the
//! tunnel ([`Conntrack::outbound`]) records its 5-tuple; a packet arriving
//! from a peer ([`Conntrack::inbound`]) passes if it belongs to a tracked
//! flow (a reply, or more of an inbound flow already admitted), else only if
//! the ACL allows a new flow of that protocol and destination port from that
//! peer (asked through a closure, so this module does not depend on the
//! policy's types). ICMP errors (unreachable, packet too big, time exceeded)
//! pass when the packet they quote belongs to a tracked flow, so path-MTU
//! discovery keeps working.
//!
//! Pure and time-injected: no clock, no locks. Bounded: at most `max` flows;
//! when full, expired flows are swept (at most once a second) and, failing
//! that, an arbitrary flow is evicted in O(1) (an evicted reply flow costs a
//! retransmission, never a crash, unbounded memory or a per-packet scan).

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Protocol numbers.
const TCP: u8 = 6;
const UDP: u8 = 17;
const ICMP: u8 = 1;
const ICMPV6: u8 = 58;

/// Idle timeouts per protocol.
pub(crate) const TCP_IDLE: Duration = Duration::from_secs(30 * 60);
/// UDP flows.
pub(crate) const UDP_IDLE: Duration = Duration::from_secs(120);
/// ICMP echo and other protocols.
pub(crate) const OTHER_IDLE: Duration = Duration::from_secs(30);
/// Default table size.
pub(crate) const DEFAULT_MAX_FLOWS: usize = 65_536;

/// The protocol class the ACL speaks of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP / ICMPv6.
    Icmp,
    /// Anything else (IP protocol number).
    Other(u8),
}

/// One direction of a flow, as seen in a packet: (proto, src, sport, dst, dport).
/// For ICMP echo, both ports are the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    /// IP protocol number.
    pub proto: u8,
    /// Source address.
    pub src: IpAddr,
    /// Source port (or ICMP echo id).
    pub sport: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port (or ICMP echo id).
    pub dport: u16,
}

impl FlowKey {
    fn reversed(self) -> FlowKey {
        FlowKey {
            proto: self.proto,
            src: self.dst,
            sport: self.dport,
            dst: self.src,
            dport: self.sport,
        }
    }
}

/// What one packet is, for the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A packet of a flow (TCP, UDP, ICMP echo, other protocols).
    Flow(FlowKey),
    /// An ICMP error quoting a packet of this flow (as the quoted packet
    /// travelled: from us, for errors about packets we sent).
    IcmpError(FlowKey),
}

/// The verdict on an inbound packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Part of a tracked flow (reply, or more of an admitted flow).
    Tracked,
    /// A new flow the ACL allows (now tracked).
    NewAllowed,
    /// Dropped: a new flow the ACL does not allow, or an unparseable packet.
    Dropped,
}

impl Verdict {
    /// Whether the packet passes.
    pub(crate) fn passes(self) -> bool {
        !matches!(self, Verdict::Dropped)
    }
}

fn ports(l4: &[u8]) -> Option<(u16, u16)> {
    let b = l4.get(..4)?;
    Some((
        u16::from_be_bytes([b[0], b[1]]),
        u16::from_be_bytes([b[2], b[3]]),
    ))
}

/// Splits an IP packet into (proto, src, dst, L4 bytes).
fn ip_parts(p: &[u8]) -> Option<(u8, IpAddr, IpAddr, &[u8])> {
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p.first()? & 0x0f) * 4;
            if ihl < 20 {
                return None;
            }
            // Fragments after the first carry no L4 header: treat as "other".
            let frag = u16::from_be_bytes([*p.get(6)?, *p.get(7)?]) & 0x1fff;
            let proto = if frag != 0 { 0 } else { *p.get(9)? };
            let src = IpAddr::from(<[u8; 4]>::try_from(p.get(12..16)?).ok()?);
            let dst = IpAddr::from(<[u8; 4]>::try_from(p.get(16..20)?).ok()?);
            Some((proto, src, dst, p.get(ihl..)?))
        }
        6 => {
            // Extension headers are not walked: their packets count as the
            // protocol in Next Header (rare on the overlay).
            let proto = *p.get(6)?;
            let src = IpAddr::from(<[u8; 16]>::try_from(p.get(8..24)?).ok()?);
            let dst = IpAddr::from(<[u8; 16]>::try_from(p.get(24..40)?).ok()?);
            Some((proto, src, dst, p.get(40..)?))
        }
        _ => None,
    }
}

/// Classifies an IP packet (`None`: not IP, or truncated).
pub(crate) fn parse(packet: &[u8]) -> Option<Parsed> {
    parse_depth(packet, 0)
}

fn parse_depth(packet: &[u8], depth: u8) -> Option<Parsed> {
    let (proto, src, dst, l4) = ip_parts(packet)?;
    let key = |sport, dport| FlowKey {
        proto,
        src,
        sport,
        dst,
        dport,
    };
    match proto {
        TCP | UDP => {
            let (s, d) = ports(l4)?;
            Some(Parsed::Flow(key(s, d)))
        }
        ICMP | ICMPV6 => {
            let ty = *l4.first()?;
            let is_error = if proto == ICMP {
                matches!(ty, 3 | 11 | 12)
            } else {
                matches!(ty, 1..=4)
            };
            if is_error {
                if depth > 0 {
                    return None;
                }
                // The quoted packet starts after the 8-byte ICMP header.
                match parse_depth(l4.get(8..)?, depth + 1)? {
                    Parsed::Flow(k) => Some(Parsed::IcmpError(k)),
                    Parsed::IcmpError(_) => None,
                }
            } else {
                // Echo request/reply and the rest: keyed by the identifier.
                let id = l4
                    .get(4..6)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .unwrap_or(0);
                Some(Parsed::Flow(key(id, id)))
            }
        }
        other => Some(Parsed::Flow(key(0, u16::from(other)))),
    }
}

fn proto_class(p: u8) -> Proto {
    match p {
        TCP => Proto::Tcp,
        UDP => Proto::Udp,
        ICMP | ICMPV6 => Proto::Icmp,
        o => Proto::Other(o),
    }
}

fn idle_for(proto: u8) -> Duration {
    match proto {
        TCP => TCP_IDLE,
        UDP => UDP_IDLE,
        _ => OTHER_IDLE,
    }
}

/// The flow table.
#[derive(Debug)]
pub(crate) struct Conntrack {
    /// Keyed by the flow as *we* sent it (outbound orientation for flows we
    /// opened; inbound orientation reversed for flows peers opened), so one
    /// lookup per packet answers both directions.
    flows: HashMap<FlowKey, Instant>,
    max: usize,
    last_sweep: Option<Instant>,
}

impl Default for Conntrack {
    fn default() -> Self {
        Conntrack::new(DEFAULT_MAX_FLOWS)
    }
}

impl Conntrack {
    /// A table of at most `max` flows.
    pub(crate) fn new(max: usize) -> Conntrack {
        Conntrack {
            flows: HashMap::new(),
            max: max.max(1),
            last_sweep: None,
        }
    }

    /// Flows tracked now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.flows.len()
    }

    /// Whether no flow is tracked.
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.flows.is_empty()
    }

    fn touch(&mut self, key: FlowKey, now: Instant) {
        let until = now + idle_for(key.proto);
        if let Some(e) = self.flows.get_mut(&key) {
            *e = until;
            return;
        }
        if self.flows.len() >= self.max
            && self
                .last_sweep
                .is_none_or(|l| now.saturating_duration_since(l) >= Duration::from_secs(1))
        {
            self.last_sweep = Some(now);
            self.expire(now);
        }
        if self.flows.len() >= self.max {
            if let Some(victim) = self.flows.keys().next().copied() {
                self.flows.remove(&victim);
            }
        }
        self.flows.insert(key, until);
    }

    fn live(&self, key: &FlowKey, now: Instant) -> bool {
        self.flows.get(key).is_some_and(|t| *t > now)
    }

    /// Records a packet leaving through the tunnel (always passes: the
    /// filter is on receive).
    pub(crate) fn outbound(&mut self, now: Instant, packet: &[u8]) {
        if let Some(Parsed::Flow(k)) = parse(packet) {
            self.touch(k, now);
        }
    }

    /// Decides on a packet that arrived from a peer. `allow_new(proto,
    /// dst_port)` is the ACL for a new flow from that peer.
    pub(crate) fn inbound(
        &mut self,
        now: Instant,
        packet: &[u8],
        allow_new: impl FnOnce(Proto, u16) -> bool,
    ) -> Verdict {
        match parse(packet) {
            None => Verdict::Dropped,
            Some(Parsed::IcmpError(quoted)) => {
                // The quoted packet is one we sent: its flow is ours.
                if self.live(&quoted, now) {
                    Verdict::Tracked
                } else {
                    Verdict::Dropped
                }
            }
            Some(Parsed::Flow(k)) => {
                let ours = k.reversed();
                if self.live(&ours, now) {
                    self.touch(ours, now);
                    return Verdict::Tracked;
                }
                let port = match k.proto {
                    TCP | UDP => k.dport,
                    _ => 0,
                };
                if allow_new(proto_class(k.proto), port) {
                    self.touch(ours, now);
                    Verdict::NewAllowed
                } else {
                    Verdict::Dropped
                }
            }
        }
    }

    /// Forgets expired flows.
    pub(crate) fn expire(&mut self, now: Instant) {
        self.flows.retain(|_, t| *t > now);
    }

    /// Forgets every flow (e.g. when the policy changes, so flows the new
    /// policy forbids do not live on as "tracked").
    pub(crate) fn clear(&mut self) {
        self.flows.clear();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ME: [u8; 4] = [100, 64, 0, 5];
    const PEER: [u8; 4] = [100, 64, 0, 9];

    /// An IPv4 or IPv6 packet (both addresses of one family) around `l4`.
    fn ip(proto: u8, src: impl Into<IpAddr>, dst: impl Into<IpAddr>, l4: &[u8]) -> Vec<u8> {
        let mut p = match (src.into(), dst.into()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut p = vec![0u8; 20];
                p[0] = 0x45;
                p[2..4].copy_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
                p[8] = 64;
                p[9] = proto;
                p[12..16].copy_from_slice(&s.octets());
                p[16..20].copy_from_slice(&d.octets());
                p
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut p = vec![0u8; 40];
                p[0] = 0x60;
                p[4..6].copy_from_slice(&(l4.len() as u16).to_be_bytes());
                p[6] = proto;
                p[7] = 64;
                p[8..24].copy_from_slice(&s.octets());
                p[24..40].copy_from_slice(&d.octets());
                p
            }
            _ => panic!("mixed address families"),
        };
        p.extend_from_slice(l4);
        p
    }

    fn v4(proto: u8, src: [u8; 4], dst: [u8; 4], l4: &[u8]) -> Vec<u8> {
        ip(proto, src, dst, l4)
    }

    /// A TCP (header 20 bytes) or UDP (8) datagram with these ports.
    fn ports(proto: u8, src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; if proto == TCP { 20 } else { 8 }];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        ip(proto, src, dst, &l4)
    }

    fn tcp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Vec<u8> {
        ports(TCP, src.into(), sport, dst.into(), dport)
    }

    fn udp(src: impl Into<IpAddr>, sport: u16, dst: impl Into<IpAddr>, dport: u16) -> Vec<u8> {
        ports(UDP, src.into(), sport, dst.into(), dport)
    }

    fn echo(src: [u8; 4], dst: [u8; 4], ty: u8, id: u16) -> Vec<u8> {
        let mut l4 = vec![ty, 0, 0, 0, 0, 0, 0, 1];
        l4[4..6].copy_from_slice(&id.to_be_bytes());
        v4(ICMP, src, dst, &l4)
    }

    /// Only ssh from the peer may open flows.
    fn ssh_only(p: Proto, port: u16) -> bool {
        p == Proto::Tcp && port == 22
    }

    /// The ACL decides what the peer may open; replies to what we opened pass.
    /// The same for both address families.
    fn acl_opens_flows_replies_pass(ct: &mut Conntrack, me: IpAddr, peer: IpAddr) {
        let t = Instant::now();
        // The peer opens tcp/22: allowed, then tracked.
        let syn = tcp(peer, 40000, me, 22);
        assert_eq!(ct.inbound(t, &syn, ssh_only), Verdict::NewAllowed, "{peer}");
        assert_eq!(
            ct.inbound(t, &syn, |_, _| false),
            Verdict::Tracked,
            "{peer}"
        );
        // The peer opens tcp/80 or udp/53: dropped.
        assert_eq!(
            ct.inbound(t, &tcp(peer, 40001, me, 80), ssh_only),
            Verdict::Dropped,
            "{peer}"
        );
        assert_eq!(
            ct.inbound(t, &udp(peer, 5000, me, 53), ssh_only),
            Verdict::Dropped,
            "{peer}"
        );
        // We open flows to the peer: its replies pass, even though the ACL
        // would not let the peer open anything.
        ct.outbound(t, &tcp(me, 9, peer, 443));
        assert!(
            ct.inbound(t, &tcp(peer, 443, me, 9), |_, _| false).passes(),
            "{peer}"
        );
        ct.outbound(t, &udp(me, 6000, peer, 53));
        assert_eq!(
            ct.inbound(t, &udp(peer, 53, me, 6000), |_, _| false),
            Verdict::Tracked,
            "{peer}"
        );
        // ...but not from another port of the peer, nor to another port of ours.
        assert_eq!(
            ct.inbound(t, &udp(peer, 54, me, 6000), |_, _| false),
            Verdict::Dropped,
            "{peer}"
        );
        assert_eq!(
            ct.inbound(t, &udp(peer, 53, me, 6001), |_, _| false),
            Verdict::Dropped,
            "{peer}"
        );
    }

    #[test]
    fn replies_to_our_flows_pass_new_flows_need_the_acl() {
        let mut ct = Conntrack::default();
        let t = Instant::now();
        acl_opens_flows_replies_pass(&mut ct, ME.into(), PEER.into());
        acl_opens_flows_replies_pass(
            &mut ct,
            "fd7a:7765:6674::5".parse().unwrap(),
            "fd7a:7765:6674::9".parse().unwrap(),
        );
        // Ping: our echo request lets the reply in; the peer's request needs the ACL.
        ct.outbound(t, &echo(ME, PEER, 8, 77));
        assert_eq!(
            ct.inbound(t, &echo(PEER, ME, 0, 77), |_, _| false),
            Verdict::Tracked
        );
        assert_eq!(
            ct.inbound(t, &echo(PEER, ME, 8, 78), ssh_only),
            Verdict::Dropped
        );
        assert_eq!(
            ct.inbound(t, &echo(PEER, ME, 8, 78), |p, _| p == Proto::Icmp),
            Verdict::NewAllowed
        );
    }

    #[test]
    fn flows_expire_when_idle_and_traffic_keeps_them() {
        let mut ct = Conntrack::default();
        let t = Instant::now();
        ct.outbound(t, &udp(ME, 6000, PEER, 53));
        let reply = udp(PEER, 53, ME, 6000);
        // Traffic within the idle time keeps it alive.
        let t1 = t + UDP_IDLE - Duration::from_secs(1);
        assert!(ct.inbound(t1, &reply, |_, _| false).passes());
        let t2 = t1 + UDP_IDLE - Duration::from_secs(1);
        assert!(ct.inbound(t2, &reply, |_, _| false).passes());
        // Silence beyond it ends the flow.
        let t3 = t2 + UDP_IDLE + Duration::from_secs(1);
        assert_eq!(ct.inbound(t3, &reply, |_, _| false), Verdict::Dropped);
        ct.expire(t3);
        assert!(ct.is_empty());
    }

    #[test]
    fn icmp_errors_about_our_packets_pass() {
        let mut ct = Conntrack::default();
        let t = Instant::now();
        let ours = udp(ME, 6000, PEER, 53);
        // Destination unreachable quoting our packet.
        let mut l4 = vec![3, 3, 0, 0, 0, 0, 0, 0];
        l4.extend_from_slice(&ours[..28]);
        let err = v4(ICMP, PEER, ME, &l4);
        assert_eq!(ct.inbound(t, &err, |_, _| true), Verdict::Dropped);
        ct.outbound(t, &ours);
        assert_eq!(ct.inbound(t, &err, |_, _| false), Verdict::Tracked);
    }

    #[test]
    fn table_is_bounded() {
        let mut ct = Conntrack::new(100);
        let t = Instant::now();
        for port in 0..1000u16 {
            ct.outbound(
                t + Duration::from_millis(u64::from(port)),
                &udp(ME, port, PEER, 53),
            );
        }
        assert_eq!(ct.len(), 100);
        // The newest flow is never the one evicted for itself.
        let last = udp(PEER, 53, ME, 999);
        assert!(ct
            .inbound(t + Duration::from_secs(1), &last, |_, _| false)
            .passes());
        // Expired flows make room before anything live is evicted.
        let later = t + UDP_IDLE + Duration::from_secs(5);
        ct.outbound(later, &udp(ME, 5000, PEER, 53));
        assert_eq!(ct.len(), 1);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(p in proptest::collection::vec(any::<u8>(), 0..120)) {
            let mut ct = Conntrack::new(8);
            let t = Instant::now();
            ct.outbound(t, &p);
            let _ = ct.inbound(t, &p, |_, _| true);
            prop_assert!(ct.len() <= 8);
        }

        #[test]
        fn a_denied_peer_gets_nothing_through_without_our_flows(
            sport in any::<u16>(), dport in any::<u16>(), proto in prop_oneof![Just(TCP), Just(UDP)]
        ) {
            let mut ct = Conntrack::default();
            let mut l4 = vec![0u8; 20];
            l4[0..2].copy_from_slice(&sport.to_be_bytes());
            l4[2..4].copy_from_slice(&dport.to_be_bytes());
            let p = v4(proto, PEER, ME, &l4);
            prop_assert_eq!(ct.inbound(Instant::now(), &p, |_, _| false), Verdict::Dropped);
            prop_assert!(ct.is_empty());
        }
    }
}
