//! The registry's records and its admission rule, shared by its two
//! backends (SQLite in `registry.rs`, PostgreSQL in `pg.rs`).

use std::path::PathBuf;

use serde::Serialize;

use crate::admission::{check_token, TokenState};
use crate::coord::{self, NodeId};
use crate::error::StateError;
use crate::keys::PublicKey;
use crate::wire::{Reason, Rejection};

/// Whether `name` is usable as a node name: 1–64 of `[A-Za-z0-9._-]`,
/// not starting with `-` or `.` (it becomes an ssh `Host` alias).
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRecord {
    /// Its name.
    pub name: String,
    /// Its public key (base64).
    pub key: String,
    /// Its tags.
    pub tags: Vec<String>,
    /// Unix seconds of the first join.
    pub first_seen: u64,
    /// Unix seconds of the last admission.
    pub last_seen: u64,
    /// Revoked by the operator.
    pub revoked: bool,
    /// Overlay IPv4 address, if the node joined the mesh.
    pub mesh_ipv4: Option<std::net::Ipv4Addr>,
    /// Overlay IPv6 address, if the node joined the mesh.
    pub mesh_ipv6: Option<std::net::Ipv6Addr>,
    /// In a fleet: the relay holding its mesh session now (its home).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// The provider account it belongs to: the owner of the token it joined with (a token
    /// made by a provider's "add device", or `token create --owner`); none: it is its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The name its owner or an operator gave it in the web view (its node name, ssh alias
    /// and DNS name stay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Joined with a provider's token on a relay with `approve_devices`, and not approved yet:
    /// refused (`awaiting_approval`) until an operator approves it.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

impl NodeRecord {
    /// The provider account it belongs to: its owner, else itself.
    pub fn account(&self) -> &str {
        self.owner.as_deref().unwrap_or(&self.name)
    }
}

/// A token as listed (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenRecord {
    /// Short id (first 12 hex digits of the secret's hash).
    pub id: String,
    /// Tag given to nodes joining with it.
    pub tag: String,
    /// Unix seconds of creation.
    pub created: u64,
    /// Unix seconds of expiry.
    pub expires_at: Option<u64>,
    /// Uses left.
    pub uses_left: Option<u64>,
    /// Revoked.
    pub revoked: bool,
    /// The provider account the nodes joining with it belong to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
}

/// One row of the fleet's change feed of mesh records (`Registry::mesh_changes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshChange {
    /// Position in the feed.
    pub seq: i64,
    /// The relay that wrote it.
    pub relay: String,
    /// The record (its id also for a deletion).
    pub rec: coord::NodeRecord,
    /// Whether its node held a session on that relay.
    pub online: bool,
    /// The node left the mesh.
    pub deleted: bool,
}

/// What the registry rows say about one admission: the known node of the
/// key (name, tags, revoked, pending approval), whether the asked-for name
/// belongs to another key, the token of the secret (id, tag, state, whether a
/// provider account owns it), and whether this relay holds providers'
/// machines for an operator's approval (`approve_devices`).
pub(crate) struct AdmitRows {
    pub known: Option<KnownRow>,
    pub name_free: bool,
    pub token: Option<(String, String, TokenState, bool)>,
    pub approval: Approval,
}

/// Which new nodes wait for an operator's approval (the relay's `approve_devices`): none;
/// those joining with a token a provider account owns (`true`: the web view's "Add a device",
/// `token create --owner`); or every new node, operators' tokens included (`"all"`, as
/// Tailscale's device approval: a leaked reusable token then admits nobody on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    #[default]
    Off,
    Providers,
    All,
}

impl Approval {
    /// Whether a new node joining with a token (owned by a provider account or not) waits.
    pub fn holds(self, provider_owned: bool) -> bool {
        match self {
            Approval::Off => false,
            Approval::Providers => provider_owned,
            Approval::All => true,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Approval::Off => "off",
            Approval::Providers => "providers",
            Approval::All => "all",
        }
    }
}

impl<'de> serde::Deserialize<'de> for Approval {
    /// `true` (providers' tokens), `false`, or one of `"off"`, `"providers"`, `"all"`.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Approval, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Word(String),
        }
        match Raw::deserialize(d)? {
            Raw::Flag(true) => Ok(Approval::Providers),
            Raw::Flag(false) => Ok(Approval::Off),
            Raw::Word(w) => match w.as_str() {
                "off" => Ok(Approval::Off),
                "providers" => Ok(Approval::Providers),
                "all" => Ok(Approval::All),
                other => Err(serde::de::Error::custom(format!(
                    "approve_devices = {other:?}: use true (providers' machines), \"all\" (every new node) or false"
                ))),
            },
        }
    }
}

/// A known node's row: name, tags, revoked, pending approval.
pub(crate) type KnownRow = (String, String, bool, bool);

/// What to write for an admission both backends decide alike.
pub(crate) enum AdmitWrite {
    /// A known node: its (possibly new) name and last_seen.
    Known { name: String, tags: Vec<String> },
    /// A known node that waits for an operator's approval: its last_seen (so the operator
    /// sees it still trying), then the refusal ([`awaiting_approval`]).
    Waiting { name: String },
    /// A new node from token `token_id` with `tag`; the token loses a use. A `pending` node
    /// is stored and then refused ([`awaiting_approval`]) until an operator approves it.
    New {
        token_id: String,
        tag: String,
        pending: bool,
    },
}

/// The refusal of a node that waits for an operator's approval.
pub(crate) fn awaiting_approval(name: &str) -> Rejection {
    Rejection::new(
        Reason::AwaitingApproval,
        format!(
            "node {name:?}: an operator approves it with `tunnel-relay nodes approve {name}` or \
             on its page in the web view; it keeps trying until then"
        ),
    )
}

/// The admission rule: a known, unrevoked key is accepted (name updated if
/// free); an unknown key needs a valid token, which is used once.
pub(crate) fn decide_admit(
    key: &PublicKey,
    name: &str,
    has_secret: bool,
    rows: AdmitRows,
    now: u64,
) -> Result<AdmitWrite, Rejection> {
    if !name.is_empty() && !valid_name(name) {
        return Err(Rejection::new(
            Reason::BadRequest,
            format!("name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"),
        ));
    }
    if let Some((old_name, tags, revoked, pending)) = rows.known {
        if revoked {
            return Err(Rejection::new(
                Reason::NodeRevoked,
                format!("node {old_name:?}"),
            ));
        }
        if pending {
            return Ok(AdmitWrite::Waiting { name: old_name });
        }
        let name = if name.is_empty() || name == old_name {
            old_name
        } else if rows.name_free {
            name.to_string()
        } else {
            return Err(Rejection::new(Reason::NameTaken, format!("name {name:?}")));
        };
        return Ok(AdmitWrite::Known {
            name,
            tags: split_tags(&tags),
        });
    }
    if !has_secret {
        return Err(Rejection::new(
            Reason::KeyUnknown,
            format!("key {} is not registered", key.short()),
        ));
    }
    let Some((id, tag, state, owned)) = rows.token else {
        return Err(Rejection::new(Reason::TokenUnknown, ""));
    };
    if let Err(reason) = check_token(&state, now) {
        return Err(Rejection::new(reason, format!("token {id}")));
    }
    if name.is_empty() {
        return Err(Rejection::new(
            Reason::BadRequest,
            "a name is required to join",
        ));
    }
    if !rows.name_free {
        return Err(Rejection::new(Reason::NameTaken, format!("name {name:?}")));
    }
    Ok(AdmitWrite::New {
        token_id: id,
        tag,
        pending: rows.approval.holds(owned),
    })
}

/// One change to the persisted mesh records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshWrite {
    /// Insert or replace this node's record; `online`: it holds a control
    /// session on this relay (what the other relays of a fleet show).
    Upsert(coord::NodeRecord, bool),
    /// Forget this node (removed from the mesh).
    Delete(NodeId),
}

pub(crate) fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

pub(crate) fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

/// A mesh record as stored (JSON).
pub(crate) fn mesh_record_json(store: &str, rec: &coord::NodeRecord) -> Result<String, StateError> {
    serde_json::to_string(rec).map_err(|e| StateError::BadFile {
        path: PathBuf::from(store),
        msg: format!("mesh record of {}: {e}", rec.name),
    })
}

/// A stored mesh record (row `id` of `store`, for the error).
pub(crate) fn parse_mesh_record(
    store: &str,
    id: i64,
    text: &str,
) -> Result<coord::NodeRecord, StateError> {
    serde_json::from_str(text).map_err(|e| StateError::BadFile {
        path: PathBuf::from(store),
        msg: format!("mesh_nodes row {id}: {e}"),
    })
}

/// A `nodes` row as listed (mesh addresses filled in by the caller).
pub(crate) fn node_record(
    name: String,
    key: &[u8],
    tags: &str,
    first_seen: i64,
    last_seen: i64,
    revoked: bool,
) -> NodeRecord {
    NodeRecord {
        name,
        key: PublicKey::from_slice(key)
            .map(|k| k.to_base64())
            .unwrap_or_default(),
        tags: split_tags(tags),
        first_seen: first_seen.max(0) as u64,
        last_seen: last_seen.max(0) as u64,
        revoked,
        mesh_ipv4: None,
        mesh_ipv6: None,
        home: None,
        owner: None,
        label: None,
        pending: false,
    }
}

/// A path report as the fleet's store keeps it: `KEY:1` (direct) or `KEY:0` (relayed) per
/// peer, base64 keys, comma-separated.
pub(crate) fn paths_text(paths: &[weft_proto::control::PeerPath]) -> String {
    paths
        .iter()
        .map(|p| format!("{}:{}", p.peer.to_base64(), u8::from(p.direct)))
        .collect::<Vec<_>>()
        .join(",")
}

/// [`paths_text`] read back; entries that do not parse are left out.
pub(crate) fn paths_of_text(text: &str) -> Vec<weft_proto::control::PeerPath> {
    text.split(',')
        .filter_map(|e| {
            let (k, d) = e.split_once(':')?;
            Some(weft_proto::control::PeerPath {
                peer: PublicKey::from_base64(k).ok()?,
                direct: match d {
                    "1" => true,
                    "0" => false,
                    _ => return None,
                },
            })
        })
        .collect()
}

#[cfg(test)]
mod path_text_tests {
    use super::*;
    use weft_proto::control::PeerPath;

    #[test]
    fn path_reports_round_trip_through_the_store_text() {
        let k = |b: u8| PublicKey([b; 32]);
        let ps = vec![
            PeerPath {
                peer: k(1),
                direct: true,
            },
            PeerPath {
                peer: k(2),
                direct: false,
            },
        ];
        assert_eq!(paths_of_text(&paths_text(&ps)), ps);
        assert!(paths_of_text("").is_empty());
        // Garbage is left out, the rest kept.
        let text = format!("{},nonsense:1,{}:7", paths_text(&ps[..1]), k(3).to_base64());
        assert_eq!(paths_of_text(&text), ps[..1]);
    }
}
