//! In-process end-to-end tests on loopback: a real relay, workers and
//! engineers (the library's `Relay::run`, `client::expose`, `Session`), real
//! TCP services. They check what users rely on: bytes arrive intact, FIN and
//! reset semantics hold, and every refusal carries its reason.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tunnel_relay::client::{self, ExposeOptions};
use tunnel_relay::registry::Registry;
use tunnel_relay::ClientError;
use tunnel_relay::{PublicKey, Reason, Relay, RelayConfig, ServeOptions, Token};

use crate::relay_lab;
use relay_lab::{
    echo_service, relay_path_delivers, sample, scrape, start_relay, start_relay_in, tmp,
    with_metrics, RelayLab,
};

/// Writes a banner and FINs at once, then counts what arrives until EOF and
/// reports the count on the channel.
async fn banner_then_count_service() -> (SocketAddr, mpsc::UnboundedReceiver<u64>) {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = w.write_all(b"banner\n").await;
                let _ = w.shutdown().await;
                let mut buf = vec![0u8; 65536];
                let mut n = 0u64;
                while let Ok(k) = r.read(&mut buf).await {
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                }
                let _ = tx.send(n);
            });
        }
    });
    (addr, rx)
}

struct Worker {
    _dir: Option<tempfile::TempDir>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ClientError>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.task.abort();
    }
}

fn start_worker(
    token: Option<Token>,
    dir: tempfile::TempDir,
    name: &str,
    services: &[(&str, String)],
) -> Worker {
    let mut w = start_worker_in(token, dir.path(), name, services);
    w._dir = Some(dir);
    w
}

fn start_worker_in(
    token: Option<Token>,
    dir: &Path,
    name: &str,
    services: &[(&str, String)],
) -> Worker {
    let mut opts = ExposeOptions::new(
        dir.to_path_buf(),
        name.to_string(),
        services
            .iter()
            .map(|(n, a)| (n.to_string(), a.clone()))
            .collect(),
    );
    opts.token = token;
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(client::expose(opts, async {
        let _ = rx.await;
    }));
    Worker {
        _dir: None,
        stop: Some(tx),
        task,
    }
}

async fn engineer(lab: &RelayLab, name: &str) -> tempfile::TempDir {
    let dir = tmp();
    let tok = lab.token("engineer", Some(Duration::from_secs(600)), Some(1));
    client::login(dir.path(), &tok, name)
        .await
        .unwrap_or_else(|e| panic!("login: {e}"));
    dir
}

/// Waits until `target` is listed to the engineer (worker connected).
async fn wait_target(eng: &Path, target: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = client::session(eng).await {
            let listed = s.list_targets().await.unwrap_or_default();
            s.close().await;
            if listed.iter().any(|t| t.name == target) {
                return t0.elapsed();
            }
        }
        assert!(
            t0.elapsed() < within,
            "{target} not connected within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Worker `name` exposing `services`, joined with a fresh worker token, once
/// the engineer whose state is in `eng` sees it listed.
async fn connected_worker(
    lab: &RelayLab,
    eng: &Path,
    name: &str,
    services: &[(&str, String)],
) -> Worker {
    let w = start_worker(Some(lab.token("worker", None, None)), tmp(), name, services);
    wait_target(eng, name, Duration::from_secs(5)).await;
    w
}

/// Worker `w` exposing a local echo service as `echo`, and engineer `e`
/// logged in (its state dir and a session), once `w` is reachable.
async fn echo_worker_and_engineer(lab: &RelayLab) -> (Worker, tempfile::TempDir, client::Session) {
    let echo = echo_service().await;
    let eng = engineer(lab, "e").await;
    let w = connected_worker(lab, eng.path(), "w", &[("echo", echo.to_string())]).await;
    let s = client::session(eng.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    (w, eng, s)
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::thread_rng().fill_bytes(&mut v);
    v
}

/// Sends `data` through a tunnel, FINs, reads everything back.
async fn echo_through(s: &client::Session, target: &str, data: &[u8]) -> Vec<u8> {
    let (mut send, mut recv) = s
        .open(target, "echo")
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    let data2 = data.to_vec();
    let writer = tokio::spawn(async move {
        send.write_all(&data2)
            .await
            .unwrap_or_else(|e| panic!("write: {e}"));
        let _ = send.finish();
        send
    });
    let mut got = Vec::with_capacity(data.len());
    AsyncReadExt::read_to_end(&mut recv, &mut got)
        .await
        .unwrap_or_else(|e| panic!("read: {e}"));
    let _send = writer.await;
    got
}

fn reason_of(e: &ClientError) -> Option<Reason> {
    match e {
        ClientError::Rejected(r) => Some(r.reason),
        _ => None,
    }
}

/// Asserts that `r` is a refusal by the relay for `want`; the error.
#[track_caller]
fn assert_refused<T>(r: Result<T, ClientError>, want: Reason) -> ClientError {
    let e = r.err();
    assert_eq!(e.as_ref().and_then(reason_of), Some(want), "{e:?}");
    e.unwrap_or_else(|| unreachable!("checked above"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_carries_bytes_and_half_close_both_ways() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let echo = echo_service().await;
    let (banner, mut counts) = banner_then_count_service().await;
    let wtok = lab.token("worker", None, Some(1));
    let _w = start_worker(
        Some(wtok),
        tmp(),
        "w1",
        &[("echo", echo.to_string()), ("banner", banner.to_string())],
    );
    let eng = engineer(&lab, "alice").await;
    wait_target(eng.path(), "w1", Duration::from_secs(5)).await;
    let s = client::session(eng.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));

    // 4 MiB of random bytes out and back, byte for byte.
    let data = random_bytes(4 << 20);
    let got = echo_through(&s, "w1", &data).await;
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");

    // Worker side FINs first: the engineer reads the banner and EOF while its
    // own direction is still open, then sends and FINs; the service sees all.
    let (mut send, mut recv) = s
        .open("w1", "banner")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut got = Vec::new();
    tokio::time::timeout(
        Duration::from_secs(5),
        AsyncReadExt::read_to_end(&mut recv, &mut got),
    )
    .await
    .unwrap_or_else(|_| panic!("no FIN from the worker side"))
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got, b"banner\n");
    let payload = random_bytes(300_000);
    send.write_all(&payload)
        .await
        .unwrap_or_else(|e| panic!("write after peer FIN: {e}"));
    let _ = send.finish();
    let n = tokio::time::timeout(Duration::from_secs(5), counts.recv())
        .await
        .unwrap_or_else(|_| panic!("service never saw EOF"));
    assert_eq!(
        n,
        Some(payload.len() as u64),
        "service received every byte, then EOF"
    );
    s.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_propagates_to_the_other_side() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    // A service that accepts and then aborts the connection (RST) at once.
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut hello = [0u8; 5];
            let _ = s.read_exact(&mut hello).await;
            // Linger 0 makes close send RST.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let eng = engineer(&lab, "eng").await;
    let _w = connected_worker(&lab, eng.path(), "w", &[("rst", addr.to_string())]).await;
    let s = client::session(eng.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (mut send, mut recv) = s.open("w", "rst").await.unwrap_or_else(|e| panic!("{e}"));
    let _ = send.write_all(b"hello").await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        AsyncReadExt::read_to_end(&mut recv, &mut buf),
    )
    .await
    .unwrap_or_else(|_| panic!("reset never arrived"));
    assert!(
        r.is_err(),
        "a reset service must surface as a stream error, got clean EOF"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_their_reason() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let echo = echo_service().await;

    // Expired token.
    let expired = lab.token("engineer", Some(Duration::ZERO), None);
    let e = assert_refused(
        client::login(tmp().path(), &expired, "x1").await,
        Reason::TokenExpired,
    );
    assert!(e.to_string().contains("token expired"));

    // Used up: one use, second key refused.
    let once = lab.token("engineer", None, Some(1));
    assert!(client::login(tmp().path(), &once, "x2").await.is_ok());
    assert_refused(
        client::login(tmp().path(), &once, "x3").await,
        Reason::TokenUsedUp,
    );

    // Revoked.
    let rv = lab.token("engineer", None, None);
    let id = Registry::token_id(&rv.secret);
    lab.registry()
        .revoke_token(&id)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_refused(
        client::login(tmp().path(), &rv, "x4").await,
        Reason::TokenRevoked,
    );

    // Unknown token (right relay, secret never issued).
    let unknown = Token {
        secret: tunnel_relay::secret::Secret::random(),
        ..once.clone()
    };
    assert_refused(
        client::login(tmp().path(), &unknown, "x5").await,
        Reason::TokenUnknown,
    );

    // Unknown key: a fresh identity that knows the relay but never joined.
    let known = engineer(&lab, "known").await;
    let stranger = tmp();
    std::fs::copy(
        known.path().join("relay.json"),
        stranger.path().join("relay.json"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_refused(client::session(stranger.path()).await, Reason::KeyUnknown);

    // Policy: a worker may open nothing, not even another worker.
    let _w1 = connected_worker(&lab, known.path(), "w1", &[("echo", echo.to_string())]).await;
    let w2dir = tmp();
    let w2tok = lab.token("worker", None, None);
    let mut w2state = client::ClientState::open(w2dir.path()).unwrap_or_else(|e| panic!("{e}"));
    let w2 = client::connect(
        &mut w2state,
        Some(&w2tok),
        "w2",
        vec!["echo".into()],
        &client::ClientTiming::worker(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let e = assert_refused(w2.open("w1", "echo").await, Reason::NotAllowed);
    assert!(e.to_string().contains("not allowed by policy"));

    // Policy: a tag without a rule.
    let guest = tmp();
    client::login(guest.path(), &lab.token("guest", None, None), "guest")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let g = client::session(guest.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_refused(g.open("w1", "echo").await, Reason::NotAllowed);

    // Engineer: wrong node, wrong service, service down.
    let s = client::session(known.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_refused(s.open("nope", "echo").await, Reason::NoSuchNode);
    assert_refused(s.open("w1", "ftp").await, Reason::NoSuchService);
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let dead = closed.local_addr().unwrap_or_else(|e| panic!("{e}"));
    drop(closed);
    let _w3 = connected_worker(&lab, known.path(), "w3", &[("down", dead.to_string())]).await;
    assert_refused(s.open("w3", "down").await, Reason::ServiceUnavailable);

    // The same session still works, then revocation applies to the next tunnel.
    assert_eq!(echo_through(&s, "w1", b"still fine").await, b"still fine");
    lab.registry()
        .revoke_node("known")
        .unwrap_or_else(|e| panic!("{e}"));
    assert_refused(s.open("w1", "echo").await, Reason::NodeRevoked);
    assert_refused(client::session(known.path()).await, Reason::NodeRevoked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_relay_with_another_key() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let mut tok = lab.token("engineer", None, None);
    tok.relay_key = tunnel_relay::StaticKey::generate().public();
    let dir = tmp();
    let e = client::login(dir.path(), &tok, "e").await.err();
    assert!(
        matches!(e, Some(ClientError::Unreachable { .. })),
        "a relay that cannot prove the pinned key must not admit us: {e:?}"
    );
    assert!(
        !dir.path().join("relay.json").exists(),
        "nothing remembered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_tunnels_echo_every_byte() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (_w, _eng, s) = echo_worker_and_engineer(&lab).await;
    let s = std::sync::Arc::new(s);
    let mut tasks = Vec::new();
    for i in 0..500usize {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            // Sizes vary so tunnels end at different times.
            let data = random_bytes(16 * 1024 + (i * 997) % (48 * 1024));
            let got = echo_through(&s, "w", &data).await;
            got == data
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .ok()
            .and_then(|r| r.ok())
            == Some(true)
        {
            ok += 1;
        }
    }
    assert_eq!(ok, 500, "tunnels with every byte intact");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_returns_after_relay_restart_and_needs_no_token() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let addr = lab.addr;
    let echo = echo_service().await;
    let wdir = tmp();
    let wpath = wdir.path().to_path_buf();
    let tok = lab.token("worker", None, Some(1));
    let _w = start_worker_in(Some(tok), &wpath, "w", &[("echo", echo.to_string())]);
    let eng = engineer(&lab, "e").await;
    wait_target(eng.path(), "w", Duration::from_secs(5)).await;
    assert!(
        wpath.join("relay.json").exists(),
        "worker remembered its relay"
    );

    let state = lab.stop().await;
    let lab = start_relay_in(state, addr, RelayConfig::default()).await;
    let took = wait_target(eng.path(), "w", Duration::from_secs(5)).await;
    let s = client::session(eng.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        echo_through(&s, "w", b"after restart").await,
        b"after restart"
    );
    eprintln!("worker back {took:?} after the relay restarted");

    // A second worker process from the same state dir, with no token: the
    // token was single-use and is spent, the key alone admits it.
    drop(_w);
    let mut st = client::ClientState::open(&wpath).unwrap_or_else(|e| panic!("{e}"));
    let again = client::connect(
        &mut st,
        None,
        "w",
        vec!["echo".into()],
        &client::ClientTiming::worker(),
    )
    .await;
    assert!(
        again.is_ok(),
        "known key admitted without a token: {:?}",
        again.err()
    );
    drop(lab);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_limit_per_node_refuses_with_reason_and_frees_slots() {
    let _turn = weft_tests::turn::take(module_path!());
    let mut config = RelayConfig::default();
    config.limits.max_streams_per_node = 2;
    let lab = start_relay(config).await;
    let (_w, _eng, s) = echo_worker_and_engineer(&lab).await;
    let a = s.open("w", "echo").await.unwrap_or_else(|e| panic!("{e}"));
    let _b = s.open("w", "echo").await.unwrap_or_else(|e| panic!("{e}"));
    assert_refused(s.open("w", "echo").await, Reason::LimitExceeded);
    // Closing one tunnel (both directions) frees its slot.
    let (mut send, mut recv) = a;
    let _ = send.finish();
    let mut sink = Vec::new();
    let _ = AsyncReadExt::read_to_end(&mut recv, &mut sink).await;
    let t0 = Instant::now();
    loop {
        match s.open("w", "echo").await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(reason_of(&e), Some(Reason::LimitExceeded));
                assert!(t0.elapsed() < Duration::from_secs(5), "slot never freed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_dropped_after_the_handshake_timeout() {
    let _turn = weft_tests::turn::take(module_path!());
    let mut config = with_metrics(RelayConfig::default());
    config.limits.handshake_timeout_ms = 300;
    let lab = start_relay(config).await;
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap_or_else(|_| panic!()))
        .unwrap_or_else(|e| panic!("{e}"));
    let t = tunnel_relay::tls::transport(Duration::from_secs(30), None, 16);
    ep.set_default_client_config(
        tunnel_relay::tls::client_config(t).unwrap_or_else(|e| panic!("{e}")),
    );
    let conn = ep
        .connect(lab.addr, tunnel_relay::tls::SERVER_NAME)
        .unwrap_or_else(|e| panic!("{e}"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let t0 = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    assert!(closed.is_ok(), "relay kept a silent connection open");
    assert!(
        t0.elapsed() >= Duration::from_millis(200),
        "closed before the timeout: {:?}",
        t0.elapsed()
    );
    let text = scrape(lab.metrics.unwrap_or_else(|| panic!("metrics"))).await;
    assert_eq!(
        sample(
            &text,
            "weft_relay_handshake_failures_total{cause=\"timeout\"}"
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_nodes_tunnels_bytes_and_refusals() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(with_metrics(RelayConfig::default())).await;
    let maddr = lab.metrics.unwrap_or_else(|| panic!("metrics enabled"));
    let (_w, _eng, s) = echo_worker_and_engineer(&lab).await;
    let data = random_bytes(1 << 20);
    assert!(echo_through(&s, "w", &data).await == data);
    let e = client::login(
        tmp().path(),
        &lab.token("engineer", Some(Duration::ZERO), None),
        "x",
    )
    .await;
    assert!(e.is_err());
    let _ = s.open("w", "nope").await;

    let text = scrape(maddr).await;
    assert!(text.contains("200 OK"), "{text}");
    assert!(sample(&text, "weft_relay_connected_nodes") >= 2.0, "{text}");
    assert!(
        sample(
            &text,
            "weft_relay_bytes_relayed_total{direction=\"to_worker\"}"
        ) >= data.len() as f64,
        "{text}"
    );
    assert!(
        sample(
            &text,
            "weft_relay_bytes_relayed_total{direction=\"to_engineer\"}"
        ) >= data.len() as f64,
        "{text}"
    );
    assert_eq!(
        sample(&text, "weft_relay_refusals_total{reason=\"token_expired\"}"),
        1.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "weft_relay_refusals_total{reason=\"no_such_service\"}"
        ),
        1.0,
        "{text}"
    );
    // The suite runs twice in the test command: as is (QUIC wins the race on
    // loopback) and with WEFT_RELAY_TRANSPORT=tcp (every client on the TLS fallback).
    let (used, unused) = match std::env::var("WEFT_RELAY_TRANSPORT").as_deref() {
        Ok("tcp") => ("tcp", "quic"),
        _ => ("quic", "tcp"),
    };
    let series = |t: &str| format!("weft_relay_transport_connections_total{{transport=\"{t}\"}}");
    assert!(sample(&text, &series(used)) >= 2.0, "{text}");
    assert_eq!(sample(&text, &series(unused)), 0.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_connected_nodes_closes_them_without_waiting_for_an_open() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    let (mut w, _eng, s) = echo_worker_and_engineer(&lab).await;
    // A tunnel open through the worker while it is revoked.
    let (mut send, mut recv) = s.open("w", "echo").await.unwrap_or_else(|e| panic!("{e}"));
    send.write_all(b"before")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 6];
    recv.read_exact(&mut buf)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(&buf, b"before");

    // `nodes revoke w` from another process: another registry connection.
    let t0 = Instant::now();
    lab.registry()
        .revoke_node("w")
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    let ended = tokio::time::timeout(Duration::from_secs(3), &mut w.task)
        .await
        .unwrap_or_else(|_| panic!("revoked worker still connected after 3 s"));
    let err = ended
        .unwrap_or_else(|e| panic!("join: {e}"))
        .err()
        .unwrap_or_else(|| panic!("expose returned Ok for a revoked worker"));
    assert_eq!(reason_of(&err), Some(Reason::NodeRevoked), "{err}");
    // The tunnel through it is gone too, and the worker is no longer listed.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(
        Duration::from_secs(3),
        AsyncReadExt::read_to_end(&mut recv, &mut rest),
    )
    .await;
    assert!(r.is_ok(), "tunnel to a revoked worker stayed open");
    assert!(s.list_targets().await.unwrap_or_default().is_empty());
    eprintln!("worker closed {:?} after revocation", t0.elapsed());

    // Revoking the engineer closes its session too.
    lab.registry()
        .revoke_node("e")
        .unwrap_or_else(|e| panic!("revoke: {e}"));
    let closed = tokio::time::timeout(Duration::from_secs(3), s.closed()).await;
    let closed = closed.unwrap_or_else(|_| panic!("revoked engineer still connected"));
    assert!(
        closed.to_string().contains("revoked"),
        "closed for another reason: {closed}"
    );
}

fn write_pem(path: &Path, label: &str, der: &[u8]) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    std::fs::write(path, s).unwrap_or_else(|e| panic!("{e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_certificate_is_served_and_a_wrong_key_is_refused() {
    let _turn = weft_tests::turn::take(module_path!());
    let dir = tmp();
    let op = rcgen::generate_simple_self_signed(vec!["relay.example.net".to_string()])
        .unwrap_or_else(|e| panic!("{e}"));
    let other = rcgen::KeyPair::generate().unwrap_or_else(|e| panic!("{e}"));
    let cert = dir.path().join("relay.crt");
    let key = dir.path().join("relay.key");
    let wrong = dir.path().join("wrong.key");
    write_pem(&cert, "CERTIFICATE", op.cert.der());
    write_pem(&key, "PRIVATE KEY", &op.key_pair.serialize_der());
    write_pem(&wrong, "PRIVATE KEY", &other.serialize_der());

    let mut config = RelayConfig::default();
    config.tls.cert_file = Some(cert.clone());
    config.tls.key_file = Some(wrong.clone());
    let e = Relay::bind(ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap_or_else(|_| panic!()),
        state_dir: tmp().path().join("s"),
        config: config.clone(),
        config_path: None,
    })
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(e.contains("wrong.key") && e.contains("relay.crt"), "{e}");

    config.tls.key_file = Some(key);
    let lab = start_relay(config).await;
    let (_w, _eng, s) = echo_worker_and_engineer(&lab).await;
    let data = random_bytes(64 << 10);
    assert!(echo_through(&s, "w", &data).await == data);
    // The relay presented the operator's certificate, not a self-signed one.
    let chain = s.connection().peer_certificates();
    assert!(!chain.is_empty(), "no peer certificate");
    assert_eq!(chain[0].as_ref(), op.cert.der().as_ref());
    assert!(!lab.dir.path().join("cert.der").exists());
}

/// A node logged in with a token of `tag` (no services): its session and key.
async fn node_session(
    lab: &RelayLab,
    tag: &str,
    name: &str,
) -> (client::Session, PublicKey, tempfile::TempDir) {
    let dir = tmp();
    let tok = lab.token(tag, None, Some(1));
    client::login(dir.path(), &tok, name)
        .await
        .unwrap_or_else(|e| panic!("login {name}: {e}"));
    let key = client::ClientState::open(dir.path())
        .unwrap_or_else(|e| panic!("{e}"))
        .public_key();
    let s = client::session(dir.path())
        .await
        .unwrap_or_else(|e| panic!("session {name}: {e}"));
    (s, key, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_path_carries_datagrams_between_allowed_nodes_only() {
    let _turn = weft_tests::turn::take(module_path!());
    use tunnel_relay::relay_path::RelayPath;
    let lab = start_relay(RelayConfig::default()).await;
    let (e, ek, _ed) = node_session(&lab, "engineer", "e").await;
    let (w1, w1k, _w1d) = node_session(&lab, "worker", "w1").await;
    let (w2, w2k, _w2d) = node_session(&lab, "worker", "w2").await;
    let (pe, pw1, pw2) = (
        RelayPath::new(e.connection().clone()),
        RelayPath::new(w1.connection().clone()),
        RelayPath::new(w2.connection().clone()),
    );
    let max = pe.max_packet().unwrap_or_else(|| panic!("datagrams off"));
    assert!(max >= 1100, "only {max} bytes per relayed packet");

    // Engineer -> worker: every packet that arrives is intact and from the engineer's key.
    let packets: Vec<Vec<u8>> = (0..100).map(|_| random_bytes(1100)).collect();
    let recv = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Ok(Ok((from, p))) =
            tokio::time::timeout(Duration::from_millis(1000), pw1.recv()).await
        {
            got.push((from, p.to_vec()));
            if got.len() == 100 {
                break;
            }
        }
        (pw1, got)
    });
    for p in &packets {
        pe.send(&w1k, p).unwrap_or_else(|e| panic!("send: {e}"));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let (pw1, got) = recv.await.unwrap_or_else(|e| panic!("{e}"));
    assert!(got.len() >= 90, "{} of 100 packets arrived", got.len());
    for (from, p) in &got {
        assert_eq!(*from, ek);
        assert!(packets.contains(p), "a packet arrived altered");
    }

    // Replies flow back (the worker may not open tunnels, but may answer).
    relay_path_delivers(
        (&pw1, w1k),
        (&pe, ek),
        b"reply",
        "no reply through the relay",
    )
    .await;

    // Worker -> worker is dropped by the relay; unknown keys too.
    pw1.send(&w2k, b"lateral").unwrap_or_else(|e| panic!("{e}"));
    pw1.send(&PublicKey([7; 32]), b"nobody")
        .unwrap_or_else(|e| panic!("{e}"));
    let r = tokio::time::timeout(Duration::from_millis(500), pw2.recv()).await;
    assert!(r.is_err(), "a worker reached another worker: {r:?}");
    // ... while the engineer still reaches w2.
    relay_path_delivers(
        (&pe, ek),
        (&pw2, w2k),
        b"hi w2",
        "engineer did not reach w2",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_binding_requests_get_the_observed_address() {
    let _turn = weft_tests::turn::take(module_path!());
    use tunnel_relay::stun;
    let lab = start_relay(RelayConfig::default()).await;
    let stun_addr = lab.stun.unwrap_or_else(|| panic!("STUN is on by default"));
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let me = sock.local_addr().unwrap_or_else(|e| panic!("{e}"));
    // Garbage first: no answer, and the responder keeps serving.
    sock.send_to(b"not stun at all", stun_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let tx = [9u8; 12];
    sock.send_to(&stun::binding_request(tx), stun_addr)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(3), sock.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no STUN answer"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(from, stun_addr);
    let (got_tx, reflexive) =
        stun::parse_binding_response(&buf[..n]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got_tx, tx);
    assert_eq!(reflexive, me);

    // Off when configured off.
    let off = RelayConfig {
        stun: false,
        ..RelayConfig::default()
    };
    let lab2 = start_relay(off).await;
    assert!(lab2.stun.is_none());
}

/// The next datagram on `s` within 700 ms.
async fn recv_within(s: &tokio::net::UdpSocket) -> Option<Vec<u8>> {
    let mut b = vec![0u8; 2048];
    match tokio::time::timeout(Duration::from_millis(700), s.recv_from(&mut b)).await {
        Ok(Ok((n, _))) => Some(b[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_relay_path_forwards_bound_nodes_by_policy_and_drops_the_rest() {
    let _turn = weft_tests::turn::take(module_path!());
    use tunnel_relay::relay_path::{
        bind_fields, bind_packet, bind_valid, fast_header, fast_slot, slot, RelayPath, FAST_ACK,
        FAST_BIND, FAST_HEADER,
    };
    let lab = start_relay(with_metrics(RelayConfig::default())).await;
    let udp_port = lab
        .stun
        .unwrap_or_else(|| panic!("the relay's UDP port is on by default"));
    let (e, ek, _ed) = node_session(&lab, "engineer", "e").await;
    let (w1, w1k, _w1d) = node_session(&lab, "worker", "w1").await;
    let (w2, w2k, _w2d) = node_session(&lab, "worker", "w2").await;
    let sock = || async {
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    };
    let (se, s1, s2, stranger) = (sock().await, sock().await, sock().await, sock().await);
    let key_of = |s: &client::Session| {
        RelayPath::new(s.connection().clone())
            .bind_key()
            .unwrap_or_else(|| panic!("no bind key"))
    };
    let (ke, k1, k2) = (key_of(&e), key_of(&w1), key_of(&w2));
    // A bind with the wrong key is ignored; the right one is acknowledged (MAC'd with the same key).
    let bad = bind_packet(FAST_BIND, &k1, slot(&ek), 1);
    se.send_to(&bad, udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        recv_within(&se).await,
        None,
        "a forged bind was acknowledged"
    );
    for (s, k, key) in [(&se, ek, ke), (&s1, w1k, k1), (&s2, w2k, k2)] {
        s.send_to(&bind_packet(FAST_BIND, &key, slot(&k), 1), udp_port)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ack = recv_within(s)
            .await
            .unwrap_or_else(|| panic!("no bind ack"));
        assert_eq!(bind_fields(FAST_ACK, &ack), Some((slot(&k), 1)));
        assert!(bind_valid(&key, &ack));
    }
    // A replayed (not newer) bind is not acknowledged again.
    se.send_to(&bind_packet(FAST_BIND, &ke, slot(&ek), 1), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        recv_within(&se).await,
        None,
        "a replayed bind was acknowledged"
    );
    // A second connection of the same node (a worker agent holds two: tunnels and the mesh)
    // does not take the first one's bind key away, and brings its own.
    let _e2 = client::session(_ed.path())
        .await
        .unwrap_or_else(|e| panic!("second session: {e}"));
    let ke2 = key_of(&_e2);
    for (counter, key) in [(2, ke), (3, ke2)] {
        se.send_to(&bind_packet(FAST_BIND, &key, slot(&ek), counter), udp_port)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let ack = recv_within(&se)
            .await
            .unwrap_or_else(|| panic!("bind {counter} not acknowledged"));
        assert!(bind_valid(&key, &ack));
        // Past the relay's ack rate limit.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    let packet = |dst: &PublicKey, body: &[u8]| {
        let mut p = fast_header(slot(dst)).to_vec();
        p.extend_from_slice(body);
        p
    };
    // Engineer -> worker arrives with the engineer's slot and the body intact.
    let body = random_bytes(1200);
    se.send_to(&packet(&w1k, &body), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = recv_within(&s1)
        .await
        .unwrap_or_else(|| panic!("not forwarded"));
    assert_eq!(fast_slot(&got), Some(slot(&ek)));
    assert!(got[FAST_HEADER..] == body[..], "body changed");
    // Worker -> worker is not allowed; an unbound sender is dropped.
    s1.send_to(&packet(&w2k, b"lateral"), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    stranger
        .send_to(&packet(&w2k, b"who am i"), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(recv_within(&s2).await, None, "w2 got a packet it must not");
    // The engineer still reaches w2; the worker answers the engineer.
    se.send_to(&packet(&w2k, b"hi w2"), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = recv_within(&s2)
        .await
        .unwrap_or_else(|| panic!("w2 not reached"));
    assert_eq!(&got[FAST_HEADER..], b"hi w2");
    s2.send_to(&packet(&ek, b"reply"), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let got = recv_within(&se).await.unwrap_or_else(|| panic!("no reply"));
    assert_eq!(
        (fast_slot(&got), &got[FAST_HEADER..]),
        (Some(slot(&w2k)), &b"reply"[..])
    );

    let text = scrape(lab.metrics.unwrap_or_else(|| panic!("metrics"))).await;
    assert_eq!(
        sample(&text, "weft_relay_fast_relayed_total"),
        3.0,
        "{text}"
    );
    assert!(
        sample(&text, "weft_relay_datagrams_dropped_total") >= 4.0,
        "{text}"
    );
    // A closed connection's binding goes with it.
    drop(w1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    se.send_to(&packet(&w1k, b"gone"), udp_port)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        recv_within(&s1).await,
        None,
        "forwarded to a node that left"
    );
}
