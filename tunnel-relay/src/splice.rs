//! Byte splicing between QUIC streams and local sockets/stdio, one direction
//! at a time: backpressure from flow control (every write awaits the peer's
//! window), FIN forwarded as FIN (half-close), a QUIC reset forwarded as a
//! reset, buffers bounded (one chunk of at most [`CHUNK`] bytes in flight per
//! direction; QUIC chunks are moved, not copied, between two QUIC streams).

use std::io::IoSlice;

use crate::transport::{RecvStream, SendStream};
use bytes::{Buf, Bytes, BytesMut};
use quinn::{ReadError, VarInt, WriteError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_proto::close::ResetCode;

/// Largest chunk moved at once.
pub const CHUNK: usize = 256 * 1024;

/// How one direction ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Clean FIN forwarded.
    Finished,
    /// The source was reset (or failed); the sink was reset.
    Reset,
    /// The sink stopped reading; the source was stopped.
    Stopped,
}

/// The code a splice resets or stops a stream with when it fails itself.
fn failed() -> VarInt {
    VarInt::from_u32(ResetCode::Failed.code())
}

/// FIN, then waits until the peer has everything (or stops), so a dropped
/// connection cannot lose the tail.
async fn finish(send: &mut SendStream) {
    let _ = send.finish();
    let _ = send.stopped().await;
}

/// Chunks taken from a QUIC stream at once (one lock, one wakeup per batch).
const BATCH: usize = 32;

/// One direction between two QUIC streams. Returns bytes moved and how it ended.
/// Chunks are moved (reference-counted), never copied.
/// `on_bytes` is told every batch moved (for live byte counters).
pub async fn quic_to_quic(
    mut recv: RecvStream,
    mut send: SendStream,
    on_bytes: impl Fn(u64),
) -> (u64, End) {
    let mut total = 0u64;
    let mut bufs: Vec<Bytes> = vec![Bytes::new(); BATCH];
    loop {
        let got = tokio::select! {
            r = recv.read_chunks(&mut bufs) => r,
            s = send.stopped() => {
                let code = s.ok().flatten().unwrap_or(failed());
                let _ = recv.stop(code);
                return (total, End::Stopped);
            }
        };
        match got {
            Ok(Some(n)) => {
                let batch = &mut bufs[..n];
                let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
                match send.write_all_chunks(batch).await {
                    Ok(()) => {
                        total += len;
                        on_bytes(len);
                    }
                    Err(e) => {
                        // The sink stopped: stop the source with its code.
                        let (code, end) = match e {
                            WriteError::Stopped(code) => (code, End::Stopped),
                            _ => (failed(), End::Reset),
                        };
                        let _ = recv.stop(code);
                        return (total, end);
                    }
                }
            }
            Ok(None) => {
                finish(&mut send).await;
                return (total, End::Finished);
            }
            Err(e) => {
                // The source was reset: reset the sink with its code.
                let code = match e {
                    ReadError::Reset(code) => code,
                    _ => failed(),
                };
                let _ = send.reset(code);
                return (total, End::Reset);
            }
        }
    }
}

/// Writes every chunk, with vectored writes where the writer supports them.
async fn write_all_bufs<W: AsyncWrite + Unpin>(
    w: &mut W,
    bufs: &mut [Bytes],
) -> std::io::Result<()> {
    let mut i = 0;
    while i < bufs.len() {
        if bufs[i].is_empty() {
            i += 1;
            continue;
        }
        let mut slices = [IoSlice::new(&[]); BATCH];
        let k = (bufs.len() - i).min(BATCH);
        for (s, b) in slices.iter_mut().zip(&bufs[i..i + k]) {
            *s = IoSlice::new(b);
        }
        let mut n = w.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && i < bufs.len() {
            let l = bufs[i].len();
            if n >= l {
                n -= l;
                i += 1;
            } else {
                bufs[i].advance(n);
                n = 0;
            }
        }
    }
    Ok(())
}

/// One direction from a local reader (TCP read half, stdin) into a QUIC stream.
pub async fn local_to_quic<R: AsyncRead + Unpin>(mut r: R, mut send: SendStream) -> (u64, End) {
    let mut total = 0u64;
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        buf.reserve(CHUNK);
        let read = tokio::select! {
            r = r.read_buf(&mut buf) => r,
            _ = send.stopped() => return (total, End::Stopped),
        };
        match read {
            Ok(0) => {
                finish(&mut send).await;
                return (total, End::Finished);
            }
            Ok(n) => {
                total += n as u64;
                let chunk = buf.split().freeze();
                if send.write_chunk(chunk).await.is_err() {
                    return (total, End::Stopped);
                }
            }
            Err(_) => {
                let _ = send.reset(failed());
                return (total, End::Reset);
            }
        }
    }
}

/// One direction from a QUIC stream into a local writer (TCP write half,
/// stdout). FIN becomes `shutdown()` (TCP FIN); a reset ends without it.
pub async fn quic_to_local<W: AsyncWrite + Unpin>(mut recv: RecvStream, mut w: W) -> (u64, End) {
    let mut total = 0u64;
    let mut bufs: Vec<Bytes> = vec![Bytes::new(); BATCH];
    loop {
        match recv.read_chunks(&mut bufs).await {
            Ok(Some(n)) => {
                let batch = &mut bufs[..n];
                let len: u64 = batch.iter().map(|b| b.len() as u64).sum();
                // flush: stdout hands bytes to a blocking thread and may hold
                // the last ones back until flushed (a no-op for TCP).
                if write_all_bufs(&mut w, batch).await.is_err() || w.flush().await.is_err() {
                    let _ = recv.stop(failed());
                    return (total, End::Stopped);
                }
                total += len;
            }
            Ok(None) => {
                let _ = w.flush().await;
                let _ = w.shutdown().await;
                return (total, End::Finished);
            }
            Err(_) => {
                let _ = w.flush().await;
                return (total, End::Reset);
            }
        }
    }
}

/// Both directions between a QUIC stream pair and a TCP connection. A reset
/// from QUIC aborts the TCP connection (RST), a TCP error resets the stream.
pub async fn quic_tcp(
    send: SendStream,
    recv: RecvStream,
    tcp: tokio::net::TcpStream,
) -> (u64, u64) {
    let (r, w) = tcp.into_split();
    let (up, down) = tokio::join!(local_to_quic(r, send), quic_to_local(recv, w));
    (up.0, down.0)
}
