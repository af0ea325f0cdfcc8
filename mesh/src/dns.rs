//! MagicDNS: the node answers `NAME.<domain>` for its peers and forwards
//! every other name to the system's resolvers.
//!
//! Two parts, as everywhere in this crate:
//! - [`Names`], a pure table: peer name → overlay addresses, and the decision
//!   for one query ([`Names::lookup`]: answer, no data, NXDOMAIN, or forward).
//!   The control plane replaces entries as peer-map deltas arrive.
//! - [`MagicDns`], a hickory-server `RequestHandler` (UDP and TCP transport,
//!   message parsing, truncation are hickory-server's), which answers from the
//!   table and forwards the raw query bytes to the upstream resolvers (taken
//!   from `/etc/resolv.conf` when the node starts, minus our own address), so
//!   upstream answers reach the client exactly as the upstream gave them.
//!
//! Names in our domain are authoritative (AA set). A name is one DNS label
//! (`gpu1.weft.internal`); deeper names under the domain are NXDOMAIN. Matching
//! is case-insensitive (RFC 4343).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Message, MessageType, Metadata, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use hickory_server::Server;
use parking_lot::RwLock;

/// Default MagicDNS domain (`.internal` is reserved for private use by ICANN).
pub const DEFAULT_DOMAIN: &str = "weft.internal";
/// TTL of our answers: short, peers come and go.
pub const TTL: u32 = 30;
/// How long one upstream may take to answer a forwarded query.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors building the table.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    /// Not a usable domain.
    #[error("invalid MagicDNS domain {0:?}: expected DNS labels like \"weft.internal\"")]
    Domain(String),
    /// Not a usable peer name.
    #[error("invalid peer name {0:?} for MagicDNS: expected one DNS label (a-z, 0-9, '-')")]
    Name(String),
}

/// What to do with one query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// Our name; these addresses answer the query type.
    Answer(Vec<IpAddr>),
    /// Our name (or the domain itself), but nothing of that type.
    NoData,
    /// Under our domain, but no such peer.
    NxDomain,
    /// Not ours: ask the upstream resolvers.
    Forward,
}

fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// The table of peer names.
#[derive(Debug, Clone)]
pub struct Names {
    domain: String,
    hosts: HashMap<String, Vec<IpAddr>>,
}

impl Names {
    /// An empty table for `domain` (e.g. `weft.internal`, case-insensitive,
    /// trailing dot optional).
    pub fn new(domain: &str) -> Result<Names, DnsError> {
        let d = domain.trim_end_matches('.').to_ascii_lowercase();
        if d.is_empty() || d.len() > 200 || !d.split('.').all(valid_label) {
            return Err(DnsError::Domain(domain.to_string()));
        }
        Ok(Names {
            domain: d,
            hosts: HashMap::new(),
        })
    }

    /// The domain, without trailing dot.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Adds or replaces a peer.
    pub fn set(&mut self, name: &str, addrs: Vec<IpAddr>) -> Result<(), DnsError> {
        let n = name.to_ascii_lowercase();
        if !valid_label(&n) {
            return Err(DnsError::Name(name.to_string()));
        }
        self.hosts.insert(n, addrs);
        Ok(())
    }

    /// Removes a peer.
    pub fn remove(&mut self, name: &str) {
        self.hosts.remove(&name.to_ascii_lowercase());
    }

    /// Peers in the table.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// The decision for a query of `qtype` about `qname` (any case, with or
    /// without the trailing dot).
    pub fn lookup(&self, qname: &str, qtype: RecordType) -> Lookup {
        let q = qname.trim_end_matches('.').to_ascii_lowercase();
        if q == self.domain {
            return Lookup::NoData;
        }
        let Some(label) = q
            .strip_suffix(self.domain.as_str())
            .and_then(|p| p.strip_suffix('.'))
        else {
            return Lookup::Forward;
        };
        let Some(addrs) = self.hosts.get(label) else {
            return Lookup::NxDomain;
        };
        let pick: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| match qtype {
                RecordType::A => a.is_ipv4(),
                RecordType::AAAA => a.is_ipv6(),
                RecordType::ANY => true,
                _ => false,
            })
            .collect();
        if pick.is_empty() {
            Lookup::NoData
        } else {
            Lookup::Answer(pick)
        }
    }
}

/// Upstream resolvers from the text of a resolv.conf: every `nameserver`
/// line, port 53, minus `exclude` (our own MagicDNS address: forwarding to
/// ourselves would loop).
pub fn upstreams_from_resolv_conf(text: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then(|| w.next()).flatten()
        })
        .filter_map(|a| a.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|a| !exclude.contains(a))
        .map(|a| SocketAddr::new(a, 53))
        .collect()
}

/// The hickory-server request handler.
#[derive(Clone)]
pub struct MagicDns {
    names: Arc<RwLock<Names>>,
    upstreams: Arc<Vec<SocketAddr>>,
}

impl MagicDns {
    /// A handler answering from `names` and forwarding to `upstreams`.
    pub fn new(names: Arc<RwLock<Names>>, upstreams: Vec<SocketAddr>) -> MagicDns {
        MagicDns {
            names,
            upstreams: Arc::new(upstreams),
        }
    }

    /// Serves on `addr`, UDP and TCP (same port); returns the server and the
    /// bound address. Dropping the server stops it.
    pub async fn serve(self, addr: SocketAddr) -> std::io::Result<(Server<MagicDns>, SocketAddr)> {
        let udp = tokio::net::UdpSocket::bind(addr).await?;
        let bound = udp.local_addr()?;
        let tcp = tokio::net::TcpListener::bind(bound).await?;
        let mut server = Server::new(self);
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        Ok((server, bound))
    }

    /// Sends `query` (raw DNS message) to each upstream in turn over UDP; the
    /// first parseable answer with the same id wins.
    async fn forward(&self, query: &[u8], id: u16) -> Option<Message> {
        for up in self.upstreams.iter() {
            let bind: SocketAddr = if up.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let Ok(sock) = tokio::net::UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.connect(up).await.is_err() || sock.send(query).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 65535];
            let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
                match Message::from_vec(&buf[..n]) {
                    Ok(m) if m.metadata.id == id => return Some(m),
                    _ => continue,
                }
            }
            tracing::debug!(upstream = %up, "upstream resolver did not answer");
        }
        None
    }
}

fn record(name: &Name, a: IpAddr) -> Record {
    let rdata = match a {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(name.clone(), TTL, rdata)
}

#[async_trait::async_trait]
impl RequestHandler for MagicDns {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        let (qname, qtype) = match request.request_info() {
            Ok(info) if request.metadata.message_type == MessageType::Query => (
                Name::from(info.query.name().clone()),
                info.query.query_type(),
            ),
            _ => {
                let msg = builder.error_msg(&request.metadata, ResponseCode::FormErr);
                return send(&mut response, msg, request).await;
            }
        };
        let decision = self.names.read().lookup(&qname.to_ascii(), qtype);
        match decision {
            Lookup::Answer(addrs) => {
                meta.authoritative = true;
                let records: Vec<Record> = addrs.into_iter().map(|a| record(&qname, a)).collect();
                let msg = builder.build(meta, records.iter(), &[], &[], &[]);
                send(&mut response, msg, request).await
            }
            Lookup::NoData => {
                meta.authoritative = true;
                send(&mut response, builder.build_no_records(meta), request).await
            }
            Lookup::NxDomain => {
                meta.authoritative = true;
                meta.response_code = ResponseCode::NXDomain;
                send(&mut response, builder.build_no_records(meta), request).await
            }
            Lookup::Forward => match self.forward(request.as_slice(), request.metadata.id).await {
                Some(up) => {
                    let mut m = up.metadata;
                    m.id = request.metadata.id;
                    let msg = builder.build(
                        m,
                        up.answers.iter(),
                        up.authorities.iter(),
                        &[],
                        up.additionals.iter(),
                    );
                    send(&mut response, msg, request).await
                }
                None => {
                    let msg = builder.error_msg(&request.metadata, ResponseCode::ServFail);
                    send(&mut response, msg, request).await
                }
            },
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    request: &Request,
) -> ResponseInfo {
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, src = %request.src(), "DNS response not sent");
            let mut h = hickory_server::proto::op::Header {
                metadata: Metadata::response_from_request(&request.metadata),
                counts: Default::default(),
            };
            h.metadata.response_code = ResponseCode::ServFail;
            ResponseInfo::from(h)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use hickory_server::proto::op::Query;

    fn table() -> Names {
        let mut n = Names::new("Weft.Internal.").unwrap();
        n.set("gpu1", crate::parsed(&["100.64.0.5", "fd7a:7765:6674::5"]))
            .unwrap();
        n.set("cpu-only", crate::parsed(&["100.64.0.6"])).unwrap();
        n
    }

    #[test]
    fn lookup_decisions() {
        let n = table();
        let v4: IpAddr = "100.64.0.5".parse().unwrap();
        let v6: IpAddr = "fd7a:7765:6674::5".parse().unwrap();
        let cases = [
            (
                "gpu1.weft.internal.",
                RecordType::A,
                Lookup::Answer(vec![v4]),
            ),
            (
                "GPU1.Weft.Internal",
                RecordType::AAAA,
                Lookup::Answer(vec![v6]),
            ),
            (
                "gpu1.weft.internal",
                RecordType::ANY,
                Lookup::Answer(vec![v4, v6]),
            ),
            ("cpu-only.weft.internal", RecordType::AAAA, Lookup::NoData),
            ("gpu1.weft.internal", RecordType::MX, Lookup::NoData),
            ("weft.internal.", RecordType::SOA, Lookup::NoData),
            ("nope.weft.internal", RecordType::A, Lookup::NxDomain),
            ("a.gpu1.weft.internal", RecordType::A, Lookup::NxDomain),
            ("example.com.", RecordType::A, Lookup::Forward),
            ("notweft.internal", RecordType::A, Lookup::Forward),
        ];
        for (name, rtype, want) in cases {
            assert_eq!(n.lookup(name, rtype), want, "{name} {rtype}");
        }
        let mut n = n;
        n.remove("GPU1");
        assert_eq!(
            n.lookup("gpu1.weft.internal", RecordType::A),
            Lookup::NxDomain
        );
    }

    #[test]
    fn bad_names_are_refused_with_the_name() {
        assert!(Names::new("").is_err());
        assert!(Names::new("we ft.internal").is_err());
        let mut n = Names::new(DEFAULT_DOMAIN).unwrap();
        let e = n.set("gpu_1", vec![]).unwrap_err();
        assert!(e.to_string().contains("gpu_1"), "{e}");
        assert!(n.set("a.b", vec![]).is_err());
        assert!(n.set("-a", vec![]).is_err());
    }

    #[test]
    fn resolv_conf_upstreams() {
        let text = "# comment\nsearch lan\nnameserver 10.0.0.53\nnameserver fe80::1%eth0\nnameserver 100.100.100.100\noptions edns0\nnameserver bogus\n";
        let got = upstreams_from_resolv_conf(text, &["100.100.100.100".parse().unwrap()]);
        assert_eq!(
            got,
            vec![
                "10.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> Message {
        let mut q = Message::query();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
            .await
            .expect("no DNS answer")
            .unwrap();
        let m = Message::from_vec(&buf[..n]).unwrap();
        assert_eq!(m.metadata.id, q.metadata.id);
        m
    }

    fn ips(m: &Message) -> Vec<IpAddr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn answers_peers_and_forwards_the_rest_over_udp() {
        // An "upstream" resolver: another MagicDns for another domain.
        let mut far = Names::new("up.test").unwrap();
        far.set("far", crate::parsed(&["192.0.2.7"])).unwrap();
        let up = MagicDns::new(Arc::new(RwLock::new(far)), vec![]);
        let (up_server, up_addr) = up.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();

        let names = Arc::new(RwLock::new(table()));
        let dns = MagicDns::new(names.clone(), vec![up_addr]);
        let (_server, addr) = dns.serve("127.0.0.1:0".parse().unwrap()).await.unwrap();

        let m = ask(addr, "gpu1.weft.internal.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative);
        assert_eq!(ips(&m), vec!["100.64.0.5".parse::<IpAddr>().unwrap()]);
        let m = ask(addr, "GPU1.weft.internal.", RecordType::AAAA).await;
        assert_eq!(
            ips(&m),
            vec!["fd7a:7765:6674::5".parse::<IpAddr>().unwrap()]
        );
        let m = ask(addr, "nope.weft.internal.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        // Forwarded, answered by the upstream.
        let m = ask(addr, "far.up.test.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert_eq!(ips(&m), vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        let m = ask(addr, "gone.up.test.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

        // A peer map change shows at once.
        names
            .write()
            .set("gpu2", crate::parsed(&["100.64.0.9"]))
            .unwrap();
        let m = ask(addr, "gpu2.weft.internal.", RecordType::A).await;
        assert_eq!(ips(&m), vec!["100.64.0.9".parse::<IpAddr>().unwrap()]);

        // Upstream gone: SERVFAIL, not silence.
        drop(up_server);
        let m = ask(addr, "far.up.test.", RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    }
}
