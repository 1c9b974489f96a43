//! A pod replaced without its state, against the real broker: a worker processes part of a
//! stream and is killed (SIGKILL) at a random point; a replacement with an empty state directory
//! joins the same group (as when a pod is rescheduled to another node). Without a checkpoint
//! store (the default, `state.missingCheckpoint: rebuild`) it must rebuild every partition from
//! its earliest record up to the committed offset, write no output below it, and then score with
//! exactly the features computed here from the raw input. With a checkpoint store, the same.
//!
//! `STREAMSCORE_HANDOFF_RUNS` sets the number of runs (default 2; `make chaos` runs 20).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::Rng;
use streamscore_tests::oracle::{check, events, metric, oracle, outputs, Ev};
use streamscore_tests::{create_topics, oracle_pipeline, produce, producer, unique, WorkerProcess};

const EVENTS: u64 = 4_003;
const PARTITIONS: i32 = 3;

fn runs() -> usize {
    std::env::var("STREAMSCORE_HANDOFF_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(2)
}

/// The log without terminal colour codes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `name=value` of a log line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {name}="))? + name.len() + 2;
    line[at..].split_whitespace().next()
}

/// Per partition, the (offset, expected) of the first record the worker processed, from its
/// "first record of the partition read" log lines (the first line per partition).
fn first_reads(log: &str) -> BTreeMap<i32, (i64, i64)> {
    let mut firsts = BTreeMap::new();
    for line in plain(log).lines().filter(|l| l.contains("first record of the partition read")) {
        let p: i32 = field(line, "partition").unwrap().parse().unwrap();
        let offset: i64 = field(line, "offset").unwrap().parse().unwrap();
        let expected: i64 = field(line, "expected").unwrap().parse().unwrap();
        firsts.entry(p).or_insert((offset, expected));
    }
    firsts
}

/// One handoff; returns (inputs, outputs written twice, the evidence line).
async fn one_run(run: usize, store: Option<String>) -> (usize, usize, String) {
    let (input, out, dlq) = (unique("h-in"), unique("h-out"), unique("h-dlq"));
    create_topics(&[&input, &out, &dlq], PARTITIONS).await;
    let dir = tempfile::Builder::new()
        .prefix("handoff-")
        .tempdir_in(std::env::var("STREAMSCORE_DEV_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
        .unwrap()
        .keep(); // removed at the end of a run that passes; kept for a post-mortem otherwise
    eprintln!("run {run}: worker logs in {}", dir.display());
    let mut cfg = oracle_pipeline(&input, &out, &dlq, &unique("h-group"), "/unused");
    cfg.state.checkpoint_store = store.clone();
    cfg.state.checkpoint_interval = streamscore_crds::Duration::from_secs(1);
    cfg.validate().unwrap();
    let file = dir.join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let worker = |name: &str| WorkerProcess::spawn(&file, &dir.join(name), dir.join(format!("{name}.log")));

    // 300 keys; event times 100 ms apart with up to 2 s of disorder (none late).
    let all = events(0, EVENTS, 300, 1_795_200_000_000);
    let want = oracle(&all);
    let mut a = worker("a");
    let producing = tokio::spawn({
        let (input, all) = (input.clone(), all.clone());
        async move {
            let p = producer();
            for chunk in all.chunks(100) {
                let recs: Vec<_> = chunk.iter().map(Ev::record).collect();
                produce(&p, &input, &recs).await;
                tokio::time::sleep(Duration::from_millis(60)).await;
            }
        }
    });
    // Killed at a random point between a fifth and four fifths of the stream, after a commit.
    let kill_at = rand::thread_rng().gen_range(EVENTS / 5..EVENTS * 4 / 5) as f64;
    let deadline = Instant::now() + Duration::from_secs(90);
    let (outs, commits) = loop {
        if let Some(m) = a.try_metrics().await {
            let (outs, commits) =
                (metric(&m, "streamscore_worker_records_out_total"), metric(&m, "streamscore_worker_commits_total"));
            let checkpoints = metric(&m, "streamscore_worker_checkpoints_total");
            if outs >= kill_at && commits >= 1.0 && (store.is_none() || checkpoints >= 1.0) {
                break (outs, commits);
            }
        }
        assert!(Instant::now() < deadline, "a never reached {kill_at} outputs and a checkpoint");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    a.kill();
    let b = worker("b");
    producing.await.unwrap();
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, EVENTS as usize, Duration::from_secs(120))
    })
    .await
    .unwrap();
    let m = b.metrics().await;
    let log = std::fs::read_to_string(&b.log).unwrap_or_default();
    let late = metric(&m, "streamscore_worker_dead_letters_total");
    let source = if store.is_some() { "checkpoint" } else { "rebuild" };
    let opened = metric(&m, &format!("streamscore_worker_partition_assignments_total{{source=\"{source}\"}}"));
    let rebuilt = metric(&m, "streamscore_worker_partition_assignments_total{source=\"rebuild\"}");
    let replayed = metric(&m, "streamscore_worker_replayed_records_total");
    let seeks = metric(&m, "streamscore_worker_start_seeks_total");
    let firsts = first_reads(&log);
    eprintln!(
        "run {run} ({source}): a killed after {outs} outputs and {commits} commits; b: {opened} partitions from \
         {source}, {replayed} records replayed, {seeks} seeks back to a misplaced start, {late} dead letters, first reads (offset, expected) {firsts:?}, \
         {} outputs in all",
        got.len()
    );
    let keep = |what: &str| format!("{what}; logs in {}", dir.display());
    check(&got, &want);
    assert_eq!(late, 0.0, "{}", keep("no event is late or malformed: the watermark follows the input"));
    assert!(opened >= 1.0, "{}", keep(&format!("b opened a partition from {source}:\n{m}")));
    if store.is_some() {
        assert!(opened + rebuilt >= f64::from(PARTITIONS), "{}", keep("b restored or rebuilt every partition"));
    }
    assert!(replayed >= 1.0, "{}", keep("b replayed records below the committed offsets"));
    assert_eq!(firsts.len(), PARTITIONS as usize, "{}", keep("b logged its first read of every partition"));
    for (p, (offset, expected)) in &firsts {
        assert_eq!(offset, expected, "{}", keep(&format!("partition {p} was first read where its state starts")));
        if store.is_none() {
            assert_eq!(*offset, 0, "{}", keep(&format!("rebuilt partition {p} was first read from its beginning")));
        }
    }
    drop(b);
    let _ = std::fs::remove_dir_all(&dir);
    let seen: std::collections::HashMap<u64, usize> = got.iter().fold(Default::default(), |mut m, (id, _)| {
        *m.entry(*id).or_default() += 1;
        m
    });
    let duplicated = seen.values().map(|n| n - 1).sum();
    (
        want.len(),
        duplicated,
        format!("{opened} partitions from {source}, {replayed} replayed, {seeks} start seeks, first reads {firsts:?}"),
    )
}

/// Appends the runs' row to `chaos-report.md` in the environment's directory (`make chaos`).
fn report(fault: &str, rows: &[(usize, usize, String)], took: Duration) {
    let inputs: usize = rows.iter().map(|r| r.0).sum();
    let duplicated: usize = rows.iter().map(|r| r.1).sum();
    streamscore_tests::chaos_report(
        "Handoff without local state",
        &format!("{fault}, {} runs", rows.len()),
        "at-least-once",
        (inputs, duplicated),
        rows.last().map_or("", |r| r.2.as_str()),
        took,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_without_state_or_checkpoint_store_rebuilds_every_partition_exactly() {
    let started = Instant::now();
    let mut rows = Vec::new();
    for run in 0..runs() {
        rows.push(one_run(run, None).await);
    }
    report("SIGKILL, replacement with an empty state directory, no checkpoint store", &rows, started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_without_state_restores_from_the_checkpoint_store_exactly() {
    let bucket = std::env::var("STREAMSCORE_S3_BUCKET")
        .expect("STREAMSCORE_S3_BUCKET is not set: run `make test`, or `make env-up && . .dev/env.sh` first");
    let started = Instant::now();
    let mut rows = Vec::new();
    for run in 0..runs() {
        rows.push(one_run(run, Some(format!("s3://{bucket}/{}", unique("handoff")))).await);
    }
    report("SIGKILL, replacement with an empty state directory, checkpoint store", &rows, started.elapsed());
}
