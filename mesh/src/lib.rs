//! Weft mesh node: userspace WireGuard (boringtun) over a TUN device.
//!
//! Pure pieces (configuration, keys, the UAPI codec, the routing table) are
//! separate from the I/O shell (TUN, UDP, netlink, the UAPI socket).

pub mod cli;
pub mod config;
pub(crate) mod disco;
pub mod key;
pub mod status;
pub(crate) mod uapi;

pub(crate) mod allowed_ips;
pub(crate) mod datapath;
pub mod device;
pub mod dns;
pub(crate) mod egress;
pub(crate) mod filter;
pub mod managed;
pub mod netlink;
pub mod node;
pub(crate) mod path;
pub(crate) mod peer;
pub mod udp;

/// Tests: values from their text, e.g. prefixes or addresses
/// (`parsed::<IpNet>(&["10.0.0.0/8", "fd00::/64"])`).
#[cfg(test)]
pub(crate) fn parsed<T: std::str::FromStr>(text: &[&str]) -> Vec<T>
where
    T::Err: std::fmt::Display,
{
    text.iter()
        .map(|n| n.parse().unwrap_or_else(|e| panic!("{n}: {e}")))
        .collect()
}
