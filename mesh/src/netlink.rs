//! Interface configuration through rtnetlink: MTU, addresses, link up,
//! routes for AllowedIPs, and removal of the link on shutdown.

use std::net::IpAddr;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

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

/// Whether a route for `net` should be installed. Default routes (`/0`) are
/// not: sending everything into the tunnel needs policy routing so the
/// tunnel's own UDP packets escape it (wg-quick's fwmark trick), which this
/// node does not do yet.
pub fn installs_route(net: &IpNet) -> bool {
    net.prefix_len() != 0
}
