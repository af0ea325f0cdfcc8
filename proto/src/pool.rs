//! The pool's two conversations (issue 11), as serde types.
//!
//! 1. **Coordinator ↔ agent** (the *pool feed*): the relay opens a tunnel
//!    stream on a worker's own relay connection with
//!    `Incoming{from: "@pool", service: "@pool"}` ([`POOL_CALLER`],
//!    [`POOL_SERVICE`]; `@` cannot appear in a node name, so no engineer can
//!    be either). JSON lines both ways, each at most [`MAX_LINE`] bytes:
//!    the agent sends [`AgentMsg`] (its whole [`Inventory`] first and on
//!    every change, then job events), the coordinator sends [`CoordMsg`]
//!    (start exactly these GPUs or refuse, stop, ack an end).
//! 2. **Engineer/operator → coordinator** (the *pool API*): HTTP/1.1 with JSON
//!    bodies over a relay stream whose first frame is `Message::Api`;
//!    [`SubmitRequest`] in, [`JobView`] / [`PoolView`] / [`UsageRecord`] out.
//!
//! Both ends live in this crate so that the relay, the agent and `weft` agree
//! on one definition; the codecs are `serde_json` plus [`decode_line`]'s
//! length check.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The caller name the coordinator uses on a worker's agent.
pub const POOL_CALLER: &str = "@pool";
/// The in-process service of an agent that speaks the pool feed.
pub const POOL_SERVICE: &str = "@pool";
/// The most one JSON line of the pool feed may be (bytes, without the newline).
pub const MAX_LINE: usize = 1 << 20;

/// One GPU as the agent's NVML sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// NVML UUID (`GPU-…`).
    pub uuid: String,
    /// NVML name, e.g. `NVIDIA A100-SXM4-80GB`.
    pub model: String,
    /// NVML total memory, MiB.
    pub memory_mib: u64,
    /// The agent's health verdict: `healthy`, `degraded` or `unhealthy`.
    pub health: String,
    /// The local job holding it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
}

impl GpuInfo {
    /// Whether the pool may give it (healthy or only degraded).
    pub fn usable(&self) -> bool {
        self.health != "unhealthy"
    }
}

/// A pool job's copy on one worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCopy {
    /// The pool's job id.
    pub pool_job: u64,
    /// Which placement of it (1, 2, … as it is retried or moved).
    pub attempt: u32,
    /// The agent's local job id.
    pub local_id: u64,
}

/// Everything the scheduler needs to know about a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// GPUs, in NVML index order.
    pub gpus: Vec<GpuInfo>,
    /// Logical CPUs.
    pub cpus: u32,
    /// Physical memory, bytes.
    pub memory_bytes: u64,
    /// The agent's version.
    pub version: String,
    /// Whether the GPUs came from the stub NVML (a simulated GPU, for labs and tests).
    #[serde(default)]
    pub simulated: bool,
    /// Pool jobs queued or running here.
    pub running: Vec<JobCopy>,
    /// The Ray version of the agent's `--ray` (absent: not chosen for clusters; only reported
    /// by an agent on the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray: Option<String>,
    /// For each cluster head running here, Ray's view of the nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ray_heads: Vec<crate::cluster::RayHeadReport>,
    /// The public key this agent signs its usage records with (`ed25519:…`,
    /// [`crate::usage`]); absent: an agent that does not sign.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_key: Option<String>,
}

/// How a copy ended, with what the usage record needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ended {
    /// Which copy.
    #[serde(flatten)]
    pub copy: JobCopy,
    /// The agent's final state name: `succeeded`, `failed`, `cancelled`, `timed_out`, `killed`, `lost`.
    pub state: String,
    /// Exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Unix ms it started (absent if it never did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Unix ms it ended.
    pub ended_ms: u64,
    /// The GPUs it held.
    pub gpus: Vec<String>,
    /// Who submitted it, for a per-worker job (`copy.pool_job` 0; the coordinator knows a pool
    /// copy's owner itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The usage record as this worker computed it, signed with its usage key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::WorkerClaim>,
}

impl Ended {
    /// Whether this is a per-worker job (submitted to this agent, not placed by the pool).
    pub fn per_worker(&self) -> bool {
        self.copy.pool_job == 0
    }
}

/// Agent → coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMsg {
    /// The whole inventory (first, and after every change).
    Inventory(Inventory),
    /// A [`CoordMsg::Start`] was carried out: the process runs.
    Started {
        /// Which copy.
        #[serde(flatten)]
        copy: JobCopy,
        /// Unix ms.
        started_ms: u64,
    },
    /// A [`CoordMsg::Start`] was refused (the GPUs are not free or not healthy here, or the
    /// request is invalid on this worker); the coordinator places the job again.
    Refused {
        /// The pool job.
        pool_job: u64,
        /// The attempt.
        attempt: u32,
        /// Why.
        reason: String,
    },
    /// A copy ended. Sent again after a reconnect until acked.
    Ended(Ended),
    /// Nothing changed; the agent is alive. Sent every [`HEARTBEAT`] when the feed is
    /// otherwise quiet: the coordinator counts `lost_after` from the last line it heard.
    Heartbeat,
    /// Every GPU's readings now (utilisation, memory, temperature, power), every
    /// [`CoordMsg::Telemetry`] `every_ms` once the coordinator asked: for the web view, not the
    /// scheduler.
    Telemetry {
        /// Unix ms of the readings.
        at_ms: u64,
        /// One per GPU, in NVML order.
        gpus: Vec<GpuReading>,
    },
}

/// One GPU's readings at one moment (absent: NVML did not answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuReading {
    /// NVML UUID.
    pub uuid: String,
    /// GPU utilisation, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub util_pct: Option<u32>,
    /// Memory in use, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_used_mib: Option<u64>,
    /// Temperature, °C.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temp_c: Option<u32>,
    /// Power draw, milliwatts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_mw: Option<u32>,
}

/// How often an agent speaks on a quiet feed.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// Coordinator → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CoordMsg {
    /// Start now on exactly these GPUs, or refuse.
    Start(Start),
    /// Stop this pool job's copy (every attempt, or only this one).
    Stop {
        /// The pool job.
        pool_job: u64,
        /// Only this attempt; all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        attempt: Option<u32>,
    },
    /// Send [`AgentMsg::Telemetry`] every `every_ms` on this feed (agents that predate it
    /// skip the line; the coordinator asks once per feed).
    Telemetry {
        /// Milliseconds between readings (at least 1000).
        every_ms: u64,
    },
    /// The coordinator stored this end; the agent need not send it again.
    Ack {
        /// The pool job (0: a per-worker job, named by `local_id`).
        pool_job: u64,
        /// The attempt.
        attempt: u32,
        /// A per-worker job's local id.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        local_id: Option<u64>,
    },
}

/// One member's start order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Start {
    /// The pool job.
    pub pool_job: u64,
    /// The attempt.
    pub attempt: u32,
    /// The engineer who submitted it (the agent records it as the job's caller).
    pub owner: String,
    /// argv.
    pub command: Vec<String>,
    /// The engineer's env plus the pool's (`WEFT_POOL_JOB`, `WEFT_NODE_RANK`, ...).
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Exactly these GPUs (UUIDs).
    pub gpus: Vec<String>,
    /// Timeout, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// A Ray cluster member: `command[0]` is [`crate::cluster::RAY_PLACEHOLDER`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ray: Option<Box<crate::cluster::RayStart>>,
}

/// A pool feed line that could not be read.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LineError {
    /// Longer than [`MAX_LINE`].
    #[error("pool feed line of {0} bytes is over the {MAX_LINE}-byte limit")]
    TooLong(usize),
    /// Not the JSON of a message.
    #[error("malformed pool feed line: {0}")]
    Malformed(String),
}

/// One message as one line (with its `\n`).
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).expect("pool messages always serialize");
    v.push(b'\n');
    v
}

/// One line (without its `\n`) as a message.
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8]) -> Result<T, LineError> {
    if line.len() > MAX_LINE {
        return Err(LineError::TooLong(line.len()));
    }
    serde_json::from_slice(line).map_err(|e| LineError::Malformed(e.to_string()))
}

// ---- the pool API (engineer/operator → coordinator) ----

/// `POST /v1/pool/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// argv.
    pub command: Vec<String>,
    /// Extra environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory on the worker.
    #[serde(default)]
    pub workdir: Option<String>,
    /// GPUs per node when the spec has no count.
    #[serde(default)]
    pub gpus: u32,
    /// `--gpu SPEC` (dstack's grammar), as typed.
    #[serde(default)]
    pub gpu: Option<String>,
    /// Nodes (a gang when > 1).
    #[serde(default = "one")]
    pub nodes: u32,
    /// Priority (higher first).
    #[serde(default)]
    pub priority: i32,
    /// Retries after a failure or a lost worker.
    #[serde(default)]
    pub retries: u32,
    /// Timeout, seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Queue it even if no worker could run it now.
    #[serde(default)]
    pub wait_for_capacity: bool,
    /// Only this worker (placed by the pool all the same).
    #[serde(default)]
    pub worker: Option<String>,
    /// A Ray cluster (`weft cluster up`): the command is the coordinator's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterRequest>,
}

fn one() -> u32 {
    1
}

/// One member of a placed job, as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// Rank (index).
    pub rank: u32,
    /// Worker name.
    pub worker: String,
    /// GPU UUIDs.
    pub gpus: Vec<String>,
    /// The agent's local job id, once started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_id: Option<u64>,
    /// The member's state on its worker: `starting`, `running`, or its end.
    pub state: String,
    /// Exit code, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// A pool job, as `weft jobs show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobView {
    /// Pool job id.
    pub id: u64,
    /// Who submitted it.
    pub owner: String,
    /// `pending`, `placed`, `running`, `succeeded`, `failed`, `lost`, `cancelled`.
    pub state: String,
    /// What it asked for.
    pub request: SubmitRequest,
    /// Why it waits (pending only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Placements so far.
    pub attempt: u32,
    /// The current (or last) placement.
    pub members: Vec<MemberView>,
    /// Unix ms.
    pub submitted_ms: u64,
    /// Unix ms the current attempt started on every member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Unix ms it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The Ray cluster it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::cluster::ClusterInfo>,
}

/// `POST /v1/clusters` answers this once: the token is not shown again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterCreated {
    /// The cluster's job.
    pub job: JobView,
    /// The cluster's Ray token (for `ray job submit`; `weft` keeps it 0600).
    pub token: String,
}

/// One worker as `weft pool` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerView {
    /// Name.
    pub name: String,
    /// `ready`, `cordoned`, `draining`, `disconnected`, `lost`.
    pub state: String,
    /// The last inventory.
    pub inventory: Inventory,
    /// Per GPU (same order): the pool job holding it.
    pub holders: Vec<Option<u64>>,
    /// GPU UUIDs flagged as reported by another worker too.
    #[serde(default)]
    pub flagged: Vec<String>,
    /// Unix ms of its first report.
    pub first_seen_ms: u64,
    /// Unix ms of the start of the current session (absent when away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_since_ms: Option<u64>,
    /// Unix ms of the last report or disconnect.
    pub last_seen_ms: u64,
    /// Total time connected, ms (its uptime record).
    pub uptime_ms: u64,
    /// Every usage key it announced (`ed25519:…`), oldest first: its records are signed
    /// with one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage_keys: Vec<String>,
}

/// `GET /v1/pool`: workers and the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolView {
    /// Every worker that ever reported.
    pub workers: Vec<WorkerView>,
    /// Pending, placed and running jobs (all of them for an operator; an engineer's own
    /// with the others' command lines left out).
    pub queue: Vec<JobView>,
    /// `binpack` or `spread`.
    pub policy: String,
}

pub use crate::usage::UsageRecord;

impl UsageRecord {
    /// The record of an end: the coordinator and the worker both compute it with this, from
    /// what each knows (the worker: its own name, its GPUs' model, the job's rank and caller).
    pub fn of_end(
        e: &Ended,
        rank: u32,
        engineer: String,
        worker: &str,
        gpu_model: String,
    ) -> UsageRecord {
        let secs = e
            .started_ms
            .map(|s| e.ended_ms.saturating_sub(s) as f64 / 1000.0)
            .unwrap_or(0.0);
        UsageRecord {
            job: if e.per_worker() {
                e.copy.local_id
            } else {
                e.copy.pool_job
            },
            attempt: e.copy.attempt,
            rank,
            engineer,
            worker: worker.to_string(),
            gpu_model,
            gpus: e.gpus.clone(),
            start_ms: e.started_ms,
            end_ms: e.ended_ms,
            gpu_seconds: secs * e.gpus.len() as f64,
            outcome: e.state.clone(),
            exit_code: e.exit_code,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s() -> impl Strategy<Value = String> {
        "[ -~]{0,12}"
    }

    prop_compose! {
        fn copy()(pool_job in any::<u64>(), attempt in any::<u32>(), local_id in any::<u64>()) -> JobCopy {
            JobCopy { pool_job, attempt, local_id }
        }
    }

    fn agent_msg() -> impl Strategy<Value = AgentMsg> {
        let gpu = (
            s(),
            s(),
            any::<u64>(),
            s(),
            proptest::option::of(any::<u64>()),
        )
            .prop_map(|(uuid, model, memory_mib, health, job)| GpuInfo {
                uuid,
                model,
                memory_mib,
                health,
                job,
            });
        prop_oneof![
            (
                proptest::collection::vec(gpu, 0..4),
                any::<u32>(),
                any::<u64>(),
                s(),
                any::<bool>(),
                proptest::collection::vec(copy(), 0..3)
            )
                .prop_map(|(gpus, cpus, memory_bytes, version, simulated, running)| {
                    AgentMsg::Inventory(Inventory {
                        gpus,
                        cpus,
                        memory_bytes,
                        ray: (!simulated).then(|| version.clone()),
                        ray_heads: if simulated {
                            vec![crate::cluster::RayHeadReport {
                                pool_job: memory_bytes,
                                attempt: cpus,
                                at_ms: memory_bytes / 3,
                                nodes: vec![crate::cluster::RayNode {
                                    ip: version.clone(),
                                    alive: cpus % 2 == 0,
                                    head: true,
                                    cpus: f64::from(cpus) / 4.0,
                                    gpus: 1.5,
                                }],
                            }]
                        } else {
                            vec![]
                        },
                        usage_key: (!simulated).then(|| format!("ed25519:{version}")),
                        version,
                        simulated,
                        running,
                    })
                }),
            (copy(), any::<u64>())
                .prop_map(|(copy, started_ms)| AgentMsg::Started { copy, started_ms }),
            Just(AgentMsg::Heartbeat),
            (
                any::<u64>(),
                s(),
                proptest::option::of(any::<u32>()),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(at_ms, uuid, util, mem)| AgentMsg::Telemetry {
                    at_ms,
                    gpus: vec![GpuReading {
                        uuid,
                        util_pct: util,
                        mem_used_mib: mem,
                        temp_c: util.map(|u| u / 2),
                        power_mw: None,
                    }],
                }),
            (any::<u64>(), any::<u32>(), s()).prop_map(|(pool_job, attempt, reason)| {
                AgentMsg::Refused {
                    pool_job,
                    attempt,
                    reason,
                }
            }),
            (
                copy(),
                s(),
                proptest::option::of(any::<i32>()),
                proptest::option::of(any::<u64>()),
                any::<u64>(),
                proptest::collection::vec(s(), 0..3)
            )
                .prop_map(|(copy, state, exit_code, started_ms, ended_ms, gpus)| {
                    let owner = (copy.pool_job == 0).then(|| state.clone());
                    let mut e = Ended {
                        copy,
                        state,
                        exit_code,
                        started_ms,
                        ended_ms,
                        gpus,
                        owner,
                        usage: None,
                    };
                    if exit_code.is_some() {
                        let record =
                            UsageRecord::of_end(&e, 1, "alice".into(), "gpu1", "H100".into());
                        e.usage = Some(crate::usage::WorkerClaim {
                            record,
                            key: "ed25519:k".into(),
                            sig: "s".into(),
                        });
                    }
                    AgentMsg::Ended(e)
                }),
        ]
    }

    fn coord_msg() -> impl Strategy<Value = CoordMsg> {
        prop_oneof![
            (
                any::<u64>(),
                any::<u32>(),
                s(),
                proptest::collection::vec(s(), 1..3),
                proptest::collection::btree_map(s(), s(), 0..3),
                proptest::option::of(s()),
                proptest::collection::vec(s(), 0..3),
                proptest::option::of(any::<u64>())
            )
                .prop_map(
                    |(pool_job, attempt, owner, command, env, workdir, gpus, timeout_s)| {
                        let ray = (attempt % 2 == 0).then(|| {
                            Box::new(crate::cluster::RayStart {
                                cluster: owner.clone(),
                                head: pool_job % 2 == 0,
                                node_ip: owner.clone(),
                                token: owner.clone(),
                            })
                        });
                        CoordMsg::Start(Start {
                            ray,
                            pool_job,
                            attempt,
                            owner,
                            command,
                            env,
                            workdir,
                            gpus,
                            timeout_s,
                        })
                    }
                ),
            (any::<u64>(), proptest::option::of(any::<u32>()))
                .prop_map(|(pool_job, attempt)| CoordMsg::Stop { pool_job, attempt }),
            (
                any::<u64>(),
                any::<u32>(),
                proptest::option::of(any::<u64>())
            )
                .prop_map(|(pool_job, attempt, local_id)| CoordMsg::Ack {
                    pool_job,
                    attempt,
                    local_id,
                }),
            any::<u64>().prop_map(|every_ms| CoordMsg::Telemetry { every_ms }),
        ]
    }

    fn roundtrip<T>(m: &T) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        let line = encode_line(m);
        assert_eq!(line.last(), Some(&b'\n'));
        assert!(
            !line[..line.len() - 1].contains(&b'\n'),
            "one message is one line"
        );
        decode_line(&line[..line.len() - 1]).expect("must succeed")
    }

    proptest! {
        #[test]
        fn agent_messages_roundtrip_as_one_line(m in agent_msg()) {
            prop_assert_eq!(roundtrip(&m), m);
        }

        #[test]
        fn coordinator_messages_roundtrip_as_one_line(m in coord_msg()) {
            prop_assert_eq!(roundtrip(&m), m);
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_line::<AgentMsg>(&b);
            let _ = decode_line::<CoordMsg>(&b);
        }
    }

    #[test]
    fn an_overlong_line_is_refused_before_parsing() {
        let line = vec![b' '; MAX_LINE + 1];
        assert_eq!(
            decode_line::<AgentMsg>(&line),
            Err(LineError::TooLong(MAX_LINE + 1))
        );
    }

    #[test]
    fn the_wire_form_is_tagged_json() {
        let m = CoordMsg::Stop {
            pool_job: 7,
            attempt: None,
        };
        assert_eq!(
            String::from_utf8(encode_line(&m)).expect("must succeed"),
            "{\"type\":\"stop\",\"pool_job\":7}\n"
        );
        let e = decode_line::<CoordMsg>(b"{\"type\":\"launch\"}").expect_err("must fail");
        assert!(e.to_string().contains("launch"), "{e}");
    }

    #[test]
    fn a_submit_request_defaults_to_one_node_and_refuses_unknown_fields() {
        let r: SubmitRequest =
            serde_json::from_str(r#"{"command":["true"]}"#).expect("must succeed");
        assert_eq!(r.nodes, 1);
        let e = serde_json::from_str::<SubmitRequest>(r#"{"command":["true"],"gpu_count":2}"#)
            .expect_err("must fail");
        assert!(e.to_string().contains("gpu_count"), "{e}");
    }
}
