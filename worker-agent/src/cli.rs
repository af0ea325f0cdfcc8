//! The agent's client commands, flags and all, shared by the `worker-agent`
//! binary (`status`, `jobs …`, `history`) and `weft` (`weft jobs …`,
//! `weft history`, and the GPU column of `weft status`): each binary takes
//! [`JobsArgs`] and [`ReportArgs`] as its own subcommands (with its own
//! one-line help) and calls the function of the same name here, which talks
//! to the API through [`crate::client`] and prints. `weft jobs` without
//! `--worker` or `--api` goes to the pool instead (`pool_cli::jobs_or_agent`,
//! which imports this module, not the other way round).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tunnel_relay::link::LinkState;

use crate::client;
use crate::job::{Job, JobRequest, JobState};
use crate::overlay::{MeshStatus, OnMesh};

/// Default state directory of a local agent.
pub const DEFAULT_AGENT_DIR: &str = "/var/lib/weft-agent";
/// The agent's status endpoint.
pub const STATUS_PATH: &str = "/v1/status";

/// Which agent API: the local one, or a worker's through the relay or the mesh.
#[derive(clap::Args, Debug, Clone)]
pub struct ApiArgs {
    /// Engineer: reach this worker's agent through the relay (its `agent` service), as the
    /// identity of `weft login` (`tunnel-relay login`) in --state-dir. Without it (and without
    /// --api): `weft jobs` goes to the pool, `worker-agent` to the local agent.
    #[arg(long, env = "WEFT_WORKER", global = true)]
    pub worker: Option<String>,
    /// With --worker: how to reach it. `relay` (default): the worker's `agent` service through
    /// the relay. `mesh`: straight over the mesh at http://NAME.weft.internal:7070 (or an
    /// overlay IP given as NAME), when this machine runs `weft up` (`mesh up`); names are
    /// resolved by the local node's MagicDNS (100.64.0.1).
    #[arg(long, env = "WEFT_VIA", global = true, value_enum, default_value_t = Via::Relay, requires = "worker")]
    pub via: Via,
    /// Local agent API base URL; default: read from STATE_DIR/api.url. Not with --worker.
    #[arg(long, env = "WEFT_AGENT_API", global = true, conflicts_with = "worker")]
    pub api: Option<String>,
    /// With --worker, or for the pool: the engineer's identity directory (default:
    /// $XDG_CONFIG_HOME/weft or ~/.config/weft, as for `weft login`). For the local agent: its
    /// state directory, to find api.url (default: /var/lib/weft-agent).
    #[arg(long, env = "WEFT_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

/// `jobs SUBCOMMAND`: what to do, and which agent.
#[derive(clap::Args, Debug, Clone)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub cmd: JobsCmd,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `history`, `status`: a report from an agent, as a table or as JSON.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// How the engineer's CLI reaches a worker.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// Through the relay (the worker's `agent` service), as the `weft login` identity.
    Relay,
    /// Over the mesh to the worker's overlay address, as this machine's mesh node.
    Mesh,
}

/// `jobs submit`'s flags. `--gpu`, `--nodes`, `--priority`, `--retry` and
/// `--wait-for-capacity` are the pool's; `--label`, `--cpus`, `--memory` one agent's.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SubmitArgs {
    /// GPUs (for the pool: per node, when --gpu gives no count).
    #[arg(long, default_value_t = 0)]
    pub gpus: u32,
    /// Pool: the GPUs each node needs, in dstack's grammar: A100, H100,A100, A100:2,
    /// 24GB..80GB, 40GB..:1..4 (model names, memory per GPU, count). Not with --worker.
    #[arg(long, value_name = "SPEC")]
    pub gpu: Option<String>,
    /// Pool: how many workers it runs on; more than 1 is a gang, placed all at once (default 1).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u32).range(1..))]
    pub nodes: Option<u32>,
    /// Pool: higher runs first (default 0).
    #[arg(long, value_name = "P", allow_negative_numbers = true)]
    pub priority: Option<i32>,
    /// Pool: how many times to place it again after a failure or a lost worker (default 0).
    #[arg(long, value_name = "R")]
    pub retry: Option<u32>,
    /// Pool: queue it even when no worker in the pool could ever run it.
    #[arg(long)]
    pub wait_for_capacity: bool,
    /// Timeout: 90s, 30m, 2h, 1d, or plain seconds (rounded up to whole seconds).
    #[arg(long, value_name = "DUR", value_parser = tunnel_relay::duration::parse)]
    pub timeout: Option<Duration>,
    #[arg(long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// One worker only (with --worker or a local agent).
    #[arg(long = "label", value_name = "K=V")]
    pub labels: Vec<String>,
    #[arg(long)]
    pub workdir: Option<String>,
    /// CPU limit in cores (needs cgroup v2 on the worker). One worker only.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory limit in bytes (needs cgroup v2 on the worker). One worker only.
    #[arg(long)]
    pub memory: Option<u64>,
    #[arg(long)]
    pub json: bool,
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

impl SubmitArgs {
    /// The pool's flags that were given (they need the pool).
    pub fn pool_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.gpu.is_some() {
            v.push("--gpu");
        }
        if self.nodes.is_some() {
            v.push("--nodes");
        }
        if self.priority.is_some() {
            v.push("--priority");
        }
        if self.retry.is_some() {
            v.push("--retry");
        }
        if self.wait_for_capacity {
            v.push("--wait-for-capacity");
        }
        v
    }

    /// One agent's flags that were given (the pool does not take them).
    pub fn worker_flags(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if !self.labels.is_empty() {
            v.push("--label");
        }
        if self.cpus.is_some() {
            v.push("--cpus");
        }
        if self.memory.is_some() {
            v.push("--memory");
        }
        v
    }
}

/// `--a`, `--a and --b`, `--a, --b and --c`.
pub(crate) fn and_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_string(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `jobs …`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum JobsCmd {
    /// Submit a job: `jobs submit --gpu A100:2 -- python train.py` (the pool places it), or
    /// `jobs submit --worker gpu1 --gpus 1 -- python train.py` (on that worker).
    Submit(SubmitArgs),
    /// List jobs.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one job.
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    /// Print a job's output (`--follow` until it ends; for a pool job that has not started
    /// yet, it waits for it). A pool gang's lines carry `[rank N WORKER] `.
    Logs {
        id: u64,
        #[arg(long)]
        follow: bool,
    },
    /// Cancel a job (SIGTERM, then SIGKILL after the agent's grace period).
    Cancel {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

/// Where the API is, from the flags.
pub fn endpoint(a: &ApiArgs) -> Result<client::Endpoint> {
    if let (Some(worker), Via::Mesh) = (&a.worker, a.via) {
        return Ok(client::Endpoint::Mesh {
            worker: worker.clone(),
        });
    }
    if let Some(worker) = &a.worker {
        let state_dir = client::engineer_dir(a.state_dir.as_deref())?;
        return Ok(client::Endpoint::Relay {
            state_dir,
            worker: worker.clone(),
        });
    }
    if let Some(u) = &a.api {
        return Ok(client::Endpoint::Local(u.trim_end_matches('/').to_string()));
    }
    let dir = a
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_AGENT_DIR));
    let p = dir.join(crate::API_ADDR_FILE);
    let s = std::fs::read_to_string(&p).with_context(|| {
        format!(
            "cannot read {} (is the agent running? or pass --api URL, or --worker NAME to go through the relay)",
            p.display()
        )
    })?;
    Ok(client::Endpoint::Local(s.trim().to_string()))
}

fn call(a: &ApiArgs, method: &str, path: &str, body: Option<&str>) -> Result<Vec<u8>> {
    let ep = endpoint(a)?;
    let mut body_out = Vec::new();
    let req = client::Call::new(method, path, body);
    let (code, failed) = client::call(&ep, req, &mut body_out)?;
    check(code, &failed)?;
    Ok(body_out)
}

/// A non-2xx answer as an error with the agent's message.
pub fn check(code: u16, body: &[u8]) -> Result<()> {
    check_from("agent", code, body)
}

/// A non-2xx answer from `who` (`agent`, `the pool`) as an error with its message
/// (`{"error": "..."}`, else the body as text).
pub fn check_from(who: &str, code: u16, body: &[u8]) -> Result<()> {
    if !(200..300).contains(&code) {
        let msg = serde_json::from_slice::<crate::api::ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        bail!("{who} answered {code}: {msg}");
    }
    Ok(())
}

/// `GET /v1/status` of `worker` on an open relay session (`weft status` asks
/// every worker on one session).
pub async fn status_on_session(
    session: &tunnel_relay::Session,
    state_dir: &std::path::Path,
    worker: &str,
) -> Result<crate::api::Status> {
    let mut body = Vec::new();
    let req = client::Call::get(STATUS_PATH);
    let (code, failed) =
        client::call_on_session(session, state_dir, worker, req, &mut body).await?;
    check(code, &failed)?;
    serde_json::from_slice(&body).context("status JSON")
}

pub(crate) fn kv(items: &[String], flag: &str) -> Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("{flag} {s:?}: expected K=V"))
        })
        .collect()
}

fn fmt_ms(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |m| format!("{}.{:03}", m / 1000, m % 1000))
}

fn print_job(j: &Job) {
    let result = match &j.state {
        JobState::Failed { exit_code } => format!("failed({exit_code})"),
        JobState::Killed { signal, oom } => {
            format!("killed(signal {signal}{})", if *oom { ", OOM" } else { "" })
        }
        JobState::Lost { reason } => format!("lost({reason})"),
        s => s.name().to_string(),
    };
    println!(
        "{:>5}  {:<22} {:<12} gpus={:<3} start={} end={}  {}",
        j.id,
        result,
        j.caller,
        j.gpu_uuids.len(),
        fmt_ms(j.started_ms),
        fmt_ms(j.ended_ms),
        j.spec.command.join(" ")
    );
}

/// `status`: GPUs, their health, running and queued jobs, relay and mesh.
pub fn status(a: &ReportArgs) -> Result<()> {
    let (json, api) = (a.json, &a.api);
    let body = call(api, "GET", STATUS_PATH, None)?;
    if json {
        println!("{}", String::from_utf8_lossy(&body));
        return Ok(());
    }
    let st: crate::api::Status = serde_json::from_slice(&body).context("status JSON")?;
    println!("NVML: {:?}", st.snapshot.backend);
    for g in &st.snapshot.gpus {
        let s = &g.sample;
        let opt = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
        println!(
            "GPU {} {} {} [{}] util={}% mem={}/{} MiB temp={}C power={}/{} W  {}{}",
            s.index,
            s.name.as_deref().unwrap_or("?"),
            s.uuid,
            opt(s.pci_bus_id.clone()),
            opt(s.utilization_gpu_percent.map(|v| v.to_string())),
            opt(s.memory_used_bytes.map(|v| (v >> 20).to_string())),
            opt(s.memory_total_bytes.map(|v| (v >> 20).to_string())),
            opt(s.temperature_celsius.map(|v| v.to_string())),
            opt(s.power_draw_milliwatts.map(|v| (v / 1000).to_string())),
            opt(s.power_limit_milliwatts.map(|v| (v / 1000).to_string())),
            g.health.state.as_str(),
            if g.health.reasons.is_empty() {
                String::new()
            } else {
                format!(" ({})", g.health.reasons.join("; "))
            },
        );
    }
    println!(
        "running: {:?}  queued: {:?}",
        st.jobs_running, st.jobs_queued
    );
    println!("relay: {}", relay_line(st.relay.as_ref()));
    println!("mesh: {}", mesh_line(st.mesh.as_ref()));
    Ok(())
}

/// `history`: finished jobs with GPU-seconds, and totals.
pub fn history(a: &ReportArgs) -> Result<()> {
    let (json, api) = (a.json, &a.api);
    let jobs: Vec<Job> =
        serde_json::from_slice(&call(api, "GET", "/v1/jobs", None)?).context("jobs JSON")?;
    let h = crate::history::summarize(&jobs);
    if json {
        println!("{}", serde_json::to_string_pretty(&h)?);
        return Ok(());
    }
    for e in &h.jobs {
        println!(
            "{:>5} {:<12} {:<10} gpus={} start={} end={} gpu_s={:.1}",
            e.id,
            e.caller,
            e.result.name(),
            e.gpus.len(),
            fmt_ms(e.started_ms),
            fmt_ms(e.ended_ms),
            e.gpu_seconds
        );
    }
    println!(
        "total: {} jobs, {} succeeded, {:.1} GPU-seconds",
        h.total_jobs, h.succeeded, h.total_gpu_seconds
    );
    Ok(())
}

fn relay_line(l: Option<&LinkState>) -> String {
    match l {
        None => {
            "not joined (jobs API on loopback only; `worker-agent run --token TOKEN` joins)".into()
        }
        Some(LinkState::Connecting { attempt: 1 }) => "connecting".into(),
        Some(LinkState::Connecting { attempt }) => format!("connecting (attempt {attempt})"),
        Some(LinkState::Connected(a)) => format!(
            "connected to {} as {} (tags: {})",
            a.address,
            a.name,
            a.tags.join(",")
        ),
        Some(LinkState::Retrying {
            last_error,
            retry_in_ms,
            ..
        }) => format!("reconnecting in {retry_in_ms} ms (last error: {last_error})"),
        Some(LinkState::Failed { reason }) => format!("refused: {reason}"),
        Some(LinkState::Stopped) => "stopped".into(),
    }
}

fn mesh_line(m: Option<&MeshStatus>) -> String {
    match m {
        None => "unknown (the agent predates the mesh)".into(),
        Some(MeshStatus::Disabled { reason }) => format!("not joined ({reason})"),
        Some(MeshStatus::WaitingForRelay) => {
            "waiting for the relay to admit this worker before joining".into()
        }
        Some(MeshStatus::Link(LinkState::Connecting { .. } | LinkState::Connected(_))) => {
            "joining".into()
        }
        Some(MeshStatus::Link(LinkState::Retrying {
            last_error,
            retry_in_ms,
            ..
        })) => format!("retrying in {retry_in_ms} ms (last error: {last_error})"),
        Some(MeshStatus::Joined(OnMesh {
            name,
            ipv4,
            ipv6,
            interface,
            api,
        })) => format!(
            "joined as {name} ({ipv4}, {ipv6}) on {interface}; jobs API on {}",
            api.iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(MeshStatus::Link(LinkState::Failed { reason })) => {
            format!("failed: {reason} (reachable through the relay only)")
        }
        Some(MeshStatus::Link(LinkState::Stopped)) => "stopped".into(),
    }
}

/// Whole seconds for the job timeout, rounded up (`500ms` is 1 s).
pub(crate) fn timeout_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Whether `jobs` goes to the pool: the binary's default is the pool (`weft`) and neither
/// `--worker` nor `--api` names one agent.
pub fn goes_to_pool(api: &ApiArgs, pool_default: bool) -> bool {
    pool_default && api.worker.is_none() && api.api.is_none()
}

/// `jobs …` to one agent (the local one, or `--worker`'s), exactly as before the pool;
/// `weft` routes through `pool_cli::jobs_or_agent` first. `pool_default` (the binary's choice)
/// only words the refusal of the pool's flags.
pub fn jobs(a: JobsArgs, pool_default: bool) -> Result<()> {
    let JobsArgs { cmd, api } = a;
    let api = &api;
    match cmd {
        JobsCmd::Submit(s) => {
            let pool = s.pool_flags();
            if !pool.is_empty() {
                let (flags, they) = (and_list(&pool), if pool.len() == 1 { "it" } else { "them" });
                if pool_default {
                    bail!(
                        "{flags}: the pool's, not one worker's: leave out --worker/--api and the \
                         pool places the job (`weft pool` shows the workers), or leave {they} out"
                    );
                }
                bail!(
                    "{flags}: the pool's, not one agent's: `weft jobs submit` without --worker \
                     sends the job to the pool, or leave {they} out"
                );
            }
            let SubmitArgs {
                gpus,
                timeout,
                env,
                labels,
                workdir,
                cpus,
                memory,
                json,
                command,
                ..
            } = s;
            let spec = JobRequest {
                command,
                env: kv(&env, "--env")?,
                workdir,
                gpus,
                timeout_s: timeout.map(timeout_secs),
                labels: kv(&labels, "--label")?,
                cpus,
                memory_bytes: memory,
            };
            let body = serde_json::to_string(&spec)?;
            let out = call(api, "POST", "/v1/jobs", Some(&body))?;
            let j: Job = serde_json::from_slice(&out).context("job JSON")?;
            if json {
                println!("{}", serde_json::to_string(&j)?);
            } else {
                println!("{}", j.id);
            }
        }
        JobsCmd::List { json } => {
            let out = call(api, "GET", "/v1/jobs", None)?;
            if json {
                println!("{}", String::from_utf8_lossy(&out));
            } else {
                let jobs: Vec<Job> = serde_json::from_slice(&out).context("jobs JSON")?;
                jobs.iter().for_each(print_job);
            }
        }
        JobsCmd::Show { id, json } => {
            let out = call(api, "GET", &format!("/v1/jobs/{id}"), None)?;
            if json {
                println!("{}", String::from_utf8_lossy(&out));
            } else {
                print_job(&serde_json::from_slice(&out).context("job JSON")?);
            }
        }
        JobsCmd::Cancel { id, json } => {
            let out = call(api, "POST", &format!("/v1/jobs/{id}/cancel"), Some(""))?;
            if json {
                println!("{}", String::from_utf8_lossy(&out));
            } else {
                print_job(&serde_json::from_slice(&out).context("job JSON")?);
            }
        }
        JobsCmd::Logs { id, follow } => {
            let ep = endpoint(api)?;
            let path = format!("/v1/jobs/{id}/logs?follow={follow}");
            // The log streams to stdout as it arrives; an error answer becomes the message.
            let mut stdout = std::io::stdout();
            let req = client::Call::get(&path).streamed();
            let (code, failed) = client::call(&ep, req, &mut stdout)?;
            check(code, &failed)?;
        }
    }
    Ok(())
}

/// The error and its causes, `: `-separated, leaving out a cause that the message before it
/// already ends with (library errors quote their source in their own message).
pub fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let m = cause.to_string();
        if out.ends_with(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_timeouts_round_up_to_seconds() {
        assert_eq!(timeout_secs(Duration::from_secs(90)), 90);
        assert_eq!(timeout_secs(Duration::from_millis(500)), 1);
        assert_eq!(timeout_secs(Duration::from_millis(1001)), 2);
        assert_eq!(timeout_secs(Duration::ZERO), 0);
    }
}
