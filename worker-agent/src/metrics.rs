//! Prometheus text exposition of the last snapshot. Names and units follow DCGM's meaning
//! (utilization %, memory bytes, temperature °C, power W, energy J counter), prefixed `weft_gpu_`.
//! Absent fields produce no sample (never 0).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::sampler::Snapshot;

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Renders `/metrics`. `holders` maps GPU UUID → job id for GPUs a job holds now.
pub fn render(
    snap: &Snapshot,
    holders: &BTreeMap<String, u64>,
    jobs_by_state: &BTreeMap<&'static str, u64>,
) -> String {
    let mut out = String::new();
    let labels: Vec<String> = snap
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
            l
        })
        .collect();
    let mut gauge = |name: &str, help: &str, kind: &str, f: &dyn Fn(usize) -> Option<f64>| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (i, l) in labels.iter().enumerate() {
            if let Some(v) = f(i) {
                let _ = writeln!(out, "{name}{{{l}}} {v}");
            }
        }
    };
    let g = &snap.gpus;
    gauge(
        "weft_gpu_utilization_percent",
        "GPU utilization (%), like DCGM_FI_DEV_GPU_UTIL.",
        "gauge",
        &|i| g[i].sample.utilization_gpu_percent.map(f64::from),
    );
    gauge(
        "weft_gpu_memory_utilization_percent",
        "Memory controller utilization (%), like DCGM_FI_DEV_MEM_COPY_UTIL.",
        "gauge",
        &|i| g[i].sample.utilization_memory_percent.map(f64::from),
    );
    gauge(
        "weft_gpu_memory_total_bytes",
        "Framebuffer memory total (bytes).",
        "gauge",
        &|i| g[i].sample.memory_total_bytes.map(|v| v as f64),
    );
    gauge(
        "weft_gpu_memory_used_bytes",
        "Framebuffer memory used (bytes), like DCGM_FI_DEV_FB_USED.",
        "gauge",
        &|i| g[i].sample.memory_used_bytes.map(|v| v as f64),
    );
    gauge(
        "weft_gpu_memory_free_bytes",
        "Framebuffer memory free (bytes), like DCGM_FI_DEV_FB_FREE.",
        "gauge",
        &|i| g[i].sample.memory_free_bytes.map(|v| v as f64),
    );
    gauge(
        "weft_gpu_temperature_celsius",
        "GPU temperature (°C), like DCGM_FI_DEV_GPU_TEMP.",
        "gauge",
        &|i| g[i].sample.temperature_celsius.map(f64::from),
    );
    gauge(
        "weft_gpu_power_watts",
        "Power draw (W), like DCGM_FI_DEV_POWER_USAGE.",
        "gauge",
        &|i| {
            g[i].sample
                .power_draw_milliwatts
                .map(|v| f64::from(v) / 1000.0)
        },
    );
    gauge(
        "weft_gpu_power_limit_watts",
        "Enforced power limit (W).",
        "gauge",
        &|i| {
            g[i].sample
                .power_limit_milliwatts
                .map(|v| f64::from(v) / 1000.0)
        },
    );
    gauge(
        "weft_gpu_energy_joules_total",
        "Energy since driver load (J), like DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION.",
        "counter",
        &|i| g[i].sample.energy_millijoules.map(|v| v as f64 / 1000.0),
    );
    gauge(
        "weft_gpu_sm_clock_mhz",
        "SM clock (MHz), like DCGM_FI_DEV_SM_CLOCK.",
        "gauge",
        &|i| g[i].sample.sm_clock_mhz.map(f64::from),
    );
    gauge(
        "weft_gpu_memory_clock_mhz",
        "Memory clock (MHz), like DCGM_FI_DEV_MEM_CLOCK.",
        "gauge",
        &|i| g[i].sample.memory_clock_mhz.map(f64::from),
    );
    gauge(
        "weft_gpu_fan_speed_percent",
        "Fan speed (%); absent on passively cooled GPUs.",
        "gauge",
        &|i| g[i].sample.fan_speed_percent.map(f64::from),
    );
    gauge(
        "weft_gpu_ecc_corrected_volatile_total",
        "Corrected ECC errors since driver load.",
        "counter",
        &|i| g[i].sample.ecc_corrected_volatile.map(|v| v as f64),
    );
    gauge(
        "weft_gpu_ecc_uncorrected_volatile_total",
        "Uncorrectable ECC errors since driver load.",
        "counter",
        &|i| g[i].sample.ecc_uncorrected_volatile.map(|v| v as f64),
    );
    gauge(
        "weft_gpu_lost",
        "1 when the GPU has fallen off the bus.",
        "gauge",
        &|i| Some(if g[i].sample.lost { 1.0 } else { 0.0 }),
    );
    gauge(
        "weft_gpu_processes",
        "Compute processes running on the GPU.",
        "gauge",
        &|i| g[i].sample.processes.as_ref().map(|p| p.len() as f64),
    );

    let _ = writeln!(
        out,
        "# HELP weft_gpu_health GPU health: 1 for the current state.\n# TYPE weft_gpu_health gauge"
    );
    for (i, l) in labels.iter().enumerate() {
        for st in ["healthy", "degraded", "unhealthy"] {
            let v = u8::from(g[i].health.state.as_str() == st);
            let _ = writeln!(out, "weft_gpu_health{{{l},state=\"{st}\"}} {v}");
        }
    }
    let _ = writeln!(out, "# HELP weft_gpu_throttle_reason Active clock throttle reasons (NVML names).\n# TYPE weft_gpu_throttle_reason gauge");
    for (i, l) in labels.iter().enumerate() {
        for r in g[i].sample.throttle_reasons.iter().flatten() {
            let _ = writeln!(
                out,
                "weft_gpu_throttle_reason{{{l},reason=\"{}\"}} 1",
                esc(r)
            );
        }
    }
    let _ = writeln!(out, "# HELP weft_gpu_xid_errors_total XID events seen since the agent started, by code.\n# TYPE weft_gpu_xid_errors_total counter");
    for (i, l) in labels.iter().enumerate() {
        for (xid, n) in &g[i].xid_counts {
            let _ = writeln!(out, "weft_gpu_xid_errors_total{{{l},xid=\"{xid}\"}} {n}");
        }
    }
    let _ = writeln!(out, "# HELP weft_agent_gpus GPUs NVML reports.\n# TYPE weft_agent_gpus gauge\nweft_agent_gpus {}", g.len());
    let _ = writeln!(
        out,
        "# HELP weft_agent_jobs Jobs by state.\n# TYPE weft_agent_jobs gauge"
    );
    for (st, n) in jobs_by_state {
        let _ = writeln!(out, "weft_agent_jobs{{state=\"{st}\"}} {n}");
    }
    out
}
