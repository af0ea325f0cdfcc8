//! Weft's lab harness: network namespaces, veth links, a simulated internet,
//! NAT routers, our `mesh` node and the `wireguard-go` reference peer, and
//! traffic probes (ping, checksummed TCP transfers, iperf3, gap monitors).
//!
//! Every lab object lives in a namespace named `wft-*` and is torn down by a
//! drop guard, so tests can run in parallel and a panic leaves nothing behind.
//! See `/work/shared/LAB.md` for the machine facts this relies on.

pub mod agent;
pub mod cleanup;
pub mod delay;
pub mod fleet;
pub mod logtime;
pub mod managed;
pub mod netns;
pub mod node;
pub mod postgres;
pub mod proc;
pub mod ray;
pub mod router;
pub mod ssh;
pub mod traffic;
pub mod turn;
pub mod webdriver;
pub mod wgconf;
pub mod wggo;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub use cleanup::cleanup_stale;
pub use netns::{link, Netns};
pub use node::MeshNode;
pub use proc::Proc;
pub use router::{Internet, Nat, NattedWorker, NodePair, Router};
pub use wgconf::{
    connect_full_mesh, endpoint, overlay_node, overlay_v4, overlay_v6, Interface, Keypair, Peer,
};
pub use wggo::WgGo;

/// Every namespace the lab creates starts with this; cleanup touches nothing else.
pub const NETNS_PREFIX: &str = "wft-";

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.parent().map(PathBuf::from).unwrap_or(here)
}

/// Path of a project binary: `$WEFT_BIN_DIR/NAME` if set, else
/// `<workspace>/target/release/NAME`. Panics if it does not exist.
pub fn bin(name: &str) -> PathBuf {
    let path = match std::env::var_os("WEFT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir).join(name),
        None => workspace_root().join("target/release").join(name),
    };
    assert!(
        path.is_file(),
        "{} not found: build it first: cargo build --release --bins",
        path.display()
    );
    path
}

/// A WireGuard interface name unique across concurrently running tests (the
/// UAPI socket directory `/var/run/wireguard` is shared by all namespaces):
/// `wf<pid hex>x<counter>`, at most 15 characters.
pub fn unique_ifname() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let name = format!("wf{:x}x{n}", std::process::id());
    assert!(name.len() <= 15, "interface name {name} too long");
    name
}

/// The UAPI socket path of an interface.
pub fn uapi_socket(ifname: &str) -> PathBuf {
    PathBuf::from(format!("/var/run/wireguard/{ifname}.sock"))
}

/// Calls `attempt` every 100 ms until it gives `Ok`, for at most `within`;
/// that value, or the last `Err` (what was seen instead) when time is up.
pub fn retry<T>(
    within: Duration,
    mut attempt: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let t0 = Instant::now();
    loop {
        match attempt() {
            Ok(v) => return Ok(v),
            Err(last) if t0.elapsed() >= within => return Err(last),
            Err(_) => sleep(Duration::from_millis(100)),
        }
    }
}

/// Runs `run(cell, tag)` for every cell at once, each on its own thread and
/// with its own namespace tag `{prefix}{index}`; then panics naming every cell
/// that failed (or panicked), with its error.
pub fn run_cells<C: Sync>(
    prefix: &str,
    cells: &[C],
    name: impl Fn(&C) -> String,
    run: impl Fn(&C, &str) -> Result<(), String> + Sync,
) {
    let run = &run;
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| s.spawn(move || run(c, &format!("{prefix}{i}"))))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err("cell panicked".into())))
            .collect()
    });
    let failed: Vec<String> = cells
        .iter()
        .zip(&results)
        .filter_map(|(c, r)| r.as_ref().err().map(|e| format!("== {}: {e}", name(c))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} cells failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
}
