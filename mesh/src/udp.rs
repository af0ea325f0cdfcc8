//! The node's one UDP socket (IPv6 dual-stack, IPv4 fallback) with UDP GSO
//! on send and GRO + recvmmsg on receive, through quinn-udp.
#![allow(unsafe_code)]

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use socket2::{Domain, Protocol, Socket, Type};
use std::os::fd::AsRawFd;

/// Socket buffer size asked of the kernel (it may cap it at rmem_max).
const SOCKET_BUFFER: usize = 8 << 20;

/// The WireGuard UDP socket, non-blocking; the data-path threads wait for
/// readiness with `poll(2)` themselves, so a packet wakes exactly the
/// thread that handles it (no async runtime hop on the data path).
pub struct UdpIo {
    socket: std::net::UdpSocket,
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
        Ok(UdpIo {
            socket: socket.into(),
            state,
            dual_stack,
        })
    }

    /// The port actually bound.
    pub fn local_port(&self) -> io::Result<u16> {
        self.socket.local_addr().map(|a| a.port())
    }

    /// Sets SO_MARK on the socket (0 clears it), as `wg set NAME fwmark` asks.
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        socket2::SockRef::from(&self.socket).set_mark(mark)
    }

    /// Most datagrams one GSO send may carry (1 without GSO).
    pub fn max_gso_segments(&self) -> usize {
        self.state.max_gso_segments()
    }

    /// Most datagrams one GRO receive buffer may hold.
    pub fn gro_segments(&self) -> usize {
        self.state.gro_segments()
    }

    fn transmit<'a>(
        &self,
        to: SocketAddr,
        contents: &'a [u8],
        segment_size: Option<usize>,
    ) -> Transmit<'a> {
        Transmit {
            destination: if self.dual_stack { map_v6(to) } else { to },
            ecn: None,
            contents,
            segment_size: segment_size.filter(|s| *s < contents.len()),
            src_ip: None,
        }
    }

    /// Sends `contents` to `to`; with `segment_size`, as several datagrams of
    /// that size (the last may be shorter) in one GSO send. Waits while the
    /// socket buffer is full (backpressure for the data path).
    pub fn send(
        &self,
        to: SocketAddr,
        contents: &[u8],
        segment_size: Option<usize>,
    ) -> io::Result<()> {
        let transmit = self.transmit(to, contents, segment_size);
        loop {
            match self.state.try_send((&self.socket).into(), &transmit) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(self.socket.as_raw_fd(), libc::POLLOUT, 100)?;
                }
                r => return r,
            }
        }
    }

    /// Sends one datagram without waiting; a full buffer drops it (for
    /// handshakes and keepalives from the timer task, which retries).
    pub fn try_send(&self, to: SocketAddr, contents: &[u8]) -> io::Result<()> {
        self.state
            .try_send((&self.socket).into(), &self.transmit(to, contents, None))
    }

    /// Waits up to `timeout_ms` for datagrams, then receives a batch of
    /// (possibly GRO-coalesced) datagrams; `Ok(0)` on timeout. Source
    /// addresses in `meta` are canonical (IPv4, not v4-mapped).
    pub fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        timeout_ms: i32,
    ) -> io::Result<usize> {
        let n = loop {
            match self.state.recv((&self.socket).into(), bufs, meta) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait(self.socket.as_raw_fd(), libc::POLLIN, timeout_ms)? {
                        return Ok(0);
                    }
                }
                r => break r?,
            }
        };
        for m in meta.iter_mut().take(n) {
            m.addr = SocketAddr::new(m.addr.ip().to_canonical(), m.addr.port());
        }
        Ok(n)
    }
}

/// Waits until `fd` is ready for `events` or `timeout_ms` passes; returns
/// whether it is ready.
pub fn wait(fd: std::os::fd::RawFd, events: libc::c_short, timeout_ms: i32) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    loop {
        // SAFETY: one valid pollfd, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
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
