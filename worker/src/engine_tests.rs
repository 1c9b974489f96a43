//! Engine tests with the real RocksDB store (temp dir) and the real models of `models/`: what
//! hostile records turn into. Every expectation is written out here, not derived from the code.

use std::path::PathBuf;

use serde_json::json;

use super::*;
use crate::state::StoreEnv;

/// The engine's clock in these tests: 2026-11-30T00:53:20Z.
const NOW: i64 = 1_796_000_000_000;
const MIN: i64 = 60_000;
/// 2199-01-01T00:00:00Z.
const YEAR_2199: i64 = 7_226_582_400_000;

fn models() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models")
}

fn config(model: &str) -> PipelineConfig {
    let reference: Value =
        serde_json::from_slice(&std::fs::read(models().join(format!("{model}.reference.json"))).unwrap()).unwrap();
    let yaml = format!(
        r#"
source:
  bootstrapServers: "k:9092"
  topics: [in]
  keyField: user_id
  eventTime: {{field: ts, format: epochMillis}}
  maxOutOfOrderness: 5s
validation:
  fields: [{{name: amount, type: number}}, {{name: action, type: string}}]
features:
  windows:
    - {{name: tx_1h, aggregation: count, window: 1h}}
    - {{name: amount_24h, aggregation: sum, field: amount, window: 24h}}
    - {{name: rides_1h, aggregation: count, window: 1h, filter: {{field: action, oneOf: [ride_requested]}}}}
  sequences:
    - {{name: last_actions, field: action, length: 4, lookback: 90d}}
model:
  path: "{path}"
  sha256: "{sha}"
  version: v1
  features: [tx_1h, amount_24h, rides_1h, event.amount]
  outputs: [{{name: fraud}}]
postprocess:
  labels: [{{label: review, minScore: 0.5}}, {{label: block, minScore: 0.9}}]
  passthrough: [merchant]
sink: {{topic: out, deadLetterTopic: dlq}}
"#,
        path = models().join(format!("{model}.onnx")).display(),
        sha = reference["sha256"].as_str().unwrap(),
    );
    let cfg = PipelineConfig::from_yaml(&yaml).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// An engine for `cfg` on stores under `dir` with the test clock, no partition opened.
fn bare_engine(cfg: PipelineConfig, dir: &std::path::Path, metrics: Arc<Metrics>) -> Engine {
    let model = Arc::new(Model::load(&cfg.model).unwrap());
    Engine::new(Arc::new(cfg), model, StoreEnv::new(dir, 8 << 20, 10_000), metrics).with_clock(|| NOW)
}

struct Harness {
    engine: Engine,
    metrics: Arc<Metrics>,
    offset: i64,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn new(cfg: PipelineConfig) -> Self {
        Self::open(cfg, tempfile::tempdir().unwrap(), 0, NOW)
    }

    fn open(cfg: PipelineConfig, dir: tempfile::TempDir, offset: i64, now: i64) -> Self {
        let model = Arc::new(Model::load(&cfg.model).unwrap());
        let metrics = Arc::new(Metrics::new());
        let mut engine = Engine::new(Arc::new(cfg), model, StoreEnv::new(dir.path(), 8 << 20, 10_000), metrics.clone())
            .with_clock(move || now);
        engine.assign(0).unwrap();
        Self { engine, metrics, offset, _dir: dir }
    }

    /// Makes the state durable, stops, starts again on the same state with clock `now`.
    fn restart(mut self, cfg: PipelineConfig, now: i64) -> Self {
        self.engine.flush().unwrap();
        let Self { engine, offset, _dir: dir, .. } = self;
        drop(engine);
        Self::open(cfg, dir, offset, now)
    }

    /// Processes one batch of (Kafka key, value) records of partition 0.
    fn run(&mut self, records: &[(&[u8], Vec<u8>)]) -> Vec<OutRecord> {
        let batch: Vec<InRecord<'_>> = records
            .iter()
            .map(|(key, payload)| {
                self.offset += 1;
                InRecord {
                    topic: "in",
                    partition: 0,
                    offset: self.offset,
                    key: Some(key),
                    payload: Some(payload),
                    received: Instant::now(),
                    timestamp: None,
                }
            })
            .collect();
        self.engine.process(&batch).unwrap()
    }

    /// `run` of events of user `u`.
    fn events(&mut self, events: &[Value]) -> Vec<OutRecord> {
        let records: Vec<(&[u8], Vec<u8>)> = events.iter().map(|e| (&b"u"[..], e.to_string().into_bytes())).collect();
        self.run(&records)
    }
}

fn event(ts: i64, amount: f64, action: &str) -> Value {
    json!({"user_id": "u", "ts": ts, "amount": amount, "action": action, "merchant": "m1"})
}

fn header<'h>(headers: &'h [(&'static str, String)], name: &str) -> Option<&'h str> {
    headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
}

/// The input offset an output belongs to (dead letters of a batch come before its scored
/// records, so tests compare in offset order).
fn offset(o: &OutRecord) -> i64 {
    match o {
        OutRecord::Scored { value, .. } => serde_json::from_slice::<Value>(value).unwrap()["offset"].as_i64().unwrap(),
        OutRecord::DeadLetter { headers, .. } => header(headers, "streamscore.source.offset").unwrap().parse().unwrap(),
        OutRecord::Feature { .. } => i64::MAX,
    }
}

/// The outputs in input order.
fn sorted(mut out: Vec<OutRecord>) -> Vec<OutRecord> {
    out.sort_by_key(offset);
    out
}

/// `scored` or `dead:<reason>` per output, in input order.
fn outcomes(out: &[OutRecord]) -> Vec<String> {
    let mut out: Vec<&OutRecord> = out.iter().collect();
    out.sort_by_key(|o| offset(o));
    out.into_iter()
        .map(|o| match o {
            OutRecord::Scored { .. } => "scored".to_owned(),
            OutRecord::DeadLetter { headers, .. } => format!("dead:{}", header(headers, "streamscore.reason").unwrap()),
            OutRecord::Feature { .. } => "feature".to_owned(),
        })
        .collect()
}

fn scored_json(o: &OutRecord) -> Value {
    match o {
        OutRecord::Scored { value, .. } => serde_json::from_slice(value).unwrap(),
        other => panic!("not scored: {other:?}"),
    }
}

fn record_size(o: &OutRecord) -> usize {
    match o {
        OutRecord::Scored { key, value, .. } | OutRecord::Feature { key, value, .. } => {
            wire_size(key.len(), value.len(), &[])
        }
        OutRecord::DeadLetter { key, value, headers, .. } => {
            wire_size(key.as_ref().map_or(0, Vec::len), value.len(), headers)
        }
    }
}

#[test]
fn an_event_dated_2199_is_dead_lettered_and_leaves_the_watermark_alone() {
    let mut h = Harness::new(config("fraud-logreg"));
    let future = event(YEAR_2199, 5.0, "view");
    let out = sorted(h.events(&[
        event(NOW - 10 * MIN, 5.0, "view"),
        future.clone(),
        event(NOW - 9 * MIN, 5.0, "view"),
        // Within maxFutureSkew (1h) of the clock: accepted.
        event(NOW + 59 * MIN, 5.0, "view"),
        // Just beyond it.
        event(NOW + 61 * MIN, 5.0, "view"),
    ]));
    assert_eq!(outcomes(&out), ["scored", "dead:future_event_time", "scored", "scored", "dead:future_event_time"]);
    let OutRecord::DeadLetter { value, headers, .. } = &out[1] else { unreachable!() };
    assert_eq!(*value, future.to_string().into_bytes(), "original bytes");
    assert!(header(headers, "streamscore.detail").unwrap().contains("2199-01-01"), "{headers:?}");
    // The 2199 event counted nowhere: the second event sees itself and the first one only.
    assert_eq!(scored_json(&out[2])["features"]["tx_1h"], json!(2.0));
    assert_eq!(scored_json(&out[3])["features"]["tx_1h"], json!(1.0), "69 minutes later: only itself");
    // The watermark is NOW + 59 min − 5 s (maxOutOfOrderness), not anywhere near 2199.
    let out = h.events(&[event(NOW + 59 * MIN - 4_000, 1.0, "view"), event(NOW + 59 * MIN - 6_000, 1.0, "view")]);
    assert_eq!(outcomes(&out), ["scored", "dead:late"]);
}

#[test]
fn with_late_events_drop_a_late_event_is_counted_has_no_output_and_changes_no_state() {
    let mut cfg = config("fraud-logreg");
    cfg.source.late_events = streamscore_crds::pipeline::LatePolicy::Drop;
    let mut h = Harness::new(cfg);
    // 10 minutes ahead, then one 9 minutes older than it: beyond the 5 s of out-of-orderness.
    let out = sorted(h.events(&[
        event(NOW - 20 * MIN, 5.0, "view"),
        event(NOW - 10 * MIN, 5.0, "view"),
        event(NOW - 19 * MIN, 7.0, "ride_requested"),
        event(NOW - 9 * MIN, 5.0, "view"),
    ]));
    assert_eq!(outcomes(&out), ["scored", "scored", "scored"], "no output, no dead letter for the late one");
    assert_eq!(h.metrics.late_dropped.get(), 1);
    let last = scored_json(&out[2]);
    // Independent expectation: the two on-time events before it and itself, the late one not.
    assert_eq!(last["features"]["tx_1h"], json!(3.0));
    assert_eq!(last["features"]["amount_24h"], json!(15.0));
    assert_eq!(last["features"]["rides_1h"], json!(0.0));
    assert_eq!(last["features"]["last_actions"], json!(["view", "view", "view"]));
}

#[test]
fn a_record_over_the_producer_limit_becomes_one_dead_letter_that_fits() {
    let mut h = Harness::new(config("fraud-logreg"));
    // 1.2 MB, valid JSON: over maxRecordBytes (960 KiB) and over message.max.bytes (1000000).
    let mut big = event(NOW - MIN, 5.0, "view");
    big["blob"] = json!("x".repeat(1_200_000 - big.to_string().len() - 10));
    let big = big.to_string().into_bytes();
    assert_eq!(big.len(), 1_200_000);
    let out = sorted(h.run(&[(b"u", big.clone()), (b"u", event(NOW, 5.0, "view").to_string().into_bytes())]));
    assert_eq!(outcomes(&out), ["dead:oversized", "scored"]);
    let OutRecord::DeadLetter { key, value, headers, origin } = &out[0] else { unreachable!() };
    assert_eq!(key.as_deref(), Some(&b"u"[..]));
    let offset: i64 = header(headers, "streamscore.source.offset").unwrap().parse().unwrap();
    assert_eq!((origin.partition, origin.offset), (0, offset), "a dead letter is routed by its input");
    assert_eq!(out[1].origin().offset, offset + 1);
    assert_eq!(header(headers, "streamscore.truncated.value"), Some("1200000"));
    assert_eq!(header(headers, "streamscore.truncated.key"), None);
    assert!(big.starts_with(value), "a prefix of the original bytes");
    // Cut to exactly what librdkafka accepts: 36 bytes of record framing, 10 per header.
    let headers_bytes: usize = headers.iter().map(|(k, v)| 10 + k.len() + v.len()).sum();
    assert_eq!(value.len(), 1_000_000 - 36 - 1 - headers_bytes);
    assert_eq!(record_size(&out[0]), 1_000_000);
}

#[test]
fn dead_letters_are_cut_only_when_they_would_not_fit() {
    let headers = || vec![("streamscore.reason", "oversized".to_owned())];
    // Fits: untouched, no truncation header; an empty key stays an empty key.
    let small = fit_dead_letter(Some(b""), b"hello", headers(), 1_000);
    assert_eq!(
        small,
        OutRecord::DeadLetter {
            origin: Origin::default(),
            key: Some(vec![]),
            value: b"hello".to_vec(),
            headers: headers()
        }
    );
    let exact = fit_dead_letter(None, &[b'v'; 1_000 - 36 - 10 - 18 - 9], headers(), 1_000);
    assert!(matches!(&exact, OutRecord::DeadLetter { headers, .. } if headers.len() == 1), "{exact:?}");
    // A 5000-byte key and a 2 MB value: the key is cut to 1024 bytes, the value to the rest.
    let key = vec![b'k'; 5_000];
    let value = vec![b'v'; 2_000_000];
    let OutRecord::DeadLetter { key: k, value: v, headers: hs, .. } =
        fit_dead_letter(Some(&key), &value, headers(), 100_000)
    else {
        unreachable!()
    };
    assert_eq!(k.as_deref(), Some(&key[..1024]));
    assert_eq!(header(&hs, "streamscore.truncated.key"), Some("5000"));
    assert_eq!(header(&hs, "streamscore.truncated.value"), Some("2000000"));
    // framing 36 + key 1024 + headers (10+18+9, 10+25+4, 10+27+7) = 1180
    assert_eq!(v.len(), 100_000 - 1_180);
    // A long key alone is kept when the record fits.
    let OutRecord::DeadLetter { key: k, headers: hs, .. } = fit_dead_letter(Some(&key), b"v", headers(), 100_000)
    else {
        unreachable!()
    };
    assert_eq!(k.map(|k| k.len()), Some(5_000));
    assert_eq!(hs.len(), 1);
}

#[test]
fn an_output_over_the_limit_is_dead_lettered_as_output_too_large() {
    let mut cfg = config("fraud-logreg");
    cfg.sink.properties.insert("message.max.bytes".into(), "100000".into());
    cfg.source.max_record_bytes = 80_000;
    cfg.validate().unwrap();
    let mut h = Harness::new(cfg);
    // Each output repeats the last 4 actions: 30 kB each, so the fourth output is > 120 kB.
    let big = |i: i64| event(NOW - 10 * MIN + i, 1.0, &format!("{i}{}", "a".repeat(30_000)));
    let events: Vec<Value> = (0..4).map(big).chain([event(NOW, 1.0, "view")]).collect();
    let out = sorted(h.events(&events));
    // The fifth output holds three 30 kB actions again: it fits.
    assert_eq!(outcomes(&out), ["scored", "scored", "scored", "dead:output_too_large", "scored"]);
    let OutRecord::DeadLetter { value, headers, .. } = &out[3] else { unreachable!() };
    assert_eq!(*value, events[3].to_string().into_bytes(), "the input, whole");
    assert!(header(headers, "streamscore.detail").unwrap().contains("message.max.bytes is 100000"), "{headers:?}");
    assert_eq!(header(headers, "streamscore.source.offset"), Some("4"));
    for o in &out {
        assert!(record_size(o) <= 100_000, "{}", record_size(o));
    }
    assert_eq!(scored_json(&out[4])["features"]["tx_1h"], json!(5.0), "the dead-lettered event still counted");
}

#[test]
fn non_finite_numbers_and_times_are_dead_lettered() {
    let mut h = Harness::new(config("fraud-logreg"));
    let raw = |s: &str| (&b"u"[..], s.as_bytes().to_vec());
    let out = h.run(&[
        raw(r#"{"user_id":"u","ts":1795999000000,"amount":1e400,"action":"view"}"#),
        raw(r#"{"user_id":"u","ts":"NaN","amount":1,"action":"view"}"#),
        raw(r#"{"user_id":"u","ts":1795999000000,"amount":1e30,"action":"view"}"#),
    ]);
    assert_eq!(outcomes(&out), ["dead:invalid", "dead:bad_event_time", "scored"]);
}

#[test]
fn a_nan_score_is_a_dead_letter_not_an_unlabelled_output() {
    // nan-score.onnx scores sqrt(-amount): NaN for a positive amount.
    let mut h = Harness::new(config("nan-score"));
    let out =
        sorted(h.events(&[event(NOW - 3, -4.0, "view"), event(NOW - 2, 5.0, "view"), event(NOW - 1, -0.25, "view")]));
    assert_eq!(outcomes(&out), ["scored", "dead:scoring_failed", "scored"]);
    assert_eq!(scored_json(&out[0])["scores"]["fraud"], json!(2.0));
    assert_eq!(scored_json(&out[0])["label"], json!("block"));
    assert_eq!(scored_json(&out[2])["scores"]["fraud"], json!(0.5));
    let OutRecord::DeadLetter { headers, .. } = &out[1] else { unreachable!() };
    assert!(header(headers, "streamscore.detail").unwrap().contains("fraud = NaN"), "{headers:?}");
}

#[test]
fn a_watermark_stored_far_in_the_future_is_forgotten_after_a_restart() {
    // State written by a worker whose clock let a 2199 event in (as before maxFutureSkew).
    let mut h = Harness::open(config("fraud-logreg"), tempfile::tempdir().unwrap(), 0, YEAR_2199);
    assert_eq!(outcomes(&h.events(&[event(YEAR_2199, 1.0, "view")])), ["scored"]);
    assert_eq!(outcomes(&h.events(&[event(NOW - MIN, 1.0, "view")])), ["dead:late"], "poisoned");
    // Restarted with the right clock: the restored 2199 watermark is beyond NOW + 1h, forgotten.
    let mut h = h.restart(config("fraud-logreg"), NOW);
    let out = sorted(h.events(&[event(NOW - MIN, 1.0, "view"), event(NOW, 1.0, "view")]));
    assert_eq!(outcomes(&out), ["scored", "scored"]);
    assert_eq!(scored_json(&out[1])["features"]["tx_1h"], json!(2.0), "the 2199 event is not in (NOW − 1h, NOW]");
}

#[test]
fn a_commit_during_a_replay_never_moves_the_group_offset_back() {
    // A new owner without state for partition 0, whose group committed offset 11: the state is
    // rebuilt from offset 0, outputs suppressed below 11.
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut engine = bare_engine(config("fraud-logreg"), dir.path(), metrics.clone());
    let committed = BTreeMap::from([("in".to_owned(), 11)]);
    let assigned = engine.open_partition(0, &committed).unwrap();
    assert_eq!(assigned.replay_until, committed);
    engine.assign(0).unwrap();
    let mut h = Harness { engine, metrics, offset: -1, _dir: dir };
    let evs: Vec<Value> = (0..5).map(|i| event(NOW - 10 * MIN + i * 1_000, 1.0, "view")).collect();
    assert!(h.events(&evs).is_empty(), "replayed records write nothing");
    assert!(!h.engine.replaying().is_empty());
    let mut cp = h.engine.checkpoint(true).unwrap();
    assert_eq!(cp.commits, [("in".to_owned(), 0, 11)], "the commit stays at the group's offset");
    assert_eq!(cp.stored, [("in".to_owned(), 0, 5)], "the state says what it holds");
    assert_eq!(h.engine.positions(), [("in".to_owned(), 0, 11)]);
    cp.write().unwrap();
    // Offsets 5..=10 end the replay; 11 is scored with every earlier event in its features.
    let evs: Vec<Value> = (5..12).map(|i| event(NOW - 10 * MIN + i * 1_000, 1.0, "view")).collect();
    let out = h.events(&evs);
    assert_eq!(outcomes(&out), ["scored"]);
    assert_eq!(scored_json(&out[0])["features"]["tx_1h"], json!(12.0));
    assert!(h.engine.replaying().is_empty());
    let cp = h.engine.checkpoint(true).unwrap();
    assert_eq!(
        (cp.commits.clone(), cp.stored.clone()),
        (vec![("in".to_owned(), 0, 12)], vec![("in".to_owned(), 0, 12)])
    );
}

/// The last score (query API) follows every event: through the in-place update of a key whose
/// last score this engine wrote, and through the full one of a key loaded from the store after
/// a restart with another model version. nan-score.onnx scores sqrt(-amount).
#[test]
fn the_last_score_follows_every_event_and_takes_the_new_model_version_after_a_restart() {
    fn last(h: &Harness) -> (i64, Vec<(String, f64)>, Option<String>, String) {
        let readers = h.engine.readers();
        let readers = readers.read().unwrap();
        let l = readers[&0].get::<KeyState>("u").expect("state of u").last_score.expect("a last score");
        (
            l.event_time,
            l.scores.into_iter().map(|(k, v)| (k.into_string(), v)).collect(),
            l.label.map(|x| x.into_string()),
            l.model_version.into_string(),
        )
    }
    let fraud = |x: f64| vec![("fraud".to_owned(), x)];
    let mut h = Harness::new(config("nan-score"));
    h.events(&[event(NOW - 9 * MIN, -4.0, "view")]);
    h.events(&[event(NOW - 8 * MIN, -0.0625, "view")]);
    h.engine.flush().unwrap();
    assert_eq!(last(&h), (NOW - 8 * MIN, fraud(0.25), None, "v1".to_owned()));
    let mut cfg = config("nan-score");
    cfg.model.version = "v2".into();
    let mut h = h.restart(cfg, NOW);
    h.events(&[event(NOW - 7 * MIN, -0.25, "view")]);
    h.engine.flush().unwrap();
    assert_eq!(last(&h), (NOW - 7 * MIN, fraud(0.5), Some("review".to_owned()), "v2".to_owned()));
    h.events(&[event(NOW - 6 * MIN, -4.0, "view"), event(NOW - 5 * MIN, -0.0625, "view")]);
    h.engine.flush().unwrap();
    assert_eq!(last(&h), (NOW - 5 * MIN, fraud(0.25), None, "v2".to_owned()));
}

/// A rebuilt partition (no state, group committed 11) whose consumer delivers the committed
/// offset first instead of the earliest record: nothing is processed from there, the engine asks
/// for a seek back to offset 0, and after it the state is rebuilt from every record.
#[test]
fn a_first_record_past_the_rebuild_start_is_read_again_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Arc::new(Metrics::new());
    let mut engine = bare_engine(config("fraud-logreg"), dir.path(), metrics.clone());
    let committed = BTreeMap::from([("in".to_owned(), 11)]);
    let assigned = engine.open_partition(0, &committed).unwrap();
    assert_eq!(assigned.start, BTreeMap::from([("in".to_owned(), StartAt::Beginning)]));
    engine.start_at(0, "in", 0);
    let evs: Vec<Value> = (0..14).map(|i| event(NOW - 10 * MIN + i * 1_000, 1.0, "view")).collect();
    // Offsets 11, 12, 13 first (a fetch from the committed offset).
    let mut h = Harness { engine, metrics, offset: 10, _dir: dir };
    assert!(h.events(&evs[11..]).is_empty(), "nothing written from a misplaced start");
    let seeks = h.engine.take_seeks();
    assert_eq!(seeks, [Seek { topic: "in".into(), partition: 0, offset: 0 }]);
    assert_eq!(h.metrics.start_seeks.get(), 1);
    assert_eq!(h.engine.positions(), [("in".to_owned(), 0, 11)], "the position did not move");
    // After the seek: 0..=13 in order; 11 is scored with all twelve events.
    h.offset = -1;
    let out = h.events(&evs);
    assert_eq!(outcomes(&out), ["scored", "scored", "scored"]);
    assert_eq!(scored_json(&out[0])["features"]["tx_1h"], json!(12.0));
    assert_eq!(scored_json(&out[2])["features"]["tx_1h"], json!(14.0));
    assert!(h.engine.take_seeks().is_empty());
}

/// A first record past the start at the same offset after a seek is a gap in the log (e.g. a
/// transaction marker at the start): accepted. A consumer that keeps starting elsewhere stops
/// the engine with the reason.
#[test]
fn a_gap_at_the_start_is_accepted_after_one_seek_and_a_wandering_start_is_an_error() {
    let mut h = Harness::new(config("fraud-logreg"));
    let dir = tempfile::tempdir().unwrap();
    let mut engine = bare_engine(config("fraud-logreg"), dir.path(), h.metrics.clone());
    engine.open_partition(0, &BTreeMap::from([("in".to_owned(), 3)])).unwrap();
    engine.start_at(0, "in", 0);
    h.engine = engine;
    let evs: Vec<Value> = (0..4).map(|i| event(NOW - 10 * MIN + i * 1_000, 1.0, "view")).collect();
    h.offset = 1; // first record at offset 2: 0 and 1 are not in the log
    assert!(h.events(&evs[2..]).is_empty());
    assert_eq!(h.engine.take_seeks().len(), 1);
    h.offset = 1;
    let out = h.events(&evs[2..]);
    assert_eq!(outcomes(&out), ["scored"], "offset 3 is live; the same first offset again is a gap");
    assert!(h.engine.take_seeks().is_empty());

    // A start that moves every time: five seeks, then an error.
    let dir = tempfile::tempdir().unwrap();
    let mut engine = bare_engine(config("fraud-logreg"), dir.path(), h.metrics.clone());
    engine.open_partition(0, &BTreeMap::from([("in".to_owned(), 100)])).unwrap();
    engine.start_at(0, "in", 0);
    let payload = event(NOW - MIN, 1.0, "view").to_string().into_bytes();
    for i in 1..=6i64 {
        let rec = InRecord {
            topic: "in",
            partition: 0,
            offset: 10 * i,
            key: Some(b"u"),
            payload: Some(&payload),
            received: Instant::now(),
            timestamp: None,
        };
        match engine.process(&[rec]) {
            Ok(out) => {
                assert!(out.is_empty());
                assert_eq!(engine.take_seeks().len(), 1, "seek {i}");
            }
            Err(e) => {
                assert_eq!(i, 6, "{e}");
                assert!(e.to_string().contains("delivers offset 60 first where the state needs 0"), "{e}");
                return;
            }
        }
    }
    panic!("no error after six misplaced starts");
}

/// A state built while the input topic had 3 partitions, opened after it got 4: refused with the
/// reason (keys moved partitions), whatever `missingCheckpoint` says; the same count opens it.
#[test]
fn a_state_built_under_another_partition_count_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = |n: usize| {
        let mut engine = bare_engine(config("fraud-logreg"), dir.path(), Arc::new(Metrics::new()));
        engine.set_input_partitions(n);
        engine.open_partition(0, &BTreeMap::new()).map(|_| ())
    };
    open(3).unwrap();
    open(3).unwrap();
    let err = open(4).unwrap_err().to_string();
    assert!(err.contains("the input topic has 4 partitions") && err.contains("when it had 3"), "{err}");
}

/// `config` with a merchants table: a window counting events of high-tier merchants, the
/// merchant's risk as the model's fourth input (instead of `event.amount`), its tier passed
/// through.
fn with_merchants(mut cfg: PipelineConfig) -> PipelineConfig {
    cfg.features.lookups.push(streamscore_crds::pipeline::LookupTable {
        name: "merchants".into(),
        topic: "merchant-tiers".into(),
        key: "merchant".into(),
        fields: vec!["tier".into(), "risk".into()],
    });
    let mut w = cfg.features.windows[2].clone();
    w.name = "high_tier_1h".into();
    w.filter = Some(streamscore_crds::pipeline::Filter {
        field: "lookups.merchants.tier".into(),
        one_of: vec!["high".into()],
    });
    cfg.features.windows.push(w);
    cfg.model.signature.features[3] = "lookups.merchants.risk".into();
    cfg.postprocess.passthrough.push("lookups.merchants.tier".into());
    cfg.validate().unwrap();
    cfg
}

#[test]
fn lookup_rows_join_each_event_as_the_engine_holds_them_and_feed_filters_model_and_output() {
    let mut h = Harness::new(with_merchants(config("fraud-logreg")));
    let tables = h.engine.lookup_tables().expect("a table is declared");
    let put = |k: &str, v: Value| tables.tables[0].apply(Some(k.as_bytes()), Some(v.to_string().as_bytes()));
    assert_eq!(put("m1", json!({"tier": "high", "risk": 7, "other": [1]})), crate::lookup::Applied::Put);
    put("m2", json!({"tier": "low", "risk": 1}));
    let ev = |i: i64, merchant: &str| json!({"user_id": "u", "ts": NOW - 10 * MIN + i, "amount": 3.0, "action": "view", "merchant": merchant});
    let out = sorted(h.events(&[ev(0, "m1"), ev(1, "m2"), ev(2, "m9"), ev(3, "m1")]));
    let got: Vec<(Value, Value)> = out
        .iter()
        .map(scored_json)
        .map(|v| (v["features"]["high_tier_1h"].clone(), v["fields"]["lookups.merchants.tier"].clone()))
        .collect();
    assert_eq!(
        got,
        [
            (json!(1.0), json!("high")),
            (json!(1.0), json!("low")),
            (json!(1.0), Value::Null), // no row m9: absent, and not counted
            (json!(2.0), json!("high")),
        ]
    );
    // Updates apply to the events processed after them; a tombstone deletes the row.
    put("m2", json!({"tier": "high", "risk": 2}));
    assert_eq!(tables.tables[0].apply(Some(b"m1"), None), crate::lookup::Applied::Deleted);
    assert!(matches!(tables.tables[0].apply(Some(b"m3"), Some(b"[1]")), crate::lookup::Applied::Rejected(_)));
    let out = sorted(h.events(&[ev(4, "m2"), ev(5, "m1")]));
    let tiers: Vec<Value> =
        out.iter().map(scored_json).map(|v| v["fields"]["lookups.merchants.tier"].clone()).collect();
    assert_eq!(tiers, [json!("high"), Value::Null]);
    let counts: Vec<Value> = out.iter().map(scored_json).map(|v| v["features"]["high_tier_1h"].clone()).collect();
    assert_eq!(counts, [json!(3.0), json!(3.0)]);
    let text = h.metrics.encode();
    assert!(text.contains("streamscore_worker_lookup_misses_total{table=\"merchants\"} 2"), "{text}");

    // The model reads the row's risk exactly as it reads an event field of the same value.
    let mut plain = Harness::new(config("fraud-logreg"));
    let same = json!({"user_id": "u", "ts": NOW - 10 * MIN, "amount": 7.0, "action": "view", "merchant": "m1"});
    let a = scored_json(&plain.events(&[same])[0]);
    let mut joined = Harness::new(with_merchants(config("fraud-logreg")));
    let t = joined.engine.lookup_tables().unwrap();
    t.tables[0].apply(Some(b"m1"), Some(br#"{"tier": "low", "risk": 7.0}"#));
    let b = scored_json(
        &joined.events(&[
            json!({"user_id": "u", "ts": NOW - 10 * MIN, "amount": 7.0, "action": "view", "merchant": "m1"}),
        ])[0],
    );
    assert_eq!(a["scores"], b["scores"]);
}
