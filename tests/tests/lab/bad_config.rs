//! `mesh up` refuses malformed wg-quick files with `FILE:LINE` and the field
//! name, exits non-zero, and leaves nothing behind (no interface, route or UAPI
//! socket); a taken ListenPort fails the same clean way; SIGTERM on a running
//! node exits 0 and removes everything it made.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use weft_tests::node::mesh_up_command;
use weft_tests::traffic;
use weft_tests::{overlay_node, uapi_socket, unique_ifname, Keypair, MeshNode, Netns};

struct Case {
    name: &'static str,
    /// The file; `{PRIV}`/`{PUB}` are replaced by valid keys.
    text: String,
    field: &'static str,
    /// Acceptable line numbers; empty = any (e.g. a missing field).
    lines: &'static [usize],
}

/// A valid file; cases replace one line. Line numbers as in the file (1-based).
const VALID: [&str; 10] = [
    "[Interface]",                                    // 1
    "PrivateKey = {PRIV}",                            // 2
    "Address = 100.64.0.1/32, fd77:7765:6674::1/128", // 3
    "ListenPort = 51820",                             // 4
    "",                                               // 5
    "[Peer]",                                         // 6
    "PublicKey = {PUB}",                              // 7
    "AllowedIPs = 100.64.0.2/32",                     // 8
    "Endpoint = 203.0.113.2:51820",                   // 9
    "PersistentKeepalive = 25",                       // 10
];

fn with_line(line: usize, text: &str) -> String {
    let mut v = VALID.to_vec();
    v[line - 1] = text;
    v.join("\n") + "\n"
}

fn cases() -> Vec<Case> {
    let dup = VALID.join("\n") + "\n\n[Peer]\nPublicKey = {PUB}\nAllowedIPs = 100.64.0.3/32\n";
    vec![
        Case {
            name: "bad-base64-key",
            text: with_line(2, "PrivateKey = not*base64!!"),
            field: "PrivateKey",
            lines: &[2],
        },
        Case {
            name: "short-key",
            text: with_line(2, "PrivateKey = AAAAAAAA"),
            field: "PrivateKey",
            lines: &[2],
        },
        Case {
            name: "bad-address",
            text: with_line(3, "Address = 100.64.0.1/33"),
            field: "Address",
            lines: &[3],
        },
        Case {
            name: "port-70000",
            text: with_line(4, "ListenPort = 70000"),
            field: "ListenPort",
            lines: &[4],
        },
        Case {
            name: "unknown-key",
            text: with_line(5, "Colour = blue"),
            field: "Colour",
            lines: &[5],
        },
        Case {
            name: "unknown-section",
            text: with_line(6, "[Bogus]"),
            field: "Bogus",
            lines: &[6],
        },
        Case {
            name: "no-private-key",
            text: with_line(2, ""),
            field: "PrivateKey",
            lines: &[],
        },
        Case {
            name: "peer-no-pubkey",
            text: with_line(7, ""),
            field: "PublicKey",
            lines: &[],
        },
        Case {
            name: "bad-endpoint-port",
            text: with_line(9, "Endpoint = 203.0.113.2:99999"),
            field: "Endpoint",
            lines: &[9],
        },
        Case {
            name: "allowedips-garbage",
            text: with_line(8, "AllowedIPs = banana"),
            field: "AllowedIPs",
            lines: &[8],
        },
        Case {
            name: "keepalive-x",
            text: with_line(10, "PersistentKeepalive = x"),
            field: "PersistentKeepalive",
            lines: &[10],
        },
        Case {
            name: "duplicate-peer",
            text: dup,
            field: "PublicKey",
            lines: &[12, 13],
        },
    ]
}

/// What `mesh up` left in the namespace and the UAPI directory, if anything.
fn leftovers(ns: &Netns, ifname: &str) -> Vec<String> {
    let mut left = Vec::new();
    if ns.has_link(ifname) {
        left.push(format!("interface {ifname} still exists"));
    }
    let routes = ns.routes();
    if routes.contains(&format!("dev {ifname} ")) || routes.contains(&format!("dev {ifname}\n")) {
        left.push(format!("routes via {ifname} remain:\n{routes}"));
    }
    if uapi_socket(ifname).exists() {
        left.push(format!(
            "UAPI socket {} remains",
            uapi_socket(ifname).display()
        ));
    }
    left
}

/// Runs `mesh up`; returns (exit code, stderr), or an error if it keeps running 10 s.
fn run_up(ns: &Netns, file: &Path, ifname: &str) -> Result<(Option<i32>, String), String> {
    let log = ns.file(&format!("{ifname}.stderr"));
    let mut cmd = mesh_up_command(ns, file, ifname);
    cmd.stdout(Stdio::null());
    let mut p = ns.spawn_command("mesh up", cmd, &log);
    let deadline = Instant::now() + Duration::from_secs(10);
    while p.is_running() {
        if Instant::now() > deadline {
            p.kill_term();
            return Err(format!(
                "still running after 10 s (config accepted?):\n{}",
                p.log_tail(20)
            ));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok((p.wait().code(), p.log()))
}

#[test]
fn malformed_configs_are_rejected_with_file_line_and_field() {
    let ns = Netns::new("bc");
    let (k1, k2) = (Keypair::generate(), Keypair::generate());
    let mut failures = Vec::new();
    for case in cases() {
        let ifname = unique_ifname();
        let file = ns.file(&format!("{}.conf", case.name));
        let text = case
            .text
            .replace("{PRIV}", &k1.private)
            .replace("{PUB}", &k2.public);
        std::fs::write(&file, &text).unwrap();
        let (code, stderr) = match run_up(&ns, &file, &ifname) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: {e}", case.name));
                continue;
            }
        };
        let mut problems = Vec::new();
        if code != Some(1) {
            problems.push(format!("exit code {code:?}, want 1"));
        }
        let f = file.display().to_string();
        let located = if case.lines.is_empty() {
            stderr.split(&format!("{f}:")).skip(1).any(|rest| {
                rest.split(':')
                    .next()
                    .is_some_and(|n| n.parse::<usize>().is_ok())
            })
        } else {
            case.lines.iter().any(|l| {
                stderr.contains(&format!("{f}:{l}:")) || stderr.contains(&format!("{f}:{l} "))
            })
        };
        if !located {
            problems.push(format!(
                "stderr lacks `{f}:LINE` (want line in {:?})",
                case.lines
            ));
        }
        if !stderr.contains(case.field) {
            problems.push(format!("stderr does not name field {}", case.field));
        }
        if !stderr.contains("error") {
            problems.push("stderr has no `error`".to_string());
        }
        problems.extend(leftovers(&ns, &ifname));
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                case.name,
                problems.join("; "),
                stderr.trim().replace('\n', "\n          ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} malformed configs not handled as promised:\n{}",
        failures.len(),
        cases().len(),
        failures.join("\n")
    );
}

#[test]
fn taken_listen_port_fails_cleanly() {
    let ns = Netns::new("bp");
    let _holder = ns.spawn("socat -u UDP4-RECV:51820 OPEN:/dev/null");
    assert!(ns.wait_listen('u', 51820, Duration::from_secs(5)));
    let ifname = unique_ifname();
    let mut iface = overlay_node(1, 51820);
    iface
        .peers
        .push(overlay_node(2, 51820).as_peer(Some("203.0.113.2:51820")));
    let file = ns.file("taken.conf");
    std::fs::write(&file, iface.to_wg_quick()).unwrap();
    let (code, stderr) = run_up(&ns, &file, &ifname).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        code.is_some_and(|c| c != 0),
        "mesh up with a taken port exited {code:?}:\n{stderr}"
    );
    assert!(stderr.contains("error"), "no error message:\n{stderr}");
    let left = leftovers(&ns, &ifname);
    assert!(
        left.is_empty(),
        "left behind after failure: {left:?}\nstderr:\n{stderr}"
    );
}

#[test]
fn sigterm_exits_zero_and_removes_everything() {
    let ns = Netns::new("bt");
    let mut iface = overlay_node(1, 51820);
    iface.mtu = Some(1380);
    iface
        .peers
        .push(overlay_node(2, 51820).as_peer(Some("203.0.113.2:51820")));
    let mut node = MeshNode::start(&ns, &iface);
    let ifname = node.ifname().to_string();
    // While up: addresses, MTU and a route for every AllowedIPs.
    let link = ns.exec(&format!("ip addr show dev {ifname}"));
    assert!(link.contains("mtu 1380"), "MTU not applied:\n{link}");
    assert!(
        link.contains("100.64.0.1/32") && link.contains("fd77:7765:6674::1/128"),
        "addresses missing:\n{link}"
    );
    let routes = ns.routes();
    for r in ["100.64.0.2 dev", "fd77:7765:6674::2 dev"] {
        assert!(
            routes.contains(&format!("{r} {ifname}")),
            "no route `{r} {ifname}`:\n{routes}"
        );
    }
    assert!(
        traffic::ping(&ns, "100.64.0.1", 1, 0.1, 1).all_ok(),
        "own overlay address unreachable"
    );
    let st = node.stop();
    assert_eq!(
        st.code(),
        Some(0),
        "SIGTERM exit status {st}:\n{}",
        node.log_tail(20)
    );
    let left = leftovers(&ns, &ifname);
    assert!(left.is_empty(), "left behind after SIGTERM: {left:?}");
}
