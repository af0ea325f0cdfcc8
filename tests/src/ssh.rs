//! OpenSSH's `sshd` in a lab namespace, for the tests that ssh to a worker
//! over the mesh or through a relay tunnel.

use std::time::Duration;

use crate::{Netns, Proc};

/// Starts sshd on `listen` (`0.0.0.0` for every address of the namespace),
/// port 22, with SFTP (which scp uses), authorizing a fresh key pair whose
/// private key is [`ssh_key`]`(ns)`. Waits until it listens.
pub fn start_sshd(ns: &Netns, listen: &str) -> Proc {
    let d = ns.dir().display().to_string();
    ns.exec(&format!(
        "ssh-keygen -q -t ed25519 -N '' -f {d}/hostkey && ssh-keygen -q -t ed25519 -N '' -f {d}/id && \
         cp {d}/id.pub {d}/authorized_keys && chmod 600 {d}/authorized_keys && mkdir -p /run/sshd"
    ));
    let cfg = format!(
        "Port 22\nListenAddress {listen}\nHostKey {d}/hostkey\nAuthorizedKeysFile {d}/authorized_keys\n\
         PidFile none\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
         KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
         Subsystem sftp internal-sftp\nLogLevel VERBOSE\n"
    );
    std::fs::write(ns.file("sshd_config"), cfg)
        .unwrap_or_else(|e| panic!("write sshd_config: {e}"));
    ns.spawn_listening(
        "sshd",
        &format!("/usr/sbin/sshd -D -e -f {d}/sshd_config"),
        't',
        22,
        Duration::from_secs(5),
    )
}

/// The private key [`start_sshd`] authorized in `ns`.
pub fn ssh_key(ns: &Netns) -> String {
    ns.file("id").display().to_string()
}
