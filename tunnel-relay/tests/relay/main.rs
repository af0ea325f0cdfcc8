//! The relay's integration tests, one test binary (one thin-LTO link instead of one per
//! file): each file is a module (`cargo test --release -p tunnel-relay --test relay
//! loopback::` runs one). `relay_lab` is the in-process relay on loopback the tests share
//! (`cli/tests/cli.rs` includes it too), `relay_bin` runs the `tunnel-relay` binary.
//! Every test takes [`turn`] first: one file's tests run together, as when each file was a
//! binary (the loopback suites and the namespace tests share two vCPUs).

mod relay_bin;
mod relay_lab;

mod cli;
mod fleet_bench;
mod hangup;
mod idle_workers;
mod in_process_service;
mod loopback;
mod mesh_coord;
mod netns_ssh;
mod pool_feed;

/// A file's turn: tests of one `group` may run together, tests of different groups one
/// after the other.
pub(crate) fn turn(group: &str) -> Turn {
    let mut st = TURN.lock().unwrap_or_else(|e| e.into_inner());
    while st.1 > 0 && st.0 != group {
        st = FREE.wait(st).unwrap_or_else(|e| e.into_inner());
    }
    st.0 = group.to_string();
    st.1 += 1;
    Turn
}

/// The group running now and how many of its tests.
static TURN: std::sync::Mutex<(String, usize)> = std::sync::Mutex::new((String::new(), 0));
static FREE: std::sync::Condvar = std::sync::Condvar::new();

/// Held while a test runs ([`turn`]).
pub(crate) struct Turn;

impl Drop for Turn {
    fn drop(&mut self) {
        let mut st = TURN.lock().unwrap_or_else(|e| e.into_inner());
        st.1 -= 1;
        if st.1 == 0 {
            FREE.notify_all();
        }
    }
}
