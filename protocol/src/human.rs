//! Numbers as people read them in refusals, reports and status lines: a few significant digits,
//! no trailing zeros, never Rust's `Some(3.0)` or `0.30000000000000004`.

/// `v` with at most `digits` significant digits (at least one), trailing zeros dropped:
/// `3.0` → `3`, `1.4999999` → `1.5` (at 3 digits), `0.000123456` → `0.000123`. Non-finite values
/// print as themselves (`inf`, `NaN`).
pub fn significant(v: f64, digits: u32) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    if v == 0.0 {
        return "0".into();
    }
    let digits = digits.max(1) as i32;
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (digits - 1 - magnitude).max(0) as usize;
    let text = format!("{v:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    if text == "-0" { "0".into() } else { text }
}

/// [`significant`] at 4 digits: the default for ε, δ-free quantities, noise multipliers and
/// metrics shown to people.
pub fn number(v: f64) -> String {
    significant(v, 4)
}

/// An optional number: the number, or `none`.
pub fn optional(v: Option<f64>) -> String {
    v.map_or_else(|| "none".into(), number)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(number(3.0), "3");
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(0.1 + 0.2), "0.3");
        assert_eq!(number(10.0 - 8.5), "1.5");
        assert_eq!(significant(1.4999999, 3), "1.5");
        assert_eq!(number(0.000123456), "0.0001235");
        assert_eq!(number(12345.678), "12346");
        assert_eq!(number(-0.00001), "-0.00001");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(f64::INFINITY), "inf");
        assert_eq!(optional(Some(3.0)), "3");
        assert_eq!(optional(None), "none");
    }
}
