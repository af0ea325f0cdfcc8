//! The multiplexer that carries a relay connection over one reliable byte
//! stream (TLS on TCP) when UDP is blocked: bidirectional streams with
//! credit-based flow control, half-close, reset and stop codes, unreliable
//! datagrams, keepalive and an application close — what the relay and its
//! clients use of a QUIC connection, with the same error types
//! (`quinn::ConnectionError`, `ReadError`, `WriteError`), so the code above
//! ([`crate::transport`]) handles both alike. Framing: [`weft_proto::mux`].
//!
//! Shape: one reader task (frames → per-stream buffers, wakes readers), one
//! writer task (an ordered queue of frames → the byte stream, batched and
//! flushed when the queue is empty), and an optional keepalive task. The
//! queue is unbounded in frames but bounded in bytes by flow control: a
//! stream writes only within the credit its peer granted (a window of
//! [`wire::STREAM_WINDOW`]); queued datagrams are capped at
//! [`DATAGRAM_QUEUE`] bytes and dropped beyond it, as a full UDP socket would.
//! Frames the reader itself must answer (pongs, refused streams) are capped at
//! [`OWED_FRAMES`] queued: a peer that floods pings and never reads is dropped.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn::{
    ApplicationClose, ConnectionError, ReadError, SendDatagramError, StoppedError, VarInt,
    WriteError,
};
use rustls::pki_types::CertificateDer;
use tokio::io::{
    AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter, ReadBuf,
};
use tokio::sync::{mpsc, Notify};
use tracing::debug;
use weft_proto::mux::{self as wire, Header, Kind};

/// Bytes of datagrams waiting to be written before new ones are dropped.
pub const DATAGRAM_QUEUE: usize = 2 * 1024 * 1024;
/// Received datagrams kept for a reader that is behind (oldest dropped).
const DATAGRAM_BACKLOG: usize = 1024;
/// Frames the reader may have queued in answer to the peer (pongs, refusals).
pub const OWED_FRAMES: usize = 4096;
/// Grant more credit once this much was read since the last grant.
const CREDIT_STEP: u64 = wire::STREAM_WINDOW / 8;
const IO_BUFFER: usize = 256 * 1024;

/// Which end of the connection this is (decides stream id parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Opens odd stream ids.
    Client,
    /// Opens even stream ids.
    Server,
}

/// Timing and limits of one connection.
#[derive(Debug, Clone)]
pub struct Options {
    /// Send a ping this often (clients).
    pub keepalive: Option<Duration>,
    /// End the connection when nothing arrived for this long.
    pub idle_timeout: Duration,
    /// Streams the peer may have open at once; more are refused at once.
    pub max_incoming: u32,
}

/// The transport's own stream-closed error (`finish`/`reset`/`stop` twice).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("stream already closed")]
pub struct ClosedStream;

enum Out {
    Frame(Vec<u8>),
    Data([u8; wire::HEADER], Bytes),
    Datagram([u8; wire::HEADER], Bytes),
    Owed(Vec<u8>),
    Shutdown,
}

#[derive(Default)]
struct Stream {
    // Receiving half.
    buf: VecDeque<Bytes>,
    fin: bool,
    reset: Option<VarInt>,
    stopped_reading: bool,
    allowed: u64,
    owed_credit: u64,
    read_waker: Option<Waker>,
    // Sending half.
    credit: u64,
    sent_end: bool,
    stopped_by_peer: Option<VarInt>,
    write_waker: Option<Waker>,
    stopped_wakers: Vec<Waker>,
    handles: u8,
    from_peer: bool,
}

impl Stream {
    fn new(from_peer: bool) -> Stream {
        Stream {
            allowed: wire::STREAM_WINDOW,
            credit: wire::STREAM_WINDOW,
            handles: 2,
            from_peer,
            ..Stream::default()
        }
    }

    fn wake_all(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
        for w in self.stopped_wakers.drain(..) {
            w.wake();
        }
    }
}

struct State {
    streams: HashMap<u32, Stream>,
    next_local: u32,
    peer_max: u32,
    peer_open: u32,
    max_incoming: u32,
    incoming: VecDeque<u32>,
    datagrams: VecDeque<Bytes>,
    error: Option<ConnectionError>,
    rtt: Duration,
    ping: Option<(u64, Instant)>,
}

struct Shared {
    st: Mutex<State>,
    out: mpsc::UnboundedSender<Out>,
    side: Side,
    remote: SocketAddr,
    exporter: [u8; 32],
    peer_certs: Vec<CertificateDer<'static>>,
    datagram_queued: AtomicUsize,
    owed: AtomicUsize,
    changed: Notify,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn send(&self, o: Out) {
        // The writer is gone only once the connection ended; frames then go nowhere.
        let _ = self.out.send(o);
    }

    fn owe(&self, frame: Vec<u8>) {
        if self.owed.fetch_add(1, Ordering::Relaxed) >= OWED_FRAMES {
            debug!("peer floods frames that need answers and does not read; closing");
            self.fail(ConnectionError::TimedOut);
            return;
        }
        self.send(Out::Owed(frame));
    }

    /// Ends the connection with `err` (first reason wins), wakes everyone.
    fn fail(&self, err: ConnectionError) {
        {
            let mut st = lock(&self.st);
            if st.error.is_some() {
                return;
            }
            st.error = Some(err);
            for s in st.streams.values_mut() {
                s.wake_all();
            }
        }
        self.send(Out::Shutdown);
        self.changed.notify_waiters();
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    fn close(&self, code: VarInt, reason: &[u8]) {
        {
            let st = lock(&self.st);
            if st.error.is_some() {
                return;
            }
        }
        self.send(Out::Frame(wire::close_frame(code.into_inner(), reason)));
        self.fail(ConnectionError::LocallyClosed);
    }

    fn error(&self) -> Option<ConnectionError> {
        lock(&self.st).error.clone()
    }
}

/// One multiplexed connection (cheap to clone; closed when the last handle
/// of the connection and of its streams is dropped, as a QUIC connection).
#[derive(Clone)]
pub struct MuxConn {
    handle: Arc<Handle>,
}

struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close(VarInt::from_u32(0), b"");
    }
}

impl std::fmt::Debug for MuxConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MuxConn")
            .field("remote", &self.handle.shared.remote)
            .field("side", &self.handle.shared.side)
            .finish()
    }
}

/// What the TLS session under a connection says about it.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// The exporter value the Noise prologue binds to.
    pub exporter: [u8; 32],
    /// The certificate chain the peer presented (the relay's, seen by a client).
    pub peer_certs: Vec<CertificateDer<'static>>,
}

/// Starts the multiplexer over `io` (an established, authenticated-to-be
/// byte stream: TLS on TCP after the HTTP upgrade).
pub fn spawn<T>(io: T, side: Side, remote: SocketAddr, tls: TlsInfo, opts: Options) -> MuxConn
where
    T: AsyncRead + AsyncWrite + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        st: Mutex::new(State {
            streams: HashMap::new(),
            next_local: if side == Side::Client { 1 } else { 2 },
            peer_max: 0,
            peer_open: 0,
            max_incoming: opts.max_incoming,
            incoming: VecDeque::new(),
            datagrams: VecDeque::new(),
            error: None,
            rtt: Duration::from_millis(100),
            ping: None,
        }),
        out: tx,
        side,
        remote,
        exporter: tls.exporter,
        peer_certs: tls.peer_certs,
        datagram_queued: AtomicUsize::new(0),
        owed: AtomicUsize::new(0),
        changed: Notify::new(),
        tasks: Mutex::new(Vec::new()),
    });
    let (r, w) = tokio::io::split(io);
    tokio::spawn(writer(shared.clone(), rx, w));
    let reader = tokio::spawn(reader(shared.clone(), r, opts.idle_timeout));
    let mut tasks = vec![reader.abort_handle()];
    if let Some(every) = opts.keepalive {
        tasks.push(tokio::spawn(keepalive(shared.clone(), every)).abort_handle());
    }
    shared
        .tasks
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(tasks);
    MuxConn {
        handle: Arc::new(Handle { shared }),
    }
}

async fn writer<W: AsyncWrite>(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Out>,
    w: tokio::io::WriteHalf<W>,
) {
    let mut w = BufWriter::with_capacity(IO_BUFFER, w);
    'outer: while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(o) = next.take() {
            let r = match o {
                Out::Frame(f) => w.write_all(&f).await,
                Out::Owed(f) => {
                    shared.owed.fetch_sub(1, Ordering::Relaxed);
                    w.write_all(&f).await
                }
                Out::Data(h, d) => match w.write_all(&h).await {
                    Ok(()) => w.write_all(&d).await,
                    Err(e) => Err(e),
                },
                Out::Datagram(h, d) => {
                    shared.datagram_queued.fetch_sub(d.len(), Ordering::Relaxed);
                    match w.write_all(&h).await {
                        Ok(()) => w.write_all(&d).await,
                        Err(e) => Err(e),
                    }
                }
                Out::Shutdown => {
                    let _ = w.flush().await;
                    let _ = tokio::time::timeout(Duration::from_secs(1), w.shutdown()).await;
                    break 'outer;
                }
            };
            if let Err(e) = r {
                debug!(error = %e, "transport write failed");
                shared.fail(ConnectionError::Reset);
                break 'outer;
            }
            next = rx.try_recv().ok();
        }
        if let Err(e) = w.flush().await {
            debug!(error = %e, "transport flush failed");
            shared.fail(ConnectionError::Reset);
            break;
        }
    }
}

async fn keepalive(shared: Arc<Shared>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    loop {
        tick.tick().await;
        if shared.error().is_some() {
            return;
        }
        nonce += 1;
        lock(&shared.st).ping = Some((nonce, Instant::now()));
        shared.send(Out::Frame(wire::value_frame(Kind::Ping, 0, nonce)));
    }
}

async fn reader<R: AsyncRead>(shared: Arc<Shared>, r: tokio::io::ReadHalf<R>, idle: Duration) {
    let mut r = BufReader::with_capacity(IO_BUFFER, r);
    let err = loop {
        let mut h = [0u8; wire::HEADER];
        match tokio::time::timeout(idle, r.read_exact(&mut h)).await {
            Err(_) => break ConnectionError::TimedOut,
            Ok(Err(e)) => {
                debug!(error = %e, "transport read ended");
                break ConnectionError::Reset;
            }
            Ok(Ok(_)) => {}
        }
        let head = match Header::decode(h) {
            Ok(head) => head,
            Err(e) => {
                debug!(error = %e, "protocol violation; closing");
                break ConnectionError::Reset;
            }
        };
        let mut payload = BytesMut::zeroed(head.len);
        if head.len > 0 {
            match tokio::time::timeout(idle, r.read_exact(&mut payload)).await {
                Err(_) => break ConnectionError::TimedOut,
                Ok(Err(_)) => break ConnectionError::Reset,
                Ok(Ok(_)) => {}
            }
        }
        if let Err(e) = on_frame(&shared, head, payload.freeze()) {
            break e;
        }
    };
    shared.fail(err);
}

fn violation(what: &str) -> ConnectionError {
    debug!(what, "protocol violation; closing");
    ConnectionError::Reset
}

/// Applies one received frame.
fn on_frame(shared: &Shared, head: Header, payload: Bytes) -> Result<(), ConnectionError> {
    let peer_parity = match shared.side {
        Side::Client => false,
        Side::Server => true,
    };
    let mut st = lock(&shared.st);
    match head.kind {
        Kind::Open => {
            if wire::client_opened(head.id) != peer_parity || head.id <= st.peer_max {
                return Err(violation("stream opened twice or with our parity"));
            }
            st.peer_max = head.id;
            if st.peer_open >= st.max_incoming {
                drop(st);
                shared.owe(wire::value_frame(Kind::Reset, head.id, 0));
                shared.owe(wire::value_frame(Kind::Stop, head.id, 0));
                return Ok(());
            }
            st.peer_open += 1;
            st.streams.insert(head.id, Stream::new(true));
            st.incoming.push_back(head.id);
            drop(st);
            shared.changed.notify_waiters();
        }
        Kind::Data => {
            if let Some(s) = st.streams.get_mut(&head.id) {
                let n = payload.len() as u64;
                if n > s.allowed {
                    return Err(violation("data beyond the stream's credit"));
                }
                s.allowed -= n;
                if !s.stopped_reading && s.reset.is_none() {
                    s.buf.push_back(payload);
                    if let Some(w) = s.read_waker.take() {
                        w.wake();
                    }
                }
            }
        }
        Kind::Fin => {
            if let Some(s) = st.streams.get_mut(&head.id) {
                s.fin = true;
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
            }
        }
        Kind::Reset => {
            if let Some(s) = st.streams.get_mut(&head.id) {
                s.reset = Some(varint(wire::value(&payload)));
                s.buf.clear();
                if let Some(w) = s.read_waker.take() {
                    w.wake();
                }
            }
        }
        Kind::Stop => {
            if let Some(s) = st.streams.get_mut(&head.id) {
                s.stopped_by_peer = Some(varint(wire::value(&payload)));
                s.wake_all();
            }
        }
        Kind::Credit => {
            if let Some(s) = st.streams.get_mut(&head.id) {
                s.credit = s.credit.saturating_add(wire::value(&payload));
                if let Some(w) = s.write_waker.take() {
                    w.wake();
                }
            }
        }
        Kind::Datagram => {
            if st.datagrams.len() >= DATAGRAM_BACKLOG {
                st.datagrams.pop_front();
            }
            st.datagrams.push_back(payload);
            drop(st);
            shared.changed.notify_waiters();
        }
        Kind::Ping => {
            drop(st);
            shared.owe(wire::value_frame(Kind::Pong, 0, wire::value(&payload)));
        }
        Kind::Pong => {
            if let Some((n, at)) = st.ping {
                if n == wire::value(&payload) {
                    st.rtt = at.elapsed();
                    st.ping = None;
                }
            }
        }
        Kind::Close => {
            let (code, reason) = wire::close_parts(&payload);
            return Err(ConnectionError::ApplicationClosed(ApplicationClose {
                error_code: varint(code),
                reason: Bytes::copy_from_slice(reason),
            }));
        }
    }
    Ok(())
}

fn varint(v: u64) -> VarInt {
    VarInt::from_u64(v).unwrap_or(VarInt::MAX)
}

impl MuxConn {
    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Opens a bidirectional stream (never waits: a peer over its limit refuses it).
    pub async fn open_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let sh = self.shared();
        let id = {
            let mut st = lock(&sh.st);
            if let Some(e) = &st.error {
                return Err(e.clone());
            }
            let id = st.next_local;
            st.next_local = id.checked_add(2).ok_or(ConnectionError::LocallyClosed)?;
            st.streams.insert(id, Stream::new(false));
            // Queued under the lock: the peer must see OPENs in id order (a
            // lower id after a higher one is a protocol violation there).
            sh.send(Out::Frame(wire::empty_frame(Kind::Open, id)));
            id
        };
        Ok(self.halves(id))
    }

    fn halves(&self, id: u32) -> (SendStream, RecvStream) {
        (
            SendStream {
                conn: self.handle.clone(),
                id,
            },
            RecvStream {
                conn: self.handle.clone(),
                id,
                partial: None,
            },
        )
    }

    /// The next stream the peer opened.
    pub async fn accept_bi(&self) -> Result<(SendStream, RecvStream), ConnectionError> {
        let sh = self.shared();
        loop {
            let notified = sh.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&sh.st);
                if let Some(id) = st.incoming.pop_front() {
                    return Ok(self.halves(id));
                }
                if let Some(e) = &st.error {
                    return Err(e.clone());
                }
            }
            notified.await;
        }
    }

    /// Queues an unreliable datagram (dropped when the queue is full, as UDP would).
    pub fn send_datagram(&self, data: Bytes) -> Result<(), SendDatagramError> {
        let sh = self.shared();
        if data.len() > wire::MAX_DATAGRAM {
            return Err(SendDatagramError::TooLarge);
        }
        if let Some(e) = sh.error() {
            return Err(SendDatagramError::ConnectionLost(e));
        }
        if sh.datagram_queued.fetch_add(data.len(), Ordering::Relaxed) > DATAGRAM_QUEUE {
            sh.datagram_queued.fetch_sub(data.len(), Ordering::Relaxed);
            return Ok(());
        }
        let h = Header {
            kind: Kind::Datagram,
            id: 0,
            len: data.len(),
        }
        .encode();
        sh.send(Out::Datagram(h, data));
        Ok(())
    }

    /// The next datagram the peer sent.
    pub async fn read_datagram(&self) -> Result<Bytes, ConnectionError> {
        let sh = self.shared();
        loop {
            let notified = sh.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&sh.st);
                if let Some(d) = st.datagrams.pop_front() {
                    return Ok(d);
                }
                if let Some(e) = &st.error {
                    return Err(e.clone());
                }
            }
            notified.await;
        }
    }

    /// Closes with an application code and reason (sent after what is queued).
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        self.shared().close(code, reason);
    }

    /// Resolves when the connection ends, with why.
    pub async fn closed(&self) -> ConnectionError {
        let sh = self.shared();
        loop {
            let notified = sh.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(e) = sh.error() {
                return e;
            }
            notified.await;
        }
    }

    /// Why the connection ended, if it did.
    pub fn close_reason(&self) -> Option<ConnectionError> {
        self.shared().error()
    }

    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared().remote
    }

    /// Streams the peer may have open at once from now on.
    pub fn set_max_concurrent_bi_streams(&self, n: u32) {
        lock(&self.shared().st).max_incoming = n;
    }

    /// The TLS exporter value bound to this connection (for the Noise prologue).
    pub fn exporter(&self) -> [u8; 32] {
        self.shared().exporter
    }

    /// The certificate chain the peer presented in TLS.
    pub fn peer_certificates(&self) -> Vec<CertificateDer<'static>> {
        self.shared().peer_certs.clone()
    }

    /// The last measured ping round trip.
    pub fn rtt(&self) -> Duration {
        lock(&self.shared().st).rtt
    }

    /// Whether two handles are the same connection.
    pub fn same(&self, other: &MuxConn) -> bool {
        Arc::ptr_eq(&self.handle, &other.handle)
    }
}

fn release(handle: &Handle, id: u32) {
    let mut st = lock(&handle.shared.st);
    let gone = match st.streams.get_mut(&id) {
        Some(s) => {
            s.handles = s.handles.saturating_sub(1);
            (s.handles == 0).then_some(s.from_peer)
        }
        None => None,
    };
    if let Some(from_peer) = gone {
        st.streams.remove(&id);
        if from_peer {
            st.peer_open = st.peer_open.saturating_sub(1);
        }
    }
}

/// The sending half of a stream.
pub struct SendStream {
    conn: Arc<Handle>,
    id: u32,
}

impl std::fmt::Debug for SendStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mux::SendStream({})", self.id)
    }
}

impl SendStream {
    fn sh(&self) -> &Shared {
        &self.conn.shared
    }

    /// Takes up to `want` bytes of granted credit (at most one frame's
    /// worth); `Pending` until there is some.
    fn poll_reserve(
        &mut self,
        cx: &mut Context<'_>,
        want: usize,
    ) -> Poll<Result<usize, WriteError>> {
        let mut st = lock(&self.conn.shared.st);
        let error = st.error.clone();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(WriteError::ClosedStream));
        };
        if let Some(code) = s.stopped_by_peer {
            return Poll::Ready(Err(WriteError::Stopped(code)));
        }
        if let Some(e) = error {
            return Poll::Ready(Err(WriteError::ConnectionLost(e)));
        }
        if s.sent_end {
            return Poll::Ready(Err(WriteError::ClosedStream));
        }
        if want == 0 {
            return Poll::Ready(Ok(0));
        }
        if s.credit == 0 {
            s.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = (want as u64).min(s.credit).min(wire::MAX_DATA as u64) as usize;
        s.credit -= n as u64;
        Poll::Ready(Ok(n))
    }

    fn send_data(&self, chunk: Bytes) {
        let h = Header {
            kind: Kind::Data,
            id: self.id,
            len: chunk.len(),
        }
        .encode();
        self.sh().send(Out::Data(h, chunk));
    }

    /// Writes all of `data`.
    pub async fn write_chunk(&mut self, mut data: Bytes) -> Result<(), WriteError> {
        while !data.is_empty() {
            let want = data.len();
            let n = std::future::poll_fn(|cx| self.poll_reserve(cx, want)).await?;
            self.send_data(data.split_to(n));
        }
        Ok(())
    }

    /// Writes all of every chunk (emptied as written).
    pub async fn write_all_chunks(&mut self, chunks: &mut [Bytes]) -> Result<(), WriteError> {
        for c in chunks.iter_mut() {
            let d = std::mem::take(c);
            self.write_chunk(d).await?;
        }
        Ok(())
    }

    /// Writes all of `data`.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), WriteError> {
        self.write_chunk(Bytes::copy_from_slice(data)).await
    }

    fn end(&mut self, frame: Vec<u8>) -> Result<(), ClosedStream> {
        let mut st = lock(&self.sh().st);
        let dead = st.error.is_some();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Err(ClosedStream);
        };
        if s.sent_end {
            return Err(ClosedStream);
        }
        s.sent_end = true;
        for w in s.stopped_wakers.drain(..) {
            w.wake();
        }
        drop(st);
        if !dead {
            self.sh().send(Out::Frame(frame));
        }
        Ok(())
    }

    /// Ends this direction after what was written.
    pub fn finish(&mut self) -> Result<(), ClosedStream> {
        self.end(wire::empty_frame(Kind::Fin, self.id))
    }

    /// Abandons this direction with `code`.
    pub fn reset(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        self.end(wire::value_frame(Kind::Reset, self.id, code.into_inner()))
    }

    /// Resolves when the peer stopped reading (`Some(code)`) or this side
    /// finished (`None`; the byte stream then delivers in order).
    pub async fn stopped(&mut self) -> Result<Option<VarInt>, StoppedError> {
        std::future::poll_fn(|cx| {
            let mut st = lock(&self.conn.shared.st);
            let error = st.error.clone();
            let Some(s) = st.streams.get_mut(&self.id) else {
                return Poll::Ready(Ok(None));
            };
            if let Some(code) = s.stopped_by_peer {
                return Poll::Ready(Ok(Some(code)));
            }
            if s.sent_end {
                return Poll::Ready(Ok(None));
            }
            if let Some(e) = error {
                return Poll::Ready(Err(StoppedError::ConnectionLost(e)));
            }
            s.stopped_wakers.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for SendStream {
    fn drop(&mut self) {
        // As quinn 0.11: dropping an unfinished stream finishes it.
        let _ = self.finish();
        release(&self.conn, self.id);
    }
}

impl AsyncWrite for SendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_reserve(cx, buf.len()) {
            Poll::Ready(Ok(0)) => Poll::Ready(Ok(0)),
            Poll::Ready(Ok(n)) => {
                this.send_data(Bytes::copy_from_slice(&buf[..n]));
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.get_mut().finish();
        Poll::Ready(Ok(()))
    }
}

/// The receiving half of a stream.
pub struct RecvStream {
    conn: Arc<Handle>,
    id: u32,
    partial: Option<Bytes>,
}

impl std::fmt::Debug for RecvStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mux::RecvStream({})", self.id)
    }
}

impl RecvStream {
    /// Up to `max` chunks as they arrived: `Ok(None)` at the end of the stream.
    fn poll_chunks(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut [Bytes],
    ) -> Poll<Result<Option<usize>, ReadError>> {
        let mut n = 0;
        if let Some(p) = self.partial.take() {
            if out.is_empty() {
                self.partial = Some(p);
                return Poll::Ready(Ok(Some(0)));
            }
            out[0] = p;
            n = 1;
        }
        let sh = &self.conn.shared;
        let mut st = lock(&sh.st);
        let error = st.error.clone();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Poll::Ready(Err(ReadError::ClosedStream));
        };
        let mut read = 0u64;
        while n < out.len() {
            match s.buf.pop_front() {
                Some(b) => {
                    read += b.len() as u64;
                    out[n] = b;
                    n += 1;
                }
                None => break,
            }
        }
        let mut grant = None;
        if read > 0 {
            s.owed_credit += read;
            if s.owed_credit >= CREDIT_STEP && !s.fin && s.reset.is_none() {
                s.allowed += s.owed_credit;
                grant = Some(std::mem::take(&mut s.owed_credit));
            }
        }
        let result = if n > 0 {
            Poll::Ready(Ok(Some(n)))
        } else if let Some(code) = s.reset {
            Poll::Ready(Err(ReadError::Reset(code)))
        } else if s.fin {
            Poll::Ready(Ok(None))
        } else if let Some(e) = error {
            Poll::Ready(Err(ReadError::ConnectionLost(e)))
        } else {
            s.read_waker = Some(cx.waker().clone());
            Poll::Pending
        };
        drop(st);
        if let Some(g) = grant {
            sh.send(Out::Frame(wire::value_frame(Kind::Credit, self.id, g)));
        }
        result
    }

    /// Fills `bufs` with the chunks that arrived (at least one, waiting if
    /// none): `Ok(None)` at the end of the stream.
    pub async fn read_chunks(&mut self, bufs: &mut [Bytes]) -> Result<Option<usize>, ReadError> {
        std::future::poll_fn(|cx| self.poll_chunks(cx, bufs)).await
    }

    /// Reads into `buf`: `Ok(None)` at the end of the stream.
    pub async fn read(&mut self, buf: &mut [u8]) -> Result<Option<usize>, ReadError> {
        std::future::poll_fn(|cx| self.poll_copy(cx, buf)).await
    }

    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<Result<Option<usize>, ReadError>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(Some(0)));
        }
        let mut one = [Bytes::new()];
        match self.poll_chunks(cx, &mut one) {
            Poll::Ready(Ok(Some(_))) => {
                let [mut b] = one;
                let n = b.len().min(buf.len());
                buf[..n].copy_from_slice(&b.split_to(n));
                if !b.is_empty() {
                    self.partial = Some(b);
                }
                Poll::Ready(Ok(Some(n)))
            }
            other => other,
        }
    }

    /// Tells the peer to stop sending (`code`), discarding what is buffered.
    pub fn stop(&mut self, code: VarInt) -> Result<(), ClosedStream> {
        self.partial = None;
        let sh = &self.conn.shared;
        let mut st = lock(&sh.st);
        let dead = st.error.is_some();
        let Some(s) = st.streams.get_mut(&self.id) else {
            return Err(ClosedStream);
        };
        if s.stopped_reading {
            return Err(ClosedStream);
        }
        s.stopped_reading = true;
        s.buf.clear();
        let ended = s.fin || s.reset.is_some();
        drop(st);
        if !dead && !ended {
            sh.send(Out::Frame(wire::value_frame(
                Kind::Stop,
                self.id,
                code.into_inner(),
            )));
        }
        Ok(())
    }
}

impl Drop for RecvStream {
    fn drop(&mut self) {
        let _ = self.stop(VarInt::from_u32(0));
        release(&self.conn, self.id);
    }
}

impl AsyncRead for RecvStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_copy(cx, buf.initialize_unfilled()) {
            Poll::Ready(Ok(Some(n))) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(None)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e.into())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> TlsInfo {
        TlsInfo {
            exporter: [1; 32],
            peer_certs: Vec::new(),
        }
    }

    fn pair(max_incoming: u32) -> (MuxConn, MuxConn) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let opts = Options {
            keepalive: Some(Duration::from_millis(50)),
            idle_timeout: Duration::from_secs(5),
            max_incoming,
        };
        (
            spawn(a, Side::Client, addr, info(), opts.clone()),
            spawn(b, Side::Server, addr, info(), opts),
        )
    }

    #[tokio::test]
    async fn a_stream_carries_more_than_its_window_intact_both_ways_and_half_closes() {
        let (c, s) = pair(8);
        let data: Vec<u8> = (0..3 * wire::STREAM_WINDOW as usize + 12345)
            .map(|i| (i * 7 + i / 1000) as u8)
            .collect();
        let expect = data.clone();
        let server = tokio::spawn(async move {
            let (mut send, mut recv) = s.accept_bi().await.expect("accept");
            let mut got = Vec::new();
            recv.read_to_end(&mut got).await.expect("read");
            send.write_all(&got).await.expect("echo");
            send.finish().expect("finish");
            let _ = send.stopped().await;
            s
        });
        let (mut send, mut recv) = c.open_bi().await.expect("open");
        let writer = tokio::spawn(async move {
            send.write_chunk(Bytes::from(data)).await.expect("write");
            send.finish().expect("finish");
            send
        });
        let mut back = Vec::new();
        recv.read_to_end(&mut back).await.expect("read back");
        assert_eq!(back.len(), expect.len());
        assert!(back == expect, "bytes changed on the way");
        let _ = writer.await;
        let _s = server.await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn streams_opened_concurrently_reach_the_peer_in_order() {
        let (c, s) = pair(4096);
        let echo = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..400 {
                let (mut send, mut recv) = s.accept_bi().await.expect("accept");
                tasks.push(tokio::spawn(async move {
                    let mut b = Vec::new();
                    recv.read_to_end(&mut b).await.expect("read");
                    send.write_all(&b).await.expect("echo");
                    send.finish().expect("finish");
                }));
            }
            for t in tasks {
                t.await.expect("echo task");
            }
            s
        });
        let mut clients = Vec::new();
        for i in 0..400u32 {
            let c = c.clone();
            clients.push(tokio::spawn(async move {
                let (mut send, mut recv) = c.open_bi().await.expect("open");
                send.write_all(&i.to_be_bytes()).await.expect("write");
                send.finish().expect("finish");
                let mut b = Vec::new();
                recv.read_to_end(&mut b).await.expect("read back");
                assert_eq!(b, i.to_be_bytes());
            }));
        }
        for t in clients {
            t.await.expect("client task");
        }
        let _s = echo.await.expect("echo");
        assert!(c.close_reason().is_none(), "{:?}", c.close_reason());
    }

    #[tokio::test]
    async fn reset_stop_and_close_codes_reach_the_other_side() {
        let (c, s) = pair(8);
        let (mut send, _recv) = c.open_bi().await.expect("open");
        send.write_all(b"hello").await.expect("write");
        let (_ssend, mut srecv) = s.accept_bi().await.expect("accept");
        let mut b = [0u8; 5];
        srecv.read_exact(&mut b).await.expect("read");
        send.reset(VarInt::from_u32(7)).expect("reset");
        let mut more = [0u8; 1];
        let e = srecv.read(&mut more).await;
        assert!(
            matches!(e, Err(ReadError::Reset(c)) if c == VarInt::from_u32(7)),
            "{e:?}"
        );
        let (mut send2, _r2) = c.open_bi().await.expect("open");
        send2.write_all(b"x").await.expect("write");
        let (_s2, mut r2) = s.accept_bi().await.expect("accept");
        r2.stop(VarInt::from_u32(9)).expect("stop");
        assert_eq!(
            send2.stopped().await.expect("stopped"),
            Some(VarInt::from_u32(9))
        );
        assert!(
            matches!(send2.write_all(b"y").await, Err(WriteError::Stopped(c)) if c == VarInt::from_u32(9))
        );
        s.close(VarInt::from_u32(3), b"bye");
        match c.closed().await {
            ConnectionError::ApplicationClosed(a) => {
                assert_eq!(a.error_code, VarInt::from_u32(3));
                assert_eq!(&a.reason[..], b"bye");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(s.closed().await, ConnectionError::LocallyClosed));
    }

    #[tokio::test]
    async fn datagrams_pass_and_streams_over_the_limit_are_refused() {
        let (c, s) = pair(1);
        c.send_datagram(Bytes::from_static(b"wg")).expect("send");
        assert_eq!(&s.read_datagram().await.expect("dgram")[..], b"wg");
        let (mut a, _ar) = c.open_bi().await.expect("open");
        a.write_all(b"1").await.expect("write");
        let (mut b, _br) = c.open_bi().await.expect("open");
        let _first = s.accept_bi().await.expect("accept");
        // The second is over the server's limit of one: refused with a stop.
        assert_eq!(
            b.stopped().await.expect("stopped"),
            Some(VarInt::from_u32(0))
        );
        // Raising the limit admits the next one.
        s.set_max_concurrent_bi_streams(4);
        let (mut d, _dr) = c.open_bi().await.expect("open");
        d.write_all(b"3").await.expect("write");
        let (_x, mut xr) = s.accept_bi().await.expect("accept");
        let mut one = [0u8; 1];
        xr.read_exact(&mut one).await.expect("read");
        assert_eq!(&one, b"3");
    }

    #[tokio::test]
    async fn dropping_every_handle_closes_and_silence_times_out() {
        let (c, s) = pair(8);
        drop(c);
        assert!(matches!(
            s.closed().await,
            ConnectionError::ApplicationClosed(_)
        ));
        // A peer that never speaks: the idle timeout ends it.
        let (a, _b) = tokio::io::duplex(1024);
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let lonely = spawn(
            a,
            Side::Client,
            addr,
            info(),
            Options {
                keepalive: None,
                idle_timeout: Duration::from_millis(100),
                max_incoming: 1,
            },
        );
        assert!(matches!(lonely.closed().await, ConnectionError::TimedOut));
    }

    #[tokio::test]
    async fn garbage_and_credit_violations_end_the_connection() {
        use tokio::io::AsyncWriteExt as _;
        let (a, mut b) = tokio::io::duplex(1024);
        let addr: SocketAddr = ([127, 0, 0, 1], 1).into();
        let opts = Options {
            keepalive: None,
            idle_timeout: Duration::from_secs(5),
            max_incoming: 4,
        };
        let s = spawn(a, Side::Server, addr, info(), opts.clone());
        b.write_all(&[0xff; 9]).await.expect("write");
        assert!(matches!(s.closed().await, ConnectionError::Reset));
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let s = spawn(a, Side::Server, addr, info(), opts);
        b.write_all(&wire::empty_frame(Kind::Open, 1))
            .await
            .expect("open");
        let chunk = vec![0u8; wire::MAX_DATA];
        let head = Header {
            kind: Kind::Data,
            id: 1,
            len: chunk.len(),
        }
        .encode();
        for _ in 0..(wire::STREAM_WINDOW as usize / wire::MAX_DATA + 1) {
            if b.write_all(&head).await.is_err() || b.write_all(&chunk).await.is_err() {
                break;
            }
        }
        assert!(matches!(s.closed().await, ConnectionError::Reset));
    }
}
