//! Ray cluster members on this worker (issue 12): the agent's `--ray` (the `ray` command of a
//! Python environment), what a member's job gets beyond the coordinator's command line, the
//! firewall that keeps Ray's ports to loopback and the mesh, and the head's reading of Ray's
//! own view of the nodes.
//!
//! - **The command.** The coordinator writes `ray start --block ...` with
//!   [`RAY_PLACEHOLDER`] first ([`weft_proto::cluster::member_argv`]); the agent puts its own
//!   `ray` there, adds `--temp-dir` (one per member: several agents on one host must not share
//!   `/tmp/ray`), the cluster's token in a 0600 file (`RAY_AUTH_MODE=token`,
//!   `RAY_AUTH_TOKEN_PATH`; never in the environment, the job record or a log), usage stats off,
//!   and the `ray` command's directory first on `PATH` (so `python` in a Ray job is the
//!   environment's). A member is an ordinary local job: `jobs logs` shows Ray's output, a stop
//!   is the normal SIGTERM (Ray's `--block` stops its processes), SIGKILL after the grace.
//! - **The firewall.** Ray binds some ports on every interface whatever `--node-ip-address`
//!   says. While a member runs, the agent owns the nftables table `inet weft_ray`: new TCP
//!   connections to [`RAY_PORTS`] are dropped unless they come in on loopback or the mesh
//!   interface (where the mesh ACL decides who gets there: the cluster's members and, for the
//!   dashboard and Ray Client, its owner). The table goes when the last member here ends; a
//!   member is refused if the table cannot be made.
//! - **The head's report.** The head member's agent reads the dashboard's state API
//!   (`/api/v0/nodes`, with the token) every [`POLL`] and puts Ray's nodes in its inventory
//!   ([`RayHeadReport`]): the coordinator shows them and `weft cluster up` counts them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info, warn};
use weft_proto::cluster::{RayNode, RayStart, DASHBOARD_PORT, RAY_PLACEHOLDER, RAY_PORTS};
use weft_proto::pool::Start;

use crate::job::JobRequest;

/// How often the head's agent reads Ray's nodes.
pub const POLL: Duration = Duration::from_secs(1);
/// How often the head reads Ray's nodes while fewer than all members are alive.
pub const POLL_FORMING: Duration = Duration::from_millis(200);
/// How long one reading may take. While the cluster forms it is short: a dashboard that is
/// still starting accepts connections and never answers them (seen here: a request made then
/// hung until its timeout, ~2 s after Ray could have answered a new one).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// [`READ_TIMEOUT`] while the cluster forms.
pub const READ_TIMEOUT_FORMING: Duration = Duration::from_millis(1500);
/// The nftables table the agent owns while Ray members run here.
pub const NFT_TABLE: &str = "weft_ray";

/// The agent's Ray: the command and its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RayConfig {
    /// The `ray` command (`worker-agent run --ray`).
    pub path: PathBuf,
    /// What `ray --version` says (`2.60.0`).
    pub version: String,
}

/// Runs `path --version` (`ray, version 2.60.0`): the agent's Ray, or why it cannot be used.
pub fn detect(path: &Path) -> Result<RayConfig, String> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .env("RAY_USAGE_STATS_ENABLED", "0")
        .output()
        .map_err(|e| format!("--ray {}: cannot run it: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text).ok_or_else(|| {
        format!(
            "--ray {}: `--version` printed {:?}, not `ray, version X` (exit {})",
            path.display(),
            text.trim(),
            out.status
        )
    })?;
    Ok(RayConfig {
        path: path.to_path_buf(),
        version,
    })
}

/// `ray, version 2.60.0\n` → `2.60.0`.
pub fn parse_version(text: &str) -> Option<String> {
    let v = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ray, version "))?;
    let v = v.split_whitespace().next()?;
    (!v.is_empty()).then(|| v.to_string())
}

/// Where a member keeps its token file and Ray's temp dir.
pub fn member_paths(state_dir: &Path, start: &Start) -> (PathBuf, PathBuf) {
    let token = state_dir
        .join("ray")
        .join(format!("{}.{}.token", start.pool_job, start.attempt));
    // Ray puts unix sockets under its temp dir: keep it short (108-byte sun_path).
    let rank = start
        .env
        .get("WEFT_NODE_RANK")
        .map(String::as_str)
        .unwrap_or("0");
    let temp = std::env::temp_dir().join(format!(
        "weft-ray-{}.{}.{rank}-{}",
        start.pool_job,
        start.attempt,
        std::process::id()
    ));
    (token, temp)
}

/// The local job a Ray member's [`Start`] becomes: its own `ray`, its temp dir, the token
/// file, the environment, and with `supervisor` (the agent's own binary) Ray run under
/// `supervisor ray-member --` so that it is restarted when it exits on its own
/// ([`crate::ray_member`]). Pure (the token file is written by [`write_token`]).
pub fn member_request(
    mut req: JobRequest,
    ray: &RayConfig,
    token_path: &Path,
    temp_dir: &Path,
    path_env: Option<&str>,
    supervisor: Option<&Path>,
) -> Result<JobRequest, String> {
    if req.command.first().map(String::as_str) != Some(RAY_PLACEHOLDER) {
        return Err(format!(
            "a Ray member's command must start with {RAY_PLACEHOLDER:?}, not {:?}",
            req.command.first()
        ));
    }
    req.command[0] = ray.path.to_string_lossy().into_owned();
    req.command
        .push(format!("--temp-dir={}", temp_dir.to_string_lossy()));
    let dir = ray
        .path
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let path = match path_env {
        Some(p) if !p.is_empty() && !dir.is_empty() => format!("{dir}:{p}"),
        Some(p) if !p.is_empty() => p.to_string(),
        _ => format!("{dir}:/usr/local/bin:/usr/bin:/bin"),
    };
    for (k, v) in [
        ("RAY_AUTH_MODE", "token".to_string()),
        (
            "RAY_AUTH_TOKEN_PATH",
            token_path.to_string_lossy().into_owned(),
        ),
        ("RAY_USAGE_STATS_ENABLED", "0".to_string()),
        // Ray 2.60 drains a node for up to 30 s on SIGTERM; a member is only stopped when its
        // cluster goes (`down`, a failed gang, a stale copy), so it stops at once instead.
        ("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0".to_string()),
        ("PATH", path),
    ] {
        req.env.insert(k.to_string(), v);
    }
    // The coordinator's environment must not smuggle a token in.
    req.env.remove("RAY_AUTH_TOKEN");
    if let Some(sup) = supervisor {
        let mut argv = vec![
            sup.to_string_lossy().into_owned(),
            "ray-member".into(),
            "--".into(),
        ];
        argv.append(&mut req.command);
        req.command = argv;
    }
    Ok(req)
}

/// Writes the token, mode 0600, in a 0700 directory.
pub fn write_token(path: &Path, token: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        std::io::Write::write_all(&mut f, token.as_bytes())?;
    }
    std::fs::rename(&tmp, path)
}

/// The nftables script of the firewall: Ray's ports take new TCP connections only on
/// loopback and the mesh interface `mesh_if`.
pub fn nft_script(mesh_if: &str) -> String {
    let ports: Vec<String> = RAY_PORTS
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect();
    format!(
        "table inet {NFT_TABLE} {{\n  chain input {{\n    type filter hook input priority -10; policy accept;\n    \
         iifname {{ \"lo\", \"{mesh_if}\" }} accept\n    \
         tcp dport {{ {} }} ct state new counter drop\n  }}\n}}\n",
        ports.join(", ")
    )
}

/// Makes (or remakes) the firewall table.
pub fn firewall_up(mesh_if: &str) -> Result<(), String> {
    // Deleting first makes it idempotent (an agent restarted with the table still there).
    let _ = nft(&format!("delete table inet {NFT_TABLE}\n"));
    nft(&nft_script(mesh_if)).map_err(|e| {
        format!("cannot keep Ray's ports off the public interfaces (nftables): {e}")
    })?;
    info!(table = NFT_TABLE, interface = mesh_if, "ray firewall up");
    Ok(())
}

/// Removes the firewall table (nothing if it is not there).
pub fn firewall_down() {
    if nft(&format!("delete table inet {NFT_TABLE}\n")).is_ok() {
        info!(table = NFT_TABLE, "ray firewall down");
    }
}

fn nft(script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .arg("-f")
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run nft: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(script.as_bytes())
            .map_err(|e| format!("nft: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Ray's nodes from the dashboard's `/api/v0/nodes?detail=1` answer.
pub fn parse_nodes(body: &[u8]) -> Result<Vec<RayNode>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let list = v
        .pointer("/data/result/result")
        .and_then(|r| r.as_array())
        .ok_or("no data.result.result list")?;
    let mut out = Vec::with_capacity(list.len());
    for n in list {
        let res = |k: &str| {
            n.pointer(&format!("/resources_total/{k}"))
                .and_then(|x| x.as_f64())
                .unwrap_or(0.0)
        };
        out.push(RayNode {
            ip: n
                .get("node_ip")
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string(),
            alive: n.get("state").and_then(|x| x.as_str()) == Some("ALIVE"),
            head: n
                .get("is_head_node")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            cpus: res("CPU"),
            gpus: res("GPU"),
        });
    }
    out.sort_by(|a, b| (!a.head, &a.ip, !a.alive).cmp(&(!b.head, &b.ip, !b.alive)));
    Ok(out)
}

/// The most of an answer the poller reads.
const MAX_ANSWER: u64 = 4 << 20;

/// One reading of Ray's nodes from the head at `ip` (HTTP/1.0, so the answer is not chunked).
pub async fn read_nodes(ip: &str, token: &str, within: Duration) -> Result<Vec<RayNode>, String> {
    let addr = format!("{ip}:{DASHBOARD_PORT}");
    let io = async {
        let mut s = tokio::net::TcpStream::connect(&addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let req = format!(
            "GET /api/v0/nodes?detail=1&limit=1000 HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| format!("write {addr}: {e}"))?;
        let mut buf = Vec::new();
        s.take(MAX_ANSWER)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read {addr}: {e}"))?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(within, io)
        .await
        .map_err(|_| format!("{addr}: no answer in {within:?}"))??;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("{addr}: not an HTTP answer"))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!(
            "{addr}: HTTP {status}: {}",
            String::from_utf8_lossy(&buf[split + 4..])
                .chars()
                .take(200)
                .collect::<String>()
        ));
    }
    parse_nodes(&buf[split + 4..])
}

/// The heads running here: (pool job, attempt) → who may reach it and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The cluster's owner (the one caller the `ray-dashboard` service serves).
    pub owner: String,
    /// The head's overlay address.
    pub ip: String,
    /// The cluster's token.
    pub token: String,
}

/// What the feed keeps about this worker's Ray members.
#[derive(Debug, Default)]
pub struct Members {
    /// Heads, by (pool job, attempt).
    pub heads: BTreeMap<(u64, u32), Head>,
    /// The last reading of each head's nodes (and when it changed).
    pub reports: BTreeMap<(u64, u32), (u64, Vec<RayNode>)>,
    /// Members (head or not) started here and not yet seen ended.
    pub live: BTreeMap<(u64, u32), PathBuf>,
    /// Whether the firewall table is up.
    pub firewall: bool,
}

impl Members {
    /// A member of `start` is starting here.
    pub fn add(&mut self, start: &Start, ray: &RayStart, token_path: PathBuf) {
        let key = (start.pool_job, start.attempt);
        if ray.head {
            self.heads.insert(
                key,
                Head {
                    owner: start.owner.clone(),
                    ip: ray.node_ip.clone(),
                    token: ray.token.clone(),
                },
            );
        }
        self.live.insert(key, token_path);
    }

    /// Forgets members not in `alive` (they ended); returns their token files, to delete.
    pub fn retain(&mut self, alive: &[(u64, u32)]) -> Vec<PathBuf> {
        let gone: Vec<(u64, u32)> = self
            .live
            .keys()
            .filter(|k| !alive.contains(k))
            .copied()
            .collect();
        let mut files = Vec::new();
        for k in gone {
            if let Some(p) = self.live.remove(&k) {
                files.push(p);
            }
            self.heads.remove(&k);
            self.reports.remove(&k);
        }
        files
    }

    /// The head `caller` owns (the newest), for the `ray-dashboard` service.
    pub fn head_of(&self, caller: &str) -> Option<&Head> {
        self.heads.values().rev().find(|h| h.owner == caller)
    }
}

/// Deletes a member's token file (its temp dir is Ray's: left for its logs).
pub fn forget_token(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => debug!(path = %path.display(), "ray token removed"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(path = %path.display(), error = %e, "cannot remove a ray token file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> RayConfig {
        RayConfig {
            path: PathBuf::from("/opt/ray/bin/ray"),
            version: "2.60.0".into(),
        }
    }

    #[test]
    fn versions_parse_and_garbage_does_not() {
        assert_eq!(
            parse_version("ray, version 2.60.0\n").as_deref(),
            Some("2.60.0")
        );
        assert_eq!(parse_version("Python 3.11"), None);
        assert_eq!(parse_version(""), None);
    }

    #[test]
    fn a_member_runs_the_agents_ray_with_the_token_in_a_file_only() {
        let req = JobRequest {
            command: vec!["ray".into(), "start".into(), "--block".into()],
            env: BTreeMap::from([("RAY_AUTH_TOKEN".to_string(), "smuggled".to_string())]),
            ..JobRequest::default()
        };
        let r = member_request(
            req,
            &cfg(),
            Path::new("/s/ray/7.1.token"),
            Path::new("/tmp/weft-ray-7.1.0-9"),
            Some("/usr/bin"),
            None,
        )
        .expect("ok");
        assert_eq!(r.command[0], "/opt/ray/bin/ray");
        assert_eq!(
            r.command.last().expect("an argument"),
            "--temp-dir=/tmp/weft-ray-7.1.0-9"
        );
        assert_eq!(r.env["RAY_AUTH_MODE"], "token");
        assert_eq!(r.env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"], "0");
        assert_eq!(r.env["RAY_AUTH_TOKEN_PATH"], "/s/ray/7.1.token");
        assert_eq!(r.env["PATH"], "/opt/ray/bin:/usr/bin");
        assert!(!r.env.contains_key("RAY_AUTH_TOKEN"));
        let bad = JobRequest {
            command: vec!["sh".into()],
            ..JobRequest::default()
        };
        assert!(member_request(bad, &cfg(), Path::new("t"), Path::new("d"), None, None).is_err());
        // Under the agent's supervisor: the same Ray command after `ray-member --`.
        let req = JobRequest {
            command: vec!["ray".into(), "start".into(), "--block".into()],
            ..JobRequest::default()
        };
        let r = member_request(
            req,
            &cfg(),
            Path::new("t"),
            Path::new("d"),
            None,
            Some(Path::new("/usr/bin/worker-agent")),
        )
        .expect("ok");
        assert_eq!(
            r.command[..5],
            [
                "/usr/bin/worker-agent",
                "ray-member",
                "--",
                "/opt/ray/bin/ray",
                "start"
            ]
        );
    }

    #[test]
    fn the_token_file_is_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("ray").join("1.1.token");
        write_token(&p, "abc").expect("write");
        let mode = std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "abc");
    }

    #[test]
    fn the_firewall_names_every_ray_port_and_spares_loopback_and_the_mesh() {
        let s = nft_script("weft0");
        assert!(s.contains("iifname { \"lo\", \"weft0\" } accept"), "{s}");
        assert!(s.contains("6379-6384"), "{s}");
        assert!(s.contains("8265"), "{s}");
        assert!(s.contains("10001-10099"), "{s}");
        assert!(s.contains("52365"), "{s}");
    }

    #[test]
    fn nodes_parse_from_the_state_api() {
        let body = br#"{"result": true, "data": {"result": {"total": 2, "result": [
            {"node_ip": "100.64.0.4", "is_head_node": false, "state": "DEAD", "resources_total": {"CPU": 1.0}},
            {"node_ip": "100.64.0.3", "is_head_node": true, "state": "ALIVE", "resources_total": {"CPU": 1.0, "GPU": 1.0}}
        ]}}}"#;
        let n = parse_nodes(body).expect("parse");
        assert_eq!(n.len(), 2);
        assert!(n[0].head && n[0].alive && n[0].gpus == 1.0);
        assert_eq!(n[1].ip, "100.64.0.4");
        assert!(!n[1].alive);
        assert!(parse_nodes(b"{}").is_err());
        assert!(parse_nodes(b"<html>").is_err());
    }

    #[test]
    fn members_end_and_the_owner_finds_their_head() {
        let mut m = Members::default();
        let start = Start {
            pool_job: 7,
            attempt: 1,
            owner: "alice".into(),
            command: vec![],
            env: BTreeMap::new(),
            workdir: None,
            gpus: vec![],
            timeout_s: None,
            ray: None,
        };
        let ray = RayStart {
            cluster: "c".into(),
            head: true,
            node_ip: "100.64.0.3".into(),
            token: "t".into(),
        };
        m.add(&start, &ray, PathBuf::from("/t"));
        assert_eq!(
            m.head_of("alice").map(|h| h.ip.as_str()),
            Some("100.64.0.3")
        );
        assert!(m.head_of("bob").is_none());
        assert!(m.retain(&[(7, 1)]).is_empty());
        assert_eq!(m.retain(&[]), vec![PathBuf::from("/t")]);
        assert!(m.head_of("alice").is_none());
    }
}
