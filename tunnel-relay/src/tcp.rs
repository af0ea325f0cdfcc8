//! The TCP/TLS fallback's setup, both ends: TLS 1.3 (the relay's QUIC
//! certificate, ALPN `http/1.1`), then HTTP/1.1. The relay answers `GET /`
//! like a web server, `GET /weft/probe` with `204` (latency probes), and
//! `GET /weft/v1` with `Upgrade: weft/1` by `101 Switching Protocols`, after
//! which the connection is [`crate::mux`]'s framing. Clients reach the relay
//! directly or through an `HTTPS_PROXY` (`CONNECT`). The client speaks first
//! after the switch, so the relay reads and checks its first frame header
//! before it starts the multiplexer: bytes that are not Weft's framing are
//! refused here, with their own cause ([`Refused::Framing`]).
//!
//! The Noise admission that follows binds to this TLS session's exporter, as
//! on QUIC ([`crate::noise`]), so a TLS-terminating middlebox cannot splice a
//! client's admission into its own connection.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use weft_proto::mux as wire;

use crate::error::ProtoError;
use crate::mux::{self, MuxConn, Side};
use crate::tls;
use crate::transport::EXPORTER_LABEL;

/// How long a client lets QUIC try alone before racing TCP/TLS against it.
pub const HEAD_START: Duration = Duration::from_millis(250);
/// Largest HTTP head (request or response) either side reads.
pub const MAX_HEAD: usize = 8 * 1024;

/// Which transport a client uses: `WEFT_RELAY_TRANSPORT=quic|tcp|auto` (default `auto`: race).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// QUIC only.
    Quic,
    /// TCP/TLS only.
    Tcp,
    /// QUIC first, TCP/TLS after [`HEAD_START`].
    Auto,
}

impl Choice {
    /// From `WEFT_RELAY_TRANSPORT`; an unknown value is an error naming it.
    pub fn from_env() -> Result<Choice, String> {
        match std::env::var("WEFT_RELAY_TRANSPORT") {
            Err(_) => Ok(Choice::Auto),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "auto" => Ok(Choice::Auto),
                "quic" | "udp" => Ok(Choice::Quic),
                "tcp" | "tls" => Ok(Choice::Tcp),
                other => Err(format!(
                    "WEFT_RELAY_TRANSPORT={other:?}: expected quic, tcp or auto"
                )),
            },
        }
    }
}

fn tcp_err(what: &str, e: impl std::fmt::Display) -> ProtoError {
    ProtoError::Tcp(format!("{what}: {e}"))
}

/// Reads an HTTP head (through the blank line) one byte at a time, so not a
/// byte of what follows is consumed; at most [`MAX_HEAD`] bytes.
async fn read_head<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, String> {
    let mut head = Vec::with_capacity(512);
    loop {
        let b = r.read_u8().await.map_err(|e| {
            if head.is_empty() {
                format!("closed before a head: {e}")
            } else {
                format!("head cut short after {} bytes: {e}", head.len())
            }
        })?;
        head.push(b);
        if head.ends_with(b"\r\n\r\n") {
            return Ok(head);
        }
        if head.len() >= MAX_HEAD {
            return Err(format!("head longer than {MAX_HEAD} bytes"));
        }
    }
}

/// The proxy for a TCP connection to `addr`, from `HTTPS_PROXY`/`https_proxy`
/// (`http://host:port`, `host:port`), unless `NO_PROXY`/`no_proxy` names the
/// address (exact IP, or `*`).
pub fn proxy_for(addr: SocketAddr) -> Option<String> {
    proxy_from(|k| std::env::var(k).ok(), addr)
}

fn proxy_from(env: impl Fn(&str) -> Option<String>, addr: SocketAddr) -> Option<String> {
    let get = |k: &str| env(k).filter(|v| !v.trim().is_empty());
    let proxy = get("HTTPS_PROXY").or_else(|| get("https_proxy"))?;
    if let Some(no) = get("NO_PROXY").or_else(|| get("no_proxy")) {
        let ip = addr.ip().to_string();
        if no
            .split(',')
            .map(str::trim)
            .any(|n| n == "*" || n == ip || n == addr.to_string())
        {
            return None;
        }
    }
    let p = proxy.trim();
    let p = p
        .strip_prefix("http://")
        .unwrap_or(p)
        .trim_end_matches('/')
        .to_string();
    Some(p)
}

/// TCP to `addr`, through the `HTTPS_PROXY` if one applies.
async fn dial(addr: SocketAddr) -> Result<TcpStream, ProtoError> {
    let Some(proxy) = proxy_for(addr) else {
        let s = TcpStream::connect(addr)
            .await
            .map_err(|e| tcp_err(&format!("connect {addr}"), e))?;
        let _ = s.set_nodelay(true);
        return Ok(s);
    };
    let mut s = TcpStream::connect(proxy.as_str())
        .await
        .map_err(|e| tcp_err(&format!("connect to proxy {proxy}"), e))?;
    let _ = s.set_nodelay(true);
    let req = format!("CONNECT {addr} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: weft\r\n\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| tcp_err(&format!("proxy {proxy}"), e))?;
    let head = read_head(&mut s)
        .await
        .map_err(|e| tcp_err(&format!("proxy {proxy}"), e))?;
    let status = status_of(&head).map_err(|e| tcp_err(&format!("proxy {proxy}"), e))?;
    if !(200..300).contains(&status) {
        return Err(tcp_err(
            &format!("proxy {proxy}"),
            format!("CONNECT {addr} answered {status}"),
        ));
    }
    Ok(s)
}

fn status_of(head: &[u8]) -> Result<u16, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(_)) => resp.code.ok_or_else(|| "no status".to_string()),
        Ok(httparse::Status::Partial) => Err("incomplete response head".into()),
        Err(e) => Err(format!("bad response head: {e}")),
    }
}

fn header<'a>(headers: &'a [httparse::Header<'a>], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case(name))
        .and_then(|h| std::str::from_utf8(h.value).ok())
}

fn tls_info<C>(conn: &rustls::ConnectionCommon<C>) -> Result<mux::TlsInfo, ProtoError> {
    let exporter = conn
        .export_keying_material([0u8; 32], EXPORTER_LABEL, Some(b""))
        .map_err(|_| ProtoError::Exporter)?;
    let peer_certs = conn
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
        .unwrap_or_default();
    Ok(mux::TlsInfo {
        exporter,
        peer_certs,
    })
}

/// TLS as the relay's client over `tcp` (from [`dial`] to `addr`).
async fn tls_to(
    addr: SocketAddr,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProtoError> {
    let config = tls::rustls_client(tls::TCP_ALPN).map_err(|e| tcp_err("tls config", e))?;
    let name = rustls::pki_types::ServerName::try_from(tls::SERVER_NAME)
        .map_err(|e| tcp_err("server name", e))?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| tcp_err(&format!("tls with {addr}"), e))
}

/// Client: TCP (or proxy), TLS, upgrade; the multiplexed connection.
pub async fn connect(addr: SocketAddr, opts: mux::Options) -> Result<MuxConn, ProtoError> {
    let mut stream = tls_to(addr, dial(addr).await?).await?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: {}\r\nUser-Agent: weft\r\n\r\n",
        wire::UPGRADE_PATH,
        tls::SERVER_NAME,
        wire::UPGRADE
    );
    stream
        .write_all(req.as_bytes())
        .await
        .map_err(|e| tcp_err("upgrade request", e))?;
    stream
        .flush()
        .await
        .map_err(|e| tcp_err("upgrade request", e))?;
    let head = read_head(&mut stream)
        .await
        .map_err(|e| tcp_err("upgrade answer", e))?;
    let status = status_of(&head).map_err(|e| tcp_err("upgrade answer", e))?;
    if status != 101 {
        return Err(tcp_err(
            "upgrade",
            format!("{addr} answered HTTP {status}, not 101 (not a Weft relay?)"),
        ));
    }
    let info = tls_info(stream.get_ref().1)?;
    Ok(mux::spawn(stream, Side::Client, addr, info, opts))
}

/// A latency probe over TCP/TLS, for relays STUN does not reach (a network
/// that blocks UDP): TCP (or the `HTTPS_PROXY`'s `CONNECT`), TLS, then
/// `GET /weft/probe`, answered `204`. Both the TCP handshake and the
/// request take one round trip; the faster counts (the handshake is the
/// kernel's, the request also waits for the relay). Through a proxy only the
/// request counts: the handshake is the proxy's.
pub async fn probe_rtt(addr: SocketAddr) -> Result<Duration, ProtoError> {
    let started = std::time::Instant::now();
    let tcp = dial(addr).await?;
    let handshake = proxy_for(addr).is_none().then(|| started.elapsed());
    let mut stream = tls_to(addr, tcp).await?;
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: weft\r\n\r\n",
        wire::PROBE_PATH,
        tls::SERVER_NAME,
    );
    let sent = std::time::Instant::now();
    stream
        .write_all(req.as_bytes())
        .await
        .and(stream.flush().await)
        .map_err(|e| tcp_err("probe request", e))?;
    let head = read_head(&mut stream)
        .await
        .map_err(|e| tcp_err("probe answer", e))?;
    let request = sent.elapsed();
    let status = status_of(&head).map_err(|e| tcp_err("probe answer", e))?;
    if status != 204 {
        return Err(tcp_err(
            "probe",
            format!("{addr} answered HTTP {status}, not 204 (not a Weft relay?)"),
        ));
    }
    let _ = stream.shutdown().await;
    Ok(handshake.map_or(request, |h| h.min(request)))
}

/// Why the relay did not upgrade a TCP connection (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not TLS, or a TLS handshake that failed or was cut.
    Tls,
    /// TLS, but no usable HTTP request.
    Http,
    /// Upgraded, then bytes that are not Weft's framing, or none before the
    /// connection ended.
    Framing,
}

impl Refused {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Tls => "tls",
            Refused::Http => "http",
            Refused::Framing => "framing",
        }
    }
}

/// A byte stream with the frame header already read from it put back in
/// front (what [`accept`] checked before the multiplexer reads it).
struct Prefixed<S> {
    head: [u8; wire::HEADER],
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.at < me.head.len() {
            let n = (me.head.len() - me.at).min(buf.remaining());
            buf.put_slice(&me.head[me.at..me.at + n]);
            me.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Reads the first frame header after the upgrade and checks it
/// ([`wire::Header::decode`]); the stream with that header put back.
async fn first_frame<S: AsyncRead + Unpin>(mut s: S) -> Result<Prefixed<S>, (Refused, String)> {
    let mut head = [0u8; wire::HEADER];
    s.read_exact(&mut head)
        .await
        .map_err(|e| (Refused::Framing, format!("no frame after the upgrade: {e}")))?;
    wire::Header::decode(head).map_err(|e| {
        (
            Refused::Framing,
            format!("not weft/1 after the upgrade: {e}"),
        )
    })?;
    Ok(Prefixed {
        head,
        at: 0,
        inner: s,
    })
}

/// What the relay did with one TCP connection.
pub enum Served {
    /// Upgraded: admission follows on this connection.
    Upgraded(MuxConn),
    /// Answered a plain request (`/`, the probe, an error status) and closed.
    Answered(u16),
}

const PAGE: &str = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Weft relay</title></head>\n<body><h1>Weft relay</h1><p>This host relays Weft tunnels and mesh traffic. Workers and engineers reach it with the <code>weft</code> tools; there is nothing to browse here.</p></body></html>\n";

async fn answer<W: AsyncWrite + Unpin>(w: &mut W, status: u16, reason: &str, body: &str) {
    let ctype = if body.starts_with("<!doctype") {
        "text/html; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    let resp = format!(
        "HTTP/1.1 {status} {reason}\r\nServer: weft-relay\r\nCache-Control: no-store\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = w.write_all(resp.as_bytes()).await;
    let _ = w.shutdown().await;
}

/// Relay: TLS, one HTTP request; the multiplexed connection if it asked to
/// upgrade, else the status it was answered with.
pub async fn accept(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: &tokio_rustls::TlsAcceptor,
    opts: mux::Options,
) -> Result<Served, (Refused, String)> {
    let _ = tcp.set_nodelay(true);
    let mut stream = acceptor
        .accept(tcp)
        .await
        .map_err(|e| (Refused::Tls, e.to_string()))?;
    let head = read_head(&mut stream)
        .await
        .map_err(|e| (Refused::Http, e))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err((Refused::Http, "incomplete head".into())),
        Err(e) => {
            answer(&mut stream, 400, "Bad Request", "bad request\n").await;
            return Err((Refused::Http, format!("bad request head: {e}")));
        }
    }
    let (method, path) = (req.method.unwrap_or(""), req.path.unwrap_or(""));
    if method != "GET" && method != "HEAD" {
        answer(&mut stream, 405, "Method Not Allowed", "GET only\n").await;
        return Ok(Served::Answered(405));
    }
    match path {
        "/" => {
            answer(&mut stream, 200, "OK", PAGE).await;
            Ok(Served::Answered(200))
        }
        wire::PROBE_PATH => {
            answer(&mut stream, 204, "No Content", "").await;
            Ok(Served::Answered(204))
        }
        wire::UPGRADE_PATH => {
            let upgrade = header(req.headers, "upgrade").unwrap_or("");
            let connection = header(req.headers, "connection").unwrap_or("");
            let wants = upgrade.eq_ignore_ascii_case(wire::UPGRADE)
                && connection
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
            if !wants {
                answer(
                    &mut stream,
                    426,
                    "Upgrade Required",
                    "this path speaks weft/1 only\n",
                )
                .await;
                return Ok(Served::Answered(426));
            }
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: {}\r\n\r\n",
                wire::UPGRADE
            );
            stream
                .write_all(resp.as_bytes())
                .await
                .map_err(|e| (Refused::Http, e.to_string()))?;
            stream
                .flush()
                .await
                .map_err(|e| (Refused::Http, e.to_string()))?;
            let info = tls_info(stream.get_ref().1).map_err(|e| (Refused::Tls, e.to_string()))?;
            // The client speaks first (its first stream's OPEN, or a ping): garbage ends here.
            let stream = first_frame(stream).await?;
            Ok(Served::Upgraded(mux::spawn(
                stream,
                Side::Server,
                remote,
                info,
                opts,
            )))
        }
        _ => {
            answer(&mut stream, 404, "Not Found", "not found\n").await;
            Ok(Served::Answered(404))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_come_from_the_environment_and_no_proxy_wins() {
        let addr: SocketAddr = ([203, 0, 113, 2], 443).into();
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let p = proxy_from(env(&[("HTTPS_PROXY", "http://10.0.0.1:3128/")]), addr);
        assert_eq!(p.as_deref(), Some("10.0.0.1:3128"));
        let p = proxy_from(env(&[("https_proxy", "10.0.0.2:8080")]), addr);
        assert_eq!(p.as_deref(), Some("10.0.0.2:8080"));
        let vars = &[
            ("HTTPS_PROXY", "http://10.0.0.1:3128"),
            ("NO_PROXY", "localhost, 203.0.113.2"),
        ];
        assert_eq!(proxy_from(env(vars), addr), None);
        assert_eq!(proxy_from(env(&[]), addr), None);
    }

    #[test]
    fn response_heads_parse_or_say_why_not() {
        assert_eq!(
            status_of(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Ok(101)
        );
        assert!(status_of(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn heads_stop_at_the_blank_line_and_at_the_limit() {
        let mut r: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nNEXT";
        let head = read_head(&mut r).await.expect("head");
        assert!(head.ends_with(b"\r\n\r\n"));
        assert_eq!(r, b"NEXT");
        let long = vec![b'a'; MAX_HEAD + 10];
        let mut r: &[u8] = &long;
        assert!(read_head(&mut r).await.is_err());
    }

    #[tokio::test]
    async fn the_first_frame_is_checked_and_put_back() {
        let ping = wire::value_frame(wire::Kind::Ping, 0, 7);
        let mut bytes = ping.clone();
        bytes.extend_from_slice(b"rest");
        let mut s = first_frame(&bytes[..])
            .await
            .map_err(|e| e.1)
            .expect("a ping");
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, bytes, "every byte, the checked header first");

        // Reads smaller than the header get it in pieces.
        let mut s = first_frame(&bytes[..])
            .await
            .map_err(|e| e.1)
            .expect("a ping");
        let mut one = [0u8; 4];
        s.read_exact(&mut one).await.expect("read");
        assert_eq!(one, bytes[..4]);

        for (garbage, why) in [
            (&b"\xffGARBAGE-AFTER-THE-UPGRADE"[..], "unknown frame kind"),
            (&b"\x01\0\0\0\x01\0\0\0\x05"[..], "Open frame of 5 bytes"),
            (&b"SSH-2.0-OpenSSH_9.2\r\n"[..], "unknown frame kind"),
            (&b"\x01\0\0"[..], "no frame"),
            (&b""[..], "no frame"),
        ] {
            match first_frame(garbage).await {
                Err((Refused::Framing, detail)) => assert!(detail.contains(why), "{detail}"),
                Err((other, detail)) => panic!("{garbage:?}: {other:?} {detail}"),
                Ok(_) => panic!("{garbage:?} passed as a frame"),
            }
        }
    }
}
