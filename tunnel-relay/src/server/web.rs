//! The web view (issue 15): the explorer's pages and `/api/v1`, served by the relay on
//! `web_listen` (`serve --web ADDR`; off by default), HTTPS with the relay's certificate (or
//! `web_tls`), or plain HTTP behind a TLS-terminating proxy (`web_plain_http`).
//!
//! Login without passwords: `weft web` sends [`Message::WebLogin`] on its authenticated relay
//! connection and gets a one-time link bound to its identity (`session.rs`); opening it sets a
//! `weft_session` cookie (`HttpOnly; Secure; SameSite=Strict`). Every page and API call but
//! the public summary needs that session (else 401 and no data); every state-changing request
//! carries the session's CSRF token. What each identity sees is `model.rs`'s; the pages are
//! `pages.rs`'s. Sessions live in this relay's memory: a restart logs everyone out, and in a
//! fleet a link works on the relay that made it.

mod model;
mod pages;
mod session;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::QueryRejection;
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tracing::{debug, info, warn};

use super::{lock, NodeCtx, Shared};
use crate::transport::SendStream;
use crate::wire::{write_message, Message, Reason, Rejection};
use model::{Inputs, Role, Viewer};
use session::{Session, Sessions, Who};

/// The session cookie's name.
const COOKIE: &str = "weft_session";
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 512;

/// The web view's state in the relay.
pub(super) struct WebShell {
    sessions: Mutex<Sessions>,
    /// GPU-seconds per device and day, brought up to date at each Earnings request.
    earnings: Mutex<model::EarningsIndex>,
    /// Where browsers reach it (None: off).
    base: Option<String>,
    started_ms: u64,
    /// The relay addresses an "add device" token names (as `token create` does).
    token_addrs: Vec<String>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl WebShell {
    pub(super) fn new(
        config: &crate::config::RelayConfig,
        bound: Option<std::net::SocketAddr>,
        relay: std::net::SocketAddr,
    ) -> WebShell {
        let mut token_addrs = config.public_addrs.clone();
        if token_addrs.is_empty() && !relay.ip().is_unspecified() {
            token_addrs.push(relay.to_string());
        }
        WebShell {
            token_addrs,
            sessions: Mutex::new(Sessions::default()),
            earnings: Mutex::new(model::EarningsIndex::default()),
            base: config.web_base(bound),
            started_ms: unix_ms(),
        }
    }

    /// Revoked nodes' sessions end now.
    pub(super) fn revoked(&self, keys: &HashSet<crate::keys::PublicKey>) {
        let n = lock(&self.sessions).end_for(keys);
        if n > 0 {
            info!(sessions = n, "web sessions of revoked nodes ended");
        }
    }
}

/// Answers `weft web`: a one-time link for this node, or why there is none.
pub(super) async fn login(shared: Arc<Shared>, ctx: NodeCtx, mut send: SendStream) {
    let msg = match &shared.web.base {
        None => Message::Rejected(Rejection::new(
            Reason::ServiceUnavailable,
            "this relay serves no web view; its operator turns it on with `serve --web ADDR` \
             (or web_listen in its config)",
        )),
        Some(base) => {
            let who = Who {
                name: ctx.name.clone(),
                key: ctx.key,
                tags: ctx.tags.clone(),
            };
            let token = lock(&shared.web.sessions).mint_link(who, rand::random(), Instant::now());
            info!(node = %ctx.name, "web login link issued");
            Message::WebLink {
                url: format!("{base}/login?t={token}"),
                expires_s: session::LINK_TTL.as_secs() as u32,
            }
        }
    };
    let _ = write_message(&mut send, &msg).await;
    let _ = send.finish();
}

/// The listener and its TLS, bound with the relay (so a taken port fails `serve` at once).
pub(super) struct WebListener {
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl WebListener {
    /// Binds `web_listen`, if set.
    pub(super) fn bind(
        config: &crate::config::RelayConfig,
        dir: &std::path::Path,
    ) -> Result<Option<WebListener>, crate::error::RelayError> {
        let Some(addr) = config.web_listen else {
            return Ok(None);
        };
        let tls = if config.web_plain_http {
            None
        } else {
            let files = if config.web_tls.cert_file.is_some() {
                &config.web_tls
            } else {
                &config.tls
            };
            let (chain, key) = crate::tls::server_cert(dir, files)?;
            let c = crate::tls::rustls_server(chain, key, b"http/1.1")
                .map_err(crate::error::RelayError::Tls)?;
            Some(Arc::new(c))
        };
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| crate::error::RelayError::Bind { addr, source })?;
        Ok(Some(WebListener { listener, tls }))
    }

    /// The bound address.
    pub(super) fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.listener.local_addr().ok()
    }
}

/// Serves the web view until the task is aborted.
pub(super) async fn serve(shared: Arc<Shared>, l: WebListener) {
    let Ok(listener) = tokio::net::TcpListener::from_std(l.listener) else {
        warn!("web listener could not be registered");
        return;
    };
    let acceptor = l.tls.map(tokio_rustls::TlsAcceptor::from);
    // The earnings index reads every stored record once: now, not at the first visitor.
    let warm = shared.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = catch_up_earnings(&warm) {
            warn!(error = %e, "web view: could not read the usage records");
        }
    });
    let app = router(shared.clone());
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    info!(addr = ?listener.local_addr().ok(), tls = acceptor.is_some(), "web view listening");
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                debug!(error = %e, "web accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(a) => {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), a.accept(tcp))
                        .await
                    {
                        Ok(Ok(tls)) => serve_conn(app, tls).await,
                        _ => debug!(%peer, "web TLS handshake failed"),
                    }
                }
                None => serve_conn(app, tcp).await,
            }
        });
    }
}

async fn serve_conn<S>(app: Router, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let svc = TowerToHyperService::new(app);
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(std::time::Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(network))
        .route("/login", get(login_page))
        .route("/logout", post(logout))
        .route("/devices", get(devices))
        .route("/devices/add", post(add_device))
        .route("/devices/{name}", get(device))
        .route("/devices/{name}/label", post(rename_device))
        .route("/devices/{name}/remove", post(remove_device))
        .route("/devices/{name}/approve", post(approve_device))
        .route("/jobs", get(jobs_page))
        .route("/earnings", get(earnings_page))
        .route("/earnings.csv", get(earnings_csv))
        .route("/assets/weft.css", get(css))
        .route("/assets/live.js", get(js))
        .route("/api/v1/summary", get(api_summary))
        .route("/api/v1/nodes", get(api_nodes))
        .route("/api/v1/nodes/{name}", get(api_node))
        .route("/api/v1/paths", get(api_paths))
        .route("/api/v1/clusters", get(api_clusters))
        .route("/api/v1/jobs", get(api_jobs))
        .route("/api/v1/jobs/{id}", get(api_job))
        .route("/api/v1/usage", get(api_usage))
        .route("/api/v1/usage/export", get(api_export))
        .route("/api/v1/earnings", get(api_earnings))
        .fallback(|| async { not_found() })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(shared)
}

/// Every answer: no framing by other sites, no sniffing, no referrer (links carry tokens),
/// scripts and styles from this origin only.
async fn security_headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": "not found"})),
    )
        .into_response()
}

fn api_error(code: StatusCode, msg: &str) -> Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

// ---- who is asking ----

fn cookie_of(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == COOKIE).then_some(v)
        })
}

fn session_of(shared: &Shared, headers: &HeaderMap) -> Option<Session> {
    let c = cookie_of(headers)?;
    lock(&shared.web.sessions).check(c, Instant::now()).cloned()
}

fn viewer_of(shared: &Shared, s: &Session) -> Viewer {
    let (operator, engineer) = shared.pool.roles(&s.who.tags);
    if operator {
        return Viewer::new(&s.who.name, Role::Operator);
    }
    if engineer {
        let mut v = Viewer::new(&s.who.name, Role::Engineer);
        v.reach = model::Reach::of(&s.who.tags, shared.policies());
        return v;
    }
    // A provider's machine: its account's devices (the registry's nodes of that owner).
    let nodes =
        tokio::task::block_in_place(|| lock(&shared.registry).list_nodes()).unwrap_or_else(|e| {
            warn!(error = %e, "web view: could not read the registry");
            Vec::new()
        });
    Viewer::provider(&s.who.name, &nodes)
}

/// How long a page may go without being built again though nothing moved (its relative
/// times, "relay uptime", readings going stale, the charts' minutes).
const MAX_AGE_MS: u64 = 60_000;
/// The same where the relay cannot see every change (a fleet's PostgreSQL registry, or a fleet
/// relay that does not schedule the pool): the page is built again this often.
const MAX_AGE_BLIND_MS: u64 = 5_000;

/// The version of what the pages show, as an entity tag: it changes whenever the registry,
/// the pool, the mesh's or the relay's sessions, or GPU readings change, when the relay
/// restarts, and at least every [`MAX_AGE_MS`]. Costs a few counters and one SQLite pragma,
/// no list: a live poll whose tag still matches is answered 304 without building anything.
fn version_tag(shared: &Shared, now_ms: u64) -> String {
    // The registry's mutex may be held by a long admission (PostgreSQL): wait off the runtime.
    let registry = tokio::task::block_in_place(|| lock(&shared.registry).web_gen());
    let pool = shared.pool.web_gen();
    let mesh = shared.mesh.web_gen();
    let routes = lock(&shared.routes).changes();
    let every = if registry.is_some() && pool.is_some() {
        MAX_AGE_MS
    } else {
        MAX_AGE_BLIND_MS
    };
    format!(
        "\"{:x}.{:x}.{:x}.{:x}.{:x}.{:x}\"",
        shared.web.started_ms,
        registry.unwrap_or(0),
        pool.unwrap_or(0),
        mesh,
        routes,
        now_ms / every
    )
}

/// A live poll (`X-Weft-Live`) whose `If-None-Match` is still the version: 304, nothing built.
fn unchanged(headers: &HeaderMap, tag: &str) -> bool {
    headers.get("x-weft-live").is_some()
        && headers
            .get(header::IF_NONE_MATCH)
            .is_some_and(|v| v.as_bytes() == tag.as_bytes())
}

fn not_modified(tag: &str) -> Response {
    let mut r = StatusCode::NOT_MODIFIED.into_response();
    if let Ok(v) = HeaderValue::from_str(tag) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// Who is asking for a page and the version it will show; the public page with 401 when
/// nobody is logged in; 304 when a live poll already has this version.
struct PageCtx {
    v: Viewer,
    s: Session,
    tag: String,
}

/// The viewer of a page (or the public page with 401, or 304 for an unchanged live poll).
fn page_viewer(shared: &Shared, headers: &HeaderMap) -> Result<PageCtx, Box<Response>> {
    match session_of(shared, headers) {
        Some(s) => {
            let tag = version_tag(shared, unix_ms());
            if unchanged(headers, &tag) {
                return Err(Box::new(not_modified(&tag)));
            }
            Ok(PageCtx {
                v: viewer_of(shared, &s),
                s,
                tag,
            })
        }
        None => {
            let s = model::summary(&inputs(shared));
            let note = "Log in with `weft web` to see this page.";
            let page = Html(pages::public(&s, Some(note)));
            Err(Box::new((StatusCode::UNAUTHORIZED, page).into_response()))
        }
    }
}

/// The viewer of an API call (or 401 with no data).
fn api_viewer(shared: &Shared, headers: &HeaderMap) -> Result<Viewer, Box<Response>> {
    session_of(shared, headers)
        .map(|s| viewer_of(shared, &s))
        .ok_or_else(|| {
            Box::new(api_error(
                StatusCode::UNAUTHORIZED,
                "log in first: `weft web` opens a one-time link that starts a session",
            ))
        })
}

/// What the relay knows now.
fn inputs(shared: &Shared) -> Inputs {
    let nodes =
        tokio::task::block_in_place(|| lock(&shared.registry).list_nodes()).unwrap_or_else(|e| {
            warn!(error = %e, "web view: could not read the registry");
            Vec::new()
        });
    let (workers, jobs) = shared.pool.web_state();
    let mut online: HashSet<String> = shared
        .mesh
        .online_names()
        .into_iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    online.extend(
        lock(&shared.routes)
            .worker_names()
            .map(|n| n.to_ascii_lowercase()),
    );
    online.extend(
        workers
            .iter()
            .filter(|w| matches!(w.state.as_str(), "ready" | "cordoned" | "draining"))
            .map(|w| w.name.to_ascii_lowercase()),
    );
    let now_ms = unix_ms();
    let readings = {
        let t = lock(&shared.pool.telemetry);
        workers
            .iter()
            .flat_map(|w| {
                w.inventory
                    .gpus
                    .iter()
                    .map(move |g| (w.name.as_str(), g.uuid.as_str()))
            })
            .filter_map(|(w, u)| {
                t.latest(w, u, now_ms)
                    .map(|r| ((w.to_string(), u.to_string()), r.clone()))
            })
            .collect()
    };
    let mut paths: Vec<(String, String, bool)> = shared
        .mesh
        .paths()
        .into_iter()
        .map(|(a, b, direct)| (a.to_base64(), b.to_base64(), direct))
        .collect();
    // In a fleet, the reports of nodes homed on the other live relays (from the store); a
    // node's own report here wins over a stale row.
    if shared.fleet() {
        let here: HashSet<String> = paths.iter().map(|p| p.0.clone()).collect();
        let dead = shared
            .dead_relays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match tokio::task::block_in_place(|| lock(&shared.registry).fleet_paths()) {
            Ok(rows) => paths.extend(
                rows.into_iter()
                    .filter(|(_, relay, _)| !dead.contains(relay))
                    .map(|(k, _, ps)| (k.to_base64(), ps))
                    .filter(|(k, _)| !here.contains(k))
                    .flat_map(|(k, ps)| {
                        ps.into_iter()
                            .map(move |p| (k.clone(), p.peer.to_base64(), p.direct))
                    }),
            ),
            Err(e) => warn!(error = %e, "web view: could not read the fleet's path reports"),
        }
    }
    Inputs {
        nodes,
        online,
        workers,
        jobs,
        readings,
        started_ms: shared.web.started_ms,
        now_ms,
        paths,
    }
}

/// A page, or only its `<main>` for the live update (`X-Weft-Live: 1`), with its version.
fn page(
    headers: &HeaderMap,
    title: &str,
    tab: pages::Tab,
    c: &PageCtx,
    main: maud::Markup,
) -> Response {
    let mut r = if headers.get("x-weft-live").is_some() {
        Html(main.into_string()).into_response()
    } else {
        Html(pages::layout(title, tab, &c.v, &c.s.csrf, &c.tag, main)).into_response()
    };
    // The add-device answer has no version (it is not polled).
    if let Some(v) = Some(&c.tag)
        .filter(|t| !t.is_empty())
        .and_then(|t| HeaderValue::from_str(t).ok())
    {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

// ---- pages ----

async fn network(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    if session_of(&shared, &headers).is_none() {
        let s = model::summary(&inputs(&shared));
        return Html(pages::public(&s, None)).into_response();
    }
    let c = match page_viewer(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let inp = inputs(&shared);
    let s = model::summary(&inp);
    let nodes = model::nodes(&inp, &c.v);
    let paths = model::paths(&inp, &c.v);
    page(
        &headers,
        "Network",
        pages::Tab::Network,
        &c,
        pages::network(&s, &nodes, &paths),
    )
}

#[derive(Deserialize)]
struct LinkQuery {
    #[serde(default)]
    t: String,
}

async fn login_page(
    State(shared): State<Arc<Shared>>,
    q: Result<Query<LinkQuery>, QueryRejection>,
) -> Response {
    let t = q.map(|Query(q)| q.t).unwrap_or_default();
    let r = lock(&shared.web.sessions).redeem(&t, rand::random(), rand::random(), Instant::now());
    match r {
        Ok((cookie, s)) => {
            info!(node = %s.who.name, "web session started");
            let set = format!(
                "{COOKIE}={cookie}; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age={}",
                session::SESSION_TTL.as_secs()
            );
            let mut r = Html(pages::go_to("/")).into_response();
            if let Ok(v) = HeaderValue::from_str(&set) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => {
            debug!(error = %e, "web login link refused");
            (StatusCode::FORBIDDEN, Html(pages::error(&e.to_string()))).into_response()
        }
    }
}

#[derive(Deserialize, Default)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let Some(s) = session_of(&shared, &headers) else {
        return api_error(StatusCode::UNAUTHORIZED, "no session");
    };
    let sent = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if !csrf_ok(&s, &sent, &headers) {
        return api_error(StatusCode::FORBIDDEN, "missing or wrong CSRF token");
    }
    if let Some(c) = cookie_of(&headers) {
        lock(&shared.web.sessions).end(c);
    }
    info!(node = %s.who.name, "web session ended (logout)");
    let mut r = Html(pages::go_to("/")).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "weft_session=; Path=/; HttpOnly; Secure; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

/// A form post's session and viewer, once its CSRF token checked out.
fn form_viewer(
    shared: &Shared,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(Viewer, Session), Box<Response>> {
    let Some(s) = session_of(shared, headers) else {
        return Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                Html(pages::error("Log in first: run `weft web`.")),
            )
                .into_response(),
        ));
    };
    if !csrf_ok(&s, csrf, headers) {
        return Err(Box::new(
            (
                StatusCode::FORBIDDEN,
                Html(pages::error(
                    "This form is stale or was not sent by this site (missing or wrong CSRF \
                     token): reload the page and try again.",
                )),
            )
                .into_response(),
        ));
    }
    Ok((viewer_of(shared, &s), s))
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

fn html_error(code: StatusCode, msg: &str) -> Response {
    (code, Html(pages::error(msg))).into_response()
}

/// The viewer of a form posted about device `name` ([`form_viewer`]), if it may act on it:
/// its own (a provider's account lists only live devices) or any (an operator: the registry
/// then says whether it exists); others are told there is no such device, as a page they
/// cannot see says.
fn device_form(
    shared: &Shared,
    headers: &HeaderMap,
    csrf: &str,
    name: &str,
) -> Result<Viewer, Box<Response>> {
    let (v, _) = form_viewer(shared, headers, csrf)?;
    if v.owns(name) {
        Ok(v)
    } else {
        Err(Box::new(html_error(
            StatusCode::NOT_FOUND,
            "No such device (or not one of yours).",
        )))
    }
}

#[derive(Deserialize, Default)]
struct LabelForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    label: String,
}

/// A device's display name: at most 64 characters, no control characters; empty: its node
/// name again.
fn valid_label(label: &str) -> Result<Option<&str>, String> {
    let l = label.trim();
    if l.is_empty() {
        return Ok(None);
    }
    if l.chars().count() > 64 {
        return Err(format!(
            "The name is {} characters long; 64 at most.",
            l.chars().count()
        ));
    }
    if l.chars().any(char::is_control) {
        return Err("The name may not hold control characters (tabs, line breaks).".into());
    }
    Ok(Some(l))
}

/// `POST /devices/NAME/label`: renames a device (its display name; the node name, ssh alias
/// and DNS name stay).
async fn rename_device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    form: Result<Form<LabelForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    let v = match device_form(&shared, &headers, &f.csrf, &name) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let label = match valid_label(&f.label) {
        Ok(l) => l,
        Err(e) => return html_error(StatusCode::BAD_REQUEST, &e),
    };
    let renamed = tokio::task::block_in_place(|| {
        let mut reg = lock(&shared.registry);
        if let Some(l) = label {
            // A display name that is another device's name would read as that device.
            let other = reg
                .list_nodes()?
                .into_iter()
                .find(|n| n.name != name && n.name.eq_ignore_ascii_case(l));
            if let Some(n) = other {
                return Ok(Err(n.name));
            }
        }
        reg.set_label(&name, label).map(Ok)
    });
    match renamed {
        Ok(Ok(true)) => {
            info!(device = %name, by = %v.name, label = ?label, "device renamed in the web view");
            see_other(&format!("/devices/{name}"))
        }
        Ok(Ok(false)) => html_error(StatusCode::NOT_FOUND, "No such device."),
        Ok(Err(other)) => html_error(
            StatusCode::BAD_REQUEST,
            &format!(
                "{other} is the name of another device: a display name may not be one. \
                 Nothing was renamed."
            ),
        ),
        Err(e) => html_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Deserialize, Default)]
struct RemoveForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
}

/// `POST /devices/NAME/remove`: revokes the device (as `nodes revoke`: its sessions end, it
/// leaves the mesh and the pool, its identity is refused from now on). The form repeats the
/// device's name.
async fn remove_device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    form: Result<Form<RemoveForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    let v = match device_form(&shared, &headers, &f.csrf, &name) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if f.confirm.trim() != name {
        return html_error(
            StatusCode::BAD_REQUEST,
            &format!("To remove {name}, type its name ({name}) in the box: nothing was removed."),
        );
    }
    match tokio::task::block_in_place(|| lock(&shared.registry).revoke_node(&name)) {
        Ok(()) => {
            info!(device = %name, by = %v.name, "device removed (revoked) in the web view");
            shared.revoked_here.notify_one();
            see_other("/devices")
        }
        Err(crate::error::StateError::NotFound(_)) => {
            html_error(StatusCode::NOT_FOUND, "No such device.")
        }
        Err(e) => html_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `POST /devices/NAME/approve`: an operator approves a provider's machine that waits for it
/// (as `nodes approve`); it is admitted at its next try.
async fn approve_device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    let v = match device_form(&shared, &headers, &f.csrf, &name) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    if v.role != Role::Operator {
        return html_error(
            StatusCode::FORBIDDEN,
            "An operator of this relay approves new machines; yours comes online once one has.",
        );
    }
    match tokio::task::block_in_place(|| lock(&shared.registry).approve_node(&name)) {
        Ok(true) => {
            info!(device = %name, by = %v.name, "device approved in the web view");
            see_other(&format!("/devices/{name}"))
        }
        Ok(false) => html_error(
            StatusCode::CONFLICT,
            &format!("{name} is not waiting for approval (already approved, or removed)."),
        ),
        Err(crate::error::StateError::NotFound(_)) => {
            html_error(StatusCode::NOT_FOUND, "No such device.")
        }
        Err(e) => html_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

#[derive(Deserialize, Default)]
struct AddForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// How long an "add device" token lasts.
const ADD_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);
/// Most add-device tokens a provider account may hold unused at once: a provider adds machines
/// as fast as it runs the commands, but cannot stockpile tokens.
const MAX_OPEN_ADD_TOKENS: usize = 10;

/// Why an add-device request made no token.
enum AddRefused {
    /// A node already has the name.
    NameTaken(String),
    /// The account holds this many unused, unexpired add-device tokens.
    TooManyOpen(usize),
}

/// Whether token `t` can still admit a node at `now` (unix seconds).
fn usable(t: &crate::records::TokenRecord, now: u64) -> bool {
    !t.revoked && t.uses_left != Some(0) && t.expires_at.is_none_or(|e| e > now)
}

/// `POST /devices/add`: a one-use join token for a new machine of the caller's account (a
/// provider's; an operator's tokens belong to no account) and the exact command to run on it.
async fn add_device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    form: Result<Form<AddForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let f = form.map(|Form(f)| f).unwrap_or_default();
    let (v, s) = match form_viewer(&shared, &headers, &f.csrf) {
        Ok(x) => x,
        Err(r) => return *r,
    };
    let name = f.name.trim();
    if !crate::registry::Registry::valid_name(name) {
        return html_error(
            StatusCode::BAD_REQUEST,
            "A device name is 1 to 64 letters, digits, '.', '_' or '-', not starting with '-' or \
             '.' (it becomes the machine's ssh alias and DNS name).",
        );
    }
    let (owner, tag) = match v.role {
        Role::Operator => (None, "worker".to_string()),
        // The new machine gets the tag of the one the provider logged in from.
        Role::Provider => (
            Some(v.account.clone()),
            s.who
                .tags
                .first()
                .cloned()
                .unwrap_or_else(|| "worker".into()),
        ),
        Role::Engineer => {
            return html_error(
                StatusCode::FORBIDDEN,
                "Engineers do not add devices: a provider adds one from a machine of theirs \
                 (`weft web` there), an operator from anywhere.",
            )
        }
    };
    if shared.web.token_addrs.is_empty() {
        return html_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "This relay does not know the address machines reach it at: its operator sets \
             public_addrs in its config.",
        );
    }
    let made = tokio::task::block_in_place(|| {
        let mut reg = lock(&shared.registry);
        let now = crate::registry::unix_now();
        if let Some(n) = reg.list_nodes()?.into_iter().find(|n| n.name == name) {
            return Ok(Err(AddRefused::NameTaken(n.name)));
        }
        if let Some(acct) = owner.as_deref() {
            let open = reg
                .list_tokens()?
                .iter()
                .filter(|t| t.owner.as_deref() == Some(acct) && usable(t, now))
                .count();
            if open >= MAX_OPEN_ADD_TOKENS {
                return Ok(Err(AddRefused::TooManyOpen(open)));
            }
        }
        reg.create_owned_token(&tag, Some(ADD_TOKEN_TTL), Some(1), now, owner.as_deref())
            .map(Ok)
    });
    let (secret, id) = match made {
        Ok(Ok(x)) => x,
        Ok(Err(AddRefused::NameTaken(n))) => {
            return html_error(
                StatusCode::CONFLICT,
                &format!("A device named {n} already exists: pick another name."),
            )
        }
        Ok(Err(AddRefused::TooManyOpen(open))) => {
            return html_error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!(
                    "{open} add-device commands of this account are still unused (each lasts \
                     {} minutes): run one of them on its machine, or wait for them to expire.",
                    ADD_TOKEN_TTL.as_secs() / 60
                ),
            )
        }
        Err(e) => return html_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    let token = crate::Token {
        relay_addrs: shared.web.token_addrs.clone(),
        relay_key: shared.key.public(),
        secret,
    }
    .encode();
    info!(by = %v.name, token = %id, owner = ?owner, "web view: add-device token made");
    // No live updates on this page (its address takes posts only): no version.
    let c = PageCtx {
        tag: String::new(),
        v,
        s,
    };
    let main = pages::added(name, &token, &tag, ADD_TOKEN_TTL.as_secs() / 60);
    let mut r = page(
        &HeaderMap::new(),
        "Add a device",
        pages::Tab::Devices,
        &c,
        main,
    );
    *r.status_mut() = StatusCode::CREATED;
    r
}

/// The CSRF token of a state-changing request: the form's `csrf` field or the
/// `X-CSRF-Token` header, compared in constant time.
fn csrf_ok(s: &Session, form: &str, headers: &HeaderMap) -> bool {
    let sent = if form.is_empty() {
        headers
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    } else {
        form
    };
    // Constant time over the token's length: no early exit on the first wrong byte.
    sent.len() == s.csrf.len()
        && !sent.is_empty()
        && sent
            .bytes()
            .zip(s.csrf.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

async fn devices(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<Query<pages::DeviceQuery>, QueryRejection>,
) -> Response {
    let c = match page_viewer(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let v = &c.v;
    let q = q.map(|Query(q)| q).unwrap_or_default();
    let inp = inputs(&shared);
    let nodes = model::nodes(&inp, v);
    let adds = v.role != Role::Engineer;
    page(
        &headers,
        "Devices",
        pages::Tab::Devices,
        &c,
        pages::devices(&nodes, &q, inp.now_ms, adds.then_some(c.s.csrf.as_str())),
    )
}

async fn device(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let c = match page_viewer(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let v = &c.v;
    let inp = inputs(&shared);
    let Some(n) = model::nodes(&inp, v).into_iter().find(|n| n.name == name) else {
        return (StatusCode::NOT_FOUND, Html(pages::error("No such device."))).into_response();
    };
    let jobs: Vec<_> = model::jobs(&inp, v)
        .into_iter()
        .filter(|j| j.members.iter().any(|m| m.worker == n.name))
        .collect();
    let history = history_of(&shared, &n, inp.now_ms);
    let manage = (v.owns(&n.name) && n.state != "revoked").then_some(c.s.csrf.as_str());
    let approve = v.role == Role::Operator && n.state == model::AWAITING_APPROVAL;
    let main = pages::device(&n, &jobs, &history, inp.now_ms, manage, approve);
    page(&headers, &n.name.clone(), pages::Tab::Devices, &c, main)
}

/// Each GPU's last hour.
fn history_of(
    shared: &Shared,
    n: &model::NodeView,
    now_ms: u64,
) -> std::collections::BTreeMap<String, Vec<crate::telemetry::Point>> {
    let t = lock(&shared.pool.telemetry);
    n.gpus
        .iter()
        .map(|g| (g.uuid.clone(), t.history(&n.name, &g.uuid, now_ms)))
        .collect()
}

async fn jobs_page(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let c = match page_viewer(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let v = &c.v;
    let inp = inputs(&shared);
    let jobs = model::jobs(&inp, v);
    let clusters = model::clusters(&inp, v);
    page(
        &headers,
        "Jobs",
        pages::Tab::Jobs,
        &c,
        pages::jobs(&jobs, &clusters),
    )
}

/// The earnings index brought up to date with what was stored since it last looked (blocks).
fn catch_up_earnings(
    shared: &Shared,
) -> Result<std::sync::MutexGuard<'_, model::EarningsIndex>, String> {
    let mut ix = lock(&shared.web.earnings);
    for s in shared.pool.usage_after(ix.last_seq)? {
        ix.add(s.seq, &s.record);
    }
    Ok(ix)
}

/// `v`'s earnings rows.
fn earnings_for(shared: &Shared, v: &Viewer) -> Result<Vec<model::Earning>, String> {
    tokio::task::block_in_place(|| catch_up_earnings(shared).map(|ix| ix.rows(v)))
}

#[derive(Deserialize, Default)]
struct PageQuery {
    #[serde(default)]
    page: usize,
}

async fn earnings_page(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Response {
    let c = match page_viewer(&shared, &headers) {
        Ok(c) => c,
        Err(r) => return *r,
    };
    let v = &c.v;
    let page_no = q.map(|Query(q)| q.page).unwrap_or(1);
    match earnings_for(&shared, v) {
        Ok(rows) => page(
            &headers,
            "Earnings",
            pages::Tab::Earnings,
            &c,
            pages::earnings(&rows, page_no),
        ),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Html(pages::error(&e))).into_response(),
    }
}

fn csv_response(text: String, file: &str) -> Response {
    let mut r = text.into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    r
}

async fn earnings_csv(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match earnings_for(&shared, &v) {
        Ok(rows) => csv_response(model::earnings_csv(&rows), "weft-earnings.csv"),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

fn asset(body: &'static str, ty: &'static str) -> Response {
    let mut r = body.into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ty));
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=300"),
    );
    r
}

async fn css() -> Response {
    asset(pages::CSS, "text/css; charset=utf-8")
}

async fn js() -> Response {
    asset(pages::JS, "text/javascript; charset=utf-8")
}

// ---- /api/v1 ----

async fn api_summary(State(shared): State<Arc<Shared>>) -> Response {
    Json(model::summary(&inputs(&shared))).into_response()
}

/// `?offset=N&limit=M` of a list (`limit` at most [`MAX_LIMIT`], [`DEFAULT_LIMIT`] when absent).
#[derive(Deserialize)]
struct Window {
    #[serde(default)]
    offset: usize,
    #[serde(default)]
    limit: Option<usize>,
}

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

/// `GET /api/v1/nodes?offset=&limit=`: a page of the nodes the viewer may see, sorted by name;
/// `X-Total-Count` says how many there are.
async fn api_nodes(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    w: Result<Query<Window>, QueryRejection>,
) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Ok(Query(w)) = w else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "query must be `offset=N&limit=M` (numbers)",
        );
    };
    let all = model::nodes(&inputs(&shared), &v);
    let total = all.len();
    let limit = w.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT);
    let page: Vec<_> = all.into_iter().skip(w.offset).take(limit).collect();
    let mut r = Json(page).into_response();
    r.headers_mut()
        .insert("x-total-count", HeaderValue::from(total));
    r
}

async fn api_node(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    match model::nodes(&inputs(&shared), &v)
        .into_iter()
        .find(|n| n.name == name)
    {
        Some(n) => {
            let history = history_of(&shared, &n, unix_ms());
            Json(NodeDetail { node: n, history }).into_response()
        }
        None => api_error(StatusCode::NOT_FOUND, "no such node"),
    }
}

/// `GET /api/v1/nodes/NAME`: the node and each GPU's last hour (one point a minute).
#[derive(serde::Serialize)]
struct NodeDetail {
    #[serde(flatten)]
    node: model::NodeView,
    history: std::collections::BTreeMap<String, Vec<crate::telemetry::Point>>,
}

/// `GET /api/v1/clusters`: the Ray clusters among the caller's jobs (an operator's: all).
async fn api_clusters(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match api_viewer(&shared, &headers) {
        Ok(v) => Json(model::clusters(&inputs(&shared), &v)).into_response(),
        Err(r) => *r,
    }
}

/// `GET /api/v1/paths`: node pairs with a WireGuard session, direct or relayed.
async fn api_paths(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match api_viewer(&shared, &headers) {
        Ok(v) => Json(model::paths(&inputs(&shared), &v)).into_response(),
        Err(r) => *r,
    }
}

async fn api_jobs(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    match api_viewer(&shared, &headers) {
        Ok(v) => Json(model::jobs(&inputs(&shared), &v)).into_response(),
        Err(r) => *r,
    }
}

async fn api_job(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    // Another engineer's job is not found, as one that does not exist.
    match model::jobs(&inputs(&shared), &v)
        .into_iter()
        .find(|j| j.id == id)
    {
        Some(j) => Json(j).into_response(),
        None => api_error(StatusCode::NOT_FOUND, "no such job"),
    }
}

#[derive(Deserialize)]
struct Since {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    format: Option<String>,
}

async fn api_usage(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<Query<Since>, QueryRejection>,
) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = q else {
        return api_error(StatusCode::BAD_REQUEST, "query must be `since=UNIX_MS`");
    };
    match shared.pool.usage_records(q.since) {
        Ok(rs) => Json(
            rs.into_iter()
                .filter(|r| model::sees_usage(&v, r))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn api_export(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<Query<Since>, QueryRejection>,
) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let Ok(Query(q)) = q else {
        return api_error(StatusCode::BAD_REQUEST, "query must be `since=UNIX_MS`");
    };
    if v.role == Role::Provider {
        return api_error(
            StatusCode::FORBIDDEN,
            "the signed export is an operator's (all records) or an engineer's (its own); a \
             provider's earnings are at /api/v1/earnings",
        );
    }
    match shared
        .pool
        .export(v.role == Role::Operator, &v.name, q.since)
    {
        Ok(e) => Json(e).into_response(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

async fn api_earnings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    q: Result<Query<Since>, QueryRejection>,
) -> Response {
    let v = match api_viewer(&shared, &headers) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let csv = q.ok().and_then(|Query(q)| q.format).as_deref() == Some("csv");
    match earnings_for(&shared, &v) {
        Ok(rows) if csv => csv_response(model::earnings_csv(&rows), "weft-earnings.csv"),
        Ok(rows) => Json(rows).into_response(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e),
    }
}

#[cfg(test)]
mod tests {
    /// docs/api.md names every `/api/v1` route the router serves, and no other.
    #[test]
    fn the_api_reference_lists_every_route() {
        let code = include_str!("web.rs");
        let docs = include_str!("../../../docs/api.md");
        let routes: Vec<&str> = code
            .split(".route(\"")
            .skip(1)
            .filter_map(|r| r.split('"').next())
            .filter(|r| r.starts_with("/api/v1/"))
            .collect();
        assert!(routes.len() >= 10, "{routes:?}");
        for r in &routes {
            // `{name}` in the router is `NAME` (or `ID`) in the reference.
            let shown = r.replace("{name}", "NAME").replace("{id}", "ID");
            assert!(
                docs.contains(&format!("`GET {shown}")),
                "docs/api.md does not describe {r}"
            );
        }
        for line in docs.lines().filter(|l| l.starts_with("| `GET /api/v1/")) {
            let path = line
                .trim_start_matches("| `GET ")
                .split(['`', '?', '['])
                .next()
                .unwrap_or_default()
                .replace("NAME", "{name}")
                .replace("ID", "{id}");
            assert!(
                routes.contains(&path.as_str()),
                "docs/api.md lists {path}, which is not served"
            );
        }
    }
}
