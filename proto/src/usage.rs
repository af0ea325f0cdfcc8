//! Signed usage records (issue 15): what a payment layer can trust.
//!
//! Every finished copy of a job leaves one [`UsageRecord`]. The worker that ran it signs the
//! record with its **usage key** (Ed25519; the agent's `usage-signing.key`, announced in its
//! [`crate::pool::Inventory`] on the pool feed, which the relay has authenticated as that node)
//! when the copy ends, and sends it with the end ([`WorkerClaim`]). The coordinator checks the
//! claim against its own record of the job (same fields, the key is one this worker announced),
//! gives it the next number of its one **sequence** (1, 2, 3, … without gaps) and countersigns
//! the whole ([`SignedUsage`]) with its own key. An export ([`Export`]) is a [`Manifest`], signed
//! by the exporting relay, that names the sequence numbers it covers and every key, then the
//! records. [`verify`] checks all of it and says, per record, what is wrong: changed after
//! signing, dropped from the sequence, signed by a node that did not run the job, not signed.
//!
//! Signatures are over a fixed binary encoding of the fields (big-endian integers,
//! length-prefixed strings, `f64` as its bits), each kind with its own domain string, so JSON
//! or CSV formatting never matters: a file is checked by parsing it and encoding again.
//! No I/O here: key files live in the shells (`tunnel_relay::keys::UsageKey`).

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};

use crate::codec::{Format, Width, Writer};

/// A finished job's usage record: a pool copy's, or (attempt 0) a per-worker job's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Pool job; for a per-worker job (attempt 0) the agent's local job id.
    pub job: u64,
    /// Attempt (1, 2, …); 0 for a per-worker job (`weft jobs submit --worker`).
    pub attempt: u32,
    /// Rank in the job.
    pub rank: u32,
    /// Engineer.
    pub engineer: String,
    /// Provider node (worker name).
    pub worker: String,
    /// GPU model.
    pub gpu_model: String,
    /// GPU UUIDs.
    pub gpus: Vec<String>,
    /// Unix ms (absent if it never started).
    pub start_ms: Option<u64>,
    /// Unix ms.
    pub end_ms: u64,
    /// GPUs × seconds run.
    pub gpu_seconds: f64,
    /// The agent's end state.
    pub outcome: String,
    /// Exit code.
    pub exit_code: Option<i32>,
}

/// How a usage key is written: `ed25519:` and the base64 of its 32 bytes.
pub const KEY_PREFIX: &str = "ed25519:";

const FORMAT: Format = Format {
    count: Width::U32,
    len: Width::U32,
};
const WORKER_DOMAIN: &[u8] = b"weft usage v1: worker record\0";
const COORD_DOMAIN: &[u8] = b"weft usage v1: coordinator countersignature\0";
const MANIFEST_DOMAIN: &[u8] = b"weft usage v1: export manifest\0";

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// An Ed25519 signing key (from its 32-byte seed). `Debug` prints only the public half.
pub struct Signer {
    pair: Ed25519KeyPair,
    public: String,
}

impl Signer {
    /// The key of this seed.
    pub fn from_seed(seed: &[u8; 32]) -> Signer {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed).expect("any 32 bytes are a seed");
        let public = format!("{KEY_PREFIX}{}", b64().encode(pair.public_key().as_ref()));
        Signer { pair, public }
    }

    /// The public key, as written (`ed25519:…`).
    pub fn public(&self) -> &str {
        &self.public
    }

    fn sign(&self, msg: &[u8]) -> String {
        b64().encode(self.pair.sign(msg).as_ref())
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Signer({}, private ***)", self.public)
    }
}

/// Whether `sig` (base64) is `key`'s (`ed25519:…`) signature of `msg`.
fn valid(key: &str, msg: &[u8], sig: &str) -> bool {
    let Some(k) = key.strip_prefix(KEY_PREFIX) else {
        return false;
    };
    let (Ok(k), Ok(s)) = (b64().decode(k), b64().decode(sig)) else {
        return false;
    };
    k.len() == 32 && UnparsedPublicKey::new(&ED25519, k).verify(msg, &s).is_ok()
}

/// Whether `key` is a well-formed usage key (`ed25519:` and 32 bytes of base64).
pub fn key_ok(key: &str) -> bool {
    key.strip_prefix(KEY_PREFIX)
        .and_then(|k| b64().decode(k).ok())
        .is_some_and(|k| k.len() == 32)
}

/// A key's short form for messages: its first 12 base64 characters.
pub fn short(key: &str) -> String {
    let k = key.strip_prefix(KEY_PREFIX).unwrap_or(key);
    format!("{KEY_PREFIX}{}…", k.chars().take(12).collect::<String>())
}

fn put_record(w: &mut Writer, r: &UsageRecord) {
    w.u64(r.job);
    w.u32(r.attempt);
    w.u32(r.rank);
    w.str(&r.engineer);
    w.str(&r.worker);
    w.str(&r.gpu_model);
    w.strs(&r.gpus, usize::MAX);
    w.option(r.start_ms.as_ref(), |w, v| w.u64(*v));
    w.u64(r.end_ms);
    w.u64(r.gpu_seconds.to_bits());
    w.str(&r.outcome);
    w.option(r.exit_code.as_ref(), |w, v| w.u32(*v as u32));
}

/// The bytes a worker signs: the record's fields.
pub fn worker_message(r: &UsageRecord) -> Vec<u8> {
    let mut w = Writer::new(FORMAT);
    w.bytes(WORKER_DOMAIN);
    put_record(&mut w, r);
    w.into_bytes()
}

/// A worker's signature over the record it computed for a copy that ended; sent with the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerClaim {
    /// The record as the worker sees it.
    pub record: UsageRecord,
    /// Its usage key (`ed25519:…`).
    pub key: String,
    /// Base64 Ed25519 signature of [`worker_message`].
    pub sig: String,
}

// A record's `gpu_seconds` is never NaN (it is GPUs × a duration), so equality is total.
impl Eq for WorkerClaim {}

impl WorkerClaim {
    /// `record` signed by `key`.
    pub fn sign(record: UsageRecord, key: &Signer) -> WorkerClaim {
        let sig = key.sign(&worker_message(&record));
        WorkerClaim {
            record,
            key: key.public().to_string(),
            sig,
        }
    }

    /// Whether the signature is the key's, over the record.
    pub fn valid(&self) -> bool {
        valid(&self.key, &worker_message(&self.record), &self.sig)
    }
}

/// A stored usage record with both signatures: one line of an export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedUsage {
    /// Its place in the coordinator's sequence: 1, 2, 3, … without gaps.
    pub seq: u64,
    /// Unix ms the coordinator stored it.
    pub stored_ms: u64,
    /// The relay (coordinator) that stored and countersigned it.
    pub relay: String,
    /// The record.
    pub record: UsageRecord,
    /// The worker's usage key, when the worker signed it.
    #[serde(default)]
    pub worker_key: Option<String>,
    /// The worker's signature of [`worker_message`].
    #[serde(default)]
    pub worker_sig: Option<String>,
    /// Why the worker's signature is missing (an agent that does not sign, a record that differs
    /// from the coordinator's, a key it never announced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unsigned: Option<String>,
    /// The coordinator's key (absent only on records stored before records were signed).
    #[serde(default)]
    pub coord_key: Option<String>,
    /// The coordinator's signature of [`SignedUsage::coord_message`].
    #[serde(default)]
    pub coord_sig: Option<String>,
}

impl SignedUsage {
    /// The record as the coordinator stores it: numbered, with the worker's claim (when it
    /// signed) or the reason it did not, countersigned by `key`.
    pub fn countersign(
        seq: u64,
        stored_ms: u64,
        relay: &str,
        record: UsageRecord,
        worker: Result<(String, String), String>,
        key: &Signer,
    ) -> SignedUsage {
        let (worker_key, worker_sig, unsigned) = match worker {
            Ok((k, s)) => (Some(k), Some(s), None),
            Err(why) => (None, None, Some(why)),
        };
        let mut s = SignedUsage {
            seq,
            stored_ms,
            relay: relay.to_string(),
            record,
            worker_key,
            worker_sig,
            unsigned,
            coord_key: Some(key.public().to_string()),
            coord_sig: None,
        };
        s.coord_sig = Some(key.sign(&s.coord_message()));
        s
    }

    /// A record stored before records were signed: numbered, nothing else.
    pub fn legacy(seq: u64, stored_ms: u64, record: UsageRecord) -> SignedUsage {
        SignedUsage {
            seq,
            stored_ms,
            relay: String::new(),
            record,
            worker_key: None,
            worker_sig: None,
            unsigned: Some("stored before usage records were signed".into()),
            coord_key: None,
            coord_sig: None,
        }
    }

    /// The bytes the coordinator signs: everything but its own signature.
    pub fn coord_message(&self) -> Vec<u8> {
        let mut w = Writer::new(FORMAT);
        w.bytes(COORD_DOMAIN);
        w.u64(self.seq);
        w.u64(self.stored_ms);
        w.str(&self.relay);
        put_record(&mut w, &self.record);
        w.option(self.worker_key.as_ref(), |w, v| w.str(v));
        w.option(self.worker_sig.as_ref(), |w, v| w.str(v));
        w.option(self.unsigned.as_ref(), |w, v| w.str(v));
        w.option(self.coord_key.as_ref(), |w, v| w.str(v));
        w.into_bytes()
    }
}

/// What an export covers, signed by the relay that exported it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The exporting relay.
    pub relay: String,
    /// Unix ms of the export.
    pub exported_ms: u64,
    /// Records stored at or after this (unix ms).
    pub since_ms: u64,
    /// Only this engineer's records (an engineer's own export); absent: every record.
    #[serde(default)]
    pub engineer: Option<String>,
    /// The sequence numbers in the file, as inclusive ranges in order (one range when nothing
    /// is left out).
    pub seqs: Vec<(u64, u64)>,
    /// Every usage key each worker announced.
    pub worker_keys: BTreeMap<String, Vec<String>>,
    /// The keys of the relays whose countersignatures appear.
    pub relay_keys: BTreeMap<String, Vec<String>>,
}

impl Manifest {
    fn message(&self) -> Vec<u8> {
        let mut w = Writer::new(FORMAT);
        w.bytes(MANIFEST_DOMAIN);
        w.str(&self.relay);
        w.u64(self.exported_ms);
        w.u64(self.since_ms);
        w.option(self.engineer.as_ref(), |w, v| w.str(v));
        w.list(&self.seqs, usize::MAX, |w, (a, b)| {
            w.u64(*a);
            w.u64(*b)
        });
        for m in [&self.worker_keys, &self.relay_keys] {
            let v: Vec<(&String, &Vec<String>)> = m.iter().collect();
            w.list(&v, usize::MAX, |w, (k, keys)| {
                w.str(k);
                w.strs(keys, usize::MAX);
            });
        }
        w.into_bytes()
    }

    /// The ranges of these (sorted, distinct) sequence numbers.
    pub fn ranges(seqs: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for s in seqs {
            match out.last_mut() {
                Some((_, b)) if b.checked_add(1) == Some(s) => *b = s,
                _ => out.push((s, s)),
            }
        }
        out
    }
}

/// A [`Manifest`] with the exporting relay's signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// What the export covers.
    pub manifest: Manifest,
    /// The exporting relay's usage key.
    pub key: String,
    /// Its signature.
    pub sig: String,
}

impl SignedManifest {
    /// `m` signed by `key`.
    pub fn sign(manifest: Manifest, key: &Signer) -> SignedManifest {
        let sig = key.sign(&manifest.message());
        SignedManifest {
            manifest,
            key: key.public().to_string(),
            sig,
        }
    }
}

/// `GET /v1/pool/usage/export`: the manifest, then the records in sequence order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Export {
    /// What it covers, signed.
    pub manifest: SignedManifest,
    /// The records.
    pub records: Vec<SignedUsage>,
}

/// One thing [`verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The record's sequence number (absent: the file as a whole).
    pub seq: Option<u64>,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(s) => write!(f, "record {s}: {}", self.what),
            None => write!(f, "{}", self.what),
        }
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Records read.
    pub records: usize,
    /// Records with no problem.
    pub good: usize,
    /// GPU-seconds of the good records.
    pub gpu_seconds: f64,
    /// Everything wrong, in file order.
    pub problems: Vec<Problem>,
    /// The exporting relay and its key (when the manifest was there).
    pub exported_by: Option<(String, String)>,
}

/// Checks an export: the manifest's signature (by one of `trusted` when any are given), then
/// every record's countersignature (by a key the manifest lists for its relay) and worker
/// signature (by a key the manifest lists for its worker), then that the sequence numbers are
/// exactly the manifest's. Pure.
pub fn verify(
    manifest: Option<&SignedManifest>,
    records: &[SignedUsage],
    trusted: &[String],
) -> Report {
    let mut rep = Report {
        records: records.len(),
        ..Report::default()
    };
    let empty = Manifest::default();
    let m = match manifest {
        None => {
            rep.problems.push(Problem {
                seq: None,
                what: "no manifest: cannot tell whether records were dropped or whose keys \
                       these are"
                    .into(),
            });
            &empty
        }
        Some(sm) => {
            let m = &sm.manifest;
            rep.exported_by = Some((m.relay.clone(), sm.key.clone()));
            if !valid(&sm.key, &m.message(), &sm.sig) {
                rep.problems.push(Problem {
                    seq: None,
                    what: format!(
                        "the manifest was changed: its signature by {} does not match",
                        short(&sm.key)
                    ),
                });
            }
            if !m
                .relay_keys
                .get(&m.relay)
                .is_some_and(|k| k.contains(&sm.key))
            {
                rep.problems.push(Problem {
                    seq: None,
                    what: format!(
                        "the manifest is signed by {}, which it does not list for {}",
                        short(&sm.key),
                        m.relay
                    ),
                });
            }
            if !trusted.is_empty() && !trusted.contains(&sm.key) {
                rep.problems.push(Problem {
                    seq: None,
                    what: format!(
                        "exported by {} with key {}, which is not one of the trusted keys",
                        m.relay,
                        short(&sm.key)
                    ),
                });
            }
            m
        }
    };
    let owner_of: BTreeMap<&str, &str> = m
        .worker_keys
        .iter()
        .flat_map(|(w, keys)| keys.iter().map(move |k| (k.as_str(), w.as_str())))
        .collect();
    let mut seen = BTreeSet::new();
    for r in records {
        let before = rep.problems.len();
        let mut bad = |what: String| {
            rep.problems.push(Problem {
                seq: Some(r.seq),
                what,
            })
        };
        let job = format!(
            "job {} attempt {} on {}",
            r.record.job, r.record.attempt, r.record.worker
        );
        if !seen.insert(r.seq) {
            bad(format!("{job}: its sequence number appears twice"));
        }
        if let Some(e) = &m.engineer {
            if &r.record.engineer != e {
                bad(format!(
                    "{job}: belongs to {}, but the export is {e}'s only",
                    r.record.engineer
                ));
            }
        }
        match (&r.coord_key, &r.coord_sig) {
            (Some(k), Some(s)) => {
                if !valid(k, &r.coord_message(), s) {
                    bad(format!(
                        "{job}: changed after it was stored (the countersignature of {} does not \
                         match)",
                        r.relay
                    ));
                } else if !m.relay_keys.get(&r.relay).is_some_and(|v| v.contains(k)) {
                    bad(format!(
                        "{job}: countersigned by {}, which the manifest does not list for {}",
                        short(k),
                        r.relay
                    ));
                }
            }
            _ => bad(format!("{job}: not countersigned by a coordinator")),
        }
        match (&r.worker_key, &r.worker_sig) {
            (Some(k), Some(s)) => {
                if !valid(k, &worker_message(&r.record), s) {
                    bad(format!(
                        "{job}: changed after {} signed it (its signature does not match)",
                        r.record.worker
                    ));
                }
                match owner_of.get(k.as_str()) {
                    Some(w) if *w == r.record.worker => {}
                    Some(w) => bad(format!(
                        "{job}: signed by {w}, which did not run it (key {})",
                        short(k)
                    )),
                    None => bad(format!(
                        "{job}: signed by {}, which is not a key of {}",
                        short(k),
                        r.record.worker
                    )),
                }
            }
            _ => bad(format!(
                "{job}: not signed by its worker ({})",
                r.unsigned.as_deref().unwrap_or("no reason given")
            )),
        }
        if rep.problems.len() == before {
            rep.good += 1;
            rep.gpu_seconds += r.record.gpu_seconds;
        }
    }
    if manifest.is_some() {
        let listed: BTreeSet<u64> = m
            .seqs
            .iter()
            .flat_map(|&(a, b)| a..=b.min(a.saturating_add(10_000_000)))
            .collect();
        let missing: Vec<u64> = listed.difference(&seen).copied().collect();
        for (a, b) in Manifest::ranges(missing) {
            rep.problems.push(Problem {
                seq: None,
                what: if a == b {
                    format!("record {a} was dropped (the manifest lists it)")
                } else {
                    format!("records {a} to {b} were dropped (the manifest lists them)")
                },
            });
        }
        for s in seen.difference(&listed) {
            rep.problems.push(Problem {
                seq: Some(*s),
                what: "not in the manifest (added to the file)".into(),
            });
        }
    }
    rep
}

// ---- the file formats: JSON lines and CSV ----

/// The CSV header of `weft usage export --format csv`.
pub const CSV_HEADER: &str = "seq,stored_ms,relay,job,attempt,rank,engineer,worker,gpu_model,gpus,start_ms,end_ms,gpu_seconds,outcome,exit_code,worker_key,worker_sig,unsigned,coord_key,coord_sig";
/// The comment line that carries the manifest in a CSV export (its JSON follows).
pub const CSV_MANIFEST: &str = "# manifest ";

/// An export as JSON lines: the manifest first, then one record per line.
pub fn to_jsonl(e: &Export) -> String {
    let mut s = serde_json::to_string(&e.manifest).expect("serializes");
    s.push('\n');
    for r in &e.records {
        s.push_str(&serde_json::to_string(r).expect("serializes"));
        s.push('\n');
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) || s.starts_with('#') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt<T: ToString>(v: &Option<T>) -> String {
    v.as_ref().map(|v| v.to_string()).unwrap_or_default()
}

/// An export as CSV: a header, one row per record (GPUs `;`-separated), and the manifest as a
/// last comment line ([`CSV_MANIFEST`] and its JSON).
pub fn to_csv(e: &Export) -> String {
    let mut s = String::from(CSV_HEADER);
    s.push('\n');
    for r in &e.records {
        let u = &r.record;
        let f = [
            r.seq.to_string(),
            r.stored_ms.to_string(),
            r.relay.clone(),
            u.job.to_string(),
            u.attempt.to_string(),
            u.rank.to_string(),
            u.engineer.clone(),
            u.worker.clone(),
            u.gpu_model.clone(),
            u.gpus.join(";"),
            opt(&u.start_ms),
            u.end_ms.to_string(),
            format!("{:?}", u.gpu_seconds),
            u.outcome.clone(),
            opt(&u.exit_code),
            opt(&r.worker_key),
            opt(&r.worker_sig),
            opt(&r.unsigned),
            opt(&r.coord_key),
            opt(&r.coord_sig),
        ];
        let row: Vec<String> = f.iter().map(|x| csv_field(x)).collect();
        s.push_str(&row.join(","));
        s.push('\n');
    }
    s.push_str(CSV_MANIFEST);
    s.push_str(&serde_json::to_string(&e.manifest).expect("serializes"));
    s.push('\n');
    s
}

/// A file that is not an export.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct ParseError {
    /// 1-based line.
    pub line: usize,
    /// What is wrong there.
    pub what: String,
}

/// The manifest (when there is one) and the records of an export file, JSON lines or CSV
/// (told apart by the first line).
pub fn parse_export(text: &str) -> Result<(Option<SignedManifest>, Vec<SignedUsage>), ParseError> {
    if text.starts_with(CSV_HEADER) {
        parse_csv(text)
    } else {
        parse_jsonl(text)
    }
}

fn parse_jsonl(text: &str) -> Result<(Option<SignedManifest>, Vec<SignedUsage>), ParseError> {
    let mut manifest = None;
    let mut records = Vec::new();
    for (i, l) in text.lines().enumerate() {
        let line = i + 1;
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(l).map_err(|e| ParseError {
            line,
            what: format!("not JSON: {e}"),
        })?;
        if v.get("manifest").is_some() {
            if manifest.is_some() {
                return Err(ParseError {
                    line,
                    what: "a second manifest".into(),
                });
            }
            manifest = Some(serde_json::from_value(v).map_err(|e| ParseError {
                line,
                what: format!("malformed manifest: {e}"),
            })?);
        } else {
            records.push(serde_json::from_value(v).map_err(|e| ParseError {
                line,
                what: format!("malformed usage record: {e}"),
            })?);
        }
    }
    Ok((manifest, records))
}

/// One CSV row's fields (RFC 4180 quoting; the row is one line: fields hold no newline here).
fn csv_row(l: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = l.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (false, '"') if at_start => {
                quoted = true;
                at_start = false;
            }
            (true, '"') => {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    cur.push('"');
                } else {
                    quoted = false;
                }
            }
            (false, ',') => {
                out.push(std::mem::take(&mut cur));
                at_start = true;
            }
            (_, c) => {
                cur.push(c);
                at_start = false;
            }
        }
    }
    if quoted {
        return Err("a quoted field is not closed".into());
    }
    out.push(cur);
    Ok(out)
}

fn parse_csv(text: &str) -> Result<(Option<SignedManifest>, Vec<SignedUsage>), ParseError> {
    let mut manifest = None;
    let mut records = Vec::new();
    let cols = CSV_HEADER.split(',').count();
    for (i, l) in text.lines().enumerate().skip(1) {
        let line = i + 1;
        let err = |what: String| ParseError { line, what };
        if let Some(j) = l.strip_prefix(CSV_MANIFEST) {
            if manifest.is_some() {
                return Err(err("a second manifest".into()));
            }
            manifest =
                Some(serde_json::from_str(j).map_err(|e| err(format!("malformed manifest: {e}")))?);
            continue;
        }
        if l.trim().is_empty() {
            continue;
        }
        let f = csv_row(l).map_err(err)?;
        if f.len() != cols {
            return Err(err(format!("{} fields, the header has {cols}", f.len())));
        }
        let num = |k: usize| -> Result<u64, ParseError> {
            f[k].parse()
                .map_err(|_| err(format!("{}: not a number: {:?}", col(k), f[k])))
        };
        let onum = |k: usize| -> Result<Option<u64>, ParseError> {
            if f[k].is_empty() {
                Ok(None)
            } else {
                num(k).map(Some)
            }
        };
        let ostr = |k: usize| (!f[k].is_empty()).then(|| f[k].clone());
        let small = |k: usize| -> Result<u32, ParseError> {
            u32::try_from(num(k)?).map_err(|_| err(format!("{}: too large", col(k))))
        };
        let exit_code = if f[14].is_empty() {
            None
        } else {
            Some(
                f[14]
                    .parse::<i32>()
                    .map_err(|_| err(format!("exit_code: not a number: {:?}", f[14])))?,
            )
        };
        records.push(SignedUsage {
            seq: num(0)?,
            stored_ms: num(1)?,
            relay: f[2].clone(),
            record: UsageRecord {
                job: num(3)?,
                attempt: small(4)?,
                rank: small(5)?,
                engineer: f[6].clone(),
                worker: f[7].clone(),
                gpu_model: f[8].clone(),
                gpus: if f[9].is_empty() {
                    Vec::new()
                } else {
                    f[9].split(';').map(str::to_string).collect()
                },
                start_ms: onum(10)?,
                end_ms: num(11)?,
                gpu_seconds: f[12]
                    .parse()
                    .map_err(|_| err(format!("gpu_seconds: not a number: {:?}", f[12])))?,
                outcome: f[13].clone(),
                exit_code,
            },
            worker_key: ostr(15),
            worker_sig: ostr(16),
            unsigned: ostr(17),
            coord_key: ostr(18),
            coord_sig: ostr(19),
        });
    }
    Ok((manifest, records))
}

fn col(k: usize) -> &'static str {
    CSV_HEADER.split(',').nth(k).unwrap_or("?")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> Signer {
        Signer::from_seed(&[n; 32])
    }

    fn rec(job: u64, worker: &str) -> UsageRecord {
        UsageRecord {
            job,
            attempt: 1,
            rank: 0,
            engineer: "alice".into(),
            worker: worker.into(),
            gpu_model: "NVIDIA H100 80GB HBM3".into(),
            gpus: vec!["GPU-1".into(), "GPU-2".into()],
            start_ms: Some(1_000),
            end_ms: 4_500,
            gpu_seconds: 7.0,
            outcome: "succeeded".into(),
            exit_code: Some(0),
        }
    }

    /// Three records (gpu1, gpu2, gpu1) signed by their workers, countersigned by relay-a.
    fn export() -> Export {
        let coord = key(9);
        let records: Vec<SignedUsage> = [(1, "gpu1", 1u8), (2, "gpu2", 2), (3, "gpu1", 1)]
            .into_iter()
            .map(|(seq, w, k)| {
                let c = WorkerClaim::sign(rec(seq * 10, w), &key(k));
                SignedUsage::countersign(
                    seq,
                    5_000 + seq,
                    "relay-a",
                    c.record,
                    Ok((c.key, c.sig)),
                    &coord,
                )
            })
            .collect();
        let manifest = Manifest {
            relay: "relay-a".into(),
            exported_ms: 9_000,
            since_ms: 0,
            engineer: None,
            seqs: Manifest::ranges(records.iter().map(|r| r.seq)),
            worker_keys: BTreeMap::from([
                ("gpu1".into(), vec![key(1).public().to_string()]),
                ("gpu2".into(), vec![key(2).public().to_string()]),
            ]),
            relay_keys: BTreeMap::from([("relay-a".into(), vec![coord.public().to_string()])]),
        };
        Export {
            manifest: SignedManifest::sign(manifest, &coord),
            records,
        }
    }

    fn check(e: &Export) -> Report {
        verify(Some(&e.manifest), &e.records, &[])
    }

    #[test]
    fn an_untouched_export_verifies_in_both_formats() {
        let e = export();
        let r = check(&e);
        assert_eq!(r.problems, vec![]);
        assert_eq!((r.records, r.good, r.gpu_seconds), (3, 3, 21.0));
        for text in [to_jsonl(&e), to_csv(&e)] {
            let (m, recs) = parse_export(&text).expect("parses");
            assert_eq!(m.as_ref(), Some(&e.manifest));
            assert_eq!(recs, e.records);
        }
        let trusted = vec![key(9).public().to_string()];
        assert_eq!(
            verify(Some(&e.manifest), &e.records, &trusted).problems,
            vec![]
        );
        let other = vec![key(8).public().to_string()];
        assert_eq!(
            verify(Some(&e.manifest), &e.records, &other).problems.len(),
            1
        );
    }

    #[test]
    fn a_changed_field_is_caught_by_both_signatures() {
        let mut e = export();
        e.records[1].record.gpu_seconds = 70.0;
        let r = check(&e);
        assert_eq!(r.good, 2);
        let what: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            what[0].starts_with("record 2: job 20 attempt 1 on gpu2: changed after it was stored"),
            "{what:?}"
        );
        assert!(what[1].contains("changed after gpu2 signed it"), "{what:?}");
    }

    #[test]
    fn dropped_records_are_named_by_their_sequence_numbers() {
        let mut e = export();
        e.records.remove(1);
        let r = check(&e);
        assert_eq!(r.problems.len(), 1);
        assert_eq!(
            r.problems[0].to_string(),
            "record 2 was dropped (the manifest lists it)"
        );
        // the tail too
        let mut e = export();
        e.records.pop();
        assert_eq!(
            check(&e).problems[0].to_string(),
            "record 3 was dropped (the manifest lists it)"
        );
        // and a manifest edited to hide it is caught
        e.manifest.manifest.seqs = vec![(1, 2)];
        assert!(check(&e).problems[0]
            .to_string()
            .starts_with("the manifest was changed"));
    }

    #[test]
    fn a_record_signed_by_another_worker_is_named() {
        let mut e = export();
        // gpu2 signs a record that says gpu1 ran it; even a coordinator that countersigns it
        // (with its real key) does not make it gpu1's.
        let c = WorkerClaim::sign(rec(20, "gpu1"), &key(2));
        e.records[1] =
            SignedUsage::countersign(2, 5_002, "relay-a", c.record, Ok((c.key, c.sig)), &key(9));
        let r = check(&e);
        assert_eq!(r.problems.len(), 1, "{:?}", r.problems);
        assert!(
            r.problems[0]
                .what
                .contains("signed by gpu2, which did not run it"),
            "{:?}",
            r.problems
        );
        // a key nobody announced
        let c = WorkerClaim::sign(rec(20, "gpu2"), &key(7));
        e.records[1] =
            SignedUsage::countersign(2, 5_002, "relay-a", c.record, Ok((c.key, c.sig)), &key(9));
        assert!(check(&e).problems[0]
            .what
            .contains("which is not a key of gpu2"));
    }

    #[test]
    fn unsigned_and_uncountersigned_records_and_a_missing_manifest_are_problems() {
        let e = export();
        let mut recs = e.records.clone();
        recs[0] = SignedUsage::countersign(
            1,
            5_001,
            "relay-a",
            rec(10, "gpu1"),
            Err("the agent does not sign".into()),
            &key(9),
        );
        recs[2] = SignedUsage::legacy(3, 5_003, rec(30, "gpu1"));
        let r = verify(Some(&e.manifest), &recs, &[]);
        let what: Vec<String> = r.problems.iter().map(|p| p.to_string()).collect();
        assert!(
            what[0].contains("not signed by its worker (the agent does not sign)"),
            "{what:?}"
        );
        assert!(what[1].contains("not countersigned"), "{what:?}");
        assert_eq!(r.good, 1);
        assert!(verify(None, &e.records, &[]).problems[0]
            .what
            .starts_with("no manifest"));
    }

    #[test]
    fn malformed_files_name_the_line() {
        let e = export();
        let text = to_jsonl(&e);
        let bad = text.replacen("\"seq\":2", "\"seq\":\"two\"", 1);
        assert_eq!(parse_export(&bad).expect_err("must fail").line, 3);
        let csv = to_csv(&e);
        let mut lines: Vec<&str> = csv.lines().collect();
        lines[2] = "2,x";
        let err = parse_export(&lines.join("\n")).expect_err("must fail");
        assert_eq!(err.line, 3);
        assert!(err.what.contains("2 fields"), "{err}");
    }

    fn arb_record() -> impl Strategy<Value = UsageRecord> {
        (
            any::<u64>(),
            any::<u32>(),
            "[ -~]{0,10}",
            "[a-z0-9,\"#;-]{0,10}",
            proptest::collection::vec("[A-Za-z0-9-]{1,8}", 0..3),
            proptest::option::of(any::<u64>()),
            any::<f64>().prop_filter("finite", |f| f.is_finite()),
            proptest::option::of(any::<i32>()),
        )
            .prop_map(
                |(job, attempt, engineer, model, gpus, start_ms, gpu_seconds, exit_code)| {
                    UsageRecord {
                        job,
                        attempt,
                        rank: attempt / 2,
                        engineer,
                        worker: "w".into(),
                        gpu_model: model,
                        gpus,
                        start_ms,
                        end_ms: job / 3,
                        gpu_seconds,
                        outcome: "failed".into(),
                        exit_code,
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn records_survive_both_formats_and_still_verify(recs in proptest::collection::vec(arb_record(), 0..5)) {
            let coord = key(9);
            let w = key(1);
            let records: Vec<SignedUsage> = recs.into_iter().enumerate().map(|(i, r)| {
                let c = WorkerClaim::sign(r, &w);
                SignedUsage::countersign(i as u64 + 1, 7, "r", c.record, Ok((c.key, c.sig)), &coord)
            }).collect();
            let m = Manifest {
                relay: "r".into(),
                seqs: Manifest::ranges(records.iter().map(|r| r.seq)),
                worker_keys: BTreeMap::from([("w".into(), vec![w.public().to_string()])]),
                relay_keys: BTreeMap::from([("r".into(), vec![coord.public().to_string()])]),
                ..Manifest::default()
            };
            let e = Export { manifest: SignedManifest::sign(m, &coord), records };
            for text in [to_jsonl(&e), to_csv(&e)] {
                let (m, recs) = parse_export(&text).expect("parses");
                prop_assert_eq!(&recs, &e.records);
                prop_assert_eq!(verify(m.as_ref(), &recs, &[]).problems, vec![]);
            }
        }

        #[test]
        fn any_change_of_a_field_changes_the_signed_bytes(a in arb_record(), b in arb_record()) {
            if a != b {
                prop_assert_ne!(worker_message(&a), worker_message(&b));
            }
        }
    }
}
