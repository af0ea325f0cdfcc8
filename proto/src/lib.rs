//! Weft's protocol crate: every wire format and the pure types both ends of
//! a link share. No I/O, no async runtime, no database: the relay
//! (`tunnel-relay`), the mesh node (`mesh`) and the agent build on it.
//!
//! | module | what |
//! |---|---|
//! | [`codec`] | the one binary Reader/Writer (in a per-format [`codec::Format`]), the [`codec::Wire`] trait of both message codecs, [`codec::DecodeError`]; 4-byte length-prefixed frames with a per-protocol [`codec::FrameLimit`] |
//! | [`key`] | the one [`PublicKey`] (WireGuard peer key = disco key = Noise identity) |
//! | [`relay`] | relay protocol messages (admission, tunnels, mesh join), rejection [`relay::Reason`]s |
//! | [`control`] | the mesh control stream between a node and the coordinator |
//! | [`peermap`] | peer maps: snapshots, deltas, versions, candidates, [`peermap::PeerMap::apply`] |
//! | [`acl`] | the mesh ACL policy, its evaluation and per-node inbound filter rules |
//! | [`names`] | node name and tag rules |
//! | [`token`] | join tokens (`wft1_…`) |
//! | [`secret`] | 32-byte secrets that never print |
//! | [`stun`] | STUN binding requests and answers (RFC 5389), and a node's probe state |
//! | [`gpuspec`] | the `--gpu SPEC` grammar (dstack's), [`gpuspec::GpuSpec`] and the rule matching it to a worker's GPUs |
//! | [`pool`] | the pool feed (coordinator ↔ agent, JSON lines) and the pool API types (engineer → coordinator) |
//! | [`cluster`] | Ray clusters over the mesh: fixed ports, a member's `ray start` line, the head's report |
//! | [`usage`] | signed usage records: the worker's signature, the coordinator's countersignature and sequence, export manifests, [`usage::verify`] |
//! | [`close`] | QUIC connection-close and stream-reset codes |

pub mod acl;
pub mod close;
pub mod cluster;
pub mod codec;
pub mod control;
pub mod duration;
pub mod gpuspec;
pub mod key;
pub mod mux;
pub mod names;
pub mod peermap;
pub mod pool;
pub mod relay;
pub mod secret;
pub mod stun;
pub mod token;
pub mod usage;

pub use key::PublicKey;
