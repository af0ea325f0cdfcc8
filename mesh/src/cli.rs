//! The mesh commands that the `mesh` binary and `weft` share: the managed
//! node in the foreground ([`up_managed`], `mesh up --state-dir` /
//! `weft up`), stopping it ([`down`], `weft down`), `status` and `ping`
//! over a running node's sockets. Flags that both binaries spell the same
//! way are clap structs here ([`StatusArgs`], [`PingArgs`], [`DownArgs`]).
//!
//! A managed node records its pid next to its control socket
//! (`/var/run/wireguard/weft0.pid`: pid and start time, so a stale file left
//! by a crash never names another process); [`down`] sends that process
//! SIGTERM, which it handles like Ctrl-C, and waits for it to exit.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use tunnel_relay::Token;

use crate::managed::control_socket as ctl;
use crate::node::UpOptions;
use crate::status::{self, ManagedStatus};

/// Where `wg` (and so every Weft command) looks for UAPI sockets.
pub const DEFAULT_UAPI_DIR: &str = "/var/run/wireguard";
/// The managed node's interface unless told otherwise.
pub const DEFAULT_INTERFACE: &str = "weft0";

/// `mesh status`.
#[derive(clap::Args, Debug, Clone)]
pub struct StatusArgs {
    /// Interface to show (default: every interface with a UAPI socket).
    #[arg(long, env = "WEFT_INTERFACE")]
    pub interface: Option<String>,
    /// Print the documented JSON format instead of text.
    #[arg(long)]
    pub json: bool,
    /// Directory of UAPI sockets.
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = DEFAULT_UAPI_DIR)]
    pub uapi_dir: PathBuf,
}

/// Which managed node: `--interface`, `--uapi-dir`.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeArgs {
    /// The managed interface (default: the only one running).
    #[arg(long, env = "WEFT_INTERFACE")]
    pub interface: Option<String>,
    /// Directory of UAPI sockets (the control socket sits next to them).
    #[arg(long, env = "WEFT_UAPI_DIR", default_value = DEFAULT_UAPI_DIR)]
    pub uapi_dir: PathBuf,
}

impl NodeArgs {
    /// The interface given, else [`only_managed_interface`].
    pub fn interface(&self) -> Result<String> {
        match &self.interface {
            Some(i) => Ok(i.clone()),
            None => only_managed_interface(&self.uapi_dir),
        }
    }
}

/// `ping`.
#[derive(clap::Args, Debug, Clone)]
pub struct PingArgs {
    /// The peer: its name (`gpu1`, `gpu1.weft.internal`) or overlay address.
    pub peer: String,
    /// How many pings to send.
    #[arg(long, short = 'c', default_value_t = 3)]
    pub count: u32,
    /// How long to wait for each pong (`500ms`, `2s`, `1m`).
    #[arg(long, default_value = "2s", value_parser = positive_duration)]
    pub timeout: Duration,
    #[command(flatten)]
    pub node: NodeArgs,
}

/// `down`.
#[derive(clap::Args, Debug, Clone)]
pub struct DownArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// How long to wait for the node to exit (`10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = weft_proto::duration::parse)]
    pub timeout: Duration,
}

/// [`weft_proto::duration::parse`], refusing zero.
pub fn positive_duration(s: &str) -> Result<Duration, String> {
    match weft_proto::duration::parse(s) {
        Ok(d) if d.is_zero() => Err(format!("{s:?} must be more than zero, e.g. 500ms or 2s")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

/// A join token from a flag.
pub fn parse_token(s: &str) -> Result<Token> {
    Token::parse(s.trim()).context("--token")
}

/// A managed node to run in the foreground.
#[derive(Debug, Clone)]
pub struct ManagedUp {
    /// Identity and relay state (created if missing).
    pub state_dir: PathBuf,
    /// Join token (first run only).
    pub token: Option<Token>,
    /// Node name (default: the host name).
    pub name: Option<String>,
    /// WireGuard UDP port (default: random).
    pub listen_port: Option<u16>,
    /// TUN interface.
    pub interface: String,
    /// Directory of the UAPI socket (and the control socket and pid file).
    pub uapi_dir: PathBuf,
}

/// Runs a managed node until SIGINT or SIGTERM (blocking: it owns its
/// runtime). Refuses to start where a node already runs on the interface.
pub fn up_managed(up: ManagedUp) -> Result<()> {
    let _pid = PidFile::create(&up.uapi_dir, &up.interface)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(crate::managed::run(
        crate::managed::JoinOptions {
            state_dir: up.state_dir,
            token: up.token,
            name: up.name,
            up: UpOptions {
                interface: up.interface,
                uapi_dir: up.uapi_dir,
            },
            listen_port: up.listen_port,
        },
        tunnel_relay::rt::shutdown_signal(),
    ))
}

/// The pid file of the managed node on `interface`.
pub fn pid_path(uapi_dir: &Path, interface: &str) -> PathBuf {
    crate::uapi::socket_path(uapi_dir, interface).with_extension("pid")
}

/// A process's start time (clock ticks after boot, field 22 of
/// `/proc/PID/stat`), `None` when there is no such process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // anything: state is field 3, start time field 22.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The live process a pid file names, if it still runs.
fn recorded_pid(path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    (process_start(pid) == Some(start)).then_some(pid)
}

/// This process's entry in a pid file; removed on drop if still ours.
struct PidFile {
    path: PathBuf,
    text: String,
}

impl PidFile {
    fn create(uapi_dir: &Path, interface: &str) -> Result<PidFile> {
        let path = pid_path(uapi_dir, interface);
        let me = std::process::id();
        if let Some(pid) = recorded_pid(&path).filter(|p| *p != me) {
            bail!(
                "a managed node already runs on {interface} (pid {pid}, see {}); stop it with `weft down --interface {interface}`",
                path.display()
            );
        }
        let start = process_start(me).context("reading /proc/self/stat")?;
        let text = format!("{me} {start}\n");
        std::fs::create_dir_all(uapi_dir)
            .and_then(|()| std::fs::write(&path, &text))
            .with_context(|| {
                format!(
                    "writing {} (a mesh node needs root or CAP_NET_ADMIN)",
                    path.display()
                )
            })?;
        Ok(PidFile { path, text })
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        if std::fs::read_to_string(&self.path).is_ok_and(|t| t == self.text) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// `down`: SIGTERM to the managed node that `weft up` / `mesh up
/// --state-dir` started on the interface, then waits for it to exit.
/// Returns what was done, for the user.
pub fn down(a: &DownArgs) -> Result<String> {
    let interface = a.node.interface()?;
    let path = pid_path(&a.node.uapi_dir, &interface);
    let Some(pid) = recorded_pid(&path) else {
        let control = ctl::socket_path(&crate::uapi::socket_path(&a.node.uapi_dir, &interface));
        if control.exists() {
            bail!(
                "the node on {interface} recorded no live pid in {}: it was not started by `weft up` or `mesh up --state-dir` (a worker agent runs its own node: stop the agent)",
                path.display()
            );
        }
        bail!(
            "no managed mesh node runs on {interface} (no {})",
            path.display()
        );
    };
    let pid_t = i32::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) takes no pointers; the pid was checked against its
    // start time just above, so it is the node's process.
    if unsafe { libc::kill(pid_t, libc::SIGTERM) } != 0 {
        let e = std::io::Error::last_os_error();
        bail!("cannot signal the node on {interface} (pid {pid}): {e} (run as its user or root)");
    }
    let t0 = Instant::now();
    while process_start(pid).is_some() {
        if t0.elapsed() > a.timeout {
            bail!(
                "the node on {interface} (pid {pid}) was sent SIGTERM but still runs after {}",
                weft_proto::duration::format(a.timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(format!("stopped the mesh node on {interface} (pid {pid})"))
}

/// Names of the interfaces in `uapi_dir` whose files end in `suffix`, sorted.
fn interfaces_with(uapi_dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut v: Vec<String> = std::fs::read_dir(uapi_dir)
        .with_context(|| format!("listing {}", uapi_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(suffix)
                .map(str::to_string)
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Interfaces with a control socket (managed nodes) in `uapi_dir`; none
/// when the directory does not exist.
pub fn managed_interfaces(uapi_dir: &Path) -> Result<Vec<String>> {
    if !uapi_dir.exists() {
        return Ok(Vec::new());
    }
    interfaces_with(uapi_dir, ".weft")
}

/// The one managed interface with a control socket in `uapi_dir`.
pub fn only_managed_interface(uapi_dir: &Path) -> Result<String> {
    let mut found = managed_interfaces(uapi_dir)?;
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => bail!(
            "no managed mesh node is running (no control socket *.weft in {}); start one with `weft up` (or `mesh up --state-dir DIR`)",
            uapi_dir.display()
        ),
        _ => bail!(
            "several managed interfaces are running ({}); pick one with --interface",
            found.join(", ")
        ),
    }
}

/// A managed node's status from its control socket, ages as of `now`.
pub fn managed_status(uapi_dir: &Path, interface: &str, now: SystemTime) -> Result<ManagedStatus> {
    let uapi = crate::uapi::socket_path(uapi_dir, interface);
    let socket = ctl::socket_path(&uapi);
    match ctl::Client::connect(&socket).and_then(|mut c| c.call(&ctl::Request::Status))? {
        ctl::Response::Status { mut status } => {
            status.refresh_ages(now);
            Ok(*status)
        }
        other => bail!(
            "control socket {} answered a status request with {other:?}",
            socket.display()
        ),
    }
}

/// `mesh status`: every interface (or the one asked), managed ones from
/// their control socket, static ones over UAPI.
pub fn status(a: &StatusArgs) -> Result<()> {
    let explicit = a.interface.is_some();
    let names = match &a.interface {
        Some(i) => vec![i.clone()],
        None => interfaces_with(&a.uapi_dir, ".sock")?,
    };
    let now = SystemTime::now();
    let mut out = std::io::stdout().lock();
    let mut all = Vec::new();
    let mut shown = 0;
    for name in &names {
        // A managed node answers on its control socket with the mesh's view;
        // a static one (or a control socket that does not answer) over UAPI.
        match managed_status(&a.uapi_dir, name, now) {
            Ok(status) => {
                if a.json {
                    all.push(serde_json::to_value(&status)?);
                } else {
                    if shown > 0 {
                        writeln!(out)?;
                    }
                    shown += 1;
                    write!(out, "{}", status::render_managed_human(&status, now))?;
                }
                continue;
            }
            Err(e) => tracing::debug!(interface = %name, error = %e, "no managed status"),
        }
        let uapi = crate::uapi::socket_path(&a.uapi_dir, name);
        let info = match status::query(&uapi) {
            Ok(info) => info,
            // The error's text already carries its cause; no chain to print.
            Err(e) if explicit => bail!("{e}"),
            Err(e) => {
                // A stale socket of a stopped node must not hide the others.
                tracing::debug!(interface = %name, error = %e, "skipping");
                continue;
            }
        };
        if a.json {
            all.push(status::render_json(name, &info, now));
        } else {
            if shown > 0 {
                writeln!(out)?;
            }
            shown += 1;
            write!(out, "{}", status::render_human(name, &info, now))?;
        }
    }
    if a.json {
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

/// `ping`: one control-socket request per ping; prints each answer. Fails
/// when no ping was answered.
pub fn ping(a: &PingArgs) -> Result<()> {
    use ctl::{Client, Request, Response};
    let interface = a.node.interface()?;
    let socket = ctl::socket_path(&crate::uapi::socket_path(&a.node.uapi_dir, &interface));
    let mut client = Client::connect(&socket)?;
    let mut answered = 0;
    let mut out = std::io::stdout().lock();
    let count = a.count.max(1);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(500));
        }
        let req = Request::Ping {
            peer: a.peer.clone(),
            timeout_ms: u64::try_from(a.timeout.as_millis()).unwrap_or(u64::MAX),
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
                    status::fmt_ms(rtt_ms)
                )?;
            }
            Response::Timeout {
                peer,
                ipv4,
                timeout_ms,
            } => writeln!(
                out,
                "timeout: no pong from {peer} ({ipv4}) within {}",
                status::fmt_ms(timeout_ms as f64)
            )?,
            Response::Error { message } => bail!("{message}"),
            Response::Status { .. } => bail!(
                "control socket {} answered a ping with a status",
                socket.display()
            ),
        }
        out.flush()?;
    }
    if answered == 0 {
        bail!("no answer from {} to {count} ping(s)", a.peer);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A fresh directory under the system temp dir (mesh has no tempfile).
    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weft-mesh-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn positive_durations() {
        assert_eq!(positive_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(positive_duration("2"), Ok(Duration::from_secs(2)));
        assert!(positive_duration("0s")
            .unwrap_err()
            .contains("more than zero"));
        assert!(positive_duration("2x").unwrap_err().contains("e.g."));
    }

    #[test]
    fn pid_files_name_only_live_processes() {
        let dir = tmp("pid");
        let p = pid_path(&dir, "weft9");
        assert_eq!(p, dir.join("weft9.pid"));
        let me = std::process::id();
        let start = process_start(me).unwrap();
        std::fs::write(&p, format!("{me} {start}\n")).unwrap();
        assert_eq!(recorded_pid(&p), Some(me));
        // The same pid with another start time: a recycled pid, not ours.
        std::fs::write(&p, format!("{me} {}\n", start + 1)).unwrap();
        assert_eq!(recorded_pid(&p), None);
        std::fs::write(&p, "garbage").unwrap();
        assert_eq!(recorded_pid(&p), None);
        {
            let _f = PidFile::create(&dir, "weft9").unwrap();
            assert_eq!(recorded_pid(&p), Some(me));
        }
        assert!(!p.exists(), "the pid file goes with its node");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_node_no_interface() {
        let dir = tmp("none");
        assert!(managed_interfaces(&dir.join("missing")).unwrap().is_empty());
        let e = only_managed_interface(&dir).unwrap_err().to_string();
        assert!(e.contains("weft up"), "{e}");
        std::fs::write(dir.join("weft0.weft"), "").unwrap();
        assert_eq!(only_managed_interface(&dir).unwrap(), "weft0");
        let e = down(&DownArgs {
            node: NodeArgs {
                interface: None,
                uapi_dir: dir.clone(),
            },
            timeout: Duration::from_secs(1),
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("not started by `weft up`"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
