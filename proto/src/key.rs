//! The one public-key type of Weft: a node's X25519 key, which is at once its
//! WireGuard peer key, its disco key and its Noise identity on the relay.
//!
//! Configs and `wg` print keys as standard base64 (44 characters); the UAPI
//! as lowercase hex (64); logs and default node names use [`PublicKey::short`]
//! (the first 8 hex digits). Private keys live with their users (`mesh` for
//! WireGuard, `tunnel-relay` for the identity file): nothing here is secret.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

/// Length in bytes of every key.
pub const KEY_LEN: usize = 32;

/// Why a key string could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    /// The string is not valid standard base64.
    #[error("invalid base64 key: {0} (expected 44 characters of standard base64)")]
    Base64(String),
    /// The string is not valid hex.
    #[error("invalid hex key: {0} (expected 64 lowercase hex digits)")]
    Hex(String),
    /// The string decoded, but not to 32 bytes.
    #[error("key must be exactly 32 bytes, got {0} bytes")]
    Length(usize),
}

/// Decodes 32 bytes of standard base64 (surrounding whitespace ignored).
pub fn decode_base64(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let bytes = STANDARD
        .decode(s.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// Decodes 32 bytes of hex (either case; surrounding whitespace ignored).
pub fn decode_hex(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let s = s.trim();
    if s.len() != 2 * KEY_LEN && s.len() % 2 == 0 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KeyError::Length(s.len() / 2));
    }
    let mut out = [0u8; KEY_LEN];
    hex::decode_to_slice(s, &mut out).map_err(|e| KeyError::Hex(e.to_string()))?;
    Ok(out)
}

/// Standard base64 of a key (44 characters).
pub fn encode_base64(b: &[u8; KEY_LEN]) -> String {
    STANDARD.encode(b)
}

/// Lowercase hex of a key (64 characters).
pub fn encode_hex(b: &[u8; KEY_LEN]) -> String {
    hex::encode(b)
}

/// The byte and text forms of a 32-byte key type (a tuple struct of
/// `[u8; KEY_LEN]`): raw bytes, standard base64 (wg-quick configs, tokens,
/// JSON; `wg` prints keys so), hex (the UAPI) and the all-zero test. Written
/// once for [`PublicKey`] and `mesh`'s private and preshared keys.
#[macro_export]
macro_rules! key_forms {
    ($name:ident) => {
        impl $name {
            /// Builds the key from raw bytes.
            pub const fn from_bytes(bytes: [u8; $crate::key::KEY_LEN]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes.
            pub const fn as_bytes(&self) -> &[u8; $crate::key::KEY_LEN] {
                &self.0
            }

            /// Decodes standard base64 (surrounding whitespace ignored).
            pub fn from_base64(s: &str) -> Result<Self, $crate::key::KeyError> {
                $crate::key::decode_base64(s).map(Self)
            }

            /// Encodes as standard base64 (44 characters).
            pub fn to_base64(&self) -> String {
                $crate::key::encode_base64(&self.0)
            }

            /// Decodes hex (as in the UAPI; upper case is accepted too).
            pub fn from_hex(s: &str) -> Result<Self, $crate::key::KeyError> {
                $crate::key::decode_hex(s).map(Self)
            }

            /// Encodes as lowercase hex (64 characters), as the UAPI expects.
            pub fn to_hex(&self) -> String {
                $crate::key::encode_hex(&self.0)
            }

            /// Whether every byte is zero (the UAPI's "remove this key").
            pub fn is_zero(&self) -> bool {
                self.0 == [0u8; $crate::key::KEY_LEN]
            }
        }
    };
}

/// A Curve25519 public key. `Display` shows base64, `Debug` the short form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);
key_forms!(PublicKey);

impl PublicKey {
    /// From a slice of exactly 32 bytes.
    pub fn from_slice(b: &[u8]) -> Option<PublicKey> {
        <[u8; KEY_LEN]>::try_from(b).ok().map(PublicKey)
    }
    /// The first 8 hex digits: for logs and default node names.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.short())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// serde as base64 (`#[serde(with = "weft_proto::key::base64_serde")]`).
pub mod base64_serde {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::PublicKey;

    /// Serializes as base64.
    pub fn serialize<S: Serializer>(k: &PublicKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&k.to_base64())
    }

    /// Deserializes from base64.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PublicKey, D::Error> {
        let s = String::deserialize(d)?;
        PublicKey::from_base64(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_strings_say_what() {
        assert!(PublicKey::from_base64("not base64!!")
            .map_err(|e| e.to_string())
            .is_err_and(|e| e.contains("invalid base64")));
        assert_eq!(PublicKey::from_base64("AAAA"), Err(KeyError::Length(3)));
        assert_eq!(PublicKey::from_hex("abcd"), Err(KeyError::Length(2)));
        assert!(matches!(
            PublicKey::from_hex(&"g".repeat(64)),
            Err(KeyError::Hex(_))
        ));
        assert!(matches!(PublicKey::from_hex("abc"), Err(KeyError::Hex(_))));
    }

    proptest! {
        #[test]
        fn encodings_roundtrip(b in any::<[u8; 32]>()) {
            let k = PublicKey(b);
            prop_assert_eq!(PublicKey::from_base64(&k.to_base64()), Ok(k));
            prop_assert_eq!(PublicKey::from_hex(&k.to_hex()), Ok(k));
            prop_assert_eq!(PublicKey::from_hex(&k.to_hex().to_uppercase()), Ok(k));
            prop_assert_eq!(k.to_string(), k.to_base64());
            prop_assert_eq!(k.short(), k.to_hex()[..8].to_string());
        }
    }
}
