//! The fleet benchmark (issue 14; `tests/bench/fleet` runs it, the test
//! command runs that): three relays on one PostgreSQL, in namespaces on the
//! lab internet, and a host of simulated nodes (sessions of the client
//! library in this process, its runtime moved into that host's namespace).
//!
//! 1. **Join propagation**: 1,000 workers join, round robin through the
//!    three relays (8 at a time); an engineer on each relay watches its peer
//!    map. For each join, the time from the worker starting to connect to
//!    the worker showing in the peer map of the engineers on the *other*
//!    relays (store write, NOTIFY, the other relay's feed, its delta).
//!    Then 50 joins one at a time, with the 1,000 in the network.
//! 2. **Failover**: 12 workers expose a service through relay C; an engineer
//!    on relay A opens it on each (A -> C peer link). Relay C is killed
//!    (`kill -9`, with its ~330 simulated nodes); for each of the 12, the time
//!    from the kill to the first byte of a reopened tunnel.
//! 3. **Relay-to-relay hop**: iperf3 through `tunnel-relay forward` from an
//!    engineer on relay A to a worker on A (one relay), to a worker on B
//!    (A redirects the engineer to B: one relay) and to the same worker with
//!    redirects off (`WEFT_FLEET_REDIRECT=0`: A -> B peer link, two relays),
//!    in turn, twice each; the ratios.
//!
//! No timing assertions (the machines are noisy): it asserts that everything
//! worked and prints the table BENCHMARKS.md records.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use tunnel_relay::client::{self, ClientState, ClientTiming};
use tunnel_relay::mesh_client::MeshSession;
use tunnel_relay::{ExposeOptions, PublicKey, Token};
use weft_tests::fleet::FleetRelay;
use weft_tests::managed::relay_bin;
use weft_tests::postgres::LabPostgres;
use weft_tests::{Internet, Netns};

const NODES: usize = 1000;
const CONCURRENT_JOINS: usize = 8;
const STEADY_JOINS: usize = 50;
const FAILOVER_WORKERS: usize = 12;

/// A token for any number of nodes with `tag`, through `relay`, dialling it.
fn token(relay: &FleetRelay, tag: &str) -> Token {
    let t = relay.token_with(tag, &relay.addr, None);
    Token::parse(&t).unwrap_or_else(|e| panic!("token through {}: {e}: {t}", relay.addr))
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// When relay C was killed (FLEET_DEBUG's timeline).
static KILLED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// When each key first showed in an observer's peer map.
type Seen = Arc<Mutex<HashMap<PublicKey, Instant>>>;

fn watch(session: &MeshSession) -> Seen {
    let seen: Seen = Arc::default();
    let mut rx = session.watch_peer_map();
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            {
                let now = Instant::now();
                let map = rx.borrow_and_update();
                let mut s = out.lock().unwrap_or_else(|p| p.into_inner());
                for k in map.peers.keys() {
                    s.entry(*k).or_insert(now);
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    seen
}

fn state_dir(root: &std::path::Path, name: &str) -> PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Joins `names` with `tokens[relay of i]`, `CONCURRENT_JOINS` at a time;
/// returns (relay index, key, started) per node and keeps the sessions.
async fn join_all(
    root: &std::path::Path,
    names: Vec<(usize, String)>,
    tokens: &[Token],
    keep: &mut Vec<MeshSession>,
) -> Vec<(usize, PublicKey, Instant)> {
    let mut out = Vec::new();
    for chunk in names.chunks(CONCURRENT_JOINS) {
        let mut set = tokio::task::JoinSet::new();
        for (r, name) in chunk.iter().cloned() {
            let dir = state_dir(root, &name);
            let tok = tokens[r].clone();
            set.spawn(async move {
                let t0 = Instant::now();
                let s = MeshSession::connect(&dir, Some(&tok), &name, Vec::new())
                    .await
                    .unwrap_or_else(|e| panic!("{name} through relay {r}: {e}"));
                (r, s, t0)
            });
        }
        while let Some(j) = set.join_next().await {
            let (r, s, t0) = j.unwrap_or_else(|e| panic!("{e}"));
            out.push((r, s.public_key(), t0));
            keep.push(s);
        }
    }
    out
}

/// For each joined node, the time until every observer on another relay saw it.
async fn propagation(
    joined: &[(usize, PublicKey, Instant)],
    observers: &[Seen],
    within: Duration,
) -> Vec<Duration> {
    let t = Instant::now();
    loop {
        let mut times = Vec::new();
        let mut missing = 0;
        for (r, key, t0) in joined {
            for (o, seen) in observers.iter().enumerate().filter(|(o, _)| o != r) {
                match seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(key)
                    .copied()
                {
                    Some(at) => times.push(at.saturating_duration_since(*t0)),
                    None => {
                        missing += 1;
                        if t.elapsed() > within {
                            panic!(
                                "node {} (relay {r}) never reached the observer on relay {o}",
                                key.short()
                            );
                        }
                    }
                }
            }
        }
        if missing == 0 {
            return times;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Results {
    killed_at: std::time::SystemTime,
    bulk: Vec<Duration>,
    steady: Vec<Duration>,
    failover: Vec<Duration>,
}

/// Parts 1 and 2, on a runtime whose threads live in `host`'s namespace.
fn simulated(host: Netns, relays: [&FleetRelay; 3], c_proc: &mut weft_tests::Proc) -> Results {
    let workers: Vec<Token> = relays.iter().map(|r| token(r, "worker")).collect();
    let engineers: Vec<Token> = relays.iter().map(|r| token(r, "engineer")).collect();
    // The simulated nodes' state directories live on a tmpfs: each node
    // rewrites its relay.json (with an fsync) when it moves, and 333 nodes
    // doing so on this VM's one disk measured the disk (seconds of kernel
    // writeback CPU in the failover window), not the fleet; on real nodes
    // each write is on its own machine.
    let tmp = tempfile::Builder::new()
        .prefix("weft-fleet-bench-")
        .tempdir_in("/dev/shm")
        .unwrap_or_else(|e| panic!("a tmpfs directory in /dev/shm: {e}"));
    let root = tmp.path().to_path_buf();
    let banner_addr = "127.0.0.1:7000";
    std::thread::scope(|scope| {
        let run = scope.spawn(move || {
            host.enter_current_thread();
            if let Ok(filter) = std::env::var("FLEET_LOG") {
                // The simulated nodes' own log (e.g. FLEET_LOG=tunnel_relay=info).
                let _ = tracing_subscriber::fmt()
                    .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                    .with_writer(std::io::stderr)
                    .try_init();
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(async move {
                let mut keep = Vec::new();
                // One engineer per relay watches its peer map.
                let mut observers = Vec::new();
                for (i, t) in engineers.iter().enumerate() {
                    let name = format!("eng{i}");
                    let s =
                        MeshSession::connect(&state_dir(&root, &name), Some(t), &name, Vec::new())
                            .await
                            .unwrap_or_else(|e| panic!("{name}: {e}"));
                    observers.push(watch(&s));
                    keep.push(s);
                }
                let t = Instant::now();
                let names = (0..NODES).map(|i| (i % 3, format!("sim{i}"))).collect();
                let joined = join_all(&root, names, &workers, &mut keep).await;
                let bulk = propagation(&joined, &observers, Duration::from_secs(60)).await;
                eprintln!("fleet bench: {NODES} nodes joined in {:?}", t.elapsed());
                let mut steady = Vec::new();
                for i in 0..STEADY_JOINS {
                    let one = vec![(i % 3, format!("late{i}"))];
                    let j = join_all(&root, one, &workers, &mut keep).await;
                    steady.extend(propagation(&j, &observers, Duration::from_secs(30)).await);
                }

                // Failover: a banner service; workers expose it through relay C.
                let listener = tokio::net::TcpListener::bind(banner_addr)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                tokio::spawn(async move {
                    while let Ok((mut s, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            use tokio::io::AsyncWriteExt;
                            let _ = s.write_all(b"up\n").await;
                        });
                    }
                });
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                for i in 0..FAILOVER_WORKERS {
                    let name = format!("fo{i}");
                    let mut o = ExposeOptions::new(
                        state_dir(&root, &name),
                        name,
                        vec![("banner".to_string(), banner_addr.to_string())],
                    );
                    o.token = Some(workers[2].clone());
                    if std::env::var("FLEET_DEBUG").is_ok() && i < 3 {
                        // Each link state change of a few workers, timed from the kill.
                        let (tx, mut rx) = tokio::sync::watch::channel(
                            tunnel_relay::link::LinkState::Connecting { attempt: 1 },
                        );
                        o.link = Some(tx);
                        let name = format!("fo{i}");
                        tokio::spawn(async move {
                            while rx.changed().await.is_ok() {
                                let Some(k) = KILLED.get() else { continue };
                                let st = serde_json::to_string(&*rx.borrow_and_update())
                                    .unwrap_or_default();
                                eprintln!("fleet bench: {name} +{:?}: {st}", k.elapsed());
                            }
                        });
                    }
                    let mut stop = stop_rx.clone();
                    tokio::spawn(client::expose(o, async move {
                        let _ = stop.wait_for(|s| *s).await;
                    }));
                }
                let mut est =
                    ClientState::open(&state_dir(&root, "bob")).unwrap_or_else(|e| panic!("{e}"));
                let bob = Arc::new(
                    client::connect(
                        &mut est,
                        Some(&engineers[0]),
                        "bob",
                        Vec::new(),
                        &ClientTiming::engineer(),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("bob: {e}")),
                );
                let first_byte = |bob: Arc<tunnel_relay::Session>, target: String| async move {
                    let (_s, mut r) = bob
                        .open(&target, "banner")
                        .await
                        .map_err(|e| e.to_string())?;
                    let mut b = [0u8; 3];
                    match tokio::time::timeout(Duration::from_secs(1), r.read(&mut b)).await {
                        Ok(Ok(Some(n))) if n > 0 => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                };
                for i in 0..FAILOVER_WORKERS {
                    let target = format!("fo{i}");
                    let t = Instant::now();
                    while let Err(e) = first_byte(bob.clone(), target.clone()).await {
                        assert!(
                            t.elapsed() < Duration::from_secs(20),
                            "{target} through relay C: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                let killed = Instant::now();
                let _ = KILLED.set(killed);
                let killed_at = std::time::SystemTime::now();
                let cpu_before = cpu_by_pid();
                c_proc.signal(libc::SIGKILL);
                let mut set = tokio::task::JoinSet::new();
                for i in 0..FAILOVER_WORKERS {
                    let (bob, target) = (bob.clone(), format!("fo{i}"));
                    set.spawn(async move {
                        loop {
                            match tokio::time::timeout(
                                Duration::from_secs(2),
                                first_byte(bob.clone(), target.clone()),
                            )
                            .await
                            {
                                Ok(Ok(())) => return killed.elapsed(),
                                _ => {
                                    assert!(
                                        killed.elapsed() < Duration::from_secs(30),
                                        "{target} never came back"
                                    );
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                            }
                        }
                    });
                }
                let mut failover = Vec::new();
                while let Some(j) = set.join_next().await {
                    failover.push(j.unwrap_or_else(|e| panic!("{e}")));
                }
                if std::env::var("FLEET_DEBUG").is_ok() {
                    let after = cpu_by_pid();
                    for (k, d) in cpu_between(&cpu_before, &after) {
                        eprintln!("fleet bench: CPU during the failover: {k}: {d:.2} s");
                    }
                }
                let _ = stop_tx.send(true);
                drop(keep);
                Results {
                    killed_at,
                    bulk,
                    steady,
                    failover,
                }
            })
        });
        let r = run.join();
        if let (Ok(res), true) = (&r, std::env::var("FLEET_DEBUG").is_ok()) {
            // The relays' side of the same few workers, timed from the kill.
            for (i, relay) in relays.iter().enumerate().take(2) {
                for l in relay.proc.log().lines() {
                    let ours = ["node=fo0 ", "node=fo1 ", "node=fo2 "]
                        .iter()
                        .any(|n| l.contains(n));
                    if !ours {
                        continue;
                    }
                    let at = weft_tests::logtime::logged_after(l, res.killed_at, |_| true);
                    if let Some(at) = at {
                        eprintln!("fleet bench: relay {i} +{at:?}: {l}");
                    }
                }
            }
        }
        r.unwrap_or_else(|_| {
            let logs: Vec<String> = relays
                .iter()
                .map(|r| {
                    let log = r.proc.log();
                    let fo: Vec<&str> = log
                        .lines()
                        .filter(|l| l.contains("node=fo") && !l.contains("refused"))
                        .collect();
                    format!("{}\n{}", fo.join("\n"), r.proc.log_tail(5))
                })
                .collect();
            panic!(
                "the simulated nodes' thread panicked; relays' logs:\n{}",
                logs.join("\n---\n")
            )
        })
    })
}

/// CPU seconds used so far by each process: pid -> (command, seconds)
/// (all processes; debugging). Keyed by pid, not name: a kernel worker's
/// name changes with the work it runs.
fn cpu_by_pid() -> HashMap<u32, (String, f64)> {
    let tick = 100.0;
    let mut out = HashMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let comm = head.split_once(" (").map(|(_, c)| c).unwrap_or("");
        // kworker/u8:1-events -> kworker
        let comm = comm.split(['/', '-']).next().unwrap_or(comm).to_string();
        let f: Vec<&str> = rest.split_whitespace().collect();
        let t = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0);
        out.insert(pid, (comm, t / tick));
    }
    out
}

/// CPU seconds each command used between two [`cpu_by_pid`] readings.
fn cpu_between(
    before: &HashMap<u32, (String, f64)>,
    after: &HashMap<u32, (String, f64)>,
) -> Vec<(String, f64)> {
    let mut by: HashMap<String, f64> = HashMap::new();
    for (pid, (comm, t)) in after {
        let was = before.get(pid).map(|(_, b)| *b).unwrap_or(0.0);
        *by.entry(comm.clone()).or_insert(0.0) += t - was;
    }
    let mut v: Vec<(String, f64)> = by.into_iter().filter(|(_, d)| *d > 0.05).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

/// iperf3 through `forward` for `secs`: Gbit/s.
fn iperf(eng: &Netns, port: u16, secs: u32) -> f64 {
    let out = eng.output(&format!("iperf3 -c 127.0.0.1 -p {port} -t {secs} -J"));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0);
    assert!(
        bps > 0.0,
        "iperf3 through port {port}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    bps / 1e9
}

#[test]
#[ignore = "benchmark (about a minute): tests/bench/fleet runs it"]
fn fleet_bench() {
    let _turn = weft_tests::turn::take(module_path!());
    let net = Internet::new("fb");
    let pg = LabPostgres::start(net.host("fb-pg", "203.0.113.20"), "203.0.113.20");
    let url = pg.url();
    let extra = "[limits]\nnew_connections_per_ip_per_sec = 100000\n";
    let a = FleetRelay::start(&net, "fb-ra", "relay-a", "203.0.113.2", &url, None, extra);
    let b = a.join(&net, "fb-rb", "relay-b", "203.0.113.3", extra);
    let mut c = a.join(&net, "fb-rc", "relay-c", "203.0.113.4", extra);
    a.wait_up(3, Duration::from_secs(15));

    // Part 3 first, while every relay is up and idle.
    let wn = net.host("fb-wn", "198.51.100.6");
    let wf = net.host("fb-wf", "198.51.100.7");
    let eng = net.host("fb-e", "198.51.100.8");
    let mut procs = Vec::new();
    for (ns, relay, name) in [(&wn, &a, "near"), (&wf, &b, "far")] {
        procs.push(ns.spawn_named("iperf3", "iperf3 -s -B 127.0.0.1 -p 5201"));
        let tok = token(relay, "worker").encode();
        procs.push(ns.spawn_named(
            "expose",
            &format!(
                "env WEFT_LOG=warn {} expose --token {tok} --state-dir {} --name {name} --service iperf=127.0.0.1:5201",
                relay_bin(),
                ns.file("w").display()
            ),
        ));
    }
    let etok = token(&a, "engineer").encode();
    let estate = eng.file("e").display().to_string();
    let out = eng.output(&format!(
        "{} login --token {etok} --state-dir {estate} --name bencher",
        relay_bin()
    ));
    assert!(
        out.status.success(),
        "login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for (port, name, env) in [
        (5202, "near", ""),
        (5203, "far", ""),
        (5204, "far", "WEFT_FLEET_REDIRECT=0"),
    ] {
        procs.push(eng.spawn_named(
            "forward",
            &format!(
                "env WEFT_LOG=warn {env} {} forward {port}:{name}:iperf --state-dir {estate}",
                relay_bin()
            ),
        ));
        let t = Instant::now();
        // The worker may still be connecting: wait until a short run gets through.
        while !eng
            .output(&format!("iperf3 -c 127.0.0.1 -p {port} -t 1 -J"))
            .status
            .success()
        {
            assert!(t.elapsed() < Duration::from_secs(20), "no tunnel to {name}");
            sleep(Duration::from_millis(300));
        }
    }
    let secs = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let (mut near, mut far, mut hop) = (0.0, 0.0, 0.0);
    for _ in 0..2 {
        near += iperf(&eng, 5202, secs) / 2.0;
        far += iperf(&eng, 5203, secs) / 2.0;
        hop += iperf(&eng, 5204, secs) / 2.0;
    }
    drop(procs);

    // Parts 1 and 2.
    let swarm = net.host("fb-s", "198.51.100.5");
    let mut c_proc = std::mem::replace(&mut c.proc, eng.spawn("true"));
    let mut r = simulated(swarm, [&a, &b, &c], &mut c_proc);
    // When each failover worker's tunnel session came up on another relay (their logs).
    let mut rehomed: Vec<Duration> = (0..FAILOVER_WORKERS)
        .filter_map(|i| {
            let name = format!("node=fo{i} ");
            [&a, &b]
                .iter()
                .filter_map(|x| {
                    weft_tests::logtime::logged_after(&x.proc.log(), r.killed_at, |l| {
                        l.contains("node connected") && l.contains(&name)
                    })
                })
                .min()
        })
        .collect();
    if std::env::var("FLEET_DEBUG").is_ok() {
        for x in [&a, &b] {
            let log = x.proc.log();
            let mut all: Vec<Duration> = log
                .lines()
                .filter(|l| l.contains("node connected"))
                .filter_map(|l| weft_tests::logtime::logged_after(l, r.killed_at, |_| true))
                .collect();
            eprintln!(
                "fleet bench: connections admitted by a surviving relay after the kill: {}, first {:?}, p50 {:?}, last {:?}",
                all.len(),
                pct(&mut all, 0.0),
                pct(&mut all, 0.5),
                pct(&mut all, 1.0)
            );
        }
    }
    let rows = [
        (
            format!("join through one relay -> engineers on the other two, {NODES} nodes joining (8 at a time)"),
            format!("p50 {}, p99 {}", ms(pct(&mut r.bulk, 0.5)), ms(pct(&mut r.bulk, 0.99))),
            "p99 < 1 s (must), < 200 ms (aim)".to_string(),
        ),
        (
            format!("the same, one join at a time with {NODES} nodes in the network ({STEADY_JOINS} joins)"),
            format!("p50 {}, p99 {}", ms(pct(&mut r.steady, 0.5)), ms(pct(&mut r.steady, 0.99))),
            "p99 < 1 s (must), < 200 ms (aim)".to_string(),
        ),
        (
            format!("relay killed (~{} nodes on it): first byte on a reopened tunnel ({FAILOVER_WORKERS} workers)", NODES / 3),
            format!("p50 {}, max {}", ms(pct(&mut r.failover, 0.5)), ms(pct(&mut r.failover, 1.0))),
            "p50 < 3 s".to_string(),
        ),
        (
            format!("the same workers' tunnel sessions up on another relay ({} of {FAILOVER_WORKERS} seen)", rehomed.len()),
            format!("p50 {}, max {}", ms(pct(&mut rehomed, 0.5)), ms(pct(&mut rehomed, 1.0))),
            "(idle timeout 2 s + reconnect)".to_string(),
        ),
        (
            "tunnel throughput, engineer on A -> worker on B (redirected to B: one relay) vs worker on A".to_string(),
            format!("{far:.2} vs {near:.2} Gbit/s = {:.2}x", far / near),
            "must >= 0.7x".to_string(),
        ),
        (
            "the same without redirects (A -> B peer link: two relays; old engineers, WEFT_FLEET_REDIRECT=0)".to_string(),
            format!("{hop:.2} vs {near:.2} Gbit/s = {:.2}x", hop / near),
            "(report)".to_string(),
        ),
    ];
    println!("\n| fleet: 3 relays on PostgreSQL, namespaces | measured | target |");
    println!("|---|---|---|");
    for (what, got, target) in rows {
        println!("| {what} | {got} | {target} |");
    }
    drop((a, b, c, pg));
}
