//! HTTP/JSON API (axum) and `/metrics`. Served on three entry points: a loopback listener
//! (callers recorded as [`LOCAL_CALLER`]), the relay's `agent` service (callers recorded by
//! their relay-authenticated node name, see `relay.rs`), and the node's overlay addresses on
//! the mesh (callers recorded by the name of the mesh peer owning the source address, see
//! `overlay.rs`). The caller is a request extension set by
//! the entry point, never read from the request.
//!
//! Owners: the provider ([`LOCAL_CALLER`]) and the pool's coordinator
//! ([`weft_proto::pool::POOL_CALLER`]) see and act on every job; any other caller lists only
//! the jobs it submitted (`job.caller`), and show / logs / cancel of another's job answer 403
//! (`job 7 belongs to another engineer`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tunnel_relay::link::LinkState;

use crate::agent::{AgentError, Engine};
use crate::job::{Job, JobRequest};
use crate::mesh_status::MeshStatus;
use crate::sampler::{SharedSnapshot, Snapshot};
use weft_proto::pool::POOL_CALLER;

/// The caller recorded for requests on the loopback listener. `@` cannot appear in a relay
/// node name, so a local caller is never mistaken for an engineer of the same name.
pub const LOCAL_CALLER: &str = "@local";

/// Who made a request: inserted by the entry point (loopback listener or relay stream) as a
/// request extension. A route reached without one answers 500 (fail closed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller(pub String);

impl Caller {
    /// The fixed identity of loopback callers.
    pub fn local() -> Caller {
        Caller(LOCAL_CALLER.to_string())
    }

    /// Whether this caller sees and acts on every job: the provider on the machine
    /// ([`LOCAL_CALLER`]) and the pool's coordinator ([`POOL_CALLER`]). Any other caller (an
    /// engineer through the relay or the mesh) sees only the jobs it submitted.
    pub fn sees_all(&self) -> bool {
        self.0 == LOCAL_CALLER || self.0 == POOL_CALLER
    }

    /// Whether this caller may show, read the logs of and cancel `job`.
    pub fn may_see(&self, job: &Job) -> bool {
        self.sees_all() || job.caller == self.0
    }
}

/// 403 for a job of someone else.
fn not_yours(id: u64) -> Response {
    err(
        StatusCode::FORBIDDEN,
        format!("job {id} belongs to another engineer"),
    )
}

/// The job, when it exists and `caller` may see it; else the 404 or 403 to answer.
fn visible_job(st: &AppState, caller: &Caller, id: u64) -> Result<Job, Box<Response>> {
    match st.engine.get(id) {
        Some(j) if caller.may_see(&j) => Ok(j),
        Some(_) => Err(Box::new(not_yours(id))),
        None => Err(Box::new(AgentError::NotFound(id).into_response())),
    }
}

#[derive(Clone, Debug)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub snapshot: SharedSnapshot,
    /// The relay link as `expose` publishes it; `None` when the agent runs without a relay.
    pub relay: Option<tokio::sync::watch::Receiver<LinkState>>,
    /// The agent's mesh node (`overlay.rs`).
    pub mesh: tokio::sync::watch::Receiver<MeshStatus>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

fn err(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: msg.into() })).into_response()
}

impl IntoResponse for AgentError {
    fn into_response(self) -> Response {
        let code = match &self {
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Invalid(_) => StatusCode::BAD_REQUEST,
            AgentError::Refused(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        err(code, self.to_string())
    }
}

/// `/v1/status`: the last GPU snapshot plus job counts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    /// GPU UUID → job id holding it.
    pub gpu_holders: BTreeMap<String, u64>,
    pub jobs_running: Vec<u64>,
    pub jobs_queued: Vec<u64>,
    /// The relay connection, the one link state (`{"state": "connected" | "connecting" |
    /// "reconnecting" | "refused" | "stopped", ...}`, see [`LinkState`]); `null` when the agent
    /// has not joined a relay.
    #[serde(default)]
    pub relay: Option<LinkState>,
    /// The mesh node (`{"state": "joined", "name": .., "ipv4": .., "ipv6": .., "api": [..]}`,
    /// `disabled`, `waiting_for_relay`, `joining`, `retrying`, `failed` with a `reason`,
    /// `stopped`); `null` from an agent that predates the mesh.
    #[serde(default)]
    pub mesh: Option<MeshStatus>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(show))
        .route("/v1/jobs/{id}/logs", get(logs))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /v1/jobs, /v1/status, /metrics",
            )
        })
        .with_state(state)
}

/// The API for the loopback listener: every caller is [`LOCAL_CALLER`].
pub fn local_router(state: AppState) -> Router {
    router(state).layer(Extension(Caller::local()))
}

pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn parse_id(s: &str) -> Result<u64, Box<Response>> {
    s.parse().map_err(|_| {
        Box::new(err(
            StatusCode::BAD_REQUEST,
            format!("job id {s:?} is not a number"),
        ))
    })
}

async fn submit(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<JobRequest>, JsonRejection>,
) -> Response {
    let spec = match body {
        Ok(Json(s)) => s,
        Err(e) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!("malformed job: {}", e.body_text()),
            )
        }
    };
    match st.engine.submit(caller.0, spec).await {
        Ok(job) => (StatusCode::CREATED, Json(job)).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Every job for the provider and the coordinator; an engineer's own jobs for an engineer.
async fn list(State(st): State<AppState>, Extension(caller): Extension<Caller>) -> Json<Vec<Job>> {
    let mut jobs = st.engine.list();
    jobs.retain(|j| caller.may_see(j));
    Json(jobs)
}

async fn show(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match parse_id(&id).and_then(|id| visible_job(&st, &caller, id)) {
        Ok(j) => Json(j).into_response(),
        Err(r) => *r,
    }
}

async fn cancel(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match parse_id(&id).and_then(|id| visible_job(&st, &caller, id)) {
        Ok(j) => match st.engine.cancel(j.id).await {
            Ok(j) => Json(j).into_response(),
            Err(e) => e.into_response(),
        },
        Err(r) => *r,
    }
}

#[derive(Debug, Deserialize)]
struct LogQuery {
    #[serde(default)]
    follow: bool,
}

async fn logs(
    State(st): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    q: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let id = match parse_id(&id) {
        Ok(i) => i,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = q else {
        return err(
            StatusCode::BAD_REQUEST,
            "query must be `follow=true` or `follow=false`",
        );
    };
    let job = match visible_job(&st, &caller, id) {
        Ok(j) => j,
        Err(r) => return *r,
    };
    let path = std::path::PathBuf::from(&job.log_path);
    if !q.follow {
        return match tokio::fs::read(&path).await {
            Ok(b) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], b).into_response(),
            Err(_) => (
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                Vec::new(),
            )
                .into_response(),
        };
    }
    // Follow: send what is there, then new bytes, until the job is finished and drained.
    let engine = st.engine.clone();
    let stream = futures::stream::unfold((0u64, false), move |(pos, done)| {
        let engine = engine.clone();
        let path = path.clone();
        async move {
            if done {
                return None;
            }
            loop {
                let finished = engine.get(id).is_none_or(|j| j.state.is_terminal());
                let mut buf = Vec::new();
                if let Ok(mut f) = tokio::fs::File::open(&path).await {
                    if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                        // at most 64 KiB per chunk: a large log streams instead of loading whole
                        let _ = f.take(64 * 1024).read_to_end(&mut buf).await;
                    }
                }
                if !buf.is_empty() {
                    let n = buf.len() as u64;
                    return Some((Ok::<_, std::io::Error>(buf), (pos + n, false)));
                }
                if finished {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn status_of(st: &AppState) -> Status {
    let snapshot = st.snapshot.read().clone();
    let jobs = st.engine.list();
    Status {
        snapshot,
        gpu_holders: st.engine.holders(),
        jobs_running: jobs
            .iter()
            .filter(|j| j.state.name() == "running")
            .map(|j| j.id)
            .collect(),
        jobs_queued: jobs
            .iter()
            .filter(|j| j.state.name() == "queued")
            .map(|j| j.id)
            .collect(),
        relay: st.relay.as_ref().map(|r| r.borrow().clone()),
        mesh: Some(st.mesh.borrow().clone()),
    }
}

async fn status(State(st): State<AppState>) -> Json<Status> {
    Json(status_of(&st))
}

async fn metrics(State(st): State<AppState>) -> Response {
    let snap = st.snapshot.read().clone();
    let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
    for j in st.engine.list() {
        *by_state.entry(j.state.name()).or_default() += 1;
    }
    let body = crate::metrics::render(&snap, &st.engine.holders(), &by_state);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Refuses non-loopback addresses for the local listener: the jobs API is reached through the
/// relay or on the mesh's overlay addresses, never on a public address.
pub fn check_loopback(addr: SocketAddr, flag: &str) -> Result<(), String> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(format!(
            "{flag} {addr}: only loopback addresses are allowed (the relay exposes the API)"
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::client::{request_on, Call};
    use crate::health::HealthState;
    use crate::testutil;
    use hyper_util::rt::TokioIo;
    use hyper_util::service::TowerToHyperService;

    async fn state(dir: &std::path::Path) -> AppState {
        let snap = testutil::snapshot(vec![testutil::gpu(0, "GPU-0", HealthState::Healthy)]);
        let (_tx, mesh) = tokio::sync::watch::channel(MeshStatus::Disabled {
            reason: "test".into(),
        });
        AppState {
            engine: testutil::engine(dir, snap.clone()).await,
            snapshot: snap,
            relay: None,
            mesh,
        }
    }

    /// One request as `caller`, served the way a relay stream is (`relay.rs`).
    async fn call(
        st: &AppState,
        caller: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> (u16, String) {
        let (client, server) = tokio::io::duplex(1 << 16);
        let svc = TowerToHyperService::new(
            router(st.clone()).layer(Extension(Caller(caller.to_string()))),
        );
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(server), svc)
                .await;
        });
        let mut out = Vec::new();
        let (code, failed) = request_on(client, "test", Call::new(method, path, body), &mut out)
            .await
            .unwrap();
        out.extend(failed);
        (code, String::from_utf8(out).unwrap())
    }

    fn ids(body: &str) -> Vec<u64> {
        let jobs: Vec<Job> = serde_json::from_str(body).unwrap();
        jobs.iter().map(|j| j.id).collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engineers_see_and_act_on_their_own_jobs_only() {
        let dir = tempfile::tempdir().unwrap();
        let st = state(dir.path()).await;
        let sleep = r#"{"command": ["sleep", "30"]}"#;
        let (code, _) = call(&st, "alice", "POST", "/v1/jobs", Some(sleep)).await;
        assert_eq!(code, 201);
        let (code, _) = call(&st, "bob", "POST", "/v1/jobs", Some(sleep)).await;
        assert_eq!(code, 201);
        let (a, b) = (1, 2);

        // listing: an engineer's own; the provider and the coordinator: all
        assert_eq!(
            ids(&call(&st, "alice", "GET", "/v1/jobs", None).await.1),
            vec![a]
        );
        assert_eq!(
            ids(&call(&st, "bob", "GET", "/v1/jobs", None).await.1),
            vec![b]
        );
        assert_eq!(
            ids(&call(&st, LOCAL_CALLER, "GET", "/v1/jobs", None).await.1),
            vec![a, b]
        );
        assert_eq!(
            ids(&call(&st, POOL_CALLER, "GET", "/v1/jobs", None).await.1),
            vec![a, b]
        );

        // show, logs, cancel of bob's job by alice: 403, and bob's job runs on
        for (method, path) in [
            ("GET", format!("/v1/jobs/{b}")),
            ("GET", format!("/v1/jobs/{b}/logs")),
            ("GET", format!("/v1/jobs/{b}/logs?follow=true")),
            ("POST", format!("/v1/jobs/{b}/cancel")),
        ] {
            let (code, body) = call(&st, "alice", method, &path, None).await;
            assert_eq!(code, 403, "{method} {path}: {body}");
            assert!(body.contains("job 2 belongs to another engineer"), "{body}");
        }
        assert!(
            st.engine.get(b).unwrap().stopping.is_none(),
            "alice's cancel did nothing"
        );
        // a job that does not exist is still 404
        assert_eq!(call(&st, "alice", "GET", "/v1/jobs/99", None).await.0, 404);

        // her own job: shown and cancelled
        let (code, body) = call(&st, "alice", "GET", &format!("/v1/jobs/{a}"), None).await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(
            call(&st, "alice", "GET", &format!("/v1/jobs/{a}/logs"), None)
                .await
                .0,
            200
        );
        assert_eq!(
            call(&st, "alice", "POST", &format!("/v1/jobs/{a}/cancel"), None)
                .await
                .0,
            200
        );
        // the coordinator and the provider act on anyone's
        let (code, body) = call(&st, POOL_CALLER, "GET", &format!("/v1/jobs/{b}"), None).await;
        assert_eq!(code, 200, "{body}");
        let (code, body) = call(
            &st,
            LOCAL_CALLER,
            "POST",
            &format!("/v1/jobs/{b}/cancel"),
            None,
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert!(st.engine.get(b).unwrap().stopping.is_some());
        st.engine.kill_all();
        st.engine.shutdown().await;
    }
}
