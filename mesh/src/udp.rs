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
    #[error("cannot move to UDP port {port}: the new socket is {got}, the running one {want}")]
    Family {
        port: u16,
        got: &'static str,
        want: &'static str,
    },
}

impl AsRawFd for UdpIo {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.socket.as_raw_fd()
    }
}

fn family(dual_stack: bool) -> &'static str {
    if dual_stack {
        "dual-stack IPv6"
    } else {
        "IPv4 only"
    }
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
        // Best effort: larger buffers absorb bursts (past the sysctl cap where we may).
        tunnel_relay::tls::grow_udp_buffers(&socket, SOCKET_BUFFER, "mesh");
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

    /// Moves the socket to `port` (0: a random one) while the data path
    /// runs, as `wg set NAME listen-port PORT` asks; returns the port bound.
    ///
    /// A new socket is bound and set up like the first (same family,
    /// buffers, `fwmark`), then `dup3(2)` puts it under this socket's file
    /// descriptor number. Every thread keeps using the same `UdpIo` with no
    /// lock on the data path: a `sendmsg`/`recvmmsg` already running finishes
    /// on the old socket, the next call uses the new one, and a `poll(2)`
    /// waiting on the old socket returns within its timeout (the data path
    /// polls with a short one). The old socket closes when the last of those
    /// calls lets go of it; a port in use fails with the old socket intact.
    pub fn rebind(&self, port: u16, fwmark: u32) -> Result<u16, BindError> {
        let fresh = UdpIo::bind(port, Some(fwmark))?;
        if fresh.dual_stack != self.dual_stack {
            return Err(BindError::Family {
                port,
                got: family(fresh.dual_stack),
                want: family(self.dual_stack),
            });
        }
        // SAFETY: both descriptors are open sockets owned by `UdpIo`s for the
        // duration of the call; dup3 atomically replaces what our descriptor
        // number refers to, and `fresh` closing its own number afterwards
        // leaves the new socket referenced by ours.
        let r = unsafe {
            libc::dup3(
                fresh.socket.as_raw_fd(),
                self.socket.as_raw_fd(),
                libc::O_CLOEXEC,
            )
        };
        if r < 0 {
            return Err(BindError::Setup(io::Error::last_os_error()));
        }
        drop(fresh);
        self.local_port().map_err(BindError::Setup)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Receives one datagram within `ms`, or `None`.
    fn recv_one(udp: &UdpIo, ms: i32) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        let mut meta = [RecvMeta::default()];
        let n = udp
            .recv(&mut [IoSliceMut::new(&mut buf)], &mut meta, ms)
            .unwrap();
        (n == 1).then(|| buf[..meta[0].len].to_vec())
    }

    #[test]
    fn rebind_moves_the_socket_under_the_same_descriptor() {
        let udp = UdpIo::bind(0, None).unwrap();
        let old = udp.local_port().unwrap();
        let fd = udp.socket.as_raw_fd();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"before", ("127.0.0.1", old)).unwrap();
        assert_eq!(recv_one(&udp, 1000).as_deref(), Some(&b"before"[..]));

        let new = udp.rebind(0, 0).unwrap();
        assert_ne!(new, old, "a random port other than the one in use");
        assert_eq!(udp.local_port().unwrap(), new);
        assert_eq!(udp.socket.as_raw_fd(), fd, "same descriptor number");

        // The new port receives; the old one is closed (nothing arrives).
        peer.send_to(b"old port", ("127.0.0.1", old)).unwrap();
        peer.send_to(b"after", ("127.0.0.1", new)).unwrap();
        assert_eq!(recv_one(&udp, 1000).as_deref(), Some(&b"after"[..]));
        assert_eq!(recv_one(&udp, 100), None);
        // Sends leave from the new port.
        udp.send(peer.local_addr().unwrap(), b"reply", None)
            .unwrap();
        let mut buf = [0u8; 16];
        peer.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from.port()), (&b"reply"[..], new));
    }

    #[test]
    fn rebind_to_a_port_in_use_fails_and_keeps_the_old_socket() {
        let udp = UdpIo::bind(0, None).unwrap();
        let old = udp.local_port().unwrap();
        let taken = UdpIo::bind(0, None).unwrap();
        let busy = taken.local_port().unwrap();
        let err = udp.rebind(busy, 0).unwrap_err();
        assert!(
            matches!(err, BindError::Bind { port, .. } if port == busy),
            "{err}"
        );
        assert_eq!(udp.local_port().unwrap(), old);
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.send_to(b"still here", ("127.0.0.1", old)).unwrap();
        assert_eq!(recv_one(&udp, 1000).as_deref(), Some(&b"still here"[..]));
    }
}
