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
//! Repeating a drain with the same id while drained only extends the hold, so a restarted
//! operator can ask again. Correctness never depends on the drain: a partition handed over
//! without one is checkpointed on revoke. The drain makes the hand-over a precondition the
//! operator can check (every partition checkpointed) and keeps the replay short.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One partition as the drain left it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainedPartition {
    /// Input partition.
    pub partition: i32,
    /// Next input offset per topic held by the state (and committed).
    pub offsets: BTreeMap<String, i64>,
    /// Id of the checkpoint that holds the state at `offsets` (None without a checkpoint
    /// store, or for a partition that never received a record).
    pub manifest: Option<String>,
}

/// What a completed drain reports.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    /// The id the drain was asked with.
    pub id: String,
    /// When consumption stopped (Unix milliseconds).
    pub paused_at_ms: i64,
    /// Whether checkpoints go to an object store (otherwise a moved partition is rebuilt).
    pub checkpoint_store: bool,
    /// Every partition owned at the drain.
    pub partitions: Vec<DrainedPartition>,
}

#[derive(Clone, Debug)]
enum Drain {
    Idle,
    Requested { id: String, hold_until: Instant },
    Drained { report: DrainReport, hold_until: Instant, assignment: u64 },
    Failed { id: String, error: String },
}

/// The drain state as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state")]
pub enum DrainView {
    /// Consuming.
    Idle,
    /// Asked; the loop has not finished it.
    Draining {
        /// Its id.
        id: String,
    },
    /// Stopped, committed and checkpointed.
    Drained {
        /// The report.
        report: DrainReport,
    },
    /// The drain failed (e.g. a checkpoint upload); consuming again.
    Failed {
        /// Its id.
        id: String,
        /// Why.
        error: String,
    },
}

/// Shared by the admin API and the Kafka loop.
#[derive(Debug)]
pub struct Admin {
    drain: Mutex<Drain>,
    /// Assignments received (the rebalance callback counts them).
    assignments: AtomicU64,
    /// Partitions to resume at the loop's next turn.
    resume: Mutex<bool>,
}

impl Default for Admin {
    fn default() -> Self {
        Self { drain: Mutex::new(Drain::Idle), assignments: AtomicU64::new(0), resume: Mutex::new(false) }
    }
}

impl Admin {
    fn lock(&self) -> std::sync::MutexGuard<'_, Drain> {
        self.drain.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Asks for a drain named `id` held for `hold` (extended when asked again with the same
    /// id). Returns the state after the request.
    pub fn request_drain(&self, id: &str, hold: Duration) -> DrainView {
        let until = Instant::now() + hold;
        let mut d = self.lock();
        match &mut *d {
            Drain::Requested { id: cur, hold_until }
            | Drain::Drained { report: DrainReport { id: cur, .. }, hold_until, .. }
                if cur == id =>
            {
                *hold_until = until;
            }
            Drain::Failed { id: cur, .. } if cur == id => {}
            _ => *d = Drain::Requested { id: id.to_owned(), hold_until: until },
        }
        view(&d)
    }

    /// Ends a drain (if any): consuming again at the loop's next turn.
    pub fn resume(&self) -> DrainView {
        let mut d = self.lock();
        if matches!(*d, Drain::Requested { .. } | Drain::Drained { .. }) {
            *d = Drain::Idle;
            *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = true;
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
        let mut d = self.lock();
        match &*d {
            Drain::Requested { hold_until, .. } if *hold_until <= Instant::now() => {
                *d = Drain::Idle;
                None
            }
            Drain::Requested { id, .. } => Some(id.clone()),
            _ => None,
        }
    }

    /// Loop side: the drain `id` is done (or failed; then the loop resumes at once).
    pub fn finish(&self, id: &str, result: Result<DrainReport, String>) {
        let mut d = self.lock();
        let hold_until = match &*d {
            Drain::Requested { id: cur, hold_until } if cur == id => *hold_until,
            // Resumed (or asked again with another id) meanwhile.
            _ => {
                *self.resume.lock().unwrap_or_else(|e| e.into_inner()) = true;
                return;
            }
        };
        *d = match result {
            Ok(report) => Drain::Drained { report, hold_until, assignment: self.assignments.load(Ordering::Acquire) },
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
        if let Drain::Drained { hold_until, assignment, .. } = &*d {
            if *hold_until <= Instant::now() || *assignment != self.assignments.load(Ordering::Acquire) {
                *d = Drain::Idle;
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
