//! Readiness (`/readyz`) and liveness (`/healthz`) facts, shared by the Kafka loop and the
//! HTTP server.

use super::*;

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
    /// Per input partition (`topic/partition`) whose state was restored or rebuilt without
    /// records the input no longer retains: what is missing (admin status, `incomplete`).
    pub incomplete: RwLock<std::collections::BTreeMap<String, (i32, String)>>,
    /// While the lookup tables are being read before the first assignment: how far (or why
    /// not); `None` once loaded or when there are none.
    pub lookups: RwLock<Option<String>>,
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
        why.extend(self.lookups.read().unwrap_or_else(|e| e.into_inner()).iter().cloned());
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
