//! Best-effort cgroup v2 per job: CPU/memory limits, OOM detection, and `cgroup.kill` so that
//! even a child that left the job's process group dies with the job. Used only where the
//! unified hierarchy is mounted and the agent's own cgroup is writable (e.g. a systemd unit
//! with `Delegate=yes`); otherwise jobs run with process groups only.

use std::path::{Path, PathBuf};

use tracing::{debug, info};

/// Where job cgroups are created: `<agent's cgroup>/weft-jobs/job-<id>`.
#[derive(Debug, Clone)]
pub struct Cgroups {
    jobs: PathBuf,
}

/// `cpu.max` for a limit in cores: quota and period in microseconds.
pub fn cpu_max(cores: f64) -> String {
    let period = 100_000u64;
    let quota = (cores * period as f64).round().max(1000.0) as u64;
    format!("{quota} {period}")
}

fn write(path: &Path, v: &str) -> std::io::Result<()> {
    std::fs::write(path, v)
}

impl Cgroups {
    /// Sets up delegation under the agent's own cgroup: moves the agent into a leaf
    /// (`weft-agent`), enables cpu+memory for children, creates `weft-jobs`. `None` when any
    /// step is not possible (cgroup v1, read-only, no permission).
    pub fn detect() -> Option<Self> {
        let root = Path::new("/sys/fs/cgroup");
        if !root.join("cgroup.controllers").exists() {
            info!("cgroup v2 not mounted; jobs get process groups only");
            return None;
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))?
            .trim()
            .trim_start_matches('/');
        let base = root.join(rel);
        let setup = || -> std::io::Result<PathBuf> {
            let me = base.join("weft-agent");
            std::fs::create_dir_all(&me)?;
            write(&me.join("cgroup.procs"), "0")?;
            write(&base.join("cgroup.subtree_control"), "+cpu +memory")?;
            let jobs = base.join("weft-jobs");
            std::fs::create_dir_all(&jobs)?;
            write(&jobs.join("cgroup.subtree_control"), "+cpu +memory")?;
            Ok(jobs)
        };
        match setup() {
            Ok(jobs) => {
                info!(path = %jobs.display(), "per-job cgroups enabled");
                Some(Self { jobs })
            }
            Err(e) => {
                info!(base = %base.display(), error = %e, "cgroup v2 not writable; jobs get process groups only");
                None
            }
        }
    }

    /// Creates the job's cgroup with its limits and returns its path.
    pub fn create(
        &self,
        id: u64,
        cpus: Option<f64>,
        memory_bytes: Option<u64>,
    ) -> std::io::Result<PathBuf> {
        let dir = self.jobs.join(format!("job-{id}"));
        std::fs::create_dir_all(&dir)?;
        if let Some(c) = cpus {
            write(&dir.join("cpu.max"), &cpu_max(c))?;
        }
        if let Some(m) = memory_bytes {
            write(&dir.join("memory.max"), &m.to_string())?;
            let _ = write(&dir.join("memory.swap.max"), "0");
        }
        Ok(dir)
    }
}

/// Whether the kernel OOM-killed something in the job's cgroup.
pub fn oom_killed(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("memory.events"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("oom_kill ")
                    .and_then(|n| n.trim().parse::<u64>().ok())
            })
        })
        .is_some_and(|n| n > 0)
}

/// Kills everything left in the cgroup and removes it.
pub fn kill_and_remove(dir: &Path) {
    let _ = write(&dir.join("cgroup.kill"), "1");
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    debug!(path = %dir.display(), "job cgroup not removed");
}

/// Puts the calling process into `dir` (used by the exec shim before it starts the command).
pub fn join(dir: &Path) -> std::io::Result<()> {
    write(&dir.join("cgroup.procs"), "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_max_format() {
        assert_eq!(cpu_max(1.5), "150000 100000");
        assert_eq!(cpu_max(0.0), "1000 100000");
    }

    #[test]
    fn oom_from_memory_events() {
        let d = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(
            d.path().join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(oom_killed(d.path()));
        std::fs::write(d.path().join("memory.events"), "oom_kill 0\n")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(!oom_killed(d.path()));
        assert!(!oom_killed(&d.path().join("missing")));
    }
}
