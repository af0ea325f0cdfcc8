//! The node's one UDP socket (IPv6 dual-stack, IPv4 fallback) with UDP GSO
//! on send and GRO + recvmmsg on receive, through quinn-udp.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::Interest;

/// Socket buffer size asked of the kernel (it may cap it at rmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// The WireGuard UDP socket.
pub struct UdpIo {
    socket: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// The socket is AF_INET6 with IPV6_V6ONLY off: IPv4 peers appear as
    /// v4-mapped addresses and must be sent to as such.
    dual_stack: bool,
}

/// Errors binding the socket.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("cannot listen on UDP port {port}: {source}")]
    Bind {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot set up the UDP socket: {0}")]
    Setup(#[source] io::Error),
}

impl UdpIo {
    /// Binds `[::]:port` (dual-stack), or `0.0.0.0:port` where IPv6 is off.
    /// Must be called inside a tokio runtime.
    pub fn bind(port: u16, fwmark: Option<u32>) -> Result<UdpIo, BindError> {
        let bind_err = |source| BindError::Bind { port, source };
        let (socket, dual_stack) = match bind_v6(port) {
            Ok(s) => (s, true),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => return Err(bind_err(e)),
            Err(_) => {
                let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                    .map_err(bind_err)?;
                s.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into())
                    .map_err(bind_err)?;
                (s, false)
            }
        };
        // Best effort: larger buffers absorb bursts; the kernel caps them.
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
        if let Some(mark) = fwmark.filter(|m| *m != 0) {
            socket.set_mark(mark).map_err(BindError::Setup)?;
        }
        socket.set_nonblocking(true).map_err(BindError::Setup)?;
        let state = UdpSocketState::new((&socket).into()).map_err(BindError::Setup)?;
        let socket = tokio::net::UdpSocket::from_std(socket.into()).map_err(BindError::Setup)?;
        Ok(UdpIo {
            socket,
            state,
            dual_stack,
        })
    }

    /// The port actually bound.
    pub fn local_port(&self) -> io::Result<u16> {
        self.socket.local_addr().map(|a| a.port())
    }

    /// Most datagrams one GSO send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Most datagrams one GRO receive buffer may hold.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    /// Sends `contents` to `to`; with `segment_size`, as several datagrams of
    /// that size (the last may be shorter) in one GSO send. Errors other than
    /// a full socket buffer are returned (the caller counts and drops).
    pub async fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let destination = if self.dual_stack { map_v6(to) } else { to };
        let transmit = Transmit {
            destination,
            ecn: None,
            contents,
            segment_size: segment_size.filter(|s| *s < contents.len()),
            src_ip: None,
        };
        self.socket
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.socket).into(), &transmit)
            })
            .await
    }

    /// Receives a batch of (possibly GRO-coalesced) datagrams. Source
    /// addresses in `meta` are canonical (IPv4, not v4-mapped).
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        let n = self
            .socket
            .async_io(Interest::READABLE, || {
                self.state.recv((&self.socket).into(), bufs, meta)
            })
            .await?;
        for m in meta.iter_mut().take(n) {
            m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
        }
        Ok(n)
    }
}

fn bind_v6(port: u16) -> io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(false)?;
    s.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)).into())?;
    Ok(s)
}

fn map_v6(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
        IpAddr::V6(_) => addr,
    }
}
