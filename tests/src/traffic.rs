//! Traffic probes: ping, checksummed TCP transfers, iperf3, gap monitors.
//!
//! Each probe runs its programs inside the namespaces given; results are parsed
//! into plain structs the tests assert on.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::RngCore;
use serde_json::Value;

use crate::netns::Netns;
use crate::node::MeshNode;
use crate::proc::Proc;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Result of one `ping` run.
#[derive(Clone, Debug)]
pub struct Ping {
    pub transmitted: u32,
    pub received: u32,
    /// Round-trip times of the replies, in milliseconds.
    pub rtts_ms: Vec<f64>,
    pub output: String,
}

impl Ping {
    /// Every request got a reply.
    pub fn all_ok(&self) -> bool {
        self.transmitted > 0 && self.received == self.transmitted
    }
    /// At least one reply.
    pub fn any_ok(&self) -> bool {
        self.received > 0
    }
    /// Mean RTT in ms (NaN without replies).
    pub fn avg_rtt_ms(&self) -> f64 {
        self.rtts_ms.iter().sum::<f64>() / self.rtts_ms.len() as f64
    }
}

/// `ping -c COUNT -i INTERVAL -W TIMEOUT DST` inside `ns` (v4 or v6 by address).
pub fn ping(ns: &Netns, dst: &str, count: u32, interval_s: f64, timeout_s: u32) -> Ping {
    let out = ns.output(&format!(
        "LC_ALL=C ping -n -c {count} -i {interval_s} -W {timeout_s} {dst}"
    ));
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let rtts_ms = output
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    let (transmitted, received) = ping_summary(&output).unwrap_or((0, 0));
    Ping {
        transmitted,
        received,
        rtts_ms,
        output,
    }
}

/// Pings once a second (1 s timeout) until a reply arrives or `within` passes.
pub fn wait_ping(ns: &Netns, dst: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if ping(ns, dst, 1, 1.0, 1).any_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        sleep(Duration::from_millis(100));
    }
}

/// Asserts that the tunnel from `ns` (where `node` runs) to `dst` carries a
/// ping within 10 s; panics with the node's log otherwise.
pub fn wait_tunnel(ns: &Netns, dst: &str, node: &MeshNode) {
    assert!(
        wait_ping(ns, dst, Duration::from_secs(10)),
        "tunnel never came up:\n{}",
        node.log_tail(30)
    );
}

/// SHA-256 of a file, hex (via `sha256sum`).
pub fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("run sha256sum: {e}"));
    assert!(out.status.success(), "sha256sum {} failed", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Writes `bytes` random bytes to `path`.
pub fn random_file(path: &Path, bytes: usize) {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    std::fs::write(path, &buf).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Paces a sender: `tool FILE BYTES_PER_SEC` writes the file to stdout at that rate
/// (the crate's `weft-pace`).
#[derive(Clone, Debug)]
pub struct Pace {
    pub tool: PathBuf,
    pub bytes_per_sec: u64,
}

/// Outcome of a TCP transfer.
#[derive(Clone, Debug)]
pub struct Transfer {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sent_sha256: String,
    pub received_sha256: String,
    pub elapsed: Duration,
    /// Sender exit status success.
    pub sender_ok: bool,
    /// Sender and listener logs, for messages.
    pub logs: String,
}

impl Transfer {
    /// Every byte arrived, unchanged.
    pub fn is_intact(&self) -> bool {
        self.sender_ok
            && self.bytes_received == self.bytes_sent
            && self.sent_sha256 == self.received_sha256
    }

    /// Panics with details unless intact.
    pub fn assert_intact(&self, what: &str) {
        assert!(
            self.is_intact(),
            "{what}: transfer not intact: sent {} B sha256 {}, received {} B sha256 {}, sender ok {}, after {:?}\n{}",
            self.bytes_sent,
            self.sent_sha256,
            self.bytes_received,
            self.received_sha256,
            self.sender_ok,
            self.elapsed,
            self.logs
        );
    }

    /// Goodput in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes_received as f64 * 8.0 / self.elapsed.as_secs_f64() / 1e6
    }
}

/// A TCP transfer in progress: a `socat` listener writing to a file in `dst`,
/// a `socat` sender (optionally paced) in `src`.
pub struct TransferRun {
    listener: Proc,
    sender: Proc,
    file: PathBuf,
    out: PathBuf,
    bytes: u64,
    start: Instant,
}

/// Starts sending a fresh random file of `bytes` from `src` to `dst_ip:port` (a
/// listener in `dst`). `dst_ip` may be v4 or v6.
pub fn start_transfer(
    src: &Netns,
    dst: &Netns,
    dst_ip: &str,
    port: u16,
    bytes: usize,
    pace: Option<&Pace>,
) -> TransferRun {
    let n = seq();
    let file = src.file(&format!("send-{port}-{n}.bin"));
    let out = dst.file(&format!("recv-{port}-{n}.bin"));
    random_file(&file, bytes);
    let v6 = dst_ip.contains(':');
    let listen = if v6 { "TCP6-LISTEN" } else { "TCP4-LISTEN" };
    let listener = dst.spawn_named(
        "socat-listen",
        &format!(
            "socat -u {listen}:{port},reuseaddr OPEN:{},creat,trunc",
            out.display()
        ),
    );
    assert!(
        dst.wait_listen('t', port, Duration::from_secs(5)),
        "socat listener on port {port} in {} did not start:\n{}",
        dst.name(),
        listener.log()
    );
    let target = if v6 {
        format!("TCP6:[{dst_ip}]:{port},connect-timeout=10")
    } else {
        format!("TCP4:{dst_ip}:{port},connect-timeout=10")
    };
    let start = Instant::now();
    let sender = match pace {
        None => src.spawn_named(
            "socat-send",
            &format!("socat -u OPEN:{} {target}", file.display()),
        ),
        Some(p) => src.spawn_named(
            "socat-send",
            &format!(
                "{} {} {} | socat -u STDIN {target}",
                p.tool.display(),
                file.display(),
                p.bytes_per_sec
            ),
        ),
    };
    TransferRun {
        listener,
        sender,
        file,
        out,
        bytes: bytes as u64,
        start,
    }
}

impl TransferRun {
    /// Bytes the listener has written so far.
    pub fn received_so_far(&self) -> u64 {
        std::fs::metadata(&self.out).map(|m| m.len()).unwrap_or(0)
    }

    /// Waits for the sender (at most `timeout`) and the listener, then compares.
    pub fn finish(mut self, timeout: Duration) -> Transfer {
        let sender_ok = self
            .sender
            .wait_timeout(timeout)
            .map(|s| s.success())
            .unwrap_or(false);
        if !sender_ok {
            self.sender.kill_term();
        }
        if self
            .listener
            .wait_timeout(Duration::from_secs(10))
            .is_none()
        {
            self.listener.kill_term();
        }
        let elapsed = self.start.elapsed();
        let bytes_received = self.received_so_far();
        let logs = format!(
            "sender log:\n{}\nlistener log:\n{}",
            self.sender.log_tail(20),
            self.listener.log_tail(20)
        );
        let t = Transfer {
            bytes_sent: self.bytes,
            bytes_received,
            sent_sha256: sha256_file(&self.file),
            received_sha256: sha256_file(&self.out),
            elapsed,
            sender_ok,
            logs,
        };
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_file(&self.out);
        t
    }
}

/// Sends `mib` MiB of random data from `src` to `dst_ip:port` and compares
/// SHA-256 on both sides (60 s limit).
pub fn tcp_transfer(src: &Netns, dst: &Netns, dst_ip: &str, port: u16, mib: usize) -> Transfer {
    start_transfer(src, dst, dst_ip, port, mib << 20, None).finish(Duration::from_secs(60))
}

/// `iperf3 -s -p PORT` inside `ns`, waiting until it listens. Drop stops it.
pub fn iperf3_server(ns: &Netns, port: u16) -> Proc {
    let p = ns.spawn_named("iperf3-server", &format!("iperf3 -s -p {port}"));
    assert!(
        ns.wait_listen('t', port, Duration::from_secs(5)),
        "iperf3 server on {port} in {} did not start:\n{}",
        ns.name(),
        p.log()
    );
    p
}

/// Summary of an `iperf3 -J` run.
#[derive(Clone, Debug)]
pub struct Iperf {
    pub sent_bps: f64,
    pub received_bps: f64,
    pub received_bytes: u64,
    pub retransmits: Option<u64>,
    pub json: Value,
}

impl Iperf {
    pub fn received_gbps(&self) -> f64 {
        self.received_bps / 1e9
    }
}

/// Parses `iperf3 -J` output (TCP: `end.sum_sent` / `end.sum_received`).
pub fn parse_iperf3(raw: &str) -> Result<Iperf, String> {
    let json: Value = serde_json::from_str(raw).map_err(|e| format!("iperf3 JSON: {e}"))?;
    if let Some(err) = json.get("error") {
        return Err(format!("iperf3 error: {err}"));
    }
    let end = &json["end"];
    let sent = &end["sum_sent"];
    let recv = &end["sum_received"];
    let sent_bps = sent["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 JSON lacks end.sum_sent.bits_per_second")?;
    let received_bps = recv["bits_per_second"]
        .as_f64()
        .ok_or("iperf3 JSON lacks end.sum_received.bits_per_second")?;
    Ok(Iperf {
        sent_bps,
        received_bps,
        received_bytes: recv["bytes"].as_u64().unwrap_or(0),
        retransmits: sent["retransmits"].as_u64(),
        json,
    })
}

/// An `iperf3 -c` client running in the background.
pub struct IperfRun {
    proc: Proc,
    json: PathBuf,
}

/// Starts `iperf3 -c SERVER -p PORT -J ARGS` inside `ns` (e.g. args `-t 10 -P 4`).
pub fn start_iperf3(ns: &Netns, server: &str, port: u16, args: &str) -> IperfRun {
    let json = ns.file(&format!("iperf3-{port}-{}.json", seq()));
    let proc = ns.spawn_named(
        "iperf3-client",
        &format!(
            "iperf3 -c {server} -p {port} -J {args} > {}",
            json.display()
        ),
    );
    IperfRun { proc, json }
}

impl IperfRun {
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// Waits at most `timeout` and parses the JSON.
    pub fn finish(mut self, timeout: Duration) -> Result<Iperf, String> {
        let st = self.proc.wait_timeout(timeout);
        if st.is_none() {
            self.proc.kill_term();
        }
        let raw = std::fs::read_to_string(&self.json).unwrap_or_default();
        let res = parse_iperf3(&raw).map_err(|e| {
            format!(
                "{e} (exit {st:?}); stderr: {}; json head: {}",
                self.proc.log_tail(10),
                raw.chars().take(600).collect::<String>()
            )
        });
        if st.is_none() {
            return Err(format!(
                "iperf3 client did not finish within {timeout:?}; {res:?}"
            ));
        }
        res
    }
}

/// Runs an iperf3 client to completion (limit: `timeout`).
pub fn iperf3(ns: &Netns, server: &str, port: u16, args: &str, timeout: Duration) -> Iperf {
    start_iperf3(ns, server, port, args)
        .finish(timeout)
        .unwrap_or_else(|e| panic!("iperf3 from {} to {server}: {e}", ns.name()))
}

/// One reply of a [`GapMonitor`]'s ping: unix time and `icmp_seq`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reply {
    pub t: f64,
    pub seq: u64,
}

/// Longest stretch without connectivity in a ping run that sent one request
/// every `interval` seconds from `started` to `stopped` (`transmitted` requests
/// in all when known), given its replies in order. Returns (seconds, end of
/// that stretch) in unix seconds.
///
/// Between two replies the stretch is the time between them, but never more
/// than the requests sent in between could span (`seq` difference x
/// `interval`): a ping that itself was not scheduled for nine seconds (a
/// starved CI machine) and lost nothing in between is not a gap in
/// connectivity. A real outage loses the requests sent during it and counts
/// in full. The start and the end count as replies with `seq` 0 and
/// `transmitted + 1`.
pub fn longest_gap(
    started: f64,
    replies: &[Reply],
    stopped: f64,
    interval: f64,
    transmitted: Option<u64>,
) -> (f64, f64) {
    let first = Reply { t: started, seq: 0 };
    let last = Reply {
        t: stopped,
        seq: transmitted.map_or(u64::MAX, |n| n + 1),
    };
    let mut prev = first;
    let (mut max_gap, mut max_end) = (0.0f64, started);
    for &r in replies.iter().chain(std::iter::once(&last)) {
        let sent_between = r.seq.saturating_sub(prev.seq) as f64 * interval;
        let gap = (r.t - prev.t).min(sent_between.max(interval));
        if gap > max_gap {
            max_gap = gap;
            max_end = r.t;
        }
        if r.t >= prev.t {
            prev = r;
        }
    }
    (max_gap, max_end)
}

/// Unwraps ping's 16-bit `icmp_seq` into a count that keeps growing.
fn unwrap_seqs(raw: &[(f64, u16)]) -> Vec<Reply> {
    let mut out = Vec::with_capacity(raw.len());
    let (mut base, mut last) = (0u64, None::<u16>);
    for &(t, s) in raw {
        if let Some(l) = last {
            if s < l && l - s > u16::MAX / 2 {
                base += 1 << 16;
            }
        }
        last = Some(s);
        out.push(Reply {
            t,
            seq: base + u64::from(s),
        });
    }
    out
}

/// A continuous `ping -D -i INTERVAL` whose replies' timestamps give the longest
/// stretch without connectivity.
pub struct GapMonitor {
    proc: Proc,
    started: f64,
    interval: f64,
    dst: String,
}

/// Report of a [`GapMonitor`].
#[derive(Clone, Debug)]
pub struct GapReport {
    pub dst: String,
    pub transmitted: u32,
    pub received: u32,
    /// Longest stretch without connectivity: time between consecutive replies
    /// (also from start to the first and from the last to stop), capped by
    /// the requests lost in between (see [`longest_gap`]).
    pub max_gap: Duration,
    /// Longest time between consecutive replies, uncapped: more than
    /// `max_gap` when ping itself was stalled (a starved machine).
    pub max_silence: Duration,
    /// Unix time at which the longest gap ended.
    pub max_gap_end_unix: f64,
    pub duration: Duration,
}

impl GapMonitor {
    /// Starts pinging `dst` from `ns` every `interval_s` seconds (root may go below 0.2).
    pub fn start(ns: &Netns, dst: &str, interval_s: f64) -> GapMonitor {
        let started = now_unix();
        let proc = ns.spawn_named(
            "ping-gap",
            &format!("env LC_ALL=C ping -D -n -i {interval_s} -W 1 {dst}"),
        );
        GapMonitor {
            proc,
            started,
            interval: interval_s,
            dst: dst.to_string(),
        }
    }

    /// Stops (SIGINT, so ping prints its summary) and computes the gaps.
    pub fn stop(mut self) -> GapReport {
        let stopped = now_unix();
        self.proc.interrupt();
        let log = self.proc.log();
        let raw: Vec<(f64, u16)> = log
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| {
                let t = l.strip_prefix('[')?.split(']').next()?.parse().ok()?;
                let seq = l.split("icmp_seq=").nth(1)?.split_whitespace().next()?;
                Some((t, seq.parse().ok()?))
            })
            .collect();
        let replies = unwrap_seqs(&raw);
        let summary = ping_summary(&log);
        let (max_gap, max_end) = longest_gap(
            self.started,
            &replies,
            stopped,
            self.interval,
            summary.map(|(tx, _)| u64::from(tx)),
        );
        let (silence, _) = longest_gap(self.started, &replies, stopped, f64::INFINITY, None);
        let (transmitted, received) = summary.unwrap_or((0, replies.len() as u32));
        GapReport {
            dst: self.dst,
            transmitted,
            received,
            max_gap: Duration::from_secs_f64(max_gap.max(0.0)),
            max_silence: Duration::from_secs_f64(silence.clamp(0.0, 1e9)),
            max_gap_end_unix: max_end,
            duration: Duration::from_secs_f64((stopped - self.started).max(0.0)),
        }
    }
}

/// (transmitted, received) from ping's "N packets transmitted, M received" line.
fn ping_summary(output: &str) -> Option<(u32, u32)> {
    output
        .lines()
        .filter(|l| l.contains("packets transmitted"))
        .filter_map(|l| {
            let nums: Vec<u32> = l
                .split(',')
                .filter_map(|p| p.split_whitespace().next()?.parse().ok())
                .collect();
            Some((*nums.first()?, *nums.get(1)?))
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn longest_gap_counts_start_middle_and_tail() {
        let r = |pairs: &[(f64, u64)]| -> Vec<Reply> {
            pairs.iter().map(|&(t, seq)| Reply { t, seq }).collect()
        };
        // An outage loses the requests sent during it: counted in full.
        let lost = r(&[(0.1, 1), (0.2, 2), (1.7, 17), (1.8, 18)]);
        assert_eq!(longest_gap(0.0, &lost, 2.0, 0.1, Some(20)), (1.5, 1.7));
        assert_eq!(
            longest_gap(0.0, &r(&[(0.9, 9), (1.0, 10)]), 1.1, 0.1, Some(11)).1,
            0.9
        );
        assert_eq!(
            longest_gap(0.0, &r(&[(0.1, 1)]), 3.0, 0.1, Some(30)),
            (2.9, 3.0)
        );
        assert_eq!(longest_gap(5.0, &[], 6.0, 0.1, Some(10)), (1.0, 6.0));
        // Unknown transmitted count: the tail counts in full.
        assert_eq!(
            longest_gap(0.0, &r(&[(0.1, 1)]), 3.0, 0.1, None),
            (2.9, 3.0)
        );
        // ping itself stalled 9 s and lost nothing: not a connectivity gap...
        let stalled = r(&[(0.1, 1), (0.2, 2), (9.2, 3), (9.3, 4)]);
        let (gap, _) = longest_gap(0.0, &stalled, 9.4, 0.1, Some(5));
        assert!(gap < 0.11, "{gap}");
        // ...but the uncapped silence shows it.
        assert_eq!(
            longest_gap(0.0, &stalled, 9.4, f64::INFINITY, None),
            (9.0, 9.2)
        );
        // A stall that also lost requests counts what those requests spanned.
        let both = r(&[(0.1, 1), (9.1, 12)]);
        let (gap, end) = longest_gap(0.0, &both, 9.2, 0.1, Some(12));
        assert!((gap - 1.1).abs() < 1e-9 && end == 9.1, "{gap} {end}");
    }

    #[test]
    fn ping_sequence_numbers_unwrap_past_65535() {
        let u = unwrap_seqs(&[(1.0, 65534), (1.1, 65535), (1.2, 0), (1.4, 2)]);
        let seqs: Vec<u64> = u.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [65534, 65535, 65536, 65538]);
    }

    #[test]
    fn parses_iperf3_json() {
        let raw = r#"{"start":{},"intervals":[],"end":{
            "sum_sent":{"bytes":1000,"bits_per_second":8.5e9,"retransmits":3},
            "sum_received":{"bytes":990,"bits_per_second":8.4e9}}}"#;
        let r = parse_iperf3(raw).unwrap();
        assert_eq!(r.received_bytes, 990);
        assert_eq!(r.retransmits, Some(3));
        assert!((r.received_gbps() - 8.4).abs() < 1e-9);
        assert!(parse_iperf3(r#"{"error":"unable to connect"}"#).is_err());
        assert!(parse_iperf3("not json").is_err());
    }
}
