//! Ray for the cluster tests (issue 12): a pinned `ray[default]` from the Python registry in
//! a virtualenv cached under `~/.cache/weft-ray/ray-VERSION` (made once, ~50 s cold; the test
//! command makes it before the tests, `ray_bin` makes it if it is missing). `$WEFT_RAY` names
//! another `ray` command instead.

use std::path::PathBuf;
use std::process::Command;

/// The Ray the tests pin.
pub const RAY_VERSION: &str = "2.60.0";

/// The cached virtualenv's directory.
pub fn venv_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
    home.join(".cache/weft-ray")
        .join(format!("ray-{RAY_VERSION}"))
}

/// The `ray` command of the pinned Ray, installing it first if it is not there.
pub fn ray_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_RAY") {
        return PathBuf::from(p);
    }
    let dir = venv_dir();
    let ray = dir.join("bin/ray");
    if ray.is_file() {
        return ray;
    }
    let script = crate::workspace_root().join("scripts/ray-venv.sh");
    let st = Command::new("bash")
        .arg(&script)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        st.success() && ray.is_file(),
        "{} did not make {}",
        script.display(),
        ray.display()
    );
    ray
}
