//! Three of our nodes on one internet segment, full mesh from wg-quick files:
//! every ordered pair reaches the other over overlay IPv4 and IPv6, pings and
//! an 8 MiB transfer arrive intact.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weft_tests::traffic;
use weft_tests::{connect_full_mesh, overlay_node, Internet, MeshNode};

const N: usize = 3;

#[test]
fn three_nodes_full_mesh_v4_and_v6() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("mf");
    let underlay: Vec<String> = (0..N).map(|i| format!("203.0.113.{}", 10 + i)).collect();
    let hosts: Vec<_> = underlay.iter().map(|ip| net.host("mf", ip)).collect();
    let mut ifaces: Vec<_> = (0..N).map(|i| overlay_node(i as u8 + 1, 51820)).collect();
    let endpoints: Vec<String> = underlay.iter().map(|ip| format!("{ip}:51820")).collect();
    connect_full_mesh(&mut ifaces, &endpoints);
    let mut nodes: Vec<MeshNode> = hosts
        .iter()
        .zip(&ifaces)
        .map(|(ns, iface)| MeshNode::start(ns, iface))
        .collect();

    let mut port = 6000;
    for i in 0..N {
        for j in (0..N).filter(|&j| j != i) {
            for v6 in [false, true] {
                let dst = ifaces[j].ip(v6);
                let what = format!("node{} -> node{} ({dst})", i + 1, j + 1);
                assert!(
                    traffic::wait_ping(&hosts[i], &dst, Duration::from_secs(10)),
                    "{what}: no ping reply within 10 s\nsender log:\n{}\nreceiver log:\n{}",
                    nodes[i].log_tail(30),
                    nodes[j].log_tail(30)
                );
                let p = traffic::ping(&hosts[i], &dst, 5, 0.05, 1);
                assert!(p.all_ok(), "{what}: lost pings:\n{}", p.output);
                port += 1;
                traffic::tcp_transfer(&hosts[i], &hosts[j], &dst, port, 8).assert_intact(&what);
            }
        }
    }
    for (i, n) in nodes.iter_mut().enumerate() {
        assert!(n.is_running(), "node{} died:\n{}", i + 1, n.log_tail(30));
        let st = n.status();
        assert_eq!(st.peers.len(), N - 1);
        for p in &st.peers {
            assert!(
                p.latest_handshake_unix.is_some() && p.rx_bytes > 0 && p.tx_bytes > 0,
                "node{}: peer without handshake or traffic: {p:?}",
                i + 1
            );
        }
    }
}

/// Two nodes whose underlay is IPv6 only (endpoints written `[addr]:port`):
/// the dual-stack socket carries the tunnel, overlay v4 and v6 both work.
#[test]
fn ipv6_underlay_endpoints() {
    let _lab = weft_tests::turn::take(module_path!());
    let a = weft_tests::Netns::new("m6a");
    let b = weft_tests::Netns::new("m6b");
    weft_tests::link(
        &a,
        "u6a",
        Some("2001:db8:6::1/64"),
        &b,
        "u6b",
        Some("2001:db8:6::2/64"),
    );
    let mut ifaces = vec![overlay_node(1, 51820), overlay_node(2, 51820)];
    connect_full_mesh(
        &mut ifaces,
        &[
            "[2001:db8:6::1]:51820".into(),
            "[2001:db8:6::2]:51820".into(),
        ],
    );
    let na = MeshNode::start(&a, &ifaces[0]);
    let nb = MeshNode::start(&b, &ifaces[1]);
    for v6 in [false, true] {
        let dst = ifaces[1].ip(v6);
        assert!(
            traffic::wait_ping(&a, &dst, Duration::from_secs(10)),
            "no reply from {dst} over an IPv6 underlay\n{}\n{}",
            na.log_tail(30),
            nb.log_tail(30)
        );
        traffic::tcp_transfer(&a, &b, &dst, if v6 { 6101 } else { 6100 }, 4)
            .assert_intact(&format!("a -> b ({dst}) over IPv6 underlay"));
    }
    let st = nb.status();
    let peer = st.peer(na.public_key()).expect("A in B's status");
    assert_eq!(peer.endpoint.as_deref(), Some("[2001:db8:6::1]:51820"));
}
