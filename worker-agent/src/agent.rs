//! The job engine: the I/O shell around the pure [`Queue`] (`queue.rs`), which makes every
//! decision. The shell holds the queue's lock only to call it; it then carries out the
//! returned [`Effect`]s outside the lock: records go to the store's writer thread (queued
//! under the lock, so they are written in decision order), processes are forked on the
//! blocking pool, signals are sent, cgroups cleaned up on the blocking pool. One driver task
//! calls [`Queue::handle_timeout`] when [`Queue::next_wakeup`] says, and hands the queue the
//! healthy GPUs every second.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::job::{Capabilities, ExitInfo, Job, JobRequest, JobState, SpecError, StartMark};
use crate::queue::{Effect, Found, Queue, QueueConfig, Sig, Spawned, StartRefused};
use crate::sampler::{unix_ms, SharedSnapshot};
use crate::store::{Store, StoreError, Writer};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot prepare state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job {0} not found")]
    NotFound(u64),
    #[error("invalid job: {0}")]
    Invalid(#[from] SpecError),
    #[error("cannot start the job store writer: {0}")]
    Writer(std::io::Error),
    #[error("the job store writer has stopped; the record may not be saved")]
    WriterGone,
    #[error("internal task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("cannot start on these GPUs: {0}")]
    Refused(#[from] StartRefused),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub state_dir: PathBuf,
    /// Time between SIGTERM and SIGKILL of a job's process group. Default 10 s.
    pub kill_grace: Duration,
    /// The `worker-agent` binary, run as `exec-shim` around each job so its exit status
    /// survives an agent crash. `None`: run the command directly.
    pub shim: Option<PathBuf>,
    /// Try per-job cgroup v2.
    pub cgroups: bool,
}

/// Status file written by the exec shim when the job's command ends.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ShimStatus {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

/// How often the driver hands the queue the healthy GPUs (a GPU that recovers gets work
/// within this time) when no timer is due sooner.
const HEALTH_POLL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    cgroups: Option<crate::cgroup::Cgroups>,
    snapshot: SharedSnapshot,
    queue: Mutex<Queue>,
    store: Writer,
    /// The queue's timers may have changed: the driver asks `next_wakeup` again.
    wake: Notify,
    /// Bumped on every step that changed a record or a GPU holder (see [`Engine::changes`]).
    changed: watch::Sender<u64>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

fn log_dir(state: &Path) -> PathBuf {
    state.join("logs")
}

fn status_path(state: &Path, id: u64) -> PathBuf {
    log_dir(state).join(format!("{id}.exit"))
}

fn start_mark_path(state: &Path, id: u64) -> PathBuf {
    log_dir(state).join(format!("{id}.start"))
}

/// Writes the job's [`StartMark`] (to a temporary name, then renamed: a reader sees all of
/// it or none).
fn write_start_mark(state: &Path, id: u64, mark: &StartMark) -> std::io::Result<()> {
    let path = start_mark_path(state, id);
    let tmp = path.with_extension("start.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(mark).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, &path)
}

fn read_start_mark(state: &Path, id: u64) -> Option<StartMark> {
    let s = std::fs::read(start_mark_path(state, id)).ok()?;
    serde_json::from_slice(&s).ok()
}

/// Queued records whose process had started (a start mark says so) become running records,
/// as the write the agent did not live to make would have left them. Returns their ids.
fn recover_starts(jobs: &mut [Job], mark: impl Fn(u64) -> Option<StartMark>) -> Vec<u64> {
    let mut recovered = Vec::new();
    for job in jobs.iter_mut().filter(|j| j.state == JobState::Queued) {
        let Some(m) = mark(job.id) else { continue };
        if job.recover_start(&m).is_ok() {
            info!(
                job = job.id,
                pid = m.pid,
                "job had started when the agent stopped; its start is recovered from its start mark"
            );
            recovered.push(job.id);
        }
    }
    recovered
}

fn read_status(path: &Path) -> Option<ExitInfo> {
    let s = std::fs::read_to_string(path).ok()?;
    let st: ShimStatus = serde_json::from_str(&s).ok()?;
    Some(ExitInfo {
        code: st.code,
        signal: st.signal,
    })
}

/// Whether process `pid` exists and is not a zombie (an exited process not yet reaped is not
/// alive for our purposes).
pub fn alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence.
    let r = unsafe { libc::kill(p, 0) };
    if r != 0 {
        return false;
    }
    // A zombie is not alive for our purposes.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `pid` is still the job's process: alive, and started when the recorded one did
/// (a pid reused by another process does not count).
fn same_process(pid: u32, pid_start: Option<u64>) -> bool {
    pid > 0 && alive(pid) && proc_start_time(pid) == pid_start
}

/// Start time of a process in clock ticks since boot (/proc/PID/stat field 22).
fn proc_start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // fields after the command name: state is field 3, starttime field 22
    s.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// (pid, parent pid, process group) of every process, from `/proc`.
fn processes() -> Vec<(u32, u32, u32)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // after the command name: state, ppid, pgrp
            let mut f = s.rsplit(')').next()?.split_whitespace().skip(1);
            let ppid = f.next()?.parse().ok()?;
            let pgid = f.next()?.parse().ok()?;
            Some((pid, ppid, pgid))
        })
        .collect()
}

/// The process groups, other than `pgid` itself, of the processes descended from group
/// `pgid`: a job's process that made a group of its own (`ray start --block` does, for its
/// reaper) is still the job's and is signalled with it. Pure.
pub fn foreign_groups(procs: &[(u32, u32, u32)], pgid: u32) -> Vec<u32> {
    let mut tree: BTreeSet<u32> = procs
        .iter()
        .filter(|p| p.2 == pgid || p.0 == pgid)
        .map(|p| p.0)
        .collect();
    loop {
        let before = tree.len();
        for p in procs {
            if tree.contains(&p.1) {
                tree.insert(p.0);
            }
        }
        if tree.len() == before {
            break;
        }
    }
    let mut out: Vec<u32> = procs
        .iter()
        .filter(|p| tree.contains(&p.0) && p.2 != pgid && p.2 > 1)
        .map(|p| p.2)
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Signals the job's process group and every group its processes made.
fn signal_tree(pgid: u32, sig: i32) {
    let extra = foreign_groups(&processes(), pgid);
    signal_group(pgid, sig);
    for g in extra {
        debug!(pgid, group = g, "signal to a process group the job made");
        signal_group(g, sig);
    }
}

fn signal_group(pgid: u32, sig: i32) {
    if let Ok(p) = libc::pid_t::try_from(pgid) {
        if p > 1 {
            // SAFETY: sends a signal to a process group we created (pgid == job leader pid).
            unsafe { libc::kill(-p, sig) };
        }
    }
}

/// Effects left to run after the lock is released, and the acknowledgement of the first
/// record written, where asked for.
struct Step<R> {
    out: R,
    effects: Vec<Effect>,
    ack: Option<oneshot::Receiver<Result<(), StoreError>>>,
}

impl Engine {
    /// Opens the store, reconciles jobs left by a previous run, starts queued ones and the
    /// driver task. Must be called inside a tokio runtime.
    pub async fn start(
        cfg: EngineConfig,
        snapshot: SharedSnapshot,
    ) -> Result<Arc<Self>, AgentError> {
        let state_dir = cfg.state_dir.clone();
        let want_cgroups = cfg.cgroups;
        // Everything that touches the disk at startup, on the blocking pool.
        let (store, jobs, found, cgroups, recovered) = tokio::task::spawn_blocking(move || {
            let logs = log_dir(&state_dir);
            std::fs::create_dir_all(&logs).map_err(|source| AgentError::StateDir {
                path: logs.clone(),
                source,
            })?;
            let store = Store::open(&state_dir.join("jobs.sqlite"))?;
            let mut jobs = store.all()?;
            let recovered = recover_starts(&mut jobs, |id| read_start_mark(&state_dir, id));
            let found: Vec<Found> = jobs
                .iter()
                .filter(|j| j.state == JobState::Running)
                .map(|j| Found {
                    id: j.id,
                    status: read_status(&status_path(&state_dir, j.id)),
                    alive: same_process(j.pid.unwrap_or(0), j.pid_start),
                    oom: j
                        .cgroup
                        .as_deref()
                        .is_some_and(|d| crate::cgroup::oom_killed(Path::new(d))),
                })
                .collect();
            let cgroups = if want_cgroups {
                crate::cgroup::Cgroups::detect()
            } else {
                None
            };
            Ok::<_, AgentError>((store, jobs, found, cgroups, recovered))
        })
        .await??;
        let store = Writer::start(store).map_err(AgentError::Writer)?;
        let mut queue = Queue::restore(
            QueueConfig {
                kill_grace_ms: u64::try_from(cfg.kill_grace.as_millis()).unwrap_or(u64::MAX),
                log_dir: log_dir(&cfg.state_dir),
            },
            jobs,
        );
        let healthy = snapshot.read().healthy_uuids();
        let mut effects = queue.reconcile(unix_ms(), &found);
        // A recovered start the reconcile kept running (re-adopted) is written as running
        // now; one it ended comes with its own record.
        for id in recovered {
            let persisted = effects
                .iter()
                .any(|e| matches!(e, Effect::Persist(j) if j.id == id));
            if let (false, Some(job)) = (persisted, queue.get(id)) {
                effects.push(Effect::Persist(job.clone()));
            }
        }
        effects.extend(queue.set_healthy(healthy));
        let engine = Arc::new(Self {
            cfg,
            cgroups,
            snapshot,
            queue: Mutex::new(queue),
            store,
            wake: Notify::new(),
            changed: watch::Sender::new(0),
            driver: Mutex::new(None),
        });
        // Nothing else has the queue yet: the records of this first step go out first.
        let rest = engine.send_records(effects, false).0;
        engine.run(rest).await;
        let driver = tokio::spawn(engine.clone().drive());
        *engine.driver.lock() = Some(driver);
        Ok(engine)
    }

    /// Stops the driver and waits until every record decided so far is written. Running jobs
    /// keep running (the next start re-adopts them).
    pub async fn shutdown(&self) {
        if let Some(d) = self.driver.lock().take() {
            d.abort();
        }
        if self.store.flush().await.is_err() {
            warn!("job store writer stopped before shutdown");
        }
    }

    /// Calls the queue under the lock and queues the records it decided to the writer, still
    /// under the lock, so they reach the store in decision order. With `ack`, the first record
    /// comes back with a receiver for its write. The queue first learns the current GPU
    /// health, so no decision uses a stale one.
    fn step<R>(&self, ack: bool, f: impl FnOnce(&mut Queue) -> (R, Vec<Effect>)) -> Step<R> {
        let healthy = self.snapshot.read().healthy_uuids();
        let mut q = self.queue.lock();
        let mut effects = q.set_healthy(healthy);
        let (out, fx) = f(&mut q);
        effects.extend(fx);
        let (effects, ack) = self.send_records(effects, ack);
        drop(q);
        self.wake.notify_one();
        Step { out, effects, ack }
    }

    #[allow(clippy::type_complexity)]
    fn send_records(
        &self,
        effects: Vec<Effect>,
        mut ack: bool,
    ) -> (
        Vec<Effect>,
        Option<oneshot::Receiver<Result<(), StoreError>>>,
    ) {
        if !effects.is_empty() {
            // Every change of a record comes with a Persist, every new holder with a Spawn, and
            // a freed GPU with the Persist of its job's end.
            self.changed.send_modify(|n| *n = n.wrapping_add(1));
        }
        let mut rest = Vec::with_capacity(effects.len());
        let mut rx = None;
        for e in effects {
            match e {
                Effect::Persist(job) if ack => {
                    ack = false;
                    rx = Some(self.store.put_acked(job));
                }
                Effect::Persist(job) => self.store.put(job),
                other => rest.push(other),
            }
        }
        (rest, rx)
    }

    /// Carries out effects (records were already sent by `step`), in order. Forks happen on the
    /// blocking pool in their own task; a cgroup cleanup finishes before what follows it (so
    /// the next job on a GPU starts after the previous one's leftovers are gone).
    async fn run(self: &Arc<Self>, effects: Vec<Effect>) {
        for e in effects {
            match e {
                Effect::Persist(job) => self.store.put(job),
                Effect::Spawn { job, gpus } => {
                    tokio::spawn(self.clone().launch(job, gpus));
                }
                Effect::Adopt { id, pid, pid_start } => {
                    tokio::spawn(self.clone().supervise(id, pid, pid_start, None));
                }
                Effect::Signal { id, pgid, sig } => {
                    let (n, name) = match sig {
                        Sig::Term => (libc::SIGTERM, "SIGTERM"),
                        Sig::Kill => (libc::SIGKILL, "SIGKILL"),
                    };
                    debug!(job = id, pgid, signal = name, "signal to process group");
                    signal_tree(pgid, n);
                }
                Effect::CleanupCgroup { id, dir } => {
                    let done = tokio::task::spawn_blocking(move || {
                        crate::cgroup::kill_and_remove(Path::new(&dir))
                    })
                    .await;
                    if let Err(e) = done {
                        warn!(job = id, error = %e, "job cgroup cleanup failed");
                    }
                }
            }
        }
    }

    /// Timers and GPU health: one loop, woken by the earliest timer, by any change of the
    /// queue, or every [`HEALTH_POLL`].
    async fn drive(self: Arc<Self>) {
        loop {
            let healthy = self.snapshot.read().healthy_uuids();
            let now = unix_ms();
            let (effects, next) = {
                let mut q = self.queue.lock();
                let mut fx = q.set_healthy(healthy);
                fx.extend(q.handle_timeout(now));
                let next = q.next_wakeup();
                (self.send_records(fx, false).0, next)
            };
            self.run(effects).await;
            let wait = next
                .map_or(HEALTH_POLL, |t| {
                    Duration::from_millis(t.saturating_sub(unix_ms()))
                })
                .min(HEALTH_POLL);
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Validates and queues a job; answers once its record is written.
    pub async fn submit(
        self: &Arc<Self>,
        caller: String,
        req: JobRequest,
    ) -> Result<Job, AgentError> {
        let caps = Capabilities {
            gpus: self.snapshot.read().gpus.len(),
            cgroups: self.cgroups.is_some(),
        };
        // `is_dir` may touch a slow file system: off the runtime.
        let spec =
            tokio::task::spawn_blocking(move || req.validate(&caps, |w| Path::new(w).is_dir()))
                .await??;
        let st = self.step(true, |q| q.submit(unix_ms(), caller, spec));
        self.run(st.effects).await;
        self.written(st.ack).await?;
        Ok(st.out)
    }

    /// Starts a job at once on exactly `gpus` (UUIDs), or refuses ([`AgentError::Refused`]
    /// when one is unknown, unhealthy or held; [`AgentError::Invalid`] for a bad request):
    /// never queued. `req.gpus` is set from `gpus`. Answers once its record is written; the
    /// process is being started then (the record turns `running`, or `lost` if it could not
    /// start).
    pub async fn start_exact(
        self: &Arc<Self>,
        caller: String,
        mut req: JobRequest,
        gpus: Vec<String>,
    ) -> Result<Job, AgentError> {
        req.gpus = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
        let caps = Capabilities {
            gpus: self.snapshot.read().gpus.len(),
            cgroups: self.cgroups.is_some(),
        };
        let spec =
            tokio::task::spawn_blocking(move || req.validate(&caps, |w| Path::new(w).is_dir()))
                .await??;
        let known: Vec<String> = self
            .snapshot
            .read()
            .gpus
            .iter()
            .map(|g| g.sample.uuid.clone())
            .collect();
        let st = self.step(true, |q| {
            match q.start_exact(unix_ms(), caller, spec, &gpus, &known) {
                Ok((job, fx)) => (Ok(job), fx),
                Err(e) => (Err(AgentError::Refused(e)), Vec::new()),
            }
        });
        self.run(st.effects).await;
        self.written(st.ack).await?;
        st.out
    }

    /// A receiver that sees a new value after every change of a job record or of a GPU
    /// holder (coalesced: a reader that falls behind sees the latest only).
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Cancels a job (queued: dequeued; running: SIGTERM, SIGKILL after the grace period);
    /// answers once the record is written.
    pub async fn cancel(self: &Arc<Self>, id: u64) -> Result<Job, AgentError> {
        let st = self.step(true, |q| match q.cancel(unix_ms(), id) {
            Ok((job, fx)) => (Ok(job), fx),
            Err(e) => (Err(AgentError::NotFound(e.0)), Vec::new()),
        });
        self.run(st.effects).await;
        self.written(st.ack).await?;
        st.out
    }

    async fn written(
        &self,
        ack: Option<oneshot::Receiver<Result<(), StoreError>>>,
    ) -> Result<(), AgentError> {
        match ack {
            Some(rx) => rx
                .await
                .map_err(|_| AgentError::WriterGone)?
                .map_err(Into::into),
            None => Ok(()),
        }
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        self.queue.lock().get(id).cloned()
    }

    pub fn list(&self) -> Vec<Job> {
        self.queue.lock().jobs().cloned().collect()
    }

    /// GPU UUID → job id for GPUs currently held.
    pub fn holders(&self) -> BTreeMap<String, u64> {
        self.queue.lock().holders().clone()
    }

    /// Starts the job's process (cgroup, log, fork on the blocking pool), reports it to the
    /// queue, then supervises it.
    ///
    /// Boxed with an explicit `Send` type: `run` spawns it and it calls `run`, and the named
    /// type breaks that cycle for the compiler.
    fn launch(self: Arc<Self>, job: Job, gpus: Vec<String>) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.launch_inner(job, gpus).await })
    }

    async fn launch_inner(self: Arc<Self>, job: Job, gpus: Vec<String>) {
        let id = job.id;
        let me = self.clone();
        let spawned = tokio::task::spawn_blocking(move || me.spawn_job(&job, &gpus))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
        match spawned {
            Ok((child, sp)) => {
                let (pid, pid_start) = (sp.pid, sp.pid_start);
                let st = self.step(false, |q| ((), q.on_spawned(unix_ms(), id, sp)));
                self.run(st.effects).await;
                self.supervise(id, pid, pid_start, Some(child)).await;
            }
            Err(e) => {
                let why = e.to_string();
                let st = self.step(false, |q| ((), q.on_spawn_failed(unix_ms(), id, &why)));
                self.run(st.effects).await;
            }
        }
    }

    /// Blocking: the job's cgroup (where there are cgroups), its log file, and the fork.
    fn spawn_job(
        &self,
        job: &Job,
        gpus: &[String],
    ) -> std::io::Result<(tokio::process::Child, Spawned)> {
        let limits = job.spec.cpus.is_some() || job.spec.memory_bytes.is_some();
        let cg = match &self.cgroups {
            Some(c) => match c.create(job.id, job.spec.cpus, job.spec.memory_bytes) {
                Ok(d) => Some(d),
                Err(e) => {
                    warn!(job = job.id, error = %e, "cannot create job cgroup");
                    None
                }
            },
            None => None,
        };
        if cg.is_none() && limits {
            return Err(std::io::Error::other(
                "cannot create the cgroup that enforces its limits",
            ));
        }
        let child = match self.spawn_process(job, gpus, cg.as_deref()) {
            Ok(c) => c,
            Err(e) => {
                if let Some(d) = &cg {
                    crate::cgroup::kill_and_remove(d);
                }
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let sp = Spawned {
            pid,
            pid_start: proc_start_time(pid),
            cgroup: cg.map(|d| d.to_string_lossy().into_owned()),
        };
        let mark = StartMark {
            pid,
            pid_start: sp.pid_start,
            gpus: gpus.to_vec(),
            cgroup: sp.cgroup.clone(),
            started_ms: unix_ms(),
        };
        if let Err(e) = write_start_mark(&self.cfg.state_dir, job.id, &mark) {
            // The job runs; only a crash before its record is written would start it again.
            warn!(job = job.id, error = %e, "cannot write the job's start mark");
        }
        Ok((child, sp))
    }

    fn spawn_process(
        &self,
        job: &Job,
        gpus: &[String],
        cgroup: Option<&Path>,
    ) -> std::io::Result<tokio::process::Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&job.log_path)?;
        let log2 = log.try_clone()?;
        let argv = &job.spec.command;
        let mut cmd = match &self.cfg.shim {
            Some(shim) => {
                let mut c = tokio::process::Command::new(shim);
                c.arg("exec-shim")
                    .arg("--status-file")
                    .arg(status_path(&self.cfg.state_dir, job.id));
                if let Some(cg) = cgroup {
                    // the shim joins the job's cgroup before it starts the command
                    c.arg("--cgroup").arg(cg);
                }
                c.arg("--").args(argv);
                c
            }
            None => {
                let (first, rest) = argv.split_first().ok_or_else(|| {
                    std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command")
                })?;
                let mut c = tokio::process::Command::new(first);
                c.args(rest);
                c
            }
        };
        let visible = gpus.join(",");
        cmd.env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("NVIDIA_VISIBLE_DEVICES")
            .envs(&job.spec.env)
            .env("CUDA_VISIBLE_DEVICES", &visible)
            .env(
                "NVIDIA_VISIBLE_DEVICES",
                if gpus.is_empty() { "void" } else { &visible },
            )
            .env("WEFT_JOB_ID", job.id.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0)
            .kill_on_drop(false);
        if let Some(w) = &job.spec.workdir {
            cmd.current_dir(w);
        }
        let child = cmd.spawn()?;
        if let (Some(cg), None, Some(pid)) = (cgroup, &self.cfg.shim, child.id()) {
            let _ = std::fs::write(cg.join("cgroup.procs"), pid.to_string());
        }
        Ok(child)
    }

    /// Waits for the job's process (own child, or re-adopted by pid after a restart), reads
    /// its status file and OOM flag, and reports the end to the queue. Cancel and timeout
    /// reach the process as `Signal` effects; this task only waits.
    fn supervise(
        self: Arc<Self>,
        id: u64,
        pid: u32,
        pid_start: Option<u64>,
        child: Option<tokio::process::Child>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(async move { self.supervise_inner(id, pid, pid_start, child).await })
    }

    async fn supervise_inner(
        self: Arc<Self>,
        id: u64,
        pid: u32,
        pid_start: Option<u64>,
        child: Option<tokio::process::Child>,
    ) {
        let exit = wait_exit(child, pid, pid_start).await;
        let status = status_path(&self.cfg.state_dir, id);
        let cgroup = self.get(id).and_then(|j| j.cgroup);
        let found = tokio::task::spawn_blocking(move || {
            let oom = cgroup
                .as_deref()
                .is_some_and(|d| crate::cgroup::oom_killed(Path::new(d)));
            (read_status(&status), oom)
        })
        .await;
        let (status, oom) = found.unwrap_or((None, false));
        let exit = status.or(exit);
        let st = self.step(false, |q| ((), q.on_exit(unix_ms(), id, exit, oom)));
        self.run(st.effects).await;
    }

    /// Kills every running job's process group (used on agent shutdown in tests).
    pub fn kill_all(&self) {
        let pids: Vec<u32> = self
            .queue
            .lock()
            .jobs()
            .filter(|j| j.state == JobState::Running)
            .filter_map(|j| j.pid)
            .collect();
        for p in pids {
            signal_tree(p, libc::SIGKILL);
        }
    }
}

async fn wait_exit(
    child: Option<tokio::process::Child>,
    pid: u32,
    pid_start: Option<u64>,
) -> Option<ExitInfo> {
    match child {
        Some(mut c) => match c.wait().await {
            Ok(st) => Some(ExitInfo {
                code: st.code(),
                signal: st.signal(),
            }),
            Err(_) => None,
        },
        None => {
            while same_process(pid, pid_start) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None
        }
    }
}

/// The exec shim: runs `argv`, ignores SIGTERM/SIGINT/SIGHUP itself (the job's command in
/// the same process group gets them), and writes the command's exit status to `status_file`
/// so it survives an agent crash. Returns the shim's own exit code.
pub fn run_shim(status_file: &Path, cgroup: Option<&Path>, argv: &[OsString]) -> i32 {
    if let Some(cg) = cgroup {
        if let Err(e) = crate::cgroup::join(cg) {
            eprintln!("exec-shim: cannot join cgroup {}: {e}", cg.display());
        }
    }
    let Some((first, rest)) = argv.split_first() else {
        eprintln!("exec-shim: no command");
        return 127;
    };
    let status = match std::process::Command::new(first).args(rest).spawn() {
        Ok(mut child) => {
            // SAFETY: setting a signal disposition to SIG_IGN has no preconditions.
            unsafe {
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGHUP, libc::SIG_IGN);
            }
            match child.wait() {
                Ok(st) => ShimStatus {
                    code: st.code(),
                    signal: st.signal(),
                },
                Err(e) => {
                    eprintln!("exec-shim: wait failed: {e}");
                    ShimStatus {
                        code: None,
                        signal: None,
                    }
                }
            }
        }
        Err(e) => {
            eprintln!("worker-agent: cannot run {}: {e}", first.to_string_lossy());
            ShimStatus {
                code: Some(127),
                signal: None,
            }
        }
    };
    if let Ok(text) = serde_json::to_string(&status) {
        let tmp = status_file.with_extension("exit.tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, status_file);
        }
    }
    match status {
        ShimStatus { code: Some(c), .. } => c,
        ShimStatus {
            signal: Some(s), ..
        } => 128 + s,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::{foreign_groups, recover_starts};
    use crate::job::{Job, JobSpec, JobState, StartMark};

    #[test]
    fn a_start_the_store_missed_is_recovered_from_its_mark_and_only_for_queued_jobs() {
        let spec: JobSpec =
            serde_json::from_value(serde_json::json!({"command": ["true"], "gpus": 1})).unwrap();
        let job = |id| Job::new(id, "alice".into(), spec.clone(), 10, format!("/l/{id}.log"));
        let mark = |pid| StartMark {
            pid,
            pid_start: Some(77),
            gpus: vec!["GPU-a".into()],
            cgroup: Some("/sys/fs/cgroup/weft/job-1".into()),
            started_ms: 20,
        };
        // 1: queued with a mark (started, record not written); 2: queued, no mark (never
        // started); 3: already running with a stale mark (the record wins).
        let mut running = job(3);
        running.start(15, 300, vec!["GPU-b".into()]).unwrap();
        let mut jobs = vec![job(1), job(2), running.clone()];
        let got = recover_starts(&mut jobs, |id| (id != 2).then(|| mark(100 + id as u32)));
        assert_eq!(got, vec![1]);
        assert_eq!(jobs[0].state, JobState::Running);
        assert_eq!(
            (jobs[0].pid, jobs[0].pid_start, jobs[0].started_ms),
            (Some(101), Some(77), Some(20))
        );
        assert_eq!(jobs[0].gpu_uuids, vec!["GPU-a".to_string()]);
        assert_eq!(jobs[0].cgroup.as_deref(), Some("/sys/fs/cgroup/weft/job-1"));
        assert_eq!(jobs[1].state, JobState::Queued);
        assert_eq!(jobs[2], running);
    }

    #[test]
    fn groups_a_jobs_processes_made_are_found_and_others_are_not() {
        // (pid, ppid, pgid): the job's leader 100 (its group 100), its child 101 that made
        // group 101 (`ray start`), 101's children in 101, a grandchild that made 105; and an
        // unrelated process 200 in group 200.
        let procs = [
            (1, 0, 1),
            (100, 1, 100),
            (101, 100, 101),
            (102, 101, 101),
            (103, 101, 101),
            (105, 103, 105),
            (200, 1, 200),
        ];
        assert_eq!(foreign_groups(&procs, 100), vec![101, 105]);
        assert!(foreign_groups(&procs, 200).is_empty());
        // A job whose leader is gone: its group's members still lead to the rest.
        let orphaned = [(101, 1, 100), (102, 101, 102)];
        assert_eq!(foreign_groups(&orphaned, 100), vec![102]);
    }
}
