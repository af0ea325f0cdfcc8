//! `mesh`: the Weft mesh node command line.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh::key::PrivateKey;
use mesh::node::{self, UpOptions};

/// Weft mesh node: userspace WireGuard over TUN.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node in the foreground: from a wg-quick config file
    /// (`--wg-config`), or joined to the mesh through a relay (`--state-dir`,
    /// with `--token` on the first run).
    #[command(
        after_help = "Data-path tuning (environment): WEFT_MESH_LINGER_US (how long a thread \
polls for the answer after its work, default 400, 0 = off); WEFT_MESH_BUSY_POLL_MS (keep a thread \
polling without sleeping while packets came in the last N ms: lower latency for a CPU per node \
while traffic flows; default 0 = off). Logs: WEFT_LOG (or RUST_LOG)."
    )]
    Up {
        /// wg-quick format config ([Interface] and [Peer] sections).
        #[arg(long, env = "WEFT_WG_CONFIG", conflicts_with_all = ["token", "state_dir", "name"])]
        wg_config: Option<PathBuf>,
        /// Managed mode: the node's identity and relay state (created if missing).
        #[arg(long, env = "WEFT_STATE_DIR")]
        state_dir: Option<PathBuf>,
        /// Managed mode: join token from `tunnel-relay token create` (first run only).
        #[arg(long, env = "WEFT_TOKEN", requires = "state_dir")]
        token: Option<String>,
        /// Managed mode: node name (default: the host name).
        #[arg(long, requires = "state_dir")]
        name: Option<String>,
        /// Managed mode: WireGuard UDP port (default: random).
        #[arg(long, requires = "state_dir")]
        listen_port: Option<u16>,
        /// Interface name (default: the config file's stem, as wg-quick does;
        /// `weft0` in managed mode).
        #[arg(long, env = "WEFT_INTERFACE")]
        interface: Option<String>,
        /// Directory of UAPI sockets, where `wg` looks for them.
        #[arg(long, env = "WEFT_UAPI_DIR", default_value = mesh::cli::DEFAULT_UAPI_DIR)]
        uapi_dir: PathBuf,
    },
    /// Show interfaces and peers (like `wg show`).
    Status(mesh::cli::StatusArgs),
    /// Ping a mesh peer with disco pings, like `tailscale ping`: says which
    /// path answered (direct ADDRESS or relay) and the round-trip time.
    /// Exits with status 1 when no ping was answered.
    Ping(mesh::cli::PingArgs),
    /// Print a new private key (base64), like `wg genkey`.
    Genkey,
    /// Read a private key on stdin, print its public key, like `wg pubkey`.
    Pubkey,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging() {
    tunnel_relay::rt::init_tracing(tunnel_relay::rt::DEFAULT_LOG);
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            wg_config: None,
            state_dir: Some(state_dir),
            token,
            name,
            listen_port,
            interface,
            uapi_dir,
        } => {
            let token = token.as_deref().map(mesh::cli::parse_token).transpose()?;
            init_logging();
            mesh::cli::up_managed(mesh::cli::ManagedUp {
                state_dir,
                token,
                name,
                listen_port,
                interface: interface.unwrap_or_else(|| mesh::cli::DEFAULT_INTERFACE.to_string()),
                uapi_dir,
            })
        }
        Command::Up {
            wg_config: None, ..
        } => anyhow::bail!("mesh up needs --wg-config FILE, or --state-dir DIR (with --token TOKEN on the first run)"),
        Command::Up {
            wg_config: Some(wg_config),
            interface,
            uapi_dir,
            ..
        } => {
            let config = mesh::config::load(&wg_config)?;
            let interface = match interface {
                Some(i) => i,
                None => wg_config
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .map(str::to_string)
                    .context("cannot derive an interface name from the config file name; pass --interface")?,
            };
            init_logging();
            warn_if_readable_by_others(&wg_config);
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(node::run(
                config,
                UpOptions {
                    interface,
                    uapi_dir,
                },
                tunnel_relay::rt::shutdown_signal(),
            ))
        }
        Command::Status(a) => mesh::cli::status(&a),
        Command::Ping(a) => mesh::cli::ping(&a),
        Command::Genkey => {
            println!("{}", PrivateKey::generate().to_base64());
            Ok(())
        }
        Command::Pubkey => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin")?;
            let key = PrivateKey::from_base64(s.trim()).context("stdin is not a private key")?;
            println!("{}", key.public_key().to_base64());
            Ok(())
        }
    }
}

/// The config holds the private key: say so when others can read it, as
/// wg-quick does (not an error: the operator may have reasons).
fn warn_if_readable_by_others(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %path.display(),
                mode = format!("{:o}", mode & 0o777),
                "config file holding the private key is accessible to other users; chmod 600 it"
            );
        }
    }
}
