//! Node names and tags: lowercase DNS labels (RFC 1123), so `NAME.<domain>`
//! resolves through MagicDNS and tags read the same everywhere.

use thiserror::Error;

/// Longest DNS label.
pub const MAX_LABEL: usize = 63;

/// Why a name or tag is not a valid label.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// Empty.
    #[error("must not be empty")]
    Empty,
    /// Over 63 bytes.
    #[error("is {0} characters long; at most 63 allowed")]
    TooLong(usize),
    /// A character outside `a-z 0-9 -`.
    #[error("contains {0:?}; only lowercase letters, digits and '-' are allowed")]
    BadChar(char),
    /// Starts or ends with `-`.
    #[error("must not start or end with '-'")]
    Hyphen,
}

/// Checks a node name: a lowercase DNS label (`a-z`, `0-9`, `-`, 1-63
/// characters, no leading or trailing `-`).
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_LABEL {
        return Err(NameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(NameError::BadChar(c));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Hyphen);
    }
    Ok(())
}

/// Tags follow the same rules as names.
pub fn validate_tag(tag: &str) -> Result<(), NameError> {
    validate_name(tag)
}

/// A tag list from literals (policies written in code, tests); not validated.
pub fn tags(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Turns a hostname (or anything a user typed) into a valid name: the first
/// dot-separated label, lowercased, every run of other characters turned into
/// one `-`, trimmed of `-`, cut to 63. `None` if nothing usable is left
/// (the shell then falls back to e.g. `node-<key short>`).
pub fn sanitize_name(raw: &str) -> Option<String> {
    let first = raw.trim().split('.').next().unwrap_or("");
    let mut out = String::with_capacity(first.len().min(MAX_LABEL));
    for c in first.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut s = out.trim_matches('-').to_string();
    if s.len() > MAX_LABEL {
        s.truncate(MAX_LABEL);
        while s.ends_with('-') {
            s.pop();
        }
    }
    (!s.is_empty()).then_some(s)
}

/// `base` if free, else `base-2`, `base-3`, ... (cut so the result stays a
/// valid label). `taken` answers whether a name is in use.
pub fn unique_name(base: &str, taken: impl Fn(&str) -> bool) -> String {
    if !taken(base) {
        return base.to_string();
    }
    let mut n: u64 = 2;
    loop {
        let suffix = format!("-{n}");
        let mut stem = base.to_string();
        stem.truncate(MAX_LABEL - suffix.len());
        while stem.ends_with('-') {
            stem.pop();
        }
        let cand = format!("{stem}{suffix}");
        if !taken(&cand) {
            return cand;
        }
        n += 1;
    }
}

/// The prefix of a *group tag*: the pool gives one (`pool-job-17`) to every member of a
/// running gang, and nodes that share a group tag may reach each other on every protocol
/// and port, in addition to the policy's rules, for as long as they hold it. Operators
/// cannot hand these out: a token or rule tag with this prefix is refused.
pub const GROUP_TAG_PREFIX: &str = "pool-job-";

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn validates() {
        assert_eq!(validate_name("gpu-1"), Ok(()));
        assert_eq!(validate_name("1gpu"), Ok(()));
        assert_eq!(validate_name(""), Err(NameError::Empty));
        assert_eq!(validate_name("-a"), Err(NameError::Hyphen));
        assert_eq!(validate_name("a-"), Err(NameError::Hyphen));
        assert_eq!(validate_name("Gpu"), Err(NameError::BadChar('G')));
        assert_eq!(validate_name("a.b"), Err(NameError::BadChar('.')));
        assert_eq!(validate_name(&"a".repeat(64)), Err(NameError::TooLong(64)));
        assert_eq!(validate_name(&"a".repeat(63)), Ok(()));
    }

    #[test]
    fn sanitizes_hostnames() {
        assert_eq!(
            sanitize_name("GPU-Box_01.lab.example.com").as_deref(),
            Some("gpu-box-01")
        );
        assert_eq!(
            sanitize_name("  my laptop!! ").as_deref(),
            Some("my-laptop")
        );
        assert_eq!(sanitize_name("--x--").as_deref(), Some("x"));
        assert_eq!(sanitize_name("ünïcode").as_deref(), Some("n-code"));
        assert_eq!(sanitize_name("..."), None);
        assert_eq!(sanitize_name("___"), None);
    }

    #[test]
    fn unique_names_count_up() {
        let taken = ["gpu", "gpu-2"];
        assert_eq!(unique_name("gpu", |n| taken.contains(&n)), "gpu-3");
        assert_eq!(unique_name("cpu", |n| taken.contains(&n)), "cpu");
        let long = "a".repeat(63);
        let got = unique_name(&long, |n| n == long);
        assert_eq!(got.len(), 63);
        assert!(got.ends_with("-2"));
    }

    proptest! {
        #[test]
        fn sanitized_is_valid_or_none(s in ".{0,100}") {
            if let Some(n) = sanitize_name(&s) {
                prop_assert_eq!(validate_name(&n), Ok(()));
                prop_assert_eq!(sanitize_name(&n), Some(n.clone()));
            }
        }

        #[test]
        fn unique_is_valid(base in "[a-z][a-z0-9-]{0,62}", k in 0usize..5) {
            let base = sanitize_name(&base).unwrap_or_else(|| "x".into());
            let taken: Vec<String> = (0..k).map(|i| if i == 0 { base.clone() } else { format!("{base}-{}", i + 1) }).collect();
            let n = unique_name(&base, |n| taken.iter().any(|t| t == n));
            prop_assert_eq!(validate_name(&n), Ok(()));
            prop_assert!(!taken.contains(&n));
        }
    }
}
