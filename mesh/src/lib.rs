//! Weft mesh node: userspace WireGuard (boringtun) over a TUN device.
//!
//! Pure pieces (configuration, keys, the UAPI codec, the routing table) are
//! separate from the I/O shell (TUN, UDP, netlink, the UAPI socket).

pub mod cli;
pub mod config;
pub mod disco;
pub mod key;
pub mod status;
pub mod uapi;

pub mod allowed_ips;
pub mod device;
pub mod dns;
pub mod egress;
pub mod filter;
pub mod managed;
pub mod netlink;
pub mod node;
pub mod path;
pub mod peer;
pub mod udp;
