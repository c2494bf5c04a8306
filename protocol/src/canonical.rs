//! Canonical JSON (RFC 8785, the JSON Canonicalization Scheme), the byte string an event's hash is
//! computed over.
//!
//! One canonicaliser for every digest a regulator may recompute: the coordinator's job-spec
//! digest (what approvals sign) and the audit service's event hashes both use this module.
//!
//! - objects: members sorted by their keys' UTF-16 code units (RFC 8785 §3.2.3), no whitespace;
//! - strings: only `"`, `\` and U+0000..U+001F escaped, the latter as `\b \t \n \f \r` or
//!   `\u00xx` with lowercase hex; everything else as literal UTF-8 (§3.2.2.2);
//! - floats: ECMAScript's Number-to-String (§3.2.2.3, ECMA-262 §6.1.6.1.20): the shortest digits
//!   that round-trip (the even one on an exact tie, e.g. 1424953923781206.2 as in RFC 8785
//!   Appendix B, where Rust's shortest formatting gives ...206.3), plain notation for decimal
//!   exponents -7 < e < 21, otherwise `1e+21` / `1e-7`;
//!   `-0` as `0`;
//! - integers (values `serde_json` holds as `i64`/`u64`): exactly, in decimal. **Deviation,
//!   documented:** RFC 8785 treats every number as an IEEE double, so an integer with magnitude
//!   above 2^53 would be rounded by a strict JCS implementation (e.g. 2^53 + 1 → `9007199254740992`).
//!   We write it exactly (a job spec's `seed` may exceed 2^53). Up to 2^53 (9007199254740992) the two agree, and
//!   producers of audit payloads should keep integers within that range (or send them as strings)
//!   if third-party JCS verifiers must reproduce the hash.
//! - `true`, `false`, `null`, arrays as in JSON.
//!
//! `serde_json::Value` cannot hold NaN or ±∞, so every `Value` has a canonical form and
//! canonicalisation cannot fail.

use serde_json::Value;
use std::fmt::Write as _;

/// Canonical JSON text of `value` (RFC 8785, with the integer deviation described in the module
/// documentation).
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

/// Appends the canonical JSON text of `value` to `out`; lets a hot loop reuse one buffer.
pub fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                write_es_number(n.as_f64().unwrap_or(f64::NAN), out);
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            // UTF-16 code unit order, not byte or code point order: the two differ for characters
            // above U+FFFF against U+E000..U+FFFF, and RFC 8785 §3.2.3 prescribes UTF-16.
            members.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(k, out);
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
    }
}

/// Appends `s` as a JSON string literal with RFC 8785 §3.2.2.2 escaping.
pub fn write_string(s: &str, out: &mut String) {
    out.push('"');
    // Copy runs of characters that need no escape in one go: event fields are mostly plain ASCII.
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let esc: Option<&str> = match c {
            '"' => Some("\\\""),
            '\\' => Some("\\\\"),
            '\u{8}' => Some("\\b"),
            '\t' => Some("\\t"),
            '\n' => Some("\\n"),
            '\u{c}' => Some("\\f"),
            '\r' => Some("\\r"),
            c if (c as u32) < 0x20 => Some(""),
            _ => None,
        };
        if let Some(esc) = esc {
            out.push_str(&s[start..i]);
            if esc.is_empty() {
                let _ = write!(out, "\\u{:04x}", c as u32);
            } else {
                out.push_str(esc);
            }
            start = i + c.len_utf8();
        }
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// ECMAScript Number::toString(x) for a double (ECMA-262 §6.1.6.1.20), as RFC 8785 §3.2.2.3 uses.
/// Non-finite values have no JSON form and cannot occur in a `serde_json::Value`; `null` is written
/// should one arrive anyway (same as the coordinator's copy).
pub fn es_number(x: f64) -> String {
    let mut s = String::new();
    write_es_number(x, &mut s);
    s
}

fn write_es_number(x: f64, out: &mut String) {
    if !x.is_finite() {
        out.push_str("null");
        return;
    }
    if x == 0.0 {
        out.push('0'); // covers -0 (RFC 8785 §3.2.2.3)
        return;
    }
    if x < 0.0 {
        out.push('-');
        write_es_number(-x, out);
        return;
    }
    // Rust's `{:e}` prints the shortest digits that round-trip, as `d.ddddde±x`. But when two
    // shortest candidates are equally close to x (an exact decimal tie, e.g. the double
    // 1424953923781206.25 → "…206.2" or "…206.3"), ECMA-262 §6.1.6.1.20 step 5 wants the even one,
    // and `{:e}` may pick the other. Rust's fixed-precision formatting rounds the exact binary
    // value correctly, ties to even: with k digits it gives the k-digit decimal closest to x, which
    // is ECMA-262's choice whenever it still round-trips. (Divergence from the coordinator's copy,
    // which lacks this step; see the report for issue "The audit service".)
    let shortest = format!("{x:e}");
    let digit_count = shortest
        .split_once('e')
        .map_or(1, |(m, _)| m.len() - usize::from(m.contains('.')));
    // A tie needs two k-digit neighbours 10^(E-k+1) apart that both round-trip, so that spacing is
    // at most one ulp ≤ 2^-52·x while exceeding 10^-k·x: 10^k > 2^52, k ≥ 16. Shorter outputs
    // cannot be ties, which keeps the extra formatting off the common path.
    let sci = if digit_count >= 16 {
        let closest = format!("{x:.prec$e}", prec = digit_count - 1);
        if closest.parse::<f64>().ok() == Some(x) {
            closest
        } else {
            shortest
        }
    } else {
        shortest
    };
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let e: i32 = exp.parse().unwrap_or(0);
    let k = digits.len() as i32;
    // In ECMA-262's terms the value is 0.digits × 10^n.
    let n = e + 1;
    if k <= n && n <= 21 {
        out.push_str(&digits);
        out.extend(std::iter::repeat_n('0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        let _ = write!(out, "{}.{}", &digits[..n as usize], &digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.push_str("0.");
        out.extend(std::iter::repeat_n('0', (-n) as usize));
        out.push_str(&digits);
    } else {
        let sign = if n - 1 < 0 { '-' } else { '+' };
        let exp = (n - 1).abs();
        if k == 1 {
            let _ = write!(out, "{digits}e{sign}{exp}");
        } else {
            let _ = write!(out, "{}.{}e{sign}{exp}", &digits[..1], &digits[1..]);
        }
    }
}
