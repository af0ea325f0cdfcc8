//! The relay server shell: QUIC endpoint, admission (Noise + registry), the
//! routing table of connected workers, and tunnel splicing.
//!
//! Admission of one connection: rate limit per source IP → QUIC/TLS →
//! first bidi stream → Noise IK message 1 (client key + [`Hello`]) →
//! registry (known key, or a valid token that is then used once) → Noise
//! message 2 (Accepted / Rejected with reason), all within the handshake
//! timeout. A tunnel: the engineer opens a bidi stream with [`Message::Open`];
//! the relay re-checks revocation, policy, services and stream limits, opens
//! a bidi stream to the worker with [`Message::Incoming`], relays the
//! worker's answer, then splices the two streams. A stream that starts with
//! [`Message::MeshJoin`] is a mesh control session instead (`server/mesh.rs`).

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use quinn::{Endpoint, VarInt};
use sha2::{Digest, Sha256};
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use crate::admission::RateLimiter;
use crate::config::RelayConfig;
use crate::error::{ProtoError, RelayError, StateError};
use crate::keys::{PublicKey, StaticKey};
use crate::metrics::{self, Metrics};
use crate::noise;
use crate::registry::{unix_now, Registry};
use crate::relay_path;
use crate::routes::{Opener, Routes, WorkerRoute};
use crate::splice::quic_to_quic;
use crate::tls;
use crate::transport::{Connection, RecvStream, SendStream};
use crate::wire::{
    read_message, write_message, Hello, Message, Reason, Rejection, RelayEntry, Target,
    PROTOCOL_VERSION,
};

mod fastpath;
mod mesh;
mod pool;
mod reload;
mod web;

pub use mesh::{MAX_NODE_FRAME, RESYNCS_PER_SEC, RESYNC_BURST, SESSION_QUEUE};

pub use weft_proto::close::{CloseCode, ResetCode};

/// Bidirectional streams a connection may open before admission (the
/// control stream and a little slack).
const PRE_ADMISSION_STREAMS: u32 = 4;
/// Streams an engineer may open beyond the per-node limit, so the relay can
/// refuse with `limit exceeded` instead of QUIC silently blocking the opener.
const STREAM_HEADROOM: u32 = 16;

/// Everything `serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// State directory (identity key, certificate, registry).
    pub state_dir: PathBuf,
    /// Configuration.
    pub config: RelayConfig,
    /// The file `config` came from, read again on `SIGHUP` or `policy
    /// reload` for its policies (`None`: defaults, nothing to reload).
    pub config_path: Option<PathBuf>,
}

/// File names inside the relay's state directory.
pub mod files {
    /// The relay's X25519 private key (0600).
    pub const IDENTITY: &str = "identity.key";
    /// The operator's local socket (`tunnel-relay pool list` asks it; 0600).
    pub const ADMIN_SOCKET: &str = "admin.sock";
    /// The address `serve` last bound (used by `token create` as a fallback).
    pub const LISTEN_ADDR: &str = "listen.addr";
    /// The address the STUN responder bound.
    pub const STUN_ADDR: &str = "stun.addr";
}

#[derive(Clone)]
struct NodeCtx {
    id: u64,
    key: PublicKey,
    name: String,
    tags: Vec<String>,
    conn: Connection,
}

struct Shared {
    key: StaticKey,
    /// As started; the policies in it are the first [`Shared::policies`].
    config: RelayConfig,
    config_path: Option<PathBuf>,
    /// The tunnel policy and mesh ACL in force (a reload swaps them).
    policies: std::sync::RwLock<Arc<reload::Policies>>,
    registry: Mutex<Registry>,
    /// The registry's async handle on PostgreSQL: admissions and their
    /// revocation checks, awaited without its lock or a blocked thread.
    pg: Option<crate::pg::PgHandle>,
    routes: Arc<Mutex<Routes<Connection>>>,
    rate: Mutex<RateLimiter>,
    next_id: AtomicU64,
    metrics: Arc<Metrics>,
    mesh: mesh::Mesh,
    pool: pool::PoolShell,
    /// Set when the relay shuts down: TCP connections are told to reconnect.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The fast relay path's channels (one per admitted node).
    channels: std::sync::RwLock<fastpath::Channels>,
    /// Places for TCP connections awaiting admission
    /// ([`crate::config::Limits::pending_tcp_cap`]).
    pending_tcp: Arc<tokio::sync::Semaphore>,
    /// Connections to other relays of the fleet, by name (tunnels to their
    /// workers); each behind its own lock, so a slow dial to one relay holds
    /// up no tunnel to another.
    peers: Mutex<std::collections::HashMap<String, PeerSlot>>,
    /// Relays of the fleet whose heartbeat stopped: not dialled.
    dead_relays: std::sync::RwLock<HashSet<String>>,
    /// Relays whose link timed out or dial failed, until when they are not dialled.
    peer_down: Mutex<std::collections::HashMap<String, Instant>>,
    /// Live links to the fleet's other relays, by name, whichever side
    /// dialled: relayed mesh packets for the nodes homed there go over them.
    peer_links: std::sync::RwLock<std::collections::HashMap<String, Connection>>,
    /// The fleet's other live relays, by name, from their heartbeats: their
    /// addresses are told to each admitted node and dialled for relayed
    /// packets; the entries answer `ListRelays`.
    fleet_relays: std::sync::RwLock<std::collections::BTreeMap<String, RelayEntry>>,
    /// This relay as `ListRelays` lists it (set when it starts serving).
    own: std::sync::OnceLock<RelayEntry>,
    /// Relays to dial a link to (a relayed packet found none); [`peer_dialer`].
    dial: tokio::sync::mpsc::UnboundedSender<String>,
    /// Relays being dialled now (one attempt at a time each).
    dialing: Mutex<HashSet<String>>,
    /// The web view's logins and sessions.
    /// Wakes the revocation watcher at once (a device removed in the web view: this
    /// connection's own write, which `data_version` does not show).
    revoked_here: tokio::sync::Notify,
    web: web::WebShell,
}

impl Shared {
    /// How this relay closes its clients' connections when it stops: a
    /// relay alone is restarting (come back soon); a fleet's relay drains
    /// (move to another relay of the fleet now).
    fn closing(&self) -> (CloseCode, &'static [u8]) {
        if self.fleet() {
            (
                CloseCode::Draining,
                b"relay draining: move to another relay",
            )
        } else {
            (CloseCode::Restarting, b"relay restarting")
        }
    }

    /// Whether this relay is one of a fleet (its store is shared).
    fn fleet(&self) -> bool {
        self.config.store != crate::registry::Store::Sqlite
    }

    /// Lets a connection that opens tunnels (an engineer, a fleet relay)
    /// open as many streams as the limits allow, not the pre-admission few.
    fn raise_stream_limit(&self, conn: &Connection) {
        let n = self
            .config
            .limits
            .max_streams_per_node
            .saturating_add(STREAM_HEADROOM);
        conn.set_max_concurrent_bi_streams(VarInt::from_u32(n));
    }

    /// The tunnel policy and mesh ACL in force now.
    fn policies(&self) -> Arc<reload::Policies> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// A TCP connection's place among those awaiting admission; freed on drop
/// (admitted, refused or timed out).
struct PendingSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl PendingSlot {
    /// A place, if one is free.
    fn take(shared: &Shared) -> Option<PendingSlot> {
        let permit = shared.pending_tcp.clone().try_acquire_owned().ok()?;
        shared.metrics.tcp_pending.inc();
        Some(PendingSlot {
            _permit: permit,
            metrics: shared.metrics.clone(),
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.metrics.tcp_pending.dec();
    }
}

/// Raises the open-file limit (many TCP connections) and sizes the TCP
/// admission queue by it ([`crate::config::Limits::pending_tcp_cap`]); logs both.
fn pending_tcp_cap(limits: &crate::config::Limits) -> usize {
    let configured = limits.pending_tcp_cap(None);
    match crate::rt::raise_nofile_limit() {
        Ok(l) => {
            let cap = limits.pending_tcp_cap(Some(l.soft));
            info!(
                soft = l.soft,
                hard = l.hard,
                was = l.before,
                max_pending_tcp = cap,
                "open-file limit"
            );
            if cap < configured {
                warn!(
                    configured,
                    used = cap,
                    open_file_limit = l.soft,
                    "limits.max_pending_tcp_connections lowered to half the open-file limit; raise the limit (LimitNOFILE=)"
                );
            }
            cap
        }
        Err((l, e)) => {
            let cap = limits.pending_tcp_cap((l.soft > 0).then_some(l.soft));
            warn!(soft = l.soft, hard = l.hard, max_pending_tcp = cap, error = %e, "could not raise the open-file limit");
            cap
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Holds the stream slots of one granted tunnel; released on drop.
struct StreamSlots {
    shared: Arc<Shared>,
    keys: (PublicKey, PublicKey),
    worker_id: u64,
}

impl Drop for StreamSlots {
    fn drop(&mut self) {
        lock(&self.shared.routes).release(self.keys, self.worker_id);
    }
}

/// A bound relay, ready to [`Relay::run`].
pub struct Relay {
    endpoint: Endpoint,
    tcp: Vec<std::net::TcpListener>,
    tcp_tls: Arc<rustls::ServerConfig>,
    stun: Option<std::net::UdpSocket>,
    shared: Arc<Shared>,
    metrics_listener: Option<tokio::net::TcpListener>,
    admin: Option<std::os::unix::net::UnixListener>,
    /// A shared store's own connection for [`fleet_loop`].
    fleet: Option<Registry>,
    /// Requests for links to other relays ([`peer_dialer`]).
    dial_rx: Option<tokio::sync::mpsc::UnboundedReceiver<String>>,
    /// The web view's listener (`web_listen`).
    web: Option<web::WebListener>,
}

/// A stateless-reset key derived from the identity, so a restarted relay can
/// reset its previous connections at once (clients then reconnect instead of
/// waiting for their idle timeout).
struct ResetKey(ring::hmac::Key);

fn reset_key(key: &StaticKey) -> ResetKey {
    let mut h = Sha256::new();
    h.update(b"weft-relay stateless reset key v1");
    h.update(key.private_bytes());
    ResetKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &h.finalize()))
}

/// Random 8-byte connection IDs that every relay process accepts as its
/// own (quinn's default generator keys them per process), so a restarted
/// relay answers packets of its previous life with a stateless reset (same
/// reset key, derived from the identity) and workers reconnect at once
/// instead of waiting for their idle timeout.
struct PortableCids;

impl quinn::ConnectionIdGenerator for PortableCids {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        quinn::ConnectionId::new(&rand::random::<[u8; 8]>())
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

impl Relay {
    /// Loads (or creates) identity, certificate and registry, binds the socket.
    pub fn bind(opts: ServeOptions) -> Result<Relay, RelayError> {
        let dir = &opts.state_dir;
        crate::keys::create_private_dir(dir)?;
        let key = StaticKey::load_or_create(&dir.join(files::IDENTITY))?;
        let (cert, cert_key) = tls::server_cert(dir, &opts.config.tls)?;
        let relay_name = opts.config.relay_name();
        let registry = Registry::open_main(dir, &opts.config.store, &relay_name)?;
        let limits = &opts.config.limits;
        // Few streams until admitted: quinn keeps per-stream state for every
        // stream a peer may open, so a large initial limit costs every idle
        // worker hundreds of KiB. Engineers get theirs raised after admission.
        let transport = tls::transport(limits.idle_timeout(), None, PRE_ADMISSION_STREAMS);
        let tcp_tls = tls::rustls_server(cert.clone(), cert_key.clone_key(), tls::TCP_ALPN)
            .map_err(RelayError::Tls)?;
        let server = tls::server_config(cert, cert_key, transport).map_err(RelayError::Tls)?;
        let socket = tls::udp_socket(opts.listen).map_err(|source| RelayError::Bind {
            addr: opts.listen,
            source,
        })?;
        let ResetKey(reset) = reset_key(&key);
        let mut endpoint_config = quinn::EndpointConfig::new(Arc::new(reset));
        endpoint_config.cid_generator(|| Box::new(PortableCids));
        let endpoint = Endpoint::new(
            endpoint_config,
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| RelayError::Bind {
            addr: opts.listen,
            source,
        })?;
        let local = endpoint.local_addr().map_err(|source| RelayError::Bind {
            addr: opts.listen,
            source,
        })?;
        let mut tcp_addrs = Vec::new();
        if opts.config.tcp {
            tcp_addrs.push(local);
        }
        tcp_addrs.extend(opts.config.tcp_listen.iter().copied());
        let mut tcp = Vec::new();
        for addr in tcp_addrs {
            let l = tcp_listener(addr).map_err(|source| RelayError::Bind { addr, source })?;
            tcp.push(l);
        }
        let la = dir.join(files::LISTEN_ADDR);
        std::fs::write(&la, local.to_string()).map_err(|e| StateError::io(&la, e))?;
        let stun = match opts.config.stun_addr(opts.listen) {
            Some(addr) => {
                // The fast relay path's port: large buffers, as QUIC's (with the default
                // 208 KiB a burst of GRO batches overflowed it and relayed TCP retransmitted).
                let sock = crate::tls::udp_socket(addr)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|source| RelayError::Bind { addr, source })?;
                let bound = sock
                    .local_addr()
                    .map_err(|source| RelayError::Bind { addr, source })?;
                let sa = dir.join(files::STUN_ADDR);
                std::fs::write(&sa, bound.to_string()).map_err(|e| StateError::io(&sa, e))?;
                Some(sock)
            }
            None => None,
        };
        let stun_bound = stun.as_ref().and_then(|s| s.local_addr().ok());
        let mesh = mesh::Mesh::open(
            dir,
            &registry,
            &opts.config,
            stun_bound,
            &opts.config.store,
            &relay_name,
        )?;
        let fleet = if registry.is_shared() {
            Some(Registry::open_store(dir, &opts.config.store, &relay_name)?)
        } else {
            None
        };
        let routes = Arc::new(Mutex::new(Routes::new(limits.max_streams_per_node)));
        let metrics = Arc::new(Metrics::new());
        metrics.set_identity(&relay_name, &opts.config.region());
        let pool = pool::PoolShell::open(
            dir,
            &opts.config.pool,
            mesh.handle(routes.clone(), metrics.clone()),
            &opts.config.store,
            &relay_name,
        )?;
        // Not fatal: `pool list` then reads the store (e.g. a path over the socket length limit).
        let admin = admin_socket(dir)
            .map_err(|e| warn!(error = %e, "no admin socket; `pool list` reads the store"))
            .ok();
        let rate = RateLimiter::new(limits.new_connections_per_ip_per_sec);
        let pending_cap = pending_tcp_cap(limits);
        let metrics_listener = match opts.config.metrics_listen {
            Some(addr) => {
                Some(metrics::bind(addr).map_err(|source| RelayError::Bind { addr, source })?)
            }
            None => None,
        };
        let (dial, dial_rx) = tokio::sync::mpsc::unbounded_channel();
        let web_listener = web::WebListener::bind(&opts.config, dir)?;
        let web_bound = web_listener.as_ref().and_then(|w| w.local_addr());
        let relay = Relay {
            dial_rx: Some(dial_rx),
            web: web_listener,
            endpoint,
            tcp,
            tcp_tls: Arc::new(tcp_tls),
            stun,
            metrics_listener,
            admin,
            fleet,
            shared: Arc::new(Shared {
                key,
                config: opts.config.clone(),
                config_path: opts.config_path.clone(),
                policies: std::sync::RwLock::new(Arc::new(reload::Policies::from_config(
                    &opts.config,
                ))),
                pg: registry.pg_handle(),
                registry: Mutex::new(registry),
                routes,
                rate: Mutex::new(rate),
                next_id: AtomicU64::new(1),
                metrics,
                mesh,
                pool,
                stopping: tokio::sync::watch::channel(false).0,
                channels: std::sync::RwLock::new(fastpath::Channels::default()),
                pending_tcp: Arc::new(tokio::sync::Semaphore::new(pending_cap)),
                peers: Mutex::new(std::collections::HashMap::new()),
                dead_relays: std::sync::RwLock::new(HashSet::new()),
                peer_down: Mutex::new(std::collections::HashMap::new()),
                peer_links: std::sync::RwLock::new(std::collections::HashMap::new()),
                fleet_relays: std::sync::RwLock::new(std::collections::BTreeMap::new()),
                own: std::sync::OnceLock::new(),
                dial,
                dialing: Mutex::new(HashSet::new()),
                revoked_here: tokio::sync::Notify::new(),
                web: web::WebShell::new(&opts.config, web_bound, local),
            }),
        };
        if relay.shared.fleet() {
            // Two relays under one name would share one heartbeat row, one
            // set of tunnel homes and one pool lease (each would think it
            // holds it): refuse the second.
            let own = relay.own_entry();
            let rows = lock(&relay.shared.registry).relays()?;
            if let Some(other) = name_in_use(&own, &rows) {
                return Err(RelayError::NameInUse {
                    name: own.name,
                    addrs: other.addrs.join(", "),
                });
            }
        }
        Ok(relay)
    }

    /// The bound TCP (TLS fallback) addresses.
    pub fn tcp_addrs(&self) -> Vec<SocketAddr> {
        self.tcp
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// The web view's bound address (`web_listen`), when it is on.
    pub fn web_addr(&self) -> Option<SocketAddr> {
        self.web.as_ref().and_then(|w| w.local_addr())
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// Where STUN binding requests are answered, if enabled.
    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// Where `GET /metrics` is served, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// The relay's public key (what tokens pin).
    pub fn public_key(&self) -> PublicKey {
        self.shared.key.public()
    }

    /// On a store shared by a fleet: the task applying the other relays'
    /// mesh records (its own store connection, woken by the change feed).
    fn fleet_feed(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let reg = self.fleet.take()?;
        // One listener per relay: the registry's, which the revocation watcher wakes on too.
        let changes = lock(&self.shared.registry).changes()?;
        let config = &self.shared.config;
        let own = self.own_entry();
        info!(relay = %own.name, region = %own.region, addrs = ?own.addrs, stun_port = own.stun_port, store = %config.store.describe(), "fleet: following the other relays");
        let shared = self.shared.clone();
        if let Some(rx) = self.dial_rx.take() {
            tokio::spawn(peer_dialer(shared.clone(), rx));
        }
        Some(tokio::spawn(fleet_loop(shared, reg, changes, own)))
    }

    /// This relay as nodes see it in `ListRelays` (and as its heartbeat
    /// announces it): its name, region, public addresses (else the bound
    /// one), and its STUN port when it answers STUN.
    fn own_entry(&self) -> RelayEntry {
        let config = &self.shared.config;
        let mut addrs = config.public_addrs.clone();
        if addrs.is_empty() {
            if let Some(a) = self.local_addr().filter(|a| !a.ip().is_unspecified()) {
                addrs.push(a.to_string());
            }
        }
        RelayEntry {
            name: config.relay_name(),
            region: config.region(),
            addrs,
            stun_port: self.stun_addr().map(|a| a.port()).unwrap_or(0),
        }
    }

    /// Serves until `shutdown` completes, then tells every client the relay
    /// is restarting and closes.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let me = self.shared.key.public().short();
        let metrics_task = self.metrics_listener.take().map(|l| {
            info!(addr = ?l.local_addr().ok(), "metrics on /metrics");
            tokio::spawn(metrics::serve(l, self.shared.metrics.clone()))
        });
        let web_task = self
            .web
            .take()
            .map(|l| tokio::spawn(web::serve(self.shared.clone(), l)));
        let revocations = tokio::spawn(watch_revocations(self.shared.clone()));
        let _ = self.shared.own.set(self.own_entry());
        let fleet_task = self.fleet_feed();
        let pool_timer = tokio::spawn(pool::timer(self.shared.clone()));
        // A fleet: the pool's scheduling lease, and the feeds of workers on other relays.
        let pool_lease = tokio::spawn(pool::lease_loop(self.shared.clone()));
        let remote_feeds = tokio::spawn(pool::remote_feeds(self.shared.clone()));
        let admin_task = match self.admin.take().map(tokio::net::UnixListener::from_std) {
            Some(Ok(l)) => Some(tokio::spawn(pool::serve_admin(self.shared.clone(), l))),
            Some(Err(e)) => {
                warn!(error = %e, "admin socket unusable; `pool list` reads the store");
                None
            }
            None => None,
        };
        let stun_addr = self.stun_addr();
        // The UDP port's thread stops when this future ends or is dropped.
        let udp_stop = fastpath::StopOnDrop(Arc::new(std::sync::atomic::AtomicBool::new(false)));
        if let (Some(sock), Some(addr)) = (self.stun.take(), stun_addr) {
            fastpath::spawn(&self.shared, sock, udp_stop.0.clone())
                .map_err(|source| RelayError::Bind { addr, source })?;
        }
        let mut tcp_tasks = Vec::new();
        for l in std::mem::take(&mut self.tcp) {
            let addr = l.local_addr().ok();
            let l = tokio::net::TcpListener::from_std(l).map_err(|source| RelayError::Bind {
                addr: addr.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0))),
                source,
            })?;
            info!(?addr, "TLS fallback listening on TCP");
            let acceptor = tokio_rustls::TlsAcceptor::from(self.tcp_tls.clone());
            tcp_tasks.push(tokio::spawn(
                serve_tcp(self.shared.clone(), l, acceptor)
                    .instrument(tracing::info_span!("tcp", me = %me)),
            ));
        }
        let reload_task = tokio::spawn(reload_on_hangup(self.shared.clone()));
        info!(me = %me, addr = ?self.local_addr(), "relay listening");
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let incoming = tokio::select! {
                i = self.endpoint.accept() => i,
                _ = &mut shutdown => break,
            };
            let Some(incoming) = incoming else { break };
            let remote = incoming.remote_address();
            if !lock(&self.shared.rate).allow(remote.ip(), Instant::now()) {
                debug!(%remote, "connection rate limit hit; refused");
                self.shared.metrics.rate_limited.inc();
                incoming.refuse();
                continue;
            }
            let shared = self.shared.clone();
            let hs_timeout = shared.config.limits.handshake_timeout();
            tokio::spawn(
                async move {
                    let establish = async move { Ok(Some(Connection::Quic(incoming.await?))) };
                    handle_connection(shared, hs_timeout, establish, None).await
                }
                .instrument(tracing::info_span!("conn", me = %me, %remote)),
            );
        }
        for t in &tcp_tasks {
            t.abort();
        }
        let (code, why) = self.shared.closing();
        if code == CloseCode::Draining {
            // Leave the fleet first: the others stop announcing this relay,
            // and the nodes told to move next do not come back.
            info!(
                "relay draining: leaving the fleet and telling its nodes to move to another relay"
            );
            if let Some(t) = &fleet_task {
                t.abort();
            }
            pool_lease.abort();
            tokio::task::block_in_place(|| self.shared.pool.release_lease());
            let left = tokio::task::block_in_place(|| lock(&self.shared.registry).leave());
            if let Err(e) = left {
                warn!(error = %e, "could not mark this relay as leaving in the store; the others will see its beats stop");
            }
        } else {
            info!("relay shutting down; telling clients to reconnect");
        }
        self.shared.stopping.send_replace(true);
        self.endpoint.close(VarInt::from_u32(code.code()), why);
        let _ = timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
        revocations.abort();
        if let Some(t) = fleet_task {
            t.abort();
        }
        reload_task.abort();
        pool_timer.abort();
        pool_lease.abort();
        remote_feeds.abort();
        if let Some(t) = admin_task {
            t.abort();
        }
        self.shared.mesh.flush().await;
        drop(udp_stop);
        if let Some(t) = metrics_task {
            t.abort();
        }
        if let Some(t) = web_task {
            t.abort();
        }
        Ok(())
    }
}

/// How often a fleet relay beats (and looks at the others' beats).
const RELAY_BEAT: Duration = Duration::from_secs(1);
/// After its own beats failed (the store was out of reach), how long a relay
/// beats again before it judges the others' (theirs failed too).
const RELAY_SETTLE: Duration = Duration::from_millis(crate::pg::RELAY_DEAD_MS as u64 + 500);

/// A fleet relay's link to the others through the shared store: applies
/// their mesh records as the change feed announces them; beats every
/// [`RELAY_BEAT`] and reads the others' beats (down after [`crate::pg::RELAY_DEAD_MS`]): the live ones are what
/// admissions announce to nodes (where to go when this relay is gone), the
/// nodes of dead ones go offline here.
async fn fleet_loop(
    shared: Arc<Shared>,
    mut reg: Registry,
    mut changes: tokio::sync::watch::Receiver<i64>,
    own: RelayEntry,
) {
    let me = own.name.clone();
    let mut after = 0i64;
    let mut tick = tokio::time::interval(RELAY_BEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_feed = true;
    let mut beating_since: Option<Instant> = Some(Instant::now() - RELAY_SETTLE);
    loop {
        if read_feed {
            match tokio::task::block_in_place(|| reg.mesh_changes(after)) {
                Ok(rows) => {
                    if let Some(last) = rows.last() {
                        after = last.seq;
                    }
                    shared.mesh.apply_changes(rows, &me, &shared.metrics);
                    lock(&shared.routes).set_remote(shared.mesh.remote_nodes());
                    read_feed = false;
                }
                Err(e) => warn!(error = %e, "could not read the fleet's mesh records"),
            }
        }
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                read_feed = true;
            }
            _ = tick.tick() => {
                match tokio::task::block_in_place(|| reg.beat(&own.region, &own.addrs, own.stun_port)) {
                    // After the store was out of reach, every relay's last beat is old:
                    // judge the others only once they all had time to beat again.
                    Ok(_) if beating_since.get_or_insert_with(Instant::now).elapsed() < RELAY_SETTLE => {}
                    Ok(rows) => {
                        let dead_ms = crate::pg::RELAY_DEAD_MS;
                        *shared.fleet_relays.write().unwrap_or_else(|p| p.into_inner()) = rows
                            .iter()
                            .filter(|r| r.name != me && r.beat_age_ms < dead_ms)
                            .map(|r| {
                                let entry = RelayEntry {
                                    name: r.name.clone(),
                                    region: r.region.clone(),
                                    addrs: r.addrs.clone(),
                                    stun_port: r.stun_port,
                                };
                                (r.name.clone(), entry)
                            })
                            .collect();
                        let dead: HashSet<String> = rows
                            .into_iter()
                            .filter(|r| r.name != me && r.beat_age_ms >= dead_ms)
                            .map(|r| r.name)
                            .collect();
                        shared
                            .dead_relays
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone_from(&dead);
                        if shared.mesh.set_dead_relays(dead, &shared.metrics) {
                            // A relay came back: its nodes' records again, from the start.
                            after = 0;
                            read_feed = true;
                        }
                        // Also catches nodes whose session here ended (their records were parked).
                        lock(&shared.routes).set_remote(shared.mesh.remote_nodes());
                    }
                    Err(e) => {
                        beating_since = None;
                        warn!(error = %e, "fleet heartbeat failed");
                    }
                }
            }
        }
    }
}

/// `SIGHUP` reloads the policies from the configuration file (see `server/reload.rs`).
async fn reload_on_hangup(shared: Arc<Shared>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot watch SIGHUP; `tunnel-relay policy reload` still works");
            return;
        }
    };
    while hup.recv().await.is_some() {
        if let Err(e) = reload::reload(&shared) {
            warn!(error = %e, "SIGHUP: policy not reloaded; the running policy stays");
        }
    }
}

/// Binds `DIR/admin.sock` (a stale one from a previous life is replaced), mode 0600.
fn admin_socket(dir: &std::path::Path) -> Result<std::os::unix::net::UnixListener, RelayError> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(files::ADMIN_SOCKET);
    let _ = std::fs::remove_file(&path);
    let l = std::os::unix::net::UnixListener::bind(&path).map_err(|e| StateError::io(&path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| StateError::io(&path, e))?;
    l.set_nonblocking(true)
        .map_err(|e| StateError::io(&path, e))?;
    Ok(l)
}

/// How often the relay looks for revocations made by `nodes revoke` (another
/// process writing the registry): one `PRAGMA data_version` per tick.
const REVOCATION_POLL: Duration = Duration::from_millis(500);

/// Closes the connections of nodes revoked while connected, within
/// [`REVOCATION_POLL`] of the `nodes revoke` command.
async fn watch_revocations(shared: Arc<Shared>) {
    let mut seen = None;
    let mut revoked_before: Option<HashSet<PublicKey>> = None;
    let mut tick = tokio::time::interval(REVOCATION_POLL);
    // A shared store wakes us on every change (other relays, operator commands).
    let mut changes = lock(&shared.registry).changes();
    loop {
        match changes.as_mut() {
            Some(c) => {
                tokio::select! {
                    _ = tick.tick() => {}
                    r = c.changed() => if r.is_err() { changes = None },
                    () = shared.revoked_here.notified() => seen = None,
                }
            }
            None => {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shared.revoked_here.notified() => seen = None,
                }
            }
        }
        let revoked: Option<HashSet<PublicKey>> = {
            let reg = lock(&shared.registry);
            match reg.data_version() {
                Ok(v) if Some(v) == seen => None,
                Ok(v) => {
                    seen = Some(v);
                    reg.revoked_keys()
                        .map_err(|e| warn!(error = %e, "registry read failed"))
                        .ok()
                }
                Err(e) => {
                    warn!(error = %e, "registry read failed");
                    None
                }
            }
        };
        let Some(revoked) = revoked else { continue };
        shared.web.revoked(&revoked);
        // The operator's `pool cordon|drain|uncordon` write the same database.
        shared.pool.reload_flags();
        if revoked_before.as_ref() != Some(&revoked) {
            // Revoked workers leave the pool (their GPUs, their jobs, a clone's flag).
            let names: Vec<String> = match lock(&shared.registry).list_nodes() {
                Ok(nodes) => nodes
                    .into_iter()
                    .filter(|n| n.revoked)
                    .map(|n| n.name)
                    .collect(),
                Err(e) => {
                    warn!(error = %e, "registry read failed");
                    Vec::new()
                }
            };
            shared.pool.remove_workers(&names);
            revoked_before = Some(revoked.clone());
        }
        shared.mesh.remove_keys(&revoked, &shared.metrics);
        for conn in lock(&shared.routes).revoked(&revoked) {
            info!(remote = %conn.remote_address(), "closing a revoked node's connection");
            conn.close(VarInt::from_u32(CloseCode::Revoked.code()), b"revoked");
        }
    }
}

/// A TCP listener for the TLS fallback (address reuse, so a restart binds at once).
fn tcp_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// Accepts TCP connections for the TLS fallback: per-IP rate limit, a place
/// among those awaiting admission (at most `limits.max_pending_tcp_connections`,
/// so a flood of idle sockets is turned away at once instead of using up the
/// descriptors), then TLS + HTTP (answered or upgraded; the first frame
/// checked) and admission, all within the handshake timeout; every refusal is
/// counted by cause and disturbs nothing else.
async fn serve_tcp(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
) {
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !lock(&shared.rate).allow(remote.ip(), Instant::now()) {
            debug!(%remote, "connection rate limit hit; refused");
            shared.metrics.rate_limited.inc();
            shared.metrics.tcp_refused("rate");
            continue;
        }
        let Some(slot) = PendingSlot::take(&shared) else {
            debug!(%remote, "too many TCP connections awaiting admission; refused");
            shared.metrics.tcp_refused("busy");
            continue;
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(
            async move {
                let opts = crate::mux::Options {
                    keepalive: None,
                    idle_timeout: shared.config.limits.idle_timeout(),
                    max_incoming: PRE_ADMISSION_STREAMS,
                };
                let hs_timeout = shared.config.limits.handshake_timeout();
                let m = shared.metrics.clone();
                let establish = async move {
                    // Within the whole handshake's timeout, so a silent socket counts here.
                    let upgrade_within = hs_timeout - hs_timeout / 4;
                    let accepted = timeout(
                        upgrade_within,
                        crate::tcp::accept(tcp, remote, &acceptor, opts),
                    );
                    match accepted.await {
                        Err(_) => {
                            debug!("TCP connection sent no upgrade in time; dropped");
                            m.tcp_refused("timeout");
                            Ok(None)
                        }
                        Ok(Ok(crate::tcp::Served::Upgraded(c))) => Ok(Some(Connection::Tcp(c))),
                        Ok(Ok(crate::tcp::Served::Answered(status))) => {
                            debug!(status, "plain HTTP request answered");
                            m.tcp_answered.inc();
                            Ok(None)
                        }
                        Ok(Err((cause, detail))) => {
                            debug!(cause = cause.as_str(), %detail, "TCP connection refused");
                            m.tcp_refused(cause.as_str());
                            Ok(None)
                        }
                    }
                };
                handle_connection(shared, hs_timeout, establish, Some(slot)).await
            }
            .instrument(tracing::info_span!("conn", %remote, transport = "tcp")),
        );
    }
}

/// Admission of one connection, all of it (transport handshake included)
/// within `hs_timeout`; then the node is served. `pending` (a TCP
/// connection's place among those awaiting admission) is freed once
/// admission is over, either way.
async fn handle_connection(
    shared: Arc<Shared>,
    hs_timeout: Duration,
    establish: impl Future<Output = Result<Option<Connection>, ProtoError>>,
    pending: Option<PendingSlot>,
) {
    let m = shared.metrics.clone();
    let steps = async {
        match establish.await? {
            Some(conn) => admit(&shared, conn).await,
            None => Ok(None),
        }
    };
    let admitted = timeout(hs_timeout, steps).await;
    drop(pending);
    let admitted = match admitted {
        Err(_) => {
            debug!("handshake timed out");
            m.handshake_timeouts.inc();
            return;
        }
        Ok(Err(e)) => {
            debug!(error = %e, "handshake failed");
            m.handshake_errors.inc();
            return;
        }
        Ok(Ok(None)) => return,
        Ok(Ok(Some(a))) => a,
    };
    let (ctx, hello, control) = admitted;
    if ctx.key == shared.key.public() && ctx.tags.iter().any(|t| t == PEER_TAG) {
        let span = tracing::info_span!("peer", relay = %ctx.name);
        return serve_peer(shared, ctx, control).instrument(span).await;
    }
    let span = tracing::info_span!("node", name = %ctx.name, key = %ctx.key.short());
    serve_node(shared, ctx, hello, control)
        .instrument(span)
        .await;
}

/// The tag of a connection from another relay of the fleet.
const PEER_TAG: &str = "weft-relay-peer";

/// Another relay of the fleet: its streams open tunnels to workers whose
/// session is here, for engineers it admitted ([`Message::PeerOpen`]).
async fn serve_peer(shared: Arc<Shared>, ctx: NodeCtx, control: (SendStream, RecvStream)) {
    info!(relay = %ctx.name, transport = %ctx.conn.kind(), "fleet relay connected");
    shared.raise_stream_limit(&ctx.conn);
    add_peer_link(&shared, &ctx.name, ctx.conn.clone());
    let _control = control;
    let err = loop {
        match ctx.conn.accept_bi().await {
            Ok((mut send, mut recv)) => {
                let shared = shared.clone();
                let peer = ctx.clone();
                tokio::spawn(async move {
                    let hs = shared.config.limits.handshake_timeout();
                    match timeout(hs, read_message(&mut recv)).await {
                        Ok(Ok(Message::PeerOpen {
                            from,
                            target,
                            service,
                            ..
                        })) if service == weft_proto::pool::POOL_SERVICE
                            && from == weft_proto::pool::POOL_CALLER =>
                        {
                            // The fleet's scheduler asks for a worker's pool feed.
                            pool::peer_feed(&shared, &target, send, recv).await;
                        }
                        Ok(Ok(Message::PeerApi {
                            from, from_tags, ..
                        })) => {
                            let caller = pool::ApiCaller {
                                name: from,
                                tags: from_tags,
                            };
                            pool::peer_api(shared, caller, send, recv).await;
                        }
                        Ok(Ok(Message::PeerOpen {
                            from,
                            from_key,
                            from_tags,
                            target,
                            service,
                        })) => {
                            let engineer = NodeCtx {
                                id: peer.id,
                                key: from_key,
                                name: from,
                                tags: from_tags,
                                conn: peer.conn.clone(),
                            };
                            let routed = route(&shared, &engineer, &target, &service)
                                .await
                                .map(|(s, r, slots)| (s, r, Some(slots)));
                            splice_tunnel(
                                &shared, &engineer, &target, &service, send, recv, routed,
                            )
                            .await;
                        }
                        _ => {
                            let _ = send.reset(VarInt::from_u32(ResetCode::Failed.code()));
                        }
                    }
                });
            }
            Err(e) => break e,
        }
    };
    info!(relay = %ctx.name, reason = %err, "fleet relay disconnected");
}

/// A worker not connected here whose tunnel session is on another live
/// relay of the fleet: the tunnel goes through that relay (a peer
/// connection with the fleet's key, kept per relay), which decides the
/// policy for the engineer in `ctx`. None: no such relay (not a fleet, or
/// the worker is nowhere).
async fn via_peer(
    shared: &Arc<Shared>,
    ctx: &NodeCtx,
    target: &str,
    service: &str,
) -> Option<Result<(SendStream, RecvStream), PeerRefusal>> {
    if !shared.fleet() {
        return None;
    }
    let me = shared.config.relay_name();
    let home = tokio::task::block_in_place(|| lock(&shared.registry).tunnel_home(target));
    let home = match home {
        Ok(Some(h)) if h.name != me => h,
        Ok(_) => return None,
        Err(e) => {
            warn!(error = %e, %target, "could not look up the worker's relay");
            return None;
        }
    };
    let peer = match peer_session(shared, &home.name, &home.addrs).await {
        Ok(p) => p,
        Err(e) => {
            warn!(relay = %home.name, error = %e, "fleet relay unreachable");
            return Some(Err(PeerRefusal::Unreachable(Rejection::new(
                Reason::ServiceUnavailable,
                format!("{target:?} is on relay {} which does not answer", home.name),
            ))));
        }
    };
    debug!(relay = %home.name, %target, %service, "tunnel through a fleet relay");
    let opened = tokio::select! {
        r = peer.open_for(&ctx.name, ctx.key, &ctx.tags, target, service) => r,
        // A relay that stopped answering is not waited on until the link's
        // idle timeout: the worker is moving to another relay.
        () = peer.connection().went_silent(PEER_SILENT) => Err(crate::error::ClientError::Unreachable {
            addrs: home.addrs.join(", "),
            last: format!("relay {} went silent", home.name),
        }),
    };
    Some(opened.map_err(|e| match e {
        crate::error::ClientError::Rejected(r) => PeerRefusal::Refused(r),
        other => PeerRefusal::Unreachable(Rejection::new(
            Reason::ServiceUnavailable,
            format!("{target:?} via relay {}: {other}", home.name),
        )),
    }))
}

/// Where an engineer that takes redirects should open a tunnel to `target`:
/// the worker's home relay (name, addresses), when that is another relay of
/// the fleet that beats and answered this one lately. `None`: carry it here
/// (the worker is here, on no relay, or its relay is failing: the hop waits
/// for the worker to come back somewhere).
fn redirect_for(shared: &Shared, target: &str) -> Option<(String, Vec<String>)> {
    if !shared.fleet() {
        return None;
    }
    let me = shared.config.relay_name();
    let home = match tokio::task::block_in_place(|| lock(&shared.registry).tunnel_home(target)) {
        Ok(Some(h)) if h.name != me && !h.addrs.is_empty() => h,
        Ok(_) => return None,
        Err(e) => {
            warn!(error = %e, %target, "could not look up the worker's relay");
            return None;
        }
    };
    let dead = shared
        .dead_relays
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&home.name);
    let held_off = lock(&shared.peer_down)
        .get(&home.name)
        .is_some_and(|until| Instant::now() < *until);
    (!dead && !held_off).then_some((home.name, home.addrs))
}

/// This relay's connection to relay `name` of the fleet (at `addrs`),
/// dialled if there is none alive; its datagrams are read
/// ([`peer_datagrams`]).
async fn peer_session(
    shared: &Arc<Shared>,
    name: &str,
    addrs: &[String],
) -> Result<Arc<crate::client::Session>, crate::error::ClientError> {
    if shared
        .dead_relays
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .contains(name)
    {
        return Err(crate::error::ClientError::Unreachable {
            addrs: addrs.join(", "),
            last: format!("relay {name} stopped beating"),
        });
    }
    let slot = lock(&shared.peers)
        .entry(name.to_string())
        .or_default()
        .clone();
    let mut peer = slot.lock().await;
    let down = |why: String| {
        lock(&shared.peer_down).insert(name.to_string(), Instant::now() + PEER_HOLD_OFF);
        crate::error::ClientError::Unreachable {
            addrs: addrs.join(", "),
            last: why,
        }
    };
    match peer.as_ref().map(|s| s.connection().close_reason()) {
        Some(None) => return peer.as_ref().cloned().ok_or_else(|| down("gone".into())),
        Some(Some(quinn::ConnectionError::TimedOut)) => {
            *peer = None;
            return Err(down(format!("the link to relay {name} timed out")));
        }
        _ => {}
    }
    if lock(&shared.peer_down)
        .get(name)
        .is_some_and(|until| Instant::now() < *until)
    {
        return Err(crate::error::ClientError::Unreachable {
            addrs: addrs.join(", "),
            last: format!("relay {name} did not answer a moment ago"),
        });
    }
    let me = shared.config.relay_name();
    let s = match crate::client::connect_peer(&shared.key, addrs, &me).await {
        Ok(s) => Arc::new(s),
        Err(e) => return Err(down(e.to_string())),
    };
    lock(&shared.peer_down).remove(name);
    info!(relay = %name, addrs = ?addrs, "connected to a fleet relay");
    *peer = Some(s.clone());
    drop(peer);
    add_peer_link(shared, name, s.connection().clone());
    tokio::spawn(watch_peer(
        shared.clone(),
        name.to_string(),
        slot,
        s.clone(),
    ));
    Ok(s)
}

/// How long a link to another relay may receive nothing before that relay is
/// taken for gone (it sends keepalives every 500 ms): half the idle timeout.
const PEER_SILENT: Duration = Duration::from_secs(1);

/// Watches the link `s` in relay `name`'s `slot`: when it goes silent (the
/// relay or the path is gone) it leaves the slot and the relay is held off,
/// so new tunnels to that relay's workers wait for them on another relay
/// instead of on this link's idle timeout; if the link is heard again (a
/// stall, not a death), it goes back.
async fn watch_peer(
    shared: Arc<Shared>,
    name: String,
    slot: PeerSlot,
    s: Arc<crate::client::Session>,
) {
    let conn = s.connection().clone();
    loop {
        tokio::select! {
            _ = conn.closed() => return,
            () = conn.went_silent(PEER_SILENT) => {}
        }
        {
            let mut p = slot.lock().await;
            if !p.as_ref().is_some_and(|x| Arc::ptr_eq(x, &s)) {
                return;
            }
            *p = None;
        }
        lock(&shared.peer_down).insert(name.clone(), Instant::now() + PEER_HOLD_OFF);
        warn!(relay = %name, silent_ms = PEER_SILENT.as_millis() as u64, "fleet relay went silent; tunnels to its workers wait for them on another relay");
        tokio::select! {
            _ = conn.closed() => return,
            () = conn.heard_again() => {}
        }
        let mut p = slot.lock().await;
        if p.is_some() {
            return;
        }
        *p = Some(s.clone());
        lock(&shared.peer_down).remove(&name);
        info!(relay = %name, "fleet relay answers again");
    }
}

/// Dials the links that relayed packets asked for ([`remote_hop`]), one
/// attempt at a time per relay.
async fn peer_dialer(shared: Arc<Shared>, mut rx: tokio::sync::mpsc::UnboundedReceiver<String>) {
    while let Some(name) = rx.recv().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let addrs = shared
                .fleet_relays
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .map(|r| r.addrs.clone())
                .unwrap_or_default();
            if let Err(e) = peer_session(&shared, &name, &addrs).await {
                warn!(relay = %name, error = %e, "fleet relay unreachable for relayed packets");
            }
            lock(&shared.dialing).remove(&name);
        });
    }
}

/// Keeps `conn` (to or from relay `name`) as the link relayed packets for
/// that relay's nodes take (replacing a closed one), and delivers what
/// comes over it.
fn add_peer_link(shared: &Arc<Shared>, name: &str, conn: Connection) {
    {
        let mut links = shared.peer_links.write().unwrap_or_else(|p| p.into_inner());
        let alive = links.get(name).is_some_and(|c| c.close_reason().is_none());
        if !alive {
            links.insert(name.to_string(), conn.clone());
        }
    }
    tokio::spawn(peer_datagrams(shared.clone(), name.to_string(), conn));
}

/// The link to the relay where `dst` (not connected here) is homed, if the
/// mesh ACL lets `src_tags` talk to it. With no live link, one is dialled
/// and `None` returned (this packet is lost, as on any path being set up).
fn remote_hop(shared: &Shared, src_tags: &[String], dst: &PublicKey) -> Option<Connection> {
    let relay = lock(&shared.routes).remote_route(src_tags, dst, &shared.policies().mesh_acl)?;
    let link = shared
        .peer_links
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&*relay)
        .filter(|c| c.close_reason().is_none())
        .cloned();
    if link.is_none() && lock(&shared.dialing).insert(relay.to_string()) {
        let _ = shared.dial.send(relay.to_string());
    }
    link
}

/// Packets another relay of the fleet hands here (`relay_path::KIND_FORWARD`)
/// for nodes homed here: delivered if the source is a node homed on that
/// relay and the mesh ACL lets the two talk; else dropped and counted.
async fn peer_datagrams(shared: Arc<Shared>, relay: String, conn: Connection) {
    let m = &shared.metrics;
    while let Ok(d) = conn.read_datagram().await {
        let Ok((src, dst, packet)) = relay_path::decode_forward(&d) else {
            m.datagrams_dropped.inc();
            continue;
        };
        let route = {
            let routes = lock(&shared.routes);
            routes.remote_tags(&src, &relay).and_then(|tags| {
                routes.datagram_route(&src, tags, &dst, &shared.policies().mesh_acl)
            })
        };
        let sent = route.map(|c| c.send_datagram(relay_path::encode(&src, &packet)));
        if let Some(Ok(())) = sent {
            m.fleet_delivered.inc();
            m.datagram_bytes.inc_by(packet.len() as u64);
        } else {
            m.datagrams_dropped.inc();
        }
    }
}

/// Why a tunnel through another relay of the fleet did not open.
enum PeerRefusal {
    /// That relay refused (its policy, the worker's answer): final.
    Refused(Rejection),
    /// That relay could not be reached or its link failed: the worker may be
    /// moving to another relay.
    Unreachable(Rejection),
}

/// How long a tunnel open waits for a worker whose relay stopped answering
/// to come back through another (its failover takes about 2.5 s).
const FAILOVER_WAIT: Duration = Duration::from_secs(5);

/// After a link to a fleet relay timed out or a dial failed, how long that
/// relay is not dialled again (tunnel opens fail fast and wait for the worker
/// to move instead of each waiting out a handshake).
const PEER_HOLD_OFF: Duration = Duration::from_secs(3);

/// This relay's own connection to one other relay of the fleet (none yet,
/// or one that may have closed).
type PeerSlot = Arc<tokio::sync::Mutex<Option<Arc<crate::client::Session>>>>;

type Admitted = (NodeCtx, Hello, (SendStream, RecvStream));

async fn admit(shared: &Arc<Shared>, conn: Connection) -> Result<Option<Admitted>, ProtoError> {
    let (mut send, mut recv) = conn.accept_bi().await?;
    let prologue = noise::prologue(&conn)?;
    let (key, msg, hs) = noise::respond_read(&shared.key, &prologue, &mut recv).await?;
    let Message::Hello(hello) = msg else {
        return Err(ProtoError::Unexpected("first message is not Hello".into()));
    };
    let verdict = if hello.version != PROTOCOL_VERSION {
        Err(Rejection::new(
            Reason::UnsupportedVersion,
            format!("client speaks {}, relay {PROTOCOL_VERSION}", hello.version),
        ))
    } else if key == shared.key.public() && shared.fleet() {
        // Another relay of the fleet (it holds this relay's own key): a peer, not a node.
        Ok((hello.name.clone(), vec![PEER_TAG.to_string()]))
    } else {
        let secret = hello.join_secret.as_ref();
        let approval = shared.policies().approve_devices;
        let r = match &shared.pg {
            Some(pg) => {
                pg.admit(&key, &hello.name, secret, unix_now(), approval)
                    .await
            }
            // SQLite: a local file, answered in well under a millisecond.
            None => lock(&shared.registry).admit(&key, &hello.name, secret, unix_now(), approval),
        };
        match r {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, "registry failed during admission");
                Err(Rejection::new(Reason::Internal, ""))
            }
        }
    };
    match verdict {
        Ok((name, tags)) => {
            let mut relays: Vec<String> = shared
                .fleet_relays
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .flat_map(|r| r.addrs.iter().cloned())
                .collect();
            // A relay of a fleet names itself too (last): so a node admitted
            // while it is the only live one still knows it is in a fleet, and
            // asks for the relays that join later at its next home probe.
            if shared.fleet() {
                if let Some(own) = shared.own.get() {
                    relays.extend(own.addrs.iter().cloned());
                }
            }
            noise::respond_write(
                hs,
                &mut send,
                &Message::Accepted {
                    name: name.clone(),
                    tags: tags.clone(),
                    relays,
                },
            )
            .await?;
            let ctx = NodeCtx {
                id: shared.next_id.fetch_add(1, Ordering::Relaxed),
                key,
                name,
                tags,
                conn,
            };
            Ok(Some((ctx, hello, (send, recv))))
        }
        Err(rej) => {
            info!(key = %key.short(), name = %hello.name, reason = rej.reason.as_str(), "admission refused");
            shared.metrics.refused(rej.reason);
            if rej.reason == Reason::NodeRevoked {
                shared
                    .mesh
                    .remove_keys(&HashSet::from([key]), &shared.metrics);
            }
            noise::respond_write(hs, &mut send, &Message::Rejected(rej)).await?;
            let _ = send.finish();
            let _ = timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(VarInt::from_u32(CloseCode::Rejected.code()), b"refused");
            Ok(None)
        }
    }
}

/// Closes a worker's replaced connection once the tunnels it carries have
/// ended (at once if it carries none): a worker that moves from TCP back to
/// QUIC, or reconnects while its old path still works, keeps its open ssh
/// sessions; new tunnels already go to the new connection.
async fn close_when_drained(shared: Arc<Shared>, id: u64, conn: Connection) {
    let mut logged = false;
    loop {
        let open = lock(&shared.routes).tunnels_on(id);
        if open == 0 {
            break;
        }
        if !logged {
            info!(
                conn = id,
                tunnels = open,
                "replaced connection kept until its tunnels end"
            );
            logged = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = conn.closed() => return,
        }
    }
    conn.close(
        VarInt::from_u32(CloseCode::Replaced.code()),
        b"replaced by a newer connection",
    );
}

async fn serve_node(
    shared: Arc<Shared>,
    ctx: NodeCtx,
    hello: Hello,
    control: (SendStream, RecvStream),
) {
    let is_worker = !hello.services.is_empty();
    let worker = is_worker.then(|| {
        let route = WorkerRoute {
            id: ctx.id,
            key: ctx.key,
            conn: ctx.conn.clone(),
            tags: ctx.tags.clone(),
            services: hello.services.clone(),
        };
        (ctx.name.clone(), route)
    });
    let replaced =
        lock(&shared.routes).connect(ctx.id, ctx.key, ctx.conn.clone(), ctx.tags.clone(), worker);
    if let Some((old_id, old)) = replaced {
        tokio::spawn(close_when_drained(shared.clone(), old_id, old));
    }
    // Revoked between admission and registration in the table: the watcher
    // may have looked already.
    if revoked_now(&shared, &ctx.key).await {
        ctx.conn
            .close(VarInt::from_u32(CloseCode::Revoked.code()), b"revoked");
    }
    if !is_worker {
        shared.raise_stream_limit(&ctx.conn);
    }
    if let Some(e) = ctx.conn.exporter() {
        shared
            .channels
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .register(ctx.key, ctx.tags.clone(), relay_path::bind_key(&e), ctx.id);
    }
    if is_worker && shared.fleet() {
        let r = tokio::task::block_in_place(|| {
            lock(&shared.registry).set_tunnel_home(&ctx.name, ctx.id, &hello.services, &ctx.tags)
        });
        if let Err(e) = r {
            warn!(error = %e, "could not tell the fleet where this worker's tunnels are");
        }
    }
    info!(node = %ctx.name, key = %ctx.key.short(), tags = ?ctx.tags, services = ?hello.services, transport = %ctx.conn.kind(), "node connected");
    shared.metrics.connected.inc();
    shared.metrics.admitted_over(ctx.conn.kind().as_str());
    let control_task = tokio::spawn(control_loop(shared.clone(), ctx.clone(), control));
    let feed_task = hello
        .services
        .iter()
        .any(|s| s == weft_proto::pool::POOL_SERVICE)
        .then(|| {
            tokio::spawn(pool::feed(
                shared.clone(),
                ctx.name.clone(),
                ctx.conn.clone(),
            ))
        });
    let datagram_task = tokio::spawn(forward_datagrams(shared.clone(), ctx.clone()));
    let mut stopping = shared.stopping.subscribe();
    let err = loop {
        let next = tokio::select! {
            n = ctx.conn.accept_bi() => n,
            _ = stopping.wait_for(|s| *s) => {
                let (code, why) = shared.closing();
                ctx.conn.close(VarInt::from_u32(code.code()), why);
                continue;
            }
        };
        match next {
            Ok((send, recv)) => {
                let shared = shared.clone();
                let ctx = ctx.clone();
                tokio::spawn(async move { handle_tunnel(shared, ctx, send, recv).await });
            }
            Err(e) => break e,
        }
    };
    control_task.abort();
    datagram_task.abort();
    if let Some(t) = feed_task {
        // Its stream ends with the connection; the task records the worker as away.
        let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
    }
    shared.metrics.connected.dec();
    shared
        .channels
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .unregister(&ctx.key, ctx.id);
    lock(&shared.routes).disconnect(ctx.id, &ctx.name);
    if is_worker && shared.fleet() {
        let r = tokio::task::block_in_place(|| {
            lock(&shared.registry).clear_tunnel_home(&ctx.name, ctx.id)
        });
        if let Err(e) = r {
            debug!(error = %e, "could not clear this worker's tunnel home");
        }
    }
    info!(node = %ctx.name, reason = %err, "node disconnected");
}

/// The relay path: forwards this node's WireGuard datagrams to the peers
/// the policy lets it talk to, with the source key rewritten to the sender's
/// authenticated key. Anything else is dropped (and counted).
async fn forward_datagrams(shared: Arc<Shared>, ctx: NodeCtx) {
    let m = &shared.metrics;
    while let Ok(d) = ctx.conn.read_datagram().await {
        let Ok((dst, packet)) = relay_path::decode(&d) else {
            m.datagrams_dropped.inc();
            continue;
        };
        let acl = &shared.policies().mesh_acl;
        let route = lock(&shared.routes).datagram_route(&ctx.key, &ctx.tags, &dst, acl);
        let (conn, framed) = match route {
            Some(conn) => (conn, relay_path::encode(&ctx.key, &packet)),
            None => match remote_hop(&shared, &ctx.tags, &dst) {
                Some(link) => (link, relay_path::encode_forward(&ctx.key, &dst, &packet)),
                None => {
                    m.datagrams_dropped.inc();
                    continue;
                }
            },
        };
        let far = framed[0] == relay_path::KIND_FORWARD;
        match conn.send_datagram(framed) {
            Ok(()) => {
                m.datagrams_relayed.inc();
                m.datagram_bytes.inc_by(packet.len() as u64);
                if far {
                    m.fleet_forwarded.inc();
                }
            }
            Err(_) => {
                m.datagrams_dropped.inc();
            }
        }
    }
}

async fn control_loop(
    shared: Arc<Shared>,
    ctx: NodeCtx,
    (mut send, mut recv): (SendStream, RecvStream),
) {
    loop {
        match read_message(&mut recv).await {
            Ok(Message::ListTargets) => {
                let targets = targets_for(&shared, &ctx);
                if write_message(&mut send, &Message::Targets(targets))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Message::ListRelays) => {
                if write_message(&mut send, &relays_for(&shared))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(other) => {
                debug!(msg = ?other, "unexpected control message");
                return;
            }
            Err(_) => return,
        }
    }
}

/// The live relay of the fleet (its beat younger than
/// [`crate::pg::RELAY_DEAD_MS`]) that already goes by `own`'s name at other
/// addresses, if any. The same addresses are this relay restarted.
fn name_in_use<'a>(
    own: &RelayEntry,
    rows: &'a [crate::pg::RelayRow],
) -> Option<&'a crate::pg::RelayRow> {
    rows.iter().find(|r| {
        r.name == own.name && r.beat_age_ms < crate::pg::RELAY_DEAD_MS && r.addrs != own.addrs
    })
}

/// `Relays`: this relay and the fleet's other live ones, sorted by name.
fn relays_for(shared: &Shared) -> Message {
    let own = shared.own.get().cloned().unwrap_or_else(|| RelayEntry {
        name: shared.config.relay_name(),
        region: shared.config.region(),
        addrs: Vec::new(),
        stun_port: 0,
    });
    let mut relays: Vec<RelayEntry> = shared
        .fleet_relays
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .values()
        .cloned()
        .collect();
    let me = own.name.clone();
    relays.push(own);
    relays.sort_by(|a, b| a.name.cmp(&b.name));
    Message::Relays { me, relays }
}

/// The workers `ctx` may open: those connected here, and in a fleet those
/// whose tunnel session is on another live relay (opened through it).
fn targets_for(shared: &Shared, ctx: &NodeCtx) -> Vec<Target> {
    let policy = shared.policies().tunnels.clone();
    let mut out = lock(&shared.routes).targets_for(opener(ctx), &policy);
    if !shared.fleet() {
        return out;
    }
    let remote = tokio::task::block_in_place(|| lock(&shared.registry).remote_workers());
    match remote {
        Ok(ws) => {
            for w in ws {
                if out.iter().any(|t| t.name == w.name) {
                    continue;
                }
                if let Some(t) =
                    crate::routes::target_for(&ctx.tags, &policy, &w.name, &w.services, &w.tags)
                {
                    out.push(t);
                }
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
        }
        Err(e) => warn!(error = %e, "could not list the workers on the fleet's other relays"),
    }
    out
}

fn opener(ctx: &NodeCtx) -> Opener<'_> {
    Opener {
        id: ctx.id,
        key: &ctx.key,
        name: &ctx.name,
        tags: &ctx.tags,
    }
}

/// [`revoked`] for async callers: awaited on PostgreSQL (no lock held, no
/// thread blocked), on SQLite as before.
async fn revoked_now(shared: &Shared, key: &PublicKey) -> bool {
    let Some(pg) = &shared.pg else {
        return revoked(shared, key);
    };
    match pg.is_revoked(key).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "registry failed during revocation check; refusing");
            true
        }
    }
}

fn revoked(shared: &Shared, key: &PublicKey) -> bool {
    match lock(&shared.registry).is_revoked(key) {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %e, "registry failed during revocation check; refusing");
            true
        }
    }
}

async fn handle_tunnel(
    shared: Arc<Shared>,
    ctx: NodeCtx,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let hs_timeout = shared.config.limits.handshake_timeout();
    let (target, service, redirect) = match timeout(hs_timeout, read_message(&mut recv)).await {
        Ok(Ok(Message::Open {
            target,
            service,
            redirect,
        })) => (target, service, redirect),
        Ok(Ok(Message::MeshJoin {
            since,
            endpoints,
            peer_codec,
        })) => {
            let join = mesh::Join {
                since,
                endpoints,
                peer_codec,
            };
            return mesh::serve_session(shared, ctx, send, recv, join).await;
        }
        Ok(Ok(Message::WebLogin)) => {
            return web::login(shared, ctx, send).await;
        }
        Ok(Ok(Message::Api)) => {
            let caller = pool::ApiCaller {
                name: ctx.name.clone(),
                tags: ctx.tags.clone(),
            };
            return pool::api(shared, caller, ctx.key, send, recv).await;
        }
        Ok(Ok(other)) => {
            debug!(node = %ctx.name, msg = ?other, "tunnel stream did not start with Open");
            let _ = send.reset(VarInt::from_u32(ResetCode::Failed.code()));
            return;
        }
        _ => {
            let _ = send.reset(VarInt::from_u32(ResetCode::Failed.code()));
            return;
        }
    };
    let mut routed = route(&shared, &ctx, &target, &service)
        .await
        .map(|(s, r, slots)| (s, r, Some(slots)));
    // Not here, and the engineer takes redirects: it opens the tunnel on the
    // worker's home relay itself (one relay on the path, not two).
    if redirect && matches!(&routed, Err(r) if r.reason == Reason::NoSuchNode) {
        if let Some((relay, addrs)) = redirect_for(&shared, &target) {
            debug!(node = %ctx.name, %target, %service, %relay, "tunnel redirected to the worker's relay");
            shared.metrics.fleet_redirects.inc();
            let _ = write_message(&mut send, &Message::Redirect { relay, addrs }).await;
            let _ = send.finish();
            return;
        }
    }
    // Not here: on the relay that holds its session, if it is another of the
    // fleet. While that relay is down (the worker is moving to another),
    // wait up to FAILOVER_WAIT for the worker to come back somewhere.
    let deadline = Instant::now() + FAILOVER_WAIT;
    while matches!(&routed, Err(r) if r.reason == Reason::NoSuchNode) {
        match via_peer(&shared, &ctx, &target, &service).await {
            None => break,
            Some(Err(PeerRefusal::Unreachable(_))) if Instant::now() < deadline => {
                debug!(%target, "waiting for the worker to leave a relay that does not answer");
                tokio::time::sleep(Duration::from_millis(100)).await;
                routed = route(&shared, &ctx, &target, &service)
                    .await
                    .map(|(s, r, slots)| (s, r, Some(slots)));
            }
            Some(other) => {
                routed = other
                    .map(|(s, r)| (s, r, None))
                    .map_err(|(PeerRefusal::Refused(r) | PeerRefusal::Unreachable(r))| r);
                break;
            }
        }
    }
    splice_tunnel(&shared, &ctx, &target, &service, send, recv, routed).await;
}

/// Answers the opener of a tunnel (`OpenOk` or the refusal) and splices its
/// stream with the worker's (here, or through a fleet relay) until both end.
async fn splice_tunnel(
    shared: &Arc<Shared>,
    ctx: &NodeCtx,
    target: &str,
    service: &str,
    mut send: SendStream,
    recv: RecvStream,
    routed: Result<(SendStream, RecvStream, Option<StreamSlots>), Rejection>,
) {
    match routed {
        Err(rej) => {
            info!(node = %ctx.name, %target, %service, reason = rej.reason.as_str(), "tunnel refused");
            shared.metrics.refused(rej.reason);
            let _ = write_message(&mut send, &Message::Rejected(rej.clone())).await;
            let _ = send.finish();
            if rej.reason == Reason::NodeRevoked {
                let _ = timeout(Duration::from_secs(2), send.stopped()).await;
                ctx.conn
                    .close(VarInt::from_u32(CloseCode::Revoked.code()), b"revoked");
            }
        }
        Ok((mut wsend, wrecv, slots)) => {
            if write_message(&mut send, &Message::OpenOk).await.is_err() {
                let _ = wsend.reset(VarInt::from_u32(ResetCode::Failed.code()));
                return;
            }
            debug!(node = %ctx.name, %target, %service, "tunnel open");
            let m = &shared.metrics;
            m.tunnels.inc();
            let (up, down) = tokio::join!(
                quic_to_quic(recv, wsend, |n| {
                    m.to_worker.inc_by(n);
                }),
                quic_to_quic(wrecv, send, |n| {
                    m.to_engineer.inc_by(n);
                })
            );
            m.tunnels.dec();
            drop(slots);
            debug!(node = %ctx.name, %target, %service, up = up.0, down = down.0, up_end = ?up.1, down_end = ?down.1, "tunnel closed");
        }
    }
}

type Routed = (SendStream, RecvStream, StreamSlots);

async fn route(
    shared: &Arc<Shared>,
    ctx: &NodeCtx,
    target: &str,
    service: &str,
) -> Result<Routed, Rejection> {
    // The registry answers revocation (SQLite, outside the routes lock).
    let revoked_now: HashSet<PublicKey> = {
        let w = lock(&shared.routes).worker_key(target);
        [Some(ctx.key), w]
            .into_iter()
            .flatten()
            .filter(|k| revoked(shared, k))
            .collect()
    };
    let decision = lock(&shared.routes).decide(
        opener(ctx),
        target,
        service,
        &shared.policies().tunnels,
        |k| revoked_now.contains(k),
    );
    let grant = match decision {
        Ok(g) => g,
        Err((rej, close)) => {
            if let Some(conn) = close {
                conn.close(VarInt::from_u32(CloseCode::Revoked.code()), b"revoked");
            }
            return Err(rej);
        }
    };
    let slots = StreamSlots {
        shared: shared.clone(),
        keys: grant.keys,
        worker_id: grant.worker_id,
    };
    let worker_conn = grant.conn;
    let unavailable = |e: &dyn std::fmt::Display| {
        debug!(%target, error = %e, "worker stream failed");
        Rejection::new(Reason::NoSuchNode, format!("{target:?} went away"))
    };
    let (mut wsend, mut wrecv) = worker_conn.open_bi().await.map_err(|e| unavailable(&e))?;
    let incoming = Message::Incoming {
        from: ctx.name.clone(),
        service: service.to_string(),
    };
    write_message(&mut wsend, &incoming)
        .await
        .map_err(|e| unavailable(&e))?;
    let answer = timeout(
        shared.config.limits.handshake_timeout(),
        read_message(&mut wrecv),
    )
    .await
    .map_err(|_| Rejection::new(Reason::ServiceUnavailable, "worker did not answer in time"))?;
    match answer {
        Ok(Message::OpenOk) => Ok((wsend, wrecv, slots)),
        Ok(Message::Rejected(r)) => Err(r),
        Ok(other) => Err(unavailable(&format!("unexpected {other:?}"))),
        Err(e) => {
            debug!(%target, error = %e, "worker answer failed");
            Err(Rejection::new(
                Reason::ServiceUnavailable,
                format!("{service}: worker stream failed"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, addr: &str, beat_age_ms: i64) -> crate::pg::RelayRow {
        crate::pg::RelayRow {
            name: name.into(),
            region: String::new(),
            addrs: vec![addr.into()],
            beat_age_ms,
            nodes: 0,
            stun_port: 0,
            schedules_pool: false,
        }
    }

    #[test]
    fn a_live_relay_elsewhere_under_the_same_name_is_a_clash() {
        let own = RelayEntry {
            name: "relay-b".into(),
            region: String::new(),
            addrs: vec!["203.0.113.4:4433".into()],
            stun_port: 0,
        };
        let live_elsewhere = [
            row("relay-a", "203.0.113.2:4433", 100),
            row("relay-b", "203.0.113.3:4433", 900),
        ];
        assert_eq!(
            name_in_use(&own, &live_elsewhere).map(|r| r.addrs.clone()),
            Some(vec!["203.0.113.3:4433".to_string()])
        );
        // Dead, or this relay itself restarted: no clash.
        assert!(name_in_use(&own, &[row("relay-b", "203.0.113.3:4433", 3000)]).is_none());
        assert!(name_in_use(&own, &[row("relay-b", "203.0.113.4:4433", 200)]).is_none());
        assert!(name_in_use(&own, &[row("relay-c", "203.0.113.3:4433", 200)]).is_none());
    }
}
