//! The web view's benchmark (issue 15; ignored, run by `tests/bench/explorer`): a relay whose
//! store holds 10,000 registered nodes, 10,000 pool workers (2 GPUs each) and 100,000 signed
//! usage records, with its web view on loopback; an operator logged in with `weft web`'s link.
//! Measured: time to the first byte of `/api/v1/nodes` (a page of 100 and all 10,000) and of the
//! Devices page (p50/p99 of 200 requests each), the Devices page's transferred size with its
//! assets, and the relay's CPU per live-update poll (the page asks every 2 s). Prints the table
//! BENCHMARKS.md records; asserts only that everything answered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rusqlite::params;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_relay::pool_store::PoolStore;
use tunnel_relay::registry::{unix_now, Registry};
use tunnel_relay::{PublicKey, RelayConfig};
use weft_proto::pool::{GpuInfo, Inventory, UsageRecord, WorkerView};
use weft_proto::usage::{SignedUsage, Signer};

use crate::relay_lab::{start_relay_in, tmp};

const NODES: usize = 10_000;
const RECORDS: usize = 100_000;
const REQUESTS: usize = 200;

/// One request; (time to the first byte of the answer, whole answer's bytes, status).
async fn get(web: SocketAddr, path: &str, cookie: &str, extra: &str) -> (Duration, usize, u16) {
    let mut s = crate::web::tls_to(web).await;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nCookie: weft_session={cookie}\r\n{extra}\r\n"
    );
    let t0 = Instant::now();
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut first = [0u8; 1];
    s.read_exact(&mut first)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let ttfb = t0.elapsed();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    let text = String::from_utf8_lossy(&rest);
    let code = text
        .get(8..12)
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len());
    (ttfb, body, code)
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process (the relay runs in it), in clock ticks (100 Hz).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / 100.0
}

/// 10,000 nodes admitted, 10,000 pool workers, 100,000 usage records, in `dir`.
fn seed(dir: &std::path::Path) {
    let t0 = Instant::now();
    let mut reg = Registry::open(dir).unwrap_or_else(|e| panic!("{e}"));
    let (secret, _) = reg
        .create_token("worker", None, Some(NODES as u64), unix_now())
        .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..NODES {
        let mut k = [0u8; 32];
        k[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
        let r = reg
            .admit(
                &PublicKey(k),
                &format!("gpu{i:05}"),
                Some(&secret),
                unix_now(),
                tunnel_relay::records::Approval::Off,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(r.is_ok(), "{r:?}");
    }
    let pool = PoolStore::open(dir).unwrap_or_else(|e| panic!("{e}"));
    for i in 0..NODES {
        let gpus = (0..2)
            .map(|g| GpuInfo {
                uuid: format!("GPU-{i:05}-{g}"),
                model: if i % 3 == 0 {
                    "NVIDIA H100 80GB HBM3"
                } else {
                    "NVIDIA GeForce RTX 4090"
                }
                .into(),
                memory_mib: 81_559,
                health: "healthy".into(),
                job: None,
            })
            .collect();
        pool.save_worker(&WorkerView {
            name: format!("gpu{i:05}"),
            state: "ready".into(),
            inventory: Inventory {
                gpus,
                cpus: 64,
                memory_bytes: 1 << 40,
                version: "0.1.0".into(),
                simulated: true,
                running: vec![],
                ray: None,
                ray_heads: vec![],
                usage_key: None,
            },
            holders: vec![None, None],
            flagged: vec![],
            first_seen_ms: 1,
            connected_since_ms: None,
            last_seen_ms: 2,
            uptime_ms: 3,
            usage_keys: vec![],
        })
        .unwrap_or_else(|e| panic!("{e}"));
    }
    drop(pool);
    // The records straight into the table, in one transaction (as the relay would have stored
    // them one by one: numbered, countersigned).
    let key = Signer::from_seed(&[3; 32]);
    let mut db =
        rusqlite::Connection::open(dir.join("registry.sqlite")).unwrap_or_else(|e| panic!("{e}"));
    let tx = db.transaction().unwrap_or_else(|e| panic!("{e}"));
    for i in 0..RECORDS {
        let end = 1_790_000_000_000 + i as u64 * 1000;
        let rec = UsageRecord {
            job: i as u64 + 1,
            attempt: 1,
            rank: 0,
            engineer: format!("eng{}", i % 50),
            worker: format!("gpu{:05}", i % NODES),
            gpu_model: "NVIDIA H100 80GB HBM3".into(),
            gpus: vec![format!("GPU-{:05}-0", i % NODES)],
            start_ms: Some(end - 600_000),
            end_ms: end,
            gpu_seconds: 600.0,
            outcome: "succeeded".into(),
            exit_code: Some(0),
        };
        let s = SignedUsage::countersign(
            i as u64 + 1,
            end,
            "bench",
            rec.clone(),
            Err("seeded".into()),
            &key,
        );
        tx.execute(
            "INSERT INTO pool_usage (job, attempt, worker, end_ms, record, seq, stored_ms)
             VALUES (?1, 1, ?2, ?3, ?4, ?5, ?6)",
            params![
                rec.job as i64,
                rec.worker,
                end as i64,
                serde_json::to_string(&s).unwrap_or_default(),
                i as i64 + 1,
                end as i64
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    tx.commit().unwrap_or_else(|e| panic!("{e}"));
    println!(
        "seeded {NODES} nodes, {NODES} workers, {RECORDS} usage records in {:.1?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: tests/bench/explorer"]
async fn explorer_bench() {
    let _turn = weft_tests::turn::take(module_path!());
    let dir = tmp();
    // The relay's own tables first (it creates them at its first start), then the seed.
    drop(PoolStore::open(dir.path()).unwrap_or_else(|e| panic!("{e}")));
    seed(dir.path());
    let cfg = RelayConfig {
        web_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|_| panic!())),
        ..RelayConfig::default()
    };
    let lab = start_relay_in(dir, "127.0.0.1:0".parse().unwrap_or_else(|_| panic!()), cfg).await;
    let web = lab.web.unwrap_or_else(|| panic!("web view"));
    let ops = crate::pool_feed::identity(&lab, "operator", "ops").await;
    let s = tunnel_relay::client::session(ops.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (url, _) = s.web_link().await.unwrap_or_else(|e| panic!("{e}"));
    s.close().await;
    let path = &url[url.find("/login").unwrap_or(0)..];
    let mut c = crate::web::tls_to(web).await;
    c.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let mut raw = Vec::new();
    let _ = c.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    let cookie = text
        .split("weft_session=")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no cookie: {text}"))
        .to_string();

    if std::env::var_os("EXPLORER_PROFILE").is_some() {
        // Only live updates, for a profiler: `perf record -D <after the seed>`.
        eprintln!("profiling: live updates for 10 s");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10) {
            let _ = get(web, "/devices", &cookie, "X-Weft-Live: 1\r\n").await;
        }
        return;
    }
    println!("| measure ({NODES} nodes, {RECORDS} usage records) | p50 | p99 | bytes |");
    println!("|---|---|---|---|");
    for (label, path, extra) in [
        (
            "`/api/v1/nodes?limit=100` first byte",
            "/api/v1/nodes?limit=100",
            "",
        ),
        (
            "`/api/v1/nodes?limit=10000` first byte",
            "/api/v1/nodes?limit=10000",
            "",
        ),
        ("Devices page (1 of 200) first byte", "/devices", ""),
        (
            "Devices live update (`X-Weft-Live`) first byte",
            "/devices",
            "X-Weft-Live: 1\r\n",
        ),
        ("Earnings page first byte", "/earnings", ""),
    ] {
        let mut t = Vec::new();
        let mut size = 0;
        let n = if path.contains("10000") || path == "/earnings" {
            REQUESTS / 10
        } else {
            REQUESTS
        };
        for _ in 0..n {
            let (d, b, code) = get(web, path, &cookie, extra).await;
            assert_eq!(code, 200, "{path}");
            t.push(d);
            size = b;
        }
        println!(
            "| {label} | {:.1} ms | {:.1} ms | {size} |",
            pct(&mut t, 0.5).as_secs_f64() * 1e3,
            pct(&mut t, 0.99).as_secs_f64() * 1e3
        );
    }
    let page = get(web, "/devices", &cookie, "").await.1
        + get(web, "/assets/weft.css", &cookie, "").await.1
        + get(web, "/assets/live.js", &cookie, "").await.1;
    println!("| Devices page transferred (HTML + CSS + JS) | | | {page} |");
    // The live update: one browser polling every 2 s on its kept-alive connection, sending the
    // version it shows; nothing changes, so the relay answers 304 without building anything.
    // The page is still built again once a minute (relative times): that cost is added.
    let mut conn = KeepAlive::open(web).await;
    let (code, tag, rebuilt) = conn.get("/devices", &cookie, "X-Weft-Live: 1\r\n").await;
    assert_eq!(code, 200);
    let tag = tag.unwrap_or_else(|| panic!("no ETag"));
    let inm = format!("X-Weft-Live: 1\r\nIf-None-Match: {tag}\r\n");
    let polls = 5000;
    let c0 = cpu_seconds();
    let t0 = Instant::now();
    let mut unchanged = 0;
    for _ in 0..polls {
        let (code, _, _) = conn.get("/devices", &cookie, &inm).await;
        unchanged += usize::from(code == 304);
    }
    let per_poll = (cpu_seconds() - c0) / f64::from(polls);
    let wall = t0.elapsed() / polls;
    assert!(
        unchanged >= polls as usize - 1,
        "{unchanged} of {polls} were 304"
    );
    let c1 = cpu_seconds();
    let rebuilds = 10;
    for _ in 0..rebuilds {
        let _ = conn.get("/devices", &cookie, "X-Weft-Live: 1\r\n").await;
    }
    let per_build = (cpu_seconds() - c1) / f64::from(rebuilds);
    println!(
        "| live update, nothing changed (304, kept-alive connection): CPU per poll (relay + client) | {:.3} ms | {:.3} ms wall | {rebuilt} B once |",
        per_poll * 1e3,
        wall.as_secs_f64() * 1e3
    );
    println!(
        "| live update: CPU of a rebuild (something changed, or once a minute) | {:.1} ms | | |",
        per_build * 1e3
    );
    println!(
        "| one live stream when nothing changes (a poll every 2 s + a rebuild a minute): share of a core | {:.3}% | | |",
        (per_poll / 2.0 + per_build / 60.0) * 100.0
    );
}

/// One kept-alive HTTPS connection, as a browser polls on.
struct KeepAlive {
    s: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
}

impl KeepAlive {
    async fn open(web: SocketAddr) -> KeepAlive {
        KeepAlive {
            s: crate::web::tls_to(web).await,
        }
    }

    /// One request: (status, ETag, body bytes).
    async fn get(&mut self, path: &str, cookie: &str, extra: &str) -> (u16, Option<String>, usize) {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nCookie: weft_session={cookie}\r\n{extra}\r\n"
        );
        self.s
            .write_all(req.as_bytes())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            self.s
                .read_exact(&mut b)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            head.push(b[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let code = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
        let field = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
            })
        };
        let len: usize = field("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.s
            .read_exact(&mut body)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        (code, field("etag"), len)
    }
}
