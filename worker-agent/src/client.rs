//! A small HTTP/1.1 client for the agent API (CLI and tests), over any byte stream: a loopback
//! TCP connection (`http://127.0.0.1:PORT`, the provider's own CLI) or a tunnel stream to a
//! worker's `agent` service through the relay (the engineer's CLI, with the identity of
//! `tunnel-relay login`), or a TCP connection over the mesh to the worker's overlay address
//! (the engineer's CLI on a machine running `mesh up`). No TLS: the relay path is encrypted by
//! QUIC, the mesh path by WireGuard, the local one never leaves the host.

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};

use crate::relay::AGENT_SERVICE;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("API URL {0:?} must look like http://127.0.0.1:PORT")]
    BadUrl(String),
    #[error("cannot reach the agent API at {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("malformed HTTP response from the agent at {addr}: {msg}")]
    Protocol { addr: String, msg: String },
    #[error("worker {worker:?} through the relay (identity {}): {source}", state_dir.display())]
    Relay {
        worker: String,
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
}

impl Endpoint {
    fn label(&self) -> String {
        match self {
            Endpoint::Local(b) => b.clone(),
            Endpoint::Relay { worker, .. } => format!("{worker}/{AGENT_SERVICE}"),
            Endpoint::Mesh { worker } => mesh_host(worker),
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

/// Sends one request on `stream`. A 2xx answer's body is written to `sink` as it arrives
/// (chunked or not); any other answer's body is returned instead, for the error message.
/// `addr` names the far end in errors.
pub async fn request_on<S>(
    stream: S,
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let io = |source| ClientError::Io {
        addr: addr.to_string(),
        source,
    };
    let proto = |msg: String| ClientError::Protocol {
        addr: addr.to_string(),
        msg,
    };
    let mut s = BufReader::new(stream);
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.get_mut().write_all(req.as_bytes()).await.map_err(io)?;
    s.get_mut().flush().await.map_err(io)?;
    let mut line = String::new();
    s.read_line(&mut line).await.map_err(io)?;
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| proto(format!("status line {line:?}")))?;
    let mut chunked = false;
    let mut len: Option<usize> = None;
    loop {
        line.clear();
        if s.read_line(&mut line).await.map_err(io)? == 0 {
            return Err(proto("connection closed inside the headers".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                len = Some(
                    v.parse()
                        .map_err(|_| proto(format!("content-length {v:?}")))?,
                );
            }
        }
    }
    let mut failed = Vec::new();
    let sink: &mut dyn Write = if (200..300).contains(&code) {
        sink
    } else {
        &mut failed
    };
    let out = |sink: &mut dyn Write, b: &[u8]| {
        sink.write_all(b).and_then(|()| sink.flush()).map_err(|e| {
            proto(format!(
                "cannot write the response to the output ({e}); {} bytes lost",
                b.len()
            ))
        })
    };
    if chunked {
        loop {
            line.clear();
            s.read_line(&mut line).await.map_err(io)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| proto(format!("chunk size {line:?}")))?;
            if size == 0 {
                break;
            }
            let mut buf = vec![0u8; size];
            s.read_exact(&mut buf).await.map_err(io)?;
            out(sink, &buf)?;
            let mut crlf = [0u8; 2];
            s.read_exact(&mut crlf).await.map_err(io)?;
        }
    } else if let Some(n) = len {
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf).await.map_err(io)?;
        out(sink, &buf)?;
    } else {
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.map_err(io)?;
        out(sink, &buf)?;
    }
    Ok((code, failed))
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
    let server = SocketAddr::from((mesh::managed_node::DNS_V4, 53));
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
    method: &str,
    path: &str,
    body: Option<&str>,
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
            request_on(tcp, &host, method, path, body, sink).await
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
            request_on(tcp, &label, method, path, body, sink).await
        }
        Endpoint::Relay { state_dir, worker } => {
            let relay_err = |source| ClientError::Relay {
                worker: worker.clone(),
                state_dir: state_dir.clone(),
                source,
            };
            let session = tunnel_relay::client::session(state_dir)
                .await
                .map_err(relay_err)?;
            let res = match session.open(worker, AGENT_SERVICE).await {
                Ok((send, recv)) => {
                    request_on(
                        tokio::io::join(recv, send),
                        &endpoint.label(),
                        method,
                        path,
                        body,
                        sink,
                    )
                    .await
                }
                Err(e) => Err(relay_err(e)),
            };
            session.close().await;
            res
        }
    }
}

/// [`call_async`] on a private current-thread runtime (not from inside a runtime).
pub fn call(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<&str>,
    sink: &mut dyn Write,
) -> Result<(u16, Vec<u8>), ClientError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(call_async(endpoint, method, path, body, sink))
}

/// Blocking: one request to the local API at `base`; the response body is written to `sink` as
/// it arrives. Returns the status code.
pub fn request_to(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    sink: &mut dyn Write,
) -> Result<u16, ClientError> {
    let (code, failed) = call(&Endpoint::Local(base.to_string()), method, path, body, sink)?;
    sink.write_all(&failed).map_err(|source| ClientError::Io {
        addr: base.to_string(),
        source,
    })?;
    Ok(code)
}

/// Blocking: one request to the local API at `base`, whole body returned.
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>), ClientError> {
    let mut out = Vec::new();
    let code = request_to(base, method, path, body, &mut out)?;
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

    /// Runs `request_on` against a canned response; returns (code, error body, sink, request).
    async fn exchange(response: &'static [u8]) -> (u16, Vec<u8>, Vec<u8>, String) {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            let n = server.read(&mut req).await.unwrap();
            server.write_all(response).await.unwrap();
            server.shutdown().await.unwrap();
            String::from_utf8(req[..n].to_vec()).unwrap()
        });
        let mut sink = Vec::new();
        let (code, failed) = request_on(
            client,
            "w1/agent",
            "POST",
            "/v1/jobs",
            Some("{}"),
            &mut sink,
        )
        .await
        .unwrap();
        (code, failed, sink, srv.await.unwrap())
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
            req.starts_with("POST /v1/jobs HTTP/1.1\r\nHost: w1/agent\r\n")
                && req.contains("Content-Length: 2\r\n")
                && req.ends_with("\r\n\r\n{}"),
            "{req:?}"
        );
        let (code, _, sink, _) =
            exchange(b"HTTP/1.1 201 Created\r\ncontent-length: 5\r\n\r\nhello").await;
        assert_eq!((code, sink), (201, b"hello".to_vec()));
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
    async fn a_truncated_answer_is_an_error() {
        let (client, mut server) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let mut req = vec![0u8; 4096];
            let _ = server.read(&mut req).await;
            let _ = server.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
        });
        let err = request_on(client, "w1/agent", "GET", "/v1/jobs", None, &mut Vec::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("w1/agent"), "{err}");
    }
}
