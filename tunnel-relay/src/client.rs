//! The client side, by role:
//! - `state`: a node's identity and relay in its state directory, and the
//!   engineer's `login` (first join with a token);
//! - `session`: a session to the relay (QUIC + Noise IK admission);
//! - `expose`: the provider, a shell of the link core ([`crate::link`]);
//! - `engineer`: `connect`, `forward`, `ssh-config`.
//!
//! A provider exposes TCP services (`host:port`, spliced by `expose`) and
//! in-process services ([`ExposeOptions::handlers`]): for those, `expose`
//! hands the accepted stream, with the caller's relay-authenticated name, to
//! the embedding program (the worker agent serves its jobs API this way).

mod engineer;
mod expose;
mod session;
mod state;

pub use engineer::{connect_stdio, forward, service_for_port, ssh_config};
pub use expose::{expose, ExposeOptions, IncomingStream};
pub use session::{
    close_failure, connect, connect_peer, connect_with, is_rejected_close, quic_again, quic_retry,
    relay_lost, session, ClientTiming, Session, QUIC_RETRY_DEFAULT,
};
pub use state::{default_state_dir, login, ClientState, RelayInfo};
