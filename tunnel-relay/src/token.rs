//! Join tokens: `wft1_` + base64url(no padding) of
//! `[version=1][relay public key: 32][secret: 32][n: u8]{[len: u8][addr utf-8]}*n`.
//!
//! The relay stores only SHA-256 of the secret. The token pins the relay by
//! its X25519 key: a client trusts whatever relay proves that key in Noise.

use std::fmt;

use base64::Engine;

use crate::error::TokenError;
use crate::keys::PublicKey;
use crate::secret::Secret;

/// Prefix of every version-1 token.
pub const TOKEN_PREFIX: &str = "wft1_";

/// A parsed join token. `Debug` masks the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Where the relay listens (`host:port`), in preference order.
    pub relay_addrs: Vec<String>,
    /// The relay's static X25519 key.
    pub relay_key: PublicKey,
    /// The secret whose hash the relay stored.
    pub secret: Secret,
}

impl Token {
    /// The token's text form.
    pub fn encode(&self) -> String {
        let mut b = vec![1u8];
        b.extend_from_slice(&self.relay_key.0);
        b.extend_from_slice(self.secret.expose());
        let addrs: Vec<&String> = self
            .relay_addrs
            .iter()
            .filter(|a| a.len() <= 255)
            .take(255)
            .collect();
        b.push(addrs.len() as u8);
        for a in addrs {
            b.push(a.len() as u8);
            b.extend_from_slice(a.as_bytes());
        }
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
        )
    }

    /// Parses a token string (surrounding whitespace ignored).
    pub fn parse(s: &str) -> Result<Token, TokenError> {
        let body = s
            .trim()
            .strip_prefix(TOKEN_PREFIX)
            .ok_or(TokenError::BadPrefix)?;
        let b = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| TokenError::BadBase64)?;
        let (&version, rest) = b.split_first().ok_or(TokenError::BadBody("empty"))?;
        if version != 1 {
            return Err(TokenError::BadBody("unknown version"));
        }
        let key = rest.get(..32).ok_or(TokenError::BadBody("short key"))?;
        let secret = rest
            .get(32..64)
            .ok_or(TokenError::BadBody("short secret"))?;
        let mut rest = rest.get(64..).ok_or(TokenError::BadBody("short"))?;
        let (&n, r) = rest
            .split_first()
            .ok_or(TokenError::BadBody("no addresses"))?;
        rest = r;
        let mut relay_addrs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (&len, r) = rest
                .split_first()
                .ok_or(TokenError::BadBody("truncated address"))?;
            let a = r
                .get(..len as usize)
                .ok_or(TokenError::BadBody("truncated address"))?;
            relay_addrs.push(
                String::from_utf8(a.to_vec())
                    .map_err(|_| TokenError::BadBody("address not UTF-8"))?,
            );
            rest = &r[len as usize..];
        }
        if !rest.is_empty() {
            return Err(TokenError::BadBody("trailing bytes"));
        }
        let mut s = [0u8; 32];
        s.copy_from_slice(secret);
        Ok(Token {
            relay_addrs,
            relay_key: PublicKey::from_slice(key).ok_or(TokenError::BadBody("short key"))?,
            secret: Secret::new(s),
        })
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("relay_addrs", &self.relay_addrs)
            .field("relay_key", &self.relay_key)
            .field("secret", &self.secret)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(key in any::<[u8; 32]>(), secret in any::<[u8; 32]>(),
                     addrs in prop::collection::vec("[a-z0-9.:\\[\\]]{1,40}", 0..4)) {
            let t = Token { relay_addrs: addrs, relay_key: PublicKey(key), secret: Secret::new(secret) };
            let s = t.encode();
            prop_assert!(s.starts_with(TOKEN_PREFIX));
            prop_assert!(s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
            prop_assert_eq!(Token::parse(&s), Ok(t));
        }

        #[test]
        fn garbage_never_panics(s in ".{0,200}", bytes in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = Token::parse(&s);
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
            let _ = Token::parse(&format!("{TOKEN_PREFIX}{b64}"));
        }
    }

    #[test]
    fn debug_masks_secret() {
        let t = Token {
            relay_addrs: vec!["203.0.113.2:4433".into()],
            relay_key: PublicKey([1; 32]),
            secret: Secret::new([0x5a; 32]),
        };
        let d = format!("{t:?}");
        assert!(
            d.contains("***") && !d.contains("5a5a") && !d.contains("90, 90"),
            "{d}"
        );
    }

    #[test]
    fn wrong_prefix_is_named() {
        assert_eq!(Token::parse("abc"), Err(TokenError::BadPrefix));
        assert_eq!(Token::parse("wft1_!!!"), Err(TokenError::BadBase64));
    }
}
