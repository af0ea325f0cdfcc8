//! Weft tunnel relay: QUIC reverse tunnels so engineers reach workers behind NAT.
//!
//! Workers (`expose`) dial out to the relay and keep one QUIC connection up;
//! engineers (`connect`, `forward`) open one QUIC stream per tunnel; the relay
//! authenticates both with Noise IK bound to the QUIC connection, authorizes
//! by tags, and splices the engineer's stream onto a stream it opens to the
//! worker, which connects it to a local service (sshd).
//!
//! The relay also hosts the mesh coordinator ([`coord`], wired in
//! `server/mesh.rs`); [`mesh_client`] is the node's side of that session.
//!
//! Pure parts: [`wire`] (codec), [`admission`] (token checks, rate limits),
//! [`config`] (policy), [`coord`] (coordinator core), [`routes`], [`link`]
//! (keeping a session to the relay: backoff, give-up rule, [`LinkState`]).
//! Shells: [`server`], [`client`], [`mesh_client`], [`registry`] (SQLite).

pub mod admission;
pub mod cli;
pub mod client;
pub mod config;
pub mod coord;
pub mod error;
pub mod keys;
pub mod link;
pub mod mesh_client;
pub mod metrics;
pub mod noise;
pub mod registry;
pub mod relay_path;
pub mod routes;
pub mod rt;
pub mod server;
pub mod splice;
pub mod tls;
pub mod wire;

pub use weft_proto::{duration, secret, stun, token};

pub use client::{ClientState, ExposeOptions, Session};
pub use config::RelayConfig;
pub use error::{ClientError, RelayError, StateError};
pub use keys::{PublicKey, StaticKey};
pub use link::LinkState;
pub use mesh_client::{LinkInfo, MeshEvent, MeshOptions, MeshSession};
pub use server::{Relay, ServeOptions};
pub use token::Token;
pub use wire::{Reason, Rejection};
