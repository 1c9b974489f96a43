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
//! processed again after restart; a state write that fails because the volume is full is retried
//! instead, with consumption paused, until space returns (`commit::write_state`). Delivery is at-least-once for outputs; state never counts an
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
//!
//! Files: this one (the shared state, the poll loop, drains, pauses for a full state volume),
//! `commit` (the protocol above: epochs, committer thread, transactions), `context` (rebalance
//! callbacks, statistics, delivery reports), `config` (client settings), `health` (readiness and
//! liveness), `routing` (key → partition).

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

mod commit;
mod config;
mod context;
mod error;
mod health;
mod lookups;
mod routing;

use commit::*;
use config::client_config;
pub use config::{owners, resolve_property, transactional_id};
use context::*;
pub use error::{Error, REASONS};
pub use health::{Health, Heartbeat};
pub use routing::{murmur2, partition_for};

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
    fatal: Mutex<Option<Error>>,
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

impl Shared {
    fn fail(&self, why: Error) {
        error!(%why, "stopping the worker without committing further");
        let mut f = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        f.get_or_insert(why);
    }

    /// Hands `rec` to the producer: to the `sink` topics, or in shadow mode (a blue/green
    /// candidate) to the shadow topics unless its input is at or past the cut-over barrier.
    fn send(&self, rec: OutRecord, shadow: Option<&ShadowConfig>, sent: Instant) {
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
        let opaque = Box::new((received.0, received.1, epoch, sent));
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
                    self.fail(Error::Produce(
                        "stopping while the producer queue is full (brokers unreachable?)".into(),
                    ));
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
                    self.fail(Error::client("cannot enqueue output record", e));
                    return;
                }
            }
        }
    }
}

/// Runs the Kafka loop until `cancel` fires (then drains and commits) or a fatal error.
pub fn run(
    cfg: Arc<PipelineConfig>,
    engine: Engine,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let (cc, pc) = client_config(&cfg)?;
    // Lookup tables are read in full before the worker joins its group: no event is scored
    // against a half-read table. Dropping the loader (on return) stops it.
    let _tables = match engine.lookup_tables() {
        Some(tables) => {
            let loader = lookups::start(&cfg, tables, metrics.clone(), health.clone(), cancel.clone())?;
            if !loader.wait_loaded(&cancel) {
                info!("stopped while loading the lookup tables: nothing was consumed");
                return Ok(());
            }
            Some(loader)
        }
        None => None,
    };
    health.heartbeat.set_bound(Duration::from_millis(cfg.runtime.stall_timeout.as_millis()));
    let state_dir = std::path::Path::new(&cfg.runtime.state_dir);
    health.admin.restore_after_restart(cfg.shadow.clone(), state_dir);
    let acks = Arc::new(Acks::default());
    let checkpoints = engine.checkpointer().cloned();
    if let Some(cp) = &checkpoints {
        let _ = health.checkpointer.set(cp.clone());
        metrics.checkpoint_interval.set(cfg.state.checkpoint_interval.as_millis() as f64 / 1000.0);
        // Checkpoint age counts from the start until the first one completes.
        metrics.checkpoint_last_success.set(chrono::Utc::now().timestamp_millis() as f64 / 1000.0);
    }
    let producer: ThreadedProducer<ProducerCtx> = pc
        .create_with_context(ProducerCtx {
            stages: ProducerCtx::stage_histograms(&metrics),
            metrics: metrics.clone(),
            failures: AtomicU64::new(0),
            health: health.clone(),
            acks: acks.clone(),
        })
        .map_err(Error::kafka("creating the Kafka producer"))?;
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
        .map_err(Error::kafka("creating the Kafka consumer"))?,
    );
    let (jobs_tx, jobs_rx) = sync_channel(MAX_PENDING_COMMITS);
    let (replies_tx, replies_rx) = sync_channel(MAX_PENDING_COMMITS + 1);
    let committer = {
        let (shared, consumer) = (shared.clone(), consumer.clone());
        std::thread::Builder::new()
            .name("committer".into())
            .spawn(move || committer_loop(shared, consumer, jobs_rx, replies_tx))
            .map_err(|e| Error::Thread(Arc::new(e)))?
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
) -> Result<DrainReport, Error> {
    let assignment = consumer.assignment().map_err(Error::kafka("reading the assignment"))?;
    consumer.pause(&assignment).map_err(Error::kafka("pausing the partitions"))?;
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
                    return Err(Error::Checkpoint { partition: p, source: Arc::new(e) });
                }
            },
            None => None,
        };
        let output_offsets = engine.output_positions(p);
        partitions.push(DrainedPartition { partition: p, offsets, manifest, output_offsets });
    }
    Ok(DrainReport { id: id.to_owned(), paused_at_ms, checkpoint_store: shared.checkpoints.is_some(), partitions })
}

/// The processing loop (see the module docs).
fn consume(
    cfg: &PipelineConfig,
    shared: &Arc<Shared>,
    consumer: &BaseConsumer<ConsumerCtx>,
    health: &Health,
    cancel: &CancellationToken,
) -> Result<(), Error> {
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
    consumer.subscribe(&topics).map_err(|e| Error::client(format!("subscribing to {topics:?}"), e))?;

    let max_batch = cfg.model.signature.batch.max_size.max(1) as usize;
    let max_delay = Duration::from_millis(cfg.model.signature.batch.max_delay.as_millis());
    let commit_every = Duration::from_millis(cfg.runtime.commit_interval.as_millis());
    let mut last_commit = Instant::now();
    let mut batch = Vec::with_capacity(max_batch);
    // When each record of the batch was taken from the consumer: the start of its consume →
    // acknowledged latency (which so includes the wait for the batch to fill).
    let mut polled_at: Vec<Instant> = Vec::with_capacity(max_batch);
    let mut paused_for_space = false;
    // Utilization: each turn of the loop counts as busy but for its waits for input (polls
    // with a timeout); a paused or drained worker waits too.
    let mut turn_started = Instant::now();
    let mut waited = Duration::ZERO;
    while !cancel.is_cancelled() {
        let now = Instant::now();
        shared.metrics.busy_seconds.inc_by(now.duration_since(turn_started).saturating_sub(waited).as_secs_f64());
        (turn_started, waited) = (now, Duration::ZERO);
        if let Some(why) = shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
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
            health.admin.finish(&id, result.map_err(|e| e.to_string()));
        }
        if health.admin.take_resume() {
            match consumer.assignment() {
                Ok(a) => match consumer.resume(&a) {
                    Ok(()) => info!(partitions = a.count(), "drain over: consuming again"),
                    Err(e) => shared.fail(Error::client("resuming the partitions after a drain", e)),
                },
                Err(e) => shared.fail(Error::client("reading the assignment to resume after a drain", e)),
            }
        }
        let mut first_at: Option<Instant> = None;
        while batch.len() < max_batch {
            // Once a batch has begun, queued records are taken without waiting; only an empty
            // queue waits, for what is left of `maxDelay` in whole milliseconds (librdkafka's
            // unit: the client library would spin through a wait shorter than 1 ms).
            let waiting = |timeout: Duration, waited: &mut Duration| {
                let t0 = Instant::now();
                let polled = consumer.poll(timeout);
                *waited += t0.elapsed();
                polled
            };
            let polled = match first_at {
                None => waiting(Duration::from_millis(100), &mut waited),
                Some(t) => match consumer.poll(Duration::ZERO) {
                    None => match max_delay.saturating_sub(t.elapsed()).as_millis() {
                        0 => break,
                        ms => waiting(Duration::from_millis(ms as u64), &mut waited),
                    },
                    some => some,
                },
            };
            match polled {
                None => break,
                Some(Ok(m)) => {
                    let now = Instant::now();
                    first_at.get_or_insert(now);
                    polled_at.push(now);
                    batch.push(m);
                }
                Some(Err(e)) => {
                    warn!(error = %e, "consumer poll error");
                    break;
                }
            }
        }
        if let Some(why) = shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Set during this poll (e.g. by the rebalance callback): process nothing more.
            return Err(why);
        }
        if !batch.is_empty() {
            // (Not a sign that the brokers are reachable: the batch may come from the
            // consumer's prefetched queue. Acknowledgements and commits say so.)
            let records: Vec<InRecord<'_>> = batch
                .iter()
                .zip(&polled_at)
                .map(|(m, &received)| InRecord {
                    topic: m.topic(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key(),
                    payload: m.payload(),
                    received,
                    timestamp: m.timestamp().to_millis(),
                })
                .collect();
            let mut engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            let outs = engine.process(&records).map_err(|e| Error::engine("processing a batch", e))?;
            drop(records);
            for s in engine.take_seeks() {
                // The partition's first record was past where its state starts: read it again
                // from there (the fetched records after it were dropped by the engine).
                consumer.seek(&s.topic, s.partition, Offset::Offset(s.offset), Duration::from_secs(10)).map_err(
                    |e| Error::client(format!("seeking {} partition {} to {}", s.topic, s.partition, s.offset), e),
                )?;
            }
            let shadow = health.admin.shadow();
            // One instant for the batch: its records reach the producer within microseconds.
            let sent = Instant::now();
            for o in outs {
                shared.send(o, shadow.as_ref(), sent);
            }
            drop(shadow);
            if engine.replaying_changed() {
                *health.replaying.write().unwrap_or_else(|e| e.into_inner()) = engine.replaying();
            }
            drop(engine);
            // (Outside the engine's lock: queries and /metrics go on meanwhile.)
            crate::fault::slow_batch(batch.len());
            batch.clear();
            polled_at.clear();
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
) -> Result<(), Error> {
    let assignment = consumer.assignment().map_err(Error::kafka("reading the assignment"))?;
    if volume_full {
        if !*paused && shared.exactly_once {
            let engine = shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            shared.commit_transaction(consumer, &engine.positions())?;
        }
        consumer.pause(&assignment).map_err(Error::kafka("pausing the partitions (state volume full)"))?;
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
            consumer.resume(&assignment).map_err(Error::kafka("resuming the partitions"))?;
            info!(partitions = assignment.count(), "space on the state volume again: consuming again");
        }
    }
    Ok(())
}
