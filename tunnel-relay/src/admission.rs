//! Pure admission logic: token validity at a given time, the one
//! [`TokenBucket`] every peer-triggered rate limit uses, and the per-source
//! connection rate limiter built on it. No clock, no I/O: callers pass `now`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::wire::Reason;

/// What the registry knows about a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenState {
    /// Unix seconds after which it is expired (`None`: never).
    pub expires_at: Option<u64>,
    /// Uses left (`None`: unlimited).
    pub uses_left: Option<u64>,
    /// Revoked by the operator.
    pub revoked: bool,
}

/// Whether a token may be used at unix time `now`; the reason if not.
/// Revocation wins over expiry, expiry over use count.
pub fn check_token(t: &TokenState, now: u64) -> Result<(), Reason> {
    if t.revoked {
        return Err(Reason::TokenRevoked);
    }
    if t.expires_at.is_some_and(|e| now >= e) {
        return Err(Reason::TokenExpired);
    }
    if t.uses_left == Some(0) {
        return Err(Reason::TokenUsedUp);
    }
    Ok(())
}

/// One token bucket: `per_sec` tokens a second, up to `burst`; starts full.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`.
    pub fn new(per_sec: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            per_sec,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token at `now`; false if none is left.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Token buckets per source IP: `rate` new connections per second, burst `rate`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl RateLimiter {
    /// A limiter allowing `per_sec` per IP.
    pub fn new(per_sec: u32) -> RateLimiter {
        RateLimiter {
            rate: f64::from(per_sec.max(1)),
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `ip` at `now`; false if the IP is over its rate.
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.buckets.len() > 65_536 {
            self.prune(now);
        }
        let rate = self.rate;
        self.buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::new(rate, rate, now))
            .take(now)
    }

    /// Forgets IPs whose bucket has been full for a while.
    pub fn prune(&mut self, now: Instant) {
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.last) < Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_reasons() {
        let ok = TokenState {
            expires_at: Some(100),
            uses_left: Some(1),
            revoked: false,
        };
        assert_eq!(check_token(&ok, 99), Ok(()));
        assert_eq!(check_token(&ok, 100), Err(Reason::TokenExpired));
        let used = TokenState {
            uses_left: Some(0),
            ..ok.clone()
        };
        assert_eq!(check_token(&used, 50), Err(Reason::TokenUsedUp));
        let revoked = TokenState {
            revoked: true,
            ..used
        };
        assert_eq!(check_token(&revoked, 500), Err(Reason::TokenRevoked));
        let forever = TokenState {
            expires_at: None,
            uses_left: None,
            revoked: false,
        };
        assert_eq!(check_token(&forever, u64::MAX), Ok(()));
    }

    #[test]
    fn rate_limiter_refills_over_time() {
        let mut r = RateLimiter::new(3);
        let t0 = Instant::now();
        let ip: IpAddr = [203, 0, 113, 9].into();
        let other: IpAddr = [203, 0, 113, 10].into();
        assert!((0..3).all(|_| r.allow(ip, t0)));
        assert!(!r.allow(ip, t0));
        assert!(r.allow(other, t0), "buckets are per IP");
        assert!(!r.allow(ip, t0 + Duration::from_millis(100)));
        assert!(r.allow(ip, t0 + Duration::from_millis(500)));
    }

    #[test]
    fn a_bucket_gives_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(2.0, 5.0, t0);
        assert_eq!((0..100).filter(|_| b.take(t0)).count(), 5);
        // Ten seconds of a flood every 10 ms: 2 a second, never more.
        let later = (1..=1000).filter(|i| b.take(t0 + Duration::from_millis(10 * i)));
        assert_eq!(later.count(), 20);
        // Idle for a minute: full again, but no more than the burst.
        let t1 = t0 + Duration::from_secs(70);
        assert_eq!((0..100).filter(|_| b.take(t1)).count(), 5);
    }
}
