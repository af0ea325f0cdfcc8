//! The engineer's pool commands (issue 11): `weft jobs …` without `--worker`, `weft pool`,
//! `weft usage`.
//!
//! They talk to the relay's pool API (`weft_proto::pool`'s JSON over HTTP/1.1 on a
//! `Message::Api` stream, as [`client::Endpoint::Pool`] does) and, for a job's logs, to the
//! agents of the workers it runs on (their `agent` service), all on one relay session. The
//! renderers and the flag readers are pure (the time is passed in); the I/O goes through a
//! [`Fabric`]: the relay session in use, loopback servers in the tests.
//!
//! A gang's logs (`logs` of a job with more than one member) stream from every member at once,
//! each line prefixed `[rank N WORKER] ` and written whole (lines are buffered per member, at
//! most [`MAX_LOG_LINE`] bytes, so two members never interleave within a line); a one-member
//! job's log is passed through byte for byte.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tunnel_relay::cli::StateDirArg;
use weft_proto::gpuspec::GpuSpec;
use weft_proto::pool::{JobView, MemberView, PoolView, SubmitRequest, UsageRecord};
use weft_proto::usage;

use crate::cli::{check, check_from, kv, timeout_secs, JobsCmd, SubmitArgs};
use crate::client::{self, Call, ClientError, POOL_HOST, POOL_LABEL};
use crate::relay::AGENT_SERVICE;
use tunnel_relay::pool_text::{
    civil_from_days, columns, days_from_civil, job_text, jobs_table, pool_text, rfc3339, utc,
    utc_opt, workers_of,
};

/// The pool API's job collection.
pub const JOBS_PATH: &str = "/v1/pool/jobs";
/// The pool API's workers-and-queue view.
pub const POOL_PATH: &str = "/v1/pool";
/// The pool API's usage records (`?since=UNIX_MS`).
pub const USAGE_PATH: &str = "/v1/pool/usage";
/// How often `logs --follow` asks whether a job has started.
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// The longest line a gang member's log is buffered for; a longer one is cut there (a newline
/// is added) so that memory stays bounded.
pub const MAX_LOG_LINE: usize = 64 << 10;

/// `weft pool`: the workers with every GPU, and the queue.
#[derive(clap::Args, Debug, Clone)]
pub struct PoolArgs {
    /// The pool view as JSON (`weft_proto::pool::PoolView`).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// `weft usage`: the usage records of finished pool jobs.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageArgs {
    #[command(subcommand)]
    pub cmd: Option<UsageCmd>,
    /// Only records that ended at or after this: a UTC date (2025-01-31, 2025-01-31T12:00Z) or
    /// a duration back from now (2h, 7d). Default: all.
    #[arg(long, value_name = "DATE|DURATION")]
    pub since: Option<String>,
    /// The records as JSON (`weft_proto::pool::UsageRecord`s).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// The records as CSV, one row per record, with a header.
    #[arg(long)]
    pub csv: bool,
    #[command(flatten)]
    pub state: StateDirArg,
}

/// `weft usage export|verify`.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum UsageCmd {
    /// The signed records for a payment layer: each signed by the worker that ran it and
    /// countersigned by the coordinator, numbered without gaps, with a manifest signed by the
    /// relay (JSON lines, or CSV with the manifest as a last `# manifest` line).
    Export(UsageExportArgs),
    /// Checks an export: every signature, that each record was signed by the worker that ran
    /// it, and that no record was dropped. Exits 1 when anything is wrong, naming each record.
    Verify(UsageVerifyArgs),
}

/// `weft usage export`.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageExportArgs {
    /// Only records the coordinator stored at or after this: a UTC date (2025-01-31,
    /// 2025-01-31T12:00Z) or a duration back from now (2h, 7d). Default: all.
    #[arg(long, value_name = "DATE|DURATION")]
    pub since: Option<String>,
    /// `jsonl` (the manifest, then one record per line) or `csv`.
    #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
    pub format: ExportFormat,
    /// Write to this file (replaced whole once complete) instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<std::path::PathBuf>,
}

/// The file format of `weft usage export`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// JSON lines.
    Jsonl,
    /// CSV.
    Csv,
}

/// `weft usage verify`.
#[derive(clap::Args, Debug, Clone)]
pub struct UsageVerifyArgs {
    /// The export (JSON lines or CSV, as `weft usage export` wrote it; `-`: standard input).
    pub file: std::path::PathBuf,
    /// Accept only an export signed with this relay key (`ed25519:…`, as `tunnel-relay
    /// usage-key` prints it on the relay); may be repeated.
    #[arg(long = "trust", value_name = "KEY")]
    pub trust: Vec<String>,
}

/// Fresh byte streams to the pool API and to a worker's agent API.
///
/// Used on one thread (the CLI's current-thread runtime): no `Send` bound.
pub(crate) trait Fabric {
    /// A new stream to the pool API.
    async fn pool(&self) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError>;
    /// A new stream to `worker`'s agent API.
    async fn agent(&self, worker: &str)
        -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError>;
}

/// The fabric of an open relay session: `open_api` for the pool, `open(worker, "agent")` for
/// the agents.
pub(crate) struct RelayFabric<'a> {
    pub(crate) session: &'a tunnel_relay::Session,
    pub(crate) state_dir: &'a Path,
}

impl Fabric for RelayFabric<'_> {
    async fn pool(&self) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError> {
        let (send, recv) = self
            .session
            .open_api()
            .await
            .map_err(ClientError::pool_relay(self.state_dir))?;
        Ok(tokio::io::join(recv, send))
    }

    async fn agent(
        &self,
        worker: &str,
    ) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError> {
        let (send, recv) = self
            .session
            .open(worker, AGENT_SERVICE)
            .await
            .map_err(ClientError::relay(worker, self.state_dir))?;
        Ok(tokio::io::join(recv, send))
    }
}

/// Runs `run` with a relay session as the identity in `state_dir`, on a private
/// current-thread runtime; closes the session after.
pub(crate) fn on_pool<T>(
    state_dir: &Path,
    run: impl AsyncFnOnce(&RelayFabric<'_>) -> Result<T>,
) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(ClientError::Runtime)?;
    rt.block_on(async {
        let session = tunnel_relay::client::session(state_dir)
            .await
            .map_err(ClientError::pool_relay(state_dir))?;
        let fabric = RelayFabric {
            session: &session,
            state_dir,
        };
        let r = run(&fabric).await;
        session.close().await;
        r
    })
}

/// The current time, Unix ms.
pub(crate) fn now_ms() -> u64 {
    crate::sampler::unix_ms()
}

// ---- the commands ----

/// `jobs …`: to the pool (see [`crate::cli::goes_to_pool`]; `pool_default` is the binary's
/// choice: `weft` yes, `worker-agent` no), else to one agent through [`crate::cli::jobs`].
pub fn jobs_or_agent(a: crate::cli::JobsArgs, pool_default: bool) -> Result<()> {
    if crate::cli::goes_to_pool(&a.api, pool_default) {
        let state_dir = client::engineer_dir(a.api.state_dir.as_deref())?;
        return jobs(a.cmd, &state_dir);
    }
    crate::cli::jobs(a, pool_default)
}

/// `jobs …` on the pool, as the engineer whose identity is in `state_dir`. Flags are checked
/// (`--gpu`'s grammar included) before anything is sent.
pub fn jobs(cmd: JobsCmd, state_dir: &Path) -> Result<()> {
    if let JobsCmd::Submit(s) = &cmd {
        submit_request(s)?;
    }
    on_pool(state_dir, async |f| {
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        jobs_on(f, cmd, &mut out, &mut err).await
    })
}

/// `weft pool`.
pub fn pool(a: &PoolArgs) -> Result<()> {
    let dir = a.state.dir()?;
    on_pool(&dir, async |f| {
        pool_on(f, a.json, now_ms(), &mut std::io::stdout()).await
    })
}

/// `weft usage`.
pub fn usage(a: &UsageArgs) -> Result<()> {
    if a.cmd.is_some() && (a.since.is_some() || a.json || a.csv) {
        bail!(
            "--since, --json and --csv before `export`/`verify` are the listing's flags; \
             put the subcommand's own flags after it (`weft usage export --since 7d --format csv`)"
        );
    }
    match &a.cmd {
        Some(UsageCmd::Export(e)) => return usage_export(e, &a.state),
        Some(UsageCmd::Verify(v)) => return usage_verify(v),
        None => {}
    }
    let since = match &a.since {
        Some(s) => since_ms(s, now_ms())?,
        None => 0,
    };
    let format = match (a.json, a.csv) {
        (true, _) => UsageFormat::Json,
        (_, true) => UsageFormat::Csv,
        _ => UsageFormat::Table,
    };
    let dir = a.state.dir()?;
    on_pool(&dir, async |f| {
        usage_on(f, since, format, &mut std::io::stdout()).await
    })
}

/// The pool API's signed usage export (`?since=UNIX_MS`, by the time records were stored).
pub const USAGE_EXPORT_PATH: &str = "/v1/pool/usage/export";

/// `weft usage export`.
fn usage_export(a: &UsageExportArgs, state: &StateDirArg) -> Result<()> {
    let since = match &a.since {
        Some(s) => since_ms(s, now_ms())?,
        None => 0,
    };
    let dir = state.dir()?;
    let text = on_pool(&dir, async |f| export_text(f, since, a.format).await)?;
    match &a.output {
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            out.flush()?;
        }
        Some(path) => {
            let tmp = path.with_extension("part");
            std::fs::write(&tmp, &text)
                .and_then(|_| std::fs::rename(&tmp, path))
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
    }
    Ok(())
}

/// The export as the file's text.
async fn export_text(f: &impl Fabric, since_ms: u64, format: ExportFormat) -> Result<String> {
    let raw = pool_bytes(
        f,
        Call::get(&format!("{USAGE_EXPORT_PATH}?since={since_ms}")),
    )
    .await?;
    let e: usage::Export = parse(&raw, "usage export")?;
    Ok(match format {
        ExportFormat::Jsonl => usage::to_jsonl(&e),
        ExportFormat::Csv => usage::to_csv(&e),
    })
}

/// `weft usage verify`.
fn usage_verify(a: &UsageVerifyArgs) -> Result<()> {
    let (name, text) = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
            .context("cannot read standard input")?;
        ("standard input".to_string(), s)
    } else {
        let s = std::fs::read_to_string(&a.file)
            .with_context(|| format!("cannot read {}", a.file.display()))?;
        (a.file.display().to_string(), s)
    };
    for k in &a.trust {
        if !usage::key_ok(k) {
            bail!("--trust {k:?}: not a usage key; expected ed25519: and 44 characters of base64");
        }
    }
    let (report, problems) = verify_text(&name, &text, &a.trust)?;
    print!("{report}");
    if problems > 0 {
        bail!("{name}: {problems} problem(s); the records above cannot be trusted as they are");
    }
    Ok(())
}

/// What `weft usage verify` prints for `text`, and how many problems it found. Pure.
fn verify_text(name: &str, text: &str, trust: &[String]) -> Result<(String, usize)> {
    let (manifest, records) =
        usage::parse_export(text).with_context(|| format!("{name} is not a usage export"))?;
    let rep = usage::verify(manifest.as_ref(), &records, trust);
    let mut out = String::new();
    let _ = write!(out, "{name}: {} record(s)", rep.records);
    if let (Some(m), Some((relay, key))) = (&manifest, &rep.exported_by) {
        let _ = write!(
            out,
            ", exported by {relay} (key {}) at {}",
            usage::short(key),
            rfc3339(m.manifest.exported_ms)
        );
        if let Some(e) = &m.manifest.engineer {
            let _ = write!(out, ", {e}'s records only");
        }
    }
    out.push('\n');
    for p in &rep.problems {
        let _ = writeln!(out, "  {p}");
    }
    if rep.problems.is_empty() {
        let seqs = manifest
            .as_ref()
            .map(|m| {
                m.manifest
                    .seqs
                    .iter()
                    .map(|(a, b)| {
                        if a == b {
                            a.to_string()
                        } else {
                            format!("{a}-{b}")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "all {} verified: each signed by the worker that ran it and countersigned by the \
             coordinator, none changed, none dropped (sequence {}); {} GPU-seconds",
            rep.records,
            if seqs.is_empty() {
                "empty".into()
            } else {
                seqs
            },
            rep.gpu_seconds
        );
    } else {
        let _ = writeln!(
            out,
            "{} of {} verified ({} GPU-seconds); {} problem(s)",
            rep.good,
            rep.records,
            rep.gpu_seconds,
            rep.problems.len()
        );
    }
    if trust.is_empty() {
        if let Some((_, key)) = &rep.exported_by {
            let _ = writeln!(
                out,
                "note: the relay's key was not pinned; pass --trust {key} (what `tunnel-relay \
                 usage-key` prints on the relay) to accept no other"
            );
        }
    }
    Ok((out, rep.problems.len()))
}

/// The pool's [`SubmitRequest`] for `jobs submit`'s flags; one agent's flags are refused, and
/// a malformed `--gpu` is refused with the parser's message (what, and at which column).
fn submit_request(s: &SubmitArgs) -> Result<SubmitRequest> {
    let per_worker = s.worker_flags();
    if !per_worker.is_empty() {
        bail!(
            "{}: one worker's, not the pool's: the pool does not take {}; pass --worker NAME \
             to run on that worker",
            crate::cli::and_list(&per_worker),
            if per_worker.len() == 1 { "it" } else { "them" }
        );
    }
    if let Some(g) = &s.gpu {
        g.parse::<GpuSpec>()?;
    }
    Ok(SubmitRequest {
        command: s.command.clone(),
        env: kv(&s.env, "--env")?,
        workdir: s.workdir.clone(),
        gpus: s.gpus,
        gpu: s.gpu.clone(),
        nodes: s.nodes.unwrap_or(1),
        priority: s.priority.unwrap_or(0),
        retries: s.retry.unwrap_or(0),
        timeout_s: s.timeout.map(timeout_secs),
        wait_for_capacity: s.wait_for_capacity,
        worker: None,
        cluster: None,
    })
}

async fn jobs_on(
    f: &impl Fabric,
    cmd: JobsCmd,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    match cmd {
        JobsCmd::Submit(s) => {
            let req = submit_request(&s)?;
            let body = serde_json::to_string(&req)?;
            let raw = pool_bytes(f, Call::new("POST", JOBS_PATH, Some(&body))).await?;
            let j: JobView = parse(&raw, "job")?;
            if s.json {
                out.write_all(&raw)?;
                writeln!(out)?;
            } else {
                writeln!(out, "{}", j.id)?;
            }
        }
        JobsCmd::List { json } => {
            let raw = pool_bytes(f, Call::get(JOBS_PATH)).await?;
            let jobs: Vec<JobView> = parse(&raw, "job list")?;
            if json {
                out.write_all(&raw)?;
                writeln!(out)?;
            } else {
                out.write_all(jobs_table(&jobs).as_bytes())?;
            }
        }
        JobsCmd::Show { id, json } => {
            let raw = pool_bytes(f, Call::get(&format!("{JOBS_PATH}/{id}"))).await?;
            print_job(out, &raw, json)?;
        }
        JobsCmd::Cancel { id, json } => {
            let path = format!("{JOBS_PATH}/{id}/cancel");
            let raw = pool_bytes(f, Call::new("POST", &path, None)).await?;
            print_job(out, &raw, json)?;
        }
        JobsCmd::Logs { id, follow } => logs(f, id, follow, FOLLOW_POLL, out, err).await?,
    }
    out.flush()?;
    Ok(())
}

fn print_job(out: &mut dyn Write, raw: &[u8], json: bool) -> Result<()> {
    let j: JobView = parse(raw, "job")?;
    if json {
        out.write_all(raw)?;
        writeln!(out)?;
    } else {
        out.write_all(job_text(&j).as_bytes())?;
    }
    Ok(())
}

async fn pool_on(f: &impl Fabric, json: bool, now_ms: u64, out: &mut dyn Write) -> Result<()> {
    let raw = pool_bytes(f, Call::get(POOL_PATH)).await?;
    let view: PoolView = parse(&raw, "pool view")?;
    if json {
        out.write_all(&raw)?;
        writeln!(out)?;
    } else {
        out.write_all(pool_text(&view, now_ms).as_bytes())?;
    }
    out.flush()?;
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UsageFormat {
    Table,
    Json,
    Csv,
}

async fn usage_on(
    f: &impl Fabric,
    since_ms: u64,
    format: UsageFormat,
    out: &mut dyn Write,
) -> Result<()> {
    let raw = pool_bytes(f, Call::get(&format!("{USAGE_PATH}?since={since_ms}"))).await?;
    let records: Vec<UsageRecord> = parse(&raw, "usage records")?;
    match format {
        UsageFormat::Json => {
            out.write_all(&raw)?;
            writeln!(out)?;
        }
        UsageFormat::Csv => out.write_all(usage_csv(&records).as_bytes())?,
        UsageFormat::Table => out.write_all(usage_table(&records).as_bytes())?,
    }
    out.flush()?;
    Ok(())
}

/// One request to the pool API; a non-2xx answer is an error with the pool's message.
pub(crate) async fn pool_bytes(f: &impl Fabric, call: Call<'_>) -> Result<Vec<u8>> {
    let stream = f.pool().await?;
    let mut body = Vec::new();
    let (code, failed) = client::request_as(stream, POOL_HOST, POOL_LABEL, call, &mut body).await?;
    check_from("the pool", code, &failed)?;
    Ok(body)
}

pub(crate) fn parse<T: DeserializeOwned>(raw: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(raw).with_context(|| format!("{what} JSON from {POOL_LABEL}"))
}

async fn get_job(f: &impl Fabric, id: u64) -> Result<JobView> {
    parse(
        &pool_bytes(f, Call::get(&format!("{JOBS_PATH}/{id}"))).await?,
        "job",
    )
}

// ---- logs ----

/// Whether a pool job state is an end (`succeeded`, `failed`, `lost`, `cancelled`).
fn ended(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "lost" | "cancelled")
}

/// Whether every member of the job's placement has started on its worker (has a local id).
fn started(j: &JobView) -> bool {
    !j.members.is_empty() && j.members.iter().all(|m| m.local_id.is_some())
}

/// What `logs --follow` says on stderr while a job has not started.
fn waiting_line(j: &JobView) -> String {
    let why = match (&j.reason, j.members.is_empty()) {
        (Some(r), _) => format!(": {r}"),
        (None, false) => format!(" on {}", workers_of(j)),
        (None, true) => String::new(),
    };
    format!(
        "pool job {} {}{why}; waiting for it to start (Ctrl-C stops waiting, the job stays queued)",
        j.id, j.state
    )
}

/// `logs ID [--follow]` of a pool job: the job from the pool, then each started member's log
/// from its worker's agent (`/v1/jobs/LOCAL/logs`). One member: its bytes as they are. A gang:
/// all members at once, every line prefixed `[rank N WORKER] `. With `follow`, a job that has
/// not started is polled every `poll` (a line on `err` each time its state changes) until every
/// member has started or the job ended.
async fn logs(
    f: &impl Fabric,
    id: u64,
    follow: bool,
    poll: Duration,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<()> {
    let mut job = get_job(f, id).await?;
    if follow {
        let mut said = String::new();
        while !started(&job) && !ended(&job.state) {
            let line = waiting_line(&job);
            if line != said {
                writeln!(err, "{line}")?;
                said = line;
            }
            tokio::time::sleep(poll).await;
            job = get_job(f, id).await?;
        }
    }
    let members: Vec<(&MemberView, u64)> = job
        .members
        .iter()
        .filter_map(|m| m.local_id.map(|l| (m, l)))
        .collect();
    if members.is_empty() {
        if ended(&job.state) {
            bail!(
                "pool job {id} is {} and never started on a worker: it has no log",
                job.state
            );
        }
        let why = job
            .reason
            .as_deref()
            .map_or(String::new(), |r| format!(" ({r})"));
        bail!(
            "pool job {id} is {}{why} and has not started on a worker yet: no log; \
             `--follow` waits for it",
            job.state
        );
    }
    for m in job.members.iter().filter(|m| m.local_id.is_none()) {
        writeln!(
            err,
            "rank {} on {} has not started: no log from it",
            m.rank, m.worker
        )?;
    }
    if job.members.len() == 1 {
        let (m, local) = members[0];
        return member_log(f, m, local, follow, out).await;
    }
    let shared = RefCell::new(out);
    let results = futures::future::join_all(members.iter().map(|&(m, local)| {
        let shared = &shared;
        async move {
            let mut w = Prefixed::new(format!("[rank {} {}] ", m.rank, m.worker), shared);
            let r = member_log(f, m, local, follow, &mut w).await;
            let done = w.finish().map_err(ClientError::Sink);
            r.and(done.map_err(anyhow::Error::from))
                .with_context(|| format!("rank {} on {}", m.rank, m.worker))
        }
    }))
    .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(())
}

/// One member's log from its worker's agent, streamed to `sink`.
pub(crate) async fn member_log(
    f: &impl Fabric,
    m: &MemberView,
    local: u64,
    follow: bool,
    sink: &mut dyn Write,
) -> Result<()> {
    let stream = f.agent(&m.worker).await?;
    let path = format!("/v1/jobs/{local}/logs?follow={follow}");
    let label = format!("{}/{AGENT_SERVICE}", m.worker);
    let (code, failed) =
        client::request_on(stream, &label, Call::get(&path).streamed(), sink).await?;
    check(code, &failed)
}

/// A line-buffered writer that writes each whole line, prefixed, to a shared output in one
/// `write_all`: on one thread, lines of different writers never interleave.
struct Prefixed<'a, 'b> {
    prefix: String,
    line: Vec<u8>,
    out: &'a RefCell<&'b mut dyn Write>,
}

impl<'a, 'b> Prefixed<'a, 'b> {
    fn new(prefix: String, out: &'a RefCell<&'b mut dyn Write>) -> Self {
        Prefixed {
            prefix,
            line: Vec::new(),
            out,
        }
    }

    /// Writes the buffered line (which ends with `\n`) with its prefix.
    fn emit(&mut self) -> std::io::Result<()> {
        let mut whole = Vec::with_capacity(self.prefix.len() + self.line.len());
        whole.extend_from_slice(self.prefix.as_bytes());
        whole.append(&mut self.line);
        self.out.borrow_mut().write_all(&whole)
    }

    /// The last line, if it had no newline, gets one; then the output is flushed.
    fn finish(&mut self) -> std::io::Result<()> {
        if !self.line.is_empty() {
            self.line.push(b'\n');
            self.emit()?;
        }
        self.out.borrow_mut().flush()
    }
}

impl Write for Prefixed<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() {
            let room = MAX_LOG_LINE.saturating_sub(self.line.len()).max(1);
            let take = rest.len().min(room);
            match rest[..take].iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.line.extend_from_slice(&rest[..=i]);
                    rest = &rest[i + 1..];
                    self.emit()?;
                }
                None => {
                    self.line.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if self.line.len() >= MAX_LOG_LINE {
                        self.line.push(b'\n');
                        self.emit()?;
                    }
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.borrow_mut().flush()
    }
}

fn outcome(r: &UsageRecord) -> String {
    match r.exit_code {
        Some(c) if r.outcome != "succeeded" => format!("{} (exit {c})", r.outcome),
        _ => r.outcome.clone(),
    }
}

/// `weft usage`: one row per record, then the total.
fn usage_table(records: &[UsageRecord]) -> String {
    let mut rows = vec![[
        "JOB", "RANK", "ENGINEER", "WORKER", "GPU", "GPUS", "START", "END", "GPU-S", "OUTCOME",
    ]
    .map(String::from)
    .to_vec()];
    for r in records {
        rows.push(vec![
            if r.attempt > 1 {
                format!("{} (attempt {})", r.job, r.attempt)
            } else {
                r.job.to_string()
            },
            r.rank.to_string(),
            r.engineer.clone(),
            r.worker.clone(),
            r.gpu_model.clone(),
            r.gpus.len().to_string(),
            utc_opt(r.start_ms),
            utc(r.end_ms),
            format!("{:.1}", r.gpu_seconds),
            outcome(r),
        ]);
    }
    let total: f64 = records.iter().map(|r| r.gpu_seconds).sum();
    let mut s = columns("", &rows);
    let _ = writeln!(
        s,
        "total: {} record{}, {total:.1} GPU-seconds ({:.2} GPU-hours)",
        records.len(),
        if records.len() == 1 { "" } else { "s" },
        total / 3600.0
    );
    s
}

/// One CSV field (RFC 4180: quoted when it holds `,`, `"` or a line break).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `weft usage --csv`: a header, then one row per record; times RFC 3339 UTC, GPUs `;`-separated.
fn usage_csv(records: &[UsageRecord]) -> String {
    let mut s = String::from(
        "job,attempt,rank,engineer,worker,gpu_model,gpu_count,gpus,start,end,gpu_seconds,outcome,exit_code\n",
    );
    for r in records {
        let fields = [
            r.job.to_string(),
            r.attempt.to_string(),
            r.rank.to_string(),
            r.engineer.clone(),
            r.worker.clone(),
            r.gpu_model.clone(),
            r.gpus.len().to_string(),
            r.gpus.join(";"),
            r.start_ms.map(rfc3339).unwrap_or_default(),
            rfc3339(r.end_ms),
            format!("{}", r.gpu_seconds),
            r.outcome.clone(),
            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        ];
        let row: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s
}

/// Unix ms of a UTC date: `YYYY-MM-DD`, optionally followed by `T` or a blank and
/// `HH:MM[:SS]`, optionally ending in `Z`.
fn parse_date(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t.strip_suffix(['Z', 'z']).unwrap_or(t);
    let (date, time) = match t.split_once(['T', 't', ' ']) {
        Some((d, tm)) => (d, Some(tm)),
        None => (t, None),
    };
    let num = |s: &str, len: usize| -> Option<u32> {
        (s.len() == len && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let mut d = date.split('-');
    let (y, m, day) = (num(d.next()?, 4)?, num(d.next()?, 2)?, num(d.next()?, 2)?);
    if d.next().is_some() || !(1..=12).contains(&m) || day == 0 {
        return None;
    }
    let days = days_from_civil(i64::from(y), m, day);
    if civil_from_days(days) != (i64::from(y), m, day) {
        return None; // 2025-02-30
    }
    let secs = match time {
        None => 0,
        Some(tm) => {
            let mut p = tm.split(':');
            let (h, mi) = (num(p.next()?, 2)?, num(p.next()?, 2)?);
            let s = match p.next() {
                Some(s) => num(s, 2)?,
                None => 0,
            };
            if p.next().is_some() || h > 23 || mi > 59 || s > 59 {
                return None;
            }
            u64::from(h * 3600 + mi * 60 + s)
        }
    };
    let day_secs = u64::try_from(days).ok()?.checked_mul(86_400)?;
    day_secs.checked_add(secs)?.checked_mul(1000)
}

/// `--since`: a UTC date, or a duration back from `now_ms` (Unix ms).
fn since_ms(text: &str, now_ms: u64) -> Result<u64> {
    let t = text.trim();
    let looks_like_date =
        t.len() >= 5 && t[..4].bytes().all(|b| b.is_ascii_digit()) && t.as_bytes()[4] == b'-';
    if looks_like_date {
        return parse_date(t).with_context(|| {
            format!(
                "--since {text:?}: not a date: expected YYYY-MM-DD, optionally with THH:MM[:SS] \
                 (UTC, on or after 1970-01-01), e.g. 2025-01-31 or 2025-01-31T12:00"
            )
        });
    }
    match tunnel_relay::duration::parse(t) {
        Ok(d) => Ok(now_ms.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))),
        Err(e) => bail!(
            "--since {text:?}: {e}; expected a duration back from now (e.g. 2h, 7d) or a UTC \
             date (e.g. 2025-01-31)"
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};
    use tunnel_relay::pool_text::span;
    use weft_proto::pool::WorkerView;

    use clap::Parser;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use weft_proto::pool::{GpuInfo, Inventory};

    /// One request as a fake server saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        body: String,
    }

    /// An answer: a status and the body's chunks, each sent after its delay (chunked).
    struct Answer {
        code: u16,
        chunks: Vec<(Duration, Vec<u8>)>,
    }

    impl Answer {
        fn json(code: u16, v: &impl serde::Serialize) -> Answer {
            Answer {
                code,
                chunks: vec![(Duration::ZERO, serde_json::to_vec(v).unwrap())],
            }
        }
        fn error(code: u16, msg: &str) -> Answer {
            Answer::json(code, &serde_json::json!({ "error": msg }))
        }
    }

    type Handler = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

    /// Reads one request: its head, then as many body bytes as its Content-Length says.
    async fn read_request(s: &mut TcpStream) -> Option<Seen> {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|n| n.trim().parse().unwrap())
                    })
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    let mut first = head.lines().next()?.split(' ');
                    return Some(Seen {
                        method: first.next()?.to_string(),
                        path: first.next()?.to_string(),
                        body: String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned(),
                    });
                }
            }
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// A fake HTTP/1.1 server on loopback: every request is recorded and answered by `handler`.
    async fn fake(handler: Handler) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (handler, log) = (handler.clone(), log.clone());
                tokio::spawn(async move {
                    let Some(req) = read_request(&mut s).await else {
                        return;
                    };
                    log.lock().unwrap().push(req.clone());
                    let a = handler(&req);
                    let head = format!(
                        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\n\
                         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
                        a.code
                    );
                    s.write_all(head.as_bytes()).await.unwrap();
                    for (delay, c) in a.chunks {
                        tokio::time::sleep(delay).await;
                        let mut frame = format!("{:x}\r\n", c.len()).into_bytes();
                        frame.extend_from_slice(&c);
                        frame.extend_from_slice(b"\r\n");
                        s.write_all(&frame).await.unwrap();
                        s.flush().await.unwrap();
                    }
                    s.write_all(b"0\r\n\r\n").await.unwrap();
                    let _ = s.shutdown().await;
                });
            }
        });
        (addr, seen)
    }

    /// The pool and the agents as loopback servers.
    struct Loopback {
        pool: SocketAddr,
        agents: BTreeMap<String, SocketAddr>,
    }

    impl Fabric for Loopback {
        async fn pool(&self) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError> {
            TcpStream::connect(self.pool)
                .await
                .map_err(|source| ClientError::Io {
                    addr: POOL_LABEL.into(),
                    source,
                })
        }

        async fn agent(
            &self,
            worker: &str,
        ) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError> {
            let addr = self.agents[worker];
            TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Io {
                    addr: worker.into(),
                    source,
                })
        }
    }

    /// A pool answering with `handler`, and no agents.
    async fn pool_only(handler: Handler) -> (Loopback, Arc<Mutex<Vec<Seen>>>) {
        let (pool, seen) = fake(handler).await;
        let f = Loopback {
            pool,
            agents: BTreeMap::new(),
        };
        (f, seen)
    }

    #[derive(Parser)]
    struct Jobs {
        #[command(subcommand)]
        cmd: JobsCmd,
    }

    fn cmd(args: &[&str]) -> JobsCmd {
        Jobs::try_parse_from(std::iter::once("jobs").chain(args.iter().copied()))
            .unwrap()
            .cmd
    }

    fn request(cmd: &str) -> SubmitRequest {
        SubmitRequest {
            command: cmd.split(' ').map(String::from).collect(),
            nodes: 1,
            ..SubmitRequest::default()
        }
    }

    fn member(rank: u32, worker: &str, local_id: Option<u64>, state: &str) -> MemberView {
        MemberView {
            rank,
            worker: worker.into(),
            gpus: vec![format!("GPU-{worker}-0")],
            local_id,
            state: state.into(),
            exit_code: None,
        }
    }

    fn job(id: u64, state: &str, request: SubmitRequest, members: Vec<MemberView>) -> JobView {
        JobView {
            id,
            owner: "alice".into(),
            state: state.into(),
            request,
            reason: None,
            attempt: u32::from(!members.is_empty()),
            members,
            submitted_ms: 1_700_000_000_000,
            started_ms: None,
            ended_ms: None,
            cluster: None,
        }
    }

    /// Runs `jobs_on` on `f`: (result, stdout, stderr).
    async fn run(f: &Loopback, args: &[&str]) -> (Result<()>, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let r = jobs_on(f, cmd(args), &mut out, &mut err).await;
        (
            r,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[tokio::test]
    async fn submit_sends_what_the_flags_say_and_prints_the_id() {
        let (f, seen) = pool_only(Arc::new(|s: &Seen| {
            let req: SubmitRequest = serde_json::from_str(&s.body).unwrap();
            Answer::json(201, &job(42, "pending", req, vec![]))
        }))
        .await;
        let args = [
            "submit",
            "--gpu",
            "A100:2",
            "--nodes",
            "2",
            "--priority",
            "-5",
            "--retry",
            "1",
            "--timeout",
            "90m",
            "--env",
            "LR=3e-4",
            "--workdir",
            "/data",
            "--wait-for-capacity",
            "--",
            "python",
            "train.py",
            "--epochs",
            "3",
        ];
        let (r, out, _) = run(&f, &args).await;
        r.unwrap();
        assert_eq!(out, "42\n");
        let got = seen.lock().unwrap().clone();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].method.as_str(), got[0].path.as_str()),
            ("POST", JOBS_PATH)
        );
        // deny_unknown_fields: the body is exactly a SubmitRequest
        let body: SubmitRequest = serde_json::from_str(&got[0].body).unwrap();
        assert_eq!(
            body,
            SubmitRequest {
                command: ["python", "train.py", "--epochs", "3"]
                    .map(String::from)
                    .to_vec(),
                env: BTreeMap::from([("LR".into(), "3e-4".into())]),
                workdir: Some("/data".into()),
                gpus: 0,
                gpu: Some("A100:2".into()),
                nodes: 2,
                priority: -5,
                retries: 1,
                timeout_s: Some(5400),
                wait_for_capacity: true,
                worker: None,
                cluster: None,
            }
        );

        // The defaults: one node, priority 0, no retries; --json prints the job.
        let (r, out, _) = run(&f, &["submit", "--gpus", "1", "--json", "--", "true"]).await;
        r.unwrap();
        let v: JobView = serde_json::from_str(&out).unwrap();
        assert_eq!(v.id, 42);
        let last = seen.lock().unwrap().last().unwrap().body.clone();
        let body: SubmitRequest = serde_json::from_str(&last).unwrap();
        assert_eq!(
            (body.nodes, body.priority, body.retries, body.gpus, body.gpu),
            (1, 0, 0, 1, None)
        );
    }

    /// A fabric on which any connection fails the test: nothing may be sent.
    struct Nowhere;

    fn called(what: &str) -> Result<tokio::io::DuplexStream, ClientError> {
        panic!("{what} was called")
    }

    impl Fabric for Nowhere {
        async fn pool(&self) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError> {
            called("the pool")
        }
        async fn agent(&self, w: &str) -> Result<impl AsyncRead + AsyncWrite + Unpin, ClientError> {
            called(w)
        }
    }

    #[tokio::test]
    async fn a_malformed_gpu_spec_fails_before_any_request_with_the_column() {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let e = jobs_on(
            &Nowhere,
            cmd(&["submit", "--gpu", "80XB", "--", "true"]),
            &mut out,
            &mut err,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            r#"--gpu 80XB: unknown unit "XB" at column 3; use MB, GB or TB"#
        );
        // The public entry point checks it before it opens a session (this state dir does not
        // exist, so any attempt to reach the relay would fail otherwise).
        let e = jobs(
            cmd(&["submit", "--gpu", "80XB", "--", "true"]),
            Path::new("/nonexistent/weft-identity"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at column 3"), "{e}");
        // One agent's flags are not the pool's.
        let e = jobs_on(
            &Nowhere,
            cmd(&["submit", "--cpus", "2", "--label", "a=b", "--", "true"]),
            &mut out,
            &mut err,
        )
        .await
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--label and --cpus: one worker's, not the pool's: the pool does not take them; \
             pass --worker NAME to run on that worker"
        );
        assert!(out.is_empty() && err.is_empty());
    }

    #[test]
    fn pool_flags_with_one_worker_are_refused_before_any_request() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            jobs: crate::cli::JobsArgs,
        }
        let args = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("weft").chain(a.iter().copied()))
                .unwrap()
                .jobs
        };
        // --state-dir does not exist: anything reaching for the relay would fail differently.
        let base = ["--state-dir", "/nonexistent/weft-identity"];
        let with = |extra: &[&str]| {
            let mut v: Vec<&str> = base.to_vec();
            v.extend_from_slice(extra);
            args(&v)
        };
        let e = jobs_or_agent(
            with(&[
                "submit", "--worker", "gpu1", "--gpu", "A100", "--nodes", "2", "--", "true",
            ]),
            true,
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--gpu and --nodes: the pool's, not one worker's: leave out --worker/--api and the \
             pool places the job (`weft pool` shows the workers), or leave them out"
        );
        // `worker-agent jobs` (no pool default) says where the pool is.
        let e = crate::cli::jobs(with(&["submit", "--priority", "9", "--", "true"]), false)
            .unwrap_err();
        assert!(
            e.to_string().contains("--priority: the pool's")
                && e.to_string()
                    .contains("`weft jobs submit` without --worker"),
            "{e}"
        );
        // Routing: the pool only by default and only without --worker/--api.
        let a = with(&["list"]);
        assert!(crate::cli::goes_to_pool(&a.api, true));
        assert!(!crate::cli::goes_to_pool(&a.api, false));
        let a = with(&["list", "--worker", "gpu1"]);
        assert!(!crate::cli::goes_to_pool(&a.api, true));
        let a = args(&["list", "--api", "http://127.0.0.1:1"]);
        assert!(!crate::cli::goes_to_pool(&a.api, true));
    }

    #[tokio::test]
    async fn an_error_body_becomes_the_error() {
        const MSG: &str = "no worker has a GPU with >=80 GB: largest is 24 GB (gpu3); \
                           add --wait-for-capacity to queue it anyway";
        let (f, _) = pool_only(Arc::new(|_: &Seen| Answer::error(422, MSG))).await;
        let (r, out, _) = run(&f, &["submit", "--gpu", "80GB..", "--", "true"]).await;
        assert_eq!(
            r.unwrap_err().to_string(),
            format!("the pool answered 422: {MSG}")
        );
        assert!(out.is_empty());
        let (f, _) = pool_only(Arc::new(|_: &Seen| {
            Answer::error(
                403,
                "job 9 is bob's: only its owner or an operator may see it",
            )
        }))
        .await;
        let (r, _, _) = run(&f, &["show", "9"]).await;
        assert_eq!(
            r.unwrap_err().to_string(),
            "the pool answered 403: job 9 is bob's: only its owner or an operator may see it"
        );
    }

    /// A pending job, a running gang, a finished one.
    fn some_jobs() -> Vec<JobView> {
        let mut pending = job(
            9,
            "pending",
            SubmitRequest {
                gpu: Some("H100".into()),
                gpus: 2,
                priority: 90,
                ..request("python big.py")
            },
            vec![],
        );
        pending.reason = Some("no free H100".into());
        let gang = job(
            7,
            "running",
            SubmitRequest {
                gpu: Some("80GB..:2".into()),
                nodes: 2,
                ..request("torchrun train.py")
            },
            vec![
                member(0, "gpu1", Some(12), "running"),
                member(1, "gpu2", Some(3), "running"),
            ],
        );
        let mut done = job(
            5,
            "succeeded",
            SubmitRequest {
                gpus: 1,
                ..request("true")
            },
            vec![member(0, "gpu3", Some(1), "succeeded")],
        );
        done.owner = "bob".into();
        vec![pending, gang, done]
    }

    #[tokio::test]
    async fn list_shows_each_job_with_its_spec_workers_and_reason() {
        let (f, seen) = pool_only(Arc::new(|_: &Seen| Answer::json(200, &some_jobs()))).await;
        let (r, out, _) = run(&f, &["list"]).await;
        r.unwrap();
        assert_eq!(seen.lock().unwrap()[0].path, JOBS_PATH);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        let cells = |l: &str| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            cells(lines[0]),
            ["ID", "OWNER", "STATE", "SPEC", "NODES", "PRIO", "WORKERS", "REASON"]
        );
        assert_eq!(
            cells(lines[1]),
            [
                "9",
                "alice",
                "pending",
                "H100 ×2",
                "1",
                "90",
                "-",
                "no free H100"
            ]
        );
        assert_eq!(
            cells(lines[2]),
            ["7", "alice", "running", "80GB..:2", "2", "0", "gpu1, gpu2"]
        );
        assert_eq!(
            cells(lines[3]),
            ["5", "bob", "succeeded", "1×any", "1", "0", "gpu3"]
        );
        // The columns line up.
        let col = |l: &str| {
            l.find("STATE")
                .or_else(|| l.find("pending"))
                .or_else(|| l.find("running"))
                .or_else(|| l.find("succeeded"))
        };
        assert!(lines.iter().all(|l| col(l) == col(lines[0])), "{out}");
        // --json passes the pool's answer through.
        let (r, out, _) = run(&f, &["list", "--json"]).await;
        r.unwrap();
        let back: Vec<JobView> = serde_json::from_str(&out).unwrap();
        assert_eq!(back, some_jobs());
    }

    #[tokio::test]
    async fn show_and_cancel_print_the_job_and_its_members() {
        let (f, seen) = pool_only(Arc::new(|_: &Seen| Answer::json(200, &some_jobs()[1]))).await;
        let (r, out, _) = run(&f, &["show", "7"]).await;
        r.unwrap();
        assert!(
            out.starts_with("pool job 7: running (attempt 1), owner alice\n"),
            "{out}"
        );
        assert!(out.contains("command:   torchrun train.py"), "{out}");
        assert!(
            out.contains("asks:      80GB..:2  nodes 2  priority 0  retries 0  timeout none"),
            "{out}"
        );
        assert!(
            out.contains("rank 0  gpu1  local job 12  running  GPU-gpu1-0"),
            "{out}"
        );
        assert!(
            out.contains("rank 1  gpu2  local job 3   running  GPU-gpu2-0"),
            "{out}"
        );
        let (r, _, _) = run(&f, &["cancel", "7"]).await;
        r.unwrap();
        let got = seen.lock().unwrap().clone();
        assert_eq!(
            got.iter()
                .map(|s| (s.method.as_str(), s.path.as_str()))
                .collect::<Vec<_>>(),
            [
                ("GET", "/v1/pool/jobs/7"),
                ("POST", "/v1/pool/jobs/7/cancel")
            ]
        );
    }

    fn gpu(model: &str, mib: u64, health: &str) -> GpuInfo {
        GpuInfo {
            uuid: format!("GPU-{model}-{mib}-{health}"),
            model: model.into(),
            memory_mib: mib,
            health: health.into(),
            job: None,
        }
    }

    fn pool_view() -> PoolView {
        let a100 = "NVIDIA A100-SXM4-80GB";
        let rtx = "NVIDIA GeForce RTX 4090";
        let mut rtx_gpus: Vec<GpuInfo> = (0..4)
            .map(|i| GpuInfo {
                uuid: format!("GPU-rtx-{i}"),
                ..gpu(rtx, 24_564, if i == 2 { "unhealthy" } else { "healthy" })
            })
            .collect();
        rtx_gpus[3].job = Some(4); // a job submitted to this worker directly
        let a = |gpus: Vec<GpuInfo>, simulated| Inventory {
            gpus,
            cpus: 32,
            memory_bytes: 256 << 30,
            version: "0.1.0".into(),
            simulated,
            running: vec![],
            ray: None,
            ray_heads: vec![],
            usage_key: None,
        };
        let mut gpu1 = gpu(a100, 81_920, "healthy");
        gpu1.uuid = "GPU-cloned".into();
        PoolView {
            workers: vec![
                WorkerView {
                    name: "gpu1".into(),
                    state: "ready".into(),
                    inventory: a(vec![gpu(a100, 81_920, "healthy"), gpu1], false),
                    holders: vec![Some(7), None],
                    flagged: vec!["GPU-cloned".into()],
                    first_seen_ms: 1_700_000_000_000,
                    connected_since_ms: Some(1_700_000_000_000),
                    last_seen_ms: 1_700_000_100_000,
                    uptime_ms: 3 * 3_600_000 + 12 * 60_000,
                    usage_keys: vec![],
                },
                WorkerView {
                    name: "gpu2".into(),
                    state: "disconnected".into(),
                    inventory: a(rtx_gpus, true),
                    holders: vec![None; 4],
                    flagged: vec![],
                    first_seen_ms: 1_700_000_000_000,
                    connected_since_ms: None,
                    last_seen_ms: 1_700_000_000_000,
                    uptime_ms: 59_000,
                    usage_keys: vec![],
                },
            ],
            queue: some_jobs().into_iter().take(2).collect(),
            policy: "binpack".into(),
        }
    }

    #[tokio::test]
    async fn pool_names_every_gpu_and_the_queue() {
        let (f, seen) = pool_only(Arc::new(|_: &Seen| Answer::json(200, &pool_view()))).await;
        let mut out = Vec::new();
        pool_on(&f, false, 1_700_000_125_000, &mut out)
            .await
            .unwrap();
        assert_eq!(seen.lock().unwrap()[0].path, POOL_PATH);
        let out = String::from_utf8(out).unwrap();
        let has = |s: &str| assert!(out.contains(s), "{s:?} missing from:\n{out}");
        has("gpu1  ready  uptime 3h 14m, connected since 2023-11-14 22:13:20  32 CPUs, 256 GiB, agent 0.1.0, no ray (not for clusters)\n");
        has("  GPU 0  NVIDIA A100-SXM4-80GB  80 GB  healthy  job 7\n");
        has("  GPU 1  NVIDIA A100-SXM4-80GB  80 GB  healthy  free   GPU-cloned: FLAGGED, reported by another worker too (not scheduled)\n");
        has("gpu2  disconnected  uptime 59s, last seen 2m 5s ago  32 CPUs, 256 GiB, agent 0.1.0, no ray (not for clusters)  simulated GPUs (stub NVML)\n");
        for i in 0..4 {
            has(&format!("  GPU {i}  NVIDIA GeForce RTX 4090  24 GB  "));
        }
        has("  GPU 2  NVIDIA GeForce RTX 4090  24 GB  unhealthy  free\n");
        has("  GPU 3  NVIDIA GeForce RTX 4090  24 GB  healthy    busy (local job 4, not the pool's)\n");
        has("\nqueue (policy binpack): 2 jobs\n");
        has("  job 9  pending  alice  prio 90  H100 ×2   1 node   waiting: no free H100\n");
        has("  job 7  running  alice  prio 0   80GB..:2  2 nodes  on gpu1 (rank 0), gpu2 (rank 1)\n");
        // --json passes the view through.
        let mut out = Vec::new();
        pool_on(&f, true, 0, &mut out).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<PoolView>(&out).unwrap(),
            pool_view()
        );
    }

    /// A fake agent that streams `chunks` as any job's log.
    async fn agent(chunks: Vec<(u64, &'static [u8])>) -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
        let chunks: Vec<(Duration, Vec<u8>)> = chunks
            .into_iter()
            .map(|(ms, b)| (Duration::from_millis(ms), b.to_vec()))
            .collect();
        fake(Arc::new(move |_: &Seen| Answer {
            code: 200,
            chunks: chunks.clone(),
        }))
        .await
    }

    #[tokio::test]
    async fn a_gangs_logs_are_prefixed_by_rank_and_never_interleave_within_a_line() {
        let gang = some_jobs()[1].clone();
        let (pool, _) = fake(Arc::new(move |_: &Seen| Answer::json(200, &gang))).await;
        // The two members' lines arrive split across chunks, interleaved in time: written as
        // they come, "alpha be" would be followed by "one tw" on the same line.
        let (a1, seen1) = agent(vec![(0, b"alpha be"), (60, b"ta\ngamma\n")]).await;
        let (a2, seen2) = agent(vec![(20, b"one tw"), (10, b"o\nthree")]).await;
        let f = Loopback {
            pool,
            agents: BTreeMap::from([("gpu1".into(), a1), ("gpu2".into(), a2)]),
        };
        let (r, out, err) = run(&f, &["logs", "7"]).await;
        r.unwrap();
        assert!(err.is_empty(), "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert!(out.ends_with('\n'), "{out:?}");
        let of =
            |p: &str| -> Vec<&str> { lines.iter().filter_map(|l| l.strip_prefix(p)).collect() };
        assert_eq!(of("[rank 0 gpu1] "), ["alpha beta", "gamma"], "{out}");
        // the last line had no newline: it gets one
        assert_eq!(of("[rank 1 gpu2] "), ["one two", "three"], "{out}");
        assert_eq!(lines.len(), 4, "every line is one member's: {out}");
        // Both streamed at once: rank 1's first line came before rank 0's second.
        assert!(
            lines.iter().position(|l| l.ends_with("one two"))
                < lines.iter().position(|l| l.ends_with("gamma")),
            "{out}"
        );
        assert_eq!(
            seen1.lock().unwrap()[0].path,
            "/v1/jobs/12/logs?follow=false"
        );
        assert_eq!(
            seen2.lock().unwrap()[0].path,
            "/v1/jobs/3/logs?follow=false"
        );
    }

    #[tokio::test]
    async fn one_members_log_is_passed_through_byte_for_byte() {
        let mut solo = some_jobs()[2].clone();
        solo.state = "running".into();
        let (pool, _) = fake(Arc::new(move |_: &Seen| Answer::json(200, &solo))).await;
        let (a3, seen3) = agent(vec![(0, b"a\r\nb"), (5, b"\xff\x00 no newline")]).await;
        let f = Loopback {
            pool,
            agents: BTreeMap::from([("gpu3".into(), a3)]),
        };
        let mut out = Vec::new();
        let mut err = Vec::new();
        jobs_on(&f, cmd(&["logs", "5", "--follow"]), &mut out, &mut err)
            .await
            .unwrap();
        assert_eq!(out, b"a\r\nb\xff\x00 no newline");
        assert_eq!(seen3.lock().unwrap()[0].path, "/v1/jobs/1/logs?follow=true");
    }

    #[tokio::test]
    async fn follow_waits_for_a_pending_job_to_start() {
        let asked = Arc::new(Mutex::new(0u32));
        let n = asked.clone();
        let (pool, _) = fake(Arc::new(move |_: &Seen| {
            let mut n = n.lock().unwrap();
            *n += 1;
            let mut j = job(3, "pending", request("python x.py"), vec![]);
            match *n {
                1 | 2 => j.reason = Some("no free H100".into()),
                3 => {
                    j.state = "placed".into();
                    j.members = vec![member(0, "gpu1", None, "starting")];
                }
                _ => {
                    j.state = "running".into();
                    j.members = vec![member(0, "gpu1", Some(8), "running")];
                }
            }
            Answer::json(200, &j)
        }))
        .await;
        let (a1, seen1) = agent(vec![(0, b"started\n")]).await;
        let f = Loopback {
            pool,
            agents: BTreeMap::from([("gpu1".into(), a1)]),
        };
        let (mut out, mut err) = (Vec::new(), Vec::new());
        logs(&f, 3, true, Duration::from_millis(5), &mut out, &mut err)
            .await
            .unwrap();
        assert_eq!(out, b"started\n");
        assert_eq!(*asked.lock().unwrap(), 4);
        let err = String::from_utf8(err).unwrap();
        // one line per state, not one per poll
        assert_eq!(
            err.lines().collect::<Vec<_>>(),
            [
                "pool job 3 pending: no free H100; waiting for it to start (Ctrl-C stops waiting, the job stays queued)",
                "pool job 3 placed on gpu1; waiting for it to start (Ctrl-C stops waiting, the job stays queued)",
            ]
        );
        assert_eq!(seen1.lock().unwrap()[0].path, "/v1/jobs/8/logs?follow=true");

        // Without --follow a job that has not started is an error that says so.
        let (pool, _) = fake(Arc::new(|_: &Seen| {
            let mut j = job(3, "pending", request("python x.py"), vec![]);
            j.reason = Some("waiting for 2 nodes".into());
            Answer::json(200, &j)
        }))
        .await;
        let f = Loopback {
            pool,
            agents: BTreeMap::new(),
        };
        let e = logs(&f, 3, false, FOLLOW_POLL, &mut Vec::new(), &mut Vec::new())
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pool job 3 is pending (waiting for 2 nodes) and has not started on a worker yet: \
             no log; `--follow` waits for it"
        );
    }

    #[test]
    fn a_long_line_is_cut_not_buffered_forever() {
        let mut sink: Vec<u8> = Vec::new();
        let out: &mut dyn Write = &mut sink;
        let shared = RefCell::new(out);
        let mut w = Prefixed::new("[r] ".into(), &shared);
        w.write_all(&vec![b'x'; MAX_LOG_LINE + 10]).unwrap();
        w.write_all(b"\nend").unwrap();
        w.finish().unwrap();
        drop(w);
        let text = String::from_utf8(sink).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{}", text.len());
        assert_eq!(lines[0].len(), 4 + MAX_LOG_LINE);
        assert_eq!(lines[1], format!("[r] {}", "x".repeat(10)));
        assert_eq!(lines[2], "[r] end");
    }

    fn record(job: u64, rank: u32, outcome: &str, exit_code: Option<i32>) -> UsageRecord {
        UsageRecord {
            job,
            attempt: 1,
            rank,
            engineer: "alice".into(),
            worker: format!("gpu{}", rank + 1),
            gpu_model: "NVIDIA A100-SXM4-80GB".into(),
            gpus: vec!["GPU-a".into(), "GPU-b".into()],
            start_ms: Some(1_700_000_000_000),
            end_ms: 1_700_000_360_000,
            gpu_seconds: 720.0,
            outcome: outcome.into(),
            exit_code,
        }
    }

    /// An export of two records (gpu1's and gpu2's), each signed by its worker and countersigned.
    fn signed_export() -> usage::Export {
        let coord = usage::Signer::from_seed(&[9; 32]);
        let mut worker_keys = std::collections::BTreeMap::new();
        let records: Vec<usage::SignedUsage> = [(1u64, "gpu1"), (2, "gpu2")]
            .into_iter()
            .map(|(seq, w)| {
                let k = usage::Signer::from_seed(&[seq as u8; 32]);
                worker_keys.insert(w.to_string(), vec![k.public().to_string()]);
                let mut r = record(seq, 0, "succeeded", Some(0));
                r.worker = w.into();
                let c = usage::WorkerClaim::sign(r, &k);
                usage::SignedUsage::countersign(
                    seq,
                    5,
                    "relay-a",
                    c.record,
                    Ok((c.key, c.sig)),
                    &coord,
                )
            })
            .collect();
        let m = usage::Manifest {
            relay: "relay-a".into(),
            exported_ms: 1_699_000_000_000,
            seqs: usage::Manifest::ranges([1, 2]),
            worker_keys,
            relay_keys: [("relay-a".to_string(), vec![coord.public().to_string()])].into(),
            ..usage::Manifest::default()
        };
        usage::Export {
            manifest: usage::SignedManifest::sign(m, &coord),
            records,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn export_asks_since_and_verify_names_what_was_changed_or_dropped() {
        let e = signed_export();
        let answer = e.clone();
        let (f, seen) = pool_only(Arc::new(move |_: &Seen| Answer::json(200, &answer))).await;
        let jsonl = export_text(&f, 1_699_000_000_000, ExportFormat::Jsonl)
            .await
            .unwrap();
        assert_eq!(
            seen.lock().unwrap()[0].path,
            "/v1/pool/usage/export?since=1699000000000"
        );
        assert_eq!(jsonl.lines().count(), 3, "{jsonl}");
        let csv = export_text(&f, 0, ExportFormat::Csv).await.unwrap();
        assert!(csv.starts_with("seq,stored_ms,relay,job,"), "{csv}");
        assert!(
            csv.lines().last().unwrap().starts_with("# manifest {"),
            "{csv}"
        );

        let coord = usage::Signer::from_seed(&[9; 32]).public().to_string();
        for text in [&jsonl, &csv] {
            let (out, n) = verify_text("u", text, &[]).unwrap();
            assert_eq!(n, 0, "{out}");
            assert!(
                out.starts_with("u: 2 record(s), exported by relay-a (key ed25519:"),
                "{out}"
            );
            assert!(out.contains("all 2 verified"), "{out}");
            assert!(out.contains("(sequence 1-2); 1440 GPU-seconds"), "{out}");
            assert!(out.contains(&format!("--trust {coord}")), "{out}");
            let (out, n) = verify_text("u", text, std::slice::from_ref(&coord)).unwrap();
            assert_eq!(n, 0, "{out}");
            assert!(!out.contains("note:"), "{out}");
        }
        // The second record's GPU-seconds raised, the first dropped.
        let lines: Vec<&str> = jsonl.lines().collect();
        let tampered = format!(
            "{}\n{}\n",
            lines[0],
            lines[2].replace("\"gpu_seconds\":720.0", "\"gpu_seconds\":7200.0")
        );
        assert_ne!(tampered.lines().nth(1), Some(lines[2]), "the edit applied");
        let (out, n) = verify_text("u", &tampered, &[]).unwrap();
        assert_eq!(n, 3, "{out}");
        assert!(
            out.contains("record 2: job 2 attempt 1 on gpu2: changed after it was stored"),
            "{out}"
        );
        assert!(out.contains("record 1 was dropped"), "{out}");
        assert!(out.contains("0 of 1 verified"), "{out}");
        // A key that is not the relay's, and a file that is not an export.
        let (_, n) = verify_text(
            "u",
            &jsonl,
            &[usage::Signer::from_seed(&[3; 32]).public().to_string()],
        )
        .unwrap();
        assert_eq!(n, 1);
        let err = verify_text("u", "{\"seq\": 1}\n", &[]).unwrap_err();
        assert!(
            format!("{err:#}").contains("u is not a usage export: line 1: malformed usage record"),
            "{err:#}"
        );
    }

    #[tokio::test]
    async fn usage_asks_since_and_prints_records_as_a_table_csv_or_json() {
        let records = vec![record(7, 0, "succeeded", Some(0)), {
            let mut r = record(7, 1, "failed", Some(3));
            r.engineer = "o'neil, \"ops\"".into();
            r
        }];
        let answer = records.clone();
        let (f, seen) = pool_only(Arc::new(move |_: &Seen| Answer::json(200, &answer))).await;
        let mut out = Vec::new();
        usage_on(&f, 1_699_000_000_000, UsageFormat::Table, &mut out)
            .await
            .unwrap();
        assert_eq!(
            seen.lock().unwrap()[0].path,
            "/v1/pool/usage?since=1699000000000"
        );
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[0].starts_with("JOB  RANK  ENGINEER"), "{out}");
        assert!(
            lines[1].contains("gpu1") && lines[1].contains("NVIDIA A100-SXM4-80GB  2"),
            "{out}"
        );
        assert!(
            lines[1].contains("2023-11-14 22:13:20  2023-11-14 22:19:20  720.0  succeeded"),
            "{out}"
        );
        assert!(lines[2].ends_with("720.0  failed (exit 3)"), "{out}");
        assert_eq!(
            lines[3],
            "total: 2 records, 1440.0 GPU-seconds (0.40 GPU-hours)"
        );

        let mut out = Vec::new();
        usage_on(&f, 0, UsageFormat::Csv, &mut out).await.unwrap();
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "job,attempt,rank,engineer,worker,gpu_model,gpu_count,gpus,start,end,gpu_seconds,outcome,exit_code");
        assert_eq!(lines[1], "7,1,0,alice,gpu1,NVIDIA A100-SXM4-80GB,2,GPU-a;GPU-b,2023-11-14T22:13:20.000Z,2023-11-14T22:19:20.000Z,720,succeeded,0");
        assert_eq!(lines[2], "7,1,1,\"o'neil, \"\"ops\"\"\",gpu2,NVIDIA A100-SXM4-80GB,2,GPU-a;GPU-b,2023-11-14T22:13:20.000Z,2023-11-14T22:19:20.000Z,720,failed,3");

        let mut out = Vec::new();
        usage_on(&f, 0, UsageFormat::Json, &mut out).await.unwrap();
        assert_eq!(
            serde_json::from_slice::<Vec<UsageRecord>>(&out).unwrap(),
            records
        );
    }

    #[test]
    fn since_reads_dates_and_durations() {
        let now = 1_700_000_000_000;
        assert_eq!(since_ms("2h", now).unwrap(), now - 7_200_000);
        assert_eq!(since_ms("7d", now).unwrap(), now - 7 * 86_400_000);
        assert_eq!(since_ms("100000d", now).unwrap(), 0);
        assert_eq!(since_ms("2023-11-14", now).unwrap(), 1_699_920_000_000);
        assert_eq!(since_ms("2023-11-14T22:13:20Z", now).unwrap(), now);
        assert_eq!(since_ms("2023-11-14 22:13", now).unwrap(), now - 20_000);
        assert_eq!(since_ms("1970-01-01", now).unwrap(), 0);
        for bad in ["2023-02-29", "2023-13-01", "2023-11-14T25:00", "2023-1-14"] {
            let e = since_ms(bad, now).unwrap_err().to_string();
            assert!(e.contains("not a date") && e.contains(bad), "{bad}: {e}");
        }
        let e = since_ms("yesterday", now).unwrap_err().to_string();
        assert!(
            e.contains("--since \"yesterday\"") && e.contains("e.g. 2h, 7d"),
            "{e}"
        );
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_700_000_000_000), "2023-11-14 22:13:20");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(parse_date("2000-02-29"), Some(951_782_400_000));
        for days in [-719_468i64, -1, 0, 59, 365, 11_016, 19_675, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(span(59_000), "59s");
        assert_eq!(span(125_000), "2m 5s");
        assert_eq!(span(3 * 3_600_000 + 12 * 60_000 + 5_000), "3h 12m");
        assert_eq!(span(2 * 86_400_000 + 3_600_000), "2d 1h");
    }
}
