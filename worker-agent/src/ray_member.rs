//! Supervision of a Ray cluster member (`worker-agent ray-member -- RAY start --block ...`).
//!
//! `ray start --block` exits when any of the node's Ray processes dies: a raylet that crashed,
//! or one that GCS declared dead and told to abort (after a network partition, even once the
//! link has healed). The member's local job runs this supervisor around it, so that such an
//! exit restarts Ray and the node rejoins the cluster instead of failing the whole gang.
//!
//! The rule ([`Restarts`], pure, time injected):
//! - a run that ended before [`MIN_UP`] is a failure to start (bad flags, a head that is not
//!   there, a broken install): no restart, its exit status is the member's, so `weft cluster
//!   up` shows the failure and the GPUs are released;
//! - otherwise Ray is started again after a back-off (1 s, doubling, at most 10 s), at most
//!   [`MAX_RESTARTS`] times in [`WINDOW`]; past that the member fails (gang rules apply);
//! - a stop from the agent (SIGTERM/SIGINT/SIGHUP, sent to the job's process group) is passed
//!   to Ray and ends the supervisor with Ray's status: no restart after it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// A run shorter than this is a failure to start, not a crash: no restart.
pub const MIN_UP: Duration = Duration::from_secs(10);
/// Restarts allowed in [`WINDOW`].
pub const MAX_RESTARTS: usize = 5;
/// The window [`MAX_RESTARTS`] counts in.
pub const WINDOW: Duration = Duration::from_secs(600);
/// The first back-off; it doubles after each restart up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// The longest back-off.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// What to do when Ray exited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start it again after this long.
    Restart {
        /// The back-off.
        after: Duration,
        /// Restarts in the window, this one included.
        count: usize,
    },
    /// Give up: the member ends with Ray's status.
    GiveUp(&'static str),
}

/// The restart budget of one member.
#[derive(Debug, Default)]
pub struct Restarts {
    recent: VecDeque<Instant>,
}

impl Restarts {
    /// Ray, started at `started`, exited at `now` without a stop from the agent.
    pub fn on_exit(&mut self, started: Instant, now: Instant) -> Decision {
        if now.saturating_duration_since(started) < MIN_UP {
            return Decision::GiveUp("it did not stay up (a failure to start)");
        }
        while self
            .recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW)
        {
            self.recent.pop_front();
        }
        if self.recent.len() >= MAX_RESTARTS {
            return Decision::GiveUp("too many restarts");
        }
        let after = FIRST_BACKOFF
            .saturating_mul(1 << self.recent.len().min(8))
            .min(MAX_BACKOFF);
        self.recent.push_back(now);
        Decision::Restart {
            after,
            count: self.recent.len(),
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop(sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe; pid is our own child's.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

fn install_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction with a handler that only touches atomics and calls
        // kill(2) (async-signal-safe); SA_RESTART keeps wait(2) going.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_stop as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Sleeps `d`, waking early on a stop. True when stopped.
fn sleep_unless_stopped(d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if STOP.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    STOP.load(Ordering::SeqCst)
}

fn exit_code(st: std::process::ExitStatus) -> i32 {
    st.code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

/// Runs `argv` (Ray) under the rule above; returns the member's exit code.
pub fn run(argv: &[OsString]) -> i32 {
    let Some((first, rest)) = argv.split_first() else {
        eprintln!("weft ray-member: no command");
        return 127;
    };
    install_handlers();
    let mut restarts = Restarts::default();
    loop {
        let started = Instant::now();
        let mut child = match std::process::Command::new(first).args(rest).spawn() {
            Ok(c) => c,
            Err(e) => {
                eprintln!(
                    "weft ray-member: cannot run {}: {e}",
                    first.to_string_lossy()
                );
                return 127;
            }
        };
        CHILD.store(i32::try_from(child.id()).unwrap_or(0), Ordering::SeqCst);
        if STOP.load(Ordering::SeqCst) {
            // A stop that came between the check and the spawn.
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        let status = match child.wait() {
            Ok(st) => st,
            Err(e) => {
                eprintln!("weft ray-member: wait failed: {e}");
                return 1;
            }
        };
        CHILD.store(0, Ordering::SeqCst);
        let code = exit_code(status);
        // A stop from the agent reaches Ray's own process groups too, maybe before us: give
        // it a moment to arrive before deciding that Ray exited on its own.
        if sleep_unless_stopped(Duration::from_millis(300)) {
            return code;
        }
        match restarts.on_exit(started, Instant::now()) {
            Decision::GiveUp(why) => {
                eprintln!("weft ray-member: Ray exited with status {code}; not restarted: {why}");
                return code;
            }
            Decision::Restart { after, count } => {
                eprintln!(
                    "weft ray-member: Ray exited with status {code} after {:.0?}; restarting it \
                     in {after:?} (restart {count} of at most {MAX_RESTARTS} in {:?})",
                    started.elapsed(),
                    WINDOW
                );
                if sleep_unless_stopped(after) {
                    return code;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_to_start_is_not_restarted() {
        let t = Instant::now();
        let mut r = Restarts::default();
        assert!(matches!(
            r.on_exit(t, t + Duration::from_secs(3)),
            Decision::GiveUp(_)
        ));
    }

    #[test]
    fn crashes_restart_with_growing_backoff_until_the_budget_is_spent() {
        let t0 = Instant::now();
        let mut r = Restarts::default();
        let mut now = t0;
        let mut seen = Vec::new();
        for _ in 0..MAX_RESTARTS {
            let started = now;
            now += Duration::from_secs(30);
            match r.on_exit(started, now) {
                Decision::Restart { after, count } => seen.push((after.as_secs(), count)),
                d => panic!("{d:?}"),
            }
        }
        assert_eq!(seen, vec![(1, 1), (2, 2), (4, 3), (8, 4), (10, 5)]);
        let started = now;
        now += Duration::from_secs(30);
        assert_eq!(
            r.on_exit(started, now),
            Decision::GiveUp("too many restarts")
        );
    }

    #[test]
    fn the_budget_refills_after_the_window() {
        let t0 = Instant::now();
        let mut r = Restarts::default();
        let mut now = t0;
        for _ in 0..MAX_RESTARTS {
            let s = now;
            now += MIN_UP;
            assert!(matches!(r.on_exit(s, now), Decision::Restart { .. }));
        }
        let s = now + WINDOW;
        now = s + MIN_UP;
        assert_eq!(
            r.on_exit(s, now),
            Decision::Restart {
                after: FIRST_BACKOFF,
                count: 1
            }
        );
    }
}
