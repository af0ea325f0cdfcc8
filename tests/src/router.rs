//! The simulated internet (one bridge, two documentation /24s) and home NAT routers.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::{link, Netns};
use crate::wgconf::{connect_full_mesh, endpoint, overlay_node, Interface};

/// Gateway of the 203.0.113.0/24 "internet" segment.
pub const NET_A_GW: &str = "203.0.113.1";
/// Gateway of the 198.51.100.0/24 "internet" segment.
pub const NET_B_GW: &str = "198.51.100.1";

/// The simulated internet: a namespace with bridge `br0` carrying
/// 203.0.113.0/24 and 198.51.100.0/24 (gateways `.1`), routing between them.
/// Hosts attach with a veth whose far end joins the bridge.
pub struct Internet {
    ns: Netns,
    ports: AtomicU32,
}

impl Internet {
    pub fn new(tag: &str) -> Internet {
        let ns = Netns::new(&format!("{tag}-net"));
        // A fixed MAC: a bridge otherwise takes its lowest port's, so plugging in a host
        // could change the gateway's MAC under every routed host's ARP entry (their
        // traffic then vanishes until the entry goes stale, ~30 s).
        ns.exec(
            "ip link add name br0 type bridge && ip link set br0 address 02:77:66:74:00:01 \
             && ip link set br0 up",
        );
        ns.add_addr("br0", &format!("{NET_A_GW}/24"));
        ns.add_addr("br0", &format!("{NET_B_GW}/24"));
        ns.enable_forwarding();
        Internet {
            ns,
            ports: AtomicU32::new(0),
        }
    }

    /// The internet's own namespace (bridge, gateways).
    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// A new namespace `tag` plugged in as `eth0` with `ip`/24 (see `attach`).
    pub fn host(&self, tag: &str, ip: &str) -> Netns {
        let ns = Netns::new(tag);
        self.attach(&ns, "eth0", &format!("{ip}/24"));
        ns
    }

    /// Plugs `ns` in: veth `ifname` in `ns` with address `cidr` (a /24 of
    /// 203.0.113.0 or 198.51.100.0) and a default route via that segment's `.1`.
    pub fn attach(&self, ns: &Netns, ifname: &str, cidr: &str) {
        let n = self.ports.fetch_add(1, Ordering::Relaxed);
        let port = format!("p{n}");
        link(ns, ifname, Some(cidr), &self.ns, &port, None);
        self.ns.exec(&format!("ip link set {port} master br0"));
        ns.route(&format!("default via {}", gateway_for(cidr)));
    }
}

/// Two hosts on a new internet's 203.0.113.0/24 segment, `TAG-a` at
/// 203.0.113.10 and `TAG-b` at 203.0.113.20, with a WireGuard node in each:
/// overlay nodes 1 and 2, peers of each other at those addresses.
pub struct NodePair<A, B> {
    /// The node in `a` (overlay node 1, interface `ifs[0]`).
    pub na: A,
    /// The node in `b` (overlay node 2, interface `ifs[1]`).
    pub nb: B,
    pub a: Netns,
    pub b: Netns,
    pub ifs: Vec<Interface>,
    /// Dropped last (fields drop in order): nodes, then hosts, then the internet.
    pub net: Internet,
}

impl<A, B> NodePair<A, B> {
    /// Builds the pair with the interfaces listening on `ports`, then starts
    /// the nodes: `start_a` in `a`, then `start_b` in `b` (e.g. `MeshNode::start`,
    /// `WgGo::start`).
    pub fn start(
        tag: &str,
        ports: [u16; 2],
        start_a: impl FnOnce(&Netns, &Interface) -> A,
        start_b: impl FnOnce(&Netns, &Interface) -> B,
    ) -> NodePair<A, B> {
        let ips = ["203.0.113.10", "203.0.113.20"];
        let net = Internet::new(tag);
        let a = net.host(&format!("{tag}-a"), ips[0]);
        let b = net.host(&format!("{tag}-b"), ips[1]);
        let mut ifs = vec![overlay_node(1, ports[0]), overlay_node(2, ports[1])];
        connect_full_mesh(
            &mut ifs,
            &[endpoint(ips[0], ports[0]), endpoint(ips[1], ports[1])],
        );
        let na = start_a(&a, &ifs[0]);
        let nb = start_b(&b, &ifs[1]);
        NodePair {
            na,
            nb,
            a,
            b,
            ifs,
            net,
        }
    }
}

/// The relay stories' network: a worker behind a home NAT router and an
/// engineer on the other internet segment, from [`NattedWorker::new`]. A relay
/// joins `net` as a host of its own.
pub struct NattedWorker {
    /// `TAG-eng`, public at 198.51.100.5.
    pub engineer: Netns,
    /// `TAG-wk`, on the router's LAN.
    pub worker: Netns,
    /// The worker's LAN address.
    pub worker_ip: String,
    /// `TAG-w`: WAN 203.0.113.10/24, LAN 192.0.2.32/27.
    pub router: Router,
    /// Dropped last (fields drop in order): the hosts go before the internet they are plugged into.
    pub net: Internet,
}

impl NattedWorker {
    /// A new internet `TAG` with the worker behind a router doing `nat`, and the engineer.
    pub fn new(tag: &str, nat: Nat) -> NattedWorker {
        let net = Internet::new(tag);
        let router = Router::new(
            &net,
            &format!("{tag}-w"),
            nat,
            "203.0.113.10/24",
            "192.0.2.32/27",
        );
        let worker = Netns::new(&format!("{tag}-wk"));
        let worker_ip = router.attach(&worker, "eth0");
        let engineer = net.host(&format!("{tag}-eng"), "198.51.100.5");
        NattedWorker {
            engineer,
            worker,
            worker_ip,
            router,
            net,
        }
    }
}

/// The `.1` gateway of the internet segment an address is in.
pub fn gateway_for(addr: &str) -> &'static str {
    if addr.starts_with("198.51.100.") {
        NET_B_GW
    } else {
        NET_A_GW
    }
}

/// NAT behaviour of a [`Router`] (measured in LAB.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: endpoint-independent mapping, source port kept.
    Easy,
    /// `masquerade random`: a new random port per destination (symmetric).
    Hard,
}

/// The nftables table (family `inet`) of [`Router::block_udp`] in a router's namespace.
const UDP_BLOCK_TABLE: &str = "udpblock";

/// A home router: namespace with `wan` on the internet, a LAN bridge `lan`
/// with the LAN's first address, NAT on `wan`, and the home firewall (drop
/// `ct state new` arriving from `wan`, for input and forward).
pub struct Router {
    ns: Netns,
    wan_ip: String,
    lan_prefix: String,
    lan_len: u8,
    hosts: AtomicU32,
}

impl Router {
    /// `wan_cidr` on the internet (e.g. `203.0.113.10/24`); `lan` a slice of
    /// 192.0.2.0/24 (e.g. `192.0.2.32/27`); the router takes the LAN's `.1`.
    pub fn new(internet: &Internet, tag: &str, nat: Nat, wan_cidr: &str, lan: &str) -> Router {
        let ns = Netns::new(&format!("{tag}-rt"));
        internet.attach(&ns, "wan", wan_cidr);
        let (net, len) = lan.split_once('/').expect("lan as a.b.c.d/len");
        let len: u8 = len.parse().expect("lan prefix length");
        let base: std::net::Ipv4Addr = net.parse().expect("lan network address");
        let base = u32::from(base);
        let gw = std::net::Ipv4Addr::from(base + 1);
        // A fixed MAC for the LAN gateway too (see `Internet::new`).
        ns.exec(
            "ip link add name lan type bridge && ip link set lan address 02:77:66:74:00:02 \
             && ip link set lan up",
        );
        ns.add_addr("lan", &format!("{gw}/{len}"));
        ns.enable_forwarding();
        let random = if nat == Nat::Hard { " random" } else { "" };
        ns.exec(&format!(
            "nft add table ip nat && \
             nft add chain ip nat post '{{ type nat hook postrouting priority 100; }}' && \
             nft add rule ip nat post oifname wan masquerade{random} && \
             nft add table inet fw && \
             nft add chain inet fw input '{{ type filter hook input priority 0; policy accept; }}' && \
             nft add rule inet fw input iifname wan ct state new drop && \
             nft add chain inet fw forward '{{ type filter hook forward priority 0; policy accept; }}' && \
             nft add rule inet fw forward iifname wan ct state new drop"
        ));
        Router {
            ns,
            wan_ip: wan_cidr.split('/').next().unwrap_or(wan_cidr).to_string(),
            lan_prefix: net.to_string(),
            lan_len: len,
            hosts: AtomicU32::new(10),
        }
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    /// The router's public (WAN) address.
    pub fn wan_ip(&self) -> &str {
        &self.wan_ip
    }

    /// Blocks UDP through the router, as on networks that only let web traffic out: every
    /// forwarded UDP packet is dropped, either direction, except DNS (UDP port 53 as source or
    /// destination). TCP and ICMP keep passing; the router's own traffic is untouched. The rules
    /// sit in an nftables table of their own (`inet udpblock`, a forward chain ahead of the home
    /// firewall), so [`Router::unblock_udp`] lifts them without touching NAT or firewall.
    /// Flows already running are cut too (the rules do not look at conntrack state). Idempotent.
    pub fn block_udp(&self) {
        // Create-delete-create in one transaction: the same result whether or not it was there.
        self.ns.exec(&format!(
            "nft -f - <<'EOF'\n\
             table inet {UDP_BLOCK_TABLE}\n\
             delete table inet {UDP_BLOCK_TABLE}\n\
             table inet {UDP_BLOCK_TABLE} {{\n\
               chain forward {{\n\
                 type filter hook forward priority -10; policy accept;\n\
                 udp dport 53 accept\n\
                 udp sport 53 accept\n\
                 meta l4proto udp drop\n\
               }}\n\
             }}\n\
             EOF"
        ));
    }

    /// Lifts [`Router::block_udp`]: UDP is forwarded again (a no-op if it was not blocked).
    pub fn unblock_udp(&self) {
        self.ns.exec(&format!(
            "nft add table inet {UDP_BLOCK_TABLE} && nft delete table inet {UDP_BLOCK_TABLE}"
        ));
    }

    /// Whether [`Router::block_udp`] is in force (its table exists in the router's namespace).
    pub fn udp_blocked(&self) -> bool {
        self.ns
            .output(&format!("nft list table inet {UDP_BLOCK_TABLE}"))
            .status
            .success()
    }

    /// Puts `ns` on the LAN as `ifname` with the next free address (from `.10`),
    /// default route via the router. Returns the host's address (no prefix).
    pub fn attach(&self, ns: &Netns, ifname: &str) -> String {
        let n = self.hosts.fetch_add(1, Ordering::Relaxed);
        let base: std::net::Ipv4Addr = self.lan_prefix.parse().expect("lan network address");
        let ip = std::net::Ipv4Addr::from(u32::from(base) + n);
        let gw = std::net::Ipv4Addr::from(u32::from(base) + 1);
        let port = format!("h{n}");
        link(
            ns,
            ifname,
            Some(&format!("{ip}/{}", self.lan_len)),
            &self.ns,
            &port,
            None,
        );
        self.ns.exec(&format!("ip link set {port} master lan"));
        ns.route(&format!("default via {gw}"));
        ip.to_string()
    }
}
