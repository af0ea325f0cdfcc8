//! `weft cluster …` (issue 12): Ray clusters over the mesh, on the pool.
//!
//! `up` asks the coordinator for a cluster (`POST /v1/clusters`: a gang job whose members run
//! `ray start`), keeps the cluster's token in `STATE_DIR/clusters/NAME.token` (0600; the
//! coordinator shows only its hash after this answer), then follows the cluster step by step
//! (reserved, head up, n/K joined, each with the time it took) until Ray reports every node
//! alive. `list` and `status` show the members with their GPUs and Ray's own view of each node;
//! `down` stops Ray everywhere and waits until every member has ended; `submit` runs
//! `ray job submit` against the head through a local forward over the relay (the `ray-dashboard`
//! service of the head's worker, served only to the cluster's owner), with the token, so it
//! works whether or not this machine is on the mesh.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::stream::{FuturesUnordered, StreamExt};
use tunnel_relay::cli::StateDirArg;
use weft_proto::cluster::{ClusterRequest, DASHBOARD_PORT, DASHBOARD_SERVICE};
use weft_proto::gpuspec::GpuSpec;
use weft_proto::pool::{ClusterCreated, JobView, PoolView, SubmitRequest};

use crate::client::Call;
use crate::pool_cli::{member_log, now_ms, on_pool, parse, pool_bytes, Fabric, RelayFabric};

/// The cluster collection of the pool API.
pub const CLUSTERS_PATH: &str = "/v1/clusters";
/// How often `up` and `down` look at the cluster.
pub const POLL: Duration = Duration::from_millis(100);

/// `weft cluster`.
#[derive(clap::Args, Debug, Clone)]
pub struct ClusterArgs {
    #[command(subcommand)]
    pub cmd: ClusterCmd,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// The cluster subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ClusterCmd {
    /// Reserve K workers as a gang, start a Ray head on rank 0 and Ray workers on the others,
    /// and wait until Ray reports every node alive.
    Up(UpArgs),
    /// Your clusters (an operator's: everyone's).
    List {
        /// As JSON (the clusters' pool jobs).
        #[arg(long)]
        json: bool,
    },
    /// One cluster: members with their GPUs, Ray's view of each node, the head's address.
    Status {
        /// The cluster's name.
        name: String,
        /// As JSON (its pool job).
        #[arg(long)]
        json: bool,
    },
    /// Stop Ray on every member and free the GPUs.
    Down {
        /// The cluster's name.
        name: String,
    },
    /// `ray job submit` to the cluster (through the relay, with its token), following the logs.
    Submit(SubmitArgs),
}

/// `weft cluster up`.
#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// The cluster's name (a DNS label).
    pub name: String,
    /// Workers in the cluster (rank 0 runs the head).
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
    /// GPUs per node.
    #[arg(long, default_value_t = 1)]
    pub gpus_per_node: u32,
    /// Which GPUs (dstack's grammar, as `jobs submit --gpu`).
    #[arg(long, value_name = "SPEC")]
    pub gpu: Option<String>,
    /// Priority (higher first).
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// `--num-cpus` of each member (default: the leased share of the worker's CPUs).
    #[arg(long)]
    pub cpus_per_node: Option<u32>,
    /// Object store of each member, MiB (default: 30% of the leased share of memory).
    #[arg(long)]
    pub object_store_mib: Option<u64>,
    /// When a member's worker is lost, give its place to another fitting Ray worker, which
    /// joins the running cluster (without it the cluster runs degraded until `down`).
    #[arg(long)]
    pub replace: bool,
    /// Give up waiting after this many seconds (the cluster is left as it is).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

/// `weft cluster submit`.
#[derive(clap::Args, Debug, Clone)]
pub struct SubmitArgs {
    /// The cluster's name.
    pub name: String,
    /// The directory to upload as the job's working dir.
    #[arg(long)]
    pub working_dir: Option<PathBuf>,
    /// The local `ray` command (default: `ray` on PATH).
    #[arg(long, env = "WEFT_RAY")]
    pub ray: Option<PathBuf>,
    /// The entrypoint (`-- python script.py`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

/// Where `up` keeps a cluster's token.
pub fn token_path(state_dir: &Path, name: &str) -> PathBuf {
    state_dir.join("clusters").join(format!("{name}.token"))
}

/// The request `up` sends. Checked here (the `--gpu` grammar, the counts) before anything is sent.
pub fn up_request(a: &UpArgs) -> Result<SubmitRequest> {
    weft_proto::names::validate_name(&a.name)
        .map_err(|e| anyhow::anyhow!("cluster name {:?}: {e}", a.name))?;
    if let Some(s) = &a.gpu {
        s.parse::<GpuSpec>()
            .map_err(|e| anyhow::anyhow!("--gpu {s}: {e}"))?;
    }
    if a.nodes == 0 || a.gpus_per_node == 0 {
        bail!("--nodes and --gpus-per-node must be at least 1");
    }
    Ok(SubmitRequest {
        gpus: a.gpus_per_node,
        gpu: a.gpu.clone(),
        nodes: a.nodes,
        priority: a.priority,
        cluster: Some(ClusterRequest {
            name: a.name.clone(),
            cpus_per_node: a.cpus_per_node,
            object_store_mib: a.object_store_mib,
            replace: a.replace,
        }),
        ..SubmitRequest::default()
    })
}

/// `weft cluster …`.
pub fn cluster(a: &ClusterArgs) -> Result<()> {
    let dir = a.state.dir()?;
    if let ClusterCmd::Up(u) = &a.cmd {
        up_request(u)?;
    }
    on_pool(&dir, async |f| {
        let mut out = std::io::stdout();
        match &a.cmd {
            ClusterCmd::Up(u) => up(f, &dir, u, &mut out).await,
            ClusterCmd::List { json } => list(f, *json, &mut out).await,
            ClusterCmd::Status { name, json } => status(f, &dir, name, *json, &mut out).await,
            ClusterCmd::Down { name } => down(f, name, &mut out).await,
            ClusterCmd::Submit(s) => submit(f, &dir, s).await,
        }
    })
}

async fn get_cluster(f: &impl Fabric, name: &str) -> Result<JobView> {
    parse(
        &pool_bytes(f, Call::get(&format!("{CLUSTERS_PATH}/{name}"))).await?,
        "cluster",
    )
}

async fn pool_view(f: &impl Fabric) -> Result<PoolView> {
    parse(
        &pool_bytes(f, Call::get(crate::pool_cli::POOL_PATH)).await?,
        "pool view",
    )
}

fn ended(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "lost" | "cancelled")
}

/// `gpu1 (1× NVIDIA A100-SXM4-80GB)`: a member's worker and the GPUs it leased.
fn member_gpus(pool: Option<&PoolView>, worker: &str, gpus: &[String]) -> String {
    if worker.is_empty() {
        // A vacant rank: its worker was lost.
        return "- (lost)".into();
    }
    let models: Vec<String> = gpus
        .iter()
        .map(|u| {
            pool.and_then(|p| p.workers.iter().find(|w| w.name == worker))
                .and_then(|w| w.inventory.gpus.iter().find(|g| &g.uuid == u))
                .map_or_else(|| u.clone(), |g| g.model.clone())
        })
        .collect();
    let mut uniq: Vec<(String, usize)> = Vec::new();
    for m in models {
        match uniq.iter_mut().find(|(n, _)| *n == m) {
            Some((_, c)) => *c += 1,
            None => uniq.push((m, 1)),
        }
    }
    let list: Vec<String> = uniq.iter().map(|(m, c)| format!("{c}× {m}")).collect();
    format!("{worker} ({})", list.join(", "))
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

async fn up(f: &RelayFabric<'_>, dir: &Path, a: &UpArgs, out: &mut dyn Write) -> Result<()> {
    let req = up_request(a)?;
    let body = serde_json::to_string(&req)?;
    let t0 = Instant::now();
    let raw = pool_bytes(f, Call::new("POST", CLUSTERS_PATH, Some(&body))).await?;
    let created: ClusterCreated = parse(&raw, "cluster")?;
    let tp = token_path(dir, &a.name);
    crate::ray::write_token(&tp, &created.token)
        .with_context(|| format!("cannot keep the cluster's token in {}", tp.display()))?;
    writeln!(
        out,
        "cluster {} is pool job {} ({} node(s) × {} GPU(s)); token in {}",
        a.name,
        created.job.id,
        a.nodes,
        a.gpus_per_node,
        tp.display()
    )?;
    out.flush()?;
    let deadline = t0 + Duration::from_secs(a.timeout);
    let mut step = t0;
    let mut said_reason = String::new();
    let mut reserved = false;
    let mut head_up = false;
    let mut joined = 0usize;
    let mut pool: Option<PoolView> = None;
    loop {
        let j = get_cluster(f, &a.name).await?;
        let c = j.cluster.clone().unwrap_or_default_info(&a.name);
        if ended(&j.state) {
            return Err(failed_up(f, &j).await);
        }
        if j.state == "pending" {
            let r = j.reason.clone().unwrap_or_else(|| "queued".into());
            if r != said_reason {
                writeln!(out, "waiting: {r}")?;
                out.flush()?;
                said_reason = r;
            }
        } else if !reserved {
            reserved = true;
            if pool.is_none() {
                pool = pool_view(f).await.ok();
            }
            let who: Vec<String> = j
                .members
                .iter()
                .map(|m| member_gpus(pool.as_ref(), &m.worker, &m.gpus))
                .collect();
            writeln!(
                out,
                "reserved {} worker(s): {} ({})",
                j.members.len(),
                who.join(", "),
                secs(step.elapsed())
            )?;
            out.flush()?;
            step = Instant::now();
        }
        let alive = c.alive(j.attempt);
        if reserved && !head_up && alive >= 1 {
            head_up = true;
            writeln!(
                out,
                "head up on {} ({}) ({})",
                c.head_worker.as_deref().unwrap_or("?"),
                c.head_ip.as_deref().unwrap_or("?"),
                secs(step.elapsed())
            )?;
            out.flush()?;
            step = Instant::now();
        }
        if head_up && alive > joined {
            joined = alive;
            writeln!(
                out,
                "{joined}/{} joined ({})",
                j.members.len(),
                secs(step.elapsed())
            )?;
            out.flush()?;
            step = Instant::now();
        }
        if head_up && joined >= j.members.len() && !j.members.is_empty() {
            let ip = c.head_ip.clone().unwrap_or_default();
            let head = c.head_worker.clone().unwrap_or_default();
            writeln!(
                out,
                "cluster {} is up in {}: {} nodes alive\n  dashboard: http://{ip}:{DASHBOARD_PORT} (on the mesh)\n  \
                 submit:    weft cluster submit {} -- python script.py\n  \
                 or:        RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={} ray job submit --address http://{ip}:{DASHBOARD_PORT} -- python script.py\n  \
                 off-mesh:  weft forward {DASHBOARD_PORT}:{head}:{DASHBOARD_SERVICE}  (then http://127.0.0.1:{DASHBOARD_PORT})",
                a.name,
                secs(t0.elapsed()),
                joined,
                a.name,
                tp.display(),
            )?;
            out.flush()?;
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "cluster {} is not up after {}s (state {}, {alive}/{} Ray nodes alive); it is left as it is: \
                 `weft cluster status {}`, `weft cluster down {}`",
                a.name,
                a.timeout,
                j.state,
                j.members.len(),
                a.name,
                a.name
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

trait OrInfo {
    fn unwrap_or_default_info(self, name: &str) -> weft_proto::cluster::ClusterInfo;
}

impl OrInfo for Option<weft_proto::cluster::ClusterInfo> {
    fn unwrap_or_default_info(self, name: &str) -> weft_proto::cluster::ClusterInfo {
        self.unwrap_or_else(|| weft_proto::cluster::ClusterInfo {
            name: name.to_string(),
            head_ip: None,
            head_worker: None,
            member_ips: vec![],
            token_sha256: String::new(),
            ray: None,
            placed_ms: None,
            vacant: vec![],
        })
    }
}

/// Why `up` failed: the members' states and the tail of a failed member's output.
async fn failed_up(f: &RelayFabric<'_>, j: &JobView) -> anyhow::Error {
    let mut msg = format!("cluster job {} {}", j.id, j.state);
    for m in &j.members {
        msg.push_str(&format!("\n  rank {} on {}: {}", m.rank, m.worker, m.state));
    }
    let bad = j
        .members
        .iter()
        .find(|m| m.state != "succeeded" && m.state != "cancelled" && m.local_id.is_some());
    if let Some(m) = bad {
        let mut log = Vec::new();
        if member_log(f, m, m.local_id.unwrap_or(0), false, &mut log)
            .await
            .is_ok()
        {
            let text = String::from_utf8_lossy(&log);
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            msg.push_str(&format!(
                "\n  last lines of rank {} ({}):",
                m.rank, m.worker
            ));
            for l in tail.iter().rev() {
                msg.push_str(&format!("\n    {l}"));
            }
        }
    }
    msg.push_str("\nits GPUs are released");
    anyhow::anyhow!(msg)
}

/// `list`: one line per cluster.
pub fn list_text(clusters: &[JobView], pool: Option<&PoolView>) -> String {
    let mut rows = vec![vec![
        "NAME".to_string(),
        "STATE".into(),
        "RAY".into(),
        "HEAD".into(),
        "MEMBERS (GPUS)".into(),
    ]];
    for j in clusters {
        let Some(c) = &j.cluster else { continue };
        let ray = format!("{}/{} alive", c.alive(j.attempt), j.request.nodes);
        let head = match (&c.head_worker, &c.head_ip) {
            (Some(w), Some(ip)) if !ended(&j.state) => format!("{w} {ip}:{DASHBOARD_PORT}"),
            _ => "-".into(),
        };
        let members: Vec<String> = j
            .members
            .iter()
            .map(|m| member_gpus(pool, &m.worker, &m.gpus))
            .collect();
        let state = if c.degraded() && !ended(&j.state) {
            format!("{} (degraded)", j.state)
        } else {
            j.state.clone()
        };
        rows.push(vec![
            c.name.clone(),
            state,
            ray,
            head,
            if members.is_empty() {
                "-".into()
            } else {
                members.join(", ")
            },
        ]);
    }
    if rows.len() == 1 {
        return "no clusters (make one with `weft cluster up NAME --nodes K`)\n".into();
    }
    table(&rows)
}

fn table(rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut s = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, c) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.push_str(line.trim_end());
        s.push('\n');
    }
    s
}

/// `status`: the members and Ray's view of each node.
pub fn status_text(j: &JobView, pool: Option<&PoolView>, token: Option<&Path>) -> String {
    let mut s = String::new();
    let Some(c) = &j.cluster else {
        return format!("pool job {} is not a cluster\n", j.id);
    };
    s.push_str(&format!(
        "cluster {}  (pool job {}, attempt {}, owner {})\nstate: {}\n",
        c.name, j.id, j.attempt, j.owner, j.state
    ));
    if let Some(r) = &j.reason {
        s.push_str(&format!("waiting: {r}\n"));
    }
    if c.degraded() && !ended(&j.state) {
        let ranks: Vec<String> = c.vacant.iter().map(u32::to_string).collect();
        s.push_str(&format!(
            "degraded: rank {} lost with its worker; {}\n",
            ranks.join(", "),
            if j.request.cluster.as_ref().is_some_and(|r| r.replace) {
                "waiting for a fitting Ray worker to take its place (--replace)"
            } else {
                "running without it (`cluster up --replace` gives a lost rank to another worker)"
            }
        ));
    }
    if let (Some(w), Some(ip)) = (&c.head_worker, &c.head_ip) {
        s.push_str(&format!(
            "head: {w} {ip}  dashboard http://{ip}:{DASHBOARD_PORT}  (off the mesh: weft forward {DASHBOARD_PORT}:{w}:{DASHBOARD_SERVICE})\n"
        ));
    }
    if let Some(t) = token {
        s.push_str(&format!(
            "token: {} (sha256 {}…)\n",
            t.display(),
            &c.token_sha256[..c.token_sha256.len().min(12)]
        ));
    }
    let ray = c.ray.as_ref().filter(|r| r.attempt == j.attempt);
    let mut rows = vec![vec![
        "RANK".to_string(),
        "WORKER (GPUS)".into(),
        "OVERLAY IP".into(),
        "MEMBER".into(),
        "RAY NODE".into(),
    ]];
    for m in &j.members {
        let ip = c.member_ips.get(m.rank as usize).cloned();
        // A member whose Ray was restarted has a dead node and a live one at its address.
        let node = ray.and_then(|r| {
            let mine = |n: &&weft_proto::cluster::RayNode| {
                ip.as_deref() == Some(n.ip.as_str()) || (m.rank == 0 && n.head)
            };
            r.nodes
                .iter()
                .filter(mine)
                .find(|n| n.alive)
                .or_else(|| r.nodes.iter().find(mine))
        });
        let ray_col = match (ray, node) {
            (_, Some(n)) => format!(
                "{} ({} CPU, {} GPU)",
                if n.alive { "ALIVE" } else { "DEAD" },
                n.cpus,
                n.gpus
            ),
            (Some(_), None) => "not joined".into(),
            _ => "not reported".into(),
        };
        rows.push(vec![
            m.rank.to_string(),
            member_gpus(pool, &m.worker, &m.gpus),
            ip.unwrap_or_else(|| "-".into()),
            m.state.clone(),
            ray_col,
        ]);
    }
    s.push_str(&table(&rows));
    if let Some(r) = ray {
        s.push_str(&format!(
            "ray nodes ({} alive of {}):\n",
            r.nodes.iter().filter(|n| n.alive).count(),
            r.nodes.len()
        ));
        for n in &r.nodes {
            s.push_str(&format!(
                "  {:<15} {:<5} {}{} CPU, {} GPU\n",
                n.ip,
                if n.alive { "ALIVE" } else { "DEAD" },
                if n.head { "head, " } else { "" },
                n.cpus,
                n.gpus
            ));
        }
    }
    s
}

async fn list(f: &RelayFabric<'_>, json: bool, out: &mut dyn Write) -> Result<()> {
    let raw = pool_bytes(f, Call::get(CLUSTERS_PATH)).await?;
    let clusters: Vec<JobView> = parse(&raw, "clusters")?;
    if json {
        out.write_all(&raw)?;
        writeln!(out)?;
    } else {
        let pool = pool_view(f).await.ok();
        out.write_all(list_text(&clusters, pool.as_ref()).as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

async fn status(
    f: &RelayFabric<'_>,
    dir: &Path,
    name: &str,
    json: bool,
    out: &mut dyn Write,
) -> Result<()> {
    let raw = pool_bytes(f, Call::get(&format!("{CLUSTERS_PATH}/{name}"))).await?;
    let j: JobView = parse(&raw, "cluster")?;
    if json {
        out.write_all(&raw)?;
        writeln!(out)?;
    } else {
        let pool = pool_view(f).await.ok();
        let tp = token_path(dir, name);
        out.write_all(
            status_text(&j, pool.as_ref(), tp.exists().then_some(tp.as_path())).as_bytes(),
        )?;
    }
    out.flush()?;
    Ok(())
}

async fn down(f: &RelayFabric<'_>, name: &str, out: &mut dyn Write) -> Result<()> {
    let t0 = Instant::now();
    let raw = pool_bytes(
        f,
        Call::new("DELETE", &format!("{CLUSTERS_PATH}/{name}"), None),
    )
    .await?;
    let mut j: JobView = parse(&raw, "cluster")?;
    writeln!(
        out,
        "stopping Ray on {} member(s) of {name}",
        j.members.len()
    )?;
    out.flush()?;
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let live: Vec<&str> = j
            .members
            .iter()
            .filter(|m| matches!(m.state.as_str(), "starting" | "running"))
            .map(|m| m.worker.as_str())
            .collect();
        if live.is_empty() {
            writeln!(
                out,
                "cluster {name} is down ({}): every member stopped, its GPUs are free",
                secs(t0.elapsed())
            )?;
            out.flush()?;
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "cluster {name}: {} still running after 60 s ({}); the coordinator stops them when their workers answer",
                live.len(),
                live.join(", ")
            );
        }
        tokio::time::sleep(POLL).await;
        j = get_cluster(f, name).await?;
    }
}

/// `submit`: a local port forwarded to the head's dashboard over the relay, and `ray job
/// submit` against it with the token.
async fn submit(f: &RelayFabric<'_>, dir: &Path, a: &SubmitArgs) -> Result<()> {
    let j = get_cluster(f, &a.name).await?;
    let c = j.cluster.clone().unwrap_or_default_info(&a.name);
    if j.state != "running" {
        bail!("cluster {} is {}, not running", a.name, j.state);
    }
    let head = c
        .head_worker
        .clone()
        .context("the cluster has no head yet")?;
    let tp = token_path(dir, &a.name);
    if !tp.exists() {
        bail!(
            "no token for cluster {} in {} (it is kept by the `weft cluster up` that made it)",
            a.name,
            tp.display()
        );
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("cannot bind a local port for the dashboard")?;
    let port = listener.local_addr()?.port();
    let ray = a.ray.clone().unwrap_or_else(|| PathBuf::from("ray"));
    let mut cmd = tokio::process::Command::new(&ray);
    cmd.arg("job")
        .arg("submit")
        .arg("--address")
        .arg(format!("http://127.0.0.1:{port}"));
    if let Some(w) = &a.working_dir {
        cmd.arg("--working-dir").arg(w);
    }
    cmd.arg("--").args(&a.command);
    cmd.env("RAY_AUTH_MODE", "token")
        .env("RAY_AUTH_TOKEN_PATH", &tp)
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .env_remove("RAY_AUTH_TOKEN")
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "cannot run {} (pass --ray PATH or set WEFT_RAY)",
            ray.display()
        )
    })?;
    let mut splices = FuturesUnordered::new();
    let status = loop {
        tokio::select! {
            st = child.wait() => break st?,
            acc = listener.accept() => {
                let Ok((tcp, _)) = acc else { continue };
                let head = head.clone();
                splices.push(async move {
                    match f.session.open(&head, DASHBOARD_SERVICE).await {
                        Ok((send, recv)) => {
                            let mut tunnel = tokio::io::join(recv, send);
                            let mut tcp = tcp;
                            let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut tcp).await;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot open the head's dashboard through the relay"),
                    }
                });
            }
            Some(()) = splices.next(), if !splices.is_empty() => {}
        }
    };
    let _ = now_ms();
    if !status.success() {
        bail!("ray job submit exited with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::cluster::{ClusterInfo, RayHeadReport, RayNode};
    use weft_proto::pool::MemberView;

    fn args(name: &str) -> UpArgs {
        UpArgs {
            name: name.into(),
            nodes: 3,
            gpus_per_node: 1,
            gpu: None,
            priority: 0,
            cpus_per_node: Some(1),
            object_store_mib: Some(128),
            replace: false,
            timeout: 10,
        }
    }

    #[test]
    fn up_requests_are_checked_before_sending() {
        let r = up_request(&args("train")).expect("ok");
        assert_eq!(r.nodes, 3);
        assert!(r.command.is_empty());
        assert_eq!(r.cluster.as_ref().map(|c| c.name.as_str()), Some("train"));
        assert!(up_request(&args("Bad Name")).is_err());
        let mut bad = args("x");
        bad.gpu = Some("A100:".into());
        assert!(up_request(&bad).is_err());
        let mut zero = args("x");
        zero.nodes = 0;
        assert!(up_request(&zero).is_err());
    }

    fn cluster_job() -> JobView {
        JobView {
            id: 4,
            owner: "alice".into(),
            state: "running".into(),
            request: SubmitRequest {
                nodes: 2,
                ..SubmitRequest::default()
            },
            reason: None,
            attempt: 1,
            members: vec![
                MemberView {
                    rank: 0,
                    worker: "gpu1".into(),
                    gpus: vec!["GPU-a".into()],
                    local_id: Some(3),
                    state: "running".into(),
                    exit_code: None,
                },
                MemberView {
                    rank: 1,
                    worker: "gpu2".into(),
                    gpus: vec!["GPU-b".into()],
                    local_id: Some(5),
                    state: "running".into(),
                    exit_code: None,
                },
            ],
            submitted_ms: 0,
            started_ms: Some(1),
            ended_ms: None,
            cluster: Some(ClusterInfo {
                name: "train".into(),
                head_ip: Some("100.64.0.3".into()),
                head_worker: Some("gpu1".into()),
                member_ips: vec!["100.64.0.3".into(), "100.64.0.4".into()],
                token_sha256: "abcdef0123456789".into(),
                ray: Some(RayHeadReport {
                    pool_job: 4,
                    attempt: 1,
                    at_ms: 1,
                    nodes: vec![
                        RayNode {
                            ip: "100.64.0.3".into(),
                            alive: true,
                            head: true,
                            cpus: 1.0,
                            gpus: 1.0,
                        },
                        RayNode {
                            ip: "100.64.0.4".into(),
                            alive: false,
                            head: false,
                            cpus: 1.0,
                            gpus: 1.0,
                        },
                    ],
                }),
                placed_ms: Some(1),
                vacant: vec![],
            }),
        }
    }

    #[test]
    fn list_and_status_name_gpus_ray_nodes_and_the_head() {
        let j = cluster_job();
        let l = list_text(std::slice::from_ref(&j), None);
        assert!(l.contains("train"), "{l}");
        assert!(l.contains("1/2 alive"), "{l}");
        assert!(l.contains("gpu1 100.64.0.3:8265"), "{l}");
        assert!(l.contains("gpu2 (1× GPU-b)"), "{l}");
        let s = status_text(&j, None, Some(Path::new("/t/train.token")));
        assert!(s.contains("dashboard http://100.64.0.3:8265"), "{s}");
        assert!(s.contains("weft forward 8265:gpu1:ray-dashboard"), "{s}");
        assert!(s.contains("100.64.0.4      DEAD"), "{s}");
        assert!(s.contains("ALIVE (1 CPU, 1 GPU)"), "{s}");
        assert!(s.contains("DEAD (1 CPU, 1 GPU)"), "{s}");
        assert!(
            !s.contains("abcdef0123456789"),
            "the whole hash is not shown: {s}"
        );
        assert_eq!(
            list_text(&[], None),
            "no clusters (make one with `weft cluster up NAME --nodes K`)\n"
        );
    }
}
