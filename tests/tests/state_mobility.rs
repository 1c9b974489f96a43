//! State that follows its partition, against the real broker and the real S3 server
//! (SeaweedFS) of the local environment: checkpoints, restore on assignment, replay up to the
//! committed offsets without writing outputs twice, rebuild when nothing is usable. Every
//! feature value is recomputed here from the raw input, independently of the worker.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use streamscore_crds::pipeline::MissingCheckpoint;
use streamscore_crds::PipelineConfig;
use streamscore_tests::oracle::{check, events, metric, oracle, outputs, Ev};
use streamscore_tests::{
    create_topics, eventually, oracle_pipeline, produce, producer, repo_root, start_worker, unique, WorkerProcess,
};

/// The oracle's pipeline, with checkpoints to `store` when given.
fn pipeline(input: &str, out: &str, dlq: &str, group: &str, state: &str, store: Option<&str>) -> PipelineConfig {
    let mut cfg = oracle_pipeline(input, out, dlq, group, state);
    cfg.state.checkpoint_store = store.map(str::to_owned);
    cfg.state.checkpoint_interval = streamscore_crds::Duration::from_secs(2);
    cfg.state.retain_checkpoints = 3;
    cfg.validate().unwrap();
    cfg
}

fn s3_store(prefix: &str) -> String {
    let bucket = std::env::var("STREAMSCORE_S3_BUCKET")
        .expect("STREAMSCORE_S3_BUCKET is not set: run `make test`, or `make env-up && . .dev/env.sh` first");
    format!("s3://{bucket}/{prefix}")
}

/// Three worker processes in one group over six partitions; one is killed (SIGKILL) while
/// events flow, and a replacement with an empty state directory joins. Partitions move, their
/// new owners restore checkpoints from S3 and replay up to the committed offsets; every output
/// (replays included) carries exactly the features computed from the raw input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_after_a_kill_restores_its_state_from_a_checkpoint() {
    let (input, out, dlq) = (unique("m-in"), unique("m-out"), unique("m-dlq"));
    create_topics(&[&input, &out, &dlq], 6).await;
    // State directories and worker logs stay in the environment's directory for post-mortems.
    let dir = tempfile::Builder::new()
        .prefix("mobility-")
        .tempdir_in(std::env::var("STREAMSCORE_DEV_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
        .unwrap();
    let store = s3_store(&unique("mobility"));
    let cfg = pipeline(&input, &out, &dlq, &unique("m-group"), "/unused", Some(&store));
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let worker =
        |name: &str| WorkerProcess::spawn(&file, &dir.path().join(name), dir.path().join(format!("{name}.log")));

    let all = events(0, 30_000, 10_000, 1_795_000_000_000); // in the past: see maxFutureSkew
    let want = oracle(&all);
    let a = worker("a");
    let mut b = worker("b");
    let c = worker("c");
    // The stream is produced at a steady pace while the kill happens, so the killed worker
    // dies between checkpoints with processed, uncommitted input.
    let producing = tokio::spawn({
        let (input, all) = (input.clone(), all.clone());
        async move {
            let p = producer();
            for chunk in all.chunks(1_000) {
                let recs: Vec<_> = chunk.iter().map(Ev::record).collect();
                produce(&p, &input, &recs).await;
                tokio::time::sleep(Duration::from_millis(400)).await;
            }
        }
    });
    let first = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 10_000, Duration::from_secs(240))
    })
    .await
    .unwrap();
    assert!(first.len() >= 10_000, "{} outputs before the kill; logs in {}", first.len(), dir.keep().display());
    // Kill b a few commits after its newest checkpoint: the next owner of each of its partitions
    // restores that checkpoint and must replay the records b committed after it. (A kill right
    // after a checkpoint would leave nothing to replay, and this test unable to prove the path.)
    let waited = std::time::Instant::now();
    let (mut checkpoints, mut commits_then) = (0.0, 0.0);
    loop {
        let m = b.metrics().await;
        let (cps, commits) =
            (metric(&m, "streamscore_worker_checkpoints_total"), metric(&m, "streamscore_worker_commits_total"));
        if cps != checkpoints {
            (checkpoints, commits_then) = (cps, commits);
        } else if cps >= 1.0 && commits >= commits_then + 3.0 {
            break;
        }
        assert!(waited.elapsed() < Duration::from_secs(60), "b never checkpointed and committed after it:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.child.kill().expect("kill -9");
    b.child.wait().unwrap();
    let d = worker("d");
    producing.await.unwrap();
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 30_000, Duration::from_secs(240))
    })
    .await
    .unwrap();
    let mut restored = 0.0;
    let mut replayed = 0.0;
    for w in [&a, &c, &d] {
        let m = w.metrics().await;
        restored += metric(&m, "streamscore_worker_partition_assignments_total{source=\"checkpoint\"}");
        replayed += metric(&m, "streamscore_worker_replayed_records_total");
    }
    let seen = check(&got, &want);
    assert!(restored >= 1.0, "a moved partition was restored from a checkpoint");
    assert!(replayed >= 1.0, "records between a checkpoint and the committed offsets were replayed");
    let dups = seen.values().filter(|n| **n > 1).count();
    eprintln!(
        "{} outputs for {} inputs ({dups} written again after the kill), {restored} restores, {replayed} records replayed",
        got.len(),
        want.len()
    );
}

/// One worker whose local store falls behind (an old copy of its directory), then loses it,
/// then has neither store nor checkpoint and is told to fail: it replays, rebuilds, refuses,
/// and never writes an output twice or scores with stale state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_or_missing_local_store_is_caught_up_or_rebuilt_never_used_as_is() {
    let (input, out, dlq) = (unique("s-in"), unique("s-out"), unique("s-dlq"));
    create_topics(&[&input, &out, &dlq], 2).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut cfg = pipeline(&input, &out, &dlq, &unique("s-group"), state.to_str().unwrap(), None);
    let base = 1_795_100_000_000; // in the past: see maxFutureSkew
    let batches: Vec<Vec<Ev>> = (0..4).map(|i| events(i * 1_500, 1_500, 150, base)).collect();
    let mut sent: Vec<Ev> = Vec::new();

    // 1. Events 0–1499; the store is copied after a clean stop.
    sent.extend(batches[0].iter().cloned());
    let (got, _) = phase(&cfg, &input, &out, &batches[0], sent.len()).await;
    check(&got, &oracle(&sent));
    let old = dir.path().join("old-state");
    copy_dir(&state, &old);
    // 2. Events 1500–2999 on the same store.
    sent.extend(batches[1].iter().cloned());
    let (got, _) = phase(&cfg, &input, &out, &batches[1], sent.len()).await;
    check(&got, &oracle(&sent));
    // 3. The old copy comes back: it is behind the committed offsets by the 1,500 events of
    //    step 2, which are replayed (outputs not written again) before events 3000–4499.
    std::fs::remove_dir_all(&state).unwrap();
    copy_dir(&old, &state);
    sent.extend(batches[2].iter().cloned());
    let (got, m) = phase(&cfg, &input, &out, &batches[2], sent.len()).await;
    let seen = check(&got, &oracle(&sent));
    assert!(seen.values().all(|n| *n == 1), "no output written twice");
    assert_eq!(metric(&m, "streamscore_worker_replayed_records_total"), 1_500.0, "{m}");
    assert_eq!(metric(&m, "streamscore_worker_partition_assignments_total{source=\"local\"}"), 2.0, "{m}");
    // 4. The store is gone and there is no checkpoint store: rebuilt from the beginning.
    std::fs::remove_dir_all(&state).unwrap();
    sent.extend(batches[3].iter().cloned());
    let (got, m) = phase(&cfg, &input, &out, &batches[3], sent.len()).await;
    let seen = check(&got, &oracle(&sent));
    assert!(seen.values().all(|n| *n == 1), "no output written twice");
    assert_eq!(metric(&m, "streamscore_worker_replayed_records_total"), 4_500.0, "{m}");
    assert_eq!(metric(&m, "streamscore_worker_partition_assignments_total{source=\"rebuild\"}"), 2.0, "{m}");
    // 5. The same with missingCheckpoint: fail: the worker stops and says why.
    std::fs::remove_dir_all(&state).unwrap();
    cfg.state.missing_checkpoint = MissingCheckpoint::Fail;
    let w = start_worker(&cfg);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w.thread.is_finished() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let err = tokio::task::spawn_blocking(move || w.join()).await.unwrap().unwrap_err();
    assert!(err.contains("state.missingCheckpoint is fail") && err.contains("committed offsets"), "{err}");
}

/// Starts a worker, produces `batch`, waits until `total` inputs have outputs, stops it
/// cleanly; returns every output and the worker's metrics.
async fn phase(
    cfg: &PipelineConfig,
    input: &str,
    out: &str,
    batch: &[Ev],
    total: usize,
) -> (Vec<(u64, serde_json::Value)>, String) {
    let w = start_worker(cfg);
    let recs: Vec<_> = batch.iter().map(Ev::record).collect();
    produce(&producer(), input, &recs).await;
    let out = out.to_owned();
    let got = tokio::task::spawn_blocking(move || outputs(&out, total, Duration::from_secs(60))).await.unwrap();
    let metrics = w.metrics.encode();
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
    (got, metrics)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Checkpoint content against the S3 server: an unchanged store uploads nothing, a changed
/// key uploads a new table, a manifest whose file is gone falls back to the previous
/// checkpoint, and retention keeps what the kept manifests reference.
#[test]
fn checkpoints_round_trip_through_the_s3_server() {
    use std::sync::Arc;
    use streamscore_worker::checkpoint::Checkpointer;
    use streamscore_worker::metrics::Metrics;
    use streamscore_worker::record::KeyState;
    use streamscore_worker::state::StoreEnv;

    let dir = tempfile::tempdir().unwrap();
    let env = StoreEnv::new(dir.path().join("state"), 1 << 20, 1_000);
    let uri = s3_store(&unique("content"));
    let state_cfg = streamscore_crds::pipeline::StateConfig {
        checkpoint_store: Some(uri.clone()),
        retain_checkpoints: 2,
        ..Default::default()
    };
    let metrics = Arc::new(Metrics::new());
    let cp = Checkpointer::start(&state_cfg, dir.path(), "v1", metrics.clone()).unwrap().unwrap();
    let offsets = |n: i64| BTreeMap::from([("in".to_string(), n)]);
    let mut ids = Vec::new();
    for round in 0..4i64 {
        let mut s = env.open::<KeyState>(0).unwrap();
        s.set_fingerprint("fp").unwrap();
        for k in 0..500 {
            s.get_mut(&format!("k{}", k + round * 10)).unwrap().features.max_time = Some(round);
        }
        s.flush(&offsets(round + 1), Some(round)).unwrap();
        let h = s.handle();
        drop(s);
        ids.push(cp.checkpoint_now(0, &h, offsets(round + 1)).unwrap().expect("uploaded"));
        assert_eq!(cp.checkpoint_now(0, &h, offsets(round + 1)).unwrap(), None, "unchanged: nothing uploaded");
        std::thread::sleep(Duration::from_millis(1_100)); // S3 modification times have 1 s resolution
    }
    assert_eq!(metrics.checkpoints.get(), 4);
    let store = cp.store();
    let kept: Vec<String> =
        store.manifests(0).unwrap().iter().map(|m| m.location.filename().unwrap().to_owned()).collect();
    assert_eq!(kept, vec![ids[3].clone(), ids[2].clone()], "retention keeps the newest two");
    for id in &kept {
        let m = store.read_manifest(0, id).unwrap();
        store.download(id, &m, &dir.path().join(format!("r-{id}"))).expect("a kept checkpoint restores completely");
    }
    // The newest checkpoint loses a file of its own: restore falls back to the previous one.
    let m3 = store.read_manifest(0, &ids[3]).unwrap();
    let m2 = store.read_manifest(0, &ids[2]).unwrap();
    let own = m3.files.iter().find(|f| !m2.files.iter().any(|g| g.sha256 == f.sha256)).expect("a new table");
    let raw = object_store::aws::AmazonS3Builder::from_env().with_url(&uri).build().unwrap();
    let prefix = uri.splitn(4, '/').nth(3).unwrap();
    let path = object_store::path::Path::from(format!("{prefix}/partition-0/files/{}", own.sha256));
    tokio::runtime::Runtime::new().unwrap().block_on(object_store::ObjectStore::delete(&raw, &path)).unwrap();
    let r = cp.restore(0, "fp", None, &dir.path().join("restored")).unwrap().expect("a checkpoint");
    assert_eq!(r.id, ids[2]);
    assert_eq!(r.offsets, offsets(3));
    assert_eq!(metrics.checkpoint_fallbacks.get(), 1);
    let renv = StoreEnv::new(dir.path().join("restored-env"), 1 << 20, 1_000);
    std::fs::create_dir_all(dir.path().join("restored-env")).unwrap();
    std::fs::rename(dir.path().join("restored"), renv.partition_path(0)).unwrap();
    let mut restored = renv.open::<KeyState>(0).unwrap();
    // k519 was written in rounds 2 and 3: the restored state is round 2's.
    assert_eq!(restored.get_mut("k519").unwrap().features.max_time, Some(2), "the state of the restored checkpoint");
    cp.shutdown();
}

/// `model.path` in the S3 server: the worker downloads it, checks its digest and scores with
/// it; a file whose digest differs, or one that is missing, leaves the worker not ready with the
/// reason (and it loads nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_in_the_object_store_is_downloaded_verified_and_scored() {
    use object_store::ObjectStore;
    let (input, out, dlq) = (unique("mu-in"), unique("mu-out"), unique("mu-dlq"));
    create_topics(&[&input, &out, &dlq], 2).await;
    let dir = tempfile::Builder::new()
        .prefix("model-uri-")
        .tempdir_in(std::env::var("STREAMSCORE_DEV_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
        .unwrap();
    let prefix = s3_store(&unique("models"));
    let bytes = std::fs::read(repo_root().join("models/fraud-logreg.onnx")).unwrap();
    let s3 = object_store::aws::AmazonS3Builder::from_env().with_url(&prefix).build().unwrap();
    let key = object_store::path::Path::parse(format!("{}/fraud.onnx", prefix.splitn(4, '/').nth(3).unwrap())).unwrap();
    s3.put(&key, bytes.into()).await.unwrap();

    let start = |name: &str, path: String, sha: Option<&str>| {
        let mut cfg = pipeline(&input, &out, &dlq, &unique("mu-group"), "/unused", None);
        cfg.model.path = path;
        if let Some(s) = sha {
            cfg.model.sha256 = s.to_owned();
        }
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
        WorkerProcess::spawn(&file, &dir.path().join(name), dir.path().join(format!("{name}.log")))
    };
    let readyz = |p: &WorkerProcess| {
        let url = format!("http://127.0.0.1:{}/readyz", p.port);
        async move {
            match reqwest::get(&url).await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        }
    };
    // Wrong digest, and a missing file: not ready, with the reason.
    let wrong = start("wrong", format!("{prefix}/fraud.onnx"), Some(&"0".repeat(64)));
    let missing = start("missing", format!("{prefix}/nope.onnx"), None);
    for (p, says) in [(&wrong, "does not match model.sha256"), (&missing, "downloading the model")] {
        let body = eventually(Duration::from_secs(30), "not ready with the reason", || async {
            let (code, body) = readyz(p).await;
            (code == 503 && body.contains(says)).then_some(body)
        })
        .await;
        eprintln!("{body}");
    }
    drop((wrong, missing));
    // The right digest: downloaded, verified, scored.
    let worker = start("good", format!("{prefix}/fraud.onnx"), None);
    let all = events(0, 400, 50, 1_795_000_000_000);
    let want = oracle(&all);
    let p = producer();
    let recs: Vec<_> = all.iter().map(Ev::record).collect();
    produce(&p, &input, &recs).await;
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 400, Duration::from_secs(60))
    })
    .await
    .unwrap();
    check(&got, &want);
    let m = worker.metrics().await;
    assert!(metric(&m, "streamscore_worker_records_out_total") >= 400.0, "{m}");
    let cached = dir.path().join("good/.model").read_dir().unwrap().count();
    assert_eq!(cached, 1, "the downloaded model is kept in the state directory");
}
