//! Managed mesh nodes (`mesh up --token`) and the relay they join, in lab
//! namespaces: shared by the NAT grid, the managed-mesh, status and agent tests.

use std::path::PathBuf;
use std::process::Output;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::router::Internet;

/// The relay's address on the simulated internet.
pub const RELAY_IP: &str = "203.0.113.2";
/// Its QUIC listen address.
pub const RELAY_ADDR: &str = "203.0.113.2:4433";

/// The `mesh` binary.
pub fn mesh_bin() -> String {
    crate::bin("mesh").display().to_string()
}

/// The `tunnel-relay` binary.
pub fn relay_bin() -> String {
    crate::bin("tunnel-relay").display().to_string()
}

/// `tunnel-relay serve` (relay, coordinator, STUN) in its namespace.
pub struct LabRelay {
    pub ns: Netns,
    pub state: String,
    pub proc: Proc,
}

impl LabRelay {
    /// A host `{tag}-relay` at [`RELAY_IP`] running the relay.
    pub fn start(net: &Internet, tag: &str) -> LabRelay {
        LabRelay::start_with_config(net, tag, None)
    }

    /// [`LabRelay::start`] with a relay configuration file holding `toml`.
    pub fn start_with_config(net: &Internet, tag: &str, toml: Option<&str>) -> LabRelay {
        let ns = net.host(&format!("{tag}-relay"), RELAY_IP);
        let state = ns.file("relay").display().to_string();
        let config = toml.map(|t| {
            let path = ns.file("relay.toml");
            std::fs::write(&path, t).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            path.display().to_string()
        });
        let proc = LabRelay::spawn_with(&ns, &state, config.as_deref(), "info");
        LabRelay { ns, state, proc }
    }

    /// Starts `serve` on `state` (again, after a kill) and waits for its socket.
    pub fn spawn(ns: &Netns, state: &str) -> Proc {
        LabRelay::spawn_with(ns, state, None, "info")
    }

    /// [`LabRelay::spawn`] with the configuration file `config` (if any) and
    /// `WEFT_LOG=log`.
    pub fn spawn_with(ns: &Netns, state: &str, config: Option<&str>, log: &str) -> Proc {
        let config = config.map(|c| format!(" --config {c}")).unwrap_or_default();
        ns.spawn_listening(
            "relay",
            &format!(
                "env WEFT_LOG={log} {} serve --listen {RELAY_ADDR} --state-dir {state}{config}",
                relay_bin()
            ),
            'u',
            4433,
            Duration::from_secs(5),
        )
    }

    /// A one-use join token with `tag`, valid 10 minutes.
    pub fn token(&self, tag: &str) -> String {
        relay_token(&self.ns, &self.state, tag)
    }
}

/// A one-use join token with `tag`, valid 10 minutes, from the relay state in `state`.
pub fn relay_token(relay_ns: &Netns, state: &str, tag: &str) -> String {
    let t = relay_ns
        .exec(&format!(
            "{} token create --state-dir {state} --tag {tag} --uses 1 --ttl 10m --relay-addr {RELAY_ADDR}",
            relay_bin()
        ))
        .trim()
        .to_string();
    assert!(t.starts_with("wft1_"), "token: {t}");
    t
}

/// MagicDNS's address under the default pool.
pub const DEFAULT_DNS: &str = "100.64.0.1";

/// `/etc/netns/NS/resolv.conf` pointing at MagicDNS: `ip netns exec` bind-mounts
/// it over /etc/resolv.conf for processes in that namespace only. Removed on drop.
pub struct NetnsResolver(PathBuf);

impl NetnsResolver {
    /// The default pool's MagicDNS ([`DEFAULT_DNS`]).
    pub fn magic_dns(ns: &Netns) -> NetnsResolver {
        NetnsResolver::at(ns, DEFAULT_DNS)
    }

    /// A resolver at `server`.
    pub fn at(ns: &Netns, server: &str) -> NetnsResolver {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {server}\n"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        NetnsResolver(dir)
    }
}

impl Drop for NetnsResolver {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The overlay IPv4 of `ns` once its `weft0` is up (not MagicDNS's 100.64.0.1);
/// panics with `proc`'s log after 15 s.
pub fn wait_overlay_ip(ns: &Netns, proc: &Proc) -> String {
    wait_overlay_ip_beside(ns, proc, DEFAULT_DNS)
}

/// [`wait_overlay_ip`] for a pool whose MagicDNS address is `dns`.
pub fn wait_overlay_ip_beside(ns: &Netns, proc: &Proc, dns: &str) -> String {
    let t0 = Instant::now();
    loop {
        let out = ns.output("ip -4 -br addr show weft0");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(ip) = text
            .split_whitespace()
            .filter_map(|w| w.strip_suffix("/32"))
            .find(|ip| *ip != dns)
        {
            return ip.to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "[{}] never joined:\n{}",
            ns.name(),
            proc.log_tail(30)
        );
        sleep(Duration::from_millis(100));
    }
}

/// One `mesh up --token` node (interface `weft0`, UAPI and state in the namespace's dir).
pub struct ManagedNode {
    pub ns: Netns,
    pub proc: Proc,
    pub uapi: String,
    /// Its state dir (identity, relay).
    pub state: String,
    /// Its overlay IPv4 address.
    pub ip: String,
}

impl ManagedNode {
    /// Starts the node with `token` as `name` and waits until it has joined.
    pub fn start(ns: Netns, token: &str, name: &str) -> ManagedNode {
        ManagedNode::start_beside(ns, token, name, DEFAULT_DNS)
    }

    /// [`ManagedNode::start`] for a relay whose pool puts MagicDNS on `dns`.
    pub fn start_beside(ns: Netns, token: &str, name: &str, dns: &str) -> ManagedNode {
        ManagedNode::start_env(ns, token, name, dns, "")
    }

    /// [`ManagedNode::start`] with more environment (`VAR=value ...`) for `mesh up`.
    pub fn start_with_env(ns: Netns, token: &str, name: &str, env: &str) -> ManagedNode {
        ManagedNode::start_env(ns, token, name, DEFAULT_DNS, env)
    }

    fn start_env(ns: Netns, token: &str, name: &str, dns: &str, env: &str) -> ManagedNode {
        let uapi = ns.file("uapi").display().to_string();
        let state = ns.file("state").display().to_string();
        let proc = ns.spawn_named(
            "mesh",
            &format!(
                "env RUST_LOG=info,netlink_packet_route=error {env} {} up --state-dir {state} --token {token} --name {name} --uapi-dir {uapi}",
                mesh_bin()
            ),
        );
        let mut n = ManagedNode {
            ns,
            proc,
            uapi,
            state,
            ip: String::new(),
        };
        n.ip = wait_overlay_ip_beside(&n.ns, &n.proc, dns);
        n
    }

    /// The overlay IPv4 once `weft0` is up (not MagicDNS's 100.64.0.1).
    pub fn overlay_ip(&self) -> String {
        wait_overlay_ip(&self.ns, &self.proc)
    }

    /// Runs `mesh ARGS --uapi-dir U` in the node's namespace.
    pub fn mesh(&self, args: &str) -> Output {
        self.ns
            .output(&format!("{} {args} --uapi-dir {}", mesh_bin(), self.uapi))
    }

    /// `mesh status --json` (Null if it failed).
    pub fn status(&self) -> Value {
        let out = self.mesh("status --json --interface weft0");
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// Overlay /32s of every peer in this node's map, sorted.
    pub fn peer_ips(&self) -> Vec<String> {
        let mut v: Vec<String> = self.status()["peers"]
            .as_array()
            .map(|a| {
                a.iter()
                    .flat_map(|p| p["allowed_ips"].as_array().cloned().unwrap_or_default())
                    .filter_map(|ip| {
                        ip.as_str()
                            .and_then(|s| s.strip_suffix("/32"))
                            .map(str::to_string)
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// The endpoint shown for the peer owning overlay `peer_ip`: "relay", an address, or "".
    pub fn endpoint_of(&self, peer_ip: &str) -> String {
        let want = format!("{peer_ip}/32");
        self.status()["peers"]
            .as_array()
            .and_then(|a| {
                a.iter().find(|p| {
                    p["allowed_ips"]
                        .as_array()
                        .is_some_and(|ips| ips.iter().any(|i| i.as_str() == Some(&want)))
                })
            })
            .and_then(|p| p["endpoint"].as_str())
            .unwrap_or("")
            .to_string()
    }

    /// Waits until `f` holds, at most `within`; panics with the node's log otherwise.
    pub fn wait_until(&self, within: Duration, what: &str, f: impl Fn(&ManagedNode) -> bool) {
        let t0 = Instant::now();
        while !f(self) {
            assert!(
                t0.elapsed() < within,
                "[{}] {what} not within {within:?}:\n{}",
                self.ns.name(),
                self.proc.log_tail(20)
            );
            sleep(Duration::from_millis(100));
        }
    }
}
