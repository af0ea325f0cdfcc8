//! The device: our key, the peer table and the packet handlers, with no I/O.
//!
//! The TUN loop, the UDP loop, the timer task and the UAPI server (the
//! shells in `node`) share one [`Device`]. Readers take a cheap snapshot of
//! the peer table (`Arc` clone) per batch; the UAPI builds a new table and
//! swaps it in, so configuration changes never stall the data path.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use boringtun::noise::handshake::parse_handshake_anon;
use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Packet, TunnResult};
use ipnet::IpNet;
use parking_lot::{Mutex, RwLock};

use crate::allowed_ips::AllowedIps;
use crate::config::WgConfig;
use crate::key::{PrivateKey, PublicKey};
use crate::peer::{Decap, Encap, Peer, PeerState};
use crate::uapi::codec::{DeviceInfo, PeerChange, PeerInfo, SetRequest};

/// Handshake initiations per second, node-wide, before peers get cookie
/// replies instead of handshakes (wireguard-go and boringtun use the same).
pub const HANDSHAKE_RATE_LIMIT: u64 = 100;

/// The relay path as an endpoint. A peer reached through the relay gets
/// the synthetic endpoint `[100::INDEX]:0` (INDEX = our 24-bit session index
/// of that peer), in RFC 6666's discard-only prefix `100::/64` with port 0, so
/// it can never be a real UDP destination. This keeps the data path's one
/// endpoint type (`SocketAddr`): the shell sends datagrams addressed to such
/// an endpoint through the relay to the peer's key ([`Device::relay_peer`]),
/// and packets that arrive through the relay enter [`Device::handle_datagram`]
/// with that endpoint as their source ([`Device::relay_source`]).
pub fn relay_endpoint(index: u32) -> SocketAddr {
    let ip = Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, (index >> 16) as u16, index as u16);
    SocketAddr::new(IpAddr::V6(ip), 0)
}

/// The peer index of a relay endpoint, or `None` for a real UDP address.
pub fn relay_index(addr: &SocketAddr) -> Option<u32> {
    match addr {
        SocketAddr::V6(a) if a.port() == 0 => {
            let s = a.ip().segments();
            (s[..6] == [0x100, 0, 0, 0, 0, 0]).then(|| (u32::from(s[6]) << 16) | u32::from(s[7]))
        }
        _ => None,
    }
}

/// Node identity: our static key pair and the rate limiter bound to it.
pub struct Identity {
    pub private_key: PrivateKey,
    pub public_key: PublicKey,
    secret: boringtun::x25519::StaticSecret,
    public: boringtun::x25519::PublicKey,
    pub rate_limiter: Arc<RateLimiter>,
}

impl Identity {
    fn new(private_key: PrivateKey) -> Identity {
        let public_key = private_key.public_key();
        let secret = private_key.to_static_secret();
        let public = crate::key::to_x25519(&public_key);
        let rate_limiter = Arc::new(RateLimiter::new(&public, HANDSHAKE_RATE_LIMIT));
        Identity {
            private_key,
            public_key,
            secret,
            public,
            rate_limiter,
        }
    }
}

/// An immutable view of the configuration, swapped as a whole on change.
#[derive(Clone)]
pub struct Snapshot {
    pub identity: Option<Arc<Identity>>,
    pub peers: Vec<Arc<Peer>>,
    by_key: HashMap<PublicKey, Arc<Peer>>,
    by_index: HashMap<u32, Arc<Peer>>,
    routes: AllowedIps<Arc<Peer>>,
}

impl Snapshot {
    fn empty() -> Snapshot {
        Snapshot {
            identity: None,
            peers: Vec::new(),
            by_key: HashMap::new(),
            by_index: HashMap::new(),
            routes: AllowedIps::new(),
        }
    }

    /// The peer whose AllowedIPs hold `dst` (cryptokey routing, outbound).
    pub fn route(&self, dst: IpAddr) -> Option<&Arc<Peer>> {
        self.routes.lookup(dst)
    }

    /// The peer with this public key.
    pub fn peer(&self, key: &PublicKey) -> Option<&Arc<Peer>> {
        self.by_key.get(key)
    }

    fn rebuild_indexes(&mut self) {
        self.by_key = self
            .peers
            .iter()
            .map(|p| (p.public_key, p.clone()))
            .collect();
        self.by_index = self.peers.iter().map(|p| (p.index, p.clone())).collect();
        let mut routes = AllowedIps::new();
        for p in &self.peers {
            for net in &p.lock().allowed_ips {
                routes.insert(*net, p.clone());
            }
        }
        self.routes = routes;
    }
}

/// Counters of dropped input, for logs and metrics.
#[derive(Default)]
pub struct Counters {
    pub rx_invalid: AtomicU64,
    pub rx_unknown_peer: AtomicU64,
    pub rx_bad_source: AtomicU64,
    pub cookies_sent: AtomicU64,
    pub tx_no_route: AtomicU64,
    pub tx_no_endpoint: AtomicU64,
}

/// A packet the handlers want sent to the network outside the data batch
/// (handshake messages, cookies, queued packets flushed after a handshake).
#[derive(Debug)]
pub struct Outgoing {
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
}

/// What the UAPI changed in routing, so the shell can update kernel routes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteDiff {
    pub added: Vec<IpNet>,
    pub removed: Vec<IpNet>,
}

/// Errors applying a configuration change.
#[derive(Debug, thiserror::Error)]
pub enum SetError {
    #[error("interface has no private key; set one before adding peers")]
    NoPrivateKey,
}

/// The WireGuard device state shared by all loops.
pub struct Device {
    snapshot: RwLock<Arc<Snapshot>>,
    /// Serialises writers (UAPI set), so read-modify-swap is atomic.
    write: Mutex<()>,
    next_index: AtomicU32,
    /// The port the UDP socket is bound to (the shell rebinds the socket on
    /// a UAPI `listen_port` and then records the new port here).
    listen_port: AtomicU16,
    pub fwmark: AtomicU32,
    pub counters: Counters,
    /// WireGuard's endpoint learning (an authenticated packet from a new
    /// address moves the peer's endpoint there). On for static configs; off
    /// in managed mode, where path selection owns every endpoint.
    roaming: AtomicBool,
}

impl Device {
    /// A device from a parsed wg-quick config. `listen_port` is the port the
    /// UDP socket actually bound (the config's, or an ephemeral one).
    pub fn new(config: &WgConfig, listen_port: u16) -> Result<Device, SetError> {
        let device = Device {
            snapshot: RwLock::new(Arc::new(Snapshot::empty())),
            write: Mutex::new(()),
            next_index: AtomicU32::new(rand::random::<u32>() & 0x00ff_ffff),
            listen_port: AtomicU16::new(listen_port),
            fwmark: AtomicU32::new(config.interface.fwmark.unwrap_or(0)),
            counters: Counters::default(),
            roaming: AtomicBool::new(true),
        };
        let request = SetRequest {
            private_key: Some(Some(config.interface.private_key.clone())),
            listen_port: None,
            fwmark: None,
            replace_peers: true,
            peers: config
                .peers
                .iter()
                .map(|p| PeerChange {
                    public_key: p.public_key,
                    remove: false,
                    update_only: false,
                    preshared_key: p.preshared_key.clone().map(Some),
                    endpoint: None,
                    persistent_keepalive: p.persistent_keepalive,
                    replace_allowed_ips: true,
                    allowed_ips: p.allowed_ips.clone(),
                })
                .collect(),
        };
        device.apply(request)?;
        Ok(device)
    }

    /// The current configuration snapshot (cheap: one `Arc` clone).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().clone()
    }

    fn alloc_index(&self, snap: &Snapshot) -> u32 {
        loop {
            let i = self.next_index.fetch_add(1, Ordering::Relaxed) & 0x00ff_ffff;
            if !snap.by_index.contains_key(&i) {
                return i;
            }
        }
    }

    /// Turns WireGuard endpoint learning on or off (see the field).
    pub fn set_roaming(&self, on: bool) {
        self.roaming.store(on, Ordering::Relaxed);
    }

    /// Sends this peer's traffic through the relay from now on.
    pub fn set_relay_path(&self, key: &PublicKey) {
        if let Some(p) = self.snapshot().peer(key) {
            p.lock().endpoint = Some(relay_endpoint(p.index));
        }
    }

    /// The source endpoint to hand to [`Device::handle_datagram`] for a
    /// packet the relay delivered from `key`; `None` for an unknown peer.
    pub fn relay_source(&self, key: &PublicKey) -> Option<SocketAddr> {
        self.snapshot().peer(key).map(|p| relay_endpoint(p.index))
    }

    /// The peer a relay endpoint stands for (where the shell sends it).
    pub fn relay_peer(&self, addr: &SocketAddr) -> Option<PublicKey> {
        let i = relay_index(addr)?;
        self.snapshot().by_index.get(&i).map(|p| p.public_key)
    }

    /// Where the last authenticated packet of `key` came from.
    pub fn last_source(&self, key: &PublicKey) -> Option<SocketAddr> {
        self.snapshot().peer(key).and_then(|p| p.lock().last_src)
    }

    /// Sets a peer's endpoint (from the config's resolved Endpoint, or `wg set`).
    pub fn set_endpoint(&self, key: &PublicKey, endpoint: SocketAddr) {
        if let Some(p) = self.snapshot().peer(key) {
            p.lock().endpoint = Some(endpoint);
        }
    }

    /// Applies a UAPI `set` (also used for the initial config). Returns the
    /// change in AllowedIPs so the caller can update kernel routes. A
    /// `listen_port` is the caller's: it owns the socket, rebinds it first and
    /// then calls [`Device::set_listen_port`].
    pub fn apply(&self, req: SetRequest) -> Result<RouteDiff, SetError> {
        let _w = self.write.lock();
        let old = self.snapshot();
        let before: Vec<IpNet> = all_allowed_ips(&old);
        let mut snap = (*old).clone();

        if let Some(mark) = req.fwmark {
            self.fwmark.store(mark, Ordering::Relaxed);
        }
        if let Some(key) = req.private_key {
            match key {
                Some(k) => {
                    let changed = snap
                        .identity
                        .as_ref()
                        .map(|i| i.private_key != k)
                        .unwrap_or(true);
                    if changed {
                        let id = Arc::new(Identity::new(k));
                        // A peer with our own public key is removed, as in wireguard-go.
                        snap.peers.retain(|p| p.public_key != id.public_key);
                        for p in &snap.peers {
                            p.lock().rebuild(
                                &id.private_key,
                                &p.public_key,
                                p.index,
                                id.rate_limiter.clone(),
                            );
                        }
                        snap.identity = Some(id);
                    }
                }
                None => snap.identity = None,
            }
        }
        if req.replace_peers {
            snap.peers.clear();
            snap.by_index.clear();
        }
        for change in req.peers {
            self.apply_peer(&mut snap, change)?;
            snap.by_index = snap.peers.iter().map(|p| (p.index, p.clone())).collect();
        }
        snap.rebuild_indexes();
        let after = all_allowed_ips(&snap);
        *self.snapshot.write() = Arc::new(snap);
        Ok(RouteDiff {
            added: after
                .iter()
                .filter(|n| !before.contains(n))
                .copied()
                .collect(),
            removed: before
                .iter()
                .filter(|n| !after.contains(n))
                .copied()
                .collect(),
        })
    }

    fn apply_peer(&self, snap: &mut Snapshot, c: PeerChange) -> Result<(), SetError> {
        let pos = snap.peers.iter().position(|p| p.public_key == c.public_key);
        if c.remove {
            if let Some(i) = pos {
                snap.peers.remove(i);
            }
            return Ok(());
        }
        let id = snap.identity.clone().ok_or(SetError::NoPrivateKey)?;
        if c.public_key == id.public_key {
            return Ok(()); // wireguard-go ignores a peer that is ourselves
        }
        let peer = match pos {
            Some(i) => snap.peers[i].clone(),
            None if c.update_only => return Ok(()),
            None => {
                let index = self.alloc_index(snap);
                let p = Arc::new(Peer::new(
                    &id.private_key,
                    c.public_key,
                    index,
                    c.preshared_key.clone().flatten(),
                    c.persistent_keepalive,
                    id.rate_limiter.clone(),
                ));
                snap.peers.push(p.clone());
                p
            }
        };
        let mut st = peer.lock();
        let mut rebuild = false;
        if let Some(psk) = c.preshared_key {
            if st.preshared_key != psk {
                st.preshared_key = psk;
                rebuild = pos.is_some();
            }
        }
        if let Some(ka) = c.persistent_keepalive {
            let ka = Some(ka).filter(|k| *k > 0);
            if st.keepalive != ka {
                st.keepalive = ka;
                rebuild = pos.is_some();
            }
        }
        if rebuild {
            st.rebuild(
                &id.private_key,
                &peer.public_key,
                peer.index,
                id.rate_limiter.clone(),
            );
        }
        if let Some(ep) = c.endpoint {
            st.endpoint = Some(ep);
        }
        if c.replace_allowed_ips {
            st.allowed_ips.clear();
        }
        for net in c.allowed_ips {
            let net = net.trunc();
            if !st.allowed_ips.contains(&net) {
                st.allowed_ips.push(net);
            }
        }
        drop(st);
        // An AllowedIP belongs to one peer: taking it removes it from others.
        let mine: Vec<IpNet> = peer.lock().allowed_ips.clone();
        for other in snap.peers.iter().filter(|p| p.index != peer.index) {
            other.lock().allowed_ips.retain(|n| !mine.contains(n));
        }
        Ok(())
    }

    /// Every peer's AllowedIPs.
    pub fn allowed_ips(&self) -> Vec<IpNet> {
        all_allowed_ips(&self.snapshot())
    }

    /// The port the UDP socket is bound to.
    pub fn listen_port(&self) -> u16 {
        self.listen_port.load(Ordering::Relaxed)
    }

    /// Records the port the UDP socket was rebound to.
    pub fn set_listen_port(&self, port: u16) {
        self.listen_port.store(port, Ordering::Relaxed);
    }

    /// The device as the UAPI `get` and `mesh status` report it.
    pub fn info(&self, now: SystemTime) -> DeviceInfo {
        let snap = self.snapshot();
        DeviceInfo {
            private_key: snap.identity.as_ref().map(|i| i.private_key.clone()),
            listen_port: self.listen_port(),
            fwmark: Some(self.fwmark.load(Ordering::Relaxed)).filter(|m| *m != 0),
            peers: snap
                .peers
                .iter()
                .map(|p| {
                    let st = p.lock();
                    let (rx_bytes, tx_bytes) = st.transfer();
                    PeerInfo {
                        public_key: p.public_key,
                        preshared_key: st.preshared_key.clone(),
                        endpoint: st.endpoint,
                        last_handshake: st
                            .last_handshake(now)
                            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok()),
                        rx_bytes,
                        tx_bytes,
                        persistent_keepalive: st.keepalive,
                        allowed_ips: st.allowed_ips.clone(),
                    }
                })
                .collect(),
        }
    }

    /// Encrypts one outbound IP packet for the peer that owns its destination.
    /// Returns the endpoint and what was written to `dst`, or `None` if the
    /// packet was dropped (no route, no endpoint) or queued.
    pub fn encapsulate(
        &self,
        peer: &Peer,
        packet: &[u8],
        dst: &mut [u8],
    ) -> Option<(SocketAddr, Encap)> {
        let mut st = peer.lock();
        let Some(ep) = st.endpoint else {
            self.counters.tx_no_endpoint.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match st.encapsulate(packet, dst) {
            Encap::Queued => None,
            e => Some((ep, e)),
        }
    }

    /// Handles one datagram from the network. A decrypted IP packet is left
    /// at the start of `dst` and its length returned; replies (handshake
    /// responses, cookies, flushed queued packets) are pushed to `out`.
    pub fn handle_datagram(
        &self,
        snap: &Snapshot,
        src: SocketAddr,
        datagram: &[u8],
        dst: &mut [u8],
        out: &mut Vec<Outgoing>,
    ) -> Option<usize> {
        let id = snap.identity.as_ref()?;
        let peer = match datagram.first() {
            Some(1) => self.find_initiator(id, src, datagram, dst, out)?,
            // Response: receiver index at 8..12; cookie and data: at 4..8.
            Some(2) => self.by_receiver(snap, datagram.get(8..12))?,
            Some(3) | Some(4) => self.by_receiver(snap, datagram.get(4..8))?,
            _ => {
                self.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        let mut st = peer.lock();
        match st.decapsulate(Some(src), datagram, dst) {
            Decap::Tunnel(len) => {
                // Cryptokey routing: the inner source must be one of the peer's AllowedIPs.
                let inner_src = packet_source(&dst[..len]);
                let ok = inner_src
                    .and_then(|a| snap.route(a))
                    .is_some_and(|p| p.index == peer.index);
                if !ok {
                    self.counters.rx_bad_source.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                st.last_src = Some(src);
                self.roam(&mut st.endpoint, src, &peer);
                Some(len)
            }
            Decap::Network(len) => {
                if datagram.first() != Some(&3) {
                    st.last_src = Some(src);
                    self.roam(&mut st.endpoint, src, &peer);
                }
                let to = st.endpoint.unwrap_or(src);
                out.push(Outgoing {
                    to,
                    bytes: dst[..len].to_vec(),
                });
                // Flush packets queued while the handshake was in flight.
                while let Decap::Network(len) = st.decapsulate(None, &[], dst) {
                    out.push(Outgoing {
                        to,
                        bytes: dst[..len].to_vec(),
                    });
                }
                None
            }
            Decap::Done => {
                if datagram.first() == Some(&4) {
                    st.last_src = Some(src);
                    self.roam(&mut st.endpoint, src, &peer); // authenticated keepalive
                }
                None
            }
            Decap::Error(e) => {
                tracing::trace!(peer = %peer.public_key.short(), %src, error = ?e, "datagram rejected");
                self.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn by_receiver(&self, snap: &Snapshot, idx: Option<&[u8]>) -> Option<Arc<Peer>> {
        let idx = idx
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes);
        self.known(idx.and_then(|i| snap.by_index.get(&(i >> 8))).cloned())
    }

    /// Passes `peer` through, counting a datagram from an unknown one.
    #[inline]
    fn known(&self, peer: Option<Arc<Peer>>) -> Option<Arc<Peer>> {
        if peer.is_none() {
            self.counters
                .rx_unknown_peer
                .fetch_add(1, Ordering::Relaxed);
        }
        peer
    }

    /// Finds the peer a handshake initiation comes from. Checks mac1 and the
    /// node-wide rate limit first (under load, a cookie reply goes back to
    /// `src` instead), so forged initiations cost a hash, not a DH.
    fn find_initiator(
        &self,
        id: &Identity,
        src: SocketAddr,
        datagram: &[u8],
        dst: &mut [u8],
        out: &mut Vec<Outgoing>,
    ) -> Option<Arc<Peer>> {
        let half = match id.rate_limiter.verify_packet(Some(src.ip()), datagram, dst) {
            Ok(Packet::HandshakeInit(init)) => parse_handshake_anon(&id.secret, &id.public, &init),
            Ok(_) => return None,
            Err(TunnResult::WriteToNetwork(cookie)) => {
                self.counters.cookies_sent.fetch_add(1, Ordering::Relaxed);
                out.push(Outgoing {
                    to: src,
                    bytes: cookie.to_vec(),
                });
                return None;
            }
            Err(_) => {
                self.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        self.known(half.ok().and_then(|h| {
            self.snapshot()
                .peer(&PublicKey::from_bytes(h.peer_static_public))
                .cloned()
        }))
    }

    /// Drives every peer's timers; returns the packets to send.
    pub fn tick(&self, buf: &mut [u8]) -> Vec<Outgoing> {
        self.each_peer_sends(buf, |st, buf| {
            let len = st.update_timers(buf)?;
            Some((st.endpoint?, len))
        })
    }

    /// Handshakes with every peer that has a persistent keepalive and an
    /// endpoint, as wireguard-go does on start: a peer behind NAT becomes
    /// reachable at once instead of after its first keepalive.
    pub fn initiate_keepalive_peers(&self, buf: &mut [u8]) -> Vec<Outgoing> {
        self.each_peer_sends(buf, |st, buf| {
            let to = st
                .endpoint
                .filter(|_| st.keepalive.is_some() && st.handshake_age().is_none())?;
            Some((to, st.initiate_handshake(buf)?))
        })
    }

    /// Runs `f` on every peer's state in turn; each `Some((to, len))` it
    /// returns is sent as `buf[..len]` to `to`.
    fn each_peer_sends(
        &self,
        buf: &mut [u8],
        mut f: impl FnMut(&mut PeerState, &mut [u8]) -> Option<(SocketAddr, usize)>,
    ) -> Vec<Outgoing> {
        let snap = self.snapshot();
        let mut out = Vec::new();
        for p in &snap.peers {
            if let Some((to, len)) = f(&mut p.lock(), buf) {
                out.push(Outgoing {
                    to,
                    bytes: buf[..len].to_vec(),
                });
            }
        }
        out
    }

    /// Resets the handshake rate limiter (called every second).
    pub fn reset_rate_limiter(&self) {
        if let Some(id) = &self.snapshot().identity {
            id.rate_limiter.reset_count();
        }
    }
}

impl Device {
    fn roam(&self, endpoint: &mut Option<SocketAddr>, src: SocketAddr, peer: &Peer) {
        if *endpoint != Some(src) && (endpoint.is_none() || self.roaming.load(Ordering::Relaxed)) {
            tracing::info!(peer = %peer.public_key.short(), from = ?endpoint, to = %src, "peer endpoint changed");
            *endpoint = Some(src);
        }
    }
}

fn all_allowed_ips(snap: &Snapshot) -> Vec<IpNet> {
    snap.peers
        .iter()
        .flat_map(|p| p.lock().allowed_ips.clone())
        .collect()
}

/// Destination address of an IPv4 or IPv6 packet.
pub fn packet_destination(packet: &[u8]) -> Option<IpAddr> {
    packet_address(packet, 16, 24)
}

/// Source address of an IPv4 or IPv6 packet.
pub fn packet_source(packet: &[u8]) -> Option<IpAddr> {
    packet_address(packet, 12, 8)
}

/// The address at byte `v4` of an IPv4 header or at byte `v6` of an IPv6 one.
#[inline]
fn packet_address(packet: &[u8], v4: usize, v6: usize) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => <[u8; 4]>::try_from(packet.get(v4..v4 + 4)?)
            .ok()
            .map(IpAddr::from),
        6 => <[u8; 16]>::try_from(packet.get(v6..v6 + 16)?)
            .ok()
            .map(IpAddr::from),
        _ => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! Two devices wired back to back through function calls: a simulated
    //! network with no sockets, deterministic and fast.
    use super::*;

    struct Node {
        dev: Device,
        addr: SocketAddr,
    }

    fn pair() -> (Node, Node) {
        let ka = PrivateKey::generate();
        let kb = PrivateKey::generate();
        let conf = |me: &PrivateKey, peer: &PrivateKey, peer_ip: &str| {
            format!(
                "[Interface]\nPrivateKey = {}\nAddress = 100.64.0.9/32\n[Peer]\nPublicKey = {}\nAllowedIPs = {peer_ip}/32, fd00::{}/128\n",
                me.to_base64(),
                peer.public_key().to_base64(),
                if peer_ip.ends_with('1') { 1 } else { 2 },
            )
        };
        let ca = crate::config::parse(&conf(&ka, &kb, "100.64.0.2"), "a.conf").unwrap();
        let cb = crate::config::parse(&conf(&kb, &ka, "100.64.0.1"), "b.conf").unwrap();
        let a = Node {
            dev: Device::new(&ca, 51820).unwrap(),
            addr: "203.0.113.1:51820".parse().unwrap(),
        };
        let b = Node {
            dev: Device::new(&cb, 51820).unwrap(),
            addr: "203.0.113.2:51820".parse().unwrap(),
        };
        a.dev.set_endpoint(&kb.public_key(), b.addr);
        b.dev.set_endpoint(&ka.public_key(), a.addr);
        (a, b)
    }

    /// A minimal IPv4 packet from `src` to `dst` with `payload`.
    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        let len = (20 + payload.len()) as u16;
        p[2..4].copy_from_slice(&len.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    /// The peer `from` routes `packet` to.
    fn route(from: &Node, packet: &[u8]) -> Arc<Peer> {
        let snap = from.dev.snapshot();
        snap.route(packet_destination(packet).unwrap())
            .unwrap()
            .clone()
    }

    /// Hands one datagram from `src` to `node`: the packet it delivers to
    /// its TUN device, if any, and the replies it sends.
    fn receive(node: &Node, src: SocketAddr, datagram: &[u8]) -> (Option<Vec<u8>>, Vec<Outgoing>) {
        let snap = node.dev.snapshot();
        let mut out = Vec::new();
        let mut dst = vec![0u8; 2048];
        let tun = node
            .dev
            .handle_datagram(&snap, src, datagram, &mut dst, &mut out)
            .map(|len| dst[..len].to_vec());
        (tun, out)
    }

    /// Sends `packet` from `from` into the network, runs the exchange to
    /// completion and returns what reached `to`'s TUN device.
    fn deliver(from: &Node, to: &Node, from_addr: SocketAddr, packet: &[u8]) -> Vec<Vec<u8>> {
        let peer = route(from, packet);
        let mut buf = vec![0u8; 2048];
        let mut wire: Vec<(bool, SocketAddr, Vec<u8>)> = Vec::new(); // (to `to`?, src, bytes)
        if let Some((_, Encap::Data(l) | Encap::Handshake(l))) =
            from.dev.encapsulate(&peer, packet, &mut buf)
        {
            wire.push((true, from_addr, buf[..l].to_vec()));
        }
        let mut delivered = Vec::new();
        while let Some((to_dst, src, bytes)) = wire.pop() {
            let (node, reply_src) = if to_dst {
                (to, to.addr)
            } else {
                (from, from_addr)
            };
            let (tun, out) = receive(node, src, &bytes);
            if to_dst {
                delivered.extend(tun);
            }
            for o in out {
                wire.push((!to_dst, reply_src, o.bytes));
            }
        }
        delivered
    }

    #[test]
    fn handshake_then_data_both_ways() {
        let (a, b) = pair();
        let p = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"hello");
        assert_eq!(deliver(&a, &b, a.addr, &p), vec![p.clone()]);
        let q = ipv4([100, 64, 0, 2], [100, 64, 0, 1], b"world");
        assert_eq!(deliver(&b, &a, b.addr, &q), vec![q.clone()]);
        let info = a.dev.info(SystemTime::now());
        assert!(info.peers[0].last_handshake.is_some());
        assert!(info.peers[0].tx_bytes > 0 && info.peers[0].rx_bytes > 0);
    }

    #[test]
    fn relay_endpoints_are_synthetic_and_round_trip() {
        for i in [0u32, 1, 0x00ab_cdef, 0x00ff_ffff] {
            let e = relay_endpoint(i);
            assert_eq!(relay_index(&e), Some(i));
            assert_eq!(e.port(), 0);
        }
        for real in [
            "203.0.113.1:51820",
            "[fd00::1]:51820",
            "[100::5]:51820",
            "[101::5]:0",
        ] {
            assert_eq!(relay_index(&real.parse().unwrap()), None, "{real}");
        }
    }

    /// Runs `packet` from `from` to `to` with both sides' endpoints on the
    /// relay: what `from` sends to a relay endpoint is delivered to `to` as
    /// coming from `to`'s relay endpoint for `from` (what the shell does with
    /// the relay's QUIC datagrams). Returns what reached `to`'s TUN.
    fn deliver_via_relay(from: &Node, to: &Node, packet: &[u8]) -> Vec<Vec<u8>> {
        let key = |n: &Node| n.dev.snapshot().identity.as_ref().unwrap().public_key;
        let peer = route(from, packet);
        let mut buf = vec![0u8; 2048];
        // (receiver is `to`?, bytes): every hop goes through the relay.
        let mut wire: Vec<(bool, Vec<u8>)> = Vec::new();
        match from.dev.encapsulate(&peer, packet, &mut buf) {
            Some((ep, Encap::Data(l) | Encap::Handshake(l))) => {
                assert_eq!(
                    from.dev.relay_peer(&ep),
                    Some(key(to)),
                    "not sent via relay"
                );
                wire.push((true, buf[..l].to_vec()));
            }
            other => panic!("nothing sent: {other:?}"),
        }
        let mut delivered = Vec::new();
        while let Some((to_dst, bytes)) = wire.pop() {
            let (node, sender) = if to_dst { (to, from) } else { (from, to) };
            let src = node.dev.relay_source(&key(sender)).unwrap();
            let (tun, out) = receive(node, src, &bytes);
            if let Some(packet) = tun {
                assert!(to_dst);
                delivered.push(packet);
            }
            for o in out {
                assert_eq!(
                    node.dev.relay_peer(&o.to),
                    Some(key(sender)),
                    "reply not via relay"
                );
                wire.push((!to_dst, o.bytes));
            }
        }
        delivered
    }

    #[test]
    fn relay_path_carries_handshake_and_data_and_path_is_owned_in_managed_mode() {
        let (a, b) = pair();
        let ka = a.dev.snapshot().identity.as_ref().unwrap().public_key;
        let kb = b.dev.snapshot().identity.as_ref().unwrap().public_key;
        for n in [&a, &b] {
            n.dev.set_roaming(false);
        }
        a.dev.set_relay_path(&kb);
        b.dev.set_relay_path(&ka);
        let p = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"via relay");
        assert_eq!(deliver_via_relay(&a, &b, &p), vec![p.clone()]);
        let q = ipv4([100, 64, 0, 2], [100, 64, 0, 1], b"back");
        assert_eq!(deliver_via_relay(&b, &a, &q), vec![q.clone()]);

        // Path selection moves b -> a to a direct path; a packet a receives
        // through the relay afterwards does not move it back (no roaming).
        b.dev.set_endpoint(&ka, a.addr);
        assert_eq!(deliver_via_relay(&a, &b, &p).len(), 1);
        let ep = b.dev.snapshot().peer(&ka).unwrap().lock().endpoint;
        assert_eq!(ep, Some(a.addr));
        // With roaming on (static configs), the relay source would have won.
        b.dev.set_roaming(true);
        assert_eq!(deliver_via_relay(&a, &b, &p).len(), 1);
        let ep = b.dev.snapshot().peer(&ka).unwrap().lock().endpoint;
        assert!(ep.and_then(|e| relay_index(&e)).is_some());
    }

    #[test]
    fn endpoint_roams_only_on_authenticated_packets() {
        let (a, b) = pair();
        let p = ipv4([100, 64, 0, 1], [100, 64, 0, 2], b"x");
        assert_eq!(deliver(&a, &b, a.addr, &p).len(), 1);
        let moved: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        // Garbage from a new address changes nothing.
        let snap = b.dev.snapshot();
        let mut out = Vec::new();
        let mut dst = vec![0u8; 2048];
        let mut junk = vec![4u8; 64];
        junk[4..8].copy_from_slice(&snap.peers[0].index.to_le_bytes());
        assert_eq!(
            b.dev
                .handle_datagram(&snap, moved, &junk, &mut dst, &mut out),
            None
        );
        assert_eq!(snap.peers[0].lock().endpoint, Some(a.addr));
        // A real packet from the new address moves the endpoint.
        assert_eq!(deliver(&a, &b, moved, &p).len(), 1);
        assert_eq!(snap.peers[0].lock().endpoint, Some(moved));
    }

    #[test]
    fn inner_source_must_be_an_allowed_ip_of_the_sender() {
        let (a, b) = pair();
        // 100.64.0.77 is not in a's AllowedIPs on b.
        let spoofed = ipv4([100, 64, 0, 77], [100, 64, 0, 2], b"x");
        assert!(deliver(&a, &b, a.addr, &spoofed).is_empty());
        assert!(b.dev.counters.rx_bad_source.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn random_datagrams_are_dropped_and_counted() {
        let (_, b) = pair();
        let snap = b.dev.snapshot();
        let mut out = Vec::new();
        let mut dst = vec![0u8; 4096];
        for i in 0..2000u32 {
            let len = (i as usize * 7) % 1500;
            let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
            assert_eq!(
                b.dev.handle_datagram(
                    &snap,
                    "192.0.2.1:9".parse().unwrap(),
                    &bytes,
                    &mut dst,
                    &mut out
                ),
                None
            );
        }
    }

    #[test]
    fn uapi_set_adds_and_removes_peers_and_reports_route_changes() {
        let (a, _) = pair();
        let k = PrivateKey::generate().public_key();
        let net: IpNet = "100.64.0.50/32".parse().unwrap();
        // A `set` that changes only this one peer.
        let set = |change: PeerChange| {
            a.dev
                .apply(SetRequest {
                    peers: vec![change],
                    ..SetRequest::default()
                })
                .unwrap()
        };
        let add = PeerChange {
            public_key: k,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: Some("203.0.113.9:1".parse().unwrap()),
            persistent_keepalive: Some(25),
            replace_allowed_ips: false,
            allowed_ips: vec![net],
        };
        let diff = set(add.clone());
        assert_eq!(diff.added, vec![net]);
        assert_eq!(a.dev.snapshot().route(net.addr()).unwrap().public_key, k);
        assert_eq!(a.dev.info(SystemTime::now()).peers.len(), 2);
        let diff = set(PeerChange {
            remove: true,
            endpoint: None,
            persistent_keepalive: None,
            allowed_ips: vec![],
            ..add
        });
        assert_eq!(diff.removed, vec![net]);
        assert!(a.dev.snapshot().route(net.addr()).is_none());
    }
}
