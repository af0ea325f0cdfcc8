//! The stock `wg` tool works against our node like against wireguard-go:
//! `wg show`, `wg show dump`, `wg showconf` report the configuration; `wg set`
//! adds and removes a peer at runtime with traffic following; `mesh status
//! --json` reports endpoint, handshake and byte counters.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use weft_tests::traffic;
use weft_tests::{overlay_node, MeshNode, Netns, NodePair, WgGo};

/// Two of our nodes, A (203.0.113.10) and B (203.0.113.20), peers of each other.
type Lab = NodePair<MeshNode, MeshNode>;

fn lab(tag: &str) -> Lab {
    NodePair::start(tag, [51820, 51821], MeshNode::start, MeshNode::start)
}

fn set_of(csv: &str) -> BTreeSet<String> {
    csv.split([',', ' '])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn show_dump_and_showconf_report_the_config() {
    let _lab = weft_tests::turn::take(module_path!());
    let l = lab("wgs");
    let ifn = l.na.ifname();
    let (me, peer) = (&l.na.iface, &l.nb.iface);
    let want_ips = set_of(&peer.host_ips().join(","));

    let show = l.na.wg(&format!("show {ifn}"));
    for want in [
        format!("interface: {ifn}"),
        format!("public key: {}", me.keys.public),
        "private key: (hidden)".to_string(),
        "listening port: 51820".to_string(),
        format!("peer: {}", peer.keys.public),
        "endpoint: 203.0.113.20:51821".to_string(),
    ] {
        assert!(show.contains(&want), "`wg show` lacks {want:?}:\n{show}");
    }
    let ips_line = show
        .lines()
        .find_map(|l| l.trim().strip_prefix("allowed ips: "))
        .unwrap_or_else(|| panic!("no allowed ips in `wg show`:\n{show}"));
    assert_eq!(set_of(ips_line), want_ips, "`wg show` allowed ips");

    let dump = l.na.wg(&format!("show {ifn} dump"));
    let lines: Vec<Vec<&str>> = dump.lines().map(|l| l.split('\t').collect()).collect();
    assert_eq!(
        lines.len(),
        2,
        "dump: one interface line, one peer line:\n{dump}"
    );
    assert_eq!(
        lines[0][..3],
        [me.keys.private.as_str(), me.keys.public.as_str(), "51820"],
        "dump interface line"
    );
    let p = &lines[1];
    assert_eq!(p.len(), 8, "dump peer line has 8 fields: {p:?}");
    assert_eq!(p[0], peer.keys.public);
    assert_eq!(p[1], "(none)", "preshared key");
    assert_eq!(p[2], "203.0.113.20:51821");
    assert_eq!(set_of(p[3]), want_ips);
    assert_eq!(p[4], "0", "handshake before any traffic");
    assert_eq!(p[7], "off", "persistent keepalive");

    let conf = l.na.wg(&format!("showconf {ifn}"));
    for want in [
        "[Interface]".to_string(),
        "ListenPort = 51820".to_string(),
        format!("PrivateKey = {}", me.keys.private),
        "[Peer]".to_string(),
        format!("PublicKey = {}", peer.keys.public),
        "Endpoint = 203.0.113.20:51821".to_string(),
    ] {
        assert!(
            conf.contains(&want),
            "`wg showconf` lacks {want:?}:\n{conf}"
        );
    }
    let conf_ips = conf
        .lines()
        .find_map(|l| l.strip_prefix("AllowedIPs = "))
        .unwrap_or_else(|| panic!("no AllowedIPs in showconf:\n{conf}"));
    assert_eq!(set_of(conf_ips), want_ips);

    // `wg set fwmark` reaches the socket: what wg-quick relies on for policy routing.
    l.na.wg(&format!("set {ifn} fwmark 0x1234"));
    assert_eq!(l.na.wg(&format!("show {ifn} fwmark")).trim(), "0x1234");
    let sockets = l.a.exec("ss -uaen 2>/dev/null");
    assert!(
        sockets
            .lines()
            .any(|s| s.contains(":51820 ") && s.contains("fwmark:0x1234")),
        "the UDP socket does not carry the mark:\n{sockets}"
    );
}

#[test]
fn status_json_reports_endpoint_handshake_and_counters() {
    let _lab = weft_tests::turn::take(module_path!());
    let l = lab("wgj");
    let b_ip = l.nb.iface.ip(false);
    let before = l.na.status();
    assert_eq!(before.interface, l.na.ifname());
    assert_eq!(before.public_key, l.na.public_key());
    assert_eq!(before.listen_port, 51820);
    let p = before.peer(l.nb.public_key()).expect("peer B listed");
    assert_eq!(
        p.latest_handshake_unix, None,
        "handshake before traffic: {p:?}"
    );
    assert_eq!(p.endpoint.as_deref(), Some("203.0.113.20:51821"));
    assert_eq!(
        p.allowed_ips.iter().cloned().collect::<BTreeSet<_>>(),
        l.nb.iface.host_ips().into_iter().collect::<BTreeSet<_>>()
    );

    assert!(
        traffic::wait_ping(&l.a, &b_ip, Duration::from_secs(10)),
        "no tunnel:\n{}",
        l.na.log_tail(30)
    );
    assert!(traffic::ping(&l.a, &b_ip, 5, 0.05, 1).all_ok());
    let after = l.na.status();
    let p = after.peer(l.nb.public_key()).expect("peer B listed");
    assert_eq!(p.endpoint.as_deref(), Some("203.0.113.20:51821"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let hs = p.latest_handshake_unix.expect("a handshake after traffic");
    assert!(
        hs <= now + 1 && hs + 30 >= now,
        "handshake time {hs} vs now {now}"
    );
    assert!(p.latest_handshake_age_s.is_some_and(|a| a < 30), "{p:?}");
    assert!(p.rx_bytes > 0 && p.tx_bytes > 0, "counters: {p:?}");
    // B's view agrees.
    let pb = l.nb.status();
    let pb = pb.peer(l.na.public_key()).expect("peer A listed at B");
    assert!(pb.rx_bytes > 0 && pb.tx_bytes > 0, "B counters: {pb:?}");
    assert!(traffic::ping(&l.b, &l.na.iface.ip(true), 2, 0.05, 1).all_ok());
}

#[test]
fn wg_set_adds_and_removes_a_peer_at_runtime() {
    let _lab = weft_tests::turn::take(module_path!());
    let l = lab("wga");
    let ifn = l.na.ifname().to_string();
    // A wireguard-go peer C that already knows A; A learns C only through `wg set`.
    let c = Netns::new("wga-c");
    l.net.attach(&c, "eth0", "203.0.113.30/24");
    let mut ci = overlay_node(3, 51822);
    ci.peers
        .push(l.na.iface.as_peer(Some("203.0.113.10:51820")));
    let wc = WgGo::start(&c, &ci);
    let c_ip = ci.ip(false);
    // C's address is not in A's routes yet: route it into A's interface, as a user would.
    l.a.exec(&format!("ip route add {c_ip}/32 dev {ifn}"));
    assert!(
        !traffic::ping(&l.a, &c_ip, 2, 0.2, 1).any_ok(),
        "C reachable before it was added"
    );

    l.na.wg(&format!(
        "set {ifn} peer {} allowed-ips {c_ip}/32 endpoint 203.0.113.30:51822",
        wc.public_key()
    ));
    let peers = l.na.wg(&format!("show {ifn} peers"));
    assert!(
        peers.contains(wc.public_key()),
        "added peer not listed:\n{peers}"
    );
    assert!(
        traffic::wait_ping(&l.a, &c_ip, Duration::from_secs(10)),
        "no traffic to the peer added at runtime:\nour log:\n{}",
        l.na.log_tail(30)
    );
    assert!(
        traffic::ping(&c, &l.na.iface.ip(false), 3, 0.05, 1).all_ok(),
        "C -> A"
    );
    traffic::tcp_transfer(&l.a, &c, &c_ip, 7001, 2).assert_intact("A -> runtime peer C");
    let st = l.na.status();
    let pc = st.peer(wc.public_key()).expect("C in mesh status");
    assert_eq!(pc.allowed_ips, vec![format!("{c_ip}/32")]);
    assert!(pc.rx_bytes > 0 && pc.tx_bytes > 0, "{pc:?}");
    // The original peer is untouched.
    assert!(traffic::ping(&l.a, &l.nb.iface.ip(false), 2, 0.05, 1).all_ok());

    l.na.wg(&format!("set {ifn} peer {} remove", wc.public_key()));
    let show = l.na.wg(&format!("show {ifn}"));
    assert!(
        !show.contains(wc.public_key()),
        "removed peer still listed:\n{show}"
    );
    assert!(
        show.contains(l.nb.public_key()),
        "other peer vanished:\n{show}"
    );
    assert!(
        l.na.status().peer(wc.public_key()).is_none(),
        "removed peer in mesh status"
    );
    let p = traffic::ping(&l.a, &c_ip, 3, 0.2, 1);
    assert!(
        !p.any_ok(),
        "traffic still flows to the removed peer:\n{}",
        p.output
    );
    let p = traffic::ping(&c, &l.na.iface.ip(false), 3, 0.2, 1);
    assert!(
        !p.any_ok(),
        "removed peer still gets answers:\n{}",
        p.output
    );
    assert!(
        traffic::ping(&l.a, &l.nb.iface.ip(false), 2, 0.05, 1).all_ok(),
        "B lost after removing C"
    );
}

/// `wg set IF listen-port N` on a running interface moves its socket (as on
/// wireguard-go and the kernel): the new port is reported and bound, the old
/// one is free, and the peer follows A to it (roaming on A's next packet).
#[test]
fn wg_set_listen_port_rebinds_the_running_socket() {
    let _lab = weft_tests::turn::take(module_path!());
    let l = lab("wgp");
    let ifn = l.na.ifname().to_string();
    let b_ip = l.nb.iface.ip(false);
    assert!(
        traffic::wait_ping(&l.a, &b_ip, Duration::from_secs(10)),
        "A -> B before the change"
    );
    l.na.wg(&format!("set {ifn} listen-port 51900"));
    assert_eq!(l.na.wg(&format!("show {ifn} listen-port")).trim(), "51900");
    let bound = l.a.exec("ss -Hlun");
    assert!(bound.contains(":51900"), "51900 not bound:\n{bound}");
    // The old socket closes once the data path's poll on it returns (200 ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while l.a.exec("ss -Hlun").contains(":51820") {
        assert!(
            std::time::Instant::now() < deadline,
            "old port still bound:\n{}",
            l.a.exec("ss -Hlun")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        traffic::wait_ping(&l.a, &b_ip, Duration::from_secs(10)),
        "A -> B after the change:\n{}",
        l.na.log_tail(20)
    );
    traffic::tcp_transfer(&l.a, &l.b, &b_ip, 7004, 2).assert_intact("A -> B on the new port");
    let endpoints = l.nb.wg(&format!("show {} endpoints", l.nb.ifname()));
    assert!(
        endpoints.contains("203.0.113.10:51900"),
        "B did not follow A to its new port:\n{endpoints}"
    );
    // A port in use fails with the socket untouched.
    let _squatter = l.a.spawn("socat -u UDP6-RECV:51901 /dev/null");
    assert!(
        l.a.wait_listen('u', 51901, Duration::from_secs(5)),
        "squatter on 51901"
    );
    let refused = l.a.output(&format!("wg set {ifn} listen-port 51901"));
    assert!(
        !refused.status.success(),
        "wg set onto a port in use succeeded"
    );
    assert_eq!(l.na.wg(&format!("show {ifn} listen-port")).trim(), "51900");
    assert!(
        traffic::ping(&l.a, &b_ip, 2, 0.05, 1).all_ok(),
        "A -> B after a refused change"
    );
}

/// A peer with `AllowedIPs = 0.0.0.0/0` is a full tunnel, as wg-quick makes it:
/// A's traffic to the rest of the internet leaves through B (which NATs it),
/// while A's own WireGuard packets to B's endpoint and its LAN stay outside
/// the tunnel; stopping the node removes the policy rules.
#[test]
fn allowed_ips_everything_is_a_full_tunnel_that_keeps_the_endpoints_reachable() {
    let _lab = weft_tests::turn::take(module_path!());
    // A's one peer, B, takes everything.
    let full = |ns: &Netns, iface: &weft_tests::Interface| {
        let mut iface = iface.clone();
        iface.peers[0].allowed_ips = vec!["0.0.0.0/0".into()];
        MeshNode::start(ns, &iface)
    };
    let mut l: Lab = NodePair::start("wgf", [51820, 51821], full, MeshNode::start);
    let (a, b) = (&l.a, &l.b);
    let c = l.net.host("wgf-c", "198.51.100.30");
    let a_ip = l.ifs[0].ip(false);
    // B is the exit: it forwards A's overlay traffic and masquerades it.
    b.enable_forwarding();
    b.exec(&format!(
        "nft add table ip exit && nft add chain ip exit post '{{ type nat hook postrouting priority 100; }}' && \
         nft add rule ip exit post oifname eth0 ip saddr {a_ip} masquerade"
    ));
    // C counts where its connections come from.
    c.exec(
        "nft add table inet seen && nft add chain inet seen in '{ type filter hook input priority 0; }' && \
         nft add rule inet seen in ip saddr 203.0.113.20 tcp dport 7005 counter && \
         nft add rule inet seen in ip saddr 203.0.113.10 tcp dport 7005 counter",
    );
    let counters = || -> Vec<u64> {
        c.exec("nft list chain inet seen in")
            .lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect()
    };
    let ifn = l.na.ifname().to_string();

    let route = a.exec("ip route get 198.51.100.30");
    assert!(
        route.contains(&format!("dev {ifn}")),
        "not into the tunnel: {route}"
    );
    let route = a.exec("ip route get 203.0.113.20 mark 51820");
    assert!(
        route.contains("dev eth0"),
        "the tunnel's own packets would loop: {route}"
    );
    let rules = a.exec("ip rule show");
    assert!(
        rules.contains("not from all fwmark 0xca6c lookup 51820"),
        "{rules}"
    );
    assert!(
        rules.contains("lookup main suppress_prefixlength 0"),
        "{rules}"
    );
    assert_eq!(l.na.wg(&format!("show {ifn} fwmark")).trim(), "0xca6c");

    traffic::tcp_transfer(a, &c, "198.51.100.30", 7005, 2).assert_intact("A -> C through B");
    let seen = counters();
    assert!(
        seen[0] > 0 && seen[1] == 0,
        "C saw A's connection from {seen:?} (B's address, A's)"
    );
    // The LAN (a more specific route in main) stays outside the tunnel.
    let route = a.exec("ip route get 203.0.113.20");
    assert!(route.contains("dev eth0"), "LAN into the tunnel: {route}");

    assert!(l.na.stop().success(), "node exit:\n{}", l.na.log_tail(20));
    let a = &l.a;
    let rules = a.exec("ip rule show");
    assert!(!rules.contains("51820"), "rules left behind:\n{rules}");
    let route = a.exec("ip route get 198.51.100.30");
    assert!(
        route.contains("dev eth0"),
        "not back to the direct path: {route}"
    );
}
