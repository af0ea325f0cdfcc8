//! Where the data path's datagrams go, and what a managed node adds to it.
//!
//! [`Net`] is what the data-path threads and tasks send through: a real UDP
//! endpoint goes to the WireGuard socket; a relay endpoint (see
//! [`crate::device::relay_endpoint`]) goes through the relay connection as a
//! QUIC datagram addressed to the peer's key. A static (`wg-quick` config)
//! node has no relay and behaves exactly as before.
//!
//! [`ManagedIo`] is the managed node's part of the data path: the packet
//! filter (ACL + connection tracking, [`PacketFilter`]), the channel that
//! hands disco and STUN datagrams to the control task, and the current
//! relay connection ([`RelaySlot`], replaced on every reconnect).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Mutex, RwLock};
use tunnel_relay::relay_path::{self, RelayPath};

use crate::device::{relay_index, Device};
use crate::filter::Conntrack;
use crate::key::PublicKey;
use crate::managed::overlay::Overlay;
use crate::udp::UdpIo;

/// The relay connection in use now (none while reconnecting).
#[derive(Default)]
pub struct RelaySlot {
    path: RwLock<Option<RelayPath>>,
    /// Datagrams that could not go through the relay (no connection, too large).
    pub dropped: AtomicU64,
    /// The fast relay path (plain UDP to the relay's UDP port), when bound.
    pub fast: FastPath,
}

/// Bind again this often while acknowledged (the relay keeps the binding
/// while the connection lives; this follows NAT rebinding).
const BIND_EVERY: Duration = Duration::from_secs(5);
/// Bind this often until the first acknowledgement.
const BIND_RETRY: Duration = Duration::from_millis(200);
/// The fast path is used while an acknowledgement is younger than this.
const ACK_FRESH: Duration = Duration::from_secs(12);

/// Where the fast path goes and how it proves the node owns its socket.
#[derive(Clone, Copy)]
struct FastTarget {
    addr: SocketAddr,
    own_slot: u64,
    bind_key: [u8; 32],
}

/// The node's end of the fast relay path (see `tunnel_relay::relay_path`):
/// relayed WireGuard packets go from the WireGuard socket to the relay's UDP
/// port with a 12-byte channel header, batched like direct traffic, once
/// the relay acknowledged a bind from this socket; QUIC datagrams otherwise.
pub struct FastPath {
    target: RwLock<Option<FastTarget>>,
    counter: AtomicU64,
    epoch: Instant,
    /// Milliseconds after `epoch` of the last valid acknowledgement (0: none).
    acked_ms: AtomicU64,
    last_bind_ms: AtomicU64,
    slots: RwLock<HashMap<u64, PublicKey>>,
    slots_built_ms: AtomicU64,
    /// Packets sent on the fast path.
    pub sent: AtomicU64,
    /// Packets received on the fast path.
    pub received: AtomicU64,
}

impl Default for FastPath {
    fn default() -> Self {
        FastPath {
            target: RwLock::new(None),
            counter: AtomicU64::new(0),
            epoch: Instant::now(),
            acked_ms: AtomicU64::new(0),
            last_bind_ms: AtomicU64::new(0),
            slots: RwLock::new(HashMap::new()),
            slots_built_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }
}

impl FastPath {
    fn now_ms(&self) -> u64 {
        // +1 so that 0 keeps meaning "never".
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Uses the relay's UDP port `addr` with a connection's bind key (or stops
    /// using the fast path: `None`). A new connection starts unacknowledged.
    pub fn set_target(&self, target: Option<(SocketAddr, PublicKey, [u8; 32])>) {
        let t = target.map(|(addr, own, bind_key)| FastTarget {
            addr,
            own_slot: relay_path::slot(&own),
            bind_key,
        });
        let mut cur = self.target.write();
        let same = match (&*cur, &t) {
            (Some(a), Some(b)) => a.addr == b.addr && a.bind_key == b.bind_key,
            (None, None) => true,
            _ => false,
        };
        if !same {
            *cur = t;
            self.acked_ms.store(0, Ordering::Relaxed);
            self.last_bind_ms.store(0, Ordering::Relaxed);
        }
    }

    /// The relay's UDP address while the fast path is acknowledged.
    pub fn active(&self) -> Option<SocketAddr> {
        let acked = self.acked_ms.load(Ordering::Relaxed);
        if acked == 0 || self.now_ms().saturating_sub(acked) > ACK_FRESH.as_millis() as u64 {
            return None;
        }
        self.target.read().map(|t| t.addr)
    }

    /// Sends a bind when one is due (called every ~200 ms by the control loop).
    pub fn tick(&self, udp: &UdpIo) {
        let Some(t) = *self.target.read() else { return };
        let now = self.now_ms();
        let every = if self.active().is_some() {
            BIND_EVERY
        } else {
            BIND_RETRY
        };
        let last = self.last_bind_ms.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < every.as_millis() as u64 {
            return;
        }
        self.last_bind_ms.store(now, Ordering::Relaxed);
        let counter = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let p = relay_path::bind_packet(relay_path::FAST_BIND, &t.bind_key, t.own_slot, counter);
        let _ = udp.try_send(t.addr, &p);
    }

    /// An acknowledgement arrived from `from`: valid ones turn the path on.
    pub fn on_ack(&self, from: SocketAddr, d: &[u8]) {
        let Some(t) = *self.target.read() else { return };
        let ours = relay_path::bind_fields(relay_path::FAST_ACK, d)
            .is_some_and(|(slot, _)| from == t.addr && slot == t.own_slot);
        if ours
            && relay_path::bind_valid(&t.bind_key, d)
            && self.acked_ms.swap(self.now_ms(), Ordering::Relaxed) == 0
        {
            tracing::info!(relay = %t.addr, "fast relay path up (UDP)");
        }
    }

    /// Whether `from` is the relay's UDP port (packets from elsewhere that
    /// look like fast-path packets are dropped).
    pub fn is_relay(&self, from: &SocketAddr) -> bool {
        self.target.read().is_some_and(|t| t.addr == *from)
    }

    /// The peer with this slot (rebuilt from the device at most once a second on a miss).
    pub fn peer_of(&self, device: &Device, slot: u64) -> Option<PublicKey> {
        if let Some(k) = self.slots.read().get(&slot) {
            return Some(*k);
        }
        let now = self.now_ms();
        let built = self.slots_built_ms.load(Ordering::Relaxed);
        if built != 0 && now.saturating_sub(built) < 1000 {
            return None;
        }
        self.slots_built_ms.store(now, Ordering::Relaxed);
        let map: HashMap<u64, PublicKey> = device
            .snapshot()
            .peers
            .iter()
            .map(|p| (relay_path::slot(&p.public_key), p.public_key))
            .collect();
        let k = map.get(&slot).copied();
        *self.slots.write() = map;
        k
    }

    /// Sends `buf` (segments of `segment` bytes) to `to`'s slot through the
    /// relay's UDP port, a header in front of each segment, in one GSO send.
    fn send(
        &self,
        udp: &UdpIo,
        relay: SocketAddr,
        to: &PublicKey,
        buf: &[u8],
        segment: Option<usize>,
        wait: bool,
    ) -> bool {
        let header = relay_path::fast_header(relay_path::slot(to));
        let seg = segment.unwrap_or(buf.len()).max(1);
        let n = buf.len().div_ceil(seg);
        FAST_BUF.with(|b| {
            let mut out = b.borrow_mut();
            out.clear();
            for d in buf.chunks(seg) {
                out.extend_from_slice(&header);
                out.extend_from_slice(d);
            }
            let segment = (n > 1).then_some(seg + relay_path::FAST_HEADER);
            let r = if wait {
                udp.send(relay, &out, segment)
            } else {
                udp.try_send(relay, &out)
            };
            if r.is_ok() {
                self.sent.fetch_add(n as u64, Ordering::Relaxed);
            }
            r.is_ok()
        })
    }
}

thread_local! {
    static FAST_BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(70_000));
}

impl RelaySlot {
    /// Installs (or clears) the relay connection.
    pub fn set(&self, p: Option<RelayPath>) {
        *self.path.write() = p;
    }

    /// The current connection.
    pub fn get(&self) -> Option<RelayPath> {
        self.path.read().clone()
    }

    fn send(&self, to: &PublicKey, bytes: &[u8]) {
        let sent = self.path.read().as_ref().map(|p| p.send(to, bytes).is_ok());
        if sent != Some(true) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The inbound packet filter: the coordinator's ACL for new flows, connection
/// tracking for replies (see [`crate::filter`]).
pub struct PacketFilter {
    ct: Mutex<Conntrack>,
    overlay: RwLock<Option<Arc<Overlay>>>,
    /// Packets dropped by the filter.
    pub dropped: AtomicU64,
}

impl Default for PacketFilter {
    fn default() -> Self {
        PacketFilter {
            ct: Mutex::new(Conntrack::default()),
            overlay: RwLock::new(None),
            dropped: AtomicU64::new(0),
        }
    }
}

impl PacketFilter {
    /// Uses a new overlay (peers and rules); tracked flows are forgotten when
    /// the rules changed, so a revoked permission does not live on.
    pub fn set_overlay(&self, o: Arc<Overlay>) {
        let mut cur = self.overlay.write();
        if cur.as_ref().is_some_and(|c| !c.same_rules(&o)) {
            self.ct.lock().clear();
        }
        *cur = Some(o);
    }

    /// Records a packet going into the tunnel.
    pub fn outbound(&self, packet: &[u8]) {
        self.ct.lock().outbound(Instant::now(), packet);
    }

    /// Whether a decrypted packet from a peer may reach the TUN device.
    pub fn inbound(&self, packet: &[u8]) -> bool {
        let overlay = self.overlay.read().clone();
        let Some(src) = crate::device::packet_source(packet) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        };
        let v = self
            .ct
            .lock()
            .inbound(Instant::now(), packet, |proto, port| {
                overlay
                    .as_ref()
                    .is_some_and(|o| o.allows_new(src, proto, port))
            });
        if !v.passes() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }
}

/// A datagram for the control task.
#[derive(Debug)]
pub enum CtlPacket {
    /// Disco or STUN from the UDP socket.
    Udp(SocketAddr, Vec<u8>),
    /// Disco through the relay, from this node.
    Relay(PublicKey, Vec<u8>),
}

/// The managed node's additions to the data path.
pub struct ManagedIo {
    /// Inbound filter.
    pub filter: PacketFilter,
    /// Disco/STUN datagrams to the control task (bounded: excess is dropped).
    pub ctl: tokio::sync::mpsc::Sender<CtlPacket>,
    /// The relay connection.
    pub relay: RelaySlot,
}

/// The data path's way out.
pub struct Net {
    /// The WireGuard socket.
    pub udp: Arc<UdpIo>,
    /// Managed mode only.
    pub managed: Option<Arc<ManagedIo>>,
}

impl Net {
    /// Sends `buf` to `to` (several datagrams of `segment` bytes when given):
    /// through the relay for relay endpoints, else on the UDP socket, waiting
    /// while its buffer is full.
    pub fn send(
        &self,
        device: &Device,
        to: SocketAddr,
        buf: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        if relay_index(&to).is_some() {
            self.via_relay(device, &to, buf, segment, true);
            return Ok(());
        }
        self.udp.send(to, buf, segment)
    }

    /// Like [`Net::send`] for one datagram, never waiting (timers, replies).
    pub fn try_send(&self, device: &Device, to: SocketAddr, buf: &[u8]) -> io::Result<()> {
        if relay_index(&to).is_some() {
            self.via_relay(device, &to, buf, None, false);
            return Ok(());
        }
        self.udp.try_send(to, buf)
    }

    fn via_relay(
        &self,
        device: &Device,
        to: &SocketAddr,
        buf: &[u8],
        segment: Option<usize>,
        wait: bool,
    ) {
        let (Some(m), Some(key)) = (self.managed.as_ref(), device.relay_peer(to)) else {
            return;
        };
        if let Some(relay) = m.relay.fast.active() {
            // One datagram at a time when not waiting (timers, replies): try_send sends no GSO.
            if wait || segment.is_none() {
                if m.relay
                    .fast
                    .send(&self.udp, relay, &key, buf, segment, wait)
                {
                    return;
                }
            } else {
                let mut all = true;
                for d in buf.chunks(segment.unwrap_or(buf.len()).max(1)) {
                    all &= m.relay.fast.send(&self.udp, relay, &key, d, None, false);
                }
                if all {
                    return;
                }
            }
        }
        for d in buf.chunks(segment.unwrap_or(buf.len()).max(1)) {
            m.relay.send(&key, d);
        }
    }
}
