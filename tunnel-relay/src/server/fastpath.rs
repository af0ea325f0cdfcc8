//! The relay's UDP port (the STUN port): STUN answers, and the fast relay
//! path — nodes' WireGuard packets forwarded in GRO/GSO batches with only the
//! 12-byte channel header rewritten (format and binding rules:
//! [`crate::relay_path`]). One thread with `poll(2)` and quinn-udp: a batch
//! of segments from one node to one peer costs one `recvmsg` and one
//! `sendmsg`, no crypto, one lookup of the source and one policy check.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tracing::{debug, info, warn};

use super::{lock, Shared};
use crate::keys::PublicKey;
use crate::relay_path::{
    bind_fields, bind_packet, bind_valid, fast_slot, set_fast_slot, slot, FAST_ACK, FAST_BIND,
    FAST_DATA, FAST_HEADER,
};

/// Receive buffers per `recvmmsg`.
const BATCH: usize = 16;
/// At most one bind acknowledgement per node this often.
const ACK_EVERY: Duration = Duration::from_millis(50);
/// STUN answers per source IP per second (and burst): nodes ask every few
/// seconds; the limit keeps the port from being a reflector.
const STUN_PER_IP_PER_SEC: u32 = 100;
/// A binding not refreshed for this long is not used (nodes bind every 5 s;
/// one whose UDP stopped passing gets its packets on its connection again).
const BIND_FRESH: Duration = Duration::from_secs(12);

/// A node's channel: its key and tags, the bind keys of its open connections
/// (a worker agent holds two: tunnels and the mesh; each derives its own), and
/// the UDP address it bound.
struct Chan {
    key: PublicKey,
    tags: Vec<String>,
    bind_keys: Vec<(u64, [u8; 32])>,
    addr: Option<SocketAddr>,
    bound_at: Option<Instant>,
    counter: u64,
    last_ack: Option<Instant>,
}

impl Chan {
    /// The bound address while the binding is fresh.
    fn fresh_addr(&self) -> Option<SocketAddr> {
        self.addr
            .filter(|_| self.bound_at.is_some_and(|t| t.elapsed() < BIND_FRESH))
    }

    /// The bind key a bind packet was made with, if any of this node's.
    fn key_of(&self, seg: &[u8]) -> Option<[u8; 32]> {
        self.bind_keys
            .iter()
            .map(|(_, k)| *k)
            .find(|k| bind_valid(k, seg))
    }
}

/// Every admitted node's channel, by slot and by bound address.
#[derive(Default)]
pub(super) struct Channels {
    by_slot: HashMap<u64, Chan>,
    by_addr: HashMap<SocketAddr, u64>,
}

impl Channels {
    /// A node was admitted on connection `conn_id`: it may bind with that
    /// connection's key (its binding, if any, stays).
    pub(super) fn register(
        &mut self,
        key: PublicKey,
        tags: Vec<String>,
        bind_key: [u8; 32],
        conn_id: u64,
    ) {
        let s = slot(&key);
        match self.by_slot.get_mut(&s) {
            Some(c) if c.key != key => {
                warn!(key = %key.short(), other = %c.key.short(), "fast relay slot taken by another key; this node uses QUIC datagrams");
            }
            Some(c) => {
                c.tags = tags;
                c.bind_keys.push((conn_id, bind_key));
            }
            None => {
                self.by_slot.insert(
                    s,
                    Chan {
                        key,
                        tags,
                        bind_keys: vec![(conn_id, bind_key)],
                        addr: None,
                        bound_at: None,
                        counter: 0,
                        last_ack: None,
                    },
                );
            }
        }
    }

    /// Connection `conn_id` of `key` ended: its bind key goes; the channel
    /// (and its binding) goes with the node's last connection.
    pub(super) fn unregister(&mut self, key: &PublicKey, conn_id: u64) {
        let s = slot(key);
        let Some(c) = self.by_slot.get_mut(&s).filter(|c| c.key == *key) else {
            return;
        };
        c.bind_keys.retain(|(id, _)| *id != conn_id);
        if c.bind_keys.is_empty() {
            if let Some(a) = c.addr {
                self.by_addr.remove(&a);
            }
            self.by_slot.remove(&s);
        }
    }
}

/// Sets the flag when dropped (the relay's run future ending or aborted).
pub(super) struct StopOnDrop(pub(super) Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Starts the UDP port's thread; it ends when `stop` is set or the relay is gone.
pub(super) fn spawn(
    shared: &Arc<Shared>,
    sock: std::net::UdpSocket,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let state = UdpSocketState::new((&sock).into())?;
    let weak = Arc::downgrade(shared);
    info!(
        addr = ?sock.local_addr().ok(),
        gro = state.gro_segments(),
        gso = state.max_gso_segments(),
        "STUN and fast relay path on UDP"
    );
    std::thread::Builder::new()
        .name("relay-udp".into())
        .spawn(move || serve(weak, sock, state, stop))?;
    Ok(())
}

fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn wait_readable(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    #[allow(unsafe_code)]
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0
}

fn serve(
    weak: Weak<Shared>,
    sock: std::net::UdpSocket,
    state: UdpSocketState,
    stop: Arc<AtomicBool>,
) {
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; 65535]).collect();
    let mut meta = [RecvMeta::default(); BATCH];
    let fd = sock.as_raw_fd();
    let mut stun_rate = crate::admission::RateLimiter::new(STUN_PER_IP_PER_SEC);
    let io = Io {
        sock: &sock,
        state: &state,
    };
    while !stop.load(Ordering::Relaxed) {
        let n = {
            let mut iovs: Vec<IoSliceMut<'_>> =
                bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
            match state.recv((&sock).into(), &mut iovs, &mut meta) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    wait_readable(fd, 200);
                    continue;
                }
                Err(e) => {
                    // ICMP errors from earlier sends surface here; keep serving.
                    debug!(error = %e, "relay UDP receive failed");
                    continue;
                }
            }
        };
        let Some(shared) = weak.upgrade() else { return };
        for (m, buf) in meta.iter().zip(bufs.iter_mut()).take(n) {
            let from = canonical(m.addr);
            let stride = m.stride.max(1);
            let data = &mut buf[..m.len];
            match data.first() {
                Some(&FAST_DATA) => forward(&shared, &io, from, data, stride),
                Some(&FAST_BIND) => {
                    for seg in data.chunks(stride) {
                        bind(&shared, &io, from, seg);
                    }
                }
                _ => {
                    for seg in data.chunks(stride) {
                        match crate::stun::answer(seg, from) {
                            Some(_) if !stun_rate.allow(from.ip(), Instant::now()) => {
                                shared.metrics.stun_dropped.inc();
                            }
                            Some(resp) => {
                                shared.metrics.stun_answered.inc();
                                io.send(from, &resp, None);
                            }
                            None => {
                                shared.metrics.stun_dropped.inc();
                            }
                        }
                    }
                }
            }
        }
    }
}

struct Io<'a> {
    sock: &'a std::net::UdpSocket,
    state: &'a UdpSocketState,
}

impl Io<'_> {
    /// Sends without waiting: a full socket buffer drops, as a router would.
    fn send(&self, to: SocketAddr, contents: &[u8], segment: Option<usize>) -> bool {
        let t = Transmit {
            destination: to,
            ecn: None,
            contents,
            segment_size: segment.filter(|s| *s < contents.len()),
            src_ip: None,
        };
        self.state.try_send(self.sock.into(), &t).is_ok()
    }
}

fn bind(shared: &Shared, io: &Io<'_>, from: SocketAddr, seg: &[u8]) {
    let m = &shared.metrics;
    let Some((s, counter)) = bind_fields(FAST_BIND, seg) else {
        m.datagrams_dropped.inc();
        return;
    };
    let mut t = shared.channels.write().unwrap_or_else(|p| p.into_inner());
    let Some(c) = t.by_slot.get_mut(&s) else {
        m.datagrams_dropped.inc();
        return;
    };
    let Some(bind_key) = c.key_of(seg).filter(|_| counter > c.counter) else {
        m.datagrams_dropped.inc();
        return;
    };
    c.counter = counter;
    c.bound_at = Some(Instant::now());
    let old = c.addr.replace(from);
    let ack = match c.last_ack {
        Some(at) if at.elapsed() < ACK_EVERY => None,
        _ => {
            c.last_ack = Some(Instant::now());
            Some(bind_packet(FAST_ACK, &bind_key, s, counter))
        }
    };
    if old != Some(from) {
        debug!(key = %c.key.short(), %from, "fast relay path bound");
        if let Some(o) = old {
            t.by_addr.remove(&o);
        }
        if let Some(prev) = t.by_addr.insert(from, s) {
            if prev != s {
                if let Some(pc) = t.by_slot.get_mut(&prev) {
                    pc.addr = None;
                }
            }
        }
    }
    drop(t);
    if let Some(a) = ack {
        io.send(from, &a, None);
    }
}

/// Forwards one GRO batch from `from`: each run of segments to the same peer
/// goes out as one GSO send with the source's slot in every header.
fn forward(shared: &Shared, io: &Io<'_>, from: SocketAddr, data: &mut [u8], stride: usize) {
    let m = &shared.metrics;
    let segments = data.len().div_ceil(stride);
    let t = shared.channels.read().unwrap_or_else(|p| p.into_inner());
    let src = t
        .by_addr
        .get(&from)
        .and_then(|s| t.by_slot.get(s).map(|c| (*s, c)));
    let Some((src_slot, src)) = src else {
        m.datagrams_dropped.inc_by(segments as u64);
        return;
    };
    // Decisions for the destinations seen in this batch: its bound UDP address, or
    // (not bound: UDP blocked on its side, or not acknowledged yet) its connection,
    // or (homed on another relay of the fleet) that relay's link and its key.
    type Decision = (
        Option<SocketAddr>,
        Option<crate::transport::Connection>,
        Option<PublicKey>,
    );
    let mut last: Option<(u64, Decision)> = None;
    let mut run: Option<(usize, usize, SocketAddr)> = None; // start, end, to
    let mut start = 0;
    while start < data.len() {
        let end = (start + stride).min(data.len());
        let seg = &mut data[start..end];
        let (to, conn, fwd) = match fast_slot(seg) {
            None => (None, None, None),
            Some(dst) => match &last {
                Some((d, decided)) if *d == dst => decided.clone(),
                _ => {
                    let decided: Decision = match t.by_slot.get(&dst) {
                        Some(c) => lock(&shared.routes)
                            .datagram_route(
                                &src.key,
                                &src.tags,
                                &c.key,
                                &shared.policies().mesh_acl,
                            )
                            .map(|route| match c.fresh_addr() {
                                Some(a) => (Some(a), None, None),
                                None => (None, Some(route), None),
                            })
                            .unwrap_or((None, None, None)),
                        None => {
                            let far = lock(&shared.routes).remote_slot(dst);
                            far.and_then(|k| {
                                super::remote_hop(shared, &src.tags, &k)
                                    .map(|l| (None, Some(l), Some(k)))
                            })
                            .unwrap_or((None, None, None))
                        }
                    };
                    last = Some((dst, decided.clone()));
                    decided
                }
            },
        };
        if let (None, Some(conn)) = (to, conn) {
            if let Some((s, e, rto)) = run.take() {
                io.send(rto, &data[s..e], Some(stride));
            }
            let packet = &data[start + FAST_HEADER.min(end - start)..end];
            let framed = match &fwd {
                Some(dst) => crate::relay_path::encode_forward(&src.key, dst, packet),
                None => crate::relay_path::encode(&src.key, packet),
            };
            match conn.send_datagram(framed) {
                Ok(()) => {
                    m.datagrams_relayed.inc();
                    m.datagram_bytes.inc_by(packet.len() as u64);
                    if fwd.is_some() {
                        m.fleet_forwarded.inc();
                    }
                }
                Err(_) => {
                    m.datagrams_dropped.inc();
                }
            }
            start = end;
            continue;
        }
        match to {
            Some(to) => {
                set_fast_slot(seg, src_slot);
                m.datagrams_relayed.inc();
                m.fast_relayed.inc();
                m.datagram_bytes
                    .inc_by((seg.len() - FAST_HEADER.min(seg.len())) as u64);
                run = match run {
                    // Extends the run only while every segment but the last is full size.
                    Some((s, e, rto)) if rto == to && (e - s) % stride == 0 => Some((s, end, rto)),
                    Some((s, e, rto)) => {
                        io.send(rto, &data[s..e], Some(stride));
                        Some((start, end, to))
                    }
                    None => Some((start, end, to)),
                };
            }
            None => {
                m.datagrams_dropped.inc();
                if let Some((s, e, rto)) = run.take() {
                    io.send(rto, &data[s..e], Some(stride));
                }
            }
        }
        start = end;
    }
    drop(t);
    if let Some((s, e, rto)) = run {
        io.send(rto, &data[s..e], Some(stride));
    }
}
