//! The explorer (issue 15) in a real browser: the relay serves its web view (`web_listen`);
//! three `worker-agent` workers behind NAT report their stub GPUs (one of them named
//! `<img src=x onerror=alert(1)>`); engineer alice, behind a NAT of her own, logs in with
//! `weft web --print`'s one-time link in Debian's headless Chromium, driven over WebDriver
//! (`weft_tests::webdriver`) from her namespace.
//!
//! What she relies on: the link logs her in; the Devices page names the three workers with
//! their GPUs, and the odd model is text, not markup; a worker killed shows as offline within
//! 10 s without a reload; a job submitted from the CLI appears queued, then running, on the
//! Jobs page without a reload; the a100's provider (`weft web` with the worker's identity) renames
//! it and makes a join token for another machine, and alice's page shows the new name without a
//! reload (the label is text, not markup); a gang's two workers that ping each other over the mesh
//! appear as a pair on the Network page with their path (direct or relayed), as in
//! `/api/v1/paths`; the earnings CSV the page offers equals what `weft usage export`
//! gives her; the pages fit a phone's width. Screenshots of each page go to
//! `target/explorer-screenshots/` (or `$WEFT_SCREENSHOTS`) for a person to look at.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use weft_tests::managed::{relay_bin, LabRelay, RELAY_IP};
use weft_tests::router::Router;
use weft_tests::webdriver::Browser;
use weft_tests::{Internet, Nat, Netns};

use crate::pool::{until, weft_bin, Engineer, Worker};

const SIGKILL: i32 = 9;
const EVIL: &str = "<img src=x onerror=alert(1)>";

fn shots() -> PathBuf {
    std::env::var_os("WEFT_SCREENSHOTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| weft_tests::workspace_root().join("target/explorer-screenshots"))
}

/// `device,day,gpu_seconds,records` rows of the earnings CSV, with the seconds as numbers.
fn rows(csv: &str) -> Vec<(String, String, f64, u64)> {
    csv.lines()
        .skip(1)
        .filter(|l| !l.is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            assert_eq!(f.len(), 4, "{l}");
            (
                f[0].to_string(),
                f[1].to_string(),
                f[2].parse().unwrap_or_else(|_| panic!("{l}")),
                f[3].parse().unwrap_or_else(|_| panic!("{l}")),
            )
        })
        .collect()
}

/// The UTC day of unix ms (`YYYY-MM-DD`; the civil-from-days algorithm, as the relay's).
fn day(ms: u64) -> String {
    let z = (ms / 86_400_000) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[test]
fn the_explorer_in_a_real_browser() {
    let _lab = weft_tests::turn::take(module_path!());
    let net = Internet::new("ex");
    let config = format!(
        "web_listen = \"0.0.0.0:8443\"\nweb_url = \"https://{RELAY_IP}:8443\"\napprove_devices = true\n"
    );
    let relay = LabRelay::start_with_config(&net, "ex", Some(&config));
    let base = format!("https://{RELAY_IP}:8443");
    let a100 = Worker::start(
        &net,
        &relay,
        ("exa", "a100", Nat::Easy, "203.0.113.10/24", "192.0.2.32/27"),
        "WEFT_NVML_STUB_GPUS=1 WEFT_NVML_STUB_MODEL='NVIDIA A100-SXM4-80GB' \
         WEFT_NVML_STUB_MEMORY_MIB=81920 WEFT_NVML_STUB_UUID_SEED=11",
    );
    let mut rtx = Worker::start(
        &net,
        &relay,
        ("exb", "rtx", Nat::Easy, "203.0.113.11/24", "192.0.2.64/27"),
        "WEFT_NVML_STUB_GPUS=2 WEFT_NVML_STUB_MODEL='NVIDIA GeForce RTX 4090' \
         WEFT_NVML_STUB_MEMORY_MIB=24564 WEFT_NVML_STUB_UUID_SEED=22",
    );
    let odd = Worker::start(
        &net,
        &relay,
        ("exc", "odd", Nat::Hard, "198.51.100.10/24", "192.0.2.96/27"),
        &format!("WEFT_NVML_STUB_GPUS=1 WEFT_NVML_STUB_MODEL='{EVIL}' WEFT_NVML_STUB_UUID_SEED=33"),
    );
    let er = Router::new(&net, "exe", Nat::Easy, "198.51.100.11/24", "192.0.2.128/27");
    let eng_ns = Netns::new("exe-eng");
    er.attach(&eng_ns, "eth0");
    let alice = Engineer::login(&eng_ns, &relay, "alice");
    until(Duration::from_secs(20), "three workers ready", || {
        let p = alice.pool();
        let ready = p["workers"]
            .as_array()
            .is_some_and(|w| w.len() == 3 && w.iter().all(|w| w["state"] == "ready"));
        if ready {
            Ok(())
        } else {
            Err(p.to_string())
        }
    });

    // ---- log in with the one-time link ----
    let link = alice.ok("web --print").trim().to_string();
    assert!(link.starts_with(&format!("{base}/login?t=")), "{link}");
    let b = Browser::start(&eng_ns, 1280, 900);
    b.goto(&link);
    b.wait_until(
        Duration::from_secs(10),
        "logged in, on the Network page",
        "return location.pathname === '/' && !!document.querySelector('nav a[href=\"/devices\"]');",
    );
    b.wait_until(
        Duration::from_secs(10),
        "three workers and four GPUs online",
        "const k = n => document.querySelector(`[data-k=${n}]`)?.textContent; \
         return k('workers_online') === '3' && k('gpus') === '4';",
    );
    let text = b.main_text();
    assert!(text.contains("NVIDIA GeForce RTX 4090"), "{text}");
    b.screenshot(&shots().join("network.png"));
    // The same link again: refused.
    let again = Browser::start(&eng_ns, 800, 600);
    again.goto(&link);
    assert!(
        again.main_text().contains("already used"),
        "{}",
        again.main_text()
    );
    drop(again);

    // ---- Devices: the three workers with their GPUs; the odd model is text ----
    b.goto(&format!("{base}/devices"));
    for (w, model) in [
        ("a100", "NVIDIA A100-SXM4-80GB"),
        ("rtx", "NVIDIA GeForce RTX 4090"),
        ("odd", EVIL),
    ] {
        let row: Value = b.script(&format!(
            "const r = document.querySelector('tr[data-device=\"{w}\"]'); return r ? r.innerText : null;"
        ));
        let row = row
            .as_str()
            .unwrap_or_else(|| panic!("no row for {w}: {}", b.main_text()));
        assert!(row.contains(model) && row.contains("online"), "{w}: {row}");
    }
    assert_eq!(
        b.script("return document.querySelectorAll('main img').length;"),
        0,
        "a GPU model became markup"
    );
    // Live readings from the agents' NVML (the stub's): utilisation, temperature, power.
    b.wait_until(
        Duration::from_secs(15),
        "the GPUs' live readings",
        "const r = document.querySelector('tr[data-device=\"a100\"]'); \
         return !!r && /\\d+%/.test(r.innerText) && r.innerText.includes('°C') && / W/.test(r.innerText);",
    );
    b.screenshot(&shots().join("devices.png"));

    // ---- a worker goes offline: the page says so without a reload ----
    b.script("window.__weftMarker = 42; return true;");
    rtx.agent.stop_with(SIGKILL);
    let took = b.wait_until(
        Duration::from_secs(10),
        "rtx shown offline without a reload",
        "const r = document.querySelector('tr[data-device=\"rtx\"] .badge'); \
         return !!r && r.textContent === 'offline' && window.__weftMarker === 42;",
    );
    println!("rtx shown offline {took:?} after its agent was killed");

    // ---- one device ----
    b.goto(&format!("{base}/devices/a100"));
    let text = b.main_text();
    assert!(
        text.contains("NVIDIA A100-SXM4-80GB") && text.contains("GPU-"),
        "{text}"
    );
    // The last hour's charts: utilisation, temperature, power, each with its readings so far.
    assert_eq!(
        b.script(
            "return [...document.querySelectorAll('figure.chart svg')] \
               .filter(s => s.querySelector('polyline, circle')).length;"
        ),
        3,
        "{text}"
    );
    b.screenshot(&shots().join("device.png"));

    // ---- the provider: renames its device, makes a token for another ----
    // `weft web` on the worker machine, with the agent's identity: a provider's session.
    let out = a100.ns.output(&format!(
        "{} web --print --state-dir {}",
        weft_bin(),
        a100.state
    ));
    let plink = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        plink.starts_with(&format!("{base}/login?t=")),
        "{plink} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = Browser::start(&eng_ns, 1280, 900);
    p.goto(&plink);
    p.wait_until(
        Duration::from_secs(10),
        "the provider logged in",
        "return !!document.querySelector('.who') && document.querySelector('.who').innerText.includes('provider');",
    );
    p.goto(&format!("{base}/devices/a100"));
    // An engineer has no such form; the provider does.
    assert_eq!(
        b.script("return !!document.querySelector('form.rename');"),
        false,
        "an engineer may rename a device"
    );
    p.script(
        "const i = document.querySelector('form.rename input[name=label]');          i.value = 'Rack 7 <b>A100</b>'; return true;",
    );
    p.click("form.rename button");
    p.wait_until(
        Duration::from_secs(10),
        "the device renamed",
        "return location.pathname === '/devices/a100' &&            document.querySelector('main h1').innerText.includes('Rack 7 <b>A100</b>');",
    );
    p.script("document.querySelector('.manage').scrollIntoView(); return true;");
    p.screenshot(&shots().join("device-provider.png"));
    // Alice's Devices page shows the new name without a reload.
    b.goto(&format!("{base}/devices"));
    b.script("window.__weftMarker = 44; return true;");
    p.goto(&format!("{base}/devices"));
    p.script("document.querySelector('details.add').open = true;               document.querySelector('#new-name').value = 'a100-b'; return true;");
    p.click("details.add button");
    p.wait_until(
        Duration::from_secs(10),
        "the add-device command",
        "const c = document.querySelector('#add-command');          return !!c && c.innerText.startsWith('sudo worker-agent run --token wft1_')            && c.innerText.endsWith('--name a100-b');",
    );
    p.screenshot(&shots().join("add-device.png"));

    // ---- approval: the new machine joins with that token and waits for an operator ----
    let cmd = p.script("return document.querySelector('#add-command').innerText;");
    let token = cmd
        .as_str()
        .and_then(|c| c.split_whitespace().find(|w| w.starts_with("wft1_")))
        .unwrap_or_else(|| panic!("no token in {cmd}"))
        .to_string();
    // The machine: a plain `tunnel-relay expose` beside the a100's agent (its own identity).
    let newbox = a100.ns.spawn(&format!(
        "{} expose --token {token} --state-dir {} --name a100-b --service ssh=127.0.0.1:22",
        relay_bin(),
        a100.ns.file("a100-b").display()
    ));
    let list = || {
        let out = relay.ns.output(&format!(
            "{} nodes list --state-dir {}",
            relay_bin(),
            relay.state
        ));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    until(
        Duration::from_secs(10),
        "a100-b waiting for approval",
        || {
            let l = list();
            if l.lines()
                .any(|r| r.starts_with("a100-b ") && r.contains(" pending "))
            {
                Ok(())
            } else {
                Err(l)
            }
        },
    );
    p.goto(&format!("{base}/devices/a100-b"));
    let text = p.main_text();
    assert!(
        text.contains("Waiting for an operator to approve this machine"),
        "{text}"
    );
    assert_eq!(
        p.script("return !!document.querySelector('form.approve');"),
        false,
        "a provider may approve its own machine"
    );
    // An operator (its own `weft web` link) approves it on the device's page.
    let ops = eng_ns.file("ops").display().to_string();
    let t = weft_tests::managed::relay_token(&relay.ns, &relay.state, "operator");
    eng_ns.exec(&format!(
        "{} login --token {t} --state-dir {ops} --name ops",
        weft_bin()
    ));
    let olink = eng_ns
        .exec(&format!("{} web --print --state-dir {ops}", weft_bin()))
        .trim()
        .to_string();
    let o = Browser::start(&eng_ns, 1280, 900);
    o.goto(&olink);
    o.wait_until(
        Duration::from_secs(10),
        "the operator logged in",
        "return !!document.querySelector('.who') && document.querySelector('.who').innerText.includes('operator');",
    );
    o.goto(&format!("{base}/devices/a100-b"));
    o.wait_until(
        Duration::from_secs(10),
        "the Approve button",
        "return !!document.querySelector('form.approve button');",
    );
    o.screenshot(&shots().join("device-approve.png"));
    o.click("form.approve button");
    // The provider's page (no reload) shows the machine online within seconds.
    let took = p.wait_until(
        Duration::from_secs(20),
        "a100-b online after the approval, on its provider's page",
        "const b = document.querySelector('main h1 .badge');          return !!b && b.dataset.state === 'online';",
    );
    println!("a100-b online {took:?} after the approval");
    assert!(
        list()
            .lines()
            .any(|r| r.starts_with("a100-b ") && r.contains(" active ")),
        "{}",
        list()
    );
    drop((o, newbox));
    drop(p);
    let took = b.wait_until(
        Duration::from_secs(10),
        "the new name on alice's page without a reload",
        "const r = document.querySelector('tr[data-device=\"a100\"]');          return !!r && r.innerText.includes('Rack 7 <b>A100</b>') && window.__weftMarker === 44            && document.querySelectorAll('main b').length === 0;",
    );
    println!("the renamed device shown {took:?} later on another viewer's page");

    // ---- a job from the CLI: queued, then running, without a reload ----
    b.goto(&format!("{base}/jobs"));
    b.script("window.__weftMarker = 43; return true;");
    let first = alice.submit("--gpu A100:1 -- sleep 4");
    let second = alice.submit("--gpu A100:1 -- sleep 6");
    let state = |id: u64| {
        format!(
            "const r = document.querySelector('tr[data-job=\"{id}\"] .badge'); \
             return !!r && window.__weftMarker === 43 && "
        )
    };
    b.wait_until(
        Duration::from_secs(10),
        "the second job shown queued",
        &format!("{} r.textContent === 'pending';", state(second)),
    );
    b.screenshot(&shots().join("jobs.png"));
    b.wait_until(
        Duration::from_secs(20),
        "the second job shown running",
        &format!("{} r.textContent === 'running';", state(second)),
    );
    for id in [first, second] {
        alice.wait_job(id, Duration::from_secs(30), "job done", |j| {
            j["state"] == "succeeded"
        });
    }

    // ---- earnings: the page's CSV is what `weft usage export` gives ----
    let records: Vec<Value> = until(Duration::from_secs(10), "both usage records", || {
        let text = alice.ok("usage export --format jsonl");
        let recs: Vec<Value> = text
            .lines()
            .skip(1)
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        if recs.len() >= 2 {
            Ok(recs)
        } else {
            Err(text)
        }
    });
    let mut want: std::collections::BTreeMap<(String, String), (f64, u64)> = Default::default();
    for r in &records {
        let rec = &r["record"];
        let key = (
            rec["worker"].as_str().unwrap_or_default().to_string(),
            day(rec["end_ms"].as_u64().unwrap_or_default()),
        );
        let e = want.entry(key).or_default();
        e.0 += rec["gpu_seconds"].as_f64().unwrap_or_default();
        e.1 += 1;
    }
    b.goto(&format!("{base}/earnings"));
    let csv = b.script_async(
        "const done = arguments[arguments.length - 1]; \
         fetch(document.querySelector('a[href=\"/earnings.csv\"]').href, {credentials: 'same-origin'}) \
           .then(r => r.text()).then(done, e => done('ERR ' + e));",
    );
    let csv = csv.as_str().unwrap_or_default().to_string();
    assert!(csv.starts_with("device,day,gpu_seconds,records\n"), "{csv}");
    let got = rows(&csv);
    assert_eq!(got.len(), want.len(), "{csv} vs {want:?}");
    for ((dev, d, secs, n), ((wdev, wd), (wsecs, wn))) in got.iter().zip(&want) {
        assert_eq!((dev, d, n), (wdev, wd, wn), "{csv}");
        assert!((secs - wsecs).abs() < 1e-6, "{csv} vs {want:?}");
    }
    b.screenshot(&shots().join("earnings.png"));

    // ---- paths: a gang's two workers reach each other over the mesh; the Network page says how ----
    let g = alice.submit("--nodes 2 --gpu 80GB..:1 -- sleep 40");
    alice.wait_job(g, Duration::from_secs(20), "the gang runs", |j| {
        j["state"] == "running"
    });
    let ip_odd = odd.overlay_ip();
    until(
        Duration::from_secs(20),
        "a100 reaches odd over the mesh",
        || {
            a100.ns
                .output(&format!("ping -c 1 -W 1 {ip_odd}"))
                .status
                .success()
                .then_some(())
                .ok_or_else(|| "no reply".to_string())
        },
    );
    b.goto(&format!("{base}/"));
    b.script("window.__weftMarker = 45; return true;");
    let took = b.wait_until(
        Duration::from_secs(20),
        "the a100-odd pair and its path on the Network page, without a reload",
        "const r = document.querySelector('tr[data-pair=\"a100 odd\"] .badge'); \
         return !!r && ['direct', 'relayed', 'mixed'].includes(r.textContent) \
           && window.__weftMarker === 45;",
    );
    let shown =
        b.script("return document.querySelector('tr[data-pair=\"a100 odd\"] .badge').textContent;");
    println!("a100-odd shown {shown} {took:?} after the ping");
    let api = b.script_async(
        "const done = arguments[arguments.length - 1]; \
         fetch('/api/v1/paths', {credentials: 'same-origin'}).then(r => r.json()).then(done, e => done('ERR ' + e));",
    );
    let pair = api
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["a"] == "a100" && p["b"] == "odd"))
        .unwrap_or_else(|| panic!("no a100-odd in /api/v1/paths: {api}"));
    assert_eq!(pair["path"], shown, "{api}");
    b.script("document.querySelector('table.paths').scrollIntoView(); return true;");
    b.screenshot(&shots().join("network-paths.png"));

    // ---- a phone's width: nothing wider than the screen but the tables' own scroll ----
    b.resize(390, 844);
    b.goto(&format!("{base}/devices"));
    assert_eq!(
        b.script("return document.documentElement.scrollWidth <= window.innerWidth + 1;"),
        true,
        "the Devices page is wider than a phone"
    );
    b.screenshot(&shots().join("devices-phone.png"));
}
