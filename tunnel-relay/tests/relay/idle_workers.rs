//! Relay memory with 1,000 idle workers connected (the target:
//! ≤ 64 MiB RSS). The relay is the real binary in its own process; the
//! workers are 1,000 sessions of the client library in this process.

use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use tunnel_relay::client::{self, ClientState, ClientTiming};
use tunnel_relay::registry::{unix_now, Registry};
use tunnel_relay::{StaticKey, Token};
use weft_tests::Proc;

const BIN: &str = env!("CARGO_BIN_EXE_tunnel-relay");
const WORKERS: usize = 1000;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_idle_workers_fit_in_64_mib() {
    let _turn = weft_tests::turn::take(module_path!());
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let state = tmp.path().join("relay");
    let cfg = tmp.path().join("relay.toml");
    std::fs::write(&cfg, "[limits]\nnew_connections_per_ip_per_sec = 100000\n")
        .unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = Command::new(BIN);
    cmd.env("WEFT_LOG", "warn")
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(&state)
        .arg("--config")
        .arg(&cfg);
    let relay = Proc::spawn("relay", cmd, &tmp.path().join("relay.log"));
    let t0 = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(state.join("listen.addr")) {
            break a.trim().to_string();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "relay: {}",
            relay.log_tail(10)
        );
        sleep(Duration::from_millis(20));
    };
    let key =
        StaticKey::load_or_create(&state.join("identity.key")).unwrap_or_else(|e| panic!("{e}"));
    let (secret, _) = Registry::open(&state)
        .and_then(|mut r| r.create_token("worker", None, None, unix_now()))
        .unwrap_or_else(|e| panic!("{e}"));
    let token = Token {
        relay_addrs: vec![addr],
        relay_key: key.public(),
        secret,
    };
    let base = rss_kib(relay.pid());

    let mut sessions = Vec::with_capacity(WORKERS);
    for chunk in 0..WORKERS / 50 {
        let mut batch = Vec::new();
        for i in 0..50 {
            let n = chunk * 50 + i;
            let dir = tmp.path().join(format!("w{n}"));
            let token = token.clone();
            batch.push(tokio::spawn(async move {
                let mut st = ClientState::open(&dir).unwrap_or_else(|e| panic!("{e}"));
                client::connect(
                    &mut st,
                    Some(&token),
                    &format!("w{n}"),
                    vec!["ssh".into()],
                    &ClientTiming::worker(),
                )
                .await
            }));
        }
        for b in batch {
            let s = b
                .await
                .unwrap_or_else(|e| panic!("{e}"))
                .unwrap_or_else(|e| panic!("worker connect: {e}"));
            sessions.push(s);
        }
    }
    // Idle for a few keepalive rounds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let alive = sessions
        .iter()
        .filter(|s| s.connection().close_reason().is_none())
        .count();
    let rss = rss_kib(relay.pid());
    eprintln!(
        "relay RSS: {} KiB at start, {} KiB with {alive} idle workers ({} KiB per worker)",
        base,
        rss,
        rss.saturating_sub(base) / WORKERS as u64
    );
    assert_eq!(alive, WORKERS, "every worker stays connected");
    assert!(
        rss <= 64 * 1024,
        "relay RSS {rss} KiB with {WORKERS} idle workers exceeds 64 MiB"
    );
}
