//! `mesh status` and `mesh ping` on managed nodes, in network namespaces.
//!
//! A relay, an engineer (`alice`) and a worker (`gpu1`) as in `nat_grid.rs`:
//! - both public: the engineer's `mesh status --json` shows gpu1 by name,
//!   its overlay addresses and tags, path `direct` to the worker's address
//!   with a latency, and the node's own name, relay link and candidates;
//!   `mesh ping gpu1` answers `via <worker's address>`; text status too;
//! - both behind hard NATs (`masquerade random`): path `relay`, and
//!   `mesh ping gpu1` answers `via relay` (the relay-path ping), after which
//!   the status knows the relay latency;
//! - an unknown name: a clear error and exit status 1;
//! - the relay stops: the status shows the link reconnecting with the
//!   reason, and `mesh ping` still answers over the direct path.
//!
//! Assertions are on content, never on timings. Both cells run in parallel.
//! Binaries: `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::managed::{LabRelay, ManagedNode, RELAY_ADDR};
use weft_tests::{run_cells, Internet, Nat, Netns, Router};

const WORKER_IP: &str = "198.51.100.6";

/// Waits until `node`'s status shows the peer `name` (and `until` holds for it).
fn peer_when(node: &ManagedNode, name: &str, until: impl Fn(&Value) -> bool) -> (Value, Value) {
    let t0 = Instant::now();
    loop {
        let st = node.status();
        let peer = st["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
            .unwrap_or(Value::Null);
        if (!peer.is_null() && until(&peer)) || t0.elapsed() > Duration::from_secs(10) {
            return (st, peer);
        }
        sleep(Duration::from_millis(100));
    }
}

fn text(o: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cell {
    PublicPublic,
    HardHard,
}

fn host(net: &Internet, tag: &str, cell: Cell, ip: &str, wan: &str, lan: &str) -> Netns {
    match cell {
        Cell::PublicPublic => net.host(tag, ip),
        Cell::HardHard => {
            let r = Router::new(net, tag, Nat::Hard, wan, lan);
            let ns = Netns::new(&format!("{tag}-h"));
            r.attach(&ns, "eth0");
            // The router lives as long as the test process keeps its namespace.
            std::mem::forget(r);
            ns
        }
    }
}

fn run_cell(cell: Cell, tag: &str) -> Result<(), String> {
    let net = Internet::new(tag);
    let lab_relay = LabRelay::start(&net, tag);
    let tokens = (lab_relay.token("worker"), lab_relay.token("engineer"));
    let mut relay = lab_relay.proc;
    let ens = host(
        &net,
        &format!("{tag}-e"),
        cell,
        "198.51.100.5",
        "203.0.113.10/24",
        "192.0.2.32/27",
    );
    let wns = host(
        &net,
        &format!("{tag}-w"),
        cell,
        WORKER_IP,
        "203.0.113.11/24",
        "192.0.2.64/27",
    );
    let worker = ManagedNode::start(wns, &tokens.0, "gpu1");
    let engineer = ManagedNode::start(ens, &tokens.1, "alice");
    let (wip, eip) = (worker.ip.clone(), engineer.ip.clone());
    let logs = || {
        format!(
            "engineer:\n{}\nworker:\n{}",
            engineer.proc.log_tail(20),
            worker.proc.log_tail(20)
        )
    };

    // Traffic, so there is a handshake and byte counts to show.
    let ping = engineer.ns.output(&format!("ping -c 3 -i 0.2 -W 2 {wip}"));
    check(ping.status.success(), || {
        format!("overlay ping failed: {}\n{}", text(&ping), logs())
    })?;

    let wport = worker.status()["listen_port"].as_u64().unwrap_or(0);
    let worker_direct = format!("{WORKER_IP}:{wport}");
    let want_path = match cell {
        Cell::PublicPublic => "direct",
        Cell::HardHard => "relay",
    };
    let (st, peer) = peer_when(&engineer, "gpu1", |p| p["path"] == want_path);
    let show = || format!("{st:#}\n{}", logs());

    // The node itself, its relay link and candidates.
    check(st["mode"] == "managed", || {
        format!("not managed: {}", show())
    })?;
    check(st["interface"] == "weft0", || {
        format!("interface: {}", show())
    })?;
    check(st["self"]["name"] == "alice", || {
        format!("self: {}", show())
    })?;
    check(st["self"]["ipv4"] == eip.as_str(), || {
        format!("self ip: {}", show())
    })?;
    check(
        st["self"]["tags"] == serde_json::json!(["engineer"]),
        || format!("self tags: {}", show()),
    )?;
    check(st["relay"]["state"] == "connected", || {
        format!("relay link: {}", show())
    })?;
    check(st["relay"]["address"] == RELAY_ADDR, || {
        format!("relay address: {}", show())
    })?;
    let cands = st["candidates"].as_array().cloned().unwrap_or_default();
    check(cands.iter().any(|c| c["kind"] == "local"), || {
        format!("no local candidate: {}", show())
    })?;
    check(!st.to_string().contains("private"), || {
        format!("private key field in status: {}", show())
    })?;

    // The worker, by name.
    check(peer["ipv4"] == wip.as_str(), || {
        format!("gpu1 ipv4: {}", show())
    })?;
    check(
        peer["ipv6"]
            .as_str()
            .is_some_and(|s| s.starts_with("fd7a:")),
        || format!("gpu1 ipv6: {}", show()),
    )?;
    check(peer["tags"] == serde_json::json!(["worker"]), || {
        format!("gpu1 tags: {}", show())
    })?;
    check(peer["online"] == true, || {
        format!("gpu1 offline: {}", show())
    })?;
    check(peer["path"] == want_path, || {
        format!("gpu1 path, want {want_path}: {}", show())
    })?;
    check(peer["latest_handshake_unix"].is_u64(), || {
        format!("no handshake: {}", show())
    })?;
    check(peer["rx_bytes"].as_u64().unwrap_or(0) > 0, || {
        format!("no rx bytes: {}", show())
    })?;
    match cell {
        Cell::PublicPublic => {
            check(peer["endpoint"] == worker_direct.as_str(), || {
                format!("gpu1 endpoint, want {worker_direct}: {}", show())
            })?;
            check(peer["latency_ms"].is_number(), || {
                format!("no direct latency: {}", show())
            })?;
        }
        Cell::HardHard => {
            check(peer["endpoint"] == "relay", || {
                format!("gpu1 endpoint, want relay: {}", show())
            })?;
        }
    }

    // `mesh ping gpu1`: which path answered.
    let out = engineer.mesh("ping gpu1 --count 3 --timeout 2s");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let via = match cell {
        Cell::PublicPublic => format!("via {worker_direct} in "),
        Cell::HardHard => "via relay in ".to_string(),
    };
    eprintln!("[{cell:?}] mesh ping gpu1:\n{stdout}");
    let want = format!("pong from gpu1 ({wip}) {via}");
    check(out.status.success() && stdout.contains(&want), || {
        format!("mesh ping, want {want:?}: {}\n{}", text(&out), logs())
    })?;

    if cell == Cell::HardHard {
        // The relay ping's RTT is now the peer's latency.
        let (st, peer) = peer_when(&engineer, "gpu1", |p| p["latency_ms"].is_number());
        check(
            peer["latency_ms"].is_number() && peer["path"] == "relay",
            || format!("no relay latency after mesh ping: {st:#}"),
        )?;
        // The worker answers a ping through the relay too.
        let out = worker.mesh(&format!("ping {eip} --count 1"));
        check(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout)
                    .contains(&format!("pong from alice ({eip}) via relay")),
            || format!("worker's mesh ping by address: {}", text(&out)),
        )?;
    }

    if cell == Cell::PublicPublic {
        // Text status: wg show's layout with names and paths.
        let out = engineer.mesh("status");
        let t = String::from_utf8_lossy(&out.stdout).into_owned();
        eprintln!("[{cell:?}] mesh status:\n{t}");
        for want in [
            "interface: weft0 (managed)".to_string(),
            format!("peer: gpu1 ({wip}, "),
            format!("  path: direct {worker_direct}, latency "),
            "  relay: connected to 203.0.113.2:4433".to_string(),
        ] {
            check(t.contains(&want), || {
                format!("text status lacks {want:?}: {}", text(&out))
            })?;
        }
        // An unknown name: a clear error and exit status 1.
        let out = engineer.mesh("ping gpu9 --count 1");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        check(
            out.status.code() == Some(1)
                && err.contains("no peer named \"gpu9\"")
                && err.contains("known peers: gpu1"),
            || format!("mesh ping gpu9: {}", text(&out)),
        )?;

        // The relay goes away: the status says so (with the reason), and
        // the direct path still answers `mesh ping`.
        relay.kill_term();
        let t0 = Instant::now();
        let mut st = engineer.status();
        while st["relay"]["state"] != "reconnecting" && t0.elapsed() < Duration::from_secs(15) {
            sleep(Duration::from_millis(200));
            st = engineer.status();
        }
        check(
            st["relay"]["state"] == "reconnecting"
                && st["relay"]["error"].as_str().is_some_and(|e| !e.is_empty()),
            || format!("relay down, status: {st:#}"),
        )?;
        // While the relay is down the link alternates between an attempt (`connecting`) and
        // the back-off (`reconnecting (why), retry in …`): the text must show the latter.
        let t0 = Instant::now();
        let mut out = engineer.mesh("status");
        while !String::from_utf8_lossy(&out.stdout).contains("  relay: reconnecting (")
            && t0.elapsed() < Duration::from_secs(15)
        {
            sleep(Duration::from_millis(100));
            out = engineer.mesh("status");
        }
        eprintln!(
            "[{cell:?}] relay down:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
        check(
            String::from_utf8_lossy(&out.stdout).contains("  relay: reconnecting ("),
            || format!("text status with the relay down: {}", text(&out)),
        )?;
        let out = engineer.mesh("ping gpu1 --count 1");
        check(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains(&format!("via {worker_direct}")),
            || format!("mesh ping without the relay: {}", text(&out)),
        )?;
    }
    Ok(())
}

#[test]
fn mesh_status_and_ping() {
    let _lab = weft_tests::turn::take(module_path!());
    run_cells(
        "mst",
        &[Cell::PublicPublic, Cell::HardHard],
        |c| format!("{c:?}"),
        |c, tag| run_cell(*c, tag),
    );
}
