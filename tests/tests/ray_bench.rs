//! The Ray cluster benchmark (issue 12), run by `tests/bench/ray` (ignored in the test command:
//! it measures, it asserts only that things worked). In one run, on one machine:
//!
//! 1. **manual**: three hosts on the lab's internet bridge (plain veth, no NAT, no mesh), Ray
//!    started by hand with the same flags Weft uses (`ray start --head` on one, `ray start
//!    --address` on two), timed until the dashboard reports three nodes alive;
//! 2. **weft**: a relay and three `worker-agent run --ray` workers behind NAT routers (two easy, one
//!    hard), `weft cluster up --nodes 3`, timed the same way (the CLI returns when Ray reports
//!    three nodes alive);
//! 3. a 256 MiB object made on one node and read on another (the read timed inside the Ray job):
//!    manual over veth, and on the Weft cluster between two easy-NAT members (mesh direct) and to the
//!    hard-NAT member.
//!
//! Prints a markdown table with the ratios.

use std::time::{Duration, Instant};

use weft_tests::agent::{agent_bin, build_nvml_stub, json, wait_agent_status};
use weft_tests::managed::{relay_token, LabRelay};
use weft_tests::router::Router;
use weft_tests::{retry, Internet, Nat, Netns, Proc};

fn weft_bin() -> String {
    weft_tests::bin("weft").display().to_string()
}

const TRANSFER: &str = r#"
import sys, time, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init()
by_ip = {n["NodeManagerAddress"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}
maker, reader = by_ip[sys.argv[1]], by_ip[sys.argv[2]]
@ray.remote(num_cpus=0)
def make():
    return [ray.put(b"x" * (256 << 20))]
@ray.remote(num_cpus=0)
def read(refs):
    t = time.time()
    n = len(ray.get(refs[0]))
    return n, time.time() - t
refs = ray.get(make.options(scheduling_strategy=On(maker, soft=False)).remote())
n, secs = ray.get(read.options(scheduling_strategy=On(reader, soft=False)).remote(refs))
print("TRANSFER %d %.4f" % (n, secs))
"#;

fn transfer_secs(out: &str) -> f64 {
    let line = out
        .lines()
        .find(|l| l.starts_with("TRANSFER "))
        .unwrap_or_else(|| panic!("no TRANSFER line:\n{out}"));
    let mut f = line.split_whitespace().skip(1);
    let n: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    assert_eq!(n, 256 << 20, "{line}");
    f.next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

fn alive_nodes(ns: &Netns, ip: &str, token: &str) -> usize {
    let out = ns.output(&format!(
        "curl -s -m 3 -H 'Authorization: Bearer {token}' 'http://{ip}:8265/api/v0/nodes?detail=1'"
    ));
    String::from_utf8_lossy(&out.stdout)
        .matches("\"ALIVE\"")
        .count()
}

/// When each node's raylet started (Ray's `start_time_ms`), in ms since `t0_ms`, sorted.
fn node_starts(ns: &Netns, ip: &str, token: &str, t0_ms: u128) -> Vec<f64> {
    let out = ns.output(&format!(
        "curl -s -m 3 -H 'Authorization: Bearer {token}' 'http://{ip}:8265/api/v0/nodes?detail=1'"
    ));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let mut t: Vec<f64> = v["data"]["result"]["result"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .filter_map(|n| n["start_time_ms"].as_u64())
                .map(|ms| (ms as f64 - t0_ms as f64) / 1000.0)
                .collect()
        })
        .unwrap_or_default();
    t.sort_by(f64::total_cmp);
    t
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// `first / last raylet up, seen`: where a cluster's start time goes.
fn split(starts: &[f64], up: Duration) -> String {
    match (starts.first(), starts.last()) {
        (Some(a), Some(b)) => format!("{a:.1} / {b:.1} / {:.1}", up.as_secs_f64()),
        _ => format!("- / - / {:.1}", up.as_secs_f64()),
    }
}

fn agent(
    net: &Internet,
    relay: &LabRelay,
    (tag, name, nat, wan, lan): (&str, &str, Nat, &str, &str),
    seed: u32,
    ray: &str,
) -> (Router, Netns, Proc, String) {
    let router = Router::new(net, tag, nat, wan, lan);
    let ns = Netns::new(&format!("{tag}-wk"));
    router.attach(&ns, "eth0");
    let stub_dir = ns.file("stub");
    std::fs::create_dir_all(&stub_dir).unwrap_or_else(|e| panic!("{e}"));
    let stub = build_nvml_stub(ns.dir());
    let state = ns.file("agent").display().to_string();
    let token = relay_token(&relay.ns, &relay.state, "worker");
    let cmd = format!(
        "env WEFT_LOG=warn WEFT_NVML_STUB_DIR={} WEFT_NVML_STUB_GPUS=1 WEFT_NVML_STUB_UUID_SEED={seed} \
         {} run --state-dir {state} --name {name} --nvml-lib {} --uapi-dir {} --token {token} --ray {ray}",
        stub_dir.display(),
        agent_bin(),
        stub.display(),
        ns.file("uapi").display()
    );
    let p = ns.spawn_named("agent", &cmd);
    let st = wait_agent_status(
        &ns,
        &state,
        &p,
        Duration::from_secs(40),
        "agent joined",
        |v| v["relay"]["state"] == "connected" && v["mesh"]["state"] == "joined",
    );
    let ip = st["mesh"]["ipv4"].as_str().unwrap_or_default().to_string();
    (router, ns, p, ip)
}

#[test]
#[ignore = "a benchmark: tests/bench/ray"]
fn ray_cluster_bench() {
    let ray = weft_tests::ray::ray_bin().display().to_string();
    let ray_dir = std::path::Path::new(&ray)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let net = Internet::new("rb");

    // ---- 1. by hand over plain veth ----
    let tok_dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let token = "b".repeat(64);
    let tok_path = tok_dir.path().join("token");
    std::fs::write(&tok_path, &token).unwrap_or_else(|e| panic!("{e}"));
    let env = format!(
        "env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={} RAY_USAGE_STATS_ENABLED=0 PATH={ray_dir}:/usr/bin:/bin",
        tok_path.display()
    );
    let ips = ["203.0.113.21", "203.0.113.22", "203.0.113.23"];
    let hosts: Vec<Netns> = ips
        .iter()
        .enumerate()
        .map(|(i, ip)| net.host(&format!("rbm{i}"), ip))
        .collect();
    let common = |ip: &str, i: usize| {
        format!(
            "--node-ip-address={ip} --num-cpus=1 --num-gpus=1 --object-store-memory=700000000 \
             --disable-usage-stats --temp-dir=/tmp/weft-raybench-{i}-{}",
            std::process::id()
        )
    };
    let t0 = Instant::now();
    let t0_ms = unix_ms();
    let mut manual: Vec<Proc> = vec![hosts[0].spawn_named(
        "ray-head",
        &format!(
            "{env} {ray} start --block --head --port=6379 --dashboard-host={} --dashboard-port=8265 {}",
            ips[0],
            common(ips[0], 0)
        ),
    )];
    for i in 1..3 {
        manual.push(hosts[i].spawn_named(
            "ray-worker",
            &format!(
                "{env} {ray} start --block --address={}:6379 {}",
                ips[0],
                common(ips[i], i)
            ),
        ));
    }
    retry(Duration::from_secs(180), || {
        let n = alive_nodes(&hosts[0], ips[0], &token);
        if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} alive"))
        }
    })
    .unwrap_or_else(|e| panic!("manual cluster: {e}\n{}", manual[0].log_tail(30)));
    let manual_up = t0.elapsed();
    let manual_starts = node_starts(&hosts[0], ips[0], &token, t0_ms);
    let jobdir = hosts[0].file("job");
    std::fs::create_dir_all(&jobdir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(jobdir.join("t.py"), TRANSFER).unwrap_or_else(|e| panic!("{e}"));
    let submit = |ns: &Netns, addr: &str, tok: &str, a: &str, b: &str| -> f64 {
        let out = ns.output(&format!(
            "env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={tok} {ray} job submit --address {addr} \
             --working-dir {} -- python t.py {a} {b}",
            jobdir.display()
        ));
        transfer_secs(&String::from_utf8_lossy(&out.stdout))
    };
    let veth = submit(
        &hosts[0],
        &format!("http://{}:8265", ips[0]),
        &tok_path.display().to_string(),
        ips[1],
        ips[2],
    );
    drop(manual);

    // ---- 2. weft cluster up across NATs ----
    let relay = LabRelay::start(&net, "rb");
    let (_r1, n1, _a1, ip1) = agent(
        &net,
        &relay,
        (
            "rba",
            "bench-a",
            Nat::Easy,
            "203.0.113.10/24",
            "192.0.2.32/27",
        ),
        51,
        &ray,
    );
    let (_r2, n2, _a2, ip2) = agent(
        &net,
        &relay,
        (
            "rbb",
            "bench-b",
            Nat::Easy,
            "203.0.113.11/24",
            "192.0.2.64/27",
        ),
        52,
        &ray,
    );
    let (_r3, n3, _a3, ip3) = agent(
        &net,
        &relay,
        (
            "rbh",
            "bench-h",
            Nat::Hard,
            "198.51.100.10/24",
            "192.0.2.96/27",
        ),
        53,
        &ray,
    );
    let er = Router::new(&net, "rbe", Nat::Easy, "198.51.100.11/24", "192.0.2.128/27");
    let eng = Netns::new("rbe-eng");
    er.attach(&eng, "eth0");
    let dir = eng.file("alice").display().to_string();
    eng.exec(&format!(
        "{} login --token {} --state-dir {dir} --name alice",
        weft_bin(),
        relay_token(&relay.ns, &relay.state, "engineer")
    ));
    retry(Duration::from_secs(30), || {
        let out = eng.output(&format!("{} pool --json --state-dir {dir}", weft_bin()));
        let v = json(&String::from_utf8_lossy(&out.stdout));
        let n = v["workers"].as_array().map_or(0, |w| {
            w.iter()
                .filter(|w| w["inventory"]["ray"].is_string())
                .count()
        });
        if n == 3 {
            Ok(())
        } else {
            Err(format!("{v}"))
        }
    })
    .unwrap_or_else(|e| panic!("three Ray workers: {e}"));
    let t1 = Instant::now();
    let t1_ms = unix_ms();
    let out = eng.output(&format!(
        "{} cluster up bench --nodes 3 --cpus-per-node 1 --object-store-mib 700 --state-dir {dir}",
        weft_bin()
    ));
    let weft_up = t1.elapsed();
    assert!(
        out.status.success(),
        "cluster up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let weft_starts = {
        let st = json(&String::from_utf8_lossy(
            &eng.output(&format!(
                "{} cluster status bench --json --state-dir {dir}",
                weft_bin()
            ))
            .stdout,
        ));
        let head_ip = st["cluster"]["head_ip"].as_str().unwrap_or_default();
        let head_ns = [(&ip1, &n1), (&ip2, &n2), (&ip3, &n3)]
            .into_iter()
            .find(|(ip, _)| ip.as_str() == head_ip)
            .map(|(_, ns)| ns)
            .unwrap_or(&n1);
        let tok =
            std::fs::read_to_string(format!("{dir}/clusters/bench.token")).unwrap_or_default();
        node_starts(head_ns, head_ip, tok.trim(), t1_ms)
    };
    std::fs::create_dir_all(eng.file("job")).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(eng.file("job").join("t.py"), TRANSFER).unwrap_or_else(|e| panic!("{e}"));
    let weft_submit = |a: &str, b: &str| -> f64 {
        let out = eng.output(&format!(
            "{} cluster submit bench --ray {ray} --working-dir {} --state-dir {dir} -- python t.py {a} {b}",
            weft_bin(),
            eng.file("job").display()
        ));
        transfer_secs(&String::from_utf8_lossy(&out.stdout))
    };
    // The head is rank 0; read between the two easy-NAT workers, then to the hard-NAT one.
    let direct = weft_submit(&ip1, &ip2);
    let to_hard = weft_submit(&ip1, &ip3);
    eng.output(&format!(
        "{} cluster down bench --state-dir {dir}",
        weft_bin()
    ));

    let mb = 256.0;
    println!("\n| metric | weft | reference (by hand, plain veth) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| 3-node cluster up (s) | {:.1} | {:.1} | {:.2}× the manual time |",
        weft_up.as_secs_f64(),
        manual_up.as_secs_f64(),
        weft_up.as_secs_f64() / manual_up.as_secs_f64()
    );
    println!(
        "| where it goes: first raylet up / last raylet up / seen up (s) | {} | {} | |",
        split(&weft_starts, weft_up),
        split(&manual_starts, manual_up)
    );
    println!(
        "| 256 MiB object, easy ↔ easy NAT (mesh) (s, MiB/s) | {direct:.2} ({:.0}) | {veth:.2} ({:.0}) | {:.2}× veth throughput |",
        mb / direct,
        mb / veth,
        veth / direct
    );
    println!(
        "| 256 MiB object, to the hard-NAT member (s, MiB/s) | {to_hard:.2} ({:.0}) | {veth:.2} ({:.0}) | {:.2}× veth throughput |",
        mb / to_hard,
        mb / veth,
        veth / to_hard
    );
}
