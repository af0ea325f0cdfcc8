//! SQLite job store (WAL) in the state directory. Each job is one row: id, state, JSON record.
//! [`Writer`] owns the store on its own OS thread so that no async task ever waits on SQLite.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

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

/// The job in row `id`'s record.
fn decode(id: u64, record: &str) -> Result<Job, StoreError> {
    serde_json::from_str(record).map_err(|source| StoreError::Corrupt { id, source })
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
        rec.map(|r| decode(id, &r)).transpose()
    }

    /// All jobs in id (submission) order.
    pub fn all(&self) -> Result<Vec<Job>, StoreError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, record FROM jobs ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        rows.map(|row| {
            let (id, rec) = row?;
            decode(id as u64, &rec)
        })
        .collect()
    }
}

enum Cmd {
    Put {
        job: Box<Job>,
        done: Option<oneshot::Sender<Result<(), StoreError>>>,
    },
    Flush(oneshot::Sender<()>),
}

/// The store on its own thread ("weft-store"), fed by a channel: records are written in the
/// order they were sent, so a job's later state is never overwritten by an earlier one.
#[derive(Debug, Clone)]
pub struct Writer {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Put { job, .. } => write!(f, "Put({})", job.id),
            Cmd::Flush(_) => write!(f, "Flush"),
        }
    }
}

/// The writer thread is gone (it only ends when every [`Writer`] is dropped).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the job store writer has stopped")]
pub struct WriterGone;

impl Writer {
    /// Starts the writer thread; it ends once every clone of the writer is dropped and what was
    /// sent is written.
    pub fn start(store: Store) -> std::io::Result<Writer> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        std::thread::Builder::new()
            .name("weft-store".into())
            .spawn(move || {
                while let Some(cmd) = rx.blocking_recv() {
                    match cmd {
                        Cmd::Put { job, done } => {
                            let res = store.put(&job);
                            match done {
                                Some(d) => {
                                    let _ = d.send(res);
                                }
                                None => {
                                    if let Err(e) = res {
                                        warn!(job = job.id, error = %e, "cannot persist job");
                                    }
                                }
                            }
                        }
                        Cmd::Flush(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(Writer { tx })
    }

    /// Queues `job` for writing. Never blocks.
    pub fn put(&self, job: Job) {
        let id = job.id;
        if self
            .tx
            .send(Cmd::Put {
                job: Box::new(job),
                done: None,
            })
            .is_err()
        {
            warn!(job = id, "job store writer stopped; record not persisted");
        }
    }

    /// Queues `job` for writing; the receiver says when it is written and how that went.
    pub fn put_acked(&self, job: Job) -> oneshot::Receiver<Result<(), StoreError>> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Put {
            job: Box::new(job),
            done: Some(done),
        });
        rx
    }

    /// Waits until everything sent before is written.
    pub async fn flush(&self) -> Result<(), WriterGone> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Cmd::Flush(done)).map_err(|_| WriterGone)?;
        rx.await.map_err(|_| WriterGone)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(id: u64, state: &str) -> Job {
        let spec = crate::job::JobSpec::for_test(0, None);
        let mut j = Job::new(id, "@local".into(), spec, 1, "x.log".into());
        if state == "lost" {
            j.lost(2, "x".into());
        }
        j
    }

    #[tokio::test]
    async fn the_writer_keeps_the_order_of_a_job_s_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jobs.sqlite");
        let w = Writer::start(Store::open(&path).unwrap()).unwrap();
        w.put(job(1, "queued"));
        w.put(job(1, "lost"));
        w.put_acked(job(2, "queued")).await.unwrap().unwrap();
        w.flush().await.unwrap();
        let s = Store::open(&path).unwrap();
        assert_eq!(s.get(1).unwrap().unwrap().state.name(), "lost");
        assert_eq!(s.next_id().unwrap(), 3);
    }
}
