//! The lab's end-to-end tests (network namespaces, real daemons and reference peers), one
//! test binary: one link instead of one per file (each costs ~15 s of CPU with thin LTO).
//! Each scenario file is a module: `cargo test --release -p weft-tests --test lab fleet_regions::`
//! runs one file's tests.
//!
//! Tests that start namespaces take `weft_tests::turn::take` first: one file's tests at a time, as when
//! each file was a binary (they time failovers and traffic gaps, and two scenarios on two
//! vCPUs starve each other's nodes); tests that only read files or run a binary run beside
//! them.
//! The rekey soak (`rekey_soak.rs`, 6.5 min) and the Ray benchmark (`ray_bench.rs`) stay
//! binaries of their own: scripts run them (`--ignored`).

mod agent_mesh;
mod agent_relay;
mod bad_config;
mod explorer;
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
