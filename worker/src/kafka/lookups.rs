//! Reads the lookup tables (`features.lookups`) into [`Tables`]: one consumer, outside the
//! group, assigned every partition of every table topic from the beginning.
//!
//! ```text
//!  start: metadata → assign all partitions at the beginning → end offsets (high watermarks)
//!  poll ─► Table::apply (rows; null deletes) ─► loaded once every partition's position ≥ its
//!          end offset at start ─► the Kafka loop joins the group; updates keep being applied
//! ```
//!
//! Until loaded the worker is not ready (`Health::lookups` says how far each table is) and
//! takes no input partitions: no event is scored against a half-read table. An unreachable
//! broker or a missing topic is retried every few seconds with the reason in readiness. The
//! partitions are those of the start: partitions added to a table topic later are read after
//! the worker restarts.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use streamscore_crds::pipeline::PipelineConfig;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::resolve_property;
use super::{Error, Health};
use crate::lookup::{Applied, Tables};
use crate::metrics::{Metrics, TableLabel};

/// How long a failed start (metadata, end offsets) waits before it is tried again.
const RETRY: Duration = Duration::from_secs(3);

/// The running reader; dropping it stops its thread.
pub(super) struct Loader {
    stop: Arc<AtomicBool>,
    loaded: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Loader {
    /// Waits until every table is loaded (true) or `cancel` fires (false).
    pub(super) fn wait_loaded(&self, cancel: &CancellationToken) -> bool {
        while !self.loaded.load(Ordering::Acquire) {
            if cancel.is_cancelled() || self.thread.as_ref().is_some_and(|t| t.is_finished()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The table consumer's settings: the source's cluster and `source.properties` (security); it
/// never joins a group nor commits (librdkafka wants a `group.id` for `assign` all the same:
/// `<groupId>.lookups`, which keeps a per-namespace prefix).
fn client_config(cfg: &PipelineConfig) -> Result<ClientConfig, Error> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.source.bootstrap_servers)
        .set("group.id", format!("{}.lookups", cfg.source.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        // Rows of aborted transactions never enter a table.
        .set("isolation.level", "read_committed")
        .set("fetch.wait.max.ms", "100");
    for (k, v) in &cfg.source.properties {
        // The input consumer's tuning and group settings do not apply to the table reader.
        if matches!(k.as_str(), "group.instance.id" | "partition.assignment.strategy" | "client.id") {
            continue;
        }
        let value = resolve_property(v)
            .map_err(|message| Error::Config { setting: format!("source.properties.{k}"), message })?;
        c.set(k, value);
    }
    // A table is read from its beginning: when its log start moves past the reader (retention,
    // DeleteRecords), from the new start, never from the end.
    c.set("auto.offset.reset", "earliest");
    Ok(c)
}

/// Starts reading the tables of `cfg` into `tables`.
pub(super) fn start(
    cfg: &PipelineConfig,
    tables: Arc<Tables>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> Result<Loader, Error> {
    let consumer: BaseConsumer =
        client_config(cfg)?.create().map_err(Error::kafka("creating the lookup table consumer"))?;
    for t in &tables.tables {
        metrics.lookup_loaded.get_or_create(&TableLabel { table: t.name.clone() }).set(0);
        metrics.lookup_rows.get_or_create(&TableLabel { table: t.name.clone() }).set(0);
    }
    *health.lookups.write().unwrap_or_else(|e| e.into_inner()) = Some("loading lookup tables: starting".into());
    let stop = Arc::new(AtomicBool::new(false));
    let loaded = Arc::new(AtomicBool::new(false));
    let thread = {
        let (stop, loaded) = (stop.clone(), loaded.clone());
        std::thread::Builder::new()
            .name("lookups".into())
            .spawn(move || read(consumer, &tables, &metrics, &health, &cancel, &stop, &loaded))
            .map_err(|e| Error::Thread(Arc::new(e)))?
    };
    Ok(Loader { stop, loaded, thread: Some(thread) })
}

/// Per (topic, partition): the end offset found at start.
type Ends = BTreeMap<(String, i32), i64>;

/// Assigns every partition of every table topic at the beginning; returns their end offsets.
fn assign(consumer: &BaseConsumer, tables: &Tables) -> Result<Ends, String> {
    let timeout = Duration::from_secs(10);
    let mut topics: Vec<&str> = tables.tables.iter().map(|t| t.topic.as_str()).collect();
    topics.sort_unstable();
    topics.dedup();
    let mut tpl = TopicPartitionList::new();
    let mut ends = Ends::new();
    for topic in topics {
        let md = consumer
            .fetch_metadata(Some(topic), timeout)
            .map_err(|e| format!("reading the metadata of topic {topic}: {e}"))?;
        let t = md.topics().first().ok_or_else(|| format!("topic {topic}: no metadata"))?;
        if let Some(e) = t.error() {
            return Err(format!("topic {topic}: {}", rdkafka::error::RDKafkaErrorCode::from(e)));
        }
        if t.partitions().is_empty() {
            return Err(format!("topic {topic} does not exist"));
        }
        for p in t.partitions() {
            let (low, high) = consumer
                .fetch_watermarks(topic, p.id(), timeout)
                .map_err(|e| format!("reading the end offset of {topic}/{}: {e}", p.id()))?;
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(|e| format!("assigning {topic}/{}: {e}", p.id()))?;
            if high > low {
                ends.insert((topic.to_owned(), p.id()), high);
            }
        }
    }
    consumer.assign(&tpl).map_err(|e| format!("assigning the lookup table partitions: {e}"))?;
    Ok(ends)
}

/// Removes the partitions whose position reached their end offset; true when none is left.
fn caught_up(consumer: &BaseConsumer, ends: &mut Ends) -> bool {
    if ends.is_empty() {
        return true;
    }
    if let Ok(positions) = consumer.position() {
        for e in positions.elements() {
            if let Offset::Offset(o) = e.offset() {
                let k = (e.topic().to_owned(), e.partition());
                if ends.get(&k).is_some_and(|end| o >= *end) {
                    ends.remove(&k);
                }
            }
        }
    }
    ends.is_empty()
}

/// What readiness says while loading.
fn progress(tables: &Tables, ends: &Ends) -> String {
    let rows: Vec<String> = tables.tables.iter().map(|t| format!("{} {} rows", t.name, t.len())).collect();
    let waiting: Vec<String> = ends.iter().take(4).map(|((t, p), end)| format!("{t}/{p} to offset {end}")).collect();
    format!(
        "loading lookup tables ({}): reading {}{}",
        rows.join(", "),
        waiting.join(", "),
        if ends.len() > 4 { format!(" and {} more partitions", ends.len() - 4) } else { String::new() }
    )
}

fn read(
    consumer: BaseConsumer,
    tables: &Tables,
    metrics: &Metrics,
    health: &Health,
    cancel: &CancellationToken,
    stop: &AtomicBool,
    loaded: &AtomicBool,
) {
    let set_reason = |r: Option<String>| *health.lookups.write().unwrap_or_else(|e| e.into_inner()) = r;
    let done = || cancel.is_cancelled() || stop.load(Ordering::Acquire);
    let mut ends = loop {
        match assign(&consumer, tables) {
            Ok(ends) => break ends,
            Err(e) => {
                warn!(error = %e, "cannot start reading the lookup tables; retrying");
                set_reason(Some(format!("loading lookup tables: {e} (retrying every {} s)", RETRY.as_secs())));
                let until = Instant::now() + RETRY;
                while Instant::now() < until {
                    if done() {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    };
    let labels: Vec<TableLabel> = tables.tables.iter().map(|t| TableLabel { table: t.name.clone() }).collect();
    let started = Instant::now();
    let mut rejected = vec![0u64; tables.tables.len()];
    let mut shown = Instant::now();
    let mut checked = Instant::now() - Duration::from_secs(1);
    while !done() {
        if !loaded.load(Ordering::Relaxed) && checked.elapsed() >= Duration::from_millis(50) {
            checked = Instant::now();
            if caught_up(&consumer, &mut ends) {
                for (t, l) in tables.tables.iter().zip(&labels) {
                    metrics.lookup_loaded.get_or_create(l).set(1);
                    metrics.lookup_rows.get_or_create(l).set(t.len() as i64);
                }
                let rows: Vec<String> = tables.tables.iter().map(|t| format!("{}={}", t.name, t.len())).collect();
                info!(rows = %rows.join(","), seconds = started.elapsed().as_secs_f64(), "lookup tables loaded");
                set_reason(None);
                loaded.store(true, Ordering::Release);
            } else if shown.elapsed() > Duration::from_millis(500) {
                set_reason(Some(progress(tables, &ends)));
                shown = Instant::now();
            }
        }
        let Some(msg) = consumer.poll(Duration::from_millis(100)) else { continue };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "reading the lookup tables");
                continue;
            }
        };
        for (i, t) in tables.tables.iter().enumerate().filter(|(_, t)| t.topic == msg.topic()) {
            match t.apply(msg.key(), msg.payload()) {
                Applied::Put | Applied::Deleted => {
                    metrics.lookup_updates.get_or_create(&labels[i]).inc();
                    metrics.lookup_rows.get_or_create(&labels[i]).set(t.len() as i64);
                }
                Applied::Rejected(why) => {
                    metrics.lookup_rejected.get_or_create(&labels[i]).inc();
                    rejected[i] += 1;
                    if rejected[i] <= 20 || rejected[i].is_multiple_of(10_000) {
                        warn!(
                            table = %t.name,
                            topic = msg.topic(),
                            partition = msg.partition(),
                            offset = msg.offset(),
                            rejected = rejected[i],
                            "lookup table record skipped: {why}"
                        );
                    }
                }
            }
        }
    }
}
