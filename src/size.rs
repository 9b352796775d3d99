//! Human-readable sizes: `4096`, `512K`, `10G`, `1.5T`, `64MiB` (binary units, as qemu-img).

/// Why a size string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("empty size")]
    Empty,
    #[error("invalid size {0:?}: expected a number with an optional unit K, M, G, T or P (binary, e.g. 10G)")]
    Invalid(String),
    #[error("size {0:?} is too large")]
    Overflow(String),
}

/// Parses a size in bytes. Units are powers of 1024; `B`, `iB` suffixes are accepted.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    let shift = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "P" | "PB" | "PIB" => 50,
        _ => return Err(SizeError::Invalid(s.to_string())),
    };
    if num.is_empty() || num.matches('.').count() > 1 || num.starts_with('.') || num.ends_with('.')
    {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let (int_part, frac_part) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    let int: u64 = int_part
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    let whole = int
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))?;
    if frac_part.is_empty() {
        return Ok(whole);
    }
    if shift == 0 || frac_part.len() > 9 {
        return Err(SizeError::Invalid(s.to_string()));
    }
    // fraction * 2^shift, computed exactly with integers; must come out whole.
    let frac: u128 = frac_part
        .parse()
        .map_err(|_| SizeError::Invalid(s.to_string()))?;
    let denom = 10u128.pow(frac_part.len() as u32);
    let scaled = frac * (1u128 << shift);
    if !scaled.is_multiple_of(denom) {
        return Err(SizeError::Invalid(s.to_string()));
    }
    let extra = u64::try_from(scaled / denom).map_err(|_| SizeError::Overflow(s.to_string()))?;
    whole
        .checked_add(extra)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// Formats bytes for humans, e.g. `64 MiB`, `1.5 GiB`, `4097 B`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else if v.fract() == 0.0 {
        format!("{} {}", v as u64, UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2t"), Ok(2 << 40));
        assert_eq!(parse_size(" 1 G "), Ok(1 << 30));
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "G",
            "1X",
            "1.2.3G",
            ".5G",
            "1.G",
            "-1G",
            "1.1",
            "0.0000000001G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            parse_size("99999999999999999999"),
            Err(SizeError::Overflow("99999999999999999999".into()))
        );
        assert!(matches!(
            parse_size("16777216P"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(4097), "4.00 KiB");
        assert_eq!(format_size(100), "100 B");
    }

    proptest! {
        #[test]
        fn plain_numbers_round_trip(n in any::<u64>()) {
            prop_assert_eq!(parse_size(&n.to_string()), Ok(n));
        }
        #[test]
        fn units_multiply(n in 0u64..1_000_000, u in 0usize..4) {
            let (suffix, shift) = [("K", 10), ("M", 20), ("G", 30), ("T", 40)][u];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(n << shift));
        }
        #[test]
        fn never_panics(s in "\\PC{0,20}") {
            let _ = parse_size(&s);
        }
    }
}
