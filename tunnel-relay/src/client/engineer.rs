//! The engineer's commands: `connect` (ssh's ProxyCommand), `forward`
//! (like `ssh -L`) and `ssh-config`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::transport::{RecvStream, SendStream};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use super::session::{connect_visit, session, ClientTiming, Opened, Session};
use super::state::ClientState;
use crate::error::{ClientError, ProtoError};
use crate::splice::{local_to_quic, quic_tcp, quic_to_local, End};
use crate::wire::Reason;

/// How long an engineer waits for the relay a redirect named before it opens
/// the tunnel through its own relay instead (over the fleet's relay link):
/// QUIC and Noise take two round trips to a live relay, the TCP/TLS fallback
/// five; a relay that just died (its heartbeat not yet stale) answers none.
pub const VISIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether engineers follow redirects to a worker's home relay:
/// `WEFT_FLEET_REDIRECT=0` keeps every tunnel on the engineer's own relay
/// (which carries it to the worker's relay over the fleet's link).
pub fn redirects_wanted() -> bool {
    !matches!(
        std::env::var("WEFT_FLEET_REDIRECT").as_deref(),
        Ok("0" | "off" | "false" | "no")
    )
}

/// Where an engineer's tunnels open: its session on its own relay (the
/// nearest of its fleet) and, in a fleet, sessions on the relays that
/// redirects named (each worker's home relay), kept for the next tunnel
/// there. One relay on every tunnel's path, as Tailscale nodes send to a
/// peer's home DERP region.
pub struct Tunnels {
    dir: PathBuf,
    home: Mutex<Option<Arc<Session>>>,
    visits: Mutex<HashMap<String, Arc<Session>>>,
    redirects: bool,
}

impl Tunnels {
    /// Tunnels through `home` (reconnected from `dir` when it ends).
    pub fn new(dir: &Path, home: Session) -> Tunnels {
        Tunnels {
            dir: dir.to_path_buf(),
            home: Mutex::new(Some(Arc::new(home))),
            visits: Mutex::new(HashMap::new()),
            redirects: redirects_wanted(),
        }
    }

    async fn home(&self) -> Result<Arc<Session>, ClientError> {
        let mut g = self.home.lock().await;
        match &*g {
            Some(s) if s.conn.close_reason().is_none() => Ok(s.clone()),
            _ => {
                let s = Arc::new(session(&self.dir).await?);
                *g = Some(s.clone());
                Ok(s)
            }
        }
    }

    /// Opens a tunnel to `service` on `target`: on the engineer's relay, or
    /// on the worker's relay where the engineer's relay redirects (if that
    /// relay cannot be reached within [`VISIT_TIMEOUT`], or no longer has
    /// the worker, through the engineer's relay after all). A lost relay
    /// connection is dialled again once.
    pub async fn open(
        &self,
        target: &str,
        service: &str,
    ) -> Result<(SendStream, RecvStream), ClientError> {
        for _ in 0..2 {
            let s = self.home().await?;
            let opened = if self.redirects {
                s.open_or_redirect(target, service).await
            } else {
                s.open(target, service)
                    .await
                    .map(|(a, b)| Opened::Stream(a, b))
            };
            match opened {
                Ok(Opened::Stream(send, recv)) => return Ok((send, recv)),
                Ok(Opened::Redirect { relay, addrs }) => {
                    match self.visit(&relay, &addrs, target, service).await {
                        Ok(t) => return Ok(t),
                        Err(ClientError::Rejected(r)) if r.reason != Reason::NoSuchNode => {
                            return Err(ClientError::Rejected(r))
                        }
                        Err(e) => {
                            debug!(%relay, error = %e, "the worker's relay failed; opening through ours");
                            return s.open(target, service).await;
                        }
                    }
                }
                Err(ClientError::Proto(ProtoError::Connection(_))) => {
                    *self.home.lock().await = None;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Usage("relay connection keeps failing".into()))
    }

    /// The tunnel on relay `relay` of the fleet (at `addrs`), on a session kept for it.
    async fn visit(
        &self,
        relay: &str,
        addrs: &[String],
        target: &str,
        service: &str,
    ) -> Result<(SendStream, RecvStream), ClientError> {
        let s = {
            let mut visits = self.visits.lock().await;
            match visits.get(relay) {
                Some(s) if s.conn.close_reason().is_none() => s.clone(),
                _ => {
                    let mut state = ClientState::open(&self.dir)?;
                    let timing = ClientTiming::engineer();
                    let s = tokio::time::timeout(
                        VISIT_TIMEOUT,
                        connect_visit(&mut state, addrs, &timing),
                    )
                    .await
                    .map_err(|_| ClientError::Unreachable {
                        addrs: addrs.join(", "),
                        last: format!("relay {relay}: timed out"),
                    })??;
                    debug!(%relay, transport = %s.conn.kind(), "session on the worker's relay");
                    let s = Arc::new(s);
                    visits.insert(relay.to_string(), s.clone());
                    s
                }
            }
        };
        s.open(target, service).await
    }

    /// Closes every session politely.
    pub async fn close(&self) {
        let wait = Duration::from_millis(10);
        if let Some(s) = self.home.lock().await.take() {
            s.close_with(b"bye", wait).await;
        }
        for (_, s) in self.visits.lock().await.drain() {
            s.close_with(b"bye", wait).await;
        }
    }
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
    let s = Tunnels::new(state_dir, session(state_dir).await?);
    let (send, recv) = match s.open(target, service).await {
        Ok(t) => t,
        Err(e) => {
            s.close().await;
            return Err(e);
        }
    };
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
    let tunnels = Arc::new(Tunnels::new(state_dir, session(state_dir).await?));
    info!(listen = ?listener.local_addr().ok(), %target, %service, "forwarding");
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => a.map_err(|source| ClientError::Io { context: "accept".into(), source })?,
            _ = &mut shutdown => {
                tunnels.close().await;
                return Ok(());
            }
        };
        let tunnels = tunnels.clone();
        let (target, service) = (target.to_string(), service.to_string());
        tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            match tunnels.open(&target, &service).await {
                Ok((send, recv)) => {
                    quic_tcp(send, recv, tcp).await;
                }
                Err(e) => warn!(%peer, error = %e, "forward: cannot open tunnel"),
            }
        });
    }
}

/// Engineer: `ssh-config`: an OpenSSH `Host` block per reachable worker
/// with an `ssh` service, whose `ProxyCommand` is `exe connect`.
pub async fn ssh_config(state_dir: &Path, exe: &Path) -> Result<String, ClientError> {
    let s = session(state_dir).await?;
    let targets = s.list_targets().await?;
    s.close().await;
    let mut out = String::new();
    for t in targets
        .iter()
        .filter(|t| t.services.iter().any(|s| s == "ssh"))
    {
        out += &format!("Host {}\n", t.name);
        out += &format!(
            "    ProxyCommand \"{}\" connect --state-dir \"{}\" %h %p\n\n",
            exe.display(),
            state_dir.display()
        );
    }
    Ok(out)
}
