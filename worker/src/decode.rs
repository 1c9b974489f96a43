//! Decoding and validation of input records (pure logic).
//!
//! ```text
//!  Kafka record bytes ──► decode (UTF-8, JSON object, size) ──► key + event time ──► field rules
//!          │                                                                          │
//!          └──────────── Rejected { reason, detail } (dead-lettered) ◄────────────────┘
//! ```

use serde_json::{Map, Value};
use streamscore_crds::pipeline::{FieldType, PipelineConfig, TimeFormat};

/// Event times outside [1970-01-01, 2200-01-01) are rejected as absurd.
const MAX_EVENT_TIME_MS: i64 = 7_258_118_400_000;

/// A decoded, validated event.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Entity key (text form of the key field).
    pub key: String,
    /// Event time, epoch milliseconds.
    pub time: i64,
    /// The JSON object.
    pub fields: Map<String, Value>,
}

/// Why a record was dead-lettered. The label values of the `reason` metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// Not UTF-8.
    NotUtf8,
    /// Not a JSON object.
    Malformed,
    /// Larger than `source.maxRecordBytes`.
    Oversized,
    /// Key field missing or not a string/number.
    MissingKey,
    /// Event-time field missing, unparsable or absurd.
    BadEventTime,
    /// A validation rule failed.
    Invalid,
    /// Older than watermark − allowed lateness.
    Late,
    /// The model failed on this event.
    ScoringFailed,
}

impl Reason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 8] = [
        Reason::NotUtf8,
        Reason::Malformed,
        Reason::Oversized,
        Reason::MissingKey,
        Reason::BadEventTime,
        Reason::Invalid,
        Reason::Late,
        Reason::ScoringFailed,
    ];

    /// Stable text used in dead-letter headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotUtf8 => "not_utf8",
            Reason::Malformed => "malformed",
            Reason::Oversized => "oversized",
            Reason::MissingKey => "missing_key",
            Reason::BadEventTime => "bad_event_time",
            Reason::Invalid => "invalid",
            Reason::Late => "late",
            Reason::ScoringFailed => "scoring_failed",
        }
    }
}

/// A rejected record: reason and a human-readable detail.
#[derive(Clone, Debug, PartialEq)]
pub struct Rejected {
    /// Low-cardinality reason.
    pub reason: Reason,
    /// Detail for the dead-letter header (never a metric label).
    pub detail: String,
}

fn reject(reason: Reason, detail: impl Into<String>) -> Rejected {
    Rejected { reason, detail: detail.into() }
}

/// Decodes and validates one record value.
pub fn decode(cfg: &PipelineConfig, payload: Option<&[u8]>) -> Result<Event, Rejected> {
    let bytes = payload.unwrap_or_default();
    if bytes.len() > cfg.source.max_record_bytes as usize {
        return Err(reject(
            Reason::Oversized,
            format!("record is {} bytes, limit is {}", bytes.len(), cfg.source.max_record_bytes),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| reject(Reason::NotUtf8, e.to_string()))?;
    let fields = match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => m,
        Ok(_) => return Err(reject(Reason::Malformed, "value is not a JSON object")),
        Err(e) => return Err(reject(Reason::Malformed, e.to_string())),
    };
    let key = match fields.get(&cfg.source.key_field) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => {
            return Err(reject(Reason::MissingKey, format!("{} is not a string or number", cfg.source.key_field)))
        }
        None => return Err(reject(Reason::MissingKey, format!("{} is missing", cfg.source.key_field))),
    };
    let et = &cfg.source.event_time;
    let time = match fields.get(&et.field) {
        None => return Err(reject(Reason::BadEventTime, format!("{} is missing", et.field))),
        Some(v) => parse_time(v, et.format).map_err(|d| reject(Reason::BadEventTime, format!("{}: {d}", et.field)))?,
    };
    if !(0..MAX_EVENT_TIME_MS).contains(&time) {
        return Err(reject(Reason::BadEventTime, format!("{}: {time} ms is outside 1970..2200", et.field)));
    }
    for rule in &cfg.validation.fields {
        match fields.get(&rule.name) {
            None | Some(Value::Null) if rule.required => {
                return Err(reject(Reason::Invalid, format!("{} is required", rule.name)));
            }
            None | Some(Value::Null) => {}
            Some(v) => {
                let ok = match rule.kind {
                    FieldType::String => v.is_string(),
                    FieldType::Number => v.is_number(),
                    FieldType::Integer => v.is_i64() || v.is_u64(),
                    FieldType::Boolean => v.is_boolean(),
                };
                if !ok {
                    return Err(reject(Reason::Invalid, format!("{} must be of type {:?}", rule.name, rule.kind)));
                }
            }
        }
    }
    Ok(Event { key, time, fields })
}

fn parse_time(v: &Value, format: TimeFormat) -> Result<i64, String> {
    match (format, v) {
        (TimeFormat::EpochMillis, Value::Number(n)) => {
            n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)).ok_or_else(|| "not a number".into())
        }
        (TimeFormat::EpochSeconds, Value::Number(n)) => {
            n.as_f64().map(|f| (f * 1000.0).round() as i64).ok_or_else(|| "not a number".into())
        }
        (TimeFormat::Rfc3339, Value::String(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| d.timestamp_millis())
            .map_err(|e| format!("{s:?} is not RFC 3339: {e}")),
        (TimeFormat::EpochMillis | TimeFormat::EpochSeconds, Value::String(s)) => {
            let f: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
            Ok(if format == TimeFormat::EpochSeconds { (f * 1000.0).round() as i64 } else { f as i64 })
        }
        _ => Err(format!("unexpected JSON type for {format:?}")),
    }
}

/// Per-partition watermark: max event time seen − max out-of-orderness.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Watermark {
    max_time: i64,
    out_of_orderness: i64,
    lateness: i64,
}

impl Watermark {
    /// A watermark that has seen nothing.
    pub fn new(out_of_orderness: i64, lateness: i64) -> Self {
        Self { max_time: i64::MIN, out_of_orderness, lateness }
    }

    /// Current watermark (i64::MIN before the first event).
    pub fn current(&self) -> i64 {
        self.max_time.saturating_sub(self.out_of_orderness)
    }

    /// Whether an event with time `t` is late (below watermark − allowed lateness).
    pub fn is_late(&self, t: i64) -> bool {
        t < self.current().saturating_sub(self.lateness)
    }

    /// Advances with an accepted event; returns the horizon (watermark − lateness) after it.
    pub fn observe(&mut self, t: i64) -> i64 {
        self.max_time = self.max_time.max(t);
        self.horizon()
    }

    /// Watermark − allowed lateness: no accepted event can be older.
    pub fn horizon(&self) -> i64 {
        self.current().saturating_sub(self.lateness)
    }

    /// Largest event time seen.
    pub fn max_time(&self) -> Option<i64> {
        (self.max_time != i64::MIN).then_some(self.max_time)
    }

    /// Restores from a stored max event time.
    pub fn restore(&mut self, max_time: i64) {
        self.max_time = self.max_time.max(max_time);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PipelineConfig {
        PipelineConfig::from_yaml(
            r#"
source:
  bootstrapServers: x:1
  topics: [in]
  keyField: user
  eventTime: {field: ts, format: rfc3339}
  maxRecordBytes: 200
validation:
  fields:
    - {name: amount, type: number}
    - {name: note, type: string, required: false}
model: {path: m, sha256: "0000000000000000000000000000000000000000000000000000000000000000", version: v, features: [event.amount], outputs: [{name: s}]}
sink: {topic: out, deadLetterTopic: dlq}
"#,
        )
        .unwrap()
    }

    fn reason(payload: &[u8]) -> Reason {
        decode(&cfg(), Some(payload)).unwrap_err().reason
    }

    #[test]
    fn good_event_decodes() {
        let e = decode(&cfg(), Some(br#"{"user":"u1","ts":"2026-11-24T10:00:00.5Z","amount":3}"#)).unwrap();
        assert_eq!(e.key, "u1");
        assert_eq!(e.time, 1_795_514_400_500);
    }

    #[test]
    fn each_kind_of_bad_input_gets_its_reason() {
        assert_eq!(reason(b"\xff\xfe"), Reason::NotUtf8);
        assert_eq!(reason(b"{not json"), Reason::Malformed);
        assert_eq!(reason(b"[1,2]"), Reason::Malformed);
        assert_eq!(reason(&[b' '; 300]), Reason::Oversized);
        assert_eq!(reason(br#"{"ts":"2026-11-24T10:00:00Z","amount":1}"#), Reason::MissingKey);
        assert_eq!(reason(br#"{"user":"u","amount":1}"#), Reason::BadEventTime);
        assert_eq!(reason(br#"{"user":"u","ts":"yesterday","amount":1}"#), Reason::BadEventTime);
        assert_eq!(reason(br#"{"user":"u","ts":"2400-01-01T00:00:00Z","amount":1}"#), Reason::BadEventTime);
        assert_eq!(reason(br#"{"user":"u","ts":"2026-11-24T10:00:00Z"}"#), Reason::Invalid);
        assert_eq!(reason(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":"3"}"#), Reason::Invalid);
        assert_eq!(reason(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":3,"note":5}"#), Reason::Invalid);
        assert_eq!(decode(&cfg(), None).unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn watermark_marks_late_events() {
        let mut w = Watermark::new(1_000, 500);
        assert!(!w.is_late(0));
        w.observe(10_000);
        assert_eq!(w.current(), 9_000);
        assert!(!w.is_late(8_500));
        assert!(w.is_late(8_499));
        assert_eq!(w.horizon(), 8_500);
    }
}
