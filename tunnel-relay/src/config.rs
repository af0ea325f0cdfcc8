//! The relay's configuration file (TOML). Every field is optional; the
//! defaults are documented on each field and in [`RelayConfig::default`].
//!
//! ```toml
//! # Addresses written into new join tokens (host:port). Default: none, then
//! # `token create --relay-addr` or the address `serve` listens on is used.
//! public_addrs = ["203.0.113.2:4433"]
//!
//! # Prometheus metrics (GET /metrics). Default: off.
//! metrics_listen = "127.0.0.1:9464"
//!
//! # Machines that providers add themselves (with a web view "Add a device"
//! # token or `token create --owner`) wait for an operator's approval
//! # (`nodes approve NAME` or the web view) before they are admitted. Tokens an
//! # operator hands out directly are approval enough; `"all"` holds every new
//! # node, whatever its token. Default: false. Applies at a reload (SIGHUP).
//! approve_devices = true
//!
//! # STUN binding responder (UDP) for the mesh's endpoint discovery. Default:
//! # the listen address's IP, port 3478 (an ephemeral port when `serve
//! # --listen` has port 0). `stun = false` turns it off.
//! stun = true
//! stun_listen = "0.0.0.0:3478"
//!
//! # The TCP/TLS fallback for networks that block UDP: TLS 1.3 with the same
//! # certificate, HTTP/1.1 upgraded to Weft's framing. Default: on, at the
//! # listen address's IP and port (so every token already names it);
//! # `tcp_listen` adds addresses (443 passes most firewalls). `tcp = false`
//! # turns it off.
//! tcp = true
//! tcp_listen = ["0.0.0.0:443"]
//!
//! # An operator-provided TLS certificate chain and key (PEM). Default: a
//! # self-signed certificate created in the state dir. Clients authenticate the
//! # relay by its Noise key either way; relative paths are relative to this file.
//! [tls]
//! cert_file = "/etc/weft/relay.crt"
//! key_file = "/etc/weft/relay.key"
//!
//! [limits]
//! max_streams_per_node = 1024          # concurrent tunnels per node
//! new_connections_per_ip_per_sec = 20  # also the burst size
//! handshake_timeout_ms = 10000         # QUIC + Noise admission
//! idle_timeout_ms = 30000              # QUIC idle timeout (keepalives keep clients up)
//! max_pending_tcp_connections = 4096   # TCP connections not admitted yet (more: refused, "busy")
//!
//! # Who may open whose services. Default: exactly this one rule.
//! [[policy.allow]]
//! from = "engineer"    # tag of the node opening the tunnel
//! to = "worker"        # tag of the node exposing the service
//! services = ["*"]     # service names, "*" = all (default)
//!
//! # The mesh coordinator (nodes that open a mesh control stream).
//! [mesh]
//! ipv4_pool = "100.64.0.0/10"          # overlay IPv4 addresses (default)
//! ipv6_prefix = "fd7a:7765:6674::/48"  # overlay IPv6 ULA prefix (default)
//! delta_log_len = 64                   # peer-map deltas kept per node for resync (default)
//!
//! # The mesh ACL: who may start flows to whom, by tags, protocol and port.
//! # It decides peer visibility (a node learns a peer only if one of them may
//! # start a flow to the other), the filter each node enforces on receive, and
//! # which relay-path datagrams the relay forwards. Default: exactly this rule.
//! [[mesh.acl.rule]]
//! from = "engineer"    # one tag or a list; "*" = any node
//! to = "worker"
//! proto = "tcp"        # tcp | udp | icmp | any (default any)
//! ports = [22, 7070]   # numbers or "lo-hi" strings (default: all)
//!
//! # The pool: GPU job scheduling across workers (`weft jobs submit`).
//! [pool]
//! policy = "binpack"       # binpack (fill workers) | spread (most free GPUs)
//! reserve_after = "10m"    # a job waiting longer reserves the next workers that free up
//! lost_after = "15s"       # a worker away this long is lost; its jobs are requeued
//! submit_tags = ["engineer", "operator"]   # who may submit (workers never may)
//! operator_tags = ["operator"]             # who sees and acts on every job
//! # gpu_quota = 8         # GPUs one engineer's jobs may hold or wait for (default: none)
//! # [pool.priority_max]   # the highest priority a tag may ask (default: no limit)
//! # engineer = 50
//! ```
//!
//! `policy` authorizes relay *tunnel streams* by service name (`Open`);
//! `mesh.acl` authorizes *mesh traffic* by protocol and port, including
//! WireGuard packets relayed as datagrams. Both defaults let engineers reach
//! workers and nothing else.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::coord::CoordConfig;
use crate::error::ConfigError;

/// The relay configuration.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Addresses put into new tokens. Default: empty.
    pub public_addrs: Vec<String>,
    /// Where to serve Prometheus metrics (`GET /metrics`). Default: off.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Answer STUN binding requests. Default: true.
    pub stun: bool,
    /// Where to answer them. Default: the listen IP, port 3478 (ephemeral
    /// when the listen port is 0).
    pub stun_listen: Option<std::net::SocketAddr>,
    /// Also listen on TCP (TLS) at the listen address. Default: true.
    pub tcp: bool,
    /// More TCP (TLS) addresses, e.g. `0.0.0.0:443`. Default: none.
    pub tcp_listen: Vec<std::net::SocketAddr>,
    /// Operator-provided certificate. Default: self-signed, in the state dir.
    pub tls: TlsFiles,
    /// Limits.
    pub limits: Limits,
    /// Authorization policy of tunnel streams.
    pub policy: Policy,
    /// The mesh coordinator: overlay pools, delta log, ACL. Default:
    /// [`CoordConfig::default`].
    pub mesh: CoordConfig,
    /// The pool scheduler. Default: [`PoolSettings::default`].
    pub pool: PoolSettings,
    /// Where the registry lives: `sqlite` (default) or a `postgres://` URL
    /// shared by a fleet of relays (`serve --store` overrides it).
    #[serde(deserialize_with = "store")]
    pub store: crate::registry::Store,
    /// This relay's name in a fleet (the records it writes to a shared
    /// store say which relay holds each node's session). Default: the
    /// host name.
    pub name: Option<String>,
    /// This relay's region in a fleet (shown by `relays list`). Default: `default`.
    pub region: Option<String>,
    /// Where to serve the web view (the explorer, `/api/v1`): HTTPS with `web_tls` or the
    /// relay's certificate, or plain HTTP with `web_plain_http` (behind a TLS-terminating
    /// reverse proxy). Default: off (`serve --web ADDR` turns it on).
    pub web_listen: Option<std::net::SocketAddr>,
    /// The web view's address as browsers reach it, e.g. `https://relay.example.com:8443`
    /// (what `weft web` links to). Default: `https://` the first `public_addrs` host and the
    /// `web_listen` port.
    pub web_url: Option<String>,
    /// Serve the web view over plain HTTP (only behind a reverse proxy that terminates TLS:
    /// the session cookie is `Secure`). Default: false.
    pub web_plain_http: bool,
    /// The web view's certificate. Default: the relay's (`tls`).
    pub web_tls: TlsFiles,
    /// Which new nodes wait for an operator's approval: `true` those joining with a token a
    /// provider account owns, `"all"` every new node. Default: false.
    pub approve_devices: crate::records::Approval,
}

fn store<'de, D: serde::Deserializer<'de>>(d: D) -> Result<crate::registry::Store, D::Error> {
    let s = String::deserialize(d)?;
    crate::registry::Store::parse(&s).map_err(serde::de::Error::custom)
}

/// `[pool]`: how the coordinator schedules GPU jobs.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// `binpack` (default) or `spread`.
    pub policy: PoolPolicy,
    /// A job pending longer than this reserves the next workers that free up. Default `10m`.
    #[serde(deserialize_with = "duration")]
    pub reserve_after: Duration,
    /// A worker away this long is lost and its jobs requeued. Default `15s`.
    #[serde(deserialize_with = "duration")]
    pub lost_after: Duration,
    /// Tags whose nodes may submit jobs. Default `["engineer", "operator"]`.
    pub submit_tags: Vec<String>,
    /// Tags whose nodes see and act on every job and worker. Default `["operator"]`.
    pub operator_tags: Vec<String>,
    /// GPUs one engineer's unfinished jobs may hold or wait for. Default: no limit.
    pub gpu_quota: Option<u32>,
    /// The highest priority each tag may ask for; a node gets the highest of its tags'
    /// limits. A tag not listed has no limit. Default: empty.
    pub priority_max: std::collections::BTreeMap<String, i32>,
}

/// The pool's choice among fitting workers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolPolicy {
    /// Fewest free GPUs left.
    #[default]
    Binpack,
    /// Most free GPUs.
    Spread,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            policy: PoolPolicy::Binpack,
            reserve_after: Duration::from_secs(600),
            lost_after: Duration::from_secs(15),
            submit_tags: vec!["engineer".into(), "operator".into()],
            operator_tags: vec!["operator".into()],
            gpu_quota: None,
            priority_max: Default::default(),
        }
    }
}

impl PoolSettings {
    /// The highest priority a node with `tags` may ask for, if limited.
    pub fn priority_limit(&self, tags: &[String]) -> Option<i32> {
        tags.iter()
            .filter_map(|t| self.priority_max.get(t).copied())
            .max()
    }
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    weft_proto::duration::parse(&s).map_err(serde::de::Error::custom)
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            public_addrs: Vec::new(),
            metrics_listen: None,
            tcp: true,
            tcp_listen: Vec::new(),
            stun: true,
            stun_listen: None,
            tls: TlsFiles::default(),
            limits: Limits::default(),
            policy: Policy::default(),
            mesh: CoordConfig::default(),
            pool: PoolSettings::default(),
            store: crate::registry::Store::Sqlite,
            name: None,
            region: None,
            web_listen: None,
            web_url: None,
            web_plain_http: false,
            web_tls: TlsFiles::default(),
            approve_devices: crate::records::Approval::Off,
        }
    }
}

/// The default STUN port (RFC 5389).
pub const STUN_PORT: u16 = 3478;

impl RelayConfig {
    /// This relay's fleet region: `region`, else `default`.
    pub fn region(&self) -> String {
        self.region.clone().unwrap_or_else(|| "default".into())
    }

    /// This relay's fleet name: `name`, else the host name.
    /// The web view's base URL (no trailing `/`), when it is on; `bound` is where it
    /// listens (its port replaces an ephemeral 0).
    pub fn web_base(&self, bound: Option<std::net::SocketAddr>) -> Option<String> {
        let listen = bound.or(self.web_listen)?;
        if let Some(u) = &self.web_url {
            return Some(u.trim_end_matches('/').to_string());
        }
        let host = self
            .public_addrs
            .first()
            .map(|a| match a.rsplit_once(':') {
                Some((h, p)) if p.parse::<u16>().is_ok() => h.to_string(),
                _ => a.clone(),
            })
            .unwrap_or_else(|| {
                if listen.ip().is_unspecified() {
                    "localhost".into()
                } else {
                    match listen.ip() {
                        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                        v4 => v4.to_string(),
                    }
                }
            });
        Some(format!("https://{host}:{}", listen.port()))
    }

    pub fn relay_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "relay".into())
        })
    }

    /// Where the STUN responder binds for a relay listening on `listen`.
    pub fn stun_addr(&self, listen: std::net::SocketAddr) -> Option<std::net::SocketAddr> {
        if !self.stun {
            return None;
        }
        Some(self.stun_listen.unwrap_or_else(|| {
            let port = if listen.port() == 0 { 0 } else { STUN_PORT };
            std::net::SocketAddr::new(listen.ip(), port)
        }))
    }
}

/// An operator-provided certificate chain and private key, both PEM.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert_file: Option<std::path::PathBuf>,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<std::path::PathBuf>,
}

/// Resource limits.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Concurrent tunnels one node may have open (as opener or as target). Default 1024.
    pub max_streams_per_node: u32,
    /// New QUIC connections accepted per source IP per second (and burst). Default 20.
    pub new_connections_per_ip_per_sec: u32,
    /// Time for QUIC + Noise admission, in ms. Default 10000.
    pub handshake_timeout_ms: u64,
    /// QUIC idle timeout, in ms. Default 30000.
    pub idle_timeout_ms: u64,
    /// TCP connections (the TLS fallback) accepted but not admitted yet (TLS,
    /// the HTTP upgrade, Noise admission) at once; more are closed as soon as
    /// they are accepted and counted (`tcp_refused_total{cause="busy"}`), so a
    /// flood of idle sockets cannot use up the relay's file descriptors.
    /// Default 4096; the relay uses at most half its open-file limit
    /// ([`Limits::pending_tcp_cap`]).
    pub max_pending_tcp_connections: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_node: 1024,
            new_connections_per_ip_per_sec: 20,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 30_000,
            max_pending_tcp_connections: 4096,
        }
    }
}

impl Limits {
    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// How many TCP connections may await admission at once in a process
    /// that may have `nofile` descriptors open (its soft `RLIMIT_NOFILE`, if
    /// known): [`Limits::max_pending_tcp_connections`], but at most half of
    /// `nofile`, so that admitted connections, the listeners and the registry
    /// always have descriptors left (with more, `accept` would fail with
    /// `EMFILE` before the cap refused anything).
    pub fn pending_tcp_cap(&self, nofile: Option<u64>) -> usize {
        let want = u64::from(self.max_pending_tcp_connections);
        let cap = match nofile {
            Some(n) => want.min(n / 2).max(1),
            None => want,
        };
        usize::try_from(cap).unwrap_or(usize::MAX)
    }
}

/// Tag-based authorization.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Allow rules; anything not allowed is denied. Default: `engineer` → `worker`, all services.
    pub allow: Vec<AllowRule>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            allow: vec![AllowRule {
                from: "engineer".into(),
                to: "worker".into(),
                services: vec!["*".into()],
            }],
        }
    }
}

/// One allow rule.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AllowRule {
    /// Tag of the opening node.
    pub from: String,
    /// Tag of the target node.
    pub to: String,
    /// Services allowed; `"*"` means all. Default `["*"]`.
    #[serde(default = "all_services")]
    pub services: Vec<String>,
}

fn all_services() -> Vec<String> {
    vec!["*".into()]
}

impl Policy {
    /// Whether nodes tagged `a` and `b` may exchange packets at all: either
    /// may open some service on the other (replies flow both ways).
    pub fn may_talk(&self, a: &[String], b: &[String]) -> bool {
        self.allow.iter().any(|r| {
            (a.contains(&r.from) && b.contains(&r.to)) || (b.contains(&r.from) && a.contains(&r.to))
        })
    }

    /// Whether a node tagged `from` may open `service` on a node tagged `to`.
    pub fn allows(&self, from: &[String], to: &[String], service: &str) -> bool {
        self.allow.iter().any(|r| {
            from.contains(&r.from)
                && to.contains(&r.to)
                && r.services.iter().any(|s| s == "*" || s == service)
        })
    }
}

impl RelayConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<RelayConfig, ConfigError> {
        let cfg: RelayConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        let invalid = |message: &str| ConfigError::Invalid {
            origin: origin.to_string(),
            message: message.to_string(),
        };
        if cfg.limits.max_streams_per_node == 0 {
            return Err(invalid("limits.max_streams_per_node must be at least 1"));
        }
        if cfg.limits.new_connections_per_ip_per_sec == 0 {
            return Err(invalid(
                "limits.new_connections_per_ip_per_sec must be at least 1",
            ));
        }
        if cfg.limits.max_pending_tcp_connections == 0 {
            return Err(invalid(
                "limits.max_pending_tcp_connections must be at least 1",
            ));
        }
        if cfg.limits.handshake_timeout_ms < 100 || cfg.limits.idle_timeout_ms < 1000 {
            return Err(invalid(
                "limits.handshake_timeout_ms must be >= 100 and limits.idle_timeout_ms >= 1000",
            ));
        }
        if cfg.tls.cert_file.is_some() != cfg.tls.key_file.is_some() {
            return Err(invalid(
                "tls.cert_file and tls.key_file must be given together",
            ));
        }
        if cfg.pool.lost_after < Duration::from_secs(1) {
            return Err(invalid("pool.lost_after must be at least 1s"));
        }
        cfg.mesh
            .validate("[mesh.acl]")
            .map_err(|e| ConfigError::Invalid {
                origin: origin.to_string(),
                message: e.to_string(),
            })?;
        Ok(cfg)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<RelayConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = RelayConfig::parse(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for f in [&mut cfg.tls.cert_file, &mut cfg.tls.key_file]
            .into_iter()
            .flatten()
        {
            if f.is_relative() {
                *f = base.join(&*f);
            }
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::names::tags;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = RelayConfig::parse("", "t").map_err(|e| e.to_string());
        assert_eq!(c, Ok(RelayConfig::default()));
        let d = RelayConfig::default();
        assert_eq!(d.limits.max_streams_per_node, 1024);
        assert_eq!(d.limits.new_connections_per_ip_per_sec, 20);
        assert_eq!(d.limits.handshake_timeout(), Duration::from_secs(10));
        assert_eq!(d.limits.idle_timeout(), Duration::from_secs(30));
        assert_eq!(d.limits.max_pending_tcp_connections, 4096);
    }

    #[test]
    fn pending_tcp_cap_keeps_half_the_descriptors_free() {
        let d = Limits::default();
        // Unknown limit, or plenty (the hard limit a relay raises itself to): as configured.
        assert_eq!(d.pending_tcp_cap(None), 4096);
        assert_eq!(d.pending_tcp_cap(Some(524_288)), 4096);
        assert_eq!(d.pending_tcp_cap(Some(8192)), 4096);
        // The usual soft default: half of it, so admitted connections still get descriptors.
        assert_eq!(d.pending_tcp_cap(Some(1024)), 512);
        assert_eq!(d.pending_tcp_cap(Some(1)), 1);
        let c = RelayConfig::parse("[limits]\nmax_pending_tcp_connections = 100\n", "t")
            .expect("parse");
        assert_eq!(c.limits.pending_tcp_cap(Some(1024)), 100);
        let e = RelayConfig::parse("[limits]\nmax_pending_tcp_connections = 0\n", "relay.toml")
            .expect_err("zero");
        assert!(e.to_string().contains("max_pending_tcp_connections"), "{e}");
    }

    #[test]
    fn default_policy_engineer_to_worker_only() {
        let p = Policy::default();
        assert!(p.allows(&tags(&["engineer"]), &tags(&["worker"]), "ssh"));
        assert!(!p.allows(&tags(&["worker"]), &tags(&["worker"]), "ssh"));
        assert!(!p.allows(&tags(&["worker"]), &tags(&["engineer"]), "ssh"));
        assert!(!p.allows(&tags(&["engineer"]), &tags(&["engineer"]), "ssh"));
        assert!(!p.allows(&tags(&["guest"]), &tags(&["worker"]), "ssh"));
    }

    #[test]
    fn service_restricted_rule() {
        let c = RelayConfig::parse(
            "[[policy.allow]]\nfrom = \"ops\"\nto = \"worker\"\nservices = [\"metrics\"]\n",
            "t",
        );
        let Ok(c) = c else { panic!("parse") };
        assert!(c
            .policy
            .allows(&tags(&["ops"]), &tags(&["worker"]), "metrics"));
        assert!(!c.policy.allows(&tags(&["ops"]), &tags(&["worker"]), "ssh"));
        // Replacing the rules drops the default rule.
        assert!(!c
            .policy
            .allows(&tags(&["engineer"]), &tags(&["worker"]), "ssh"));
    }

    #[test]
    fn unknown_field_names_line() {
        let e = RelayConfig::parse("[limits]\nmax_streams = 3\n", "relay.toml");
        let msg = e
            .map(|_| ())
            .map_err(|e| e.to_string())
            .err()
            .unwrap_or_default();
        assert!(
            msg.contains("relay.toml") && msg.contains("max_streams") && msg.contains("line 2"),
            "{msg}"
        );
    }

    #[test]
    fn shipped_example_parses_to_the_defaults() {
        let text = include_str!("../../deploy/examples/relay.toml");
        let c = RelayConfig::parse(text, "deploy/examples/relay.toml").map_err(|e| e.to_string());
        assert_eq!(c, Ok(RelayConfig::default()));
    }

    #[test]
    fn stun_follows_the_listen_address_unless_set() {
        let c = RelayConfig::default();
        let l: std::net::SocketAddr = "203.0.113.2:4433".parse().expect("addr");
        assert_eq!(
            c.stun_addr(l),
            Some("203.0.113.2:3478".parse().expect("addr"))
        );
        let eph: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        assert_eq!(c.stun_addr(eph), Some(eph));
        let c = RelayConfig::parse("stun_listen = \"0.0.0.0:13478\"\n", "t").expect("parse");
        assert_eq!(c.stun_addr(l), Some("0.0.0.0:13478".parse().expect("addr")));
        let c = RelayConfig::parse("stun = false\n", "t").expect("parse");
        assert_eq!(c.stun_addr(l), None);
    }

    #[test]
    fn tls_files_go_together() {
        let e = RelayConfig::parse("[tls]\ncert_file = \"a.pem\"\n", "relay.toml");
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            msg.contains("relay.toml") && msg.contains("key_file"),
            "{msg}"
        );
    }

    #[test]
    fn tls_paths_relative_to_the_config_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("relay.toml");
        std::fs::write(
            &p,
            "[tls]\ncert_file = \"c.pem\"\nkey_file = \"/abs/k.pem\"\n",
        )
        .expect("write");
        let c = RelayConfig::load(&p).expect("load");
        assert_eq!(c.tls.cert_file, Some(dir.path().join("c.pem")));
        assert_eq!(c.tls.key_file, Some("/abs/k.pem".into()));
    }

    #[test]
    fn mesh_section_parses_and_is_validated() {
        use crate::coord::Proto;
        let c = RelayConfig::parse(
            "[mesh]\nipv4_pool = \"100.100.0.0/16\"\n[[mesh.acl.rule]]\nfrom = \"ops\"\nto = \"*\"\nproto = \"icmp\"\n",
            "relay.toml",
        )
        .expect("parse");
        assert_eq!(c.mesh.ipv4_pool.to_string(), "100.100.0.0/16");
        assert_eq!(c.mesh.delta_log_len, 64);
        assert_eq!(c.mesh.acl.rules.len(), 1);
        assert_eq!(c.mesh.acl.rules[0].proto, Proto::Icmp);
        // Listing rules replaces the default: engineers no longer see workers.
        assert!(!c
            .mesh
            .acl
            .may_talk(&tags(&["engineer"]), &tags(&["worker"])));
        for (text, want) in [
            ("[mesh]\npool = 1\n", "unknown field"),
            (
                "[[mesh.acl.rule]]\nfrom = \"Bad Tag\"\nto = \"x\"\n",
                "rule 1: tag",
            ),
            (
                "[[mesh.acl.rule]]\nfrom = \"a\"\nto = \"b\"\nproto = \"icmp\"\nports = [1]\n",
                "icmp has no ports",
            ),
        ] {
            let msg = RelayConfig::parse(text, "relay.toml")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                msg.contains("relay.toml") && msg.contains(want),
                "{text:?}: {msg}"
            );
        }
    }

    #[test]
    fn pool_section_parses_with_defaults_and_limits() {
        let d = PoolSettings::default();
        assert_eq!(d.policy, PoolPolicy::Binpack);
        assert_eq!(d.reserve_after, Duration::from_secs(600));
        assert_eq!(d.lost_after, Duration::from_secs(15));
        let c = RelayConfig::parse(
            "[pool]\npolicy = \"spread\"\nlost_after = \"5s\"\ngpu_quota = 8\n\
             [pool.priority_max]\nengineer = 50\nlead = 90\n",
            "t",
        )
        .expect("must succeed");
        assert_eq!(c.pool.policy, PoolPolicy::Spread);
        assert_eq!(c.pool.lost_after, Duration::from_secs(5));
        assert_eq!(c.pool.gpu_quota, Some(8));
        assert_eq!(c.pool.priority_limit(&tags(&["engineer"])), Some(50));
        assert_eq!(
            c.pool.priority_limit(&tags(&["engineer", "lead"])),
            Some(90)
        );
        assert_eq!(c.pool.priority_limit(&tags(&["operator"])), None);
        let e = RelayConfig::parse("[pool]\nlost_after = \"soon\"\n", "relay.toml")
            .expect_err("must fail");
        assert!(e.to_string().contains("relay.toml"), "{e}");
        let e = RelayConfig::parse("[pool]\npolicy = \"random\"\n", "t").expect_err("must fail");
        assert!(e.to_string().contains("random"), "{e}");
    }

    #[test]
    fn zero_limits_rejected() {
        assert!(RelayConfig::parse("[limits]\nmax_streams_per_node = 0\n", "t").is_err());
    }
}
