//! The worker agent in lab namespaces: its binary, the stub NVML library the
//! tests build (a test double: two fake H100s, see
//! `worker-agent/tests/stub/nvml_stub.c`) and its CLI.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::netns::Netns;

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
