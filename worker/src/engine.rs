//! The processing engine: one batch of input records in, output records out.
//!
//! ```text
//!  assignment ─► local store, or the newest checkpoint, or a rebuild (see `open_partition`)
//!  InRecord ─► skip if below the store's offset (already applied before a restart)
//!            ─► below the committed offset after a restore: processed, outputs not written
//!            ─► decode + validate ──────────────────────────► DeadLetter(reason)
//!            ─► event time > clock + maxFutureSkew? ────────► DeadLetter(future_event_time)
//!            ─► watermark: late? ───────────────────────────► DeadLetter(late) | drop
//!            ─► features (state of the key, as of its event time)
//!            ─► model (one micro-batch for the whole input batch) ─► postprocess ─► Scored
//!               (a score that is not finite ─► DeadLetter(scoring_failed),
//!                an output over message.max.bytes ─► DeadLetter(output_too_large))
//!            ─► emitted windows of the key (+ timers)
//!  end of batch: per partition whose horizon advanced, windows ending at or before it ─► Feature
//! ```
//! Every record returned fits the producer's `message.max.bytes`: a dead letter's value (and,
//! if it must, its key) is cut to fit, with `streamscore.truncated.*` headers saying so.
//! No Kafka types here: the Kafka loop (`crate::kafka`) feeds records and sends outputs, so the
//! engine is tested with RocksDB in a temp dir and real models, without a broker.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use serde_json::{Map, Value};
use streamscore_crds::pipeline::{LatePolicy, MissingCheckpoint, PipelineConfig, DEFAULT_MESSAGE_MAX_BYTES};
use tracing::warn;

use crate::agg::{FeatureValue, Scalar};
use crate::checkpoint::{CheckpointError, Checkpointer};
use crate::decode::{check_not_future, decode, Event, FieldId, Reason, Schema};
use crate::emitted::{Emitted, EmittedSet};
use crate::features::{aggregation_input, FeatureSet, Input};
use crate::json::{self, write_f64, write_str};
use crate::lookup::{Joins, Tables};
use crate::metrics::{Metrics, SourceLabel};
use crate::model::Model;
use crate::record::{self, KeyState, LastScore};
use crate::state::{FlushBatch, PartitionStore, Slot, StateError, StoreEnv, StoreHandle, StoreReader};
use crate::watermark::Watermark;

/// One consumed record.
#[derive(Debug)]
pub struct InRecord<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record key bytes.
    pub key: Option<&'a [u8]>,
    /// Record value bytes.
    pub payload: Option<&'a [u8]>,
    /// When the worker received it.
    pub received: Instant,
    /// The record's Kafka timestamp (ms since the epoch), for event-to-output latency.
    pub timestamp: Option<i64>,
}

/// The input an output comes from: index of its topic in `source.topics`, partition and
/// offset (for an emitted window: the offset of the record that closed it). A blue/green
/// candidate routes each output by it (shadow or live, see [`ShadowConfig::is_live`]).
///
/// [`ShadowConfig::is_live`]: streamscore_crds::pipeline::ShadowConfig::is_live
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Origin {
    /// Index of the input topic in `source.topics`.
    pub topic: usize,
    /// Input partition.
    pub partition: i32,
    /// Input offset.
    pub offset: i64,
}

/// A record to write.
#[derive(Debug, PartialEq)]
pub enum OutRecord {
    /// A scored event for the output topic.
    Scored {
        /// The input it comes from.
        origin: Origin,
        /// Entity key.
        key: String,
        /// JSON value.
        value: Vec<u8>,
        /// When the input was received (for the latency histogram).
        received: Instant,
        /// The input's Kafka timestamp (ms since the epoch).
        source_timestamp: Option<i64>,
    },
    /// An event that could not be processed, for the dead-letter topic.
    DeadLetter {
        /// The input it comes from.
        origin: Origin,
        /// Original key bytes.
        key: Option<Vec<u8>>,
        /// Original value bytes.
        value: Vec<u8>,
        /// `streamscore.reason`, `streamscore.detail`, `streamscore.source.*`.
        headers: Vec<(&'static str, String)>,
    },
    /// A closed emitted window, for the feature topic.
    Feature {
        /// The input whose event time closed it.
        origin: Origin,
        /// Entity key.
        key: String,
        /// JSON value `{"key", "feature", "windowStart", "windowEnd", "value", "count"}`.
        value: Vec<u8>,
    },
}

/// (topic, partition, next offset) of every owned partition.
pub type Offsets = Vec<(String, i32, i64)>;

/// The state changes up to some input offsets, serialised; durable once written.
#[derive(Debug)]
pub struct Checkpoint {
    batches: Vec<FlushBatch>,
    /// (topic, partition, next offset) to commit to Kafka once the batches are written (while a
    /// partition replays: the group's committed offset, never below it).
    pub commits: Vec<(String, i32, i64)>,
    /// (topic, partition, next offset) the written state holds.
    pub stored: Vec<(String, i32, i64)>,
}

impl Checkpoint {
    /// Writes every partition's batch (synced). The batches written are dropped, so that after
    /// an error (e.g. the state volume is full) a second call writes only the rest.
    pub fn write(&mut self) -> Result<usize, StateError> {
        let mut keys = 0;
        while let Some(batch) = self.batches.first() {
            keys += batch.write()?;
            self.batches.remove(0);
        }
        Ok(keys)
    }

    /// Serialised bytes.
    pub fn size_bytes(&self) -> usize {
        self.batches.iter().map(FlushBatch::size_bytes).sum()
    }
}

/// Engine failure (state store); the Kafka loop stops without committing.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// State store failure.
    #[error(transparent)]
    State(#[from] StateError),
    /// A record for a partition that is not assigned.
    #[error("record for unassigned partition {0}")]
    Unassigned(i32),
    /// Restoring a partition's state from a checkpoint failed.
    #[error("partition {partition}: {source}")]
    Checkpoint {
        /// Partition.
        partition: i32,
        /// Cause.
        source: CheckpointError,
    },
    /// A partition's state can be neither found nor restored, and `state.missingCheckpoint` is
    /// `fail`.
    #[error(
        "partition {partition}: the consumer group has committed offsets {committed:?}, but {why}; \
         state.missingCheckpoint is fail, so the worker stops instead of scoring with incomplete state \
         (set it to rebuild to replay the partition from its earliest retained record)"
    )]
    MissingState {
        /// Partition.
        partition: i32,
        /// Committed offsets by topic.
        committed: BTreeMap<String, i64>,
        /// Why no state is usable.
        why: String,
    },
    /// The consumer kept delivering a partition's first record past the offset its state
    /// needs, after seeks back to it.
    #[error(
        "partition {partition} of {topic}: the consumer delivers offset {got} first where the state needs \
         {expected} next, after {seeks} seeks back; stopping instead of computing features without the \
         records in between"
    )]
    Misplaced {
        /// Partition.
        partition: i32,
        /// Topic.
        topic: String,
        /// The offset the state needs next.
        expected: i64,
        /// The first offset delivered.
        got: i64,
        /// Seeks asked for.
        seeks: u32,
    },
    /// The input topic's partition count differs from the one the partition's state was built
    /// under: keys now map to other partitions, so no store (local, checkpoint or rebuilt from
    /// this partition alone) holds their history.
    #[error(
        "partition {partition}: the input topic has {now} partitions, but this partition's state was built when it \
         had {then}: keys map to other partitions now and their history is not in this partition's state; the \
         worker stops instead of scoring with it (start a new consumer group with state rebuilt from history, or \
         restore the partition count)"
    )]
    PartitionsChanged {
        /// Partition.
        partition: i32,
        /// The count the state was built under.
        then: usize,
        /// The topic's count now.
        now: usize,
    },
    /// The local store could not be removed to make room for restored or rebuilt state.
    #[error("partition {partition}: cannot remove the unusable local store: {source}")]
    Wipe {
        /// Partition.
        partition: i32,
        /// Cause.
        source: std::io::Error,
    },
}

/// Where an assigned partition's state came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateSource {
    /// The local store, which holds at least the committed offsets (or the group never committed).
    Local,
    /// The local store, behind the committed offsets: the input in between is replayed.
    LocalBehind,
    /// A checkpoint (manifest id).
    Checkpoint(String),
    /// A checkpoint of another run (`state.seedStore`, manifest id): a new consumer group
    /// starts from it.
    Seed(String),
    /// Nothing usable: rebuilt from the earliest retained input record.
    Rebuild,
    /// No state and nothing committed: a new partition.
    Empty,
}

impl StateSource {
    /// Metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Local | Self::LocalBehind => "local",
            Self::Checkpoint(_) => "checkpoint",
            Self::Seed(_) => "seed",
            Self::Rebuild => "rebuild",
            Self::Empty => "empty",
        }
    }
}

/// Where the consumer starts reading a topic of a newly assigned partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// This offset (the state holds every record below it).
    Offset(i64),
    /// The earliest retained record.
    Beginning,
}

/// The outcome of assigning a partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assigned {
    /// Where the state came from.
    pub source: StateSource,
    /// Start position per topic (topics absent here start at the group's position).
    pub start: BTreeMap<String, StartAt>,
    /// Per topic, the committed offset up to which records are processed without writing
    /// outputs (they were written before).
    pub replay_until: BTreeMap<String, i64>,
}

/// Fingerprint of everything that decides what a partition's state holds: the key, the event
/// time and watermark settings, validation, the feature definitions and the state format.
/// State (local or in a checkpoint) with another fingerprint is never used.
pub fn state_fingerprint(cfg: &PipelineConfig) -> String {
    use sha2::{Digest, Sha256};
    let s = &cfg.source;
    let v = serde_json::json!({
        "stateFormat": record::FORMAT,
        "keyField": s.key_field,
        "eventTime": s.event_time,
        "maxOutOfOrderness": s.max_out_of_orderness,
        "allowedLateness": s.allowed_lateness,
        "validation": cfg.validation,
        // Lookup tables only model inputs read leave state alone.
        "features": cfg.features.state_view(),
    });
    let digest = Sha256::digest(serde_json::to_vec(&v).unwrap_or_default());
    format!("v{}-{}", record::FORMAT, hex::encode(&digest[..12]))
}

enum RowSource {
    Feature(usize),
    Field(FieldId),
}

struct PartitionCtx {
    store: PartitionStore<KeyState>,
    watermark: Watermark,
    /// Next offset to process per topic: from the store at assignment, then advanced by
    /// every processed record. Records below it are already applied and are skipped.
    next_offsets: BTreeMap<String, i64>,
    /// Part of the running checkpoint.
    in_snapshot: bool,
    /// Emitted windows ending at or before this horizon have been closed.
    closed_through: i64,
    /// After a restore: per topic, the committed offset below which outputs are not written.
    replay_until: BTreeMap<String, i64>,
    /// Per topic, where the consumer was told to start, until the first record at or past it
    /// arrives ([`StartCheck`]).
    start_checks: BTreeMap<String, StartCheck>,
    /// How the state was opened (for the first-record log line).
    source: StateSource,
}

/// The first record of a topic in a newly opened partition must be the one the state expects
/// (the consumer was placed there). A first record past it means the consumer is reading from
/// somewhere else (the group's committed offset, a fetch begun before the placement, a record
/// left from before a rebalance): processing it would skip input the state needs. The engine
/// then asks for a seek to the expected offset instead; a first record past it again *at the
/// same offset* is a real gap in the log (transaction markers, compaction) and is accepted.
#[derive(Clone, Debug)]
struct StartCheck {
    expected: i64,
    /// The first offset seen at the last check that asked for a seek.
    misplaced_at: Option<i64>,
    seeks: u32,
    /// A seek was asked for in this batch: the topic's remaining records of the batch are
    /// dropped (the consumer reads them again from the expected offset).
    seek_pending: bool,
}

/// Seeks asked for before a partition's first record is accepted as misplaced.
const MAX_START_SEEKS: u32 = 5;

/// A partition the consumer must read again from `offset` (see [`Engine::take_seeks`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seek {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The offset the state expects next.
    pub offset: i64,
}

/// Query-side view of the owned partitions.
pub type Readers = Arc<RwLock<BTreeMap<i32, StoreReader>>>;

/// The engine of one worker process.
pub struct Engine {
    cfg: Arc<PipelineConfig>,
    schema: Schema,
    features: FeatureSet,
    emitted: EmittedSet,
    /// Where each emitted window reads its input.
    emitted_inputs: Vec<Input>,
    /// Output JSON fragments: `"score":` per model output, `"feature":` per included feature,
    /// (`"field":`, id) per passthrough field, the model version as a JSON string.
    score_keys: Vec<Vec<u8>>,
    feature_keys: Vec<Vec<u8>>,
    passthrough: Vec<(Vec<u8>, FieldId)>,
    version_json: Vec<u8>,
    model: Arc<Model>,
    rows: Vec<RowSource>,
    include: Vec<usize>,
    stores: StoreEnv,
    partitions: BTreeMap<i32, PartitionCtx>,
    readers: Readers,
    metrics: Arc<Metrics>,
    ooo: i64,
    lateness: i64,
    /// `source.maxFutureSkew`, ms.
    max_future_skew: i64,
    /// The producer's `message.max.bytes`: no returned record is larger.
    max_message_bytes: usize,
    /// Wall clock, epoch ms (replaceable for tests).
    clock: Box<dyn Fn() -> i64 + Send>,
    last_size: Instant,
    /// The running checkpoint's offsets to commit.
    /// The running checkpoint's (commits, stored offsets).
    snapshot: Option<(Offsets, Offsets)>,
    /// See [`state_fingerprint`].
    fingerprint: String,
    /// Object-store checkpoints (restore on assignment), when configured.
    checkpoints: Option<Arc<Checkpointer>>,
    /// See [`Engine::replaying_changed`].
    replay_changed: bool,
    /// Index of the main score (`postprocess.score`) among the model's outputs.
    primary_score: Option<usize>,
    /// Seeks asked for by [`StartCheck`]s, for the consumer loop.
    seeks: Vec<Seek>,
    /// The input topic's partition count, when known ([`Engine::set_input_partitions`]).
    input_partitions: Option<usize>,
    /// The lookup tables joined into each event (`features.lookups`), when declared.
    lookups: Option<Joins>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("partitions", &self.partitions.keys().collect::<Vec<_>>()).finish()
    }
}

struct Pending<'a> {
    partition: i32,
    /// The key's state in its partition's store (no second lookup for the last score).
    slot: Slot,
    /// Processed again to restore state: its output was written before.
    replay: bool,
    event: Event<'a>,
    values: Vec<FeatureValue>,
    row: Vec<f32>,
    rec: &'a InRecord<'a>,
}

impl Engine {
    /// An engine with no partitions.
    pub fn new(cfg: Arc<PipelineConfig>, model: Arc<Model>, stores: StoreEnv, metrics: Arc<Metrics>) -> Self {
        let schema = Schema::new(&cfg);
        let mut features = FeatureSet::new(&cfg.features, &schema);
        let idx = |n: &str| features.names().iter().position(|x| x == n);
        let rows: Vec<RowSource> = cfg
            .model
            .signature
            .features
            .iter()
            .map(|f| match f.strip_prefix("event.") {
                Some(field) => RowSource::Field(schema.id(field).unwrap_or(usize::MAX)),
                None if f.starts_with(streamscore_crds::pipeline::LOOKUP_PREFIX) => {
                    RowSource::Field(schema.id(f).unwrap_or(usize::MAX))
                }
                None => RowSource::Feature(idx(f).unwrap_or(usize::MAX)),
            })
            .collect();
        let include: Vec<usize> = if cfg.postprocess.include_features.is_empty() {
            (0..features.names().len()).collect()
        } else {
            cfg.postprocess.include_features.iter().filter_map(|f| idx(f)).collect()
        };
        // Values nobody reads (neither a model input nor in the output) are not computed.
        let needed: Vec<usize> = include
            .iter()
            .copied()
            .chain(rows.iter().filter_map(|r| match r {
                RowSource::Feature(i) => Some(*i),
                RowSource::Field(_) => None,
            }))
            .collect();
        features.compute_only(&needed);
        let score_keys = model.score_names().map(json::key).collect();
        let feature_keys = include.iter().map(|&i| json::key(&features.names()[i])).collect();
        let passthrough =
            cfg.postprocess.passthrough.iter().filter_map(|f| Some((json::key(f), schema.id(f)?))).collect();
        let version_json = serde_json::to_vec(model.version()).unwrap_or_default();
        let emitted_inputs =
            cfg.features.emitted.iter().map(|d| Input::new(&schema, d.field.as_deref(), d.filter.as_ref())).collect();
        let fingerprint = state_fingerprint(&cfg);
        let lookups = (!cfg.features.lookups.is_empty())
            .then(|| Joins::new(&cfg.features, &schema, Arc::new(Tables::new(&cfg.features))));
        let primary_score = if cfg.postprocess.score.is_empty() {
            (model.score_names().count() > 0).then_some(0)
        } else {
            model.score_names().position(|n| n == cfg.postprocess.score)
        };
        Self {
            primary_score,
            emitted: EmittedSet::new(&cfg.features.emitted),
            emitted_inputs,
            schema,
            score_keys,
            feature_keys,
            passthrough,
            version_json,
            ooo: cfg.source.max_out_of_orderness.as_millis_i64(),
            lateness: cfg.source.allowed_lateness.as_millis_i64(),
            max_future_skew: cfg.source.max_future_skew.as_millis_i64(),
            max_message_bytes: cfg.sink.message_max_bytes().unwrap_or(DEFAULT_MESSAGE_MAX_BYTES) as usize,
            clock: Box::new(|| chrono::Utc::now().timestamp_millis()),
            cfg,
            features,
            model,
            rows,
            include,
            stores,
            partitions: BTreeMap::new(),
            readers: Arc::default(),
            metrics,
            last_size: Instant::now() - std::time::Duration::from_secs(60),
            snapshot: None,
            fingerprint,
            checkpoints: None,
            replay_changed: false,
            seeks: Vec::new(),
            input_partitions: None,
            lookups,
        }
    }

    /// The lookup tables this engine joins (filled by `kafka::lookups`), when declared.
    pub fn lookup_tables(&self) -> Option<Arc<Tables>> {
        self.lookups.as_ref().map(|j| j.tables().clone())
    }

    /// An engine for `cfg`, with checkpoints when `state.checkpointStore` is set.
    pub fn from_config(
        cfg: Arc<PipelineConfig>,
        model: Arc<Model>,
        stores: StoreEnv,
        metrics: Arc<Metrics>,
    ) -> Result<Self, CheckpointError> {
        let cp = Checkpointer::start(
            &cfg.state,
            std::path::Path::new(&cfg.runtime.state_dir),
            model.version(),
            metrics.clone(),
        )?;
        let mut engine = Self::new(cfg, model, stores, metrics);
        engine.checkpoints = cp;
        Ok(engine)
    }

    /// The checkpointer, when checkpoints are configured.
    pub fn checkpointer(&self) -> Option<&Arc<Checkpointer>> {
        self.checkpoints.as_ref()
    }

    /// The state fingerprint of this pipeline ([`state_fingerprint`]).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The feature definitions.
    pub fn features(&self) -> &FeatureSet {
        &self.features
    }

    /// Uses `readers` (shared with the query API) for the owned partitions' flushed state.
    pub fn with_readers(mut self, readers: Readers) -> Self {
        self.readers = readers;
        self
    }

    /// Uses `clock` (epoch milliseconds) instead of the wall clock, e.g. in tests.
    pub fn with_clock(mut self, clock: impl Fn() -> i64 + Send + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Readers of the owned partitions' flushed state (for the query API).
    pub fn readers(&self) -> Readers {
        self.readers.clone()
    }

    /// Owned partitions.
    pub fn assigned(&self) -> Vec<i32> {
        self.partitions.keys().copied().collect()
    }

    /// Takes ownership of `partition` for a consumer whose group never committed it (tools,
    /// benchmarks): opens its store. Returns the stored next offset per topic.
    pub fn assign(&mut self, partition: i32) -> Result<BTreeMap<String, i64>, EngineError> {
        self.open_partition(partition, &BTreeMap::new())?;
        Ok(self.partitions.get(&partition).map(|c| c.next_offsets.clone()).unwrap_or_default())
    }

    /// Takes ownership of `partition`, whose consumer group has committed `committed` (next
    /// offset per topic; empty when it never committed), and decides where its state comes from:
    ///
    /// 1. the local store, when it was computed with this pipeline's fingerprint and holds every
    ///    committed record;
    /// 2. otherwise the newest checkpoint with this fingerprint that is ahead of the local store;
    /// 3. otherwise the local store if it is usable (behind: the input in between is replayed);
    /// 4. otherwise, when the group committed something, `state.missingCheckpoint`: rebuild from
    ///    the earliest retained record, or fail.
    ///
    /// Records from the state's offsets up to the committed offsets are processed without
    /// writing outputs (they were written before the partition moved).
    pub fn open_partition(
        &mut self,
        partition: i32,
        committed: &BTreeMap<String, i64>,
    ) -> Result<Assigned, EngineError> {
        if let Some(ctx) = self.partitions.get(&partition) {
            let start = ctx.next_offsets.iter().map(|(t, o)| (t.clone(), StartAt::Offset(*o))).collect();
            return Ok(Assigned { source: StateSource::Local, start, replay_until: ctx.replay_until.clone() });
        }
        let covers =
            |offsets: &BTreeMap<String, i64>| committed.iter().all(|(t, c)| offsets.get(t).is_some_and(|s| s >= c));
        // 1. The local store, if it exists and was computed with these definitions.
        let mut local = None;
        let mut unusable = None;
        if self.stores.exists(partition) {
            match self.stores.open(partition) {
                Ok(store) => match store.fingerprint()? {
                    Some(f) if f != self.fingerprint => {
                        unusable = Some(format!("the local store was computed with other definitions ({f})"));
                    }
                    _ => local = Some(store),
                },
                Err(e) => unusable = Some(format!("the local store is unusable ({e})")),
            }
        }
        let local_offsets = local.as_ref().map(|s| s.stored_offsets().clone());
        let mut source = match &local {
            Some(_) if committed.is_empty() || local_offsets.as_ref().is_some_and(covers) => StateSource::Local,
            Some(_) => StateSource::LocalBehind,
            None => StateSource::Empty,
        };
        let needs_state = !committed.is_empty() && !matches!(source, StateSource::Local);
        // 2. A checkpoint ahead of the local store.
        if needs_state {
            if let Some(cp) = self.checkpoints.clone() {
                drop(local.take()); // closed: a restore replaces its directory
                let into = self.stores.partition_path(partition);
                let restored = cp
                    .restore(partition, &self.fingerprint, local_offsets.as_ref(), &into)
                    .map_err(|source| EngineError::Checkpoint { partition, source })?;
                if let Some(r) = restored {
                    source = StateSource::Checkpoint(r.id);
                    unusable = None;
                }
            }
        }
        // A new consumer group (a blue/green candidate) with nothing local: the seed store's
        // newest checkpoint, and consumption from its offsets.
        if committed.is_empty() && source == StateSource::Empty {
            if let Some(cp) = self.checkpoints.clone().filter(|c| c.has_seed()) {
                let into = self.stores.partition_path(partition);
                if let Some(r) = cp
                    .restore_seed(partition, &self.fingerprint, &into)
                    .map_err(|source| EngineError::Checkpoint { partition, source })?
                {
                    source = StateSource::Seed(r.id);
                }
            }
        }
        // 4. Nothing usable.
        if needs_state && source == StateSource::Empty {
            let why = unusable.clone().unwrap_or_else(|| "this worker has no local state for it".into());
            let why = if self.checkpoints.is_some() {
                format!("{why} and no usable checkpoint exists")
            } else {
                format!("{why} and no checkpoint store is configured (state.checkpointStore)")
            };
            match self.cfg.state.missing_checkpoint {
                MissingCheckpoint::Fail => {
                    return Err(EngineError::MissingState { partition, committed: committed.clone(), why });
                }
                MissingCheckpoint::Rebuild => {
                    warn!(partition, ?committed, %why, "rebuilding the partition's state from its earliest retained record");
                    source = StateSource::Rebuild;
                }
            }
        }
        if unusable.is_some() && !matches!(source, StateSource::Checkpoint(_) | StateSource::Seed(_)) {
            drop(local.take());
            self.stores.wipe(partition).map_err(|source| EngineError::Wipe { partition, source })?;
        }
        if matches!(source, StateSource::Rebuild | StateSource::Empty) {
            if let Some(cp) = &self.checkpoints {
                cp.forget(partition);
            }
        }
        let store = match local {
            Some(s) => s,
            None => self.stores.open(partition)?,
        };
        if store.fingerprint()?.as_deref() != Some(self.fingerprint.as_str()) {
            store.set_fingerprint(&self.fingerprint)?;
        }
        if let Some(now) = self.input_partitions {
            match store.input_partitions()? {
                Some(then) if then != now => {
                    return Err(EngineError::PartitionsChanged { partition, then, now });
                }
                Some(_) => {}
                None => store.set_input_partitions(now)?,
            }
        }
        let stored = store.stored_offsets().clone();
        let mut start = BTreeMap::new();
        let mut replay_until = BTreeMap::new();
        if matches!(source, StateSource::Seed(_)) {
            for (t, &o) in &stored {
                start.insert(t.clone(), StartAt::Offset(o));
            }
        }
        for (t, &c) in committed {
            match stored.get(t) {
                Some(&s) => {
                    start.insert(t.clone(), StartAt::Offset(s));
                    if s < c {
                        replay_until.insert(t.clone(), c);
                    }
                }
                None => {
                    start.insert(t.clone(), StartAt::Beginning);
                    if c > 0 {
                        replay_until.insert(t.clone(), c);
                    }
                }
            }
        }
        let mut watermark = Watermark::new(self.ooo, self.lateness);
        if let Some(t) = store.stored_max_time() {
            watermark.restore(t);
        }
        self.readers.write().unwrap_or_else(|e| e.into_inner()).insert(partition, store.reader());
        let start_checks = start
            .iter()
            .filter_map(|(t, s)| match s {
                StartAt::Offset(o) => Some((t.clone(), StartCheck::new(*o))),
                StartAt::Beginning => None,
            })
            .collect();
        self.partitions.insert(
            partition,
            PartitionCtx {
                store,
                watermark,
                next_offsets: stored,
                in_snapshot: false,
                closed_through: i64::MIN,
                replay_until: replay_until.clone(),
                start_checks,
                source: source.clone(),
            },
        );
        self.metrics.partitions.set(self.partitions.len() as i64);
        self.metrics.assignments.get_or_create(&SourceLabel { source: source.label() }).inc();
        self.update_replaying();
        Ok(Assigned { source, start, replay_until })
    }

    /// The input topic's current partition count: a partition whose state was built under
    /// another count is refused ([`EngineError::PartitionsChanged`]).
    pub fn set_input_partitions(&mut self, n: usize) {
        self.input_partitions = Some(n).filter(|n| *n > 0);
    }

    /// Resolves a `StartAt::Beginning` of [`Engine::open_partition`]: the consumer starts
    /// `topic` of `partition` at `offset`, its earliest retained record. The state holds
    /// nothing below it (it is rebuilt from there), and the first record must be there.
    pub fn start_at(&mut self, partition: i32, topic: &str, offset: i64) {
        if let Some(ctx) = self.partitions.get_mut(&partition) {
            ctx.next_offsets.entry(topic.to_owned()).or_insert(offset);
            ctx.start_checks.insert(topic.to_owned(), StartCheck::new(offset));
        }
    }

    /// The seeks asked for by the last batches: the consumer must read each partition again
    /// from the offset its state expects (see [`StartCheck`]).
    pub fn take_seeks(&mut self) -> Vec<Seek> {
        for ctx in self.partitions.values_mut() {
            for c in ctx.start_checks.values_mut() {
                c.seek_pending = false;
            }
        }
        std::mem::take(&mut self.seeks)
    }

    /// Whether the set of replaying partitions changed since the last call.
    pub fn replaying_changed(&mut self) -> bool {
        std::mem::take(&mut self.replay_changed)
    }

    fn update_replaying(&mut self) {
        self.replay_changed = true;
        let n = self.partitions.values().filter(|c| !c.replay_until.is_empty()).count();
        self.metrics.partitions_replaying.set(n as i64);
    }

    /// Partitions whose state is still being brought up to the committed offsets, with how far.
    pub fn replaying(&self) -> Vec<String> {
        self.partitions
            .iter()
            .filter(|(_, c)| !c.replay_until.is_empty())
            .map(|(p, c)| {
                let progress: Vec<String> = c
                    .replay_until
                    .iter()
                    .map(|(t, u)| format!("{t} at {} of {u}", c.next_offsets.get(t).copied().unwrap_or(0)))
                    .collect();
                format!("partition {p} replaying its input to restore state ({})", progress.join(", "))
            })
            .collect()
    }

    /// A handle on `partition`'s store and the offsets of its last write, for a checkpoint
    /// after every write has completed (revoke, shutdown).
    pub fn durable_store(&self, partition: i32) -> Option<(StoreHandle, BTreeMap<String, i64>)> {
        let ctx = self.partitions.get(&partition)?;
        Some((ctx.store.handle(), ctx.store.stored_offsets().clone()))
    }

    /// Handles on every owned store, for checkpoints taken after the running write completes.
    pub fn store_handles(&self) -> Vec<(i32, StoreHandle)> {
        self.partitions.iter().map(|(p, c)| (*p, c.store.handle())).collect()
    }

    /// Gives up `partition` (call [`Engine::flush`] first) and closes its store.
    pub fn revoke(&mut self, partition: i32) {
        if self.partitions.remove(&partition).is_some_and(|c| !c.replay_until.is_empty()) {
            self.update_replaying();
        }
        if let Some(cp) = &self.checkpoints {
            // Another owner may checkpoint it next: what this process knew may be deleted.
            cp.forget(partition);
        }
        self.readers.write().unwrap_or_else(|e| e.into_inner()).remove(&partition);
        self.metrics.partitions.set(self.partitions.len() as i64);
    }

    /// Processes a batch; returns the records to write, in input order per partition.
    pub fn process<'a>(&mut self, batch: &'a [InRecord<'a>]) -> Result<Vec<OutRecord>, EngineError> {
        let mut out = Vec::with_capacity(batch.len());
        let mut pending: Vec<Pending<'a>> = Vec::with_capacity(batch.len());
        let limit = self.max_message_bytes;
        let now = (self.clock)();
        for rec in batch {
            // A record of a partition revoked while it was in flight: the new owner processes it.
            let Some(ctx) = self.partitions.get_mut(&rec.partition) else { continue };
            self.metrics.records_in.inc();
            if !ctx.start_checks.is_empty() {
                match check_start(ctx, rec, &self.metrics)? {
                    StartVerdict::Accept => {}
                    StartVerdict::Drop => continue,
                    StartVerdict::Seek(offset) => {
                        self.seeks.push(Seek { topic: rec.topic.to_owned(), partition: rec.partition, offset });
                        continue;
                    }
                }
            }
            let replay = ctx.replay_until.get(rec.topic).is_some_and(|u| rec.offset < *u);
            if replay {
                self.metrics.replayed.inc();
            }
            match ctx.next_offsets.get_mut(rec.topic) {
                Some(o) if rec.offset < *o => {
                    self.metrics.replay_skipped.inc();
                    continue;
                }
                Some(o) => *o = rec.offset + 1,
                None => {
                    ctx.next_offsets.insert(rec.topic.to_owned(), rec.offset + 1);
                }
            }
            let decoded = decode(&self.cfg, &self.schema, rec.payload)
                .and_then(|e| check_not_future(e.time, now, self.max_future_skew).map(|()| e));
            let mut event = match decoded {
                Ok(e) => e,
                Err(rej) => {
                    if !replay {
                        out.push(dead_letter(rec, self.topic_index(rec.topic), rej.reason, &rej.detail, limit));
                        self.metrics.dead_letter(rej.reason);
                    }
                    continue;
                }
            };
            if let Some(joins) = &self.lookups {
                joins.enrich(&mut event.fields, &self.metrics);
            }
            if ctx.watermark.forget_beyond(now.saturating_add(self.max_future_skew)) {
                tracing::warn!(
                    partition = rec.partition,
                    "the restored watermark was beyond the clock + maxFutureSkew (an event dated in the future, \
                     accepted before that check existed); it starts again from this event"
                );
            }
            if ctx.watermark.is_late(event.time) {
                match self.cfg.source.late_events {
                    LatePolicy::DeadLetter if replay => {}
                    LatePolicy::DeadLetter => {
                        let detail = format!(
                            "event time {} is below watermark {} minus allowed lateness {} ms",
                            event.time,
                            ctx.watermark.current(),
                            self.lateness
                        );
                        out.push(dead_letter(rec, self.topic_index(rec.topic), Reason::Late, &detail, limit));
                        self.metrics.dead_letter(Reason::Late);
                    }
                    LatePolicy::Drop => {
                        self.metrics.late_dropped.inc();
                    }
                }
                continue;
            }
            let horizon = ctx.watermark.observe(event.time);
            let slot = ctx.store.slot(&event.key)?;
            let state = ctx.store.state_mut(slot)?;
            let values = self.features.apply(&mut state.features, event.time, &event.fields, horizon);
            if !self.emitted.is_empty() {
                let inputs: Vec<Option<Scalar>> = self
                    .cfg
                    .features
                    .emitted
                    .iter()
                    .zip(&self.emitted_inputs)
                    .map(|(d, input)| aggregation_input(d.aggregation, input, &event.fields))
                    .collect();
                for end in self.emitted.on_event(&mut state.open_windows, event.time, &inputs) {
                    ctx.store.add_timer(end, &event.key);
                }
            }
            let row = self
                .rows
                .iter()
                .map(|s| match s {
                    RowSource::Feature(i) => values.get(*i).map_or(0.0, FeatureValue::as_model_input),
                    RowSource::Field(f) => event.fields.get(*f).and_then(|f| f.as_f64()).unwrap_or(0.0) as f32,
                })
                .collect();
            pending.push(Pending { partition: rec.partition, slot, replay, event, values, row, rec });
        }
        self.end_replays();
        self.close_windows(&mut out)?;
        if pending.is_empty() {
            return Ok(out);
        }
        let rows: Vec<Vec<f32>> = pending.iter_mut().map(|p| std::mem::take(&mut p.row)).collect();
        let started = Instant::now();
        let scored = self.model.score(&rows);
        self.metrics.inference_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.batch_size.observe(rows.len() as f64);
        let scores = match scored {
            Ok(s) => s,
            Err(e) => {
                // The model failed on this batch: dead-letter its records rather than stop.
                for p in pending.iter().filter(|p| !p.replay) {
                    out.push(dead_letter(
                        p.rec,
                        self.topic_index(p.rec.topic),
                        Reason::ScoringFailed,
                        &e.to_string(),
                        limit,
                    ));
                    self.metrics.dead_letter(Reason::ScoringFailed);
                }
                return Ok(out);
            }
        };
        let cfg = Arc::clone(&self.cfg);
        for (p, s) in pending.into_iter().zip(scores) {
            // NaN or ±inf (e.g. from inputs beyond f32) would be written as null and get no label.
            if let Some((name, x)) = self.model.score_names().zip(&s).find(|(_, x)| !x.is_finite()) {
                if !p.replay {
                    let detail = format!("the model gave score {name} = {x}, not a finite number");
                    out.push(dead_letter(p.rec, self.topic_index(p.rec.topic), Reason::ScoringFailed, &detail, limit));
                    self.metrics.dead_letter(Reason::ScoringFailed);
                }
                continue;
            }
            let label = self.label(&s).map(|i| cfg.postprocess.labels[i].label.as_str());
            let value = self.output_json(&p, &s, label);
            let size = wire_size(p.event.key.len(), value.len(), &[]);
            if size > limit {
                // Replayed: dead-lettered the first time; state as it was then (no last score).
                if !p.replay {
                    let detail =
                        format!("the output record would be {size} bytes; the producer's message.max.bytes is {limit}");
                    out.push(dead_letter(p.rec, self.topic_index(p.rec.topic), Reason::OutputTooLarge, &detail, limit));
                    self.metrics.dead_letter(Reason::OutputTooLarge);
                }
                continue;
            }
            let ctx = self.partitions.get_mut(&p.partition).ok_or(EngineError::Unassigned(p.partition))?;
            let (state, shaped) = ctx.store.state_and_mark(p.slot)?;
            let names = self.model.score_names();
            match &mut state.last_score {
                // Written by this engine before (`shaped`, a bit of the cached key): names and
                // model version are this model's already; only the values and label change.
                Some(l) if *shaped => {
                    l.event_time = p.event.time;
                    for (named, x) in l.scores.iter_mut().zip(&s) {
                        named.1 = *x;
                    }
                    if l.label.as_deref() != label {
                        l.label = label.map(Into::into);
                    }
                }
                // Same shape as last time (a key loaded from the store): update in place.
                Some(l) if l.scores.len() == s.len() && l.model_version == self.model.version() => {
                    l.event_time = p.event.time;
                    for ((name, v), (n, x)) in l.scores.iter_mut().zip(names.zip(&s)) {
                        if name != n {
                            *name = n.into();
                        }
                        *v = *x;
                    }
                    if l.label.as_deref() != label {
                        l.label = label.map(Into::into);
                    }
                }
                last => {
                    *last = Some(LastScore {
                        event_time: p.event.time,
                        scores: names.map(Into::into).zip(s.iter().copied()).collect(),
                        label: label.map(Into::into),
                        model_version: self.model.version().into(),
                    });
                }
            }
            *shaped = true;
            if p.replay {
                continue;
            }
            if let Some(primary) = self.primary_score {
                self.metrics.score.observe(s[primary]);
            }
            out.push(OutRecord::Scored {
                origin: self.origin(p.rec),
                key: p.event.key.into_owned(),
                value,
                received: p.rec.received,
                source_timestamp: p.rec.timestamp,
            });
        }
        Ok(out)
    }

    /// Closes, in every partition whose horizon advanced, the emitted windows ending at or
    /// before it, and appends them to `out`.
    fn close_windows(&mut self, out: &mut Vec<OutRecord>) -> Result<(), EngineError> {
        if self.emitted.is_empty() {
            return Ok(());
        }
        let first_topic = self.cfg.source.topics.first().cloned().unwrap_or_default();
        for (&partition, ctx) in self.partitions.iter_mut() {
            // Still below the committed offsets: these windows were written before.
            let replay = !ctx.replay_until.is_empty();
            let origin =
                Origin { topic: 0, partition, offset: ctx.next_offsets.get(&first_topic).map_or(0, |o| o - 1) };
            let horizon = ctx.watermark.horizon();
            if ctx.watermark.max_time().is_none() || horizon <= ctx.closed_through {
                continue;
            }
            ctx.closed_through = horizon;
            for (_, key) in ctx.store.take_due_timers(horizon)? {
                let state = ctx.store.get_mut(&key)?;
                for e in self.emitted.close(&mut state.open_windows, horizon) {
                    if replay {
                        continue;
                    }
                    let feature = &self.emitted.names()[e.feature];
                    let value = feature_record(&key, feature, &e);
                    let size = wire_size(key.len(), value.len(), &[]);
                    if size > self.max_message_bytes {
                        // Not expected (keys and input records are bounded), but never fatal.
                        let detail = format!(
                            "window {feature} [{}, {}) would be a {size}-byte record; the producer's \
                             message.max.bytes is {}",
                            e.start, e.end, self.max_message_bytes
                        );
                        let headers = vec![
                            ("streamscore.reason", Reason::OutputTooLarge.as_str().to_owned()),
                            ("streamscore.detail", detail),
                        ];
                        out.push(
                            fit_dead_letter(Some(key.as_bytes()), &value, headers, self.max_message_bytes)
                                .with_origin(origin),
                        );
                        self.metrics.dead_letter(Reason::OutputTooLarge);
                        continue;
                    }
                    out.push(OutRecord::Feature { origin, key: key.clone(), value });
                    self.metrics.windows_emitted.inc();
                }
            }
        }
        Ok(())
    }

    /// Ends the replay of every topic whose position reached its committed offset.
    fn end_replays(&mut self) {
        let mut changed = false;
        for (p, ctx) in &mut self.partitions {
            if ctx.replay_until.is_empty() {
                continue;
            }
            let next = &ctx.next_offsets;
            ctx.replay_until.retain(|t, u| next.get(t).is_none_or(|n| n < u));
            if ctx.replay_until.is_empty() {
                tracing::info!(partition = p, offsets = ?ctx.next_offsets, "state restored up to the committed offsets; writing outputs again");
                changed = true;
            }
        }
        if changed {
            self.update_replaying();
        }
    }

    /// Index of `topic` in `source.topics` (0 when not found).
    fn topic_index(&self, topic: &str) -> usize {
        self.cfg.source.topics.iter().position(|t| t == topic).unwrap_or(0)
    }

    fn origin(&self, rec: &InRecord<'_>) -> Origin {
        Origin { topic: self.topic_index(rec.topic), partition: rec.partition, offset: rec.offset }
    }

    /// The index of the label of the highest threshold the main score reaches.
    fn label(&self, scores: &[f64]) -> Option<usize> {
        let pp = &self.cfg.postprocess;
        let main = if pp.score.is_empty() {
            scores.first().copied()
        } else {
            self.model.score_names().position(|n| n == pp.score).and_then(|i| scores.get(i).copied())
        }?;
        pp.labels
            .iter()
            .enumerate()
            .filter(|(_, l)| main >= l.min_score)
            .max_by(|(_, a), (_, b)| a.min_score.total_cmp(&b.min_score))
            .map(|(i, _)| i)
    }

    /// The output record, written directly as JSON:
    /// `{"key","eventTime","topic","partition","offset","scores":{..},"label","features":{..},
    /// "fields":{..},"modelVersion"}`.
    fn output_json(&self, p: &Pending<'_>, scores: &[f64], label: Option<&str>) -> Vec<u8> {
        let mut o = Vec::with_capacity(384);
        o.extend_from_slice(b"{\"key\":");
        write_str(&mut o, &p.event.key);
        let _ = write!(o, ",\"eventTime\":{},\"topic\":", p.event.time);
        write_str(&mut o, p.rec.topic);
        let _ = write!(o, ",\"partition\":{},\"offset\":{},\"scores\":{{", p.partition, p.rec.offset);
        for (i, (k, s)) in self.score_keys.iter().zip(scores).enumerate() {
            if i > 0 {
                o.push(b',');
            }
            o.extend_from_slice(k);
            write_f64(&mut o, *s);
        }
        o.extend_from_slice(b"},\"label\":");
        match label {
            Some(l) => write_str(&mut o, l),
            None => o.extend_from_slice(b"null"),
        }
        o.extend_from_slice(b",\"features\":{");
        for (n, (k, &i)) in self.feature_keys.iter().zip(&self.include).enumerate() {
            if n > 0 {
                o.push(b',');
            }
            o.extend_from_slice(k);
            p.values[i].write_json(&mut o);
        }
        o.extend_from_slice(b"},\"fields\":{");
        let mut first = true;
        for (k, id) in &self.passthrough {
            if let Some(f) = p.event.fields.get(*id) {
                if !first {
                    o.push(b',');
                }
                first = false;
                o.extend_from_slice(k);
                o.extend_from_slice(f.raw.as_bytes());
            }
        }
        o.extend_from_slice(b"},\"modelVersion\":");
        o.extend_from_slice(&self.version_json);
        o.push(b'}');
        o
    }

    /// Makes the state of every owned partition durable up to the records processed so far.
    /// Returns the (topic, partition, next offset) list to commit to Kafka. Call it only when
    /// no [`Checkpoint`] from [`Engine::checkpoint`] is still unwritten.
    pub fn flush(&mut self) -> Result<Vec<(String, i32, i64)>, EngineError> {
        let mut cp = self.checkpoint(true)?;
        let commits = cp.commits.clone();
        cp.write()?;
        Ok(commits)
    }

    /// Snapshots the changes of every owned partition since the last checkpoint (serialised,
    /// not yet written) and the offsets they cover, in one go. `trim_allowed`: no earlier
    /// checkpoint is still unwritten.
    pub fn checkpoint(&mut self, trim_allowed: bool) -> Result<Checkpoint, EngineError> {
        if self.snapshot.is_none() {
            self.begin_checkpoint(trim_allowed);
        }
        loop {
            if let Some(cp) = self.checkpoint_step(usize::MAX)? {
                return Ok(cp);
            }
        }
    }

    /// Starts a checkpoint at the current offsets: from here on, the engine keeps processing
    /// and [`Engine::checkpoint_step`] serialises the snapshot a slice at a time (a key that
    /// changes first is serialised before the change). `trim_allowed`: no earlier checkpoint
    /// is still unwritten.
    pub fn begin_checkpoint(&mut self, trim_allowed: bool) {
        let (mut commits, mut stored) = (Vec::new(), Vec::new());
        for (p, ctx) in &mut self.partitions {
            ctx.in_snapshot = ctx.store.begin_snapshot(&ctx.next_offsets, ctx.watermark.max_time(), trim_allowed);
            for (t, o) in &ctx.next_offsets {
                commits.push((t.clone(), *p, commit_offset(ctx, t, *o)));
                stored.push((t.clone(), *p, *o));
            }
        }
        self.snapshot = Some((commits, stored));
    }

    /// Whether a checkpoint is being serialised.
    pub fn checkpoint_running(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Serialises up to `budget` keys of the running checkpoint; returns it once complete.
    pub fn checkpoint_step(&mut self, mut budget: usize) -> Result<Option<Checkpoint>, EngineError> {
        if self.snapshot.is_none() {
            return Ok(None);
        }
        for ctx in self.partitions.values_mut().filter(|c| c.in_snapshot) {
            if !ctx.store.snapshot_step(&mut budget)? {
                return Ok(None);
            }
        }
        let mut batches = Vec::new();
        for ctx in self.partitions.values_mut() {
            if std::mem::take(&mut ctx.in_snapshot) {
                batches.extend(ctx.store.finish_snapshot());
            }
        }
        if self.last_size.elapsed() >= std::time::Duration::from_secs(10) {
            self.last_size = Instant::now();
            let bytes: u64 = self.partitions.values().map(|c| c.store.size_bytes()).sum();
            self.metrics.state_bytes.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let (commits, stored) = self.snapshot.take().unwrap_or_default();
        Ok(Some(Checkpoint { batches, commits, stored }))
    }

    /// Per topic, the next offset of `partition` below which every input's output has been
    /// written (by this engine, or before a restore: the replay's end), for a cut-over barrier.
    pub fn output_positions(&self, partition: i32) -> BTreeMap<String, i64> {
        let Some(ctx) = self.partitions.get(&partition) else { return BTreeMap::new() };
        let mut out: BTreeMap<String, i64> =
            ctx.next_offsets.iter().map(|(t, o)| (t.clone(), commit_offset(ctx, t, *o))).collect();
        for (t, until) in &ctx.replay_until {
            out.entry(t.clone()).or_insert(*until);
        }
        out
    }

    /// Next offset to process per (topic, partition), for lag.
    pub fn positions(&self) -> Vec<(String, i32, i64)> {
        let mut v = Vec::new();
        for (p, ctx) in &self.partitions {
            for (t, o) in &ctx.next_offsets {
                v.push((t.clone(), *p, commit_offset(ctx, t, *o)));
            }
        }
        v
    }
}

impl StartCheck {
    fn new(expected: i64) -> Self {
        Self { expected, misplaced_at: None, seeks: 0, seek_pending: false }
    }
}

enum StartVerdict {
    /// Process the record (and every later one of its topic: the check is over).
    Accept,
    /// Drop it: a seek back was asked for in this batch, or it is below the start (the state
    /// holds it).
    Drop,
    /// Drop it and read the partition again from this offset.
    Seek(i64),
}

/// The first-record check of `rec`'s topic in its partition ([`StartCheck`]).
fn check_start(ctx: &mut PartitionCtx, rec: &InRecord<'_>, metrics: &Metrics) -> Result<StartVerdict, EngineError> {
    let Some(check) = ctx.start_checks.get_mut(rec.topic) else { return Ok(StartVerdict::Accept) };
    if check.seek_pending {
        return Ok(StartVerdict::Drop);
    }
    if rec.offset < check.expected {
        // Already in the state; `next_offsets` skips it. Still waiting for the first new one.
        return Ok(StartVerdict::Accept);
    }
    let gap = rec.offset > check.expected;
    if gap && check.misplaced_at != Some(rec.offset) {
        if check.seeks >= MAX_START_SEEKS {
            return Err(EngineError::Misplaced {
                partition: rec.partition,
                topic: rec.topic.to_owned(),
                expected: check.expected,
                got: rec.offset,
                seeks: check.seeks,
            });
        }
        tracing::warn!(
            partition = rec.partition,
            topic = rec.topic,
            expected = check.expected,
            got = rec.offset,
            "the first record of a newly assigned partition is past the offset its state needs next: \
             reading the partition again from there"
        );
        metrics.start_seeks.inc();
        check.seeks += 1;
        check.misplaced_at = Some(rec.offset);
        check.seek_pending = true;
        return Ok(StartVerdict::Seek(check.expected));
    }
    tracing::info!(
        partition = rec.partition,
        topic = rec.topic,
        offset = rec.offset,
        expected = check.expected,
        seeks = check.seeks,
        source = ?ctx.source,
        "first record of the partition read"
    );
    if gap {
        tracing::info!(
            partition = rec.partition,
            topic = rec.topic,
            expected = check.expected,
            first = rec.offset,
            "the log has no record between the expected offset and the first one (transaction markers or \
             compaction)"
        );
    }
    ctx.start_checks.remove(rec.topic);
    Ok(StartVerdict::Accept)
}

/// The offset to commit for `topic` of a partition whose state is at `next`: while the
/// partition replays, the group's committed offset (the replay's end), never below it, so a
/// commit during a replay does not make the next owner write those outputs again.
fn commit_offset(ctx: &PartitionCtx, topic: &str, next: i64) -> i64 {
    ctx.replay_until.get(topic).map_or(next, |until| next.max(*until))
}

fn feature_record(key: &str, feature: &str, e: &Emitted) -> Vec<u8> {
    let mut o = Map::new();
    o.insert("key".into(), Value::String(key.to_owned()));
    o.insert("feature".into(), Value::String(feature.to_owned()));
    o.insert("windowStart".into(), Value::from(e.start));
    o.insert("windowEnd".into(), Value::from(e.end));
    o.insert("value".into(), e.value.to_json());
    o.insert("count".into(), Value::from(e.count));
    serde_json::to_vec(&Value::Object(o)).unwrap_or_default()
}

fn headers(topic: &str, partition: i32, offset: i64, reason: Reason, detail: &str) -> Vec<(&'static str, String)> {
    vec![
        ("streamscore.reason", reason.as_str().to_owned()),
        ("streamscore.detail", detail.chars().take(512).collect()),
        ("streamscore.source.topic", topic.to_owned()),
        ("streamscore.source.partition", partition.to_string()),
        ("streamscore.source.offset", offset.to_string()),
    ]
}

impl OutRecord {
    /// The same record, coming from `origin`.
    pub fn with_origin(mut self, o: Origin) -> Self {
        match &mut self {
            OutRecord::Scored { origin, .. }
            | OutRecord::DeadLetter { origin, .. }
            | OutRecord::Feature { origin, .. } => {
                *origin = o;
            }
        }
        self
    }

    /// The input it comes from.
    pub fn origin(&self) -> Origin {
        match self {
            OutRecord::Scored { origin, .. }
            | OutRecord::DeadLetter { origin, .. }
            | OutRecord::Feature { origin, .. } => *origin,
        }
    }
}

fn dead_letter(rec: &InRecord<'_>, topic: usize, reason: Reason, detail: &str, limit: usize) -> OutRecord {
    let headers = headers(rec.topic, rec.partition, rec.offset, reason, detail);
    fit_dead_letter(rec.key, rec.payload.unwrap_or_default(), headers, limit).with_origin(Origin {
        topic,
        partition: rec.partition,
        offset: rec.offset,
    })
}

/// Framing librdkafka adds to a record when it checks `message.max.bytes` at produce time
/// (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length, attributes, timestamp and offset deltas, key and
/// value lengths, header count), and to each header (its two length varints).
const RECORD_FRAMING: usize = 36;
const HEADER_FRAMING: usize = 10;

/// A dead letter's key is cut to this many bytes when the record would not fit otherwise.
const DEAD_LETTER_KEY_MAX: usize = 1024;

/// The size librdkafka's producer compares with `message.max.bytes` (an upper bound of it).
pub fn wire_size(key: usize, value: usize, headers: &[(&str, String)]) -> usize {
    RECORD_FRAMING + key + value + headers.iter().map(|(k, v)| HEADER_FRAMING + k.len() + v.len()).sum::<usize>()
}

/// A dead letter of at most `limit` bytes ([`wire_size`]): whole when it fits; otherwise the
/// key is cut to [`DEAD_LETTER_KEY_MAX`] bytes (header `streamscore.truncated.key`: its original
/// size) and, if still needed, the value to what is left (header `streamscore.truncated.value`:
/// its original size). A prefix of the bytes, not necessarily valid UTF-8 or JSON.
pub fn fit_dead_letter(
    key: Option<&[u8]>,
    value: &[u8],
    mut headers: Vec<(&'static str, String)>,
    limit: usize,
) -> OutRecord {
    let mut key = key;
    let key_len = |k: Option<&[u8]>| k.map_or(0, <[u8]>::len);
    if let Some(k) = key.filter(|k| k.len() > DEAD_LETTER_KEY_MAX) {
        if wire_size(k.len(), value.len(), &headers) > limit {
            headers.push(("streamscore.truncated.key", k.len().to_string()));
            key = Some(&k[..DEAD_LETTER_KEY_MAX]);
        }
    }
    let mut value = value;
    if wire_size(key_len(key), value.len(), &headers) > limit {
        headers.push(("streamscore.truncated.value", value.len().to_string()));
        let room = limit.saturating_sub(wire_size(key_len(key), 0, &headers));
        value = &value[..value.len().min(room)];
    }
    OutRecord::DeadLetter { origin: Origin::default(), key: key.map(<[u8]>::to_vec), value: value.to_vec(), headers }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
