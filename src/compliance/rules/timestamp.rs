//! Reading the UTC timestamps the keystore writes (key material creation times), for
//! the rotation rule. The shape is checked here; the calendar (month lengths, leap
//! years, days since the epoch) is `chrono`'s.

use chrono::{NaiveDate, NaiveTime};

/// Parses the UTC timestamps the keystore writes (`YYYY-MM-DDTHH:MM:SSZ`, optionally with
/// a fraction of a second) to Unix seconds. `None` for anything else.
pub fn parse_rfc3339_utc(s: &str) -> Option<u64> {
    if !has_utc_timestamp_shape(s) {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u32> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if year < 1970 || hour > 23 || min > 59 || sec > 60 {
        return None;
    }
    let date = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day)?;
    let midnight = u64::try_from(date.and_time(NaiveTime::MIN).and_utc().timestamp()).ok()?;
    // The time of day is plain arithmetic rather than a `NaiveTime`, which refuses
    // second 60: a leap second counts as the next second, as it always has here.
    Some(midnight + u64::from(hour) * 3600 + u64::from(min) * 60 + u64::from(sec))
}

/// Whether `s` is laid out as `YYYY-MM-DDTHH:MM:SS[.F+]Z` (`t` and `z` in lower case
/// too); the fields themselves are checked by the caller.
fn has_utc_timestamp_shape(s: &str) -> bool {
    let b = s.as_bytes();
    if !s.is_ascii()
        || b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return false;
    }
    let rest = &s[19..];
    let rest = match rest.strip_prefix('.') {
        Some(frac) => {
            let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return false;
            }
            &frac[digits..]
        }
        None => rest,
    };
    rest == "Z" || rest == "z"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_utc("2000-02-29T00:00:00Z"), Some(951_782_400));
        assert_eq!(
            parse_rfc3339_utc("2024-12-31T23:59:59Z"),
            Some(1_735_689_599)
        );
        assert_eq!(
            parse_rfc3339_utc("2024-02-29T00:00:00.123Z"),
            Some(1_709_164_800)
        );
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00+01:00",
            "1969-12-31T23:59:59Z",
            "2024-01-01 00:00:00Z",
            "20x4-01-01T00:00:00Z",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T24:00:00Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }

    /// Pins the calendar arithmetic on leap years, century years and month ends (and the
    /// accepted spellings), so that replacing the date code cannot change a result.
    #[test]
    fn timestamps_on_calendar_edges() {
        for (s, want) in [
            ("1970-01-31T00:00:00Z", 2_592_000),
            ("2000-02-29T00:00:00Z", 951_782_400),
            ("2023-12-31T23:59:59Z", 1_704_067_199),
            ("2024-03-01T00:00:00Z", 1_709_251_200),
            ("2024-04-30T12:00:00Z", 1_714_478_400),
            ("2038-01-19T03:14:08Z", 2_147_483_648),
            ("2100-02-28T23:59:59Z", 4_107_542_399),
            ("2100-03-01T00:00:00Z", 4_107_542_400),
            ("9999-12-31T23:59:59Z", 253_402_300_799),
            // Lower-case separators and a long fraction are accepted (the fraction is
            // dropped).
            ("2024-03-01t00:00:00z", 1_709_251_200),
            ("2024-03-01T00:00:00.123456789012Z", 1_709_251_200),
            // A leap second counts as the next second.
            ("2016-12-31T23:59:60Z", 1_483_228_800),
        ] {
            assert_eq!(parse_rfc3339_utc(s), Some(want), "{s}");
        }
        for bad in [
            "2100-02-29T00:00:00Z",
            "1900-02-28T00:00:00Z",
            "2024-04-31T00:00:00Z",
            "2024-06-31T00:00:00Z",
            "2024-00-10T00:00:00Z",
            "2024-01-00T00:00:00Z",
            "2024-01-32T00:00:00Z",
            "2024-01-01T00:60:00Z",
            "2024-01-01T00:00:61Z",
            "+024-01-01T00:00:00Z",
            "2024-01-01T00:00:00ZZ",
            "2024-01-01T00:00:00.5",
            "2024-1-01T00:00:00Z",
            "2024-01-01T00:00:0\u{e9}Z",
        ] {
            assert_eq!(parse_rfc3339_utc(bad), None, "{bad}");
        }
    }
}
