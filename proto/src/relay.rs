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
//!   [`Message::OpenOk`] or [`Message::Rejected`], then raw bytes (or, to an
//!   `Open` that allows it, [`Message::Redirect`] to the worker's relay).
//! - Tunnel stream relay → worker: first frame [`Message::Incoming`], answered
//!   by [`Message::OpenOk`] or [`Message::Rejected`], then raw bytes.
//! - Mesh control stream node → relay: first frame [`Message::MeshJoin`],
//!   answered by [`Message::MeshAccepted`] or [`Message::Rejected`]; from then
//!   on both directions carry [`crate::control::ControlMsg`] frames.
//! - Pool API stream engineer → relay: first frame [`Message::Api`], answered
//!   by [`Message::OpenOk`], then HTTP/1.1 (`crate::pool`'s JSON types).

use std::fmt;
use std::net::SocketAddr;

use crate::codec::{DecodeError, Format, FrameLimit, Reader, Width, Wire, Writer};
use crate::peermap::{get_candidates, put_candidates, Candidate, Version};
use crate::secret::Secret;
use ipnet::{Ipv4Net, Ipv6Net};

/// Protocol version carried in [`Hello`]; a relay refuses other versions.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame payload (Noise messages are at most 65535 bytes).
pub const MAX_FRAME: usize = 65535;
/// Relay frames.
pub const FRAME: FrameLimit = FrameLimit {
    max: MAX_FRAME,
    what: "frame",
};
/// Most items in a list field.
pub const MAX_LIST: usize = 1024;
/// u16 string lengths and list counts.
const FORMAT: Format = Format {
    count: Width::U16,
    len: Width::U16,
};

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
    /// The node joined, and waits for an operator to approve it (a provider's machine on a
    /// relay with `approve_devices`): it is admitted once approved.
    AwaitingApproval,
}

impl Reason {
    const ALL: [Reason; 16] = [
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
        Reason::AwaitingApproval,
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
            Reason::AwaitingApproval => "awaiting_approval",
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
            Reason::AwaitingApproval => "waiting for an operator to approve this node",
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

/// One relay of a fleet, as a relay lists them to its nodes
/// ([`Message::Relays`]): what a node needs to measure its latency to it and
/// to connect to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RelayEntry {
    /// Its name (`name` in its config): what peer maps and `weft status` call it.
    pub name: String,
    /// Its region (`region` in its config).
    pub region: String,
    /// Where nodes reach it (`host:port`).
    pub addrs: Vec<String>,
    /// The UDP port where it answers STUN at the host of each address (the
    /// latency probe); 0 when it does not.
    pub stun_port: u16,
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
        /// The live relays of the fleet (`host:port`), which share this
        /// relay's key and store: where to go when this one is gone. The
        /// others first, then (from a fleet relay that knows its own
        /// addresses) this one's, so the list is never empty in a fleet.
        /// Empty for a relay alone.
        relays: Vec<String>,
    },
    /// A refusal (admission, open, or a worker's local connect).
    Rejected(Rejection),
    /// Engineer → relay on the control stream.
    ListTargets,
    /// Relay → engineer: the workers it may open.
    Targets(Vec<Target>),
    /// Node → relay on the control stream: which relays does the fleet have?
    /// Answered by [`Message::Relays`]. Sent only to a relay that announced
    /// other relays in [`Message::Accepted`] (older single relays do not know it).
    ListRelays,
    /// Relay → node: the fleet's live relays, this one (`me`) among them.
    Relays {
        /// The answering relay's name.
        me: String,
        /// Every live relay, sorted by name.
        relays: Vec<RelayEntry>,
    },
    /// Engineer → relay, first frame of a tunnel stream.
    Open {
        /// The worker's name.
        target: String,
        /// The service name on it.
        service: String,
        /// The engineer would rather dial the worker's home relay itself: a
        /// relay of a fleet whose worker is on another relay answers
        /// [`Message::Redirect`] instead of carrying the tunnel over its link
        /// to that relay. False travels as the original message (tag 6),
        /// true under its own tag, which relays that predate it do not
        /// know: they reset the stream and the engineer asks again with false.
        redirect: bool,
    },
    /// Relay → engineer, the answer to an [`Message::Open`] with `redirect`:
    /// the worker is on this other relay of the fleet; open it there.
    Redirect {
        /// That relay's name.
        relay: String,
        /// Where nodes reach it (`host:port`).
        addrs: Vec<String>,
    },
    /// Node → relay, first frame of a stream: a one-time link to the relay's web view
    /// (`weft web`), bound to this node's identity. Relays that predate it reset the stream.
    WebLogin,
    /// Relay → node, the answer to [`Message::WebLogin`]: the link (it works once, for
    /// `expires_s` seconds), or `Rejected` when the relay serves no web view.
    WebLink {
        /// The whole URL, one-time token included.
        url: String,
        /// Seconds it stays valid.
        expires_s: u32,
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
    /// Engineer/operator → relay, first frame of a pool API stream: the relay
    /// answers [`Message::OpenOk`] and serves HTTP/1.1 on the stream
    /// (`weft_proto::pool`'s request and answer types) as the admitted identity.
    Api,
    /// Node → relay, first frame of the mesh control stream: join the mesh
    /// (the coordinator) as the admitted identity.
    MeshJoin {
        /// The peer-map version the node already holds (reconnect), if any.
        since: Option<Version>,
        /// The node's current endpoint candidates (at most
        /// [`crate::peermap::MAX_CANDIDATES`]).
        endpoints: Vec<Candidate>,
        /// The newest peer-map codec the node decodes
        /// ([`crate::control::PEER_CODEC`]; 0: the first, whose peer entries
        /// have no home relay). 0 travels as the original message (tag 9),
        /// anything else under its own tag, which relays that predate it do
        /// not know: they reset the stream and the node asks again with 0.
        peer_codec: u8,
    },
    /// Relay → relay of the same fleet (a connection admitted with the
    /// fleet's own key), first frame of a tunnel stream: open `service` on
    /// `target`, a worker whose session is on the receiving relay, for the
    /// engineer `from` (key, tags) that the sending relay admitted. The
    /// receiving relay decides the policy with those; answers as for
    /// [`Message::Open`].
    PeerOpen {
        /// The engineer's registered name.
        from: String,
        /// The engineer's key (the receiving relay checks its revocation).
        from_key: crate::key::PublicKey,
        /// The engineer's tags.
        from_tags: Vec<String>,
        /// The worker's name.
        target: String,
        /// The service name on it.
        service: String,
    },
    /// Relay → relay of the same fleet, first frame of a pool API stream:
    /// the engineer `from` (key, tags), admitted by the sending relay, calls
    /// the pool API of the receiving relay, which schedules the pool (holds
    /// the fleet's lease). Answered as [`Message::Api`]: `OpenOk`, then
    /// HTTP/1.1 served as that engineer, or a refusal.
    PeerApi {
        /// The engineer's registered name.
        from: String,
        /// The engineer's key.
        from_key: crate::key::PublicKey,
        /// The engineer's tags.
        from_tags: Vec<String>,
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
        /// The peer codec the relay writes this session in and reads the node's frames
        /// of (`control::PEER_CODEC`), from 2 on (0: not said; written only to nodes that
        /// asked for 2 or later, so older nodes read the message they know).
        peer_codec: u8,
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
const T_API: u8 = 11;
const T_MESH_JOIN: u8 = 9;
const T_MESH_ACCEPTED: u8 = 10;
const T_PEER_OPEN: u8 = 12;
const T_LIST_RELAYS: u8 = 13;
const T_RELAYS: u8 = 14;
const T_PEER_API: u8 = 15;
const T_MESH_JOIN_CODEC: u8 = 16;
const T_OPEN_REDIRECT: u8 = 17;
const T_REDIRECT: u8 = 18;
const T_WEB_LOGIN: u8 = 19;
const T_WEB_LINK: u8 = 20;
/// `MeshAccepted` naming the relay's peer codec (2 or later; only to nodes that asked).
const T_MESH_ACCEPTED_CODEC: u8 = 21;

impl Wire for Message {
    fn put(&self, w: &mut Writer) {
        match self {
            Message::Hello(h) => {
                w.u8(T_HELLO);
                w.u8(h.version);
                w.str(&h.name);
                w.option(h.join_secret.as_ref(), |w, s| w.bytes(s.expose()));
                w.strs(&h.services, MAX_LIST);
            }
            Message::Accepted { name, tags, relays } => {
                w.u8(T_ACCEPTED);
                w.str(name);
                w.strs(tags, MAX_LIST);
                w.strs(relays, MAX_LIST);
            }
            Message::Rejected(r) => {
                w.u8(T_REJECTED);
                w.u8(r.reason.code());
                w.str(&r.detail);
            }
            Message::ListTargets => w.u8(T_LIST),
            Message::Targets(ts) => {
                w.u8(T_TARGETS);
                w.list(ts, MAX_LIST, |w, t| {
                    w.str(&t.name);
                    w.strs(&t.services, MAX_LIST);
                });
            }
            Message::Open {
                target,
                service,
                redirect,
            } => {
                w.u8(if *redirect { T_OPEN_REDIRECT } else { T_OPEN });
                w.str(target);
                w.str(service);
            }
            Message::Redirect { relay, addrs } => {
                w.u8(T_REDIRECT);
                w.str(relay);
                w.strs(addrs, MAX_LIST);
            }
            Message::WebLogin => w.u8(T_WEB_LOGIN),
            Message::WebLink { url, expires_s } => {
                w.u8(T_WEB_LINK);
                w.str(url);
                w.u32(*expires_s);
            }
            Message::Incoming { from, service } => {
                w.u8(T_INCOMING);
                w.str(from);
                w.str(service);
            }
            Message::ListRelays => w.u8(T_LIST_RELAYS),
            Message::Relays { me, relays } => {
                w.u8(T_RELAYS);
                w.str(me);
                w.list(relays, MAX_LIST, |w, r| {
                    w.str(&r.name);
                    w.str(&r.region);
                    w.strs(&r.addrs, MAX_LIST);
                    w.u16(r.stun_port);
                });
            }
            Message::OpenOk => w.u8(T_OPEN_OK),
            Message::Api => w.u8(T_API),
            Message::PeerOpen {
                from,
                from_key,
                from_tags,
                target,
                service,
            } => {
                w.u8(T_PEER_OPEN);
                w.str(from);
                w.key(from_key);
                w.strs(from_tags, MAX_LIST);
                w.str(target);
                w.str(service);
            }
            Message::PeerApi {
                from,
                from_key,
                from_tags,
            } => {
                w.u8(T_PEER_API);
                w.str(from);
                w.key(from_key);
                w.strs(from_tags, MAX_LIST);
            }
            Message::MeshJoin {
                since,
                endpoints,
                peer_codec,
            } => {
                if *peer_codec == 0 {
                    w.u8(T_MESH_JOIN);
                } else {
                    w.u8(T_MESH_JOIN_CODEC);
                    w.u8(*peer_codec);
                }
                w.option(since.as_ref(), |w, v| v.encode(w));
                put_candidates(w, endpoints);
            }
            Message::MeshAccepted {
                stun,
                ipv4_pool,
                ipv6_prefix,
                peer_codec,
            } => {
                w.u8(if *peer_codec >= 2 {
                    T_MESH_ACCEPTED_CODEC
                } else {
                    T_MESH_ACCEPTED
                });
                w.option(stun.as_ref(), |w, a| w.addr(*a));
                w.bytes(&ipv4_pool.addr().octets());
                w.u8(ipv4_pool.prefix_len());
                w.bytes(&ipv6_prefix.addr().octets());
                w.u8(ipv6_prefix.prefix_len());
                if *peer_codec >= 2 {
                    w.u8(*peer_codec);
                }
            }
        }
    }

    fn get(r: &mut Reader<'_>) -> Result<Message, WireError> {
        let tag = r.u8()?;
        Ok(match tag {
            T_HELLO => Message::Hello(Hello {
                version: r.u8()?,
                name: r.str()?,
                join_secret: r.option(|r| r.arr::<32>().map(Secret::new))?,
                services: r.strs("services", MAX_LIST)?,
            }),
            T_ACCEPTED => Message::Accepted {
                name: r.str()?,
                tags: r.strs("tags", MAX_LIST)?,
                relays: r.strs("relays", MAX_LIST)?,
            },
            T_REJECTED => Message::Rejected(Rejection {
                reason: Reason::from_code(r.u8()?)?,
                detail: r.str()?,
            }),
            T_LIST => Message::ListTargets,
            T_TARGETS => Message::Targets(r.list("targets", MAX_LIST, 4, |r| {
                Ok(Target {
                    name: r.str()?,
                    services: r.strs("services", MAX_LIST)?,
                })
            })?),
            T_LIST_RELAYS => Message::ListRelays,
            T_RELAYS => Message::Relays {
                me: r.str()?,
                relays: r.list("relays", MAX_LIST, 8, |r| {
                    Ok(RelayEntry {
                        name: r.str()?,
                        region: r.str()?,
                        addrs: r.strs("addrs", MAX_LIST)?,
                        stun_port: r.u16()?,
                    })
                })?,
            },
            T_OPEN | T_OPEN_REDIRECT => Message::Open {
                target: r.str()?,
                service: r.str()?,
                redirect: tag == T_OPEN_REDIRECT,
            },
            T_REDIRECT => Message::Redirect {
                relay: r.str()?,
                addrs: r.strs("addrs", MAX_LIST)?,
            },
            T_WEB_LOGIN => Message::WebLogin,
            T_WEB_LINK => Message::WebLink {
                url: r.str()?,
                expires_s: r.u32()?,
            },
            T_INCOMING => Message::Incoming {
                from: r.str()?,
                service: r.str()?,
            },
            T_OPEN_OK => Message::OpenOk,
            T_API => Message::Api,
            T_PEER_OPEN => Message::PeerOpen {
                from: r.str()?,
                from_key: r.key()?,
                from_tags: r.strs("tags", MAX_LIST)?,
                target: r.str()?,
                service: r.str()?,
            },
            T_PEER_API => Message::PeerApi {
                from: r.str()?,
                from_key: r.key()?,
                from_tags: r.strs("tags", MAX_LIST)?,
            },
            T_MESH_JOIN => Message::MeshJoin {
                since: r.option(Version::decode)?,
                endpoints: get_candidates(r)?,
                peer_codec: 0,
            },
            T_MESH_JOIN_CODEC => {
                let peer_codec = r.u8()?;
                Message::MeshJoin {
                    since: r.option(Version::decode)?,
                    endpoints: get_candidates(r)?,
                    peer_codec,
                }
            }
            t @ (T_MESH_ACCEPTED | T_MESH_ACCEPTED_CODEC) => Message::MeshAccepted {
                stun: r.option(Reader::addr)?,
                ipv4_pool: get_net(r, "IPv4 prefix length", Ipv4Net::new)?,
                ipv6_prefix: get_net(r, "IPv6 prefix length", Ipv6Net::new)?,
                peer_codec: if t == T_MESH_ACCEPTED_CODEC {
                    match r.u8()? {
                        c @ 2.. => c,
                        value => {
                            return Err(WireError::BadValue {
                                what: "peer codec",
                                value,
                            })
                        }
                    }
                } else {
                    0
                },
            },
            t => return Err(WireError::UnknownTag(t)),
        })
    }

    const FORMAT: Format = FORMAT;
    const FRAME: FrameLimit = FRAME;
}

/// An address's octets and a prefix length, as `make` (`Ipv4Net::new` or
/// `Ipv6Net::new`) accepts them; `what` names a refused prefix length.
fn get_net<A: From<[u8; L]>, N, const L: usize>(
    r: &mut Reader<'_>,
    what: &'static str,
    make: impl FnOnce(A, u8) -> Result<N, ipnet::PrefixLenError>,
) -> Result<N, WireError> {
    let addr = A::from(r.arr::<L>()?);
    let value = r.u8()?;
    make(addr, value).map_err(|_| WireError::BadValue { what, value })
}

/// Frames a payload of at most [`MAX_FRAME`] bytes ([`FrameLimit::frame`]).
pub fn encode_frame(payload: &[u8]) -> Result<Vec<u8>, WireError> {
    FRAME.frame(payload)
}

/// Splits one [`FRAME`] off the front of `buf` ([`FrameLimit::split`]).
pub fn decode_frame(buf: &[u8]) -> Result<Option<(&[u8], usize)>, WireError> {
    FRAME.split(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::laws::{self, addr, candidate, probes, version};
    use crate::peermap::MAX_CANDIDATES;
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
            (name(), names(), names()).prop_map(|(name, tags, relays)| Message::Accepted {
                name,
                tags,
                relays
            }),
            (reason(), name())
                .prop_map(|(reason, detail)| Message::Rejected(Rejection { reason, detail })),
            Just(Message::ListTargets),
            Just(Message::ListRelays),
            (
                name(),
                prop::collection::vec(
                    (name(), name(), names(), any::<u16>()).prop_map(
                        |(name, region, addrs, stun_port)| RelayEntry {
                            name,
                            region,
                            addrs,
                            stun_port
                        }
                    ),
                    0..4
                )
            )
                .prop_map(|(me, relays)| Message::Relays { me, relays }),
            prop::collection::vec(
                (name(), names()).prop_map(|(name, services)| Target { name, services }),
                0..5
            )
            .prop_map(Message::Targets),
            (name(), name(), any::<bool>()).prop_map(|(target, service, redirect)| {
                Message::Open {
                    target,
                    service,
                    redirect,
                }
            }),
            (name(), names()).prop_map(|(relay, addrs)| Message::Redirect { relay, addrs }),
            Just(Message::WebLogin),
            (name(), any::<u32>()).prop_map(|(url, expires_s)| Message::WebLink { url, expires_s }),
            (name(), name()).prop_map(|(from, service)| Message::Incoming { from, service }),
            Just(Message::OpenOk),
            Just(Message::Api),
            (name(), crate::codec::laws::key(), names(), name(), name()).prop_map(
                |(from, from_key, from_tags, target, service)| Message::PeerOpen {
                    from,
                    from_key,
                    from_tags,
                    target,
                    service
                }
            ),
            (name(), crate::codec::laws::key(), names()).prop_map(|(from, from_key, from_tags)| {
                Message::PeerApi {
                    from,
                    from_key,
                    from_tags,
                }
            }),
            (
                prop::option::of(version()),
                prop::collection::vec(candidate(), 0..=MAX_CANDIDATES),
                any::<u8>()
            )
                .prop_map(|(since, endpoints, peer_codec)| Message::MeshJoin {
                    since,
                    endpoints,
                    peer_codec
                }),
            (
                prop::option::of(addr()),
                any::<[u8; 4]>(),
                0u8..=32,
                any::<[u8; 16]>(),
                0u8..=128,
                prop_oneof![Just(0u8), 2u8..]
            )
                .prop_map(|(stun, a4, l4, a6, l6, c)| Message::MeshAccepted {
                    stun,
                    ipv4_pool: Ipv4Net::new(a4.into(), l4).unwrap_or_default(),
                    ipv6_prefix: Ipv6Net::new(a6.into(), l6).unwrap_or_default(),
                    peer_codec: c,
                }),
        ]
    }

    proptest! {
        #[test]
        fn codec_laws(m in message(), p in probes()) {
            laws::check(&m, &p)?;
        }
    }

    #[test]
    fn mesh_accepted_names_its_codec_only_from_2_on() {
        let m = |c| Message::MeshAccepted {
            stun: None,
            ipv4_pool: Ipv4Net::default(),
            ipv6_prefix: Ipv6Net::default(),
            peer_codec: c,
        };
        // The form nodes before the field read: the old tag, no codec byte.
        assert_eq!(m(0).encode().len() + 1, m(2).encode().len());
        assert_eq!(m(0).encode()[0], T_MESH_ACCEPTED);
        assert_eq!(Message::decode(&m(2).encode()), Ok(m(2)));
        let mut bad = m(2).encode();
        let n = bad.len();
        bad[n - 1] = 1;
        assert!(Message::decode(&bad).is_err());
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
            peer_codec: 0,
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
            peer_codec: 0,
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
    fn mesh_join_of_the_first_codec_is_the_original_message() {
        let old = Message::MeshJoin {
            since: Some(Version { epoch: 7, seq: 9 }),
            endpoints: vec![],
            peer_codec: 0,
        }
        .encode();
        // Tag 9, since (flag, epoch, seq), no candidates: what relays before the codec field read.
        let mut want = vec![9u8, 1];
        want.extend(7u64.to_be_bytes());
        want.extend(9u64.to_be_bytes());
        want.extend([0, 0]);
        assert_eq!(old, want);
        let new = Message::MeshJoin {
            since: Some(Version { epoch: 7, seq: 9 }),
            endpoints: vec![],
            peer_codec: 1,
        }
        .encode();
        assert_eq!(&new[..2], &[16, 1]);
        assert_eq!(&new[2..], &want[1..]);
    }

    #[test]
    fn open_without_redirect_is_the_original_message() {
        let open = |redirect| {
            Message::Open {
                target: "gpu1".into(),
                service: "ssh".into(),
                redirect,
            }
            .encode()
        };
        let mut want = vec![6u8, 0, 4];
        want.extend(b"gpu1");
        want.extend([0, 3]);
        want.extend(b"ssh");
        assert_eq!(open(false), want);
        want[0] = 17;
        assert_eq!(open(true), want);
    }

    #[test]
    fn oversized_frame_rejected() {
        laws::check_frame_limit(FRAME);
    }
}
