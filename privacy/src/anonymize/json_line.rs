//! One line of a JSON Lines file as an object whose keys are each given once.
//!
//! JSON leaves an object with a repeated key to the parser: serde_json keeps the last value,
//! Python's `json` too, other tools the first. A line such as
//! `{"patient_id": "A", "text": "…", "patient_id": "B"}` would then be one patient to the site
//! engineer's review tool and another to the node: the privacy unit, the split and what is
//! redacted would follow a value nobody looked at. Both JSON Lines readers (the tabular
//! [`super::reader::read_jsonl`] and the site node's text source) read lines through
//! [`parse_object`], which refuses a repeated key, naming the key (a field's name, never a
//! value).

use std::fmt;

use serde::Deserializer;
use serde::de::{self, MapAccess, Visitor};

/// Why a line is not an object of distinct keys. The messages name keys and JSON types, never
/// a value of the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonLineError {
    #[error("not JSON: {0}")]
    Syntax(String),
    #[error("the line is JSON but not an object")]
    NotAnObject,
    #[error("the key {0:?} appears more than once in the object")]
    DuplicateKey(String),
}

impl JsonLineError {
    /// The repeated key, for an error that names the column.
    pub fn duplicate_key(&self) -> Option<&str> {
        match self {
            JsonLineError::DuplicateKey(k) => Some(k),
            _ => None,
        }
    }
}

/// The marker in serde's custom error that carries a repeated key back out of the parser.
const DUPLICATE: &str = "\u{0}tutela-duplicate-key\u{0}";
const NOT_OBJECT: &str = "\u{0}tutela-not-an-object\u{0}";

struct ObjectVisitor;

impl<'de> Visitor<'de> for ObjectVisitor {
    type Value = serde_json::Map<String, serde_json::Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(de::Error::custom(format_args!("{DUPLICATE}{key}")));
            }
            let value: serde_json::Value = map.next_value()?;
            out.insert(key, value);
        }
        Ok(out)
    }

    // Anything but an object: refused without the value (serde's default message quotes it).
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Err(E::custom(NOT_OBJECT))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(NOT_OBJECT))
    }
}

/// Parses one JSON Lines line as an object, refusing a key given twice (module documentation).
/// Surrounding whitespace is allowed; anything after the object is not.
pub fn parse_object(
    line: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, JsonLineError> {
    let mut de = serde_json::Deserializer::from_slice(line);
    let object = (&mut de).deserialize_any(ObjectVisitor).map_err(classify)?;
    de.end().map_err(classify)?;
    Ok(object)
}

fn classify(e: serde_json::Error) -> JsonLineError {
    let text = e.to_string();
    if let Some(rest) = text.strip_prefix(DUPLICATE) {
        // serde_json appends " at line L column C" to a custom message.
        let key = rest.rsplit_once(" at line ").map_or(rest, |(k, _)| k);
        return JsonLineError::DuplicateKey(key.to_string());
    }
    if text.starts_with(NOT_OBJECT) {
        return JsonLineError::NotAnObject;
    }
    JsonLineError::Syntax(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_is_refused_by_name_and_distinct_keys_parse() {
        let ok = parse_object(br#" {"a": 1, "b": {"a": 2, "a": 3}, "c": "x"} "#).unwrap();
        assert_eq!(ok.len(), 3);
        assert_eq!(
            parse_object(br#"{"patient": "A", "text": "t", "patient": "B"}"#),
            Err(JsonLineError::DuplicateKey("patient".into()))
        );
        // The key as JSON spells it, escapes decoded: "p\u0061tient" is "patient".
        assert_eq!(
            parse_object(br#"{"patient": "A", "p\u0061tient": "B"}"#),
            Err(JsonLineError::DuplicateKey("patient".into()))
        );
        for not_object in [&br#""Jane Roe""#[..], b"[1, 2]", b"42", b"true", b"null"] {
            let e = parse_object(not_object).unwrap_err();
            assert_eq!(e, JsonLineError::NotAnObject);
            assert!(!e.to_string().contains("Jane"), "{e}");
        }
        assert!(matches!(
            parse_object(br#"{"a": 1} {"b": 2}"#),
            Err(JsonLineError::Syntax(_))
        ));
        assert!(matches!(
            parse_object(br#"{"a": "#),
            Err(JsonLineError::Syntax(_))
        ));
    }
}
