//! Relays of a fleet (issue 14) in the lab: each `tunnel-relay serve` in its
//! own namespace on the lab internet, all on one PostgreSQL
//! ([`crate::postgres::LabPostgres`]), sharing the first relay's identity.

use std::time::Duration;

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
                "env WEFT_LOG=info {} serve --listen {addr} --state-dir {state} --config {config}",
                relay_bin()
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

    /// A one-use token with `tag`, created through this relay, naming `dial` as the relay.
    pub fn token(&self, tag: &str, dial: &str) -> String {
        let out = self.ns.output(&format!(
            "{} token create --state-dir {} --config {} --tag {tag} --uses 1 --ttl 10m --relay-addr {dial}",
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
