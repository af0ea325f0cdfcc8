//! A managed node's local control socket: `mesh status` and `mesh ping`
//! talk to the running control loop through it.
//!
//! # Where
//! Next to the UAPI socket: `/var/run/wireguard/weft0.sock` (UAPI) →
//! `/var/run/wireguard/weft0.weft` ([`socket_path`]), mode 0600. The name does
//! not end in `.sock` on purpose: `wg show` treats every `*.sock` in that
//! directory as a WireGuard interface. A static (wg-quick) node has none.
//!
//! # Protocol
//! JSON lines: one [`Request`] object per line, one [`Response`] object per
//! line back, in order, as many as the client likes on one connection:
//! ```text
//! → {"cmd": "status"}
//! ← {"result": "status", "status": {…ManagedStatus, see crate::status…}}
//! → {"cmd": "ping", "peer": "gpu1" | "100.64.0.9", "timeout_ms": 2000}
//! ← {"result": "pong", "peer": "gpu1", "ipv4": "100.64.0.9",
//!    "via": "198.51.100.6:41641" | "relay", "rtt_ms": 0.41}
//! ← {"result": "timeout", "peer": "gpu1", "ipv4": "100.64.0.9", "timeout_ms": 2000}
//! ← {"result": "error", "message": "no peer named gpu9 …"}
//! ```
//! A line over [`MAX_LINE`] bytes or one that does not parse gets an
//! `error` response and the connection is closed.
//!
//! # Never blocking the control loop
//! Each connection runs in its own task. `status` is answered from the
//! snapshot the loop publishes on a `watch` channel (on every change and
//! once a second), with the WireGuard counters read from the device at
//! answer time (`Device::info` takes each peer's lock briefly, as the UAPI
//! does); `ping` goes to the loop as a [`PingCmd`] over a bounded
//! channel with `try_send` (full: "busy") and the task, not the loop, waits
//! for the answer. At most [`MAX_CLIENTS`] connections are served at once.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};

use crate::device::Device;
use crate::key::PublicKey;
use crate::path::Path as PeerPathKind;
use crate::status::{ManagedPeer, ManagedStatus};

/// Longest request line accepted.
pub(crate) const MAX_LINE: u64 = 64 * 1024;
/// Most connections served at once (more are closed at once).
pub(crate) const MAX_CLIENTS: usize = 32;
/// Longest `ping` timeout a client may ask for.
pub(crate) const MAX_PING_TIMEOUT: Duration = Duration::from_secs(60);

/// The control socket of the interface whose UAPI socket is `uapi_socket`.
pub(crate) fn socket_path(uapi_socket: &Path) -> PathBuf {
    uapi_socket.with_extension("weft")
}

/// A request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub(crate) enum Request {
    /// The node's [`ManagedStatus`].
    Status,
    /// One disco ping to a peer, by name or overlay address.
    Ping {
        /// Name (`gpu1` or `gpu1.<domain>`) or overlay IPv4/IPv6 address.
        peer: String,
        /// How long to wait for the pong.
        timeout_ms: u64,
    },
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub(crate) enum Response {
    /// The answer to `status`.
    Status {
        /// The node's state.
        status: Box<ManagedStatus>,
    },
    /// The peer answered.
    Pong {
        /// Its name.
        peer: String,
        /// Its overlay IPv4 address.
        ipv4: Ipv4Addr,
        /// `relay`, or the address the pong came from.
        via: String,
        /// Round-trip time.
        rtt_ms: f64,
    },
    /// No pong in time.
    Timeout {
        /// Its name.
        peer: String,
        /// Its overlay IPv4 address.
        ipv4: Ipv4Addr,
        /// The timeout used.
        timeout_ms: u64,
    },
    /// The request could not be served.
    Error {
        /// What went wrong.
        message: String,
    },
}

/// A `mesh ping` for the control loop.
#[derive(Debug)]
pub(crate) struct PingCmd {
    /// The peer.
    pub peer: PublicKey,
    /// How long to wait.
    pub timeout: Duration,
    /// Where the loop sends the outcome.
    pub reply: oneshot::Sender<PingOutcome>,
}

/// What became of a [`PingCmd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PingOutcome {
    /// Answered on this path after this long.
    Pong {
        /// The path the pong came back on.
        via: PeerPathKind,
        /// Round-trip time.
        rtt: Duration,
    },
    /// No pong within the timeout.
    Timeout,
    /// Not sent (the reason).
    Failed(String),
}

/// The bound control socket; removes its file when dropped.
pub(crate) struct Server {
    listener: UnixListener,
    path: PathBuf,
}

impl Server {
    /// Binds `path` (mode 0600), replacing a stale file (the UAPI socket of
    /// the same interface was bound first, so no live node owns it).
    pub(crate) fn bind(path: &Path) -> anyhow::Result<Server> {
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing stale {}", path.display())),
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the control socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        Ok(Server {
            listener,
            path: path.to_owned(),
        })
    }

    /// Serves clients until cancelled (drop the future to stop).
    pub(crate) async fn serve(
        self,
        status: watch::Receiver<Arc<ManagedStatus>>,
        device: Option<Arc<Device>>,
        pings: mpsc::Sender<PingCmd>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CLIENTS));
        loop {
            let stream = match self.listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!("control socket: too many clients, closing one");
                continue;
            };
            let (status, device, pings) = (status.clone(), device.clone(), pings.clone());
            tokio::spawn(async move {
                if let Err(e) = connection(stream, status, device, pings).await {
                    tracing::debug!(error = %e, "control socket client");
                }
                drop(slot);
            });
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn connection(
    stream: tokio::net::UnixStream,
    status: watch::Receiver<Arc<ManagedStatus>>,
    device: Option<Arc<Device>>,
    pings: mpsc::Sender<PingCmd>,
) -> std::io::Result<()> {
    let (rd, mut wr) = stream.into_split();
    let mut rd = tokio::io::BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut rd).take(MAX_LINE).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let (resp, close) = if !line.ends_with('\n') && n as u64 >= MAX_LINE {
            (error(format!("request longer than {MAX_LINE} bytes")), true)
        } else {
            match serde_json::from_str::<Request>(line.trim()) {
                Ok(req) => (answer(req, &status, device.as_deref(), &pings).await, false),
                Err(e) => (error(format!("bad request: {e}")), true),
            }
        };
        let mut out = serde_json::to_vec(&resp).map_err(std::io::Error::other)?;
        out.push(b'\n');
        wr.write_all(&out).await?;
        if close {
            return Ok(());
        }
    }
}

fn error(message: String) -> Response {
    Response::Error { message }
}

/// The peer `target` names in `status`, or an error saying what exists.
pub(crate) fn resolve<'a>(
    status: &'a ManagedStatus,
    target: &str,
) -> Result<&'a ManagedPeer, String> {
    status.find_peer(target).ok_or_else(|| {
        let mut known: Vec<&str> = status.peers.iter().map(|p| p.name.as_str()).collect();
        known.sort_unstable();
        let known = if known.is_empty() {
            "this node sees no peers".to_owned()
        } else {
            format!("known peers: {}", known.join(", "))
        };
        format!("no peer named {target:?} in this node's peer map ({known})")
    })
}

async fn answer(
    req: Request,
    status: &watch::Receiver<Arc<ManagedStatus>>,
    device: Option<&Device>,
    pings: &mpsc::Sender<PingCmd>,
) -> Response {
    match req {
        Request::Status => {
            let mut st = (**status.borrow()).clone();
            if let Some(d) = device {
                let now = std::time::SystemTime::now();
                st.refresh_counters(&d.info(now), now);
            }
            Response::Status {
                status: Box::new(st),
            }
        }
        Request::Ping { peer, timeout_ms } => {
            let snap = status.borrow().clone();
            let p = match resolve(&snap, &peer) {
                Ok(p) => p,
                Err(message) => return Response::Error { message },
            };
            let Ok(key) = PublicKey::from_base64(&p.wg.public_key) else {
                return error(format!("peer {} has an unreadable key", p.name));
            };
            let timeout = Duration::from_millis(timeout_ms).min(MAX_PING_TIMEOUT);
            let (tx, rx) = oneshot::channel();
            let cmd = PingCmd {
                peer: key,
                timeout,
                reply: tx,
            };
            if pings.try_send(cmd).is_err() {
                return error("the control loop is busy; try again".to_owned());
            }
            // The loop answers within `timeout` (it expires the ping); the
            // extra second covers a loop that stopped.
            let outcome = tokio::time::timeout(timeout + Duration::from_secs(1), rx).await;
            match outcome {
                Ok(Ok(PingOutcome::Pong { via, rtt })) => Response::Pong {
                    peer: p.name.clone(),
                    ipv4: p.ipv4,
                    via: match via {
                        PeerPathKind::Relay => "relay".to_owned(),
                        PeerPathKind::Direct(a) => a.to_string(),
                    },
                    rtt_ms: (rtt.as_micros() as f64) / 1000.0,
                },
                Ok(Ok(PingOutcome::Timeout)) | Err(_) => Response::Timeout {
                    peer: p.name.clone(),
                    ipv4: p.ipv4,
                    timeout_ms: timeout.as_millis() as u64,
                },
                Ok(Ok(PingOutcome::Failed(message))) => Response::Error { message },
                Ok(Err(_)) => error("the control loop stopped".to_owned()),
            }
        }
    }
}

/// Why the control socket could not be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// Nothing is listening.
    #[error(
        "cannot connect to the control socket {}: {source}; is `mesh up --state-dir` running for this interface?",
        socket.display()
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The exchange failed or timed out.
    #[error("control socket {}: {source}", socket.display())]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node's answer does not parse.
    #[error("control socket {}: unreadable answer: {source}", socket.display())]
    Decode {
        /// The socket path.
        socket: PathBuf,
        /// The JSON error.
        source: serde_json::Error,
    },
}

/// A blocking client (the CLI's side).
pub(crate) struct Client {
    path: PathBuf,
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

/// How long the client waits for an answer beyond what the request implies.
const CLIENT_SLACK: Duration = Duration::from_secs(3);

impl Client {
    /// Connects to a node's control socket.
    pub(crate) fn connect(path: &Path) -> Result<Client, ClientError> {
        let s = std::os::unix::net::UnixStream::connect(path).map_err(|source| {
            ClientError::Connect {
                socket: path.to_owned(),
                source,
            }
        })?;
        let io = |source| ClientError::Io {
            socket: path.to_owned(),
            source,
        };
        let writer = s.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_owned(),
            reader: BufReader::new(s),
            writer,
        })
    }

    /// Sends one request and reads its response.
    pub(crate) fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        let io = |source| ClientError::Io {
            socket: self.path.clone(),
            source,
        };
        let wait = match req {
            Request::Ping { timeout_ms, .. } => {
                Duration::from_millis(*timeout_ms).min(MAX_PING_TIMEOUT) + CLIENT_SLACK
            }
            Request::Status => CLIENT_SLACK,
        };
        self.writer.set_write_timeout(Some(wait)).map_err(io)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait))
            .map_err(io)?;
        let mut line = serde_json::to_vec(req).map_err(|source| ClientError::Decode {
            socket: self.path.clone(),
            source,
        })?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer).map_err(io)?;
        if n == 0 {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the node closed the connection",
            )));
        }
        serde_json::from_str(answer.trim()).map_err(|source| ClientError::Decode {
            socket: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::status::ManagedPeer;
    use tunnel_relay::link::LinkState;

    fn snapshot() -> ManagedStatus {
        ManagedStatus {
            interface: "weft0".into(),
            mode: "managed".into(),
            public_key: None,
            listen_port: 41641,
            node: None,
            relay: LinkState::Connecting { attempt: 1 },
            fleet: None,
            candidates: Vec::new(),
            peers: vec![ManagedPeer {
                name: "gpu1".into(),
                ipv4: Ipv4Addr::new(100, 64, 0, 9),
                ipv6: "fd7a:7765:6674::6440:9".parse().unwrap(),
                tags: vec!["worker".into()],
                online: true,
                home: Some("relay-eu".into()),
                path: "relay".into(),
                relay_transport: Some("quic".into()),
                latency_ms: None,
                wg: crate::status::PeerStatus {
                    public_key: PublicKey::from_bytes([7; 32]).to_base64(),
                    endpoint: Some("relay".into()),
                    ..Default::default()
                },
            }],
        }
    }

    #[test]
    fn wire_format() {
        let r: Request =
            serde_json::from_str(r#"{"cmd":"ping","peer":"gpu1","timeout_ms":5}"#).unwrap();
        assert_eq!(
            r,
            Request::Ping {
                peer: "gpu1".into(),
                timeout_ms: 5
            }
        );
        assert_eq!(
            serde_json::to_string(&Request::Status).unwrap(),
            r#"{"cmd":"status"}"#
        );
        let p = Response::Pong {
            peer: "gpu1".into(),
            ipv4: Ipv4Addr::new(100, 64, 0, 9),
            via: "relay".into(),
            rtt_ms: 1.5,
        };
        let text = serde_json::to_string(&p).unwrap();
        assert!(
            text.starts_with(r#"{"result":"pong","peer":"gpu1""#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), p);
        let s = Response::Status {
            status: Box::new(snapshot()),
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), s);
    }

    #[test]
    fn socket_path_is_not_a_wg_interface() {
        let p = socket_path(Path::new("/var/run/wireguard/weft0.sock"));
        assert_eq!(p, Path::new("/var/run/wireguard/weft0.weft"));
    }

    #[test]
    fn resolve_by_name_fqdn_and_address() {
        let s = snapshot();
        assert_eq!(resolve(&s, "gpu1").unwrap().name, "gpu1");
        assert_eq!(resolve(&s, "GPU1.weft.internal.").unwrap().name, "gpu1");
        assert_eq!(resolve(&s, "100.64.0.9").unwrap().name, "gpu1");
        assert_eq!(resolve(&s, "fd7a:7765:6674::6440:9").unwrap().name, "gpu1");
        let e = resolve(&s, "gpu9").unwrap_err();
        assert!(e.contains("gpu9") && e.contains("known peers: gpu1"), "{e}");
    }

    /// The server end to end on a temporary socket: status from the
    /// snapshot, a ping answered by a stand-in loop, a bad line, an
    /// unknown name.
    #[tokio::test]
    async fn serves_status_and_ping() {
        let path = std::env::temp_dir().join(format!("weft-ctl-{}.weft", std::process::id()));
        let server = Server::bind(&path).unwrap();
        let (_stx, srx) = watch::channel(Arc::new(snapshot()));
        let (ptx, mut prx) = mpsc::channel::<PingCmd>(4);
        tokio::spawn(server.serve(srx, None, ptx));
        tokio::spawn(async move {
            while let Some(cmd) = prx.recv().await {
                assert_eq!(cmd.peer, PublicKey::from_bytes([7; 32]));
                let _ = cmd.reply.send(PingOutcome::Pong {
                    via: PeerPathKind::Relay,
                    rtt: Duration::from_micros(1500),
                });
            }
        });
        let p = path.clone();
        let results = tokio::task::spawn_blocking(move || {
            let mut c = Client::connect(&p).unwrap();
            let st = c.call(&Request::Status).unwrap();
            let pong = c
                .call(&Request::Ping {
                    peer: "gpu1".into(),
                    timeout_ms: 1000,
                })
                .unwrap();
            let unknown = c
                .call(&Request::Ping {
                    peer: "nope".into(),
                    timeout_ms: 1000,
                })
                .unwrap();
            // A line that is not a request: an error, then the node hangs up.
            c.writer.write_all(b"get=1\n\n").unwrap();
            let mut line = String::new();
            c.reader.read_line(&mut line).unwrap();
            (st, pong, unknown, line)
        })
        .await
        .unwrap();
        assert!(matches!(results.0, Response::Status { status } if status.peers.len() == 1));
        assert_eq!(
            results.1,
            Response::Pong {
                peer: "gpu1".into(),
                ipv4: Ipv4Addr::new(100, 64, 0, 9),
                via: "relay".into(),
                rtt_ms: 1.5
            }
        );
        assert!(matches!(results.2, Response::Error { message } if message.contains("nope")));
        assert!(results.3.contains(r#""result":"error""#), "{}", results.3);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
}
