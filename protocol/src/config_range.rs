//! The documented ranges of configuration values, enforced in one way for every config file.
//!
//! Each binary's config lists its ranged keys and checks them with [`in_range`] when the file is
//! read; the error names the key (the caller adds the file), the value found and the range that
//! `deploy/config/*.toml` documents. A value out of its range is refused at start, never clamped
//! silently into one.

use std::fmt::Display;

/// A configuration value outside its documented range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` = {value} is out of range: it must be in [{min}, {max}]")]
pub struct OutOfRange {
    pub key: String,
    pub value: String,
    pub min: String,
    pub max: String,
}

/// `value` of `key` must lie in `[min, max]` (a NaN never does).
pub fn in_range<T: PartialOrd + Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), OutOfRange> {
    if value >= min && value <= max {
        return Ok(());
    }
    Err(OutOfRange {
        key: key.to_string(),
        value: value.to_string(),
        min: min.to_string(),
        max: max.to_string(),
    })
}

/// The longest reload or retry period a config may ask for, in seconds: one day.
pub const MAX_PERIOD_SECS: u64 = 86_400;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive_and_nan_is_out() {
        assert!(in_range("k", 1u64, 1, 10).is_ok());
        assert!(in_range("k", 10u64, 1, 10).is_ok());
        let e = in_range("max_batch", 5000u64, 1, 1000).unwrap_err();
        assert_eq!(
            e.to_string(),
            "`max_batch` = 5000 is out of range: it must be in [1, 1000]"
        );
        assert!(in_range("k", 0u64, 1, 10).is_err());
        assert!(in_range("x", f64::NAN, 0.0, 1.0).is_err());
    }
}
