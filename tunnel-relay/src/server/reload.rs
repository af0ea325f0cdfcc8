//! Policy reload without a restart: `SIGHUP`, or `tunnel-relay policy reload`
//! (the admin socket's `reload` request). The relay reads its configuration
//! file again and applies what can change live:
//! - `[policy]` (who may open whose tunnels): new tunnel requests are decided
//!   by it at once; tunnels already open stay open;
//! - `[mesh.acl]`: the coordinator recomputes peer visibility and inbound
//!   filters and sends every node whose view changed a peer-map delta (peers
//!   added or removed, a new filter), and relay-path datagrams are checked
//!   against it from then on;
//! - `approve_devices`: new admissions follow it (nodes already waiting stay
//!   waiting until approved).
//!
//! A file that does not parse or validate changes nothing: the error (file,
//! line, what) goes back to the operator and the running policy stays.
//! Other settings that differ from the running ones are named in the answer
//! as needing a restart.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;
use tracing::{info, warn};

use super::Shared;
use crate::config::{Policy, RelayConfig};
use weft_proto::acl::AclPolicy;

/// The policies a relay applies now (swapped whole by a reload).
#[derive(Debug)]
pub(crate) struct Policies {
    /// Tunnel streams (`[policy]`).
    pub tunnels: Policy,
    /// Mesh traffic (`[mesh.acl]`).
    pub mesh_acl: AclPolicy,
    /// Which new nodes wait for an operator's approval (`approve_devices`).
    pub approve_devices: crate::records::Approval,
}

impl Policies {
    pub(crate) fn from_config(c: &RelayConfig) -> Policies {
        Policies {
            tunnels: c.policy.clone(),
            mesh_acl: c.mesh.acl.clone(),
            approve_devices: c.approve_devices,
        }
    }
}

/// What a reload did (the admin socket's JSON answer).
#[derive(Debug, Serialize)]
pub(crate) struct Reloaded {
    /// The file read.
    pub config: String,
    /// Whether `[policy]` changed.
    pub tunnel_policy_changed: bool,
    /// Whether `[mesh.acl]` changed.
    pub mesh_acl_changed: bool,
    /// `approve_devices` as it applies now: `off`, `providers` or `all`.
    pub approve_devices: crate::records::Approval,
    /// Whether `approve_devices` changed.
    pub approve_devices_changed: bool,
    /// Peer-map deltas sent to nodes because of it.
    pub peer_map_updates: usize,
    /// Settings that differ from the running ones but apply only at a restart.
    pub restart_needed_for: Vec<String>,
}

/// Reads the configuration file again and applies its policies (see the
/// module docs). `Err` says why nothing changed.
pub(crate) fn reload(shared: &Shared) -> Result<Reloaded, String> {
    let Some(path) = shared.config_path.as_deref() else {
        return Err(
            "this relay runs without --config: there is no policy file to reload (the defaults apply)"
                .into(),
        );
    };
    let fresh = RelayConfig::load(path).map_err(|e| format!("{e:#}"))?;
    let applied = apply(shared, path, &fresh)?;
    info!(
        config = %path.display(),
        tunnel_policy_changed = applied.tunnel_policy_changed,
        mesh_acl_changed = applied.mesh_acl_changed,
        approve_devices = applied.approve_devices.as_str(),
        approve_devices_changed = applied.approve_devices_changed,
        peer_map_updates = applied.peer_map_updates,
        restart_needed_for = ?applied.restart_needed_for,
        "policy reloaded"
    );
    if !applied.restart_needed_for.is_empty() {
        warn!(settings = ?applied.restart_needed_for, "changed settings that apply only at a restart");
    }
    Ok(applied)
}

fn apply(shared: &Shared, path: &Path, fresh: &RelayConfig) -> Result<Reloaded, String> {
    let new = Policies::from_config(fresh);
    let old = shared.policies();
    let tunnel_policy_changed = old.tunnels != new.tunnels;
    let mesh_acl_changed = old.mesh_acl != new.mesh_acl;
    let approve_devices = new.approve_devices;
    let approve_devices_changed = old.approve_devices != approve_devices;
    let acl = new.mesh_acl.clone();
    let swap = move || {
        *shared.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
    };
    let peer_map_updates = if mesh_acl_changed {
        // The coordinator's view and the relay path's check change together.
        shared
            .mesh
            .set_acl(acl, &shared.metrics, swap)
            .map_err(|e| format!("{}: [mesh.acl]: {e}", path.display()))?
    } else {
        swap();
        0
    };
    Ok(Reloaded {
        config: path.display().to_string(),
        tunnel_policy_changed,
        mesh_acl_changed,
        approve_devices,
        approve_devices_changed,
        peer_map_updates,
        restart_needed_for: restart_needed(&shared.config, fresh),
    })
}

/// The top-level settings of `fresh` (other than the policies) that differ
/// from `running`.
fn restart_needed(running: &RelayConfig, fresh: &RelayConfig) -> Vec<String> {
    // Compare with the live-applied parts made equal.
    let mut f = fresh.clone();
    f.policy = running.policy.clone();
    f.mesh.acl = running.mesh.acl.clone();
    f.approve_devices = running.approve_devices;
    // `serve --tcp-listen` and `--metrics` add to the file's values at start.
    f.tcp_listen = running.tcp_listen.clone();
    f.metrics_listen = running.metrics_listen;
    let mut out = Vec::new();
    if f.public_addrs != running.public_addrs {
        out.push("public_addrs".into());
    }
    if f.mesh != running.mesh {
        out.push("mesh (pools, delta_log_len)".into());
    }
    if f.pool != running.pool {
        out.push("pool".into());
    }
    if f.limits != running.limits {
        out.push("limits".into());
    }
    if f.store != running.store || f.name != running.name || f.region != running.region {
        out.push("store, name, region".into());
    }
    if f != *running && out.is_empty() {
        out.push("listeners, tls or stun".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_needed_names_what_a_reload_cannot_apply() {
        let running = RelayConfig::default();
        let same_but_policies = RelayConfig::parse(
            "[[policy.allow]]\nfrom = \"ops\"\nto = \"worker\"\n\
             [[mesh.acl.rule]]\nfrom = \"ops\"\nto = \"*\"\nproto = \"icmp\"\n",
            "t",
        )
        .expect("parses");
        assert!(restart_needed(&running, &same_but_policies).is_empty());
        // Device approval applies live too.
        let approval = RelayConfig::parse("approve_devices = true\n", "t").expect("parses");
        assert!(restart_needed(&running, &approval).is_empty());
        let more = RelayConfig::parse(
            "public_addrs = [\"203.0.113.2:4433\"]\n[limits]\nmax_streams_per_node = 8\n",
            "t",
        )
        .expect("parses");
        assert_eq!(
            restart_needed(&running, &more),
            vec!["public_addrs", "limits"]
        );
        let stun = RelayConfig::parse("stun = false\n", "t").expect("parses");
        assert_eq!(
            restart_needed(&running, &stun),
            vec!["listeners, tls or stun"]
        );
    }
}
