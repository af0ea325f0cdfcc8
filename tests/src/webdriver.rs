//! A real browser for the web view's tests: Debian's headless Chromium driven by
//! `chromedriver` over the W3C WebDriver protocol, both inside a lab namespace (so the
//! browser's traffic crosses the lab's NAT like an engineer's). The protocol is plain JSON over
//! HTTP on the namespace's loopback; each command is one `curl` run inside the namespace
//! (the test process cannot open a socket there), which is all a few dozen commands need.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{Netns, Proc};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A chromedriver with one browser session, in a namespace.
pub struct Browser<'a> {
    ns: &'a Netns,
    port: u16,
    session: String,
    _driver: Proc,
}

impl<'a> Browser<'a> {
    /// Starts chromedriver in `ns` and a headless Chromium window `width`×`height` that
    /// accepts the relay's self-signed certificate (as an engineer who pinned it would).
    pub fn start(ns: &'a Netns, width: u32, height: u32) -> Browser<'a> {
        let port = 9515 + NEXT.fetch_add(1, Ordering::Relaxed) as u16;
        let driver = ns.spawn_listening(
            "chromedriver",
            &format!("chromedriver --port={port} --allowed-ips=127.0.0.1"),
            't',
            port,
            Duration::from_secs(20),
        );
        let profile = ns.file(&format!("chromium-profile-{port}"));
        let mut b = Browser {
            ns,
            port,
            session: String::new(),
            _driver: driver,
        };
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={width},{height}")
                ]
            }
        }}});
        let v = b.call("POST", "/session", Some(&caps));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("chromedriver gave no session: {v}"))
            .to_string();
        b
    }

    /// One WebDriver command: its `value`.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Value {
        let file = self
            .ns
            .file(&format!("wd-{}.json", NEXT.fetch_add(1, Ordering::Relaxed)));
        let data = match body {
            Some(b) => {
                std::fs::write(&file, b.to_string()).unwrap_or_else(|e| panic!("{e}"));
                format!(
                    " -H 'Content-Type: application/json' --data-binary @{}",
                    file.display()
                )
            }
            None => String::new(),
        };
        let out = self.ns.output(&format!(
            "curl -s --max-time 60 -X {method} http://127.0.0.1:{}{path}{data}",
            self.port
        ));
        let _ = std::fs::remove_file(&file);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}: {text:?}"));
        if let Some(err) = v["value"]["error"].as_str() {
            panic!(
                "WebDriver {method} {path}: {err}: {}",
                v["value"]["message"]
            );
        }
        v.get("value").cloned().unwrap_or(v)
    }

    fn at(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url` (waits for the load).
    pub fn goto(&self, url: &str) {
        self.call("POST", &self.at("/url"), Some(&json!({ "url": url })));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.call("GET", &self.at("/url"), None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `js` (a function body; `return` gives the value) in the page.
    pub fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            &self.at("/execute/sync"),
            Some(&json!({ "script": js, "args": [] })),
        )
    }

    /// Runs `js` with a callback: `arguments[0]` is called with the value (for `fetch`).
    pub fn script_async(&self, js: &str) -> Value {
        self.call(
            "POST",
            &self.at("/execute/async"),
            Some(&json!({ "script": js, "args": [] })),
        )
    }

    /// The visible text of the page's `<main>`.
    pub fn main_text(&self) -> String {
        self.script("const m = document.querySelector('main'); return m ? m.innerText : '';")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Waits up to `within` until `js` returns true; panics with `what` and the page's text.
    pub fn wait_until(&self, within: Duration, what: &str, js: &str) -> Duration {
        let t0 = Instant::now();
        loop {
            if self.script(js).as_bool() == Some(true) {
                return t0.elapsed();
            }
            assert!(
                t0.elapsed() < within,
                "{what}: not within {within:?}; the page says:\n{}",
                self.main_text()
            );
            sleep(Duration::from_millis(200));
        }
    }

    /// Clicks the first element matching `css`.
    pub fn click(&self, css: &str) {
        let e = self.call(
            "POST",
            &self.at("/element"),
            Some(&json!({ "using": "css selector", "value": css })),
        );
        let id = e
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {e}"))
            .to_string();
        self.call(
            "POST",
            &self.at(&format!("/element/{id}/click")),
            Some(&json!({})),
        );
    }

    /// Resizes the window.
    pub fn resize(&self, width: u32, height: u32) {
        self.call(
            "POST",
            &self.at("/window/rect"),
            Some(&json!({ "width": width, "height": height })),
        );
    }

    /// Saves a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        use base64::Engine;
        let v = self.call("GET", &self.at("/screenshot"), None);
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        if let Some(d) = path.parent() {
            let _ = std::fs::create_dir_all(d);
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.ns.output(&format!(
                "curl -s --max-time 10 -X DELETE http://127.0.0.1:{}/session/{}",
                self.port, self.session
            ));
        }
    }
}
