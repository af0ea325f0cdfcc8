//! The pool shell (issue 11): the scheduler core ([`crate::pool`]) fed by the
//! workers' pool feeds and the engineers' pool API, with its records in
//! [`PoolStore`].
//!
//! - **Feed.** When a worker that announces the [`POOL_SERVICE`] connects, the
//!   relay opens a stream on that connection (`Incoming{from: "@pool",
//!   service: "@pool"}`) and reads the agent's JSON lines: the inventory
//!   (→ [`Pool::worker_update`]), `started`, `refused`, `ended` (→ a usage
//!   record, an ack, and the job's end in the core). It writes `start`/`stop`
//!   /`ack` lines. The stream ending → [`Pool::worker_disconnected`]; lost
//!   after `lost_after` unless it comes back.
//! - **API.** A stream whose first frame is `Message::Api` is HTTP/1.1 served
//!   by [`router`] as the admitted node (`submit`, `list`, `show`, `cancel`,
//!   `pool`, `usage`).
//! - **Every change** runs under one lock: the core's call, then [`Hub::pump`]
//!   (the core's `tick`: stops first, then placements → `start` lines), the
//!   records written to SQLite before the lock is released (a job's row is
//!   committed before its submit is answered), the lines queued to each
//!   worker's bounded channel with `try_send`. A timer pumps every 250 ms for
//!   what only time decides (lost workers, reservations, copies that went
//!   missing).
//!
//! Reconciling a worker that comes back: each copy its inventory lists that
//! is not the job's current attempt on that worker is stopped at once (so a
//! job never runs twice); a current member that the worker does not list and
//! does not report ended within [`MISSING_GRACE`] ended badly: a copy that
//! never started is placed again without using a retry, one that ran counts
//! as failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::transport::{Connection, RecvStream, SendStream};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use weft_proto::acl::GROUP_TAG_PREFIX;
use weft_proto::cluster::{head_tag, member_argv, owner_tag, ClusterInfo, MemberSize, RayStart};
use weft_proto::gpuspec::GpuSpec;
use weft_proto::pool::{
    decode_line, encode_line, AgentMsg, ClusterCreated, CoordMsg, Ended, GpuInfo, JobView,
    LineError, MemberView, PoolView, Start, SubmitRequest, UsageRecord, WorkerView, MAX_LINE,
    POOL_CALLER, POOL_SERVICE,
};
use weft_proto::usage::{self, Export, Manifest, SignedManifest, SignedUsage, Signer};

use super::mesh::MeshHandle;
use super::{lock, Shared};
use crate::config::{PoolPolicy, PoolSettings};
use crate::pool::{self, Decisions, Outcome, Pool, PoolConfig};
use crate::pool_store::{Flags, Lease, PoolStore, StoredJob};
use crate::splice::quic_to_quic;
use crate::wire::{read_message, write_message, Message, Reason, Rejection};

/// How long a current copy may be missing from its worker's inventory before it counts as ended.
pub(super) const MISSING_GRACE: Duration = Duration::from_secs(5);
/// The timer that pumps the core for what only time decides.
const TICK: Duration = Duration::from_millis(250);
/// Lines queued to one worker's feed.
const FEED_QUEUE: usize = 4096;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Feed {
    sid: u64,
    tx: mpsc::Sender<CoordMsg>,
}

struct WorkerRec {
    view: WorkerView,
    feed: Option<Feed>,
    /// When the feed last spoke, and whether it sends heartbeats (then silence means away).
    heard: Option<(Instant, bool)>,
    /// Copies (job, attempt) moved elsewhere while it was away: stopped when it is back.
    owed_stops: Vec<(u64, u32)>,
    /// Silent too long: the core was told it is away (lost at `lost_after` from `heard`).
    silent: bool,
}

impl WorkerRec {
    /// A worker first seen now (`ms`) with `inventory`.
    fn new(name: &str, inventory: weft_proto::pool::Inventory, ms: u64) -> WorkerRec {
        WorkerRec {
            view: WorkerView {
                name: name.to_string(),
                state: "ready".into(),
                inventory,
                holders: vec![],
                flagged: vec![],
                first_seen_ms: ms,
                connected_since_ms: None,
                last_seen_ms: ms,
                uptime_ms: 0,
                usage_keys: vec![],
            },
            feed: None,
            heard: None,
            owed_stops: Vec::new(),
            silent: false,
        }
    }
}

/// A feed that sends heartbeats and was silent this long is away (three beats missed).
const SILENCE: Duration = Duration::from_secs(6);

struct JobRec {
    stored: StoredJob,
    /// Members (by worker) of the current attempt missing from their worker's inventory, since.
    missing: HashMap<String, Instant>,
}

/// The scheduler, the records and the feeds, under one lock.
struct Hub {
    pool: Pool,
    jobs: BTreeMap<u64, JobRec>,
    workers: BTreeMap<String, WorkerRec>,
    store: PoolStore,
    next_sid: u64,
    flags: Vec<(String, Flags)>,
    overlay: MeshHandle,
    /// Gang jobs that may be placed or running (their members hold a group tag).
    gangs: std::collections::BTreeSet<u64>,
    /// The group tags each worker holds now.
    groups: BTreeMap<String, Vec<String>>,
    /// The lease's epoch this hub schedules in (0: a relay alone, or a fleet relay that
    /// has not scheduled yet); feeds of another epoch do not register here.
    epoch: i64,
    /// This relay's usage-signing key: it countersigns every record it stores.
    usage: Arc<UsageSigning>,
}

/// The key a relay countersigns usage records and exports with, and the name it signs as.
pub(super) struct UsageSigning {
    signer: Signer,
    relay: String,
}

/// The pool part of the relay's shared state.
pub(super) struct PoolShell {
    hub: Mutex<Hub>,
    settings: PoolSettings,
    overlay: MeshHandle,
    /// The scheduling lease's epoch while this relay schedules the pool (a relay alone:
    /// always, `Some(0)`); None while another relay of the fleet does.
    leading: tokio::sync::watch::Sender<Option<i64>>,
    /// A fleet's lease: its own store connection, and the pool's place in the fleet.
    lease: Option<LeaseKeeper>,
    usage: Arc<UsageSigning>,
    /// The workers' GPU readings (the web view's; not the scheduler's).
    pub(super) telemetry: Mutex<crate::telemetry::Telemetry>,
}

/// How often agents send GPU readings on the feed.
const TELEMETRY_EVERY_MS: u64 = 5_000;

/// What a fleet relay needs to hold, renew and take over the pool's scheduling lease.
struct LeaseKeeper {
    /// The lease loop's own connection (renewals never wait behind the scheduler's writes).
    store: Mutex<PoolStore>,
    dir: std::path::PathBuf,
    store_cfg: crate::registry::Store,
    relay: String,
    /// Until when this relay may act as the holder: a renewal's send time plus
    /// [`LEASE_TRUST`], shorter than the lease, so it stops before another may take over.
    trusted_until: Mutex<Option<Instant>>,
    /// The relay holding the lease, as last read (API calls are forwarded to it).
    holder: std::sync::RwLock<Option<String>>,
}

/// How often a fleet relay takes or renews the scheduling lease.
const LEASE_EVERY: Duration = Duration::from_secs(1);
/// How long after sending a renewal that succeeded this relay still acts as the holder:
/// 2 s less than the lease ([`crate::pg_pool::LEASE_TTL_MS`]), so a relay that can no longer
/// renew stops scheduling before another relay may take over.
const LEASE_TRUST: Duration = Duration::from_millis(crate::pg_pool::LEASE_TTL_MS as u64 - 2000);

fn core_config(s: &PoolSettings) -> PoolConfig {
    PoolConfig {
        policy: match s.policy {
            PoolPolicy::Binpack => pool::Policy::Binpack,
            PoolPolicy::Spread => pool::Policy::Spread,
        },
        reserve_after: s.reserve_after,
        lost_after: s.lost_after,
    }
}

fn core_spec(owner: &str, r: &SubmitRequest) -> Result<pool::JobSpec, String> {
    let gpu: GpuSpec = match &r.gpu {
        Some(s) => s.parse().map_err(|e| format!("--gpu {s}: {e}"))?,
        None => GpuSpec::default(),
    };
    let mut js = pool::JobSpec::new(owner, gpu);
    js.gpus = r.gpus;
    js.nodes = r.nodes;
    js.priority = r.priority;
    js.retries = r.retries;
    js.wait_for_capacity = r.wait_for_capacity;
    js.needs_ray = r.cluster.is_some();
    js.replace = r.cluster.as_ref().is_some_and(|c| c.replace);
    Ok(js)
}

fn core_inventory(
    name: &str,
    inv: &weft_proto::pool::Inventory,
    pool_held: &[String],
) -> pool::Inventory {
    pool::Inventory {
        worker: name.to_string(),
        gpus: inv
            .gpus
            .iter()
            .map(|g: &GpuInfo| pool::GpuReport {
                uuid: g.uuid.clone(),
                model: g.model.clone(),
                memory_mib: g.memory_mib,
                healthy: g.usable(),
                // Held by a local job that is not one of the pool's copies here.
                busy: g.job.is_some() && !pool_held.contains(&g.uuid),
            })
            .collect(),
        ray: inv.ray.is_some(),
    }
}

/// What every member's `Start` of one attempt of a job shares.
struct MemberOf {
    id: u64,
    attempt: u32,
    req: SubmitRequest,
    owner: String,
    token: Option<String>,
}

impl MemberOf {
    /// The current attempt of `stored`.
    fn of(stored: &StoredJob) -> MemberOf {
        MemberOf {
            id: stored.view.id,
            attempt: stored.view.attempt,
            req: stored.view.request.clone(),
            owner: stored.view.owner.clone(),
            token: stored.cluster_token.clone(),
        }
    }
}

impl PoolShell {
    /// The pool of a relay: alone (SQLite), it schedules from the start, restored from its
    /// store; in a fleet (PostgreSQL) it schedules once it holds the lease ([`lease_loop`]).
    pub(super) fn open(
        dir: &std::path::Path,
        settings: &PoolSettings,
        overlay: MeshHandle,
        store_cfg: &crate::registry::Store,
        relay: &str,
    ) -> Result<PoolShell, crate::error::StateError> {
        let store = PoolStore::open_store(dir, store_cfg, relay, 0)?;
        let usage = Arc::new(UsageSigning {
            signer: crate::keys::usage_key(&dir.join(crate::keys::USAGE_KEY_FILE))?,
            relay: relay.to_string(),
        });
        if !store.is_shared() {
            let hub = Hub::load(store, settings, overlay.clone(), 0, usage.clone())?;
            return Ok(PoolShell {
                hub: Mutex::new(hub),
                settings: settings.clone(),
                overlay,
                leading: tokio::sync::watch::channel(Some(0)).0,
                lease: None,
                usage,
                telemetry: Mutex::default(),
            });
        }
        let lease = LeaseKeeper {
            store: Mutex::new(PoolStore::open_store(dir, store_cfg, relay, 0)?),
            dir: dir.to_path_buf(),
            store_cfg: store_cfg.clone(),
            relay: relay.to_string(),
            trusted_until: Mutex::new(None),
            holder: std::sync::RwLock::new(None),
        };
        Ok(PoolShell {
            hub: Mutex::new(Hub::empty(store, overlay.clone(), usage.clone())),
            settings: settings.clone(),
            overlay,
            leading: tokio::sync::watch::channel(None).0,
            lease: Some(lease),
            usage,
            telemetry: Mutex::default(),
        })
    }

    /// The lease's epoch while this relay schedules the pool.
    pub(super) fn leading(&self) -> Option<i64> {
        *self.leading.borrow()
    }

    /// The relay of the fleet that schedules the pool, as last read (None: this relay, a
    /// relay alone, or nobody right now).
    pub(super) fn scheduler(&self) -> Option<String> {
        let l = self.lease.as_ref()?;
        if self.leading().is_some() {
            return None;
        }
        l.holder.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// This relay stops scheduling (the lease was lost or could not be renewed in time):
    /// its feeds end (the workers' agents keep running their jobs), the next holder
    /// restores the pool from the store.
    fn step_down(&self, why: &str) {
        if self.leading().is_none() {
            return;
        }
        self.leading.send_replace(None);
        if let Some(l) = &self.lease {
            *lock(&l.trusted_until) = None;
        }
        warn!(
            reason = why,
            "pool lease lost: this relay stops scheduling the pool"
        );
    }

    /// A relay of a fleet that drains gives the lease up, so another takes over at its next
    /// renewal (a second) rather than when the lease expires.
    pub(super) fn release_lease(&self) {
        let Some(l) = &self.lease else { return };
        self.step_down("this relay is draining");
        if let Err(e) = lock(&l.store).release_lease() {
            warn!(error = %e, "could not release the pool lease; it expires on its own");
        }
    }
}

impl Hub {
    /// A hub that schedules nothing yet (a fleet relay before it holds the lease).
    fn empty(store: PoolStore, overlay: MeshHandle, usage: Arc<UsageSigning>) -> Hub {
        Hub {
            pool: Pool::new(PoolConfig::default()),
            jobs: BTreeMap::new(),
            workers: BTreeMap::new(),
            store,
            next_sid: 1,
            flags: Vec::new(),
            overlay,
            gangs: std::collections::BTreeSet::new(),
            groups: BTreeMap::new(),
            epoch: 0,
            usage,
        }
    }

    /// Restores jobs and workers from the store: workers are away until they report again
    /// (lost after `lost_after`), pending jobs queue in their order, running ones stay on
    /// their workers, finished ones are kept for `jobs list|show` (all of them: pruning old
    /// records is not done yet).
    fn load(
        store: PoolStore,
        settings: &PoolSettings,
        overlay: MeshHandle,
        epoch: i64,
        usage: Arc<UsageSigning>,
    ) -> Result<Hub, crate::error::StateError> {
        let now = Instant::now();
        let mut core = Pool::new(core_config(settings));
        let mut workers = BTreeMap::new();
        for mut view in store.workers()? {
            if view.state == "revoked" {
                workers.insert(
                    view.name.clone(),
                    WorkerRec::new(&view.name, view.inventory.clone(), view.first_seen_ms),
                );
                if let Some(w) = workers.get_mut(&view.name) {
                    w.view = view;
                }
                continue;
            }
            let inv = core_inventory(&view.name, &view.inventory, &[]);
            core.worker_update(now, inv);
            core.worker_disconnected(&view.name, now);
            view.state = "disconnected".into();
            view.connected_since_ms = None;
            workers.insert(
                view.name.clone(),
                WorkerRec {
                    view,
                    feed: None,
                    heard: None,
                    owed_stops: Vec::new(),
                    silent: false,
                },
            );
        }
        let flags = store.flags()?;
        for (name, f) in &flags {
            apply_flags(&mut core, name, *f);
        }
        let mut jobs = BTreeMap::new();
        let (mut pending, mut running) = (0, 0);
        for mut stored in store.jobs(false)? {
            let id = stored.view.id;
            if stored.finished() {
                // Shown by `jobs list|show`; nothing to schedule.
                jobs.insert(
                    id,
                    JobRec {
                        stored,
                        missing: HashMap::new(),
                    },
                );
                continue;
            }
            let spec = match core_spec(&stored.view.owner, &stored.view.request) {
                Ok(s) => s,
                Err(e) => {
                    warn!(job = id, error = %e, "stored pool job is unreadable; marked failed");
                    stored.view.state = "failed".into();
                    store.save_job(&stored)?;
                    continue;
                }
            };
            let members: Vec<pool::Member> = stored
                .view
                .members
                .iter()
                .map(|m| pool::Member {
                    worker: m.worker.clone(),
                    gpus: m.gpus.clone(),
                })
                .collect();
            let placed = matches!(stored.view.state.as_str(), "placed" | "running");
            if placed
                && core.restore_job(now, id, spec.clone(), stored.retries_left, Some(&members))
            {
                running += 1;
            } else {
                core.restore_job(now, id, spec, stored.retries_left, None);
                if placed {
                    stored.view.state = "pending".into();
                    store.save_job(&stored)?;
                }
                pending += 1;
            }
            jobs.insert(
                id,
                JobRec {
                    stored,
                    missing: HashMap::new(),
                },
            );
        }
        info!(workers = workers.len(), pending, running, "pool restored");
        let gangs = jobs
            .values()
            .filter(|j| j.stored.view.request.nodes > 1 || j.stored.view.cluster.is_some())
            .map(|j| j.stored.view.id)
            .collect();
        Ok(Hub {
            pool: core,
            jobs,
            workers,
            store,
            next_sid: 1,
            flags,
            overlay,
            gangs,
            groups: BTreeMap::new(),
            epoch,
            usage,
        })
    }
}

impl PoolShell {
    /// Nodes revoked by the operator leave the pool: their jobs are requeued, their GPUs
    /// (and a duplicate-UUID flag they caused) are gone, their records stay for the history.
    pub(super) fn remove_workers(&self, names: &[String]) {
        if self.leading().is_none() {
            // The scheduler (another relay) sees the revocation in the store.
            return;
        }
        let mut hub = lock(&self.hub);
        let now = Instant::now();
        let mut any = false;
        for name in names {
            let Some(w) = hub.workers.get_mut(name) else {
                continue;
            };
            if w.view.state == "revoked" {
                continue;
            }
            w.view.state = "revoked".into();
            w.view.connected_since_ms = None;
            w.feed = None;
            info!(worker = %name, "revoked: leaves the pool");
            hub.owe_all(name);
            hub.pool.remove_worker(name, now);
            hub.save_worker(name);
            any = true;
        }
        if any {
            hub.pump(now);
        }
    }

    /// The operator's flags changed in the store (another process): apply them.
    pub(super) fn reload_flags(&self) {
        if self.leading().is_none() {
            return;
        }
        let mut hub = lock(&self.hub);
        let flags = match hub.store.flags() {
            Ok(f) => f,
            Err(e) => {
                warn!(error = %e, "could not read pool flags");
                return;
            }
        };
        if flags == hub.flags {
            return;
        }
        for (name, f) in &flags {
            if !hub.flags.contains(&(name.clone(), *f)) {
                info!(worker = %name, cordoned = f.cordoned, draining = f.draining, "pool flags changed");
                apply_flags(&mut hub.pool, name, *f);
            }
        }
        hub.flags = flags;
        hub.pump(Instant::now());
    }
}

fn apply_flags(core: &mut Pool, name: &str, f: Flags) {
    core.uncordon(name);
    if f.cordoned {
        core.cordon(name);
    }
    if f.draining {
        core.drain(name);
    }
}

impl Hub {
    fn save_job(&self, id: u64) {
        if let Some(j) = self.jobs.get(&id) {
            if let Err(e) = self.store.save_job(&j.stored) {
                warn!(job = id, error = %e, "could not store pool job");
            }
        }
    }

    fn save_worker(&self, name: &str) {
        if let Some(w) = self.workers.get(name) {
            if let Err(e) = self.store.save_worker(&w.view) {
                warn!(worker = %name, error = %e, "could not store pool worker");
            }
        }
    }

    fn send(&mut self, worker: &str, msg: CoordMsg) -> bool {
        let Some(feed) = self.workers.get(worker).and_then(|w| w.feed.as_ref()) else {
            return false;
        };
        match feed.tx.try_send(msg) {
            Ok(()) => true,
            Err(e) => {
                warn!(worker = %worker, error = %e, "pool feed queue full or closed; message dropped");
                false
            }
        }
    }

    fn refresh_worker_state(&mut self, name: &str) {
        let state = self.pool.worker_state(name).unwrap_or("disconnected");
        let flagged = self.pool.flagged_on(name);
        if let Some(w) = self.workers.get_mut(name) {
            if w.view.state == "revoked" {
                return;
            }
            w.view.state = state.to_string();
            w.view.flagged = flagged;
        }
    }

    /// The core's decisions since the last call, carried out.
    fn pump(&mut self, now: Instant) {
        self.check_missing(now);
        self.check_silence(now);
        let d = self.pool.tick(now);
        self.apply(d, now);
        if !self.gangs.is_empty() || !self.groups.is_empty() {
            self.sync_groups();
        }
        let names: Vec<String> = self.workers.keys().cloned().collect();
        for n in names {
            let before = self
                .workers
                .get(&n)
                .map(|w| (w.view.state.clone(), w.view.flagged.clone()));
            self.refresh_worker_state(&n);
            let after = self
                .workers
                .get(&n)
                .map(|w| (w.view.state.clone(), w.view.flagged.clone()));
            if before != after {
                self.save_worker(&n);
            }
        }
    }

    fn apply(&mut self, d: Decisions, now: Instant) {
        let ms = unix_ms();
        for stop in d.stops {
            let attempt = self.jobs.get(&stop.job).map(|j| j.stored.view.attempt);
            for w in &stop.workers {
                debug!(job = stop.job, worker = %w, "stopping a copy");
                self.send(
                    w,
                    CoordMsg::Stop {
                        pool_job: stop.job,
                        attempt,
                    },
                );
            }
        }
        // Copies on workers that are away now cannot be stopped now: owe them a stop.
        for &id in d.requeued.iter().chain(&d.lost) {
            self.owe_stops(id);
        }
        for id in d.requeued {
            if let Some(j) = self.jobs.get_mut(&id) {
                j.stored.view.state = "pending".into();
                j.stored.view.started_ms = None;
                j.missing.clear();
            }
            if let (Some(j), Some(left)) = (self.jobs.get_mut(&id), self.pool.retries_left(id)) {
                j.stored.retries_left = left;
            }
            info!(job = id, "pool job back in the queue");
            self.save_job(id);
        }
        for (ids, state) in [(d.lost, "lost"), (d.failed, "failed")] {
            for id in ids {
                self.end_job(id, state, ms);
            }
        }
        for v in d.degraded {
            self.vacate(v);
        }
        for p in d.placements {
            self.start(p, now);
        }
        for r in d.replacements {
            self.replace(r, now);
        }
    }

    fn end_job(&mut self, id: u64, state: &str, ms: u64) {
        if let Some(j) = self.jobs.get_mut(&id) {
            j.stored.view.state = state.to_string();
            j.stored.view.ended_ms = Some(ms);
            j.missing.clear();
            info!(job = id, state, "pool job ended");
        }
        self.save_job(id);
    }

    fn start(&mut self, p: pool::Placement, now: Instant) {
        let id = p.job;
        // Mesh overlay addresses (empty for a member that is not on the mesh).
        let ips: Vec<String> = p
            .members
            .iter()
            .map(|m| {
                self.overlay
                    .ipv4(&m.worker)
                    .map(|ip| ip.to_string())
                    .unwrap_or_default()
            })
            .collect();
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        j.stored.view.attempt += 1;
        j.stored.view.state = "placed".into();
        j.stored.view.reason = None;
        j.missing.clear();
        let attempt = j.stored.view.attempt;
        j.stored.view.members = p
            .members
            .iter()
            .enumerate()
            .map(|(rank, m)| MemberView {
                rank: rank as u32,
                worker: m.worker.clone(),
                gpus: m.gpus.clone(),
                local_id: None,
                state: "starting".into(),
                exit_code: None,
            })
            .collect();
        let of = MemberOf::of(&j.stored);
        if let Some(c) = j.stored.view.cluster.as_mut() {
            c.head_worker = p.members.first().map(|m| m.worker.clone());
            c.head_ip = ips.first().cloned().filter(|ip| !ip.is_empty());
            c.placed_ms = Some(unix_ms());
            c.member_ips = ips.clone();
            c.ray = None;
        }
        let n = p.members.len();
        if of.req.cluster.is_some() && ips.iter().any(String::is_empty) {
            // A Ray member needs its overlay address; the mesh has not told it yet.
            warn!(
                job = id,
                "a cluster member has no overlay address yet; placing it again"
            );
            self.save_job(id);
            self.pool.job_ended(id, Outcome::Refused, now);
            return;
        }
        let mut starts = Vec::with_capacity(n);
        for (rank, m) in p.members.iter().enumerate() {
            starts.push((m.worker.clone(), self.member_start(&of, &ips, rank, m)));
        }
        info!(job = id, attempt, workers = ?p.members.iter().map(|m| &m.worker).collect::<Vec<_>>(), "pool job placed");
        self.save_job(id);
        if n > 1 || of.req.cluster.is_some() {
            // The members reach each other over the mesh before their processes start (and
            // a cluster's owner its head).
            self.gangs.insert(id);
            self.sync_groups();
        }
        let mut unreachable = false;
        for (w, s) in starts {
            if !self.send(&w, CoordMsg::Start(s)) {
                unreachable = true;
            }
        }
        if unreachable {
            // A member's feed went away between the decision and now: place it again.
            self.pool.job_ended(id, Outcome::Refused, now);
        }
    }

    /// The `Start` of rank `rank` of a placement (a new one, or a replacement in a running
    /// cluster).
    fn member_start(&self, of: &MemberOf, ips: &[String], rank: usize, m: &pool::Member) -> Start {
        let MemberOf {
            id,
            attempt,
            req,
            owner,
            token,
        } = of;
        let (id, attempt) = (*id, *attempt);
        let mut env = req.env.clone();
        env.insert("WEFT_POOL_JOB".into(), id.to_string());
        env.insert("WEFT_ATTEMPT".into(), attempt.to_string());
        env.insert("WEFT_NODE_RANK".into(), rank.to_string());
        env.insert("WEFT_NUM_NODES".into(), ips.len().to_string());
        env.insert("WEFT_NODE_IPS".into(), ips.join(","));
        env.insert(
            "WEFT_MASTER_ADDR".into(),
            ips.first().cloned().unwrap_or_default(),
        );
        let (command, ray) = match &req.cluster {
            Some(c) => {
                let inv = self.workers.get(&m.worker).map(|w| &w.view.inventory);
                let size = MemberSize::of(
                    c,
                    u32::try_from(m.gpus.len()).unwrap_or(u32::MAX),
                    inv.map_or(0, |i| u32::try_from(i.gpus.len()).unwrap_or(u32::MAX)),
                    inv.map_or(1, |i| i.cpus),
                    inv.map_or(0, |i| i.memory_bytes),
                );
                let node_ip = ips.get(rank).cloned().unwrap_or_default();
                let head = (rank > 0).then(|| ips.first().map(String::as_str).unwrap_or(""));
                (
                    member_argv(&node_ip, head, size),
                    Some(Box::new(RayStart {
                        cluster: c.name.clone(),
                        head: rank == 0,
                        node_ip,
                        token: token.clone().unwrap_or_default(),
                    })),
                )
            }
            None => (req.command.clone(), None),
        };
        Start {
            pool_job: id,
            attempt,
            owner: owner.clone(),
            command,
            env,
            workdir: req.workdir.clone(),
            gpus: m.gpus.clone(),
            timeout_s: req.timeout_s,
            ray,
        }
    }

    /// A cluster member's worker was lost: its rank is vacant (the cluster runs degraded).
    /// The copy it may still run is owed a stop for when it comes back.
    fn vacate(&mut self, v: pool::Vacancy) {
        let Some(j) = self.jobs.get_mut(&v.job) else {
            return;
        };
        let attempt = j.stored.view.attempt;
        if let Some(m) = j.stored.view.members.get_mut(v.rank as usize) {
            m.worker = String::new();
            m.gpus.clear();
            m.local_id = None;
            m.state = "lost".into();
            m.exit_code = None;
        }
        j.missing.remove(&v.worker);
        if let Some(c) = j.stored.view.cluster.as_mut() {
            if !c.vacant.contains(&v.rank) {
                c.vacant.push(v.rank);
                c.vacant.sort_unstable();
            }
        }
        warn!(job = v.job, rank = v.rank, worker = %v.worker, "a cluster member was lost; the cluster is degraded");
        if let Some(w) = self.workers.get_mut(&v.worker) {
            w.owed_stops.push((v.job, attempt));
        }
        self.save_job(v.job);
    }

    /// A vacant rank of a running cluster was given to another worker: start it there.
    fn replace(&mut self, r: pool::Replacement, now: Instant) {
        let id = r.job;
        let ip = self
            .overlay
            .ipv4(&r.member.worker)
            .map(|ip| ip.to_string())
            .unwrap_or_default();
        let Some(j) = self.jobs.get_mut(&id) else {
            return;
        };
        let rank = r.rank as usize;
        let of = MemberOf::of(&j.stored);
        let attempt = of.attempt;
        let mut ips = j
            .stored
            .view
            .cluster
            .as_ref()
            .map(|c| c.member_ips.clone())
            .unwrap_or_default();
        if ips.len() <= rank || ip.is_empty() {
            // No overlay address for it yet (or a record without addresses): the cluster
            // cannot take it; end the attempt as refused so that it is placed again whole.
            warn!(job = id, rank, worker = %r.member.worker, "a replacement member has no overlay address; placing the cluster again");
            self.pool.job_ended(id, Outcome::Refused, now);
            self.save_job(id);
            return;
        }
        ips[rank] = ip;
        if let Some(m) = j.stored.view.members.get_mut(rank) {
            *m = MemberView {
                rank: r.rank,
                worker: r.member.worker.clone(),
                gpus: r.member.gpus.clone(),
                local_id: None,
                state: "starting".into(),
                exit_code: None,
            };
        }
        if let Some(c) = j.stored.view.cluster.as_mut() {
            c.vacant.retain(|&x| x != r.rank);
            c.member_ips = ips.clone();
        }
        let start = self.member_start(&of, &ips, rank, &r.member);
        info!(job = id, attempt, rank, worker = %r.member.worker, "a lost cluster member replaced");
        self.save_job(id);
        self.sync_groups();
        if !self.send(&r.member.worker, CoordMsg::Start(start)) {
            self.pool.job_ended(id, Outcome::Refused, now);
        }
    }

    /// Gives every worker exactly the group tags of the gangs placed or running on it, so
    /// that a gang's members reach each other over the mesh while it runs, and only then.
    fn sync_groups(&mut self) {
        let mut want: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let jobs = &self.jobs;
        self.gangs.retain(|id| {
            let Some(j) = jobs.get(id) else {
                return false;
            };
            if !matches!(j.stored.view.state.as_str(), "placed" | "running") {
                return false;
            }
            for m in j
                .stored
                .view
                .members
                .iter()
                .filter(|m| !m.worker.is_empty())
            {
                want.entry(m.worker.clone())
                    .or_default()
                    .push(format!("{GROUP_TAG_PREFIX}{id}"));
            }
            if j.stored.view.cluster.is_some() {
                // The owner reaches the head's dashboard and Ray Client, and nothing else.
                if let Some(head) = j.stored.view.members.first() {
                    want.entry(head.worker.clone())
                        .or_default()
                        .push(head_tag(*id));
                    want.entry(j.stored.view.owner.clone())
                        .or_default()
                        .push(owner_tag(*id));
                }
            }
            true
        });
        let names: std::collections::BTreeSet<String> =
            want.keys().chain(self.groups.keys()).cloned().collect();
        let mut now_set = BTreeMap::new();
        for name in names {
            let new = want.get(&name).cloned().unwrap_or_default();
            let had = self.groups.get(&name).cloned();
            if had.as_ref() == Some(&new) || (had.is_none() && new.is_empty()) {
                if !new.is_empty() {
                    now_set.insert(name, new);
                }
                continue;
            }
            // Set when the node is on the mesh; a name that is not (a cluster's owner who
            // joins the mesh later) is tried again at the next pass.
            if self.overlay.set_groups(&name, &new) {
                debug!(node = %name, groups = ?new, "gang group tags");
                if !new.is_empty() {
                    now_set.insert(name, new);
                }
            } else if let Some(had) = had {
                now_set.insert(name, had);
            }
        }
        self.groups = now_set;
    }

    fn current_member(&mut self, job: u64, attempt: u32, worker: &str) -> Option<&mut MemberView> {
        let j = self.jobs.get_mut(&job)?;
        if j.stored.view.attempt != attempt
            || !matches!(j.stored.view.state.as_str(), "placed" | "running")
        {
            return None;
        }
        j.stored
            .view
            .members
            .iter_mut()
            .find(|m| m.worker == worker)
    }

    fn check_missing(&mut self, now: Instant) {
        let mut ended = Vec::new();
        for (&id, j) in &mut self.jobs {
            let late: Vec<String> = j
                .missing
                .iter()
                .filter(|(_, &since)| now.duration_since(since) >= MISSING_GRACE)
                .map(|(w, _)| w.clone())
                .collect();
            for w in late {
                j.missing.remove(&w);
                let started = j
                    .stored
                    .view
                    .members
                    .iter()
                    .find(|m| m.worker == w)
                    .is_some_and(|m| m.local_id.is_some());
                if let Some(m) = j.stored.view.members.iter_mut().find(|m| m.worker == w) {
                    m.state = "missing".into();
                }
                warn!(job = id, worker = %w, started, "a copy is gone from its worker");
                ended.push((
                    id,
                    if started {
                        Outcome::Failed
                    } else {
                        Outcome::Refused
                    },
                ));
            }
        }
        for (id, outcome) in ended {
            self.pool.job_ended(id, outcome, now);
            self.save_job(id);
        }
    }

    // ---- the feed ----

    fn on_inventory(&mut self, worker: &str, inv: weft_proto::pool::Inventory, now: Instant) {
        let ms = unix_ms();
        // Reconcile the copies it runs with what the pool placed.
        let mut pool_held = Vec::new();
        let mut stale = Vec::new();
        for c in &inv.running {
            let gpus = match self.current_member(c.pool_job, c.attempt, worker) {
                Some(m) => {
                    m.local_id = Some(c.local_id);
                    if m.state == "starting" || m.state == "missing" {
                        m.state = "running".into();
                    }
                    m.gpus.clone()
                }
                None => {
                    stale.push((c.pool_job, c.attempt));
                    continue;
                }
            };
            if let Some(j) = self.jobs.get_mut(&c.pool_job) {
                j.missing.remove(worker);
            }
            pool_held.extend(gpus);
        }
        for (job, attempt) in stale {
            info!(job, attempt, worker = %worker, "stopping a stale copy the worker still runs");
            self.send(
                worker,
                CoordMsg::Stop {
                    pool_job: job,
                    attempt: Some(attempt),
                },
            );
        }
        // Current members it does not list: missing until they show up or end.
        for (&id, j) in &mut self.jobs {
            if !matches!(j.stored.view.state.as_str(), "placed" | "running") {
                continue;
            }
            let listed = |m: &MemberView| {
                inv.running.iter().any(|c| {
                    c.pool_job == id && c.attempt == j.stored.view.attempt && m.worker == worker
                })
            };
            let absent = j
                .stored
                .view
                .members
                .iter()
                .any(|m| m.worker == worker && !listed(m) && m.state != "succeeded");
            if absent {
                j.missing.entry(worker.to_string()).or_insert(now);
            }
        }
        // Members being started are not yet listed; their GPUs are the pool's too.
        for j in self.jobs.values() {
            if matches!(j.stored.view.state.as_str(), "placed" | "running") {
                for m in &j.stored.view.members {
                    if m.worker == worker {
                        pool_held.extend(m.gpus.iter().cloned());
                    }
                }
            }
        }
        for r in &inv.ray_heads {
            let Some(j) = self.jobs.get_mut(&r.pool_job) else {
                continue;
            };
            let head = j.stored.view.members.first().map(|m| m.worker.as_str());
            if j.stored.view.attempt != r.attempt || head != Some(worker) {
                continue;
            }
            if let Some(c) = j.stored.view.cluster.as_mut() {
                if c.ray.as_ref() != Some(r) {
                    let alive = r.nodes.iter().filter(|n| n.alive).count();
                    if c.alive(r.attempt) != alive {
                        info!(job = r.pool_job, alive, nodes = r.nodes.len(), "ray nodes");
                    }
                    c.ray = Some(r.clone());
                    let id = r.pool_job;
                    if let Err(e) = self.store.save_job(&self.jobs[&id].stored) {
                        warn!(job = id, error = %e, "could not store pool job");
                    }
                }
            }
        }
        self.pool
            .worker_update(now, core_inventory(worker, &inv, &pool_held));
        let holders = self.holders(worker, &inv);
        let rec = self
            .workers
            .entry(worker.to_string())
            .or_insert_with(|| WorkerRec::new(worker, inv.clone(), ms));
        if rec.view.connected_since_ms.is_none() {
            rec.view.connected_since_ms = Some(ms);
        }
        rec.view.inventory = inv;
        rec.view.holders = holders;
        rec.view.last_seen_ms = ms;
        self.refresh_worker_state(worker);
        self.save_worker(worker);
    }

    fn on_started(&mut self, worker: &str, job: u64, attempt: u32, local_id: u64, started_ms: u64) {
        let Some(m) = self.current_member(job, attempt, worker) else {
            self.send(
                worker,
                CoordMsg::Stop {
                    pool_job: job,
                    attempt: Some(attempt),
                },
            );
            return;
        };
        m.local_id = Some(local_id);
        m.state = "running".into();
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        j.missing.remove(worker);
        // Every member started (a vacant rank of a degraded cluster has no worker to wait for).
        if j.stored
            .view
            .members
            .iter()
            .all(|m| m.local_id.is_some() || m.worker.is_empty())
            && j.stored.view.state == "placed"
        {
            j.stored.view.state = "running".into();
            j.stored.view.started_ms = Some(started_ms);
            self.pool.job_started(job);
            info!(job, attempt, "pool job running");
        }
        self.save_job(job);
    }

    fn on_refused(&mut self, worker: &str, job: u64, attempt: u32, reason: &str, now: Instant) {
        info!(job, attempt, worker = %worker, reason, "a worker refused a pool job; placing it again");
        let Some(m) = self.current_member(job, attempt, worker) else {
            return;
        };
        m.state = format!("refused: {reason}");
        self.pool.job_ended(job, Outcome::Refused, now);
        self.save_job(job);
    }

    fn on_ended(&mut self, worker: &str, e: Ended, now: Instant) {
        if e.per_worker() {
            return self.on_worker_job_ended(worker, e);
        }
        let job = e.copy.pool_job;
        let attempt = e.copy.attempt;
        // The usage record, once per (job, attempt, worker).
        let (engineer, rank) = match self.jobs.get(&job) {
            Some(j) => (
                j.stored.view.owner.clone(),
                j.stored
                    .view
                    .members
                    .iter()
                    .find(|m| m.worker == worker)
                    .map(|m| m.rank)
                    .unwrap_or(0),
            ),
            None => (String::new(), 0),
        };
        let usage = UsageRecord::of_end(&e, rank, engineer, worker, self.model_of(worker, &e.gpus));
        match self.store_usage(worker, &e, usage) {
            Ok(_) => {
                self.send(
                    worker,
                    CoordMsg::Ack {
                        pool_job: job,
                        attempt,
                        local_id: None,
                    },
                );
            }
            Err(err) => warn!(job, error = %err, "could not store a usage record; not acked"),
        }
        let Some(m) = self.current_member(job, attempt, worker) else {
            // A job that already ended (cancelled: `jobs cancel`, `cluster down`): its members'
            // real ends still show, so that one can tell when every copy has stopped.
            if let Some(j) = self.jobs.get_mut(&job) {
                if j.stored.view.attempt == attempt && j.stored.finished() {
                    if let Some(m) = j
                        .stored
                        .view
                        .members
                        .iter_mut()
                        .find(|m| m.worker == worker)
                    {
                        m.state = e.state.clone();
                        m.exit_code = e.exit_code;
                        self.save_job(job);
                    }
                }
            }
            return;
        };
        m.state = e.state.clone();
        m.exit_code = e.exit_code;
        if m.local_id.is_none() {
            m.local_id = Some(e.copy.local_id);
        }
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        j.missing.remove(worker);
        let all_ok = j.stored.view.members.iter().all(|m| m.state == "succeeded");
        if e.state == "succeeded" {
            if all_ok {
                self.pool.job_ended(job, Outcome::Succeeded, now);
                self.end_job(job, "succeeded", e.ended_ms);
            } else {
                self.save_job(job);
            }
        } else {
            self.pool.job_ended(job, Outcome::Failed, now);
            self.save_job(job);
        }
    }

    /// Every current copy on `worker` is owed a stop (it is leaving the pool).
    fn owe_all(&mut self, worker: &str) {
        let ids: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| {
                matches!(j.stored.view.state.as_str(), "placed" | "running")
                    && j.stored.view.members.iter().any(|m| m.worker == worker)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in ids {
            let attempt = self.jobs.get(&id).map_or(0, |j| j.stored.view.attempt);
            if let Some(w) = self.workers.get_mut(worker) {
                w.owed_stops.push((id, attempt));
            }
        }
    }

    /// The members of job `id`'s current attempt whose workers are away are owed a stop.
    fn owe_stops(&mut self, id: u64) {
        let Some(j) = self.jobs.get(&id) else {
            return;
        };
        let attempt = j.stored.view.attempt;
        for m in &j.stored.view.members {
            if let Some(w) = self.workers.get_mut(&m.worker) {
                if w.feed.is_none() || w.silent {
                    w.owed_stops.push((id, attempt));
                }
            }
        }
    }

    /// A worker is back: the stops it is owed.
    fn pay_stops(&mut self, worker: &str) {
        let owed = self
            .workers
            .get_mut(worker)
            .map(|w| std::mem::take(&mut w.owed_stops))
            .unwrap_or_default();
        for (job, attempt) in owed {
            info!(job, attempt, worker = %worker, "stopping a copy moved elsewhere while its worker was away");
            self.send(
                worker,
                CoordMsg::Stop {
                    pool_job: job,
                    attempt: Some(attempt),
                },
            );
        }
    }

    /// A line from `worker`'s feed: it is alive (back, if it was silent).
    fn heard(&mut self, worker: &str, now: Instant, heartbeat: bool) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        let beats = heartbeat || w.heard.is_some_and(|(_, b)| b);
        w.heard = Some((now, beats));
        if w.silent {
            w.silent = false;
            info!(worker = %worker, "pool feed speaks again");
            let inv = w.view.inventory.clone();
            self.on_inventory(worker, inv, now);
            self.pay_stops(worker);
        }
    }

    /// Workers whose heartbeats stopped are away from their last beat on.
    fn check_silence(&mut self, now: Instant) {
        let mut away = Vec::new();
        for (name, w) in &mut self.workers {
            if let (Some((at, true)), false, Some(_)) = (w.heard, w.silent, &w.feed) {
                if now.duration_since(at) >= SILENCE {
                    w.silent = true;
                    away.push((name.clone(), at));
                }
            }
        }
        for (name, at) in away {
            warn!(worker = %name, silent_s = now.duration_since(at).as_secs(), "pool feed silent; the worker is away");
            self.pool.worker_disconnected(&name, at);
            self.refresh_worker_state(&name);
            self.save_worker(&name);
        }
    }

    /// The GPU model of `worker`'s first GPU among `gpus` (as its inventory names it).
    fn model_of(&self, worker: &str, gpus: &[String]) -> String {
        self.workers
            .get(worker)
            .and_then(|w| {
                w.view
                    .inventory
                    .gpus
                    .iter()
                    .find(|g| gpus.contains(&g.uuid))
                    .map(|g| g.model.clone())
            })
            .unwrap_or_default()
    }

    /// A per-worker job (`--worker`) ended: its usage record (attempt 0, the agent's local id),
    /// then the ack. The pool's queue is not involved.
    fn on_worker_job_ended(&mut self, worker: &str, e: Ended) {
        let local_id = e.copy.local_id;
        let usage = UsageRecord::of_end(
            &e,
            0,
            e.owner.clone().unwrap_or_default(),
            worker,
            self.model_of(worker, &e.gpus),
        );
        match self.store_usage(worker, &e, usage) {
            Ok(_) => {
                self.send(
                    worker,
                    CoordMsg::Ack {
                        pool_job: 0,
                        attempt: 0,
                        local_id: Some(local_id),
                    },
                );
            }
            Err(err) => {
                warn!(worker = %worker, local_id, error = %err, "could not store a usage record; not acked")
            }
        }
    }

    /// Per GPU of `inv` (same order): the placed or running pool job holding it on `worker`.
    fn holders(&self, worker: &str, inv: &weft_proto::pool::Inventory) -> Vec<Option<u64>> {
        inv.gpus
            .iter()
            .map(|g| {
                self.jobs.iter().find_map(|(&id, j)| {
                    (matches!(j.stored.view.state.as_str(), "placed" | "running")
                        && j.stored
                            .view
                            .members
                            .iter()
                            .any(|m| m.worker == worker && m.gpus.contains(&g.uuid)))
                    .then_some(id)
                })
            })
            .collect()
    }

    /// Stores `record` (once), numbered and countersigned, with the worker's signature when
    /// its claim in `e` is good, or the reason it is not.
    fn store_usage(
        &self,
        worker: &str,
        e: &Ended,
        record: UsageRecord,
    ) -> Result<bool, crate::error::StateError> {
        let claim = self.check_claim(worker, e, &record);
        if let Err(why) = &claim {
            warn!(worker = %worker, job = record.job, attempt = record.attempt, reason = %why,
                "usage record not signed by its worker; stored with the reason");
        }
        let u = self.usage.clone();
        let stored_ms = unix_ms();
        let sealed = record.clone();
        self.store.save_usage(
            &record,
            stored_ms,
            Box::new(move |seq| {
                let s = SignedUsage::countersign(
                    seq,
                    stored_ms,
                    &u.relay,
                    sealed.clone(),
                    claim.clone(),
                    &u.signer,
                );
                serde_json::to_string(&s).expect("a usage record serializes")
            }),
        )
    }

    /// The worker's (key, signature) for `record`, or why they cannot be kept: none sent, a
    /// key this worker never announced, a signature that does not match, or a record that
    /// is not the coordinator's.
    fn check_claim(
        &self,
        worker: &str,
        e: &Ended,
        record: &UsageRecord,
    ) -> Result<(String, String), String> {
        let Some(c) = &e.usage else {
            return Err("its agent did not sign it (an agent older than signed records)".into());
        };
        let announced = self
            .workers
            .get(worker)
            .is_some_and(|w| w.view.usage_keys.contains(&c.key));
        if !announced {
            return Err(format!(
                "signed with {}, a key {worker} never announced",
                usage::short(&c.key)
            ));
        }
        if !c.valid() {
            return Err("the worker's signature does not match its record".into());
        }
        if c.record != *record {
            return Err(format!(
                "the worker's record differs from the coordinator's in {}",
                differing_fields(&c.record, record)
            ));
        }
        Ok((c.key.clone(), c.sig.clone()))
    }

    /// A worker announced the key it signs usage records with: kept in its record (all keys
    /// it ever announced), unless another worker announced the same key first.
    fn register_usage_key(&mut self, worker: &str, key: Option<&str>) {
        let Some(k) = key else { return };
        if !usage::key_ok(k) {
            warn!(worker = %worker, "malformed usage key in the inventory; ignored");
            return;
        }
        if let Some(other) = self
            .workers
            .iter()
            .find(|(n, w)| n.as_str() != worker && w.view.usage_keys.iter().any(|x| x == k))
            .map(|(n, _)| n.clone())
        {
            warn!(worker = %worker, other = %other, key = %usage::short(k),
                "usage key already announced by another worker; not registered");
            return;
        }
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if !w.view.usage_keys.iter().any(|x| x == k) {
            w.view.usage_keys.push(k.to_string());
            info!(worker = %worker, key = %usage::short(k), "usage key registered");
            self.save_worker(worker);
        }
    }

    fn feed_ended(&mut self, worker: &str, sid: u64, now: Instant) {
        let Some(w) = self.workers.get_mut(worker) else {
            return;
        };
        if w.feed.as_ref().is_none_or(|f| f.sid != sid) {
            return;
        }
        w.feed = None;
        let ms = unix_ms();
        if let Some(since) = w.view.connected_since_ms.take() {
            w.view.uptime_ms += ms.saturating_sub(since);
        }
        w.view.last_seen_ms = ms;
        // `lost_after` counts from the last line heard (a dead link is noticed late).
        let last = match w.heard.take() {
            Some((at, true)) if now.duration_since(at) < SILENCE * 2 => at,
            _ => now,
        };
        w.silent = false;
        self.pool.worker_disconnected(worker, last);
        self.refresh_worker_state(worker);
        self.save_worker(worker);
        info!(worker = %worker, "pool feed ended; the worker is away");
    }

    // ---- views ----

    fn job_view(&self, j: &JobRec) -> JobView {
        let mut v = j.stored.view.clone();
        if v.state == "pending" {
            v.reason = self.pool.why_pending(v.id).map(|r| r.to_string());
        }
        v
    }
}

// ---- the feed task ----

/// Keeps the pool feed of one worker connection: opens it, reads it, and
/// opens it again while the connection lives; in a fleet, only while this
/// relay holds the scheduling lease.
pub(super) async fn feed(shared: Arc<Shared>, name: String, conn: Connection) {
    let mut leading = shared.pool.leading.subscribe();
    loop {
        let epoch = tokio::select! {
            e = held_epoch(&mut leading) => e,
            _ = conn.closed() => return,
        };
        match open_feed(&conn).await {
            Ok((send, recv)) => run_feed(&shared, &name, send, recv, epoch).await,
            Err(e) => debug!(worker = %name, error = %e, "could not open the pool feed"),
        }
        if conn.close_reason().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if conn.close_reason().is_some() {
            return;
        }
    }
}

/// Waits until this relay schedules the pool; the lease's epoch.
async fn held_epoch(rx: &mut tokio::sync::watch::Receiver<Option<i64>>) -> i64 {
    loop {
        if let Some(e) = *rx.borrow_and_update() {
            return e;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Returns when this relay no longer schedules the pool in `epoch`.
async fn epoch_over(shared: &Shared, epoch: i64) {
    let mut rx = shared.pool.leading.subscribe();
    loop {
        if *rx.borrow_and_update() != Some(epoch) {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

pub(super) async fn open_feed(conn: &Connection) -> Result<(SendStream, RecvStream), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let incoming = Message::Incoming {
        from: POOL_CALLER.to_string(),
        service: POOL_SERVICE.to_string(),
    };
    write_message(&mut send, &incoming)
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), read_message(&mut recv)).await {
        Ok(Ok(Message::OpenOk)) => Ok((send, recv)),
        Ok(Ok(other)) => Err(format!("worker answered {other:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("worker did not answer in time".into()),
    }
}

async fn run_feed(
    shared: &Arc<Shared>,
    name: &str,
    mut send: SendStream,
    recv: RecvStream,
    epoch: i64,
) {
    let (tx, mut rx) = mpsc::channel::<CoordMsg>(FEED_QUEUE);
    let sid = {
        let mut hub = lock(&shared.pool.hub);
        if hub.epoch != epoch {
            // The lease moved on since this feed was asked for.
            return;
        }
        let sid = hub.next_sid;
        hub.next_sid += 1;
        if let Some(w) = hub.workers.get_mut(name) {
            w.feed = Some(Feed {
                sid,
                tx: tx.clone(),
            });
        } else {
            // Registered for real at its first inventory.
            let empty = weft_proto::pool::Inventory {
                gpus: vec![],
                cpus: 0,
                memory_bytes: 0,
                version: String::new(),
                simulated: false,
                running: vec![],
                ray: None,
                ray_heads: vec![],
                usage_key: None,
            };
            let mut rec = WorkerRec::new(name, empty, unix_ms());
            rec.feed = Some(Feed {
                sid,
                tx: tx.clone(),
            });
            hub.workers.insert(name.to_string(), rec);
        }
        hub.pay_stops(name);
        sid
    };
    let _ = tx.try_send(CoordMsg::Telemetry {
        every_ms: TELEMETRY_EVERY_MS,
    });
    drop(tx);
    info!(worker = %name, "pool feed open");
    let writer = async {
        while let Some(m) = rx.recv().await {
            if send.write_all(&encode_line(&m)).await.is_err() {
                break;
            }
        }
        let _ = send.finish();
    };
    let reader = async {
        let mut lines = tokio::io::BufReader::new(recv);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            let n = match (&mut lines)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut buf)
                .await
            {
                Ok(n) => n,
                Err(_) => break,
            };
            if n == 0 {
                break;
            }
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            match decode_line::<AgentMsg>(line) {
                // Readings: the web view's, under their own lock; the scheduler only hears
                // that the worker is alive.
                Ok(AgentMsg::Telemetry { at_ms, gpus }) => {
                    lock(&shared.pool.telemetry).record(name, at_ms, gpus);
                    let mut hub = lock(&shared.pool.hub);
                    if hub.epoch != epoch {
                        break;
                    }
                    hub.heard(name, Instant::now(), true);
                }
                Ok(msg) => {
                    let now = Instant::now();
                    let mut hub = lock(&shared.pool.hub);
                    if hub.epoch != epoch {
                        break;
                    }
                    hub.heard(name, now, matches!(msg, AgentMsg::Heartbeat));
                    match msg {
                        AgentMsg::Inventory(inv) => {
                            let key = inv.usage_key.clone();
                            hub.on_inventory(name, inv, now);
                            hub.register_usage_key(name, key.as_deref());
                        }
                        AgentMsg::Started { copy, started_ms } => hub.on_started(
                            name,
                            copy.pool_job,
                            copy.attempt,
                            copy.local_id,
                            started_ms,
                        ),
                        AgentMsg::Refused {
                            pool_job,
                            attempt,
                            reason,
                        } => hub.on_refused(name, pool_job, attempt, &reason, now),
                        AgentMsg::Ended(e) => hub.on_ended(name, e, now),
                        AgentMsg::Heartbeat | AgentMsg::Telemetry { .. } => {}
                    }
                    hub.pump(now);
                }
                Err(LineError::TooLong(n)) => {
                    warn!(worker = %name, bytes = n, "pool feed line too long; closing the feed");
                    break;
                }
                Err(e) => warn!(worker = %name, error = %e, "bad pool feed line skipped"),
            }
        }
    };
    tokio::select! {
        () = reader => {},
        () = writer => {},
        () = epoch_over(shared, epoch) => {
            debug!(worker = %name, "pool feed closed: this relay no longer schedules the pool");
        },
    }
    let mut hub = lock(&shared.pool.hub);
    if hub.epoch == epoch {
        hub.feed_ended(name, sid, Instant::now());
        hub.pump(Instant::now());
    }
}

/// Pumps the core for what only time decides, and the flags the operator changes.
pub(super) async fn timer(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ps = &shared.pool;
        if let Some(l) = &ps.lease {
            // A renewal that hangs (the store out of reach) must not keep this relay
            // scheduling past the lease.
            let expired = lock(&l.trusted_until).is_some_and(|t| Instant::now() >= t);
            if expired {
                ps.step_down("the lease could not be renewed in time");
            }
        }
        if ps.leading().is_some() {
            lock(&ps.hub).pump(Instant::now());
        }
    }
}

// ---- the API ----

/// Who is calling the pool API (the admitted node).
#[derive(Debug, Clone)]
pub(super) struct ApiCaller {
    pub name: String,
    pub tags: Vec<String>,
}

#[derive(serde::Serialize)]
struct ErrorBody {
    error: String,
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: msg.into() })).into_response()
}

/// A refusal, answered as `{"error": …}` with its status.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        err(self.0, self.1)
    }
}

impl PoolShell {
    fn is_operator(&self, c: &ApiCaller) -> bool {
        c.tags
            .iter()
            .any(|t| self.settings.operator_tags.contains(t))
    }

    fn may_submit(&self, c: &ApiCaller) -> bool {
        c.tags.iter().any(|t| self.settings.submit_tags.contains(t))
    }

    /// A caller that may use the pool API at all: submitters and operators (workers may not).
    fn check_member(&self, c: &ApiCaller) -> Result<(), ApiError> {
        if self.may_submit(c) || self.is_operator(c) {
            Ok(())
        } else {
            Err(ApiError(
                StatusCode::FORBIDDEN,
                format!(
                    "node {:?} (tags {:?}) may not use the pool; pool.submit_tags are {:?}",
                    c.name, c.tags, self.settings.submit_tags
                ),
            ))
        }
    }
}

/// The pool API router; the caller comes as an [`ApiCaller`] extension.
pub(super) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/pool", get(pool_view))
        .route("/v1/pool/jobs", post(submit).get(list))
        .route("/v1/pool/jobs/{id}", get(show))
        .route("/v1/pool/jobs/{id}/cancel", post(cancel))
        .route("/v1/pool/usage", get(usage))
        .route("/v1/pool/usage/export", get(usage_export))
        .route("/v1/clusters", post(cluster_up).get(cluster_list))
        .route(
            "/v1/clusters/{name}",
            get(cluster_show).delete(cluster_down),
        )
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /v1/pool, /v1/pool/jobs, /v1/pool/usage, /v1/pool/usage/export, /v1/clusters",
            )
        })
        .with_state(shared)
}

async fn submit(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    body: Result<Json<SubmitRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!("malformed job: {}", e.body_text()),
            )
        }
    };
    if req.cluster.is_some() {
        return err(
            StatusCode::BAD_REQUEST,
            "a Ray cluster is made with POST /v1/clusters (`weft cluster up`)",
        );
    }
    if req.command.first().is_none_or(|c| c.is_empty()) {
        return err(
            StatusCode::BAD_REQUEST,
            "the job needs a command (`-- CMD ...`)",
        );
    }
    match submit_job(&shared.pool, &caller, req) {
        Ok((v, _)) => (StatusCode::CREATED, Json(v)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /v1/clusters`: a Ray cluster is a gang job whose command the coordinator writes.
async fn cluster_up(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    body: Result<Json<SubmitRequest>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(r)) => r,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!("malformed cluster request: {}", e.body_text()),
            )
        }
    };
    let Some(c) = &req.cluster else {
        return err(StatusCode::BAD_REQUEST, "`cluster` (its name) is required");
    };
    if let Err(e) = weft_proto::names::validate_name(&c.name) {
        return err(
            StatusCode::BAD_REQUEST,
            format!("cluster name {:?}: {e}", c.name),
        );
    }
    if !req.command.is_empty() {
        return err(
            StatusCode::BAD_REQUEST,
            "a cluster takes no command: its members run `ray start` (submit work with `weft cluster submit`)",
        );
    }
    match submit_job(&shared.pool, &caller, req) {
        Ok((job, Some(token))) => {
            (StatusCode::CREATED, Json(ClusterCreated { job, token })).into_response()
        }
        Ok((job, None)) => (StatusCode::CREATED, Json(job)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The live cluster named `name` of `owner`, else its newest finished one.
fn cluster_named(hub: &Hub, owner: &str, name: &str) -> Option<u64> {
    let mine = |j: &&JobRec| {
        j.stored.view.owner == owner
            && j.stored
                .view
                .cluster
                .as_ref()
                .is_some_and(|c| c.name == name)
    };
    hub.jobs
        .values()
        .filter(mine)
        .find(|j| !j.stored.finished())
        .or_else(|| hub.jobs.values().rev().find(mine))
        .map(|j| j.stored.view.id)
}

/// `GET /v1/clusters`: the caller's clusters (every one for an operator), live ones and the
/// finished ones still recorded.
async fn cluster_list(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
) -> Response {
    let ps = &shared.pool;
    if let Err(r) = ps.check_member(&caller) {
        return r.into_response();
    }
    let all = ps.is_operator(&caller);
    let hub = lock(&ps.hub);
    let v: Vec<JobView> = hub
        .jobs
        .values()
        .filter(|j| j.stored.view.cluster.is_some())
        .filter(|j| all || j.stored.view.owner == caller.name)
        .map(|j| hub.job_view(j))
        .collect();
    Json(v).into_response()
}

fn find_cluster(
    ps: &PoolShell,
    hub: &Hub,
    caller: &ApiCaller,
    name: &str,
) -> Result<u64, ApiError> {
    ps.check_member(caller)?;
    cluster_named(hub, &caller.name, name)
        .or_else(|| {
            // An operator names anyone's cluster.
            ps.is_operator(caller).then(|| {
                hub.jobs
                    .values()
                    .rev()
                    .find(|j| {
                        j.stored
                            .view
                            .cluster
                            .as_ref()
                            .is_some_and(|c| c.name == name)
                    })
                    .map(|j| j.stored.view.id)
            })?
        })
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no cluster {name:?} (see `weft cluster list`)"),
            )
        })
}

/// `GET /v1/clusters/NAME`.
async fn cluster_show(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    Path(name): Path<String>,
) -> Response {
    let hub = lock(&shared.pool.hub);
    match find_cluster(&shared.pool, &hub, &caller, &name) {
        Ok(id) => Json(hub.job_view(&hub.jobs[&id])).into_response(),
        Err(r) => r.into_response(),
    }
}

/// `DELETE /v1/clusters/NAME`: stops Ray on every member and frees the GPUs.
async fn cluster_down(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    Path(name): Path<String>,
) -> Response {
    let ps = &shared.pool;
    let mut hub = lock(&ps.hub);
    let id = match find_cluster(ps, &hub, &caller, &name) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let now = Instant::now();
    if hub.pool.cancel(id, now) {
        info!(job = id, cluster = %name, by = %caller.name, "cluster down");
        hub.end_job(id, "cancelled", unix_ms());
    }
    hub.pump(now);
    Json(hub.job_view(&hub.jobs[&id])).into_response()
}

/// Checks, queues and stores a job (a cluster's too: then its token comes back).
fn submit_job(
    ps: &PoolShell,
    caller: &ApiCaller,
    mut req: SubmitRequest,
) -> Result<(JobView, Option<String>), ApiError> {
    let refuse = |code: StatusCode, msg: String| Err(ApiError(code, msg));
    if !ps.may_submit(caller) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!(
                "node {:?} (tags {:?}) may not submit jobs; pool.submit_tags are {:?}",
                caller.name, caller.tags, ps.settings.submit_tags
            ),
        );
    }
    if req.worker.is_some() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "the pool does not pin jobs to a worker; use `weft jobs submit --worker NAME` for a \
             per-worker job"
                .into(),
        );
    }
    if req.nodes == 0 {
        return refuse(StatusCode::BAD_REQUEST, "--nodes must be at least 1".into());
    }
    if req.cluster.is_some() && req.gpus == 0 {
        // Ray members are placed by their GPUs: one each unless asked.
        req.gpus = 1;
    }
    let spec = core_spec(&caller.name, &req).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    if let Some(max) = ps.settings.priority_limit(&caller.tags) {
        if req.priority > max {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "priority {} is over the limit {max} for tags {:?} (pool.priority_max)",
                    req.priority, caller.tags
                ),
            );
        }
    }
    let now = Instant::now();
    let mut hub = lock(&ps.hub);
    if let Some(c) = &req.cluster {
        if let Some(id) =
            cluster_named(&hub, &caller.name, &c.name).filter(|id| !hub.jobs[id].stored.finished())
        {
            return refuse(
                StatusCode::CONFLICT,
                format!(
                    "cluster {:?} exists (job {id}); `weft cluster down {}` first",
                    c.name, c.name
                ),
            );
        }
    }
    if let Some(quota) = ps.settings.gpu_quota {
        let held: u32 = hub
            .jobs
            .values()
            .filter(|j| j.stored.view.owner == caller.name && !j.stored.finished())
            .map(|j| gpus_of(&j.stored.view.request))
            .sum();
        let want = gpus_of(&req);
        if held + want > quota {
            return refuse(
                StatusCode::FORBIDDEN,
                format!(
                    "GPU quota: {} holds or waits for {held} of {quota} GPUs; this job needs {want} (pool.gpu_quota)",
                    caller.name
                ),
            );
        }
    }
    let id = hub
        .pool
        .submit(now, spec)
        .map_err(|e| ApiError(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()))?;
    let retries = req.retries;
    let token = req.cluster.as_ref().map(|_| {
        let mut b = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut b);
        hex::encode(b)
    });
    let cluster = req
        .cluster
        .as_ref()
        .zip(token.as_ref())
        .map(|(c, t)| ClusterInfo {
            name: c.name.clone(),
            head_ip: None,
            head_worker: None,
            member_ips: vec![],
            token_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(t.as_bytes())),
            ray: None,
            placed_ms: None,
            vacant: vec![],
        });
    let rec = JobRec {
        stored: StoredJob {
            view: JobView {
                id,
                owner: caller.name.clone(),
                state: "pending".into(),
                request: req,
                reason: None,
                attempt: 0,
                members: vec![],
                submitted_ms: unix_ms(),
                started_ms: None,
                ended_ms: None,
                cluster,
            },
            retries_left: retries,
            cluster_token: token.clone(),
        },
        missing: HashMap::new(),
    };
    if let Err(e) = hub.store.save_job(&rec.stored) {
        // Not stored, not accepted: take it out of the queue again.
        hub.pool.cancel(id, now);
        return refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("could not store the job: {e}"),
        );
    }
    hub.jobs.insert(id, rec);
    info!(job = id, owner = %caller.name, "pool job submitted");
    hub.pump(now);
    let v = hub.job_view(&hub.jobs[&id]);
    Ok((v, token))
}

fn gpus_of(r: &SubmitRequest) -> u32 {
    let per_node = r
        .gpu
        .as_deref()
        .and_then(|s| s.parse::<GpuSpec>().ok())
        .map(|g| g.count_or(r.gpus))
        .unwrap_or(r.gpus);
    per_node * r.nodes.max(1)
}

/// The job, if the caller may see it.
fn visible<'a>(
    ps: &PoolShell,
    hub: &'a Hub,
    caller: &ApiCaller,
    id: &str,
) -> Result<&'a JobRec, ApiError> {
    ps.check_member(caller)?;
    let id: u64 = id.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("job id {id:?} is not a number"),
        )
    })?;
    let j = hub
        .jobs
        .get(&id)
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("no pool job {id}")))?;
    if j.stored.view.owner != caller.name && !ps.is_operator(caller) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("job {id} belongs to another engineer"),
        ));
    }
    Ok(j)
}

async fn show(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    Path(id): Path<String>,
) -> Response {
    let hub = lock(&shared.pool.hub);
    match visible(&shared.pool, &hub, &caller, &id) {
        Ok(j) => Json(hub.job_view(j)).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn cancel(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    Path(id): Path<String>,
) -> Response {
    let ps = &shared.pool;
    let mut hub = lock(&ps.hub);
    let id = match visible(ps, &hub, &caller, &id) {
        Ok(j) => j.stored.view.id,
        Err(r) => return r.into_response(),
    };
    let now = Instant::now();
    if hub.pool.cancel(id, now) {
        info!(job = id, by = %caller.name, "pool job cancelled");
        hub.end_job(id, "cancelled", unix_ms());
    }
    hub.pump(now);
    let v = hub.job_view(&hub.jobs[&id]);
    Json(v).into_response()
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
) -> Response {
    let ps = &shared.pool;
    if let Err(r) = ps.check_member(&caller) {
        return r.into_response();
    }
    let all = ps.is_operator(&caller);
    let hub = lock(&ps.hub);
    let v: Vec<JobView> = hub
        .jobs
        .values()
        .filter(|j| all || j.stored.view.owner == caller.name)
        .map(|j| hub.job_view(j))
        .collect();
    Json(v).into_response()
}

async fn pool_view(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
) -> Response {
    let ps = &shared.pool;
    if let Err(r) = ps.check_member(&caller) {
        return r.into_response();
    }
    Json(ps.view_for(&caller)).into_response()
}

impl PoolShell {
    /// Workers and the unfinished jobs, as `caller` may see them.
    fn view_for(&self, caller: &ApiCaller) -> PoolView {
        if let (None, Some(l)) = (self.leading(), &self.lease) {
            return self.stored_view(l);
        }
        let all = self.is_operator(caller);
        let hub = lock(&self.hub);
        let queue = hub
            .jobs
            .values()
            .filter(|j| !j.stored.finished())
            .map(|j| {
                let mut v = hub.job_view(j);
                if !all && v.owner != caller.name {
                    // Another engineer's job: where it runs and why it waits, not what it runs.
                    v.request.command = vec![];
                    v.request.env.clear();
                    v.request.workdir = None;
                }
                v
            })
            .collect();
        let workers = hub.workers.values().map(|w| w.view.clone()).collect();
        let policy = match self.settings.policy {
            PoolPolicy::Binpack => "binpack",
            PoolPolicy::Spread => "spread",
        };
        PoolView {
            workers,
            queue,
            policy: policy.into(),
        }
    }
}

impl PoolShell {
    /// The signed export of the records stored since `since_ms`: all of them (`all`, an
    /// operator), or `name`'s own (an engineer), with a manifest signed by this relay.
    pub(super) fn export(&self, all: bool, name: &str, since_ms: u64) -> Result<Export, String> {
        let hub = lock(&self.hub);
        let records = hub
            .store
            .usage_export(since_ms)
            .map_err(|e| e.to_string())?;
        let workers = hub.store.workers().map_err(|e| e.to_string())?;
        let records: Vec<SignedUsage> = records
            .into_iter()
            .filter(|r| all || r.record.engineer == name)
            .collect();
        let me = &self.usage;
        let mut relay_keys: BTreeMap<String, Vec<String>> =
            BTreeMap::from([(me.relay.clone(), vec![me.signer.public().to_string()])]);
        for r in &records {
            if let Some(k) = &r.coord_key {
                let keys = relay_keys.entry(r.relay.clone()).or_default();
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let manifest = Manifest {
            relay: me.relay.clone(),
            exported_ms: unix_ms(),
            since_ms,
            engineer: (!all).then(|| name.to_string()),
            seqs: Manifest::ranges(records.iter().map(|r| r.seq)),
            worker_keys: workers
                .into_iter()
                .filter(|w| !w.usage_keys.is_empty())
                .map(|w| (w.name, w.usage_keys))
                .collect(),
            relay_keys,
        };
        Ok(Export {
            manifest: SignedManifest::sign(manifest, &me.signer),
            records,
        })
    }

    /// Usage records that ended since `since_ms` (all of them; the caller filters).
    pub(super) fn usage_records(&self, since_ms: u64) -> Result<Vec<UsageRecord>, String> {
        lock(&self.hub)
            .store
            .usage_since(since_ms)
            .map_err(|e| e.to_string())
    }

    /// The usage records numbered after `seq` (the web view's earnings index).
    pub(super) fn usage_after(&self, seq: u64) -> Result<Vec<SignedUsage>, String> {
        let store = match &self.lease {
            Some(l) if self.leading().is_none() => lock(&l.store),
            _ => {
                return lock(&self.hub)
                    .store
                    .usage_after(seq)
                    .map_err(|e| e.to_string())
            }
        };
        store.usage_after(seq).map_err(|e| e.to_string())
    }

    /// Every worker and every job (finished too, with why the pending ones wait), for the
    /// web view: the scheduler's own state, or the store's on a fleet relay that does not
    /// schedule.
    pub(super) fn web_state(&self) -> (Vec<WorkerView>, Vec<JobView>) {
        if let (None, Some(l)) = (self.leading(), &self.lease) {
            let store = lock(&l.store);
            let workers = store.workers().unwrap_or_default();
            let jobs = store
                .jobs(false)
                .map(|js| js.into_iter().map(|j| j.view).collect())
                .unwrap_or_default();
            return (workers, jobs);
        }
        let hub = lock(&self.hub);
        let workers = hub
            .workers
            .values()
            .map(|w| {
                let mut v = w.view.clone();
                v.holders = hub.holders(&v.name, &v.inventory);
                v
            })
            .collect();
        let jobs = hub.jobs.values().map(|j| hub.job_view(j)).collect();
        (workers, jobs)
    }

    /// A number that moves whenever what [`PoolShell::web_state`] answers may have changed
    /// (the scheduler's writes, GPU readings that differ); `None` on a fleet relay that does
    /// not schedule (the holder writes the store: look again on a timer).
    pub(super) fn web_gen(&self) -> Option<u64> {
        if let (None, Some(_)) = (self.leading(), &self.lease) {
            return None;
        }
        let writes = lock(&self.hub).store.writes();
        Some(writes.wrapping_add(lock(&self.telemetry).changes()))
    }

    /// Whether a node with these tags is an operator of the pool (sees everything), and
    /// whether it may submit jobs (an engineer).
    pub(super) fn roles(&self, tags: &[String]) -> (bool, bool) {
        let c = ApiCaller {
            name: String::new(),
            tags: tags.to_vec(),
        };
        (self.is_operator(&c), self.may_submit(&c))
    }

    /// The pool as stored, for the operator of a fleet relay that does not schedule it
    /// (no wait reasons: only the scheduler knows them).
    fn stored_view(&self, l: &LeaseKeeper) -> PoolView {
        let holder = l.holder.read().unwrap_or_else(|p| p.into_inner()).clone();
        let policy = match holder {
            Some(h) => format!("(scheduled by relay {h}; stored state)"),
            None => "(no relay of the fleet schedules the pool right now)".into(),
        };
        lock(&l.store).view(policy.clone()).unwrap_or_else(|e| {
            warn!(error = %e, "could not read the pool's store");
            PoolView {
                workers: Vec::new(),
                queue: Vec::new(),
                policy,
            }
        })
    }
}

/// The caller of the operator's admin socket.
const ADMIN: &str = "@operator";

/// The operator's live view on the relay host: `STATE_DIR/admin.sock` (mode 0600, so only
/// the relay's user), one request line, one JSON line back: `pool` → the [`PoolView`] an
/// operator sees (`tunnel-relay pool list` asks it, and reads the store when the relay is
/// down); `reload` → the policies read again from the configuration file (`tunnel-relay
/// policy reload`; `server/reload.rs`), or `{"error": ...}`.
pub(super) async fn serve_admin(shared: Arc<Shared>, listener: tokio::net::UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            let mut br = tokio::io::BufReader::new(r).take(4096);
            if br.read_line(&mut line).await.is_err() {
                return;
            }
            let op = ApiCaller {
                name: ADMIN.into(),
                tags: vec![ADMIN.into()],
            };
            let answer = match line.trim() {
                "pool" => {
                    // A fleet relay that does not schedule reads the store (blocking).
                    let v = if shared.pool.lease.is_some() {
                        tokio::task::block_in_place(|| shared.pool.view_for(&op))
                    } else {
                        shared.pool.view_for(&op)
                    };
                    serde_json::to_string(&v)
                }
                "reload" => match super::reload::reload(&shared) {
                    Ok(r) => serde_json::to_string(&r),
                    Err(error) => serde_json::to_string(&ErrorBody { error }),
                },
                other => serde_json::to_string(&ErrorBody {
                    error: format!("unknown admin request {other:?}; expected `pool` or `reload`"),
                }),
            };
            if let Ok(mut a) = answer {
                a.push('\n');
                let _ = w.write_all(a.as_bytes()).await;
            }
        });
    }
}

#[derive(Debug, Deserialize)]
struct UsageQuery {
    #[serde(default)]
    since: u64,
}

async fn usage(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let ps = &shared.pool;
    if let Err(r) = ps.check_member(&caller) {
        return r.into_response();
    }
    let Ok(Query(q)) = q else {
        return err(StatusCode::BAD_REQUEST, "query must be `since=UNIX_MS`");
    };
    let all = ps.is_operator(&caller);
    let hub = lock(&ps.hub);
    match hub.store.usage_since(q.since) {
        Ok(v) => Json(
            v.into_iter()
                .filter(|u| all || u.engineer == caller.name)
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /v1/pool/usage/export?since=MS`: the records stored since then, numbered and signed,
/// with a manifest signed by this relay (an engineer's export has its own records only, and
/// its manifest says so).
async fn usage_export(
    State(shared): State<Arc<Shared>>,
    Extension(caller): Extension<ApiCaller>,
    q: Result<Query<UsageQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let ps = &shared.pool;
    if let Err(r) = ps.check_member(&caller) {
        return r.into_response();
    }
    let Ok(Query(q)) = q else {
        return err(StatusCode::BAD_REQUEST, "query must be `since=UNIX_MS`");
    };
    match ps.export(ps.is_operator(&caller), &caller.name, q.since) {
        Ok(e) => Json(e).into_response(),
        Err(e) => err(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The top-level fields in which two records differ, e.g. `rank, gpu_model`.
fn differing_fields(a: &UsageRecord, b: &UsageRecord) -> String {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return "?".into();
    };
    let v: Vec<&str> = a
        .iter()
        .filter(|(k, v)| b.get(k.as_str()) != Some(v))
        .map(|(k, _)| k.as_str())
        .collect();
    v.join(", ")
}

/// Serves one pool API stream (HTTP/1.1) as `caller`.
pub(super) async fn serve_api(
    shared: Arc<Shared>,
    caller: ApiCaller,
    send: SendStream,
    recv: RecvStream,
) {
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;
    let app = router(shared).layer(Extension(caller));
    let io = TokioIo::new(tokio::io::join(recv, send));
    let svc = TowerToHyperService::new(app);
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await
    {
        debug!(error = %e, "pool API stream ended with an error");
    }
}

// ---- a fleet: one scheduler, the holder of the lease ----

/// A fleet relay takes or renews the pool's scheduling lease every
/// [`LEASE_EVERY`]; when it gets a new holding it restores the pool from the
/// store and schedules it ([`take_over`]); when another relay holds it, it
/// stops. The relay holding the lease is remembered (API calls go there).
pub(super) async fn lease_loop(shared: Arc<Shared>) {
    let ps = &shared.pool;
    let Some(l) = &ps.lease else { return };
    let mut tick = tokio::time::interval(LEASE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stopping = shared.stopping.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            // A draining relay gave the lease up ([`PoolShell::release_lease`]): take no more.
            _ = stopping.wait_for(|s| *s) => return,
        }
        let sent = Instant::now();
        let lease = tokio::task::block_in_place(|| lock(&l.store).lease());
        match lease {
            Ok(Lease::Held(epoch)) => {
                *lock(&l.trusted_until) = Some(sent + LEASE_TRUST);
                if ps.leading() != Some(epoch) {
                    if let Err(e) = take_over(&shared, l, epoch) {
                        warn!(error = %e, epoch, "could not restore the pool to schedule it; releasing the lease");
                        *lock(&l.trusted_until) = None;
                        let _ = tokio::task::block_in_place(|| lock(&l.store).release_lease());
                    }
                }
            }
            Ok(Lease::Elsewhere) => {
                ps.step_down("another relay of the fleet holds the lease");
                // Who does (API calls go there).
                match tokio::task::block_in_place(|| lock(&l.store).lease_holder()) {
                    Ok(h) => {
                        let h = h.filter(|h| h.live).map(|h| h.relay);
                        *l.holder.write().unwrap_or_else(|p| p.into_inner()) = h;
                    }
                    Err(e) => debug!(error = %e, "could not read the pool lease's holder"),
                }
            }
            Err(e) => warn!(error = %e, "could not renew the pool's scheduling lease"),
        }
    }
}

/// This relay holds the lease in `epoch`: the pool is restored from the
/// store, as after a restart (workers away until their feed reports, placed
/// and running jobs back on their workers, the queue in order), with a store
/// connection whose writes are fenced by `epoch`; then the feeds open.
fn take_over(
    shared: &Arc<Shared>,
    l: &LeaseKeeper,
    epoch: i64,
) -> Result<(), crate::error::StateError> {
    let ps = &shared.pool;
    let hub = tokio::task::block_in_place(|| {
        let store = PoolStore::open_store(&l.dir, &l.store_cfg, &l.relay, epoch)?;
        Hub::load(
            store,
            &ps.settings,
            ps.overlay.clone(),
            epoch,
            ps.usage.clone(),
        )
    })?;
    {
        let mut h = lock(&ps.hub);
        *h = hub;
        h.pump(Instant::now());
    }
    ps.leading.send_replace(Some(epoch));
    info!(
        epoch,
        relay = %l.relay,
        "pool lease taken: this relay schedules the pool"
    );
    Ok(())
}

/// On the relay that schedules the pool: keeps a pool feed open to every
/// worker whose session is on another relay of the fleet (through the
/// relays' peer link: that relay opens `@pool` on the worker's connection,
/// [`peer_feed`]); a worker that moves gets a feed through its new relay.
pub(super) async fn remote_feeds(shared: Arc<Shared>) {
    if shared.pool.lease.is_none() {
        return;
    }
    let mut tasks: HashMap<(String, String), tokio::task::JoinHandle<()>> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(epoch) = shared.pool.leading() else {
            for (_, t) in tasks.drain() {
                t.abort();
            }
            continue;
        };
        let rows = tokio::task::block_in_place(|| lock(&shared.registry).remote_workers());
        let rows = match rows {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "could not list the workers on the fleet's other relays");
                continue;
            }
        };
        tasks.retain(|_, t| !t.is_finished());
        for w in rows {
            if !w.services.iter().any(|s| s == POOL_SERVICE) {
                continue;
            }
            let key = (w.name.clone(), w.relay.clone());
            if tasks.contains_key(&key) {
                continue;
            }
            let task = tokio::spawn(remote_feed(shared.clone(), w.name, w.relay, epoch));
            tasks.insert(key, task);
        }
    }
}

/// One worker's pool feed through relay `relay` of the fleet.
async fn remote_feed(shared: Arc<Shared>, worker: String, relay: String, epoch: i64) {
    let addrs = shared
        .fleet_relays
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&relay)
        .map(|r| r.addrs.clone());
    let Some(addrs) = addrs else { return };
    let opened = match super::peer_session(&shared, &relay, &addrs).await {
        Ok(peer) => peer
            .open_for(POOL_CALLER, shared.key.public(), &[], &worker, POOL_SERVICE)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match opened {
        Ok((send, recv)) => {
            info!(worker = %worker, relay = %relay, "pool feed through a fleet relay");
            run_feed(&shared, &worker, send, recv, epoch).await;
        }
        Err(e) => {
            debug!(worker = %worker, relay = %relay, error = %e, "could not open the pool feed through a fleet relay");
            // Asked again at the next round, not at once.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The fleet's scheduler (another relay: the connection holds the fleet's
/// key) asks for the pool feed of worker `target`, connected here: the feed
/// is opened on the worker's connection as `@pool` (the agent serves the
/// newest feed) and spliced to the asking relay.
pub(super) async fn peer_feed(
    shared: &Arc<Shared>,
    target: &str,
    mut send: SendStream,
    recv: RecvStream,
) {
    let conn = lock(&shared.routes).worker_conn(target);
    let opened = match conn {
        Some(c) => open_feed(&c).await.map_err(|e| {
            Rejection::new(
                Reason::ServiceUnavailable,
                format!("{target}: pool feed: {e}"),
            )
        }),
        None => Err(Rejection::new(
            Reason::NoSuchNode,
            format!("{target:?} is not connected to this relay"),
        )),
    };
    match opened {
        Ok((wsend, wrecv)) => {
            if write_message(&mut send, &Message::OpenOk).await.is_err() {
                return;
            }
            debug!(worker = %target, "pool feed for the fleet's scheduler");
            let _ = tokio::join!(
                quic_to_quic(recv, wsend, |_| {}),
                quic_to_quic(wrecv, send, |_| {})
            );
        }
        Err(rej) => {
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
        }
    }
}

/// How long an API call waits for a relay of the fleet to schedule the pool
/// (a takeover: the lease expires, then the next relay restores the pool).
const API_WAIT: Duration = Duration::from_secs(10);

/// A pool API stream (`Message::Api`) from `caller`, admitted here: served
/// here when this relay schedules the pool, else spliced to the relay that
/// does (`Message::PeerApi` over the relays' peer link, the caller's
/// identity with it). While nobody does, waits up to [`API_WAIT`].
pub(super) async fn api(
    shared: Arc<Shared>,
    caller: ApiCaller,
    caller_key: crate::keys::PublicKey,
    mut send: SendStream,
    recv: RecvStream,
) {
    let deadline = Instant::now() + API_WAIT;
    loop {
        if shared.pool.leading().is_some() {
            if write_message(&mut send, &Message::OpenOk).await.is_err() {
                return;
            }
            return serve_api(shared, caller, send, recv).await;
        }
        if let Some(holder) = shared.pool.scheduler() {
            match forward_api(&shared, &holder, &caller, caller_key).await {
                Ok((psend, precv)) => {
                    if write_message(&mut send, &Message::OpenOk).await.is_err() {
                        return;
                    }
                    debug!(caller = %caller.name, relay = %holder, "pool API call to the scheduling relay");
                    let _ = tokio::join!(
                        quic_to_quic(recv, psend, |_| {}),
                        quic_to_quic(precv, send, |_| {})
                    );
                    return;
                }
                Err(e) => {
                    debug!(relay = %holder, error = %e, "pool API: the scheduling relay did not take the call")
                }
            }
        }
        if Instant::now() >= deadline {
            let rej = Rejection::new(
                Reason::ServiceUnavailable,
                "no relay of the fleet schedules the pool right now (the lease is being taken over); try again in a few seconds",
            );
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pool API stream on relay `holder` for `caller`.
async fn forward_api(
    shared: &Arc<Shared>,
    holder: &str,
    caller: &ApiCaller,
    caller_key: crate::keys::PublicKey,
) -> Result<(SendStream, RecvStream), String> {
    let addrs = shared
        .fleet_relays
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(holder)
        .map(|r| r.addrs.clone())
        .ok_or_else(|| format!("relay {holder} is not among the fleet's live relays"))?;
    let peer = super::peer_session(shared, holder, &addrs)
        .await
        .map_err(|e| e.to_string())?;
    peer.open_api_for(&caller.name, caller_key, &caller.tags)
        .await
        .map_err(|e| e.to_string())
}

/// `Message::PeerApi` from another relay of the fleet: its engineer's pool
/// API call, served here if this relay schedules the pool.
pub(super) async fn peer_api(
    shared: Arc<Shared>,
    caller: ApiCaller,
    mut send: SendStream,
    recv: RecvStream,
) {
    if shared.pool.leading().is_none() {
        let rej = Rejection::new(
            Reason::ServiceUnavailable,
            "this relay does not schedule the pool (it lost the lease)",
        );
        let _ = write_message(&mut send, &Message::Rejected(rej)).await;
        let _ = send.finish();
        return;
    }
    if write_message(&mut send, &Message::OpenOk).await.is_err() {
        return;
    }
    serve_api(shared, caller, send, recv).await;
}
