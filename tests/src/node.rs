//! Our node: `mesh up --wg-config FILE --interface NAME` inside a namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::netns::Netns;
use crate::proc::Proc;
use crate::wgconf::Interface;
use crate::{bin, uapi_socket, unique_ifname};

/// How long `MeshNode::start` waits for the UAPI socket and `mesh status`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A running `mesh up` process owning one interface. Drop stops it (SIGTERM).
pub struct MeshNode {
    // Fields drop in order: stop the process (SIGTERM, so it removes its
    // interface and UAPI socket) before possibly dropping the last namespace handle.
    proc: Proc,
    ns: Netns,
    ifname: String,
    config: PathBuf,
    /// The configuration it was started with.
    pub iface: Interface,
}

/// `ip netns exec NS mesh up --wg-config FILE --interface IFNAME` (RUST_LOG
/// defaults to `info`), not started: for tests of failures.
pub fn mesh_up_command(ns: &Netns, config: &Path, ifname: &str) -> Command {
    let mut c = ns.command(bin("mesh"));
    c.arg("up")
        .arg("--wg-config")
        .arg(config)
        .arg("--interface")
        .arg(ifname);
    if std::env::var_os("RUST_LOG").is_none() {
        c.env("RUST_LOG", "info");
    }
    c
}

impl MeshNode {
    /// Writes `iface` as a wg-quick file and starts our node on a fresh unique
    /// interface name; panics (with the node's log) unless it is ready in 10 s.
    pub fn start(ns: &Netns, iface: &Interface) -> MeshNode {
        Self::start_named(ns, iface, &unique_ifname())
    }

    /// As `start` with a given interface name.
    pub fn start_named(ns: &Netns, iface: &Interface, ifname: &str) -> MeshNode {
        Self::start_full(ns, iface, ifname, &[])
    }

    /// As `start`, with these environment variables set for the node.
    pub fn start_with_env(ns: &Netns, iface: &Interface, env: &[(&str, &str)]) -> MeshNode {
        Self::start_full(ns, iface, &unique_ifname(), env)
    }

    fn start_full(ns: &Netns, iface: &Interface, ifname: &str, env: &[(&str, &str)]) -> MeshNode {
        let config = ns.file(&format!("{ifname}.conf"));
        std::fs::write(&config, iface.to_wg_quick())
            .unwrap_or_else(|e| panic!("write {}: {e}", config.display()));
        let log = ns.file(&format!("mesh-{ifname}.log"));
        let mut cmd = mesh_up_command(ns, &config, ifname);
        cmd.envs(env.iter().copied());
        let proc = ns.spawn_command(&format!("mesh {ifname}"), cmd, &log);
        let mut node = MeshNode {
            ns: ns.clone(),
            ifname: ifname.to_string(),
            config,
            proc,
            iface: iface.clone(),
        };
        node.wait_ready();
        node
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        let sock = uapi_socket(&self.ifname);
        let mut last = String::from("UAPI socket not there yet");
        loop {
            if let Some(st) = self.proc.try_wait() {
                panic!(
                    "mesh up for {} in {} exited early ({st}); config:\n{}\nlog:\n{}",
                    self.ifname,
                    self.ns.name(),
                    self.iface.to_wg_quick(),
                    self.proc.log_tail(60)
                );
            }
            if sock.exists() {
                match self.try_status_raw() {
                    Ok(_) => return,
                    Err(e) => last = e,
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "mesh node {} in {} not ready after {READY_TIMEOUT:?} (socket {} exists: {}; last: {last}); log:\n{}",
                    self.ifname,
                    self.ns.name(),
                    sock.display(),
                    sock.exists(),
                    self.proc.log_tail(60)
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    pub fn ns(&self) -> &Netns {
        &self.ns
    }

    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// The wg-quick file it was started with.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn public_key(&self) -> &str {
        &self.iface.keys.public
    }

    /// The node's stderr log so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    pub fn log_tail(&self, n: usize) -> String {
        self.proc.log_tail(n)
    }

    /// CPU time (user + system) the node's process has used so far.
    pub fn cpu_time(&self) -> Duration {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.proc.pid())).unwrap_or_default();
        // Fields after the command name: utime and stime are fields 14 and 15.
        let ticks: u64 = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|f| f.parse::<u64>().ok())
            .sum();
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Duration::from_millis(ticks * 1000 / hz)
    }

    pub fn proc_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }

    /// Whether the `mesh up` process is still alive.
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }

    /// SIGTERM and wait (SIGKILL after 3 s); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.proc.kill_term()
    }

    fn try_status_raw(&self) -> Result<String, String> {
        let out = self
            .ns
            .command(bin("mesh"))
            .args(["status", "--interface", &self.ifname, "--json"])
            .output()
            .map_err(|e| format!("run mesh status: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "mesh status exited {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// `mesh status --interface IF --json`, parsed; panics if the command fails
    /// or the JSON does not have the documented shape.
    pub fn status(&self) -> Status {
        let raw = self.try_status_raw().unwrap_or_else(|e| {
            panic!("{e}\nnode log:\n{}", self.proc.log_tail(40));
        });
        Status::parse(&raw).unwrap_or_else(|e| panic!("mesh status --json: {e}; output:\n{raw}"))
    }

    /// `wg ARGS` against this interface's UAPI socket, run inside the namespace.
    pub fn wg(&self, args: &str) -> String {
        crate::wggo::wg(&self.ns, args)
    }
}

pub use mesh::status::PeerStatus;

/// `mesh status --json` output of a static node (its peers are mesh's own
/// [`PeerStatus`]); every field must be present.
#[derive(Clone, Debug, Deserialize)]
pub struct Status {
    pub interface: String,
    pub public_key: String,
    pub listen_port: u16,
    pub peers: Vec<PeerStatus>,
}

impl Status {
    /// Parses the documented JSON shape.
    pub fn parse(raw: &str) -> Result<Status, String> {
        serde_json::from_str(raw).map_err(|e| e.to_string())
    }

    /// The peer with this public key.
    pub fn peer(&self, public_key: &str) -> Option<&PeerStatus> {
        self.peers.iter().find(|p| p.public_key == public_key)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_status_shape() {
        let raw = r#"{"interface":"wg0","public_key":"PUB","listen_port":51820,"peers":[
            {"public_key":"P1","endpoint":"203.0.113.2:51820","allowed_ips":["100.64.0.2/32"],
             "latest_handshake_unix":1700000000,"latest_handshake_age_s":3,"rx_bytes":10,
             "tx_bytes":20,"persistent_keepalive_s":null},
            {"public_key":"P2","endpoint":null,"allowed_ips":[],"latest_handshake_unix":null,
             "latest_handshake_age_s":null,"rx_bytes":0,"tx_bytes":0,"persistent_keepalive_s":25}]}"#;
        let s = Status::parse(raw).unwrap();
        assert_eq!(s.listen_port, 51820);
        let p1 = s.peer("P1").unwrap();
        assert_eq!(p1.endpoint.as_deref(), Some("203.0.113.2:51820"));
        assert_eq!(p1.latest_handshake_unix, Some(1_700_000_000));
        assert_eq!(s.peer("P2").unwrap().persistent_keepalive_s, Some(25));
        // A missing field is an error, not a default.
        let err = Status::parse(r#"{"interface":"x","public_key":"k","listen_port":1}"#);
        assert!(err.unwrap_err().contains("peers"));
    }
}
