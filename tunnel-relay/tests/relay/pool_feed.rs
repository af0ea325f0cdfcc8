//! The pool wired into the relay, on loopback: a real relay (`Relay::run`), workers that speak
//! the pool feed through `expose`'s in-process handler (`@pool`, as the worker agent does),
//! engineers speaking the pool API over `Message::Api` streams (HTTP/1.1 written by hand
//! here, so the test does not share the CLI's client). What users rely on: a job lands on
//! the worker whose GPUs fit, with exactly those GPUs and the gang variables; its end leaves
//! one usage record; bad specs and strangers are refused with clear messages; the queue and
//! its records survive a relay restart.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tunnel_relay::client::{self, ExposeOptions, IncomingStream};
use tunnel_relay::wire::{read_message, write_message, Message};
use tunnel_relay::RelayConfig;
use weft_proto::pool::{
    decode_line, encode_line, AgentMsg, CoordMsg, Ended, GpuInfo, Inventory, JobCopy, Start,
    UsageRecord, POOL_CALLER, POOL_SERVICE,
};
use weft_proto::usage::{self, Export, Signer, WorkerClaim};

use crate::relay_lab;
use relay_lab::{start_relay, start_relay_in, tmp, RelayLab};

const WAIT: Duration = Duration::from_secs(10);

/// A worker that speaks the pool feed by hand.
pub(crate) struct FakeAgent {
    from_relay: mpsc::Receiver<CoordMsg>,
    to_relay: mpsc::Sender<AgentMsg>,
    _stop: oneshot::Sender<()>,
}

pub(crate) fn gpus(prefix: &str, model: &str, mib: u64, n: usize) -> Vec<GpuInfo> {
    (0..n)
        .map(|i| GpuInfo {
            uuid: format!("GPU-{prefix}-{i}"),
            model: model.into(),
            memory_mib: mib,
            health: "healthy".into(),
            job: None,
        })
        .collect()
}

pub(crate) fn inventory(gpus: Vec<GpuInfo>, running: Vec<JobCopy>) -> Inventory {
    Inventory {
        gpus,
        cpus: 8,
        memory_bytes: 64 << 30,
        version: "test".into(),
        simulated: true,
        running,
        ray: None,
        ray_heads: vec![],
        usage_key: None,
    }
}

/// A worker joined with a fresh identity in `dir` (a token is made for it), or the
/// identity already there (`rejoin`).
pub(crate) async fn agent(
    lab: &RelayLab,
    name: &str,
    dir: &Path,
    rejoin: bool,
    inv: Inventory,
) -> FakeAgent {
    let token = (!rejoin).then(|| lab.token("worker", None, Some(1)));
    agent_with(name, dir, token, inv).await
}

/// A worker joined with `token` (none: the identity already in `dir`).
pub(crate) async fn agent_with(
    name: &str,
    dir: &Path,
    token: Option<tunnel_relay::Token>,
    inv: Inventory,
) -> FakeAgent {
    let (tx, mut rx) = mpsc::channel::<IncomingStream>(4);
    let mut opts = ExposeOptions::new(dir.to_path_buf(), name.into(), Vec::new());
    opts.token = token;
    opts.handlers.insert(POOL_SERVICE.into(), tx);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(client::expose(opts, async {
        let _ = stopped.await;
    }));
    let inc = tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{name}: the relay never opened the pool feed"))
        .unwrap_or_else(|| panic!("{name}: expose ended"));
    assert_eq!(
        inc.from, POOL_CALLER,
        "the feed is opened by the coordinator"
    );
    assert_eq!(inc.service, POOL_SERVICE);
    let IncomingStream { mut send, recv, .. } = inc;
    let (in_tx, from_relay) = mpsc::channel(64);
    let (to_relay, mut out_rx) = mpsc::channel::<AgentMsg>(64);
    tokio::spawn(async move {
        let mut lines = BufReader::new(recv).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let m: CoordMsg = decode_line(l.as_bytes()).unwrap_or_else(|e| panic!("{e}: {l}"));
            if let CoordMsg::Telemetry { every_ms } = m {
                // Asked once per feed; this fake agent sends no readings unless a test does.
                assert_eq!(every_ms, 5_000);
                continue;
            }
            if in_tx.send(m).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if send.write_all(&encode_line(&m)).await.is_err() {
                return;
            }
        }
    });
    to_relay
        .send(AgentMsg::Inventory(inv))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    FakeAgent {
        from_relay,
        to_relay,
        _stop: stop,
    }
}

impl FakeAgent {
    pub(crate) async fn next(&mut self, what: &str) -> CoordMsg {
        tokio::time::timeout(WAIT, self.from_relay.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: nothing from the relay"))
            .unwrap_or_else(|| panic!("{what}: feed closed"))
    }
    pub(crate) async fn start(&mut self) -> Start {
        match self.next("start").await {
            CoordMsg::Start(s) => s,
            other => panic!("expected a start, got {other:?}"),
        }
    }
    pub(crate) async fn send(&self, m: AgentMsg) {
        self.to_relay
            .send(m)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

/// An engineer (or any node) identity joined with a token of `tag`.
pub(crate) async fn identity(lab: &RelayLab, tag: &str, name: &str) -> tempfile::TempDir {
    let dir = tmp();
    let tok = lab.token(tag, None, Some(1));
    client::login(dir.path(), &tok, name)
        .await
        .unwrap_or_else(|e| panic!("login {name}: {e}"));
    dir
}

/// One HTTP/1.1 exchange on a pool API stream: (status, JSON body).
pub(crate) async fn api(dir: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let s = client::session(dir)
        .await
        .unwrap_or_else(|e| panic!("session: {e}"));
    let (mut send, mut recv) = s
        .connection()
        .open_bi()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    write_message(&mut send, &Message::Api)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    match read_message(&mut recv).await {
        Ok(Message::OpenOk) => {}
        other => panic!("pool API stream: {other:?}"),
    }
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    send.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let resp = recv
        .read_to_end(1 << 24)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    s.close().await;
    let text = String::from_utf8(resp).unwrap_or_else(|e| panic!("{e}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {text:?}"));
    let code: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head:?}"));
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "JSON answers carry a length"
    );
    let v = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    (code, v)
}

pub(crate) async fn submit(dir: &Path, body: &str) -> (u16, Value) {
    api(dir, "POST", "/v1/pool/jobs", Some(body)).await
}

fn err_text(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

/// Polls the job until `f` holds.
async fn job_until(dir: &Path, id: u64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let t0 = std::time::Instant::now();
    loop {
        let (code, v) = api(dir, "GET", &format!("/v1/pool/jobs/{id}"), None).await;
        assert_eq!(code, 200, "{v}");
        if f(&v) {
            return v;
        }
        assert!(t0.elapsed() < WAIT, "{what}: job is {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) fn ended(s: &Start, local_id: u64, state: &str, exit_code: i32) -> AgentMsg {
    AgentMsg::Ended(Ended {
        copy: JobCopy {
            pool_job: s.pool_job,
            attempt: s.attempt,
            local_id,
        },
        state: state.into(),
        exit_code: Some(exit_code),
        started_ms: Some(1_000),
        ended_ms: 3_000,
        gpus: s.gpus.clone(),
        owner: None,
        usage: None,
    })
}

pub(crate) fn started(s: &Start, local_id: u64) -> AgentMsg {
    AgentMsg::Started {
        copy: JobCopy {
            pool_job: s.pool_job,
            attempt: s.attempt,
            local_id,
        },
        started_ms: 1_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_lands_where_its_gpus_fit_and_leaves_one_usage_record() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (d1, d2) = (tmp(), tmp());
    let mut a100 = agent(
        &lab,
        "gpu1",
        d1.path(),
        false,
        inventory(gpus("a", "NVIDIA A100-SXM4-80GB", 81920, 2), vec![]),
    )
    .await;
    let _rtx = agent(
        &lab,
        "gpu2",
        d2.path(),
        false,
        inventory(gpus("r", "NVIDIA GeForce RTX 4090", 24564, 4), vec![]),
    )
    .await;
    let alice = identity(&lab, "engineer", "alice").await;
    let bob = identity(&lab, "engineer", "bob").await;
    let worker = identity(&lab, "worker", "gpu9").await;

    // Both workers are in the pool with their GPUs.
    let t0 = std::time::Instant::now();
    let pool = loop {
        let (code, v) = api(alice.path(), "GET", "/v1/pool", None).await;
        assert_eq!(code, 200, "{v}");
        if v["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["state"] == "ready"))
        {
            break v;
        }
        assert!(t0.elapsed() < WAIT, "workers never ready: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        pool["workers"][0]["inventory"]["gpus"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    assert_eq!(pool["policy"], "binpack");

    // 80GB..:2 goes to the A100 worker, on both its GPUs, as alice.
    let (code, v) = submit(
        alice.path(),
        r#"{"command":["train"],"gpu":"80GB..:2","env":{"A":"1"}}"#,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_u64().unwrap_or_else(|| panic!("{v}"));
    let s = a100.start().await;
    assert_eq!(s.pool_job, id);
    assert_eq!(s.attempt, 1);
    assert_eq!(s.owner, "alice");
    assert_eq!(s.command, ["train"]);
    let mut g = s.gpus.clone();
    g.sort();
    assert_eq!(g, ["GPU-a-0", "GPU-a-1"]);
    let env: &BTreeMap<String, String> = &s.env;
    assert_eq!(env["A"], "1");
    assert_eq!(env["WEFT_NODE_RANK"], "0");
    assert_eq!(env["WEFT_NUM_NODES"], "1");
    assert_eq!(env["WEFT_POOL_JOB"], id.to_string());
    a100.send(started(&s, 41)).await;
    let v = job_until(alice.path(), id, "running", |v| v["state"] == "running").await;
    assert_eq!(v["members"][0]["worker"], "gpu1");
    assert_eq!(v["members"][0]["local_id"], 41);

    // Another engineer can neither see nor cancel it; a worker cannot submit.
    let (code, v) = api(bob.path(), "GET", &format!("/v1/pool/jobs/{id}"), None).await;
    assert_eq!(
        (code, err_text(&v)),
        (403, format!("job {id} belongs to another engineer"))
    );
    let (code, _) = api(
        bob.path(),
        "POST",
        &format!("/v1/pool/jobs/{id}/cancel"),
        Some(""),
    )
    .await;
    assert_eq!(code, 403);
    let (code, v) = submit(worker.path(), r#"{"command":["x"]}"#).await;
    assert_eq!(code, 403, "{v}");
    assert!(err_text(&v).contains("may not submit"), "{v}");
    // In bob's view of the pool alice's job shows where it runs, not what it runs.
    let (_, v) = api(bob.path(), "GET", "/v1/pool", None).await;
    assert_eq!(v["queue"][0]["id"], id);
    assert_eq!(v["queue"][0]["request"]["command"], serde_json::json!([]));

    // Bad specs: clear errors, nothing queued.
    let (code, v) = submit(alice.path(), r#"{"command":["x"],"gpu":"80XB"}"#).await;
    assert_eq!(code, 400, "{v}");
    assert!(err_text(&v).contains("--gpu 80XB"), "{v}");
    assert!(err_text(&v).contains("XB"), "{v}");
    let (code, v) = submit(alice.path(), r#"{"command":["x"],"gpu":"H100"}"#).await;
    assert_eq!(code, 422, "{v}");
    assert!(err_text(&v).contains("--wait-for-capacity"), "{v}");
    let (code, v) = submit(
        alice.path(),
        r#"{"command":["x"],"gpus":1,"frobnicate":true}"#,
    )
    .await;
    assert_eq!(code, 400, "{v}");
    assert!(err_text(&v).contains("frobnicate"), "{v}");

    // A second 2-GPU A100 job waits, saying why.
    let (code, v) = submit(alice.path(), r#"{"command":["next"],"gpu":"A100:2"}"#).await;
    assert_eq!(code, 201, "{v}");
    let next = v["id"].as_u64().unwrap_or_default();
    let v = job_until(alice.path(), next, "reason", |v| v["reason"].is_string()).await;
    assert_eq!(v["reason"], "no free A100:2", "{v}");

    // The first ends: one usage record (a replayed end is not counted twice), acked,
    // and the waiting job takes the GPUs.
    a100.send(ended(&s, 41, "succeeded", 0)).await;
    a100.send(ended(&s, 41, "succeeded", 0)).await;
    match a100.next("ack").await {
        CoordMsg::Ack {
            pool_job,
            attempt,
            local_id,
        } => assert_eq!((pool_job, attempt, local_id), (id, 1, None)),
        other => panic!("{other:?}"),
    }
    let s2 = loop {
        match a100.next("second start").await {
            CoordMsg::Start(s) => break s,
            CoordMsg::Ack { .. } => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(s2.pool_job, next);
    job_until(alice.path(), id, "succeeded", |v| v["state"] == "succeeded").await;
    let (code, v) = api(alice.path(), "GET", "/v1/pool/usage?since=0", None).await;
    assert_eq!(code, 200, "{v}");
    let recs = v.as_array().cloned().unwrap_or_default();
    assert_eq!(recs.len(), 1, "{v}");
    assert_eq!(recs[0]["job"], id);
    assert_eq!(recs[0]["engineer"], "alice");
    assert_eq!(recs[0]["worker"], "gpu1");
    assert_eq!(recs[0]["gpu_model"], "NVIDIA A100-SXM4-80GB");
    assert_eq!(recs[0]["gpu_seconds"], 4.0, "2 GPUs x 2 s");
    assert_eq!(recs[0]["outcome"], "succeeded");
    let (_, v) = api(bob.path(), "GET", "/v1/pool/usage?since=0", None).await;
    assert_eq!(v, serde_json::json!([]), "bob sees only his own records");

    // A per-worker job (submitted to the agent, not the pool) leaves a record too: attempt 0,
    // the agent's local id, the caller it names; acked by its local id.
    a100.send(AgentMsg::Ended(Ended {
        copy: JobCopy {
            pool_job: 0,
            attempt: 0,
            local_id: 77,
        },
        state: "succeeded".into(),
        exit_code: Some(0),
        started_ms: Some(10_000),
        ended_ms: 13_000,
        gpus: vec!["GPU-a-1".into()],
        owner: Some("bob".into()),
        usage: None,
    }))
    .await;
    loop {
        match a100.next("ack of the per-worker job").await {
            CoordMsg::Ack {
                local_id: Some(l),
                pool_job,
                attempt,
            } => {
                assert_eq!((pool_job, attempt, l), (0, 0, 77));
                break;
            }
            CoordMsg::Ack { .. } | CoordMsg::Start(_) => continue,
            other => panic!("{other:?}"),
        }
    }
    let (_, v) = api(bob.path(), "GET", "/v1/pool/usage?since=0", None).await;
    let recs = v.as_array().cloned().unwrap_or_default();
    assert_eq!(recs.len(), 1, "{v}");
    assert_eq!(
        (recs[0]["job"].as_u64(), recs[0]["attempt"].as_u64()),
        (Some(77), Some(0))
    );
    assert_eq!(recs[0]["gpu_model"], "NVIDIA A100-SXM4-80GB");
    assert_eq!(recs[0]["gpu_seconds"], 3.0);

    // Cancel the second: the worker is told to stop exactly that attempt.
    let (code, v) = api(
        alice.path(),
        "POST",
        &format!("/v1/pool/jobs/{next}/cancel"),
        Some(""),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["state"], "cancelled");
    loop {
        match a100.next("stop").await {
            CoordMsg::Stop { pool_job, attempt } => {
                assert_eq!((pool_job, attempt), (next, Some(1)));
                break;
            }
            // The replayed end is acked again (so the agent stops replaying it).
            CoordMsg::Ack { pool_job, .. } => assert_eq!(pool_job, id),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gang_gets_ranks_and_a_failed_member_stops_and_requeues_it() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (d1, d2) = (tmp(), tmp());
    let mut w1 = agent(
        &lab,
        "w1",
        d1.path(),
        false,
        inventory(gpus("1", "NVIDIA H100 80GB HBM3", 81559, 1), vec![]),
    )
    .await;
    let mut w2 = agent(
        &lab,
        "w2",
        d2.path(),
        false,
        inventory(gpus("2", "NVIDIA H100 80GB HBM3", 81559, 1), vec![]),
    )
    .await;
    let alice = identity(&lab, "engineer", "alice").await;
    let (code, v) = submit(
        alice.path(),
        r#"{"command":["dist"],"gpu":"H100:1","nodes":2,"retries":1}"#,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_u64().unwrap_or_default();
    let (a, b) = (w1.start().await, w2.start().await);
    let mut ranks = [
        a.env["WEFT_NODE_RANK"].clone(),
        b.env["WEFT_NODE_RANK"].clone(),
    ];
    ranks.sort();
    assert_eq!(ranks, ["0", "1"]);
    assert_eq!(a.env["WEFT_NUM_NODES"], "2");
    assert_eq!(
        a.env["WEFT_NODE_IPS"], b.env["WEFT_NODE_IPS"],
        "every member gets the same list"
    );
    w1.send(started(&a, 1)).await;
    w2.send(started(&b, 1)).await;
    job_until(alice.path(), id, "running", |v| v["state"] == "running").await;
    // One member fails: the other is stopped, and the gang is placed again (attempt 2).
    w1.send(ended(&a, 1, "failed", 3)).await;
    let stop = loop {
        match w2.next("stop of the other member").await {
            CoordMsg::Stop { pool_job, attempt } => break (pool_job, attempt),
            CoordMsg::Ack { .. } => continue,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(stop, (id, Some(1)));
    // w2 reports its copy cancelled; then both get attempt 2.
    w2.send(ended(&b, 1, "cancelled", 143)).await;
    let next = |m: CoordMsg| match m {
        CoordMsg::Start(s) => Some(s),
        _ => None,
    };
    let mut a2 = None;
    while a2.is_none() {
        a2 = next(w1.next("w1 attempt 2").await);
    }
    let mut b2 = None;
    while b2.is_none() {
        b2 = next(w2.next("w2 attempt 2").await);
    }
    assert_eq!(a2.map(|s| s.attempt), Some(2));
    assert_eq!(b2.map(|s| s.attempt), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_survives_a_relay_restart_and_stale_copies_are_stopped() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let wdir = tmp();
    let mut w = agent(
        &lab,
        "w",
        wdir.path(),
        false,
        inventory(gpus("w", "NVIDIA A100-SXM4-80GB", 81920, 1), vec![]),
    )
    .await;
    let alice = identity(&lab, "engineer", "alice").await;
    let (_, v) = submit(alice.path(), r#"{"command":["one"],"gpus":1}"#).await;
    let first = v["id"].as_u64().unwrap_or_default();
    let s = w.start().await;
    w.send(started(&s, 7)).await;
    job_until(alice.path(), first, "running", |v| v["state"] == "running").await;
    let (_, v) = submit(alice.path(), r#"{"command":["two"],"gpus":1}"#).await;
    let second = v["id"].as_u64().unwrap_or_default();
    assert!(second > first);

    // Restart the relay in the same state dir, same port.
    let addr = lab.addr;
    let dir = lab.stop().await;
    let lab = start_relay_in(dir, addr, RelayConfig::default()).await;
    let v = job_until(alice.path(), first, "restored running", |v| {
        v["state"] == "running"
    })
    .await;
    assert_eq!(v["members"][0]["local_id"], 7);
    let v = job_until(alice.path(), second, "restored pending", |v| {
        v["state"] == "pending"
    })
    .await;
    assert_eq!(v["request"]["command"], serde_json::json!(["two"]));

    // The worker comes back (same identity) still running the first job: reconciled.
    drop(w);
    let copy = JobCopy {
        pool_job: first,
        attempt: 1,
        local_id: 7,
    };
    let mut w = agent(
        &lab,
        "w",
        wdir.path(),
        true,
        inventory(
            gpus("w", "NVIDIA A100-SXM4-80GB", 81920, 1),
            vec![copy.clone()],
        ),
    )
    .await;
    let v = job_until(alice.path(), first, "still running", |v| {
        v["state"] == "running"
    })
    .await;
    assert_eq!(v["attempt"], 1);
    // It ends; the second job is placed on the freed GPU; new ids follow the old ones.
    w.send(ended(&s, 7, "succeeded", 0)).await;
    let s2 = loop {
        match w.next("second start").await {
            CoordMsg::Start(s) => break s,
            _ => continue,
        }
    };
    assert_eq!(s2.pool_job, second);
    let (_, v) = submit(
        alice.path(),
        r#"{"command":["three"],"gpus":1,"wait_for_capacity":true}"#,
    )
    .await;
    assert_eq!(v["id"].as_u64(), Some(second + 1));

    // A copy the worker still runs from an attempt the pool moved on from is stopped.
    let stale = JobCopy {
        pool_job: first,
        attempt: 9,
        local_id: 99,
    };
    w.send(AgentMsg::Inventory(inventory(
        gpus("w", "NVIDIA A100-SXM4-80GB", 81920, 1),
        vec![stale],
    )))
    .await;
    loop {
        match w.next("stale stop").await {
            CoordMsg::Stop { pool_job, attempt } if pool_job == first => {
                assert_eq!(attempt, Some(9));
                break;
            }
            _ => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_workers_job_moves_to_another_and_its_old_copy_is_stopped_on_return() {
    let _turn = weft_tests::turn::take(module_path!());
    let mut config = RelayConfig::default();
    config.pool.lost_after = Duration::from_secs(1);
    let lab = start_relay(config).await;
    let (d1, d2) = (tmp(), tmp());
    let a = || inventory(gpus("a", "NVIDIA A100-SXM4-80GB", 81920, 1), vec![]);
    let mut w1 = agent(&lab, "w1", d1.path(), false, a()).await;
    let alice = identity(&lab, "engineer", "alice").await;
    let (_, v) = submit(alice.path(), r#"{"command":["long"],"gpus":1,"retries":1}"#).await;
    let id = v["id"].as_u64().unwrap_or_default();
    let s = w1.start().await;
    w1.send(started(&s, 5)).await;
    job_until(alice.path(), id, "running", |v| v["state"] == "running").await;
    // A second worker joins; the first goes away (its relay connection closes).
    let b = inventory(gpus("b", "NVIDIA A100-SXM4-80GB", 81920, 1), vec![]);
    let mut w2 = agent(&lab, "w2", d2.path(), false, b).await;
    drop(w1);
    let t0 = std::time::Instant::now();
    let s2 = w2.start().await;
    assert_eq!(
        (s2.pool_job, s2.attempt),
        (id, 2),
        "requeued with its retry"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "within lost_after and a tick"
    );
    let (_, v) = api(alice.path(), "GET", "/v1/pool", None).await;
    let w1v = v["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "w1").cloned())
        .unwrap_or_default();
    assert_eq!(w1v["state"], "lost", "{v}");
    // w1 comes back still running attempt 1: it is told to stop that copy.
    let copy = JobCopy {
        pool_job: id,
        attempt: 1,
        local_id: 5,
    };
    let mut w1 = agent(
        &lab,
        "w1",
        d1.path(),
        true,
        inventory(gpus("a", "NVIDIA A100-SXM4-80GB", 81920, 1), vec![copy]),
    )
    .await;
    match w1.next("stop of the old copy").await {
        CoordMsg::Stop { pool_job, attempt } => assert_eq!((pool_job, attempt), (id, Some(1))),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_heartbeats_stop_is_lost_and_back_when_it_speaks() {
    let _turn = weft_tests::turn::take(module_path!());
    let mut config = RelayConfig::default();
    config.pool.lost_after = Duration::from_secs(1);
    let lab = start_relay(config).await;
    let (d1, d2) = (tmp(), tmp());
    let inv = |p: &str| inventory(gpus(p, "NVIDIA A100-SXM4-80GB", 81920, 1), vec![]);
    let mut w1 = agent(&lab, "w1", d1.path(), false, inv("a")).await;
    w1.send(AgentMsg::Heartbeat).await;
    let alice = identity(&lab, "engineer", "alice").await;
    let (_, v) = submit(alice.path(), r#"{"command":["long"],"gpus":1,"retries":1}"#).await;
    let id = v["id"].as_u64().unwrap_or_default();
    let s = w1.start().await;
    w1.send(started(&s, 5)).await;
    let mut w2 = agent(&lab, "w2", d2.path(), false, inv("b")).await;
    // w1's connection stays up but its feed goes quiet: away after three missed beats.
    let s2 = tokio::time::timeout(Duration::from_secs(15), w2.start())
        .await
        .unwrap_or_else(|_| panic!("never moved off the silent worker"));
    assert_eq!((s2.pool_job, s2.attempt), (id, 2));
    // It speaks again: back in the pool, and told to stop its stale copy.
    w1.send(AgentMsg::Heartbeat).await;
    match w1.next("stop owed while away").await {
        CoordMsg::Stop { pool_job, attempt } => assert_eq!((pool_job, attempt), (id, Some(1))),
        other => panic!("{other:?}"),
    }
    let t0 = std::time::Instant::now();
    loop {
        let (_, v) = api(alice.path(), "GET", "/v1/pool", None).await;
        let st = v["workers"]
            .as_array()
            .and_then(|ws| ws.iter().find(|w| w["name"] == "w1").cloned())
            .unwrap_or_default();
        if st["state"] == "ready" {
            break;
        }
        assert!(t0.elapsed() < WAIT, "w1 never back: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloned_gpu_is_flagged_until_the_operator_revokes_the_clone() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (d1, d2) = (tmp(), tmp());
    let same = || inventory(gpus("x", "NVIDIA A100-SXM4-80GB", 81920, 1), vec![]);
    let mut real = agent(&lab, "real", d1.path(), false, same()).await;
    let _clone = agent(&lab, "clone", d2.path(), false, same()).await;
    let alice = identity(&lab, "engineer", "alice").await;
    let t0 = std::time::Instant::now();
    loop {
        let (_, v) = api(alice.path(), "GET", "/v1/pool", None).await;
        let flagged = v["workers"].as_array().is_some_and(|ws| {
            ws.len() == 2
                && ws
                    .iter()
                    .all(|w| w["flagged"] == serde_json::json!(["GPU-x-0"]))
        });
        if flagged {
            break;
        }
        assert!(t0.elapsed() < WAIT, "never flagged on both: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, v) = submit(alice.path(), r#"{"command":["x"],"gpu":"A100"}"#).await;
    assert_eq!(code, 201, "{v}");
    let id = v["id"].as_u64().unwrap_or_default();
    let v = job_until(alice.path(), id, "pending", |v| v["reason"].is_string()).await;
    assert_eq!(
        v["state"], "pending",
        "neither copy of a cloned GPU is given: {v}"
    );
    // The operator decides: the clone is revoked; the real one gets the job.
    lab.registry()
        .revoke_node("clone")
        .unwrap_or_else(|e| panic!("{e}"));
    let s = tokio::time::timeout(Duration::from_secs(5), real.start())
        .await
        .unwrap_or_else(|_| panic!("the real worker never got the job"));
    assert_eq!(s.pool_job, id);
    let (_, v) = api(alice.path(), "GET", "/v1/pool", None).await;
    let clone = v["workers"]
        .as_array()
        .and_then(|ws| ws.iter().find(|w| w["name"] == "clone").cloned())
        .unwrap_or_default();
    assert_eq!(clone["state"], "revoked", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_limits_and_gpu_quotas_are_enforced_at_submit() {
    let _turn = weft_tests::turn::take(module_path!());
    let mut config = RelayConfig::default();
    config.pool.gpu_quota = Some(2);
    config.pool.priority_max.insert("engineer".into(), 50);
    let lab = start_relay(config).await;
    let d = tmp();
    let _w = agent(
        &lab,
        "w",
        d.path(),
        false,
        inventory(gpus("w", "NVIDIA A100-SXM4-80GB", 81920, 4), vec![]),
    )
    .await;
    let alice = identity(&lab, "engineer", "alice").await;
    let (code, v) = submit(alice.path(), r#"{"command":["x"],"gpus":1,"priority":90}"#).await;
    assert_eq!(code, 403, "{v}");
    assert!(err_text(&v).contains("over the limit 50"), "{v}");
    let (code, v) = submit(alice.path(), r#"{"command":["x"],"gpus":2,"priority":50}"#).await;
    assert_eq!(code, 201, "{v}");
    let (code, v) = submit(alice.path(), r#"{"command":["x"],"gpus":1}"#).await;
    assert_eq!(code, 403, "{v}");
    assert!(err_text(&v).contains("2 of 2 GPUs"), "{v}");
}

/// `e` with its usage record as `worker` computes it (rank, engineer, model), signed by `key`.
fn signed(
    mut e: Ended,
    rank: u32,
    engineer: &str,
    worker: &str,
    model: &str,
    key: &Signer,
) -> AgentMsg {
    let record = UsageRecord::of_end(&e, rank, engineer.into(), worker, model.into());
    e.usage = Some(WorkerClaim::sign(record, key));
    AgentMsg::Ended(e)
}

fn local_end(local_id: u64, owner: &str, gpus: &[&str]) -> Ended {
    Ended {
        copy: JobCopy {
            pool_job: 0,
            attempt: 0,
            local_id,
        },
        state: "succeeded".into(),
        exit_code: Some(0),
        started_ms: Some(10_000),
        ended_ms: 12_500,
        gpus: gpus.iter().map(|g| g.to_string()).collect(),
        owner: Some(owner.into()),
        usage: None,
    }
}

async fn acked(a: &mut FakeAgent, local_id: u64) {
    loop {
        match a.next("ack").await {
            CoordMsg::Ack {
                local_id: Some(l), ..
            } if l == local_id => return,
            CoordMsg::Ack { .. } | CoordMsg::Start(_) => continue,
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_records_are_signed_by_their_worker_countersigned_and_exported_with_a_manifest() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (k1, k2) = (Signer::from_seed(&[1; 32]), Signer::from_seed(&[2; 32]));
    let (d1, d2) = (tmp(), tmp());
    let a100 = "NVIDIA A100-SXM4-80GB";
    let mut inv1 = inventory(gpus("a", a100, 81920, 2), vec![]);
    inv1.usage_key = Some(k1.public().to_string());
    let mut gpu1 = agent(&lab, "gpu1", d1.path(), false, inv1).await;
    let mut inv2 = inventory(gpus("b", a100, 81920, 1), vec![]);
    inv2.usage_key = Some(k2.public().to_string());
    let mut gpu2 = agent(&lab, "gpu2", d2.path(), false, inv2).await;
    let alice = identity(&lab, "engineer", "alice").await;
    let bob = identity(&lab, "engineer", "bob").await;
    let ops = identity(&lab, "operator", "ops").await;
    let t0 = std::time::Instant::now();
    loop {
        let (_, v) = api(ops.path(), "GET", "/v1/pool", None).await;
        let keys: Vec<Value> = v["workers"]
            .as_array()
            .map(|w| w.iter().map(|w| w["usage_keys"].clone()).collect())
            .unwrap_or_default();
        if keys.len() == 2
            && keys
                .iter()
                .all(|k| k.as_array().is_some_and(|a| a.len() == 1))
        {
            break;
        }
        assert!(t0.elapsed() < WAIT, "usage keys never registered: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A pool job of alice's on gpu1, signed by gpu1: seq 1.
    let (code, v) = submit(alice.path(), r#"{"command":["train"],"gpus":2}"#).await;
    assert_eq!(code, 201, "{v}");
    let s = gpu1.start().await;
    let AgentMsg::Ended(e) = ended(&s, 41, "succeeded", 0) else {
        unreachable!()
    };
    gpu1.send(signed(e, 0, "alice", "gpu1", a100, &k1)).await;
    loop {
        if let CoordMsg::Ack { pool_job, .. } = gpu1.next("ack").await {
            assert_eq!(pool_job, s.pool_job);
            break;
        }
    }
    // seq 2: bob's per-worker job on gpu2, signed by gpu2.
    gpu2.send(signed(
        local_end(7, "bob", &["GPU-b-0"]),
        0,
        "bob",
        "gpu2",
        a100,
        &k2,
    ))
    .await;
    acked(&mut gpu2, 7).await;
    // seq 3: gpu2 signs with gpu1's key (it announced another): kept, not as gpu2's.
    gpu2.send(signed(
        local_end(8, "alice", &["GPU-b-0"]),
        0,
        "alice",
        "gpu2",
        a100,
        &k1,
    ))
    .await;
    acked(&mut gpu2, 8).await;
    // seq 4: gpu2's record says 10× the GPU-seconds: the coordinator's record is kept.
    let AgentMsg::Ended(mut e) = signed(
        local_end(9, "alice", &["GPU-b-0"]),
        0,
        "alice",
        "gpu2",
        a100,
        &k2,
    ) else {
        unreachable!()
    };
    if let Some(c) = e.usage.as_mut() {
        c.record.gpu_seconds *= 10.0;
        *c = WorkerClaim::sign(c.record.clone(), &k2);
    }
    gpu2.send(AgentMsg::Ended(e)).await;
    acked(&mut gpu2, 9).await;
    // seq 5: an agent that does not sign.
    gpu2.send(AgentMsg::Ended(local_end(10, "alice", &["GPU-b-0"])))
        .await;
    acked(&mut gpu2, 10).await;

    let (code, v) = api(ops.path(), "GET", "/v1/pool/usage/export?since=0", None).await;
    assert_eq!(code, 200, "{v}");
    let export: Export = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    let seqs: Vec<u64> = export.records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(export.manifest.manifest.seqs, vec![(1, 5)]);
    assert_eq!(
        export.manifest.manifest.worker_keys["gpu1"],
        vec![k1.public().to_string()]
    );
    let r = &export.records;
    assert_eq!(r[0].worker_key.as_deref(), Some(k1.public()));
    assert_eq!(
        (r[0].record.engineer.as_str(), r[0].record.gpu_seconds),
        ("alice", 4.0)
    );
    assert_eq!(r[1].worker_key.as_deref(), Some(k2.public()));
    assert!(
        r[2].unsigned
            .as_deref()
            .is_some_and(|u| u.contains("a key gpu2 never announced")),
        "{:?}",
        r[2]
    );
    assert!(
        r[3].unsigned
            .as_deref()
            .is_some_and(|u| u.contains("differs from the coordinator's in gpu_seconds")),
        "{:?}",
        r[3]
    );
    assert_eq!(
        r[3].record.gpu_seconds, 2.5,
        "the coordinator's figure is kept"
    );
    assert!(
        r[4].unsigned
            .as_deref()
            .is_some_and(|u| u.contains("did not sign")),
        "{:?}",
        r[4]
    );
    let rep = usage::verify(Some(&export.manifest), &export.records, &[]);
    assert_eq!(rep.good, 2, "{:?}", rep.problems);
    let problems: Vec<Option<u64>> = rep.problems.iter().map(|p| p.seq).collect();
    assert_eq!(
        problems,
        vec![Some(3), Some(4), Some(5)],
        "{:?}",
        rep.problems
    );
    // Both of alice's jobs were countersigned by this relay; dropping one from the file shows.
    let mut dropped = export.records.clone();
    dropped.remove(1);
    let rep = usage::verify(Some(&export.manifest), &dropped, &[]);
    assert!(
        rep.problems
            .iter()
            .any(|p| p.to_string() == "record 2 was dropped (the manifest lists it)"),
        "{:?}",
        rep.problems
    );

    // bob's own export: his one record, a manifest that says it is his and lists only it.
    let (_, v) = api(bob.path(), "GET", "/v1/pool/usage/export?since=0", None).await;
    let mine: Export = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert_eq!(mine.records.len(), 1);
    assert_eq!(mine.manifest.manifest.engineer.as_deref(), Some("bob"));
    assert_eq!(mine.manifest.manifest.seqs, vec![(2, 2)]);
    assert_eq!(
        usage::verify(Some(&mine.manifest), &mine.records, &[]).problems,
        vec![]
    );
    // A bad query is refused.
    let (code, _) = api(
        alice.path(),
        "GET",
        "/v1/pool/usage/export?since=yesterday",
        None,
    )
    .await;
    assert_eq!(code, 400);

    // After a restart the records, their numbers and signatures are the same, and the next
    // record continues the sequence under the same key.
    let addr = lab.addr;
    drop((gpu1, gpu2));
    let dir = lab.stop().await;
    let lab = start_relay_in(dir, addr, RelayConfig::default()).await;
    let mut inv2 = inventory(gpus("b", a100, 81920, 1), vec![]);
    inv2.usage_key = Some(k2.public().to_string());
    let mut gpu2 = agent(&lab, "gpu2", d2.path(), true, inv2).await;
    gpu2.send(signed(
        local_end(11, "bob", &["GPU-b-0"]),
        0,
        "bob",
        "gpu2",
        a100,
        &k2,
    ))
    .await;
    acked(&mut gpu2, 11).await;
    let (_, v) = api(ops.path(), "GET", "/v1/pool/usage/export?since=0", None).await;
    let again: Export = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert_eq!(
        again.records[..5],
        export.records[..],
        "stored records are unchanged"
    );
    assert_eq!(again.records[5].seq, 6);
    assert_eq!(again.records[5].coord_key, export.records[0].coord_key);
    assert_eq!(again.manifest.key, export.manifest.key);
    let rep = usage::verify(
        Some(&again.manifest),
        &again.records,
        std::slice::from_ref(&export.manifest.key),
    );
    assert_eq!(rep.good, 3, "{:?}", rep.problems);
}
