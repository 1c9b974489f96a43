//! Aggregates and values, the vocabulary of features and emitted windows (pure data, no I/O).
//!
//! A [`Scalar`] is a field value as kept in state; an [`Entry`] one event's value in a raw
//! list; an [`Agg`] the aggregate of a bucket or of an emitted window; a [`FeatureValue`] what a
//! feature evaluates to. Windowed features ([`crate::features`]) and emitted windows
//! ([`crate::emitted`]) are built from these and nothing else of each other.

use std::collections::BTreeSet;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use streamscore_crds::pipeline::Aggregation;

use crate::codec::{put_f64, put_i64, put_str, put_u64, Reader};
use crate::json;

/// A field value kept in state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    /// A number.
    Num(f64),
    /// Text (strings and booleans). Up to 24 bytes are kept inline: most kept text (actions,
    /// categories, flags) is short, and an inline string costs no allocation and no pointer to
    /// follow when a key's state is encoded or evaluated.
    Str(CompactString),
}

impl Scalar {
    pub(crate) fn text(&self) -> String {
        match self {
            Scalar::Num(n) => format_num(*n),
            Scalar::Str(s) => s.to_string(),
        }
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            Scalar::Num(n) => json::num(*n),
            Scalar::Str(s) => Value::String(s.to_string()),
        }
    }
}

/// A number as filter and distinct-count text: integers without a fraction (`3`, not `3.0`).
pub(crate) fn format_num(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    }
}

/// One event as kept in a feature's raw list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) time: i64,
    pub(crate) seq: u64,
    pub(crate) val: Scalar,
}

/// Aggregate of the events of one bucket (or of one emitted window). Kept small (24 bytes: a
/// key's buckets are most of its state in memory): the extremes, `last` and distinct values
/// live behind a pointer that only `min`, `max`, `last` and `distinctCount` features allocate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Agg {
    pub(crate) count: u64,
    sum: f64,
    extra: Option<Box<AggExtra>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct AggExtra {
    min: Option<f64>,
    max: Option<f64>,
    last: Option<(i64, u64, Scalar)>,
    distinct: BTreeSet<String>,
}

impl AggExtra {
    fn offer_last(&mut self, time: i64, seq: u64, val: &Scalar) {
        if self.last.as_ref().is_none_or(|(t, s, _)| (time, seq) > (*t, *s)) {
            self.last = Some((time, seq, val.clone()));
        }
    }
}

impl Agg {
    fn extra_mut(&mut self) -> &mut AggExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    pub(crate) fn add(&mut self, e: &Entry, kind: Aggregation) {
        self.count += 1;
        match kind {
            Aggregation::Count => {}
            Aggregation::Sum | Aggregation::Avg => {
                if let Scalar::Num(n) = e.val {
                    self.sum += n;
                }
            }
            // Only these read the extremes: the others keep them unset (nothing to store).
            Aggregation::Min | Aggregation::Max => {
                if let Scalar::Num(n) = e.val {
                    self.sum += n;
                    let x = self.extra_mut();
                    x.min = Some(x.min.map_or(n, |m| m.min(n)));
                    x.max = Some(x.max.map_or(n, |m| m.max(n)));
                }
            }
            Aggregation::DistinctCount => {
                self.extra_mut().distinct.insert(e.val.text());
            }
            Aggregation::Last => self.extra_mut().offer_last(e.time, e.seq, &e.val),
        }
    }

    pub(crate) fn merge(&mut self, o: &Agg) {
        self.count += o.count;
        self.sum += o.sum;
        if let Some(ox) = &o.extra {
            let x = self.extra_mut();
            if let Some(m) = ox.min {
                x.min = Some(x.min.map_or(m, |v| v.min(m)));
            }
            if let Some(m) = ox.max {
                x.max = Some(x.max.map_or(m, |v| v.max(m)));
            }
            if let Some((t, s, v)) = &ox.last {
                x.offer_last(*t, *s, v);
            }
            x.distinct.extend(ox.distinct.iter().cloned());
        }
    }

    pub(crate) fn value(&self, kind: Aggregation) -> FeatureValue {
        let n = |x: f64| FeatureValue::Num(x);
        let extra = self.extra.as_deref();
        match kind {
            Aggregation::Count => n(self.count as f64),
            Aggregation::Sum => n(self.sum),
            Aggregation::Avg => n(if self.count == 0 { 0.0 } else { self.sum / self.count as f64 }),
            Aggregation::Min => n(extra.and_then(|x| x.min).unwrap_or(0.0)),
            Aggregation::Max => n(extra.and_then(|x| x.max).unwrap_or(0.0)),
            Aggregation::DistinctCount => n(extra.map_or(0, |x| x.distinct.len()) as f64),
            Aggregation::Last => match extra.and_then(|x| x.last.as_ref()) {
                Some((_, _, Scalar::Num(x))) => n(*x),
                Some((_, _, Scalar::Str(s))) => FeatureValue::Text(s.to_string()),
                None => FeatureValue::Null,
            },
        }
    }
}

// The stored form (see `crate::record` for the whole record). Sizes matter: every changed key is
// written at every commit.

/// `Scalar` tags: an integral number in ±2^53 as a zigzag varint (counts are 1 byte), any other
/// number as its 8 bytes, text as a length-prefixed string.
const NUM_INT: u8 = 0;
const NUM_F64: u8 = 1;
const STR: u8 = 2;

impl Scalar {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Scalar::Num(n)
                if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 && n.to_bits() != (-0.0f64).to_bits() =>
            {
                out.push(NUM_INT);
                put_i64(out, *n as i64);
            }
            Scalar::Num(n) => {
                out.push(NUM_F64);
                put_f64(out, *n);
            }
            Scalar::Str(s) => {
                out.push(STR);
                put_str(out, s);
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        match r.u8("value")? {
            NUM_INT => Ok(Scalar::Num(r.i64("value")? as f64)),
            NUM_F64 => Ok(Scalar::Num(r.f64("value")?)),
            STR => Ok(Scalar::Str(r.str_ref("value")?.into())),
            t => Err(format!("value: unknown tag {t}")),
        }
    }
}

/// A list of entries sorted by (time, seq): count, then per entry the time and the arrival
/// number as differences from the previous entry's (the first from 0), and the value.
pub(crate) fn encode_entries(out: &mut Vec<u8>, entries: &[Entry]) {
    put_u64(out, entries.len() as u64);
    let (mut t, mut s) = (0i64, 0u64);
    for e in entries {
        put_i64(out, e.time.wrapping_sub(t));
        put_i64(out, e.seq.wrapping_sub(s) as i64);
        e.val.encode(out);
        (t, s) = (e.time, e.seq);
    }
}

pub(crate) fn decode_entries(r: &mut Reader<'_>) -> Result<Vec<Entry>, String> {
    let n = r.len("entries", 3)?;
    let mut v = Vec::with_capacity(n);
    let (mut t, mut s) = (0i64, 0u64);
    for _ in 0..n {
        t = t.wrapping_add(r.i64("entry time")?);
        s = s.wrapping_add(r.i64("entry seq")? as u64);
        v.push(Entry { time: t, seq: s, val: Scalar::decode(r)? });
    }
    Ok(v)
}

// `Agg` flags: which fields follow the count.
const HAS_SUM: u8 = 1;
const HAS_MIN: u8 = 2;
const HAS_MAX: u8 = 4;
const MAX_IS_MIN: u8 = 8;
const HAS_LAST: u8 = 16;
const HAS_DISTINCT: u8 = 32;

impl Agg {
    /// A flags byte, the count, then only the fields set: a count bucket is 2 bytes.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let extra = self.extra.as_deref();
        let last = extra.and_then(|x| x.last.as_ref());
        let distinct = extra.map(|x| &x.distinct).filter(|d| !d.is_empty());
        let (min, max) = extra.map_or((None, None), |x| (x.min, x.max));
        let same = matches!((min, max), (Some(a), Some(b)) if a.to_bits() == b.to_bits());
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        let flags = flag(self.sum.to_bits() != 0, HAS_SUM)
            | flag(min.is_some(), HAS_MIN)
            | flag(max.is_some(), HAS_MAX)
            | flag(same, MAX_IS_MIN)
            | flag(last.is_some(), HAS_LAST)
            | flag(distinct.is_some(), HAS_DISTINCT);
        out.push(flags);
        put_u64(out, self.count);
        if flags & HAS_SUM != 0 {
            put_f64(out, self.sum);
        }
        if let Some(m) = min {
            put_f64(out, m);
        }
        if let (Some(m), false) = (max, same) {
            put_f64(out, m);
        }
        if let Some((t, s, v)) = last {
            put_i64(out, *t);
            put_u64(out, *s);
            v.encode(out);
        }
        if let Some(distinct) = distinct {
            put_u64(out, distinct.len() as u64);
            for d in distinct {
                put_str(out, d);
            }
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let flags = r.u8("aggregate")?;
        if flags & !(HAS_SUM | HAS_MIN | HAS_MAX | MAX_IS_MIN | HAS_LAST | HAS_DISTINCT) != 0 {
            return Err(format!("aggregate: unknown flags {flags:#04x}"));
        }
        let count = r.u64("aggregate count")?;
        let sum = if flags & HAS_SUM != 0 { r.f64("aggregate sum")? } else { 0.0 };
        let min = if flags & HAS_MIN != 0 { Some(r.f64("aggregate min")?) } else { None };
        let max = match (flags & HAS_MAX != 0, flags & MAX_IS_MIN != 0) {
            (false, _) => None,
            (true, true) => Some(min.ok_or("aggregate: max equal to an absent min")?),
            (true, false) => Some(r.f64("aggregate max")?),
        };
        let mut extra: Option<Box<AggExtra>> = None;
        if min.is_some() || max.is_some() {
            extra = Some(Box::new(AggExtra { min, max, ..AggExtra::default() }));
        }
        if flags & HAS_LAST != 0 {
            let last = (r.i64("aggregate last")?, r.u64("aggregate last")?, Scalar::decode(r)?);
            extra.get_or_insert_with(Box::default).last = Some(last);
        }
        if flags & HAS_DISTINCT != 0 {
            let n = r.len("distinct values", 1)?;
            let x = extra.get_or_insert_with(Box::default);
            for _ in 0..n {
                x.distinct.insert(r.str("distinct value")?);
            }
        }
        Ok(Self { count, sum, extra })
    }
}

/// A computed feature value.
#[derive(Clone, Debug, PartialEq)]
pub enum FeatureValue {
    /// Numeric value.
    Num(f64),
    /// Text value (`last` of a string field).
    Text(String),
    /// A sequence, oldest first.
    Seq(Vec<Scalar>),
    /// No value (`last` with no event).
    Null,
}

impl FeatureValue {
    /// The value as a model input: numbers as they are, a sequence as its length, otherwise 0.
    pub fn as_model_input(&self) -> f32 {
        match self {
            FeatureValue::Num(x) => *x as f32,
            FeatureValue::Seq(v) => v.len() as f32,
            _ => 0.0,
        }
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            FeatureValue::Num(x) => json::num(*x),
            FeatureValue::Text(s) => Value::String(s.clone()),
            FeatureValue::Seq(v) => Value::Array(v.iter().map(Scalar::to_json).collect()),
            FeatureValue::Null => Value::Null,
        }
    }

    /// Appends the JSON form to `o` (same text as [`FeatureValue::to_json`]).
    pub fn write_json(&self, o: &mut Vec<u8>) {
        match self {
            FeatureValue::Num(x) => json::write_f64(o, *x),
            FeatureValue::Text(s) => json::write_str(o, s),
            FeatureValue::Seq(v) => {
                o.push(b'[');
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        o.push(b',');
                    }
                    match x {
                        Scalar::Num(n) => json::write_f64(o, *n),
                        Scalar::Str(s) => json::write_str(o, s),
                    }
                }
                o.push(b']');
            }
            FeatureValue::Null => o.extend_from_slice(b"null"),
        }
    }
}
