//! The job queue: every decision about which job runs where and when, as a pure state machine.
//!
//! [`Queue`] owns the job records, the GPU holders and the next job id. It never reads a clock
//! and does no I/O: every call takes `now` (unix ms) and returns the [`Effect`]s the shell
//! (`agent.rs`) must carry out, in order. The shell feeds back what happened (a process started,
//! ended, could not start; what it found after a restart) and asks [`Queue::next_wakeup`] when
//! to call [`Queue::handle_timeout`] again.
//!
//! Rules (see `job.rs` for the record's own transitions):
//! - GPU jobs start in FIFO order; the first GPU job that does not fit blocks the GPU jobs
//!   behind it; CPU-only jobs start at once ([`crate::job::pick`]).
//! - A started job holds its GPUs from the [`Effect::Spawn`] until its process ended (or could
//!   not start): a GPU is never handed to two jobs.
//! - Cancel of a queued job dequeues it; of a running job: SIGTERM to its process group, SIGKILL
//!   after the grace period. A timeout does the same.
//! - After a restart ([`Queue::restore`] + [`Queue::reconcile`]): a job whose status file exists
//!   is finished with that status, one whose process is still alive (same start time) is
//!   supervised again, any other is lost.
//! - Every change of a record is accompanied by an [`Effect::Persist`] of the new record, so
//!   the store always converges to the queue's view.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tracing::{debug, info, warn};

use crate::job::{CancelAction, ExitInfo, Job, JobSpec, JobState};

/// Queue settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueConfig {
    /// Time between SIGTERM and SIGKILL of a job's process group, in ms.
    pub kill_grace_ms: u64,
    /// Where job logs are: job `ID` logs to `LOG_DIR/ID.log`.
    pub log_dir: PathBuf,
}

/// A signal to a job's process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Term,
    Kill,
}

/// What the shell must do, in the order given.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Write this record to the store (the job's new state).
    Persist(Job),
    /// Start the job's process group with these GPUs visible (its cgroup first, where there are
    /// cgroups); report with [`Queue::on_spawned`] or [`Queue::on_spawn_failed`], then wait
    /// for the process and report [`Queue::on_exit`].
    Spawn { job: Job, gpus: Vec<String> },
    /// Supervise a process that outlived the previous agent (wait for it to end, then report
    /// [`Queue::on_exit`]).
    Adopt {
        id: u64,
        pid: u32,
        pid_start: Option<u64>,
    },
    /// Send a signal to the job's process group.
    Signal { id: u64, pgid: u32, sig: Sig },
    /// Kill whatever is left in the job's cgroup and remove it.
    CleanupCgroup { id: u64, dir: String },
}

/// What the shell found about a job recorded as running, after an agent restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub id: u64,
    /// The exec shim's status file, when it wrote one.
    pub status: Option<ExitInfo>,
    /// A process with the recorded pid and the recorded start time exists.
    pub alive: bool,
    /// The job's cgroup reports an OOM kill.
    pub oom: bool,
}

/// A started process, as the shell reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spawned {
    pub pid: u32,
    /// Start time of `pid` (clock ticks since boot), to recognise it after a restart.
    pub pid_start: Option<u64>,
    /// The job's cgroup directory, when it has one.
    pub cgroup: Option<String>,
}

/// Why [`Queue::start_exact`] did not start a job (the pool places it elsewhere).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartRefused {
    #[error("GPU {0} is not on this worker")]
    Unknown(String),
    #[error("GPU {0} is unhealthy")]
    Unhealthy(String),
    #[error("GPU {gpu} is held by job {job}")]
    Held { gpu: String, job: u64 },
    #[error("GPU {0} is listed twice")]
    Duplicate(String),
    #[error("the job asks for {asked} GPUs but {given} were named")]
    CountMismatch { asked: u32, given: usize },
}

/// No job has this id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("job {0} not found")]
pub struct NotFound(pub u64);

/// What the queue tracks about a job that holds resources, beyond its record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Live {
    /// A [`Effect::Spawn`] is out; the record is still `queued`, the GPUs are reserved.
    Starting { gpus: Vec<String> },
    /// Its process group runs. `term_at`: when SIGTERM was sent; `kill_sent`: SIGKILL too.
    Running {
        pgid: u32,
        term_at: Option<u64>,
        kill_sent: bool,
    },
}

#[derive(Debug, Clone)]
pub struct Queue {
    cfg: QueueConfig,
    next_id: u64,
    jobs: BTreeMap<u64, Job>,
    /// GPU UUID → job holding it.
    held: BTreeMap<String, u64>,
    live: BTreeMap<u64, Live>,
    /// Healthy GPUs in index order, from the last snapshot.
    healthy: Vec<String>,
}

const LOST_AFTER_RESTART: &str =
    "agent restarted; the process was gone and its exit status was not recorded";
const UNKNOWN_EXIT: &str = "exit status unknown (job was re-adopted after an agent restart)";

impl Queue {
    /// An empty queue (no jobs yet, no healthy GPUs until [`Queue::set_healthy`]).
    pub fn new(cfg: QueueConfig) -> Self {
        Self::restore(cfg, Vec::new())
    }

    /// The queue over the records of a previous run. Jobs recorded as running keep their GPUs
    /// until [`Queue::reconcile`] says what became of them.
    pub fn restore(cfg: QueueConfig, jobs: Vec<Job>) -> Self {
        let jobs: BTreeMap<u64, Job> = jobs.into_iter().map(|j| (j.id, j)).collect();
        let next_id = jobs.keys().next_back().map_or(1, |m| m.saturating_add(1));
        let held = jobs
            .values()
            .filter(|j| j.state == JobState::Running)
            .flat_map(|j| j.gpu_uuids.iter().map(|g| (g.clone(), j.id)))
            .collect();
        Self {
            cfg,
            next_id,
            jobs,
            held,
            live: BTreeMap::new(),
            healthy: Vec::new(),
        }
    }

    pub fn get(&self, id: u64) -> Option<&Job> {
        self.jobs.get(&id)
    }

    /// All jobs in id (submission) order.
    pub fn jobs(&self) -> impl Iterator<Item = &Job> {
        self.jobs.values()
    }

    /// GPU UUID → job id, for GPUs held by a starting or running job.
    pub fn holders(&self) -> &BTreeMap<String, u64> {
        &self.held
    }

    /// Jobs recorded as running that no process is known for yet: the ones the shell must
    /// examine for [`Queue::reconcile`].
    pub fn unsupervised(&self) -> impl Iterator<Item = &Job> {
        self.jobs
            .values()
            .filter(|j| j.state == JobState::Running && !self.live.contains_key(&j.id))
    }

    /// Queues a validated job; starts it (and anything else that fits) at once if it can.
    pub fn submit(&mut self, now: u64, caller: String, spec: JobSpec) -> (Job, Vec<Effect>) {
        let id = self.next_id;
        self.next_id += 1;
        let log = self.cfg.log_dir.join(format!("{id}.log"));
        let job = Job::new(id, caller, spec, now, log.to_string_lossy().into_owned());
        info!(job = id, caller = %job.caller, gpus = job.spec.gpus, "job queued");
        self.jobs.insert(id, job.clone());
        let mut fx = vec![Effect::Persist(job.clone())];
        self.schedule(&mut fx);
        (job, fx)
    }

    /// Starts a validated job at once on exactly `gpus`, or refuses: when one of them is not in
    /// `known` (every GPU of the machine, healthy or not), is not healthy, is held by another
    /// job, is named twice, or when their number is not the job's GPU count. Never queues:
    /// a refused job leaves no record; an accepted one is recorded and its [`Effect::Spawn`]
    /// follows, holding the GPUs as any started job does.
    pub fn start_exact(
        &mut self,
        now: u64,
        caller: String,
        spec: JobSpec,
        gpus: &[String],
        known: &[String],
    ) -> Result<(Job, Vec<Effect>), StartRefused> {
        if spec.gpus as usize != gpus.len() {
            return Err(StartRefused::CountMismatch {
                asked: spec.gpus,
                given: gpus.len(),
            });
        }
        for (i, g) in gpus.iter().enumerate() {
            if gpus[..i].contains(g) {
                return Err(StartRefused::Duplicate(g.clone()));
            }
            if !known.contains(g) {
                return Err(StartRefused::Unknown(g.clone()));
            }
            if !self.healthy.contains(g) {
                return Err(StartRefused::Unhealthy(g.clone()));
            }
            if let Some(&job) = self.held.get(g) {
                return Err(StartRefused::Held {
                    gpu: g.clone(),
                    job,
                });
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let log = self.cfg.log_dir.join(format!("{id}.log"));
        let job = Job::new(id, caller, spec, now, log.to_string_lossy().into_owned());
        info!(job = id, caller = %job.caller, gpus = ?gpus, "job starting on the GPUs it named");
        self.jobs.insert(id, job.clone());
        for g in gpus {
            self.held.insert(g.clone(), id);
        }
        self.live.insert(
            id,
            Live::Starting {
                gpus: gpus.to_vec(),
            },
        );
        let fx = vec![
            Effect::Persist(job.clone()),
            Effect::Spawn {
                job: job.clone(),
                gpus: gpus.to_vec(),
            },
        ];
        Ok((job, fx))
    }

    /// The GPUs that may take new jobs now (healthy, index order); starts what fits.
    pub fn set_healthy(&mut self, healthy: Vec<String>) -> Vec<Effect> {
        self.healthy = healthy;
        let mut fx = Vec::new();
        self.schedule(&mut fx);
        fx
    }

    /// Cancel: a queued job is dequeued; a running one is terminated (SIGTERM, SIGKILL after
    /// the grace period); a finished or already stopping one is left as it is.
    pub fn cancel(&mut self, now: u64, id: u64) -> Result<(Job, Vec<Effect>), NotFound> {
        let job = self.jobs.get_mut(&id).ok_or(NotFound(id))?;
        let mut fx = Vec::new();
        match self.live.get_mut(&id) {
            Some(Live::Starting { .. }) => {
                // Its process is being started: stop it as soon as it runs (`on_spawned`).
                if job.state == JobState::Queued && job.stopping.is_none() {
                    job.stopping = Some(crate::job::StopReason::Cancel);
                    info!(job = id, "cancelling a job that is being started");
                    fx.push(Effect::Persist(job.clone()));
                }
            }
            live => match job.cancel(now) {
                CancelAction::Dequeued => {
                    info!(job = id, "queued job cancelled");
                    fx.push(Effect::Persist(job.clone()));
                }
                CancelAction::Terminate => {
                    info!(job = id, "cancelling running job");
                    fx.push(Effect::Persist(job.clone()));
                    if let Some(Live::Running { pgid, term_at, .. }) = live {
                        *term_at = Some(now);
                        fx.push(Effect::Signal {
                            id,
                            pgid: *pgid,
                            sig: Sig::Term,
                        });
                    }
                }
                CancelAction::Nothing => {}
            },
        }
        let job = job.clone();
        // A dequeued head of line may unblock the jobs behind it.
        self.schedule(&mut fx);
        Ok((job, fx))
    }

    /// The process of a [`Effect::Spawn`] runs.
    pub fn on_spawned(&mut self, now: u64, id: u64, sp: Spawned) -> Vec<Effect> {
        let mut fx = Vec::new();
        let (Some(job), Some(Live::Starting { gpus })) =
            (self.jobs.get_mut(&id), self.live.get(&id))
        else {
            warn!(
                job = id,
                pid = sp.pid,
                "a process started for a job that was not starting"
            );
            fx.push(Effect::Signal {
                id,
                pgid: sp.pid,
                sig: Sig::Kill,
            });
            return fx;
        };
        if job.start(now, sp.pid, gpus.clone()).is_err() {
            // Unreachable by construction (a starting job's record stays queued).
            warn!(
                job = id,
                state = job.state.name(),
                "cannot mark the job started"
            );
        }
        job.pid_start = sp.pid_start;
        job.cgroup = sp.cgroup;
        info!(job = id, pid = sp.pid, gpus = ?job.gpu_uuids, "job started");
        fx.push(Effect::Persist(job.clone()));
        let term_at = job.stopping.map(|_| now);
        if term_at.is_some() {
            fx.push(Effect::Signal {
                id,
                pgid: sp.pid,
                sig: Sig::Term,
            });
        }
        self.live.insert(
            id,
            Live::Running {
                pgid: sp.pid,
                term_at,
                kill_sent: false,
            },
        );
        fx
    }

    /// The process of a [`Effect::Spawn`] could not be started: the job is lost, its GPUs go
    /// to the next jobs.
    pub fn on_spawn_failed(&mut self, now: u64, id: u64, why: &str) -> Vec<Effect> {
        let mut fx = Vec::new();
        if matches!(self.live.get(&id), Some(Live::Starting { .. })) {
            self.release(id);
            if let Some(job) = self.jobs.get_mut(&id) {
                warn!(job = id, error = why, "job could not start");
                job.fail_to_start(now, why);
                fx.push(Effect::Persist(job.clone()));
            }
        }
        self.schedule(&mut fx);
        fx
    }

    /// The job's main process ended. `exit`: its status (`None`: unknown, e.g. a re-adopted
    /// process without a status file); `oom`: the cgroup reported an OOM kill. Kills what is
    /// left of the job, frees its GPUs and starts what now fits.
    pub fn on_exit(&mut self, now: u64, id: u64, exit: Option<ExitInfo>, oom: bool) -> Vec<Effect> {
        let mut fx = Vec::new();
        let Some(Live::Running { pgid, .. }) = self.live.get(&id).cloned() else {
            debug!(job = id, "exit of a job that is not running; ignored");
            return fx;
        };
        self.release(id);
        // Nothing of the job may outlive it.
        fx.push(Effect::Signal {
            id,
            pgid,
            sig: Sig::Kill,
        });
        if let Some(job) = self.jobs.get_mut(&id) {
            if let Some(dir) = &job.cgroup {
                fx.push(Effect::CleanupCgroup {
                    id,
                    dir: dir.clone(),
                });
            }
            match exit {
                Some(e) => {
                    let _ = job.exited(now, e, oom);
                }
                None if job.stopping.is_some() => {
                    let _ = job.exited(now, ExitInfo::UNKNOWN, oom);
                }
                None => job.lost(now, UNKNOWN_EXIT.into()),
            }
            info!(job = id, state = job.state.name(), "job finished");
            fx.push(Effect::Persist(job.clone()));
        }
        self.schedule(&mut fx);
        fx
    }

    /// Timers due at `now`: a running job past its deadline gets SIGTERM (and becomes
    /// `timed_out` when it ends); a job SIGTERMed a grace period ago gets SIGKILL.
    pub fn handle_timeout(&mut self, now: u64) -> Vec<Effect> {
        let mut fx = Vec::new();
        let grace = self.cfg.kill_grace_ms;
        for (&id, live) in self.live.iter_mut() {
            let Live::Running {
                pgid,
                term_at,
                kill_sent,
            } = live
            else {
                continue;
            };
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            match *term_at {
                None => {
                    if job.handle_timeout(now) {
                        info!(job = id, "timeout; SIGTERM to process group");
                        *term_at = Some(now);
                        fx.push(Effect::Persist(job.clone()));
                        fx.push(Effect::Signal {
                            id,
                            pgid: *pgid,
                            sig: Sig::Term,
                        });
                    }
                }
                Some(t) if !*kill_sent && now >= t.saturating_add(grace) => {
                    warn!(
                        job = id,
                        pgid = *pgid,
                        "grace period over; SIGKILL to process group"
                    );
                    *kill_sent = true;
                    fx.push(Effect::Signal {
                        id,
                        pgid: *pgid,
                        sig: Sig::Kill,
                    });
                }
                Some(_) => {}
            }
        }
        fx
    }

    /// When [`Queue::handle_timeout`] has something to do next (unix ms); `None`: nothing is
    /// timed.
    pub fn next_wakeup(&self) -> Option<u64> {
        self.live
            .iter()
            .filter_map(|(id, live)| match live {
                Live::Running {
                    term_at: None,
                    kill_sent: false,
                    ..
                } => self.jobs.get(id).and_then(Job::deadline_ms),
                Live::Running {
                    term_at: Some(t),
                    kill_sent: false,
                    ..
                } => Some(t.saturating_add(self.cfg.kill_grace_ms)),
                _ => None,
            })
            .min()
    }

    /// After a restart: decides what became of every job recorded as running, from what the
    /// shell found ([`Queue::unsupervised`] lists the jobs to examine; one without a [`Found`]
    /// counts as gone). Then starts the queued jobs that fit.
    pub fn reconcile(&mut self, now: u64, found: &[Found]) -> Vec<Effect> {
        let mut fx = Vec::new();
        let ids: Vec<u64> = self.unsupervised().map(|j| j.id).collect();
        for id in ids {
            let f = found.iter().find(|f| f.id == id);
            let Some(job) = self.jobs.get_mut(&id) else {
                continue;
            };
            let pid = job.pid.unwrap_or(0);
            match f {
                Some(Found {
                    status: Some(exit),
                    oom,
                    ..
                }) => {
                    let _ = job.exited(now, *exit, *oom);
                    info!(
                        job = id,
                        state = job.state.name(),
                        "reconciled finished job from its status file"
                    );
                }
                Some(Found { alive: true, .. }) if pid > 0 => {
                    info!(
                        job = id,
                        pid, "job still running after agent restart; supervising it again"
                    );
                    let stopping = job.stopping.is_some();
                    fx.push(Effect::Adopt {
                        id,
                        pid,
                        pid_start: job.pid_start,
                    });
                    if stopping {
                        // It was being stopped when the agent went away: stop it again, with
                        // a fresh grace period.
                        fx.push(Effect::Signal {
                            id,
                            pgid: pid,
                            sig: Sig::Term,
                        });
                    }
                    self.live.insert(
                        id,
                        Live::Running {
                            pgid: pid,
                            term_at: stopping.then_some(now),
                            kill_sent: false,
                        },
                    );
                    continue;
                }
                _ => {
                    job.lost(now, LOST_AFTER_RESTART.into());
                    info!(job = id, "reconciled as lost");
                }
            }
            if let Some(dir) = &job.cgroup {
                fx.push(Effect::CleanupCgroup {
                    id,
                    dir: dir.clone(),
                });
            }
            fx.push(Effect::Persist(job.clone()));
            self.release(id);
        }
        // A job cancelled while it was being started, before the agent went away.
        for job in self.jobs.values_mut() {
            if job.state == JobState::Queued
                && job.stopping.is_some()
                && !self.live.contains_key(&job.id)
                && job.cancel(now) == CancelAction::Dequeued
            {
                fx.push(Effect::Persist(job.clone()));
            }
        }
        self.schedule(&mut fx);
        fx
    }

    fn release(&mut self, id: u64) {
        self.held.retain(|_, j| *j != id);
        self.live.remove(&id);
    }

    /// Starts queued jobs in FIFO order while GPUs allow.
    fn schedule(&mut self, fx: &mut Vec<Effect>) {
        let queued: Vec<(u64, u32)> = self
            .jobs
            .values()
            .filter(|j| j.state == JobState::Queued && !self.live.contains_key(&j.id))
            .map(|j| (j.id, j.spec.gpus))
            .collect();
        if queued.is_empty() {
            return;
        }
        let free: Vec<String> = self
            .healthy
            .iter()
            .filter(|u| !self.held.contains_key(*u))
            .cloned()
            .collect();
        for (id, gpus) in crate::job::pick(&queued, &free) {
            let Some(job) = self.jobs.get(&id) else {
                continue;
            };
            for g in &gpus {
                self.held.insert(g.clone(), id);
            }
            debug!(job = id, gpus = ?gpus, "starting job");
            fx.push(Effect::Spawn {
                job: job.clone(),
                gpus: gpus.clone(),
            });
            self.live.insert(id, Live::Starting { gpus });
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::job::StopReason;
    use proptest::prelude::*;

    const GRACE: u64 = 10_000;

    fn spec(gpus: u32, timeout_s: Option<u64>) -> JobSpec {
        JobSpec::for_test(gpus, timeout_s)
    }

    fn gpus(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("GPU-{i}")).collect()
    }

    const OK: ExitInfo = ExitInfo::with_code(0);

    /// The queue plus what the shell would have: the store (every [`Effect::Persist`] applied)
    /// and the processes started. Every step checks that the store equals the queue's records.
    struct Sim {
        q: Queue,
        now: u64,
        store: BTreeMap<u64, Job>,
        /// Effects of the last step.
        fx: Vec<Effect>,
        next_pid: u32,
    }

    impl Sim {
        fn new(n_gpus: usize) -> Sim {
            let mut s = Sim {
                q: Queue::new(cfg()),
                now: 1_000,
                store: BTreeMap::new(),
                fx: Vec::new(),
                next_pid: 100,
            };
            s.set_healthy(gpus(n_gpus));
            s
        }

        fn set_healthy(&mut self, gpus: Vec<String>) -> &[Effect] {
            let fx = self.q.set_healthy(gpus);
            self.take(fx)
        }

        /// Cancels `id` now; the job as the cancel left it.
        fn cancel(&mut self, id: u64) -> Job {
            let (job, fx) = self.q.cancel(self.now, id).unwrap();
            self.take(fx);
            job
        }

        /// Records the effects, applies Persist to the store, checks store == queue.
        fn take(&mut self, fx: Vec<Effect>) -> &[Effect] {
            for e in &fx {
                if let Effect::Persist(j) = e {
                    self.store.insert(j.id, j.clone());
                }
            }
            let mem: BTreeMap<u64, Job> = self.q.jobs().map(|j| (j.id, j.clone())).collect();
            assert_eq!(mem, self.store, "a record changed without a Persist");
            self.fx = fx;
            &self.fx
        }

        fn submit(&mut self, gpus: u32, timeout_s: Option<u64>) -> u64 {
            let (job, fx) = self
                .q
                .submit(self.now, "@local".into(), spec(gpus, timeout_s));
            assert_eq!(
                fx.first(),
                Some(&Effect::Persist(job.clone())),
                "the new record is persisted before anything else"
            );
            self.take(fx);
            job.id
        }

        /// Submits a job whose GPUs are free, and starts its process: it is running.
        fn submit_running(&mut self, gpus: u32, timeout_s: Option<u64>) -> u64 {
            let id = self.submit(gpus, timeout_s);
            let started: Vec<u64> = self.start_spawned().into_iter().map(|(j, _)| j).collect();
            assert_eq!(started, vec![id], "job {id} starts at once");
            assert_eq!(*self.state(id), JobState::Running);
            id
        }

        /// Submits a job that must wait (nothing is spawned).
        fn submit_queued(&mut self, gpus: u32, timeout_s: Option<u64>) -> u64 {
            let id = self.submit(gpus, timeout_s);
            assert!(self.spawns().is_empty(), "job {id} must wait");
            id
        }

        /// Jobs spawned by the last step, with their GPUs.
        fn spawns(&self) -> Vec<(u64, Vec<String>)> {
            self.fx
                .iter()
                .filter_map(|e| match e {
                    Effect::Spawn { job, gpus } => Some((job.id, gpus.clone())),
                    _ => None,
                })
                .collect()
        }

        /// Completes every Spawn of the last step (the shell started the process).
        fn start_spawned(&mut self) -> Vec<(u64, Vec<String>)> {
            let spawns = self.spawns();
            let mut all = Vec::new();
            for (id, _) in &spawns {
                self.next_pid += 1;
                let fx = self.q.on_spawned(
                    self.now,
                    *id,
                    Spawned {
                        pid: self.next_pid,
                        pid_start: Some(7),
                        cgroup: None,
                    },
                );
                all.extend(self.take(fx).to_vec());
            }
            self.fx = all;
            spawns
        }

        fn state(&self, id: u64) -> &JobState {
            &self.q.get(id).unwrap().state
        }

        fn pid(&self, id: u64) -> u32 {
            self.q.get(id).unwrap().pid.unwrap()
        }

        /// The last step sent `sig` to the process group of `id`.
        fn signalled(&self, id: u64, sig: Sig) -> bool {
            let pgid = self.pid(id);
            self.fx.contains(&Effect::Signal { id, pgid, sig })
        }

        fn exit(&mut self, id: u64, exit: ExitInfo) -> &[Effect] {
            let fx = self.q.on_exit(self.now, id, Some(exit), false);
            self.take(fx)
        }

        fn tick(&mut self, at: u64) -> &[Effect] {
            self.now = at;
            let fx = self.q.handle_timeout(at);
            self.take(fx)
        }

        /// `id` was sent SIGTERM at `termed`: nothing happens until the grace period is over,
        /// then its group gets one SIGKILL, exactly on time.
        fn kills_after_the_grace_period(&mut self, id: u64, termed: u64) {
            assert_eq!(self.q.next_wakeup(), Some(termed + GRACE));
            assert!(self.tick(termed + GRACE - 1).is_empty());
            assert_eq!(signals(self.tick(termed + GRACE)), vec![(id, Sig::Kill)]);
            assert_eq!(self.q.next_wakeup(), None, "SIGKILL is sent once");
        }
    }

    fn cfg() -> QueueConfig {
        QueueConfig {
            kill_grace_ms: GRACE,
            log_dir: PathBuf::from("/state/logs"),
        }
    }

    fn signals(fx: &[Effect]) -> Vec<(u64, Sig)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Signal { id, sig, .. } => Some((*id, *sig)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn gpu_jobs_are_fifo_and_a_head_that_does_not_fit_blocks_those_behind_it() {
        let mut s = Sim::new(2);
        let a = s.submit(1, None);
        assert_eq!(s.start_spawned(), vec![(a, gpus(1))]);
        let b = s.submit(2, None); // needs both GPUs: waits
        assert!(s.spawns().is_empty());
        let c = s.submit(1, None); // would fit on GPU-1, but b is ahead of it
        assert!(s.spawns().is_empty(), "c must not pass the blocked b");
        assert_eq!(s.q.holders().len(), 1);
        s.now = 5_000;
        let fx = s.exit(a, OK).to_vec();
        assert_eq!(*s.state(a), JobState::Succeeded);
        assert_eq!(s.spawns(), vec![(b, gpus(2))]);
        assert!(
            fx.iter()
                .position(|e| matches!(e, Effect::Persist(j) if j.id == a))
                < fx.iter().position(|e| matches!(e, Effect::Spawn { .. })),
            "the end of a is recorded before b starts on its GPU: {fx:?}"
        );
        s.start_spawned();
        assert_eq!(*s.state(b), JobState::Running);
        assert_eq!(*s.state(c), JobState::Queued);
        s.exit(b, OK);
        assert_eq!(s.spawns(), vec![(c, vec!["GPU-0".to_string()])]);
    }

    #[test]
    fn cpu_jobs_pass_a_blocked_gpu_job() {
        let mut s = Sim::new(1);
        let g1 = s.submit_running(1, None);
        let g2 = s.submit_queued(1, None);
        let cpu = s.submit(0, None);
        assert_eq!(s.spawns(), vec![(cpu, vec![])]);
        s.start_spawned();
        assert_eq!(*s.state(cpu), JobState::Running);
        assert_eq!(*s.state(g2), JobState::Queued);
        assert_eq!(s.q.holders(), &BTreeMap::from([("GPU-0".to_string(), g1)]));
        // a CPU job's exit frees no GPU and starts nothing
        s.exit(cpu, OK);
        assert!(s.spawns().is_empty());
        assert_eq!(*s.state(g2), JobState::Queued);
    }

    #[test]
    fn unhealthy_gpus_get_no_jobs_and_a_recovered_one_does() {
        let mut s = Sim::new(2);
        s.set_healthy(vec!["GPU-1".into()]);
        let a = s.submit(1, None);
        assert_eq!(s.spawns(), vec![(a, vec!["GPU-1".to_string()])]);
        s.start_spawned();
        let b = s.submit_queued(1, None);
        s.set_healthy(gpus(2));
        assert_eq!(s.spawns(), vec![(b, vec!["GPU-0".to_string()])]);
    }

    #[test]
    fn cancel_of_a_queued_job_dequeues_it_and_unblocks_the_queue() {
        let mut s = Sim::new(2);
        let a = s.submit_running(1, None);
        let big = s.submit(2, None);
        let small = s.submit_queued(1, None);
        s.now = 2_000;
        let job = s.cancel(big);
        assert_eq!(job.state, JobState::Cancelled);
        assert_eq!(job.ended_ms, Some(2_000));
        assert!(signals(&s.fx).is_empty(), "nothing to kill");
        assert_eq!(s.spawns(), vec![(small, vec!["GPU-1".to_string()])]);
        assert_eq!(*s.state(a), JobState::Running);
        // a second cancel changes nothing
        let (_, fx) = s.q.cancel(3_000, big).unwrap();
        assert!(fx.is_empty());
        assert_eq!(s.q.cancel(3_000, 99).unwrap_err(), NotFound(99));
    }

    #[test]
    fn cancel_of_a_running_job_terms_then_kills_after_the_grace_period() {
        let mut s = Sim::new(1);
        let a = s.submit_running(1, None);
        let next = s.submit(1, None);
        s.now = 3_000;
        let job = s.cancel(a);
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.stopping, Some(StopReason::Cancel));
        assert!(s.signalled(a, Sig::Term));
        s.kills_after_the_grace_period(a, 3_000);
        assert!(s.tick(3_000 + 5 * GRACE).is_empty());
        // the process dies of the SIGKILL: cancelled, and the next job gets the GPU
        s.now = 3_000 + GRACE + 5;
        let fx = s.exit(a, ExitInfo::by_signal(9));
        assert_eq!(
            signals(fx),
            vec![(a, Sig::Kill)],
            "the group is killed again"
        );
        assert_eq!(*s.state(a), JobState::Cancelled);
        assert_eq!(s.spawns(), vec![(next, gpus(1))]);
        // cancelling a finished job does nothing
        assert!(s.q.cancel(s.now, a).unwrap().1.is_empty());
    }

    #[test]
    fn timeout_terms_then_kills_after_the_grace_period_at_exact_times() {
        let mut s = Sim::new(0);
        s.now = 10_000;
        let a = s.submit_running(0, Some(2));
        assert_eq!(s.q.next_wakeup(), Some(12_000));
        assert!(s.tick(11_999).is_empty());
        let fx = s.tick(12_000).to_vec();
        assert_eq!(signals(&fx), vec![(a, Sig::Term)]);
        assert!(
            matches!(&fx[0], Effect::Persist(j) if j.stopping == Some(StopReason::Timeout)),
            "the decision is recorded with the signal: {fx:?}"
        );
        s.kills_after_the_grace_period(a, 12_000);
        s.now = 22_001;
        s.exit(a, ExitInfo::by_signal(9));
        assert_eq!(*s.state(a), JobState::TimedOut);
        assert_eq!(s.q.get(a).unwrap().ended_ms, Some(22_001));
    }

    #[test]
    fn a_job_that_ends_in_its_grace_period_gets_no_sigkill_timer() {
        let mut s = Sim::new(0);
        let a = s.submit_running(0, Some(1));
        s.tick(2_000);
        s.now = 2_500;
        s.exit(a, ExitInfo::by_signal(15));
        assert_eq!(*s.state(a), JobState::TimedOut);
        assert_eq!(s.q.next_wakeup(), None);
        assert!(s.tick(2_000 + GRACE).is_empty());
    }

    #[test]
    fn exit_frees_the_gpus_and_starts_the_next_job() {
        let mut s = Sim::new(2);
        let a = s.submit_running(2, None);
        let b = s.submit(1, None);
        let c = s.submit_queued(1, None);
        s.now = 4_000;
        s.exit(a, ExitInfo::with_code(3));
        assert_eq!(*s.state(a), JobState::Failed { exit_code: 3 });
        assert_eq!(
            s.spawns(),
            vec![
                (b, vec!["GPU-0".to_string()]),
                (c, vec!["GPU-1".to_string()])
            ]
        );
        assert_eq!(s.q.holders().len(), 2);
    }

    #[test]
    fn a_job_that_cannot_start_is_lost_and_frees_its_gpus() {
        let mut s = Sim::new(1);
        let a = s.submit(1, None);
        assert_eq!(s.spawns(), vec![(a, gpus(1))]);
        let b = s.submit_queued(1, None);
        let fx = s.q.on_spawn_failed(1_500, a, "no such file");
        s.take(fx);
        assert_eq!(
            *s.state(a),
            JobState::Lost {
                reason: "could not start: no such file".into()
            }
        );
        assert_eq!(s.spawns(), vec![(b, gpus(1))]);
    }

    #[test]
    fn cancel_while_the_process_is_being_started_stops_it_once_it_runs() {
        let mut s = Sim::new(1);
        let a = s.submit(1, None);
        assert_eq!(s.spawns().len(), 1);
        s.now = 1_200;
        let job = s.cancel(a);
        assert_eq!(job.state, JobState::Queued);
        assert_eq!(job.stopping, Some(StopReason::Cancel));
        s.now = 1_300;
        s.fx = vec![Effect::Spawn {
            job: job.clone(),
            gpus: gpus(1),
        }];
        s.start_spawned();
        assert!(s.signalled(a, Sig::Term));
        assert_eq!(s.q.next_wakeup(), Some(1_300 + GRACE));
        s.exit(a, ExitInfo::by_signal(15));
        assert_eq!(*s.state(a), JobState::Cancelled);
    }

    fn running_record(id: u64, gpus: &[&str], pid: u32, stopping: Option<StopReason>) -> Job {
        let mut j = Job::new(
            id,
            "eng".into(),
            spec(gpus.len() as u32, None),
            100,
            "l".into(),
        );
        j.start(200, pid, gpus.iter().map(|g| g.to_string()).collect())
            .unwrap();
        j.pid_start = Some(42);
        j.stopping = stopping;
        j
    }

    /// `id`'s process was found still running, without a status file.
    fn found_alive(id: u64) -> Found {
        Found {
            id,
            status: None,
            alive: true,
            oom: false,
        }
    }

    /// Job 1, recorded as running (pid 11, no GPUs), restored and found alive at 9 000: the
    /// queue and the reconcile's effects.
    fn readopted(stopping: Option<StopReason>) -> (Queue, Vec<Effect>) {
        let mut q = Queue::restore(cfg(), vec![running_record(1, &[], 11, stopping)]);
        let fx = q.reconcile(9_000, &[found_alive(1)]);
        (q, fx)
    }

    #[test]
    fn reconcile_after_restart_finishes_readopts_and_loses() {
        let mut finished = running_record(1, &["GPU-0"], 11, None);
        finished.cgroup = Some("/cg/job-1".into());
        let alive = running_record(2, &["GPU-1"], 12, None);
        let gone = running_record(3, &[], 13, None);
        let queued = Job::new(4, "eng".into(), spec(1, None), 300, "l".into());
        let done = {
            let mut j = Job::new(5, "eng".into(), spec(0, None), 300, "l".into());
            j.lost(400, "earlier".into());
            j
        };
        let records = vec![finished, alive, gone, queued, done.clone()];
        let mut s = Sim {
            q: Queue::restore(cfg(), records.clone()),
            now: 50_000,
            store: records.into_iter().map(|j| (j.id, j)).collect(),
            fx: Vec::new(),
            next_pid: 500,
        };
        // until reconciled, the GPUs recorded as held stay held
        s.set_healthy(gpus(2));
        assert!(
            s.spawns().is_empty(),
            "queued job 4 must wait for reconcile"
        );
        let fx = s.q.reconcile(
            50_000,
            &[
                Found {
                    id: 1,
                    status: Some(ExitInfo::with_code(3)),
                    alive: false,
                    oom: false,
                },
                found_alive(2),
                Found {
                    id: 3,
                    status: None,
                    alive: false,
                    oom: false,
                },
            ],
        );
        let fx = s.take(fx).to_vec();
        assert_eq!(*s.state(1), JobState::Failed { exit_code: 3 });
        assert!(fx.contains(&Effect::CleanupCgroup {
            id: 1,
            dir: "/cg/job-1".into()
        }));
        assert_eq!(*s.state(2), JobState::Running);
        assert!(fx.contains(&Effect::Adopt {
            id: 2,
            pid: 12,
            pid_start: Some(42)
        }));
        assert!(
            matches!(s.state(3), JobState::Lost { reason } if reason.contains("agent restarted"))
        );
        assert_eq!(s.q.get(3).unwrap().ended_ms, Some(50_000));
        assert_eq!(s.q.get(5), Some(&done), "finished records are left alone");
        // job 4 takes the GPU job 1 held; job 2 keeps its GPU
        assert_eq!(s.spawns(), vec![(4, vec!["GPU-0".to_string()])]);
        assert_eq!(s.q.holders().get("GPU-1"), Some(&2));
        // the re-adopted job is supervised as any other: its exit frees its GPU
        let fx = s.q.on_exit(60_000, 2, Some(OK), false);
        s.take(fx);
        assert_eq!(*s.state(2), JobState::Succeeded);
        assert_eq!(s.q.holders().get("GPU-1"), None);
        // new ids continue after the restored ones
        assert_eq!(s.submit(0, None), 6);
    }

    #[test]
    fn a_readopted_job_that_was_stopping_is_stopped_again() {
        let (mut q, fx) = readopted(Some(StopReason::Timeout));
        assert_eq!(signals(&fx), vec![(1, Sig::Term)]);
        assert_eq!(q.next_wakeup(), Some(9_000 + GRACE));
        assert_eq!(
            signals(&q.handle_timeout(9_000 + GRACE)),
            vec![(1, Sig::Kill)]
        );
        // no status file: the exit is attributed to the timeout
        q.on_exit(9_000 + GRACE + 1, 1, None, false);
        assert_eq!(q.get(1).unwrap().state, JobState::TimedOut);
    }

    #[test]
    fn a_readopted_job_without_a_status_is_lost_when_it_ends() {
        let (mut q, _) = readopted(None);
        q.on_exit(9_500, 1, None, false);
        assert!(
            matches!(&q.get(1).unwrap().state, JobState::Lost { reason } if reason.contains("re-adopted"))
        );
    }

    /// `start_exact` by `alice` on `names` (GPU-N), the machine having `gpus(known)`.
    fn exact(s: &mut Sim, names: &[&str], known: usize) -> Result<u64, StartRefused> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let spec = spec(names.len() as u32, None);
        let (job, fx) =
            s.q.start_exact(s.now, "alice".into(), spec, &names, &gpus(known))?;
        s.take(fx);
        Ok(job.id)
    }

    #[test]
    fn start_exact_starts_at_once_on_exactly_the_named_gpus() {
        let mut s = Sim::new(3);
        let a = exact(&mut s, &["GPU-2", "GPU-0"], 3).unwrap();
        assert!(
            matches!(&s.fx[0], Effect::Persist(j) if j.id == a && j.caller == "alice"),
            "the record first: {:?}",
            s.fx
        );
        assert_eq!(
            s.spawns(),
            vec![(a, vec!["GPU-2".to_string(), "GPU-0".to_string()])]
        );
        assert_eq!(s.q.holders().get("GPU-2"), Some(&a));
        assert_eq!(s.q.holders().get("GPU-0"), Some(&a));
        s.start_spawned();
        assert_eq!(*s.state(a), JobState::Running);
        assert_eq!(s.q.get(a).unwrap().gpu_uuids, vec!["GPU-2", "GPU-0"]);
        // a CPU-only start needs no GPU
        let c = exact(&mut s, &[], 3).unwrap();
        assert_eq!(s.spawns(), vec![(c, vec![])]);
        // the end frees exactly its GPUs
        s.exit(a, OK);
        assert_eq!(s.q.holders().len(), 0);
    }

    #[test]
    fn start_exact_refuses_unknown_unhealthy_held_and_invalid_gpus_and_records_nothing() {
        let mut s = Sim::new(3);
        let local = s.submit_running(1, None); // holds GPU-0
        s.set_healthy(vec!["GPU-0".into(), "GPU-1".into()]); // GPU-2 is unhealthy
        let before: Vec<u64> = s.q.jobs().map(|j| j.id).collect();
        let refused = |s: &mut Sim, names: &[&str]| exact(s, names, 3).unwrap_err();
        assert_eq!(
            refused(&mut s, &["GPU-1", "GPU-7"]),
            StartRefused::Unknown("GPU-7".into())
        );
        assert_eq!(
            refused(&mut s, &["GPU-2"]).to_string(),
            "GPU GPU-2 is unhealthy"
        );
        assert_eq!(
            refused(&mut s, &["GPU-1", "GPU-0"]).to_string(),
            format!("GPU GPU-0 is held by job {local}")
        );
        assert_eq!(
            refused(&mut s, &["GPU-1", "GPU-1"]),
            StartRefused::Duplicate("GPU-1".into())
        );
        let (mut bad, names) = (spec(2, None), vec!["GPU-1".to_string()]);
        assert_eq!(
            s.q.start_exact(s.now, "a".into(), bad.clone(), &names, &gpus(3))
                .unwrap_err(),
            StartRefused::CountMismatch { asked: 2, given: 1 }
        );
        bad = spec(1, None);
        assert!(s
            .q
            .start_exact(s.now, "a".into(), bad, &names, &gpus(3))
            .is_ok());
        s.fx.clear();
        let after: Vec<u64> = s.q.jobs().map(|j| j.id).collect();
        assert_eq!(
            after.len(),
            before.len() + 1,
            "only the accepted start is recorded"
        );
        assert_eq!(after.last(), Some(&(local + 1)), "refusals take no id");
    }

    #[test]
    fn start_exact_is_never_queued_behind_a_waiting_job() {
        let mut s = Sim::new(2);
        let a = s.submit_running(1, None); // GPU-0
        let big = s.submit_queued(2, None); // waits for both GPUs
        let p = exact(&mut s, &["GPU-1"], 2).unwrap();
        assert_eq!(s.spawns(), vec![(p, vec!["GPU-1".to_string()])]);
        s.start_spawned();
        s.exit(a, OK);
        assert!(s.spawns().is_empty(), "big still waits for GPU-1");
        s.exit(p, OK);
        assert_eq!(s.spawns(), vec![(big, gpus(2))]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Submit(u32, Option<u64>),
        /// `start_exact` on the GPUs of the mask (index 3 is a GPU the machine does not have).
        StartExact(Vec<bool>),
        /// Completes the n-th outstanding spawn (ok or failed).
        Spawned(usize, bool),
        /// The n-th running job exits.
        Exit(usize),
        Cancel(u64),
        Advance(u64),
        Healthy(Vec<bool>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u32..=3, proptest::option::of(1u64..5)).prop_map(|(g, t)| Op::Submit(g, t)),
            proptest::collection::vec(any::<bool>(), 4).prop_map(Op::StartExact),
            (0usize..4, any::<bool>()).prop_map(|(n, ok)| Op::Spawned(n, ok)),
            (0usize..4).prop_map(Op::Exit),
            (1u64..12).prop_map(Op::Cancel),
            (0u64..15_000).prop_map(Op::Advance),
            proptest::collection::vec(any::<bool>(), 3).prop_map(Op::Healthy),
        ]
    }

    proptest! {
        /// Over random operations: a GPU is never given to two live jobs, only healthy GPUs
        /// are given, the store always equals the queue's records, and what the queue says it
        /// holds matches the jobs that are starting or running.
        #[test]
        fn gpus_are_never_double_assigned(ops in proptest::collection::vec(op(), 1..80)) {
            let mut s = Sim::new(3);
            let mut healthy = gpus(3);
            // GPU → job, as the shell sees it from Spawn effects.
            let mut assigned: BTreeMap<String, u64> = BTreeMap::new();
            let mut outstanding: Vec<u64> = Vec::new();
            let mut running: Vec<u64> = Vec::new();
            for op in ops {
                let fx: Vec<Effect> = match op {
                    Op::Submit(g, t) => {
                        let (_, fx) = s.q.submit(s.now, "x".into(), spec(g, t));
                        fx
                    }
                    Op::StartExact(mask) => {
                        let names: Vec<String> = gpus(4)
                            .into_iter()
                            .zip(mask)
                            .filter(|(_, m)| *m)
                            .map(|(g, _)| g)
                            .collect();
                        let sp = spec(names.len() as u32, None);
                        match s.q.start_exact(s.now, "p".into(), sp, &names, &gpus(3)) {
                            Ok((job, fx)) => {
                                prop_assert!(
                                    fx.iter().any(|e| matches!(e, Effect::Spawn { job: j, gpus } if j.id == job.id && *gpus == names)),
                                    "started at once on the named GPUs: {:?}", fx
                                );
                                fx
                            }
                            Err(why) => {
                                let blocked = names.iter().any(|g| {
                                    !healthy.contains(g) || assigned.contains_key(g)
                                });
                                prop_assert!(blocked, "refused ({}) though {:?} were free", why, names);
                                Vec::new()
                            }
                        }
                    }
                    Op::Spawned(n, ok) if !outstanding.is_empty() => {
                        let id = outstanding.remove(n % outstanding.len());
                        if ok {
                            running.push(id);
                            s.q.on_spawned(s.now, id, Spawned { pid: 1000 + id as u32, pid_start: None, cgroup: None })
                        } else {
                            s.q.on_spawn_failed(s.now, id, "boom")
                        }
                    }
                    Op::Exit(n) if !running.is_empty() => {
                        let id = running.remove(n % running.len());
                        s.q.on_exit(s.now, id, Some(OK), false)
                    }
                    Op::Cancel(id) => s.q.cancel(s.now, id).map(|(_, fx)| fx).unwrap_or_default(),
                    Op::Advance(ms) => {
                        s.now += ms;
                        s.q.handle_timeout(s.now)
                    }
                    Op::Healthy(mask) => {
                        healthy = gpus(3).into_iter().zip(mask).filter(|(_, h)| *h).map(|(g, _)| g).collect();
                        s.q.set_healthy(healthy.clone())
                    }
                    _ => Vec::new(),
                };
                s.take(fx.clone());
                // jobs that ended or could not start give their GPUs back
                assigned.retain(|_, id| {
                    let st = &s.q.get(*id).unwrap().state;
                    !st.is_terminal()
                });
                for e in &fx {
                    if let Effect::Spawn { job, gpus } = e {
                        prop_assert_eq!(gpus.len(), job.spec.gpus as usize);
                        for g in gpus {
                            prop_assert!(healthy.contains(g), "unhealthy {} given to {}", g, job.id);
                            prop_assert!(!assigned.contains_key(g), "{} given twice", g);
                            assigned.insert(g.clone(), job.id);
                        }
                        outstanding.push(job.id);
                    }
                }
                prop_assert_eq!(s.q.holders(), &assigned);
                for id in s.q.holders().values() {
                    let st = &s.q.get(*id).unwrap().state;
                    prop_assert!(matches!(st, JobState::Queued | JobState::Running));
                }
            }
        }
    }
}
