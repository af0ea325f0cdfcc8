//! The lab's end-to-end tests (network namespaces, real daemons and reference peers), one
//! test binary: one link instead of one per file (each costs ~15 s of CPU with thin LTO).
//! Each scenario file is a module: `cargo test --release -p weft-tests --test lab fleet_regions::`
//! runs one file's tests.
//!
//! Tests that start namespaces take [`lab_turn`] first: one file's tests at a time, as when
//! each file was a binary (they time failovers and traffic gaps, and two scenarios on two
//! vCPUs starve each other's nodes); tests that only read files or run a binary run beside
//! them.
//! The rekey soak (`rekey_soak.rs`, 6.5 min) and the Ray benchmark (`ray_bench.rs`) stay
//! binaries of their own: scripts run them (`--ignored`).

mod agent_mesh;
mod agent_relay;
mod bad_config;
mod fleet;
mod fleet_regions;
mod harness;
mod hostile;
mod import_graph;
mod interop_wggo;
mod mesh_full;
mod mesh_managed;
mod mesh_status;
mod nat;
mod nat_grid;
mod pool;
mod ray_cluster;
mod reach;
mod roaming;
mod wg_tools;

/// A scenario's turn at the lab: tests of one `group` may run together (as the tests of one
/// file did when each file was its own binary), tests of different groups one after the
/// other. Files whose tests must not overlap (`mesh_managed.rs`, `fleet.rs`: they time path
/// switches and failovers) give each test its own group.
pub(crate) fn lab_turn(group: &str) -> Turn {
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

/// Held while a test runs ([`lab_turn`]).
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
