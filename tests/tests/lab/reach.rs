//! Reaching the relay from networks that block UDP (issue 13, TCP/TLS fallback), in network
//! namespaces with real OpenSSH, curl and HAProxy.
//!
//! The lab: the relay on the simulated internet (203.0.113.2:4433, QUIC on UDP and TLS on TCP,
//! metrics on its loopback); a worker behind an easy-NAT home router whose UDP is blocked
//! ([`Router::block_udp`]: every forwarded UDP packet dropped except DNS), running `sshd` and
//! `tunnel-relay expose`; engineers behind a second UDP-blocked router using
//! `ssh -o ProxyCommand='weft connect %h %p'`.
//!
//! What users rely on:
//! - the block itself: UDP (established flows too) is dropped, DNS, TCP and ICMP pass, and it
//!   lifts at runtime (`udp_block_drops_udp_but_passes_dns_tcp_and_icmp`, no Weft binary);
//! - with UDP blocked, nobody configures anything: the worker and the engineer reach the relay
//!   over TCP/TLS (their logs say `relay session up … transport=tcp`, the relay counts them in
//!   `weft_relay_transport_connections_total{transport="tcp"}` and none on quic); ssh runs a
//!   command on the worker and scp carries 64 MiB each way intact; `WEFT_RELAY_TRANSPORT=quic`
//!   does not fall back;
//! - bad input on the relay's TCP port while a tunnel is carrying data (plain HTTP without TLS, a
//!   truncated ClientHello, random bytes, TLS without HTTP, an Upgrade to something else, a
//!   connection that never speaks, random bytes after a successful `Upgrade: weft/1`, and 10,000
//!   idle connections from 200 addresses held until the relay closes them) is refused and counted
//!   by cause (`weft_relay_tcp_refused_total{cause="tls"|"http"|"framing"|"timeout"|"busy"}`: every
//!   idle connection is counted, those beyond `limits.max_pending_tcp_connections` at once as
//!   `busy`); the relay keeps accepting through the flood, the transfer arrives intact and the
//!   relay keeps admitting; `GET /` answers 200 with a page and `GET /weft/probe` 204, as a load
//!   balancer's health check expects;
//! - once the engineer's network lets UDP out again, a fresh engineer is on QUIC (the quic
//!   counter grows) while the worker is still on TCP, and `WEFT_RELAY_TRANSPORT=tcp` still
//!   forces TCP;
//! - behind Debian's HAProxy in `mode tcp` routing by SNI (`weft-relay` to the relay's TCP port,
//!   any other name to a web site on the same :443), an engineer whose token names HAProxy's
//!   address and who forces `WEFT_RELAY_TRANSPORT=tcp` logs in and ssh-es to the worker
//!   (`haproxy_routes_the_relays_sni_to_the_relay`), with the documented configuration
//!   `deploy/examples/haproxy-relay.cfg`;
//! - a managed mesh node (`mesh up --token`) behind a UDP-blocked router is reached by an
//!   engineer's node on the open internet through the relay, by its MagicDNS name (ping, ssh):
//!   `mesh status` on the blocked node shows its relay link on `tcp` and the engineer on
//!   `relay tcp`, the engineer's shows its own link on `quic` and the peer on `relay udp` (the fast channel), and
//!   `weft status` says the same; when the block lifts, both go direct within 10 s while a ping
//!   and an interactive ssh session run on through the switch
//!   (`mesh_node_behind_a_udp_block_is_relayed_over_tcp_then_goes_direct`);
//! - when UDP is cut under a worker on QUIC, it comes back over TCP by itself (its QUIC
//!   connection ends at its 4 s idle timeout, the reconnect's race lands on TCP) and new ssh
//!   sessions work; an ssh session open at the cut does not survive (its tunnel ends with the old
//!   connection) and must reconnect; when UDP comes back the worker moves back to QUIC by itself
//!   (it retries every 2 s here, `WEFT_QUIC_RETRY`) while an interactive ssh session open over
//!   TCP keeps echoing every line: the relay keeps the old connection until that session ends,
//!   then it closes; new sessions work throughout
//!   (`udp_cut_mid_session_moves_the_worker_to_tcp_and_ssh_reconnects`, which prints the times).
//!
//! No timing assertions: every wait polls, generously.
//!
//! Binaries come from `target/release` (or `$WEFT_BIN_DIR`): `cargo build --release --bins`.
//! Needs the Debian packages `openssh-server openssh-client socat curl haproxy openssl iputils-ping
//! python3`.

use std::io::Write;
use std::process::Stdio;
use std::sync::mpsc;
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::Value;
use weft_tests::managed::{relay_bin, LabRelay, ManagedNode, NetnsResolver, RELAY_ADDR, RELAY_IP};
use weft_tests::router::Router;
use weft_tests::ssh::start_sshd;
use weft_tests::traffic::{self, GapMonitor};
use weft_tests::{retry, Internet, Nat, Netns, Proc};

/// The relay's metrics listener (inside its namespace).
const METRICS: &str = "127.0.0.1:9464";
/// The relay configuration: metrics on; defaults otherwise (engineers reach workers' `ssh`).
const RELAY_TOML: &str = "metrics_listen = \"127.0.0.1:9464\"\n";
/// The TLS server name Weft's clients send (what HAProxy routes on).
const RELAY_SNI: &str = "weft-relay";
/// The worker's name on the relay.
const WORKER: &str = "w1";

const CONNS: &str = "weft_relay_transport_connections_total";
const REFUSED: &str = "weft_relay_tcp_refused_total";

/// Idle TCP connections mallory opens to the relay, and the addresses it opens them from (the
/// per-IP rate limit lets the first 20 from each new address through at once, 20 a second after).
const IDLE_SOCKETS: usize = 10_000;
const FLOOD_ADDRS: usize = 200;

/// `python3 - HOST PORT SNI`: TLS (ALPN http/1.1, any certificate) and `GET /weft/v1` with
/// `Upgrade: weft/1`; prints the status line it got, then sends 64 KiB of random bytes instead
/// of frames and prints how the connection ended.
const UPGRADE_THEN_GARBAGE_PY: &str = r#"
import os, socket, ssl, sys
host, port, sni = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.set_alpn_protocols(["http/1.1"])
s = ctx.wrap_socket(socket.create_connection((host, port), timeout=30), server_hostname=sni)
s.sendall(("GET /weft/v1 HTTP/1.1\r\nHost: %s\r\nConnection: Upgrade\r\n"
           "Upgrade: weft/1\r\nUser-Agent: mallory\r\n\r\n" % sni).encode())
head = b""
while not head.endswith(b"\r\n\r\n"):
    c = s.recv(1)
    if not c:
        break
    head += c
print("status:", head.split(b"\r\n")[0].decode(errors="replace"), flush=True)
try:
    for _ in range(16):
        s.sendall(os.urandom(4096))
except OSError as e:
    print("send ended:", e, flush=True)
try:
    while s.recv(65536):
        pass
    print("closed by the relay (eof)")
except TimeoutError:
    print("still open after 30 s")
except OSError as e:
    print("closed by the relay:", e)
"#;

/// `python3 - HOST PORT TOTAL HOLD_S SRC,SRC,...`: opens TOTAL TCP connections to HOST:PORT, one
/// from each source address in turn (a round at a time, each round's handshakes awaited), and
/// never sends a byte. Prints `open N failed M ...` once they are open, keeps them HOLD_S seconds,
/// then waits (at most 180 s) until the relay has closed every one, and prints a JSON summary.
const IDLE_FLOOD_PY: &str = r#"
import json, resource, select, socket, sys, time
host, port, total, hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
srcs = sys.argv[5].split(",")
need = total + 256
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < need:
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, max(hard, need)))
socks, opened, failed = [], [], 0
t0 = time.monotonic()
while len(socks) < total:
    batch = {}
    for src in srcs[: total - len(socks)]:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.bind((src, 0))
        s.connect_ex((host, port))
        socks.append(s)
        batch[s.fileno()] = s
    p = select.poll()
    for fd in batch:
        p.register(fd, select.POLLOUT)
    deadline = time.monotonic() + 30
    while batch and time.monotonic() < deadline:
        for fd, _ in p.poll(1000):
            s = batch.pop(fd, None)
            if s is None:
                continue
            p.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                opened.append(s)
            else:
                failed += 1
    failed += len(batch)
    time.sleep(0.005)
print("open %d failed %d in %.1f s" % (len(opened), failed, time.monotonic() - t0), flush=True)
time.sleep(hold)
p = select.poll()
live = {}
for s in opened:
    p.register(s.fileno(), select.POLLIN | select.POLLRDHUP)
    live[s.fileno()] = s
deadline = time.monotonic() + 180
while live and time.monotonic() < deadline:
    for fd, _ in p.poll(1000):
        if live.pop(fd, None) is not None:
            p.unregister(fd)
print(json.dumps({"open": len(opened), "failed": failed, "closed_by_relay": len(opened) - len(live),
                  "still_open": len(live), "seconds": round(time.monotonic() - t0, 1)}), flush=True)
"#;

fn weft_bin() -> String {
    weft_tests::bin("weft").display().to_string()
}

/// [`retry`] that panics with `what` and the last thing seen.
fn until<T>(within: Duration, what: &str, f: impl FnMut() -> Result<T, String>) -> T {
    retry(within, f).unwrap_or_else(|last| panic!("{what}: not within {within:?}; last: {last}"))
}

/// stdout of an [`std::process::Output`], lossily.
fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The SHA-256 of `path` (hex), computed inside `ns`.
fn sha256(ns: &Netns, path: &str) -> String {
    ns.exec(&format!("sha256sum {path}"))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A one-use token with `tag`, valid 10 minutes, that sends its holder to `addr`.
fn token(relay: &LabRelay, tag: &str, addr: &str) -> String {
    let t = relay
        .ns
        .exec(&format!(
            "{} token create --state-dir {} --tag {tag} --uses 1 --ttl 10m --relay-addr {addr}",
            relay_bin(),
            relay.state
        ))
        .trim()
        .to_string();
    assert!(t.starts_with("wft1_"), "token: {t}");
    t
}

/// The relay's `/metrics` text (empty if it did not answer).
fn metrics(relay: &LabRelay) -> String {
    stdout(
        &relay
            .ns
            .output(&format!("curl -s --max-time 10 http://{METRICS}/metrics")),
    )
}

/// The sum of the samples of `name` whose labels contain `label` (`""`: all of them); 0 if none.
fn sample(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let series = words.next()?;
            let value: f64 = words.next()?.parse().ok()?;
            let (n, labels) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.contains(label)).then_some(value)
        })
        .sum()
}

/// `weft_relay_transport_connections_total{transport=T}`.
fn admitted(relay: &LabRelay, transport: &str) -> f64 {
    sample(
        &metrics(relay),
        CONNS,
        &format!("transport=\"{transport}\""),
    )
}

/// The lab every scenario here starts from (see the module doc).
struct Lab {
    /// `tunnel-relay expose` on the worker (fields drop in order: processes first).
    expose: Proc,
    _sshd: Proc,
    relay: LabRelay,
    /// The worker, behind `wrouter`.
    worker: Netns,
    worker_ip: String,
    /// The engineers' namespace, behind `erouter` (or on the internet, in [`Lab::open`]).
    eng: Netns,
    /// The worker's router: easy NAT, UDP blocked (open in [`Lab::open`]).
    wrouter: Router,
    /// The engineers' router: easy NAT, UDP blocked (none in [`Lab::open`]).
    erouter: Option<Router>,
    /// Dropped last: the hosts go before the internet they are plugged into.
    net: Internet,
}

impl Lab {
    /// The lab of the module doc: both routers block UDP from the start.
    fn new(tag: &str) -> Lab {
        Lab::start(tag, true)
    }

    /// The same relay and worker, with nothing blocked yet: the worker's router lets UDP
    /// through (until [`Router::block_udp`]) and the engineers sit on the internet
    /// (198.51.100.5), without a router.
    fn open(tag: &str) -> Lab {
        Lab::start(tag, false)
    }

    fn start(tag: &str, blocked: bool) -> Lab {
        let net = Internet::new(tag);
        let relay = LabRelay::start_with_config(&net, tag, Some(RELAY_TOML));
        assert!(
            relay.ns.wait_listen('t', 4433, Duration::from_secs(10)),
            "the relay does not listen on TCP {RELAY_ADDR} beside QUIC:\n{}",
            relay.proc.log_tail(20)
        );
        until(Duration::from_secs(10), "relay metrics", || {
            let m = metrics(&relay);
            if m.contains("weft_relay_") {
                Ok(())
            } else {
                Err(m)
            }
        });

        let wrouter = Router::new(
            &net,
            &format!("{tag}-w"),
            Nat::Easy,
            "203.0.113.10/24",
            "192.0.2.32/27",
        );
        if blocked {
            wrouter.block_udp();
        }
        let worker = Netns::new(&format!("{tag}-wk"));
        let worker_ip = wrouter.attach(&worker, "eth0");
        let (eng, erouter) = if blocked {
            let erouter = Router::new(
                &net,
                &format!("{tag}-e"),
                Nat::Easy,
                "198.51.100.20/24",
                "192.0.2.64/27",
            );
            erouter.block_udp();
            let eng = Netns::new(&format!("{tag}-eng"));
            erouter.attach(&eng, "eth0");
            (eng, Some(erouter))
        } else {
            (net.host(&format!("{tag}-eng"), "198.51.100.5"), None)
        };

        let sshd = start_sshd(&worker, "127.0.0.1");
        let wtoken = token(&relay, "worker", RELAY_ADDR);
        let wstate = worker.file("state").display().to_string();
        let expose = worker.spawn_named(
            "expose",
            &format!(
                "env WEFT_LOG=info,tunnel_relay=debug WEFT_QUIC_RETRY=2s {} expose --token {wtoken} --state-dir {wstate} \
                 --name {WORKER} --service ssh=127.0.0.1:22",
                relay_bin()
            ),
        );
        Lab {
            expose,
            _sshd: sshd,
            relay,
            worker,
            worker_ip,
            eng,
            wrouter,
            erouter,
            net,
        }
    }

    /// The key pair sshd authorizes (on the shared filesystem).
    fn key(&self) -> String {
        self.worker.file("id").display().to_string()
    }

    /// The relay's log and the worker's, for panic messages.
    fn logs(&self) -> String {
        format!(
            "relay:\n{}\nexpose:\n{}",
            self.relay.proc.log_tail(25),
            self.expose.log_tail(15)
        )
    }

    /// Waits until the worker's expose log says its relay session is up over `transport`.
    fn wait_worker_session(&self, transport: &str) {
        until(
            Duration::from_secs(60),
            &format!("worker's relay session up over {transport}"),
            || {
                let log = self.expose.log();
                let up = log.lines().any(|l| {
                    l.contains("relay session up") && l.contains(&format!("transport={transport}"))
                });
                if up {
                    Ok(())
                } else {
                    Err(self.logs())
                }
            },
        );
    }

    /// The transport of each `relay session up` in the worker's expose log, oldest first.
    fn worker_sessions(&self) -> Vec<String> {
        self.expose
            .log()
            .lines()
            .filter(|l| l.contains("relay session up"))
            .filter_map(|l| {
                let t = l.split("transport=").nth(1)?;
                Some(t.split_whitespace().next().unwrap_or_default().to_string())
            })
            .collect()
    }
}

/// An engineer identity (`weft login`) in the lab's engineer namespace; `env` (e.g.
/// `WEFT_RELAY_TRANSPORT=tcp`, or empty) is set for every `weft` it runs.
struct Engineer {
    ns: Netns,
    dir: String,
    env: String,
    key: String,
}

impl Engineer {
    /// `weft login --token` as `name`, through whatever relay address `token` names.
    fn login(lab: &Lab, name: &str, token: &str, env: &str) -> Engineer {
        let ns = lab.eng.clone();
        let dir = ns.file(name).display().to_string();
        let out = ns.output(&format!(
            "env {env} timeout 120 {} login --token {token} --state-dir {dir} --name {name}",
            weft_bin()
        ));
        let text = stdout(&out);
        assert!(
            out.status.success() && text.contains(name),
            "{name}: weft login failed ({}): {text}{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            lab.logs()
        );
        Engineer {
            ns,
            dir,
            env: env.to_string(),
            key: lab.key(),
        }
    }

    /// Waits until `weft ssh-config` lists the worker (each try is a fresh relay connection).
    fn wait_listed(&self, lab: &Lab) {
        until(Duration::from_secs(60), "the worker listed", || {
            let out = self.ns.output(&format!(
                "env {} timeout 60 {} ssh-config --state-dir {}",
                self.env,
                weft_bin(),
                self.dir
            ));
            let text = stdout(&out);
            if text.contains(&format!("Host {WORKER}\n")) {
                Ok(())
            } else {
                Err(format!(
                    "{text}{}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    lab.logs()
                ))
            }
        });
    }

    /// ssh/scp options: the worker's key, no host key checks, `weft connect` as ProxyCommand.
    fn ssh_opts(&self) -> String {
        format!(
            "-F /dev/null -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=60 \
             -o ServerAliveInterval=15 \
             -o ProxyCommand='env {} {} connect --state-dir {} %h %p'",
            self.key,
            self.env,
            weft_bin(),
            self.dir
        )
    }

    /// `ssh root@w1 CMD` (quoted by the caller); its output, or a panic with the lab's logs.
    fn ssh(&self, lab: &Lab, cmd: &str) -> String {
        let out = self.ns.output(&format!(
            "timeout 300 ssh {} root@{WORKER} {cmd}",
            self.ssh_opts()
        ));
        assert!(
            out.status.success(),
            "ssh {cmd} failed ({}): {}{}\n{}",
            out.status,
            stdout(&out),
            String::from_utf8_lossy(&out.stderr),
            lab.logs()
        );
        stdout(&out)
    }

    /// `scp FROM TO` (one of them `root@w1:PATH`).
    fn scp(&self, lab: &Lab, from: &str, to: &str) {
        let out = self
            .ns
            .output(&format!("timeout 600 scp {} {from} {to}", self.ssh_opts()));
        assert!(
            out.status.success(),
            "scp {from} {to} failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            lab.logs()
        );
    }

    /// What `weft connect` logs at info level when it reaches sshd once (stdin empty):
    /// its stderr and a marker if it saw sshd's banner.
    fn connect_log(&self, extra_env: &str) -> String {
        let out = self.ns.output(&format!(
            "env {} {extra_env} WEFT_LOG=info,tunnel_relay::client::session=debug timeout 60 {} connect --state-dir {} {WORKER} 22 </dev/null",
            self.env,
            weft_bin(),
            self.dir
        ));
        let banner = if stdout(&out).starts_with("SSH-2.0-") {
            "[saw the SSH banner]\n"
        } else {
            "[no SSH banner]\n"
        };
        format!("{banner}{}", String::from_utf8_lossy(&out.stderr))
    }
}

/// Whether a `weft connect` log (see [`Engineer::connect_log`]) shows a session over `transport`.
fn session_over(log: &str, transport: &str) -> bool {
    log.lines()
        .any(|l| l.contains("relay session up") && l.contains(&format!("transport={transport}")))
}

#[test]
fn udp_block_drops_udp_but_passes_dns_tcp_and_icmp() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("rub");
    let server = net.host("rub-srv", "198.51.100.50");
    let router = Router::new(&net, "rub", Nat::Easy, "203.0.113.60/24", "192.0.2.32/27");
    let host = Netns::new("rub-lan");
    router.attach(&host, "eth0");
    let mut echoes = Vec::new();
    for port in [53u16, 4433] {
        echoes.push(server.spawn_listening(
            "udp-echo",
            &format!("socat UDP4-RECVFROM:{port},bind=198.51.100.50,fork PIPE"),
            'u',
            port,
            Duration::from_secs(5),
        ));
    }
    echoes.push(server.spawn_listening(
        "tcp-echo",
        "socat TCP4-LISTEN:4433,bind=198.51.100.50,fork,reuseaddr PIPE",
        't',
        4433,
        Duration::from_secs(5),
    ));
    // One datagram out from a fixed source port (the same conntrack flow each time) and its
    // echo back.
    let udp = |port: u16| -> bool {
        let out = host.output(&format!(
            "echo hello-{port} | timeout 10 socat -t 2 - UDP4:198.51.100.50:{port},sourceport=40{port}"
        ));
        stdout(&out).contains(&format!("hello-{port}"))
    };
    let tcp = || -> bool {
        let out = host.output(
            "echo hello-tcp | timeout 10 socat -t 2 - TCP4:198.51.100.50:4433,connect-timeout=5",
        );
        stdout(&out).contains("hello-tcp")
    };
    let ping = || traffic::ping(&host, "198.51.100.50", 2, 0.2, 2).all_ok();

    until(Duration::from_secs(10), "UDP before the block", || {
        if udp(4433) && udp(53) {
            Ok(())
        } else {
            Err("no echo".into())
        }
    });
    assert!(tcp() && ping(), "TCP or ping before the block");
    assert!(!router.udp_blocked());

    router.block_udp();
    router.block_udp(); // idempotent
    assert!(router.udp_blocked());
    for _ in 0..3 {
        assert!(
            !udp(4433),
            "UDP to 4433 (a flow conntrack already knows) passed the block"
        );
    }
    assert!(udp(53), "DNS (udp 53) must pass the block");
    assert!(tcp(), "TCP must pass the block");
    assert!(ping(), "ICMP must pass the block");
    // The home firewall and NAT are still in place.
    let rules = router.ns().exec("nft list ruleset");
    assert!(
        rules.contains("masquerade") && rules.contains("ct state new drop"),
        "{rules}"
    );

    router.unblock_udp();
    router.unblock_udp(); // idempotent
    assert!(!router.udp_blocked());
    until(
        Duration::from_secs(10),
        "UDP after lifting the block",
        || {
            if udp(4433) {
                Ok(())
            } else {
                Err("no echo".into())
            }
        },
    );
    assert!(tcp() && ping(), "TCP or ping after lifting the block");
    let rules = router.ns().exec("nft list ruleset");
    assert!(
        rules.contains("masquerade") && rules.contains("ct state new drop"),
        "{rules}"
    );
}

#[test]
fn blocked_udp_falls_back_to_tls_over_tcp() {
    let _lab = weft_tests::turn::take(module_path!());
    let mut lab = Lab::new("rch");
    let (worker, eng) = (lab.worker.clone(), lab.eng.clone());
    let (wd, ed) = (
        worker.dir().display().to_string(),
        eng.dir().display().to_string(),
    );
    let erouter = lab
        .erouter
        .as_ref()
        .unwrap_or_else(|| panic!("Lab::new has an engineers' router"));
    assert!(lab.wrouter.udp_blocked() && erouter.udp_blocked());

    // Nobody configures anything: the worker and the engineer end up on TCP.
    lab.wait_worker_session("tcp");
    let alice = Engineer::login(
        &lab,
        "alice",
        &token(&lab.relay, "engineer", RELAY_ADDR),
        "",
    );
    alice.wait_listed(&lab);
    let out = alice.ssh(&lab, "'ip -4 -o addr show dev eth0; echo done'");
    assert!(
        out.contains(lab.worker_ip.as_str()) && out.contains("done"),
        "ssh output: {out}"
    );
    let log = alice.connect_log("");
    assert!(
        session_over(&log, "tcp") && log.starts_with("[saw the SSH banner]"),
        "weft connect behind the UDP block:\n{log}"
    );

    // scp 64 MiB each way, intact.
    eng.exec(&format!("head -c 64M /dev/urandom > {ed}/up.bin"));
    alice.scp(
        &lab,
        &format!("{ed}/up.bin"),
        &format!("root@{WORKER}:{wd}/up.bin"),
    );
    assert_eq!(
        sha256(&eng, &format!("{ed}/up.bin")),
        sha256(&worker, &format!("{wd}/up.bin")),
        "engineer → worker scp changed the file"
    );
    worker.exec(&format!("head -c 64M /dev/urandom > {wd}/down.bin"));
    alice.scp(
        &lab,
        &format!("root@{WORKER}:{wd}/down.bin"),
        &format!("{ed}/down.bin"),
    );
    assert_eq!(
        sha256(&worker, &format!("{wd}/down.bin")),
        sha256(&eng, &format!("{ed}/down.bin")),
        "worker → engineer scp changed the file"
    );
    for f in ["up.bin", "down.bin"] {
        let _ = std::fs::remove_file(eng.file(f));
        let _ = std::fs::remove_file(worker.file(f));
    }

    // The relay counts them on TCP (the worker, the engineer's login, ssh-config, connects),
    // and nothing on QUIC: no UDP reached it.
    let m = metrics(&lab.relay);
    let tcp = sample(&m, CONNS, "transport=\"tcp\"");
    let quic = sample(&m, CONNS, "transport=\"quic\"");
    assert!(tcp >= 2.0, "tcp admissions {tcp} < 2:\n{m}");
    assert_eq!(quic, 0.0, "quic admissions through a UDP block:\n{m}");

    // Forcing QUIC behind the block does not fall back to TCP.
    let out = eng.output(&format!(
        "env WEFT_RELAY_TRANSPORT=quic timeout 120 {} ssh-config --state-dir {}",
        weft_bin(),
        alice.dir
    ));
    assert!(
        !out.status.success() && !stdout(&out).contains(&format!("Host {WORKER}")),
        "WEFT_RELAY_TRANSPORT=quic reached the relay through a UDP block: {}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        admitted(&lab.relay, "quic"),
        0.0,
        "quic admissions through a UDP block"
    );

    // Bad input on the relay's TCP port while a tunnel carries data. The transfer is fed by
    // this test, so it is still running whatever the bad input takes.
    let mallory = lab.net.host("rch-bad", "198.51.100.66");
    let before = metrics(&lab.relay);
    let tcp_before = sample(&before, CONNS, "transport=\"tcp\"");
    eng.exec(&format!("head -c 24M /dev/urandom > {ed}/live.bin"));
    let data = std::fs::read(eng.file("live.bin")).unwrap_or_else(|e| panic!("live.bin: {e}"));
    let ssh_log = eng.file("live-ssh.log");
    let log_file = std::fs::File::create(&ssh_log).unwrap_or_else(|e| panic!("live-ssh.log: {e}"));
    let mut live = eng
        .sh(&format!(
            "exec ssh {} root@{WORKER} 'cat > {wd}/live.bin'",
            alice.ssh_opts()
        ))
        .stdin(Stdio::piped())
        .stdout(
            log_file
                .try_clone()
                .unwrap_or_else(|e| panic!("dup log: {e}")),
        )
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the live ssh: {e}"));
    let mut stdin = live
        .stdin
        .take()
        .unwrap_or_else(|| panic!("live ssh without stdin"));
    let (go, go_rx) = mpsc::channel::<()>();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        let (first, rest) = data.split_at(8 << 20);
        stdin.write_all(first)?;
        stdin.flush()?;
        // Wait for the bad input; then the rest, and EOF (stdin drops).
        let _ = go_rx.recv();
        stdin.write_all(rest)?;
        Ok(())
    });
    until(
        Duration::from_secs(120),
        "the live transfer under way",
        || {
            let got = std::fs::metadata(worker.file("live.bin")).map_or(0, |m| m.len());
            if got >= 1 << 20 {
                Ok(())
            } else {
                Err(format!(
                    "{got} bytes on the worker; ssh: {}",
                    std::fs::read_to_string(&ssh_log).unwrap_or_default()
                ))
            }
        },
    );

    // A client that connects and never says anything.
    let mut silent = mallory.spawn_named(
        "silent",
        &format!("socat -u TCP4:{RELAY_ADDR},connect-timeout=10 STDOUT"),
    );
    // Plain HTTP, no TLS.
    mallory.output(&format!(
        "printf 'GET / HTTP/1.1\\r\\nHost: {RELAY_IP}\\r\\n\\r\\n' | \
         timeout 30 socat -t 5 - TCP4:{RELAY_ADDR},connect-timeout=10"
    ));
    // A TLS ClientHello cut short (its record promises 512 bytes), then close.
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.extend((0..20).map(|_| rand::random::<u8>()));
    std::fs::write(mallory.file("hello.bin"), &hello).unwrap_or_else(|e| panic!("{e}"));
    mallory.output(&format!(
        "timeout 30 socat -u FILE:{} TCP4:{RELAY_ADDR},connect-timeout=10",
        mallory.file("hello.bin").display()
    ));
    // Random bytes, ten times.
    mallory.output(&format!(
        "for i in 1 2 3 4 5 6 7 8 9 10; do head -c 65536 /dev/urandom | \
         timeout 30 socat -t 2 - TCP4:{RELAY_ADDR},connect-timeout=10 >/dev/null 2>&1; done; true"
    ));
    // TLS, then no HTTP.
    mallory.output(&format!(
        "printf 'NOT HTTP AT ALL\\r\\n\\r\\n' | timeout 30 openssl s_client -quiet \
         -connect {RELAY_ADDR} -servername {RELAY_SNI} >/dev/null 2>&1; true"
    ));
    // TLS and HTTP, asking to switch to another protocol: refused, not switched.
    let upgrade = mallory.output(&format!(
        "curl -sk --http1.1 --max-time 30 -o /dev/null -w '%{{http_code}}' \
         -H 'Connection: Upgrade' -H 'Upgrade: websocket' https://{RELAY_ADDR}/weft/v1"
    ));
    let upgrade = stdout(&upgrade);
    assert!(
        upgrade.starts_with('4'),
        "a wrong Upgrade on /weft/v1 answered {upgrade:?}\n{}",
        lab.logs()
    );
    // The web face: a page on `/`, 204 on the probe.
    let page = mallory.output(&format!(
        "curl -sk --max-time 30 -w '\\n%{{http_code}}' https://{RELAY_ADDR}/"
    ));
    let page = stdout(&page);
    let (body, code) = page.rsplit_once('\n').unwrap_or(("", page.as_str()));
    assert!(
        code == "200" && body.to_ascii_lowercase().contains("<html"),
        "GET / on the relay's TCP port: {page:?}\n{}",
        lab.logs()
    );
    let probe = mallory.output(&format!(
        "curl -sk --max-time 30 -o /dev/null -w '%{{http_code}}' https://{RELAY_ADDR}/weft/probe"
    ));
    assert_eq!(stdout(&probe), "204", "GET /weft/probe\n{}", lab.logs());
    let (relay_ip, relay_port) = RELAY_ADDR
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("RELAY_ADDR {RELAY_ADDR} has no port"));
    // TLS and the Upgrade to weft/1, switched (101), then random bytes instead of frames: that
    // connection ends at its first frame header, and nothing else notices.
    let script = mallory.file("garbage.py");
    std::fs::write(&script, UPGRADE_THEN_GARBAGE_PY).unwrap_or_else(|e| panic!("{e}"));
    let garbage = mallory.output(&format!(
        "timeout 120 python3 {} {relay_ip} {relay_port} {RELAY_SNI}",
        script.display()
    ));
    let said = format!(
        "{}{}",
        stdout(&garbage),
        String::from_utf8_lossy(&garbage.stderr)
    );
    assert!(
        said.contains("status: HTTP/1.1 101") && said.contains("closed by the relay"),
        "garbage after the upgrade:\n{said}\n{}",
        lab.logs()
    );

    // 10,000 idle connections, never a byte, from 200 addresses of mallory's (from one, the
    // per-IP rate limit would turn away all but ~20 a second at accept and the relay would never
    // hold many): the relay accepts every one, holds at most `max_pending_tcp_connections`
    // awaiting admission (the rest refused at once: `busy`) and closes those at the upgrade
    // timeout. The live transfer goes on meanwhile.
    let srcs: Vec<String> = (21..=65)
        .chain(67..=254)
        .take(FLOOD_ADDRS)
        .map(|i| format!("198.51.100.{i}"))
        .collect();
    assert_eq!(srcs.len(), FLOOD_ADDRS);
    let batch: String = srcs
        .iter()
        .map(|a| format!("address add {a}/32 dev eth0\n"))
        .collect();
    std::fs::write(mallory.file("flood-addrs"), batch).unwrap_or_else(|e| panic!("{e}"));
    mallory.exec(&format!(
        "ip -batch {}",
        mallory.file("flood-addrs").display()
    ));
    let script = mallory.file("flood.py");
    std::fs::write(&script, IDLE_FLOOD_PY).unwrap_or_else(|e| panic!("{e}"));
    let mut flood = mallory.spawn_named(
        "flood",
        &format!(
            "python3 {} {relay_ip} {relay_port} {IDLE_SOCKETS} 10 {}",
            script.display(),
            srcs.join(",")
        ),
    );
    let opened = until(Duration::from_secs(300), "the idle flood open", || {
        let log = flood.log();
        match log.lines().find(|l| l.starts_with("open ")) {
            Some(l) => Ok(l.to_string()),
            None if !flood.is_running() => panic!("the idle flood ended early:\n{log}"),
            None => Err(log),
        }
    });
    eprintln!("idle flood: {opened}");
    // The rest of the live transfer while the flood's sockets are held.
    let _ = go.send(());

    // The silent client is shown the door.
    if silent.wait_timeout(Duration::from_secs(180)).is_none() {
        panic!(
            "a TCP client that never spoke was still connected after 180 s\n{}",
            lab.logs()
        );
    }

    // The relay closes every idle socket of the flood (at once, or at the upgrade timeout).
    if flood.wait_timeout(Duration::from_secs(400)).is_none() {
        panic!(
            "the idle flood did not end:\n{}\n{}",
            flood.log_tail(5),
            lab.logs()
        );
    }
    let summary: Value = flood
        .log()
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no summary from the idle flood:\n{}", flood.log()));
    eprintln!("idle flood: {summary}");
    assert_eq!(
        summary["open"].as_u64(),
        Some(IDLE_SOCKETS as u64),
        "the relay did not accept every idle connection: {summary}\n{}",
        lab.logs()
    );
    assert_eq!(
        summary["still_open"].as_u64(),
        Some(0),
        "idle connections the relay never closed: {summary}\n{}",
        lab.logs()
    );

    // The live transfer finishes intact.
    let status = match live_wait(&mut live, Duration::from_secs(300)) {
        Some(st) => st,
        None => {
            let _ = live.kill();
            panic!(
                "the live transfer never finished; ssh: {}\n{}",
                std::fs::read_to_string(&ssh_log).unwrap_or_default(),
                lab.logs()
            );
        }
    };
    let wrote = writer.join().map_err(|_| "writer panicked".to_string());
    assert!(
        status.success() && matches!(wrote, Ok(Ok(()))),
        "live transfer: ssh {status}, writer {wrote:?}; ssh: {}\n{}",
        std::fs::read_to_string(&ssh_log).unwrap_or_default(),
        lab.logs()
    );
    assert_eq!(
        sha256(&eng, &format!("{ed}/live.bin")),
        sha256(&worker, &format!("{wd}/live.bin")),
        "the transfer running during the bad input changed"
    );

    // Refused and counted; and the relay keeps admitting.
    assert!(lab.relay.proc.is_running(), "relay died:\n{}", lab.logs());
    let out = alice.ssh(&lab, "echo still-admitting");
    assert!(out.contains("still-admitting"), "{out}");
    // Every connection of the flood is counted once, by the cause it was closed for.
    let idle = IDLE_SOCKETS as f64;
    let after = until(
        Duration::from_secs(60),
        "every idle connection counted",
        || {
            let m = metrics(&lab.relay);
            let counted = sample(&m, REFUSED, "") - sample(&before, REFUSED, "");
            if counted >= idle {
                Ok(m)
            } else {
                Err(format!("{counted} counted refusals:\n{m}"))
            }
        },
    );
    let grew = |cause: &str| {
        let label = format!("cause=\"{cause}\"");
        sample(&after, REFUSED, &label) - sample(&before, REFUSED, &label)
    };
    eprintln!(
        "{REFUSED} grew by: {}",
        ["tls", "http", "framing", "timeout", "rate", "busy"]
            .map(|c| format!("{c}={}", grew(c)))
            .join(" ")
    );
    // Plain HTTP, the cut hello and ten times garbage fail TLS; TLS without HTTP fails HTTP;
    // garbage after the upgrade fails its first frame; the silent client and the idle flood
    // time out, and the flood's connections beyond the cap find no place.
    for (cause, least) in [
        ("tls", 3.0),
        ("http", 1.0),
        ("framing", 1.0),
        ("timeout", 1.0),
        ("busy", 1.0),
    ] {
        assert!(
            grew(cause) >= least,
            "{REFUSED}{{cause=\"{cause}\"}} grew by {} (expected at least {least}):\n{after}",
            grew(cause)
        );
    }
    // The first 20 from each of the flood's addresses pass the rate limit at once: each took a
    // place (and timed out) or found none (busy).
    let burst = (FLOOD_ADDRS * 20) as f64;
    assert!(
        grew("timeout") + grew("busy") >= burst,
        "the flood's connections past the rate limit: timeout {} + busy {} < {burst}:\n{after}",
        grew("timeout"),
        grew("busy")
    );
    assert!(
        sample(&after, CONNS, "transport=\"tcp\"") > tcp_before,
        "no tcp admission after the bad input:\n{after}"
    );

    // The engineer's network lets UDP out again: a fresh engineer is on QUIC while the
    // worker stays on TCP (its network still blocks UDP).
    erouter.unblock_udp();
    let quic_before = admitted(&lab.relay, "quic");
    let bob = Engineer::login(&lab, "bob", &token(&lab.relay, "engineer", RELAY_ADDR), "");
    bob.wait_listed(&lab);
    let out = bob.ssh(&lab, "echo over-quic");
    assert!(out.contains("over-quic"), "{out}");
    // QUIC goes first and TCP only 250 ms later: on a busy machine TCP may win a race now and
    // then, so look for a QUIC session over a few fresh connections.
    until(Duration::from_secs(60), "a fresh engineer on QUIC", || {
        let log = bob.connect_log("");
        let quic = admitted(&lab.relay, "quic");
        if session_over(&log, "quic") && quic > quic_before {
            Ok(())
        } else {
            Err(format!(
                "quic admissions {quic} (before {quic_before}); connect:\n{log}"
            ))
        }
    });
    // Forcing TCP still works with UDP open.
    let tcp_before = admitted(&lab.relay, "tcp");
    let log = bob.connect_log("WEFT_RELAY_TRANSPORT=tcp");
    assert!(
        session_over(&log, "tcp") && log.starts_with("[saw the SSH banner]"),
        "WEFT_RELAY_TRANSPORT=tcp:\n{log}"
    );
    let tcp_now = admitted(&lab.relay, "tcp");
    assert!(
        tcp_now > tcp_before,
        "tcp admissions {tcp_now} (before {tcp_before})"
    );
    lab.relay.proc.kill_term();
}

/// An interactive ssh session running `cat` in `ns` (`ssh` is the command line up to the
/// host): a thread writes a numbered line every 100 ms and every line that comes back lands in
/// a file, so a test sees whether the session carries on through a change of path.
struct EchoSession {
    child: std::process::Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    writer: std::thread::JoinHandle<std::io::Result<u32>>,
    path: std::path::PathBuf,
}

impl EchoSession {
    fn start(ns: &Netns, ssh: &str) -> EchoSession {
        let path = ns.file(&format!("echo-{}.out", std::process::id()));
        let out =
            std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut child = ns
            .sh(&format!("exec {ssh} cat"))
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the interactive ssh: {e}"));
        let mut stdin = child
            .stdin
            .take()
            .unwrap_or_else(|| panic!("interactive ssh without stdin"));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_writer = stop.clone();
        let writer = std::thread::spawn(move || -> std::io::Result<u32> {
            let mut n = 0;
            while !stop_writer.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                writeln!(stdin, "line {n}")?;
                stdin.flush()?;
                sleep(Duration::from_millis(100));
            }
            Ok(n) // stdin drops: EOF ends `cat` and the session
        });
        EchoSession {
            child,
            stop,
            writer,
            path,
        }
    }

    /// Lines back so far.
    fn echoed(&self) -> usize {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Ends the session (EOF) and waits for ssh: lines sent, its exit, what came back, its stderr.
    fn finish(
        mut self,
        logs: &dyn Fn() -> String,
    ) -> (u32, std::process::ExitStatus, String, String) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let sent = self
            .writer
            .join()
            .unwrap_or_else(|_| panic!("the ssh writer panicked"))
            .unwrap_or_else(|e| panic!("writing to the interactive ssh: {e}\n{}", logs()));
        let status = live_wait(&mut self.child, Duration::from_secs(60)).unwrap_or_else(|| {
            let _ = self.child.kill();
            panic!("the interactive ssh did not end after EOF\n{}", logs())
        });
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        let got = std::fs::read_to_string(&self.path).unwrap_or_default();
        (sent, status, got, err)
    }
}

/// Waits for `child` to exit, at most `within`.
fn live_wait(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        if t0.elapsed() >= within {
            return None;
        }
        sleep(Duration::from_millis(100));
    }
}

/// HAProxy's configuration: one TLS port, routed by SNI without terminating TLS. It is the
/// documented deployment, `deploy/examples/haproxy-relay.cfg`, with the lab's addresses put in
/// (each replaced line must be there exactly once, so the example cannot drift from what runs).
fn haproxy_cfg(listen: &str, relay: &str, web_pem: &str) -> String {
    let path = weft_tests::workspace_root().join("deploy/examples/haproxy-relay.cfg");
    let mut cfg =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // The relay's SNI must be what the example routes on.
    let route = format!("use_backend weft_relay if {{ req_ssl_sni -i {RELAY_SNI} }}\n");
    assert_eq!(
        cfg.matches(&route).count(),
        1,
        "{} routes {route:?}",
        path.display()
    );
    for (from, to) in [
        ("    bind :443\n", format!("    bind {listen}\n")),
        (
            "    server relay 127.0.0.1:4433\n",
            format!("    server relay {relay}\n"),
        ),
        (
            "ssl crt /etc/haproxy/site.pem\n",
            format!("ssl crt {web_pem}\n"),
        ),
    ] {
        assert_eq!(
            cfg.matches(from).count(),
            1,
            "{} should hold {from:?} once",
            path.display()
        );
        cfg = cfg.replace(from, &to);
    }
    cfg
}

#[test]
fn haproxy_routes_the_relays_sni_to_the_relay() {
    let _lab = weft_tests::turn::take(module_path!());
    let lab = Lab::new("rhp");
    const HAPROXY_IP: &str = "198.51.100.80";
    let hap = lab.net.host("rhp-hap", HAPROXY_IP);
    let d = hap.dir().display().to_string();
    hap.exec(&format!(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout {d}/web.key -out {d}/web.crt \
         -days 2 -subj /CN=www.example >/dev/null 2>&1 && cat {d}/web.crt {d}/web.key > {d}/web.pem"
    ));
    let cfg = hap.file("haproxy.cfg");
    std::fs::write(
        &cfg,
        haproxy_cfg(
            &format!("{HAPROXY_IP}:443"),
            RELAY_ADDR,
            &format!("{d}/web.pem"),
        ),
    )
    .unwrap_or_else(|e| panic!("haproxy.cfg: {e}"));
    let haproxy = hap.spawn_listening(
        "haproxy",
        &format!("haproxy -db -f {}", cfg.display()),
        't',
        443,
        Duration::from_secs(10),
    );
    lab.wait_worker_session("tcp");

    // Another name gets the web site, through the same port.
    let web = lab.eng.output(&format!(
        "curl -sk --max-time 30 --resolve www.example:443:{HAPROXY_IP} https://www.example/"
    ));
    assert_eq!(
        stdout(&web).trim(),
        "plain website",
        "HAProxy's default route\n{}",
        haproxy.log_tail(10)
    );
    // The relay's name gets the relay (its health check answers through HAProxy).
    let probe = lab.eng.output(&format!(
        "curl -sk --max-time 30 -o /dev/null -w '%{{http_code}}' \
         --resolve {RELAY_SNI}:443:{HAPROXY_IP} https://{RELAY_SNI}/weft/probe"
    ));
    assert_eq!(
        stdout(&probe),
        "204",
        "/weft/probe through HAProxy\n{}\n{}",
        haproxy.log_tail(10),
        lab.logs()
    );

    // An engineer whose token names HAProxy, forced onto TCP.
    let tcp_before = admitted(&lab.relay, "tcp");
    let carol = Engineer::login(
        &lab,
        "carol",
        &token(&lab.relay, "engineer", &format!("{HAPROXY_IP}:443")),
        "WEFT_RELAY_TRANSPORT=tcp",
    );
    let relay_json = std::fs::read_to_string(format!("{}/relay.json", carol.dir))
        .unwrap_or_else(|e| panic!("carol's relay.json: {e}"));
    assert!(
        relay_json.contains(&format!("{HAPROXY_IP}:443")) && !relay_json.contains(RELAY_IP),
        "carol's state should name HAProxy only: {relay_json}"
    );
    carol.wait_listed(&lab);
    let out = carol.ssh(&lab, "'echo via-haproxy; ip -4 -o addr show dev eth0'");
    assert!(
        out.contains("via-haproxy") && out.contains(lab.worker_ip.as_str()),
        "ssh through HAProxy: {out}"
    );
    let log = carol.connect_log("");
    assert!(
        session_over(&log, "tcp") && log.starts_with("[saw the SSH banner]"),
        "weft connect through HAProxy:\n{log}"
    );
    let tcp_now = admitted(&lab.relay, "tcp");
    assert!(
        tcp_now > tcp_before,
        "tcp admissions {tcp_now} (before {tcp_before})"
    );
    // HAProxy's log shows the sessions it sent to the relay's backend.
    until(
        Duration::from_secs(30),
        "HAProxy logged relay sessions",
        || {
            let log = haproxy.log();
            if log.contains("weft_relay/relay") {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
}

/// The peer called `name` in a `mesh status --json` (`Null` if it is not there).
fn peer_named(status: &Value, name: &str) -> Value {
    status["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or(Value::Null)
}

/// A managed mesh node (`mesh up --token`, `gpu1`) behind a router that blocks UDP, and an
/// engineer's node (`alice`) on the open internet: the worker's node reaches the relay over
/// TCP/TLS and its peers reach it through the relay (WireGuard packets framed on the TLS
/// stream); alice pings it and ssh-es to it by its MagicDNS name. Both `mesh status`es say which
/// transport each link uses: gpu1's own relay link is `tcp` and alice is on `relay tcp` for it,
/// while alice's link is `quic` and gpu1 is on `relay udp` for her (her relayed packets take the
/// fast UDP channel to the relay, which hands them to gpu1 on its TCP link); `weft status`
/// shows the same.
/// Then the block lifts: the two go direct (peer to peer over UDP, probed apart from the relay
/// session) within 10 s, while a ping and an interactive ssh session keep running through the
/// switch (lost pings are printed, not asserted; the ssh session must carry every line and end
/// cleanly); gpu1's own relay session moves back to QUIC (it retries every 2 s here,
/// `WEFT_QUIC_RETRY`) and stays online in alice's peer map through the move.
#[test]
fn mesh_node_behind_a_udp_block_is_relayed_over_tcp_then_goes_direct() {
    let _lab = weft_tests::turn::take(module_path!());
    const NAME: &str = "gpu1.weft.internal";
    let net = Internet::new("rmb");
    let relay = LabRelay::start(&net, "rmb");
    let router = Router::new(&net, "rmb-w", Nat::Easy, "203.0.113.10/24", "192.0.2.32/27");
    router.block_udp();
    let wns = Netns::new("rmb-wk");
    let worker_lan = router.attach(&wns, "eth0");
    // It tries QUIC again every 2 s here (3 min by default).
    let worker =
        ManagedNode::start_with_env(wns, &relay.token("worker"), "gpu1", "WEFT_QUIC_RETRY=2s");
    let ens = net.host("rmb-eng", "198.51.100.5");
    let _resolver = NetnsResolver::magic_dns(&ens);
    let eng = ManagedNode::start(ens, &relay.token("engineer"), "alice");
    let logs = || {
        format!(
            "alice:\n{}\ngpu1:\n{}\nrelay:\n{}",
            eng.proc.log_tail(20),
            worker.proc.log_tail(20),
            relay.proc.log_tail(20)
        )
    };

    // Which transport each link uses, from both sides.
    let wst = until(
        Duration::from_secs(30),
        "gpu1 on its relay link over tcp, alice on the relay path",
        || {
            let st = worker.status();
            let p = peer_named(&st, "alice");
            if st["relay"]["state"] == "connected"
                && st["relay"]["transport"] == "tcp"
                && p["path"] == "relay"
                && p["relay_transport"] == "tcp"
            {
                Ok(st)
            } else {
                Err(format!("{st:#}\n{}", logs()))
            }
        },
    );
    let est = until(
        Duration::from_secs(30),
        "alice on her relay link over quic, gpu1 on the relay path over the fast UDP channel",
        || {
            let st = eng.status();
            let p = peer_named(&st, "gpu1");
            if st["relay"]["state"] == "connected"
                && st["relay"]["transport"] == "quic"
                && p["path"] == "relay"
                && p["relay_transport"] == "udp"
                && p["endpoint"] == "relay"
            {
                Ok(st)
            } else {
                Err(format!("{st:#}\n{}", logs()))
            }
        },
    );
    eprintln!(
        "gpu1 (UDP blocked): relay {}; alice: relay {}",
        wst["relay"], est["relay"]
    );
    let text = stdout(&worker.mesh("status --interface weft0"));
    eprintln!("gpu1's mesh status:\n{text}");
    for want in [
        "  relay: connected to 203.0.113.2:4433 (tcp)\n",
        "  path: relay tcp",
    ] {
        assert!(text.contains(want), "gpu1's mesh status lacks {want:?}");
    }
    let text = stdout(&eng.mesh("status --interface weft0"));
    assert!(
        text.contains("  relay: connected to 203.0.113.2:4433 (quic)\n")
            && text.contains("  path: relay udp"),
        "alice's mesh status:\n{text}"
    );
    // `weft status` on gpu1's machine shows its node the same way (an identity directory with
    // no login: the node's own identity must not open a second relay session).
    let weft_status = |json: &str| {
        worker.ns.output(&format!(
            "{} status {json} --state-dir {} --uapi-dir {}",
            weft_bin(),
            worker.ns.file("no-login").display(),
            worker.uapi
        ))
    };
    let out = weft_status("--json");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let node = &report["mesh"][0];
    assert!(
        node["relay"]["transport"] == "tcp"
            && peer_named(node, "alice")["relay_transport"] == "tcp",
        "weft status --json on gpu1: {}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&weft_status(""));
    assert!(
        text.contains("coordinator connected (tcp)") && text.contains("relay tcp"),
        "weft status on gpu1:\n{text}"
    );

    // By name over the mesh: MagicDNS, ping, ssh.
    let got = eng.ns.exec(&format!("getent ahostsv4 {NAME}"));
    assert!(
        got.starts_with(&worker.ip),
        "{NAME} -> {got:?}, want {}",
        worker.ip
    );
    assert!(
        traffic::wait_ping(&eng.ns, NAME, Duration::from_secs(20)),
        "no ping reply from {NAME} through the relay\n{}",
        logs()
    );
    let p = traffic::ping(&eng.ns, NAME, 5, 0.2, 2);
    assert!(
        p.all_ok(),
        "ping {NAME} through the relay: {}\n{}",
        p.output,
        logs()
    );
    let _sshd = start_sshd(&worker.ns, &worker.ip);
    let ssh_opts = format!(
        "-F /dev/null -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=30",
        worker.ns.file("id").display()
    );
    let out = eng.ns.output(&format!(
        "timeout 120 ssh {ssh_opts} root@{NAME} 'echo ssh-over-the-mesh; hostname -I'"
    ));
    let text = stdout(&out);
    assert!(
        out.status.success() && text.contains("ssh-over-the-mesh") && text.contains(&worker_lan),
        "ssh {NAME} through the relay: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );

    // A ping and an interactive ssh session (`cat`: every line sent comes back) that run
    // through the switch to the direct path.
    let gap = GapMonitor::start(&eng.ns, NAME, 0.1);
    let echo = EchoSession::start(&eng.ns, &format!("ssh {ssh_opts} root@{NAME}"));
    let echoed = || echo.echoed();
    until(
        Duration::from_secs(60),
        "the interactive ssh session echoing",
        || {
            if echoed() >= 10 {
                Ok(())
            } else {
                Err(format!("{} lines back\n{}", echoed(), logs()))
            }
        },
    );

    // Lift the block: the direct path forms within 10 s (polled for longer, to report).
    router.unblock_udp();
    let t0 = Instant::now();
    let direct = retry(Duration::from_secs(60), || {
        let e = peer_named(&eng.status(), "gpu1");
        let w = peer_named(&worker.status(), "alice");
        if e["path"] == "direct" && w["path"] == "direct" {
            Ok((e, w))
        } else {
            Err(format!("alice sees gpu1: {e}\ngpu1 sees alice: {w}"))
        }
    });
    let took = t0.elapsed();
    let (e, w) = direct.unwrap_or_else(|last| {
        panic!(
            "no direct path 60 s after lifting the UDP block; last:\n{last}\n{}",
            logs()
        )
    });
    eprintln!(
        "direct {took:?} after lifting the UDP block: alice → {}, gpu1 → {}",
        e["endpoint"], w["endpoint"]
    );
    assert!(
        took <= Duration::from_secs(10),
        "direct only {took:?} after lifting the UDP block (want ≤ 10 s)\n{}",
        logs()
    );
    assert!(
        e["endpoint"]
            .as_str()
            .is_some_and(|a| a.starts_with("203.0.113.10:"))
            && e["relay_transport"].is_null(),
        "alice's direct path to gpu1 should be its router's public address: {e}"
    );
    // gpu1's own relay link moves back to QUIC (its control stream and relayed packets), and
    // the relay keeps it online through the move: alice still has gpu1 in her peer map, direct.
    let wst = until(
        Duration::from_secs(30),
        "gpu1's relay link back on quic after the block lifted",
        || {
            let st = worker.status();
            if st["relay"]["state"] == "connected" && st["relay"]["transport"] == "quic" {
                Ok(st)
            } else {
                Err(format!("{}\n{}", st["relay"], logs()))
            }
        },
    );
    eprintln!(
        "gpu1's relay link back on QUIC {:?} after lifting the block: {}",
        t0.elapsed(),
        wst["relay"]
    );
    assert!(
        worker.proc.log().contains("mesh session back on QUIC"),
        "gpu1's log should say it moved back to QUIC\n{}",
        logs()
    );
    let e = peer_named(&eng.status(), "gpu1");
    assert!(
        e["path"] == "direct" && e["online"] == true,
        "alice's view of gpu1 after gpu1's move back to QUIC: {e}\n{}",
        logs()
    );

    // Traffic keeps flowing on the direct path; then the ping and the session end.
    let before = echoed();
    until(
        Duration::from_secs(30),
        "the ssh session echoing on the direct path",
        || {
            if echoed() >= before + 20 {
                Ok(())
            } else {
                Err(format!(
                    "{} lines back (had {before})\n{}",
                    echoed(),
                    logs()
                ))
            }
        },
    );
    let p = traffic::ping(&eng.ns, NAME, 3, 0.2, 2);
    assert!(p.all_ok(), "ping {NAME} direct: {}\n{}", p.output, logs());
    let g = gap.stop();
    eprintln!(
        "ping through the switch: {} sent, {} answered, {} lost, longest gap {:?}",
        g.transmitted,
        g.received,
        g.transmitted.saturating_sub(g.received),
        g.max_gap
    );
    let (sent, status, got, err) = echo.finish(&logs);
    let want: String = (1..=sent).map(|n| format!("line {n}\n")).collect();
    assert!(
        status.success() && got == want,
        "the ssh session through the switch: {status}, {} of {sent} lines back intact; stderr: {err}",
        got.lines().count()
    );
    eprintln!("ssh session through the switch: {sent} lines, all back, exit {status}");
}

/// Notes when `child` exited (relative to `t0`), the first time it is seen to have.
fn note_exit(
    child: &mut std::process::Child,
    t0: Instant,
    ended: &mut Option<(std::process::ExitStatus, Duration)>,
) {
    if ended.is_none() {
        if let Ok(Some(st)) = child.try_wait() {
            *ended = Some((st, t0.elapsed()));
        }
    }
}

/// Seconds since the Unix epoch, as `date +%s.%N` prints them.
fn epoch_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// UDP is cut under a worker whose relay session runs over QUIC, while an engineer (on the
/// open internet, on QUIC) has an interactive ssh session open to it through the relay.
///
/// What it shows: nobody configures anything and the worker comes back on its own over
/// TCP/TLS. Its QUIC connection ends at the worker's idle timeout (keepalive 1 s, idle 4 s),
/// the link core reconnects (backoff from 250 ms) and the QUIC-then-TCP race lands on TCP; its
/// log shows a new `relay session up … transport=tcp` within 30 s (polled every 100 ms; the
/// time after the cut is printed, not asserted tighter). A new `ssh` through `weft connect`
/// then works (the time from the cut to its first success is printed), and keeps working once
/// UDP is let through again (the worker stays on TCP).
///
/// What it does not show, because the design cannot keep it: open tunnels do not survive a
/// transport change. A tunnel is a stream of the worker's relay connection; it ends with the
/// old QUIC connection, so the ssh session open at the cut ends and ssh must reconnect. The
/// test prints when that session's last line arrived and when and how it ended (expected:
/// output stops at the cut, and the session ends once the old connection is gone), asserting
/// nothing about it.
#[test]
fn udp_cut_mid_session_moves_the_worker_to_tcp_and_ssh_reconnects() {
    let _lab = weft_tests::turn::take(module_path!());
    let lab = Lab::open("rcut");
    let eng = lab.eng.clone();
    assert!(!lab.wrouter.udp_blocked());

    // UDP open: the worker's relay session is on QUIC, and ssh works.
    let first = until(
        Duration::from_secs(60),
        "the worker's relay session up",
        || {
            let s = lab.worker_sessions();
            if s.is_empty() {
                Err(lab.logs())
            } else {
                Ok(s)
            }
        },
    );
    assert!(
        first.iter().all(|t| t == "quic"),
        "the worker should be on QUIC with UDP open (TCP may only win the race if QUIC took \
         over 250 ms): {first:?}\n{}",
        lab.logs()
    );
    let alice = Engineer::login(
        &lab,
        "alice",
        &token(&lab.relay, "engineer", RELAY_ADDR),
        "",
    );
    alice.wait_listed(&lab);
    let out = alice.ssh(&lab, "'echo before-the-cut'");
    assert!(out.contains("before-the-cut"), "ssh output: {out}");

    // An interactive session printing the time on the worker five times a second.
    let live_path = eng.file("live.out");
    let live_file = std::fs::File::create(&live_path).unwrap_or_else(|e| panic!("live.out: {e}"));
    let live_err_path = eng.file("live.err");
    let live_err =
        std::fs::File::create(&live_err_path).unwrap_or_else(|e| panic!("live.err: {e}"));
    let mut live = eng
        .sh(&format!(
            "exec ssh {} root@{WORKER} 'while sleep 0.2; do date +%s.%N; done'",
            alice.ssh_opts()
        ))
        .stdin(Stdio::null())
        .stdout(live_file)
        .stderr(live_err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the live ssh: {e}"));
    let lines = || -> Vec<f64> {
        std::fs::read_to_string(&live_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    };
    until(
        Duration::from_secs(60),
        "the live ssh session printing",
        || {
            if lines().len() >= 5 {
                Ok(())
            } else {
                Err(format!(
                    "{} lines; ssh: {}\n{}",
                    lines().len(),
                    std::fs::read_to_string(&live_err_path).unwrap_or_default(),
                    lab.logs()
                ))
            }
        },
    );

    // The cut. The live session's fate is noted whenever the test looks.
    let before = lab.worker_sessions().len();
    let tcp_before = admitted(&lab.relay, "tcp");
    lab.wrouter.block_udp();
    let (t0, t0_epoch) = (Instant::now(), epoch_now());
    let mut ended: Option<(std::process::ExitStatus, Duration)> = None;

    // The worker comes back over TCP.
    until(
        Duration::from_secs(30),
        "the worker back over TCP after the cut",
        || {
            note_exit(&mut live, t0, &mut ended);
            let s = lab.worker_sessions();
            if s[before.min(s.len())..].iter().any(|t| t == "tcp") {
                Ok(())
            } else {
                Err(format!("sessions {s:?}\n{}", lab.logs()))
            }
        },
    );
    let back = t0.elapsed();
    eprintln!("worker back over TCP after {:.1} s", back.as_secs_f64());

    // A new ssh works (tries until one does; each try is a fresh `weft connect`).
    let ssh_once = |what: &str| -> Result<String, String> {
        let out = eng.output(&format!(
            "timeout 30 ssh {} root@{WORKER} 'echo {what}'",
            alice.ssh_opts()
        ));
        if out.status.success() && stdout(&out).contains(what) {
            Ok(stdout(&out))
        } else {
            Err(format!(
                "ssh {}: {}{}\n{}",
                out.status,
                stdout(&out),
                String::from_utf8_lossy(&out.stderr),
                lab.logs()
            ))
        }
    };
    let mut tries = 0;
    until(Duration::from_secs(60), "a new ssh after the cut", || {
        note_exit(&mut live, t0, &mut ended);
        tries += 1;
        ssh_once("after-the-cut")
    });
    let new_ssh = t0.elapsed();
    eprintln!(
        "first new ssh after the cut succeeded {:.1} s after it (try {tries})",
        new_ssh.as_secs_f64()
    );
    let tcp_now = admitted(&lab.relay, "tcp");
    assert!(
        tcp_now > tcp_before,
        "tcp admissions {tcp_now} (before the cut {tcp_before})"
    );

    // The open session: give it until 60 s after the cut to end (ssh's own keepalive,
    // ServerAliveInterval 15 s × 3, would end a hung one by then).
    let _ = retry(Duration::from_secs(60).saturating_sub(t0.elapsed()), || {
        note_exit(&mut live, t0, &mut ended);
        if ended.is_some() {
            Ok(())
        } else {
            Err(String::new())
        }
    });
    note_exit(&mut live, t0, &mut ended);
    let got = lines();
    let last = got.last().map_or(f64::NAN, |t| t - t0_epoch);
    let after_cut = got.iter().filter(|&&t| t > t0_epoch).count();
    let err = std::fs::read_to_string(&live_err_path).unwrap_or_default();
    match ended {
        Some((st, at)) => eprintln!(
            "the ssh session open at the cut ended {:.1} s after it ({st}); its last line came \
             {last:+.1} s from the cut ({after_cut} lines after it, {} in all); ssh said: {:?}",
            at.as_secs_f64(),
            got.len(),
            err.trim()
        ),
        None => {
            eprintln!(
                "the ssh session open at the cut was still running {:.1} s after it; its last \
                 line came {last:+.1} s from the cut ({after_cut} lines after it, {} in all)",
                t0.elapsed().as_secs_f64(),
                got.len()
            );
            let _ = live.kill();
            let _ = live.wait();
        }
    }
    eprintln!(
        "the worker's relay sessions and losses:\n{}",
        lab.expose
            .log()
            .lines()
            .filter(|l| l.contains("relay session up")
                || l.contains("lost the relay")
                || l.contains("relay unreachable"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // UDP back, with an interactive ssh session open over the worker's TCP connection: the
    // worker moves back to QUIC (it tries every 2 s here, `WEFT_QUIC_RETRY`), the open session
    // keeps echoing on the old connection, which the relay closes once that session ends; new
    // sessions go over QUIC.
    let echo = EchoSession::start(&eng, &format!("ssh {} root@{WORKER}", alice.ssh_opts()));
    let echoed = || echo.echoed();
    until(
        Duration::from_secs(60),
        "the interactive ssh echoing over TCP",
        || {
            if echoed() >= 10 {
                Ok(())
            } else {
                Err(format!("{} lines back\n{}", echoed(), lab.logs()))
            }
        },
    );
    let sessions_before = lab.worker_sessions().len();
    lab.wrouter.unblock_udp();
    let t1 = Instant::now();
    until(Duration::from_secs(60), "the worker back on QUIC", || {
        let s = lab.worker_sessions();
        if s[sessions_before.min(s.len())..]
            .iter()
            .any(|t| t == "quic")
            && lab.expose.log().contains("back on QUIC")
        {
            Ok(())
        } else {
            Err(format!("sessions {s:?}\n{}", lab.logs()))
        }
    });
    eprintln!(
        "worker back on QUIC {:.1} s after UDP came back",
        t1.elapsed().as_secs_f64()
    );
    // The relay kept the TCP connection for the open session, which still echoes.
    until(
        Duration::from_secs(10),
        "the relay keeping the replaced connection",
        || {
            if lab
                .relay
                .proc
                .log()
                .contains("replaced connection kept until its tunnels end")
            {
                Ok(())
            } else {
                Err(lab.logs())
            }
        },
    );
    let before = echoed();
    until(
        Duration::from_secs(30),
        "the open session echoing after the move",
        || {
            if echoed() >= before + 20 {
                Ok(())
            } else {
                Err(format!(
                    "{} lines back (had {before})\n{}",
                    echoed(),
                    lab.logs()
                ))
            }
        },
    );
    // A new session meanwhile: over the new connection.
    until(Duration::from_secs(60), "a new ssh after the move", || {
        ssh_once("after-the-move")
    });
    // The open session ends (EOF): every line came back, and then the old connection goes.
    let (sent, status, got, err) = echo.finish(&|| lab.logs());
    assert!(
        status.success(),
        "the interactive ssh ended with {status}; stderr: {err}"
    );
    assert_eq!(
        got.lines().count(),
        sent as usize,
        "every line sent over the session open through the move came back"
    );
    until(
        Duration::from_secs(30),
        "the worker's TCP connection closed after its last tunnel",
        || {
            if lab
                .expose
                .log()
                .contains("the TCP/TLS connection closed after its last tunnel")
            {
                Ok(())
            } else {
                Err(lab.logs())
            }
        },
    );
    ssh_once("only-quic-now")
        .unwrap_or_else(|e| panic!("ssh after the TCP connection closed: {e}"));
    eprintln!(
        "after lifting the block: worker sessions {:?}; the session open through the move \
         echoed all {sent} lines",
        lab.worker_sessions()
    );
}
