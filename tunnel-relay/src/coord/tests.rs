//! Coordinator tests: behaviour by example, a model-based property test (the
//! peer map every node builds from its updates equals the coordinator's
//! snapshot, and holds exactly the nodes the ACL lets it talk to), and the
//! 10,000-node scale test.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use proptest::prelude::*;

use super::*;
use weft_proto::names::tags;

fn key(i: u32) -> PublicKey {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&i.to_be_bytes());
    k[31] = 0xaa;
    PublicKey(k)
}

fn cand(last: u8, port: u16) -> Candidate {
    Candidate {
        addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, last)), port),
        kind: CandidateKind::Reflexive,
    }
}

fn req(i: u32, name: &str, t: &[&str]) -> JoinRequest {
    JoinRequest {
        key: key(i),
        name: name.into(),
        tags: tags(t),
        endpoints: vec![cand(i as u8, 41641)],
        since: None,
        home: Some("relay-a".into()),
    }
}

fn coord() -> Coordinator {
    match Coordinator::new(CoordConfig::default(), 7) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

/// The usual small mesh: workers gpu1 (key 1) and gpu2 (key 2), engineer
/// alice (key 3), joined in that order.
fn gpu1_gpu2_alice() -> (Coordinator, [NodeId; 3]) {
    let mut c = coord();
    let (w1, _) = ok(c.join(req(1, "gpu1", &["worker"])));
    let (w2, _) = ok(c.join(req(2, "gpu2", &["worker"])));
    let (e, _) = ok(c.join(req(3, "alice", &["engineer"])));
    (c, [w1, w2, e])
}

fn ok<T, E: std::fmt::Display>(r: Result<T, E>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Recipients of deltas in an outbox, and the kinds of change.
fn deltas(out: &Outbox) -> Vec<(NodeId, PeerChange)> {
    out.iter()
        .filter_map(|(to, u)| match u {
            PeerMapUpdate::Delta(d) => Some((*to, (*d.change).clone())),
            PeerMapUpdate::Snapshot(_) => None,
        })
        .collect()
}

fn snapshot_to(out: &Outbox, id: NodeId) -> Option<&Snapshot> {
    out.iter().find_map(|(to, u)| match u {
        PeerMapUpdate::Snapshot(s) if *to == id => Some(s),
        _ => None,
    })
}

#[test]
fn join_reaches_exactly_the_allowed_peers() {
    let mut c = coord();
    let (w1, out) = ok(c.join(req(1, "gpu1", &["worker"])));
    assert_eq!(out.len(), 1);
    let s = snapshot_to(&out, w1).map(|s| s.peers.len());
    assert_eq!(s, Some(0));
    let (w2, out) = ok(c.join(req(2, "gpu2", &["worker"])));
    // Workers may not talk to workers: only w2's own (empty) snapshot.
    assert_eq!(out.len(), 1);
    assert_eq!(snapshot_to(&out, w2).map(|s| s.peers.len()), Some(0));
    let (e, out) = ok(c.join(req(3, "alice", &["engineer"])));
    let d = deltas(&out);
    assert_eq!(d.len(), 2);
    assert!(d.iter().all(|(to, ch)| (*to == w1 || *to == w2)
        && matches!(ch, PeerChange::Upsert(p) if p.key == key(3) && p.name == "alice" && p.online)));
    let snap = snapshot_to(&out, e).cloned();
    let Some(snap) = snap else {
        panic!("no snapshot")
    };
    assert_eq!(
        snap.peers
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .len(),
        2
    );
    assert_eq!(snap.me.name, "alice");
    assert!(
        snap.filter.rules.is_empty(),
        "engineers accept no new flows"
    );
    assert!(c.may_talk(e, w1) && c.may_talk(w1, e) && !c.may_talk(w1, w2));
    assert!(c.packet_allowed(e, w1, Proto::Tcp, 22));
    assert!(!c.packet_allowed(w1, e, Proto::Tcp, 22));
    // The worker's filter admits engineers on 22 and the agent port.
    let ws = ok(c.snapshot_for(w1));
    assert!(ws
        .filter
        .allows(&tags(&["engineer"]), Proto::Tcp, AGENT_API_PORT));
    assert!(!ws.filter.allows(&tags(&["worker"]), Proto::Tcp, 22));
}

#[test]
fn addresses_are_unique_in_pool_and_v6_matches() {
    let mut c = coord();
    let mut seen = BTreeSet::new();
    for i in 0..200 {
        let (id, _) = ok(c.join(req(i, &format!("n{i}"), &["worker"])));
        let Some(r) = c.record(id) else { panic!() };
        assert!(c.pool().v4_net().contains(&r.ipv4));
        assert!(c.pool().v6_net().contains(&r.ipv6));
        assert_eq!(c.pool().v6_for(r.ipv4), r.ipv6);
        assert!(seen.insert(r.ipv4));
    }
}

#[test]
fn bad_input_changes_nothing() {
    let mut c = coord();
    ok(c.join(req(1, "gpu1", &["worker"])));
    assert!(matches!(
        c.join(req(2, "gpu1", &["worker"])),
        Err(CoordError::NameTaken(_))
    ));
    assert!(matches!(
        c.join(req(2, "GPU", &["worker"])),
        Err(CoordError::BadName { .. })
    ));
    assert!(matches!(
        c.join(req(2, "ok", &["Bad"])),
        Err(CoordError::BadTag { .. })
    ));
    assert_eq!(c.len(), 1);
    assert!(matches!(
        c.set_online(NodeId(99), true),
        Err(CoordError::UnknownNode(_))
    ));
    let bad = AclPolicy {
        rules: vec![Rule {
            from: vec![],
            to: tags(&["x"]),
            proto: Proto::Any,
            ports: vec![],
        }],
    };
    assert!(matches!(c.set_policy(bad), Err(CoordError::Policy(_))));
    assert_eq!(c.policy(), &AclPolicy::default());
}

#[test]
fn suggest_name_sanitizes_and_dedups() {
    let mut c = coord();
    ok(c.join(req(1, "gpu-box", &["worker"])));
    assert_eq!(c.suggest_name("GPU_Box.lab", &key(2)), "gpu-box-2");
    assert_eq!(
        c.suggest_name("GPU_Box.lab", &key(1)),
        "gpu-box",
        "own name is free"
    );
    assert_eq!(
        c.suggest_name("...", &key(3)),
        format!("node-{}", key(3).short())
    );
}

#[test]
fn endpoint_online_and_remove_produce_deltas_for_viewers_only() {
    let (mut c, [w, w2, e]) = gpu1_gpu2_alice();
    let out = ok(c.update_endpoints(w, &[cand(9, 1000), cand(9, 1000), cand(0, 0)]));
    let d = deltas(&out);
    assert_eq!(d.len(), 1);
    assert!(
        matches!(&d[0], (to, PeerChange::Upsert(p)) if *to == e && p.endpoints == vec![cand(9, 1000)])
    );
    assert!(
        ok(c.update_endpoints(w, &[cand(9, 1000)])).is_empty(),
        "unchanged: no-op"
    );
    // The engineer goes offline: workers learn it; deltas to it are logged, not sent.
    let out = ok(c.set_online(e, false));
    assert_eq!(deltas(&out).len(), 2);
    let out = ok(c.update_endpoints(w, &[cand(8, 1000)]));
    assert!(out.is_empty(), "offline recipients get nothing now");
    let (rec, out) = ok(c.remove(w2));
    assert_eq!(rec.name, "gpu2");
    assert!(out.is_empty());
    assert_eq!(c.id_by_name("gpu2"), None);
    // Reconnect with the version held before going offline: exactly the missed deltas.
    let before = Version { epoch: 7, seq: 1 };
    let mut r = req(3, "alice", &["engineer"]);
    r.since = Some(before);
    let (e2, out) = ok(c.join(r));
    assert_eq!(e2, e);
    let mine: Vec<_> = out.iter().filter(|(to, _)| *to == e).collect();
    assert_eq!(mine.len(), 2, "{mine:?}");
    assert!(
        matches!(&mine[1].1, PeerMapUpdate::Delta(d) if *d.change == PeerChange::Remove(key(2)))
    );
    // Workers saw alice come back.
    assert_eq!(out.iter().filter(|(to, _)| *to == w).count(), 1);
}

#[test]
fn sync_answers_nothing_deltas_or_snapshot() {
    let cfg = CoordConfig {
        delta_log_len: 3,
        ..CoordConfig::default()
    };
    let mut c = ok(Coordinator::new(cfg, 5));
    let (e, _) = ok(c.join(req(0, "alice", &["engineer"])));
    for i in 1..=5 {
        ok(c.join(req(i, &format!("w{i}"), &["worker"])));
    }
    let cur = Version { epoch: 5, seq: 5 };
    assert!(ok(c.sync(e, Some(cur))).is_empty());
    let d = ok(c.sync(e, Some(Version { epoch: 5, seq: 2 })));
    assert_eq!(d.len(), 3);
    assert!(d.iter().all(|u| matches!(u, PeerMapUpdate::Delta(_))));
    for since in [
        Version { epoch: 5, seq: 1 },  // left the log
        Version { epoch: 4, seq: 5 },  // another life
        Version { epoch: 5, seq: 99 }, // from the future
    ] {
        let u = ok(c.sync(e, Some(since)));
        assert!(
            matches!(&u[..], [PeerMapUpdate::Snapshot(s)] if s.version == cur),
            "{since:?}"
        );
    }
}

#[test]
fn policy_change_flips_visibility_and_filters() {
    let (mut c, [w1, w2, e]) = gpu1_gpu2_alice();
    let mut p = AclPolicy::default();
    p.rules.push(Rule {
        from: tags(&["worker"]),
        to: tags(&["worker"]),
        proto: Proto::Udp,
        ports: vec![PortRange { lo: 5000, hi: 5100 }],
    });
    let out = ok(c.set_policy(p));
    let d = deltas(&out);
    // w1 learns w2, w2 learns w1, both get a new filter; alice: nothing.
    assert!(d
        .iter()
        .any(|(to, ch)| *to == w1 && matches!(ch, PeerChange::Upsert(p) if p.key == key(2))));
    assert!(d
        .iter()
        .any(|(to, ch)| *to == w2 && matches!(ch, PeerChange::Upsert(p) if p.key == key(1))));
    assert_eq!(
        d.iter()
            .filter(|(_, ch)| matches!(ch, PeerChange::Filter(_)))
            .count(),
        2
    );
    assert!(d.iter().all(|(to, _)| *to != e));
    assert!(c.may_talk(w1, w2));
    // And back: removes.
    let out = ok(c.set_policy(AclPolicy::default()));
    let d = deltas(&out);
    assert!(d.contains(&(w1, PeerChange::Remove(key(2)))));
    assert!(d.contains(&(w2, PeerChange::Remove(key(1)))));
    // No rules at all: everyone forgets everyone.
    let out = ok(c.set_policy(AclPolicy { rules: vec![] }));
    assert_eq!(
        deltas(&out)
            .iter()
            .filter(|(_, ch)| matches!(ch, PeerChange::Remove(_)))
            .count(),
        4
    );
}

#[test]
fn retag_on_rejoin_moves_visibility_and_resends_snapshot() {
    let (mut c, [w, x, e]) = gpu1_gpu2_alice();
    // gpu2 becomes an engineer: alice forgets it, gpu1 still sees it (new tags).
    let mut r = req(2, "gpu2", &["engineer"]);
    r.since = Some(Version { epoch: 7, seq: 1 });
    let (x2, out) = ok(c.join(r));
    assert_eq!(x, x2);
    let d = deltas(&out);
    assert!(d.contains(&(e, PeerChange::Remove(key(2)))));
    assert!(d
        .iter()
        .any(|(to, ch)| *to == w
            && matches!(ch, PeerChange::Upsert(p) if p.tags == tags(&["engineer"]))));
    let s = snapshot_to(&out, x).cloned();
    let Some(s) = s else {
        panic!("retagged node needs a snapshot")
    };
    assert_eq!(s.me.tags, tags(&["engineer"]));
    assert_eq!(s.peers.len(), 1);
}

#[test]
fn a_group_tag_lets_two_workers_see_each_other_while_it_lasts() {
    let (mut c, [w1, w2, e]) = gpu1_gpu2_alice();
    assert!(
        !c.may_talk(w1, w2),
        "workers do not see each other by default"
    );
    let g = tags(&["pool-job-5"]);
    let out = ok(c.set_extra_tags(w1, &g));
    // Only one member so far: nobody new sees anybody; alice sees gpu1's new tags.
    assert!(!c.may_talk(w1, w2));
    assert!(deltas(&out)
        .iter()
        .any(|(to, ch)| *to == e && matches!(ch, PeerChange::Upsert(p) if p.tags.contains(&g[0]))));
    let out = ok(c.set_extra_tags(w2, &g));
    assert!(c.may_talk(w1, w2));
    assert!(c.packet_allowed(w1, w2, Proto::Tcp, 29500));
    let d = deltas(&out);
    assert!(d
        .iter()
        .any(|(to, ch)| *to == w1 && matches!(ch, PeerChange::Upsert(p) if p.key == key(2))));
    assert!(d
        .iter()
        .any(|(to, ch)| *to == w2 && matches!(ch, PeerChange::Upsert(p) if p.key == key(1))));
    assert!(d
        .iter()
        .any(|(to, ch)| *to == w2 && matches!(ch, PeerChange::Filter(_))));
    // A reconnect keeps the group; the same set again changes nothing.
    let (_, _) = ok(c.join(req(2, "gpu2", &["worker"])));
    assert!(c.may_talk(w1, w2));
    assert!(ok(c.set_extra_tags(w2, &g)).is_empty());
    // The gang ends: they forget each other; the base tags stay.
    let out = ok(c.set_extra_tags(w2, &[]));
    assert!(!c.may_talk(w1, w2));
    assert!(deltas(&out).contains(&(w1, PeerChange::Remove(key(2)))));
    assert_eq!(
        c.record(w2).map(|r| r.tags.clone()),
        Some(tags(&["worker"]))
    );
    // A restored record drops group tags (the pool gives them back itself).
    let rec = c.record(w1).cloned().expect("w1");
    assert!(rec.tags.contains(&g[0]));
    let r = ok(Coordinator::restore(CoordConfig::default(), 2, vec![rec]));
    assert_eq!(
        r.records().next().map(|r| r.tags.clone()),
        Some(tags(&["worker"]))
    );
}

#[test]
fn restore_keeps_addresses_and_forces_snapshots() {
    let mut c = coord();
    for i in 0..20 {
        ok(c.join(req(
            i,
            &format!("n{i}"),
            if i % 2 == 0 {
                &["worker"]
            } else {
                &["engineer"]
            },
        )));
    }
    let recs: Vec<NodeRecord> = c.records().cloned().collect();
    let json = serde_json::to_string(&recs).unwrap_or_default();
    let back: Vec<NodeRecord> = ok(serde_json::from_str(&json));
    assert_eq!(back, recs);
    let mut c2 = ok(Coordinator::restore(CoordConfig::default(), 8, back));
    assert_eq!(c2.len(), 20);
    for r in &recs {
        assert_eq!(c2.record(r.id), Some(r));
        assert!(!c2.is_online(r.id));
    }
    let mut r = req(1, "n1", &["engineer"]);
    r.since = Some(Version { epoch: 7, seq: 3 });
    let (id, out) = ok(c2.join(r));
    let s = snapshot_to(&out, id).map(|s| s.peers.len());
    assert_eq!(s, Some(10));
    // Nobody else is online: nothing else to send.
    assert_eq!(out.len(), 1);
    // A new node still gets a fresh address.
    let (n, _) = ok(c2.join(req(100, "new", &["worker"])));
    let a = c2.record(n).map(|r| r.ipv4);
    assert!(recs.iter().all(|r| Some(r.ipv4) != a));
    // Duplicates are refused.
    let mut dup = recs.clone();
    dup.push(recs[0].clone());
    assert!(matches!(
        Coordinator::restore(CoordConfig::default(), 9, dup),
        Err(CoordError::Conflict(_))
    ));
}

#[test]
fn config_parses_with_defaults_and_refuses_unknown_fields() {
    let c = ok(CoordConfig::parse(
        "ipv4_pool = \"10.77.0.0/16\"\n[[acl.rule]]\nfrom = \"a\"\nto = \"b\"\nproto = \"udp\"\nports = [\"5000-5010\"]\n",
        "relay.toml",
    ));
    assert_eq!(c.ipv4_pool.to_string(), "10.77.0.0/16");
    assert_eq!(c.ipv6_prefix, CoordConfig::default().ipv6_prefix);
    assert_eq!(c.delta_log_len, 64);
    assert_eq!(c.acl.rules.len(), 1);
    assert_eq!(ok(CoordConfig::parse("", "x")), CoordConfig::default());
    for (text, want) in [
        ("ipv4_pol = \"10.0.0.0/8\"", "unknown field"),
        ("ipv4_pool = \"10.0.0.0/30\"", "too small"),
        ("ipv6_prefix = \"fd00::/120\"", "too long"),
        ("ipv4_pool = \"banana\"", "relay.toml"),
        ("[[acl.rule]]\nfrom = \"A\"\nto = \"b\"", "rule 1"),
    ] {
        match CoordConfig::parse(text, "relay.toml") {
            Ok(c) => panic!("{text:?} parsed: {c:?}"),
            Err(e) => assert!(e.to_string().contains(want), "{text:?}: {e}"),
        }
    }
}

#[test]
fn call_me_maybe_only_between_peers() {
    let (c, [w1, _, e]) = gpu1_gpu2_alice();
    assert_eq!(c.call_me_maybe_target(e, &key(1)), Some(w1));
    assert_eq!(c.call_me_maybe_target(w1, &key(3)), Some(e));
    assert_eq!(c.call_me_maybe_target(w1, &key(2)), None);
    assert_eq!(c.call_me_maybe_target(w1, &key(77)), None);
}

// ---------------------------------------------------------------------------
// Model-based property test.

#[derive(Debug, Clone)]
enum Op {
    Join {
        k: u32,
        name: u8,
        tags: u8,
        ep: u8,
        resume: bool,
    },
    Endpoints {
        k: u32,
        ep: u8,
    },
    Online {
        k: u32,
        on: bool,
    },
    Remove {
        k: u32,
    },
    Policy(u8),
}

const TAGSETS: [&[&str]; 5] = [
    &["worker"],
    &["engineer"],
    &["engineer", "worker"],
    &["ops"],
    &[],
];

fn policy(i: u8) -> AclPolicy {
    let mut p = AclPolicy::default();
    match i % 4 {
        0 => {}
        1 => p.rules.push(Rule {
            from: tags(&["worker"]),
            to: tags(&["worker"]),
            proto: Proto::Any,
            ports: vec![],
        }),
        2 => p.rules.push(Rule {
            from: tags(&["*"]),
            to: tags(&["ops"]),
            proto: Proto::Icmp,
            ports: vec![],
        }),
        _ => p.rules.clear(),
    }
    p
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..10, 0u8..12, 0u8..5, 0u8..3, any::<bool>())
            .prop_map(|(k, name, tags, ep, resume)| Op::Join { k, name, tags, ep, resume }),
        2 => (0u32..10, 0u8..3).prop_map(|(k, ep)| Op::Endpoints { k, ep }),
        2 => (0u32..10, any::<bool>()).prop_map(|(k, on)| Op::Online { k, on }),
        1 => (0u32..10).prop_map(|k| Op::Remove { k }),
        1 => (0u8..4).prop_map(Op::Policy),
    ]
}

/// The nodes' side: one peer map per node, fed only while online.
struct Sim {
    c: Coordinator,
    maps: HashMap<NodeId, PeerMap>,
}

impl Sim {
    fn deliver(&mut self, out: Outbox) -> Result<(), TestCaseError> {
        for (to, u) in out {
            prop_assert!(self.c.is_online(to), "update to offline node {:?}", to);
            let m = self.maps.entry(to).or_default();
            m.apply(&u)
                .map_err(|e| TestCaseError::fail(format!("{to:?}: {e}")))?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let ids: Vec<NodeId> = self.c.records().map(|r| r.id).collect();
        for &id in &ids {
            let snap = self
                .c
                .snapshot_for(id)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            // Exactly the nodes the policy lets it talk to (brute force).
            let Some(me) = self.c.record(id) else {
                continue;
            };
            let want: BTreeSet<PublicKey> = self
                .c
                .records()
                .filter(|r| r.id != id && self.c.policy().may_talk(&me.tags, &r.tags))
                .map(|r| r.key)
                .collect();
            let got: BTreeSet<PublicKey> = snap.peers.iter().map(|p| p.key).collect();
            prop_assert_eq!(&got, &want);
            prop_assert_eq!(&snap.filter, &self.c.policy().inbound_filter(&me.tags));
            if self.c.is_online(id) {
                let mut expect = PeerMap::default();
                expect
                    .apply(&PeerMapUpdate::Snapshot(snap))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(self.maps.get(&id), Some(&expect), "node {:?}", id);
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn peer_maps_follow_the_coordinator(ops in prop::collection::vec(op(), 1..60), log in 0usize..6) {
        let cfg = CoordConfig { delta_log_len: log, ..CoordConfig::default() };
        let mut sim = Sim { c: ok(Coordinator::new(cfg, 1)), maps: HashMap::new() };
        let eps = [vec![], vec![cand(1, 1)], vec![cand(2, 2), cand(3, 3)]];
        for op in ops {
            match op {
                Op::Join { k, name, tags: t, ep, resume } => {
                    let id = sim.c.id_of(&key(k));
                    let since = if resume { id.and_then(|id| sim.maps.get(&id)).and_then(|m| m.version) } else { None };
                    let r = JoinRequest {
                        key: key(k),
                        name: format!("n{name}"),
                        tags: tags(TAGSETS[t as usize]),
                        endpoints: eps[ep as usize].clone(),
                        since,
                        home: None,
                    };
                    if let Ok((_, out)) = sim.c.join(r) { sim.deliver(out)?; }
                }
                Op::Endpoints { k, ep } => {
                    if let Some(id) = sim.c.id_of(&key(k)) {
                        let out = ok(sim.c.update_endpoints(id, &eps[ep as usize]));
                        sim.deliver(out)?;
                    }
                }
                Op::Online { k, on } => {
                    if let Some(id) = sim.c.id_of(&key(k)) {
                        // Coming online without a join is the shell's mistake; model the
                        // real flow: online only through join.
                        if !on {
                            let out = ok(sim.c.set_online(id, false));
                            sim.deliver(out)?;
                        }
                    }
                }
                Op::Remove { k } => {
                    if let Some(id) = sim.c.id_of(&key(k)) {
                        let (_, out) = ok(sim.c.remove(id));
                        sim.maps.remove(&id);
                        sim.deliver(out)?;
                    }
                }
                Op::Policy(i) => {
                    let out = ok(sim.c.set_policy(policy(i)));
                    sim.deliver(out)?;
                }
            }
            sim.check()?;
        }
    }
}

// ---------------------------------------------------------------------------
// Scale.

/// Joins `workers` + `engineers` nodes under the default policy.
fn populate(workers: u32, engineers: u32) -> Coordinator {
    let mut c = coord();
    for i in 0..workers + engineers {
        let t: &[&str] = if i < workers {
            &["worker"]
        } else {
            &["engineer"]
        };
        let name = if i < workers {
            format!("w{i}")
        } else {
            format!("e{i}")
        };
        ok(c.join(req(i, &name, t)));
    }
    c
}

#[test]
fn scale_10k_one_more_join_reaches_exactly_the_allowed_peers() {
    let mut c = populate(5_000, 5_000);
    assert_eq!(c.len(), 10_000);
    // One more worker: every engineer (and nobody else) gets one upsert;
    // the worker gets a snapshot of the 5,000 engineers.
    let (w, out) = ok(c.join(req(20_000, "new-worker", &["worker"])));
    let d = deltas(&out);
    assert_eq!(d.len(), 5_000);
    let engineers: BTreeSet<NodeId> = c
        .records()
        .filter(|r| r.tags == tags(&["engineer"]))
        .map(|r| r.id)
        .collect();
    let got: BTreeSet<NodeId> = d.iter().map(|(to, _)| *to).collect();
    assert_eq!(got, engineers);
    assert!(d
        .iter()
        .all(|(_, ch)| matches!(ch, PeerChange::Upsert(p) if p.key == key(20_000))));
    let snap = snapshot_to(&out, w).map(|s| s.peers.len());
    assert_eq!(snap, Some(5_000));
    // And one more engineer: the 5,001 workers.
    let (_, out) = ok(c.join(req(20_001, "new-engineer", &["engineer"])));
    assert_eq!(deltas(&out).len(), 5_001);
    // The change is one shared allocation, not 5,001 copies.
    let arcs: BTreeSet<*const PeerChange> = out
        .iter()
        .filter_map(|(_, u)| match u {
            PeerMapUpdate::Delta(d) => Some(Arc::as_ptr(&d.change)),
            PeerMapUpdate::Snapshot(_) => None,
        })
        .collect();
    assert_eq!(arcs.len(), 1);
}

/// Two relays on one shared store: each runs a replica of the core, joins its
/// own nodes and applies the records the other writes.
#[test]
fn two_replicas_share_nodes_by_record() {
    let mut a = coord();
    let mut b = coord();
    a.use_key_ids();
    b.use_key_ids();
    let (w, _) = ok(a.join(req(1, "gpu1", &["worker"])));
    assert_eq!(w, NodeId::of_key(&key(1)));
    let (e, _) = ok(b.join(req(3, "alice", &["engineer"])));
    // B learns gpu1 from A's record: alice (B's session) gets it.
    let rec_w = a.record(w).cloned().unwrap_or_else(|| panic!("no record"));
    let out = ok(b.apply_remote(rec_w.clone(), true, Some("relay-a")));
    let d = deltas(&out);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(
        matches!(&d[0], (to, PeerChange::Upsert(p)) if *to == e && p.key == key(1) && p.ipv4 == rec_w.ipv4 && p.home.as_deref() == Some("relay-a"))
    );
    // A learns alice: gpu1 gets her, the same id and address on both.
    let rec_e = b.record(e).cloned().unwrap_or_else(|| panic!("no record"));
    let out = ok(a.apply_remote(rec_e.clone(), true, Some("relay-b")));
    assert_eq!(deltas(&out).len(), 1);
    assert_eq!(a.id_of(&key(3)), Some(e));
    assert_eq!(a.record(e).map(|r| r.ipv4), Some(rec_e.ipv4));
    // The same record again changes nothing; new endpoints and going offline do.
    assert!(ok(b.apply_remote(rec_w.clone(), true, Some("relay-a"))).is_empty());
    let mut moved = rec_w.clone();
    moved.endpoints = vec![cand(77, 4000)];
    assert_eq!(
        deltas(&ok(b.apply_remote(moved.clone(), true, Some("relay-a")))).len(),
        1
    );
    let d = deltas(&ok(b.apply_remote(moved.clone(), false, Some("relay-a"))));
    assert!(matches!(&d[..], [(to, PeerChange::Upsert(p))] if *to == e && !p.online));
    // The node's home moves (it re-joined through relay C): its peers learn the new home.
    let d = deltas(&ok(b.apply_remote(moved.clone(), true, Some("relay-c"))));
    assert!(
        matches!(&d[..], [(to, PeerChange::Upsert(p))] if *to == e && p.online && p.home.as_deref() == Some("relay-c")),
        "{d:?}"
    );
    // ... and when it comes back here: this relay is its home.
    let mut back = req(1, "gpu1", &["worker"]);
    back.home = Some("relay-b".into());
    back.endpoints = moved.endpoints.clone();
    let (_, out) = ok(b.join(back));
    let d = deltas(&out);
    assert!(
        matches!(&d[..], [(to, PeerChange::Upsert(p))] if *to == e && p.home.as_deref() == Some("relay-b")),
        "{d:?}"
    );

    // A clash (another key under gpu1's name, or an address taken here) is refused and changes nothing.
    let mut clash = rec_w.clone();
    clash.key = key(9);
    clash.id = NodeId::of_key(&key(9));
    assert!(matches!(
        b.apply_remote(clash, true, Some("relay-a")),
        Err(CoordError::Conflict(_))
    ));
    let mut clash = rec_w.clone();
    clash.key = key(9);
    clash.id = NodeId::of_key(&key(9));
    clash.name = "gpu9".into();
    assert!(matches!(
        b.apply_remote(clash, true, Some("relay-a")),
        Err(CoordError::Conflict(_))
    ));
    assert_eq!(b.len(), 2);
    // Removal follows the record's deletion.
    let (_, out) = ok(b.remove(w));
    assert_eq!(deltas(&out).len(), 1);
    assert_eq!(b.id_by_name("gpu1"), None);
}
