//! The real backend: nvml-wrapper over `libnvidia-ml.so` (or the test stub via `lib_path`).

use std::ffi::OsStr;
use std::time::Duration;

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::{
    Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::event::EventSet;
use nvml_wrapper::struct_wrappers::device::ProcessInfo;
use nvml_wrapper::Nvml;
use tracing::{debug, warn};

use super::{BackendState, GpuBackend, GpuProcess, GpuSample, NoGpuBackend, XidEvent};

/// NVML-backed telemetry. The `Nvml` handle is leaked on purpose: it lives for the whole
/// process (one per agent) and `Device`/`EventSet` borrow it.
pub struct NvmlBackend {
    nvml: &'static Nvml,
    count: u32,
    /// UUIDs as first read, so a GPU keeps its identity after it is lost.
    uuids: Vec<Option<String>>,
    events: Option<EventSet<'static>>,
    /// `nvmlSystemGetDriverVersion`, read once at open.
    driver: Option<String>,
}

impl std::fmt::Debug for NvmlBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlBackend")
            .field("count", &self.count)
            .finish()
    }
}

/// Opens NVML from `lib_path` (or the loader's default) and returns a backend; when NVML is
/// unusable, returns a GPU-less backend that says why.
pub fn open(lib_path: Option<&OsStr>) -> Box<dyn GpuBackend> {
    let mut b = Nvml::builder();
    if let Some(p) = lib_path {
        b.lib_path(p);
    }
    let nvml = match b.init() {
        Ok(n) => n,
        Err(e) => {
            let state = classify_init_error(&e);
            warn!(error = %e, state = ?state, "NVML unavailable; running as a CPU-only worker");
            return Box::new(NoGpuBackend(state));
        }
    };
    let nvml: &'static Nvml = Box::leak(Box::new(nvml));
    let count = match nvml.device_count() {
        Ok(c) => c,
        Err(e) => return Box::new(NoGpuBackend(BackendState::Error(e.to_string()))),
    };
    if count == 0 {
        return Box::new(NoGpuBackend(BackendState::NoGpus));
    }
    let events = register_events(nvml, count);
    let driver = nvml.sys_driver_version().ok();
    Box::new(NvmlBackend {
        nvml,
        count,
        uuids: vec![None; count as usize],
        events,
        driver,
    })
}

fn classify_init_error(e: &NvmlError) -> BackendState {
    match e {
        NvmlError::LibloadingError(_) | NvmlError::LibraryNotFound => {
            BackendState::NoLibrary(e.to_string())
        }
        NvmlError::FailedToLoadSymbol(_) => BackendState::NoLibrary(e.to_string()),
        NvmlError::DriverNotLoaded => BackendState::DriverNotLoaded(e.to_string()),
        other => BackendState::Error(other.to_string()),
    }
}

fn register_events(nvml: &'static Nvml, count: u32) -> Option<EventSet<'static>> {
    let mut set = match nvml.create_event_set() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "NVML event set unavailable; XID events will not be seen");
            return None;
        }
    };
    for i in 0..count {
        let Ok(dev) = nvml.device_by_index(i) else {
            continue;
        };
        let wanted = EventTypes::CRITICAL_XID_ERROR;
        set = match dev.register_events(wanted, set) {
            Ok(s) => s,
            Err(e) => {
                warn!(gpu = i, error = %e.error, "cannot register XID events");
                match nvml.create_event_set() {
                    Ok(s) => s,
                    Err(_) => return None,
                }
            }
        };
    }
    Some(set)
}

/// `Ok(v)` → `Some(v)`; NotSupported/InvalidArg/any error → `None` (absent, never 0).
fn opt<T>(r: Result<T, NvmlError>, lost: &mut bool) -> Option<T> {
    match r {
        Ok(v) => Some(v),
        Err(NvmlError::GpuLost) => {
            *lost = true;
            None
        }
        Err(_) => None,
    }
}

fn process(p: ProcessInfo) -> GpuProcess {
    GpuProcess {
        pid: p.pid,
        used_memory_bytes: match p.used_gpu_memory {
            UsedGpuMemory::Used(b) => Some(b),
            UsedGpuMemory::Unavailable => None,
        },
    }
}

impl GpuBackend for NvmlBackend {
    fn state(&self) -> BackendState {
        BackendState::Ready(self.count)
    }

    fn driver_version(&self) -> Option<String> {
        self.driver.clone()
    }

    fn sample_fast(&mut self) -> Vec<GpuSample> {
        let mut out = Vec::with_capacity(self.count as usize);
        for index in 0..self.count {
            let dev = match self.nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    debug!(gpu = index, error = %e, "device handle unavailable");
                    let uuid = self.uuids.get(index as usize).cloned().flatten();
                    out.push(GpuSample {
                        index,
                        lost: matches!(e, NvmlError::GpuLost),
                        uuid: uuid.unwrap_or_else(|| format!("index-{index}")),
                        ..GpuSample::default()
                    });
                    continue;
                }
            };
            let mut lost = false;
            let cached = self.uuids.get(index as usize).cloned().flatten();
            let uuid = match cached {
                Some(u) => u,
                None => match opt(dev.uuid(), &mut lost) {
                    Some(u) => {
                        if let Some(slot) = self.uuids.get_mut(index as usize) {
                            *slot = Some(u.clone());
                        }
                        u
                    }
                    None => format!("index-{index}"),
                },
            };
            let mem = opt(dev.memory_info(), &mut lost);
            let util = opt(dev.utilization_rates(), &mut lost);
            let throttle = opt(dev.current_throttle_reasons(), &mut lost).map(|t| {
                t.iter_names()
                    .map(|(n, _)| n.to_string())
                    .collect::<Vec<_>>()
            });
            let s = GpuSample {
                index,
                name: opt(dev.name(), &mut lost),
                pci_bus_id: opt(dev.pci_info(), &mut lost).map(|p| p.bus_id),
                memory_total_bytes: mem.as_ref().map(|m| m.total),
                memory_used_bytes: mem.as_ref().map(|m| m.used),
                memory_free_bytes: mem.as_ref().map(|m| m.free),
                utilization_gpu_percent: util.as_ref().map(|u| u.gpu),
                utilization_memory_percent: util.as_ref().map(|u| u.memory),
                temperature_celsius: opt(dev.temperature(TemperatureSensor::Gpu), &mut lost),
                power_draw_milliwatts: opt(dev.power_usage(), &mut lost),
                power_limit_milliwatts: opt(dev.enforced_power_limit(), &mut lost),
                energy_millijoules: None,
                sm_clock_mhz: opt(dev.clock_info(Clock::SM), &mut lost),
                memory_clock_mhz: opt(dev.clock_info(Clock::Memory), &mut lost),
                fan_speed_percent: opt(dev.fan_speed(0), &mut lost),
                throttle_reasons: throttle,
                ecc_corrected_volatile: opt(
                    dev.total_ecc_errors(MemoryError::Corrected, EccCounter::Volatile),
                    &mut lost,
                ),
                ecc_uncorrected_volatile: opt(
                    dev.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile),
                    &mut lost,
                ),
                retired_pages: opt(
                    dev.retired_pages(RetirementCause::DoubleBitEccError),
                    &mut lost,
                )
                .map(|v| v.len() as u64),
                processes: opt(dev.running_compute_processes(), &mut lost)
                    .map(|v| v.into_iter().map(process).collect()),
                uuid,
                lost: false,
            };
            out.push(GpuSample { lost, ..s });
        }
        out
    }

    fn energy_millijoules(&mut self, index: u32) -> Option<u64> {
        let dev = self.nvml.device_by_index(index).ok()?;
        dev.total_energy_consumption().ok()
    }

    fn wait_events(&mut self, timeout: Duration) -> Vec<XidEvent> {
        let Some(set) = self.events.as_ref() else {
            std::thread::sleep(timeout);
            return Vec::new();
        };
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let mut out = Vec::new();
        let mut wait = ms;
        loop {
            match set.wait(wait) {
                Ok(ev) => {
                    if let Some(xid) = ev.event_data {
                        let code = match xid {
                            nvml_wrapper::enums::event::XidError::Value(v) => v,
                            nvml_wrapper::enums::event::XidError::Unknown => 999,
                        };
                        let uuid = ev.device.uuid().unwrap_or_default();
                        out.push(XidEvent { uuid, xid: code });
                    }
                    wait = 0; // drain what is queued without blocking again
                }
                Err(NvmlError::Timeout) => break,
                Err(e) => {
                    debug!(error = %e, "event wait failed");
                    if wait > 0 {
                        std::thread::sleep(timeout);
                    }
                    break;
                }
            }
        }
        out
    }
}
