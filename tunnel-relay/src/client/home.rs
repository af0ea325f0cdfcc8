//! The home relay by latency (issue 14): a node of a fleet measures its
//! round-trip time to every relay (a STUN binding request to each relay's
//! STUN port), keeps a *home* relay and moves only when another is clearly
//! better: DERP's rule, at least [`SWITCH_MIN_GAIN`] faster **and** below
//! two thirds of the current relay's time, so two relays of about the same
//! distance do not make it flap.
//!
//! The rule is pure ([`choose_home`]); [`measure`] is the probe shell;
//! [`better_session`] is what a long-lived session (a worker's `expose`, a
//! mesh node's control session) waits on: it resolves to a new admitted
//! session when a nearer relay was found (or, on the TCP/TLS fallback, when
//! QUIC reaches the relay again), and the caller swaps it in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::time::timeout;
use tracing::{debug, info};

use super::session::{connect_addrs, connect_with, ClientTiming, Session, SessionView};
use super::state::ClientState;
use crate::error::ClientError;
use crate::tcp;
use crate::token::Token;
use crate::transport::Kind;
use crate::wire::RelayEntry;
use weft_proto::stun::{binding_request, parse_binding_response};

/// A relay must be at least this much faster than the home relay to take
/// its place (and below two thirds of its time).
pub const SWITCH_MIN_GAIN: Duration = Duration::from_millis(10);

/// How often a long-lived session measures the fleet again by default
/// (`WEFT_HOME_PROBE` sets it, e.g. `5s`).
pub const HOME_PROBE_DEFAULT: Duration = Duration::from_secs(30);

/// The first measurement after a session is admitted.
const FIRST_PROBE: Duration = Duration::from_secs(1);

/// How long a measurement waits for the relays' answers.
pub const PROBE_WAIT: Duration = Duration::from_millis(1500);

/// STUN requests sent to each relay per measurement (the fastest answer counts).
const PROBES_PER_RELAY: u32 = 3;

/// The relay to move to, if any: the fastest measured relay when the node
/// has no home yet or its home is not among the fleet's live relays; none
/// when the home did not answer this time; otherwise the fastest only when
/// it is at least [`SWITCH_MIN_GAIN`] faster than the home and below two
/// thirds of its time. `None`: stay.
pub fn choose_home(
    current: Option<&str>,
    rtts: &BTreeMap<String, Option<Duration>>,
) -> Option<String> {
    let (best, best_rtt) = rtts
        .iter()
        .filter_map(|(n, r)| r.map(|r| (n, r)))
        .min_by_key(|(n, r)| (*r, (*n).clone()))?;
    let Some(cur) = current else {
        return Some(best.clone());
    };
    if best == cur {
        return None;
    }
    match rtts.get(cur) {
        // The home is no longer a live relay of the fleet: the fastest.
        None => Some(best.clone()),
        // Listed but unanswered (a lost or rate-limited probe): the session
        // to it is up, so one silent measurement moves nothing. A home that
        // is really gone ends the session, and failover picks the nearest.
        Some(None) => None,
        Some(Some(cur_rtt)) => {
            let cur_rtt = *cur_rtt;
            let clearly = best_rtt + SWITCH_MIN_GAIN <= cur_rtt && best_rtt * 3 < cur_rtt * 2;
            clearly.then(|| best.clone())
        }
    }
}

/// What a node knows of its fleet (`fleet.json` in its state directory; no
/// secrets): the relays, its latest round-trip times to them and its home.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct FleetView {
    /// The fleet's live relays, as the home relay listed them.
    pub relays: Vec<RelayEntry>,
    /// The relay this node keeps its sessions on.
    pub home: Option<String>,
    /// Round-trip time to each relay in milliseconds (`null`: no answer).
    pub rtt_ms: BTreeMap<String, Option<f64>>,
    /// When they were measured (unix seconds).
    pub measured_unix: u64,
}

impl FleetView {
    /// The measured times as durations.
    pub fn rtts(&self) -> BTreeMap<String, Option<Duration>> {
        self.rtt_ms
            .iter()
            .map(|(n, ms)| (n.clone(), ms.map(|ms| Duration::from_secs_f64(ms / 1000.0))))
            .collect()
    }

    /// The relay addresses in preference order: the home's first, then the
    /// others by round-trip time (unanswered last).
    pub fn preferred_addrs(&self) -> Vec<String> {
        let rtts = self.rtts();
        let mut order: Vec<&RelayEntry> = self.relays.iter().collect();
        order.sort_by_key(|r| {
            let home = self.home.as_deref() == Some(r.name.as_str());
            let rtt = rtts.get(&r.name).copied().flatten();
            (!home, rtt.is_none(), rtt, r.name.clone())
        });
        let mut out: Vec<String> = Vec::new();
        for a in order.iter().flat_map(|r| r.addrs.iter()) {
            if !out.contains(a) {
                out.push(a.clone());
            }
        }
        out
    }
}

/// How often a long-lived session measures the fleet: `WEFT_HOME_PROBE` (a
/// duration such as `5s`; `0` turns the home relay's choice by latency off),
/// else [`HOME_PROBE_DEFAULT`].
pub fn home_probe_every() -> Result<Option<Duration>, ClientError> {
    match std::env::var("WEFT_HOME_PROBE") {
        Ok(v) if v.trim() == "0" => Ok(None),
        Ok(v) => weft_proto::duration::parse(&v)
            .map(Some)
            .map_err(|e| ClientError::Usage(format!("WEFT_HOME_PROBE={v:?}: {e}"))),
        Err(_) => Ok(Some(HOME_PROBE_DEFAULT)),
    }
}

/// Round-trip time to each relay (by name): [`PROBES_PER_RELAY`] STUN
/// binding requests to its STUN port at the host of its first address that
/// resolves, the fastest answer within `wait`; for a relay that does not
/// answer STUN in time (UDP blocked on this network, or no STUN port), a
/// probe over TCP/TLS ([`tcp::probe_rtt`]) within `wait` more; `None` when
/// neither answered.
pub async fn measure(relays: &[RelayEntry], wait: Duration) -> BTreeMap<String, Option<Duration>> {
    let probes = relays.iter().map(|r| async move {
        let rtt = match stun_target(r).await {
            Some(target) => stun_rtt(target, wait).await,
            None => None,
        };
        let rtt = match rtt {
            Some(rtt) => Some(rtt),
            None => tcp_rtt(r, wait).await,
        };
        (r.name.clone(), rtt)
    });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .collect()
}

/// [`tcp::probe_rtt`] to the relay's first address that resolves (its TCP
/// listener shares the QUIC port), within `wait`.
async fn tcp_rtt(r: &RelayEntry, wait: Duration) -> Option<Duration> {
    for a in &r.addrs {
        let Some(addr) = tokio::net::lookup_host(a.as_str())
            .await
            .ok()
            .and_then(|mut it| it.next())
        else {
            continue;
        };
        return match timeout(wait, tcp::probe_rtt(addr)).await {
            Ok(Ok(rtt)) => Some(rtt),
            Ok(Err(e)) => {
                debug!(relay = %r.name, error = %e, "TCP/TLS latency probe failed");
                None
            }
            Err(_) => None,
        };
    }
    None
}

async fn stun_target(r: &RelayEntry) -> Option<SocketAddr> {
    if r.stun_port == 0 {
        return None;
    }
    for a in &r.addrs {
        if let Ok(mut it) = tokio::net::lookup_host(a.as_str()).await {
            if let Some(sa) = it.next() {
                return Some(SocketAddr::new(sa.ip(), r.stun_port));
            }
        }
    }
    None
}

/// The fastest of [`PROBES_PER_RELAY`] STUN round trips to `target`, sent
/// 100 ms apart (the first pays for ARP and cold caches); returns when each
/// was answered, else after `wait` with what did answer.
async fn stun_rtt(target: SocketAddr, wait: Duration) -> Option<Duration> {
    let deadline = tokio::time::Instant::now() + wait;
    let bind: SocketAddr = if target.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await.ok()?;
    let n = PROBES_PER_RELAY as usize;
    let mut sent: Vec<([u8; 12], Instant)> = Vec::new();
    let mut answered = 0usize;
    let mut best: Option<Duration> = None;
    let mut buf = [0u8; 600];
    let mut next_send = tokio::time::Instant::now();
    while answered < n {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return best,
            _ = tokio::time::sleep_until(next_send), if sent.len() < n => {
                let tx: [u8; 12] = rand::random();
                if sock.send_to(&binding_request(tx), target).await.is_ok() {
                    sent.push((tx, Instant::now()));
                }
                next_send += Duration::from_millis(100);
            }
            r = sock.recv_from(&mut buf) => {
                let Ok((len, from)) = r else { return best };
                let now = Instant::now();
                let Ok((tx, _)) = parse_binding_response(&buf[..len]) else { continue };
                if from != target {
                    continue;
                }
                if let Some((_, at)) = sent.iter().find(|(t, _)| *t == tx) {
                    let rtt = now.saturating_duration_since(*at);
                    best = Some(best.map_or(rtt, |b| b.min(rtt)));
                    answered += 1;
                }
            }
        }
    }
    best
}

/// Measures the fleet `current` belongs to and records it in the state
/// directory (`fleet.json`, and the relays' order in `relay.json`). Returns
/// the relay to move to (DERP's rule), if any.
pub async fn measure_fleet(
    state: &mut ClientState,
    current: &SessionView,
) -> Result<Option<RelayEntry>, ClientError> {
    let (me, relays) = timeout(Duration::from_secs(3), current.list_relays())
        .await
        .map_err(|_| ClientError::Usage("the relay did not list its fleet in 3 s".into()))??;
    let rtts = measure(&relays, PROBE_WAIT).await;
    let choice = choose_home(Some(&me), &rtts);
    let home = choice.clone().unwrap_or_else(|| me.clone());
    debug!(home = %me, rtts = ?rtts, "measured the fleet's relays");
    state.note_fleet(FleetView {
        relays: relays.clone(),
        home: Some(home),
        rtt_ms: rtts
            .iter()
            .map(|(n, r)| (n.clone(), r.map(|d| d.as_secs_f64() * 1000.0)))
            .collect(),
        measured_unix: super::state::unix_now(),
    });
    if let Some(to) = &choice {
        let ms = |n: &str| {
            rtts.get(n)
                .copied()
                .flatten()
                .map(|d| d.as_secs_f64() * 1000.0)
        };
        info!(from = %me, to = %to, from_ms = ?ms(&me), to_ms = ?ms(to), "a clearly nearer relay of the fleet: moving home");
    }
    Ok(choice.and_then(|n| relays.into_iter().find(|r| r.name == n)))
}

/// Resolves to a better session than `current`: on the TCP/TLS fallback by
/// choice of the race (`quic_every` set), a QUIC session once QUIC reaches
/// the relay again; in a fleet (`home_every` set, and the relay announced
/// other relays), a session on a clearly nearer relay; in a fleet, when the
/// relay went silent over QUIC (nothing received for two keepalive periods:
/// its process or host is gone, or its path stopped), a session on another
/// relay of the fleet, raced then, not after the idle timeout. Never
/// resolves when none applies. The caller swaps the new session in (what
/// was open on the old one stays there until it ends).
#[allow(clippy::too_many_arguments)]
pub async fn better_session(
    state: &mut ClientState,
    token: Option<&Token>,
    name: &str,
    services: &[String],
    timing: &ClientTiming,
    current: &SessionView,
    quic_every: Option<Duration>,
    home_every: Option<Duration>,
) -> Session {
    let conn = current.connection();
    if current.relays.is_empty() || conn.received_datagrams().is_none() {
        return periodic(
            state, token, name, services, timing, current, quic_every, home_every,
        )
        .await;
    }
    let silent = (timing.keepalive * 2).max(SILENT_MIN);
    loop {
        tokio::select! {
            s = periodic(state, token, name, services, timing, current, quic_every, home_every) => return s,
            () = conn.went_silent(silent) => {}
        }
        let lost = conn.remote_address();
        info!(relay = %lost, silent_ms = silent.as_millis() as u64, "the relay went silent; racing the other relays of the fleet");
        // Lost: it goes last (should it answer after all, it still may
        // admit us), the others nearest first, in random order among equals,
        // so the herd from one relay spreads over the fleet.
        super::session::relay_lost(lost);
        let addrs = lost_first(&current.relays, lost).await;
        match connect_addrs(state, token, name, services, timing, &addrs).await {
            Ok(s) => return s,
            Err(e) => {
                debug!(error = %e, "no other relay of the fleet admitted us; waiting on this one");
                conn.heard_again().await;
            }
        }
    }
}

/// The shortest silence taken for a lost relay, whatever the keepalive.
const SILENT_MIN: Duration = Duration::from_secs(1);

/// `relays` with the one at `lost` first: the order a node failing over
/// from its relay connects in (the lost one goes last, the others are
/// shuffled among equals: `connect_to`).
async fn lost_first(relays: &[String], lost: SocketAddr) -> Vec<String> {
    let mut out = Vec::with_capacity(relays.len());
    for a in relays {
        let is_lost = tokio::net::lookup_host(a.as_str())
            .await
            .is_ok_and(|mut it| it.any(|sa| sa == lost));
        if out.contains(a) {
            continue;
        }
        if is_lost {
            out.insert(0, a.clone());
        } else {
            out.push(a.clone());
        }
    }
    out
}

/// [`better_session`]'s timed reasons: QUIC again, a nearer relay.
#[allow(clippy::too_many_arguments)]
async fn periodic(
    state: &mut ClientState,
    token: Option<&Token>,
    name: &str,
    services: &[String],
    timing: &ClientTiming,
    current: &SessionView,
    quic_every: Option<Duration>,
    home_every: Option<Duration>,
) -> Session {
    let quic_every = quic_every.filter(|_| current.connection().kind() == Kind::Tcp);
    let home_every = home_every.filter(|_| !current.relays.is_empty());
    let start = tokio::time::Instant::now();
    let mut next_quic = quic_every.map(|e| start + e);
    // A node that measured its fleet lately (a reconnect: a relay failed or
    // drained, and its nodes are all reconnecting now) measures again later,
    // at a random point of the period, so the herd's probes do not land on
    // the relays with the herd; a new node measures at once.
    let next_home_in = |every: Duration| {
        let age = super::state::unix_now().saturating_sub(state.fleet().measured_unix);
        if age < every.as_secs().saturating_mul(2) {
            every / 2 + every.mul_f64(rand::random::<f64>() / 2.0)
        } else {
            FIRST_PROBE
        }
    };
    let mut next_home = home_every.map(|e| start + next_home_in(e));
    loop {
        let at = match (next_quic, next_home) {
            (Some(q), Some(h)) => q.min(h),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => std::future::pending().await,
        };
        tokio::time::sleep_until(at).await;
        let now = tokio::time::Instant::now();
        if let (Some(q), Some(every)) = (next_quic, quic_every) {
            if q <= now {
                next_quic = Some(now + every);
                let tried = connect_with(
                    state,
                    token,
                    name,
                    services.to_vec(),
                    timing,
                    Some(tcp::Choice::Quic),
                )
                .await;
                match tried {
                    Ok(s) => return s,
                    Err(e) => {
                        debug!(error = %e, retry_in_s = every.as_secs(), "QUIC still does not reach the relay")
                    }
                }
            }
        }
        if let (Some(h), Some(every)) = (next_home, home_every) {
            if h <= now {
                next_home = Some(now + every);
                match measure_fleet(state, current).await {
                    Ok(Some(to)) => {
                        match connect_addrs(state, token, name, services, timing, &to.addrs).await {
                            Ok(s) => return s,
                            Err(e) => {
                                debug!(relay = %to.name, error = %e, "the nearer relay did not admit us; staying")
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => debug!(error = %e, "could not measure the fleet"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[(&str, Option<u64>)]) -> BTreeMap<String, Option<Duration>> {
        v.iter()
            .map(|(n, r)| (n.to_string(), r.map(Duration::from_millis)))
            .collect()
    }

    #[test]
    fn derp_rule_moves_only_to_a_clearly_nearer_relay() {
        let r = ms(&[("a", Some(5)), ("b", Some(40)), ("c", Some(120))]);
        assert_eq!(
            choose_home(None, &r).as_deref(),
            Some("a"),
            "no home: the nearest"
        );
        assert_eq!(choose_home(Some("a"), &r), None, "already the nearest");
        assert_eq!(choose_home(Some("c"), &r).as_deref(), Some("a"));
        // 10 ms faster but not below 2/3: stay.
        let r = ms(&[("a", Some(50)), ("b", Some(60))]);
        assert_eq!(choose_home(Some("b"), &r), None);
        // Below 2/3 but less than 10 ms faster: stay.
        let r = ms(&[("a", Some(5)), ("b", Some(12))]);
        assert_eq!(choose_home(Some("b"), &r), None);
        // Both: move.
        let r = ms(&[("a", Some(20)), ("b", Some(31))]);
        assert_eq!(choose_home(Some("b"), &r).as_deref(), Some("a"));
        // The home did not answer this time: stay (its session is up). The
        // home is gone from the fleet: the fastest that answered.
        let r = ms(&[("a", Some(30)), ("b", None), ("c", Some(20))]);
        assert_eq!(choose_home(Some("b"), &r), None);
        assert_eq!(choose_home(Some("gone"), &r).as_deref(), Some("c"));
        // Nothing answered: stay.
        let r = ms(&[("a", None), ("b", None)]);
        assert_eq!(choose_home(Some("a"), &r), None);
        assert_eq!(choose_home(None, &r), None);
        // Equal times break by name, so every node of a region picks the same.
        let r = ms(&[("b", Some(5)), ("a", Some(5))]);
        assert_eq!(choose_home(None, &r).as_deref(), Some("a"));
    }

    #[test]
    fn preferred_addresses_put_home_first_then_by_latency() {
        let entry = |n: &str, a: &str| RelayEntry {
            name: n.into(),
            region: String::new(),
            addrs: vec![a.into()],
            stun_port: 3478,
        };
        let v = FleetView {
            relays: vec![
                entry("a", "a:1"),
                entry("b", "b:1"),
                entry("c", "c:1"),
                entry("d", "d:1"),
            ],
            home: Some("c".into()),
            rtt_ms: [
                ("a".to_string(), Some(40.0)),
                ("b".to_string(), Some(5.0)),
                ("c".to_string(), Some(9.0)),
                ("d".to_string(), None),
            ]
            .into_iter()
            .collect(),
            measured_unix: 1,
        };
        assert_eq!(v.preferred_addrs(), ["c:1", "b:1", "a:1", "d:1"]);
        let text = serde_json::to_string(&v).unwrap_or_default();
        assert_eq!(serde_json::from_str::<FleetView>(&text).ok(), Some(v));
    }

    #[tokio::test]
    async fn a_node_failing_over_names_its_lost_relay_first_and_once() {
        let relays = vec![
            "203.0.113.2:4433".to_string(),
            "203.0.113.3:4433".to_string(),
            "203.0.113.4:4433".to_string(),
            "203.0.113.3:4433".to_string(),
        ];
        let lost: SocketAddr = "203.0.113.4:4433".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            lost_first(&relays, lost).await,
            ["203.0.113.4:4433", "203.0.113.2:4433", "203.0.113.3:4433"]
        );
        let elsewhere: SocketAddr = "192.0.2.1:4433".parse().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(lost_first(&relays, elsewhere).await, relays[..3]);
    }
}
