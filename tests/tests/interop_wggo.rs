//! Our node and wireguard-go talk to each other whichever side sends first:
//! pings both ways and an 8 MiB checksummed transfer each way, over v4 and v6.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weft_tests::traffic;
use weft_tests::{HostPair, Internet, MeshNode, Netns, WgGo};

struct Pair {
    _net: Internet,
    ours_ns: Netns,
    theirs_ns: Netns,
    ours: MeshNode,
    theirs: WgGo,
}

fn pair(tag: &str) -> Pair {
    let net = Internet::new(tag);
    let HostPair { a, b, ifs } = net.host_pair(tag, [51820, 51820]);
    let ours = MeshNode::start(&a, &ifs[0]);
    let theirs = WgGo::start(&b, &ifs[1]);
    Pair {
        _net: net,
        ours_ns: a,
        theirs_ns: b,
        ours,
        theirs,
    }
}

fn check_both_ways(p: &mut Pair, first_from_ours: bool) {
    let (ours_ip, theirs_ip) = (p.ours.iface.ip(false), p.theirs.iface.ip(false));
    // Nothing has been sent yet (no keepalive): the first packet starts the handshake.
    assert_eq!(
        p.theirs.latest_handshakes()[0].1,
        0,
        "handshake before any traffic"
    );
    let (first_ns, first_dst, second_ns, second_dst) = if first_from_ours {
        (&p.ours_ns, &theirs_ip, &p.theirs_ns, &ours_ip)
    } else {
        (&p.theirs_ns, &ours_ip, &p.ours_ns, &theirs_ip)
    };
    assert!(
        traffic::wait_ping(first_ns, first_dst, Duration::from_secs(10)),
        "first ping ({} side first) got no reply\nour node log:\n{}\nwireguard-go log:\n{}",
        if first_from_ours {
            "our"
        } else {
            "wireguard-go"
        },
        p.ours.log_tail(40),
        p.theirs.log()
    );
    assert!(
        traffic::ping(second_ns, second_dst, 5, 0.05, 1).all_ok(),
        "reverse pings lost"
    );
    assert!(
        p.theirs.latest_handshakes()[0].1 > 0,
        "wireguard-go saw no handshake"
    );
    for v6 in [false, true] {
        let (o, t) = (p.ours.iface.ip(v6), p.theirs.iface.ip(v6));
        assert!(
            traffic::ping(&p.ours_ns, &t, 3, 0.05, 1).all_ok(),
            "ping {t}"
        );
        assert!(
            traffic::ping(&p.theirs_ns, &o, 3, 0.05, 1).all_ok(),
            "ping {o}"
        );
        let base = if v6 { 7100 } else { 7000 };
        traffic::tcp_transfer(&p.ours_ns, &p.theirs_ns, &t, base + 1, 8)
            .assert_intact(&format!("ours -> wireguard-go {t}"));
        traffic::tcp_transfer(&p.theirs_ns, &p.ours_ns, &o, base + 2, 8)
            .assert_intact(&format!("wireguard-go -> ours {o}"));
    }
    assert!(
        p.ours.is_running(),
        "our node died:\n{}",
        p.ours.log_tail(30)
    );
    let st = p.ours.status();
    let peer = st
        .peer(p.theirs.public_key())
        .expect("wireguard-go peer in status");
    assert_eq!(peer.endpoint.as_deref(), Some("203.0.113.20:51820"));
    assert!(
        peer.rx_bytes > 16 << 20 && peer.tx_bytes > 16 << 20,
        "{peer:?}"
    );
}

#[test]
fn our_node_initiates() {
    let mut p = pair("iwo");
    check_both_ways(&mut p, true);
}

#[test]
fn wireguard_go_initiates() {
    let mut p = pair("iwg");
    check_both_ways(&mut p, false);
}
