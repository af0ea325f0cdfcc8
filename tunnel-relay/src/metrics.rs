//! Prometheus metrics of the relay (text format on `GET /metrics` at the
//! configured `metrics_listen` address; off by default).
//!
//! - `weft_relay_connected_nodes` (gauge): admitted connections open now.
//! - `weft_relay_open_tunnels` (gauge): tunnels being spliced now.
//! - `weft_relay_bytes_relayed_total{direction="to_worker"|"to_engineer"}` (counter).
//! - `weft_relay_refusals_total{reason=...}` (counter): refused admissions and
//!   tunnel opens, by [`Reason`] name (e.g. `token_expired`, `not_allowed`).
//! - `weft_relay_connections_rate_limited_total` (counter).
//! - `weft_relay_datagrams_relayed_total`, `weft_relay_datagram_bytes_total`,
//!   `weft_relay_datagrams_dropped_total` (counters): the mesh's relay path
//!   (WireGuard packets as QUIC datagrams); dropped = malformed, peer not
//!   connected, not allowed by policy, or too large for the peer's path.
//! - `weft_relay_stun_answered_total`, `weft_relay_stun_dropped_total`
//!   (counters): STUN binding requests answered / datagrams ignored (not a
//!   binding request, or over 100 answers per second to one source IP).
//! - `weft_relay_mesh_nodes` (gauge): nodes registered in the mesh
//!   coordinator (online or not); `weft_relay_mesh_sessions` (gauge): mesh
//!   control sessions open now.
//! - `weft_relay_mesh_sessions_dropped_total` (counter): control sessions
//!   dropped because the node read too slowly (it reconnects and resyncs).
//! - `weft_relay_mesh_call_me_maybe_total{result="forwarded"|"offline"|"refused"}`
//!   (counter): call-me-maybe requests, by outcome (refused = the ACL does
//!   not let the two nodes talk, or no such peer).
//! - `weft_relay_handshake_failures_total{cause="timeout"|"error"}` (counter):
//!   connections that never finished QUIC + Noise admission (no reason could
//!   be sent: scanners, wrong keys, dead links).
//! - `weft_relay_transport_connections_total{transport="quic"|"tcp"}` (counter):
//!   admitted connections by transport (tcp = the TLS fallback for networks
//!   that block UDP).
//! - `weft_relay_fast_relayed_total` (counter): relay-path packets forwarded
//!   on the fast UDP path (channel header, GRO/GSO batches; also counted in
//!   `datagrams_relayed_total`); dropped ones (unbound source, policy, bad
//!   binds) count in `datagrams_dropped_total`.
//! - `weft_relay_fleet_forwarded_total`, `weft_relay_fleet_delivered_total`
//!   (counters): relay-path packets handed to another relay of the fleet (the
//!   destination is homed there) and packets another relay handed here and
//!   delivered.
//! - `weft_relay_fleet_redirects_total` (counter): tunnel opens answered with
//!   a redirect to the worker's home relay (the engineer opens it there).
//! - `weft_relay_tcp_refused_total{cause="tls"|"http"|"framing"|"timeout"|"rate"|"busy"}`
//!   (counter): TCP connections that never reached admission (not TLS, a cut
//!   or bad handshake; no usable HTTP request; after the upgrade, bytes that
//!   are not Weft's framing or none at all; too slow; over the per-IP rate;
//!   over `limits.max_pending_tcp_connections` awaiting admission at once);
//!   `weft_relay_tcp_answered_total` (counter): plain HTTP requests answered
//!   (`/`, the probe, errors); `weft_relay_tcp_pending` (gauge): TCP
//!   connections accepted and not admitted yet (what that limit caps).
//! - `weft_relay_info{relay=NAME,region=REGION,version=VERSION}` (gauge, always
//!   1): who this relay is (`name`, `region` and the crate version), set once
//!   at startup; dashboards join the unlabelled families to it on
//!   `instance`/`job` to show them per relay and region
//!   (`deploy/grafana/weft-dashboard.json`).

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::wire::Reason;

type Labels = Vec<(String, String)>;

/// The relay's metrics.
pub struct Metrics {
    registry: Registry,
    /// Admitted connections open now.
    pub connected: Gauge,
    /// Tunnels open now.
    pub tunnels: Gauge,
    /// Bytes towards the worker.
    pub to_worker: Counter,
    /// Bytes towards the engineer.
    pub to_engineer: Counter,
    /// Connections refused by the per-IP rate limit.
    pub rate_limited: Counter,
    /// Relay-path datagrams forwarded.
    pub datagrams_relayed: Counter,
    /// Packet bytes in forwarded datagrams.
    pub datagram_bytes: Counter,
    /// Relay-path datagrams dropped.
    pub datagrams_dropped: Counter,
    /// STUN binding requests answered.
    pub stun_answered: Counter,
    /// Datagrams on the STUN port that were not binding requests, or over the per-IP rate.
    pub stun_dropped: Counter,
    /// Admissions that timed out.
    pub handshake_timeouts: Counter,
    /// Admissions that failed (QUIC/TLS/Noise error, wrong relay key).
    pub handshake_errors: Counter,
    /// Nodes in the mesh coordinator.
    pub mesh_nodes: Gauge,
    /// Mesh control sessions open now.
    pub mesh_sessions: Gauge,
    /// Mesh control sessions dropped as too slow.
    pub mesh_sessions_dropped: Counter,
    call_me_maybe: Family<Labels, Counter>,
    refusals: Family<Labels, Counter>,
    transports: Family<Labels, Counter>,
    tcp_refused: Family<Labels, Counter>,
    /// Plain HTTP requests answered on the TCP port.
    pub tcp_answered: Counter,
    /// TCP connections accepted and not admitted yet.
    pub tcp_pending: Gauge,
    /// Relay-path packets forwarded on the fast UDP path (also in `datagrams_relayed`).
    pub fast_relayed: Counter,
    /// Relay-path packets handed to another relay of the fleet (the destination's home).
    pub fleet_forwarded: Counter,
    /// Relay-path packets another relay of the fleet handed here and delivered.
    pub fleet_delivered: Counter,
    /// Tunnel opens redirected to the worker's home relay.
    pub fleet_redirects: Counter,
    info: Family<Labels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("weft_relay");
        let r = &mut registry;
        let connected: Gauge = registered(r, "connected_nodes", "Admitted connections open now");
        let tunnels: Gauge = registered(r, "open_tunnels", "Tunnels being spliced now");
        let bytes: Family<Labels, Counter> =
            registered(r, "bytes_relayed", "Bytes relayed through tunnels");
        let refusals = registered(
            r,
            "refusals",
            "Refused admissions and tunnel opens by reason",
        );
        let rate_limited = registered(
            r,
            "connections_rate_limited",
            "New connections refused by the per-IP rate limit",
        );
        let datagrams_relayed = registered(
            r,
            "datagrams_relayed",
            "Mesh packets forwarded on the relay path",
        );
        let datagram_bytes = registered(
            r,
            "datagram_bytes",
            "Mesh packet bytes forwarded on the relay path",
        );
        let datagrams_dropped = registered(
            r,
            "datagrams_dropped",
            "Mesh packets dropped on the relay path",
        );
        let stun_answered = registered(r, "stun_answered", "STUN binding requests answered");
        let stun_dropped = registered(
            r,
            "stun_dropped",
            "Datagrams on the STUN port that were not binding requests",
        );
        let hs: Family<Labels, Counter> = registered(
            r,
            "handshake_failures",
            "Connections that did not finish admission",
        );
        let cause = |c: &str| vec![("cause".to_string(), c.to_string())];
        let handshake_timeouts = hs.get_or_create(&cause("timeout")).clone();
        let handshake_errors = hs.get_or_create(&cause("error")).clone();
        let mesh_nodes = registered(r, "mesh_nodes", "Nodes registered in the mesh coordinator");
        let mesh_sessions = registered(r, "mesh_sessions", "Mesh control sessions open now");
        let mesh_sessions_dropped = registered(
            r,
            "mesh_sessions_dropped",
            "Mesh control sessions dropped because the node read too slowly",
        );
        let call_me_maybe =
            registered(r, "mesh_call_me_maybe", "Call-me-maybe requests by outcome");
        let transports = registered(
            r,
            "transport_connections",
            "Admitted connections by transport (quic, tcp)",
        );
        let tcp_refused = registered(
            r,
            "tcp_refused",
            "TCP connections that never reached admission, by cause",
        );
        let tcp_answered = registered(
            r,
            "tcp_answered",
            "Plain HTTP requests answered on the TCP port",
        );
        let tcp_pending = registered(
            r,
            "tcp_pending",
            "TCP connections accepted and not admitted yet (TLS, HTTP upgrade, admission)",
        );
        let fast_relayed = registered(
            r,
            "fast_relayed",
            "Mesh packets forwarded on the fast UDP relay path (also counted in datagrams_relayed)",
        );
        let fleet_forwarded = registered(
            r,
            "fleet_forwarded",
            "Mesh packets handed to another relay of the fleet, where the destination is homed (also in datagrams_relayed)",
        );
        let fleet_delivered = registered(
            r,
            "fleet_delivered",
            "Mesh packets another relay of the fleet handed here, delivered to a node homed here",
        );
        let fleet_redirects = registered(
            r,
            "fleet_redirects",
            "Tunnel opens answered with a redirect to the worker's home relay of the fleet",
        );
        let info = registered(
            r,
            "info",
            "This relay: its fleet name, region and version (always 1)",
        );
        let dir = |d: &str| vec![("direction".to_string(), d.to_string())];
        let to_worker = bytes.get_or_create(&dir("to_worker")).clone();
        let to_engineer = bytes.get_or_create(&dir("to_engineer")).clone();
        Metrics {
            registry,
            connected,
            tunnels,
            to_worker,
            to_engineer,
            rate_limited,
            handshake_timeouts,
            handshake_errors,
            datagrams_relayed,
            datagram_bytes,
            datagrams_dropped,
            stun_answered,
            stun_dropped,
            mesh_nodes,
            mesh_sessions,
            mesh_sessions_dropped,
            call_me_maybe,
            refusals,
            transports,
            tcp_refused,
            tcp_answered,
            tcp_pending,
            fast_relayed,
            fleet_forwarded,
            fleet_delivered,
            fleet_redirects,
            info,
        }
    }

    /// Sets `weft_relay_info{relay, region, version}` to 1, replacing any
    /// identity set before (so one relay is one series).
    pub fn set_identity(&self, relay: &str, region: &str) {
        self.info.clear();
        let label = |k: &str, v: &str| (k.to_string(), label_value(v));
        let labels = vec![
            label("relay", relay),
            label("region", region),
            label("version", env!("CARGO_PKG_VERSION")),
        ];
        self.info.get_or_create(&labels).set(1);
    }

    /// Counts one admitted connection by transport.
    pub fn admitted_over(&self, transport: &str) {
        self.transports
            .get_or_create(&vec![("transport".to_string(), transport.to_string())])
            .inc();
    }

    /// Counts one TCP connection refused before admission.
    pub fn tcp_refused(&self, cause: &str) {
        self.tcp_refused
            .get_or_create(&vec![("cause".to_string(), cause.to_string())])
            .inc();
    }

    /// Counts one call-me-maybe by outcome.
    pub fn mesh_call_me_maybe(&self, result: &str) {
        self.call_me_maybe
            .get_or_create(&vec![("result".to_string(), result.to_string())])
            .inc();
    }

    /// Counts one refusal.
    pub fn refused(&self, reason: Reason) {
        self.refusals
            .get_or_create(&vec![("reason".to_string(), reason.as_str().to_string())])
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// `v` escaped as an OpenMetrics label value (the text encoder writes label
/// values as they are, and names and regions come from the config file).
fn label_value(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A new metric of type `M`, registered as `name` with `help`; the handle
/// returned shares its value with the registry.
fn registered<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Clone + Default,
{
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds the metrics listener (std socket, so binding errors surface early).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    TcpListener::from_std(l)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The dashboard operators import (`deploy/grafana/README.md`).
    const DASHBOARD: &str = include_str!("../../deploy/grafana/weft-dashboard.json");
    /// The worker agent's exposition, which writes each family's name as one string literal.
    const AGENT_METRICS: &str = include_str!("../../worker-agent/src/metrics.rs");

    /// The relay's exposition with a sample in every family: the identity set and each
    /// labelled family touched (an untouched family renders its `# HELP` and `# TYPE` only).
    fn rendered() -> String {
        let m = Metrics::new();
        m.set_identity("fra", "eu-central");
        m.refused(Reason::TokenExpired);
        m.admitted_over("tcp");
        m.tcp_refused("tls");
        m.mesh_call_me_maybe("forwarded");
        m.encode()
    }

    /// The series names in an exposition (what a PromQL selector names).
    fn sample_names(text: &str) -> BTreeSet<&str> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .filter(|n| !n.is_empty())
            .collect()
    }

    /// Every `weft_…` identifier in `text` (no `:`: that is for recording rules, and the
    /// dashboard's descriptions write `name: what it counts`).
    fn weft_names(text: &str) -> BTreeSet<&str> {
        let ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
        text.split(|c: char| !ident(c))
            .filter(|w| w.starts_with("weft_"))
            .collect()
    }

    #[test]
    fn info_names_the_relay_its_region_and_version_once() {
        let m = Metrics::new();
        assert!(!sample_names(&m.encode()).contains("weft_relay_info"));
        m.set_identity("old-name", "eu");
        m.set_identity("fra \"1\"", "eu-central");
        let text = m.encode();
        let want = format!(
            r#"weft_relay_info{{relay="fra \"1\"",region="eu-central",version="{}"}} 1"#,
            env!("CARGO_PKG_VERSION")
        );
        assert!(
            text.lines().any(|l| l == want),
            "{want:?} missing from\n{text}"
        );
        assert!(text.contains("# TYPE weft_relay_info gauge\n"), "{text}");
        assert!(!text.contains("old-name"), "{text}");
    }

    #[test]
    fn the_dashboard_queries_only_metrics_the_daemons_export() {
        let dashboard: serde_json::Value =
            serde_json::from_str(DASHBOARD).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(dashboard["schemaVersion"], 39);
        let relay = rendered();
        let exported = sample_names(&relay);
        let names = weft_names(DASHBOARD);
        assert!(
            names.contains("weft_relay_info") && names.contains("weft_gpu_utilization_percent"),
            "{names:?}"
        );
        for name in names {
            if name.starts_with("weft_relay_") {
                assert!(
                    exported.contains(name),
                    "{name} is not a series of the relay's /metrics:\n{relay}"
                );
            } else if name.starts_with("weft_gpu_") || name.starts_with("weft_agent_") {
                assert!(
                    AGENT_METRICS.contains(&format!("\"{name}\"")),
                    "{name} is not a family in worker-agent/src/metrics.rs"
                );
            } else {
                panic!("{name}: no daemon exports it (only the relay and the worker agent export weft_ metrics)");
            }
        }
    }
}
