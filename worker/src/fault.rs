//! Fault injection for the chaos suite (`make chaos`, `tests/tests/chaos.rs`): with
//! `STREAMSCORE_CRASH_AT=<point>[:<n>]` the worker aborts (SIGABRT: no destructors, no flush,
//! nothing committed, as with SIGKILL) the `n`-th time (default: the first) it reaches `point`,
//! so a crash lands exactly between two steps of a commit, where a SIGKILL from outside lands
//! only by chance. Unset (always, outside tests), [`point`] costs one read of an initialised
//! `OnceLock`, and it is called once per commit, never per record.
//!
//! Points, in the order a commit reaches them (see `crate::kafka`); only commits that carry
//! progress (new offsets, changed state) count as hits:
//! - `transaction-commit`: exactlyOnce, the epoch's records sent, its transaction not committed;
//! - `after-transaction-commit`: exactlyOnce, the transaction committed, the state not yet written;
//! - `state-write`: the epoch's outputs acknowledged, the state not yet written;
//! - `offset-commit`: the state written, the offsets not yet committed (atLeastOnce).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static PLAN: OnceLock<Option<(String, u64)>> = OnceLock::new();
static HITS: AtomicU64 = AtomicU64::new(0);

fn plan() -> &'static Option<(String, u64)> {
    PLAN.get_or_init(|| {
        let v = std::env::var("STREAMSCORE_CRASH_AT").ok()?;
        let (point, n) = match v.split_once(':') {
            Some((p, n)) => (p.to_owned(), n.parse().unwrap_or(1)),
            None => (v, 1),
        };
        tracing::warn!(%point, n, "fault injection armed (STREAMSCORE_CRASH_AT)");
        Some((point, n.max(1)))
    })
}

/// Crashes the process (abort) when `STREAMSCORE_CRASH_AT` names `name` and this is its n-th hit.
pub fn point(name: &str) {
    let Some((p, n)) = plan() else { return };
    if p == name && HITS.fetch_add(1, Ordering::Relaxed) + 1 == *n {
        eprintln!("streamscore-worker: fault injection: crashing at {name} (hit {n})");
        std::process::abort();
    }
}

static SLOW: OnceLock<Option<std::time::Duration>> = OnceLock::new();

/// With `STREAMSCORE_SLOW_RECORD_MICROS=<n>` (tests only), each processed batch takes `n` µs
/// per record longer, as a heavier model would: the autoscaling test gives one worker a small,
/// known capacity. Unset, one read of an initialised `OnceLock` per batch.
pub fn slow_batch(records: usize) {
    let per = SLOW.get_or_init(|| {
        let us: u64 = std::env::var("STREAMSCORE_SLOW_RECORD_MICROS").ok()?.parse().ok()?;
        tracing::warn!(
            us,
            "fault injection armed: every record takes this much longer (STREAMSCORE_SLOW_RECORD_MICROS)"
        );
        Some(std::time::Duration::from_micros(us))
    });
    if let Some(per) = per {
        std::thread::sleep(*per * records as u32);
    }
}
