//! The registry on PostgreSQL: one database shared by a fleet of relays
//! (`serve --store postgres://...`, `store` in the config; the operator's
//! `token` and `nodes` commands take the same `--store`).
//!
//! Driver: tokio-postgres, through its blocking `postgres` wrapper. The
//! registry API is synchronous (it is SQLite's), so each [`PgRegistry`] owns
//! store threads holding one connection each (one, or [`MAIN_CONNECTIONS`]
//! for a relay's main registry); calls are queued to them and waited for,
//! from any thread or runtime, or awaited through a [`PgHandle`] (the
//! `postgres` client runs its own runtime, which must not be entered from a
//! tokio worker). A call on a broken
//! connection fails with the error; the next call reconnects, so a restarted
//! PostgreSQL costs the calls made while it was down.
//!
//! Schema: versioned migrations in [`MIGRATIONS`], applied at connect under
//! an advisory lock (two relays starting at once migrate once); a database
//! whose version is newer than this build is refused with a clear error.
//!
//! Change feed: every write that other relays must see commits a
//! `NOTIFY weft_changes` (delivered at commit). A second connection per
//! relay `LISTEN`s and bumps a `watch` counter: the revocation watcher and
//! the mesh feed wake on it (no polling). Mesh records carry a feed position
//! (`seq`, from a sequence) and deletions stay as tombstones, so a relay
//! reads exactly the rows written after the last one it applied; after a
//! lost connection it re-reads from there, missing nothing. Writers take
//! [`FEED_LOCK`] (a transaction advisory lock) before drawing positions, so
//! positions commit in order: a reader never sees position n+1 while n is
//! still to commit (which it would then skip for good).

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::admission::TokenState;
use crate::error::StateError;
use crate::keys::PublicKey;
use crate::records::{
    decide_admit, mesh_record_json, node_record, opt_u64, parse_mesh_record, AdmitRows, AdmitWrite,
    MeshChange, MeshWrite, NodeRecord, TokenRecord,
};
use crate::secret::Secret;
use crate::wire::Rejection;

/// The notification channel.
pub const CHANNEL: &str = "weft_changes";

/// The schema, one migration per version (index + 1). Append only.
pub const MIGRATIONS: &[&str] = &[
    // 1: the registry (as SQLite's), mesh records with a feed position.
    "CREATE TABLE nodes (
        key BYTEA PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        tags TEXT NOT NULL,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        revoked BOOLEAN NOT NULL DEFAULT false,
        token_id TEXT
     );
     CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash BYTEA NOT NULL UNIQUE,
        tag TEXT NOT NULL,
        created BIGINT NOT NULL,
        expires_at BIGINT,
        uses_left BIGINT,
        revoked BOOLEAN NOT NULL DEFAULT false
     );
     CREATE SEQUENCE mesh_seq;
     CREATE TABLE mesh_nodes (
        id BIGINT PRIMARY KEY,
        key BYTEA NOT NULL UNIQUE,
        record TEXT NOT NULL,
        relay TEXT NOT NULL,
        online BOOLEAN NOT NULL,
        deleted BOOLEAN NOT NULL DEFAULT false,
        seq BIGINT NOT NULL
     );
     CREATE INDEX mesh_nodes_seq ON mesh_nodes (seq);",
    // 2: the fleet's relays and their heartbeats (the database's clock).
    "CREATE TABLE relays (
        name TEXT PRIMARY KEY,
        region TEXT NOT NULL,
        addrs TEXT NOT NULL,
        started TIMESTAMPTZ NOT NULL DEFAULT now(),
        beat TIMESTAMPTZ NOT NULL DEFAULT now()
     );",
    // 3: which relay holds each worker's tunnel session (`expose`).
    "CREATE TABLE tunnel_homes (
        name TEXT PRIMARY KEY,
        relay TEXT NOT NULL,
        conn BIGINT NOT NULL,
        updated TIMESTAMPTZ NOT NULL DEFAULT now()
     );",
    // 4: a worker's tunnel sessions on several relays at once (a reconnect race
    // admits it on two; the loser's end must not erase the winner's row).
    "ALTER TABLE tunnel_homes DROP CONSTRAINT tunnel_homes_pkey;
     ALTER TABLE tunnel_homes ADD PRIMARY KEY (name, relay, conn);",
    // 5: where each relay answers STUN (nodes measure their latency to it
    // there); a worker's services and tags with its tunnel home (engineers on
    // other relays list it).
    "ALTER TABLE relays ADD COLUMN stun_port INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE tunnel_homes ADD COLUMN services TEXT NOT NULL DEFAULT '';
     ALTER TABLE tunnel_homes ADD COLUMN tags TEXT NOT NULL DEFAULT '';",
    // 6: the pool's records (as SQLite's pool tables) and its scheduling
    // lease (`pg_pool.rs`): one relay of the fleet decides at a time.
    "CREATE TABLE pool_jobs (
        id BIGINT PRIMARY KEY,
        finished BOOLEAN NOT NULL,
        record TEXT NOT NULL
     );
     CREATE TABLE pool_workers (
        name TEXT PRIMARY KEY,
        record TEXT NOT NULL
     );
     CREATE TABLE pool_flags (
        name TEXT PRIMARY KEY,
        cordoned BOOLEAN NOT NULL,
        draining BOOLEAN NOT NULL
     );
     CREATE TABLE pool_usage (
        job BIGINT NOT NULL,
        attempt BIGINT NOT NULL,
        worker TEXT NOT NULL,
        end_ms BIGINT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (job, attempt, worker)
     );
     CREATE INDEX pool_usage_end ON pool_usage (end_ms);
     CREATE TABLE pool_lease (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        holder TEXT NOT NULL,
        epoch BIGINT NOT NULL,
        expires TIMESTAMPTZ NOT NULL
     );
     INSERT INTO pool_lease (id, holder, epoch, expires) VALUES (1, '', 0, now());",
];

/// A relay whose last heartbeat is older than this (ms) is down: the other
/// relays take its nodes as offline and stop announcing it.
pub const RELAY_DEAD_MS: i64 = 3000;

/// One relay of the fleet as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RelayRow {
    /// Its name (`name` in its config).
    pub name: String,
    /// Its region (`region` in its config).
    pub region: String,
    /// Where nodes reach it (`host:port`).
    pub addrs: Vec<String>,
    /// Milliseconds since its last heartbeat (the database's clock).
    pub beat_age_ms: i64,
    /// Nodes holding a session on it (their records say so).
    pub nodes: i64,
    /// The UDP port where it answers STUN at its addresses' hosts (0: none).
    pub stun_port: u16,
    /// Whether it holds the pool's scheduling lease (it decides the queue and placements).
    pub schedules_pool: bool,
}

/// A worker whose tunnel session is on another relay of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteWorker {
    /// Its registered name.
    pub name: String,
    /// The relay holding its newest tunnel session.
    pub relay: String,
    /// The services it exposes.
    pub services: Vec<String>,
    /// Its tags.
    pub tags: Vec<String>,
}

const RELAYS_SQL: &str = "SELECT r.name, r.region, r.addrs,
        (extract(epoch FROM now() - r.beat) * 1000)::BIGINT,
        (SELECT count(*) FROM mesh_nodes m WHERE m.relay = r.name AND m.online AND NOT m.deleted),
        r.stun_port,
        EXISTS (SELECT 1 FROM pool_lease l WHERE l.holder = r.name AND l.expires > now())
     FROM relays r ORDER BY r.name";

fn relay_rows(rows: &[postgres::Row]) -> Vec<RelayRow> {
    rows.iter()
        .map(|r| RelayRow {
            name: r.get(0),
            region: r.get(1),
            addrs: r
                .get::<_, String>(2)
                .split(',')
                .filter(|a| !a.is_empty())
                .map(str::to_string)
                .collect(),
            beat_age_ms: r.get(3),
            nodes: r.get(4),
            stun_port: u16::try_from(r.get::<_, i32>(5)).unwrap_or(0),
            schedules_pool: r.get(6),
        })
        .collect()
}

/// Advisory lock key for migrations ("weft" in ASCII).
const MIGRATE_LOCK: i64 = 0x7765_6674;
/// The advisory lock mesh writers hold from drawing feed positions to commit.
pub const FEED_LOCK: i64 = 0x7765_6675;

/// Takes [`FEED_LOCK`] for the rest of `tx`.
fn feed_lock(tx: &mut postgres::Transaction<'_>) -> Result<(), StateError> {
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&FEED_LOCK])
        .map(drop)
        .map_err(|e| pg_err(&e))
}

/// A URL with any password replaced by `***` (for messages and logs).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(a) = auth {
        match a.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{a}@")),
        }
    }
    // A password may also come as a query parameter.
    match host.split_once('?') {
        Some((h, q)) => {
            out.push_str(h);
            out.push('?');
            let q: Vec<String> = q
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect();
            out.push_str(&q.join("&"));
        }
        None => out.push_str(host),
    }
    out
}

pub(crate) fn pg_err(e: &postgres::Error) -> StateError {
    // `Error`'s Display says "db error"; the server's message is in the source.
    match e.as_db_error() {
        Some(db) => StateError::Pg(format!("{}: {}", db.code().code(), db.message())),
        None => StateError::Pg(match std::error::Error::source(e) {
            Some(s) => format!("{e}: {s}"),
            None => e.to_string(),
        }),
    }
}

/// Additions that relays of the previous schema version live with (they neither read nor
/// require them), applied by every newer relay at connect without raising the version, so a
/// fleet upgrades one relay at a time: the usage sequence (`seq`) and store time
/// (`stored_ms`). Rows an older relay inserts have neither; the next holder of this version
/// numbers them (`pg_pool`), as unsigned.
const ADDITIVE: &str = "ALTER TABLE pool_usage ADD COLUMN IF NOT EXISTS seq BIGINT;
     ALTER TABLE pool_usage ADD COLUMN IF NOT EXISTS stored_ms BIGINT;
     CREATE UNIQUE INDEX IF NOT EXISTS pool_usage_seq ON pool_usage (seq);
     CREATE INDEX IF NOT EXISTS pool_usage_stored ON pool_usage (stored_ms);
     ALTER TABLE tokens ADD COLUMN IF NOT EXISTS owner TEXT;
     ALTER TABLE nodes ADD COLUMN IF NOT EXISTS label TEXT;
     ALTER TABLE nodes ADD COLUMN IF NOT EXISTS pending BOOLEAN NOT NULL DEFAULT FALSE;
     CREATE TABLE IF NOT EXISTS mesh_paths (
        key BYTEA PRIMARY KEY,
        relay TEXT NOT NULL,
        paths TEXT NOT NULL,
        updated_ms BIGINT NOT NULL
     );";

/// Brings the schema to [`MIGRATIONS`]' version (and [`ADDITIVE`]); refuses a newer one.
fn migrate(c: &mut Client) -> Result<(), StateError> {
    let known = MIGRATIONS.len() as i32;
    let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
        .map_err(|e| pg_err(&e))?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS weft_schema (version INTEGER NOT NULL)")
        .map_err(|e| pg_err(&e))?;
    let found: Option<i32> = tx
        .query_opt("SELECT max(version) FROM weft_schema", &[])
        .map_err(|e| pg_err(&e))?
        .and_then(|r| r.get(0));
    let found = found.unwrap_or(0);
    if found > known {
        return Err(StateError::SchemaTooNew { found, known });
    }
    for (i, m) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let v = i as i32 + 1;
        tx.batch_execute(m).map_err(|e| pg_err(&e))?;
        tx.execute("INSERT INTO weft_schema (version) VALUES ($1)", &[&v])
            .map_err(|e| pg_err(&e))?;
        info!(version = v, "store schema migrated");
    }
    tx.batch_execute(ADDITIVE).map_err(|e| pg_err(&e))?;
    tx.commit().map_err(|e| pg_err(&e))
}

type Job = Box<dyn FnOnce(&mut Conn) + Send>;

/// The store thread's connection, made again after it breaks.
struct Conn {
    url: String,
    client: Option<Client>,
}

impl Conn {
    fn client(&mut self) -> Result<&mut Client, StateError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            let mut c = Client::connect(&self.url, NoTls).map_err(|e| pg_err(&e))?;
            migrate(&mut c)?;
            self.client = Some(c);
        }
        self.client
            .as_mut()
            .ok_or_else(|| StateError::Pg("not connected".into()))
    }
}

/// The registry's PostgreSQL backend.
pub struct PgRegistry {
    jobs: std_mpsc::Sender<Job>,
    relay: String,
    url: String,
    /// The listener's counter, once someone asked for it ([`PgRegistry::changes`]).
    changes: std::sync::OnceLock<watch::Receiver<i64>>,
}

/// Store connections of a relay's main registry: the admissions of a herd
/// of nodes failing over from a dead relay run on them side by side.
pub const MAIN_CONNECTIONS: usize = 4;

/// A handle on a [`PgRegistry`]'s store threads that needs neither the
/// registry's lock nor a blocked thread: a relay's admissions and their
/// revocation checks are `await`ed through it, so a herd of them neither
/// queues on the lock nor stalls the async runtime.
#[derive(Clone)]
pub struct PgHandle {
    jobs: std_mpsc::Sender<Job>,
}

impl PgRegistry {
    /// Connects (and migrates the schema), failing now if the database is
    /// unreachable or too new. `relay` names this relay in the mesh records
    /// it writes. The listener starts with the first [`PgRegistry::changes`].
    pub fn connect(url: &str, relay: &str) -> Result<PgRegistry, StateError> {
        PgRegistry::connect_pool(url, relay, 1)
    }

    /// As [`PgRegistry::connect`], with `threads` store connections taking
    /// calls from one queue (each connects at its first call; one caller's
    /// calls still run in order, since each waits for its answer).
    pub fn connect_pool(url: &str, relay: &str, threads: usize) -> Result<PgRegistry, StateError> {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads.max(1) {
            let mut conn = Conn {
                url: url.to_string(),
                client: None,
            };
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("registry-pg-{i}"))
                .spawn(move || loop {
                    let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
                    match job {
                        Ok(job) => job(&mut conn),
                        Err(_) => return,
                    }
                })
                .map_err(|e| StateError::Pg(format!("store thread: {e}")))?;
        }
        let reg = PgRegistry {
            jobs,
            relay: relay.to_string(),
            url: url.to_string(),
            changes: std::sync::OnceLock::new(),
        };
        reg.call(|_| Ok(()))?;
        Ok(reg)
    }

    /// A handle for async callers ([`PgHandle`]).
    pub fn handle(&self) -> PgHandle {
        PgHandle {
            jobs: self.jobs.clone(),
        }
    }

    /// Runs `f` on a store thread's connection and waits for it
    /// ([`submit`]).
    pub(crate) fn call<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Client) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = std_mpsc::sync_channel(1);
        submit(&self.jobs, f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.recv()
            .map_err(|_| StateError::Pg("store thread is gone".into()))?
    }

    /// This relay's name (in the records it writes).
    pub(crate) fn relay_name(&self) -> &str {
        &self.relay
    }

    /// The change counter (bumped by each notification and reconnect); 0
    /// until [`PgRegistry::changes`] started the listener.
    pub fn data_version(&self) -> i64 {
        self.changes.get().map_or(0, |c| *c.borrow())
    }

    /// A receiver of the change counter; the first call starts the
    /// listener (its own connection and thread: operator commands, which
    /// never ask, open none). If the thread cannot start, the receiver ends
    /// at once and callers fall back to their timers.
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.changes
            .get_or_init(|| {
                let (tx, rx) = watch::channel(0i64);
                let url = self.url.clone();
                let started = std::thread::Builder::new()
                    .name("registry-listen".into())
                    .spawn(move || listen(&url, &tx));
                if let Err(e) = started {
                    warn!(error = %e, "store change feed: no listener thread");
                }
                rx
            })
            .clone()
    }

    /// Mesh rows after feed position `after`, in order.
    pub fn mesh_changes(&self, after: i64) -> Result<Vec<MeshChange>, StateError> {
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT id, record, relay, online, deleted, seq FROM mesh_nodes WHERE seq > $1 ORDER BY seq",
                    &[&after],
                )
                .map_err(|e| pg_err(&e))?;
            rows.iter()
                .map(|r| {
                    let id: i64 = r.get(0);
                    let text: String = r.get(1);
                    Ok(MeshChange {
                        rec: parse_mesh_record("postgres mesh_nodes", id, &text)?,
                        relay: r.get(2),
                        online: r.get(3),
                        deleted: r.get(4),
                        seq: r.get(5),
                    })
                })
                .collect()
        })
    }

    /// Applies mesh writes in order, in one transaction, and notifies.
    pub fn save_mesh(&mut self, writes: &[MeshWrite]) -> Result<(), StateError> {
        let mut rows = Vec::with_capacity(writes.len());
        for w in writes {
            rows.push(match w {
                MeshWrite::Upsert(rec, online) => (
                    rec.id,
                    Some((
                        rec.key.0.to_vec(),
                        mesh_record_json("postgres", rec)?,
                        *online,
                    )),
                ),
                MeshWrite::Delete(id) => (*id, None),
            });
        }
        let relay = self.relay.clone();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            // Mesh records are what the nodes tell their relay again when they rejoin:
            // commits need not wait for the disk (the feed lock is held until commit,
            // so every relay's writes would queue on each flush).
            tx.batch_execute("SET LOCAL synchronous_commit = off")
                .map_err(|e| pg_err(&e))?;
            feed_lock(&mut tx)?;
            for (id, row) in &rows {
                let id = id.0 as i64;
                match row {
                    Some((key, text, online)) => {
                        // The key is unique: a row of another id for it goes.
                        tx.execute(
                            "DELETE FROM mesh_nodes WHERE key = $1 AND id != $2",
                            &[key, &id],
                        )
                        .map_err(|e| pg_err(&e))?;
                        // A relay whose session of the node ended does not take
                        // the record back from the relay the node moved to.
                        tx.execute(
                            "INSERT INTO mesh_nodes (id, key, record, relay, online, deleted, seq)
                             VALUES ($1, $2, $3, $4, $5, false, nextval('mesh_seq'))
                             ON CONFLICT (id) DO UPDATE SET key = $2, record = $3, relay = $4,
                               online = $5, deleted = false, seq = nextval('mesh_seq')
                             WHERE $5 OR mesh_nodes.relay = $4 OR NOT mesh_nodes.online",
                            &[&id, key, text, &relay, online],
                        )
                        .map_err(|e| pg_err(&e))?;
                    }
                    None => {
                        tx.execute(
                            "UPDATE mesh_nodes SET deleted = true, online = false, relay = $2,
                               seq = nextval('mesh_seq') WHERE id = $1 AND NOT deleted",
                            &[&id, &relay],
                        )
                        .map_err(|e| pg_err(&e))?;
                    }
                }
            }
            notify(&mut tx, "mesh")?;
            tx.commit().map_err(|e| pg_err(&e))
        })
    }

    /// Marks the records this relay wrote offline and forgets the tunnel
    /// sessions it held (it starts with no sessions).
    pub fn offline_mine(&mut self) -> Result<(), StateError> {
        let relay = self.relay.clone();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            tx.execute("DELETE FROM tunnel_homes WHERE relay = $1", &[&relay])
                .map_err(|e| pg_err(&e))?;
            tx.execute("DELETE FROM mesh_paths WHERE relay = $1", &[&relay])
                .map_err(|e| pg_err(&e))?;
            feed_lock(&mut tx)?;
            let n = tx
                .execute(
                    "UPDATE mesh_nodes SET online = false, seq = nextval('mesh_seq')
                     WHERE relay = $1 AND online AND NOT deleted",
                    &[&relay],
                )
                .map_err(|e| pg_err(&e))?;
            if n > 0 {
                notify(&mut tx, "mesh")?;
            }
            tx.commit().map_err(|e| pg_err(&e))
        })
    }

    /// Node `key`'s path report as this relay holds it (`paths`, the text
    /// [`crate::records::paths_text`] writes), or none: its session here ended (a row
    /// another relay wrote since, the node having moved there, stays).
    pub fn save_paths(&mut self, key: Vec<u8>, paths: Option<String>) -> Result<(), StateError> {
        let relay = self.relay.clone();
        self.call(move |c| {
            match &paths {
                Some(p) => c.execute(
                    "INSERT INTO mesh_paths (key, relay, paths, updated_ms)
                     VALUES ($1, $2, $3, (extract(epoch from now()) * 1000)::bigint)
                     ON CONFLICT (key) DO UPDATE SET relay = $2, paths = $3,
                       updated_ms = (extract(epoch from now()) * 1000)::bigint",
                    &[&key, &relay, &p],
                ),
                None => c.execute(
                    "DELETE FROM mesh_paths WHERE key = $1 AND relay = $2",
                    &[&key, &relay],
                ),
            }
            .map(drop)
            .map_err(|e| pg_err(&e))
        })
    }

    /// The path reports other relays of the fleet hold: (node key, relay, paths text).
    pub fn fleet_paths(&self) -> Result<Vec<(Vec<u8>, String, String)>, StateError> {
        let relay = self.relay.clone();
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT key, relay, paths FROM mesh_paths WHERE relay <> $1",
                    &[&relay],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    /// This relay's heartbeat (its region, addresses and STUN port with
    /// it); returns every relay of the fleet.
    pub fn beat(
        &mut self,
        region: &str,
        addrs: &[String],
        stun_port: u16,
    ) -> Result<Vec<RelayRow>, StateError> {
        let (name, region, addrs) = (self.relay.clone(), region.to_string(), addrs.join(","));
        let stun_port = i32::from(stun_port);
        self.call(move |c| {
            c.execute(
                "INSERT INTO relays (name, region, addrs, stun_port) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (name) DO UPDATE SET region = $2, addrs = $3, stun_port = $4, beat = now()",
                &[&name, &region, &addrs, &stun_port],
            )
            .map_err(|e| pg_err(&e))?;
            Ok(relay_rows(
                &c.query(RELAYS_SQL, &[]).map_err(|e| pg_err(&e))?,
            ))
        })
    }

    /// This relay leaves the fleet (it drains before it stops): its beat is
    /// set in the past, so the others count it down at their next beat and
    /// stop announcing it.
    pub fn leave(&mut self) -> Result<(), StateError> {
        let name = self.relay.clone();
        self.call(move |c| {
            c.execute(
                "UPDATE relays SET beat = now() - interval '1 day' WHERE name = $1",
                &[&name],
            )
            .map(drop)
            .map_err(|e| pg_err(&e))
        })
    }

    /// Worker `name`'s tunnel session is on this relay (connection `conn`),
    /// with its services and tags.
    pub fn set_tunnel_home(
        &mut self,
        name: &str,
        conn: u64,
        services: &[String],
        tags: &[String],
    ) -> Result<(), StateError> {
        let (name, relay, conn) = (name.to_string(), self.relay.clone(), conn as i64);
        let (services, tags) = (services.join(","), tags.join(","));
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            // This relay's older session of the worker was replaced by this one.
            tx.execute(
                "DELETE FROM tunnel_homes WHERE name = $1 AND relay = $2 AND conn <> $3",
                &[&name, &relay, &conn],
            )
            .map_err(|e| pg_err(&e))?;
            tx.execute(
                "INSERT INTO tunnel_homes (name, relay, conn, services, tags) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (name, relay, conn) DO UPDATE SET updated = now(), services = $4, tags = $5",
                &[&name, &relay, &conn, &services, &tags],
            )
            .map_err(|e| pg_err(&e))?;
            tx.commit().map_err(|e| pg_err(&e))
        })
    }

    /// That session ended (a newer one, here or on another relay, stays).
    pub fn clear_tunnel_home(&mut self, name: &str, conn: u64) -> Result<(), StateError> {
        let (name, relay, conn) = (name.to_string(), self.relay.clone(), conn as i64);
        self.call(move |c| {
            c.execute(
                "DELETE FROM tunnel_homes WHERE name = $1 AND relay = $2 AND conn = $3",
                &[&name, &relay, &conn],
            )
            .map(drop)
            .map_err(|e| pg_err(&e))
        })
    }

    /// The relay holding worker `name`'s newest tunnel session, among the
    /// relays that beat.
    pub fn tunnel_home(&self, name: &str) -> Result<Option<RelayRow>, StateError> {
        let name = name.to_string();
        self.call(move |c| {
            let relays = relay_rows(&c.query(RELAYS_SQL, &[]).map_err(|e| pg_err(&e))?);
            let homes = c
                .query(
                    "SELECT relay FROM tunnel_homes WHERE name = $1 ORDER BY updated DESC",
                    &[&name],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(homes.iter().find_map(|h| {
                let h: String = h.get(0);
                relays
                    .iter()
                    .find(|r| r.name == h && r.beat_age_ms < RELAY_DEAD_MS)
                    .cloned()
            }))
        })
    }

    /// The workers whose newest tunnel session is on another live relay:
    /// (name, services, tags), by name.
    pub fn remote_workers(&self) -> Result<Vec<RemoteWorker>, StateError> {
        let me = self.relay.clone();
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT DISTINCT ON (h.name) h.name, h.relay, h.services, h.tags
                     FROM tunnel_homes h JOIN relays r ON r.name = h.relay
                     WHERE r.beat > now() - make_interval(secs => $1::BIGINT / 1000.0)
                     ORDER BY h.name, h.updated DESC",
                    &[&RELAY_DEAD_MS],
                )
                .map_err(|e| pg_err(&e))?;
            let list = |s: String| -> Vec<String> {
                s.split(',')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            };
            Ok(rows
                .into_iter()
                .filter(|r| r.get::<_, String>(1) != me)
                .map(|r| RemoteWorker {
                    name: r.get(0),
                    relay: r.get(1),
                    services: list(r.get(2)),
                    tags: list(r.get(3)),
                })
                .collect())
        })
    }

    /// The relay holding each online node's mesh session, by key.
    pub fn mesh_homes(&self) -> Result<Vec<(PublicKey, String)>, StateError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT key, relay FROM mesh_nodes WHERE online AND NOT deleted",
                    &[],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .filter_map(|r| {
                    let key: Vec<u8> = r.get(0);
                    PublicKey::from_slice(&key).map(|k| (k, r.get(1)))
                })
                .collect())
        })
    }

    /// Every relay of the fleet.
    pub fn relays(&self) -> Result<Vec<RelayRow>, StateError> {
        self.call(|c| {
            Ok(relay_rows(
                &c.query(RELAYS_SQL, &[]).map_err(|e| pg_err(&e))?,
            ))
        })
    }

    /// Inserts a token row.
    pub fn insert_token(
        &mut self,
        id: &str,
        hash: &[u8],
        tag: &str,
        now: u64,
        (expires, uses): (Option<i64>, Option<i64>),
        owner: Option<&str>,
    ) -> Result<(), StateError> {
        let (id, hash, tag) = (id.to_string(), hash.to_vec(), tag.to_string());
        let owner = owner.map(str::to_string);
        self.call(move |c| {
            c.execute(
                "INSERT INTO tokens (id, hash, tag, created, expires_at, uses_left, owner) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&id, &hash, &tag, &(now as i64), &expires, &uses, &owner],
            )
            .map(drop)
            .map_err(|e| pg_err(&e))
        })
    }

    /// All tokens.
    pub fn list_tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT id, tag, created, expires_at, uses_left, revoked, owner FROM tokens ORDER BY created, id",
                    &[],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| TokenRecord {
                    id: r.get(0),
                    tag: r.get(1),
                    created: r.get::<_, i64>(2).max(0) as u64,
                    expires_at: opt_u64(r.get(3)),
                    uses_left: opt_u64(r.get(4)),
                    revoked: r.get(5),
                    owner: r.get(6),
                })
                .collect())
        })
    }

    /// Revokes token `id` (exact).
    pub fn revoke_token(&mut self, id: &str) -> Result<(), StateError> {
        let id = id.to_string();
        self.call(move |c| {
            c.execute("UPDATE tokens SET revoked = true WHERE id = $1", &[&id])
                .map(drop)
                .map_err(|e| pg_err(&e))
        })
    }

    /// All nodes (mesh addresses not filled in).
    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>, StateError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT n.name, n.key, n.tags, n.first_seen, n.last_seen, n.revoked, n.label, t.owner, n.pending
                     FROM nodes n LEFT JOIN tokens t ON t.id = n.token_id ORDER BY n.name",
                    &[],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| {
                    let key: Vec<u8> = r.get(1);
                    let tags: String = r.get(2);
                    let mut n = node_record(r.get(0), &key, &tags, r.get(3), r.get(4), r.get(5));
                    n.label = r.get(6);
                    n.owner = r.get(7);
                    n.pending = r.get(8);
                    n
                })
                .collect())
        })
    }

    /// Gives node `name` a label (none: its name again); false if no node has that name.
    pub fn set_label(&mut self, name: &str, label: Option<&str>) -> Result<bool, StateError> {
        let (name, label) = (name.to_string(), label.map(str::to_string));
        self.call(move |c| {
            c.execute(
                "UPDATE nodes SET label = $1 WHERE name = $2",
                &[&label, &name],
            )
            .map(|n| n > 0)
            .map_err(|e| pg_err(&e))
        })
    }

    /// Approves a node waiting for it; false if none was waiting under that name.
    pub fn approve_node(&mut self, name: &str) -> Result<bool, StateError> {
        let name = name.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE nodes SET pending = false WHERE name = $1 AND pending AND NOT revoked",
                &[&name],
            )
            .map(|n| n > 0)
            .map_err(|e| pg_err(&e))
        })
    }

    /// Revokes a node by name and tells every relay; false if none has it.
    pub fn revoke_node(&mut self, name: &str) -> Result<bool, StateError> {
        let name = name.to_string();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            let n = tx
                .execute("UPDATE nodes SET revoked = true WHERE name = $1", &[&name])
                .map_err(|e| pg_err(&e))?;
            notify(&mut tx, "revoke")?;
            tx.commit().map_err(|e| pg_err(&e))?;
            Ok(n > 0)
        })
    }

    /// Keys of revoked nodes (raw bytes).
    pub fn revoked_keys(&self) -> Result<Vec<Vec<u8>>, StateError> {
        self.call(|c| {
            let rows = c
                .query("SELECT key FROM nodes WHERE revoked", &[])
                .map_err(|e| pg_err(&e))?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    /// The key's revoked flag (None: unknown key).
    pub fn revoked_flag(&self, key: &PublicKey) -> Result<Option<bool>, StateError> {
        self.call(revoked_job(key))
    }

    /// Admission (the rule is [`decide_admit`]), in one serializable
    /// transaction: two relays admitting with the last use of a token at
    /// once cannot both succeed (one is retried and then sees it used up).
    pub fn admit(
        &mut self,
        key: &PublicKey,
        name: &str,
        secret: Option<&Secret>,
        now: u64,
        approval: crate::records::Approval,
    ) -> Result<AdmitResult, StateError> {
        self.call(admit_job(key, name, secret, now, approval))
    }
}

/// Queues `f` for a store thread; `done` gets its result. A call that finds
/// the connection broken (PostgreSQL restarted since the last call)
/// reconnects and runs once more.
fn submit<T: Send + 'static>(
    jobs: &std_mpsc::Sender<Job>,
    f: impl Fn(&mut Client) -> Result<T, StateError> + Send + 'static,
    done: impl FnOnce(Result<T, StateError>) + Send + 'static,
) -> Result<(), StateError> {
    let job: Job = Box::new(move |conn: &mut Conn| {
        let mut r = conn.client().and_then(&f);
        if r.is_err() && conn.client.as_ref().is_some_and(Client::is_closed) {
            r = conn.client().and_then(&f);
        }
        done(r);
    });
    jobs.send(job)
        .map_err(|_| StateError::Pg("store thread is gone".into()))
}

impl PgHandle {
    async fn call<T: Send + 'static>(
        &self,
        f: impl Fn(&mut Client) -> Result<T, StateError> + Send + 'static,
    ) -> Result<T, StateError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        submit(&self.jobs, f, move |r| {
            let _ = tx.send(r);
        })?;
        rx.await
            .map_err(|_| StateError::Pg("store thread is gone".into()))?
    }

    /// [`PgRegistry::admit`], awaited.
    pub async fn admit(
        &self,
        key: &PublicKey,
        name: &str,
        secret: Option<&Secret>,
        now: u64,
        approval: crate::records::Approval,
    ) -> Result<AdmitResult, StateError> {
        self.call(admit_job(key, name, secret, now, approval)).await
    }

    /// Whether `key` is revoked (an unknown key counts as revoked), awaited.
    pub async fn is_revoked(&self, key: &PublicKey) -> Result<bool, StateError> {
        let r = self.call(revoked_job(key)).await?;
        Ok(r.is_none_or(|v| v))
    }
}

fn revoked_job(
    key: &PublicKey,
) -> impl Fn(&mut Client) -> Result<Option<bool>, StateError> + Send + 'static {
    let key = key.0.to_vec();
    move |c| {
        Ok(
            c.query_opt("SELECT revoked FROM nodes WHERE key = $1", &[&key])
                .map_err(|e| pg_err(&e))?
                .map(|r| r.get(0)),
        )
    }
}

/// The admission transaction with its retries ([`PgRegistry::admit`]).
fn admit_job(
    key: &PublicKey,
    name: &str,
    secret: Option<&Secret>,
    now: u64,
    approval: crate::records::Approval,
) -> impl Fn(&mut Client) -> Result<AdmitResult, StateError> + Send + 'static {
    let (key, name) = (*key, name.to_string());
    let hash = secret.map(|s| s.hash().to_vec());
    move |c| {
        let mut last = None;
        for attempt in 0..ADMIT_ATTEMPTS {
            match admit_tx(c, &key, &name, hash.as_deref(), now, approval) {
                Ok(r) => return Ok(r),
                Err(e) if retryable(&e) => {
                    last = Some(e);
                    // Relays admitting at once conflict; jittered, growing waits
                    // let them take turns instead of colliding again.
                    let cap = 2u64 << attempt.min(6);
                    std::thread::sleep(std::time::Duration::from_millis(
                        1 + rand::random::<u64>() % cap,
                    ));
                }
                Err(e) => return Err(pg_err(&e)),
            }
        }
        Err(last.map_or_else(
            || StateError::Pg("admission retried out".into()),
            |e| pg_err(&e),
        ))
    }
}

type AdmitResult = Result<(String, Vec<String>), Rejection>;

/// Tries of one admission whose transaction conflicted with another relay's.
const ADMIT_ATTEMPTS: u32 = 30;

/// A transaction PostgreSQL rolled back for a conflict (run it again).
fn retryable(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == postgres::error::SqlState::T_R_SERIALIZATION_FAILURE
            || *c == postgres::error::SqlState::T_R_DEADLOCK_DETECTED
    })
}

fn admit_tx(
    c: &mut Client,
    key: &PublicKey,
    name: &str,
    hash: Option<&[u8]>,
    now: u64,
    approval: crate::records::Approval,
) -> Result<AdmitResult, postgres::Error> {
    let mut tx = c
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::Serializable)
        .start()?;
    let k = key.0.to_vec();
    let known = tx
        .query_opt(
            "SELECT name, tags, revoked, pending FROM nodes WHERE key = $1",
            &[&k],
        )?
        .map(|r| {
            (
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, bool>(2),
                r.get::<_, bool>(3),
            )
        });
    let owner: Option<Vec<u8>> = tx
        .query_opt("SELECT key FROM nodes WHERE name = $1", &[&name])?
        .map(|r| r.get(0));
    let token = match (&known, hash) {
        (None, Some(h)) => tx
            .query_opt(
                "SELECT id, tag, expires_at, uses_left, revoked, owner FROM tokens WHERE hash = $1",
                &[&h],
            )?
            .map(|r| {
                let state = TokenState {
                    expires_at: opt_u64(r.get(2)),
                    uses_left: opt_u64(r.get(3)),
                    revoked: r.get(4),
                };
                let owned = r.get::<_, Option<String>>(5).is_some();
                (r.get::<_, String>(0), r.get::<_, String>(1), state, owned)
            }),
        _ => None,
    };
    let rows = AdmitRows {
        known,
        name_free: owner.as_deref().is_none_or(|o| o == k.as_slice()),
        token,
        approval,
    };
    match decide_admit(key, name, hash.is_some(), rows, now) {
        Err(rej) => Ok(Err(rej)),
        Ok(AdmitWrite::Known { name, tags }) => {
            // Only `last_seen` (and a rename) changes: no need to wait for the WAL to
            // reach the disk (a database crash could lose the last fraction of a
            // second of these), which a herd of reconnecting nodes would queue on.
            tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            tx.execute(
                "UPDATE nodes SET name = $1, last_seen = $2 WHERE key = $3",
                &[&name, &(now as i64), &k],
            )?;
            tx.commit()?;
            Ok(Ok((name, tags)))
        }
        Ok(AdmitWrite::Waiting { name }) => {
            tx.batch_execute("SET LOCAL synchronous_commit = off")?;
            tx.execute(
                "UPDATE nodes SET last_seen = $1 WHERE key = $2",
                &[&(now as i64), &k],
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
                "INSERT INTO nodes (key, name, tags, first_seen, last_seen, token_id, pending) VALUES ($1, $2, $3, $4, $4, $5, $6)",
                &[&k, &name, &tag, &(now as i64), &token_id, &pending],
            )?;
            tx.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = $1 AND uses_left IS NOT NULL",
                &[&token_id],
            )?;
            tx.commit()?;
            if pending {
                return Ok(Err(crate::records::awaiting_approval(name)));
            }
            Ok(Ok((name.to_string(), vec![tag])))
        }
    }
}

fn notify(tx: &mut postgres::Transaction<'_>, what: &str) -> Result<(), StateError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &what])
        .map(drop)
        .map_err(|e| pg_err(&e))
}

/// The listener thread: `LISTEN weft_changes` on its own connection; each
/// notification, and each (re)connect (notifications may have been missed),
/// bumps the counter. Ends when every receiver is gone.
fn listen(url: &str, tx: &watch::Sender<i64>) {
    let mut down_since: Option<std::time::Instant> = None;
    while !tx.is_closed() {
        let mut c = match Client::connect(url, NoTls).and_then(|mut c| {
            c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
            Ok(c)
        }) {
            Ok(c) => c,
            Err(e) => {
                if down_since.is_none() {
                    warn!(error = %pg_err(&e), "store change feed lost; reconnecting");
                    down_since = Some(std::time::Instant::now());
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        if let Some(t) = down_since.take() {
            info!(
                after_ms = t.elapsed().as_millis() as u64,
                "store change feed back"
            );
        }
        tx.send_modify(|v| *v += 1);
        loop {
            let got = {
                let mut n = c.notifications();
                let first = n.timeout_iter(Duration::from_secs(1)).next();
                if matches!(first, Ok(Some(_))) {
                    // Drain what else is queued, then wake the consumers once.
                    while let Ok(Some(_)) = n.iter().next() {}
                }
                first
            };
            match got {
                Ok(Some(_)) => tx.send_modify(|v| *v += 1),
                Ok(None) if tx.is_closed() => return,
                Ok(None) => {}
                Err(e) => {
                    warn!(error = %pg_err(&e), "store change feed lost; reconnecting");
                    down_since = Some(std::time::Instant::now());
                    break;
                }
            }
            if c.is_closed() {
                down_since.get_or_insert_with(std::time::Instant::now);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_hides_passwords() {
        assert_eq!(
            redact("postgres://weft:s3cret@db.example:5432/weft"),
            "postgres://weft:***@db.example:5432/weft"
        );
        assert_eq!(redact("postgres://weft@db/weft"), "postgres://weft@db/weft");
        assert_eq!(
            redact("postgresql://db/weft?user=w&password=x&sslmode=disable"),
            "postgresql://db/weft?user=w&password=***&sslmode=disable"
        );
    }

    #[test]
    fn node_ids_of_keys_fit_a_bigint() {
        let id = crate::coord::NodeId::of_key(&PublicKey([0xff; 32]));
        assert!(id.0 <= i64::MAX as u64 && id.0 >= 1 << 61);
    }
}
