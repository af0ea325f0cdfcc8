//! The user story end to end, in network namespaces with real OpenSSH:
//! a worker behind a home NAT router runs `sshd` and `tunnel-relay expose`;
//! the relay runs on the simulated internet (203.0.113.0/24); an engineer on
//! another segment (198.51.100.0/24) logs in and uses
//! `ssh -o ProxyCommand='tunnel-relay connect %h %p'`, `scp` (64 MiB each
//! way, checksums compared), `ssh-config` and `forward`. Then the relay is
//! killed (SIGKILL) and restarted: the worker must be back within 5 s.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use weft_tests::managed::{RELAY_ADDR, RELAY_IP};
use weft_tests::{Nat, NattedWorker, Netns, Proc};

const BIN: &str = env!("CARGO_BIN_EXE_tunnel-relay");

fn sha256_file(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    hex::encode(Sha256::digest(&bytes))
}

fn start_relay(ns: &Netns, state: &str) -> Proc {
    ns.spawn_listening(
        "relay",
        &format!("env WEFT_LOG=info,tunnel_relay=debug {BIN} serve --listen {RELAY_ADDR} --state-dir {state}"),
        'u',
        4433,
        Duration::from_secs(5),
    )
}

/// Waits until the engineer's `ssh-config` lists `name`; returns how long it took.
fn wait_listed(eng: &Netns, estate: &str, name: &str, within: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        let out = eng.output(&format!("{BIN} ssh-config --state-dir {estate}"));
        if String::from_utf8_lossy(&out.stdout).contains(&format!("Host {name}\n")) {
            return Some(t0.elapsed());
        }
        sleep(Duration::from_millis(100));
    }
    None
}

#[test]
fn ssh_and_scp_through_the_relay_to_a_natted_worker() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = NattedWorker::new("trs", Nat::Easy);
    let relay_ns = lab.net.host("trs-relay", RELAY_IP);
    let (worker_ns, worker_ip, eng_ns) = (&lab.worker, &lab.worker_ip, &lab.engineer);

    // The engineer cannot reach the worker directly (NAT + home firewall).
    let direct = eng_ns.output(&format!(
        "timeout 2 bash -c '</dev/tcp/{}/22'",
        lab.router.wan_ip()
    ));
    assert!(
        !direct.status.success(),
        "worker's sshd must not be reachable directly"
    );

    let _sshd = weft_tests::ssh::start_sshd(worker_ns, "127.0.0.1");
    let rstate = relay_ns.file("state").display().to_string();
    let mut relay = start_relay(&relay_ns, &rstate);

    let wtoken = relay_ns
        .exec(&format!("{BIN} token create --state-dir {rstate} --tag worker --uses 1 --ttl 10m --relay-addr {RELAY_ADDR}"))
        .trim()
        .to_string();
    let etoken = relay_ns
        .exec(&format!("{BIN} token create --state-dir {rstate} --tag engineer --uses 1 --relay-addr {RELAY_ADDR}"))
        .trim()
        .to_string();
    assert!(wtoken.starts_with("wft1_") && etoken.starts_with("wft1_"));

    let wstate = worker_ns.file("state").display().to_string();
    let _expose = worker_ns.spawn_named(
        "expose",
        &format!("env WEFT_LOG=info,tunnel_relay=debug {BIN} expose --token {wtoken} --state-dir {wstate} --name w1 --service ssh=127.0.0.1:22"),
    );
    let estate = eng_ns.file("state").display().to_string();
    let login = eng_ns.exec(&format!(
        "{BIN} login --token {etoken} --state-dir {estate} --name alice"
    ));
    assert!(
        login.contains("alice") && login.contains("engineer"),
        "{login}"
    );
    assert!(
        wait_listed(eng_ns, &estate, "w1", Duration::from_secs(10)).is_some(),
        "worker never showed up:\n{}",
        relay.log_tail(30)
    );

    // Secrets never reach the logs.
    let wsecret_part = &wtoken[wtoken.len() - 20..];
    assert!(!relay.log().contains(wsecret_part));

    // ssh runs a command on the worker (it sees its LAN address).
    let ed = eng_ns.dir().display().to_string();
    let wd = worker_ns.dir().display().to_string();
    let ssh_opts = format!(
        "-F /dev/null -i {wd}/id -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR -o ConnectTimeout=10 \
         -o ProxyCommand='{BIN} connect --state-dir {estate} %h %p'"
    );
    let out = eng_ns.exec(&format!(
        "ssh {ssh_opts} root@w1 'ip -4 -o addr show dev eth0; echo done'"
    ));
    assert!(
        out.contains(worker_ip.as_str()) && out.contains("done"),
        "ssh output: {out}"
    );

    // scp 64 MiB each way; checksums equal.
    eng_ns.exec(&format!("head -c 64M /dev/urandom > {ed}/up.bin"));
    let t0 = Instant::now();
    eng_ns.exec(&format!("scp {ssh_opts} {ed}/up.bin root@w1:{wd}/up.bin"));
    let up_t = t0.elapsed();
    assert_eq!(
        sha256_file(&eng_ns.file("up.bin")),
        sha256_file(&worker_ns.file("up.bin"))
    );
    worker_ns.exec(&format!("head -c 64M /dev/urandom > {wd}/down.bin"));
    let t0 = Instant::now();
    eng_ns.exec(&format!(
        "scp {ssh_opts} root@w1:{wd}/down.bin {ed}/down.bin"
    ));
    let down_t = t0.elapsed();
    assert_eq!(
        sha256_file(&worker_ns.file("down.bin")),
        sha256_file(&eng_ns.file("down.bin"))
    );
    eprintln!("scp 64 MiB up {up_t:?}, down {down_t:?}");
    let _ = std::fs::remove_file(eng_ns.file("up.bin"));
    let _ = std::fs::remove_file(worker_ns.file("up.bin"));
    let _ = std::fs::remove_file(eng_ns.file("down.bin"));
    let _ = std::fs::remove_file(worker_ns.file("down.bin"));

    // ssh-config output works as an ssh config file.
    let cfg = eng_ns.exec(&format!("{BIN} ssh-config --state-dir {estate}"));
    std::fs::write(eng_ns.file("ssh_config"), &cfg).unwrap_or_else(|e| panic!("{e}"));
    let out = eng_ns.exec(&format!(
        "ssh -F {ed}/ssh_config -i {wd}/id -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@w1 echo via-ssh-config"
    ));
    assert!(out.contains("via-ssh-config"), "{out}");

    // forward works like ssh -L.
    let mut fwd = eng_ns.spawn_listening(
        "forward",
        &format!("{BIN} forward 2222:w1:ssh --state-dir {estate}"),
        't',
        2222,
        Duration::from_secs(5),
    );
    let out = eng_ns.exec(&format!(
        "ssh -F /dev/null -p 2222 -i {wd}/id -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1 echo via-forward"
    ));
    assert!(out.contains("via-forward"), "{out}");
    fwd.kill_term();

    // The relay dies hard and comes back: the worker is back within 5 s.
    relay.signal(libc::SIGKILL);
    relay.wait_timeout(Duration::from_secs(5));
    let mut relay = start_relay(&relay_ns, &rstate);
    let back = wait_listed(eng_ns, &estate, "w1", Duration::from_secs(5));
    assert!(
        back.is_some(),
        "worker not back within 5 s of the restart:\n{}",
        relay.log_tail(30)
    );
    eprintln!("worker back {back:?} after the relay restart");
    let out = eng_ns.exec(&format!("ssh {ssh_opts} root@w1 echo after-restart"));
    assert!(out.contains("after-restart"), "{out}");

    // nodes list shows both, with tags; revoking the engineer refuses it with the reason.
    let nodes = relay_ns.exec(&format!("{BIN} nodes list --json --state-dir {rstate}"));
    assert!(
        nodes.contains("\"w1\"") && nodes.contains("\"alice\"") && nodes.contains("worker"),
        "{nodes}"
    );
    relay_ns.exec(&format!("{BIN} nodes revoke alice --state-dir {rstate}"));
    let out = eng_ns.output(&format!(
        "{BIN} connect w1 22 --state-dir {estate} </dev/null"
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("node revoked"),
        "{err}"
    );
    relay.kill_term();
}
