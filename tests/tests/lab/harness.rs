//! The harness itself, proven with the reference peer only (no `mesh` needed):
//! namespaces, links, NAT router firewall, wireguard-go pairs, probes, weft-flood.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use weft_tests::traffic::{self, GapMonitor};
use weft_tests::{
    link, overlay_node, overlay_v4, overlay_v6, Internet, Nat, Netns, NodePair, Router, WgGo,
};

#[test]
fn namespaces_are_created_linked_and_deleted() {
    let _lab = weft_tests::turn::take(module_path!());
    let name;
    {
        let a = Netns::new("hn");
        let b = Netns::new("hn");
        name = a.name().to_string();
        assert!(name.starts_with("wft-hn-"));
        link(
            &a,
            "v0",
            Some("192.0.2.1/30"),
            &b,
            "v1",
            Some("192.0.2.2/30"),
        );
        let p = traffic::ping(&a, "192.0.2.2", 3, 0.1, 1);
        assert!(p.all_ok(), "veth ping failed:\n{}", p.output);
        assert_eq!(p.rtts_ms.len(), 3);
        let mut sleeper = a.spawn("sleep 600");
        assert!(sleeper.is_running());
        let st = sleeper.kill_term();
        assert!(!st.success(), "sleep ended by a signal");
        let _left_running = b.spawn("sleep 600");
    }
    let list = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(!list.contains(&name), "{name} still exists:\n{list}");
}

#[test]
fn home_router_nats_out_and_drops_unsolicited_in() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("hr");
    let server = net.host("hr-srv", "198.51.100.50");
    for (nat, wan, lan) in [
        (Nat::Easy, "203.0.113.60/24", "192.0.2.32/27"),
        (Nat::Hard, "203.0.113.61/24", "192.0.2.64/27"),
    ] {
        let router = Router::new(&net, "hr", nat, wan, lan);
        let host = Netns::new("hr-lan");
        let host_ip = router.attach(&host, "eth0");
        assert!(
            traffic::ping(&host, "198.51.100.50", 2, 0.2, 1).all_ok(),
            "{nat:?}: LAN host cannot reach the internet"
        );
        assert!(
            !traffic::ping(&server, router.wan_ip(), 2, 0.2, 1).any_ok(),
            "{nat:?}: unsolicited ping to the router's WAN got through the firewall"
        );
        assert!(
            !traffic::ping(&server, &host_ip, 1, 0.2, 1).any_ok(),
            "{nat:?}: LAN host reachable from the internet"
        );
    }
}

#[test]
fn wireguard_go_pair_carries_traffic_and_probes_measure_it() {
    let _lab = weft_tests::turn::take(module_path!());
    let pair = NodePair::start("hw", [51820, 51820], WgGo::start, WgGo::start);
    let (a, b, wa, wb) = (&pair.a, &pair.b, &pair.na, &pair.nb);
    assert!(traffic::wait_ping(
        a,
        &overlay_v4(2),
        Duration::from_secs(10)
    ));
    assert!(traffic::wait_ping(
        b,
        &overlay_v6(1),
        Duration::from_secs(10)
    ));

    let gap_ab = GapMonitor::start(a, &overlay_v4(2), 0.05);
    let gap_ba = GapMonitor::start(b, &overlay_v4(1), 0.05);
    traffic::tcp_transfer(a, b, &overlay_v4(2), 5001, 4).assert_intact("a->b v4");
    traffic::tcp_transfer(b, a, &overlay_v6(1), 5002, 4).assert_intact("b->a v6");
    let _srv = traffic::iperf3_server(b, 5201);
    let ip = traffic::iperf3(a, &overlay_v4(2), 5201, "-t 2", Duration::from_secs(20));
    assert!(ip.received_bps > 0.0);
    let (ab, ba) = (gap_ab.stop(), gap_ba.stop());
    for g in [&ab, &ba] {
        assert!(g.received > 10, "{g:?}");
        assert!(g.max_gap < Duration::from_secs(1), "{g:?}");
    }
    let hs = wa.latest_handshakes();
    assert_eq!(hs.len(), 1);
    assert!(hs[0].1 > 0, "no handshake recorded: {hs:?}");
    assert!(
        wb.transfer()[0].1 > 4 << 20,
        "rx counter below the transfer size"
    );
}

/// weft-flood's forged initiations carry a valid mac1: wireguard-go gets past the
/// mac1 check and fails later ("invalid initiation"), never "invalid mac1".
#[test]
fn flood_initiations_pass_mac1_check() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("hf");
    let t = net.host("hf-t", "203.0.113.10");
    let atk = net.host("hf-x", "203.0.113.66");
    let target = WgGo::start_with_log_level(&t, &overlay_node(1, 51820), "verbose");
    let out = atk.exec(&format!(
        "{} --target 203.0.113.10:51820 --initiations 200 --random 50 --pubkey {} --rate 2000",
        env!("CARGO_BIN_EXE_weft-flood"),
        target.public_key()
    ));
    assert!(out.contains("initiations=200"), "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let log = target.log();
    let invalid_init = log.matches("Received invalid initiation message").count();
    let bad_mac1 = log.matches("invalid mac1").count();
    assert_eq!(bad_mac1, 0, "forged mac1 rejected:\n{log}");
    assert!(
        invalid_init >= 100,
        "only {invalid_init} initiations reached the DH stage:\n{log}"
    );
}
