//! The agent's client commands, flags and all, shared by the `worker-agent`
//! binary (`status`, `jobs …`, `history`) and `weft` (`weft jobs …`,
//! `weft history`, and the GPU column of `weft status`): each binary takes
//! [`JobsArgs`] and [`ReportArgs`] as its own subcommands (with its own
//! one-line help) and calls the function of the same name here, which talks
//! to the API through [`crate::client`] and prints.

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
    /// identity of `weft login` (`tunnel-relay login`) in --state-dir. Without it: the local agent.
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
    /// With --worker: the engineer's identity directory (default: $XDG_CONFIG_HOME/weft or
    /// ~/.config/weft, as for `weft login`). Without: the local agent's state directory,
    /// to find api.url (default: /var/lib/weft-agent).
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

/// `jobs …`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum JobsCmd {
    /// Submit a job: `jobs submit --gpus 1 -- python train.py`.
    Submit {
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// Timeout: 90s, 30m, 2h, 1d, or plain seconds (rounded up to whole seconds).
        #[arg(long, value_name = "DUR", value_parser = tunnel_relay::duration::parse)]
        timeout: Option<Duration>,
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        #[arg(long)]
        workdir: Option<String>,
        /// CPU limit in cores (needs cgroup v2 on the worker).
        #[arg(long)]
        cpus: Option<f64>,
        /// Memory limit in bytes (needs cgroup v2 on the worker).
        #[arg(long)]
        memory: Option<u64>,
        #[arg(long)]
        json: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
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
    /// Print a job's output (`--follow` until it ends).
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
    if !(200..300).contains(&code) {
        let msg = serde_json::from_slice::<crate::api::ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        bail!("agent answered {code}: {msg}");
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

fn kv(items: &[String], flag: &str) -> Result<BTreeMap<String, String>> {
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
fn timeout_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `jobs …`.
pub fn jobs(a: JobsArgs) -> Result<()> {
    let JobsArgs { cmd, api } = a;
    let api = &api;
    match cmd {
        JobsCmd::Submit {
            gpus,
            timeout,
            env,
            labels,
            workdir,
            cpus,
            memory,
            json,
            command,
        } => {
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
