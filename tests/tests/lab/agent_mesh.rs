//! The worker agent on the mesh, in network namespaces: the relay (coordinator, relay path,
//! STUN) on the simulated internet; `worker-agent run --token` on a worker behind an easy NAT
//! (stub NVML, `worker-agent/tests/stub/nvml_stub.c`, a test double), which joins the mesh
//! in-process with its relay identity; an engineer running `mesh up --token` (tag engineer);
//! a second worker running `mesh up --token` (tag worker).
//!
//! What users rely on: the worker's `status` says it is on the mesh and where its jobs API
//! listens (overlay addresses only, never a public one); the engineer submits a job over the
//! mesh (`--via mesh`, by MagicDNS name and by overlay IP, and a plain base URL) and its record names
//! the engineer's mesh name as the caller; the log is readable over the mesh; the same engineer
//! identity still works through the relay; another worker has no route to the agent at all;
//! on shutdown the agent removes its interface.
//!
//! Binaries come from `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.

use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::agent::{agent_cli, agent_ok, build_nvml_stub, json, wait_agent_status};
use weft_tests::managed::{relay_token, LabRelay, ManagedNode};
use weft_tests::{Internet, Nat, NattedWorker, Netns, Proc};

/// `mesh status --json` of weft0 in `ns`.
fn mesh_status(ns: &Netns, uapi: &str) -> Value {
    let out = ns.output(&format!(
        "{} status --json --interface weft0 --uapi-dir {uapi}",
        weft_tests::managed::mesh_bin()
    ));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// Whether a listener `IP:PORT` (as `ss` prints it) is on loopback or in the overlay pools
/// (100.64.0.0/10, fd7a:7765:6674::/48).
fn loopback_or_overlay(listener: &str) -> bool {
    let ip = listener
        .rsplit_once(':')
        .map(|(ip, _)| ip.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|ip| ip.parse::<std::net::IpAddr>().ok());
    match ip {
        Some(std::net::IpAddr::V4(v4)) => {
            v4.is_loopback() || (v4.octets()[0] == 100 && (64..128).contains(&v4.octets()[1]))
        }
        Some(std::net::IpAddr::V6(v6)) => {
            v6.is_loopback() || v6.segments()[..3] == [0xfd7a, 0x7765, 0x6674]
        }
        None => false,
    }
}

/// `worker-agent status --json` on the worker until the relay is connected and the mesh
/// joined; returns that status.
fn wait_on_mesh(worker: &Netns, wstate: &str, agent: &Proc) -> Value {
    wait_agent_status(
        worker,
        wstate,
        agent,
        Duration::from_secs(20),
        "agent never joined the mesh",
        |v| {
            assert_ne!(v["mesh"]["state"], "failed", "{v}\n{}", agent.log_tail(30));
            v["relay"]["state"] == "connected" && v["mesh"]["state"] == "joined"
        },
    )
}

#[test]
fn engineer_submits_over_the_mesh_as_its_mesh_name() {
    let _lab = weft_tests::turn::take(module_path!());
    let lab = NattedWorker::new("wam", Nat::Easy);
    let relay = LabRelay::start(&lab.net, "wam");
    let (relay_ns, rstate) = (&relay.ns, relay.state.clone());
    let (worker, eng) = (&lab.worker, lab.engineer.clone());
    let w2 = lab.net.host("wam-w2", "198.51.100.6");

    // The worker: one `worker-agent run --token`, on the relay and on the mesh.
    let stub = build_nvml_stub(worker.dir());
    let stub_dir = worker.file("stub");
    std::fs::create_dir_all(&stub_dir).unwrap_or_else(|e| panic!("{e}"));
    let wstate = worker.file("agent").display().to_string();
    let wuapi = worker.file("uapi").display().to_string();
    let wtoken = relay_token(relay_ns, &rstate, "worker");
    let mut agent = worker.spawn_named(
        "agent",
        &format!(
            "env WEFT_LOG=info,worker_agent=debug,netlink_packet_route=error WEFT_NVML_STUB_DIR={} {} run \
             --state-dir {wstate} --name gpu1 --nvml-lib {} --kill-grace-s 1 --sample-ms 100 \
             --uapi-dir {wuapi} --token {wtoken}",
            stub_dir.display(),
            weft_tests::agent::agent_bin(),
            stub.display(),
        ),
    );
    let st = wait_on_mesh(worker, &wstate, &agent);
    let mesh = &st["mesh"];
    assert_eq!(mesh["name"], "gpu1", "{st}");
    assert_eq!(mesh["interface"], "weft0", "{st}");
    let wip = mesh["ipv4"].as_str().unwrap_or_default().to_string();
    let wip6 = mesh["ipv6"].as_str().unwrap_or_default().to_string();
    assert!(wip.starts_with("100."), "{st}");
    assert_eq!(
        mesh["api"],
        serde_json::json!([format!("{wip}:7070"), format!("[{wip6}]:7070")]),
        "{st}"
    );
    // One identity: the relay and the mesh know the worker by the same name.
    assert_eq!(st["relay"]["name"], "gpu1", "{st}");
    let text = agent_ok(worker, &format!("status --state-dir {wstate}"));
    assert!(
        text.contains(&format!(
            "mesh: joined as gpu1 ({wip}, {wip6}) on weft0; jobs API on {wip}:7070"
        )),
        "{text}"
    );
    // The token is used once (by the relay exposure) and never logged.
    assert!(!agent.log().contains(&wtoken[wtoken.len() - 20..]));

    // The jobs API listens on loopback and the overlay only, never on a public address.
    let listeners = worker.exec("ss -Htln | awk '{print $4}'");
    assert!(
        listeners.contains(&format!("{wip}:7070")),
        "no overlay listener:\n{listeners}"
    );
    for l in listeners.lines() {
        assert!(
            loopback_or_overlay(l),
            "listener {l} on the worker is neither loopback nor overlay:\n{listeners}"
        );
    }

    // The engineer runs `mesh up`; so does a second worker.
    let e = ManagedNode::start(eng, &relay_token(relay_ns, &rstate, "engineer"), "alice");
    let w2n = ManagedNode::start(w2, &relay_token(relay_ns, &rstate, "worker"), "w2");
    let (eng, estate, eproc) = (&e.ns, &e.state, &e.proc);
    let (w2, w2ip) = (&w2n.ns, w2n.ip.clone());
    assert_ne!(w2ip, wip);

    // Over the mesh by MagicDNS name: the first request may wait for the peer map to arrive.
    let via = "--worker gpu1 --via mesh";
    let t0 = Instant::now();
    loop {
        let (ok, out, err) = agent_cli(eng, &format!("status --json {via}"));
        if ok {
            assert_eq!(json(&out)["mesh"]["name"], "gpu1", "{out}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the engineer never reached the agent over the mesh: {err}\nengineer:\n{}\nagent:\n{}",
            eproc.log_tail(20),
            agent.log_tail(20)
        );
        sleep(Duration::from_millis(200));
    }
    let job = json(&agent_ok(
        eng,
        &format!(
            "jobs submit {via} --gpus 1 --json -- sh -c 'echo hello-over-the-mesh; echo GPU=$CUDA_VISIBLE_DEVICES'"
        ),
    ));
    assert_eq!(job["caller"], "alice", "{job}");
    let id = job["id"].as_u64().unwrap_or_else(|| panic!("no id: {job}"));
    let log = agent_ok(eng, &format!("jobs logs {id} --follow {via}"));
    let shown = json(&agent_ok(eng, &format!("jobs show {id} --json {via}")));
    assert_eq!(shown["state"], "succeeded", "{shown}");
    assert_eq!(shown["caller"], "alice", "{shown}");
    let uuid = shown["gpu_uuids"][0].as_str().unwrap_or_default();
    assert!(uuid.starts_with("GPU-"), "{shown}");
    assert_eq!(log, format!("hello-over-the-mesh\nGPU={uuid}\n"));

    // By overlay IP: the same records.
    let list = json(&agent_ok(
        eng,
        &format!("jobs list --json --worker {wip} --via mesh"),
    ));
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|j| j["id"] == id && j["caller"] == "alice")),
        "{list}"
    );
    // Any HTTP client on the engineer's machine works too (here the CLI with a plain base URL).
    let plain = agent_ok(
        eng,
        &format!("jobs submit --api http://{wip}:7070 --json -- echo plain-http"),
    );
    let cj = json(&plain);
    assert_eq!(cj["caller"], "alice", "{cj}");

    // The engineer's mesh identity also works through the relay (the same state dir).
    let relay_list = json(&agent_ok(
        eng,
        &format!("jobs list --json --worker gpu1 --state-dir {estate}"),
    ));
    assert!(
        relay_list
            .as_array()
            .is_some_and(|l| l.iter().any(|j| j["id"] == id && j["caller"] == "alice")),
        "{relay_list}"
    );

    // The second worker: not in each other's peer maps (the default ACL lets workers open
    // nothing), so nothing routes to the agent; its request never arrives.
    let w1_key = mesh_status(worker, &wuapi)["public_key"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(!w1_key.is_empty(), "worker's mesh status has no key");
    let w2_status = w2n.status();
    let w2_peers: Vec<&str> = w2_status["peers"]
        .as_array()
        .map(|p| p.iter().filter_map(|p| p["public_key"].as_str()).collect())
        .unwrap_or_default();
    assert!(!w2_peers.is_empty(), "w2 sees no peer at all: {w2_status}");
    assert!(
        !w2_peers.contains(&w1_key.as_str()),
        "w2 has the worker as a peer: {w2_status}"
    );
    let probe = format!(
        "{{ printf 'GET /v1/status HTTP/1.0\\r\\n\\r\\n'; sleep 2; }} | timeout 5 socat -t 1 - TCP:{wip}:7070,connect-timeout=3"
    );
    // The same probe from the engineer is answered (so its silence from w2 means something).
    // stdin stays open a while: a client's early half-close lets hyper drop the connection.
    let out = eng.output(&probe);
    let ok_probe = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        ok_probe.starts_with("HTTP/1.0 200 OK"),
        "probe from the engineer: {:?} {ok_probe}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let blocked = w2.output(&probe);
    let answer = String::from_utf8_lossy(&blocked.stdout).into_owned();
    assert!(
        !blocked.status.success() && !answer.contains("HTTP/"),
        "w2 got an answer from the agent: {answer}"
    );
    let (ok, _, err) = agent_cli(w2, "jobs list --worker gpu1 --via mesh");
    assert!(!ok, "w2 reached the agent by name");
    assert!(err.contains("gpu1.weft.internal"), "{err}");
    let all = json(&agent_ok(
        worker,
        &format!("jobs list --json --state-dir {wstate}"),
    ));
    let callers: Vec<&str> = all
        .as_array()
        .map(|l| l.iter().filter_map(|j| j["caller"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(callers, vec!["alice", "alice"], "{all}");

    // Shutdown: the agent leaves the mesh and removes its interface.
    let status = agent.kill_term();
    assert!(
        status.success(),
        "agent exit: {status:?}\n{}",
        agent.log_tail(20)
    );
    assert!(!worker.has_link("weft0"), "weft0 left behind");
}

#[test]
fn without_the_mesh_the_agent_runs_relay_only_and_says_why() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("wan");
    let relay = LabRelay::start(&net, "wan");
    let (relay_ns, rstate) = (&relay.ns, relay.state.clone());
    let worker = net.host("wan-wk", "198.51.100.7");
    let wstate = worker.file("agent").display().to_string();
    let wuapi = worker.file("uapi").display().to_string();
    let run = |extra: &str, label: &str| {
        worker.spawn_named(
            label,
            &format!(
                "env WEFT_LOG=info {} run --state-dir {wstate} --name cpu1 --uapi-dir {wuapi} --kill-grace-s 1 {extra}",
                weft_tests::agent::agent_bin()
            ),
        )
    };
    let wait_relay = |agent: &Proc| -> Value {
        wait_agent_status(
            &worker,
            &wstate,
            agent,
            Duration::from_secs(20),
            "agent never settled",
            |v| {
                let settled = !matches!(
                    v["mesh"]["state"].as_str(),
                    Some("waiting_for_relay" | "joining" | "retrying")
                );
                v["relay"]["state"] == "connected" && settled
            },
        )
    };

    // --no-mesh: relay only, and status says so.
    let mut agent = run(
        &format!(
            "--no-mesh --token {}",
            relay_token(relay_ns, &rstate, "worker")
        ),
        "agent-nomesh",
    );
    let st = wait_relay(&agent);
    assert_eq!(st["mesh"]["state"], "disabled", "{st}");
    assert_eq!(st["mesh"]["reason"], "--no-mesh", "{st}");
    let text = agent_ok(&worker, &format!("status --state-dir {wstate}"));
    assert!(text.contains("mesh: not joined (--no-mesh)"), "{text}");
    assert!(!worker.has_link("weft0"));
    agent.kill_term();

    // The interface cannot be created (its name is taken by another link): the agent warns,
    // keeps serving through the relay, and status gives the reason.
    worker.exec("ip link add weft0 type veth peer name weft0p");
    let mut agent = run("", "agent-busy");
    let st = wait_relay(&agent);
    assert_eq!(st["mesh"]["state"], "failed", "{st}");
    let reason = st["mesh"]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("weft0"), "{st}");
    let text = agent_ok(&worker, &format!("status --state-dir {wstate}"));
    assert!(
        text.contains("mesh: failed: ") && text.contains("(reachable through the relay only)"),
        "{text}"
    );
    assert!(
        agent.is_running(),
        "the agent died:\n{}",
        agent.log_tail(20)
    );
    agent.kill_term();
}
