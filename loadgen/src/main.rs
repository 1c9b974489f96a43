//! `streamscore-loadgen`: event generator for the demo and benchmark driver.
//!
//! - `gen`: produce a realistic payment/ride stream (users, actions, amounts, fraud-like
//!   bursts, a few malformed records) to a topic.
//! - `bench-engine`: the worker engine alone (decode → features in RocksDB → tract → JSON),
//!   no broker: the data plane's ceiling.
//! - `bench-kafka`: pre-load a topic (or, with `--rate`, produce at a steady rate while the
//!   worker runs), run the real Kafka loop until every output is acknowledged: end-to-end
//!   throughput and the consume→ack and event→output latency histograms.
//! - `bench-checkpoint`: one partition's state of `--keys` keys checkpointed to an object store
//!   (full, then after `--changed` keys changed: incremental), then restored: durations, bytes
//!   uploaded and downloaded, restore rate.
//! - `bench-rescale`: `--from` worker processes hold `--keys` keys of state; while events flow
//!   at `--rate`, every worker is drained through its admin API (as the operator's rescale
//!   does), `--to` − `--from` workers join, and the partitions move and are restored: drain
//!   time, restore time, and the gap in the output topic.
//! - `bench-cutover`: a blue/green cut-over of worker processes, driven through the admin API
//!   as the operator's upgrade does: `--workers` blue workers hold `--keys` keys of state while
//!   events flow at `--rate`; green workers start from blue's checkpoints in shadow mode; then
//!   green is paused, blue stopped and fenced, green told the barrier and resumed: time from
//!   green's start to ready and caught up, the protocol's duration, and the live topic's gap.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use streamscore_crds::PipelineConfig;
use streamscore_worker::engine::{Engine, InRecord, OutRecord};
use streamscore_worker::kafka::{self, Health};
use streamscore_worker::metrics::Metrics;
use streamscore_worker::model::Model;
use streamscore_worker::state::StoreEnv;
use tokio_util::sync::CancellationToken;

// The same allocator as streamscore-worker, so benchmarks measure what runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(about = "streamscore event generator and benchmark driver")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Produce a synthetic event stream.
    Gen {
        #[arg(long, env = "KAFKA_BOOTSTRAP_SERVERS")]
        bootstrap: String,
        #[arg(long)]
        topic: String,
        /// Events to produce.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Distinct users.
        #[arg(long, default_value_t = 1_000)]
        users: u64,
        /// Events per second (0: as fast as possible).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// One malformed record every N events (0: none).
        #[arg(long, default_value_t = 0)]
        malformed_every: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Engine only (no broker).
    BenchEngine {
        #[arg(long)]
        pipeline: String,
        #[arg(long, default_value_t = 500_000)]
        count: u64,
        #[arg(long, default_value_t = 100_000)]
        users: u64,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
    },
    /// Checkpoint and restore of one partition's state (no broker).
    BenchCheckpoint {
        #[arg(long)]
        pipeline: String,
        /// Keys in the state (one event each, then `--changed` of them get one more).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Keys changed between the full and the incremental checkpoint.
        #[arg(long, default_value_t = 10_000)]
        changed: u64,
        /// Object-store URI (`s3://bucket/prefix`, `file:///path`); a temporary directory when
        /// empty.
        #[arg(long, default_value = "")]
        store: String,
    },
    /// Kafka end to end.
    BenchKafka {
        #[arg(long)]
        pipeline: String,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        #[arg(long, default_value_t = 100_000)]
        users: u64,
        /// Produce at this rate (events/s) while the worker runs, instead of pre-loading: the
        /// latency figures then describe a steady input rate.
        #[arg(long, default_value_t = 0)]
        rate: u64,
    },
    /// A rescale of worker processes by drain, checkpoint and restore (needs the broker and an
    /// object store).
    BenchRescale {
        #[arg(long)]
        pipeline: String,
        /// Keys of state (one event each, produced before the workers start).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Workers before.
        #[arg(long, default_value_t = 2)]
        from: usize,
        /// Workers after (more than `from`).
        #[arg(long, default_value_t = 4)]
        to: usize,
        /// Events per second flowing during the rescale.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Object-store URI for the checkpoints (`s3://bucket/prefix`, `file:///path`).
        #[arg(long)]
        store: String,
    },
    /// A blue/green cut-over of worker processes (needs the broker and an object store).
    BenchCutover {
        #[arg(long)]
        pipeline: String,
        /// Keys of state (one event each, produced before the workers start).
        #[arg(long, default_value_t = 1_000_000)]
        keys: u64,
        /// Workers of each colour.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Events per second flowing during the upgrade.
        #[arg(long, default_value_t = 2_000)]
        rate: u64,
        /// Object-store URI for the checkpoints (`s3://bucket/prefix`, `file:///path`).
        #[arg(long)]
        store: String,
    },
}

struct Gen {
    rng: SmallRng,
    users: u64,
    clock: i64,
}

impl Gen {
    fn new(seed: u64, users: u64) -> Self {
        Self { rng: SmallRng::seed_from_u64(seed), users: users.max(1), clock: 1_795_500_000_000 }
    }

    fn next(&mut self) -> (String, Vec<u8>) {
        self.clock += self.rng.gen_range(0..3);
        let user = format!("user-{}", self.rng.gen_range(0..self.users));
        let fraud = self.rng.gen_ratio(1, 50);
        let action = ["view", "purchase", "ride_requested", "login", "cart"][self.rng.gen_range(0..5)];
        let amount: f64 = if fraud { self.rng.gen_range(500.0..3000.0) } else { self.rng.gen_range(1.0..150.0) };
        let ts = self.clock - self.rng.gen_range(0..2_000);
        let v = format!(
            r#"{{"user_id":"{user}","ts":{ts},"amount":{amount:.2},"action":"{action}","merchant":"m{}","geohash":"u{:05}","device":"d{:06}","country":"{}"}}"#,
            self.rng.gen_range(0..500),
            self.rng.gen_range(0..99_999),
            self.rng.gen_range(0..999_999),
            ["DE", "FR", "US", "BR"][self.rng.gen_range(0..4)]
        );
        (user, v.into_bytes())
    }
}

fn main() -> anyhow::Result<()> {
    streamscore_worker::tune_allocator();
    let args = Args::parse();
    match args.cmd {
        Cmd::Gen { bootstrap, topic, count, users, rate, malformed_every, seed } => {
            let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("partitioner", "murmur2_random")
                .set("linger.ms", "5")
                .set("queue.buffering.max.messages", "1000000")
                .create()?;
            let mut g = Gen::new(seed, users);
            let started = Instant::now();
            for i in 0..count {
                let (k, v) = if malformed_every > 0 && i % malformed_every == malformed_every - 1 {
                    ("user-0".to_owned(), br#"{"user_id": "user-0", "ts": "#.to_vec())
                } else {
                    g.next()
                };
                send_paced(&p, &topic, &k, &v, i, rate, started);
            }
            p.flush(Duration::from_secs(60))?;
            println!("produced {count} events to {topic} in {:.2?}", started.elapsed());
        }
        Cmd::BenchEngine { pipeline, count, users, partitions } => {
            let cfg = Arc::new(PipelineConfig::from_yaml(&std::fs::read_to_string(&pipeline)?)?);
            let dir = tempfile_dir()?;
            let model = Arc::new(Model::load(&cfg.model)?);
            let metrics = Arc::new(Metrics::new());
            let mut engine = Engine::new(cfg.clone(), model, StoreEnv::new(&dir, 64 << 20, 1_000_000), metrics);
            for p in 0..partitions {
                engine.assign(p)?;
            }
            let mut g = Gen::new(7, users);
            let events: Vec<(String, Vec<u8>)> = (0..count).map(|_| g.next()).collect();
            let batch = cfg.model.signature.batch.max_size as usize;
            let topic = cfg.source.topics[0].clone();
            let started = Instant::now();
            let mut outputs = 0u64;
            let mut bytes = 0u64;
            let (mut snapshot, mut write, mut checkpoints) = (Duration::ZERO, Duration::ZERO, 0u32);
            let now = Instant::now();
            for (chunk_no, chunk) in events.chunks(batch).enumerate() {
                let recs: Vec<InRecord<'_>> = chunk
                    .iter()
                    .enumerate()
                    .map(|(i, (k, v))| InRecord {
                        topic: &topic,
                        partition: kafka::partition_for(k.as_bytes(), partitions as usize),
                        offset: (chunk_no * batch + i) as i64,
                        key: Some(k.as_bytes()),
                        payload: Some(v),
                        received: now,
                        timestamp: None,
                    })
                    .collect();
                for o in engine.process(&recs)? {
                    if let OutRecord::Scored { value, .. } = o {
                        outputs += 1;
                        bytes += value.len() as u64;
                    }
                }
                // A checkpoint every ~10k events, as at 20k events/s with a 500 ms commit interval.
                if chunk_no % 40 == 39 {
                    let t = Instant::now();
                    let mut cp = engine.checkpoint(true)?;
                    snapshot += t.elapsed();
                    let t = Instant::now();
                    cp.write()?;
                    write += t.elapsed();
                    checkpoints += 1;
                }
            }
            engine.flush()?;
            let secs = started.elapsed().as_secs_f64();
            println!(
                "bench-engine: {count} events, {users} users, {partitions} partitions, batch {batch}: {:.2}s, {:.0} events/s, {outputs} outputs ({:.0} B avg)",
                secs,
                count as f64 / secs,
                bytes as f64 / outputs.max(1) as f64
            );
            println!(
                "  {checkpoints} checkpoints: snapshot {:.2} ms avg, write {:.2} ms avg (both included above)",
                snapshot.as_secs_f64() * 1e3 / f64::from(checkpoints.max(1)),
                write.as_secs_f64() * 1e3 / f64::from(checkpoints.max(1))
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
        Cmd::BenchCheckpoint { pipeline, keys, changed, store } => bench_checkpoint(&pipeline, keys, changed, &store)?,
        Cmd::BenchRescale { pipeline, keys, from, to, rate, store } => {
            bench_rescale(&pipeline, keys, from, to, rate, &store)?;
        }
        Cmd::BenchCutover { pipeline, keys, workers, rate, store } => {
            bench_cutover(&pipeline, keys, workers, rate, &store)?;
        }
        Cmd::BenchKafka { pipeline, count, users, rate } => {
            let cfg: PipelineConfig = PipelineConfig::from_yaml(&std::fs::read_to_string(&pipeline)?)?;
            let bootstrap = cfg.source.bootstrap_servers.clone();
            let topic = cfg.source.topics[0].clone();
            let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .set("partitioner", "murmur2_random")
                .set("linger.ms", if rate > 0 { "5" } else { "20" })
                .set("compression.type", "lz4")
                .set("queue.buffering.max.messages", "2000000")
                .create()?;
            let mut g = Gen::new(11, users);
            // Generated up front, so that the paced loop below only sends.
            let events: Vec<(String, Vec<u8>)> = (0..count).map(|_| g.next()).collect();
            let produce_all = |rate: u64| -> anyhow::Result<()> {
                let t0 = Instant::now();
                for (i, (k, v)) in (0u64..).zip(&events) {
                    send_paced(&p, &topic, k, v, i, rate, t0);
                }
                p.flush(Duration::from_secs(120))?;
                println!("produced {count} events in {:.2?}", t0.elapsed());
                Ok(())
            };
            if rate == 0 {
                produce_all(0)?;
            }
            let cfg = Arc::new(cfg);
            let dir = tempfile_dir()?;
            let model = Arc::new(Model::load(&cfg.model)?);
            let metrics = Arc::new(Metrics::new());
            let engine = Engine::new(cfg.clone(), model, StoreEnv::new(&dir, 64 << 20, 1_000_000), metrics.clone());
            let cancel = CancellationToken::new();
            let health = Arc::new(Health::default());
            let (c, m) = (cancel.clone(), metrics.clone());
            let started = Instant::now();
            let cpu_before = cpu_seconds();
            let h = health.clone();
            let worker = std::thread::spawn(move || kafka::run(cfg, engine, m, h, c));
            let mut paced = None;
            if rate > 0 {
                while !health.joined.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // The paced producer runs as a separate process at a lower priority: it stands
                // for upstream services on other machines and must not take the CPU the broker
                // and the worker need (its CPU is not counted below either). The loop below
                // watches the outputs while it runs.
                paced = Some(
                    std::process::Command::new("nice")
                        .args(["-n", "10"])
                        .arg(std::env::current_exe()?)
                        .args(["gen", "--bootstrap", &bootstrap, "--topic", &topic, "--seed", "11"])
                        .args([
                            "--count",
                            &count.to_string(),
                            "--users",
                            &users.to_string(),
                            "--rate",
                            &rate.to_string(),
                        ])
                        .spawn()?,
                );
            }
            let mut first: Option<Instant> = None;
            loop {
                if let Some(status) = paced.as_mut().map(std::process::Child::try_wait).transpose()?.flatten() {
                    anyhow::ensure!(status.success(), "the paced producer failed: {status}");
                    paced = None;
                }
                std::thread::sleep(Duration::from_millis(100));
                let text = metrics.encode();
                let out = metric(&text, "streamscore_worker_records_out_total");
                let dl = metric(&text, "streamscore_worker_dead_letters_total");
                if out + dl > 0.0 && first.is_none() {
                    first = Some(Instant::now());
                }
                if out + dl >= count as f64 {
                    break;
                }
                if started.elapsed() > Duration::from_secs(600) {
                    anyhow::bail!("timed out with {out} outputs");
                }
            }
            cancel.cancel();
            worker.join().map_err(|_| anyhow::anyhow!("worker panicked"))?.map_err(anyhow::Error::msg)?;
            let total = started.elapsed().as_secs_f64();
            let steady = first.map_or(total, |f| f.elapsed().as_secs_f64());
            let cpu = cpu_seconds() - cpu_before;
            let text = metrics.encode();
            println!(
                "bench-kafka: {count} events, {users} users: {:.2}s incl. start-up ({:.0} events/s); {:.2}s from first output ({:.0} events/s)",
                total,
                count as f64 / total,
                steady,
                count as f64 / steady
            );
            println!(
                "  worker process CPU: {cpu:.2} s ({:.2} CPU-s per million events{}; {:.0} events per CPU-second)",
                cpu * 1e6 / count as f64,
                if rate > 0 { " at the steady rate" } else { "" },
                count as f64 / cpu.max(1e-9)
            );
            let commits = text.lines().find_map(|l| l.strip_prefix("streamscore_worker_commits_total ")).unwrap_or("0");
            println!("  commits (exactlyOnce: transactions): {}", commits.trim());
            for phase in ["snapshot", "ack", "state", "offsets", "transaction"] {
                let name = format!("streamscore_worker_commit_seconds{{phase=\"{phase}\"");
                println!(
                    "  commit phase {phase}: p50 <= {:.2} ms, p99 <= {:.2} ms",
                    quantile(&text, &name, 0.5) * 1e3,
                    quantile(&text, &name, 0.99) * 1e3
                );
            }
            let calls = metric(&text, "streamscore_worker_inference_batch_size_count");
            println!(
                "  inference calls: {calls:.0}, {:.1} rows and {:.3} ms each on average",
                metric(&text, "streamscore_worker_inference_batch_size_sum") / calls.max(1.0),
                metric(&text, "streamscore_worker_inference_seconds_sum") * 1e3 / calls.max(1.0)
            );
            for stage in ["fetch", "process", "produce"] {
                let name = format!("streamscore_worker_output_stage_seconds{{stage=\"{stage}\"");
                println!(
                    "  stage {stage}: p50 <= {:.2} ms, p99 <= {:.2} ms",
                    quantile(&text, &name, 0.5) * 1e3,
                    quantile(&text, &name, 0.99) * 1e3
                );
            }
            for q in [0.5, 0.99, 0.999] {
                println!(
                    "  p{}: consume→ack <= {:.2} ms, event (producer timestamp)→output ack <= {:.2} ms",
                    q * 100.0,
                    quantile(&text, "streamscore_worker_output_latency_seconds", q) * 1e3,
                    quantile(&text, "streamscore_worker_event_to_output_seconds", q) * 1e3
                );
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(())
}

/// Sends one record (waiting while the producer queue is full), then, with a `rate`, sleeps
/// until record `i` is due.
fn send_paced(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    k: &str,
    v: &[u8],
    i: u64,
    rate: u64,
    t0: Instant,
) {
    let mut rec = BaseRecord::to(topic).key(k).payload(v);
    while let Err((_, r)) = p.send(rec) {
        rec = r;
        std::thread::sleep(Duration::from_millis(1));
    }
    if rate > 0 {
        let due = Duration::from_secs_f64((i + 1) as f64 / rate as f64);
        // Sleep only when at least 1 ms ahead: records go out in small bursts, without a
        // syscall per record (which would cost the load generator a core at 20k/s).
        if let Some(wait) = due.checked_sub(t0.elapsed()).filter(|w| *w >= Duration::from_millis(1)) {
            std::thread::sleep(wait);
        }
    }
}

/// User + system CPU time of this process so far, seconds (Linux: /proc/self/stat, 100 Hz ticks).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("streamscore-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Sum of a metric's samples (all label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Upper bound of the bucket holding quantile `q` of a histogram (`name`, optionally with a
/// label such as `phase="ack"`).
fn quantile(text: &str, name: &str, q: f64) -> f64 {
    let (name, label) = name.split_once('{').unwrap_or((name, ""));
    let bucket = format!("{name}_bucket{{");
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&bucket)?;
            let (labels, tail) = rest.split_once('}')?;
            if !labels.contains(label) {
                return None;
            }
            let le = labels.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, tail.trim().parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map_or(0.0, |b| b.1);
    buckets.iter().find(|(_, c)| *c >= q * total).map_or(f64::NAN, |b| b.0)
}

/// Fills one partition with `keys` keys through the engine, checkpoints it (full), changes
/// `changed` keys, checkpoints again (incremental), restores the newest checkpoint.
fn bench_checkpoint(pipeline: &str, keys: u64, changed: u64, store: &str) -> anyhow::Result<()> {
    let mut cfg: PipelineConfig = PipelineConfig::from_yaml(&std::fs::read_to_string(pipeline)?)?;
    let dir = tempfile_dir()?;
    cfg.state.checkpoint_store = Some(if store.is_empty() {
        format!("file://{}", dir.join("objects").display())
    } else {
        format!("{}/bench-{}", store.trim_end_matches('/'), chrono::Utc::now().timestamp_millis())
    });
    cfg.runtime.state_dir = dir.join("state").display().to_string();
    let cfg = Arc::new(cfg);
    let model = Arc::new(Model::load(&cfg.model)?);
    let metrics = Arc::new(Metrics::new());
    let mut engine =
        Engine::from_config(cfg.clone(), model, StoreEnv::new(dir.join("state"), 64 << 20, 100_000), metrics.clone())?;
    let cp = engine.checkpointer().cloned().expect("checkpoint store configured");
    engine.assign(0)?;
    let topic = cfg.source.topics[0].clone();
    let batch = cfg.model.signature.batch.max_size as usize;
    let mut offset = 0i64;
    let mut feed = |engine: &mut Engine, users: std::ops::Range<u64>, ts: i64| -> anyhow::Result<()> {
        let events: Vec<(String, Vec<u8>)> = users
            .map(|u| {
                let v = format!(r#"{{"user_id":"user-{u}","ts":{ts},"amount":12.5,"action":"view","merchant":"m1","geohash":"u00001","device":"d000001","country":"DE"}}"#);
                (format!("user-{u}"), v.into_bytes())
            })
            .collect();
        let now = Instant::now();
        for chunk in events.chunks(batch) {
            let recs: Vec<InRecord<'_>> = chunk
                .iter()
                .map(|(k, v)| {
                    offset += 1;
                    InRecord {
                        topic: &topic,
                        partition: 0,
                        offset,
                        key: Some(k.as_bytes()),
                        payload: Some(v),
                        received: now,
                        timestamp: None,
                    }
                })
                .collect();
            engine.process(&recs)?;
        }
        engine.flush()?;
        Ok(())
    };
    let t = Instant::now();
    feed(&mut engine, 0..keys, 1_795_500_000_000)?;
    println!("bench-checkpoint: {keys} keys written in {:.2?} (store: {})", t.elapsed(), cp.store().uri());
    let upload = |label: &str, engine: &Engine| -> anyhow::Result<()> {
        let (handle, offsets) = engine.durable_store(0).expect("partition 0");
        let before = metrics.checkpoint_uploaded_bytes.get();
        let t = Instant::now();
        let id = cp.checkpoint_now(0, &handle, offsets)?.unwrap_or_default();
        let secs = t.elapsed().as_secs_f64();
        let m = cp.store().read_manifest(0, &id)?;
        let total: u64 = m.files.iter().map(|f| f.size).sum();
        let up = metrics.checkpoint_uploaded_bytes.get() - before;
        println!(
            "  {label} checkpoint: {secs:.2}s, {:.1} MB state in {} files, {:.1} MB uploaded ({:.0}%)",
            total as f64 / 1e6,
            m.files.len(),
            up as f64 / 1e6,
            100.0 * up as f64 / total.max(1) as f64
        );
        Ok(())
    };
    upload("full", &engine)?;
    feed(&mut engine, 0..changed.min(keys), 1_795_500_060_000)?;
    upload(&format!("incremental ({changed} keys changed)"), &engine)?;
    let into = dir.join("restored");
    let t = Instant::now();
    let r = cp.restore(0, engine.fingerprint(), None, &into)?.expect("a checkpoint");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "  restore: {secs:.2}s for {:.1} MB ({:.0} MB/s, {:.1} s per GB), manifest {}",
        r.bytes as f64 / 1e6,
        r.bytes as f64 / 1e6 / secs,
        secs / (r.bytes as f64 / 1e9),
        r.id
    );
    cp.shutdown();
    drop(engine);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A plain HTTP/1.0 request to a worker (metrics, admin API); returns the body.
fn http(method: &str, addr: &str, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// [`http`] with a JSON body.
fn http_body(method: &str, addr: &str, path: &str, body: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let (head, answer) = buf.split_once("\r\n\r\n").unwrap_or((buf.as_str(), ""));
    anyhow::ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "{path}: {head} {answer}");
    Ok(answer.to_owned())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// One worker process of the rescale benchmark.
struct BenchWorker {
    child: std::process::Child,
    http: String,
    admin: String,
}

impl BenchWorker {
    fn start(cfg: &PipelineConfig, dir: &std::path::Path, n: usize) -> anyhow::Result<Self> {
        let mut cfg = cfg.clone();
        let (http, admin) = (format!("127.0.0.1:{}", free_port()?), format!("127.0.0.1:{}", free_port()?));
        cfg.runtime.http_listen.clone_from(&http);
        cfg.runtime.admin_listen = Some(admin.clone());
        cfg.runtime.state_dir = dir.join(format!("worker-{n}")).display().to_string();
        let file = dir.join(format!("worker-{n}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&cfg)?)?;
        let exe = std::env::current_exe()?.with_file_name("streamscore-worker");
        let child = std::process::Command::new(exe)
            .arg("--pipeline")
            .arg(&file)
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(dir.join(format!("worker-{n}.log")))?)
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        Ok(Self { child, http, admin })
    }

    fn status(&self) -> serde_json::Value {
        http("GET", &self.admin, "/v1/admin/status")
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    fn metric(&self, name: &str) -> f64 {
        http("GET", &self.http, "/metrics").map(|t| metric(&t, name)).unwrap_or(0.0)
    }
}

impl Drop for BenchWorker {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let t = Instant::now();
    while !done() {
        anyhow::ensure!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(t.elapsed())
}

/// Reads the whole output topic `out` (until 10 s without a record): the number of records,
/// and the sorted producer timestamps of those at or after `since_ms`.
fn output_times(bootstrap: &str, out: &str, group: &str, since_ms: i64) -> anyhow::Result<(u64, Vec<i64>)> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    let md = c.fetch_metadata(Some(out), Duration::from_secs(10))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for part in md.topics().first().map(|t| t.partitions()).unwrap_or_default() {
        tpl.add_partition_offset(out, part.id(), rdkafka::Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let mut times = Vec::new();
    let mut read = 0u64;
    let mut idle = Instant::now();
    while idle.elapsed() < Duration::from_secs(10) {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m?;
            read += 1;
            idle = Instant::now();
            if let Some(ts) = m.timestamp().to_millis().filter(|ts| *ts >= since_ms) {
                times.push(ts);
            }
        }
    }
    times.sort_unstable();
    Ok((read, times))
}

/// `bench-rescale` (see the module docs). Output gap: the longest interval between two
/// consecutive output records (producer timestamps) from the drain on.
fn bench_rescale(pipeline: &str, keys: u64, from: usize, to: usize, rate: u64, store: &str) -> anyhow::Result<()> {
    anyhow::ensure!(to > from && from > 0, "--to must be larger than --from");
    let mut cfg: PipelineConfig = PipelineConfig::from_yaml(&std::fs::read_to_string(pipeline)?)?;
    let dir = tempfile_dir()?;
    let stamp = chrono::Utc::now().timestamp_millis();
    cfg.state.checkpoint_store = Some(format!("{}/rescale-{stamp}", store.trim_end_matches('/')));
    cfg.source.group_id = format!("{}-rescale", cfg.source.group_id);
    let (bootstrap, topic, out) =
        (cfg.source.bootstrap_servers.clone(), cfg.source.topics[0].clone(), cfg.sink.topic.clone());
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "2000000")
        .create()?;
    let t = Instant::now();
    for u in 0..keys {
        // Before the times `gen` starts at (minus its 2 s disorder), so none of the events
        // flowing later is late.
        let ts = 1_795_500_000_000 - 10_000 - keys as i64 + u as i64;
        let v = format!(r#"{{"user_id":"user-{u}","ts":{ts},"amount":12.5,"action":"view","merchant":"m1"}}"#);
        send_paced(&p, &topic, &format!("user-{u}"), v.as_bytes(), u, 0, t);
    }
    p.flush(Duration::from_secs(120))?;
    println!(
        "bench-rescale: {keys} keys produced in {:.2?}; {from} → {to} workers, {rate} events/s during the rescale",
        t.elapsed()
    );

    let mut workers: Vec<BenchWorker> =
        (0..from).map(|n| BenchWorker::start(&cfg, &dir, n)).collect::<Result<_, _>>()?;
    let outputs = |ws: &[BenchWorker]| -> f64 {
        ws.iter()
            .map(|w| {
                w.metric("streamscore_worker_records_out_total") + w.metric("streamscore_worker_dead_letters_total")
            })
            .sum()
    };
    let took = wait_for("the state to be loaded", Duration::from_secs(900), || outputs(&workers) >= keys as f64)?;
    println!("  state loaded by {from} workers in {:.1}s", took.as_secs_f64());

    // Events flow at a steady rate from here on (a niced process, as in bench-kafka).
    let flowing = 40u64;
    let mut producer = std::process::Command::new("nice")
        .args(["-n", "10"])
        .arg(std::env::current_exe()?)
        .args(["gen", "--bootstrap", &bootstrap, "--topic", &topic, "--seed", "5", "--users", &keys.to_string()])
        .args(["--count", &(rate * flowing).to_string(), "--rate", &rate.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(8));

    // Drain: pause, commit, checkpoint every partition (what the operator's Draining step asks).
    let drain_at = chrono::Utc::now().timestamp_millis();
    let t = Instant::now();
    for w in &workers {
        http("POST", &w.admin, "/v1/admin/drain?id=bench&holdSeconds=120")?;
    }
    wait_for("the drain", Duration::from_secs(300), || {
        workers.iter().all(|w| w.status()["drain"]["state"] == "Drained")
    })?;
    let drained = t.elapsed();
    let uploaded: f64 = workers.iter().map(|w| w.metric("streamscore_worker_checkpoint_uploaded_bytes_total")).sum();
    let drain_done = chrono::Utc::now().timestamp_millis();
    // Scale: new workers join; the rebalance moves partitions, new owners restore them.
    for n in from..to {
        workers.push(BenchWorker::start(&cfg, &dir, n)?);
    }
    let partitions = workers[0].status()["inputPartitions"].as_u64().unwrap_or(0);
    let restored = wait_for("every partition restored", Duration::from_secs(300), || {
        let st: Vec<serde_json::Value> = workers.iter().map(BenchWorker::status).collect();
        let mut owned: Vec<u64> = st
            .iter()
            .flat_map(|s| s["partitions"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_u64())
            .collect();
        owned.sort_unstable();
        owned.dedup();
        st.iter().all(|s| s["ready"] == true && s["replaying"] == 0 && s["drain"]["state"] != "Drained")
            && owned.len() as u64 == partitions
            && partitions > 0
    })?;
    let moved: f64 = workers[from..]
        .iter()
        .map(|w| w.metric("streamscore_worker_partition_assignments_total{source=\"checkpoint\"}"))
        .sum();
    let downloaded: f64 = workers.iter().map(|w| w.metric("streamscore_worker_restore_downloaded_bytes_total")).sum();
    anyhow::ensure!(producer.wait()?.success(), "the paced producer failed");
    let total = keys + rate * flowing;
    wait_for("every output", Duration::from_secs(300), || outputs(&workers) >= total as f64)?;

    // The gap: consecutive outputs' producer timestamps from the drain on.
    let (read, times) = output_times(&bootstrap, &out, &format!("bench-rescale-reader-{stamp}"), drain_at - 2_000)?;
    println!("  read {read} outputs, {} from the drain on", times.len());
    let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let first_after = times.iter().find(|t| **t > drain_done).map_or(0, |t| t - drain_done);
    println!(
        "  drain of {from} workers (pause, commit, checkpoint {partitions} partitions): {:.2}s, {:.1} MB uploaded in all",
        drained.as_secs_f64(),
        uploaded / 1e6
    );
    println!(
        "  {} workers joined → every partition owned, restored and caught up: {:.2}s ({moved} partitions restored from checkpoints, {:.1} MB downloaded)",
        to - from,
        restored.as_secs_f64(),
        downloaded / 1e6
    );
    println!(
        "  output gap: longest interval between consecutive outputs {:.2}s; first output {:.2}s after the drain completed (new processes' start-up included)",
        gap as f64 / 1e3,
        first_after as f64 / 1e3
    );
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `bench-cutover` (see the module docs).
fn bench_cutover(pipeline: &str, keys: u64, workers_n: usize, rate: u64, store: &str) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let mut blue_cfg: PipelineConfig = PipelineConfig::from_yaml(&std::fs::read_to_string(pipeline)?)?;
    let dir = tempfile_dir()?;
    let stamp = chrono::Utc::now().timestamp_millis();
    let prefix = format!("{}/cutover-{stamp}", store.trim_end_matches('/'));
    blue_cfg.state.checkpoint_store = Some(prefix.clone());
    blue_cfg.state.checkpoint_interval = streamscore_crds::duration::Duration::from_secs(5);
    blue_cfg.source.group_id = format!("{}-cutover", blue_cfg.source.group_id);
    let (bootstrap, topic, out) =
        (blue_cfg.source.bootstrap_servers.clone(), blue_cfg.source.topics[0].clone(), blue_cfg.sink.topic.clone());
    // Green as the operator renders a model-only candidate: own group and prefix, seeded from
    // blue's checkpoints, writing to shadow topics until the barrier.
    let mut green_cfg = blue_cfg.clone();
    green_cfg.model.version = format!("{}-green", blue_cfg.model.version);
    green_cfg.source.group_id = format!("{}.u{stamp}", blue_cfg.source.group_id);
    green_cfg.state.checkpoint_store = Some(format!("{prefix}/u{stamp}"));
    green_cfg.state.seed_store = Some(prefix.clone());
    green_cfg.shadow = Some(streamscore_crds::pipeline::ShadowConfig {
        topic: format!("{out}.shadow"),
        dead_letter_topic: format!("{}.shadow", blue_cfg.sink.dead_letter_topic),
        feature_topic: None,
        live_from: None,
    });
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "2000000")
        .create()?;
    let t = Instant::now();
    for u in 0..keys {
        let ts = 1_795_500_000_000 - 10_000 - keys as i64 + u as i64;
        let v = format!(r#"{{"user_id":"user-{u}","ts":{ts},"amount":12.5,"action":"view","merchant":"m1"}}"#);
        send_paced(&p, &topic, &format!("user-{u}"), v.as_bytes(), u, 0, t);
    }
    p.flush(Duration::from_secs(120))?;
    println!("bench-cutover: {keys} keys produced in {:.2?}; {workers_n} blue and {workers_n} green workers, {rate} events/s", t.elapsed());
    let blue: Vec<BenchWorker> =
        (0..workers_n).map(|n| BenchWorker::start(&blue_cfg, &dir, n)).collect::<Result<_, _>>()?;
    let live_out = |ws: &[BenchWorker]| -> f64 {
        ws.iter()
            .map(|w| {
                w.metric("streamscore_worker_records_out_total") + w.metric("streamscore_worker_dead_letters_total")
            })
            .sum()
    };
    let took = wait_for("the state to be loaded", Duration::from_secs(900), || live_out(&blue) >= keys as f64)?;
    println!("  state loaded by blue in {:.1}s", took.as_secs_f64());
    let flowing = 60u64;
    let mut producer = std::process::Command::new("nice")
        .args(["-n", "10"])
        .arg(std::env::current_exe()?)
        .args(["gen", "--bootstrap", &bootstrap, "--topic", &topic, "--seed", "7", "--users", &keys.to_string()])
        .args(["--count", &(rate * flowing).to_string(), "--rate", &rate.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    // Blue's checkpoints (interval 5 s) hold the loaded state before green starts.
    wait_for("blue's checkpoints", Duration::from_secs(300), || {
        blue.iter().all(|w| w.status()["checkpoints"].as_array().is_some_and(|c| !c.is_empty()))
    })?;
    std::thread::sleep(Duration::from_secs(3));

    // The spec change: green starts from blue's checkpoints, in shadow.
    let green: Vec<BenchWorker> =
        (0..workers_n).map(|n| BenchWorker::start(&green_cfg, &dir, 100 + n)).collect::<Result<_, _>>()?;
    let lag = |ws: &[BenchWorker]| -> f64 { ws.iter().map(|w| w.metric("streamscore_worker_consumer_lag")).sum() };
    let ready = wait_for("green ready and caught up", Duration::from_secs(900), || {
        green.iter().all(|w| w.status()["ready"] == true) && lag(&green) <= lag(&blue) + 1_000.0
    })?;
    let seeded: f64 =
        green.iter().map(|w| w.metric("streamscore_worker_partition_assignments_total{source=\"seed\"}")).sum();
    let downloaded: f64 = green.iter().map(|w| w.metric("streamscore_worker_restore_downloaded_bytes_total")).sum();
    println!(
        "  green started → ready and within 1,000 records of blue: {:.2}s ({seeded} partitions seeded from blue's checkpoints, {:.1} MB downloaded)",
        ready.as_secs_f64(),
        downloaded / 1e6
    );
    std::thread::sleep(Duration::from_secs(5));

    // The cut-over protocol, as the operator runs it.
    let positions = |ws: &[BenchWorker], id: &str| -> Option<BTreeMap<String, BTreeMap<i32, i64>>> {
        let mut b: BTreeMap<String, BTreeMap<i32, i64>> = BTreeMap::new();
        for w in ws {
            let st = w.status();
            if st["drain"]["state"] != "Drained" || st["drain"]["report"]["id"] != id {
                return None;
            }
            for p in st["drain"]["report"]["partitions"].as_array().cloned().unwrap_or_default() {
                let part = p["partition"].as_i64().unwrap_or(0) as i32;
                for (t, o) in p["offsets"].as_object().cloned().unwrap_or_default() {
                    b.entry(t).or_default().insert(part, o.as_i64().unwrap_or(0));
                }
            }
        }
        Some(b)
    };
    let t0 = Instant::now();
    for w in &green {
        http("POST", &w.admin, "/v1/admin/drain?id=cut-green&holdSeconds=300&checkpoint=false")?;
    }
    let mut cat = None;
    wait_for("green paused", Duration::from_secs(60), || {
        cat = positions(&green, "cut-green");
        cat.is_some()
    })?;
    let cat = cat.unwrap_or_default();
    let mut attempt = 1;
    let (barrier, fenced_at) = loop {
        let id = format!("cut-blue-{attempt}");
        for w in &blue {
            http("POST", &w.admin, &format!("/v1/admin/drain?id={id}&holdSeconds=300&checkpoint=false&fence=true"))?;
        }
        let mut at = None;
        wait_for("blue stopped", Duration::from_secs(60), || {
            at = positions(&blue, &id);
            at.is_some()
        })?;
        let at = at.unwrap_or_default();
        let covers = cat
            .iter()
            .all(|(t, ps)| ps.iter().all(|(p, c)| at.get(t).and_then(|x| x.get(p)).copied().unwrap_or(0) >= *c));
        if covers {
            break (at, Instant::now());
        }
        for w in &blue {
            http("POST", &w.admin, "/v1/admin/resume")?;
        }
        attempt += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    let fence_ms = chrono::Utc::now().timestamp_millis();
    let body = serde_json::json!({"liveFrom": barrier}).to_string();
    for w in &green {
        http_body("POST", &w.admin, "/v1/admin/golive", &body)?;
        http("POST", &w.admin, "/v1/admin/resume")?;
    }
    let protocol = t0.elapsed();
    let fence_to_live = fenced_at.elapsed();
    println!(
        "  cut-over protocol (green paused, blue fenced in {attempt} attempt(s), barrier set, green resumed): {:.3}s; blue stopped → green live {:.3}s",
        protocol.as_secs_f64(),
        fence_to_live.as_secs_f64()
    );
    anyhow::ensure!(producer.wait()?.success(), "the paced producer failed");
    drop(blue);
    let total = keys + rate * flowing;
    let (read, times) = output_times(&bootstrap, &out, &format!("bench-cutover-reader-{stamp}"), fence_ms - 5_000)?;
    let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    println!(
        "  live topic: {read} outputs for {total} inputs (fewer: some lost, more: some twice); longest interval between consecutive outputs from 5 s before the switch: {:.3}s (input every {:.3} ms)",
        gap as f64 / 1e3,
        1e3 / rate as f64
    );
    drop(green);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
