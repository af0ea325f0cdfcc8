//! The web view's pages: server-rendered HTML (maud escapes every value, so a node name or a
//! GPU model string is text, never markup), one stylesheet and one small script, both embedded.
//! Pure: each page is a function of the model's views.

use maud::{html, Markup, DOCTYPE};

use super::model::{ClusterView, Earning, NodeView, PathView, Role, Summary, Viewer};
use crate::pool_text::{gpu_gb, span, utc};
use weft_proto::pool::JobView;

/// The stylesheet (`/assets/weft.css`).
pub(crate) const CSS: &str = include_str!("weft.css");
/// The live-update script (`/assets/live.js`).
pub(crate) const JS: &str = include_str!("live.js");

/// Devices per page.
pub(crate) const PAGE_SIZE: usize = 50;

/// Which page is open (the navigation marks it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tab {
    /// `/`.
    Network,
    /// `/devices`.
    Devices,
    /// `/jobs`.
    Jobs,
    /// `/earnings`.
    Earnings,
}

/// The logged-in frame around a page's `<main>`.
pub(crate) fn layout(
    title: &str,
    tab: Tab,
    viewer: &Viewer,
    csrf: &str,
    version: &str,
    main: Markup,
) -> String {
    let role = match viewer.role {
        Role::Operator => "operator",
        Role::Engineer => "engineer",
        Role::Provider => "provider",
    };
    let link = |t: Tab, href: &str, label: &str| {
        html! {
            a href=(href) aria-current=[(t == tab).then_some("page")] { (label) }
        }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Weft" }
                link rel="stylesheet" href="/assets/weft.css";
                script src="/assets/live.js" defer {}
            }
            body {
                header {
                    nav aria-label="Weft" {
                        span.brand { "Weft" }
                        (link(Tab::Network, "/", "Network"))
                        (link(Tab::Devices, "/devices", "Devices"))
                        (link(Tab::Jobs, "/jobs", "Jobs"))
                        (link(Tab::Earnings, "/earnings", "Earnings"))
                    }
                    div.who {
                        span { (viewer.name) " (" (role) ")" }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(csrf);
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="live" data-live="2000" data-version=(version) { (main) }
            }
        }
    }
    .into_string()
}

/// The page for a visitor with no session: the public counters and how to log in.
pub(crate) fn public(s: &Summary, note: Option<&str>) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Weft" }
                link rel="stylesheet" href="/assets/weft.css";
            }
            body {
                header { nav { span.brand { "Weft" } } }
                main {
                    @if let Some(n) = note { p.notice role="alert" { (n) } }
                    (counters(s))
                    p { "To see devices, jobs and earnings, run " code { "weft web" } " on a machine logged in to this relay: it opens a one-time link." }
                }
            }
        }
    }
    .into_string()
}

/// A page that only sends the browser on (the session cookie is `SameSite=Strict`, so it is
/// not sent on a redirect that started on another site: this page is on ours).
pub(crate) fn go_to(href: &str) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content={ "0; url=" (href) };
                title { "Weft" }
            }
            body { p { "Logged in. " a href=(href) { "Continue" } } }
        }
    }
    .into_string()
}

fn counters(s: &Summary) -> Markup {
    html! {
        section.counters aria-label="Summary" {
            div { b data-k="nodes_online" { (s.nodes_online) } span { "nodes online (of " (s.nodes) ")" } }
            div { b data-k="workers_online" { (s.workers_online) } span { "workers online" } }
            div { b data-k="gpus" { (s.gpus) } span { "GPUs online" } }
            div { b data-k="jobs_running" { (s.jobs_running) } span { "jobs running" } }
            div { b data-k="jobs_queued" { (s.jobs_queued) } span { "jobs queued" } }
            div { b data-k="clusters" { (s.clusters) } span { "clusters" } }
            div { b data-k="paths_direct" { (s.paths_direct) } span { "pairs direct" } }
            div { b data-k="paths_relayed" { (s.paths_relayed) } span { "pairs relayed" } }
            div { b { (span(s.uptime_s * 1000)) } span { "relay uptime" } }
        }
        @if !s.gpus_by_model.is_empty() {
            h2 { "GPUs by model" }
            table.models {
                thead { tr { th { "Model" } th.num { "Online" } } }
                tbody {
                    @for (m, n) in &s.gpus_by_model { tr { td { (m) } td.num { (n) } } }
                }
            }
        }
    }
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms == 0 {
        return "never".into();
    }
    format!("{} ago", span(now_ms.saturating_sub(then_ms)))
}

fn state_badge(n: &NodeView) -> Markup {
    let class = if n.online { "on" } else { "off" };
    let text = if n.online { "online" } else { "offline" };
    html! {
        span class={ "badge " (class) } data-state=(n.state) { (text) }
        @if n.state != "online" && n.state != "offline" && n.state != "ready" {
            " " span.sub { (n.state) }
        }
    }
}

fn gpu_list(n: &NodeView) -> Markup {
    html! {
        @if n.gpus.is_empty() { span.sub { "no GPUs" } }
        ul.gpus {
            @for g in &n.gpus {
                li {
                    (g.model) " · " (gpu_gb(g.memory_mib)) " GB"
                    @if g.health != "healthy" { " · " span.warn { (g.health) } }
                    @if let Some(j) = g.job { " · job " (j) }
                    @if let Some(u) = g.util_pct { " · " span.util { (u) "%" } }
                    @if let Some(t) = g.temp_c { " · " (t) " °C" }
                    @if let Some(p) = g.power_w { " · " (format!("{p:.0}")) " W" }
                }
            }
        }
        @if n.simulated { span.sub { "simulated" } }
    }
}

/// The Network page: counters, GPUs by model, the devices online.
pub(crate) fn network(s: &Summary, nodes: &[NodeView], paths: &[PathView]) -> Markup {
    html! {
        h1 { "Network" }
        (counters(s))
        h2 { "Online now" }
        table.devices {
            thead { tr { th { "Device" } th { "GPUs" } th { "Home relay" } } }
            tbody {
                @for n in nodes.iter().filter(|n| n.online) {
                    tr data-device=(n.name) {
                        td { (device_link(n)) }
                        td { (gpu_list(n)) }
                        td { (n.home.as_deref().unwrap_or("-")) }
                    }
                }
            }
        }
        h2 { "Paths" }
        @if paths.is_empty() {
            p.sub { "No two nodes you can see have a WireGuard session now." }
        } @else {
            p.sub {
                (paths.iter().filter(|p| p.path == "direct").count()) " pairs direct, "
                (paths.iter().filter(|p| p.path != "direct").count()) " through a relay"
                @if paths.len() > PATHS_SHOWN { " (the first " (PATHS_SHOWN) " shown, relayed first)" }
            }
            div.scroll { table.paths {
                thead { tr { th { "Node" } th { "Node" } th { "Path" } } }
                tbody {
                    @for p in paths.iter().take(PATHS_SHOWN) {
                        tr data-pair={ (p.a) " " (p.b) } {
                            td { a href={ "/devices/" (p.a) } { (p.a) } }
                            td { a href={ "/devices/" (p.b) } { (p.b) } }
                            td { span class={ "badge p-" (p.path) } { (p.path) } }
                        }
                    }
                }
            } }
        }
    }
}

/// Pairs the Network page lists (the API has them all).
const PATHS_SHOWN: usize = 200;

/// How the Devices list is cut: a filter, a sort key, a page.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default)]
pub(crate) struct DeviceQuery {
    /// Substring of the name, a tag, a GPU model or the state.
    pub(crate) q: String,
    /// `name` (default), `state`, `last_seen`, `gpus`.
    pub(crate) sort: String,
    /// 1-based page.
    pub(crate) page: usize,
}

/// The Devices page.
pub(crate) fn devices(all: &[NodeView], q: &DeviceQuery, now_ms: u64, add: Option<&str>) -> Markup {
    let needle = q.q.to_lowercase();
    let mut rows: Vec<&NodeView> = all
        .iter()
        .filter(|n| {
            needle.is_empty()
                || n.name.to_lowercase().contains(&needle)
                || n.shown().to_lowercase().contains(&needle)
                || n.state.contains(&needle)
                || n.tags.iter().any(|t| t.to_lowercase().contains(&needle))
                || n.gpus
                    .iter()
                    .any(|g| g.model.to_lowercase().contains(&needle))
        })
        .collect();
    match q.sort.as_str() {
        "state" => rows.sort_by_key(|n| (!n.online, n.state.clone())),
        "last_seen" => rows.sort_by_key(|n| std::cmp::Reverse(n.last_seen_ms)),
        "gpus" => rows.sort_by_key(|n| std::cmp::Reverse(n.gpus.len())),
        _ => {}
    }
    let pages = rows.len().div_ceil(PAGE_SIZE).max(1);
    let page = q.page.clamp(1, pages);
    let shown = rows.iter().skip((page - 1) * PAGE_SIZE).take(PAGE_SIZE);
    let href = |p: usize| {
        format!(
            "/devices?q={}&sort={}&page={p}",
            urlencode(&q.q),
            urlencode(&q.sort)
        )
    };
    html! {
        h1 { "Devices" }
        @if let Some(csrf) = add {
            details.add {
                summary { "Add a device" }
                form method="post" action="/devices/add" {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="new-name" { "Name of the new machine" }
                    input id="new-name" name="name" required maxlength="64" placeholder="gpu-worker-2";
                    button type="submit" { "Make a join token" }
                }
            }
        }
        form.filter method="get" action="/devices" role="search" {
            label for="q" { "Filter" }
            input id="q" name="q" type="search" value=(q.q) placeholder="name, tag, GPU model, state";
            label for="sort" { "Sort" }
            select id="sort" name="sort" {
                @for (v, l) in [("name", "name"), ("state", "online first"), ("last_seen", "last seen"), ("gpus", "GPUs")] {
                    option value=(v) selected[q.sort == v] { (l) }
                }
            }
            button type="submit" { "Apply" }
        }
        p.sub { (rows.len()) " devices" @if pages > 1 { ", page " (page) " of " (pages) } }
        div.scroll {
            table.devices {
                thead { tr {
                    th { "Name" } th { "State" } th { "GPUs" } th { "Tags" } th { "Overlay" }
                    th { "Version" } th { "Home relay" } th { "Last seen" }
                } }
                tbody {
                    @for n in shown {
                        tr data-device=(n.name) {
                            td { (device_link(n)) }
                            td { (state_badge(n)) }
                            td { (gpu_list(n)) }
                            td { (n.tags.join(", ")) }
                            td { (n.ipv4.as_deref().unwrap_or("-")) }
                            td { (n.version.as_deref().unwrap_or("-")) }
                            td { (n.home.as_deref().unwrap_or("-")) }
                            td { @if n.online { "now" } @else { (ago(now_ms, n.last_seen_ms)) } }
                        }
                    }
                }
            }
        }
        @if pages > 1 {
            nav.pages aria-label="Pages" {
                @if page > 1 { a href=(href(page - 1)) rel="prev" { "← previous" } }
                @if page < pages { a href=(href(page + 1)) rel="next" { "next →" } }
            }
        }
    }
}

/// A link to a device's page: its display name, and its node name when it has a label.
fn device_link(n: &NodeView) -> Markup {
    html! {
        a href={ "/devices/" (n.name) } { (n.shown()) }
        @if n.label.is_some() { " " span.sub { (n.name) } }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A line chart of the last hour (`points`: unix ms and value), scaled to `max`, as inline SVG.
fn chart(label: &str, unit: &str, points: &[(u64, f64)], max: f64, now_ms: u64) -> Markup {
    let (w, h) = (360.0, 64.0);
    let hour = 3_600_000.0;
    let from = now_ms as f64 - hour;
    let max = if max > 0.0 { max } else { 1.0 };
    let line: Vec<String> = points
        .iter()
        .map(|&(t, v)| {
            let x = ((t as f64 - from) / hour * w).clamp(0.0, w);
            let y = h - (v / max).clamp(0.0, 1.0) * (h - 4.0) - 2.0;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let last = points.last().map(|&(_, v)| v);
    html! {
        figure.chart {
            figcaption { (label) ": " @if let Some(v) = last { (format!("{v:.0}")) " " (unit) } @else { "no readings" } span.sub { " (last hour)" } }
            svg viewBox={ "0 0 " (w) " " (h) } width=(w) height=(h) role="img" aria-label={ (label) ", last hour" } {
                rect x="0" y="0" width=(w) height=(h) fill="none" stroke="#d8dee4" {}
                @if line.len() > 1 {
                    polyline points=(line.join(" ")) fill="none" stroke="#0b5cad" stroke-width="2" {}
                } @else if let Some(p) = line.first() {
                    @let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                    circle cx=(x) cy=(y) r="3" fill="#0b5cad" {}
                }
            }
        }
    }
}

/// One device: its details, GPUs (with their last hour) and jobs.
pub(crate) fn device(
    n: &NodeView,
    jobs: &[JobView],
    history: &std::collections::BTreeMap<String, Vec<crate::telemetry::Point>>,
    now_ms: u64,
    manage: Option<&str>,
    approve: bool,
) -> Markup {
    html! {
        h1 { (n.shown()) " " (state_badge(n)) }
        @if let (true, Some(csrf)) = (approve, manage) {
            form.approve method="post" action={ "/devices/" (n.name) "/approve" } {
                input type="hidden" name="csrf" value=(csrf);
                p {
                    "This machine joined with its provider's token and waits for an operator's approval; "
                    "it keeps trying and is admitted within seconds of it. Not yours to run? Remove it below."
                }
                button type="submit" { "Approve" }
            }
        } @else if n.state == super::model::AWAITING_APPROVAL {
            p.sub { "Waiting for an operator to approve this machine: it keeps trying and comes online within seconds of the approval." }
        }
        dl.facts {
            dt { "Node name" } dd { code { (n.name) } " (its ssh alias and DNS name)" }
            @if let Some(o) = &n.owner { dt { "Provider account" } dd { (o) } }
            dt { "Tags" } dd { (n.tags.join(", ")) }
            dt { "Overlay addresses" } dd { (n.ipv4.as_deref().unwrap_or("-")) " " (n.ipv6.as_deref().unwrap_or("")) }
            dt { "Version" } dd { (n.version.as_deref().unwrap_or("-")) }
            dt { "Home relay" } dd { (n.home.as_deref().unwrap_or("-")) }
            dt { "First seen" } dd { (utc(n.first_seen_ms)) " UTC" }
            dt { "Last seen" } dd { @if n.online { "now" } @else { (ago(now_ms, n.last_seen_ms)) } }
            dt { "Connected in all" } dd { (span(n.uptime_ms)) }
        }
        h2 { "GPUs" }
        @if n.gpus.is_empty() { p.sub { "No GPUs." } } @else {
            div.scroll { table {
                thead { tr {
                    th { "UUID" } th { "Model" } th.num { "Memory" } th { "Health" } th { "Job" }
                    th.num { "Utilisation" } th.num { "Memory used" } th.num { "Temperature" } th.num { "Power" }
                } }
                tbody { @for g in &n.gpus { tr data-gpu=(g.uuid) {
                    td { code { (g.uuid) } } td { (g.model) } td.num { (gpu_gb(g.memory_mib)) " GB" }
                    td { (g.health) } td { (g.job.map(|j| j.to_string()).unwrap_or_else(|| "free".into())) }
                    td.num { (g.util_pct.map(|u| format!("{u}%")).unwrap_or_else(|| "-".into())) }
                    td.num { (g.mem_used_mib.map(|m| format!("{:.1} GB", m as f64 / 1024.0)).unwrap_or_else(|| "-".into())) }
                    td.num { (g.temp_c.map(|t| format!("{t} °C")).unwrap_or_else(|| "-".into())) }
                    td.num { (g.power_w.map(|p| format!("{p:.0} W")).unwrap_or_else(|| "-".into())) }
                } } }
            } }
            @for g in &n.gpus {
                @let h = history.get(&g.uuid).map(Vec::as_slice).unwrap_or(&[]);
                @let util: Vec<(u64, f64)> = h.iter().filter_map(|p| Some((p.minute_ms, p.util_pct?))).collect();
                @let temp: Vec<(u64, f64)> = h.iter().filter_map(|p| Some((p.minute_ms, f64::from(p.temp_c?)))).collect();
                @let power: Vec<(u64, f64)> = h.iter().filter_map(|p| Some((p.minute_ms, p.power_w?))).collect();
                @let pmax = power.iter().map(|p| p.1).fold(0.0, f64::max).max(100.0);
                section.gpu-charts aria-label={ "GPU " (g.uuid) } {
                    h3 { code { (g.uuid) } }
                    div.charts {
                        (chart("Utilisation", "%", &util, 100.0, now_ms))
                        (chart("Temperature", "°C", &temp, 100.0, now_ms))
                        (chart("Power", "W", &power, pmax, now_ms))
                    }
                }
            }
        }
        h2 { "Jobs here" }
        (job_table(jobs))
        @if let Some(csrf) = manage {
            h2 { "Manage" }
            div.manage {
                form.rename method="post" action={ "/devices/" (n.name) "/label" } {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="label" { "Display name" }
                    input id="label" name="label" maxlength="64" value=(n.label.as_deref().unwrap_or("")) placeholder=(n.name);
                    button type="submit" { "Rename" }
                }
                form.remove method="post" action={ "/devices/" (n.name) "/remove" } {
                    input type="hidden" name="csrf" value=(csrf);
                    label for="confirm" { "Type " code { (n.name) } " to remove it (its identity is refused from then on; its records stay)" }
                    input id="confirm" name="confirm" required autocomplete="off";
                    button.danger type="submit" { "Remove" }
                }
            }
        }
    }
}

/// After "add a device": the token (shown once) and the command to run on the new machine.
pub(crate) fn added(name: &str, token: &str, tag: &str, minutes: u64) -> Markup {
    let cmd = format!(
        "sudo worker-agent run --token {token} --state-dir /var/lib/weft-agent --name {name}"
    );
    html! {
        h1 { "Add " (name) }
        p { "A join token for one machine, valid for " (minutes) " minutes, tagged " code { (tag) } ". It is shown only here, once." }
        h2 { "On the new machine, as root" }
        pre.command { code id="add-command" { (cmd) } }
        p.sub {
            "The agent joins with the token on its first run (later runs need none), reports its GPUs and "
            "exposes its ssh; it then appears under " a href="/devices" { "Devices" } "."
        }
    }
}

fn job_table(jobs: &[JobView]) -> Markup {
    html! {
        @if jobs.is_empty() { p.sub { "None." } } @else {
            div.scroll { table.jobs {
                thead { tr { th.num { "Job" } th { "Engineer" } th { "State" } th { "Command" } th { "Workers" } th { "Submitted" } th { "Why it waits" } } }
                tbody { @for j in jobs { tr data-job=(j.id) {
                    td.num { (j.id) } td { (j.owner) }
                    td { span class={ "badge s-" (j.state) } { (j.state) } }
                    td { code { (j.request.command.join(" ")) } }
                    td { (j.members.iter().map(|m| m.worker.as_str()).collect::<Vec<_>>().join(", ")) }
                    td { (utc(j.submitted_ms)) }
                    td { (j.reason.as_deref().unwrap_or("")) }
                } } }
            } }
        }
    }
}

/// The Jobs page: waiting (with why), running, finished.
pub(crate) fn jobs(all: &[JobView], clusters: &[ClusterView]) -> Markup {
    let of = |states: &[&str]| -> Vec<JobView> {
        all.iter()
            .filter(|j| states.contains(&j.state.as_str()))
            .cloned()
            .collect()
    };
    let finished: Vec<JobView> = of(&["succeeded", "failed", "lost", "cancelled"])
        .into_iter()
        .take(100)
        .collect();
    html! {
        h1 { "Jobs and clusters" }
        h2 { "Clusters" }
        @if clusters.is_empty() { p.sub { "None. " code { "weft cluster up NAME --nodes N" } " makes a Ray cluster over the mesh." } } @else {
            div.scroll { table.clusters {
                thead { tr { th { "Cluster" } th.num { "Job" } th { "Engineer" } th { "State" } th { "Head" } th { "Workers" } th.num { "GPUs" } th.num { "Ray nodes alive" } } }
                tbody { @for c in clusters { tr data-cluster=(c.name) {
                    td { (c.name) @if c.degraded { " " span.warn { "degraded" } } }
                    td.num { (c.job) } td { (c.owner) }
                    td { span class={ "badge s-" (c.state) } { (c.state) } }
                    td { (c.head.as_deref().unwrap_or("-")) }
                    td { (c.workers.join(", ")) }
                    td.num { (c.gpus) } td.num { (c.ray_alive) "/" (c.workers.len()) }
                } } }
            } }
        }
        h2 { "Queued" } (job_table(&of(&["pending"])))
        h2 { "Running" } (job_table(&of(&["placed", "running"])))
        h2 { "Finished (latest 100)" } (job_table(&finished))
    }
}

/// The Earnings page.
pub(crate) fn earnings(rows: &[Earning], page: usize) -> Markup {
    let total: f64 = rows.iter().map(|r| r.gpu_seconds).sum();
    let pages = rows.len().div_ceil(PAGE_SIZE).max(1);
    let page = page.clamp(1, pages);
    let shown = rows.iter().skip((page - 1) * PAGE_SIZE).take(PAGE_SIZE);
    html! {
        h1 { "Earnings" }
        p { "GPU-seconds each device gave, per UTC day, from the signed usage records. "
            a href="/earnings.csv" download="weft-earnings.csv" { "Download CSV" } }
        p.sub { (rows.len()) " rows" @if pages > 1 { ", page " (page) " of " (pages) } }
        div.scroll { table.earnings {
            thead { tr { th { "Device" } th { "Day" } th.num { "GPU-seconds" } th.num { "GPU-hours" } th.num { "Jobs" } } }
            tbody { @for r in shown { tr {
                td { (r.device) } td { (r.day) } td.num { (format!("{:.1}", r.gpu_seconds)) }
                td.num { (format!("{:.3}", r.gpu_seconds / 3600.0)) } td.num { (r.records) }
            } } }
            tfoot { tr { th colspan="2" { "Total" } th.num { (format!("{total:.1}")) } th.num { (format!("{:.3}", total / 3600.0)) } th {} } }
        } }
        @if pages > 1 {
            nav.pages aria-label="Pages" {
                @if page > 1 { a href={ "/earnings?page=" (page - 1) } rel="prev" { "← previous" } }
                @if page < pages { a href={ "/earnings?page=" (page + 1) } rel="next" { "next →" } }
            }
        }
    }
}

/// An error page (the status is the handler's).
pub(crate) fn error(message: &str) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head { meta charset="utf-8"; title { "Weft" } link rel="stylesheet" href="/assets/weft.css"; }
            body { main { p.notice role="alert" { (message) } p { a href="/" { "Weft" } } } }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::super::model::GpuView;
    use super::*;

    fn n(name: &str, model: &str) -> NodeView {
        NodeView {
            name: name.into(),
            tags: vec!["worker".into()],
            online: true,
            state: "ready".into(),
            ipv4: Some("100.64.0.2".into()),
            ipv6: None,
            version: Some("0.1.0".into()),
            home: None,
            first_seen_ms: 0,
            last_seen_ms: 0,
            uptime_ms: 0,
            gpus: vec![GpuView {
                uuid: "GPU-1".into(),
                model: model.into(),
                memory_mib: 81920,
                health: "healthy".into(),
                job: None,
                util_pct: Some(42),
                mem_used_mib: None,
                temp_c: Some(61),
                power_w: Some(212.4),
            }],
            simulated: true,
            label: None,
            owner: None,
        }
    }

    #[test]
    fn names_and_models_are_text_not_markup() {
        let evil = "<img src=x onerror=alert(1)>";
        let html = devices(&[n("gpu1", evil)], &DeviceQuery::default(), 0, None).into_string();
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("&lt;img src=x onerror=alert(1)&gt;"),
            "{html}"
        );
    }

    #[test]
    fn devices_filter_sort_and_page() {
        let all: Vec<NodeView> = (0..120).map(|i| n(&format!("gpu{i:03}"), "H100")).collect();
        let q = DeviceQuery {
            q: "gpu1".into(),
            sort: "name".into(),
            page: 1,
        };
        let html = devices(&all, &q, 0, None).into_string();
        assert!(html.contains("20 devices"), "gpu100..gpu119: {html}");
        let q = DeviceQuery {
            page: 3,
            ..DeviceQuery::default()
        };
        let html = devices(&all, &q, 0, None).into_string();
        assert!(
            html.contains("page 3 of 3") && html.contains("gpu119") && !html.contains("gpu099")
        );
        assert!(html.contains("rel=\"prev\"") && !html.contains("rel=\"next\""));
    }

    #[test]
    fn readings_and_charts_render() {
        let node = n("gpu1", "H100");
        let html = devices(
            std::slice::from_ref(&node),
            &DeviceQuery::default(),
            0,
            None,
        )
        .into_string();
        assert!(
            html.contains("42%") && html.contains("61 °C") && html.contains("212 W"),
            "{html}"
        );
        let pts = vec![
            crate::telemetry::Point {
                minute_ms: 3_540_000,
                util_pct: Some(10.0),
                power_w: Some(100.0),
                temp_c: Some(50),
                mem_used_mib: None,
            },
            crate::telemetry::Point {
                minute_ms: 3_600_000,
                util_pct: Some(90.0),
                power_w: Some(300.0),
                temp_c: Some(70),
                mem_used_mib: None,
            },
        ];
        let hist = std::collections::BTreeMap::from([("GPU-1".to_string(), pts)]);
        let html = device(&node, &[], &hist, 3_600_000, Some("tok"), false).into_string();
        assert_eq!(html.matches("<polyline").count(), 3, "{html}");
        assert!(html.contains("Utilisation: 90 %"), "{html}");
        let empty = device(&node, &[], &Default::default(), 3_600_000, None, false).into_string();
        assert!(empty.contains("no readings"), "{empty}");
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(span(12_000), "12s");
        assert_eq!(span(250_000), "4m 10s");
        assert_eq!(span(7_500_000), "2h 5m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d 4h");
    }
}
