//! The librdkafka client contexts: the consumer's rebalance callbacks (opening and handing
//! over partition state) and broker statistics, the producer's delivery reports.

use super::*;
use prometheus_client::metrics::histogram::Histogram;

pub(super) struct ConsumerCtx {
    pub(super) shared: Arc<Shared>,
    /// `startFrom: timestamp`: where partitions the group never committed start.
    pub(super) start_timestamp: Option<i64>,
}

impl ConsumerCtx {
    /// Opens the state of every newly assigned partition (local store, checkpoint or rebuild:
    /// `Engine::open_partition`) and sets where each starts: at its state's offsets, so that
    /// the records between them and the group's committed offsets restore the state first.
    /// Blocking (broker calls, downloads), once per assignment, before fetching starts.
    pub(super) fn open_assigned(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let committed = match consumer.committed_offsets(tpl.clone(), Duration::from_secs(10)) {
            Ok(c) => c,
            Err(e) => {
                // Without them the state cannot be checked against what the group has done.
                self.shared.fail(Error::client("reading the committed offsets of the assigned partitions", e));
                return;
            }
        };
        let mut by_partition: BTreeMap<i32, BTreeMap<String, i64>> = BTreeMap::new();
        for e in committed.elements() {
            let offsets = by_partition.entry(e.partition()).or_default();
            if let Offset::Offset(o) = e.offset() {
                if o > 0 {
                    offsets.insert(e.topic().to_owned(), o);
                }
            }
        }
        // The input topic's partition count now (a change moves keys between partitions).
        let first = tpl.elements().first().map(|e| e.topic().to_owned());
        let partitions = first.as_deref().and_then(|t| {
            let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10)).ok()?;
            md.topics().first().map(|t| t.partitions().len())
        });
        let mut engine = self.shared.engine.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = partitions {
            self.shared.health.input_partitions.store(n, Ordering::Relaxed);
            engine.set_input_partitions(n);
        }
        for (p, committed) in by_partition {
            let started = Instant::now();
            let assigned = match engine.open_partition(p, &committed) {
                Ok(a) => a,
                Err(e) => {
                    self.shared.fail(Error::engine(format!("opening the state of partition {p}"), e));
                    continue;
                }
            };
            for (topic, start) in &assigned.start {
                // The earliest retained offset: where a rebuild starts (an absolute offset, so
                // that the fetch starts exactly where the state does, and the engine can check
                // the first record against it), and what a restore can still replay.
                let low = match consumer.fetch_watermarks(topic, p, Duration::from_secs(10)) {
                    Ok((low, _)) => low,
                    Err(e) => {
                        self.shared.fail(Error::client(
                            format!("reading the earliest retained offset of {topic} partition {p}"),
                            e,
                        ));
                        return;
                    }
                };
                let offset = match start {
                    StartAt::Offset(o) => *o,
                    StartAt::Beginning => {
                        engine.start_at(p, topic, low);
                        low
                    }
                };
                let _ = tpl.set_partition_offset(topic, p, Offset::Offset(offset.max(low)));
                let from = match start {
                    StartAt::Offset(o) => *o,
                    StartAt::Beginning => 0,
                };
                let missing = match assigned.replay_until.get(topic) {
                    Some(until) if low > from => low.min(*until) - from,
                    _ => 0,
                };
                let label = PartitionLabel { topic: topic.clone(), partition: p };
                self.shared.metrics.restore_missing_records.get_or_create(&label).set(missing);
                let mut incomplete = self.shared.health.incomplete.write().unwrap_or_else(|e| e.into_inner());
                if missing > 0 {
                    let what = format!(
                        "{topic}/{p}: {missing} records before offset {low} are no longer retained (the state was {} \
                         without them)",
                        if matches!(assigned.source, crate::engine::StateSource::Rebuild) {
                            "rebuilt"
                        } else {
                            "restored"
                        }
                    );
                    incomplete.insert(format!("{topic}/{p}"), (p, what));
                } else {
                    incomplete.remove(&format!("{topic}/{p}"));
                }
                drop(incomplete);
                if missing > 0 {
                    // Records needed to restore the state are no longer retained: say so.
                    warn!(
                        topic,
                        partition = p,
                        from,
                        low,
                        until = ?assigned.replay_until.get(topic),
                        missing,
                        "records needed to restore the state are no longer retained (the topic's retention dropped \
                         them): features whose lookback reaches before offset {low} miss them"
                    );
                }
                if let StartAt::Offset(o) = start {
                    if low > *o {
                        // The state expects offset o next, but the topic starts at low now.
                        engine.start_at(p, topic, low);
                    }
                }
            }
            info!(
                partition = p,
                source = ?assigned.source,
                start = ?assigned.start,
                replay_until = ?assigned.replay_until,
                took = ?started.elapsed(),
                "partition state opened"
            );
        }
        *self.shared.health.replaying.write().unwrap_or_else(|e| e.into_inner()) = engine.replaying();
    }

    /// With `startFrom: timestamp`, sets the start offset of every assigned partition that the
    /// group has never committed to its first record at or after the timestamp (the end when
    /// there is none). Blocking broker calls, once per assignment.
    pub(super) fn place_at_timestamp(&self, consumer: &BaseConsumer<Self>, tpl: &mut TopicPartitionList) {
        let Some(ts) = self.start_timestamp else { return };
        let timeout = Duration::from_secs(10);
        let committed = match consumer.committed_offsets(tpl.clone(), timeout) {
            Ok(c) => c,
            Err(e) => {
                // Unknown: leave the partitions to the committed offsets / auto.offset.reset.
                warn!(error = %e, "cannot read committed offsets; startFrom timestamp not applied");
                return;
            }
        };
        let mut wanted = TopicPartitionList::new();
        for e in committed.elements() {
            // Placed already (state seeded from another run's checkpoint): keep it.
            let placed =
                tpl.find_partition(e.topic(), e.partition()).is_some_and(|x| matches!(x.offset(), Offset::Offset(_)));
            if !matches!(e.offset(), Offset::Offset(_)) && !placed {
                let _ = wanted.add_partition_offset(e.topic(), e.partition(), Offset::Offset(ts));
            }
        }
        if wanted.count() == 0 {
            return;
        }
        match consumer.offsets_for_times(wanted, timeout) {
            Ok(found) => {
                for e in found.elements() {
                    // No record at or after the timestamp: librdkafka answers End (-1).
                    let start = match e.offset() {
                        Offset::Offset(o) => Offset::Offset(o),
                        _ => Offset::End,
                    };
                    info!(topic = e.topic(), partition = e.partition(), ?start, timestamp = ts, "startFrom timestamp");
                    let _ = tpl.set_partition_offset(e.topic(), e.partition(), start);
                }
            }
            Err(e) => {
                self.shared.fail(Error::client(format!("looking up offsets for startTimestampMs {ts}"), e));
            }
        }
    }
}

pub(super) struct ProducerCtx {
    pub(super) metrics: Arc<Metrics>,
    /// `output_stage_seconds` of fetch, process and produce, looked up once (not per delivery).
    pub(super) stages: [Histogram; 3],
    pub(super) failures: AtomicU64,
    pub(super) health: Arc<Health>,
    pub(super) acks: Arc<Acks>,
}

/// The part of librdkafka's statistics the worker reads: each broker's connection state.
#[derive(serde::Deserialize)]
pub(super) struct BrokerStates {
    #[serde(default)]
    pub(super) brokers: BTreeMap<String, BrokerState>,
}

#[derive(serde::Deserialize)]
pub(super) struct BrokerState {
    pub(super) nodeid: i32,
    pub(super) state: String,
}

impl ClientContext for ConsumerCtx {
    /// Every second (`statistics.interval.ms`): the brokers are reachable while the consumer is
    /// connected to at least one of them (an idle consumer whose broker went away gets no
    /// error event; its connection states say so).
    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(s) = serde_json::from_slice::<BrokerStates>(statistics) else { return };
        let brokers: Vec<&BrokerState> = s.brokers.values().filter(|b| b.nodeid >= 0).collect();
        if !brokers.is_empty() {
            let up = brokers.iter().any(|b| b.state == "UP");
            let was = !self.shared.health.consumer_disconnected.swap(!up, Ordering::Relaxed);
            if was != up {
                if up {
                    info!("Kafka brokers reachable again");
                } else {
                    warn!("no connection to any Kafka broker");
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.shared.health.broker_ok.store(false, Ordering::Relaxed);
        }
        warn!(%error, reason, "Kafka consumer error");
    }
}

impl ClientContext for ProducerCtx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.health.broker_ok.store(false, Ordering::Relaxed);
        }
        warn!(%error, reason, "Kafka producer error");
    }
}

impl ProducerCtx {
    /// The three histograms of `output_stage_seconds`, in [`ProducerCtx::stages`]' order.
    pub(super) fn stage_histograms(metrics: &Metrics) -> [Histogram; 3] {
        ["fetch", "process", "produce"].map(|stage| metrics.stage_seconds.get_or_create(&StageLabel { stage }).clone())
    }

    /// Latency metrics of an acknowledged scored record.
    pub(super) fn observe_scored(&self, received: Instant, source_ts: Option<i64>, sent: Instant) {
        let now = Instant::now();
        let total = now.saturating_duration_since(received).as_secs_f64();
        self.metrics.latency.observe(total);
        let [fetch, process, produce] = &self.stages;
        process.observe(sent.saturating_duration_since(received).as_secs_f64());
        produce.observe(now.saturating_duration_since(sent).as_secs_f64());
        if let Some(ts) = source_ts {
            let wall = chrono::Utc::now().timestamp_millis();
            let e2e = (wall - ts).max(0) as f64 / 1000.0;
            self.metrics.event_latency.observe(e2e);
            fetch.observe((e2e - total).max(0.0));
        }
    }
}

impl ProducerContext for ProducerCtx {
    /// (consumed, input record timestamp, commit epoch, handed to the producer). Only scored
    /// records carry the consume instant: dead letters and emitted windows are not in the
    /// latency histograms.
    type DeliveryOpaque = Box<(Option<Instant>, Option<i64>, u64, Instant)>;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: Self::DeliveryOpaque) {
        let (received, source_ts, epoch, sent) = *opaque;
        if result.is_ok() {
            self.health.broker_ok.store(true, Ordering::Relaxed);
        }
        match (result, received) {
            (Ok(_), Some(received)) => self.observe_scored(received, source_ts, sent),
            (Ok(_), None) => {}
            (Err((e, _)), _) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.metrics.delivery_errors.inc();
                error!(error = %e, "output record not acknowledged by the broker");
            }
        }
        self.acks.done[Acks::slot(epoch)].fetch_add(1, Ordering::AcqRel);
    }
}

impl ConsumerContext for ConsumerCtx {
    /// As rdkafka's default, plus `place_at_timestamp` before an assignment takes effect.
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let heartbeat = &self.shared.health.heartbeat;
                heartbeat.during("opening the assigned partitions' state", || self.open_assigned(consumer, tpl));
                self.place_at_timestamp(consumer, tpl);
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                let done = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if let Err(e) = done {
                    self.shared.fail(Error::client("assigning partitions", e));
                }
                self.post_rebalance(consumer, &Rebalance::Assign(tpl));
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                let heartbeat = &self.shared.health.heartbeat;
                heartbeat.during("committing revoked partitions", || {
                    self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                });
                let done = if cooperative { consumer.incremental_unassign(tpl) } else { consumer.unassign() };
                if let Err(e) = done {
                    self.shared.fail(Error::client("revoking partitions", e));
                }
                self.post_rebalance(consumer, &Rebalance::Revoke(tpl));
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                error!(error = %code, "rebalance error");
                let _ = consumer.unassign();
                self.post_rebalance(consumer, &Rebalance::Error(KafkaError::Rebalance(code)));
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let revoked: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut engine = self.shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            let closing = self.shared.committer.lock().unwrap_or_else(|e| e.into_inner()).is_none();
            if closing {
                // The consumer closes after the shutdown: everything was committed and
                // checkpointed then, and the committer has stopped.
                debug!(?revoked, "partitions revoked at close (committed at shutdown)");
            } else {
                info!(?revoked, "partitions revoked: committing before handing them over");
                match commit_sync(&self.shared, &mut engine, consumer) {
                    Ok(()) => checkpoint_now(&self.shared, &engine, &revoked),
                    Err(e) => self.shared.fail(Error::During { doing: "commit on revoke", source: Box::new(e) }),
                }
            }
            for p in revoked {
                engine.revoke(p);
            }
            // A partition this worker no longer owns has no lag here (its new owner reports it).
            for e in tpl.elements() {
                let label = PartitionLabel { topic: e.topic().to_owned(), partition: e.partition() };
                self.shared.metrics.consumer_lag.remove(&label);
            }
            *self.shared.health.replaying.write().unwrap_or_else(|e| e.into_inner()) = engine.replaying();
            self.shared.health.set_partitions(engine.assigned());
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            if self.shared.fatal.lock().unwrap_or_else(|e| e.into_inner()).is_some() {
                // A partition whose state could not be opened must not be processed at all.
                return;
            }
            let parts: BTreeSet<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            let mut engine = self.shared.engine.lock().unwrap_or_else(|e| e.into_inner());
            for p in &parts {
                match engine.assign(*p) {
                    Ok(offsets) => info!(partition = p, ?offsets, "partition assigned"),
                    Err(e) => self.shared.fail(Error::engine(format!("opening state of partition {p}"), e)),
                }
            }
            self.shared.health.set_partitions(engine.assigned());
            self.shared.health.joined.store(true, Ordering::Relaxed);
            self.shared.health.admin.assigned();
            if self.shared.health.admin.fenced() {
                // Stopped at a cut-over barrier: partitions taken over from a stopping peer
                // must not be processed by this run either.
                match consumer.pause(tpl) {
                    Ok(()) => info!(partitions = ?parts, "assigned while fenced: kept paused"),
                    Err(e) => self.shared.fail(Error::client("pausing partitions assigned while fenced", e)),
                }
            } else if let Err(e) = consumer.resume(tpl) {
                // A drain paused this consumer's partitions and the assignment ended it; a
                // partition revoked while paused keeps librdkafka's pause flag when it comes
                // back to this consumer, so every assigned partition is resumed explicitly.
                self.shared.fail(Error::client("resuming assigned partitions", e));
            }
        }
    }
}
