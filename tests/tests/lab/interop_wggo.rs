//! Our node and wireguard-go talk to each other whichever side sends first:
//! pings both ways and an 8 MiB checksummed transfer each way, over v4 and v6.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weft_tests::traffic;
use weft_tests::{MeshNode, NodePair, WgGo};

/// Our node in `a`, wireguard-go in `b`.
type Pair = NodePair<MeshNode, WgGo>;

fn pair(tag: &str) -> Pair {
    NodePair::start(tag, [51820, 51820], MeshNode::start, WgGo::start)
}

fn check_both_ways(p: &mut Pair, first_from_ours: bool) {
    let (ours, theirs, ours_ns, theirs_ns) = (&mut p.na, &p.nb, &p.a, &p.b);
    let (ours_ip, theirs_ip) = (ours.iface.ip(false), theirs.iface.ip(false));
    // Nothing has been sent yet (no keepalive): the first packet starts the handshake.
    assert_eq!(
        theirs.latest_handshakes()[0].1,
        0,
        "handshake before any traffic"
    );
    let (first_ns, first_dst, second_ns, second_dst) = if first_from_ours {
        (ours_ns, &theirs_ip, theirs_ns, &ours_ip)
    } else {
        (theirs_ns, &ours_ip, ours_ns, &theirs_ip)
    };
    assert!(
        traffic::wait_ping(first_ns, first_dst, Duration::from_secs(10)),
        "first ping ({} side first) got no reply\nour node log:\n{}\nwireguard-go log:\n{}",
        if first_from_ours {
            "our"
        } else {
            "wireguard-go"
        },
        ours.log_tail(40),
        theirs.log()
    );
    assert!(
        traffic::ping(second_ns, second_dst, 5, 0.05, 1).all_ok(),
        "reverse pings lost"
    );
    assert!(
        theirs.latest_handshakes()[0].1 > 0,
        "wireguard-go saw no handshake"
    );
    for v6 in [false, true] {
        let (o, t) = (ours.iface.ip(v6), theirs.iface.ip(v6));
        assert!(traffic::ping(ours_ns, &t, 3, 0.05, 1).all_ok(), "ping {t}");
        assert!(
            traffic::ping(theirs_ns, &o, 3, 0.05, 1).all_ok(),
            "ping {o}"
        );
        let base = if v6 { 7100 } else { 7000 };
        traffic::tcp_transfer(ours_ns, theirs_ns, &t, base + 1, 8)
            .assert_intact(&format!("ours -> wireguard-go {t}"));
        traffic::tcp_transfer(theirs_ns, ours_ns, &o, base + 2, 8)
            .assert_intact(&format!("wireguard-go -> ours {o}"));
    }
    assert!(ours.is_running(), "our node died:\n{}", ours.log_tail(30));
    let st = ours.status();
    let peer = st
        .peer(theirs.public_key())
        .expect("wireguard-go peer in status");
    assert_eq!(peer.endpoint.as_deref(), Some("203.0.113.20:51820"));
    assert!(
        peer.rx_bytes > 16 << 20 && peer.tx_bytes > 16 << 20,
        "{peer:?}"
    );
}

#[test]
fn our_node_initiates() {
    let _lab = weft_tests::turn::take(module_path!());
    let mut p = pair("iwo");
    check_both_ways(&mut p, true);
}

/// Also with our node busy-polling (`WEFT_MESH_BUSY_POLL_MS`): the same traffic arrives
/// intact, the node keeps a CPU busy while packets come within the window, and sleeps once
/// they stop.
#[test]
fn wireguard_go_initiates() {
    let _lab = weft_tests::turn::take(module_path!());
    let mut p = NodePair::start(
        "iwg",
        [51820, 51820],
        |ns, iface| MeshNode::start_with_env(ns, iface, &[("WEFT_MESH_BUSY_POLL_MS", "300")]),
        WgGo::start,
    );
    assert!(p.na.log().contains("busy-polling"), "{}", p.na.log_tail(20));
    check_both_ways(&mut p, false);
    // Pings 100 ms apart keep the window open: the poller does not sleep between them.
    let (c0, t0) = (p.na.cpu_time(), std::time::Instant::now());
    let theirs_ip = p.nb.iface.ip(false);
    assert!(traffic::ping(&p.a, &theirs_ip, 15, 0.1, 1).all_ok());
    let busy = (p.na.cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64();
    // Quiet for longer than the window: it sleeps (as shipped, an idle node uses ~0%). Any
    // packet opens the window again (the kernel's own IPv6 chatter on the interface, a
    // keepalive), so the quietest of three seconds is the one that tells.
    std::thread::sleep(Duration::from_millis(500));
    let idle = (0..3)
        .map(|_| {
            let (c1, t1) = (p.na.cpu_time(), std::time::Instant::now());
            std::thread::sleep(Duration::from_secs(1));
            (p.na.cpu_time() - c1).as_secs_f64() / t1.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    assert!(
        busy > 0.10,
        "busy-polling used {:.0}% of a CPU while pinged",
        busy * 100.0
    );
    assert!(
        idle < 0.10,
        "busy-polling kept {:.0}% of a CPU when idle",
        idle * 100.0
    );
}
