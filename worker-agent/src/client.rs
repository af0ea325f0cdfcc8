//! The HTTP/1.1 client of the agent API (CLI and tests; hyper's client connection, bodies
//! bounded or streamed, see [`BodyLimit`]), over any byte stream: a loopback
//! TCP connection (`http://127.0.0.1:PORT`, the provider's own CLI) or a tunnel stream to a
//! worker's `agent` service through the relay (the engineer's CLI, with the identity of
//! `tunnel-relay login`), or a TCP connection over the mesh to the worker's overlay address
//! (the engineer's CLI on a machine running `mesh up`); and the relay's own pool API on a
//! `Message::Api` stream ([`Endpoint::Pool`], the same HTTP/1.1 client). No TLS: the relay path
//! is encrypted by QUIC, the mesh path by WireGuard, the local one never leaves the host.

use std::future::poll_fn;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::{pin, Pin};

use hyper::body::{Body, Incoming};
use hyper::header::{CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::relay::AGENT_SERVICE;

/// The most a JSON answer (job, job list, status) may be: more is refused, not buffered.
pub const MAX_BODY: usize = 16 << 20;
/// The most an error answer's body may be (it is read whole for the message).
pub const MAX_ERROR_BODY: usize = 1 << 20;

/// How much of a 2xx answer's body may arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLimit {
    /// Streamed to the sink as it arrives, however long (logs, `logs --follow`).
    Stream,
    /// At most this many bytes, for answers read into memory; more is [`ClientError::TooLarge`].
    Max(usize),
}

/// One request to the agent API: what to ask, and how much of a 2xx answer may come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// A JSON body (a POST always says its `Content-Length`, 0 without one).
    pub body: Option<&'a str>,
    pub limit: BodyLimit,
}

impl<'a> Call<'a> {
    /// A request whose answer is read into memory: at most [`MAX_BODY`].
    pub fn new(method: &'a str, path: &'a str, body: Option<&'a str>) -> Self {
        Call {
            method,
            path,
            body,
            limit: BodyLimit::Max(MAX_BODY),
        }
    }

    /// A `GET` whose answer is read into memory: at most [`MAX_BODY`].
    pub fn get(path: &'a str) -> Self {
        Call::new("GET", path, None)
    }

    /// The same request with its answer streamed, however long (logs).
    pub fn streamed(self) -> Self {
        Call {
            limit: BodyLimit::Stream,
            ..self
        }
    }
}

/// A byte count for messages: `16 MiB`, `64 KiB`, `10 bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub usize);

impl std::fmt::Display for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{} MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{} KiB", n >> 10),
            n => write!(f, "{n} bytes"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("API URL {0:?} must look like http://127.0.0.1:PORT")]
    BadUrl(String),
    #[error("cannot reach the agent API at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    /// `peer` names the far end: `the agent at gpu1/agent`, `the pool (relay)`.
    #[error("cannot make the request to {peer}: {msg}")]
    Protocol { peer: String, msg: String },
    #[error("HTTP exchange with {peer} failed: {source}")]
    Http { peer: String, source: hyper::Error },
    #[error("{peer} sent a response body over the {limit} limit")]
    TooLarge { peer: String, limit: Bytes },
    #[error("cannot write the response to the output: {0}")]
    Sink(std::io::Error),
    #[error("worker {worker:?} through the relay (identity {}): {source}", state_dir.display())]
    Relay {
        worker: String,
        state_dir: PathBuf,
        source: tunnel_relay::ClientError,
    },
    #[error("the pool (relay) as the identity in {}: {source}", state_dir.display())]
    PoolRelay {
        state_dir: PathBuf,
        source: tunnel_relay::ClientError,
    },
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(
        "cannot resolve {name} over the mesh: {msg} (is `mesh up` running on this machine, \
         and is the worker on the mesh? `worker-agent status` on the worker shows it)"
    )]
    Resolve { name: String, msg: String },
}

impl ClientError {
    /// For `map_err`: the relay failed us on the way to `worker` as the identity in `state_dir`.
    pub(crate) fn relay<'a>(
        worker: &'a str,
        state_dir: &'a Path,
    ) -> impl FnOnce(tunnel_relay::ClientError) -> Self + 'a {
        move |source| ClientError::Relay {
            worker: worker.to_string(),
            state_dir: state_dir.to_path_buf(),
            source,
        }
    }

    /// For `map_err`: the relay failed us on the way to its pool API as the identity in `state_dir`.
    pub(crate) fn pool_relay(
        state_dir: &Path,
    ) -> impl FnOnce(tunnel_relay::ClientError) -> Self + '_ {
        move |source| ClientError::PoolRelay {
            state_dir: state_dir.to_path_buf(),
            source,
        }
    }
}

/// How errors name the pool API.
pub const POOL_LABEL: &str = "the pool (relay)";
/// The `Host` the pool API requests carry (the relay serves them on the stream itself).
pub const POOL_HOST: &str = "pool";

/// Where the API is.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The local agent: `http://127.0.0.1:PORT`.
    Local(String),
    /// A worker's `agent` service through the relay, as the engineer whose identity
    /// (`tunnel-relay login`) is in `state_dir`.
    Relay { state_dir: PathBuf, worker: String },
    /// A worker's jobs API over the mesh (`http://NAME.weft.internal:7070`), from a machine
    /// running `mesh up`: the worker sees the request come from this node's overlay address and
    /// records this node's mesh name as the caller. `worker` is a mesh name, a full name under
    /// the mesh domain, or an overlay IP.
    Mesh { worker: String },
    /// The relay's pool API (`weft_proto::pool`), as the engineer (or operator) whose identity
    /// (`weft login`) is in `state_dir`: one relay session, a `Message::Api` stream
    /// ([`tunnel_relay::Session::open_api`]), then HTTP/1.1 as for an agent.
    Pool { state_dir: PathBuf },
}

impl Endpoint {
    fn label(&self) -> String {
        match self {
            Endpoint::Local(b) => b.clone(),
            Endpoint::Relay { worker, .. } => format!("{worker}/{AGENT_SERVICE}"),
            Endpoint::Mesh { worker } => mesh_host(worker),
            Endpoint::Pool { .. } => POOL_LABEL.to_string(),
        }
    }
}

fn host_of(base: &str) -> Result<String, ClientError> {
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::BadUrl(base.into()))?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(ClientError::BadUrl(base.into()));
    }
    Ok(host.to_string())
}

/// Sends one HTTP/1.1 request on `stream` (hyper's client connection; `Connection: close`).
/// A 2xx answer's body is written to `sink` as it arrives, within the call's limit; any other
/// answer's body (at most [`MAX_ERROR_BODY`]) is returned instead, for the error message.
/// `addr` is sent as `Host`, and errors name the far end `the agent at ADDR`.
pub async fn request_on<S>(
    stream: S,
    addr: &str,
    call: Call<'_>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    request_as(stream, addr, &format!("the agent at {addr}"), call, sink).await
}

/// [`request_on`] with the `Host` and the name errors give the far end (`peer`) apart:
/// `request_as(stream, POOL_HOST, POOL_LABEL, ..)` for the pool API.
pub async fn request_as<S>(
    stream: S,
    host: &str,
    peer: &str,
    call: Call<'_>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Call {
        method,
        path,
        body,
        limit,
    } = call;
    let http = |source| ClientError::Http {
        peer: peer.to_string(),
        source,
    };
    let proto = |msg: String| ClientError::Protocol {
        peer: peer.to_string(),
        msg,
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|e| proto(format!("method {method:?}: {e}")))?;
    let body = body.unwrap_or("").to_string();
    let mut req = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(HOST, host)
        .header(CONNECTION, "close");
    if !body.is_empty() || method == Method::POST {
        req = req
            .header(CONTENT_TYPE, "application/json")
            .header(CONTENT_LENGTH, body.len());
    }
    let req = req
        .body(body)
        .map_err(|e| proto(format!("{path:?}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .title_case_headers(true)
        .handshake::<_, String>(TokioIo::new(stream))
        .await
        .map_err(http)?;
    let mut conn = pin!(conn);
    let mut exchange = pin!(async {
        let resp = sender.send_request(req).await.map_err(http)?;
        let code = resp.status().as_u16();
        let mut failed = Vec::new();
        let body = resp.into_body();
        if resp_ok(code) {
            read_body(body, limit, peer, &mut |b| {
                sink.write_all(b)
                    .and_then(|()| sink.flush())
                    .map_err(ClientError::Sink)
            })
            .await?;
        } else {
            read_body(body, BodyLimit::Max(MAX_ERROR_BODY), peer, &mut |b| {
                failed.extend_from_slice(b);
                Ok(())
            })
            .await?;
        }
        Ok::<_, ClientError>((code, failed))
    });
    // The connection must be polled for the exchange to make progress; it may finish first
    // (the answer is complete), and then the rest of the body is already on its way.
    tokio::select! {
        r = exchange.as_mut() => r,
        c = conn.as_mut() => match c {
            Ok(()) => exchange.await,
            Err(e) => Err(http(e)),
        },
    }
}

fn resp_ok(code: u16) -> bool {
    (200..300).contains(&code)
}

/// Hands each data frame of `body` to `out` as hyper delivers it (hyper reads into its own
/// bounded buffer: no allocation is sized by what the peer announces), within `limit`.
async fn read_body(
    mut body: Incoming,
    limit: BodyLimit,
    peer: &str,
    out: &mut dyn FnMut(&[u8]) -> Result<(), ClientError>,
) -> Result<(), ClientError> {
    let too_large = |max| ClientError::TooLarge {
        peer: peer.to_string(),
        limit: Bytes(max),
    };
    if let BodyLimit::Max(max) = limit {
        // a Content-Length over the limit is refused before reading any of it
        if body.size_hint().lower() > max as u64 {
            return Err(too_large(max));
        }
    }
    let mut got = 0usize;
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|source| ClientError::Http {
            peer: peer.to_string(),
            source,
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        got = got.saturating_add(data.len());
        if let BodyLimit::Max(max) = limit {
            if got > max {
                return Err(too_large(max));
            }
        }
        out(&data)?;
    }
    Ok(())
}

/// The MagicDNS domain of the mesh.
pub const MESH_DOMAIN: &str = mesh::dns::DEFAULT_DOMAIN;

/// `NAME.weft.internal:7070` (or `IP:7070`, `[IPv6]:7070`) for a worker given by mesh name,
/// full name or overlay IP.
pub fn mesh_host(worker: &str) -> String {
    let port = crate::overlay::AGENT_API_PORT;
    match worker.parse::<IpAddr>() {
        Ok(ip) => SocketAddr::new(ip, port).to_string(),
        Err(_) => format!("{}:{port}", mesh_fqdn(worker)),
    }
}

fn mesh_fqdn(worker: &str) -> String {
    let w = worker.trim_end_matches('.');
    if w.contains('.') {
        w.to_string()
    } else {
        format!("{w}.{MESH_DOMAIN}")
    }
}

/// Where the worker's jobs API is on the overlay: an IP as given; a name through the local
/// node's MagicDNS (100.64.0.1, authoritative for the mesh domain, present wherever `mesh up`
/// runs), then through the system resolver (for a machine whose resolver forwards to it).
pub async fn resolve_mesh(worker: &str) -> Result<SocketAddr, ClientError> {
    let port = crate::overlay::AGENT_API_PORT;
    if let Ok(ip) = worker.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let name = mesh_fqdn(worker);
    let magic = match magic_dns_a(&name).await {
        Ok(ip) => return Ok(SocketAddr::new(IpAddr::V4(ip), port)),
        Err(e) => e,
    };
    let system = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        tokio::net::lookup_host((name.clone(), port)),
    )
    .await;
    match system {
        Ok(Ok(mut addrs)) => addrs.next().ok_or_else(|| ClientError::Resolve {
            name: name.clone(),
            msg: format!("{magic}; the system resolver has no address for it"),
        }),
        Ok(Err(e)) => Err(ClientError::Resolve {
            name,
            msg: format!("{magic}; system resolver: {e}"),
        }),
        Err(_) => Err(ClientError::Resolve {
            name,
            msg: format!("{magic}; system resolver: timed out"),
        }),
    }
}

/// One A query to the local MagicDNS.
async fn magic_dns_a(name: &str) -> Result<Ipv4Addr, String> {
    use hickory_server::proto::op::{Message, Query, ResponseCode};
    use hickory_server::proto::rr::{Name, RData, RecordType};
    let server = SocketAddr::from((weft_proto::peermap::OverlayPools::default().dns_v4(), 53));
    let qname = Name::from_ascii(name).map_err(|e| format!("bad name: {e}"))?;
    let mut q = Message::query();
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(qname, RecordType::A));
    let bytes = q.to_vec().map_err(|e| format!("encoding the query: {e}"))?;
    let sock = tokio::net::UdpSocket::bind("0.0.0.0:0")
        .await
        .map_err(|e| format!("UDP socket: {e}"))?;
    let mut buf = vec![0u8; 4096];
    let answer = async {
        sock.send_to(&bytes, server).await?;
        loop {
            let (n, from) = sock.recv_from(&mut buf).await?;
            if from == server {
                return Ok::<_, std::io::Error>(n);
            }
        }
    };
    let n = tokio::time::timeout(std::time::Duration::from_secs(2), answer)
        .await
        .map_err(|_| format!("MagicDNS at {server} did not answer"))?
        .map_err(|e| format!("MagicDNS at {server}: {e}"))?;
    let m = Message::from_vec(&buf[..n]).map_err(|e| format!("MagicDNS answer: {e}"))?;
    if m.metadata.id != q.metadata.id {
        return Err(format!("MagicDNS at {server} answered another query"));
    }
    if m.metadata.response_code != ResponseCode::NoError {
        return Err(format!(
            "MagicDNS at {server} answered {}",
            m.metadata.response_code
        ));
    }
    m.answers
        .iter()
        .find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .ok_or_else(|| format!("MagicDNS at {server} has no address for it"))
}

/// One request to `endpoint` (async): opens a connection (or a relay session and a tunnel
/// stream), sends the request, streams a 2xx body to `sink`, closes. Returns the status code
/// and the body of a non-2xx answer.
pub async fn call_async(
    endpoint: &Endpoint,
    call: Call<'_>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError> {
    match endpoint {
        Endpoint::Local(base) => {
            let host = host_of(base)?;
            let tcp = tokio::net::TcpStream::connect(&host)
                .await
                .map_err(|source| ClientError::Io {
                    addr: host.clone(),
                    source,
                })?;
            request_on(tcp, &host, call, sink).await
        }
        Endpoint::Mesh { worker } => {
            let addr = resolve_mesh(worker).await?;
            let label = endpoint.label();
            let tcp = tokio::net::TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Io {
                    addr: format!("{label} ({addr})"),
                    source,
                })?;
            request_on(tcp, &label, call, sink).await
        }
        Endpoint::Relay { state_dir, worker } => {
            let session = tunnel_relay::client::session(state_dir)
                .await
                .map_err(ClientError::relay(worker, state_dir))?;
            let res = call_on_session(&session, state_dir, worker, call, sink).await;
            session.close().await;
            res
        }
        Endpoint::Pool { state_dir } => {
            let session = tunnel_relay::client::session(state_dir)
                .await
                .map_err(ClientError::pool_relay(state_dir))?;
            let res = pool_call_on_session(&session, state_dir, call, sink).await;
            session.close().await;
            res
        }
    }
}

/// One request to the relay's pool API on an open relay session (which stays open: the same
/// session then reaches the workers' agents, e.g. for a pool job's logs). `state_dir` (the
/// session's identity) names it in errors.
pub async fn pool_call_on_session(
    session: &tunnel_relay::Session,
    state_dir: &Path,
    call: Call<'_>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError> {
    let (send, recv) = session
        .open_api()
        .await
        .map_err(ClientError::pool_relay(state_dir))?;
    request_as(
        tokio::io::join(recv, send),
        POOL_HOST,
        POOL_LABEL,
        call,
        sink,
    )
    .await
}

/// One request to `worker`'s `agent` service on an open relay session (which stays open: one
/// session serves many workers). `state_dir` (the session's identity) names it in errors.
pub async fn call_on_session(
    session: &tunnel_relay::Session,
    state_dir: &Path,
    worker: &str,
    call: Call<'_>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError> {
    let (send, recv) = session
        .open(worker, AGENT_SERVICE)
        .await
        .map_err(ClientError::relay(worker, state_dir))?;
    let label = format!("{worker}/{AGENT_SERVICE}");
    request_on(tokio::io::join(recv, send), &label, call, sink).await
}

/// [`call_async`] on a private current-thread runtime (not from inside a runtime).
pub fn call(
    endpoint: &Endpoint,
    call: Call<'_>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(call_async(endpoint, call, sink))
}

fn local(base: &str, req: Call<'_>, sink: &mut dyn Write) -> Result<u16, ClientError> {
    let (code, failed) = call(&Endpoint::Local(base.to_string()), req, sink)?;
    sink.write_all(&failed).map_err(ClientError::Sink)?;
    Ok(code)
}

/// Blocking: one request to the local API at `base`; the response body is streamed to `sink`
/// as it arrives, however long. Returns the status code.
pub fn request_to(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    sink: &mut dyn Write,
) -> Result<u16, ClientError> {
    local(base, Call::new(method, path, body).streamed(), sink)
}

/// Blocking: one request to the local API at `base`, whole body (at most [`MAX_BODY`])
/// returned.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let mut out = Vec::new();
    let code = local(base, Call::new(method, path, body), &mut out)?;
    Ok((code, out))
}

/// The engineer identity directory: `dir`, else `tunnel-relay login`'s default.
pub fn engineer_dir(dir: Option<&Path>) -> Result<PathBuf, tunnel_relay::ClientError> {
    match dir {
        Some(d) => Ok(d.to_path_buf()),
        None => tunnel_relay::client::default_state_dir(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads one request (head, then as many body bytes as its Content-Length says).
    async fn read_request(s: &mut tokio::io::DuplexStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some((head, rest)) = text.split_once("\r\n\r\n") {
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |n| n.trim().parse().unwrap());
                if rest.len() >= len {
                    return text;
                }
            }
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                return String::from_utf8_lossy(&buf).into_owned();
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Runs `request_on` with `call` against a canned response: (result, sink, request).
    async fn exchange_with(
        response: &'static [u8],
        call: Call<'_>,
    ) -> (Result<(u16, Vec<u8>), ClientError>, Vec<u8>, String) {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            let req = read_request(&mut server).await;
            server.write_all(response).await.unwrap();
            server.shutdown().await.unwrap();
            req
        });
        let mut sink = Vec::new();
        let res = request_on(client, "w1/agent", call, &mut sink).await;
        (res, sink, srv.await.unwrap())
    }

    /// (result, sink) of a GET of `/v1/jobs` with `limit`.
    async fn get(
        response: &'static [u8],
        limit: BodyLimit,
    ) -> (Result<(u16, Vec<u8>), ClientError>, Vec<u8>) {
        let call = Call {
            limit,
            ..Call::get("/v1/jobs")
        };
        let (res, sink, _) = exchange_with(response, call).await;
        (res, sink)
    }

    /// (code, error body, sink, request) of a POST `{}` with a 16 MiB limit.
    async fn exchange(response: &'static [u8]) -> (u16, Vec<u8>, Vec<u8>, String) {
        let (res, sink, req) =
            exchange_with(response, Call::new("POST", "/v1/jobs", Some("{}"))).await;
        let (code, failed) = res.unwrap();
        (code, failed, sink, req)
    }

    #[tokio::test]
    async fn chunked_and_sized_bodies_reach_the_sink() {
        let (code, failed, sink, req) = exchange(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabc\n\r\n3\r\ndef\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(
            (code, failed, sink),
            (200, Vec::new(), b"abc\ndef".to_vec())
        );
        assert!(
            req.starts_with("POST /v1/jobs HTTP/1.1\r\n")
                && req.contains("\r\nHost: w1/agent\r\n")
                && req.contains("\r\nConnection: close\r\n")
                && req.contains("\r\nContent-Type: application/json\r\n")
                && req.contains("\r\nContent-Length: 2\r\n")
                && req.ends_with("\r\n\r\n{}"),
            "{req:?}"
        );
        let (code, _, sink, _) =
            exchange(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello").await;
        assert_eq!((code, sink), (201, b"hello".to_vec()));
        // no length, no chunking: the body runs to the end of the stream
        let (code, _, sink, _) = exchange(b"HTTP/1.1 200 OK\r\n\r\nuntil-eof").await;
        assert_eq!((code, sink), (200, b"until-eof".to_vec()));
    }

    #[tokio::test]
    async fn a_post_without_a_body_says_content_length_0() {
        const EMPTY_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        let (res, _, req) = exchange_with(EMPTY_OK, Call::new("POST", "/v1/jobs", None)).await;
        assert_eq!(res.unwrap().0, 200);
        assert!(req.contains("\r\nContent-Length: 0\r\n"), "{req:?}");
        let (_, _, req) = exchange_with(EMPTY_OK, Call::get("/v1/jobs")).await;
        assert!(
            req.starts_with("GET /v1/jobs HTTP/1.1\r\n") && !req.contains("Content-Length"),
            "{req:?}"
        );
    }

    #[tokio::test]
    async fn an_error_body_is_returned_not_written() {
        let (code, failed, sink, _) =
            exchange(b"HTTP/1.1 404 Not Found\r\ncontent-length: 13\r\n\r\n{\"error\":\"x\"}")
                .await;
        assert_eq!(code, 404);
        assert_eq!(failed, b"{\"error\":\"x\"}");
        assert!(sink.is_empty());
    }

    #[tokio::test]
    async fn a_content_length_over_the_limit_is_refused_before_reading() {
        let (res, sink) = get(
            b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999\r\n\r\nabc",
            BodyLimit::Max(MAX_BODY),
        )
        .await;
        let err = res.unwrap_err();
        assert!(matches!(err, ClientError::TooLarge { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the agent at w1/agent sent a response body over the 16 MiB limit"
        );
        assert!(sink.is_empty());
        // the same for an error answer
        let (res, _) = get(
            b"HTTP/1.1 500 Oops\r\ncontent-length: 99999999999999\r\n\r\nabc",
            BodyLimit::Stream,
        )
        .await;
        assert!(
            res.unwrap_err()
                .to_string()
                .contains("over the 1 MiB limit"),
            "error bodies are bounded too"
        );
    }

    #[tokio::test]
    async fn a_chunked_body_over_the_limit_is_refused() {
        let (res, _) = get(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nabcdef\r\n6\r\nghijkl\r\n0\r\n\r\n",
            BodyLimit::Max(10),
        )
        .await;
        let err = res.unwrap_err();
        assert!(err.to_string().contains("over the 10 bytes limit"), "{err}");
    }

    #[tokio::test]
    async fn a_huge_announced_chunk_allocates_nothing_and_streams_what_came() {
        // the old parser did `vec![0; size]` with this size (256 TiB)
        let (res, sink) = get(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffff\r\nabc",
            BodyLimit::Stream,
        )
        .await;
        let err = res.unwrap_err();
        assert!(matches!(err, ClientError::Http { .. }), "{err:?}");
        assert!(err.to_string().contains("w1/agent"), "{err}");
        assert_eq!(sink, b"abc");
    }

    /// A streamed GET of `response` fails, with an error that names the agent.
    async fn assert_fails_naming_the_agent(response: &'static [u8]) {
        let (res, _) = get(response, BodyLimit::Stream).await;
        let err = res.unwrap_err();
        assert!(err.to_string().contains("w1/agent"), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_an_error_not_a_panic() {
        for resp in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"[..],
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"\x00\xff\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            b"",
        ] {
            assert_fails_naming_the_agent(resp).await;
        }
    }

    #[test]
    fn byte_counts_read_well() {
        assert_eq!(Bytes(MAX_BODY).to_string(), "16 MiB");
        assert_eq!(Bytes(64 << 10).to_string(), "64 KiB");
        assert_eq!(Bytes(10).to_string(), "10 bytes");
    }

    #[test]
    fn mesh_hosts_from_names_and_ips() {
        assert_eq!(mesh_host("gpu1"), "gpu1.weft.internal:7070");
        assert_eq!(mesh_host("gpu1.weft.internal."), "gpu1.weft.internal:7070");
        assert_eq!(mesh_host("100.64.0.5"), "100.64.0.5:7070");
        assert_eq!(
            mesh_host("fd7a:7765:6674::6440:5"),
            "[fd7a:7765:6674::6440:5]:7070"
        );
    }

    #[tokio::test]
    async fn pool_requests_say_host_pool_and_errors_name_the_pool() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            let req = read_request(&mut server).await;
            server
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\ntrunc")
                .await
                .unwrap();
            server.shutdown().await.unwrap();
            req
        });
        let mut sink = Vec::new();
        let err = request_as(
            client,
            POOL_HOST,
            POOL_LABEL,
            Call::get("/v1/pool"),
            &mut sink,
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("HTTP exchange with the pool (relay) failed"),
            "{err}"
        );
        let req = srv.await.unwrap();
        assert!(
            req.starts_with("GET /v1/pool HTTP/1.1\r\n") && req.contains("\r\nHost: pool\r\n"),
            "{req:?}"
        );
    }

    #[tokio::test]
    async fn a_truncated_answer_is_an_error() {
        assert_fails_naming_the_agent(b"HTTP/1.1 200 OK\r\ncontent-le").await;
    }
}
