//! The client side: node identity in a state directory, joining with a token,
//! sessions to the relay, and the provider (`expose`) and engineer
//! (`connect`, `forward`, `ssh-config`) roles.
//!
//! A provider exposes TCP services (`host:port`, spliced by `expose`) and
//! in-process services ([`ExposeOptions::handlers`]): for those, `expose`
//! hands the accepted stream, with the caller's relay-authenticated name, to
//! the embedding program (the worker agent serves its jobs API this way).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Mutex};
use tokio::time::timeout;
use tracing::{debug, info, warn, Instrument};

use crate::error::{ClientError, ProtoError, StateError};
use crate::keys::{write_private, PublicKey, StaticKey};
use crate::noise;
use crate::server::{CLOSE_REJECTED, CLOSE_REPLACED, CLOSE_RESTARTING, CLOSE_REVOKED};
use crate::splice::{local_to_quic, quic_tcp, quic_to_local, End};
use crate::tls;
use crate::token::Token;
use crate::wire::{
    read_message, write_message, Hello, Message, Reason, Rejection, Target, PROTOCOL_VERSION,
};

/// What a client remembers about its relay (`relay.json`; no secrets).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RelayInfo {
    /// Relay addresses (`host:port`).
    pub addrs: Vec<String>,
    /// The relay's public key, base64.
    pub key: String,
}

/// A node's identity and relay, kept in a state directory:
/// `identity.key` (0600) and `relay.json`.
#[derive(Debug)]
pub struct ClientState {
    dir: PathBuf,
    key: StaticKey,
    relay: Option<RelayInfo>,
}

impl ClientState {
    /// Opens the state directory, creating the identity if needed.
    pub fn open(dir: &Path) -> Result<ClientState, StateError> {
        crate::keys::create_private_dir(dir)?;
        let key = StaticKey::load_or_create(&dir.join("identity.key"))?;
        let rp = dir.join("relay.json");
        let relay = match std::fs::read_to_string(&rp) {
            Ok(t) => Some(serde_json::from_str(&t).map_err(|e| StateError::BadFile {
                path: rp.clone(),
                msg: e.to_string(),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(StateError::io(&rp, e)),
        };
        Ok(ClientState {
            dir: dir.to_path_buf(),
            key,
            relay,
        })
    }

    /// This node's public key.
    pub fn public_key(&self) -> PublicKey {
        self.key.public()
    }

    /// The remembered relay, if any.
    pub fn relay(&self) -> Option<&RelayInfo> {
        self.relay.as_ref()
    }

    fn remember(&mut self, token: &Token) -> Result<(), StateError> {
        let info = RelayInfo {
            addrs: token.relay_addrs.clone(),
            key: token.relay_key.to_base64(),
        };
        let text = serde_json::to_string_pretty(&info).map_err(|e| StateError::BadFile {
            path: self.dir.join("relay.json"),
            msg: e.to_string(),
        })?;
        write_private(&self.dir.join("relay.json"), &text)?;
        self.relay = Some(info);
        Ok(())
    }

    fn relay_target(&self, token: Option<&Token>) -> Result<(Vec<String>, PublicKey), StateError> {
        if let Some(t) = token {
            return Ok((t.relay_addrs.clone(), t.relay_key));
        }
        let info = self
            .relay
            .as_ref()
            .ok_or_else(|| StateError::NotJoined(self.dir.clone()))?;
        let bad = || StateError::BadFile {
            path: self.dir.join("relay.json"),
            msg: "relay key is not base64 of 32 bytes".into(),
        };
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&info.key)
            .map_err(|_| bad())?;
        Ok((
            info.addrs.clone(),
            PublicKey::from_slice(&bytes).ok_or_else(bad)?,
        ))
    }
}

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
            keepalive: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(5),
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
    endpoint: Endpoint,
    conn: Connection,
    control: Mutex<(SendStream, RecvStream)>,
    /// The registered name.
    pub name: String,
    /// The node's tags.
    pub tags: Vec<String>,
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

/// Joins or reconnects to the relay. With a token, the relay address and key
/// come from it and, once admitted, are remembered in the state directory.
pub async fn connect(
    state: &mut ClientState,
    token: Option<&Token>,
    name: &str,
    services: Vec<String>,
    timing: &ClientTiming,
) -> Result<Session, ClientError> {
    let (addrs, relay_key) = state.relay_target(token)?;
    let hello = Message::Hello(Hello {
        version: PROTOCOL_VERSION,
        name: name.to_string(),
        join_secret: token.map(|t| t.secret.clone()),
        services,
    });
    let mut last = String::from("no address");
    for a in &addrs {
        let resolved: Vec<SocketAddr> = match tokio::net::lookup_host(a.as_str()).await {
            Ok(it) => it.collect(),
            Err(e) => {
                last = format!("{a}: {e}");
                continue;
            }
        };
        for addr in resolved {
            match timeout(
                timing.handshake_timeout,
                connect_one(&state.key, relay_key, addr, &hello, timing),
            )
            .await
            {
                Ok(Ok(s)) => {
                    if let Some(t) = token {
                        state.remember(t)?;
                    }
                    return Ok(s);
                }
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

async fn connect_one(
    key: &StaticKey,
    relay_key: PublicKey,
    addr: SocketAddr,
    hello: &Message,
    timing: &ClientTiming,
) -> Result<Session, ClientError> {
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
    let (mut send, mut recv) = conn.open_bi().await.map_err(ProtoError::from)?;
    let prologue = noise::prologue(&conn)?;
    let answer = noise::initiate(key, &relay_key, &prologue, &mut send, &mut recv, hello).await?;
    match answer {
        Message::Accepted { name, tags } => Ok(Session {
            endpoint,
            conn,
            control: Mutex::new((send, recv)),
            name,
            tags,
        }),
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
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(ProtoError::from)?;
        let open = Message::Open {
            target: target.to_string(),
            service: service.to_string(),
        };
        write_message(&mut send, &open)
            .await
            .map_err(ProtoError::from)?;
        match read_message(&mut recv).await.map_err(ProtoError::from)? {
            Message::OpenOk => Ok((send, recv)),
            Message::Rejected(r) => Err(ClientError::Rejected(r)),
            other => Err(ProtoError::Unexpected(format!("{other:?}")).into()),
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

    /// The underlying QUIC connection.
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// Closes politely. Waits only long enough for the CONNECTION_CLOSE to
    /// leave (not the 3-PTO draining period): a short-lived `connect` exits
    /// promptly, and a lost close costs the relay one idle timeout at worst.
    pub async fn close(self) {
        self.conn.close(VarInt::from_u32(0), b"bye");
        let _ = timeout(Duration::from_millis(10), self.endpoint.wait_idle()).await;
    }
}

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

/// The provider's link to the relay, as `expose` sees it (published through
/// [`ExposeOptions::link`]; JSON: `{"state": "connected", ...}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// The first attempt is under way.
    Connecting,
    /// Admitted and serving tunnels.
    Connected {
        /// The registered name.
        name: String,
        /// The node's tags.
        tags: Vec<String>,
        /// The relay's address.
        relay: String,
    },
    /// The relay is unreachable or the connection was lost; retrying.
    Reconnecting {
        /// Why the last attempt or connection failed.
        error: String,
        /// Delay before the next attempt.
        retry_in_ms: u64,
    },
    /// The relay refused this node for good (or the state directory is
    /// unusable); `expose` has returned.
    Refused {
        /// The reason, as the relay gave it.
        reason: String,
    },
    /// `expose` stopped on shutdown.
    Stopped,
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
    /// First reconnect delay (doubles per failure).
    pub backoff_base: Duration,
    /// Largest reconnect delay.
    pub backoff_cap: Duration,
    /// In-process services: name → where accepted streams go (after `OpenOk`).
    /// A name here takes precedence over the same name in `services`. When the
    /// receiver is gone or does not take the stream within 5 s, the opener is
    /// refused with `service unavailable`.
    pub handlers: HashMap<String, mpsc::Sender<IncomingStream>>,
    /// Where `expose` publishes its link state (none by default).
    pub link: Option<watch::Sender<LinkState>>,
}

impl ExposeOptions {
    /// Defaults: worker timing, backoff 250 ms doubling to at most 4 s.
    pub fn new(state_dir: PathBuf, name: String, services: Vec<(String, String)>) -> ExposeOptions {
        ExposeOptions {
            state_dir,
            token: None,
            name,
            services,
            timing: ClientTiming::worker(),
            backoff_base: Duration::from_millis(250),
            backoff_cap: Duration::from_secs(4),
            handlers: HashMap::new(),
            link: None,
        }
    }
}

/// A delay uniformly drawn from [d/2, d] (jitter against reconnect storms).
pub fn jitter(d: Duration) -> Duration {
    let lo = d / 2;
    let span = d.saturating_sub(lo).as_micros() as u64;
    lo + Duration::from_micros(if span == 0 {
        0
    } else {
        rand::random::<u64>() % (span + 1)
    })
}

fn permanent(r: &Rejection) -> bool {
    !matches!(r.reason, Reason::LimitExceeded | Reason::Internal)
}

/// The provider loop: joins (or reconnects), serves relay-opened tunnels by
/// connecting to the local services, and reconnects with jittered, capped
/// exponential backoff (promptly when the relay announces a restart). Returns
/// on `shutdown`, or with the reason when the relay refuses this node.
pub async fn expose(
    opts: ExposeOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let publish = |l: LinkState| {
        if let Some(tx) = &opts.link {
            tx.send_replace(l);
        }
    };
    let result = expose_inner(&opts, &publish, shutdown).await;
    publish(match &result {
        Ok(()) => LinkState::Stopped,
        Err(ClientError::Rejected(r)) => LinkState::Refused {
            reason: r.to_string(),
        },
        Err(e) => LinkState::Refused {
            reason: e.to_string(),
        },
    });
    result
}

async fn expose_inner(
    opts: &ExposeOptions,
    publish: &impl Fn(LinkState),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    publish(LinkState::Connecting);
    let mut state = ClientState::open(&opts.state_dir)?;
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
    let mut shutdown = std::pin::pin!(shutdown);
    let mut backoff = opts.backoff_base;
    loop {
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
        let delay = match result {
            Ok(session) => {
                info!(me = %me, name = %session.name, services = ?names, relay = %session.conn.remote_address(), "exposed via relay");
                publish(LinkState::Connected {
                    name: session.name.clone(),
                    tags: session.tags.clone(),
                    relay: session.conn.remote_address().to_string(),
                });
                backoff = opts.backoff_base;
                let session = Arc::new(session);
                let err = tokio::select! {
                    e = serve_worker(session.clone(), services.clone()) => e,
                    _ = &mut shutdown => {
                        session.conn.close(VarInt::from_u32(0), b"worker shutting down");
                        let _ = timeout(Duration::from_secs(1), session.endpoint.wait_idle()).await;
                        return Ok(());
                    }
                };
                match &err {
                    ConnectionError::ApplicationClosed(c)
                        if c.error_code == VarInt::from_u32(CLOSE_REVOKED) =>
                    {
                        return Err(ClientError::Rejected(Rejection::new(
                            Reason::NodeRevoked,
                            "closed by the relay",
                        )));
                    }
                    ConnectionError::ApplicationClosed(c)
                        if c.error_code == VarInt::from_u32(CLOSE_RESTARTING)
                            || c.error_code == VarInt::from_u32(CLOSE_REPLACED) =>
                    {
                        info!(me = %me, reason = %err, "relay restarting; reconnecting now");
                        let d = jitter(Duration::from_millis(200));
                        publish(LinkState::Reconnecting {
                            error: err.to_string(),
                            retry_in_ms: d.as_millis() as u64,
                        });
                        d
                    }
                    _ => {
                        warn!(me = %me, reason = %err, "lost the relay; reconnecting");
                        let d = jitter(Duration::from_millis(100));
                        publish(LinkState::Reconnecting {
                            error: err.to_string(),
                            retry_in_ms: d.as_millis() as u64,
                        });
                        d
                    }
                }
            }
            Err(ClientError::Rejected(r)) if permanent(&r) => return Err(ClientError::Rejected(r)),
            Err(e @ ClientError::State(_)) => return Err(e),
            Err(e) => {
                let d = jitter(backoff);
                warn!(me = %me, error = %e, retry_in_ms = d.as_millis() as u64, "relay unreachable");
                publish(LinkState::Reconnecting {
                    error: e.to_string(),
                    retry_in_ms: d.as_millis() as u64,
                });
                backoff = (backoff * 2).min(opts.backoff_cap);
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = &mut shutdown => return Ok(()),
        }
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

async fn serve_worker(
    session: Arc<Session>,
    services: Arc<HashMap<String, Local>>,
) -> ConnectionError {
    loop {
        match session.conn.accept_bi().await {
            Ok((send, recv)) => {
                let services = services.clone();
                tokio::spawn(
                    async move { worker_tunnel(send, recv, services).await }.in_current_span(),
                );
            }
            Err(e) => return e,
        }
    }
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
            let rej = Rejection::new(Reason::NoSuchService, format!("{service:?}"));
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
            return;
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
            let rej = Rejection::new(Reason::ServiceUnavailable, format!("{service}: {e}"));
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
            return;
        }
        Err(_) => {
            let rej = Rejection::new(
                Reason::ServiceUnavailable,
                format!("{service}: connect timed out"),
            );
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
            return;
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
            let rej = Rejection::new(
                Reason::ServiceUnavailable,
                format!("{service}: not accepting connections"),
            );
            let _ = write_message(&mut send, &Message::Rejected(rej)).await;
            let _ = send.finish();
            return;
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

/// The engineer's default identity directory: `$XDG_CONFIG_HOME/weft`, else
/// `~/.config/weft` (what `tunnel-relay login` uses without `--state-dir`).
pub fn default_state_dir() -> Result<PathBuf, ClientError> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("weft"));
    }
    let home = std::env::var_os("HOME").ok_or_else(|| {
        ClientError::Usage("neither XDG_CONFIG_HOME nor HOME is set; pass --state-dir".into())
    })?;
    Ok(PathBuf::from(home).join(".config/weft"))
}

/// Engineer: logs in with a token (first join) and remembers the relay.
pub async fn login(
    state_dir: &Path,
    token: &Token,
    name: &str,
) -> Result<(String, Vec<String>), ClientError> {
    let mut state = ClientState::open(state_dir)?;
    let s = connect(
        &mut state,
        Some(token),
        name,
        Vec::new(),
        &ClientTiming::engineer(),
    )
    .await?;
    let out = (s.name.clone(), s.tags.clone());
    s.close().await;
    Ok(out)
}

/// Engineer: a session from the identity in `state_dir`.
pub async fn session(state_dir: &Path) -> Result<Session, ClientError> {
    let mut state = ClientState::open(state_dir)?;
    connect(&mut state, None, "", Vec::new(), &ClientTiming::engineer()).await
}

/// Maps an ssh `%p` (or a service name) to a service: 22 → `ssh`.
pub fn service_for_port(port: &str) -> String {
    match port {
        "22" => "ssh".to_string(),
        other => other.to_string(),
    }
}

/// Engineer: `connect HOST PORT` for ssh's ProxyCommand: splices stdin/stdout
/// with a tunnel. Returns when both directions are done (or one was reset).
pub async fn connect_stdio(
    state_dir: &Path,
    target: &str,
    service: &str,
) -> Result<(), ClientError> {
    let s = session(state_dir).await?;
    let (send, recv) = s.open(target, service).await?;
    let mut up = tokio::spawn(local_to_quic(tokio::io::stdin(), send));
    // ssh ends its ProxyCommand with SIGHUP: close the connection politely
    // then, or the relay would count it (and its tunnel) until the idle timeout.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let hungup = async {
        match hangup.as_mut() {
            Some(h) => {
                h.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::pin!(hungup);
    let down = tokio::select! {
        d = quic_to_local(recv, tokio::io::stdout()) => d,
        _ = &mut hungup => {
            up.abort();
            s.close().await;
            return Ok(());
        }
    };
    if down.1 == End::Reset {
        up.abort();
        s.close().await;
        return Err(ClientError::Io {
            context: format!("tunnel to {target}/{service}"),
            source: std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "reset by the far side",
            ),
        });
    }
    tokio::select! {
        _ = &mut up => {}
        _ = &mut hungup => up.abort(),
    }
    s.close().await;
    Ok(())
}

/// Engineer: `forward LOCALPORT:NAME:SERVICE`, like `ssh -L`: every TCP
/// connection to `listen` becomes a tunnel. Reconnects to the relay when needed.
pub async fn forward(
    state_dir: &Path,
    listen: SocketAddr,
    target: &str,
    service: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ClientError::Io {
            context: format!("listen on {listen}"),
            source,
        })?;
    forward_on(state_dir, listener, target, service, shutdown).await
}

/// [`forward`] on an already bound listener.
pub async fn forward_on(
    state_dir: &Path,
    listener: TcpListener,
    target: &str,
    service: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ClientError> {
    let current: Arc<Mutex<Option<Arc<Session>>>> =
        Arc::new(Mutex::new(Some(Arc::new(session(state_dir).await?))));
    info!(listen = ?listener.local_addr().ok(), %target, %service, "forwarding");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => a.map_err(|source| ClientError::Io { context: "accept".into(), source })?,
            _ = &mut shutdown => return Ok(()),
        };
        let current = current.clone();
        let (dir, target, service) = (
            state_dir.to_path_buf(),
            target.to_string(),
            service.to_string(),
        );
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match open_with_retry(&dir, &current, &target, &service).await {
                Ok((send, recv)) => {
                    quic_tcp(send, recv, tcp).await;
                }
                Err(e) => warn!(%peer, error = %e, "forward: cannot open tunnel"),
            }
        });
    }
}

async fn open_with_retry(
    dir: &Path,
    current: &Mutex<Option<Arc<Session>>>,
    target: &str,
    service: &str,
) -> Result<(SendStream, RecvStream), ClientError> {
    for _ in 0..2 {
        let s = {
            let mut g = current.lock().await;
            match &*g {
                Some(s) if s.conn.close_reason().is_none() => s.clone(),
                _ => {
                    let s = Arc::new(session(dir).await?);
                    *g = Some(s.clone());
                    s
                }
            }
        };
        match s.open(target, service).await {
            Err(ClientError::Proto(ProtoError::Connection(_))) => {
                *current.lock().await = None;
            }
            other => return other,
        }
    }
    Err(ClientError::Usage("relay connection keeps failing".into()))
}

/// Whether a close code means the relay refused this node at admission.
pub fn is_rejected_close(e: &ConnectionError) -> bool {
    matches!(e, ConnectionError::ApplicationClosed(c) if c.error_code == VarInt::from_u32(CLOSE_REJECTED))
}
