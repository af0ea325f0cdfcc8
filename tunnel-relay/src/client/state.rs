//! A node's identity and relay in its state directory, and the engineer's
//! `login` (the first join with a token).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::home::FleetView;
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

/// How long a network where TCP/TLS won the race is remembered as one:
/// within it, a new connection races TCP/TLS without QUIC's head start.
pub(crate) const NETWORK_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// The networks where QUIC did not answer and TCP/TLS won the race, by the
/// local address that reaches the relay, with when (unix seconds)
/// (`networks.json`; no secrets). A pure record: [`Networks::tcp_first`]
/// decides, the shell reads and writes the file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Networks {
    /// Local address → when TCP/TLS last won there.
    pub(crate) tcp_won: BTreeMap<String, u64>,
}

impl Networks {
    /// Whether a connection from `local` should race TCP/TLS at once.
    pub(crate) fn tcp_first(&self, local: IpAddr, now_unix: u64) -> bool {
        self.tcp_won
            .get(&local.to_string())
            .is_some_and(|at| now_unix.saturating_sub(*at) < NETWORK_MEMORY.as_secs())
    }

    /// Records which transport won from `local`; whether the record changed.
    pub(crate) fn note(&mut self, local: IpAddr, tcp: bool, now_unix: u64) -> bool {
        let key = local.to_string();
        let before = self.tcp_won.clone();
        self.tcp_won
            .retain(|_, at| now_unix.saturating_sub(*at) < NETWORK_MEMORY.as_secs());
        if tcp {
            // Rewritten at most hourly: engineers connect often.
            let fresh = self
                .tcp_won
                .get(&key)
                .is_some_and(|at| now_unix.saturating_sub(*at) < 3600);
            if !fresh {
                self.tcp_won.insert(key, now_unix);
            }
        } else {
            self.tcp_won.remove(&key);
        }
        self.tcp_won != before
    }
}

/// A node's identity and relay, kept in a state directory:
/// `identity.key` (0600), `relay.json` and `networks.json`.
#[derive(Debug)]
pub struct ClientState {
    dir: PathBuf,
    pub(super) key: StaticKey,
    relay: Option<RelayInfo>,
    networks: Networks,
    fleet: FleetView,
    /// Every measurement, for a status to show (`watch_fleet`).
    fleet_tx: tokio::sync::watch::Sender<FleetView>,
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
        // A hint only: a damaged file is ignored (and replaced on the next race).
        let np = dir.join("networks.json");
        let networks = std::fs::read_to_string(&np)
            .ok()
            .and_then(|t| match serde_json::from_str(&t) {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::debug!(path = %np.display(), error = %e, "ignoring a damaged networks.json");
                    None
                }
            })
            .unwrap_or_default();
        // A hint too: a damaged file is measured again.
        let fleet: FleetView = std::fs::read_to_string(dir.join("fleet.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let (fleet_tx, _) = tokio::sync::watch::channel(fleet.clone());
        Ok(ClientState {
            dir: dir.to_path_buf(),
            key,
            relay,
            networks,
            fleet,
            fleet_tx,
        })
    }

    /// Whether TCP/TLS won the last race from the network with local
    /// address `local` (within [`NETWORK_MEMORY`]).
    pub(super) fn tcp_first(&self, local: IpAddr) -> bool {
        self.networks.tcp_first(local, unix_now())
    }

    /// Remembers which transport won from `local`. Best effort: a state
    /// directory that cannot be written only costs the next race its hint.
    pub(super) fn note_transport(&mut self, local: IpAddr, tcp: bool) {
        if !self.networks.note(local, tcp, unix_now()) {
            return;
        }
        let path = self.dir.join("networks.json");
        let written = serde_json::to_string_pretty(&self.networks)
            .map_err(|e| e.to_string())
            .and_then(|t| write_private(&path, &t).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "could not remember the network's transport");
        }
    }

    /// What this node measured of its fleet (empty before the first
    /// measurement, and for a relay alone).
    pub fn fleet(&self) -> &FleetView {
        &self.fleet
    }

    /// Sees every measurement of the fleet (the one held now first).
    pub fn watch_fleet(&self) -> tokio::sync::watch::Receiver<FleetView> {
        self.fleet_tx.subscribe()
    }

    /// Records a measurement of the fleet (`fleet.json`) and puts the
    /// relays' addresses in order of preference in `relay.json`: the home
    /// first, the others by latency, then any other address known (the
    /// token's names). Best effort, as [`ClientState::remember_fleet`].
    pub(crate) fn note_fleet(&mut self, view: FleetView) {
        let path = self.dir.join("fleet.json");
        let written = serde_json::to_string_pretty(&view)
            .map_err(|e| e.to_string())
            .and_then(|t| write_private(&path, &t).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "could not remember the fleet");
        }
        let first = view.preferred_addrs();
        self.fleet_tx.send_replace(view.clone());
        self.fleet = view;
        self.order_relays(first, &[]);
    }

    /// Puts `first` at the head of the remembered relay addresses, then the
    /// others known, then `more`; saves `relay.json` if the order changed.
    fn order_relays(&mut self, mut addrs: Vec<String>, more: &[String]) {
        let Some(info) = self.relay.as_mut() else {
            return;
        };
        for a in info.addrs.iter().chain(more) {
            if !addrs.contains(a) {
                addrs.push(a.clone());
            }
        }
        if addrs == info.addrs {
            return;
        }
        info.addrs = addrs;
        self.save_relay();
    }

    fn save_relay(&self) {
        let Some(info) = &self.relay else { return };
        let path = self.dir.join("relay.json");
        let written = serde_json::to_string_pretty(info)
            .map_err(|e| e.to_string())
            .and_then(|t| write_private(&path, &t).map_err(|e| e.to_string()));
        if let Err(e) = written {
            tracing::debug!(path = %path.display(), error = %e, "could not remember the fleet's relays");
        }
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

    /// After an admission through `used`: it goes first in the remembered
    /// addresses (the next connection tries it first), followed by the
    /// others known and the fleet's relays `fleet` announced. Best effort:
    /// a state directory that cannot be written only loses the ordering.
    pub(super) fn remember_fleet(&mut self, used: &str, fleet: &[String]) {
        self.order_relays(vec![used.to_string()], fleet);
    }

    pub(super) fn relay_target(
        &self,
        token: Option<&Token>,
    ) -> Result<(Vec<String>, PublicKey), StateError> {
        if let Some(t) = token {
            // The token's relays, and those of the same network the node
            // learnt since (its fleet), the last one that admitted it first.
            let mut addrs = Vec::new();
            if let Some(info) = self
                .relay
                .as_ref()
                .filter(|i| i.key == t.relay_key.to_base64())
            {
                addrs.extend(info.addrs.iter().cloned());
            }
            for a in &t.relay_addrs {
                if !addrs.contains(a) {
                    addrs.push(a.clone());
                }
            }
            return Ok((addrs, t.relay_key));
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

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    // In a fleet: measure the relays now, so the engineer's connections go
    // to the nearest from the first one.
    if !s.relays.is_empty() {
        if let Err(e) = super::home::measure_fleet(&mut state, &s.view()).await {
            tracing::debug!(error = %e, "could not measure the fleet at login");
        }
    }
    let out = (s.name.clone(), s.tags.clone());
    s.close().await;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_network_where_tcp_won_races_tcp_at_once_for_a_day() {
        let home: IpAddr = "192.168.1.20".parse().unwrap_or_else(|_| unreachable!());
        let cafe: IpAddr = "10.9.0.7".parse().unwrap_or_else(|_| unreachable!());
        let mut n = Networks::default();
        assert!(!n.tcp_first(cafe, 1_000));
        assert!(n.note(cafe, true, 1_000), "first TCP win is recorded");
        assert!(n.tcp_first(cafe, 1_000 + 3_600));
        assert!(
            !n.tcp_first(home, 1_000),
            "other networks keep QUIC's head start"
        );
        assert!(!n.note(cafe, true, 1_500), "not rewritten within the hour");
        assert!(n.note(cafe, true, 1_000 + 7_200), "refreshed after an hour");
        let day = NETWORK_MEMORY.as_secs();
        assert!(
            !n.tcp_first(cafe, 1_000 + 7_200 + day),
            "forgotten after a day"
        );
        // QUIC winning there again forgets it at once.
        assert!(n.note(cafe, false, 10_000));
        assert!(!n.tcp_first(cafe, 10_000));
        assert!(!n.note(cafe, false, 10_001), "nothing to forget twice");
        // Old entries of other networks are dropped when anything is noted.
        n.note(home, true, 20_000);
        n.note(cafe, true, 20_000 + day + 1);
        assert_eq!(n.tcp_won.len(), 1);
        let text = serde_json::to_string(&n).unwrap_or_default();
        assert_eq!(serde_json::from_str::<Networks>(&text).ok(), Some(n));
    }
}
