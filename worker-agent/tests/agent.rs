//! End-to-end tests of the `worker-agent` binary on loopback, with the stub NVML library
//! (tests/stub/nvml_stub.c, a test double) standing in for `libnvidia-ml.so`.
//! No timing assertions: every wait is "until it happens", bounded only to fail instead of hang.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use worker_agent::agent::alive;
use worker_agent::client;
use worker_agent::job::JobState;
use worker_agent::store::Store;

const GPU0: &str = "GPU-977652fe-01d3-44cc-d3b3-996721563657";
const GPU1: &str = "GPU-5a3c1e2b-7d44-4c1d-9f00-0000000000b1";
const LIMIT: Duration = Duration::from_secs(60);

fn stub_lib() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/stub/nvml_stub.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("libnvml-stub-{}.so", std::process::id()));
        let st = Command::new("gcc")
            .args(["-shared", "-fPIC", "-O1", "-o"])
            .arg(&out)
            .arg(&src)
            .status()
            .expect("gcc is needed to build the stub libnvidia-ml.so");
        assert!(st.success(), "building the stub NVML library failed");
        out
    })
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < LIMIT, "gave up waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Agent {
    child: Option<Child>,
    dir: PathBuf,
    url: String,
    args: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl Agent {
    fn start(nvml: Option<&Path>) -> Agent {
        Self::start_with(nvml, &[])
    }

    fn start_with(nvml: Option<&Path>, extra: &[String]) -> Agent {
        Self::start_full(nvml, extra, &[])
    }

    /// The stub with these `WEFT_NVML_STUB_*` settings (see tests/stub/nvml_stub.c).
    fn start_env(env: &[(&str, &str)]) -> Agent {
        Self::start_full(None, &[], env)
    }

    fn start_full(nvml: Option<&Path>, extra: &[String], env: &[(&str, &str)]) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        std::fs::create_dir_all(dir.join("stub")).unwrap();
        let lib = nvml.map_or_else(|| stub_lib().to_path_buf(), Path::to_path_buf);
        let mut args = vec![
            "--nvml-lib".to_string(),
            lib.to_string_lossy().into_owned(),
            "--kill-grace-s=1".into(),
            "--sample-ms=100".into(),
            "--energy-s=0.3".into(),
            "--xid-window-s=2".into(),
        ];
        args.extend(extra.iter().cloned());
        let mut a = Agent {
            child: None,
            dir,
            url: String::new(),
            args,
            _tmp: Some(tmp),
        };
        a.spawn(env);
        a
    }

    fn spawn(&mut self, env: &[(&str, &str)]) {
        let _ = std::fs::remove_file(self.dir.join("state").join(worker_agent::API_ADDR_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_worker-agent"))
            .arg("run")
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(&self.args)
            .env("WEFT_NVML_STUB_DIR", self.dir.join("stub"))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let f = self.dir.join("state").join(worker_agent::API_ADDR_FILE);
        wait_until("agent writes api.url", || f.exists());
        self.url = std::fs::read_to_string(&f).unwrap().trim().to_string();
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn req(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let b = body.map(|v| v.to_string());
        let (code, out) = client::request(&self.url, method, path, b.as_deref()).unwrap();
        (
            code,
            serde_json::from_slice(&out)
                .unwrap_or(Value::String(String::from_utf8_lossy(&out).into())),
        )
    }

    fn submit(&self, spec: Value) -> u64 {
        let (code, v) = self.req("POST", "/v1/jobs", Some(&spec));
        assert_eq!(code, 201, "submit failed: {v}");
        v["id"].as_u64().unwrap()
    }

    fn job(&self, id: u64) -> Value {
        self.req("GET", &format!("/v1/jobs/{id}"), None).1
    }

    fn wait_state(&self, id: u64, state: &str) -> Value {
        let mut last = Value::Null;
        wait_until(&format!("job {id} {state}"), || {
            last = self.job(id);
            last["state"] == state
        });
        last
    }

    fn status(&self) -> Value {
        self.req("GET", "/v1/status", None).1
    }

    fn metrics(&self) -> String {
        let (_, out) = client::request(&self.url, "GET", "/metrics", None).unwrap();
        String::from_utf8(out).unwrap()
    }

    fn stub(&self, name: &str) -> PathBuf {
        self.dir.join("stub").join(name)
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_string_lossy().into_owned()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_worker-agent"))
            .args(args)
            .arg("--api")
            .arg(&self.url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cli {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temporary directory goes with the agent: show its log while it is there.
            let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default();
            eprintln!("--- the agent's log ---\n{log}--- end of the agent's log ---");
        }
        // Leave nothing behind: kill every job group the store knows, then the agent.
        if let Ok(conn) = rusqlite::Connection::open(self.dir.join("state/jobs.sqlite")) {
            if let Ok(mut st) = conn.prepare("SELECT record FROM jobs") {
                let recs: Vec<String> = st
                    .query_map([], |r| r.get(0))
                    .map(|it| it.flatten().collect())
                    .unwrap_or_default();
                for r in recs {
                    if let Some(pid) = serde_json::from_str::<Value>(&r)
                        .ok()
                        .and_then(|v| v["pid"].as_i64())
                    {
                        // SAFETY: kills a process group this test's agent created.
                        unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
                    }
                }
            }
        }
        self.kill9();
    }
}

fn waiter(a: &Agent, name: &str) -> Value {
    let f = a.file(name);
    json!([
        "sh",
        "-c",
        format!("while [ ! -f {f} ]; do sleep 0.05; done; echo released")
    ])
}

/// A raw HTTP/1.1 POST with one extra header line (the client has no way to add headers).
fn post_with_header(url: &str, path: &str, body: &str, header: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let host = url.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(host).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{header}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let code = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1.to_string();
    (code, body)
}

#[test]
fn gpu_job_sees_exactly_its_uuid_logs_stream_and_history() {
    let a = Agent::start(None);
    let spec = json!({
        "command": ["sh", "-c", "echo CVD=$CUDA_VISIBLE_DEVICES; echo NVD=$NVIDIA_VISIBLE_DEVICES; echo FOO=$FOO; sleep 0.5; echo last-line"],
        "env": {"FOO": "bar"}, "gpus": 1, "labels": {"team": "x"}
    });
    // A caller cannot claim an identity: the old interim `X-Weft-Caller` header is ignored and
    // loopback callers are recorded as `@local` (through the relay: the engineer's relay name,
    // see tests/tests/lab/agent_relay.rs).
    let body = spec.to_string();
    let (code, out) = post_with_header(&a.url, "/v1/jobs", &body, "X-Weft-Caller: alice");
    assert_eq!(code, 201, "{out}");
    let id = serde_json::from_str::<Value>(&out).unwrap()["id"]
        .as_u64()
        .unwrap();
    // Follow the log: the stream ends once the job has finished and everything was sent.
    let mut streamed = Vec::new();
    let code = client::request_to(
        &a.url,
        "GET",
        &format!("/v1/jobs/{id}/logs?follow=true"),
        None,
        &mut streamed,
    )
    .unwrap();
    assert_eq!(code, 200);
    let log = String::from_utf8(streamed).unwrap();
    let job = a.wait_state(id, "succeeded");
    let uuids: Vec<String> = serde_json::from_value(job["gpu_uuids"].clone()).unwrap();
    assert_eq!(uuids.len(), 1);
    assert!(uuids[0] == GPU0 || uuids[0] == GPU1);
    assert!(log.contains(&format!("CVD={}\n", uuids[0])), "log: {log}");
    assert!(log.contains(&format!("NVD={}\n", uuids[0])), "log: {log}");
    assert!(
        log.contains("FOO=bar\n") && log.ends_with("last-line\n"),
        "log: {log}"
    );
    assert_eq!(job["caller"], "@local");

    // A CPU job sees no GPU.
    let cpu =
        a.submit(json!({"command": ["sh", "-c", "echo CVD=[$CUDA_VISIBLE_DEVICES]; exit 3"]}));
    let j = a.wait_state(cpu, "failed");
    assert_eq!(j["exit_code"], 3);
    assert_eq!(j["caller"], "@local");
    let (_, logs) = client::request(&a.url, "GET", &format!("/v1/jobs/{cpu}/logs"), None).unwrap();
    assert_eq!(String::from_utf8(logs).unwrap(), "CVD=[]\n");

    let hist: Value = serde_json::from_str(&a.cli(&["history", "--json"])).unwrap();
    assert_eq!(hist["total_jobs"], 2);
    assert_eq!(hist["succeeded"], 1);
    assert!(hist["total_gpu_seconds"].as_f64().unwrap() > 0.0);
    assert!(a
        .cli(&["jobs", "logs", &id.to_string()])
        .contains("last-line"));
}

#[test]
fn malformed_requests_get_4xx_with_a_message() {
    let a = Agent::start(None);
    for (body, needle) in [
        (json!({"command": []}), "non-empty"),
        (json!({"comand": ["true"]}), "unknown field `comand`"),
        (
            json!({"command": ["true"], "gpus": 3}),
            "asks for 3 GPUs but this worker has 2",
        ),
        (
            json!({"command": ["true"], "env": {"CUDA_VISIBLE_DEVICES": "0"}}),
            "set by the agent",
        ),
        (json!({"command": "true"}), "invalid type"),
    ] {
        let (code, v) = a.req("POST", "/v1/jobs", Some(&body));
        assert_eq!(code, 400, "{body}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
    if !Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        // no cgroup v2 here: limits cannot be enforced, so they are refused rather than ignored
        let (code, v) = a.req(
            "POST",
            "/v1/jobs",
            Some(&json!({"command": ["true"], "memory_bytes": 1_000_000})),
        );
        assert_eq!(code, 400);
        assert!(v["error"].as_str().unwrap().contains("cgroup v2"), "{v}");
    }
    assert_eq!(a.req("GET", "/v1/jobs/999", None).0, 404);
    assert_eq!(a.req("GET", "/v1/jobs/abc", None).0, 400);
}

#[test]
fn two_gpu_jobs_run_at_once_and_a_third_queues() {
    let a = Agent::start(None);
    let ids: Vec<u64> = (1..=3)
        .map(|n| a.submit(json!({"command": waiter(&a, &format!("go{n}")), "gpus": 1})))
        .collect();
    let j1 = a.wait_state(ids[0], "running");
    let j2 = a.wait_state(ids[1], "running");
    assert_ne!(j1["gpu_uuids"], j2["gpu_uuids"]);
    assert_eq!(a.job(ids[2])["state"], "queued");
    assert_eq!(a.status()["jobs_queued"], json!([ids[2]]));
    // the job holding a GPU labels its metrics
    assert!(a.metrics().contains(&format!("job_id=\"{}\"", ids[0])));
    std::fs::write(a.file("go1"), "").unwrap();
    a.wait_state(ids[0], "succeeded");
    let j3 = a.wait_state(ids[2], "running");
    assert_eq!(j3["gpu_uuids"], j1["gpu_uuids"]);
    std::fs::write(a.file("go2"), "").unwrap();
    std::fs::write(a.file("go3"), "").unwrap();
    a.wait_state(ids[1], "succeeded");
    a.wait_state(ids[2], "succeeded");
}

#[test]
fn cancel_kills_the_whole_process_tree() {
    let a = Agent::start(None);
    let pids = a.file("pids");
    // parent + a background child + a grandchild that ignores SIGTERM (needs the SIGKILL)
    let script = format!(
        "echo $$ >> {pids}; sleep 1000 & echo $! >> {pids}; \
         sh -c 'trap \"\" TERM; echo $$ >> {pids}; sleep 1000 & echo $! >> {pids}; wait' & wait"
    );
    let id = a.submit(json!({"command": ["sh", "-c", script], "gpus": 1}));
    wait_until("4 pids written", || {
        std::fs::read_to_string(&pids)
            .map(|s| s.lines().count() >= 4)
            .unwrap_or(false)
    });
    let list: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert!(list.iter().all(|p| alive(*p)));
    let (code, _) = a.req("POST", &format!("/v1/jobs/{id}/cancel"), None);
    assert_eq!(code, 200);
    let j = a.wait_state(id, "cancelled");
    assert!(j["ended_ms"].as_u64().is_some());
    wait_until("every process of the job is gone", || {
        list.iter().all(|p| !alive(*p))
    });
    assert!(a.status()["gpu_holders"].as_object().unwrap().is_empty());
    // cancelling a queued job
    let busy: Vec<u64> = (0..2)
        .map(|n| a.submit(json!({"command": waiter(&a, &format!("b{n}")), "gpus": 1})))
        .collect();
    let q = a.submit(json!({"command": ["true"], "gpus": 1}));
    a.wait_state(busy[1], "running");
    assert_eq!(
        a.req("POST", &format!("/v1/jobs/{q}/cancel"), None).1["state"],
        "cancelled"
    );
    let out = a.cli(&["jobs", "cancel", &busy[0].to_string(), "--json"]);
    assert!(out.contains("\"state\""), "{out}");
    a.wait_state(busy[0], "cancelled");
}

#[test]
fn timeout_stops_the_job() {
    let a = Agent::start(None);
    let id = a.submit(json!({"command": ["sleep", "1000"], "timeout_s": 1}));
    let j = a.wait_state(id, "timed_out");
    let pid = j["pid"].as_u64().unwrap() as u32;
    wait_until("job process gone", || !alive(pid));
}

#[test]
fn kill9_and_restart_accounts_for_every_record() {
    let mut a = Agent::start(None);
    // 1: GPU job that finishes (exit 3) while the agent is down
    let j1 = a.submit(json!({"command": ["sh", "-c", format!("while [ ! -f {} ]; do sleep 0.05; done; exit 3", a.file("go1"))], "gpus": 1}));
    // 2: GPU job still running across the restart
    let j2 = a.submit(json!({"command": waiter(&a, "go2"), "gpus": 1}));
    // 3: queued (both GPUs busy)
    let j3 = a.submit(json!({"command": ["sh", "-c", "echo ran-after-restart"], "gpus": 1}));
    // 4: CPU job whose processes die without a trace while the agent is down
    let j4 = a.submit(json!({"command": ["sleep", "1000"]}));
    // 5: CPU job still running, whose "running" record the agent did not live to write
    let starts5 = a.file("starts5");
    let j5 = a.submit(
        json!({"command": ["sh", "-c", format!("echo started >> {starts5}; exec sleep 1000")]}),
    );
    a.wait_state(j1, "running");
    a.wait_state(j2, "running");
    let p4 = a.wait_state(j4, "running")["pid"].as_u64().unwrap() as u32;
    let p5 = a.wait_state(j5, "running")["pid"].as_u64().unwrap();
    wait_until("job 5's command starts", || {
        std::fs::read_to_string(&starts5).is_ok_and(|s| s == "started\n")
    });
    assert_eq!(a.job(j3)["state"], "queued");

    a.kill9();
    // The store writes behind: an agent killed just after a start may leave the record as it
    // was at the submit. Job 5's is rewound to that, as such a crash would leave it.
    {
        let store = Store::open(&a.dir.join("state/jobs.sqlite")).unwrap();
        let mut r5 = store.get(j5).unwrap().unwrap();
        assert_eq!(r5.state, JobState::Running);
        r5.state = JobState::Queued;
        (r5.pid, r5.pid_start, r5.started_ms) = (None, None, None);
        store.put(&r5).unwrap();
    }
    std::fs::write(a.file("go1"), "").unwrap();
    let exit1 = a.dir.join(format!("state/logs/{j1}.exit"));
    wait_until("job 1 finishes while the agent is down", || exit1.exists());
    // SAFETY: kills the process group of job 4, which this test started through the agent.
    unsafe { libc::kill(-(p4 as i32), libc::SIGKILL) };
    wait_until("job 4 gone", || !alive(p4));

    a.spawn(&[]);
    let r1 = a.wait_state(j1, "failed");
    assert_eq!(r1["exit_code"], 3);
    let r4 = a.wait_state(j4, "lost");
    assert!(
        r4["reason"].as_str().unwrap().contains("agent restarted"),
        "{r4}"
    );
    assert_eq!(a.job(j2)["state"], "running");
    // Job 5 is supervised again, not started a second time.
    let r5 = a.job(j5);
    assert_eq!(
        (&r5["state"], r5["pid"].as_u64()),
        (&json!("running"), Some(p5)),
        "{r5}"
    );
    a.wait_state(j3, "succeeded");
    let (_, log3) = client::request(&a.url, "GET", &format!("/v1/jobs/{j3}/logs"), None).unwrap();
    assert_eq!(String::from_utf8(log3).unwrap(), "ran-after-restart\n");
    std::fs::write(a.file("go2"), "").unwrap();
    a.wait_state(j2, "succeeded");
    let (code, _) = a.req("POST", &format!("/v1/jobs/{j5}/cancel"), None);
    assert_eq!(code, 200);
    a.wait_state(j5, "cancelled");
    assert!(!alive(p5 as u32));
    assert_eq!(std::fs::read_to_string(&starts5).unwrap(), "started\n");
    let all = a.req("GET", "/v1/jobs", None).1;
    assert_eq!(all.as_array().unwrap().len(), 5);
}

#[test]
fn stub_telemetry_in_metrics_and_status_unsupported_fields_absent() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let a = Agent::start_with(None, &[format!("--metrics-listen=127.0.0.1:{port}")]);
    let m = a.metrics();
    let (code, separate) =
        client::request(&format!("http://127.0.0.1:{port}"), "GET", "/metrics", None).unwrap();
    assert_eq!(code, 200);
    assert!(String::from_utf8(separate)
        .unwrap()
        .contains("weft_gpu_temperature_celsius{"));
    let l0 = format!("gpu=\"0\",uuid=\"{GPU0}\",model=\"NVIDIA H100 80GB HBM3\"");
    let l1 = format!("gpu=\"1\",uuid=\"{GPU1}\",model=\"NVIDIA H100 80GB HBM3\"");
    for line in [
        format!("weft_gpu_temperature_celsius{{{l0}}} 48"),
        format!("weft_gpu_temperature_celsius{{{l1}}} 67"),
        format!("weft_gpu_power_watts{{{l1}}} 698.337"),
        format!("weft_gpu_power_limit_watts{{{l0}}} 700"),
        format!("weft_gpu_utilization_percent{{{l1}}} 100"),
        format!("weft_gpu_memory_total_bytes{{{l0}}} 85520809984"),
        format!("weft_gpu_memory_used_bytes{{{l1}}} 1194131456"),
        format!("weft_gpu_sm_clock_mhz{{{l1}}} 1320"),
        format!("weft_gpu_throttle_reason{{{l1},reason=\"SW_POWER_CAP\"}} 1"),
        format!("weft_gpu_health{{{l0},state=\"healthy\"}} 1"),
    ] {
        assert!(m.contains(&line), "missing {line} in\n{m}");
    }
    assert!(m.contains(&format!("weft_gpu_energy_joules_total{{{l0}}} ")));
    assert!(
        !m.contains("weft_gpu_fan_speed_percent{"),
        "fan speed must be absent, not 0"
    );

    let st = a.status();
    assert_eq!(st["backend"]["state"], "ready");
    let g0 = &st["gpus"][0];
    assert_eq!(g0["uuid"], GPU0);
    assert_eq!(g0["pci_bus_id"], "00000000:00:06.0");
    assert_eq!(g0["temperature_celsius"], 48);
    assert!(g0["energy_millijoules"].as_u64().unwrap() >= 2342641);
    assert!(g0.get("fan_speed_percent").is_none() && g0.get("retired_pages").is_none());
    assert_eq!(
        st["gpus"][1]["processes"],
        json!([{"pid": 436, "used_memory_bytes": 1184890880u64}])
    );
    // Never joined a relay (no token, no relay.json): loopback only, and status says so.
    assert_eq!(st["relay"], Value::Null);
    let text = a.cli(&["status"]);
    assert!(
        text.contains(GPU1) && text.contains("power=698/700 W"),
        "{text}"
    );
    assert!(text.contains("relay: not joined"), "{text}");
}

#[test]
fn xid_makes_gpu_unhealthy_and_recovery_returns_it() {
    let a = Agent::start(None);
    std::fs::write(a.stub("xid-0"), "79").unwrap();
    let mut st = Value::Null;
    wait_until("GPU 0 unhealthy", || {
        st = a.status();
        st["gpus"][0]["health"]["state"] == "unhealthy"
    });
    assert_eq!(
        st["gpus"][0]["health"]["reasons"],
        json!(["critical XID 79"])
    );
    assert_eq!(st["gpus"][0]["xid_counts"]["79"], 1);
    assert!(a.metrics().contains(&format!("weft_gpu_xid_errors_total{{gpu=\"0\",uuid=\"{GPU0}\",model=\"NVIDIA H100 80GB HBM3\",xid=\"79\"}} 1")));
    // a job needing both GPUs waits until GPU 0 has recovered, then runs
    let id = a.submit(json!({"command": ["true"], "gpus": 2}));
    a.wait_state(id, "succeeded");
    assert_eq!(a.status()["gpus"][0]["health"]["state"], "healthy");

    std::fs::write(a.stub("lost-1"), "").unwrap();
    wait_until("GPU 1 lost", || {
        st = a.status();
        st["gpus"][1]["health"]["state"] == "unhealthy"
    });
    assert_eq!(st["gpus"][1]["uuid"], GPU1);
    assert!(st["gpus"][1]["health"]["reasons"][0]
        .as_str()
        .unwrap()
        .contains("GPU lost"));
    std::fs::remove_file(a.stub("lost-1")).unwrap();
    wait_until("GPU 1 back", || {
        a.status()["gpus"][1]["health"]["state"] == "healthy"
    });
}

fn uuids(st: &Value) -> Vec<String> {
    st["gpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["uuid"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_stub_inventory_comes_from_the_environment_and_seeds_make_the_uuids() {
    const RTX: [(&str, &str); 3] = [
        ("WEFT_NVML_STUB_GPUS", "4"),
        ("WEFT_NVML_STUB_MODEL", "NVIDIA GeForce RTX 4090"),
        ("WEFT_NVML_STUB_MEMORY_MIB", "24564"),
    ];
    let with_seed = |seed| {
        let mut env = RTX.to_vec();
        env.push(("WEFT_NVML_STUB_UUID_SEED", seed));
        Agent::start_env(&env)
    };
    let a = with_seed("box-a");
    let st = a.status();
    assert_eq!(st["backend"], json!({"state": "ready", "detail": 4}));
    assert_eq!(st["simulated"], true, "the stub says it is one: {st}");
    assert!(st["driver_version"].as_str().unwrap().contains("stub"));
    let gpus = st["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 4);
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g["index"], i);
        assert_eq!(g["name"], "NVIDIA GeForce RTX 4090");
        assert_eq!(g["memory_total_bytes"], 24564u64 * 1024 * 1024);
        assert_eq!(g["health"]["state"], "healthy");
    }
    let ua = uuids(&st);
    let mut distinct = ua.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "four different GPUs: {ua:?}");
    assert!(
        ua.iter().all(|u| u.starts_with("GPU-") && u.len() == 40),
        "{ua:?}"
    );

    // the same seed: the same UUIDs (a cloned GPU); another seed: none in common
    assert_eq!(uuids(&with_seed("box-a").status()), ua);
    let ub = uuids(&with_seed("box-b").status());
    assert!(ub.iter().all(|u| !ua.contains(u)), "{ua:?} vs {ub:?}");

    // an XID reaches exactly the GPU its file names (xid-<index>)
    std::fs::write(a.stub("xid-2"), "79").unwrap();
    let mut st = Value::Null;
    wait_until("GPU 2 unhealthy", || {
        st = a.status();
        st["gpus"][2]["health"]["state"] == "unhealthy"
    });
    for i in [0, 1, 3] {
        assert_eq!(st["gpus"][i]["health"]["state"], "healthy", "GPU {i}: {st}");
    }

    // without the knobs: today's two H100s, their fixed UUIDs
    let d = Agent::start(None);
    let st = d.status();
    assert_eq!(uuids(&st), vec![GPU0.to_string(), GPU1.to_string()]);
    assert_eq!(st["gpus"][0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(st["gpus"][0]["memory_total_bytes"], 85_520_809_984u64);
}

#[test]
fn cpu_only_agents_run_cpu_jobs_and_report_why() {
    let a = Agent::start(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
    let st = a.status();
    assert_eq!(st["backend"]["state"], "no_library");
    assert_eq!(st["gpus"], json!([]));
    let id = a.submit(json!({"command": ["sh", "-c", "echo cpu-ok"]}));
    a.wait_state(id, "succeeded");
    let (code, v) = a.req(
        "POST",
        "/v1/jobs",
        Some(&json!({"command": ["true"], "gpus": 1})),
    );
    assert_eq!(code, 400, "{v}");

    let mut b = Agent::start(None);
    b.kill9();
    b.spawn(&[("WEFT_NVML_STUB_GPUS", "0")]);
    assert_eq!(b.status()["backend"]["state"], "no_gpus");
    b.kill9();
    std::fs::write(b.stub("driver-not-loaded"), "").unwrap();
    b.spawn(&[]);
    assert_eq!(b.status()["backend"]["state"], "driver_not_loaded");
    let id = b.submit(json!({"command": ["true"]}));
    b.wait_state(id, "succeeded");
}
