//! Overlay address allocation: deterministic, collision-free, stable.
//!
//! A node's IPv4 address is picked by hashing its public key to an offset in
//! the pool (default `100.64.0.0/10`) and probing forward until a free host
//! address is found, skipping the network and broadcast addresses and the
//! reserved ones ([`AddressPool::is_reserved`]). The same key therefore gets
//! the same address on every coordinator that has not handed it out already,
//! and the persisted record keeps it forever after (restore passes the stored
//! address back in through [`AddressPool::claim`]).
//!
//! The IPv6 address needs no allocation of its own: it is the ULA prefix
//! (default `fd7a:7765:6674::/48`, "weft" in its middle bytes) with the IPv4
//! address in its last 32 bits, so it is unique exactly when the IPv4 one is.
//!
//! Reserved: the first usable IPv4 host of the pool and its IPv6 twin
//! ([`AddressPool::dns_v4`], [`AddressPool::dns_v6`]) are the MagicDNS
//! resolver every node answers on locally.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use sha2::{Digest, Sha256};
use thiserror::Error;

use weft_proto::peermap::OverlayPools;
use weft_proto::PublicKey;

/// Default IPv4 pool (the CGNAT range, as Tailscale uses).
pub const DEFAULT_IPV4_POOL: &str = "100.64.0.0/10";
/// Default IPv6 ULA prefix (`7765:6674` is "weft" in ASCII).
pub const DEFAULT_IPV6_PREFIX: &str = "fd7a:7765:6674::/48";

/// Why a pool is unusable or full.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AddrError {
    /// The IPv4 pool is too small to be useful.
    #[error("IPv4 pool {0} is too small (need at most /24)")]
    PoolTooSmall(Ipv4Net),
    /// The IPv6 prefix cannot hold 32 host bits.
    #[error("IPv6 prefix {0} is too long (need at most /96)")]
    PrefixTooLong(Ipv6Net),
    /// Every address is taken.
    #[error("IPv4 pool {0} is exhausted")]
    Exhausted(Ipv4Net),
    /// A restored address lies outside the pool or is reserved.
    #[error("address {0} is outside the pool or reserved")]
    OutsidePool(Ipv4Addr),
    /// A restored address is used twice.
    #[error("address {0} is assigned twice")]
    Duplicate(Ipv4Addr),
}

/// The pool and the set of addresses in use.
#[derive(Debug, Clone)]
pub struct AddressPool {
    v4: Ipv4Net,
    v6: Ipv6Net,
    used: HashSet<Ipv4Addr>,
}

impl AddressPool {
    /// A pool; the IPv4 network must be /24 or larger, the IPv6 prefix /96 or shorter.
    pub fn new(v4: Ipv4Net, v6: Ipv6Net) -> Result<AddressPool, AddrError> {
        let (v4, v6) = (v4.trunc(), v6.trunc());
        if v4.prefix_len() > 24 {
            return Err(AddrError::PoolTooSmall(v4));
        }
        if v6.prefix_len() > 96 {
            return Err(AddrError::PrefixTooLong(v6));
        }
        Ok(AddressPool {
            v4,
            v6,
            used: HashSet::new(),
        })
    }

    /// The IPv4 network.
    pub fn v4_net(&self) -> Ipv4Net {
        self.v4
    }

    /// The IPv6 prefix.
    pub fn v6_net(&self) -> Ipv6Net {
        self.v6
    }

    /// The address plan nodes receive (`MeshAccepted`): the one rule for
    /// the MagicDNS address and the IPv6 twins.
    pub fn plan(&self) -> OverlayPools {
        OverlayPools::new(self.v4, self.v6)
    }

    /// The MagicDNS address (first host of the pool).
    pub fn dns_v4(&self) -> Ipv4Addr {
        self.plan().dns_v4()
    }

    /// The MagicDNS IPv6 address.
    pub fn dns_v6(&self) -> Ipv6Addr {
        self.plan().dns_v6()
    }

    /// The IPv6 twin of an IPv4 overlay address.
    pub fn v6_for(&self, v4: Ipv4Addr) -> Ipv6Addr {
        self.plan().v6_for(v4)
    }

    /// Network, broadcast, and the MagicDNS address.
    pub fn is_reserved(&self, a: Ipv4Addr) -> bool {
        self.plan().is_reserved(a)
    }

    fn size(&self) -> u64 {
        1u64 << (32 - self.v4.prefix_len())
    }

    /// Allocates the address for `key`: hash offset, then linear probing.
    pub fn allocate(&mut self, key: &PublicKey) -> Result<Ipv4Addr, AddrError> {
        let size = self.size();
        if self.used.len() as u64 + 3 >= size {
            return Err(AddrError::Exhausted(self.v4));
        }
        let h = Sha256::digest(key.0);
        let start = u64::from(u32::from_be_bytes([h[0], h[1], h[2], h[3]])) % size;
        let base = u32::from(self.v4.network());
        for i in 0..size {
            let a = Ipv4Addr::from(base + ((start + i) % size) as u32);
            if !self.is_reserved(a) && !self.used.contains(&a) {
                self.used.insert(a);
                return Ok(a);
            }
        }
        Err(AddrError::Exhausted(self.v4))
    }

    /// Marks a persisted address as used (restart).
    pub fn claim(&mut self, a: Ipv4Addr) -> Result<(), AddrError> {
        if !self.v4.contains(&a) || self.is_reserved(a) {
            return Err(AddrError::OutsidePool(a));
        }
        if !self.used.insert(a) {
            return Err(AddrError::Duplicate(a));
        }
        Ok(())
    }

    /// Frees an address (node removed).
    pub fn release(&mut self, a: Ipv4Addr) {
        self.used.remove(&a);
    }

    /// Addresses in use.
    pub fn used(&self) -> usize {
        self.used.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(v4: &str) -> AddressPool {
        let (Ok(a), Ok(b)) = (v4.parse(), DEFAULT_IPV6_PREFIX.parse()) else {
            panic!("bad test pool")
        };
        match AddressPool::new(a, b) {
            Ok(p) => p,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn deterministic_and_unique() {
        let mut p1 = pool(DEFAULT_IPV4_POOL);
        let mut p2 = pool(DEFAULT_IPV4_POOL);
        let k = PublicKey([9; 32]);
        assert_eq!(p1.allocate(&k), p2.allocate(&k));
        // Same key again in the same pool: a different (probed) address.
        let a = p1.allocate(&k);
        let b = p1.allocate(&k);
        assert_ne!(a, b);
    }

    #[test]
    fn small_pool_fills_without_collisions_then_exhausts() {
        let mut p = pool("10.9.8.0/24");
        let mut seen = HashSet::new();
        for i in 0..253u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_be_bytes());
            let a = match p.allocate(&PublicKey(k)) {
                Ok(a) => a,
                Err(e) => panic!("{i}: {e}"),
            };
            assert!(!p.is_reserved(a), "{a}");
            assert!(seen.insert(a), "{a} twice");
        }
        assert!(matches!(
            p.allocate(&PublicKey([1; 32])),
            Err(AddrError::Exhausted(_))
        ));
        let freed = Ipv4Addr::new(10, 9, 8, 77);
        p.release(freed);
        assert_eq!(p.allocate(&PublicKey([1; 32])), Ok(freed));
    }

    #[test]
    fn v6_twin_and_dns() {
        let p = pool(DEFAULT_IPV4_POOL);
        assert_eq!(p.dns_v4(), Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(
            p.v6_for(Ipv4Addr::new(100, 64, 1, 2)),
            "fd7a:7765:6674::6440:102"
                .parse::<Ipv6Addr>()
                .unwrap_or(Ipv6Addr::UNSPECIFIED)
        );
        assert!(p.v6_net().contains(&p.dns_v6()));
    }

    #[test]
    fn claim_checks() {
        let mut p = pool("10.9.8.0/24");
        assert_eq!(p.claim(Ipv4Addr::new(10, 9, 8, 5)), Ok(()));
        assert!(matches!(
            p.claim(Ipv4Addr::new(10, 9, 8, 5)),
            Err(AddrError::Duplicate(_))
        ));
        assert!(matches!(
            p.claim(Ipv4Addr::new(10, 9, 9, 5)),
            Err(AddrError::OutsidePool(_))
        ));
        assert!(matches!(
            p.claim(Ipv4Addr::new(10, 9, 8, 1)),
            Err(AddrError::OutsidePool(_))
        ));
        assert!(AddressPool::new(
            "10.0.0.0/25".parse().unwrap_or_default(),
            DEFAULT_IPV6_PREFIX.parse().unwrap_or_default()
        )
        .is_err());
    }
}
