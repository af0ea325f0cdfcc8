//! The agent's side of the pool feed (issue 11; the types are `weft_proto::pool`): the
//! coordinator (the relay) opens a tunnel stream to the in-process service
//! [`POOL_SERVICE`] as [`POOL_CALLER`], and the two speak JSON lines.
//!
//! - On a new stream the agent sends its whole [`Inventory`], then every [`Ended`] not yet
//!   acked; after that a fresh `Inventory` whenever it changes (GPU health, a holder, a pool
//!   copy starting or ending), at most one per [`COALESCE`] but never losing the last one.
//! - [`CoordMsg::Start`] creates a local job owned by `start.owner` (so the engineer reads its
//!   logs, cancels it and sees it in `history` through the normal API) on exactly
//!   `start.gpus` ([`Engine::start_exact`]), labelled [`LABEL_POOL_JOB`] / [`LABEL_ATTEMPT`]
//!   (the labels are in the job's record, so a copy is recognised after a restart). The
//!   answer is [`AgentMsg::Started`] once its process runs, or [`AgentMsg::Refused`]. A copy
//!   whose process could not be started at all ends as `lost` (an `Ended` without
//!   `started_ms`).
//! - [`CoordMsg::Stop`] cancels the matching copies the normal way (SIGTERM, SIGKILL after the
//!   grace period); each then ends as `cancelled`.
//! - A copy's end is sent as [`AgentMsg::Ended`] and again on every new stream until
//!   [`CoordMsg::Ack`]. So is the end of every per-worker job (`pool_job` 0, the caller as
//!   `owner`): the coordinator keeps a usage record of every finished job on every worker.
//!   What is unacked lives in memory; after an agent restart, the jobs in the store that
//!   ended within [`REPLAY_WINDOW_MS`] are sent again (the coordinator de-duplicates).
//! - A line that does not decode is logged and skipped; a line over `MAX_LINE` closes the
//!   stream. One stream at a time: a new one supersedes the old one.
//!
//! [`Ledger`] and [`inventory`] are pure; [`PoolFeed::serve`] is generic over the stream so it
//! is tested over `tokio::io::duplex`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};
use tunnel_relay::client::IncomingStream;
use weft_proto::pool::{
    decode_line, encode_line, AgentMsg, CoordMsg, Ended, GpuInfo, GpuReading, Inventory, JobCopy,
    LineError, Start, UsageRecord, MAX_LINE, POOL_CALLER, POOL_SERVICE,
};
use weft_proto::usage::{Signer, WorkerClaim};

use crate::agent::Engine;
use crate::job::{Job, JobRequest, JobState};
use crate::sampler::{unix_ms, SharedSnapshot, Snapshot};

/// The label naming a job's pool job id.
pub const LABEL_POOL_JOB: &str = "weft.pool_job";
/// The label naming a job's attempt.
pub const LABEL_ATTEMPT: &str = "weft.attempt";
/// After an agent restart, pool copies that ended this recently (ms) are sent again.
pub const REPLAY_WINDOW_MS: u64 = 3_600_000;
/// At most one `Inventory` per this long.
pub const COALESCE: Duration = Duration::from_millis(100);
/// How often GPU health is looked at for a changed inventory (the sampler has no signal).
const HEALTH_POLL: Duration = Duration::from_millis(250);

const MIB: u64 = 1024 * 1024;

/// The pool copy a job is, from its labels.
pub fn copy_of(job: &Job) -> Option<JobCopy> {
    let labels = &job.spec.labels;
    Some(JobCopy {
        pool_job: labels.get(LABEL_POOL_JOB)?.parse().ok()?,
        attempt: labels.get(LABEL_ATTEMPT)?.parse().ok()?,
        local_id: job.id,
    })
}

/// The end of a finished copy.
fn ended_of(job: &Job, copy: JobCopy) -> Ended {
    Ended {
        copy,
        state: job.state.name().to_string(),
        exit_code: match job.state {
            JobState::Succeeded => Some(0),
            JobState::Failed { exit_code } => Some(exit_code),
            _ => None,
        },
        started_ms: job.started_ms,
        ended_ms: job.ended_ms.unwrap_or(job.submitted_ms),
        gpus: job.gpu_uuids.clone(),
        owner: None,
        usage: None,
    }
}

/// A finished job as the coordinator's usage record needs it: a pool copy, or a per-worker job
/// (`pool_job` 0, its caller as the owner). None while it runs.
fn end_of(job: &Job) -> Option<Ended> {
    if !job.state.is_terminal() {
        return None;
    }
    Some(match copy_of(job) {
        Some(copy) => ended_of(job, copy),
        None => Ended {
            owner: Some(job.caller.clone()),
            ..ended_of(
                job,
                JobCopy {
                    pool_job: 0,
                    attempt: 0,
                    local_id: job.id,
                },
            )
        },
    })
}

/// The key of an end in the ledger: (pool job, attempt), or a per-worker job's local id.
type EndKey = (u64, u32, u64);

fn end_key(pool_job: u64, attempt: u32, local_id: Option<u64>) -> EndKey {
    if pool_job == 0 {
        (0, 0, local_id.unwrap_or(0))
    } else {
        (pool_job, attempt, 0)
    }
}

/// The job a [`Start`] asks for, with its pool labels.
fn request_of(start: &Start) -> JobRequest {
    JobRequest {
        command: start.command.clone(),
        env: start.env.clone(),
        workdir: start.workdir.clone(),
        gpus: u32::try_from(start.gpus.len()).unwrap_or(u32::MAX),
        timeout_s: start.timeout_s,
        labels: BTreeMap::from([
            (LABEL_POOL_JOB.to_string(), start.pool_job.to_string()),
            (LABEL_ATTEMPT.to_string(), start.attempt.to_string()),
        ]),
        ..JobRequest::default()
    }
}

/// The machine's size and the agent's version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub cpus: u32,
    pub memory_bytes: u64,
    pub version: String,
}

impl Host {
    /// This machine (online CPUs, physical memory) and this build's version.
    pub fn detect() -> Host {
        // SAFETY: sysconf has no preconditions; it answers -1 for an unknown name.
        let (cpus, pages, page) = unsafe {
            (
                libc::sysconf(libc::_SC_NPROCESSORS_ONLN),
                libc::sysconf(libc::_SC_PHYS_PAGES),
                libc::sysconf(libc::_SC_PAGESIZE),
            )
        };
        let pos = |v: libc::c_long| u64::try_from(v).unwrap_or(0);
        Host {
            cpus: u32::try_from(pos(cpus)).unwrap_or(u32::MAX),
            memory_bytes: pos(pages).saturating_mul(pos(page)),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The inventory from the last GPU snapshot, the GPU holders and the jobs. `seen` keeps each
/// GPU's model and memory as last read, so a GPU that fell off the bus (NVML answers nothing
/// about it) keeps them.
pub fn inventory(
    snap: &Snapshot,
    holders: &BTreeMap<String, u64>,
    jobs: &[Job],
    host: &Host,
    seen: &mut BTreeMap<String, (String, u64)>,
) -> Inventory {
    let gpus = snap
        .gpus
        .iter()
        .map(|g| {
            let uuid = g.sample.uuid.clone();
            let known = seen.entry(uuid.clone()).or_default();
            if let Some(n) = &g.sample.name {
                known.0.clone_from(n);
            }
            if let Some(m) = g.sample.memory_total_bytes {
                known.1 = m / MIB;
            }
            GpuInfo {
                model: known.0.clone(),
                memory_mib: known.1,
                health: g.health.state.as_str().to_string(),
                job: holders.get(&uuid).copied(),
                uuid,
            }
        })
        .collect();
    Inventory {
        gpus,
        cpus: host.cpus,
        memory_bytes: host.memory_bytes,
        version: host.version.clone(),
        simulated: snap.simulated,
        running: jobs
            .iter()
            .filter(|j| !j.state.is_terminal())
            .filter_map(copy_of)
            .collect(),
        ray: None,
        ray_heads: Vec::new(),
        usage_key: None,
    }
}

/// What the feed remembers across streams: which copies' starts and ends were reported, and
/// the ends not yet acked. Pure.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// Ends not yet acked, by (pool job, attempt) or a per-worker job's local id ([`end_key`]).
    unacked: BTreeMap<EndKey, Ended>,
    /// Local ids of copies whose end was taken into `unacked` (acked since or not).
    ended: BTreeSet<u64>,
    /// Local ids of copies whose start was reported (or that ran before the agent started).
    started: BTreeSet<u64>,
}

impl Ledger {
    /// After a start of the agent: copies in the store that ended since `now -
    /// REPLAY_WINDOW_MS` are unacked; older ends and running copies count as reported.
    pub fn restore(jobs: &[Job], now: u64) -> Ledger {
        let mut l = Ledger::default();
        for j in jobs {
            if copy_of(j).is_some() && j.state == JobState::Running {
                l.started.insert(j.id);
            }
            let Some(e) = end_of(j) else { continue };
            l.started.insert(j.id);
            l.ended.insert(j.id);
            if e.ended_ms.saturating_add(REPLAY_WINDOW_MS) >= now {
                let key = end_key(e.copy.pool_job, e.copy.attempt, Some(j.id));
                l.unacked.insert(key, e);
            }
        }
        l
    }

    /// New starts and ends in `jobs` (the engine's list) since the last scan: `Started` for
    /// pool copies, `Ended` for every job, pool or per-worker (the usage record).
    pub fn scan(&mut self, jobs: &[Job]) -> Vec<AgentMsg> {
        let mut out = Vec::new();
        for j in jobs {
            if let Some(copy) = copy_of(j) {
                if let (Some(started_ms), false) = (j.started_ms, self.started.contains(&j.id)) {
                    self.started.insert(j.id);
                    out.push(AgentMsg::Started { copy, started_ms });
                }
            }
            if j.state.is_terminal() && !self.ended.contains(&j.id) {
                if let Some(e) = end_of(j) {
                    self.ended.insert(j.id);
                    let key = end_key(e.copy.pool_job, e.copy.attempt, Some(j.id));
                    self.unacked.insert(key, e.clone());
                    out.push(AgentMsg::Ended(e));
                }
            }
        }
        out
    }

    /// The coordinator stored this end. Whether it was unacked.
    pub fn ack(&mut self, pool_job: u64, attempt: u32, local_id: Option<u64>) -> bool {
        self.unacked
            .remove(&end_key(pool_job, attempt, local_id))
            .is_some()
    }

    /// Every end not yet acked, for a new stream.
    pub fn replay(&self) -> Vec<AgentMsg> {
        self.unacked
            .values()
            .cloned()
            .map(AgentMsg::Ended)
            .collect()
    }

    /// This copy's end, when it is unacked.
    fn unacked_end(&self, pool_job: u64, attempt: u32) -> Option<&Ended> {
        self.unacked.get(&end_key(pool_job, attempt, None))
    }
}

/// What the agent needs to run Ray cluster members (`worker-agent run --ray`, on the mesh).
#[derive(Debug, Clone)]
pub struct RayContext {
    /// The agent's Ray.
    pub ray: crate::ray::RayConfig,
    /// The mesh interface (the firewall lets Ray's ports in on it).
    pub mesh_if: String,
    /// Where token files go.
    pub state_dir: std::path::PathBuf,
    /// The `worker-agent` binary, run as `ray-member` around Ray so that a member whose Ray
    /// exits is restarted ([`crate::ray_member`]); `None` runs Ray bare.
    pub supervisor: Option<std::path::PathBuf>,
}

/// How this worker signs its usage records ([`weft_proto::usage`]): its name on the relay
/// and its usage key (`STATE_DIR/usage-signing.key`).
#[derive(Debug)]
pub struct UsageSigning {
    /// The worker's name, as the coordinator knows it.
    pub worker: String,
    /// Its key.
    pub signer: Signer,
}

impl UsageSigning {
    /// The record of `e` as this worker sees it (the job's rank and caller from its own
    /// store, the GPUs' model from `gpus`, in NVML order), signed. None when the job is not
    /// in the store (a start that never made a local job).
    pub fn claim(&self, e: &Ended, job: Option<&Job>, gpus: &[GpuInfo]) -> Option<WorkerClaim> {
        let job = job?;
        let rank = job
            .spec
            .env
            .get("WEFT_NODE_RANK")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let engineer = e.owner.clone().unwrap_or_else(|| job.caller.clone());
        let model = gpus
            .iter()
            .find(|g| e.gpus.contains(&g.uuid))
            .map(|g| g.model.clone())
            .unwrap_or_default();
        let record = UsageRecord::of_end(e, rank, engineer, &self.worker, model);
        Some(WorkerClaim::sign(record, &self.signer))
    }
}

/// The pool feed of one agent: its state outlives the streams.
#[derive(Debug)]
pub struct PoolFeed {
    engine: Arc<Engine>,
    snapshot: SharedSnapshot,
    host: Host,
    ray: Option<RayContext>,
    /// Ray members running here (shared with the `ray-dashboard` service).
    pub members: Arc<Mutex<crate::ray::Members>>,
    ledger: Mutex<Ledger>,
    seen: Mutex<BTreeMap<String, (String, u64)>>,
    /// Bumped by each new stream; the others see it and end.
    current: watch::Sender<u64>,
    /// A head's reading of Ray's nodes changed: send the inventory now, not at the next poll.
    ray_changed: tokio::sync::Notify,
    /// Signs each end's usage record (None: ends go unsigned).
    usage: Option<UsageSigning>,
}

/// What the reader task hands the session.
enum Line {
    Msg(CoordMsg),
    TooLong(usize),
}

impl PoolFeed {
    /// The feed over the engine's jobs (restoring what a previous run left unacked).
    pub fn new(engine: Arc<Engine>, snapshot: SharedSnapshot) -> Arc<PoolFeed> {
        Self::with_ray(engine, snapshot, None, None)
    }

    /// The feed, running Ray cluster members with `ray`, signing usage records with `usage`.
    pub fn with_ray(
        engine: Arc<Engine>,
        snapshot: SharedSnapshot,
        ray: Option<RayContext>,
        usage: Option<UsageSigning>,
    ) -> Arc<PoolFeed> {
        let ledger = Ledger::restore(&engine.list(), unix_ms());
        Arc::new(PoolFeed {
            engine,
            snapshot,
            host: Host::detect(),
            ray,
            members: Arc::new(Mutex::new(crate::ray::Members::default())),
            ledger: Mutex::new(ledger),
            seen: Mutex::new(BTreeMap::new()),
            current: watch::Sender::new(0),
            ray_changed: tokio::sync::Notify::new(),
            usage,
        })
    }

    /// `m` as sent: an end gets this worker's signed usage record (signed again at every
    /// send; Ed25519 signatures are deterministic, so a replayed end is the same line).
    fn seal(&self, m: AgentMsg) -> AgentMsg {
        match (m, &self.usage) {
            (AgentMsg::Ended(mut e), Some(u)) if e.usage.is_none() => {
                let job = self.engine.get(e.copy.local_id);
                e.usage = u.claim(&e, job.as_ref(), &self.inventory().gpus);
                AgentMsg::Ended(e)
            }
            (m, _) => m,
        }
    }

    /// Whether this agent runs Ray cluster members.
    pub fn runs_ray(&self) -> bool {
        self.ray.is_some()
    }

    /// The inventory now.
    pub fn inventory(&self) -> Inventory {
        let jobs = self.engine.list();
        let holders = self.engine.holders();
        let snap = self.snapshot.read();
        let mut inv = inventory(&snap, &holders, &jobs, &self.host, &mut self.seen.lock());
        inv.usage_key = self.usage.as_ref().map(|u| u.signer.public().to_string());
        if let Some(r) = &self.ray {
            inv.ray = Some(r.ray.version.clone());
            let m = self.members.lock();
            inv.ray_heads = m
                .reports
                .iter()
                .map(
                    |(&(pool_job, attempt), (at_ms, nodes))| weft_proto::cluster::RayHeadReport {
                        pool_job,
                        attempt,
                        at_ms: *at_ms,
                        nodes: nodes.clone(),
                    },
                )
                .collect();
        }
        inv
    }

    /// Every GPU's readings from the last sample, in NVML order.
    pub fn readings(&self) -> Vec<GpuReading> {
        self.snapshot
            .read()
            .gpus
            .iter()
            .map(|g| GpuReading {
                uuid: g.sample.uuid.clone(),
                util_pct: g.sample.utilization_gpu_percent,
                mem_used_mib: g.sample.memory_used_bytes.map(|b| b / MIB),
                temp_c: g.sample.temperature_celsius,
                power_mw: g.sample.power_draw_milliwatts,
            })
            .collect()
    }

    /// Serves the `@pool` streams the relay hands over until the channel closes.
    pub async fn serve_incoming(self: Arc<Self>, mut rx: mpsc::Receiver<IncomingStream>) {
        while let Some(inc) = rx.recv().await {
            tokio::spawn(self.clone().accept(inc));
        }
    }

    /// One stream to [`POOL_SERVICE`]: served when the coordinator opened it, else closed.
    pub async fn accept(self: Arc<Self>, inc: IncomingStream) {
        let IncomingStream {
            from,
            service,
            send,
            recv,
        } = inc;
        debug!(caller = %from, service = %service, "pool feed stream offered");
        self.open(&from, tokio::io::join(recv, send)).await;
    }

    /// A stream opened by `from`: served when that is the coordinator ([`POOL_CALLER`]),
    /// else closed at once.
    pub async fn open<S>(self: Arc<Self>, from: &str, io: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        if from != POOL_CALLER {
            warn!(caller = %from, "{POOL_SERVICE} stream not opened by the coordinator; closed");
            return;
        }
        self.serve(io).await;
    }

    /// Speaks the pool feed on `io` until the coordinator hangs up, sends a line over the
    /// limit, or a newer stream supersedes this one.
    pub async fn serve<S>(self: &Arc<Self>, io: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let mut me = 0;
        self.current.send_modify(|g| {
            *g = g.wrapping_add(1);
            me = *g;
        });
        let mut current = self.current.subscribe();
        info!(stream = me, "pool feed stream opened");
        let (rd, wr) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::unbounded_channel::<AgentMsg>();
        let sealer = self.clone();
        let writer = tokio::spawn(write_lines(wr, out_rx, move |m| sealer.seal(m)));
        let (in_tx, mut in_rx) = mpsc::channel::<Line>(16);
        let reader = tokio::spawn(read_lines(rd, in_tx));
        let mut changes = self.engine.changes();
        changes.mark_unchanged();

        // Inventory first, then what happened while nobody listened, then the unacked ends.
        let started: Vec<AgentMsg> = {
            let jobs = self.engine.list();
            self.ledger.lock().scan(&jobs)
        };
        let mut last = self.inventory();
        let _ = out_tx.send(AgentMsg::Inventory(last.clone()));
        let mut last_at = Instant::now();
        for m in started {
            if matches!(m, AgentMsg::Started { .. }) {
                let _ = out_tx.send(m);
            }
        }
        for m in self.ledger.lock().replay() {
            let _ = out_tx.send(m);
        }

        let mut poll = tokio::time::interval(HEALTH_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut due: Option<Instant> = None;
        loop {
            let mut jobs_changed = false;
            tokio::select! {
                line = in_rx.recv() => match line {
                    Some(Line::Msg(m)) => self.handle(m, &out_tx).await,
                    Some(Line::TooLong(n)) => {
                        warn!(stream = me, bytes = n, limit = MAX_LINE, "pool feed line over the limit; closing the stream");
                        break;
                    }
                    None => {
                        info!(stream = me, "pool feed stream closed by the coordinator");
                        break;
                    }
                },
                r = changes.changed() => {
                    if r.is_err() {
                        break;
                    }
                    jobs_changed = true;
                }
                _ = poll.tick() => {}
                _ = self.ray_changed.notified() => {}
                _ = superseded(&mut current, me) => {
                    info!(stream = me, "pool feed stream superseded by a newer one");
                    break;
                }
                _ = sleep_until_some(due) => {}
            }
            if out_tx.is_closed() {
                debug!(stream = me, "pool feed writer stopped");
                break;
            }
            if jobs_changed {
                let jobs = self.engine.list();
                for m in self.ledger.lock().scan(&jobs) {
                    log_event(&m);
                    let _ = out_tx.send(m);
                }
            }
            let inv = self.inventory();
            if inv == last {
                due = None;
            } else if last_at.elapsed() >= COALESCE {
                let _ = out_tx.send(AgentMsg::Inventory(inv.clone()));
                last = inv;
                last_at = Instant::now();
                due = None;
            } else {
                due = Some(last_at + COALESCE);
            }
        }
        reader.abort();
        drop(out_tx);
        let _ = writer.await;
    }

    /// One message from the coordinator.
    async fn handle(self: &Arc<Self>, msg: CoordMsg, out: &mpsc::UnboundedSender<AgentMsg>) {
        match msg {
            CoordMsg::Start(start) => {
                if let Some(m) = self.start(start).await {
                    let _ = out.send(m);
                }
            }
            CoordMsg::Stop { pool_job, attempt } => self.stop(pool_job, attempt).await,
            CoordMsg::Telemetry { every_ms } => {
                // Until this stream's writer is gone (a newer stream asks again).
                let every = Duration::from_millis(every_ms.max(1000));
                let (feed, out) = (self.clone(), out.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(every);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tick.tick().await;
                        let m = AgentMsg::Telemetry {
                            at_ms: unix_ms(),
                            gpus: feed.readings(),
                        };
                        if out.send(m).is_err() {
                            return;
                        }
                    }
                });
            }
            CoordMsg::Ack {
                pool_job,
                attempt,
                local_id,
            } => {
                let was = self.ledger.lock().ack(pool_job, attempt, local_id);
                debug!(pool_job, attempt, ?local_id, unacked = was, "end acked");
            }
        }
    }

    /// Carries out a start, or says why not. `None`: the answer (`Started`) follows once the
    /// process runs.
    async fn start(self: &Arc<Self>, start: Start) -> Option<AgentMsg> {
        let (pool_job, attempt) = (start.pool_job, start.attempt);
        let refused = |reason: String| {
            warn!(pool_job, attempt, reason = %reason, "pool start refused");
            Some(AgentMsg::Refused {
                pool_job,
                attempt,
                reason,
            })
        };
        // The same start again (the coordinator resends after a reconnect): the same answer.
        let same =
            self.engine.list().into_iter().find(|j| {
                copy_of(j).is_some_and(|c| c.pool_job == pool_job && c.attempt == attempt)
            });
        if let Some(j) = same {
            let copy = copy_of(&j)?;
            debug!(
                pool_job,
                attempt,
                local_id = j.id,
                "start of a copy that exists here"
            );
            if let Some(e) = self.ledger.lock().unacked_end(pool_job, attempt) {
                return Some(AgentMsg::Ended(e.clone()));
            }
            return match (j.state.is_terminal(), j.started_ms) {
                (true, _) => Some(AgentMsg::Ended(ended_of(&j, copy))),
                (false, Some(started_ms)) => Some(AgentMsg::Started { copy, started_ms }),
                (false, None) => None,
            };
        }
        if start.owner.is_empty() || start.owner.starts_with('@') {
            return refused(format!("owner {:?} is not an engineer", start.owner));
        }
        let mut req = request_of(&start);
        let mut token_path = None;
        if let Some(r) = &start.ray {
            match self.ray_member(&start, r, req).await {
                Ok((q, p)) => {
                    req = q;
                    token_path = Some(p);
                }
                Err(e) => return refused(e),
            }
        }
        let ray = start.ray.clone();
        let start_copy = start.clone();
        let engine = self.engine.clone();
        // Its own task: the job is recorded and spawned even if this stream goes away.
        let done =
            tokio::spawn(async move { engine.start_exact(start.owner, req, start.gpus).await })
                .await;
        match done {
            Ok(Ok(job)) => {
                info!(pool_job, attempt, local_id = job.id, gpus = ?job.spec.gpus, "pool copy starting");
                if let (Some(r), Some(p)) = (ray, token_path) {
                    self.members.lock().add(&start_copy, &r, p);
                    tokio::spawn(self.clone().watch_member(start_copy, *r, job.id));
                }
                None
            }
            Ok(Err(e)) => {
                if let Some(p) = token_path {
                    crate::ray::forget_token(&p);
                }
                refused(e.to_string())
            }
            Err(e) => refused(format!("internal error: {e}")),
        }
    }

    /// A Ray member's local job, its token file written and the firewall up.
    async fn ray_member(
        &self,
        start: &Start,
        r: &weft_proto::cluster::RayStart,
        req: JobRequest,
    ) -> Result<(JobRequest, std::path::PathBuf), String> {
        let Some(ctx) = self.ray.clone() else {
            return Err("this worker runs no Ray (start its agent with --ray PATH)".into());
        };
        if r.node_ip.parse::<std::net::IpAddr>().is_err() {
            return Err(format!("no overlay address for Ray ({:?})", r.node_ip));
        }
        if r.token.len() < 32 {
            return Err("the cluster's token is missing".into());
        }
        let (token_path, temp) = crate::ray::member_paths(&ctx.state_dir, start);
        let path_env = std::env::var("PATH").ok();
        let req = crate::ray::member_request(
            req,
            &ctx.ray,
            &token_path,
            &temp,
            path_env.as_deref(),
            ctx.supervisor.as_deref(),
        )?;
        let token = r.token.clone();
        let tp = token_path.clone();
        let need_fw = !self.members.lock().firewall;
        let mesh_if = ctx.mesh_if.clone();
        tokio::task::spawn_blocking(move || {
            crate::ray::write_token(&tp, &token)
                .map_err(|e| format!("cannot write the Ray token {}: {e}", tp.display()))?;
            if need_fw {
                crate::ray::firewall_up(&mesh_if)?;
            }
            Ok::<(), String>(())
        })
        .await
        .map_err(|e| format!("internal error: {e}"))??;
        self.members.lock().firewall = true;
        Ok((req, token_path))
    }

    /// While a Ray member's local job lives: the head reads Ray's nodes every
    /// [`crate::ray::POLL`] ([`crate::ray::POLL_FORMING`] until every member is alive). When it ends: its token file goes, and the firewall with the last
    /// member.
    async fn watch_member(
        self: Arc<Self>,
        start: Start,
        r: weft_proto::cluster::RayStart,
        local_id: u64,
    ) {
        let key = (start.pool_job, start.attempt);
        let mut last_err = String::new();
        let want: usize = start
            .env
            .get("WEFT_NUM_NODES")
            .and_then(|n| n.parse().ok())
            .unwrap_or(1);
        let mut formed = false;
        loop {
            // Until the cluster has formed (`weft cluster up` waits on this), read often.
            tokio::time::sleep(if formed {
                crate::ray::POLL
            } else {
                crate::ray::POLL_FORMING
            })
            .await;
            let live = self
                .engine
                .get(local_id)
                .is_some_and(|j| !j.state.is_terminal());
            if !live {
                break;
            }
            if !r.head {
                continue;
            }
            let within = if formed {
                crate::ray::READ_TIMEOUT
            } else {
                crate::ray::READ_TIMEOUT_FORMING
            };
            match crate::ray::read_nodes(&r.node_ip, &r.token, within).await {
                Ok(nodes) => {
                    last_err.clear();
                    formed |= nodes.iter().filter(|n| n.alive).count() >= want;
                    let mut m = self.members.lock();
                    if m.reports.get(&key).is_none_or(|(_, n)| *n != nodes) {
                        debug!(pool_job = key.0, nodes = nodes.len(), "ray nodes changed");
                        m.reports.insert(key, (unix_ms(), nodes));
                        self.ray_changed.notify_one();
                    }
                }
                Err(e) => {
                    if e != last_err {
                        debug!(pool_job = key.0, error = %e, "ray head not answering yet");
                        last_err = e;
                    }
                }
            }
        }
        let live: Vec<(u64, u32)> = {
            let m = self.members.lock();
            m.live.keys().copied().filter(|k| *k != key).collect()
        };
        let (files, last) = {
            let mut m = self.members.lock();
            let files = m.retain(&live);
            let last = m.live.is_empty() && m.firewall;
            if last {
                m.firewall = false;
            }
            (files, last)
        };
        info!(pool_job = key.0, attempt = key.1, "ray member ended");
        let _ = tokio::task::spawn_blocking(move || {
            for f in files {
                crate::ray::forget_token(&f);
            }
            if last {
                crate::ray::firewall_down();
            }
        })
        .await;
    }

    /// Cancels this pool job's copies here (every attempt, or only `attempt`).
    async fn stop(self: &Arc<Self>, pool_job: u64, attempt: Option<u32>) {
        let copies: Vec<JobCopy> = self
            .engine
            .list()
            .iter()
            .filter(|j| !j.state.is_terminal())
            .filter_map(copy_of)
            .filter(|c| c.pool_job == pool_job && attempt.is_none_or(|a| a == c.attempt))
            .collect();
        if copies.is_empty() {
            debug!(pool_job, attempt = ?attempt, "stop: no live copy here");
        }
        for c in copies {
            info!(
                pool_job,
                attempt = c.attempt,
                local_id = c.local_id,
                "pool copy stopped by the coordinator"
            );
            if let Err(e) = self.engine.cancel(c.local_id).await {
                warn!(pool_job, attempt = c.attempt, local_id = c.local_id, error = %e, "cannot cancel pool copy");
            }
        }
    }
}

fn log_event(m: &AgentMsg) {
    match m {
        AgentMsg::Started { copy, .. } => {
            info!(
                pool_job = copy.pool_job,
                attempt = copy.attempt,
                local_id = copy.local_id,
                "pool copy started"
            )
        }
        AgentMsg::Ended(e) => info!(
            pool_job = e.copy.pool_job,
            attempt = e.copy.attempt,
            local_id = e.copy.local_id,
            state = %e.state,
            "pool copy ended"
        ),
        _ => {}
    }
}

/// Resolves once a stream newer than `me` opened (or the feed is gone).
async fn superseded(current: &mut watch::Receiver<u64>, me: u64) {
    let _ = current.wait_for(|g| *g != me).await.map(|_| ());
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Reads lines (at most [`MAX_LINE`] bytes each) and hands the messages over; skips (and logs)
/// a line that does not decode; ends at EOF, on a read error, or after a line over the limit.
async fn read_lines<R: AsyncRead + Unpin>(rd: R, tx: mpsc::Sender<Line>) {
    let mut rd = BufReader::new(rd);
    let mut line = Vec::new();
    loop {
        line.clear();
        let limit = u64::try_from(MAX_LINE)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let n = match (&mut rd).take(limit).read_until(b'\n', &mut line).await {
            Ok(n) => n,
            Err(e) => {
                debug!(error = %e, "pool feed read failed");
                return;
            }
        };
        if n == 0 {
            return;
        }
        let complete = line.last() == Some(&b'\n');
        if complete {
            line.pop();
        } else if line.len() > MAX_LINE {
            let _ = tx.send(Line::TooLong(line.len())).await;
            return;
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            match decode_line::<CoordMsg>(&line) {
                Ok(m) => {
                    if tx.send(Line::Msg(m)).await.is_err() {
                        return;
                    }
                }
                Err(LineError::TooLong(n)) => {
                    let _ = tx.send(Line::TooLong(n)).await;
                    return;
                }
                Err(e) => warn!(error = %e, "skipping a pool feed line from the coordinator"),
            }
        }
        if !complete {
            return; // EOF in the middle of a line: it was the last one
        }
    }
}

/// Writes each message as one line until the channel closes or the stream fails.
async fn write_lines<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<AgentMsg>,
    seal: impl Fn(AgentMsg) -> AgentMsg,
) {
    loop {
        // A quiet feed says it is alive every HEARTBEAT: the coordinator counts
        // `lost_after` from the last line it heard.
        let m = match tokio::time::timeout(weft_proto::pool::HEARTBEAT, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(_) => AgentMsg::Heartbeat,
        };
        let line = encode_line(&seal(m));
        if let Err(e) = wr.write_all(&line).await {
            debug!(error = %e, "pool feed write failed");
            rx.close();
            return;
        }
        if wr.flush().await.is_err() {
            rx.close();
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::health::HealthState;
    use crate::testutil;
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    const LIMIT: Duration = Duration::from_secs(20);

    /// The coordinator's end of one stream.
    struct Coord {
        rd: BufReader<ReadHalf<DuplexStream>>,
        wr: WriteHalf<DuplexStream>,
    }

    impl Coord {
        async fn open(feed: &Arc<PoolFeed>, from: &str) -> Coord {
            let (ours, theirs) = tokio::io::duplex(1 << 16);
            let (feed, from) = (feed.clone(), from.to_string());
            tokio::spawn(async move { feed.open(&from, theirs).await });
            let (rd, wr) = tokio::io::split(ours);
            Coord {
                rd: BufReader::new(rd),
                wr,
            }
        }

        /// The next message; `None` once the agent closed the stream.
        async fn next(&mut self) -> Option<AgentMsg> {
            let mut line = Vec::new();
            let n = tokio::time::timeout(LIMIT, self.rd.read_until(b'\n', &mut line))
                .await
                .expect("the agent said nothing")
                .unwrap_or(0);
            (n > 0).then(|| decode_line(line.strip_suffix(b"\n").unwrap()).unwrap())
        }

        /// The next message that is not an inventory.
        async fn event(&mut self) -> AgentMsg {
            loop {
                match self.next().await.expect("stream closed") {
                    AgentMsg::Inventory(_) | AgentMsg::Heartbeat => {}
                    m => return m,
                }
            }
        }

        /// Inventories until one satisfies `f`.
        async fn inventory_until(&mut self, f: impl Fn(&Inventory) -> bool) -> Inventory {
            loop {
                if let AgentMsg::Inventory(i) = self.next().await.expect("stream closed") {
                    if f(&i) {
                        return i;
                    }
                }
            }
        }

        async fn send(&mut self, m: &CoordMsg) {
            self.wr.write_all(&encode_line(m)).await.unwrap();
        }

        async fn closed(&mut self) -> bool {
            loop {
                match self.next().await {
                    None => return true,
                    Some(AgentMsg::Inventory(_) | AgentMsg::Heartbeat) => {}
                    Some(m) => panic!("unexpected {m:?}"),
                }
            }
        }
    }

    /// A feed over an engine with GPU-0 and GPU-1 healthy, GPU-2 unhealthy.
    async fn feed(dir: &std::path::Path) -> Arc<PoolFeed> {
        let snap = testutil::snapshot(vec![
            testutil::gpu(0, "GPU-0", HealthState::Healthy),
            testutil::gpu(1, "GPU-1", HealthState::Healthy),
            testutil::gpu(2, "GPU-2", HealthState::Unhealthy),
        ]);
        PoolFeed::new(testutil::engine(dir, snap.clone()).await, snap)
    }

    fn start(pool_job: u64, gpus: &[&str], command: &[&str]) -> CoordMsg {
        CoordMsg::Start(Start {
            pool_job,
            attempt: 1,
            owner: "alice".into(),
            command: command.iter().map(|s| s.to_string()).collect(),
            env: BTreeMap::from([("WEFT_POOL_JOB".to_string(), pool_job.to_string())]),
            workdir: None,
            gpus: gpus.iter().map(|s| s.to_string()).collect(),
            timeout_s: None,
            ray: None,
        })
    }

    async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
        let t = Instant::now();
        while !f() {
            assert!(t.elapsed() < LIMIT, "gave up waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ends_carry_the_usage_record_signed_by_the_worker_and_the_same_on_replay() {
        let dir = tempfile::tempdir().unwrap();
        let snap = testutil::snapshot(vec![
            testutil::gpu(0, "GPU-0", HealthState::Healthy),
            testutil::gpu(1, "GPU-1", HealthState::Healthy),
        ]);
        let key = Signer::from_seed(&[5; 32]);
        let public = key.public().to_string();
        let usage = UsageSigning {
            worker: "gpu7".into(),
            signer: key,
        };
        let feed = PoolFeed::with_ray(
            testutil::engine(dir.path(), snap.clone()).await,
            snap,
            None,
            Some(usage),
        );
        let mut c = Coord::open(&feed, POOL_CALLER).await;
        let Some(AgentMsg::Inventory(inv)) = c.next().await else {
            panic!("the inventory comes first")
        };
        assert_eq!(inv.usage_key.as_deref(), Some(public.as_str()));
        let CoordMsg::Start(mut s) = start(3, &["GPU-0", "GPU-1"], &["sh", "-c", "sleep 0.3"])
        else {
            unreachable!()
        };
        s.env.insert("WEFT_NODE_RANK".into(), "1".into());
        c.send(&CoordMsg::Start(s)).await;
        assert!(matches!(c.event().await, AgentMsg::Started { .. }));
        let AgentMsg::Ended(e) = c.event().await else {
            panic!("ended")
        };
        let claim = e.usage.clone().expect("a signed record");
        assert!(claim.valid());
        assert_eq!(claim.key, public);
        let r = &claim.record;
        assert_eq!((r.job, r.attempt, r.rank), (3, 1, 1));
        assert_eq!((r.engineer.as_str(), r.worker.as_str()), ("alice", "gpu7"));
        assert_eq!(r.gpu_model, "NVIDIA H100 80GB HBM3");
        assert_eq!(r.gpus, ["GPU-0", "GPU-1"]);
        assert_eq!(r.outcome, "succeeded");
        let (start_ms, end_ms) = (e.started_ms.unwrap(), e.ended_ms);
        assert_eq!(r.gpu_seconds, 2.0 * (end_ms - start_ms) as f64 / 1000.0);
        // what the coordinator computes from the same end is the same record
        let mut bare = e.clone();
        bare.usage = None;
        assert_eq!(
            UsageRecord::of_end(
                &bare,
                1,
                "alice".into(),
                "gpu7",
                "NVIDIA H100 80GB HBM3".into()
            ),
            *r
        );
        // unacked, it is sent again on a new stream: the same line
        drop(c);
        let mut c2 = Coord::open(&feed, POOL_CALLER).await;
        loop {
            match c2.next().await {
                Some(AgentMsg::Ended(again)) => {
                    assert_eq!(again, e);
                    break;
                }
                Some(_) => continue,
                None => panic!("no replay"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn inventory_first_then_start_started_refused_stop_ended_replay_ack() {
        let dir = tempfile::tempdir().unwrap();
        let feed = feed(dir.path()).await;
        let mut c = Coord::open(&feed, POOL_CALLER).await;
        let Some(AgentMsg::Inventory(inv)) = c.next().await else {
            panic!("the inventory comes first")
        };
        assert_eq!(inv.gpus.len(), 3);
        assert_eq!(inv.gpus[0].uuid, "GPU-0");
        assert_eq!(inv.gpus[0].model, "NVIDIA H100 80GB HBM3");
        assert_eq!(inv.gpus[0].memory_mib, 81559);
        let health: Vec<&str> = inv.gpus.iter().map(|g| g.health.as_str()).collect();
        assert_eq!(health, ["healthy", "healthy", "unhealthy"]);
        assert!(inv.simulated && inv.cpus > 0 && inv.memory_bytes > 0);
        assert_eq!(inv.version, env!("CARGO_PKG_VERSION"));
        assert!(inv.running.is_empty() && inv.gpus.iter().all(|g| g.job.is_none()));

        // start on GPU-1: the engineer's job, on exactly that GPU, labelled as the copy
        let env_file = dir.path().join("cuda");
        let script = format!(
            "echo $CUDA_VISIBLE_DEVICES > {}; exec sleep 30",
            env_file.display()
        );
        c.send(&start(7, &["GPU-1"], &["sh", "-c", &script])).await;
        let AgentMsg::Started { copy, started_ms } = c.event().await else {
            panic!("started")
        };
        assert_eq!((copy.pool_job, copy.attempt), (7, 1));
        let job = feed.engine.get(copy.local_id).unwrap();
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.caller, "alice");
        assert_eq!(job.gpu_uuids, ["GPU-1"]);
        assert_eq!(job.started_ms, Some(started_ms));
        assert_eq!(
            job.spec.labels.get(LABEL_POOL_JOB).map(String::as_str),
            Some("7")
        );
        assert_eq!(
            job.spec.labels.get(LABEL_ATTEMPT).map(String::as_str),
            Some("1")
        );
        assert_eq!(
            job.spec.env.get("WEFT_POOL_JOB").map(String::as_str),
            Some("7")
        );
        let local = copy.local_id;
        wait_for("the job writes its env", || {
            std::fs::read_to_string(&env_file).is_ok_and(|s| s.ends_with('\n'))
        })
        .await;
        assert_eq!(std::fs::read_to_string(&env_file).unwrap(), "GPU-1\n");
        let inv = c
            .inventory_until(|i| i.gpus[1].job == Some(local) && !i.running.is_empty())
            .await;
        assert_eq!(inv.running, vec![copy.clone()]);

        // refused: busy, unhealthy, unknown, invalid; nothing is queued
        for (gpus, why) in [
            (
                &["GPU-0", "GPU-1"][..],
                format!("GPU GPU-1 is held by job {local}"),
            ),
            (&["GPU-2"][..], "GPU GPU-2 is unhealthy".to_string()),
            (
                &["GPU-9"][..],
                "GPU GPU-9 is not on this worker".to_string(),
            ),
        ] {
            c.send(&start(8, gpus, &["true"])).await;
            match c.event().await {
                AgentMsg::Refused {
                    pool_job: 8,
                    attempt: 1,
                    reason,
                } => {
                    assert!(reason.contains(&why), "{reason} (wanted {why})")
                }
                m => panic!("{m:?}"),
            }
        }
        c.send(&start(8, &["GPU-0"], &[])).await;
        assert!(
            matches!(c.event().await, AgentMsg::Refused { reason, .. } if reason.contains("command")),
        );
        assert_eq!(feed.engine.list().len(), 1, "refused starts leave no job");

        // a bad line is skipped, the stream goes on
        c.wr.write_all(b"{\"type\": \"launch\"}\nnot json\n")
            .await
            .unwrap();
        // stop: cancelled the normal way, then ended
        c.send(&CoordMsg::Stop {
            pool_job: 7,
            attempt: None,
        })
        .await;
        let AgentMsg::Ended(e) = c.event().await else {
            panic!("ended")
        };
        assert_eq!(e.copy, copy);
        assert_eq!(e.state, "cancelled");
        assert_eq!(e.gpus, ["GPU-1"]);
        assert_eq!(e.started_ms, Some(started_ms));
        assert!(e.ended_ms >= started_ms);
        assert_eq!(feed.engine.get(local).unwrap().state, JobState::Cancelled);
        c.inventory_until(|i| i.running.is_empty() && i.gpus[1].job.is_none())
            .await;

        // a new stream supersedes this one and gets the unacked end again
        let mut c2 = Coord::open(&feed, POOL_CALLER).await;
        assert!(matches!(c2.next().await, Some(AgentMsg::Inventory(_))));
        assert_eq!(c2.next().await, Some(AgentMsg::Ended(e.clone())));
        assert!(c.closed().await, "the old stream is closed");
        // acked: not replayed any more (the next thing a new stream says after its
        // inventory is the answer to our start)
        c2.send(&CoordMsg::Ack {
            pool_job: 7,
            attempt: 1,
            local_id: None,
        })
        .await;
        wait_for("the ack", || feed.ledger.lock().replay().is_empty()).await;
        let mut c3 = Coord::open(&feed, POOL_CALLER).await;
        assert!(matches!(c3.next().await, Some(AgentMsg::Inventory(_))));
        c3.send(&start(9, &["GPU-9"], &["true"])).await;
        assert!(matches!(
            c3.next().await,
            Some(AgentMsg::Refused { pool_job: 9, .. })
        ));

        // a copy that runs to its end: ended with its exit code
        c3.send(&start(10, &["GPU-0"], &["sh", "-c", "exit 3"]))
            .await;
        assert!(matches!(c3.event().await, AgentMsg::Started { .. }));
        let AgentMsg::Ended(e) = c3.event().await else {
            panic!("ended")
        };
        assert_eq!(
            (e.copy.pool_job, e.state.as_str(), e.exit_code),
            (10, "failed", Some(3))
        );
        feed.engine.kill_all();
        feed.engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_the_coordinator_is_served_and_an_overlong_line_closes_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let feed = feed(dir.path()).await;
        let mut c = Coord::open(&feed, "alice").await;
        assert_eq!(c.next().await, None, "closed without a word");

        let mut c = Coord::open(&feed, POOL_CALLER).await;
        assert!(matches!(c.next().await, Some(AgentMsg::Inventory(_))));
        let long = vec![b' '; MAX_LINE + 1];
        let (mut wr, rd) = (c.wr, c.rd);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&long).await;
            wr
        });
        let mut c = Coord {
            rd,
            wr: tokio::io::split(tokio::io::duplex(1).0).1,
        };
        assert!(c.closed().await);
        let _ = writer.await;
        feed.engine.shutdown().await;
    }

    fn pool_job(id: u64, pool: u64, state: JobState, ended_ms: Option<u64>) -> Job {
        let spec = JobRequest {
            command: vec!["true".into()],
            labels: BTreeMap::from([
                (LABEL_POOL_JOB.to_string(), pool.to_string()),
                (LABEL_ATTEMPT.to_string(), "2".to_string()),
            ]),
            ..JobRequest::default()
        }
        .validate(
            &crate::job::Capabilities {
                gpus: 0,
                cgroups: false,
            },
            |_| true,
        )
        .unwrap();
        let mut j = Job::new(id, "alice".into(), spec, 1_000, "l".into());
        if state != JobState::Queued {
            j.start(2_000, 10, Vec::new()).unwrap();
        }
        j.state = state;
        j.ended_ms = ended_ms;
        j
    }

    #[test]
    fn after_a_restart_ends_of_the_last_hour_are_replayed_and_running_copies_count_as_started() {
        let now = 10 * REPLAY_WINDOW_MS;
        let recent = pool_job(1, 41, JobState::Succeeded, Some(now - 60_000));
        let old = pool_job(2, 42, JobState::Succeeded, Some(now - REPLAY_WINDOW_MS - 1));
        let running = pool_job(3, 43, JobState::Running, None);
        let mut local = pool_job(4, 44, JobState::Succeeded, Some(now));
        local.spec = crate::job::JobSpec::for_test(0, None);
        let jobs = vec![recent.clone(), old, running.clone(), local];
        let mut l = Ledger::restore(&jobs, now);
        let [AgentMsg::Ended(w), AgentMsg::Ended(e)] = &l.replay()[..] else {
            panic!("{:?}", l.replay())
        };
        // The per-worker job's end is in the ledger too (its usage record), with its caller.
        assert_eq!(
            (w.copy.pool_job, w.copy.attempt, w.copy.local_id),
            (0, 0, 4)
        );
        assert!(w.per_worker());
        assert_eq!(w.owner.as_deref(), Some(jobs[3].caller.as_str()));
        assert_eq!(
            (e.copy.pool_job, e.copy.attempt, e.copy.local_id),
            (41, 2, 1)
        );
        assert_eq!(e.owner, None, "the coordinator knows a pool copy's owner");
        assert_eq!(e.started_ms, Some(2_000));
        assert!(l.scan(&jobs).is_empty(), "nothing new since");
        // the running copy ends: one Ended, kept until acked
        let mut done = running;
        done.state = JobState::Failed { exit_code: 1 };
        done.ended_ms = Some(now + 5);
        let msgs = l.scan(&[done.clone()]);
        assert!(
            matches!(&msgs[..], [AgentMsg::Ended(e)] if e.exit_code == Some(1) && e.copy.pool_job == 43),
            "{msgs:?}"
        );
        assert!(l.scan(&[done]).is_empty(), "an end is reported once");
        assert_eq!(l.replay().len(), 3);
        assert!(l.ack(41, 2, None) && !l.ack(41, 2, None));
        assert!(!l.ack(0, 0, Some(5)), "another per-worker job");
        assert!(l.ack(0, 0, Some(4)));
        assert_eq!(l.replay().len(), 1);
        assert_eq!(copy_of(&recent).unwrap().local_id, 1);
    }
}
