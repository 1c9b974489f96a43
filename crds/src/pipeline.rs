//! The worker pipeline configuration: what a `streamscore-worker` reads at start-up.
//!
//! The operator renders exactly this type (from a `TenantModel`) into the
//! `<name>-pipeline` ConfigMap; the worker parses it, validates it once with
//! [`PipelineConfig::validate`] and passes it around as `Arc<PipelineConfig>`.
//!
//! ```text
//!  source ──► validation ──► features ──► model ──► postprocess ──► sink
//!  (Kafka)    (types)        (RocksDB)    (ONNX)    (label)         (Kafka + dead letters)
//! ```
//!
//! # Semantics (the tests and the `kubectl explain` text agree with these)
//! - A trailing-window feature of size W evaluated for an event with event time t covers
//!   the events of the same key already processed, plus this one, whose event time lies
//!   in (t − W, t]. Events that arrived earlier but carry an event time later than t are
//!   not counted. With a bucket resolution r (default: W/60, at least 1 s, at most 1 h), the
//!   window is widened to start at the bucket boundary: it covers the buckets
//!   [floor((t − W)/r)·r + r, …] up to the bucket of t — i.e. every event whose bucket
//!   start lies in (floor((t−W)/r)·r, t]. With r = 1 ms the rule is exact.
//! - A sequence feature holds the last N values, ordered by event time (ties by arrival),
//!   of events with event time in (t − lookback, t].
//! - An emitted window (`features.emitted`) of size S and advance A is aligned to the Unix
//!   epoch: window k covers event times [k·A, k·A + S). Every accepted event of a key counts
//!   in every window of that key containing its event time. A key's window is written once to
//!   `sink.featureTopic` when the partition's horizon (watermark − `allowedLateness`) reaches
//!   its end: from then on no accepted event can fall into it. Windows without events are not
//!   written. Emitted windows are not model inputs.
//! - Watermark per partition = max event time seen − `maxOutOfOrderness`. An event is late
//!   when its event time is below watermark − `allowedLateness`; late events go to the
//!   dead-letter topic with reason `late` (or are dropped, per `lateEvents`) and never change
//!   state.
//! - An event whose event time is more than `maxFutureSkew` ahead of the worker's clock goes to
//!   the dead-letter topic with reason `future_event_time` and changes neither state nor the
//!   watermark.
//! - Per key, values never depend on which other keys share the partition.
//! - A lookup table (`features.lookups`) is a compacted topic every worker reads in full before
//!   it takes partitions. An event's `lookups.<table>.<field>` is the field of the table's row
//!   whose record key equals the event's `key` field (as text), as the worker holds it when the
//!   event is processed: the latest value read so far, not versioned by event time. No row (or
//!   no such field in it) reads as an absent field.

use std::collections::{BTreeMap, BTreeSet};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;

/// Largest `source.maxRecordBytes` a TenantModel may set (16 MiB).
pub const MAX_RECORD_BYTES: u32 = 16 * 1024 * 1024;

/// Largest sequence length a sequence feature may keep.
pub const MAX_SEQUENCE_LENGTH: u32 = 4096;

/// Complete worker configuration (the rendered pipeline file).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PipelineConfig {
    /// Where events come from.
    pub source: SourceConfig,
    /// Field checks applied to every decoded event; failures are dead-lettered.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Streaming features kept per entity key.
    #[serde(default)]
    pub features: FeaturesConfig,
    /// The ONNX model and how features map to its input.
    pub model: ModelConfig,
    /// Turning scores into labels and choosing what the output record carries.
    #[serde(default)]
    pub postprocess: PostprocessConfig,
    /// Where results and dead letters go.
    pub sink: SinkConfig,
    /// Process-local settings (state directory, HTTP address).
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Checkpoints of the state in an object store, and what a worker does when it is assigned
    /// a partition whose state it does not hold.
    #[serde(default)]
    pub state: StateConfig,
    /// Shadow mode, for the candidate of a blue/green upgrade (set by the operator): outputs
    /// go to the shadow topics, and after the cut-over, per input partition, from the live-from
    /// offset on to the `sink` topics. Absent: every output goes to `sink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowConfig>,
}

/// Where a blue/green candidate writes, and from which input offsets on it writes live.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShadowConfig {
    /// Topic for scored records while in shadow.
    pub topic: String,
    /// Topic for dead letters while in shadow.
    pub dead_letter_topic: String,
    /// Topic for emitted windows while in shadow (when `sink.featureTopic` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_topic: Option<String>,
    /// The cut-over barrier: per input topic and partition, the first input offset whose
    /// outputs go to the `sink` topics (earlier offsets' outputs go to the shadow topics; a
    /// partition not listed is live from offset 0). Absent: still in shadow, nothing is live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_from: Option<BTreeMap<String, BTreeMap<i32, i64>>>,
}

impl ShadowConfig {
    /// Whether the output of input `offset` of `topic`/`partition` is live.
    pub fn is_live(&self, topic: &str, partition: i32, offset: i64) -> bool {
        match &self.live_from {
            None => false,
            Some(b) => offset >= b.get(topic).and_then(|p| p.get(&partition)).copied().unwrap_or(0),
        }
    }
}

/// Kafka input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SourceConfig {
    /// Kafka bootstrap servers, `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// Input topics (at most 64). They must be keyed by the entity key; all must have the same
    /// partition count.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$")))]
    pub topics: Vec<String>,
    /// Consumer group id. The operator sets it to `streamscore.<namespace>.<name>` when empty.
    #[serde(default)]
    pub group_id: String,
    /// Where a new consumer group starts reading.
    #[serde(default)]
    pub start_from: StartPosition,
    /// Epoch-millisecond timestamp to start from when `startFrom` is `timestamp` (required
    /// then): each partition starts at its first record whose Kafka timestamp is at or after
    /// it, or at the end when there is none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp_ms: Option<i64>,
    /// Record value format. Only `json` today.
    #[serde(default)]
    pub format: EventFormat,
    /// Field holding the entity key (e.g. `user_id`). Events without it are dead-lettered.
    pub key_field: String,
    /// Field and format of the event time.
    pub event_time: EventTimeConfig,
    /// How far behind the latest event time an event may arrive and still count as in order.
    /// Watermark = max event time seen in the partition − this.
    #[serde(default = "default_out_of_orderness")]
    pub max_out_of_orderness: Duration,
    /// Extra time after the watermark during which an event is still accepted.
    #[serde(default)]
    pub allowed_lateness: Duration,
    /// What to do with late events: `deadLetter` (default) or `drop`. Either way they never change state.
    #[serde(default)]
    pub late_events: LatePolicy,
    /// Records larger than this many bytes are dead-lettered with reason `oversized`. At most
    /// the producer's `message.max.bytes` (`sink.properties`, default 1000000) minus 16384 bytes
    /// kept for the dead-letter key and headers, and at most 16 MiB. Default 983040 (960 KiB).
    #[serde(default = "default_max_record_bytes")]
    #[schemars(range(min = 1, max = MAX_RECORD_BYTES))]
    pub max_record_bytes: u32,
    /// Events whose event time is more than this ahead of the worker's clock are dead-lettered
    /// with reason `future_event_time` and change neither state nor the watermark (one event
    /// dated years ahead would otherwise make every later event of its partition late).
    /// Default 1h.
    #[serde(default = "default_max_future_skew")]
    pub max_future_skew: Duration,
    /// Entity keys (the text of `keyField`) longer than this many bytes are dead-lettered with
    /// reason `invalid`. 1-4096, default 1024.
    #[serde(default = "default_max_key_bytes")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_key_bytes: u32,
    /// Extra librdkafka consumer properties (e.g. `security.protocol`). Secrets come from
    /// files or environment variables (`${env:NAME}`, `${file:/path}`), never inline. They
    /// override streamscore's defaults, e.g. `fetch.wait.max.ms: "1"` for the lowest latency at
    /// low rates (default 5, with `fetch.min.bytes` 65536). At most 64.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "x-kubernetes-validations" = [{
            "rule": "self.all(k, !(k in ['sasl.password', 'sasl.oauthbearer.client.secret', 'sasl.oauthbearer.config', 'ssl.key.password', 'ssl.keystore.password', 'ssl.key.pem']) || self[k].startsWith('${file:') || self[k].startsWith('${env:'))",
            "message": "secret Kafka properties (sasl.password, sasl.oauthbearer.client.secret, sasl.oauthbearer.config, ssl.key.password, ssl.keystore.password, ssl.key.pem) must be ${file:/path} or ${env:NAME} references, never inline values"
        }]
    ))]
    pub properties: BTreeMap<String, String>,
}

fn default_out_of_orderness() -> Duration {
    Duration::from_secs(5)
}

/// librdkafka's default producer `message.max.bytes`: the largest record the worker writes
/// unless `sink.properties` sets another value.
pub const DEFAULT_MESSAGE_MAX_BYTES: u32 = 1_000_000;

/// Bytes of every produced record kept for the key, headers and framing: an input record of at
/// most `message.max.bytes` minus this is dead-lettered whole.
pub const RECORD_OVERHEAD_RESERVE: u32 = 16 * 1024;

/// Largest `source.maxKeyBytes`.
pub const MAX_KEY_BYTES: u32 = 4096;

fn default_max_record_bytes() -> u32 {
    960 * 1024
}

fn default_max_future_skew() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_key_bytes() -> u32 {
    1024
}

/// Where a consumer group without committed offsets starts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartPosition {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// Only records produced after the worker starts.
    Latest,
    /// Per partition, the first record whose Kafka record timestamp is at or after
    /// `startTimestampMs` (e.g. to replay the last 7 days into a new pipeline). Applies only to
    /// partitions the group has never committed.
    Timestamp,
}

/// Record value format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EventFormat {
    /// One JSON object per record value (UTF-8).
    #[default]
    Json,
}

/// What happens to late events.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LatePolicy {
    /// Send to the dead-letter topic with reason `late`.
    #[default]
    DeadLetter,
    /// Count and drop.
    Drop,
}

/// Event-time extraction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventTimeConfig {
    /// Field holding the event time.
    pub field: String,
    /// Encoding of the field.
    #[serde(default)]
    pub format: TimeFormat,
}

/// Encoding of an event-time field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum TimeFormat {
    /// Integer milliseconds since the Unix epoch.
    #[default]
    EpochMillis,
    /// Seconds since the Unix epoch (integer or fractional).
    EpochSeconds,
    /// An RFC 3339 string such as `2026-11-24T10:00:00Z`.
    Rfc3339,
}

/// Field checks.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValidationConfig {
    /// Fields and their expected types. A missing required field or a wrong type
    /// dead-letters the event with reason `invalid`. At most 256.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub fields: Vec<FieldRule>,
}

/// One field check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FieldRule {
    /// Field name (top-level JSON key).
    pub name: String,
    /// Expected JSON type.
    #[serde(rename = "type")]
    pub kind: FieldType,
    /// Whether the field must be present (default true). An optional field that is
    /// present must still have the declared type.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
}

/// JSON value types a field may be required to have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum FieldType {
    /// A JSON string.
    String,
    /// A JSON number.
    Number,
    /// A JSON integer.
    Integer,
    /// `true` or `false`.
    Boolean,
}

/// Streaming features.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeaturesConfig {
    /// Trailing-window aggregates evaluated as of each event (at most 256).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub windows: Vec<WindowFeature>,
    /// Last-N value sequences within a lookback (at most 64).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub sequences: Vec<SequenceFeature>,
    /// Tumbling or hopping window aggregates written to `sink.featureTopic` when each window
    /// closes (not model inputs; at most 64).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub emitted: Vec<EmittedWindow>,
    /// Global lookup tables joined into each event (at most 16), e.g. a merchant's risk tier
    /// keyed by the event's `merchant` field. Their fields are read as
    /// `lookups.<table>.<field>` wherever an event field can be named: window, sequence and
    /// emitted `field` and `filter.field`, `model.features`, `postprocess.passthrough`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub lookups: Vec<LookupTable>,
}

/// Largest number of lookup tables of one pipeline.
pub const MAX_LOOKUP_TABLES: usize = 16;

/// Largest number of fields read from one lookup table.
pub const MAX_LOOKUP_FIELDS: usize = 64;

/// Prefix of the field names that read a lookup table: `lookups.<table>.<field>`.
pub const LOOKUP_PREFIX: &str = "lookups.";

/// A global table: a compacted Kafka topic whose records are keyed by the table key (UTF-8
/// text) with a JSON object as value (a null value deletes the row). Every worker reads all of
/// its partitions from the beginning and is not ready, and takes no input partitions, until it
/// has read up to the end offsets it found at start; it then keeps reading updates. An event
/// reads the row whose key equals its `key` field as text (a string's content, a number's or
/// boolean's JSON text): the latest row read so far when the event is processed (not
/// versioned by event time; a replay after a restart may see a newer row). A record whose value
/// is not a JSON object, or holds a number beyond f64 in a kept field, is skipped (the row keeps
/// its previous value) and counted in `streamscore_worker_lookup_records_rejected_total`.
/// Partitions added to the topic later are read after the worker restarts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LookupTable {
    /// Table name (1-63 letters, digits or underscores, unique among lookups): its fields are
    /// `lookups.<name>.<field>`.
    pub name: String,
    /// The compacted topic holding the table, on the source's Kafka cluster (read with
    /// `source.properties`).
    pub topic: String,
    /// The event field whose value is the table key, e.g. `merchant`.
    pub key: String,
    /// The top-level fields of the table's JSON values that are kept (1-64).
    #[schemars(length(min = 1, max = 64))]
    pub fields: Vec<String>,
}

impl FeaturesConfig {
    /// Every `lookups.<table>.<field>` name the tables declare.
    pub fn lookup_field_names(&self) -> Vec<String> {
        self.lookups
            .iter()
            .flat_map(|l| l.fields.iter().map(move |f| format!("{LOOKUP_PREFIX}{}.{f}", l.name)))
            .collect()
    }

    /// What decides the state of a key: these features with only the lookup tables that
    /// state features (windows, sequences, emitted windows) read. Lookup tables read only as
    /// model inputs or passthrough fields leave state alone.
    pub fn state_view(&self) -> FeaturesConfig {
        let mut fields = BTreeSet::new();
        for w in &self.windows {
            fields.extend(w.field.iter().chain(w.filter.iter().map(|f| &f.field)));
        }
        for q in &self.sequences {
            fields.extend(std::iter::once(&q.field).chain(q.filter.iter().map(|f| &f.field)));
        }
        for e in &self.emitted {
            fields.extend(e.field.iter().chain(e.filter.iter().map(|f| &f.field)));
        }
        let read = |l: &LookupTable| {
            let prefix = format!("{LOOKUP_PREFIX}{}.", l.name);
            fields.iter().any(|f| f.starts_with(&prefix))
        };
        let mut v = self.clone();
        v.lookups.retain(read);
        v
    }
}

/// Largest number of buckets of one window feature (window ÷ resolution).
pub const MAX_BUCKETS_PER_WINDOW: u64 = 100_000;

/// Largest number of windows of one emitted feature that contain a given instant (size ÷ advance).
pub const MAX_WINDOWS_PER_EVENT: u64 = 1000;

/// A windowed aggregate written to `sink.featureTopic` when its window closes, e.g. "spend per
/// user per hour". Windows are aligned to the Unix epoch: window k covers event times
/// [k·advance, k·advance + size). Every accepted event of a key counts in every window of the
/// key that contains its event time (with advance < size, in ceil(size/advance) windows).
/// A key's window is emitted once, when the partition's horizon (max event time −
/// `maxOutOfOrderness` − `allowedLateness`) reaches or passes the window end; late events
/// never count. Windows without counted events are not emitted. The record is keyed by the
/// entity key; its JSON value is `{"key", "feature", "windowStart", "windowEnd", "value",
/// "count"}` (window bounds in epoch milliseconds, `count` = events counted). Delivery is
/// at-least-once: after a crash a window may be written again, with the same value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EmittedWindow {
    /// Feature name, unique among all features; the `feature` field of the emitted records.
    pub name: String,
    /// Aggregation over the events in the window (as for trailing windows).
    pub aggregation: Aggregation,
    /// Numeric (or, for `distinctCount` and `last`, any) field aggregated. Not used by `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Window size S: each window covers event times [start, start + S).
    pub size: Duration,
    /// Distance between consecutive window starts, 0 < advance ≤ size. Default: the size
    /// (tumbling windows). Smaller: hopping windows that overlap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advance: Option<Duration>,
    /// Only events matching this filter count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
}

impl EmittedWindow {
    /// The advance in effect (the size for tumbling windows).
    pub fn effective_advance(&self) -> Duration {
        self.advance.unwrap_or(self.size)
    }
}

/// A trailing-window aggregate, e.g. "sum of `amount` in the last 24h where `action == purchase`".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WindowFeature {
    /// Feature name, unique among all features; the model's `features` list refers to it.
    pub name: String,
    /// Aggregation over the events in the window.
    pub aggregation: Aggregation,
    /// Numeric (or, for `distinctCount` and `last`, any) field aggregated. Not used by `count`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Window length W: the feature covers event times in (t − W, t].
    pub window: Duration,
    /// Bucket resolution r (state is kept per bucket). Default: W/60 clamped to [1s, 1h].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Duration>,
    /// Only events matching this filter count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
}

impl WindowFeature {
    /// The bucket resolution in effect.
    pub fn effective_resolution(&self) -> Duration {
        self.resolution.unwrap_or_else(|| {
            let w = self.window.as_millis() / 60;
            Duration::from_millis(w.clamp(1_000, 3_600_000).min(self.window.as_millis().max(1)))
        })
    }
}

/// Aggregations over a window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Aggregation {
    /// Number of matching events.
    Count,
    /// Sum of the field.
    Sum,
    /// Mean of the field (0 when no event).
    Avg,
    /// Minimum of the field (0 when no event).
    Min,
    /// Maximum of the field (0 when no event).
    Max,
    /// Number of distinct values of the field.
    DistinctCount,
    /// Value of the field on the latest event (by event time) in the window.
    Last,
}

/// Equality filter on one field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Filter {
    /// Field compared.
    pub field: String,
    /// The event matches when the field's value, as text, is one of these (at most 256).
    #[schemars(length(max = 256))]
    pub one_of: Vec<String>,
}

/// A last-N sequence, e.g. "the user's last 16 actions in 90 days".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SequenceFeature {
    /// Feature name, unique among all features.
    pub name: String,
    /// Field whose values are collected.
    pub field: String,
    /// N: how many values are kept (1..=4096).
    pub length: u32,
    /// Only events with event time in (t − lookback, t] are included.
    pub lookback: Duration,
    /// Only events matching this filter are included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<Filter>,
}

/// Model inputs and outputs (shared by the worker's `ModelConfig` and the TenantModel spec).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSignature {
    /// Input tensor name; the model's first input when empty.
    #[serde(default)]
    pub input_name: String,
    /// Feature names in the order of the model's input vector (window features; a
    /// sequence feature contributes its length; raw numeric event fields as `event.<field>`).
    /// At most 1024.
    #[schemars(length(max = 1024))]
    pub features: Vec<String>,
    /// Named scores read from the model's outputs (at most 64).
    #[schemars(length(max = 64))]
    pub outputs: Vec<OutputMapping>,
    /// Micro-batching of inference.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Inference runtime: `tract` (default), `onnxruntime`, or `auto` (ONNX Runtime for a model
    /// with tree-ensemble operators, tract for everything else).
    #[serde(default)]
    pub runtime: ModelRuntime,
}

/// A named score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputMapping {
    /// Score name in the output record.
    pub name: String,
    /// Output tensor index (0 = first output).
    #[serde(default)]
    pub output: u32,
    /// Column of that output's row (e.g. 1 = probability of the positive class).
    #[serde(default)]
    pub column: u32,
}

/// Micro-batching.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchConfig {
    /// Largest number of events scored in one inference call.
    #[serde(default = "default_batch")]
    pub max_size: u32,
    /// Longest time a batch waits for more events once the consumer has none ready (at most
    /// 1s). `0s` (the default): a batch is what the consumer has ready (up to maxSize), scored
    /// at once; under load batches fill by themselves. A longer wait gives larger batches at a
    /// low input rate, at the cost of that much latency.
    #[serde(default = "default_batch_delay")]
    pub max_delay: Duration,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self { max_size: default_batch(), max_delay: default_batch_delay() }
    }
}

fn default_batch() -> u32 {
    64
}

fn default_batch_delay() -> Duration {
    Duration::from_millis(0)
}

/// Inference runtime.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ModelRuntime {
    /// tract (pure Rust, in the worker binary): neural nets and linear models (standard ONNX
    /// operators). It cannot run the `ai.onnx.ml` tree ensembles of scikit-learn, LightGBM or
    /// XGBoost converters.
    #[default]
    Tract,
    /// ONNX Runtime, loaded from the shared library that `ORT_DYLIB_PATH` names (the worker
    /// image carries it): every ONNX operator including the `ai.onnx.ml` tree ensembles. One
    /// intra-op thread per worker, like tract.
    Onnxruntime,
    /// ONNX Runtime if the model has a tree-ensemble operator (`TreeEnsembleClassifier`,
    /// `TreeEnsembleRegressor`, `TreeEnsemble`), tract otherwise.
    Auto,
}

impl ModelRuntime {
    /// The name in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelRuntime::Tract => "tract",
            ModelRuntime::Onnxruntime => "onnxruntime",
            ModelRuntime::Auto => "auto",
        }
    }
}

/// The model file the worker loads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelConfig {
    /// Path of the `.onnx` file.
    pub path: String,
    /// Expected lowercase hex SHA-256 of the file. A mismatch keeps the worker not ready.
    pub sha256: String,
    /// Version label carried in every output record.
    pub version: String,
    /// Inputs and outputs.
    #[serde(flatten)]
    pub signature: ModelSignature,
}

/// Post-processing.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PostprocessConfig {
    /// Score the labels are derived from (default: the first output).
    #[serde(default)]
    pub score: String,
    /// Labels by threshold: the label of the highest `minScore` not above the score.
    /// Scores below every threshold get no label. At most 32.
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub labels: Vec<LabelThreshold>,
    /// Input fields copied to the output record (at most 64).
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub passthrough: Vec<String>,
    /// Feature values included in the output record, by name; empty: every feature. At most
    /// 1024.
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub include_features: Vec<String>,
}

/// One threshold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LabelThreshold {
    /// Label name, e.g. `fraud`.
    pub label: String,
    /// Scores at or above this (in [0, 1]) get the label.
    pub min_score: f64,
}

/// Kafka output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SinkConfig {
    /// Topic for scored records (keyed by the entity key).
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub topic: String,
    /// Topic for events that could not be processed; record headers name the reason.
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub dead_letter_topic: String,
    /// Bootstrap servers for the producer; the source's when empty.
    #[serde(default)]
    pub bootstrap_servers: String,
    /// Extra librdkafka producer properties. `message.max.bytes` (default 1000000) is the
    /// largest record written: a dead letter that would be larger is truncated (header
    /// `streamscore.truncated.value`), an output that would be larger is dead-lettered with reason
    /// `output_too_large`. It must not exceed the output topics' `max.message.bytes`. Secrets
    /// come from files or environment variables (`${file:/path}`, `${env:NAME}`), never inline.
    /// They override streamscore's defaults (`linger.ms` 1, `compression.type` lz4,
    /// `enable.idempotence` true), e.g. `linger.ms: "0"` to send each batch's outputs at once,
    /// at the cost of more produce requests. At most 64.
    #[serde(default)]
    #[schemars(extend(
        "maxProperties" = 64,
        "x-kubernetes-validations" = [{
            "rule": "self.all(k, !(k in ['sasl.password', 'sasl.oauthbearer.client.secret', 'sasl.oauthbearer.config', 'ssl.key.password', 'ssl.keystore.password', 'ssl.key.pem']) || self[k].startsWith('${file:') || self[k].startsWith('${env:'))",
            "message": "secret Kafka properties (sasl.password, sasl.oauthbearer.client.secret, sasl.oauthbearer.config, ssl.key.password, ssl.keystore.password, ssl.key.pem) must be ${file:/path} or ${env:NAME} references, never inline values"
        }]
    ))]
    pub properties: BTreeMap<String, String>,
    /// Topic for the windows of `features.emitted` (keyed by the entity key). Required when
    /// emitted windows are declared; must differ from the output, dead-letter and input topics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 249), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub feature_topic: Option<String>,
    /// Delivery guarantee of everything written (outputs, dead letters, emitted windows).
    /// `atLeastOnce` (default): after a crash or a lost partition, the inputs since the last
    /// commit are scored and written again; the state never counts an input twice.
    /// `exactlyOnce`: each commit interval's records and the input offsets they came from are
    /// one Kafka transaction (producer `transactional.id` `<groupId>.<pod name>`); readers with
    /// `isolation.level=read_committed` see each input's output exactly once, also across
    /// crashes and rescales. Requires the sink on the source's cluster and
    /// `runtime.commitInterval` below the transaction timeout (`transaction.timeout.ms`,
    /// default 10000 here); costs throughput (commits wait for the brokers) and delays what
    /// read_committed readers see by up to the commit interval.
    #[serde(default)]
    pub delivery: Delivery,
}

/// Delivery guarantee of a pipeline's writes (`sink.delivery`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Delivery {
    /// Every input has at least one output; after a crash some are written twice.
    #[default]
    AtLeastOnce,
    /// Kafka transactions: every input has exactly one committed output.
    ExactlyOnce,
}

/// `transaction.timeout.ms` of an exactly-once producer unless `sink.properties` sets one: a
/// worker that dies mid-transaction blocks read_committed readers of its partitions for at most
/// this long (a restarted container aborts it at once).
pub const DEFAULT_TRANSACTION_TIMEOUT_MS: u64 = 10_000;

impl SinkConfig {
    /// `transaction.timeout.ms` of the exactly-once producer.
    pub fn transaction_timeout_ms(&self) -> Result<u64, String> {
        match self.properties.get("transaction.timeout.ms") {
            None => Ok(DEFAULT_TRANSACTION_TIMEOUT_MS),
            Some(v) => v
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|n| (1_000..=900_000).contains(n))
                .ok_or_else(|| format!("{v:?} is not an integer between 1000 and 900000")),
        }
    }

    /// The largest record the producer writes (key, value, headers and framing, as librdkafka
    /// counts them): `message.max.bytes` from `properties`, librdkafka's default otherwise.
    pub fn message_max_bytes(&self) -> Result<u32, String> {
        match self.properties.get("message.max.bytes") {
            None => Ok(DEFAULT_MESSAGE_MAX_BYTES),
            Some(v) => v
                .trim()
                .parse::<u32>()
                .ok()
                .filter(|n| (1_000..=1_000_000_000).contains(n))
                .ok_or_else(|| format!("{v:?} is not an integer between 1000 and 1000000000")),
        }
    }
}

/// Process-local settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// Directory for the RocksDB stores (one per owned input partition).
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    /// HTTP listen address for health, metrics and the query API.
    #[serde(default = "default_listen")]
    pub http_listen: String,
    /// Listen address of the admin API (`/v1/admin/drain`, `/v1/admin/resume`,
    /// `/v1/admin/status`), which the operator uses to rescale. Unset: no admin API. Kept off
    /// the query port so that a NetworkPolicy can admit only the operator to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<String>,
    /// Listen address of a port serving only `/metrics` (also served on `httpListen`), so that
    /// a NetworkPolicy can open it to a metrics scraper without opening the query API. Unset:
    /// none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// How often offsets are committed (after outputs are acknowledged and state is flushed).
    #[serde(default = "default_commit_interval")]
    pub commit_interval: Duration,
    /// How long a stopping worker (SIGTERM) waits for its outputs to be acknowledged. When the
    /// brokers do not acknowledge them in time, it exits without committing (status 1): the
    /// next owner processes those inputs again; nothing is lost. Keep it below the pod's
    /// termination grace period (60 s). Default 40s.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Duration,
    /// Liveness: `/healthz` fails (503, with the reason) once the processing loop has not come
    /// round for this long outside a restore, drain or hand-over, e.g. blocked waiting for
    /// acknowledgements from unreachable brokers; the kubelet then restarts the container (the
    /// restarted worker waits for the brokers without failing it). Default 2m.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: Duration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: default_state_dir(),
            http_listen: default_listen(),
            admin_listen: None,
            metrics_listen: None,
            commit_interval: default_commit_interval(),
            shutdown_timeout: default_shutdown_timeout(),
            stall_timeout: default_stall_timeout(),
        }
    }
}

fn default_state_dir() -> String {
    "/var/lib/streamscore/state".into()
}

fn default_listen() -> String {
    "0.0.0.0:8080".into()
}

fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(40)
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(120)
}

fn default_commit_interval() -> Duration {
    Duration::from_millis(500)
}

/// Durable, mobile state. Each input partition's store is checkpointed to `checkpointStore`;
/// a worker assigned a partition uses its local store when that store holds every input the
/// consumer group has committed, and otherwise restores the newest complete checkpoint and
/// replays the input from the checkpoint's offsets up to the committed offsets without writing
/// outputs again (they were written before). Without a usable checkpoint, `missingCheckpoint`
/// decides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateConfig {
    /// Object-store URI under which checkpoints are kept: `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix` or `file:///path` (a volume every worker
    /// mounts). Credentials and endpoints come from the worker's environment (`AWS_*`,
    /// `GOOGLE_*`, `AZURE_*` variables, or the pod's cloud identity), then from
    /// `credentialsDir`. Unset: no checkpoints; state then moves only by rebuilding it from the
    /// input topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_store: Option<String>,
    /// A directory of files, each named like one of the object store's environment settings
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`, `AWS_REGION`,
    /// `GOOGLE_SERVICE_ACCOUNT_KEY`, `AZURE_STORAGE_ACCOUNT_KEY`, …) and holding its value:
    /// read when the worker starts, over the environment. A mounted Secret, so credentials
    /// never appear in the pod spec. Files with other names are ignored with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_dir: Option<String>,
    /// How often the store of each partition whose state changed is checkpointed. A
    /// checkpoint is also taken when a partition is revoked and when the worker shuts down.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: Duration,
    /// Complete checkpoints kept per partition; older manifests, and files no kept manifest
    /// references, are deleted.
    #[serde(default = "default_retain_checkpoints")]
    #[schemars(range(min = 1, max = 100))]
    pub retain_checkpoints: u32,
    /// When the consumer group has committed offsets for a partition but neither the local
    /// store nor a checkpoint holds the state up to them: `rebuild` (default) replays the
    /// partition from its earliest retained record (outputs are written only from the committed
    /// offset on, and the worker is not ready until it has caught up); `fail` stops the worker
    /// with the reason.
    #[serde(default)]
    pub missing_checkpoint: MissingCheckpoint,
    /// Checkpoints of another pipeline run to start from, read only (a blue/green candidate
    /// starts from the live run's state). Used for a partition the consumer group has never
    /// committed and that has neither local state nor a checkpoint in `checkpointStore`: the
    /// newest checkpoint here with this pipeline's feature fingerprint is restored and
    /// consumption starts at its offsets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_store: Option<String>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            checkpoint_store: None,
            seed_store: None,
            credentials_dir: None,
            checkpoint_interval: default_checkpoint_interval(),
            retain_checkpoints: default_retain_checkpoints(),
            missing_checkpoint: MissingCheckpoint::default(),
        }
    }
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_retain_checkpoints() -> u32 {
    3
}

/// What a worker does when the state of an assigned partition can be neither found locally
/// nor restored from a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MissingCheckpoint {
    /// Replay the partition from its earliest retained record, writing outputs only from the
    /// committed offset on.
    #[default]
    Rebuild,
    /// Stop with an error naming the partition.
    Fail,
}

/// Schemes `state.checkpointStore` accepts.
pub const CHECKPOINT_SCHEMES: [&str; 4] = ["s3", "gs", "az", "file"];

fn validate_state(s: &StateConfig, errs: &mut Vec<ConfigError>) {
    if s.seed_store.is_some() && s.checkpoint_store.is_none() {
        errs.push(cerr("state.seedStore", "needs state.checkpointStore (the credentials and scheme are shared)"));
    }
    for (field, uri) in [("state.checkpointStore", &s.checkpoint_store), ("state.seedStore", &s.seed_store)] {
        let Some(uri) = uri else { continue };
        let scheme = uri.split_once("://").map(|(s, _)| s);
        match scheme {
            Some(sch) if CHECKPOINT_SCHEMES.contains(&sch) => {
                let rest = &uri[sch.len() + 3..];
                if rest.trim_matches('/').is_empty() {
                    errs.push(cerr(field, "needs a bucket (or a path for file://)"));
                }
                if sch == "file" && !rest.starts_with('/') {
                    errs.push(cerr(field, "a file:// URI needs an absolute path (file:///…)"));
                }
            }
            _ => errs.push(cerr(field, format!("{uri:?} is not an s3://, gs://, az:// or file:/// URI"))),
        }
    }
    if s.checkpoint_interval.is_zero() {
        errs.push(cerr("state.checkpointInterval", "must be positive"));
    }
    if s.retain_checkpoints == 0 || s.retain_checkpoints > 100 {
        errs.push(cerr("state.retainCheckpoints", "must be between 1 and 100"));
    }
}

/// A configuration problem, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending field, e.g. `features.windows[2].window`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn cerr(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.into(), message: message.into() }
}

impl PipelineConfig {
    /// Parses YAML (or JSON) text.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        serde_yaml::from_str(text).map_err(|e| cerr("pipeline", e.to_string()))
    }

    /// Every feature name, in declaration order.
    pub fn feature_names(&self) -> Vec<&str> {
        self.features
            .windows
            .iter()
            .map(|w| w.name.as_str())
            .chain(self.features.sequences.iter().map(|s| s.name.as_str()))
            .collect()
    }

    /// Checks everything that can be checked without I/O. Returns every problem found.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errs = Vec::new();
        validate_source(&self.source, &mut errs);
        validate_features(&self.features, &mut errs);
        validate_lookups(self, &mut errs);
        validate_signature(&self.model.signature, "model", &self.feature_names(), &mut errs);
        if self.model.path.trim().is_empty() {
            errs.push(cerr("model.path", "must not be empty"));
        }
        if !is_sha256(&self.model.sha256) {
            errs.push(cerr("model.sha256", "must be 64 lowercase hex characters"));
        }
        if self.model.version.trim().is_empty() {
            errs.push(cerr("model.version", "must not be empty"));
        }
        validate_postprocess(&self.postprocess, &self.model.signature, &self.feature_names(), &mut errs);
        explain_emitted_references(self, &mut errs);
        if self.sink.topic.trim().is_empty() {
            errs.push(cerr("sink.topic", "must not be empty"));
        }
        if self.sink.dead_letter_topic.trim().is_empty() {
            errs.push(cerr("sink.deadLetterTopic", "must not be empty"));
        }
        if self.sink.topic == self.sink.dead_letter_topic {
            errs.push(cerr("sink.deadLetterTopic", "must differ from sink.topic"));
        }
        if self.source.topics.iter().any(|t| *t == self.sink.topic || *t == self.sink.dead_letter_topic) {
            errs.push(cerr("sink.topic", "an output topic must not also be an input topic"));
        }
        validate_feature_topic(self, &mut errs);
        validate_record_sizes(self, &mut errs);
        validate_delivery(self, &mut errs);
        validate_secret_properties("source.properties", &self.source.properties, &mut errs);
        validate_secret_properties("sink.properties", &self.sink.properties, &mut errs);
        if self.runtime.http_listen.parse::<std::net::SocketAddr>().is_err() {
            errs.push(cerr("runtime.httpListen", "must be an address like 0.0.0.0:8080"));
        }
        if let Some(a) = &self.runtime.admin_listen {
            if a.parse::<std::net::SocketAddr>().is_err() {
                errs.push(cerr("runtime.adminListen", "must be an address like 0.0.0.0:8090"));
            } else if *a == self.runtime.http_listen && !a.ends_with(":0") {
                errs.push(cerr("runtime.adminListen", "must differ from runtime.httpListen"));
            }
        }
        if let Some(m) = &self.runtime.metrics_listen {
            if m.parse::<std::net::SocketAddr>().is_err() {
                errs.push(cerr("runtime.metricsListen", "must be an address like 0.0.0.0:9090"));
            } else if !m.ends_with(":0")
                && (*m == self.runtime.http_listen || Some(m) == self.runtime.admin_listen.as_ref())
            {
                errs.push(cerr("runtime.metricsListen", "must differ from runtime.httpListen and runtime.adminListen"));
            }
        }
        if self.runtime.commit_interval.is_zero() {
            errs.push(cerr("runtime.commitInterval", "must be positive"));
        }
        if self.runtime.stall_timeout.as_millis() < 1_000 {
            errs.push(cerr("runtime.stallTimeout", "must be at least 1s"));
        }
        if self.runtime.shutdown_timeout.is_zero() {
            errs.push(cerr("runtime.shutdownTimeout", "must be positive"));
        }
        validate_state(&self.state, &mut errs);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs)
        }
    }
}

/// Whether `s` is a lowercase hex SHA-256 digest.
pub fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub(crate) fn validate_source(s: &SourceConfig, errs: &mut Vec<ConfigError>) {
    if s.bootstrap_servers.trim().is_empty() {
        errs.push(cerr("source.bootstrapServers", "must not be empty"));
    }
    if s.topics.is_empty() {
        errs.push(cerr("source.topics", "at least one input topic is required"));
    }
    for (i, t) in s.topics.iter().enumerate() {
        if !is_topic_name(t) {
            errs.push(cerr(format!("source.topics[{i}]"), format!("{t:?} is not a valid Kafka topic name")));
        }
    }
    if s.key_field.trim().is_empty() {
        errs.push(cerr("source.keyField", "must not be empty"));
    }
    if s.event_time.field.trim().is_empty() {
        errs.push(cerr("source.eventTime.field", "must not be empty"));
    }
    match (s.start_from, s.start_timestamp_ms) {
        (StartPosition::Timestamp, None) => {
            errs.push(cerr("source.startTimestampMs", "is required when startFrom is timestamp"));
        }
        (StartPosition::Timestamp, Some(t)) if t < 0 => {
            errs.push(cerr("source.startTimestampMs", "must be a millisecond timestamp at or after 1970"));
        }
        (StartPosition::Earliest | StartPosition::Latest, Some(_)) => {
            errs.push(cerr("source.startTimestampMs", "is only used with startFrom: timestamp"));
        }
        _ => {}
    }
    if s.max_record_bytes == 0 {
        errs.push(cerr("source.maxRecordBytes", "must be positive"));
    }
    if s.max_future_skew.is_zero() {
        errs.push(cerr("source.maxFutureSkew", "must be positive"));
    }
    if s.max_key_bytes == 0 || s.max_key_bytes > MAX_KEY_BYTES {
        errs.push(cerr("source.maxKeyBytes", format!("must be between 1 and {MAX_KEY_BYTES}")));
    }
    for k in s.properties.keys() {
        if matches!(k.as_str(), "enable.auto.commit" | "group.id" | "bootstrap.servers" | "enable.auto.offset.store") {
            errs.push(cerr(format!("source.properties.{k}"), "is managed by streamscore and cannot be set"));
        }
    }
}

/// Every record the worker reads must fit, whole and with the dead-letter headers, into a record
/// the producer may write: `maxRecordBytes` + [`RECORD_OVERHEAD_RESERVE`] ≤ `message.max.bytes`.
/// librdkafka properties that hold secrets: accepted only as `${file:…}` or `${env:…}`
/// references, so that no secret is stored in a TenantModel, a ConfigMap or a log line.
pub const SECRET_PROPERTIES: &[&str] = &[
    "sasl.password",
    "sasl.oauthbearer.client.secret",
    "sasl.oauthbearer.config",
    "ssl.key.password",
    "ssl.keystore.password",
    "ssl.key.pem",
];

/// Inline values of [`SECRET_PROPERTIES`] (the message names the property, never the value).
fn validate_delivery(c: &PipelineConfig, errs: &mut Vec<ConfigError>) {
    let props = &c.sink.properties;
    if c.sink.delivery == Delivery::AtLeastOnce {
        if props.contains_key("transactional.id") {
            errs.push(cerr(
                "sink.properties.transactional.id",
                "is set by the worker with sink.delivery exactlyOnce; remove it",
            ));
        }
        return;
    }
    if !c.sink.bootstrap_servers.is_empty() && c.sink.bootstrap_servers != c.source.bootstrap_servers {
        errs.push(cerr(
            "sink.delivery",
            "exactlyOnce needs the sink on the source's Kafka cluster (the input offsets are committed in the \
             output transaction): leave sink.bootstrapServers empty",
        ));
    }
    for k in ["transactional.id", "enable.idempotence", "message.timeout.ms"] {
        if props.contains_key(k) {
            errs.push(cerr(format!("sink.properties.{k}"), "is set by the worker with sink.delivery exactlyOnce"));
        }
    }
    match c.sink.transaction_timeout_ms() {
        Err(e) => errs.push(cerr("sink.properties.transaction.timeout.ms", e)),
        Ok(t) if c.runtime.commit_interval.as_millis() * 2 > t => errs.push(cerr(
            "runtime.commitInterval",
            format!(
                "must be at most half the transaction timeout ({t} ms, sink.properties transaction.timeout.ms) with \
                 sink.delivery exactlyOnce"
            ),
        )),
        Ok(_) => {}
    }
}

fn validate_secret_properties(field: &str, props: &BTreeMap<String, String>, errs: &mut Vec<ConfigError>) {
    for (k, v) in props {
        if SECRET_PROPERTIES.contains(&k.as_str()) && !(v.starts_with("${file:") || v.starts_with("${env:")) {
            errs.push(cerr(
                format!("{field}.{k}"),
                "a secret: must be a ${file:/path} or ${env:NAME} reference (e.g. to a mounted kafkaSecrets key), \
                 never an inline value",
            ));
        }
    }
}

fn validate_record_sizes(c: &PipelineConfig, errs: &mut Vec<ConfigError>) {
    let limit = match c.sink.message_max_bytes() {
        Ok(l) => l,
        Err(e) => {
            errs.push(cerr("sink.properties.message.max.bytes", e));
            return;
        }
    };
    let most = limit.saturating_sub(RECORD_OVERHEAD_RESERVE);
    if c.source.max_record_bytes > most {
        errs.push(cerr(
            "source.maxRecordBytes",
            format!(
                "must be at most {most}: the producer writes records of at most {limit} bytes \
                 (sink.properties message.max.bytes) and a dead letter needs {RECORD_OVERHEAD_RESERVE} \
                 more for its key and headers"
            ),
        ));
    }
}

/// Whether `t` is a legal Kafka topic name.
pub fn is_topic_name(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 249
        && t != "."
        && t != ".."
        && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

pub(crate) fn validate_features(f: &FeaturesConfig, errs: &mut Vec<ConfigError>) {
    let mut seen = BTreeSet::new();
    for (i, w) in f.windows.iter().enumerate() {
        let p = format!("features.windows[{i}]");
        check_aggregate(&p, &w.name, w.aggregation, w.field.as_deref(), w.filter.as_ref(), &mut seen, errs);
        let too_fine = |window: u64, r: u64| {
            (window / r > MAX_BUCKETS_PER_WINDOW)
                .then(|| format!("too fine: more than {MAX_BUCKETS_PER_WINDOW} buckets per window"))
        };
        check_span(&p, ("window", w.window), w.resolution.map(|r| ("resolution", r)), too_fine, errs);
    }
    for (i, s) in f.sequences.iter().enumerate() {
        let p = format!("features.sequences[{i}]");
        check_name(&s.name, &format!("{p}.name"), &mut seen, errs);
        if s.length == 0 || s.length > MAX_SEQUENCE_LENGTH {
            errs.push(cerr(format!("{p}.length"), format!("must be between 1 and {MAX_SEQUENCE_LENGTH}")));
        }
        if s.lookback.is_zero() {
            errs.push(cerr(format!("{p}.lookback"), "must be positive"));
        }
        if s.field.trim().is_empty() {
            errs.push(cerr(format!("{p}.field"), "must not be empty"));
        }
        if let Some(flt) = &s.filter {
            check_filter(flt, &format!("{p}.filter"), errs);
        }
    }
    for (i, e) in f.emitted.iter().enumerate() {
        let p = format!("features.emitted[{i}]");
        check_aggregate(&p, &e.name, e.aggregation, e.field.as_deref(), e.filter.as_ref(), &mut seen, errs);
        let too_small = |size: u64, a: u64| {
            (size.div_ceil(a) > MAX_WINDOWS_PER_EVENT)
                .then(|| format!("too small: an event would count in more than {MAX_WINDOWS_PER_EVENT} windows"))
        };
        check_span(&p, ("size", e.size), e.advance.map(|a| ("advance", a)), too_small, errs);
    }
}

/// The lookup tables, and every `lookups.<table>.<field>` name used anywhere: it must name a
/// declared table and one of its fields.
fn validate_lookups(c: &PipelineConfig, errs: &mut Vec<ConfigError>) {
    let mut names = BTreeSet::new();
    for (i, l) in c.features.lookups.iter().enumerate() {
        let p = format!("features.lookups[{i}]");
        let ok =
            !l.name.is_empty() && l.name.len() <= 63 && l.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            errs.push(cerr(format!("{p}.name"), format!("{:?} must be 1-63 letters, digits or underscores", l.name)));
        } else if !names.insert(l.name.as_str()) {
            errs.push(cerr(format!("{p}.name"), format!("duplicate lookup table name {:?}", l.name)));
        }
        if !is_topic_name(&l.topic) {
            errs.push(cerr(format!("{p}.topic"), format!("{:?} is not a valid Kafka topic name", l.topic)));
        } else if c.source.topics.contains(&l.topic) {
            errs.push(cerr(format!("{p}.topic"), "an input topic cannot also be a lookup table"));
        } else if [&c.sink.topic, &c.sink.dead_letter_topic].contains(&&l.topic)
            || c.sink.feature_topic.as_ref() == Some(&l.topic)
        {
            errs.push(cerr(format!("{p}.topic"), "an output topic cannot also be a lookup table"));
        }
        if l.key.trim().is_empty() {
            errs.push(cerr(format!("{p}.key"), "must name the event field holding the table key"));
        } else if l.key.starts_with(LOOKUP_PREFIX) {
            errs.push(cerr(format!("{p}.key"), "must be a field of the event, not of a lookup table"));
        }
        if l.fields.is_empty() || l.fields.len() > MAX_LOOKUP_FIELDS {
            errs.push(cerr(format!("{p}.fields"), format!("must list between 1 and {MAX_LOOKUP_FIELDS} fields")));
        }
        let mut seen = BTreeSet::new();
        for (j, f) in l.fields.iter().enumerate() {
            if f.trim().is_empty() {
                errs.push(cerr(format!("{p}.fields[{j}]"), "must not be empty"));
            } else if !seen.insert(f) {
                errs.push(cerr(format!("{p}.fields[{j}]"), format!("duplicate field {f:?}")));
            }
        }
    }
    if c.features.lookups.len() > MAX_LOOKUP_TABLES {
        errs.push(cerr("features.lookups", format!("at most {MAX_LOOKUP_TABLES} lookup tables")));
    }
    // Read while the record is decoded, before the tables are joined.
    let early = [
        ("source.keyField".to_owned(), &c.source.key_field),
        ("source.eventTime.field".to_owned(), &c.source.event_time.field),
    ]
    .into_iter()
    .chain(c.validation.fields.iter().enumerate().map(|(i, r)| (format!("validation.fields[{i}].name"), &r.name)));
    for (path, name) in early {
        if name.starts_with(LOOKUP_PREFIX) {
            errs.push(cerr(
                path,
                format!(
                    "{name:?}: lookup fields are joined after the record is decoded and validated; name an event field"
                ),
            ));
        }
    }
    let declared = c.features.lookup_field_names();
    let f = &c.features;
    fn named<'a>(p: String, field: Option<&'a String>, filter: Option<&'a Filter>) -> Vec<(String, &'a String)> {
        let mut v: Vec<(String, &String)> = field.map(|x| (format!("{p}.field"), x)).into_iter().collect();
        v.extend(filter.map(|x| (format!("{p}.filter.field"), &x.field)));
        v
    }
    let mut refs: Vec<(String, &String)> = Vec::new();
    for (i, w) in f.windows.iter().enumerate() {
        refs.extend(named(format!("features.windows[{i}]"), w.field.as_ref(), w.filter.as_ref()));
    }
    for (i, q) in f.sequences.iter().enumerate() {
        refs.extend(named(format!("features.sequences[{i}]"), Some(&q.field), q.filter.as_ref()));
    }
    for (i, e) in f.emitted.iter().enumerate() {
        refs.extend(named(format!("features.emitted[{i}]"), e.field.as_ref(), e.filter.as_ref()));
    }
    refs.extend(c.model.signature.features.iter().enumerate().map(|(i, x)| (format!("model.features[{i}]"), x)));
    refs.extend(
        c.postprocess.passthrough.iter().enumerate().map(|(i, x)| (format!("postprocess.passthrough[{i}]"), x)),
    );
    for (path, name) in refs {
        if name.starts_with(LOOKUP_PREFIX) && !declared.contains(name) {
            errs.push(cerr(
                path,
                format!(
                    "{name:?} names no declared lookup field (features.lookups: {})",
                    if declared.is_empty() { "none declared".to_owned() } else { declared.join(", ") }
                ),
            ));
        }
    }
}

/// What window features and emitted windows share: a unique name, the field their aggregation
/// needs, and an optional filter.
fn check_aggregate(
    p: &str,
    name: &str,
    aggregation: Aggregation,
    field: Option<&str>,
    filter: Option<&Filter>,
    seen: &mut BTreeSet<String>,
    errs: &mut Vec<ConfigError>,
) {
    check_name(name, &format!("{p}.name"), seen, errs);
    check_field(aggregation, field, &format!("{p}.field"), errs);
    if let Some(flt) = filter {
        check_filter(flt, &format!("{p}.filter"), errs);
    }
}

/// A span (`window`, `size`) and its optional step (`resolution`, `advance`): both positive,
/// the step at most the span; `too_fine(span ms, step ms)` says when a span holds too many steps.
fn check_span(
    p: &str,
    (span_name, span): (&str, Duration),
    step: Option<(&str, Duration)>,
    too_fine: impl Fn(u64, u64) -> Option<String>,
    errs: &mut Vec<ConfigError>,
) {
    if span.is_zero() {
        errs.push(cerr(format!("{p}.{span_name}"), "must be positive"));
    }
    let Some((step_name, step)) = step else { return };
    let path = format!("{p}.{step_name}");
    if step.is_zero() {
        errs.push(cerr(path, "must be positive"));
    } else if step > span {
        errs.push(cerr(path, format!("must not exceed the {span_name}")));
    } else if let Some(msg) = too_fine(span.as_millis(), step.as_millis()) {
        errs.push(cerr(path, msg));
    }
}

fn check_field(aggregation: Aggregation, field: Option<&str>, path: &str, errs: &mut Vec<ConfigError>) {
    match (aggregation, field) {
        (Aggregation::Count, _) => {}
        (_, None) => errs.push(cerr(path, format!("required for {aggregation:?}"))),
        (_, Some(name)) if name.trim().is_empty() => errs.push(cerr(path, "must not be empty")),
        _ => {}
    }
}

/// An emitted window named as a model input or an included feature gets a clearer message.
fn explain_emitted_references(c: &PipelineConfig, errs: &mut [ConfigError]) {
    let refs = c.model.signature.features.iter().enumerate().map(|(i, f)| (format!("model.features[{i}]"), f));
    let included = c
        .postprocess
        .include_features
        .iter()
        .enumerate()
        .map(|(i, f)| (format!("postprocess.includeFeatures[{i}]"), f));
    for (field, name) in refs.chain(included) {
        if !c.features.emitted.iter().any(|e| e.name == *name) {
            continue;
        }
        for e in errs.iter_mut().filter(|e| e.field == field) {
            e.message = format!(
                "{name:?} is an emitted window: it is written to sink.featureTopic when a window closes and \
                 has no value per event"
            );
        }
    }
}

fn validate_feature_topic(c: &PipelineConfig, errs: &mut Vec<ConfigError>) {
    const P: &str = "sink.featureTopic";
    let Some(t) = &c.sink.feature_topic else {
        if !c.features.emitted.is_empty() {
            errs.push(cerr(P, "required when features.emitted declares windows"));
        }
        return;
    };
    if !is_topic_name(t) {
        errs.push(cerr(P, format!("{t:?} is not a valid Kafka topic name")));
    } else if *t == c.sink.topic || *t == c.sink.dead_letter_topic {
        errs.push(cerr(P, "must differ from sink.topic and sink.deadLetterTopic"));
    } else if c.source.topics.contains(t) {
        errs.push(cerr(P, "an output topic must not also be an input topic"));
    }
}

fn check_name(name: &str, path: &str, seen: &mut BTreeSet<String>, errs: &mut Vec<ConfigError>) {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with("event.");
    if !ok {
        errs.push(cerr(path, format!("{name:?} must be 1-63 letters, digits or underscores")));
    } else if !seen.insert(name.to_owned()) {
        errs.push(cerr(path, format!("duplicate feature name {name:?}")));
    }
}

fn check_filter(f: &Filter, path: &str, errs: &mut Vec<ConfigError>) {
    if f.field.trim().is_empty() {
        errs.push(cerr(format!("{path}.field"), "must not be empty"));
    }
    if f.one_of.is_empty() {
        errs.push(cerr(format!("{path}.oneOf"), "must list at least one value"));
    }
}

pub(crate) fn validate_signature(s: &ModelSignature, p: &str, features: &[&str], errs: &mut Vec<ConfigError>) {
    if s.features.is_empty() {
        errs.push(cerr(format!("{p}.features"), "the model needs at least one input feature"));
    }
    for (i, f) in s.features.iter().enumerate() {
        let raw = f.strip_prefix("event.").is_some_and(|x| !x.is_empty());
        // `lookups.<table>.<field>` names are checked by `validate_lookups`.
        let lookup = f.starts_with(LOOKUP_PREFIX);
        if !raw && !lookup && !features.contains(&f.as_str()) {
            errs.push(cerr(
                format!("{p}.features[{i}]"),
                format!(
                    "{f:?} is neither a declared feature, an `event.<field>` nor a `lookups.<table>.<field>` reference"
                ),
            ));
        }
    }
    if s.outputs.is_empty() {
        errs.push(cerr(format!("{p}.outputs"), "at least one named score is required"));
    }
    let mut names = BTreeSet::new();
    for (i, o) in s.outputs.iter().enumerate() {
        if o.name.trim().is_empty() || !names.insert(o.name.clone()) {
            errs.push(cerr(format!("{p}.outputs[{i}].name"), "must be non-empty and unique"));
        }
    }
    if s.batch.max_size == 0 || s.batch.max_size > 4096 {
        errs.push(cerr(format!("{p}.batch.maxSize"), "must be between 1 and 4096"));
    }
    if s.batch.max_delay.as_millis() > 1000 {
        errs.push(cerr(format!("{p}.batch.maxDelay"), "must be at most 1s"));
    }
}

pub(crate) fn validate_postprocess(
    pp: &PostprocessConfig,
    sig: &ModelSignature,
    features: &[&str],
    errs: &mut Vec<ConfigError>,
) {
    if !pp.score.is_empty() && !sig.outputs.iter().any(|o| o.name == pp.score) {
        errs.push(cerr("postprocess.score", format!("{:?} is not one of model.outputs", pp.score)));
    }
    for (i, l) in pp.labels.iter().enumerate() {
        if !(0.0..=1.0).contains(&l.min_score) {
            errs.push(cerr(format!("postprocess.labels[{i}].minScore"), "must be in [0, 1]"));
        }
        if l.label.trim().is_empty() {
            errs.push(cerr(format!("postprocess.labels[{i}].label"), "must not be empty"));
        }
    }
    for (i, f) in pp.include_features.iter().enumerate() {
        if !features.contains(&f.as_str()) {
            errs.push(cerr(format!("postprocess.includeFeatures[{i}]"), format!("{f:?} is not a declared feature")));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SAMPLE: &str = r#"
source:
  bootstrapServers: 127.0.0.1:9092
  topics: [events]
  groupId: g
  keyField: user_id
  eventTime: {field: ts, format: epochMillis}
  maxOutOfOrderness: 5s
validation:
  fields:
    - {name: amount, type: number}
features:
  windows:
    - {name: tx_1h, aggregation: count, window: 1h}
    - {name: amount_24h, aggregation: sum, field: amount, window: 24h, resolution: 1m}
    - {name: rides_1h, aggregation: count, window: 1h, filter: {field: action, oneOf: [ride_requested]}}
  sequences:
    - {name: last_actions, field: action, length: 16, lookback: 90d}
model:
  path: /models/m.onnx
  sha256: "0000000000000000000000000000000000000000000000000000000000000000"
  version: v1
  features: [tx_1h, amount_24h, rides_1h, event.amount]
  outputs: [{name: fraud, output: 1, column: 1}]
postprocess:
  labels: [{label: fraud, minScore: 0.8}]
  passthrough: [merchant]
sink:
  topic: scores
  deadLetterTopic: scores-dlq
"#;

    #[test]
    fn sample_parses_with_defaults_and_validates() {
        let c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        assert_eq!(c.source.max_out_of_orderness.as_millis(), 5_000);
        assert_eq!(c.model.signature.batch.max_size, 64);
        assert_eq!(c.runtime.http_listen, "0.0.0.0:8080");
        assert_eq!(c.features.windows[0].effective_resolution().as_millis(), 60_000);
        c.validate().unwrap();
    }

    #[test]
    fn exactly_once_needs_one_cluster_a_short_commit_interval_and_the_workers_own_producer_settings() {
        let mut c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        assert_eq!(c.sink.delivery, Delivery::AtLeastOnce);
        c.sink.properties.insert("transactional.id".into(), "mine".into());
        let fields = |c: &PipelineConfig| -> Vec<String> {
            c.validate().err().unwrap_or_default().into_iter().map(|e| e.field).collect()
        };
        assert_eq!(fields(&c), ["sink.properties.transactional.id"]);
        c.sink.properties.clear();
        c.sink.delivery = Delivery::ExactlyOnce;
        c.validate().unwrap();
        c.sink.bootstrap_servers = "other:9092".into();
        c.sink.properties.insert("enable.idempotence".into(), "false".into());
        c.sink.properties.insert("transaction.timeout.ms".into(), "4000".into());
        c.runtime.commit_interval = crate::duration::Duration::from_secs(3);
        assert_eq!(
            fields(&c),
            ["sink.delivery", "sink.properties.enable.idempotence", "runtime.commitInterval"],
            "{:?}",
            c.validate()
        );
        c.sink.properties.insert("transaction.timeout.ms".into(), "ten".into());
        assert!(fields(&c).contains(&"sink.properties.transaction.timeout.ms".to_owned()));
        let yaml =
            SAMPLE.replace("deadLetterTopic: scores-dlq", "deadLetterTopic: scores-dlq\n  delivery: exactlyOnce");
        assert_eq!(PipelineConfig::from_yaml(&yaml).unwrap().sink.delivery, Delivery::ExactlyOnce);
    }

    #[test]
    fn validation_names_each_bad_field() {
        let mut c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        c.features.windows[1].field = None;
        c.features.sequences[0].length = 10_000;
        c.model.signature.features.push("nope".into());
        c.postprocess.labels[0].min_score = 1.5;
        c.sink.dead_letter_topic = "scores".into();
        c.model.sha256 = "abc".into();
        let errs = c.validate().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "features.windows[1].field",
            "features.sequences[0].length",
            "model.features[4]",
            "postprocess.labels[0].minScore",
            "sink.deadLetterTopic",
            "model.sha256",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn start_from_timestamp_needs_its_timestamp() {
        let mut c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        c.source.start_from = StartPosition::Timestamp;
        let errs = c.validate().unwrap_err();
        assert!(
            errs.iter().any(|e| e.field == "source.startTimestampMs" && e.message.contains("required")),
            "{errs:?}"
        );
        c.source.start_timestamp_ms = Some(1_795_500_000_000);
        c.validate().unwrap();
        c.source.start_from = StartPosition::Latest;
        let errs = c.validate().unwrap_err();
        assert!(errs.iter().any(|e| e.field == "source.startTimestampMs"), "{errs:?}");
    }

    #[test]
    fn unknown_duration_is_a_parse_error_naming_the_value() {
        let bad = SAMPLE.replace("window: 24h", "window: 24x");
        let e = PipelineConfig::from_yaml(&bad).unwrap_err();
        assert!(e.message.contains("24x"), "{e}");
    }

    fn with_emitted(extra: &str) -> PipelineConfig {
        let yaml = SAMPLE.replace(
            "  sequences:\n",
            &format!(
                "  emitted:\n    - {{name: spend_1h, aggregation: sum, field: amount, size: 1h}}\n{extra}  sequences:\n"
            ),
        );
        PipelineConfig::from_yaml(&yaml).unwrap()
    }

    fn fields(c: &PipelineConfig) -> Vec<String> {
        c.validate().err().unwrap_or_default().into_iter().map(|e| e.field).collect()
    }

    fn with_lookups(lookups: &str) -> PipelineConfig {
        PipelineConfig::from_yaml(&SAMPLE.replace("  sequences:\n", &format!("  lookups:\n{lookups}  sequences:\n")))
            .unwrap()
    }

    #[test]
    fn lookup_fields_are_named_lookups_table_field_and_every_reference_is_checked() {
        let tier = "    - {name: merchants, topic: merchant-tiers, key: merchant, fields: [tier, risk]}\n";
        let mut c = with_lookups(tier);
        c.model.signature.features.push("lookups.merchants.risk".into());
        c.postprocess.passthrough.push("lookups.merchants.tier".into());
        c.features.windows[2].filter.as_mut().unwrap().field = "lookups.merchants.tier".into();
        c.validate().unwrap();
        assert_eq!(c.features.lookup_field_names(), ["lookups.merchants.tier", "lookups.merchants.risk"]);

        // An undeclared table or field, wherever it is named.
        c.model.signature.features.push("lookups.merchants.country".into());
        c.postprocess.passthrough.push("lookups.stores.tier".into());
        c.features.sequences[0].field = "lookups.merchant.tier".into();
        let errs = c.validate().unwrap_err();
        let named: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            named,
            ["features.sequences[0].field", "model.features[5]", "postprocess.passthrough[2]"],
            "{errs:?}"
        );
        assert!(errs[1].message.contains("lookups.merchants.tier, lookups.merchants.risk"), "{}", errs[1]);

        // Fields read before the join cannot be lookup fields.
        let mut early = with_lookups(tier);
        early.validation.fields[0].name = "lookups.merchants.risk".into();
        early.source.key_field = "lookups.merchants.tier".into();
        assert_eq!(fields(&early), ["source.keyField", "validation.fields[0].name"]);

        // Bad tables: name, topic (an input topic), key, fields.
        let c = with_lookups(concat!(
            "    - {name: merchants, topic: events, key: '', fields: []}\n",
            "    - {name: merchants, topic: 'a b', key: lookups.x.y, fields: [tier, tier]}\n",
        ));
        assert_eq!(
            fields(&c),
            [
                "features.lookups[0].topic",
                "features.lookups[0].key",
                "features.lookups[0].fields",
                "features.lookups[1].name",
                "features.lookups[1].topic",
                "features.lookups[1].key",
                "features.lookups[1].fields[1]",
            ]
        );
    }

    #[test]
    fn only_lookup_tables_read_by_state_features_are_part_of_the_state() {
        let mut c = with_lookups(concat!(
            "    - {name: merchants, topic: merchant-tiers, key: merchant, fields: [tier]}\n",
            "    - {name: devices, topic: device-risk, key: device, fields: [risk]}\n",
        ));
        c.model.signature.features.push("lookups.devices.risk".into());
        c.validate().unwrap();
        assert!(c.features.state_view().lookups.is_empty(), "read only as a model input");
        c.features.windows[2].filter.as_mut().unwrap().field = "lookups.merchants.tier".into();
        let names: Vec<String> = c.features.state_view().lookups.into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["merchants"]);
    }

    #[test]
    fn emitted_windows_parse_with_tumbling_default_and_need_a_feature_topic() {
        let mut c = with_emitted("    - {name: buys_1h_every_15m, aggregation: count, size: 1h, advance: 15m}\n");
        assert_eq!(c.features.emitted[0].effective_advance().as_millis(), 3_600_000);
        assert_eq!(c.features.emitted[1].effective_advance().as_millis(), 900_000);
        assert_eq!(fields(&c), ["sink.featureTopic"]);
        c.sink.feature_topic = Some("features".into());
        c.validate().unwrap();
        // Not part of the per-event feature vector.
        assert_eq!(c.feature_names().len(), 4);
    }

    #[test]
    fn emitted_window_problems_name_their_field() {
        let mut c = with_emitted(concat!(
            "    - {name: tx_1h, aggregation: count, size: 1h}\n",
            "    - {name: a, aggregation: max, size: 1h, advance: 2h}\n",
            "    - {name: b, aggregation: count, size: 0s}\n",
            "    - {name: c, aggregation: count, size: 1h, advance: 1s}\n",
            "    - {name: d, aggregation: count, size: 1h, advance: 0s, filter: {field: x, oneOf: []}}\n",
        ));
        c.sink.feature_topic = Some("scores".into());
        c.postprocess.include_features = vec!["spend_1h".into()];
        let got = fields(&c);
        for f in [
            "features.emitted[1].name",
            "features.emitted[2].field",
            "features.emitted[2].advance",
            "features.emitted[3].size",
            "features.emitted[4].advance",
            "features.emitted[5].advance",
            "features.emitted[5].filter.oneOf",
            "sink.featureTopic",
            "postprocess.includeFeatures[0]",
        ] {
            assert!(got.iter().any(|g| g == f), "{f} missing from {got:?}");
        }
        let errs = c.validate().unwrap_err();
        let inc = errs.iter().find(|e| e.field == "postprocess.includeFeatures[0]").unwrap();
        assert!(inc.message.contains("emitted window"), "{inc}");
        c.sink.feature_topic = Some("events".into());
        let errs = c.validate().unwrap_err();
        let ft = errs.iter().find(|e| e.field == "sink.featureTopic").unwrap();
        assert!(ft.message.contains("input topic"), "{ft}");
    }

    #[test]
    fn configs_without_emitted_windows_render_as_before() {
        let c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        let y = serde_yaml::to_string(&c).unwrap();
        assert!(!y.contains("emitted") && !y.contains("featureTopic"), "{y}");
    }

    #[test]
    fn hostile_input_limits_have_safe_defaults() {
        let c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        assert_eq!(c.source.max_future_skew.as_millis(), 3_600_000);
        assert_eq!(c.source.max_key_bytes, 1024);
        assert_eq!(c.sink.message_max_bytes(), Ok(1_000_000));
        // The default record limit leaves room for a whole dead letter under librdkafka's default.
        assert_eq!(c.source.max_record_bytes, 983_040);
        assert!(c.source.max_record_bytes + 16_384 <= 1_000_000);
        c.validate().unwrap();
    }

    #[test]
    fn max_record_bytes_must_fit_the_producer_limit() {
        let mut c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        // The old default (1 MiB) is above librdkafka's 1000000: a dead letter could never be written.
        c.source.max_record_bytes = 1_048_576;
        let errs = c.validate().unwrap_err();
        let e = errs.iter().find(|e| e.field == "source.maxRecordBytes").expect("maxRecordBytes refused");
        assert!(e.message.contains("at most 983616"), "{e}");
        c.source.max_record_bytes = 983_616;
        c.validate().unwrap();
        // Raising the producer's limit allows larger records.
        c.source.max_record_bytes = 1_048_576;
        c.sink.properties.insert("message.max.bytes".into(), "2000000".into());
        c.validate().unwrap();
        // Lowering it requires smaller ones.
        c.sink.properties.insert("message.max.bytes".into(), "100000".into());
        c.source.max_record_bytes = 100_000 - 16_384 + 1;
        assert_eq!(fields(&c), ["source.maxRecordBytes"]);
        for bad in ["lots", "999", "1000000001", "-1"] {
            c.sink.properties.insert("message.max.bytes".into(), bad.into());
            assert_eq!(fields(&c), ["sink.properties.message.max.bytes"], "{bad}");
        }
    }

    #[test]
    fn future_skew_and_key_length_bounds_are_checked() {
        let mut c = PipelineConfig::from_yaml(
            &SAMPLE.replace("maxOutOfOrderness: 5s", "maxOutOfOrderness: 5s\n  maxFutureSkew: 10m\n  maxKeyBytes: 64"),
        )
        .unwrap();
        assert_eq!(c.source.max_future_skew.as_millis(), 600_000);
        assert_eq!(c.source.max_key_bytes, 64);
        c.validate().unwrap();
        c.source.max_future_skew = Duration::from_millis(0);
        c.source.max_key_bytes = 4097;
        assert_eq!(fields(&c), ["source.maxFutureSkew", "source.maxKeyBytes"]);
        c.source.max_key_bytes = 0;
        assert_eq!(fields(&c), ["source.maxFutureSkew", "source.maxKeyBytes"]);
    }

    #[test]
    fn secret_kafka_properties_must_be_references() {
        let mut c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        c.source.properties.insert("sasl.password".into(), "hunter2".into());
        c.sink.properties.insert("ssl.key.password".into(), "hunter2".into());
        c.source.properties.insert("sasl.username".into(), "alice".into());
        let errs = c.validate().unwrap_err();
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, ["source.properties.sasl.password", "sink.properties.ssl.key.password"]);
        assert!(errs.iter().all(|e| !e.to_string().contains("hunter2")), "the value is never echoed: {errs:?}");
        c.source.properties.insert("sasl.password".into(), "${file:/var/run/secrets/streamscore/kafka/k/pw}".into());
        c.sink.properties.insert("ssl.key.password".into(), "${env:KEY_PASSWORD}".into());
        c.validate().unwrap();
    }

    #[test]
    fn managed_kafka_properties_are_refused() {
        let mut c = PipelineConfig::from_yaml(SAMPLE).unwrap();
        c.source.properties.insert("enable.auto.commit".into(), "true".into());
        let errs = c.validate().unwrap_err();
        assert_eq!(errs[0].field, "source.properties.enable.auto.commit");
    }
}
