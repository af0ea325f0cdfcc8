//! What every Weft binary (`tunnel-relay`, `mesh`, `worker-agent`, `weft`)
//! does the same way, here because they all link this crate: logging, the
//! shutdown signal and the host name.

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

#[cfg(test)]
mod tests {
    #[test]
    fn hostname_is_trimmed_and_non_empty() {
        if let Some(h) = super::hostname() {
            assert!(!h.is_empty());
            assert_eq!(h, h.trim());
        }
    }
}
