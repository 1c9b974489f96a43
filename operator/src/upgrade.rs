//! Blue/green upgrades: a change of what the workers compute on a running TenantModel.
//!
//! ```text
//!  spec change ─► classify (live ConfigMap's pipeline vs the rendered spec) ─► status.plan, Event
//!   config-only ─► the live workers restart in place (Recreate), as before
//!   model-only / features, upgrade.type BlueGreen, live workers available:
//!   ─► Shadow       candidate colour: own ConfigMap, Deployment, consumer group
//!                   (<group>.<id>) and checkpoint prefix (<store>/<ns>/<name>/<id>); starts
//!                   from the live colour's checkpoints (model-only: state.seedStore) or
//!                   rebuilds from the input (features: startFrom timestamp = now − longest
//!                   window); writes to <topic><shadowSuffix>. Gates from both colours'
//!                   /metrics: Ready, Lag, ErrorRate, ScoreDrift (after a baseline taken
//!                   when the candidate caught up)
//!   ─► CuttingOver  (1) candidate drained: paused, committed; its positions c_p
//!                   (2) live colour drained with fence=true: stopped and committed at o_p; if
//!                       some o_p < c_p it is resumed and asked again (attempt n+1)
//!                   (3) status.upgrade.liveFrom = o (recorded before anything acts on it)
//!                   (4) candidate ConfigMap gets shadow.liveFrom = o (a restarted candidate
//!                       pod keeps it); POST /v1/admin/golive {liveFrom: o}; resume candidate
//!                   (5) every candidate pod reports the barrier ─► the candidate is the live
//!                       colour; the old colour's Deployment and ConfigMap are deleted
//!  a gate fails, or the deadline passes before the barrier is recorded:
//!   ─► RollingBack  candidate removed, live colour resumed (it never paused before (2)),
//!                   Degraded/RolledBack with the gate, status.lastUpgrade, Warning Event
//! ```
//!
//! Why every input has exactly one live output across the switch: the live colour's outputs
//! for offsets below o_p were acknowledged before its commit at o_p (at-least-once order), and
//! fenced it processes nothing more (newly assigned partitions stay paused too) until it is
//! deleted. The candidate was paused at c_p ≤ o_p: it writes offsets in [c_p, o_p) to the
//! shadow topics and from o_p on to the live ones. Crash cases:
//! - a candidate container restarted after (4) starts live from the barrier it kept in its
//!   state directory (its mounted ConfigMap may predate the barrier); a new candidate pod reads
//!   it from the ConfigMap; one restarted between (3) and (4) comes back in shadow mode and is
//!   told again (the operator repeats (4) until every pod reports the barrier);
//! - a live-colour container restarted after (2) starts fenced again (the fence is kept in its
//!   state directory too), so it writes nothing past o until its Deployment is deleted;
//! - the operator restarted at any step resumes from `status.upgrade` (drain ids are
//!   idempotent, golive with the same barrier too);
//! - a live-colour pod SIGKILLed after writing outputs but before committing them is the
//!   at-least-once duplicate of any crash (the exactly-once mode closes it).
//!
//! The decisions are pure functions ([`classify`], [`evaluate_gates`], [`fence_covers`]);
//! `reconcile.rs` does the API calls and [`crate::rescale::Workers`] the HTTP.

use std::collections::BTreeMap;

use serde::Serialize;
use sha2::{Digest, Sha256};
use streamscore_crds::pipeline::{PipelineConfig, ShadowConfig, StartPosition};
use streamscore_crds::tenantmodel::{Gate, TenantModel, Upgrade, UpgradeStrategy, UpgradeType};

use crate::rescale::{Answer, Workers};

/// Per input topic and partition, an input offset (the admin API's type).
pub use streamscore_crds::admin::Barrier;

/// A barrier as status keeps it (JSON).
pub fn barrier_text(b: &Barrier) -> String {
    serde_json::to_string(b).unwrap_or_default()
}

/// A barrier from status (None when absent or unreadable).
pub fn parse_barrier(t: Option<&str>) -> Option<Barrier> {
    serde_json::from_str(t?).ok()
}

/// Annotation whose new value retries a rolled-back upgrade of an unchanged spec.
pub const RETRY_ANNOTATION: &str = "streamscore.io/retry-upgrade";

/// How long drained workers stay paused without the operator asking again, during a cut-over.
pub const CUTOVER_HOLD_SECONDS: u64 = 300;

/// [`CUTOVER_HOLD_SECONDS`], or `STREAMSCORE_CUTOVER_HOLD_SECONDS` when set (the
/// fault-injection suite shortens it to see an operator outage longer than the hold).
pub fn cutover_hold_seconds() -> u64 {
    static HOLD: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *HOLD.get_or_init(|| {
        std::env::var("STREAMSCORE_CUTOVER_HOLD_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|s| *s > 0)
            .unwrap_or(CUTOVER_HOLD_SECONDS)
    })
}

/// Whether a fence placed `elapsed` ago may have lapsed by now (its hold, less a margin for
/// the requests in flight): the fenced workers may have resumed by themselves.
pub fn fence_may_have_lapsed(elapsed: std::time::Duration, hold_seconds: u64) -> bool {
    let margin = (hold_seconds / 10).clamp(1, 30);
    elapsed.as_secs() + margin >= hold_seconds
}

/// The barrier raised to where the old colour's workers stopped when fenced again: per
/// partition the further of the two (what they wrote past the first barrier is live already).
/// Returns the partitions it moved, with their old and new offsets.
pub fn raise_barrier(barrier: &mut Barrier, stopped: &Barrier) -> Vec<String> {
    let mut moved = Vec::new();
    for (t, ps) in stopped {
        for (p, o) in ps {
            let at = barrier.entry(t.clone()).or_default().entry(*p).or_insert(0);
            if *o > *at {
                moved.push(format!("{t}/{p}: {at}→{o}"));
                *at = *o;
            }
        }
    }
    moved
}

/// How long a candidate paused for its cut-over stays paused without hearing from the operator
/// (the most the worker accepts). Paused is safe for a candidate (it writes to shadow topics
/// only); resumed before it goes live it would move past the barrier.
pub const CANDIDATE_HOLD_SECONDS: u64 = 3_600;

/// What a spec change is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// Nothing the workers compute changed.
    None,
    /// Only settings (batching, commit interval, Kafka properties, checkpoints): restart in place.
    Config,
    /// The model or post-processing changed, the features did not: the candidate can start
    /// from the live colour's checkpoints.
    ModelOnly,
    /// Features, validation or how events are read changed: the candidate rebuilds its state.
    Features,
    /// Only `checkpointStore` was added, moved or removed: the candidate computes the same
    /// thing with its checkpoints in the new store (seeded from the old one when both exist,
    /// else rebuilt from the input), and the cut-over moves the live colour there.
    CheckpointStore,
}

impl ChangeKind {
    /// As the plan's text names it.
    fn what(self) -> &'static str {
        match self {
            ChangeKind::ModelOnly => "model-only change",
            ChangeKind::CheckpointStore => "checkpoint store change",
            _ => "feature change",
        }
    }

    /// As in `status.upgrade.kind`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::None => "None",
            ChangeKind::Config => "Config",
            ChangeKind::ModelOnly => "ModelOnly",
            ChangeKind::Features => "Features",
            ChangeKind::CheckpointStore => "CheckpointStore",
        }
    }
}

/// `p` without what identifies one run of it (consumer group, start position, checkpoint
/// prefixes, shadow mode): what two colours computing the same thing have in common.
pub fn normalised(p: &PipelineConfig) -> PipelineConfig {
    let mut n = p.clone();
    n.source.group_id = String::new();
    n.source.start_from = StartPosition::default();
    n.source.start_timestamp_ms = None;
    n.state.checkpoint_store = None;
    n.state.seed_store = None;
    n.shadow = None;
    n
}

/// Classifies the change from the live colour's pipeline to the desired one.
pub fn classify(live: &PipelineConfig, desired: &PipelineConfig) -> ChangeKind {
    let (a, b) = (normalised(live), normalised(desired));
    if a == b {
        return ChangeKind::None;
    }
    let reads = |p: &PipelineConfig| {
        let s = &p.source;
        (
            s.topics.clone(),
            s.format,
            s.key_field.clone(),
            s.event_time.clone(),
            s.max_out_of_orderness,
            s.allowed_lateness,
            s.late_events,
            s.max_record_bytes,
            s.max_future_skew,
            s.max_key_bytes,
        )
    };
    // Lookup tables read only as model inputs or passthrough fields do not change state.
    if a.features.state_view() != b.features.state_view() || a.validation != b.validation || reads(&a) != reads(&b) {
        return ChangeKind::Features;
    }
    if a.model != b.model || a.postprocess != b.postprocess || a.features != b.features {
        return ChangeKind::ModelOnly;
    }
    ChangeKind::Config
}

/// Whether `desired` names another checkpoint store than the one `live` writes to (a live
/// colour that came from an upgrade writes under `<store>/<upgrade id>`: the same store).
pub fn store_changed(live: &PipelineConfig, desired: &PipelineConfig) -> bool {
    match (&live.state.checkpoint_store, &desired.state.checkpoint_store) {
        (None, None) => false,
        (Some(l), Some(d)) => {
            let root = d.trim_end_matches('/');
            let under = l.strip_prefix(root).and_then(|rest| rest.strip_prefix("/u"));
            !(l.trim_end_matches('/') == root || under.is_some_and(|id| !id.is_empty() && !id.contains('/')))
        }
        _ => true,
    }
}

/// Hash of what a pipeline computes (its normalised form, the model digest) and the retry
/// annotation: a rolled-back upgrade is retried only when this changes.
pub fn spec_hash(desired: &PipelineConfig, retry: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&normalised(desired)).unwrap_or_default());
    h.update(desired.model.sha256.as_bytes());
    h.update(retry.unwrap_or_default().as_bytes());
    hex::encode(&h.finalize()[..12])
}

/// The desired pipeline as the live colour runs it: its consumer group, start position,
/// checkpoint prefixes and shadow section kept from the live ConfigMap.
pub fn with_identity(desired: &PipelineConfig, live: &PipelineConfig) -> PipelineConfig {
    let mut p = desired.clone();
    p.source.group_id = live.source.group_id.clone();
    p.source.start_from = live.source.start_from;
    p.source.start_timestamp_ms = live.source.start_timestamp_ms;
    p.state.checkpoint_store = live.state.checkpoint_store.clone();
    p.state.seed_store = live.state.seed_store.clone();
    p.shadow = live.shadow.clone();
    p
}

/// The longest time span a feature looks back (ms): how far back a rebuild starts reading.
pub fn longest_window_ms(p: &PipelineConfig) -> i64 {
    let f = &p.features;
    let windows = f.windows.iter().map(|w| w.window.as_millis_i64());
    let sequences = f.sequences.iter().map(|s| s.lookback.as_millis_i64());
    let emitted = f.emitted.iter().map(|e| e.size.as_millis_i64());
    windows.chain(sequences).chain(emitted).max().unwrap_or(0)
        + p.source.max_out_of_orderness.as_millis_i64()
        + p.source.allowed_lateness.as_millis_i64()
}

/// Starts an upgrade: the candidate's colour, kind and the plan's text.
pub fn start(
    live_color: &str,
    kind: ChangeKind,
    from_version: &str,
    desired: &PipelineConfig,
    hash: String,
    checkpoints: bool,
    now: chrono::DateTime<chrono::Utc>,
) -> Upgrade {
    let candidate = if live_color == "blue" { "green" } else { "blue" };
    let now_s = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let seeded = matches!(kind, ChangeKind::ModelOnly | ChangeKind::CheckpointStore) && checkpoints;
    Upgrade {
        // The candidate's consumer group and checkpoint prefix are named after it: an upgrade
        // started in the same second as an earlier one, or by a leader whose clock is behind the
        // previous leader's, must not meet that one's committed offsets or checkpoints.
        id: format!("u{}-{:08x}", now.timestamp(), rand::random::<u32>()),
        candidate: candidate.into(),
        kind: kind.as_str().into(),
        step: "Shadow".into(),
        from_version: from_version.into(),
        to_version: desired.model.version.clone(),
        spec_hash: hash,
        message: format!("Upgrading {from_version}→{}: starting {candidate} in shadow", desired.model.version),
        started_at: now_s.clone(),
        step_started_at: now_s,
        rebuild_from_ms: (!seeded).then(|| now.timestamp_millis() - longest_window_ms(desired)),
        ..Upgrade::default()
    }
}

/// The plan's text (`status.plan`, the `UpgradePlanned` Event).
pub fn plan_text(kind: ChangeKind, up: Option<&Upgrade>, live_color: &str, strategy: &UpgradeStrategy) -> String {
    match (kind, up) {
        (ChangeKind::None, _) => "no change of what the workers compute".into(),
        (ChangeKind::Config, _) => "configuration change: the live workers restart in place".into(),
        (k, Some(up)) => {
            let what = k.what();
            let state = match up.rebuild_from_ms {
                None => format!("{} starts from {live_color}'s newest checkpoints", up.candidate),
                Some(ms) => format!(
                    "{} rebuilds its state from the input since {}",
                    up.candidate,
                    crate::rescale::millis_rfc3339(ms)
                ),
            };
            format!(
                "{what} {}→{}: blue/green; {state}, writes to the shadow topics (suffix {}) and is cut over when \
                 its gates pass within {}",
                up.from_version, up.to_version, strategy.shadow_suffix, strategy.deadline
            )
        }
        (k, None) => {
            let what = k.what();
            if strategy.kind == UpgradeType::BlueGreen {
                format!(
                    "{what}: applied in place without gates: no live worker is available to compare a candidate \
                     with (the workers restart with it)"
                )
            } else {
                format!("{what}: the workers restart in place (upgrade.type Recreate)")
            }
        }
    }
}

/// The candidate's pipeline: the desired one with its own consumer group and checkpoint
/// prefix, seeded from the live colour's checkpoints or started from the rebuild time, in
/// shadow mode (with the barrier once recorded).
pub fn candidate_pipeline(
    desired: &PipelineConfig,
    live: &PipelineConfig,
    up: &Upgrade,
    strategy: &UpgradeStrategy,
) -> PipelineConfig {
    let mut p = desired.clone();
    p.source.group_id = format!("{}.{}", desired.source.group_id, up.id);
    if let Some(store) = &desired.state.checkpoint_store {
        p.state.checkpoint_store = Some(format!("{}/{}", store.trim_end_matches('/'), up.id));
    }
    match up.rebuild_from_ms {
        None => p.state.seed_store = live.state.checkpoint_store.clone(),
        Some(ms) => {
            p.state.seed_store = None;
            p.source.start_from = StartPosition::Timestamp;
            p.source.start_timestamp_ms = Some(ms);
        }
    }
    let suffix = &strategy.shadow_suffix;
    p.shadow = Some(ShadowConfig {
        topic: format!("{}{suffix}", desired.sink.topic),
        dead_letter_topic: format!("{}{suffix}", desired.sink.dead_letter_topic),
        feature_topic: desired.sink.feature_topic.as_ref().map(|t| format!("{t}{suffix}")),
        live_from: parse_barrier(up.live_from.as_deref()),
    });
    p
}

/// What the operator reads from a worker's `/metrics`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerMetrics {
    /// Records consumed.
    pub records_in: f64,
    /// Records dead-lettered (every reason).
    pub dead_letters: f64,
    /// Records dead-lettered, by reason (`late`, `malformed`, `inference`, ...).
    pub dead_letters_by: BTreeMap<String, f64>,
    /// Consumer lag, summed over partitions.
    pub lag: f64,
    /// Main-score histogram: cumulative counts at 0.05, 0.10, …, 1.0 and +Inf.
    pub score: Vec<f64>,
    /// Seconds the workers' processing loops were busy (not waiting for input).
    pub busy: f64,
    /// Input partitions owned.
    pub partitions: f64,
}

impl WorkerMetrics {
    /// Events scored.
    pub fn scored(&self) -> f64 {
        self.score.last().copied().unwrap_or(0.0)
    }

    /// Adds `o` (another pod) to `self`.
    pub fn add(&mut self, o: &WorkerMetrics) {
        self.records_in += o.records_in;
        self.dead_letters += o.dead_letters;
        for (r, v) in &o.dead_letters_by {
            *self.dead_letters_by.entry(r.clone()).or_default() += v;
        }
        self.lag += o.lag;
        self.busy += o.busy;
        self.partitions += o.partitions;
        if self.score.len() < o.score.len() {
            self.score.resize(o.score.len(), 0.0);
        }
        for (a, b) in self.score.iter_mut().zip(&o.score) {
            *a += b;
        }
    }

    /// `self − base` for the counters (a pod restarted meanwhile counts from zero: clamped).
    pub fn since(&self, base: &WorkerMetrics) -> WorkerMetrics {
        let d = |a: f64, b: f64| (a - b).max(0.0);
        WorkerMetrics {
            records_in: d(self.records_in, base.records_in),
            dead_letters: d(self.dead_letters, base.dead_letters),
            dead_letters_by: self
                .dead_letters_by
                .iter()
                .map(|(r, v)| (r.clone(), d(*v, base.dead_letters_by.get(r).copied().unwrap_or(0.0))))
                .collect(),
            lag: self.lag,
            busy: d(self.busy, base.busy),
            partitions: self.partitions,
            score: self
                .score
                .iter()
                .enumerate()
                .map(|(i, a)| d(*a, base.score.get(i).copied().unwrap_or(0.0)))
                .collect(),
        }
    }
}

/// Parses the worker's Prometheus text exposition.
pub fn parse_metrics(text: &str) -> WorkerMetrics {
    let mut m = WorkerMetrics { score: vec![0.0; 21], ..WorkerMetrics::default() };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((name, value)) = line.rsplit_once(' ') else { continue };
        let Ok(v) = value.trim().parse::<f64>() else { continue };
        let (metric, labels) = match name.split_once('{') {
            Some((m, l)) => (m, l.trim_end_matches('}')),
            None => (name, ""),
        };
        match metric {
            "streamscore_worker_records_in_total" => m.records_in += v,
            "streamscore_worker_dead_letters_total" => {
                m.dead_letters += v;
                let reason = labels
                    .split(',')
                    .find_map(|l| l.strip_prefix("reason="))
                    .map_or("unknown", |r| r.trim_matches('"'));
                *m.dead_letters_by.entry(reason.to_owned()).or_default() += v;
            }
            "streamscore_worker_consumer_lag" => m.lag += v,
            "streamscore_worker_busy_seconds_total" => m.busy += v,
            "streamscore_worker_partitions" => m.partitions += v,
            "streamscore_worker_score_bucket" => {
                let le = labels.split(',').find_map(|l| l.strip_prefix("le=")).map(|s| s.trim_matches('"'));
                let i = match le {
                    Some("+Inf") => Some(20),
                    Some(x) => x.parse::<f64>().ok().map(|x| ((x * 20.0).round() as usize).saturating_sub(1)),
                    None => None,
                };
                if let Some(i) = i.filter(|i| *i <= 20) {
                    m.score[i] += v;
                }
            }
            _ => {}
        }
    }
    m
}

/// The candidate's dead-letter rate, and its excess over the live colour's: the sum over
/// reasons of how much more of its input the candidate dead-lettered for that reason than the
/// live colour did of its own (never negative per reason: fewer errors of one kind do not
/// excuse more of another). Without live input since the baseline, the excess is the rate.
pub fn excess_error_rate(candidate: &WorkerMetrics, live: &WorkerMetrics) -> (f64, f64) {
    if candidate.records_in <= 0.0 {
        return (0.0, 0.0);
    }
    let rate = candidate.dead_letters / candidate.records_in;
    if live.records_in <= 0.0 {
        return (rate, rate);
    }
    // Dead letters of an unlabelled total (older workers) count as one reason.
    let by = |m: &WorkerMetrics| -> BTreeMap<String, f64> {
        if m.dead_letters_by.is_empty() && m.dead_letters > 0.0 {
            BTreeMap::from([("unknown".to_owned(), m.dead_letters)])
        } else {
            m.dead_letters_by.clone()
        }
    };
    let (c, l) = (by(candidate), by(live));
    let excess = c
        .iter()
        .map(|(r, n)| (n / candidate.records_in - l.get(r).copied().unwrap_or(0.0) / live.records_in).max(0.0))
        .sum();
    (rate, excess)
}

/// Population stability index of two cumulative histograms (same buckets), with add-½
/// smoothing so an empty bucket on one side stays finite.
pub fn psi(a: &[f64], b: &[f64]) -> f64 {
    let per_bucket = |c: &[f64]| -> Vec<f64> {
        c.iter().enumerate().map(|(i, x)| x - if i == 0 { 0.0 } else { c[i - 1] }).map(|x| x.max(0.0)).collect()
    };
    let (pa, pb) = (per_bucket(a), per_bucket(b));
    let k = pa.len().max(pb.len()) as f64;
    let (na, nb) = (pa.iter().sum::<f64>() + 0.5 * k, pb.iter().sum::<f64>() + 0.5 * k);
    (0..pa.len().max(pb.len()))
        .map(|i| {
            let p = (pa.get(i).copied().unwrap_or(0.0) + 0.5) / na;
            let q = (pb.get(i).copied().unwrap_or(0.0) + 0.5) / nb;
            (p - q) * (p / q).ln()
        })
        .sum()
}

/// What the gates say.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Every gate passed: cut over.
    Pass,
    /// Not yet.
    Wait,
    /// A gate failed: roll back, with the reason.
    Fail(String),
}

/// Counters of both colours when the candidate caught up (the gates judge what happened after).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Baseline {
    /// The candidate's.
    pub candidate: WorkerMetrics,
    /// The live colour's.
    pub live: WorkerMetrics,
}

/// What the gates are judged on.
#[derive(Clone, Debug)]
pub struct GateInput<'a> {
    /// Candidate pods ready, of how many wanted.
    pub ready: (i32, i32),
    /// The candidate's metrics (all pods), None when some pod could not be scraped.
    pub candidate: Option<&'a WorkerMetrics>,
    /// The live colour's.
    pub live: Option<&'a WorkerMetrics>,
    /// Taken when the candidate caught up.
    pub baseline: Option<&'a Baseline>,
    /// The thresholds.
    pub strategy: &'a UpgradeStrategy,
}

/// Evaluates the gates; also whether a baseline should be taken now (the candidate is ready
/// and caught up and none was taken).
pub fn evaluate_gates(g: &GateInput<'_>) -> (Vec<Gate>, Verdict, bool) {
    let s = g.strategy;
    let gate = |name: &str, state: &str, value: String, threshold: String| Gate {
        name: name.into(),
        state: state.into(),
        value,
        threshold,
    };
    let mut gates = Vec::new();
    let ready = g.ready.0 >= g.ready.1 && g.ready.1 > 0;
    gates.push(gate(
        "Ready",
        if ready { "Passed" } else { "Waiting" },
        format!("{}/{} workers", g.ready.0, g.ready.1),
        "all".into(),
    ));
    let (Some(c), Some(l)) = (g.candidate, g.live) else {
        gates.push(gate("Lag", "Waiting", "metrics not scraped yet".into(), format!("≤ live + {}", s.max_lag)));
        return (gates, Verdict::Wait, false);
    };
    let lag_ok = c.lag <= l.lag + s.max_lag as f64;
    gates.push(gate(
        "Lag",
        if lag_ok { "Passed" } else { "Waiting" },
        format!("{} (live {})", c.lag, l.lag),
        format!("≤ live + {}", s.max_lag),
    ));
    let take_baseline = ready && lag_ok && g.baseline.is_none();
    let Some(base) = g.baseline else {
        gates.push(gate("ErrorRate", "Waiting", "after catching up".into(), format!("≤ {}", s.max_error_rate)));
        gates.push(gate("ScoreDrift", "Waiting", "after catching up".into(), format!("≤ {}", s.max_score_drift)));
        return (gates, Verdict::Wait, take_baseline);
    };
    let (dc, dl) = (c.since(&base.candidate), l.since(&base.live));
    let min = s.min_scored_events as f64;
    let mut verdict = if ready && lag_ok { Verdict::Pass } else { Verdict::Wait };
    // Error rate: judged once the candidate has read enough records, as its excess over the
    // live colour's on the same input, reason by reason (late or malformed records are
    // dead-lettered by both colours alike: they say nothing about the candidate).
    let (rate, excess) = excess_error_rate(&dc, &dl);
    let live_rate = if dl.records_in > 0.0 { dl.dead_letters / dl.records_in } else { 0.0 };
    let value = format!(
        "excess {excess:.4} over live (candidate {rate:.4}: {} of {} records; live {live_rate:.4})",
        dc.dead_letters, dc.records_in
    );
    let threshold = format!("≤ {}", s.max_error_rate);
    if dc.records_in < min {
        gates.push(gate("ErrorRate", "Waiting", value, threshold));
        verdict = Verdict::Wait;
    } else if excess > s.max_error_rate {
        gates.push(gate("ErrorRate", "Failed", value.clone(), threshold.clone()));
        verdict = Verdict::Fail(format!("gate ErrorRate failed: {value}, threshold {threshold}"));
    } else {
        gates.push(gate("ErrorRate", "Passed", value, threshold));
    }
    // Score drift: judged once both have scored enough events since the baseline.
    let threshold = format!("≤ {}", s.max_score_drift);
    if dc.scored() < min || dl.scored() < min {
        let value = format!("waiting for {} scored events (candidate {}, live {})", min, dc.scored(), dl.scored());
        gates.push(gate("ScoreDrift", "Waiting", value, threshold));
        if !matches!(verdict, Verdict::Fail(_)) {
            verdict = Verdict::Wait;
        }
    } else {
        let d = psi(&dc.score, &dl.score);
        let value = format!("PSI {d:.4} ({} vs {} events)", dc.scored(), dl.scored());
        if d > s.max_score_drift {
            gates.push(gate("ScoreDrift", "Failed", value.clone(), threshold.clone()));
            if !matches!(verdict, Verdict::Fail(_)) {
                verdict = Verdict::Fail(format!("gate ScoreDrift failed: {value}, threshold {threshold}"));
            }
        } else {
            gates.push(gate("ScoreDrift", "Passed", value, threshold));
        }
    }
    (gates, verdict, false)
}

/// Next input offsets per topic and partition reported by drained workers (None while any of
/// `pods` has not finished the drain `id`; Err when one failed it).
pub fn drained_positions(answers: &[Answer], id: &str) -> Result<Option<Barrier>, String> {
    use crate::rescale::DrainState;
    let mut out = Barrier::new();
    for (pod, a) in answers {
        match a {
            Err(e) => return Err(format!("worker {pod}: {e}")),
            Ok(st) => match &st.drain {
                DrainState::Drained { report } if report.id == id => {
                    for p in &report.partitions {
                        for (t, o) in p.output_positions() {
                            // Two reports of one partition (it moved between two pods' drains):
                            // the further one, so that nothing either wrote is written again.
                            let at = out.entry(t.clone()).or_default().entry(p.partition).or_insert(*o);
                            *at = (*at).max(*o);
                        }
                    }
                }
                DrainState::Failed { id: fid, error } if fid == id => {
                    return Err(format!("worker {pod}: drain failed: {error}"));
                }
                _ => return Ok(None),
            },
        }
    }
    Ok(Some(out))
}

/// The input partitions (of the `n` the workers report) that no topic of `barrier` lists: a
/// barrier must name every partition (one it does not name is live from offset 0).
pub fn uncovered(barrier: &Barrier, answers: &[Answer]) -> Vec<i32> {
    let n = answers.iter().filter_map(|(_, a)| a.as_ref().ok()).map(|s| s.input_partitions).max().unwrap_or(0);
    (0..n as i32).filter(|p| barrier.is_empty() || barrier.values().any(|ps| !ps.contains_key(p))).collect()
}

/// Whether the live colour stopped at or past the candidate on every partition the candidate
/// reported (so the candidate has nothing of its own past the barrier).
pub fn fence_covers(live: &Barrier, candidate: &Barrier) -> bool {
    candidate
        .iter()
        .all(|(t, ps)| ps.iter().all(|(p, c)| live.get(t).and_then(|l| l.get(p)).copied().unwrap_or(0) >= *c))
}

/// Body of `POST /v1/admin/golive`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GoLive<'a> {
    live_from: &'a Barrier,
}

impl Workers {
    /// Asks every pod to drain (see the worker's admin module), held for `hold` seconds, and
    /// returns their status.
    pub async fn drain_with(
        &self,
        pods: &[(String, String)],
        id: &str,
        hold: u64,
        checkpoint: bool,
        fence: bool,
    ) -> Vec<Answer> {
        let mut out = Vec::new();
        for (name, ip) in pods {
            let base = format!("http://{ip}:{}", crate::build::ADMIN_PORT);
            let asked = self
                .http
                .post(format!("{base}/v1/admin/drain"))
                .query(&[
                    ("id", id),
                    ("holdSeconds", &hold.to_string()),
                    ("checkpoint", if checkpoint { "true" } else { "false" }),
                    ("fence", if fence { "true" } else { "false" }),
                ])
                .send()
                .await
                .and_then(reqwest::Response::error_for_status);
            let answer = match asked {
                Ok(_) => self.status_of(&base).await,
                Err(e) => Err(format!("admin API unreachable: {e}")),
            };
            out.push((name.clone(), answer));
        }
        out
    }

    /// Sets the barrier on every pod; Err names the first pod that refused or could not be asked.
    pub async fn go_live(&self, pods: &[(String, String)], barrier: &Barrier) -> Result<(), String> {
        for (name, ip) in pods {
            let url = format!("http://{ip}:{}/v1/admin/golive", crate::build::ADMIN_PORT);
            let resp = self.http.post(url).json(&GoLive { live_from: barrier }).send().await;
            match resp {
                Ok(r) if r.status().is_success() => {}
                Ok(r) => {
                    let code = r.status();
                    return Err(format!(
                        "worker {name}: golive answered {code}: {}",
                        r.text().await.unwrap_or_default()
                    ));
                }
                Err(e) => return Err(format!("worker {name}: admin API unreachable: {e}")),
            }
        }
        Ok(())
    }

    /// Ends any drain on every pod; returns the pods that did not confirm it, with why.
    pub async fn resume(&self, pods: &[(String, String)]) -> Vec<String> {
        let mut failed = Vec::new();
        for (name, ip) in pods {
            let url = format!("http://{ip}:{}/v1/admin/resume", crate::build::ADMIN_PORT);
            match self.http.post(url).send().await.and_then(reqwest::Response::error_for_status) {
                Ok(_) => {}
                Err(e) => failed.push(format!("{name}: {e}")),
            }
        }
        failed
    }

    /// The summed metrics of every pod (None when one could not be scraped).
    pub async fn metrics(&self, pods: &[(String, String)]) -> Option<WorkerMetrics> {
        let mut sum = WorkerMetrics { score: vec![0.0; 21], ..WorkerMetrics::default() };
        for (_, ip) in pods {
            let url = format!("http://{ip}:{}/metrics", crate::build::WORKER_PORT);
            let text = self.http.get(url).send().await.ok()?.error_for_status().ok()?.text().await.ok()?;
            sum.add(&parse_metrics(&text));
        }
        (!pods.is_empty()).then_some(sum)
    }
}

/// The retry annotation's value.
pub fn retry_token(tm: &TenantModel) -> Option<&str> {
    tm.metadata.annotations.as_ref()?.get(RETRY_ANNOTATION).map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_barrier_is_raised_only_where_the_old_colour_went_past_it() {
        let mut b: Barrier = [("tx".to_owned(), [(0, 100), (1, 50)].into())].into();
        let stopped: Barrier = [("tx".to_owned(), [(0, 100), (1, 80), (2, 7)].into())].into();
        assert_eq!(raise_barrier(&mut b, &stopped), vec!["tx/1: 50→80".to_owned(), "tx/2: 0→7".to_owned()]);
        assert_eq!(b, [("tx".to_owned(), [(0, 100), (1, 80), (2, 7)].into())].into());
        // Never lowered.
        let behind: Barrier = [("tx".to_owned(), [(0, 90)].into())].into();
        assert!(raise_barrier(&mut b, &behind).is_empty());
        assert_eq!(b["tx"][&0], 100);
    }

    #[test]
    fn a_fence_may_have_lapsed_shortly_before_its_hold() {
        let s = std::time::Duration::from_secs;
        assert!(!fence_may_have_lapsed(s(5), 300));
        assert!(!fence_may_have_lapsed(s(269), 300));
        assert!(fence_may_have_lapsed(s(270), 300));
        assert!(fence_may_have_lapsed(s(3), 4));
        assert!(!fence_may_have_lapsed(s(2), 4));
    }

    fn pipeline() -> PipelineConfig {
        PipelineConfig::from_yaml(
            r#"
source:
  bootstrapServers: "127.0.0.1:9092"
  topics: [tx]
  groupId: g
  keyField: user
  eventTime: {field: ts}
features:
  windows:
    - {name: spend_1h, aggregation: sum, field: amount, window: 1h}
model:
  path: /m.onnx
  sha256: "0000000000000000000000000000000000000000000000000000000000000000"
  version: v1
  inputName: x
  features: [spend_1h]
  outputs: [{name: score, output: 0, column: 0}]
sink: {topic: scores, deadLetterTopic: dlq}
state: {checkpointStore: "s3://b/ns/fraud"}
"#,
        )
        .unwrap()
    }

    #[test]
    fn changes_are_classified_by_what_they_change() {
        let live = pipeline();
        assert_eq!(classify(&live, &live), ChangeKind::None);
        let mut d = live.clone();
        d.runtime.commit_interval = streamscore_crds::duration::Duration::from_secs(9);
        assert_eq!(classify(&live, &d), ChangeKind::Config);
        let mut d = live.clone();
        d.model.version = "v2".into();
        assert_eq!(classify(&live, &d), ChangeKind::ModelOnly);
        d.features.windows[0].window = streamscore_crds::duration::Duration::from_secs(7200);
        assert_eq!(classify(&live, &d), ChangeKind::Features);
        // A lookup table read only by the model leaves state alone; one a window reads does not.
        let mut d = live.clone();
        d.features.lookups.push(streamscore_crds::pipeline::LookupTable {
            name: "merchants".into(),
            topic: "merchant-tiers".into(),
            key: "merchant".into(),
            fields: vec!["risk".into()],
        });
        d.model.signature.features.push("lookups.merchants.risk".into());
        assert_eq!(classify(&live, &d), ChangeKind::ModelOnly);
        d.features.windows[0].field = Some("lookups.merchants.risk".into());
        assert_eq!(classify(&live, &d), ChangeKind::Features);
        // What identifies a run is not a change.
        let mut d = live.clone();
        d.source.group_id = "g.u1".into();
        d.state.checkpoint_store = Some("s3://b/ns/fraud/u1".into());
        assert_eq!(classify(&live, &d), ChangeKind::None);
        assert_eq!(spec_hash(&live, None), spec_hash(&d, None));
        // ... nor is the store a colour from an upgrade writes under; another store is.
        let mut root = live.clone();
        root.state.checkpoint_store = Some("s3://b/ns/fraud".into());
        assert!(!store_changed(&d, &root) && !store_changed(&root, &root));
        let mut moved = root.clone();
        moved.state.checkpoint_store = Some("s3://other/ns/fraud".into());
        assert!(store_changed(&d, &moved) && store_changed(&root, &moved));
        let mut nested = root.clone();
        nested.state.checkpoint_store = Some("s3://b/ns".into());
        assert!(store_changed(&root, &nested), "a parent prefix is another store");
        let mut none = root.clone();
        none.state.checkpoint_store = None;
        assert!(store_changed(&root, &none) && store_changed(&none, &root) && !store_changed(&none, &none));
        assert_ne!(spec_hash(&live, None), spec_hash(&live, Some("again")), "the retry annotation retries");
    }

    #[test]
    fn the_candidate_has_its_own_group_and_prefix_and_starts_from_the_live_checkpoints() {
        let live = pipeline();
        let mut desired = live.clone();
        desired.model.version = "v2".into();
        let now = chrono::DateTime::from_timestamp(1_764_480_000, 0).unwrap();
        let s = UpgradeStrategy::default();
        let up = start("blue", ChangeKind::ModelOnly, "v1", &desired, "h".into(), true, now);
        assert_eq!(up.candidate, "green");
        assert!(up.id.starts_with("u1764480000-") && up.id.len() == "u1764480000-".len() + 8, "{}", up.id);
        let again = start("blue", ChangeKind::ModelOnly, "v1", &desired, "h".into(), true, now);
        assert_ne!(up.id, again.id, "two upgrades started in the same second get different ids");
        let c = candidate_pipeline(&desired, &live, &up, &s);
        assert_eq!(c.source.group_id, format!("g.{}", up.id));
        assert_eq!(c.state.checkpoint_store, Some(format!("s3://b/ns/fraud/{}", up.id)));
        assert_eq!(c.state.seed_store.as_deref(), Some("s3://b/ns/fraud"));
        let sh = c.shadow.unwrap();
        assert_eq!((sh.topic.as_str(), sh.dead_letter_topic.as_str()), ("scores.shadow", "dlq.shadow"));
        assert!(sh.live_from.is_none());
        // A feature change rebuilds from the longest window back.
        let up = start("green", ChangeKind::Features, "v1", &desired, "h".into(), true, now);
        assert_eq!(up.candidate, "blue");
        assert!(longest_window_ms(&desired) >= 3_600_000);
        assert_eq!(up.rebuild_from_ms, Some(1_764_480_000_000 - longest_window_ms(&desired)));
        let c = candidate_pipeline(&desired, &live, &up, &s);
        assert_eq!((c.source.start_from, c.state.seed_store.clone()), (StartPosition::Timestamp, None));
    }

    #[test]
    fn metrics_are_parsed_from_the_exposition() {
        let text = "# TYPE streamscore_worker_records_in counter\nstreamscore_worker_records_in_total 120\n\
                    streamscore_worker_dead_letters_total{reason=\"invalid\"} 3\n\
                    streamscore_worker_dead_letters_total{reason=\"late\"} 2\n\
                    streamscore_worker_consumer_lag{topic=\"tx\",partition=\"0\"} 7\n\
                    streamscore_worker_consumer_lag{topic=\"tx\",partition=\"1\"} 5\n\
                    streamscore_worker_score_bucket{le=\"0.05\"} 10\n\
                    streamscore_worker_score_bucket{le=\"0.1\"} 30\n\
                    streamscore_worker_score_bucket{le=\"1.0\"} 100\n\
                    streamscore_worker_score_bucket{le=\"+Inf\"} 100\n# EOF\n";
        let m = parse_metrics(text);
        assert_eq!((m.records_in, m.dead_letters, m.lag), (120.0, 5.0, 12.0));
        assert_eq!((m.score[0], m.score[1], m.score[19], m.score[20]), (10.0, 30.0, 100.0, 100.0));
        assert_eq!(m.scored(), 100.0);
    }

    fn hist(per_bucket: &[f64]) -> Vec<f64> {
        let mut c = 0.0;
        let mut v: Vec<f64> = per_bucket
            .iter()
            .map(|x| {
                c += x;
                c
            })
            .collect();
        v.push(c);
        v
    }

    #[test]
    fn the_drift_gate_tells_a_shifted_distribution_from_noise() {
        let mut a = [0.0; 20];
        let mut b = [0.0; 20];
        for i in 0..20 {
            a[i] = 100.0 + (i as f64 * 7.0) % 13.0;
            b[i] = 100.0 + (i as f64 * 5.0) % 11.0;
        }
        assert!(psi(&hist(&a), &hist(&b)) < 0.02, "{}", psi(&hist(&a), &hist(&b)));
        let mut shifted = [0.0; 20];
        shifted[15..].iter_mut().for_each(|x| *x = 400.0);
        assert!(psi(&hist(&a), &hist(&shifted)) > 1.0);
    }

    #[test]
    fn gates_wait_for_a_baseline_then_pass_or_fail() {
        let s = UpgradeStrategy { min_scored_events: 100, ..UpgradeStrategy::default() };
        let live = WorkerMetrics { records_in: 1000.0, lag: 3.0, score: hist(&[50.0; 20]), ..Default::default() };
        let cand = WorkerMetrics { records_in: 900.0, lag: 4.0, score: hist(&[45.0; 20]), ..Default::default() };
        let input =
            GateInput { ready: (2, 2), candidate: Some(&cand), live: Some(&live), baseline: None, strategy: &s };
        let (gates, v, take) = evaluate_gates(&input);
        assert_eq!((v, take), (Verdict::Wait, true), "{gates:?}");
        let base = Baseline { candidate: cand.clone(), live: live.clone() };
        // Both score 2000 more events alike: pass.
        let live2 = WorkerMetrics { records_in: 3000.0, score: hist(&[150.0; 20]), ..live.clone() };
        let cand2 = WorkerMetrics { records_in: 2900.0, score: hist(&[145.0; 20]), ..cand.clone() };
        let input = GateInput { candidate: Some(&cand2), live: Some(&live2), baseline: Some(&base), ..input };
        let (gates, v, _) = evaluate_gates(&input);
        assert_eq!(v, Verdict::Pass, "{gates:?}");
        // Every record dead-lettered (a model scoring NaN): fail with the value.
        let nan = WorkerMetrics { dead_letters: 2000.0, score: cand.score.clone(), ..cand2.clone() };
        let (gates, v, _) = evaluate_gates(&GateInput { candidate: Some(&nan), ..input.clone() });
        assert!(matches!(&v, Verdict::Fail(w) if w.contains("ErrorRate")), "{v:?}");
        assert_eq!(gates.iter().find(|g| g.name == "ErrorRate").unwrap().state, "Failed");
        // 2.3% late on both sides (a stream with late events): not the candidate's fault, pass;
        // the same plus 2% malformed only on the candidate: fail.
        let late = |n: f64| BTreeMap::from([("late".to_owned(), n)]);
        let live3 = WorkerMetrics { dead_letters: 46.0, dead_letters_by: late(46.0), ..live2.clone() };
        let cand3 = WorkerMetrics { dead_letters: 44.0, dead_letters_by: late(44.0), ..cand2.clone() };
        let (gates, v, _) = evaluate_gates(&GateInput { candidate: Some(&cand3), live: Some(&live3), ..input.clone() });
        assert_eq!(v, Verdict::Pass, "{gates:?}");
        let mut by = late(44.0);
        by.insert("inference".into(), 40.0);
        let cand4 = WorkerMetrics { dead_letters: 84.0, dead_letters_by: by, ..cand2.clone() };
        let (gates, v, _) = evaluate_gates(&GateInput { candidate: Some(&cand4), live: Some(&live3), ..input.clone() });
        assert!(matches!(&v, Verdict::Fail(w) if w.contains("excess 0.0200")), "{v:?} {gates:?}");
        // Not ready: wait, even with good numbers.
        let (_, v, _) = evaluate_gates(&GateInput { ready: (1, 2), ..input.clone() });
        assert_eq!(v, Verdict::Wait);
    }

    #[test]
    fn a_barrier_must_name_every_input_partition() {
        use crate::rescale::WorkerStatus;
        let answers: Vec<Answer> = vec![
            ("a".into(), Ok(WorkerStatus { input_partitions: 3, ..WorkerStatus::default() })),
            ("b".into(), Err("connection refused".into())),
        ];
        let all: Barrier = BTreeMap::from([("tx".into(), BTreeMap::from([(0, 1), (1, 2), (2, 3)]))]);
        assert!(uncovered(&all, &answers).is_empty());
        let two: Barrier = BTreeMap::from([("tx".into(), BTreeMap::from([(0, 1), (2, 3)]))]);
        assert_eq!(uncovered(&two, &answers), vec![1], "partition 1 had no owner at the drain");
        // Two topics: a partition must be named for each.
        let mixed: Barrier = BTreeMap::from([
            ("tx".into(), BTreeMap::from([(0, 1), (1, 2), (2, 3)])),
            ("rides".into(), BTreeMap::from([(0, 1), (1, 2)])),
        ]);
        assert_eq!(uncovered(&mixed, &answers), vec![2]);
        assert_eq!(uncovered(&Barrier::new(), &answers), vec![0, 1, 2], "an empty barrier names nothing");
    }

    #[test]
    fn the_fence_must_cover_the_candidate() {
        let c: Barrier = BTreeMap::from([("tx".into(), BTreeMap::from([(0, 10), (1, 20)]))]);
        let ok: Barrier = BTreeMap::from([("tx".into(), BTreeMap::from([(0, 10), (1, 25)]))]);
        let behind: Barrier = BTreeMap::from([("tx".into(), BTreeMap::from([(0, 9), (1, 25)]))]);
        assert!(fence_covers(&ok, &c));
        assert!(!fence_covers(&behind, &c));
    }
}
