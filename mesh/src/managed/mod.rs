//! Managed mode, and its entry: `mesh up --token TOKEN --state-dir DIR`
//! (also `weft up` and the worker agent's in-process node). Joins the mesh
//! through the relay (`tunnel_relay::mesh_client::MeshSession`: the token on
//! the first join only, the key kept in the state dir), waits for its first
//! peer map, then runs the node (`node::run_with`) with its overlay
//! addresses, no static peers, and the managed parts.
//!
//! | module | kind | what |
//! |---|---|---|
//! | this file | entry | [`join`], [`run_joined`], [`run`]; [`MeshAdapter`] (the session as the loop sees it) |
//! | [`controller`] | core, no I/O | the [`controller::Controller`]: peer map, disco, STUN, paths (time injected) |
//! | [`control_loop`] | shell | the [`control_loop::ControlLoop`]: routes, MagicDNS, feeds the controller, applies its outputs |
//! | [`overlay`] | pure | peer map → device peers, filter rules, MagicDNS entries, candidates |
//! | [`control_socket`] | shell | `NAME.weft` (JSON lines): `status`, `ping`; the CLI's client |
//!
//! One key per node: the relay identity in the state dir is also the
//! WireGuard key and the disco key, so the coordinator's node key is the
//! WireGuard peer key everywhere.

pub(crate) mod control_loop;
pub(crate) mod control_socket;
pub(crate) mod controller;
pub(crate) mod overlay;

pub use overlay::Overlay;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use ipnet::IpNet;
use parking_lot::RwLock;
use tokio::sync::watch;
use tunnel_relay::link::LinkState;
use tunnel_relay::mesh_client::MeshSession;
use tunnel_relay::relay_path::RelayPath;
use tunnel_relay::{StaticKey, Token};
use weft_proto::peermap::{Candidate, OverlayPools, PeerMap, SelfInfo};

use crate::config::{InterfaceConfig, WgConfig};
use crate::dns::{Names, DEFAULT_DOMAIN};
use crate::egress::{ManagedIo, PacketFilter, RelaySlot};
use crate::key::PrivateKey;
use crate::managed::control_loop::{ControlLoop, Session, MTU};
use crate::managed::controller::Controller;
use crate::node::{self, ManagedParts, UpOptions};
use crate::path::PathConfig;

/// Options of a managed `mesh up`.
#[derive(Debug, Clone)]
pub struct JoinOptions {
    /// Identity and relay state.
    pub state_dir: PathBuf,
    /// Join token (first run only).
    pub token: Option<Token>,
    /// Node name (default: the host name).
    pub name: Option<String>,
    /// Interface and UAPI directory.
    pub up: UpOptions,
    /// WireGuard UDP port (default: random).
    pub listen_port: Option<u16>,
}

/// The host name, for the default node name.
pub fn hostname() -> String {
    tunnel_relay::rt::hostname().unwrap_or_else(|| "node".to_string())
}

/// [`Session`] over the relay's mesh session.
pub struct MeshAdapter {
    session: MeshSession,
    map: watch::Receiver<PeerMap>,
    link: watch::Receiver<LinkState>,
    fleet: watch::Receiver<tunnel_relay::client::FleetView>,
}

impl MeshAdapter {
    /// Wraps a joined session.
    pub fn new(session: MeshSession) -> MeshAdapter {
        let map = session.watch_peer_map();
        let link = session.watch_link();
        let fleet = session.watch_fleet();
        MeshAdapter {
            session,
            map,
            link,
            fleet,
        }
    }
}

impl Session for MeshAdapter {
    async fn changed(&mut self) -> bool {
        let alive = tokio::select! {
            r = self.map.changed() => r.is_ok(),
            r = self.link.changed() => r.is_ok(),
            // A new measurement of the fleet: only `mesh status` changes.
            r = self.fleet.changed() => r.is_ok(),
        };
        let _ = self.fleet.borrow_and_update();
        let link = self.link.borrow_and_update().clone();
        let _ = self.map.borrow_and_update();
        match link {
            LinkState::Failed { reason } => {
                tracing::error!(%reason, "the relay refused this node; the mesh stops");
                false
            }
            LinkState::Stopped => false,
            LinkState::Retrying {
                last_error,
                retry_in_ms,
                attempt,
            } => {
                tracing::warn!(error = %last_error, retry_in_ms, attempt, "lost the coordinator; existing paths keep working");
                alive
            }
            _ => alive,
        }
    }

    fn peer_map(&self) -> PeerMap {
        self.session.peer_map()
    }

    fn relay_path(&self) -> Option<RelayPath> {
        self.session.relay_path()
    }

    fn stun_addr(&self) -> Option<SocketAddr> {
        self.session.link_info().and_then(|i| i.stun)
    }

    fn fleet(&self) -> Option<tunnel_relay::client::FleetView> {
        Some(self.fleet.borrow().clone()).filter(|f| !f.relays.is_empty())
    }

    fn report_endpoints(&self, endpoints: Vec<Candidate>) {
        self.session.report_endpoints(endpoints);
    }

    fn report_paths(&self, paths: Vec<weft_proto::control::PeerPath>) {
        self.session.report_paths(paths);
    }

    fn link(&self) -> LinkState {
        self.session.link()
    }

    fn pools(&self) -> Option<OverlayPools> {
        self.session
            .link_info()
            .map(|i| OverlayPools::new(i.ipv4_pool, i.ipv6_prefix))
    }
}

/// Joins and runs until `shutdown`.
pub async fn run(
    opts: JoinOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let (tx, _rx) = watch::channel(None);
    run_with_overlay(opts, tx, shutdown).await
}

/// [`run`], publishing every new overlay on `overlay_tx` (for callers that
/// run the node in-process and need the peer map, e.g. to name callers).
pub async fn run_with_overlay(
    opts: JoinOptions,
    overlay_tx: watch::Sender<Option<Arc<crate::managed::overlay::Overlay>>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let joined = join(&opts).await?;
    run_joined(joined, opts.up, opts.listen_port, overlay_tx, shutdown).await
}

/// A node admitted to the mesh, holding its first peer map, with no
/// interface yet: the first half of [`run_with_overlay`], for callers that
/// retry joining (relay unreachable) apart from running the node.
pub struct Joined {
    session: MeshSession,
    me: SelfInfo,
    key: PrivateKey,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Joined")
            .field("me", &self.me)
            .field("session", &self.session)
            .finish()
    }
}

impl Joined {
    /// The node as the coordinator registered it (name, tags, overlay
    /// addresses).
    pub fn me(&self) -> &SelfInfo {
        &self.me
    }
}

/// Joins the mesh through the relay (the token on the first join only) and
/// waits for the first peer map. A refusal comes back as
/// [`tunnel_relay::ClientError::Rejected`] inside the error chain.
pub async fn join(opts: &JoinOptions) -> anyhow::Result<Joined> {
    let name = opts.name.clone().unwrap_or_else(hostname);
    let session = MeshSession::connect(&opts.state_dir, opts.token.as_ref(), &name, Vec::new())
        .await
        .context("joining the mesh through the relay")?;
    let me = session
        .me()
        .context("the coordinator sent no identity for this node")?;
    let identity = StaticKey::load_or_create(&opts.state_dir.join("identity.key"))
        .context("reading the node identity")?;
    let key = PrivateKey::from_bytes(*identity.private_bytes());
    tracing::info!(name = %me.name, ipv4 = %me.ipv4, ipv6 = %me.ipv6, peers = session.peer_map().peers.len(), "joined the mesh");
    Ok(Joined { session, me, key })
}

/// Runs a joined node (interface `up.interface`) until `shutdown`,
/// publishing every new overlay on `overlay_tx`.
pub async fn run_joined(
    joined: Joined,
    up: UpOptions,
    listen_port: Option<u16>,
    overlay_tx: watch::Sender<Option<Arc<crate::managed::overlay::Overlay>>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let Joined { session, me, key } = joined;
    let config = WgConfig {
        interface: InterfaceConfig {
            private_key: key.clone(),
            addresses: vec![
                IpNet::from(IpAddr::V4(me.ipv4)),
                IpNet::from(IpAddr::V6(me.ipv6)),
            ],
            listen_port,
            mtu: Some(MTU),
            fwmark: None,
        },
        peers: Vec::new(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let io = Arc::new(ManagedIo {
        filter: PacketFilter::default(),
        ctl: tx,
        relay: RelaySlot::default(),
    });
    let names = Arc::new(RwLock::new(Names::new(DEFAULT_DOMAIN)?));
    let ctl = Controller::new(key, PathConfig::default(), rand::random());
    let interface = up.interface.clone();
    let lp = ControlLoop {
        session: MeshAdapter::new(session),
        ctl,
        io: io.clone(),
        rx,
        names,
        interface,
        overlay_tx,
    };
    let parts = ManagedParts {
        io,
        start: Box::new(move |h| {
            Box::pin(async move {
                h.device.set_roaming(false);
                lp.run(h).await
            })
        }),
    };
    node::run_with(config, up, Some(parts), shutdown).await
}
