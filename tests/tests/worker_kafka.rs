//! The worker against the real broker: every good event scored with the right feature
//! values, every bad one dead-lettered with its reason, the query API answering, and a
//! restart neither losing nor double-counting anything.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use streamscore_crds::PipelineConfig;
use streamscore_tests::{
    bootstrap, consume, consume_with, create_topics, eventually, produce, producer, reference_pipeline as pipeline,
    repo_root, start_worker, unique, RunningWorker, WorkerProcess,
};
use streamscore_worker::features::FeatureSet;
use streamscore_worker::http::{router, AppState};

fn start(cfg: &PipelineConfig) -> RunningWorker {
    start_worker(cfg)
}

fn event(user: &str, ts: i64, amount: f64, action: &str) -> (String, Vec<u8>) {
    (
        user.to_owned(),
        json!({"user_id": user, "ts": ts, "amount": amount, "action": action, "merchant": "m1"})
            .to_string()
            .into_bytes(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_scores_dead_letters_answers_queries_and_survives_restart() {
    let (input, out, dlq) = (unique("w-in"), unique("w-out"), unique("w-dlq"));
    create_topics(&[&input, &out, &dlq], 4).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = pipeline(&input, &out, &dlq, &unique("w-group"), state.path().to_str().unwrap());
    let p = producer();

    // 10 users × 30 events, one per minute per user, alternating actions.
    let base = 1_795_500_000_000i64;
    let users: Vec<String> = (0..10).map(|u| format!("user-{u}")).collect();
    let mut good = Vec::new();
    for i in 0..30i64 {
        for (u, user) in users.iter().enumerate() {
            let action = if i % 3 == 0 { "ride_requested" } else { "view" };
            good.push(event(user, base + i * 60_000 + u as i64, 10.0 + i as f64, action));
        }
    }
    let bad: Vec<(String, Vec<u8>)> = vec![
        ("user-0".into(), b"{not json".to_vec()),
        ("user-1".into(), vec![0xff, 0xfe, 0x00]),
        ("user-2".into(), json!({"ts": base, "amount": 1, "action": "view"}).to_string().into_bytes()),
        ("user-3".into(), json!({"user_id": "user-3", "amount": 1, "action": "view"}).to_string().into_bytes()),
        (
            "user-4".into(),
            json!({"user_id": "user-4", "ts": base, "amount": "12", "action": "view"}).to_string().into_bytes(),
        ),
        // late: an hour before everything else of its partition
        event("user-5", base - 3_600_000, 5.0, "view"),
    ];
    produce(&p, &input, &good).await;
    produce(&p, &input, &bad).await;

    let w = start(&cfg);
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 300, Duration::from_secs(90))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), 300, "every good event scored exactly once so far");
    let dead = tokio::task::spawn_blocking({
        let dlq = dlq.clone();
        move || consume(&dlq, 6, Duration::from_secs(30))
    })
    .await
    .unwrap();
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.header("streamscore.reason").unwrap()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["bad_event_time", "invalid", "late", "malformed", "missing_key", "not_utf8"]);
    let malformed = dead.iter().find(|d| d.header("streamscore.reason") == Some("malformed")).unwrap();
    assert_eq!(malformed.value, b"{not json", "original bytes preserved");
    assert!(malformed.header("streamscore.source.offset").is_some());

    // Feature values: for user-3's i-th event, tx_1h counts events in (t-1h, t] = min(i+1, 60)
    // (all 30 within 1h: one per minute), amount_24h = sum of 10+j, rides_1h = i/3+1.
    let mut by_user: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
    for s in &scored {
        let v = s.json();
        assert_eq!(s.key, v["key"].as_str().unwrap());
        by_user.entry(s.key.clone()).or_default().push(v);
    }
    for (user, mut outs) in by_user {
        assert_eq!(outs.len(), 30, "{user}");
        outs.sort_by_key(|v| v["eventTime"].as_i64().unwrap());
        for (i, v) in outs.iter().enumerate() {
            let i = i as f64;
            assert_eq!(v["features"]["tx_1h"], json!(i + 1.0), "{user} event {i}");
            assert_eq!(v["features"]["amount_24h"], json!((0..=i as i64).map(|j| 10.0 + j as f64).sum::<f64>()));
            assert_eq!(v["features"]["rides_1h"], json!((i as i64 / 3 + 1) as f64));
            assert_eq!(v["modelVersion"], "logreg-v1");
            assert_eq!(v["fields"]["merchant"], "m1");
            let score = v["scores"]["fraud"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&score));
        }
        let last = outs.last().unwrap();
        assert_eq!(
            last["features"]["last_actions"],
            json!(["view", "ride_requested", "view", "view"]),
            "{user}: last 4 actions by event time"
        );
    }

    // Query API over HTTP, from the state flushed at the last commit.
    let app = router(AppState {
        health: w.health.clone(),
        metrics: w.metrics.clone(),
        readers: w.readers.clone(),
        features: Arc::new(FeatureSet::new(&cfg.features, &streamscore_worker::decode::Schema::new(&cfg))),
        owners: None,
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let http = reqwest::Client::new();
    let body: serde_json::Value =
        streamscore_tests::eventually(Duration::from_secs(10), "flushed state of user-7", || {
            let http = http.clone();
            async move {
                let r = http.get(format!("http://{addr}/v1/entities/user-7")).send().await.ok()?;
                let v: serde_json::Value = r.json().await.ok()?;
                (v["features"]["tx_1h"] == json!(30.0)).then_some(v)
            }
        })
        .await;
    assert_eq!(body["lastScore"]["modelVersion"], "logreg-v1");
    let missing = http.get(format!("http://{addr}/v1/entities/nobody")).send().await.unwrap();
    assert_eq!(missing.status(), 404);
    let ready = http.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200, "{}", ready.text().await.unwrap());
    let metrics = http.get(format!("http://{addr}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("streamscore_worker_dead_letters_total{reason=\"late\"} 1"), "{metrics}");
    assert!(metrics.contains("streamscore_worker_records_out_total 300"), "{metrics}");

    // Graceful stop commits; a restart resumes without reprocessing or losing state.
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
    let more: Vec<_> =
        users.iter().enumerate().map(|(u, user)| event(user, base + 30 * 60_000 + u as i64, 1.0, "view")).collect();
    produce(&p, &input, &more).await;
    let w2 = start(&cfg);
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 311, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), 310, "only the 10 new events are scored after restart");
    let newest: Vec<_> =
        scored.iter().map(|s| s.json()).filter(|v| v["eventTime"].as_i64().unwrap() >= base + 30 * 60_000).collect();
    assert_eq!(newest.len(), 10);
    for v in newest {
        // 31 events in the last hour: state survived the restart, nothing counted twice.
        assert_eq!(v["features"]["tx_1h"], json!(31.0), "{v}");
    }
    tokio::task::spawn_blocking(move || w2.stop()).await.unwrap();
}

/// kill -9 of a busy worker (input flowing, state changed since its last commit), then a
/// restart on the same state directory: every input has an output carrying the features the
/// test's oracle computes from the raw input. The kill forced a replay (the inputs after the
/// last commit have two outputs, and the restarted worker consumed inputs the first one had
/// already scored), and the two outputs of a replayed input agree on every feature and score.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_stream_loses_nothing_and_counts_nothing_twice() {
    use streamscore_tests::oracle::{self, metric, Ev};
    let (input, out, dlq) = (unique("k-in"), unique("k-out"), unique("k-dlq"));
    create_topics(&[&input, &out, &dlq], 4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = streamscore_tests::oracle_pipeline(&input, &out, &dlq, &unique("k-group"), "/unused");
    cfg.runtime.commit_interval = streamscore_crds::Duration::from_secs(1);
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let state = dir.path().join("state");
    let spawn = |n: u32| WorkerProcess::spawn(&file, &state, dir.path().join(format!("worker-{n}.log")));

    let all = oracle::events(0, 6_000, 50, 1_795_700_000_000);
    let want = oracle::oracle(&all);
    let (first, rest) = all.split_at(4_000);
    let mut worker = spawn(1);
    // The first 4,000 inputs at about 1,000/s; the kill lands while they flow.
    let producing = tokio::spawn({
        let (input, first) = (input.clone(), first.to_vec());
        async move {
            let p = producer();
            for chunk in first.chunks(100) {
                produce(&p, &input, &chunk.iter().map(Ev::record).collect::<Vec<_>>()).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let (consumed, commits) = eventually(Duration::from_secs(60), "a commit, then 1,500 inputs consumed", || async {
        let text = worker.try_metrics().await?;
        let (consumed, commits) =
            (metric(&text, "streamscore_worker_records_in_total"), metric(&text, "streamscore_worker_commits_total"));
        (commits >= 1.0 && consumed >= 1_500.0).then_some((consumed, commits))
    })
    .await;
    worker.kill();
    assert!(
        !producing.is_finished() && consumed < first.len() as f64,
        "the kill must land mid-stream: {consumed} of {} inputs consumed",
        first.len()
    );
    eprintln!("killed after {consumed} inputs consumed and {commits} commits");
    producing.await.unwrap();
    produce(&producer(), &input, &rest.iter().map(Ev::record).collect::<Vec<_>>()).await;

    let worker = spawn(2);
    let got: Vec<serde_json::Value> = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let got: Vec<_> = consume(&out, usize::MAX, Duration::from_secs(4)).iter().map(|c| c.json()).collect();
                let ids: std::collections::HashSet<_> = got.iter().map(|v| v["fields"]["id"].as_u64()).collect();
                if ids.len() >= 6_000 || std::time::Instant::now() > deadline {
                    return got;
                }
            }
        }
    })
    .await
    .unwrap();
    let restarted = worker.metrics().await;
    drop(worker);

    // Every output against the oracle, every input scored.
    let pairs: Vec<(u64, serde_json::Value)> =
        got.iter().map(|v| (v["fields"]["id"].as_u64().unwrap(), v["features"].clone())).collect();
    let seen = oracle::check(&pairs, &want);
    // The replay: inputs with two outputs, and the restarted worker read more than the new ones.
    let twice = seen.values().filter(|n| **n > 1).count();
    let read_again = metric(&restarted, "streamscore_worker_records_in_total")
        - rest.len() as f64
        - (first.len() as f64 - consumed).max(0.0);
    eprintln!("{twice} inputs scored twice; the restarted worker read {read_again} inputs the first had read");
    assert!(
        twice > 0 && read_again > 0.0,
        "the kill forced no replay: {twice} inputs scored twice, {read_again} read again"
    );
    assert!(seen.values().all(|n| *n <= 2), "an input scored more than twice: {:?}", seen.values().max());
    // Both outputs of a replayed input are the same record: features, scores, label, version.
    let mut first_output: BTreeMap<u64, &serde_json::Value> = BTreeMap::new();
    for v in &got {
        let id = v["fields"]["id"].as_u64().unwrap();
        if let Some(before) = first_output.insert(id, v) {
            for field in ["features", "scores", "label", "modelVersion", "eventTime", "key"] {
                assert_eq!(before[field], v[field], "input {id}: {field} differs between its two outputs");
            }
        }
    }
    assert!(
        metric(&restarted, "streamscore_worker_partition_assignments_total{source=\"local\"}") >= 1.0,
        "the restarted worker did not reopen its own state:\n{restarted}"
    );
}

/// Exactly-once against the real broker: the worker binary with `sink.delivery: exactlyOnce`
/// and a commit every second, SIGKILLed while a steady stream flows (so a transaction is open),
/// restarted with the same pod name. A read_committed reader then sees exactly one output per
/// input, with the features recomputed here, and exactly one dead letter per bad input; a
/// read_uncommitted reader sees more outputs: the records of the transaction the kill cut
/// (aborted), proof that the kill landed mid-transaction and that those inputs were processed
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_a_worker_killed_mid_transaction_writes_each_output_once() {
    let (input, out, dlq) = (unique("eos-in"), unique("eos-out"), unique("eos-dlq"));
    create_topics(&[&input, &out, &dlq], 4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("eos-group"), dir.path().join("state").to_str().unwrap());
    cfg.sink.delivery = streamscore_crds::pipeline::Delivery::ExactlyOnce;
    cfg.runtime.commit_interval = streamscore_crds::Duration::from_secs(1);
    cfg.validate().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let pod = unique("eos-pod");
    let spawn = || {
        std::process::Command::new(streamscore_tests::built_binary("streamscore-worker"))
            .args(["--pipeline", file.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .env("STREAMSCORE_POD_NAME", &pod)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("worker binary starts")
    };
    // 50 users × 90 events, one per minute, and one malformed event per minute from another user.
    let base = 1_795_700_000_000i64;
    let mut evs = Vec::new();
    for i in 0..90i64 {
        for u in 0..50 {
            evs.push(event(&format!("eos-{u}"), base + i * 60_000 + u, 1.0, "view"));
        }
        if i % 2 == 0 {
            let bad = json!({"user_id": "eos-bad", "ts": base + i * 60_000, "amount": "x", "action": "view"});
            evs.push(("eos-bad".to_owned(), bad.to_string().into_bytes()));
        }
    }
    let mut worker = spawn();
    // The first 100 events, until they are scored (the worker has joined its group); then a
    // steady stream (~1,250 events/s for ~3.6 s): at any moment a transaction holds records.
    let (head, tail) = evs.split_at(100);
    produce(&producer(), &input, head).await;
    let started = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume_with(&out, 90, Duration::from_secs(60), "read_uncommitted").len()
    })
    .await
    .unwrap();
    assert!(started >= 90, "the worker scored the first events");
    let tail = tail.to_vec();
    let producing = tokio::spawn({
        let input = input.clone();
        async move {
            let p = producer();
            for chunk in tail.chunks(100) {
                produce(&p, &input, chunk).await;
                tokio::time::sleep(Duration::from_millis(80)).await;
            }
        }
    });
    let seen = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume_with(&out, 1500, Duration::from_secs(60), "read_uncommitted").len()
    })
    .await
    .unwrap();
    assert!(seen >= 1500, "worker wrote {seen} outputs before the kill");
    worker.kill().expect("kill -9");
    worker.wait().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut worker = spawn();
    producing.await.unwrap();
    let all = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                // Ask for more than expected: duplicates would show.
                let got = consume(&out, usize::MAX, Duration::from_secs(5));
                if got.len() >= 4500 || std::time::Instant::now() > deadline {
                    return got;
                }
            }
        }
    })
    .await
    .unwrap();
    let dead = tokio::task::spawn_blocking({
        let dlq = dlq.clone();
        move || consume(&dlq, usize::MAX, Duration::from_secs(5))
    })
    .await
    .unwrap();
    let uncommitted = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume_with(&out, usize::MAX, Duration::from_secs(5), "read_uncommitted").len()
    })
    .await
    .unwrap();
    worker.kill().unwrap();
    worker.wait().unwrap();
    let mut distinct = std::collections::BTreeSet::new();
    for c in &all {
        let v = c.json();
        let t = v["eventTime"].as_i64().unwrap();
        let u: i64 = c.key.trim_start_matches("eos-").parse().unwrap();
        let i = (t - base - u) / 60_000;
        // Independent expectation: events of this user in (t − 1h, t] = min(i + 1, 60).
        assert_eq!(v["features"]["tx_1h"], json!((i + 1).min(60) as f64), "{} event {i}: {v}", c.key);
        distinct.insert((c.key.clone(), t));
    }
    assert_eq!(distinct.len(), 4500, "every input has an output");
    assert_eq!(all.len(), 4500, "no input has two committed outputs");
    let bad: std::collections::BTreeSet<_> = dead.iter().map(|c| c.json()["ts"].as_i64().unwrap()).collect();
    assert_eq!((dead.len(), bad.len()), (45, 45), "one committed dead letter per malformed input");
    assert!(
        uncommitted > all.len(),
        "the kill cut an open transaction: read_uncommitted sees {uncommitted} outputs, read_committed {}",
        all.len()
    );
}

/// Emitted windows against the real broker: a deterministic stream (out of order within the
/// allowed disorder, one late event), the worker binary killed with SIGKILL mid-stream and
/// restarted, then a far-future event per key to close every window. Each window read from the
/// feature topic equals the value recomputed here with plain arithmetic; every expected window
/// is there. A replay after the kill may write a window again (at-least-once), but only with
/// the same value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_emits_closed_windows_to_the_feature_topic_once_per_value_across_a_kill() {
    use streamscore_crds::pipeline::{Aggregation, EmittedWindow, Filter};
    use streamscore_crds::Duration as D;
    const HOUR: i64 = 3_600_000;
    const MIN: i64 = 60_000;
    let (input, out, dlq, feats) = (unique("e-in"), unique("e-out"), unique("e-dlq"), unique("e-feat"));
    create_topics(&[&input, &out, &dlq, &feats], 4).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("e-group"), dir.path().join("state").to_str().unwrap());
    cfg.source.max_out_of_orderness = D::from_millis(10 * MIN as u64);
    cfg.runtime.commit_interval = D::from_secs(5); // the kill lands between commits: a replay
    cfg.sink.feature_topic = Some(feats.clone());
    let window =
        |name: &str, aggregation, field: Option<&str>, size: i64, advance: Option<i64>, filter| EmittedWindow {
            name: name.into(),
            aggregation,
            field: field.map(Into::into),
            size: D::from_millis(size as u64),
            advance: advance.map(|a| D::from_millis(a as u64)),
            filter,
        };
    let rides = Some(Filter { field: "action".into(), one_of: vec!["ride_requested".into()] });
    cfg.features.emitted = vec![
        window("spend_1h", Aggregation::Sum, Some("amount"), HOUR, None, None),
        window("rides_30m_every_10m", Aggregation::Count, None, 30 * MIN, Some(10 * MIN), rides),
        window("max_amount_1h", Aggregation::Max, Some("amount"), HOUR, None, None),
    ];
    cfg.validate().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let log = dir.path().join("worker.log");
    let spawn = || {
        std::process::Command::new(streamscore_tests::built_binary("streamscore-worker"))
            .args(["--pipeline", file.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
            .spawn()
            .expect("worker binary starts")
    };

    // 8 users, one event per user every 4 minutes for 4 hours, produced in nominal-time order
    // but with event times up to 5 minutes earlier (within maxOutOfOrderness: all accepted).
    // They start 11 days ago, so that even the closing events (10 days later) are not ahead
    // of the worker's clock (maxFutureSkew).
    let now =
        i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap();
    let start = now - 11 * 24 * HOUR;
    let base = start - start % HOUR + 7 * MIN; // not on a boundary
    let mut evs: Vec<(String, i64, f64, &str)> = Vec::new();
    for i in 0..60i64 {
        for u in 0..8i64 {
            let t = base + i * 4 * MIN - ((i * 7 + u * 3) % 5) * MIN - u;
            let amount = ((i * 13 + u * 5) % 40) as f64 + 0.5;
            let action = if (i + u) % 3 == 0 { "ride_requested" } else { "view" };
            evs.push((format!("win-{u}"), t, amount, action));
        }
    }
    // Independent expectation: (key, feature, windowStart) → (value, count).
    let mut want: BTreeMap<(String, String, i64), (f64, u64)> = BTreeMap::new();
    for (user, t, amount, action) in &evs {
        let hour = t - t.rem_euclid(HOUR);
        let s = want.entry((user.clone(), "spend_1h".into(), hour)).or_insert((0.0, 0));
        *s = (s.0 + amount, s.1 + 1);
        let m = want.entry((user.clone(), "max_amount_1h".into(), hour)).or_insert((f64::MIN, 0));
        *m = (m.0.max(*amount), m.1 + 1);
        if *action == "ride_requested" {
            // the 30-minute windows starting every 10 minutes that contain t
            let mut start = t - t.rem_euclid(10 * MIN);
            while start > t - 30 * MIN {
                let r = want.entry((user.clone(), "rides_30m_every_10m".into(), start)).or_insert((0.0, 0));
                *r = (r.0 + 1.0, r.1 + 1);
                start -= 10 * MIN;
            }
        }
    }
    let to_records = |evs: &[(String, i64, f64, &str)]| -> Vec<(String, Vec<u8>)> {
        evs.iter().map(|(u, t, a, act)| event(u, *t, *a, act)).collect()
    };
    let (first, rest) = evs.split_at(evs.len() * 3 / 5);
    let p = producer();
    produce(&p, &input, &to_records(first)).await;
    let mut worker = spawn();
    let seen = tokio::task::spawn_blocking({
        let feats = feats.clone();
        move || consume(&feats, 40, Duration::from_secs(60)).len()
    })
    .await
    .unwrap();
    worker.kill().expect("kill -9");
    worker.wait().unwrap();
    if seen < 40 {
        let scored = consume(&out, usize::MAX, Duration::from_secs(5)).len();
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("worker emitted {seen} windows ({scored} scored) before the kill (a worker binary without emitted windows?); log:\n{log}");
    }

    // The rest; one late event (2 h behind its partition: dead-lettered, never counted); then
    // an event per user 10 days later, which moves every partition's horizon past all windows.
    let mut tail = to_records(rest);
    tail.push(event("win-0", base + 3 * HOUR, 1_000.0, "ride_requested"));
    let far = base + 240 * HOUR;
    tail.extend((0..8).map(|u| event(&format!("win-{u}"), far + u, 1.0, "view")));
    produce(&p, &input, &tail).await;
    let mut worker = spawn();
    let all = tokio::task::spawn_blocking({
        let feats = feats.clone();
        let n = want.len();
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(120);
            loop {
                let got = consume(&feats, usize::MAX, Duration::from_secs(5));
                let distinct: std::collections::BTreeSet<_> = got
                    .iter()
                    .map(|c| {
                        let v = c.json();
                        (c.key.clone(), v["feature"].as_str().unwrap().to_owned(), v["windowStart"].as_i64().unwrap())
                    })
                    .collect();
                if distinct.len() >= n || std::time::Instant::now() > deadline {
                    return got;
                }
            }
        }
    })
    .await
    .unwrap();
    worker.kill().unwrap();
    worker.wait().unwrap();
    let dead = tokio::task::spawn_blocking(move || consume(&dlq, 1, Duration::from_secs(10))).await.unwrap();
    assert_eq!(dead.iter().map(|d| d.header("streamscore.reason").unwrap()).collect::<Vec<_>>(), ["late"]);

    let size = |f: &str| if f == "rides_30m_every_10m" { 30 * MIN } else { HOUR };
    let mut got: BTreeMap<(String, String, i64), (f64, u64)> = BTreeMap::new();
    for c in &all {
        let v = c.json();
        let feature = v["feature"].as_str().unwrap().to_owned();
        let start = v["windowStart"].as_i64().unwrap();
        assert_eq!(v["key"], json!(c.key), "{v}");
        assert_eq!(v["windowEnd"].as_i64().unwrap(), start + size(&feature), "{v}");
        let value = (v["value"].as_f64().unwrap(), v["count"].as_u64().unwrap());
        let id = (c.key.clone(), feature, start);
        assert_eq!(Some(&value), want.get(&id), "{v}: differs from the recomputed window");
        if let Some(before) = got.insert(id, value) {
            assert_eq!(before, value, "{v}: written twice with different values");
        }
    }
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    assert!(missing.is_empty(), "{} windows never emitted, e.g. {:?}", missing.len(), missing.first());
    eprintln!("{} windows, {} records (replayed duplicates: {})", want.len(), all.len(), all.len() - want.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_timestamp_skips_records_before_it() {
    use rdkafka::producer::FutureRecord;
    let (input, out, dlq) = (unique("ts-in"), unique("ts-out"), unique("ts-dlq"));
    create_topics(&[&input, &out, &dlq], 3).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let base = i64::try_from(now.as_millis()).unwrap() - 3_600_000;
    let p = producer();
    for i in 0..30i64 {
        let (k, v) = event(&format!("u{}", i % 6), base + i * 1_000, 1.0, "view");
        p.send(FutureRecord::to(&input).key(&k).payload(&v).timestamp(base + i * 1_000), Duration::from_secs(10))
            .await
            .expect("record acknowledged");
    }
    let state = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("ts-group"), &state.path().display().to_string());
    cfg.source.start_from = streamscore_crds::pipeline::StartPosition::Timestamp;
    cfg.source.start_timestamp_ms = Some(base + 15_000);
    cfg.validate().unwrap();
    let w = start(&cfg);
    // 15 records are at or after the timestamp; wait for more to see that no earlier one comes.
    let got = tokio::task::spawn_blocking(move || consume(&out, 16, Duration::from_secs(8))).await.unwrap();
    w.stop();
    let mut times: Vec<i64> = got.iter().map(|r| r.json()["eventTime"].as_i64().unwrap()).collect();
    times.sort_unstable();
    let want: Vec<i64> = (15..30).map(|i| base + i * 1_000).collect();
    assert_eq!(times, want, "exactly the records at or after startTimestampMs are scored");
}

fn now_ms() -> i64 {
    i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// Issue 11, item 1: one event dated 2199 used to move its partition's watermark 173 years
/// ahead (and the watermark is stored): every later event was dead-lettered as `late`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_dated_2199_is_dead_lettered_and_the_events_after_it_are_scored() {
    let (input, out, dlq) = (unique("f-in"), unique("f-out"), unique("f-dlq"));
    // One partition: every event shares the watermark the far-future one would move.
    create_topics(&[&input, &out, &dlq], 1).await;
    let state = tempfile::tempdir().unwrap();
    let cfg = pipeline(&input, &out, &dlq, &unique("f-group"), state.path().to_str().unwrap());
    let base = now_ms() - 3_600_000;
    let future = event("user-0", 7_226_582_400_000, 1.0, "view"); // 2199-01-01T00:00:00Z
    let mut records = vec![future.clone()];
    records.extend((0..200i64).map(|i| event(&format!("user-{}", i % 10), base + i * 1_000, 1.0, "view")));
    let p = producer();
    produce(&p, &input, &records).await;

    let w = start(&cfg);
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 200, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let dead = tokio::task::spawn_blocking({
        let dlq = dlq.clone();
        move || consume(&dlq, 1, Duration::from_secs(20))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), 200, "every normal event after the 2199 one is scored");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].header("streamscore.reason"), Some("future_event_time"));
    assert_eq!(dead[0].value, future.1, "original bytes");
    // Each user has 20 events within 200 s: its last one counts all 20, and the 2199 event of
    // user-0 counted nowhere.
    let mut most: BTreeMap<String, f64> = BTreeMap::new();
    for s in &scored {
        let tx = s.json()["features"]["tx_1h"].as_f64().unwrap();
        let m = most.entry(s.key.clone()).or_default();
        *m = m.max(tx);
    }
    assert_eq!(most.len(), 10);
    assert!(most.values().all(|&m| m == 20.0), "{most:?}");

    // After a restart (watermark restored from the state) a new event is still on time.
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
    produce(&p, &input, &[event("user-3", base + 200_000, 1.0, "view")]).await;
    let w = start(&cfg);
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 201, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), 201, "the event after the restart is scored, not late");
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
}

/// Issue 11, item 2: a 1.2 MB record used to stop the worker (`MessageSizeTooLarge` while
/// dead-lettering it, fatal), and a restart read it again: a crash loop. Now it is one dead
/// letter cut to the producer's limit; an output that would exceed the limit is a dead letter
/// with reason `output_too_large`; the worker keeps scoring.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_2_mb_record_is_one_dead_letter_and_the_worker_keeps_running() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    let (input, out, dlq) = (unique("big-in"), unique("big-out"), unique("big-dlq"));
    create_topics(&[&out, &dlq], 1).await;
    // The input topic accepts records up to 2 MB, as a topic another system writes may.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap();
    let topic = NewTopic::new(&input, 1, TopicReplication::Fixed(1)).set("max.message.bytes", "2000000");
    for r in admin.create_topics(&[topic], &AdminOptions::new()).await.unwrap() {
        r.expect("input topic created");
    }
    let state = tempfile::tempdir().unwrap();
    let cfg = pipeline(&input, &out, &dlq, &unique("big-group"), state.path().to_str().unwrap());
    assert_eq!(cfg.source.max_record_bytes, 983_040, "the default");

    let base = now_ms() - 3_600_000;
    let mut big = json!({"user_id": "user-big", "ts": base, "amount": 1.0, "action": "view", "merchant": "m1"});
    let pad = 1_200_000 - big.to_string().len() - r#","blob":"""#.len();
    big["blob"] = json!("x".repeat(pad));
    let big = ("user-big".to_owned(), big.to_string().into_bytes());
    assert_eq!(big.1.len(), 1_200_000);
    // 400 kB actions: each output repeats the user's last 4, so the third output is 1.2 MB
    // although each record is within maxRecordBytes.
    let seq: Vec<_> =
        (1..=3i64).map(|i| event("user-seq", base + i * 1_000, 1.0, &format!("{i}{}", "a".repeat(400_000)))).collect();
    let mut records = vec![event("user-0", base, 1.0, "view"), big.clone()];
    records.extend(seq.iter().cloned());
    records.push(event("user-0", base + 5_000, 1.0, "view"));
    let p: rdkafka::producer::FutureProducer =
        ClientConfig::new().set("bootstrap.servers", bootstrap()).set("message.max.bytes", "2000000").create().unwrap();
    produce(&p, &input, &records).await;

    let w = start(&cfg);
    let dead = tokio::task::spawn_blocking({
        let dlq = dlq.clone();
        move || consume(&dlq, 2, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 4, Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(!w.thread.is_finished(), "the worker is still running");
    let mut reasons: Vec<&str> = dead.iter().map(|d| d.header("streamscore.reason").unwrap()).collect();
    reasons.sort_unstable();
    assert_eq!(reasons, ["output_too_large", "oversized"]);
    let oversized = dead.iter().find(|d| d.header("streamscore.reason") == Some("oversized")).unwrap();
    assert_eq!(oversized.header("streamscore.truncated.value"), Some("1200000"));
    assert_eq!(oversized.header("streamscore.source.offset"), Some("1"));
    assert_eq!(oversized.key, "user-big");
    assert!(oversized.value.len() < 1_000_000 && oversized.value.len() > 990_000, "{}", oversized.value.len());
    assert!(big.1.starts_with(&oversized.value), "a prefix of the original bytes");
    let too_large = dead.iter().find(|d| d.header("streamscore.reason") == Some("output_too_large")).unwrap();
    assert_eq!(too_large.value, seq[2].1, "the input whose output did not fit, whole");
    assert_eq!(too_large.header("streamscore.truncated.value"), None);
    let mut keys: Vec<&str> = scored.iter().map(|s| s.key.as_str()).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["user-0", "user-0", "user-seq", "user-seq"]);
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
}

/// Issue 11, item 3: `amount: 1e400` used to be scored with an infinite amount, `ts: "NaN"`
/// read as time 0, and a NaN score written as `null` without a label. The model here
/// (`models/nan-score.onnx`) scores sqrt(−amount): NaN for any positive amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_amounts_times_and_scores_are_dead_lettered() {
    let (input, out, dlq) = (unique("nf-in"), unique("nf-out"), unique("nf-dlq"));
    create_topics(&[&input, &out, &dlq], 1).await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("nf-group"), state.path().to_str().unwrap());
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("models/nan-score.reference.json")).unwrap()).unwrap();
    cfg.model.path = repo_root().join("models/nan-score.onnx").display().to_string();
    cfg.model.sha256 = reference["sha256"].as_str().unwrap().to_owned();
    let base = now_ms() - 3_600_000;
    let raw = |ts: &str, amount: &str| {
        let v = format!(r#"{{"user_id":"u","ts":{ts},"amount":{amount},"action":"view","merchant":"m1"}}"#);
        ("u".to_owned(), v.into_bytes())
    };
    let records = [
        raw(&base.to_string(), "-4"),
        raw(&(base + 1_000).to_string(), "1e400"),
        raw(r#""NaN""#, "-1"),
        raw(&(base + 2_000).to_string(), "5"),
        raw(&(base + 3_000).to_string(), "-1"),
    ];
    produce(&producer(), &input, &records).await;

    let w = start(&cfg);
    let dead = tokio::task::spawn_blocking({
        let dlq = dlq.clone();
        move || consume(&dlq, 3, Duration::from_secs(60))
    })
    .await
    .unwrap();
    // One partition, processed in order: the last record is scored by now, or soon.
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 3, Duration::from_secs(5))
    })
    .await
    .unwrap();
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
    let by_offset: BTreeMap<&str, &str> = dead
        .iter()
        .map(|d| (d.header("streamscore.source.offset").unwrap(), d.header("streamscore.reason").unwrap()))
        .collect();
    assert_eq!(by_offset, BTreeMap::from([("1", "invalid"), ("2", "bad_event_time"), ("3", "scoring_failed")]));
    let scores: Vec<serde_json::Value> = scored.iter().map(|s| s.json()["scores"]["fraud"].clone()).collect();
    assert_eq!(scores, [json!(2.0), json!(1.0)], "sqrt(4) and sqrt(1); nothing else");
    assert!(scored.iter().all(|s| s.json()["label"] == json!("block")));
}

/// Issue 11, item 5: a worker whose outputs the brokers never acknowledge (its sink points at
/// a port nothing listens on) still stops within `runtime.shutdownTimeout` of the stop signal,
/// without committing; a worker with a working sink then scores every one of those inputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_outputs_are_never_acknowledged_stops_in_time_and_loses_nothing() {
    let (input, out, dlq) = (unique("sd-in"), unique("sd-out"), unique("sd-dlq"));
    create_topics(&[&input, &out, &dlq], 2).await;
    let group = unique("sd-group");
    let p = producer();
    let events: Vec<(String, Vec<u8>)> =
        (0..20i64).map(|i| event(&format!("u{}", i % 4), now_ms() - 60_000 + i, 1.0, "view")).collect();
    produce(&p, &input, &events).await;

    let state = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &group, &state.path().display().to_string());
    cfg.sink.bootstrap_servers = "127.0.0.1:9".into();
    cfg.runtime.shutdown_timeout = streamscore_crds::duration::Duration::from_secs(3);
    cfg.validate().unwrap();
    let w = start(&cfg);
    let metrics = w.metrics.clone();
    let t = std::time::Instant::now();
    while streamscore_tests::oracle::metric(&metrics.encode(), "streamscore_worker_records_in_total") < 20.0 {
        assert!(t.elapsed() < Duration::from_secs(60), "the worker did not consume the inputs");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stopped = std::time::Instant::now();
    let result = tokio::task::spawn_blocking(move || w.join()).await.unwrap();
    let took = stopped.elapsed();
    let err = result.expect_err("the worker reports that it could not deliver");
    assert!(err.contains("shutdownTimeout") || err.contains("producer queue is full"), "{err}");
    assert!(took < Duration::from_secs(15), "stopped {took:?} after the signal");

    // Nothing was committed: a worker with a working sink scores all 20.
    let state = tempfile::tempdir().unwrap();
    let cfg = pipeline(&input, &out, &dlq, &group, &state.path().display().to_string());
    let w = start(&cfg);
    let got = tokio::task::spawn_blocking(move || consume(&out, 20, Duration::from_secs(60))).await.unwrap();
    w.stop();
    assert_eq!(got.len(), 20);
}

/// A partition that a drain paused, that was then revoked (another worker joined) and that
/// came back to the same worker later (the other left) is consumed again: librdkafka keeps a
/// paused partition's flag across a revoke, so the worker resumes every partition it is
/// assigned (CI once saw a rescale 4 → 1 leave three partitions unconsumed this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_paused_by_a_drain_revoked_and_assigned_back_is_consumed() {
    let (input, out, dlq) = (unique("pr-in"), unique("pr-out"), unique("pr-dlq"));
    create_topics(&[&input, &out, &dlq], 4).await;
    let group = unique("pr-group");
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&pipeline(&input, &out, &dlq, &group, &da.path().display().to_string()));
    let wait = |w: &streamscore_tests::RunningWorker, n: usize, what: &str| {
        let t = std::time::Instant::now();
        while w.health.assigned.load(std::sync::atomic::Ordering::Relaxed) != n {
            assert!(t.elapsed() < Duration::from_secs(60), "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    tokio::task::block_in_place(|| wait(&a, 4, "a owns all 4 partitions"));
    // The drain pauses all four; b's arrival revokes them and ends the drain.
    a.health.admin.request_drain("d1", Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = start(&pipeline(&input, &out, &dlq, &group, &db.path().display().to_string()));
    tokio::task::block_in_place(|| wait(&b, 2, "b owns 2 partitions"));
    b.stop();
    tokio::task::block_in_place(|| wait(&a, 4, "a owns all 4 again"));
    let events: Vec<(String, Vec<u8>)> =
        (0..40i64).map(|i| event(&format!("pr{i}"), now_ms() - 60_000 + i, 1.0, "view")).collect();
    produce(&producer(), &input, &events).await;
    let got = tokio::task::spawn_blocking(move || consume(&out, 40, Duration::from_secs(60))).await.unwrap();
    a.stop();
    let parts: std::collections::BTreeSet<i32> = got.iter().map(|c| c.partition).collect();
    assert_eq!(got.len(), 40, "every event scored, from every partition (outputs from partitions {parts:?})");
}

/// Liveness against the real broker: a worker whose sink brokers are unreachable consumes, then
/// blocks waiting for acknowledgements. `/healthz` answers ok while the loop comes round and
/// fails with the reason once it has not for `runtime.stallTimeout` (3 s here); `/readyz` says
/// why too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_blocked_on_unreachable_sink_brokers_fails_liveness_after_the_stall_timeout() {
    let (input, out, dlq) = (unique("lv-in"), unique("lv-out"), unique("lv-dlq"));
    create_topics(&[&input, &out, &dlq], 2).await;
    let events: Vec<(String, Vec<u8>)> =
        (0..20i64).map(|i| event(&format!("u{}", i % 4), now_ms() - 60_000 + i, 1.0, "view")).collect();
    produce(&producer(), &input, &events).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("lv-group"), dir.path().join("state").to_str().unwrap());
    cfg.sink.bootstrap_servers = "127.0.0.1:9".into();
    cfg.runtime.stall_timeout = streamscore_crds::Duration::from_secs(3);
    let port = streamscore_tests::free_port();
    cfg.runtime.http_listen = format!("127.0.0.1:{port}");
    cfg.validate().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let mut worker = std::process::Command::new(streamscore_tests::built_binary("streamscore-worker"))
        .args(["--pipeline", file.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker binary starts");
    let (mut ok_seen, mut failed) = (0, None);
    let t = std::time::Instant::now();
    while t.elapsed() < Duration::from_secs(90) {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await {
            if r.status().is_success() {
                ok_seen += 1;
            } else {
                failed = Some((r.status().as_u16(), r.text().await.unwrap(), t.elapsed()));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.unwrap().text().await.unwrap();
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap().text().await.unwrap();
    worker.kill().unwrap();
    worker.wait().unwrap();
    let (status, body, after) = failed.expect("/healthz failed within 90 s");
    assert_eq!(status, 503);
    assert!(body.contains("has not come round") && body.contains("stallTimeout"), "{body}");
    assert!(ok_seen >= 10, "/healthz answered ok while the loop ran ({ok_seen} times)");
    assert!(streamscore_tests::oracle::metric(&metrics, "streamscore_worker_records_in_total") >= 1.0, "it consumed");
    assert!(ready.contains("has not come round"), "{ready}");
    eprintln!("liveness failed after {after:?}: {body}");
}

/// A worker stopped by a fenced drain (the live run at a blue/green cut-over) and then
/// SIGKILLed restarts fenced: with input waiting it writes nothing until it is resumed, and
/// then it scores everything (nothing past the barrier is written twice by the old run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_fenced_restarts_fenced() {
    let (input, out, dlq) = (unique("f-in"), unique("f-out"), unique("f-dlq"));
    create_topics(&[&input, &out, &dlq], 2).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("f-group"), dir.path().join("state").to_str().unwrap());
    let admin =
        format!("127.0.0.1:{}", std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    cfg.runtime.http_listen = "127.0.0.1:0".into();
    cfg.runtime.admin_listen = Some(admin.clone());
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let spawn = || {
        std::process::Command::new(streamscore_tests::built_binary("streamscore-worker"))
            .args(["--pipeline", file.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("worker binary starts")
    };
    let http = reqwest::Client::new();
    let status = || {
        let (http, admin) = (http.clone(), admin.clone());
        async move {
            http.get(format!("http://{admin}/v1/admin/status"))
                .send()
                .await
                .ok()?
                .json::<serde_json::Value>()
                .await
                .ok()
        }
    };
    let base = 1_795_700_000_000i64;
    let evs = |from: i64| -> Vec<(String, Vec<u8>)> {
        (from..from + 100).map(|i| event(&format!("fence-{}", i % 10), base + i * 1_000, 1.0, "view")).collect()
    };
    let p = producer();
    let mut worker = spawn();
    produce(&p, &input, &evs(0)).await;
    let n = |want: usize| {
        let out = out.clone();
        tokio::task::spawn_blocking(move || consume(&out, want, Duration::from_secs(8)).len())
    };
    assert_eq!(n(100).await.unwrap(), 100);
    // The fence: paused and committed; then SIGKILL.
    http.post(format!("http://{admin}/v1/admin/drain?id=u1-live-1&holdSeconds=120&checkpoint=false&fence=true"))
        .send()
        .await
        .unwrap();
    streamscore_tests::eventually(Duration::from_secs(30), "fenced", || async {
        (status().await?["drain"]["state"] == "Drained").then_some(())
    })
    .await;
    worker.kill().expect("kill -9");
    worker.wait().unwrap();
    produce(&p, &input, &evs(100)).await;
    let mut worker = spawn();
    let st = streamscore_tests::eventually(Duration::from_secs(30), "restarted, fenced again", || async {
        let st = status().await?;
        (st["drain"]["state"] == "Drained" && !st["partitions"].as_array()?.is_empty()).then_some(st)
    })
    .await;
    assert_eq!(st["drain"]["report"]["id"], "u1-live-1", "{st}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(n(usize::MAX).await.unwrap(), 100, "nothing written while fenced after the restart");
    http.post(format!("http://{admin}/v1/admin/resume")).send().await.unwrap();
    assert_eq!(n(200).await.unwrap(), 200, "everything scored once resumed");
    let _ = worker.kill();
    let _ = worker.wait();
}

/// A partition rebuilt after the input's retention dropped records its state needs (a worker
/// with an empty state directory and no checkpoint store, the first 100 of 300 committed
/// records deleted from the topic): the worker rebuilds from what is left and says what is
/// missing, in its metric and in its admin status (which the operator turns into the
/// TenantModel's `StateComplete` condition and a Warning Event), instead of scoring with the
/// incomplete state silently.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_after_retention_dropped_records_says_what_is_missing() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    use streamscore_tests::oracle::{self, metric, Ev};
    let (input, out, dlq) = (unique("r-in"), unique("r-out"), unique("r-dlq"));
    create_topics(&[&input, &out, &dlq], 1).await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = streamscore_tests::oracle_pipeline(&input, &out, &dlq, &unique("r-group"), "/unused");
    cfg.runtime.commit_interval = streamscore_crds::Duration::from_secs(1);
    let admin = format!("127.0.0.1:{}", streamscore_tests::free_port());
    cfg.runtime.admin_listen = Some(admin.clone());
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let all = oracle::events(0, 300, 10, 1_795_700_000_000);
    produce(&producer(), &input, &all.iter().map(Ev::record).collect::<Vec<_>>()).await;

    let mut first = WorkerProcess::spawn(&file, &dir.path().join("state-1"), dir.path().join("worker-1.log"));
    eventually(Duration::from_secs(60), "300 inputs consumed", || async {
        let text = first.try_metrics().await?;
        (metric(&text, "streamscore_worker_records_in_total") >= 300.0).then_some(())
    })
    .await;
    let complete = first.metrics().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // a commit at 300
    first.kill();
    let label = format!("streamscore_worker_restore_missing_records{{topic=\"{input}\",partition=\"0\"}}");
    assert_eq!(metric(&complete, &label), 0.0, "nothing missing before the deletion:\n{complete}");

    // The topic's retention drops the first 100 records.
    let client: AdminClient<DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&input, 0, rdkafka::Offset::Offset(100)).unwrap();
    client.delete_records(&tpl, &AdminOptions::new()).await.expect("records deleted");

    let second = WorkerProcess::spawn(&file, &dir.path().join("state-2"), dir.path().join("worker-2.log"));
    let status: serde_json::Value =
        eventually(Duration::from_secs(60), "the admin status says what is missing", || async {
            let v: serde_json::Value =
                reqwest::get(format!("http://{admin}/v1/admin/status")).await.ok()?.json().await.ok()?;
            v["incomplete"].as_array().is_some_and(|a| !a.is_empty()).then_some(v)
        })
        .await;
    let what = status["incomplete"][0].as_str().unwrap_or_default().to_owned();
    eprintln!("incomplete: {what}");
    assert!(
        what.contains(&format!("{input}/0: 100 records before offset 100")) && what.contains("rebuilt"),
        "{status}"
    );
    let text = second.metrics().await;
    assert_eq!(metric(&text, &label), 100.0, "{text}");
    assert!(
        metric(&text, "streamscore_worker_partition_assignments_total{source=\"rebuild\"}") >= 1.0,
        "the partition was rebuilt:\n{text}"
    );
}

/// Global lookup tables on the real broker: a worker whose table topic does not exist yet
/// scores nothing and says why in readiness; once the compacted topic exists and holds rows
/// (some overwritten before the start), the worker loads it, scores every waiting event with
/// the latest row of its merchant (as the test's own map of the table says), and applies later
/// updates and deletions to the events after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_tables_load_before_scoring_and_updates_reach_later_events() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;

    let (input, out, dlq, table) = (unique("lk-in"), unique("lk-out"), unique("lk-dlq"), unique("lk-merchants"));
    create_topics(&[&input, &out, &dlq], 2).await;
    let state = tempfile::tempdir().unwrap();
    let mut cfg = pipeline(&input, &out, &dlq, &unique("lk-group"), state.path().to_str().unwrap());
    cfg.features.lookups.push(streamscore_crds::pipeline::LookupTable {
        name: "merchants".into(),
        topic: table.clone(),
        key: "merchant".into(),
        fields: vec!["tier".into()],
    });
    cfg.features.windows.push(streamscore_crds::pipeline::WindowFeature {
        name: "high_tier_1h".into(),
        aggregation: streamscore_crds::pipeline::Aggregation::Count,
        field: None,
        window: streamscore_crds::duration::Duration::from_secs(3600),
        resolution: None,
        filter: Some(streamscore_crds::pipeline::Filter {
            field: "lookups.merchants.tier".into(),
            one_of: vec!["high".into()],
        }),
    });
    cfg.postprocess.passthrough.push("lookups.merchants.tier".into());
    cfg.validate().unwrap();
    let p = producer();

    // 8 users × 10 events, one a minute, over merchants m0..m9.
    let base = now_ms() - 3_600_000;
    let ev = |user: usize, i: i64, merchant: usize| -> (String, Vec<u8>) {
        let u = format!("user-{user}");
        let v = json!({"user_id": u, "ts": base + i * 60_000 + user as i64, "amount": 1.0, "action": "view",
                       "merchant": format!("m{merchant}")});
        (u, v.to_string().into_bytes())
    };
    let first: Vec<_> =
        (0..10i64).flat_map(|i| (0..8).map(move |u| (u, i))).map(|(u, i)| ev(u, i, (u + i as usize) % 10)).collect();
    produce(&p, &input, &first).await;

    let w = start(&cfg);
    // The table topic does not exist: not ready, with the reason; nothing scored.
    let why = eventually(Duration::from_secs(20), "readiness naming the lookup table", || {
        let h = w.health.clone();
        async move { h.readiness().err().and_then(|w| w.into_iter().find(|r| r.contains("lookup tables"))) }
    })
    .await;
    assert!(why.contains(&table), "{why}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let early = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 1, Duration::from_secs(2))
    })
    .await
    .unwrap();
    assert!(early.is_empty(), "scored before the table was loaded: {:?}", early[0].json());

    // The compacted table, with rows overwritten before the worker reads them.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap();
    let topic = NewTopic::new(&table, 3, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    for r in admin.create_topics(&[topic], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    let row = |m: usize, tier: &str| (format!("m{m}"), json!({"tier": tier, "since": 2020}).to_string().into_bytes());
    let mut tiers: BTreeMap<String, String> = BTreeMap::new();
    let mut rows = Vec::new();
    for m in 0..10 {
        rows.push(row(m, "low"));
        tiers.insert(format!("m{m}"), "low".into());
    }
    for m in [0, 3, 4, 7] {
        rows.push(row(m, "high"));
        tiers.insert(format!("m{m}"), "high".into());
    }
    produce(&p, &table, &rows).await;

    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 80, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), 80, "{:?}", w.health.readiness());
    // The oracle: per user, events in (t − 1h, t] whose merchant's tier is high in the test's map.
    let check = |scored: &[streamscore_tests::Consumed],
                 tiers: &BTreeMap<String, String>,
                 history: &mut BTreeMap<String, Vec<(i64, bool)>>| {
        let mut vs: Vec<serde_json::Value> = scored.iter().map(|s| s.json()).collect();
        vs.sort_by_key(|v| v["eventTime"].as_i64().unwrap());
        for v in vs {
            let merchant = v["fields"]["merchant"].as_str().unwrap().to_owned();
            let tier = tiers.get(&merchant);
            assert_eq!(v["fields"]["lookups.merchants.tier"].as_str(), tier.map(String::as_str), "{v}");
            let t = v["eventTime"].as_i64().unwrap();
            let h = history.entry(v["key"].as_str().unwrap().to_owned()).or_default();
            h.push((t, tier.is_some_and(|x| x == "high")));
            let want = h.iter().filter(|(x, high)| *high && *x > t - 3_600_000 && *x <= t).count();
            assert_eq!(v["features"]["high_tier_1h"], json!(want as f64), "{v}");
        }
    };
    let mut history = BTreeMap::new();
    check(&scored, &tiers, &mut history);
    assert!(w.health.readiness().is_ok(), "{:?}", w.health.readiness());
    let metrics = w.metrics.encode();
    assert!(metrics.contains("streamscore_worker_lookup_rows{table=\"merchants\"} 10"), "{metrics}");
    assert!(metrics.contains("streamscore_worker_lookup_loaded{table=\"merchants\"} 1"), "{metrics}");

    // Updates and a deletion, then more events: they read the new rows.
    let updates = vec![row(1, "high"), row(0, "low"), (String::from("m5"), b"not json".to_vec())];
    tiers.insert("m1".into(), "high".into());
    tiers.insert("m0".into(), "low".into());
    produce(&p, &table, &updates).await;
    let tombstone = rdkafka::producer::FutureRecord::<str, [u8]>::to(&table).key("m9");
    p.send(tombstone, Duration::from_secs(10)).await.unwrap();
    tiers.remove("m9");
    eventually(Duration::from_secs(20), "the updates applied", || {
        let m = w.metrics.clone();
        async move { m.encode().contains("streamscore_worker_lookup_rows{table=\"merchants\"} 9").then_some(()) }
    })
    .await;
    let second: Vec<_> =
        (10..20i64).flat_map(|i| (0..8).map(move |u| (u, i))).map(|(u, i)| ev(u, i, (u + i as usize) % 10)).collect();
    produce(&p, &input, &second).await;
    let all = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 160, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(all.len(), 160);
    let later: Vec<_> =
        all.into_iter().filter(|s| s.json()["eventTime"].as_i64().unwrap() >= base + 10 * 60_000).collect();
    assert_eq!(later.len(), 80);
    check(&later, &tiers, &mut history);
    let metrics = w.metrics.encode();
    assert!(metrics.contains("streamscore_worker_lookup_records_rejected_total{table=\"merchants\"} 1"), "{metrics}");
    tokio::task::spawn_blocking(move || w.stop()).await.unwrap();
}
