//! Wall-clock helpers: Unix seconds and RFC 3339 UTC timestamps (formatted by `chrono`,
//! always in UTC with a `Z` suffix, so no time-zone database is needed).

use std::time::{SystemTime, UNIX_EPOCH};

use chrono::{DateTime, SecondsFormat, Utc};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix() -> u64 {
    since_epoch().as_secs()
}

/// `YYYY-MM-DDTHH:MM:SSZ` for the current time.
pub(crate) fn now_rfc3339() -> String {
    rfc3339_utc(now_unix())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for the current time (audit records).
pub(crate) fn now_rfc3339_millis() -> String {
    let d = since_epoch();
    rfc3339_utc_millis(d.as_secs(), d.subsec_millis())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch.
pub(crate) fn rfc3339_utc(secs: u64) -> String {
    format_utc(secs, 0, SecondsFormat::Secs)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for seconds since the Unix epoch and milliseconds.
fn rfc3339_utc_millis(secs: u64, millis: u32) -> String {
    format_utc(secs, millis, SecondsFormat::Millis)
}

/// The time since the Unix epoch (zero if the clock is before it).
fn since_epoch() -> std::time::Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// Formats an instant in UTC. An instant beyond what `chrono` represents (after the
/// year 262,143; only a hand-edited file holds one) is written as a plain offset rather
/// than a date.
fn format_utc(secs: u64, millis: u32, format: SecondsFormat) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| DateTime::<Utc>::from_timestamp(s, millis.min(999) * 1_000_000))
        .map(|t| t.to_rfc3339_opts(format, true))
        .unwrap_or_else(|| format!("{secs} seconds after 1970-01-01T00:00:00Z"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formatting() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_709_164_800), "2024-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_735_689_599), "2024-12-31T23:59:59Z");
        assert_eq!(rfc3339_utc(4_102_444_799), "2099-12-31T23:59:59Z");
        // Past one 400-year cycle: 2370-03-01.
        assert_eq!(rfc3339_utc(12_627_878_400), "2370-03-01T00:00:00Z");
    }

    #[test]
    fn millis_format() {
        let t = now_rfc3339_millis();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.ends_with('Z') && t.as_bytes()[19] == b'.', "{t}");
    }

    /// The audit log's `time` field for a fixed instant: three digits of milliseconds,
    /// zero-padded, and `Z` (never `+00:00`).
    #[test]
    fn millis_format_of_a_fixed_instant() {
        assert_eq!(
            rfc3339_utc_millis(1_738_324_800, 7),
            "2025-01-31T12:00:00.007Z"
        );
        assert_eq!(rfc3339_utc_millis(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_utc_millis(1_735_689_599, 999),
            "2024-12-31T23:59:59.999Z"
        );
    }

    #[test]
    fn instants_beyond_chrono_do_not_panic() {
        assert_eq!(
            rfc3339_utc(u64::MAX),
            "18446744073709551615 seconds after 1970-01-01T00:00:00Z"
        );
    }
}
