//! The commit protocol of the module docs: acknowledgement epochs, the committer thread
//! (state write, offset commit), exactly-once transactions.

use super::*;

/// Commit epochs kept in flight at most (plus the open one); the ring below is larger.
pub(super) const MAX_PENDING_COMMITS: usize = 2;
pub(super) const EPOCH_SLOTS: usize = 16;

/// Outputs sent and acknowledged (or failed) per commit epoch, in a ring indexed by epoch.
/// A slot is reused 16 epochs later, long after its epoch completed.
#[derive(Debug, Default)]
pub(super) struct Acks {
    pub(super) sent: [AtomicU64; EPOCH_SLOTS],
    pub(super) done: [AtomicU64; EPOCH_SLOTS],
}

impl Acks {
    pub(super) fn slot(epoch: u64) -> usize {
        (epoch % EPOCH_SLOTS as u64) as usize
    }

    pub(super) fn complete(&self, epoch: u64) -> bool {
        let i = Self::slot(epoch);
        self.done[i].load(Ordering::Acquire) >= self.sent[i].load(Ordering::Acquire)
    }

    pub(super) fn reset(&self, epoch: u64) {
        let i = Self::slot(epoch);
        self.sent[i].store(0, Ordering::Release);
        self.done[i].store(0, Ordering::Release);
    }
}

/// A checkpoint for the committer thread.
pub(super) struct Job {
    pub(super) epoch: u64,
    pub(super) checkpoint: Checkpoint,
    /// Stores to checkpoint to the object store once this job is written.
    pub(super) uploads: Vec<(i32, StoreHandle)>,
    /// Commit the offsets from the committer thread (false: the caller commits them itself,
    /// e.g. inside a rebalance callback).
    pub(super) commit_offsets: bool,
}

/// The processing thread's end of the committer.
pub(super) struct Committer {
    pub(super) jobs: SyncSender<Job>,
    pub(super) replies: Receiver<Result<u64, Error>>,
    /// Jobs sent and not answered.
    pub(super) pending: usize,
    /// The open epoch (outputs sent now are tagged with it).
    pub(super) epoch: u64,
    /// The epoch whose checkpoint is being serialised.
    pub(super) running: Option<u64>,
    /// The stores to checkpoint with it.
    pub(super) running_uploads: Vec<(i32, StoreHandle)>,
    /// When the last object-store checkpoint was requested.
    pub(super) last_upload: Instant,
}

/// Keys serialised per step of a running checkpoint, between two input batches (~0.5-1 ms).
pub(super) const SNAPSHOT_STEP_KEYS: usize = 256;

impl Shared {
    /// Exactly-once: commits the open transaction with `offsets` (the input positions its
    /// records came from) and opens the next one. Steps 1–3 of the module docs.
    pub(super) fn commit_transaction(
        &self,
        consumer: &BaseConsumer<ConsumerCtx>,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), Error> {
        let started = Instant::now();
        let timeout = self.shutdown_timeout.max(Duration::from_secs(10));
        if !offsets.is_empty() {
            let mut tpl = TopicPartitionList::new();
            for (topic, partition, next) in offsets {
                tpl.add_partition_offset(topic, *partition, Offset::Offset(*next))
                    .map_err(Error::kafka("offsets for the transaction"))?;
            }
            let group = consumer.group_metadata().ok_or(Error::NoGroupMetadata)?;
            self.producer
                .send_offsets_to_transaction(&tpl, &group, timeout)
                .map_err(Error::kafka("adding the input offsets to the transaction"))?;
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
        self.producer.commit_transaction(timeout).map_err(Error::kafka("committing the transaction"))?;
        if progressed {
            crate::fault::point("after-transaction-commit");
        }
        self.metrics.commits.inc();
        self.health.broker_ok.store(true, Ordering::Relaxed);
        self.observe_phase("transaction", started);
        self.producer.begin_transaction().map_err(Error::kafka("beginning a transaction"))?;
        Ok(())
    }

    /// Closes the current epoch and starts a checkpoint at the current offsets; the outputs
    /// sent so far must be acknowledged before it is written.
    pub(super) fn begin_commit(&self, engine: &mut Engine) -> Result<(), Error> {
        let mut guard = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        let c = guard.as_mut().ok_or(Error::CommitterStopped)?;
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
    pub(super) fn step_commit(&self, engine: &mut Engine, budget: usize, commit_offsets: bool) -> Result<(), Error> {
        let mut guard = self.committer.lock().unwrap_or_else(|e| e.into_inner());
        let c = guard.as_mut().ok_or(Error::CommitterStopped)?;
        let Some(epoch) = c.running else { return Ok(()) };
        let started = Instant::now();
        let step = engine.checkpoint_step(budget).map_err(|e| Error::engine("serialising a checkpoint", e))?;
        self.observe_phase("snapshot", started);
        let Some(checkpoint) = step else { return Ok(()) };
        c.running = None;
        let uploads = std::mem::take(&mut c.running_uploads);
        while c.pending >= MAX_PENDING_COMMITS {
            c.wait_one()?;
        }
        c.jobs.send(Job { epoch, checkpoint, uploads, commit_offsets }).map_err(|_| Error::CommitterStopped)?;
        c.pending += 1;
        Ok(())
    }

    pub(super) fn observe_phase(&self, phase: &'static str, since: Instant) {
        self.metrics.commit_seconds.get_or_create(&PhaseLabel { phase }).observe(since.elapsed().as_secs_f64());
    }
}

impl Committer {
    /// Takes the replies that are in (all of them, waiting, with `wait`).
    pub(super) fn collect(&mut self, wait: bool) -> Result<(), Error> {
        while self.pending > 0 {
            let reply = if wait {
                self.replies.recv().map_err(|_| Error::CommitterStopped)?
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

    pub(super) fn wait_one(&mut self) -> Result<(), Error> {
        let reply = self.replies.recv().map_err(|_| Error::CommitterStopped)?;
        self.pending -= 1;
        reply.map(|_| ())
    }
}

/// Commits everything processed so far and waits for it: every output acknowledged, state
/// durable, offsets committed (from this thread, which may be inside a rebalance callback).
pub(super) fn commit_sync(
    shared: &Shared,
    engine: &mut Engine,
    consumer: &BaseConsumer<ConsumerCtx>,
) -> Result<(), Error> {
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
        guard.as_mut().ok_or(Error::CommitterStopped)?.collect(true)?;
    }
    let offsets = engine.positions();
    if !offsets.is_empty() && !shared.exactly_once {
        commit_offsets(shared, consumer, &offsets, CommitMode::Sync);
    }
    debug!(took = ?started.elapsed(), partitions = offsets.len(), "committed (synchronously)");
    Ok(())
}

pub(super) fn commit_offsets(
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
pub(super) fn committer_loop(
    shared: Arc<Shared>,
    consumer: Arc<BaseConsumer<ConsumerCtx>>,
    jobs: Receiver<Job>,
    replies: SyncSender<Result<u64, Error>>,
) {
    let phase = |name: &'static str, since: Instant| shared.observe_phase(name, since);
    let mut last_lag = Instant::now() - Duration::from_secs(60);
    // Where each partition's processing stands (its last committed position): the lag is
    // refreshed from it every 5 s, also while idle (no new commits), so it never goes stale.
    let mut positions: std::collections::BTreeMap<(String, i32), i64> = std::collections::BTreeMap::new();
    let mut stopping_since: Option<Instant> = None;
    while let Ok(job) = jobs.recv() {
        let started = Instant::now();
        let mut warned = Instant::now();
        let result = loop {
            if shared.acks.complete(job.epoch) {
                break Ok(());
            }
            if shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                break Err(Error::Stopping);
            }
            if shared.cancel.is_cancelled()
                && stopping_since.get_or_insert_with(Instant::now).elapsed() >= shared.shutdown_timeout
            {
                break Err(Error::Unacknowledged(format!(
                    "outputs not acknowledged within runtime.shutdownTimeout ({:?}) after the stop signal (brokers \
                     unreachable?): exiting without committing them; their inputs are processed again after restart",
                    shared.shutdown_timeout
                )));
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
                return Err(Error::Unacknowledged(format!("{failures} output records were not acknowledged")));
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
                for (topic, partition, next) in &commits {
                    positions.insert((topic.clone(), *partition), *next);
                }
            }
            if job.commit_offsets && last_lag.elapsed() >= Duration::from_secs(5) {
                last_lag = Instant::now();
                let owned = shared.health.partitions.read().unwrap_or_else(|e| e.into_inner()).clone();
                positions.retain(|(_, p), _| owned.contains(p));
                for ((topic, partition), next) in &positions {
                    if let Ok((_, high)) = consumer.fetch_watermarks(topic, *partition, Duration::from_millis(500)) {
                        shared
                            .metrics
                            .consumer_lag
                            .get_or_create(&PartitionLabel { topic: topic.clone(), partition: *partition })
                            .set((high - next).max(0));
                    }
                }
            }
            Ok(job.epoch)
        });
        let failed = result.is_err();
        if let Err(e) = &result {
            shared.fail(Error::During { doing: "commit", source: Box::new(e.clone()) });
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
pub(super) fn write_state(shared: &Shared, mut checkpoint: Checkpoint) -> Result<(), Error> {
    let mut waiting_since: Option<Instant> = None;
    loop {
        match checkpoint.write() {
            Ok(_) => break,
            Err(e) if e.is_no_space() => {
                if shared.cancel.is_cancelled() {
                    return Err(Error::state("state volume full at the stop signal", e));
                }
                if waiting_since.is_none() {
                    waiting_since = Some(Instant::now());
                    error!(error = %e, "state volume full: consumption paused until space returns");
                    *shared.health.state_volume_full.write().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    shared.metrics.state_volume_full.set(1);
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(Error::state("writing the state", e)),
        }
    }
    if let Some(since) = waiting_since {
        *shared.health.state_volume_full.write().unwrap_or_else(|p| p.into_inner()) = None;
        shared.metrics.state_volume_full.set(0);
        warn!(waited = ?since.elapsed(), "space on the state volume again: state written, consuming again");
    }
    Ok(())
}

/// Registers the transactional producer (fencing and aborting the open transaction of a
/// previous incarnation with the same `transactional.id`) and opens the first transaction;
/// retried while the brokers are unreachable.
pub(super) fn init_transactions(shared: &Shared, cancel: &CancellationToken) -> Result<(), Error> {
    let mut backoff = Duration::from_millis(200);
    loop {
        match shared.producer.init_transactions(Duration::from_secs(30)) {
            Ok(()) => break,
            Err(e) if e.rdkafka_error_code().is_some_and(|c| c == RDKafkaErrorCode::Fenced) => {
                return Err(Error::Fenced(e));
            }
            Err(e) if !cancel.is_cancelled() => {
                warn!(error = %e, "cannot register the transactional producer; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(Error::client("registering the transactional producer", e)),
        }
    }
    shared.producer.begin_transaction().map_err(Error::kafka("beginning a transaction"))?;
    info!("exactly-once: transactional producer registered");
    Ok(())
}
