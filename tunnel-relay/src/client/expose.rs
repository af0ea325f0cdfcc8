//! The provider role (`expose`): keeps an admitted session to the relay and
//! serves the tunnels the relay opens, to local TCP services or in-process
//! handlers. Reconnecting is the link core's call ([`crate::link::Link`]);
//! this is its shell.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::{RecvStream, SendStream};
use quinn::{ConnectionError, VarInt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use super::home::better_session;
use super::session::{close_failure, connect, quic_retry, ClientTiming, Session};
use super::state::ClientState;
use crate::error::{ClientError, ProtoError};
use crate::link::{Admitted, Backoff, Failure, Link, LinkState, Next};
use crate::splice::quic_tcp;
use crate::tcp::Choice;
use crate::token::Token;
use crate::wire::{read_message, write_message, Message, Reason, Rejection};

/// A tunnel stream for an in-process service, handed over after `OpenOk`
/// was sent: the engineer's bytes arrive on `recv`, the answer goes to `send`.
#[derive(Debug)]
pub struct IncomingStream {
    /// The opener's registered name, authenticated by the relay (Noise IK
    /// admission of the opener; this worker pins the relay's key).
    pub from: String,
    /// The service opened (a key of [`ExposeOptions::handlers`]).
    pub service: String,
    /// Towards the engineer.
    pub send: SendStream,
    /// From the engineer.
    pub recv: RecvStream,
}

/// Options of the provider role.
#[derive(Debug, Clone)]
pub struct ExposeOptions {
    /// State directory (identity, relay).
    pub state_dir: PathBuf,
    /// Token for the first join (ignored by the relay once the key is known).
    pub token: Option<Token>,
    /// The worker's name.
    pub name: String,
    /// Services: name → local `host:port`.
    pub services: Vec<(String, String)>,
    /// Connection timing.
    pub timing: ClientTiming,
    /// Reconnect timing (default [`Backoff::default`]: 250 ms doubling to
    /// 4 s, reset by a connection that stayed up 10 s).
    pub backoff: Backoff,
    /// In-process services: name → where accepted streams go (after `OpenOk`).
    /// A name here takes precedence over the same name in `services`. When the
    /// receiver is gone or does not take the stream within 5 s, the opener is
    /// refused with `service unavailable`.
    pub handlers: HashMap<String, mpsc::Sender<IncomingStream>>,
    /// Where `expose` publishes its link state (none by default).
    pub link: Option<watch::Sender<LinkState>>,
}

impl ExposeOptions {
    /// Defaults: worker timing, the default backoff.
    pub fn new(state_dir: PathBuf, name: String, services: Vec<(String, String)>) -> ExposeOptions {
        ExposeOptions {
            state_dir,
            token: None,
            name,
            services,
            timing: ClientTiming::worker(),
            backoff: Backoff::default(),
            handlers: HashMap::new(),
            link: None,
        }
    }
}

/// The provider loop: joins (or reconnects), serves relay-opened tunnels by
/// connecting to the local services, and reconnects when the link core says
/// so (jittered, capped exponential backoff; promptly when the relay
/// announces a restart). Returns on `shutdown`, or with the reason when the
/// relay refuses this node for good.
pub async fn expose(
    opts: ExposeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let publish = |l: &LinkState| {
        if let Some(tx) = &opts.link {
            tx.send_if_modified(|cur| {
                let changed = cur != l;
                if changed {
                    *cur = l.clone();
                }
                changed
            });
        }
    };
    let mut link = Link::new(opts.backoff, rand::random());
    let result = expose_inner(&opts, &mut link, &publish, shutdown).await;
    if result.is_ok() {
        link.stop();
    }
    publish(link.state());
    result
}

async fn expose_inner(
    opts: &ExposeOptions,
    link: &mut Link,
    publish: &impl Fn(&LinkState),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    publish(link.state());
    let mut state = match ClientState::open(&opts.state_dir) {
        Ok(s) => s,
        Err(e) => {
            let e = ClientError::from(e);
            link.failed(Instant::now(), &e.failure());
            return Err(e);
        }
    };
    let me = state.public_key().short();
    let mut targets: HashMap<String, Local> = opts
        .services
        .iter()
        .map(|(n, a)| (n.clone(), Local::Tcp(a.clone())))
        .collect();
    for (n, tx) in &opts.handlers {
        targets.insert(n.clone(), Local::InProcess(tx.clone()));
    }
    let mut names: Vec<String> = targets.keys().cloned().collect();
    names.sort();
    let services = Arc::new(targets);
    let home_every = match super::home::home_probe_every() {
        Ok(e) => e,
        Err(e) => {
            link.failed(Instant::now(), &e.failure());
            return Err(e);
        }
    };
    // Only when the race picks the transport: a forced one stays.
    let retry = match Choice::from_env() {
        Ok(Choice::Auto) => match quic_retry() {
            Ok(d) => Some(d),
            Err(e) => {
                link.failed(Instant::now(), &e.failure());
                return Err(e);
            }
        },
        _ => None,
    };
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let next = link.poll(Instant::now());
        publish(link.state());
        match next {
            Next::WaitUntil(at) => tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = &mut shutdown => return Ok(()),
            },
            Next::Connect => {
                let attempt = connect(
                    &mut state,
                    opts.token.as_ref(),
                    &opts.name,
                    names.clone(),
                    &opts.timing,
                );
                let result = tokio::select! {
                    r = attempt => r,
                    _ = &mut shutdown => return Ok(()),
                };
                let session = match result {
                    Ok(s) => s,
                    Err(e) => {
                        if link.failed(Instant::now(), &e.failure()) == Next::Done {
                            warn!(me = %me, error = %e, "the relay refused this node; not retrying");
                            return Err(e);
                        }
                        if matches!(
                            e.failure(),
                            crate::link::Failure::Refused {
                                reason: Reason::AwaitingApproval,
                                ..
                            }
                        ) {
                            info!(me = %me, error = %e, retry_in_ms = retry_in_ms(link), "waiting for an operator of the relay to approve this node");
                        } else {
                            warn!(me = %me, error = %e, retry_in_ms = retry_in_ms(link), "relay unreachable");
                        }
                        continue;
                    }
                };
                let relay = session.conn.remote_address();
                info!(me = %me, name = %session.name, services = ?names, relay = %relay, "exposed via relay");
                link.connected(
                    Instant::now(),
                    Admitted {
                        address: relay,
                        name: session.name.clone(),
                        tags: session.tags.clone(),
                        transport: Some(session.conn.kind()),
                    },
                );
                publish(link.state());
                let mut session = Arc::new(session);
                let mut open = Arc::new(AtomicUsize::new(0));
                // Connections left behind by a move (back to QUIC, or to a nearer
                // relay of the fleet), until their tunnels end.
                let mut draining: Vec<Arc<Session>> = Vec::new();
                let end = loop {
                    // On the TCP/TLS fallback by choice of the race (not forced), try QUIC
                    // again now and then; in a fleet, measure the relays now and then and
                    // move to a clearly nearer one. Open tunnels stay where they are until
                    // they end.
                    let current = session.view();
                    let upgrade = better_session(
                        &mut state,
                        None,
                        &opts.name,
                        &names,
                        &opts.timing,
                        &current,
                        retry,
                        home_every,
                    );
                    tokio::select! {
                        e = serve_worker(session.clone(), services.clone(), open.clone()) => break e,
                        better = upgrade => {
                            let moved = better.conn.remote_address() != session.conn.remote_address();
                            let old = std::mem::replace(&mut session, Arc::new(better));
                            let old_open = std::mem::replace(&mut open, Arc::new(AtomicUsize::new(0)));
                            draining.retain(|d: &Arc<Session>| d.conn.close_reason().is_none());
                            draining.push(old.clone());
                            tokio::spawn(drain(old, services.clone(), old_open, moved).in_current_span());
                            if moved {
                                info!(me = %me, relay = %session.conn.remote_address(), "moved home to a nearer relay; tunnels open on the old one stay there until they end");
                            } else {
                                info!(me = %me, relay = %session.conn.remote_address(), "back on QUIC; tunnels open over TCP/TLS stay there until they end");
                            }
                            link.connected(
                                Instant::now(),
                                Admitted {
                                    address: session.conn.remote_address(),
                                    name: session.name.clone(),
                                    tags: session.tags.clone(),
                                    transport: Some(session.conn.kind()),
                                },
                            );
                            publish(link.state());
                        }
                        _ = &mut shutdown => {
                            for d in &draining {
                                d.close_with(b"worker shutting down", Duration::ZERO).await;
                            }
                            session.close_with(b"worker shutting down", Duration::from_secs(1)).await;
                            return Ok(());
                        }
                    }
                };
                let failure = close_failure(&end);
                if link.failed(Instant::now(), &failure) == Next::Done {
                    warn!(me = %me, reason = %failure, "the relay closed this node's connection for good");
                    return Err(match failure {
                        Failure::Refused { reason, .. } => {
                            ClientError::Rejected(Rejection::new(reason, "closed by the relay"))
                        }
                        _ => ProtoError::Connection(end).into(),
                    });
                }
                match failure {
                    Failure::RelayRestarting(_) if super::session::is_draining_close(&end) => {
                        crate::client::relay_lost(session.conn.remote_address());
                        info!(me = %me, reason = %end, "relay draining; moving to another relay of the fleet")
                    }
                    Failure::RelayRestarting(_) => {
                        info!(me = %me, reason = %end, retry_in_ms = retry_in_ms(link), "relay restarting; reconnecting soon")
                    }
                    _ => {
                        crate::client::relay_lost(session.conn.remote_address());
                        warn!(me = %me, reason = %end, retry_in_ms = retry_in_ms(link), "lost the relay; reconnecting")
                    }
                }
            }
            // Not reached: every connection's end is reported above, and a
            // final state returns there.
            Next::Idle | Next::Done => return Ok(()),
        }
    }
}

/// The delay the link core chose, for logs.
fn retry_in_ms(link: &Link) -> u64 {
    match link.state() {
        LinkState::Retrying { retry_in_ms, .. } => *retry_in_ms,
        _ => 0,
    }
}

/// Where a worker's service lives.
#[derive(Debug)]
enum Local {
    /// A TCP `host:port`, spliced.
    Tcp(String),
    /// An in-process handler.
    InProcess(mpsc::Sender<IncomingStream>),
}

/// Serves a connection left behind by a move until it ends. The relay
/// closes one replaced by a QUIC session to itself once its tunnels end; a
/// connection to another relay (`moved` home) is closed here once its
/// tunnels end.
async fn drain(
    old: Arc<Session>,
    services: Arc<HashMap<String, Local>>,
    open: Arc<AtomicUsize>,
    moved: bool,
) {
    let closer = async {
        if !moved {
            return std::future::pending().await;
        }
        while open.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    };
    tokio::select! {
        end = serve_worker(old.clone(), services, open.clone()) => {
            // (Only a move back to QUIC ends here: the relay closes a replaced connection.)
            info!(reason = %end, "the TCP/TLS connection closed after its last tunnel");
        }
        () = closer => {
            old.close_with(b"moved to a nearer relay", Duration::from_secs(1)).await;
            info!(relay = %old.conn.remote_address(), "left the old relay after its last tunnel");
        }
    }
}

async fn serve_worker(
    session: Arc<Session>,
    services: Arc<HashMap<String, Local>>,
    open: Arc<AtomicUsize>,
) -> ConnectionError {
    loop {
        match session.conn.accept_bi().await {
            Ok((send, recv)) => {
                let services = services.clone();
                let open = open.clone();
                open.fetch_add(1, Ordering::AcqRel);
                tokio::spawn(
                    async move {
                        worker_tunnel(send, recv, services).await;
                        open.fetch_sub(1, Ordering::AcqRel);
                    }
                    .in_current_span(),
                );
            }
            Err(e) => return e,
        }
    }
}

/// Answers an `Incoming` with `Rejected{reason, detail}`, then finishes the stream.
async fn refuse(send: &mut SendStream, reason: Reason, detail: String) {
    let rej = Rejection::new(reason, detail);
    let _ = write_message(send, &Message::Rejected(rej)).await;
    let _ = send.finish();
}

async fn worker_tunnel(
    mut send: SendStream,
    mut recv: RecvStream,
    services: Arc<HashMap<String, Local>>,
) {
    let (from, service) = match timeout(Duration::from_secs(10), read_message(&mut recv)).await {
        Ok(Ok(Message::Incoming { from, service })) => (from, service),
        _ => {
            let _ = send.reset(VarInt::from_u32(1));
            return;
        }
    };
    let addr = match services.get(&service) {
        None => {
            return refuse(&mut send, Reason::NoSuchService, format!("{service:?}")).await;
        }
        Some(Local::InProcess(tx)) => {
            return hand_over(tx, from, service, send, recv).await;
        }
        Some(Local::Tcp(addr)) => addr,
    };
    let tcp = match timeout(Duration::from_secs(5), TcpStream::connect(addr.as_str())).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            debug!(%service, %addr, error = %e, "local service refused");
            let detail = format!("{service}: {e}");
            return refuse(&mut send, Reason::ServiceUnavailable, detail).await;
        }
        Err(_) => {
            let detail = format!("{service}: connect timed out");
            return refuse(&mut send, Reason::ServiceUnavailable, detail).await;
        }
    };
    let _ = tcp.set_nodelay(true);
    if write_message(&mut send, &Message::OpenOk).await.is_err() {
        return;
    }
    debug!(%from, %service, "tunnel to local service open");
    let (up, down) = quic_tcp(send, recv, tcp).await;
    debug!(%from, %service, to_engineer = up, to_service = down, "tunnel closed");
}

/// Gives an accepted stream to an in-process service: reserves a slot in its
/// queue first, so `OpenOk` is only sent when the service takes the stream.
async fn hand_over(
    tx: &mpsc::Sender<IncomingStream>,
    from: String,
    service: String,
    mut send: SendStream,
    recv: RecvStream,
) {
    let permit = match timeout(Duration::from_secs(5), tx.reserve()).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) | Err(_) => {
            debug!(%service, "in-process service not accepting");
            let detail = format!("{service}: not accepting connections");
            return refuse(&mut send, Reason::ServiceUnavailable, detail).await;
        }
    };
    if write_message(&mut send, &Message::OpenOk).await.is_err() {
        return;
    }
    debug!(%from, %service, "tunnel to in-process service open");
    permit.send(IncomingStream {
        from,
        service,
        send,
        recv,
    });
}
