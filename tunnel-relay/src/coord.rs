//! The coordinator core: node registry, overlay addresses, ACL-filtered peer
//! maps and their versioned deltas. Pure: no sockets, no clock, no SQLite.
//!
//! # What it does
//! Nodes join with their X25519 key, a name, tags (from the join token) and
//! endpoint candidates. Each node receives a **peer map**: first a
//! [`Snapshot`] of exactly the peers the ACL lets it talk to
//! ([`AclPolicy::may_talk`]), then [`Delta`]s, each one [`PeerChange`]
//! (upsert, remove, or a new inbound filter). Every call that changes state
//! returns an [`Outbox`]: the `(recipient, update)` pairs the shell sends.
//!
//! # Cost model (why it scales)
//! Nodes are grouped by identical (sorted) tag set. The policy is evaluated
//! once per pair of tag sets (`talk` matrix) and once per tag set for its
//! inbound filter; a join touches only the tag sets its own may talk to and
//! their members, so one join costs O(T + peers it may talk to), where T is the
//! number of distinct tag sets (2 under the default policy). A policy change
//! costs O(T² · rules) plus one message per node pair whose visibility flipped.
//!
//! # Versions
//! Each recipient has its own sequence number, incremented per delta logged
//! for it; deltas are logged for offline nodes too (bounded by
//! [`CoordConfig::delta_log_len`], shared `Arc`s so a change sent to 5,000
//! peers is stored once). A [`Version`] also carries the coordinator's
//! `epoch` (chosen by the shell at start, e.g. the start time in ms), so after
//! a coordinator restart no old sequence number is mistaken for a new one. A
//! reconnecting node says "I have version V" ([`JoinRequest::since`] or an
//! `Ack`); [`Coordinator::sync`] answers with the missing deltas or, if they
//! left the log or the epoch differs, a fresh snapshot. A node applies deltas
//! only in order ([`PeerMap::apply`]); a gap means "ask again with my version".
//!
//! # Invariants (checked by the tests after random operation sequences)
//! - A node's peer map, built by applying its snapshot and deltas, equals
//!   [`Coordinator::snapshot_for`] at every moment: it holds exactly the
//!   nodes it may talk to, never itself.
//! - Names and keys are unique; overlay addresses are unique and stable.
//!
//! # Persistence (the shell's job)
//! [`NodeRecord`] is all that needs to survive a restart (serde, one row per
//! node); [`Coordinator::restore`] rebuilds the core from the records, every
//! node offline until it reconnects.

pub mod addr;
/// The control codec ([`weft_proto::control`]) and its tokio stream helpers.
pub mod wire {
    pub use crate::wire::{read_control, write_control, write_control_at, ControlIoError};
    pub use weft_proto::control::*;
}

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use weft_proto::PublicKey;

pub use addr::{AddrError, AddressPool};
pub use weft_proto::acl::{
    AclPolicy, FilterRules, InboundRule, PolicyError, PortRange, Proto, Rule, AGENT_API_PORT,
};
pub use weft_proto::names::{sanitize_name, unique_name, validate_name, validate_tag, NameError};
pub use weft_proto::peermap::{
    ApplyError, Candidate, CandidateKind, Delta, Peer, PeerChange, PeerMap, PeerMapUpdate,
    SelfInfo, Snapshot, Version, MAX_CANDIDATES, MAX_TAGS,
};

/// A node's identifier inside the coordinator (and its SQLite row id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub u64);

impl NodeId {
    /// The id every relay of a fleet gives `key`: its first 8 bytes, below
    /// 2^62 (a database BIGINT, and far above the sequential ids of a
    /// single relay's store). Keys are X25519 public keys, so these are as
    /// unlikely to collide as 62 random bits; a collision is refused as a
    /// conflict, never merged.
    pub fn of_key(key: &PublicKey) -> NodeId {
        let mut b = [0u8; 8];
        b.copy_from_slice(&key.0[..8]);
        NodeId((u64::from_be_bytes(b) >> 2) | (1 << 61))
    }
}

/// What survives a restart: one row per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Row id.
    pub id: NodeId,
    /// X25519 public key (WireGuard and Noise), base64 in serde.
    #[serde(with = "weft_proto::key::base64_serde")]
    pub key: PublicKey,
    /// Unique DNS label.
    pub name: String,
    /// Sorted, deduplicated tags.
    pub tags: Vec<String>,
    /// Overlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Last reported candidates.
    pub endpoints: Vec<Candidate>,
}

/// Updates to send: `(recipient, update)`, in order.
pub type Outbox = Vec<(NodeId, PeerMapUpdate)>;

/// A node's (re)join, after admission by the shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRequest {
    /// Its key.
    pub key: PublicKey,
    /// Wanted name (a valid label; see [`Coordinator::suggest_name`]).
    pub name: String,
    /// Its tags (from the token / registry).
    pub tags: Vec<String>,
    /// Its current candidates.
    pub endpoints: Vec<Candidate>,
    /// The peer-map version it already holds (reconnect), if any.
    pub since: Option<Version>,
    /// The relay it joins through (its home relay, announced in its peer
    /// entry); `None` where there is no name to give.
    pub home: Option<String>,
}

/// Coordinator settings (TOML section of the relay config).
///
/// ```toml
/// ipv4_pool = "100.64.0.0/10"          # default
/// ipv6_prefix = "fd7a:7765:6674::/48"  # default
/// delta_log_len = 64                   # default: deltas kept per node for resync
/// [[acl.rule]]                         # default: see AclPolicy::default
/// from = "engineer"
/// to = "worker"
/// proto = "tcp"
/// ports = [22, 7070]
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordConfig {
    /// Overlay IPv4 pool. Default `100.64.0.0/10`.
    pub ipv4_pool: Ipv4Net,
    /// Overlay IPv6 ULA prefix. Default `fd7a:7765:6674::/48`.
    pub ipv6_prefix: Ipv6Net,
    /// Deltas kept per node; older ones force a snapshot on resync. Default 64.
    pub delta_log_len: usize,
    /// The ACL. Default: [`AclPolicy::default`].
    pub acl: AclPolicy,
}

impl Default for CoordConfig {
    fn default() -> Self {
        CoordConfig {
            ipv4_pool: Ipv4Net::new(Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default(),
            ipv6_prefix: Ipv6Net::new(Ipv6Addr::new(0xfd7a, 0x7765, 0x6674, 0, 0, 0, 0, 0), 48)
                .unwrap_or_default(),
            delta_log_len: 64,
            acl: AclPolicy::default(),
        }
    }
}

impl CoordConfig {
    /// Parses the TOML text of a coordinator section; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<CoordConfig, CoordError> {
        let c: CoordConfig = toml::from_str(text).map_err(|e| {
            CoordError::Policy(PolicyError::Parse {
                origin: origin.to_string(),
                message: e.to_string(),
            })
        })?;
        c.validate(origin)?;
        Ok(c)
    }

    /// Checks the ACL and the pools (also for a config embedded elsewhere).
    pub fn validate(&self, origin: &str) -> Result<(), CoordError> {
        self.acl.validate(origin)?;
        AddressPool::new(self.ipv4_pool, self.ipv6_prefix)?;
        Ok(())
    }
}

/// Why a coordinator call was refused. Nothing changed when it is returned.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CoordError {
    /// The name is not a valid label.
    #[error("node name {name:?} {source}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        source: NameError,
    },
    /// A tag is not a valid label.
    #[error("tag {tag:?} {source}")]
    BadTag {
        /// The tag.
        tag: String,
        /// Why.
        source: NameError,
    },
    /// Too many tags.
    #[error("{0} tags; at most {MAX_TAGS} allowed")]
    TooManyTags(usize),
    /// Another key holds the name.
    #[error("name {0:?} is taken by another node")]
    NameTaken(String),
    /// Address allocation failed.
    #[error(transparent)]
    Addr(#[from] AddrError),
    /// The policy is invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// No such node.
    #[error("unknown node {0:?}")]
    UnknownNode(NodeId),
    /// Two restored records share a key, a name or an id.
    #[error("restored records conflict: {0}")]
    Conflict(String),
}

/// Node ids are small sequential integers: a multiplicative hash is enough
/// (cheaper than SipHash on the per-recipient path of every change).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0 ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<NodeId, V, BuildHasherDefault<IdHasher>>;

/// Per-node state.
#[derive(Debug)]
struct Node {
    rec: NodeRecord,
    /// Group tags the pool gave it (`pool-job-N`, a running gang); part of `rec.tags`.
    extra: Vec<String>,
    online: bool,
    /// The relay holding (or that last held) its session.
    home: Option<String>,
    tagset: usize,
    seq: u64,
    log: VecDeque<(u64, Arc<PeerChange>)>,
    /// The entry peers see, rebuilt by `refresh` after every change.
    entry: Arc<Peer>,
}

impl Node {
    fn new(rec: NodeRecord, online: bool, tagset: usize) -> Node {
        let mut n = Node {
            rec,
            extra: Vec::new(),
            online,
            home: None,
            tagset,
            seq: 0,
            log: VecDeque::new(),
            entry: Arc::new(Peer {
                key: PublicKey([0; 32]),
                name: String::new(),
                tags: Vec::new(),
                ipv4: Ipv4Addr::UNSPECIFIED,
                ipv6: Ipv6Addr::UNSPECIFIED,
                endpoints: Vec::new(),
                online: false,
                home: None,
            }),
        };
        n.refresh();
        n
    }

    fn peer(&self) -> Arc<Peer> {
        Arc::clone(&self.entry)
    }

    fn refresh(&mut self) {
        self.entry = Arc::new(Peer {
            key: self.rec.key,
            name: self.rec.name.clone(),
            tags: self.rec.tags.clone(),
            ipv4: self.rec.ipv4,
            ipv6: self.rec.ipv6,
            endpoints: self.rec.endpoints.clone(),
            online: self.online,
            home: self.home.clone(),
        });
    }
}

/// Nodes sharing one tag set, and what the policy says for that set.
#[derive(Debug)]
struct TagSet {
    tags: Vec<String>,
    members: BTreeSet<NodeId>,
    filter: FilterRules,
}

/// The coordinator core. See the module docs.
#[derive(Debug)]
pub struct Coordinator {
    epoch: u64,
    delta_log_len: usize,
    policy: AclPolicy,
    pool: AddressPool,
    nodes: IdMap<Node>,
    by_key: HashMap<PublicKey, NodeId>,
    by_name: HashMap<String, NodeId>,
    tagsets: Vec<TagSet>,
    tagset_ix: HashMap<Vec<String>, usize>,
    /// `talk[i][j]`: members of tag set i may talk to members of j (symmetric).
    talk: Vec<Vec<bool>>,
    next_id: u64,
    /// Ids derived from keys ([`NodeId::of_key`]) instead of sequential: set
    /// when several relays share one store, so every replica gives a key
    /// the same id without asking the others.
    key_ids: bool,
    /// Counts the changes a viewer could see (joins, online, tags, removals, policy):
    /// the web view's cue to rebuild.
    changes: u64,
}

fn normalize_tags(tags: &[String]) -> Result<Vec<String>, CoordError> {
    let mut v: Vec<String> = tags.to_vec();
    v.sort();
    v.dedup();
    if v.len() > MAX_TAGS {
        return Err(CoordError::TooManyTags(v.len()));
    }
    for t in &v {
        validate_tag(t).map_err(|source| CoordError::BadTag {
            tag: t.clone(),
            source,
        })?;
    }
    Ok(v)
}

/// Keeps usable candidates: no unspecified/multicast address, no port 0, no
/// IPv6 link-local (needs a scope), no duplicates; at most [`MAX_CANDIDATES`],
/// in the order given (nodes list their preferred ones first).
pub fn clean_candidates(c: &[Candidate]) -> Vec<Candidate> {
    let mut out: Vec<Candidate> = Vec::new();
    for cand in c {
        let ip = cand.addr.ip();
        let bad = cand.addr.port() == 0
            || ip.is_unspecified()
            || ip.is_multicast()
            || matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
            || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
        if !bad && !out.iter().any(|o| o.addr == cand.addr) {
            out.push(*cand);
            if out.len() == MAX_CANDIDATES {
                break;
            }
        }
    }
    out
}

impl Coordinator {
    /// An empty coordinator. `epoch` must differ between lives of the
    /// coordinator (the shell passes e.g. the start time in ms).
    pub fn new(config: CoordConfig, epoch: u64) -> Result<Coordinator, CoordError> {
        config.acl.validate("acl")?;
        Ok(Coordinator {
            epoch,
            delta_log_len: config.delta_log_len,
            policy: config.acl,
            pool: AddressPool::new(config.ipv4_pool, config.ipv6_prefix)?,
            nodes: IdMap::default(),
            by_key: HashMap::new(),
            by_name: HashMap::new(),
            tagsets: Vec::new(),
            tagset_ix: HashMap::new(),
            talk: Vec::new(),
            next_id: 1,
            key_ids: false,
            changes: 0,
        })
    }

    /// How many changes a viewer could see have been made (never decreases).
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// New nodes get [`NodeId::of_key`] ids (a fleet on one shared store).
    pub fn use_key_ids(&mut self) {
        self.key_ids = true;
    }

    /// Rebuilds the core from persisted records; every node starts offline.
    pub fn restore(
        config: CoordConfig,
        epoch: u64,
        records: impl IntoIterator<Item = NodeRecord>,
    ) -> Result<Coordinator, CoordError> {
        let mut c = Coordinator::new(config, epoch)?;
        for mut rec in records {
            // Group tags belong to the pool's running gangs, which it gives back itself.
            rec.tags.retain(|t| !weft_proto::acl::is_group_tag(t));
            rec.tags = normalize_tags(&rec.tags)?;
            validate_name(&rec.name).map_err(|source| CoordError::BadName {
                name: rec.name.clone(),
                source,
            })?;
            if c.nodes.contains_key(&rec.id)
                || c.by_key.contains_key(&rec.key)
                || c.by_name.contains_key(&rec.name)
            {
                return Err(CoordError::Conflict(format!(
                    "node {} ({}) duplicates an id, key or name",
                    rec.name, rec.key
                )));
            }
            c.pool.claim(rec.ipv4)?;
            rec.ipv6 = c.pool.v6_for(rec.ipv4);
            rec.endpoints = clean_candidates(&rec.endpoints);
            let ts = c.tagset_for(&rec.tags);
            c.tagsets[ts].members.insert(rec.id);
            c.next_id = c.next_id.max(rec.id.0 + 1);
            c.by_key.insert(rec.key, rec.id);
            c.by_name.insert(rec.name.clone(), rec.id);
            c.nodes.insert(rec.id, Node::new(rec, false, ts));
        }
        Ok(c)
    }

    /// This coordinator life's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The policy in force.
    pub fn policy(&self) -> &AclPolicy {
        &self.policy
    }

    /// The address pool (for the MagicDNS address and prefixes).
    pub fn pool(&self) -> &AddressPool {
        &self.pool
    }

    /// Number of registered nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node is registered.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// A node's persistent record (to store after any call that returned `Ok`).
    pub fn record(&self, id: NodeId) -> Option<&NodeRecord> {
        self.nodes.get(&id).map(|n| &n.rec)
    }

    /// All records.
    pub fn records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().map(|n| &n.rec)
    }

    /// The node with this key.
    pub fn id_of(&self, key: &PublicKey) -> Option<NodeId> {
        self.by_key.get(key).copied()
    }

    /// The node with this name.
    pub fn id_by_name(&self, name: &str) -> Option<NodeId> {
        self.by_name.get(name).copied()
    }

    /// Whether the node holds a control session.
    pub fn is_online(&self, id: NodeId) -> bool {
        self.nodes.get(&id).is_some_and(|n| n.online)
    }

    /// The peer-map version the node is at (what [`Coordinator::sync`]
    /// answers with nothing).
    pub fn version_of(&self, id: NodeId) -> Option<Version> {
        let n = self.nodes.get(&id)?;
        Some(Version {
            epoch: self.epoch,
            seq: n.seq,
        })
    }

    /// A free, valid name for `key` from a hostname or user input: the key's
    /// current name if it has one and `raw` sanitizes to it; otherwise the
    /// sanitized input (or `node-<key short>`) made unique with `-2`, `-3`, ...
    pub fn suggest_name(&self, raw: &str, key: &PublicKey) -> String {
        let base = sanitize_name(raw).unwrap_or_else(|| format!("node-{}", key.short()));
        let mine = self.by_key.get(key);
        unique_name(&base, |n| {
            self.by_name.get(n).is_some_and(|id| Some(id) != mine)
        })
    }

    /// Whether nodes `a` and `b` may talk (peer visibility).
    pub fn may_talk(&self, a: NodeId, b: NodeId) -> bool {
        match (self.nodes.get(&a), self.nodes.get(&b)) {
            (Some(x), Some(y)) => a != b && self.talk[x.tagset][y.tagset],
            _ => false,
        }
    }

    /// Whether a packet from `src` to `dst` may start a flow (e.g. to
    /// authorize a relay tunnel to a port).
    pub fn packet_allowed(&self, src: NodeId, dst: NodeId, proto: Proto, dst_port: u16) -> bool {
        match (self.nodes.get(&src), self.nodes.get(&dst)) {
            (Some(s), Some(d)) => {
                self.policy
                    .packet_allowed(&s.rec.tags, &d.rec.tags, proto, dst_port)
            }
            _ => false,
        }
    }

    /// The tag-set index for `tags` (normalized), creating it (and its row
    /// and column of the talk matrix, and its filter) on first use.
    fn tagset_for(&mut self, tags: &[String]) -> usize {
        if let Some(&i) = self.tagset_ix.get(tags) {
            return i;
        }
        let i = self.tagsets.len();
        self.tagsets.push(TagSet {
            tags: tags.to_vec(),
            members: BTreeSet::new(),
            filter: self.policy.inbound_filter(tags),
        });
        self.tagset_ix.insert(tags.to_vec(), i);
        let row: Vec<bool> = self
            .tagsets
            .iter()
            .map(|t| self.policy.may_talk(tags, &t.tags))
            .collect();
        for (j, r) in self.talk.iter_mut().enumerate() {
            r.push(row[j]);
        }
        self.talk.push(row);
        i
    }

    /// Logs `change` for `to` and, if online, queues it.
    fn push(&mut self, to: NodeId, change: &Arc<PeerChange>, out: &mut Outbox) {
        let epoch = self.epoch;
        let cap = self.delta_log_len;
        let Some(n) = self.nodes.get_mut(&to) else {
            return;
        };
        n.seq += 1;
        if cap > 0 {
            if n.log.len() == cap {
                n.log.pop_front();
            }
            n.log.push_back((n.seq, Arc::clone(change)));
        }
        if n.online {
            out.push((
                to,
                PeerMapUpdate::Delta(Delta {
                    version: Version { epoch, seq: n.seq },
                    change: Arc::clone(change),
                }),
            ));
        }
    }

    /// Nodes that may talk to a member of tag set `ts`, except `except`.
    fn visible_from(&self, ts: usize, except: NodeId) -> Vec<NodeId> {
        let mut v = Vec::new();
        for (j, set) in self.tagsets.iter().enumerate() {
            if self.talk[ts][j] {
                v.extend(set.members.iter().copied().filter(|m| *m != except));
            }
        }
        v
    }

    /// Sends `id`'s current peer entry to everyone who sees it.
    fn broadcast_upsert(&mut self, id: NodeId, out: &mut Outbox) {
        let Some(n) = self.nodes.get(&id) else {
            return;
        };
        let change = Arc::new(PeerChange::Upsert(n.peer()));
        for m in self.visible_from(n.tagset, id) {
            self.push(m, &change, out);
        }
    }

    /// Joins a new node or re-joins a known key (reconnect: marks it online,
    /// applies a changed name, tags or endpoints). Returns its id and the
    /// updates to send: to every peer that sees it, and to the node itself
    /// (a snapshot, or the deltas since `req.since`).
    pub fn join(&mut self, req: JoinRequest) -> Result<(NodeId, Outbox), CoordError> {
        self.changes += 1;
        validate_name(&req.name).map_err(|source| CoordError::BadName {
            name: req.name.clone(),
            source,
        })?;
        let mut tags = normalize_tags(&req.tags)?;
        // A rejoin keeps the group tags the pool gave it.
        if let Some(n) = self.by_key.get(&req.key).and_then(|id| self.nodes.get(id)) {
            if !n.extra.is_empty() {
                tags = normalize_tags(&[tags, n.extra.clone()].concat())?;
            }
        }
        if let Some(other) = self.by_name.get(&req.name) {
            if self.by_key.get(&req.key) != Some(other) {
                return Err(CoordError::NameTaken(req.name));
            }
        }
        let endpoints = clean_candidates(&req.endpoints);
        let mut out = Outbox::new();
        let mut since = req.since;
        let id = match self.by_key.get(&req.key).copied() {
            Some(id) => {
                if self.rejoin(id, req.name, tags, endpoints, req.home, &mut out) {
                    // Its own name or tags changed: deltas cannot say that.
                    since = None;
                }
                id
            }
            None => {
                let id = if self.key_ids {
                    let id = NodeId::of_key(&req.key);
                    if self.nodes.contains_key(&id) {
                        return Err(CoordError::Conflict(format!(
                            "key {} maps to the id of another node",
                            req.key
                        )));
                    }
                    id
                } else {
                    NodeId(self.next_id)
                };
                let ipv4 = self.pool.allocate(&req.key)?;
                if !self.key_ids {
                    self.next_id += 1;
                }
                let ts = self.tagset_for(&tags);
                self.tagsets[ts].members.insert(id);
                self.by_key.insert(req.key, id);
                self.by_name.insert(req.name.clone(), id);
                let rec = NodeRecord {
                    id,
                    key: req.key,
                    name: req.name,
                    tags,
                    ipv4,
                    ipv6: self.pool.v6_for(ipv4),
                    endpoints,
                };
                let mut n = Node::new(rec, true, ts);
                n.home = req.home;
                n.refresh();
                self.nodes.insert(id, n);
                self.broadcast_upsert(id, &mut out);
                id
            }
        };
        // Deltas to the node itself are in its log; `sync` picks them up.
        out.retain(|(to, _)| *to != id);
        for u in self.sync(id, since)? {
            out.push((id, u));
        }
        Ok((id, out))
    }

    fn rejoin(
        &mut self,
        id: NodeId,
        name: String,
        tags: Vec<String>,
        endpoints: Vec<Candidate>,
        home: Option<String>,
        out: &mut Outbox,
    ) -> bool {
        let Some(n) = self.nodes.get_mut(&id) else {
            return false;
        };
        let self_changed = n.rec.name != name || n.rec.tags != tags;
        let mut changed =
            !n.online || n.rec.endpoints != endpoints || n.rec.name != name || n.home != home;
        n.online = true;
        n.home = home;
        n.rec.endpoints = endpoints;
        if n.rec.name != name {
            let old = std::mem::replace(&mut n.rec.name, name.clone());
            self.by_name.remove(&old);
            self.by_name.insert(name, id);
        }
        n.refresh();
        let old_ts = n.tagset;
        if n.rec.tags != tags {
            self.retag(id, old_ts, tags, out);
            changed = false; // retag already sent the new entry to everyone who sees it
        }
        if changed {
            self.broadcast_upsert(id, out);
        }
        self_changed
    }

    /// Moves `id` from tag set `a` to the set of `tags`, telling both sides
    /// (the node's own deltas are logged; `join` sends it a snapshot).
    fn retag(&mut self, id: NodeId, a: usize, tags: Vec<String>, out: &mut Outbox) {
        let b = self.tagset_for(&tags);
        self.tagsets[a].members.remove(&id);
        self.tagsets[b].members.insert(id);
        let Some(n) = self.nodes.get_mut(&id) else {
            return;
        };
        n.rec.tags = tags;
        n.tagset = b;
        n.refresh();
        let me = n.peer();
        let my_key = me.key;
        let upsert_me = Arc::new(PeerChange::Upsert(me));
        let remove_me = Arc::new(PeerChange::Remove(my_key));
        for j in 0..self.tagsets.len() {
            let (was, is) = (self.talk[a][j], self.talk[b][j]);
            if !was && !is {
                continue;
            }
            let members: Vec<NodeId> = self.tagsets[j]
                .members
                .iter()
                .copied()
                .filter(|m| *m != id)
                .collect();
            for m in members {
                if is {
                    self.push(m, &upsert_me, out);
                } else {
                    self.push(m, &remove_me, out);
                }
                if was != is {
                    let Some(peer) = self.nodes.get(&m) else {
                        continue;
                    };
                    let change = Arc::new(if is {
                        PeerChange::Upsert(peer.peer())
                    } else {
                        PeerChange::Remove(peer.rec.key)
                    });
                    self.push(id, &change, out);
                }
            }
        }
        if self.tagsets[a].filter != self.tagsets[b].filter {
            let f = Arc::new(PeerChange::Filter(self.tagsets[b].filter.clone()));
            self.push(id, &f, out);
        }
    }

    /// Sets the group tags (`pool-job-N`) the pool gives a node while a gang runs on it: the
    /// node's tags become its own plus these, and every peer whose visibility or filter
    /// changes is told (the same path as a change of tags). No-op if unchanged.
    pub fn set_extra_tags(&mut self, id: NodeId, extra: &[String]) -> Result<Outbox, CoordError> {
        self.changes += 1;
        let n = self.nodes.get(&id).ok_or(CoordError::UnknownNode(id))?;
        let mut extra = extra.to_vec();
        extra.sort();
        extra.dedup();
        if n.extra == extra {
            return Ok(Outbox::new());
        }
        let base: Vec<String> = n
            .rec
            .tags
            .iter()
            .filter(|t| !n.extra.contains(t))
            .cloned()
            .collect();
        let tags = normalize_tags(&[base, extra.clone()].concat())?;
        let ts = n.tagset;
        let changed = n.rec.tags != tags;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.extra = extra;
        }
        let mut out = Outbox::new();
        if changed {
            self.retag(id, ts, tags, &mut out);
        }
        Ok(out)
    }

    /// New candidates from a node (endpoint report). No-op if unchanged.
    pub fn update_endpoints(
        &mut self,
        id: NodeId,
        endpoints: &[Candidate],
    ) -> Result<Outbox, CoordError> {
        let endpoints = clean_candidates(endpoints);
        let n = self.nodes.get_mut(&id).ok_or(CoordError::UnknownNode(id))?;
        let mut out = Outbox::new();
        if n.rec.endpoints != endpoints {
            n.rec.endpoints = endpoints;
            n.refresh();
            self.broadcast_upsert(id, &mut out);
        }
        Ok(out)
    }

    /// The node's control session came up or went down. No-op if unchanged.
    pub fn set_online(&mut self, id: NodeId, online: bool) -> Result<Outbox, CoordError> {
        self.changes += 1;
        let n = self.nodes.get_mut(&id).ok_or(CoordError::UnknownNode(id))?;
        let mut out = Outbox::new();
        if n.online != online {
            n.online = online;
            n.refresh();
            self.broadcast_upsert(id, &mut out);
        }
        Ok(out)
    }

    /// Applies a record another relay of the fleet wrote (its node holds a
    /// session there, `online`, or did): a new node is added with the
    /// record's id and addresses, a known one takes the record's name, tags
    /// (less group tags), endpoints and online state. Peers on this relay that see it get
    /// their deltas. A record whose id, key, name or address clashes with a
    /// different node here is refused as a conflict and changes nothing.
    /// `home` is the relay whose record it is (the node's home relay).
    pub fn apply_remote(
        &mut self,
        mut rec: NodeRecord,
        online: bool,
        home: Option<&str>,
    ) -> Result<Outbox, CoordError> {
        self.changes += 1;
        let home = home.map(str::to_owned);
        validate_name(&rec.name).map_err(|source| CoordError::BadName {
            name: rec.name.clone(),
            source,
        })?;
        // Group tags belong to the gangs of the pool that gave them (as in `restore`).
        rec.tags.retain(|t| !weft_proto::acl::is_group_tag(t));
        let mut tags = normalize_tags(&rec.tags)?;
        let endpoints = clean_candidates(&rec.endpoints);
        let mut out = Outbox::new();
        let clash = |what: &str| {
            CoordError::Conflict(format!(
                "another relay's record of {} ({}) has the {what} of a different node here",
                rec.name, rec.key
            ))
        };
        if let Some(&other) = self.by_name.get(&rec.name) {
            if other != rec.id {
                return Err(clash("name"));
            }
        }
        match self.by_key.get(&rec.key).copied() {
            Some(id) if id != rec.id => Err(clash("key")),
            Some(id) => {
                let Some(n) = self.nodes.get_mut(&id) else {
                    return Err(CoordError::UnknownNode(id));
                };
                if n.rec.ipv4 != rec.ipv4 {
                    return Err(clash("key (with another address)"));
                }
                // Group tags are this relay's pool's own.
                if !n.extra.is_empty() {
                    tags = normalize_tags(&[tags, n.extra.clone()].concat())?;
                }
                let changed = n.online != online
                    || n.rec.endpoints != endpoints
                    || n.rec.name != rec.name
                    || n.home != home;
                n.online = online;
                n.home = home;
                n.rec.endpoints = endpoints;
                if n.rec.name != rec.name {
                    let old = std::mem::replace(&mut n.rec.name, rec.name.clone());
                    self.by_name.remove(&old);
                    self.by_name.insert(rec.name.clone(), id);
                }
                n.refresh();
                let ts = n.tagset;
                if n.rec.tags != tags {
                    self.retag(id, ts, tags, &mut out);
                } else if changed {
                    self.broadcast_upsert(id, &mut out);
                }
                Ok(out)
            }
            None => {
                if self.nodes.contains_key(&rec.id) {
                    return Err(clash("id"));
                }
                self.pool.claim(rec.ipv4).map_err(|_| clash("address"))?;
                let id = rec.id;
                let ts = self.tagset_for(&tags);
                self.tagsets[ts].members.insert(id);
                self.by_key.insert(rec.key, id);
                self.by_name.insert(rec.name.clone(), id);
                let rec = NodeRecord {
                    tags,
                    ipv6: self.pool.v6_for(rec.ipv4),
                    endpoints,
                    ..rec
                };
                let mut n = Node::new(rec, online, ts);
                n.home = home;
                n.refresh();
                self.nodes.insert(id, n);
                self.broadcast_upsert(id, &mut out);
                Ok(out)
            }
        }
    }

    /// Removes a node (left, or revoked): every peer that saw it forgets it;
    /// its address and name become free. Returns its last record too.
    pub fn remove(&mut self, id: NodeId) -> Result<(NodeRecord, Outbox), CoordError> {
        self.changes += 1;
        let n = self.nodes.get(&id).ok_or(CoordError::UnknownNode(id))?;
        let ts = n.tagset;
        let change = Arc::new(PeerChange::Remove(n.rec.key));
        let mut out = Outbox::new();
        for m in self.visible_from(ts, id) {
            self.push(m, &change, &mut out);
        }
        let n = self.nodes.remove(&id).ok_or(CoordError::UnknownNode(id))?;
        self.tagsets[ts].members.remove(&id);
        self.by_key.remove(&n.rec.key);
        self.by_name.remove(&n.rec.name);
        self.pool.release(n.rec.ipv4);
        Ok((n.rec, out))
    }

    /// Replaces the ACL: sends upserts/removes for every node pair whose
    /// visibility flipped and the new filter to nodes whose filter changed.
    pub fn set_policy(&mut self, policy: AclPolicy) -> Result<Outbox, CoordError> {
        self.changes += 1;
        policy.validate("acl")?;
        let t = self.tagsets.len();
        let new_talk: Vec<Vec<bool>> = (0..t)
            .map(|i| {
                (0..t)
                    .map(|j| policy.may_talk(&self.tagsets[i].tags, &self.tagsets[j].tags))
                    .collect()
            })
            .collect();
        let new_filters: Vec<FilterRules> = self
            .tagsets
            .iter()
            .map(|s| policy.inbound_filter(&s.tags))
            .collect();
        self.policy = policy;
        let old_talk = std::mem::replace(&mut self.talk, new_talk);
        let mut out = Outbox::new();
        // Peer entries are built once per node and shared by every recipient.
        let mut upserts: HashMap<NodeId, Arc<PeerChange>> = HashMap::new();
        let mut removes: HashMap<NodeId, Arc<PeerChange>> = HashMap::new();
        let flipped: Vec<(usize, usize, bool)> = old_talk
            .iter()
            .zip(&self.talk)
            .enumerate()
            .flat_map(|(i, (old, new))| {
                old.iter()
                    .zip(new)
                    .enumerate()
                    .filter(|(_, (o, n))| o != n)
                    .map(move |(j, (_, n))| (i, j, *n))
            })
            .collect();
        for (i, j, now) in flipped {
            let recipients: Vec<NodeId> = self.tagsets[i].members.iter().copied().collect();
            let subjects: Vec<NodeId> = self.tagsets[j].members.iter().copied().collect();
            for &r in &recipients {
                for &s in &subjects {
                    if r == s {
                        continue;
                    }
                    let Some(sn) = self.nodes.get(&s) else {
                        continue;
                    };
                    let change = if now {
                        Arc::clone(
                            upserts
                                .entry(s)
                                .or_insert_with(|| Arc::new(PeerChange::Upsert(sn.peer()))),
                        )
                    } else {
                        Arc::clone(
                            removes
                                .entry(s)
                                .or_insert_with(|| Arc::new(PeerChange::Remove(sn.rec.key))),
                        )
                    };
                    self.push(r, &change, &mut out);
                }
            }
        }
        for (i, f) in new_filters.into_iter().enumerate() {
            if self.tagsets[i].filter != f {
                self.tagsets[i].filter = f.clone();
                let change = Arc::new(PeerChange::Filter(f));
                let members: Vec<NodeId> = self.tagsets[i].members.iter().copied().collect();
                for m in members {
                    self.push(m, &change, &mut out);
                }
            }
        }
        Ok(out)
    }

    /// The full peer map of `id` now.
    pub fn snapshot_for(&self, id: NodeId) -> Result<Snapshot, CoordError> {
        let n = self.nodes.get(&id).ok_or(CoordError::UnknownNode(id))?;
        let peers: Vec<Arc<Peer>> = self
            .visible_from(n.tagset, id)
            .into_iter()
            .filter_map(|m| self.nodes.get(&m).map(Node::peer))
            .collect();
        Ok(Snapshot {
            version: Version {
                epoch: self.epoch,
                seq: n.seq,
            },
            me: SelfInfo {
                name: n.rec.name.clone(),
                tags: n.rec.tags.clone(),
                ipv4: n.rec.ipv4,
                ipv6: n.rec.ipv6,
            },
            filter: self.tagsets[n.tagset].filter.clone(),
            peers,
        })
    }

    /// What a node holding `since` needs: nothing if current, the missing
    /// deltas if the log still has them, else a snapshot.
    pub fn sync(
        &self,
        id: NodeId,
        since: Option<Version>,
    ) -> Result<Vec<PeerMapUpdate>, CoordError> {
        let n = self.nodes.get(&id).ok_or(CoordError::UnknownNode(id))?;
        if let Some(v) = since {
            if v.epoch == self.epoch && v.seq <= n.seq {
                if v.seq == n.seq {
                    return Ok(Vec::new());
                }
                let first = n.log.front().map(|(s, _)| *s);
                if first.is_some_and(|f| f <= v.seq + 1) {
                    return Ok(n
                        .log
                        .iter()
                        .filter(|(s, _)| *s > v.seq)
                        .map(|(s, c)| {
                            PeerMapUpdate::Delta(Delta {
                                version: Version {
                                    epoch: self.epoch,
                                    seq: *s,
                                },
                                change: Arc::clone(c),
                            })
                        })
                        .collect());
                }
            }
        }
        Ok(vec![PeerMapUpdate::Snapshot(self.snapshot_for(id)?)])
    }

    /// Authorizes a call-me-maybe from `from` to the peer with `to`: the
    /// recipient's id if both exist and may talk.
    pub fn call_me_maybe_target(&self, from: NodeId, to: &PublicKey) -> Option<NodeId> {
        let t = self.id_of(to)?;
        self.may_talk(from, t).then_some(t)
    }
}

#[cfg(test)]
mod tests;
