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
