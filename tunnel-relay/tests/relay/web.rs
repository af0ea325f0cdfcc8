//! The web view on loopback (issue 15): a real relay with `web_listen`, identities that log
//! in with `weft web`'s one-time link (`Session::web_link`), and HTTPS requests written by
//! hand (so the test shares no client with the relay). What users rely on: the public
//! summary names nobody; without a session nothing but it answers (401, no data); a link
//! works once; each role sees its part (another engineer's job is 404); logout needs the CSRF
//! token; a revoked node's session ends; a GPU model full of markup is shown as text.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunnel_relay::client;
use tunnel_relay::RelayConfig;

use weft_proto::pool::AgentMsg;

use crate::pool_feed::{agent, api, gpus, identity, inventory, submit};
use crate::relay_lab::{start_relay, tmp};

/// One answer: status, headers (lowercase names), body.
struct Answer {
    code: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// A TLS connection to the web view (the relay's self-signed certificate is accepted: on
/// loopback the test knows whom it talks to).
pub(crate) async fn tls_to(
    web: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tls = tunnel_relay::tls::rustls_client(b"http/1.1").unwrap_or_else(|e| panic!("{e}"));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let tcp = tokio::net::TcpStream::connect(web)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let name =
        rustls::pki_types::ServerName::try_from("localhost").unwrap_or_else(|e| panic!("{e}"));
    connector
        .connect(name, tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS to the web view: {e}"))
}

/// One HTTPS request to the web view (the relay's self-signed certificate is accepted: on
/// loopback the test knows whom it talks to).
async fn https(
    web: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: &str,
) -> Answer {
    https_with(web, method, path, cookie, body, None).await
}

async fn https_with(
    web: SocketAddr,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    body: &str,
    extra: Option<&str>,
) -> Answer {
    let mut s = tls_to(web).await;
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(c) = cookie {
        req.push_str(&format!("Cookie: weft_session={c}\r\n"));
    }
    if let Some(h) = extra {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("status line: {head:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        code,
        headers,
        body: body.to_string(),
    }
}

/// `weft web` as `dir`'s identity: the link's path and query.
async fn link(dir: &Path) -> String {
    let s = client::session(dir).await.unwrap_or_else(|e| panic!("{e}"));
    let (url, secs) = s
        .web_link()
        .await
        .unwrap_or_else(|e| panic!("web link: {e}"));
    s.close().await;
    assert_eq!(secs, 60);
    let i = url.find("/login?t=").unwrap_or_else(|| panic!("{url}"));
    url[i..].to_string()
}

/// Logs `dir`'s identity in: the session cookie's value.
async fn log_in(web: SocketAddr, dir: &Path) -> String {
    let a = https(web, "GET", &link(dir).await, None, "").await;
    assert_eq!(a.code, 200, "{}", a.body);
    let set = a
        .header("set-cookie")
        .unwrap_or_else(|| panic!("no cookie"));
    set.strip_prefix("weft_session=")
        .and_then(|v| v.split(';').next())
        .unwrap_or_else(|| panic!("{set}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_view_logs_in_by_link_and_shows_each_role_its_part() {
    let _turn = weft_tests::turn::take(module_path!());
    let cfg = RelayConfig {
        web_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|_| panic!())),
        ..RelayConfig::default()
    };
    let lab = start_relay(cfg).await;
    let web = lab.web.unwrap_or_else(|| panic!("web view bound"));
    let d1 = tmp();
    let evil = "<img src=x onerror=alert(1)>";
    let mut gpu1 = agent(
        &lab,
        "gpu1",
        d1.path(),
        false,
        inventory(gpus("a", evil, 81920, 1), vec![]),
    )
    .await;
    let alice = identity(&lab, "engineer", "alice").await;
    let bob = identity(&lab, "engineer", "bob").await;
    let ops = identity(&lab, "operator", "ops").await;

    // The public summary: counts, no names, addresses or keys.
    let t0 = std::time::Instant::now();
    let s = loop {
        let a = https(web, "GET", "/api/v1/summary", None, "").await;
        assert_eq!(a.code, 200, "{}", a.body);
        let v = a.json();
        if v["gpus"] == 1 {
            break a;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", a.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s.json()["gpus_by_model"][evil], 1);
    for secret in ["gpu1", "alice", "GPU-a", "127.0.0.1", &lab.key.to_base64()] {
        assert!(!s.body.contains(secret), "{secret} in {}", s.body);
    }
    assert!(s
        .header("content-security-policy")
        .is_some_and(|c| c.contains("default-src 'self'")));
    // Nothing else without a session, and no data in the refusal.
    for path in [
        "/api/v1/nodes",
        "/api/v1/jobs",
        "/api/v1/usage?since=0",
        "/api/v1/earnings",
        "/earnings.csv",
    ] {
        let a = https(web, "GET", path, None, "").await;
        assert_eq!(a.code, 401, "{path}: {}", a.body);
        assert!(!a.body.contains("gpu1"), "{path}: {}", a.body);
    }
    let a = https(web, "GET", "/devices", None, "").await;
    assert_eq!(a.code, 401);
    assert!(
        a.body.contains("weft web") && !a.body.contains("gpu1"),
        "{}",
        a.body
    );
    let a = https(web, "GET", "/api/v1/nodes", Some("forged"), "").await;
    assert_eq!(a.code, 401, "a forged cookie");

    // A link works once, and sets a strict cookie.
    let l = link(alice.path()).await;
    let a = https(web, "GET", &l, None, "").await;
    assert_eq!(a.code, 200);
    let set = a.header("set-cookie").unwrap_or_default().to_string();
    for attr in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let again = https(web, "GET", &l, None, "").await;
    assert_eq!(again.code, 403);
    assert!(again.body.contains("already used"), "{}", again.body);
    let forged = https(
        web,
        "GET",
        "/login?t=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        None,
        "",
    )
    .await;
    assert_eq!(forged.code, 403);
    assert!(forged.body.contains("not valid"), "{}", forged.body);
    let alice_c = set
        .strip_prefix("weft_session=")
        .and_then(|v| v.split(';').next())
        .unwrap_or_default()
        .to_string();

    // Jobs: alice's and bob's.
    let (code, v) = submit(alice.path(), r#"{"command":["alice-secret"],"gpus":1}"#).await;
    assert_eq!(code, 201, "{v}");
    let mine = v["id"].as_u64().unwrap_or_default();
    let _ = gpu1.start().await;
    let (code, v) = submit(
        bob.path(),
        r#"{"command":["bob-secret"],"gpus":1,"wait_for_capacity":true}"#,
    )
    .await;
    assert_eq!(code, 201, "{v}");
    let bobs = v["id"].as_u64().unwrap_or_default();

    // alice: the pool's workers and herself; her job; not bob's (404, as a job that does not exist).
    let nodes = https(web, "GET", "/api/v1/nodes", Some(&alice_c), "")
        .await
        .json();
    let names: Vec<&str> = nodes
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["alice", "gpu1"], "{nodes}");
    let g = &nodes[1];
    assert_eq!(
        (g["online"].as_bool(), g["state"].as_str()),
        (Some(true), Some("ready")),
        "{g}"
    );
    assert_eq!(g["gpus"][0]["model"], evil);
    assert_eq!(g["gpus"][0]["job"], mine);
    assert_eq!(
        https(
            web,
            "GET",
            &format!("/api/v1/jobs/{mine}"),
            Some(&alice_c),
            ""
        )
        .await
        .code,
        200
    );
    let a = https(
        web,
        "GET",
        &format!("/api/v1/jobs/{bobs}"),
        Some(&alice_c),
        "",
    )
    .await;
    assert_eq!(a.code, 404, "{}", a.body);
    assert!(!a.body.contains("bob-secret"));
    let jobs = https(web, "GET", "/api/v1/jobs", Some(&alice_c), "").await;
    assert!(
        !jobs.body.contains("bob-secret") && jobs.body.contains("alice-secret"),
        "{}",
        jobs.body
    );
    // The pages: the model is text, not markup.
    let page = https(web, "GET", "/devices", Some(&alice_c), "").await;
    assert_eq!(page.code, 200);
    assert!(!page.body.contains("<img src=x"), "{}", page.body);
    assert!(page.body.contains("&lt;img src=x onerror=alert(1)&gt;"));
    // The live update asks for <main>'s content only.
    let mut frag_req = https(web, "GET", "/jobs", Some(&alice_c), "").await;
    assert!(frag_req.body.contains("<nav"), "a whole page");
    frag_req = https_live(web, "/jobs", &alice_c).await;
    assert!(
        !frag_req.body.contains("<nav") && frag_req.body.contains("alice-secret"),
        "{}",
        frag_req.body
    );

    // The operator sees everyone and every job; the worker itself only, and the jobs on it
    // without their engineers' command lines.
    let ops_c = log_in(web, ops.path()).await;
    let all = https(web, "GET", "/api/v1/nodes", Some(&ops_c), "")
        .await
        .json();
    assert_eq!(all.as_array().map(Vec::len), Some(4), "{all}");
    // A page of it: the second node, and how many there are.
    let a = https(
        web,
        "GET",
        "/api/v1/nodes?offset=1&limit=1",
        Some(&ops_c),
        "",
    )
    .await;
    assert_eq!(a.header("x-total-count"), Some("4"));
    assert_eq!(a.json()[0]["name"], all[1]["name"]);
    let a = https(web, "GET", "/api/v1/nodes?limit=lots", Some(&ops_c), "").await;
    assert_eq!(a.code, 400, "{}", a.body);
    assert!(https(
        web,
        "GET",
        &format!("/api/v1/jobs/{bobs}"),
        Some(&ops_c),
        ""
    )
    .await
    .body
    .contains("bob-secret"));
    let w_c = log_in(web, d1.path()).await;
    let mine_only = https(web, "GET", "/api/v1/nodes", Some(&w_c), "")
        .await
        .json();
    assert_eq!(mine_only.as_array().map(Vec::len), Some(1), "{mine_only}");
    let on_it = https(web, "GET", "/api/v1/jobs", Some(&w_c), "").await;
    assert!(
        on_it.body.contains(&format!("\"id\":{mine}")) && !on_it.body.contains("alice-secret"),
        "{}",
        on_it.body
    );
    let a = https(web, "GET", "/api/v1/usage/export?since=0", Some(&w_c), "").await;
    assert_eq!(a.code, 403);

    // Logout needs the CSRF token of the session.
    let a = https(web, "POST", "/logout", Some(&alice_c), "csrf=wrong").await;
    assert_eq!(a.code, 403);
    let a = https(web, "POST", "/logout", Some(&alice_c), "").await;
    assert_eq!(a.code, 403);
    let page = https(web, "GET", "/", Some(&alice_c), "").await;
    let csrf = page
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no csrf field: {}", page.body))
        .to_string();
    let a = https(
        web,
        "POST",
        "/logout",
        Some(&alice_c),
        &format!("csrf={csrf}"),
    )
    .await;
    assert_eq!(a.code, 200, "{}", a.body);
    assert_eq!(
        https(web, "GET", "/api/v1/nodes", Some(&alice_c), "")
            .await
            .code,
        401
    );

    // Revoking a node ends its sessions.
    let bob_c = log_in(web, bob.path()).await;
    assert_eq!(
        https(web, "GET", "/api/v1/nodes", Some(&bob_c), "")
            .await
            .code,
        200
    );
    let mut reg = lab.registry();
    reg.revoke_node("bob").unwrap_or_else(|e| panic!("{e}"));
    let t0 = std::time::Instant::now();
    while https(web, "GET", "/api/v1/nodes", Some(&bob_c), "")
        .await
        .code
        != 401
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "bob's session outlived his revocation"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = api(ops.path(), "GET", "/v1/pool", None).await;
}

async fn https_live(web: SocketAddr, path: &str, cookie: &str) -> Answer {
    https_with(web, "GET", path, Some(cookie), "", Some("X-Weft-Live: 1")).await
}

/// A live poll that sends back the version it shows.
async fn https_live_since(web: SocketAddr, path: &str, cookie: &str, tag: &str) -> Answer {
    let h = format!("X-Weft-Live: 1\r\nIf-None-Match: {tag}");
    https_with(web, "GET", path, Some(cookie), "", Some(&h)).await
}

/// Polls `path` with `tag` until the page changes (200): the new answer.
async fn changed(web: SocketAddr, path: &str, cookie: &str, tag: &str, what: &str) -> Answer {
    let t0 = std::time::Instant::now();
    loop {
        let a = https_live_since(web, path, cookie, tag).await;
        if a.code == 200 {
            return a;
        }
        assert_eq!(a.code, 304, "{what}: {}", a.body);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{what}: the page never changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_poll_is_answered_304_until_something_changes() {
    let _turn = weft_tests::turn::take(module_path!());
    let cfg = RelayConfig {
        web_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|_| panic!())),
        ..RelayConfig::default()
    };
    let lab = start_relay(cfg).await;
    let web = lab.web.unwrap_or_else(|| panic!("web view bound"));
    let ops = identity(&lab, "operator", "ops").await;
    let c = log_in(web, ops.path()).await;
    let d1 = tmp();
    let gpu1 = agent(
        &lab,
        "gpu1",
        d1.path(),
        false,
        inventory(gpus("a", "H100", 81920, 1), vec![]),
    )
    .await;
    // The full page carries its version for the script's first poll.
    let full = https(web, "GET", "/devices", Some(&c), "").await;
    assert_eq!(full.code, 200);
    let tag = full
        .header("etag")
        .unwrap_or_else(|| panic!("no ETag"))
        .to_string();
    assert!(
        full.body
            .contains(&format!("data-version=\"{}\"", tag.replace('"', "&quot;"))),
        "{}",
        full.body
    );
    // Nothing moves: 304 with no body (at most one 200 where the minute turns).
    let mut tag = tag;
    let mut same = 0;
    for _ in 0..4 {
        let a = https_live_since(web, "/devices", &c, &tag).await;
        match a.code {
            304 => {
                assert!(a.body.is_empty(), "{}", a.body);
                same += 1;
            }
            200 => tag = a.header("etag").unwrap_or_default().to_string(),
            other => panic!("{other}: {}", a.body),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(same >= 3, "only {same} of 4 quiet polls were 304");
    // A stale or foreign version gets the page.
    let a = https_live_since(web, "/devices", &c, "\"0.0.0.0.0.0\"").await;
    assert_eq!(a.code, 200);
    assert!(
        a.body.contains("gpu1") && !a.body.contains("<html"),
        "{}",
        a.body
    );

    // A GPU reading is a change; the same reading again is not.
    let reading = weft_proto::pool::GpuReading {
        uuid: "GPU-a-0".into(),
        util_pct: Some(87),
        mem_used_mib: Some(1000),
        temp_c: Some(61),
        power_mw: Some(312_000),
    };
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    };
    gpu1.send(AgentMsg::Telemetry {
        at_ms: now(),
        gpus: vec![reading.clone()],
    })
    .await;
    let a = changed(web, "/devices", &c, &tag, "a first reading").await;
    assert!(a.body.contains("87%"), "{}", a.body);
    tag = a.header("etag").unwrap_or_default().to_string();
    gpu1.send(AgentMsg::Telemetry {
        at_ms: now(),
        gpus: vec![reading],
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = https_live_since(web, "/devices", &c, &tag).await;
    assert!(
        a.code == 304 || a.header("etag") != Some(tag.as_str()),
        "{}",
        a.code
    );

    // A worker that joins, and one that goes away, are changes.
    let d2 = tmp();
    let gpu2 = agent(
        &lab,
        "gpu2",
        d2.path(),
        false,
        inventory(gpus("b", "A100", 40960, 2), vec![]),
    )
    .await;
    let a = changed(web, "/devices", &c, &tag, "gpu2 joined").await;
    assert!(
        a.body.contains("gpu2") && a.body.contains("A100"),
        "{}",
        a.body
    );
    tag = a.header("etag").unwrap_or_default().to_string();
    drop(gpu2);
    let t0 = std::time::Instant::now();
    loop {
        let a = changed(web, "/devices", &c, &tag, "gpu2 left").await;
        tag = a.header("etag").unwrap_or_default().to_string();
        let row = a.body.split("gpu2").nth(1).unwrap_or_default();
        let row = row.split("</tr>").next().unwrap_or_default();
        if !row.contains("data-state=\"ready\"") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "gpu2 still ready: {row}"
        );
    }
    drop(gpu1);
}

/// The page's CSRF token (its forms' hidden field).
fn csrf_of(page: &Answer) -> String {
    page.body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or_else(|| panic!("no csrf field: {}", page.body))
        .to_string()
}

fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| {
            let enc: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={enc}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_adds_renames_and_removes_its_devices() {
    let _turn = weft_tests::turn::take(module_path!());
    let cfg = RelayConfig {
        web_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|_| panic!())),
        ..RelayConfig::default()
    };
    let lab = start_relay(cfg).await;
    let web = lab.web.unwrap_or_else(|| panic!("web view bound"));
    // A provider's first machine, joined with an operator's token.
    let d1 = tmp();
    let _gpu1 = agent(
        &lab,
        "gpu1",
        d1.path(),
        false,
        inventory(gpus("a", "H100", 81920, 1), vec![]),
    )
    .await;
    let alice = identity(&lab, "engineer", "alice").await;
    let ops = identity(&lab, "operator", "ops").await;
    let p = log_in(web, d1.path()).await;
    let devices = https(web, "GET", "/devices", Some(&p), "").await;
    assert!(devices.body.contains("Add a device"), "{}", devices.body);
    let csrf = csrf_of(&devices);

    // Add a device: refused without the CSRF token or with a bad name; then a token and the
    // exact command.
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&p),
        &form(&[("name", "gpu2")]),
    )
    .await;
    assert_eq!(a.code, 403, "{}", a.body);
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&p),
        &form(&[("csrf", &csrf), ("name", "-bad name")]),
    )
    .await;
    assert_eq!(a.code, 400, "{}", a.body);
    assert!(a.body.contains("1 to 64 letters"), "{}", a.body);
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&p),
        &form(&[("csrf", &csrf), ("name", "gpu2")]),
    )
    .await;
    assert_eq!(a.code, 201, "{}", a.body);
    let cmd = a
        .body
        .split("id=\"add-command\">")
        .nth(1)
        .and_then(|r| r.split('<').next())
        .unwrap_or_else(|| panic!("no command: {}", a.body))
        .to_string();
    assert!(
        cmd.starts_with("sudo worker-agent run --token wft1_") && cmd.ends_with("--name gpu2"),
        "{cmd}"
    );
    let token = cmd
        .split_whitespace()
        .find(|w| w.starts_with("wft1_"))
        .unwrap_or_default();
    let token = tunnel_relay::Token::parse(token).unwrap_or_else(|e| panic!("{e}: {token}"));
    assert_eq!(token.relay_addrs, [lab.addr.to_string()]);
    // An engineer adds nothing.
    let e = log_in(web, alice.path()).await;
    let ep = https(web, "GET", "/devices", Some(&e), "").await;
    assert!(!ep.body.contains("Add a device"));
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&e),
        &form(&[("csrf", &csrf_of(&ep)), ("name", "gpu9")]),
    )
    .await;
    assert_eq!(a.code, 403, "{}", a.body);

    // The new machine joins with that token: it is the provider's.
    let d2 = tmp();
    let gpu2 = crate::pool_feed::agent_with(
        "gpu2",
        d2.path(),
        Some(token),
        inventory(gpus("b", "A100", 40960, 2), vec![]),
    )
    .await;
    let mine = https(web, "GET", "/api/v1/nodes", Some(&p), "")
        .await
        .json();
    let names: Vec<&str> = mine
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["gpu1", "gpu2"], "{mine}");
    assert_eq!(mine[1]["owner"], "gpu1", "{mine}");
    // Logged in from the new machine, the provider sees the same account.
    let p2 = log_in(web, d2.path()).await;
    let theirs = https(web, "GET", "/api/v1/nodes", Some(&p2), "")
        .await
        .json();
    assert_eq!(theirs.as_array().map(Vec::len), Some(2), "{theirs}");
    // A name a device already has is refused at once, not when the new machine joins.
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&p),
        &form(&[("csrf", &csrf), ("name", "gpu1")]),
    )
    .await;
    assert_eq!(a.code, 409, "{}", a.body);
    assert!(
        a.body.contains("A device named gpu1 already exists"),
        "{}",
        a.body
    );
    // An account holds at most ten unused add-device tokens (gpu2's, used, does not count).
    for i in 0..10 {
        let name = format!("spare{i}");
        let a = https(
            web,
            "POST",
            "/devices/add",
            Some(&p),
            &form(&[("csrf", &csrf), ("name", &name)]),
        )
        .await;
        assert_eq!(a.code, 201, "{name}: {}", a.body);
    }
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&p),
        &form(&[("csrf", &csrf), ("name", "spare10")]),
    )
    .await;
    assert_eq!(a.code, 429, "{}", a.body);
    assert!(a.body.contains("10 add-device commands"), "{}", a.body);
    let open = lab
        .registry()
        .list_tokens()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.owner.as_deref() == Some("gpu1"))
        .count();
    assert_eq!(open, 11, "gpu2's token and ten spares");

    // Rename: the owner may, with its CSRF token; the label is shown as text.
    let label = "Rack 4 <b>left</b>";
    let page = https(web, "GET", "/devices/gpu2", Some(&p), "").await;
    assert!(page.body.contains("/devices/gpu2/label"), "{}", page.body);
    let a = https(
        web,
        "POST",
        "/devices/gpu2/label",
        Some(&p),
        &form(&[("label", label)]),
    )
    .await;
    assert_eq!(a.code, 403);
    let a = https(
        web,
        "POST",
        "/devices/gpu2/label",
        Some(&p),
        &form(&[("csrf", &csrf), ("label", label)]),
    )
    .await;
    assert_eq!(a.code, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some("/devices/gpu2"));
    let list = https(web, "GET", "/devices", Some(&p), "").await;
    assert!(
        list.body.contains("Rack 4 &lt;b&gt;left&lt;/b&gt;") && !list.body.contains("<b>left"),
        "{}",
        list.body
    );
    // A display name may not be another device's name (it would read as that device).
    let a = https(
        web,
        "POST",
        "/devices/gpu2/label",
        Some(&p),
        &form(&[("csrf", &csrf), ("label", "GPU1")]),
    )
    .await;
    assert_eq!(a.code, 400, "{}", a.body);
    assert!(
        a.body.contains("gpu1 is the name of another device"),
        "{}",
        a.body
    );
    let long = "x".repeat(65);
    let a = https(
        web,
        "POST",
        "/devices/gpu2/label",
        Some(&p),
        &form(&[("csrf", &csrf), ("label", &long)]),
    )
    .await;
    assert_eq!(a.code, 400, "{}", a.body);
    // Nobody else's: an engineer, or another provider's device, is "no such device".
    let a = https(
        web,
        "POST",
        "/devices/gpu2/label",
        Some(&e),
        &form(&[("csrf", &csrf_of(&ep)), ("label", "mine now")]),
    )
    .await;
    assert_eq!(a.code, 404, "{}", a.body);
    let nodes = https(web, "GET", "/api/v1/nodes/gpu2", Some(&p), "")
        .await
        .json();
    assert_eq!(nodes["label"], label, "{nodes}");
    // An operator renames any device.
    let o = log_in(web, ops.path()).await;
    let op = https(web, "GET", "/devices/gpu1", Some(&o), "").await;
    assert!(op.body.contains("/devices/gpu1/remove"), "{}", op.body);
    let a = https(
        web,
        "POST",
        "/devices/gpu1/label",
        Some(&o),
        &form(&[("csrf", &csrf_of(&op)), ("label", "first box")]),
    )
    .await;
    assert_eq!(a.code, 303, "{}", a.body);

    // Remove: the name typed again, else nothing happens; then its identity is refused.
    let a = https(
        web,
        "POST",
        "/devices/gpu2/remove",
        Some(&p),
        &form(&[("csrf", &csrf), ("confirm", "gpu1")]),
    )
    .await;
    assert_eq!(a.code, 400, "{}", a.body);
    assert!(!lab
        .registry()
        .list_nodes()
        .unwrap_or_default()
        .iter()
        .any(|n| n.revoked));
    let a = https(
        web,
        "POST",
        "/devices/gpu2/remove",
        Some(&p),
        &form(&[("csrf", &csrf), ("confirm", "gpu2")]),
    )
    .await;
    assert_eq!(a.code, 303, "{}", a.body);
    let revoked: Vec<String> = lab
        .registry()
        .list_nodes()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.revoked)
        .map(|n| n.name)
        .collect();
    assert_eq!(revoked, ["gpu2"]);
    // Its sessions end at once (the web one included) and it leaves the provider's list.
    let t0 = std::time::Instant::now();
    while https(web, "GET", "/api/v1/nodes", Some(&p2), "").await.code != 401 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the removed device's web session outlived it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mine = https(web, "GET", "/api/v1/nodes", Some(&p), "")
        .await
        .json();
    assert_eq!(mine.as_array().map(Vec::len), Some(1), "{mine}");
    drop(gpu2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_without_a_web_view_says_so() {
    let _turn = weft_tests::turn::take(module_path!());
    let lab = start_relay(RelayConfig::default()).await;
    assert!(lab.web.is_none());
    let alice = identity(&lab, "engineer", "alice").await;
    let s = client::session(alice.path())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let err = s
        .web_link()
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        err.contains("serves no web view") && err.contains("--web"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_approves_a_providers_new_machine() {
    let _turn = weft_tests::turn::take(module_path!());
    let cfg = RelayConfig {
        web_listen: Some("127.0.0.1:0".parse().unwrap_or_else(|_| panic!())),
        approve_devices: tunnel_relay::records::Approval::Providers,
        ..RelayConfig::default()
    };
    let lab = start_relay(cfg).await;
    let web = lab.web.unwrap_or_else(|| panic!("web view bound"));
    // The provider's first machine joined with an operator's token: approved by that.
    let d1 = tmp();
    let _gpu1 = agent(
        &lab,
        "gpu1",
        d1.path(),
        false,
        inventory(gpus("a", "H100", 81920, 1), vec![]),
    )
    .await;
    let ops = identity(&lab, "operator", "ops").await;
    let p = log_in(web, d1.path()).await;
    let csrf = csrf_of(&https(web, "GET", "/devices", Some(&p), "").await);
    let a = https(
        web,
        "POST",
        "/devices/add",
        Some(&p),
        &form(&[("csrf", &csrf), ("name", "gpu2")]),
    )
    .await;
    assert_eq!(a.code, 201, "{}", a.body);
    let token = a
        .body
        .split_whitespace()
        .find(|w| w.starts_with("wft1_"))
        .unwrap_or_else(|| panic!("no token: {}", a.body));
    let token = tunnel_relay::Token::parse(token).unwrap_or_else(|e| panic!("{e}: {token}"));

    // The new machine joins with it: it is stored, and refused until an operator approves.
    let d2 = tmp();
    let dir2 = d2.path().to_path_buf();
    let join = tokio::spawn(async move {
        crate::pool_feed::agent_with(
            "gpu2",
            &dir2,
            Some(token),
            inventory(gpus("b", "A100", 40960, 2), vec![]),
        )
        .await
    });
    let pending = || pending_nodes(&lab);
    wait_pending(&lab, "gpu2").await;
    // Its provider sees it waiting, and cannot approve it.
    let page = https(web, "GET", "/devices/gpu2", Some(&p), "").await;
    assert!(
        page.body.contains("Waiting for an operator to approve") && !page.body.contains("/approve"),
        "{}",
        page.body
    );
    let node = https(web, "GET", "/api/v1/nodes/gpu2", Some(&p), "")
        .await
        .json();
    assert_eq!(node["state"], "awaiting approval", "{node}");
    let a = https(
        web,
        "POST",
        "/devices/gpu2/approve",
        Some(&p),
        &form(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(a.code, 403, "{}", a.body);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!join.is_finished(), "gpu2 was admitted without approval");

    // An operator approves it (with the CSRF token): it is admitted at its next try.
    let o = log_in(web, ops.path()).await;
    let op = https(web, "GET", "/devices/gpu2", Some(&o), "").await;
    assert!(op.body.contains("/devices/gpu2/approve"), "{}", op.body);
    let a = https(web, "POST", "/devices/gpu2/approve", Some(&o), "").await;
    assert_eq!(a.code, 403, "{}", a.body);
    let a = https(
        web,
        "POST",
        "/devices/gpu2/approve",
        Some(&o),
        &form(&[("csrf", &csrf_of(&op))]),
    )
    .await;
    assert_eq!(a.code, 303, "{}", a.body);
    let gpu2 = tokio::time::timeout(Duration::from_secs(15), join)
        .await
        .unwrap_or_else(|_| panic!("gpu2 was not admitted after the approval"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(pending().is_empty());
    let node = https(web, "GET", "/api/v1/nodes/gpu2", Some(&p), "")
        .await
        .json();
    assert_eq!(node["owner"], "gpu1", "{node}");
    assert_ne!(node["state"], "awaiting approval", "{node}");
    let a = https(
        web,
        "POST",
        "/devices/gpu2/approve",
        Some(&o),
        &form(&[("csrf", &csrf_of(&op))]),
    )
    .await;
    assert_eq!(a.code, 409, "{}", a.body);
    drop((gpu2, d2));
}

/// `approve_devices = "all"`: a machine joining with an operator's own token waits too, and is
/// admitted at its next try once approved (here with `nodes approve`'s registry call).
#[tokio::test]
async fn with_approval_for_all_an_operators_token_waits_too() {
    let _turn = weft_tests::turn::take(module_path!());
    let cfg = RelayConfig {
        approve_devices: tunnel_relay::records::Approval::All,
        ..RelayConfig::default()
    };
    let lab = start_relay(cfg).await;
    let token = lab.token("worker", None, Some(1));
    let d = tmp();
    let dir = d.path().to_path_buf();
    let join = tokio::spawn(async move {
        crate::pool_feed::agent_with(
            "box1",
            &dir,
            Some(token),
            inventory(gpus("c", "L4", 24576, 1), vec![]),
        )
        .await
    });
    wait_pending(&lab, "box1").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!join.is_finished(), "box1 was admitted without approval");
    assert_eq!(lab.registry().approve_node("box1").ok(), Some(true));
    let b = tokio::time::timeout(Duration::from_secs(15), join)
        .await
        .unwrap_or_else(|_| panic!("box1 was not admitted after the approval"))
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(pending_nodes(&lab).is_empty());
    drop((b, d));
}

/// The names of the nodes waiting for approval.
fn pending_nodes(lab: &crate::relay_lab::RelayLab) -> Vec<String> {
    lab.registry()
        .list_nodes()
        .unwrap_or_default()
        .into_iter()
        .filter(|n| n.pending)
        .map(|n| n.name)
        .collect()
}

/// Waits (up to 5 s) until `name` has tried to join and is the only node waiting.
async fn wait_pending(lab: &crate::relay_lab::RelayLab, name: &str) {
    let t0 = std::time::Instant::now();
    while pending_nodes(lab).is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{name} never tried to join"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending_nodes(lab), [name]);
}
