//! The `tunnel-relay` binary on loopback: the operator's token and node
//! commands work against the SQLite state while `serve` runs, and a refused
//! client prints the reason and exits non-zero.

use std::io::Write;
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::relay_bin;
use relay_bin::{create, echo_worker, ok, run, spawn_connect, start_serve};

fn refused(args: &[&str], reason: &str) {
    let out = run(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "tunnel-relay {args:?} should fail");
    assert!(
        err.contains(reason),
        "tunnel-relay {args:?}: expected {reason:?} in: {err}"
    );
}

#[test]
fn operator_commands_and_refusal_reasons() {
    let _turn = weft_tests::turn::take(module_path!());
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let state = tmp.path().join("relay");
    let st = state.to_str().unwrap_or_else(|| panic!("utf-8 path"));
    let (mut relay, addr) = start_serve(&state, &[], &tmp.path().join("relay.log"));
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    // Identity is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(state.join("identity.key"))
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0);
    assert_eq!(mode, 0o600);

    // Tokens default to the bound address; they are versioned and URL-safe.
    let expired = create(st, &["--tag", "engineer", "--ttl", "0s"]);
    let once = create(st, &["--tag", "engineer", "--uses", "1"]);
    let revoked = create(st, &["--tag", "engineer"]);
    assert!(once.starts_with("wft1_"));
    assert!(once
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));

    let list = ok(&["token", "list", "--state-dir", st, "--json"]);
    let toks: serde_json::Value =
        serde_json::from_str(&list).unwrap_or_else(|e| panic!("{e}: {list}"));
    let toks = toks.as_array().cloned().unwrap_or_default();
    assert_eq!(toks.len(), 3);
    // The stored form never contains the secret.
    for t in [&expired, &once, &revoked] {
        assert!(!list.contains(&t[5..25]));
    }
    let revoked_id = toks
        .iter()
        .filter(|t| t["uses_left"].is_null() && t["expires_at"].is_null())
        .filter_map(|t| t["id"].as_str())
        .next()
        .unwrap_or_else(|| panic!("revocable token in {list}"))
        .to_string();
    ok(&["token", "revoke", "--state-dir", st, &revoked_id[..6]]);

    let e1 = tmp.path().join("e1");
    let e2 = tmp.path().join("e2");
    let e3 = tmp.path().join("e3");
    let (e1s, e2s, e3s) = (
        e1.to_str().unwrap_or_default(),
        e2.to_str().unwrap_or_default(),
        e3.to_str().unwrap_or_default(),
    );
    refused(
        &["login", "--token", &expired, "--state-dir", e1s],
        "token expired",
    );
    refused(
        &["login", "--token", &revoked, "--state-dir", e1s],
        "token revoked",
    );
    let out = ok(&[
        "login",
        "--token",
        &once,
        "--state-dir",
        e1s,
        "--name",
        "eve",
    ]);
    assert!(out.contains("eve") && out.contains("engineer"), "{out}");
    refused(
        &["login", "--token", &once, "--state-dir", e2s],
        "token used up",
    );
    refused(
        &["login", "--token", "wft1_AAAA", "--state-dir", e2s],
        "damaged",
    );
    // A key the relay never admitted.
    std::fs::create_dir_all(&e3).unwrap_or_else(|e| panic!("{e}"));
    std::fs::copy(e1.join("relay.json"), e3.join("relay.json")).unwrap_or_else(|e| panic!("{e}"));
    refused(&["connect", "w", "22", "--state-dir", e3s], "key unknown");
    // Known engineer, no such worker.
    refused(
        &["connect", "nobody", "22", "--state-dir", e1s],
        "no such node",
    );

    // A worker from the CLI; the engineer reaches a local echo through it.
    let (_worker, wtok) = echo_worker(st, tmp.path(), &["--uses", "1"]);
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let t0 = Instant::now();
    let got = loop {
        let mut child = spawn_connect(e1s, "w", "echo", Stdio::piped());
        if let Some(mut stdin) = child.stdin.take() {
            let p = payload.clone();
            std::thread::spawn(move || {
                let _ = stdin.write_all(&p);
            });
        }
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
        if out.status.success() {
            break out.stdout;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "connect never worked: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        sleep(Duration::from_millis(100));
    };
    assert!(
        got == payload,
        "connect echoed {} of {} bytes intact",
        got.len(),
        payload.len()
    );

    let nodes = ok(&["nodes", "list", "--state-dir", st, "--json"]);
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap_or_else(|e| panic!("{e}"));
    let names: Vec<&str> = nodes
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["eve", "w"]);
    ok(&["nodes", "revoke", "eve", "--state-dir", st]);
    refused(
        &["connect", "w", "echo", "--state-dir", e1s],
        "node revoked",
    );
    refused(
        &["nodes", "revoke", "nobody", "--state-dir", st],
        "no node named",
    );
    // Approval: a node that is not waiting for it is left as it is; an unknown one is named.
    let out = ok(&["nodes", "approve", "w", "--state-dir", st]);
    assert!(out.contains("node w was not waiting for approval"), "{out}");
    refused(
        &["nodes", "approve", "nobody", "--state-dir", st],
        "no node named",
    );

    // A bad config file names the file, line and field.
    let cfg = tmp.path().join("relay.toml");
    std::fs::write(&cfg, "[limits]\nmax_stream = 1\n").unwrap_or_else(|e| panic!("{e}"));
    let out = run(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        st,
        "--config",
        cfg.to_str().unwrap_or_default(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("relay.toml")
            && err.contains("max_stream")
            && err.contains("line 2"),
        "{err}"
    );

    // Secrets never reach the relay's log.
    relay.kill_term();
    let log = relay.log();
    for t in [&expired, &once, &revoked, &wtok] {
        assert!(!log.contains(&t[5..25]));
    }
}
