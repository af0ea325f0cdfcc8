//! One WireGuard peer: the boringtun session adapter plus what the node knows
//! about the peer (endpoint, allowed IPs, keepalive, preshared key).
//!
//! boringtun's `Tunn` reads the monotonic clock itself (`update_timers`,
//! `time_since_last_handshake`); this module is the only place that touches a
//! `Tunn`, so a later swap to another Noise implementation (0.6.0, gotatun)
//! stays inside it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use ipnet::IpNet;
use parking_lot::Mutex;

use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// Bytes of WireGuard overhead on a data packet (header 16 + tag 16), before padding.
pub(crate) const DATA_OVERHEAD: usize = 32;

/// A peer, shared between the TUN loop, the UDP loop, the timer and the UAPI.
pub struct Peer {
    pub public_key: PublicKey,
    /// Our 24-bit session index for this peer (receiver index >> 8 in packets).
    pub index: u32,
    state: Mutex<PeerState>,
}

/// Mutable state of a peer, behind the peer's lock.
pub struct PeerState {
    tunn: Tunn,
    pub endpoint: Option<SocketAddr>,
    /// Source of the last authenticated packet (also when roaming is off:
    /// path selection reads it to notice a peer that moved).
    pub last_src: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub preshared_key: Option<PresharedKey>,
    pub keepalive: Option<u16>,
}

/// What encapsulating one packet produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Encap {
    /// A data packet of this length was written at the start of `dst`.
    Data(usize),
    /// A handshake initiation of this length was written (the packet was queued).
    Handshake(usize),
    /// The packet was queued behind a handshake already in flight.
    Queued,
}

/// What decapsulating one datagram produced.
#[derive(Debug)]
pub enum Decap {
    /// An IP packet of this length for the TUN device, at the start of `dst`.
    Tunnel(usize),
    /// A packet to send back to the network, at the start of `dst`
    /// (handshake response, cookie, or a queued data packet).
    Network(usize),
    /// Authenticated, nothing to deliver (keepalive, cookie processed).
    Done,
    /// Rejected; counted by the caller.
    Error(boringtun::noise::errors::WireGuardError),
}

impl Peer {
    pub fn new(
        private_key: &PrivateKey,
        public_key: PublicKey,
        index: u32,
        preshared_key: Option<PresharedKey>,
        keepalive: Option<u16>,
        rate_limiter: Arc<RateLimiter>,
    ) -> Peer {
        let tunn = new_tunn(
            private_key,
            &public_key,
            index,
            preshared_key.as_ref(),
            keepalive,
            rate_limiter,
        );
        Peer {
            public_key,
            index,
            state: Mutex::new(PeerState {
                tunn,
                endpoint: None,
                last_src: None,
                allowed_ips: Vec::new(),
                preshared_key,
                keepalive,
            }),
        }
    }

    /// Locks the peer's state.
    pub fn lock(&self) -> parking_lot::MutexGuard<'_, PeerState> {
        self.state.lock()
    }
}

fn new_tunn(
    private_key: &PrivateKey,
    public_key: &PublicKey,
    index: u32,
    preshared_key: Option<&PresharedKey>,
    keepalive: Option<u16>,
    rate_limiter: Arc<RateLimiter>,
) -> Tunn {
    Tunn::new(
        private_key.to_static_secret(),
        crate::key::to_x25519(public_key),
        preshared_key.map(|k| *k.as_bytes()),
        keepalive.filter(|k| *k > 0),
        index,
        Some(rate_limiter),
    )
}

impl PeerState {
    /// Encrypts `src` (an IP packet; empty for a keepalive) into `dst`, which
    /// must hold `src.len() + 32` and at least 148 bytes.
    pub fn encapsulate(&mut self, src: &[u8], dst: &mut [u8]) -> Encap {
        match self.tunn.encapsulate(src, dst) {
            TunnResult::WriteToNetwork(p) => {
                // Message type 4 is transport data; anything else is a handshake.
                if p.first() == Some(&4) {
                    Encap::Data(p.len())
                } else {
                    Encap::Handshake(p.len())
                }
            }
            _ => Encap::Queued,
        }
    }

    /// Processes one datagram from `src`. With an empty `datagram`, returns
    /// the next queued packet to flush after a handshake (or `Done`).
    pub fn decapsulate(
        &mut self,
        src: Option<SocketAddr>,
        datagram: &[u8],
        dst: &mut [u8],
    ) -> Decap {
        let base = dst.as_ptr() as usize;
        match self.tunn.decapsulate(src.map(|s| s.ip()), datagram, dst) {
            TunnResult::Done => Decap::Done,
            TunnResult::Err(e) => Decap::Error(e),
            TunnResult::WriteToNetwork(p) => {
                debug_assert_eq!(p.as_ptr() as usize, base);
                Decap::Network(p.len())
            }
            TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                debug_assert_eq!(p.as_ptr() as usize, base);
                Decap::Tunnel(p.len())
            }
        }
    }

    /// Drives the session timers (rekey, keepalive, expiry). Returns the
    /// length of a packet written to `dst` to send to the endpoint, if any.
    pub fn update_timers(&mut self, dst: &mut [u8]) -> Option<usize> {
        match self.tunn.update_timers(dst) {
            TunnResult::WriteToNetwork(p) => Some(p.len()),
            _ => None,
        }
    }

    /// Starts a handshake now (unless one is in flight); returns the length
    /// of the initiation written to `dst`.
    pub fn initiate_handshake(&mut self, dst: &mut [u8]) -> Option<usize> {
        match self.tunn.format_handshake_initiation(dst, false) {
            TunnResult::WriteToNetwork(p) => Some(p.len()),
            _ => None,
        }
    }

    /// Wall-clock time of the last completed handshake, if a session exists.
    pub fn last_handshake(&self, now: SystemTime) -> Option<SystemTime> {
        self.tunn
            .time_since_last_handshake()
            .and_then(|d| now.checked_sub(d))
    }

    /// (rx, tx) data bytes.
    pub fn transfer(&self) -> (u64, u64) {
        let (_, tx, rx, _, _) = self.tunn.stats();
        (rx as u64, tx as u64)
    }

    /// Rebuilds the session with new keys or settings (drops current sessions;
    /// the next packet starts a handshake).
    pub fn rebuild(
        &mut self,
        private_key: &PrivateKey,
        public_key: &PublicKey,
        index: u32,
        rate_limiter: Arc<RateLimiter>,
    ) {
        self.tunn = new_tunn(
            private_key,
            public_key,
            index,
            self.preshared_key.as_ref(),
            self.keepalive,
            rate_limiter,
        );
    }

    /// Time since the last handshake, for logs.
    pub fn handshake_age(&self) -> Option<Duration> {
        self.tunn.time_since_last_handshake()
    }
}
