//! The sampler: one OS thread that owns the [`GpuBackend`], reads fast fields every
//! `fast_interval`, energy every `energy_interval`, collects XID events, evaluates health, and
//! publishes a [`Snapshot`]. Readers only ever clone the last snapshot.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::gpu::{BackendState, GpuBackend, GpuSample};
use crate::health::{self, Health, HealthState, SeenXid};

#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    pub fast_interval: Duration,
    pub energy_interval: Duration,
    /// How long an XID keeps a GPU degraded/unhealthy.
    pub xid_window: Duration,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        Self {
            fast_interval: Duration::from_secs(1),
            energy_interval: Duration::from_secs(10),
            xid_window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GpuStatus {
    #[serde(flatten)]
    pub sample: GpuSample,
    pub health: Health,
    /// XID counts by code since the agent started.
    pub xid_counts: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub backend: BackendState,
    /// Unix milliseconds of the sample; 0 before the first one.
    pub sampled_at_ms: u64,
    pub gpus: Vec<GpuStatus>,
    /// The NVML driver version, when NVML answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver_version: Option<String>,
    /// The GPUs come from the stub NVML (its driver version says `stub`): simulated, for labs
    /// and tests.
    #[serde(default)]
    pub simulated: bool,
}

impl Snapshot {
    pub fn empty(backend: BackendState) -> Self {
        Self {
            backend,
            sampled_at_ms: 0,
            gpus: Vec::new(),
            driver_version: None,
            simulated: false,
        }
    }
    pub fn healthy_uuids(&self) -> Vec<String> {
        self.gpus
            .iter()
            .filter(|g| g.health.state != HealthState::Unhealthy)
            .map(|g| g.sample.uuid.clone())
            .collect()
    }
}

pub type SharedSnapshot = Arc<RwLock<Snapshot>>;

/// Handle to the sampler thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub snapshot: SharedSnapshot,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Takes one full sample synchronously (fast fields + energy) so the first snapshot is
/// complete before the API starts, then spawns the thread.
pub fn start(mut backend: Box<dyn GpuBackend>, cfg: SamplerConfig) -> std::io::Result<Sampler> {
    let state = backend.state();
    let driver = backend.driver_version();
    info!(backend = ?state, driver = ?driver, "GPU backend");
    let snapshot = Arc::new(RwLock::new(Snapshot::empty(state.clone())));
    let stop = Arc::new(AtomicBool::new(false));
    let mut core = SamplerCore::new(cfg);
    core.tick(backend.as_mut(), Instant::now(), true);
    *snapshot.write() = core.snapshot(state.clone(), driver.clone());
    let (snap, stop2) = (snapshot.clone(), stop.clone());
    let thread = std::thread::Builder::new()
        .name("gpu-sampler".into())
        .spawn(move || {
            let mut next_fast = Instant::now() + cfg.fast_interval;
            let mut next_energy = Instant::now() + cfg.energy_interval;
            while !stop2.load(Ordering::Relaxed) {
                let now = Instant::now();
                let wait = next_fast
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(200));
                let events = backend.wait_events(wait);
                let now = Instant::now();
                for e in events {
                    core.record_xid(e.uuid, e.xid, now);
                }
                if now >= next_fast {
                    let energy = now >= next_energy;
                    if energy {
                        next_energy = now + cfg.energy_interval;
                    }
                    core.tick(backend.as_mut(), now, energy);
                    next_fast = now + cfg.fast_interval;
                    *snap.write() = core.snapshot(backend.state(), driver.clone());
                }
            }
        })?;
    Ok(Sampler {
        stop,
        thread: Some(thread),
        snapshot,
    })
}

/// The sampler's state between ticks, kept apart from the thread so it is testable.
#[derive(Debug)]
struct SamplerCore {
    cfg: SamplerConfig,
    last: Vec<GpuSample>,
    energy: BTreeMap<u32, u64>,
    xids: BTreeMap<String, Vec<SeenXid>>,
    xid_counts: BTreeMap<String, BTreeMap<String, u64>>,
    health: BTreeMap<String, Health>,
}

impl SamplerCore {
    fn new(cfg: SamplerConfig) -> Self {
        Self {
            cfg,
            last: Vec::new(),
            energy: BTreeMap::new(),
            xids: BTreeMap::new(),
            xid_counts: BTreeMap::new(),
            health: BTreeMap::new(),
        }
    }

    fn record_xid(&mut self, uuid: String, xid: u64, now: Instant) {
        warn!(gpu = %uuid, xid, "XID event");
        *self
            .xid_counts
            .entry(uuid.clone())
            .or_default()
            .entry(xid.to_string())
            .or_default() += 1;
        self.xids
            .entry(uuid)
            .or_default()
            .push(SeenXid { xid, at: now });
    }

    fn tick(&mut self, backend: &mut dyn GpuBackend, now: Instant, read_energy: bool) {
        let mut samples = backend.sample_fast();
        for s in &mut samples {
            if read_energy && !s.lost {
                match backend.energy_millijoules(s.index) {
                    Some(e) => {
                        self.energy.insert(s.index, e);
                    }
                    None => {
                        self.energy.remove(&s.index);
                    }
                }
            }
            s.energy_millijoules = self.energy.get(&s.index).copied();
        }
        let window = self.cfg.xid_window;
        for s in &samples {
            let seen = self.xids.entry(s.uuid.clone()).or_default();
            seen.retain(|x| now.saturating_duration_since(x.at) <= window);
            let h = health::evaluate(s, seen, now, window);
            if self.health.get(&s.uuid).map(|p| p.state) != Some(h.state) {
                if h.state == HealthState::Healthy {
                    info!(gpu = %s.uuid, "GPU healthy");
                } else {
                    warn!(gpu = %s.uuid, state = h.state.as_str(), reasons = ?h.reasons, "GPU health changed");
                }
            }
            self.health.insert(s.uuid.clone(), h);
        }
        self.last = samples;
    }

    fn snapshot(&self, backend: BackendState, driver_version: Option<String>) -> Snapshot {
        let gpus = self
            .last
            .iter()
            .map(|s| GpuStatus {
                sample: s.clone(),
                health: self.health.get(&s.uuid).cloned().unwrap_or(Health {
                    state: HealthState::Healthy,
                    reasons: Vec::new(),
                }),
                xid_counts: self.xid_counts.get(&s.uuid).cloned().unwrap_or_default(),
            })
            .collect();
        Snapshot {
            backend,
            sampled_at_ms: unix_ms(),
            gpus,
            simulated: driver_version
                .as_deref()
                .is_some_and(crate::gpu::is_stub_driver),
            driver_version,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gpu::{FakeBackend, XidEvent};

    fn fake() -> FakeBackend {
        let f = FakeBackend::default();
        {
            let mut s = f.script.lock();
            s.gpus = vec![GpuSample {
                index: 0,
                uuid: "GPU-0".into(),
                ..GpuSample::default()
            }];
            s.energy = vec![Some(1000)];
        }
        f
    }

    #[test]
    fn energy_only_on_slow_ticks_and_kept_between() {
        let mut f = fake();
        let mut core = SamplerCore::new(SamplerConfig::default());
        let t = Instant::now();
        core.tick(&mut f, t, true);
        core.tick(&mut f, t, false);
        core.tick(&mut f, t, false);
        assert_eq!(f.script.lock().energy_calls, 1);
        let snap = core.snapshot(BackendState::Ready(1), None);
        assert_eq!(snap.gpus[0].sample.energy_millijoules, Some(1000));
    }

    #[test]
    fn xid_makes_unhealthy_and_window_recovers() {
        let mut f = fake();
        let cfg = SamplerConfig {
            xid_window: Duration::from_secs(10),
            ..SamplerConfig::default()
        };
        let mut core = SamplerCore::new(cfg);
        let t = Instant::now();
        f.script.lock().pending_events.push(XidEvent {
            uuid: "GPU-0".into(),
            xid: 79,
        });
        for e in f.wait_events(Duration::ZERO) {
            core.record_xid(e.uuid, e.xid, t);
        }
        core.tick(&mut f, t, false);
        let s = core.snapshot(BackendState::Ready(1), None);
        assert_eq!(s.gpus[0].health.state, HealthState::Unhealthy);
        assert!(s.healthy_uuids().is_empty());
        assert_eq!(s.gpus[0].xid_counts.get("79"), Some(&1));
        core.tick(&mut f, t + Duration::from_secs(11), false);
        let s = core.snapshot(BackendState::Ready(1), None);
        assert_eq!(s.gpus[0].health.state, HealthState::Healthy);
        assert_eq!(s.healthy_uuids(), vec!["GPU-0".to_string()]);
    }
}
