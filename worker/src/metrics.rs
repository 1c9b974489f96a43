//! Worker metrics: one `prometheus-client` registry built at start-up and passed in.
//! Label values are bounded: reasons, partitions, score names — never a key.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use streamscore_telemetry::MetricsRegistry;

/// `reason` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Dead-letter reason.
    pub reason: String,
}

/// `topic` + `partition` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    /// Input topic.
    pub topic: String,
    /// Input partition.
    pub partition: i32,
}

/// Every metric the worker exports.
#[derive(Debug)]
pub struct Metrics {
    registry: MetricsRegistry,
    /// Records consumed.
    pub records_in: Counter,
    /// Scored records produced.
    pub records_out: Counter,
    /// Records dead-lettered, by reason.
    pub dead_letters: Family<ReasonLabel, Counter>,
    /// Late records dropped (when `lateEvents: drop`).
    pub late_dropped: Counter,
    /// Records skipped on restart because the state already contains them.
    pub replay_skipped: Counter,
    /// Seeks back to the offset a newly assigned partition's state needs next, because the
    /// consumer delivered a record past it first.
    pub start_seeks: Counter,
    /// Per input partition: records the state needed that the topic no longer retains (its
    /// retention dropped them before a restore or rebuild could read them); 0 when complete.
    pub restore_missing_records: Family<PartitionLabel, Gauge>,
    /// Consumer lag per input partition (high watermark − next offset).
    pub consumer_lag: Family<PartitionLabel, Gauge>,
    /// Time from consuming a record to the acknowledgement of its output, seconds.
    pub latency: Histogram,
    /// Time from the input record's Kafka timestamp to the acknowledgement of its output, seconds.
    pub event_latency: Histogram,
    /// Inference call duration, seconds.
    pub inference_seconds: Histogram,
    /// Rows per inference call.
    pub batch_size: Histogram,
    /// Bytes of state (all stores).
    pub state_bytes: Gauge,
    /// 1 while a state write waits for space on the state volume.
    pub state_volume_full: Gauge,
    /// Owned input partitions.
    pub partitions: Gauge,
    /// Commits (offsets after outputs acknowledged and state flushed).
    pub commits: Counter,
    /// Output delivery failures.
    pub delivery_errors: Counter,
    /// Duration of a commit's phases (`snapshot`: serialising changed state on the processing
    /// thread, `ack`: waiting for output acknowledgements, `state`: the
    /// synced state write, `offsets`: the Kafka offset commit), seconds.
    pub commit_seconds: Family<PhaseLabel, Histogram>,
    /// Where a scored record's time goes, seconds: `fetch` (input record timestamp → consumed:
    /// time in the upstream producer, the broker and the fetch), `process` (consumed → handed to
    /// the producer: batching, features, inference), `produce` (→ acknowledged by the broker).
    pub stage_seconds: Family<StageLabel, Histogram>,
    /// Emitted windows closed and written to the feature topic (again after a replay).
    pub windows_emitted: Counter,
    /// Checkpoints completed (manifest written).
    pub checkpoints: Counter,
    /// When the last checkpoint completed, or the worker started, Unix seconds (0: no checkpoint
    /// store).
    pub checkpoint_last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// `state.checkpointInterval` in seconds while checkpoints go to a store (0: none).
    pub checkpoint_interval: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Seconds the processing loop spent other than waiting for input (its rate is the
    /// worker's utilization, 0..1: the operator's autoscaler sizes parallelism by it).
    pub busy_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    /// Checkpoints that failed (taken or uploaded).
    pub checkpoint_failures: Counter,
    /// Periodic checkpoints not taken because the partition's previous one was still queued
    /// or uploading (slow or unreachable object store).
    pub checkpoints_skipped: Counter,
    /// Bytes uploaded to the checkpoint store.
    pub checkpoint_uploaded_bytes: Counter,
    /// Duration of a checkpoint upload (files, manifest), seconds.
    pub checkpoint_seconds: Histogram,
    /// Checkpoints skipped at restore because a manifest or file was unusable.
    pub checkpoint_fallbacks: Counter,
    /// Partition assignments by where the state came from (`local`, `checkpoint`, `rebuild`,
    /// `empty`).
    pub assignments: Family<SourceLabel, Counter>,
    /// Duration of a restore from a checkpoint (download and verification), seconds.
    pub restore_seconds: Histogram,
    /// Bytes downloaded from the checkpoint store.
    pub restore_downloaded_bytes: Counter,
    /// Records processed again to bring restored state up to the committed offsets; their
    /// outputs are not written again.
    pub replayed: Counter,
    /// Partitions whose state is still being brought up to the committed offsets.
    pub partitions_replaying: Gauge,
    /// The main score (`postprocess.score`) of each scored record, in 20 buckets of 0.05 over
    /// [0, 1]: the operator compares a blue/green candidate's distribution with the live one's.
    pub score: Histogram,
    /// Records written to the shadow topics (a blue/green candidate before its cut-over).
    pub shadow_out: Counter,
    /// Rows held per lookup table.
    pub lookup_rows: Family<TableLabel, Gauge>,
    /// 1 once a lookup table was read up to the end offsets found at start.
    pub lookup_loaded: Family<TableLabel, Gauge>,
    /// Lookup table records applied (rows written or deleted).
    pub lookup_updates: Family<TableLabel, Counter>,
    /// Lookup table records skipped: the value is not a JSON object (the row is unchanged).
    pub lookup_rejected: Family<TableLabel, Counter>,
    /// Events whose key field names no row of the table (or have no key field).
    pub lookup_misses: Family<TableLabel, Counter>,
}

/// Upper bounds of the score histogram's buckets: 0.05, 0.10, …, 1.0 (and +Inf).
pub fn score_buckets() -> impl Iterator<Item = f64> {
    (1..=20).map(|i| f64::from(i) / 20.0)
}

/// Upper bounds (seconds) of the latency histograms' buckets: 0.1 ms to 10 s, 1 ms apart from
/// 1 to 10 ms, so that a quantile near a 10 ms objective reads to the millisecond (and a
/// bucket ends at exactly 10 ms).
pub fn latency_buckets() -> impl Iterator<Item = f64> {
    const MS: [f64; 31] = [
        0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 12.5, 15.0, 20.0, 30.0,
        50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0, 2000.0, 3500.0, 5000.0, 10000.0,
    ];
    MS.into_iter().map(|ms| ms / 1000.0)
}

/// `source` label: where an assigned partition's state came from.
/// A lookup table (`features.lookups[].name`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    /// Table name.
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// `local`, `checkpoint`, `rebuild` or `empty`.
    pub source: &'static str,
}

/// `stage` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabel {
    /// Stage of an output's way.
    pub stage: &'static str,
}

/// `phase` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// Commit phase.
    pub phase: &'static str,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Self {
        let mut m = Self {
            registry: MetricsRegistry::default(),
            records_in: Counter::default(),
            records_out: Counter::default(),
            dead_letters: Family::default(),
            late_dropped: Counter::default(),
            replay_skipped: Counter::default(),
            start_seeks: Counter::default(),
            restore_missing_records: Family::default(),
            consumer_lag: Family::default(),
            latency: Histogram::new(latency_buckets()),
            event_latency: Histogram::new(latency_buckets()),
            inference_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 18)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            state_bytes: Gauge::default(),
            state_volume_full: Gauge::default(),
            partitions: Gauge::default(),
            commits: Counter::default(),
            delivery_errors: Counter::default(),
            commit_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 16))),
            stage_seconds: Family::new_with_constructor(|| Histogram::new(latency_buckets())),
            windows_emitted: Counter::default(),
            checkpoints: Counter::default(),
            checkpoint_failures: Counter::default(),
            checkpoints_skipped: Counter::default(),
            checkpoint_uploaded_bytes: Counter::default(),
            checkpoint_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            checkpoint_last_success: Gauge::default(),
            checkpoint_interval: Gauge::default(),
            busy_seconds: Counter::default(),
            checkpoint_fallbacks: Counter::default(),
            assignments: Family::default(),
            restore_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 18)),
            restore_downloaded_bytes: Counter::default(),
            replayed: Counter::default(),
            partitions_replaying: Gauge::default(),
            score: Histogram::new(score_buckets()),
            shadow_out: Counter::default(),
            lookup_rows: Family::default(),
            lookup_loaded: Family::default(),
            lookup_updates: Family::default(),
            lookup_rejected: Family::default(),
            lookup_misses: Family::default(),
        };
        m.registry = MetricsRegistry::new("streamscore_worker", |r| {
            r.register("records_in", "Records consumed from the input topics", m.records_in.clone());
            r.register("records_out", "Scored records written to the output topic", m.records_out.clone());
            r.register("dead_letters", "Records written to the dead-letter topic, by reason", m.dead_letters.clone());
            r.register("late_dropped", "Late records dropped (lateEvents: drop)", m.late_dropped.clone());
            r.register(
                "replay_skipped",
                "Records skipped after restart because state already has them",
                m.replay_skipped.clone(),
            );
            r.register(
                "start_seeks",
                "Seeks back to where a newly assigned partition's state starts (the consumer read past it)",
                m.start_seeks.clone(),
            );
            r.register(
                "restore_missing_records",
                "Records a restored or rebuilt partition's state needed that the input topic no longer retains",
                m.restore_missing_records.clone(),
            );
            r.register("consumer_lag", "Records behind the partition's high watermark", m.consumer_lag.clone());
            r.register("output_latency_seconds", "Consume to output acknowledgement", m.latency.clone());
            r.register(
                "event_to_output_seconds",
                "Input record timestamp to output acknowledgement",
                m.event_latency.clone(),
            );
            r.register("inference_seconds", "Duration of one inference call", m.inference_seconds.clone());
            r.register("inference_batch_size", "Rows per inference call", m.batch_size.clone());
            r.register("state_bytes", "Estimated bytes of RocksDB state", m.state_bytes.clone());
            r.register(
                "state_volume_full",
                "1 while a state write waits for space on the state volume (consumption paused)",
                m.state_volume_full.clone(),
            );
            r.register("partitions", "Input partitions owned", m.partitions.clone());
            r.register("lookup_rows", "Rows held per lookup table", m.lookup_rows.clone());
            r.register(
                "lookup_loaded",
                "1 once the lookup table was read up to the end offsets found at start (scoring waits for it)",
                m.lookup_loaded.clone(),
            );
            r.register(
                "lookup_updates",
                "Lookup table records applied (rows written or deleted)",
                m.lookup_updates.clone(),
            );
            r.register(
                "lookup_records_rejected",
                "Lookup table records skipped because the value is not a JSON object (the row keeps its value)",
                m.lookup_rejected.clone(),
            );
            r.register(
                "lookup_misses",
                "Events whose key field names no row of the lookup table",
                m.lookup_misses.clone(),
            );
            r.register(
                "busy_seconds",
                "Time the processing loop spent other than waiting for input (its rate is the utilization)",
                m.busy_seconds.clone(),
            );
            r.register(
                "commits",
                "Offset commits after acknowledged outputs and durable state (exactlyOnce: transactions committed)",
                m.commits.clone(),
            );
            r.register("delivery_errors", "Output records the broker did not acknowledge", m.delivery_errors.clone());
            r.register("commit_seconds", "Duration of each commit phase", m.commit_seconds.clone());
            for phase in ["snapshot", "ack", "state", "offsets", "transaction"] {
                let _ = m.commit_seconds.get_or_create(&PhaseLabel { phase });
            }
            r.register(
                "windows_emitted",
                "Emitted windows closed by the watermark and written to the feature topic",
                m.windows_emitted.clone(),
            );
            r.register("checkpoints", "Checkpoints completed (manifest written)", m.checkpoints.clone());
            r.register(
                "checkpoint_failures",
                "Checkpoints that failed to be taken or uploaded",
                m.checkpoint_failures.clone(),
            );
            r.register(
                "checkpoints_skipped",
                "Periodic checkpoints skipped because the partition's previous one was still uploading",
                m.checkpoints_skipped.clone(),
            );
            r.register(
                "checkpoint_uploaded_bytes",
                "Bytes uploaded to the checkpoint store",
                m.checkpoint_uploaded_bytes.clone(),
            );
            r.register("checkpoint_seconds", "Duration of a checkpoint upload", m.checkpoint_seconds.clone());
            r.register(
                "checkpoint_last_success_timestamp_seconds",
                "When this worker last completed a checkpoint, or started (Unix seconds; 0: no checkpoint store)",
                m.checkpoint_last_success.clone(),
            );
            r.register(
                "checkpoint_interval_seconds",
                "state.checkpointInterval while checkpoints go to an object store (0: no checkpoint store)",
                m.checkpoint_interval.clone(),
            );
            r.register(
                "checkpoint_fallbacks",
                "Checkpoints skipped at restore because a manifest or file was unusable",
                m.checkpoint_fallbacks.clone(),
            );
            r.register(
                "partition_assignments",
                "Partition assignments by where the state came from",
                m.assignments.clone(),
            );
            for source in ["local", "checkpoint", "seed", "rebuild", "empty"] {
                let _ = m.assignments.get_or_create(&SourceLabel { source });
            }
            r.register("restore_seconds", "Duration of a restore from a checkpoint", m.restore_seconds.clone());
            r.register(
                "restore_downloaded_bytes",
                "Bytes downloaded from the checkpoint store",
                m.restore_downloaded_bytes.clone(),
            );
            r.register(
                "replayed_records",
                "Records processed again to restore state (outputs not written again)",
                m.replayed.clone(),
            );
            r.register(
                "partitions_replaying",
                "Partitions whose state is still being brought up to the committed offsets",
                m.partitions_replaying.clone(),
            );
            r.register("score", "Main score of each scored record (20 buckets over [0, 1])", m.score.clone());
            r.register(
                "shadow_records",
                "Records written to the shadow topics (a blue/green candidate before its cut-over)",
                m.shadow_out.clone(),
            );
            r.register("output_stage_seconds", "Where a scored record's time goes, by stage", m.stage_seconds.clone());
            for stage in ["fetch", "process", "produce"] {
                let _ = m.stage_seconds.get_or_create(&StageLabel { stage });
            }
            for reason in crate::decode::Reason::ALL {
                let _ = m.dead_letters.get_or_create(&ReasonLabel { reason: reason.as_str().into() });
            }
        });
        m
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.registry.encode()
    }

    /// Counts a dead letter.
    pub fn dead_letter(&self, reason: crate::decode::Reason) {
        self.dead_letters.get_or_create(&ReasonLabel { reason: reason.as_str().into() }).inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_rise_and_read_a_10ms_objective_to_the_millisecond() {
        let b: Vec<f64> = latency_buckets().collect();
        assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
        // One bucket ends at exactly 10 ms, and every whole millisecond from 1 to 10 is a bound.
        for ms in 1..=10 {
            let bound = f64::from(ms) / 1000.0;
            assert!(b.iter().any(|&x| (x - bound).abs() < 1e-12), "no bucket ends at {ms} ms: {b:?}");
        }
        assert_eq!(b.last().copied(), Some(10.0));
    }
}
