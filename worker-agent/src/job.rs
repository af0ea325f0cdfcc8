//! The job record and its state machine. Pure: every transition takes `now` (unix ms).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What a caller submits (`POST /v1/jobs`), before validation: [`JobRequest::validate`] turns
/// it into the [`JobSpec`] the queue accepts, or names what is wrong with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub workdir: Option<String>,
    #[serde(default)]
    pub gpus: u32,
    #[serde(default)]
    pub timeout_s: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// CPU limit in cores (cgroup v2 `cpu.max`); refused where cgroups are not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory limit in bytes (cgroup v2 `memory.max`); refused where cgroups are not available.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Environment variables the agent sets itself from the assigned GPUs.
pub const RESERVED_ENV: [&str; 2] = ["CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES"];

/// What this worker can offer, for validating a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// GPUs the machine has (healthy or not).
    pub gpus: usize,
    /// Per-job cgroup v2 is available, so `cpus` / `memory_bytes` can be enforced.
    pub cgroups: bool,
}

/// Why a job request was refused (the API answers 400 with this message).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("`command` must be a non-empty array of strings with a non-empty first element")]
    EmptyCommand,
    #[error("env name {0:?} is not valid (it must be non-empty, without `=` or NUL)")]
    BadEnvName(String),
    #[error("env {0} is set by the agent from the assigned GPUs; leave it out")]
    ReservedEnv(String),
    #[error("`timeout_s` must be at least 1 (leave it out for no timeout)")]
    ZeroTimeout,
    #[error("`cpus` must be a positive number of cores, not {0}")]
    BadCpus(f64),
    #[error("workdir {0} is not a directory on this worker")]
    NotADirectory(String),
    #[error("job asks for {asked} GPUs but this worker has {have}")]
    TooManyGpus { asked: u32, have: usize },
    #[error(
        "`cpus`/`memory_bytes` need cgroup v2, which this worker cannot use; submit without limits"
    )]
    LimitsNeedCgroups,
}

impl JobRequest {
    /// Checks the request against this worker. `is_dir` answers whether the workdir exists as a
    /// directory (the one question that needs the file system; the shell asks it off the
    /// async runtime).
    pub fn validate(
        self,
        caps: &Capabilities,
        is_dir: impl FnOnce(&str) -> bool,
    ) -> Result<JobSpec, SpecError> {
        if self.command.first().is_none_or(|c| c.is_empty()) {
            return Err(SpecError::EmptyCommand);
        }
        for k in self.env.keys() {
            if k.is_empty() || k.contains('=') || k.contains('\0') {
                return Err(SpecError::BadEnvName(k.clone()));
            }
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(SpecError::ReservedEnv(k.clone()));
            }
        }
        if self.timeout_s == Some(0) {
            return Err(SpecError::ZeroTimeout);
        }
        if let Some(c) = self.cpus {
            if !(c.is_finite() && c > 0.0) {
                return Err(SpecError::BadCpus(c));
            }
        }
        if self.gpus as usize > caps.gpus {
            return Err(SpecError::TooManyGpus {
                asked: self.gpus,
                have: caps.gpus,
            });
        }
        if (self.cpus.is_some() || self.memory_bytes.is_some()) && !caps.cgroups {
            return Err(SpecError::LimitsNeedCgroups);
        }
        if let Some(w) = &self.workdir {
            if !is_dir(w) {
                return Err(SpecError::NotADirectory(w.clone()));
            }
        }
        Ok(JobSpec(self))
    }
}

/// A validated job request, as recorded in the job: the [`JobRequest`] that
/// [`JobRequest::validate`] accepted, read through `Deref` (same JSON shape; a job read back
/// from the store is not checked again).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobSpec(JobRequest);

impl std::ops::Deref for JobSpec {
    type Target = JobRequest;
    fn deref(&self) -> &JobRequest {
        &self.0
    }
}

#[cfg(test)]
impl JobSpec {
    /// `true` on `gpus` GPUs with `timeout_s`, unchecked (for the job, queue and store tests).
    pub(crate) fn for_test(gpus: u32, timeout_s: Option<u64>) -> Self {
        JobSpec(JobRequest {
            command: vec!["true".into()],
            gpus,
            timeout_s,
            ..JobRequest::default()
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed { exit_code: i32 },
    Cancelled,
    TimedOut,
    Killed { signal: i32, oom: bool },
    Lost { reason: String },
}

impl JobState {
    pub fn is_terminal(&self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
    pub fn name(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed { .. } => "failed",
            JobState::Cancelled => "cancelled",
            JobState::TimedOut => "timed_out",
            JobState::Killed { .. } => "killed",
            JobState::Lost { .. } => "lost",
        }
    }
}

/// How the job's main process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl ExitInfo {
    /// It is not known how the process ended (no status was recorded).
    pub const UNKNOWN: ExitInfo = ExitInfo {
        code: None,
        signal: None,
    };

    /// The process exited with `code`.
    pub const fn with_code(code: i32) -> Self {
        ExitInfo {
            code: Some(code),
            signal: None,
        }
    }

    /// The process was killed by `signal`.
    pub const fn by_signal(signal: i32) -> Self {
        ExitInfo {
            code: None,
            signal: Some(signal),
        }
    }
}

/// Why the agent is stopping a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    Cancel,
    Timeout,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: u64,
    pub caller: String,
    pub spec: JobSpec,
    #[serde(flatten)]
    pub state: JobState,
    pub gpu_uuids: Vec<String>,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    pub pid: Option<u32>,
    /// Start time of `pid` (clock ticks since boot, /proc/PID/stat field 22), to tell the
    /// job's process from a later process that reused the pid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
    /// Set when the agent decided to stop it; the exit that follows is attributed to this.
    pub stopping: Option<StopReason>,
    /// Log file path (stdout and stderr interleaved).
    pub log_path: String,
    /// The job's cgroup v2 directory, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// What the agent writes beside a job's log the moment its process exists, before the queue
/// marks it running: the record of that start survives an agent that dies before the store
/// has written it, so a restart supervises the job instead of starting it a second time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StartMark {
    pub pid: u32,
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub gpus: Vec<String>,
    #[serde(default)]
    pub cgroup: Option<String>,
    pub started_ms: u64,
}

/// A transition that does not apply to the current state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("job {id} is {state}; cannot {action}")]
pub struct InvalidTransition {
    pub id: u64,
    pub state: &'static str,
    pub action: &'static str,
}

/// What the shell must do after a cancel request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAction {
    /// Job was queued: it is now cancelled, nothing to kill.
    Dequeued,
    /// Job is running: terminate its process group.
    Terminate,
    /// Already finished or already stopping: nothing to do.
    Nothing,
}

impl Job {
    pub fn new(id: u64, caller: String, spec: JobSpec, now: u64, log_path: String) -> Self {
        Self {
            id,
            caller,
            spec,
            state: JobState::Queued,
            gpu_uuids: Vec::new(),
            submitted_ms: now,
            started_ms: None,
            ended_ms: None,
            pid: None,
            pid_start: None,
            stopping: None,
            log_path,
            cgroup: None,
        }
    }

    fn invalid(&self, action: &'static str) -> InvalidTransition {
        InvalidTransition {
            id: self.id,
            state: self.state.name(),
            action,
        }
    }

    pub fn start(
        &mut self,
        now: u64,
        pid: u32,
        gpus: Vec<String>,
    ) -> Result<(), InvalidTransition> {
        if self.state != JobState::Queued {
            return Err(self.invalid("start"));
        }
        self.state = JobState::Running;
        self.started_ms = Some(now);
        self.pid = Some(pid);
        self.gpu_uuids = gpus;
        Ok(())
    }

    /// Recovers a start the store never heard of: the agent stopped after the job's process
    /// existed but before the record saying so was written (the store writes behind). The
    /// start mark written beside the log at the fork says what the record would have.
    /// Only a queued job takes one (a job is queued once, before its only start).
    pub fn recover_start(&mut self, mark: &StartMark) -> Result<(), InvalidTransition> {
        self.start(mark.started_ms, mark.pid, mark.gpus.clone())?;
        self.pid_start = mark.pid_start;
        self.cgroup = mark.cgroup.clone();
        Ok(())
    }

    /// The process could not be started at all.
    pub fn fail_to_start(&mut self, now: u64, why: &str) {
        self.state = JobState::Lost {
            reason: format!("could not start: {why}"),
        };
        self.ended_ms = Some(now);
    }

    pub fn cancel(&mut self, now: u64) -> CancelAction {
        match self.state {
            JobState::Queued => {
                self.state = JobState::Cancelled;
                self.ended_ms = Some(now);
                CancelAction::Dequeued
            }
            JobState::Running if self.stopping.is_none() => {
                self.stopping = Some(StopReason::Cancel);
                CancelAction::Terminate
            }
            _ => CancelAction::Nothing,
        }
    }

    /// When a running job must be stopped for exceeding its timeout (unix ms).
    pub fn deadline_ms(&self) -> Option<u64> {
        match (&self.state, self.started_ms, self.spec.timeout_s) {
            (JobState::Running, Some(s), Some(t)) => Some(s.saturating_add(t.saturating_mul(1000))),
            _ => None,
        }
    }

    /// Returns true when the shell must now terminate the job.
    pub fn handle_timeout(&mut self, now: u64) -> bool {
        match self.deadline_ms() {
            Some(d) if now >= d && self.stopping.is_none() => {
                self.stopping = Some(StopReason::Timeout);
                true
            }
            _ => false,
        }
    }

    /// The main process ended. `oom` is true when the cgroup reported an OOM kill.
    pub fn exited(&mut self, now: u64, exit: ExitInfo, oom: bool) -> Result<(), InvalidTransition> {
        if self.state != JobState::Running {
            return Err(self.invalid("record an exit"));
        }
        self.ended_ms = Some(now);
        self.state = match (self.stopping, exit) {
            (Some(StopReason::Cancel), _) => JobState::Cancelled,
            (Some(StopReason::Timeout), _) => JobState::TimedOut,
            (None, ExitInfo { code: Some(0), .. }) => JobState::Succeeded,
            (
                None,
                ExitInfo {
                    signal: Some(sig), ..
                },
            ) => JobState::Killed { signal: sig, oom },
            (None, ExitInfo { code: Some(c), .. }) => JobState::Failed { exit_code: c },
            (
                None,
                ExitInfo {
                    code: None,
                    signal: None,
                },
            ) => JobState::Lost {
                reason: "exit status unknown".into(),
            },
        };
        Ok(())
    }

    pub fn lost(&mut self, now: u64, reason: String) {
        self.state = JobState::Lost { reason };
        self.ended_ms.get_or_insert(now);
    }

    /// GPU-seconds consumed: GPUs held × wall time between start and end.
    pub fn gpu_seconds(&self) -> f64 {
        match (self.started_ms, self.ended_ms) {
            (Some(s), Some(e)) => {
                self.gpu_uuids.len() as f64 * (e.saturating_sub(s) as f64 / 1000.0)
            }
            _ => 0.0,
        }
    }
}

/// Which queued jobs start now, and on which GPUs. `queued` is (id, GPUs wanted) in FIFO order;
/// `free` are healthy unassigned GPU UUIDs in index order. The first GPU job that does not fit
/// blocks the GPU jobs behind it (no starvation of big jobs); CPU-only jobs always start.
pub fn pick(queued: &[(u64, u32)], free: &[String]) -> Vec<(u64, Vec<String>)> {
    let mut free = free.iter();
    let mut left = free.len();
    let mut blocked = false;
    let mut out = Vec::new();
    for &(id, want) in queued {
        let want = want as usize;
        if want == 0 {
            out.push((id, Vec::new()));
        } else if !blocked && want <= left {
            out.push((id, free.by_ref().take(want).cloned().collect()));
            left -= want;
        } else {
            blocked = true;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn pick_is_fifo_for_gpu_jobs_and_lets_cpu_jobs_through() {
        let free = vec!["A".to_string(), "B".to_string()];
        let q = [(1, 1), (2, 2), (3, 1), (4, 0)];
        // job 1 takes A; job 2 needs 2 and blocks job 3 (which would fit); CPU job 4 starts
        assert_eq!(
            pick(&q, &free),
            vec![(1, vec!["A".to_string()]), (4, vec![])]
        );
        assert_eq!(
            pick(&[(2, 2), (3, 1)], &free),
            vec![(2, vec!["A".to_string(), "B".to_string()])]
        );
        assert!(pick(&[(5, 1)], &[]).is_empty());
    }
    use super::*;

    fn job(timeout: Option<u64>) -> Job {
        Job::new(
            1,
            "local".into(),
            JobSpec::for_test(1, timeout),
            1000,
            "x.log".into(),
        )
    }

    #[test]
    fn success_and_failure() {
        let mut j = job(None);
        j.start(2000, 10, vec!["GPU-a".into()]).unwrap();
        j.exited(5000, ExitInfo::with_code(0), false).unwrap();
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!(j.gpu_seconds(), 3.0);
        let mut j = job(None);
        j.start(2000, 10, vec![]).unwrap();
        j.exited(3000, ExitInfo::with_code(3), false).unwrap();
        assert_eq!(j.state, JobState::Failed { exit_code: 3 });
        let mut j = job(None);
        j.start(2000, 10, vec![]).unwrap();
        j.exited(3000, ExitInfo::by_signal(9), true).unwrap();
        assert_eq!(
            j.state,
            JobState::Killed {
                signal: 9,
                oom: true
            }
        );
    }

    #[test]
    fn cancel_queued_and_running() {
        let mut j = job(None);
        assert_eq!(j.cancel(1500), CancelAction::Dequeued);
        assert_eq!(j.state, JobState::Cancelled);
        assert!(j.start(1600, 1, vec![]).is_err());
        let mut j = job(None);
        j.start(2000, 10, vec![]).unwrap();
        assert_eq!(j.cancel(2100), CancelAction::Terminate);
        assert_eq!(j.cancel(2200), CancelAction::Nothing);
        j.exited(2300, ExitInfo::by_signal(15), false).unwrap();
        assert_eq!(j.state, JobState::Cancelled);
    }

    #[test]
    fn timeout() {
        let mut j = job(Some(2));
        j.start(10_000, 10, vec![]).unwrap();
        assert_eq!(j.deadline_ms(), Some(12_000));
        assert!(!j.handle_timeout(11_999));
        assert!(j.handle_timeout(12_000));
        assert!(!j.handle_timeout(12_500));
        j.exited(12_600, ExitInfo::by_signal(15), false).unwrap();
        assert_eq!(j.state, JobState::TimedOut);
    }

    fn req(f: impl FnOnce(&mut JobRequest)) -> JobRequest {
        let mut r: JobRequest = serde_json::from_str(r#"{"command": ["true"]}"#).unwrap();
        f(&mut r);
        r
    }

    const CAPS: Capabilities = Capabilities {
        gpus: 2,
        cgroups: false,
    };

    #[test]
    fn requests_are_validated_with_named_errors() {
        let check = |r: JobRequest| r.validate(&CAPS, |w| w == "/ok");
        assert_eq!(
            check(req(|r| r.command.clear())),
            Err(SpecError::EmptyCommand)
        );
        assert_eq!(
            check(req(|r| r.command = vec![String::new()])),
            Err(SpecError::EmptyCommand)
        );
        assert_eq!(
            check(req(|r| {
                r.env.insert("A=B".into(), "x".into());
            })),
            Err(SpecError::BadEnvName("A=B".into()))
        );
        assert_eq!(
            check(req(|r| {
                r.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into());
            })),
            Err(SpecError::ReservedEnv("NVIDIA_VISIBLE_DEVICES".into()))
        );
        assert_eq!(
            check(req(|r| r.timeout_s = Some(0))),
            Err(SpecError::ZeroTimeout)
        );
        assert_eq!(
            check(req(|r| r.cpus = Some(-1.0))),
            Err(SpecError::BadCpus(-1.0))
        );
        assert_eq!(
            check(req(|r| r.gpus = 3)),
            Err(SpecError::TooManyGpus { asked: 3, have: 2 })
        );
        assert_eq!(
            check(req(|r| r.memory_bytes = Some(1 << 30))),
            Err(SpecError::LimitsNeedCgroups)
        );
        assert_eq!(
            check(req(|r| r.workdir = Some("/nope".into()))),
            Err(SpecError::NotADirectory("/nope".into()))
        );
        let ok = check(req(|r| {
            r.workdir = Some("/ok".into());
            r.gpus = 2;
            r.timeout_s = Some(5);
        }))
        .unwrap();
        assert_eq!(
            (ok.gpus, ok.timeout_s, ok.workdir.as_deref()),
            (2, Some(5), Some("/ok"))
        );
        let with_cgroups = Capabilities {
            cgroups: true,
            ..CAPS
        };
        assert!(req(|r| r.cpus = Some(1.5))
            .validate(&with_cgroups, |_| true)
            .is_ok());
        // the messages say what is wrong
        assert_eq!(
            SpecError::TooManyGpus { asked: 3, have: 2 }.to_string(),
            "job asks for 3 GPUs but this worker has 2"
        );
        assert!(SpecError::LimitsNeedCgroups
            .to_string()
            .contains("cgroup v2"));
    }

    #[test]
    fn a_request_and_its_spec_have_the_same_json() {
        let r = req(|r| {
            r.gpus = 1;
            r.labels.insert("team".into(), "x".into());
        });
        let spec = r.clone().validate(&CAPS, |_| true).unwrap();
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::to_value(&spec).unwrap()
        );
    }

    #[test]
    fn serde_roundtrip() {
        let mut j = job(None);
        j.lost(5, "agent restarted".into());
        let s = serde_json::to_string(&j).unwrap();
        let back: Job = serde_json::from_str(&s).unwrap();
        assert_eq!(back, j);
    }
}
