//! The relay path of the mesh: WireGuard packets carried through the relay as
//! QUIC datagrams (unreliable, unordered: exactly what WireGuard expects of
//! UDP), addressed by node key.
//!
//! Datagram format, both directions: `[kind = 1][peer key, 32 bytes][packet]`.
//! From a node, `peer` is the destination; from the relay, the source (the
//! relay rewrites it, so a node cannot spoof another's key). The relay
//! forwards only between nodes the mesh ACL lets talk
//! ([`weft_proto::acl::AclPolicy::may_talk`], the same rule that decides peer
//! visibility in the coordinator) and drops anything else silently,
//! as a router would. The WireGuard packet inside stays end-to-end
//! encrypted: the relay sees keys and sizes, never contents.

use bytes::{BufMut, Bytes, BytesMut};
use quinn::{ConnectionError, SendDatagramError};

use crate::transport::Connection;

use crate::keys::PublicKey;

/// Kind byte of a WireGuard packet datagram.
pub const KIND_WIREGUARD: u8 = 1;
/// Bytes this framing adds to each packet.
pub const OVERHEAD: usize = 1 + 32;

/// Why a datagram was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DatagramError {
    /// Shorter than the header.
    #[error("relay datagram of {0} bytes is shorter than its 33-byte header")]
    Short(usize),
    /// Unknown kind byte.
    #[error("relay datagram of unknown kind {0}")]
    UnknownKind(u8),
}

/// Frames `packet` for `peer`.
pub fn encode(peer: &PublicKey, packet: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(OVERHEAD + packet.len());
    b.put_u8(KIND_WIREGUARD);
    b.put_slice(&peer.0);
    b.put_slice(packet);
    b.freeze()
}

/// Splits a datagram into its peer key and packet (the packet shares `d`'s
/// memory).
pub fn decode(d: &Bytes) -> Result<(PublicKey, Bytes), DatagramError> {
    if d.len() < OVERHEAD {
        return Err(DatagramError::Short(d.len()));
    }
    if d[0] != KIND_WIREGUARD {
        return Err(DatagramError::UnknownKind(d[0]));
    }
    let mut k = [0u8; 32];
    k.copy_from_slice(&d[1..OVERHEAD]);
    Ok((PublicKey(k), d.slice(OVERHEAD..)))
}

/// A node's end of the relay path, over its admitted relay connection.
#[derive(Debug, Clone)]
pub struct RelayPath {
    conn: Connection,
}

impl RelayPath {
    /// Uses an admitted session's connection.
    pub fn new(conn: Connection) -> RelayPath {
        RelayPath { conn }
    }

    /// Sends one packet to `to` through the relay (dropped by the relay when
    /// `to` is not connected or not allowed).
    pub fn send(&self, to: &PublicKey, packet: &[u8]) -> Result<(), SendDatagramError> {
        self.conn.send_datagram(encode(to, packet))
    }

    /// The next packet and its sender. Malformed datagrams are skipped.
    pub async fn recv(&self) -> Result<(PublicKey, Bytes), ConnectionError> {
        loop {
            let d = self.conn.read_datagram().await?;
            if let Ok(p) = decode(&d) {
                return Ok(p);
            }
        }
    }

    /// The largest packet that fits one datagram on this path now (grows
    /// as QUIC discovers the path MTU); `None` if the relay refuses datagrams.
    pub fn max_packet(&self) -> Option<usize> {
        self.conn
            .max_datagram_size()
            .map(|m| m.saturating_sub(OVERHEAD))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn roundtrip(key in any::<[u8; 32]>(), packet in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let d = encode(&PublicKey(key), &packet);
            prop_assert_eq!(d.len(), packet.len() + OVERHEAD);
            let (k, p) = decode(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(k, PublicKey(key));
            prop_assert_eq!(&p[..], &packet[..]);
        }

        #[test]
        fn garbage_never_panics(d in proptest::collection::vec(any::<u8>(), 0..100)) {
            let d = Bytes::from(d);
            match decode(&d) {
                Ok((_, p)) => prop_assert_eq!(p.len() + OVERHEAD, d.len()),
                Err(DatagramError::Short(n)) => prop_assert!(n < OVERHEAD),
                Err(DatagramError::UnknownKind(k)) => prop_assert_ne!(k, KIND_WIREGUARD),
            }
        }
    }
}
