//! The one link core: keeping a session to the relay.
//!
//! [`Link`] is a pure state machine, like `quinn-proto`: it does no I/O, reads
//! no clock (every call takes `now`) and draws its jitter from a generator
//! seeded by the caller. Its shells run the attempts and tell it how they
//! went; it says what to do next ([`Link::poll`]) and what status commands
//! show ([`Link::state`], the one [`LinkState`]):
//!
//! ```text
//!  Connecting ──connected(now, admitted)──→ Connected
//!     │  ↑                                     │
//!     │  └── poll(now ≥ at) ── Retrying{at} ←──┤ failed(now, transient)
//!     │                           ↑            │
//!     └──── failed(now, transient)┘            │
//!     └──── failed(now, permanent) ──→ Failed{reason} ←── failed(now, permanent)
//!  any ── stop() ──→ Stopped
//! ```
//!
//! - A transient failure waits a jittered, capped exponential backoff:
//!   `min(cap, base · 2^(n-1))` for the n-th failure in a row, drawn
//!   uniformly from `[d/2, d]` so nodes that lost the same relay do not come
//!   back in lockstep.
//! - Only a connection that stayed up for [`Backoff::stable`] resets the
//!   backoff when it ends; a link that connects and drops at once (flaps)
//!   keeps backing off.
//! - A relay that announced its restart ([`Failure::RelayRestarting`]) is
//!   retried after [`Backoff::restart`] (jittered), whatever the backoff.
//! - [`is_permanent`] is the one judgement over the relay's refusal reasons:
//!   a permanent refusal (or unusable local state) gives up with the reason.
//!
//! Shells: `client::expose` (the provider), `mesh_client` (the mesh control
//! session) and the worker agent's first mesh join (`worker-agent`
//! `overlay.rs`). They map their errors to a [`Failure`]
//! (`ClientError::failure`, `client::close_failure`).

use std::fmt;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::transport::Kind;
use crate::wire::{Reason, Rejection};

/// Whether a refusal is for good: the relay will not change its mind
/// without an operator (a new token, un-revoking the node, a policy change,
/// an upgrade). Load, a failure inside the relay, or a peer that is not
/// there right now are worth retrying.
pub fn is_permanent(reason: Reason) -> bool {
    // Exhaustive on purpose: a new reason needs a decision here.
    match reason {
        Reason::TokenExpired
        | Reason::TokenUsedUp
        | Reason::TokenRevoked
        | Reason::TokenUnknown
        | Reason::KeyUnknown
        | Reason::NodeRevoked
        | Reason::NotAllowed
        | Reason::NameTaken
        | Reason::BadRequest
        | Reason::UnsupportedVersion
        | Reason::NoSuchService => true,
        // Approval comes from an operator, but the node is told at its next try: keep trying.
        Reason::LimitExceeded
        | Reason::Internal
        | Reason::AwaitingApproval
        | Reason::ServiceUnavailable
        | Reason::NoSuchNode => false,
    }
}

/// Why an attempt failed or a connection ended, as the shell reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The relay refused (at admission, on the mesh join, or by closing the
    /// connection as revoked): for good if [`is_permanent`] says so.
    Refused {
        /// The relay's reason.
        reason: Reason,
        /// What to show (the rejection with its detail, maybe with context).
        message: String,
    },
    /// The relay announced that it is going away (restarting): come back soon.
    RelayRestarting(String),
    /// Local state that another try cannot fix (the state directory).
    Local(String),
    /// Unreachable, timed out, handshake failed, connection lost: try again.
    Transient(String),
}

impl Failure {
    /// A refusal, shown as the rejection.
    pub fn refused(r: &Rejection) -> Failure {
        Failure::Refused {
            reason: r.reason,
            message: r.to_string(),
        }
    }

    /// Whether the link gives up on this failure.
    pub fn is_permanent(&self) -> bool {
        match self {
            Failure::Refused { reason, .. } => is_permanent(*reason),
            Failure::Local(_) => true,
            Failure::RelayRestarting(_) | Failure::Transient(_) => false,
        }
    }

    /// The same failure with another message (e.g. with its causes).
    pub fn with_message(self, message: String) -> Failure {
        match self {
            Failure::Refused { reason, .. } => Failure::Refused { reason, message },
            Failure::RelayRestarting(_) => Failure::RelayRestarting(message),
            Failure::Local(_) => Failure::Local(message),
            Failure::Transient(_) => Failure::Transient(message),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Refused { message, .. }
            | Failure::RelayRestarting(message)
            | Failure::Local(message)
            | Failure::Transient(message) => f.write_str(message),
        }
    }
}

/// Reconnect timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure in a row (doubles per failure).
    /// Default 250 ms.
    pub base: Duration,
    /// Largest delay. Default 4 s.
    pub cap: Duration,
    /// A connection up at least this long resets the backoff when it ends.
    /// Default 10 s.
    pub stable: Duration,
    /// Delay after the relay announced a restart. Default 200 ms.
    pub restart: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(4),
            stable: Duration::from_secs(10),
            restart: Duration::from_millis(200),
        }
    }
}

impl Backoff {
    /// The default timing with another base and cap.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            ..Backoff::default()
        }
    }

    /// The delay (before jitter) after `failures` failures in a row (≥ 1).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1 << doublings).min(self.cap)
    }
}

/// The relay's admission of this node: what a connected link shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "AdmittedJson", try_from = "AdmittedJson")]
pub struct Admitted {
    /// The relay's address.
    pub address: SocketAddr,
    /// The name the relay registered.
    pub name: String,
    /// The node's tags.
    pub tags: Vec<String>,
    /// The transport of the connection (QUIC, or the TCP/TLS fallback);
    /// `None` when read from a process that did not say.
    pub transport: Option<Kind>,
}

/// [`Admitted`] as JSON: the address both as `address` (what `mesh status`
/// showed) and as `relay` (what `worker-agent status` showed); either reads.
/// `transport` (`quic` or `tcp`) is absent from older processes' JSON; an
/// unknown value reads as unknown, not as an error.
#[derive(Serialize, Deserialize)]
struct AdmittedJson {
    #[serde(default)]
    address: Option<SocketAddr>,
    #[serde(default)]
    relay: Option<SocketAddr>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    transport: Option<String>,
}

impl From<Admitted> for AdmittedJson {
    fn from(a: Admitted) -> AdmittedJson {
        AdmittedJson {
            address: Some(a.address),
            relay: Some(a.address),
            name: a.name,
            tags: a.tags,
            transport: a.transport.map(|k| k.as_str().to_owned()),
        }
    }
}

impl TryFrom<AdmittedJson> for Admitted {
    type Error = &'static str;
    fn try_from(j: AdmittedJson) -> Result<Admitted, &'static str> {
        Ok(Admitted {
            address: j
                .address
                .or(j.relay)
                .ok_or("a connected link without the relay's address")?,
            name: j.name,
            tags: j.tags,
            transport: j.transport.as_deref().and_then(|t| {
                [Kind::Quic, Kind::Tcp]
                    .into_iter()
                    .find(|k| k.as_str() == t)
            }),
        })
    }
}

fn first_attempt() -> u32 {
    1
}

/// A link to the relay, as every status command shows it
/// (`tunnel-relay expose`, `worker-agent status`, `mesh status`).
///
/// JSON (field names kept from the formats these commands had before):
///
/// ```text
/// {"state": "connecting", "attempt": 1}
/// {"state": "connected", "address": "203.0.113.1:443", "relay": "203.0.113.1:443",
///  "name": "gpu1", "tags": ["worker"], "transport": "quic" | "tcp"}
/// {"state": "reconnecting", "attempt": 3, "error": "…", "retry_in_ms": 812}
/// {"state": "refused", "reason": "node revoked"}
/// {"state": "stopped"}
/// ```
///
/// Instants stay in the [`Link`] ([`Link::connected_since`],
/// [`Link::retry_at`]): this value crosses processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// An attempt is under way.
    Connecting {
        /// Attempts since the link was last up (or started), this one included.
        #[serde(default = "first_attempt")]
        attempt: u32,
    },
    /// Admitted: the session is up.
    Connected(Admitted),
    /// The last attempt failed or the connection was lost; retrying.
    #[serde(rename = "reconnecting")]
    Retrying {
        /// The attempt that comes next (counted like in `Connecting`).
        #[serde(default = "first_attempt")]
        attempt: u32,
        /// Why the last attempt or connection failed.
        #[serde(rename = "error")]
        last_error: String,
        /// Delay, from when it failed, before the next attempt.
        retry_in_ms: u64,
    },
    /// Given up: the relay refused this node for good, or local state is
    /// unusable. The shell has stopped.
    #[serde(rename = "refused")]
    Failed {
        /// Why.
        reason: String,
    },
    /// Stopped on shutdown.
    Stopped,
}

/// What a shell does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Start an attempt now (the state is [`LinkState::Connecting`]).
    Connect,
    /// Nothing to do before this instant (the state is [`LinkState::Retrying`]).
    WaitUntil(Instant),
    /// Connected: nothing to do until the shell reports how the connection ended.
    Idle,
    /// Given up ([`LinkState::Failed`]) or stopped: the shell ends.
    Done,
}

/// The link state machine (see the module docs).
#[derive(Debug, Clone)]
pub struct Link {
    backoff: Backoff,
    state: LinkState,
    /// Failures in a row since the backoff was last reset.
    failures: u32,
    /// The number of the current (or next) attempt since the link was last up.
    attempt: u32,
    connected_since: Option<Instant>,
    retry_at: Option<Instant>,
    rng: SplitMix64,
}

impl Link {
    /// A link about to make its first attempt; `seed` drives the jitter.
    pub fn new(backoff: Backoff, seed: u64) -> Link {
        Link {
            backoff,
            state: LinkState::Connecting { attempt: 1 },
            failures: 0,
            attempt: 1,
            connected_since: None,
            retry_at: None,
            rng: SplitMix64(seed),
        }
    }

    /// What status commands show.
    pub fn state(&self) -> &LinkState {
        &self.state
    }

    /// When the current connection came up.
    pub fn connected_since(&self) -> Option<Instant> {
        self.connected_since
    }

    /// When the next attempt is due (while retrying).
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Failures in a row since the backoff was last reset.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// What to do now. A due retry becomes [`LinkState::Connecting`].
    pub fn poll(&mut self, now: Instant) -> Next {
        match &self.state {
            LinkState::Connecting { .. } => Next::Connect,
            LinkState::Retrying { .. } => match self.retry_at {
                Some(at) if now < at => Next::WaitUntil(at),
                _ => {
                    self.retry_at = None;
                    self.state = LinkState::Connecting {
                        attempt: self.attempt,
                    };
                    Next::Connect
                }
            },
            LinkState::Connected(_) => Next::Idle,
            LinkState::Failed { .. } | LinkState::Stopped => Next::Done,
        }
    }

    /// The attempt succeeded: the relay admitted this node.
    pub fn connected(&mut self, now: Instant, admitted: Admitted) {
        if self.is_done() {
            return;
        }
        self.state = LinkState::Connected(admitted);
        self.connected_since = Some(now);
        self.retry_at = None;
        self.attempt = 1;
    }

    /// The attempt failed, or the connection ended: retry later or give up.
    /// Returns what [`Link::poll`] would (never [`Next::Connect`]).
    pub fn failed(&mut self, now: Instant, failure: &Failure) -> Next {
        if self.is_done() {
            return Next::Done;
        }
        let was_up = match self.connected_since.take() {
            Some(since) => {
                if now.saturating_duration_since(since) >= self.backoff.stable {
                    self.failures = 0;
                }
                true
            }
            None => false,
        };
        if failure.is_permanent() {
            self.retry_at = None;
            self.state = LinkState::Failed {
                reason: failure.to_string(),
            };
            return Next::Done;
        }
        if !was_up {
            self.attempt = self.attempt.saturating_add(1);
        }
        let delay = match failure {
            Failure::RelayRestarting(_) => self.backoff.restart,
            _ => {
                self.failures = self.failures.saturating_add(1);
                self.backoff.delay(self.failures)
            }
        };
        let delay = self.rng.jitter(delay);
        let at = now + delay;
        self.retry_at = Some(at);
        self.state = LinkState::Retrying {
            attempt: self.attempt,
            last_error: failure.to_string(),
            retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        };
        Next::WaitUntil(at)
    }

    /// Shutdown: final.
    pub fn stop(&mut self) {
        self.state = LinkState::Stopped;
        self.connected_since = None;
        self.retry_at = None;
    }

    fn is_done(&self) -> bool {
        matches!(self.state, LinkState::Failed { .. } | LinkState::Stopped)
    }
}

/// SplitMix64: small, seedable, good enough for jitter.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A delay drawn uniformly from `[d/2, d]` (microsecond steps).
    fn jitter(&mut self, d: Duration) -> Duration {
        let lo = d / 2;
        let span = u64::try_from(d.saturating_sub(lo).as_micros()).unwrap_or(u64::MAX);
        let r = match span.checked_add(1) {
            Some(n) => self.next_u64() % n,
            None => self.next_u64(),
        };
        lo + Duration::from_micros(r)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn admitted() -> Admitted {
        Admitted {
            address: "203.0.113.1:443".parse().unwrap(),
            name: "gpu1".into(),
            tags: vec!["worker".into()],
            transport: Some(Kind::Tcp),
        }
    }

    fn down() -> Failure {
        Failure::Transient("cannot reach the relay at 203.0.113.1:443: timed out".into())
    }

    fn every_reason() -> Vec<Reason> {
        (1..=u8::MAX)
            .map_while(|c| Reason::from_code(c).ok())
            .collect()
    }

    /// Fails `n` attempts in a row on the virtual clock, each as soon as it
    /// is due; returns the delays waited.
    fn fail_attempts(link: &mut Link, now: &mut Instant, n: usize) -> Vec<Duration> {
        let mut delays = Vec::new();
        for _ in 0..n {
            assert_eq!(link.poll(*now), Next::Connect);
            let Next::WaitUntil(at) = link.failed(*now, &down()) else {
                panic!("gave up on a transient failure: {:?}", link.state());
            };
            delays.push(at - *now);
            *now = at;
        }
        delays
    }

    #[test]
    fn backoff_doubles_per_failure_up_to_the_cap() {
        let b = Backoff::default();
        let mut link = Link::new(b, 7);
        let mut now = Instant::now();
        let delays = fail_attempts(&mut link, &mut now, 9);
        let want = [250, 500, 1000, 2000, 4000, 4000, 4000, 4000, 4000];
        for (i, (d, w)) in delays.iter().zip(want).enumerate() {
            let w = w * MS;
            assert!(
                *d >= w / 2 && *d <= w,
                "failure {}: {d:?} not in [{:?}, {w:?}]",
                i + 1,
                w / 2
            );
        }
        assert_eq!(b.delay(1), 250 * MS);
        assert_eq!(b.delay(5), 4 * SEC);
        assert_eq!(b.delay(u32::MAX), 4 * SEC, "no overflow");
        assert_eq!(link.failures(), 9);
    }

    #[test]
    fn jitter_stays_within_half_to_full_delay_and_spreads() {
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..2000 {
            let mut link = Link::new(Backoff::default(), seed);
            let now = Instant::now();
            let Next::WaitUntil(at) = link.failed(now, &down()) else {
                panic!("gave up");
            };
            let d = at - now;
            assert!(d >= 125 * MS && d <= 250 * MS, "seed {seed}: {d:?}");
            seen.insert(d.as_millis());
        }
        // Nodes that lost the same relay come back spread over the window.
        assert!(seen.len() > 100, "only {} distinct delays", seen.len());
        assert!(
            seen.first() <= Some(&130) && seen.last() >= Some(&245),
            "{seen:?}"
        );
        let mut r = SplitMix64(1);
        assert_eq!(r.jitter(Duration::ZERO), Duration::ZERO);
        assert!(r.jitter(Duration::MAX) >= Duration::MAX / 2);
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        let run = |seed| {
            let mut link = Link::new(Backoff::default(), seed);
            let mut now = Instant::now();
            fail_attempts(&mut link, &mut now, 6)
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn a_retry_waits_until_it_is_due_then_connects_again() {
        let mut link = Link::new(Backoff::default(), 1);
        let t0 = Instant::now();
        assert_eq!(link.state(), &LinkState::Connecting { attempt: 1 });
        assert_eq!(link.poll(t0), Next::Connect);
        let Next::WaitUntil(at) = link.failed(t0, &down()) else {
            panic!("gave up")
        };
        assert_eq!(link.retry_at(), Some(at));
        match link.state() {
            LinkState::Retrying {
                attempt,
                last_error,
                retry_in_ms,
            } => {
                assert_eq!(*attempt, 2);
                assert!(last_error.contains("timed out"), "{last_error}");
                assert_eq!(*retry_in_ms, (at - t0).as_millis() as u64);
            }
            s => panic!("{s:?}"),
        }
        assert_eq!(link.poll(at - MS), Next::WaitUntil(at));
        assert_eq!(link.poll(at), Next::Connect);
        assert_eq!(link.state(), &LinkState::Connecting { attempt: 2 });
        link.connected(at, admitted());
        assert_eq!(link.poll(at + SEC), Next::Idle);
        assert_eq!(link.state(), &LinkState::Connected(admitted()));
        assert_eq!(link.connected_since(), Some(at));
    }

    #[test]
    fn a_connection_that_stayed_up_resets_the_backoff() {
        let mut link = Link::new(Backoff::default(), 3);
        let mut now = Instant::now();
        fail_attempts(&mut link, &mut now, 6); // at the cap
        assert_eq!(link.poll(now), Next::Connect);
        link.connected(now, admitted());
        now += 10 * SEC; // stable
        let Next::WaitUntil(at) = link.failed(now, &down()) else {
            panic!("gave up")
        };
        let d = at - now;
        assert!(d >= 125 * MS && d <= 250 * MS, "back to the base: {d:?}");
        assert_eq!(link.failures(), 1);
        assert!(matches!(
            link.state(),
            LinkState::Retrying { attempt: 1, .. }
        ));
    }

    #[test]
    fn a_flapping_link_does_not_reset_the_backoff() {
        let mut link = Link::new(Backoff::default(), 5);
        let mut now = Instant::now();
        let mut delays = Vec::new();
        // Every attempt is admitted, and every connection drops after 2 s.
        for _ in 0..7 {
            assert_eq!(link.poll(now), Next::Connect);
            link.connected(now, admitted());
            now += 2 * SEC;
            let Next::WaitUntil(at) = link.failed(now, &down()) else {
                panic!("gave up")
            };
            delays.push(at - now);
            now = at;
        }
        let want = [250, 500, 1000, 2000, 4000, 4000, 4000];
        for (d, w) in delays.iter().zip(want) {
            let w = w * MS;
            assert!(*d >= w / 2 && *d <= w, "{delays:?}");
        }
        // Just under the stable period still counts as a flap.
        assert_eq!(link.poll(now), Next::Connect);
        link.connected(now, admitted());
        now += 10 * SEC - MS;
        let Next::WaitUntil(at) = link.failed(now, &down()) else {
            panic!("gave up")
        };
        assert!(at - now >= 2 * SEC, "{:?}", at - now);
    }

    #[test]
    fn permanent_refusals_give_up_with_the_reason() {
        for reason in every_reason().into_iter().filter(|r| is_permanent(*r)) {
            for connected_first in [false, true] {
                let mut link = Link::new(Backoff::default(), 9);
                let now = Instant::now();
                assert_eq!(link.poll(now), Next::Connect);
                if connected_first {
                    link.connected(now, admitted());
                }
                let f = Failure::refused(&Rejection::new(reason, "node \"gpu1\""));
                assert_eq!(link.failed(now + SEC, &f), Next::Done, "{reason:?}");
                assert_eq!(
                    link.state(),
                    &LinkState::Failed {
                        reason: format!("{reason}: node \"gpu1\"")
                    }
                );
                assert_eq!(link.poll(now + 100 * SEC), Next::Done);
                assert_eq!(link.retry_at(), None);
                // Final: a late report changes nothing.
                link.connected(now, admitted());
                assert_eq!(link.failed(now, &down()), Next::Done);
                assert!(matches!(link.state(), LinkState::Failed { .. }));
            }
        }
        let mut link = Link::new(Backoff::default(), 9);
        let f = Failure::Local("/var/lib/weft/identity.key: permission denied".into());
        assert_eq!(link.failed(Instant::now(), &f), Next::Done);
        assert!(
            matches!(link.state(), LinkState::Failed { reason } if reason.contains("permission denied"))
        );
    }

    #[test]
    fn transient_refusals_are_retried() {
        for reason in every_reason().into_iter().filter(|r| !is_permanent(*r)) {
            let mut link = Link::new(Backoff::default(), 9);
            let f = Failure::refused(&Rejection::new(reason, ""));
            assert!(
                matches!(link.failed(Instant::now(), &f), Next::WaitUntil(_)),
                "{reason:?}"
            );
        }
    }

    #[test]
    fn is_permanent_judges_every_reason() {
        use Reason::*;
        // Every reason, in code order, with its verdict.
        let verdicts = [
            (TokenExpired, true),
            (TokenUsedUp, true),
            (TokenRevoked, true),
            (TokenUnknown, true),
            (KeyUnknown, true),
            (NodeRevoked, true),
            (NotAllowed, true),
            (NoSuchNode, false),
            (NoSuchService, true),
            (ServiceUnavailable, false),
            (NameTaken, true),
            (LimitExceeded, false),
            (BadRequest, true),
            (UnsupportedVersion, true),
            (Internal, false),
            (AwaitingApproval, false),
        ];
        assert_eq!(every_reason(), verdicts.map(|(r, _)| r));
        for (r, permanent) in verdicts {
            assert_eq!(is_permanent(r), permanent, "{r:?}");
        }
        assert_eq!(every_reason().len(), 16);
        assert!(!Failure::RelayRestarting("relay restarting".into()).is_permanent());
        assert!(!down().is_permanent());
    }

    #[test]
    fn a_relay_announced_restart_retries_fast() {
        let b = Backoff::default();
        let mut link = Link::new(b, 11);
        let mut now = Instant::now();
        fail_attempts(&mut link, &mut now, 6); // backed off to the cap
        for up_for in [SEC, 60 * SEC] {
            assert_eq!(link.poll(now), Next::Connect);
            link.connected(now, admitted());
            now += up_for;
            let f = Failure::RelayRestarting("closed by peer: relay restarting (code 16)".into());
            let Next::WaitUntil(at) = link.failed(now, &f) else {
                panic!("gave up")
            };
            let d = at - now;
            assert!(d >= 100 * MS && d <= 200 * MS, "after {up_for:?} up: {d:?}");
            now = at;
        }
        // The restarted relay is not listening yet: the backoff starts over
        // (the connection before the announcement was stable).
        let d = fail_attempts(&mut link, &mut now, 1)[0];
        assert!(d >= 125 * MS && d <= 250 * MS, "{d:?}");
    }

    #[test]
    fn stop_is_final() {
        let mut link = Link::new(Backoff::default(), 1);
        let now = Instant::now();
        link.connected(now, admitted());
        link.stop();
        assert_eq!(link.state(), &LinkState::Stopped);
        assert_eq!(link.poll(now), Next::Done);
        assert_eq!(link.failed(now, &down()), Next::Done);
        assert_eq!(link.state(), &LinkState::Stopped);
    }

    /// The shell's loop against a relay that is down for 20 s, then up for
    /// good: attempts back off, are capped, and the first one after the
    /// relay returns connects.
    #[test]
    fn a_relay_down_for_a_while_is_rejoined_within_the_cap() {
        let mut link = Link::new(Backoff::default(), 21);
        let t0 = Instant::now();
        let back = t0 + 20 * SEC;
        let mut now = t0;
        let mut attempts = Vec::new();
        loop {
            match link.poll(now) {
                Next::Connect => {
                    attempts.push(now - t0);
                    if now >= back {
                        link.connected(now, admitted());
                    } else {
                        link.failed(now, &down());
                    }
                }
                Next::WaitUntil(at) => now = at,
                Next::Idle => break,
                Next::Done => panic!("gave up: {:?}", link.state()),
            }
        }
        let up = now - t0;
        assert!(up >= 20 * SEC && up <= 24 * SEC, "rejoined after {up:?}");
        let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g <= 4 * SEC), "{gaps:?}");
        assert!(attempts.len() < 15, "{} attempts in 20 s", attempts.len());
    }

    #[test]
    fn json_keeps_the_status_field_names() {
        let v = serde_json::to_value(LinkState::Connected(admitted())).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"state": "connected", "address": "203.0.113.1:443",
                "relay": "203.0.113.1:443", "name": "gpu1", "tags": ["worker"],
                "transport": "tcp"})
        );
        let r = LinkState::Retrying {
            attempt: 3,
            last_error: "timed out".into(),
            retry_in_ms: 500,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"state": "reconnecting", "attempt": 3, "error": "timed out",
                "retry_in_ms": 500})
        );
        let f = serde_json::to_value(LinkState::Failed {
            reason: "node revoked".into(),
        })
        .unwrap();
        assert_eq!(
            f,
            serde_json::json!({"state": "refused", "reason": "node revoked"})
        );
        for s in [
            LinkState::Connecting { attempt: 2 },
            LinkState::Connected(admitted()),
            r,
            LinkState::Failed { reason: "x".into() },
            LinkState::Stopped,
        ] {
            let back: LinkState =
                serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
            assert_eq!(back, s);
        }
        // What agents and nodes of the previous format send still reads.
        let old: LinkState = serde_json::from_str(r#"{"state":"connecting"}"#).unwrap();
        assert_eq!(old, LinkState::Connecting { attempt: 1 });
        let old: LinkState = serde_json::from_str(
            r#"{"state":"reconnecting","error":"timed out","retry_in_ms":250}"#,
        )
        .unwrap();
        assert!(matches!(old, LinkState::Retrying { attempt: 1, .. }));
        let old: LinkState = serde_json::from_str(
            r#"{"state":"connected","name":"w1","tags":[],"relay":"203.0.113.1:443"}"#,
        )
        .unwrap();
        assert!(
            matches!(old, LinkState::Connected(a) if a.address.port() == 443 && a.transport.is_none())
        );
        // A transport this build does not know reads as unknown.
        let new: LinkState = serde_json::from_str(
            r#"{"state":"connected","address":"203.0.113.1:443","transport":"carrier-pigeon"}"#,
        )
        .unwrap();
        assert!(matches!(new, LinkState::Connected(a) if a.transport.is_none()));
        assert!(serde_json::from_str::<LinkState>(r#"{"state":"connected"}"#).is_err());
    }
}
