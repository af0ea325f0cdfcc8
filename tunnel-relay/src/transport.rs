//! A relay connection over either transport: QUIC (the default) or the
//! TCP/TLS fallback ([`crate::mux`], when UDP is blocked). The relay, the
//! tunnels, the mesh control stream and the relay path use only these types,
//! so everything that runs over QUIC runs over TCP alike. Errors are quinn's
//! types for both (the multiplexer produces them too).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use quinn::{ConnectionError, ReadError, SendDatagramError, StoppedError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::mux;

pub use crate::mux::ClosedStream;

/// The TLS exporter label both transports bind the Noise prologue with
/// ([`crate::noise`]) and the fast relay path derives its bind key from.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-weft-relay-noise";

/// Which transport a connection uses (what `status` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// QUIC over UDP.
    Quic,
    /// TLS over TCP, multiplexed.
    Tcp,
}

impl Kind {
    /// `quic` or `tcp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Quic => "quic",
            Kind::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How often [`Connection::went_silent`] reads the received-datagram count.
const SILENCE_TICK: Duration = Duration::from_millis(100);

/// One connection to or from the relay.
#[derive(Debug, Clone)]
pub enum Connection {
    /// QUIC.
    Quic(quinn::Connection),
    /// TLS on TCP.
    Tcp(mux::MuxConn),
}

/// A stream's sending half.
#[derive(Debug)]
pub enum SendStream {
    /// QUIC.
    Quic(quinn::SendStream),
    /// TLS on TCP.
    Tcp(mux::SendStream),
}

/// A stream's receiving half.
#[derive(Debug)]
pub enum RecvStream {
    /// QUIC.
    Quic(quinn::RecvStream),
    /// TLS on TCP.
    Tcp(mux::RecvStream),
}

impl From<quinn::Connection> for Connection {
    fn from(c: quinn::Connection) -> Connection {
        Connection::Quic(c)
    }
}

fn quic_pair((s, r): (quinn::SendStream, quinn::RecvStream)) -> (SendStream, RecvStream) {
    (SendStream::Quic(s), RecvStream::Quic(r))
}

fn tcp_pair((s, r): (mux::SendStream, mux::RecvStream)) -> (SendStream, RecvStream) {
    (SendStream::Tcp(s), RecvStream::Tcp(r))
}

impl Connection {
    /// Which transport this is.
    pub fn kind(&self) -> Kind {
        match self {
            Connection::Quic(_) => Kind::Quic,
            Connection::Tcp(_) => Kind::Tcp,
        }
    }

    /// Opens a bidirectional stream.
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => c.open_bi().await.map(quic_pair),
            Connection::Tcp(c) => c.open_bi().await.map(tcp_pair),
        }
    }

    /// The next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        match self {
            Connection::Quic(c) => c.accept_bi().await.map(quic_pair),
            Connection::Tcp(c) => c.accept_bi().await.map(tcp_pair),
        }
    }

    /// Sends an unreliable datagram.
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        match self {
            Connection::Quic(c) => c.send_datagram(data),
            Connection::Tcp(c) => c.send_datagram(data),
        }
    }

    /// The next datagram.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        match self {
            Connection::Quic(c) => c.read_datagram().await,
            Connection::Tcp(c) => c.read_datagram().await,
        }
    }

    /// The largest datagram the connection carries now.
    pub fn max_datagram_size(&self) -> Option<usize> {
        match self {
            Connection::Quic(c) => c.max_datagram_size(),
            Connection::Tcp(_) => Some(weft_proto::mux::MAX_DATAGRAM),
        }
    }

    /// Closes with an application code.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        match self {
            Connection::Quic(c) => c.close(code, reason),
            Connection::Tcp(c) => c.close(code, reason),
        }
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) -> ConnectionError {
        match self {
            Connection::Quic(c) => c.closed().await,
            Connection::Tcp(c) => c.closed().await,
        }
    }

    /// Why it ended, if it did.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        match self {
            Connection::Quic(c) => c.close_reason(),
            Connection::Tcp(c) => c.close_reason(),
        }
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Connection::Quic(c) => c.remote_address(),
            Connection::Tcp(c) => c.remote_address(),
        }
    }

    /// Streams the peer may have open at once.
    pub fn set_max_concurrent_bi_streams(&self, n: VarInt) {
        match self {
            Connection::Quic(c) => c.set_max_concurrent_bi_streams(n),
            Connection::Tcp(c) => {
                c.set_max_concurrent_bi_streams(u32::try_from(n.into_inner()).unwrap_or(u32::MAX))
            }
        }
    }

    /// The certificate chain the peer presented in TLS (the relay's, seen by a client).
    pub fn peer_certificates(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        match self {
            Connection::Quic(c) => c
                .peer_identity()
                .and_then(|i| {
                    i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                        .ok()
                })
                .map(|b| *b)
                .unwrap_or_default(),
            Connection::Tcp(c) => c.peer_certificates(),
        }
    }

    /// UDP datagrams received on this connection so far (QUIC; `None` on
    /// TCP/TLS): what tells a client that its relay went silent.
    pub fn received_datagrams(&self) -> Option<u64> {
        match self {
            Connection::Quic(c) => Some(c.stats().udp_rx.datagrams),
            Connection::Tcp(_) => None,
        }
    }

    /// Resolves once this connection has received no datagram for
    /// `silent` (QUIC; never on TCP/TLS). With keepalives every `silent / 2`
    /// a live peer answers well within it: silence means its process or
    /// host is gone, or the path stopped passing UDP, and is seen before the
    /// idle timeout closes the connection.
    pub async fn went_silent(&self, silent: Duration) {
        let Some(mut last) = self.received_datagrams() else {
            return std::future::pending().await;
        };
        let mut since = tokio::time::Instant::now();
        let mut tick = since;
        loop {
            tokio::time::sleep(SILENCE_TICK).await;
            let now = tokio::time::Instant::now();
            let n = self.received_datagrams().unwrap_or(last);
            // A late tick means this process was starved: what the peer sent
            // may still wait in the socket, unread. Silence counts only while
            // this side keeps time.
            let late = now.duration_since(tick) > SILENCE_TICK * 3;
            tick = now;
            if n != last || late {
                (last, since) = (n, now);
            } else if now.duration_since(since) >= silent {
                return;
            }
        }
    }

    /// Resolves once this connection receives a datagram again (never on
    /// TCP/TLS).
    pub async fn heard_again(&self) {
        let Some(last) = self.received_datagrams() else {
            return std::future::pending().await;
        };
        while self.received_datagrams() == Some(last) {
            tokio::time::sleep(SILENCE_TICK).await;
        }
    }

    /// The round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        match self {
            Connection::Quic(c) => c.rtt(),
            Connection::Tcp(c) => c.rtt(),
        }
    }

    /// The 32-byte TLS exporter value ([`EXPORTER_LABEL`]) the Noise prologue
    /// binds to (the TCP fallback's was derived at its TLS handshake).
    pub fn exporter(&self) -> Option<[u8; 32]> {
        match self {
            Connection::Quic(c) => {
                let mut ekm = [0u8; 32];
                c.export_keying_material(&mut ekm, EXPORTER_LABEL, b"")
                    .ok()?;
                Some(ekm)
            }
            Connection::Tcp(c) => Some(c.exporter()),
        }
    }
}

impl SendStream {
    /// Writes all of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_all(data).await,
            SendStream::Tcp(s) => s.write_all(data).await,
        }
    }

    /// Writes all of `data`.
    pub async fn write_chunk(&mut self, data: Bytes) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_chunk(data).await,
            SendStream::Tcp(s) => s.write_chunk(data).await,
        }
    }

    /// Writes all of every chunk.
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), WriteError> {
        match self {
            SendStream::Quic(s) => s.write_all_chunks(chunks).await,
            SendStream::Tcp(s) => s.write_all_chunks(chunks).await,
        }
    }

    /// Ends this direction.
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.finish().map_err(|_| ClosedStream),
            SendStream::Tcp(s) => s.finish(),
        }
    }

    /// Abandons this direction.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            SendStream::Quic(s) => s.reset(code).map_err(|_| ClosedStream),
            SendStream::Tcp(s) => s.reset(code),
        }
    }

    /// Resolves when the peer stopped reading or everything was delivered.
    pub async fn stopped(&mut self) -> Result<Option<VarInt>, StoppedError> {
        match self {
            SendStream::Quic(s) => s.stopped().await,
            SendStream::Tcp(s) => s.stopped().await,
        }
    }
}

impl RecvStream {
    /// Reads into `buf`: `Ok(None)` at the end.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        match self {
            RecvStream::Quic(r) => r.read(buf).await,
            RecvStream::Tcp(r) => r.read(buf).await,
        }
    }

    /// Chunks as they arrived: `Ok(None)` at the end.
    pub async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, ReadError> {
        match self {
            RecvStream::Quic(r) => r.read_chunks(bufs).await,
            RecvStream::Tcp(r) => r.read_chunks(bufs).await,
        }
    }

    /// Everything up to the end of the stream, at most `limit` bytes.
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, quinn::ReadToEndError> {
        match self {
            RecvStream::Quic(r) => r.read_to_end(limit).await,
            RecvStream::Tcp(r) => {
                let mut out = Vec::new();
                let mut bufs = [Bytes::new(), Bytes::new(), Bytes::new(), Bytes::new()];
                while let Some(n) = r.read_chunks(&mut bufs).await? {
                    for b in &bufs[..n] {
                        if out.len() + b.len() > limit {
                            return Err(quinn::ReadToEndError::TooLong);
                        }
                        out.extend_from_slice(b);
                    }
                }
                Ok(out)
            }
        }
    }

    /// Tells the peer to stop sending.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        match self {
            RecvStream::Quic(r) => r.stop(code).map_err(|_| ClosedStream),
            RecvStream::Tcp(r) => r.stop(code),
        }
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvStream::Quic(r) => Pin::new(r).poll_read(cx, buf),
            RecvStream::Tcp(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_write(cx, buf).map_err(io::Error::from),
            SendStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_flush(cx),
            SendStream::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendStream::Quic(s) => Pin::new(s).poll_shutdown(cx),
            SendStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
