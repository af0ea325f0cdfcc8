//! The engineer's relay commands, flags and all, shared by the `tunnel-relay`
//! binary (`login`, `connect`, `forward`, `ssh-config`) and `weft` (the same
//! words): each binary flattens these clap structs into its own subcommands
//! (with its own one-line help) and calls the function of the same name.
//! The work is done by [`crate::client`]; this is the shell that reads
//! flags and prints.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::client;
use crate::keys::StaticKey;
use crate::token::Token;

/// `--state-dir`: the engineer's identity directory.
#[derive(clap::Args, Debug, Clone)]
pub struct StateDirArg {
    /// Identity directory (default: $XDG_CONFIG_HOME/weft or ~/.config/weft).
    #[arg(long, env = "WEFT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

impl StateDirArg {
    /// The directory given, else [`client::default_state_dir`].
    pub fn dir(&self) -> Result<PathBuf> {
        match &self.state_dir {
            Some(d) => Ok(d.clone()),
            None => Ok(client::default_state_dir()?),
        }
    }
}

/// `login`: join the relay with a token and keep the identity.
#[derive(clap::Args, Debug, Clone)]
pub struct LoginArgs {
    /// Join token (`wft1_…`, from the operator's `tunnel-relay token create`).
    #[arg(long, env = "WEFT_RELAY_TOKEN", hide_env_values = true)]
    pub token: String,
    #[command(flatten)]
    pub state: StateDirArg,
    /// Name to register (default: $USER-<key prefix>).
    #[arg(long, env = "WEFT_NAME")]
    pub name: Option<String>,
}

/// `login`: prints the registered name and tags.
pub async fn login(a: LoginArgs) -> Result<()> {
    let dir = a.state.dir()?;
    let token = Token::parse(a.token.trim()).context("--token")?;
    let name = match a.name {
        Some(n) => n,
        None => default_login_name(&dir)?,
    };
    let (name, tags) = client::login(&dir, &token, &name).await?;
    println!(
        "logged in as {name} (tags: {}); identity in {}",
        tags.join(","),
        dir.display()
    );
    Ok(())
}

/// `$USER-<key prefix>`, the identity in `dir` created if needed.
fn default_login_name(dir: &Path) -> Result<String> {
    let key = StaticKey::load_or_create(&dir.join("identity.key"))?;
    let user = std::env::var("USER").unwrap_or_else(|_| "engineer".into());
    Ok(format!("{user}-{}", key.public().short()))
}

/// `connect HOST PORT`: ssh's ProxyCommand.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// Worker name (ssh's %h).
    pub host: String,
    /// Port (ssh's %p: 22 means the `ssh` service) or a service name.
    pub port: String,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// `connect`: splices stdin/stdout with the tunnel.
pub async fn connect(a: ConnectArgs) -> Result<()> {
    let dir = a.state.dir()?;
    let service = client::service_for_port(&a.port);
    client::connect_stdio(&dir, &a.host, &service).await?;
    Ok(())
}

/// `forward LOCALPORT:NAME:SERVICE`.
#[derive(clap::Args, Debug, Clone)]
pub struct ForwardArgs {
    /// LOCALPORT:NAME:SERVICE, e.g. 8888:gpu1:jupyter (listens on 127.0.0.1:LOCALPORT).
    pub spec: String,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// A parsed `LOCALPORT:NAME:SERVICE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardSpec {
    /// Where to listen: 127.0.0.1:LOCALPORT.
    pub listen: SocketAddr,
    /// The worker.
    pub name: String,
    /// Its service.
    pub service: String,
}

impl ForwardSpec {
    /// Parses `LOCALPORT:NAME:SERVICE`.
    pub fn parse(spec: &str) -> Result<ForwardSpec> {
        let mut parts = spec.splitn(3, ':');
        let (Some(port), Some(name), Some(service)) = (parts.next(), parts.next(), parts.next())
        else {
            bail!("forward {spec:?}: expected LOCALPORT:NAME:SERVICE, e.g. 2222:gpu1:ssh");
        };
        if name.is_empty() || service.is_empty() {
            bail!("forward {spec:?}: expected LOCALPORT:NAME:SERVICE, e.g. 2222:gpu1:ssh");
        }
        let port: u16 = port
            .parse()
            .with_context(|| format!("forward {spec:?}: {port:?} is not a port number"))?;
        Ok(ForwardSpec {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
            name: name.to_string(),
            service: service.to_string(),
        })
    }
}

/// `forward`: until `shutdown`.
pub async fn forward(a: ForwardArgs, shutdown: impl Future<Output = ()>) -> Result<()> {
    let spec = ForwardSpec::parse(&a.spec)?;
    let dir = a.state.dir()?;
    eprintln!(
        "forwarding {} to {}/{}",
        spec.listen, spec.name, spec.service
    );
    client::forward(&dir, spec.listen, &spec.name, &spec.service, shutdown).await?;
    Ok(())
}

/// `ssh-config`.
#[derive(clap::Args, Debug, Clone)]
pub struct SshConfigArgs {
    #[command(flatten)]
    pub state: StateDirArg,
}

/// `ssh-config`: `Host` stanzas whose ProxyCommand is this executable's
/// `connect` (every binary that offers `ssh-config` offers `connect`).
pub async fn ssh_config(a: SshConfigArgs) -> Result<()> {
    let dir = a.state.dir()?;
    let exe = std::env::current_exe().context("locate this executable")?;
    print!("{}", client::ssh_config(&dir, &exe).await?);
    Ok(())
}

/// The pool as a table: each worker with its state, uptime and every GPU (model, memory,
/// health, free or the job holding it), then the queue with where each job runs or why it
/// waits. `now_ms` is the current unix time in ms. Used by `tunnel-relay pool list` and
/// `weft pool`.
pub fn pool_table(v: &weft_proto::pool::PoolView, now_ms: u64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let ago = |ms: u64| weft_proto::duration::format(std::time::Duration::from_secs(ms / 1000));
    if v.workers.is_empty() {
        out.push_str("no workers have reported to the pool yet\n");
    }
    for w in &v.workers {
        let inv = &w.inventory;
        let up = match w.connected_since_ms {
            Some(s) => format!("up {}", ago(now_ms.saturating_sub(s))),
            None => format!("away {}", ago(now_ms.saturating_sub(w.last_seen_ms))),
        };
        let total = w.uptime_ms + w.connected_since_ms.map_or(0, |s| now_ms.saturating_sub(s));
        let known = now_ms.saturating_sub(w.first_seen_ms).max(1);
        let _ = writeln!(
            out,
            "{}  {}  {}  (connected {:.1}% since first seen)  {} CPUs  {} GiB  agent {}{}",
            w.name,
            w.state,
            up,
            100.0 * total as f64 / known as f64,
            inv.cpus,
            inv.memory_bytes >> 30,
            if inv.version.is_empty() {
                "?"
            } else {
                &inv.version
            },
            if inv.simulated {
                "  SIMULATED GPUs (stub NVML)"
            } else {
                ""
            }
        );
        if inv.gpus.is_empty() {
            out.push_str("    no GPUs\n");
        }
        for (i, g) in inv.gpus.iter().enumerate() {
            let holder = match w.holders.get(i).copied().flatten() {
                Some(j) => format!("job {j}"),
                None if g.job.is_some() => "busy (local job)".into(),
                None => "free".into(),
            };
            let flag = if w.flagged.contains(&g.uuid) {
                "  DUPLICATE UUID: not scheduled"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "    gpu{i}  {}  {} GB  {}  {}  {}{flag}",
                g.model,
                (g.memory_mib + 512) / 1024,
                g.health,
                holder,
                g.uuid
            );
        }
    }
    let _ = writeln!(out, "\nqueue (policy {}):", v.policy);
    if v.queue.is_empty() {
        out.push_str("    empty\n");
    }
    for j in &v.queue {
        let r = &j.request;
        let mut needs = match &r.gpu {
            Some(s) => s.clone(),
            None if r.gpus > 0 => format!("{} GPU", r.gpus),
            None => "no GPU".into(),
        };
        if r.nodes > 1 {
            let _ = write!(needs, " x{} nodes", r.nodes);
        }
        let place = if j.state == "pending" {
            j.reason.clone().unwrap_or_default()
        } else {
            j.members
                .iter()
                .map(|m| format!("{} ({})", m.worker, m.gpus.len()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "    job {}  {}  {}  needs {}  priority {}  {}",
            j.id, j.owner, j.state, needs, r.priority, place
        );
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn forward_specs() {
        let s = ForwardSpec::parse("2222:gpu1:ssh").unwrap();
        assert_eq!(s.listen, "127.0.0.1:2222".parse().unwrap());
        assert_eq!((s.name.as_str(), s.service.as_str()), ("gpu1", "ssh"));
        let e = ForwardSpec::parse("2222:gpu1").unwrap_err().to_string();
        assert!(e.contains("LOCALPORT:NAME:SERVICE"), "{e}");
        let e = ForwardSpec::parse("22x:gpu1:ssh").unwrap_err().to_string();
        assert!(e.contains("not a port number"), "{e}");
        assert!(ForwardSpec::parse("2222::ssh").is_err());
    }
}
