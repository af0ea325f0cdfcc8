//! The relay's routing table as a pure core: who is connected, which workers
//! expose which services, how many tunnels each node holds, and the decision
//! for one `Open` (revocation, policy, service, stream limits). No sockets, no
//! clocks, no locks: the server shell keeps one [`Routes`] behind a mutex and
//! `C` is its connection handle (a `quinn::Connection` there, a plain value
//! in the tests below).
//!
//! It also routes relayed WireGuard datagrams (issue 5's relay path): a node
//! addresses a peer by key, the relay forwards to that key's mesh connection
//! (the one holding its coordinator session; else its newest connection) if
//! the mesh ACL lets the two talk ([`Routes::datagram_route`]).
//!
//! Invariants: a worker name maps to at most one connection (a newer
//! connection of the same name replaces the older, which the shell closes
//! once the tunnels it carries have ended: [`Routes::tunnels_on`]);
//! a key maps to its newest connection;
//! a node's stream count equals the grants not yet released; a decision that
//! refuses takes no stream slot.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::config::Policy;
use crate::coord::AclPolicy;
use crate::keys::PublicKey;
use crate::wire::{Reason, Rejection, Target};

/// A connected worker.
#[derive(Debug, Clone)]
pub struct WorkerRoute<C> {
    /// Connection id (unique per relay process).
    pub id: u64,
    /// The worker's key.
    pub key: PublicKey,
    /// Its connection.
    pub conn: C,
    /// Its tags.
    pub tags: Vec<String>,
    /// Services it exposes.
    pub services: Vec<String>,
}

/// The node asking to open a tunnel.
#[derive(Debug, Clone, Copy)]
pub struct Opener<'a> {
    /// Connection id.
    pub id: u64,
    /// Key.
    pub key: &'a PublicKey,
    /// Registered name.
    pub name: &'a str,
    /// Tags.
    pub tags: &'a [String],
}

/// A granted tunnel: the worker to open a stream to; one stream slot is held
/// for each of `keys` until [`Routes::release`].
#[derive(Debug, Clone)]
pub struct Grant<C> {
    /// The worker's connection.
    pub conn: C,
    /// Opener and worker keys (their slots).
    pub keys: (PublicKey, PublicKey),
    /// The worker's connection id (it carries the tunnel).
    pub worker_id: u64,
}

/// The routing table.
#[derive(Debug)]
pub struct Routes<C> {
    workers: HashMap<String, WorkerRoute<C>>,
    /// Every admitted connection: its key, the connection, the node's tags.
    nodes: HashMap<u64, (PublicKey, C, Vec<String>)>,
    /// Newest connection of each key, with its tags (datagram routing).
    by_key: HashMap<PublicKey, (u64, C, Vec<String>)>,
    /// The connection holding each key's mesh (coordinator) session, with
    /// the node's tags (it outlives a newer connection of the same key).
    mesh: HashMap<PublicKey, (u64, C, Vec<String>)>,
    streams: HashMap<PublicKey, u32>,
    /// Tunnels each worker connection carries (grants not yet released).
    tunnels: HashMap<u64, u32>,
    max_streams: u32,
    /// Connections made and ended (see [`Routes::changes`]).
    changes: u64,
    /// The pool's group tags per node (a running gang's members).
    groups: HashMap<PublicKey, Vec<String>>,
    /// Mesh nodes whose session is on another relay of the fleet: that
    /// relay's name and the node's tags ([`Routes::set_remote`]).
    remote: HashMap<PublicKey, (Arc<str>, Vec<String>)>,
    /// The same nodes by fast-path slot.
    remote_slots: HashMap<u64, PublicKey>,
}

/// Where the mesh nodes homed on other relays are: key → (relay, tags).
pub type RemoteNodes = HashMap<PublicKey, (Arc<str>, Vec<String>)>;

impl<C: Clone> Routes<C> {
    /// An empty table; each node may hold `max_streams` tunnels.
    pub fn new(max_streams: u32) -> Routes<C> {
        Routes {
            workers: HashMap::new(),
            nodes: HashMap::new(),
            by_key: HashMap::new(),
            mesh: HashMap::new(),
            streams: HashMap::new(),
            tunnels: HashMap::new(),
            groups: HashMap::new(),
            remote: HashMap::new(),
            remote_slots: HashMap::new(),
            max_streams,
            changes: 0,
        }
    }

    /// Replaces the table of mesh nodes homed on other relays (a fleet's
    /// store feed, applied by the shell).
    pub fn set_remote(&mut self, nodes: RemoteNodes) {
        self.remote_slots = nodes
            .keys()
            .map(|k| (crate::relay_path::slot(k), *k))
            .collect();
        self.remote = nodes;
    }

    /// The relay to hand a datagram from `src_tags` to `dst` to: `dst` is
    /// homed there and the mesh ACL lets the two talk. Only for keys not
    /// connected here (the caller asks [`Routes::datagram_route`] first).
    pub fn remote_route(
        &self,
        src_tags: &[String],
        dst: &PublicKey,
        acl: &AclPolicy,
    ) -> Option<Arc<str>> {
        let (relay, dst_tags) = self.remote.get(dst)?;
        acl.may_talk(src_tags, dst_tags).then(|| relay.clone())
    }

    /// The key of a node homed on another relay, by its fast-path slot.
    pub fn remote_slot(&self, slot: u64) -> Option<PublicKey> {
        self.remote_slots.get(&slot).copied()
    }

    /// The tags of a node homed on relay `relay` (`None`: not known there).
    pub fn remote_tags(&self, key: &PublicKey, relay: &str) -> Option<&[String]> {
        self.remote
            .get(key)
            .filter(|(r, _)| &**r == relay)
            .map(|(_, t)| t.as_slice())
    }

    /// Records an admitted connection with the node's tags. For a worker
    /// (`Some(name, route)`), returns the id and connection it replaces: new
    /// tunnels go to the new one, and the caller closes the old one once
    /// [`Routes::tunnels_on`] it is 0 (a worker moving from TCP back to QUIC
    /// keeps its open tunnels).
    pub fn connect(
        &mut self,
        id: u64,
        key: PublicKey,
        conn: C,
        tags: Vec<String>,
        worker: Option<(String, WorkerRoute<C>)>,
    ) -> Option<(u64, C)> {
        self.changes += 1;
        self.by_key.insert(key, (id, conn.clone(), tags.clone()));
        self.nodes.insert(id, (key, conn, tags));
        let (name, route) = worker?;
        self.workers
            .insert(name, route)
            .map(|old| (old.id, old.conn))
    }

    /// Connections made and ended so far (never decreases): the web view's cue that who
    /// is online may have changed.
    pub fn changes(&self) -> u64 {
        self.changes
    }

    /// Tunnels worker connection `id` carries now.
    pub fn tunnels_on(&self, id: u64) -> u32 {
        self.tunnels.get(&id).copied().unwrap_or(0)
    }

    /// Forgets a connection (and its worker name, if it still holds it).
    /// When it was its key's newest, the newest of that key's others (if
    /// any is still connected) takes its place for datagrams.
    pub fn disconnect(&mut self, id: u64, name: &str) {
        self.changes += 1;
        if let Some((key, _, _)) = self.nodes.remove(&id) {
            if self.by_key.get(&key).is_some_and(|(i, _, _)| *i == id) {
                self.by_key.remove(&key);
                // Ids grow with each admission: the largest left is the newest.
                if let Some((&i, (_, c, t))) = self
                    .nodes
                    .iter()
                    .filter(|(_, (k, _, _))| *k == key)
                    .max_by_key(|(i, _)| **i)
                {
                    self.by_key.insert(key, (i, c.clone(), t.clone()));
                }
            }
            if self.mesh.get(&key).is_some_and(|(i, _, _)| *i == id) {
                self.mesh.remove(&key);
            }
        }
        if self.workers.get(name).is_some_and(|w| w.id == id) {
            self.workers.remove(name);
        }
    }

    /// Marks connection `id` as the one holding its node's mesh session:
    /// relay-path datagrams for the node go there from now on (a worker may
    /// keep a tunnel connection and a mesh connection under one key).
    /// Ignored if `id` is not connected.
    pub fn set_mesh_conn(&mut self, id: u64, tags: Vec<String>) {
        if let Some((key, conn, _)) = self.nodes.get(&id) {
            self.mesh.insert(*key, (id, conn.clone(), tags));
        }
    }

    /// Where a datagram from `src_tags` to the node with key `dst` goes: its
    /// mesh connection (else its newest), if connected and the mesh ACL lets
    /// the two talk (either may start a flow to the other: replies flow both
    /// ways), exactly the pairs that see each other in their peer maps.
    /// Members of a running gang (the pool's group tags, [`Routes::set_groups`]) also reach
    /// each other.
    pub fn datagram_route(
        &self,
        src: &PublicKey,
        src_tags: &[String],
        dst: &PublicKey,
        acl: &AclPolicy,
    ) -> Option<C> {
        let (_, conn, dst_tags) = self.mesh.get(dst).or_else(|| self.by_key.get(dst))?;
        let grouped = || match (self.groups.get(src), self.groups.get(dst)) {
            (Some(a), Some(b)) => weft_proto::acl::pool_linked(a, b),
            _ => false,
        };
        (acl.may_talk(src_tags, dst_tags) || grouped()).then(|| conn.clone())
    }

    /// The pool's group tags of a node (empty: none), for [`Routes::datagram_route`].
    pub fn set_groups(&mut self, key: PublicKey, groups: Vec<String>) {
        if groups.is_empty() {
            self.groups.remove(&key);
        } else {
            self.groups.insert(key, groups);
        }
    }

    /// The names of the workers (nodes that expose services) connected here.
    pub fn worker_names(&self) -> impl Iterator<Item = &str> {
        self.workers.keys().map(String::as_str)
    }

    /// Connected nodes.
    pub fn connected(&self) -> usize {
        self.nodes.len()
    }

    /// The connections of nodes whose key is in `revoked` (to close now).
    pub fn revoked(&self, revoked: &HashSet<PublicKey>) -> Vec<C> {
        self.nodes
            .values()
            .filter(|(k, _, _)| revoked.contains(k))
            .map(|(_, c, _)| c.clone())
            .collect()
    }

    /// The workers (and their services) `opener` may open, sorted by name
    /// (internal services, `@…`, are the relay's own and never listed).
    pub fn targets_for(&self, opener: Opener<'_>, policy: &Policy) -> Vec<Target> {
        let mut out: Vec<Target> = self
            .workers
            .iter()
            .filter(|(_, w)| w.id != opener.id)
            .filter_map(|(name, w)| target_for(opener.tags, policy, name, &w.services, &w.tags))
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Decides one `Open`. `is_revoked` answers from the registry (unknown
    /// keys count as revoked). On success a stream slot is held for opener
    /// and worker. A revoked worker is reported as absent (the opener learns
    /// nothing about it); its connection comes back in `Err((_, Some(conn)))`
    /// so the shell can close it.
    pub fn decide(
        &mut self,
        opener: Opener<'_>,
        target: &str,
        service: &str,
        policy: &Policy,
        is_revoked: impl Fn(&PublicKey) -> bool,
    ) -> Result<Grant<C>, (Rejection, Option<C>)> {
        let refuse = |reason, detail: String| Err((Rejection::new(reason, detail), None));
        if is_revoked(opener.key) {
            return refuse(Reason::NodeRevoked, format!("node {:?}", opener.name));
        }
        if !policy.allow.iter().any(|r| opener.tags.contains(&r.from)) {
            return refuse(
                Reason::NotAllowed,
                format!("tags {:?} may not open tunnels", opener.tags),
            );
        }
        let Some(worker) = self.workers.get(target) else {
            return refuse(Reason::NoSuchNode, format!("{target:?}"));
        };
        if is_revoked(&worker.key) {
            return Err((
                Rejection::new(Reason::NoSuchNode, format!("{target:?}")),
                Some(worker.conn.clone()),
            ));
        }
        if !policy.allows(opener.tags, &worker.tags, service) {
            return refuse(
                Reason::NotAllowed,
                format!(
                    "tags {:?} may not open {service:?} on {target:?}",
                    opener.tags
                ),
            );
        }
        if is_internal(service) || !worker.services.iter().any(|s| s == service) {
            return refuse(
                Reason::NoSuchService,
                format!("{target:?} exposes {:?}", worker.services),
            );
        }
        let limit = self.max_streams;
        let used = |k: &PublicKey| self.streams.get(k).copied().unwrap_or(0);
        if used(opener.key) >= limit {
            return refuse(Reason::LimitExceeded, format!("{limit} tunnels per node"));
        }
        if used(&worker.key) >= limit {
            return refuse(
                Reason::LimitExceeded,
                format!("{target:?} has {limit} tunnels open"),
            );
        }
        let grant = Grant {
            conn: worker.conn.clone(),
            keys: (*opener.key, worker.key),
            worker_id: worker.id,
        };
        *self.streams.entry(grant.keys.0).or_insert(0) += 1;
        *self.streams.entry(grant.keys.1).or_insert(0) += 1;
        *self.tunnels.entry(grant.worker_id).or_insert(0) += 1;
        Ok(grant)
    }

    /// Releases the slots of a grant (its keys and its worker connection).
    pub fn release(&mut self, keys: (PublicKey, PublicKey), worker_id: u64) {
        for k in [keys.0, keys.1] {
            if let Some(n) = self.streams.get_mut(&k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.streams.remove(&k);
                }
            }
        }
        if let Some(n) = self.tunnels.get_mut(&worker_id) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.tunnels.remove(&worker_id);
            }
        }
    }

    /// The key of the worker connected as `name`.
    pub fn worker_key(&self, name: &str) -> Option<PublicKey> {
        self.workers.get(name).map(|w| w.key)
    }

    /// The connection of the worker connected as `name` (the pool's feed
    /// opened for the fleet's scheduler on another relay).
    pub fn worker_conn(&self, name: &str) -> Option<C> {
        self.workers.get(name).map(|w| w.conn.clone())
    }

    /// Tunnels a node holds now.
    pub fn streams_of(&self, key: &PublicKey) -> u32 {
        self.streams.get(key).copied().unwrap_or(0)
    }
}

/// A service only the relay itself opens (`@pool`, the agent's pool feed): `@` is
/// not allowed in a node's name, so no engineer can be its caller either.
/// Worker `name` (with its `services` and `tags`) as an opener with
/// `opener_tags` may see it: the services the policy lets it open (internal
/// ones never), or nothing.
pub fn target_for(
    opener_tags: &[String],
    policy: &Policy,
    name: &str,
    services: &[String],
    tags: &[String],
) -> Option<Target> {
    let services: Vec<String> = services
        .iter()
        .filter(|s| !is_internal(s) && policy.allows(opener_tags, tags, s))
        .cloned()
        .collect();
    (!services.is_empty()).then(|| Target {
        name: name.to_string(),
        services,
    })
}

pub fn is_internal(service: &str) -> bool {
    service.starts_with('@')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::StaticKey;
    use weft_proto::names::tags;

    /// A source key with no group tags.
    const NOBODY: PublicKey = PublicKey([0; 32]);

    struct Fixture {
        routes: Routes<&'static str>,
        eng: PublicKey,
        eng_tags: Vec<String>,
        w1: PublicKey,
    }

    fn fixture(max: u32) -> Fixture {
        let mut routes = Routes::new(max);
        let eng = StaticKey::generate().public();
        let w1 = StaticKey::generate().public();
        routes.connect(1, eng, "eng-conn", tags(&["engineer"]), None);
        let w = WorkerRoute {
            id: 2,
            key: w1,
            conn: "w1-conn",
            tags: tags(&["worker"]),
            services: tags(&["ssh", "agent"]),
        };
        assert!(routes
            .connect(2, w1, "w1-conn", tags(&["worker"]), Some(("w1".into(), w)))
            .is_none());
        Fixture {
            routes,
            eng,
            eng_tags: tags(&["engineer"]),
            w1,
        }
    }

    fn opener<'a>(f: &'a Fixture) -> Opener<'a> {
        Opener {
            id: 1,
            key: &f.eng,
            name: "eng",
            tags: &f.eng_tags,
        }
    }

    fn reason<C>(r: Result<Grant<C>, (Rejection, Option<C>)>) -> Option<Reason> {
        r.err().map(|(rej, _)| rej.reason)
    }

    #[test]
    fn a_gangs_members_reach_each_other_over_the_relay_path_while_grouped() {
        let mut f = fixture(8);
        let key = StaticKey::generate().public();
        let w = WorkerRoute {
            id: 3,
            key,
            conn: "w2-conn",
            tags: tags(&["worker"]),
            services: vec!["ssh".to_string()],
        };
        f.routes
            .connect(3, key, "w2-conn", tags(&["worker"]), Some(("w2".into(), w)));
        let acl = AclPolicy::default();
        let worker = tags(&["worker"]);
        assert_eq!(f.routes.datagram_route(&f.w1, &worker, &key, &acl), None);
        f.routes.set_groups(f.w1, tags(&["pool-job-3"]));
        assert_eq!(
            f.routes.datagram_route(&f.w1, &worker, &key, &acl),
            None,
            "one member only"
        );
        f.routes.set_groups(key, tags(&["pool-job-3"]));
        assert_eq!(
            f.routes.datagram_route(&f.w1, &worker, &key, &acl),
            Some("w2-conn")
        );
        f.routes.set_groups(key, vec![]);
        assert_eq!(
            f.routes.datagram_route(&f.w1, &worker, &key, &acl),
            None,
            "gang over"
        );
    }

    #[test]
    fn nodes_homed_on_other_relays_are_reached_through_their_relay_as_the_acl_allows() {
        let mut f = fixture(8);
        let acl = AclPolicy::default();
        let far = StaticKey::generate().public();
        let far_worker = StaticKey::generate().public();
        let relay: Arc<str> = Arc::from("relay-b");
        f.routes.set_remote(HashMap::from([
            (far, (relay.clone(), tags(&["engineer"]))),
            (far_worker, (relay.clone(), tags(&["worker"]))),
        ]));
        // Not connected here: no local route, the relay it is homed on instead.
        assert_eq!(
            f.routes
                .datagram_route(&f.w1, &tags(&["worker"]), &far, &acl),
            None
        );
        assert_eq!(
            f.routes.remote_route(&tags(&["worker"]), &far, &acl),
            Some(relay.clone())
        );
        // Default deny between workers holds across relays too.
        assert_eq!(
            f.routes.remote_route(&tags(&["worker"]), &far_worker, &acl),
            None
        );
        assert_eq!(
            f.routes.remote_slot(crate::relay_path::slot(&far)),
            Some(far)
        );
        assert_eq!(
            f.routes.remote_tags(&far, "relay-b"),
            Some(&tags(&["engineer"])[..])
        );
        assert_eq!(
            f.routes.remote_tags(&far, "relay-c"),
            None,
            "claimed by the wrong relay"
        );
        assert_eq!(f.routes.remote_tags(&f.w1, "relay-b"), None);
        // It went offline (or its relay died): nothing routes there any more.
        f.routes.set_remote(HashMap::new());
        assert_eq!(f.routes.remote_route(&tags(&["worker"]), &far, &acl), None);
        assert_eq!(f.routes.remote_slot(crate::relay_path::slot(&far)), None);
    }

    #[test]
    fn internal_services_are_never_listed_or_opened() {
        let mut f = fixture(8);
        let key = StaticKey::generate().public();
        let w = WorkerRoute {
            id: 3,
            key,
            conn: "w2-conn",
            tags: tags(&["worker"]),
            services: vec!["ssh".to_string(), "@pool".to_string()],
        };
        f.routes
            .connect(3, key, "w2-conn", tags(&["worker"]), Some(("w2".into(), w)));
        let policy = Policy::default();
        let listed = f.routes.targets_for(opener(&f), &policy);
        let w2 = listed.iter().find(|t| t.name == "w2").expect("w2 listed");
        assert_eq!(w2.services, ["ssh"]);
        let o = Opener {
            id: 1,
            key: &f.eng,
            name: "eng",
            tags: &f.eng_tags,
        };
        let r = f.routes.decide(o, "w2", "@pool", &policy, |_| false);
        assert_eq!(reason(r), Some(Reason::NoSuchService));
    }

    #[test]
    fn engineer_opens_worker_service_and_slots_are_counted() {
        let mut f = fixture(2);
        let p = Policy::default();
        let (eng, tags) = (f.eng, f.eng_tags.clone());
        let o = Opener {
            id: 1,
            key: &eng,
            name: "eng",
            tags: &tags,
        };
        let g = f.routes.decide(o, "w1", "ssh", &p, |_| false);
        let Ok(g) = g else { panic!("refused") };
        assert_eq!(g.conn, "w1-conn");
        assert_eq!(f.routes.streams_of(&f.eng), 1);
        assert_eq!(f.routes.streams_of(&f.w1), 1);
        assert!(f.routes.decide(o, "w1", "agent", &p, |_| false).is_ok());
        assert_eq!(
            reason(f.routes.decide(o, "w1", "ssh", &p, |_| false)),
            Some(Reason::LimitExceeded)
        );
        assert_eq!(f.routes.tunnels_on(2), 2);
        f.routes.release(g.keys, g.worker_id);
        assert_eq!(f.routes.tunnels_on(2), 1);
        assert_eq!(f.routes.streams_of(&f.eng), 1);
        assert!(f.routes.decide(o, "w1", "ssh", &p, |_| false).is_ok());
    }

    #[test]
    fn refusals_take_no_slot_and_say_why() {
        let f = fixture(8);
        let p = Policy::default();
        let (eng, w1, eng_tags) = (f.eng, f.w1, f.eng_tags);
        let mut r = f.routes;
        let o = Opener {
            id: 1,
            key: &eng,
            name: "eng",
            tags: &eng_tags,
        };
        assert_eq!(
            reason(r.decide(o, "nope", "ssh", &p, |_| false)),
            Some(Reason::NoSuchNode)
        );
        assert_eq!(
            reason(r.decide(o, "w1", "http", &p, |_| false)),
            Some(Reason::NoSuchService)
        );
        assert_eq!(
            reason(r.decide(o, "w1", "ssh", &p, |k| *k == eng)),
            Some(Reason::NodeRevoked)
        );
        // A revoked worker looks absent, and its connection comes back to close.
        let e = r.decide(o, "w1", "ssh", &p, |k| *k == w1).err();
        assert!(matches!(e, Some((ref rej, Some("w1-conn"))) if rej.reason == Reason::NoSuchNode));
        let guest = tags(&["guest"]);
        let g = Opener { tags: &guest, ..o };
        assert_eq!(
            reason(r.decide(g, "w1", "ssh", &p, |_| false)),
            Some(Reason::NotAllowed)
        );
        assert_eq!(r.streams_of(&eng), 0);
        assert_eq!(r.streams_of(&w1), 0);
    }

    #[test]
    fn worker_may_not_open_another_worker() {
        let mut f = fixture(8);
        let p = Policy::default();
        let w2 = StaticKey::generate().public();
        let wt = tags(&["worker"]);
        let o = Opener {
            id: 3,
            key: &w2,
            name: "w2",
            tags: &wt,
        };
        assert_eq!(
            reason(f.routes.decide(o, "w1", "ssh", &p, |_| false)),
            Some(Reason::NotAllowed)
        );
        assert!(f.routes.targets_for(o, &p).is_empty());
    }

    #[test]
    fn newer_connection_replaces_and_old_disconnect_keeps_new() {
        let mut f = fixture(8);
        let w = WorkerRoute {
            id: 9,
            key: f.w1,
            conn: "w1-new",
            tags: tags(&["worker"]),
            services: tags(&["ssh"]),
        };
        // The old connection carries a tunnel; new ones go to the new connection.
        let p = Policy::default();
        let (eng, eng_tags) = (f.eng, f.eng_tags.clone());
        let o = Opener {
            id: 1,
            key: &eng,
            name: "eng",
            tags: &eng_tags,
        };
        let Ok(g) = f.routes.decide(o, "w1", "ssh", &p, |_| false) else {
            panic!("refused")
        };
        let old = f
            .routes
            .connect(9, f.w1, "w1-new", tags(&["worker"]), Some(("w1".into(), w)));
        assert_eq!(old, Some((2, "w1-conn")));
        assert_eq!(
            f.routes.tunnels_on(2),
            1,
            "the old connection still carries its tunnel"
        );
        let Ok(g2) = f.routes.decide(o, "w1", "ssh", &p, |_| false) else {
            panic!("refused")
        };
        assert_eq!((g2.conn, g2.worker_id), ("w1-new", 9));
        f.routes.release(g.keys, g.worker_id);
        assert_eq!(f.routes.tunnels_on(2), 0, "drained: the shell may close it");
        f.routes.release(g2.keys, g2.worker_id);
        f.routes.disconnect(2, "w1"); // the old connection's own teardown
        let t = f.routes.targets_for(opener(&f), &Policy::default());
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].services, tags(&["ssh"]));
        f.routes.disconnect(9, "w1");
        assert!(f
            .routes
            .targets_for(opener(&f), &Policy::default())
            .is_empty());
        assert_eq!(f.routes.connected(), 1);
    }

    #[test]
    fn datagrams_follow_policy_both_ways_and_the_newest_connection() {
        let mut f = fixture(8);
        let p = AclPolicy::default();
        let (eng, w1) = (f.eng, f.w1);
        let worker = tags(&["worker"]);
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &w1, &p),
            Some("w1-conn")
        );
        // Replies: the worker may send to the engineer (it may not open tunnels).
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &worker, &eng, &p),
            Some("eng-conn")
        );
        // Worker to worker: nothing.
        let w2 = StaticKey::generate().public();
        f.routes.connect(5, w2, "w2-conn", worker.clone(), None);
        assert_eq!(f.routes.datagram_route(&NOBODY, &worker, &w2, &p), None);
        // A reconnect takes over; the old connection's teardown leaves it.
        f.routes.connect(6, w1, "w1-new", worker.clone(), None);
        f.routes.disconnect(2, "w1");
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &w1, &p),
            Some("w1-new")
        );
        f.routes.disconnect(6, "w1");
        assert_eq!(f.routes.datagram_route(&NOBODY, &f.eng_tags, &w1, &p), None);
    }

    #[test]
    fn the_newest_connection_ending_first_hands_datagrams_to_the_older_one() {
        let mut f = fixture(8);
        let p = AclPolicy::default();
        let w1 = f.w1;
        let worker = tags(&["worker"]);
        // A second connection of the same key (a worker moving back to QUIC keeps
        // its old one until its tunnels end), which ends first.
        f.routes.connect(7, w1, "w1-quic", worker.clone(), None);
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &w1, &p),
            Some("w1-quic")
        );
        f.routes.disconnect(7, "w1");
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &w1, &p),
            Some("w1-conn"),
            "the older connection is still up: datagrams go there"
        );
        f.routes.disconnect(2, "w1");
        assert_eq!(f.routes.datagram_route(&NOBODY, &f.eng_tags, &w1, &p), None);
    }

    #[test]
    fn datagrams_prefer_the_mesh_connection_of_a_key() {
        let mut f = fixture(8);
        let p = AclPolicy::default();
        let worker = tags(&["worker"]);
        // w1's tunnel connection is 2; its mesh session runs on 7, then a
        // newer tunnel connection 8 appears: datagrams stay on 7.
        f.routes.connect(7, f.w1, "w1-mesh", worker.clone(), None);
        f.routes.set_mesh_conn(7, worker.clone());
        f.routes
            .connect(8, f.w1, "w1-tunnel-2", worker.clone(), None);
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &f.w1, &p),
            Some("w1-mesh")
        );
        // The mesh connection goes: back to the newest.
        f.routes.disconnect(7, "w1");
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &f.w1, &p),
            Some("w1-tunnel-2")
        );
        // The mesh session moves to 8; a newer connection that comes and
        // goes does not take the mesh route along.
        f.routes.set_mesh_conn(8, worker.clone());
        f.routes
            .connect(9, f.w1, "w1-tunnel-3", worker.clone(), None);
        f.routes.disconnect(9, "w1");
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &f.w1, &p),
            Some("w1-tunnel-2")
        );
        // A custom ACL: ops may ping everyone; worker-worker still nothing.
        let acl = AclPolicy::parse(
            "[[rule]]\nfrom = \"ops\"\nto = \"*\"\nproto = \"icmp\"\n",
            "t",
        )
        .unwrap_or_default();
        assert_eq!(
            f.routes
                .datagram_route(&NOBODY, &tags(&["ops"]), &f.w1, &acl),
            Some("w1-tunnel-2")
        );
        assert_eq!(f.routes.datagram_route(&NOBODY, &worker, &f.w1, &acl), None);
        assert_eq!(
            f.routes.datagram_route(&NOBODY, &f.eng_tags, &f.w1, &acl),
            None
        );
    }

    #[test]
    fn revoked_lists_every_connection_of_the_key() {
        let f = fixture(8);
        let set: HashSet<PublicKey> = [f.w1].into_iter().collect();
        assert_eq!(f.routes.revoked(&set), vec!["w1-conn"]);
        assert!(f.routes.revoked(&HashSet::new()).is_empty());
    }
}
