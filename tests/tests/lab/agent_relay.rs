//! The worker agent through the relay, in network namespaces: the relay on the simulated
//! internet (203.0.113.0/24); `worker-agent run --token` on a worker behind a home NAT router,
//! with the stub NVML library (two fake H100s; `worker-agent/tests/stub/nvml_stub.c`, a test
//! double); engineers on another segment (198.51.100.0/24) using `worker-agent jobs ... --worker`
//! with their `tunnel-relay login` identities.
//!
//! What users rely on: a job submitted through the relay sees exactly its GPU, its record names
//! the engineer's relay identity as the submitter (not a header, not "local"), its log streams
//! with `--follow`, cancel works; policy refusals arrive with their reason (a `guest` may reach
//! `ssh` but not `agent`; a worker may not open another worker's agent); the jobs API never
//! listens on a non-loopback address; a restart needs no token.
//!
//! Binaries come from `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::time::Duration;

use serde_json::Value;
use weft_tests::agent::{agent_cli, agent_ok, build_nvml_stub, json, wait_agent_status};
use weft_tests::managed::{relay_bin, relay_token, LabRelay, RELAY_ADDR, RELAY_IP};
use weft_tests::{retry, Nat, NattedWorker, Netns, Proc};

const GPU0: &str = "GPU-977652fe-01d3-44cc-d3b3-996721563657";
const GPU1: &str = "GPU-5a3c1e2b-7d44-4c1d-9f00-0000000000b1";

/// The relay policy: engineers reach every worker service, guests only `ssh`.
const RELAY_TOML: &str = r#"
[[policy.allow]]
from = "engineer"
to = "worker"
services = ["*"]

[[policy.allow]]
from = "guest"
to = "worker"
services = ["ssh"]
"#;

fn start_relay(ns: &Netns, state: &str, config: &str) -> Proc {
    LabRelay::spawn_with(ns, state, Some(config), "info,tunnel_relay=debug")
}

/// `worker-agent status --json` on the worker (local API) until the relay link is
/// `connected`; returns that status.
fn wait_connected(worker: &Netns, wstate: &str, agent: &Proc) -> Value {
    wait_agent_status(
        worker,
        wstate,
        agent,
        Duration::from_secs(15),
        "agent never connected to the relay",
        |v| v["relay"]["state"] == "connected",
    )
}

/// `jobs show ID --json` through the relay (`via`: `--worker W --state-dir D`).
fn show_job(eng: &Netns, id: u64, via: &str) -> Value {
    json(&agent_ok(eng, &format!("jobs show {id} --json {via}")))
}

/// [`show_job`] until the job is in `state`, at most 15 s.
fn wait_job(eng: &Netns, id: u64, via: &str, state: &str) {
    retry(Duration::from_secs(15), || {
        let j = show_job(eng, id, via);
        if j["state"] == state {
            Ok(())
        } else {
            Err(j.to_string())
        }
    })
    .unwrap_or_else(|j| panic!("job {id} never {state}: {j}"));
}

#[test]
fn jobs_through_the_relay_carry_the_engineers_identity() {
    let _lab = weft_tests::turn::take(module_path!());
    let lab = NattedWorker::new("war", Nat::Easy);
    let relay_ns = lab.net.host("war-relay", RELAY_IP);
    let (worker, eng) = (&lab.worker, &lab.engineer);

    let config = relay_ns.file("relay.toml");
    std::fs::write(&config, RELAY_TOML).unwrap_or_else(|e| panic!("write relay.toml: {e}"));
    let rstate = relay_ns.file("state").display().to_string();
    let mut relay = start_relay(&relay_ns, &rstate, &config.display().to_string());
    let wtoken = relay_token(&relay_ns, &rstate, "worker");

    // The worker: the agent joins with the token and exposes `ssh` and `agent`.
    let stub = build_nvml_stub(worker.dir());
    let stub_dir = worker.file("stub");
    std::fs::create_dir_all(&stub_dir).unwrap_or_else(|e| panic!("{e}"));
    let wstate = worker.file("agent").display().to_string();
    let run_line = |token: Option<&str>| {
        format!(
            "env WEFT_LOG=info,worker_agent=debug,tunnel_relay=debug WEFT_NVML_STUB_DIR={} {} run \
             --state-dir {wstate} --name w1 --nvml-lib {} --kill-grace-s 1 --sample-ms 100 \
             --uapi-dir {} {}",
            stub_dir.display(),
            weft_tests::agent::agent_bin(),
            stub.display(),
            worker.file("uapi").display(),
            token.map(|t| format!("--token {t}")).unwrap_or_default()
        )
    };
    let mut agent = worker.spawn_named("agent", &run_line(Some(&wtoken)));
    let st = wait_connected(worker, &wstate, &agent);
    assert_eq!(st["relay"]["name"], "w1", "{st}");
    assert_eq!(st["relay"]["relay"], RELAY_ADDR, "{st}");
    let text = agent_ok(worker, &format!("status --state-dir {wstate}"));
    assert!(
        text.contains(&format!("relay: connected to {RELAY_ADDR} as w1")),
        "{text}"
    );
    // The secret never reaches the agent's log.
    assert!(!agent.log().contains(&wtoken[wtoken.len() - 20..]));

    // The jobs API listens on loopback and (the agent is on the mesh too, see agent_mesh.rs)
    // the overlay only: never on a public address.
    let url = std::fs::read_to_string(worker.file("agent/api.url"))
        .unwrap_or_else(|e| panic!("api.url: {e}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let listeners = worker.exec("ss -Htln | awk '{print $4}'");
    for l in listeners.lines() {
        let ip = l.rsplit_once(':').map_or("", |(ip, _)| ip);
        let overlay = ip
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|v4| v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
            || ip.starts_with("[fd7a:7765:6674:");
        assert!(
            ip == "127.0.0.1" || overlay,
            "listener {l} on the worker is neither loopback nor overlay:\n{listeners}"
        );
    }

    // Engineers: alice (engineer), gina (guest), and a second worker's identity.
    let login = |name: &str, tag: &str| -> String {
        let t = relay_token(&relay_ns, &rstate, tag);
        let dir = eng.file(name).display().to_string();
        let out = eng.exec(&format!(
            "{} login --token {t} --state-dir {dir} --name {name}",
            relay_bin()
        ));
        assert!(out.contains(name) && out.contains(tag), "{out}");
        dir
    };
    let alice = login("alice", "engineer");
    let gina = login("gina", "guest");
    let w2 = login("w2", "worker");
    let via = |dir: &str| format!("--worker w1 --state-dir {dir}");

    // A GPU job that prints its environment; the log is followed through the relay.
    let submitted = json(&agent_ok(
        eng,
        &format!(
            "jobs submit {} --gpus 1 --timeout 2m --env FOO=bar --json -- \
             sh -c 'echo CVD=$CUDA_VISIBLE_DEVICES; echo NVD=$NVIDIA_VISIBLE_DEVICES; echo FOO=$FOO; sleep 1; echo last-line'",
            via(&alice)
        ),
    ));
    assert_eq!(submitted["caller"], "alice", "{submitted}");
    assert_eq!(submitted["spec"]["timeout_s"], 120, "{submitted}");
    let id = submitted["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no id: {submitted}"));
    let log = agent_ok(eng, &format!("jobs logs {id} --follow {}", via(&alice)));
    let job = show_job(eng, id, &via(&alice));
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["caller"], "alice", "{job}");
    let uuids = job["gpu_uuids"]
        .as_array()
        .unwrap_or_else(|| panic!("{job}"));
    assert_eq!(uuids.len(), 1, "{job}");
    let uuid = uuids[0].as_str().unwrap_or_default();
    assert!(uuid == GPU0 || uuid == GPU1, "{job}");
    assert_eq!(
        log,
        format!("CVD={uuid}\nNVD={uuid}\nFOO=bar\nlast-line\n"),
        "followed log"
    );

    // list, history and cancel through the relay.
    let list = json(&agent_ok(eng, &format!("jobs list --json {}", via(&alice))));
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|j| j["id"] == id && j["caller"] == "alice")),
        "{list}"
    );
    let long = json(&agent_ok(
        eng,
        &format!("jobs submit {} --json -- sleep 300", via(&alice)),
    ));
    let long_id = long["id"].as_u64().unwrap_or_else(|| panic!("{long}"));
    wait_job(eng, long_id, &via(&alice), "running");
    agent_ok(
        eng,
        &format!("jobs cancel {long_id} --json {}", via(&alice)),
    );
    wait_job(eng, long_id, &via(&alice), "cancelled");
    let hist = json(&agent_ok(eng, &format!("history --json {}", via(&alice))));
    assert!(
        hist["jobs"]
            .as_array()
            .is_some_and(|h| h.iter().any(|e| e["id"] == id && e["caller"] == "alice")),
        "{hist}"
    );

    // A local caller on the worker is `@local`, whatever it claims.
    let local = json(&agent_ok(
        worker,
        &format!("jobs submit --state-dir {wstate} --json -- true"),
    ));
    assert_eq!(local["caller"], "@local", "{local}");

    // Refusals, with the relay's reason: a guest may not open `agent` (policy allows it `ssh`
    // only); a worker may not open another worker's agent; an unknown worker does not exist.
    for (who, dir) in [("guest", &gina), ("worker", &w2)] {
        let (ok, out, err) = agent_cli(eng, &format!("jobs list --json {}", via(dir)));
        assert!(!ok, "{who} reached the agent: {out}");
        assert!(
            err.contains("not allowed by policy") && err.contains("w1"),
            "{who}: {err}"
        );
    }
    let (ok, _, err) = agent_cli(eng, &format!("jobs list --worker nope --state-dir {alice}"));
    assert!(!ok && err.contains("nope"), "{err}");

    // The relay dies hard: `status` shows the agent reconnecting, with why; once the relay is
    // back, connected again, and engineers reach it.
    relay.signal(libc::SIGKILL);
    relay.wait_timeout(Duration::from_secs(5));
    let st = retry(Duration::from_secs(15), || {
        let st = json(&agent_ok(
            worker,
            &format!("status --json --state-dir {wstate}"),
        ));
        if st["relay"]["state"] == "reconnecting" {
            Ok(st)
        } else {
            Err(st.to_string())
        }
    })
    .unwrap_or_else(|st| panic!("agent never noticed the relay was gone: {st}"));
    assert!(
        st["relay"]["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{st}"
    );
    let text = agent_ok(worker, &format!("status --state-dir {wstate}"));
    assert!(text.contains("relay: reconnecting in"), "{text}");
    let mut relay = start_relay(&relay_ns, &rstate, &config.display().to_string());
    wait_connected(worker, &wstate, &agent);
    let job = show_job(eng, id, &via(&alice));
    assert_eq!(job["state"], "succeeded", "{job}");

    // The agent restarts without a token: the identity in its state dir is enough, and the
    // records are still there.
    agent.kill_term();
    let agent = worker.spawn_named("agent2", &run_line(None));
    wait_connected(worker, &wstate, &agent);
    let job = show_job(eng, id, &via(&alice));
    assert_eq!(job["caller"], "alice", "{job}");
    relay.kill_term();
}
