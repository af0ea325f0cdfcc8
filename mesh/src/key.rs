//! WireGuard keys: Curve25519 private/public keys and preshared keys.
//!
//! The public key is the one [`weft_proto::PublicKey`] (the node's WireGuard,
//! disco and relay identity); private and preshared keys live here.
//!
//! Keys are 32 bytes. Configuration files carry them as standard base64
//! (44 characters with one `=` of padding); the UAPI carries them as
//! lowercase hex (64 characters). Secret keys never print their bytes in
//! `Debug` output.

use std::fmt;

use rand::RngCore as _;

pub use weft_proto::key::{KeyError, PublicKey, KEY_LEN};

/// A secret key type: the key forms of [`weft_proto::key_forms`] and a
/// `Debug` that never shows the bytes.
macro_rules! secret_key {
    ($name:ident) => {
        weft_proto::key_forms!($name);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }
    };
}

/// 32 bytes from the OS RNG.
fn random_bytes() -> [u8; KEY_LEN] {
    let mut bytes = [0u8; KEY_LEN];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

/// A Curve25519 private key. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKey([u8; KEY_LEN]);
secret_key!(PrivateKey);

impl PrivateKey {
    /// Generates a fresh, clamped private key from the OS RNG.
    pub fn generate() -> Self {
        let mut bytes = random_bytes();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        Self(bytes)
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        let public = boringtun::x25519::PublicKey::from(&self.to_static_secret());
        PublicKey::from_bytes(public.to_bytes())
    }

    /// The key as boringtun's x25519 secret.
    pub fn to_static_secret(&self) -> boringtun::x25519::StaticSecret {
        boringtun::x25519::StaticSecret::from(self.0)
    }
}

/// The key as boringtun's x25519 public key.
pub fn to_x25519(k: &PublicKey) -> boringtun::x25519::PublicKey {
    boringtun::x25519::PublicKey::from(k.0)
}

/// A symmetric preshared key. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct PresharedKey([u8; KEY_LEN]);
secret_key!(PresharedKey);

impl PresharedKey {
    /// Generates a fresh random preshared key from the OS RNG.
    pub fn generate() -> Self {
        Self(random_bytes())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // RFC 7748 section 6.1 test vector (Alice).
    const ALICE_PRIV_HEX: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const ALICE_PUB_HEX: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    #[test]
    fn public_key_matches_rfc7748() {
        let k = PrivateKey::from_hex(ALICE_PRIV_HEX).unwrap();
        assert_eq!(k.public_key().to_hex(), ALICE_PUB_HEX);
    }

    #[test]
    fn base64_roundtrip() {
        let k = PrivateKey::generate();
        let b = k.to_base64();
        assert_eq!(b.len(), 44);
        assert_eq!(PrivateKey::from_base64(&b).unwrap(), k);
        let p = k.public_key();
        assert_eq!(PublicKey::from_base64(&p.to_base64()).unwrap(), p);
        let psk = PresharedKey::generate();
        assert_eq!(PresharedKey::from_base64(&psk.to_base64()).unwrap(), psk);
    }

    #[test]
    fn hex_roundtrip_lowercase() {
        let p = PrivateKey::generate().public_key();
        let h = p.to_hex();
        assert_eq!(h.len(), 64);
        assert_eq!(h, h.to_lowercase());
        assert_eq!(PublicKey::from_hex(&h).unwrap(), p);
        assert_eq!(PublicKey::from_hex(&h.to_uppercase()).unwrap(), p);
    }

    #[test]
    fn bad_base64() {
        let e = PublicKey::from_base64("not base64!!").unwrap_err();
        assert!(matches!(e, KeyError::Base64(_)), "{e}");
        assert!(e.to_string().contains("invalid base64"));
    }

    #[test]
    fn wrong_length_base64() {
        let e = PublicKey::from_base64("AAAA").unwrap_err();
        assert_eq!(e, KeyError::Length(3));
        assert_eq!(e.to_string(), "key must be exactly 32 bytes, got 3 bytes");
    }

    #[test]
    fn wrong_length_hex() {
        assert_eq!(
            PublicKey::from_hex("abcd").unwrap_err(),
            KeyError::Length(2)
        );
        assert!(matches!(
            PublicKey::from_hex(&"g".repeat(64)).unwrap_err(),
            KeyError::Hex(_)
        ));
        assert!(matches!(
            PublicKey::from_hex("abc").unwrap_err(),
            KeyError::Hex(_)
        ));
    }

    #[test]
    fn debug_redacts_secrets() {
        let k = PrivateKey::generate();
        let d = format!("{k:?}");
        assert_eq!(d, "PrivateKey(<redacted>)");
        assert!(!d.contains(&k.to_base64()));
        let psk = PresharedKey::generate();
        assert_eq!(format!("{psk:?}"), "PresharedKey(<redacted>)");
    }

    #[test]
    fn public_display_and_short() {
        let p = PrivateKey::generate().public_key();
        assert_eq!(p.to_string(), p.to_base64());
        assert_eq!(format!("{p:?}"), format!("PublicKey({})", p.short()));
        assert_eq!(p.short(), p.to_hex()[..8]);
    }

    #[test]
    fn generate_is_clamped_and_distinct() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0xc0, 0x40);
    }

    #[test]
    fn x25519_conversions() {
        let k = PrivateKey::generate();
        let p = k.public_key();
        assert_eq!(to_x25519(&p).as_bytes(), p.as_bytes());
        assert_eq!(
            boringtun::x25519::PublicKey::from(&k.to_static_secret()).to_bytes(),
            *p.as_bytes()
        );
    }
}
