//! What every Weft binary (`tunnel-relay`, `mesh`, `worker-agent`, `weft`)
//! does the same way, here because they all link this crate: logging, the
//! shutdown signal, the host name and the open-file limit of a server.

/// The log filter when neither `WEFT_LOG` nor `RUST_LOG` is set.
/// (netlink-packet-route warns about every newer-kernel attribute it does not know.)
pub const DEFAULT_LOG: &str = "info,netlink_packet_route=error";

/// Logs to stderr (colours on a terminal only) with the filter in
/// `WEFT_LOG`, else `RUST_LOG`, else `default` (e.g. [`DEFAULT_LOG`]), in
/// `tracing_subscriber::EnvFilter` syntax (`debug`, `info,mesh=trace`).
/// A filter that does not parse is reported and the next one is used.
pub fn init_tracing(default: &str) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let mut bad = Vec::new();
    let mut filter = None;
    for var in ["WEFT_LOG", "RUST_LOG"] {
        match std::env::var(var) {
            Ok(v) if !v.trim().is_empty() => match EnvFilter::try_new(&v) {
                Ok(f) => {
                    filter = Some(f);
                    break;
                }
                Err(e) => bad.push(format!("{var}={v:?}: {e}")),
            },
            _ => {}
        }
    }
    let filter = filter.unwrap_or_else(|| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    for b in bad {
        tracing::warn!("ignoring the log filter {b}");
    }
}

/// Resolves on SIGINT or SIGTERM (whichever comes first). Where a handler
/// cannot be installed, on the other one; with neither, never.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    let wait = |s: Option<tokio::signal::unix::Signal>| async move {
        match s {
            Some(mut s) => {
                s.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = wait(term.ok()) => {}
        _ = wait(int.ok()) => {}
    }
}

/// This machine's host name (the kernel's, as `hostname` prints it), or
/// `None` where it cannot be read or is empty.
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The open-file limit (`RLIMIT_NOFILE`) of this process, after
/// [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    /// The soft limit found at start.
    pub before: u64,
    /// The soft limit now: descriptors this process may have open.
    pub soft: u64,
    /// The hard limit (the most the soft one may be raised to without privilege).
    pub hard: u64,
}

/// The largest soft limit the kernel accepts when the hard one is
/// unlimited (`fs.nr_open`'s default).
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The soft `RLIMIT_NOFILE` to set for limits `(soft, hard)`: the hard one
/// (or `fs.nr_open`'s default where it is unlimited), if that is higher.
pub fn nofile_target(soft: u64, hard: u64) -> Option<u64> {
    let ceiling = if hard == libc::RLIM_INFINITY {
        NR_OPEN_DEFAULT
    } else {
        hard
    };
    (ceiling > soft).then_some(ceiling)
}

/// Raises this process's soft open-file limit to its hard limit, as servers
/// that hold many sockets do (the usual soft default, 1024, is a few hundred
/// idle TCP connections away from `EMFILE`; the hard one is typically 524288
/// under systemd). Needs no privilege; where it is refused (e.g. a seccomp
/// filter), the limit found is returned with the error logged by the caller.
pub fn raise_nofile_limit() -> Result<NofileLimit, (NofileLimit, std::io::Error)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid, exclusive pointer.
    #[allow(unsafe_code)]
    let r = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let found = NofileLimit {
        before: lim.rlim_cur,
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
    };
    if r != 0 {
        return Err((found, std::io::Error::last_os_error()));
    }
    let Some(target) = nofile_target(lim.rlim_cur, lim.rlim_max) else {
        return Ok(found);
    };
    let new = libc::rlimit {
        rlim_cur: target,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: setrlimit reads one `rlimit` through a valid pointer.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) };
    if r != 0 {
        return Err((found, std::io::Error::last_os_error()));
    }
    Ok(NofileLimit {
        soft: target,
        ..found
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostname_is_trimmed_and_non_empty() {
        if let Some(h) = super::hostname() {
            assert!(!h.is_empty());
            assert_eq!(h, h.trim());
        }
    }

    #[test]
    fn the_soft_open_file_limit_goes_up_to_the_hard_one_never_down() {
        use super::nofile_target;
        assert_eq!(nofile_target(1024, 524_288), Some(524_288));
        assert_eq!(nofile_target(65_536, 65_536), None);
        // A soft limit above a (lowered) hard one is the kernel's business, not lowered here.
        assert_eq!(nofile_target(4096, 1024), None);
        assert_eq!(nofile_target(1024, libc::RLIM_INFINITY), Some(1 << 20));
    }

    #[test]
    fn raising_the_open_file_limit_keeps_the_hard_one() {
        match super::raise_nofile_limit() {
            Ok(l) => {
                assert!(l.soft >= l.before);
                assert!(l.soft <= l.hard || l.hard == libc::RLIM_INFINITY);
                let again = super::raise_nofile_limit().map_err(|(_, e)| e.to_string());
                assert_eq!(again.map(|a| (a.soft, a.hard)), Ok((l.soft, l.hard)));
            }
            // A sandbox that forbids setrlimit: reported, not fatal.
            Err((l, e)) => assert!(l.soft <= l.hard, "{e}"),
        }
    }
}
