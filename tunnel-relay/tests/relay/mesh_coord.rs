//! The mesh coordinator wired into the relay, end to end on loopback: a real
//! relay (`Relay::run`), nodes joining with tokens through the client
//! library (`MeshSession`), the registry written from another connection as
//! `nodes revoke` does. What users rely on: each node learns exactly the
//! peers the ACL allows, with stable overlay addresses; changes arrive as
//! single deltas; call-me-maybe reaches only permitted peers; revocation,
//! disconnects and relay restarts show up in every peer map.

use std::time::{Duration, Instant};

use tunnel_relay::coord::wire::{read_control, write_control, ControlMsg, MAX_CONTROL_FRAME};
use tunnel_relay::coord::{Candidate, CandidateKind, PeerMap};
use tunnel_relay::wire::{read_message, write_message, Message};
use tunnel_relay::{
    client, ClientError, LinkState, MeshEvent, MeshSession, PublicKey, Reason, RelayConfig,
};

use crate::relay_lab;
use relay_lab::{
    relay_path_delivers, sample, scrape, start_relay, start_relay_in, tmp, with_metrics, RelayLab,
};

fn cand(s: &str) -> Candidate {
    Candidate {
        addr: s.parse().unwrap_or_else(|_| panic!("bad addr {s}")),
        kind: CandidateKind::Local,
    }
}

/// A node joined with a fresh identity and a token of `tag`.
async fn node(
    lab: &RelayLab,
    tag: &str,
    name: &str,
    endpoints: Vec<Candidate>,
) -> (MeshSession, tempfile::TempDir) {
    let dir = tmp();
    let tok = lab.token(tag, None, None);
    let s = MeshSession::connect(dir.path(), Some(&tok), name, endpoints)
        .await
        .unwrap_or_else(|e| panic!("mesh join {name}: {e}"));
    (s, dir)
}

/// Waits until the node's peer map satisfies `f`.
async fn until(
    s: &MeshSession,
    what: &str,
    within: Duration,
    f: impl Fn(&PeerMap) -> bool,
) -> PeerMap {
    let mut rx = s.watch_peer_map();
    let r = tokio::time::timeout(within, rx.wait_for(|m| f(m))).await;
    match r {
        Ok(Ok(m)) => m.clone(),
        _ => panic!("{what}: not within {within:?}; map: {:#?}", s.peer_map()),
    }
}

fn sorted_keys(m: &PeerMap) -> Vec<PublicKey> {
    m.peers.keys().copied().collect()
}

fn keys(v: &[&MeshSession]) -> Vec<PublicKey> {
    let mut k: Vec<PublicKey> = v.iter().map(|s| s.public_key()).collect();
    k.sort();
    k
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_maps_follow_the_acl_and_changes_reach_only_who_sees_them() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(with_metrics(RelayConfig::default())).await;
    let (w1, _d1) = node(&lab, "worker", "gpu1", vec![cand("192.0.2.1:51820")]).await;
    let (mut w2, _d2) = node(&lab, "worker", "gpu2", vec![]).await;
    let (mut e, _de) = node(&lab, "engineer", "Alice.Laptop", vec![]).await;

    // Identities: names made DNS labels, tags from the tokens, addresses
    // from the default pools, distinct, IPv6 = ULA prefix + IPv4.
    let me_e = e.me().unwrap_or_else(|| panic!("no self info"));
    assert_eq!(me_e.name, "alice");
    assert_eq!(me_e.tags, vec!["engineer".to_string()]);
    let me1 = w1.me().unwrap_or_else(|| panic!("no self info"));
    let me2 = w2.me().unwrap_or_else(|| panic!("no self info"));
    assert_eq!((me1.name.as_str(), me2.name.as_str()), ("gpu1", "gpu2"));
    let pool: ipnet::Ipv4Net = "100.64.0.0/10".parse().unwrap_or_else(|_| panic!());
    for m in [&me_e, &me1, &me2] {
        assert!(pool.contains(&m.ipv4), "{m:?}");
        assert_eq!(m.ipv6.octets()[..6], [0xfd, 0x7a, 0x77, 0x65, 0x66, 0x74]);
        assert_eq!(m.ipv6.octets()[12..], m.ipv4.octets());
    }
    assert!(me_e.ipv4 != me1.ipv4 && me1.ipv4 != me2.ipv4 && me_e.ipv4 != me2.ipv4);

    // The engineer sees both workers; each worker sees only the engineer.
    let em = until(&e, "engineer sees both workers", 3 * SEC, |m| {
        m.peers.len() == 2 && m.peers.values().all(|p| p.online)
    })
    .await;
    assert_eq!(sorted_keys(&em), keys(&[&w1, &w2]));
    let p1 = &em.peers[&w1.public_key()];
    assert_eq!(
        (p1.name.as_str(), p1.ipv4, p1.ipv6),
        ("gpu1", me1.ipv4, me1.ipv6)
    );
    assert_eq!(p1.endpoints, vec![cand("192.0.2.1:51820")]);
    assert_eq!(p1.tags, vec!["worker".to_string()]);
    // Its entry names its home: the relay it joined through.
    assert_eq!(
        p1.home.as_deref(),
        Some(RelayConfig::default().relay_name().as_str())
    );
    for w in [&w1, &w2] {
        let m = until(w, "worker sees the engineer", 3 * SEC, |m| {
            m.peers.get(&e.public_key()).is_some_and(|p| p.online)
        })
        .await;
        assert_eq!(
            sorted_keys(&m),
            vec![e.public_key()],
            "a worker sees a worker"
        );
        assert_eq!(m.peers[&e.public_key()].ipv4, me_e.ipv4);
        // The worker's filter lets the engineer in on tcp/22.
        assert!(m
            .filter
            .allows(&me_e.tags, tunnel_relay::coord::Proto::Tcp, 22));
    }
    // The relay told each node where STUN is answered.
    let Some(info) = e.link_info() else {
        panic!("link not up: {:?}", e.link())
    };
    assert_eq!(info.stun, lab.stun);
    assert_eq!(info.ipv4_pool, pool);

    // An endpoint report reaches the engineer as one delta.
    let v0 = e.peer_map().version.unwrap_or_default();
    w1.report_endpoints(vec![cand("198.51.100.7:41641"), cand("192.0.2.1:51820")]);
    let em = until(&e, "endpoint report reaches the engineer", 3 * SEC, |m| {
        m.peers
            .get(&w1.public_key())
            .is_some_and(|p| p.endpoints.first() == Some(&cand("198.51.100.7:41641")))
    })
    .await;
    let v1 = em.version.unwrap_or_default();
    assert_eq!((v1.epoch, v1.seq), (v0.epoch, v0.seq + 1));

    // Call-me-maybe: engineer -> worker arrives, with the sender's key.
    drain(&mut w2).await;
    let mut w1 = w1;
    drain(&mut w1).await;
    assert!(e.call_me_maybe(w1.public_key(), vec![cand("203.0.113.9:51820")]));
    let got = next_call_me_maybe(&mut w1, 3 * SEC).await;
    assert_eq!(
        got,
        Some((e.public_key(), vec![cand("203.0.113.9:51820")])),
        "call-me-maybe from the engineer did not reach the worker"
    );
    // Worker -> worker is refused by the relay (the ACL hides them from each other).
    assert!(w1.call_me_maybe(w2.public_key(), vec![cand("192.0.2.1:51820")]));
    assert_eq!(next_call_me_maybe(&mut w2, SEC / 2).await, None);
    // Worker -> engineer is allowed (replies must flow).
    drain(&mut e).await;
    assert!(w1.call_me_maybe(e.public_key(), vec![cand("192.0.2.1:51820")]));
    assert!(next_call_me_maybe(&mut e, 3 * SEC).await.is_some());
    let m = scrape(lab.metrics.unwrap_or_else(|| panic!("no metrics"))).await;
    assert_eq!(sample(&m, "weft_relay_mesh_nodes"), 3.0, "{m}");
    assert_eq!(sample(&m, "weft_relay_mesh_sessions"), 3.0, "{m}");
    let cmm = "weft_relay_mesh_call_me_maybe_total{result=";
    assert_eq!(sample(&m, &format!("{cmm}\"forwarded\"}}")), 2.0, "{m}");
    assert_eq!(sample(&m, &format!("{cmm}\"refused\"}}")), 1.0, "{m}");

    // The relay path on the same connection: engineer -> worker packets.
    mesh_relay_path_delivers(
        &e,
        &w1,
        b"wireguard packet",
        "no packet through the relay path",
    )
    .await;

    // A third worker: exactly one delta at the engineer, none at the workers.
    let (ve, vw1, vw2) = (
        e.peer_map().version.unwrap_or_default(),
        w1.peer_map().version.unwrap_or_default(),
        w2.peer_map().version.unwrap_or_default(),
    );
    let (w3, _d3) = node(&lab, "worker", "gpu3", vec![]).await;
    let em = until(&e, "engineer sees gpu3", 3 * SEC, |m| {
        m.peers.contains_key(&w3.public_key())
    })
    .await;
    tokio::time::sleep(SEC / 2).await;
    let em2 = e.peer_map();
    assert_eq!(em2.version, em.version, "more than one delta for one join");
    assert_eq!(em.version.map(|v| v.seq), Some(ve.seq + 1));
    assert_eq!(w1.peer_map().version, Some(vw1), "gpu1 heard of gpu3");
    assert_eq!(w2.peer_map().version, Some(vw2), "gpu2 heard of gpu3");
    let m3 = w3.peer_map();
    assert_eq!(sorted_keys(&m3), vec![e.public_key()]);

    // A worker that disconnects shows offline at the engineer.
    let k2 = w2.public_key();
    w2.close().await;
    until(&e, "gpu2 shows offline", 3 * SEC, |m| {
        m.peers.get(&k2).is_some_and(|p| !p.online)
    })
    .await;
}

/// A mesh control stream opened by hand on `conn`: `MeshJoin` (no version, no
/// endpoints, this build's peer codec) written, `MeshAccepted` read; the stream.
async fn raw_mesh_join(
    conn: &tunnel_relay::transport::Connection,
) -> (
    tunnel_relay::transport::SendStream,
    tunnel_relay::transport::RecvStream,
) {
    raw_mesh_join_at(conn, tunnel_relay::coord::wire::PEER_CODEC).await
}

/// [`raw_mesh_join`] naming peer codec `peer_codec`.
async fn raw_mesh_join_at(
    conn: &tunnel_relay::transport::Connection,
    peer_codec: u8,
) -> (
    tunnel_relay::transport::SendStream,
    tunnel_relay::transport::RecvStream,
) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap_or_else(|er| panic!("{er}"));
    write_message(
        &mut send,
        &Message::MeshJoin {
            since: None,
            endpoints: vec![],
            peer_codec,
        },
    )
    .await
    .unwrap_or_else(|er| panic!("{er}"));
    let a = read_message(&mut recv)
        .await
        .unwrap_or_else(|er| panic!("{er}"));
    assert!(matches!(a, Message::MeshAccepted { .. }), "{a:?}");
    (send, recv)
}

/// [`relay_path_delivers`] on the relay paths of two mesh sessions.
async fn mesh_relay_path_delivers(from: &MeshSession, to: &MeshSession, data: &[u8], lost: &str) {
    let (pf, pt) = (
        from.relay_path().unwrap_or_else(|| panic!("no relay path")),
        to.relay_path().unwrap_or_else(|| panic!("no relay path")),
    );
    relay_path_delivers((&pf, from.public_key()), (&pt, to.public_key()), data, lost).await;
}

/// Reads events until none arrives for 100 ms.
async fn drain(s: &mut MeshSession) {
    while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(100), s.next_event()).await {
    }
}

async fn next_call_me_maybe(
    s: &mut MeshSession,
    within: Duration,
) -> Option<(PublicKey, Vec<Candidate>)> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.next_event()).await {
            Ok(Some(MeshEvent::CallMeMaybe { peer, endpoints })) => return Some((peer, endpoints)),
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_leaves_every_peer_map_within_a_second() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (w1, _d1) = node(&lab, "worker", "w1", vec![]).await;
    let (e, _de) = node(&lab, "engineer", "e", vec![]).await;
    let (e2, _de2) = node(&lab, "engineer", "e2", vec![]).await;
    for s in [&e, &e2] {
        until(s, "engineer sees w1", 3 * SEC, |m| {
            m.peers.contains_key(&w1.public_key())
        })
        .await;
    }
    let t0 = Instant::now();
    lab.registry()
        .revoke_node("w1")
        .unwrap_or_else(|er| panic!("revoke: {er}"));
    for s in [&e, &e2] {
        until(s, "revoked w1 removed", 3 * SEC, |m| {
            !m.peers.contains_key(&w1.public_key())
        })
        .await;
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    eprintln!("revoked node left the peer maps after {took:?}");
    // The revoked node's own session stops for good.
    let mut link = w1.watch_link();
    let r = tokio::time::timeout(
        3 * SEC,
        link.wait_for(|l| matches!(l, LinkState::Failed { .. })),
    )
    .await;
    assert!(
        r.is_ok(),
        "revoked node's session did not stop: {:?}",
        w1.link()
    );
    // And it cannot rejoin.
    let dir = _d1.path();
    let again = MeshSession::connect(dir, None, "w1", vec![]).await;
    match again {
        Err(ClientError::Rejected(r)) => assert_eq!(r.reason, Reason::NodeRevoked),
        other => panic!("revoked node rejoined: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_restart_resyncs_nodes_with_unchanged_addresses() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let listen = lab.addr;
    let (w1, _d1) = node(&lab, "worker", "w1", vec![cand("192.0.2.1:51820")]).await;
    let (w2, _d2) = node(&lab, "worker", "w2", vec![]).await;
    let (e, _de) = node(&lab, "engineer", "e", vec![]).await;
    let before = until(&e, "engineer sees both", 3 * SEC, |m| {
        m.peers.len() == 2 && m.peers.values().all(|p| p.online)
    })
    .await;
    let me_before = (e.me(), w1.me(), w2.me());
    let epoch0 = before.version.map(|v| v.epoch);

    let dir = lab.stop().await;
    let lab = start_relay_in(dir, listen, RelayConfig::default()).await;
    let t0 = Instant::now();
    let after = until(&e, "engineer resynced after restart", 10 * SEC, |m| {
        m.version.map(|v| v.epoch) != epoch0
            && m.peers.len() == 2
            && m.peers.values().all(|p| p.online)
    })
    .await;
    eprintln!("resynced {:?} after the restart", t0.elapsed());
    for w in [&w1, &w2] {
        until(w, "worker resynced", 10 * SEC, |m| {
            m.version.map(|v| v.epoch) != epoch0 && m.peers.len() == 1
        })
        .await;
    }
    assert_eq!((e.me(), w1.me(), w2.me()), me_before, "addresses changed");
    for (k, p) in &before.peers {
        let q = &after.peers[k];
        assert_eq!((q.ipv4, q.ipv6, &q.name), (p.ipv4, p.ipv6, &p.name));
        assert_eq!(q.endpoints, p.endpoints, "endpoints not persisted");
    }
    // `nodes list` shows the overlay addresses.
    let listed = lab
        .registry()
        .list_nodes()
        .unwrap_or_else(|er| panic!("list: {er}"));
    let w1_row = listed
        .iter()
        .find(|n| n.name == "w1")
        .unwrap_or_else(|| panic!("w1 not listed"));
    let w1_me = w1.me().unwrap_or_else(|| panic!("no self info"));
    assert_eq!(
        (w1_row.mesh_ipv4, w1_row.mesh_ipv6),
        (Some(w1_me.ipv4), Some(w1_me.ipv6))
    );
    drop(lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_control_stream_closes_only_that_stream() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let dir = tmp();
    let tok = lab.token("engineer", None, None);
    client::login(dir.path(), &tok, "e")
        .await
        .unwrap_or_else(|er| panic!("login: {er}"));
    let s = client::session(dir.path())
        .await
        .unwrap_or_else(|er| panic!("session: {er}"));
    let join = |s: &client::Session| {
        let conn = s.connection().clone();
        async move {
            let (send, mut recv) = raw_mesh_join(&conn).await;
            let first = read_control(&mut recv, MAX_CONTROL_FRAME).await;
            assert!(matches!(first, Ok(ControlMsg::Snapshot(_))), "{first:?}");
            (send, recv)
        }
    };
    let (mut send, mut recv) = join(&s).await;
    // A frame with an unknown tag.
    tokio::io::AsyncWriteExt::write_all(&mut send, &[0, 0, 0, 3, 0xee, 1, 2])
        .await
        .unwrap_or_else(|er| panic!("{er}"));
    let r = tokio::time::timeout(3 * SEC, read_control(&mut recv, MAX_CONTROL_FRAME)).await;
    let r = r.unwrap_or_else(|_| panic!("relay kept the bad stream open"));
    assert!(r.is_err(), "{r:?}");
    // The connection lives on: tunnels' control and a new mesh stream work.
    assert!(s.connection().close_reason().is_none());
    assert!(s.list_targets().await.is_ok());
    let (mut send2, mut recv2) = join(&s).await;
    // An Ack of a version from another coordinator life asks for a resync:
    // the answer is a snapshot.
    write_control(&mut send2, &ControlMsg::Ack(Default::default()))
        .await
        .unwrap_or_else(|er| panic!("{er}"));
    let r = tokio::time::timeout(3 * SEC, read_control(&mut recv2, MAX_CONTROL_FRAME)).await;
    assert!(matches!(r, Ok(Ok(ControlMsg::Snapshot(_)))), "{r:?}");
}

/// A node that predates the home field (its `MeshJoin` is the original
/// message, peer codec 0) gets frames it can read: the original tags, no
/// homes; a node of this build gets homes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_the_first_peer_codec_gets_entries_without_homes() {
    use tokio::io::AsyncReadExt;
    use weft_proto::codec::Wire;
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (w, _dw) = node(&lab, "worker", "gpu1", vec![]).await;
    let dir = tmp();
    client::login(dir.path(), &lab.token("engineer", None, None), "e")
        .await
        .unwrap_or_else(|er| panic!("login: {er}"));
    let s = client::session(dir.path())
        .await
        .unwrap_or_else(|er| panic!("session: {er}"));
    for (codec, tag) in [(0u8, 1u8), (1, 6)] {
        let (_send, mut recv) = raw_mesh_join_at(s.connection(), codec).await;
        let mut len = [0u8; 4];
        recv.read_exact(&mut len)
            .await
            .unwrap_or_else(|er| panic!("{er}"));
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        recv.read_exact(&mut frame)
            .await
            .unwrap_or_else(|er| panic!("{er}"));
        assert_eq!(frame[0], tag, "peer codec {codec}: snapshot tag");
        let Ok(ControlMsg::Snapshot(snap)) = ControlMsg::decode(&frame) else {
            panic!("peer codec {codec}: not a snapshot")
        };
        let gpu = snap
            .peers
            .iter()
            .find(|p| p.key == w.public_key())
            .unwrap_or_else(|| panic!("no gpu1 in {snap:?}"));
        let want = (codec > 0).then(|| RelayConfig::default().relay_name());
        assert_eq!(gpu.home, want, "peer codec {codec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_that_are_not_dns_labels_are_refused_with_the_reason() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let dir = tmp();
    let tok = lab.token("GPU_Workers", None, None);
    let r = MeshSession::connect(dir.path(), Some(&tok), "w", vec![]).await;
    match r {
        Err(ClientError::Rejected(rej)) => {
            assert_eq!(rej.reason, Reason::BadRequest);
            assert!(rej.detail.contains("GPU_Workers"), "{rej}");
        }
        other => panic!("joined with a bad tag: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_stream_is_reset_rejoins_on_its_connection_from_its_version() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (w1, _d1) = node(&lab, "worker", "w1", vec![]).await;
    let (mut e, de) = node(&lab, "engineer", "e", vec![]).await;
    until(&e, "engineer sees w1", 3 * SEC, |m| {
        m.peers.contains_key(&w1.public_key())
    })
    .await;
    drain(&mut e).await;
    let v0 = e.peer_map().version.unwrap_or_default();
    let Some(info0) = e.link_info() else {
        panic!("link not up")
    };

    // Another session of the same identity takes the control stream over:
    // the relay resets e's stream, and e rejoins on the same connection.
    let raw = client::session(de.path())
        .await
        .unwrap_or_else(|er| panic!("session: {er}"));
    let (_rs, mut rr) = raw_mesh_join(raw.connection()).await;
    let mut saw_disconnect = false;
    let rejoined = tokio::time::timeout(5 * SEC, async {
        while let Some(ev) = e.next_event().await {
            match ev {
                MeshEvent::Disconnected { .. } => saw_disconnect = true,
                MeshEvent::Connected(i) if saw_disconnect => return Some(i),
                _ => {}
            }
        }
        None
    })
    .await;
    let info1 = rejoined
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("engineer did not rejoin: {:?}", e.link()));
    assert_eq!(info1.relay, info0.relay);
    // The raw session was superseded in turn: its stream is reset.
    let r = tokio::time::timeout(3 * SEC, async {
        loop {
            if let Err(er) = read_control(&mut rr, MAX_CONTROL_FRAME).await {
                return er;
            }
        }
    })
    .await;
    assert!(r.is_ok(), "superseded stream stayed open");
    // Nothing was missed, so nothing was resent: the next change is the
    // next delta of the same epoch (no snapshot needed).
    assert_eq!(e.peer_map().version, Some(v0));
    let (w2, _d2) = node(&lab, "worker", "w2", vec![]).await;
    let m = until(&e, "engineer sees w2 after rejoining", 3 * SEC, |m| {
        m.peers.contains_key(&w2.public_key())
    })
    .await;
    let v1 = m.version.unwrap_or_default();
    assert_eq!((v1.epoch, v1.seq), (v0.epoch, v0.seq + 1));
    assert!(m.peers.values().all(|p| p.online), "{m:?}");
    // The other session's connection ends: relay-path packets still reach
    // e on the connection holding its mesh session.
    raw.close().await;
    tokio::time::sleep(SEC / 5).await;
    mesh_relay_path_delivers(
        &w1,
        &e,
        b"to e",
        "packet to e lost after the other connection closed",
    )
    .await;
}
