//! Decoding and validation of input records (pure logic).
//!
//! ```text
//!  Kafka record bytes ──► decode (UTF-8, JSON object, size) ──► key + event time ──► field rules
//!          │                                                                          │
//!          └──────────── Rejected { reason, detail } (dead-lettered) ◄────────────────┘
//! ```

use std::borrow::Cow;

use rustc_hash::FxHashMap;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use streamscore_crds::pipeline::{FieldRule, FieldType, PipelineConfig, TimeFormat};

/// Event times outside [1970-01-01, 2200-01-01) are rejected as absurd.
const MAX_EVENT_TIME_MS: i64 = 7_258_118_400_000;

/// Index of a field the pipeline reads, in [`Schema`] order.
pub type FieldId = usize;

/// The top-level fields the pipeline reads (key, event time, validated fields, feature
/// inputs and filters, model inputs, passthrough), compiled once. Decoding keeps only these,
/// borrowed from the record; every other field is skipped without being materialised.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    names: Vec<String>,
    index: FxHashMap<String, FieldId>,
    key: FieldId,
    time: FieldId,
    rules: Vec<(FieldId, FieldRule)>,
}

impl Schema {
    /// The fields `cfg` reads.
    pub fn new(cfg: &PipelineConfig) -> Self {
        let mut s = Self::default();
        s.key = s.intern(&cfg.source.key_field);
        s.time = s.intern(&cfg.source.event_time.field);
        for r in &cfg.validation.fields {
            let id = s.intern(&r.name);
            s.rules.push((id, r.clone()));
        }
        for w in &cfg.features.windows {
            s.intern_all(w.field.iter().chain(w.filter.iter().map(|f| &f.field)));
        }
        for q in &cfg.features.sequences {
            s.intern_all(std::iter::once(&q.field).chain(q.filter.iter().map(|f| &f.field)));
        }
        for e in &cfg.features.emitted {
            s.intern_all(e.field.iter().chain(e.filter.iter().map(|f| &f.field)));
        }
        for f in &cfg.model.signature.features {
            if let Some(field) = f.strip_prefix("event.") {
                s.intern(field);
            }
        }
        s.intern_all(cfg.postprocess.passthrough.iter());
        for l in &cfg.features.lookups {
            s.intern(&l.key);
        }
        s.intern_all(cfg.features.lookup_field_names().iter());
        s
    }

    /// A schema of just these fields (for feature tests).
    pub fn of(names: &[&str]) -> Self {
        let mut s = Self::default();
        for n in names {
            s.intern(n);
        }
        s
    }

    fn intern_all<'n>(&mut self, names: impl Iterator<Item = &'n String>) {
        for n in names {
            self.intern(n);
        }
    }

    fn intern(&mut self, name: &str) -> FieldId {
        if let Some(&id) = self.index.get(name) {
            return id;
        }
        self.names.push(name.to_owned());
        self.index.insert(name.to_owned(), self.names.len() - 1);
        self.names.len() - 1
    }

    /// The id of `name`, if the pipeline reads it.
    pub fn id(&self, name: &str) -> Option<FieldId> {
        self.index.get(name).copied()
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether the schema reads no field.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Field name of `id`.
    pub fn name(&self, id: FieldId) -> &str {
        &self.names[id]
    }

    /// Reads the schema's fields of a JSON object (other fields are skipped).
    pub fn parse<'a>(&self, text: &'a str) -> Result<Fields<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_str(text);
        let vals = FieldsSeed { schema: self }.deserialize(&mut de)?;
        de.end()?;
        Ok(Fields(vals))
    }
}

/// A field's value, borrowed from the record where possible.
#[derive(Clone, Debug, PartialEq)]
pub enum Val<'a> {
    /// `null`.
    Null,
    /// `true` / `false`.
    Bool(bool),
    /// A number; `int` when written without fraction or exponent.
    Num {
        /// Value.
        value: f64,
        /// Written as an integer.
        int: bool,
    },
    /// A string (unescaped).
    Str(Cow<'a, str>),
    /// An object or array.
    Nested,
}

/// A field as read: its value and its exact JSON text.
#[derive(Clone, Debug, PartialEq)]
pub struct Field<'a> {
    /// The value.
    pub val: Val<'a>,
    /// The JSON text of the value (copied verbatim into passthrough fields).
    pub raw: Cow<'a, str>,
}

impl<'a> Field<'a> {
    fn from_raw(raw: &'a str) -> Result<Self, String> {
        let raw = raw.trim();
        let val = match raw.as_bytes().first() {
            Some(b'"') if !raw.contains('\\') => Val::Str(Cow::Borrowed(&raw[1..raw.len() - 1])),
            Some(b'"') => Val::Str(Cow::Owned(serde_json::from_str::<String>(raw).map_err(|e| e.to_string())?)),
            Some(b't') => Val::Bool(true),
            Some(b'f') => Val::Bool(false),
            Some(b'n') => Val::Null,
            Some(b'{' | b'[') => Val::Nested,
            _ => Val::Num {
                value: raw.parse().map_err(|_| format!("bad number {raw}"))?,
                int: !raw.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')),
            },
        };
        Ok(Self { val, raw: Cow::Borrowed(raw) })
    }

    /// The value as table-key text: a string's content, a number's or boolean's JSON text.
    pub fn key_text(&self) -> Option<&str> {
        match &self.val {
            Val::Str(s) => Some(s),
            Val::Num { .. } | Val::Bool(_) => Some(&self.raw),
            Val::Null | Val::Nested => None,
        }
    }

    /// The number, if the value is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self.val {
            Val::Num { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// The schema's fields of one event, by [`FieldId`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fields<'a>(Vec<Option<Field<'a>>>);

impl<'a> Fields<'a> {
    /// The field `id`, if present in the event.
    pub fn get(&self, id: FieldId) -> Option<&Field<'a>> {
        self.0.get(id).and_then(Option::as_ref)
    }

    /// Sets (or clears) the field `id` (lookup fields joined into an event).
    pub fn set(&mut self, id: FieldId, field: Option<Field<'a>>) {
        if self.0.len() <= id {
            self.0.resize(id + 1, None);
        }
        self.0[id] = field;
    }
}

impl Val<'_> {
    /// The value, owning its string.
    pub fn into_owned(self) -> Val<'static> {
        match self {
            Val::Null => Val::Null,
            Val::Bool(b) => Val::Bool(b),
            Val::Num { value, int } => Val::Num { value, int },
            Val::Str(s) => Val::Str(Cow::Owned(s.into_owned())),
            Val::Nested => Val::Nested,
        }
    }
}

struct FieldsSeed<'s> {
    schema: &'s Schema,
}

impl<'de> DeserializeSeed<'de> for FieldsSeed<'_> {
    type Value = Vec<Option<Field<'de>>>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for FieldsSeed<'_> {
    type Value = Vec<Option<Field<'de>>>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut vals = vec![None; self.schema.names.len()];
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            match self.schema.index.get(k.as_ref()) {
                // An event's own field named like a lookup field is not read: the join sets it.
                Some(&id) if !k.starts_with(streamscore_crds::pipeline::LOOKUP_PREFIX) => {
                    let raw: &'de RawValue = map.next_value()?;
                    // Duplicate keys: the last one wins.
                    vals[id] = Some(Field::from_raw(raw.get()).map_err(serde::de::Error::custom)?);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(vals)
    }
}

/// An object key, borrowed unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// A decoded, validated event, borrowing from the record.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<'a> {
    /// Entity key (text form of the key field).
    pub key: Cow<'a, str>,
    /// Event time, epoch milliseconds.
    pub time: i64,
    /// The fields the pipeline reads.
    pub fields: Fields<'a>,
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
    /// Event-time field missing, unparsable, not finite or absurd.
    BadEventTime,
    /// Event time more than `source.maxFutureSkew` ahead of the worker's clock.
    FutureEventTime,
    /// A validation rule failed, a number read is not finite, or the key is longer than
    /// `source.maxKeyBytes`.
    Invalid,
    /// Older than watermark − allowed lateness.
    Late,
    /// The model failed on this event or gave it a score that is not a finite number.
    ScoringFailed,
    /// The output record would exceed the producer's `message.max.bytes`.
    OutputTooLarge,
}

impl Reason {
    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 10] = [
        Reason::NotUtf8,
        Reason::Malformed,
        Reason::Oversized,
        Reason::MissingKey,
        Reason::BadEventTime,
        Reason::FutureEventTime,
        Reason::Invalid,
        Reason::Late,
        Reason::ScoringFailed,
        Reason::OutputTooLarge,
    ];

    /// Stable text used in dead-letter headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotUtf8 => "not_utf8",
            Reason::Malformed => "malformed",
            Reason::Oversized => "oversized",
            Reason::MissingKey => "missing_key",
            Reason::BadEventTime => "bad_event_time",
            Reason::FutureEventTime => "future_event_time",
            Reason::Invalid => "invalid",
            Reason::Late => "late",
            Reason::ScoringFailed => "scoring_failed",
            Reason::OutputTooLarge => "output_too_large",
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
pub fn decode<'a>(cfg: &PipelineConfig, schema: &Schema, payload: Option<&'a [u8]>) -> Result<Event<'a>, Rejected> {
    let bytes = payload.unwrap_or_default();
    if bytes.len() > cfg.source.max_record_bytes as usize {
        return Err(reject(
            Reason::Oversized,
            format!("record is {} bytes, limit is {}", bytes.len(), cfg.source.max_record_bytes),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| reject(Reason::NotUtf8, e.to_string()))?;
    let fields = match schema.parse(text) {
        Ok(f) => f,
        Err(e) if e.is_data() && !text.trim_start().starts_with('{') => {
            return Err(reject(Reason::Malformed, "value is not a JSON object"))
        }
        Err(e) => return Err(reject(Reason::Malformed, e.to_string())),
    };
    let key_field = &cfg.source.key_field;
    let key = match fields.get(schema.key).map(|f| (&f.val, f.raw.as_ref())) {
        Some((Val::Str(s), _)) if !s.is_empty() => s.clone(),
        Some((Val::Num { .. }, raw)) => Cow::Owned(
            serde_json::from_str::<serde_json::Number>(raw).map_or_else(|_| raw.to_owned(), |n| n.to_string()),
        ),
        Some(_) => return Err(reject(Reason::MissingKey, format!("{key_field} is not a string or number"))),
        None => return Err(reject(Reason::MissingKey, format!("{key_field} is missing"))),
    };
    if key.len() > cfg.source.max_key_bytes as usize {
        return Err(reject(
            Reason::Invalid,
            format!("{key_field} is {} bytes, longer than maxKeyBytes {}", key.len(), cfg.source.max_key_bytes),
        ));
    }
    let et = &cfg.source.event_time;
    let time = match fields.get(schema.time) {
        None => return Err(reject(Reason::BadEventTime, format!("{} is missing", et.field))),
        Some(f) => parse_time(f, et.format).map_err(|d| reject(Reason::BadEventTime, format!("{}: {d}", et.field)))?,
    };
    if !(0..MAX_EVENT_TIME_MS).contains(&time) {
        return Err(reject(Reason::BadEventTime, format!("{}: {time} ms is outside 1970..2200", et.field)));
    }
    // A number beyond f64 (`1e400`) reads as ±infinity: it would poison sums and scores.
    for (id, f) in fields.0.iter().enumerate() {
        if let Some(Field { val: Val::Num { value, .. }, raw }) = f {
            if !value.is_finite() && id != schema.key && id != schema.time {
                return Err(reject(Reason::Invalid, format!("{}: {raw} is not a finite number", schema.name(id))));
            }
        }
    }
    for (id, rule) in &schema.rules {
        match fields.get(*id).map(|f| &f.val) {
            None | Some(Val::Null) if rule.required => {
                return Err(reject(Reason::Invalid, format!("{} is required", rule.name)));
            }
            None | Some(Val::Null) => {}
            Some(v) => {
                let ok = match rule.kind {
                    FieldType::String => matches!(v, Val::Str(_)),
                    FieldType::Number => matches!(v, Val::Num { .. }),
                    FieldType::Integer => matches!(v, Val::Num { int: true, value } if value.fract() == 0.0),
                    FieldType::Boolean => matches!(v, Val::Bool(_)),
                };
                if !ok {
                    return Err(reject(Reason::Invalid, format!("{} must be of type {:?}", rule.name, rule.kind)));
                }
            }
        }
    }
    Ok(Event { key, time, fields })
}

fn parse_time(f: &Field<'_>, format: TimeFormat) -> Result<i64, String> {
    // `1e400`, or `"NaN"` / `"inf"` in a string: `as i64` would make them 0 or i64::MAX.
    let finite = |v: f64| if v.is_finite() { Ok(v) } else { Err(format!("{} is not a finite number", f.raw)) };
    match (format, &f.val) {
        (TimeFormat::EpochMillis, Val::Num { value, int }) => {
            let value = finite(*value)?;
            Ok(if *int { f.raw.parse::<i64>().unwrap_or(value as i64) } else { value as i64 })
        }
        (TimeFormat::EpochSeconds, Val::Num { value, .. }) => Ok((finite(*value)? * 1000.0).round() as i64),
        (TimeFormat::Rfc3339, Val::Str(s)) => chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| d.timestamp_millis())
            .map_err(|e| format!("{s:?} is not RFC 3339: {e}")),
        (TimeFormat::EpochMillis | TimeFormat::EpochSeconds, Val::Str(s)) => {
            let v = finite(s.parse().map_err(|_| format!("{s:?} is not a number"))?)?;
            Ok(if format == TimeFormat::EpochSeconds { (v * 1000.0).round() as i64 } else { v as i64 })
        }
        _ => Err(format!("unexpected JSON type for {format:?}")),
    }
}

/// Rejects an event time more than `max_skew` ms ahead of `now` (the worker's clock, epoch ms):
/// accepted, it would move the partition's watermark that far ahead, and every later event of
/// the partition would be late.
pub fn check_not_future(time: i64, now: i64, max_skew: i64) -> Result<(), Rejected> {
    let limit = now.saturating_add(max_skew);
    if time <= limit {
        return Ok(());
    }
    Err(reject(
        Reason::FutureEventTime,
        format!(
            "event time {time} ({}) is {} ms ahead of the worker clock {now}; maxFutureSkew is {max_skew} ms",
            chrono::DateTime::from_timestamp_millis(time).map_or_else(String::new, |d| d.to_rfc3339()),
            time - now
        ),
    ))
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
        let cfg = cfg();
        decode(&cfg, &Schema::new(&cfg), Some(payload)).unwrap_err().reason
    }

    #[test]
    fn good_event_decodes() {
        let cfg = cfg();
        let schema = Schema::new(&cfg);
        let payload = br#"{"user":"u1","skipped":{"a":[1,2]},"ts":"2026-11-24T10:00:00.5Z","amount":3,"note":"a\"b"}"#;
        let e = decode(&cfg, &schema, Some(payload)).unwrap();
        assert_eq!(e.key, "u1");
        assert_eq!(e.time, 1_795_514_400_500);
        assert_eq!(e.fields.get(schema.id("amount").unwrap()).unwrap().val, Val::Num { value: 3.0, int: true });
        assert_eq!(e.fields.get(schema.id("note").unwrap()).unwrap().val, Val::Str("a\"b".into()));
        assert_eq!(e.fields.get(schema.id("note").unwrap()).unwrap().raw, r#""a\"b""#);
        assert!(schema.id("skipped").is_none());
        // A numeric key keeps its JSON number text; a later duplicate field wins.
        let e =
            decode(&cfg, &schema, Some(br#"{"user":42,"ts":"2026-11-24T10:00:00Z","amount":1,"amount":2.5}"#)).unwrap();
        assert_eq!(e.key, "42");
        assert_eq!(e.fields.get(schema.id("amount").unwrap()).unwrap().as_f64(), Some(2.5));
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
        assert_eq!(reason(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":1} trailing"#), Reason::Malformed);
        let cfg = cfg();
        assert_eq!(decode(&cfg, &Schema::new(&cfg), None).unwrap_err().reason, Reason::Malformed);
    }

    #[test]
    fn non_finite_numbers_are_invalid_and_non_finite_times_bad() {
        // `amount` is validated, `note` is optional: both are read, both must be finite.
        assert_eq!(reason(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":1e400}"#), Reason::Invalid);
        assert_eq!(reason(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":-1e400}"#), Reason::Invalid);
        let cfg = cfg();
        let schema = Schema::new(&cfg);
        let rej =
            decode(&cfg, &schema, Some(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":1e400}"#)).unwrap_err();
        assert!(rej.detail.contains("amount: 1e400"), "{rej:?}");
        // Large but finite numbers and tiny ones that round to 0 are fine.
        let e = decode(&cfg, &schema, Some(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":1e300}"#)).unwrap();
        assert_eq!(e.fields.get(schema.id("amount").unwrap()).unwrap().as_f64(), Some(1e300));
        decode(&cfg, &schema, Some(br#"{"user":"u","ts":"2026-11-24T10:00:00Z","amount":1e-400}"#)).unwrap();
        // A key written as a huge number is still just its text.
        let e = decode(&cfg, &schema, Some(br#"{"user":1e400,"ts":"2026-11-24T10:00:00Z","amount":1}"#)).unwrap();
        assert_eq!(e.key, "1e400");

        // Numeric event times: "NaN" used to become t = 0, 1e400 an absurd time.
        let mut millis = cfg.clone();
        millis.source.event_time.format = TimeFormat::EpochMillis;
        let mut secs = cfg.clone();
        secs.source.event_time.format = TimeFormat::EpochSeconds;
        for c in [&millis, &secs] {
            let schema = Schema::new(c);
            for ts in [r#""NaN""#, r#""nan""#, r#""inf""#, r#""-infinity""#, "1e400", "-1e400"] {
                let payload = format!(r#"{{"user":"u","ts":{ts},"amount":1}}"#);
                let rej = decode(c, &schema, Some(payload.as_bytes())).unwrap_err();
                assert_eq!(rej.reason, Reason::BadEventTime, "{ts} ({:?}): {rej:?}", c.source.event_time.format);
            }
            let ok =
                if c.source.event_time.format == TimeFormat::EpochSeconds { "1795514400" } else { "1795514400000" };
            let payload = format!(r#"{{"user":"u","ts":"{ok}","amount":1}}"#);
            assert_eq!(decode(c, &schema, Some(payload.as_bytes())).unwrap().time, 1_795_514_400_000);
        }
    }

    #[test]
    fn keys_longer_than_max_key_bytes_are_invalid() {
        let mut cfg = cfg();
        cfg.source.max_key_bytes = 8;
        let schema = Schema::new(&cfg);
        let at = |key: &str| {
            let payload = serde_json::json!({"user": key, "ts": "2026-11-24T10:00:00Z", "amount": 1}).to_string();
            decode(&cfg, &schema, Some(payload.as_bytes())).map(|e| e.key.into_owned())
        };
        assert_eq!(at("12345678").unwrap(), "12345678");
        let rej = at("123456789").unwrap_err();
        assert_eq!(rej.reason, Reason::Invalid);
        assert!(rej.detail.contains("9 bytes"), "{rej:?}");
        // Bytes, not characters: 3 × 3-byte characters.
        assert_eq!(at("€€€").unwrap_err().reason, Reason::Invalid);
        assert_eq!(at("€€").unwrap(), "€€");
    }

    #[test]
    fn event_times_beyond_the_future_skew_are_rejected() {
        let now = 1_796_000_000_000;
        let hour = 3_600_000;
        assert_eq!(check_not_future(now, now, hour), Ok(()));
        assert_eq!(check_not_future(now + hour, now, hour), Ok(()));
        assert_eq!(check_not_future(now - 365 * 24 * hour, now, hour), Ok(()));
        let rej = check_not_future(now + hour + 1, now, hour).unwrap_err();
        assert_eq!(rej.reason, Reason::FutureEventTime);
        assert_eq!(rej.reason.as_str(), "future_event_time");
        // 2199-01-01T00:00:00Z
        let rej = check_not_future(7_226_582_400_000, now, hour).unwrap_err();
        assert!(rej.detail.contains("2199-01-01T00:00:00+00:00"), "{rej:?}");
        assert_eq!(check_not_future(i64::MAX, i64::MAX - 1, hour), Ok(()));
    }
}
