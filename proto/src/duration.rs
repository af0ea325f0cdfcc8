//! The one duration grammar of every Weft command line: a decimal number and
//! a unit, `500ms`, `1.5s`, `30s`, `10m`, `2h`, `1d`; a plain number is
//! seconds (`90`). Surrounding blanks and blanks between the number and the
//! unit are allowed; signs, exponents and other units are not.
//!
//! [`parse`] is a clap `value_parser` as it is (`#[arg(value_parser =
//! weft_proto::duration::parse)]`): clap then names the flag in the error
//! and [`ParseError`] gives the grammar with examples. [`format`] writes the
//! shortest text that parses back to the same duration.

use std::time::Duration;

use thiserror::Error;

/// What every error message ends with: the grammar, by example.
const GRAMMAR: &str =
    "use a number with ms, s, m, h or d, e.g. 500ms, 30s, 2h or 1d (a plain number is seconds)";

/// The units, with their length in nanoseconds.
const UNITS: [(&str, u128); 5] = [
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

/// A duration that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// Nothing was given.
    #[error("empty duration: {GRAMMAR}")]
    Empty,
    /// The number part is not a decimal number.
    #[error("{0:?} is not a duration: {GRAMMAR}")]
    BadNumber(String),
    /// The unit is not one of `ms`, `s`, `m`, `h`, `d`.
    #[error("{input:?}: unknown unit {unit:?}: {GRAMMAR}")]
    BadUnit {
        /// The whole text.
        input: String,
        /// Its unit part.
        unit: String,
    },
    /// More than [`Duration::MAX`].
    #[error("{0:?} is too long a duration")]
    TooLarge(String),
}

/// Parses `500ms`, `1.5s`, `30s`, `10m`, `2h`, `1d` or plain seconds.
/// Fractions are exact down to the nanosecond (further digits are dropped).
pub fn parse(text: &str) -> Result<Duration, ParseError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(ParseError::Empty);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim_start());
    if number.is_empty() {
        return Err(ParseError::BadNumber(s.to_string()));
    }
    let unit_ns = if unit.is_empty() {
        1_000_000_000
    } else {
        UNITS
            .iter()
            .find(|(u, _)| *u == unit)
            .map(|(_, ns)| *ns)
            .ok_or_else(|| ParseError::BadUnit {
                input: s.to_string(),
                unit: unit.to_string(),
            })?
    };
    let bad_number = || ParseError::BadNumber(s.to_string());
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(bad_number());
    }
    let too_large = || ParseError::TooLarge(s.to_string());
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        // Only digits are left: a failure is an overflow.
        whole.parse().map_err(|_| too_large())?
    };
    // 18 digits of a fraction of a day are finer than a nanosecond, and
    // 10^18 times a day in nanoseconds fits a u128 easily.
    let digits = &fraction[..fraction.len().min(18)];
    let scale = 10u128.pow(digits.len() as u32);
    let fraction: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| bad_number())?
    };
    let nanos = whole
        .checked_mul(unit_ns)
        .and_then(|n| n.checked_add(fraction * unit_ns / scale))
        .ok_or_else(too_large)?;
    let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| too_large())?;
    Ok(Duration::new(secs, (nanos % 1_000_000_000) as u32))
}

/// The shortest text in the grammar for `d`: the largest unit that divides it
/// (`2h`, `90s`, `1500ms`), else seconds with a fraction (`1.000000001s`).
pub fn format(d: Duration) -> String {
    let nanos = d.as_nanos();
    if nanos == 0 {
        return "0s".to_string();
    }
    for (unit, ns) in UNITS.iter().rev() {
        if nanos % ns == 0 {
            return format!("{}{unit}", nanos / ns);
        }
    }
    let frac = format!("{:09}", d.subsec_nanos());
    format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Every accepted form and what it means.
    const ACCEPTED: &[(&str, Duration)] = &[
        // Every unit.
        ("500ms", Duration::from_millis(500)),
        ("30s", Duration::from_secs(30)),
        ("10m", Duration::from_secs(600)),
        ("2h", Duration::from_secs(7200)),
        ("1d", Duration::from_secs(86_400)),
        ("7d", Duration::from_secs(7 * 86_400)),
        // Plain numbers are seconds.
        ("90", Duration::from_secs(90)),
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("1.5", Duration::from_millis(1500)),
        // Fractions are exact.
        ("1.5s", Duration::from_millis(1500)),
        (".5s", Duration::from_millis(500)),
        ("2.s", Duration::from_secs(2)),
        ("0.1s", Duration::from_millis(100)),
        ("1.5h", Duration::from_secs(5400)),
        ("0.25ms", Duration::from_micros(250)),
        ("1.000000001s", Duration::new(1, 1)),
        // Below a nanosecond: dropped; long fractions are cut, not refused.
        ("1.0000000009s", Duration::new(1, 0)),
        ("0.0000000000000000000001d", Duration::ZERO),
        // Blanks.
        ("  2s ", Duration::from_secs(2)),
        ("2 s", Duration::from_secs(2)),
        ("250 ms", Duration::from_millis(250)),
    ];

    #[test]
    fn every_accepted_form() {
        for (text, want) in ACCEPTED {
            assert_eq!(parse(text), Ok(*want), "{text:?}");
        }
    }

    #[test]
    fn refusals_say_what_is_accepted() {
        assert_eq!(parse(""), Err(ParseError::Empty));
        assert_eq!(parse("  "), Err(ParseError::Empty));
        assert_eq!(parse("fast"), Err(ParseError::BadNumber("fast".into())));
        assert_eq!(parse("-1s"), Err(ParseError::BadNumber("-1s".into())));
        assert_eq!(parse("+1s"), Err(ParseError::BadNumber("+1s".into())));
        assert_eq!(parse("."), Err(ParseError::BadNumber(".".into())));
        assert_eq!(parse("1.2.3s"), Err(ParseError::BadNumber("1.2.3s".into())));
        assert_eq!(
            parse("2x"),
            Err(ParseError::BadUnit {
                input: "2x".into(),
                unit: "x".into()
            })
        );
        assert!(matches!(parse("1e3s"), Err(ParseError::BadUnit { .. })));
        assert!(matches!(parse("2sec"), Err(ParseError::BadUnit { .. })));
        assert!(matches!(parse("2 h 3m"), Err(ParseError::BadUnit { .. })));
        let msg = parse("2x").unwrap_err().to_string();
        assert!(
            msg.contains("\"x\"") && msg.contains("e.g. 500ms, 30s, 2h or 1d"),
            "{msg}"
        );
        let msg = parse("soon").unwrap_err().to_string();
        assert!(
            msg.contains("soon") && msg.contains("plain number is seconds"),
            "{msg}"
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let max = u64::MAX.to_string();
        assert_eq!(parse(&max), Ok(Duration::from_secs(u64::MAX)));
        assert!(matches!(
            parse(&format!("{max}d")),
            Err(ParseError::TooLarge(_))
        ));
        let huge = "9".repeat(60);
        assert!(matches!(parse(&huge), Err(ParseError::TooLarge(_))));
        assert!(matches!(
            parse(&format!("{huge}.5ms")),
            Err(ParseError::TooLarge(_))
        ));
    }

    #[test]
    fn formats_shortest() {
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_millis(500)), "500ms");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_secs(600)), "10m");
        assert_eq!(format(Duration::from_secs(7200)), "2h");
        assert_eq!(format(Duration::from_secs(86_400)), "1d");
        assert_eq!(format(Duration::from_micros(250)), "0.00025s");
        assert_eq!(format(Duration::new(1, 1)), "1.000000001s");
    }

    proptest! {
        #[test]
        fn format_round_trips(secs in 0u64..=u64::MAX, nanos in 0u32..1_000_000_000) {
            let d = Duration::new(secs, nanos);
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn whole_units_round_trip(n in 0u64..1_000_000, unit in 0usize..UNITS.len()) {
            let (name, ns) = UNITS[unit];
            let total = u128::from(n) * ns;
            let d = Duration::new((total / 1_000_000_000) as u64, (total % 1_000_000_000) as u32);
            prop_assert_eq!(parse(&format!("{n}{name}")), Ok(d));
            prop_assert_eq!(parse(&format(d)), Ok(d));
        }

        #[test]
        fn never_panics(s in "\\PC{0,40}") {
            let _ = parse(&s);
        }

        #[test]
        fn digits_and_units_never_panic(s in "[0-9. ]{0,30}(ms|s|m|h|d)?") {
            let _ = parse(&s);
        }
    }
}
