//! The `tunnel-relay` binary driven from the loopback tests (`mod relay_bin;`):
//! `serve` and `expose` as processes, one-shot commands, `connect` as ssh
//! runs it, and a local echo service for a worker to expose.
// Each test file uses its own part.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use weft_tests::Proc;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_tunnel-relay");

/// `tunnel-relay ARGS` (warnings only in its log), run to the end.
pub(crate) fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("WEFT_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("run tunnel-relay {args:?}: {e}"))
}

/// `tunnel-relay ARGS`, which must succeed; its stdout.
pub(crate) fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "tunnel-relay {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `token create --state-dir STATE EXTRA...`: the token.
pub(crate) fn create(state: &str, extra: &[&str]) -> String {
    let mut args = vec!["token", "create", "--state-dir", state];
    args.extend_from_slice(extra);
    ok(&args).trim().to_string()
}

/// `connect TARGET SERVICE --state-dir STATE` with stdin and stdout piped, as
/// ssh runs a ProxyCommand; stderr goes to `stderr`.
pub(crate) fn spawn_connect(state: &str, target: &str, service: &str, stderr: Stdio) -> Child {
    Command::new(BIN)
        .args(["connect", target, service, "--state-dir", state])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn tunnel-relay connect {target} {service}: {e}"))
}

/// A blocking TCP echo on 127.0.0.1 (a thread per connection): echoes until
/// EOF, then FINs.
pub(crate) fn echo_thread() -> SocketAddr {
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
    let addr = echo.local_addr().unwrap_or_else(|e| panic!("{e}"));
    std::thread::spawn(move || {
        for s in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s;
                let mut w = r.try_clone().unwrap_or_else(|e| panic!("{e}"));
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// `serve --listen 127.0.0.1:0 --state-dir STATE EXTRA...` logging to `log`,
/// once it has written the address it bound (at most 10 s); the process and
/// that address.
pub(crate) fn start_serve(state: &Path, extra: &[&str], log: &Path) -> (Proc, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .args(extra);
    let p = Proc::spawn("relay", cmd, log);
    let t0 = Instant::now();
    let addr_file = state.join("listen.addr");
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            if !a.trim().is_empty() {
                return (p, a.trim().to_string());
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "relay did not start: {}",
            p.log_tail(20)
        );
        sleep(Duration::from_millis(20));
    }
}

/// A worker `w` (`expose`, state in `dir/w`, log `dir/worker.log`) exposing a
/// local echo service as `echo`, joined with a fresh `worker` token from the
/// relay state `state` (`token create` with the `extra` flags); the process
/// and the token.
pub(crate) fn echo_worker(state: &str, dir: &Path, extra: &[&str]) -> (Proc, String) {
    let echo = echo_thread();
    let mut create_args = vec!["--tag", "worker"];
    create_args.extend_from_slice(extra);
    let token = create(state, &create_args);
    let mut cmd = Command::new(BIN);
    cmd.args(["expose", "--token", &token, "--name", "w", "--state-dir"])
        .arg(dir.join("w"))
        .args(["--service", &format!("echo={echo}")]);
    (Proc::spawn("worker", cmd, &dir.join("worker.log")), token)
}
