//! Join tokens: `wft1_` + base64url(no padding) of
//! `[version=1][relay public key: 32][secret: 32][n: u8]{[len: u8][addr utf-8]}*n`.
//!
//! The relay stores only SHA-256 of the secret. The token pins the relay by
//! its X25519 key: a client trusts whatever relay proves that key in Noise.

use std::fmt;

use base64::Engine;
use thiserror::Error;

use crate::codec::{DecodeError, Format, Reader, Width, Writer};
use crate::key::PublicKey;
use crate::secret::Secret;

/// Prefix of every version-1 token.
pub const TOKEN_PREFIX: &str = "wft1_";

/// A join token string that cannot be parsed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Wrong prefix: not a Weft relay token or a version this build cannot read.
    #[error("not a Weft relay token (expected it to start with `wft1_`)")]
    BadPrefix,
    /// The base64 part is damaged.
    #[error("token is damaged (bad base64): copy it again")]
    BadBase64,
    /// The decoded body is malformed.
    #[error("token is damaged ({0}): copy it again")]
    BadBody(&'static str),
}

impl From<DecodeError> for TokenError {
    fn from(e: DecodeError) -> TokenError {
        TokenError::BadBody(match e {
            DecodeError::Truncated => "truncated",
            DecodeError::Trailing(_) => "trailing bytes",
            DecodeError::BadUtf8 => "address not UTF-8",
            _ => "malformed",
        })
    }
}

/// Most relay addresses in a token; each is at most 255 bytes.
const MAX_ADDRS: usize = 255;
/// u8 address lengths (longer addresses are left out, not cut).
const FORMAT: Format = Format {
    count: Width::U8,
    len: Width::U8,
};

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
    /// The token's text form. Addresses over 255 bytes are left out.
    pub fn encode(&self) -> String {
        let mut w = Writer::new(FORMAT);
        w.u8(1);
        w.key(&self.relay_key);
        w.bytes(self.secret.expose());
        let addrs: Vec<&String> = self
            .relay_addrs
            .iter()
            .filter(|a| a.len() <= 255)
            .take(MAX_ADDRS)
            .collect();
        w.u8(addrs.len() as u8);
        for a in addrs {
            w.str(a);
        }
        format!(
            "{TOKEN_PREFIX}{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(w.into_bytes())
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
        let mut r = Reader::new(&b, FORMAT);
        let version = r.u8().map_err(|_| TokenError::BadBody("empty"))?;
        if version != 1 {
            return Err(TokenError::BadBody("unknown version"));
        }
        let relay_key = r.key().map_err(|_| TokenError::BadBody("short key"))?;
        let secret = r
            .arr::<32>()
            .map_err(|_| TokenError::BadBody("short secret"))?;
        let n = r.u8().map_err(|_| TokenError::BadBody("no addresses"))?;
        let relay_addrs = (0..n).map(|_| r.str()).collect::<Result<Vec<_>, _>>()?;
        r.finish()?;
        Ok(Token {
            relay_addrs,
            relay_key,
            secret: Secret::new(secret),
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
