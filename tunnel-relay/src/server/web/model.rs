//! What the web view shows, built from what the relay knows, for one viewer (pure).
//!
//! Inputs: the registry's nodes, the names online now, the pool's workers and jobs, and usage
//! records. Outputs: the JSON of `/api/v1/...` and what the pages render, the same structs.
//! Who sees what ([`Role`]): an operator everything; an engineer every pool worker and itself,
//! and its own jobs and usage; a worker (a provider's machine) itself, the jobs on it (without
//! other engineers' command lines) and its earnings. The public summary names nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde::Serialize;
use weft_proto::pool::{GpuReading, JobView, UsageRecord, WorkerView};

use super::super::reload::Policies;
use crate::pool_text::civil_from_days;
use crate::records::NodeRecord;

/// What a viewer may see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Role {
    /// Everything.
    Operator,
    /// Pool workers and itself; its own jobs and usage.
    Engineer,
    /// A provider's machine: its account's devices, the jobs on them, their earnings.
    Provider,
}

/// One viewer.
#[derive(Debug, Clone)]
pub(crate) struct Viewer {
    /// Its node name.
    pub(crate) name: String,
    /// Its role.
    pub(crate) role: Role,
    /// A provider's account ([`NodeRecord::account`] of its node) and that account's devices
    /// (itself included); empty for the other roles.
    pub(crate) account: String,
    /// The account's devices.
    pub(crate) devices: BTreeSet<String>,
    /// Which workers an engineer may reach (the other roles: no limit).
    pub(crate) reach: Reach,
}

/// What an engineer may reach: the workers whose tags the tunnel policy (`[policy]`) or the
/// mesh ACL (`[mesh.acl]`) lets its own tags open. `None`: no limit.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reach(Option<(Vec<String>, Arc<Policies>)>);

impl Reach {
    /// An engineer tagged `tags` under the relay's current policies.
    pub(crate) fn of(tags: &[String], policies: Arc<Policies>) -> Reach {
        Reach(Some((tags.to_vec(), policies)))
    }

    /// Whether a node tagged `dst` is reachable.
    pub(crate) fn reaches(&self, dst: &[String]) -> bool {
        match &self.0 {
            None => true,
            Some((tags, p)) => {
                p.tunnels
                    .allow
                    .iter()
                    .any(|r| tags.contains(&r.from) && dst.contains(&r.to))
                    || p.mesh_acl.may_initiate(tags, dst)
            }
        }
    }
}

impl Viewer {
    /// A viewer of `role` with no devices of its own.
    pub(crate) fn new(name: &str, role: Role) -> Viewer {
        Viewer {
            name: name.to_string(),
            role,
            account: String::new(),
            devices: BTreeSet::new(),
            reach: Reach::default(),
        }
    }

    /// A provider of `account`, owning `nodes`' devices of that account.
    pub(crate) fn provider(name: &str, nodes: &[NodeRecord]) -> Viewer {
        let account = nodes
            .iter()
            .find(|n| n.name == name)
            .map_or(name, NodeRecord::account)
            .to_string();
        let devices = nodes
            .iter()
            .filter(|n| !n.revoked && n.account() == account)
            .map(|n| n.name.clone())
            .chain([name.to_string()])
            .collect();
        Viewer {
            name: name.to_string(),
            role: Role::Provider,
            account,
            devices,
            reach: Reach::default(),
        }
    }

    /// Whether it may rename or remove `device` (an operator any, a provider its own).
    pub(crate) fn owns(&self, device: &str) -> bool {
        match self.role {
            Role::Operator => true,
            Role::Engineer => false,
            Role::Provider => self.devices.contains(device),
        }
    }
}

/// Everything the relay knows, as read for one request.
#[derive(Debug, Clone, Default)]
pub(crate) struct Inputs {
    /// Registered nodes.
    pub(crate) nodes: Vec<NodeRecord>,
    /// Names online now (a relay session, a mesh session or a pool feed), lowercase (mesh
    /// names are DNS labels).
    pub(crate) online: HashSet<String>,
    /// Pool workers.
    pub(crate) workers: Vec<WorkerView>,
    /// Pool jobs (all of them, finished too).
    pub(crate) jobs: Vec<JobView>,
    /// Fresh GPU readings by (worker, GPU UUID).
    pub(crate) readings: HashMap<(String, String), GpuReading>,
    /// Unix ms the relay started.
    pub(crate) started_ms: u64,
    /// Unix ms now.
    pub(crate) now_ms: u64,
    /// Path reports: (node key, peer key, direct), keys in base64 as the registry has them.
    pub(crate) paths: Vec<(String, String, bool)>,
}

/// `GET /api/v1/paths`: how two nodes reach each other now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct PathView {
    /// One node (the lower name).
    pub(crate) a: String,
    /// The other.
    pub(crate) b: String,
    /// `direct`, `relayed`, or `mixed` (one side direct, the other through the relay: a
    /// path being set up or given up).
    pub(crate) path: String,
    /// What `a` reported (`direct` / `relayed`), if it did.
    pub(crate) a_says: Option<&'static str>,
    /// What `b` reported.
    pub(crate) b_says: Option<&'static str>,
}

fn says(direct: bool) -> &'static str {
    if direct {
        "direct"
    } else {
        "relayed"
    }
}

/// The pairs with a WireGuard session that `viewer` may see (both ends visible to it),
/// relayed first, then by name.
pub(crate) fn paths(inp: &Inputs, viewer: &Viewer) -> Vec<PathView> {
    let visible: HashMap<&str, &str> = inp
        .nodes
        .iter()
        .filter(|n| !n.revoked)
        .filter(|n| match viewer.role {
            Role::Operator => true,
            Role::Engineer => {
                n.name == viewer.name
                    || (inp.workers.iter().any(|w| w.name == n.name)
                        && viewer.reach.reaches(&n.tags))
            }
            Role::Provider => viewer.devices.contains(&n.name),
        })
        .map(|n| (n.key.as_str(), n.name.as_str()))
        .collect();
    // (a, b) with a < b → (a says direct, b says direct).
    type Said = (Option<bool>, Option<bool>);
    let mut pairs: BTreeMap<(&str, &str), Said> = BTreeMap::new();
    for (from, to, direct) in &inp.paths {
        let (Some(&x), Some(&y)) = (visible.get(from.as_str()), visible.get(to.as_str())) else {
            continue;
        };
        if x == y {
            continue;
        }
        let e = pairs.entry((x.min(y), x.max(y))).or_default();
        if x < y {
            e.0 = Some(*direct);
        } else {
            e.1 = Some(*direct);
        }
    }
    let mut out: Vec<PathView> = pairs
        .into_iter()
        .map(|((a, b), said)| PathView {
            a: a.to_string(),
            b: b.to_string(),
            a_says: said.0.map(says),
            b_says: said.1.map(says),
            path: match said {
                (Some(true), Some(false)) | (Some(false), Some(true)) => "mixed",
                (Some(true), _) | (_, Some(true)) => "direct",
                _ => "relayed",
            }
            .to_string(),
        })
        .collect();
    out.sort_by(|x, y| (x.path == "direct", &x.a, &x.b).cmp(&(y.path == "direct", &y.a, &y.b)));
    out
}

/// `GET /api/v1/summary`: public, no names, addresses or keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Summary {
    /// Nodes with a live session.
    pub(crate) nodes_online: usize,
    /// Registered nodes (not revoked).
    pub(crate) nodes: usize,
    /// Workers (pool members) online.
    pub(crate) workers_online: usize,
    /// GPUs of the workers online.
    pub(crate) gpus: usize,
    /// Those GPUs by model.
    pub(crate) gpus_by_model: BTreeMap<String, usize>,
    /// Pool jobs running.
    pub(crate) jobs_running: usize,
    /// Pool jobs waiting.
    pub(crate) jobs_queued: usize,
    /// Ray clusters up.
    pub(crate) clusters: usize,
    /// Seconds since the relay started.
    pub(crate) uptime_s: u64,
    /// Node pairs with a WireGuard session running direct.
    pub(crate) paths_direct: usize,
    /// Node pairs whose session goes through a relay (or is changing path).
    pub(crate) paths_relayed: usize,
}

/// One GPU as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct GpuView {
    /// NVML UUID.
    pub(crate) uuid: String,
    /// Model.
    pub(crate) model: String,
    /// Memory, MiB.
    pub(crate) memory_mib: u64,
    /// `healthy`, `degraded`, `unhealthy`.
    pub(crate) health: String,
    /// The pool job holding it.
    pub(crate) job: Option<u64>,
    /// Utilisation now, percent (absent: no fresh reading).
    pub(crate) util_pct: Option<u32>,
    /// Memory in use now, MiB.
    pub(crate) mem_used_mib: Option<u64>,
    /// Temperature now, °C.
    pub(crate) temp_c: Option<u32>,
    /// Power draw now, watts.
    pub(crate) power_w: Option<f64>,
}

/// `GET /api/v1/nodes`: one device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct NodeView {
    /// Name.
    pub(crate) name: String,
    /// Tags.
    pub(crate) tags: Vec<String>,
    /// Online now.
    pub(crate) online: bool,
    /// `ready`, `cordoned`, `draining`, `disconnected`, `lost`, `revoked` for pool workers;
    /// `online` / `offline` for other nodes; [`AWAITING_APPROVAL`] for a provider's machine
    /// an operator has not approved yet.
    pub(crate) state: String,
    /// Overlay IPv4, once on the mesh.
    pub(crate) ipv4: Option<String>,
    /// Overlay IPv6.
    pub(crate) ipv6: Option<String>,
    /// The agent's version (workers).
    pub(crate) version: Option<String>,
    /// The relay holding its session (in a fleet).
    pub(crate) home: Option<String>,
    /// Unix ms it was first seen.
    pub(crate) first_seen_ms: u64,
    /// Unix ms it was last admitted or heard.
    pub(crate) last_seen_ms: u64,
    /// Time connected (workers), ms.
    pub(crate) uptime_ms: u64,
    /// Its GPUs.
    pub(crate) gpus: Vec<GpuView>,
    /// Simulated GPUs (the stub NVML).
    pub(crate) simulated: bool,
    /// The display name its owner or an operator gave it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) label: Option<String>,
    /// The provider account it belongs to (none: its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) owner: Option<String>,
}

impl NodeView {
    /// What the pages call it: its label, else its name.
    pub(crate) fn shown(&self) -> &str {
        self.label.as_deref().unwrap_or(&self.name)
    }
}

/// The nodes `viewer` may see, sorted by name.
/// The state of a provider's machine that waits for an operator's approval.
pub(crate) const AWAITING_APPROVAL: &str = "awaiting approval";

pub(crate) fn nodes(inp: &Inputs, viewer: &Viewer) -> Vec<NodeView> {
    let workers: BTreeMap<&str, &WorkerView> =
        inp.workers.iter().map(|w| (w.name.as_str(), w)).collect();
    let mut out: Vec<NodeView> = inp
        .nodes
        .iter()
        .filter(|n| !n.revoked || viewer.role == Role::Operator)
        .filter(|n| match viewer.role {
            Role::Operator => true,
            Role::Engineer => {
                n.name == viewer.name
                    || (workers.contains_key(n.name.as_str()) && viewer.reach.reaches(&n.tags))
            }
            Role::Provider => viewer.devices.contains(&n.name),
        })
        .map(|n| {
            let w = workers.get(n.name.as_str());
            let online = inp.online.contains(&n.name.to_ascii_lowercase());
            let state = match (n.revoked, w) {
                (true, _) => "revoked".to_string(),
                (false, _) if n.pending => AWAITING_APPROVAL.into(),
                (false, Some(w)) if !online && w.state == "ready" => "disconnected".into(),
                (false, Some(w)) => w.state.clone(),
                (false, None) if online => "online".into(),
                (false, None) => "offline".into(),
            };
            NodeView {
                name: n.name.clone(),
                tags: n.tags.clone(),
                online,
                state,
                ipv4: n.mesh_ipv4.map(|a| a.to_string()),
                ipv6: n.mesh_ipv6.map(|a| a.to_string()),
                version: w.map(|w| w.inventory.version.clone()),
                home: n.home.clone(),
                first_seen_ms: n.first_seen * 1000,
                last_seen_ms: (n.last_seen * 1000).max(w.map_or(0, |w| w.last_seen_ms)),
                uptime_ms: w.map_or(0, |w| {
                    w.uptime_ms
                        + w.connected_since_ms
                            .map_or(0, |s| inp.now_ms.saturating_sub(s))
                }),
                gpus: w.map_or_else(Vec::new, |w| {
                    w.inventory
                        .gpus
                        .iter()
                        .enumerate()
                        .map(|(i, g)| {
                            let r = inp.readings.get(&(w.name.clone(), g.uuid.clone()));
                            GpuView {
                                uuid: g.uuid.clone(),
                                model: g.model.clone(),
                                memory_mib: g.memory_mib,
                                health: g.health.clone(),
                                job: w.holders.get(i).copied().flatten(),
                                util_pct: r.and_then(|r| r.util_pct),
                                mem_used_mib: r.and_then(|r| r.mem_used_mib),
                                temp_c: r.and_then(|r| r.temp_c),
                                power_w: r
                                    .and_then(|r| r.power_mw)
                                    .map(|mw| f64::from(mw) / 1000.0),
                            }
                        })
                        .collect()
                }),
                simulated: w.is_some_and(|w| w.inventory.simulated),
                label: n.label.clone(),
                owner: n.owner.clone(),
            }
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The public summary.
pub(crate) fn summary(inp: &Inputs) -> Summary {
    let everyone = Viewer::new("", Role::Operator);
    let pairs = paths(inp, &everyone);
    let all = nodes(inp, &everyone);
    let live: Vec<&NodeView> = all
        .iter()
        .filter(|n| n.online && n.state != "revoked")
        .collect();
    let mut by_model = BTreeMap::new();
    let mut gpus = 0;
    for n in live.iter().filter(|n| !n.gpus.is_empty()) {
        for g in &n.gpus {
            *by_model.entry(g.model.clone()).or_insert(0) += 1;
            gpus += 1;
        }
    }
    Summary {
        nodes_online: live.len(),
        nodes: all.iter().filter(|n| n.state != "revoked").count(),
        workers_online: live
            .iter()
            .filter(|n| !n.gpus.is_empty() || n.version.is_some())
            .count(),
        gpus,
        gpus_by_model: by_model,
        jobs_running: inp
            .jobs
            .iter()
            .filter(|j| matches!(j.state.as_str(), "placed" | "running"))
            .count(),
        jobs_queued: inp.jobs.iter().filter(|j| j.state == "pending").count(),
        clusters: inp
            .jobs
            .iter()
            .filter(|j| j.cluster.is_some() && matches!(j.state.as_str(), "placed" | "running"))
            .count(),
        uptime_s: inp.now_ms.saturating_sub(inp.started_ms) / 1000,
        paths_direct: pairs.iter().filter(|p| p.path == "direct").count(),
        paths_relayed: pairs.iter().filter(|p| p.path != "direct").count(),
    }
}

/// `GET /api/v1/jobs`: the jobs `viewer` may see, newest first. A worker sees the jobs that
/// ran on it, without the command, environment or working directory of their engineers.
pub(crate) fn jobs(inp: &Inputs, viewer: &Viewer) -> Vec<JobView> {
    let mut out: Vec<JobView> = inp
        .jobs
        .iter()
        .filter(|j| match viewer.role {
            Role::Operator => true,
            Role::Engineer => j.owner == viewer.name,
            Role::Provider => j.members.iter().any(|m| viewer.devices.contains(&m.worker)),
        })
        .cloned()
        .map(|mut j| {
            if viewer.role == Role::Provider && j.owner != viewer.name {
                j.request.command.clear();
                j.request.env.clear();
                j.request.workdir = None;
            }
            j
        })
        .collect();
    out.sort_by_key(|j| std::cmp::Reverse(j.id));
    out
}

/// `GET /api/v1/clusters`: a Ray cluster (`weft cluster up`) as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct ClusterView {
    /// Its pool job.
    pub(crate) job: u64,
    /// Its name.
    pub(crate) name: String,
    /// The engineer who made it.
    pub(crate) owner: String,
    /// The job's state (`pending`, `placed`, `running`, or how it ended).
    pub(crate) state: String,
    /// The head's worker.
    pub(crate) head: Option<String>,
    /// The members' workers, in rank order.
    pub(crate) workers: Vec<String>,
    /// GPUs in all.
    pub(crate) gpus: usize,
    /// Ray nodes alive (as the head last said).
    pub(crate) ray_alive: usize,
    /// A rank lost its worker and nobody holds it now.
    pub(crate) degraded: bool,
}

/// The clusters among the jobs `viewer` may see, unfinished first, newest first.
pub(crate) fn clusters(inp: &Inputs, viewer: &Viewer) -> Vec<ClusterView> {
    let mut out: Vec<ClusterView> = jobs(inp, viewer)
        .into_iter()
        .filter_map(|j| {
            let c = j.cluster.as_ref()?;
            let mut members = j.members.clone();
            members.sort_by_key(|m| m.rank);
            Some(ClusterView {
                job: j.id,
                name: c.name.clone(),
                owner: j.owner.clone(),
                state: j.state.clone(),
                head: c.head_worker.clone(),
                gpus: members.iter().map(|m| m.gpus.len()).sum(),
                workers: members.into_iter().map(|m| m.worker).collect(),
                ray_alive: c.alive(j.attempt),
                degraded: c.degraded(),
            })
        })
        .collect();
    let done = |s: &str| !matches!(s, "pending" | "placed" | "running");
    out.sort_by_key(|c| (done(&c.state), std::cmp::Reverse(c.job)));
    out
}

/// Whether `viewer` may see usage record `r`.
pub(crate) fn sees_usage(viewer: &Viewer, r: &UsageRecord) -> bool {
    match viewer.role {
        Role::Operator => true,
        Role::Engineer => r.engineer == viewer.name,
        Role::Provider => viewer.devices.contains(&r.worker),
    }
}

/// One row of the earnings view: GPU-seconds a device gave in one UTC day.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Earning {
    /// The worker.
    pub(crate) device: String,
    /// `YYYY-MM-DD` (UTC) of the records' ends.
    pub(crate) day: String,
    /// GPU-seconds.
    pub(crate) gpu_seconds: f64,
    /// Usage records counted.
    pub(crate) records: usize,
}

/// The UTC day of unix ms.
pub(crate) fn day_of(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / 86_400_000) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// GPU-seconds per device, UTC day and engineer, kept up to date from the store's one
/// sequence ([`EarningsIndex::add`] what was numbered after [`EarningsIndex::last_seq`]): the
/// Earnings page sums a few rows per device and day instead of reading every record.
#[derive(Debug, Default)]
pub(crate) struct EarningsIndex {
    /// The highest sequence number counted.
    pub(crate) last_seq: u64,
    /// (device, day) → engineer → (GPU-seconds, records).
    sums: BTreeMap<(String, String), BTreeMap<String, (f64, usize)>>,
}

impl EarningsIndex {
    /// Counts record `r`, numbered `seq`.
    pub(crate) fn add(&mut self, seq: u64, r: &UsageRecord) {
        self.last_seq = self.last_seq.max(seq);
        let e = self
            .sums
            .entry((r.worker.clone(), day_of(r.end_ms)))
            .or_default()
            .entry(r.engineer.clone())
            .or_default();
        e.0 += r.gpu_seconds;
        e.1 += 1;
    }

    /// What `viewer` earned or spent, by device then day (the records [`sees_usage`] lets
    /// it see).
    pub(crate) fn rows(&self, viewer: &Viewer) -> Vec<Earning> {
        self.sums
            .iter()
            .filter_map(|((device, day), by)| {
                let (gpu_seconds, records) = match viewer.role {
                    Role::Operator => by.values().fold((0.0, 0), |(s, n), (a, b)| (s + a, n + b)),
                    Role::Engineer => *by.get(&viewer.name)?,
                    Role::Provider if viewer.devices.contains(device) => {
                        by.values().fold((0.0, 0), |(s, n), (a, b)| (s + a, n + b))
                    }
                    Role::Provider => return None,
                };
                Some(Earning {
                    device: device.clone(),
                    day: day.clone(),
                    gpu_seconds,
                    records,
                })
            })
            .collect()
    }
}

/// GPU-seconds per device per day of these records, by device then day (all of them).
#[cfg(test)]
pub(crate) fn earnings<'a>(records: impl IntoIterator<Item = &'a UsageRecord>) -> Vec<Earning> {
    let mut ix = EarningsIndex::default();
    for (i, r) in records.into_iter().enumerate() {
        ix.add(i as u64 + 1, r);
    }
    ix.rows(&Viewer::new("", Role::Operator))
}

/// The earnings as CSV (`device,day,gpu_seconds,records`).
pub(crate) fn earnings_csv(rows: &[Earning]) -> String {
    let mut s = String::from("device,day,gpu_seconds,records\n");
    for r in rows {
        s.push_str(&format!(
            "{},{},{:?},{}\n",
            r.device, r.day, r.gpu_seconds, r.records
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::pool::{GpuInfo, Inventory, MemberView, SubmitRequest};

    fn node(name: &str, tags: &[&str]) -> NodeRecord {
        NodeRecord {
            name: name.into(),
            key: format!("k-{name}"),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            first_seen: 1,
            last_seen: 2,
            revoked: false,
            mesh_ipv4: None,
            mesh_ipv6: None,
            home: None,
            owner: None,
            label: None,
            pending: false,
        }
    }

    fn worker(name: &str, model: &str) -> WorkerView {
        WorkerView {
            name: name.into(),
            state: "ready".into(),
            inventory: Inventory {
                gpus: vec![GpuInfo {
                    uuid: format!("GPU-{name}"),
                    model: model.into(),
                    memory_mib: 1,
                    health: "healthy".into(),
                    job: None,
                }],
                cpus: 1,
                memory_bytes: 1,
                version: "0.1.0".into(),
                simulated: true,
                running: vec![],
                ray: None,
                ray_heads: vec![],
                usage_key: None,
            },
            holders: vec![Some(7)],
            flagged: vec![],
            first_seen_ms: 1,
            connected_since_ms: Some(1_000),
            last_seen_ms: 5,
            uptime_ms: 10,
            usage_keys: vec![],
        }
    }

    fn job(id: u64, owner: &str, worker: &str, state: &str) -> JobView {
        JobView {
            id,
            owner: owner.into(),
            state: state.into(),
            request: SubmitRequest {
                command: vec!["secret-command".into()],
                ..SubmitRequest::default()
            },
            reason: None,
            attempt: 1,
            members: vec![MemberView {
                rank: 0,
                worker: worker.into(),
                gpus: vec![],
                local_id: None,
                state: state.into(),
                exit_code: None,
            }],
            submitted_ms: 1,
            started_ms: None,
            ended_ms: None,
            cluster: None,
        }
    }

    fn inputs() -> Inputs {
        let mut revoked = node("old", &["worker"]);
        revoked.revoked = true;
        Inputs {
            nodes: vec![
                node("gpu1", &["worker"]),
                node("gpu2", &["worker"]),
                node("alice", &["engineer"]),
                node("bob", &["engineer"]),
                revoked,
            ],
            online: ["gpu1", "alice"].iter().map(|s| s.to_string()).collect(),
            workers: vec![worker("gpu1", "H100"), worker("gpu2", "<img src=x>")],
            jobs: vec![
                job(1, "alice", "gpu1", "running"),
                job(2, "bob", "gpu2", "pending"),
            ],
            readings: HashMap::from([(
                ("gpu1".to_string(), "GPU-gpu1".to_string()),
                GpuReading {
                    uuid: "GPU-gpu1".into(),
                    util_pct: Some(87),
                    mem_used_mib: Some(1024),
                    temp_c: Some(64),
                    power_mw: Some(250_500),
                },
            )]),
            started_ms: 0,
            now_ms: 61_000,
            paths: vec![],
        }
    }

    fn v(name: &str, role: Role) -> Viewer {
        match role {
            Role::Provider => Viewer::provider(name, &[]),
            _ => Viewer::new(name, role),
        }
    }

    #[test]
    fn each_role_sees_its_own_part() {
        let inp = inputs();
        let names = |vs: Vec<NodeView>| vs.into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(
            names(nodes(&inp, &v("ops", Role::Operator))),
            ["alice", "bob", "gpu1", "gpu2", "old"]
        );
        assert_eq!(
            names(nodes(&inp, &v("alice", Role::Engineer))),
            ["alice", "gpu1", "gpu2"]
        );
        assert_eq!(names(nodes(&inp, &v("gpu2", Role::Provider))), ["gpu2"]);
        let ids = |js: Vec<JobView>| js.into_iter().map(|j| j.id).collect::<Vec<_>>();
        assert_eq!(ids(jobs(&inp, &v("ops", Role::Operator))), [2, 1]);
        assert_eq!(ids(jobs(&inp, &v("alice", Role::Engineer))), [1]);
        let on_gpu2 = jobs(&inp, &v("gpu2", Role::Provider));
        assert_eq!(ids(on_gpu2.clone()), [2]);
        assert!(
            on_gpu2[0].request.command.is_empty(),
            "no engineer's command line"
        );
    }

    #[test]
    fn node_states_and_the_public_summary() {
        let inp = inputs();
        let all = nodes(&inp, &v("ops", Role::Operator));
        let state = |n: &str| all.iter().find(|x| x.name == n).map(|x| x.state.clone());
        assert_eq!(state("gpu1").as_deref(), Some("ready"));
        assert_eq!(state("gpu2").as_deref(), Some("disconnected"));
        assert_eq!(state("alice").as_deref(), Some("online"));
        assert_eq!(state("bob").as_deref(), Some("offline"));
        assert_eq!(state("old").as_deref(), Some("revoked"));
        let g1 = all
            .iter()
            .find(|x| x.name == "gpu1")
            .cloned()
            .unwrap_or_else(|| panic!());
        assert_eq!(g1.gpus[0].job, Some(7));
        assert_eq!(
            (g1.gpus[0].util_pct, g1.gpus[0].temp_c, g1.gpus[0].power_w),
            (Some(87), Some(64), Some(250.5))
        );
        let g2 = all
            .iter()
            .find(|x| x.name == "gpu2")
            .cloned()
            .unwrap_or_else(|| panic!());
        assert_eq!(g2.gpus[0].util_pct, None, "no reading, nothing made up");
        assert_eq!(g1.uptime_ms, 10 + 60_000);
        let s = summary(&inp);
        assert_eq!(
            (s.nodes_online, s.nodes, s.workers_online, s.gpus),
            (2, 4, 1, 1)
        );
        assert_eq!(s.gpus_by_model, BTreeMap::from([("H100".to_string(), 1)]));
        assert_eq!((s.jobs_running, s.jobs_queued, s.uptime_s), (1, 1, 61));
        let json = serde_json::to_string(&s).unwrap_or_default();
        for secret in ["gpu1", "alice", "GPU-"] {
            assert!(!json.contains(secret), "{json}");
        }
    }

    #[test]
    fn paths_pair_both_sides_and_show_only_what_the_viewer_sees() {
        let mut inp = inputs();
        let k = |n: &str| format!("k-{n}");
        inp.paths = vec![
            (k("gpu1"), k("gpu2"), true),
            (k("gpu2"), k("gpu1"), true),
            (k("alice"), k("gpu1"), false),
            (k("gpu1"), k("alice"), false),
            (k("bob"), k("gpu2"), true),
            (k("gpu2"), k("bob"), false),
            (k("old"), k("gpu1"), true),
            (k("stranger"), k("gpu1"), true),
        ];
        let show = |v: &Viewer| {
            paths(&inp, v)
                .into_iter()
                .map(|p| format!("{}-{}:{}", p.a, p.b, p.path))
                .collect::<Vec<_>>()
        };
        // Relayed first; the revoked and the unknown are left out.
        assert_eq!(
            show(&v("ops", Role::Operator)),
            ["alice-gpu1:relayed", "bob-gpu2:mixed", "gpu1-gpu2:direct"]
        );
        assert_eq!(
            show(&v("alice", Role::Engineer)),
            ["alice-gpu1:relayed", "gpu1-gpu2:direct"]
        );
        assert_eq!(show(&v("gpu2", Role::Provider)), Vec::<String>::new());
        let s = summary(&inp);
        assert_eq!((s.paths_direct, s.paths_relayed), (1, 2));
        let bob_gpu2 = paths(&inp, &v("ops", Role::Operator)).remove(1);
        assert_eq!(
            (bob_gpu2.a_says, bob_gpu2.b_says),
            (Some("direct"), Some("relayed"))
        );
    }

    #[test]
    fn an_engineer_sees_the_workers_the_policy_lets_it_reach() {
        let names = |vs: Vec<NodeView>| vs.into_iter().map(|n| n.name).collect::<Vec<_>>();
        let mut inp = inputs();
        inp.nodes[1].tags = vec!["private".into()];
        let mut alice = v("alice", Role::Engineer);
        let none = weft_proto::acl::AclPolicy::parse("", "acl").unwrap_or_else(|e| panic!("{e}"));
        alice.reach = Reach::of(
            &["engineer".to_string()],
            Arc::new(Policies {
                tunnels: crate::config::Policy::default(),
                mesh_acl: none,
                approve_devices: crate::records::Approval::Off,
            }),
        );
        // engineer -> worker by the default tunnel policy; nothing reaches "private".
        assert_eq!(names(nodes(&inp, &alice)), ["alice", "gpu1"]);
        let mesh = weft_proto::acl::AclPolicy::parse(
            "[[rule]]\nfrom = \"engineer\"\nto = \"private\"\n",
            "acl",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        alice.reach = Reach::of(
            &["engineer".to_string()],
            Arc::new(Policies {
                tunnels: crate::config::Policy { allow: vec![] },
                mesh_acl: mesh,
                approve_devices: crate::records::Approval::Off,
            }),
        );
        assert_eq!(names(nodes(&inp, &alice)), ["alice", "gpu2"]);
    }

    #[test]
    fn clusters_are_their_jobs_seen_by_the_same_rules() {
        let mut inp = inputs();
        inp.jobs[0].cluster = Some(weft_proto::cluster::ClusterInfo {
            name: "train".into(),
            head_worker: Some("gpu1".into()),
            vacant: vec![1],
            ..Default::default()
        });
        let all = clusters(&inp, &v("ops", Role::Operator));
        assert_eq!(all.len(), 1);
        let c = &all[0];
        assert_eq!(
            (c.job, c.name.as_str(), c.owner.as_str(), c.head.as_deref()),
            (1, "train", "alice", Some("gpu1"))
        );
        assert_eq!(c.workers, ["gpu1"]);
        assert!(c.degraded);
        assert_eq!(clusters(&inp, &v("alice", Role::Engineer)).len(), 1);
        assert!(clusters(&inp, &v("bob", Role::Engineer)).is_empty());
    }

    #[test]
    fn a_provider_owns_its_accounts_devices() {
        let mut gpu2 = node("gpu2", &["worker"]);
        gpu2.owner = Some("gpu1".into());
        let mut gone = node("gpu3", &["worker"]);
        gone.owner = Some("gpu1".into());
        gone.revoked = true;
        let mut other = node("gpu4", &["worker"]);
        other.owner = Some("carol".into());
        let nodes = [node("gpu1", &["worker"]), gpu2, gone, other];
        // From either machine: the same account, its live devices.
        for me in ["gpu1", "gpu2"] {
            let v = Viewer::provider(me, &nodes);
            assert_eq!(v.account, "gpu1");
            assert_eq!(v.devices.iter().collect::<Vec<_>>(), ["gpu1", "gpu2"]);
            assert!(v.owns("gpu2") && !v.owns("gpu3") && !v.owns("gpu4"));
        }
        let carol = Viewer::provider("gpu4", &nodes);
        assert_eq!(carol.account, "carol");
        assert!(carol.owns("gpu4") && !carol.owns("gpu1"));
        assert!(Viewer::new("ops", Role::Operator).owns("gpu4"));
        assert!(!Viewer::new("alice", Role::Engineer).owns("gpu1"));
    }

    #[test]
    fn earnings_sum_per_device_per_utc_day() {
        let r = |w: &str, end_ms: u64, s: f64| UsageRecord {
            job: 1,
            attempt: 1,
            rank: 0,
            engineer: "alice".into(),
            worker: w.into(),
            gpu_model: "H100".into(),
            gpus: vec![],
            start_ms: None,
            end_ms,
            gpu_seconds: s,
            outcome: "succeeded".into(),
            exit_code: Some(0),
        };
        let day = 86_400_000;
        let recs = [
            r("gpu1", 10, 1.5),
            r("gpu1", day - 1, 2.0),
            r("gpu1", day, 4.0),
            r("gpu0", 5, 1.0),
        ];
        let e = earnings(&recs);
        let rows: Vec<(&str, &str, f64, usize)> = e
            .iter()
            .map(|x| (x.device.as_str(), x.day.as_str(), x.gpu_seconds, x.records))
            .collect();
        assert_eq!(
            rows,
            [
                ("gpu0", "1970-01-01", 1.0, 1),
                ("gpu1", "1970-01-01", 3.5, 2),
                ("gpu1", "1970-01-02", 4.0, 1)
            ]
        );
        assert_eq!(
            earnings_csv(&e),
            "device,day,gpu_seconds,records\ngpu0,1970-01-01,1.0,1\ngpu1,1970-01-01,3.5,2\ngpu1,1970-01-02,4.0,1\n"
        );
        let mut ix = EarningsIndex::default();
        let mut bobs = recs[3].clone();
        bobs.engineer = "bob".into();
        for (i, r) in recs[..3].iter().chain([&bobs]).enumerate() {
            ix.add(i as u64 + 1, r);
        }
        assert_eq!(ix.last_seq, 4);
        let of = |who: &str, role| {
            ix.rows(&v(who, role))
                .into_iter()
                .map(|e| (e.device, e.day, e.records))
                .collect::<Vec<_>>()
        };
        assert_eq!(of("ops", Role::Operator).len(), 3);
        assert_eq!(
            of("bob", Role::Engineer),
            [("gpu0".to_string(), "1970-01-01".to_string(), 1)]
        );
        assert_eq!(of("alice", Role::Engineer).len(), 2);
        assert_eq!(of("gpu1", Role::Provider).len(), 2);
        assert!(of("gpu9", Role::Provider).is_empty());
        assert!(sees_usage(&v("gpu1", Role::Provider), &recs[0]));
        assert!(!sees_usage(&v("gpu2", Role::Provider), &recs[0]));
        assert!(sees_usage(&v("alice", Role::Engineer), &recs[0]));
        assert!(!sees_usage(&v("bob", Role::Engineer), &recs[0]));
    }
}
