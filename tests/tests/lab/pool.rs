//! The pool (issue 11) end to end in network namespaces, run once as one scenario (it is the
//! heavy one): the relay (coordinator) on the simulated internet; three `worker-agent run
//! --token` workers behind their own NAT routers, one of them a hard (symmetric) NAT, each with
//! a different inventory from the stub NVML library (a test double, see
//! `worker-agent/tests/stub/nvml_stub.c`): 2×A100-80GB, 4×RTX4090-24GB, 2×H100-80GB with GPU 0
//! reporting a critical XID; engineers alice and bob behind a NAT of their own, using `weft`.
//!
//! What users rely on: `weft pool` names every worker's GPUs with their health; a job lands
//! where its `--gpu` spec fits, on healthy GPUs (`CUDA_VISIBLE_DEVICES` says which); a high
//! priority job goes first but one that cannot fit holds nobody back; a gang starts on two
//! workers with its rank and address variables, and its members reach each other over the mesh
//! only while it runs; a job on a worker that dies is requeued on another within
//! `lost_after` plus 5 s; `kill -9` of the relay loses no job; bad and impossible specs are refused with why;
//! nobody but the owner cancels or reads a job; a worker cannot submit; every finished job
//! (pool or per-worker) leaves a usage record consistent with the agent's history.
//!
//! Binaries come from `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::agent::{agent_bin, build_nvml_stub, json, wait_agent_status};
use weft_tests::managed::{relay_token, LabRelay};
use weft_tests::router::Router;
use weft_tests::{retry, Internet, Nat, Netns, Proc};

/// [`retry`] that panics with `what` and the last thing seen.
pub(crate) fn until<T>(within: Duration, what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    retry(within, f).unwrap_or_else(|last| panic!("{what}: not within {within:?}; last: {last}"))
}

/// `lost_after` of the relay (the default).
const LOST_AFTER: Duration = Duration::from_secs(15);
const SIGKILL: i32 = 9;

pub(crate) fn weft_bin() -> String {
    weft_tests::bin("weft").display().to_string()
}

/// One worker: its namespace behind its router, its agent, its state.
pub(crate) struct Worker {
    pub(crate) name: &'static str,
    pub(crate) ns: Netns,
    router: Router,
    pub(crate) state: String,
    pub(crate) stub_dir: std::path::PathBuf,
    env: String,
    pub(crate) agent: Proc,
}

impl Worker {
    pub(crate) fn start(
        net: &Internet,
        relay: &LabRelay,
        (tag, name, nat, wan, lan): (&str, &'static str, Nat, &str, &str),
        inventory: &str,
    ) -> Worker {
        let router = Router::new(net, tag, nat, wan, lan);
        let ns = Netns::new(&format!("{tag}-wk"));
        router.attach(&ns, "eth0");
        let stub_dir = ns.file("stub");
        std::fs::create_dir_all(&stub_dir).unwrap_or_else(|e| panic!("{e}"));
        let stub = build_nvml_stub(ns.dir());
        let state = ns.file("agent").display().to_string();
        let token = relay_token(&relay.ns, &relay.state, "worker");
        let env = format!(
            "env WEFT_LOG=info,worker_agent=debug,netlink_packet_route=error \
             WEFT_NVML_STUB_DIR={} {inventory}",
            stub_dir.display()
        );
        let cmd = format!(
            "{env} {} run --state-dir {state} --name {name} --nvml-lib {} --kill-grace-s 1 \
             --sample-ms 100 --uapi-dir {} --token {token}",
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
            stub_dir,
            env,
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
            Duration::from_secs(30),
            "agent never joined the relay and the mesh",
            |v| v["relay"]["state"] == "connected" && v["mesh"]["state"] == "joined",
        )
    }

    /// Restarts the agent (same identity; no token needed).
    fn restart(&mut self) {
        let cmd = format!(
            "{} {} run --state-dir {} --name {} --nvml-lib {} --kill-grace-s 1 --sample-ms 100 \
             --uapi-dir {}",
            self.env,
            agent_bin(),
            self.state,
            self.name,
            self.ns.dir().join("libnvml-stub.so").display(),
            self.ns.file("uapi").display()
        );
        self.agent = self.ns.spawn_named("agent-again", &cmd);
        self.wait_joined();
    }

    pub(crate) fn overlay_ip(&self) -> String {
        let st = self.wait_joined();
        st["mesh"]["ipv4"].as_str().unwrap_or_default().to_string()
    }

    /// The agent's own record of its local job `id`.
    fn local_job(&self, id: u64) -> Value {
        let out = self.ns.output(&format!(
            "{} jobs show {id} --json --state-dir {}",
            agent_bin(),
            self.state
        ));
        json(&String::from_utf8_lossy(&out.stdout))
    }
}

/// An engineer identity (`weft login`) in `ns`.
pub(crate) struct Engineer<'a> {
    pub(crate) ns: &'a Netns,
    dir: String,
}

impl Engineer<'_> {
    pub(crate) fn login<'a>(ns: &'a Netns, relay: &LabRelay, name: &str) -> Engineer<'a> {
        let dir = ns.file(name).display().to_string();
        let token = relay_token(&relay.ns, &relay.state, "engineer");
        ns.exec(&format!(
            "{} login --token {token} --state-dir {dir} --name {name}",
            weft_bin()
        ));
        Engineer { ns, dir }
    }

    /// `weft ARGS --state-dir DIR`: (success, stdout, stderr).
    pub(crate) fn run(&self, args: &str) -> (bool, String, String) {
        let (cmd, rest) = args.split_once(' ').unwrap_or((args, ""));
        let (sub, rest) = match cmd {
            "jobs" => {
                let (s, r) = rest.split_once(' ').unwrap_or((rest, ""));
                (format!("jobs {s}"), r.to_string())
            }
            _ => (cmd.to_string(), rest.to_string()),
        };
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

    pub(crate) fn ok(&self, args: &str) -> String {
        let (ok, out, err) = self.run(args);
        assert!(ok, "weft {args} failed: {err}{out}");
        out
    }

    pub(crate) fn fails(&self, args: &str) -> String {
        let (ok, out, err) = self.run(args);
        assert!(!ok, "weft {args} should fail: {out}");
        err
    }

    pub(crate) fn submit(&self, args: &str) -> u64 {
        let out = self.ok(&format!("jobs submit {args}"));
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("submit {args}: not a job id: {out:?}"))
    }

    pub(crate) fn job(&self, id: u64) -> Value {
        json(&self.ok(&format!("jobs show {id} --json")))
    }

    pub(crate) fn pool(&self) -> Value {
        json(&self.ok("pool --json"))
    }

    pub(crate) fn wait_job(
        &self,
        id: u64,
        within: Duration,
        what: &str,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let t0 = Instant::now();
        loop {
            let j = self.job(id);
            if f(&j) {
                return j;
            }
            assert!(t0.elapsed() < within, "{what}: job {id} is {j:#}");
            sleep(Duration::from_millis(200));
        }
    }
}

fn done(j: &Value) -> bool {
    matches!(
        j["state"].as_str(),
        Some("succeeded" | "failed" | "lost" | "cancelled")
    )
}

fn workers_of(j: &Value) -> Vec<String> {
    j["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| m["worker"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn gpus_of(pool: &Value, worker: &str) -> Vec<Value> {
    pool["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == worker))
        .and_then(|w| w["inventory"]["gpus"].as_array().cloned())
        .unwrap_or_default()
}

fn can_ping(ns: &Netns, ip: &str) -> bool {
    ns.output(&format!("ping -c 1 -W 1 {ip}")).status.success()
}

#[test]
fn the_pool_places_by_requirement_across_natted_workers() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("pl");
    let mut relay = LabRelay::start(&net, "pl");
    let a100 = Worker::start(
        &net,
        &relay,
        ("pla", "a100", Nat::Easy, "203.0.113.10/24", "192.0.2.32/27"),
        "WEFT_NVML_STUB_GPUS=2 WEFT_NVML_STUB_MODEL='NVIDIA A100-SXM4-80GB' \
         WEFT_NVML_STUB_MEMORY_MIB=81920 WEFT_NVML_STUB_UUID_SEED=11",
    );
    let rtx = Worker::start(
        &net,
        &relay,
        ("plb", "rtx", Nat::Easy, "203.0.113.11/24", "192.0.2.64/27"),
        "WEFT_NVML_STUB_GPUS=4 WEFT_NVML_STUB_MODEL='NVIDIA GeForce RTX 4090' \
         WEFT_NVML_STUB_MEMORY_MIB=24564 WEFT_NVML_STUB_UUID_SEED=22",
    );
    let mut h100 = Worker::start(
        &net,
        &relay,
        (
            "plh",
            "h100",
            Nat::Hard,
            "198.51.100.10/24",
            "192.0.2.96/27",
        ),
        "WEFT_NVML_STUB_GPUS=2 WEFT_NVML_STUB_UUID_SEED=33",
    );
    // GPU 0 of the H100 worker reports a critical XID (79: fallen off the bus).
    std::fs::write(h100.stub_dir.join("xid-0"), "79").unwrap_or_else(|e| panic!("{e}"));
    let er = Router::new(&net, "ple", Nat::Easy, "198.51.100.11/24", "192.0.2.128/27");
    let eng_ns = Netns::new("ple-eng");
    er.attach(&eng_ns, "eth0");
    let alice = Engineer::login(&eng_ns, &relay, "alice");
    let bob = Engineer::login(&eng_ns, &relay, "bob");

    // ---- the pool as engineers see it: every worker with every GPU and its health ----
    let pool = until(
        Duration::from_secs(20),
        "three workers ready, the XID seen",
        || {
            let p = alice.pool();
            let ws = p["workers"].as_array().cloned().unwrap_or_default();
            let ready = ws.len() == 3 && ws.iter().all(|w| w["state"] == "ready");
            let xid = gpus_of(&p, "h100")
                .first()
                .is_some_and(|g| g["health"] == "unhealthy");
            if ready && xid {
                Ok(p)
            } else {
                Err(format!("{p:#}\nh100 agent:\n{}", h100.agent.log_tail(40)))
            }
        },
    );
    let a100_uuids: Vec<String> = gpus_of(&pool, "a100")
        .iter()
        .map(|g| g["uuid"].as_str().unwrap_or_default().to_string())
        .collect();
    let h100_gpus = gpus_of(&pool, "h100");
    let (h_bad, h_good) = (
        h100_gpus[0]["uuid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        h100_gpus[1]["uuid"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    );
    assert_eq!(a100_uuids.len(), 2, "{pool:#}");
    assert_eq!(gpus_of(&pool, "rtx").len(), 4, "{pool:#}");
    assert_eq!(h100_gpus[1]["health"], "healthy", "{pool:#}");
    let text = alice.ok("pool");
    for needle in [
        "a100",
        "NVIDIA A100-SXM4-80GB",
        "NVIDIA GeForce RTX 4090",
        "NVIDIA H100 80GB HBM3",
        "unhealthy",
        "simulated",
    ] {
        assert!(text.contains(needle), "weft pool lacks {needle:?}:\n{text}");
    }

    // ---- bad input: clear errors, nothing queued ----
    let e = alice.fails("jobs submit --gpu 80XB -- true");
    assert!(e.contains("80XB") && e.contains("column"), "{e}");
    let e = alice.fails("jobs submit --gpu 100GB.. -- true");
    assert!(
        e.contains("largest is") && e.contains("--wait-for-capacity"),
        "{e}"
    );
    // A worker's identity cannot submit.
    let out = a100.ns.output(&format!(
        "{} jobs submit --state-dir {} -- true",
        weft_bin(),
        a100.state
    ));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("may not submit"), "{e}");

    // ---- matching: 80GB..:2 on the A100 worker, an H100 job on the healthy H100 ----
    let j = alice.submit("--gpu 80GB..:2 -- sh -c 'echo gpus=$CUDA_VISIBLE_DEVICES'");
    let v = alice.wait_job(j, Duration::from_secs(20), "80GB..:2 ends", done);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert_eq!(workers_of(&v), ["a100"], "{v:#}");
    let log = alice.ok(&format!("jobs logs {j}"));
    for u in &a100_uuids {
        assert!(log.contains(u.as_str()), "{log}");
    }
    let h = alice.submit("--gpu H100:1 -- sh -c 'echo gpus=$CUDA_VISIBLE_DEVICES'");
    let v = alice.wait_job(h, Duration::from_secs(20), "H100 ends", done);
    assert_eq!(workers_of(&v), ["h100"], "{v:#}");
    let log = alice.ok(&format!("jobs logs {h}"));
    assert!(log.contains(&format!("gpus={h_good}")), "{log}");
    assert!(!log.contains(&h_bad), "the unhealthy GPU was given: {log}");

    // ---- priority: 90 jumps the queue; a 90 that cannot fit holds back no 10 that fits ----
    let blocker = alice.submit("--gpu A100:2 -- sleep 60");
    alice.wait_job(blocker, Duration::from_secs(20), "blocker runs", |v| {
        v["state"] == "running"
    });
    let low = alice.submit("--gpu A100:2 --priority 10 -- sleep 1");
    let high = alice.submit("--gpu A100:2 --priority 90 -- sleep 1");
    let stuck = alice.submit("--gpu H100:2 --priority 90 -- true");
    let small = alice.submit("--gpu RTX4090:1 --priority 10 -- true");
    let v = alice.wait_job(small, Duration::from_secs(20), "the small job runs", done);
    assert_eq!(v["state"], "succeeded", "{v:#}");
    let v = alice.job(stuck);
    assert_eq!(v["state"], "pending", "{v:#}");
    assert!(
        v["reason"].as_str().unwrap_or_default().contains("H100"),
        "{v:#}"
    );
    let v = alice.job(low);
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&format!("job {high}")),
        "the low job waits behind the high one: {v:#}"
    );
    alice.ok(&format!("jobs cancel {blocker}"));
    let hv = alice.wait_job(high, Duration::from_secs(20), "high ends", done);
    let lv = alice.wait_job(low, Duration::from_secs(20), "low ends", done);
    assert!(
        hv["started_ms"].as_u64() <= lv["started_ms"].as_u64()
            && lv["started_ms"].as_u64() >= hv["ended_ms"].as_u64(),
        "priority 90 first: {hv:#} {lv:#}"
    );
    alice.ok(&format!("jobs cancel {stuck}"));

    // ---- a gang: two workers (one behind the hard NAT), ranks, addresses, mesh reach ----
    let (ip_a, ip_h) = (a100.overlay_ip(), h100.overlay_ip());
    assert!(
        !can_ping(&a100.ns, &ip_h),
        "workers must not reach each other by default"
    );
    let g = alice.submit(
        "--nodes 2 --gpu 80GB..:1 -- sh -c 'echo rank=$WEFT_NODE_RANK n=$WEFT_NUM_NODES \
         ips=$WEFT_NODE_IPS master=$WEFT_MASTER_ADDR; sleep 60'",
    );
    let v = alice.wait_job(g, Duration::from_secs(20), "gang runs", |v| {
        v["state"] == "running"
    });
    let mut members = workers_of(&v);
    members.sort();
    assert_eq!(members, ["a100", "h100"], "{v:#}");
    let ips: Vec<String> = workers_of(&v)
        .iter()
        .map(|w| {
            if w == "a100" {
                ip_a.clone()
            } else {
                ip_h.clone()
            }
        })
        .collect();
    let log = until(Duration::from_secs(10), "both ranks logged", || {
        let l = alice.ok(&format!("jobs logs {g}"));
        if l.contains("rank=0") && l.contains("rank=1") {
            Ok(l)
        } else {
            Err(l)
        }
    });
    let want = format!("n=2 ips={} master={}", ips.join(","), ips[0]);
    assert_eq!(log.matches(&want).count(), 2, "{want} in\n{log}");
    assert!(
        log.contains("[rank 0 ") && log.contains("[rank 1 "),
        "{log}"
    );
    // Its members reach each other over the mesh (through the relay for the hard NAT)...
    until(
        Duration::from_secs(20),
        "gang members reach each other",
        || {
            can_ping(&a100.ns, &ip_h)
                .then_some(())
                .ok_or_else(|| "no reply".to_string())
        },
    );
    assert!(can_ping(&h100.ns, &ip_a));
    assert!(
        !can_ping(&rtx.ns, &ip_a),
        "a worker outside the gang stays out"
    );
    // ...another engineer can neither cancel nor read it, not even on the worker...
    let e = bob.fails(&format!("jobs cancel {g}"));
    assert!(e.contains("belongs to another engineer"), "{e}");
    let e = bob.fails(&format!("jobs logs {g}"));
    assert!(e.contains("belongs to another engineer"), "{e}");
    let local = v["members"][0]["local_id"].as_u64().unwrap_or_default();
    let first = workers_of(&v)[0].clone();
    let e = bob.fails(&format!("jobs logs {local} --worker {first}"));
    assert!(e.contains("belongs to another engineer"), "{e}");
    // ...and once it ends they are strangers again.
    alice.ok(&format!("jobs cancel {g}"));
    alice.wait_job(g, Duration::from_secs(20), "gang cancelled", done);
    until(
        Duration::from_secs(20),
        "gang members cut off again",
        || {
            (!can_ping(&a100.ns, &ip_h))
                .then_some(())
                .ok_or_else(|| "still replies".to_string())
        },
    );

    // ---- failover: the worker of a --retry 1 job dies; the job moves within lost_after + 5 s ----
    let f = alice.submit("--gpu 80GB..:1 --retry 1 -- sleep 600");
    let v = alice.wait_job(f, Duration::from_secs(20), "failover job runs", |v| {
        v["state"] == "running"
    });
    assert_eq!(
        workers_of(&v),
        ["h100"],
        "binpack: the worker with the fewest free fitting GPUs"
    );
    let killed = Instant::now();
    h100.agent.stop_with(SIGKILL);
    // Its NAT router drops everything (a link-down would also take the router's routes).
    h100.router.ns().exec(
        "nft add table ip cut && \
         nft add chain ip cut block '{ type filter hook forward priority -10; policy drop; }'",
    );
    let v = alice.wait_job(
        f,
        LOST_AFTER + Duration::from_secs(5),
        "requeued elsewhere",
        |v| v["attempt"] == 2 && workers_of(v) == ["a100"] && v["state"] == "running",
    );
    eprintln!("failover took {:?}: {v}", killed.elapsed());
    let p = alice.pool();
    let hw = p["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "h100").cloned())
        .unwrap_or_default();
    assert_eq!(hw["state"], "lost", "{p:#}");

    // ---- kill -9 of the relay loses no job ----
    let waiting = alice.submit("--gpu H100:1 -- echo after-the-restart");
    assert_eq!(alice.job(waiting)["state"], "pending");
    let before = json(&alice.ok("jobs list --json"));
    relay.proc.stop_with(SIGKILL);
    relay.proc = LabRelay::spawn(&relay.ns, &relay.state);
    let after = until(Duration::from_secs(20), "the relay answers again", || {
        let (ok, out, _) = alice.run("jobs list --json");
        if ok {
            Ok(json(&out))
        } else {
            Err(out)
        }
    });
    let ids = |v: &Value| -> Vec<(u64, String)> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|j| (j["id"].as_u64().unwrap_or_default(), j["state"].to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        ids(&before),
        ids(&after),
        "every job record survived kill -9"
    );
    // The running copy kept running on its worker and is the same attempt.
    let v = alice.wait_job(f, Duration::from_secs(20), "reconciled", |v| {
        v["state"] == "running" && v["attempt"] == 2
    });
    let local_f = v["members"][0]["local_id"].as_u64().unwrap_or_default();
    assert_eq!(a100.local_job(local_f)["state"], "running");
    // The queued job is placed once its worker is back.
    h100.router.ns().exec("nft delete table ip cut");
    h100.restart();
    let v = alice.wait_job(
        waiting,
        Duration::from_secs(30),
        "placed after the restart",
        done,
    );
    assert_eq!(v["state"], "succeeded", "{v:#}");
    assert!(alice
        .ok(&format!("jobs logs {waiting}"))
        .contains("after-the-restart"));
    alice.ok(&format!("jobs cancel {f}"));
    alice.wait_job(f, Duration::from_secs(20), "failover job cancelled", done);

    // ---- usage: one record per finished copy, consistent with the agent's history ----
    let usage = until(Duration::from_secs(10), "usage of the first job", || {
        let u = json(&alice.ok("usage --json"));
        let has = u
            .as_array()
            .is_some_and(|a| a.iter().any(|r| r["job"] == j));
        if has {
            Ok(u)
        } else {
            Err(u.to_string())
        }
    });
    let rec = usage
        .as_array()
        .and_then(|a| a.iter().find(|r| r["job"] == j).cloned())
        .unwrap_or_default();
    assert_eq!(rec["engineer"], "alice");
    assert_eq!(rec["worker"], "a100");
    assert_eq!(rec["gpu_model"], "NVIDIA A100-SXM4-80GB");
    assert_eq!(rec["outcome"], "succeeded");
    let first_job = alice.job(j);
    let local = first_job["members"][0]["local_id"]
        .as_u64()
        .unwrap_or_default();
    let lj = a100.local_job(local);
    assert_eq!(lj["started_ms"], rec["start_ms"], "{lj:#} vs {rec:#}");
    assert_eq!(lj["ended_ms"], rec["end_ms"], "{lj:#} vs {rec:#}");
    assert_eq!(
        lj["caller"], "alice",
        "the agent records the engineer as the caller"
    );
    // A per-worker job (no pool) leaves a record too: attempt 0, the agent's local id.
    let out = until(Duration::from_secs(20), "a per-worker job on rtx", || {
        let (ok, out, err) = alice.run("jobs submit --worker rtx --gpus 1 -- true");
        if ok {
            Ok(out)
        } else {
            Err(format!("{err}\nrtx agent:\n{}", rtx.agent.log_tail(30)))
        }
    });
    let local: u64 = out.trim().parse().unwrap_or_else(|_| panic!("{out}"));
    let rec = until(
        Duration::from_secs(10),
        "usage of the per-worker job",
        || {
            let u = json(&alice.ok("usage --json"));
            u.as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|r| r["worker"] == "rtx" && r["attempt"] == 0 && r["job"] == local)
                        .cloned()
                })
                .ok_or_else(|| u.to_string())
        },
    );
    assert_eq!(rec["engineer"], "alice", "{rec:#}");
    assert_eq!(rec["gpu_model"], "NVIDIA GeForce RTX 4090", "{rec:#}");
    let bob_usage = json(&bob.ok("usage --json"));
    assert_eq!(
        bob_usage,
        serde_json::json!([]),
        "bob sees only his own records"
    );
    // ---- signed usage: alice's export verifies against the relay's key; an edit is caught ----
    let relay_key = relay
        .ns
        .exec(&format!(
            "{} usage-key --state-dir {}",
            weft_tests::managed::relay_bin(),
            relay.state
        ))
        .trim()
        .to_string();
    assert!(relay_key.starts_with("ed25519:"), "{relay_key}");
    let mine = json(&alice.ok("usage --json"))
        .as_array()
        .map_or(0, Vec::len);
    for format in ["jsonl", "csv"] {
        let file = alice.ns.file(&format!("alice-usage.{format}"));
        alice.ok(&format!(
            "usage export --format {format} --output {}",
            file.display()
        ));
        let out = alice.ok(&format!(
            "usage verify {} --trust {relay_key}",
            file.display()
        ));
        // Every record in the file verifies; the file has at least the records listed before
        // (a cancelled job's last copy may end in between).
        let n: usize = out
            .split(": ")
            .nth(1)
            .and_then(|r| r.split(' ').next())
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        assert!(
            n >= mine
                && out.contains(&format!("all {n} verified"))
                && out.contains("alice's records only"),
            "every record alice has is signed by its worker and countersigned: {out}\n\
             a100 agent:\n{}",
            a100.agent.log_tail(20)
        );
    }
    let file = alice.ns.file("alice-usage.jsonl");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}"));
    let forged = text.replacen("\"outcome\":\"succeeded\"", "\"outcome\":\"failed\"", 1);
    assert_ne!(forged, text, "{text}");
    let forged_file = alice.ns.file("forged.jsonl");
    std::fs::write(&forged_file, forged).unwrap_or_else(|e| panic!("{e}"));
    let err = alice.fails(&format!("usage verify {}", forged_file.display()));
    assert!(err.contains("problem(s)"), "{err}");
    let (_, out, _) = alice.run(&format!("usage verify {}", forged_file.display()));
    assert!(out.contains("changed after it was stored"), "{out}");
    assert!(
        out.contains("signed it (its signature does not match)"),
        "{out}"
    );

    // The operator's view on the relay host lists the workers and their GPUs too.
    let op = relay.ns.exec(&format!(
        "{} pool list --state-dir {}",
        weft_tests::managed::relay_bin(),
        relay.state
    ));
    assert!(
        op.contains("NVIDIA GeForce RTX 4090") && op.contains("h100"),
        "{op}"
    );
}
