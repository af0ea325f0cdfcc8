//! Relays of a fleet (issue 14) in the lab: each `tunnel-relay serve` in its
//! own namespace on the lab internet, all on one PostgreSQL
//! ([`crate::postgres::LabPostgres`]), sharing the first relay's identity.

use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::managed::relay_bin;
use crate::{Internet, Netns, Proc};

/// A relay of a fleet in its own namespace on the lab internet, running
/// `tunnel-relay serve` against a shared PostgreSQL.
pub struct FleetRelay {
    pub ns: Netns,
    pub state: String,
    pub config: String,
    pub url: String,
    pub addr: String,
    pub proc: Proc,
}

impl FleetRelay {
    /// A relay named `name` at `ip` on `url`; `identity`: the fleet's key file to copy in.
    /// `extra`: more configuration lines (TOML, top-level keys or tables).
    pub fn start(
        net: &Internet,
        tag: &str,
        name: &str,
        ip: &str,
        url: &str,
        identity: Option<&str>,
        extra: &str,
    ) -> FleetRelay {
        FleetRelay::start_bin(net, tag, name, ip, url, identity, extra, &relay_bin())
    }

    /// [`FleetRelay::start`] with the relay binary `bin` serving (another
    /// version's: `crate::compat`); the operator commands stay this build's.
    #[allow(clippy::too_many_arguments)]
    pub fn start_bin(
        net: &Internet,
        tag: &str,
        name: &str,
        ip: &str,
        url: &str,
        identity: Option<&str>,
        extra: &str,
        bin: &str,
    ) -> FleetRelay {
        let ns = net.host(tag, ip);
        let state = ns.file("relay").display().to_string();
        let config = ns.file("relay.toml").display().to_string();
        std::fs::write(
            &config,
            format!("store = \"{url}\"\nname = \"{name}\"\n{extra}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        if let Some(id) = identity {
            ns.exec(&format!(
                "mkdir -p -m 700 {state} && cp {id} {state}/identity.key && chmod 600 {state}/identity.key"
            ));
        }
        let addr = format!("{ip}:4433");
        let proc = ns.spawn_listening(
            "relay",
            &format!(
                "env WEFT_LOG=info {bin} serve --listen {addr} --state-dir {state} --config {config}",
            ),
            'u',
            4433,
            Duration::from_secs(10),
        );
        FleetRelay {
            ns,
            state,
            config,
            url: url.to_string(),
            addr,
            proc,
        }
    }

    /// `tunnel-relay ARGS --state-dir S` in the relay's namespace, the store
    /// given as the operator would (`WEFT_RELAY_STORE`, so not in `ps`).
    pub fn cmd(&self, args: &str) -> std::process::Output {
        self.ns.output(&format!(
            "env WEFT_RELAY_STORE='{}' {} {args} --state-dir {}",
            self.url,
            relay_bin(),
            self.state,
        ))
    }

    /// Another relay of this one's fleet: same store, this relay's identity.
    pub fn join(&self, net: &Internet, tag: &str, name: &str, ip: &str, extra: &str) -> FleetRelay {
        self.join_bin(net, tag, name, ip, extra, &relay_bin())
    }

    /// [`FleetRelay::join`] with the relay binary `bin` serving.
    pub fn join_bin(
        &self,
        net: &Internet,
        tag: &str,
        name: &str,
        ip: &str,
        extra: &str,
        bin: &str,
    ) -> FleetRelay {
        let identity = format!("{}/identity.key", self.state);
        FleetRelay::start_bin(net, tag, name, ip, &self.url, Some(&identity), extra, bin)
    }

    /// Waits until `relays list` through this relay shows `n` relays up.
    pub fn wait_up(&self, n: usize, within: Duration) -> String {
        let t = Instant::now();
        loop {
            let out = String::from_utf8_lossy(&self.cmd("relays list").stdout).into_owned();
            if out.matches("up (beat").count() == n {
                return out;
            }
            assert!(t.elapsed() < within, "relays list: {out}");
            sleep(Duration::from_millis(200));
        }
    }

    /// Waits until a line of this relay's log satisfies `pred`; panics with
    /// `what` and the log's tail after `within`.
    pub fn wait_logged(&self, within: Duration, what: &str, pred: impl Fn(&str) -> bool) {
        let t = Instant::now();
        while !self.proc.log().lines().any(&pred) {
            assert!(t.elapsed() < within, "{what}:\n{}", self.proc.log_tail(20));
            sleep(Duration::from_millis(50));
        }
    }

    /// A one-use token with `tag`, created through this relay, naming `dial` as the relay.
    pub fn token(&self, tag: &str, dial: &str) -> String {
        self.token_with(tag, dial, Some(1))
    }

    /// A token with `tag` for `uses` nodes (`None`: any number), valid 10
    /// minutes, created through this relay, naming `dial` as the relay.
    pub fn token_with(&self, tag: &str, dial: &str, uses: Option<u32>) -> String {
        let uses = uses.map(|n| format!("--uses {n}")).unwrap_or_default();
        let out = self.ns.output(&format!(
            "{} token create --state-dir {} --config {} --tag {tag} {uses} --ttl 10m --relay-addr {dial}",
            relay_bin(),
            self.state,
            self.config
        ));
        let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            t.starts_with("wft1_"),
            "token through {}: {t} {}",
            self.addr,
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }
}

/// `weft login` in `ns` as engineer `name` with `token` (state in the
/// namespace's directory, `name`); panics with stderr on failure. Returns
/// the state directory.
pub fn login(ns: &Netns, token: &str, name: &str) -> String {
    let dir = ns.file(name).display().to_string();
    let out = ns.output(&format!(
        "{} login --token {token} --state-dir {dir} --name {name}",
        crate::bin("weft").display()
    ));
    assert!(
        out.status.success(),
        "{name} login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// `tunnel-relay expose` in `ns` as worker `name` with `token`, one service
/// (`NAME=HOST:PORT`), logging at info.
pub fn expose(ns: &Netns, token: &str, name: &str, service: &str) -> Proc {
    ns.spawn_named(
        "expose",
        &format!(
            "env WEFT_LOG=info {} expose --token {token} --state-dir {} --name {name} --service {service}",
            relay_bin(),
            ns.file("state").display()
        ),
    )
}
