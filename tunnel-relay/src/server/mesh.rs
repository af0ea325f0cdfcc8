//! The coordinator shell inside the relay: one [`Coordinator`] behind a
//! mutex, a bounded outgoing queue per node holding a control session, and
//! a writer thread that persists node records to SQLite.
//!
//! One control session: after admission, the node opens a bidirectional
//! stream whose first frame is [`Message::MeshJoin`]. The relay joins it to
//! the coordinator as the admitted identity (name from the registry, made a
//! DNS label; tags from the registry), answers [`Message::MeshAccepted`]
//! (STUN address, overlay prefixes), and from then on the stream carries
//! [`ControlMsg`] frames both ways: the node's snapshot and deltas out;
//! `EndpointReport`, `Ack` (resync) and `CallMeMaybe` in.
//!
//! Every coordinator call runs under the hub lock and returns an outbox; the
//! hub pushes each update into its recipient's queue with `try_send` before
//! releasing the lock, so per-node order equals version order, the lock is
//! never held across an await, and encoding happens in each session's own
//! task. A queue that overflows (a node too slow to read) drops that node's
//! session; it reconnects and resyncs with its version. A node's `Ack`s are
//! answered (with the missing deltas or a snapshot) at most
//! [`RESYNCS_PER_SEC`] a second after a burst of [`RESYNC_BURST`] (an Ack of
//! the current version needs no answer and is free); one more ends its
//! session as misbehaving. The changed record
//! goes to the writer thread in the same critical section (so writes are
//! applied in order), which commits batches in one transaction each.

use std::collections::HashMap;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::transport::{Connection, RecvStream, SendStream};
use quinn::VarInt;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use super::{lock, revoked_now, NodeCtx, Shared};
use crate::admission::TokenBucket;
use crate::config::RelayConfig;
use crate::coord::wire::{read_control, write_control_at, ControlIoError, ControlMsg};
use crate::coord::{
    clean_candidates, Candidate, CoordError, Coordinator, JoinRequest, NodeId, Outbox, Version,
};
use crate::error::{RelayError, StateError};
use crate::keys::PublicKey;
use crate::metrics::Metrics;
use crate::registry::{MeshWrite, Registry};
use crate::routes::Routes;
use crate::wire::{write_message, Message, Reason, Rejection};
use weft_proto::acl::AclPolicy;
use weft_proto::close::ResetCode;

/// Messages queued per node before its session is dropped as too slow.
pub const SESSION_QUEUE: usize = 4096;
/// Largest frame the relay reads from a node (endpoint reports, acks and
/// call-me-maybe are a few hundred bytes).
pub const MAX_NODE_FRAME: usize = 64 * 1024;
/// Resyncs (answers to a node's `Ack`: deltas or a whole snapshot) per
/// second per session. A node asks once per gap and waits for the answer.
pub const RESYNCS_PER_SEC: f64 = 1.0;
/// Resyncs a session may ask for at once before [`RESYNCS_PER_SEC`] applies.
pub const RESYNC_BURST: f64 = 4.0;

/// One node's live control session.
struct Slot {
    sid: u64,
    tx: mpsc::Sender<ControlMsg>,
    /// The session's resync limit.
    resyncs: TokenBucket,
    /// Dropped with the slot: tells the session task to end.
    _kill: oneshot::Sender<()>,
}

/// What the persistence thread is told.
enum Persist {
    Write(MeshWrite),
    Flush(oneshot::Sender<()>),
    /// A node's path report for the fleet's store (none: its session here ended).
    Paths(PublicKey, Option<Vec<weft_proto::control::PeerPath>>),
}

/// The coordinator and the sessions, under one lock.
struct Hub {
    coord: Coordinator,
    sessions: HashMap<NodeId, Slot>,
    next_sid: u64,
    persist: std_mpsc::Sender<Persist>,
    /// Other relays share the store: they read our records, online state included.
    shared: bool,
    /// The relay holding each remote node's session (from its record).
    homes: HashMap<NodeId, String>,
    /// Relays whose heartbeat stopped: their nodes count as offline here.
    dead: HashSet<String>,
    /// Other relays' records of nodes holding a session here (the node
    /// moved, or its old session lingers): applied when our session ends.
    parked: HashMap<NodeId, crate::registry::MeshChange>,
    /// Each node's last path report (peer codec 2): its peers with a WireGuard session and
    /// whether each runs direct; forgotten when its session here ends.
    paths: HashMap<NodeId, Vec<weft_proto::control::PeerPath>>,
    /// Reports that changed something (the web view's cue).
    path_changes: u64,
}

/// What the pool needs of the mesh: a node's overlay address (the gang variables), and
/// giving a running gang's members a group tag (they reach each other while it runs).
#[derive(Clone)]
pub(super) struct MeshHandle {
    hub: Arc<Mutex<Hub>>,
    routes: Arc<Mutex<Routes<Connection>>>,
    metrics: Arc<Metrics>,
}

impl MeshHandle {
    fn id(hub: &Hub, name: &str) -> Option<NodeId> {
        hub.coord
            .id_by_name(name)
            .or_else(|| hub.coord.id_by_name(&name.to_ascii_lowercase()))
    }

    /// The overlay IPv4 of the node registered as `name` (its mesh name is the DNS-label form).
    pub(super) fn ipv4(&self, name: &str) -> Option<std::net::Ipv4Addr> {
        let hub = lock(&self.hub);
        let id = Self::id(&hub, name)?;
        hub.coord.record(id).map(|r| r.ipv4)
    }

    /// Gives node `name` exactly these group tags (`pool-job-N`): peer maps, filters and
    /// the relay path follow. False when `name` is not on the mesh (yet: a cluster's owner
    /// may join it later) or the tags could not be set; the caller tries again then.
    pub(super) fn set_groups(&self, name: &str, groups: &[String]) -> bool {
        let key = {
            let mut hub = lock(&self.hub);
            let Some(id) = Self::id(&hub, name) else {
                return false;
            };
            match hub.coord.set_extra_tags(id, groups) {
                Ok(out) => {
                    hub.persist_record(id);
                    hub.deliver(out, &self.metrics);
                }
                Err(e) => {
                    warn!(node = %name, error = %e, "could not set the gang's group tags");
                    return false;
                }
            }
            hub.coord.record(id).map(|r| r.key)
        };
        if let Some(key) = key {
            lock(&self.routes).set_groups(key, groups.to_vec());
        }
        true
    }
}

/// The mesh part of the relay's shared state.
pub(super) struct Mesh {
    hub: Arc<Mutex<Hub>>,
    /// Where STUN is answered (as bound).
    stun: Option<SocketAddr>,
}

impl Mesh {
    /// The names of the mesh nodes online now (here, or on a live relay of the fleet).
    pub(super) fn online_names(&self) -> Vec<String> {
        let hub = lock(&self.hub);
        hub.coord
            .records()
            .filter(|r| hub.coord.is_online(r.id))
            .map(|r| r.name.clone())
            .collect()
    }

    /// Moves whenever what [`Mesh::online_names`], a node's record or [`Mesh::paths`]
    /// could show changes.
    pub(super) fn web_gen(&self) -> u64 {
        let hub = lock(&self.hub);
        hub.coord.changes().wrapping_add(hub.path_changes)
    }

    /// The paths nodes with a session here reported: (node, peer, direct).
    pub(super) fn paths(&self) -> Vec<(PublicKey, PublicKey, bool)> {
        let hub = lock(&self.hub);
        hub.paths
            .iter()
            .filter_map(|(id, ps)| Some((hub.coord.record(*id)?.key, ps)))
            .flat_map(|(k, ps)| ps.iter().map(move |p| (k, p.peer, p.direct)))
            .collect()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Mesh {
    /// Replaces the mesh ACL and sends every node whose peers or filter
    /// changed its delta; returns how many updates went out. `then` runs
    /// under the same lock (the relay path's copy of the ACL changes with it).
    pub(super) fn set_acl(
        &self,
        acl: AclPolicy,
        metrics: &Metrics,
        then: impl FnOnce(),
    ) -> Result<usize, CoordError> {
        let mut hub = lock(&self.hub);
        let out = hub.coord.set_policy(acl)?;
        let n = out.len();
        hub.deliver(out, metrics);
        hub.gauges(metrics);
        then();
        Ok(n)
    }

    /// Restores the coordinator from the registry (records of revoked or
    /// unknown nodes are dropped) with a fresh epoch, and starts the writer.
    /// On a store shared by a fleet, ids come from keys, this relay's
    /// records of a previous life are marked offline, and
    /// `fleet_loop` (server.rs) must run to apply the other relays' records.
    pub(super) fn open(
        dir: &std::path::Path,
        registry: &Registry,
        config: &RelayConfig,
        stun: Option<SocketAddr>,
        store: &crate::registry::Store,
        relay: &str,
    ) -> Result<Mesh, RelayError> {
        let mut records = Vec::new();
        let mut dropped = Vec::new();
        for rec in registry.mesh_records()? {
            if registry.is_revoked(&rec.key)? {
                dropped.push(rec.id);
            } else {
                records.push(rec);
            }
        }
        let n = records.len();
        let epoch = unix_ms();
        let mut coord = Coordinator::restore(config.mesh.clone(), epoch, records)
            .map_err(|source| RelayError::MeshRestore { source })?;
        let shared = registry.is_shared();
        let mut writer = Registry::open_store(dir, store, relay)?;
        if shared {
            coord.use_key_ids();
            writer.mesh_offline_mine()?;
        }
        let (tx, rx) = std_mpsc::channel::<Persist>();
        for id in dropped {
            let _ = tx.send(Persist::Write(MeshWrite::Delete(id)));
        }
        std::thread::Builder::new()
            .name("mesh-persist".into())
            .spawn(move || persist_loop(&mut writer, &rx))
            .map_err(|e| {
                RelayError::State(StateError::Io {
                    path: dir.join("registry.sqlite"),
                    source: e,
                })
            })?;
        info!(nodes = n, epoch, "mesh coordinator restored");
        Ok(Mesh {
            hub: Arc::new(Mutex::new(Hub {
                coord,
                sessions: HashMap::new(),
                next_sid: 1,
                persist: tx,
                shared,
                homes: HashMap::new(),
                dead: HashSet::new(),
                parked: HashMap::new(),
                paths: HashMap::new(),
                path_changes: 0,
            })),
            stun,
        })
    }

    /// Applies mesh records read from the shared store's feed: the other
    /// relays' nodes join, change and leave this relay's coordinator, and
    /// the peers holding sessions here get the deltas. Records this relay
    /// (`me`) wrote are skipped; those of nodes holding a session here are
    /// parked until that session ends.
    pub(super) fn apply_changes(
        &self,
        rows: Vec<crate::registry::MeshChange>,
        me: &str,
        metrics: &Metrics,
    ) {
        let mut hub = lock(&self.hub);
        for c in rows.into_iter().filter(|c| c.relay != me) {
            hub.apply_remote(c, metrics);
        }
        hub.gauges(metrics);
    }

    /// The mesh nodes online on another live relay of the fleet, with that
    /// relay and their tags: where relayed packets for them go
    /// ([`crate::routes::Routes::set_remote`]).
    pub(super) fn remote_nodes(&self) -> crate::routes::RemoteNodes {
        let hub = lock(&self.hub);
        let mut relays: HashMap<&str, std::sync::Arc<str>> = HashMap::new();
        hub.homes
            .iter()
            .filter(|(id, r)| {
                !hub.dead.contains(*r)
                    && !hub.sessions.contains_key(*id)
                    && hub.coord.is_online(**id)
            })
            .filter_map(|(id, r)| {
                let rec = hub.coord.record(*id)?;
                let relay = relays
                    .entry(r.as_str())
                    .or_insert_with(|| std::sync::Arc::from(r.as_str()))
                    .clone();
                Some((rec.key, (relay, rec.tags.clone())))
            })
            .collect()
    }

    /// The relays whose heartbeat stopped (`dead`): their nodes go offline
    /// in every peer map here. Returns whether a relay came back (the
    /// caller reads the feed again from the start: its nodes' records).
    pub(super) fn set_dead_relays(&self, dead: HashSet<String>, metrics: &Metrics) -> bool {
        let mut hub = lock(&self.hub);
        if hub.dead == dead {
            return false;
        }
        let revived = hub.dead.iter().any(|r| !dead.contains(r));
        let newly: Vec<NodeId> = hub
            .homes
            .iter()
            .filter(|(_, r)| dead.contains(*r) && !hub.dead.contains(*r))
            .map(|(id, _)| *id)
            .collect();
        for r in dead.iter().filter(|r| !hub.dead.contains(*r)) {
            warn!(relay = %r, "fleet relay stopped beating; its nodes count as offline");
        }
        for id in newly {
            if hub.sessions.contains_key(&id) {
                continue;
            }
            if let Ok(out) = hub.coord.set_online(id, false) {
                hub.deliver(out, metrics);
            }
        }
        hub.dead = dead;
        revived
    }

    /// The pool's handle on the mesh (overlay addresses, gang group tags).
    pub(super) fn handle(
        &self,
        routes: Arc<Mutex<Routes<Connection>>>,
        metrics: Arc<Metrics>,
    ) -> MeshHandle {
        MeshHandle {
            hub: self.hub.clone(),
            routes,
            metrics,
        }
    }

    /// Removes nodes whose keys were revoked: every peer forgets them, their
    /// sessions end, their records are deleted.
    pub(super) fn remove_keys(&self, keys: &HashSet<PublicKey>, metrics: &Metrics) {
        let mut hub = lock(&self.hub);
        for key in keys {
            let Some(id) = hub.coord.id_of(key) else {
                continue;
            };
            match hub.coord.remove(id) {
                Ok((rec, out)) => {
                    info!(node = %rec.name, key = %key.short(), "revoked node removed from the mesh");
                    hub.sessions.remove(&id);
                    hub.persist(MeshWrite::Delete(id));
                    hub.deliver(out, metrics);
                }
                Err(e) => debug!(error = %e, "mesh removal"),
            }
        }
        hub.gauges(metrics);
    }

    /// Waits until every record change so far is committed (shutdown).
    pub(super) async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        let sent = lock(&self.hub).persist.send(Persist::Flush(tx)).is_ok();
        if sent {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), rx).await;
        }
    }
}

/// Commits the hub's record changes in batches, in order. A shared store
/// that fails (PostgreSQL restarting) keeps the batch and tries again every
/// half second with what came since, so no change is lost; SQLite's
/// failures are logged and the batch dropped, as before.
fn persist_loop(reg: &mut Registry, rx: &std_mpsc::Receiver<Persist>) {
    let mut pending: Vec<MeshWrite> = Vec::new();
    let mut failing = false;
    loop {
        let first = if pending.is_empty() {
            match rx.recv() {
                Ok(p) => Some(p),
                Err(_) => return,
            }
        } else {
            match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                Ok(p) => Some(p),
                Err(std_mpsc::RecvTimeoutError::Timeout) => None,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        };
        let mut acks = Vec::new();
        for p in first.into_iter().chain(rx.try_iter()) {
            match p {
                Persist::Write(w) => pending.push(w),
                Persist::Flush(a) => acks.push(a),
                // The next report replaces a lost one: no retry.
                Persist::Paths(key, paths) => {
                    if let Err(e) = reg.save_paths(&key, paths.as_deref()) {
                        debug!(error = %e, node = %key.short(), "could not store a path report");
                    }
                }
            }
        }
        if !pending.is_empty() {
            match reg.save_mesh(&pending) {
                Ok(()) => {
                    if failing {
                        info!(changes = pending.len(), "mesh node records persisted again");
                    }
                    failing = false;
                    pending.clear();
                }
                Err(e) if reg.is_shared() => {
                    if !failing {
                        warn!(error = %e, changes = pending.len(), "could not persist mesh node records; retrying");
                    }
                    failing = true;
                }
                Err(e) => {
                    warn!(error = %e, changes = pending.len(), "could not persist mesh node records");
                    pending.clear();
                }
            }
        }
        for a in acks {
            let _ = a.send(());
        }
    }
}

impl Hub {
    fn persist(&self, w: MeshWrite) {
        if self.persist.send(Persist::Write(w)).is_err() {
            warn!("mesh persistence thread is gone; record not saved");
        }
    }

    fn persist_record(&self, id: NodeId) {
        if let Some(rec) = self.coord.record(id) {
            self.persist(MeshWrite::Upsert(rec.clone(), self.coord.is_online(id)));
        }
    }

    /// One row of another relay's writes (see `Mesh::apply_changes`).
    fn apply_remote(&mut self, c: crate::registry::MeshChange, metrics: &Metrics) {
        let id = c.rec.id;
        if self.sessions.contains_key(&id) {
            self.parked.insert(id, c);
            return;
        }
        let name = c.rec.name.clone();
        let out = if c.deleted {
            self.homes.remove(&id);
            match self.coord.remove(id) {
                Ok((_, out)) => {
                    info!(node = %name, relay = %c.relay, "left the mesh on another relay");
                    out
                }
                Err(_) => return,
            }
        } else {
            let online = c.online && !self.dead.contains(&c.relay);
            self.homes.insert(id, c.relay.clone());
            match self.coord.apply_remote(c.rec, online, Some(&c.relay)) {
                Ok(out) => {
                    debug!(node = %name, relay = %c.relay, online = c.online, "record from another relay");
                    out
                }
                Err(e) => {
                    warn!(node = %name, relay = %c.relay, error = %e, "another relay's mesh record refused");
                    return;
                }
            }
        };
        self.deliver(out, metrics);
    }

    /// Queues every update for its recipient if it holds a session; a full
    /// queue drops that session (its task resets the stream).
    fn deliver(&mut self, out: Outbox, metrics: &Metrics) {
        for (to, u) in out {
            self.send_to(to, ControlMsg::from(u), metrics);
        }
    }

    fn send_to(&mut self, to: NodeId, msg: ControlMsg, metrics: &Metrics) -> bool {
        let Some(slot) = self.sessions.get(&to) else {
            return false;
        };
        match slot.tx.try_send(msg) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let name = self.coord.record(to).map(|r| r.name.clone());
                info!(node = ?name, queue = SESSION_QUEUE, "mesh session too slow; dropping it (the node resyncs)");
                metrics.mesh_sessions_dropped.inc();
                self.sessions.remove(&to);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.sessions.remove(&to);
                false
            }
        }
    }

    fn gauges(&self, metrics: &Metrics) {
        metrics.mesh_nodes.set(self.coord.len() as i64);
        metrics.mesh_sessions.set(self.sessions.len() as i64);
    }

    fn mine(&self, id: NodeId, sid: u64) -> bool {
        self.sessions.get(&id).is_some_and(|s| s.sid == sid)
    }

    /// Gives `id` a new session slot (a previous session of the node ends
    /// when its slot goes); returns the session id.
    fn open_slot(
        &mut self,
        id: NodeId,
        tx: mpsc::Sender<ControlMsg>,
        kill: oneshot::Sender<()>,
        now: Instant,
    ) -> u64 {
        let sid = self.next_sid;
        self.next_sid += 1;
        let resyncs = TokenBucket::new(RESYNCS_PER_SEC, RESYNC_BURST, now);
        let slot = Slot {
            sid,
            tx,
            resyncs,
            _kill: kill,
        };
        self.sessions.insert(id, slot);
        sid
    }

    /// Answers the node's `Ack` of `have` at `now` with what it misses,
    /// within its session's resync limit (an Ack of the current version is
    /// answered with nothing, and free); returns how many updates were queued.
    fn resync(
        &mut self,
        id: NodeId,
        have: Version,
        now: Instant,
        metrics: &Metrics,
    ) -> Result<usize, End> {
        if self.coord.version_of(id) == Some(have) {
            return Ok(0);
        }
        let Some(slot) = self.sessions.get_mut(&id) else {
            return Err(End::Killed);
        };
        if !slot.resyncs.take(now) {
            return Err(End::Protocol(format!(
                "resync requests over the limit ({RESYNC_BURST} at once, {RESYNCS_PER_SEC} a second)"
            )));
        }
        let updates = self
            .coord
            .sync(id, Some(have))
            .map_err(|e| End::Protocol(e.to_string()))?;
        let n = updates.len();
        for u in updates {
            if !self.send_to(id, ControlMsg::from(u), metrics) {
                return Err(End::Killed);
            }
        }
        Ok(n)
    }
}

/// Why a session ended.
#[derive(Debug)]
enum End {
    /// The stream or connection failed, or the node finished it.
    Io(ControlIoError),
    /// Writing the answer failed.
    Write(crate::wire::FrameError),
    /// The node sent something invalid.
    Protocol(String),
    /// Dropped by the hub (too slow, superseded, removed).
    Killed,
}

/// What a node's `MeshJoin` asked for.
pub(super) struct Join {
    /// The peer-map version it holds.
    pub since: Option<Version>,
    /// Its candidates.
    pub endpoints: Vec<Candidate>,
    /// The newest peer codec it reads: its frames are written in the lower
    /// of that and ours.
    pub peer_codec: u8,
}

/// Serves one mesh control stream whose `MeshJoin` was just read.
pub(super) async fn serve_session(
    shared: Arc<Shared>,
    ctx: NodeCtx,
    mut send: SendStream,
    mut recv: RecvStream,
    join: Join,
) {
    let Join {
        since,
        endpoints,
        peer_codec,
    } = join;
    let codec = peer_codec.min(weft_proto::control::PEER_CODEC);
    let metrics = shared.metrics.clone();
    let mesh = &shared.mesh;
    let refuse = |reason, detail: String| Rejection::new(reason, detail);
    // A revocation committed between this check and the join below is still
    // caught: the join's record write changes the registry's data_version,
    // so the revocation watcher re-reads the revoked keys within 0.5 s and
    // removes the node again.
    let rejection = if revoked_now(&shared, &ctx.key).await {
        Some(refuse(Reason::NodeRevoked, format!("node {:?}", ctx.name)))
    } else {
        None
    };
    let (tx, mut rx) = mpsc::channel::<ControlMsg>(SESSION_QUEUE);
    let (kill_tx, mut kill_rx) = oneshot::channel::<()>();
    let joined = match rejection {
        Some(r) => Err(r),
        None => {
            let mut hub = lock(&mesh.hub);
            let name = hub.coord.suggest_name(&ctx.name, &ctx.key);
            let req = JoinRequest {
                key: ctx.key,
                name,
                tags: ctx.tags.clone(),
                endpoints,
                since,
                home: Some(shared.config.relay_name()),
            };
            match hub.coord.join(req) {
                Ok((id, out)) => {
                    hub.homes.remove(&id);
                    hub.parked.remove(&id);
                    let sid = hub.open_slot(id, tx, kill_tx, Instant::now());
                    hub.persist_record(id);
                    hub.deliver(out, &metrics);
                    hub.gauges(&metrics);
                    let addr = hub.coord.record(id).map(|r| (r.name.clone(), r.ipv4));
                    Ok((id, sid, addr))
                }
                Err(e) => Err(refuse(Reason::BadRequest, join_error(&e))),
            }
        }
    };
    let (id, sid) = match joined {
        Ok((id, sid, addr)) => {
            let (mesh_name, ipv4) = addr.unzip();
            info!(node = %ctx.name, key = %ctx.key.short(), mesh_name = ?mesh_name, ipv4 = ?ipv4, since = ?since, "joined the mesh");
            (id, sid)
        }
        Err(rej) => {
            info!(node = %ctx.name, key = %ctx.key.short(), reason = rej.reason.as_str(), detail = %rej.detail, "mesh join refused");
            metrics.refused(rej.reason);
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
            return;
        }
    };
    lock(&shared.routes).set_mesh_conn(ctx.id, ctx.tags.clone());
    let accepted = Message::MeshAccepted {
        stun: mesh.stun,
        ipv4_pool: shared.config.mesh.ipv4_pool,
        ipv6_prefix: shared.config.mesh.ipv6_prefix,
        // From 2 on the node may send path reports: say so (older nodes get the old form).
        peer_codec: if codec >= 2 { codec } else { 0 },
    };
    let writer = async {
        if let Err(e) = write_message(&mut send, &accepted).await {
            return End::Write(e);
        }
        loop {
            tokio::select! {
                biased;
                _ = &mut kill_rx => return End::Killed,
                m = rx.recv() => match m {
                    Some(m) => {
                        if let Err(e) = write_control_at(&mut send, &m, codec).await {
                            return End::Io(e);
                        }
                    }
                    None => return End::Killed,
                },
            }
        }
    };
    let reader = async {
        loop {
            let msg = match read_control(&mut recv, MAX_NODE_FRAME).await {
                Ok(m) => m,
                Err(ControlIoError::Wire(w)) => return End::Protocol(w.to_string()),
                Err(e) => return End::Io(e),
            };
            if let Err(e) = handle_from_node(&shared, &ctx, id, sid, msg) {
                return e;
            }
        }
    };
    let end: End = tokio::select! {
        e = writer => e,
        e = reader => e,
    };
    let code = match &end {
        End::Protocol(why) => {
            info!(node = %ctx.name, error = %why, "bad mesh control message; closing this stream");
            ResetCode::Protocol
        }
        End::Killed => {
            let hub = lock(&mesh.hub);
            if hub.sessions.contains_key(&id) || hub.coord.record(id).is_none() {
                ResetCode::Superseded
            } else {
                ResetCode::Slow
            }
        }
        End::Io(e) => {
            debug!(node = %ctx.name, error = %e, "mesh control stream ended");
            ResetCode::Ended
        }
        End::Write(e) => {
            debug!(node = %ctx.name, error = %e, "mesh control stream ended");
            ResetCode::Ended
        }
    };
    let _ = send.reset(VarInt::from_u32(code.code()));
    let _ = recv.stop(VarInt::from_u32(code.code()));
    let mut hub = lock(&mesh.hub);
    let superseded = hub.sessions.get(&id).is_some_and(|s| s.sid != sid);
    if !superseded {
        hub.sessions.remove(&id);
        if hub.paths.remove(&id).is_some() {
            hub.path_changes += 1;
            if hub.shared {
                let _ = hub.persist.send(Persist::Paths(ctx.key, None));
            }
        }
        if let Ok(out) = hub.coord.set_online(id, false) {
            hub.deliver(out, &metrics);
            if hub.shared {
                hub.persist_record(id);
            }
        }
        // The node's record from the relay it moved to, if one came meanwhile.
        if let Some(c) = hub.parked.remove(&id) {
            hub.apply_remote(c, &metrics);
        }
    }
    hub.gauges(&metrics);
    info!(node = %ctx.name, superseded, "left the mesh session");
}

fn join_error(e: &CoordError) -> String {
    match e {
        CoordError::BadTag { .. } | CoordError::TooManyTags(_) => {
            format!("{e}: mesh tags must be lowercase DNS labels (issue a token with such a tag)")
        }
        other => other.to_string(),
    }
}

/// One message from the node, under the hub lock.
fn handle_from_node(
    shared: &Shared,
    ctx: &NodeCtx,
    id: NodeId,
    sid: u64,
    msg: ControlMsg,
) -> Result<(), End> {
    let metrics = &shared.metrics;
    let mut hub = lock(&shared.mesh.hub);
    if !hub.mine(id, sid) {
        return Err(End::Killed);
    }
    match msg {
        ControlMsg::EndpointReport(c) => {
            let before = hub.coord.record(id).map(|r| r.endpoints.clone());
            match hub.coord.update_endpoints(id, &c) {
                Ok(out) => {
                    let after = hub.coord.record(id).map(|r| &r.endpoints);
                    if before.as_ref() != after {
                        debug!(node = %ctx.name, endpoints = ?after, "endpoints changed");
                        hub.persist_record(id);
                    }
                    hub.deliver(out, metrics);
                }
                Err(e) => return Err(End::Protocol(e.to_string())),
            }
        }
        ControlMsg::Ack(v) => {
            let updates = hub.resync(id, v, Instant::now(), metrics)?;
            debug!(node = %ctx.name, have = ?v, updates, "resync");
        }
        ControlMsg::CallMeMaybe { peer, endpoints } => {
            match hub.coord.call_me_maybe_target(id, &peer) {
                Some(to) => {
                    let fwd = ControlMsg::CallMeMaybe {
                        peer: ctx.key,
                        endpoints: clean_candidates(&endpoints),
                    };
                    let sent = hub.send_to(to, fwd, metrics);
                    debug!(node = %ctx.name, to = %peer.short(), sent, "call-me-maybe");
                    metrics.mesh_call_me_maybe(if sent { "forwarded" } else { "offline" });
                }
                None => {
                    debug!(node = %ctx.name, to = %peer.short(), "call-me-maybe not allowed");
                    metrics.mesh_call_me_maybe("refused");
                }
            }
        }
        ControlMsg::PathReport(mut paths) => {
            paths.sort();
            paths.dedup_by_key(|p| p.peer);
            if hub.paths.get(&id) != Some(&paths) {
                debug!(node = %ctx.name, peers = paths.len(), direct = paths.iter().filter(|p| p.direct).count(), "paths reported");
                if hub.shared {
                    let _ = hub
                        .persist
                        .send(Persist::Paths(ctx.key, Some(paths.clone())));
                }
                hub.paths.insert(id, paths);
                hub.path_changes += 1;
            }
        }
        ControlMsg::Snapshot(_) | ControlMsg::Delta(_) => {
            return Err(End::Protocol("a node sent a peer-map update".into()));
        }
    }
    hub.gauges(metrics);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::CoordConfig;
    use crate::keys::StaticKey;

    fn hub() -> (Hub, std_mpsc::Receiver<Persist>) {
        let (tx, rx) = std_mpsc::channel();
        let coord = match Coordinator::new(CoordConfig::default(), 7) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        let h = Hub {
            coord,
            sessions: HashMap::new(),
            next_sid: 1,
            persist: tx,
            shared: false,
            homes: HashMap::new(),
            dead: HashSet::new(),
            parked: HashMap::new(),
            paths: HashMap::new(),
            path_changes: 0,
        };
        (h, rx)
    }

    fn join(h: &mut Hub, tag: &str, name: &str) -> (NodeId, Outbox) {
        let req = JoinRequest {
            key: StaticKey::generate().public(),
            name: name.into(),
            tags: vec![tag.into()],
            endpoints: vec![],
            since: None,
            home: None,
        };
        match h.coord.join(req) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        }
    }

    fn slot(
        h: &mut Hub,
        id: NodeId,
        cap: usize,
    ) -> (mpsc::Receiver<ControlMsg>, oneshot::Receiver<()>) {
        let (tx, rx) = mpsc::channel(cap);
        let (kill, killed) = oneshot::channel();
        h.open_slot(id, tx, kill, Instant::now());
        (rx, killed)
    }

    #[test]
    fn a_flood_of_acks_gets_at_most_the_resync_limit_of_answers() {
        let (mut h, _persist) = hub();
        let m = Metrics::new();
        let (a, _) = join(&mut h, "engineer", "a");
        let (mut rx, _killed) = slot(&mut h, a, SESSION_QUEUE);
        let t0 = Instant::now();
        // A thousand stale Acks at once: each answered one would be a snapshot.
        let answers: Vec<Result<usize, End>> = (0..1000)
            .map(|_| h.resync(a, Version::default(), t0, &m))
            .take_while(|r| r.is_ok())
            .collect();
        assert_eq!(answers.len(), RESYNC_BURST as usize);
        assert!(matches!(
            h.resync(a, Version::default(), t0, &m),
            Err(End::Protocol(_))
        ));
        let sent = std::iter::from_fn(|| rx.try_recv().ok()).collect::<Vec<_>>();
        assert_eq!(sent.len(), RESYNC_BURST as usize);
        assert!(sent.iter().all(|s| matches!(s, ControlMsg::Snapshot(_))));
        // Acks of the version it holds cost nothing and are answered with nothing.
        let current = h.coord.version_of(a).unwrap_or_default();
        assert!((0..1000).all(|_| matches!(h.resync(a, current, t0, &m), Ok(0))));
        assert!(rx.try_recv().is_err());

        // A node that asks at the allowed pace is always answered.
        let (b, _) = join(&mut h, "engineer", "b");
        let (mut rx, _killed) = slot(&mut h, b, SESSION_QUEUE);
        let t1 = Instant::now();
        for i in 0..60u64 {
            let at = t1 + std::time::Duration::from_secs_f64(i as f64 / RESYNCS_PER_SEC);
            assert!(h.resync(b, Version::default(), at, &m).is_ok(), "ack {i}");
        }
        assert_eq!(std::iter::from_fn(|| rx.try_recv().ok()).count(), 60);
    }

    #[test]
    fn a_full_queue_drops_only_that_session_and_others_get_every_delta_in_order() {
        let (mut h, _persist) = hub();
        let m = Metrics::new();
        let (slow, _) = join(&mut h, "engineer", "slow");
        let (_slow_rx, mut slow_killed) = slot(&mut h, slow, 1);
        let (fast, _) = join(&mut h, "engineer", "fast");
        let (mut fast_rx, mut fast_killed) = slot(&mut h, fast, 16);
        for n in ["w1", "w2", "w3"] {
            let (_, out) = join(&mut h, "worker", n);
            h.deliver(out, &m);
        }
        assert!(!h.sessions.contains_key(&slow), "overflowing session kept");
        assert!(matches!(
            slow_killed.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert_eq!(m.mesh_sessions_dropped.get(), 1);
        assert!(h.sessions.contains_key(&fast));
        assert!(matches!(
            fast_killed.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        let seqs: Vec<u64> = std::iter::from_fn(|| fast_rx.try_recv().ok())
            .map(|msg| match msg {
                ControlMsg::Delta(d) => d.version.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        // The slow node resyncs from what it saw: the deltas it missed.
        let missed = match h.coord.sync(slow, Some(Version { epoch: 7, seq: 1 })) {
            Ok(u) => u,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(missed.len(), 2);
    }

    #[test]
    fn records_reach_the_writer_in_order() {
        let (mut h, persist) = hub();
        let (a, _) = join(&mut h, "worker", "a");
        h.persist_record(a);
        let (rec, _) = match h.coord.remove(a) {
            Ok(x) => x,
            Err(e) => panic!("{e}"),
        };
        h.persist(MeshWrite::Delete(a));
        let got: Vec<MeshWrite> = persist
            .try_iter()
            .filter_map(|p| match p {
                Persist::Write(w) => Some(w),
                Persist::Flush(_) | Persist::Paths(..) => None,
            })
            .collect();
        assert_eq!(
            got,
            vec![MeshWrite::Upsert(rec, true), MeshWrite::Delete(a)]
        );
    }
}
