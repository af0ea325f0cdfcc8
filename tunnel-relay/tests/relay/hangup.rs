//! ssh ends its ProxyCommand with SIGHUP when the session ends: `connect`
//! must close its relay connection then, so the relay stops counting the
//! session and its tunnel at once, not after the 30 s idle timeout.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::process::Stdio;
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::relay_bin;
use relay_bin::{create, echo_worker, ok, spawn_connect, start_serve};

/// The value of one metric line `NAME VALUE` from the relay's /metrics.
fn metric(addr: &str, name: &str) -> Option<f64> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        sleep(Duration::from_millis(50));
    }
}

#[test]
fn sighup_closes_the_session_at_once() {
    let _turn = weft_tests::turn::take(module_path!());
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("relay");
    let st = state.to_str().unwrap();
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let (mut relay, _addr) = start_serve(
        &state,
        &["--metrics", &metrics],
        &tmp.path().join("relay.log"),
    );
    wait_for("the relay", Duration::from_secs(10), || {
        metric(&metrics, "weft_relay_open_tunnels").is_some()
    });

    // A worker exposing a local echo service.
    let (_worker, _) = echo_worker(st, tmp.path(), &[]);
    let etok = create(st, &["--tag", "engineer"]);
    let edir = tmp.path().join("e");
    let edir_s = edir.to_str().unwrap();
    ok(&[
        "login",
        "--token",
        &etok,
        "--name",
        "eve",
        "--state-dir",
        edir_s,
    ]);
    wait_for("the worker to connect", Duration::from_secs(10), || {
        metric(&metrics, "weft_relay_connected_nodes") == Some(1.0)
    });

    // An open session: stdin stays open, one echo round trip proves the tunnel.
    let mut child = spawn_connect(edir_s, "w", "echo", Stdio::null());
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    let mut got = [0u8; 5];
    stdout.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping\n");
    assert_eq!(metric(&metrics, "weft_relay_open_tunnels"), Some(1.0));

    // What ssh does when the session ends.
    let pid = i32::try_from(child.id()).unwrap();
    // SAFETY: signalling our own child by pid.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    let status = child.wait().unwrap();
    assert!(status.success(), "connect exited with {status} on SIGHUP");
    // Well inside the relay's 30 s idle timeout.
    wait_for(
        "the relay to drop the session",
        Duration::from_secs(5),
        || {
            metric(&metrics, "weft_relay_open_tunnels") == Some(0.0)
                && metric(&metrics, "weft_relay_connected_nodes") == Some(1.0)
        },
    );
    drop(stdin);
    assert!(relay.is_running());
}
