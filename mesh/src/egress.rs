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

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use tunnel_relay::relay_path::RelayPath;

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
            self.via_relay(device, &to, buf, segment);
            return Ok(());
        }
        self.udp.send(to, buf, segment)
    }

    /// Like [`Net::send`] for one datagram, never waiting (timers, replies).
    pub fn try_send(&self, device: &Device, to: SocketAddr, buf: &[u8]) -> io::Result<()> {
        if relay_index(&to).is_some() {
            self.via_relay(device, &to, buf, None);
            return Ok(());
        }
        self.udp.try_send(to, buf)
    }

    fn via_relay(&self, device: &Device, to: &SocketAddr, buf: &[u8], segment: Option<usize>) {
        let (Some(m), Some(key)) = (self.managed.as_ref(), device.relay_peer(to)) else {
            return;
        };
        for d in buf.chunks(segment.unwrap_or(buf.len()).max(1)) {
            m.relay.send(&key, d);
        }
    }
}
