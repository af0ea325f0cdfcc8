//! A fleet of three relays in three "regions" (issue 14): relay-eu, relay-us
//! and relay-ap on one PostgreSQL, an engineers' office and a worker's data
//! centre behind NAT routers. Latency: the office is 5 ms from relay-eu, 40
//! from relay-us, 120 from relay-ap; the worker the other way round (the
//! lab's kernel has no netem: `weft_tests::delay` holds the hosts' packets
//! to the relays in user space).
//!
//! - Both join with tokens that name relay-us only; each measures the
//!   fleet's relays and moves its sessions home to its nearest relay
//!   (alice to relay-eu, gpu-ap to relay-ap), which `mesh status` and
//!   `weft status` show with the round trips. An engineer on a network that
//!   drops UDP measures the relays over TCP/TLS and homes on the nearest too.
//! - alice (home relay-eu) reaches gpu-ap (home relay-ap) by mesh name with
//!   real ssh; engineer bob (logged in through relay-us, home relay-eu by
//!   latency) reaches gpu-ap's sshd through a reverse tunnel across relays:
//!   relay-eu redirects him to relay-ap, where he opens it (and, with
//!   redirects off, relay-eu carries it over its link to relay-ap; both
//!   ssh times are printed). Each peer-map entry names the peer's home relay.
//! - relay-ap killed (`kill -9`): gpu-ap's tunnel session is back on the
//!   next nearest relay (relay-us) within 5 s (printed) and bob's ssh works
//!   again; the direct mesh path between alice and gpu-ap loses no more than
//!   a ping.
//! - relay-us drained (`SIGTERM`): it leaves the fleet (`relays list` shows
//!   it down), tells its nodes to move, and exits cleanly; gpu-ap's tunnel is
//!   on relay-eu at once (printed) and bob's ssh works again.
//!
//! Binaries: `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use weft_tests::delay::Delay;
use weft_tests::fleet::{self, FleetRelay};
use weft_tests::managed::{relay_bin, ManagedNode, NetnsResolver};
use weft_tests::postgres::LabPostgres;
use weft_tests::ssh::{ssh_key, start_sshd};
use weft_tests::{bin, Internet, Nat, Netns, Router};

const EU: &str = "203.0.113.2";
const US: &str = "203.0.113.3";
const AP: &str = "203.0.113.4";

/// Delays from a host to relay-eu, relay-us and relay-ap.
fn far(eu: u64, us: u64, ap: u64) -> [(&'static str, Duration); 3] {
    [
        (EU, Duration::from_millis(eu)),
        (US, Duration::from_millis(us)),
        (AP, Duration::from_millis(ap)),
    ]
}

/// A client's `fleet.json` (its last measurement of the fleet) in `dir`.
fn fleet_json(dir: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("{dir}/fleet.json")).unwrap_or_default())
        .unwrap_or_default()
}

fn home_of(n: &ManagedNode) -> String {
    n.status()["fleet"]["home"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The home relay `n`'s peer map announces for its peer `peer` (`mesh status --json`).
fn peer_home(n: &ManagedNode, peer: &str) -> String {
    n.status()["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == peer))
        .and_then(|p| p["home"].as_str())
        .unwrap_or("-")
        .to_string()
}

fn rtt_ms(n: &ManagedNode, relay: &str) -> f64 {
    n.status()["fleet"]["rtt_ms"][relay]
        .as_f64()
        .unwrap_or(-1.0)
}

#[test]
fn nodes_home_on_the_nearest_relay_and_reach_each_other_across_regions() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("rg");
    let _pg = LabPostgres::start(net.host("rg-pg", "203.0.113.20"), "203.0.113.20");
    let url = _pg.url();
    let eu = FleetRelay::start(&net, "rg-eu", "relay-eu", EU, &url, None, "region = \"eu\"");
    let us = eu.join(&net, "rg-us", "relay-us", US, "region = \"us\"");
    let ap = eu.join(&net, "rg-ap", "relay-ap", AP, "region = \"ap\"");
    eu.wait_up(3, Duration::from_secs(10));
    sleep(Duration::from_millis(1200));

    let office = Router::new(&net, "rg-o", Nat::Easy, "198.51.100.10/24", "192.0.2.32/27");
    let dc = Router::new(&net, "rg-d", Nat::Easy, "198.51.100.11/24", "192.0.2.64/27");
    let e_ns = Netns::new("rg-e");
    let e_ip = office.attach(&e_ns, "eth0");
    let _e_delay = Delay::start(&e_ns, &e_ip, "192.0.2.33", &far(5, 40, 120));
    let w_ns = Netns::new("rg-w");
    let w_ip = dc.attach(&w_ns, "eth0");
    let _w_delay = Delay::start(&w_ns, &w_ip, "192.0.2.65", &far(120, 40, 5));
    let _resolver = NetnsResolver::magic_dns(&e_ns);

    // Both join through relay-us (their tokens name only it), then move home.
    let env = "WEFT_HOME_PROBE=2s";
    let t0 = Instant::now();
    let alice = ManagedNode::start_with_env(e_ns, &us.token("engineer", &us.addr), "alice", env);
    let gpu = ManagedNode::start_with_env(w_ns, &us.token("worker", &us.addr), "gpu-ap", env);
    let joined = |name: &'static str| {
        move |l: &str| l.contains("joined the mesh") && l.contains(&format!("node={name}"))
    };
    assert!(
        us.proc.log().lines().any(joined("alice")) && us.proc.log().lines().any(joined("gpu-ap")),
        "the nodes did not join through relay-us first:\n{}",
        us.proc.log_tail(20)
    );
    alice.wait_until(Duration::from_secs(20), "alice homed on relay-eu", |n| {
        home_of(n) == "relay-eu"
    });
    eu.wait_logged(
        Duration::from_secs(10),
        "alice's mesh session did not move to relay-eu",
        joined("alice"),
    );
    let alice_home = t0.elapsed();
    gpu.wait_until(Duration::from_secs(20), "gpu-ap homed on relay-ap", |n| {
        home_of(n) == "relay-ap"
    });
    ap.wait_logged(
        Duration::from_secs(10),
        "gpu-ap's mesh session did not move to relay-ap",
        joined("gpu-ap"),
    );
    eprintln!(
        "regions: alice home relay-eu after {alice_home:?}, gpu-ap home relay-ap after {:?}",
        t0.elapsed()
    );
    // The round trips measured are the regions' (5 / 40 / 120 ms, plus the lab's own).
    for (n, near, mid, far_) in [
        (&alice, "relay-eu", "relay-us", "relay-ap"),
        (&gpu, "relay-ap", "relay-us", "relay-eu"),
    ] {
        let (a, b, c) = (rtt_ms(n, near), rtt_ms(n, mid), rtt_ms(n, far_));
        assert!(
            (4.0..30.0).contains(&a) && (38.0..70.0).contains(&b) && (118.0..160.0).contains(&c),
            "{}: measured {near} {a} ms, {mid} {b} ms, {far_} {c} ms\n{}",
            n.ns.name(),
            n.status()
        );
    }
    let text = String::from_utf8_lossy(&alice.mesh("status --interface weft0").stdout).into_owned();
    assert!(
        text.contains("relays: relay-eu (eu) ") && text.contains(" home, relay-us (us) "),
        "mesh status:\n{text}"
    );
    let listed = String::from_utf8_lossy(&eu.cmd("relays list --json").stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
    let homed = |relay: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|r| r["name"] == relay))
            .and_then(|r| r["nodes"].as_i64())
            .unwrap_or(-1)
    };
    assert!(
        homed("relay-eu") >= 1 && homed("relay-ap") >= 1,
        "relays list: {listed}"
    );
    let nodes = String::from_utf8_lossy(&us.cmd("nodes list --json").stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&nodes).unwrap_or_default();
    let home = |name: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|n| n["name"] == name))
            .map(|n| n["home"].clone())
            .unwrap_or_default()
    };
    assert!(
        home("alice") == "relay-eu" && home("gpu-ap") == "relay-ap",
        "nodes list (through relay-us): {nodes}"
    );

    // alice (relay-eu) -> gpu-ap (relay-ap) by mesh name, real ssh.
    alice.wait_until(Duration::from_secs(15), "gpu-ap in alice's peer map", |n| {
        n.peer_ips().contains(&gpu.ip)
    });
    // Each peer-map entry announces the peer's home relay.
    alice.wait_until(
        Duration::from_secs(10),
        "alice's peer map: gpu-ap homed on relay-ap",
        |n| peer_home(n, "gpu-ap") == "relay-ap",
    );
    gpu.wait_until(
        Duration::from_secs(10),
        "gpu-ap's peer map: alice homed on relay-eu",
        |n| peer_home(n, "alice") == "relay-eu",
    );
    let text = String::from_utf8_lossy(&alice.mesh("status --interface weft0").stdout).into_owned();
    assert!(
        text.contains("\npeer: gpu-ap (") && text.contains("  home relay: relay-ap\n"),
        "mesh status:\n{text}"
    );
    let _sshd = start_sshd(&gpu.ns, "0.0.0.0");
    let key = alice.ns.file("id").display().to_string();
    std::fs::copy(ssh_key(&gpu.ns), &key).unwrap_or_else(|e| panic!("{e}"));
    let ssh_opts = format!(
        "-F /dev/null -i {key} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=20"
    );
    let out = alice.ns.output(&format!(
        "ssh {ssh_opts} root@gpu-ap.weft.internal 'echo over-the-mesh; hostname -I'"
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("over-the-mesh") && text.contains(&gpu.ip),
        "ssh gpu-ap.weft.internal: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // gpu-ap exposes its sshd through the fleet; bob logs in through relay-us.
    let _expose = gpu.ns.spawn_named(
        "expose",
        &format!(
            "env WEFT_LOG=info {env} {} expose --token {} --state-dir {} --name gpu-ap-tunnel --service ssh=127.0.0.1:22",
            relay_bin(),
            us.token("worker", &us.addr),
            gpu.ns.file("expose-state").display()
        ),
    );
    let exposed = |l: &str| l.contains("services=[\"ssh\"]");
    ap.wait_logged(
        Duration::from_secs(20),
        "gpu-ap's tunnel session did not move home to relay-ap",
        exposed,
    );
    let bob = fleet::login(&alice.ns, &us.token("engineer", &us.addr), "bob");
    let measured = fleet_json(&bob);
    assert_eq!(measured["home"], "relay-eu", "bob's fleet.json: {measured}");
    let status = alice.ns.output(&format!(
        "{} status --state-dir {bob} --uapi-dir {}",
        bin("weft").display(),
        alice.uapi
    ));
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(
        status.contains("relays: relay-eu (eu) ") && status.contains("relay-ap (ap) "),
        "weft status:\n{status}"
    );
    // Carol, in the same office on a network that drops UDP (but DNS): STUN
    // cannot reach the relays, so she measures them over TCP/TLS and still
    // homes on the nearest.
    let c_ns = Netns::new("rg-c");
    let c_ip = office.attach(&c_ns, "eth0");
    let _c_delay = Delay::start(&c_ns, &c_ip, "192.0.2.33", &far(5, 40, 120));
    c_ns.exec(
        "nft add table inet noudp && \
         nft add chain inet noudp out '{ type filter hook output priority 0; }' && \
         nft add rule inet noudp out udp dport != 53 drop",
    );
    let carol = fleet::login(&c_ns, &us.token("engineer", &us.addr), "carol");
    let measured = fleet_json(&carol);
    let ms = |r: &str| measured["rtt_ms"][r].as_f64().unwrap_or(-1.0);
    assert!(
        measured["home"] == "relay-eu"
            && (4.0..30.0).contains(&ms("relay-eu"))
            && (38.0..70.0).contains(&ms("relay-us"))
            && (118.0..160.0).contains(&ms("relay-ap")),
        "carol's fleet.json (UDP blocked, measured over TCP/TLS): {measured}"
    );
    let cstatus = c_ns.output(&format!(
        "{} status --state-dir {carol}",
        bin("weft").display()
    ));
    let cstatus = String::from_utf8_lossy(&cstatus.stdout).into_owned();
    assert!(
        cstatus.contains("(tcp)") && cstatus.contains("relay-eu (eu) "),
        "weft status for carol (UDP blocked):\n{cstatus}"
    );
    eprintln!("regions: weft status for carol (UDP blocked):\n{cstatus}");

    // The worker on relay-ap is listed to bob on relay-eu.
    assert!(
        status.contains("  gpu-ap-tunnel  ssh"),
        "weft status does not list the worker homed on relay-ap:\n{status}"
    );
    eprintln!("regions: weft status for bob:\n{status}");
    let tunnel_ssh_env = |what: &str, env: &str| {
        let t = Instant::now();
        let out = alice.ns.output(&format!(
            "timeout 40 ssh {ssh_opts} -o ProxyCommand='env {env} {} connect --state-dir {bob} %h %p' \
             root@gpu-ap-tunnel 'echo through-the-tunnel'",
            bin("weft").display()
        ));
        eprintln!("regions: {what}: ssh ran {:?}", t.elapsed());
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success() && text.contains("through-the-tunnel"),
            "{what}: {text}\n{}\nrelay-eu:\n{}",
            String::from_utf8_lossy(&out.stderr),
            eu.proc.log_tail(10)
        );
    };
    let tunnel_ssh = |what: &str| tunnel_ssh_env(what, "");
    tunnel_ssh("bob (home relay-eu) -> gpu-ap (home relay-ap) through a tunnel");
    // The same through relay-eu's link to relay-ap (no redirect), for the time it takes.
    tunnel_ssh_env(
        "bob -> gpu-ap through relay-eu's link to relay-ap",
        "WEFT_FLEET_REDIRECT=0",
    );
    // relay-eu redirected bob to gpu-ap's home: bob's connect opened the
    // tunnel on relay-ap itself (one relay on the path).
    assert!(
        ap.proc.log().contains("node connected node=bob "),
        "bob was not redirected to relay-ap:\nrelay-ap:\n{}\nrelay-eu:\n{}",
        ap.proc.log_tail(15),
        eu.proc.log_tail(15)
    );

    // relay-ap dies: the tunnel comes back through another relay; the direct
    // mesh path does not notice.
    alice.wait_until(Duration::from_secs(15), "a direct path to gpu-ap", |n| {
        n.endpoint_of(&gpu.ip).starts_with("198.51.100.11:")
    });
    let gap = weft_tests::traffic::GapMonitor::start(&alice.ns, &gpu.ip, 0.05);
    sleep(Duration::from_secs(1));
    let mut ap = ap;
    let killed = std::time::SystemTime::now();
    ap.proc.signal(libc::SIGKILL);
    // The next nearest, relay-us (40 ms), comes first; relay-eu (120 ms) would do.
    let back = || {
        [&us, &eu]
            .iter()
            .filter_map(|r| weft_tests::logtime::logged_after(&r.proc.log(), killed, exposed))
            .min()
    };
    let t = Instant::now();
    while back().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "gpu-ap's tunnel session is on no other relay:\nrelay-us:\n{}\nrelay-eu:\n{}",
            us.proc.log_tail(10),
            eu.proc.log_tail(10)
        );
        sleep(Duration::from_millis(100));
    }
    sleep(Duration::from_secs(1));
    let moved = back().unwrap_or_default();
    let g = gap.stop();
    eprintln!(
        "regions: relay-ap killed; gpu-ap's tunnel session on another relay {moved:?} later; alice -> gpu-ap (direct) longest gap {:?} ({} of {} replies)",
        g.max_gap, g.received, g.transmitted
    );
    assert!(
        moved < Duration::from_secs(5),
        "the tunnel took {moved:?} to come back"
    );
    assert!(
        g.max_gap < Duration::from_secs(1),
        "the direct path stalled: {g:?}"
    );
    tunnel_ssh("bob -> gpu-ap after relay-ap died");
    // gpu-ap's entry in alice's peer map follows it to its new home.
    alice.wait_until(
        Duration::from_secs(10),
        "alice's peer map: gpu-ap homed on relay-us after relay-ap died",
        |n| peer_home(n, "gpu-ap") == "relay-us",
    );
    assert!(
        weft_tests::logtime::logged_after(&us.proc.log(), killed, exposed).is_some(),
        "gpu-ap's tunnel did not fail over to the next nearest relay (relay-us, 40 ms)"
    );

    // relay-us drains (SIGTERM): it leaves the fleet, its nodes move to
    // relay-eu at once (no idle timeout to wait for), and it exits cleanly.
    let mut us = us;
    let gap = weft_tests::traffic::GapMonitor::start(&alice.ns, &gpu.ip, 0.05);
    sleep(Duration::from_secs(1));
    let drained = std::time::SystemTime::now();
    us.proc.signal(libc::SIGTERM);
    let t = Instant::now();
    let on_eu = || weft_tests::logtime::logged_after(&eu.proc.log(), drained, exposed);
    while on_eu().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "gpu-ap's tunnel session did not move to relay-eu:\nrelay-us:\n{}\nrelay-eu:\n{}",
            us.proc.log_tail(10),
            eu.proc.log_tail(10)
        );
        sleep(Duration::from_millis(100));
    }
    let status = loop {
        if let Some(st) = us.proc.try_wait() {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "relay-us did not exit after SIGTERM:\n{}",
            us.proc.log_tail(10)
        );
        sleep(Duration::from_millis(100));
    };
    sleep(Duration::from_secs(1));
    let g = gap.stop();
    let moved = on_eu().unwrap_or_default();
    eprintln!(
        "regions: relay-us drained (SIGTERM); gpu-ap's tunnel session on relay-eu {moved:?} later; relay-us exited {status}; alice -> gpu-ap (direct) longest gap {:?} ({} of {} replies)",
        g.max_gap, g.received, g.transmitted
    );
    assert!(
        status.success(),
        "relay-us: {status}\n{}",
        us.proc.log_tail(10)
    );
    assert!(
        us.proc.log().contains("relay draining"),
        "{}",
        us.proc.log_tail(10)
    );
    assert!(
        moved < Duration::from_secs(5),
        "the drained relay's worker took {moved:?} to move"
    );
    assert!(
        g.max_gap < Duration::from_secs(1),
        "the direct path stalled: {g:?}"
    );
    tunnel_ssh("bob -> gpu-ap after relay-us drained");
    let listed = String::from_utf8_lossy(&eu.cmd("relays list --json").stdout).into_owned();
    let v: serde_json::Value = serde_json::from_str(&listed).unwrap_or_default();
    let us_row = v
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "relay-us"))
        .cloned()
        .unwrap_or_default();
    assert!(
        us_row["beat_age_ms"].as_i64().unwrap_or(0) > 3000,
        "relay-us still counts as up after it drained: {listed}"
    );
    drop((alice, gpu));
}
