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
//!
//! ## The fast relay path (plain UDP channels)
//! QUIC datagrams cost a QUIC packet's crypto and bookkeeping per WireGuard
//! packet on each hop. Where UDP passes, nodes instead send relayed packets
//! from their WireGuard socket to the relay's UDP port (the STUN port) with a
//! 12-byte channel header, and the relay forwards them as they are, in GRO/GSO
//! batches, rewriting only the header: `[0xD7][0, 0, 0][slot u64]`, where the
//! slot is the first 8 bytes of a node key (from a node: the destination's;
//! from the relay: the source's). The relay accepts data only from a UDP
//! address a node *bound* to its slot: the node sends
//! `[0xD8][0, 0, 0][own slot][counter u64][MAC 16]` from that socket, the MAC
//! (HMAC-SHA256, cut to 16 bytes) keyed by a secret both ends derive from the
//! TLS exporter of the node's admitted relay connection ([`bind_key`]), with
//! a counter that must grow (no replays); the relay answers with the same
//! shape under kind `0xD9` (rate-limited), and the node uses the fast path
//! only while such acks come. Forwarding follows the same policy as the QUIC
//! datagrams ([`crate::routes::Routes::datagram_route`]); anything else is
//! dropped and counted. QUIC datagrams remain the path when UDP does not pass
//! (and the TCP/TLS fallback carries them when the relay is reached over TCP).

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

/// Kind byte of a packet one relay of a fleet hands another (its
/// destination is homed there): `[2][source key][destination key][packet]`,
/// on the relays' authenticated peer connection only.
pub const KIND_FORWARD: u8 = 2;
/// Bytes the relay-to-relay framing adds to each packet.
pub const FORWARD_OVERHEAD: usize = 1 + 32 + 32;

/// Frames `packet` from `src` to `dst` for another relay of the fleet.
pub fn encode_forward(src: &PublicKey, dst: &PublicKey, packet: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(FORWARD_OVERHEAD + packet.len());
    b.put_u8(KIND_FORWARD);
    b.put_slice(&src.0);
    b.put_slice(&dst.0);
    b.put_slice(packet);
    b.freeze()
}

/// Splits a relay-to-relay datagram into source, destination and packet.
pub fn decode_forward(d: &Bytes) -> Result<(PublicKey, PublicKey, Bytes), DatagramError> {
    if d.len() < FORWARD_OVERHEAD {
        return Err(DatagramError::Short(d.len()));
    }
    if d[0] != KIND_FORWARD {
        return Err(DatagramError::UnknownKind(d[0]));
    }
    let mut s = [0u8; 32];
    s.copy_from_slice(&d[1..33]);
    let mut t = [0u8; 32];
    t.copy_from_slice(&d[33..FORWARD_OVERHEAD]);
    Ok((PublicKey(s), PublicKey(t), d.slice(FORWARD_OVERHEAD..)))
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

    /// The fast path's bind key for this connection (see the module doc).
    pub fn bind_key(&self) -> Option<[u8; 32]> {
        self.conn.exporter().map(|e| bind_key(&e))
    }

    /// Which transport carries this path's datagrams.
    pub fn transport(&self) -> crate::transport::Kind {
        self.conn.kind()
    }

    /// The largest packet that fits one datagram on this path now (grows
    /// as QUIC discovers the path MTU); `None` if the relay refuses datagrams.
    pub fn max_packet(&self) -> Option<usize> {
        self.conn
            .max_datagram_size()
            .map(|m| m.saturating_sub(OVERHEAD))
    }
}

/// First byte of a fast-path data packet.
pub const FAST_DATA: u8 = 0xD7;
/// First byte of a bind request (node → relay).
pub const FAST_BIND: u8 = 0xD8;
/// First byte of a bind acknowledgement (relay → node).
pub const FAST_ACK: u8 = 0xD9;
/// Bytes of a fast-path data header.
pub const FAST_HEADER: usize = 12;
/// Bytes of a bind request or acknowledgement.
pub const BIND_LEN: usize = 36;
const BIND_LABEL: &[u8] = b"weft fast relay bind v1";

/// A node's slot on the fast path: the first 8 bytes of its key.
pub fn slot(key: &PublicKey) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&key.0[..8]);
    u64::from_be_bytes(b)
}

/// The data header carrying `slot`.
pub fn fast_header(slot: u64) -> [u8; FAST_HEADER] {
    let mut h = [0u8; FAST_HEADER];
    h[0] = FAST_DATA;
    h[4..].copy_from_slice(&slot.to_be_bytes());
    h
}

/// The slot of a fast-path data packet (`None` if it is not one or has no payload).
pub fn fast_slot(d: &[u8]) -> Option<u64> {
    if d.len() <= FAST_HEADER || d[0] != FAST_DATA || d[1..4] != [0, 0, 0] {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[4..FAST_HEADER]);
    Some(u64::from_be_bytes(b))
}

/// Rewrites the slot of a fast-path data packet in place.
pub fn set_fast_slot(d: &mut [u8], slot: u64) {
    if d.len() >= FAST_HEADER {
        d[4..FAST_HEADER].copy_from_slice(&slot.to_be_bytes());
    }
}

/// The bind key of a relay connection: both ends derive it from the TLS
/// exporter value the Noise admission is bound to.
pub fn bind_key(exporter: &[u8; 32]) -> [u8; 32] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, exporter);
    let tag = ring::hmac::sign(&k, BIND_LABEL);
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

fn bind_mac(key: &[u8; 32], head: &[u8]) -> [u8; 16] {
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, head);
    let mut out = [0u8; 16];
    out.copy_from_slice(&tag.as_ref()[..16]);
    out
}

/// A bind request (`FAST_BIND`) or acknowledgement (`FAST_ACK`).
pub fn bind_packet(kind: u8, key: &[u8; 32], slot: u64, counter: u64) -> [u8; BIND_LEN] {
    let mut p = [0u8; BIND_LEN];
    p[0] = kind;
    p[4..12].copy_from_slice(&slot.to_be_bytes());
    p[12..20].copy_from_slice(&counter.to_be_bytes());
    let mac = bind_mac(key, &p[..20]);
    p[20..].copy_from_slice(&mac);
    p
}

/// The slot and counter of a bind packet of `kind`, before its MAC is checked.
pub fn bind_fields(kind: u8, d: &[u8]) -> Option<(u64, u64)> {
    if d.len() != BIND_LEN || d[0] != kind || d[1..4] != [0, 0, 0] {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&d[4..12]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&d[12..20]);
    Some((u64::from_be_bytes(s), u64::from_be_bytes(c)))
}

/// Whether a bind packet's MAC is right under `key` (constant time).
pub fn bind_valid(key: &[u8; 32], d: &[u8]) -> bool {
    if d.len() != BIND_LEN {
        return false;
    }
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let tag = ring::hmac::sign(&k, &d[..20]);
    // No early exit: the comparison takes the same time wherever it differs.
    tag.as_ref()[..16]
        .iter()
        .zip(&d[20..])
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bind_packets_verify_only_under_their_key_and_kind() {
        let key = bind_key(&[7; 32]);
        let p = bind_packet(FAST_BIND, &key, 42, 9);
        assert_eq!(bind_fields(FAST_BIND, &p), Some((42, 9)));
        assert_eq!(bind_fields(FAST_ACK, &p), None);
        assert!(bind_valid(&key, &p));
        assert!(!bind_valid(&bind_key(&[8; 32]), &p));
        let mut tampered = p;
        tampered[19] ^= 1;
        assert!(!bind_valid(&key, &tampered));
        let mut d = fast_header(5).to_vec();
        d.extend_from_slice(b"wireguard");
        assert_eq!(fast_slot(&d), Some(5));
        set_fast_slot(&mut d, 6);
        assert_eq!(fast_slot(&d), Some(6));
        assert_eq!(fast_slot(&d[..FAST_HEADER]), None);
        assert_eq!(slot(&PublicKey([1; 32])), 0x0101_0101_0101_0101);
    }

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
        fn forward_roundtrip(src in any::<[u8; 32]>(), dst in any::<[u8; 32]>(), packet in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let d = encode_forward(&PublicKey(src), &PublicKey(dst), &packet);
            prop_assert_eq!(d.len(), packet.len() + FORWARD_OVERHEAD);
            let (s, t, p) = decode_forward(&d).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(s, PublicKey(src));
            prop_assert_eq!(t, PublicKey(dst));
            prop_assert_eq!(&p[..], &packet[..]);
            // A node's framing is not a relay's, and the other way round.
            prop_assert!(decode(&d).is_err());
            prop_assert!(decode_forward(&encode(&PublicKey(src), &packet)).is_err());
        }

        #[test]
        fn forward_garbage_never_panics(d in proptest::collection::vec(any::<u8>(), 0..100)) {
            let d = Bytes::from(d);
            match decode_forward(&d) {
                Ok((_, _, p)) => prop_assert_eq!(p.len() + FORWARD_OVERHEAD, d.len()),
                Err(DatagramError::Short(n)) => prop_assert!(n < FORWARD_OVERHEAD),
                Err(DatagramError::UnknownKind(k)) => prop_assert_ne!(k, KIND_FORWARD),
            }
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
