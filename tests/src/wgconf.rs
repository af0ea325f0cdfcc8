//! Keys and wg-quick configurations for lab nodes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

/// A Curve25519 key pair in WireGuard's base64 form, made by `wg genkey`/`wg pubkey`.
#[derive(Clone, Debug)]
pub struct Keypair {
    pub private: String,
    pub public: String,
}

impl Keypair {
    /// A fresh random key pair.
    pub fn generate() -> Keypair {
        let private = wg_stdout(&["genkey"], None);
        let public = wg_stdout(&["pubkey"], Some(&private));
        Keypair { private, public }
    }
}

/// A fresh preshared key (`wg genpsk`).
pub fn genpsk() -> String {
    wg_stdout(&["genpsk"], None)
}

fn wg_stdout(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("wg")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run wg {args:?}: {e}"));
    if let Some(input) = stdin {
        let mut si = child.stdin.take().expect("wg stdin");
        writeln!(si, "{input}").expect("write wg stdin");
    }
    let out = child.wait_with_output().expect("wait wg");
    assert!(out.status.success(), "wg {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// One `[Peer]` section.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub public_key: String,
    pub preshared_key: Option<String>,
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    pub persistent_keepalive: Option<u16>,
}

/// One node's `[Interface]` plus its peers.
#[derive(Clone, Debug)]
pub struct Interface {
    pub keys: Keypair,
    /// CIDRs, e.g. `100.64.0.1/32`, `fd00:77::1/128`.
    pub addresses: Vec<String>,
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    pub peers: Vec<Peer>,
}

impl Interface {
    /// A fresh key pair, the given addresses and listen port, no peers.
    pub fn new(addresses: &[&str], listen_port: u16) -> Interface {
        Interface {
            keys: Keypair::generate(),
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            listen_port: Some(listen_port),
            mtu: None,
            peers: Vec::new(),
        }
    }

    /// This interface's addresses with host prefixes (`/32`, `/128`): what a peer puts in AllowedIPs.
    pub fn host_ips(&self) -> Vec<String> {
        self.addresses
            .iter()
            .map(|a| {
                let ip = a.split('/').next().unwrap_or(a);
                if ip.contains(':') {
                    format!("{ip}/128")
                } else {
                    format!("{ip}/32")
                }
            })
            .collect()
    }

    /// The first address of a family, without prefix length.
    pub fn ip(&self, v6: bool) -> String {
        self.addresses
            .iter()
            .map(|a| a.split('/').next().unwrap_or(a))
            .find(|ip| ip.contains(':') == v6)
            .unwrap_or_else(|| panic!("interface has no {} address", if v6 { "v6" } else { "v4" }))
            .to_string()
    }

    /// A `[Peer]` entry describing this node, reachable at `endpoint` (`None`: unknown).
    pub fn as_peer(&self, endpoint: Option<&str>) -> Peer {
        Peer {
            public_key: self.keys.public.clone(),
            preshared_key: None,
            allowed_ips: self.host_ips(),
            endpoint: endpoint.map(str::to_string),
            persistent_keepalive: None,
        }
    }

    /// The wg-quick file text.
    pub fn to_wg_quick(&self) -> String {
        let mut s = String::from("[Interface]\n");
        let _ = writeln!(s, "PrivateKey = {}", self.keys.private);
        if !self.addresses.is_empty() {
            let _ = writeln!(s, "Address = {}", self.addresses.join(", "));
        }
        if let Some(p) = self.listen_port {
            let _ = writeln!(s, "ListenPort = {p}");
        }
        if let Some(m) = self.mtu {
            let _ = writeln!(s, "MTU = {m}");
        }
        for p in &self.peers {
            s.push_str("\n[Peer]\n");
            let _ = writeln!(s, "PublicKey = {}", p.public_key);
            if let Some(k) = &p.preshared_key {
                let _ = writeln!(s, "PresharedKey = {k}");
            }
            if !p.allowed_ips.is_empty() {
                let _ = writeln!(s, "AllowedIPs = {}", p.allowed_ips.join(", "));
            }
            if let Some(e) = &p.endpoint {
                let _ = writeln!(s, "Endpoint = {e}");
            }
            if let Some(k) = p.persistent_keepalive {
                let _ = writeln!(s, "PersistentKeepalive = {k}");
            }
        }
        s
    }
}

/// Overlay IPv4 address of node `n` (1-based): `100.64.0.n`.
pub fn overlay_v4(n: u8) -> String {
    format!("100.64.0.{n}")
}

/// Overlay IPv6 address of node `n`: `fd77:7765:6674::n` (a ULA /48 for the lab).
pub fn overlay_v6(n: u8) -> String {
    format!("fd77:7765:6674::{n:x}")
}

/// An interface for overlay node `n` with host addresses (`/32`, `/128`) on both
/// families, listening on `port`.
pub fn overlay_node(n: u8, port: u16) -> Interface {
    Interface::new(
        &[
            &format!("{}/32", overlay_v4(n)),
            &format!("{}/128", overlay_v6(n)),
        ],
        port,
    )
}

/// Makes every interface a peer of every other: `endpoints[i]` is where node i listens.
pub fn connect_full_mesh(ifaces: &mut [Interface], endpoints: &[String]) {
    assert_eq!(ifaces.len(), endpoints.len(), "one endpoint per interface");
    let snapshot: Vec<Interface> = ifaces.to_vec();
    for (i, iface) in ifaces.iter_mut().enumerate() {
        for (j, other) in snapshot.iter().enumerate() {
            if i != j {
                iface.peers.push(other.as_peer(Some(&endpoints[j])));
            }
        }
    }
}

/// `ip:port` for an endpoint, bracketing IPv6.
pub fn endpoint(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_wg_quick_sections_in_order() {
        let mut a = Interface {
            keys: Keypair {
                private: "PRIV".into(),
                public: "PUB".into(),
            },
            addresses: vec!["100.64.0.1/32".into(), "fd77:7765:6674::1/128".into()],
            listen_port: Some(51820),
            mtu: Some(1380),
            peers: Vec::new(),
        };
        let mut b = a.clone();
        b.keys.public = "PUBB".into();
        b.addresses = vec!["100.64.0.2/24".into()];
        a.peers.push(b.as_peer(Some("203.0.113.2:51820")));
        assert_eq!(
            a.to_wg_quick(),
            "[Interface]\nPrivateKey = PRIV\nAddress = 100.64.0.1/32, fd77:7765:6674::1/128\n\
             ListenPort = 51820\nMTU = 1380\n\n[Peer]\nPublicKey = PUBB\n\
             AllowedIPs = 100.64.0.2/32\nEndpoint = 203.0.113.2:51820\n"
        );
        assert_eq!(a.ip(true), "fd77:7765:6674::1");
        assert_eq!(endpoint("fd00::1", 5), "[fd00::1]:5");
        assert_eq!(overlay_v6(10), "fd77:7765:6674::a");
    }
}
