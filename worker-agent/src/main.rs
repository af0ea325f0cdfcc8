//! `worker-agent`: thin CLI over the `worker_agent` library.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tunnel_relay::link::LinkState;
use worker_agent::client;
use worker_agent::job::{Job, JobRequest};
use worker_agent::overlay::{MeshStatus, OnMesh};

#[derive(Parser, Debug)]
#[command(
    name = "worker-agent",
    version,
    about = "Weft worker agent: GPU telemetry, health and jobs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct ApiArgs {
    /// Engineer: reach this worker's agent through the relay (its `agent` service), as the
    /// identity of `tunnel-relay login` in --state-dir. Without it: the local agent.
    #[arg(long, env = "WEFT_WORKER", global = true)]
    worker: Option<String>,
    /// With --worker: how to reach it. `relay` (default): the worker's `agent` service through
    /// the relay. `mesh`: straight over the mesh at http://NAME.weft.internal:7070 (or an
    /// overlay IP given as NAME), when this machine runs `mesh up`; names are resolved by the
    /// local node's MagicDNS (100.64.0.1).
    #[arg(long, env = "WEFT_VIA", global = true, value_enum, default_value_t = Via::Relay, requires = "worker")]
    via: Via,
    /// Local agent API base URL; default: read from STATE_DIR/api.url. Not with --worker.
    #[arg(long, env = "WEFT_AGENT_API", global = true, conflicts_with = "worker")]
    api: Option<String>,
    /// With --worker: the engineer's identity directory (default: $XDG_CONFIG_HOME/weft or
    /// ~/.config/weft, as for `tunnel-relay login`). Without: the local agent's state directory,
    /// to find api.url (default: /var/lib/weft-agent).
    #[arg(long, env = "WEFT_STATE_DIR", global = true)]
    state_dir: Option<PathBuf>,
}

/// How the engineer's CLI reaches a worker.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Through the relay (the worker's `agent` service), as the `tunnel-relay login` identity.
    Relay,
    /// Over the mesh to the worker's overlay address, as this machine's mesh node.
    Mesh,
}

/// Default state directory of a local agent.
const DEFAULT_AGENT_DIR: &str = "/var/lib/weft-agent";

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the agent.
    Run(RunArgs),
    /// GPUs, their health, running and queued jobs.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Submit and manage jobs.
    Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Finished jobs with submitter, GPUs, times, result and GPU-seconds, plus totals.
    History {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Internal: wraps a job's command and records its exit status.
    #[command(hide = true)]
    ExecShim {
        #[arg(long)]
        status_file: PathBuf,
        #[arg(long)]
        cgroup: Option<PathBuf>,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        argv: Vec<OsString>,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Where the job database, logs and api.url live.
    #[arg(long, env = "WEFT_STATE_DIR")]
    state_dir: PathBuf,
    /// Jobs API address (loopback only).
    #[arg(long, env = "WEFT_API_LISTEN", default_value = "127.0.0.1:0")]
    api_listen: SocketAddr,
    /// Separate /metrics address (loopback only); /metrics is also on the API address.
    #[arg(long, env = "WEFT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Path of libnvidia-ml.so (default: the dynamic loader finds libnvidia-ml.so.1).
    #[arg(long, env = "WEFT_NVML_LIB")]
    nvml_lib: Option<PathBuf>,
    /// Seconds between SIGTERM and SIGKILL when cancelling or timing out a job.
    #[arg(long, env = "WEFT_KILL_GRACE_S", default_value_t = 10.0)]
    kill_grace_s: f64,
    /// Fast telemetry interval in milliseconds.
    #[arg(long, env = "WEFT_SAMPLE_MS", default_value_t = 1000)]
    sample_ms: u64,
    /// Energy counter interval in seconds (the call costs ~4 ms on an H100).
    #[arg(long, env = "WEFT_ENERGY_S", default_value_t = 10.0)]
    energy_s: f64,
    /// How long an XID keeps a GPU degraded/unhealthy, in seconds.
    #[arg(long, env = "WEFT_XID_WINDOW_S", default_value_t = 300.0)]
    xid_window_s: f64,
    /// Do not use per-job cgroup v2 even where it is writable.
    #[arg(long, env = "WEFT_NO_CGROUPS")]
    no_cgroups: bool,
    /// Join token from the relay operator (tag worker); first run only: the identity
    /// (identity.key, 0600) and the relay (relay.json) are then kept in --state-dir.
    /// Without a token and without a joined state dir the agent runs on loopback only.
    #[arg(long, env = "WEFT_RELAY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Name engineers use to reach this worker (default: the host name).
    #[arg(long, env = "WEFT_NAME")]
    name: Option<String>,
    /// A TCP service to expose through the relay: NAME=HOST:PORT (repeatable). Default
    /// ssh=127.0.0.1:22; `--service ssh=...` replaces it. The jobs API is always exposed as
    /// `agent`.
    #[arg(long = "service", value_name = "NAME=HOST:PORT")]
    services: Vec<String>,
    /// Do not join the mesh: reachable through the relay (and loopback) only. By default the
    /// agent runs the mesh node in-process with its relay identity (needs CAP_NET_ADMIN for the
    /// TUN interface; without it the agent warns and runs relay-only) and serves the jobs API
    /// on its overlay addresses, port 7070.
    #[arg(long, env = "WEFT_NO_MESH")]
    no_mesh: bool,
    /// The mesh node's TUN interface.
    #[arg(long, env = "WEFT_INTERFACE", default_value = "weft0")]
    interface: String,
    /// Directory of the mesh node's UAPI socket (where `mesh status` and `wg` look).
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = "/var/run/wireguard")]
    uapi_dir: PathBuf,
    /// The mesh node's WireGuard UDP port (default: random).
    #[arg(long, env = "WEFT_WG_PORT")]
    wg_port: Option<u16>,
}

#[derive(Subcommand, Debug)]
enum JobsCmd {
    /// Submit a job: `jobs submit --gpus 1 -- python train.py`.
    Submit {
        #[arg(long, default_value_t = 0)]
        gpus: u32,
        /// Timeout: 90s, 30m, 2h, 1d, or plain seconds.
        #[arg(long, value_name = "DUR")]
        timeout: Option<String>,
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
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: u64,
        #[arg(long)]
        json: bool,
    },
    Logs {
        id: u64,
        #[arg(long)]
        follow: bool,
    },
    Cancel {
        id: u64,
        #[arg(long)]
        json: bool,
    },
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("{flag} {v}: must be a non-negative number of seconds"))
}

/// Parses `90s`, `30m`, `2h`, `1d` or plain seconds.
fn parse_duration(flag: &str, s: &str) -> Result<Duration> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        Some((i, 'd')) => (&t[..i], 86_400),
        _ => (t, 1),
    };
    let n: u64 = num.parse().with_context(|| {
        format!("{flag} {s:?}: expected a number with s, m, h or d (e.g. 90s, 2h)")
    })?;
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

fn endpoint(a: &ApiArgs) -> Result<client::Endpoint> {
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
    let p = dir.join(worker_agent::API_ADDR_FILE);
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
    let limit = client::BodyLimit::Max(client::MAX_BODY);
    let (code, failed) = client::call(&ep, method, path, body, limit, &mut body_out)?;
    check(code, &failed)?;
    Ok(body_out)
}

fn check(code: u16, body: &[u8]) -> Result<()> {
    if !(200..300).contains(&code) {
        let msg = serde_json::from_slice::<worker_agent::api::ErrorBody>(body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
        bail!("agent answered {code}: {msg}");
    }
    Ok(())
}

fn services(specs: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = vec![("ssh".to_string(), "127.0.0.1:22".to_string())];
    for s in specs {
        let (n, a) = s
            .split_once('=')
            .filter(|(n, a)| !n.is_empty() && !a.is_empty())
            .with_context(|| {
                format!("--service {s:?}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22")
            })?;
        out.retain(|(m, _)| m != n);
        out.push((n.to_string(), a.to_string()));
    }
    Ok(out)
}

fn hostname() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        bail!(
            "cannot read the host name ({}); pass --name",
            std::io::Error::last_os_error()
        );
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if name.is_empty() {
        bail!("the host name is empty; pass --name");
    }
    Ok(name)
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
        worker_agent::job::JobState::Failed { exit_code } => format!("failed({exit_code})"),
        worker_agent::job::JobState::Killed { signal, oom } => {
            format!("killed(signal {signal}{})", if *oom { ", OOM" } else { "" })
        }
        worker_agent::job::JobState::Lost { reason } => format!("lost({reason})"),
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

fn run_agent(a: RunArgs) -> Result<()> {
    let token = a
        .token
        .as_deref()
        .map(|t| tunnel_relay::Token::parse(t.trim()))
        .transpose()
        .context("--token")?;
    let name = match a.name {
        Some(n) => n,
        None => hostname()?,
    };
    let cfg = worker_agent::Config {
        state_dir: a.state_dir,
        api_listen: a.api_listen,
        metrics_listen: a.metrics_listen,
        nvml_lib: a.nvml_lib,
        sampler: worker_agent::sampler::SamplerConfig {
            fast_interval: Duration::from_millis(a.sample_ms.max(10)),
            energy_interval: secs(a.energy_s, "--energy-s")?,
            xid_window: secs(a.xid_window_s, "--xid-window-s")?,
        },
        kill_grace: secs(a.kill_grace_s, "--kill-grace-s")?,
        shim: std::env::current_exe().ok(),
        cgroups: !a.no_cgroups,
        relay: Some(worker_agent::relay::RelayOptions {
            token: token.clone(),
            name: name.clone(),
            services: services(&a.services)?,
        }),
        // The same name as on the relay: one key, one name (the registry renames otherwise).
        mesh: (!a.no_mesh).then_some(worker_agent::overlay::MeshOptions {
            token,
            name,
            interface: a.interface,
            uapi_dir: a.uapi_dir,
            listen_port: a.wg_port,
        }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        worker_agent::run(cfg, shutdown).await
    })?;
    Ok(())
}

fn main_inner(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_env("WEFT_LOG")
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            run_agent(a)
        }
        Cmd::ExecShim {
            status_file,
            cgroup,
            argv,
        } => {
            let code = worker_agent::agent::run_shim(&status_file, cgroup.as_deref(), &argv);
            std::process::exit(code);
        }
        Cmd::Status { json, api } => {
            let body = call(&api, "GET", "/v1/status", None)?;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
                return Ok(());
            }
            let st: worker_agent::api::Status =
                serde_json::from_slice(&body).context("status JSON")?;
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
        Cmd::History { json, api } => {
            let jobs: Vec<Job> = serde_json::from_slice(&call(&api, "GET", "/v1/jobs", None)?)
                .context("jobs JSON")?;
            let h = worker_agent::history::summarize(&jobs);
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
        Cmd::Jobs { cmd, api } => jobs(cmd, &api),
    }
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

fn jobs(cmd: JobsCmd, api: &ApiArgs) -> Result<()> {
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
                timeout_s: timeout
                    .as_deref()
                    .map(|t| parse_duration("--timeout", t).map(|d| d.as_secs()))
                    .transpose()?,
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
            let limit = client::BodyLimit::Stream;
            let (code, failed) = client::call(&ep, "GET", &path, None, limit, &mut stdout)?;
            check(code, &failed)?;
        }
    }
    Ok(())
}

/// The error and its causes, `: `-separated, leaving out a cause that the message before it
/// already ends with (library errors quote their source in their own message).
fn chain(e: &anyhow::Error) -> String {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker-agent: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}
