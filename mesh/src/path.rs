//! Path selection for one peer: relay first, direct when a probe answers,
//! back to the relay when the direct path goes quiet. Pure and time-injected:
//! every input takes `now`, [`PeerPath::tick`] returns what to send, and
//! [`PeerPath::poll_timeout`] says when to call it next.
//!
//! ```text
//!            on_candidates / call-me-maybe / re-probe timer
//!                 │  (ping every candidate; call-me-maybe via relay)
//!                 ▼
//!   ┌───────┐  first pong from X   ┌────────────┐  pong from Y, Y better
//!   │ Relay │ ───────────────────▶ │ Direct(X)  │ ─────────────────────┐
//!   └───────┘                      └────────────┘ ◀────────────────────┘
//!       ▲  ▲   sent on X, nothing heard   │   │ idle 5 s: keep-alive ping
//!       │  └── for direct_timeout (2.5 s) ┘   │ sending, silent 1 s: ping
//!       │                                     │ every 60 s: re-probe all
//!       └ every 30 s on relay: re-probe all ──┘
//! ```
//!
//! # Rules
//! - Start on [`Path::Relay`]; packets flow through the relay at once.
//! - A probe round pings every candidate (disco ping, fresh [`TxId`]) and,
//!   when we start it ourselves, asks the relay to deliver a call-me-maybe
//!   so the peer pings us at the same moment (both NATs open).
//! - The first pong switches to `Direct(source of the pong)`. A later pong
//!   from another address switches if it is clearly better (10% lower RTT,
//!   LAN addresses counted at half their RTT), or if the current path has not
//!   been heard from for [`PathConfig::heartbeat`] (the peer roamed).
//! - While direct, the first send after the last thing heard starts a
//!   clock: if nothing comes back within [`PathConfig::heartbeat`] a ping is
//!   sent; if nothing comes back within [`PathConfig::direct_timeout`] the path
//!   falls back to the relay and a probe round starts at once. An idle direct
//!   path is pinged every [`PathConfig::keepalive`] (which starts the same clock).
//! - Authenticated WireGuard traffic or a disco ping from an address that is
//!   not the current direct path triggers a ping to it (at most one per
//!   heartbeat), so a roamed peer is confirmed by a pong rather than trusted
//!   on its word, and a peer whose NAT maps per destination (its pings come
//!   from a port no STUN server saw) is reached through the hole it opened.
//!
//! # Invariants
//! Outstanding pings are bounded ([`MAX_PINGS`]) and expire after
//! [`PathConfig::ping_timeout`]; a pong is accepted only for a transaction id
//! we issued and not yet used. Candidates are bounded ([`MAX_CANDIDATES`]).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::disco::TxId;

/// Most candidate addresses tracked per peer.
pub(crate) const MAX_CANDIDATES: usize = 16;
/// Most outstanding pings per peer.
pub(crate) const MAX_PINGS: usize = 64;
/// A received ping is answered with a ping back unless we pinged its source
/// this recently (a burst of the peer's probes arriving together).
pub(crate) const PING_BACK_GAP: Duration = Duration::from_millis(10);

/// Timers of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PathConfig {
    /// Sent on the direct path and heard nothing back for this long → relay. Default 2.5 s
    /// (traffic is back on the relay within the issue's 3 s, counting detection).
    pub direct_timeout: Duration,
    /// Sent on the direct path and heard nothing for this long → ping it. Default 1 s.
    pub heartbeat: Duration,
    /// Idle direct path: ping this often. Default 5 s.
    pub keepalive: Duration,
    /// On the relay: probe every candidate this often. Default 30 s.
    pub probe_interval_relay: Duration,
    /// While direct: probe every candidate this often (finds a better path). Default 60 s.
    pub probe_interval_direct: Duration,
    /// An unanswered ping is forgotten after this. Default 5 s.
    pub ping_timeout: Duration,
    /// Probe rounds asked for by inputs are at least this far apart. Default 1 s.
    pub min_probe_gap: Duration,
}

impl Default for PathConfig {
    fn default() -> Self {
        PathConfig {
            direct_timeout: Duration::from_millis(2500),
            heartbeat: Duration::from_secs(1),
            keepalive: Duration::from_secs(5),
            probe_interval_relay: Duration::from_secs(30),
            probe_interval_direct: Duration::from_secs(60),
            ping_timeout: Duration::from_secs(5),
            min_probe_gap: Duration::from_secs(1),
        }
    }
}

/// Where packets to the peer go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Path {
    /// Through the relay (always works).
    Relay,
    /// Straight to this UDP address.
    Direct(SocketAddr),
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Action {
    /// Send a disco ping with this transaction id to `to` from the WireGuard socket.
    SendPing {
        /// Destination.
        to: SocketAddr,
        /// Transaction id (pass to `on_pong`).
        tx: TxId,
    },
    /// Send our current candidates to the peer as call-me-maybe (via the relay).
    SendCallMeMaybe,
    /// The path changed: point the peer's WireGuard endpoint here.
    PathChanged {
        /// Before.
        from: Path,
        /// After.
        to: Path,
    },
}

#[derive(Debug, Clone)]
struct Cand {
    addr: SocketAddr,
    rtt: Option<Duration>,
}

#[derive(Debug, Clone, Copy)]
struct Ping {
    tx: TxId,
    to: SocketAddr,
    sent: Instant,
}

/// The path state of one peer.
#[derive(Debug, Clone)]
pub(crate) struct PeerPath {
    cfg: PathConfig,
    current: Path,
    rtt: Option<Duration>,
    candidates: Vec<Cand>,
    pings: Vec<Ping>,
    /// Last pong or authenticated packet from the current direct address.
    last_heard: Option<Instant>,
    /// First send on the direct path after `last_heard` (unanswered so far).
    awaiting_since: Option<Instant>,
    /// Last ping to the current direct address.
    last_direct_ping: Option<Instant>,
    /// The last ping-back (answer to a peer's ping) and where it went.
    last_ping_back: Option<(SocketAddr, Instant)>,
    /// When the next periodic probe round is due.
    next_probe: Option<Instant>,
    /// A probe round was asked for (and whether with call-me-maybe).
    probe_requested: Option<bool>,
    requested_at: Option<Instant>,
    last_probe: Option<Instant>,
    queued: Vec<Action>,
    tx_seed: [u8; 4],
    tx_next: u64,
    /// The requested probe round may not wait for `min_probe_gap`: new
    /// candidates, or a peer probing us right now (call-me-maybe).
    urgent: bool,
}

fn is_lan(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// RTT as compared: LAN paths count half (they stay up when the internet doesn't).
fn weight(addr: SocketAddr, rtt: Duration) -> Duration {
    if is_lan(addr.ip()) {
        rtt / 2
    } else {
        rtt
    }
}

impl PeerPath {
    /// A peer on the relay path. `tx_seed` makes transaction ids unique
    /// across peers and restarts (pass random bytes).
    pub(crate) fn new(cfg: PathConfig, tx_seed: [u8; 4]) -> PeerPath {
        PeerPath {
            cfg,
            current: Path::Relay,
            rtt: None,
            candidates: Vec::new(),
            pings: Vec::new(),
            last_heard: None,
            awaiting_since: None,
            last_direct_ping: None,
            last_ping_back: None,
            next_probe: None,
            probe_requested: None,
            requested_at: None,
            last_probe: None,
            queued: Vec::new(),
            tx_seed,
            tx_next: 0,
            urgent: false,
        }
    }

    /// The path in use.
    pub(crate) fn current(&self) -> Path {
        self.current
    }

    /// RTT of the last pong on the current direct path (`None` on the relay).
    pub(crate) fn last_rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// The candidate addresses being probed.
    #[cfg(test)]
    pub(crate) fn candidates(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.candidates.iter().map(|c| c.addr)
    }

    fn request_probe(&mut self, now: Instant, call_me_maybe: bool) {
        let cmm = self.probe_requested.unwrap_or(false) || call_me_maybe;
        self.probe_requested = Some(cmm);
        self.requested_at.get_or_insert(now);
    }

    fn set_candidates(&mut self, addrs: &[SocketAddr]) -> bool {
        let mut next: Vec<Cand> = Vec::new();
        for a in addrs {
            if next.len() == MAX_CANDIDATES {
                break;
            }
            if a.port() == 0 || a.ip().is_unspecified() || next.iter().any(|c| c.addr == *a) {
                continue;
            }
            let rtt = self
                .candidates
                .iter()
                .find(|c| c.addr == *a)
                .and_then(|c| c.rtt);
            next.push(Cand { addr: *a, rtt });
        }
        let changed = next.len() != self.candidates.len()
            || next
                .iter()
                .zip(&self.candidates)
                .any(|(a, b)| a.addr != b.addr);
        self.candidates = next;
        changed
    }

    /// The peer's candidates from the coordinator. A changed set starts a
    /// probe round with call-me-maybe; an unchanged one does nothing.
    pub(crate) fn on_candidates(&mut self, now: Instant, addrs: &[SocketAddr]) {
        if self.set_candidates(addrs) && !self.candidates.is_empty() {
            self.request_probe(now, true);
            // New addresses (a peer that just started or moved): probe now.
            self.urgent = true;
        }
    }

    /// The peer asks us to probe these addresses now (it is probing us).
    pub(crate) fn on_call_me_maybe(&mut self, now: Instant, addrs: &[SocketAddr]) {
        let changed = self.set_candidates(addrs);
        if !self.candidates.is_empty() {
            self.request_probe(now, false);
            // New addresses from a peer probing us now: answer while its NAT
            // is open. Repeats of the same set wait for the probe gap.
            self.urgent |= changed;
        }
    }

    /// A pong arrived from `from` for transaction `tx`.
    pub(crate) fn on_pong(&mut self, now: Instant, from: SocketAddr, tx: TxId) {
        let Some(i) = self.pings.iter().position(|p| p.tx == tx) else {
            return; // not ours, answered already, or expired
        };
        let ping = self.pings.swap_remove(i);
        let rtt = now.saturating_duration_since(ping.sent);
        for c in self
            .candidates
            .iter_mut()
            .filter(|c| c.addr == ping.to || c.addr == from)
        {
            c.rtt = Some(rtt);
        }
        if !self.candidates.iter().any(|c| c.addr == from) && self.candidates.len() < MAX_CANDIDATES
        {
            // Peer-reflexive: the pong came from an address we did not know.
            self.candidates.push(Cand {
                addr: from,
                rtt: Some(rtt),
            });
        }
        match self.current {
            Path::Direct(ep) if ep == from => {
                self.heard(now);
                self.rtt = Some(rtt);
            }
            Path::Direct(ep) => {
                let stale = self
                    .last_heard
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.heartbeat);
                let better = self
                    .rtt
                    .is_none_or(|cur| weight(from, rtt) * 10 < weight(ep, cur) * 9);
                if stale || better {
                    self.switch(now, Path::Direct(from), Some(rtt));
                }
            }
            Path::Relay => self.switch(now, Path::Direct(from), Some(rtt)),
        }
    }

    /// An authenticated WireGuard packet arrived straight from `from`.
    pub(crate) fn on_rx_direct(&mut self, now: Instant, from: SocketAddr) {
        // Not our path (yet): confirm with a ping, at most one per heartbeat.
        self.confirm(now, from, self.cfg.heartbeat);
    }

    fn confirm(&mut self, now: Instant, from: SocketAddr, gap: Duration) {
        if self.current == Path::Direct(from) {
            self.heard(now);
            return;
        }
        let recent = self
            .pings
            .iter()
            .any(|p| p.to == from && now.saturating_duration_since(p.sent) < gap);
        if !recent {
            let a = self.ping(now, from);
            self.queued.push(a);
        }
    }

    /// An authenticated disco ping from the peer arrived straight from
    /// `from` (the shell answers it with a pong). Like
    /// [`PeerPath::on_rx_direct`], but the ping back is rate-limited only by
    /// [`PING_BACK_GAP`]: the peer's ping means its NAT has just opened
    /// towards us, so our earlier ping to `from` was probably dropped there.
    /// This is also how a peer behind a NAT that maps per destination is
    /// found (its ping arrives from a port no STUN server saw). Ping-backs
    /// cannot loop: they stop once a side is direct on that address, and the
    /// peer's own pings are rate-limited.
    ///
    /// Only earlier ping-backs count against the gap, not our own probe
    /// pings: when both nodes start together, our probe to `from` left a few
    /// milliseconds before the peer's ping arrived and was dropped by the
    /// peer's NAT, which opened only now; skipping the ping-back then cost a
    /// whole probe interval (1 s).
    pub(crate) fn on_ping_received(&mut self, now: Instant, from: SocketAddr) {
        if self.current == Path::Direct(from) {
            self.heard(now);
            return;
        }
        let recent = self.last_ping_back.is_some_and(|(to, at)| {
            to == from && now.saturating_duration_since(at) < PING_BACK_GAP
        });
        if !recent {
            self.last_ping_back = Some((from, now));
            let a = self.ping(now, from);
            self.queued.push(a);
        }
    }

    /// We sent a data packet to the peer on the current path.
    pub(crate) fn on_tx(&mut self, now: Instant) {
        if matches!(self.current, Path::Direct(_)) && self.awaiting_since.is_none() {
            self.awaiting_since = Some(now);
        }
    }

    fn heard(&mut self, now: Instant) {
        self.last_heard = Some(now);
        self.awaiting_since = None;
    }

    fn switch(&mut self, now: Instant, to: Path, rtt: Option<Duration>) {
        let from = self.current;
        self.current = to;
        self.rtt = rtt;
        self.awaiting_since = None;
        self.last_direct_ping = None;
        self.last_heard = matches!(to, Path::Direct(_)).then_some(now);
        let interval = match to {
            Path::Relay => self.cfg.probe_interval_relay,
            Path::Direct(_) => self.cfg.probe_interval_direct,
        };
        self.next_probe = Some(now + interval);
        self.queued.push(Action::PathChanged { from, to });
    }

    fn ping(&mut self, now: Instant, to: SocketAddr) -> Action {
        let mut id = [0u8; 12];
        id[..4].copy_from_slice(&self.tx_seed);
        id[4..].copy_from_slice(&self.tx_next.to_be_bytes());
        self.tx_next = self.tx_next.wrapping_add(1);
        let tx = TxId(id);
        if self.pings.len() == MAX_PINGS {
            // Drop the oldest.
            if let Some(i) = (0..self.pings.len()).min_by_key(|&i| self.pings[i].sent) {
                self.pings.swap_remove(i);
            }
        }
        self.pings.push(Ping { tx, to, sent: now });
        if self.current == Path::Direct(to) {
            self.last_direct_ping = Some(now);
            self.awaiting_since.get_or_insert(now);
        }
        Action::SendPing { to, tx }
    }

    /// Advances timers; returns what to send, in order.
    pub(crate) fn tick(&mut self, now: Instant) -> Vec<Action> {
        let mut out = std::mem::take(&mut self.queued);
        let timeout = self.cfg.ping_timeout;
        self.pings
            .retain(|p| now.saturating_duration_since(p.sent) < timeout);

        if let Path::Direct(ep) = self.current {
            let since = |t: Instant| now.saturating_duration_since(t);
            match self.awaiting_since {
                Some(t) if since(t) >= self.cfg.direct_timeout => {
                    self.switch(now, Path::Relay, None);
                    out.append(&mut self.queued);
                    self.request_probe(now, true);
                }
                Some(t)
                    if since(t) >= self.cfg.heartbeat
                        && self.last_direct_ping.is_none_or(|p| p < t) =>
                {
                    out.push(self.ping(now, ep));
                }
                Some(_) => {}
                None => {
                    let last = self.last_heard.max(self.last_direct_ping);
                    if last.is_none_or(|l| since(l) >= self.cfg.keepalive) {
                        out.push(self.ping(now, ep));
                    }
                }
            }
        }

        let periodic = self.next_probe.is_none_or(|t| now >= t);
        let gap_ok = self
            .last_probe
            .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.min_probe_gap);
        let requested = self.probe_requested.is_some() && (gap_ok || self.urgent);
        if !self.candidates.is_empty() && (periodic || requested) {
            let cmm = self.probe_requested.take().unwrap_or(true);
            self.requested_at = None;
            self.urgent = false;
            for a in self.candidates.iter().map(|c| c.addr).collect::<Vec<_>>() {
                out.push(self.ping(now, a));
            }
            if cmm {
                out.push(Action::SendCallMeMaybe);
            }
            self.last_probe = Some(now);
            let interval = match self.current {
                Path::Relay => self.cfg.probe_interval_relay,
                Path::Direct(_) => self.cfg.probe_interval_direct,
            };
            self.next_probe = Some(now + interval);
        }
        out
    }

    /// When `tick` must run next (`None`: only after an input). Call `tick`
    /// after every input too: inputs queue actions (a path change, a ping).
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        if let Some(p) = self.pings.iter().map(|p| p.sent).min() {
            at(p + self.cfg.ping_timeout);
        }
        if let Path::Direct(_) = self.current {
            match self.awaiting_since {
                Some(a) => {
                    at(a + self.cfg.direct_timeout);
                    if self.last_direct_ping.is_none_or(|p| p < a) {
                        at(a + self.cfg.heartbeat);
                    }
                }
                None => {
                    if let Some(l) = self.last_heard.max(self.last_direct_ping) {
                        at(l + self.cfg.keepalive);
                    }
                }
            }
        }
        if !self.candidates.is_empty() {
            if let Some(n) = self.next_probe {
                at(n);
            }
            if let Some(r) = self.requested_at {
                if self.urgent {
                    at(r);
                } else {
                    at(self
                        .last_probe
                        .map_or(r, |l| r.max(l + self.cfg.min_probe_gap)));
                }
            }
        }
        t
    }
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| panic!("bad addr {s}"))
    }

    fn pings(actions: &[Action]) -> Vec<(SocketAddr, TxId)> {
        actions
            .iter()
            .filter_map(|x| match x {
                Action::SendPing { to, tx } => Some((*to, *tx)),
                _ => None,
            })
            .collect()
    }

    fn changed(actions: &[Action]) -> Option<Path> {
        actions.iter().rev().find_map(|x| match x {
            Action::PathChanged { to, .. } => Some(*to),
            _ => None,
        })
    }

    const PUB: &str = "203.0.113.7:41641";
    const LAN: &str = "192.168.1.7:41641";

    /// Runs ticks every 100 ms from `t` for `d`, answering nothing; returns all actions.
    fn run(p: &mut PeerPath, t: &mut Instant, d: Duration) -> Vec<Action> {
        let end = *t + d;
        let mut all = Vec::new();
        while *t < end {
            *t += Duration::from_millis(100);
            all.extend(p.tick(*t));
        }
        all
    }

    #[test]
    fn starts_on_relay_and_probes_candidates_with_call_me_maybe() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [1, 2, 3, 4]);
        assert_eq!(p.current(), Path::Relay);
        assert!(p.tick(t0).is_empty(), "no candidates: nothing to do");
        assert_eq!(p.poll_timeout(), None);
        p.on_candidates(t0, &[a(PUB), a(LAN), a(PUB), a("0.0.0.0:1")]);
        let acts = p.tick(t0);
        let ps = pings(&acts);
        assert_eq!(
            ps.iter().map(|x| x.0).collect::<Vec<_>>(),
            vec![a(PUB), a(LAN)]
        );
        assert_ne!(ps[0].1, ps[1].1, "fresh transaction ids");
        assert!(acts.contains(&Action::SendCallMeMaybe));
        // Same candidates again: no new round.
        p.on_candidates(t0, &[a(PUB), a(LAN)]);
        assert!(pings(&p.tick(t0 + Duration::from_millis(10))).is_empty());
        assert_eq!(p.current(), Path::Relay);
    }

    #[test]
    fn a_peers_ping_is_pinged_back_even_right_after_our_own_probe() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [0; 4]);
        p.on_candidates(t0, &[a(PUB)]);
        assert_eq!(pings(&p.tick(t0)).len(), 1, "our probe");
        // 3 ms later the peer's ping arrives from that address: our probe was
        // probably dropped by its NAT, so ping back at once.
        let t = t0 + Duration::from_millis(3);
        p.on_ping_received(t, a(PUB));
        let back = pings(&p.tick(t));
        assert_eq!(back.iter().map(|x| x.0).collect::<Vec<_>>(), vec![a(PUB)]);
        // Another ping within the gap gets no second ping-back; after it, one more.
        p.on_ping_received(t + Duration::from_millis(5), a(PUB));
        assert!(pings(&p.tick(t + Duration::from_millis(5))).is_empty());
        p.on_ping_received(t + PING_BACK_GAP, a(PUB));
        assert_eq!(pings(&p.tick(t + PING_BACK_GAP)).len(), 1);
        // The pong of the ping-back takes the path direct; pings then only confirm it.
        p.on_pong(t + PING_BACK_GAP, a(PUB), back[0].1);
        p.tick(t + PING_BACK_GAP);
        assert_eq!(p.current(), Path::Direct(a(PUB)));
        p.on_ping_received(t + PING_BACK_GAP * 3, a(PUB));
        assert!(pings(&p.tick(t + PING_BACK_GAP * 3)).is_empty());
    }

    #[test]
    fn first_pong_takes_over_and_lan_wins_over_public() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [0; 4]);
        p.on_candidates(t0, &[a(PUB), a(LAN)]);
        let ps = pings(&p.tick(t0));
        // The public one answers first (20 ms), the LAN one a bit later (25 ms):
        // LAN counts half, so it wins.
        p.on_pong(t0 + Duration::from_millis(20), a(PUB), ps[0].1);
        assert_eq!(p.current(), Path::Direct(a(PUB)));
        assert_eq!(p.last_rtt(), Some(Duration::from_millis(20)));
        let acts = p.tick(t0 + Duration::from_millis(21));
        assert_eq!(changed(&acts), Some(Path::Direct(a(PUB))));
        p.on_pong(t0 + Duration::from_millis(25), a(LAN), ps[1].1);
        assert_eq!(p.current(), Path::Direct(a(LAN)));
        // A replayed or unknown pong changes nothing.
        p.on_pong(t0 + Duration::from_millis(30), a(PUB), ps[0].1);
        p.on_pong(t0 + Duration::from_millis(30), a(PUB), TxId([9; 12]));
        assert_eq!(p.current(), Path::Direct(a(LAN)));
    }

    #[test]
    fn slower_pong_does_not_steal_a_good_path() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [0; 4]);
        let other = a("198.51.100.9:5000");
        p.on_candidates(t0, &[a(PUB), other]);
        let ps = pings(&p.tick(t0));
        p.on_pong(t0 + Duration::from_millis(10), a(PUB), ps[0].1);
        p.on_pong(t0 + Duration::from_millis(12), other, ps[1].1);
        assert_eq!(p.current(), Path::Direct(a(PUB)));
    }

    /// Gets a peer onto Direct(PUB) at t0 + 10 ms.
    fn direct() -> (PeerPath, Instant) {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [0; 4]);
        p.on_candidates(t0, &[a(PUB)]);
        let ps = pings(&p.tick(t0));
        let t = t0 + Duration::from_millis(10);
        p.on_pong(t, a(PUB), ps[0].1);
        p.tick(t);
        assert_eq!(p.current(), Path::Direct(a(PUB)));
        (p, t)
    }

    #[test]
    fn silence_while_sending_falls_back_within_3s_and_reprobe_brings_direct_back() {
        let (mut p, mut t) = direct();
        // Traffic both ways for 2 s: stays direct, no heartbeat pings needed.
        for _ in 0..20 {
            t += Duration::from_millis(100);
            p.on_tx(t);
            p.on_rx_direct(t, a(PUB));
            assert!(pings(&p.tick(t)).is_empty());
        }
        // The path dies: we keep sending, nothing comes back.
        let died = t;
        let mut fell_back = None;
        let mut heartbeat_pings = 0;
        while t < died + Duration::from_secs(5) {
            t += Duration::from_millis(100);
            p.on_tx(t);
            let acts = p.tick(t);
            heartbeat_pings += pings(&acts).iter().filter(|x| x.0 == a(PUB)).count();
            if changed(&acts) == Some(Path::Relay) {
                fell_back = Some(t);
                // A probe round starts at once, with call-me-maybe.
                assert!(acts.contains(&Action::SendCallMeMaybe));
                break;
            }
        }
        let Some(fb) = fell_back else {
            panic!("never fell back")
        };
        let after = fb - died;
        assert!(
            after <= Duration::from_millis(3100),
            "fell back after {after:?}"
        );
        assert!(heartbeat_pings >= 1, "a heartbeat ping was tried first");
        assert_eq!(p.current(), Path::Relay);
        assert_eq!(p.last_rtt(), None);
        // Nothing answers for a while: next probe round 30 s later.
        let acts = run(&mut p, &mut t, Duration::from_secs(29));
        assert!(pings(&acts).is_empty(), "{acts:?}");
        let acts = run(&mut p, &mut t, Duration::from_secs(2));
        let ps = pings(&acts);
        assert_eq!(ps.len(), 1);
        // This time it answers: direct again.
        p.on_pong(t + Duration::from_millis(5), a(PUB), ps[0].1);
        assert_eq!(p.current(), Path::Direct(a(PUB)));
    }

    #[test]
    fn idle_direct_path_is_kept_alive_and_survives() {
        let (mut p, mut t) = direct();
        let mut n = 0;
        for _ in 0..300 {
            // 30 s idle; answer every ping after 10 ms.
            t += Duration::from_millis(100);
            for (to, tx) in pings(&p.tick(t)) {
                if to == a(PUB) {
                    n += 1;
                    p.on_pong(t + Duration::from_millis(10), to, tx);
                }
            }
        }
        assert_eq!(p.current(), Path::Direct(a(PUB)));
        assert!((5..=7).contains(&n), "{n} keep-alive pings in 30 s");
    }

    #[test]
    fn idle_direct_path_that_stops_answering_falls_back() {
        let (mut p, mut t) = direct();
        let acts = run(&mut p, &mut t, Duration::from_secs(9));
        assert_eq!(
            changed(&acts),
            Some(Path::Relay),
            "keep-alive at 5 s, unanswered by 8 s"
        );
    }

    #[test]
    fn roaming_peer_is_confirmed_by_pong() {
        let (mut p, mut t) = direct();
        let new = a("198.51.100.20:60000");
        // Old address goes quiet; WireGuard data arrives from a new one.
        t += Duration::from_millis(1500);
        p.on_rx_direct(t, new);
        let ps = pings(&p.tick(t));
        assert_eq!(ps.len(), 1);
        assert_eq!(ps[0].0, new);
        // Not trusted before the pong.
        assert_eq!(p.current(), Path::Direct(a(PUB)));
        // No second ping within the heartbeat.
        p.on_rx_direct(t + Duration::from_millis(10), new);
        assert!(pings(&p.tick(t + Duration::from_millis(10))).is_empty());
        p.on_pong(t + Duration::from_millis(30), new, ps[0].1);
        assert_eq!(p.current(), Path::Direct(new));
        assert!(p.candidates().any(|c| c == new), "learnt as peer-reflexive");
    }

    #[test]
    fn roaming_via_new_candidates_after_fallback() {
        let (mut p, mut t) = direct();
        t += Duration::from_millis(100);
        p.on_tx(t);
        let acts = run(&mut p, &mut t, Duration::from_secs(4));
        assert_eq!(changed(&acts), Some(Path::Relay));
        // The coordinator announces the peer's new network.
        let new = a("198.51.100.30:41641");
        p.on_candidates(t, &[new]);
        t += Duration::from_millis(100);
        let acts = p.tick(t);
        let ps = pings(&acts);
        assert_eq!(ps.iter().map(|x| x.0).collect::<Vec<_>>(), vec![new]);
        p.on_pong(t + Duration::from_millis(40), new, ps[0].1);
        assert_eq!(p.current(), Path::Direct(new));
        assert_eq!(p.last_rtt(), Some(Duration::from_millis(40)));
    }

    #[test]
    fn call_me_maybe_probes_without_echoing() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [0; 4]);
        p.on_call_me_maybe(t0, &[a(PUB)]);
        let acts = p.tick(t0);
        assert_eq!(pings(&acts).len(), 1);
        assert!(!acts.contains(&Action::SendCallMeMaybe));
        // A second call-me-maybe within the gap waits for it.
        p.on_call_me_maybe(t0 + Duration::from_millis(100), &[a(PUB)]);
        assert!(pings(&p.tick(t0 + Duration::from_millis(100))).is_empty());
        assert_eq!(pings(&p.tick(t0 + Duration::from_millis(1000))).len(), 1);
    }

    #[test]
    fn pings_expire_and_stay_bounded() {
        let t0 = Instant::now();
        let mut p = PeerPath::new(PathConfig::default(), [0; 4]);
        p.on_candidates(t0, &[a(PUB)]);
        let ps = pings(&p.tick(t0));
        // Its pong after the ping timeout is ignored.
        p.tick(t0 + Duration::from_secs(6));
        p.on_pong(t0 + Duration::from_secs(6), a(PUB), ps[0].1);
        assert_eq!(p.current(), Path::Relay);
        for i in 0..200 {
            p.on_rx_direct(
                t0 + Duration::from_secs(7),
                SocketAddr::new(IpAddr::from([10, 0, (i / 250) as u8, (i % 250) as u8]), 1),
            );
        }
        assert!(p.pings.len() <= MAX_PINGS);
    }

    #[test]
    fn poll_timeout_covers_every_timer() {
        let (mut p, t) = direct();
        // Idle direct: the keep-alive.
        assert_eq!(p.poll_timeout(), Some(t + Duration::from_secs(5)));
        p.on_tx(t + Duration::from_millis(100));
        assert_eq!(p.poll_timeout(), Some(t + Duration::from_millis(1100)));
    }
}
