//! Aggregates and values, the vocabulary of features and emitted windows (pure data, no I/O).
//!
//! A [`Scalar`] is a field value as kept in state; an [`Entry`] one event's value in a raw
//! list; an [`Agg`] the aggregate of a bucket or of an emitted window; a [`FeatureValue`] what a
//! feature evaluates to. Windowed features ([`crate::features`]) and emitted windows
//! ([`crate::emitted`]) are built from these and nothing else of each other.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use streamscore_crds::pipeline::Aggregation;

use crate::json;

/// A field value kept in state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Scalar {
    /// A number.
    Num(f64),
    /// Text (strings and booleans).
    Str(String),
}

impl Scalar {
    pub(crate) fn text(&self) -> String {
        match self {
            Scalar::Num(n) => format_num(*n),
            Scalar::Str(s) => s.clone(),
        }
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            Scalar::Num(n) => json::num(*n),
            Scalar::Str(s) => Value::String(s.clone()),
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

/// Aggregate of the events of one bucket (or of one emitted window). Kept small (56 bytes): `last` and distinct values
/// live behind a pointer that only `last` and `distinctCount` features allocate.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Agg {
    pub(crate) count: u64,
    sum: f64,
    min: Option<f64>,
    max: Option<f64>,
    extra: Option<Box<AggExtra>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct AggExtra {
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
            Aggregation::Sum | Aggregation::Avg | Aggregation::Min | Aggregation::Max => {
                if let Scalar::Num(n) = e.val {
                    self.sum += n;
                    self.min = Some(self.min.map_or(n, |m| m.min(n)));
                    self.max = Some(self.max.map_or(n, |m| m.max(n)));
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
        if let Some(m) = o.min {
            self.min = Some(self.min.map_or(m, |x| x.min(m)));
        }
        if let Some(m) = o.max {
            self.max = Some(self.max.map_or(m, |x| x.max(m)));
        }
        if let Some(ox) = &o.extra {
            let x = self.extra_mut();
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
            Aggregation::Min => n(self.min.unwrap_or(0.0)),
            Aggregation::Max => n(self.max.unwrap_or(0.0)),
            Aggregation::DistinctCount => n(extra.map_or(0, |x| x.distinct.len()) as f64),
            Aggregation::Last => match extra.and_then(|x| x.last.as_ref()) {
                Some((_, _, Scalar::Num(x))) => n(*x),
                Some((_, _, Scalar::Str(s))) => FeatureValue::Text(s.clone()),
                None => FeatureValue::Null,
            },
        }
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
