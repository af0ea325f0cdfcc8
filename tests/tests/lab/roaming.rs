//! Node B moves to another underlay address (another internet segment) in the
//! middle of a TCP transfer from A: with no configuration change the transfer
//! completes intact, connectivity returns within 2 s, and A follows B's new endpoint.
#![allow(clippy::unwrap_used)]

use std::thread::sleep;
use std::time::{Duration, Instant};

use weft_tests::traffic::{self, GapMonitor, Pace};
use weft_tests::{MeshNode, NodePair};

#[test]
fn transfer_survives_peer_address_change() {
    let _lab = weft_tests::turn::take(module_path!());
    let mut pair = NodePair::start("ro", [51820, 51820], MeshNode::start, MeshNode::start);
    let (a, b, ifs) = (&pair.a, &pair.b, &pair.ifs);
    let (na, nb) = (&mut pair.na, &mut pair.nb);
    let (a_ip, b_ip) = (ifs[0].ip(false), ifs[1].ip(false));
    traffic::wait_tunnel(a, &b_ip, na);
    assert!(traffic::wait_ping(b, &a_ip, Duration::from_secs(10)));

    let gap_ab = GapMonitor::start(a, &b_ip, 0.05);
    let gap_ba = GapMonitor::start(b, &a_ip, 0.05);
    // 24 MiB at 4 MiB/s: about 6 s, so the move happens mid-transfer.
    let pace = Pace {
        tool: env!("CARGO_BIN_EXE_weft-pace").into(),
        bytes_per_sec: 4 << 20,
    };
    let run = traffic::start_transfer(a, b, &b_ip, 6001, 24 << 20, Some(&pace));
    let t0 = Instant::now();
    while run.received_so_far() < 4 << 20 && t0.elapsed() < Duration::from_secs(10) {
        sleep(Duration::from_millis(50));
    }
    assert!(run.received_so_far() > 0, "transfer did not start");

    // B roams: new address on another segment, old one gone, default route fixed.
    b.add_addr("eth0", "198.51.100.20/24");
    b.del_addr("eth0", "203.0.113.20/24");
    b.exec("ip route replace default via 198.51.100.1");
    let moved_at_received = run.received_so_far();

    let t = run.finish(Duration::from_secs(60));
    sleep(Duration::from_millis(500));
    let (ab, ba) = (gap_ab.stop(), gap_ba.stop());
    assert!(
        moved_at_received < 24 << 20,
        "transfer finished before the move; the test proves nothing"
    );
    t.assert_intact("A -> B across B's address change");
    assert!(na.is_running() && nb.is_running(), "a node died");
    for g in [&ab, &ba] {
        assert!(
            g.max_gap < Duration::from_secs(2),
            "gap {:?} toward {} after roaming ({} of {} replies)\nA log:\n{}\nB log:\n{}",
            g.max_gap,
            g.dst,
            g.received,
            g.transmitted,
            na.log_tail(30),
            nb.log_tail(30)
        );
    }
    let st = na.status();
    let peer = st.peer(nb.public_key()).expect("B in A's status");
    assert_eq!(
        peer.endpoint.as_deref(),
        Some("198.51.100.20:51820"),
        "A did not follow B's new endpoint"
    );
}
