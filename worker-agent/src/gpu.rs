//! GPU inventory and telemetry: the [`GpuBackend`] seam, its data types, and a scriptable fake.
//!
//! A field a device does not support is `None` everywhere (API, status, `/metrics`), never 0.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub mod nvml;

/// Whether NVML is usable on this machine. Each case is distinct; all but `Ready` leave a CPU-only worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum BackendState {
    /// `libnvidia-ml.so` could not be loaded (no driver user-space installed).
    NoLibrary(String),
    /// The library loaded but the kernel driver is not loaded.
    DriverNotLoaded(String),
    /// NVML works and reports zero GPUs.
    NoGpus,
    /// NVML works and reports this many GPUs.
    Ready(u32),
    /// NVML failed in another way.
    Error(String),
}

/// A process using a GPU, as NVML reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuProcess {
    pub pid: u32,
    /// Bytes of GPU memory, absent when NVML cannot tell.
    pub used_memory_bytes: Option<u64>,
}

/// One reading of one GPU. `None` means "not supported or not readable", never zero.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuSample {
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub uuid: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    /// The device answered `GpuLost` (fallen off the bus).
    pub lost: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_free_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_gpu_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub utilization_memory_percent: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_draw_milliwatts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub power_limit_milliwatts: Option<u32>,
    /// Counter since driver load, read on a slower timer (it costs ~4 ms per call on an H100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub energy_millijoules: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_clock_mhz: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fan_speed_percent: Option<u32>,
    /// NVML throttle reason names, e.g. `GPU_IDLE`, `SW_POWER_CAP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecc_corrected_volatile: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected_volatile: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retired_pages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processes: Option<Vec<GpuProcess>>,
}

/// An asynchronous GPU event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidEvent {
    pub uuid: String,
    pub xid: u64,
}

/// The seam between the sampler and NVML. Implementations are called from the sampler thread only.
pub trait GpuBackend: Send {
    fn state(&self) -> BackendState;
    /// Reads every cheap field of every GPU (no energy).
    fn sample_fast(&mut self) -> Vec<GpuSample>;
    /// Reads the energy counter of GPU `index` (slow on real hardware).
    fn energy_millijoules(&mut self, index: u32) -> Option<u64>;
    /// Waits up to `timeout` for XID events; returns at once when none can be delivered.
    fn wait_events(&mut self, timeout: Duration) -> Vec<XidEvent>;
    /// The driver version NVML reports (`nvmlSystemGetDriverVersion`), when it answers.
    fn driver_version(&self) -> Option<String> {
        None
    }
}

/// Whether a driver version names the stub NVML (`worker-agent/tests/stub/nvml_stub.c`
/// answers `580.159.04-stub`): its GPUs are simulated.
pub fn is_stub_driver(version: &str) -> bool {
    version.contains("stub")
}

/// A backend with no GPUs, used when NVML is unavailable. Carries the reason.
#[derive(Debug)]
pub struct NoGpuBackend(pub BackendState);

impl GpuBackend for NoGpuBackend {
    fn state(&self) -> BackendState {
        self.0.clone()
    }
    fn sample_fast(&mut self) -> Vec<GpuSample> {
        Vec::new()
    }
    fn energy_millijoules(&mut self, _index: u32) -> Option<u64> {
        None
    }
    fn wait_events(&mut self, timeout: Duration) -> Vec<XidEvent> {
        std::thread::sleep(timeout);
        Vec::new()
    }
}

/// What a [`FakeBackend`] answers; tests change it through the shared handle.
#[derive(Debug, Default)]
pub struct FakeScript {
    pub gpus: Vec<GpuSample>,
    pub energy: Vec<Option<u64>>,
    pub pending_events: Vec<XidEvent>,
    pub energy_calls: u64,
}

/// A scriptable in-memory backend for unit tests.
#[derive(Debug, Clone, Default)]
pub struct FakeBackend {
    pub script: Arc<Mutex<FakeScript>>,
}

impl GpuBackend for FakeBackend {
    fn state(&self) -> BackendState {
        let n = self.script.lock().gpus.len();
        if n == 0 {
            BackendState::NoGpus
        } else {
            BackendState::Ready(u32::try_from(n).unwrap_or(u32::MAX))
        }
    }
    fn sample_fast(&mut self) -> Vec<GpuSample> {
        self.script.lock().gpus.clone()
    }
    fn energy_millijoules(&mut self, index: u32) -> Option<u64> {
        let mut s = self.script.lock();
        s.energy_calls += 1;
        s.energy.get(index as usize).copied().flatten()
    }
    fn wait_events(&mut self, timeout: Duration) -> Vec<XidEvent> {
        let ev = std::mem::take(&mut self.script.lock().pending_events);
        if ev.is_empty() {
            std::thread::sleep(timeout.min(Duration::from_millis(5)));
        }
        ev
    }
}
