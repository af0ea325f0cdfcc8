//! The data path: two threads per node, one per direction (so both cores
//! work), each waiting on its own file descriptor with `poll(2)` so a packet
//! wakes the thread that handles it directly:
//! 1. TUN → UDP ([`Outbound`]): read a TSO super-packet (or a batch), split,
//!    encrypt each segment, send runs of equal-size datagrams to one peer
//!    with UDP GSO.
//! 2. UDP → TUN ([`Inbound`]): recvmmsg with UDP GRO, decrypt every segment,
//!    coalesce TCP segments again (GRO) and write few large packets to the
//!    TUN device.
//!
//! Each direction's state sits behind its own mutex; its thread takes it
//! with `lock`, the other thread only with `try_lock`, to do work that is
//! already there when it is awake anyway:
//! - the kernel answers a packet written to the TUN device (ICMP echo reply,
//!   TCP ACK) during the write, so the UDP → TUN thread sends it at once;
//! - after a thread has worked, it *lingers*: it polls the other direction
//!   for a short, self-tuning while ([`Linger`]) and handles the answer
//!   itself if it comes. On an idle machine every thread wake-up costs an
//!   idle-CPU wake (tens of µs in a VM); a request's answer caught by the
//!   thread that sent the request saves one per round trip.

use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use parking_lot::{Condvar, Mutex};
use quinn_udp::RecvMeta;
use tun_rs::{GROTable, SyncDevice, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};

use crate::device::{packet_destination, Device, Outgoing};
use crate::egress::{CtlPacket, Net};
use crate::peer::{Encap, DATA_OVERHEAD};

/// Largest UDP payload sum we put in one GSO send.
const GSO_MAX_BYTES: usize = 60_000;
/// Datagram buffers per recvmmsg.
const RECV_BATCH: usize = 8;
/// Plaintext room per decrypted packet kept in each TUN buffer.
const TUN_BUF: usize = 2048;
/// Capacity of each TUN write buffer: GRO coalesces segments into the first
/// buffer of a flow, in place, and only when it has room for a 64 KiB packet.
const TUN_BUF_CAPACITY: usize = 65535 + 2 * VIRTIO_NET_HDR_LEN;
/// Packets one TUN read batch may hold.
const TUN_READ_BATCH: usize = 4 * IDEAL_BATCH_SIZE;
/// Most segments one TSO super-packet splits into (64 KiB / a small MSS).
const TUN_SPLIT_MAX: usize = 128;
/// A direction quiet for this long (ns) sends a packet before reading more.
const IDLE_NS: u64 = 1_000_000;
/// How long a data-path thread waits before re-checking the stop flag.
const POLL_MS: i32 = 200;

/// Longest a thread lingers after its work by default; answers slower than
/// this (any peer further than a LAN) are left to wake the other thread.
/// `WEFT_MESH_LINGER_US` overrides it (0 turns lingering off).
pub(crate) const LINGER_MAX_DEFAULT: Duration = Duration::from_micros(400);
/// Shortest linger worth a spin.
const LINGER_MIN: Duration = Duration::from_micros(20);

/// A whole number from environment variable `name`, if set; one that is not a number is
/// reported (naming `unit`) and ignored.
fn env_number(name: &str, unit: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    match v.trim().parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) => {
            tracing::warn!(variable = name, value = %v, "not a number of {unit}; ignored");
            None
        }
    }
}

/// The longest linger from the environment (`WEFT_MESH_LINGER_US`, at most 10 ms), else
/// [`LINGER_MAX_DEFAULT`].
pub(crate) fn linger_max_from_env() -> Duration {
    env_number("WEFT_MESH_LINGER_US", "microseconds").map_or(LINGER_MAX_DEFAULT, |us| {
        Duration::from_micros(us.min(10_000))
    })
}

/// How long the poller keeps polling without sleeping after the last packet, from
/// `WEFT_MESH_BUSY_POLL_MS` (unset or 0: never; at most 60 s).
///
/// Busy-polling trades a CPU for latency, as the kernel's `net.core.busy_poll` does: while
/// packets come at least this often, one data-path thread per node never sleeps (it polls with
/// a zero timeout and `sched_yield`s between polls, so anything else runnable on its CPU goes
/// first), so a packet finds it awake with the path's code and data in the caches. A node
/// quiet for longer sleeps as without it.
pub(crate) fn busy_poll_from_env() -> Duration {
    env_number("WEFT_MESH_BUSY_POLL_MS", "milliseconds")
        .map_or(Duration::ZERO, |ms| Duration::from_millis(ms.min(60_000)))
}

/// One direction of the data path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    /// TUN → UDP.
    Out,
    /// UDP → TUN.
    In,
}

impl Dir {
    fn other(self) -> Dir {
        match self {
            Dir::Out => Dir::In,
            Dir::In => Dir::Out,
        }
    }
}

/// Packets one pump must handle for its direction to count as heavy: the
/// poller then hands its role to the other thread and works that direction
/// alone, so both cores work under load.
const HEAVY: usize = 8;
/// How long a thread that works a heavy direction alone waits for more
/// before giving the direction back to the poller.
const HOLD_MS: i32 = 5;

/// Who does what, decided under one small lock.
#[derive(Debug, Default)]
struct Roles {
    /// A thread is the poller: it waits on the descriptors (or handles what
    /// it saw, or lingers); the other thread sleeps until it is needed.
    leader: bool,
    /// A direction a thread works alone under heavy traffic, waiting on its
    /// descriptor itself; the poller leaves it out.
    owned: [bool; 2],
    /// Owned directions the poller left out of its current wait: giving one
    /// back kicks the poller so that it watches it again.
    excluded: [bool; 2],
}

/// What both data-path threads share.
pub(crate) struct DataPath {
    device: Arc<Device>,
    tun: Arc<SyncDevice>,
    net: Arc<Net>,
    /// Set on shutdown.
    stop: Arc<AtomicBool>,
    outbound: Mutex<Outbound>,
    inbound: Mutex<Inbound>,
    roles: Mutex<Roles>,
    /// Wakes the thread that is not the poller when it is needed.
    promote: Condvar,
    /// An eventfd in the poller's wait set, written when it must look again.
    kick: OwnedFd,
    /// When each direction last handled packets (ns since `epoch`), indexed by [`Dir`].
    last_work: [AtomicU64; 2],
    epoch: Instant,
    linger_max: Duration,
    /// Poll without sleeping while a packet came less than this long ago (ns; 0: never).
    busy_poll_ns: u64,
}

impl DataPath {
    pub(crate) fn new(
        device: Arc<Device>,
        tun: Arc<SyncDevice>,
        net: Arc<Net>,
        stop: Arc<AtomicBool>,
        linger_max: Duration,
        busy_poll: Duration,
    ) -> std::io::Result<DataPath> {
        // SAFETY: plain syscall; the descriptor is owned right away.
        let kick = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if kick < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DataPath {
            device,
            tun,
            net,
            stop,
            outbound: Mutex::new(Outbound::new()),
            inbound: Mutex::new(Inbound::new()),
            roles: Mutex::new(Roles::default()),
            promote: Condvar::new(),
            // SAFETY: a fresh descriptor nobody else owns.
            kick: unsafe { OwnedFd::from_raw_fd(kick) },
            last_work: [AtomicU64::new(0), AtomicU64::new(0)],
            epoch: Instant::now(),
            linger_max,
            busy_poll_ns: u64::try_from(busy_poll.as_nanos()).unwrap_or(u64::MAX),
        })
    }

    /// The data-path threads' names; each runs [`DataPath::run`].
    pub(crate) const THREADS: [&'static str; 2] = ["datapath-0", "datapath-1"];

    fn fd(&self, dir: Dir) -> RawFd {
        match dir {
            Dir::Out => self.tun.as_raw_fd(),
            Dir::In => self.net.udp.as_raw_fd(),
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Whether a pump of `dir` should read everything queued before it sends
    /// (to batch under load), rather than send what its first read got at
    /// once: only when `dir` handled packets in the last [`IDLE_NS`]. An idle
    /// direction's packet is usually alone (a ping, a request), and the read
    /// that would find the queue empty costs it a cold syscall before it leaves.
    fn drain(&self, dir: Dir) -> bool {
        self.now_ns()
            .saturating_sub(self.last_work[dir as usize].load(Ordering::Relaxed))
            < IDLE_NS
    }

    /// Whether the poller should poll without sleeping: busy-polling is on and either
    /// direction handled a packet within its window.
    fn busy(&self) -> bool {
        if self.busy_poll_ns == 0 {
            return false;
        }
        let last = self.last_work[0]
            .load(Ordering::Relaxed)
            .max(self.last_work[1].load(Ordering::Relaxed));
        last != 0 && self.now_ns().saturating_sub(last) < self.busy_poll_ns
    }

    /// Handles what is queued in `dir` with that direction's state held
    /// (waiting for it, or giving up at once with `wait = false`: `None`).
    fn pump(&self, dir: Dir, wait: bool) -> anyhow::Result<Option<usize>> {
        fn hold<T>(m: &Mutex<T>, wait: bool) -> Option<parking_lot::MutexGuard<'_, T>> {
            if wait {
                Some(m.lock())
            } else {
                m.try_lock()
            }
        }
        let n = match dir {
            Dir::Out => match hold(&self.outbound, wait) {
                Some(mut ob) => {
                    ob.pump(&self.device, &self.tun, &self.net, self.drain(Dir::Out))?
                }
                None => return Ok(None),
            },
            Dir::In => match hold(&self.inbound, wait) {
                Some(mut ib) => ib.pump(self)?,
                None => return Ok(None),
            },
        };
        if n > 0 {
            self.last_work[dir as usize].store(self.now_ns(), Ordering::Relaxed);
        }
        Ok(Some(n))
    }

    /// A data-path thread's loop, until `stop` is set or an error: become the
    /// poller when there is none (else sleep until promoted), poll, and work
    /// a direction alone when it turns heavy.
    ///
    /// One poller, not one thread per descriptor: a packet wakes at most one
    /// thread, and nobody at all while the poller is awake (handling a packet
    /// or lingering). With a thread asleep on each descriptor, the kernel
    /// woke the TUN thread for every answer the UDP thread had already sent
    /// inline, and the UDP thread for every answer the lingering TUN thread
    /// caught: each such wake costs the *waker* an IPI to an idle CPU (tens of
    /// µs in a VM), inside its `sendmsg` or TUN write.
    pub(crate) fn run(&self) -> anyhow::Result<()> {
        // One per direction worked: each learns how soon the other direction answers it.
        let mut lingers = [Linger::new(self.linger_max), Linger::new(self.linger_max)];
        while !self.stop.load(Ordering::Relaxed) {
            {
                let mut r = self.roles.lock();
                if r.leader {
                    self.promote
                        .wait_for(&mut r, Duration::from_millis(POLL_MS as u64));
                    if r.leader {
                        continue;
                    }
                }
                r.leader = true;
            }
            if let Some(heavy) = self.lead(&mut lingers)? {
                self.work(heavy)?;
            }
        }
        self.promote.notify_all();
        Ok(())
    }

    /// As the poller: waits on the descriptors of the directions nobody
    /// works alone (and the kick), handles what is ready, lingers. Returns a
    /// direction that turned heavy, having handed the poller's role to the
    /// other thread; `None` when stopping.
    fn lead(&self, lingers: &mut [Linger; 2]) -> anyhow::Result<Option<Dir>> {
        const DIRS: [Dir; 2] = [Dir::Out, Dir::In];
        while !self.stop.load(Ordering::Relaxed) {
            let watch = {
                let mut r = self.roles.lock();
                r.excluded = r.owned;
                r.owned.map(|o| !o)
            };
            // poll(2) skips entries with a negative descriptor.
            let mut fds = [
                pollfd(self.kick.as_raw_fd()),
                pollfd(if watch[0] { self.fd(Dir::Out) } else { -1 }),
                pollfd(if watch[1] { self.fd(Dir::In) } else { -1 }),
            ];
            let busy = self.busy();
            if !poll(&mut fds, if busy { 0 } else { POLL_MS })
                .context("waiting on the TUN device and the UDP socket")?
            {
                if busy {
                    // SAFETY: no arguments; cannot fail on Linux.
                    unsafe { libc::sched_yield() };
                }
                continue;
            }
            if fds[0].revents != 0 {
                let mut v = 0u64;
                // SAFETY: reads 8 bytes into `v` from our eventfd; EAGAIN is fine.
                unsafe { libc::read(self.kick.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
            }
            let mut first = None;
            for d in DIRS {
                if fds[1 + d as usize].revents == 0 {
                    continue;
                }
                let n = self.pump(d, true)?.unwrap_or(0);
                if n >= HEAVY {
                    {
                        let mut r = self.roles.lock();
                        r.leader = false;
                        r.owned[d as usize] = true;
                    }
                    self.promote.notify_one();
                    return Ok(Some(d));
                }
                if n > 0 {
                    first.get_or_insert(d);
                }
            }
            if let Some(d) = first {
                self.linger(d, &mut lingers[d as usize])?;
            }
        }
        Ok(None)
    }

    /// Works through heavy direction `d` alone, waiting on its descriptor
    /// itself, until it has been quiet for [`HOLD_MS`]; then gives it back
    /// and kicks the poller if it left `d` out.
    fn work(&self, d: Dir) -> anyhow::Result<()> {
        let fd = self.fd(d);
        while !self.stop.load(Ordering::Relaxed) {
            if self.pump(d, true)? > Some(0) {
                continue;
            }
            let mut fds = [pollfd(fd)];
            if !poll(&mut fds, HOLD_MS).context("waiting for more heavy traffic")? {
                break;
            }
        }
        let kick = {
            let mut r = self.roles.lock();
            r.owned[d as usize] = false;
            std::mem::take(&mut r.excluded[d as usize])
        };
        if kick {
            let one = 1u64;
            // SAFETY: writes 8 bytes from `one` to our eventfd; a full counter is fine.
            unsafe { libc::write(self.kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        Ok(())
    }

    /// After work in `own`: polls both descriptors without sleeping for up
    /// to the linger's budget (renewed by every packet handled), handling
    /// what comes unless another thread is at it. Then tunes the budget by
    /// whether the answer (work in the other direction) came.
    fn linger(&self, own: Dir, linger: &mut Linger) -> anyhow::Result<()> {
        let other = own.other();
        let since = self.now_ns();
        let budget = linger.budget(self.last_work[other as usize].load(Ordering::Relaxed));
        if budget.is_zero() {
            linger.missed(since);
            return Ok(());
        }
        let mut fds = [pollfd(self.fd(own)), pollfd(self.fd(other))];
        let mut deadline = Instant::now() + budget;
        let mut caught = false;
        loop {
            if poll(&mut fds, 0)? {
                let mut worked = false;
                for (i, d) in [own, other].into_iter().enumerate() {
                    if fds[i].revents == 0 {
                        continue;
                    }
                    match self.pump(d, false)? {
                        // Another thread is at it: it is awake, nothing to save.
                        None => return Ok(()),
                        Some(n) => {
                            caught |= n > 0 && d == other;
                            worked |= n > 0;
                        }
                    }
                }
                if worked {
                    deadline = Instant::now() + budget;
                }
            }
            if Instant::now() >= deadline || self.stop.load(Ordering::Relaxed) {
                break;
            }
            // Whatever else is runnable on this CPU (the application the
            // answer is for, the peer's threads on one machine) goes first:
            // lingering only ever uses time the CPU would spend idle.
            // SAFETY: no arguments; cannot fail on Linux.
            unsafe { libc::sched_yield() };
        }
        if caught {
            linger.caught();
        } else {
            linger.missed(since);
        }
        Ok(())
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// poll(2) on `fds` for up to `timeout_ms` (retrying on EINTR); whether any is ready.
fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> std::io::Result<bool> {
    loop {
        // SAFETY: a valid slice of pollfds and its length.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            return Ok(r > 0);
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// How long a thread lingers after its work, tuned like the kernel's
/// haltpoll governor: when the answer came after the linger had given up
/// (the other thread woke for it), the next linger is long enough to have
/// caught it, up to the maximum; when it came later than that or never, the
/// linger halves until it stops. Pure bookkeeping over times in ns.
#[derive(Debug)]
pub(crate) struct Linger {
    budget: Duration,
    max: Duration,
    /// When the last linger that caught nothing began (ns).
    missed_at: Option<u64>,
}

impl Linger {
    pub(crate) fn new(max: Duration) -> Linger {
        Linger {
            budget: Duration::ZERO,
            max,
            missed_at: None,
        }
    }

    /// The budget for a linger starting now; `other_last` is when the other
    /// direction last handled packets (ns), which tells whether the last
    /// missed linger was short of the answer.
    pub(crate) fn budget(&mut self, other_last: u64) -> Duration {
        if let Some(at) = self.missed_at.take() {
            let late = Duration::from_nanos(other_last.saturating_sub(at));
            if other_last > at && late <= self.max {
                self.budget = (late * 5 / 4).clamp(LINGER_MIN, self.max);
            } else {
                self.budget /= 2;
                if self.budget < LINGER_MIN {
                    self.budget = Duration::ZERO;
                }
            }
        }
        self.budget
    }

    pub(crate) fn caught(&mut self) {
        self.missed_at = None;
    }

    pub(crate) fn missed(&mut self, since: u64) {
        self.missed_at = Some(since);
    }
}

/// A run of equal-size encrypted datagrams to one endpoint, sent with one GSO call.
struct GsoRun {
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
    used: usize,
    /// The last datagram was shorter than `segment`: the run is closed.
    closed: bool,
}

impl GsoRun {
    fn new() -> GsoRun {
        GsoRun {
            to: None,
            segment: 0,
            count: 0,
            used: 0,
            closed: false,
        }
    }

    /// Whether a datagram of `len` bytes to `to` can extend this run.
    fn accepts(&self, to: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.count == 0
            || (self.to == Some(to)
                && !self.closed
                && len <= self.segment
                && self.count < max_segments
                && self.used + len <= GSO_MAX_BYTES)
    }

    fn push(&mut self, to: SocketAddr, len: usize) {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.count += 1;
        self.used += len;
    }

    fn flush(&mut self, device: &Device, net: &Net, buf: &[u8]) {
        if let Some(to) = self.to.filter(|_| self.count > 0) {
            let segment = (self.count > 1).then_some(self.segment);
            if let Err(e) = net.send(device, to, &buf[..self.used], segment) {
                tracing::debug!(%to, error = %e, "send failed");
            }
        }
        *self = GsoRun::new();
    }
}

/// The outbound half of the data path: TUN read buffers, the GSO output
/// buffer and the logic that drains the TUN queue into encrypted datagrams.
/// Behind a mutex shared by both threads: `tun-to-udp` pumps it when the TUN
/// device becomes readable, and `udp-to-tun` pumps it right after writing to
/// the TUN device, because the kernel answers a delivered packet (TCP ACK,
/// ICMP echo reply) during that write: sending the answer from the thread
/// that is already awake saves a thread wake-up per round trip. Holding the
/// lock while reading and sending keeps each flow's packets in order.
pub(crate) struct Outbound {
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    /// Room for one full GSO run plus the packet that did not fit it.
    out: Vec<u8>,
    handshake: Vec<u8>,
}

impl Outbound {
    fn new() -> Outbound {
        Outbound {
            original: vec![0u8; VIRTIO_NET_HDR_LEN + 65535],
            bufs: vec![vec![0u8; 65535]; TUN_READ_BATCH],
            sizes: vec![0usize; TUN_READ_BATCH],
            out: vec![0u8; GSO_MAX_BYTES + 65535 + 2 * DATA_OVERHEAD + 256],
            handshake: vec![0u8; 256],
        }
    }

    /// Reads what the TUN device has queued (without waiting; with `drain`
    /// false, only one read), encrypts it and sends it. Returns how many
    /// packets were read. Without `drain`, whatever the first read left
    /// stays queued: the poller's level-triggered wait sees it at once.
    fn pump(
        &mut self,
        device: &Device,
        tun: &SyncDevice,
        net: &Net,
        drain: bool,
    ) -> anyhow::Result<usize> {
        let udp = &*net.udp;
        let filter = net.managed.as_ref().map(|m| &m.filter);
        let Outbound {
            original,
            bufs,
            sizes,
            out,
            handshake,
        } = self;
        // Read everything queued (ACK trains, more super-packets) so one GSO
        // send carries many datagrams; stop while room for a full split remains.
        let mut n = 0;
        while bufs.len() - n >= TUN_SPLIT_MAX {
            match tun.recv_multiple(original, &mut bufs[n..], &mut sizes[n..], 0) {
                Ok(more) => {
                    n += more;
                    if !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading from the TUN device"),
            }
        }
        if n == 0 {
            return Ok(0);
        }
        let snap = device.snapshot();
        let max_segments = udp.max_gso_segments().max(1);
        let mut run = GsoRun::new();
        for (buf, &size) in bufs.iter().zip(sizes.iter()).take(n) {
            let packet = &buf[..size];
            let Some(peer) = packet_destination(packet).and_then(|d| snap.route(d)) else {
                device.counters.tx_no_route.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if let Some(f) = filter {
                f.outbound(packet);
            }
            // Encrypted size: padded to 16, plus header and tag; at least 148 for a handshake.
            let need = size.div_ceil(16) * 16 + DATA_OVERHEAD;
            if run.used + need.max(148) > out.len() {
                run.flush(device, net, out);
            }
            let start = run.used;
            match device.encapsulate(peer, packet, &mut out[start..start + need.max(148)]) {
                Some((to, Encap::Data(len))) => {
                    if !run.accepts(to, len, max_segments) {
                        run.flush(device, net, out);
                        out.copy_within(start..start + len, 0);
                    }
                    run.push(to, len);
                }
                Some((to, Encap::Handshake(len))) => {
                    handshake[..len].copy_from_slice(&out[start..start + len]);
                    if let Err(e) = net.send(device, to, &handshake[..len], None) {
                        tracing::debug!(%to, error = %e, "handshake send failed");
                    }
                }
                Some((_, Encap::Queued)) | None => {}
            }
        }
        run.flush(device, net, out);
        Ok(n)
    }
}

/// The inbound half of the data path: receive buffers, decrypted packets,
/// the GRO table for TUN writes.
pub(crate) struct Inbound {
    rbufs: [Vec<u8>; RECV_BATCH],
    meta: [RecvMeta; RECV_BATCH],
    tunbufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    gro: GROTable,
    outq: Vec<Outgoing>,
}

impl Inbound {
    fn new() -> Inbound {
        Inbound {
            rbufs: std::array::from_fn(|_| vec![0u8; 65535]),
            meta: [RecvMeta::default(); RECV_BATCH],
            tunbufs: Vec::new(),
            lens: Vec::new(),
            gro: GROTable::default(),
            outq: Vec::new(),
        }
    }

    /// Receives what the UDP socket has queued (without waiting), decrypts
    /// it and writes it to the TUN device; sends what the kernel answered
    /// during those writes unless the outbound thread is at it. Returns how
    /// many datagrams were received.
    fn pump(&mut self, dp: &DataPath) -> anyhow::Result<usize> {
        let (device, tun, net) = (&*dp.device, &*dp.tun, &*dp.net);
        let Inbound {
            rbufs,
            meta,
            tunbufs,
            lens,
            gro,
            outq,
        } = self;
        let udp = &*net.udp;
        let managed = net.managed.as_deref();
        let n = {
            let mut iovs = rbufs.each_mut().map(|b| IoSliceMut::new(b.as_mut_slice()));
            udp.recv(&mut iovs, meta, 0)
                .context("receiving from the UDP socket")?
        };
        if n == 0 {
            return Ok(0);
        }
        let snap = device.snapshot();
        let mut k = 0;
        for (m, buf) in meta.iter().zip(rbufs.iter()).take(n) {
            let stride = m.stride.max(1);
            for seg in buf[..m.len].chunks(stride) {
                if k == tunbufs.len() {
                    let mut b = Vec::with_capacity(TUN_BUF_CAPACITY);
                    b.resize(VIRTIO_NET_HDR_LEN + TUN_BUF, 0);
                    tunbufs.push(b);
                    lens.push(0);
                }
                let mut src = m.addr;
                let mut seg = seg;
                if let Some(mio) = managed {
                    // One socket carries WireGuard, STUN, disco and the fast relay path.
                    match crate::disco::classify(seg) {
                        crate::disco::Kind::WireGuard => {}
                        crate::disco::Kind::FastData => {
                            let fast = &mio.relay.fast;
                            let peer = tunnel_relay::relay_path::fast_slot(seg)
                                .filter(|_| fast.is_relay(&m.addr))
                                .and_then(|slot| fast.peer_of(device, slot))
                                .and_then(|k| device.relay_source(&k));
                            let Some(relay_src) = peer else {
                                device.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                                continue;
                            };
                            fast.received.fetch_add(1, Ordering::Relaxed);
                            src = relay_src;
                            seg = &seg[tunnel_relay::relay_path::FAST_HEADER..];
                            if crate::disco::classify(seg) != crate::disco::Kind::WireGuard {
                                // Disco through the relay stays on QUIC; anything else is junk.
                                device.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                        crate::disco::Kind::FastAck => {
                            mio.relay.fast.on_ack(m.addr, seg);
                            continue;
                        }
                        crate::disco::Kind::Stun | crate::disco::Kind::Disco => {
                            let _ = mio.ctl.try_send(CtlPacket::Udp(m.addr, seg.to_vec()));
                            continue;
                        }
                        crate::disco::Kind::Unknown => {
                            device.counters.rx_invalid.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                let tb = &mut tunbufs[k];
                if tb.len() < VIRTIO_NET_HDR_LEN + seg.len() {
                    tb.resize(VIRTIO_NET_HDR_LEN + seg.len(), 0);
                }
                if let Some(len) =
                    device.handle_datagram(&snap, src, seg, &mut tb[VIRTIO_NET_HDR_LEN..], outq)
                {
                    let pkt = &tb[VIRTIO_NET_HDR_LEN..VIRTIO_NET_HDR_LEN + len];
                    if managed.is_some_and(|mio| !mio.filter.inbound(pkt)) {
                        continue;
                    }
                    lens[k] = len;
                    k += 1;
                }
            }
        }
        if k > 0 {
            for (tb, len) in tunbufs.iter_mut().zip(lens.iter()).take(k) {
                tb.truncate(VIRTIO_NET_HDR_LEN + len);
            }
            if let Err(e) = tun.send_multiple(gro, &mut tunbufs[..k], VIRTIO_NET_HDR_LEN) {
                tracing::debug!(error = %e, "TUN write failed");
            }
            // Back to full size: the next datagram may be a handshake response,
            // after which boringtun encrypts a queued packet into the same
            // buffer, which must hold any packet, not just the response.
            for tb in tunbufs.iter_mut().take(k) {
                tb.resize(VIRTIO_NET_HDR_LEN + TUN_BUF, 0);
            }
            // Send what the kernel answered during those writes, unless the
            // other thread is already at it.
            if let Some(mut ob) = dp.outbound.try_lock() {
                if ob.pump(device, tun, net, dp.drain(Dir::Out))? > 0 {
                    dp.last_work[Dir::Out as usize].store(dp.now_ns(), Ordering::Relaxed);
                }
            }
        }
        for o in outq.drain(..) {
            if let Err(e) = net.send(device, o.to, &o.bytes, None) {
                tracing::debug!(to = %o.to, error = %e, "send failed");
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: u64 = 1_000;

    #[test]
    fn linger_grows_to_catch_an_answer_that_came_just_after_it_gave_up() {
        let max = Duration::from_micros(400);
        let mut l = Linger::new(max);
        // Nothing learned yet: no spinning.
        assert_eq!(l.budget(0), Duration::ZERO);
        l.missed(1_000 * US);
        // The answer came 120 µs after the work: the next linger covers it, with a margin.
        assert_eq!(l.budget(1_120 * US), Duration::from_micros(150));
        l.caught();
        // Caught: the budget stays.
        assert_eq!(l.budget(2_000 * US), Duration::from_micros(150));
    }

    #[test]
    fn linger_never_exceeds_its_maximum_and_halves_away_when_answers_are_late_or_absent() {
        let max = Duration::from_micros(400);
        let mut l = Linger::new(max);
        l.missed(0);
        // 390 µs late: within the maximum, so covered but capped.
        assert_eq!(l.budget(390 * US), max);
        // A WAN answer (2 ms) or none at all: halve, down to nothing.
        l.missed(10_000 * US);
        assert_eq!(l.budget(12_000 * US), max / 2);
        l.missed(20_000 * US);
        assert_eq!(l.budget(0), max / 4);
        l.missed(30_000 * US);
        assert_eq!(l.budget(0), max / 8);
        l.missed(40_000 * US);
        assert_eq!(l.budget(0), max / 16, "25 µs is still worth a spin");
        l.missed(50_000 * US);
        assert_eq!(l.budget(0), Duration::ZERO, "12.5 µs is not");
        // Still learning while it does not spin.
        l.missed(60_000 * US);
        assert_eq!(l.budget(60_080 * US), Duration::from_micros(100));
    }

    #[test]
    fn linger_is_off_with_a_zero_maximum() {
        let mut l = Linger::new(Duration::ZERO);
        l.missed(0);
        assert_eq!(l.budget(10 * US), Duration::ZERO);
        l.missed(100 * US);
        assert_eq!(l.budget(0), Duration::ZERO);
    }
}
