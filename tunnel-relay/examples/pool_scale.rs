//! Pool scheduler scale benchmark (issue 11): the pure core with 10,000
//! workers × 8 GPUs and 100,000 queued jobs of mixed specs and priorities.
//!
//! ```text
//! cargo run --release -p tunnel-relay --example pool_scale [WORKERS]   # default: 10000
//! ```
//!
//! Prints (1) placements per second for the first tick that fills the pool
//! from a 100,000-job queue, (2) steady-state placements per second (one job
//! ends, one tick places the next), and (3) the time of one event (a job ends
//! and the tick places one job; a GPU goes unhealthy and the tick runs) with
//! 1,000, 10,000 and 100,000 jobs queued.

use std::time::{Duration, Instant};

use tunnel_relay::pool::{
    GpuReport, GpuSpec, Inventory, JobId, JobSpec, JobState, Outcome, Pool, PoolConfig,
};

const KINDS: [(&str, u64); 4] = [
    ("NVIDIA A100-SXM4-80GB", 81920),
    ("NVIDIA H100 80GB HBM3", 81559),
    ("NVIDIA GeForce RTX 4090", 24564),
    ("NVIDIA A100-PCIE-40GB", 40960),
];

/// (spec, --gpus, --nodes)
const MIX: [(&str, u32, u32); 10] = [
    ("A100", 1, 1),
    ("H100", 1, 1),
    ("RTX4090:2", 1, 1),
    ("80GB..:2", 1, 1),
    ("24GB..", 4, 1),
    ("A100:8", 1, 1),
    ("H100,A100:40GB..:4", 1, 1),
    ("", 1, 1),
    ("H100:8", 1, 2),
    ("..30GB:1..4", 1, 1),
];

/// A tiny deterministic generator (xorshift), so runs compare.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn inventory(i: usize, healthy: bool) -> Inventory {
    let (model, mem) = KINDS[i % KINDS.len()];
    Inventory {
        worker: format!("w{i}"),
        gpus: (0..8)
            .map(|g| GpuReport {
                uuid: format!("GPU-{i}-{g}"),
                model: model.to_string(),
                memory_mib: mem,
                healthy: healthy || g != 0,
                busy: false,
            })
            .collect(),
        ray: false,
    }
}

fn spec(rng: &mut Rng) -> JobSpec {
    let (s, gpus, nodes) = MIX[(rng.next() % MIX.len() as u64) as usize];
    let gpu: GpuSpec = if s.is_empty() {
        GpuSpec::default()
    } else {
        s.parse().expect("benchmark spec")
    };
    let mut js = JobSpec::new("bench", gpu);
    js.gpus = gpus;
    js.nodes = nodes;
    js.priority = [0, 10, 50, 90][(rng.next() % 4) as usize];
    js
}

fn pool(workers: usize, now: Instant) -> Pool {
    let mut p = Pool::new(PoolConfig::default());
    for i in 0..workers {
        p.worker_update(now, inventory(i, true));
    }
    p
}

fn submit(p: &mut Pool, rng: &mut Rng, n: usize, now: Instant) -> Vec<JobId> {
    (0..n)
        .map(|_| p.submit(now, spec(rng)).expect("satisfiable"))
        .collect()
}

fn main() {
    let workers: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let now = Instant::now();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    println!("pool_scale: {workers} workers x 8 GPUs, mixed specs {MIX:?}");
    let t = Instant::now();
    let mut p = pool(workers, now);
    println!("  {workers} worker inventories: {:?}", t.elapsed());

    // (1) Fill the pool from a 100,000-job queue.
    let t = Instant::now();
    let mut ids = submit(&mut p, &mut rng, 100_000, now);
    let submit_time = t.elapsed();
    println!(
        "  submit 100000 jobs: {submit_time:?} ({:.0} submits/s)",
        100_000.0 / submit_time.as_secs_f64()
    );
    let t = Instant::now();
    let d = p.tick(now);
    let fill = t.elapsed();
    let placed = d.placements.len();
    println!(
        "  first tick: {placed} placements in {fill:?} = {:.0} placements/s ({} still queued)",
        placed as f64 / fill.as_secs_f64(),
        p.pending()
    );

    // (2) Steady state: end the oldest running job, tick, repeat.
    let mut running: std::collections::VecDeque<JobId> =
        d.placements.iter().map(|pl| pl.job).collect();
    let rounds = 20_000;
    let mut placed = 0usize;
    let t = Instant::now();
    for _ in 0..rounds {
        let Some(j) = running.pop_front() else { break };
        p.job_ended(j, Outcome::Succeeded, now);
        let d = p.tick(now);
        placed += d.placements.len();
        running.extend(d.placements.iter().map(|pl| pl.job));
    }
    let steady = t.elapsed();
    println!(
        "  steady state: {rounds} (job ends + tick): {placed} placements in {steady:?} = {:.0} placements/s",
        placed as f64 / steady.as_secs_f64()
    );
    ids.retain(|&j| p.state(j) == Some(JobState::Pending));

    // (3) One event's cost against the queue length.
    println!("  one event (mean of 2000) by queue length:");
    for queued in [1_000usize, 10_000, 100_000] {
        let mut rng = Rng(42);
        let mut p = pool(workers, now);
        // Fill every GPU with 1-GPU jobs of any kind, then queue `queued` mixed jobs.
        let mut fill_spec = JobSpec::new("bench", GpuSpec::default());
        fill_spec.priority = 100;
        let fillers: Vec<JobId> = (0..workers * 8)
            .map(|_| p.submit(now, fill_spec.clone()).expect("fill"))
            .collect();
        p.tick(now);
        submit(&mut p, &mut rng, queued, now);
        p.tick(now);
        let n = 2000;
        let mut fillers = fillers.into_iter();
        let mut ended = Duration::ZERO;
        for _ in 0..n {
            let Some(j) = fillers.next() else { break };
            let t = Instant::now();
            p.job_ended(j, Outcome::Succeeded, now);
            p.tick(now);
            ended += t.elapsed();
        }
        let mut unhealthy = Duration::ZERO;
        for i in 0..n {
            let inv = inventory(workers - 1 - i, false);
            let t = Instant::now();
            p.worker_update(now, inv);
            p.tick(now);
            unhealthy += t.elapsed();
        }
        println!(
            "    {queued:>6} queued ({:>6} pending after): job ends + tick {:>8.2} µs, GPU unhealthy + tick {:>8.2} µs",
            p.pending(),
            ended.as_secs_f64() * 1e6 / n as f64,
            unhealthy.as_secs_f64() * 1e6 / n as f64,
        );
    }
    let _ = ids;
}
