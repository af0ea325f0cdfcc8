//! The web view's logins and sessions: a pure core (time is passed in, randomness too).
//!
//! `weft web` asks the relay, over the node's authenticated relay connection, for a one-time
//! **link** bound to that identity and valid for [`LINK_TTL`]. Opening it turns it into a
//! **session**: a random cookie value and a CSRF token, valid for [`SESSION_TTL`] (or until
//! logged out, or until the node is revoked). Only SHA-256 hashes of links and cookies are
//! kept, so a memory dump leaks no usable secret; a used link is remembered until it would
//! have expired, so that reusing it says "already used", not "unknown".

use std::collections::HashMap;
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

use crate::keys::PublicKey;

/// How long a `weft web` link may wait to be opened.
pub(crate) const LINK_TTL: Duration = Duration::from_secs(60);
/// How long a browser session lasts.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions kept at most (the oldest goes first): bounds memory whatever happens.
pub(crate) const MAX_SESSIONS: usize = 10_000;

/// Who a link or a session is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Who {
    /// The node's name.
    pub(crate) name: String,
    /// Its key (revoking the node ends its sessions).
    pub(crate) key: PublicKey,
    /// Its tags (they decide what it sees).
    pub(crate) tags: Vec<String>,
}

/// A live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Session {
    /// Whose.
    pub(crate) who: Who,
    /// The token every state-changing request carries.
    pub(crate) csrf: String,
    /// When it ends.
    pub(crate) expires: Instant,
}

/// Why a link did not log in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LinkError {
    /// Older than [`LINK_TTL`].
    #[error("this login link has expired (links work for a minute); run `weft web` again")]
    Expired,
    /// Opened before.
    #[error("this login link was already used; run `weft web` again")]
    Used,
    /// Never issued (or forged).
    #[error("this login link is not valid; run `weft web` again")]
    Unknown,
}

type Hash = [u8; 32];

fn hash(token: &str) -> Hash {
    Sha256::digest(token.as_bytes()).into()
}

fn token(bytes: [u8; 32]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Links and sessions.
#[derive(Debug, Default)]
pub(crate) struct Sessions {
    links: HashMap<Hash, (Who, Instant)>,
    /// Links no longer usable, until when remembered: true when opened, false when they
    /// expired unopened.
    used: HashMap<Hash, (Instant, bool)>,
    sessions: HashMap<Hash, Session>,
}

impl Sessions {
    /// A new link's token for `who` (from 32 random bytes).
    pub(crate) fn mint_link(&mut self, who: Who, random: [u8; 32], now: Instant) -> String {
        self.prune(now);
        let t = token(random);
        self.links.insert(hash(&t), (who, now + LINK_TTL));
        t
    }

    /// Opens a link: the new session's cookie value and the session.
    pub(crate) fn redeem(
        &mut self,
        link: &str,
        random: [u8; 32],
        csrf: [u8; 32],
        now: Instant,
    ) -> Result<(String, Session), LinkError> {
        let h = hash(link);
        if let Some((_, opened)) = self.used.get(&h) {
            return Err(if *opened {
                LinkError::Used
            } else {
                LinkError::Expired
            });
        }
        let Some((who, until)) = self.links.remove(&h) else {
            return Err(LinkError::Unknown);
        };
        if now >= until {
            self.used.insert(h, (until, false));
            return Err(LinkError::Expired);
        }
        self.used.insert(h, (until, true));
        self.prune(now);
        if self.sessions.len() >= MAX_SESSIONS {
            if let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| *k)
            {
                self.sessions.remove(&oldest);
            }
        }
        let cookie = token(random);
        let s = Session {
            who,
            csrf: token(csrf),
            expires: now + SESSION_TTL,
        };
        self.sessions.insert(hash(&cookie), s.clone());
        Ok((cookie, s))
    }

    /// The session of this cookie value, while it lasts.
    pub(crate) fn check(&self, cookie: &str, now: Instant) -> Option<&Session> {
        self.sessions.get(&hash(cookie)).filter(|s| now < s.expires)
    }

    /// Ends the session of this cookie value (logout).
    pub(crate) fn end(&mut self, cookie: &str) -> bool {
        self.sessions.remove(&hash(cookie)).is_some()
    }

    /// Ends every session and link of these nodes (revoked): how many sessions ended.
    pub(crate) fn end_for(&mut self, keys: &std::collections::HashSet<PublicKey>) -> usize {
        self.links.retain(|_, (w, _)| !keys.contains(&w.key));
        let before = self.sessions.len();
        self.sessions.retain(|_, s| !keys.contains(&s.who.key));
        before - self.sessions.len()
    }

    fn prune(&mut self, now: Instant) {
        // An expired link is remembered a while as such ("expired", not "unknown").
        let expired: Vec<(Hash, Instant)> = self
            .links
            .iter()
            .filter(|(_, (_, until))| now >= *until)
            .map(|(h, (_, until))| (*h, *until))
            .collect();
        for (h, until) in expired {
            self.links.remove(&h);
            self.used.insert(h, (until, false));
        }
        // A used link is kept a little past its expiry, then forgotten ("unknown").
        self.used.retain(|_, (until, _)| now < *until + LINK_TTL);
        self.sessions.retain(|_, s| now < s.expires);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(n: u8) -> Who {
        Who {
            name: format!("alice{n}"),
            key: PublicKey([n; 32]),
            tags: vec!["engineer".into()],
        }
    }

    #[test]
    fn a_link_works_once_within_a_minute_and_gives_a_session() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let link = s.mint_link(who(1), [1; 32], t0);
        assert_eq!(link.len(), 43, "32 bytes of base64url");
        let (cookie, sess) = s
            .redeem(&link, [2; 32], [3; 32], t0 + Duration::from_secs(59))
            .expect("fresh link");
        assert_eq!(sess.who, who(1));
        assert_ne!(sess.csrf, cookie);
        let later = t0 + Duration::from_secs(120);
        assert_eq!(s.check(&cookie, later).map(|x| &x.who), Some(&who(1)));
        assert_eq!(
            s.redeem(&link, [4; 32], [5; 32], t0 + Duration::from_secs(60)),
            Err(LinkError::Used)
        );
        assert_eq!(
            s.redeem("forged", [4; 32], [5; 32], t0),
            Err(LinkError::Unknown)
        );
        // the session ends after SESSION_TTL, or at logout
        assert!(s
            .check(&cookie, t0 + SESSION_TTL + Duration::from_secs(60))
            .is_none());
        assert!(s.end(&cookie));
        assert!(s.check(&cookie, later).is_none());
        assert!(s.check("forged-cookie", later).is_none());
    }

    #[test]
    fn an_expired_link_is_refused_and_revoking_a_node_ends_its_sessions() {
        let t0 = Instant::now();
        let mut s = Sessions::default();
        let link = s.mint_link(who(1), [1; 32], t0);
        assert_eq!(
            s.redeem(&link, [2; 32], [3; 32], t0 + LINK_TTL),
            Err(LinkError::Expired)
        );
        let a = s.mint_link(who(1), [6; 32], t0);
        let b = s.mint_link(who(2), [7; 32], t0);
        let (ca, _) = s.redeem(&a, [8; 32], [9; 32], t0).expect("fresh");
        let (cb, _) = s.redeem(&b, [10; 32], [11; 32], t0).expect("fresh");
        let revoked = std::collections::HashSet::from([PublicKey([1; 32])]);
        assert_eq!(s.end_for(&revoked), 1);
        assert!(s.check(&ca, t0).is_none());
        assert!(s.check(&cb, t0).is_some());
    }
}
