//! `mesh up`: the I/O shell around [`Device`]. Creates the TUN device, the
//! UDP socket and the UAPI socket, configures the interface through netlink,
//! runs the data-path loops and removes everything on shutdown.
//!
//! Two data-path threads (one per direction, so both cores work), each
//! waiting on its own file descriptor with `poll(2)` so a packet wakes the
//! thread that handles it directly:
//! 1. TUN → UDP: read a TSO super-packet (or a batch), split, encrypt each
//!    segment, send runs of equal-size datagrams to one peer with UDP GSO.
//! 2. UDP → TUN: recvmmsg with UDP GRO, decrypt every segment, coalesce TCP
//!    segments again (GRO) and write few large packets to the TUN device.
//!
//! And two tasks on a small tokio runtime:
//! 3. Timers: every 100 ms drive each peer's rekey/keepalive timers; every
//!    second reset the node-wide handshake rate limiter.
//! 4. The UAPI server (`wg show`/`wg set`).

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use quinn_udp::RecvMeta;
use std::os::fd::AsRawFd;

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tun_rs::{DeviceBuilder, GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::config::WgConfig;
use crate::device::{packet_destination, Device, Outgoing, RouteDiff};
use crate::egress::{CtlPacket, ManagedIo, Net};
use crate::netlink::{apply_route_diff, installs_route, Link};
use crate::peer::{Encap, DATA_OVERHEAD};
use crate::uapi;
use crate::udp::UdpIo;

/// Default MTU, as wg-quick picks for an IPv6 underlay: 1500 - 80.
pub const DEFAULT_MTU: u16 = 1420;

/// Largest UDP payload sum we put in one GSO send.
const GSO_MAX_BYTES: usize = 60_000;
/// Datagram buffers per recvmmsg.
const RECV_BATCH: usize = 8;
/// Plaintext room per decrypted packet kept in each TUN buffer.
const TUN_BUF: usize = 2048;
/// Capacity of each TUN write buffer: GRO coalesces segments into the first
/// buffer of a flow, in place, and only when it has room for a 64 KiB packet.
const TUN_BUF_CAPACITY: usize = 65535 + 2 * VIRTIO_NET_HDR_LEN;
/// Packets one TUN read batch may hold.
const TUN_READ_BATCH: usize = 4 * IDEAL_BATCH_SIZE;
/// Most segments one TSO super-packet splits into (64 KiB / a small MSS).
const TUN_SPLIT_MAX: usize = 128;

/// Options of `mesh up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub interface: String,
    /// Directory of UAPI sockets (`/var/run/wireguard`).
    pub uapi_dir: PathBuf,
}

/// What the managed node's extra tasks get once the interface is up.
#[derive(Clone)]
pub struct Handles {
    /// The device.
    pub device: Arc<Device>,
    /// The TUN device (writes need a zeroed virtio header in front).
    pub tun: Arc<SyncDevice>,
    /// The way out.
    pub net: Arc<Net>,
    /// The interface, for address and route changes.
    pub link: Link,
    /// The UAPI socket's path (a managed node's control socket sits next to it).
    pub uapi_socket: PathBuf,
}

/// A managed node's additions: its data-path parts and a task to start once
/// the interface is up (the control loop; it runs until shutdown).
pub struct ManagedParts {
    /// Filter, control channel, relay slot.
    pub io: Arc<ManagedIo>,
    /// Started with the handles; an error stops the node.
    pub start: StartTask,
}

/// The managed node's control task, started once the interface is up.
pub type StartTask = Box<dyn FnOnce(Handles) -> ControlTask + Send>;
/// The future of [`StartTask`].
pub type ControlTask =
    std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>>;

/// Runs a node until `shutdown` resolves, then removes what it created.
pub async fn run(
    config: WgConfig,
    opts: UpOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(config, opts, None, shutdown).await
}

/// [`run`], optionally in managed mode.
pub async fn run_with(
    config: WgConfig,
    opts: UpOptions,
    managed: Option<ManagedParts>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let iface = opts.interface.clone();
    if iface.is_empty() || iface.len() > 15 || iface.contains('/') {
        bail!("interface name {iface:?} is invalid: use 1 to 15 characters, no '/'");
    }
    // Resolve endpoints first: a typo in a hostname must fail before anything exists.
    let mut endpoints = Vec::new();
    for p in &config.peers {
        if let Some(ep) = &p.endpoint {
            let addr = ep
                .resolve()
                .with_context(|| format!("resolving Endpoint {ep:?} of peer {}", p.public_key))?;
            endpoints.push((p.public_key, addr));
        }
    }
    let uapi_listener = uapi::Listener::bind(&opts.uapi_dir, &iface)?;
    let udp = UdpIo::bind(
        config.interface.listen_port.unwrap_or(0),
        config.interface.fwmark,
    )?;
    let port = udp.local_port().context("reading the bound UDP port")?;
    let device = Arc::new(Device::new(&config, port)?);
    for (key, addr) in endpoints {
        device.set_endpoint(&key, addr);
    }

    let tun = DeviceBuilder::new()
        .name(&iface)
        .offload(true)
        .build_sync()
        .with_context(|| format!("creating TUN device {iface} (is /dev/net/tun there, and do we have CAP_NET_ADMIN?)"))?;
    if let Err(e) = tun.set_nonblocking(true) {
        drop(tun);
        return Err(e).context("setting the TUN device non-blocking");
    }
    let link = match Link::open(&iface).await {
        Ok(l) => l,
        Err(e) => {
            drop(tun);
            return Err(e).context("configuring the new TUN device");
        }
    };
    // From here on, any error removes the link again.
    let result = serve(
        &config,
        &link,
        Arc::new(tun),
        Arc::new(udp),
        device,
        uapi_listener,
        managed,
        shutdown,
    )
    .await;
    if let Err(e) = link.delete().await {
        tracing::warn!(interface = %iface, error = %e, "could not delete the interface");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    config: &WgConfig,
    link: &Link,
    tun: Arc<SyncDevice>,
    udp: Arc<UdpIo>,
    device: Arc<Device>,
    uapi_listener: uapi::Listener,
    managed: Option<ManagedParts>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (managed_io, managed_start) = match managed {
        Some(m) => (Some(m.io), Some(m.start)),
        None => (None, None),
    };
    let net = Arc::new(Net {
        udp: udp.clone(),
        managed: managed_io,
    });
    let mtu = config.interface.mtu.unwrap_or(DEFAULT_MTU);
    link.set_mtu(mtu).await?;
    for addr in &config.interface.addresses {
        link.add_address(*addr).await?;
    }
    link.set_up().await?;
    let initial = RouteDiff {
        added: config
            .peers
            .iter()
            .flat_map(|p| p.allowed_ips.iter().copied())
            .collect(),
        removed: Vec::new(),
    };
    apply_route_diff(link, &device, &udp, &initial).await?;
    tracing::info!(
        interface = %link.name,
        public_key = %config.interface.private_key.public_key(),
        listen_port = device.listen_port(),
        peers = config.peers.len(),
        tcp_offload = tun.tcp_gso(),
        udp_gso_segments = udp.max_gso_segments(),
        udp_gro_segments = udp.gro_segments(),
        "interface up"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let io = DataPathIo {
        device: device.clone(),
        tun: tun.clone(),
        net: net.clone(),
        stop: stop.clone(),
        outbound: Arc::new(Mutex::new(Outbound::new())),
    };
    let (exited_tx, mut exited) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut threads = Vec::new();
    for (name, f) in [
        ("tun-to-udp", tun_to_udp as DataPath),
        ("udp-to-tun", udp_to_tun as DataPath),
    ] {
        let (io, tx) = (io.clone(), exited_tx.clone());
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let r = f(&io);
                let _ = tx.send(r.with_context(|| format!("data path {name}")));
            })
            .context("starting a data-path thread")?;
        threads.push(handle);
    }
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(timers(device.clone(), net.clone()));
    if let Some(start) = managed_start {
        tasks.spawn(start(Handles {
            device: device.clone(),
            tun: tun.clone(),
            net: net.clone(),
            link: link.clone(),
            uapi_socket: uapi_listener.path().to_owned(),
        }));
    }
    tasks.spawn(uapi::serve(
        uapi_listener,
        device.clone(),
        link.clone(),
        udp.clone(),
    ));

    let result = tokio::select! {
        _ = shutdown => {
            tracing::info!(interface = %link.name, "shutting down");
            Ok(())
        }
        Some(r) = exited.recv() => match r {
            Ok(()) => Err(anyhow::anyhow!("a data-path thread stopped unexpectedly")),
            Err(e) => Err(e),
        },
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Err(anyhow::anyhow!("a control task stopped unexpectedly")),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(anyhow::anyhow!("a control task panicked: {e}")),
        },
    };
    tasks.abort_all();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        // They notice `stop` within one poll timeout.
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    // Routes go with the link; a full tunnel's policy rules would stay.
    let gone = RouteDiff {
        added: Vec::new(),
        removed: device
            .allowed_ips()
            .into_iter()
            .filter(|n| !installs_route(n))
            .collect(),
    };
    if let Err(e) = apply_route_diff(link, &device, &udp, &gone).await {
        tracing::warn!(error = %e, "could not remove the full tunnel's rules");
    }
    result
}

/// How long a data-path thread waits before re-checking the stop flag.
const POLL_MS: i32 = 200;

/// What both data-path threads share.
#[derive(Clone)]
struct DataPathIo {
    device: Arc<Device>,
    tun: Arc<SyncDevice>,
    net: Arc<Net>,
    /// Set on shutdown.
    stop: Arc<AtomicBool>,
    outbound: Arc<Mutex<Outbound>>,
}

impl DataPathIo {
    /// The shared parts as plain references, as the loops use them.
    fn parts(&self) -> (&Device, &SyncDevice, &Net, &AtomicBool, &Mutex<Outbound>) {
        (
            &self.device,
            &self.tun,
            &self.net,
            &self.stop,
            &self.outbound,
        )
    }
}

/// A data-path thread's loop: runs until `stop` is set or an error.
type DataPath = fn(&DataPathIo) -> anyhow::Result<()>;

/// A run of equal-size encrypted datagrams to one endpoint, sent with one GSO call.
struct GsoRun {
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    used: usize,
    /// The last datagram was shorter than `segment`: the run is closed.
    closed: bool,
}

impl GsoRun {
    fn new() -> GsoRun {
        GsoRun {
            to: None,
            segment: 0,
            count: 0,
            used: 0,
            closed: false,
        }
    }

    /// Whether a datagram of `len` bytes to `to` can extend this run.
    fn accepts(&self, to: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.count == 0
            || (self.to == Some(to)
                && !self.closed
                && len <= self.segment
                && self.count < max_segments
                && self.used + len <= GSO_MAX_BYTES)
    }

    fn push(&mut self, to: SocketAddr, len: usize) {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.count += 1;
        self.used += len;
    }

    fn flush(&mut self, device: &Device, net: &Net, buf: &[u8]) {
        if let Some(to) = self.to.filter(|_| self.count > 0) {
            let segment = (self.count > 1).then_some(self.segment);
            if let Err(e) = net.send(device, to, &buf[..self.used], segment) {
                tracing::debug!(%to, error = %e, "send failed");
            }
        }
        *self = GsoRun::new();
    }
}

/// The outbound half of the data path: TUN read buffers, the GSO output
/// buffer and the logic that drains the TUN queue into encrypted datagrams.
/// Behind a mutex shared by both threads: `tun-to-udp` pumps it when the TUN
/// device becomes readable, and `udp-to-tun` pumps it right after writing to
/// the TUN device, because the kernel answers a delivered packet (TCP ACK,
/// ICMP echo reply) during that write: sending the answer from the thread
/// that is already awake saves a thread wake-up per round trip. Holding the
/// lock while reading and sending keeps each flow's packets in order.
pub(crate) struct Outbound {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Room for one full GSO run plus the packet that did not fit it.
    out: Vec<u8>,
    handshake: Vec<u8>,
}

impl Outbound {
    fn new() -> Outbound {
        Outbound {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
            bufs: vec![vec![0u8; 65535]; TUN_READ_BATCH],
            sizes: vec![0usize; TUN_READ_BATCH],
            out: vec![0u8; GSO_MAX_BYTES + 65535 + 2 * DATA_OVERHEAD + 256],
            handshake: vec![0u8; 256],
        }
    }

    /// Reads what the TUN device has queued (without waiting), encrypts it
    /// and sends it. Returns how many packets were read.
    fn pump(&mut self, device: &Device, tun: &SyncDevice, net: &Net) -> anyhow::Result<usize> {
        let udp = &*net.udp;
        let filter = net.managed.as_ref().map(|m| &m.filter);
        let Outbound {
            original,
            bufs,
            sizes,
            out,
            handshake,
        } = self;
        // Read everything queued (ACK trains, more super-packets) so one GSO
        // send carries many datagrams; stop while room for a full split remains.
        let mut n = 0;
        while bufs.len() - n >= TUN_SPLIT_MAX {
            match tun.recv_multiple(original, &mut bufs[n..], &mut sizes[n..], 0) {
                Ok(more) => n += more,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading from the TUN device"),
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let snap = device.snapshot();
        let max_segments = udp.max_gso_segments().max(1);
        let mut run = GsoRun::new();
        for (buf, &size) in bufs.iter().zip(sizes.iter()).take(n) {
            let packet = &buf[..size];
            let Some(peer) = packet_destination(packet).and_then(|d| snap.route(d)) else {
                device.counters.tx_no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Some(f) = filter {
                f.outbound(packet);
            }
            // Encrypted size: padded to 16, plus header and tag; at least 148 for a handshake.
            let need = size.div_ceil(16) * 16 + DATA_OVERHEAD;
            if run.used + need.max(148) > out.len() {
                run.flush(device, net, out);
            }
            let start = run.used;
            match device.encapsulate(peer, packet, &mut out[start..start + need.max(148)]) {
                Some((to, Encap::Data(len))) => {
                    if !run.accepts(to, len, max_segments) {
                        run.flush(device, net, out);
                        out.copy_within(start..start + len, 0);
                    }
                    run.push(to, len);
                }
                Some((to, Encap::Handshake(len))) => {
                    handshake[..len].copy_from_slice(&out[start..start + len]);
                    if let Err(e) = net.send(device, to, &handshake[..len], None) {
                        tracing::debug!(%to, error = %e, "handshake send failed");
                    }
                }
                Some((_, Encap::Queued)) | None => {}
            }
        }
        run.flush(device, net, out);
        Ok(n)
    }
}

fn tun_to_udp(io: &DataPathIo) -> anyhow::Result<()> {
    let (device, tun, net, stop, outbound) = io.parts();
    let fd = tun.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        if crate::udp::wait(fd, libc::POLLIN, POLL_MS).context("waiting on the TUN device")? {
            outbound.lock().pump(device, tun, net)?;
        }
    }
    Ok(())
}

fn udp_to_tun(io: &DataPathIo) -> anyhow::Result<()> {
    let (device, tun, net, stop, outbound) = io.parts();
    let mut rbufs: [Vec<u8>; RECV_BATCH] = std::array::from_fn(|_| vec![0u8; 65535]);
    let mut meta = [RecvMeta::default(); RECV_BATCH];
    let mut tunbufs: Vec<Vec<u8>> = Vec::new();
    let mut lens: Vec<usize> = Vec::new();
    let mut gro = GROTable::default();
    let mut outq: Vec<Outgoing> = Vec::new();
    let udp = &*net.udp;
    let managed = net.managed.as_deref();
    while !stop.load(Ordering::Relaxed) {
        let n = {
            let mut iovs = rbufs.each_mut().map(|b| IoSliceMut::new(b.as_mut_slice()));
            udp.recv(&mut iovs, &mut meta, POLL_MS)
                .context("receiving from the UDP socket")?
        };
        if n == 0 {
            continue;
        }
        let snap = device.snapshot();
        let mut k = 0;
        for (m, buf) in meta.iter().zip(&rbufs).take(n) {
            let stride = m.stride.max(1);
            for seg in buf[..m.len].chunks(stride) {
                if k == tunbufs.len() {
                    let mut b = Vec::with_capacity(TUN_BUF_CAPACITY);
                    b.resize(VIRTIO_NET_HDR_LEN + TUN_BUF, 0);
                    tunbufs.push(b);
                    lens.push(0);
                }
                let mut src = m.addr;
                let mut seg = seg;
                if let Some(mio) = managed {
                    // One socket carries WireGuard, STUN, disco and the fast relay path.
                    match crate::disco::classify(seg) {
                        crate::disco::Kind::WireGuard => {}
                        crate::disco::Kind::FastData => {
                            let fast = &mio.relay.fast;
                            let peer = tunnel_relay::relay_path::fast_slot(seg)
                                .filter(|_| fast.is_relay(&m.addr))
                                .and_then(|slot| fast.peer_of(device, slot))
                                .and_then(|k| device.relay_source(&k));
                            let Some(relay_src) = peer else {
                                device.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                                continue;
                            };
                            fast.received.fetch_add(1, Ordering::Relaxed);
                            src = relay_src;
                            seg = &seg[tunnel_relay::relay_path::FAST_HEADER..];
                            if crate::disco::classify(seg) != crate::disco::Kind::WireGuard {
                                // Disco through the relay stays on QUIC; anything else is junk.
                                device.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                        crate::disco::Kind::FastAck => {
                            mio.relay.fast.on_ack(m.addr, seg);
                            continue;
                        }
                        crate::disco::Kind::Stun | crate::disco::Kind::Disco => {
                            let _ = mio.ctl.try_send(CtlPacket::Udp(m.addr, seg.to_vec()));
                            continue;
                        }
                        crate::disco::Kind::Unknown => {
                            device.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let tb = &mut tunbufs[k];
                if tb.len() < VIRTIO_NET_HDR_LEN + seg.len() {
                    tb.resize(VIRTIO_NET_HDR_LEN + seg.len(), 0);
                }
                if let Some(len) = device.handle_datagram(
                    &snap,
                    src,
                    seg,
                    &mut tb[VIRTIO_NET_HDR_LEN..],
                    &mut outq,
                ) {
                    let pkt = &tb[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
                    if managed.is_some_and(|mio| !mio.filter.inbound(pkt)) {
                        continue;
                    }
                    lens[k] = len;
                    k += 1;
                }
            }
        }
        if k > 0 {
            for (tb, len) in tunbufs.iter_mut().zip(&lens).take(k) {
                tb.truncate(VIRTIO_NET_HDR_LEN + len);
            }
            if let Err(e) = tun.send_multiple(&mut gro, &mut tunbufs[..k], VIRTIO_NET_HDR_LEN) {
                tracing::debug!(error = %e, "TUN write failed");
            }
            for tb in tunbufs.iter_mut().take(k) {
                tb.resize(VIRTIO_NET_HDR_LEN + TUN_BUF, 0);
            }
            // Send what the kernel answered during those writes, unless the
            // other thread is already at it.
            if let Some(mut ob) = outbound.try_lock() {
                ob.pump(device, tun, net)?;
            }
        }
        for o in outq.drain(..) {
            if let Err(e) = net.send(device, o.to, &o.bytes, None) {
                tracing::debug!(to = %o.to, error = %e, "send failed");
            }
        }
    }
    Ok(())
}

async fn timers(device: Arc<Device>, net: Arc<Net>) -> anyhow::Result<()> {
    let send = |packets: Vec<Outgoing>| {
        for o in packets {
            if let Err(e) = net.try_send(&device, o.to, &o.bytes) {
                tracing::debug!(to = %o.to, error = %e, "send failed");
            }
        }
    };
    let mut buf = vec![0u8; 256];
    send(device.initiate_keepalive_peers(&mut buf));
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        if n % 10 == 0 {
            device.reset_rate_limiter();
        }
        send(device.tick(&mut buf));
    }
}
