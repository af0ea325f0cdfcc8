//! The `weft` binary on loopback, no namespaces: its help lists every
//! command, bad arguments are refused with what to do, and against a real
//! relay (in-process, on 127.0.0.1) with in-process workers an engineer
//! logs in, sees the workers and their GPUs in `weft status` (`?` for an
//! agent that does not answer), gets `ssh-config` stanzas and reaches a
//! worker's service through `weft connect`, bytes intact.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tunnel_relay::client::{self, ExposeOptions};
use tunnel_relay::RelayConfig;

/// The relay's own in-process test lab (a relay on 127.0.0.1, its tokens, an echo service).
#[path = "../../tunnel-relay/tests/relay/relay_lab/mod.rs"]
mod relay_lab;
use relay_lab::{echo_service, start_relay};

const BIN: &str = env!("CARGO_BIN_EXE_weft");

/// `weft ARGS` with a private home and none of the caller's WEFT_* settings.
fn weft_in(home: &Path, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("xdg"))
        .env("WEFT_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("WEFT_") && k != "WEFT_LOG" {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("run weft {args:?}: {e}"));
    let mut pipe = child.stdin.take().unwrap();
    if let Some(input) = stdin {
        pipe.write_all(input).unwrap();
    }
    drop(pipe);
    child.wait_with_output().unwrap()
}

fn ok(home: &Path, args: &[&str]) -> String {
    let out = weft_in(home, args, None);
    assert!(
        out.status.success(),
        "weft {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `weft ARGS`, expects it to fail with every one of `expect` in stderr.
fn refused(home: &Path, args: &[&str], expect: &[&str]) {
    let out = weft_in(home, args, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "weft {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    for e in expect {
        assert!(err.contains(e), "weft {args:?}: expected {e:?} in:\n{err}");
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn help_lists_every_command_with_a_description() {
    let home = tempfile::tempdir().unwrap();
    let help = ok(home.path(), &["--help"]);
    for cmd in [
        "login",
        "ssh-config",
        "connect",
        "forward",
        "up",
        "down",
        "status",
        "ping",
        "jobs",
        "pool",
        "usage",
    ] {
        let line = help
            .lines()
            .find(|l| l.split_whitespace().next() == Some(cmd))
            .unwrap_or_else(|| panic!("`{cmd}` missing from weft --help:\n{help}"));
        assert!(
            line.split_whitespace().count() > 2,
            "`{cmd}` has no description: {line:?}"
        );
    }
    // `jobs` has worker-agent's subcommands and flags.
    let jobs = ok(home.path(), &["jobs", "--help"]);
    for sub in ["submit", "list", "show", "logs", "cancel", "--worker"] {
        assert!(
            jobs.contains(sub),
            "`{sub}` missing from weft jobs --help:\n{jobs}"
        );
    }
    let down = ok(home.path(), &["down", "--help"]);
    assert!(
        down.contains("SIGTERM"),
        "weft down --help says what it does:\n{down}"
    );
}

#[test]
fn bad_arguments_say_what_is_wrong() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let empty = h.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    refused(h, &["frobnicate"], &["unrecognized subcommand"]);
    refused(h, &["connect", "gpu1"], &["<PORT>"]);
    refused(
        h,
        &["forward", "2222:gpu1"],
        &["expected LOCALPORT:NAME:SERVICE", "2222:gpu1:ssh"],
    );
    refused(
        h,
        &["forward", "x:gpu1:ssh"],
        &["\"x\" is not a port number"],
    );
    // One duration grammar: the flag is named, and examples given.
    refused(
        h,
        &[
            "jobs",
            "submit",
            "--worker",
            "gpu1",
            "--timeout",
            "2x",
            "--",
            "true",
        ],
        &["--timeout", "unknown unit", "e.g. 500ms, 30s, 2h or 1d"],
    );
    refused(
        h,
        &["ping", "gpu1", "--timeout", "0s"],
        &["--timeout", "more than zero"],
    );
    refused(
        h,
        &["status", "--timeout", "soon"],
        &["--timeout", "is not a duration"],
    );
    refused(
        h,
        &["login", "--token", "garbage"],
        &["--token", "not a Weft relay token"],
    );
    refused(
        h,
        &["ssh-config", "--state-dir", s(&h.join("nobody"))],
        &["no relay known", "weft login --token"],
    );
    refused(
        h,
        &["ping", "gpu1", "--uapi-dir", s(&empty)],
        &["no managed mesh node is running", "weft up"],
    );
    refused(
        h,
        &["down", "--uapi-dir", s(&empty)],
        &["no managed mesh node is running"],
    );
    refused(
        h,
        &[
            "jobs",
            "list",
            "--worker",
            "gpu1",
            "--api",
            "http://127.0.0.1:1",
        ],
        &["--api", "--worker"],
    );

    // The pool (jobs without --worker): a malformed --gpu is refused before anything is sent,
    // with the column; the pool's flags are refused with one worker; not logged in says how.
    let nobody = h.join("nobody");
    refused(
        h,
        &[
            "jobs",
            "submit",
            "--gpu",
            "80XB",
            "--state-dir",
            s(&nobody),
            "--",
            "true",
        ],
        &[r#"--gpu 80XB: unknown unit "XB" at column 3; use MB, GB or TB"#],
    );
    refused(
        h,
        &[
            "jobs", "submit", "--worker", "gpu1", "--gpu", "A100", "--retry", "1", "--", "true",
        ],
        &["--gpu and --retry: the pool's", "leave out --worker"],
    );
    refused(
        h,
        &[
            "jobs",
            "submit",
            "--memory",
            "1000",
            "--state-dir",
            s(&nobody),
            "--",
            "true",
        ],
        &["--memory: one worker's", "--worker NAME"],
    );
    for args in [
        &["jobs", "list"][..],
        &["jobs", "logs", "7", "--follow"],
        &["pool"],
        &["usage", "--since", "7d"],
        // `--state-dir` after a cluster subcommand as well as before it.
        &["cluster", "up", "x", "--nodes", "1"],
        &["cluster", "list"],
    ] {
        let mut args = args.to_vec();
        args.extend(["--state-dir", s(&nobody)]);
        refused(h, &args, &["the pool (relay)", "weft login --token"]);
    }
    refused(
        h,
        &["usage", "--since", "2025-02-30", "--state-dir", s(&nobody)],
        &["--since \"2025-02-30\": not a date"],
    );

    // Not logged in: status says so, and creates nothing.
    let id = h.join("fresh");
    let out = ok(
        h,
        &[
            "status",
            "--json",
            "--state-dir",
            s(&id),
            "--uapi-dir",
            s(&empty),
        ],
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["relay"]["state"], "not_logged_in", "{v}");
    assert_eq!(v["mesh"], Value::Array(vec![]), "{v}");
    assert_eq!(v["workers"], Value::Array(vec![]), "{v}");
    assert!(!id.exists(), "status must not create an identity");
    let text = ok(
        h,
        &["status", "--state-dir", s(&id), "--uapi-dir", s(&empty)],
    );
    assert!(text.contains("weft login --token"), "{text}");
}

/// What an agent's `GET /v1/status` says: two H200s, one degraded, a queued job.
fn agent_status() -> Value {
    let gpu = |index: u32, health: &str| {
        serde_json::json!({
            "index": index,
            "name": "NVIDIA H200",
            "uuid": format!("GPU-{index}"),
            "lost": false,
            "memory_total_bytes": 150_754_820_096u64,
            "health": {"state": health, "reasons": []},
            "xid_counts": {},
        })
    };
    serde_json::json!({
        "backend": {"state": "ready", "detail": 2},
        "sampled_at_ms": 1,
        "gpus": [gpu(0, "healthy"), gpu(1, "degraded")],
        "gpu_holders": {},
        "jobs_running": [],
        "jobs_queued": [7],
    })
}

/// Answers every request with this agent status, as a worker agent would.
async fn fake_agent(status: Value) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let body = status.to_string();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[test]
fn login_status_ssh_config_and_connect_through_a_loopback_relay() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let eng = h.join("engineer");
    let empty = h.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // The relay and three workers, in-process: gpu1 with an agent that
    // answers, gpu2 whose agent is down, cpu3 with no agent at all.
    let lab = rt.block_on(start_relay(RelayConfig::default()));
    let addr = lab.addr;
    let token = |tag: &str| lab.token(tag, Some(Duration::from_secs(600)), None);
    let agent = agent_status();
    rt.block_on(async {
        let agent = fake_agent(agent).await;
        let echo = echo_service().await;
        let closed = {
            // A port nothing listens on.
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        for (name, services) in [
            ("gpu1", vec![("agent", agent), ("ssh", echo)]),
            ("gpu2", vec![("agent", closed), ("ssh", echo)]),
            ("cpu3", vec![("ssh", echo)]),
        ] {
            let mut o = ExposeOptions::new(
                h.join(name),
                name.to_string(),
                services
                    .into_iter()
                    .map(|(n, a)| (n.to_string(), a.to_string()))
                    .collect(),
            );
            o.token = Some(token("worker"));
            tokio::spawn(client::expose(o, std::future::pending::<()>()));
        }
    });

    let out = ok(
        h,
        &[
            "login",
            "--token",
            &token("engineer").encode(),
            "--state-dir",
            s(&eng),
            "--name",
            "eve",
        ],
    );
    assert!(
        out.contains("logged in as eve") && out.contains("engineer"),
        "{out}"
    );

    // The workers show up as they connect.
    let status_args = |extra: &[&'static str]| {
        let mut args = vec!["status"];
        args.extend_from_slice(extra);
        args.extend([
            "--state-dir",
            s(&eng),
            "--uapi-dir",
            s(&empty),
            "--timeout",
            "2s",
        ]);
        args
    };
    let t0 = Instant::now();
    let v = loop {
        let out = ok(h, &status_args(&["--json"]));
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        if v["workers"].as_array().map(Vec::len) == Some(3) {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "workers never all listed: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["relay"]["state"], "connected", "{v}");
    assert_eq!(v["relay"]["name"], "eve", "{v}");
    assert_eq!(v["relay"]["tags"], serde_json::json!(["engineer"]), "{v}");
    assert_eq!(v["relay"]["address"], addr.to_string(), "{v}");
    assert_eq!(v["mesh"], Value::Array(vec![]), "{v}");
    let w = &v["workers"];
    assert_eq!(
        [&w[0]["name"], &w[1]["name"], &w[2]["name"]],
        ["cpu3", "gpu1", "gpu2"],
        "{v}"
    );
    assert!(
        w[0]["gpus"].is_null() && w[0]["error"].as_str().unwrap().contains("no `agent`"),
        "{v}"
    );
    assert_eq!(w[1]["gpus"][0]["name"], "NVIDIA H200", "{v}");
    assert_eq!(w[1]["gpus"][1]["health"], "degraded", "{v}");
    assert_eq!(w[1]["jobs_queued"], 1, "{v}");
    assert!(
        w[2]["gpus"].is_null() && !w[2]["error"].as_str().unwrap().is_empty(),
        "{v}"
    );

    let text = ok(h, &status_args(&[]));
    assert!(
        text.contains(&format!("relay: connected to {addr} (quic) as eve")),
        "{text}"
    );
    assert!(text.contains("2× NVIDIA H200 (GPU 1 degraded)"), "{text}");
    let gpu2 = text
        .lines()
        .find(|l| l.trim_start().starts_with("gpu2"))
        .unwrap();
    assert!(gpu2.contains("agent,ssh  ?"), "{text}");

    // ssh-config: one stanza per worker with ssh, through `weft connect`.
    let cfg = ok(h, &["ssh-config", "--state-dir", s(&eng)]);
    for name in ["cpu3", "gpu1", "gpu2"] {
        assert!(cfg.contains(&format!("Host {name}\n")), "{cfg}");
    }
    assert!(
        cfg.contains(&format!("ProxyCommand \"{BIN}\" connect --state-dir")),
        "{cfg}"
    );

    // connect: what ssh would do with that ProxyCommand; the echo comes back intact.
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let out = weft_in(
        h,
        &["connect", "--state-dir", s(&eng), "cpu3", "22"],
        Some(&payload),
    );
    assert!(
        out.status.success(),
        "connect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout == payload,
        "connect echoed {} of {} bytes",
        out.stdout.len(),
        payload.len()
    );

    // A worker the engineer may not open is refused with the relay's reason.
    let out = weft_in(
        h,
        &["connect", "--state-dir", s(&eng), "nosuch", "22"],
        Some(b""),
    );
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).trim().is_empty());
    drop(lab);
    drop(rt);
}
