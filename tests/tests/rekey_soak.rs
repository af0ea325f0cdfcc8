//! 6.5 minutes of continuous traffic between our node and wireguard-go: at
//! least three rekeys (REKEY_AFTER_TIME = 120 s) happen, and neither direction
//! ever loses connectivity for more than a second.
//!
//! Ignored by a plain `cargo test` (it takes 6.5 minutes): `scripts/test-all.sh`
//! runs it with `--ignored` in the background while the other tests run, so
//! it also shows the rekeys survive a busy machine. Alone:
//! `cargo test --release -p weft-tests --test rekey_soak -- --ignored`.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::thread::sleep;
use std::time::{Duration, Instant};

use weft_tests::traffic::{self, GapMonitor};
use weft_tests::{MeshNode, NodePair, WgGo};

const SOAK: Duration = Duration::from_secs(390);

#[test]
#[ignore = "6.5 min; scripts/test-all.sh runs it in the background"]
fn rekeys_under_continuous_traffic_without_gaps() {
    let mut pair = NodePair::start("rk", [51820, 51820], MeshNode::start, WgGo::start);
    let (a, b, ifs) = (&pair.a, &pair.b, &pair.ifs);
    let (ours, theirs) = (&mut pair.na, &pair.nb);
    let (ours_ip, theirs_ip) = (ifs[0].ip(false), ifs[1].ip(false));
    assert!(
        traffic::wait_ping(a, &theirs_ip, Duration::from_secs(10)),
        "tunnel never came up:\n{}",
        ours.log_tail(40)
    );

    let gap_ab = GapMonitor::start(a, &theirs_ip, 0.05);
    let gap_ba = GapMonitor::start(b, &ours_ip, 0.05);
    let _srv = traffic::iperf3_server(b, 5201);
    let secs = SOAK.as_secs() - 5;
    let stream = traffic::start_iperf3(a, &theirs_ip, 5201, &format!("-t {secs} -b 2M --bidir"));

    let start = Instant::now();
    let mut theirs_seen = BTreeSet::new();
    let mut ours_seen = BTreeSet::new();
    while start.elapsed() < SOAK {
        if let Some((_, t)) = theirs.latest_handshakes().first() {
            theirs_seen.insert(*t);
        }
        if let Some(t) = ours
            .status()
            .peers
            .first()
            .and_then(|p| p.latest_handshake_unix)
        {
            ours_seen.insert(t);
        }
        sleep(Duration::from_secs(2));
    }
    let (ab, ba) = (gap_ab.stop(), gap_ba.stop());
    let iperf = stream.finish(Duration::from_secs(60));

    assert!(ours.is_running(), "our node died:\n{}", ours.log_tail(40));
    theirs_seen.remove(&0);
    // The first handshake happened before the soak; three rekeys add three more.
    assert!(
        theirs_seen.len() >= 4,
        "wireguard-go saw only {} distinct handshakes in {SOAK:?}: {theirs_seen:?} (ours reported {ours_seen:?})",
        theirs_seen.len()
    );
    for g in [&ab, &ba] {
        assert!(
            g.max_gap <= Duration::from_secs(1),
            "connectivity gap {:?} toward {} (ended at unix {:.1}; {} of {} replies; longest silence {:?}); handshakes at {theirs_seen:?}\nour log:\n{}",
            g.max_gap,
            g.dst,
            g.max_gap_end_unix,
            g.received,
            g.transmitted,
            g.max_silence,
            ours.log_tail(40)
        );
    }
    eprintln!(
        "soak: handshakes seen by wireguard-go {theirs_seen:?}, by ours {ours_seen:?}; max gaps {:?} / {:?} (longest silences {:?} / {:?})",
        ab.max_gap, ba.max_gap, ab.max_silence, ba.max_silence
    );
    let iperf = iperf.unwrap_or_else(|e| panic!("continuous stream failed: {e}"));
    assert!(
        iperf.received_bytes > 0 && iperf.received_bps > 0.0,
        "stream carried nothing: {iperf:?}"
    );
}
