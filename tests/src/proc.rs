//! `Proc`: a child process owned by a test, stopped when the guard drops.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// How long `kill_term` waits after SIGTERM before it sends SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(3);

/// A running child process. Dropping the guard sends SIGTERM, waits up to 3 s,
/// then sends SIGKILL. stdout and stderr go to one log file.
pub struct Proc {
    label: String,
    child: Child,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr appended to `log`.
    pub fn spawn(label: &str, mut cmd: Command, log: &Path) -> Proc {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("open log {}: {e}", log.display()));
        let err = out
            .try_clone()
            .unwrap_or_else(|e| panic!("dup log {}: {e}", log.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {label} ({cmd:?}): {e}"));
        Proc {
            label: label.to_string(),
            child,
            status: None,
            log: log.to_path_buf(),
        }
    }

    /// The process id (the program itself: `ip netns exec` and `sh -c exec` both exec in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Path of the combined stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The combined stdout/stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log)
            .unwrap_or_else(|e| format!("<no log {}: {e}>", self.log.display()))
    }

    /// The last `n` lines of the log, for panic messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Whether the process has not exited yet (reaps it if it has).
    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Exit status if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
            }
        }
        self.status
    }

    /// Sends a signal (e.g. `libc::SIGINT`) if the process is still running.
    pub fn signal(&mut self, sig: i32) {
        if self.is_running() {
            let pid = self.child.id() as libc::pid_t;
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }

    /// Waits for exit, at most `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit without a limit.
    pub fn wait(&mut self) -> ExitStatus {
        if let Some(st) = self.status {
            return st;
        }
        let st = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("wait {}: {e}", self.label));
        self.status = Some(st);
        st
    }

    /// Sends `sig`, waits up to 3 s, then SIGKILL; returns the exit status.
    pub fn stop_with(&mut self, sig: i32) -> ExitStatus {
        self.signal(sig);
        if let Some(st) = self.wait_timeout(TERM_GRACE) {
            return st;
        }
        self.signal(libc::SIGKILL);
        self.wait()
    }

    /// SIGTERM, wait up to 3 s, then SIGKILL.
    pub fn kill_term(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGINT (programs like ping print their summary), then as `kill_term`.
    pub fn interrupt(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGINT)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            self.kill_term();
        }
    }
}
