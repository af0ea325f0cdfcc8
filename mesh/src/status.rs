//! `mesh status`: ask a running node for its state and render it like
//! `wg show`, or as JSON.
//!
//! A static (wg-quick) node is asked over its UAPI socket ([`query`],
//! [`render_human`], [`render_json`]). A managed node also serves its local
//! control socket (`crate::managed::control_socket`), which answers with a [`ManagedStatus`]
//! built by the control loop ([`managed_status`]): the same fields plus the
//! mesh's view (names, overlay addresses, tags, path and, on the relay path,
//! the relay link's transport, latency, relay link, candidates); see
//! [`ManagedStatus`] for the JSON format.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::net::{Ipv4Addr, Ipv6Addr};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tunnel_relay::link::LinkState;
use weft_proto::peermap::{Candidate, CandidateKind};

use crate::managed::controller::Controller;
use crate::managed::overlay::Overlay;
use crate::path::Path as PeerPathKind;
use crate::uapi::codec::{parse_get_response, DeviceInfo, PeerInfo, UapiError};

/// How long to wait for the node to accept, answer or take the request.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on a response, so a misbehaving peer cannot exhaust memory.
const MAX_RESPONSE: usize = 16 << 20;

/// Why the status could not be obtained.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StatusError {
    /// Nothing is listening on the socket.
    #[error(
        "cannot connect to UAPI socket {}: {source}; is `mesh up` running for this interface?",
        socket.display()
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The connection failed or timed out mid-exchange.
    #[error(
        "UAPI socket {}: {source}; is `mesh up` running for this interface?",
        socket.display()
    )]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node answered with an error or with text that does not parse.
    #[error("UAPI socket {}: {source}", socket.display())]
    Response {
        /// The socket path.
        socket: PathBuf,
        /// The decoding error or the node's errno.
        source: UapiError,
    },
}

/// Sends `get=1` to the node's UAPI socket and parses the answer.
pub(crate) fn query(socket: &Path) -> Result<DeviceInfo, StatusError> {
    let io_err = |source| StatusError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| StatusError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.write_all(b"get=1\n\n").map_err(io_err)?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // A get response has no empty line before the one ending it.
    while !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).map_err(io_err)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response too large",
            )));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    parse_get_response(&text).map_err(|source| StatusError::Response {
        socket: socket.to_owned(),
        source,
    })
}

/// Renders the state like `wg show`.
pub(crate) fn render_human(interface: &str, info: &DeviceInfo, now: SystemTime) -> String {
    let mut out = format!("interface: {interface}\n");
    if let Some(k) = &info.private_key {
        out += &format!("  public key: {}\n", k.public_key());
        out += "  private key: (hidden)\n";
    }
    if info.listen_port != 0 {
        out += &format!("  listening port: {}\n", info.listen_port);
    }
    if let Some(mark) = info.fwmark {
        out += &format!("  fwmark: 0x{mark:x}\n");
    }
    for p in sorted_peers(info) {
        out += &format!("\npeer: {}\n", p.public_key);
        if p.preshared_key.is_some() {
            out += "  preshared key: (hidden)\n";
        }
        if let Some(ep) = p.endpoint {
            out += &format!("  endpoint: {}\n", endpoint_text(&ep));
        }
        let ips = if p.allowed_ips.is_empty() {
            "(none)".to_owned()
        } else {
            p.allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!("  allowed ips: {ips}\n");
        if let Some(hs) = p.last_handshake {
            out += &format!("  latest handshake: {}\n", ago(hs, now));
        }
        if p.rx_bytes != 0 || p.tx_bytes != 0 {
            out += &format!(
                "  transfer: {} received, {} sent\n",
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            );
        }
        if let Some(ka) = p.persistent_keepalive {
            out += &format!(
                "  persistent keepalive: every {}\n",
                pretty_time(u64::from(ka))
            );
        }
    }
    out
}

/// An endpoint as users read it: `relay` for the relay path.
fn endpoint_text(ep: &std::net::SocketAddr) -> String {
    if crate::device::relay_index(ep).is_some() {
        "relay".to_owned()
    } else {
        ep.to_string()
    }
}

/// Renders the state as JSON. This is the documented, stable format of
/// `mesh status --json`; fields are only ever added, never changed:
///
/// ```text
/// {
///   "interface": "wg0",                 // string: the interface name
///   "public_key": "base64…" | null,     // null when no private key is set
///   "listen_port": 51820,               // integer, 0 when not bound
///   "peers": [                          // sorted by latest handshake, newest first
///     {
///       "public_key": "base64…",
///       "endpoint": "1.2.3.4:51820" | "[fd00::1]:51820" | "relay" | null,
///       "allowed_ips": ["10.0.0.2/32", "fd00::/64"],
///       "latest_handshake_unix": 1700000000 | null,  // whole seconds since the epoch
///       "latest_handshake_age_s": 65 | null,         // seconds before `now` (0 if in the future)
///       "rx_bytes": 1234,
///       "tx_bytes": 5678,
///       "persistent_keepalive_s": 25 | null
///     }
///   ]
/// }
/// ```
///
/// Private and preshared keys are never included.
pub(crate) fn render_json(interface: &str, info: &DeviceInfo, now: SystemTime) -> Value {
    let now = since_epoch(now);
    let peers: Vec<PeerStatus> = sorted_peers(info)
        .into_iter()
        .map(|p| PeerStatus::new(p, now))
        .collect();
    json!({
        "interface": interface,
        "public_key": info.private_key.as_ref().map(|k| k.public_key().to_base64()),
        "listen_port": info.listen_port,
        "peers": peers,
    })
}

/// One peer in [`render_json`]'s format. Deserializing it (the lab harness
/// reads `mesh status --json` with it) requires every field, `null` included.
/// A managed node's peers carry the same fields ([`ManagedPeer::wg`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// Public key (base64).
    pub public_key: String,
    /// The endpoint (`relay` on the relay path), if known.
    #[serde(deserialize_with = "Option::deserialize")]
    pub endpoint: Option<String>,
    /// WireGuard AllowedIPs.
    pub allowed_ips: Vec<String>,
    /// Last completed handshake, whole seconds since the epoch.
    #[serde(deserialize_with = "Option::deserialize")]
    pub latest_handshake_unix: Option<u64>,
    /// Seconds from then to the rendering (0 if in the future).
    #[serde(deserialize_with = "Option::deserialize")]
    pub latest_handshake_age_s: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Persistent keepalive interval in seconds.
    #[serde(deserialize_with = "Option::deserialize")]
    pub persistent_keepalive_s: Option<u16>,
}

impl PeerStatus {
    /// The peer `p` as of `now` (since the epoch).
    fn new(p: &PeerInfo, now: Duration) -> Self {
        Self {
            public_key: p.public_key.to_base64(),
            endpoint: p.endpoint.map(|e| endpoint_text(&e)),
            allowed_ips: p.allowed_ips.iter().map(ToString::to_string).collect(),
            latest_handshake_unix: p.last_handshake.map(|h| h.as_secs()),
            latest_handshake_age_s: p
                .last_handshake
                .map(|h| now.as_secs().saturating_sub(h.as_secs())),
            rx_bytes: p.rx_bytes,
            tx_bytes: p.tx_bytes,
            persistent_keepalive_s: p.persistent_keepalive,
        }
    }
}

/// A managed node's state, as its control socket sends it and as
/// `mesh status --json` prints it. Documented and stable like
/// [`render_json`]'s format, of which it is a superset (every field there
/// is here with the same meaning; fields are only ever added):
///
/// ```text
/// {
///   "interface": "weft0",
///   "mode": "managed",                  // absent in the static format
///   "public_key": "base64…" | null,
///   "listen_port": 41641,
///   "self": {"name": "alice", "ipv4": "100.64.0.7", "ipv6": "fd7a:7765:6674::6440:7",
///            "tags": ["engineer"]} | null,          // null before the first peer map
///   "relay": {"state": "connected", "address": "203.0.113.1:443",
///             "relay": "203.0.113.1:443", "name": "alice", "tags": ["engineer"],
///             "transport": "quic" | "tcp"}   // QUIC, or the TCP/TLS fallback
///          | {"state": "connecting", "attempt": 1}
///          | {"state": "reconnecting", "attempt": 2, "error": "…", "retry_in_ms": 500}
///          | {"state": "refused", "reason": "node revoked"}
///          | {"state": "stopped"},        // the one link state: tunnel_relay::link::LinkState
///   "candidates": [{"addr": "192.168.1.7:41641", "kind": "local" | "reflexive"}],
///   "peers": [                          // sorted by name
///     {
///       "name": "gpu1",                 // the MagicDNS name
///       "public_key": "base64…",
///       "ipv4": "100.64.0.9", "ipv6": "fd7a:7765:6674::6440:9",
///       "tags": ["worker"],
///       "online": true,                 // holds a control session to the coordinator
///       "path": "direct" | "relay",
///       "relay_transport": "udp" | "quic" | "tcp" | null,  // on the relay path: how this
///                                       // node's relayed packets travel: "udp" = the fast
///                                       // relay path (channel header to the relay's UDP
///                                       // port), else datagrams on its relay link's
///                                       // transport (`relay.transport`);
///                                       // null when direct or the link is down
///       "endpoint": "198.51.100.6:41641" | "relay" | null,
///       "latency_ms": 0.41 | null,      // direct: last disco RTT on the path;
///                                       // relay: last `mesh ping` RTT through it
///       "allowed_ips": ["100.64.0.9/32", "fd7a:7765:6674::6440:9/128"],
///       "latest_handshake_unix": 1700000000 | null,
///       "latest_handshake_age_s": 65 | null,
///       "rx_bytes": 1234, "tx_bytes": 5678,
///       "persistent_keepalive_s": null
///     }
///   ]
/// }
/// ```
///
/// Private keys are never included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagedStatus {
    /// Interface name.
    pub interface: String,
    /// Always `managed`.
    pub mode: String,
    /// The node's public key (base64).
    pub public_key: Option<String>,
    /// The WireGuard UDP port.
    pub listen_port: u16,
    /// The node itself, as the coordinator registered it.
    #[serde(rename = "self")]
    pub node: Option<NodeStatus>,
    /// The control session's link to the relay.
    pub relay: LinkState,
    /// In a fleet of relays: the home relay and the round trip to each, as
    /// last measured (absent for a relay alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<tunnel_relay::client::FleetView>,
    /// Our direct-path candidates as reported to the coordinator.
    pub candidates: Vec<Candidate>,
    /// Visible peers, sorted by name.
    pub peers: Vec<ManagedPeer>,
}

/// The node itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Mesh name.
    pub name: String,
    /// Overlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Tags (from the join token).
    pub tags: Vec<String>,
}

/// One peer of a managed node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManagedPeer {
    /// Mesh name.
    pub name: String,
    /// Overlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Tags.
    pub tags: Vec<String>,
    /// Connected to the coordinator.
    pub online: bool,
    /// Its home relay (the fleet relay holding its control session), as its
    /// peer-map entry announces it; `None` from relays that predate the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// `direct` or `relay`.
    pub path: String,
    /// On the relay path, how this node reaches the relay: `quic`, or `tcp`
    /// (the TCP/TLS fallback); `None` when direct or while the relay link is
    /// down (and from nodes that predate the field).
    #[serde(default)]
    pub relay_transport: Option<String>,
    /// See the format above.
    pub latency_ms: Option<f64>,
    /// What WireGuard knows of the peer, as `mesh status --json` shows it for
    /// a static node (public key, endpoint — `relay` on the relay path —
    /// AllowedIPs, handshake, counters; no persistent keepalive: managed
    /// nodes use disco keepalives), flattened into the same object.
    #[serde(flatten)]
    pub wg: PeerStatus,
}

fn ms(d: Duration) -> f64 {
    // Microsecond resolution is plenty for people.
    (d.as_micros() as f64) / 1000.0
}

/// Builds a managed node's status from the control state and the device's
/// counters (pure: the control loop calls it with its own parts).
pub(crate) fn managed_status(
    interface: &str,
    overlay: Option<&Overlay>,
    ctl: &Controller,
    info: &DeviceInfo,
    relay: LinkState,
    fast_udp: bool,
    now: SystemTime,
) -> ManagedStatus {
    // The relay path rides the fast UDP channel when it is up, else this node's relay connection.
    let transport = match &relay {
        LinkState::Connected(_) if fast_udp => Some("udp".to_owned()),
        LinkState::Connected(a) => a.transport.map(|k| k.as_str().to_owned()),
        _ => None,
    };
    let mut peers: Vec<ManagedPeer> = Vec::new();
    if let Some(o) = overlay {
        for (key, p) in &o.peers {
            let state = ctl.peer_state(key);
            let (path, latency) = match state.map(|s| (s.path, s)) {
                Some((PeerPathKind::Direct(_), s)) => ("direct", s.direct_rtt),
                Some((PeerPathKind::Relay, s)) => ("relay", s.relay_rtt),
                None => ("relay", None),
            };
            peers.push(ManagedPeer {
                name: p.name.clone(),
                ipv4: p.ipv4,
                ipv6: p.ipv6,
                tags: p.tags.clone(),
                online: p.online,
                home: p.home.clone(),
                path: path.to_owned(),
                relay_transport: (path == "relay").then(|| transport.clone()).flatten(),
                latency_ms: latency.map(ms),
                wg: PeerStatus {
                    public_key: key.to_base64(),
                    ..PeerStatus::default()
                },
            });
        }
    }
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let mut st = ManagedStatus {
        interface: interface.to_owned(),
        mode: "managed".to_owned(),
        public_key: info
            .private_key
            .as_ref()
            .map(|k| k.public_key().to_base64()),
        listen_port: info.listen_port,
        node: overlay.map(|o| NodeStatus {
            name: o.me.name.clone(),
            ipv4: o.me.ipv4,
            ipv6: o.me.ipv6,
            tags: o.me.tags.clone(),
        }),
        relay,
        fleet: None,
        candidates: ctl.candidates(),
        peers,
    };
    st.refresh_counters(info, now);
    st
}

impl ManagedPeer {
    /// The path as people read it: `direct 198.51.100.6:41641`, `relay tcp`,
    /// `relay quic` (`relay` while the transport is unknown).
    pub fn path_text(&self) -> String {
        match (self.path.as_str(), &self.wg.endpoint, &self.relay_transport) {
            ("direct", Some(e), _) => format!("direct {e}"),
            ("relay", _, Some(t)) => format!("relay {t}"),
            (other, _, _) => other.to_owned(),
        }
    }
}

impl ManagedStatus {
    /// Takes the WireGuard side (endpoint, AllowedIPs, handshake, byte
    /// counts) from the device as of `now`: the control socket calls this
    /// per request, so counters are current even though the control state
    /// is a snapshot.
    pub(crate) fn refresh_counters(&mut self, info: &DeviceInfo, now: SystemTime) {
        let by_key: std::collections::HashMap<String, &PeerInfo> = info
            .peers
            .iter()
            .map(|d| (d.public_key.to_base64(), d))
            .collect();
        let since = since_epoch(now);
        for p in &mut self.peers {
            if let Some(d) = by_key.get(&p.wg.public_key) {
                p.wg = PeerStatus::new(d, since);
            }
        }
        self.listen_port = info.listen_port;
    }

    /// Recomputes the handshake ages for `now` (the snapshot may be up to a
    /// second old when it is rendered).
    pub fn refresh_ages(&mut self, now: SystemTime) {
        let now = since_epoch(now).as_secs();
        for p in &mut self.peers {
            p.wg.latest_handshake_age_s = p.wg.latest_handshake_unix.map(|h| now.saturating_sub(h));
        }
    }

    /// The peer called `target` (also `NAME.<MagicDNS domain>`), or owning
    /// overlay address `target`.
    pub fn find_peer(&self, target: &str) -> Option<&ManagedPeer> {
        if let Ok(ip) = target.parse::<std::net::IpAddr>() {
            return self.peers.iter().find(|p| ip == p.ipv4 || ip == p.ipv6);
        }
        let t = target.trim_end_matches('.').to_ascii_lowercase();
        let suffix = format!(".{}", crate::dns::DEFAULT_DOMAIN);
        let name = t.strip_suffix(&suffix).unwrap_or(&t);
        self.peers.iter().find(|p| p.name == name)
    }
}

/// A duration in milliseconds as people read it: `0.42 ms`, `12 ms`, `1.5 s`.
pub fn fmt_ms(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else {
        format!("{:.1} s", ms / 1000.0)
    }
}

fn tags_text(tags: &[String]) -> String {
    if tags.is_empty() {
        "(none)".to_owned()
    } else {
        tags.join(", ")
    }
}

/// A fleet's relays on one line, the home first: `relay-a (eu) 5.1 ms home,
/// relay-b (us) 40.2 ms, relay-c (ap) no answer`.
pub fn fleet_text(f: &tunnel_relay::client::FleetView) -> String {
    let rtts = f.rtts();
    let mut relays: Vec<&tunnel_relay::wire::RelayEntry> = f.relays.iter().collect();
    relays.sort_by_key(|r| {
        let rtt = rtts.get(&r.name).copied().flatten();
        (
            f.home.as_deref() != Some(r.name.as_str()),
            rtt.is_none(),
            rtt,
            r.name.clone(),
        )
    });
    relays
        .iter()
        .map(|r| {
            let region = if r.region.is_empty() {
                String::new()
            } else {
                format!(" ({})", r.region)
            };
            let rtt = match rtts.get(&r.name).copied().flatten() {
                Some(d) => format!(" {}", fmt_ms(d.as_secs_f64() * 1000.0)),
                None => " no answer".to_owned(),
            };
            let home = if f.home.as_deref() == Some(r.name.as_str()) {
                " home"
            } else {
                ""
            };
            format!("{}{region}{rtt}{home}", r.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Renders a managed node's state: `wg show`'s layout with the mesh's view.
pub fn render_managed_human(s: &ManagedStatus, now: SystemTime) -> String {
    let mut out = format!("interface: {} (managed)\n", s.interface);
    if let Some(n) = &s.node {
        out += &format!("  node: {} ({}, {})\n", n.name, n.ipv4, n.ipv6);
        out += &format!("  tags: {}\n", tags_text(&n.tags));
    }
    if let Some(k) = &s.public_key {
        out += &format!("  public key: {k}\n");
    }
    if s.listen_port != 0 {
        out += &format!("  listening port: {}\n", s.listen_port);
    }
    let relay = match &s.relay {
        LinkState::Connecting { attempt: 1 } => "connecting".to_owned(),
        LinkState::Connecting { attempt } => format!("connecting (attempt {attempt})"),
        LinkState::Connected(a) => match a.transport {
            Some(t) => format!("connected to {} ({t})", a.address),
            None => format!("connected to {}", a.address),
        },
        LinkState::Retrying {
            last_error,
            retry_in_ms,
            ..
        } => format!("reconnecting ({last_error}), next try in {retry_in_ms} ms"),
        LinkState::Failed { reason } => format!("refused: {reason}"),
        LinkState::Stopped => "stopped".to_owned(),
    };
    out += &format!("  relay: {relay}\n");
    if let Some(f) = &s.fleet {
        out += &format!("  relays: {}\n", fleet_text(f));
    }
    if !s.candidates.is_empty() {
        let c: Vec<String> = s
            .candidates
            .iter()
            .map(|c| {
                let kind = match c.kind {
                    CandidateKind::Local => "local",
                    CandidateKind::Reflexive => "reflexive",
                };
                format!("{} ({kind})", c.addr)
            })
            .collect();
        out += &format!("  candidates: {}\n", c.join(", "));
    }
    for p in &s.peers {
        out += &format!("\npeer: {} ({}, {})\n", p.name, p.ipv4, p.ipv6);
        out += &format!("  public key: {}\n", p.wg.public_key);
        out += &format!("  tags: {}\n", tags_text(&p.tags));
        let latency = p
            .latency_ms
            .map(|l| format!(", latency {}", fmt_ms(l)))
            .unwrap_or_default();
        out += &format!("  path: {}{latency}\n", p.path_text());
        out += &format!("  online: {}\n", if p.online { "yes" } else { "no" });
        if let Some(h) = &p.home {
            out += &format!("  home relay: {h}\n");
        }
        if let Some(hs) = p.wg.latest_handshake_unix {
            out += &format!(
                "  latest handshake: {}\n",
                ago(Duration::from_secs(hs), now)
            );
        }
        if p.wg.rx_bytes != 0 || p.wg.tx_bytes != 0 {
            out += &format!(
                "  transfer: {} received, {} sent\n",
                bytes(p.wg.rx_bytes),
                bytes(p.wg.tx_bytes)
            );
        }
    }
    out
}

/// Peers ordered like `wg show`: latest handshake first, never-handshaken
/// last, otherwise in device order.
fn sorted_peers(info: &DeviceInfo) -> Vec<&PeerInfo> {
    let mut peers: Vec<&PeerInfo> = info.peers.iter().collect();
    peers.sort_by_key(|p| std::cmp::Reverse(p.last_handshake));
    peers
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// `wg show`'s handshake age: "Now", "N units, ... ago", or a clock warning.
fn ago(handshake: Duration, now: SystemTime) -> String {
    let now = since_epoch(now).as_secs();
    let then = handshake.as_secs();
    if now == then {
        "Now".to_owned()
    } else if now < then {
        "(System clock wound backward; connection problems may ensue.)".to_owned()
    } else {
        format!("{} ago", pretty_time(now - then))
    }
}

/// `wg show`'s duration format: "1 year, 2 days, 1 minute, 5 seconds".
fn pretty_time(secs: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (365 * 24 * 3600, "year"),
        (24 * 3600, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    if secs == 0 {
        return "0 seconds".to_owned();
    }
    let mut rest = secs;
    let mut parts = Vec::new();
    for (size, name) in UNITS {
        let n = rest / size;
        rest %= size;
        if n != 0 {
            let plural = if n == 1 { "" } else { "s" };
            parts.push(format!("{n} {name}{plural}"));
        }
    }
    parts.join(", ")
}

/// `wg show`'s byte counts: "512 B", "1.20 KiB", "3.45 MiB", ...
fn bytes(b: u64) -> String {
    const KIB: u64 = 1024;
    let f = b as f64;
    if b < KIB {
        format!("{b} B")
    } else if b < KIB.pow(2) {
        format!("{:.2} KiB", f / KIB as f64)
    } else if b < KIB.pow(3) {
        format!("{:.2} MiB", f / KIB.pow(2) as f64)
    } else if b < KIB.pow(4) {
        format!("{:.2} GiB", f / KIB.pow(3) as f64)
    } else {
        format!("{:.2} TiB", f / KIB.pow(4) as f64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::key::{PresharedKey, PrivateKey, PublicKey};
    use crate::uapi::codec::format_get_response;
    use std::os::unix::net::UnixListener;

    fn pk(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn sample() -> (DeviceInfo, SystemTime) {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_065);
        let info = DeviceInfo {
            private_key: Some(PrivateKey::from_bytes([0x40; 32])),
            listen_port: 51820,
            fwmark: None,
            peers: vec![
                PeerInfo::new(pk(2)),
                PeerInfo {
                    public_key: pk(1),
                    preshared_key: Some(PresharedKey::from_bytes([9; 32])),
                    endpoint: Some("[fd00::1]:51820".parse().unwrap()),
                    last_handshake: Some(Duration::new(1_700_000_000, 500)),
                    rx_bytes: 1229,
                    tx_bytes: 3_617_587,
                    persistent_keepalive: Some(25),
                    allowed_ips: crate::parsed(&["10.0.0.2/32", "fd00::/64"]),
                },
            ],
        };
        (info, now)
    }

    #[test]
    fn human_like_wg_show() {
        let (info, now) = sample();
        let public = PrivateKey::from_bytes([0x40; 32]).public_key();
        let expected = format!(
            "interface: wg0\n\
             \x20 public key: {public}\n\
             \x20 private key: (hidden)\n\
             \x20 listening port: 51820\n\
             \n\
             peer: {}\n\
             \x20 preshared key: (hidden)\n\
             \x20 endpoint: [fd00::1]:51820\n\
             \x20 allowed ips: 10.0.0.2/32, fd00::/64\n\
             \x20 latest handshake: 1 minute, 5 seconds ago\n\
             \x20 transfer: 1.20 KiB received, 3.45 MiB sent\n\
             \x20 persistent keepalive: every 25 seconds\n\
             \n\
             peer: {}\n\
             \x20 allowed ips: (none)\n",
            pk(1),
            pk(2)
        );
        assert_eq!(render_human("wg0", &info, now), expected);
    }

    #[test]
    fn human_minimal() {
        let info = DeviceInfo {
            fwmark: Some(0xca6c),
            ..Default::default()
        };
        assert_eq!(
            render_human("wg1", &info, SystemTime::now()),
            "interface: wg1\n  fwmark: 0xca6c\n"
        );
    }

    #[test]
    fn json_schema() {
        let (info, now) = sample();
        let v = render_json("wg0", &info, now);
        let public = PrivateKey::from_bytes([0x40; 32]).public_key();
        assert_eq!(
            v,
            json!({
                "interface": "wg0",
                "public_key": public.to_base64(),
                "listen_port": 51820,
                "peers": [
                    {
                        "public_key": pk(1).to_base64(),
                        "endpoint": "[fd00::1]:51820",
                        "allowed_ips": ["10.0.0.2/32", "fd00::/64"],
                        "latest_handshake_unix": 1_700_000_000u64,
                        "latest_handshake_age_s": 65,
                        "rx_bytes": 1229,
                        "tx_bytes": 3_617_587,
                        "persistent_keepalive_s": 25,
                    },
                    {
                        "public_key": pk(2).to_base64(),
                        "endpoint": null,
                        "allowed_ips": [],
                        "latest_handshake_unix": null,
                        "latest_handshake_age_s": null,
                        "rx_bytes": 0,
                        "tx_bytes": 0,
                        "persistent_keepalive_s": null,
                    }
                ]
            })
        );
        // The peers read back as `PeerStatus`; a missing `null` field is refused.
        let peers: Vec<PeerStatus> = serde_json::from_value(v["peers"].clone()).unwrap();
        assert_eq!(peers[1].endpoint, None);
        assert_eq!(serde_json::to_value(&peers).unwrap(), v["peers"]);
        let mut partial = v["peers"][1].clone();
        partial.as_object_mut().unwrap().remove("endpoint");
        let err = serde_json::from_value::<PeerStatus>(partial).unwrap_err();
        assert!(err.to_string().contains("endpoint"), "{err}");
        let text = v.to_string();
        assert!(!text.contains(&PrivateKey::from_bytes([0x40; 32]).to_base64()));
        assert!(!text.contains(&PresharedKey::from_bytes([9; 32]).to_base64()));
        let empty = render_json("wg0", &DeviceInfo::default(), now);
        assert_eq!(empty["public_key"], Value::Null);
        assert_eq!(empty["peers"], json!([]));
    }

    #[test]
    fn handshake_ages() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(ago(Duration::from_secs(1000), now), "Now");
        assert_eq!(ago(Duration::from_secs(999), now), "1 second ago");
        assert!(ago(Duration::from_secs(1001), now).contains("wound backward"));
        assert_eq!(
            pretty_time(365 * 86400 + 2 * 86400 + 3600 + 60 + 2),
            "1 year, 2 days, 1 hour, 1 minute, 2 seconds"
        );
        assert_eq!(pretty_time(0), "0 seconds");
    }

    #[test]
    fn milliseconds() {
        assert_eq!(fmt_ms(0.419), "0.42 ms");
        assert_eq!(fmt_ms(12.4), "12 ms");
        assert_eq!(fmt_ms(1500.0), "1.5 s");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.00 KiB");
        assert_eq!(bytes(1229), "1.20 KiB");
        assert_eq!(bytes(3_617_587), "3.45 MiB");
        assert_eq!(bytes(5 << 30), "5.00 GiB");
        assert_eq!(bytes(3 << 40), "3.00 TiB");
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("weft-status-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn query_missing_socket_hints() {
        let path = socket_path("missing");
        let e = query(&path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("is `mesh up` running for this interface?"),
            "{msg}"
        );
    }

    /// Serves one connection: checks the request, sends `reply`.
    fn serve_once(name: &str, reply: String) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = socket_path(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 7];
            conn.read_exact(&mut req).unwrap();
            assert_eq!(&req, b"get=1\n\n");
            conn.write_all(reply.as_bytes()).unwrap();
        });
        (path, handle)
    }

    #[test]
    fn query_roundtrip() {
        let (info, _) = sample();
        let (path, handle) = serve_once("ok", format_get_response(&info));
        let got = query(&path).unwrap();
        handle.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(got, info);
    }

    #[test]
    fn query_device_errno() {
        let (path, handle) = serve_once("errno", "errno=5\n\n".to_owned());
        let e = query(&path).unwrap_err();
        handle.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(&e, StatusError::Response { source, .. } if source.errno() == 5));
    }

    /// The sample node's relay link: connected over the TCP/TLS fallback.
    fn connected_over_tcp() -> LinkState {
        LinkState::Connected(tunnel_relay::link::Admitted {
            address: "203.0.113.2:4433".parse().unwrap(),
            name: "alice".into(),
            tags: vec!["engineer".into()],
            transport: Some(tunnel_relay::transport::Kind::Tcp),
        })
    }

    /// A managed node with one peer (gpu1) on the relay path.
    fn managed_sample() -> (ManagedStatus, PrivateKey) {
        managed_sample_with(connected_over_tcp())
    }

    /// [`managed_sample`] with the relay link `relay`.
    fn managed_sample_with(relay: LinkState) -> (ManagedStatus, PrivateKey) {
        use std::sync::Arc;
        use weft_proto::acl::AclPolicy;
        use weft_proto::peermap::{PeerMap, PeerMapUpdate, SelfInfo, Snapshot, Version};
        let me = PrivateKey::from_bytes([0x41; 32]);
        let gpu = PrivateKey::from_bytes([0x42; 32]).public_key();
        let peer = Arc::new(weft_proto::peermap::Peer {
            key: gpu,
            name: "gpu1".into(),
            tags: vec!["worker".into()],
            ipv4: Ipv4Addr::new(100, 64, 0, 9),
            ipv6: "fd7a:7765:6674::6440:9".parse().unwrap(),
            endpoints: vec![Candidate {
                addr: "198.51.100.6:41641".parse().unwrap(),
                kind: CandidateKind::Local,
            }],
            online: true,
            home: Some("relay-eu".into()),
        });
        let snap = Snapshot {
            version: Version { epoch: 1, seq: 0 },
            me: SelfInfo {
                name: "alice".into(),
                tags: vec!["engineer".into()],
                ipv4: Ipv4Addr::new(100, 64, 0, 7),
                ipv6: "fd7a:7765:6674::6440:7".parse().unwrap(),
            },
            filter: AclPolicy::default().inbound_filter(&["engineer".into()]),
            peers: vec![peer],
        };
        let mut map = PeerMap::default();
        map.apply(&PeerMapUpdate::Snapshot(snap)).unwrap();
        let mut ctl = Controller::new(me.clone(), crate::path::PathConfig::default(), 5);
        let t0 = std::time::Instant::now();
        let _ = ctl.set_local_addrs(t0, crate::parsed(&["198.51.100.5:41641"]));
        let _ = ctl.on_peer_map(t0, &map);
        let info = DeviceInfo {
            private_key: Some(me.clone()),
            listen_port: 41641,
            fwmark: None,
            peers: vec![PeerInfo {
                public_key: gpu,
                preshared_key: None,
                endpoint: Some(crate::device::relay_endpoint(0)),
                last_handshake: Some(Duration::from_secs(1_700_000_000)),
                rx_bytes: 2048,
                tx_bytes: 100,
                persistent_keepalive: None,
                allowed_ips: crate::parsed(&["100.64.0.9/32"]),
            }],
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_005);
        let st = managed_status(
            "weft0",
            ctl.overlay().map(|o| &**o),
            &ctl,
            &info,
            relay,
            false,
            now,
        );
        (st, me)
    }

    #[test]
    fn managed_json_is_a_superset_of_the_static_format() {
        let (st, me) = managed_sample();
        let v = serde_json::to_value(&st).unwrap();
        assert_eq!(v["mode"], "managed");
        assert_eq!(v["self"]["name"], "alice");
        assert_eq!(v["self"]["ipv4"], "100.64.0.7");
        assert_eq!(v["self"]["tags"], json!(["engineer"]));
        assert_eq!(
            v["relay"],
            json!({"state": "connected", "address": "203.0.113.2:4433",
                "relay": "203.0.113.2:4433", "name": "alice", "tags": ["engineer"],
                "transport": "tcp"})
        );
        assert_eq!(
            v["candidates"],
            json!([{"addr": "198.51.100.5:41641", "kind": "local"}])
        );
        let p = &v["peers"][0];
        assert_eq!(p["name"], "gpu1");
        assert_eq!(p["ipv4"], "100.64.0.9");
        assert_eq!(p["ipv6"], "fd7a:7765:6674::6440:9");
        assert_eq!(p["tags"], json!(["worker"]));
        assert_eq!(p["online"], true);
        assert_eq!(p["path"], "relay");
        assert_eq!(p["relay_transport"], "tcp");
        assert_eq!(p["endpoint"], "relay");
        assert_eq!(p["latency_ms"], Value::Null);
        assert_eq!(p["latest_handshake_age_s"], 5);
        assert_eq!(p["rx_bytes"], 2048);
        // Every field of the stable static format is there.
        let (info, now) = sample();
        let stat = render_json("wg0", &info, now);
        for k in stat.as_object().unwrap().keys() {
            assert!(v.get(k).is_some(), "top-level {k} missing");
        }
        for k in stat["peers"][0].as_object().unwrap().keys() {
            assert!(p.get(k).is_some(), "peer field {k} missing");
        }
        // No private key, and a round trip through the control socket's JSON.
        assert!(!v.to_string().contains(&me.to_base64()));
        let back: ManagedStatus = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back, st);
        // A node that predates `relay_transport` still reads.
        let mut old = v;
        old["peers"][0]
            .as_object_mut()
            .unwrap()
            .remove("relay_transport");
        let back: ManagedStatus = serde_json::from_value(old).unwrap();
        assert_eq!(back.peers[0].relay_transport, None);
    }

    #[test]
    fn relay_transport_follows_the_link() {
        let (st, _) = managed_sample();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_065);
        let text = render_managed_human(&st, now);
        for want in [
            "  relay: connected to 203.0.113.2:4433 (tcp)\n",
            "  path: relay tcp\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // While the link is down the relay path has no transport to show.
        let (down, _) = managed_sample_with(LinkState::Connecting { attempt: 2 });
        assert_eq!(down.peers[0].relay_transport, None);
        assert_eq!(down.peers[0].path_text(), "relay");
        let v = serde_json::to_value(&down).unwrap();
        assert_eq!(v["peers"][0]["relay_transport"], Value::Null);
        // A direct peer has none either.
        let mut p = st.peers[0].clone();
        p.path = "direct".into();
        p.relay_transport = None;
        p.wg.endpoint = Some("198.51.100.6:41641".into());
        assert_eq!(p.path_text(), "direct 198.51.100.6:41641");
    }

    #[test]
    fn managed_human() {
        let (mut st, _) = managed_sample();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_065);
        st.refresh_ages(now);
        assert_eq!(st.peers[0].wg.latest_handshake_age_s, Some(65));
        st.peers[0].path = "direct".into();
        st.peers[0].relay_transport = None;
        st.peers[0].wg.endpoint = Some("198.51.100.6:41641".into());
        st.peers[0].latency_ms = Some(0.42);
        let text = render_managed_human(&st, now);
        for want in [
            "interface: weft0 (managed)\n",
            "  node: alice (100.64.0.7, fd7a:7765:6674::6440:7)\n",
            "  tags: engineer\n",
            "  relay: connected to 203.0.113.2:4433 (tcp)\n",
            "  candidates: 198.51.100.5:41641 (local)\n",
            "\npeer: gpu1 (100.64.0.9, fd7a:7765:6674::6440:9)\n",
            "  path: direct 198.51.100.6:41641, latency 0.42 ms\n",
            "  online: yes\n",
            "  home relay: relay-eu\n",
            "  latest handshake: 1 minute, 5 seconds ago\n",
            "  transfer: 2.00 KiB received, 100 B sent\n",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        st.relay = LinkState::Retrying {
            attempt: 2,
            last_error: "timed out".into(),
            retry_in_ms: 500,
        };
        assert!(render_managed_human(&st, now)
            .contains("  relay: reconnecting (timed out), next try in 500 ms\n"));
    }
}
