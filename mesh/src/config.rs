//! The wg-quick configuration format (`/etc/wireguard/wg0.conf`).
//!
//! [`parse`] is pure (text in, [`WgConfig`] out); [`load`] reads a file and
//! calls it. The rules follow `wg(8)` and `wg-quick(8)`:
//!
//! * one `[Interface]` section (required) and any number of `[Peer]`
//!   sections; section names and keys are case-insensitive;
//! * `#` starts a comment, on its own line or after a value;
//! * `Key = Value`, with whitespace around both trimmed;
//! * list fields (`Address`, `AllowedIPs`, `DNS`) are comma-separated and
//!   may be repeated, the lists concatenate;
//! * wg-quick-only keys (`DNS`, `Table`, `PreUp`, `PostUp`, `PreDown`,
//!   `PostDown`, `SaveConfig`) are accepted and ignored.
//!
//! Every error names the file, the line (0 for the whole file) and the field.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::Path;
use std::str::FromStr;

use ipnet::IpNet;

use crate::key::{PresharedKey, PrivateKey, PublicKey};

/// A parsed configuration file.
#[derive(Debug, Clone, PartialEq)]
pub struct WgConfig {
    /// The `[Interface]` section.
    pub interface: InterfaceConfig,
    /// The `[Peer]` sections, in file order.
    pub peers: Vec<PeerConfig>,
}

/// The `[Interface]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct InterfaceConfig {
    /// `PrivateKey` (required).
    pub private_key: PrivateKey,
    /// `Address`: interface addresses with their prefix length, as written
    /// (host bits kept); a bare address is /32 or /128.
    pub addresses: Vec<IpNet>,
    /// `ListenPort`; `None` picks a random port.
    pub listen_port: Option<u16>,
    /// `MTU`; `None` means the default.
    pub mtu: Option<u16>,
    /// `FwMark`; `off` and `0` are `None`.
    pub fwmark: Option<u32>,
}

/// One `[Peer]` section.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    /// `PublicKey` (required, unique across peers).
    pub public_key: PublicKey,
    /// `PresharedKey`.
    pub preshared_key: Option<PresharedKey>,
    /// `AllowedIPs`, with host bits masked off (as `wg` does); a bare
    /// address is a host route.
    pub allowed_ips: Vec<IpNet>,
    /// `Endpoint`.
    pub endpoint: Option<Endpoint>,
    /// `PersistentKeepalive` in seconds; `off` and `0` are `None`.
    pub persistent_keepalive: Option<u16>,
}

/// A peer's `Endpoint`: an address, or a host name resolved at start-up.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `1.2.3.4:51820` or `[fd00::1]:51820`.
    Addr(SocketAddr),
    /// `host.example:51820`.
    Host {
        /// The host name.
        host: String,
        /// The UDP port.
        port: u16,
    },
}

impl Endpoint {
    /// Resolves the endpoint (DNS for a host name, via the system resolver)
    /// and returns the first address.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::Addr(addr) => Ok(*addr),
            Self::Host { host, port } => (host.as_str(), *port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| {
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{host} resolved to no addresses"),
                    )
                }),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr(addr) => write!(f, "{addr}"),
            Self::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

impl FromStr for Endpoint {
    type Err = String;

    /// Parses `ip:port`, `[ipv6]:port` or `host:port`; the port is required.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Ok(addr) = SocketAddr::from_str(s) {
            if addr.port() == 0 {
                return Err(format!("invalid endpoint {s:?}: port must be 1-65535"));
            }
            return Ok(Self::Addr(addr));
        }
        if let Some(rest) = s.strip_prefix('[') {
            let Some((ip, after)) = rest.split_once(']') else {
                return Err(format!("invalid endpoint {s:?}: missing ']'"));
            };
            if ip.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!(
                    "invalid endpoint {s:?}: {ip:?} is not an IPv6 address"
                ));
            }
            let Some(port) = after.strip_prefix(':') else {
                return Err(format!(
                    "invalid endpoint {s:?}: missing port (expected [addr]:port)"
                ));
            };
            parse_port(s, port)?;
            // Well-formed pieces but SocketAddr refused it (e.g. a zone).
            return Err(format!("invalid endpoint {s:?}"));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            if s.parse::<IpAddr>().is_ok() {
                return Err(format!(
                    "invalid endpoint {s:?}: missing port (expected addr:port)"
                ));
            }
            return Err(format!(
                "invalid endpoint {s:?}: missing port (expected host:port)"
            ));
        };
        if host.contains(':') {
            return Err(format!(
                "invalid endpoint {s:?}: IPv6 addresses need brackets, as in [fd00::1]:51820"
            ));
        }
        let port = parse_port(s, port)?;
        if host.parse::<IpAddr>().is_ok() {
            // Should have parsed as a SocketAddr above.
            return Err(format!("invalid endpoint {s:?}"));
        }
        if !valid_hostname(host) {
            return Err(format!(
                "invalid endpoint {s:?}: {host:?} is not a valid host name"
            ));
        }
        Ok(Self::Host {
            host: host.to_owned(),
            port,
        })
    }
}

fn parse_port(endpoint: &str, port: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!(
            "invalid endpoint {endpoint:?}: port {port:?} is not a number 1-65535"
        )),
        Ok(p) => Ok(p),
    }
}

fn valid_hostname(host: &str) -> bool {
    // A single trailing dot (a fully qualified name) is fine.
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A configuration error, located in the file.
///
/// Displays as `{file}:{line}: {field}: {message}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {field}: {message}")]
pub struct ConfigError {
    /// The file name as given to [`parse`] or [`load`].
    pub file: String,
    /// 1-based line number; 0 means the whole file.
    pub line: usize,
    /// The key or construct at fault (`AllowedIPs`, `[Peer]`, ...).
    pub field: String,
    /// What was wrong.
    pub message: String,
}

/// Reads and parses a configuration file. A read failure is a
/// [`ConfigError`] on line 0 naming the file.
pub fn load(path: &Path) -> Result<WgConfig, ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &file),
        Err(e) => Err(ConfigError {
            file,
            line: 0,
            field: "file".to_owned(),
            message: format!("cannot read configuration: {e}"),
        }),
    }
}

/// Parses the text of a configuration file; `file` only labels errors.
pub fn parse(text: &str, file: &str) -> Result<WgConfig, ConfigError> {
    Parser {
        file,
        interface: None,
        peers: Vec::new(),
        current: Current::None,
    }
    .run(text)
}

/// A value with the line it was set on.
type At<T> = Option<(T, usize)>;

#[derive(Default)]
struct InterfaceBuilder {
    header_line: usize,
    private_key: At<PrivateKey>,
    addresses: Vec<IpNet>,
    listen_port: At<u16>,
    mtu: At<u16>,
    fwmark: At<Option<u32>>,
    table: At<()>,
    save_config: At<()>,
}

#[derive(Default)]
struct PeerBuilder {
    header_line: usize,
    public_key: At<PublicKey>,
    preshared_key: At<PresharedKey>,
    allowed_ips: Vec<IpNet>,
    endpoint: At<Endpoint>,
    persistent_keepalive: At<Option<u16>>,
}

enum Current {
    None,
    Interface,
    Peer,
}

struct Parser<'a> {
    file: &'a str,
    interface: Option<InterfaceBuilder>,
    peers: Vec<PeerBuilder>,
    current: Current,
}

impl Parser<'_> {
    fn err(&self, line: usize, field: &str, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.to_owned(),
            line,
            field: field.to_owned(),
            message: message.into(),
        }
    }

    fn run(mut self, text: &str) -> Result<WgConfig, ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (idx, raw) in text.lines().enumerate() {
            let line_no = idx + 1;
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            if line.starts_with('[') {
                self.section(line, line_no)?;
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                return Err(self.err(
                    line_no,
                    line,
                    "expected \"Key = Value\" or a [Section] header (missing '=')",
                ));
            };
            let (key, value) = (key.trim(), value.trim());
            if key.is_empty() {
                return Err(self.err(line_no, "syntax", "missing key name before '='"));
            }
            match self.current {
                Current::None => {
                    return Err(self.err(
                        line_no,
                        key,
                        "key outside a section (expected [Interface] or [Peer] first)",
                    ))
                }
                Current::Interface => self.interface_key(key, value, line_no)?,
                Current::Peer => self.peer_key(key, value, line_no)?,
            }
        }
        self.finish()
    }

    fn section(&mut self, line: &str, line_no: usize) -> Result<(), ConfigError> {
        if line.eq_ignore_ascii_case("[Interface]") {
            if let Some(first) = &self.interface {
                return Err(self.err(
                    line_no,
                    "[Interface]",
                    format!(
                        "duplicate [Interface] section (first on line {})",
                        first.header_line
                    ),
                ));
            }
            self.interface = Some(InterfaceBuilder {
                header_line: line_no,
                ..Default::default()
            });
            self.current = Current::Interface;
        } else if line.eq_ignore_ascii_case("[Peer]") {
            self.peers.push(PeerBuilder {
                header_line: line_no,
                ..Default::default()
            });
            self.current = Current::Peer;
        } else {
            return Err(self.err(
                line_no,
                line,
                "unknown section (expected [Interface] or [Peer])",
            ));
        }
        Ok(())
    }

    fn set_once<T>(
        &self,
        slot: &mut At<T>,
        value: T,
        key: &str,
        line_no: usize,
    ) -> Result<(), ConfigError> {
        if let Some((_, first)) = slot {
            return Err(self.err(
                line_no,
                key,
                format!("duplicate key (already set on line {first})"),
            ));
        }
        *slot = Some((value, line_no));
        Ok(())
    }

    fn interface_key(&mut self, key: &str, value: &str, line_no: usize) -> Result<(), ConfigError> {
        let mut b = self.interface.take().unwrap_or_default();
        let result = self.interface_key_inner(&mut b, key, value, line_no);
        self.interface = Some(b);
        result
    }

    fn interface_key_inner(
        &self,
        b: &mut InterfaceBuilder,
        key: &str,
        value: &str,
        line_no: usize,
    ) -> Result<(), ConfigError> {
        let bad = |msg: String| self.err(line_no, key, msg);
        match key.to_ascii_lowercase().as_str() {
            "privatekey" => {
                let k = PrivateKey::from_base64(value).map_err(|e| bad(e.to_string()))?;
                self.set_once(&mut b.private_key, k, key, line_no)
            }
            "address" => {
                for item in list_items(value).map_err(bad)? {
                    let net = parse_net(item).map_err(bad)?;
                    b.addresses.push(net);
                }
                Ok(())
            }
            "listenport" => {
                let p = value
                    .parse::<u16>()
                    .map_err(|_| bad(format!("invalid port {value:?}: expected 0-65535")))?;
                self.set_once(&mut b.listen_port, p, key, line_no)
            }
            "mtu" => {
                let mtu = value
                    .parse::<u16>()
                    .ok()
                    .filter(|m| *m >= MIN_MTU)
                    .ok_or_else(|| {
                        bad(format!("invalid MTU {value:?}: expected {MIN_MTU}-65535"))
                    })?;
                self.set_once(&mut b.mtu, mtu, key, line_no)
            }
            "fwmark" => {
                let mark = parse_fwmark(value).map_err(bad)?;
                self.set_once(&mut b.fwmark, mark, key, line_no)
            }
            "table" => self.set_once(&mut b.table, (), key, line_no),
            "saveconfig" => self.set_once(&mut b.save_config, (), key, line_no),
            "dns" | "preup" | "postup" | "predown" | "postdown" => Ok(()),
            _ => Err(bad(format!("unknown key {key:?} in [Interface] section"))),
        }
    }

    fn peer_key(&mut self, key: &str, value: &str, line_no: usize) -> Result<(), ConfigError> {
        let mut b = self.peers.pop().unwrap_or_default();
        let result = self.peer_key_inner(&mut b, key, value, line_no);
        self.peers.push(b);
        result
    }

    fn peer_key_inner(
        &self,
        b: &mut PeerBuilder,
        key: &str,
        value: &str,
        line_no: usize,
    ) -> Result<(), ConfigError> {
        let bad = |msg: String| self.err(line_no, key, msg);
        match key.to_ascii_lowercase().as_str() {
            "publickey" => {
                let k = PublicKey::from_base64(value).map_err(|e| bad(e.to_string()))?;
                if let Some(other) = self
                    .peers
                    .iter()
                    .find(|p| p.public_key.as_ref().is_some_and(|(pk, _)| *pk == k))
                {
                    return Err(bad(format!(
                        "duplicate peer {k} (already the peer on line {})",
                        other.header_line
                    )));
                }
                self.set_once(&mut b.public_key, k, key, line_no)
            }
            "presharedkey" => {
                let k = PresharedKey::from_base64(value).map_err(|e| bad(e.to_string()))?;
                self.set_once(&mut b.preshared_key, k, key, line_no)
            }
            "allowedips" => {
                for item in list_items(value).map_err(bad)? {
                    let net = parse_net(item).map_err(bad)?;
                    b.allowed_ips.push(net.trunc());
                }
                Ok(())
            }
            "endpoint" => {
                let ep = value.parse::<Endpoint>().map_err(bad)?;
                self.set_once(&mut b.endpoint, ep, key, line_no)
            }
            "persistentkeepalive" => {
                let ka = if value.eq_ignore_ascii_case("off") {
                    None
                } else {
                    let n = value.parse::<u16>().map_err(|_| {
                        bad(format!(
                            "invalid keepalive {value:?}: expected seconds 0-65535 or \"off\""
                        ))
                    })?;
                    (n != 0).then_some(n)
                };
                self.set_once(&mut b.persistent_keepalive, ka, key, line_no)
            }
            _ => Err(bad(format!("unknown key {key:?} in [Peer] section"))),
        }
    }

    fn finish(self) -> Result<WgConfig, ConfigError> {
        let Some(iface) = &self.interface else {
            return Err(self.err(0, "[Interface]", "missing [Interface] section"));
        };
        let Some((private_key, _)) = iface.private_key.clone() else {
            return Err(self.err(
                iface.header_line,
                "PrivateKey",
                "missing required key in [Interface] section",
            ));
        };
        if let Some((mtu, mtu_line)) = iface.mtu {
            if mtu < MIN_MTU_V6 && iface.addresses.iter().any(|a| a.addr().is_ipv6()) {
                return Err(self.err(
                    mtu_line,
                    "MTU",
                    format!(
                        "MTU {mtu} is below the IPv6 minimum of {MIN_MTU_V6}, \
                         but an IPv6 Address is configured"
                    ),
                ));
            }
        }
        let interface = InterfaceConfig {
            private_key,
            addresses: iface.addresses.clone(),
            listen_port: iface.listen_port.map(|(p, _)| p),
            mtu: iface.mtu.map(|(m, _)| m),
            fwmark: iface.fwmark.and_then(|(m, _)| m),
        };
        let mut peers = Vec::with_capacity(self.peers.len());
        for p in &self.peers {
            let Some((public_key, _)) = p.public_key else {
                return Err(self.err(
                    p.header_line,
                    "PublicKey",
                    "missing required key in [Peer] section",
                ));
            };
            peers.push(PeerConfig {
                public_key,
                preshared_key: p.preshared_key.as_ref().map(|(k, _)| k.clone()),
                allowed_ips: p.allowed_ips.clone(),
                endpoint: p.endpoint.as_ref().map(|(e, _)| e.clone()),
                persistent_keepalive: p.persistent_keepalive.and_then(|(k, _)| k),
            });
        }
        Ok(WgConfig { interface, peers })
    }
}

/// The smallest MTU accepted (the IPv4 minimum reassembly size).
const MIN_MTU: u16 = 576;
/// The smallest MTU usable when the interface carries IPv6.
const MIN_MTU_V6: u16 = 1280;

/// Splits a comma-separated list; an entirely empty value is an empty list.
fn list_items(value: &str) -> Result<Vec<&str>, String> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(str::trim)
        .map(|item| {
            if item.is_empty() {
                Err(format!("empty entry in list {value:?}"))
            } else {
                Ok(item)
            }
        })
        .collect()
}

/// Parses `addr/prefix` or a bare address (a host: /32 or /128).
fn parse_net(item: &str) -> Result<IpNet, String> {
    if item.contains('/') {
        IpNet::from_str(item).map_err(|e| format!("invalid network {item:?}: {e}"))
    } else {
        IpAddr::from_str(item)
            .map(IpNet::from)
            .map_err(|e| format!("invalid address {item:?}: {e}"))
    }
}

/// `off`, decimal, or `0x` hex; `off` and 0 mean no mark.
fn parse_fwmark(value: &str) -> Result<Option<u32>, String> {
    if value.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => value.parse::<u32>(),
    };
    parsed.map(|m| (m != 0).then_some(m)).map_err(|_| {
        format!("invalid fwmark {value:?}: expected a 32-bit number, 0x hex or \"off\"")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB1: &str = "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=";
    const PUB2: &str = "TrMvSoP4jYQlY6RIzBgbssQqY3vxI2Pi+y71lOWWXX0=";
    const PSK: &str = "E64rPRY/Qc3mKnUYDZ0bkGAGdB+3DJqgu8h/NIMGQZk=";

    fn err(text: &str) -> ConfigError {
        parse(text, "wg0.conf").unwrap_err()
    }

    fn iface() -> String {
        format!("[Interface]\nPrivateKey = {PRIV}\n")
    }

    #[test]
    fn full_example() {
        let text = format!(
            "# mesh node\n\
             [Interface]\n\
             PrivateKey = {PRIV}   # secret\n\
             Address = 10.0.0.1/24, fd00::1/64\n\
             address = 192.168.7.1\n\
             ListenPort = 51820\n\
             MTU = 1420\n\
             FwMark = 0x1234\n\
             DNS = 1.1.1.1, example.com\n\
             Table = off\n\
             PostUp = iptables -A FORWARD -i %i -j ACCEPT\n\
             PreUp = true\n\
             PreDown = true\n\
             PostDown = true\n\
             SaveConfig = false\n\
             \n\
             [Peer]\n\
             PublicKey = {PUB1}\n\
             PresharedKey = {PSK}\n\
             AllowedIPs = 10.0.0.2/32, 10.1.0.5/16\n\
             AllowedIPs = fd00::2\n\
             Endpoint = peer1.example.com:51820\n\
             PersistentKeepalive = 25\n\
             \n\
             [peer]\n\
             publickey = {PUB2}\n\
             allowedips = 0.0.0.0/0, ::/0\n\
             endpoint = [fd00::99]:4500\n\
             persistentkeepalive = off\n"
        );
        let cfg = parse(&text, "wg0.conf").unwrap();
        let i = &cfg.interface;
        assert_eq!(i.private_key, PrivateKey::from_base64(PRIV).unwrap());
        assert_eq!(
            i.addresses,
            crate::parsed(&["10.0.0.1/24", "fd00::1/64", "192.168.7.1/32"])
        );
        assert_eq!(i.listen_port, Some(51820));
        assert_eq!(i.mtu, Some(1420));
        assert_eq!(i.fwmark, Some(0x1234));
        assert_eq!(cfg.peers.len(), 2);

        let p = &cfg.peers[0];
        assert_eq!(p.public_key, PublicKey::from_base64(PUB1).unwrap());
        assert_eq!(
            p.preshared_key,
            Some(PresharedKey::from_base64(PSK).unwrap())
        );
        assert_eq!(
            p.allowed_ips,
            crate::parsed(&["10.0.0.2/32", "10.1.0.0/16", "fd00::2/128"])
        );
        assert_eq!(
            p.endpoint,
            Some(Endpoint::Host {
                host: "peer1.example.com".into(),
                port: 51820
            })
        );
        assert_eq!(p.persistent_keepalive, Some(25));

        let p = &cfg.peers[1];
        assert_eq!(p.public_key, PublicKey::from_base64(PUB2).unwrap());
        assert_eq!(p.preshared_key, None);
        assert_eq!(p.allowed_ips, crate::parsed(&["0.0.0.0/0", "::/0"]));
        assert_eq!(
            p.endpoint,
            Some(Endpoint::Addr("[fd00::99]:4500".parse().unwrap()))
        );
        assert_eq!(p.persistent_keepalive, None);
    }

    #[test]
    fn minimal_and_crlf() {
        let cfg = parse(&format!("[Interface]\r\nPrivateKey={PRIV}\r\n"), "x").unwrap();
        assert!(cfg.peers.is_empty());
        assert!(cfg.interface.addresses.is_empty());
        assert_eq!(cfg.interface.listen_port, None);
        assert_eq!(cfg.interface.mtu, None);
        assert_eq!(cfg.interface.fwmark, None);
    }

    #[test]
    fn error_display_format() {
        let e = err(&format!(
            "{}\n[Peer]\nPublicKey = {PUB1}\n\nAllowedIPs = 10.0.0.300/32\n",
            iface()
        ));
        assert_eq!(e.line, 7);
        assert_eq!(e.field, "AllowedIPs");
        assert!(
            e.to_string()
                .starts_with("wg0.conf:7: AllowedIPs: invalid network \"10.0.0.300/32\": "),
            "{e}"
        );
    }

    #[test]
    fn unknown_key() {
        let e = err(&format!("{}Bogus = 1\n", iface()));
        assert_eq!((e.line, e.field.as_str()), (3, "Bogus"));
        assert!(e.message.contains("unknown key \"Bogus\""), "{e}");
        // A peer key in the interface section is unknown there.
        let e = err(&format!("{}AllowedIPs = 10.0.0.0/8\n", iface()));
        assert!(e.message.contains("[Interface]"), "{e}");
        let e = err(&format!(
            "{}[Peer]\nPublicKey = {PUB1}\nMTU = 1400\n",
            iface()
        ));
        assert_eq!((e.line, e.field.as_str()), (5, "MTU"));
    }

    #[test]
    fn unknown_section() {
        let e = err(&format!("{}[Peers]\n", iface()));
        assert_eq!((e.line, e.field.as_str()), (3, "[Peers]"));
        assert!(e.message.contains("unknown section"), "{e}");
    }

    #[test]
    fn key_outside_section() {
        let e = err(&format!("# hi\nPrivateKey = {PRIV}\n[Interface]\n"));
        assert_eq!((e.line, e.field.as_str()), (2, "PrivateKey"));
        assert!(e.message.contains("outside a section"), "{e}");
    }

    #[test]
    fn missing_equals() {
        let e = err(&format!("{}ListenPort 51820\n", iface()));
        assert_eq!(e.line, 3);
        assert!(e.message.contains("missing '='"), "{e}");
        let e = err(&format!("{} = 5\n", iface()));
        assert!(e.message.contains("missing key"), "{e}");
    }

    #[test]
    fn duplicate_single_key() {
        let e = err(&format!("{}ListenPort = 1\nlistenport = 2\n", iface()));
        assert_eq!((e.line, e.field.as_str()), (4, "listenport"));
        assert!(e.message.contains("already set on line 3"), "{e}");
        let e = err(&format!(
            "{}[Peer]\nPublicKey = {PUB1}\nEndpoint = 1.2.3.4:1\nEndpoint = 1.2.3.4:2\n",
            iface()
        ));
        assert_eq!((e.line, e.field.as_str()), (6, "Endpoint"));
        let e = err(&format!("{}PrivateKey = {PRIV}\n", iface()));
        assert_eq!(e.line, 3);
    }

    #[test]
    fn duplicate_interface() {
        let e = err(&format!("{}[Interface]\n", iface()));
        assert_eq!((e.line, e.field.as_str()), (3, "[Interface]"));
    }

    #[test]
    fn duplicate_peer() {
        let e = err(&format!(
            "{}[Peer]\nPublicKey = {PUB1}\n[Peer]\nPublicKey = {PUB1}\n",
            iface()
        ));
        assert_eq!((e.line, e.field.as_str()), (6, "PublicKey"));
        assert!(e.message.contains("duplicate peer"), "{e}");
        assert!(e.message.contains("line 3"), "{e}");
    }

    #[test]
    fn missing_required() {
        let e = err("# nothing\n");
        assert_eq!((e.line, e.field.as_str()), (0, "[Interface]"));
        let e = err("\n[Interface]\nListenPort = 1\n");
        assert_eq!((e.line, e.field.as_str()), (2, "PrivateKey"));
        let e = err(&format!("{}[Peer]\nAllowedIPs = 10.0.0.1\n", iface()));
        assert_eq!((e.line, e.field.as_str()), (3, "PublicKey"));
        assert_eq!(
            e.to_string(),
            "wg0.conf:3: PublicKey: missing required key in [Peer] section"
        );
    }

    #[test]
    fn bad_keys() {
        let e = err("[Interface]\nPrivateKey = abc\n");
        assert_eq!((e.line, e.field.as_str()), (2, "PrivateKey"));
        let e = err(&format!("{}[Peer]\nPublicKey = AAAA\n", iface()));
        assert!(e.message.contains("32 bytes"), "{e}");
        let e = err(&format!(
            "{}[Peer]\nPublicKey = {PUB1}\nPresharedKey = nope\n",
            iface()
        ));
        assert_eq!(e.field, "PresharedKey");
    }

    #[test]
    fn bad_addresses() {
        for bad in [
            "10.0.0.1/33",
            "fd00::1/129",
            "hello",
            "10.0.0.1/24,,10.0.0.2",
            "10.0.0.256",
        ] {
            let e = err(&format!("{}Address = {bad}\n", iface()));
            assert_eq!((e.line, e.field.as_str()), (3, "Address"), "{bad}");
        }
    }

    #[test]
    fn allowed_ips_host_bits_masked() {
        let cfg = parse(
            &format!(
                "{}[Peer]\nPublicKey = {PUB1}\nAllowedIPs = 10.1.2.3/8, fd00::1:2/64\n",
                iface()
            ),
            "x",
        )
        .unwrap();
        assert_eq!(
            cfg.peers[0].allowed_ips,
            crate::parsed(&["10.0.0.0/8", "fd00::/64"])
        );
    }

    #[test]
    fn empty_allowed_ips_ok() {
        let cfg = parse(
            &format!("{}[Peer]\nPublicKey = {PUB1}\nAllowedIPs =\n", iface()),
            "x",
        )
        .unwrap();
        assert!(cfg.peers[0].allowed_ips.is_empty());
    }

    #[test]
    fn bad_ports_and_numbers() {
        for (line, field) in [
            ("ListenPort = 65536", "ListenPort"),
            ("ListenPort = -1", "ListenPort"),
            ("MTU = 500", "MTU"),
            ("MTU = 70000", "MTU"),
            ("MTU = big", "MTU"),
            ("FwMark = 0xzz", "FwMark"),
            ("FwMark = 4294967296", "FwMark"),
        ] {
            let e = err(&format!("{}{line}\n", iface()));
            assert_eq!((e.line, e.field.as_str()), (3, field), "{line}");
        }
        let e = err(&format!(
            "{}[Peer]\nPublicKey = {PUB1}\nPersistentKeepalive = 70000\n",
            iface()
        ));
        assert_eq!((e.line, e.field.as_str()), (5, "PersistentKeepalive"));
    }

    #[test]
    fn mtu_v6_minimum() {
        let e = err(&format!("{}MTU = 1000\nAddress = fd00::1/64\n", iface()));
        assert_eq!((e.line, e.field.as_str()), (3, "MTU"));
        assert!(e.message.contains("IPv6"), "{e}");
        let cfg = parse(
            &format!("{}MTU = 1000\nAddress = 10.0.0.1/24\n", iface()),
            "x",
        )
        .unwrap();
        assert_eq!(cfg.interface.mtu, Some(1000));
    }

    #[test]
    fn fwmark_forms() {
        assert_eq!(parse_fwmark("off"), Ok(None));
        assert_eq!(parse_fwmark("0"), Ok(None));
        assert_eq!(parse_fwmark("51820"), Ok(Some(51820)));
        assert_eq!(parse_fwmark("0xCA6C"), Ok(Some(0xca6c)));
    }

    #[test]
    fn endpoints() {
        let ok = |s: &str| s.parse::<Endpoint>().unwrap();
        assert_eq!(
            ok("1.2.3.4:51820"),
            Endpoint::Addr("1.2.3.4:51820".parse().unwrap())
        );
        assert_eq!(
            ok("[fd00::1]:51820"),
            Endpoint::Addr("[fd00::1]:51820".parse().unwrap())
        );
        assert_eq!(
            ok("vpn.example.org:443"),
            Endpoint::Host {
                host: "vpn.example.org".into(),
                port: 443
            }
        );
        assert_eq!(ok("localhost:1").to_string(), "localhost:1");
        for bad in [
            "1.2.3.4",
            "1.2.3.4:",
            "1.2.3.4:0",
            "1.2.3.4:65536",
            "host.example",
            "host.example:port",
            "fd00::1:51820",
            "[fd00::1]",
            "[fd00::1",
            "[nothex]:1",
            ":51820",
            "bad host:1",
            "-bad.example:1",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad} should be rejected");
        }
        let e = err(&format!(
            "{}[Peer]\nPublicKey = {PUB1}\nEndpoint = 10.0.0.1\n",
            iface()
        ));
        assert_eq!((e.line, e.field.as_str()), (5, "Endpoint"));
        assert!(e.message.contains("missing port"), "{e}");
    }

    #[test]
    fn resolve_addr_and_localhost() {
        let a: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(Endpoint::Addr(a).resolve().unwrap(), a);
        let r = Endpoint::Host {
            host: "localhost".into(),
            port: 9,
        }
        .resolve()
        .unwrap();
        assert!(r.ip().is_loopback());
        assert_eq!(r.port(), 9);
    }

    #[test]
    fn load_missing_file_names_it() {
        let e = load(Path::new("/nonexistent/weft/wg9.conf")).unwrap_err();
        assert_eq!(e.line, 0);
        assert!(
            e.to_string().starts_with("/nonexistent/weft/wg9.conf:0: "),
            "{e}"
        );
    }

    #[test]
    fn trailing_comments_and_whitespace() {
        let cfg = parse(
            &format!(
                "  [Interface]  # the interface\n\tPrivateKey\t=\t{PRIV}\t# key\n  ListenPort=  7 #\n"
            ),
            "x",
        )
        .unwrap();
        assert_eq!(cfg.interface.listen_port, Some(7));
    }
}
