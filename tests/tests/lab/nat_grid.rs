//! Managed mesh nodes (`mesh up --token`) across NATs, in network namespaces.
//!
//! Every cell of the grid: a relay (coordinator, relay path, STUN) on the
//! simulated internet, an engineer and a worker, each public, behind an easy
//! NAT (nftables `masquerade`), behind a hard NAT (`masquerade random`: a new
//! port per destination), or both behind the same router. The nodes join with
//! tokens; then the engineer pings the worker over the overlay and opens
//! tcp/22 on it, and the test reads which path carries the traffic from
//! `mesh status --json` on both sides: direct wherever hole punching can
//! work (public with anything, easy with easy, the same NAT through LAN
//! addresses), the relay otherwise (hard with hard, easy with hard). Cells
//! run in parallel, each in its own namespaces.
//!
//! Binaries: `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use weft_tests::managed::{LabRelay, ManagedNode};
use weft_tests::{run_cells, Internet, Nat, Netns, Router};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Public,
    Behind(Nat),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Direct,
    Relay,
}

/// The endpoint shown for the (only) peer: "relay", an address, or "".
fn peer_endpoint(n: &ManagedNode) -> String {
    n.status()["peers"][0]["endpoint"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn place_host(
    net: &Internet,
    tag: &str,
    place: Place,
    public_ip: &str,
    wan: &str,
    lan: &str,
) -> Netns {
    match place {
        Place::Public => net.host(tag, public_ip),
        Place::Behind(nat) => {
            let r = Router::new(net, tag, nat, wan, lan);
            let ns = Netns::new(&format!("{tag}-h"));
            r.attach(&ns, "eth0");
            // The router lives as long as the test process keeps its namespace.
            std::mem::forget(r);
            ns
        }
    }
}

struct Cell {
    name: &'static str,
    engineer: Place,
    worker: Place,
    same_router: bool,
    expect: Expect,
}

fn run_cell(c: &Cell, tag: &str) -> Result<(), String> {
    let net = Internet::new(tag);
    let relay = LabRelay::start(&net, tag);
    let token = |tag: &str| relay.token(tag);
    let (ens, wns) = if c.same_router {
        let nat = match c.engineer {
            Place::Behind(n) => n,
            Place::Public => Nat::Easy,
        };
        let r = Router::new(
            &net,
            &format!("{tag}-r"),
            nat,
            "203.0.113.10/24",
            "192.0.2.32/27",
        );
        let e = Netns::new(&format!("{tag}-e"));
        let w = Netns::new(&format!("{tag}-w"));
        r.attach(&e, "eth0");
        r.attach(&w, "eth0");
        std::mem::forget(r);
        (e, w)
    } else {
        (
            place_host(
                &net,
                &format!("{tag}-e"),
                c.engineer,
                "198.51.100.5",
                "203.0.113.10/24",
                "192.0.2.32/27",
            ),
            place_host(
                &net,
                &format!("{tag}-w"),
                c.worker,
                "198.51.100.6",
                "203.0.113.11/24",
                "192.0.2.64/27",
            ),
        )
    };
    let worker = ManagedNode::start(wns, &token("worker"), "gpu1");
    let engineer = ManagedNode::start(ens, &token("engineer"), "alice");
    let wip = worker.ip.clone();

    // Traffic flows (at once: through the relay until a direct path answers).
    let ping = engineer
        .ns
        .output(&format!("ping -c 3 -i 0.2 -W 2 -s 1252 -M do {wip}"));
    if !ping.status.success() {
        return Err(format!(
            "ping over the overlay failed: {}\nengineer:\n{}\nworker:\n{}",
            String::from_utf8_lossy(&ping.stdout),
            engineer.proc.log_tail(20),
            worker.proc.log_tail(20)
        ));
    }
    let _sshd = worker.ns.spawn_named(
        "listen22",
        &format!("socat TCP-LISTEN:22,bind={wip},fork,reuseaddr EXEC:'echo ssh-banner'"),
    );
    worker.ns.wait_listen('t', 22, Duration::from_secs(5));
    let got = engineer.ns.output(&format!(
        "timeout 5 socat -u TCP:{wip}:22,connect-timeout=3 -"
    ));
    let got = String::from_utf8_lossy(&got.stdout).into_owned();
    if got.trim() != "ssh-banner" {
        return Err(format!("tcp/22 over the overlay returned {got:?}"));
    }

    // Which path: give probes time, then read both sides.
    let t0 = Instant::now();
    let (mut e, mut w);
    loop {
        e = peer_endpoint(&engineer);
        w = peer_endpoint(&worker);
        let direct = e != "relay" && !e.is_empty() && w != "relay" && !w.is_empty();
        if c.expect == Expect::Direct && direct {
            break;
        }
        if t0.elapsed() > Duration::from_secs(5) {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    let got = if e == "relay" || w == "relay" {
        Expect::Relay
    } else {
        Expect::Direct
    };
    if got != c.expect {
        return Err(format!(
            "expected {:?}, engineer sees {e:?}, worker sees {w:?}\nengineer:\n{}\nworker:\n{}",
            c.expect,
            engineer.proc.log_tail(15),
            worker.proc.log_tail(15)
        ));
    }
    if c.same_router && got == Expect::Direct && !e.starts_with("192.0.2.") {
        return Err(format!(
            "same NAT should use the LAN address, engineer uses {e}"
        ));
    }
    // Still flows on the chosen path, with full-size overlay packets (MTU 1280, don't fragment):
    // nothing is silently dropped on the relay path either.
    let ping = engineer
        .ns
        .output(&format!("ping -c 3 -i 0.2 -W 2 -s 1252 -M do {wip}"));
    let text = String::from_utf8_lossy(&ping.stdout).into_owned();
    if !ping.status.success() || !text.contains(" 0% packet loss") {
        return Err(format!(
            "full-size pings after path selection ({e}) were lost: {text}"
        ));
    }
    Ok(())
}

#[test]
fn nat_grid_paths() {
    let _lab = weft_tests::turn::take(module_path!());
    use Place::*;
    let easy = Behind(Nat::Easy);
    let hard = Behind(Nat::Hard);
    let cells = [
        Cell {
            name: "public-public",
            engineer: Public,
            worker: Public,
            same_router: false,
            expect: Expect::Direct,
        },
        Cell {
            name: "public-easy",
            engineer: Public,
            worker: easy,
            same_router: false,
            expect: Expect::Direct,
        },
        Cell {
            name: "public-hard",
            engineer: Public,
            worker: hard,
            same_router: false,
            expect: Expect::Direct,
        },
        Cell {
            name: "easy-public",
            engineer: easy,
            worker: Public,
            same_router: false,
            expect: Expect::Direct,
        },
        Cell {
            name: "hard-public",
            engineer: hard,
            worker: Public,
            same_router: false,
            expect: Expect::Direct,
        },
        Cell {
            name: "easy-easy",
            engineer: easy,
            worker: easy,
            same_router: false,
            expect: Expect::Direct,
        },
        Cell {
            name: "easy-hard",
            engineer: easy,
            worker: hard,
            same_router: false,
            expect: Expect::Relay,
        },
        Cell {
            name: "hard-hard",
            engineer: hard,
            worker: hard,
            same_router: false,
            expect: Expect::Relay,
        },
        Cell {
            name: "same-easy-nat",
            engineer: easy,
            worker: easy,
            same_router: true,
            expect: Expect::Direct,
        },
        Cell {
            name: "same-hard-nat",
            engineer: hard,
            worker: hard,
            same_router: true,
            expect: Expect::Direct,
        },
    ];
    run_cells("ng", &cells, |c| c.name.to_string(), run_cell);
}
