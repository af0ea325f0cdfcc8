//! `mesh`: the Weft mesh node command line.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

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
        #[arg(long, env = "WEFT_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
    },
    /// Show interfaces and peers (like `wg show`).
    Status {
        /// Interface to show (default: every interface with a UAPI socket).
        #[arg(long, env = "WEFT_INTERFACE")]
        interface: Option<String>,
        /// Print the documented JSON format instead of text.
        #[arg(long)]
        json: bool,
        /// Directory of UAPI sockets.
        #[arg(long, env = "WEFT_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
    },
    /// Ping a mesh peer with disco pings, like `tailscale ping`: says which
    /// path answered (direct ADDRESS or relay) and the round-trip time.
    /// Exits with status 1 when no ping was answered.
    Ping {
        /// The peer: its name (`gpu1`, `gpu1.weft.internal`) or overlay address.
        peer: String,
        /// How many pings to send.
        #[arg(long, short = 'c', default_value_t = 3)]
        count: u32,
        /// How long to wait for each pong (`500ms`, `2s`, `1m`).
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: std::time::Duration,
        /// The managed interface (default: the only one running).
        #[arg(long, env = "WEFT_INTERFACE")]
        interface: Option<String>,
        /// Directory of UAPI sockets (the control socket sits next to them).
        #[arg(long, env = "WEFT_UAPI_DIR", default_value = "/var/run/wireguard")]
        uapi_dir: PathBuf,
    },
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
    use std::io::IsTerminal;
    // netlink-packet-route warns about every newer-kernel attribute it does not know.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,netlink_packet_route=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
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
            let token = token
                .map(|t| weft_proto::token::Token::parse(t.trim()))
                .transpose()
                .context("--token")?;
            init_logging();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(mesh::managed::run(
                mesh::managed::JoinOptions {
                    state_dir,
                    token,
                    name,
                    up: UpOptions {
                        interface: interface.unwrap_or_else(|| "weft0".to_string()),
                        uapi_dir,
                    },
                    listen_port,
                },
                shutdown_signal(),
            ))
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
                shutdown_signal(),
            ))
        }
        Command::Status {
            interface,
            json,
            uapi_dir,
        } => status(interface, json, &uapi_dir),
        Command::Ping {
            peer,
            count,
            timeout,
            interface,
            uapi_dir,
        } => ping(&peer, count, timeout, interface, &uapi_dir),
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

fn status(interface: Option<String>, json: bool, uapi_dir: &std::path::Path) -> anyhow::Result<()> {
    let explicit = interface.is_some();
    let names = match interface {
        Some(i) => vec![i],
        None => {
            let mut v: Vec<String> = std::fs::read_dir(uapi_dir)
                .with_context(|| format!("listing {}", uapi_dir.display()))?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_suffix(".sock")
                        .map(str::to_string)
                })
                .collect();
            v.sort();
            v
        }
    };
    let now = SystemTime::now();
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    let mut shown = 0;
    for name in &names {
        let uapi = mesh::uapi::socket_path(uapi_dir, name);
        // A managed node answers on its control socket with the mesh's view;
        // a static one (or a control socket that does not answer) over UAPI.
        let managed = mesh::managed::control_socket::Client::connect(
            &mesh::managed::control_socket::socket_path(&uapi),
        )
        .and_then(|mut c| c.call(&mesh::managed::control_socket::Request::Status));
        match managed {
            Ok(mesh::managed::control_socket::Response::Status { mut status }) => {
                status.refresh_ages(now);
                if json {
                    all.push(serde_json::to_value(&*status)?);
                } else {
                    if shown > 0 {
                        writeln!(out)?;
                    }
                    shown += 1;
                    write!(out, "{}", mesh::status::render_managed_human(&status, now))?;
                }
                continue;
            }
            Ok(other) => {
                tracing::debug!(interface = %name, answer = ?other, "control socket gave no status")
            }
            Err(e) => tracing::debug!(interface = %name, error = %e, "no control socket"),
        }
        let info = match mesh::status::query(&uapi) {
            Ok(info) => info,
            // The error's text already carries its cause; no chain to print.
            Err(e) if explicit => anyhow::bail!("{e}"),
            Err(e) => {
                // A stale socket of a stopped node must not hide the others.
                tracing::debug!(interface = %name, error = %e, "skipping");
                continue;
            }
        };
        if json {
            all.push(mesh::status::render_json(name, &info, now));
        } else {
            if shown > 0 {
                writeln!(out)?;
            }
            shown += 1;
            write!(out, "{}", mesh::status::render_human(name, &info, now))?;
        }
    }
    if json {
        // One interface asked: its object; otherwise an array of them.
        let v = if all.len() == 1 {
            all.remove(0)
        } else {
            serde_json::Value::Array(all)
        };
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    }
    Ok(())
}

/// `mesh ping`: one control-socket request per ping; prints each answer.
fn ping(
    target: &str,
    count: u32,
    timeout: std::time::Duration,
    interface: Option<String>,
    uapi_dir: &std::path::Path,
) -> anyhow::Result<()> {
    use mesh::managed::control_socket::{Client, Request, Response};
    let interface = match interface {
        Some(i) => i,
        None => only_managed_interface(uapi_dir)?,
    };
    let socket =
        mesh::managed::control_socket::socket_path(&mesh::uapi::socket_path(uapi_dir, &interface));
    let mut client = Client::connect(&socket)?;
    let mut answered = 0;
    let mut out = std::io::stdout().lock();
    for i in 0..count.max(1) {
        if i > 0 {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        let req = Request::Ping {
            peer: target.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        };
        match client.call(&req)? {
            Response::Pong {
                peer,
                ipv4,
                via,
                rtt_ms,
            } => {
                answered += 1;
                let via = if via == "relay" {
                    "via relay".to_string()
                } else {
                    format!("via {via}")
                };
                writeln!(
                    out,
                    "pong from {peer} ({ipv4}) {via} in {}",
                    mesh::status::fmt_ms(rtt_ms)
                )?;
            }
            Response::Timeout {
                peer,
                ipv4,
                timeout_ms,
            } => writeln!(
                out,
                "timeout: no pong from {peer} ({ipv4}) within {}",
                mesh::status::fmt_ms(timeout_ms as f64)
            )?,
            Response::Error { message } => anyhow::bail!("{message}"),
            Response::Status { .. } => anyhow::bail!(
                "control socket {} answered a ping with a status",
                socket.display()
            ),
        }
        out.flush()?;
    }
    if answered == 0 {
        anyhow::bail!("no answer from {target} to {} ping(s)", count.max(1));
    }
    Ok(())
}

/// The one managed interface with a control socket in `uapi_dir`.
fn only_managed_interface(uapi_dir: &std::path::Path) -> anyhow::Result<String> {
    let mut found: Vec<String> = std::fs::read_dir(uapi_dir)
        .with_context(|| format!("listing {}", uapi_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".weft")
                .map(str::to_string)
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => anyhow::bail!(
            "no managed mesh node is running (no control socket *.weft in {}); start one with `mesh up --state-dir DIR`",
            uapi_dir.display()
        ),
        _ => anyhow::bail!(
            "several managed interfaces are running ({}); pick one with --interface",
            found.join(", ")
        ),
    }
}

/// Parses `250ms`, `2s`, `1.5s`, `1m`; a bare number is seconds.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; use e.g. 500ms, 2s or 1m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?}; use ms, s or m")),
    };
    std::time::Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} must be a positive duration"))
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

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers, run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("0s").unwrap_err().contains("positive"));
        assert!(parse_duration("2h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("fast")
            .unwrap_err()
            .contains("not a duration"));
    }
}
