//! Global lookup tables (`features.lookups`): rows read from compacted topics, joined into
//! each event by one of its fields (pure logic; the Kafka reader is `kafka::lookups`).
//!
//! ```text
//!  compacted topic ──► Tables::apply (key → row of the declared fields; null deletes)
//!                                 │
//!  event fields ──► Joins::enrich: fields[lookups.<table>.<field>] = row[field] (or absent)
//! ```
//!
//! A row is the latest record read for its key when the event is processed: the join is not
//! versioned by event time (`crds::pipeline::LookupTable`).

use std::sync::{Arc, RwLock};

use rustc_hash::FxHashMap;
use streamscore_crds::pipeline::{FeaturesConfig, LookupTable};

use crate::decode::{Field, FieldId, Fields, Schema};
use crate::metrics::{Metrics, TableLabel};

/// One row: the declared fields, in declaration order (`None` when the record lacks one).
type Row = Arc<[Option<Field<'static>>]>;

/// The rows of one table.
#[derive(Debug)]
pub struct Table {
    /// `features.lookups[].name`.
    pub name: String,
    /// `features.lookups[].topic`.
    pub topic: String,
    /// The declared fields, as a schema for reading the records' JSON values.
    schema: Schema,
    rows: RwLock<FxHashMap<Box<str>, Row>>,
}

/// What one record did to its table.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// A row written.
    Put,
    /// A row deleted (a null value).
    Deleted,
    /// Skipped: why (the row keeps its previous value).
    Rejected(String),
}

impl Table {
    fn new(def: &LookupTable) -> Self {
        let names: Vec<&str> = def.fields.iter().map(String::as_str).collect();
        Self { name: def.name.clone(), topic: def.topic.clone(), schema: Schema::of(&names), rows: RwLock::default() }
    }

    /// Applies one record of the table's topic: `key` (UTF-8 text), `value` a JSON object or
    /// none (a tombstone).
    pub fn apply(&self, key: Option<&[u8]>, value: Option<&[u8]>) -> Applied {
        let Some(key) = key else { return Applied::Rejected("the record has no key".into()) };
        let Ok(key) = std::str::from_utf8(key) else {
            return Applied::Rejected("the record key is not UTF-8 text".into());
        };
        let Some(value) = value else {
            self.rows.write().unwrap_or_else(|e| e.into_inner()).remove(key);
            return Applied::Deleted;
        };
        let text = match std::str::from_utf8(value) {
            Ok(t) => t,
            Err(_) => return Applied::Rejected(format!("the value of key {key:?} is not UTF-8 text")),
        };
        if !text.trim_start().starts_with('{') {
            return Applied::Rejected(format!("the value of key {key:?} is not a JSON object"));
        }
        let fields = match self.schema.parse(text) {
            Ok(f) => f,
            Err(e) => return Applied::Rejected(format!("the value of key {key:?} is not a JSON object: {e}")),
        };
        // A number beyond f64 (`1e400`) reads as ±infinity: it would poison sums and scores.
        for id in 0..self.schema.len() {
            if let Some(f) = fields.get(id).filter(|f| f.as_f64().is_some_and(|x| !x.is_finite())) {
                return Applied::Rejected(format!(
                    "the value of key {key:?}: {}: {} is not a finite number",
                    self.schema.name(id),
                    f.raw
                ));
            }
        }
        let row: Vec<Option<Field<'static>>> = (0..self.schema.len())
            .map(|id| fields.get(id).map(|f| Field { val: f.val.clone().into_owned(), raw: f.raw.to_string().into() }))
            .collect();
        self.rows.write().unwrap_or_else(|e| e.into_inner()).insert(key.into(), row.into());
        Applied::Put
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.rows.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn get(&self, key: &str) -> Option<Row> {
        self.rows.read().unwrap_or_else(|e| e.into_inner()).get(key).cloned()
    }
}

/// Every lookup table of a pipeline, shared by the reader (writes) and the engine (reads).
#[derive(Debug, Default)]
pub struct Tables {
    /// In `features.lookups` order.
    pub tables: Vec<Table>,
}

impl Tables {
    /// Empty tables for `features.lookups`.
    pub fn new(cfg: &FeaturesConfig) -> Self {
        Self { tables: cfg.lookups.iter().map(Table::new).collect() }
    }

    /// Whether the pipeline declares no table.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

/// How the engine joins the tables into an event: per table, the event field holding the key
/// and the event schema's ids of `lookups.<table>.<field>`.
#[derive(Debug)]
pub struct Joins {
    tables: Arc<Tables>,
    joins: Vec<Join>,
}

#[derive(Debug)]
struct Join {
    key: Option<FieldId>,
    targets: Vec<Option<FieldId>>,
    label: TableLabel,
}

impl Joins {
    /// The joins of `cfg` over `tables`, by the ids of `schema` (the event schema).
    pub fn new(cfg: &FeaturesConfig, schema: &Schema, tables: Arc<Tables>) -> Self {
        let joins = cfg
            .lookups
            .iter()
            .map(|l| Join {
                key: schema.id(&l.key),
                targets: l
                    .fields
                    .iter()
                    .map(|f| schema.id(&format!("{}{}.{f}", streamscore_crds::pipeline::LOOKUP_PREFIX, l.name)))
                    .collect(),
                label: TableLabel { table: l.name.clone() },
            })
            .collect();
        Self { tables, joins }
    }

    /// The shared tables.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// Sets every `lookups.<table>.<field>` of `fields` from the row its key names (absent
    /// when there is no such row). Counts misses in `metrics`.
    pub fn enrich(&self, fields: &mut Fields<'_>, metrics: &Metrics) {
        for (join, table) in self.joins.iter().zip(&self.tables.tables) {
            let row = join.key.and_then(|k| fields.get(k)).and_then(|f| f.key_text()).and_then(|k| table.get(k));
            if row.is_none() {
                metrics.lookup_misses.get_or_create(&join.label).inc();
            }
            for (i, target) in join.targets.iter().enumerate() {
                let Some(id) = *target else { continue };
                let value = row.as_ref().and_then(|r| r[i].clone());
                fields.set(id, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use streamscore_crds::pipeline::PipelineConfig;

    fn cfg() -> PipelineConfig {
        PipelineConfig::from_yaml(
            r#"
source: {bootstrapServers: "k:9092", topics: [in], keyField: user, eventTime: {field: ts}}
features:
  lookups:
    - {name: merchants, topic: merchant-tiers, key: merchant, fields: [tier, risk]}
    - {name: stores, topic: stores, key: store, fields: [region]}
model: {path: /m.onnx, sha256: "0000000000000000000000000000000000000000000000000000000000000000", version: v1,
        features: [lookups.merchants.risk], outputs: [{name: s}]}
postprocess: {passthrough: [lookups.merchants.tier, lookups.stores.region]}
sink: {topic: out, deadLetterTopic: dlq}
"#,
        )
        .unwrap()
    }

    #[test]
    fn rows_are_put_replaced_deleted_and_bad_records_leave_them_alone() {
        let t = Table::new(&cfg().features.lookups[0]);
        assert_eq!(t.apply(Some(b"m1"), Some(br#"{"tier": "high", "risk": 0.9, "x": {"y": 1}}"#)), Applied::Put);
        assert_eq!(t.get("m1").unwrap()[0].as_ref().unwrap().raw, "\"high\"");
        assert_eq!(t.get("m1").unwrap()[1].as_ref().unwrap().as_f64(), Some(0.9));
        // A later record replaces the whole row (a field it lacks is absent).
        assert_eq!(t.apply(Some(b"m1"), Some(br#"{"tier": "low"}"#)), Applied::Put);
        assert!(t.get("m1").unwrap()[1].is_none());
        for (key, value) in [
            (Some(&b"m1"[..]), Some(&b"not json"[..])),
            (Some(b"m1"), Some(b"[1, 2]")),
            (Some(b"m1"), Some(b"{\"tier\": ")),
            (Some(b"m1"), Some(&[0xff, 0xfe][..])),
            (Some(b"m1"), Some(br#"{"tier": "x", "risk": 1e400}"#)),
            (None, Some(b"{}")),
            (Some(&[0xff][..]), Some(b"{}")),
        ] {
            assert!(matches!(t.apply(key, value), Applied::Rejected(_)), "{value:?}");
        }
        assert_eq!(t.get("m1").unwrap()[0].as_ref().unwrap().raw, "\"low\"", "rejected records change nothing");
        assert_eq!(t.apply(Some(b"m1"), None), Applied::Deleted);
        assert!(t.is_empty());
    }

    #[test]
    fn events_read_the_row_their_key_field_names_as_text() {
        let cfg = cfg();
        let schema = Schema::new(&cfg);
        let tables = Arc::new(Tables::new(&cfg.features));
        let joins = Joins::new(&cfg.features, &schema, tables.clone());
        tables.tables[0].apply(Some(b"m1"), Some(br#"{"tier": "high", "risk": 3}"#));
        tables.tables[0].apply(Some(b"42"), Some(br#"{"tier": "numeric"}"#));
        tables.tables[1].apply(Some(b"s1"), Some(br#"{"region": "eu"}"#));
        let metrics = Metrics::new();
        let id = |n: &str| schema.id(n).unwrap();
        let joined = |event: &str| {
            let mut f = schema.parse(event).unwrap();
            joins.enrich(&mut f, &metrics);
            let text = |n: &str| f.get(id(n)).map(|x| x.raw.to_string());
            (text("lookups.merchants.tier"), text("lookups.merchants.risk"), text("lookups.stores.region"))
        };
        let s = |x: &str| Some(x.to_owned());
        assert_eq!(joined(r#"{"merchant": "m1", "store": "s1"}"#), (s("\"high\""), s("3"), s("\"eu\"")));
        assert_eq!(joined(r#"{"merchant": 42}"#), (s("\"numeric\""), None, None), "a number's JSON text");
        // An event's own field of that name never stands in for the table.
        assert_eq!(joined(r#"{"merchant": "m9", "lookups.merchants.tier": "forged"}"#), (None, None, None));
        // ... nor is it read at all (a number beyond f64 there is no reason to reject the event).
        assert!(schema
            .parse(r#"{"lookups.merchants.risk": 1e400}"#)
            .unwrap()
            .get(id("lookups.merchants.risk"))
            .is_none());
        assert_eq!(joined(r#"{"merchant": null}"#), (None, None, None));
        let text = metrics.encode();
        for miss in ["{table=\"merchants\"} 2", "{table=\"stores\"} 3"] {
            assert!(text.contains(&format!("streamscore_worker_lookup_misses_total{miss}")), "{text}");
        }
    }
}
