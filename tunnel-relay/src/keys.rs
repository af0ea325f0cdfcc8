//! X25519 static identities (Noise IK keys), kept in a 0600 file. The public
//! half is the one [`weft_proto::PublicKey`].

use std::fmt;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine;
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

use crate::error::StateError;

pub use weft_proto::PublicKey;

/// A static private key. `Debug` prints only the public half.
#[derive(Clone)]
pub struct StaticKey {
    private: [u8; 32],
    public: PublicKey,
}

impl StaticKey {
    /// A fresh random key.
    pub fn generate() -> StaticKey {
        StaticKey::from_private(rand::random())
    }

    /// From private key bytes.
    pub fn from_private(private: [u8; 32]) -> StaticKey {
        let s = StaticSecret::from(private);
        let public = PublicKey(XPublic::from(&s).to_bytes());
        StaticKey {
            private: s.to_bytes(),
            public,
        }
    }

    /// The public half.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private bytes: for the Noise handshake, and for the mesh node,
    /// whose WireGuard and disco key is this same identity (one key per node,
    /// so the coordinator's node key is the WireGuard peer key).
    pub fn private_bytes(&self) -> &[u8; 32] {
        &self.private
    }

    /// Loads the key from `path` (base64 of the private key), or creates it
    /// with mode 0600 if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<StaticKey, StateError> {
        Ok(StaticKey::from_private(secret_or_create(path)?))
    }

    /// Loads an existing key; `Ok(None)` if the file does not exist.
    pub fn load(path: &Path) -> Result<Option<StaticKey>, StateError> {
        if !path.exists() {
            return Ok(None);
        }
        StaticKey::load_or_create(path).map(Some)
    }
}

impl fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StaticKey(public {}, private ***)", self.public.short())
    }
}

/// The 32 secret bytes kept (base64) in `path`, or fresh random ones written there with mode
/// 0600 if the file does not exist. A file readable by others is used, with a warning.
fn secret_or_create(path: &Path) -> Result<[u8; 32], StateError> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text.trim())
                .map_err(|_| StateError::BadKeyFile(path.to_path_buf()))?;
            let secret = <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| StateError::BadKeyFile(path.to_path_buf()))?;
            let mode = fs::metadata(path)
                .map_err(|e| StateError::io(path, e))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                tracing::warn!(path = %path.display(), mode = format!("{mode:o}"), "key file readable by others; chmod 600 it");
            }
            Ok(secret)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secret: [u8; 32] = rand::random();
            write_private(
                path,
                &base64::engine::general_purpose::STANDARD.encode(secret),
            )?;
            Ok(secret)
        }
        Err(e) => Err(StateError::io(path, e)),
    }
}

/// The file name of the Ed25519 key that signs usage records, in a state dir: a worker's
/// agent signs its records with it, a relay countersigns the records it stores.
pub const USAGE_KEY_FILE: &str = "usage-signing.key";

/// The usage-signing key kept in `path` (base64 of its seed, 0600), created on first use.
pub fn usage_key(path: &Path) -> Result<weft_proto::usage::Signer, StateError> {
    Ok(weft_proto::usage::Signer::from_seed(&secret_or_create(
        path,
    )?))
}

/// Writes a file readable only by its owner (created 0600, written via a temp file).
pub fn write_private(path: &Path, contents: &str) -> Result<(), StateError> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| StateError::io(&tmp, e))?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| StateError::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| StateError::io(path, e))?;
    Ok(())
}

/// Creates a state directory (and its parents) readable by its owner only:
/// it holds identity keys and, on the relay, the token registry.
pub fn create_private_dir(dir: &Path) -> Result<(), StateError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StateError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_file_is_0600_and_reloads() {
        let dir = tempfile::tempdir().map_err(|e| e.to_string());
        let Ok(dir) = dir else { panic!("tempdir") };
        let p = dir.path().join("identity.key");
        let k1 = StaticKey::load_or_create(&p).map_err(|e| e.to_string());
        let k2 = StaticKey::load_or_create(&p).map_err(|e| e.to_string());
        assert_eq!(k1.map(|k| k.public()), k2.map(|k| k.public()));
        let mode = fs::metadata(&p).map(|m| m.permissions().mode() & 0o777);
        assert_eq!(mode.ok(), Some(0o600));
    }

    #[test]
    fn debug_hides_private() {
        let k = StaticKey::from_private([7; 32]);
        let d = format!("{k:?}");
        assert!(d.contains("***") && !d.contains("0707"), "{d}");
    }
}
