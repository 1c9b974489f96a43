//! Human-readable durations used across the API (`"500ms"`, `"30s"`, `"5m"`, `"1h"`,
//! `"30d"`, `"1h30m"`). Parsed once, at validation time, into milliseconds.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration written as a sequence of `<integer><unit>` terms, unit one of
/// `ms`, `s`, `m`, `h`, `d`, `w` (for example `"90d"`, `"1h30m"`, `"250ms"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration {
    millis: u64,
}

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (examples: \"500ms\", \"30s\", \"5m\", \"1h\", \"30d\", \"1h30m\")")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

impl Duration {
    /// A duration of `millis` milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self { millis }
    }

    /// A duration of `secs` seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self { millis: secs * 1000 }
    }

    /// Length in milliseconds.
    pub const fn as_millis(self) -> u64 {
        self.millis
    }

    /// Length in milliseconds as a signed value, for event-time arithmetic.
    pub fn as_millis_i64(self) -> i64 {
        i64::try_from(self.millis).unwrap_or(i64::MAX)
    }

    /// Whether the duration is zero.
    pub const fn is_zero(self) -> bool {
        self.millis == 0
    }

    /// Parses the textual form.
    pub fn parse(input: &str) -> Result<Self, DurationError> {
        let err = |reason| DurationError { input: input.to_owned(), reason };
        let s = input.trim();
        if s.is_empty() {
            return Err(err("empty"));
        }
        let bytes = s.as_bytes();
        let mut i = 0;
        let mut total: u64 = 0;
        while i < bytes.len() {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            if start == i {
                return Err(err("expected a number"));
            }
            let n: u64 = s[start..i].parse().map_err(|_| err("number too large"))?;
            let ustart = i;
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
            let unit = match &s[ustart..i] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "d" => 86_400_000,
                "w" => 604_800_000,
                "" => return Err(err("missing unit")),
                _ => return Err(err("unknown unit")),
            };
            total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(|| err("too large"))?;
        }
        Ok(Self { millis: total })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.millis == 0 {
            return f.write_str("0s");
        }
        let mut rest = self.millis;
        for (unit, size) in [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if rest >= size {
                write!(f, "{}{}", rest / size, unit)?;
                rest %= size;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Duration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^([0-9]+(ms|s|m|h|d|w))+$",
            "description": "A duration such as \"500ms\", \"30s\", \"5m\", \"1h\", \"30d\" or \"1h30m\"."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_compounds() {
        assert_eq!(Duration::parse("250ms").unwrap().as_millis(), 250);
        assert_eq!(Duration::parse("30s").unwrap().as_millis(), 30_000);
        assert_eq!(Duration::parse("1h30m").unwrap().as_millis(), 5_400_000);
        assert_eq!(Duration::parse("90d").unwrap().as_millis(), 90 * 86_400_000);
        assert_eq!(Duration::parse("0s").unwrap().as_millis(), 0);
    }

    #[test]
    fn rejects_bad_input_with_reason() {
        assert!(Duration::parse("").unwrap_err().to_string().contains("empty"));
        assert!(Duration::parse("10").unwrap_err().to_string().contains("missing unit"));
        assert!(Duration::parse("5y").unwrap_err().to_string().contains("unknown unit"));
        assert!(Duration::parse("h").unwrap_err().to_string().contains("expected a number"));
        assert!(Duration::parse("99999999999999999999d").is_err());
    }

    #[test]
    fn display_round_trips() {
        for s in ["1d", "1h30m", "250ms", "0s", "2d3h4m5s6ms"] {
            assert_eq!(Duration::parse(s).unwrap().to_string(), s);
        }
    }
}
