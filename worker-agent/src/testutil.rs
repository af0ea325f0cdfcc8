//! Test helpers: an [`Engine`] over a scripted GPU snapshot in a temporary state dir.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;

use crate::agent::{Engine, EngineConfig};
use crate::gpu::{BackendState, GpuSample};
use crate::health::{Health, HealthState};
use crate::sampler::{GpuStatus, SharedSnapshot, Snapshot};

/// The H100's NVML total memory, bytes.
pub(crate) const H100_BYTES: u64 = 85_520_809_984;

/// One GPU as the sampler would publish it.
pub(crate) fn gpu(index: u32, uuid: &str, state: HealthState) -> GpuStatus {
    GpuStatus {
        sample: GpuSample {
            index,
            uuid: uuid.into(),
            name: Some("NVIDIA H100 80GB HBM3".into()),
            memory_total_bytes: Some(H100_BYTES),
            ..GpuSample::default()
        },
        health: Health {
            state,
            reasons: Vec::new(),
        },
        xid_counts: Default::default(),
    }
}

/// A snapshot of these GPUs (simulated, as from the stub).
pub(crate) fn snapshot(gpus: Vec<GpuStatus>) -> SharedSnapshot {
    Arc::new(RwLock::new(Snapshot {
        backend: BackendState::Ready(u32::try_from(gpus.len()).unwrap()),
        sampled_at_ms: 1,
        gpus,
        driver_version: Some("580.159.04-stub".into()),
        simulated: true,
    }))
}

/// An engine in `dir` (no shim, no cgroups, 1 s grace) over `snap`.
pub(crate) async fn engine(dir: &Path, snap: SharedSnapshot) -> Arc<Engine> {
    Engine::start(
        EngineConfig {
            state_dir: dir.to_path_buf(),
            kill_grace: Duration::from_secs(1),
            shim: None,
            cgroups: false,
        },
        snap,
    )
    .await
    .unwrap()
}
