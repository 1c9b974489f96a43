//! Fault injection for the fault-injection suite (`tests/tests/e2e_local.rs`,
//! `an_operator_killed_at_every_step_...`): with `STREAMSCORE_CRASH_AT=each` and
//! `STREAMSCORE_CRASH_LOG=<file>`, the operator aborts (SIGABRT: no destructors, no graceful
//! stop, as with SIGKILL) at the first [`point`] it reaches that the file does not list yet,
//! after appending the point's name to it. Restarted, as its Deployment would restart it, it
//! resumes the operation from `status` and aborts at the next new point: one operation run
//! crashes the operator once at each step. `STREAMSCORE_CRASH_AT=<point>` aborts at that point
//! only (once per log file). Unset (always, outside tests), [`point`] costs one read of an
//! initialised `OnceLock`; points are reached once per reconcile step, never per record.
//!
//! Points, each between an action and the status write that records it:
//! - `rescale-draining`: drain requests sent to the workers, the outcome not recorded;
//! - `rescale-checkpointed`: `Scaling` recorded, the Deployment not yet scaled;
//! - `rescale-scaled`: the Deployment scaled, `Restoring` not yet recorded;
//! - `rescale-restored`: the workers resumed and restored, the outcome not recorded;
//! - `upgrade-gates-passed`: `CuttingOver` recorded, nothing paused yet;
//! - `upgrade-candidate-paused`: the candidate drained, its positions not recorded;
//! - `upgrade-live-fenced`: the live colour fenced, the barrier not recorded;
//! - `upgrade-barrier-recorded`: the barrier recorded, the candidate not told;
//! - `upgrade-went-live`: the candidate told the barrier, not yet resumed;
//! - `upgrade-completed`: every candidate pod live from the barrier, the outcome not recorded;
//! - `upgrade-recorded`: the outcome and the new `activeColor` recorded, the old colour not yet
//!   removed (the removal follows the record, never the other way round).

use std::io::Write as _;
use std::sync::OnceLock;

static PLAN: OnceLock<Option<(String, std::path::PathBuf)>> = OnceLock::new();

fn plan() -> &'static Option<(String, std::path::PathBuf)> {
    PLAN.get_or_init(|| {
        let at = std::env::var("STREAMSCORE_CRASH_AT").ok()?;
        let log = std::env::var("STREAMSCORE_CRASH_LOG").map_or_else(
            |_| std::env::temp_dir().join(format!("streamscore-operator-crashes-{}", std::process::id())),
            std::path::PathBuf::from,
        );
        tracing::warn!(%at, log = %log.display(), "fault injection armed (STREAMSCORE_CRASH_AT)");
        Some((at, log))
    })
}

/// Aborts the process if fault injection is armed for `name` and the log does not list it yet.
pub fn point(name: &str) {
    let Some((at, log)) = plan() else { return };
    if at != "each" && at != name {
        return;
    }
    let done = std::fs::read_to_string(log).unwrap_or_default();
    if done.lines().any(|l| l == name) {
        return;
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{name}");
        let _ = f.sync_all();
    }
    eprintln!("streamscore-operator: fault injection: crashing at {name}");
    std::process::abort();
}
