//! `mesh up`: the I/O shell around [`Device`]. Creates the TUN device, the
//! UDP socket and the UAPI socket, configures the interface through netlink,
//! runs the data-path loops and removes everything on shutdown.
//!
//! The data path runs on two threads of its own ([`crate::datapath`]);
//! two tasks run on a small tokio runtime:
//! 1. Timers: every 100 ms drive each peer's rekey/keepalive timers; every
//!    second reset the node-wide handshake rate limiter.
//! 2. The UAPI server (`wg show`/`wg set`).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::config::WgConfig;
use crate::datapath::DataPath;
use crate::device::{Device, Outgoing, RouteDiff};
use crate::egress::{ManagedIo, Net};
use crate::netlink::{apply_route_diff, installs_route, Link};
use crate::uapi;
use crate::udp::UdpIo;

/// Default MTU, as wg-quick picks for an IPv6 underlay: 1500 - 80.
pub const DEFAULT_MTU: u16 = 1420;

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
    let busy_poll = crate::datapath::busy_poll_from_env();
    if !busy_poll.is_zero() {
        tracing::info!(
            interface = %link.name,
            busy_poll_ms = busy_poll.as_millis() as u64,
            "busy-polling: a data-path thread stays awake while packets came within this window"
        );
    }
    let dp = Arc::new(
        DataPath::new(
            device.clone(),
            tun.clone(),
            net.clone(),
            stop.clone(),
            crate::datapath::linger_max_from_env(),
            busy_poll,
        )
        .context("setting up the data path")?,
    );
    let (exited_tx, mut exited) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut threads = Vec::new();
    for name in DataPath::THREADS {
        let (dp, tx) = (dp.clone(), exited_tx.clone());
        let handle = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let r = dp.run();
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
