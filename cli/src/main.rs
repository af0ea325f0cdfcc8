//! `weft`: the engineer's one command line, in the manner of `tailscale`.
//!
//! Every command is a thin shell over the libraries, the same functions the
//! older binaries call (which keep their spellings): `login`, `ssh-config`,
//! `connect`, `forward` are `tunnel_relay::cli`; `up`, `down`, `ping` are
//! `mesh::cli`; `jobs`, `history` are `worker_agent::cli` (`jobs` without
//! `--worker` goes to the pool), `pool` and `usage` `worker_agent::pool_cli`, `cluster` `worker_agent::cluster_cli`; `status` (this
//! crate's `status.rs`) puts the three together. The daemons keep their own
//! binaries: `tunnel-relay serve`, `worker-agent run`, `mesh up --wg-config`.

mod status;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tunnel_relay::cli::{self as relay_cli, StateDirArg};
use tunnel_relay::rt;
use worker_agent::cli::{JobsArgs, ReportArgs};
use worker_agent::pool_cli::{PoolArgs, UsageArgs};

#[derive(Parser)]
#[command(
    name = "weft",
    version,
    about = "Weft for engineers: reach GPU workers behind NAT through the relay or the mesh, and run jobs on them",
    after_help = "Start with `weft login --token TOKEN` (a token from your operator), then \
                  `weft ssh-config >> ~/.ssh/config` and `ssh WORKER`, or `weft up` to join the mesh.\n\
                  Identity: --state-dir / WEFT_STATE_DIR (default: $XDG_CONFIG_HOME/weft or ~/.config/weft).\n\
                  Logs: WEFT_LOG (or RUST_LOG), e.g. WEFT_LOG=debug."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Join the relay with a token and keep the identity (once per machine).
    Login(relay_cli::LoginArgs),
    /// Print ssh_config Host stanzas for every worker you may ssh to.
    SshConfig(relay_cli::SshConfigArgs),
    /// Splice stdin/stdout to a worker's service: ssh's ProxyCommand (`weft connect %h %p`).
    Connect(relay_cli::ConnectArgs),
    /// Forward 127.0.0.1:LOCALPORT to a worker's service, like `ssh -L` (LOCALPORT:NAME:SERVICE).
    Forward(relay_cli::ForwardArgs),
    /// Run this machine's mesh node in the foreground, joined through the relay (needs root).
    ///
    /// Like `mesh up --state-dir DIR --token TOKEN`, with the identity of `weft login` by
    /// default: the token is needed on the first join only. Stops on Ctrl-C, SIGTERM or
    /// `weft down`.
    Up(UpArgs),
    /// Stop the mesh node that `weft up` runs (SIGTERM to the pid it records).
    ///
    /// `weft up` (and `mesh up --state-dir`) records its pid next to its control socket
    /// (/var/run/wireguard/weft0.pid); `down` sends that process SIGTERM, which stops it as
    /// Ctrl-C would, and waits until it has exited.
    Down(mesh::cli::DownArgs),
    /// Show the relay link, the mesh peers and their paths, and the workers you may reach with their GPUs.
    Status(status::StatusArgs),
    /// Ping a mesh peer by name or overlay IP: which path answered (direct or relay) and how fast.
    Ping(mesh::cli::PingArgs),
    /// Submit, list, show, follow and cancel jobs: the pool places them (--gpu SPEC), or one worker runs them (--worker NAME).
    Jobs(JobsArgs),
    /// The pool: every worker with its GPUs (model, memory, health, free or the job holding it), and the queue with why jobs wait.
    Pool(PoolArgs),
    /// Usage records of finished pool jobs: engineer, worker, GPUs, times, GPU-seconds, outcome (--since, --json, --csv).
    Usage(UsageArgs),
    /// Ray clusters over the mesh: up (K workers as a gang, Ray on each), list, status, down, submit.
    Cluster(worker_agent::cluster_cli::ClusterArgs),
    /// Finished jobs on a worker with their GPU-seconds, and totals (--worker NAME).
    History(ReportArgs),
    /// Log in to the relay's web view: a one-time link (a minute) bound to this identity (--print: only print it).
    Web(relay_cli::WebArgs),
}

/// `weft up`: `mesh up`'s managed-mode flags, with the engineer's identity by default.
#[derive(clap::Args)]
struct UpArgs {
    /// Join token (`wft1_…`); first join only, not needed after `weft login` or an earlier `up`.
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    state: StateDirArg,
    /// Node name (default: the name this identity already has on the relay, else the host name).
    #[arg(long)]
    name: Option<String>,
    /// WireGuard UDP port (default: random).
    #[arg(long)]
    listen_port: Option<u16>,
    /// The TUN interface.
    #[arg(long, env = "WEFT_INTERFACE", default_value = mesh::cli::DEFAULT_INTERFACE)]
    interface: String,
    /// Directory of UAPI sockets, where `wg` looks for them (the control socket and pid file sit next to them).
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = mesh::cli::DEFAULT_UAPI_DIR)]
    uapi_dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let long_running = matches!(cli.cmd, Cmd::Up(_) | Cmd::Forward(_));
    rt::init_tracing(if long_running {
        rt::DEFAULT_LOG
    } else {
        "warn"
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {}", worker_agent::cli::chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` on a current-thread runtime (the client commands splice a few
/// streams, where one thread avoids cross-thread wake-ups on every chunk).
fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = runtime.block_on(f);
    // `connect` reads stdin on a blocking thread that cannot be cancelled:
    // leave without waiting for it.
    runtime.shutdown_background();
    r
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Login(a) => block_on(relay_cli::login(a)),
        Cmd::SshConfig(a) => block_on(relay_cli::ssh_config(a)),
        Cmd::Connect(a) => block_on(relay_cli::connect(a)),
        Cmd::Forward(a) => block_on(relay_cli::forward(a, rt::shutdown_signal())),
        Cmd::Up(a) => up(a),
        Cmd::Down(a) => {
            println!("{}", mesh::cli::down(&a)?);
            Ok(())
        }
        Cmd::Status(a) => block_on(status::run(a)),
        Cmd::Ping(a) => mesh::cli::ping(&a),
        Cmd::Jobs(a) => worker_agent::pool_cli::jobs_or_agent(a, true),
        Cmd::Pool(a) => worker_agent::pool_cli::pool(&a),
        Cmd::Usage(a) => worker_agent::pool_cli::usage(&a),
        Cmd::Cluster(a) => worker_agent::cluster_cli::cluster(&a),
        Cmd::History(a) => worker_agent::cli::history(&a),
        Cmd::Web(a) => block_on(relay_cli::web(a)),
    }
}

fn up(a: UpArgs) -> Result<()> {
    let token = a.token.as_deref().map(mesh::cli::parse_token).transpose()?;
    let state_dir = a.state.dir()?;
    let name = match a.name {
        Some(n) => Some(n),
        // An empty name keeps the one the relay has for this key.
        None if admitted_before(&state_dir, token.as_ref()) => Some(String::new()),
        None => None,
    };
    mesh::cli::up_managed(mesh::cli::ManagedUp {
        state_dir,
        token,
        name,
        listen_port: a.listen_port,
        interface: a.interface,
        uapi_dir: a.uapi_dir,
    })
}

/// Whether the identity in `state_dir` was admitted by the relay that
/// `token` names (or, without a token, by any): `relay.json` is written on
/// admission only, so the relay knows this key and its name.
fn admitted_before(state_dir: &std::path::Path, token: Option<&tunnel_relay::Token>) -> bool {
    let Ok(text) = std::fs::read_to_string(state_dir.join("relay.json")) else {
        return false;
    };
    let Ok(info) = serde_json::from_str::<tunnel_relay::client::RelayInfo>(&text) else {
        return false;
    };
    token.is_none_or(|t| t.relay_key.to_base64() == info.key)
}
