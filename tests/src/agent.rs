//! The worker agent in lab namespaces: its binary, the stub NVML library the
//! tests build (a test double: two fake H100s, see
//! `worker-agent/tests/stub/nvml_stub.c`) and its CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::netns::Netns;
use crate::proc::Proc;

/// The `worker-agent` binary.
pub fn agent_bin() -> String {
    crate::bin("worker-agent").display().to_string()
}

/// Builds the stub `libnvidia-ml.so` into `dir` with gcc; its path.
pub fn build_nvml_stub(dir: &Path) -> PathBuf {
    let src = crate::workspace_root().join("worker-agent/tests/stub/nvml_stub.c");
    let out = dir.join("libnvml-stub.so");
    let st = std::process::Command::new("gcc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| panic!("gcc is needed to build the stub NVML library: {e}"));
    assert!(st.success(), "building {} failed", src.display());
    out
}

/// Runs `worker-agent ARGS` in `ns`; (success, stdout, stderr).
pub fn agent_cli(ns: &Netns, args: &str) -> (bool, String, String) {
    let out = ns.output(&format!("{} {args}", agent_bin()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `worker-agent ARGS` in `ns`, which must succeed; its stdout.
pub fn agent_ok(ns: &Netns, args: &str) -> String {
    let (ok, out, err) = agent_cli(ns, args);
    assert!(ok, "worker-agent {args} failed: {err}{out}");
    out
}

/// Parses JSON or panics with the text.
pub fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// `worker-agent status --json --state-dir STATE` in `ns`, polled until
/// `done` holds for it (at most `within`); that status. Panics with `what`,
/// the last output and the log of `agent` (the agent process) otherwise.
pub fn wait_agent_status(
    ns: &Netns,
    state: &str,
    agent: &Proc,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    crate::retry(within, || {
        let out = ns.output(&format!(
            "{} status --json --state-dir {state}",
            agent_bin()
        ));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match serde_json::from_str::<Value>(&text) {
            Ok(v) if done(&v) => Ok(v),
            _ => Err(text),
        }
    })
    .unwrap_or_else(|last| {
        panic!(
            "{what}; last status: {last}\nagent log:\n{}",
            agent.log_tail(30)
        )
    })
}
