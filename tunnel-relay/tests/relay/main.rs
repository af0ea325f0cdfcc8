//! The relay's integration tests, one test binary (one thin-LTO link instead of one per
//! file): each file is a module (`cargo test --release -p tunnel-relay --test relay
//! loopback::` runs one). `relay_lab` is the in-process relay on loopback the tests share
//! (`cli/tests/cli.rs` includes it too), `relay_bin` runs the `tunnel-relay` binary.
//! Every test takes `weft_tests::turn::take` first: one file's tests run together, as when each file was a
//! binary (the loopback suites and the namespace tests share two vCPUs).

mod relay_bin;
mod relay_lab;

mod cli;
mod explorer_bench;
mod fleet_bench;
mod hangup;
mod idle_workers;
mod in_process_service;
mod loopback;
mod mesh_coord;
mod netns_ssh;
mod pool_feed;
mod web;
