//! Wall-clock helpers: Unix seconds and RFC 3339 UTC timestamps (no time-zone database).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for the current time.
pub(crate) fn now_rfc3339() -> String {
    rfc3339_utc(now_unix())
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for the current time (audit records).
pub(crate) fn now_rfc3339_millis() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let base = rfc3339_utc(d.as_secs());
    // Insert the milliseconds before the final 'Z'.
    let stem = base.strip_suffix('Z').unwrap_or(&base);
    format!("{stem}.{:03}Z", d.subsec_millis())
}

/// `YYYY-MM-DDTHH:MM:SSZ` for seconds since the Unix epoch.
pub(crate) fn rfc3339_utc(secs: u64) -> String {
    fn is_leap(y: u64) -> bool {
        (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400)
    }
    const DAYS_PER_400_YEARS: u64 = 146_097;
    let time_of_day = secs % 86_400;
    let mut days = secs / 86_400;
    let mut year = 1970 + 400 * (days / DAYS_PER_400_YEARS);
    days %= DAYS_PER_400_YEARS;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    let february = if is_leap(year) { 29 } else { 28 };
    let month_lengths = [31, february, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let mut month = 1;
    for len in month_lengths {
        if days < len {
            break;
        }
        days -= len;
        month += 1;
    }
    format!(
        "{year:04}-{month:02}-{:02}T{:02}:{:02}:{:02}Z",
        days + 1,
        time_of_day / 3600,
        time_of_day / 60 % 60,
        time_of_day % 60
    )
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
}
