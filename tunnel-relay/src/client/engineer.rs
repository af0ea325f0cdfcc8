//! The engineer's commands: `connect` (ssh's ProxyCommand), `forward`
//! (like `ssh -L`) and `ssh-config`.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use crate::transport::{RecvStream, SendStream};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::session::{session, Session};
use crate::error::{ClientError, ProtoError};
use crate::splice::{local_to_quic, quic_tcp, quic_to_local, End};

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
