//! Removing lab namespaces: ours on drop, stale ones after a killed run.
//!
//! Only names that start with [`NETNS_PREFIX`](crate::NETNS_PREFIX) are ever touched.

use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use crate::NETNS_PREFIX;

/// Names of all namespaces carrying the lab prefix.
pub fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output();
    let Ok(out) = out else { return Vec::new() };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NETNS_PREFIX))
        .map(str::to_string)
        .collect()
}

/// Kills every process inside a lab namespace and deletes it. Refuses other names.
pub fn delete_netns(name: &str) {
    if !name.starts_with(NETNS_PREFIX) {
        eprintln!("refusing to delete namespace {name:?}: not a lab namespace");
        return;
    }
    for _ in 0..3 {
        let pids = Command::new("ip").args(["netns", "pids", name]).output();
        let pids = pids
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let pids: Vec<i32> = pids
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2); these processes run inside a namespace the lab created.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        sleep(Duration::from_millis(100));
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
    // Per-namespace files `ip netns exec` bind-mounts (a test's resolv.conf).
    let etc = std::path::Path::new("/etc/netns").join(name);
    if etc.is_dir() {
        let _ = std::fs::remove_dir_all(etc);
    }
}

/// Deletes every lab namespace (`wft-*`), whoever made it. For the test command
/// before a run, and `tests/cleanup-stale-netns.sh`.
pub fn cleanup_stale() -> Vec<String> {
    let names = lab_namespaces();
    for n in &names {
        delete_netns(n);
    }
    remove_dead_uapi_sockets();
    names
}

/// Removes lab UAPI sockets (`/var/run/wireguard/wf*.sock`, the names
/// [`unique_ifname`](crate::unique_ifname) and the bench make) that nobody
/// listens on any more (connection refused), e.g. after a SIGKILLed node.
pub fn remove_dead_uapi_sockets() {
    let Ok(dir) = std::fs::read_dir("/var/run/wireguard") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("wf") && name.ends_with(".sock")) {
            continue;
        }
        let path = entry.path();
        if let Err(e) = std::os::unix::net::UnixStream::connect(&path) {
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Deletes lab namespaces whose creating process (the pid in `wft-<tag>-<pid>-<n>`)
/// no longer exists. Safe while other tests run: live processes' namespaces stay.
pub fn cleanup_orphans() {
    for name in lab_namespaces() {
        let mut parts = name.rsplit('-');
        let _counter = parts.next();
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            delete_netns(&name);
        }
    }
    remove_dead_uapi_sockets();
}
