//! Prometheus text exposition of the last snapshot. Names and units follow DCGM's meaning
//! (utilization %, memory bytes, temperature °C, power W, energy J counter), prefixed `weft_gpu_`.
//! Absent fields produce no sample (never 0).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::gpu::GpuSample;
use crate::sampler::{GpuStatus, Snapshot};

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A metric family's type.
#[derive(Clone, Copy)]
enum Kind {
    Gauge,
    Counter,
}

/// The `# HELP` and `# TYPE` lines of a family.
fn header(out: &mut String, name: &str, help: &str, kind: Kind) {
    let kind = match kind {
        Kind::Gauge => "gauge",
        Kind::Counter => "counter",
    };
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// One value per GPU, read from its sample: `None` writes no sample for that GPU.
type Reading = fn(&GpuSample) -> Option<f64>;

fn milli(v: u32) -> f64 {
    f64::from(v) / 1000.0
}

/// The per-GPU families that are one number read from the sample, in the order written.
const SAMPLED: &[(&str, &str, Kind, Reading)] = &[
    (
        "weft_gpu_utilization_percent",
        "GPU utilization (%), like DCGM_FI_DEV_GPU_UTIL.",
        Kind::Gauge,
        |s| s.utilization_gpu_percent.map(f64::from),
    ),
    (
        "weft_gpu_memory_utilization_percent",
        "Memory controller utilization (%), like DCGM_FI_DEV_MEM_COPY_UTIL.",
        Kind::Gauge,
        |s| s.utilization_memory_percent.map(f64::from),
    ),
    (
        "weft_gpu_memory_total_bytes",
        "Framebuffer memory total (bytes).",
        Kind::Gauge,
        |s| s.memory_total_bytes.map(|v| v as f64),
    ),
    (
        "weft_gpu_memory_used_bytes",
        "Framebuffer memory used (bytes), like DCGM_FI_DEV_FB_USED.",
        Kind::Gauge,
        |s| s.memory_used_bytes.map(|v| v as f64),
    ),
    (
        "weft_gpu_memory_free_bytes",
        "Framebuffer memory free (bytes), like DCGM_FI_DEV_FB_FREE.",
        Kind::Gauge,
        |s| s.memory_free_bytes.map(|v| v as f64),
    ),
    (
        "weft_gpu_temperature_celsius",
        "GPU temperature (°C), like DCGM_FI_DEV_GPU_TEMP.",
        Kind::Gauge,
        |s| s.temperature_celsius.map(f64::from),
    ),
    (
        "weft_gpu_power_watts",
        "Power draw (W), like DCGM_FI_DEV_POWER_USAGE.",
        Kind::Gauge,
        |s| s.power_draw_milliwatts.map(milli),
    ),
    (
        "weft_gpu_power_limit_watts",
        "Enforced power limit (W).",
        Kind::Gauge,
        |s| s.power_limit_milliwatts.map(milli),
    ),
    (
        "weft_gpu_energy_joules_total",
        "Energy since driver load (J), like DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION.",
        Kind::Counter,
        |s| s.energy_millijoules.map(|v| v as f64 / 1000.0),
    ),
    (
        "weft_gpu_sm_clock_mhz",
        "SM clock (MHz), like DCGM_FI_DEV_SM_CLOCK.",
        Kind::Gauge,
        |s| s.sm_clock_mhz.map(f64::from),
    ),
    (
        "weft_gpu_memory_clock_mhz",
        "Memory clock (MHz), like DCGM_FI_DEV_MEM_CLOCK.",
        Kind::Gauge,
        |s| s.memory_clock_mhz.map(f64::from),
    ),
    (
        "weft_gpu_fan_speed_percent",
        "Fan speed (%); absent on passively cooled GPUs.",
        Kind::Gauge,
        |s| s.fan_speed_percent.map(f64::from),
    ),
    (
        "weft_gpu_ecc_corrected_volatile_total",
        "Corrected ECC errors since driver load.",
        Kind::Counter,
        |s| s.ecc_corrected_volatile.map(|v| v as f64),
    ),
    (
        "weft_gpu_ecc_uncorrected_volatile_total",
        "Uncorrectable ECC errors since driver load.",
        Kind::Counter,
        |s| s.ecc_uncorrected_volatile.map(|v| v as f64),
    ),
    (
        "weft_gpu_lost",
        "1 when the GPU has fallen off the bus.",
        Kind::Gauge,
        |s| Some(if s.lost { 1.0 } else { 0.0 }),
    ),
    (
        "weft_gpu_processes",
        "Compute processes running on the GPU.",
        Kind::Gauge,
        |s| s.processes.as_ref().map(|p| p.len() as f64),
    ),
];

/// Writes a per-GPU family: its header, then each GPU's samples, as `each` gives them (the
/// labels after the GPU's own, and the value; none, one or several a GPU).
fn per_gpu<V: std::fmt::Display>(
    out: &mut String,
    (name, help, kind): (&str, &str, Kind),
    gpus: &[(&GpuStatus, String)],
    each: impl Fn(&GpuStatus) -> Vec<(String, V)>,
) {
    header(out, name, help, kind);
    for (gpu, labels) in gpus {
        for (more, v) in each(gpu) {
            let _ = writeln!(out, "{name}{{{labels}{more}}} {v}");
        }
    }
}

/// Renders `/metrics`. `holders` maps GPU UUID → job id for GPUs a job holds now.
pub fn render(
    snap: &Snapshot,
    holders: &BTreeMap<String, u64>,
    jobs_by_state: &BTreeMap<&'static str, u64>,
) -> String {
    let mut out = String::new();
    let gpus: Vec<(&GpuStatus, String)> = snap
        .gpus
        .iter()
        .map(|g| {
            let s = &g.sample;
            let mut l = format!(
                "gpu=\"{}\",uuid=\"{}\",model=\"{}\"",
                s.index,
                esc(&s.uuid),
                esc(s.name.as_deref().unwrap_or(""))
            );
            if let Some(j) = holders.get(&s.uuid) {
                let _ = write!(l, ",job_id=\"{j}\"");
            }
            (g, l)
        })
        .collect();
    for &(name, help, kind, read) in SAMPLED {
        per_gpu(&mut out, (name, help, kind), &gpus, |g| {
            read(&g.sample)
                .map(|v| (String::new(), v))
                .into_iter()
                .collect()
        });
    }
    let health = (
        "weft_gpu_health",
        "GPU health: 1 for the current state.",
        Kind::Gauge,
    );
    per_gpu(&mut out, health, &gpus, |g| {
        ["healthy", "degraded", "unhealthy"]
            .map(|st| {
                let v = u8::from(g.health.state.as_str() == st);
                (format!(",state=\"{st}\""), v)
            })
            .into()
    });
    let throttle = (
        "weft_gpu_throttle_reason",
        "Active clock throttle reasons (NVML names).",
        Kind::Gauge,
    );
    per_gpu(&mut out, throttle, &gpus, |g| {
        let reasons = g.sample.throttle_reasons.iter().flatten();
        reasons
            .map(|r| (format!(",reason=\"{}\"", esc(r)), 1))
            .collect()
    });
    let xids = (
        "weft_gpu_xid_errors_total",
        "XID events seen since the agent started, by code.",
        Kind::Counter,
    );
    per_gpu(&mut out, xids, &gpus, |g| {
        let counts = g.xid_counts.iter();
        counts
            .map(|(xid, n)| (format!(",xid=\"{xid}\""), *n))
            .collect()
    });
    header(
        &mut out,
        "weft_agent_gpus",
        "GPUs NVML reports.",
        Kind::Gauge,
    );
    let _ = writeln!(out, "weft_agent_gpus {}", gpus.len());
    header(&mut out, "weft_agent_jobs", "Jobs by state.", Kind::Gauge);
    for (st, n) in jobs_by_state {
        let _ = writeln!(out, "weft_agent_jobs{{state=\"{st}\"}} {n}");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gpu::{BackendState, GpuSample};
    use crate::health::{Health, HealthState};

    fn status(sample: GpuSample) -> GpuStatus {
        GpuStatus {
            sample,
            health: Health {
                state: HealthState::Degraded,
                reasons: vec!["xid 79".into()],
            },
            xid_counts: BTreeMap::from([("79".to_string(), 2)]),
        }
    }

    #[test]
    fn one_header_a_family_and_no_sample_for_an_absent_field() {
        let read = GpuSample {
            index: 0,
            name: Some("H100 \"SXM\"".into()),
            uuid: "GPU-a".into(),
            power_draw_milliwatts: Some(312_345),
            energy_millijoules: Some(1_500),
            ..GpuSample::default()
        };
        let bare = GpuSample {
            index: 1,
            uuid: "GPU-b".into(),
            lost: true,
            ..GpuSample::default()
        };
        let snap = Snapshot {
            backend: BackendState::NoGpus,
            sampled_at_ms: 1,
            gpus: vec![status(read), status(bare)],
            driver_version: None,
            simulated: false,
        };
        let out = render(
            &snap,
            &BTreeMap::from([("GPU-a".to_string(), 7)]),
            &BTreeMap::from([("running", 1)]),
        );
        let a = r#"gpu="0",uuid="GPU-a",model="H100 \"SXM\"",job_id="7""#;
        let b = r#"gpu="1",uuid="GPU-b",model="""#;
        for line in [
            "# HELP weft_gpu_power_watts Power draw (W), like DCGM_FI_DEV_POWER_USAGE.",
            "# TYPE weft_gpu_power_watts gauge",
            "# TYPE weft_gpu_energy_joules_total counter",
            &format!("weft_gpu_power_watts{{{a}}} 312.345"),
            &format!("weft_gpu_energy_joules_total{{{a}}} 1.5"),
            &format!("weft_gpu_lost{{{a}}} 0"),
            &format!("weft_gpu_lost{{{b}}} 1"),
            &format!("weft_gpu_health{{{b},state=\"degraded\"}} 1"),
            &format!("weft_gpu_xid_errors_total{{{b},xid=\"79\"}} 2"),
            "weft_agent_gpus 2",
            "weft_agent_jobs{state=\"running\"} 1",
        ] {
            assert!(
                out.lines().any(|l| l == line),
                "{line:?} missing from\n{out}"
            );
        }
        assert!(
            !out.contains(&format!("weft_gpu_power_watts{{{b}}}")),
            "{out}"
        );
        assert!(!out.contains("weft_gpu_temperature_celsius{"), "{out}");
        let helps = out.lines().filter(|l| l.starts_with("# HELP ")).count();
        let types = out.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!((helps, types), (SAMPLED.len() + 5, SAMPLED.len() + 5));
    }
}
