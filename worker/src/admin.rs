//! Drain control: what the admin API (`/v1/admin/*`, used by the operator to rescale) asks
//! of the Kafka loop, and what the loop reports back.
//!
//! ```text
//!  POST /v1/admin/drain?id=..&holdSeconds=..   Idle ─► Requested ─(loop: pause every owned
//!                                              partition, commit synchronously, checkpoint each
//!                                              one and wait for its upload)─► Drained{report}
//!                                                                          └► Failed{error}
//!  Drained ─► Idle (consuming again) when: POST /v1/admin/resume, the hold expires (the
//!             operator stopped asking), or a new assignment arrives (the rescale happened).
//! ```
//! A drain asked with `fence=true` (the live run at a blue/green cut-over) is not ended by a new
//! assignment: newly assigned partitions stay paused too, until resumed or the hold expires.
//! It is kept in the state directory: a container restarted while fenced (SIGKILL, OOM) starts
//! fenced again, with every partition paused, instead of writing outputs past the barrier.
//! `checkpoint=false` skips the object-store checkpoints (the cut-over needs only the commit).
//!
//! Shadow mode (a blue/green candidate, [`ShadowConfig`]): outputs go to the shadow topics until
//! `POST /v1/admin/golive` sets the barrier (first live input offset per partition); the same
//! barrier asked again is accepted, a different one refused. The barrier is also written to the
//! state directory before the answer, so a container restarted by its kubelet (same volume, and
//! a mounted ConfigMap that may not show the barrier yet) starts live from it.
//!
//! Repeating a drain with the same id while drained only extends the hold, so a restarted
//! operator can ask again. Correctness never depends on the drain: a partition handed over
//! without one is checkpointed on revoke. The drain makes the hand-over a precondition the
//! operator can check (every partition checkpointed) and keeps the replay short.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use streamscore_crds::pipeline::ShadowConfig;

pub use streamscore_crds::admin::{Barrier, DrainReport, DrainView, DrainedPartition};

#[derive(Clone, Debug)]
enum Drain {
    Idle,
    Requested { id: String, hold_until: Instant, opts: DrainOptions },
    Drained { report: DrainReport, hold_until: Instant, assignment: u64, fence: bool },
    Failed { id: String, error: String },
}

/// How a drain is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainOptions {
    /// Checkpoint every partition to the object store (besides the commit).
    pub checkpoint: bool,
    /// Stay paused across new assignments (until resumed or the hold expires).
    pub fence: bool,
}

impl Default for DrainOptions {
    fn default() -> Self {
        Self { checkpoint: true, fence: false }
    }
}

/// Shared by the admin API and the Kafka loop.
#[derive(Debug)]
pub struct Admin {
    drain: Mutex<Drain>,
    /// Shadow mode (None: every output is live), with the barrier once set.
    shadow: Mutex<Option<ShadowConfig>>,
    /// Where the barrier is kept for a restarted container (in the state directory).
    barrier_file: Mutex<Option<std::path::PathBuf>>,
    /// Where a fenced drain is kept for a restarted container (in the state directory).
    fence_file: Mutex<Option<std::path::PathBuf>>,
    /// Assignments received (the rebalance callback counts them).
    assignments: AtomicU64,
    /// Partitions to resume at the loop's next turn.
    resume: Mutex<bool>,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            drain: Mutex::new(Drain::Idle),
            shadow: Mutex::new(None),
            barrier_file: Mutex::new(None),
            fence_file: Mutex::new(None),
            assignments: AtomicU64::new(0),
            resume: Mutex::new(false),
        }
    }
}

impl Admin {
    fn lock(&self) -> std::sync::MutexGuard<'_, Drain> {
        self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An admin state for a worker started with `shadow` (the pipeline's `shadow` section).
    pub fn with_shadow(shadow: Option<ShadowConfig>) -> Self {
        Self { shadow: Mutex::new(shadow), ..Self::default() }
    }

    /// The shadow configuration, locked (the Kafka loop routes a batch's outputs with it).
    pub fn shadow(&self) -> std::sync::MutexGuard<'_, Option<ShadowConfig>> {
        self.shadow.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Restores what a container restart must not forget, once, before the admin API answers:
    /// the shadow configuration with a cut-over barrier kept in `state_dir`, and a fenced drain
    /// still within its hold. (Called again by the Kafka loop for embedded runs; a no-op then.)
    pub fn restore_after_restart(&self, shadow: Option<ShadowConfig>, state_dir: &std::path::Path) {
        if self.barrier_file.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
            return;
        }
        self.start_shadow(shadow, state_dir.join(".cutover-barrier.json"));
        self.restore_fence(state_dir.join(".cutover-fence.json"));
    }

    /// Starts shadow mode as configured; `barrier_file` keeps a barrier set by
    /// [`Admin::go_live`] across container restarts: when the configuration has no barrier and
    /// the file has one, the worker starts live from it.
    pub fn start_shadow(&self, shadow: Option<ShadowConfig>, barrier_file: std::path::PathBuf) {
        let mut shadow = shadow;
        if let Some(sh) = shadow.as_mut().filter(|s| s.live_from.is_none()) {
            if let Some(b) = std::fs::read(&barrier_file).ok().and_then(|t| serde_json::from_slice::<Barrier>(&t).ok())
            {
                tracing::info!(barrier = ?b, "restarted after the cut-over: live from the barrier kept in the state directory");
                sh.live_from = Some(b);
            }
        }
        *self.shadow() = shadow;
        *self.barrier_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(barrier_file);
    }

    /// Starts fenced when `file` holds a fenced drain whose hold has not expired (the container
    /// restarted while its run was stopped at a cut-over barrier); remembers `file` for the
    /// fenced drains to come.
    pub fn restore_fence(&self, file: std::path::PathBuf) {
        if let Some(v) = std::fs::read(&file).ok().and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok()) {
            let left = v["holdUntilMs"].as_i64().unwrap_or(0) - chrono::Utc::now().timestamp_millis();
            let id = v["id"].as_str().unwrap_or("fence").to_owned();
            if left > 0 {
                tracing::warn!(%id, left_ms = left, "restarted while fenced at a cut-over: every partition stays paused");
                *self.lock() = Drain::Requested {
                    id,
                    hold_until: Instant::now() + Duration::from_millis(left as u64),
                    opts: DrainOptions { checkpoint: false, fence: true },
                };
            } else {
                let _ = std::fs::remove_file(&file);
            }
        }
        *self.fence_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(file);
    }

    fn keep_fence(&self, id: &str, hold_until: Instant) {
        let Some(f) = self.fence_file.lock().unwrap_or_else(|e| e.into_inner()).clone() else { return };
        let left = hold_until.saturating_duration_since(Instant::now()).as_millis() as i64;
        let text =
            serde_json::json!({"id": id, "holdUntilMs": chrono::Utc::now().timestamp_millis() + left}).to_string();
        let tmp = f.with_extension("part");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &f)) {
            tracing::warn!(error = %e, file = %f.display(), "cannot keep the fence for a restart");
        }
    }

    fn drop_fence(&self) {
        if let Some(f) = self.fence_file.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Sets the cut-over barrier of a worker in shadow mode (and writes it to the state
    /// directory first). The same barrier again is accepted (a restarted operator asks again);
    /// another barrier, or a worker not in shadow mode, is refused with the reason.
    pub fn go_live(&self, barrier: &Barrier) -> Result<(), String> {
        let mut s = self.shadow();
        let Some(shadow) = s.as_mut() else { return Err("this worker is not in shadow mode".into()) };
        match &shadow.live_from {
            Some(b) if b == barrier => Ok(()),
            Some(b) => Err(format!("already live from another barrier: {b:?}")),
            None => {
                if let Some(f) = self.barrier_file.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    let text = serde_json::to_vec(barrier).map_err(|e| e.to_string())?;
                    let tmp = f.with_extension("part");
                    std::fs::write(&tmp, text)
                        .and_then(|()| std::fs::rename(&tmp, f))
                        .map_err(|e| format!("keeping the barrier in {}: {e}", f.display()))?;
                }
                shadow.live_from = Some(barrier.clone());
                Ok(())
            }
        }
    }

    /// Asks for a drain named `id` held for `hold` (extended when asked again with the same
    /// id). Returns the state after the request.
    pub fn request_drain(&self, id: &str, hold: Duration) -> DrainView {
        self.request_drain_with(id, hold, DrainOptions::default())
    }

    /// [`Admin::request_drain`] with options.
    pub fn request_drain_with(&self, id: &str, hold: Duration, opts: DrainOptions) -> DrainView {
        let until = Instant::now() + hold;
        let mut d = self.lock();
        match &mut *d {
            Drain::Requested { id: cur, hold_until, .. }
            | Drain::Drained { report: DrainReport { id: cur, .. }, hold_until, .. }
                if cur == id =>
            {
                *hold_until = until;
            }
            Drain::Failed { id: cur, .. } if cur == id => {}
            _ => *d = Drain::Requested { id: id.to_owned(), hold_until: until, opts },
        }
        view(&d)
    }

    /// Ends a drain (if any): consuming again at the loop's next turn.
    pub fn resume(&self) -> DrainView {
        let mut d = self.lock();
        if matches!(*d, Drain::Requested { .. } | Drain::Drained { .. }) {
            *d = Drain::Idle;
            *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = true;
            self.drop_fence();
        }
        view(&d)
    }

    /// The drain state.
    pub fn view(&self) -> DrainView {
        view(&self.lock())
    }

    /// Whether the loop is held (drained): it keeps polling (rebalances, heartbeats) with every
    /// partition paused.
    pub fn drained(&self) -> bool {
        matches!(*self.lock(), Drain::Drained { .. })
    }

    /// Loop side: the id of a drain to perform now, if one is asked and not expired.
    pub fn pending(&self) -> Option<String> {
        self.pending_with().map(|(id, _)| id)
    }

    /// Loop side: the id and options of a drain to perform now.
    pub fn pending_with(&self) -> Option<(String, DrainOptions)> {
        let mut d = self.lock();
        match &*d {
            Drain::Requested { hold_until, .. } if *hold_until <= Instant::now() => {
                *d = Drain::Idle;
                None
            }
            Drain::Requested { id, opts, .. } => Some((id.clone(), *opts)),
            _ => None,
        }
    }

    /// Whether a fenced drain holds the worker: newly assigned partitions must stay paused.
    pub fn fenced(&self) -> bool {
        matches!(
            *self.lock(),
            Drain::Drained { fence: true, .. } | Drain::Requested { opts: DrainOptions { fence: true, .. }, .. }
        )
    }

    /// Loop side: the drain `id` is done (or failed; then the loop resumes at once).
    pub fn finish(&self, id: &str, result: Result<DrainReport, String>) {
        let mut d = self.lock();
        let (hold_until, fence) = match &*d {
            Drain::Requested { id: cur, hold_until, opts } if cur == id => (*hold_until, opts.fence),
            // Resumed (or asked again with another id) meanwhile.
            _ => {
                *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = true;
                return;
            }
        };
        if fence && result.is_ok() {
            self.keep_fence(id, hold_until);
        } else {
            self.drop_fence();
        }
        *d = match result {
            Ok(report) => {
                Drain::Drained { report, hold_until, assignment: self.assignments.load(Ordering::Acquire), fence }
            }
            Err(error) => {
                *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = true;
                Drain::Failed { id: id.to_owned(), error }
            }
        };
    }

    /// Rebalance side: a new assignment took effect.
    pub fn assigned(&self) {
        self.assignments.fetch_add(1, Ordering::AcqRel);
    }

    /// Loop side: whether to resume every partition now (asked, the hold expired, or a new
    /// assignment arrived since the drain); the drain is then over.
    pub fn take_resume(&self) -> bool {
        let mut d = self.lock();
        if let Drain::Drained { hold_until, assignment, fence, .. } = &*d {
            let reassigned = !*fence && *assignment != self.assignments.load(Ordering::Acquire);
            if *hold_until <= Instant::now() || reassigned {
                *d = Drain::Idle;
                self.drop_fence();
                return true;
            }
        }
        std::mem::take(&mut *self.resume.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

fn view(d: &Drain) -> DrainView {
    match d {
        Drain::Idle => DrainView::Idle,
        Drain::Requested { id, .. } => DrainView::Draining { id: id.clone() },
        Drain::Drained { report, .. } => DrainView::Drained { report: report.clone() },
        Drain::Failed { id, error } => DrainView::Failed { id: id.clone(), error: error.clone() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn report(id: &str) -> DrainReport {
        DrainReport { id: id.into(), paused_at_ms: 1, checkpoint_store: true, partitions: vec![] }
    }

    #[test]
    fn a_drain_is_performed_once_and_held_until_resumed() {
        let a = Admin::default();
        assert_eq!(a.pending(), None);
        assert_eq!(a.request_drain("op1", Duration::from_secs(60)), DrainView::Draining { id: "op1".into() });
        assert_eq!(a.pending().as_deref(), Some("op1"));
        a.finish("op1", Ok(report("op1")));
        assert_eq!(a.pending(), None, "performed once");
        assert!(a.drained());
        assert!(!a.take_resume());
        // Asked again (a restarted operator): same report, nothing redone.
        assert_eq!(a.request_drain("op1", Duration::from_secs(60)), DrainView::Drained { report: report("op1") });
        assert_eq!(a.pending(), None);
        a.resume();
        assert!(a.take_resume());
        assert!(!a.take_resume(), "once");
        assert_eq!(a.view(), DrainView::Idle);
    }

    #[test]
    fn a_drain_ends_with_a_new_assignment_or_when_the_hold_expires() {
        let a = Admin::default();
        a.request_drain("op1", Duration::from_secs(60));
        a.pending();
        a.finish("op1", Ok(report("op1")));
        a.assigned();
        assert!(a.take_resume(), "the rescale's rebalance ends the drain");
        assert_eq!(a.view(), DrainView::Idle);

        a.request_drain("op2", Duration::from_millis(1));
        a.pending();
        a.finish("op2", Ok(report("op2")));
        std::thread::sleep(Duration::from_millis(5));
        assert!(a.take_resume(), "an operator that stopped asking does not hold the workers forever");
        a.request_drain("op3", Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(a.pending(), None, "an expired request is not performed");
    }

    #[test]
    fn a_fenced_drain_outlasts_new_assignments() {
        let a = Admin::default();
        let opts = DrainOptions { checkpoint: false, fence: true };
        a.request_drain_with("cut", Duration::from_secs(60), opts);
        assert!(a.fenced(), "fenced from the request on: an assignment before the drain stays paused");
        assert_eq!(a.pending_with(), Some(("cut".into(), opts)));
        a.finish("cut", Ok(report("cut")));
        a.assigned();
        assert!(!a.take_resume(), "a rebalance does not end a fenced drain");
        assert!(a.fenced());
        a.resume();
        assert!(a.take_resume());
        assert!(!a.fenced());
    }

    #[test]
    fn the_barrier_is_set_once() {
        let shadow =
            ShadowConfig { topic: "s".into(), dead_letter_topic: "d".into(), feature_topic: None, live_from: None };
        assert!(Admin::default().go_live(&Barrier::new()).is_err(), "not in shadow mode");
        let a = Admin::with_shadow(Some(shadow));
        let b: Barrier = BTreeMap::from([("in".to_owned(), BTreeMap::from([(0, 10), (1, 7)]))]);
        assert!(!a.shadow().as_ref().unwrap().is_live("in", 0, 1_000));
        a.go_live(&b).unwrap();
        a.go_live(&b).expect("the same barrier again is accepted");
        let other: Barrier = BTreeMap::from([("in".to_owned(), BTreeMap::from([(0, 11)]))]);
        assert!(a.go_live(&other).unwrap_err().contains("another barrier"));
        let s = a.shadow();
        let s = s.as_ref().unwrap();
        assert!(!s.is_live("in", 0, 9) && s.is_live("in", 0, 10) && s.is_live("in", 1, 7) && !s.is_live("in", 1, 6));
        assert!(s.is_live("in", 2, 0), "a partition without a barrier entry is live");
    }

    #[test]
    fn a_worker_restarted_while_fenced_starts_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".fence.json");
        let a = Admin::default();
        a.restore_fence(file.clone());
        let opts = DrainOptions { checkpoint: false, fence: true };
        a.request_drain_with("u1-live-1", Duration::from_secs(60), opts);
        a.pending_with();
        a.finish("u1-live-1", Ok(report("u1-live-1")));
        // SIGKILL, then the container starts again on the same state directory.
        let restarted = Admin::default();
        restarted.restore_fence(file.clone());
        assert!(restarted.fenced(), "partitions assigned after the restart stay paused");
        assert_eq!(restarted.pending_with(), Some(("u1-live-1".into(), opts)), "and the drain is performed again");
        restarted.finish("u1-live-1", Ok(report("u1-live-1")));
        restarted.resume();
        assert!(!file.exists(), "a resume ends the fence for good");
        let again = Admin::default();
        again.restore_fence(file.clone());
        assert!(!again.fenced());
        // A drain that is not a fence leaves nothing behind.
        again.request_drain("op", Duration::from_secs(60));
        again.pending();
        again.finish("op", Ok(report("op")));
        assert!(!file.exists());
    }

    #[test]
    fn a_restarted_worker_starts_live_from_the_barrier_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(".cutover-barrier.json");
        let shadow =
            ShadowConfig { topic: "s".into(), dead_letter_topic: "d".into(), feature_topic: None, live_from: None };
        let b: Barrier = BTreeMap::from([("in".to_owned(), BTreeMap::from([(0, 10)]))]);
        let a = Admin::default();
        a.start_shadow(Some(shadow.clone()), file.clone());
        a.go_live(&b).unwrap();
        // The container restarts with the pipeline as mounted at pod start (no barrier).
        let restarted = Admin::default();
        restarted.start_shadow(Some(shadow.clone()), file.clone());
        assert_eq!(restarted.shadow().as_ref().unwrap().live_from, Some(b));
        // A new pod (empty state directory) in shadow mode stays in shadow.
        let fresh = Admin::default();
        fresh.start_shadow(Some(shadow), dir.path().join("other.json"));
        assert_eq!(fresh.shadow().as_ref().unwrap().live_from, None);
    }

    #[test]
    fn resuming_twice_keeps_what_the_operator_asked_in_between() {
        let dir = tempfile::tempdir().unwrap();
        let shadow =
            ShadowConfig { topic: "s".into(), dead_letter_topic: "d".into(), feature_topic: None, live_from: None };
        let b: Barrier = BTreeMap::from([("in".to_owned(), BTreeMap::from([(1, 7)]))]);
        // main() resumes before the admin API answers; a go-live arrives; the Kafka loop resumes again.
        let a = Admin::default();
        a.restore_after_restart(Some(shadow.clone()), dir.path());
        a.go_live(&b).unwrap();
        a.restore_after_restart(Some(shadow), dir.path());
        assert_eq!(a.shadow().as_ref().unwrap().live_from, Some(b));
    }

    #[test]
    fn a_failed_drain_resumes_and_reports_the_error() {
        let a = Admin::default();
        a.request_drain("op1", Duration::from_secs(60));
        a.pending();
        a.finish("op1", Err("checkpoint of partition 3: store unreachable".into()));
        assert!(a.take_resume());
        assert_eq!(
            a.request_drain("op1", Duration::from_secs(60)),
            DrainView::Failed { id: "op1".into(), error: "checkpoint of partition 3: store unreachable".into() }
        );
        // A new attempt (new id) is performed.
        a.request_drain("op2", Duration::from_secs(60));
        assert_eq!(a.pending().as_deref(), Some("op2"));
    }
}
