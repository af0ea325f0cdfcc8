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
    /// Identity directory (default: $XDG_CONFIG_HOME/weft or ~/.config/weft). Global: it
    /// may come before or after a subcommand (`weft cluster up X --state-dir D`).
    #[arg(long, env = "WEFT_STATE_DIR", global = true)]
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

/// `weft web`: a one-time link to the relay's web view.
#[derive(clap::Args, Debug)]
pub struct WebArgs {
    /// Only print the link (default: also open it in a browser when there is a display).
    #[arg(long)]
    pub print: bool,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// `weft web`: asks the relay for a one-time link (valid for a minute, bound to this
/// identity), prints it, and opens it with `xdg-open` when a display is there (not with
/// `--print`).
pub async fn web(a: WebArgs) -> Result<()> {
    let dir = a.state.dir()?;
    let session = client::session(&dir)
        .await
        .with_context(|| format!("relay session as the identity in {}", dir.display()))?;
    let (url, secs) = session.web_link().await.context("web login link")?;
    session.close().await;
    println!("{url}");
    eprintln!("(a one-time link, valid for {secs} s; it logs this identity in)");
    let display =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    if !a.print && display {
        match std::process::Command::new("xdg-open")
            .arg(&url)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
        {
            Ok(_) => eprintln!("opened in your browser"),
            Err(e) => eprintln!("could not open a browser ({e}); open the link yourself"),
        }
    }
    Ok(())
}

/// `ssh-config`: `Host` stanzas whose ProxyCommand is this executable's
/// `connect` (every binary that offers `ssh-config` offers `connect`).
pub async fn ssh_config(a: SshConfigArgs) -> Result<()> {
    let dir = a.state.dir()?;
    let exe = std::env::current_exe().context("locate this executable")?;
    print!("{}", client::ssh_config(&dir, &exe).await?);
    Ok(())
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
