//! Ray clusters over the mesh (issue 12) end to end in network namespaces, run once as one
//! scenario: the relay (coordinator) on the simulated internet; three `worker-agent run --ray`
//! workers behind their own NAT routers, **one behind a hard NAT** (its mesh paths are
//! relayed), each with one simulated GPU from the stub NVML library (a test double, see
//! `worker-agent/tests/stub/nvml_stub.c`); a fourth worker with no Ray; a host on the head's
//! LAN; engineers alice (the owner, relay-only) and bob behind a NAT of their own. Ray is the
//! pinned `ray[default]` from the Python registry in a cached virtualenv (`weft_tests::ray`).
//!
//! What users rely on: `weft cluster up` reserves three workers and shows each step until Ray
//! reports three nodes; a Ray job sees all three overlay addresses, and a 64 MiB object made on
//! one node is read intact on another (object transfer over the mesh, relayed to the hard-NAT
//! worker); no one outside the cluster reaches its GCS or dashboard (a mesh worker outside it,
//! a host on the head's LAN); the owner, off the mesh, submits through `weft forward` with the
//! token, and another engineer cannot; bad requests are refused with why; `cluster down`
//! leaves no Ray process and frees every GPU; a member whose underlay is cut is lost in Weft
//! within 20 s.
//!
//! Binaries come from `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::agent::{agent_bin, build_nvml_stub, json, wait_agent_status};
use weft_tests::managed::{relay_token, LabRelay};
use weft_tests::router::Router;
use weft_tests::{retry, Internet, Nat, Netns, Proc};

fn until<T>(within: Duration, what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    retry(within, f).unwrap_or_else(|last| panic!("{what}: not within {within:?}; last: {last}"))
}

fn weft_bin() -> String {
    weft_tests::bin("weft").display().to_string()
}

struct Worker {
    name: &'static str,
    ns: Netns,
    router: Router,
    state: String,
    lan_ip: String,
    agent: Proc,
}

impl Worker {
    fn start(
        net: &Internet,
        relay: &LabRelay,
        spot: (&str, &'static str, Nat, &str, &str),
        seed: u32,
        ray: Option<&str>,
    ) -> Worker {
        Self::start_with(net, relay, spot, seed, ray, "")
    }

    fn start_with(
        net: &Internet,
        relay: &LabRelay,
        (tag, name, nat, wan, lan): (&str, &'static str, Nat, &str, &str),
        seed: u32,
        ray: Option<&str>,
        stub_env: &str,
    ) -> Worker {
        let router = Router::new(net, tag, nat, wan, lan);
        let ns = Netns::new(&format!("{tag}-wk"));
        let lan_ip = router.attach(&ns, "eth0");
        let stub_dir = ns.file("stub");
        std::fs::create_dir_all(&stub_dir).unwrap_or_else(|e| panic!("{e}"));
        let stub = build_nvml_stub(ns.dir());
        let state = ns.file("agent").display().to_string();
        let token = relay_token(&relay.ns, &relay.state, "worker");
        let ray = ray.map_or(String::new(), |r| format!("--ray {r}"));
        let cmd = format!(
            "env WEFT_LOG=info,worker_agent=debug,netlink_packet_route=error \
             WEFT_NVML_STUB_DIR={} WEFT_NVML_STUB_GPUS=1 WEFT_NVML_STUB_UUID_SEED={seed} {stub_env} \
             {} run --state-dir {state} --name {name} --nvml-lib {} --kill-grace-s 5 \
             --sample-ms 200 --uapi-dir {} --token {token} {ray}",
            stub_dir.display(),
            agent_bin(),
            stub.display(),
            ns.file("uapi").display()
        );
        let agent = ns.spawn_named("agent", &cmd);
        let w = Worker {
            name,
            ns,
            router,
            state,
            lan_ip,
            agent,
        };
        w.wait_joined();
        w
    }

    fn wait_joined(&self) -> Value {
        wait_agent_status(
            &self.ns,
            &self.state,
            &self.agent,
            Duration::from_secs(40),
            "agent never joined the relay and the mesh",
            |v| v["relay"]["state"] == "connected" && v["mesh"]["state"] == "joined",
        )
    }

    fn overlay_ip(&self) -> String {
        let st = self.wait_joined();
        st["mesh"]["ipv4"].as_str().unwrap_or_default().to_string()
    }
}

/// Whether a TCP connection from `ns` to `ip:port` opens within 3 s.
fn connects(ns: &Netns, ip: &str, port: u16) -> bool {
    ns.output(&format!(
        "timeout 3 bash -c 'exec 3<>/dev/tcp/{ip}/{port}' 2>/dev/null"
    ))
    .status
    .success()
}

struct Engineer<'a> {
    ns: &'a Netns,
    dir: String,
}

impl Engineer<'_> {
    fn login<'a>(ns: &'a Netns, relay: &LabRelay, name: &str) -> Engineer<'a> {
        let dir = ns.file(name).display().to_string();
        let token = relay_token(&relay.ns, &relay.state, "engineer");
        ns.exec(&format!(
            "{} login --token {token} --state-dir {dir} --name {name}",
            weft_bin()
        ));
        Engineer { ns, dir }
    }

    /// `weft SUB --state-dir DIR REST`: (success, stdout, stderr).
    fn run(&self, sub: &str, rest: &str) -> (bool, String, String) {
        let out = self.ns.output(&format!(
            "{} {sub} --state-dir {} {rest}",
            weft_bin(),
            self.dir
        ));
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, sub: &str, rest: &str) -> String {
        let (ok, out, err) = self.run(sub, rest);
        assert!(ok, "weft {sub} {rest} failed: {err}{out}");
        out
    }

    fn fails(&self, sub: &str, rest: &str) -> String {
        let (ok, out, err) = self.run(sub, rest);
        assert!(!ok, "weft {sub} {rest} should fail: {out}");
        err
    }

    fn cluster(&self, name: &str) -> Value {
        json(&self.ok("cluster", &format!("status {name} --json")))
    }

    fn pool(&self) -> Value {
        json(&self.ok("pool", "--json"))
    }
}

/// Every process whose command line names the Ray temp dir of pool job `job`.
fn ray_processes(job: u64) -> Vec<String> {
    let out = std::process::Command::new("pgrep")
        .args(["-af", &format!("weft-ray-{job}\\.")])
        .output()
        .unwrap_or_else(|e| panic!("pgrep: {e}"));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("pgrep"))
        .map(String::from)
        .collect()
}

/// `kill -9` of the relay and a new one on the same state.
fn relay_restart(relay: &mut LabRelay) {
    relay.proc.stop_with(9);
    relay.proc = LabRelay::spawn(&relay.ns, &relay.state);
}

fn free_gpus(pool: &Value, workers: &[&str]) -> bool {
    pool["workers"].as_array().is_some_and(|ws| {
        ws.iter()
            .filter(|w| workers.contains(&w["name"].as_str().unwrap_or_default()))
            .all(|w| {
                w["holders"]
                    .as_array()
                    .is_some_and(|h| h.iter().all(Value::is_null))
            })
    })
}

const JOB: &str = r#"
import hashlib, json, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy as On
ray.init()
nodes = [n for n in ray.nodes() if n["Alive"]]
@ray.remote(num_cpus=0)
def where():
    return ray.util.get_node_ip_address()
@ray.remote(num_cpus=0)
def make():
    data = bytes(range(256)) * (64 * 4096)
    return ray.put(data), hashlib.sha256(data).hexdigest()
@ray.remote(num_cpus=0)
def read(refs):
    data = ray.get(refs[0])
    return len(data), hashlib.sha256(data).hexdigest(), ray.util.get_node_ip_address()
ips = ray.get([where.options(scheduling_strategy=On(n["NodeID"], soft=False)).remote() for n in nodes])
a, b = nodes[0]["NodeID"], nodes[-1]["NodeID"]
ref, made = ray.get(make.options(scheduling_strategy=On(a, soft=False)).remote())
size, got, reader = ray.get(read.options(scheduling_strategy=On(b, soft=False)).remote([ref]))
print("RESULT " + json.dumps({"ips": sorted(ips), "made": made, "got": got, "size": size,
                              "reader": reader, "maker": nodes[0]["NodeManagerAddress"]}))
"#;

#[test]
fn weft_cluster_up_makes_one_ray_cluster_of_natted_workers() {
    let _lab = weft_tests::turn::take(module_path!());
    let ray = weft_tests::ray::ray_bin();
    let ray = ray.display().to_string();
    let net = Internet::new("rc");
    let mut relay = LabRelay::start(&net, "rc");
    let w1 = Worker::start(
        &net,
        &relay,
        (
            "rca",
            "gpu-a",
            Nat::Easy,
            "203.0.113.10/24",
            "192.0.2.32/27",
        ),
        41,
        Some(&ray),
    );
    let w2 = Worker::start(
        &net,
        &relay,
        (
            "rcb",
            "gpu-b",
            Nat::Easy,
            "203.0.113.11/24",
            "192.0.2.64/27",
        ),
        42,
        Some(&ray),
    );
    let w3 = Worker::start(
        &net,
        &relay,
        (
            "rch",
            "gpu-h",
            Nat::Hard,
            "198.51.100.10/24",
            "192.0.2.96/27",
        ),
        43,
        Some(&ray),
    );
    let outsider = Worker::start(
        &net,
        &relay,
        (
            "rco",
            "gpu-o",
            Nat::Easy,
            "203.0.113.12/24",
            "192.0.2.160/27",
        ),
        44,
        None,
    );
    let er = Router::new(&net, "rce", Nat::Easy, "198.51.100.11/24", "192.0.2.128/27");
    let eng_ns = Netns::new("rce-eng");
    er.attach(&eng_ns, "eth0");
    let alice = Engineer::login(&eng_ns, &relay, "alice");
    let bob = Engineer::login(&eng_ns, &relay, "bob");
    let members = ["gpu-a", "gpu-b", "gpu-h"];
    let ips: Vec<String> = [&w1, &w2, &w3].iter().map(|w| w.overlay_ip()).collect();

    // ---- the pool knows who runs Ray ----
    let p = until(
        Duration::from_secs(30),
        "four workers, three with Ray",
        || {
            let p = alice.pool();
            let ws = p["workers"].as_array().cloned().unwrap_or_default();
            let with_ray: Vec<&str> = ws
                .iter()
                .filter(|w| w["inventory"]["ray"] == weft_tests::ray::RAY_VERSION)
                .filter_map(|w| w["name"].as_str())
                .collect();
            if ws.len() == 4 && with_ray.len() == 3 && ws.iter().all(|w| w["state"] == "ready") {
                Ok(p)
            } else {
                Err(format!("{p:#}"))
            }
        },
    );
    let no_ray = p["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "gpu-o").cloned())
        .unwrap_or_default();
    assert!(no_ray["inventory"].get("ray").is_none(), "{no_ray:#}");

    // ---- bad requests: clear errors, nothing reserved ----
    let err = alice.fails("cluster", "up big --nodes 5 --cpus-per-node 1 --timeout 5");
    assert!(err.contains("only 3 worker(s)"), "{err}");
    let err = alice.fails("cluster", "status nosuch");
    assert!(err.contains("no cluster \"nosuch\""), "{err}");
    let err = alice.fails("cluster", "up Bad_Name --nodes 1");
    assert!(err.contains("cluster name"), "{err}");

    // ---- up: three workers, one head, every step shown ----
    let t0 = Instant::now();
    let out = alice.ok(
        "cluster",
        "up train --nodes 3 --cpus-per-node 1 --object-store-mib 200 --timeout 240",
    );
    eprintln!("cluster up took {:?}:\n{out}", t0.elapsed());
    for needle in [
        "reserved 3 worker(s)",
        "NVIDIA H100 80GB HBM3",
        "head up on",
        "3/3 joined",
        "cluster train is up",
        "weft forward 8265:",
    ] {
        assert!(out.contains(needle), "cluster up lacks {needle:?}:\n{out}");
    }
    let c = alice.cluster("train");
    let job = c["id"].as_u64().unwrap_or_default();
    assert_eq!(c["state"], "running", "{c:#}");
    let head = c["cluster"]["head_worker"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let head_ip = c["cluster"]["head_ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut got: Vec<String> = c["cluster"]["ray"]["nodes"]
        .as_array()
        .map(|n| {
            n.iter()
                .filter(|n| n["alive"] == true)
                .map(|n| n["ip"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    got.sort();
    let mut want = ips.clone();
    want.sort();
    assert_eq!(
        got, want,
        "Ray's nodes are the members' overlay addresses: {c:#}"
    );
    let err = alice.fails("cluster", "up train --nodes 1");
    assert!(err.contains("exists"), "{err}");
    let status = alice.ok("cluster", "status train");
    assert!(status.contains("ALIVE"), "{status}");
    assert!(
        status.contains("NVIDIA H100 80GB HBM3"),
        "status names the GPUs: {status}"
    );
    let list = alice.ok("cluster", "list");
    assert!(
        list.contains("train") && list.contains("3/3 alive"),
        "{list}"
    );

    // ---- a Ray job: every node's overlay address, 64 MiB across the mesh ----
    let jobdir = eng_ns.file("job");
    std::fs::create_dir_all(&jobdir).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(jobdir.join("job.py"), JOB).unwrap_or_else(|e| panic!("{e}"));
    let t1 = Instant::now();
    let out = alice.ok(
        "cluster",
        &format!(
            "submit train --ray {ray} --working-dir {} -- python job.py",
            jobdir.display()
        ),
    );
    eprintln!("ray job took {:?}", t1.elapsed());
    let line = out
        .lines()
        .find_map(|l| l.split_once("RESULT ").map(|(_, r)| r.to_string()))
        .unwrap_or_else(|| panic!("no RESULT line in the job's output:\n{out}"));
    let r = json(&line);
    let seen: Vec<String> = r["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        seen, want,
        "tasks ran on every member's overlay address: {r}"
    );
    assert_eq!(r["size"], 64 << 20, "{r}");
    assert_eq!(r["made"], r["got"], "the object arrived intact: {r}");
    assert_ne!(r["reader"], r["maker"], "it crossed nodes: {r}");

    // ---- a member's raylet dies: its agent starts Ray again and the node rejoins ----
    let (victim_rank, victim_ip) = c["members"]
        .as_array()
        .and_then(|ms| {
            ms.iter().find(|m| m["rank"] != 0).map(|m| {
                let rank = m["rank"].as_u64().unwrap_or_default();
                (
                    rank,
                    ips[members.iter().position(|w| m["worker"] == *w).unwrap_or(0)].clone(),
                )
            })
        })
        .unwrap_or_else(|| panic!("a member of rank > 0: {c:#}"));
    let attempt = c["attempt"].as_u64().unwrap_or(1);
    let raylet = format!("raylet/raylet .*weft-ray-{job}\\.{attempt}\\.{victim_rank}-");
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-f", &raylet])
        .status()
        .unwrap_or_else(|e| panic!("pkill: {e}"));
    assert!(killed.success(), "no raylet matched {raylet:?}");
    let t2 = Instant::now();
    until(
        Duration::from_secs(60),
        "the member's Ray restarted and back in the cluster",
        || {
            let c = alice.cluster("train");
            let nodes = c["cluster"]["ray"]["nodes"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let at_ip = nodes
                .iter()
                .filter(|n| n["ip"] == victim_ip.as_str())
                .count();
            let alive = nodes.iter().filter(|n| n["alive"] == true).count();
            if at_ip >= 2 && alive == 3 && c["state"] == "running" {
                Ok(())
            } else {
                Err(format!("{c:#}"))
            }
        },
    );
    eprintln!("raylet restarted and rejoined in {:?}", t2.elapsed());
    let logs = alice.ok("jobs", &format!("logs {job}"));
    assert!(
        logs.contains("restarting it"),
        "the member's log says Ray was restarted: {logs}"
    );

    // ---- nobody outside the cluster reaches its ports ----
    let w2_ns = &[&w1, &w2, &w3]
        .into_iter()
        .find(|w| w.name != head)
        .map(|w| &w.ns)
        .unwrap_or_else(|| panic!("a member that is not the head"));
    assert!(connects(w2_ns, &head_ip, 6379), "a member reaches GCS");
    assert!(
        !connects(&outsider.ns, &head_ip, 6379) && !connects(&outsider.ns, &head_ip, 8265),
        "a mesh worker outside the cluster must not reach the head's GCS or dashboard"
    );
    let head_w = [&w1, &w2, &w3]
        .into_iter()
        .find(|w| w.name == head)
        .unwrap_or_else(|| panic!("head {head} is a member"));
    let neighbour = Netns::new("rcn-lan");
    head_w.router.attach(&neighbour, "eth0");
    assert!(
        neighbour
            .output(&format!("ping -c 1 -W 2 {}", head_w.lan_ip))
            .status
            .success(),
        "the neighbour reaches the head's host"
    );
    for port in [6379, 8265, 10001, 6380, 52365] {
        assert!(
            !connects(&neighbour, &head_w.lan_ip, port),
            "a host on the head's LAN must not reach Ray's port {port}"
        );
    }

    // ---- the owner, off the mesh, through `weft forward`; another engineer cannot ----
    let token = format!("{}/clusters/train.token", alice.dir);
    let fwd = eng_ns.spawn_named(
        "forward",
        &format!(
            "{} forward 18265:{head}:ray-dashboard --state-dir {}",
            weft_bin(),
            alice.dir
        ),
    );
    assert!(eng_ns.wait_listen('t', 18265, Duration::from_secs(10)));
    let out = eng_ns.output(&format!(
        "env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} {ray} job submit \
         --address http://127.0.0.1:18265 -- python -c 'print(6*7)'"
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("42"),
        "ray job submit through weft forward: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(fwd);
    let bob_fwd = eng_ns.spawn_named(
        "forward-bob",
        &format!(
            "{} forward 18266:{head}:ray-dashboard --state-dir {}",
            weft_bin(),
            bob.dir
        ),
    );
    assert!(eng_ns.wait_listen('t', 18266, Duration::from_secs(10)));
    let out = eng_ns.output(&format!(
        "timeout 60 env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} {ray} job list \
         --address http://127.0.0.1:18266"
    ));
    assert!(
        !out.status.success(),
        "bob reached alice's dashboard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    drop(bob_fwd);
    let err = bob.fails("cluster", "down train");
    assert!(
        err.contains("no cluster"),
        "bob cannot take alice's cluster down: {err}"
    );

    // ---- the owner on the mesh: plain `ray job submit` to the head's overlay address; the
    // head's other Ray ports stay closed to it ----
    let alice_mesh = eng_ns.spawn_named(
        "alice-mesh",
        &format!(
            "env WEFT_LOG=info {} up --state-dir {} --uapi-dir {}",
            weft_bin(),
            alice.dir,
            eng_ns.file("uapi").display()
        ),
    );
    until(
        Duration::from_secs(30),
        "alice on the mesh reaches the head's dashboard",
        || {
            if connects(&eng_ns, &head_ip, 8265) {
                Ok(())
            } else {
                Err(alice_mesh.log_tail(10))
            }
        },
    );
    let out = eng_ns.output(&format!(
        "env RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} {ray} job submit \
         --address http://{head_ip}:8265 -- python -c 'print(6*7)'"
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("42"),
        "ray job submit over the mesh: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !connects(&eng_ns, &head_ip, 6379),
        "the owner reaches the dashboard and Ray Client, not GCS"
    );
    drop(alice_mesh);

    // ---- kill -9 of the relay: the cluster's record survives, and `down` still stops it ----
    relay_restart(&mut relay);
    until(
        Duration::from_secs(30),
        "the cluster is back in view",
        || {
            let (ok, out, err) = alice.run("cluster", "status train --json");
            let c = if ok { json(&out) } else { return Err(err) };
            if c["state"] == "running" && c["cluster"]["head_ip"] == head_ip.as_str() {
                Ok(())
            } else {
                Err(format!("{c:#}"))
            }
        },
    );

    // ---- down: no Ray process left, every GPU free ----
    assert!(!ray_processes(job).is_empty(), "Ray runs before `down`");
    let out = alice.ok("cluster", "down train");
    assert!(out.contains("is down"), "{out}");
    until(
        Duration::from_secs(30),
        "no Ray process of the cluster",
        || {
            let left = ray_processes(job);
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join("\n"))
            }
        },
    );
    until(Duration::from_secs(10), "every GPU free", || {
        let p = alice.pool();
        if free_gpus(&p, &members) {
            Ok(())
        } else {
            Err(format!("{p:#}"))
        }
    });
    assert_eq!(alice.cluster("train")["state"], "cancelled");
    // Ray stopped on SIGTERM, without waiting out a drain (the agents' grace is 5 s).
    for w in [&w1, &w2, &w3] {
        let log = w.agent.log();
        assert!(
            !log.contains("grace period over"),
            "{}: a Ray member needed SIGKILL to stop:\n{}",
            w.name,
            w.agent.log_tail(30)
        );
    }

    // ---- a member's underlay is cut: lost in Weft within 20 s, the cluster degraded; with
    // --replace its rank goes to the spare Ray worker, which joins; the old copy is stopped
    // when its worker comes back ----
    alice.ok(
        "cluster",
        "up again --nodes 2 --replace --cpus-per-node 1 --object-store-mib 100 --timeout 240",
    );
    let c = alice.cluster("again");
    let job2 = c["id"].as_u64().unwrap_or_default();
    let attempt2 = c["attempt"].clone();
    let rank1 = c["members"][1]["worker"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let head2 = c["members"][0]["worker"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let all = [&w1, &w2, &w3];
    let victim = all
        .into_iter()
        .find(|w| w.name == rank1)
        .unwrap_or_else(|| panic!("rank 1 of {c:#}"));
    let spare = all
        .into_iter()
        .find(|w| w.name != rank1 && w.name != head2)
        .unwrap_or_else(|| panic!("a Ray worker outside {c:#}"));
    let spare_ip = spare.overlay_ip();
    let cut = Instant::now();
    victim.router.ns().exec(
        "nft add table ip cut && \
         nft add chain ip cut block '{ type filter hook forward priority -10; policy drop; }'",
    );
    until(Duration::from_secs(20), "the cut member is lost", || {
        let p = alice.pool();
        let st = p["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["name"] == victim.name).cloned())
            .unwrap_or_default();
        if st["state"] == "lost" {
            Ok(())
        } else {
            Err(format!("{st:#}"))
        }
    });
    eprintln!("member lost after {:?}", cut.elapsed());
    let c = until(
        Duration::from_secs(90),
        "the spare took the lost rank and joined Ray",
        || {
            let c = alice.cluster("again");
            let alive: Vec<&str> = c["cluster"]["ray"]["nodes"]
                .as_array()
                .map(|ns| {
                    ns.iter()
                        .filter(|n| n["alive"] == true)
                        .filter_map(|n| n["ip"].as_str())
                        .collect()
                })
                .unwrap_or_default();
            if c["state"] == "running"
                && c["members"][1]["worker"] == spare.name
                && c["cluster"].get("vacant").is_none()
                && alive.contains(&spare_ip.as_str())
            {
                // (Ray itself still counts the cut node alive until its own node death
                // timeout, ~65 s: Weft's view is the one that moved on.)
                Ok(c.clone())
            } else {
                Err(format!("{c:#}"))
            }
        },
    );
    eprintln!("replaced and joined after {:?}", cut.elapsed());
    assert_eq!(
        c["attempt"], attempt2,
        "the cluster was not formed again: {c:#}"
    );
    let status = alice.ok("cluster", "status again");
    assert!(status.contains(spare.name), "{status}");
    // The link heals: the old copy on the victim is stopped (it is no member any more).
    victim.router.ns().exec("nft delete table ip cut");
    let on_victim = format!("-{}", victim.agent.pid());
    until(
        Duration::from_secs(60),
        "the lost member's old copy stopped",
        || {
            let left: Vec<String> = ray_processes(job2)
                .into_iter()
                .filter(|l| l.contains(&on_victim))
                .collect();
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join("\n"))
            }
        },
    );
    alice.ok("cluster", "down again");
    until(
        Duration::from_secs(40),
        "no Ray process of the second cluster",
        || {
            let left = ray_processes(job2);
            if left.is_empty() {
                Ok(())
            } else {
                Err(left.join("\n"))
            }
        },
    );

    // ---- a worker whose Ray cannot start: `up` fails with its output, the GPU is released ----
    let fake_dir = eng_ns.file("fake-ray");
    std::fs::create_dir_all(&fake_dir).unwrap_or_else(|e| panic!("{e}"));
    let fake = fake_dir.join("ray");
    std::fs::write(
        &fake,
        "#!/bin/sh\n[ \"$1\" = --version ] && { echo 'ray, version 2.60.0'; exit 0; }\n\
         echo 'fake ray: cannot start: no such luck' >&2\nexit 3\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    std::process::Command::new("chmod")
        .args(["+x", &fake.display().to_string()])
        .status()
        .unwrap_or_else(|e| panic!("{e}"));
    let broken = Worker::start_with(
        &net,
        &relay,
        (
            "rcf",
            "gpu-f",
            Nat::Easy,
            "203.0.113.13/24",
            "192.0.2.192/27",
        ),
        45,
        Some(&fake.display().to_string()),
        "WEFT_NVML_STUB_MODEL='NVIDIA L4' WEFT_NVML_STUB_MEMORY_MIB=23034",
    );
    until(Duration::from_secs(20), "the L4 worker offers Ray", || {
        let p = alice.pool();
        let ok = p["workers"].as_array().is_some_and(|ws| {
            ws.iter()
                .any(|w| w["name"] == broken.name && w["inventory"]["ray"].is_string())
        });
        if ok {
            Ok(())
        } else {
            Err(format!("{p:#}"))
        }
    });
    let err = alice.fails("cluster", "up broken --nodes 1 --gpu L4 --timeout 60");
    assert!(
        err.contains("failed") && err.contains("no such luck") && err.contains("released"),
        "a Ray that cannot start is shown with its output: {err}"
    );
    until(Duration::from_secs(10), "the L4 is free again", || {
        let p = alice.pool();
        if free_gpus(&p, &[broken.name]) {
            Ok(())
        } else {
            Err(format!("{p:#}"))
        }
    });
}
