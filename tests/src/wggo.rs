//! The reference peer: `wireguard-go -f IFNAME` configured with `wg set`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::netns::Netns;
use crate::proc::Proc;
use crate::wgconf::Interface;
use crate::{uapi_socket, unique_ifname};

/// `wg ARGS` inside `ns` (talks to the UAPI socket in /var/run/wireguard); panics on failure.
pub fn wg(ns: &Netns, args: &str) -> String {
    ns.exec(&format!("wg {args}"))
}

/// A running `wireguard-go` in the foreground, configured from an [`Interface`]
/// the way wg-quick would (keys, port, peers, addresses, MTU, routes for AllowedIPs).
pub struct WgGo {
    // Dropped first: SIGTERM lets wireguard-go remove its UAPI socket before the
    // namespace (maybe held only here) goes and SIGKILLs what is left.
    proc: Proc,
    ns: Netns,
    ifname: String,
    pub iface: Interface,
}

impl WgGo {
    /// Starts and configures it on a fresh unique interface name.
    pub fn start(ns: &Netns, iface: &Interface) -> WgGo {
        Self::start_with_log_level(ns, iface, "error")
    }

    /// As `start`, with wireguard-go's `LOG_LEVEL` (`error`, `verbose`/`debug`).
    pub fn start_with_log_level(ns: &Netns, iface: &Interface, level: &str) -> WgGo {
        let ifname = unique_ifname();
        let log = ns.file(&format!("wggo-{ifname}.log"));
        let mut cmd = ns.command("wireguard-go");
        cmd.args(["-f", &ifname]).env("LOG_LEVEL", level);
        let mut proc = ns.spawn_command(&format!("wireguard-go {ifname}"), cmd, &log);
        // It creates the interface and socket asynchronously.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(uapi_socket(&ifname).exists() && ns.has_link(&ifname)) {
            if let Some(st) = proc.try_wait() {
                panic!(
                    "wireguard-go {ifname} exited ({st}):\n{}",
                    proc.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "wireguard-go {ifname} did not come up in 10 s:\n{}",
                proc.log_tail(40)
            );
            sleep(Duration::from_millis(25));
        }
        let w = WgGo {
            ns: ns.clone(),
            ifname,
            proc,
            iface: iface.clone(),
        };
        w.configure();
        w
    }

    fn configure(&self) {
        let key = self.ns.file(&format!("{}.key", self.ifname));
        std::fs::write(&key, format!("{}\n", self.iface.keys.private)).expect("write key file");
        let mut set = format!("set {} private-key {}", self.ifname, key.display());
        if let Some(p) = self.iface.listen_port {
            set += &format!(" listen-port {p}");
        }
        for (i, p) in self.iface.peers.iter().enumerate() {
            set += &format!(" peer {}", p.public_key);
            if let Some(psk) = &p.preshared_key {
                let f = self.ns.file(&format!("{}.psk{i}", self.ifname));
                std::fs::write(&f, format!("{psk}\n")).expect("write psk file");
                set += &format!(" preshared-key {}", f.display());
            }
            if !p.allowed_ips.is_empty() {
                set += &format!(" allowed-ips {}", p.allowed_ips.join(","));
            }
            if let Some(e) = &p.endpoint {
                set += &format!(" endpoint {e}");
            }
            if let Some(k) = p.persistent_keepalive {
                set += &format!(" persistent-keepalive {k}");
            }
        }
        wg(&self.ns, &set);
        for a in &self.iface.addresses {
            self.ns.add_addr(&self.ifname, a);
        }
        if let Some(m) = self.iface.mtu {
            self.ns
                .exec(&format!("ip link set dev {} mtu {m}", self.ifname));
        }
        self.ns.link_up(&self.ifname);
        for p in &self.iface.peers {
            for ip in &p.allowed_ips {
                self.add_route(ip);
            }
        }
    }

    /// `ip route replace CIDR dev IF` (what wg-quick does for AllowedIPs).
    pub fn add_route(&self, cidr: &str) {
        let fam = if cidr.contains(':') { "-6" } else { "-4" };
        self.ns.exec(&format!(
            "ip {fam} route replace {cidr} dev {}",
            self.ifname
        ));
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    pub fn public_key(&self) -> &str {
        &self.iface.keys.public
    }

    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// `wg ARGS` inside its namespace.
    pub fn wg(&self, args: &str) -> String {
        wg(&self.ns, args)
    }

    /// `wg show IF latest-handshakes`: (peer public key, unix seconds; 0 = never).
    pub fn latest_handshakes(&self) -> Vec<(String, u64)> {
        self.wg(&format!("show {} latest-handshakes", self.ifname))
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// `wg show IF transfer`: (peer public key, rx bytes, tx bytes).
    pub fn transfer(&self) -> Vec<(String, u64, u64)> {
        self.wg(&format!("show {} transfer", self.ifname))
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((
                    it.next()?.to_string(),
                    it.next()?.parse().ok()?,
                    it.next()?.parse().ok()?,
                ))
            })
            .collect()
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        self.proc.kill_term();
    }
}
