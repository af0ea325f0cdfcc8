//! Secret material whose `Debug` prints nothing: join-token secrets and
//! static private keys. Logging one of these can never leak it.

use std::fmt;

use sha2::{Digest, Sha256};

/// A 32-byte secret (a join token's secret). `Debug` prints `Secret(***)`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

impl Secret {
    /// Wraps bytes.
    pub fn new(bytes: [u8; 32]) -> Secret {
        Secret(bytes)
    }

    /// A fresh random secret.
    pub fn random() -> Secret {
        Secret(rand::random())
    }

    /// The bytes, for the wire and for hashing only.
    pub fn expose(&self) -> &[u8; 32] {
        &self.0
    }

    /// SHA-256 of the secret: what the relay stores.
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.0).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_hides_bytes() {
        let s = Secret::new([0xab; 32]);
        let d = format!("{s:?}");
        assert!(!d.contains("ab") && !d.contains("171"), "{d}");
    }

    #[test]
    fn hash_differs_from_secret() {
        let s = Secret::random();
        assert_ne!(&s.hash(), s.expose());
    }
}
