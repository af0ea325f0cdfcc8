//! The pool's records in the relay's `registry.sqlite` (WAL, so `tunnel-relay pool ...` works
//! while `serve` runs): every job (its whole [`JobView`] plus retries left), every worker that
//! ever reported ([`WorkerView`]: inventory and uptime record), the operator's cordon/drain
//! flags, and the usage record of every finished copy. `serve` writes a job's row before it
//! answers the submit and after every change, so `kill -9` loses no job; JSON per row keeps
//! the schema to four tables. A fleet keeps the same tables in its PostgreSQL (`pg_pool.rs`),
//! written only by the relay holding the scheduling lease.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection};
use serde::{Deserialize, Serialize};
use weft_proto::pool::{JobView, PoolView, UsageRecord, WorkerView};
use weft_proto::usage::SignedUsage;

use crate::error::StateError;
use crate::pg::PgRegistry;
use crate::pg_pool::UsageRow;
pub use crate::pg_pool::{LeaseHolder, Seal};
use crate::registry::Store;

/// A job as stored: what is shown, and what the scheduler must get back after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredJob {
    /// The job as `weft jobs show` prints it.
    #[serde(flatten)]
    pub view: JobView,
    /// Retries it has left.
    pub retries_left: u32,
    /// A Ray cluster's token: kept (in this 0600 file) to start its members again after a
    /// restart; the view shows only its hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_token: Option<String>,
}

impl StoredJob {
    /// Whether it has ended (no restore needed).
    pub fn finished(&self) -> bool {
        matches!(
            self.view.state.as_str(),
            "succeeded" | "failed" | "lost" | "cancelled"
        )
    }
}

/// An operator's flags on a worker (`tunnel-relay pool cordon|drain|uncordon`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags {
    /// No new jobs.
    pub cordoned: bool,
    /// No new jobs; running ones finish.
    pub draining: bool,
}

/// A connection to the pool tables: SQLite in the relay's `registry.sqlite`, or a fleet's
/// PostgreSQL (`pg_pool.rs`), where the scheduler's writes are fenced by its lease's epoch.
pub struct PoolStore {
    backend: Backend,
    /// Writes made through this connection (see [`PoolStore::writes`]).
    writes: std::sync::atomic::AtomicU64,
}

enum Backend {
    Sqlite { db: Connection, path: PathBuf },
    Pg { reg: PgRegistry, epoch: i64 },
}

/// The scheduling lease as this relay sees it ([`PoolStore::lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This relay holds it, in this epoch (a relay alone: always, epoch 0).
    Held(i64),
    /// Another relay holds it.
    Elsewhere,
}

impl PoolStore {
    /// Opens (creating the tables in) `DIR/registry.sqlite`.
    pub fn open(state_dir: &Path) -> Result<PoolStore, StateError> {
        // The registry creates the file with its 0600 mode first.
        drop(crate::registry::Registry::open(state_dir)?);
        let path = state_dir.join("registry.sqlite");
        let db = Connection::open(&path)?;
        db.busy_timeout(Duration::from_secs(5))?;
        db.pragma_update(None, "journal_mode", "WAL")?;
        // WAL + NORMAL: a committed row survives a crash of the process (kill -9); only a
        // power loss may take the last commits.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS pool_jobs (
                id INTEGER PRIMARY KEY,
                finished INTEGER NOT NULL,
                record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS pool_workers (
                name TEXT PRIMARY KEY,
                record TEXT NOT NULL
             );
             CREATE TABLE IF NOT EXISTS pool_flags (
                name TEXT PRIMARY KEY,
                cordoned INTEGER NOT NULL,
                draining INTEGER NOT NULL
             );
             CREATE TABLE IF NOT EXISTS pool_usage (
                job INTEGER NOT NULL,
                attempt INTEGER NOT NULL,
                worker TEXT NOT NULL,
                end_ms INTEGER NOT NULL,
                record TEXT NOT NULL,
                PRIMARY KEY (job, attempt, worker)
             );",
        )?;
        migrate_usage(&db)?;
        Ok(PoolStore {
            backend: Backend::Sqlite { db, path },
            writes: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// The pool tables in `store`: SQLite in `state_dir`, or PostgreSQL as relay `relay`
    /// (its own connection), writing as the lease's holder in `epoch` (0: writes nothing
    /// the lease fences, e.g. an operator command or a relay that does not schedule).
    pub fn open_store(
        state_dir: &Path,
        store: &Store,
        relay: &str,
        epoch: i64,
    ) -> Result<PoolStore, StateError> {
        match store {
            Store::Sqlite => PoolStore::open(state_dir),
            Store::Postgres(url) => Ok(PoolStore {
                backend: Backend::Pg {
                    reg: PgRegistry::connect(url, relay)?,
                    epoch,
                },
                writes: std::sync::atomic::AtomicU64::new(0),
            }),
        }
    }

    /// Writes of jobs, workers, flags and usage made through this connection so far (never
    /// decreases): the web view's cue that the pool changed.
    pub fn writes(&self) -> u64 {
        self.writes.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Whether the pool is shared by a fleet (PostgreSQL): then one relay at a time
    /// schedules it, the holder of the lease.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Pg { .. })
    }

    /// Takes or renews the scheduling lease (a relay alone always holds it).
    pub fn lease(&self) -> Result<Lease, StateError> {
        match &self.backend {
            Backend::Sqlite { .. } => Ok(Lease::Held(0)),
            Backend::Pg { reg, .. } => Ok(reg.pool_lease()?.map_or(Lease::Elsewhere, Lease::Held)),
        }
    }

    /// Gives the lease up now, if held (a fleet relay that drains).
    pub fn release_lease(&self) -> Result<(), StateError> {
        match &self.backend {
            Backend::Sqlite { .. } => Ok(()),
            Backend::Pg { reg, .. } => reg.pool_lease_release(),
        }
    }

    /// Who holds the lease (None for a relay alone, or a lease never taken).
    pub fn lease_holder(&self) -> Result<Option<LeaseHolder>, StateError> {
        match &self.backend {
            Backend::Sqlite { .. } => Ok(None),
            Backend::Pg { reg, .. } => reg.pool_lease_holder(),
        }
    }

    fn bad(&self, what: String) -> StateError {
        match &self.backend {
            Backend::Sqlite { path, .. } => StateError::BadFile {
                path: path.clone(),
                msg: what,
            },
            Backend::Pg { .. } => StateError::Pg(format!("pool store: {what}")),
        }
    }

    fn json<T: Serialize>(&self, what: &str, v: &T) -> Result<String, StateError> {
        serde_json::to_string(v).map_err(|e| self.bad(format!("{what}: {e}")))
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        rows: Vec<(String, String)>,
        what: &str,
    ) -> Result<Vec<T>, StateError> {
        rows.into_iter()
            .map(|(key, text)| {
                serde_json::from_str(&text).map_err(|e| self.bad(format!("{what} {key}: {e}")))
            })
            .collect()
    }

    /// The pool as stored (the unfinished jobs and every worker), with `policy` in its
    /// policy line: what an operator sees where no scheduler answers (no wait reasons).
    pub fn view(&self, policy: String) -> Result<PoolView, StateError> {
        Ok(PoolView {
            queue: self.jobs(true)?.into_iter().map(|j| j.view).collect(),
            workers: self.workers()?,
            policy,
        })
    }

    /// Writes a job's row.
    pub fn save_job(&self, job: &StoredJob) -> Result<(), StateError> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let text = self.json(&format!("pool job {}", job.view.id), job)?;
        match &self.backend {
            Backend::Sqlite { db, .. } => {
                db.execute(
                    "INSERT INTO pool_jobs (id, finished, record) VALUES (?1, ?2, ?3)
                     ON CONFLICT(id) DO UPDATE SET finished = excluded.finished, record = excluded.record",
                    params![job.view.id as i64, job.finished(), text],
                )?;
                Ok(())
            }
            Backend::Pg { reg, epoch } => {
                reg.pool_save_job(*epoch, job.view.id, job.finished(), text)
            }
        }
    }

    /// Jobs, oldest first: the unfinished ones only, or all.
    pub fn jobs(&self, unfinished_only: bool) -> Result<Vec<StoredJob>, StateError> {
        let rows: Vec<(String, String)> = match &self.backend {
            Backend::Sqlite { db, .. } => {
                let sql = if unfinished_only {
                    "SELECT id, record FROM pool_jobs WHERE finished = 0 ORDER BY id"
                } else {
                    "SELECT id, record FROM pool_jobs ORDER BY id"
                };
                let mut st = db.prepare(sql)?;
                let rows =
                    st.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
                rows.map(|r| r.map(|(id, t)| (id.to_string(), t)))
                    .collect::<Result<_, _>>()?
            }
            Backend::Pg { reg, .. } => reg
                .pool_jobs(unfinished_only)?
                .into_iter()
                .map(|(id, t)| (id.to_string(), t))
                .collect(),
        };
        self.parse(rows, "pool_jobs row")
    }

    /// The highest job id ever given (0 when none).
    pub fn max_job_id(&self) -> Result<u64, StateError> {
        match &self.backend {
            Backend::Sqlite { db, .. } => {
                let v: Option<i64> =
                    db.query_row("SELECT MAX(id) FROM pool_jobs", [], |r| r.get(0))?;
                Ok(v.unwrap_or(0).max(0) as u64)
            }
            Backend::Pg { reg, .. } => reg.pool_max_job_id(),
        }
    }

    /// Writes a worker's row.
    pub fn save_worker(&self, w: &WorkerView) -> Result<(), StateError> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        let text = self.json(&format!("pool worker {}", w.name), w)?;
        match &self.backend {
            Backend::Sqlite { db, .. } => {
                db.execute(
                    "INSERT INTO pool_workers (name, record) VALUES (?1, ?2)
                     ON CONFLICT(name) DO UPDATE SET record = excluded.record",
                    params![w.name, text],
                )?;
                Ok(())
            }
            Backend::Pg { reg, epoch } => reg.pool_save_worker(*epoch, w.name.clone(), text),
        }
    }

    /// Every worker that ever reported, by name.
    pub fn workers(&self) -> Result<Vec<WorkerView>, StateError> {
        let rows = match &self.backend {
            Backend::Sqlite { db, .. } => {
                let mut st = db.prepare("SELECT name, record FROM pool_workers ORDER BY name")?;
                let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Pg { reg, .. } => reg.pool_workers()?,
        };
        self.parse(rows, "pool_workers row")
    }

    /// Sets a worker's flags (the operator's commands).
    pub fn set_flags(&self, name: &str, f: Flags) -> Result<(), StateError> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        match &self.backend {
            Backend::Sqlite { db, .. } => {
                db.execute(
                    "INSERT INTO pool_flags (name, cordoned, draining) VALUES (?1, ?2, ?3)
                     ON CONFLICT(name) DO UPDATE SET cordoned = excluded.cordoned, draining = excluded.draining",
                    params![name, f.cordoned, f.draining],
                )?;
                Ok(())
            }
            Backend::Pg { reg, .. } => reg.pool_set_flags(name.to_string(), f.cordoned, f.draining),
        }
    }

    /// Every worker's flags.
    pub fn flags(&self) -> Result<Vec<(String, Flags)>, StateError> {
        match &self.backend {
            Backend::Sqlite { db, .. } => {
                let mut st =
                    db.prepare("SELECT name, cordoned, draining FROM pool_flags ORDER BY name")?;
                let rows = st.query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        Flags {
                            cordoned: r.get(1)?,
                            draining: r.get(2)?,
                        },
                    ))
                })?;
                Ok(rows.collect::<Result<_, _>>()?)
            }
            Backend::Pg { reg, .. } => Ok(reg
                .pool_flags()?
                .into_iter()
                .map(|(name, cordoned, draining)| (name, Flags { cordoned, draining }))
                .collect()),
        }
    }

    /// Stores a usage record, once per (job, attempt, worker) (a repeat is ignored), as the
    /// next number of the store's one sequence: `seal(seq)` is the stored row (the record
    /// numbered and countersigned, [`SignedUsage`]). True when it was new.
    pub fn save_usage(
        &self,
        u: &UsageRecord,
        stored_ms: u64,
        seal: Seal,
    ) -> Result<bool, StateError> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        match &self.backend {
            Backend::Sqlite { db, .. } => {
                let tx = db.unchecked_transaction()?;
                let known: i64 = tx.query_row(
                    "SELECT count(*) FROM pool_usage WHERE job = ?1 AND attempt = ?2 AND worker = ?3",
                    params![u.job as i64, u.attempt, u.worker],
                    |r| r.get(0),
                )?;
                if known > 0 {
                    return Ok(false);
                }
                let seq: i64 = tx.query_row(
                    "SELECT COALESCE(MAX(seq), 0) + 1 FROM pool_usage",
                    [],
                    |r| r.get(0),
                )?;
                let text = seal(seq as u64);
                tx.execute(
                    "INSERT INTO pool_usage (job, attempt, worker, end_ms, record, seq, stored_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        u.job as i64,
                        u.attempt,
                        u.worker,
                        u.end_ms as i64,
                        text,
                        seq,
                        stored_ms as i64
                    ],
                )?;
                tx.commit()?;
                Ok(true)
            }
            Backend::Pg { reg, epoch } => reg.pool_save_usage(
                *epoch,
                (u.job, u.attempt, u.worker.clone()),
                (u.end_ms, stored_ms),
                seal,
            ),
        }
    }

    /// Usage records that ended at or after `since_ms`, in end order.
    pub fn usage_since(&self, since_ms: u64) -> Result<Vec<UsageRecord>, StateError> {
        let rows: Vec<UsageRow> = match &self.backend {
            Backend::Sqlite { db, .. } => {
                let mut st = db.prepare(
                    "SELECT seq, stored_ms, record FROM pool_usage WHERE end_ms >= ?1
                     ORDER BY end_ms, job, worker",
                )?;
                let rows = st.query_map(params![since_ms as i64], usage_row)?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Pg { reg, .. } => reg.pool_usage_since(since_ms)?,
        };
        rows.into_iter()
            .map(|r| self.signed(r).map(|s| s.record))
            .collect()
    }

    /// The records stored at or after `since_ms`, numbered and signed, in sequence order.
    pub fn usage_export(&self, since_ms: u64) -> Result<Vec<SignedUsage>, StateError> {
        let rows: Vec<UsageRow> = match &self.backend {
            Backend::Sqlite { db, .. } => {
                let mut st = db.prepare(
                    "SELECT seq, stored_ms, record FROM pool_usage WHERE stored_ms >= ?1 ORDER BY seq",
                )?;
                let rows = st.query_map(params![since_ms as i64], usage_row)?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Pg { reg, .. } => reg.pool_usage_export(since_ms)?,
        };
        rows.into_iter().map(|r| self.signed(r)).collect()
    }

    /// The records numbered after `seq`, in sequence order (an index kept up to date by
    /// asking for what is new: one indexed query that finds nothing while nothing was stored).
    pub fn usage_after(&self, seq: u64) -> Result<Vec<SignedUsage>, StateError> {
        let rows: Vec<UsageRow> = match &self.backend {
            Backend::Sqlite { db, .. } => {
                let mut st = db.prepare_cached(
                    "SELECT seq, stored_ms, record FROM pool_usage WHERE seq > ?1 ORDER BY seq",
                )?;
                let rows = st.query_map(params![seq as i64], usage_row)?;
                rows.collect::<Result<_, _>>()?
            }
            Backend::Pg { reg, .. } => reg.pool_usage_after(seq)?,
        };
        rows.into_iter().map(|r| self.signed(r)).collect()
    }

    /// A stored usage row: a [`SignedUsage`], or a plain record stored before records were
    /// signed (numbered when the store was migrated).
    fn signed(&self, (seq, stored_ms, text): UsageRow) -> Result<SignedUsage, StateError> {
        let bad = |e: serde_json::Error| self.bad(format!("pool_usage row {seq}: {e}"));
        match serde_json::from_str::<SignedUsage>(&text) {
            Ok(s) => Ok(s),
            Err(e) if text.contains("\"record\"") => Err(bad(e)),
            Err(_) => Ok(SignedUsage::legacy(
                seq as u64,
                stored_ms as u64,
                serde_json::from_str(&text).map_err(bad)?,
            )),
        }
    }
}

fn usage_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UsageRow> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

/// Gives `pool_usage` its sequence (`seq`, unique) and store time (`stored_ms`, indexed):
/// rows stored before them are numbered in end order, with their end as their store time.
fn migrate_usage(db: &Connection) -> Result<(), StateError> {
    let has_seq = db
        .prepare("SELECT name FROM pragma_table_info('pool_usage') WHERE name = 'seq'")?
        .exists([])?;
    if !has_seq {
        let tx = db.unchecked_transaction()?;
        tx.execute_batch(
            "ALTER TABLE pool_usage ADD COLUMN seq INTEGER;
             ALTER TABLE pool_usage ADD COLUMN stored_ms INTEGER;",
        )?;
        let keys: Vec<i64> = {
            let mut st =
                tx.prepare("SELECT rowid FROM pool_usage ORDER BY end_ms, job, attempt, worker")?;
            let rows = st.query_map([], |r| r.get(0))?;
            rows.collect::<Result<_, _>>()?
        };
        for (i, rowid) in keys.iter().enumerate() {
            tx.execute(
                "UPDATE pool_usage SET seq = ?1, stored_ms = end_ms WHERE rowid = ?2",
                params![i as i64 + 1, rowid],
            )?;
        }
        tx.execute_batch(
            "CREATE UNIQUE INDEX pool_usage_seq ON pool_usage (seq);
             CREATE INDEX pool_usage_stored ON pool_usage (stored_ms);",
        )?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::pool::{Inventory, SubmitRequest};

    fn job(id: u64, state: &str) -> StoredJob {
        StoredJob {
            view: JobView {
                id,
                owner: "alice".into(),
                state: state.into(),
                request: SubmitRequest {
                    command: vec!["true".into()],
                    nodes: 1,
                    ..Default::default()
                },
                reason: None,
                attempt: 0,
                members: vec![],
                submitted_ms: 1,
                started_ms: None,
                ended_ms: None,
                cluster: None,
            },
            retries_left: 1,
            cluster_token: None,
        }
    }

    #[test]
    fn jobs_workers_flags_and_usage_survive_reopening() {
        let dir = tempfile::tempdir().expect("must succeed");
        {
            let s = PoolStore::open(dir.path()).expect("must succeed");
            s.save_job(&job(1, "pending")).expect("must succeed");
            s.save_job(&job(2, "running")).expect("must succeed");
            s.save_job(&job(2, "succeeded")).expect("must succeed");
            s.save_worker(&WorkerView {
                name: "gpu1".into(),
                state: "ready".into(),
                inventory: Inventory {
                    gpus: vec![],
                    cpus: 4,
                    memory_bytes: 1,
                    version: "0".into(),
                    simulated: true,
                    running: vec![],
                    ray: None,
                    ray_heads: vec![],
                    usage_key: None,
                },
                holders: vec![],
                flagged: vec![],
                first_seen_ms: 1,
                connected_since_ms: Some(1),
                last_seen_ms: 2,
                uptime_ms: 1,
                usage_keys: vec![],
            })
            .expect("must succeed");
            s.set_flags(
                "gpu1",
                Flags {
                    cordoned: true,
                    draining: false,
                },
            )
            .expect("must succeed");
            let u = UsageRecord {
                job: 2,
                attempt: 1,
                rank: 0,
                engineer: "alice".into(),
                worker: "gpu1".into(),
                gpu_model: "H100".into(),
                gpus: vec!["GPU-1".into()],
                start_ms: Some(10),
                end_ms: 20,
                gpu_seconds: 0.01,
                outcome: "succeeded".into(),
                exit_code: Some(0),
            };
            let key = weft_proto::usage::Signer::from_seed(&[7; 32]);
            let seal = |u: &UsageRecord| -> Seal {
                let (u, key) = (u.clone(), weft_proto::usage::Signer::from_seed(&[7; 32]));
                Box::new(move |seq| {
                    let s =
                        SignedUsage::countersign(seq, 30, "r", u.clone(), Err("x".into()), &key);
                    serde_json::to_string(&s).expect("serializes")
                })
            };
            assert!(s.save_usage(&u, 30, seal(&u)).expect("must succeed"));
            assert!(
                !s.save_usage(&u, 31, seal(&u)).expect("must succeed"),
                "a replayed end is stored once"
            );
            let v = UsageRecord {
                job: 3,
                ..u.clone()
            };
            assert!(s.save_usage(&v, 32, seal(&v)).expect("must succeed"));
            let e = s.usage_export(0).expect("must succeed");
            assert_eq!(e.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
            assert_eq!(e[1].record, v);
            assert_eq!(e[0].coord_key.as_deref(), Some(key.public()));
        }
        let s = PoolStore::open(dir.path()).expect("must succeed");
        let unfinished = s.jobs(true).expect("must succeed");
        assert_eq!(unfinished.len(), 1);
        assert_eq!(unfinished[0].view.id, 1);
        assert_eq!(s.jobs(false).expect("must succeed").len(), 2);
        assert_eq!(s.max_job_id().expect("must succeed"), 2);
        assert_eq!(s.workers().expect("must succeed")[0].name, "gpu1");
        assert!(s.flags().expect("must succeed")[0].1.cordoned);
        assert_eq!(s.usage_since(20).expect("must succeed").len(), 2);
        assert_eq!(s.usage_since(21).expect("must succeed").len(), 0);
        assert_eq!(s.usage_export(31).expect("must succeed").len(), 1);
    }

    #[test]
    fn usage_rows_of_an_older_store_are_numbered_and_read_as_unsigned() {
        let dir = tempfile::tempdir().expect("must succeed");
        drop(crate::registry::Registry::open(dir.path()).expect("must succeed"));
        {
            let db = Connection::open(dir.path().join("registry.sqlite")).expect("must succeed");
            db.execute_batch(
                "CREATE TABLE pool_usage (job INTEGER NOT NULL, attempt INTEGER NOT NULL,
                    worker TEXT NOT NULL, end_ms INTEGER NOT NULL, record TEXT NOT NULL,
                    PRIMARY KEY (job, attempt, worker));",
            )
            .expect("must succeed");
            for (job, end) in [(5, 50), (4, 40)] {
                let u = serde_json::json!({"job": job, "attempt": 1, "rank": 0, "engineer": "a",
                    "worker": "w", "gpu_model": "m", "gpus": [], "start_ms": null, "end_ms": end,
                    "gpu_seconds": 0.0, "outcome": "lost", "exit_code": null});
                db.execute(
                    "INSERT INTO pool_usage VALUES (?1, 1, 'w', ?2, ?3)",
                    params![job, end, u.to_string()],
                )
                .expect("must succeed");
            }
        }
        let s = PoolStore::open(dir.path()).expect("must succeed");
        let e = s.usage_export(0).expect("must succeed");
        let got: Vec<(u64, u64, u64)> = e
            .iter()
            .map(|r| (r.seq, r.record.job, r.stored_ms))
            .collect();
        assert_eq!(got, vec![(1, 4, 40), (2, 5, 50)]);
        assert!(e[0].coord_sig.is_none() && e[0].unsigned.is_some());
        assert_eq!(s.usage_since(0).expect("must succeed").len(), 2);
    }
}
