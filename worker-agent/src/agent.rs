//! The job engine: owns the store, assigns GPUs, starts and supervises job processes.
//! Decisions live in [`crate::job`]; this is the I/O shell (processes, signals, SQLite).

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

use crate::job::{CancelAction, ExitInfo, Job, JobSpec, JobState};
use crate::sampler::{unix_ms, SharedSnapshot};
use crate::store::{Store, StoreError};

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
    Invalid(String),
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

#[derive(Debug)]
struct Inner {
    store: Store,
    next_id: u64,
    jobs: BTreeMap<u64, Job>,
    /// GPU UUID → job holding it.
    held: BTreeMap<String, u64>,
    stops: HashMap<u64, Arc<Notify>>,
}

#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    cgroups: Option<crate::cgroup::Cgroups>,
    snapshot: SharedSnapshot,
    inner: Mutex<Inner>,
}

fn log_dir(state: &Path) -> PathBuf {
    state.join("logs")
}

fn status_path(state: &Path, id: u64) -> PathBuf {
    log_dir(state).join(format!("{id}.exit"))
}

fn read_status(path: &Path) -> Option<ExitInfo> {
    let s = std::fs::read_to_string(path).ok()?;
    let st: ShimStatus = serde_json::from_str(&s).ok()?;
    Some(ExitInfo {
        code: st.code,
        signal: st.signal,
    })
}

fn alive(pid: u32) -> bool {
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

fn signal_group(pgid: u32, sig: i32) {
    if let Ok(p) = libc::pid_t::try_from(pgid) {
        if p > 1 {
            // SAFETY: sends a signal to a process group we created (pgid == job leader pid).
            unsafe { libc::kill(-p, sig) };
        }
    }
}

impl Engine {
    /// Opens the store, reconciles jobs left by a previous run, and starts queued ones.
    /// Must be called inside a tokio runtime.
    pub fn start(cfg: EngineConfig, snapshot: SharedSnapshot) -> Result<Arc<Self>, AgentError> {
        let logs = log_dir(&cfg.state_dir);
        std::fs::create_dir_all(&logs).map_err(|source| AgentError::StateDir {
            path: logs.clone(),
            source,
        })?;
        let store = Store::open(&cfg.state_dir.join("jobs.sqlite"))?;
        let next_id = store.next_id()?;
        let jobs: BTreeMap<u64, Job> = store.all()?.into_iter().map(|j| (j.id, j)).collect();
        let cgroups = if cfg.cgroups {
            crate::cgroup::Cgroups::detect()
        } else {
            None
        };
        let engine = Arc::new(Self {
            cfg,
            cgroups,
            snapshot,
            inner: Mutex::new(Inner {
                store,
                next_id,
                jobs,
                held: BTreeMap::new(),
                stops: HashMap::new(),
            }),
        });
        engine.reconcile()?;
        engine.schedule();
        Ok(engine)
    }

    /// Jobs recorded as running by a previous agent process: take the result where it can be
    /// known (shim status file), keep supervising ones still alive, mark the rest lost.
    fn reconcile(self: &Arc<Self>) -> Result<(), AgentError> {
        let now = unix_ms();
        let mut inner = self.inner.lock();
        let running: Vec<u64> = inner
            .jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .map(|j| j.id)
            .collect();
        for id in running {
            let Some(job) = inner.jobs.get_mut(&id) else {
                continue;
            };
            let status = read_status(&status_path(&self.cfg.state_dir, id));
            let pid = job.pid.unwrap_or(0);
            if let Some(exit) = status {
                let oom = cleanup_cgroup(job.cgroup.as_deref());
                let _ = job.exited(now, exit, oom);
                info!(
                    job = id,
                    state = job.state.name(),
                    "reconciled finished job from its status file"
                );
            } else if pid > 0 && alive(pid) && proc_start_time(pid) == job.pid_start {
                info!(
                    job = id,
                    pid, "job still running after agent restart; supervising it again"
                );
                for g in job.gpu_uuids.clone() {
                    inner.held.insert(g, id);
                }
                let stop = Arc::new(Notify::new());
                inner.stops.insert(id, stop.clone());
                let me = self.clone();
                tokio::spawn(async move { me.supervise(id, pid, None, stop).await });
                continue;
            } else {
                cleanup_cgroup(job.cgroup.as_deref());
                job.lost(
                    now,
                    "agent restarted; the process was gone and its exit status was not recorded"
                        .into(),
                );
                info!(job = id, "reconciled as lost");
            }
            let j = job.clone();
            inner.store.put(&j)?;
        }
        Ok(())
    }

    pub fn submit(self: &Arc<Self>, caller: String, spec: JobSpec) -> Result<Job, AgentError> {
        validate(&spec)?;
        if (spec.cpus.is_some() || spec.memory_bytes.is_some()) && self.cgroups.is_none() {
            return Err(AgentError::Invalid(
                "`cpus`/`memory_bytes` need cgroup v2, which this worker cannot use; submit without limits".into(),
            ));
        }
        let total = self.snapshot.read().gpus.len();
        if spec.gpus as usize > total {
            return Err(AgentError::Invalid(format!(
                "job asks for {} GPUs but this worker has {total}",
                spec.gpus
            )));
        }
        let job = {
            let mut inner = self.inner.lock();
            let id = inner.next_id;
            let log = log_dir(&self.cfg.state_dir).join(format!("{id}.log"));
            let job = Job::new(
                id,
                caller,
                spec,
                unix_ms(),
                log.to_string_lossy().into_owned(),
            );
            inner.store.put(&job)?;
            inner.next_id += 1;
            inner.jobs.insert(id, job.clone());
            job
        };
        info!(job = job.id, caller = %job.caller, gpus = job.spec.gpus, "job queued");
        self.schedule();
        Ok(self.get(job.id).unwrap_or(job))
    }

    pub fn get(&self, id: u64) -> Option<Job> {
        self.inner.lock().jobs.get(&id).cloned()
    }

    pub fn list(&self) -> Vec<Job> {
        self.inner.lock().jobs.values().cloned().collect()
    }

    /// GPU UUID → job id for GPUs currently held.
    pub fn holders(&self) -> BTreeMap<String, u64> {
        self.inner.lock().held.clone()
    }

    pub fn cancel(self: &Arc<Self>, id: u64) -> Result<Job, AgentError> {
        let mut inner = self.inner.lock();
        let job = inner.jobs.get_mut(&id).ok_or(AgentError::NotFound(id))?;
        let action = job.cancel(unix_ms());
        let j = job.clone();
        match action {
            CancelAction::Dequeued => {
                inner.store.put(&j)?;
                info!(job = id, "queued job cancelled");
                drop(inner);
                self.schedule();
            }
            CancelAction::Terminate => {
                inner.store.put(&j)?;
                info!(job = id, "cancelling running job");
                if let Some(n) = inner.stops.get(&id) {
                    n.notify_one();
                }
            }
            CancelAction::Nothing => {}
        }
        Ok(j)
    }

    /// Starts queued jobs in FIFO order while GPUs allow. A GPU job that does not fit blocks
    /// the GPU jobs behind it (no starvation); CPU-only jobs start at once.
    pub fn schedule(self: &Arc<Self>) {
        let healthy = self.snapshot.read().healthy_uuids();
        let mut inner = self.inner.lock();
        let queued: Vec<(u64, u32)> = inner
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued)
            .map(|j| (j.id, j.spec.gpus))
            .collect();
        let free: Vec<String> = healthy
            .into_iter()
            .filter(|u| !inner.held.contains_key(u))
            .collect();
        for (id, gpus) in crate::job::pick(&queued, &free) {
            self.launch(&mut inner, id, gpus);
        }
    }

    fn launch(self: &Arc<Self>, inner: &mut Inner, id: u64, gpus: Vec<String>) {
        let Some(job) = inner.jobs.get(&id).cloned() else {
            return;
        };
        let now = unix_ms();
        let cg = match &self.cgroups {
            Some(c) => match c.create(id, job.spec.cpus, job.spec.memory_bytes) {
                Ok(d) => Some(d),
                Err(e) => {
                    warn!(job = id, error = %e, "cannot create job cgroup");
                    None
                }
            },
            None => None,
        };
        let spawned =
            if cg.is_none() && (job.spec.cpus.is_some() || job.spec.memory_bytes.is_some()) {
                Err(std::io::Error::other(
                    "cannot create the cgroup that enforces its limits",
                ))
            } else {
                self.spawn_process(&job, &gpus, cg.as_deref())
            };
        let job_mut = match inner.jobs.get_mut(&id) {
            Some(j) => j,
            None => return,
        };
        match spawned {
            Ok(child) => {
                let pid = child.id().unwrap_or(0);
                let _ = job_mut.start(now, pid, gpus.clone());
                job_mut.cgroup = cg.map(|d| d.to_string_lossy().into_owned());
                job_mut.pid_start = proc_start_time(pid);
                for g in &gpus {
                    inner.held.insert(g.clone(), id);
                }
                let stop = Arc::new(Notify::new());
                inner.stops.insert(id, stop.clone());
                info!(job = id, pid, gpus = ?gpus, "job started");
                let me = self.clone();
                tokio::spawn(async move { me.supervise(id, pid, Some(child), stop).await });
            }
            Err(e) => {
                warn!(job = id, error = %e, "job could not start");
                job_mut.fail_to_start(now, &e.to_string());
            }
        }
        let j = job_mut.clone();
        if let Err(e) = inner.store.put(&j) {
            warn!(job = id, error = %e, "cannot persist job");
        }
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
                    .arg(status_path(&self.cfg.state_dir, job.id))
                    .arg("--")
                    .args(argv);
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
        let visible = if gpus.is_empty() {
            String::new()
        } else {
            gpus.join(",")
        };
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

    /// Waits for the job's process (own child, or re-adopted by pid after a restart), applies
    /// cancel and timeout (SIGTERM, grace, SIGKILL to the whole group), records the end.
    async fn supervise(
        self: Arc<Self>,
        id: u64,
        pid: u32,
        mut child: Option<tokio::process::Child>,
        stop: Arc<Notify>,
    ) {
        let deadline = self.get(id).and_then(|j| j.deadline_ms());
        let mut term_sent_at: Option<tokio::time::Instant> = None;
        let exit: Option<ExitInfo> = loop {
            let timeout_in = deadline.map(|d| Duration::from_millis(d.saturating_sub(unix_ms())));
            let kill_in = term_sent_at.map(|t| {
                (t + self.cfg.kill_grace).saturating_duration_since(tokio::time::Instant::now())
            });
            let wake = [timeout_in.filter(|_| term_sent_at.is_none()), kill_in]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                st = wait_exit(&mut child, pid) => break st,
                _ = stop.notified() => {
                    if term_sent_at.is_none() {
                        debug!(job = id, pgid = pid, "SIGTERM to process group");
                        signal_group(pid, libc::SIGTERM);
                        term_sent_at = Some(tokio::time::Instant::now());
                    }
                }
                _ = tokio::time::sleep(wake) => {
                    if let Some(t) = term_sent_at {
                        if tokio::time::Instant::now() >= t + self.cfg.kill_grace {
                            warn!(job = id, pgid = pid, "grace period over; SIGKILL to process group");
                            signal_group(pid, libc::SIGKILL);
                        }
                    } else if self.timed_out(id) {
                        info!(job = id, "timeout; SIGTERM to process group");
                        signal_group(pid, libc::SIGTERM);
                        term_sent_at = Some(tokio::time::Instant::now());
                    }
                }
            }
        };
        // Nothing of the job may outlive it: kill whatever is left in its group.
        signal_group(pid, libc::SIGKILL);
        let cg = self.get(id).and_then(|j| j.cgroup);
        let oom = cleanup_cgroup(cg.as_deref());
        let exit = read_status(&status_path(&self.cfg.state_dir, id)).or(exit);
        self.finish(id, exit, oom);
    }

    fn timed_out(&self, id: u64) -> bool {
        let mut inner = self.inner.lock();
        let Some(job) = inner.jobs.get_mut(&id) else {
            return false;
        };
        if job.handle_timeout(unix_ms()) {
            let j = job.clone();
            if let Err(e) = inner.store.put(&j) {
                warn!(job = id, error = %e, "cannot persist job");
            }
            true
        } else {
            false
        }
    }

    fn finish(self: &Arc<Self>, id: u64, exit: Option<ExitInfo>, oom: bool) {
        {
            let mut inner = self.inner.lock();
            inner.held.retain(|_, j| *j != id);
            inner.stops.remove(&id);
            let Some(job) = inner.jobs.get_mut(&id) else {
                return;
            };
            let now = unix_ms();
            match exit {
                Some(e) => {
                    let _ = job.exited(now, e, oom);
                }
                None => job.lost(
                    now,
                    "exit status unknown (job was re-adopted after an agent restart)".into(),
                ),
            }
            info!(job = id, state = job.state.name(), "job finished");
            let j = job.clone();
            if let Err(e) = inner.store.put(&j) {
                warn!(job = id, error = %e, "cannot persist job");
            }
        }
        self.schedule();
    }

    /// Kills every running job's process group (used on agent shutdown in tests).
    pub fn kill_all(&self) {
        let inner = self.inner.lock();
        for j in inner.jobs.values().filter(|j| j.state == JobState::Running) {
            if let Some(p) = j.pid {
                signal_group(p, libc::SIGKILL);
            }
        }
    }
}

/// OOM check, then kill whatever is left in the job's cgroup and remove it. Returns OOM.
fn cleanup_cgroup(dir: Option<&str>) -> bool {
    let Some(d) = dir else { return false };
    let d = Path::new(d);
    let oom = crate::cgroup::oom_killed(d);
    crate::cgroup::kill_and_remove(d);
    oom
}

async fn wait_exit(child: &mut Option<tokio::process::Child>, pid: u32) -> Option<ExitInfo> {
    match child {
        Some(c) => match c.wait().await {
            Ok(st) => Some(ExitInfo {
                code: st.code(),
                signal: st.signal(),
            }),
            Err(_) => None,
        },
        None => {
            while alive(pid) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            None
        }
    }
}

fn validate(spec: &JobSpec) -> Result<(), AgentError> {
    if spec.command.is_empty() || spec.command[0].is_empty() {
        return Err(AgentError::Invalid(
            "`command` must be a non-empty array of strings".into(),
        ));
    }
    for k in spec.env.keys() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(AgentError::Invalid(format!("env name {k:?} is not valid")));
        }
        if k == "CUDA_VISIBLE_DEVICES" || k == "NVIDIA_VISIBLE_DEVICES" {
            return Err(AgentError::Invalid(format!(
                "env {k} is set by the agent from the assigned GPUs"
            )));
        }
    }
    if spec.timeout_s == Some(0) {
        return Err(AgentError::Invalid("`timeout_s` must be at least 1".into()));
    }
    if let Some(w) = &spec.workdir {
        if !Path::new(w).is_dir() {
            return Err(AgentError::Invalid(format!(
                "workdir {w} is not a directory on this worker"
            )));
        }
    }
    Ok(())
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
