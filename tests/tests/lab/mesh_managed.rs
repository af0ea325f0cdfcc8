//! Managed mesh nodes (`mesh up --token`) in network namespaces: what users
//! rely on beyond the NAT grid (tests/tests/lab/nat_grid.rs).
//!
//! - MagicDNS: `gpu1.weft.internal` resolves through the system resolver
//!   (the namespace's resolv.conf points at 100.64.0.1, as an engineer's
//!   machine would after `mesh up`), and real OpenSSH reaches the worker by name.
//! - ACL: an engineer reaches tcp/22 on a worker; a worker cannot reach
//!   another worker (it is not even in its peer map) nor open connections to
//!   the engineer; a revoked worker disappears from the engineer's peer map.
//! - The data plane does not depend on the control plane: the relay
//!   (coordinator) is killed mid-transfer on a direct path and every byte
//!   still arrives; nodes reconnect when it is back.
//! - A worker that moves to another network is reachable again quickly.
//! - Policy reload without a restart: the operator edits the relay's config
//!   (`[mesh.acl]`) and runs `tunnel-relay policy reload` (or sends SIGHUP):
//!   workers that may now talk see each other and ping; a broken file is
//!   refused with its line and changes nothing; taking the rule back out
//!   removes them from each other's peer maps again.
//! - A relay configured with its own pools (`10.200.0.0/16`, `fd00:7765:200::/48`)
//!   gives nodes addresses, routes and a MagicDNS resolver inside them, and
//!   ssh by name works there.
//!
//! Binaries: `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use weft_tests::managed::{relay_bin, LabRelay as Relay, ManagedNode, NetnsResolver};
use weft_tests::ssh::{ssh_key, start_sshd};
use weft_tests::traffic::{self, GapMonitor, GapReport, Pace};
use weft_tests::{bin, Internet, Netns, Proc};

/// A managed node joined with a fresh token of `tag`.
fn node(ns: Netns, relay: &Relay, tag: &str, name: &str) -> ManagedNode {
    ManagedNode::start(ns, &relay.token(tag), name)
}

/// A worker `gpu1` (198.51.100.6) and an engineer `alice` (198.51.100.5) on
/// one internet segment, joined to a relay, once the engineer has a direct
/// path to the worker.
struct DirectPair {
    // Fields drop in order: the nodes, then the relay, then the internet.
    e: ManagedNode,
    w: ManagedNode,
    relay: Relay,
    _net: Internet,
}

fn direct_pair(tag: &str) -> DirectPair {
    let net = Internet::new(tag);
    let relay = Relay::start(&net, tag);
    let w = node(
        net.host(&format!("{tag}-w"), "198.51.100.6"),
        &relay,
        "worker",
        "gpu1",
    );
    let e = node(
        net.host(&format!("{tag}-e"), "198.51.100.5"),
        &relay,
        "engineer",
        "alice",
    );
    e.wait_until(Duration::from_secs(10), "a direct path", |n| {
        n.endpoint_of(&w.ip).starts_with("198.51.100.6:")
    });
    DirectPair {
        e,
        w,
        relay,
        _net: net,
    }
}

/// Pings from the engineer to the worker every 50 ms while `disrupt` runs
/// (after 1 s of steady traffic); the longest gap, logged as `after`.
fn gap_while(pair: &DirectPair, after: &str, disrupt: impl FnOnce()) -> GapReport {
    let gap = GapMonitor::start(&pair.e.ns, &pair.w.ip, 0.05);
    sleep(Duration::from_secs(1));
    disrupt();
    let g = gap.stop();
    eprintln!(
        "longest gap after {after}: {:?} ({} of {} replies)",
        g.max_gap, g.received, g.transmitted
    );
    g
}

/// `socat` client: what the server at `addr` sends, or the error.
fn fetch(ns: &Netns, target: &str) -> String {
    let out = ns.output(&format!(
        "timeout 5 socat -u TCP:{target},connect-timeout=3 -"
    ));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn banner(ns: &Netns, ip: &str, port: u16, text: &str) -> Proc {
    ns.spawn_listening(
        "banner",
        &format!("socat TCP-LISTEN:{port},bind={ip},fork,reuseaddr EXEC:'echo {text}'"),
        't',
        port,
        Duration::from_secs(5),
    )
}

/// Starts sshd on `worker`'s overlay address and runs real OpenSSH from
/// `eng` to `name`; asserts it answered and `hostname -I` shows `expect_ip`.
/// The engineer's ssh uses the worker's key pair copied over (the worker
/// authorized its own key). Returns the sshd to keep it running.
fn ssh_by_name(eng: &ManagedNode, worker: &ManagedNode, name: &str, expect_ip: &str) -> Proc {
    let sshd = start_sshd(&worker.ns, &worker.ip);
    let id = ssh_key(&worker.ns);
    let eid = eng.ns.file("id").display().to_string();
    std::fs::copy(&id, &eid).unwrap_or_else(|e| panic!("{e}"));
    let out = eng.ns.output(&format!(
        "ssh -i {eid} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
         -o ConnectTimeout=10 root@{name} 'echo ssh-over-the-mesh; hostname -I'"
    ));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && text.contains("ssh-over-the-mesh") && text.contains(expect_ip),
        "ssh by name failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sshd
}

#[test]
fn magic_dns_ssh_by_name_acl_and_revocation() {
    let _lab = weft_tests::turn::take(concat!(module_path!(), ":", line!()));
    let net = Internet::new("mma");
    let relay = Relay::start(&net, "mma");
    let w1 = node(net.host("mma-w1", "198.51.100.6"), &relay, "worker", "gpu1");
    let w2 = node(net.host("mma-w2", "198.51.100.7"), &relay, "worker", "gpu2");
    let eng_ns = net.host("mma-e", "198.51.100.5");
    let _resolver = NetnsResolver::magic_dns(&eng_ns);
    let eng = node(eng_ns, &relay, "engineer", "alice");

    // Peer maps follow the default ACL: the engineer sees both workers, each
    // worker only the engineer.
    let mut both = vec![w1.ip.clone(), w2.ip.clone()];
    both.sort();
    eng.wait_until(
        Duration::from_secs(10),
        "both workers in the peer map",
        |n| n.peer_ips() == both,
    );
    assert_eq!(w1.peer_ips(), vec![eng.ip.clone()]);
    assert_eq!(w2.peer_ips(), vec![eng.ip.clone()]);

    // MagicDNS through the system resolver, and real ssh by name.
    let got = eng.ns.exec("getent ahostsv4 gpu1.weft.internal");
    assert!(
        got.starts_with(&w1.ip),
        "gpu1.weft.internal -> {got:?}, want {}",
        w1.ip
    );
    let _sshd = ssh_by_name(&eng, &w1, "gpu1.weft.internal", "198.51.100.6");

    // ACL: engineer -> worker tcp/22 works (above); other ports do not;
    // worker -> worker and worker -> engineer do not.
    let _b = banner(&w1.ns, &w1.ip, 8080, "w1-8080");
    let _b2 = banner(&w2.ns, &w2.ip, 22, "w2-ssh");
    let _b3 = banner(&eng.ns, &eng.ip, 22, "engineer-ssh");
    assert_eq!(fetch(&eng.ns, &format!("{}:22", w2.ip)), "w2-ssh");
    assert_eq!(
        fetch(&eng.ns, &format!("{}:8080", w1.ip)),
        "",
        "port 8080 is not in the ACL"
    );
    assert_eq!(
        fetch(&w1.ns, &format!("{}:22", w2.ip)),
        "",
        "worker reached a worker"
    );
    assert_eq!(
        fetch(&w1.ns, &format!("{}:22", eng.ip)),
        "",
        "worker opened a flow to the engineer"
    );

    // Revocation: gpu2 leaves the engineer's peer map and can no longer be reached.
    relay.ns.exec(&format!(
        "{} nodes revoke gpu2 --state-dir {}",
        relay_bin(),
        relay.state
    ));
    eng.wait_until(
        Duration::from_secs(5),
        "gpu2 dropped after revocation",
        |n| n.peer_ips() == vec![w1.ip.clone()],
    );
    assert_eq!(fetch(&eng.ns, &format!("{}:22", w2.ip)), "");
    let got = eng.ns.output("getent hosts gpu2.weft.internal");
    assert!(
        !got.status.success(),
        "gpu2 still resolves after revocation"
    );
}

#[test]
fn transfer_survives_the_coordinator_and_nodes_reconnect() {
    let _lab = weft_tests::turn::take(concat!(module_path!(), ":", line!()));
    let mut pair = direct_pair("mmc");
    let (e, w, relay) = (&pair.e, &pair.w, &mut pair.relay);
    // 24 MiB at 4 MiB/s: the relay dies in the middle.
    let pace = Pace {
        tool: bin("weft-pace"),
        bytes_per_sec: 4 << 20,
    };
    let run = traffic::start_transfer(&e.ns, &w.ns, &w.ip, 22, 24 << 20, Some(&pace));
    let t0 = Instant::now();
    while run.received_so_far() < 4 << 20 && t0.elapsed() < Duration::from_secs(15) {
        sleep(Duration::from_millis(50));
    }
    relay.proc.signal(libc::SIGKILL);
    let killed_at = run.received_so_far();
    let t = run.finish(Duration::from_secs(60));
    assert!(
        killed_at < 24 << 20,
        "transfer finished before the kill; proves nothing"
    );
    t.assert_intact("engineer -> worker while the coordinator is down");

    // The relay comes back on the same state: both nodes resync, addresses kept.
    relay.proc = Relay::spawn(&relay.ns, &relay.state);
    let w_ip = w.ip.clone();
    e.wait_until(
        Duration::from_secs(15),
        "the worker after the relay restart",
        |n| n.peer_ips() == vec![w_ip.clone()],
    );
    let nodes = relay.ns.exec(&format!(
        "{} nodes list --json --state-dir {}",
        relay_bin(),
        relay.state
    ));
    assert!(nodes.contains("gpu1") && nodes.contains("alice"), "{nodes}");
    assert!(
        e.overlay_ip() == e.ip && w.overlay_ip() == w.ip,
        "overlay addresses changed"
    );
    let ping = traffic::ping(&e.ns, &w.ip, 3, 0.2, 2);
    assert!(ping.any_ok(), "no traffic after the relay came back");
}

#[test]
fn worker_moving_networks_is_reachable_again() {
    let _lab = weft_tests::turn::take(concat!(module_path!(), ":", line!()));
    let pair = direct_pair("mmr");
    // The worker moves: new address on the other segment, old one gone.
    let g = gap_while(&pair, "the move", || {
        let w = &pair.w;
        w.ns.add_addr("eth0", "203.0.113.60/24");
        w.ns.del_addr("eth0", "198.51.100.6/24");
        w.ns.exec("ip route replace default via 203.0.113.1");
        sleep(Duration::from_secs(8));
    });
    let (e, w) = (&pair.e, &pair.w);
    // Reachable again, and over a direct path to the new address.
    assert!(
        traffic::ping(&e.ns, &w.ip, 3, 0.2, 2).any_ok(),
        "unreachable after the move"
    );
    e.wait_until(
        Duration::from_secs(30),
        "a direct path to the new address",
        |n| n.endpoint_of(&w.ip).starts_with("203.0.113.60:"),
    );
    // The bound: traffic resumes within 3 s (generous slack for a loaded CI machine).
    assert!(
        g.max_gap < Duration::from_secs(5),
        "traffic stopped for {:?} after the move\nengineer:\n{}\nworker:\n{}",
        g.max_gap,
        e.proc.log_tail(20),
        w.proc.log_tail(20)
    );
}

#[test]
fn direct_path_cut_falls_back_to_the_relay() {
    let _lab = weft_tests::turn::take(concat!(module_path!(), ":", line!()));
    let pair = direct_pair("mmf");
    let (e, w) = (&pair.e, &pair.w);
    // Something between them starts dropping their direct UDP (the relay still gets through).
    let g = gap_while(&pair, "the cut", || {
        w.ns.exec(
            "nft add table inet cut && \
             nft add chain inet cut in '{ type filter hook input priority 0; policy accept; }' && \
             nft add rule inet cut in ip saddr 198.51.100.5 meta l4proto udp drop",
        );
        e.wait_until(
            Duration::from_secs(10),
            "the relay path after the cut",
            |n| n.endpoint_of(&w.ip) == "relay",
        );
        sleep(Duration::from_secs(2));
    });
    assert!(
        traffic::ping(&e.ns, &w.ip, 3, 0.2, 2).all_ok(),
        "no traffic over the relay\nengineer:\n{}\nworker:\n{}",
        e.proc.log_tail(25),
        w.proc.log_tail(25)
    );
    // The bound: back on the relay within 3 s (slack for a loaded CI machine).
    assert!(
        g.max_gap < Duration::from_secs(5),
        "traffic stopped for {:?} after the direct path was cut\nengineer:\n{}",
        g.max_gap,
        e.proc.log_tail(20)
    );
}

#[test]
fn relay_pools_give_addresses_routes_and_dns_inside_them() {
    let _lab = weft_tests::turn::take(concat!(module_path!(), ":", line!()));
    let net = Internet::new("mmp");
    let relay = Relay::start_with_config(
        &net,
        "mmp",
        Some("[mesh]\nipv4_pool = \"10.200.0.0/16\"\nipv6_prefix = \"fd00:7765:200::/48\"\n"),
    );
    let dns = "10.200.0.1";
    let w = ManagedNode::start_beside(
        net.host("mmp-w1", "198.51.100.6"),
        &relay.token("worker"),
        "gpu1",
        dns,
    );
    let eng_ns = net.host("mmp-e", "198.51.100.5");
    let _resolver = NetnsResolver::at(&eng_ns, dns);
    let eng = ManagedNode::start_beside(eng_ns, &relay.token("engineer"), "alice", dns);

    // Addresses from the relay's pools.
    for n in [&w, &eng] {
        assert!(n.ip.starts_with("10.200."), "{} got {}", n.ns.name(), n.ip);
        let v6 = n.ns.exec("ip -6 -br addr show weft0");
        assert!(v6.contains("fd00:7765:200:"), "{}: {v6}", n.ns.name());
        // Routes for exactly the relay's pools, none for the default ones.
        let routes =
            n.ns.exec("ip -4 route show dev weft0; ip -6 route show dev weft0");
        assert!(
            routes.contains("10.200.0.0/16") && routes.contains("fd00:7765:200::/48"),
            "{} routes: {routes}",
            n.ns.name()
        );
        assert!(
            !routes.contains("100.64.0.0/10") && !routes.contains("fd7a:7765:6674::/48"),
            "{} still routes the default pools: {routes}",
            n.ns.name()
        );
        // MagicDNS answers on the pool's first host.
        let addrs = n.ns.exec("ip -4 -br addr show weft0");
        assert!(addrs.contains("10.200.0.1/32"), "{}: {addrs}", n.ns.name());
        assert_eq!(n.status()["self"]["ipv4"].as_str(), Some(n.ip.as_str()));
    }
    eng.wait_until(Duration::from_secs(10), "the worker in the peer map", |n| {
        n.peer_ips() == vec![w.ip.clone()]
    });

    // The system resolver (pointed at the pool's MagicDNS) and ssh by name.
    let got = eng.ns.exec("getent ahostsv4 gpu1.weft.internal");
    assert!(
        got.starts_with(&w.ip),
        "gpu1.weft.internal -> {got:?}, want {}",
        w.ip
    );
    let _sshd = ssh_by_name(&eng, &w, "gpu1.weft.internal", &w.ip);
}

/// The relay config of `policy_reload_reaches_every_peer_map_without_a_restart`:
/// the default rule, plus `extra`.
fn acl_config(extra: &str) -> String {
    format!(
        "[[mesh.acl.rule]]\nfrom = \"engineer\"\nto = \"worker\"\nproto = \"tcp\"\nports = [22, 7070]\n{extra}"
    )
}

#[test]
fn policy_reload_reaches_every_peer_map_without_a_restart() {
    let _lab = weft_tests::turn::take(concat!(module_path!(), ":", line!()));
    let net = Internet::new("mmp");
    let relay = Relay::start_with_config(&net, "mmp", Some(&acl_config("")));
    let config = relay.ns.file("relay.toml");
    let w1 = node(net.host("mmp-w1", "198.51.100.6"), &relay, "worker", "gpu1");
    let w2 = node(net.host("mmp-w2", "198.51.100.7"), &relay, "worker", "gpu2");
    let eng = node(
        net.host("mmp-e", "198.51.100.5"),
        &relay,
        "engineer",
        "alice",
    );
    let mut both = vec![w1.ip.clone(), w2.ip.clone()];
    both.sort();
    eng.wait_until(
        Duration::from_secs(10),
        "both workers in alice's peer map",
        |n| n.peer_ips() == both,
    );
    w1.wait_until(
        Duration::from_secs(10),
        "only alice in gpu1's peer map",
        |n| n.peer_ips() == vec![eng.ip.clone()],
    );
    assert!(
        !traffic::ping(&w1.ns, &w2.ip, 1, 0.2, 1).all_ok(),
        "a worker pinged a worker before any rule allowed it"
    );
    // Small packets from alice (a TCP exchange with gpu1's port 22) go through gpu1's TUN write
    // buffers first: gpu1's first handshake with gpu2 below must not depend on their size (a
    // handshake response is decrypted into such a buffer, and the ping queued behind the
    // handshake is encrypted into the same one).
    let _b1 = banner(&w1.ns, &w1.ip, 22, "w1-ssh");
    assert_eq!(fetch(&eng.ns, &format!("{}:22", w1.ip)), "w1-ssh");
    let reload = || {
        relay.ns.output(&format!(
            "{} policy reload --state-dir {}",
            relay_bin(),
            relay.state
        ))
    };

    // Workers may ping each other now: `policy reload`, no restart.
    // (Device approval, a top-level key, goes live in the same reload.)
    std::fs::write(
        &config,
        format!(
            "approve_devices = true\n{}",
            acl_config("[[mesh.acl.rule]]\nfrom = \"worker\"\nto = \"worker\"\nproto = \"icmp\"\n")
        ),
    )
    .expect("write the relay config");
    let t0 = Instant::now();
    let out = reload();
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success()
            && said.contains("mesh ACL changed")
            && said.contains("tunnel policy unchanged")
            && said.contains("device approval is now on")
            && !said.contains("restart"),
        "policy reload: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (w, other) in [(&w1, &w2), (&w2, &w1)] {
        let mut want = vec![eng.ip.clone(), other.ip.clone()];
        want.sort();
        w.wait_until(
            Duration::from_secs(5),
            "the other worker in the peer map after the reload",
            |n| n.peer_ips() == want,
        );
    }
    eprintln!(
        "peer maps updated {:?} after `policy reload`: {}",
        t0.elapsed(),
        said.trim()
    );
    assert!(
        traffic::wait_ping(&w1.ns, &w2.ip, Duration::from_secs(10)),
        "gpu1 cannot ping gpu2 after the reload\n{}",
        relay.proc.log_tail(20)
    );
    assert_eq!(
        fetch(&w1.ns, &format!("{}:22", w2.ip)),
        "",
        "the new rule allows icmp only"
    );
    let _b = banner(&w2.ns, &w2.ip, 22, "w2-ssh");
    assert_eq!(
        fetch(&eng.ns, &format!("{}:22", w2.ip)),
        "w2-ssh",
        "alice's rule still holds"
    );

    // A broken file is refused with where and what, and changes nothing.
    std::fs::write(
        &config,
        acl_config("[[mesh.acl.rule]]\nfrom = \"worker\"\nto = \"worker\"\nproto = \"icmpx\"\n"),
    )
    .expect("write the relay config");
    let out = reload();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success()
            && err.contains("policy not reloaded")
            && err.contains("relay.toml")
            && err.contains("icmpx"),
        "a broken config must be refused, naming the file and the value: {err}"
    );
    assert!(
        traffic::ping(&w1.ns, &w2.ip, 3, 0.2, 2).all_ok(),
        "the running policy must stay after a refused reload"
    );

    // SIGHUP does the same: the worker rule goes, and with it each worker from the other's map.
    std::fs::write(&config, acl_config("")).expect("write the relay config");
    relay.ns.exec(&format!("kill -HUP {}", relay.proc.pid()));
    for w in [&w1, &w2] {
        w.wait_until(
            Duration::from_secs(5),
            "only alice in the peer map after SIGHUP",
            |n| n.peer_ips() == vec![eng.ip.clone()],
        );
    }
    assert!(
        !traffic::ping(&w1.ns, &w2.ip, 2, 0.2, 1).all_ok(),
        "gpu1 still pings gpu2 after the rule was taken out"
    );
    assert!(
        relay.proc.log().contains("policy reloaded"),
        "the relay logs each reload\n{}",
        relay.proc.log_tail(20)
    );
    assert_eq!(
        fetch(&eng.ns, &format!("{}:22", w2.ip)),
        "w2-ssh",
        "alice reaches gpu2 throughout"
    );
}
