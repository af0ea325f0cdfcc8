//! The node and token registry: SQLite in the state directory (WAL mode, so
//! the operator's `token`/`nodes` commands work while `serve` runs).
//!
//! Tables: `nodes` (admitted identities: key, name, tags from the token,
//! revoked), `tokens` (hashes only), and `mesh_nodes`: the coordinator's
//! [`crate::coord::NodeRecord`] of every mesh node (overlay addresses, last
//! endpoints) as JSON, one row per node id, so a restarted relay gives every
//! node the same addresses.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use crate::admission::{check_token, TokenState};
use crate::coord::{self, NodeId};
use crate::error::StateError;
use crate::keys::PublicKey;
use crate::secret::Secret;
use crate::wire::{Reason, Rejection};

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
}

/// The registry database.
pub struct Registry {
    db: Connection,
    path: PathBuf,
}

/// One change to the persisted mesh records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeshWrite {
    /// Insert or replace this node's record.
    Upsert(coord::NodeRecord),
    /// Forget this node (removed from the mesh).
    Delete(NodeId),
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn opt_u64(v: Option<i64>) -> Option<u64> {
    v.map(|x| x.max(0) as u64)
}

impl Registry {
    /// Opens (creating) `DIR/registry.sqlite`.
    pub fn open(state_dir: &Path) -> Result<Registry, StateError> {
        crate::keys::create_private_dir(state_dir)?;
        let path = state_dir.join("registry.sqlite");
        let db = Connection::open(&path)?;
        // Token hashes and the node list are the operator's: owner only
        // (SQLite gives the -wal and -shm files the database's mode).
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StateError::io(&path, e))?;
        }
        db.busy_timeout(Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS nodes (
                key BLOB PRIMARY KEY,
                name TEXT NOT NULL UNIQUE,
                tags TEXT NOT NULL,
                first_seen INTEGER NOT NULL,
                last_seen INTEGER NOT NULL,
                revoked INTEGER NOT NULL DEFAULT 0,
                token_id TEXT
             );
             CREATE TABLE IF NOT EXISTS mesh_nodes (
                id INTEGER PRIMARY KEY,
                key BLOB NOT NULL UNIQUE,
                record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY,
                hash BLOB NOT NULL UNIQUE,
                tag TEXT NOT NULL,
                created INTEGER NOT NULL,
                expires_at INTEGER,
                uses_left INTEGER,
                revoked INTEGER NOT NULL DEFAULT 0
             );",
        )?;
        Ok(Registry { db, path })
    }

    /// Every persisted mesh node record, by id.
    pub fn mesh_records(&self) -> Result<Vec<coord::NodeRecord>, StateError> {
        let mut st = self
            .db
            .prepare("SELECT id, record FROM mesh_nodes ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, text) = row?;
            let rec: coord::NodeRecord =
                serde_json::from_str(&text).map_err(|e| StateError::BadFile {
                    path: self.path.clone(),
                    msg: format!("mesh_nodes row {id}: {e}"),
                })?;
            out.push(rec);
        }
        Ok(out)
    }

    /// Applies mesh record changes in order, in one transaction.
    pub fn save_mesh(&mut self, writes: &[MeshWrite]) -> Result<(), StateError> {
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for w in writes {
            match w {
                MeshWrite::Upsert(rec) => {
                    let text = serde_json::to_string(rec).map_err(|e| StateError::BadFile {
                        path: self.path.clone(),
                        msg: format!("mesh record of {}: {e}", rec.name),
                    })?;
                    // The key is unique: a row of an older id for it goes.
                    tx.execute(
                        "DELETE FROM mesh_nodes WHERE key = ?1 AND id != ?2",
                        params![&rec.key.0[..], rec.id.0 as i64],
                    )?;
                    tx.execute(
                        "INSERT OR REPLACE INTO mesh_nodes (id, key, record) VALUES (?1, ?2, ?3)",
                        params![rec.id.0 as i64, &rec.key.0[..], text],
                    )?;
                }
                MeshWrite::Delete(id) => {
                    tx.execute("DELETE FROM mesh_nodes WHERE id = ?1", params![id.0 as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Stores a new token's hash; returns the secret (shown once) and its id.
    pub fn create_token(
        &mut self,
        tag: &str,
        ttl: Option<Duration>,
        uses: Option<u64>,
        now: u64,
    ) -> Result<(Secret, String), StateError> {
        let secret = Secret::random();
        let hash = secret.hash();
        let id = Registry::token_id(&secret);
        let expires = ttl.map(|t| now.saturating_add(t.as_secs()) as i64);
        self.db.execute(
            "INSERT INTO tokens (id, hash, tag, created, expires_at, uses_left) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, &hash[..], tag, now as i64, expires, uses.map(|u| u as i64)],
        )?;
        Ok((secret, id))
    }

    /// A token's public id: the first 12 hex digits of its secret's hash.
    pub fn token_id(secret: &Secret) -> String {
        hex::encode(&secret.hash()[..6])
    }

    /// All tokens.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        let mut st = self
            .db
            .prepare("SELECT id, tag, created, expires_at, uses_left, revoked FROM tokens ORDER BY created, id")?;
        let rows = st.query_map([], |r| {
            Ok(TokenRecord {
                id: r.get(0)?,
                tag: r.get(1)?,
                created: r.get::<_, i64>(2)?.max(0) as u64,
                expires_at: opt_u64(r.get(3)?),
                uses_left: opt_u64(r.get(4)?),
                revoked: r.get::<_, i64>(5)? != 0,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Revokes a token by id (or unique id prefix).
    pub fn revoke_token(&mut self, id: &str) -> Result<String, StateError> {
        let ids: Vec<String> = self
            .list_tokens()?
            .into_iter()
            .map(|t| t.id)
            .filter(|t| t.starts_with(id))
            .collect();
        match ids.as_slice() {
            [one] => {
                self.db
                    .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", params![one])?;
                Ok(one.clone())
            }
            [] => Err(StateError::NotFound(format!(
                "no token with id {id:?} (see `token list`)"
            ))),
            _ => Err(StateError::NotFound(format!(
                "token id {id:?} is ambiguous; give more digits"
            ))),
        }
    }

    /// All nodes.
    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        let mut st = self.db.prepare(
            "SELECT name, key, tags, first_seen, last_seen, revoked FROM nodes ORDER BY name",
        )?;
        let rows = st.query_map([], |r| {
            let key: Vec<u8> = r.get(1)?;
            Ok(NodeRecord {
                name: r.get(0)?,
                key: PublicKey::from_slice(&key)
                    .map(|k| k.to_base64())
                    .unwrap_or_default(),
                tags: split_tags(&r.get::<_, String>(2)?),
                first_seen: r.get::<_, i64>(3)?.max(0) as u64,
                last_seen: r.get::<_, i64>(4)?.max(0) as u64,
                revoked: r.get::<_, i64>(5)? != 0,
                mesh_ipv4: None,
                mesh_ipv6: None,
            })
        })?;
        let mut nodes: Vec<NodeRecord> = rows.collect::<Result<_, _>>()?;
        let mesh: std::collections::HashMap<String, coord::NodeRecord> = self
            .mesh_records()?
            .into_iter()
            .map(|m| (m.key.to_base64(), m))
            .collect();
        for n in &mut nodes {
            if let Some(m) = mesh.get(&n.key) {
                n.mesh_ipv4 = Some(m.ipv4);
                n.mesh_ipv6 = Some(m.ipv6);
            }
        }
        Ok(nodes)
    }

    /// Revokes a node by name.
    pub fn revoke_node(&mut self, name: &str) -> Result<(), StateError> {
        let n = self.db.execute(
            "UPDATE nodes SET revoked = 1 WHERE name = ?1",
            params![name],
        )?;
        if n == 0 {
            return Err(StateError::NotFound(format!(
                "no node named {name:?} (see `nodes list`)"
            )));
        }
        Ok(())
    }

    /// Changes whenever another connection (e.g. `nodes revoke` in another
    /// process) commits to the database (SQLite's `PRAGMA data_version`).
    pub fn data_version(&self) -> Result<i64, StateError> {
        Ok(self.db.query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    /// Keys of every revoked node.
    pub fn revoked_keys(&self) -> Result<std::collections::HashSet<PublicKey>, StateError> {
        let mut st = self.db.prepare("SELECT key FROM nodes WHERE revoked = 1")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        let mut out = std::collections::HashSet::new();
        for k in rows {
            if let Ok(k) = <[u8; 32]>::try_from(k?.as_slice()) {
                out.insert(PublicKey(k));
            }
        }
        Ok(out)
    }

    /// Whether the node with this key is revoked (or unknown).
    pub fn is_revoked(&self, key: &PublicKey) -> Result<bool, StateError> {
        let r: Option<i64> = self
            .db
            .query_row(
                "SELECT revoked FROM nodes WHERE key = ?1",
                params![&key.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        Ok(r.is_none_or(|v| v != 0))
    }

    /// Whether `name` is usable as a node name: 1–64 of `[A-Za-z0-9._-]`,
    /// not starting with `-` or `.` (it becomes an ssh `Host` alias).
    pub fn valid_name(name: &str) -> bool {
        (1..=64).contains(&name.len())
            && !name.starts_with(['-', '.'])
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    }

    /// Admits a node: a known, unrevoked key is accepted (name updated if
    /// free); an unknown key needs a valid token secret, which is used once.
    /// Returns the registered name and tags, or the rejection to send.
    pub fn admit(
        &mut self,
        key: &PublicKey,
        name: &str,
        secret: Option<&Secret>,
        now: u64,
    ) -> Result<Result<(String, Vec<String>), Rejection>, StateError> {
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let known: Option<(String, String, i64)> = tx
            .query_row(
                "SELECT name, tags, revoked FROM nodes WHERE key = ?1",
                params![&key.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let name_owner: Option<Vec<u8>> = tx
            .query_row(
                "SELECT key FROM nodes WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        let name_free = name_owner.as_deref().is_none_or(|k| k == key.0);
        if !name.is_empty() && !Registry::valid_name(name) {
            return Ok(Err(Rejection::new(
                Reason::BadRequest,
                format!("name {name:?}: use 1-64 letters, digits, '.', '_' or '-'"),
            )));
        }
        if let Some((old_name, tags, revoked)) = known {
            if revoked != 0 {
                return Ok(Err(Rejection::new(
                    Reason::NodeRevoked,
                    format!("node {old_name:?}"),
                )));
            }
            let final_name = if name.is_empty() || name == old_name {
                old_name
            } else if name_free {
                name.to_string()
            } else {
                return Ok(Err(Rejection::new(
                    Reason::NameTaken,
                    format!("name {name:?}"),
                )));
            };
            tx.execute(
                "UPDATE nodes SET name = ?1, last_seen = ?2 WHERE key = ?3",
                params![final_name, now as i64, &key.0[..]],
            )?;
            tx.commit()?;
            return Ok(Ok((final_name, split_tags(&tags))));
        }
        let Some(secret) = secret else {
            return Ok(Err(Rejection::new(
                Reason::KeyUnknown,
                format!("key {} is not registered", key.short()),
            )));
        };
        let hash = secret.hash();
        type Row = (String, String, Option<i64>, Option<i64>, i64);
        let token: Option<Row> = tx
            .query_row(
                "SELECT id, tag, expires_at, uses_left, revoked FROM tokens WHERE hash = ?1",
                params![&hash[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()?;
        let Some((id, tag, expires_at, uses_left, revoked)) = token else {
            return Ok(Err(Rejection::new(Reason::TokenUnknown, "")));
        };
        let state = TokenState {
            expires_at: opt_u64(expires_at),
            uses_left: opt_u64(uses_left),
            revoked: revoked != 0,
        };
        if let Err(reason) = check_token(&state, now) {
            return Ok(Err(Rejection::new(reason, format!("token {id}"))));
        }
        if name.is_empty() {
            return Ok(Err(Rejection::new(
                Reason::BadRequest,
                "a name is required to join",
            )));
        }
        if !name_free {
            return Ok(Err(Rejection::new(
                Reason::NameTaken,
                format!("name {name:?}"),
            )));
        }
        tx.execute(
            "INSERT INTO nodes (key, name, tags, first_seen, last_seen, token_id) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
            params![&key.0[..], name, tag, now as i64, id],
        )?;
        tx.execute(
            "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left IS NOT NULL",
            params![id],
        )?;
        tx.commit()?;
        Ok(Ok((name.to_string(), vec![tag])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::StaticKey;

    fn reg() -> (tempfile::TempDir, Registry) {
        let Ok(dir) = tempfile::tempdir() else {
            panic!("tempdir")
        };
        let Ok(r) = Registry::open(dir.path()) else {
            panic!("open")
        };
        (dir, r)
    }

    fn admit(
        r: &mut Registry,
        k: &StaticKey,
        name: &str,
        s: Option<&Secret>,
        now: u64,
    ) -> Result<(String, Vec<String>), Reason> {
        match r.admit(&k.public(), name, s, now) {
            Ok(x) => x.map_err(|rej| rej.reason),
            Err(e) => panic!("db: {e}"),
        }
    }

    #[test]
    fn token_lifecycle() {
        let (_d, mut r) = reg();
        let Ok((secret, id)) =
            r.create_token("worker", Some(Duration::from_secs(60)), Some(2), 1000)
        else {
            panic!()
        };
        let (a, b, c) = (
            StaticKey::generate(),
            StaticKey::generate(),
            StaticKey::generate(),
        );
        assert_eq!(
            admit(&mut r, &a, "a", Some(&secret), 1001),
            Ok(("a".into(), vec!["worker".into()]))
        );
        // A known key needs no token afterwards.
        assert_eq!(
            admit(&mut r, &a, "a", None, 2000).map(|x| x.0),
            Ok("a".into())
        );
        assert_eq!(
            admit(&mut r, &b, "a", Some(&secret), 1002),
            Err(Reason::NameTaken)
        );
        assert_eq!(
            admit(&mut r, &b, "b", Some(&secret), 1002).map(|x| x.0),
            Ok("b".into())
        );
        assert_eq!(
            admit(&mut r, &c, "c", Some(&secret), 1003),
            Err(Reason::TokenUsedUp)
        );
        assert_eq!(admit(&mut r, &c, "c", None, 1003), Err(Reason::KeyUnknown));
        assert_eq!(
            admit(&mut r, &c, "c", Some(&Secret::random()), 1003),
            Err(Reason::TokenUnknown)
        );
        let Ok((s2, id2)) = r.create_token("engineer", Some(Duration::from_secs(10)), None, 1000)
        else {
            panic!()
        };
        assert_eq!(
            admit(&mut r, &c, "c", Some(&s2), 1010),
            Err(Reason::TokenExpired)
        );
        assert!(r.revoke_token(&id2).is_ok());
        assert_eq!(
            admit(&mut r, &c, "c", Some(&s2), 1005),
            Err(Reason::TokenRevoked)
        );
        let toks = r.list_tokens().unwrap_or_default();
        assert_eq!(
            toks.iter().find(|t| t.id == id).and_then(|t| t.uses_left),
            Some(0)
        );
        assert!(r.revoke_node("a").is_ok());
        assert_eq!(admit(&mut r, &a, "a", None, 3000), Err(Reason::NodeRevoked));
        assert_eq!(r.is_revoked(&a.public()).ok(), Some(true));
        assert_eq!(r.is_revoked(&b.public()).ok(), Some(false));
        let nodes = r.list_nodes().unwrap_or_default();
        assert_eq!(nodes.len(), 2);
        assert!(nodes.iter().all(|n| !n.key.is_empty()));
    }

    #[test]
    fn mesh_records_survive_reopen_and_follow_writes() {
        use crate::coord::{Candidate, CandidateKind};
        let (d, mut r) = reg();
        let rec = |id: u64, k: &StaticKey, name: &str| coord::NodeRecord {
            id: NodeId(id),
            key: k.public(),
            name: name.into(),
            tags: vec!["worker".into()],
            ipv4: std::net::Ipv4Addr::new(100, 64, 0, id as u8 + 1),
            ipv6: "fd7a:7765:6674::1"
                .parse()
                .unwrap_or(std::net::Ipv6Addr::LOCALHOST),
            endpoints: vec![Candidate {
                addr: "192.0.2.1:51820"
                    .parse()
                    .unwrap_or(([0, 0, 0, 0], 1).into()),
                kind: CandidateKind::Local,
            }],
        };
        let (a, b) = (StaticKey::generate(), StaticKey::generate());
        let (ra, rb) = (rec(1, &a, "a"), rec(2, &b, "b"));
        assert!(r
            .save_mesh(&[MeshWrite::Upsert(ra.clone()), MeshWrite::Upsert(rb.clone())])
            .is_ok());
        let mut ra2 = ra.clone();
        ra2.endpoints.clear();
        assert!(r
            .save_mesh(&[MeshWrite::Upsert(ra2.clone()), MeshWrite::Delete(NodeId(2))])
            .is_ok());
        drop(r);
        let Ok(r) = Registry::open(d.path()) else {
            panic!("reopen")
        };
        assert_eq!(r.mesh_records().ok(), Some(vec![ra2]));
    }

    #[test]
    fn names_must_be_ssh_host_aliases() {
        let (_d, mut r) = reg();
        let Ok((secret, _)) = r.create_token("worker", None, None, 1) else {
            panic!()
        };
        for bad in ["", "a b", "x\ny", "-x", ".x", &"a".repeat(65)] {
            let k = StaticKey::generate();
            assert!(admit(&mut r, &k, bad, Some(&secret), 2).is_err(), "{bad:?}");
        }
        let k = StaticKey::generate();
        assert!(admit(&mut r, &k, "gpu-1.lab_a", Some(&secret), 2).is_ok());
    }
}
