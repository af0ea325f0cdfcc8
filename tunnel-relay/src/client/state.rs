//! A node's identity and relay in its state directory, and the engineer's
//! `login` (the first join with a token).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::session::{connect, ClientTiming};
use crate::error::{ClientError, StateError};
use crate::keys::{write_private, PublicKey, StaticKey};
use crate::token::Token;

/// What a client remembers about its relay (`relay.json`; no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayInfo {
    /// Relay addresses (`host:port`).
    pub addrs: Vec<String>,
    /// The relay's public key, base64.
    pub key: String,
}

/// A node's identity and relay, kept in a state directory:
/// `identity.key` (0600) and `relay.json`.
#[derive(Debug)]
pub struct ClientState {
    dir: PathBuf,
    pub(super) key: StaticKey,
    relay: Option<RelayInfo>,
}

impl ClientState {
    /// Opens the state directory, creating the identity if needed.
    pub fn open(dir: &Path) -> Result<ClientState, StateError> {
        crate::keys::create_private_dir(dir)?;
        let key = StaticKey::load_or_create(&dir.join("identity.key"))?;
        let rp = dir.join("relay.json");
        let relay = match std::fs::read_to_string(&rp) {
            Ok(t) => Some(serde_json::from_str(&t).map_err(|e| StateError::BadFile {
                path: rp.clone(),
                msg: e.to_string(),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StateError::io(&rp, e)),
        };
        Ok(ClientState {
            dir: dir.to_path_buf(),
            key,
            relay,
        })
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// The remembered relay, if any.
    pub fn relay(&self) -> Option<&RelayInfo> {
        self.relay.as_ref()
    }

    pub(super) fn remember(&mut self, token: &Token) -> Result<(), StateError> {
        let info = RelayInfo {
            addrs: token.relay_addrs.clone(),
            key: token.relay_key.to_base64(),
        };
        let text = serde_json::to_string_pretty(&info).map_err(|e| StateError::BadFile {
            path: self.dir.join("relay.json"),
            msg: e.to_string(),
        })?;
        write_private(&self.dir.join("relay.json"), &text)?;
        self.relay = Some(info);
        Ok(())
    }

    pub(super) fn relay_target(
        &self,
        token: Option<&Token>,
    ) -> Result<(Vec<String>, PublicKey), StateError> {
        if let Some(t) = token {
            return Ok((t.relay_addrs.clone(), t.relay_key));
        }
        let info = self
            .relay
            .as_ref()
            .ok_or_else(|| StateError::NotJoined(self.dir.clone()))?;
        let bad = || StateError::BadFile {
            path: self.dir.join("relay.json"),
            msg: "relay key is not base64 of 32 bytes".into(),
        };
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&info.key)
            .map_err(|_| bad())?;
        Ok((
            info.addrs.clone(),
            PublicKey::from_slice(&bytes).ok_or_else(bad)?,
        ))
    }
}

/// The engineer's default identity directory: `$XDG_CONFIG_HOME/weft`, else
/// `~/.config/weft` (what `tunnel-relay login` uses without `--state-dir`).
pub fn default_state_dir() -> Result<PathBuf, ClientError> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("weft"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        ClientError::Usage("neither XDG_CONFIG_HOME nor HOME is set; pass --state-dir".into())
    })?;
    Ok(PathBuf::from(home).join(".config/weft"))
}

/// Engineer: logs in with a token (first join) and remembers the relay.
pub async fn login(
    state_dir: &Path,
    token: &Token,
    name: &str,
) -> Result<(String, Vec<String>), ClientError> {
    let mut state = ClientState::open(state_dir)?;
    let s = connect(
        &mut state,
        Some(token),
        name,
        Vec::new(),
        &ClientTiming::engineer(),
    )
    .await?;
    let out = (s.name.clone(), s.tags.clone());
    s.close().await;
    Ok(out)
}
