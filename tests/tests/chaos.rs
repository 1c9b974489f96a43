//! The fault-injection suite. A steady input stream flows into the worker binary while faults
//! are injected: a crash at each step of a commit (`STREAMSCORE_CRASH_AT`, see the worker's
//! `fault` module), SIGKILLs at random moments, the state volume filling up (a tmpfs), a slow
//! downstream reader, and (long form) a broker outage. Then a verifier
//! reads the output and dead-letter topics back (read_committed) and counts, per input event:
//! lost (no output), duplicated (more than one), wrong (features differ from the values
//! recomputed here from the raw input with plain arithmetic).
//!
//! - Short form, in `make test`: each commit step once per delivery mode, and two SIGKILLs.
//! - Long form, `make chaos` (`cargo test --test chaos -- --ignored`, in its own environment):
//!   each commit step at three different commits, 20 SIGKILLs per mode, a 30 s broker outage.
//!
//! Every case proves its fault happened: a crash case checks that the worker died of its abort
//! at the named point; a kill case that each incarnation had consumed before it was killed; the
//! exactly-once cases that aborted records exist (read_uncommitted sees more than
//! read_committed); the outage that the worker said not ready while the broker was down; the
//! full volume that the worker said so, stayed alive with consumption paused past its stall
//! timeout, and after space returned was ready again and restarted from that volume; the slow
//! reader that it was more than 100 outputs behind when the worker had consumed everything. The
//! table goes to stderr and to `chaos-report.md` in the environment's directory.
//!
//! The operator's side (crashed at every step of a rescale and of a blue/green upgrade) needs
//! the control plane and the node agent: it is `e2e_local.rs`,
//! `an_operator_killed_at_every_step_of_a_rescale_and_an_upgrade_loses_and_duplicates_nothing`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::Rng;
use serde_json::json;
use streamscore_crds::pipeline::Delivery;
use streamscore_tests::{
    built_binary, consume, consume_with, create_topics, free_port, produce, producer, reference_pipeline, repo_root,
    unique, Consumed,
};

const USERS: i64 = 30;
const BASE: i64 = 1_795_700_000_000;

/// One event per user per minute of event time, and a malformed one every third minute.
struct Stream {
    events: Vec<(String, Vec<u8>)>,
    good: Vec<u64>,
    bad: Vec<u64>,
}

fn amount(i: i64) -> f64 {
    (i % 7 + 1) as f64
}

fn stream(minutes: i64) -> Stream {
    let (mut events, mut good, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..minutes {
        for u in 0..USERS {
            let id = (i * (USERS + 1) + u) as u64;
            let user = format!("chaos-{u}");
            let v = json!({"user_id": user, "ts": BASE + i * 60_000 + u, "amount": amount(i), "action": "view",
                           "merchant": "m", "id": id});
            events.push((user, v.to_string().into_bytes()));
            good.push(id);
        }
        if i % 3 == 0 {
            let id = (i * (USERS + 1) + USERS) as u64;
            let v = json!({"user_id": "chaos-bad", "ts": BASE + i * 60_000, "amount": "x", "action": "view", "id": id});
            events.push(("chaos-bad".to_owned(), v.to_string().into_bytes()));
            bad.push(id);
        }
    }
    Stream { events, good, bad }
}

#[derive(Debug, Default)]
struct Tally {
    lost: usize,
    duplicated: usize,
    wrong: usize,
}

/// Counts per input id; features checked against plain arithmetic on the stream's definition:
/// event i of a user at t = BASE + i·60 s + u has tx_1h = min(i + 1, 60) (1 h window, 1 min
/// buckets) and amount_24h = Σ_{j ≤ i} amount(j) (the stream is shorter than a day).
fn verify(s: &Stream, out: &[Consumed], dlq: &[Consumed]) -> (Tally, Tally) {
    let mut outputs = Tally::default();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for c in out {
        let v = c.json();
        let id = v["fields"]["id"].as_u64().expect("output carries the input id");
        *seen.entry(id).or_default() += 1;
        let (i, u) = ((id as i64) / (USERS + 1), (id as i64) % (USERS + 1));
        let want_tx = (i + 1).min(60) as f64;
        let want_amount: f64 = (0..=i).map(amount).sum();
        let ok = c.key == format!("chaos-{u}")
            && v["eventTime"].as_i64() == Some(BASE + i * 60_000 + u)
            && v["features"]["tx_1h"].as_f64() == Some(want_tx)
            && v["features"]["amount_24h"].as_f64().is_some_and(|a| (a - want_amount).abs() < 1e-6);
        if !ok {
            outputs.wrong += 1;
            if outputs.wrong <= 3 {
                eprintln!("wrong output for input {id} (want tx_1h {want_tx}, amount_24h {want_amount}): {v}");
            }
        }
    }
    for id in &s.good {
        match seen.get(id) {
            None => outputs.lost += 1,
            Some(n) => outputs.duplicated += n - 1,
        }
    }
    let mut dead = Tally::default();
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for c in dlq {
        let id = c.json()["id"].as_u64().expect("dead letter carries the original payload");
        *seen.entry(id).or_default() += 1;
    }
    for id in &s.bad {
        match seen.get(id) {
            None => dead.lost += 1,
            Some(n) => dead.duplicated += n - 1,
        }
    }
    dead.wrong = seen.keys().filter(|id| !s.bad.contains(id)).count();
    (outputs, dead)
}

#[derive(Clone, Debug)]
enum Fault {
    /// Crash at this commit step, at this hit.
    CrashAt(&'static str, u32),
    /// SIGKILL this many times, each after the incarnation consumed something.
    Kills(usize),
    /// Kill the broker, keep it down this long, start it again.
    BrokerOutage(Duration),
    /// Fill the worker's state volume (a 32 MiB tmpfs) mid-stream, keep it full this long,
    /// free it, then SIGKILL the worker once and restart it on that volume.
    DiskFull(Duration),
    /// The verifier reads the output while the stream flows, slowly (read_committed, 2 ms per
    /// record and 2 s every 200 records): a downstream reader far behind the worker.
    SlowReader,
}

impl Fault {
    fn name(&self) -> String {
        match self {
            Fault::CrashAt(p, n) => format!("crash at {p} (commit {n})"),
            Fault::Kills(n) => format!("SIGKILL ×{n} at random moments"),
            Fault::BrokerOutage(d) => format!("broker killed for {} s", d.as_secs()),
            Fault::DiskFull(d) => format!("state volume full for {} s", d.as_secs()),
            Fault::SlowReader => "slow downstream reader".to_owned(),
        }
    }
}

struct Row {
    fault: String,
    delivery: Delivery,
    events: usize,
    outputs: Tally,
    dead: Tally,
    evidence: String,
    took: Duration,
}

struct Worker {
    file: PathBuf,
    pod: String,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Worker {
    fn start(&mut self, crash_at: Option<String>) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let mut cmd = Command::new(built_binary("streamscore-worker"));
        cmd.args(["--pipeline", self.file.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .env("STREAMSCORE_POD_NAME", &self.pod)
            .env_remove("STREAMSCORE_CRASH_AT")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(c) = crash_at {
            cmd.env("STREAMSCORE_CRASH_AT", c);
        }
        self.child = Some(cmd.spawn().expect("worker binary starts"));
    }

    async fn metric(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        let Ok(r) = reqwest::get(url).await else { return 0.0 };
        let Ok(text) = r.text().await else { return 0.0 };
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until this incarnation has consumed something (at most 60 s).
    async fn wait_consuming(&self) -> bool {
        self.wait_consumed(1.0).await
    }

    /// Waits until this incarnation has consumed `n` records (at most 60 s).
    async fn wait_consumed(&self, n: f64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.metric("streamscore_worker_records_in_total").await >= n {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    fn kill(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = c.kill();
        c.wait().unwrap()
    }

    /// Waits for the process to exit by itself (at most `timeout`).
    fn exited(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A small tmpfs (needs root, as the suite runs here): the state volume of the disk-full case.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: PathBuf, size: &str) -> Self {
        std::fs::create_dir_all(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "mounting a {size} tmpfs at {} for the disk-full case (the suite needs root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path)
    }

    /// Writes a file until the volume is full; returns its path and size.
    fn fill(&self) -> (PathBuf, u64) {
        let path = self.0.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut written = 0u64;
        for chunk in [1 << 20, 4096, 1] {
            let buf = vec![0u8; chunk];
            while f.write_all(&buf).is_ok() {
                written += chunk as u64;
            }
        }
        let _ = f.sync_all();
        (path, written)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Reads `topic` slowly (read_committed) until it holds `want` distinct input ids and then
/// 3 s more with nothing new (at most `timeout`). Returns what it read and how many records it
/// had read at `mark` (set by the caller when the worker had consumed every input).
fn slow_read(
    topic: &str,
    want: usize,
    timeout: Duration,
    mark: &std::sync::atomic::AtomicBool,
) -> (Vec<Consumed>, Option<usize>) {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::sync::atomic::Ordering;
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", streamscore_tests::bootstrap())
        .set("group.id", unique("slow-reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let deadline = Instant::now() + timeout;
    let (mut out, mut ids, mut at_mark) = (Vec::new(), std::collections::BTreeSet::new(), None);
    let mut last_new = Instant::now();
    while Instant::now() < deadline && (ids.len() < want || last_new.elapsed() < Duration::from_secs(3)) {
        if at_mark.is_none() && mark.load(Ordering::Relaxed) {
            at_mark = Some(out.len());
        }
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let m = Consumed::from_message(&m);
            if let Some(id) = m.json()["fields"]["id"].as_u64() {
                ids.insert(id);
            }
            out.push(m);
            last_new = Instant::now();
            std::thread::sleep(Duration::from_millis(2));
            if out.len() % 200 == 0 {
                std::thread::sleep(Duration::from_secs(2));
            }
        }
    }
    (out, at_mark)
}

fn env_sh(cmd: &str) {
    let st = Command::new("bash").arg(repo_root().join("scripts/env.sh")).arg(cmd).status().unwrap();
    assert!(st.success(), "scripts/env.sh {cmd} failed");
}

/// Runs one case end to end: topics, the worker, the stream, the fault, the verifier.
/// The stream has `minutes` of event time (31 events each) and is sent 60 events every `pace`.
async fn run_case(delivery: Delivery, fault: Fault, minutes: i64, pace: Duration) -> Row {
    let started = Instant::now();
    let tag = match delivery {
        Delivery::ExactlyOnce => "eos",
        Delivery::AtLeastOnce => "alo",
    };
    let (input, out, dlq) = (unique(&format!("ch-{tag}-in")), unique("ch-out"), unique("ch-dlq"));
    create_topics(&[&input, &out, &dlq], 4).await;
    let dir = tempfile::tempdir().unwrap();
    // The disk-full case keeps its state on a volume of its own, small enough to fill.
    let volume = matches!(fault, Fault::DiskFull(_)).then(|| Tmpfs::mount(dir.path().join("volume"), "32m"));
    let state_dir = volume.as_ref().map_or_else(|| dir.path().join("state"), |v| v.0.join("state"));
    let mut cfg = reference_pipeline(&input, &out, &dlq, &unique("ch-group"), state_dir.to_str().unwrap());
    cfg.postprocess.passthrough.push("id".into());
    if matches!(fault, Fault::DiskFull(_)) {
        // Short, so that a wait for space counted as a stall would fail liveness during the case.
        cfg.runtime.stall_timeout = streamscore_crds::Duration::from_millis(2_000);
    }
    cfg.sink.delivery = delivery;
    cfg.runtime.commit_interval = streamscore_crds::Duration::from_millis(300);
    let port = free_port();
    cfg.runtime.http_listen = format!("127.0.0.1:{port}");
    cfg.validate().unwrap();
    let file = dir.path().join("pipeline.yaml");
    std::fs::write(&file, serde_yaml::to_string(&cfg).unwrap()).unwrap();
    let mut w = Worker { file, pod: unique("chaos-pod"), port, log: dir.path().join("worker.log"), child: None };
    let s = stream(minutes);
    let total = s.events.len();
    // A steady stream (60 events every `pace`); the outage case sends its second half afterwards.
    let (first, second): (Vec<_>, Vec<_>) = match fault {
        Fault::BrokerOutage(_) => {
            let half = s.events.len() / 2;
            (s.events[..half].to_vec(), s.events[half..].to_vec())
        }
        _ => (s.events.clone(), Vec::new()),
    };
    let producing = tokio::spawn({
        let input = input.clone();
        async move {
            let p = producer();
            for chunk in first.chunks(60) {
                produce(&p, &input, chunk).await;
                tokio::time::sleep(pace).await;
            }
        }
    });
    let mut evidence = Vec::new();
    let consumed_all = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = matches!(fault, Fault::SlowReader).then(|| {
        let (out, want, mark) = (out.clone(), s.good.len(), consumed_all.clone());
        std::thread::spawn(move || slow_read(&out, want, Duration::from_secs(240), &mark))
    });
    match fault.clone() {
        Fault::CrashAt(point, hit) => {
            w.start(Some(format!("{point}:{hit}")));
            let st = tokio::task::block_in_place(|| w.exited(Duration::from_secs(90)))
                .unwrap_or_else(|| panic!("the worker did not crash at {point} within 90 s"));
            let log = std::fs::read_to_string(&w.log).unwrap();
            assert_eq!(st.signal(), Some(6), "the worker died of its abort: {st:?}\n{log}");
            assert!(log.contains(&format!("fault injection: crashing at {point}")), "{log}");
            evidence.push(format!("aborted at {point}"));
            let before = tokio::task::spawn_blocking({
                let out = out.clone();
                move || consume(&out, usize::MAX, Duration::from_secs(2)).len()
            })
            .await
            .unwrap();
            evidence.push(format!("{before} committed outputs before"));
            w.start(None);
            if delivery == Delivery::ExactlyOnce && point != "transaction-commit" {
                // The transaction was committed and its state not written: the restarted
                // worker must restore that state from the input without writing outputs.
                let deadline = Instant::now() + Duration::from_secs(60);
                let replayed = loop {
                    let r = w.metric("streamscore_worker_replayed_records_total").await;
                    if r > 0.0 || Instant::now() > deadline {
                        break r;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                assert!(replayed > 0.0, "the restarted worker replayed the committed epoch without outputs");
                evidence.push(format!("{replayed} inputs replayed without output"));
            }
        }
        Fault::Kills(n) => {
            let mut rng = rand::thread_rng();
            for _ in 0..n {
                w.start(None);
                assert!(w.wait_consuming().await, "an incarnation never consumed");
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..700))).await;
                let st = w.kill();
                assert_eq!(st.signal(), Some(9), "{st:?}");
            }
            evidence.push(format!("{n} kills, each after consuming"));
            w.start(None);
        }
        Fault::BrokerOutage(d) => {
            w.start(None);
            // Mid-stream: half of what is being sent before the outage is in.
            assert!(w.wait_consumed((total / 4) as f64).await, "the worker never consumed");
            producing.abort();
            env_sh("kafka-kill");
            let down = Instant::now();
            let mut said = String::new();
            let mut exits = 0;
            // As the kubelet would: a worker that exits is started again. (exactlyOnce exits
            // once its records cannot be delivered within the transaction timeout; atLeastOnce
            // waits for the broker.)
            let supervise = |w: &mut Worker, exits: &mut usize| {
                if let Some(st) = w.child.as_mut().unwrap().try_wait().unwrap() {
                    assert_ne!(st.signal(), Some(6), "the worker crashed: {st:?}");
                    *exits += 1;
                    w.child = None;
                    w.start(None);
                }
            };
            while down.elapsed() < d {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
                    if !r.status().is_success() {
                        said = r.text().await.unwrap_or_default();
                    }
                }
                supervise(&mut w, &mut exits);
            }
            env_sh("kafka-start");
            assert!(
                !said.is_empty(),
                "the worker said not ready while the broker was down; its log:\n{}",
                std::fs::read_to_string(&w.log).unwrap_or_default()
            );
            evidence.push(format!("not ready while down: {}", said.trim().chars().take(60).collect::<String>()));
            evidence.push(format!("{exits} worker exits during the outage"));
            supervise(&mut w, &mut exits);
            // The producer was stopped mid-stream: send what it may not have (duplicated
            // inputs would show as duplicated outputs, so send only the second half and what
            // the topic does not hold yet).
            let have: std::collections::BTreeSet<u64> = tokio::task::spawn_blocking({
                let input = input.clone();
                move || {
                    consume(&input, usize::MAX, Duration::from_secs(4))
                        .iter()
                        .map(|c| c.json()["id"].as_u64().unwrap())
                        .collect()
                }
            })
            .await
            .unwrap();
            let missing: Vec<_> = s
                .events
                .iter()
                .filter(|(_, v)| {
                    let id = serde_json::from_slice::<serde_json::Value>(v).unwrap()["id"].as_u64().unwrap();
                    !have.contains(&id)
                })
                .cloned()
                .collect();
            evidence.push(format!("{} inputs sent after the outage", missing.len()));
            let _ = second;
            produce(&producer(), &input, &missing).await;
        }
        Fault::DiskFull(hold) => {
            let volume = volume.as_ref().unwrap();
            let readyz = || async {
                let r = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.ok()?;
                Some((r.status().is_success(), r.text().await.unwrap_or_default()))
            };
            w.start(None);
            assert!(w.wait_consumed((total / 5) as f64).await, "the worker never consumed");
            let (filler, size) = volume.fill();
            let full_at = Instant::now();
            let said = loop {
                if let Some((false, text)) = readyz().await {
                    if text.contains("state volume full") {
                        break text;
                    }
                }
                assert!(full_at.elapsed() < Duration::from_secs(30), "the worker never said its state volume is full");
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            assert!(said.contains("No space left on device"), "{said}");
            evidence.push(format!("volume filled ({} MiB); /readyz: state volume full, No space left", size >> 20));
            assert_eq!(w.metric("streamscore_worker_state_volume_full").await, 1.0);
            // Held full: alive (past the 2 s stall timeout), consumption paused, still running.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let consumed_then = w.metric("streamscore_worker_records_in_total").await;
            while full_at.elapsed() < hold {
                let r = reqwest::get(format!("http://127.0.0.1:{port}/healthz")).await.unwrap();
                assert!(
                    r.status().is_success(),
                    "liveness failed while waiting for space: {}",
                    r.text().await.unwrap()
                );
                assert!(w.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the worker exited on a full volume");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let consumed_after = w.metric("streamscore_worker_records_in_total").await;
            assert_eq!(consumed_then, consumed_after, "consumption went on while the state could not be written");
            evidence.push(format!("alive and paused for {} s", hold.as_secs()));
            std::fs::remove_file(&filler).unwrap();
            let freed = Instant::now();
            while !matches!(readyz().await, Some((true, _))) {
                if freed.elapsed() > Duration::from_secs(60) {
                    let rocks = std::fs::read_to_string(state_dir.join("partition-0/LOG")).unwrap_or_default();
                    let rocks: Vec<&str> =
                        rocks.lines().filter(|l| l.contains("rror") || l.contains("ecover")).collect();
                    panic!(
                        "not ready 60 s after space returned: {:?}\nworker log:\n{}\nRocksDB log (errors):\n{}",
                        readyz().await,
                        std::fs::read_to_string(&w.log).unwrap_or_default(),
                        rocks.join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            evidence.push(format!("ready {:.0} s after space returned", freed.elapsed().as_secs_f64()));
            // The state written on that volume is whole: a restart reads it back and scores on.
            assert!(w.wait_consumed(consumed_after + 200.0).await, "consumption did not resume");
            let st = w.kill();
            assert_eq!(st.signal(), Some(9), "{st:?}");
            w.start(None);
            assert!(w.wait_consuming().await, "the restarted worker never consumed");
            evidence.push("then SIGKILLed and restarted on that volume".to_owned());
        }
        Fault::SlowReader => w.start(None),
    }
    if !producing.is_finished() {
        let _ = producing.await;
    }
    let mut slow_read = None;
    if let Some(reader) = reader {
        assert!(w.wait_consumed(total as f64).await, "the worker did not consume every input");
        consumed_all.store(true, std::sync::atomic::Ordering::Relaxed);
        let done = Instant::now();
        let (read, at_mark) = tokio::task::block_in_place(|| reader.join().unwrap());
        let behind = s.good.len().saturating_sub(at_mark.unwrap_or(0));
        assert!(behind > 100, "the reader was not behind the worker ({behind} outputs)");
        evidence.push(format!(
            "reader {behind} outputs behind when the worker had consumed all; done {:.0} s later",
            done.elapsed().as_secs_f64()
        ));
        slow_read = Some(read);
    }
    let want = s.good.len();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut late_exits = 0;
    let all = if let Some(read) = slow_read {
        // The slow reader's records are the ones verified.
        read
    } else {
        loop {
            // Ask for more than expected: duplicates would show.
            let got = tokio::task::spawn_blocking({
                let out = out.clone();
                move || consume(&out, usize::MAX, Duration::from_secs(4))
            })
            .await
            .unwrap();
            let ids: std::collections::BTreeSet<u64> =
                got.iter().filter_map(|c| c.json()["fields"]["id"].as_u64()).collect();
            if ids.len() >= want || Instant::now() > deadline {
                break got;
            }
            // As the kubelet would, start a worker that exited again (and count it).
            if let Some(st) = w.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("the worker exited ({st:?}) while the outputs were awaited; starting it again");
                late_exits += 1;
                w.child = None;
                w.start(None);
            }
        }
    };
    if late_exits > 0 {
        evidence.push(format!("{late_exits} exits afterwards"));
    }
    assert!(
        late_exits == 0 || matches!(fault, Fault::BrokerOutage(_)),
        "{}: the worker exited by itself: {}",
        fault.name(),
        std::fs::read_to_string(&w.log).unwrap_or_default()
    );
    let (dead, uncommitted) = tokio::task::spawn_blocking({
        let (out, dlq) = (out.clone(), dlq.clone());
        move || {
            let dead = consume(&dlq, usize::MAX, Duration::from_secs(3));
            (dead, consume_with(&out, usize::MAX, Duration::from_secs(3), "read_uncommitted").len())
        }
    })
    .await
    .unwrap();
    let (outputs, dead_tally) = verify(&s, &all, &dead);
    // A crash after the commit of a transaction cuts none (the next may be empty).
    let cuts_one = matches!(fault, Fault::Kills(_) | Fault::BrokerOutage(_))
        || matches!(fault, Fault::CrashAt(p, _) if p == "transaction-commit");
    if delivery == Delivery::ExactlyOnce && cuts_one {
        evidence.push(format!("{} aborted records", uncommitted.saturating_sub(all.len())));
        assert!(uncommitted > all.len(), "{}: no aborted transaction: the fault did not cut one", fault.name());
    }
    drop(w);
    let row = Row {
        fault: fault.name(),
        delivery,
        events: total,
        outputs,
        dead: dead_tally,
        evidence: evidence.join("; "),
        took: started.elapsed(),
    };
    eprintln!("{}", line(&row));
    row
}

fn line(r: &Row) -> String {
    format!(
        "| {} | {:?} | {} | {} | {} | {} | {} / {} | {} | {:.0} s |",
        r.fault,
        r.delivery,
        r.events,
        r.outputs.lost,
        r.outputs.duplicated,
        r.outputs.wrong,
        r.dead.lost,
        r.dead.duplicated,
        r.evidence,
        r.took.as_secs_f64()
    )
}

fn report(rows: &[Row], title: &str) {
    let mut text = format!(
        "## {title}\n\n| fault | delivery | inputs | lost | duplicated | wrong | dead letters lost / duplicated | \
         evidence the fault happened | took |\n|---|---|---|---|---|---|---|---|---|\n"
    );
    for r in rows {
        text.push_str(&line(r));
        text.push('\n');
    }
    eprintln!("{text}");
    let dir = std::env::var("STREAMSCORE_DEV_DIR").map_or_else(|_| std::env::temp_dir(), PathBuf::from);
    let path = Path::new(&dir).join("chaos-report.md");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    eprintln!("report appended to {}", path.display());
}

/// The goals: exactly-once loses, duplicates and miscomputes nothing; at-least-once loses and
/// miscomputes nothing (its duplicates are counted, not judged).
fn judge(rows: &[Row]) {
    for r in rows {
        assert_eq!((r.outputs.lost, r.outputs.wrong, r.dead.lost, r.dead.wrong), (0, 0, 0, 0), "{}", line(r));
        if r.delivery == Delivery::ExactlyOnce {
            assert_eq!((r.outputs.duplicated, r.dead.duplicated), (0, 0), "{}", line(r));
        }
    }
}

/// ~1,200 events/s.
const FAST: Duration = Duration::from_millis(50);

fn commit_steps(delivery: Delivery) -> &'static [&'static str] {
    match delivery {
        Delivery::ExactlyOnce => &["transaction-commit", "after-transaction-commit", "state-write"],
        Delivery::AtLeastOnce => &["state-write", "offset-commit"],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_every_commit_step_and_kills_lose_nothing() {
    let mut rows = Vec::new();
    for delivery in [Delivery::ExactlyOnce, Delivery::AtLeastOnce] {
        for point in commit_steps(delivery) {
            rows.push(run_case(delivery, Fault::CrashAt(point, 3), 60, FAST).await);
        }
        rows.push(run_case(delivery, Fault::Kills(2), 60, FAST).await);
        // 9,300 events over ~16 s: the volume fills a fifth of the way in, for 8 s.
        rows.push(run_case(delivery, Fault::DiskFull(Duration::from_secs(8)), 300, Duration::from_millis(100)).await);
        rows.push(run_case(delivery, Fault::SlowReader, 60, FAST).await);
    }
    report(&rows, "Fault-injection suite, short form (make test)");
    judge(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long form: make chaos (kills the broker)"]
async fn chaos_long() {
    let mut rows = Vec::new();
    for delivery in [Delivery::ExactlyOnce, Delivery::AtLeastOnce] {
        for point in commit_steps(delivery) {
            for hit in [2, 5, 9] {
                rows.push(run_case(delivery, Fault::CrashAt(point, hit), 120, FAST).await);
            }
        }
        // ~180 s of input at 240 events/s: the stream outlasts the 20 kills (~7 s each).
        rows.push(run_case(delivery, Fault::Kills(20), 1400, Duration::from_millis(250)).await);
        rows.push(run_case(delivery, Fault::BrokerOutage(Duration::from_secs(30)), 120, FAST).await);
        rows.push(run_case(delivery, Fault::DiskFull(Duration::from_secs(30)), 600, Duration::from_millis(100)).await);
        rows.push(run_case(delivery, Fault::SlowReader, 300, FAST).await);
    }
    report(&rows, "Fault-injection suite, long form (make chaos)");
    judge(&rows);
}

/// The broker outage alone, both modes (part of the long form; kills the environment's broker).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills the broker: make chaos runs it as part of chaos_long"]
async fn chaos_broker_outage() {
    let mut rows = Vec::new();
    let modes = match std::env::var("CHAOS_DELIVERY").as_deref() {
        Ok("atLeastOnce") => vec![Delivery::AtLeastOnce],
        Ok("exactlyOnce") => vec![Delivery::ExactlyOnce],
        _ => vec![Delivery::ExactlyOnce, Delivery::AtLeastOnce],
    };
    for delivery in modes {
        rows.push(run_case(delivery, Fault::BrokerOutage(Duration::from_secs(30)), 120, FAST).await);
    }
    report(&rows, "Fault-injection suite: broker outage");
    judge(&rows);
}

/// One fault on its own, for working on it: `CHAOS_FAULT=disk-full|slow-reader|kills`,
/// optionally `CHAOS_DELIVERY=atLeastOnce|exactlyOnce` and `CHAOS_FORM=long` (the long form's
/// parameters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "for working on one fault: CHAOS_FAULT=..."]
async fn chaos_one() {
    let modes = match std::env::var("CHAOS_DELIVERY").as_deref() {
        Ok("atLeastOnce") => vec![Delivery::AtLeastOnce],
        Ok("exactlyOnce") => vec![Delivery::ExactlyOnce],
        _ => vec![Delivery::ExactlyOnce, Delivery::AtLeastOnce],
    };
    let fault = std::env::var("CHAOS_FAULT").unwrap_or_default();
    let long = std::env::var("CHAOS_FORM").as_deref() == Ok("long");
    let mut rows = Vec::new();
    for delivery in modes {
        rows.push(match (fault.as_str(), long) {
            ("disk-full", false) => {
                run_case(delivery, Fault::DiskFull(Duration::from_secs(8)), 300, Duration::from_millis(100)).await
            }
            ("disk-full", true) => {
                run_case(delivery, Fault::DiskFull(Duration::from_secs(30)), 600, Duration::from_millis(100)).await
            }
            ("slow-reader", false) => run_case(delivery, Fault::SlowReader, 60, FAST).await,
            ("slow-reader", true) => run_case(delivery, Fault::SlowReader, 300, FAST).await,
            ("kills", _) => run_case(delivery, Fault::Kills(2), 60, FAST).await,
            (other, _) => panic!("CHAOS_FAULT={other:?}: disk-full, slow-reader or kills"),
        });
    }
    report(&rows, &format!("Fault-injection suite: {fault}"));
    judge(&rows);
}
