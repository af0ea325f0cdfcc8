//! `tunnel-relay`: one binary for the operator (serve, token, nodes), the
//! provider (expose) and the engineer (login, connect, forward, ssh-config).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tunnel_relay::cli;
use tunnel_relay::client::{self, ExposeOptions};
use tunnel_relay::keys::StaticKey;
use tunnel_relay::pool_store::{Flags, PoolStore};
use tunnel_relay::registry::{unix_now, Registry, Store};
use tunnel_relay::rt::{self, shutdown_signal};
use tunnel_relay::server::files;
use tunnel_relay::{Relay, RelayConfig, ServeOptions, Token};
use weft_proto::pool::PoolView;

#[derive(Parser)]
#[command(
    name = "tunnel-relay",
    version,
    about = "Weft tunnel relay: QUIC reverse tunnels to workers behind NAT"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Operator: run the relay (QUIC over UDP, and TLS over TCP on the same port for networks that block UDP).
    Serve {
        /// UDP address to listen on (TCP too, unless the config says `tcp = false`).
        #[arg(long, env = "WEFT_RELAY_LISTEN")]
        listen: SocketAddr,
        /// Another TCP address for the TLS fallback (repeatable; added to `tcp_listen`), e.g. 0.0.0.0:443.
        #[arg(long = "tcp-listen", value_name = "ADDR")]
        tcp_listen: Vec<SocketAddr>,
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        /// Relay configuration (TOML); defaults apply without it.
        #[arg(long, env = "WEFT_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// Serve Prometheus metrics on this address (overrides metrics_listen).
        #[arg(long, env = "WEFT_RELAY_METRICS")]
        metrics: Option<SocketAddr>,
        /// Serve the web view (explorer and /api/v1) here, HTTPS (overrides web_listen), e.g. 0.0.0.0:8443.
        #[arg(long, env = "WEFT_RELAY_WEB", value_name = "ADDR")]
        web: Option<SocketAddr>,
    },
    /// Operator: join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Operator: registered nodes.
    Nodes {
        #[command(subcommand)]
        cmd: NodesCmd,
    },
    /// Operator: the fleet's relays (one PostgreSQL store).
    Relays {
        #[command(subcommand)]
        cmd: RelaysCmd,
    },
    /// Operator: the GPU pool (workers, their GPUs, the queue).
    Pool {
        #[command(subcommand)]
        cmd: PoolCmd,
    },
    /// Operator: the running relay's policies (`[policy]`, `[mesh.acl]` in its config file).
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Operator: print the key this relay countersigns usage records and exports with
    /// (`ed25519:…`), for `weft usage verify --trust KEY`; created if the relay never ran.
    UsageKey {
        #[command(flatten)]
        state: RelayState,
    },
    /// Provider: expose local services through the relay (keeps reconnecting).
    Expose {
        /// Join token (first run only; later runs use the identity in --state-dir).
        #[arg(long, env = "WEFT_RELAY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// State directory of this worker's identity.
        #[arg(long, env = "WEFT_STATE_DIR")]
        state_dir: PathBuf,
        /// Name engineers use to reach this worker.
        #[arg(long, env = "WEFT_NAME")]
        name: String,
        /// A service: NAME=HOST:PORT (repeatable), e.g. ssh=127.0.0.1:22.
        #[arg(long = "service", required = true)]
        services: Vec<String>,
    },
    /// Engineer: join the relay with a token and keep the identity (also `weft login`).
    Login(cli::LoginArgs),
    /// Engineer: splice stdin/stdout to a service (ssh ProxyCommand: `connect %h %p`).
    Connect(cli::ConnectArgs),
    /// Engineer: like `ssh -L`: LOCALPORT:NAME:SERVICE (listens on 127.0.0.1).
    Forward(cli::ForwardArgs),
    /// Engineer: print ssh_config Host stanzas for every reachable worker.
    SshConfig(cli::SshConfigArgs),
}

/// The relay's state directory, as every operator command names it.
#[derive(clap::Args)]
struct RelayState {
    /// State directory: identity.key (0600), cert.der/cert.key, registry.sqlite.
    #[arg(long = "state-dir", env = "WEFT_RELAY_STATE_DIR")]
    dir: PathBuf,
}

/// Where the registry lives, for `serve`, `token` and `nodes`.
#[derive(clap::Args)]
struct StoreArg {
    /// `sqlite` (registry.sqlite in the state directory; the default) or a
    /// postgres://USER@HOST/DB URL shared by a fleet of relays (overrides
    /// `store` in the config). The password may come from PGPASSWORD-style
    /// URL parameters; it is never printed.
    #[arg(long = "store", env = "WEFT_RELAY_STORE", hide_env_values = true)]
    url: Option<String>,
}

impl StoreArg {
    /// The registry: the given store, else `fallback` (the config's).
    fn open(&self, dir: &Path, fallback: &Store) -> Result<Registry> {
        let store = match &self.url {
            Some(u) => Store::parse(u).map_err(|e| anyhow::anyhow!("--store: {e}"))?,
            None => fallback.clone(),
        };
        Registry::open_store(dir, &store, "")
            .with_context(|| format!("open the registry ({})", store.describe()))
    }
}

/// `token list`, `nodes list`.
#[derive(clap::Args)]
struct ListArgs {
    #[command(flatten)]
    state: RelayState,
    #[command(flatten)]
    store: StoreArg,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a token; prints it once (the relay keeps only a hash).
    Create {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        /// Tag given to nodes that join with it (e.g. worker, engineer).
        #[arg(long)]
        tag: String,
        /// Lifetime, e.g. 30m, 24h, 7d (default: no expiry).
        #[arg(long, value_parser = weft_proto::duration::parse)]
        ttl: Option<Duration>,
        /// How many nodes may join with it (default: unlimited).
        #[arg(long)]
        uses: Option<u64>,
        /// Relay address(es) clients dial, host:port (default: config
        /// public_addrs, else the address serve bound).
        #[arg(long = "relay-addr")]
        relay_addrs: Vec<String>,
        /// Relay configuration (for public_addrs).
        #[arg(long, env = "WEFT_RELAY_CONFIG")]
        config: Option<PathBuf>,
        /// The provider account the nodes joining with it belong to (a node name): that
        /// account sees, renames and removes them in the web view, and their earnings.
        #[arg(long)]
        owner: Option<String>,
    },
    /// List tokens (never their secrets).
    List(ListArgs),
    /// Revoke a token by id (or unique id prefix).
    Revoke {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        id: String,
    },
}

#[derive(Subcommand)]
enum NodesCmd {
    /// List registered nodes.
    List(ListArgs),
    /// Revoke a node: refused from its next connection or tunnel on.
    Revoke {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// Approve a node waiting for it (a provider's new machine on a relay with
    /// `approve_devices`): admitted at its next try, within seconds.
    Approve {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
}

#[derive(Subcommand)]
enum RelaysCmd {
    /// Every relay of the fleet: region, addresses, nodes homed on it, health (its heartbeat).
    List(ListArgs),
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Read the running relay's configuration file again and apply its `[policy]` and
    /// `[mesh.acl]` now (as SIGHUP does): nodes whose peers change get a peer-map delta;
    /// open tunnels stay. A file with an error changes nothing.
    Reload {
        #[command(flatten)]
        state: RelayState,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Workers with every GPU (free, busy, health), and the queue with why each job waits.
    List(ListArgs),
    /// No new jobs on a worker; running ones finish.
    Drain {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// No new jobs on a worker (until uncordon).
    Cordon {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
    /// Take new jobs again (ends a cordon or a drain).
    Uncordon {
        #[command(flatten)]
        state: RelayState,
        #[command(flatten)]
        store: StoreArg,
        name: String,
    },
}

fn main() -> ExitCode {
    rt::init_tracing(rt::DEFAULT_LOG);
    let cli = Cli::parse();
    // The relay serves many connections on every core; a client role
    // (expose, connect, forward, ...) splices a few streams, where one
    // thread avoids cross-thread wake-ups on every chunk.
    let mut builder = if matches!(cli.cmd, Cmd::Serve { .. }) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    };
    // stdin is read on a blocking thread that cannot be cancelled: exit now.
    std::process::exit(code);
}

fn load_config(path: Option<&Path>) -> Result<RelayConfig> {
    Ok(match path {
        Some(p) => RelayConfig::load(p)?,
        None => RelayConfig::default(),
    })
}

fn fmt_time(t: Option<u64>) -> String {
    match t {
        None => "never".into(),
        Some(t) => {
            let now = unix_now();
            if t <= now {
                format!("expired {}s ago", now - t)
            } else {
                format!("in {}s", t - now)
            }
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Serve {
            listen,
            state: RelayState { dir: state_dir },
            store,
            config,
            metrics,
            tcp_listen,
            web,
        } => {
            let config_path = config;
            let mut config = load_config(config_path.as_deref())?;
            if let Some(u) = &store.url {
                config.store = Store::parse(u).map_err(|e| anyhow::anyhow!("--store: {e}"))?;
            }
            config.tcp_listen.extend(tcp_listen);
            if metrics.is_some() {
                config.metrics_listen = metrics;
            }
            if web.is_some() {
                config.web_listen = web;
            }
            let relay = Relay::bind(ServeOptions {
                listen,
                state_dir: state_dir.clone(),
                config,
                // Absolute: a reload reads the same file whatever the working directory.
                config_path: config_path.map(|p| std::fs::canonicalize(&p).unwrap_or(p)),
            })
            .with_context(|| format!("start relay in {}", state_dir.display()))?;
            let tcp: Vec<String> = relay.tcp_addrs().iter().map(|a| a.to_string()).collect();
            eprintln!(
                "relay {} listening on {}{}{}",
                relay.public_key().to_base64(),
                relay
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
                if tcp.is_empty() {
                    String::new()
                } else {
                    format!(" (TLS over TCP on {})", tcp.join(", "))
                },
                relay
                    .stun_addr()
                    .map(|a| format!(" (STUN on udp {a})"))
                    .unwrap_or_default()
            );
            relay.run(shutdown_signal()).await?;
        }
        Cmd::Token { cmd } => token_cmd(cmd)?,
        Cmd::Nodes { cmd } => nodes_cmd(cmd)?,
        Cmd::Relays {
            cmd: RelaysCmd::List(ListArgs { state, store, json }),
        } => {
            let reg = store.open(&state.dir, &Store::Sqlite)?;
            if !reg.is_shared() {
                bail!("relays list needs the fleet's store: --store postgres://... (or WEFT_RELAY_STORE); a relay on SQLite is a fleet of one");
            }
            let relays = reg.relays()?;
            let header = format!(
                "{:<16} {:<12} {:<40} {:<6} {:<6} HEALTH",
                "NAME", "REGION", "ADDRESSES", "NODES", "POOL"
            );
            print_list(json, &relays, &header, |r| {
                let age = r.beat_age_ms as f64 / 1000.0;
                let health = if r.beat_age_ms < tunnel_relay::pg::RELAY_DEAD_MS {
                    format!("up (beat {age:.1}s ago)")
                } else {
                    format!("DOWN (last beat {age:.0}s ago)")
                };
                format!(
                    "{:<16} {:<12} {:<40} {:<6} {:<6} {health}",
                    r.name,
                    r.region,
                    r.addrs.join(","),
                    r.nodes,
                    if r.schedules_pool { "leads" } else { "-" }
                )
            })?;
        }
        Cmd::Pool { cmd } => pool_cmd(cmd)?,
        Cmd::Policy {
            cmd: PolicyCmd::Reload { state },
        } => policy_reload(&state.dir)?,
        Cmd::UsageKey { state } => {
            let path = state.dir.join(tunnel_relay::keys::USAGE_KEY_FILE);
            println!("{}", tunnel_relay::keys::usage_key(&path)?.public());
        }
        Cmd::Expose {
            token,
            state_dir,
            name,
            services,
        } => {
            let mut svcs = Vec::new();
            for s in &services {
                let (n, a) = s.split_once('=').with_context(|| {
                    format!("--service {s:?}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22")
                })?;
                if n.is_empty() || a.is_empty() {
                    bail!("--service {s:?}: expected NAME=HOST:PORT, e.g. ssh=127.0.0.1:22");
                }
                svcs.push((n.to_string(), a.to_string()));
            }
            let mut opts = ExposeOptions::new(state_dir, name, svcs);
            opts.token = token
                .as_deref()
                .map(Token::parse)
                .transpose()
                .context("--token")?;
            client::expose(opts, shutdown_signal()).await?;
        }
        Cmd::Login(a) => cli::login(a).await?,
        Cmd::Connect(a) => cli::connect(a).await?,
        Cmd::Forward(a) => cli::forward(a, shutdown_signal()).await?,
        Cmd::SshConfig(a) => cli::ssh_config(a).await?,
    }
    Ok(())
}

fn token_cmd(cmd: TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create {
            state: RelayState { dir: state_dir },
            store,
            tag,
            ttl,
            uses,
            relay_addrs,
            config,
            owner,
        } => {
            if let Some(o) = owner.as_deref().filter(|o| !Registry::valid_name(o)) {
                bail!("--owner {o:?}: a node name (letters, digits, '.', '_', '-'; up to 64)");
            }
            if tag.is_empty() || tag.contains(',') {
                bail!("--tag {tag:?}: one non-empty tag without commas");
            }
            if weft_proto::acl::is_group_tag(&tag) {
                bail!(
                    "--tag {tag:?}: `{}…` tags are the pool's own (a running gang's members)",
                    weft_proto::acl::GROUP_TAG_PREFIX
                );
            }
            let config = load_config(config.as_deref())?;
            let key = StaticKey::load_or_create(&state_dir.join(files::IDENTITY))?;
            let mut addrs = relay_addrs;
            if addrs.is_empty() {
                addrs = config.public_addrs.clone();
            }
            if addrs.is_empty() {
                let p = state_dir.join(files::LISTEN_ADDR);
                if let Ok(a) = std::fs::read_to_string(&p) {
                    let a = a.trim().to_string();
                    if a.parse::<SocketAddr>()
                        .is_ok_and(|s| !s.ip().is_unspecified())
                    {
                        addrs.push(a);
                    }
                }
            }
            if addrs.is_empty() {
                bail!("no relay address for the token: pass --relay-addr HOST:PORT or set public_addrs in the config");
            }
            let mut reg = store.open(&state_dir, &config.store)?;
            let (secret, id) =
                reg.create_owned_token(&tag, ttl, uses, unix_now(), owner.as_deref())?;
            let token = Token {
                relay_addrs: addrs,
                relay_key: key.public(),
                secret,
            };
            eprintln!(
                "token {id} (tag {tag}, expires {}, uses {})",
                fmt_time(ttl.map(|t| unix_now() + t.as_secs())),
                uses.map(|u| u.to_string())
                    .unwrap_or_else(|| "unlimited".into())
            );
            println!("{}", token.encode());
        }
        TokenCmd::List(ListArgs { state, store, json }) => {
            let toks = store.open(&state.dir, &Store::Sqlite)?.list_tokens()?;
            let header = format!(
                "{:<14} {:<10} {:<22} {:<10} REVOKED",
                "ID", "TAG", "EXPIRES", "USES LEFT"
            );
            print_list(json, &toks, &header, |t| {
                format!(
                    "{:<14} {:<10} {:<22} {:<10} {}",
                    t.id,
                    t.tag,
                    fmt_time(t.expires_at),
                    t.uses_left
                        .map(|u| u.to_string())
                        .unwrap_or_else(|| "unlimited".into()),
                    t.revoked
                )
            })?;
        }
        TokenCmd::Revoke { state, store, id } => {
            let id = store.open(&state.dir, &Store::Sqlite)?.revoke_token(&id)?;
            println!("revoked token {id}");
        }
    }
    Ok(())
}

/// `list --json`: the items as pretty JSON; otherwise `header` and a `line` per item.
fn print_list<T: serde::Serialize>(
    json: bool,
    items: &[T],
    header: &str,
    line: impl Fn(&T) -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(items)?);
    } else {
        println!("{header}");
        for item in items {
            println!("{}", line(item));
        }
    }
    Ok(())
}

fn nodes_cmd(cmd: NodesCmd) -> Result<()> {
    match cmd {
        NodesCmd::List(ListArgs { state, store, json }) => {
            let nodes = store.open(&state.dir, &Store::Sqlite)?.list_nodes()?;
            // HOME: the relay of a fleet holding the node's mesh session.
            let header = format!(
                "{:<24} {:<16} {:<46} {:<16} {:<12} {:<8} HOME",
                "NAME", "TAGS", "KEY", "MESH IPV4", "LAST SEEN", "STATE"
            );
            print_list(json, &nodes, &header, |n| {
                let state = if n.revoked {
                    "revoked"
                } else if n.pending {
                    "pending"
                } else {
                    "active"
                };
                format!(
                    "{:<24} {:<16} {:<46} {:<16} {:<12} {:<8} {}",
                    n.name,
                    n.tags.join(","),
                    n.key,
                    n.mesh_ipv4
                        .map_or_else(|| "-".to_string(), |a| a.to_string()),
                    format!("{}s ago", unix_now().saturating_sub(n.last_seen)),
                    state,
                    n.home.as_deref().unwrap_or("-")
                )
            })?;
            let waiting = nodes.iter().filter(|n| n.pending && !n.revoked).count();
            if waiting > 0 && !json {
                println!(
                    "{waiting} node(s) wait for approval: `tunnel-relay nodes approve NAME` (or `nodes revoke NAME`)"
                );
            }
        }
        NodesCmd::Approve { state, store, name } => {
            if store
                .open(&state.dir, &Store::Sqlite)?
                .approve_node(&name)?
            {
                println!("approved node {name}: it is admitted at its next try (within seconds)");
            } else {
                println!("node {name} was not waiting for approval (already approved, or revoked): nothing changed");
            }
        }
        NodesCmd::Revoke { state, store, name } => {
            store.open(&state.dir, &Store::Sqlite)?.revoke_node(&name)?;
            println!("revoked node {name}: its connections close within a second, it leaves every mesh peer map, and it is refused from then on");
        }
    }
    Ok(())
}

/// `policy reload`: asks the running relay (its admin socket) to read its
/// configuration file again; prints what changed.
fn policy_reload(dir: &Path) -> Result<()> {
    let sock = dir.join(files::ADMIN_SOCKET);
    let s = std::os::unix::net::UnixStream::connect(&sock).with_context(|| {
        format!(
            "no relay running with state dir {} (its admin socket {} does not answer)",
            dir.display(),
            sock.display()
        )
    })?;
    let v: serde_json::Value = ask_admin(s, &sock, "reload")?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("policy not reloaded (the running policy stays): {e}");
    }
    let yes = |k: &str| v.get(k).and_then(|b| b.as_bool()).unwrap_or(false);
    println!(
        "reloaded {}: tunnel policy {}, mesh ACL {} ({} peer-map updates sent)",
        v["config"].as_str().unwrap_or("?"),
        if yes("tunnel_policy_changed") {
            "changed"
        } else {
            "unchanged"
        },
        if yes("mesh_acl_changed") {
            "changed"
        } else {
            "unchanged"
        },
        v["peer_map_updates"].as_u64().unwrap_or(0)
    );
    if yes("approve_devices_changed") {
        println!(
            "device approval is now {}",
            match v["approve_devices"].as_str() {
                Some("providers") => "on: providers' new machines wait for `nodes approve`",
                Some("all") => "on for every new node: each waits for `nodes approve`",
                _ => "off",
            }
        );
    }
    if let Some(r) = v["restart_needed_for"].as_array().filter(|r| !r.is_empty()) {
        let names: Vec<&str> = r.iter().filter_map(|x| x.as_str()).collect();
        println!(
            "also changed, applied only at a restart: {}",
            names.join(", ")
        );
    }
    Ok(())
}

/// One request line to the running relay's admin socket `sock` (connected as
/// `s`), one JSON line back.
fn ask_admin<T: serde::de::DeserializeOwned>(
    mut s: std::os::unix::net::UnixStream,
    sock: &Path,
    request: &str,
) -> Result<T> {
    use std::io::{BufRead, Write};
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("{request}\n").as_bytes())?;
    let mut line = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut line)
        .with_context(|| format!("read {}", sock.display()))?;
    serde_json::from_str(&line).with_context(|| format!("answer of {}", sock.display()))
}

/// The live view from the running relay's admin socket, else the last stored one.
fn pool_view(dir: &Path) -> Result<(PoolView, bool)> {
    let sock = dir.join(files::ADMIN_SOCKET);
    if let Ok(s) = std::os::unix::net::UnixStream::connect(&sock) {
        return Ok((ask_admin(s, &sock, "pool")?, true));
    }
    let view = PoolStore::open(dir)?.view("(relay not running)".into())?;
    Ok((view, false))
}

fn pool_cmd(cmd: PoolCmd) -> Result<()> {
    let (state, store, name, flags, what) = match cmd {
        PoolCmd::List(ListArgs { state, store, json }) => {
            if store.url.is_some() {
                bail!(
                    "pool list asks the running relay (its admin socket); --store does not apply"
                );
            }
            let (v, live) = pool_view(&state.dir)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                if !live {
                    eprintln!(
                        "the relay is not running here: the last stored state (no wait reasons)"
                    );
                }
                print!(
                    "{}",
                    tunnel_relay::pool_text::pool_text(&v, unix_now() * 1000)
                );
            }
            return Ok(());
        }
        PoolCmd::Drain { state, store, name } => (
            state,
            store,
            name,
            Flags {
                cordoned: false,
                draining: true,
            },
            "draining: no new jobs, running ones finish",
        ),
        PoolCmd::Cordon { state, store, name } => (
            state,
            store,
            name,
            Flags {
                cordoned: true,
                draining: false,
            },
            "cordoned: no new jobs",
        ),
        PoolCmd::Uncordon { state, store, name } => {
            (state, store, name, Flags::default(), "takes new jobs again")
        }
    };
    let store = match &store.url {
        Some(u) => Store::parse(u).map_err(|e| anyhow::anyhow!("--store: {e}"))?,
        None => Store::Sqlite,
    };
    let store = PoolStore::open_store(&state.dir, &store, "", 0)
        .with_context(|| format!("open the pool's store ({})", store.describe()))?;
    let known: Vec<String> = store.workers()?.into_iter().map(|w| w.name).collect();
    if !known.contains(&name) {
        bail!(
            "no worker {name:?} in the pool (workers that reported: {})",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
    }
    store.set_flags(&name, flags)?;
    println!("{name} {what} (a running relay applies it within a second)");
    Ok(())
}
