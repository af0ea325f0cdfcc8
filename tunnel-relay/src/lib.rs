//! Weft tunnel relay: QUIC reverse tunnels so engineers reach workers behind NAT.
//!
//! Workers (`expose`) dial out to the relay and keep one QUIC connection up;
//! engineers (`connect`, `forward`) open one QUIC stream per tunnel; the relay
//! authenticates both with Noise IK bound to the QUIC connection, authorizes
//! by tags, and splices the engineer's stream onto a stream it opens to the
//! worker, which connects it to a local service (sshd).
//!
//! The wire formats and shared types live in `weft-proto`; this crate moves
//! them over QUIC ([`wire`]: tokio framing).
//!
//! Two halves:
//! - always built (what a node needs): [`client`] (identity, login, session,
//!   expose, engineer roles), [`mesh_client`] (the node's control session),
//!   [`link`] (keeping a session to the relay: backoff, give-up rule, the one
//!   [`LinkState`]), [`noise`], [`tls`] (client side), [`relay_path`],
//!   [`splice`], [`keys`], [`error`].
//! - feature `server` (on by default; `mesh` and `worker-agent` build without
//!   it, so they link no SQLite, axum, rcgen or prometheus): [`server`] (QUIC
//!   listener, tunnels, STUN, the hosted coordinator in `server/mesh.rs`),
//!   [`coord`] (the coordinator core, pure), [`pool`] (the GPU job
//!   scheduler core, pure), [`registry`] (SQLite),
//!   [`config`], [`routes`], [`admission`], [`metrics`].

#[cfg(feature = "server")]
pub mod admission;
pub mod cli;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
#[cfg(feature = "server")]
pub mod coord;
pub mod error;
pub mod keys;
pub mod link;
pub mod mesh_client;
#[cfg(feature = "server")]
pub mod metrics;
pub mod mux;
pub mod noise;
#[cfg(feature = "server")]
pub mod pg;
#[cfg(feature = "server")]
pub mod pg_pool;
#[cfg(feature = "server")]
pub mod pool;
#[cfg(feature = "server")]
pub mod pool_store;
pub mod pool_text;
#[cfg(feature = "server")]
pub mod records;
#[cfg(feature = "server")]
pub mod registry;
pub mod relay_path;
#[cfg(feature = "server")]
pub mod routes;
pub mod rt;
#[cfg(feature = "server")]
pub mod server;
pub mod splice;
pub mod tcp;
#[cfg(feature = "server")]
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod wire;

pub use weft_proto::{duration, secret, stun, token};

pub use client::{ClientState, ExposeOptions, Session};
#[cfg(feature = "server")]
pub use config::RelayConfig;
#[cfg(feature = "server")]
pub use error::RelayError;
pub use error::{ClientError, StateError};
pub use keys::{PublicKey, StaticKey};
pub use link::LinkState;
pub use mesh_client::{LinkInfo, MeshEvent, MeshOptions, MeshSession};
#[cfg(feature = "server")]
pub use server::{Relay, ServeOptions};
pub use token::Token;
pub use wire::{Reason, Rejection};
