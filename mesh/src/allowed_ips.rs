//! Cryptokey routing table: longest-prefix match from an IP address to a value
//! (a peer), for IPv4 and IPv6.
//!
//! One hash map per prefix length present, probed from the longest length
//! down: a lookup costs at most as many hash probes as there are distinct
//! prefix lengths (a handful in practice), with no allocation.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

/// Longest-prefix-match table over IPv4 and IPv6 networks.
#[derive(Debug, Clone)]
pub(crate) struct AllowedIps<T> {
    v4: Family<u32, T>,
    v6: Family<u128, T>,
}

#[derive(Debug, Clone)]
struct Family<K, T> {
    /// Prefix lengths present, longest first.
    lengths: Vec<u8>,
    maps: HashMap<(u8, K), T>,
}

impl<K, T> Default for Family<K, T> {
    fn default() -> Self {
        Family {
            lengths: Vec::new(),
            maps: HashMap::new(),
        }
    }
}

impl<T> Default for AllowedIps<T> {
    fn default() -> Self {
        AllowedIps {
            v4: Family::default(),
            v6: Family::default(),
        }
    }
}

fn mask4(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

fn mask6(addr: u128, len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        addr & (u128::MAX << (128 - u32::from(len)))
    }
}

impl<K: std::hash::Hash + Eq + Copy, T> Family<K, T> {
    fn insert(&mut self, key: K, len: u8, value: T) -> Option<T> {
        if !self.lengths.contains(&len) {
            self.lengths.push(len);
            self.lengths.sort_unstable_by(|a, b| b.cmp(a));
        }
        self.maps.insert((len, key), value)
    }

    fn lookup(&self, addr: K, mask: impl Fn(K, u8) -> K) -> Option<&T> {
        self.lengths
            .iter()
            .find_map(|&len| self.maps.get(&(len, mask(addr, len))))
    }
}

impl<T> AllowedIps<T> {
    /// An empty table.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Inserts `net` (host bits are ignored) and returns the value it replaced.
    pub(crate) fn insert(&mut self, net: IpNet, value: T) -> Option<T> {
        match net.trunc() {
            IpNet::V4(n) => self
                .v4
                .insert(u32::from(n.network()), n.prefix_len(), value),
            IpNet::V6(n) => self
                .v6
                .insert(u128::from(n.network()), n.prefix_len(), value),
        }
    }

    /// The value of the longest prefix containing `addr`.
    pub(crate) fn lookup(&self, addr: IpAddr) -> Option<&T> {
        match addr {
            IpAddr::V4(a) => self.v4.lookup(u32::from(a), mask4),
            IpAddr::V6(a) => self.v6.lookup(u128::from(a), mask6),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("100.64.0.0/10"), 1);
        t.insert(net("100.64.0.2/32"), 2);
        t.insert(net("fd00::/48"), 3);
        t.insert(net("fd00::2/128"), 4);
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&2));
        assert_eq!(t.lookup("100.64.0.3".parse().unwrap()), Some(&1));
        assert_eq!(t.lookup("8.8.8.8".parse().unwrap()), Some(&0));
        assert_eq!(t.lookup("fd00::2".parse().unwrap()), Some(&4));
        assert_eq!(t.lookup("fd00::3".parse().unwrap()), Some(&3));
        assert_eq!(t.lookup("fd01::3".parse().unwrap()), None);
        // The same prefix again replaces its value.
        assert_eq!(t.insert(net("100.64.0.2/32"), 5), Some(2));
        assert_eq!(t.lookup("100.64.0.2".parse().unwrap()), Some(&5));
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut t = AllowedIps::new();
        t.insert(net("10.1.2.3/8"), 7);
        assert_eq!(t.lookup("10.200.0.1".parse().unwrap()), Some(&7));
        // 10.0.0.0/8 is the same entry.
        assert_eq!(t.insert(net("10.0.0.0/8"), 8), Some(7));
        assert_eq!(t.lookup("10.200.0.1".parse().unwrap()), Some(&8));
    }

    /// Inserts `nets` (value = index; a later equal prefix replaces an
    /// earlier one) and checks every probe against a linear scan for the
    /// longest matching prefix.
    fn check_against_naive(nets: &[IpNet], probes: &[IpAddr]) -> Result<(), TestCaseError> {
        let mut t = AllowedIps::new();
        let mut naive: Vec<(IpNet, usize)> = Vec::new();
        for (i, n) in nets.iter().enumerate() {
            let n = n.trunc();
            t.insert(n, i);
            naive.retain(|(m, _)| *m != n);
            naive.push((n, i));
        }
        for addr in probes {
            let want = naive
                .iter()
                .filter(|(n, _)| n.contains(addr))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, v)| *v);
            prop_assert_eq!(t.lookup(*addr).copied(), want);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn matches_naive_v4(nets in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..20), probes in proptest::collection::vec(any::<u32>(), 1..50)) {
            let nets: Vec<IpNet> = nets.iter().map(|(a, l)| IpNet::V4(ipnet::Ipv4Net::new(Ipv4Addr::from(*a), *l).unwrap())).collect();
            let probes: Vec<IpAddr> = probes.into_iter().map(|p| IpAddr::V4(Ipv4Addr::from(p))).collect();
            check_against_naive(&nets, &probes)?;
        }

        #[test]
        fn matches_naive_v6(nets in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..20), probes in proptest::collection::vec(any::<u128>(), 1..50)) {
            let nets: Vec<IpNet> = nets.iter().map(|(a, l)| IpNet::V6(ipnet::Ipv6Net::new(Ipv6Addr::from(*a), *l).unwrap())).collect();
            let probes: Vec<IpAddr> = probes.into_iter().map(|p| IpAddr::V6(Ipv6Addr::from(p))).collect();
            check_against_naive(&nets, &probes)?;
        }
    }
}
