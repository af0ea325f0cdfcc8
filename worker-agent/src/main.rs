//! `worker-agent`: thin CLI over the `worker_agent` library.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use worker_agent::cli::{self, JobsArgs, ReportArgs};

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

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the agent.
    Run(RunArgs),
    /// GPUs, their health, running and queued jobs.
    Status(ReportArgs),
    /// Submit and manage jobs (also `weft jobs`).
    Jobs(JobsArgs),
    /// Finished jobs with submitter, GPUs, times, result and GPU-seconds, plus totals.
    History(ReportArgs),
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
    /// Internal: runs a Ray cluster member's `ray start --block` and restarts it when Ray
    /// exits on its own (a raylet that crashed or that GCS declared dead).
    #[command(hide = true)]
    RayMember {
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
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = mesh::cli::DEFAULT_UAPI_DIR)]
    uapi_dir: PathBuf,
    /// The mesh node's WireGuard UDP port (default: random).
    #[arg(long, env = "WEFT_WG_PORT")]
    wg_port: Option<u16>,
    /// The `ray` command of the Python environment Ray cluster members run (e.g.
    /// `/opt/ray/bin/ray`). Without it (or without the mesh) the worker is not chosen for
    /// `weft cluster up`.
    #[arg(long, env = "WEFT_RAY")]
    ray: Option<PathBuf>,
}

fn secs(v: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("{flag} {v}: must be a non-negative number of seconds"))
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

fn run_agent(a: RunArgs) -> Result<()> {
    let token = a
        .token
        .as_deref()
        .map(|t| tunnel_relay::Token::parse(t.trim()))
        .transpose()
        .context("--token")?;
    let name = match a.name {
        Some(n) => n,
        None => tunnel_relay::rt::hostname()
            .context("cannot read the host name from /proc/sys/kernel/hostname; pass --name")?,
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
        ray: a.ray,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(worker_agent::run(cfg, tunnel_relay::rt::shutdown_signal()))?;
    Ok(())
}

fn main_inner(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Run(a) => {
            tunnel_relay::rt::init_tracing(tunnel_relay::rt::DEFAULT_LOG);
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
        Cmd::RayMember { argv } => std::process::exit(worker_agent::ray_member::run(&argv)),
        Cmd::Status(a) => cli::status(&a),
        Cmd::History(a) => cli::history(&a),
        Cmd::Jobs(a) => cli::jobs(a, false),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match main_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker-agent: {}", cli::chain(&e));
            ExitCode::FAILURE
        }
    }
}
