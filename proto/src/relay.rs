//! The relay's wire protocol: a pure codec, no I/O.
//!
//! Every message travels in a frame: a 4-byte big-endian length, then that
//! many bytes (at most [`MAX_FRAME`]). A message is a tag byte followed by its
//! fields; strings are a u16 length plus UTF-8, lists a u16 count plus items.
//! Decoding rejects trailing bytes, over-long fields and unknown tags and never
//! panics on any input.
//!
//! Where messages flow:
//! - Control stream (the first bidirectional stream a client opens): Noise IK
//!   message 1 carries [`Message::Hello`], message 2 carries
//!   [`Message::Accepted`] or [`Message::Rejected`]. Afterwards plain frames:
//!   [`Message::ListTargets`] → [`Message::Targets`].
//! - Tunnel stream engineer → relay: first frame [`Message::Open`], answered by
//!   [`Message::OpenOk`] or [`Message::Rejected`], then raw bytes.
//! - Tunnel stream relay → worker: first frame [`Message::Incoming`], answered
//!   by [`Message::OpenOk`] or [`Message::Rejected`], then raw bytes.
//! - Mesh control stream node → relay: first frame [`Message::MeshJoin`],
//!   answered by [`Message::MeshAccepted`] or [`Message::Rejected`]; from then
//!   on both directions carry [`crate::control::ControlMsg`] frames.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::codec::{self, DecodeError, Reader, Writer};
use crate::peermap::{get_candidate, put_candidate, Candidate, Version, MAX_CANDIDATES};
use crate::secret::Secret;
use ipnet::{Ipv4Net, Ipv6Net};

/// Protocol version carried in [`Hello`]; a relay refuses other versions.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame payload (Noise messages are at most 65535 bytes).
pub const MAX_FRAME: usize = 65535;
/// Most items in a list field.
pub const MAX_LIST: usize = 1024;

/// A codec error: what was malformed (the one [`DecodeError`] of every Weft codec).
pub type WireError = DecodeError;

/// Why the relay (or a worker) refused something. Every reason has a stable
/// code on the wire and a sentence the client prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The join token's expiry has passed.
    TokenExpired,
    /// The join token has no uses left.
    TokenUsedUp,
    /// The operator revoked the join token.
    TokenRevoked,
    /// The relay knows no token with this secret.
    TokenUnknown,
    /// No token was given and the relay does not know this node's key.
    KeyUnknown,
    /// The operator revoked this node.
    NodeRevoked,
    /// The relay's policy does not allow this.
    NotAllowed,
    /// No node of that name is connected.
    NoSuchNode,
    /// The node does not expose that service.
    NoSuchService,
    /// The worker could not reach its local service.
    ServiceUnavailable,
    /// Another key already registered that name.
    NameTaken,
    /// A configured limit was reached.
    LimitExceeded,
    /// The request was malformed.
    BadRequest,
    /// The peer speaks another protocol version.
    UnsupportedVersion,
    /// Something failed inside the relay.
    Internal,
}

impl Reason {
    const ALL: [Reason; 15] = [
        Reason::TokenExpired,
        Reason::TokenUsedUp,
        Reason::TokenRevoked,
        Reason::TokenUnknown,
        Reason::KeyUnknown,
        Reason::NodeRevoked,
        Reason::NotAllowed,
        Reason::NoSuchNode,
        Reason::NoSuchService,
        Reason::ServiceUnavailable,
        Reason::NameTaken,
        Reason::LimitExceeded,
        Reason::BadRequest,
        Reason::UnsupportedVersion,
        Reason::Internal,
    ];

    /// The wire code (1-based, stable).
    pub fn code(self) -> u8 {
        Reason::ALL
            .iter()
            .position(|r| *r == self)
            .map(|i| i as u8 + 1)
            .unwrap_or(0)
    }

    /// The reason for a wire code.
    pub fn from_code(code: u8) -> Result<Reason, WireError> {
        (code as usize)
            .checked_sub(1)
            .and_then(|i| Reason::ALL.get(i).copied())
            .ok_or(WireError::BadValue {
                what: "rejection reason",
                value: code,
            })
    }

    /// A short machine-friendly name (used in logs and metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TokenExpired => "token_expired",
            Reason::TokenUsedUp => "token_used_up",
            Reason::TokenRevoked => "token_revoked",
            Reason::TokenUnknown => "token_unknown",
            Reason::KeyUnknown => "key_unknown",
            Reason::NodeRevoked => "node_revoked",
            Reason::NotAllowed => "not_allowed",
            Reason::NoSuchNode => "no_such_node",
            Reason::NoSuchService => "no_such_service",
            Reason::ServiceUnavailable => "service_unavailable",
            Reason::NameTaken => "name_taken",
            Reason::LimitExceeded => "limit_exceeded",
            Reason::BadRequest => "bad_request",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::Internal => "internal",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Reason::TokenExpired => "token expired",
            Reason::TokenUsedUp => "token used up",
            Reason::TokenRevoked => "token revoked",
            Reason::TokenUnknown => "token unknown",
            Reason::KeyUnknown => "key unknown (join with a token first)",
            Reason::NodeRevoked => "node revoked",
            Reason::NotAllowed => "not allowed by policy",
            Reason::NoSuchNode => "no such node connected",
            Reason::NoSuchService => "no such service",
            Reason::ServiceUnavailable => "service unavailable on the worker",
            Reason::NameTaken => "name already taken by another key",
            Reason::LimitExceeded => "limit exceeded",
            Reason::BadRequest => "bad request",
            Reason::UnsupportedVersion => "unsupported protocol version",
            Reason::Internal => "internal relay error",
        };
        f.write_str(s)
    }
}

/// A refusal: the reason and a human detail (may be empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub reason: Reason,
    /// Extra context for the user (never secret).
    pub detail: String,
}

impl Rejection {
    /// A rejection with a detail.
    pub fn new(reason: Reason, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            write!(f, "{}", self.reason)
        } else {
            write!(f, "{}: {}", self.reason, self.detail)
        }
    }
}

/// A node's first words (inside Noise message 1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`].
    pub version: u8,
    /// The name the node wants (workers: the name engineers use).
    pub name: String,
    /// The join token's secret, on the first join only.
    pub join_secret: Option<Secret>,
    /// Services this node exposes (empty for engineers).
    pub services: Vec<String>,
}

/// A reachable worker, as listed to an engineer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The worker's name.
    pub name: String,
    /// Services the asking node may open on it.
    pub services: Vec<String>,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Client → relay, in Noise message 1.
    Hello(Hello),
    /// Relay → client, in Noise message 2: admitted as `name` with `tags`.
    Accepted {
        /// The registered name.
        name: String,
        /// The node's tags.
        tags: Vec<String>,
    },
    /// A refusal (admission, open, or a worker's local connect).
    Rejected(Rejection),
    /// Engineer → relay on the control stream.
    ListTargets,
    /// Relay → engineer: the workers it may open.
    Targets(Vec<Target>),
    /// Engineer → relay, first frame of a tunnel stream.
    Open {
        /// The worker's name.
        target: String,
        /// The service name on it.
        service: String,
    },
    /// Relay → worker, first frame of a tunnel stream.
    Incoming {
        /// The name of the engineer node.
        from: String,
        /// The service to connect to.
        service: String,
    },
    /// The tunnel is connected; raw bytes follow.
    OpenOk,
    /// Node → relay, first frame of the mesh control stream: join the mesh
    /// (the coordinator) as the admitted identity.
    MeshJoin {
        /// The peer-map version the node already holds (reconnect), if any.
        since: Option<Version>,
        /// The node's current endpoint candidates (at most [`MAX_CANDIDATES`]).
        endpoints: Vec<Candidate>,
    },
    /// Relay → node: joined; coordinator control frames follow.
    MeshAccepted {
        /// Where the relay answers STUN binding requests, as it bound it (an
        /// unspecified IP means "the address you reached the relay at").
        stun: Option<SocketAddr>,
        /// The overlay IPv4 pool (the node routes it through the mesh).
        ipv4_pool: Ipv4Net,
        /// The overlay IPv6 prefix.
        ipv6_prefix: Ipv6Net,
    },
}

const T_HELLO: u8 = 1;
const T_ACCEPTED: u8 = 2;
const T_REJECTED: u8 = 3;
const T_LIST: u8 = 4;
const T_TARGETS: u8 = 5;
const T_OPEN: u8 = 6;
const T_INCOMING: u8 = 7;
const T_OPEN_OK: u8 = 8;
const T_MESH_JOIN: u8 = 9;
const T_MESH_ACCEPTED: u8 = 10;

fn put_strs(w: &mut Writer, v: &[String]) {
    let n = w.count16(v.len(), MAX_LIST);
    for x in &v[..n] {
        w.str16(x);
    }
}

fn get_strs(r: &mut Reader<'_>, what: &'static str) -> Result<Vec<String>, WireError> {
    let n = r.count16(what, MAX_LIST, 2)?;
    (0..n).map(|_| r.str16()).collect()
}

impl Message {
    /// Encodes the message (without frame header).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match self {
            Message::Hello(h) => {
                w.u8(T_HELLO);
                w.u8(h.version);
                w.str16(&h.name);
                match &h.join_secret {
                    Some(s) => {
                        w.u8(1);
                        w.bytes(s.expose());
                    }
                    None => w.u8(0),
                }
                put_strs(&mut w, &h.services);
            }
            Message::Accepted { name, tags } => {
                w.u8(T_ACCEPTED);
                w.str16(name);
                put_strs(&mut w, tags);
            }
            Message::Rejected(r) => {
                w.u8(T_REJECTED);
                w.u8(r.reason.code());
                w.str16(&r.detail);
            }
            Message::ListTargets => w.u8(T_LIST),
            Message::Targets(ts) => {
                w.u8(T_TARGETS);
                let n = w.count16(ts.len(), MAX_LIST);
                for t in &ts[..n] {
                    w.str16(&t.name);
                    put_strs(&mut w, &t.services);
                }
            }
            Message::Open { target, service } => {
                w.u8(T_OPEN);
                w.str16(target);
                w.str16(service);
            }
            Message::Incoming { from, service } => {
                w.u8(T_INCOMING);
                w.str16(from);
                w.str16(service);
            }
            Message::OpenOk => w.u8(T_OPEN_OK),
            Message::MeshJoin { since, endpoints } => {
                w.u8(T_MESH_JOIN);
                match since {
                    Some(v) => {
                        w.u8(1);
                        v.encode(&mut w);
                    }
                    None => w.u8(0),
                }
                let n = w.count16(endpoints.len(), MAX_CANDIDATES);
                for c in &endpoints[..n] {
                    put_candidate(&mut w, c);
                }
            }
            Message::MeshAccepted {
                stun,
                ipv4_pool,
                ipv6_prefix,
            } => {
                w.u8(T_MESH_ACCEPTED);
                match stun {
                    Some(a) => {
                        w.u8(1);
                        w.addr(*a);
                    }
                    None => w.u8(0),
                }
                w.bytes(&ipv4_pool.addr().octets());
                w.u8(ipv4_pool.prefix_len());
                w.bytes(&ipv6_prefix.addr().octets());
                w.u8(ipv6_prefix.prefix_len());
            }
        }
        w.into_bytes()
    }

    /// Decodes one message; the whole slice must be the message.
    pub fn decode(buf: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader::new(buf);
        let msg = match r.u8()? {
            T_HELLO => {
                let version = r.u8()?;
                let name = r.str16()?;
                let join_secret = match r.u8()? {
                    0 => None,
                    1 => {
                        let b = r.take(32)?;
                        let mut s = [0u8; 32];
                        s.copy_from_slice(b);
                        Some(Secret::new(s))
                    }
                    value => {
                        return Err(WireError::BadValue {
                            what: "flag",
                            value,
                        })
                    }
                };
                let services = get_strs(&mut r, "services")?;
                Message::Hello(Hello {
                    version,
                    name,
                    join_secret,
                    services,
                })
            }
            T_ACCEPTED => Message::Accepted {
                name: r.str16()?,
                tags: get_strs(&mut r, "tags")?,
            },
            T_REJECTED => {
                let reason = Reason::from_code(r.u8()?)?;
                Message::Rejected(Rejection {
                    reason,
                    detail: r.str16()?,
                })
            }
            T_LIST => Message::ListTargets,
            T_TARGETS => {
                let n = r.count16("targets", MAX_LIST, 4)?;
                let mut ts = Vec::with_capacity(n.min(64));
                for _ in 0..n {
                    ts.push(Target {
                        name: r.str16()?,
                        services: get_strs(&mut r, "services")?,
                    });
                }
                Message::Targets(ts)
            }
            T_OPEN => Message::Open {
                target: r.str16()?,
                service: r.str16()?,
            },
            T_INCOMING => Message::Incoming {
                from: r.str16()?,
                service: r.str16()?,
            },
            T_OPEN_OK => Message::OpenOk,
            T_MESH_JOIN => {
                let since = if r.flag()? {
                    Some(Version::decode(&mut r)?)
                } else {
                    None
                };
                let n = r.count16("endpoints", MAX_CANDIDATES, 4)?;
                let endpoints = (0..n)
                    .map(|_| get_candidate(&mut r))
                    .collect::<Result<Vec<_>, _>>()?;
                Message::MeshJoin { since, endpoints }
            }
            T_MESH_ACCEPTED => {
                let stun = if r.flag()? { Some(r.addr()?) } else { None };
                let v4 = Ipv4Addr::from(r.arr::<4>()?);
                let l4 = r.u8()?;
                let ipv4_pool = Ipv4Net::new(v4, l4).map_err(|_| WireError::BadValue {
                    what: "IPv4 prefix length",
                    value: l4,
                })?;
                let v6 = Ipv6Addr::from(r.arr::<16>()?);
                let l6 = r.u8()?;
                let ipv6_prefix = Ipv6Net::new(v6, l6).map_err(|_| WireError::BadValue {
                    what: "IPv6 prefix length",
                    value: l6,
                })?;
                Message::MeshAccepted {
                    stun,
                    ipv4_pool,
                    ipv6_prefix,
                }
            }
            t => return Err(WireError::UnknownTag(t)),
        };
        r.finish()?;
        Ok(msg)
    }
}

/// Frames a payload: 4-byte big-endian length, then the payload (at most [`MAX_FRAME`]).
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    codec::frame(payload, MAX_FRAME).map_err(|o| o.as_decode("frame"))
}

/// Splits one frame off the front of `buf`: `Ok(None)` if more bytes are
/// needed, else the payload and how many bytes it consumed.
pub fn decode_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, WireError> {
    codec::split_frame(buf, MAX_FRAME).map_err(|o| o.as_decode("frame"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::laws::{addr, candidate};
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = String> {
        ".{0,24}"
    }

    fn names() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(name(), 0..6)
    }

    fn reason() -> impl Strategy<Value = Reason> {
        prop::sample::select(Reason::ALL.to_vec())
    }

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u8>(), name(), any::<Option<[u8; 32]>>(), names()).prop_map(
                |(version, name, s, services)| Message::Hello(Hello {
                    version,
                    name,
                    join_secret: s.map(Secret::new),
                    services
                })
            ),
            (name(), names()).prop_map(|(name, tags)| Message::Accepted { name, tags }),
            (reason(), name())
                .prop_map(|(reason, detail)| Message::Rejected(Rejection { reason, detail })),
            Just(Message::ListTargets),
            prop::collection::vec(
                (name(), names()).prop_map(|(name, services)| Target { name, services }),
                0..5
            )
            .prop_map(Message::Targets),
            (name(), name()).prop_map(|(target, service)| Message::Open { target, service }),
            (name(), name()).prop_map(|(from, service)| Message::Incoming { from, service }),
            Just(Message::OpenOk),
            (
                any::<Option<(u64, u64)>>(),
                prop::collection::vec(candidate(), 0..=MAX_CANDIDATES)
            )
                .prop_map(|(since, endpoints)| Message::MeshJoin {
                    since: since.map(|(epoch, seq)| Version { epoch, seq }),
                    endpoints
                }),
            (
                prop::option::of(addr()),
                any::<[u8; 4]>(),
                0u8..=32,
                any::<[u8; 16]>(),
                0u8..=128
            )
                .prop_map(|(stun, a4, l4, a6, l6)| Message::MeshAccepted {
                    stun,
                    ipv4_pool: Ipv4Net::new(a4.into(), l4).unwrap_or_default(),
                    ipv6_prefix: Ipv6Net::new(a6.into(), l6).unwrap_or_default(),
                }),
        ]
    }

    proptest! {
        #[test]
        fn codec_laws(m in message(), cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(),
                      bit in 0u8..8, extra in prop::collection::vec(any::<u8>(), 1..8)) {
            crate::codec::laws::check(&m, &m.encode(), Message::decode, cut, (at, bit), &extra)?;
        }

        #[test]
        fn roundtrip(m in message()) {
            let enc = m.encode();
            prop_assert_eq!(Message::decode(&enc), Ok(m.clone()));
            let frame = encode_frame(&enc).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(frame.len(), enc.len() + 4);
            let got = decode_frame(&frame).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, Some((&enc[..], frame.len())));
        }

        #[test]
        fn truncated_frames_need_more(m in message(), cut in any::<prop::sample::Index>()) {
            let enc = m.encode();
            let frame = encode_frame(&enc).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let fc = cut.index(frame.len());
            prop_assert_eq!(decode_frame(&frame[..fc]), Ok(None));
        }

        #[test]
        fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = Message::decode(&bytes);
            let _ = decode_frame(&bytes);
        }

    }

    #[test]
    fn reason_codes_are_stable_and_distinct() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.code() as usize, i + 1);
            assert_eq!(Reason::from_code(r.code()), Ok(*r));
        }
        assert!(Reason::from_code(0).is_err());
        assert!(Reason::from_code(200).is_err());
    }

    #[test]
    fn mesh_join_limits_are_checked() {
        // 17 candidates claimed: refused before reading them.
        let mut m = Message::MeshJoin {
            since: None,
            endpoints: vec![],
        }
        .encode();
        let n = m.len();
        m[n - 2..].copy_from_slice(&((MAX_CANDIDATES + 1) as u16).to_be_bytes());
        assert!(matches!(
            Message::decode(&m),
            Err(WireError::TooLong { .. })
        ));
        // A prefix length over 32 is refused.
        let mut a = Message::MeshAccepted {
            stun: None,
            ipv4_pool: Ipv4Net::default(),
            ipv6_prefix: Ipv6Net::default(),
        }
        .encode();
        a[6] = 33;
        assert_eq!(
            Message::decode(&a),
            Err(WireError::BadValue {
                what: "IPv4 prefix length",
                value: 33
            })
        );
    }

    #[test]
    fn oversized_frame_rejected() {
        let big = vec![0u8; MAX_FRAME + 1];
        assert!(encode_frame(&big).is_err());
        let head = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert!(decode_frame(&head).is_err());
    }
}
