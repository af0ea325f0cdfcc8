//! What the agent's mesh side is doing, as `worker-agent status` and `/v1/status` show it
//! (the API and the overlay shell both use it; neither imports the other for it).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::{Deserialize, Serialize};
use tunnel_relay::link::LinkState;

/// The agent's mesh side, as `status` shows it: the join's link to the relay (the one
/// [`LinkState`]), with what only the mesh has around it (not started, waiting for the relay
/// exposure, on the mesh).
///
/// JSON (the format `worker-agent status` had before the link states were one):
/// `{"state": "disabled", "reason": ..}`, `{"state": "waiting_for_relay"}`,
/// `{"state": "joining", "attempt": 1}`, `{"state": "retrying", "attempt": 2, "error": ..,
/// "retry_in_ms": ..}`, `{"state": "joined", "name": .., "ipv4": .., "ipv6": ..,
/// "interface": .., "api": [..]}`, `{"state": "failed", "reason": ..}`, `{"state": "stopped"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "MeshJson", from = "MeshJson")]
pub enum MeshStatus {
    /// Not started: `--no-mesh`, or the agent has no relay to join through.
    Disabled {
        /// Why.
        reason: String,
    },
    /// First join: waiting for the relay exposure to be admitted with the token.
    WaitingForRelay,
    /// Joining through the relay (connecting, retrying), or not on the mesh for good
    /// (`Failed`: refused, or the node could not run, e.g. no CAP_NET_ADMIN to create the TUN
    /// interface; the agent keeps running relay-only), or stopped on shutdown. (A connected
    /// join shows as `Joined` once the jobs API listens on the overlay.)
    Link(LinkState),
    /// On the mesh; the jobs API listens on `api`.
    Joined(OnMesh),
}

/// The node on the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnMesh {
    /// The node's mesh name (`NAME.weft.internal`).
    pub name: String,
    /// Overlay IPv4.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6.
    pub ipv6: Ipv6Addr,
    /// The TUN interface.
    pub interface: String,
    /// Where the jobs API listens on the overlay.
    pub api: Vec<SocketAddr>,
}

impl MeshStatus {
    /// Not on the mesh for good, with why.
    pub fn failed(reason: String) -> MeshStatus {
        MeshStatus::Link(LinkState::Failed { reason })
    }
}

/// [`MeshStatus`] on the wire.
#[derive(Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum MeshJson {
    Disabled {
        reason: String,
    },
    WaitingForRelay,
    Joining {
        #[serde(default = "one")]
        attempt: u32,
    },
    Retrying {
        #[serde(default = "one")]
        attempt: u32,
        error: String,
        retry_in_ms: u64,
    },
    Joined(OnMesh),
    Failed {
        reason: String,
    },
    Stopped,
}

fn one() -> u32 {
    1
}

impl From<MeshStatus> for MeshJson {
    fn from(m: MeshStatus) -> MeshJson {
        match m {
            MeshStatus::Disabled { reason } => MeshJson::Disabled { reason },
            MeshStatus::WaitingForRelay => MeshJson::WaitingForRelay,
            MeshStatus::Joined(on) => MeshJson::Joined(on),
            MeshStatus::Link(LinkState::Connecting { attempt }) => MeshJson::Joining { attempt },
            // Admitted, the node is starting: still joining until the API listens.
            MeshStatus::Link(LinkState::Connected(_)) => MeshJson::Joining { attempt: 1 },
            MeshStatus::Link(LinkState::Retrying {
                attempt,
                last_error,
                retry_in_ms,
            }) => MeshJson::Retrying {
                attempt,
                error: last_error,
                retry_in_ms,
            },
            MeshStatus::Link(LinkState::Failed { reason }) => MeshJson::Failed { reason },
            MeshStatus::Link(LinkState::Stopped) => MeshJson::Stopped,
        }
    }
}

impl From<MeshJson> for MeshStatus {
    fn from(j: MeshJson) -> MeshStatus {
        match j {
            MeshJson::Disabled { reason } => MeshStatus::Disabled { reason },
            MeshJson::WaitingForRelay => MeshStatus::WaitingForRelay,
            MeshJson::Joined(on) => MeshStatus::Joined(on),
            MeshJson::Joining { attempt } => MeshStatus::Link(LinkState::Connecting { attempt }),
            MeshJson::Retrying {
                attempt,
                error,
                retry_in_ms,
            } => MeshStatus::Link(LinkState::Retrying {
                attempt,
                last_error: error,
                retry_in_ms,
            }),
            MeshJson::Failed { reason } => MeshStatus::failed(reason),
            MeshJson::Stopped => MeshStatus::Link(LinkState::Stopped),
        }
    }
}
