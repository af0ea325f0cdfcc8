//! The in-process relay lab shared by the loopback tests (`mod relay_lab;`):
//! a real relay (`Relay::bind` + `Relay::run`) on 127.0.0.1 with its state in
//! a temporary directory, join tokens from its registry, its `/metrics`, and
//! a TCP echo service for workers to expose. The weft CLI's test
//! (`cli/tests/cli.rs`) includes this file too, so it uses only what both
//! crates' tests have: tokio, tempfile and the relay library.
// Each test file uses its own part of the lab.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tunnel_relay::registry::{unix_now, Registry};
use tunnel_relay::relay_path::RelayPath;
use tunnel_relay::{PublicKey, Relay, RelayConfig, ServeOptions, Token};

/// A relay running in this process; dropping it aborts the relay's task.
pub(crate) struct RelayLab {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) addr: SocketAddr,
    pub(crate) metrics: Option<SocketAddr>,
    pub(crate) stun: Option<SocketAddr>,
    /// The web view, when `web_listen` is set.
    pub(crate) web: Option<SocketAddr>,
    pub(crate) key: PublicKey,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

pub(crate) fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"))
}

/// A relay on `listen` with its state in `dir` (a restart when `dir` held a
/// relay's state before).
pub(crate) async fn start_relay_in(
    dir: tempfile::TempDir,
    listen: SocketAddr,
    config: RelayConfig,
) -> RelayLab {
    // A relay restarted in-process on its old port may find the previous
    // endpoint's socket still draining for a moment: retry the bind briefly.
    let t0 = Instant::now();
    let relay = loop {
        match Relay::bind(ServeOptions {
            listen,
            state_dir: dir.path().to_path_buf(),
            config: config.clone(),
            config_path: None,
        }) {
            Ok(r) => break r,
            Err(e) if t0.elapsed() > Duration::from_secs(5) => panic!("bind relay: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let addr = relay
        .local_addr()
        .unwrap_or_else(|| panic!("relay address"));
    let key = relay.public_key();
    let metrics = relay.metrics_addr();
    let stun = relay.stun_addr();
    let web = relay.web_addr();
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let _ = relay
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    RelayLab {
        dir,
        addr,
        metrics,
        stun,
        web,
        key,
        stop: Some(tx),
        task: Some(task),
    }
}

/// A fresh relay on a free loopback port.
pub(crate) async fn start_relay(config: RelayConfig) -> RelayLab {
    start_relay_in(
        tmp(),
        "127.0.0.1:0".parse().unwrap_or_else(|_| panic!()),
        config,
    )
    .await
}

impl RelayLab {
    /// A join token for `tag` (as `token create` makes it), naming this relay.
    pub(crate) fn token(&self, tag: &str, ttl: Option<Duration>, uses: Option<u64>) -> Token {
        let (secret, _id) = self
            .registry()
            .create_token(tag, ttl, uses, unix_now())
            .unwrap_or_else(|e| panic!("create token: {e}"));
        Token {
            relay_addrs: vec![self.addr.to_string()],
            relay_key: self.key,
            secret,
        }
    }

    /// Another connection to the relay's registry, as the operator's commands open it.
    pub(crate) fn registry(&self) -> Registry {
        Registry::open(self.dir.path()).unwrap_or_else(|e| panic!("registry: {e}"))
    }

    /// Graceful stop (announces a restart to clients); returns the state dir.
    pub(crate) async fn stop(mut self) -> tempfile::TempDir {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        std::mem::replace(&mut self.dir, tmp())
    }
}

impl Drop for RelayLab {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// `config` with `/metrics` served on a free loopback port (see `RelayLab::metrics`).
pub(crate) fn with_metrics(config: RelayConfig) -> RelayConfig {
    RelayConfig {
        metrics_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|_| panic!())),
        ..config
    }
}

/// `GET /metrics` over a plain TCP connection; the whole response.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("metrics connect: {e}"));
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    out
}

/// The value of the sample whose line starts with `series ` (0 if absent).
pub(crate) fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// TCP echo until EOF, then FIN.
pub(crate) async fn echo_service() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("bind echo: {e}"));
    let addr = l.local_addr().unwrap_or_else(|e| panic!("{e}"));
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `data` over the relay path `from` (of the node with key `from.1`) to
/// the node `to.1`; asserts it arrives on `to.0` within 3 s, intact and from
/// `from.1` (panics with `lost` if nothing arrives).
pub(crate) async fn relay_path_delivers(
    from: (&RelayPath, PublicKey),
    to: (&RelayPath, PublicKey),
    data: &[u8],
    lost: &str,
) {
    from.0
        .send(&to.1, data)
        .unwrap_or_else(|e| panic!("send: {e}"));
    let (sender, p) = tokio::time::timeout(Duration::from_secs(3), to.0.recv())
        .await
        .unwrap_or_else(|_| panic!("{lost}"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((sender, &p[..]), (from.1, data));
}
