//! `mesh status`: ask a running node for its state over the UAPI socket and
//! render it like `wg show`, or as JSON.

use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::uapi::codec::{parse_get_response, DeviceInfo, PeerInfo, UapiError};

/// How long to wait for the node to accept, answer or take the request.
const TIMEOUT: Duration = Duration::from_secs(2);
/// Upper bound on a response, so a misbehaving peer cannot exhaust memory.
const MAX_RESPONSE: usize = 16 << 20;

/// Why the status could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// Nothing is listening on the socket.
    #[error(
        "cannot connect to UAPI socket {}: {source}; is `mesh up` running for this interface?",
        socket.display()
    )]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// The connection failed or timed out mid-exchange.
    #[error(
        "UAPI socket {}: {source}; is `mesh up` running for this interface?",
        socket.display()
    )]
    Io {
        /// The socket path.
        socket: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The node answered with an error or with text that does not parse.
    #[error("UAPI socket {}: {source}", socket.display())]
    Response {
        /// The socket path.
        socket: PathBuf,
        /// The decoding error or the node's errno.
        source: UapiError,
    },
}

/// Sends `get=1` to the node's UAPI socket and parses the answer.
pub fn query(socket: &Path) -> Result<DeviceInfo, StatusError> {
    let io_err = |source| StatusError::Io {
        socket: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| StatusError::Connect {
        socket: socket.to_owned(),
        source,
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.write_all(b"get=1\n\n").map_err(io_err)?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    // A get response has no empty line before the one ending it.
    while !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).map_err(io_err)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_RESPONSE {
            return Err(io_err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response too large",
            )));
        }
    }
    let text = String::from_utf8_lossy(&buf);
    parse_get_response(&text).map_err(|source| StatusError::Response {
        socket: socket.to_owned(),
        source,
    })
}

/// Renders the state like `wg show`.
pub fn render_human(interface: &str, info: &DeviceInfo, now: SystemTime) -> String {
    let mut out = format!("interface: {interface}\n");
    if let Some(k) = &info.private_key {
        out += &format!("  public key: {}\n", k.public_key());
        out += "  private key: (hidden)\n";
    }
    if info.listen_port != 0 {
        out += &format!("  listening port: {}\n", info.listen_port);
    }
    if let Some(mark) = info.fwmark {
        out += &format!("  fwmark: 0x{mark:x}\n");
    }
    for p in sorted_peers(info) {
        out += &format!("\npeer: {}\n", p.public_key);
        if p.preshared_key.is_some() {
            out += "  preshared key: (hidden)\n";
        }
        if let Some(ep) = p.endpoint {
            out += &format!("  endpoint: {}\n", endpoint_text(&ep));
        }
        let ips = if p.allowed_ips.is_empty() {
            "(none)".to_owned()
        } else {
            p.allowed_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        out += &format!("  allowed ips: {ips}\n");
        if let Some(hs) = p.last_handshake {
            out += &format!("  latest handshake: {}\n", ago(hs, now));
        }
        if p.rx_bytes != 0 || p.tx_bytes != 0 {
            out += &format!(
                "  transfer: {} received, {} sent\n",
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            );
        }
        if let Some(ka) = p.persistent_keepalive {
            out += &format!(
                "  persistent keepalive: every {}\n",
                pretty_time(u64::from(ka))
            );
        }
    }
    out
}

/// Renders the state as JSON. This is the documented, stable format of
/// `mesh status --json`; fields are only ever added, never changed:
///
/// ```text
/// {
///   "interface": "wg0",                 // string: the interface name
///   "public_key": "base64…" | null,     // null when no private key is set
///   "listen_port": 51820,               // integer, 0 when not bound
///   "peers": [                          // sorted by latest handshake, newest first
///     {
///       "public_key": "base64…",
///       "endpoint": "1.2.3.4:51820" | "[fd00::1]:51820" | "relay" | null,
///       "allowed_ips": ["10.0.0.2/32", "fd00::/64"],
///       "latest_handshake_unix": 1700000000 | null,  // whole seconds since the epoch
///       "latest_handshake_age_s": 65 | null,         // seconds before `now` (0 if in the future)
///       "rx_bytes": 1234,
///       "tx_bytes": 5678,
///       "persistent_keepalive_s": 25 | null
///     }
///   ]
/// }
/// ```
///
/// Private and preshared keys are never included.
/// An endpoint as users read it: `relay` for the relay path.
fn endpoint_text(ep: &std::net::SocketAddr) -> String {
    if crate::device::relay_index(ep).is_some() {
        "relay".to_owned()
    } else {
        ep.to_string()
    }
}

pub fn render_json(interface: &str, info: &DeviceInfo, now: SystemTime) -> Value {
    let now = since_epoch(now);
    let peers: Vec<Value> = sorted_peers(info)
        .into_iter()
        .map(|p| {
            json!({
                "public_key": p.public_key.to_base64(),
                "endpoint": p.endpoint.map(|e| endpoint_text(&e)),
                "allowed_ips": p.allowed_ips.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "latest_handshake_unix": p.last_handshake.map(|h| h.as_secs()),
                "latest_handshake_age_s": p.last_handshake.map(|h| now.as_secs().saturating_sub(h.as_secs())),
                "rx_bytes": p.rx_bytes,
                "tx_bytes": p.tx_bytes,
                "persistent_keepalive_s": p.persistent_keepalive,
            })
        })
        .collect();
    json!({
        "interface": interface,
        "public_key": info.private_key.as_ref().map(|k| k.public_key().to_base64()),
        "listen_port": info.listen_port,
        "peers": peers,
    })
}

/// Peers ordered like `wg show`: latest handshake first, never-handshaken
/// last, otherwise in device order.
fn sorted_peers(info: &DeviceInfo) -> Vec<&PeerInfo> {
    let mut peers: Vec<&PeerInfo> = info.peers.iter().collect();
    peers.sort_by_key(|p| std::cmp::Reverse(p.last_handshake));
    peers
}

fn since_epoch(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// `wg show`'s handshake age: "Now", "N units, ... ago", or a clock warning.
fn ago(handshake: Duration, now: SystemTime) -> String {
    let now = since_epoch(now).as_secs();
    let then = handshake.as_secs();
    if now == then {
        "Now".to_owned()
    } else if now < then {
        "(System clock wound backward; connection problems may ensue.)".to_owned()
    } else {
        format!("{} ago", pretty_time(now - then))
    }
}

/// `wg show`'s duration format: "1 year, 2 days, 1 minute, 5 seconds".
fn pretty_time(secs: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (365 * 24 * 3600, "year"),
        (24 * 3600, "day"),
        (3600, "hour"),
        (60, "minute"),
        (1, "second"),
    ];
    if secs == 0 {
        return "0 seconds".to_owned();
    }
    let mut rest = secs;
    let mut parts = Vec::new();
    for (size, name) in UNITS {
        let n = rest / size;
        rest %= size;
        if n != 0 {
            let plural = if n == 1 { "" } else { "s" };
            parts.push(format!("{n} {name}{plural}"));
        }
    }
    parts.join(", ")
}

/// `wg show`'s byte counts: "512 B", "1.20 KiB", "3.45 MiB", ...
fn bytes(b: u64) -> String {
    const KIB: u64 = 1024;
    let f = b as f64;
    if b < KIB {
        format!("{b} B")
    } else if b < KIB.pow(2) {
        format!("{:.2} KiB", f / KIB as f64)
    } else if b < KIB.pow(3) {
        format!("{:.2} MiB", f / KIB.pow(2) as f64)
    } else if b < KIB.pow(4) {
        format!("{:.2} GiB", f / KIB.pow(3) as f64)
    } else {
        format!("{:.2} TiB", f / KIB.pow(4) as f64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::key::{PresharedKey, PrivateKey, PublicKey};
    use crate::uapi::codec::format_get_response;
    use std::os::unix::net::UnixListener;

    fn pk(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn sample() -> (DeviceInfo, SystemTime) {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_065);
        let info = DeviceInfo {
            private_key: Some(PrivateKey::from_bytes([0x40; 32])),
            listen_port: 51820,
            fwmark: None,
            peers: vec![
                PeerInfo {
                    public_key: pk(2),
                    preshared_key: None,
                    endpoint: None,
                    last_handshake: None,
                    rx_bytes: 0,
                    tx_bytes: 0,
                    persistent_keepalive: None,
                    allowed_ips: vec![],
                },
                PeerInfo {
                    public_key: pk(1),
                    preshared_key: Some(PresharedKey::from_bytes([9; 32])),
                    endpoint: Some("[fd00::1]:51820".parse().unwrap()),
                    last_handshake: Some(Duration::new(1_700_000_000, 500)),
                    rx_bytes: 1229,
                    tx_bytes: 3_617_587,
                    persistent_keepalive: Some(25),
                    allowed_ips: vec!["10.0.0.2/32".parse().unwrap(), "fd00::/64".parse().unwrap()],
                },
            ],
        };
        (info, now)
    }

    #[test]
    fn human_like_wg_show() {
        let (info, now) = sample();
        let public = PrivateKey::from_bytes([0x40; 32]).public_key();
        let expected = format!(
            "interface: wg0\n\
             \x20 public key: {public}\n\
             \x20 private key: (hidden)\n\
             \x20 listening port: 51820\n\
             \n\
             peer: {}\n\
             \x20 preshared key: (hidden)\n\
             \x20 endpoint: [fd00::1]:51820\n\
             \x20 allowed ips: 10.0.0.2/32, fd00::/64\n\
             \x20 latest handshake: 1 minute, 5 seconds ago\n\
             \x20 transfer: 1.20 KiB received, 3.45 MiB sent\n\
             \x20 persistent keepalive: every 25 seconds\n\
             \n\
             peer: {}\n\
             \x20 allowed ips: (none)\n",
            pk(1),
            pk(2)
        );
        assert_eq!(render_human("wg0", &info, now), expected);
    }

    #[test]
    fn human_minimal() {
        let info = DeviceInfo {
            fwmark: Some(0xca6c),
            ..Default::default()
        };
        assert_eq!(
            render_human("wg1", &info, SystemTime::now()),
            "interface: wg1\n  fwmark: 0xca6c\n"
        );
    }

    #[test]
    fn json_schema() {
        let (info, now) = sample();
        let v = render_json("wg0", &info, now);
        let public = PrivateKey::from_bytes([0x40; 32]).public_key();
        assert_eq!(
            v,
            json!({
                "interface": "wg0",
                "public_key": public.to_base64(),
                "listen_port": 51820,
                "peers": [
                    {
                        "public_key": pk(1).to_base64(),
                        "endpoint": "[fd00::1]:51820",
                        "allowed_ips": ["10.0.0.2/32", "fd00::/64"],
                        "latest_handshake_unix": 1_700_000_000u64,
                        "latest_handshake_age_s": 65,
                        "rx_bytes": 1229,
                        "tx_bytes": 3_617_587,
                        "persistent_keepalive_s": 25,
                    },
                    {
                        "public_key": pk(2).to_base64(),
                        "endpoint": null,
                        "allowed_ips": [],
                        "latest_handshake_unix": null,
                        "latest_handshake_age_s": null,
                        "rx_bytes": 0,
                        "tx_bytes": 0,
                        "persistent_keepalive_s": null,
                    }
                ]
            })
        );
        let text = v.to_string();
        assert!(!text.contains(&PrivateKey::from_bytes([0x40; 32]).to_base64()));
        assert!(!text.contains(&PresharedKey::from_bytes([9; 32]).to_base64()));
        let empty = render_json("wg0", &DeviceInfo::default(), now);
        assert_eq!(empty["public_key"], Value::Null);
        assert_eq!(empty["peers"], json!([]));
    }

    #[test]
    fn handshake_ages() {
        let now = UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(ago(Duration::from_secs(1000), now), "Now");
        assert_eq!(ago(Duration::from_secs(999), now), "1 second ago");
        assert!(ago(Duration::from_secs(1001), now).contains("wound backward"));
        assert_eq!(
            pretty_time(365 * 86400 + 2 * 86400 + 3600 + 60 + 2),
            "1 year, 2 days, 1 hour, 1 minute, 2 seconds"
        );
        assert_eq!(pretty_time(0), "0 seconds");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(1024), "1.00 KiB");
        assert_eq!(bytes(1229), "1.20 KiB");
        assert_eq!(bytes(3_617_587), "3.45 MiB");
        assert_eq!(bytes(5 << 30), "5.00 GiB");
        assert_eq!(bytes(3 << 40), "3.00 TiB");
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("weft-status-{}-{name}.sock", std::process::id()))
    }

    #[test]
    fn query_missing_socket_hints() {
        let path = socket_path("missing");
        let e = query(&path).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(
            msg.contains("is `mesh up` running for this interface?"),
            "{msg}"
        );
    }

    /// Serves one connection: checks the request, sends `reply`.
    fn serve_once(name: &str, reply: String) -> (PathBuf, std::thread::JoinHandle<()>) {
        let path = socket_path(name);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = [0u8; 7];
            conn.read_exact(&mut req).unwrap();
            assert_eq!(&req, b"get=1\n\n");
            conn.write_all(reply.as_bytes()).unwrap();
        });
        (path, handle)
    }

    #[test]
    fn query_roundtrip() {
        let (info, _) = sample();
        let (path, handle) = serve_once("ok", format_get_response(&info));
        let got = query(&path).unwrap();
        handle.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(got, info);
    }

    #[test]
    fn query_device_errno() {
        let (path, handle) = serve_once("errno", "errno=5\n\n".to_owned());
        let e = query(&path).unwrap_err();
        handle.join().unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(matches!(&e, StatusError::Response { source, .. } if source.errno() == 5));
    }
}
