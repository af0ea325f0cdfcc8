//! Ray clusters over the mesh (issue 12): the types the coordinator, the agent and `weft`
//! share, the fixed Ray ports, and the one function that writes a member's `ray start`
//! command line.
//!
//! A cluster is a pool gang job (`--nodes K`) whose [`crate::pool::SubmitRequest::cluster`]
//! is set: the coordinator only places it on workers whose agent has Ray
//! ([`crate::pool::Inventory::ray`]), writes each member's command with [`member_argv`]
//! (rank 0 the head), and sends a per-cluster token in [`RayStart`]. The agent runs the
//! command with its own `ray` ([`RAY_PLACEHOLDER`] is replaced by it), the token in a 0600
//! file, and its firewall keeping [`RAY_PORTS`] off every interface but loopback and the
//! mesh. The head's agent reports Ray's own view of the nodes
//! ([`crate::pool::Inventory::ray_heads`]).
//!
//! Ports (fixed, so that the ACL and the firewall can name them):
//!
//! | port | what | who may connect |
//! |---|---|---|
//! | 6379 | GCS | members |
//! | 8265 | dashboard, Jobs API | members, the owner |
//! | 10001 | Ray Client | members, the owner |
//! | 6380 | node manager (raylet) | members |
//! | 6381 | object manager | members |
//! | 6382 | dashboard agent gRPC | members |
//! | 6383 | runtime env agent | members |
//! | 6384 | metrics export | members |
//! | 52365 | dashboard agent HTTP | members |
//! | 10002–10099 | worker processes | members |

use serde::{Deserialize, Serialize};

use crate::names::GROUP_TAG_PREFIX;

/// GCS.
pub const GCS_PORT: u16 = 6379;
/// Dashboard and Jobs API.
pub const DASHBOARD_PORT: u16 = 8265;
/// Ray Client server.
pub const CLIENT_PORT: u16 = 10001;
/// Raylet node manager.
pub const NODE_MANAGER_PORT: u16 = 6380;
/// Object manager.
pub const OBJECT_MANAGER_PORT: u16 = 6381;
/// Dashboard agent gRPC.
pub const DASHBOARD_AGENT_GRPC_PORT: u16 = 6382;
/// Runtime env agent.
pub const RUNTIME_ENV_AGENT_PORT: u16 = 6383;
/// Metrics export.
pub const METRICS_EXPORT_PORT: u16 = 6384;
/// Dashboard agent HTTP.
pub const DASHBOARD_AGENT_HTTP_PORT: u16 = 52365;
/// Worker processes: first port.
pub const MIN_WORKER_PORT: u16 = 10002;
/// Worker processes: last port.
pub const MAX_WORKER_PORT: u16 = 10099;

/// Every TCP port (or range, inclusive) a member's Ray listens on.
pub const RAY_PORTS: &[(u16, u16)] = &[
    (GCS_PORT, METRICS_EXPORT_PORT),
    (DASHBOARD_PORT, DASHBOARD_PORT),
    (CLIENT_PORT, MAX_WORKER_PORT),
    (DASHBOARD_AGENT_HTTP_PORT, DASHBOARD_AGENT_HTTP_PORT),
];

/// The ports of the head the cluster's owner may open over the mesh.
pub const OWNER_PORTS: &[u16] = &[DASHBOARD_PORT, CLIENT_PORT];

/// The relay service (on the head's worker) that carries the owner to the dashboard.
pub const DASHBOARD_SERVICE: &str = "ray-dashboard";
/// The relay service (on the head's worker) that carries the owner to Ray Client.
pub const CLIENT_SERVICE: &str = "ray-client";

/// `argv[0]` of a member's command: the agent puts its own `ray` there.
pub const RAY_PLACEHOLDER: &str = "ray";

/// The owner's tag while its cluster (pool job `job`) runs: with [`head_tag`] it opens
/// [`OWNER_PORTS`] on the head, and nothing else.
pub fn owner_tag(job: u64) -> String {
    format!("{GROUP_TAG_PREFIX}{job}-owner")
}

/// The head's tag while its cluster runs (see [`owner_tag`]).
pub fn head_tag(job: u64) -> String {
    format!("{GROUP_TAG_PREFIX}{job}-head")
}

/// If `tag` is an [`owner_tag`], the job.
pub fn owner_of(tag: &str) -> Option<&str> {
    tag.strip_prefix(GROUP_TAG_PREFIX)?.strip_suffix("-owner")
}

/// If `tag` is a [`head_tag`], the job.
pub fn head_of(tag: &str) -> Option<&str> {
    tag.strip_prefix(GROUP_TAG_PREFIX)?.strip_suffix("-head")
}

/// What `weft cluster up` asks for beyond the gang itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterRequest {
    /// The cluster's name (unique among the owner's live clusters).
    pub name: String,
    /// `--num-cpus` per member (default: the leased share of the worker's CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_per_node: Option<u32>,
    /// Object store per member, MiB (default: 30% of the leased share of memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object_store_mib: Option<u64>,
    /// `--replace`: a lost member's rank goes to another fitting Ray worker, which joins
    /// the running cluster (without it the cluster runs degraded until `down`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace: bool,
}

/// What a Ray member's agent needs besides the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RayStart {
    /// The cluster's name.
    pub cluster: String,
    /// Rank 0.
    pub head: bool,
    /// This member's overlay address (`--node-ip-address`).
    pub node_ip: String,
    /// The cluster's token (written to a 0600 file; never in the environment or a log).
    pub token: String,
}

/// One node as Ray's GCS sees it (the head's agent reads the dashboard's state API).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RayNode {
    /// Ray's node IP (the member's overlay address).
    pub ip: String,
    /// `ALIVE` (true) or `DEAD`.
    pub alive: bool,
    /// The head node.
    pub head: bool,
    /// `CPU` resource.
    pub cpus: f64,
    /// `GPU` resource.
    pub gpus: f64,
}

/// The head's report: Ray's nodes, as of `at_ms`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RayHeadReport {
    /// The pool job.
    pub pool_job: u64,
    /// The attempt.
    pub attempt: u32,
    /// Unix ms of the reading.
    pub at_ms: u64,
    /// Every node Ray knows.
    pub nodes: Vec<RayNode>,
}

// Deriving `Eq` for the inventory: the floats are Ray's resource counts, never NaN.
impl Eq for RayNode {}
impl Eq for RayHeadReport {}

/// A cluster, as `weft cluster list|status` shows it (inside its job's view).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// Its name.
    pub name: String,
    /// The head's overlay address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_ip: Option<String>,
    /// The head's worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_worker: Option<String>,
    /// Every member's overlay address, in rank order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub member_ips: Vec<String>,
    /// SHA-256 of the token (hex), to tell tokens apart without showing one.
    pub token_sha256: String,
    /// Ray's view of the nodes (from the head), when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray: Option<RayHeadReport>,
    /// Unix ms the members were reserved (placed), for `up`'s progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placed_ms: Option<u64>,
    /// Ranks whose worker was lost and that no worker holds now: the cluster is degraded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vacant: Vec<u32>,
}

impl ClusterInfo {
    /// A rank is vacant (its worker was lost).
    pub fn degraded(&self) -> bool {
        !self.vacant.is_empty()
    }
}

impl ClusterInfo {
    /// Alive Ray nodes of the current attempt.
    pub fn alive(&self, attempt: u32) -> usize {
        self.ray
            .as_ref()
            .filter(|r| r.attempt == attempt)
            .map_or(0, |r| r.nodes.iter().filter(|n| n.alive).count())
    }
}

/// The sizes a member's Ray gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberSize {
    /// GPUs leased.
    pub gpus: u32,
    /// `--num-cpus`.
    pub cpus: u32,
    /// `--object-store-memory`, bytes.
    pub object_store_bytes: u64,
}

/// Ray's smallest object store (bytes).
pub const MIN_OBJECT_STORE: u64 = 75 * 1024 * 1024;

impl MemberSize {
    /// The leased share of a worker with `total_gpus` GPUs, `cpus` CPUs and `memory` bytes:
    /// `gpus/total_gpus` of its CPUs (at least 1) and 30% of that share of its memory for the
    /// object store (at least Ray's 75 MiB), unless the request says otherwise.
    pub fn of(
        req: &ClusterRequest,
        gpus: u32,
        total_gpus: u32,
        cpus: u32,
        memory: u64,
    ) -> MemberSize {
        let share = |v: u64| {
            if total_gpus == 0 {
                v
            } else {
                v.saturating_mul(u64::from(gpus)) / u64::from(total_gpus)
            }
        };
        let cpus = req
            .cpus_per_node
            .unwrap_or_else(|| u32::try_from(share(u64::from(cpus))).unwrap_or(u32::MAX))
            .max(1);
        let object_store_bytes = req
            .object_store_mib
            .map(|m| m.saturating_mul(1024 * 1024))
            .unwrap_or_else(|| share(memory) / 10 * 3)
            .max(MIN_OBJECT_STORE);
        MemberSize {
            gpus,
            cpus,
            object_store_bytes,
        }
    }
}

/// A member's `ray start` command ([`RAY_PLACEHOLDER`] first), binding Ray to `node_ip` on
/// the fixed ports; the head (`head_ip == None`) also runs GCS, the dashboard and Ray Client.
/// `--block`: the command lives as long as the member's Ray does.
pub fn member_argv(node_ip: &str, head_ip: Option<&str>, size: MemberSize) -> Vec<String> {
    let mut a: Vec<String> = vec![RAY_PLACEHOLDER.into(), "start".into(), "--block".into()];
    match head_ip {
        None => {
            a.push("--head".into());
            a.push(format!("--port={GCS_PORT}"));
            a.push(format!("--dashboard-host={node_ip}"));
            a.push(format!("--dashboard-port={DASHBOARD_PORT}"));
            a.push(format!("--ray-client-server-port={CLIENT_PORT}"));
        }
        Some(h) => a.push(format!("--address={h}:{GCS_PORT}")),
    }
    a.extend([
        format!("--node-ip-address={node_ip}"),
        format!("--node-manager-port={NODE_MANAGER_PORT}"),
        format!("--object-manager-port={OBJECT_MANAGER_PORT}"),
        format!("--dashboard-agent-grpc-port={DASHBOARD_AGENT_GRPC_PORT}"),
        format!("--dashboard-agent-listen-port={DASHBOARD_AGENT_HTTP_PORT}"),
        format!("--runtime-env-agent-port={RUNTIME_ENV_AGENT_PORT}"),
        format!("--metrics-export-port={METRICS_EXPORT_PORT}"),
        format!("--min-worker-port={MIN_WORKER_PORT}"),
        format!("--max-worker-port={MAX_WORKER_PORT}"),
        format!("--num-gpus={}", size.gpus),
        format!("--num-cpus={}", size.cpus),
        format!("--object-store-memory={}", size.object_store_bytes),
        "--disable-usage-stats".into(),
    ]);
    a
}

/// Whether `port` is one of [`RAY_PORTS`].
pub fn is_ray_port(port: u16) -> bool {
    RAY_PORTS.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_and_worker_commands_bind_the_overlay_on_fixed_ports() {
        let size = MemberSize {
            gpus: 1,
            cpus: 1,
            object_store_bytes: 100 << 20,
        };
        let head = member_argv("100.64.0.3", None, size);
        assert_eq!(head[..4], ["ray", "start", "--block", "--head"]);
        assert!(head.contains(&"--dashboard-host=100.64.0.3".to_string()));
        assert!(head.contains(&"--node-ip-address=100.64.0.3".to_string()));
        let w = member_argv("100.64.0.4", Some("100.64.0.3"), size);
        assert!(w.contains(&"--address=100.64.0.3:6379".to_string()));
        assert!(!w.iter().any(|a| a == "--head" || a.starts_with("--port=")));
        // Every port a flag names is one the firewall and the ACL know.
        for arg in head.iter().chain(&w) {
            if let Some((flag, v)) = arg.split_once('=') {
                if flag.ends_with("-port") {
                    let p: u16 = v.parse().expect("a port number");
                    assert!(is_ray_port(p), "{arg}");
                }
            }
        }
    }

    #[test]
    fn sizes_follow_the_leased_share_with_floors() {
        let req = ClusterRequest::default();
        let s = MemberSize::of(&req, 2, 8, 64, 512 << 30);
        assert_eq!(s.cpus, 16);
        assert_eq!(s.object_store_bytes, (128u64 << 30) / 10 * 3);
        let tiny = MemberSize::of(&req, 1, 8, 2, 1 << 30);
        assert_eq!((tiny.cpus, tiny.object_store_bytes), (1, MIN_OBJECT_STORE));
        let asked = ClusterRequest {
            cpus_per_node: Some(1),
            object_store_mib: Some(128),
            ..ClusterRequest::default()
        };
        let s = MemberSize::of(&asked, 1, 1, 2, 24 << 30);
        assert_eq!((s.cpus, s.object_store_bytes), (1, 128 << 20));
    }

    #[test]
    fn owner_and_head_tags_name_their_job() {
        assert_eq!(owner_of(&owner_tag(17)), Some("17"));
        assert_eq!(head_of(&head_tag(17)), Some("17"));
        assert_eq!(owner_of(&head_tag(17)), None);
        assert_eq!(head_of("pool-job-17"), None);
    }
}
