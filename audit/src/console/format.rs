//! Numbers and times as an officer reads them: ε to two decimals, times in UTC with the zone
//! written out, long digests shortened with the whole one kept for a tooltip.

use crate::event::Timestamp;

/// `2026-12-07 15:04:05 UTC` (seconds; the trail keeps milliseconds).
pub fn utc(t: Timestamp) -> String {
    utc_millis(t.unix_millis())
}

/// [`utc`] of a unix time in milliseconds.
pub fn utc_millis(ms: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000) {
        Ok(dt) => format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second()
        ),
        Err(_) => format!("{ms} ms since 1970 (out of range)"),
    }
}

/// ε (or δ-free privacy quantities) for people: two decimals.
pub fn epsilon(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        format!("{v}")
    }
}

/// The first 12 hex digits of a digest, for tables (the whole one goes in a `title`).
pub fn short(digest: &str) -> String {
    let d = digest.strip_prefix("sha256:").unwrap_or(digest);
    if d.len() > 12 && d.is_char_boundary(12) {
        format!("{}…", &d[..12])
    } else {
        d.to_string()
    }
}

/// Parses what a person types in a time field: `2026-12-07`, `2026-12-07T15:04`,
/// `2026-12-07 15:04:05` or full RFC 3339; all but the last are read as UTC.
pub fn parse_time(text: &str) -> Result<Timestamp, String> {
    use time::format_description::well_known::Rfc3339;
    let t = text.trim();
    let bad = || format!("{t:?} is not a time: write 2026-12-07, 2026-12-07T15:04 or RFC 3339");
    if let Ok(dt) = time::OffsetDateTime::parse(t, &Rfc3339) {
        return Timestamp::from_datetime(dt).map_err(|e| e.to_string());
    }
    let t2 = t.replace(' ', "T");
    let candidate = match t2.len() {
        10 => format!("{t2}T00:00:00Z"),
        16 => format!("{t2}:00Z"),
        19 => format!("{t2}Z"),
        _ => return Err(bad()),
    };
    let dt = time::OffsetDateTime::parse(&candidate, &Rfc3339).map_err(|_| bad())?;
    Timestamp::from_datetime(dt).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_times_read_as_people_write_them() {
        assert_eq!(utc_millis(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_millis(1_765_119_845_123), "2025-12-07 15:04:05 UTC");
        assert_eq!(epsilon(1.0 / 3.0), "0.33");
        assert_eq!(epsilon(2.0), "2.00");
        assert_eq!(epsilon(7.999), "8.00");
        assert_eq!(short("sha256:0123456789abcdef"), "0123456789ab…");
        assert_eq!(short("abc"), "abc");
    }

    #[test]
    fn typed_times_are_utc_and_bad_ones_are_named() {
        let day = parse_time("2025-12-07").unwrap();
        assert_eq!(utc(day), "2025-12-07 00:00:00 UTC");
        assert_eq!(
            utc(parse_time("2025-12-07T15:04").unwrap()),
            "2025-12-07 15:04:00 UTC"
        );
        assert_eq!(
            utc(parse_time("2025-12-07 15:04:05").unwrap()),
            "2025-12-07 15:04:05 UTC"
        );
        assert_eq!(
            utc(parse_time("2025-12-07T16:04:05+01:00").unwrap()),
            "2025-12-07 15:04:05 UTC"
        );
        let e = parse_time("yesterday").unwrap_err();
        assert!(e.contains("\"yesterday\" is not a time"), "{e}");
    }
}
