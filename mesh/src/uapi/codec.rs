//! Pure codec for the WireGuard cross-platform userspace API
//! (<https://www.wireguard.com/xplatform/>), as spoken by `wg(8)` and
//! wireguard-go.
//!
//! A request is `get=1` or `set=1` followed by `key=value` lines and ends
//! with an empty line; a response is `key=value` lines (for `get`) followed
//! by `errno=N` and an empty line. Keys are lowercase hex.
//!
//! This module only converts text; the device applies a [`SetRequest`] and
//! produces the [`DeviceInfo`] for a `get`.

use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;

use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// `EINVAL`: a key or value was invalid.
pub(crate) const EINVAL: i32 = 22;
/// `EPROTO`: the request was not well-formed protocol text.
pub(crate) const EPROTO: i32 = 71;

/// A parsed UAPI request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Request {
    /// `get=1`: report the device configuration and statistics.
    Get,
    /// `set=1`: change the device configuration.
    Set(SetRequest),
}

/// The body of a `set=1` request. `None` fields were not mentioned.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SetRequest {
    /// `private_key=`: `Some(None)` for the all-zero key, which removes it.
    pub private_key: Option<Option<PrivateKey>>,
    /// `listen_port=` (0 picks a random port).
    pub listen_port: Option<u16>,
    /// `fwmark=` (`Some(0)` clears the mark).
    pub fwmark: Option<u32>,
    /// `replace_peers=true`: remove all peers not (re)configured here.
    /// As in wireguard-go, it applies at its position: the device should
    /// remove existing peers before applying [`SetRequest::peers`].
    pub replace_peers: bool,
    /// Peer sections, in request order (one `public_key=` line each; the
    /// same key may appear more than once).
    pub peers: Vec<PeerChange>,
}

/// One peer section of a `set=1` request, started by `public_key=`.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerChange {
    /// `public_key=`.
    pub public_key: PublicKey,
    /// `remove=true`: remove the peer; the other fields are then to be
    /// ignored (wireguard-go applies later keys to a throwaway peer).
    pub remove: bool,
    /// `update_only=true`: only change the peer if it already exists.
    pub update_only: bool,
    /// `preshared_key=`: `Some(None)` for the all-zero key, which removes it.
    pub preshared_key: Option<Option<PresharedKey>>,
    /// `endpoint=` (a literal address; the UAPI does not resolve names).
    pub endpoint: Option<SocketAddr>,
    /// `persistent_keepalive_interval=` in seconds (`Some(0)` disables it).
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true`: drop the peer's existing allowed IPs
    /// before adding [`PeerChange::allowed_ips`]. Any `allowed_ip=` lines
    /// before it in the same section are discarded, as wireguard-go does.
    pub replace_allowed_ips: bool,
    /// `allowed_ip=` lines, host bits masked off.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerChange {
    /// A change that mentions only the peer's key (creates it if missing).
    pub fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// The device state reported by `get=1`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DeviceInfo {
    /// The private key, if set.
    pub private_key: Option<PrivateKey>,
    /// The UDP port actually bound (0 if none).
    pub listen_port: u16,
    /// The fwmark, if set (non-zero).
    pub fwmark: Option<u32>,
    /// The peers.
    pub peers: Vec<PeerInfo>,
}

/// One peer in a `get=1` response.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerInfo {
    /// The peer's public key.
    pub public_key: PublicKey,
    /// The preshared key, if set.
    pub preshared_key: Option<PresharedKey>,
    /// The current endpoint, if known.
    pub endpoint: Option<SocketAddr>,
    /// Time of the last completed handshake, since the UNIX epoch.
    pub last_handshake: Option<Duration>,
    /// Bytes received from the peer.
    pub rx_bytes: u64,
    /// Bytes sent to the peer.
    pub tx_bytes: u64,
    /// The persistent keepalive interval in seconds, if enabled.
    pub persistent_keepalive: Option<u16>,
    /// The peer's allowed IPs.
    pub allowed_ips: Vec<IpNet>,
}

impl PeerInfo {
    /// A peer known by its key only: no endpoint, handshake, traffic,
    /// keepalive or AllowedIPs yet (a `get` response fills the rest in).
    pub fn new(public_key: PublicKey) -> PeerInfo {
        PeerInfo {
            public_key,
            preshared_key: None,
            endpoint: None,
            last_handshake: None,
            rx_bytes: 0,
            tx_bytes: 0,
            persistent_keepalive: None,
            allowed_ips: Vec::new(),
        }
    }
}

/// A UAPI error: which line and key were bad, and the errno for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct UapiError {
    errno: i32,
    line: usize,
    message: String,
}

impl UapiError {
    fn at(errno: i32, line: usize, key: &str, message: impl fmt::Display) -> Self {
        let message = if key.is_empty() {
            format!("UAPI line {line}: {message}")
        } else {
            format!("UAPI line {line}: {key}: {message}")
        };
        Self {
            errno,
            line,
            message,
        }
    }

    /// The errno to send back to the client (`errno=N`).
    pub(crate) fn errno(&self) -> i32 {
        self.errno
    }

    /// The 1-based line of the request at fault (0 if none).
    #[cfg(test)]
    pub(crate) fn line(&self) -> usize {
        self.line
    }
}

/// Formats the end of a response: `errno=N` and the empty line.
pub(crate) fn format_errno(errno: i32) -> String {
    format!("errno={errno}\n\n")
}

/// Splits `key=value`; a line without `=` is a protocol error.
fn split_line(line: &str, line_no: usize) -> Result<(&str, &str), UapiError> {
    line.split_once('=').ok_or_else(|| {
        UapiError::at(
            EPROTO,
            line_no,
            "",
            format_args!("expected key=value, got {line:?}"),
        )
    })
}

fn invalid(line_no: usize, key: &str, message: impl fmt::Display) -> UapiError {
    UapiError::at(EINVAL, line_no, key, message)
}

fn parse_true(value: &str, line_no: usize, key: &str) -> Result<(), UapiError> {
    if value == "true" {
        Ok(())
    } else {
        Err(invalid(
            line_no,
            key,
            format_args!("invalid value {value:?}, only \"true\" is accepted"),
        ))
    }
}

fn parse_num<T: FromStr>(value: &str, line_no: usize, key: &str) -> Result<T, UapiError> {
    value
        .parse::<T>()
        .map_err(|_| invalid(line_no, key, format_args!("invalid number {value:?}")))
}

fn parse_hex_key<K>(
    value: &str,
    line_no: usize,
    key: &str,
    decode: impl Fn(&str) -> Result<K, crate::key::KeyError>,
) -> Result<K, UapiError> {
    decode(value).map_err(|e| invalid(line_no, key, e))
}

fn parse_endpoint(value: &str, line_no: usize, key: &str) -> Result<SocketAddr, UapiError> {
    SocketAddr::from_str(value).map_err(|_| {
        invalid(
            line_no,
            key,
            format_args!("invalid endpoint {value:?}, expected ip:port or [ipv6]:port"),
        )
    })
}

fn parse_prefix(value: &str, line_no: usize, key: &str) -> Result<IpNet, UapiError> {
    IpNet::from_str(value)
        .map(|n| n.trunc())
        .map_err(|e| invalid(line_no, key, format_args!("invalid prefix {value:?}: {e}")))
}

/// Parses one request: its lines without the terminating empty line (a
/// trailing newline is fine). The first line is `get=1` or `set=1`.
pub(crate) fn parse_request(text: &str) -> Result<Request, UapiError> {
    let text = text.trim_end_matches('\n');
    let mut lines = text.split('\n').enumerate().map(|(i, l)| (i + 1, l));
    let op = lines.next().map(|(_, l)| l).unwrap_or("");
    match op {
        "get=1" => {
            if let Some((line_no, line)) = lines.next() {
                return Err(invalid(
                    line_no,
                    "",
                    format_args!("get=1 takes no keys, got {line:?}"),
                ));
            }
            Ok(Request::Get)
        }
        "set=1" => parse_set(lines).map(Request::Set),
        _ => Err(UapiError::at(
            EPROTO,
            1,
            "",
            format_args!("unknown operation {op:?}, expected get=1 or set=1"),
        )),
    }
}

fn parse_set<'a>(lines: impl Iterator<Item = (usize, &'a str)>) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    for (line_no, line) in lines {
        if line.is_empty() {
            return Err(UapiError::at(
                EPROTO,
                line_no,
                "",
                "empty line inside a request",
            ));
        }
        let (key, value) = split_line(line, line_no)?;
        if key == "public_key" {
            let pk = parse_hex_key(value, line_no, key, PublicKey::from_hex)?;
            req.peers.push(PeerChange::new(pk));
            continue;
        }
        match req.peers.last_mut() {
            None => match key {
                "private_key" => {
                    let k = parse_hex_key(value, line_no, key, PrivateKey::from_hex)?;
                    req.private_key = Some((!k.is_zero()).then_some(k));
                }
                "listen_port" => req.listen_port = Some(parse_num(value, line_no, key)?),
                "fwmark" => req.fwmark = Some(parse_num(value, line_no, key)?),
                "replace_peers" => {
                    parse_true(value, line_no, key)?;
                    req.replace_peers = true;
                }
                _ => return Err(invalid(line_no, key, "invalid device key")),
            },
            Some(peer) => match key {
                "remove" => {
                    parse_true(value, line_no, key)?;
                    peer.remove = true;
                }
                "update_only" => {
                    parse_true(value, line_no, key)?;
                    peer.update_only = true;
                }
                "preshared_key" => {
                    let k = parse_hex_key(value, line_no, key, PresharedKey::from_hex)?;
                    peer.preshared_key = Some((!k.is_zero()).then_some(k));
                }
                "endpoint" => peer.endpoint = Some(parse_endpoint(value, line_no, key)?),
                "persistent_keepalive_interval" => {
                    peer.persistent_keepalive = Some(parse_num(value, line_no, key)?);
                }
                "replace_allowed_ips" => {
                    parse_true(value, line_no, key)?;
                    peer.replace_allowed_ips = true;
                    peer.allowed_ips.clear();
                }
                "allowed_ip" => peer.allowed_ips.push(parse_prefix(value, line_no, key)?),
                "protocol_version" => {
                    if value != "1" {
                        return Err(invalid(
                            line_no,
                            key,
                            format_args!("unsupported protocol version {value:?}"),
                        ));
                    }
                }
                _ => return Err(invalid(line_no, key, "invalid peer key")),
            },
        }
    }
    Ok(req)
}

const ZERO_KEY_HEX: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Formats a complete `get=1` response exactly as wireguard-go does,
/// ending with `errno=0` and the empty line.
pub(crate) fn format_get_response(info: &DeviceInfo) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let mut put = |args: fmt::Arguments<'_>| {
        let _ = out.write_fmt(args);
    };
    if let Some(k) = info.private_key.as_ref().filter(|k| !k.is_zero()) {
        put(format_args!("private_key={}\n", k.to_hex()));
    }
    if info.listen_port != 0 {
        put(format_args!("listen_port={}\n", info.listen_port));
    }
    if let Some(mark) = info.fwmark.filter(|m| *m != 0) {
        put(format_args!("fwmark={mark}\n"));
    }
    for p in &info.peers {
        put(format_args!("public_key={}\n", p.public_key.to_hex()));
        match &p.preshared_key {
            Some(k) => put(format_args!("preshared_key={}\n", k.to_hex())),
            None => put(format_args!("preshared_key={ZERO_KEY_HEX}\n")),
        }
        put(format_args!("protocol_version=1\n"));
        // The relay path shows as its synthetic endpoint ([100::INDEX]:0, in the
        // discard-only prefix); `mesh status` prints it as "relay".
        if let Some(ep) = p.endpoint {
            put(format_args!("endpoint={ep}\n"));
        }
        let hs = p.last_handshake.unwrap_or_default();
        put(format_args!("last_handshake_time_sec={}\n", hs.as_secs()));
        put(format_args!(
            "last_handshake_time_nsec={}\n",
            hs.subsec_nanos()
        ));
        put(format_args!("tx_bytes={}\n", p.tx_bytes));
        put(format_args!("rx_bytes={}\n", p.rx_bytes));
        put(format_args!(
            "persistent_keepalive_interval={}\n",
            p.persistent_keepalive.unwrap_or(0)
        ));
        for ip in &p.allowed_ips {
            put(format_args!("allowed_ip={ip}\n"));
        }
    }
    out.push_str(&format_errno(0));
    out
}

/// Peer fields while parsing a response, before the handshake halves meet.
struct PeerAcc {
    info: PeerInfo,
    hs_sec: u64,
    hs_nsec: u32,
}

impl PeerAcc {
    fn finish(mut self, line_no: usize) -> Result<PeerInfo, UapiError> {
        if self.hs_nsec >= 1_000_000_000 {
            return Err(invalid(
                line_no,
                "last_handshake_time_nsec",
                format_args!("{} is not below one second", self.hs_nsec),
            ));
        }
        self.info.last_handshake = (self.hs_sec != 0 || self.hs_nsec != 0)
            .then(|| Duration::new(self.hs_sec, self.hs_nsec));
        Ok(self.info)
    }
}

/// Parses a `get=1` response (the inverse of [`format_get_response`]).
/// An `errno=N` line with N != 0 is an error carrying N; unknown keys are
/// ignored for forward compatibility.
pub(crate) fn parse_get_response(text: &str) -> Result<DeviceInfo, UapiError> {
    let mut info = DeviceInfo::default();
    let mut peer: Option<PeerAcc> = None;
    for (idx, line) in text.split('\n').enumerate() {
        let line_no = idx + 1;
        if line.is_empty() {
            return Err(UapiError::at(
                EPROTO,
                line_no,
                "",
                "response ended before errno=",
            ));
        }
        let (key, value) = split_line(line, line_no)?;
        match key {
            "errno" => {
                let errno: i32 = parse_num(value, line_no, key)?;
                if errno != 0 {
                    return Err(UapiError {
                        errno,
                        line: line_no,
                        message: format!("device returned errno={errno}"),
                    });
                }
                if let Some(p) = peer.take() {
                    info.peers.push(p.finish(line_no)?);
                }
                return Ok(info);
            }
            "public_key" => {
                let pk = parse_hex_key(value, line_no, key, PublicKey::from_hex)?;
                if let Some(p) = peer.take() {
                    info.peers.push(p.finish(line_no)?);
                }
                peer = Some(PeerAcc {
                    info: PeerInfo::new(pk),
                    hs_sec: 0,
                    hs_nsec: 0,
                });
            }
            _ => match &mut peer {
                None => match key {
                    "private_key" => {
                        let k = parse_hex_key(value, line_no, key, PrivateKey::from_hex)?;
                        info.private_key = (!k.is_zero()).then_some(k);
                    }
                    "listen_port" => info.listen_port = parse_num(value, line_no, key)?,
                    "fwmark" => {
                        let m: u32 = parse_num(value, line_no, key)?;
                        info.fwmark = (m != 0).then_some(m);
                    }
                    _ => {}
                },
                Some(p) => match key {
                    "preshared_key" => {
                        let k = parse_hex_key(value, line_no, key, PresharedKey::from_hex)?;
                        p.info.preshared_key = (!k.is_zero()).then_some(k);
                    }
                    "endpoint" => p.info.endpoint = Some(parse_endpoint(value, line_no, key)?),
                    "last_handshake_time_sec" => p.hs_sec = parse_num(value, line_no, key)?,
                    "last_handshake_time_nsec" => p.hs_nsec = parse_num(value, line_no, key)?,
                    "tx_bytes" => p.info.tx_bytes = parse_num(value, line_no, key)?,
                    "rx_bytes" => p.info.rx_bytes = parse_num(value, line_no, key)?,
                    "persistent_keepalive_interval" => {
                        let k: u16 = parse_num(value, line_no, key)?;
                        p.info.persistent_keepalive = (k != 0).then_some(k);
                    }
                    "allowed_ip" => p.info.allowed_ips.push(parse_prefix(value, line_no, key)?),
                    "private_key" | "listen_port" | "fwmark" => {
                        return Err(invalid(line_no, key, "device key inside a peer section"))
                    }
                    _ => {}
                },
            },
        }
    }
    Err(UapiError::at(
        EPROTO,
        0,
        "",
        "response ended without an errno= line",
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV6};

    /// Test-only formatter for a set request (what `wg set` sends), without
    /// the terminating empty line.
    fn format_set_request(req: &SetRequest) -> String {
        let mut out = String::from("set=1\n");
        match &req.private_key {
            Some(Some(k)) => out += &format!("private_key={}\n", k.to_hex()),
            Some(None) => out += &format!("private_key={ZERO_KEY_HEX}\n"),
            None => {}
        }
        if let Some(p) = req.listen_port {
            out += &format!("listen_port={p}\n");
        }
        if let Some(m) = req.fwmark {
            out += &format!("fwmark={m}\n");
        }
        if req.replace_peers {
            out += "replace_peers=true\n";
        }
        for p in &req.peers {
            out += &format!("public_key={}\n", p.public_key.to_hex());
            if p.remove {
                out += "remove=true\n";
            }
            if p.update_only {
                out += "update_only=true\n";
            }
            match &p.preshared_key {
                Some(Some(k)) => out += &format!("preshared_key={}\n", k.to_hex()),
                Some(None) => out += &format!("preshared_key={ZERO_KEY_HEX}\n"),
                None => {}
            }
            if let Some(ep) = p.endpoint {
                out += &format!("endpoint={ep}\n");
            }
            if let Some(k) = p.persistent_keepalive {
                out += &format!("persistent_keepalive_interval={k}\n");
            }
            if p.replace_allowed_ips {
                out += "replace_allowed_ips=true\n";
            }
            for ip in &p.allowed_ips {
                out += &format!("allowed_ip={ip}\n");
            }
        }
        out
    }

    fn pk(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    #[test]
    fn parse_get() {
        assert_eq!(parse_request("get=1"), Ok(Request::Get));
        assert_eq!(parse_request("get=1\n"), Ok(Request::Get));
        let e = parse_request("get=1\nlisten_port=1").unwrap_err();
        assert_eq!((e.errno(), e.line()), (EINVAL, 2));
    }

    #[test]
    fn parse_bad_operation() {
        for bad in ["", "put=1", "get=2", "set"] {
            let e = parse_request(bad).unwrap_err();
            assert_eq!(e.errno(), EPROTO, "{bad:?}");
        }
    }

    /// Exactly what `wg set wg0 private-key ... peer ... ` sends.
    #[test]
    fn parse_wg_set() {
        let k = PrivateKey::from_bytes([7; 32]);
        let text = format!(
            "set=1\n\
             private_key={}\n\
             listen_port=51820\n\
             fwmark=0\n\
             replace_peers=true\n\
             public_key={}\n\
             preshared_key={ZERO_KEY_HEX}\n\
             endpoint=[fd00::1]:51820\n\
             persistent_keepalive_interval=25\n\
             replace_allowed_ips=true\n\
             allowed_ip=10.0.0.0/24\n\
             allowed_ip=fd00::1/64\n\
             protocol_version=1\n\
             public_key={}\n\
             remove=true\n\
             public_key={}\n\
             update_only=true\n\
             endpoint=1.2.3.4:5\n",
            k.to_hex(),
            pk(1).to_hex(),
            pk(2).to_hex(),
            pk(3).to_hex()
        );
        let Request::Set(req) = parse_request(&text).unwrap() else {
            panic!("not a set")
        };
        assert_eq!(req.private_key, Some(Some(k)));
        assert_eq!(req.listen_port, Some(51820));
        assert_eq!(req.fwmark, Some(0));
        assert!(req.replace_peers);
        assert_eq!(req.peers.len(), 3);
        let p = &req.peers[0];
        assert_eq!(p.public_key, pk(1));
        assert_eq!(p.preshared_key, Some(None));
        assert_eq!(p.endpoint, Some("[fd00::1]:51820".parse().unwrap()));
        assert_eq!(p.persistent_keepalive, Some(25));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips, crate::parsed(&["10.0.0.0/24", "fd00::/64"]));
        assert!(req.peers[1].remove);
        assert!(req.peers[2].update_only);
        assert_eq!(req.peers[2].endpoint, Some("1.2.3.4:5".parse().unwrap()));
    }

    #[test]
    fn zero_private_key_removes() {
        let Request::Set(req) =
            parse_request(&format!("set=1\nprivate_key={ZERO_KEY_HEX}")).unwrap()
        else {
            panic!("not a set")
        };
        assert_eq!(req.private_key, Some(None));
    }

    #[test]
    fn replace_allowed_ips_discards_earlier_lines() {
        let text = format!(
            "set=1\npublic_key={}\nallowed_ip=10.0.0.1/32\nreplace_allowed_ips=true\nallowed_ip=10.0.0.2/32",
            pk(1).to_hex()
        );
        let Request::Set(req) = parse_request(&text).unwrap() else {
            panic!("not a set")
        };
        assert_eq!(req.peers[0].allowed_ips, crate::parsed(&["10.0.0.2/32"]));
    }

    #[test]
    fn set_errors() {
        let peer = format!("set=1\npublic_key={}\n", pk(1).to_hex());
        let cases: Vec<(String, i32, usize, &str)> = vec![
            ("set=1\nlisten_port=65536".into(), EINVAL, 2, "listen_port"),
            ("set=1\nlisten_port".into(), EPROTO, 2, "key=value"),
            ("set=1\n\nlisten_port=1".into(), EPROTO, 2, "empty line"),
            ("set=1\nprivate_key=abcd".into(), EINVAL, 2, "private_key"),
            (
                "set=1\nreplace_peers=false".into(),
                EINVAL,
                2,
                "replace_peers",
            ),
            (
                "set=1\nendpoint=1.2.3.4:5".into(),
                EINVAL,
                2,
                "invalid device key",
            ),
            ("set=1\nbogus=1".into(), EINVAL, 2, "bogus"),
            ("set=1\npublic_key=zz".into(), EINVAL, 2, "public_key"),
            (
                format!("{peer}listen_port=1"),
                EINVAL,
                3,
                "invalid peer key",
            ),
            (
                format!("{peer}endpoint=host.example:1"),
                EINVAL,
                3,
                "endpoint",
            ),
            (format!("{peer}endpoint=1.2.3.4"), EINVAL, 3, "endpoint"),
            (
                format!("{peer}allowed_ip=10.0.0.1"),
                EINVAL,
                3,
                "allowed_ip",
            ),
            (
                format!("{peer}allowed_ip=10.0.0.1/33"),
                EINVAL,
                3,
                "allowed_ip",
            ),
            (format!("{peer}protocol_version=2"), EINVAL, 3, "protocol"),
            (format!("{peer}remove=yes"), EINVAL, 3, "remove"),
            (format!("{peer}update_only=1"), EINVAL, 3, "update_only"),
            (
                format!("{peer}persistent_keepalive_interval=-1"),
                EINVAL,
                3,
                "keepalive",
            ),
        ];
        for (text, errno, line, needle) in cases {
            let e = parse_request(&text).unwrap_err();
            assert_eq!((e.errno(), e.line()), (errno, line), "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(
                e.to_string().starts_with(&format!("UAPI line {line}: ")),
                "{e}"
            );
        }
    }

    #[test]
    fn get_response_matches_wireguard_go() {
        let info = DeviceInfo {
            private_key: Some(PrivateKey::from_bytes([0xab; 32])),
            listen_port: 51820,
            fwmark: None,
            peers: vec![
                PeerInfo {
                    public_key: pk(1),
                    preshared_key: None,
                    endpoint: Some("[fd00::1]:4500".parse().unwrap()),
                    last_handshake: Some(Duration::new(1_700_000_000, 5)),
                    rx_bytes: 10,
                    tx_bytes: 20,
                    persistent_keepalive: Some(25),
                    allowed_ips: crate::parsed(&["10.0.0.0/24", "fd00::/64"]),
                },
                PeerInfo {
                    preshared_key: Some(PresharedKey::from_bytes([0x11; 32])),
                    ..PeerInfo::new(pk(2))
                },
            ],
        };
        let expected = format!(
            "private_key={}\n\
             listen_port=51820\n\
             public_key={}\n\
             preshared_key={ZERO_KEY_HEX}\n\
             protocol_version=1\n\
             endpoint=[fd00::1]:4500\n\
             last_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=5\n\
             tx_bytes=20\n\
             rx_bytes=10\n\
             persistent_keepalive_interval=25\n\
             allowed_ip=10.0.0.0/24\n\
             allowed_ip=fd00::/64\n\
             public_key={}\n\
             preshared_key={}\n\
             protocol_version=1\n\
             last_handshake_time_sec=0\n\
             last_handshake_time_nsec=0\n\
             tx_bytes=0\n\
             rx_bytes=0\n\
             persistent_keepalive_interval=0\n\
             errno=0\n\n",
            "ab".repeat(32),
            pk(1).to_hex(),
            pk(2).to_hex(),
            "11".repeat(32),
        );
        let text = format_get_response(&info);
        assert_eq!(text, expected);
        assert_eq!(parse_get_response(&text), Ok(info));
    }

    #[test]
    fn get_response_fwmark_and_empty() {
        let info = DeviceInfo {
            fwmark: Some(7),
            ..Default::default()
        };
        assert_eq!(format_get_response(&info), "fwmark=7\nerrno=0\n\n");
        assert_eq!(format_get_response(&DeviceInfo::default()), "errno=0\n\n");
        assert_eq!(parse_get_response("errno=0\n\n"), Ok(DeviceInfo::default()));
    }

    #[test]
    fn get_response_errors() {
        let e = parse_get_response("errno=5\n\n").unwrap_err();
        assert_eq!(e.errno(), 5);
        assert!(e.to_string().contains("errno=5"));
        assert_eq!(
            parse_get_response("listen_port=1\n").unwrap_err().errno(),
            EPROTO
        );
        assert_eq!(parse_get_response("").unwrap_err().errno(), EPROTO);
        let e = parse_get_response("listen_port=x\nerrno=0\n\n").unwrap_err();
        assert_eq!((e.errno(), e.line()), (EINVAL, 1));
        let text = format!(
            "public_key={}\nlast_handshake_time_nsec=1000000000\nerrno=0\n\n",
            pk(1).to_hex()
        );
        assert_eq!(parse_get_response(&text).unwrap_err().errno(), EINVAL);
        // Unknown keys are ignored.
        let info = parse_get_response("listen_port=3\nfuture_key=1\nerrno=0\n\n").unwrap();
        assert_eq!(info.listen_port, 3);
    }

    #[test]
    fn errno_format() {
        assert_eq!(format_errno(0), "errno=0\n\n");
        assert_eq!(format_errno(EINVAL), "errno=22\n\n");
    }

    fn nonzero_key() -> impl Strategy<Value = [u8; 32]> {
        any::<[u8; 32]>().prop_map(|mut b| {
            b[0] |= 1;
            b
        })
    }

    fn socket_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<u32>(), any::<u16>())
                .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
            (any::<u128>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                0,
                0
            ))),
        ]
    }

    fn ip_net() -> impl Strategy<Value = IpNet> {
        prop_oneof![
            (any::<u32>(), 0u8..=32).prop_map(|(ip, len)| {
                IpNet::new(IpAddr::V4(Ipv4Addr::from(ip)), len)
                    .unwrap()
                    .trunc()
            }),
            (any::<u128>(), 0u8..=128).prop_map(|(ip, len)| {
                IpNet::new(IpAddr::V6(Ipv6Addr::from(ip)), len)
                    .unwrap()
                    .trunc()
            }),
        ]
    }

    fn peer_info() -> impl Strategy<Value = PeerInfo> {
        (
            any::<[u8; 32]>(),
            proptest::option::of(nonzero_key()),
            proptest::option::of(socket_addr()),
            proptest::option::of((1u64.., 0u32..1_000_000_000)),
            any::<u64>(),
            any::<u64>(),
            proptest::option::of(1u16..),
            proptest::collection::vec(ip_net(), 0..4),
        )
            .prop_map(|(pk, psk, endpoint, hs, rx, tx, ka, ips)| PeerInfo {
                public_key: PublicKey::from_bytes(pk),
                preshared_key: psk.map(PresharedKey::from_bytes),
                endpoint,
                last_handshake: hs.map(|(s, n)| Duration::new(s, n)),
                rx_bytes: rx,
                tx_bytes: tx,
                persistent_keepalive: ka,
                allowed_ips: ips,
            })
    }

    fn device_info() -> impl Strategy<Value = DeviceInfo> {
        (
            proptest::option::of(nonzero_key()),
            any::<u16>(),
            proptest::option::of(1u32..),
            proptest::collection::vec(peer_info(), 0..4),
        )
            .prop_map(|(k, port, fwmark, peers)| DeviceInfo {
                private_key: k.map(PrivateKey::from_bytes),
                listen_port: port,
                fwmark,
                peers,
            })
    }

    fn peer_change() -> impl Strategy<Value = PeerChange> {
        (
            any::<[u8; 32]>(),
            any::<(bool, bool, bool)>(),
            proptest::option::of(proptest::option::of(nonzero_key())),
            proptest::option::of(socket_addr()),
            proptest::option::of(any::<u16>()),
            proptest::collection::vec(ip_net(), 0..4),
        )
            .prop_map(
                |(pk, (remove, update_only, replace), psk, endpoint, ka, ips)| PeerChange {
                    public_key: PublicKey::from_bytes(pk),
                    remove,
                    update_only,
                    preshared_key: psk.map(|k| k.map(PresharedKey::from_bytes)),
                    endpoint,
                    persistent_keepalive: ka,
                    replace_allowed_ips: replace,
                    allowed_ips: ips,
                },
            )
    }

    fn set_request() -> impl Strategy<Value = SetRequest> {
        (
            proptest::option::of(proptest::option::of(nonzero_key())),
            proptest::option::of(any::<u16>()),
            proptest::option::of(any::<u32>()),
            any::<bool>(),
            proptest::collection::vec(peer_change(), 0..4),
        )
            .prop_map(|(k, port, fwmark, replace_peers, peers)| SetRequest {
                private_key: k.map(|k| k.map(PrivateKey::from_bytes)),
                listen_port: port,
                fwmark,
                replace_peers,
                peers,
            })
    }

    /// Lines that look like protocol text, to get past the first checks.
    fn protocolish() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            Just("private_key"),
            Just("listen_port"),
            Just("fwmark"),
            Just("replace_peers"),
            Just("public_key"),
            Just("remove"),
            Just("update_only"),
            Just("preshared_key"),
            Just("endpoint"),
            Just("persistent_keepalive_interval"),
            Just("replace_allowed_ips"),
            Just("allowed_ip"),
            Just("protocol_version"),
            Just("errno"),
            Just("last_handshake_time_nsec"),
            Just("x"),
        ];
        let value = prop_oneof![
            Just("true".to_owned()),
            Just("1".to_owned()),
            "[0-9a-f]{64}",
            "[0-9a-f]{0,70}",
            "[0-9.:\\[\\]/a-f]{0,40}",
            "\\PC{0,20}",
        ];
        proptest::collection::vec((key, value), 0..12).prop_map(|kvs| {
            let mut s = String::from("set=1\n");
            for (k, v) in kvs {
                s += &format!("{k}={v}\n");
            }
            s
        })
    }

    proptest! {
        #[test]
        fn get_response_roundtrip(info in device_info()) {
            let text = format_get_response(&info);
            prop_assert_eq!(parse_get_response(&text), Ok(info));
        }

        #[test]
        fn set_request_roundtrip(req in set_request()) {
            let text = format_set_request(&req);
            prop_assert_eq!(parse_request(&text), Ok(Request::Set(req)));
        }

        #[test]
        fn parse_request_never_panics(s in "\\PC*") {
            let _ = parse_request(&s);
            let _ = parse_get_response(&s);
        }

        #[test]
        fn parse_protocolish_never_panics(s in protocolish()) {
            let _ = parse_request(&s);
            let _ = parse_get_response(&s[6..]);
        }

        #[test]
        fn parse_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let s = String::from_utf8_lossy(&b);
            let _ = parse_request(&s);
            let _ = parse_get_response(&s);
        }
    }
}
