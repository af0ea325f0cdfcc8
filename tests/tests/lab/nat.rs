//! A node behind a home router (hard NAT, home firewall) with PersistentKeepalive
//! is reachable from a public node that has no endpoint for it: the public node
//! learns the NAT's mapped address, and traffic flows both ways intact.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weft_tests::traffic;
use weft_tests::{overlay_node, Internet, MeshNode, Nat, Netns, Router};

#[test]
fn node_behind_nat_with_keepalive_is_reachable() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("nt");
    let public = net.host("nt-p", "203.0.113.10");
    let router = Router::new(&net, "nt", Nat::Hard, "203.0.113.60/24", "192.0.2.32/27");
    let home = Netns::new("nt-h");
    let lan_ip = router.attach(&home, "eth0");

    let mut pi = overlay_node(1, 51820);
    let mut hi = overlay_node(2, 51820);
    pi.peers.push(hi.as_peer(None));
    let mut to_public = pi.as_peer(Some("203.0.113.10:51820"));
    to_public.persistent_keepalive = Some(1);
    hi.peers.push(to_public);
    let np = MeshNode::start(&public, &pi);
    let mut nh = MeshNode::start(&home, &hi);

    // The public side never sends first: the home node's keepalive opens the path.
    let h_ip = hi.ip(false);
    assert!(
        traffic::wait_ping(&public, &h_ip, Duration::from_secs(10)),
        "public node cannot reach the NATed node\npublic log:\n{}\nhome log:\n{}",
        np.log_tail(30),
        nh.log_tail(30)
    );
    let st = np.status();
    let peer = st.peer(nh.public_key()).expect("home peer listed");
    let ep = peer
        .endpoint
        .clone()
        .expect("endpoint learned from the NAT");
    assert!(
        ep.starts_with("203.0.113.60:"),
        "endpoint {ep} is not the router's public address (LAN address {lan_ip})"
    );
    assert_eq!(peer.persistent_keepalive_s, None);
    assert_eq!(
        nh.status().peers[0].persistent_keepalive_s,
        Some(1),
        "keepalive not reported"
    );
    traffic::tcp_transfer(&public, &home, &h_ip, 6100, 4).assert_intact("public -> NATed");
    traffic::tcp_transfer(&home, &public, &pi.ip(true), 6101, 4)
        .assert_intact("NATed -> public v6");
    assert!(nh.is_running());
}
