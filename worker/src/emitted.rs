//! Windowed aggregates emitted when tumbling or hopping windows close (pure logic, no I/O).
//!
//! ```text
//!  accepted event (key, t, one input per emitted feature)
//!     ──► EmittedSet::on_event ──► the key's OpenWindows (one Agg per open window)
//!                                   └─► ends of newly opened windows ──► timer index (end, key)
//!  horizon H advanced (end of a batch)
//!     ──► timers with end ≤ H ──► EmittedSet::close(that key's OpenWindows, H) ──► Emitted
//! ```
//!
//! Semantics (`features.emitted` in the pipeline documents the same):
//!
//! - A feature of size S and advance A (A = S: tumbling; A < S: hopping) has windows aligned
//!   to the Unix epoch: window k covers event times `[k·A, k·A + S)`. An event with event time
//!   t counts in every window containing t, i.e. k from `floor((t − S) / A) + 1` to
//!   `floor(t / A)`.
//! - Only accepted events count: the engine applies an event only when it is not late
//!   (event time ≥ the partition's horizon H = watermark − allowed lateness). H never
//!   decreases, so once H ≥ end no event can enter the window any more: that is when the
//!   window is closed and emitted, exactly once per key (a window that never received an
//!   event does not exist and is not emitted). A window an event opens has end > t ≥ H,
//!   so no window is ever opened after its emission time.
//! - Values per aggregation are those of the trailing windows ([`Agg`]): `count` = events,
//!   `last` = value of the latest event by event time (ties: the later arrival).
//!
//! The timer index (which keys have a window ending at which time) lives in the partition
//! store ([`crate::state::PartitionStore::add_timer`], `take_due_timers`), so that closing
//! costs O(windows closed), not a scan of every key.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use streamscore_crds::pipeline::{Aggregation, EmittedWindow};

use crate::agg::{Agg, Entry, FeatureValue, Scalar};
use crate::codec::{put_i64, put_u64, Reader};

#[derive(Clone, Debug)]
struct Def {
    aggregation: Aggregation,
    size: i64,
    advance: i64,
}

/// Compiled emitted-window definitions (sizes and advances in ms), in declaration order.
#[derive(Clone, Debug, Default)]
pub struct EmittedSet {
    defs: Vec<Def>,
    names: Vec<String>,
}

/// The open emitted windows of one key.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OpenWindows {
    /// (feature index, window start) → aggregate of the window's events so far.
    windows: BTreeMap<(u32, i64), Agg>,
    /// Arrival counter for `last` ties.
    next_seq: u64,
}

impl OpenWindows {
    /// Appends the stored form: the count, per window its feature index, start and aggregate,
    /// then the arrival counter.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        put_u64(out, self.windows.len() as u64);
        for ((feature, start), agg) in &self.windows {
            put_u64(out, u64::from(*feature));
            put_i64(out, *start);
            agg.encode(out);
        }
        put_u64(out, self.next_seq);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let n = r.len("open windows", 4)?;
        let mut windows = BTreeMap::new();
        for _ in 0..n {
            let feature = u32::try_from(r.u64("window feature")?).map_err(|_| "window feature: out of range")?;
            let start = r.i64("window start")?;
            windows.insert((feature, start), Agg::decode(r)?);
        }
        Ok(Self { windows, next_seq: r.u64("window arrival counter")? })
    }

    /// Number of open windows.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no window is open.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// A closed window of one key.
#[derive(Clone, Debug, PartialEq)]
pub struct Emitted {
    /// Index of the feature in [`EmittedSet::names`].
    pub feature: usize,
    /// Window start (inclusive), epoch ms.
    pub start: i64,
    /// Window end (exclusive), epoch ms.
    pub end: i64,
    /// The aggregate.
    pub value: FeatureValue,
    /// Number of events counted.
    pub count: u64,
}

impl EmittedSet {
    /// Compiles the configured emitted windows.
    pub fn new(defs: &[EmittedWindow]) -> Self {
        Self {
            defs: defs
                .iter()
                .map(|d| Def {
                    aggregation: d.aggregation,
                    size: d.size.as_millis_i64().max(1),
                    advance: d.effective_advance().as_millis_i64().max(1),
                })
                .collect(),
            names: defs.iter().map(|d| d.name.clone()).collect(),
        }
    }

    /// Whether no emitted window is declared.
    pub fn is_empty(&self) -> bool {
        self.defs.is_empty()
    }

    /// Feature names in declaration order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Counts an accepted event with event time `t` in every window containing `t`, per
    /// feature whose input is `Some` (`inputs[i]` for feature i; None: the event does not
    /// count for it). Returns the ends of the windows this event opened (for the timer index).
    pub fn on_event(&self, open: &mut OpenWindows, t: i64, inputs: &[Option<Scalar>]) -> Vec<i64> {
        let seq = open.next_seq;
        open.next_seq += 1;
        let mut opened = Vec::new();
        for (i, (def, input)) in self.defs.iter().zip(inputs).enumerate() {
            let Some(val) = input else { continue };
            let entry = Entry { time: t, seq, val: val.clone() };
            let first = t.saturating_sub(def.size).div_euclid(def.advance) + 1;
            let last = t.div_euclid(def.advance);
            for k in first..=last {
                let start = k.saturating_mul(def.advance);
                let agg = open.windows.entry((i as u32, start)).or_insert_with(|| {
                    opened.push(start.saturating_add(def.size));
                    Agg::default()
                });
                agg.add(&entry, def.aggregation);
            }
        }
        opened
    }

    /// Removes and returns the windows of `open` whose end is at or before `horizon`,
    /// ordered by (end, feature).
    pub fn close(&self, open: &mut OpenWindows, horizon: i64) -> Vec<Emitted> {
        let mut out = Vec::new();
        for (i, def) in self.defs.iter().enumerate() {
            let i32_ = i as u32;
            // end = start + size ≤ horizon ⇔ start ≤ horizon − size
            let due: Vec<i64> = open
                .windows
                .range((i32_, i64::MIN)..=(i32_, horizon.saturating_sub(def.size)))
                .map(|(&(_, start), _)| start)
                .collect();
            for start in due {
                if let Some(agg) = open.windows.remove(&(i32_, start)) {
                    out.push(Emitted {
                        feature: i,
                        start,
                        end: start.saturating_add(def.size),
                        value: agg.value(def.aggregation),
                        count: agg.count,
                    });
                }
            }
        }
        out.sort_by_key(|e| (e.end, e.feature));
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use rand::{rngs::SmallRng, Rng, SeedableRng};
    use streamscore_crds::Duration;

    use super::*;

    fn def(name: &str, aggregation: Aggregation, size: u64, advance: Option<u64>) -> EmittedWindow {
        EmittedWindow {
            name: name.into(),
            aggregation,
            field: Some("x".into()),
            size: Duration::from_millis(size),
            advance: advance.map(Duration::from_millis),
            filter: None,
        }
    }

    fn num(x: f64) -> Option<Scalar> {
        Some(Scalar::Num(x))
    }

    fn starts(e: &[Emitted]) -> Vec<(i64, i64, u64)> {
        e.iter().map(|e| (e.start, e.end, e.count)).collect()
    }

    #[test]
    fn tumbling_windows_are_half_open_and_close_only_when_the_horizon_reaches_the_end() {
        let set = EmittedSet::new(&[def("c", Aggregation::Count, 1_000, None)]);
        let mut open = OpenWindows::default();
        assert_eq!(set.on_event(&mut open, 0, &[num(1.0)]), [1_000]);
        assert_eq!(set.on_event(&mut open, 999, &[num(1.0)]), Vec::<i64>::new(), "same window: no new timer");
        assert_eq!(set.on_event(&mut open, 1_000, &[num(1.0)]), [2_000], "1000 starts the next window");
        assert!(set.close(&mut open, 999).is_empty(), "horizon below the end: still open");
        let e = set.close(&mut open, 1_000);
        assert_eq!(starts(&e), [(0, 1_000, 2)]);
        assert_eq!(e[0].value, FeatureValue::Num(2.0));
        assert!(set.close(&mut open, 1_999).is_empty(), "emitted once");
        assert_eq!(starts(&set.close(&mut open, 5_000)), [(1_000, 2_000, 1)]);
        assert!(open.is_empty());
    }

    #[test]
    fn hopping_windows_count_an_event_in_every_window_containing_it() {
        let set = EmittedSet::new(&[def("s", Aggregation::Sum, 1_000, Some(250))]);
        let mut open = OpenWindows::default();
        assert_eq!(set.on_event(&mut open, 1_100, &[num(5.0)]), [1_250, 1_500, 1_750, 2_000]);
        assert_eq!(set.on_event(&mut open, 1_300, &[num(1.0)]), [2_250]);
        let e = set.close(&mut open, i64::MAX);
        // 1100 is in the windows starting at 250, 500, 750, 1000; 1300 in 500 … 1250.
        assert_eq!(
            starts(&e),
            [(250, 1_250, 1), (500, 1_500, 2), (750, 1_750, 2), (1_000, 2_000, 2), (1_250, 2_250, 1)]
        );
        let values: Vec<_> = e.iter().map(|e| e.value.clone()).collect();
        let n = FeatureValue::Num;
        assert_eq!(values, [n(5.0), n(6.0), n(6.0), n(6.0), n(1.0)]);
    }

    #[test]
    fn an_advance_that_does_not_divide_the_size_still_aligns_to_the_epoch() {
        let set = EmittedSet::new(&[def("c", Aggregation::Count, 1_000, Some(300))]);
        let mut open = OpenWindows::default();
        // windows [300k, 300k + 1000) containing 1000: k = 1, 2, 3 (not 0: [0, 1000) excludes 1000)
        assert_eq!(set.on_event(&mut open, 1_000, &[num(1.0)]), [1_300, 1_600, 1_900]);
        assert_eq!(set.on_event(&mut open, 950, &[num(1.0)]), [1_000]);
    }

    #[test]
    fn out_of_order_events_within_lateness_count_in_their_own_window() {
        let set = EmittedSet::new(&[def("s", Aggregation::Sum, 1_000, None)]);
        let mut open = OpenWindows::default();
        set.on_event(&mut open, 1_500, &[num(10.0)]);
        set.on_event(&mut open, 900, &[num(1.0)]); // earlier window, still open
        set.on_event(&mut open, 100, &[num(2.0)]);
        let e = set.close(&mut open, 1_000);
        assert_eq!(starts(&e), [(0, 1_000, 2)]);
        assert_eq!(e[0].value, FeatureValue::Num(3.0));
        assert_eq!(set.close(&mut open, 2_000)[0].value, FeatureValue::Num(10.0));
    }

    #[test]
    fn every_aggregation_kind_and_events_that_do_not_count() {
        let kinds = [
            Aggregation::Count,
            Aggregation::Sum,
            Aggregation::Avg,
            Aggregation::Min,
            Aggregation::Max,
            Aggregation::DistinctCount,
            Aggregation::Last,
        ];
        let defs: Vec<_> = kinds.iter().map(|k| def(&format!("{k:?}"), *k, 1_000, None)).collect();
        let set = EmittedSet::new(&defs);
        let mut open = OpenWindows::default();
        let all = |x: f64| vec![num(x); kinds.len()];
        set.on_event(&mut open, 500, &all(4.0));
        set.on_event(&mut open, 100, &all(2.0));
        set.on_event(&mut open, 500, &all(7.0)); // same time as 4.0, later arrival: `last`
        set.on_event(&mut open, 200, &all(2.0));
        set.on_event(&mut open, 300, &vec![None; kinds.len()]); // filtered out everywhere
        let e = set.close(&mut open, 1_000);
        let got: Vec<_> = e.iter().map(|e| (set.names()[e.feature].as_str(), e.value.clone(), e.count)).collect();
        let n = FeatureValue::Num;
        assert_eq!(
            got,
            [
                ("Count", n(4.0), 4),
                ("Sum", n(15.0), 4),
                ("Avg", n(3.75), 4),
                ("Min", n(2.0), 4),
                ("Max", n(7.0), 4),
                ("DistinctCount", n(3.0), 4),
                ("Last", n(7.0), 4),
            ]
        );
        assert!(open.is_empty());
    }

    #[test]
    fn open_windows_survive_serialization() {
        let set = EmittedSet::new(&[def("l", Aggregation::Last, 1_000, Some(500))]);
        let mut open = OpenWindows::default();
        set.on_event(&mut open, 700, &[Some(Scalar::Str("a".into()))]);
        let mut bytes = Vec::new();
        open.encode(&mut bytes);
        let mut r = crate::codec::Reader::new(&bytes);
        let mut back = OpenWindows::decode(&mut r).unwrap();
        r.finish("open windows").unwrap();
        assert_eq!(back, open);
        set.on_event(&mut back, 700, &[Some(Scalar::Str("b".into()))]);
        assert_eq!(set.close(&mut back, 1_500)[0].value, FeatureValue::Text("b".into()));
    }

    /// One partition driven like the engine does: random keys, bounded disorder, late events
    /// rejected by the watermark, a timer index of (end, key), windows closed after every
    /// batch. Every window is emitted exactly once, never before the horizon reaches its end,
    /// with the value recomputed from the accepted events.
    #[test]
    fn partition_simulation_emits_every_window_once_with_the_recomputed_value() {
        let defs = vec![
            def("sum_tumbling", Aggregation::Sum, 10_000, None),
            def("max_hopping", Aggregation::Max, 10_000, Some(3_000)),
        ];
        let set = EmittedSet::new(&defs);
        let (ooo, lateness) = (2_000i64, 1_000i64);
        for seed in 0..20 {
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut keys: BTreeMap<String, OpenWindows> = BTreeMap::new();
            let mut timers: BTreeSet<(i64, String)> = BTreeSet::new();
            let mut accepted: Vec<(String, i64, f64)> = Vec::new();
            let mut emitted: BTreeMap<(String, usize, i64), Emitted> = BTreeMap::new();
            let mut max_t = i64::MIN;
            let mut clock = 0i64;
            let horizon = |max_t: i64| max_t.saturating_sub(ooo).saturating_sub(lateness);
            for batch in 0..=60 {
                let n = if batch == 60 { 1 } else { 20 };
                for _ in 0..n {
                    clock += rng.gen_range(0..300);
                    let t = if batch == 60 { clock + 1_000_000 } else { clock - rng.gen_range(0..4_000) };
                    if t < horizon(max_t) {
                        continue; // late: dead-lettered, never applied
                    }
                    max_t = max_t.max(t);
                    let key = format!("k{}", rng.gen_range(0..5));
                    let x = f64::from(rng.gen_range(0..100));
                    accepted.push((key.clone(), t, x));
                    let open = keys.entry(key.clone()).or_default();
                    for end in set.on_event(open, t, &[Some(Scalar::Num(x)), Some(Scalar::Num(x))]) {
                        assert!(end > horizon(max_t), "a window is never opened after it closed");
                        timers.insert((end, key.clone()));
                    }
                }
                let h = horizon(max_t);
                let rest = timers.split_off(&(h.saturating_add(1), String::new()));
                for (_, key) in std::mem::replace(&mut timers, rest) {
                    for e in set.close(keys.get_mut(&key).unwrap(), h) {
                        assert!(e.end <= h);
                        let id = (key.clone(), e.feature, e.start);
                        assert!(emitted.insert(id, e).is_none(), "emitted twice");
                    }
                }
            }
            // Reference: every (key, feature, window) with at least one accepted event.
            let mut want: BTreeMap<(String, usize, i64), (f64, u64)> = BTreeMap::new();
            for (key, t, x) in &accepted {
                for (i, d) in defs.iter().enumerate() {
                    let (size, adv) = (d.size.as_millis_i64(), d.effective_advance().as_millis_i64());
                    let mut start = t - t.rem_euclid(adv);
                    while start > t - size {
                        let w = want.entry((key.clone(), i, start)).or_insert((f64::NEG_INFINITY, 0));
                        w.0 = if i == 0 { w.0.max(0.0) + x } else { w.0.max(*x) };
                        w.1 += 1;
                        start -= adv;
                    }
                }
            }
            let far = horizon(max_t);
            want.retain(|(_, i, start), _| start + defs[*i].size.as_millis_i64() <= far);
            let got: BTreeMap<_, _> = emitted
                .iter()
                .map(|(k, e)| (k.clone(), (if let FeatureValue::Num(v) = e.value { v } else { f64::NAN }, e.count)))
                .collect();
            assert_eq!(got, want, "seed {seed}");
        }
    }
}
