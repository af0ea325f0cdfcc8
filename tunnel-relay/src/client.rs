//! The client side, by role:
//! - `state`: a node's identity and relay in its state directory, and the
//!   engineer's `login` (first join with a token);
//! - `session`: a session to the relay (QUIC + Noise IK admission);
//! - `home`: the home relay of a fleet by latency (DERP's rule), and the
//!   better session a long-lived one moves to;
//! - `expose`: the provider, a shell of the link core ([`crate::link`]);
//! - `engineer`: `connect`, `forward`, `ssh-config`.
//!
//! A provider exposes TCP services (`host:port`, spliced by `expose`) and
//! in-process services ([`ExposeOptions::handlers`]): for those, `expose`
//! hands the accepted stream, with the caller's relay-authenticated name, to
//! the embedding program (the worker agent serves its jobs API this way).

mod engineer;
mod expose;
mod home;
mod session;
mod state;

pub use engineer::{
    connect_stdio, forward, redirects_wanted, service_for_port, ssh_config, Tunnels, VISIT_TIMEOUT,
};
pub use expose::{expose, ExposeOptions, IncomingStream};
pub use home::{
    better_session, choose_home, home_probe_every, measure, measure_fleet, FleetView,
    HOME_PROBE_DEFAULT, PROBE_WAIT, SWITCH_MIN_GAIN,
};
pub use session::{
    close_failure, connect, connect_peer, connect_visit, connect_with, is_draining_close,
    is_rejected_close, quic_retry, relay_lost, session, ClientTiming, Opened, Session, SessionView,
    QUIC_RETRY_DEFAULT,
};
pub use state::{default_state_dir, login, ClientState, RelayInfo};
