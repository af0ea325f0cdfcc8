//! Interface configuration through rtnetlink: MTU, addresses, link up,
//! routes for AllowedIPs (a `/0` as wg-quick's full tunnel: policy routing),
//! and removal of the link on shutdown.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};
use std::sync::atomic::Ordering;

use crate::device::{Device, RouteDiff};
use crate::udp::UdpIo;

/// The routing table (and socket fwmark) of a full tunnel when the interface
/// has no fwmark of its own: wg-quick's default.
pub const FULL_TUNNEL_TABLE: u32 = 51820;

/// Errors talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface {0} not found")]
    NoSuchLink(String),
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("invalid route {0}")]
    Route(IpNet),
}

/// A netlink handle bound to one interface.
#[derive(Clone)]
pub struct Link {
    handle: Handle,
    pub index: u32,
    pub name: String,
}

impl Link {
    /// Looks up `name` and returns a handle for configuring it. Spawns the
    /// netlink connection on the current tokio runtime.
    pub async fn open(name: &str) -> Result<Link, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        let mut links = handle.link().get().match_name(name.to_string()).execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| NetlinkError::Request {
                what: format!("looking up interface {name}"),
                source,
            })?
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_string()))?;
        Ok(Link {
            handle,
            index: link.header.index,
            name: name.to_string(),
        })
    }

    fn err(
        &self,
        what: impl std::fmt::Display,
    ) -> impl FnOnce(rtnetlink::Error) -> NetlinkError + '_ {
        let what = format!("{what} on {}", self.name);
        move |source| NetlinkError::Request { what, source }
    }

    /// Sets the MTU.
    pub async fn set_mtu(&self, mtu: u16) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(self.index)
                    .mtu(u32::from(mtu))
                    .build(),
            )
            .execute()
            .await
            .map_err(self.err(format!("setting MTU {mtu}")))
    }

    /// Brings the link up.
    pub async fn set_up(&self) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(self.index).up().build())
            .execute()
            .await
            .map_err(self.err("bringing the link up"))
    }

    /// Adds an address (with its prefix, which also installs the connected route).
    pub async fn add_address(&self, addr: IpNet) -> Result<(), NetlinkError> {
        self.handle
            .address()
            .add(self.index, addr.addr(), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(self.err(format!("adding address {addr}")))
    }

    fn route_message(
        &self,
        net: IpNet,
    ) -> Result<rtnetlink::packet_route::route::RouteMessage, NetlinkError> {
        let net = net.trunc();
        Ok(RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(net.addr(), net.prefix_len())
            .map_err(|_| NetlinkError::Route(net))?
            .output_interface(self.index)
            .build())
    }

    /// Adds (or replaces) a route for `net` through this link.
    pub async fn add_route(&self, net: IpNet) -> Result<(), NetlinkError> {
        let msg = self.route_message(net)?;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(self.err(format!("adding route {net}")))
    }

    /// Removes the route for `net` through this link.
    pub async fn del_route(&self, net: IpNet) -> Result<(), NetlinkError> {
        let msg = self.route_message(net)?;
        self.handle
            .route()
            .del(msg)
            .execute()
            .await
            .map_err(self.err(format!("removing route {net}")))
    }

    /// Turns the full tunnel of one address family on or off: a default route
    /// through this link in `table` plus [`full_tunnel_rules`]. The tunnel's
    /// socket must carry fwmark `table`, so its own packets to peers' endpoints
    /// keep the main table's routes. Idempotent both ways (a rule or route
    /// already there, or already gone, is fine), so a node that crashed with
    /// the rules in place cleans up on its next start or stop.
    pub async fn set_full_tunnel(
        &self,
        v6: bool,
        table: u32,
        on: bool,
    ) -> Result<(), NetlinkError> {
        let any = if v6 {
            IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED)
        };
        let route = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(any, 0)
            .map_err(|_| NetlinkError::Route(IpNet::from(any)))?
            .output_interface(self.index)
            .table_id(table)
            .build();
        let family = if v6 { "IPv6" } else { "IPv4" };
        if on {
            self.handle
                .route()
                .add(route)
                .replace()
                .execute()
                .await
                .map_err(self.err(format!(
                    "adding the {family} full-tunnel route in table {table}"
                )))?;
            for rule in full_tunnel_rules(v6, table) {
                let mut add = self.handle.rule().add();
                *add.message_mut() = rule;
                match add.execute().await {
                    Err(e) if is_errno(&e, libc::EEXIST) => {}
                    r => r.map_err(self.err(format!("adding an {family} full-tunnel rule")))?,
                }
            }
            if !v6 {
                // As wg-quick: reverse-path filtering must see the fwmark.
                if let Err(e) = std::fs::write("/proc/sys/net/ipv4/conf/all/src_valid_mark", "1") {
                    tracing::warn!(error = %e, "cannot set net.ipv4.conf.all.src_valid_mark=1");
                }
            }
        } else {
            for rule in full_tunnel_rules(v6, table) {
                match self.handle.rule().del(rule).execute().await {
                    Err(e) if is_errno(&e, libc::ENOENT) => {}
                    r => r.map_err(self.err(format!("removing an {family} full-tunnel rule")))?,
                }
            }
            match self.handle.route().del(route).execute().await {
                Err(e) if is_errno(&e, libc::ESRCH) || is_errno(&e, libc::ENODEV) => {}
                r => r.map_err(self.err(format!("removing the {family} full-tunnel route")))?,
            }
        }
        Ok(())
    }

    /// Deletes the link (the kernel drops its addresses and routes with it).
    /// A link already gone (a TUN device disappears when its last file
    /// descriptor closes) is not an error.
    pub async fn delete(&self) -> Result<(), NetlinkError> {
        match self.handle.link().del(self.index).execute().await {
            Err(rtnetlink::Error::NetlinkError(m))
                if m.code.map(|c| c.get()) == Some(-libc::ENODEV) =>
            {
                Ok(())
            }
            r => r.map_err(self.err("deleting the link")),
        }
    }
}

/// Whether `net` is routed as a plain route through the link. A `/0` is not:
/// it is a full tunnel ([`Link::set_full_tunnel`]), which must leave the
/// tunnel's own UDP packets out of it.
pub fn installs_route(net: &IpNet) -> bool {
    net.prefix_len() != 0
}

/// The two policy rules of a full tunnel for one address family, as wg-quick
/// writes them: `not fwmark TABLE lookup TABLE` (everything but the tunnel's
/// own marked packets goes to the table holding the default route through the
/// link) and `lookup main suppress_prefixlength 0` (ahead of it by the
/// kernel's ordering of rules added later, so the main table's specific routes
/// — the LAN, the link's own AllowedIPs — still win; only its default route is
/// ignored).
pub fn full_tunnel_rules(v6: bool, table: u32) -> [RuleMessage; 2] {
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let mut not_marked = RuleMessage::default();
    not_marked.header.family = family;
    not_marked.header.action = RuleAction::ToTable;
    not_marked.header.flags = RuleFlags::Invert;
    not_marked.attributes = vec![RuleAttribute::FwMark(table), RuleAttribute::Table(table)];
    let mut main = RuleMessage::default();
    main.header.family = family;
    main.header.action = RuleAction::ToTable;
    main.header.table = MAIN_TABLE as u8;
    main.attributes = vec![
        RuleAttribute::Table(MAIN_TABLE),
        RuleAttribute::SuppressPrefixLen(0),
    ];
    [not_marked, main]
}

/// `RT_TABLE_MAIN`.
const MAIN_TABLE: u32 = 254;

/// Whether a netlink error carries `errno`.
fn is_errno(e: &rtnetlink::Error, errno: i32) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.code.map(|c| c.get()) == Some(-errno))
}

/// The full tunnel's table: the interface's fwmark, else [`FULL_TUNNEL_TABLE`].
fn tunnel_table(device: &Device) -> u32 {
    match device.fwmark.load(Ordering::Relaxed) {
        0 => FULL_TUNNEL_TABLE,
        mark => mark,
    }
}

/// Makes the kernel's routing follow a change of AllowedIPs, as wg-quick
/// does: a route through the link per prefix, and for a `/0` the full tunnel
/// ([`Link::set_full_tunnel`]: policy rules and a default route in a table of
/// its own, the table's number also the socket's fwmark; the interface's own
/// fwmark when it has one, else [`FULL_TUNNEL_TABLE`], set on the socket here
/// as `wg set fwmark` would). Every change is tried; the first error is
/// returned after all of them.
pub(crate) async fn apply_route_diff(
    link: &Link,
    device: &Device,
    udp: &UdpIo,
    diff: &RouteDiff,
) -> anyhow::Result<()> {
    let mut first: Option<anyhow::Error> = None;
    let mut keep = |r: anyhow::Result<()>| {
        if let Err(e) = r {
            tracing::warn!(error = %e, "routing change failed");
            first.get_or_insert(e);
        }
    };
    for net in &diff.removed {
        if installs_route(net) {
            keep(link.del_route(*net).await.map_err(Into::into));
        } else {
            keep(
                link.set_full_tunnel(net.addr().is_ipv6(), tunnel_table(device), false)
                    .await
                    .map_err(Into::into),
            );
        }
    }
    for net in &diff.added {
        if installs_route(net) {
            keep(link.add_route(*net).await.map_err(Into::into));
            continue;
        }
        if device.fwmark.load(Ordering::Relaxed) == 0 {
            if let Err(e) = udp.set_mark(FULL_TUNNEL_TABLE) {
                keep(Err(anyhow::Error::new(e).context(format!(
                    "setting fwmark {FULL_TUNNEL_TABLE} on the socket for the full tunnel of {net}"
                ))));
                continue;
            }
            device.fwmark.store(FULL_TUNNEL_TABLE, Ordering::Relaxed);
        }
        let table = tunnel_table(device);
        tracing::info!(%net, table, "full tunnel: everything but the tunnel's own packets goes through the interface");
        keep(
            link.set_full_tunnel(net.addr().is_ipv6(), table, true)
                .await
                .map_err(Into::into),
        );
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn full_tunnel_rules_are_wg_quicks() {
        for v6 in [false, true] {
            let family = if v6 {
                AddressFamily::Inet6
            } else {
                AddressFamily::Inet
            };
            let [not_marked, main] = full_tunnel_rules(v6, 51820);
            // ip rule add not fwmark 51820 table 51820
            assert_eq!(not_marked.header.family, family);
            assert_eq!(not_marked.header.action, RuleAction::ToTable);
            assert!(not_marked.header.flags.contains(RuleFlags::Invert));
            assert!(not_marked
                .attributes
                .contains(&RuleAttribute::FwMark(51820)));
            assert!(not_marked.attributes.contains(&RuleAttribute::Table(51820)));
            // ip rule add table main suppress_prefixlength 0
            assert_eq!(main.header.family, family);
            assert!(!main.header.flags.contains(RuleFlags::Invert));
            assert!(main.attributes.contains(&RuleAttribute::Table(254)));
            assert!(main
                .attributes
                .contains(&RuleAttribute::SuppressPrefixLen(0)));
            assert!(!main
                .attributes
                .iter()
                .any(|a| matches!(a, RuleAttribute::FwMark(_))));
        }
    }

    #[test]
    fn only_a_default_prefix_is_a_full_tunnel() {
        for (net, route) in [
            ("0.0.0.0/0", false),
            ("::/0", false),
            ("0.0.0.0/1", true),
            ("10.0.0.0/8", true),
            ("fd00::/64", true),
        ] {
            assert_eq!(installs_route(&net.parse().unwrap()), route, "{net}");
        }
    }
}
