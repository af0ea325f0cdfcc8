//! QUIC/TLS plumbing. The relay's certificate is self-signed and clients do
//! not verify it against any CA: authentication is the Noise IK handshake
//! that follows, bound to this TLS session through an exporter value (see
//! [`crate::noise`]). Clients still check the TLS 1.3 handshake signature so
//! the exporter really belongs to the session the relay signed.

#[cfg(feature = "server")]
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
#[cfg(feature = "server")]
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

#[cfg(feature = "server")]
use crate::error::StateError;

/// ALPN of protocol version 1.
pub const ALPN: &[u8] = b"weft-relay/1";
/// TLS server name clients send (the certificate's only name).
pub const SERVER_NAME: &str = "weft-relay";

/// Flow-control windows: large enough for multi-Gbit/s on one stream.
const STREAM_WINDOW: u32 = 16 * 1024 * 1024;
const CONN_WINDOW: u32 = 64 * 1024 * 1024;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Socket buffer size asked for (the kernel caps it at net.core.{r,w}mem_max):
/// room for bursts at multi-Gbit/s so the kernel does not drop datagrams.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// A UDP socket for a QUIC endpoint (or the relay's UDP port), with large buffers.
pub fn udp_socket(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = sock.set_only_v6(false);
    }
    grow_udp_buffers(&sock, SOCKET_BUFFER, "relay");
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Asks for `want` bytes of receive and of send buffer on a UDP socket, best effort. A plain
/// request is capped at `net.core.{r,w}mem_max` (208 KiB on a stock Debian: a burst of GRO
/// batches at Gbit/s overflows that, and every datagram lost there is a TCP retransmission
/// inside the tunnel); with `CAP_NET_ADMIN` (a relay or a mesh node run as root) the
/// `SO_*BUFFORCE` options go past the cap. Where the receive buffer stays smaller, says so
/// once per process, with the sysctl that fixes it. `what` names the socket's owner.
pub fn grow_udp_buffers(sock: &socket2::Socket, want: usize, what: &'static str) {
    use std::os::fd::AsRawFd;
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    // getsockopt reports twice what was set (the kernel's bookkeeping share).
    let granted = |v: std::io::Result<usize>| v.map_or(0, |n| n / 2);
    let force = |opt: libc::c_int| {
        let v = libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt on a descriptor `sock` owns, with a pointer to a c_int and its size.
        #[allow(unsafe_code)]
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
    };
    let _ = sock.set_recv_buffer_size(want);
    if granted(sock.recv_buffer_size()) < want {
        force(libc::SO_RCVBUFFORCE);
    }
    let _ = sock.set_send_buffer_size(want);
    if granted(sock.send_buffer_size()) < want {
        force(libc::SO_SNDBUFFORCE);
    }
    let got = granted(sock.recv_buffer_size());
    if got < want && !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            socket = what,
            receive_buffer_kib = got / 1024,
            wanted_kib = want / 1024,
            "UDP receive buffer smaller than asked: bursts at Gbit/s may be dropped; run as root \
             or raise it with `sysctl -w net.core.rmem_max={want}`"
        );
    }
}

/// A client endpoint on `bind` (port 0) with large socket buffers.
pub fn client_endpoint(bind: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        udp_socket(bind)?,
        Arc::new(quinn::TokioRuntime),
    )
}

/// Transport parameters shared by relay and clients.
pub fn transport(idle: Duration, keepalive: Option<Duration>, max_streams: u32) -> TransportConfig {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONN_WINDOW))
        .send_window(u64::from(CONN_WINDOW))
        .max_concurrent_bidi_streams(VarInt::from_u32(max_streams))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .keep_alive_interval(keepalive)
        .max_idle_timeout(IdleTimeout::try_from(idle).ok());
    t
}

/// A certificate chain (leaf first) and its key.
pub type CertChain = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

#[cfg(feature = "server")]
/// The certificate `serve` uses: the operator's PEM files when configured,
/// else the self-signed pair in the state dir (created on first start).
pub fn server_cert(
    state_dir: &Path,
    files: &crate::config::TlsFiles,
) -> Result<CertChain, StateError> {
    match (&files.cert_file, &files.key_file) {
        (Some(c), Some(k)) => load_pem(c, k),
        _ => load_or_create_cert(state_dir).map(|(c, k)| (vec![c], k)),
    }
}

#[cfg(feature = "server")]
/// Reads an operator-provided PEM chain and key; errors name the file.
pub fn load_pem(cert: &Path, key: &Path) -> Result<CertChain, StateError> {
    use rustls::pki_types::pem::PemObject;
    let bad = |p: &Path, what: String| StateError::Cert(format!("{}: {what}", p.display()));
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| bad(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no CERTIFICATE block".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    // The key must sign for the leaf, or every handshake would fail later.
    let signing = provider()
        .key_provider
        .load_private_key(key_der.clone_key())
        .map_err(|e| bad(key, e.to_string()))?;
    let ck = rustls::sign::CertifiedKey::new(chain.clone(), signing);
    ck.keys_match()
        .map_err(|e| bad(key, format!("does not match {}: {e}", cert.display())))?;
    Ok((chain, key_der))
}

#[cfg(feature = "server")]
/// Loads `cert.der`/`cert.key` from the state dir or creates a self-signed pair.
pub fn load_or_create_cert(
    state_dir: &Path,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), StateError> {
    let cert_path = state_dir.join("cert.der");
    let key_path = state_dir.join("cert.key");
    if let (Ok(cert), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
        return Ok((
            CertificateDer::from(cert),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        ));
    }
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| StateError::Cert(e.to_string()))?;
    let key = ck.key_pair.serialize_der();
    std::fs::write(&cert_path, ck.cert.der()).map_err(|e| StateError::io(&cert_path, e))?;
    // The key file is binary DER; write_private takes text, so write bytes 0600 here.
    write_private_bytes(&key_path, &key)?;
    Ok((
        ck.cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
    ))
}

#[cfg(feature = "server")]
fn write_private_bytes(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| StateError::io(path, e))?;
    f.write_all(bytes).map_err(|e| StateError::io(path, e))
}

/// ALPN of the TCP/TLS fallback: plain HTTP/1.1 (upgraded to Weft's
/// framing), so HTTP-aware middleboxes and load balancers let it through.
pub const TCP_ALPN: &[u8] = b"http/1.1";

/// The relay's rustls config (TLS 1.3 only) with `alpn`.
pub fn rustls_server(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, String> {
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls.max_early_data_size = 0;
    Ok(tls)
}

/// The relay's QUIC server config.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    transport: TransportConfig,
) -> Result<quinn::ServerConfig, String> {
    let tls = rustls_server(chain, key, ALPN)?;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// A rustls client config (TLS 1.3) that accepts the relay's self-signed
/// certificate (see the module doc), offering `alpn`.
pub fn rustls_client(alpn: &[u8]) -> Result<rustls::ClientConfig, String> {
    let p = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoiseAuthenticated(p)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// A client config that accepts the relay's self-signed certificate.
pub fn client_config(transport: TransportConfig) -> Result<quinn::ClientConfig, String> {
    let tls = rustls_client(ALPN)?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Accepts any certificate (identity is proven by Noise), checks signatures.
#[derive(Debug)]
struct NoiseAuthenticated(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoiseAuthenticated {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[test]
    fn udp_buffers_grow_past_the_sysctl_cap_when_privileged() {
        let want = 8 << 20;
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        super::grow_udp_buffers(&sock, want, "test");
        let got = sock.recv_buffer_size().unwrap() / 2;
        // SAFETY: no arguments.
        #[allow(unsafe_code)]
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            assert!(got >= want, "receive buffer {got} < {want}");
            assert!(sock.send_buffer_size().unwrap() / 2 >= want);
        } else {
            assert!(got > 0);
        }
    }
}
