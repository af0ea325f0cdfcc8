//! The pool as text (pure): `weft pool`, `weft jobs list|show` of pool jobs, and the
//! operator's `tunnel-relay pool list` render the same views with these functions.

use std::fmt::Write as _;
use std::time::Duration;

use weft_proto::gpuspec::GpuSpec;
use weft_proto::pool::{JobView, PoolView, SubmitRequest, WorkerView};

/// Rows as aligned columns (two blanks apart, the last column not padded), each line
/// starting with `indent`.
pub fn columns(indent: &str, rows: &[Vec<String>]) -> String {
    let n = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..n)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::from(indent);
        for (c, cell) in r.iter().enumerate() {
            if c + 1 < r.len() {
                let pad = widths[c] - cell.chars().count();
                let _ = write!(line, "{cell}{}  ", " ".repeat(pad));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// What a job asked for, short: its `--gpu` spec (with `--gpus N` when the spec has no
/// count), `N×any`, or `-` for none.
pub fn spec_text(r: &SubmitRequest) -> String {
    match &r.gpu {
        Some(g) => {
            let has_count = g.parse::<GpuSpec>().is_ok_and(|s| s.count.is_some());
            if has_count || r.gpus == 0 {
                g.clone()
            } else {
                format!("{g} ×{}", r.gpus)
            }
        }
        None if r.gpus > 0 => format!("{}×any", r.gpus),
        None => "-".into(),
    }
}

/// The workers of a job's placement, in rank order: `gpu1, gpu2`.
pub fn workers_of(j: &JobView) -> String {
    if j.members.is_empty() {
        return "-".into();
    }
    j.members
        .iter()
        .map(|m| m.worker.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `jobs list`: one row per job.
pub fn jobs_table(jobs: &[JobView]) -> String {
    if jobs.is_empty() {
        return "no pool jobs\n".into();
    }
    let mut rows = vec![[
        "ID", "OWNER", "STATE", "SPEC", "NODES", "PRIO", "WORKERS", "REASON",
    ]
    .map(String::from)
    .to_vec()];
    for j in jobs {
        rows.push(vec![
            j.id.to_string(),
            j.owner.clone(),
            j.state.clone(),
            spec_text(&j.request),
            j.request.nodes.to_string(),
            j.request.priority.to_string(),
            workers_of(j),
            j.reason.clone().unwrap_or_default(),
        ]);
    }
    columns("", &rows)
}

/// `jobs show` / `jobs cancel`: the job, then one line per member.
pub fn job_text(j: &JobView) -> String {
    let r = &j.request;
    let mut s = format!(
        "pool job {}: {} (attempt {}), owner {}\n",
        j.id, j.state, j.attempt, j.owner
    );
    if let Some(reason) = &j.reason {
        let _ = writeln!(s, "  waiting:   {reason}");
    }
    let _ = writeln!(s, "  command:   {}", r.command.join(" "));
    let timeout = r.timeout_s.map_or("none".into(), |t| {
        crate::duration::format(Duration::from_secs(t))
    });
    let _ = writeln!(
        s,
        "  asks:      {}  nodes {}  priority {}  retries {}  timeout {}{}",
        spec_text(r),
        r.nodes,
        r.priority,
        r.retries,
        timeout,
        if r.wait_for_capacity {
            "  wait-for-capacity"
        } else {
            ""
        }
    );
    if let Some(w) = &r.worker {
        let _ = writeln!(s, "  only on:   {w}");
    }
    let _ = writeln!(
        s,
        "  submitted: {}  started: {}  ended: {}",
        utc_opt(Some(j.submitted_ms)),
        utc_opt(j.started_ms),
        utc_opt(j.ended_ms)
    );
    let rows: Vec<Vec<String>> = j
        .members
        .iter()
        .map(|m| {
            vec![
                format!("rank {}", m.rank),
                m.worker.clone(),
                m.local_id
                    .map_or("not started".into(), |l| format!("local job {l}")),
                match m.exit_code {
                    Some(c) => format!("{} (exit {c})", m.state),
                    None => m.state.clone(),
                },
                m.gpus.join(","),
            ]
        })
        .collect();
    s.push_str(&columns("  ", &rows));
    s
}

/// A span of time, two units: `3d 4h`, `2h 5m`, `4m 10s`, `12s`.
pub fn span(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// A GPU's memory as the spec grammar compares it: whole GB (GiB, rounded to the nearest).
pub fn gpu_gb(mib: u64) -> u64 {
    weft_proto::gpuspec::nominal_mib(mib) / 1024
}

/// One worker's block: its line (state, uptime, inventory), then a line per GPU.
pub fn worker_text(w: &WorkerView, now_ms: u64) -> String {
    let inv = &w.inventory;
    let link = match w.connected_since_ms {
        Some(t) => format!("connected since {}", utc(t)),
        None => format!(
            "last seen {} ago",
            span(now_ms.saturating_sub(w.last_seen_ms))
        ),
    };
    let ray = match &inv.ray {
        Some(v) => format!(", ray {v}"),
        None => ", no ray (not for clusters)".to_string(),
    };
    let mut s = format!(
        "{}  {}  uptime {}, {link}  {} CPUs, {} GiB, agent {}{ray}{}\n",
        w.name,
        w.state,
        // Connected time so far: closed sessions plus the current one.
        span(w.uptime_ms + w.connected_since_ms.map_or(0, |t| now_ms.saturating_sub(t))),
        inv.cpus,
        inv.memory_bytes >> 30,
        inv.version,
        if inv.simulated {
            "  simulated GPUs (stub NVML)"
        } else {
            ""
        }
    );
    if inv.gpus.is_empty() {
        s.push_str("  no GPUs\n");
        return s;
    }
    let rows: Vec<Vec<String>> = inv
        .gpus
        .iter()
        .enumerate()
        .map(|(i, g)| {
            let holder = match (w.holders.get(i).copied().flatten(), g.job) {
                (Some(job), _) => format!("job {job}"),
                (None, Some(local)) => format!("busy (local job {local}, not the pool's)"),
                (None, None) => "free".into(),
            };
            let mut row = vec![
                format!("GPU {i}"),
                g.model.clone(),
                format!("{} GB", gpu_gb(g.memory_mib)),
                g.health.clone(),
                holder,
            ];
            if w.flagged.contains(&g.uuid) {
                row.push(format!(
                    "{}: FLAGGED, reported by another worker too (not scheduled)",
                    g.uuid
                ));
            }
            row
        })
        .collect();
    s.push_str(&columns("  ", &rows));
    s
}

/// `weft pool`: every worker with every GPU, then the queue.
pub fn pool_text(p: &PoolView, now_ms: u64) -> String {
    let mut s = String::new();
    if p.workers.is_empty() {
        s.push_str("no workers have reported to the pool\n");
    }
    for w in &p.workers {
        s.push_str(&worker_text(w, now_ms));
    }
    let _ = writeln!(
        s,
        "\nqueue (policy {}): {}",
        p.policy,
        match p.queue.len() {
            0 => "empty".to_string(),
            1 => "1 job".to_string(),
            n => format!("{n} jobs"),
        }
    );
    let rows: Vec<Vec<String>> = p
        .queue
        .iter()
        .map(|j| {
            let whereabouts = match (&j.reason, j.members.is_empty()) {
                (Some(r), _) => format!("waiting: {r}"),
                (None, true) => "waiting".into(),
                (None, false) => format!(
                    "on {}",
                    j.members
                        .iter()
                        .map(|m| format!("{} (rank {})", m.worker, m.rank))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            vec![
                format!("job {}", j.id),
                j.state.clone(),
                j.owner.clone(),
                format!("prio {}", j.request.priority),
                spec_text(&j.request),
                format!(
                    "{} node{}",
                    j.request.nodes,
                    if j.request.nodes == 1 { "" } else { "s" }
                ),
                whereabouts,
            ]
        })
        .collect();
    s.push_str(&columns("  ", &rows));
    s
}

// ---- time (pure, UTC) ----

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (`civil_from_days`).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (date, hh, mm, ss, ms) of Unix ms.
pub fn parts(ms: u64) -> ((i64, u32, u32), u64, u64, u64, u64) {
    let s = ms / 1000;
    let days = (s / 86_400) as i64;
    let t = s % 86_400;
    (
        civil_from_days(days),
        t / 3600,
        t / 60 % 60,
        t % 60,
        ms % 1000,
    )
}

/// `2025-01-31 12:00:05` (UTC).
pub fn utc(ms: u64) -> String {
    let ((y, mo, d), h, mi, s, _) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

pub fn utc_opt(ms: Option<u64>) -> String {
    ms.map_or("-".into(), utc)
}

/// `2025-01-31T12:00:05.123Z`.
pub fn rfc3339(ms: u64) -> String {
    let ((y, mo, d), h, mi, s, milli) = parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}Z")
}
