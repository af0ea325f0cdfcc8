//! A third host floods one node's listen port with 100k random datagrams and
//! 10k forged handshake initiations (valid mac1) during an iperf3 run between
//! two of our nodes: the node survives, the transfer completes, pings work after.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weft_tests::traffic;
use weft_tests::{MeshNode, NodePair};

#[test]
fn node_survives_flood_during_transfer() {
    let _lab = weft_tests::turn::take(module_path!());
    let mut pair = NodePair::start("ho", [51820, 51820], MeshNode::start, MeshNode::start);
    let attacker = pair.net.host("ho-x", "203.0.113.66");
    let (a, b, ifs) = (&pair.a, &pair.b, &pair.ifs);
    let (na, nb) = (&mut pair.na, &mut pair.nb);
    let b_ip = ifs[1].ip(false);
    traffic::wait_tunnel(a, &b_ip, na);

    let _srv = traffic::iperf3_server(b, 5201);
    let run = traffic::start_iperf3(a, &b_ip, 5201, "-t 20");
    std::thread::sleep(Duration::from_secs(2));
    let flood = attacker.output(&format!(
        "timeout 120 {} --target 203.0.113.20:51820 --random 100000 --initiations 10000 --rate 10000 --pubkey {}",
        env!("CARGO_BIN_EXE_weft-flood"),
        nb.public_key()
    ));
    let flood_out = String::from_utf8_lossy(&flood.stdout).into_owned();
    assert!(
        flood.status.success() && flood_out.contains("random=100000 initiations=10000"),
        "flood tool failed: {flood_out} {}",
        String::from_utf8_lossy(&flood.stderr)
    );

    let iperf = run.finish(Duration::from_secs(60));
    assert!(
        nb.is_running(),
        "flooded node died (flood: {flood_out}):\n{}",
        nb.log_tail(40)
    );
    assert!(na.is_running(), "peer node died:\n{}", na.log_tail(40));
    let iperf = iperf.unwrap_or_else(|e| panic!("iperf3 under flood failed: {e}"));
    assert!(
        iperf.received_bps > 0.0 && iperf.received_bytes > 0,
        "no throughput under flood: {iperf:?}"
    );
    assert!(
        traffic::wait_ping(a, &b_ip, Duration::from_secs(10)),
        "no ping after the flood:\n{}",
        nb.log_tail(40)
    );
    assert!(traffic::ping(a, &b_ip, 5, 0.1, 1).all_ok());
    eprintln!(
        "under flood: {:.1} Mbit/s ({flood_out})",
        iperf.received_bps / 1e6
    );
}
