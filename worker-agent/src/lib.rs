//! Weft worker agent: GPU inventory, telemetry and health (NVML, sampled off the async
//! runtime), and a job engine (GPU assignment, process groups, SQLite state) exposed over a
//! loopback HTTP/JSON API and Prometheus `/metrics`, through the tunnel relay as the
//! service `agent` (plus `ssh` and other TCP services), in-process (`relay.rs`), and on the
//! mesh: the agent runs the managed mesh node in-process and serves the API on its overlay
//! addresses (`overlay.rs`). Through the relay it also speaks the pool feed with the
//! coordinator (`pool_feed.rs`, the in-process service `@pool`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};
use tunnel_relay::link::LinkState;

pub mod agent;
pub mod api;
pub mod cgroup;
pub mod cli;
pub mod client;
pub mod cluster_cli;
pub mod gpu;
pub mod health;
pub mod history;
pub mod job;
pub mod mesh_status;
pub mod metrics;
pub mod overlay;
pub mod pool_cli;
pub mod pool_feed;
pub mod queue;
pub mod ray;
pub mod ray_member;
pub mod relay;
pub mod sampler;
pub mod store;
#[cfg(test)]
mod testutil;

/// File in the state dir holding the API base URL (`http://127.0.0.1:PORT`).
pub const API_ADDR_FILE: &str = "api.url";

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Loopback address of the jobs API. Default `127.0.0.1:0` (ephemeral, written to `api.url`).
    pub api_listen: SocketAddr,
    /// Loopback address for `/metrics` alone; `/metrics` is also served on the API address.
    pub metrics_listen: Option<SocketAddr>,
    /// Path of `libnvidia-ml.so`; default: the loader's search (`libnvidia-ml.so.1`).
    pub nvml_lib: Option<PathBuf>,
    pub sampler: sampler::SamplerConfig,
    pub kill_grace: Duration,
    pub shim: Option<PathBuf>,
    /// Try per-job cgroup v2 (limits, OOM, `cgroup.kill`) where writable. Default true.
    pub cgroups: bool,
    /// Join the relay and expose `agent` and the TCP services through it. `None`, or a state
    /// dir that never joined and no token: the API is reachable on loopback only.
    pub relay: Option<relay::RelayOptions>,
    /// Join the mesh in-process with the relay identity and serve the API on the overlay.
    /// `None` (`--no-mesh`): relay and loopback only. Needs `relay` (the mesh is joined
    /// through it).
    pub mesh: Option<overlay::MeshOptions>,
    /// The `ray` command for Ray cluster members (`--ray`); only used with the mesh.
    pub ray: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the GPU sampler thread: {0}")]
    Sampler(std::io::Error),
    #[error(transparent)]
    Engine(#[from] agent::AgentError),
    #[error("{0}")]
    NotLoopback(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    WriteAddr {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    #[error("usage-signing key {path}: {source}")]
    UsageKey {
        path: PathBuf,
        source: tunnel_relay::StateError,
    },
}

/// Resolves once `stop` turns true (or its sender is gone): the agent's shutdown, as each of
/// its tasks sees it.
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|v| *v).await;
}

/// Waits at most `limit` for `task`, told to stop, to end; if it has not, says `late` (at
/// debug level) and leaves it.
pub(crate) async fn finish_within<T>(task: impl Future<Output = T>, limit: Duration, late: &str) {
    if tokio::time::timeout(limit, task).await.is_err() {
        debug!("{late}");
    }
}

/// Binds a loopback listener: it, and the address it got.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), RunError> {
    let failed = |source| RunError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

/// The agent's Ray (`--ray`), checked once: a worker whose Ray does not run, or that is not on
/// the mesh, is not offered for clusters (and says why).
async fn ray_context(cfg: &Config) -> Option<pool_feed::RayContext> {
    let path = cfg.ray.clone()?;
    let Some(mesh) = &cfg.mesh else {
        warn!("--ray needs the mesh (Ray's nodes talk over it); this worker is not offered for clusters");
        return None;
    };
    let found = tokio::task::spawn_blocking(move || ray::detect(&path)).await;
    match found {
        Ok(Ok(r)) => {
            info!(ray = %r.path.display(), version = %r.version, "Ray clusters enabled");
            Some(pool_feed::RayContext {
                ray: r,
                mesh_if: mesh.interface.clone(),
                state_dir: cfg.state_dir.clone(),
                supervisor: cfg.shim.clone(),
            })
        }
        Ok(Err(e)) => {
            warn!(error = %e, "this worker is not offered for Ray clusters");
            None
        }
        Err(e) => {
            warn!(error = %e, "cannot check --ray");
            None
        }
    }
}

/// Runs the agent until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RunError> {
    api::check_loopback(cfg.api_listen, "--api-listen").map_err(RunError::NotLoopback)?;
    if let Some(m) = cfg.metrics_listen {
        api::check_loopback(m, "--metrics-listen").map_err(RunError::NotLoopback)?;
    }
    std::fs::create_dir_all(&cfg.state_dir).map_err(|source| RunError::StateDir {
        path: cfg.state_dir.clone(),
        source,
    })?;
    let backend = gpu::nvml::open(cfg.nvml_lib.as_deref().map(|p| p.as_os_str()));
    let sampler = sampler::start(backend, cfg.sampler).map_err(RunError::Sampler)?;
    let snapshot = sampler.snapshot.clone();
    let engine = agent::Engine::start(
        agent::EngineConfig {
            state_dir: cfg.state_dir.clone(),
            kill_grace: cfg.kill_grace,
            shim: cfg.shim.clone(),
            cgroups: cfg.cgroups,
        },
        snapshot.clone(),
    )
    .await?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let (mesh_tx, mesh_rx) = tokio::sync::watch::channel(overlay::MeshStatus::Disabled {
        reason: "--no-mesh".into(),
    });
    let mut state = api::AppState {
        engine: engine.clone(),
        snapshot,
        relay: None,
        mesh: mesh_rx,
    };
    let mut exposed = None;
    let mut mesh_node = None;
    match cfg.relay.clone() {
        Some(opts) if relay::joined(&cfg.state_dir, &opts)? => {
            let (link_tx, link_rx) =
                tokio::sync::watch::channel(LinkState::Connecting { attempt: 1 });
            state.relay = Some(link_rx.clone());
            let mut rx3 = rx.clone();
            let ray = ray_context(&cfg).await;
            let key_path = cfg.state_dir.join(tunnel_relay::keys::USAGE_KEY_FILE);
            let usage = pool_feed::UsageSigning {
                worker: opts.name.clone(),
                signer: tunnel_relay::keys::usage_key(&key_path).map_err(|source| {
                    RunError::UsageKey {
                        path: key_path.clone(),
                        source,
                    }
                })?,
            };
            exposed = Some(relay::start(
                cfg.state_dir.clone(),
                opts,
                api::router(state.clone()),
                pool_feed::PoolFeed::with_ray(
                    engine.clone(),
                    state.snapshot.clone(),
                    ray,
                    Some(usage),
                ),
                link_tx,
                async move { stopped(&mut rx3).await },
            )?);
            if let Some(m) = cfg.mesh.clone() {
                mesh_node = Some(overlay::start(
                    cfg.state_dir.clone(),
                    m,
                    api::router(state.clone()),
                    link_rx,
                    rx.clone(),
                    mesh_tx,
                ));
            }
        }
        Some(_) => {
            warn!(
                state_dir = %cfg.state_dir.display(),
                "not joined to a relay: the jobs API is on loopback only; run once with --token to join"
            );
            mesh_tx.send_replace(overlay::MeshStatus::Disabled {
                reason: "not joined to a relay (run once with --token)".into(),
            });
        }
        None => {
            mesh_tx.send_replace(overlay::MeshStatus::Disabled {
                reason: "no relay configured".into(),
            });
        }
    }
    let (listener, addr) = bind(cfg.api_listen).await?;
    info!(api = %addr, "jobs API listening");
    let mut metrics_task = None;
    if let Some(m) = cfg.metrics_listen {
        let (l, local) = bind(m).await?;
        info!(metrics = %local, "metrics listening");
        let app = api::metrics_router(state.clone());
        let mut rx2 = rx.clone();
        metrics_task = Some(tokio::spawn(async move {
            axum::serve(l, app)
                .with_graceful_shutdown(async move { stopped(&mut rx2).await })
                .await
        }));
    }
    // Written last, once every listener is bound: clients may connect as soon as it exists.
    let url_path = cfg.state_dir.join(API_ADDR_FILE);
    let tmp = cfg.state_dir.join(format!("{API_ADDR_FILE}.tmp"));
    std::fs::write(&tmp, format!("http://{addr}\n"))
        .and_then(|()| std::fs::rename(&tmp, &url_path))
        .map_err(|source| RunError::WriteAddr {
            path: url_path.clone(),
            source,
        })?;
    let mut rx1 = rx.clone();
    let res = axum::serve(listener, api::local_router(state))
        .with_graceful_shutdown(async move { stopped(&mut rx1).await })
        .await;
    engine.shutdown().await;
    if let Some(t) = metrics_task {
        t.abort();
    }
    if let Some(m) = mesh_node {
        m.finish().await;
    }
    if let Some(e) = exposed {
        e.finish().await;
    }
    drop(sampler);
    res.map_err(RunError::Serve)
}
