//! The `--gpu SPEC` grammar (dstack's), the [`GpuSpec`] it parses to, and
//! the pure rule that decides whether one worker's GPUs satisfy it.
//!
//! # Grammar
//!
//! A spec is one to four tokens separated by `:`, in any order, each of a
//! different kind (dstack's `GPUSpec.parse`, `resources.py`):
//!
//! | kind | form | examples |
//! |---|---|---|
//! | vendor | `nvidia`, `amd`, `intel`, `tpu`/`google`, `tenstorrent` | `nvidia` |
//! | names | starts with a letter; `,` separates alternatives (any of them) | `A100`, `H100,A100`, `RTX4090`, `A100-80GB` |
//! | memory | a size or a range of sizes, per GPU, each with a unit | `24GB`, `24GB..80GB`, `40GB..`, `..24GB`, `512MB..`, `1.5TB` |
//! | count | a whole number or a range of them | `2`, `1..4`, `2..`, `..4` |
//!
//! So `A100:2`, `80GB..:2`, `24GB..:1..4`, `H100,A100:40GB..:8`, `2` (any two
//! GPUs) are specs. A token is classified as dstack does: a vendor name
//! first, then a token starting with a letter is names, then a token holding
//! any letter is memory, else count.
//!
//! # Choices (where dstack's documentation says nothing, or we differ)
//!
//! - **Units** are case-insensitive `MB`, `GB`, `TB`, binary as in dstack
//!   (`1GB` = 1024 MB, `1TB` = 1024 GB; NVML reports MiB, so `1MB` = 1 MiB).
//!   A memory bound must carry its unit (dstack takes a bare number as GB);
//!   `24..80GB` is an error that says so. Decimals are allowed (`1.5TB`),
//!   stored as whole MiB (rounded to nearest).
//! - A **single size** (`24GB`) is an exact size, as in dstack (`min = max`);
//!   use `24GB..` for "at least".
//! - **GPU memory is compared in whole GiB**: a GPU's MiB are rounded to the
//!   nearest GiB before comparing with the bounds, because NVML reports
//!   usable memory (an 80 GB H100 reports 81559 MiB, a 24 GB RTX 4090
//!   reports 24564 MiB); so `80GB` and `80GB..` match an H100.
//! - **Count**: an omitted lower bound is 1 (`..4` = `1..4`); 0 is refused
//!   (a pool job takes at least one GPU). When the count is omitted the
//!   caller's `--gpus N` applies (see [`GpuSpec::count_or`]). The scheduler
//!   gives a job the *lower* bound of its count; the upper bound is kept and
//!   printed.
//! - **Model names** match an NVML name by tokens, case-insensitively: the
//!   NVML name is split into alphanumeric runs (`NVIDIA GeForce RTX 4090` →
//!   `nvidia geforce rtx 4090`); the spec name is split at `-`, `_`, `.` into
//!   parts, and each part must equal one or more *consecutive* NVML tokens
//!   joined, the parts in order. So `A100` matches `NVIDIA A100-SXM4-80GB`,
//!   `RTX4090` matches `NVIDIA GeForce RTX 4090`, `A100-80GB` matches
//!   `NVIDIA A100-SXM4-80GB`, but `A10` does not match an A100 and `L40`
//!   does not match an `L40S`.
//! - **Vendor**: NVML sees only NVIDIA GPUs, so `nvidia` matches every GPU a
//!   worker reports and any other vendor matches none.
//! - Blanks around tokens and around `..` are ignored (dstack removes all
//!   spaces); columns in errors count characters of the text as given, from 1.
//! - [`Display`](std::fmt::Display) writes the canonical form (vendor, names,
//!   memory, count; memory in the largest unit that divides it exactly), and
//!   parsing that text gives the same spec back.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

/// MiB per unit, by unit name (lower case).
const UNITS: [(&str, u64); 3] = [("mb", 1), ("gb", 1024), ("tb", 1024 * 1024)];

/// The largest memory bound accepted, in MiB (1024 TB): keeps arithmetic
/// on bounds far from overflow.
const MAX_MIB: u64 = 1 << 30;

/// The largest count accepted.
const MAX_COUNT: u32 = 1024;

/// A GPU vendor token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Vendor {
    /// `nvidia`.
    Nvidia,
    /// `amd`.
    Amd,
    /// `intel`.
    Intel,
    /// `tpu` or `google`.
    Google,
    /// `tenstorrent`.
    Tenstorrent,
}

impl Vendor {
    fn from_token(s: &str) -> Option<Vendor> {
        Some(match s.to_ascii_lowercase().as_str() {
            "nvidia" => Vendor::Nvidia,
            "amd" => Vendor::Amd,
            "intel" => Vendor::Intel,
            "tpu" | "google" => Vendor::Google,
            "tenstorrent" => Vendor::Tenstorrent,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Vendor::Nvidia => "nvidia",
            Vendor::Amd => "amd",
            Vendor::Intel => "intel",
            Vendor::Google => "tpu",
            Vendor::Tenstorrent => "tenstorrent",
        }
    }
}

/// A per-GPU memory range in MiB; at least one bound is set, `min <= max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MemRange {
    /// The least memory, in MiB, inclusive.
    pub min: Option<u64>,
    /// The most memory, in MiB, inclusive.
    pub max: Option<u64>,
}

impl MemRange {
    /// Whether a GPU with `mib` of memory (as NVML reports it) is in range;
    /// the GPU's memory is first rounded to the nearest GiB (see the module doc).
    pub fn contains(&self, mib: u64) -> bool {
        let m = nominal_mib(mib);
        self.min.is_none_or(|lo| m >= lo) && self.max.is_none_or(|hi| m <= hi)
    }
}

/// A GPU's memory rounded to the nearest whole GiB, in MiB.
pub fn nominal_mib(mib: u64) -> u64 {
    mib.saturating_add(512) / 1024 * 1024
}

/// A GPU count range; `1 <= min`, `max` unbounded when `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CountRange {
    /// The least number of GPUs (what the scheduler gives).
    pub min: u32,
    /// The most, inclusive.
    pub max: Option<u32>,
}

/// A parsed `--gpu` spec. Every part is optional; the empty spec (any GPU)
/// is [`GpuSpec::default`] and is what a job without `--gpu` asks for, but
/// it has no text form (`""` does not parse).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct GpuSpec {
    /// The vendor, if given.
    pub vendor: Option<Vendor>,
    /// Model names, any of which will do; empty = any model. Kept as written.
    pub names: Vec<String>,
    /// Per-GPU memory.
    pub memory: Option<MemRange>,
    /// How many GPUs per node.
    pub count: Option<CountRange>,
}

/// A spec that does not follow the grammar: what, and where (1-based column).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GpuSpecError {
    /// Nothing given.
    #[error("--gpu {spec:?}: empty spec; e.g. A100, A100:2, 24GB..80GB or H100,A100:8")]
    Empty {
        /// The text as given.
        spec: String,
    },
    /// Two `:` in a row, or one at either end.
    #[error("--gpu {spec}: empty part at column {column}; parts are separated by single ':'")]
    EmptyToken {
        /// The text as given.
        spec: String,
        /// Where.
        column: usize,
    },
    /// Two tokens of the same kind.
    #[error("--gpu {spec}: second {kind} at column {column} (the first is at column {first}); give each of vendor, names, memory and count once")]
    Duplicate {
        /// The text as given.
        spec: String,
        /// `vendor`, `names`, `memory` or `count`.
        kind: &'static str,
        /// The second one.
        column: usize,
        /// The first one.
        first: usize,
    },
    /// A name list with an empty entry (`A100,,H100`).
    #[error("--gpu {spec}: empty model name at column {column}")]
    EmptyName {
        /// The text as given.
        spec: String,
        /// Where.
        column: usize,
    },
    /// A character that has no place there.
    #[error("--gpu {spec}: unexpected {found:?} at column {column}; {expected}")]
    Unexpected {
        /// The text as given.
        spec: String,
        /// The character.
        found: char,
        /// Where.
        column: usize,
        /// What would have been valid.
        expected: &'static str,
    },
    /// A memory size with a unit that is not MB, GB or TB.
    #[error("--gpu {spec}: unknown unit {unit:?} at column {column}; use MB, GB or TB")]
    UnknownUnit {
        /// The text as given.
        spec: String,
        /// The unit as written.
        unit: String,
        /// Where the unit starts.
        column: usize,
    },
    /// A memory bound without a unit.
    #[error("--gpu {spec}: memory {number:?} at column {column} has no unit; use MB, GB or TB (e.g. 24GB)")]
    MissingUnit {
        /// The text as given.
        spec: String,
        /// The number as written.
        number: String,
        /// Where.
        column: usize,
    },
    /// Where a number was expected there is none.
    #[error("--gpu {spec}: expected a number at column {column}")]
    ExpectedNumber {
        /// The text as given.
        spec: String,
        /// Where.
        column: usize,
    },
    /// `..` with neither bound.
    #[error("--gpu {spec}: range at column {column} has no bounds; e.g. 24GB.., ..80GB or 1..4")]
    EmptyRange {
        /// The text as given.
        spec: String,
        /// Where.
        column: usize,
    },
    /// A range whose lower bound is above its upper bound.
    #[error("--gpu {spec}: range at column {column} is empty: {low} is more than {high}")]
    Reversed {
        /// The text as given.
        spec: String,
        /// Where.
        column: usize,
        /// The lower bound as written.
        low: String,
        /// The upper bound as written.
        high: String,
    },
    /// A count of 0.
    #[error("--gpu {spec}: count 0 at column {column}; a job takes at least 1 GPU")]
    ZeroCount {
        /// The text as given.
        spec: String,
        /// Where.
        column: usize,
    },
    /// A number beyond what is accepted.
    #[error("--gpu {spec}: {what} at column {column} is too large (at most {limit})")]
    TooLarge {
        /// The text as given.
        spec: String,
        /// `memory` or `count`.
        what: &'static str,
        /// Where.
        column: usize,
        /// The limit, as text.
        limit: &'static str,
    },
}

/// A slice of the input and the 1-based column of its first character.
#[derive(Clone, Copy)]
struct Span<'a> {
    text: &'a str,
    column: usize,
}

impl<'a> Span<'a> {
    /// Blanks trimmed from both ends, column kept right.
    fn trim(self) -> Span<'a> {
        let lead = self.text.len() - self.text.trim_start().len();
        let skipped = self.text[..lead].chars().count();
        Span {
            text: self.text.trim(),
            column: self.column + skipped,
        }
    }

    /// Every piece between `pat`s, in order, trimmed, each keeping its
    /// column; an empty piece is the error `empty(column)`.
    fn pieces<E>(self, pat: &str, empty: impl Fn(usize) -> E) -> Result<Vec<Span<'a>>, E> {
        let mut out = Vec::new();
        let mut rest = self;
        loop {
            let (piece, next) = match rest.split_once(pat) {
                Some((p, n)) => (p, Some(n)),
                None => (rest, None),
            };
            let piece = piece.trim();
            if piece.text.is_empty() {
                return Err(empty(piece.column));
            }
            out.push(piece);
            match next {
                Some(n) => rest = n,
                None => return Ok(out),
            }
        }
    }

    /// Split at the first `pat`; the parts keep their columns.
    fn split_once(self, pat: &str) -> Option<(Span<'a>, Span<'a>)> {
        let at = self.text.find(pat)?;
        let before = &self.text[..at];
        let after = &self.text[at + pat.len()..];
        Some((
            Span {
                text: before,
                column: self.column,
            },
            Span {
                text: after,
                column: self.column + before.chars().count() + pat.chars().count(),
            },
        ))
    }

    /// The column of the character at byte offset `at`.
    fn column_at(&self, at: usize) -> usize {
        self.column + self.text[..at].chars().count()
    }
}

struct Parser<'a> {
    spec: &'a str,
}

impl Parser<'_> {
    fn spec(&self) -> String {
        self.spec.to_string()
    }

    fn parse(&self) -> Result<GpuSpec, GpuSpecError> {
        if self.spec.trim().is_empty() {
            return Err(GpuSpecError::Empty { spec: self.spec() });
        }
        let mut out = GpuSpec::default();
        // Column of the first token of each kind: vendor, names, memory, count.
        let mut seen: [Option<usize>; 4] = [None; 4];
        let whole = Span {
            text: self.spec,
            column: 1,
        };
        let tokens = whole.pieces(":", |column| GpuSpecError::EmptyToken {
            spec: self.spec(),
            column,
        })?;
        for token in tokens {
            let kind = classify(token.text);
            if let Some(first) = seen[kind] {
                return Err(GpuSpecError::Duplicate {
                    spec: self.spec(),
                    kind: KINDS[kind],
                    column: token.column,
                    first,
                });
            }
            seen[kind] = Some(token.column);
            match kind {
                0 => out.vendor = Vendor::from_token(token.text),
                1 => out.names = self.names(token)?,
                2 => out.memory = Some(self.memory(token)?),
                _ => out.count = Some(self.count(token)?),
            }
        }
        Ok(out)
    }

    fn names(&self, token: Span<'_>) -> Result<Vec<String>, GpuSpecError> {
        let mut names = Vec::new();
        let pieces = token.pieces(",", |column| GpuSpecError::EmptyName {
            spec: self.spec(),
            column,
        })?;
        for name in pieces {
            if let Some((at, c)) = name
                .text
                .char_indices()
                .find(|&(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
            {
                return Err(GpuSpecError::Unexpected {
                    spec: self.spec(),
                    found: c,
                    column: name.column_at(at),
                    expected: "a model name holds letters, digits, '-', '_' and '.'",
                });
            }
            names.push(name.text.to_string());
        }
        Ok(names)
    }

    /// A range's two bounds (`LO..HI`, either may be missing but not both),
    /// trimmed; `None` for a single value.
    fn bounds<'s>(&self, token: Span<'s>) -> Result<Option<(Span<'s>, Span<'s>)>, GpuSpecError> {
        let Some((a, b)) = token.split_once("..") else {
            return Ok(None);
        };
        let (a, b) = (a.trim(), b.trim());
        if a.text.is_empty() && b.text.is_empty() {
            return Err(GpuSpecError::EmptyRange {
                spec: self.spec(),
                column: token.column,
            });
        }
        Ok(Some((a, b)))
    }

    fn memory(&self, token: Span<'_>) -> Result<MemRange, GpuSpecError> {
        let (lo, hi) = match self.bounds(token)? {
            Some((a, b)) => (
                self.opt(a, |s| self.size(s))?,
                self.opt(b, |s| self.size(s))?,
            ),
            None => {
                let v = self.size(token)?;
                (Some(v), Some(v))
            }
        };
        if let (Some(l), Some(h)) = (lo, hi) {
            if l > h {
                return Err(self.reversed(token));
            }
        }
        Ok(MemRange { min: lo, max: hi })
    }

    fn count(&self, token: Span<'_>) -> Result<CountRange, GpuSpecError> {
        let (lo, hi, lo_span) = match self.bounds(token)? {
            Some((a, b)) => {
                let lo = self.opt(a, |s| self.whole(s))?;
                let hi = self.opt(b, |s| self.whole(s))?;
                if hi == Some(0) {
                    return Err(GpuSpecError::ZeroCount {
                        spec: self.spec(),
                        column: b.column,
                    });
                }
                (lo, hi, a)
            }
            None => {
                let v = self.whole(token)?;
                (Some(v), Some(v), token)
            }
        };
        if lo == Some(0) {
            return Err(GpuSpecError::ZeroCount {
                spec: self.spec(),
                column: lo_span.column,
            });
        }
        let min = lo.unwrap_or(1);
        if hi.is_some_and(|h| min > h) {
            return Err(self.reversed(token));
        }
        Ok(CountRange { min, max: hi })
    }

    fn reversed(&self, token: Span<'_>) -> GpuSpecError {
        let (a, b) = token
            .split_once("..")
            .map_or((token.text, ""), |(a, b)| (a.trim().text, b.trim().text));
        GpuSpecError::Reversed {
            spec: self.spec(),
            column: token.column,
            low: a.to_string(),
            high: b.to_string(),
        }
    }

    fn opt<T>(
        &self,
        s: Span<'_>,
        f: impl FnOnce(Span<'_>) -> Result<T, GpuSpecError>,
    ) -> Result<Option<T>, GpuSpecError> {
        if s.text.is_empty() {
            Ok(None)
        } else {
            f(s).map(Some)
        }
    }

    /// The digits (and one optional `.fraction`) at the start of `s`.
    fn number_end(s: &str) -> usize {
        let mut dot = false;
        for (i, c) in s.char_indices() {
            if c.is_ascii_digit() {
                continue;
            }
            if c == '.' && !dot && !s[i..].starts_with("..") {
                dot = true;
                continue;
            }
            return i;
        }
        s.len()
    }

    /// A whole number (a count).
    fn whole(&self, s: Span<'_>) -> Result<u32, GpuSpecError> {
        let s = s.trim();
        let end = s
            .text
            .char_indices()
            .find(|(_, c)| !c.is_ascii_digit())
            .map_or(s.text.len(), |(i, _)| i);
        if end == 0 {
            return Err(self.expected_number(s, 0));
        }
        if let Some(c) = s.text[end..].chars().next() {
            return Err(GpuSpecError::Unexpected {
                spec: self.spec(),
                found: c,
                column: s.column_at(end),
                expected: "a count is a whole number or a range like 1..4",
            });
        }
        match s.text.parse::<u32>() {
            Ok(v) if v <= MAX_COUNT => Ok(v),
            _ => Err(GpuSpecError::TooLarge {
                spec: self.spec(),
                what: "count",
                column: s.column,
                limit: "1024",
            }),
        }
    }

    fn expected_number(&self, s: Span<'_>, at: usize) -> GpuSpecError {
        match s.text[at..].chars().next() {
            Some(c) if !c.is_ascii_digit() => GpuSpecError::Unexpected {
                spec: self.spec(),
                found: c,
                column: s.column_at(at),
                expected: "expected a number",
            },
            _ => GpuSpecError::ExpectedNumber {
                spec: self.spec(),
                column: s.column_at(at),
            },
        }
    }

    /// A size with its unit, in MiB.
    fn size(&self, s: Span<'_>) -> Result<u64, GpuSpecError> {
        let s = s.trim();
        let end = Self::number_end(s.text);
        let number = &s.text[..end];
        if number.is_empty() || number == "." {
            return Err(self.expected_number(s, 0));
        }
        let unit_start = end + (s.text[end..].len() - s.text[end..].trim_start().len());
        let unit = &s.text[unit_start..];
        if unit.is_empty() {
            return Err(GpuSpecError::MissingUnit {
                spec: self.spec(),
                number: number.to_string(),
                column: s.column,
            });
        }
        let Some(&(_, per)) = UNITS
            .iter()
            .find(|(name, _)| unit.eq_ignore_ascii_case(name))
        else {
            return Err(GpuSpecError::UnknownUnit {
                spec: self.spec(),
                unit: unit.to_string(),
                column: s.column_at(unit_start),
            });
        };
        let too_large = || GpuSpecError::TooLarge {
            spec: self.spec(),
            what: "memory",
            column: s.column,
            limit: "1024TB",
        };
        let (int, frac) = number.split_once('.').unwrap_or((number, ""));
        // Whole part, then the fraction digit by digit, in MiB × 10^k.
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| too_large())?
        };
        let mut total = u128::from(int) * u128::from(per);
        if total > u128::from(MAX_MIB) {
            return Err(too_large());
        }
        let digits = frac.len().min(18);
        if digits > 0 {
            let scale = 10u128.pow(digits as u32);
            let f: u128 = frac[..digits].parse().map_err(|_| too_large())?;
            total += (f * u128::from(per) + scale / 2) / scale;
        }
        if total > u128::from(MAX_MIB) {
            return Err(too_large());
        }
        Ok(total as u64)
    }
}

const KINDS: [&str; 4] = ["vendor", "names", "memory", "count"];

/// dstack's order: vendor, then names (starts with a letter), then memory
/// (holds a letter), else count.
fn classify(token: &str) -> usize {
    if Vendor::from_token(token).is_some() {
        0
    } else if token.starts_with(|c: char| c.is_alphabetic()) {
        1
    } else if token.chars().any(char::is_alphabetic) {
        2
    } else {
        3
    }
}

impl FromStr for GpuSpec {
    type Err = GpuSpecError;

    fn from_str(s: &str) -> Result<GpuSpec, GpuSpecError> {
        Parser { spec: s }.parse()
    }
}

/// A size in the largest unit that divides it.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v != 0 && v % (1024 * 1024) == 0 {
            write!(f, "{}TB", v / (1024 * 1024))
        } else if v % 1024 == 0 {
            write!(f, "{}GB", v / 1024)
        } else {
            write!(f, "{v}MB")
        }
    }
}

impl fmt::Display for MemRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.min, self.max) {
            (Some(a), Some(b)) if a == b => write!(f, "{}", Size(a)),
            (a, b) => {
                if let Some(a) = a {
                    write!(f, "{}", Size(a))?;
                }
                f.write_str("..")?;
                if let Some(b) = b {
                    write!(f, "{}", Size(b))?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for CountRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.max {
            Some(m) if m == self.min => write!(f, "{m}"),
            Some(m) => write!(f, "{}..{m}", self.min),
            None => write!(f, "{}..", self.min),
        }
    }
}

impl fmt::Display for GpuSpec {
    /// The canonical text; the empty spec (any GPU) prints as `any`, which
    /// is a model name and so does not parse back to it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Vec::with_capacity(4);
        if let Some(v) = self.vendor {
            parts.push(v.as_str().to_string());
        }
        if !self.names.is_empty() {
            parts.push(self.names.join(","));
        }
        if let Some(m) = self.memory {
            parts.push(m.to_string());
        }
        if let Some(c) = self.count {
            parts.push(c.to_string());
        }
        if parts.is_empty() {
            return f.write_str("any");
        }
        f.write_str(&parts.join(":"))
    }
}

/// Whether `name` (a spec name) matches the NVML model name `model` (see the
/// module doc: parts of the spec name each equal a run of consecutive
/// alphanumeric tokens of the model, in order, case-insensitively).
pub fn model_matches(name: &str, model: &str) -> bool {
    let tokens: Vec<String> = model
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let mut from = 0;
    for part in name
        .split(['-', '_', '.'])
        .filter(|p| !p.is_empty())
        .map(str::to_ascii_lowercase)
    {
        let mut found = None;
        'start: for start in from..tokens.len() {
            let mut rest = part.as_str();
            for (i, t) in tokens[start..].iter().enumerate() {
                match rest.strip_prefix(t.as_str()) {
                    Some("") => {
                        found = Some(start + i + 1);
                        break 'start;
                    }
                    Some(r) => rest = r,
                    None => continue 'start,
                }
            }
        }
        match found {
            Some(next) => from = next,
            None => return false,
        }
    }
    true
}

/// One GPU as the matching rule sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuView<'a> {
    /// The model name as NVML reports it (`NVIDIA A100-SXM4-80GB`).
    pub model: &'a str,
    /// Total memory in MiB as NVML reports it.
    pub memory_mib: u64,
    /// Healthy (no XID, no ECC errors the agent acts on).
    pub healthy: bool,
    /// Not in use by any job.
    pub free: bool,
}

impl GpuSpec {
    /// The per-node GPU count: the spec's lower bound, else `gpus` (the
    /// `--gpus N` flag, 1 when neither is given).
    pub fn count_or(&self, gpus: u32) -> u32 {
        self.count.map_or(gpus.max(1), |c| c.min)
    }

    /// Whether one GPU is of a kind the spec asks for (model, vendor,
    /// memory), ignoring health and use.
    pub fn matches_gpu(&self, model: &str, memory_mib: u64) -> bool {
        if self.vendor.is_some_and(|v| v != Vendor::Nvidia) {
            return false;
        }
        if !self.names.is_empty() && !self.names.iter().any(|n| model_matches(n, model)) {
            return false;
        }
        self.memory.is_none_or(|m| m.contains(memory_mib))
    }

    /// Which of one worker's GPUs to give a job of this spec that needs
    /// `count` GPUs (see [`GpuSpec::count_or`]): indexes into `gpus`, or
    /// `None` when too few matching GPUs are free and healthy. Among the
    /// fitting GPUs it takes those with the least memory first (then the
    /// lowest index), to keep large GPUs for jobs that need them.
    pub fn select(&self, gpus: &[GpuView<'_>], count: u32) -> Option<Vec<usize>> {
        let mut fit: Vec<usize> = (0..gpus.len())
            .filter(|&i| {
                let g = &gpus[i];
                g.healthy && g.free && self.matches_gpu(g.model, g.memory_mib)
            })
            .collect();
        if fit.len() < count as usize {
            return None;
        }
        fit.sort_by_key(|&i| (gpus[i].memory_mib, i));
        fit.truncate(count as usize);
        Some(fit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> GpuSpec {
        match s.parse() {
            Ok(v) => v,
            Err(e) => panic!("{s}: {e}"),
        }
    }

    fn err(s: &str) -> String {
        match s.parse::<GpuSpec>() {
            Ok(v) => panic!("{s} parsed to {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    const GB: u64 = 1024;

    #[test]
    fn names() {
        assert_eq!(p("A100").names, vec!["A100"]);
        assert_eq!(p("H100,A100").names, vec!["H100", "A100"]);
        assert_eq!(p(" H100 , A100 ").names, vec!["H100", "A100"]);
        assert_eq!(p("A100-80GB").names, vec!["A100-80GB"]);
        assert_eq!(p("A100").count, None);
    }

    #[test]
    fn memory_forms() {
        let m = |s: &str| p(s).memory.map(|m| (m.min, m.max));
        assert_eq!(m("24GB..80GB"), Some((Some(24 * GB), Some(80 * GB))));
        assert_eq!(m("40GB.."), Some((Some(40 * GB), None)));
        assert_eq!(m("..24GB"), Some((None, Some(24 * GB))));
        assert_eq!(m("24GB"), Some((Some(24 * GB), Some(24 * GB))));
        assert_eq!(m("512mb.."), Some((Some(512), None)));
        assert_eq!(m("1tb"), Some((Some(1024 * GB), Some(1024 * GB))));
        assert_eq!(m("1.5TB.."), Some((Some(1536 * GB), None)));
        assert_eq!(m("24 GB .. 80 Gb"), Some((Some(24 * GB), Some(80 * GB))));
    }

    #[test]
    fn counts() {
        let c = |s: &str| p(s).count.map(|c| (c.min, c.max));
        assert_eq!(c("A100:2"), Some((2, Some(2))));
        assert_eq!(c("24GB..:1..4"), Some((1, Some(4))));
        assert_eq!(c("2.."), Some((2, None)));
        assert_eq!(c("..4"), Some((1, Some(4))));
        assert_eq!(c("8"), Some((8, Some(8))));
        let s = p("24GB..:1..4");
        assert_eq!(s.memory.and_then(|m| m.min), Some(24 * GB));
        assert_eq!(s.count_or(7), 1);
        assert_eq!(p("A100").count_or(3), 3);
        assert_eq!(p("A100").count_or(0), 1);
    }

    #[test]
    fn all_kinds_any_order() {
        let a = p("nvidia:H100,A100:40GB..:8");
        let b = p("8:40GB..:H100,A100:NVIDIA");
        assert_eq!(a, b);
        assert_eq!(a.vendor, Some(Vendor::Nvidia));
        assert_eq!(a.to_string(), "nvidia:H100,A100:40GB..:8");
    }

    #[test]
    fn display_canonical() {
        assert_eq!(p("a100:2").to_string(), "a100:2");
        assert_eq!(p("1024gb..").to_string(), "1TB..");
        assert_eq!(p("1536MB").to_string(), "1536MB");
        assert_eq!(p("..4").to_string(), "1..4");
        assert_eq!(p("tpu").to_string(), "tpu");
        assert_eq!(GpuSpec::default().to_string(), "any");
    }

    #[test]
    fn errors_say_what_and_where() {
        assert_eq!(
            err("80XB"),
            r#"--gpu 80XB: unknown unit "XB" at column 3; use MB, GB or TB"#
        );
        assert_eq!(
            err(""),
            r#"--gpu "": empty spec; e.g. A100, A100:2, 24GB..80GB or H100,A100:8"#
        );
        assert_eq!(
            err("A100::2"),
            "--gpu A100::2: empty part at column 6; parts are separated by single ':'"
        );
        assert_eq!(
            err("A100:"),
            "--gpu A100:: empty part at column 6; parts are separated by single ':'"
        );
        assert_eq!(
            err("A100:H100"),
            "--gpu A100:H100: second names at column 6 (the first is at column 1); give each of vendor, names, memory and count once"
        );
        assert_eq!(
            err("A100,,H100"),
            "--gpu A100,,H100: empty model name at column 6"
        );
        assert_eq!(
            err("A1/00"),
            "--gpu A1/00: unexpected '/' at column 3; a model name holds letters, digits, '-', '_' and '.'"
        );
        assert_eq!(
            err("24..80GB"),
            r#"--gpu 24..80GB: memory "24" at column 1 has no unit; use MB, GB or TB (e.g. 24GB)"#
        );
        assert_eq!(
            err("..GB"),
            "--gpu ..GB: unexpected 'G' at column 3; expected a number"
        );
        assert_eq!(
            err(".."),
            "--gpu ..: range at column 1 has no bounds; e.g. 24GB.., ..80GB or 1..4"
        );
        assert_eq!(
            err("80GB..24GB"),
            "--gpu 80GB..24GB: range at column 1 is empty: 80GB is more than 24GB"
        );
        assert_eq!(
            err("A100:4..2"),
            "--gpu A100:4..2: range at column 6 is empty: 4 is more than 2"
        );
        assert_eq!(
            err("A100:0"),
            "--gpu A100:0: count 0 at column 6; a job takes at least 1 GPU"
        );
        assert_eq!(
            err("0..2"),
            "--gpu 0..2: count 0 at column 1; a job takes at least 1 GPU"
        );
        assert_eq!(
            err("..0"),
            "--gpu ..0: count 0 at column 3; a job takes at least 1 GPU"
        );
        assert_eq!(
            err("A100:5000"),
            "--gpu A100:5000: count at column 6 is too large (at most 1024)"
        );
        assert_eq!(
            err("99999999TB"),
            "--gpu 99999999TB: memory at column 1 is too large (at most 1024TB)"
        );
        assert_eq!(
            err("2-3"),
            "--gpu 2-3: unexpected '-' at column 2; a count is a whole number or a range like 1..4"
        );
        assert_eq!(
            err("24GB..80GB..90GB"),
            r#"--gpu 24GB..80GB..90GB: unknown unit "GB..90GB" at column 9; use MB, GB or TB"#
        );
    }

    #[test]
    fn columns_count_blanks_and_characters() {
        assert_eq!(
            err("  A100 : 80 XB"),
            r#"--gpu   A100 : 80 XB: unknown unit "XB" at column 13; use MB, GB or TB"#
        );
        assert_eq!(
            err("\u{3000}80XB"),
            "--gpu \u{3000}80XB: unknown unit \"XB\" at column 4; use MB, GB or TB"
        );
        assert_eq!(
            err("é:80GB"),
            "--gpu é:80GB: unexpected 'é' at column 1; a model name holds letters, digits, '-', '_' and '.'"
        );
    }

    #[test]
    fn model_rule() {
        assert!(model_matches("A100", "NVIDIA A100-SXM4-80GB"));
        assert!(model_matches("a100", "NVIDIA A100-PCIE-40GB"));
        assert!(model_matches("RTX4090", "NVIDIA GeForce RTX 4090"));
        assert!(model_matches("rtx-4090", "NVIDIA GeForce RTX 4090"));
        assert!(model_matches("A100-80GB", "NVIDIA A100-SXM4-80GB"));
        assert!(model_matches("H100", "NVIDIA H100 80GB HBM3"));
        assert!(model_matches("T4", "Tesla T4"));
        assert!(!model_matches("A10", "NVIDIA A100-SXM4-80GB"));
        assert!(!model_matches("L40", "NVIDIA L40S"));
        assert!(!model_matches("80GB-A100", "NVIDIA A100-SXM4-80GB"));
        assert!(!model_matches("A100-40GB", "NVIDIA A100-SXM4-80GB"));
        assert!(!model_matches("H100", "NVIDIA A100-SXM4-80GB"));
    }

    #[test]
    fn memory_rounds_to_gib() {
        let s = p("80GB..");
        assert!(s.matches_gpu("NVIDIA H100 80GB HBM3", 81559));
        assert!(s.matches_gpu("NVIDIA A100-SXM4-80GB", 81920));
        assert!(!s.matches_gpu("NVIDIA A100-PCIE-40GB", 40960));
        assert!(p("24GB").matches_gpu("NVIDIA GeForce RTX 4090", 24564));
        assert!(p("..24GB").matches_gpu("NVIDIA GeForce RTX 4090", 24564));
        assert!(!p("..23GB").matches_gpu("NVIDIA GeForce RTX 4090", 24564));
    }

    #[test]
    fn vendor_rule() {
        assert!(p("nvidia").matches_gpu("Tesla T4", 15360));
        assert!(!p("amd").matches_gpu("Tesla T4", 15360));
        assert!(GpuSpec::default().matches_gpu("anything", 1));
    }

    #[test]
    fn select_takes_fitting_free_healthy_smallest_first() {
        let g = |model, mem, healthy, free| GpuView {
            model,
            memory_mib: mem,
            healthy,
            free,
        };
        let gpus = [
            g("NVIDIA A100-SXM4-80GB", 81920, true, true),
            g("NVIDIA A100-PCIE-40GB", 40960, true, true),
            g("NVIDIA A100-SXM4-80GB", 81920, false, true),
            g("NVIDIA A100-SXM4-80GB", 81920, true, false),
            g("NVIDIA GeForce RTX 4090", 24564, true, true),
        ];
        assert_eq!(p("A100").select(&gpus, 2), Some(vec![1, 0]));
        assert_eq!(p("A100:80GB..").select(&gpus, 1), Some(vec![0]));
        assert_eq!(p("A100:80GB..").select(&gpus, 2), None);
        assert_eq!(p("24GB..").select(&gpus, 3), Some(vec![4, 1, 0]));
        assert_eq!(p("H100").select(&gpus, 1), None);
    }

    fn arb_spec() -> impl Strategy<Value = GpuSpec> {
        let vendor = prop::option::of(prop_oneof![
            Just(Vendor::Nvidia),
            Just(Vendor::Amd),
            Just(Vendor::Intel),
            Just(Vendor::Google),
            Just(Vendor::Tenstorrent),
        ]);
        let names = prop::collection::vec("[A-Za-z][A-Za-z0-9_.-]{0,8}", 0..3)
            .prop_filter("a name that is a vendor classifies as vendor", |v| {
                v.iter().all(|n| Vendor::from_token(n).is_none())
            });
        let bound = prop::option::of(0u64..=MAX_MIB);
        let memory =
            prop::option::of((bound.clone(), bound).prop_filter_map("ordered", |(a, b)| {
                match (a, b) {
                    (None, None) => None,
                    (Some(a), Some(b)) if a > b => Some(MemRange {
                        min: Some(b),
                        max: Some(a),
                    }),
                    (a, b) => Some(MemRange { min: a, max: b }),
                }
            }));
        let count = prop::option::of(
            (1u32..=MAX_COUNT, prop::option::of(1u32..=MAX_COUNT)).prop_map(|(a, b)| match b {
                Some(b) if b < a => CountRange {
                    min: b,
                    max: Some(a),
                },
                b => CountRange { min: a, max: b },
            }),
        );
        (vendor, names, memory, count)
            .prop_map(|(vendor, names, memory, count)| GpuSpec {
                vendor,
                names,
                memory,
                count,
            })
            .prop_filter("the empty spec has no text", |s| *s != GpuSpec::default())
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(spec in arb_spec()) {
            let text = spec.to_string();
            prop_assert_eq!(text.parse::<GpuSpec>(), Ok(spec), "{}", text);
        }

        #[test]
        fn garbage_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<GpuSpec>();
        }

        #[test]
        fn near_grammar_never_panics(s in "[A-Za-z0-9:,. _-]{0,30}") {
            if let Ok(spec) = s.parse::<GpuSpec>() {
                // Whatever parses prints to text that parses to the same.
                prop_assert_eq!(spec.to_string().parse::<GpuSpec>(), Ok(spec));
            }
        }

        #[test]
        fn matching_never_panics(name in "\\PC{0,20}", model in "\\PC{0,30}") {
            let _ = model_matches(&name, &model);
        }
    }
}
