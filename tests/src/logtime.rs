//! When something was logged: our daemons' log lines start with an RFC 3339
//! UTC timestamp (`2026-12-05T22:31:13.270125Z ...`), so a test can time an
//! event by the line that reports it instead of by when it looked.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The time of day (UTC) a log line was written, from its timestamp.
pub fn line_time_of_day(line: &str) -> Option<Duration> {
    let t = line.get(11..)?;
    let (hms, rest) = t.split_once('.')?;
    let mut parts = hms.splitn(3, ':').map(|p| p.parse::<u64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let frac: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let nanos = format!("{frac:0<9}").get(..9)?.parse::<u64>().ok()?;
    Some(Duration::from_secs(h * 3600 + m * 60 + s) + Duration::from_nanos(nanos))
}

/// How long after `since` the first line of `log` that satisfies `pred` and
/// was written at or after `since` was logged (`None`: no such line yet).
/// Good across midnight for events within a few hours.
pub fn logged_after(log: &str, since: SystemTime, pred: impl Fn(&str) -> bool) -> Option<Duration> {
    const DAY: u64 = 86_400_000_000_000;
    let since = since.duration_since(UNIX_EPOCH).ok()?.as_nanos() as u64 % DAY;
    log.lines().filter(|l| pred(l)).find_map(|l| {
        let at = line_time_of_day(l)?.as_nanos() as u64;
        let after = (at + DAY - since) % DAY;
        // Earlier lines wrap to almost a day: not "after".
        (after < DAY / 2).then(|| Duration::from_nanos(after))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_timestamp_of_a_line() {
        let l = "2026-12-05T22:31:13.270125Z  INFO tunnel_relay: exposed via relay";
        assert_eq!(
            line_time_of_day(l),
            Some(Duration::from_secs(22 * 3600 + 31 * 60 + 13) + Duration::from_micros(270_125))
        );
        assert_eq!(line_time_of_day("no timestamp here"), None);
        let since = UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 22 * 3600 + 31 * 60 + 12);
        let log = "2026-12-05T22:31:11.000000Z x joined\n2026-12-05T22:31:13.500000Z x joined\n";
        assert_eq!(
            logged_after(log, since, |l| l.contains("joined")),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(logged_after(log, since, |l| l.contains("left")), None);
    }
}
