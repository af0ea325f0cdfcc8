//! The agent on the mesh: runs the managed mesh node in-process (`mesh::managed`, the same
//! identity, token and name as the relay exposure: one key per node) and serves the jobs API on
//! the node's overlay addresses, port [`AGENT_API_PORT`].
//!
//! The caller of a request arriving there is the mesh peer that owns the request's source
//! overlay address ([`mesh::managed::Overlay::peer_by_ip`] on the overlay the node publishes).
//! That is an authenticated identity: WireGuard's cryptokey routing drops a packet whose inner
//! source address is not the sending peer's, and the node's packet filter admits new flows to
//! this port only from peers the ACL allows (by default tag `engineer`). A source no peer owns
//! gets 403. Only overlay addresses are bound, never a public one.
//!
//! Order of start-up: on the very first join (no `relay.json` yet) the node waits until the
//! relay exposure has been admitted with the token, so the token is used once and the state
//! directory is written by one session; then it joins and runs the node. The join loop is a
//! shell of the link core ([`tunnel_relay::link::Link`]): it retries with jittered, capped
//! backoff while the relay is unreachable and gives up on a permanent refusal. If the node
//! cannot run (no CAP_NET_ADMIN, no `/dev/net/tun`, interface in use) the agent logs a
//! warning, records the reason ([`MeshStatus::Link`] with [`LinkState::Failed`], shown by
//! `worker-agent status`) and keeps running relay-only.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use mesh::managed::Overlay;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};
use tunnel_relay::link::{Backoff, Failure, Link, LinkState, Next as LinkNext};
use tunnel_relay::Token;
pub use weft_proto::acl::AGENT_API_PORT;

use crate::api::{Caller, ErrorBody};
pub use crate::mesh_status::{MeshStatus, OnMesh};
use crate::stopped;

/// How the agent joins the mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// Join token (used only when the state dir has never joined).
    pub token: Option<Token>,
    /// The node's name: the same as on the relay (one key, one name).
    pub name: String,
    /// The TUN interface (default `weft0`).
    pub interface: String,
    /// Directory of the UAPI socket (`mesh status`, `wg show` look there).
    pub uapi_dir: PathBuf,
    /// WireGuard UDP port (default: random).
    pub listen_port: Option<u16>,
}

/// Errors of the overlay listener.
#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    /// Binding the jobs API on an overlay address failed.
    #[error("cannot listen on overlay address {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The node stopped before publishing its overlay.
    #[error("the mesh node stopped before it was up")]
    NoOverlay,
    /// Refused to bind a non-overlay address.
    #[error("refusing to serve the jobs API on {0}: not an overlay address")]
    NotOverlay(IpAddr),
}

/// The running mesh side: its state for `status`, and the task to await on shutdown.
#[derive(Debug)]
pub struct MeshNode {
    /// What `status` shows.
    pub state: watch::Receiver<MeshStatus>,
    task: JoinHandle<()>,
}

impl MeshNode {
    /// Waits (bounded) for the node to delete its interface after shutdown was signalled.
    pub async fn finish(self) {
        let late = "mesh node did not stop within 3 s";
        crate::finish_within(self.task, Duration::from_secs(3), late).await;
    }
}

/// A state that never changes (`--no-mesh`, no relay).
pub fn disabled(reason: &str) -> watch::Receiver<MeshStatus> {
    watch::channel(MeshStatus::Disabled {
        reason: reason.to_string(),
    })
    .1
}

/// Starts the mesh node and the overlay listener of `api` (a router without a caller; each
/// request gets the mesh peer's name). `relay` is the relay exposure's link (the first join
/// waits for it); `stop` turning true ends everything.
pub fn start(
    state_dir: PathBuf,
    opts: MeshOptions,
    api: Router,
    relay: watch::Receiver<LinkState>,
    stop: watch::Receiver<bool>,
    state_tx: watch::Sender<MeshStatus>,
) -> MeshNode {
    let state = state_tx.subscribe();
    let span = tracing::info_span!("mesh", name = %opts.name, interface = %opts.interface);
    let task = tokio::spawn(run(state_dir, opts, api, relay, stop, state_tx).instrument(span));
    MeshNode { state, task }
}

/// Whether the state dir has joined a relay (`relay.json`). Reads only: opening a
/// `ClientState` would create `identity.key`, racing the relay exposure doing the same.
fn has_relay(state_dir: &std::path::Path) -> bool {
    state_dir.join("relay.json").is_file()
}

/// How a join error reads to the link core: the relay's refusal or the state directory found
/// in its causes, else worth another try; shown with its causes.
fn failure(e: &anyhow::Error) -> Failure {
    let f = e
        .chain()
        .find_map(|c| {
            if let Some(ce) = c.downcast_ref::<tunnel_relay::ClientError>() {
                Some(ce.failure())
            } else {
                c.downcast_ref::<tunnel_relay::StateError>()
                    .map(|se| Failure::Local(se.to_string()))
            }
        })
        .unwrap_or_else(|| Failure::Transient(String::new()));
    f.with_message(format!("{e:#}"))
}

/// Join retries: 1 s doubling to 30 s (the relay exposure, on the same relay, retries faster
/// and is what engineers wait for).
fn join_backoff() -> Backoff {
    Backoff::new(Duration::from_secs(1), Duration::from_secs(30))
}

async fn run(
    state_dir: PathBuf,
    opts: MeshOptions,
    api: Router,
    mut relay: watch::Receiver<LinkState>,
    mut stop: watch::Receiver<bool>,
    state: watch::Sender<MeshStatus>,
) {
    // First join: let the relay exposure use the token and write relay.json first.
    if !has_relay(&state_dir) {
        state.send_replace(MeshStatus::WaitingForRelay);
        let admitted = tokio::select! {
            r = relay.wait_for(|l| matches!(l, LinkState::Connected(_) | LinkState::Failed { .. } | LinkState::Stopped)) => {
                r.map(|l| l.clone()).ok()
            }
            _ = stopped(&mut stop) => None,
        };
        match admitted {
            Some(LinkState::Connected(_)) => {}
            Some(LinkState::Failed { reason }) => {
                warn!(%reason, "the relay refused this worker; not joining the mesh");
                state.send_replace(MeshStatus::failed(format!(
                    "the relay refused this worker: {reason}"
                )));
                return;
            }
            _ => {
                state.send_replace(MeshStatus::Link(LinkState::Stopped));
                return;
            }
        }
    }
    let jo = mesh::managed::JoinOptions {
        state_dir: state_dir.clone(),
        // The exposure has joined by now; a token is only needed if it has not.
        token: if has_relay(&state_dir) {
            None
        } else {
            opts.token.clone()
        },
        name: Some(opts.name.clone()),
        up: mesh::node::UpOptions {
            interface: opts.interface.clone(),
            uapi_dir: opts.uapi_dir.clone(),
        },
        listen_port: opts.listen_port,
    };
    let mut link = Link::new(join_backoff(), rand::random());
    let joined = loop {
        let next = link.poll(Instant::now());
        state.send_replace(MeshStatus::Link(link.state().clone()));
        match next {
            LinkNext::WaitUntil(at) => tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => {}
                _ = stopped(&mut stop) => {
                    state.send_replace(MeshStatus::Link(LinkState::Stopped));
                    return;
                }
            },
            LinkNext::Connect => {
                let r = tokio::select! {
                    r = mesh::managed::join(&jo) => r,
                    _ = stopped(&mut stop) => {
                        state.send_replace(MeshStatus::Link(LinkState::Stopped));
                        return;
                    }
                };
                let e = match r {
                    Ok(j) => break j,
                    Err(e) => e,
                };
                if link.failed(Instant::now(), &failure(&e)) == LinkNext::Done {
                    warn!(error = %format!("{e:#}"), "cannot join the mesh; the agent stays reachable through the relay only");
                    state.send_replace(MeshStatus::Link(link.state().clone()));
                    return;
                }
                if let LinkState::Retrying { retry_in_ms, .. } = link.state() {
                    info!(error = %format!("{e:#}"), retry_in_ms, "mesh join failed; retrying");
                }
            }
            // Not reached: the loop ends on the first success and on a final failure.
            LinkNext::Idle | LinkNext::Done => return,
        }
    };
    let me = joined.me().clone();
    let (overlay_tx, overlay_rx) = watch::channel(None);
    // The overlay servers stop once the node has stopped (agent shutdown or node failure).
    let (down_tx, down) = watch::channel(false);
    // The node stops on agent shutdown, or when the jobs API cannot listen on the overlay.
    let (abandon_tx, mut abandon) = watch::channel(false);
    let listener = tokio::spawn(listen_when_up(
        api,
        overlay_rx,
        down,
        me,
        opts.interface,
        state.clone(),
        abandon_tx,
    ));
    let node_shutdown = async move {
        tokio::select! {
            _ = stopped(&mut stop) => {}
            _ = stopped(&mut abandon) => {}
        }
    };
    let r =
        mesh::managed::run_joined(joined, jo.up, jo.listen_port, overlay_tx, node_shutdown).await;
    let _ = down_tx.send(true);
    let late = "overlay API connections still open 2 s after the node stopped";
    crate::finish_within(listener, Duration::from_secs(2), late).await;
    match r {
        Ok(()) => {
            if !matches!(*state.borrow(), MeshStatus::Link(LinkState::Failed { .. })) {
                state.send_replace(MeshStatus::Link(LinkState::Stopped));
            }
        }
        Err(e) => {
            warn!(
                error = %format!("{e:#}"),
                "the mesh node stopped; the agent keeps running, reachable through the relay only"
            );
            state.send_replace(MeshStatus::failed(format!("{e:#}")));
        }
    }
}

/// Serves the jobs API on the overlay once the node is up, until `down`; publishes `Joined`.
/// If it cannot listen, records why and asks the node to stop (`abandon`).
async fn listen_when_up(
    api: Router,
    overlay: watch::Receiver<Option<Arc<Overlay>>>,
    mut down: watch::Receiver<bool>,
    me: weft_proto::peermap::SelfInfo,
    interface: String,
    state: watch::Sender<MeshStatus>,
    abandon: watch::Sender<bool>,
) {
    let r = tokio::select! {
        r = serve(api, overlay, down.clone()) => r,
        _ = stopped(&mut down) => return,
    };
    match r {
        Ok((addrs, tasks)) => {
            info!(name = %me.name, ipv4 = %me.ipv4, ipv6 = %me.ipv6, api = ?addrs, "on the mesh; jobs API listening on the overlay");
            state.send_replace(MeshStatus::Joined(OnMesh {
                name: me.name,
                ipv4: me.ipv4,
                ipv6: me.ipv6,
                interface,
                api: addrs,
            }));
            for t in tasks {
                let _ = t.await;
            }
        }
        // The node stopped before it was up: its own error is what `status` shows.
        Err(OverlayError::NoOverlay) => {}
        Err(e) => {
            warn!(error = %e, "the jobs API cannot listen on the overlay; leaving the mesh");
            state.send_replace(MeshStatus::failed(e.to_string()));
            let _ = abandon.send(true);
        }
    }
}

/// Binds the jobs API on the node's overlay addresses once the node has published its overlay
/// (its addresses are on the interface by then). Returns the bound addresses and the server
/// tasks, which end when `stop` turns true.
pub async fn serve(
    api: Router,
    mut overlay: watch::Receiver<Option<Arc<Overlay>>>,
    stop: watch::Receiver<bool>,
) -> Result<(Vec<SocketAddr>, Vec<JoinHandle<()>>), OverlayError> {
    let me = overlay
        .wait_for(|o| o.is_some())
        .await
        .map_err(|_| OverlayError::NoOverlay)?
        .as_ref()
        .map(|o| o.me.clone())
        .ok_or(OverlayError::NoOverlay)?;
    let app = with_mesh_caller(api, overlay.clone());
    let mut addrs = Vec::new();
    let mut tasks = Vec::new();
    for ip in [IpAddr::V4(me.ipv4), IpAddr::V6(me.ipv6)] {
        let (addr, task) = listen(app.clone(), ip, AGENT_API_PORT, stop.clone()).await?;
        addrs.push(addr);
        tasks.push(task);
    }
    Ok((addrs, tasks))
}

/// The API router with the caller taken from the mesh peer that owns the source address.
pub fn with_mesh_caller(api: Router, overlay: watch::Receiver<Option<Arc<Overlay>>>) -> Router {
    api.layer(middleware::from_fn_with_state(overlay, mesh_caller))
}

/// Serves `app` (built by [`with_mesh_caller`]) on `ip:port` until `stop` turns true.
pub async fn listen(
    app: Router,
    ip: IpAddr,
    port: u16,
    mut stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), OverlayError> {
    if ip.is_unspecified() {
        return Err(OverlayError::NotOverlay(ip));
    }
    let want = SocketAddr::new(ip, port);
    let l = bind_retrying(want).await?;
    let addr = l
        .local_addr()
        .map_err(|source| OverlayError::Bind { addr: want, source })?;
    let task = tokio::spawn(async move {
        let r = axum::serve(l, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move { stopped(&mut stop).await })
            .await;
        if let Err(e) = r {
            warn!(%addr, error = %e, "jobs API on the overlay failed");
        }
    });
    Ok((addr, task))
}

/// Binds `addr`; an address the kernel has not finished adding (IPv6) gets a few retries.
async fn bind_retrying(addr: SocketAddr) -> Result<tokio::net::TcpListener, OverlayError> {
    let mut tries = 0;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(source) => return Err(OverlayError::Bind { addr, source }),
        }
    }
}

/// Sets [`Caller`] to the name of the mesh peer owning the source address, or answers 403.
async fn mesh_caller(
    State(overlay): State<watch::Receiver<Option<Arc<Overlay>>>>,
    ConnectInfo(from): ConnectInfo<SocketAddr>,
    mut req: Request,
    next: Next,
) -> Response {
    let ip = from.ip().to_canonical();
    let name = overlay
        .borrow()
        .as_ref()
        .and_then(|o| o.peer_by_ip(ip).map(|p| p.name.clone()));
    match name {
        Some(n) => {
            debug!(caller = %n, source = %ip, "agent API request over the mesh");
            req.extensions_mut().insert(Caller(n));
            next.run(req).await
        }
        None => {
            debug!(source = %ip, "agent API request from an address no mesh peer owns; refused");
            (
                StatusCode::FORBIDDEN,
                Json(ErrorBody {
                    error: format!("{ip} is not the overlay address of a mesh peer"),
                }),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::client::{call_async, Call, Endpoint};
    use axum::routing::get;
    use axum::Extension;
    use std::net::Ipv4Addr;
    use weft_proto::acl::AclPolicy;
    use weft_proto::peermap::{self as coord, PeerMap, PeerMapUpdate, SelfInfo, Snapshot, Version};

    /// A worker's overlay with one engineer peer, `alice`, owning `alice_v4`.
    fn overlay(alice_v4: Ipv4Addr) -> Arc<Overlay> {
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let alice = Arc::new(coord::Peer {
            key: tunnel_relay::PublicKey([7; 32]),
            name: "alice".into(),
            tags: tags(&["engineer"]),
            ipv4: alice_v4,
            ipv6: "fd7a:7765:6674::6440:7".parse().unwrap(),
            endpoints: Vec::new(),
            online: true,
            home: None,
        });
        let snap = Snapshot {
            version: Version { epoch: 1, seq: 0 },
            me: SelfInfo {
                name: "gpu1".into(),
                tags: tags(&["worker"]),
                ipv4: Ipv4Addr::new(100, 64, 0, 5),
                ipv6: "fd7a:7765:6674::6440:5".parse().unwrap(),
            },
            filter: AclPolicy::default().inbound_filter(&tags(&["worker"])),
            peers: vec![alice],
        };
        let mut map = PeerMap::default();
        map.apply(&PeerMapUpdate::Snapshot(snap)).unwrap();
        Arc::new(Overlay::from_map(&map).unwrap())
    }

    async fn get_who(addr: SocketAddr) -> (u16, String) {
        let mut out = Vec::new();
        let endpoint = Endpoint::Local(format!("http://{addr}"));
        let (code, failed) = call_async(&endpoint, Call::get("/who"), &mut out)
            .await
            .unwrap();
        out.extend(failed);
        (code, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn the_caller_is_the_peer_owning_the_source_address_and_strangers_get_403() {
        let api = Router::new().route(
            "/who",
            get(|Extension(c): Extension<Caller>| async move { c.0 }),
        );
        let (otx, orx) = watch::channel(Some(overlay(Ipv4Addr::LOCALHOST)));
        let (_stop_tx, stop) = watch::channel(false);
        let app = with_mesh_caller(api, orx);
        let (addr, _task) = listen(app, IpAddr::V4(Ipv4Addr::LOCALHOST), 0, stop)
            .await
            .unwrap();
        assert_eq!(get_who(addr).await, (200, "alice".to_string()));

        // alice moved to another address: 127.0.0.1 is nobody's now.
        otx.send_replace(Some(overlay(Ipv4Addr::new(100, 64, 0, 7))));
        let (code, body) = get_who(addr).await;
        assert_eq!(code, 403, "{body}");
        assert!(
            body.contains("127.0.0.1 is not the overlay address of a mesh peer"),
            "{body}"
        );

        // No overlay at all: refused too.
        otx.send_replace(None);
        assert_eq!(get_who(addr).await.0, 403);
    }

    #[tokio::test]
    async fn never_binds_the_unspecified_address() {
        let (_stop_tx, stop) = watch::channel(false);
        let (_otx, orx) = watch::channel(None);
        let app = with_mesh_caller(Router::new(), orx);
        let e = listen(app, IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, stop)
            .await
            .unwrap_err();
        assert!(matches!(e, OverlayError::NotOverlay(_)), "{e}");
    }

    #[test]
    fn a_permanent_refusal_is_final_an_unreachable_relay_is_retried() {
        let refusal = |reason| {
            anyhow::Error::new(tunnel_relay::ClientError::Rejected(
                tunnel_relay::Rejection::new(reason, "node \"gpu1\""),
            ))
            .context("joining the mesh through the relay")
        };
        let revoked = failure(&refusal(tunnel_relay::Reason::NodeRevoked));
        assert!(revoked.is_permanent());
        assert_eq!(
            revoked.to_string(),
            "joining the mesh through the relay: relay refused: node revoked: node \"gpu1\""
        );
        // The relay is busy: the same rule as the relay exposure's, so retried.
        assert!(!failure(&refusal(tunnel_relay::Reason::LimitExceeded)).is_permanent());
        let unreachable = anyhow::Error::new(tunnel_relay::ClientError::Unreachable {
            addrs: "203.0.113.2:4433".into(),
            last: "timed out".into(),
        })
        .context("joining the mesh through the relay");
        assert!(!failure(&unreachable).is_permanent());
        let state = anyhow::Error::new(tunnel_relay::StateError::NotJoined("/var/lib/w".into()))
            .context("joining the mesh through the relay");
        assert!(failure(&state).is_permanent());
        assert!(!failure(&anyhow::anyhow!("the coordinator sent no identity")).is_permanent());
    }

    #[test]
    fn mesh_status_json_keeps_its_state_names() {
        let s = MeshStatus::Joined(OnMesh {
            name: "gpu1".into(),
            ipv4: Ipv4Addr::new(100, 64, 0, 5),
            ipv6: "fd7a:7765:6674::6440:5".parse().unwrap(),
            interface: "weft0".into(),
            api: vec!["100.64.0.5:7070".parse().unwrap()],
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["state"], "joined");
        assert_eq!(v["name"], "gpu1");
        assert_eq!(v["ipv4"], "100.64.0.5");
        assert_eq!(v["api"][0], "100.64.0.5:7070");
        let f: MeshStatus =
            serde_json::from_str(r#"{"state":"failed","reason":"no CAP_NET_ADMIN"}"#).unwrap();
        assert_eq!(f, MeshStatus::failed("no CAP_NET_ADMIN".into()));
        let r = MeshStatus::Link(LinkState::Retrying {
            attempt: 2,
            last_error: "timed out".into(),
            retry_in_ms: 1000,
        });
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"state": "retrying", "attempt": 2, "error": "timed out",
                "retry_in_ms": 1000})
        );
        for (s, name) in [
            (
                MeshStatus::Link(LinkState::Connecting { attempt: 1 }),
                "joining",
            ),
            (MeshStatus::WaitingForRelay, "waiting_for_relay"),
            (
                MeshStatus::Disabled {
                    reason: "--no-mesh".into(),
                },
                "disabled",
            ),
            (MeshStatus::Link(LinkState::Stopped), "stopped"),
            (r, "retrying"),
            (s, "joined"),
        ] {
            let v = serde_json::to_value(&s).unwrap();
            assert_eq!(v["state"], name, "{v}");
            assert_eq!(serde_json::from_value::<MeshStatus>(v).unwrap(), s);
        }
    }
}
