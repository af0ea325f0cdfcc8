//! `weft status`: the relay link (one session, as the `weft login`
//! identity), the managed mesh nodes on this machine (their control
//! sockets: peers and paths), and the workers the relay lists for this
//! identity, each with the GPUs its agent reports (`GET /v1/status` on the
//! worker's `agent` service through the same session, as `worker-agent
//! status --worker` asks it), within a timeout: `?` where it does not answer.
//!
//! Gathering ([`gather`]) is apart from rendering ([`render_human`], or JSON
//! of [`Report`]), which is pure and tested here.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Result;
use mesh::status::ManagedStatus;
use serde::Serialize;
use tunnel_relay::cli::StateDirArg;
use tunnel_relay::{ClientError, ClientState};
use worker_agent::api::Status as AgentStatus;

/// `weft status`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct StatusArgs {
    /// Print JSON ({"relay": …, "mesh": […], "workers": […]}) instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    state: StateDirArg,
    /// Directory of UAPI sockets, where a managed mesh node's control socket is.
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = mesh::cli::DEFAULT_UAPI_DIR)]
    uapi_dir: PathBuf,
    /// How long to wait for the relay, and for each worker's agent (`3s`, `500ms`).
    #[arg(long, default_value = "3s", value_parser = mesh::cli::positive_duration)]
    timeout: Duration,
}

/// What `weft status --json` prints.
#[derive(Debug, Serialize)]
pub(crate) struct Report {
    /// The relay link.
    relay: RelayReport,
    /// Managed mesh nodes running on this machine (none: empty).
    mesh: Vec<ManagedStatus>,
    /// Why the mesh part is missing, if it could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_error: Option<String>,
    /// Workers this identity may reach, sorted by name.
    workers: Vec<WorkerReport>,
}

/// The relay link of the engineer's identity.
#[derive(Debug, Serialize)]
struct RelayReport {
    /// The identity directory.
    identity: PathBuf,
    /// This identity's public key (base64), once logged in.
    public_key: Option<String>,
    /// The relay's addresses, from the login.
    relay_addrs: Vec<String>,
    /// In a fleet: its relays, the round trip to each (measured now) and
    /// this identity's home (the nearest); absent for a relay alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet: Option<tunnel_relay::client::FleetView>,
    #[serde(flatten)]
    link: RelayLink,
}

/// How the relay answered.
#[derive(Debug, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum RelayLink {
    /// No `weft login` in this identity directory.
    NotLoggedIn,
    /// Admitted.
    Connected {
        /// The relay's address.
        address: String,
        /// `quic`, or `tcp` (the TCP/TLS fallback): what this session used.
        transport: String,
        /// The name the relay has for this identity.
        name: String,
        /// Its tags.
        tags: Vec<String>,
    },
    /// The relay refused this identity (revoked, ...).
    Refused {
        /// The relay's reason.
        reason: String,
    },
    /// No answer, or no session.
    Unreachable {
        /// Why.
        error: String,
    },
}

/// One worker the relay lists.
#[derive(Debug, Serialize)]
struct WorkerReport {
    name: String,
    /// Services this identity may open on it.
    services: Vec<String>,
    /// What its agent reports; `null` when unknown (see `error`).
    gpus: Option<Vec<GpuReport>>,
    /// The relay holding the worker's session, as its agent reports it: the relay's name
    /// in a fleet (its home), else the address; `null` when unknown.
    relay: Option<String>,
    /// Running and queued job ids, from the agent.
    jobs_running: Option<usize>,
    jobs_queued: Option<usize>,
    /// Why `gpus` is unknown: no `agent` service, or it did not answer.
    error: Option<String>,
}

/// One GPU of a worker.
#[derive(Debug, Serialize)]
struct GpuReport {
    index: u32,
    name: Option<String>,
    uuid: String,
    memory_total_bytes: Option<u64>,
    /// `healthy`, `degraded` or `unhealthy`.
    health: String,
}

const AGENT: &str = worker_agent::relay::AGENT_SERVICE;

/// `weft status`.
pub(crate) async fn run(a: StatusArgs) -> Result<()> {
    let report = gather(&a).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_human(&report));
    }
    Ok(())
}

async fn gather(a: &StatusArgs) -> Result<Report> {
    let dir = a.state.dir()?;
    let (mesh, mesh_error) = match mesh_nodes(&a.uapi_dir) {
        Ok(m) => (m, None),
        Err(e) => (Vec::new(), Some(format!("{e:#}"))),
    };
    let mut report = Report {
        relay: RelayReport {
            identity: dir.clone(),
            public_key: None,
            relay_addrs: Vec::new(),
            fleet: None,
            link: RelayLink::NotLoggedIn,
        },
        mesh,
        mesh_error,
        workers: Vec::new(),
    };
    // Only look: a missing login must not create an identity.
    if !dir.join("relay.json").exists() {
        return Ok(report);
    }
    let mut state = ClientState::open(&dir)?;
    report.relay.public_key = Some(state.public_key().to_base64());
    report.relay.relay_addrs = state.relay().map(|r| r.addrs.clone()).unwrap_or_default();
    let session = match tokio::time::timeout(a.timeout, tunnel_relay::client::session(&dir)).await {
        Ok(Ok(s)) => s,
        Ok(Err(ClientError::Rejected(r))) => {
            report.relay.link = RelayLink::Refused {
                reason: r.to_string(),
            };
            return Ok(report);
        }
        Ok(Err(e)) => {
            report.relay.link = RelayLink::Unreachable {
                error: e.to_string(),
            };
            return Ok(report);
        }
        Err(_) => {
            report.relay.link = RelayLink::Unreachable {
                error: format!(
                    "no session within {}",
                    tunnel_relay::duration::format(a.timeout)
                ),
            };
            return Ok(report);
        }
    };
    report.relay.link = RelayLink::Connected {
        address: session.connection().remote_address().to_string(),
        transport: session.connection().kind().as_str().to_string(),
        name: session.name.clone(),
        tags: session.tags.clone(),
    };
    let mut targets = match tokio::time::timeout(a.timeout, session.list_targets()).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            report.relay.link = RelayLink::Unreachable {
                error: format!("listing workers: {e}"),
            };
            session.close().await;
            return Ok(report);
        }
        Err(_) => {
            report.relay.link = RelayLink::Unreachable {
                error: "listing workers: no answer".into(),
            };
            session.close().await;
            return Ok(report);
        }
    };
    targets.sort_by(|x, y| x.name.cmp(&y.name));
    // After the listing: a relay too old to list its fleet ends the control
    // stream on the question, which only leaves the relays line out.
    if !session.relays.is_empty()
        && tunnel_relay::client::measure_fleet(&mut state, &session.view())
            .await
            .is_ok()
    {
        report.relay.fleet = Some(state.fleet().clone());
    }
    // Every agent at once, on the one session; each within the timeout.
    let asks = targets.iter().map(|t| {
        let (session, dir) = (&session, &dir);
        async move {
            if !t.services.iter().any(|s| s == AGENT) {
                return Err(format!("no `{AGENT}` service"));
            }
            match tokio::time::timeout(
                a.timeout,
                worker_agent::cli::status_on_session(session, dir, &t.name),
            )
            .await
            {
                Ok(Ok(s)) => Ok(s),
                Ok(Err(e)) => Err(worker_agent::cli::chain(&e)),
                Err(_) => Err(format!(
                    "no answer within {}",
                    tunnel_relay::duration::format(a.timeout)
                )),
            }
        }
    });
    let answers = futures::future::join_all(asks).await;
    session.close().await;
    report.workers = targets
        .into_iter()
        .zip(answers)
        .map(|(t, answer)| worker_report(t.name, t.services, answer, report.relay.fleet.as_ref()))
        .collect();
    Ok(report)
}

/// The managed nodes' statuses from their control sockets.
fn mesh_nodes(uapi_dir: &Path) -> Result<Vec<ManagedStatus>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for iface in mesh::cli::managed_interfaces(uapi_dir)? {
        // A stale control socket of a stopped node is not a node.
        if let Ok(s) = mesh::cli::managed_status(uapi_dir, &iface, now) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The relay an agent reports its session on: its name in `fleet`, else its address.
fn relay_of(s: &AgentStatus, fleet: Option<&tunnel_relay::client::FleetView>) -> Option<String> {
    let Some(tunnel_relay::LinkState::Connected(a)) = &s.relay else {
        return None;
    };
    let addr = a.address.to_string();
    let named = fleet.and_then(|f| {
        f.relays
            .iter()
            .find(|r| r.addrs.contains(&addr))
            .map(|r| r.name.clone())
    });
    Some(named.unwrap_or(addr))
}

fn worker_report(
    name: String,
    services: Vec<String>,
    answer: Result<AgentStatus, String>,
    fleet: Option<&tunnel_relay::client::FleetView>,
) -> WorkerReport {
    match answer {
        Ok(s) => WorkerReport {
            relay: relay_of(&s, fleet),
            name,
            services,
            gpus: Some(
                s.snapshot
                    .gpus
                    .iter()
                    .map(|g| GpuReport {
                        index: g.sample.index,
                        name: g.sample.name.clone(),
                        uuid: g.sample.uuid.clone(),
                        memory_total_bytes: g.sample.memory_total_bytes,
                        health: g.health.state.as_str().to_string(),
                    })
                    .collect(),
            ),
            jobs_running: Some(s.jobs_running.len()),
            jobs_queued: Some(s.jobs_queued.len()),
            error: None,
        },
        Err(e) => WorkerReport {
            name,
            services,
            relay: None,
            gpus: None,
            jobs_running: None,
            jobs_queued: None,
            error: Some(e),
        },
    }
}

/// `2× NVIDIA H200` (and which are not healthy), `no GPUs`, or `?`.
fn gpus_text(w: &WorkerReport) -> String {
    let Some(gpus) = &w.gpus else {
        return if w.services.iter().any(|s| s == AGENT) {
            "?".to_string()
        } else {
            "-".to_string()
        };
    };
    if gpus.is_empty() {
        return "no GPUs".to_string();
    }
    // Runs of the same model: `2× NVIDIA H200, 1× NVIDIA L4`.
    let mut groups: Vec<(String, usize)> = Vec::new();
    for g in gpus {
        let model = g.name.clone().unwrap_or_else(|| "GPU".into());
        match groups.last_mut() {
            Some((m, n)) if *m == model => *n += 1,
            _ => groups.push((model, 1)),
        }
    }
    let mut out = groups
        .iter()
        .map(|(m, n)| format!("{n}× {m}"))
        .collect::<Vec<_>>()
        .join(", ");
    let sick: Vec<String> = gpus
        .iter()
        .filter(|g| g.health != "healthy")
        .map(|g| format!("GPU {} {}", g.index, g.health))
        .collect();
    if !sick.is_empty() {
        out += &format!(" ({})", sick.join(", "));
    }
    out
}

/// The text form.
fn render_human(r: &Report) -> String {
    let mut out = String::new();
    let id = r.relay.identity.display();
    out += &match &r.relay.link {
        RelayLink::NotLoggedIn => {
            format!("relay: not logged in (identity {id}); `weft login --token TOKEN` joins\n")
        }
        RelayLink::Connected {
            address,
            transport,
            name,
            tags,
        } => format!(
            "relay: connected to {address} ({transport}) as {name} (tags: {}); identity {id}\n",
            tags.join(",")
        ),
        RelayLink::Refused { reason } => format!("relay: refused: {reason} (identity {id})\n"),
        RelayLink::Unreachable { error } => format!(
            "relay: unreachable at {}: {error} (identity {id})\n",
            r.relay.relay_addrs.join(", ")
        ),
    };
    if let Some(f) = &r.relay.fleet {
        out += &format!("relays: {}\n", mesh::status::fleet_text(f));
    }
    if let Some(e) = &r.mesh_error {
        out += &format!("mesh: cannot read the local node: {e}\n");
    } else if r.mesh.is_empty() {
        out += "mesh: no managed node runs here (`weft up` starts one)\n";
    }
    for m in &r.mesh {
        out += &mesh_text(m);
    }
    if matches!(r.relay.link, RelayLink::Connected { .. }) {
        if r.workers.is_empty() {
            out += "workers: none reachable\n";
        } else {
            out += "workers:\n";
            let gpus_of = |w: &WorkerReport| {
                let mut gpus = gpus_text(w);
                if let (Some(e), true) = (&w.error, gpus == "?") {
                    gpus += &format!("  ({e})");
                }
                gpus
            };
            if r.relay.fleet.is_some() {
                // A fleet: each worker's home relay too.
                let rows: Vec<[String; 4]> = r
                    .workers
                    .iter()
                    .map(|w| {
                        let relay = w.relay.clone().unwrap_or_else(|| "-".into());
                        [w.name.clone(), w.services.join(","), relay, gpus_of(w)]
                    })
                    .collect();
                out += &table(&["NAME", "SERVICES", "RELAY", "GPUS"], &rows);
            } else {
                let rows: Vec<[String; 3]> = r
                    .workers
                    .iter()
                    .map(|w| [w.name.clone(), w.services.join(","), gpus_of(w)])
                    .collect();
                out += &table(&["NAME", "SERVICES", "GPUS"], &rows);
            }
        }
    }
    out
}

fn mesh_text(m: &ManagedStatus) -> String {
    use tunnel_relay::LinkState;
    let me = match &m.node {
        Some(n) => format!(" as {} ({})", n.name, n.ipv4),
        None => String::new(),
    };
    let relay = match &m.relay {
        LinkState::Connected(a) => match a.transport {
            Some(t) => format!("coordinator connected ({t})"),
            None => "coordinator connected".to_string(),
        },
        LinkState::Connecting { .. } => "connecting to the coordinator".to_string(),
        LinkState::Retrying { last_error, .. } => format!("coordinator lost ({last_error})"),
        LinkState::Failed { reason } => format!("refused by the coordinator: {reason}"),
        LinkState::Stopped => "stopped".to_string(),
    };
    let mut out = format!("mesh: {}{me}, {relay}\n", m.interface);
    if let Some(f) = &m.fleet {
        out += &format!("  relays: {}\n", mesh::status::fleet_text(f));
    }
    if m.peers.is_empty() {
        out += "  no peers\n";
        return out;
    }
    let row = |p: &mesh::status::ManagedPeer| {
        let path = p.path_text();
        let latency = p
            .latency_ms
            .map(mesh::status::fmt_ms)
            .unwrap_or_else(|| "-".into());
        let online = if p.online {
            path
        } else {
            format!("{path} (offline)")
        };
        (p.name.clone(), p.ipv4.to_string(), online, latency)
    };
    let t = if m.fleet.is_some() {
        // A fleet: each peer's home relay too (from its peer-map entry).
        let rows: Vec<[String; 5]> = m
            .peers
            .iter()
            .map(|p| {
                let (n, a, o, l) = row(p);
                [n, a, p.home.clone().unwrap_or_else(|| "-".into()), o, l]
            })
            .collect();
        table(&["PEER", "ADDRESS", "HOME", "PATH", "LATENCY"], &rows)
    } else {
        let rows: Vec<[String; 4]> = m
            .peers
            .iter()
            .map(|p| {
                let (n, a, o, l) = row(p);
                [n, a, o, l]
            })
            .collect();
        table(&["PEER", "ADDRESS", "PATH", "LATENCY"], &rows)
    };
    for line in t.lines() {
        out += &format!("  {line}\n");
    }
    out
}

/// Left-aligned columns, two blanks apart, after an indent of two.
fn table<const N: usize>(head: &[&str; N], rows: &[[String; N]]) -> String {
    let mut width = head.map(str::len);
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::from("  ");
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == N {
                l += c;
            } else {
                l += &format!("{c:<w$}  ", w = width[i]);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut out = line(head.to_vec());
    for r in rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn gpu(index: u32, name: &str, health: &str) -> GpuReport {
        GpuReport {
            index,
            name: Some(name.into()),
            uuid: format!("GPU-{index}"),
            memory_total_bytes: None,
            health: health.into(),
        }
    }

    fn worker(name: &str, services: &[&str], gpus: Option<Vec<GpuReport>>) -> WorkerReport {
        WorkerReport {
            name: name.into(),
            services: services.iter().map(|s| s.to_string()).collect(),
            relay: None,
            jobs_running: gpus.as_ref().map(|_| 0),
            jobs_queued: gpus.as_ref().map(|_| 0),
            error: gpus.is_none().then(|| "no answer within 3s".to_string()),
            gpus,
        }
    }

    #[test]
    fn gpu_columns() {
        let w = worker(
            "gpu1",
            &["agent", "ssh"],
            Some(vec![
                gpu(0, "NVIDIA H200", "healthy"),
                gpu(1, "NVIDIA H200", "degraded"),
                gpu(2, "NVIDIA L4", "healthy"),
            ]),
        );
        assert_eq!(
            gpus_text(&w),
            "2× NVIDIA H200, 1× NVIDIA L4 (GPU 1 degraded)"
        );
        assert_eq!(gpus_text(&worker("a", &["agent"], Some(vec![]))), "no GPUs");
        assert_eq!(gpus_text(&worker("b", &["agent"], None)), "?");
        assert_eq!(gpus_text(&worker("c", &["ssh"], None)), "-");
    }

    #[test]
    fn human_report() {
        let r = Report {
            relay: RelayReport {
                identity: "/home/eve/.config/weft".into(),
                public_key: Some("k".into()),
                relay_addrs: vec!["relay.example:4433".into()],
                fleet: Some(tunnel_relay::client::FleetView {
                    relays: ["ap", "eu", "us"]
                        .iter()
                        .map(|r| tunnel_relay::wire::RelayEntry {
                            name: format!("relay-{r}"),
                            region: r.to_string(),
                            addrs: vec![format!("{r}.example:4433")],
                            stun_port: 3478,
                        })
                        .collect(),
                    home: Some("relay-eu".into()),
                    rtt_ms: [
                        ("relay-ap".to_string(), None),
                        ("relay-eu".to_string(), Some(5.25)),
                        ("relay-us".to_string(), Some(41.0)),
                    ]
                    .into_iter()
                    .collect(),
                    measured_unix: 1,
                }),
                link: RelayLink::Connected {
                    address: "192.0.2.1:4433".into(),
                    transport: "tcp".into(),
                    name: "eve".into(),
                    tags: vec!["engineer".into()],
                },
            },
            mesh: Vec::new(),
            mesh_error: None,
            workers: vec![
                WorkerReport {
                    relay: Some("relay-ap".into()),
                    ..worker(
                        "gpu1",
                        &["agent", "ssh"],
                        Some(vec![gpu(0, "NVIDIA H200", "healthy")]),
                    )
                },
                worker("gpu2", &["agent", "ssh"], None),
            ],
        };
        let text = render_human(&r);
        assert!(
            text.starts_with("relay: connected to 192.0.2.1:4433 (tcp) as eve (tags: engineer)"),
            "{text}"
        );
        assert!(
            text.contains(
                "\nrelays: relay-eu (eu) 5.25 ms home, relay-us (us) 41 ms, relay-ap (ap) no answer\n"
            ),
            "{text}"
        );
        assert!(text.contains("mesh: no managed node runs here"), "{text}");
        // A fleet: each worker's relay (its agent's session) is a column.
        assert!(
            text.contains("  NAME  SERVICES   RELAY     GPUS\n"),
            "{text}"
        );
        assert!(
            text.contains("  gpu1  agent,ssh  relay-ap  1× NVIDIA H200\n"),
            "{text}"
        );
        assert!(
            text.contains("  gpu2  agent,ssh  -         ?  (no answer within 3s)\n"),
            "{text}"
        );
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["relay"]["state"], "connected");
        assert_eq!(json["relay"]["name"], "eve");
        assert_eq!(json["relay"]["transport"], "tcp");
        assert_eq!(json["relay"]["fleet"]["home"], "relay-eu");
        assert_eq!(json["relay"]["fleet"]["rtt_ms"]["relay-us"], 41.0);
        assert_eq!(json["workers"][0]["gpus"][0]["name"], "NVIDIA H200");
        assert!(json["workers"][1]["gpus"].is_null());
        assert_eq!(json["workers"][0]["relay"], "relay-ap");
        assert!(json["workers"][1]["relay"].is_null());
    }

    #[test]
    fn not_logged_in() {
        let r = Report {
            relay: RelayReport {
                identity: "/x".into(),
                public_key: None,
                relay_addrs: Vec::new(),
                fleet: None,
                link: RelayLink::NotLoggedIn,
            },
            mesh: Vec::new(),
            mesh_error: None,
            workers: Vec::new(),
        };
        let text = render_human(&r);
        assert!(
            text.contains("not logged in") && text.contains("weft login"),
            "{text}"
        );
        assert!(!text.contains("workers"), "{text}");
        assert_eq!(
            serde_json::to_value(&r).unwrap()["relay"]["state"],
            "not_logged_in"
        );
    }

    /// A managed node on the TCP/TLS fallback with one relayed and one direct peer.
    fn mesh_node() -> ManagedStatus {
        use mesh::status::{ManagedPeer, NodeStatus, PeerStatus};
        use tunnel_relay::link::Admitted;
        use tunnel_relay::transport::Kind;
        let peer =
            |name: &str, n: u8, path: &str, relay_transport: Option<&str>, ep: &str| ManagedPeer {
                name: name.into(),
                ipv4: std::net::Ipv4Addr::new(100, 64, 0, n),
                ipv6: format!("fd7a:7765:6674::6440:{n}").parse().unwrap(),
                tags: vec!["worker".into()],
                online: true,
                home: Some(format!("relay-{}", if n == 9 { "ap" } else { "eu" })),
                path: path.into(),
                relay_transport: relay_transport.map(Into::into),
                latency_ms: None,
                wg: PeerStatus {
                    endpoint: Some(ep.into()),
                    ..PeerStatus::default()
                },
            };
        ManagedStatus {
            interface: "weft0".into(),
            mode: "managed".into(),
            public_key: None,
            listen_port: 41641,
            node: Some(NodeStatus {
                name: "eve".into(),
                ipv4: std::net::Ipv4Addr::new(100, 64, 0, 7),
                ipv6: "fd7a:7765:6674::6440:7".parse().unwrap(),
                tags: vec!["engineer".into()],
            }),
            relay: tunnel_relay::LinkState::Connected(Admitted {
                address: "192.0.2.1:4433".parse().unwrap(),
                name: "eve".into(),
                tags: vec!["engineer".into()],
                transport: Some(Kind::Tcp),
            }),
            fleet: None,
            candidates: Vec::new(),
            peers: vec![
                peer("gpu1", 9, "relay", Some("tcp"), "relay"),
                peer("gpu2", 10, "direct", None, "198.51.100.6:41641"),
            ],
        }
    }

    #[test]
    fn mesh_paths_say_their_transport() {
        let text = mesh_text(&mesh_node());
        for want in [
            "mesh: weft0 as eve (100.64.0.7), coordinator connected (tcp)\n",
            "  gpu1  100.64.0.9   relay tcp",
            "  gpu2  100.64.0.10  direct 198.51.100.6:41641",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // In a fleet each peer's home relay (its peer-map entry) is a column.
        let mut m = mesh_node();
        m.fleet = Some(tunnel_relay::client::FleetView {
            relays: Vec::new(),
            home: Some("relay-eu".into()),
            rtt_ms: Default::default(),
            measured_unix: 1,
        });
        let text = mesh_text(&m);
        for want in [
            "  PEER  ADDRESS      HOME      PATH",
            "  gpu1  100.64.0.9   relay-ap  relay tcp",
            "  gpu2  100.64.0.10  relay-eu  direct 198.51.100.6:41641",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
    }
}
