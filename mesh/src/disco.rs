//! Disco: the small authenticated packets nodes use to find a direct path
//! (ping, pong, call-me-maybe), and the demultiplexer of the one UDP socket.
//!
//! # Why
//! WireGuard itself cannot tell us whether a candidate address works without
//! a handshake per candidate, and its packets must not be spent on probes.
//! Disco packets travel on the same UDP socket as WireGuard (so they punch
//! the same NAT mappings) and are told apart by [`classify`].
//!
//! # Packet format
//! ```text
//! 0..8    MAGIC "Weft🧵" (57 65 66 74 f0 9f a7 b5)
//! 8..40   sender's node public key (X25519, the WireGuard static key)
//! 40..64  nonce (24 bytes, random per packet)
//! 64..    XChaCha20-Poly1305 ciphertext of the message, AAD = bytes 0..40
//! ```
//! The key is `BLAKE2s-256("weft disco v1" || X25519(my private, peer public)
//! || lower public key || higher public key)`: both ends derive the same key
//! from their static keys, so no handshake is needed and only the two nodes
//! can produce or read the packets. Messages (plaintext): a type byte, a
//! version byte (1), then
//! - ping: transaction id (12) and the sender's node key (32, must equal the
//!   header's);
//! - pong: the transaction id (12) and the source address the ping came from
//!   (16 bytes IPv6 or IPv4-mapped, then a u16 port);
//! - call-me-maybe: a count (u8, at most [`MAX_CALL_ME_MAYBE`]) and that many
//!   addresses.
//!
//! # Invariants
//! [`classify`] is total and its classes are disjoint by construction (see its
//! doc). [`SharedKey::open`] returns a message only for a packet sealed with
//! the same pair of keys and unmodified in any byte; nothing here panics on
//! any input. The sealing nonce is an argument ([`SharedKey::seal`]) so
//! tests are deterministic; [`SharedKey::seal_random`] draws it from the OS.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use blake2::{Blake2s256, Digest};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use thiserror::Error;

use crate::key::{PrivateKey, PublicKey, KEY_LEN};

/// The first bytes of every disco packet.
pub(crate) const MAGIC: [u8; 8] = *b"Weft\xf0\x9f\xa7\xb5";
/// Header: magic, sender key, nonce.
pub(crate) const HEADER_LEN: usize = MAGIC.len() + KEY_LEN + NONCE_LEN;
/// Nonce length (XChaCha20).
pub(crate) const NONCE_LEN: usize = 24;
/// Poly1305 tag length.
pub(crate) const TAG_LEN: usize = 16;
/// Smallest possible disco packet (header, type + version, tag).
pub(crate) const MIN_LEN: usize = HEADER_LEN + 2 + TAG_LEN;
/// Most addresses in one call-me-maybe.
pub(crate) const MAX_CALL_ME_MAYBE: usize = 16;
/// STUN's magic cookie (RFC 5389), bytes 4..8 of every STUN message.
pub(crate) const STUN_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

const VERSION: u8 = 1;
const T_PING: u8 = 1;
const T_PONG: u8 = 2;
const T_CALL_ME_MAYBE: u8 = 3;
const LABEL: &[u8] = b"weft disco v1";

/// What a datagram on the node's UDP socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    /// A WireGuard message (type 1-4 with its exact length rule).
    WireGuard,
    /// A STUN message (a binding response from the relay, usually).
    Stun,
    /// A disco packet (starts with [`MAGIC`]).
    Disco,
    /// A WireGuard packet on the fast relay path, behind its channel header
    /// (`tunnel_relay::relay_path::FAST_DATA`).
    FastData,
    /// The relay's acknowledgement of a fast-path bind.
    FastAck,
    /// Anything else: drop and count.
    Unknown,
}

/// Classifies a datagram. The rules, and why no packet fits two:
/// - WireGuard: byte 0 is 1-4 and bytes 1..4 are zero; length exactly 148
///   (initiation), 92 (response), 64 (cookie reply), or at least 32 (data;
///   boringtun does not pad, so any length from 32 up).
/// - STUN: byte 0 has its top two bits zero, bytes 4..8 are the magic cookie,
///   and the length field (bytes 2..4) is a multiple of 4 equal to the
///   datagram's length minus 20. A WireGuard-shaped packet has a zero length
///   field, so as STUN it would be exactly 20 bytes: shorter than any
///   WireGuard message.
/// - Disco: starts with [`MAGIC`], whose byte 0 (`W`, 0x57) is neither a
///   WireGuard type nor has its top two bits zero; at least [`MIN_LEN`] bytes.
pub(crate) fn classify(d: &[u8]) -> Kind {
    if d.len() >= MIN_LEN && d[..MAGIC.len()] == MAGIC {
        return Kind::Disco;
    }
    // Fast relay path: byte 0 is 0xD7/0xD9 (top bits 11: never STUN, never a
    // WireGuard type, not disco's 0x57).
    if tunnel_relay::relay_path::fast_slot(d).is_some() {
        return Kind::FastData;
    }
    if tunnel_relay::relay_path::bind_fields(tunnel_relay::relay_path::FAST_ACK, d).is_some() {
        return Kind::FastAck;
    }
    if d.len() >= 4 && d[1..4] == [0, 0, 0] {
        let wg = match d[0] {
            1 => d.len() == 148,
            2 => d.len() == 92,
            3 => d.len() == 64,
            4 => d.len() >= 32,
            _ => false,
        };
        if wg {
            return Kind::WireGuard;
        }
    }
    if is_stun(d) {
        return Kind::Stun;
    }
    Kind::Unknown
}

/// The STUN rule of [`classify`].
pub(crate) fn is_stun(d: &[u8]) -> bool {
    if d.len() < 20 || d[0] & 0xC0 != 0 || d[4..8] != STUN_COOKIE {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    len % 4 == 0 && len + 20 == d.len()
}

/// A disco transaction id: pairs a pong with its ping.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct TxId(pub [u8; 12]);

impl fmt::Debug for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TxId({})", hex::encode(self.0))
    }
}

/// A disco message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message {
    /// "Are you there on this path?"
    Ping {
        /// Transaction id, echoed in the pong.
        tx: TxId,
        /// The sender's node key (equals the header's sender).
        node_key: PublicKey,
    },
    /// "Yes; your ping came from `src`."
    Pong {
        /// The ping's transaction id.
        tx: TxId,
        /// The ping's source address as the responder saw it.
        src: SocketAddr,
    },
    /// "Ping me at these addresses now" (sent through the relay so both
    /// sides probe at once and open their NATs for each other).
    CallMeMaybe {
        /// The sender's candidates (at most [`MAX_CALL_ME_MAYBE`] are sent).
        endpoints: Vec<SocketAddr>,
    },
}

/// Why a packet was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub(crate) enum DiscoError {
    /// It does not start with the magic or is too short.
    #[error("not a disco packet")]
    NotDisco,
    /// Authentication failed: wrong key, or modified in transit.
    #[error("disco packet failed authentication")]
    Unauthenticated,
    /// Authentic but malformed (a bug or a newer version on the peer).
    #[error("malformed disco message: {0}")]
    Malformed(&'static str),
    /// A ping's node key differs from the header's sender.
    #[error("ping names another node key than its sender")]
    KeyMismatch,
    /// The peer's public key is a low-order point (no shared secret).
    #[error("peer public key gives no shared secret")]
    WeakKey,
}

/// The sender's key from a disco header (unauthenticated: used only to
/// find the [`SharedKey`] to open it with).
pub(crate) fn sender(packet: &[u8]) -> Option<PublicKey> {
    if packet.len() < MIN_LEN || packet[..MAGIC.len()] != MAGIC {
        return None;
    }
    let mut k = [0u8; KEY_LEN];
    k.copy_from_slice(&packet[MAGIC.len()..MAGIC.len() + KEY_LEN]);
    Some(PublicKey::from_bytes(k))
}

/// The symmetric key two nodes share for disco. `Debug` prints nothing.
#[derive(Clone)]
pub(crate) struct SharedKey {
    cipher: XChaCha20Poly1305,
}

impl fmt::Debug for SharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SharedKey(<redacted>)")
    }
}

fn encode_addr(out: &mut Vec<u8>, a: &SocketAddr) {
    let v6 = match a.ip() {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    out.extend_from_slice(&v6.octets());
    out.extend_from_slice(&a.port().to_be_bytes());
}

fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    let ip: [u8; 16] = b.get(..16)?.try_into().ok()?;
    let port = u16::from_be_bytes(b.get(16..18)?.try_into().ok()?);
    let v6 = Ipv6Addr::from(ip);
    let ip = match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    };
    Some(SocketAddr::new(ip, port))
}

impl Message {
    /// The plaintext encoding.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Message::Ping { tx, node_key } => {
                out.extend_from_slice(&[T_PING, VERSION]);
                out.extend_from_slice(&tx.0);
                out.extend_from_slice(node_key.as_bytes());
            }
            Message::Pong { tx, src } => {
                out.extend_from_slice(&[T_PONG, VERSION]);
                out.extend_from_slice(&tx.0);
                encode_addr(&mut out, src);
            }
            Message::CallMeMaybe { endpoints } => {
                let n = endpoints.len().min(MAX_CALL_ME_MAYBE);
                out.extend_from_slice(&[T_CALL_ME_MAYBE, VERSION, n as u8]);
                for e in &endpoints[..n] {
                    encode_addr(&mut out, e);
                }
            }
        }
        out
    }

    /// Decodes a plaintext.
    pub(crate) fn decode(b: &[u8]) -> Result<Message, DiscoError> {
        let [t, v, body @ ..] = b else {
            return Err(DiscoError::Malformed("empty"));
        };
        let (t, v) = (*t, *v);
        if v != VERSION {
            return Err(DiscoError::Malformed("unknown version"));
        }
        let tx = |body: &[u8]| -> Result<TxId, DiscoError> {
            body.get(..12)
                .and_then(|s| <[u8; 12]>::try_from(s).ok())
                .map(TxId)
                .ok_or(DiscoError::Malformed("truncated"))
        };
        match t {
            T_PING => {
                if body.len() != 12 + KEY_LEN {
                    return Err(DiscoError::Malformed("ping length"));
                }
                let mut k = [0u8; KEY_LEN];
                k.copy_from_slice(&body[12..]);
                Ok(Message::Ping {
                    tx: tx(body)?,
                    node_key: PublicKey::from_bytes(k),
                })
            }
            T_PONG => {
                if body.len() != 12 + 18 {
                    return Err(DiscoError::Malformed("pong length"));
                }
                Ok(Message::Pong {
                    tx: tx(body)?,
                    src: decode_addr(&body[12..]).ok_or(DiscoError::Malformed("pong address"))?,
                })
            }
            T_CALL_ME_MAYBE => {
                let (&n, rest) = body
                    .split_first()
                    .ok_or(DiscoError::Malformed("call-me-maybe count"))?;
                let n = usize::from(n);
                if n > MAX_CALL_ME_MAYBE || rest.len() != n * 18 {
                    return Err(DiscoError::Malformed("call-me-maybe length"));
                }
                let endpoints = rest
                    .chunks_exact(18)
                    .map(|c| decode_addr(c).ok_or(DiscoError::Malformed("address")))
                    .collect::<Result<_, _>>()?;
                Ok(Message::CallMeMaybe { endpoints })
            }
            _ => Err(DiscoError::Malformed("unknown type")),
        }
    }
}

impl SharedKey {
    /// Derives the key shared by `me` and `peer` (the same on both sides).
    pub(crate) fn derive(me: &PrivateKey, peer: &PublicKey) -> Result<SharedKey, DiscoError> {
        let dh = me
            .to_static_secret()
            .diffie_hellman(&crate::key::to_x25519(peer));
        if !dh.was_contributory() {
            return Err(DiscoError::WeakKey);
        }
        let mine = me.public_key();
        let (lo, hi) = if mine.as_bytes() <= peer.as_bytes() {
            (mine, *peer)
        } else {
            (*peer, mine)
        };
        let mut h = Blake2s256::new();
        h.update(LABEL);
        h.update(dh.as_bytes());
        h.update(lo.as_bytes());
        h.update(hi.as_bytes());
        let key = h.finalize();
        Ok(SharedKey {
            cipher: XChaCha20Poly1305::new(&key),
        })
    }

    /// Seals `msg` from `sender` (the sealing node's public key) with `nonce`.
    /// A nonce must never repeat under one key: use random ones.
    pub(crate) fn seal(
        &self,
        sender: &PublicKey,
        msg: &Message,
        nonce: [u8; NONCE_LEN],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + 64 + TAG_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(sender.as_bytes());
        let aad_end = out.len();
        out.extend_from_slice(&nonce);
        let plain = msg.encode();
        // Encryption cannot fail for inputs this small (the AEAD's only error
        // is a message over 256 GiB); fall back to an empty, invalid packet.
        match self.cipher.encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: &out[..aad_end],
            },
        ) {
            Ok(ct) => {
                out.extend_from_slice(&ct);
                out
            }
            Err(_) => Vec::new(),
        }
    }

    /// [`SharedKey::seal`] with a random nonce.
    pub(crate) fn seal_random(&self, sender: &PublicKey, msg: &Message) -> Vec<u8> {
        self.seal(sender, msg, rand::random())
    }

    /// Authenticates and decodes a packet sealed by the other side.
    pub(crate) fn open(&self, packet: &[u8]) -> Result<Message, DiscoError> {
        let from = sender(packet).ok_or(DiscoError::NotDisco)?;
        let (aad, rest) = packet.split_at(MAGIC.len() + KEY_LEN);
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad })
            .map_err(|_| DiscoError::Unauthenticated)?;
        let msg = Message::decode(&plain)?;
        if let Message::Ping { node_key, .. } = &msg {
            if *node_key != from {
                return Err(DiscoError::KeyMismatch);
            }
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keypair(seed: u8) -> (PrivateKey, PublicKey) {
        let mut b = [seed; 32];
        b[0] &= 248;
        b[31] &= 127;
        b[31] |= 64;
        let k = PrivateKey::from_bytes(b);
        let p = k.public_key();
        (k, p)
    }

    fn pair(a: u8, b: u8) -> (PublicKey, SharedKey, PublicKey, SharedKey) {
        let (ak, ap) = keypair(a);
        let (bk, bp) = keypair(b);
        let (Ok(sa), Ok(sb)) = (SharedKey::derive(&ak, &bp), SharedKey::derive(&bk, &ap)) else {
            panic!("derive")
        };
        (ap, sa, bp, sb)
    }

    fn addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_filter("not v4-mapped", |(a, _)| Ipv6Addr::from(*a)
                    .to_ipv4_mapped()
                    .is_none())
                .prop_map(|(a, p)| SocketAddr::new(IpAddr::from(a), p)),
        ]
    }

    fn message(sender: PublicKey) -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<[u8; 12]>().prop_map(move |t| Message::Ping {
                tx: TxId(t),
                node_key: sender
            }),
            (any::<[u8; 12]>(), addr()).prop_map(|(t, src)| Message::Pong { tx: TxId(t), src }),
            prop::collection::vec(addr(), 0..=MAX_CALL_ME_MAYBE)
                .prop_map(|endpoints| Message::CallMeMaybe { endpoints }),
        ]
    }

    fn sender_a() -> PublicKey {
        keypair(1).1
    }

    #[test]
    fn both_sides_derive_the_same_key_and_others_cannot_read() {
        let (ap, sa, bp, sb) = pair(1, 2);
        let m = Message::Ping {
            tx: TxId([7; 12]),
            node_key: ap,
        };
        let pkt = sa.seal(&ap, &m, [3; 24]);
        assert_eq!(classify(&pkt), Kind::Disco);
        assert_eq!(sender(&pkt), Some(ap));
        assert_eq!(sb.open(&pkt), Ok(m));
        // A third node (sharing a key with B, not with A) cannot open it.
        let (_, _, _, sc) = pair(3, 2);
        assert_eq!(sc.open(&pkt), Err(DiscoError::Unauthenticated));
        // A ping claiming another node key is refused even if authentic.
        let lie = sa.seal(
            &ap,
            &Message::Ping {
                tx: TxId([0; 12]),
                node_key: bp,
            },
            [4; 24],
        );
        assert_eq!(sb.open(&lie), Err(DiscoError::KeyMismatch));
        assert!(format!("{sa:?}").contains("redacted"));
    }

    #[test]
    fn low_order_peer_key_is_refused() {
        let (ak, _) = keypair(1);
        assert_eq!(
            SharedKey::derive(&ak, &PublicKey::from_bytes([0; 32])).map(|_| ()),
            Err(DiscoError::WeakKey)
        );
    }

    #[test]
    fn wireguard_and_stun_examples() {
        let mut init = vec![0u8; 148];
        init[0] = 1;
        assert_eq!(classify(&init), Kind::WireGuard);
        init.push(0);
        assert_eq!(classify(&init), Kind::Unknown);
        let mut data = vec![0u8; 32];
        data[0] = 4;
        assert_eq!(classify(&data), Kind::WireGuard);
        assert_eq!(classify(&data[..31]), Kind::Unknown);
        // A STUN binding request (RFC 5769 style header, no attributes).
        let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        stun.extend_from_slice(&[9; 12]);
        assert_eq!(classify(&stun), Kind::Stun);
        // WireGuard data whose receiver index happens to be the cookie.
        let mut tricky = vec![0u8; 64];
        tricky[0] = 4;
        tricky[4..8].copy_from_slice(&STUN_COOKIE);
        assert_eq!(classify(&tricky), Kind::WireGuard);
        assert_eq!(classify(&[]), Kind::Unknown);
        assert_eq!(classify(&MAGIC), Kind::Unknown);
    }

    fn wireguard() -> impl Strategy<Value = Vec<u8>> {
        (1u8..=4, 32usize..1500, any::<u64>()).prop_map(|(t, dlen, seed)| {
            let len = match t {
                1 => 148,
                2 => 92,
                3 => 64,
                _ => dlen,
            };
            let mut v: Vec<u8> = (0..len)
                .map(|i| (seed.rotate_left(i as u32 % 64) as u8) ^ (i as u8))
                .collect();
            v[0] = t;
            v[1..4].fill(0);
            v
        })
    }

    fn stun() -> impl Strategy<Value = Vec<u8>> {
        (
            0u8..0x40,
            any::<u8>(),
            0usize..64,
            any::<[u8; 12]>(),
            any::<u8>(),
        )
            .prop_map(|(b0, b1, words, tx, fill)| {
                let mut v = vec![b0, b1];
                v.extend_from_slice(&((words * 4) as u16).to_be_bytes());
                v.extend_from_slice(&STUN_COOKIE);
                v.extend_from_slice(&tx);
                v.extend(std::iter::repeat_n(fill, words * 4));
                v
            })
    }

    proptest! {
        #[test]
        fn seal_open_roundtrip(m in message(sender_a()), nonce in any::<[u8; 24]>()) {
            let (ap, sa, bp, sb) = pair(1, 2);
            let pkt = sa.seal(&ap, &m, nonce);
            prop_assert_eq!(classify(&pkt), Kind::Disco);
            prop_assert_eq!(sb.open(&pkt), Ok(m.clone()));
            // And the other direction with the other key.
            if !matches!(m, Message::Ping { .. }) {
                let back = sb.seal(&bp, &m, nonce);
                prop_assert_eq!(sa.open(&back), Ok(m));
            }
        }

        #[test]
        fn any_modification_fails(m in message(sender_a()), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let (ap, sa, _, sb) = pair(1, 2);
            let mut pkt = sa.seal(&ap, &m, [5; 24]);
            let i = at.index(pkt.len());
            pkt[i] ^= 1 << bit;
            prop_assert!(sb.open(&pkt).is_err());
            // Truncation too.
            prop_assert!(sb.open(&pkt[..i]).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300), magic in any::<bool>()) {
            let (_, _, _, sb) = pair(1, 2);
            let mut b = bytes;
            if magic && b.len() >= MAGIC.len() {
                b[..MAGIC.len()].copy_from_slice(&MAGIC);
            }
            let _ = classify(&b);
            let _ = sender(&b);
            let _ = sb.open(&b);
            let _ = Message::decode(&b);
        }

        #[test]
        fn plaintext_roundtrip(m in message(sender_a())) {
            prop_assert_eq!(Message::decode(&m.encode()), Ok(m));
        }

        #[test]
        fn classify_never_confuses(wg in wireguard(), st in stun(), m in message(sender_a())) {
            prop_assert_eq!(classify(&wg), Kind::WireGuard);
            prop_assert!(!is_stun(&wg));
            prop_assert_eq!(classify(&st), Kind::Stun);
            let (ap, sa, _, _) = pair(1, 2);
            let d = sa.seal(&ap, &m, [1; 24]);
            prop_assert_eq!(classify(&d), Kind::Disco);
            prop_assert!(!is_stun(&d));
        }
    }
}
