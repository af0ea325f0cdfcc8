//! The managed node's I/O shell (`mesh up --token`): the control loop that
//! feeds the [`Controller`] and applies what it says, the relay receive
//! loop, MagicDNS, and the pool routes. The data-path threads are the same
//! as a static node's (see `node`), with [`ManagedIo`] plugged in.
//!
//! The control session to the coordinator is behind [`Session`], so this
//! loop does not care how the session reconnects; the data plane keeps its
//! peers and paths while the session is down (only new peer-map changes
//! wait for it).
//!
//! The loop also serves the local control socket (`crate::managed::control_socket`) for
//! `mesh status` and `mesh ping`: it publishes a [`ManagedStatus`] on a
//! `watch` channel after every change and once a second, and takes
//! `mesh ping` requests from a bounded channel; clients never hold it up.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ipnet::IpNet;
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot, watch};
use tun_rs::VIRTIO_NET_HDR_LEN;
use tunnel_relay::link::LinkState;
use tunnel_relay::relay_path::RelayPath;
use weft_proto::control::PeerPath;
use weft_proto::peermap::{Candidate, OverlayPools, PeerMap};

use crate::device::Outgoing;
use crate::dns::Names;
use crate::egress::{CtlPacket, ManagedIo};
use crate::key::PublicKey;
use crate::managed::control_socket::{PingCmd, PingOutcome};
use crate::managed::controller::{Controller, Counters, Out, Via};
use crate::node::Handles;
use crate::path::Path;
use crate::status::ManagedStatus;

/// Overlay MTU: the IPv6 minimum, so a packet fits a relay datagram (QUIC
/// over a 1500-byte path) and every direct path without fragmentation.
pub(crate) const MTU: u16 = 1280;

/// What the control loop needs from the coordinator session.
pub(crate) trait Session: Send + 'static {
    /// Waits for a change (peer map, relay connection); `false` when the
    /// session ended for good (revoked, shutdown).
    fn changed(&mut self) -> impl std::future::Future<Output = bool> + Send;
    /// The current peer map.
    fn peer_map(&self) -> PeerMap;
    /// The relay path of the current connection (none while reconnecting).
    fn relay_path(&self) -> Option<RelayPath>;
    /// The relay's STUN address.
    fn stun_addr(&self) -> Option<SocketAddr>;
    /// The fleet of relays as last measured (home, round trips); none for a
    /// relay alone.
    fn fleet(&self) -> Option<tunnel_relay::client::FleetView> {
        None
    }
    /// Reports our direct-path candidates.
    fn report_endpoints(&self, endpoints: Vec<Candidate>);
    /// Reports the peers we have a WireGuard session with and whether each runs direct
    /// (the relay's explorer shows the pairs); sessions that cannot carry it ignore it.
    fn report_paths(&self, _paths: Vec<PeerPath>) {}
    /// The relay link for `mesh status`.
    fn link(&self) -> LinkState;
    /// The overlay's address plan as the relay announced it (both prefixes
    /// are routed into the mesh; MagicDNS answers on its first host).
    fn pools(&self) -> Option<OverlayPools>;
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Outstanding `mesh ping` requests from the control socket.
#[derive(Default)]
struct Pings {
    waiting: std::collections::HashMap<u64, oneshot::Sender<PingOutcome>>,
    next_id: u64,
}

impl Pings {
    fn finish(&mut self, id: u64, outcome: PingOutcome) {
        if let Some(tx) = self.waiting.remove(&id) {
            let _ = tx.send(outcome);
        }
    }
}

/// IP addresses of this host's interfaces that peers might reach directly:
/// not loopback, not link-local, not the overlay's own, not on another
/// point-to-point tunnel.
pub(crate) fn local_ips(skip_interface: &str, pools: &OverlayPools) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return out;
    }
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name from getifaddrs.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        // Our own interface, and other tunnels (point-to-point: TUN devices, other
        // VPNs): a path through another tunnel is not a direct path.
        if name == skip_interface || ifa.ifa_flags & (libc::IFF_POINTOPOINT as u32) != 0 {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it states.
        let ip = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()))
                }
                libc::AF_INET6 => {
                    let sa = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sa.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        let Some(ip) = ip else { continue };
        let link_local = match ip {
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
            IpAddr::V4(v4) => v4.is_link_local(),
        };
        if ip.is_loopback() || link_local || pools.contains(ip) {
            continue;
        }
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    // SAFETY: the list from getifaddrs, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    out
}

/// Everything the control loop owns.
pub(crate) struct ControlLoop<S: Session> {
    /// The coordinator session.
    pub session: S,
    /// The state machine.
    pub ctl: Controller,
    /// Data-path parts.
    pub io: Arc<ManagedIo>,
    /// Disco/STUN datagrams from the data path.
    pub rx: mpsc::Receiver<CtlPacket>,
    /// The MagicDNS table.
    pub names: Arc<RwLock<Names>>,
    /// Interface name (skipped when listing local addresses).
    pub interface: String,
    /// Publishes every new overlay (peers, names, addresses) to whoever runs
    /// the node in-process (e.g. the worker agent maps overlay source
    /// addresses to peer names with it).
    pub overlay_tx: tokio::sync::watch::Sender<Option<Arc<crate::managed::overlay::Overlay>>>,
}

impl<S: Session> ControlLoop<S> {
    /// Runs until the session ends for good.
    pub(crate) async fn run(mut self, h: Handles) -> anyhow::Result<()> {
        let pools = self.session.pools().unwrap_or_else(|| {
            tracing::warn!("the relay announced no overlay pools; using the defaults");
            OverlayPools::default()
        });
        tracing::info!(ipv4_pool = %pools.v4, ipv6_prefix = %pools.v6, dns = %pools.dns_v4(), "overlay address plan from the relay");
        for net in [IpNet::V4(pools.v4), IpNet::V6(pools.v6)] {
            h.link.add_route(net).await?;
        }
        let _dns = serve_dns(&h, self.names.clone(), IpAddr::V4(pools.dns_v4())).await?;
        let ctl_path = crate::managed::control_socket::socket_path(&h.uapi_socket);
        let ctl_server = crate::managed::control_socket::Server::bind(&ctl_path)?;
        let (status_tx, status_rx) = watch::channel(Arc::new(self.status(&h)));
        let (ping_tx, mut ping_rx) = mpsc::channel::<PingCmd>(64);
        // Aborted when this loop ends or is dropped (node shutdown): the
        // server's drop removes the socket file.
        let _ctl_task = AbortOnDrop(tokio::spawn(ctl_server.serve(
            status_rx,
            Some(h.device.clone()),
            ping_tx,
        )));
        tracing::info!(socket = %ctl_path.display(), "control socket for mesh status and mesh ping");
        let mut pings = Pings::default();
        let relay_task = tokio::spawn(relay_rx(h.clone(), self.io.clone()));
        // The port is read each time: `wg set listen-port` may move the socket.
        let local_addrs = |interface: &str| -> Vec<SocketAddr> {
            let port = h.device.listen_port();
            local_ips(interface, &pools)
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()
        };
        let outs = self
            .ctl
            .set_local_addrs(Instant::now(), local_addrs(&self.interface));
        self.apply(&h, outs, &mut pings);
        self.io.relay.set(self.session.relay_path());
        self.set_fast_path(&h);
        let mut stun = self.session.stun_addr();
        self.ctl.set_stun_server(Instant::now(), stun);
        let outs = self
            .ctl
            .on_peer_map(Instant::now(), &self.session.peer_map());
        self.apply(&h, outs, &mut pings);
        status_tx.send_replace(Arc::new(self.status(&h)));
        let mut stats = tokio::time::interval(Duration::from_millis(200));
        let mut ticks: u64 = 0;
        let result = loop {
            let wake = self
                .ctl
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
            tokio::select! {
                alive = self.session.changed() => {
                    status_tx.send_replace(Arc::new(self.status(&h)));
                    if !alive {
                        break Ok(());
                    }
                    self.io.relay.set(self.session.relay_path());
                    self.set_fast_path(&h);
                    let s = self.session.stun_addr();
                    if s != stun {
                        stun = s;
                        self.ctl.set_stun_server(Instant::now(), s);
                    }
                    let outs = self.ctl.on_peer_map(Instant::now(), &self.session.peer_map());
                    self.apply(&h, outs, &mut pings);
                    status_tx.send_replace(Arc::new(self.status(&h)));
                }
                Some(cmd) = ping_rx.recv() => {
                    let id = pings.next_id;
                    pings.next_id += 1;
                    match self.ctl.ping(Instant::now(), &cmd.peer, id, cmd.timeout) {
                        Ok(outs) => {
                            tracing::debug!(peer = %cmd.peer.short(), id, "mesh ping");
                            pings.waiting.insert(id, cmd.reply);
                            self.apply(&h, outs, &mut pings);
                        }
                        Err(e) => {
                            let _ = cmd.reply.send(PingOutcome::Failed(e.to_string()));
                        }
                    }
                }
                Some(p) = self.rx.recv() => {
                    let now = Instant::now();
                    let outs = match p {
                        CtlPacket::Udp(from, b) => match crate::disco::classify(&b) {
                            crate::disco::Kind::Stun => self.ctl.on_stun(now, &b),
                            _ => self.ctl.on_disco(now, Via::Udp(from), &b),
                        },
                        CtlPacket::Relay(k, b) => self.ctl.on_disco(now, Via::Relay(k), &b),
                    };
                    if self.apply(&h, outs, &mut pings) {
                        status_tx.send_replace(Arc::new(self.status(&h)));
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    let outs = self.ctl.tick(Instant::now());
                    if self.apply(&h, outs, &mut pings) {
                        status_tx.send_replace(Arc::new(self.status(&h)));
                    }
                }
                _ = stats.tick() => {
                    // The device's counters every 200 ms, the host's
                    // addresses every 2 s: the controller decides.
                    let now = Instant::now();
                    ticks += 1;
                    self.io.relay.fast.tick(&h.net.udp);
                    if ticks % 10 == 0 {
                        let outs = self.ctl.set_local_addrs(now, local_addrs(&self.interface));
                        self.apply(&h, outs, &mut pings);
                    }
                    let info = h.device.info(std::time::SystemTime::now());
                    let sample: Vec<Counters> = info
                        .peers
                        .iter()
                        .map(|p| Counters {
                            peer: p.public_key,
                            tx_bytes: p.tx_bytes,
                            rx_bytes: p.rx_bytes,
                            last_source: h.device.last_source(&p.public_key),
                        })
                        .collect();
                    let outs = self.ctl.on_counters(now, &sample);
                    self.apply(&h, outs, &mut pings);
                    if ticks % 5 == 0 {
                        // Counters and handshakes for `mesh status`, once a second.
                        let st = Arc::new(self.status(&h));
                        if ticks % 25 == 0 {
                            self.session.report_paths(paths_of(&st));
                        }
                        status_tx.send_replace(st);
                    }
                }
            }
        };
        relay_task.abort();
        result
    }

    /// Points the fast relay path at the relay's UDP port with the current
    /// connection's bind key (off without a connection, a UDP port, or with
    /// `WEFT_FAST_RELAY=0`, which keeps relayed packets on QUIC datagrams).
    fn set_fast_path(&self, h: &Handles) {
        let off = std::env::var("WEFT_FAST_RELAY").is_ok_and(|v| v.trim() == "0");
        let own = h.device.snapshot().identity.as_ref().map(|i| i.public_key);
        let key = self.session.relay_path().and_then(|p| p.bind_key());
        let target = match (off, self.session.stun_addr(), own, key) {
            (false, Some(addr), Some(own), Some(key)) => Some((addr, own, key)),
            _ => None,
        };
        self.io.relay.fast.set_target(target);
    }

    /// The state `mesh status` shows, from the controller and the device.
    fn status(&self, h: &Handles) -> ManagedStatus {
        let now = std::time::SystemTime::now();
        let mut st = crate::status::managed_status(
            &self.interface,
            self.ctl.overlay().map(|o| &**o),
            &self.ctl,
            &h.device.info(now),
            self.session.link(),
            self.io.relay.fast.active().is_some(),
            now,
        );
        st.fleet = self.session.fleet();
        st
    }

    /// Applies the controller's outputs; `true` when `mesh status` would
    /// show something new (a path, the overlay, candidates, a relay RTT).
    fn apply(&mut self, h: &Handles, outs: Vec<Out>, pings: &mut Pings) -> bool {
        let mut changed = false;
        for o in outs {
            changed |= matches!(
                o,
                Out::Path { .. } | Out::Overlay(_) | Out::ReportEndpoints(_) | Out::PingReply(_)
            );
            match o {
                Out::Udp { to, bytes } => {
                    if let Err(e) = h.net.udp.try_send(to, &bytes) {
                        tracing::debug!(%to, error = %e, "control send failed");
                    }
                }
                Out::Relay { to, bytes } => {
                    if let Some(rp) = self.io.relay.get() {
                        let _ = rp.send(&to, &bytes);
                    }
                }
                Out::Device(req) => {
                    if let Err(e) = h.device.apply(req) {
                        tracing::warn!(error = %e, "applying the peer map to the device failed");
                    }
                }
                Out::Path { peer, path } => match path {
                    Path::Relay => h.device.set_relay_path(&peer),
                    Path::Direct(a) => h.device.set_endpoint(&peer, a),
                },
                Out::ReportEndpoints(c) => self.session.report_endpoints(c),
                Out::PingReply(r) => pings.finish(
                    r.id,
                    PingOutcome::Pong {
                        via: r.via,
                        rtt: r.rtt,
                    },
                ),
                Out::PingExpired { id } => pings.finish(id, PingOutcome::Timeout),
                Out::Overlay(o) => {
                    let mut names = self.names.write();
                    let mut fresh = Names::new(names.domain()).unwrap_or_else(|_| names.clone());
                    for (n, ips) in o.dns_entries() {
                        if let Err(e) = fresh.set(&n, ips) {
                            tracing::debug!(error = %e, "name not served by MagicDNS");
                        }
                    }
                    *names = fresh;
                    drop(names);
                    self.overlay_tx.send_replace(Some(o.clone()));
                    self.io.filter.set_overlay(o);
                }
            }
        }
        changed
    }
}

/// Packets from the relay: disco to the control loop, WireGuard through the
/// device to the TUN device (after the filter), replies back out.
async fn relay_rx(h: Handles, io: Arc<ManagedIo>) {
    let mut buf = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
    let mut out: Vec<Outgoing> = Vec::new();
    loop {
        let Some(rp) = io.relay.get() else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (from, bytes) = match rp.recv().await {
            Ok(x) => x,
            Err(_) => {
                // The connection closed; the session installs the next one.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = PublicKey::from_bytes(from.0);
        match crate::disco::classify(&bytes) {
            crate::disco::Kind::Disco => {
                let _ = io.ctl.try_send(CtlPacket::Relay(peer, bytes.to_vec()));
            }
            crate::disco::Kind::WireGuard => {
                let Some(src) = h.device.relay_source(&peer) else {
                    continue;
                };
                let snap = h.device.snapshot();
                buf[..VIRTIO_NET_HDR_LEN].fill(0);
                let got = h.device.handle_datagram(
                    &snap,
                    src,
                    &bytes,
                    &mut buf[VIRTIO_NET_HDR_LEN..],
                    &mut out,
                );
                if let Some(len) = got {
                    let pkt = &buf[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
                    if io.filter.inbound(pkt) {
                        if let Err(e) = h.tun.send(&buf[..VIRTIO_NET_HDR_LEN + len]) {
                            tracing::debug!(error = %e, "TUN write failed");
                        }
                    }
                }
                for o in out.drain(..) {
                    let _ = h.net.try_send(&h.device, o.to, &o.bytes);
                }
            }
            _ => {}
        }
    }
}

/// Serves MagicDNS on `addr`:53 (the pool's first host, added to the
/// interface), forwarding other names to the resolvers in /etc/resolv.conf.
pub(crate) async fn serve_dns(
    h: &Handles,
    names: Arc<RwLock<Names>>,
    addr: IpAddr,
) -> anyhow::Result<hickory_server::Server<crate::dns::MagicDns>> {
    h.link.add_address(IpNet::from(addr)).await?;
    let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let upstreams = crate::dns::upstreams_from_resolv_conf(&conf, &[addr]);
    let (server, _) = crate::dns::MagicDns::new(names, upstreams)
        .serve(SocketAddr::new(addr, 53))
        .await
        .with_context(|| format!("MagicDNS on {addr}:53"))?;
    Ok(server)
}

/// How long after its last handshake a peer still counts as talked to (WireGuard
/// renews a session's keys every 2 minutes while it carries traffic).
const TALKED_WITHIN_S: u64 = 180;

/// The peers with a recent WireGuard handshake and whether each runs direct: what the
/// node reports to the coordinator every 5 s (sent only when it changed).
fn paths_of(st: &ManagedStatus) -> Vec<PeerPath> {
    st.peers
        .iter()
        .filter(|p| {
            p.wg.latest_handshake_age_s
                .is_some_and(|a| a <= TALKED_WITHIN_S)
        })
        .filter_map(|p| {
            Some(PeerPath {
                peer: weft_proto::PublicKey::from_base64(&p.wg.public_key).ok()?,
                direct: p.path == "direct",
            })
        })
        .collect()
}
