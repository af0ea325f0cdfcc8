//! The node side of the mesh control session: a library for `mesh up` and
//! `worker-agent run`.
//!
//! [`MeshSession::connect`] admits the node like every relay client (key in
//! the state dir, token on the first join only), opens the mesh control
//! stream (`MeshJoin` → `MeshAccepted`), waits for the first peer map and
//! returns. A background task then keeps the session: it applies snapshots
//! and deltas to the [`PeerMap`] (asking the relay to resync with `Ack`
//! when a delta does not follow), sends endpoint reports and call-me-maybe,
//! and, when the relay goes away, reconnects when the link core
//! ([`crate::link::Link`]) says so (jittered, capped backoff), resuming from
//! the version it holds (`since`), so a short outage costs
//! only the deltas missed. The peer map survives outages: the data plane
//! keeps working without the coordinator.
//!
//! What the node gets:
//! - [`MeshSession::peer_map`] / [`MeshSession::watch_peer_map`]: its own
//!   [`SelfInfo`] (overlay addresses), its peers and inbound filter;
//! - [`MeshSession::next_event`]: every applied update, call-me-maybe from
//!   peers, link changes (in order; a consumer that falls behind gets
//!   [`MeshEvent::Lagged`] and re-reads the peer map);
//! - [`MeshSession::link`]: the link as status commands show it (the one
//!   [`LinkState`]); [`MeshSession::link_info`]: the current relay
//!   connection's [`RelayPath`] (WireGuard packets through the relay on the
//!   same QUIC connection), the relay's STUN address and the overlay prefixes.
//!
//! A session that the race put on TCP/TLS moves its control stream back to
//! QUIC when QUIC reaches the relay again (see `run`): the link info then
//! changes and [`MeshEvent::Connected`] comes again without a `Disconnected`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::{RecvStream, SendStream};
use ipnet::{Ipv4Net, Ipv6Net};
use quinn::ConnectionError;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use crate::client::{
    better_session, close_failure, connect, quic_retry, ClientState, ClientTiming, FleetView,
    Session,
};
use crate::error::{ClientError, ProtoError};
use crate::keys::PublicKey;
use crate::link::{Admitted, Backoff, Failure, Link, LinkState, Next};
use crate::relay_path::RelayPath;
use crate::tcp::Choice;
use crate::token::Token;
use crate::wire::{read_control, write_control, ControlIoError};
use crate::wire::{read_message, write_message, Message};
use weft_proto::control::{ControlMsg, PeerPath, MAX_CONTROL_FRAME};
use weft_proto::peermap::{Candidate, PeerMap, PeerMapUpdate, SelfInfo, Version};

/// Events kept for a slow consumer before it gets [`MeshEvent::Lagged`].
pub const EVENT_BUFFER: usize = 1024;

/// Options of a mesh session.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// State directory (identity, relay).
    pub state_dir: PathBuf,
    /// Token for the first join (ignored by the relay once the key is known).
    pub token: Option<Token>,
    /// The name to register (made a DNS label by the coordinator).
    pub name: String,
    /// Endpoint candidates known at start (more via [`MeshSession::report_endpoints`]).
    pub endpoints: Vec<Candidate>,
    /// Connection timing.
    pub timing: ClientTiming,
    /// Reconnect timing (default [`Backoff::default`]: 250 ms doubling to
    /// 4 s, reset by a control stream that stayed up 10 s).
    pub backoff: Backoff,
}

impl MeshOptions {
    /// Defaults: keepalive 500 ms, idle timeout 2 s (a dead relay is noticed
    /// within 2 s), the default backoff.
    pub fn new(state_dir: PathBuf, name: String) -> MeshOptions {
        MeshOptions {
            state_dir,
            token: None,
            name,
            endpoints: Vec::new(),
            timing: ClientTiming {
                accept_streams: 0,
                ..ClientTiming::worker()
            },
            backoff: Backoff::default(),
        }
    }
}

/// The current relay connection.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    /// The relay's address.
    pub relay: SocketAddr,
    /// The name the relay registered (the peer map's `me.name` is the mesh
    /// name, a DNS label made from it).
    pub name: String,
    /// Send and receive WireGuard packets through the relay.
    pub relay_path: RelayPath,
    /// Where to send STUN binding requests (from the WireGuard socket).
    pub stun: Option<SocketAddr>,
    /// The overlay IPv4 pool.
    pub ipv4_pool: Ipv4Net,
    /// The overlay IPv6 prefix.
    pub ipv6_prefix: Ipv6Net,
    /// The peer codec the relay said it speaks (`MeshAccepted`; 0: not said, an older
    /// relay): from 2 on it takes path reports.
    pub relay_codec: u8,
}

/// What happened, in order.
#[derive(Debug, Clone)]
pub enum MeshEvent {
    /// Joined (again): a new relay connection.
    Connected(LinkInfo),
    /// An update was applied to the peer map (a snapshot replaces it).
    Update(PeerMapUpdate),
    /// A peer asks to be probed at these candidates now (the relay checked
    /// that the two may talk; `peer` is the sender's key).
    CallMeMaybe {
        /// The sender.
        peer: PublicKey,
        /// Its candidates.
        endpoints: Vec<Candidate>,
    },
    /// Lost the relay; retrying. The peer map stays as it was.
    Disconnected {
        /// Why.
        error: String,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
    /// Refused for good; no more events follow.
    Refused(String),
    /// The consumer fell behind and this many events were dropped: re-read
    /// [`MeshSession::peer_map`].
    Lagged(u64),
}

enum Cmd {
    CallMeMaybe {
        peer: PublicKey,
        endpoints: Vec<Candidate>,
    },
    Shutdown,
}

/// State shared by the handle and the background task.
struct Inner {
    map: watch::Sender<PeerMap>,
    link: watch::Sender<LinkState>,
    /// The current connection (set before `link` turns connected, cleared
    /// before it leaves connected).
    info: watch::Sender<Option<LinkInfo>>,
    endpoints: watch::Sender<Vec<Candidate>>,
    /// The peers this node has a WireGuard session with and whether each runs direct
    /// (reported to relays of peer codec 2 or later).
    paths: watch::Sender<Vec<PeerPath>>,
}

/// A live mesh session (see the module docs). Dropping it stops the
/// background task; [`MeshSession::close`] also says goodbye to the relay.
pub struct MeshSession {
    key: PublicKey,
    /// The fleet as the session's home watch last measured it.
    fleet: watch::Receiver<FleetView>,
    inner: Arc<Inner>,
    events: broadcast::Receiver<MeshEvent>,
    cmd: mpsc::Sender<Cmd>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for MeshSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshSession")
            .field("key", &self.key.short())
            .field("version", &self.inner.map.borrow().version)
            .finish()
    }
}

/// One joined control stream on a relay connection.
struct Live {
    session: Session,
    send: SendStream,
    recv: RecvStream,
    info: LinkInfo,
}

impl Live {
    fn admitted(&self) -> Admitted {
        Admitted {
            address: self.info.relay,
            name: self.session.name.clone(),
            tags: self.session.tags.clone(),
            transport: Some(self.session.connection().kind()),
        }
    }
}

impl MeshSession {
    /// Joins the mesh with the identity in `state_dir` (created if needed;
    /// `token` is needed on the first join only). Returns once the first
    /// peer map is held.
    pub async fn connect(
        state_dir: &Path,
        token: Option<&Token>,
        name: &str,
        endpoints: Vec<Candidate>,
    ) -> Result<MeshSession, ClientError> {
        let mut o = MeshOptions::new(state_dir.to_path_buf(), name.to_string());
        o.token = token.cloned();
        o.endpoints = endpoints;
        MeshSession::start(o).await
    }

    /// [`MeshSession::connect`] with every option.
    pub async fn start(opts: MeshOptions) -> Result<MeshSession, ClientError> {
        // Only when the race picks the transport: a forced one stays.
        let retry = match Choice::from_env() {
            Ok(Choice::Auto) => Some(quic_retry()?),
            _ => None,
        };
        let home_every = crate::client::home_probe_every()?;
        let mut state = ClientState::open(&opts.state_dir)?;
        let fleet = state.watch_fleet();
        let key = state.public_key();
        let mut link = Link::new(opts.backoff, rand::random());
        let (map, _) = watch::channel(PeerMap::default());
        let (link_tx, _) = watch::channel(link.state().clone());
        let (info, _) = watch::channel(None);
        let (endpoints, _) = watch::channel(opts.endpoints.clone());
        let (paths, _) = watch::channel(Vec::new());
        let inner = Arc::new(Inner {
            map,
            link: link_tx,
            info,
            endpoints,
            paths,
        });
        // The first attempt is the caller's: its error comes back from here.
        let mut live = join(&mut state, &opts, &inner).await?;
        // The first frame is the snapshot (a first join holds no version).
        let first = timeout(
            opts.timing.handshake_timeout,
            read_control(&mut live.recv, MAX_CONTROL_FRAME),
        )
        .await
        .map_err(|_| ProtoError::Timeout("waiting for the first peer map"))?
        .map_err(|e| ProtoError::Unexpected(e.to_string()))?;
        let (ev_tx, ev_rx) = broadcast::channel(EVENT_BUFFER);
        match first {
            ControlMsg::Snapshot(s) => {
                apply(&inner, &ev_tx, PeerMapUpdate::Snapshot(s));
            }
            other => {
                return Err(
                    ProtoError::Unexpected(format!("first mesh frame was {other:?}")).into(),
                )
            }
        }
        up(&inner, &ev_tx, &mut link, &live);
        let (cmd_tx, cmd_rx) = mpsc::channel(256);
        let span = tracing::info_span!("mesh", me = %key.short());
        let task = tokio::spawn(
            run(
                Task {
                    inner: inner.clone(),
                    opts,
                    state,
                    link,
                    cmd: cmd_rx,
                    events: ev_tx,
                    retry,
                    home_every,
                },
                live,
            )
            .instrument(span),
        );
        Ok(MeshSession {
            key,
            fleet,
            inner,
            events: ev_rx,
            cmd: cmd_tx,
            task: Some(task),
        })
    }

    /// This node's key.
    pub fn public_key(&self) -> PublicKey {
        self.key
    }

    /// The node itself as the coordinator assigned it (name, tags, overlay
    /// addresses).
    pub fn me(&self) -> Option<SelfInfo> {
        self.inner.map.borrow().me.clone()
    }

    /// A copy of the current peer map.
    pub fn peer_map(&self) -> PeerMap {
        self.inner.map.borrow().clone()
    }

    /// A receiver that sees the peer map after every applied update.
    pub fn watch_peer_map(&self) -> watch::Receiver<PeerMap> {
        self.inner.map.subscribe()
    }

    /// What this node last measured of its fleet of relays (home, round
    /// trips); empty for a relay alone.
    pub fn fleet(&self) -> FleetView {
        self.fleet.borrow().clone()
    }

    /// A receiver that sees every measurement of the fleet.
    pub fn watch_fleet(&self) -> watch::Receiver<FleetView> {
        self.fleet.clone()
    }

    /// The relay link now, as status commands show it.
    pub fn link(&self) -> LinkState {
        self.inner.link.borrow().clone()
    }

    /// A receiver that sees every link change.
    pub fn watch_link(&self) -> watch::Receiver<LinkState> {
        self.inner.link.subscribe()
    }

    /// The current relay connection (relay path, STUN address, prefixes),
    /// while the link is connected.
    pub fn link_info(&self) -> Option<LinkInfo> {
        self.inner.info.borrow().clone()
    }

    /// The relay path of the current connection, if up.
    pub fn relay_path(&self) -> Option<RelayPath> {
        self.inner
            .info
            .borrow()
            .as_ref()
            .map(|i| i.relay_path.clone())
    }

    /// The next event (`None` once the session has stopped and every event
    /// was read).
    pub async fn next_event(&mut self) -> Option<MeshEvent> {
        match self.events.recv().await {
            Ok(e) => Some(e),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(MeshEvent::Lagged(n)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    /// Replaces the node's candidates: sent to the coordinator now (if up;
    /// reports made while down are coalesced and sent on reconnect).
    pub fn report_endpoints(&self, endpoints: Vec<Candidate>) {
        self.inner.endpoints.send_replace(endpoints);
    }

    /// Replaces the node's paths (its peers with a WireGuard session, direct or relayed):
    /// sent to the coordinator when they change, if its relay takes them (peer codec 2);
    /// the same list again sends nothing.
    pub fn report_paths(&self, mut paths: Vec<PeerPath>) {
        paths.sort();
        paths.truncate(weft_proto::control::MAX_PATHS);
        self.inner.paths.send_if_modified(|p| {
            let changed = *p != paths;
            if changed {
                *p = paths;
            }
            changed
        });
    }

    /// Asks `peer` (through the relay) to probe `endpoints` now. Returns
    /// false when it could not be queued (session stopped or busy); the relay
    /// drops it silently when the two may not talk.
    pub fn call_me_maybe(&self, peer: PublicKey, endpoints: Vec<Candidate>) -> bool {
        self.cmd
            .try_send(Cmd::CallMeMaybe { peer, endpoints })
            .is_ok()
    }

    /// Ends the session politely (closes the relay connection).
    pub async fn close(mut self) {
        let _ = self.cmd.send(Cmd::Shutdown).await;
        if let Some(t) = self.task.take() {
            let _ = timeout(Duration::from_secs(2), t).await;
        }
    }
}

impl Drop for MeshSession {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

fn apply(inner: &Inner, events: &broadcast::Sender<MeshEvent>, u: PeerMapUpdate) -> bool {
    let mut ok = true;
    inner.map.send_if_modified(|m| {
        ok = m.apply(&u).is_ok();
        ok
    });
    if ok {
        let _ = events.send(MeshEvent::Update(u));
    }
    ok
}

/// Admission, then the control stream on the new connection.
async fn join(
    state: &mut ClientState,
    opts: &MeshOptions,
    inner: &Inner,
) -> Result<Live, ClientError> {
    let session = connect(
        state,
        opts.token.as_ref(),
        &opts.name,
        Vec::new(),
        &opts.timing,
    )
    .await?;
    match open_stream(&session, opts, inner).await {
        Ok((send, recv, info)) => Ok(Live {
            session,
            send,
            recv,
            info,
        }),
        Err(e) => {
            session.close().await;
            Err(e)
        }
    }
}

/// `MeshJoin` → `MeshAccepted` on a new stream of an admitted connection,
/// asking for this build's peer codec. A relay that predates the codec field
/// does not know the message and resets the stream (a framing error here, no
/// answer): the node asks again on a new stream with codec 0 (peer entries
/// without their home relay).
async fn open_stream(
    session: &Session,
    opts: &MeshOptions,
    inner: &Inner,
) -> Result<(SendStream, RecvStream, LinkInfo), ClientError> {
    match join_stream(session, opts, inner, weft_proto::control::PEER_CODEC).await {
        Err(ClientError::Proto(ProtoError::Frame(e))) => {
            debug!(error = %e, "mesh join with peer codec {} not answered; trying the first codec", weft_proto::control::PEER_CODEC);
            join_stream(session, opts, inner, 0).await
        }
        other => other,
    }
}

async fn join_stream(
    session: &Session,
    opts: &MeshOptions,
    inner: &Inner,
    peer_codec: u8,
) -> Result<(SendStream, RecvStream, LinkInfo), ClientError> {
    let conn = session.connection();
    let (mut send, mut recv) = conn.open_bi().await.map_err(ProtoError::from)?;
    let since: Option<Version> = inner.map.borrow().version;
    let endpoints = inner.endpoints.borrow().clone();
    let join = Message::MeshJoin {
        since,
        endpoints,
        peer_codec,
    };
    write_message(&mut send, &join)
        .await
        .map_err(ProtoError::from)?;
    let answer = timeout(opts.timing.handshake_timeout, read_message(&mut recv))
        .await
        .map_err(|_| ProtoError::Timeout("mesh join"))?
        .map_err(ProtoError::from)?;
    match answer {
        Message::MeshAccepted {
            stun,
            ipv4_pool,
            ipv6_prefix,
            peer_codec: relay_codec,
        } => {
            let relay = conn.remote_address();
            // A relay bound to 0.0.0.0 / [::] answers STUN at the address we reach it at.
            let stun = stun.map(|s| {
                if s.ip().is_unspecified() {
                    SocketAddr::new(relay.ip(), s.port())
                } else {
                    s
                }
            });
            Ok((
                send,
                recv,
                LinkInfo {
                    relay,
                    name: session.name.clone(),
                    relay_path: RelayPath::new(conn.clone()),
                    stun,
                    ipv4_pool,
                    ipv6_prefix,
                    relay_codec,
                },
            ))
        }
        Message::Rejected(r) => Err(ClientError::Rejected(r)),
        other => Err(ProtoError::Unexpected(format!("mesh join answered with {other:?}")).into()),
    }
}

/// Why a control stream (or its connection) ended.
enum StreamEnd {
    /// `close` was called.
    Shutdown,
    /// The connection is gone.
    Connection(ConnectionError),
    /// Only the stream ended (reset by the relay, bad frame).
    Stream(String),
}

/// The background task: a `select!` shell around the link core. Connected:
/// drive the control stream; its end goes to the core, which says when to
/// try again (or to give up). A control stream that ended on a live
/// connection is rejoined on that connection.
///
/// On the TCP/TLS fallback by choice of the race (not forced), it tries a
/// QUIC session every `retry` meanwhile ([`back_to_quic`]); once one is
/// admitted, the control stream moves to it (the relay supersedes the old
/// stream, keeps the node online, and sends relayed packets to the new
/// connection) and the TCP/TLS connection closes.
async fn run(t: Task, first: Live) {
    let Task {
        inner,
        opts,
        mut state,
        mut link,
        mut cmd,
        events,
        retry,
        home_every,
    } = t;
    let mut live = Some(first);
    loop {
        match link.poll(Instant::now()) {
            Next::Idle => {
                let Some(l) = live.as_mut() else {
                    // Not reached: connected means a live control stream.
                    link.failed(
                        Instant::now(),
                        &Failure::Transient("no control stream".into()),
                    );
                    continue;
                };
                let current = l.session.view();
                let end = tokio::select! {
                    end = drive(&inner, l, &mut cmd, &events) => end,
                    better = better_session(&mut state, opts.token.as_ref(), &opts.name, &[], &opts.timing, &current, retry, home_every) => {
                        // The old stream is no longer read: the relay supersedes it
                        // when the new one joins (or, after a move to a nearer relay,
                        // the old relay sees it close).
                        let moved = better.connection().remote_address() != current.connection().remote_address();
                        let joined = tokio::select! {
                            r = open_stream(&better, &opts, &inner) => r,
                            _ = wait_shutdown(&mut cmd) => {
                                better.close().await;
                                break;
                            }
                        };
                        match joined {
                            Ok((send, recv, info)) => {
                                let old = std::mem::replace(l, Live { session: better, send, recv, info });
                                old.session.close().await;
                                if moved {
                                    info!(relay = %l.info.relay, "mesh session moved home to a nearer relay");
                                } else {
                                    info!(relay = %l.info.relay, "mesh session back on QUIC; the TCP/TLS connection is closed");
                                }
                                up(&inner, &events, &mut link, l);
                            }
                            Err(e) => {
                                // The old stream may have been superseded meanwhile: if so,
                                // its end comes next and the core rejoins.
                                debug!(error = %e, "joining the mesh on the better connection failed; staying");
                                better.close().await;
                            }
                        }
                        continue;
                    }
                };
                let conn_gone = l.session.connection().close_reason();
                let failure = match end {
                    StreamEnd::Shutdown => break,
                    StreamEnd::Stream(why) => match conn_gone {
                        // Same connection: rejoin on it when the core says so.
                        None => {
                            debug!(error = %why, "mesh control stream ended; rejoining on the same connection");
                            Failure::Transient(format!("mesh control stream ended: {why}"))
                        }
                        Some(e) => close_failure(&e),
                    },
                    StreamEnd::Connection(e) => close_failure(&e),
                };
                let remote = l.session.connection().remote_address();
                let reason = l.session.connection().close_reason();
                let draining = reason
                    .as_ref()
                    .is_some_and(crate::client::is_draining_close);
                if reason.is_some() {
                    live = None;
                }
                inner.info.send_replace(None);
                if link.failed(Instant::now(), &failure) == Next::Done {
                    break;
                }
                match &failure {
                    Failure::RelayRestarting(_) if draining => {
                        crate::client::relay_lost(remote);
                        info!(error = %failure, "relay draining; moving to another relay of the fleet")
                    }
                    Failure::RelayRestarting(_) => {
                        info!(error = %failure, "relay restarting; reconnecting soon")
                    }
                    _ if live.is_none() => {
                        crate::client::relay_lost(remote);
                        warn!(error = %failure, "lost the relay; reconnecting")
                    }
                    _ => {}
                }
                disconnected(&inner, &events, &link);
            }
            Next::WaitUntil(at) => {
                inner.link.send_replace(link.state().clone());
                if !pause_until(&mut cmd, at).await {
                    break;
                }
            }
            Next::Connect => {
                inner.link.send_replace(link.state().clone());
                let attempt = async {
                    match live.take() {
                        Some(l) if l.session.connection().close_reason().is_none() => {
                            rejoin(l, &opts, &inner).await
                        }
                        Some(l) => {
                            l.session.close().await;
                            join(&mut state, &opts, &inner).await
                        }
                        None => join(&mut state, &opts, &inner).await,
                    }
                };
                let r = tokio::select! {
                    r = attempt => r,
                    _ = wait_shutdown(&mut cmd) => break,
                };
                match r {
                    Ok(l) => {
                        info!(relay = %l.info.relay, "mesh session up");
                        up(&inner, &events, &mut link, &l);
                        live = Some(l);
                    }
                    Err(e) => {
                        if link.failed(Instant::now(), &e.failure()) == Next::Done {
                            break;
                        }
                        warn!(error = %e, retry_in_ms = ?retry_in(&link).as_millis(), "relay unreachable");
                        disconnected(&inner, &events, &link);
                    }
                }
            }
            Next::Done => break,
        }
    }
    if let Some(l) = live.take() {
        l.session.close().await;
    }
    inner.info.send_replace(None);
    if let LinkState::Failed { reason } = link.state() {
        warn!(reason = %reason, "the relay refused this node; mesh session stopped");
        let _ = events.send(MeshEvent::Refused(reason.clone()));
    } else {
        link.stop();
    }
    inner.link.send_replace(link.state().clone());
}

/// What the background task owns besides the live control stream.
struct Task {
    inner: Arc<Inner>,
    opts: MeshOptions,
    state: ClientState,
    link: Link,
    cmd: mpsc::Receiver<Cmd>,
    events: broadcast::Sender<MeshEvent>,
    /// How often a session on TCP/TLS tries QUIC again; `None` with a forced transport.
    retry: Option<Duration>,
    /// How often the fleet's relays are measured (a nearer home); `None`: never.
    home_every: Option<Duration>,
}

/// A new control stream on the connection of `l`, whose stream ended.
async fn rejoin(mut l: Live, opts: &MeshOptions, inner: &Inner) -> Result<Live, ClientError> {
    match open_stream(&l.session, opts, inner).await {
        Ok((send, recv, info)) => {
            l.send = send;
            l.recv = recv;
            l.info = info;
            Ok(l)
        }
        Err(e) => {
            debug!(error = %e, "rejoin on the same connection failed");
            l.session.close().await;
            Err(e)
        }
    }
}

/// Joined: tells the core, publishes the connection, announces it.
fn up(inner: &Inner, events: &broadcast::Sender<MeshEvent>, link: &mut Link, l: &Live) {
    link.connected(Instant::now(), l.admitted());
    inner.info.send_replace(Some(l.info.clone()));
    inner.link.send_replace(link.state().clone());
    let _ = events.send(MeshEvent::Connected(l.info.clone()));
}

/// The delay before the next attempt, as the core chose it.
fn retry_in(link: &Link) -> Duration {
    match link.state() {
        LinkState::Retrying { retry_in_ms, .. } => Duration::from_millis(*retry_in_ms),
        _ => Duration::ZERO,
    }
}

/// Publishes "retrying" and announces the outage.
fn disconnected(inner: &Inner, events: &broadcast::Sender<MeshEvent>, link: &Link) {
    let state = link.state().clone();
    if let LinkState::Retrying { last_error, .. } = &state {
        let _ = events.send(MeshEvent::Disconnected {
            error: last_error.clone(),
            retry_in: retry_in(link),
        });
    }
    inner.link.send_replace(state);
}

/// Sleeps until `at`; false if shut down meanwhile.
async fn pause_until(cmd: &mut mpsc::Receiver<Cmd>, at: Instant) -> bool {
    let sleep = tokio::time::sleep_until(at.into());
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => return true,
            c = cmd.recv() => match c {
                // Call-me-maybe while down: nobody to tell; dropped.
                Some(Cmd::CallMeMaybe { .. }) => {}
                Some(Cmd::Shutdown) | None => return false,
            },
        }
    }
}

/// Resolves on `Shutdown` (or when the handle is gone); drops other commands.
async fn wait_shutdown(cmd: &mut mpsc::Receiver<Cmd>) {
    loop {
        match cmd.recv().await {
            Some(Cmd::CallMeMaybe { .. }) => {}
            Some(Cmd::Shutdown) | None => return,
        }
    }
}

/// Runs one joined control stream until it or its connection ends.
async fn drive(
    inner: &Inner,
    l: &mut Live,
    cmd: &mut mpsc::Receiver<Cmd>,
    events: &broadcast::Sender<MeshEvent>,
) -> StreamEnd {
    let conn = l.session.connection().clone();
    // One resync request at a time: deltas already in flight behind a gap
    // would each ask again.
    let mut resync_pending = false;
    let mut endpoints = inner.endpoints.subscribe();
    endpoints.mark_unchanged(); // MeshJoin carried the current ones

    // Paths go only to a relay that takes them; a new stream starts with the current ones.
    let reports = l.info.relay_codec >= 2;
    let mut paths = inner.paths.subscribe();
    if reports && !paths.borrow_and_update().is_empty() {
        let m = ControlMsg::PathReport(paths.borrow().clone());
        if let Err(e) = write_control(&mut l.send, &m).await {
            return match conn.close_reason() {
                Some(c) => StreamEnd::Connection(c),
                None => StreamEnd::Stream(e.to_string()),
            };
        }
    }
    loop {
        let out: Option<ControlMsg> = tokio::select! {
            m = read_control(&mut l.recv, MAX_CONTROL_FRAME) => match m {
                Ok(ControlMsg::Snapshot(s)) => {
                    apply(inner, events, PeerMapUpdate::Snapshot(s));
                    resync_pending = false;
                    None
                }
                Ok(ControlMsg::Delta(d)) => {
                    if apply(inner, events, PeerMapUpdate::Delta(d)) {
                        resync_pending = false;
                        None
                    } else if resync_pending {
                        None
                    } else {
                        resync_pending = true;
                        // A gap: ask for what is missing from the version held.
                        let have = inner.map.borrow().version.unwrap_or_default();
                        debug!(have = ?have, "peer-map gap; resyncing");
                        Some(ControlMsg::Ack(have))
                    }
                }
                Ok(ControlMsg::CallMeMaybe { peer, endpoints }) => {
                    let _ = events.send(MeshEvent::CallMeMaybe { peer, endpoints });
                    None
                }
                Ok(other) => return StreamEnd::Stream(format!("relay sent {other:?} on the control stream")),
                Err(ControlIoError::Io(e)) => {
                    return match conn.close_reason() {
                        Some(c) => StreamEnd::Connection(c),
                        None => StreamEnd::Stream(e.to_string()),
                    }
                }
                Err(e) => return StreamEnd::Stream(e.to_string()),
            },
            c = endpoints.changed() => match c {
                Ok(()) => Some(ControlMsg::EndpointReport(endpoints.borrow_and_update().clone())),
                Err(_) => return StreamEnd::Shutdown,
            },
            c = paths.changed(), if reports => match c {
                Ok(()) => Some(ControlMsg::PathReport(paths.borrow_and_update().clone())),
                Err(_) => return StreamEnd::Shutdown,
            },
            c = cmd.recv() => match c {
                Some(Cmd::CallMeMaybe { peer, endpoints }) => Some(ControlMsg::CallMeMaybe { peer, endpoints }),
                Some(Cmd::Shutdown) | None => return StreamEnd::Shutdown,
            },
            e = conn.closed() => return StreamEnd::Connection(e),
        };
        if let Some(m) = out {
            if let Err(e) = write_control(&mut l.send, &m).await {
                return match conn.close_reason() {
                    Some(c) => StreamEnd::Connection(c),
                    None => StreamEnd::Stream(e.to_string()),
                };
            }
        }
    }
}
