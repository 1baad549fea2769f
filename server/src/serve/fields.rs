//! Typed, named access to the fields of a JSON request object. Each getter
//! turns a wrong type or an out-of-range value into a 400 whose `param`
//! names the field (with a prefix such as `messages[2].` for nested
//! objects), and JSON null counts as absent, as OpenAI's API treats it.

use std::collections::HashSet;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::errors::{ApiError, clip};

/// Reads typed fields out of one JSON object, naming the field on failure.
pub struct Fields<'a> {
    map: &'a Map<String, Value>,
    prefix: String,
}

impl<'a> Fields<'a> {
    /// Fields of `map`; `prefix` is prepended to names in errors.
    pub fn new(map: &'a Map<String, Value>, prefix: impl Into<String>) -> Self {
        Fields {
            map,
            prefix: prefix.into(),
        }
    }

    fn param(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The raw value; JSON null counts as absent.
    pub fn raw(&self, name: &str) -> Option<&'a Value> {
        self.map.get(name).filter(|v| !v.is_null())
    }

    /// A field of any deserializable type.
    pub fn get<T: DeserializeOwned>(&self, name: &str, what: &str) -> Result<Option<T>, ApiError> {
        match self.raw(name) {
            None => Ok(None),
            Some(v) => T::deserialize(v).map(Some).map_err(|_| {
                ApiError::invalid(
                    self.param(name),
                    format!("`{}` must be {what}, not {}", self.param(name), describe(v)),
                )
            }),
        }
    }

    /// A boolean.
    pub fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.get(name, "a boolean")
    }

    /// A string.
    pub fn string(&self, name: &str) -> Result<Option<String>, ApiError> {
        self.get(name, "a string")
    }

    /// An integer in `lo..=hi`.
    pub fn int(&self, name: &str, lo: i64, hi: i64) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.raw(name) else {
            return Ok(None);
        };
        let p = self.param(name);
        // Read wide, so a value past i64 is reported as itself, not clamped.
        let n: i128 = match v {
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    i128::from(i)
                } else if let Some(u) = n.as_u64() {
                    i128::from(u)
                } else {
                    let f = n.as_f64().unwrap_or(f64::NAN);
                    if f.fract() != 0.0 || !f.is_finite() {
                        return Err(ApiError::invalid(
                            p.clone(),
                            format!("`{p}` must be an integer, not {f}"),
                        ));
                    }
                    if f.abs() >= 1e18 {
                        // Out of every range; named as sent, not saturated.
                        return Err(ApiError::invalid(
                            p.clone(),
                            format!("`{p}` is {f}; it must fit a 64-bit signed integer"),
                        ));
                    }
                    f as i128
                }
            }
            other => {
                return Err(ApiError::invalid(
                    p.clone(),
                    format!("`{p}` must be an integer, not {}", describe(other)),
                ));
            }
        };
        if n < i128::from(lo) || n > i128::from(hi) {
            // An open-ended range names only the bound that matters (a
            // bound of the integer type itself means none).
            let range = match (lo, hi) {
                (i64::MIN, i64::MAX) => "a 64-bit signed integer".to_string(),
                (_, i64::MAX) => format!("at least {lo}"),
                (i64::MIN, _) => format!("at most {hi}"),
                _ => format!("between {lo} and {hi}"),
            };
            return Err(ApiError::invalid(
                p.clone(),
                format!("`{p}` is {n}; it must be {range}"),
            ));
        }
        // In range of two i64 bounds, so it fits.
        Ok(Some(n as i64))
    }

    /// A finite number in `lo..=hi`.
    pub fn number(&self, name: &str, lo: f64, hi: f64) -> Result<Option<f64>, ApiError> {
        let Some(v) = self.raw(name) else {
            return Ok(None);
        };
        let p = self.param(name);
        let Some(f) = v.as_f64() else {
            return Err(ApiError::invalid(
                p.clone(),
                format!("`{p}` must be a number, not {}", describe(v)),
            ));
        };
        if !f.is_finite() || f < lo || f > hi {
            return Err(ApiError::invalid(
                p.clone(),
                format!("`{p}` is {f}; it must be between {lo} and {hi}"),
            ));
        }
        Ok(Some(f))
    }

    /// Names present in the object but not in `known`.
    pub fn unknown(&self, known: &[&[&str]]) -> Vec<String> {
        let set: HashSet<&str> = known.iter().flat_map(|k| k.iter().copied()).collect();
        self.map
            .keys()
            .filter(|k| !set.contains(k.as_str()))
            .cloned()
            .collect()
    }
}

pub fn show_int(n: i64) -> String {
    if n == i64::MAX {
        "too large".into()
    } else {
        n.to_string()
    }
}

/// A short description of a JSON value for error messages.
pub fn describe(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string \"{}\"", clip(s, 40)),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}
