//! STUN binding (RFC 5389) for endpoint discovery, both sides: the relay
//! answers binding requests on its STUN port ([`answer`]); a node sends them
//! from its WireGuard socket and reads its reflexive address from the
//! response ([`binding_request`], [`parse_binding_response`], [`StunProbe`]).
//! Encoding and decoding go through the `stun_codec` crate; pure, no I/O.
//!
//! Why here and not in `mesh`: the relay (this crate) answers, and the mesh
//! node will depend on this crate for the control plane anyway (the planned
//! graph is `tunnel-relay` ← `mesh`), so both sides share one implementation.
//!
//! Invariants: every function takes untrusted bytes and never panics; a
//! datagram is handed to the codec only after the cheap header check
//! ([`looks_like_stun`]); the relay answers only well-formed binding
//! requests (anything else gets no reply), and its answers are small (a
//! success response is at most 44 bytes; an error lists only the request's own
//! unknown attribute types), so the port is no useful traffic amplifier.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytecodec::{DecodeExt, EncodeExt};
use stun_codec::rfc5389::attributes::{
    ErrorCode, MappedAddress, UnknownAttributes, XorMappedAddress,
};
use stun_codec::rfc5389::methods::BINDING;
use stun_codec::rfc5389::Attribute;
use stun_codec::Attribute as _;
use stun_codec::{Message, MessageClass, MessageDecoder, MessageEncoder, TransactionId};
use thiserror::Error;

/// The default STUN port (RFC 5389).
pub const STUN_PORT: u16 = 3478;
/// The magic cookie at bytes 4..8.
pub const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];
/// Largest STUN message we decode (requests from nodes are 20 bytes).
pub const MAX_STUN: usize = 548;

/// Why a STUN message was not usable.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StunError {
    /// Not a STUN message (header check failed).
    #[error("not a STUN message")]
    NotStun,
    /// The codec refused it.
    #[error("malformed STUN message: {0}")]
    Malformed(String),
    /// A STUN message, but not a binding success response.
    #[error("not a binding success response")]
    NotBindingResponse,
    /// A success response without a (XOR-)MAPPED-ADDRESS.
    #[error("binding response without a mapped address")]
    NoAddress,
    /// The transaction id is not one we sent.
    #[error("unexpected transaction id")]
    UnknownTransaction,
}

/// The header rule (also used by the node's socket demultiplexer): at least
/// 20 bytes, top two bits of byte 0 zero, the magic cookie, and a length field
/// that is a multiple of 4 and matches the datagram.
pub fn looks_like_stun(d: &[u8]) -> bool {
    if d.len() < 20 || d.len() > MAX_STUN || d[0] & 0xC0 != 0 || d[4..8] != MAGIC_COOKIE {
        return false;
    }
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    len % 4 == 0 && len + 20 == d.len()
}

fn decode(d: &[u8]) -> Result<Message<Attribute>, StunError> {
    if !looks_like_stun(d) {
        return Err(StunError::NotStun);
    }
    let mut dec = MessageDecoder::<Attribute>::new();
    match dec.decode_from_bytes(d) {
        Ok(Ok(m)) => Ok(m),
        Ok(Err(broken)) => Err(StunError::Malformed(broken.error().to_string())),
        Err(e) => Err(StunError::Malformed(e.to_string())),
    }
}

fn encode(m: Message<Attribute>) -> Option<Vec<u8>> {
    MessageEncoder::<Attribute>::new().encode_into_bytes(m).ok()
}

/// A binding request with transaction id `tx` (20 bytes, no attributes).
pub fn binding_request(tx: [u8; 12]) -> Vec<u8> {
    let m = Message::<Attribute>::new(MessageClass::Request, BINDING, TransactionId::new(tx));
    // Encoding a header-only message cannot fail; fall back to the bytes by hand.
    encode(m).unwrap_or_else(|| {
        let mut v = vec![0x00, 0x01, 0x00, 0x00];
        v.extend_from_slice(&MAGIC_COOKIE);
        v.extend_from_slice(&tx);
        v
    })
}

/// The relay's side: the response to a binding request received from
/// `observed` (the datagram's source address), or `None` to drop it.
/// Requests carrying comprehension-required attributes we do not know get a
/// 420 error listing them, as RFC 5389 §7.3.1 requires.
pub fn answer(request: &[u8], observed: SocketAddr) -> Option<Vec<u8>> {
    let req = decode(request).ok()?;
    if req.class() != MessageClass::Request || req.method() != BINDING {
        return None;
    }
    let unknown: Vec<_> = req
        .unknown_attributes()
        .map(|a| a.get_type())
        .filter(|t| t.is_comprehension_required())
        .collect();
    let tx = req.transaction_id();
    if !unknown.is_empty() {
        let mut m = Message::<Attribute>::new(MessageClass::ErrorResponse, BINDING, tx);
        m.add_attribute(ErrorCode::from(
            stun_codec::rfc5389::errors::UnknownAttribute,
        ));
        m.add_attribute(UnknownAttributes::new(unknown));
        return encode(m);
    }
    let observed = SocketAddr::new(observed.ip().to_canonical(), observed.port());
    let mut m = Message::<Attribute>::new(MessageClass::SuccessResponse, BINDING, tx);
    m.add_attribute(XorMappedAddress::new(observed));
    encode(m)
}

/// The node's side: the transaction id and reflexive address of a binding
/// success response (XOR-MAPPED-ADDRESS, else the legacy MAPPED-ADDRESS).
pub fn parse_binding_response(d: &[u8]) -> Result<([u8; 12], SocketAddr), StunError> {
    let m = decode(d)?;
    if m.class() != MessageClass::SuccessResponse || m.method() != BINDING {
        return Err(StunError::NotBindingResponse);
    }
    let addr = m
        .get_attribute::<XorMappedAddress>()
        .map(|a| a.address())
        .or_else(|| m.get_attribute::<MappedAddress>().map(|a| a.address()))
        .ok_or(StunError::NoAddress)?;
    let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
    let mut tx = [0u8; 12];
    tx.copy_from_slice(m.transaction_id().as_bytes());
    Ok((tx, addr))
}

/// A reflexive address learnt from a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reflexive {
    /// Our address as the STUN server saw it.
    pub addr: SocketAddr,
    /// Request → response time.
    pub rtt: Duration,
}

/// The node's outstanding binding requests to one STUN server: matches
/// responses to requests, drops late or foreign ones. Pure; the shell sends
/// what [`StunProbe::request`] returns and feeds datagrams classified as
/// STUN to [`StunProbe::on_response`].
#[derive(Debug, Clone, Default)]
pub struct StunProbe {
    pending: Vec<([u8; 12], Instant)>,
    last: Option<Reflexive>,
}

/// Most outstanding requests kept.
const MAX_PENDING: usize = 8;
/// Requests older than this are forgotten.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

impl StunProbe {
    /// A probe with nothing outstanding.
    pub fn new() -> StunProbe {
        StunProbe::default()
    }

    /// A new request with transaction id `tx` (pass random bytes) sent at `now`.
    pub fn request(&mut self, now: Instant, tx: [u8; 12]) -> Vec<u8> {
        self.pending
            .retain(|(_, t)| now.saturating_duration_since(*t) < REQUEST_TIMEOUT);
        if self.pending.len() == MAX_PENDING {
            self.pending.remove(0);
        }
        self.pending.push((tx, now));
        binding_request(tx)
    }

    /// A STUN datagram from the server: the reflexive address if it answers
    /// one of our requests.
    pub fn on_response(&mut self, now: Instant, d: &[u8]) -> Result<Reflexive, StunError> {
        let (tx, addr) = parse_binding_response(d)?;
        let i = self
            .pending
            .iter()
            .position(|(t, sent)| {
                *t == tx && now.saturating_duration_since(*sent) < REQUEST_TIMEOUT
            })
            .ok_or(StunError::UnknownTransaction)?;
        let (_, sent) = self.pending.remove(i);
        let r = Reflexive {
            addr,
            rtt: now.saturating_duration_since(sent),
        };
        self.last = Some(r);
        Ok(r)
    }

    /// The last reflexive address learnt.
    pub fn last(&self) -> Option<Reflexive> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    #[test]
    fn request_is_the_rfc_header() {
        let r = binding_request([7; 12]);
        assert_eq!(&r[..8], &[0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42]);
        assert_eq!(&r[8..], &[7; 12]);
        assert!(looks_like_stun(&r));
    }

    #[test]
    fn relay_answers_and_node_reads_v4_and_v6() {
        for observed in [
            SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), 41641),
            SocketAddr::new(
                IpAddr::V6("2001:db8::9".parse().unwrap_or(Ipv6Addr::LOCALHOST)),
                51820,
            ),
        ] {
            let t0 = Instant::now();
            let mut probe = StunProbe::new();
            let req = probe.request(t0, [1; 12]);
            let resp = answer(&req, observed);
            let Some(resp) = resp else {
                panic!("no answer")
            };
            assert!(looks_like_stun(&resp));
            // The XOR-MAPPED-ADDRESS attribute (0x0020), not the plain one.
            assert_eq!(&resp[20..22], &[0x00, 0x20]);
            let got = probe.on_response(t0 + Duration::from_millis(12), &resp);
            assert_eq!(
                got,
                Ok(Reflexive {
                    addr: observed,
                    rtt: Duration::from_millis(12)
                })
            );
            assert_eq!(probe.last().map(|r| r.addr), Some(observed));
            // The same response again: already consumed.
            assert_eq!(
                probe.on_response(t0, &resp),
                Err(StunError::UnknownTransaction)
            );
        }
    }

    #[test]
    fn v4_mapped_source_is_reported_as_v4() {
        let mapped = SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(198, 51, 100, 1).to_ipv6_mapped()),
            1000,
        );
        let resp = answer(&binding_request([2; 12]), mapped).unwrap_or_default();
        assert_eq!(
            parse_binding_response(&resp).map(|(_, a)| a),
            Ok("198.51.100.1:1000".parse().unwrap_or(mapped))
        );
    }

    #[test]
    fn only_binding_requests_are_answered() {
        let obs: SocketAddr = "192.0.2.1:5".parse().unwrap_or_else(|_| panic!());
        // A response is not answered (no ping-pong between two relays).
        let resp = answer(&binding_request([3; 12]), obs).unwrap_or_default();
        assert_eq!(answer(&resp, obs), None);
        // Garbage, WireGuard-like, truncated: dropped.
        assert_eq!(answer(&[1, 0, 0, 0, 1, 2, 3], obs), None);
        assert_eq!(answer(&[0u8; 20], obs), None);
        // A request is not a response.
        assert_eq!(
            parse_binding_response(&binding_request([3; 12])),
            Err(StunError::NotBindingResponse)
        );
    }

    #[test]
    fn unknown_required_attribute_gets_420() {
        let mut req = binding_request([4; 12]);
        // Attribute 0x0777 (comprehension-required, unknown), 4 bytes of value.
        req.extend_from_slice(&[0x07, 0x77, 0x00, 0x04, 1, 2, 3, 4]);
        req[3] = 8;
        let obs: SocketAddr = "192.0.2.1:5".parse().unwrap_or_else(|_| panic!());
        let resp = answer(&req, obs).unwrap_or_default();
        assert!(looks_like_stun(&resp));
        // Class bits of 0x0111: error response to binding.
        assert_eq!(&resp[..2], &[0x01, 0x11]);
        assert!(resp.windows(2).any(|w| w == [0x07, 0x77]));
        // Unknown comprehension-optional attributes are ignored.
        let mut req = binding_request([5; 12]);
        req.extend_from_slice(&[0x80, 0x77, 0x00, 0x04, 1, 2, 3, 4]);
        req[3] = 8;
        let resp = answer(&req, obs).unwrap_or_default();
        assert_eq!(parse_binding_response(&resp).map(|(_, a)| a), Ok(obs));
    }

    #[test]
    fn late_responses_are_ignored() {
        let t0 = Instant::now();
        let mut p = StunProbe::new();
        let req = p.request(t0, [6; 12]);
        let obs: SocketAddr = "192.0.2.1:5".parse().unwrap_or_else(|_| panic!());
        let resp = answer(&req, obs).unwrap_or_default();
        assert_eq!(
            p.on_response(t0 + Duration::from_secs(6), &resp),
            Err(StunError::UnknownTransaction)
        );
        // Outstanding requests stay bounded.
        for i in 0..100u8 {
            p.request(t0, [i; 12]);
        }
        assert!(p.pending.len() <= MAX_PENDING);
    }

    proptest! {
        #[test]
        fn roundtrip_any_address(ip in any::<[u8; 16]>(), v4 in any::<bool>(), port in any::<u16>(), tx in any::<[u8; 12]>()) {
            let ip = if v4 { IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3])) } else { IpAddr::V6(Ipv6Addr::from(ip)).to_canonical() };
            let obs = SocketAddr::new(ip, port);
            let resp = answer(&binding_request(tx), obs);
            prop_assert!(resp.is_some());
            prop_assert_eq!(parse_binding_response(&resp.unwrap_or_default()), Ok((tx, obs)));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..128), stunlike in any::<bool>()) {
            let mut b = bytes;
            if stunlike && b.len() >= 20 {
                b[0] &= 0x3F;
                b[4..8].copy_from_slice(&MAGIC_COOKIE);
                let n = (b.len() - 20) / 4 * 4;
                b.truncate(20 + n);
                b[2..4].copy_from_slice(&(n as u16).to_be_bytes());
            }
            let obs: SocketAddr = "192.0.2.1:5".parse().unwrap_or_else(|_| panic!());
            let _ = answer(&b, obs);
            let _ = parse_binding_response(&b);
            let _ = StunProbe::new().on_response(Instant::now(), &b);
        }
    }
}
