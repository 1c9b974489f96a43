//! Rescale by checkpoint-and-restart: a change of `spec.parallelism` on a running TenantModel.
//!
//! ```text
//!  spec.parallelism ≠ Deployment replicas
//!   ─► Draining   every worker: POST /v1/admin/drain (pause, commit, checkpoint each partition,
//!                 report the manifests); wait until every input partition is reported
//!   ─► Scaling    Deployment replicas = to
//!   ─► Restoring  POST /v1/admin/resume; wait until `to` workers own every partition, none
//!                 replays, all ready ─► done: status.lastRescale (Succeeded, paused seconds), Event
//!  a step past state.rescaleTimeout, or a failed drain:
//!   ─► RollingBack  Deployment replicas = from; resume; wait as in Restoring
//!                   ─► status.lastRescale (RolledBack, reason), Warning Event
//! ```
//! Each step is written to `status.operation` before its action, so a restarted operator
//! resumes where the last one stopped (drain requests are idempotent per operation id).
//! Nothing is lost on any path: the drain only pauses and checkpoints, and a partition that
//! moves without a drain is checkpointed on revoke by its old owner anyway.
//!
//! The decisions are pure functions of what was observed ([`drain_decision`],
//! [`restore_decision`], [`should_start`]); [`Workers`] does the HTTP.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use streamscore_crds::tenantmodel::{Operation, OperationKind, OperationStep, RescaleOutcome, TenantModel};

/// Default of `spec.state.rescaleTimeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a rolled-back rescale waits before it is tried again (unless the spec changes).
pub const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long workers stay drained without the operator asking again.
pub const HOLD_SECONDS: u64 = 60;

/// A worker pod as the admin API reports it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkerStatus {
    /// Drain state.
    pub drain: DrainState,
    /// `/readyz` is OK.
    #[serde(default)]
    pub ready: bool,
    /// Why not.
    #[serde(default)]
    pub not_ready: Vec<String>,
    /// Owned partitions.
    #[serde(default)]
    pub partitions: Vec<i32>,
    /// Partitions still replaying.
    #[serde(default)]
    pub replaying: usize,
    /// Partitions of the input topic.
    #[serde(default)]
    pub input_partitions: usize,
    /// The newest checkpoint of each owned partition.
    #[serde(default)]
    pub checkpoints: Vec<PartitionCheckpoint>,
    /// Shadow mode (a blue/green candidate): None when every output is live.
    #[serde(default)]
    pub shadow: Option<ShadowView>,
    /// Owned partitions whose state misses records the input no longer retains.
    #[serde(default)]
    pub incomplete: Vec<String>,
}

/// A worker's shadow mode, as the admin API reports it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShadowView {
    /// The shadow output topic.
    pub topic: String,
    /// The cut-over barrier, once set.
    #[serde(default)]
    pub live_from: Option<crate::upgrade::Barrier>,
}

/// A partition's newest checkpoint, as a worker reports it.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionCheckpoint {
    /// Input partition.
    pub partition: i32,
    /// Manifest id.
    pub manifest: String,
    /// When it was written (Unix ms).
    pub at_ms: i64,
}

/// The partitions whose state misses records the input no longer retains, as the workers
/// report them (None when a worker did not answer: unknown).
pub fn incomplete_state(answers: &[Answer]) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for (_, a) in answers {
        out.extend(a.as_ref().ok()?.incomplete.iter().cloned());
    }
    out.sort();
    Some(out)
}

/// `status.lastCheckpoint`: when every input partition has a checkpoint, the time of the
/// oldest partition's newest one (every partition's state is checkpointed at least as recently
/// as this) with the count, e.g. `2026-11-30T04:12:17.120Z (6/6 partitions)`; otherwise the
/// count of partitions without one.
pub fn last_checkpoint(answers: &[Answer]) -> Option<String> {
    let mut newest: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    let mut total = 0usize;
    for w in answers.iter().filter_map(|(_, a)| a.as_ref().ok()) {
        total = total.max(w.input_partitions);
        for c in &w.checkpoints {
            let e = newest.entry(c.partition).or_insert(c.at_ms);
            *e = (*e).max(c.at_ms);
        }
    }
    if total == 0 {
        return None;
    }
    let covered = (0..total as i32).filter(|p| newest.contains_key(p)).count();
    if covered < total {
        return Some(format!("none yet for {} of {total} partitions", total - covered));
    }
    let oldest = (0..total as i32).filter_map(|p| newest.get(&p)).min().copied()?;
    Some(format!("{} ({total}/{total} partitions)", millis_rfc3339(oldest)))
}

/// The worker's drain state and reports: the admin API's own types.
pub use streamscore_crds::admin::{DrainReport, DrainView as DrainState, DrainedPartition};

/// A worker pod: its name and what it answered (Err: why it could not be asked).
pub type Answer = (String, Result<WorkerStatus, String>);

/// What a step decided.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Not yet: the progress message.
    Wait(String),
    /// The step is complete.
    Done {
        /// Earliest pause (Unix ms), for a drain.
        paused_at_ms: Option<i64>,
        /// `n/m` partitions checkpointed, for a drain.
        checkpointed: Option<String>,
    },
    /// The step failed: why.
    Fail(String),
}

/// The operation id the workers see (one per rescale).
pub fn operation_id(op: &Operation) -> String {
    format!("rescale-{}-{}-{}", op.from, op.to, op.started_at)
}

fn arrow(op: &Operation) -> String {
    format!("Rescaling {}→{}", op.from, op.to)
}

fn elapsed(since: &str, now: DateTime<Utc>) -> Duration {
    DateTime::parse_from_rfc3339(since)
        .map(|t| (now - t.with_timezone(&Utc)).to_std().unwrap_or_default())
        .unwrap_or_default()
}

/// The rescale timeout of `tm`.
pub fn timeout(tm: &TenantModel) -> Duration {
    tm.spec.state.rescale_timeout.map_or(DEFAULT_TIMEOUT, |d| std::time::Duration::from_millis(d.as_millis()))
}

/// Whether to start a rescale from `live` workers (the Deployment's replicas, `available` of
/// them available) to `tm.spec.parallelism`. Not when nothing runs to drain (the count is then
/// applied directly), nor when the same rescale of this generation was rolled back less than
/// [`RETRY_AFTER`] ago.
pub fn should_start(tm: &TenantModel, live: i32, available: i32, now: DateTime<Utc>) -> bool {
    let want = tm.spec.parallelism;
    if want == live || live == 0 || available == 0 {
        return false;
    }
    let last = tm.status.as_ref().and_then(|s| s.last_rescale.as_ref());
    !last.is_some_and(|l| {
        l.result == "RolledBack"
            && l.to == want
            && l.generation == tm.metadata.generation
            && retry_after(l).is_none_or(|after| elapsed(&l.finished_at, now) < after)
    })
}

/// Rolled-back attempts of one rescale after which it is not retried until the spec changes.
pub const MAX_ATTEMPTS: u32 = 5;

/// How long after the rolled-back rescale `last` the next attempt may start: [`RETRY_AFTER`],
/// doubled for each attempt before it; None once [`MAX_ATTEMPTS`] rolled back.
pub fn retry_after(last: &RescaleOutcome) -> Option<Duration> {
    let attempts = last.attempts.unwrap_or(1).max(1);
    (attempts < MAX_ATTEMPTS).then(|| RETRY_AFTER * 2u32.pow(attempts - 1))
}

/// `outcome` of a rollback, counting the attempts in a row of the same rescale (`previous`:
/// the last outcome before it).
pub fn rolled_back(mut outcome: RescaleOutcome, previous: Option<&RescaleOutcome>) -> RescaleOutcome {
    let before = previous
        .filter(|p| p.result == "RolledBack" && p.to == outcome.to && p.generation == outcome.generation)
        .map_or(0, |p| p.attempts.unwrap_or(1));
    outcome.attempts = Some(before + 1);
    outcome
}

/// A new rescale operation.
pub fn start(from: i32, to: i32, now: &str) -> Operation {
    let mut op = Operation {
        kind: OperationKind::Rescale,
        step: OperationStep::Draining,
        from,
        to,
        message: String::new(),
        started_at: now.to_owned(),
        step_started_at: now.to_owned(),
        paused_at: None,
        checkpointed: None,
        failure: None,
    };
    op.message = format!("{}: asking {from} workers to drain and checkpoint", arrow(&op));
    op
}

/// Moves `op` to `step` (now).
pub fn advance(op: &mut Operation, step: OperationStep, message: String, now: &str) {
    op.step = step;
    op.step_started_at = now.to_owned();
    op.message = message;
}

/// Draining: done when every worker answered Drained for this operation and the drained
/// partitions cover the input topic; failed when a worker's drain failed or the step timed out.
pub fn drain_decision(op: &Operation, answers: &[Answer], now: DateTime<Utc>, timeout: Duration) -> Decision {
    let id = operation_id(op);
    let mut covered = BTreeSet::new();
    let mut total = 0usize;
    let mut paused: Option<i64> = None;
    let mut waiting = Vec::new();
    for (pod, answer) in answers {
        match answer {
            Ok(w) => {
                total = total.max(w.input_partitions);
                match &w.drain {
                    DrainState::Drained { report } if report.id == id => {
                        covered.extend(report.partitions.iter().map(|p| p.partition));
                        paused = Some(paused.map_or(report.paused_at_ms, |p| p.min(report.paused_at_ms)));
                    }
                    DrainState::Failed { id: fid, error } if *fid == id => {
                        return Decision::Fail(format!("worker {pod} could not drain: {error}"));
                    }
                    _ => waiting.push(format!("{pod} draining")),
                }
            }
            Err(e) => waiting.push(format!("{pod}: {e}")),
        }
    }
    let progress = format!("{}/{}", covered.len(), if total == 0 { "?".to_owned() } else { total.to_string() });
    let complete = total > 0 && (0..total as i32).all(|p| covered.contains(&p)) && waiting.is_empty();
    if complete && !answers.is_empty() {
        return Decision::Done { paused_at_ms: paused, checkpointed: Some(progress) };
    }
    let mut msg = format!("{}: waiting for checkpoints {progress}", arrow(op));
    if !waiting.is_empty() {
        msg.push_str(&format!(" ({})", waiting.join("; ")));
    }
    if answers.is_empty() {
        msg.push_str(" (no running worker found)");
    }
    if elapsed(&op.step_started_at, now) >= timeout {
        return Decision::Fail(format!("timed out after {}s: {msg}", timeout.as_secs()));
    }
    Decision::Wait(msg)
}

/// Restoring (and RollingBack, with `want` = `op.from`): done when exactly `want` workers
/// answer, every one ready and consuming (not drained), none replaying, together they own
/// every input partition, and the Deployment counts `want` available pods; failed when the
/// step timed out.
pub fn restore_decision(
    op: &Operation,
    want: i32,
    available: i32,
    answers: &[Answer],
    now: DateTime<Utc>,
    timeout: Duration,
) -> Decision {
    let mut owned = BTreeSet::new();
    let mut total = 0usize;
    let mut problems = Vec::new();
    if available < want {
        problems.push(format!("Deployment: {available}/{want} available"));
    }
    let mut replaying = 0;
    for (pod, answer) in answers {
        match answer {
            Ok(w) => {
                total = total.max(w.input_partitions);
                owned.extend(w.partitions.iter().copied());
                replaying += w.replaying;
                if !w.ready {
                    problems.push(format!("{pod} not ready: {}", w.not_ready.join(", ")));
                } else if !matches!(w.drain, DrainState::Idle | DrainState::Failed { .. }) {
                    problems.push(format!("{pod} still drained"));
                }
            }
            Err(e) => problems.push(format!("{pod}: {e}")),
        }
    }
    let all_owned = total > 0 && (0..total as i32).all(|p| owned.contains(&p));
    // To 0 (spec.suspend): done once no worker is left (each committed as it stopped).
    if want == 0 && answers.is_empty() && available == 0 {
        return Decision::Done { paused_at_ms: None, checkpointed: None };
    }
    if answers.len() == want as usize && problems.is_empty() && replaying == 0 && all_owned {
        return Decision::Done { paused_at_ms: None, checkpointed: None };
    }
    let verb = if op.step == OperationStep::RollingBack { "rolling back: " } else { "" };
    let mut msg = format!(
        "{}: {verb}{}/{want} workers, {}/{} partitions owned, {replaying} replaying",
        arrow(op),
        answers.len(),
        owned.len(),
        if total == 0 { "?".to_owned() } else { total.to_string() }
    );
    if !problems.is_empty() {
        msg.push_str(&format!(" ({})", problems.join("; ")));
    }
    if elapsed(&op.step_started_at, now) >= timeout {
        return Decision::Fail(format!("timed out after {}s: {msg}", timeout.as_secs()));
    }
    Decision::Wait(msg)
}

/// The outcome recorded in `status.lastRescale`.
pub fn outcome(
    op: &Operation,
    result: &str,
    message: String,
    now: DateTime<Utc>,
    generation: Option<i64>,
) -> RescaleOutcome {
    let paused_seconds = op.paused_at.as_deref().map(|p| {
        let ms = DateTime::parse_from_rfc3339(p).map(|t| (now - t.with_timezone(&Utc)).num_milliseconds()).unwrap_or(0);
        (ms.max(0) as f64 / 100.0).round() / 10.0
    });
    RescaleOutcome {
        from: op.from,
        to: op.to,
        result: result.to_owned(),
        message,
        started_at: op.started_at.clone(),
        finished_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        paused_seconds,
        generation,
        attempts: None,
    }
}

/// Unix milliseconds as RFC 3339 with milliseconds.
pub fn millis_rfc3339(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Talks to the workers' admin API (`build::ADMIN_PORT`; the NetworkPolicy admits the operator).
#[derive(Clone, Debug)]
pub struct Workers {
    pub(crate) http: reqwest::Client,
}

impl Default for Workers {
    fn default() -> Self {
        Self { http: reqwest::Client::builder().timeout(Duration::from_secs(3)).build().expect("HTTP client") }
    }
}

impl Workers {
    /// Asks every pod in `pods` (name, IP) to drain for `op` (pause, commit, checkpoint) and
    /// returns what each answered.
    pub async fn drain(&self, op: &Operation, pods: &[(String, String)]) -> Vec<Answer> {
        self.drain_with(pods, &operation_id(op), HOLD_SECONDS, true, false).await
    }

    /// The status of every pod.
    pub async fn status(&self, pods: &[(String, String)]) -> Vec<Answer> {
        let mut out = Vec::new();
        for (name, ip) in pods {
            out.push((name.clone(), self.status_of(&format!("http://{ip}:{}", crate::build::ADMIN_PORT)).await));
        }
        out
    }

    /// Ends any drain on every pod, then returns their status.
    pub async fn resume_and_status(&self, pods: &[(String, String)]) -> Vec<Answer> {
        let mut out = Vec::new();
        for (name, ip) in pods {
            let base = format!("http://{ip}:{}", crate::build::ADMIN_PORT);
            let _ = self.http.post(format!("{base}/v1/admin/resume")).send().await;
            out.push((name.clone(), self.status_of(&base).await));
        }
        out
    }

    pub(crate) async fn status_of(&self, base: &str) -> Result<WorkerStatus, String> {
        let resp = self
            .http
            .get(format!("{base}/v1/admin/status"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("admin API unreachable: {e}"))?;
        resp.json::<WorkerStatus>().await.map_err(|e| format!("unexpected admin API answer: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-01-01T00:01:00Z").unwrap().with_timezone(&Utc)
    }

    fn op(step: OperationStep) -> Operation {
        let mut op = start(2, 4, "2026-01-01T00:00:30Z");
        op.step = step;
        op
    }

    fn drained(op: &Operation, parts: &[i32], at: i64, n: usize) -> Result<WorkerStatus, String> {
        Ok(WorkerStatus {
            drain: DrainState::Drained {
                report: DrainReport {
                    id: operation_id(op),
                    paused_at_ms: at,
                    checkpoint_store: true,
                    partitions: parts
                        .iter()
                        .map(|p| DrainedPartition {
                            partition: *p,
                            manifest: Some(format!("m{p}")),
                            ..Default::default()
                        })
                        .collect(),
                },
            },
            ready: true,
            partitions: parts.to_vec(),
            input_partitions: n,
            ..WorkerStatus::default()
        })
    }

    fn running(parts: &[i32], n: usize) -> Result<WorkerStatus, String> {
        Ok(WorkerStatus { ready: true, partitions: parts.to_vec(), input_partitions: n, ..WorkerStatus::default() })
    }

    const T: Duration = Duration::from_secs(300);

    #[test]
    fn a_drain_completes_only_when_every_partition_is_checkpointed() {
        let o = op(OperationStep::Draining);
        let half = vec![("a".to_owned(), drained(&o, &[0, 1, 2], 1000, 6)), ("b".to_owned(), running(&[3, 4, 5], 6))];
        match drain_decision(&o, &half, now(), T) {
            Decision::Wait(m) => assert!(m.contains("Rescaling 2→4: waiting for checkpoints 3/6"), "{m}"),
            d => panic!("{d:?}"),
        }
        let all =
            vec![("a".to_owned(), drained(&o, &[0, 1, 2], 1000, 6)), ("b".to_owned(), drained(&o, &[3, 4, 5], 900, 6))];
        assert_eq!(
            drain_decision(&o, &all, now(), T),
            Decision::Done { paused_at_ms: Some(900), checkpointed: Some("6/6".into()) }
        );
        // A drain of another operation does not count.
        let mut other = o.clone();
        other.started_at = "2025-01-01T00:00:00Z".into();
        let stale = vec![("a".to_owned(), drained(&other, &[0, 1, 2, 3, 4, 5], 1, 6))];
        assert!(matches!(drain_decision(&o, &stale, now(), T), Decision::Wait(_)));
        // A partition nobody reports (its owner is gone) keeps the step waiting.
        let gap = vec![("a".to_owned(), drained(&o, &[0, 1, 2, 4, 5], 1000, 6))];
        assert!(matches!(drain_decision(&o, &gap, now(), T), Decision::Wait(_)));
    }

    #[test]
    fn a_failed_or_slow_drain_fails_the_step_with_the_reason() {
        let o = op(OperationStep::Draining);
        let failed = vec![(
            "a".to_owned(),
            Ok(WorkerStatus {
                drain: DrainState::Failed { id: operation_id(&o), error: "checkpoint of partition 2: 503".into() },
                input_partitions: 6,
                ..WorkerStatus::default()
            }),
        )];
        match drain_decision(&o, &failed, now(), T) {
            Decision::Fail(m) => assert!(m.contains("worker a could not drain: checkpoint of partition 2: 503"), "{m}"),
            d => panic!("{d:?}"),
        }
        let unreachable = vec![("a".to_owned(), Err("admin API unreachable: refused".to_owned()))];
        assert!(matches!(drain_decision(&o, &unreachable, now(), T), Decision::Wait(_)));
        match drain_decision(&o, &unreachable, now(), Duration::from_secs(10)) {
            Decision::Fail(m) => assert!(m.starts_with("timed out after 10s") && m.contains("refused"), "{m}"),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn restoring_completes_when_the_new_workers_own_every_partition_caught_up() {
        let o = op(OperationStep::Restoring);
        let three = vec![
            ("a".to_owned(), running(&[0, 1], 6)),
            ("b".to_owned(), running(&[2, 3], 6)),
            ("c".to_owned(), running(&[4, 5], 6)),
        ];
        assert!(matches!(restore_decision(&o, 4, 4, &three, now(), T), Decision::Wait(m) if m.contains("3/4 workers")));
        let mut four = three.clone();
        four.push(("d".to_owned(), running(&[], 6)));
        assert!(matches!(restore_decision(&o, 4, 4, &four, now(), T), Decision::Done { .. }));
        assert!(
            matches!(restore_decision(&o, 4, 3, &four, now(), T), Decision::Wait(m) if m.contains("Deployment: 3/4 available")),
            "the Deployment's own count must agree"
        );
        let mut replaying = four.clone();
        replaying[0].1.as_mut().unwrap().replaying = 1;
        assert!(
            matches!(restore_decision(&o, 4, 4, &replaying, now(), T), Decision::Wait(m) if m.contains("1 replaying"))
        );
        let mut held = four.clone();
        held[3] = ("d".to_owned(), drained(&o, &[], 1, 6));
        assert!(
            matches!(restore_decision(&o, 4, 4, &held, now(), T), Decision::Wait(m) if m.contains("d still drained"))
        );
        assert!(matches!(restore_decision(&o, 4, 4, &three, now(), Duration::from_secs(1)), Decision::Fail(_)));
    }

    #[test]
    fn suspending_completes_once_no_worker_is_left() {
        let o = op(OperationStep::Restoring);
        let one = vec![("a".to_owned(), drained(&o, &[0, 1], 1, 2))];
        assert!(matches!(restore_decision(&o, 0, 0, &one, now(), T), Decision::Wait(m) if m.contains("1/0 workers")));
        assert!(matches!(restore_decision(&o, 0, 1, &[], now(), T), Decision::Wait(_)), "a pod still available");
        assert!(matches!(restore_decision(&o, 0, 0, &[], now(), T), Decision::Done { .. }));
    }

    #[test]
    fn a_rolled_back_rescale_is_not_retried_at_once() {
        let mut tm: TenantModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
            "metadata": {"name": "t", "generation": 3},
            "spec": {"parallelism": 4,
                     "source": {"bootstrapServers": "k:9092", "topics": ["in"], "keyField": "u", "eventTime": {"field": "ts"}},
                     "model": {"uri": "file:///m", "sha256": "00", "version": "v", "features": [], "outputs": [{"name": "s"}]},
                     "sink": {"topic": "out", "deadLetterTopic": "dlq"}}
        }))
        .unwrap();
        assert!(should_start(&tm, 2, 2, now()));
        assert!(!should_start(&tm, 4, 4, now()), "nothing to do");
        assert!(!should_start(&tm, 2, 0, now()), "nothing runs to drain: applied directly");
        let o = op(OperationStep::RollingBack);
        let last = outcome(&o, "RolledBack", "timed out".into(), now(), Some(3));
        tm.status =
            Some(streamscore_crds::tenantmodel::TenantModelStatus { last_rescale: Some(last), ..Default::default() });
        assert!(!should_start(&tm, 2, 2, now()));
        assert!(should_start(&tm, 2, 2, now() + chrono::Duration::seconds(301)), "retried later");
        tm.metadata.generation = Some(4);
        assert!(should_start(&tm, 2, 2, now()), "retried when the spec changes");
    }

    #[test]
    fn a_rescale_that_keeps_rolling_back_is_retried_less_often_then_given_up() {
        let mut tm: TenantModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
            "metadata": {"name": "t", "generation": 3},
            "spec": {"parallelism": 4,
                     "source": {"bootstrapServers": "k:9092", "topics": ["in"], "keyField": "u", "eventTime": {"field": "ts"}},
                     "model": {"uri": "file:///m", "sha256": "00", "version": "v", "features": [], "outputs": [{"name": "s"}]},
                     "sink": {"topic": "out", "deadLetterTopic": "dlq"}}
        }))
        .unwrap();
        let o = op(OperationStep::RollingBack);
        let mut last: Option<RescaleOutcome> = None;
        let mut waits = Vec::new();
        for _ in 0..MAX_ATTEMPTS {
            let out = rolled_back(outcome(&o, "RolledBack", "timed out".into(), now(), Some(3)), last.as_ref());
            waits.push(retry_after(&out).map(|d| d.as_secs() / 60));
            last = Some(out);
        }
        assert_eq!(waits, [Some(5), Some(10), Some(20), Some(40), None]);
        assert_eq!(last.as_ref().unwrap().attempts, Some(MAX_ATTEMPTS));
        tm.status =
            Some(streamscore_crds::tenantmodel::TenantModelStatus { last_rescale: last.clone(), ..Default::default() });
        assert!(!should_start(&tm, 2, 2, now() + chrono::Duration::days(30)), "given up");
        tm.metadata.generation = Some(4);
        assert!(should_start(&tm, 2, 2, now()), "a spec change starts over");
        // Another target, or a success in between, counts from one again.
        let other = rolled_back(
            RescaleOutcome { to: 6, ..outcome(&o, "RolledBack", "x".into(), now(), Some(3)) },
            last.as_ref(),
        );
        assert_eq!(other.attempts, Some(1));
    }

    #[test]
    fn the_outcome_records_how_long_input_was_paused() {
        let mut o = op(OperationStep::Restoring);
        o.paused_at = Some(millis_rfc3339(now().timestamp_millis() - 8_250));
        let r = outcome(&o, "Succeeded", String::new(), now(), Some(1));
        assert_eq!(r.paused_seconds, Some(8.3));
        assert_eq!((r.from, r.to, r.result.as_str()), (2, 4, "Succeeded"));
    }

    #[test]
    fn last_checkpoint_is_the_oldest_partitions_newest() {
        let w = |parts: &[(i32, i64)]| -> Result<WorkerStatus, String> {
            Ok(WorkerStatus {
                input_partitions: 3,
                checkpoints: parts
                    .iter()
                    .map(|(p, at)| PartitionCheckpoint { partition: *p, manifest: format!("m{p}"), at_ms: *at })
                    .collect(),
                ..WorkerStatus::default()
            })
        };
        let t = now().timestamp_millis();
        let partial = vec![("a".to_owned(), w(&[(0, t), (1, t)]))];
        assert_eq!(last_checkpoint(&partial).as_deref(), Some("none yet for 1 of 3 partitions"));
        let all = vec![("a".to_owned(), w(&[(0, t), (1, t - 5_000)])), ("b".to_owned(), w(&[(2, t - 1_000)]))];
        assert_eq!(last_checkpoint(&all), Some(format!("{} (3/3 partitions)", millis_rfc3339(t - 5_000))));
        assert_eq!(last_checkpoint(&[]), None);
    }

    #[test]
    fn incomplete_state_is_every_workers_list_or_unknown() {
        let w = |what: &[&str]| -> Result<WorkerStatus, String> {
            Ok(WorkerStatus { incomplete: what.iter().map(|s| (*s).to_owned()).collect(), ..WorkerStatus::default() })
        };
        let two = vec![("b".to_owned(), w(&["tx/1: 5 records"])), ("a".to_owned(), w(&["tx/0: 9 records"]))];
        assert_eq!(incomplete_state(&two), Some(vec!["tx/0: 9 records".to_owned(), "tx/1: 5 records".to_owned()]));
        assert_eq!(incomplete_state(&[("a".to_owned(), w(&[]))]), Some(vec![]));
        let silent = vec![("a".to_owned(), w(&[])), ("b".to_owned(), Err("connection refused".to_owned()))];
        assert_eq!(incomplete_state(&silent), None, "a worker that did not answer: unknown, not complete");
    }
}
