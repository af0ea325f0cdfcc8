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

use crate::admission::TokenState;
use crate::coord;
use crate::error::StateError;
use crate::keys::PublicKey;
use crate::records::{
    decide_admit, mesh_record_json, node_record, opt_u64, parse_mesh_record, AdmitRows, AdmitWrite,
};
pub use crate::records::{MeshChange, MeshWrite, NodeRecord, TokenRecord};
use crate::secret::Secret;
use crate::wire::Rejection;

/// Unix seconds now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The registry database: SQLite in the state directory (one relay), or
/// PostgreSQL shared by a fleet of relays ([`crate::pg`]).
pub struct Registry {
    backend: Backend,
}

enum Backend {
    Sqlite(Sqlite),
    Pg(crate::pg::PgRegistry),
}

/// The SQLite registry.
struct Sqlite {
    db: Connection,
    path: PathBuf,
}

/// Where the registry lives: `serve --store`, `store` in the config.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Store {
    /// `registry.sqlite` in the state directory (the default).
    #[default]
    Sqlite,
    /// A PostgreSQL database (`postgres://` or `postgresql://` URL) shared by
    /// every relay of a fleet.
    Postgres(String),
}

impl Store {
    /// Parses `sqlite` or a `postgres://`/`postgresql://` URL.
    pub fn parse(s: &str) -> Result<Store, String> {
        let s = s.trim();
        if s.is_empty() || s == "sqlite" {
            return Ok(Store::Sqlite);
        }
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            return s
                .parse::<postgres::Config>()
                .map(|_| Store::Postgres(s.to_string()))
                .map_err(|e| format!("store URL {}: {e}", crate::pg::redact(s)));
        }
        Err(format!(
            "store {:?}: use `sqlite` or a postgres://USER@HOST/DB URL",
            crate::pg::redact(s)
        ))
    }

    /// The store as it may be printed (no password).
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite => "sqlite (registry.sqlite in the state directory)".into(),
            Store::Postgres(url) => crate::pg::redact(url),
        }
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Registry")
    }
}

impl Registry {
    /// Opens (creating) `DIR/registry.sqlite`.
    pub fn open(state_dir: &Path) -> Result<Registry, StateError> {
        Ok(Registry {
            backend: Backend::Sqlite(Sqlite::open(state_dir)?),
        })
    }

    /// Opens the registry in `store`: SQLite in `state_dir`, or PostgreSQL
    /// (connecting, and migrating its schema). `relay` names this relay in
    /// the mesh records it writes to a shared store.
    pub fn open_store(
        state_dir: &Path,
        store: &Store,
        relay: &str,
    ) -> Result<Registry, StateError> {
        match store {
            Store::Sqlite => Registry::open(state_dir),
            Store::Postgres(url) => Ok(Registry {
                backend: Backend::Pg(crate::pg::PgRegistry::connect(url, relay)?),
            }),
        }
    }

    /// A relay's main registry: as [`Registry::open_store`], with
    /// [`crate::pg::MAIN_CONNECTIONS`] store connections on PostgreSQL.
    pub fn open_main(state_dir: &Path, store: &Store, relay: &str) -> Result<Registry, StateError> {
        match store {
            Store::Sqlite => Registry::open(state_dir),
            Store::Postgres(url) => Ok(Registry {
                backend: Backend::Pg(crate::pg::PgRegistry::connect_pool(
                    url,
                    relay,
                    crate::pg::MAIN_CONNECTIONS,
                )?),
            }),
        }
    }

    /// The async handle of a PostgreSQL registry (None on SQLite).
    pub fn pg_handle(&self) -> Option<crate::pg::PgHandle> {
        match &self.backend {
            Backend::Pg(p) => Some(p.handle()),
            Backend::Sqlite(_) => None,
        }
    }

    /// Whether other relays share this registry (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Pg(_))
    }

    /// Every persisted mesh node record, by id (not deleted ones).
    pub fn mesh_records(&self) -> Result<Vec<coord::NodeRecord>, StateError> {
        match &self.backend {
            Backend::Sqlite(s) => s.mesh_records(),
            Backend::Pg(p) => Ok(p
                .mesh_changes(0)?
                .into_iter()
                .filter(|c| !c.deleted)
                .map(|c| c.rec)
                .collect()),
        }
    }

    /// Mesh records written after feed position `after` (a shared store;
    /// empty for SQLite), in feed order, deletions included.
    pub fn mesh_changes(&self, after: i64) -> Result<Vec<MeshChange>, StateError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Pg(p) => p.mesh_changes(after),
        }
    }

    /// Applies mesh record changes in order, in one transaction.
    pub fn save_mesh(&mut self, writes: &[MeshWrite]) -> Result<(), StateError> {
        match &mut self.backend {
            Backend::Sqlite(s) => s.save_mesh(writes),
            Backend::Pg(p) => p.save_mesh(writes),
        }
    }

    /// Marks every record this relay wrote offline (a relay starting: its
    /// sessions of a previous life are gone).
    pub fn mesh_offline_mine(&mut self) -> Result<(), StateError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Pg(p) => p.offline_mine(),
        }
    }

    /// Keeps node `key`'s path report for the fleet (none: its session here ended);
    /// nothing for SQLite (one relay: the web view has its own reports).
    pub fn save_paths(
        &mut self,
        key: &PublicKey,
        paths: Option<&[weft_proto::control::PeerPath]>,
    ) -> Result<(), StateError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Pg(p) => p.save_paths(key.0.to_vec(), paths.map(crate::records::paths_text)),
        }
    }

    /// The path reports the fleet's other relays hold: (node, its relay, its paths).
    pub fn fleet_paths(
        &self,
    ) -> Result<Vec<(PublicKey, String, Vec<weft_proto::control::PeerPath>)>, StateError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Pg(p) => Ok(p
                .fleet_paths()?
                .into_iter()
                .filter_map(|(k, relay, text)| {
                    Some((
                        PublicKey::from_slice(&k)?,
                        relay,
                        crate::records::paths_of_text(&text),
                    ))
                })
                .collect()),
        }
    }

    /// A fleet relay's heartbeat; returns every relay of the fleet (none
    /// for SQLite: one relay).
    pub fn beat(
        &mut self,
        region: &str,
        addrs: &[String],
        stun_port: u16,
    ) -> Result<Vec<crate::pg::RelayRow>, StateError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Pg(p) => p.beat(region, addrs, stun_port),
        }
    }

    /// A fleet relay leaves before it stops (no-op for SQLite).
    pub fn leave(&mut self) -> Result<(), StateError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Pg(p) => p.leave(),
        }
    }

    /// Records that worker `name`'s tunnel session (connection `conn`) is on
    /// this relay, for the fleet's other relays (no-op for SQLite).
    pub fn set_tunnel_home(
        &mut self,
        name: &str,
        conn: u64,
        services: &[String],
        tags: &[String],
    ) -> Result<(), StateError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Pg(p) => p.set_tunnel_home(name, conn, services, tags),
        }
    }

    /// Workers whose tunnel session is on another live relay (none for SQLite).
    pub fn remote_workers(&self) -> Result<Vec<crate::pg::RemoteWorker>, StateError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Pg(p) => p.remote_workers(),
        }
    }

    /// That session ended.
    pub fn clear_tunnel_home(&mut self, name: &str, conn: u64) -> Result<(), StateError> {
        match &mut self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Pg(p) => p.clear_tunnel_home(name, conn),
        }
    }

    /// The live relay holding worker `name`'s tunnel session (None for SQLite).
    pub fn tunnel_home(&self, name: &str) -> Result<Option<crate::pg::RelayRow>, StateError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Pg(p) => p.tunnel_home(name),
        }
    }

    /// The fleet's relays (none for SQLite).
    pub fn relays(&self) -> Result<Vec<crate::pg::RelayRow>, StateError> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Pg(p) => p.relays(),
        }
    }

    /// Stores a new token's hash; returns the secret (shown once) and its id.
    pub fn create_token(
        &mut self,
        tag: &str,
        ttl: Option<Duration>,
        uses: Option<u64>,
        now: u64,
    ) -> Result<(Secret, String), StateError> {
        self.create_owned_token(tag, ttl, uses, now, None)
    }

    /// [`Registry::create_token`] for provider account `owner`: the nodes that join with it
    /// belong to that account ([`NodeRecord::owner`]).
    pub fn create_owned_token(
        &mut self,
        tag: &str,
        ttl: Option<Duration>,
        uses: Option<u64>,
        now: u64,
        owner: Option<&str>,
    ) -> Result<(Secret, String), StateError> {
        let secret = Secret::random();
        let id = Registry::token_id(&secret);
        let expires = ttl.map(|t| now.saturating_add(t.as_secs()) as i64);
        let uses = uses.map(|u| u as i64);
        match &mut self.backend {
            Backend::Sqlite(s) => {
                s.insert_token(&id, &secret.hash(), tag, now, (expires, uses), owner)?
            }
            Backend::Pg(p) => {
                p.insert_token(&id, &secret.hash(), tag, now, (expires, uses), owner)?
            }
        }
        Ok((secret, id))
    }

    /// A token's public id: the first 12 hex digits of its secret's hash.
    pub fn token_id(secret: &Secret) -> String {
        hex::encode(&secret.hash()[..6])
    }

    /// All tokens.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        match &self.backend {
            Backend::Sqlite(s) => s.list_tokens(),
            Backend::Pg(p) => p.list_tokens(),
        }
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
                match &mut self.backend {
                    Backend::Sqlite(s) => s.revoke_token(one)?,
                    Backend::Pg(p) => p.revoke_token(one)?,
                }
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

    /// All nodes, with their overlay addresses when they joined the mesh.
    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        let mut nodes = match &self.backend {
            Backend::Sqlite(s) => s.list_nodes()?,
            Backend::Pg(p) => p.list_nodes()?,
        };
        let mesh: std::collections::HashMap<String, coord::NodeRecord> = self
            .mesh_records()?
            .into_iter()
            .map(|m| (m.key.to_base64(), m))
            .collect();
        let homes: std::collections::HashMap<String, String> = match &self.backend {
            Backend::Sqlite(_) => Default::default(),
            Backend::Pg(p) => p
                .mesh_homes()?
                .into_iter()
                .map(|(k, relay)| (k.to_base64(), relay))
                .collect(),
        };
        for n in &mut nodes {
            if let Some(m) = mesh.get(&n.key) {
                n.mesh_ipv4 = Some(m.ipv4);
                n.mesh_ipv6 = Some(m.ipv6);
            }
            n.home = homes.get(&n.key).cloned();
        }
        Ok(nodes)
    }

    /// Gives node `name` the label `label` (none: its name again). False when no node has
    /// that name.
    pub fn set_label(&mut self, name: &str, label: Option<&str>) -> Result<bool, StateError> {
        match &mut self.backend {
            Backend::Sqlite(s) => Ok(s.db.execute(
                "UPDATE nodes SET label = ?1 WHERE name = ?2",
                params![label, name],
            )? > 0),
            Backend::Pg(p) => p.set_label(name, label),
        }
    }

    /// Approves node `name`, which waits for it (joined with a provider's token on a relay
    /// with `approve_devices`): it is admitted at its next try. False when it was not waiting.
    pub fn approve_node(&mut self, name: &str) -> Result<bool, StateError> {
        let done =
            match &mut self.backend {
                Backend::Sqlite(s) => s.db.execute(
                    "UPDATE nodes SET pending = 0 WHERE name = ?1 AND pending != 0 AND revoked = 0",
                    params![name],
                )? > 0,
                Backend::Pg(p) => p.approve_node(name)?,
            };
        if !done && !self.list_nodes()?.iter().any(|n| n.name == name) {
            return Err(StateError::NotFound(format!(
                "no node named {name:?} (see `nodes list`)"
            )));
        }
        Ok(done)
    }

    /// Revokes a node by name.
    pub fn revoke_node(&mut self, name: &str) -> Result<(), StateError> {
        let found = match &mut self.backend {
            Backend::Sqlite(s) => s.revoke_node(name)?,
            Backend::Pg(p) => p.revoke_node(name)?,
        };
        if !found {
            return Err(StateError::NotFound(format!(
                "no node named {name:?} (see `nodes list`)"
            )));
        }
        Ok(())
    }

    /// Changes whenever another connection (e.g. `nodes revoke` in another
    /// process, or another relay of the fleet) commits a change: SQLite's
    /// `PRAGMA data_version`; for PostgreSQL, the count of change
    /// notifications (and reconnects) seen.
    pub fn data_version(&self) -> Result<i64, StateError> {
        match &self.backend {
            Backend::Sqlite(s) => Ok(s.db.query_row("PRAGMA data_version", [], |r| r.get(0))?),
            Backend::Pg(p) => Ok(p.data_version()),
        }
    }

    /// A number that moves whenever what [`Registry::list_nodes`] answers may have changed:
    /// SQLite's `data_version` (other connections' commits) plus this connection's own
    /// changes. `None` for PostgreSQL, whose admissions other relays write without a
    /// notification: callers there look again on a timer.
    pub fn web_gen(&self) -> Option<u64> {
        match &self.backend {
            Backend::Sqlite(s) => {
                let dv = self.data_version().ok()? as u64;
                Some(dv.wrapping_add(s.db.total_changes()))
            }
            Backend::Pg(_) => None,
        }
    }

    /// Wakes when another relay or an operator command changes the shared
    /// store (PostgreSQL's LISTEN/NOTIFY); `None` for SQLite (poll
    /// [`Registry::data_version`]).
    pub fn changes(&self) -> Option<tokio::sync::watch::Receiver<i64>> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Pg(p) => Some(p.changes()),
        }
    }

    /// Keys of every revoked node.
    pub fn revoked_keys(&self) -> Result<std::collections::HashSet<PublicKey>, StateError> {
        let keys = match &self.backend {
            Backend::Sqlite(s) => s.revoked_keys()?,
            Backend::Pg(p) => p.revoked_keys()?,
        };
        Ok(keys
            .into_iter()
            .filter_map(|k| <[u8; 32]>::try_from(k.as_slice()).ok().map(PublicKey))
            .collect())
    }

    /// Whether the node with this key is revoked (or unknown).
    pub fn is_revoked(&self, key: &PublicKey) -> Result<bool, StateError> {
        let r = match &self.backend {
            Backend::Sqlite(s) => s.revoked_flag(key)?,
            Backend::Pg(p) => p.revoked_flag(key)?,
        };
        Ok(r.is_none_or(|v| v))
    }

    /// Whether `name` is usable as a node name: 1–64 of `[A-Za-z0-9._-]`,
    /// not starting with `-` or `.` (it becomes an ssh `Host` alias).
    pub fn valid_name(name: &str) -> bool {
        crate::records::valid_name(name)
    }

    /// Admits a node: a known, unrevoked, approved key is accepted (name updated if
    /// free); an unknown key needs a valid token secret, which is used once. With
    /// `approval` (the relay's `approve_devices`), a node joining with a token a provider
    /// account owns is stored pending and refused until an operator approves it
    /// ([`Registry::approve_node`]). Returns the registered name and tags, or the rejection
    /// to send.
    pub fn admit(
        &mut self,
        key: &PublicKey,
        name: &str,
        secret: Option<&Secret>,
        now: u64,
        approval: crate::records::Approval,
    ) -> Result<Result<(String, Vec<String>), Rejection>, StateError> {
        match &mut self.backend {
            Backend::Sqlite(s) => s.admit(key, name, secret, now, approval),
            Backend::Pg(p) => p.admit(key, name, secret, now, approval),
        }
    }
}

impl Sqlite {
    fn open(state_dir: &Path) -> Result<Sqlite, StateError> {
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
        // Added columns (older registries lack them): a token's provider account, a node's
        // label.
        // A node's approval: 1 while it waits for an operator's.
        for (table, column, kind) in [
            ("tokens", "owner", "TEXT"),
            ("nodes", "label", "TEXT"),
            ("nodes", "pending", "INTEGER NOT NULL DEFAULT 0"),
        ] {
            let has: i64 = db.query_row(
                &format!("SELECT count(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                params![column],
                |r| r.get(0),
            )?;
            if has == 0 {
                db.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
            }
        }
        Ok(Sqlite { db, path })
    }

    fn mesh_records(&self) -> Result<Vec<coord::NodeRecord>, StateError> {
        let mut st = self
            .db
            .prepare("SELECT id, record FROM mesh_nodes ORDER BY id")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, text) = row?;
            out.push(parse_mesh_record(
                &self.path.display().to_string(),
                id,
                &text,
            )?);
        }
        Ok(out)
    }

    fn save_mesh(&mut self, writes: &[MeshWrite]) -> Result<(), StateError> {
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        for w in writes {
            match w {
                MeshWrite::Upsert(rec, _) => {
                    let text = mesh_record_json(&self.path.display().to_string(), rec)?;
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

    fn insert_token(
        &mut self,
        id: &str,
        hash: &[u8],
        tag: &str,
        now: u64,
        (expires, uses): (Option<i64>, Option<i64>),
        owner: Option<&str>,
    ) -> Result<(), StateError> {
        self.db.execute(
            "INSERT INTO tokens (id, hash, tag, created, expires_at, uses_left, owner) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![id, hash, tag, now as i64, expires, uses, owner],
        )?;
        Ok(())
    }

    fn list_tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        let mut st = self
            .db
            .prepare("SELECT id, tag, created, expires_at, uses_left, revoked, owner FROM tokens ORDER BY created, id")?;
        let rows = st.query_map([], |r| {
            Ok(TokenRecord {
                id: r.get(0)?,
                tag: r.get(1)?,
                created: r.get::<_, i64>(2)?.max(0) as u64,
                expires_at: opt_u64(r.get(3)?),
                uses_left: opt_u64(r.get(4)?),
                revoked: r.get::<_, i64>(5)? != 0,
                owner: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_token(&mut self, id: &str) -> Result<(), StateError> {
        self.db
            .execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", params![id])?;
        Ok(())
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        let mut st = self.db.prepare_cached(
            "SELECT n.name, n.key, n.tags, n.first_seen, n.last_seen, n.revoked, n.label, t.owner, n.pending
             FROM nodes n LEFT JOIN tokens t ON t.id = n.token_id ORDER BY n.name",
        )?;
        let rows = st.query_map([], |r| {
            let key: Vec<u8> = r.get(1)?;
            let mut n = node_record(
                r.get(0)?,
                &key,
                &r.get::<_, String>(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get::<_, i64>(5)? != 0,
            );
            n.label = r.get(6)?;
            n.owner = r.get(7)?;
            n.pending = r.get::<_, i64>(8)? != 0;
            Ok(n)
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// False when no node has that name.
    fn revoke_node(&mut self, name: &str) -> Result<bool, StateError> {
        let n = self.db.execute(
            "UPDATE nodes SET revoked = 1 WHERE name = ?1",
            params![name],
        )?;
        Ok(n > 0)
    }

    fn revoked_keys(&self) -> Result<Vec<Vec<u8>>, StateError> {
        let mut st = self.db.prepare("SELECT key FROM nodes WHERE revoked = 1")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoked_flag(&self, key: &PublicKey) -> Result<Option<bool>, StateError> {
        let r: Option<i64> = self
            .db
            .query_row(
                "SELECT revoked FROM nodes WHERE key = ?1",
                params![&key.0[..]],
                |r| r.get(0),
            )
            .optional()?;
        Ok(r.map(|v| v != 0))
    }

    fn admit(
        &mut self,
        key: &PublicKey,
        name: &str,
        secret: Option<&Secret>,
        now: u64,
        approval: crate::records::Approval,
    ) -> Result<Result<(String, Vec<String>), Rejection>, StateError> {
        let tx = self
            .db
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let known: Option<(String, String, i64, i64)> = tx
            .query_row(
                "SELECT name, tags, revoked, pending FROM nodes WHERE key = ?1",
                params![&key.0[..]],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .optional()?;
        let name_owner: Option<Vec<u8>> = tx
            .query_row(
                "SELECT key FROM nodes WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()?;
        type Row = (
            String,
            String,
            Option<i64>,
            Option<i64>,
            i64,
            Option<String>,
        );
        let token: Option<Row> = match (&known, secret) {
            (None, Some(secret)) => tx
                .query_row(
                    "SELECT id, tag, expires_at, uses_left, revoked, owner FROM tokens WHERE hash = ?1",
                    params![&secret.hash()[..]],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .optional()?,
            _ => None,
        };
        let rows = AdmitRows {
            known: known.map(|(n, t, r, p)| (n, t, r != 0, p != 0)),
            name_free: name_owner.as_deref().is_none_or(|k| k == key.0),
            token: token.map(|(id, tag, expires_at, uses_left, revoked, owner)| {
                let state = TokenState {
                    expires_at: opt_u64(expires_at),
                    uses_left: opt_u64(uses_left),
                    revoked: revoked != 0,
                };
                (id, tag, state, owner.is_some())
            }),
            approval,
        };
        match decide_admit(key, name, secret.is_some(), rows, now) {
            Err(rej) => Ok(Err(rej)),
            Ok(AdmitWrite::Known { name, tags }) => {
                tx.execute(
                    "UPDATE nodes SET name = ?1, last_seen = ?2 WHERE key = ?3",
                    params![name, now as i64, &key.0[..]],
                )?;
                tx.commit()?;
                Ok(Ok((name, tags)))
            }
            Ok(AdmitWrite::Waiting { name }) => {
                tx.execute(
                    "UPDATE nodes SET last_seen = ?1 WHERE key = ?2",
                    params![now as i64, &key.0[..]],
                )?;
                tx.commit()?;
                Ok(Err(crate::records::awaiting_approval(&name)))
            }
            Ok(AdmitWrite::New {
                token_id,
                tag,
                pending,
            }) => {
                tx.execute(
                    "INSERT INTO nodes (key, name, tags, first_seen, last_seen, token_id, pending) VALUES (?1, ?2, ?3, ?4, ?4, ?5, ?6)",
                    params![&key.0[..], name, tag, now as i64, token_id, pending as i64],
                )?;
                tx.execute(
                    "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1 AND uses_left IS NOT NULL",
                    params![token_id],
                )?;
                tx.commit()?;
                if pending {
                    return Ok(Err(crate::records::awaiting_approval(name)));
                }
                Ok(Ok((name.to_string(), vec![tag])))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::NodeId;
    use crate::keys::StaticKey;
    use crate::records::Approval;
    use crate::wire::Reason;

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
        match r.admit(&k.public(), name, s, now, Approval::Off) {
            Ok(x) => x.map_err(|rej| rej.reason),
            Err(e) => panic!("db: {e}"),
        }
    }

    #[test]
    fn a_providers_new_machine_waits_for_an_operators_approval() {
        let (d, mut r) = reg();
        let Ok((owned, _)) = r.create_owned_token("worker", None, Some(1), 1000, Some("gpu1"))
        else {
            panic!()
        };
        let Ok((plain, _)) = r.create_token("worker", None, None, 1000) else {
            panic!()
        };
        let approving = |r: &mut Registry, k: &StaticKey, name: &str, s: Option<&Secret>| match r
            .admit(&k.public(), name, s, 1001, Approval::Providers)
        {
            Ok(x) => x.map_err(|rej| (rej.reason, rej.detail)),
            Err(e) => panic!("db: {e}"),
        };
        let (a, b) = (StaticKey::generate(), StaticKey::generate());
        // An operator's token (no owner) admits at once, approval or not.
        assert!(approving(&mut r, &b, "op-box", Some(&plain)).is_ok());
        // A provider's token: stored, its use spent, refused until approved.
        let Err((reason, detail)) = approving(&mut r, &a, "gpu2", Some(&owned)) else {
            panic!("admitted without approval")
        };
        assert_eq!(reason, Reason::AwaitingApproval);
        assert!(
            detail.contains("tunnel-relay nodes approve gpu2"),
            "{detail}"
        );
        let pending = |r: &Registry| {
            r.list_nodes()
                .unwrap_or_default()
                .into_iter()
                .filter(|n| n.pending)
                .map(|n| n.name)
                .collect::<Vec<_>>()
        };
        assert_eq!(pending(&r), ["gpu2"]);
        // Its next tries (key known, token again or not) wait too; the relay restarting
        // (the registry opened again) changes nothing.
        drop(r);
        let Ok(mut r) = Registry::open(d.path()) else {
            panic!("reopen")
        };
        assert_eq!(
            approving(&mut r, &a, "gpu2", Some(&owned)).map_err(|e| e.0),
            Err(Reason::AwaitingApproval)
        );
        assert_eq!(
            admit(&mut r, &a, "gpu2", None, 1002),
            Err(Reason::AwaitingApproval)
        );
        // Each try shows: the operator sees it still trying.
        let seen = |r: &Registry| {
            r.list_nodes()
                .unwrap_or_default()
                .into_iter()
                .find(|n| n.name == "gpu2")
                .map(|n| n.last_seen)
        };
        assert_eq!(seen(&r), Some(1002));
        // Approved: admitted with its token's tag; approving again says it was not waiting.
        assert_eq!(r.approve_node("gpu2").ok(), Some(true));
        assert_eq!(r.approve_node("gpu2").ok(), Some(false));
        assert!(matches!(
            r.approve_node("nope"),
            Err(StateError::NotFound(_))
        ));
        assert_eq!(
            approving(&mut r, &a, "gpu2", None),
            Ok(("gpu2".into(), vec!["worker".into()]))
        );
        assert!(pending(&r).is_empty());
        // Without approval on, a provider's token admits at once.
        let Ok((owned2, _)) = r.create_owned_token("worker", None, Some(1), 1000, Some("gpu1"))
        else {
            panic!()
        };
        let c = StaticKey::generate();
        assert!(admit(&mut r, &c, "gpu3", Some(&owned2), 1003).is_ok());
    }

    #[test]
    fn with_approval_for_all_an_operators_token_waits_too() {
        let (_d, mut r) = reg();
        let Ok((plain, _)) = r.create_token("worker", None, Some(5), 1000) else {
            panic!()
        };
        let all = |r: &mut Registry, k: &StaticKey, name: &str, s: Option<&Secret>| match r.admit(
            &k.public(),
            name,
            s,
            1001,
            Approval::All,
        ) {
            Ok(x) => x.map_err(|rej| rej.reason),
            Err(e) => panic!("db: {e}"),
        };
        let (a, b) = (StaticKey::generate(), StaticKey::generate());
        assert_eq!(
            all(&mut r, &a, "leaked-1", Some(&plain)),
            Err(Reason::AwaitingApproval)
        );
        assert_eq!(
            all(&mut r, &a, "leaked-1", None),
            Err(Reason::AwaitingApproval)
        );
        // A node admitted before approval was switched on stays admitted.
        assert!(admit(&mut r, &b, "old-box", Some(&plain), 1000).is_ok());
        assert!(all(&mut r, &b, "old-box", None).is_ok());
        assert_eq!(r.approve_node("leaked-1").ok(), Some(true));
        assert_eq!(
            all(&mut r, &a, "leaked-1", None),
            Ok(("leaked-1".into(), vec!["worker".into()]))
        );
    }

    #[test]
    fn approve_devices_reads_true_false_and_words() {
        #[derive(serde::Deserialize)]
        struct C {
            a: Approval,
        }
        let read = |v: &str| toml::from_str::<C>(&format!("a = {v}")).map(|c| c.a);
        assert_eq!(read("true").ok(), Some(Approval::Providers));
        assert_eq!(read("false").ok(), Some(Approval::Off));
        assert_eq!(read("\"all\"").ok(), Some(Approval::All));
        assert_eq!(read("\"providers\"").ok(), Some(Approval::Providers));
        assert_eq!(read("\"off\"").ok(), Some(Approval::Off));
        let Err(e) = read("\"everyone\"") else {
            panic!("accepted")
        };
        assert!(e.to_string().contains("\"all\" (every new node)"), "{e}");
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
            .save_mesh(&[
                MeshWrite::Upsert(ra.clone(), true),
                MeshWrite::Upsert(rb.clone(), true)
            ])
            .is_ok());
        let mut ra2 = ra.clone();
        ra2.endpoints.clear();
        assert!(r
            .save_mesh(&[
                MeshWrite::Upsert(ra2.clone(), false),
                MeshWrite::Delete(NodeId(2))
            ])
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
