//! Work history: per finished job its submitter, GPUs, start/end, exit status, GPU-seconds.

use serde::{Deserialize, Serialize};

use crate::job::{Job, JobState};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub id: u64,
    pub caller: String,
    pub gpus: Vec<String>,
    pub started_ms: Option<u64>,
    pub ended_ms: Option<u64>,
    #[serde(flatten)]
    pub result: JobState,
    pub gpu_seconds: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct History {
    pub jobs: Vec<HistoryEntry>,
    pub total_jobs: usize,
    pub total_gpu_seconds: f64,
    pub succeeded: usize,
}

pub fn summarize(jobs: &[Job]) -> History {
    let entries: Vec<HistoryEntry> = jobs
        .iter()
        .filter(|j| j.state.is_terminal())
        .map(|j| HistoryEntry {
            id: j.id,
            caller: j.caller.clone(),
            gpus: j.gpu_uuids.clone(),
            started_ms: j.started_ms,
            ended_ms: j.ended_ms,
            result: j.state.clone(),
            gpu_seconds: j.gpu_seconds(),
        })
        .collect();
    History {
        total_jobs: entries.len(),
        total_gpu_seconds: entries.iter().map(|e| e.gpu_seconds).sum(),
        succeeded: entries
            .iter()
            .filter(|e| e.result == JobState::Succeeded)
            .count(),
        jobs: entries,
    }
}
