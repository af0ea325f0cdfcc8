//! `Netns`: a network namespace owned by a test, deleted when the last handle drops.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::thread::sleep;
use std::time::{Duration, Instant};

use crate::proc::Proc;
use crate::NETNS_PREFIX;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static REAP_ORPHANS: Once = Once::new();

struct Inner {
    name: String,
    dir: Option<tempfile::TempDir>,
}

/// A network namespace named `wft-<tag>-<pid>-<n>`, with loopback up and IPv6
/// DAD off (addresses usable at once). Clones share it; the last drop kills
/// every process left inside and deletes it.
#[derive(Clone)]
pub struct Netns(Arc<Inner>);

impl Netns {
    /// Creates a namespace. `tag` is a short test abbreviation (letters, digits, `-`).
    pub fn new(tag: &str) -> Netns {
        assert!(
            !tag.is_empty() && tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
            "bad namespace tag {tag:?}"
        );
        // Namespaces of test processes that died (SIGKILL, timeout) carry their pid:
        // remove those once per process, never a live process's namespaces.
        REAP_ORPHANS.call_once(crate::cleanup::cleanup_orphans);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{NETNS_PREFIX}{tag}-{}-{n}", std::process::id());
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap_or_else(|e| panic!("run ip netns add: {e}"));
        assert!(st.success(), "ip netns add {name} failed: {st}");
        let dir = tempfile::Builder::new()
            .prefix(&format!("{name}."))
            .tempdir()
            .unwrap_or_else(|e| panic!("tempdir for {name}: {e}"));
        let ns = Netns(Arc::new(Inner {
            name,
            dir: Some(dir),
        }));
        ns.exec("ip link set lo up");
        ns.sysctl("net.ipv6.conf.all.accept_dad", "0");
        ns.sysctl("net.ipv6.conf.default.accept_dad", "0");
        ns
    }

    /// Moves the calling thread into this namespace; threads it starts from
    /// then on are born there too (so an async runtime built on it afterwards
    /// opens every socket here). For in-process clients of a daemon running
    /// in the lab (a benchmark's simulated nodes). The thread stays there.
    pub fn enter_current_thread(&self) {
        use std::os::fd::AsRawFd;
        let path = format!("/run/netns/{}", self.0.name);
        let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        // SAFETY: setns on a namespace file we hold open; it changes only this thread.
        let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// A scratch directory that lives as long as the namespace (logs, configs, files).
    pub fn dir(&self) -> &Path {
        self.0
            .dir
            .as_ref()
            .map(|d| d.path())
            .unwrap_or_else(|| Path::new("/tmp"))
    }

    /// `dir()/name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir().join(name)
    }

    /// `ip netns exec NAME program`: add args, env, stdio as needed.
    pub fn command<S: AsRef<OsStr>>(&self, program: S) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.name()]).arg(program);
        c
    }

    /// `ip netns exec NAME sh -c LINE`.
    pub fn sh(&self, line: &str) -> Command {
        let mut c = self.command("sh");
        c.arg("-c").arg(line);
        c
    }

    /// Runs a shell line inside and returns its output (any exit status).
    pub fn output(&self, line: &str) -> Output {
        self.sh(line)
            .output()
            .unwrap_or_else(|e| panic!("[{}] run {line:?}: {e}", self.name()))
    }

    /// Runs a shell line inside; stdout on success, a message with stderr otherwise.
    pub fn try_exec(&self, line: &str) -> Result<String, String> {
        let out = self.output(line);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "[{}] `{line}` failed ({}): {}{}",
                self.name(),
                out.status,
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ))
        }
    }

    /// Runs a shell line inside, panics unless it succeeds; returns stdout.
    pub fn exec(&self, line: &str) -> String {
        self.try_exec(line).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts `exec LINE` inside (so the pid is the program's), logging to `dir()/<first word>-<n>.log`.
    pub fn spawn(&self, line: &str) -> Proc {
        let word = line
            .split_whitespace()
            .next()
            .and_then(|w| w.rsplit('/').next())
            .unwrap_or("proc");
        self.spawn_named(word, line)
    }

    /// Like `spawn` with a label for the log file name.
    pub fn spawn_named(&self, label: &str, line: &str) -> Proc {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let log = self.file(&format!("{label}-{n}.log"));
        Proc::spawn(
            &format!("{label} in {}", self.name()),
            self.sh(&format!("exec {line}")),
            &log,
        )
    }

    /// [`Netns::spawn_named`], then waits up to `within` until something inside
    /// listens on `port` (`proto` as for [`Netns::wait_listen`]); panics with the
    /// process's log otherwise.
    pub fn spawn_listening(
        &self,
        label: &str,
        line: &str,
        proto: char,
        port: u16,
        within: Duration,
    ) -> Proc {
        let p = self.spawn_named(label, line);
        assert!(
            self.wait_listen(proto, port, within),
            "[{}] {label} did not listen on {proto}/{port} within {within:?}:\n{}",
            self.name(),
            p.log_tail(20)
        );
        p
    }

    /// Starts a prepared command (e.g. from `command`) logging to `log`.
    pub fn spawn_command(&self, label: &str, cmd: Command, log: &Path) -> Proc {
        Proc::spawn(&format!("{label} in {}", self.name()), cmd, log)
    }

    /// `sysctl -w key=value` inside (net.* keys are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.exec(&format!("sysctl -q -w {key}={value}"));
    }

    /// Turns IPv4 and IPv6 forwarding on.
    pub fn enable_forwarding(&self) {
        self.sysctl("net.ipv4.ip_forward", "1");
        self.sysctl("net.ipv6.conf.all.forwarding", "1");
    }

    /// Turns IPv6 off on every interface in the namespace.
    pub fn disable_ipv6(&self) {
        self.sysctl("net.ipv6.conf.all.disable_ipv6", "1");
        self.sysctl("net.ipv6.conf.default.disable_ipv6", "1");
    }

    /// `ip addr add CIDR dev IF`.
    pub fn add_addr(&self, ifname: &str, cidr: &str) {
        self.exec(&format!("ip addr add {cidr} dev {ifname}"));
    }

    /// `ip addr del CIDR dev IF`.
    pub fn del_addr(&self, ifname: &str, cidr: &str) {
        self.exec(&format!("ip addr del {cidr} dev {ifname}"));
    }

    /// `ip route add SPEC` (family from the spec's addresses), e.g. `route("default via 203.0.113.1")`.
    pub fn route(&self, spec: &str) {
        let fam = if spec.contains(':') { "-6" } else { "-4" };
        self.exec(&format!("ip {fam} route add {spec}"));
    }

    /// `ip link set IF up`.
    pub fn link_up(&self, ifname: &str) {
        self.exec(&format!("ip link set {ifname} up"));
    }

    /// Whether an interface of that name exists inside.
    pub fn has_link(&self, ifname: &str) -> bool {
        self.output(&format!("ip link show dev {ifname}"))
            .status
            .success()
    }

    /// All routes (v4 and v6, every table) as text.
    pub fn routes(&self) -> String {
        let mut s = self.exec("ip -4 route show table all");
        s += &self.exec("ip -6 route show table all");
        s
    }

    /// Waits until a TCP or UDP socket listens on `port` inside (`ss`), at most `timeout`.
    pub fn wait_listen(&self, proto: char, port: u16, timeout: Duration) -> bool {
        let flag = if proto == 'u' { "-Hlun" } else { "-Hltn" };
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output(&format!("ss {flag} 'sport = :{port}'"));
            if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if std::env::var_os("WEFT_KEEP_LOGS").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping logs of {} in {}", self.name, d.keep().display());
            }
        }
        crate::cleanup::delete_netns(&self.name);
    }
}

/// Creates a veth pair directly inside the two namespaces (never in the root
/// namespace), adds the addresses (CIDR, or `None`) and sets both ends up.
pub fn link(
    ns1: &Netns,
    if1: &str,
    addr1: Option<&str>,
    ns2: &Netns,
    if2: &str,
    addr2: Option<&str>,
) {
    assert!(
        if1.len() <= 15 && if2.len() <= 15,
        "interface names over 15 chars"
    );
    let st = Command::new("ip")
        .args([
            "link",
            "add",
            "name",
            if1,
            "netns",
            ns1.name(),
            "type",
            "veth",
        ])
        .args(["peer", "name", if2, "netns", ns2.name()])
        .status()
        .unwrap_or_else(|e| panic!("run ip link add: {e}"));
    assert!(
        st.success(),
        "ip link add {if1}@{} <-> {if2}@{} failed",
        ns1.name(),
        ns2.name()
    );
    for (ns, ifname, addr) in [(ns1, if1, addr1), (ns2, if2, addr2)] {
        if let Some(a) = addr {
            ns.add_addr(ifname, a);
        }
        ns.link_up(ifname);
    }
}
