//! Coordinator scale benchmark (issue 5): N nodes (half workers, half
//! engineers, default policy) join an in-process coordinator core; then the
//! time for one more join to produce and encode every peer's update, and the
//! heap per node.
//!
//! ```text
//! cargo run --release -p tunnel-relay --example coord_scale [N ...]   # default: 1000 10000
//! ```
//!
//! "Reach every peer" here is the coordinator's share: the core call plus
//! encoding one frame per recipient (what the shell then writes to each
//! control stream). Heap is counted by a global allocator wrapper, so it is
//! the coordinator's own memory (records, tag-set index, delta logs), not RSS.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tunnel_relay::coord::wire::ControlMsg;
use tunnel_relay::coord::{
    Candidate, CandidateKind, CoordConfig, Coordinator, JoinRequest, PeerMapUpdate,
};
use tunnel_relay::PublicKey;

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn key(i: u32) -> PublicKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    PublicKey(k)
}

fn req(i: u32, worker: bool) -> JoinRequest {
    JoinRequest {
        key: key(i),
        name: format!("{}{i}", if worker { "w" } else { "e" }),
        tags: vec![if worker { "worker" } else { "engineer" }.to_string()],
        endpoints: vec![
            Candidate {
                addr: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8)),
                    41641,
                ),
                kind: CandidateKind::Local,
            },
            Candidate {
                addr: SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::new(203, 0, (i >> 8) as u8, i as u8)),
                    41641,
                ),
                kind: CandidateKind::Reflexive,
            },
        ],
        since: None,
        home: None,
    }
}

fn one_more(c: &mut Coordinator, i: u32, worker: bool) -> anyhow::Result<(f64, f64, usize, usize)> {
    let t0 = Instant::now();
    let (_, out) = c.join(req(i, worker))?;
    let core = t0.elapsed().as_secs_f64() * 1e3;
    let mut bytes = 0;
    for (_, u) in &out {
        bytes += ControlMsg::from(u.clone()).encode_frame()?.len();
    }
    let total = t0.elapsed().as_secs_f64() * 1e3;
    let deltas = out
        .iter()
        .filter(|(_, u)| matches!(u, PeerMapUpdate::Delta(_)))
        .count();
    Ok((core, total, deltas, bytes))
}

fn main() -> anyhow::Result<()> {
    let sizes: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let sizes = if sizes.is_empty() {
        vec![1_000, 10_000]
    } else {
        sizes
    };
    println!("| nodes | populate s | join worker: core ms / +encode ms (deltas, bytes) | join engineer: core ms / +encode ms (deltas, bytes) | heap per node |");
    println!("|---|---|---|---|---|");
    for n in sizes {
        let before = LIVE.load(Ordering::Relaxed);
        let mut c = Coordinator::new(CoordConfig::default(), 1)?;
        let t = Instant::now();
        for i in 0..n {
            c.join(req(i, i % 2 == 0))?;
        }
        let populate = t.elapsed().as_secs_f64();
        let heap = LIVE.load(Ordering::Relaxed).saturating_sub(before);
        let (wc, wt, wd, wb) = one_more(&mut c, n + 1, true)?;
        let (ec, et, ed, eb) = one_more(&mut c, n + 2, false)?;
        println!(
            "| {n} | {populate:.2} | {wc:.2} / {wt:.2} ({wd}, {wb}) | {ec:.2} / {et:.2} ({ed}, {eb}) | {} B |",
            heap / n as usize
        );
    }
    Ok(())
}
