//! The Kafka loop: consume → engine → produce → (periodically) commit.
//!
//! ```text
//!  processing thread                                        committer thread
//!  BaseConsumer.poll ─► batch (≤ model batch, ≤ max delay)
//!    ─► Engine::process ─► ThreadedProducer.send (tagged with the commit epoch)
//!       (scored, dead-letter and closed-window records)
//!    every commitInterval: epoch += 1; Engine::checkpoint ──job──► 1. wait until every output of
//!      (serialise dirty keys; nothing is written here)              that epoch is acknowledged
//!                                                                 2. write the checkpoint (synced)
//!                                                                 3. commit its offsets to Kafka
//!  on revoke and on shutdown: the same, and wait for every job (synchronous).
//!
//!  with state.checkpointStore, every checkpointInterval the job also carries the stores: after
//!  step 3 the committer takes a RocksDB checkpoint of each changed one and queues its upload
//!  (`crate::checkpoint`); on revoke and shutdown each partition is checkpointed and uploaded
//!  before it is handed over.
//!  on assignment (rebalance callback, before the partitions are fetched): the group's committed
//!  offsets → `Engine::open_partition` (local store, checkpoint or rebuild) → each partition
//!  starts at its state's offsets; records below the committed offsets restore state only.
//! ```
//! A failed delivery or state write stops the worker without committing, so its inputs are
//! processed again after restart. Delivery is at-least-once for outputs; state never counts an
//! input twice, because the offsets stored with the state tell which inputs it already contains.
//! The processing thread only pays for serialising the changed keys: waiting for
//! acknowledgements, fsync and the offset commit happen beside it.
//!
//! ## Exactly-once (`sink.delivery: exactlyOnce`)
//!
//! A transactional producer (`transactional.id` `<groupId>.<pod>`, stable across container
//! restarts) writes each epoch's records in one Kafka transaction; the epoch ends on the
//! processing thread (Kafka allows one open transaction per producer):
//!
//! ```text
//!  processing thread                                   committer thread
//!  every commitInterval, on revoke, drain, shutdown:
//!   1. send_offsets_to_transaction(positions, group metadata)
//!   2. commit_transaction (flushes: every record of the epoch acknowledged)
//!   3. begin_transaction; epoch += 1; snapshot ──job──► 4. write the state with the offsets of 1
//!                                                         (no offset commit: 1 did it)
//! ```
//! The state is written only after the transaction that holds the outputs computed from it, so
//! the stored offsets are never ahead of the committed ones. Recovery after a crash at each step:
//!
//! | crash | committed offsets | state | after restart (`init_transactions` aborts the open transaction) |
//! |---|---|---|---|
//! | before 2 returns | previous epoch's | previous epoch's | the epoch is processed again and written once, in a new transaction |
//! | between 2 and 4 | this epoch's | previous epoch's | the epoch's inputs restore the state without writing outputs (`Engine::open_partition`'s replay) |
//! | after 4 | this epoch's | this epoch's | nothing to redo |
//!
//! A zombie (a worker that lost its partitions while paused) cannot commit: the group
//! coordinator rejects its offsets (its generation is stale, KIP-447), which aborts its
//! transaction. Any transaction error stops the worker without committing; the restart aborts
//! the open transaction.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use streamscore_crds::pipeline::{Delivery, PipelineConfig, ShadowConfig, StartPosition};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::admin::{DrainOptions, DrainReport, DrainedPartition};
use crate::checkpoint::Checkpointer;
use crate::engine::{Checkpoint, Engine, InRecord, OutRecord, StartAt};
use crate::metrics::{Metrics, PartitionLabel, PhaseLabel, StageLabel};
use crate::state::StoreHandle;

/// Readiness facts shared with the HTTP server.
#[derive(Debug, Default)]
pub struct Health {
    /// Model loaded and probed; otherwise the reason.
    pub model: RwLock<Option<Result<String, String>>>,
    /// The consumer joined its group (first assignment received, possibly empty).
    pub joined: AtomicBool,
    /// Brokers reachable: cleared on "all brokers down" and while acknowledgements are overdue;
    /// set by the input topic's metadata, an acknowledged output or a commit (not by consumed
    /// records: they may come from the prefetched queue).
    pub broker_ok: AtomicBool,
    /// The consumer has no connection to any broker (its statistics, every second).
    pub consumer_disconnected: AtomicBool,
    /// Owned partitions.
    pub assigned: AtomicUsize,
    /// Their numbers.
    pub partitions: RwLock<Vec<i32>>,
    /// Drain requests from the admin API (the operator's rescale).
    pub admin: crate::admin::Admin,
    /// The checkpointer, once the Kafka loop runs with a checkpoint store (admin status).
    pub checkpointer: std::sync::OnceLock<Arc<Checkpointer>>,
    /// Partition count of the first input topic (0 until known).
    pub input_partitions: AtomicUsize,
    /// Partitions whose state is being brought up to the committed offsets (not ready until
    /// they are).
    pub replaying: RwLock<Vec<String>>,
    /// Liveness of the processing loop (`/healthz`).
    pub heartbeat: Heartbeat,
    /// Set while a state write waits for space on the state volume (the error); consumption is
    /// paused meanwhile.
    pub state_volume_full: RwLock<Option<String>>,
}

/// When the processing loop last came round, and the long operation it is in (a restore, a
/// drain, a commit and checkpoint before a hand-over), if any. `/healthz` fails once it has not
/// come round for `runtime.stallTimeout` outside such an operation; before the loop starts
/// (model download, waiting for the brokers) it passes.
#[derive(Debug, Default)]
pub struct Heartbeat {
    last: Mutex<Option<Instant>>,
    operation: Mutex<Option<String>>,
    bound_ms: AtomicU64,
}

impl Heartbeat {
    /// The loop came round.
    pub fn beat(&self) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Sets the stall bound (`runtime.stallTimeout`).
    pub fn set_bound(&self, bound: Duration) {
        self.bound_ms.store(bound.as_millis() as u64, Ordering::Relaxed);
    }

    /// Runs `f`, a long but bounded operation of the loop, without counting it as a stall.
    pub fn during<T>(&self, what: impl Into<String>, f: impl FnOnce() -> T) -> T {
        let before = self.operation.lock().unwrap_or_else(|e| e.into_inner()).replace(what.into());
        let result = f();
        *self.operation.lock().unwrap_or_else(|e| e.into_inner()) = before;
        self.beat();
        result
    }

    /// Alive, or why not.
    pub fn check(&self) -> Result<(), String> {
        if self.operation.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return Ok(());
        }
        let bound = Duration::from_millis(self.bound_ms.load(Ordering::Relaxed));
        match *self.last.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(t) if !bound.is_zero() && t.elapsed() > bound => Err(format!(
                "the processing loop has not come round for {:.0} s (runtime.stallTimeout {:.0} s): blocked, e.g. \
                 waiting for acknowledgements from unreachable brokers",
                t.elapsed().as_secs_f64(),
                bound.as_secs_f64()
            )),
            _ => Ok(()),
        }
    }
}

impl Health {
    /// Alive, or why not: the processing loop came round within `runtime.stallTimeout`. A
    /// worker waiting for space on its state volume is alive (a restart would not free any).
    pub fn liveness(&self) -> Result<(), String> {
        if self.volume_full().is_some() {
            return Ok(());
        }
        self.heartbeat.check()
    }

    /// The state-write error while the state volume is full.
    pub fn volume_full(&self) -> Option<String> {
        self.state_volume_full.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the owned partitions.
    pub fn set_partitions(&self, partitions: Vec<i32>) {
        self.assigned.store(partitions.len(), Ordering::Relaxed);
        *self.partitions.write().unwrap_or_else(|e| e.into_inner()) = partitions;
    }

    /// Ready to serve, or the reasons why not.
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut why = Vec::new();
        match &*self.model.read().unwrap_or_else(|e| e.into_inner()) {
            Some(Ok(_)) => {}
            Some(Err(e)) => why.push(format!("model not loaded: {e}")),
            None => why.push("model loading".into()),
        }
        if !self.broker_ok.load(Ordering::Relaxed) {
            why.push("Kafka brokers unreachable".into());
        } else if self.consumer_disconnected.load(Ordering::Relaxed) {
            why.push("Kafka brokers unreachable (no connection to any broker)".into());
        }
        if !self.joined.load(Ordering::Relaxed) {
            why.push("consumer has not joined its group yet".into());
        }
        why.extend(self.replaying.read().unwrap_or_else(|e| e.into_inner()).iter().cloned());
        if let Some(e) = self.volume_full() {
            why.push(format!(
                "state volume full ({e}): consumption paused, the state write is retried every second until space \
                 returns ({} MiB free per store)",
                crate::state::RESUME_FREE_BYTES >> 20
            ));
        }
        if let Err(stalled) = self.liveness() {
            why.push(stalled);
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why)
        }
    }
}

/// Resolves `${env:NAME}` and `${file:/path}` in a Kafka property value.
pub fn resolve_property(value: &str) -> Result<String, String> {
    if let Some(name) = value.strip_prefix("${env:").and_then(|v| v.strip_suffix('}')) {
        return std::env::var(name).map_err(|_| format!("environment variable {name} is not set"));
    }
    if let Some(path) = value.strip_prefix("${file:").and_then(|v| v.strip_suffix('}')) {
        return std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\n', '\r']).to_owned())
            .map_err(|e| format!("cannot read {path}: {e}"));
    }
    Ok(value.to_owned())
}

struct ConsumerCtx {
    shared: Arc<Shared>,
    /// `startFrom: timestamp`: where partitions the group never committed start.
    start_timestamp: Option<i64>,
}

impl ConsumerCtx {
    /// Opens the state of every newly assigned partition (local store, checkpoint or rebuild:
    /// `Engine::open_partition`) and sets where each starts: at its state's offsets, so that
    /// the records between them and the group's committed offsets restore the state first.
    /// Blocking (broker calls, downloads), once per assignment, before fetching starts.
    fn open_assigned(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                // Without them the state cannot be checked against what the group has done.
                self.shared.fail(format!("reading the committed offsets of the assigned partitions: {e}"));
                return;
            }
        };
        let mut by_partition: BTreeMap<i32, BTreeMap<String, i64>> = BTreeMap::new();
        for e in committed.elements() {
            let offsets = by_partition.entry(e.partition()).or_default();
            if let Offset::Offset(o) = e.offset() {
                if o > 0 {
                    offsets.insert(e.topic().to_owned(), o);
                }
            }
        }
        let mut engine = self.shared.engine.lock().unwrap_or_else(|e| e.into_inner());
        for (p, committed) in by_partition {
            let started = Instant::now();
            let assigned = match engine.open_partition(p, &committed) {
                Ok(a) => a,
                Err(e) => {
                    self.shared.fail(format!("opening the state of partition {p}: {e}"));
                    continue;
                }
            };
            for (topic, start) in &assigned.start {
                let offset = match start {
                    StartAt::Offset(o) => Offset::Offset(*o),
                    StartAt::Beginning => Offset::Beginning,
                };
                let _ = tpl.set_partition_offset(topic, p, offset);
                if let (StartAt::Offset(from), Some(until)) = (start, assigned.replay_until.get(topic)) {
                    // Records the topic no longer retains cannot be replayed: say so.
                    if let Ok((low, _)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
                        if low > *from {
                            warn!(
                                topic,
                                partition = p,
                                from,
                                low,
                                until,
                                "records needed to restore the state are no longer retained; the state misses them"
                            );
                        }
                    }
                }
            }
            info!(
                partition = p,
                source = ?assigned.source,
                start = ?assigned.start,
                replay_until = ?assigned.replay_until,
                took = ?started.elapsed(),
                "partition state opened"
            );
        }
        *self.shared.health.replaying.write().unwrap_or_else(|e| e.into_inner()) = engine.replaying();
    }

    /// With `startFrom: timestamp`, sets the start offset of every assigned partition that the
    /// group has never committed to its first record at or after the timestamp (the end when
    /// there is none). Blocking broker calls, once per assignment.
    fn place_at_timestamp(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let Some(ts) = self.start_timestamp else { return };
        let timeout = Duration::from_secs(10);
        let committed = match consumer.committed_offsets(tpl.clone(), timeout) {
            Ok(c) => c,
            Err(e) => {
                // Unknown: leave the partitions to the committed offsets / auto.offset.reset.
                warn!(error = %e, "cannot read committed offsets; startFrom timestamp not applied");
                return;
            }
        };
        let mut wanted = TopicPartitionList::new();
        for e in committed.elements() {
            // Placed already (state seeded from another run's checkpoint): keep it.
            let placed =
                tpl.find_partition(e.topic(), e.partition()).is_some_and(|x| matches!(x.offset(), Offset::Offset(_)));
            if !matches!(e.offset(), Offset::Offset(_)) && !placed {
                let _ = wanted.add_partition_offset(e.topic(), e.partition(), Offset::Offset(ts));
            }
        }
        if wanted.count() == 0 {
            return;
        }
        match consumer.offsets_for_times(wanted, timeout) {
            Ok(found) => {
                for e in found.elements() {
                    // No record at or after the timestamp: librdkafka answers End (-1).
                    let start = match e.offset() {
                        Offset::Offset(o) => Offset::Offset(o),
                        _ => Offset::End,
                    };
                    info!(topic = e.topic(), partition = e.partition(), ?start, timestamp = ts, "startFrom timestamp");
                    let _ = tpl.set_partition_offset(e.topic(), e.partition(), start);
                }
            }
            Err(e) => {
                self.shared.fail(format!("looking up offsets for startTimestampMs {ts}: {e}"));
            }
        }
    }
}

struct ProducerCtx {
    metrics: Arc<Metrics>,
    failures: AtomicU64,
    health: Arc<Health>,
    acks: Arc<Acks>,
}

/// Commit epochs kept in flight at most (plus the open one); the ring below is larger.
const MAX_PENDING_COMMITS: usize = 2;
const EPOCH_SLOTS: usize = 16;

/// Outputs sent and acknowledged (or failed) per commit epoch, in a ring indexed by epoch.
/// A slot is reused 16 epochs later, long after its epoch completed.
#[derive(Debug, Default)]
struct Acks {
    sent: [AtomicU64; EPOCH_SLOTS],
    done: [AtomicU64; EPOCH_SLOTS],
}

impl Acks {
    fn slot(epoch: u64) -> usize {
        (epoch % EPOCH_SLOTS as u64) as usize
    }

    fn complete(&self, epoch: u64) -> bool {
        let i = Self::slot(epoch);
        self.done[i].load(Ordering::Acquire) >= self.sent[i].load(Ordering::Acquire)
    }

    fn reset(&self, epoch: u64) {
        let i = Self::slot(epoch);
        self.sent[i].store(0, Ordering::Release);
        self.done[i].store(0, Ordering::Release);
    }
}

/// A checkpoint for the committer thread.
struct Job {
    epoch: u64,
    checkpoint: Checkpoint,
    /// Stores to checkpoint to the object store once this job is written.
    uploads: Vec<(i32, StoreHandle)>,
    /// Commit the offsets from the committer thread (false: the caller commits them itself,
    /// e.g. inside a rebalance callback).
    commit_offsets: bool,
}

/// The processing thread's end of the committer.
struct Committer {
    jobs: SyncSender<Job>,
    replies: Receiver<Result<u64, String>>,
    /// Jobs sent and not answered.
    pending: usize,
    /// The open epoch (outputs sent now are tagged with it).
    epoch: u64,
    /// The epoch whose checkpoint is being serialised.
    running: Option<u64>,
    /// The stores to checkpoint with it.
    running_uploads: Vec<(i32, StoreHandle)>,
    /// When the last object-store checkpoint was requested.
    last_upload: Instant,
}

/// What the consumer context, the loop and the HTTP server share.
struct Shared {
    engine: Mutex<Engine>,
    committer: Mutex<Option<Committer>>,
    epoch: AtomicU64,
    acks: Arc<Acks>,
    producer: ThreadedProducer<ProducerCtx>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    sink_topic: String,
    dlq_topic: String,
    feature_topic: String,
    /// `source.topics` (an output's origin names its topic by index).
    input_topics: Vec<String>,
    fatal: Mutex<Option<String>>,
    /// Object-store checkpoints, when configured, and how often.
    checkpoints: Option<Arc<Checkpointer>>,
    checkpoint_every: Duration,
    /// Fires on SIGTERM; from then on the committer waits at most `shutdown_timeout` for
    /// acknowledgements.
    cancel: CancellationToken,
    shutdown_timeout: Duration,
    /// `sink.delivery: exactlyOnce`: the producer is transactional (see the module docs).
    exactly_once: bool,
    /// The offsets of the last committed transaction.
    last_transaction: Mutex<Vec<(String, i32, i64)>>,
}

/// The part of librdkafka's statistics the worker reads: each broker's connection state.
#[derive(serde::Deserialize)]
struct BrokerStates {
    #[serde(default)]
    brokers: BTreeMap<String, BrokerState>,
}

#[derive(serde::Deserialize)]
struct BrokerState {
    nodeid: i32,
    state: String,
}

impl ClientContext for ConsumerCtx {
    /// Every second (`statistics.interval.ms`): the brokers are reachable while the consumer is
    /// connected to at least one of them (an idle consumer whose broker went away gets no
    /// error event; its connection states say so).
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(s) = serde_json::from_slice::<BrokerStates>(statistics) else { return };
        let brokers: Vec<&BrokerState> = s.brokers.values().filter(|b| b.nodeid >= 0).collect();
        if !brokers.is_empty() {
            let up = brokers.iter().any(|b| b.state == "UP");
            let was = !self.shared.health.consumer_disconnected.swap(!up, Ordering::Relaxed);
            if was != up {
                if up {
                    info!("Kafka brokers reachable again");
                } else {
                    warn!("no connection to any Kafka broker");
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.shared.health.broker_ok.store(false, Ordering::Relaxed);
        }
        warn!(%error, reason, "Kafka consumer error");
    }
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.health.broker_ok.store(false, Ordering::Relaxed);
        }
        warn!(%error, reason, "Kafka producer error");
    }
}

impl ProducerCtx {
    /// Latency metrics of an acknowledged scored record.
    fn observe_scored(&self, received: Instant, source_ts: Option<i64>, sent: Instant) {
        let total = received.elapsed().as_secs_f64();
        self.metrics.latency.observe(total);
        let stage = |name: &'static str, secs: f64| {
            self.metrics.stage_seconds.get_or_create(&StageLabel { stage: name }).observe(secs.max(0.0));
        };
        stage("process", sent.saturating_duration_since(received).as_secs_f64());
        stage("produce", sent.elapsed().as_secs_f64());
        if let Some(ts) = source_ts {
            let now = chrono::Utc::now().timestamp_millis();
            let e2e = (now - ts).max(0) as f64 / 1000.0;
            self.metrics.event_latency.observe(e2e);
            stage("fetch", e2e - total);
        }
    }
}

impl ProducerContext for ProducerCtx {
    /// (consumed, input record timestamp, commit epoch, handed to the producer). Only scored
    /// records carry the consume instant: dead letters and emitted windows are not in the
    /// latency histograms.
    type DeliveryOpaque = Box<(Option<Instant>, Option<i64>, u64, Instant)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (received, source_ts, epoch, sent) = *opaque;
        if result.is_ok() {
            self.health.broker_ok.store(true, Ordering::Relaxed);
        }
        match (result, received) {
            (Ok(_), Some(received)) => self.observe_scored(received, source_ts, sent),
            (Ok(_), None) => {}
            (Err((e, _)), _) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.delivery_errors.inc();
                error!(error = %e, "output record not acknowledged by the broker");
            }
        }
        self.acks.done[Acks::slot(epoch)].fetch_add(1, Ordering::AcqRel);
    }
}

impl ConsumerContext for ConsumerCtx {
    /// As rdkafka's default, plus `place_at_timestamp` before an assignment takes effect.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let heartbeat = &self.shared.health.heartbeat;
                heartbeat.during("opening the assigned partitions' state", || self.open_assigned(consumer, tpl));
                self.place_at_timestamp(consumer, tpl);
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                let done = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = done {
                    self.shared.fail(format!("assigning partitions: {e}"));
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let heartbeat = &self.shared.health.heartbeat;
                heartbeat.during("committing revoked partitions", || {
                    self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                });
                let done = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = done {
                    self.shared.fail(format!("revoking partitions: {e}"));
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                error!(error = %code, "rebalance error");
                let _ = consumer.unassign();
                self.post_rebalance(consumer, &Rebalance::Error(KafkaError::Rebalance(code)));
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut engine = self.shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            let closing = self.shared.committer.lock().unwrap_or_else(|e| e.into_inner()).is_none();
            if closing {
                // The consumer closes after the shutdown: everything was committed and
                // checkpointed then, and the committer has stopped.
                debug!(?revoked, "partitions revoked at close (committed at shutdown)");
            } else {
                info!(?revoked, "partitions revoked: committing before handing them over");
                match commit_sync(&self.shared, &mut engine, consumer) {
                    Ok(()) => checkpoint_now(&self.shared, &engine, &revoked),
                    Err(e) => self.shared.fail(format!("commit on revoke failed: {e}")),
                }
            }
            for p in revoked {
                engine.revoke(p);
            }
            // A partition this worker no longer owns has no lag here (its new owner reports it).
            for e in tpl.elements() {
                let label = PartitionLabel { topic: e.topic().to_owned(), partition: e.partition() };
                self.shared.metrics.consumer_lag.remove(&label);
            }
            *self.shared.health.replaying.write().unwrap_or_else(|e| e.into_inner()) = engine.replaying();
            self.shared.health.set_partitions(engine.assigned());
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                // A partition whose state could not be opened must not be processed at all.
                return;
            }
            let parts: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut engine = self.shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            for p in &parts {
                match engine.assign(*p) {
                    Ok(offsets) => info!(partition = p, ?offsets, "partition assigned"),
                    Err(e) => self.shared.fail(format!("opening state of partition {p}: {e}")),
                }
            }
            self.shared.health.set_partitions(engine.assigned());
            self.shared.health.joined.store(true, Ordering::Relaxed);
            self.shared.health.admin.assigned();
            if self.shared.health.admin.fenced() {
                // Stopped at a cut-over barrier: partitions taken over from a stopping peer
                // must not be processed by this run either.
                match consumer.pause(tpl) {
                    Ok(()) => info!(partitions = ?parts, "assigned while fenced: kept paused"),
                    Err(e) => self.shared.fail(format!("pausing partitions assigned while fenced: {e}")),
                }
            } else if let Err(e) = consumer.resume(tpl) {
                // A drain paused this consumer's partitions and the assignment ended it; a
                // partition revoked while paused keeps librdkafka's pause flag when it comes
                // back to this consumer, so every assigned partition is resumed explicitly.
                self.shared.fail(format!("resuming assigned partitions: {e}"));
            }
        }
    }
}

impl Shared {
    fn fail(&self, why: String) {
        error!(%why, "stopping the worker without committing further");
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(why);
    }

    /// Hands `rec` to the producer: to the `sink` topics, or in shadow mode (a blue/green
    /// candidate) to the shadow topics unless its input is at or past the cut-over barrier.
    fn send(&self, rec: OutRecord, shadow: Option<&ShadowConfig>) {
        let o = rec.origin();
        let shadow = shadow
            .filter(|s| !s.is_live(self.input_topics.get(o.topic).map_or("", String::as_str), o.partition, o.offset));
        if shadow.is_some() {
            self.metrics.shadow_out.inc();
        }
        let (topic, key, value, headers, received) = match rec {
            OutRecord::Scored { key, value, received, source_timestamp, .. } => {
                let topic = shadow.map_or(&self.sink_topic, |s| &s.topic);
                if shadow.is_none() {
                    self.metrics.records_out.inc();
                }
                (topic, Some(key.into_bytes()), value, None, (Some(received), source_timestamp))
            }
            OutRecord::DeadLetter { key, value, headers, .. } => {
                let mut h = OwnedHeaders::new_with_capacity(headers.len());
                for (k, v) in &headers {
                    h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
                }
                (shadow.map_or(&self.dlq_topic, |s| &s.dead_letter_topic), key, value, Some(h), (None, None))
            }
            OutRecord::Feature { key, value, .. } => {
                let topic = shadow.and_then(|s| s.feature_topic.as_ref()).unwrap_or(&self.feature_topic);
                (topic, Some(key.into_bytes()), value, None, (None, None))
            }
        };
        let epoch = self.epoch.load(Ordering::Acquire);
        self.acks.sent[Acks::slot(epoch)].fetch_add(1, Ordering::AcqRel);
        let opaque = Box::new((received.0, received.1, epoch, Instant::now()));
        let mut record = BaseRecord::with_opaque_to(topic, opaque).payload(&value);
        if let Some(k) = &key {
            record = record.key(k);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if self.cancel.is_cancelled() => {
                    // Stopping with a full queue (brokers unreachable): give up without
                    // committing; the inputs are processed again after restart.
                    self.acks.done[Acks::slot(epoch)].fetch_add(1, Ordering::AcqRel);
                    self.fail("stopping while the producer queue is full (brokers unreachable?)".into());
                    return;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => {
                    // Never acknowledged: count it as done so the epoch does not wait for it;
                    // the failure stops the worker before anything is committed.
                    self.acks.done[Acks::slot(epoch)].fetch_add(1, Ordering::AcqRel);
                    self.producer.context().failures.fetch_add(1, Ordering::Relaxed);
                    self.fail(format!("cannot enqueue output record: {e}"));
                    return;
                }
            }
        }
    }
}

/// Keys serialised per step of a running checkpoint, between two input batches (~0.5-1 ms).
const SNAPSHOT_STEP_KEYS: usize = 256;

impl Shared {
    /// Exactly-once: commits the open transaction with `offsets` (the input positions its
    /// records came from) and opens the next one. Steps 1–3 of the module docs.
    fn commit_transaction(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), String> {
        let started = Instant::now();
        let timeout = self.shutdown_timeout.max(Duration::from_secs(10));
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, next) in offsets {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                    .map_err(|e| format!("offsets for the transaction: {e}"))?;
            }
            let group = consumer.group_metadata().ok_or("the consumer has no group metadata")?;
            self.producer
                .send_offsets_to_transaction(&tpl, &group, timeout)
                .map_err(|e| format!("adding the input offsets to the transaction: {e}"))?;
        }
        // Fault injection counts only transactions that carry progress.
        let progressed = {
            let mut last = self.last_transaction.lock().unwrap_or_else(|e| e.into_inner());
            let p = last.as_slice() != offsets;
            if p {
                *last = offsets.to_vec();
            }
            p
        };
        if progressed {
            crate::fault::point("transaction-commit");
        }
        self.producer.commit_transaction(timeout).map_err(|e| format!("committing the transaction: {e}"))?;
        if progressed {
            crate::fault::point("after-transaction-commit");
        }
        self.metrics.commits.inc();
        self.health.broker_ok.store(true, Ordering::Relaxed);
        self.observe_phase("transaction", started);
        self.producer.begin_transaction().map_err(|e| format!("beginning a transaction: {e}"))?;
        Ok(())
    }

    /// Closes the current epoch and starts a checkpoint at the current offsets; the outputs
    /// sent so far must be acknowledged before it is written.
    fn begin_commit(&self, engine: &mut Engine) -> Result<(), String> {
        let mut guard = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        let c = guard.as_mut().ok_or("committer stopped")?;
        c.collect(false)?;
        if c.running.is_some() {
            return Ok(());
        }
        let started = Instant::now();
        c.running = Some(c.epoch);
        c.epoch += 1;
        if self.checkpoints.is_some() && c.last_upload.elapsed() >= self.checkpoint_every {
            c.last_upload = Instant::now();
            c.running_uploads = engine.store_handles();
        }
        // New outputs belong to the next epoch from here on.
        self.epoch.store(c.epoch, Ordering::Release);
        engine.begin_checkpoint(c.pending == 0);
        self.observe_phase("snapshot", started);
        Ok(())
    }

    /// Serialises the next slice of the running checkpoint, if any; hands it to the committer
    /// once complete (waiting while `MAX_PENDING_COMMITS` are in flight).
    fn step_commit(&self, engine: &mut Engine, budget: usize, commit_offsets: bool) -> Result<(), String> {
        let mut guard = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        let c = guard.as_mut().ok_or("committer stopped")?;
        let Some(epoch) = c.running else { return Ok(()) };
        let started = Instant::now();
        let step = engine.checkpoint_step(budget).map_err(|e| e.to_string())?;
        self.observe_phase("snapshot", started);
        let Some(checkpoint) = step else { return Ok(()) };
        c.running = None;
        let uploads = std::mem::take(&mut c.running_uploads);
        while c.pending >= MAX_PENDING_COMMITS {
            c.wait_one()?;
        }
        c.jobs.send(Job { epoch, checkpoint, uploads, commit_offsets }).map_err(|_| "committer stopped".to_owned())?;
        c.pending += 1;
        Ok(())
    }

    fn observe_phase(&self, phase: &'static str, since: Instant) {
        self.metrics.commit_seconds.get_or_create(&PhaseLabel { phase }).observe(since.elapsed().as_secs_f64());
    }
}

impl Committer {
    /// Takes the replies that are in (all of them, waiting, with `wait`).
    fn collect(&mut self, wait: bool) -> Result<(), String> {
        while self.pending > 0 {
            let reply = if wait {
                self.replies.recv().map_err(|_| "committer stopped".to_owned())?
            } else {
                match self.replies.try_recv() {
                    Ok(r) => r,
                    Err(_) => return Ok(()),
                }
            };
            self.pending -= 1;
            reply?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<(), String> {
        let reply = self.replies.recv().map_err(|_| "committer stopped".to_owned())?;
        self.pending -= 1;
        reply.map(|_| ())
    }
}

/// Commits everything processed so far and waits for it: every output acknowledged, state
/// durable, offsets committed (from this thread, which may be inside a rebalance callback).
fn commit_sync(shared: &Shared, engine: &mut Engine, consumer: &BaseConsumer<ConsumerCtx>) -> Result<(), String> {
    let started = Instant::now();
    // Finish the running checkpoint, then take one at the current offsets.
    shared.step_commit(engine, usize::MAX, false)?;
    if shared.exactly_once {
        shared.commit_transaction(consumer, &engine.positions())?;
    }
    shared.begin_commit(engine)?;
    shared.step_commit(engine, usize::MAX, false)?;
    {
        let mut guard = shared.committer.lock().unwrap_or_else(|e| e.into_inner());
        guard.as_mut().ok_or("committer stopped")?.collect(true)?;
    }
    let offsets = engine.positions();
    if !offsets.is_empty() && !shared.exactly_once {
        commit_offsets(shared, consumer, &offsets, CommitMode::Sync);
    }
    debug!(took = ?started.elapsed(), partitions = offsets.len(), "committed (synchronously)");
    Ok(())
}

fn commit_offsets(
    shared: &Shared,
    consumer: &BaseConsumer<ConsumerCtx>,
    offsets: &[(String, i32, i64)],
    mode: CommitMode,
) {
    let started = Instant::now();
    let mut tpl = TopicPartitionList::new();
    for (topic, partition, next) in offsets {
        if let Err(e) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            warn!(error = %e, topic, partition, "cannot commit offset");
        }
    }
    match consumer.commit(&tpl, mode) {
        Ok(()) => {
            shared.metrics.commits.inc();
            shared.health.broker_ok.store(true, Ordering::Relaxed);
        }
        Err(e) => warn!(error = %e, "offset commit failed; state offsets remain authoritative"),
    }
    shared
        .metrics
        .commit_seconds
        .get_or_create(&PhaseLabel { phase: "offsets" })
        .observe(started.elapsed().as_secs_f64());
}

/// The committer thread: for each checkpoint, waits for its epoch's acknowledgements, writes
/// it, commits its offsets. Stops at the first failure (reported) or when the sender is gone.
fn committer_loop(
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    jobs: Receiver<Job>,
    replies: SyncSender<Result<u64, String>>,
) {
    let phase = |name: &'static str, since: Instant| shared.observe_phase(name, since);
    let mut last_lag = Instant::now() - Duration::from_secs(60);
    let mut stopping_since: Option<Instant> = None;
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let mut warned = Instant::now();
        let result = loop {
            if shared.acks.complete(job.epoch) {
                break Ok(());
            }
            if shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                break Err("stopping".to_owned());
            }
            if shared.cancel.is_cancelled()
                && stopping_since.get_or_insert_with(Instant::now).elapsed() >= shared.shutdown_timeout
            {
                break Err(format!(
                    "outputs not acknowledged within runtime.shutdownTimeout ({:?}) after the stop signal (brokers \
                     unreachable?): exiting without committing them; their inputs are processed again after restart",
                    shared.shutdown_timeout
                ));
            }
            if warned.elapsed() >= Duration::from_secs(5) {
                warned = Instant::now();
                shared.health.broker_ok.store(false, Ordering::Relaxed);
                warn!(waited = ?started.elapsed(), "waiting for output acknowledgements (broker unreachable?)");
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let result = result.and_then(|()| {
            phase("ack", started);
            shared.acks.reset(job.epoch);
            let failures = shared.producer.context().failures.load(Ordering::Relaxed);
            if failures > 0 {
                return Err(format!("{failures} output records were not acknowledged"));
            }
            // Fault injection counts only checkpoints that carry changes.
            let changed = job.checkpoint.size_bytes() > 0;
            if changed {
                crate::fault::point("state-write");
            }
            let written = Instant::now();
            let commits = job.checkpoint.commits.clone();
            let stored = job.checkpoint.stored.clone();
            write_state(&shared, job.checkpoint)?;
            phase("state", written);
            // The stores now hold exactly the state as of `commits`: checkpoint them.
            if let Some(cp) = &shared.checkpoints {
                for (p, handle) in &job.uploads {
                    let offsets: BTreeMap<String, i64> =
                        stored.iter().filter(|c| c.1 == *p).map(|(t, _, o)| (t.clone(), *o)).collect();
                    if let Err(e) = cp.submit(*p, handle, offsets) {
                        shared.metrics.checkpoint_failures.inc();
                        warn!(partition = p, error = %e, "cannot take a checkpoint; the next one retries");
                    }
                }
            }
            if job.commit_offsets && !commits.is_empty() {
                if !shared.exactly_once {
                    if changed {
                        crate::fault::point("offset-commit");
                    }
                    commit_offsets(&shared, &consumer, &commits, CommitMode::Sync);
                }
                if last_lag.elapsed() >= Duration::from_secs(5) {
                    last_lag = Instant::now();
                    let owned = shared.health.partitions.read().unwrap_or_else(|e| e.into_inner()).clone();
                    for (topic, partition, next) in commits.iter().filter(|c| owned.contains(&c.1)) {
                        if let Ok((_, high)) = consumer.fetch_watermarks(topic, *partition, Duration::from_millis(500))
                        {
                            shared
                                .metrics
                                .consumer_lag
                                .get_or_create(&PartitionLabel { topic: topic.clone(), partition: *partition })
                                .set((high - next).max(0));
                        }
                    }
                }
            }
            Ok(job.epoch)
        });
        let failed = result.is_err();
        if let Err(e) = &result {
            shared.fail(format!("commit failed: {e}"));
        }
        if replies.send(result).is_err() || failed {
            return;
        }
    }
}

/// Writes a checkpoint's state. While the state volume is full, the write is retried every
/// second (readiness says why, the processing thread pauses consumption, nothing is committed);
/// a store that RocksDB stopped on the error resumes by itself once
/// [`crate::state::RESUME_FREE_BYTES`] are free on the volume (within 5 s). Any other
/// error, or the stop signal while waiting, stops the worker without committing.
fn write_state(shared: &Shared, mut checkpoint: Checkpoint) -> Result<(), String> {
    let mut waiting_since: Option<Instant> = None;
    loop {
        match checkpoint.write() {
            Ok(_) => break,
            Err(e) if e.is_no_space() => {
                if shared.cancel.is_cancelled() {
                    return Err(format!("state volume full at the stop signal: {e}"));
                }
                if waiting_since.is_none() {
                    waiting_since = Some(Instant::now());
                    error!(error = %e, "state volume full: consumption paused until space returns");
                    *shared.health.state_volume_full.write().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    shared.metrics.state_volume_full.set(1);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    if let Some(since) = waiting_since {
        *shared.health.state_volume_full.write().unwrap_or_else(|p| p.into_inner()) = None;
        shared.metrics.state_volume_full.set(0);
        warn!(waited = ?since.elapsed(), "space on the state volume again: state written, consuming again");
    }
    Ok(())
}

fn client_config(cfg: &PipelineConfig) -> Result<(ClientConfig, ClientConfig), String> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.source.bootstrap_servers)
        .set("group.id", &cfg.source.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // The broker answers a fetch once 64 KiB are ready or after 5 ms: at moderate rates this
        // turns a fetch per few records into one per 5 ms (12 % less worker CPU and a p99 of
        // 29–44 ms instead of 66–148 ms at 20k events/s, BENCHMARKS.md) for at most 5 ms more.
        .set("fetch.min.bytes", "65536")
        .set("fetch.wait.max.ms", "5")
        .set("queued.min.messages", "20000")
        // Broker connection states for readiness (`ConsumerCtx::stats_raw`).
        .set("statistics.interval.ms", "1000")
        .set(
            "auto.offset.reset",
            match cfg.source.start_from {
                StartPosition::Latest => "latest",
                _ => "earliest",
            },
        );
    for (k, v) in &cfg.source.properties {
        c.set(k, resolve_property(v).map_err(|e| format!("source.properties.{k}: {e}"))?);
    }
    let mut p = ClientConfig::new();
    let servers =
        if cfg.sink.bootstrap_servers.is_empty() { &cfg.source.bootstrap_servers } else { &cfg.sink.bootstrap_servers };
    p.set("bootstrap.servers", servers)
        .set("partitioner", "murmur2_random")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "0")
        .set("linger.ms", "1")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        // Bounded memory while the brokers are unreachable: at 256 MiB of unsent records the
        // engine waits (QueueFull) instead of buffering more (librdkafka's default is 1 GiB).
        .set("queue.buffering.max.kbytes", "262144")
        // Explicit, because the engine sizes every record (dead letters truncated, outputs too
        // large dead-lettered) to this limit; `sink.properties` may set another (validated) one.
        .set(
            "message.max.bytes",
            cfg.sink.message_max_bytes().map_err(|e| format!("sink.properties.message.max.bytes: {e}"))?.to_string(),
        );
    for (k, v) in &cfg.sink.properties {
        p.set(k, resolve_property(v).map_err(|e| format!("sink.properties.{k}: {e}"))?);
    }
    if cfg.sink.delivery == Delivery::ExactlyOnce {
        let timeout =
            cfg.sink.transaction_timeout_ms().map_err(|e| format!("sink.properties.transaction.timeout.ms: {e}"))?;
        // Deliveries give up with the transaction: the worker then stops without committing.
        p.set("transactional.id", transactional_id(&cfg.source.group_id))
            .set("transaction.timeout.ms", timeout.to_string())
            .set("message.timeout.ms", timeout.to_string());
        // Chained pipelines: never read another exactly-once producer's aborted records.
        c.set("isolation.level", "read_committed");
    }
    Ok((c, p))
}

/// The exactly-once producer's `transactional.id`: `<groupId>.<instance>`, where the instance is
/// `STREAMSCORE_POD_NAME` (the operator sets it to the pod's name, which a container restart
/// keeps, so the restarted worker fences and aborts its predecessor's open transaction), else
/// the host name and process id.
pub fn transactional_id(group: &str) -> String {
    let instance = std::env::var("STREAMSCORE_POD_NAME").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    format!("{group}.{instance}")
}

/// Runs the Kafka loop until `cancel` fires (then drains and commits) or a fatal error.
pub fn run(
    cfg: Arc<PipelineConfig>,
    engine: Engine,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<(), String> {
    let (cc, pc) = client_config(&cfg)?;
    health.heartbeat.set_bound(Duration::from_millis(cfg.runtime.stall_timeout.as_millis()));
    let state_dir = std::path::Path::new(&cfg.runtime.state_dir);
    health.admin.restore_after_restart(cfg.shadow.clone(), state_dir);
    let acks = Arc::new(Acks::default());
    let checkpoints = engine.checkpointer().cloned();
    if let Some(cp) = &checkpoints {
        let _ = health.checkpointer.set(cp.clone());
    }
    let producer: ThreadedProducer<ProducerCtx> = pc
        .create_with_context(ProducerCtx {
            metrics: metrics.clone(),
            failures: AtomicU64::new(0),
            health: health.clone(),
            acks: acks.clone(),
        })
        .map_err(|e| format!("creating the Kafka producer: {e}"))?;
    let shared = Arc::new(Shared {
        engine: Mutex::new(engine),
        committer: Mutex::new(None),
        epoch: AtomicU64::new(0),
        acks,
        producer,
        metrics: metrics.clone(),
        health: health.clone(),
        input_topics: cfg.source.topics.clone(),
        sink_topic: cfg.sink.topic.clone(),
        dlq_topic: cfg.sink.dead_letter_topic.clone(),
        feature_topic: cfg.sink.feature_topic.clone().unwrap_or_default(),
        fatal: Mutex::new(None),
        checkpoints,
        checkpoint_every: Duration::from_millis(cfg.state.checkpoint_interval.as_millis()),
        cancel: cancel.clone(),
        shutdown_timeout: Duration::from_millis(cfg.runtime.shutdown_timeout.as_millis()),
        exactly_once: cfg.sink.delivery == Delivery::ExactlyOnce,
        last_transaction: Mutex::new(Vec::new()),
    });
    let consumer: Arc<BaseConsumer<ConsumerCtx>> = Arc::new(
        cc.create_with_context(ConsumerCtx {
            shared: shared.clone(),
            start_timestamp: (cfg.source.start_from == StartPosition::Timestamp)
                .then_some(cfg.source.start_timestamp_ms)
                .flatten(),
        })
        .map_err(|e| format!("creating the Kafka consumer: {e}"))?,
    );
    let (jobs_tx, jobs_rx) = sync_channel(MAX_PENDING_COMMITS);
    let (replies_tx, replies_rx) = sync_channel(MAX_PENDING_COMMITS + 1);
    let committer = {
        let (shared, consumer) = (shared.clone(), consumer.clone());
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || committer_loop(shared, consumer, jobs_rx, replies_tx))
            .map_err(|e| format!("starting the committer thread: {e}"))?
    };
    *shared.committer.lock().unwrap_or_else(|e| e.into_inner()) = Some(Committer {
        jobs: jobs_tx,
        replies: replies_rx,
        pending: 0,
        epoch: 0,
        running: None,
        running_uploads: Vec::new(),
        last_upload: Instant::now(),
    });
    let result = consume(&cfg, &shared, &consumer, &health, &cancel);
    // Dropping the sender ends the committer thread once its queue is empty.
    shared.committer.lock().unwrap_or_else(|e| e.into_inner()).take();
    let _ = committer.join();
    if let Some(cp) = &shared.checkpoints {
        cp.shutdown();
    }
    result
}

/// Checkpoints `partitions` to the object store and waits for the uploads (after a
/// synchronous commit: the stores hold everything processed). A failure is logged: the next
/// owner then restores an older checkpoint and replays more.
fn checkpoint_now(shared: &Shared, engine: &Engine, partitions: &BTreeSet<i32>) {
    let Some(cp) = &shared.checkpoints else { return };
    for p in partitions {
        let Some((handle, offsets)) = engine.durable_store(*p) else { continue };
        match cp.checkpoint_now(*p, &handle, offsets) {
            Ok(Some(id)) => info!(partition = p, manifest = %id, "checkpoint taken before handing the partition over"),
            Ok(None) => {}
            Err(e) => {
                shared.metrics.checkpoint_failures.inc();
                warn!(partition = p, error = %e, "checkpoint before hand-over failed; the next owner replays from an older one");
            }
        }
    }
}

/// Pauses every owned partition, commits synchronously (outputs acknowledged, state written,
/// offsets committed) and checkpoints each partition to the object store, waiting for the
/// uploads. The admin API's drain (see [`crate::admin`]).
fn drain(
    shared: &Shared,
    consumer: &BaseConsumer<ConsumerCtx>,
    id: &str,
    opts: DrainOptions,
) -> Result<DrainReport, String> {
    let assignment = consumer.assignment().map_err(|e| format!("reading the assignment: {e}"))?;
    consumer.pause(&assignment).map_err(|e| format!("pausing the partitions: {e}"))?;
    let paused_at_ms = chrono::Utc::now().timestamp_millis();
    let mut engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
    commit_sync(shared, &mut engine, consumer)?;
    let mut partitions = Vec::new();
    for p in engine.assigned() {
        let Some((handle, offsets)) = engine.durable_store(p) else { continue };
        let manifest = match shared.checkpoints.as_ref().filter(|_| opts.checkpoint) {
            Some(cp) => match cp.checkpoint_now(p, &handle, offsets.clone()) {
                Ok(Some(id)) => Some(id),
                Ok(None) => cp.latest(p),
                Err(e) => {
                    shared.metrics.checkpoint_failures.inc();
                    return Err(format!("checkpoint of partition {p}: {e}"));
                }
            },
            None => None,
        };
        partitions.push(DrainedPartition { partition: p, offsets, manifest });
    }
    Ok(DrainReport { id: id.to_owned(), paused_at_ms, checkpoint_store: shared.checkpoints.is_some(), partitions })
}

/// Registers the transactional producer (fencing and aborting the open transaction of a
/// previous incarnation with the same `transactional.id`) and opens the first transaction;
/// retried while the brokers are unreachable.
fn init_transactions(shared: &Shared, cancel: &CancellationToken) -> Result<(), String> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match shared.producer.init_transactions(Duration::from_secs(30)) {
            Ok(()) => break,
            Err(e) if e.rdkafka_error_code().is_some_and(|c| c == RDKafkaErrorCode::Fenced) => {
                return Err(format!("another worker uses this transactional.id: {e}"));
            }
            Err(e) if !cancel.is_cancelled() => {
                warn!(error = %e, "cannot register the transactional producer; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(format!("registering the transactional producer: {e}")),
        }
    }
    shared.producer.begin_transaction().map_err(|e| format!("beginning a transaction: {e}"))?;
    info!("exactly-once: transactional producer registered");
    Ok(())
}

/// The processing loop (see the module docs).
fn consume(
    cfg: &PipelineConfig,
    shared: &Arc<Shared>,
    consumer: &BaseConsumer<ConsumerCtx>,
    health: &Health,
    cancel: &CancellationToken,
) -> Result<(), String> {
    // Wait for the brokers and the input topic's metadata, with backoff.
    let first = cfg.source.topics[0].clone();
    let mut backoff = Duration::from_millis(200);
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        match consumer.fetch_metadata(Some(&first), Duration::from_secs(5)) {
            Ok(md) if md.topics().first().is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()) => {
                let n = md.topics()[0].partitions().len();
                health.input_partitions.store(n, Ordering::Relaxed);
                health.broker_ok.store(true, Ordering::Relaxed);
                info!(topic = %first, partitions = n, "input topic found");
                break;
            }
            Ok(_) => warn!(topic = %first, "input topic does not exist yet; waiting"),
            Err(e) => warn!(error = %e, "Kafka unreachable; retrying"),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
    if shared.exactly_once {
        init_transactions(shared, cancel)?;
    }
    let topics: Vec<&str> = cfg.source.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics).map_err(|e| format!("subscribing to {topics:?}: {e}"))?;

    let max_batch = cfg.model.signature.batch.max_size.max(1) as usize;
    let max_delay = Duration::from_millis(cfg.model.signature.batch.max_delay.as_millis());
    let commit_every = Duration::from_millis(cfg.runtime.commit_interval.as_millis());
    let mut last_commit = Instant::now();
    let mut batch = Vec::with_capacity(max_batch);
    let mut paused_for_space = false;
    while !cancel.is_cancelled() {
        if let Some(why) = shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Err(why);
        }
        health.heartbeat.beat();
        let volume_full = health.volume_full().is_some();
        if volume_full || paused_for_space {
            pause_for_space(shared, consumer, volume_full, &mut paused_for_space)?;
        }
        if let Some((id, opts)) = health.admin.pending_with() {
            let result = health.heartbeat.during(format!("drain {id}"), || drain(shared, consumer, &id, opts));
            match &result {
                Ok(r) => info!(
                    id,
                    partitions = r.partitions.len(),
                    "drained: consumption paused, state committed and checkpointed"
                ),
                Err(e) => warn!(id, error = %e, "drain failed; consuming again"),
            }
            health.admin.finish(&id, result);
        }
        if health.admin.take_resume() {
            match consumer.assignment() {
                Ok(a) => match consumer.resume(&a) {
                    Ok(()) => info!(partitions = a.count(), "drain over: consuming again"),
                    Err(e) => shared.fail(format!("resuming the partitions after a drain: {e}")),
                },
                Err(e) => shared.fail(format!("reading the assignment to resume after a drain: {e}")),
            }
        }
        let mut first_at: Option<Instant> = None;
        while batch.len() < max_batch {
            let timeout = match first_at {
                None => Duration::from_millis(100),
                Some(t) => match max_delay.checked_sub(t.elapsed()) {
                    Some(d) => d,
                    None => break,
                },
            };
            match consumer.poll(timeout) {
                None => {
                    if first_at.is_some() || batch.is_empty() {
                        break;
                    }
                }
                Some(Ok(m)) => {
                    first_at.get_or_insert_with(Instant::now);
                    batch.push(m);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "consumer poll error");
                    break;
                }
            }
        }
        if let Some(why) = shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            // Set during this poll (e.g. by the rebalance callback): process nothing more.
            return Err(why);
        }
        if !batch.is_empty() {
            // (Not a sign that the brokers are reachable: the batch may come from the
            // consumer's prefetched queue. Acknowledgements and commits say so.)
            let now = Instant::now();
            let records: Vec<InRecord<'_>> = batch
                .iter()
                .map(|m| InRecord {
                    topic: m.topic(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key(),
                    payload: m.payload(),
                    received: now,
                    timestamp: m.timestamp().to_millis(),
                })
                .collect();
            let mut engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            let outs = engine.process(&records).map_err(|e| e.to_string())?;
            drop(records);
            let shadow = health.admin.shadow();
            for o in outs {
                shared.send(o, shadow.as_ref());
            }
            drop(shadow);
            if engine.replaying_changed() {
                *health.replaying.write().unwrap_or_else(|e| e.into_inner()) = engine.replaying();
            }
            drop(engine);
            batch.clear();
        }
        let mut engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
        // No new checkpoint while the last one waits for space on the state volume.
        if last_commit.elapsed() >= commit_every && !engine.checkpoint_running() && !paused_for_space {
            if shared.exactly_once {
                shared.commit_transaction(consumer, &engine.positions())?;
            }
            shared.begin_commit(&mut engine)?;
            last_commit = Instant::now();
        }
        shared.step_commit(&mut engine, SNAPSHOT_STEP_KEYS, true)?;
        drop(engine);
    }
    info!("shutting down: draining outputs and committing");
    {
        let mut engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
        commit_sync(shared, &mut engine, consumer)?;
        let all: BTreeSet<i32> = engine.assigned().into_iter().collect();
        checkpoint_now(shared, &engine, &all);
    }
    consumer.unsubscribe();
    Ok(())
}

/// While a state write waits for space on the state volume: every assigned partition is kept
/// paused (re-paused after a rebalance, which resumes them) and polled, so the consumer stays
/// in its group; with exactly-once, the records processed so far are committed in their
/// transaction first, so that none stays open past the transaction timeout (the state behind
/// it is recoverable: module docs, "between 2 and 4"). Once space returns, consumption
/// resumes, unless a drain or a cut-over barrier holds it.
fn pause_for_space(
    shared: &Shared,
    consumer: &BaseConsumer<ConsumerCtx>,
    volume_full: bool,
    paused: &mut bool,
) -> Result<(), String> {
    let assignment = consumer.assignment().map_err(|e| format!("reading the assignment: {e}"))?;
    if volume_full {
        if !*paused && shared.exactly_once {
            let engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            shared.commit_transaction(consumer, &engine.positions())?;
        }
        consumer.pause(&assignment).map_err(|e| format!("pausing the partitions (state volume full): {e}"))?;
        if !*paused {
            info!(partitions = assignment.count(), "state volume full: consumption paused");
        }
        *paused = true;
    } else {
        *paused = false;
        let admin = &shared.health.admin;
        if admin.fenced() || admin.drained() {
            info!("space on the state volume again; partitions stay paused (drain or cut-over barrier)");
        } else {
            consumer.resume(&assignment).map_err(|e| format!("resuming the partitions: {e}"))?;
            info!(partitions = assignment.count(), "space on the state volume again: consuming again");
        }
    }
    Ok(())
}

/// Java-compatible murmur2 of `data` (Kafka's default partitioner hash).
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let len = data.len();
    let mut h: u32 = SEED ^ (len as u32);
    let chunks = data.chunks_exact(4);
    let rem = chunks.remainder();
    for c in chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    match rem.len() {
        3 => {
            h ^= u32::from(rem[2]) << 16;
            h ^= u32::from(rem[1]) << 8;
            h ^= u32::from(rem[0]);
            h = h.wrapping_mul(M);
        }
        2 => {
            h ^= u32::from(rem[1]) << 8;
            h ^= u32::from(rem[0]);
            h = h.wrapping_mul(M);
        }
        1 => {
            h ^= u32::from(rem[0]);
            h = h.wrapping_mul(M);
        }
        _ => {}
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java clients' default partitioner (and librdkafka's `murmur2_random`)
/// picks for `key` among `partitions`.
pub fn partition_for(key: &[u8], partitions: usize) -> i32 {
    ((murmur2(key) & 0x7fff_ffff) as usize % partitions.max(1)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values printed by the Java client (org.apache.kafka.common.utils.Utils.murmur2, 4.1.1).
        assert_eq!(murmur2(b"21"), -973_932_308);
        assert_eq!(murmur2(b"foobar"), -790_332_482);
        assert_eq!(murmur2(b"a-little-bit-long-string"), -985_981_536);
        assert_eq!(murmur2(b"a-little-bit-longer-string"), -1_486_304_829);
        assert_eq!(murmur2(b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8"), -58_897_971);
        assert_eq!(murmur2(b"abc"), 479_470_107);
        assert_eq!(murmur2(b"user-1"), 1_404_122_828);
    }

    #[test]
    fn the_producer_limit_is_the_one_the_engine_sizes_records_for() {
        let yaml = r#"
source: {bootstrapServers: "k:9092", topics: [in], keyField: user, eventTime: {field: ts}}
model: {path: m, sha256: "0000000000000000000000000000000000000000000000000000000000000000", version: v, features: [event.amount], outputs: [{name: s}]}
sink: {topic: out, deadLetterTopic: dlq}
"#;
        let mut cfg = PipelineConfig::from_yaml(yaml).unwrap();
        let (_, p) = client_config(&cfg).unwrap();
        assert_eq!(p.get("message.max.bytes"), Some("1000000"));
        cfg.sink.properties.insert("message.max.bytes".into(), "2000000".into());
        let (_, p) = client_config(&cfg).unwrap();
        assert_eq!(p.get("message.max.bytes"), Some("2000000"));
        cfg.sink.properties.insert("message.max.bytes".into(), "big".into());
        assert!(client_config(&cfg).unwrap_err().contains("message.max.bytes"));
    }

    #[test]
    fn property_references_resolve_from_env_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(resolve_property(&format!("${{file:{}}}", f.display())).unwrap(), "s3cret");
        assert_eq!(resolve_property("plain").unwrap(), "plain");
        assert!(resolve_property("${env:STREAMSCORE_SURELY_UNSET_VAR}").unwrap_err().contains("not set"));
    }
}
