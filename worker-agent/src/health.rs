//! GPU health: a pure function of (latest sample, recent XID events, now).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::gpu::GpuSample;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthState {
    Healthy,
    Degraded,
    Unhealthy,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Degraded => "degraded",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub state: HealthState,
    /// Why the state is not healthy; empty when healthy.
    pub reasons: Vec<String>,
}

/// An XID seen at a point in time (monotonic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenXid {
    pub xid: u64,
    pub at: Instant,
}

/// XIDs that mean the GPU cannot be trusted with work (NVIDIA XID catalogue: double-bit ECC,
/// row-remapping failure, NVLink, fallen off the bus, contained/uncontained memory errors, GSP).
pub const CRITICAL_XIDS: &[u64] = &[48, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140];

/// Throttle reasons that indicate a hardware problem (not the normal power cap under load).
const THERMAL_REASONS: &[&str] = &["HW_SLOWDOWN", "HW_THERMAL_SLOWDOWN", "SW_THERMAL_SLOWDOWN"];
const POWER_REASONS: &[&str] = &["HW_POWER_BRAKE_SLOWDOWN"];

/// Health of one GPU. XIDs count for `window` after they were seen; a GPU whose last bad
/// XID is older than that returns to healthy (re-evaluated every sample).
pub fn evaluate(sample: &GpuSample, xids: &[SeenXid], now: Instant, window: Duration) -> Health {
    let mut unhealthy = Vec::new();
    let mut degraded = Vec::new();
    if sample.lost {
        unhealthy.push("GPU lost (fallen off the bus)".to_string());
    }
    for x in xids {
        if now.saturating_duration_since(x.at) > window {
            continue;
        }
        if CRITICAL_XIDS.contains(&x.xid) {
            unhealthy.push(format!("critical XID {}", x.xid));
        } else {
            degraded.push(format!("XID {}", x.xid));
        }
    }
    if let Some(n) = sample.ecc_uncorrected_volatile {
        if n > 0 {
            unhealthy.push(format!("{n} uncorrectable ECC errors"));
        }
    }
    if let Some(reasons) = &sample.throttle_reasons {
        for r in reasons {
            if THERMAL_REASONS.contains(&r.as_str()) {
                degraded.push(format!("thermal throttling ({r})"));
            } else if POWER_REASONS.contains(&r.as_str()) {
                degraded.push(format!("power throttling ({r})"));
            }
        }
    }
    unhealthy.dedup();
    degraded.dedup();
    if !unhealthy.is_empty() {
        unhealthy.extend(degraded);
        Health {
            state: HealthState::Unhealthy,
            reasons: unhealthy,
        }
    } else if !degraded.is_empty() {
        Health {
            state: HealthState::Degraded,
            reasons: degraded,
        }
    } else {
        Health {
            state: HealthState::Healthy,
            reasons: Vec::new(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gpu() -> GpuSample {
        GpuSample {
            uuid: "GPU-a".into(),
            throttle_reasons: Some(vec!["SW_POWER_CAP".into()]),
            ecc_uncorrected_volatile: Some(0),
            ..GpuSample::default()
        }
    }

    #[test]
    fn power_cap_under_load_is_healthy() {
        let h = evaluate(&gpu(), &[], Instant::now(), Duration::from_secs(60));
        assert_eq!(h.state, HealthState::Healthy);
        assert!(h.reasons.is_empty());
    }

    #[test]
    fn critical_xid_is_unhealthy_then_recovers() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let xids = [SeenXid { xid: 79, at: t0 }];
        let h = evaluate(&gpu(), &xids, t0 + Duration::from_secs(1), w);
        assert_eq!(h.state, HealthState::Unhealthy);
        assert_eq!(h.reasons, vec!["critical XID 79".to_string()]);
        let h = evaluate(&gpu(), &xids, t0 + Duration::from_secs(61), w);
        assert_eq!(h.state, HealthState::Healthy);
    }

    #[test]
    fn application_xid_degrades() {
        let t0 = Instant::now();
        let h = evaluate(
            &gpu(),
            &[SeenXid { xid: 13, at: t0 }],
            t0,
            Duration::from_secs(5),
        );
        assert_eq!(h.state, HealthState::Degraded);
    }

    #[test]
    fn lost_ecc_and_thermal() {
        let now = Instant::now();
        let w = Duration::from_secs(5);
        let lost = GpuSample {
            lost: true,
            ..gpu()
        };
        assert_eq!(evaluate(&lost, &[], now, w).state, HealthState::Unhealthy);
        let ecc = GpuSample {
            ecc_uncorrected_volatile: Some(2),
            ..gpu()
        };
        let h = evaluate(&ecc, &[], now, w);
        assert_eq!(h.state, HealthState::Unhealthy);
        assert!(h.reasons[0].contains("uncorrectable ECC"));
        let hot = GpuSample {
            throttle_reasons: Some(vec!["HW_THERMAL_SLOWDOWN".into()]),
            ..gpu()
        };
        assert_eq!(evaluate(&hot, &[], now, w).state, HealthState::Degraded);
        // absent ECC is not "0 errors" but also not an error
        let no_ecc = GpuSample {
            ecc_uncorrected_volatile: None,
            ..gpu()
        };
        assert_eq!(evaluate(&no_ecc, &[], now, w).state, HealthState::Healthy);
    }
}
