//! The pool's records and its scheduling lease on PostgreSQL (a fleet's
//! shared store; schema 6): the same four tables as SQLite's
//! [`crate::pool_store`] (one JSON record per row) plus `pool_lease`, one row
//! naming the relay that decides the queue and placements.
//!
//! **The lease.** A relay takes the lease when it is vacant or expired and
//! renews it every second; it expires [`LEASE_TTL_MS`] after the last
//! renewal by the database's clock. Each new holding draws a new `epoch`.
//! **Fencing:** every write of the scheduler's records (jobs, workers, usage)
//! runs in a transaction that first locks the lease row and checks that this
//! relay still holds it with the epoch it was given (`FOR SHARE`: a takeover
//! waits for the write to commit, and a write after a takeover is refused),
//! so a relay that lost the lease without knowing it (paused, cut off from
//! the database) cannot overwrite what its successor decided. The operator's
//! flags are not fenced (any relay's `pool cordon` writes them).

use crate::error::StateError;
use crate::pg::{pg_err, PgRegistry};

/// A lease not renewed for this long (ms, the database's clock) may be taken.
pub const LEASE_TTL_MS: i64 = 5000;

/// Who holds the lease, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    /// The relay's name.
    pub relay: String,
    /// Whether it is still valid (renewed within [`LEASE_TTL_MS`]).
    pub live: bool,
    /// Its epoch.
    pub epoch: i64,
}

/// Checks, inside `tx`, that `relay` holds the lease with `epoch`, and keeps
/// the lease row locked until `tx` ends.
fn fence(tx: &mut postgres::Transaction<'_>, relay: &str, epoch: i64) -> Result<(), StateError> {
    let held = tx
        .query_opt(
            "SELECT 1 FROM pool_lease WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires > now() FOR SHARE",
            &[&relay, &epoch],
        )
        .map_err(|e| pg_err(&e))?;
    if held.is_none() {
        return Err(StateError::Pg(format!(
            "relay {relay} no longer holds the pool's scheduling lease (epoch {epoch}); not written"
        )));
    }
    Ok(())
}

/// Makes the stored text of a usage record from its sequence number (called again when a
/// PostgreSQL transaction is retried).
pub type Seal = Box<dyn Fn(u64) -> String + Send>;

/// (seq, stored_ms, record text) of a `pool_usage` row.
pub(crate) type UsageRow = (i64, i64, String);

impl PgRegistry {
    /// Takes or renews the scheduling lease for this relay; the epoch of its
    /// holding, or None while another relay holds it.
    pub fn pool_lease(&self) -> Result<Option<i64>, StateError> {
        let me = self.relay_name().to_string();
        self.call(move |c| {
            let row = c
                .query_opt(
                    "UPDATE pool_lease SET
                        epoch = CASE WHEN holder = $1 AND expires > now() THEN epoch ELSE epoch + 1 END,
                        holder = $1,
                        expires = now() + make_interval(secs => $2::BIGINT / 1000.0)
                     WHERE id = 1 AND (holder = $1 OR expires <= now())
                     RETURNING epoch",
                    &[&me, &LEASE_TTL_MS],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    /// Gives the lease up now (a relay that drains), if this relay holds it.
    pub fn pool_lease_release(&self) -> Result<(), StateError> {
        let me = self.relay_name().to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE pool_lease SET expires = now() WHERE id = 1 AND holder = $1",
                &[&me],
            )
            .map(drop)
            .map_err(|e| pg_err(&e))
        })
    }

    /// Who holds the lease (None: never taken).
    pub fn pool_lease_holder(&self) -> Result<Option<LeaseHolder>, StateError> {
        self.call(|c| {
            let row = c
                .query_one(
                    "SELECT holder, expires > now(), epoch FROM pool_lease WHERE id = 1",
                    &[],
                )
                .map_err(|e| pg_err(&e))?;
            let relay: String = row.get(0);
            Ok((!relay.is_empty()).then(|| LeaseHolder {
                relay,
                live: row.get(1),
                epoch: row.get(2),
            }))
        })
    }

    /// Writes a job's row (fenced by `epoch`).
    pub fn pool_save_job(
        &self,
        epoch: i64,
        id: u64,
        finished: bool,
        record: String,
    ) -> Result<(), StateError> {
        let me = self.relay_name().to_string();
        let id = id as i64;
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            fence(&mut tx, &me, epoch)?;
            tx.execute(
                "INSERT INTO pool_jobs (id, finished, record) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET finished = $2, record = $3",
                &[&id, &finished, &record],
            )
            .map_err(|e| pg_err(&e))?;
            tx.commit().map_err(|e| pg_err(&e))
        })
    }

    /// Job rows (id, record), oldest first: the unfinished ones only, or all.
    pub fn pool_jobs(&self, unfinished_only: bool) -> Result<Vec<(i64, String)>, StateError> {
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT id, record FROM pool_jobs WHERE NOT finished OR NOT $1 ORDER BY id",
                    &[&unfinished_only],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// The highest job id ever given (0 when none).
    pub fn pool_max_job_id(&self) -> Result<u64, StateError> {
        self.call(|c| {
            let v: Option<i64> = c
                .query_one("SELECT max(id) FROM pool_jobs", &[])
                .map_err(|e| pg_err(&e))?
                .get(0);
            Ok(v.unwrap_or(0).max(0) as u64)
        })
    }

    /// Writes a worker's row (fenced by `epoch`).
    pub fn pool_save_worker(
        &self,
        epoch: i64,
        name: String,
        record: String,
    ) -> Result<(), StateError> {
        let me = self.relay_name().to_string();
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            fence(&mut tx, &me, epoch)?;
            tx.execute(
                "INSERT INTO pool_workers (name, record) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET record = $2",
                &[&name, &record],
            )
            .map_err(|e| pg_err(&e))?;
            tx.commit().map_err(|e| pg_err(&e))
        })
    }

    /// Worker rows (name, record), by name.
    pub fn pool_workers(&self) -> Result<Vec<(String, String)>, StateError> {
        self.call(|c| {
            let rows = c
                .query("SELECT name, record FROM pool_workers ORDER BY name", &[])
                .map_err(|e| pg_err(&e))?;
            Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    /// Sets a worker's flags (cordoned, draining).
    pub fn pool_set_flags(
        &self,
        name: String,
        cordoned: bool,
        draining: bool,
    ) -> Result<(), StateError> {
        self.call(move |c| {
            c.execute(
                "INSERT INTO pool_flags (name, cordoned, draining) VALUES ($1, $2, $3)
                 ON CONFLICT (name) DO UPDATE SET cordoned = $2, draining = $3",
                &[&name, &cordoned, &draining],
            )
            .map(drop)
            .map_err(|e| pg_err(&e))
        })
    }

    /// Every worker's flags (name, cordoned, draining), by name.
    pub fn pool_flags(&self) -> Result<Vec<(String, bool, bool)>, StateError> {
        self.call(|c| {
            let rows = c
                .query(
                    "SELECT name, cordoned, draining FROM pool_flags ORDER BY name",
                    &[],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    /// Stores a usage record once per (job, attempt, worker) (fenced by `epoch`) as the next
    /// number of the sequence; `seal(seq)` is the row's text. True when it was new.
    pub fn pool_save_usage(
        &self,
        epoch: i64,
        key: (u64, u32, String),
        (end_ms, stored_ms): (u64, u64),
        seal: Seal,
    ) -> Result<bool, StateError> {
        let me = self.relay_name().to_string();
        let (job, attempt, worker) = (key.0 as i64, i64::from(key.1), key.2);
        let (end_ms, stored_ms) = (end_ms as i64, stored_ms as i64);
        self.call(move |c| {
            let mut tx = c.transaction().map_err(|e| pg_err(&e))?;
            fence(&mut tx, &me, epoch)?;
            let known = tx
                .query_opt(
                    "SELECT 1 FROM pool_usage WHERE job = $1 AND attempt = $2 AND worker = $3",
                    &[&job, &attempt, &worker],
                )
                .map_err(|e| pg_err(&e))?;
            if known.is_some() {
                return Ok(false);
            }
            // Rows an older relay of the fleet stored have no number yet: theirs come first.
            tx.execute(
                "UPDATE pool_usage u SET seq = m.base + s.n, stored_ms = COALESCE(u.stored_ms, u.end_ms)
                 FROM (SELECT job, attempt, worker,
                              row_number() OVER (ORDER BY end_ms, job, attempt, worker) AS n
                       FROM pool_usage WHERE seq IS NULL) s,
                      (SELECT COALESCE(MAX(seq), 0) AS base FROM pool_usage) m
                 WHERE u.job = s.job AND u.attempt = s.attempt AND u.worker = s.worker",
                &[],
            )
            .map_err(|e| pg_err(&e))?;
            let seq: i64 = tx
                .query_one("SELECT COALESCE(MAX(seq), 0) + 1 FROM pool_usage", &[])
                .map_err(|e| pg_err(&e))?
                .get(0);
            let record = seal(seq as u64);
            tx.execute(
                "INSERT INTO pool_usage (job, attempt, worker, end_ms, record, seq, stored_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[&job, &attempt, &worker, &end_ms, &record, &seq, &stored_ms],
            )
            .map_err(|e| pg_err(&e))?;
            tx.commit().map_err(|e| pg_err(&e))?;
            Ok(true)
        })
    }

    /// Usage rows stored at or after `since_ms`, in sequence order.
    pub fn pool_usage_export(&self, since_ms: u64) -> Result<Vec<UsageRow>, StateError> {
        let since = since_ms as i64;
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT seq, COALESCE(stored_ms, end_ms), record FROM pool_usage
                     WHERE seq IS NOT NULL AND COALESCE(stored_ms, end_ms) >= $1 ORDER BY seq",
                    &[&since],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    /// Usage rows numbered after `seq`, in sequence order.
    pub fn pool_usage_after(&self, seq: u64) -> Result<Vec<UsageRow>, StateError> {
        let after = seq as i64;
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT seq, COALESCE(stored_ms, end_ms), record FROM pool_usage
                     WHERE seq > $1 ORDER BY seq",
                    &[&after],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }

    /// Usage rows that ended at or after `since_ms`, in end order.
    pub fn pool_usage_since(&self, since_ms: u64) -> Result<Vec<UsageRow>, StateError> {
        let since = since_ms as i64;
        self.call(move |c| {
            let rows = c
                .query(
                    "SELECT COALESCE(seq, 0), COALESCE(stored_ms, end_ms), record FROM pool_usage
                     WHERE end_ms >= $1 ORDER BY end_ms, job, worker",
                    &[&since],
                )
                .map_err(|e| pg_err(&e))?;
            Ok(rows
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
    }
}
