//! Latency to far-away hosts, for lab hosts in "regions": packets a
//! namespace sends to given addresses are held for a set time before they
//! leave. The lab's kernel has no `netem` (nor `fq`, `tbf`: `tc` offers
//! only `pfifo`, `htb` and `clsact` there), so this is netem's fixed delay
//! done in user space, with real packets and the kernel's own stack:
//!
//! - two TUN devices in the namespace: `dlyin` and `dlyout`;
//! - a route per far address via `dlyin` (source: the host's address);
//! - a thread of the test process reads each packet from `dlyin`, holds it
//!   for the destination's delay (FIFO per destination) and writes it to
//!   `dlyout`, where it arrives as if received from a wire;
//! - `ip rule iif dlyout lookup 77` sends it on by the host's default
//!   route (`accept_local` lets a packet carry the host's own source address
//!   in; forwarding is on in the namespace).
//!
//! One way only (the host's sends): the round trip grows by the delay, which
//! is what a latency measurement sees. Replies are not delayed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::Netns;

/// Delays on a namespace's sends; the devices go with the namespace.
pub struct Delay {
    _ns: Netns,
}

const TABLE: u32 = 77;

impl Delay {
    /// Holds packets `ns` sends to each address of `delays` for its time
    /// before they leave through its default route via `gw`; `src` is the
    /// host's own address (the source of what it sends there).
    pub fn start(ns: &Netns, src: &str, gw: &str, delays: &[(&str, Duration)]) -> Delay {
        let (tx, rx) = mpsc::channel();
        let ns2 = ns.clone();
        std::thread::Builder::new()
            .name("lab-delay-open".into())
            .spawn(move || {
                ns2.enter_current_thread();
                let _ = tx.send((open_tun("dlyin"), open_tun("dlyout")));
            })
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        let (din, dout) = rx
            .recv()
            .unwrap_or_else(|e| panic!("opening the delay devices: {e}"));
        ns.exec(&format!(
            "ip link set dlyin up && ip link set dlyout up && \
             sysctl -qw net.ipv4.ip_forward=1 net.ipv4.conf.all.rp_filter=0 \
               net.ipv4.conf.dlyout.rp_filter=0 net.ipv4.conf.dlyout.accept_local=1 && \
             ip route add default via {gw} table {TABLE} && \
             ip rule add iif dlyout lookup {TABLE} priority 100"
        ));
        let mut table: HashMap<Ipv4Addr, Duration> = HashMap::new();
        for (ip, d) in delays {
            ns.exec(&format!("ip route add {ip}/32 dev dlyin src {src}"));
            table.insert(ip.parse().unwrap_or_else(|e| panic!("{ip}: {e}")), *d);
        }
        let out = Arc::new(dout);
        let mut queues: HashMap<Ipv4Addr, mpsc::Sender<(Instant, Vec<u8>)>> = HashMap::new();
        for ip in table.keys() {
            let (qtx, qrx) = mpsc::channel::<(Instant, Vec<u8>)>();
            let out = out.clone();
            std::thread::Builder::new()
                .name(format!("lab-delay-{ip}"))
                .spawn(move || {
                    for (at, pkt) in qrx {
                        let now = Instant::now();
                        if at > now {
                            std::thread::sleep(at - now);
                        }
                        if (&*out).write(&pkt).is_err() {
                            return;
                        }
                    }
                })
                .unwrap_or_else(|e| panic!("spawn: {e}"));
            queues.insert(*ip, qtx);
        }
        std::thread::Builder::new()
            .name("lab-delay-read".into())
            .spawn(move || {
                let mut din = din;
                let mut buf = vec![0u8; 65536];
                // Ends when the namespace (and with it the device) is gone.
                while let Ok(n) = din.read(&mut buf) {
                    if n < 20 || buf[0] >> 4 != 4 {
                        continue;
                    }
                    let dst = Ipv4Addr::new(buf[16], buf[17], buf[18], buf[19]);
                    if let (Some(d), Some(q)) = (table.get(&dst), queues.get(&dst)) {
                        let _ = q.send((Instant::now() + *d, buf[..n].to_vec()));
                    }
                }
            })
            .unwrap_or_else(|e| panic!("spawn: {e}"));
        Delay { _ns: ns.clone() }
    }
}

/// A TUN device `name` (no packet information header) in the calling
/// thread's namespace.
fn open_tun(name: &str) -> File {
    let path = c"/dev/net/tun";
    // SAFETY: open(2) on a constant path; the fd is owned by the File below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open /dev/net/tun: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just opened and is owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    // struct ifreq: a 16-byte name, then flags (short), padded to 40 bytes.
    let mut ifr = [0u8; 40];
    ifr[..name.len()].copy_from_slice(name.as_bytes());
    let flags = (libc::IFF_TUN | libc::IFF_NO_PI) as i16;
    ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes an ifreq-sized buffer we own.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifr.as_mut_ptr()) };
    assert_eq!(
        rc,
        0,
        "TUNSETIFF {name}: {}",
        std::io::Error::last_os_error()
    );
    file
}
