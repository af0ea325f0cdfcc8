//! SQLite job store (WAL) in the state directory. Each job is one row: id, state, JSON record.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};

use crate::job::Job;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("job record {id} is corrupt: {source}")]
    Corrupt { id: u64, source: serde_json::Error },
    #[error("cannot encode job record: {0}")]
    Encode(serde_json::Error),
}

#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS jobs (
                id INTEGER PRIMARY KEY,
                state TEXT NOT NULL,
                record TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);",
        )?;
        Ok(Self { conn })
    }

    pub fn next_id(&self) -> Result<u64, StoreError> {
        let max: Option<i64> = self
            .conn
            .query_row("SELECT MAX(id) FROM jobs", [], |r| r.get(0))?;
        Ok(max.map_or(1, |m| m as u64 + 1))
    }

    pub fn put(&self, job: &Job) -> Result<(), StoreError> {
        let rec = serde_json::to_string(job).map_err(StoreError::Encode)?;
        self.conn.execute(
            "INSERT INTO jobs (id, state, record) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET state = excluded.state, record = excluded.record",
            params![job.id as i64, job.state.name(), rec],
        )?;
        Ok(())
    }

    pub fn get(&self, id: u64) -> Result<Option<Job>, StoreError> {
        let rec: Option<String> = self
            .conn
            .query_row("SELECT record FROM jobs WHERE id = ?1", [id as i64], |r| {
                r.get(0)
            })
            .optional()?;
        rec.map(|r| serde_json::from_str(&r).map_err(|source| StoreError::Corrupt { id, source }))
            .transpose()
    }

    /// All jobs in id (submission) order.
    pub fn all(&self) -> Result<Vec<Job>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, record FROM jobs ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, rec) = row?;
            out.push(
                serde_json::from_str(&rec).map_err(|source| StoreError::Corrupt {
                    id: id as u64,
                    source,
                })?,
            );
        }
        Ok(out)
    }
}
