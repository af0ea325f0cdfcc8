//! A session to the relay: QUIC, then Noise IK admission (`Hello` →
//! `Accepted` / `Rejected`) on the control stream; how a connection's end
//! reads to the link core ([`close_failure`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::transport::{Connection, RecvStream, SendStream};
use quinn::{ConnectionError, Endpoint, VarInt};
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Mutex;
use tokio::time::timeout;
use tracing::{debug, info};

use super::state::ClientState;
use crate::error::{ClientError, ProtoError};
use crate::keys::{PublicKey, StaticKey};
use crate::link::Failure;
use crate::noise;
use crate::tls;
use crate::token::Token;
use crate::wire::{
    read_message, write_message, Hello, Message, Reason, Rejection, RelayEntry, Target,
    PROTOCOL_VERSION,
};
use crate::{mux, tcp};
use weft_proto::close::CloseCode;

/// Timing of a client's connection to the relay.
#[derive(Debug, Clone)]
pub struct ClientTiming {
    /// QUIC keepalive interval.
    pub keepalive: Duration,
    /// QUIC idle timeout (the relay's may be shorter).
    pub idle_timeout: Duration,
    /// Time for QUIC + Noise.
    pub handshake_timeout: Duration,
    /// Tunnels the relay may open to this node at once (workers); 0 for engineers.
    pub accept_streams: u32,
}

impl ClientTiming {
    /// Workers: frequent keepalives so a dead relay is noticed fast.
    pub fn worker() -> ClientTiming {
        ClientTiming {
            // A dead relay (or a path that stopped passing UDP) is noticed in 2 s: four
            // keepalives unanswered. With the back-off and the race, the worker is back
            // through another relay of a fleet, or over TCP/TLS, in about 2.5 s
            // (tests/tests/lab/fleet.rs, tests/tests/lab/reach.rs, tests/bench/fleet).
            keepalive: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(2),
            handshake_timeout: Duration::from_secs(5),
            accept_streams: 1024,
        }
    }
    /// Engineers: interactive sessions that may sit idle.
    pub fn engineer() -> ClientTiming {
        ClientTiming {
            keepalive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            accept_streams: 0,
        }
    }
}

/// An admitted connection to the relay.
pub struct Session {
    /// The QUIC endpoint (none on the TCP/TLS fallback).
    pub(super) endpoint: Option<Endpoint>,
    pub(super) conn: Connection,
    control: Arc<Mutex<(SendStream, RecvStream)>>,
    /// The registered name.
    pub name: String,
    /// The node's tags.
    pub tags: Vec<String>,
    /// The other relays of the fleet, as this one announced them.
    pub relays: Vec<String>,
    /// The relay reset an `Open` that asked for redirects (it predates
    /// them): ask it without from now on.
    no_redirect: AtomicBool,
}

/// What [`Session::open_or_redirect`] got.
pub enum Opened {
    /// The tunnel, on this session's relay.
    Stream(SendStream, RecvStream),
    /// The worker is on this other relay of the fleet: open it there.
    Redirect {
        /// Its name.
        relay: String,
        /// Where to reach it.
        addrs: Vec<String>,
    },
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("name", &self.name)
            .field("tags", &self.tags)
            .field("remote", &self.conn.remote_address())
            .finish()
    }
}

/// How often a long-lived session on the TCP/TLS fallback tries QUIC again
/// by default (`WEFT_QUIC_RETRY` sets it, e.g. `30s`).
pub const QUIC_RETRY_DEFAULT: Duration = Duration::from_secs(180);

/// How often a session on TCP/TLS tries QUIC again: `WEFT_QUIC_RETRY` (a
/// duration such as `30s` or `5m`), else [`QUIC_RETRY_DEFAULT`].
pub fn quic_retry() -> Result<Duration, ClientError> {
    match std::env::var("WEFT_QUIC_RETRY") {
        Ok(v) => weft_proto::duration::parse(&v)
            .map_err(|e| ClientError::Usage(format!("WEFT_QUIC_RETRY={v:?}: {e}"))),
        Err(_) => Ok(QUIC_RETRY_DEFAULT),
    }
}

/// Joins or reconnects to the relay. With a token, the relay address and key
/// come from it and, once admitted, are remembered in the state directory.
pub async fn connect(
    state: &mut ClientState,
    token: Option<&Token>,
    name: &str,
    services: Vec<String>,
    timing: &ClientTiming,
) -> Result<Session, ClientError> {
    connect_with(state, token, name, services, timing, None).await
}

/// [`connect`], over the transport `force` names instead of the one
/// `WEFT_RELAY_TRANSPORT` asks for.
pub async fn connect_with(
    state: &mut ClientState,
    token: Option<&Token>,
    name: &str,
    services: Vec<String>,
    timing: &ClientTiming,
    force: Option<tcp::Choice>,
) -> Result<Session, ClientError> {
    let (addrs, relay_key) = state.relay_target(token)?;
    connect_to(
        state, token, &addrs, relay_key, name, services, timing, force, true,
    )
    .await
}

/// A session on one of `addrs` only (a relay of the node's fleet: a move to
/// a nearer home), over the transport the race picks.
pub(crate) async fn connect_addrs(
    state: &mut ClientState,
    token: Option<&Token>,
    name: &str,
    services: &[String],
    timing: &ClientTiming,
    addrs: &[String],
) -> Result<Session, ClientError> {
    let (_, relay_key) = state.relay_target(token)?;
    connect_to(
        state,
        token,
        addrs,
        relay_key,
        name,
        services.to_vec(),
        timing,
        None,
        true,
    )
    .await
}

/// An engineer's session on the relay of the fleet at `addrs` that a
/// [`Message::Redirect`] named (the worker's home relay), for tunnels only:
/// the node's own relay order (`relay.json`, its home first) is left as it
/// was.
pub async fn connect_visit(
    state: &mut ClientState,
    addrs: &[String],
    timing: &ClientTiming,
) -> Result<Session, ClientError> {
    let (_, relay_key) = state.relay_target(None)?;
    connect_to(
        state,
        None,
        addrs,
        relay_key,
        "",
        Vec::new(),
        timing,
        None,
        false,
    )
    .await
}

/// A session on the first of `addrs` to admit the node. `remember`: the
/// relay that did goes first in `relay.json` (and the token is saved).
#[allow(clippy::too_many_arguments)]
async fn connect_to(
    state: &mut ClientState,
    token: Option<&Token>,
    addrs: &[String],
    relay_key: PublicKey,
    name: &str,
    services: Vec<String>,
    timing: &ClientTiming,
    force: Option<tcp::Choice>,
    remember: bool,
) -> Result<Session, ClientError> {
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: name.to_string(),
        join_secret: token.map(|t| t.secret.clone()),
        services,
    });
    let mut last = String::from("no address");
    let mut targets: Vec<(String, SocketAddr)> = Vec::new();
    for a in addrs {
        match tokio::net::lookup_host(a.as_str()).await {
            Ok(it) => targets.extend(it.map(|sa| (a.clone(), sa))),
            Err(e) => last = format!("{a}: {e}"),
        }
    }
    // Relays whose connection was just lost (not restarting) go last. When the
    // preferred one is among them (its nodes are failing over all at once), the
    // others go in random order: the herd spreads over the fleet.
    let failing_over = targets.first().is_some_and(|(_, a)| suspect(*a));
    targets.sort_by_key(|(_, a)| suspect(*a));
    if failing_over {
        let n = targets.iter().take_while(|(_, a)| !suspect(*a)).count();
        for i in (1..n).rev() {
            targets.swap(i, (rand::random::<u64>() % (i as u64 + 1)) as usize);
        }
        // Where the node measured its fleet: the nearest survivors first (those
        // within SWITCH_MIN_GAIN of the nearest, and those it could not measure,
        // in random order), then the farther ones by latency.
        let fleet = state.fleet();
        let rtts = fleet.rtts();
        let rtt_of = |addr: &str| {
            fleet
                .relays
                .iter()
                .find(|r| r.addrs.iter().any(|a| a == addr))
                .and_then(|r| rtts.get(&r.name).copied().flatten())
        };
        if let Some(best) = targets[..n].iter().filter_map(|(a, _)| rtt_of(a)).min() {
            targets[..n].sort_by_key(|(a, _)| match rtt_of(a) {
                Some(r) if r <= best + super::home::SWITCH_MIN_GAIN => Duration::ZERO,
                Some(r) => r,
                None => Duration::ZERO,
            });
        }
    }
    // Relays in preference order (the one that last admitted us first), each
    // started RELAY_STAGGER after the one before unless an earlier one is
    // admitted first: a dead home relay costs a fleet's node that much, not a
    // handshake timeout.
    let mut tries = futures::stream::FuturesUnordered::new();
    for (i, (name, addr)) in targets.iter().enumerate() {
        // The network this connection leaves from: where TCP/TLS won
        // before, it races at once.
        let local = local_ip_for(*addr);
        let tcp_first = local.is_some_and(|l| state.tcp_first(l));
        let (key, hello) = (&state.key, &hello);
        tries.push(async move {
            tokio::time::sleep(RELAY_STAGGER * i as u32).await;
            let r = timeout(
                timing.handshake_timeout,
                connect_one(key, relay_key, *addr, hello, timing, force, tcp_first),
            )
            .await;
            (name, *addr, local, r)
        });
    }
    let mut won = None;
    while let Some((name, addr, local, r)) = futures::StreamExt::next(&mut tries).await {
        match r {
            Ok(Ok(s)) => {
                won = Some((name.clone(), local, s));
                break;
            }
            Ok(Err(ClientError::Rejected(r))) => return Err(ClientError::Rejected(r)),
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: timed out"),
        }
    }
    drop(tries);
    if let Some((_, _, s)) = &won {
        let addr = s.conn.remote_address();
        SUSPECTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(a, _)| *a != addr);
    }
    let Some((used, local, s)) = won else {
        return Err(ClientError::Unreachable {
            addrs: addrs.join(", "),
            last,
        });
    };
    if remember {
        if let Some(t) = token {
            state.remember(t)?;
        }
        state.remember_fleet(&used, &s.relays);
    }
    // What a race decided (a forced TCP says nothing about QUIC); a QUIC
    // session, forced or not, says QUIC works from here.
    let tcp = s.conn.kind() == crate::transport::Kind::Tcp;
    let raced = force.is_none() && matches!(tcp::Choice::from_env(), Ok(tcp::Choice::Auto));
    if let Some(l) = local.filter(|_| raced || !tcp) {
        state.note_transport(l, tcp);
    }
    Ok(s)
}

/// A relay's connection to another relay of its fleet (`addrs`), admitted
/// with the fleet's own key `key` (the other relay accepts its own key as a
/// peer, not as a node), named `me`. Tunnels to workers whose session is on
/// that relay are opened on it with [`Message::PeerOpen`].
pub async fn connect_peer(
    key: &StaticKey,
    addrs: &[String],
    me: &str,
) -> Result<Session, ClientError> {
    let timing = ClientTiming {
        keepalive: Duration::from_millis(500),
        idle_timeout: Duration::from_secs(2),
        // A live relay answers within a round trip, even across the world;
        // a tunnel to a worker on a dead one should fail fast, not wait.
        handshake_timeout: Duration::from_secs(1),
        accept_streams: 0,
    };
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: me.to_string(),
        join_secret: None,
        services: Vec::new(),
    });
    let mut last = String::from("no address");
    for a in addrs {
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(a.as_str()).await {
            Ok(it) => it.collect(),
            Err(e) => {
                last = format!("{a}: {e}");
                continue;
            }
        };
        for addr in resolved {
            let tried = timeout(
                timing.handshake_timeout,
                connect_one(key, key.public(), addr, &hello, &timing, None, false),
            )
            .await;
            match tried {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(ClientError::Rejected(r))) => return Err(ClientError::Rejected(r)),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: timed out"),
            }
        }
    }
    Err(ClientError::Unreachable {
        addrs: addrs.join(", "),
        last,
    })
}

impl Session {
    /// Opens a tunnel on a peer relay of the fleet for the engineer
    /// `from` (see [`connect_peer`]); the streams once the worker answered.
    pub async fn open_for(
        &self,
        from: &str,
        from_key: PublicKey,
        from_tags: &[String],
        target: &str,
        service: &str,
    ) -> Result<(SendStream, RecvStream), ClientError> {
        self.open_with(&Message::PeerOpen {
            from: from.to_string(),
            from_key,
            from_tags: from_tags.to_vec(),
            target: target.to_string(),
            service: service.to_string(),
        })
        .await
    }

    /// Opens a pool API stream on a peer relay of the fleet (the one that
    /// schedules the pool) for the engineer `from`.
    pub async fn open_api_for(
        &self,
        from: &str,
        from_key: PublicKey,
        from_tags: &[String],
    ) -> Result<(SendStream, RecvStream), ClientError> {
        self.open_with(&Message::PeerApi {
            from: from.to_string(),
            from_key,
            from_tags: from_tags.to_vec(),
        })
        .await
    }
}

/// Relay addresses whose connection this process lost, and when (see
/// [`relay_lost`]). Every session of the process (an agent's tunnel and mesh
/// sessions) lost the same relay, so one that reconnected does not clear
/// it for the others; only a new session to that address does.
static SUSPECTS: std::sync::Mutex<Vec<(SocketAddr, std::time::Instant)>> =
    std::sync::Mutex::new(Vec::new());

/// How long a lost relay goes last in the race.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

/// Tells the next [`connect`]s that the connection to `addr` was lost (not
/// closed for a restart): with a fleet, the other relays are tried first.
pub fn relay_lost(addr: SocketAddr) {
    let mut s = SUSPECTS.lock().unwrap_or_else(|p| p.into_inner());
    s.retain(|(a, _)| *a != addr);
    s.push((addr, std::time::Instant::now()));
}

/// Whether `addr` was lost lately.
fn suspect(addr: SocketAddr) -> bool {
    let mut s = SUSPECTS.lock().unwrap_or_else(|p| p.into_inner());
    s.retain(|(_, at)| at.elapsed() < SUSPECT_FOR);
    s.iter().any(|(a, _)| *a == addr)
}

/// How long a node waits for one relay of its fleet before also trying the next.
pub(super) const RELAY_STAGGER: Duration = Duration::from_millis(400);

/// The local address the kernel would use to reach `addr` (no packet is sent).
fn local_ip_for(addr: SocketAddr) -> Option<std::net::IpAddr> {
    let bind: SocketAddr = if addr.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(addr).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

/// Set once a TCP/TLS connection won a race in this process: later
/// reconnects race both transports at once instead of giving QUIC a head
/// start it is unlikely to use.
static TCP_WON: AtomicBool = AtomicBool::new(false);

async fn connect_quic(
    addr: SocketAddr,
    timing: &ClientTiming,
) -> Result<(quinn::Connection, Endpoint), ClientError> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0"
            .parse()
            .map_err(|_| ClientError::Usage("bind".into()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|_| ClientError::Usage("bind".into()))?
    };
    let mut endpoint = tls::client_endpoint(bind).map_err(|source| ClientError::Io {
        context: format!("bind UDP {bind}"),
        source,
    })?;
    let transport = tls::transport(
        timing.idle_timeout,
        Some(timing.keepalive),
        timing.accept_streams,
    );
    endpoint.set_default_client_config(tls::client_config(transport).map_err(ClientError::Tls)?);
    let conn = endpoint
        .connect(addr, tls::SERVER_NAME)
        .map_err(|e| ClientError::Usage(format!("connect {addr}: {e}")))?
        .await
        .map_err(ProtoError::from)?;
    Ok((conn, endpoint))
}

async fn connect_tcp(
    addr: SocketAddr,
    timing: &ClientTiming,
    wait: Duration,
) -> Result<Connection, ClientError> {
    tokio::time::sleep(wait).await;
    let opts = mux::Options {
        keepalive: Some(timing.keepalive),
        idle_timeout: timing.idle_timeout,
        max_incoming: timing.accept_streams,
    };
    Ok(Connection::Tcp(tcp::connect(addr, opts).await?))
}

/// A connection to the relay at `addr` by the transport `WEFT_RELAY_TRANSPORT`
/// asks for: by default QUIC, raced by TCP/TLS after [`tcp::HEAD_START`]
/// (at once after TCP won before in this process, or from this network
/// within a day: `tcp_first`); the first to finish its
/// handshake wins and the other is dropped before admission (admitting twice
/// would make the relay replace one connection with the other).
async fn establish(
    addr: SocketAddr,
    timing: &ClientTiming,
    force: Option<tcp::Choice>,
    tcp_first: bool,
) -> Result<(Connection, Option<Endpoint>), ClientError> {
    let choice = match force {
        Some(c) => c,
        None => tcp::Choice::from_env().map_err(ClientError::Usage)?,
    };
    match choice {
        tcp::Choice::Quic => {
            let (c, e) = connect_quic(addr, timing).await?;
            Ok((Connection::Quic(c), Some(e)))
        }
        tcp::Choice::Tcp => Ok((connect_tcp(addr, timing, Duration::ZERO).await?, None)),
        tcp::Choice::Auto => {
            let head_start = if tcp_first || TCP_WON.load(Ordering::Relaxed) {
                Duration::ZERO
            } else {
                tcp::HEAD_START
            };
            let quic = connect_quic(addr, timing);
            let tcp = connect_tcp(addr, timing, head_start);
            tokio::pin!(quic, tcp);
            let (mut quic_err, mut tcp_err) = (None, None);
            loop {
                tokio::select! {
                    r = &mut quic, if quic_err.is_none() => match r {
                        Ok((c, e)) => {
                            TCP_WON.store(false, Ordering::Relaxed);
                            return Ok((Connection::Quic(c), Some(e)));
                        }
                        Err(e) => quic_err = Some(e),
                    },
                    r = &mut tcp, if tcp_err.is_none() => match r {
                        Ok(c) => {
                            TCP_WON.store(true, Ordering::Relaxed);
                            return Ok((c, None));
                        }
                        Err(e) => tcp_err = Some(e),
                    },
                }
                if let (Some(q), Some(t)) = (&quic_err, &tcp_err) {
                    return Err(ProtoError::Tcp(format!("quic: {q}; tcp: {t}")).into());
                }
            }
        }
    }
}

async fn connect_one(
    key: &StaticKey,
    relay_key: PublicKey,
    addr: SocketAddr,
    hello: &Message,
    timing: &ClientTiming,
    force: Option<tcp::Choice>,
    tcp_first: bool,
) -> Result<Session, ClientError> {
    let (conn, endpoint) = establish(addr, timing, force, tcp_first).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(ProtoError::from)?;
    let prologue = noise::prologue(&conn)?;
    let answer = noise::initiate(key, &relay_key, &prologue, &mut send, &mut recv, hello).await?;
    match answer {
        Message::Accepted { name, tags, relays } => {
            // Info for long-lived sessions (workers); debug for an engineer's
            // `connect`, whose stderr is ssh's ProxyCommand output.
            if timing.accept_streams > 0 {
                info!(transport = %conn.kind(), relay = %addr, name = %name, "relay session up");
            } else {
                debug!(transport = %conn.kind(), relay = %addr, name = %name, "relay session up");
            }
            Ok(Session {
                endpoint,
                conn,
                control: Arc::new(Mutex::new((send, recv))),
                name,
                tags,
                relays,
                no_redirect: AtomicBool::new(false),
            })
        }
        Message::Rejected(r) => Err(ClientError::Rejected(r)),
        other => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
    }
}

impl Session {
    /// Opens a tunnel to `service` on `target`; returns the stream once the
    /// worker has connected to its local service.
    pub async fn open(
        &self,
        target: &str,
        service: &str,
    ) -> Result<(SendStream, RecvStream), ClientError> {
        self.open_with(&Message::Open {
            target: target.to_string(),
            service: service.to_string(),
            redirect: false,
        })
        .await
    }

    /// [`Session::open`], letting a relay of a fleet answer with the
    /// worker's home relay instead of carrying the tunnel over its link to
    /// that relay. A relay that predates redirects resets the stream: asked
    /// again without (and never again on this session).
    pub async fn open_or_redirect(
        &self,
        target: &str,
        service: &str,
    ) -> Result<Opened, ClientError> {
        if self.relays.is_empty() || self.no_redirect.load(Ordering::Relaxed) {
            let (send, recv) = self.open(target, service).await?;
            return Ok(Opened::Stream(send, recv));
        }
        let first = Message::Open {
            target: target.to_string(),
            service: service.to_string(),
            redirect: true,
        };
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(ProtoError::from)?;
        write_message(&mut send, &first)
            .await
            .map_err(ProtoError::from)?;
        match read_message(&mut recv).await {
            Ok(Message::OpenOk) => Ok(Opened::Stream(send, recv)),
            Ok(Message::Redirect { relay, addrs }) => Ok(Opened::Redirect { relay, addrs }),
            Ok(Message::Rejected(r)) => Err(ClientError::Rejected(r)),
            Ok(other) => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
            // Reset before any answer on a live connection: the relay does not know the message.
            Err(e) if self.conn.close_reason().is_none() => {
                debug!(error = %e, "relay does not redirect; opening through it");
                self.no_redirect.store(true, Ordering::Relaxed);
                let (send, recv) = self.open(target, service).await?;
                Ok(Opened::Stream(send, recv))
            }
            Err(e) => Err(ProtoError::from(e).into()),
        }
    }

    /// Opens a stream to the relay's own pool API ([`Message::Api`]); returns it once the
    /// relay has answered `OpenOk`, ready for HTTP/1.1 (`weft_proto::pool`'s JSON types).
    /// A refusal is [`ClientError::Rejected`], as for [`Session::open`].
    pub async fn open_api(&self) -> Result<(SendStream, RecvStream), ClientError> {
        self.open_with(&Message::Api).await
    }

    /// A one-time link to the relay's web view, bound to this identity (`weft web`): the URL
    /// and how many seconds it stays valid. A relay with no web view refuses
    /// ([`ClientError::Rejected`]); one that predates the web view resets the stream.
    pub async fn web_link(&self) -> Result<(String, u32), ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(ProtoError::from)?;
        write_message(&mut send, &Message::WebLogin)
            .await
            .map_err(ProtoError::from)?;
        let _ = send.finish();
        match read_message(&mut recv).await {
            Ok(Message::WebLink { url, expires_s }) => Ok((url, expires_s)),
            Ok(Message::Rejected(r)) => Err(ClientError::Rejected(r)),
            Ok(other) => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
            Err(_) if self.conn.close_reason().is_none() => Err(ProtoError::Unexpected(
                "the relay does not know web logins (a relay older than the web view)".into(),
            )
            .into()),
            Err(e) => Err(ProtoError::from(e).into()),
        }
    }

    /// A new bidirectional stream whose first frame is `first`, once the relay answered `OpenOk`.
    async fn open_with(&self, first: &Message) -> Result<(SendStream, RecvStream), ClientError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(ProtoError::from)?;
        write_message(&mut send, first)
            .await
            .map_err(ProtoError::from)?;
        match read_message(&mut recv).await.map_err(ProtoError::from)? {
            Message::OpenOk => Ok((send, recv)),
            Message::Rejected(r) => Err(ClientError::Rejected(r)),
            other => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
        }
    }

    /// The fleet's live relays as this relay lists them: its own name and
    /// every relay (itself included).
    pub async fn list_relays(&self) -> Result<(String, Vec<RelayEntry>), ClientError> {
        self.view().list_relays().await
    }

    /// What a task beside the session's owner may ask of it (the home
    /// relay's watch: [`super::home::better_session`]).
    pub fn view(&self) -> SessionView {
        SessionView {
            conn: self.conn.clone(),
            control: self.control.clone(),
            relays: self.relays.clone(),
        }
    }

    /// The workers (and services) this node may open.
    pub async fn list_targets(&self) -> Result<Vec<Target>, ClientError> {
        let mut c = self.control.lock().await;
        let (send, recv) = &mut *c;
        write_message(send, &Message::ListTargets)
            .await
            .map_err(ProtoError::from)?;
        match read_message(recv).await.map_err(ProtoError::from)? {
            Message::Targets(t) => Ok(t),
            other => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
        }
    }

    /// Resolves when the connection ends, with why.
    pub async fn closed(&self) -> ConnectionError {
        self.conn.closed().await
    }

    /// The underlying connection (QUIC or the TCP/TLS fallback).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Closes politely. Waits only long enough for the CONNECTION_CLOSE to
    /// leave (not the 3-PTO draining period): a short-lived `connect` exits
    /// promptly, and a lost close costs the relay one idle timeout at worst.
    pub async fn close(self) {
        self.close_with(b"bye", Duration::from_millis(10)).await;
    }

    /// Closes with `reason`, waiting up to `wait` for the close to be sent.
    pub(crate) async fn close_with(&self, reason: &[u8], wait: Duration) {
        self.conn
            .close(VarInt::from_u32(CloseCode::Normal.code()), reason);
        match &self.endpoint {
            Some(e) => {
                let _ = timeout(wait, e.wait_idle()).await;
            }
            // The close frame is queued behind what was written; give the writer a moment.
            None => tokio::time::sleep(wait.min(Duration::from_millis(10))).await,
        }
    }
}

/// A handle on an admitted session that another task may hold while the
/// owner drives it: its connection, its control stream (requests take turns
/// with the owner's) and the fleet it announced.
#[derive(Debug, Clone)]
pub struct SessionView {
    conn: Connection,
    control: Arc<Mutex<(SendStream, RecvStream)>>,
    /// The other relays of the fleet, as this one announced them.
    pub relays: Vec<String>,
}

impl SessionView {
    /// The connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// [`Session::list_relays`].
    pub async fn list_relays(&self) -> Result<(String, Vec<RelayEntry>), ClientError> {
        let mut c = self.control.lock().await;
        let (send, recv) = &mut *c;
        write_message(send, &Message::ListRelays)
            .await
            .map_err(ProtoError::from)?;
        match read_message(recv).await.map_err(ProtoError::from)? {
            Message::Relays { me, relays } => Ok((me, relays)),
            other => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
        }
    }
}

/// Engineer: a session from the identity in `state_dir`.
pub async fn session(state_dir: &Path) -> Result<Session, ClientError> {
    let mut state = ClientState::open(state_dir)?;
    connect(&mut state, None, "", Vec::new(), &ClientTiming::engineer()).await
}

/// Whether the relay closed this connection because it leaves its fleet
/// (the node should move to another relay, not wait for this one).
pub fn is_draining_close(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CloseCode::Draining.code()))
}

/// Whether a close code means the relay refused this node at admission.
pub fn is_rejected_close(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CloseCode::Rejected.code()))
}

/// How the end of an admitted connection reads to the link core: the relay
/// revoked this node (for good), announced a restart (come back soon), or
/// the connection was lost (another connection of this node replaced it,
/// the relay went silent, ...): try again with the backoff.
pub fn close_failure(e: &ConnectionError) -> Failure {
    match e {
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CloseCode::Revoked.code()) =>
        {
            Failure::refused(&Rejection::new(Reason::NodeRevoked, "closed by the relay"))
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CloseCode::Restarting.code()) =>
        {
            Failure::RelayRestarting(e.to_string())
        }
        // Come back at once, to another relay: the caller marks this one
        // lost ([`is_draining_close`]), so the next connection avoids it.
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CloseCode::Draining.code()) =>
        {
            Failure::RelayRestarting(format!("{e} (the relay is leaving its fleet)"))
        }
        ConnectionError::ApplicationClosed(c)
            if c.error_code == VarInt::from_u32(CloseCode::Replaced.code()) =>
        {
            Failure::Transient(format!("{e} (this node connected again elsewhere)"))
        }
        _ => Failure::Transient(e.to_string()),
    }
}
