//! The agent's side of the relay: `tunnel_relay::client::expose` in-process, exposing the TCP
//! services (`ssh`, ...) and the jobs API as the in-process service [`AGENT_SERVICE`]. Each
//! `agent` tunnel stream is one HTTP/1.1 connection served by the API router, with the caller set
//! to the opener's relay name (authenticated by the relay's Noise IK admission; this worker pins
//! the relay's key). The API itself never listens on a non-loopback address.
//!
//! It also registers the in-process service [`POOL_SERVICE`] (`@pool`), served by
//! [`PoolFeed`] (`pool_feed.rs`): `expose` announces it among the services, which is how the
//! relay knows this worker runs an agent; only streams opened by the coordinator
//! ([`weft_proto::pool::POOL_CALLER`]) are served.

use std::path::PathBuf;
use std::time::Duration;

use axum::{Extension, Router};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};
use tunnel_relay::client::{self, ClientState, ExposeOptions, IncomingStream};
use tunnel_relay::link::LinkState;
use tunnel_relay::Token;

use std::sync::Arc;

use weft_proto::cluster::{CLIENT_SERVICE, DASHBOARD_SERVICE};
use weft_proto::pool::POOL_SERVICE;

use crate::api::Caller;
use crate::pool_feed::PoolFeed;

/// The service name of the jobs API on the relay.
pub const AGENT_SERVICE: &str = "agent";

/// How the agent joins the relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Join token (first run only; the identity and relay are then kept in the state dir).
    pub token: Option<Token>,
    /// The worker's name on the relay.
    pub name: String,
    /// TCP services: name → `host:port` (e.g. `ssh` → `127.0.0.1:22`).
    pub services: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("--service {0}: the names `agent`, `@pool`, `ray-dashboard` and `ray-client` are the agent's own services")]
    Reserved(String),
    #[error("relay identity in {}: {source}", dir.display())]
    State {
        dir: PathBuf,
        source: tunnel_relay::StateError,
    },
}

/// The running relay side: the link state for `status`, and the tasks to await on shutdown.
#[derive(Debug)]
pub struct Exposed {
    pub link: watch::Receiver<LinkState>,
    expose: JoinHandle<()>,
    serve: JoinHandle<()>,
    pool: JoinHandle<()>,
}

impl Exposed {
    /// Waits (bounded) for `expose` to close the relay connection after shutdown was signalled.
    pub async fn finish(self) {
        let late = "relay link did not close within 2 s";
        crate::finish_within(self.expose, Duration::from_secs(2), late).await;
        self.serve.abort();
        self.pool.abort();
    }
}

/// Whether this state dir has joined a relay (or a token is given): otherwise the agent runs
/// with its loopback API only.
pub fn joined(state_dir: &std::path::Path, opts: &RelayOptions) -> Result<bool, RelayError> {
    if opts.token.is_some() {
        return Ok(true);
    }
    let st = ClientState::open(state_dir).map_err(|source| RelayError::State {
        dir: state_dir.to_path_buf(),
        source,
    })?;
    Ok(st.relay().is_some())
}

/// Starts `expose`, the server of `agent` streams and the pool feed's, publishing the link on
/// `link_tx`. `shutdown` ends them.
pub fn start(
    state_dir: PathBuf,
    opts: RelayOptions,
    api: Router,
    pool: Arc<PoolFeed>,
    link_tx: watch::Sender<LinkState>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Exposed, RelayError> {
    if let Some((n, a)) = opts.services.iter().find(|(n, _)| {
        n == AGENT_SERVICE || n == POOL_SERVICE || n == DASHBOARD_SERVICE || n == CLIENT_SERVICE
    }) {
        return Err(RelayError::Reserved(format!("{n}={a}")));
    }
    let (in_tx, mut in_rx) = mpsc::channel::<IncomingStream>(64);
    let link_rx = link_tx.subscribe();
    let mut eo = ExposeOptions::new(state_dir, opts.name, opts.services);
    eo.token = opts.token;
    eo.handlers.insert(AGENT_SERVICE.to_string(), in_tx);
    let (pool_tx, pool_rx) = mpsc::channel::<IncomingStream>(4);
    eo.handlers.insert(POOL_SERVICE.to_string(), pool_tx);
    let mut ray_task = None;
    if pool.runs_ray() {
        // The cluster owner's way to the head's dashboard and Ray Client through the relay.
        let (ray_tx, ray_rx) = mpsc::channel::<IncomingStream>(64);
        for s in [DASHBOARD_SERVICE, CLIENT_SERVICE] {
            eo.handlers.insert(s.to_string(), ray_tx.clone());
        }
        ray_task = Some(tokio::spawn(serve_ray(pool.members.clone(), ray_rx)));
    }
    eo.link = Some(link_tx);
    let expose = tokio::spawn(async move {
        match client::expose(eo, shutdown).await {
            Ok(()) => info!("relay link closed"),
            Err(e) => error!(
                error = %e,
                "the relay refused this worker; jobs API stays local until the agent is restarted"
            ),
        }
    });
    let serve = tokio::spawn(async move {
        while let Some(inc) = in_rx.recv().await {
            tokio::spawn(serve_stream(api.clone(), inc));
        }
    });
    let pool = tokio::spawn(async move {
        pool.serve_incoming(pool_rx).await;
        if let Some(t) = ray_task {
            t.abort();
        }
    });
    Ok(Exposed {
        link: link_rx,
        expose,
        serve,
        pool,
    })
}

/// `ray-dashboard` / `ray-client` streams: spliced to the head's port when the opener owns a
/// cluster whose head runs here; closed otherwise.
async fn serve_ray(
    members: Arc<parking_lot::Mutex<crate::ray::Members>>,
    mut rx: mpsc::Receiver<IncomingStream>,
) {
    while let Some(inc) = rx.recv().await {
        let head = members.lock().head_of(&inc.from).cloned();
        tokio::spawn(async move {
            let IncomingStream {
                from,
                service,
                send,
                recv,
            } = inc;
            let Some(head) = head else {
                warn!(caller = %from, service = %service, "no cluster head of this caller here; stream closed");
                return;
            };
            let port = if service == CLIENT_SERVICE {
                weft_proto::cluster::CLIENT_PORT
            } else {
                weft_proto::cluster::DASHBOARD_PORT
            };
            let addr = format!("{}:{port}", head.ip);
            match tokio::net::TcpStream::connect(&addr).await {
                Ok(mut tcp) => {
                    debug!(caller = %from, %addr, "ray stream");
                    let mut tunnel = tokio::io::join(recv, send);
                    let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut tcp).await;
                }
                Err(e) => warn!(caller = %from, %addr, error = %e, "cannot reach the ray head"),
            }
        });
    }
}

/// One `agent` tunnel stream = one HTTP/1.1 connection, caller = the opener's relay name.
async fn serve_stream(api: Router, inc: IncomingStream) {
    let IncomingStream {
        from, send, recv, ..
    } = inc;
    debug!(caller = %from, "agent API stream");
    let svc = TowerToHyperService::new(api.layer(Extension(Caller(from.clone()))));
    let io = TokioIo::new(tokio::io::join(recv, send));
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .await
    {
        // An engineer hanging up mid-response (Ctrl-C on `logs --follow`) ends up here too.
        debug!(caller = %from, error = %e, "agent API stream ended with an error");
    }
}
