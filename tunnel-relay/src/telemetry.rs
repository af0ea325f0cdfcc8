//! GPU telemetry the agents send on the pool feed (`AgentMsg::Telemetry`), kept for the web
//! view: each GPU's latest readings and one point per minute for the last hour (average
//! utilisation and power, highest temperature and memory in use). Pure; memory is bounded:
//! [`MINUTES`] points per GPU, GPUs of workers that said nothing for an hour are dropped.

use std::collections::{HashMap, VecDeque};

use serde::Serialize;
use weft_proto::pool::GpuReading;

/// Minutes of history per GPU.
pub const MINUTES: usize = 60;
/// Readings older than this are not "now" (the worker stopped sending).
pub const FRESH_MS: u64 = 30_000;
const MINUTE_MS: u64 = 60_000;

/// One minute of one GPU.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Minute {
    start_ms: u64,
    util_sum: u64,
    util_n: u32,
    power_sum: u64,
    power_n: u32,
    temp_max: Option<u32>,
    mem_max: Option<u64>,
}

/// One point of a GPU's last hour, as shown.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Unix ms of the minute's start.
    pub minute_ms: u64,
    /// Average utilisation, percent.
    pub util_pct: Option<f64>,
    /// Average power, watts.
    pub power_w: Option<f64>,
    /// Highest temperature, °C.
    pub temp_c: Option<u32>,
    /// Most memory in use, MiB.
    pub mem_used_mib: Option<u64>,
}

#[derive(Debug, Clone, Default)]
struct Gpu {
    latest: Option<(u64, GpuReading)>,
    minutes: VecDeque<Minute>,
}

/// Every worker's GPUs.
#[derive(Debug, Default)]
pub struct Telemetry {
    workers: HashMap<String, (u64, HashMap<String, Gpu>)>,
    /// Records since the last [`Telemetry::prune`].
    since_prune: u32,
    /// Readings that differed from their GPU's previous one (see [`Telemetry::changes`]).
    changes: u64,
}

impl Telemetry {
    /// `worker`'s readings at `at_ms`.
    pub fn record(&mut self, worker: &str, at_ms: u64, gpus: Vec<GpuReading>) {
        self.since_prune += 1;
        if self.since_prune >= 10_000 {
            self.since_prune = 0;
            self.prune(at_ms);
        }
        let (last, map) = self.workers.entry(worker.to_string()).or_default();
        *last = at_ms;
        for r in gpus {
            let g = map.entry(r.uuid.clone()).or_default();
            let start = at_ms - at_ms % MINUTE_MS;
            if g.minutes.back().is_none_or(|m| m.start_ms != start) {
                g.minutes.push_back(Minute {
                    start_ms: start,
                    ..Minute::default()
                });
                while g.minutes.len() > MINUTES {
                    g.minutes.pop_front();
                }
            }
            if let Some(m) = g.minutes.back_mut() {
                if let Some(u) = r.util_pct {
                    m.util_sum += u64::from(u.min(100));
                    m.util_n += 1;
                }
                if let Some(p) = r.power_mw {
                    m.power_sum += u64::from(p);
                    m.power_n += 1;
                }
                m.temp_max = m.temp_max.max(r.temp_c);
                m.mem_max = m.mem_max.max(r.mem_used_mib);
            }
            if g.latest.as_ref().is_none_or(|(_, old)| *old != r) {
                self.changes += 1;
            }
            g.latest = Some((at_ms, r));
        }
    }

    /// How many readings differed from their GPU's previous one (never decreases): an idle
    /// GPU reporting the same figures every few seconds is no change for the web view.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Forgets workers that sent nothing for an hour.
    pub fn prune(&mut self, now_ms: u64) {
        self.workers
            .retain(|_, (last, _)| now_ms.saturating_sub(*last) < MINUTES as u64 * MINUTE_MS);
    }

    /// The GPU's readings, when fresh.
    pub fn latest(&self, worker: &str, uuid: &str, now_ms: u64) -> Option<&GpuReading> {
        let (at, r) = self.workers.get(worker)?.1.get(uuid)?.latest.as_ref()?;
        (now_ms.saturating_sub(*at) < FRESH_MS).then_some(r)
    }

    /// The GPU's last hour, oldest first.
    pub fn history(&self, worker: &str, uuid: &str, now_ms: u64) -> Vec<Point> {
        let Some(g) = self.workers.get(worker).and_then(|(_, m)| m.get(uuid)) else {
            return Vec::new();
        };
        g.minutes
            .iter()
            .filter(|m| now_ms.saturating_sub(m.start_ms) < MINUTES as u64 * MINUTE_MS)
            .map(|m| Point {
                minute_ms: m.start_ms,
                util_pct: (m.util_n > 0).then(|| m.util_sum as f64 / f64::from(m.util_n)),
                power_w: (m.power_n > 0)
                    .then(|| m.power_sum as f64 / f64::from(m.power_n) / 1000.0),
                temp_c: m.temp_max,
                mem_used_mib: m.mem_max,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(util: u32, temp: u32, mw: u32) -> GpuReading {
        GpuReading {
            uuid: "GPU-1".into(),
            util_pct: Some(util),
            mem_used_mib: Some(u64::from(util) * 10),
            temp_c: Some(temp),
            power_mw: Some(mw),
        }
    }

    #[test]
    fn minutes_average_and_the_hour_is_bounded() {
        let mut t = Telemetry::default();
        let t0 = 10 * MINUTE_MS;
        t.record("w", t0, vec![r(20, 50, 100_000)]);
        t.record("w", t0 + 5_000, vec![r(40, 60, 300_000)]);
        t.record("w", t0 + MINUTE_MS, vec![r(100, 55, 200_000)]);
        let h = t.history("w", "GPU-1", t0 + MINUTE_MS);
        assert_eq!(h.len(), 2);
        assert_eq!(
            (h[0].util_pct, h[0].power_w, h[0].temp_c),
            (Some(30.0), Some(200.0), Some(60))
        );
        assert_eq!(h[0].mem_used_mib, Some(400));
        assert_eq!(
            t.latest("w", "GPU-1", t0 + MINUTE_MS)
                .and_then(|g| g.util_pct),
            Some(100)
        );
        assert!(
            t.latest("w", "GPU-1", t0 + MINUTE_MS + FRESH_MS).is_none(),
            "stale"
        );
        for i in 0..200 {
            t.record("w", t0 + i * MINUTE_MS, vec![r(1, 1, 1)]);
        }
        assert_eq!(t.history("w", "GPU-1", t0 + 199 * MINUTE_MS).len(), MINUTES);
        t.prune(t0 + 199 * MINUTE_MS + 2 * MINUTES as u64 * MINUTE_MS);
        assert!(
            t.history("w", "GPU-1", t0).is_empty(),
            "an hour of silence forgets it"
        );
    }
}
