//! The stored record of one entity key: what a partition store keeps under the key, its
//! encoding, and the version of that encoding. The only place that knows the layout.
//!
//! ```text
//!  KeyState ─┬─ features: FeatureState   (windows, sequences, max event time)
//!            ├─ last_score: LastScore     (0, or 1 and the query API's last score)
//!            └─ open_windows: OpenWindows (0, or 1 and the emitted windows not closed yet)
//! ```
//! Hand-written and compact ([`crate::codec`]: varints, differences between neighbouring
//! times and bucket numbers, an aggregate holds only the fields its kind sets), because every
//! key changed during a commit interval is written at the commit, through RocksDB's log, memtable,
//! flushes and compactions: the size of this record is most of the state's cost per event.
//! Every field is required: a truncated or extended record is an error, never a default. Any
//! change to the layout bumps [`FORMAT`]; a store or checkpoint in another format is refused when
//! opened or restored (the worker then rebuilds from the input instead of misreading it).
//!
//! Formats: 2 was bincode (fixed-width integers, every aggregate field); 3 is this layout.

use crate::codec::{put_f64, put_i64, put_str, put_u64, Reader};
use compact_str::CompactString;
use smallvec::SmallVec;

use crate::emitted::OpenWindows;
use crate::features::FeatureState;
use crate::state::Record;

/// Layout version of [`KeyState`]'s stored form. Bump on any change to it.
pub const FORMAT: u32 = 3;

/// The last score written for a key.
#[derive(Clone, Debug, PartialEq)]
pub struct LastScore {
    /// Event time of the scored event.
    pub event_time: i64,
    /// Named scores. (Names, label and version are short: kept inline, like the first score,
    /// they cost no allocation of their own and no pointer to follow per event.)
    pub scores: SmallVec<[(CompactString, f64); 1]>,
    /// Label, if a threshold matched.
    pub label: Option<CompactString>,
    /// Model version.
    pub model_version: CompactString,
}

impl LastScore {
    fn encode(&self, out: &mut Vec<u8>) {
        put_i64(out, self.event_time);
        put_u64(out, self.scores.len() as u64);
        for (name, v) in &self.scores {
            put_str(out, name);
            put_f64(out, *v);
        }
        match &self.label {
            None => out.push(0),
            Some(l) => {
                out.push(1);
                put_str(out, l);
            }
        }
        put_str(out, &self.model_version);
    }

    fn decode(r: &mut Reader<'_>) -> Result<Self, String> {
        let event_time = r.i64("last score time")?;
        let n = r.len("scores", 9)?;
        let mut scores = SmallVec::with_capacity(n);
        for _ in 0..n {
            scores.push((r.str_ref("score name")?.into(), r.f64("score")?));
        }
        let label = match r.u8("label")? {
            0 => None,
            1 => Some(r.str_ref("label")?.into()),
            t => return Err(format!("label: unknown tag {t}")),
        };
        Ok(Self { event_time, scores, label, model_version: r.str_ref("model version")?.into() })
    }
}

/// Everything kept for one entity key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyState {
    /// Window and sequence state.
    pub features: FeatureState,
    /// Last score produced for this key.
    pub last_score: Option<LastScore>,
    /// Open emitted windows.
    pub open_windows: OpenWindows,
}

impl KeyState {
    /// Largest event time applied for this key.
    pub fn max_time(&self) -> Option<i64> {
        self.features.max_time
    }
}

impl Record for KeyState {
    const FORMAT: u32 = FORMAT;

    fn encode(&self, buf: &mut Vec<u8>) -> Result<(), String> {
        self.features.encode(buf);
        match &self.last_score {
            None => buf.push(0),
            Some(l) => {
                buf.push(1);
                l.encode(buf);
            }
        }
        if self.open_windows.is_empty() {
            buf.push(0);
        } else {
            buf.push(1);
            self.open_windows.encode(buf);
        }
        Ok(())
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader::new(bytes);
        let features = FeatureState::decode(&mut r)?;
        let last_score = match r.u8("last score")? {
            0 => None,
            1 => Some(LastScore::decode(&mut r)?),
            t => return Err(format!("last score: unknown tag {t}")),
        };
        let open_windows = match r.u8("open windows")? {
            0 => OpenWindows::default(),
            1 => OpenWindows::decode(&mut r)?,
            t => return Err(format!("open windows: unknown tag {t}")),
        };
        r.finish("state record")?;
        Ok(Self { features, last_score, open_windows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agg::Scalar;
    use crate::decode::Schema;
    use crate::emitted::EmittedSet;
    use crate::features::FeatureSet;
    use rand::{rngs::SmallRng, Rng, SeedableRng};
    use streamscore_crds::pipeline::{Aggregation, EmittedWindow, FeaturesConfig, SequenceFeature, WindowFeature};
    use streamscore_crds::Duration;

    fn encode(st: &KeyState) -> Vec<u8> {
        let mut buf = Vec::new();
        st.encode(&mut buf).unwrap();
        buf
    }

    fn score() -> LastScore {
        LastScore {
            event_time: 5,
            scores: smallvec::smallvec![("fraud".into(), 0.25), ("abuse".into(), f64::MIN_POSITIVE)],
            label: Some("review".into()),
            model_version: "v1".into(),
        }
    }

    /// Every aggregation kind, a filtered window, sequences of numbers and of text, emitted
    /// windows: states built by the feature logic from random events round-trip exactly after
    /// every event, and every truncation of them is an error.
    #[test]
    fn states_built_from_random_events_round_trip_and_truncations_are_errors() {
        let win = |name: &str, aggregation, field: Option<&str>, w: u64, r: Option<u64>| WindowFeature {
            name: name.into(),
            aggregation,
            field: field.map(Into::into),
            window: Duration::from_millis(w),
            resolution: r.map(Duration::from_millis),
            filter: None,
        };
        let kinds = [
            Aggregation::Count,
            Aggregation::Sum,
            Aggregation::Avg,
            Aggregation::Min,
            Aggregation::Max,
            Aggregation::DistinctCount,
            Aggregation::Last,
        ];
        let mut windows: Vec<_> =
            kinds.iter().map(|k| win(&format!("{k:?}"), *k, Some("amount"), 60_000, Some(1_000))).collect();
        windows.push(win("last_action", Aggregation::Last, Some("action"), 3_600_000, None));
        windows.push(win("distinct_actions", Aggregation::DistinctCount, Some("action"), 10_000, Some(1)));
        let seq = |name: &str, field: &str| SequenceFeature {
            name: name.into(),
            field: field.into(),
            length: 4,
            lookback: Duration::from_millis(30_000),
            filter: None,
        };
        let cfg =
            FeaturesConfig { windows, sequences: vec![seq("a", "action"), seq("m", "amount")], ..Default::default() };
        let schema = Schema::of(&["amount", "action"]);
        let set = FeatureSet::new(&cfg, &schema);
        let emitted = EmittedSet::new(&[EmittedWindow {
            name: "e".into(),
            aggregation: Aggregation::Last,
            field: Some("action".into()),
            size: Duration::from_millis(5_000),
            advance: Some(Duration::from_millis(1_000)),
            filter: None,
        }]);
        let mut rng = SmallRng::seed_from_u64(7);
        let mut st = KeyState::default();
        let (mut clock, mut sizes) = (1_795_500_000_000i64, Vec::new());
        for i in 0..300 {
            clock += rng.gen_range(0..700);
            let t = clock - rng.gen_range(0..2_000);
            let amount = match rng.gen_range(0..4) {
                0 => format!("{}", rng.gen_range(-5..5)),
                1 => format!("{:.2}", rng.gen_range(-1e6..1e6)),
                2 => "-0.0".to_owned(),
                _ => format!("{}", rng.gen_range(1e15..1e17)),
            };
            let action = ["view", "purchase", "ëü", ""][rng.gen_range(0..4)];
            let text = format!(r#"{{"amount": {amount}, "action": "{action}"}}"#);
            let fields = schema.parse(&text).unwrap();
            set.apply(&mut st.features, t, &fields, clock - 3_000);
            emitted.on_event(&mut st.open_windows, t, &[Some(Scalar::Str(action.into()))]);
            if i % 50 == 0 {
                emitted.close(&mut st.open_windows, clock - 3_000);
            }
            st.last_score = (i % 3 != 0).then(score);
            let bytes = encode(&st);
            assert_eq!(KeyState::decode(&bytes).unwrap(), st, "after event {i}");
            for cut in 0..bytes.len() {
                assert!(
                    KeyState::decode(&bytes[..cut]).is_err(),
                    "event {i}: truncated to {cut} of {} bytes",
                    bytes.len()
                );
            }
            sizes.push(bytes.len());
        }
        assert!(sizes.iter().any(|s| *s > 1_000), "the states grew: {sizes:?}");
        assert!(!st.open_windows.is_empty() && st.last_score.is_some());
        // Trailing bytes are refused too.
        let mut bytes = encode(&st);
        bytes.push(0);
        assert!(KeyState::decode(&bytes).is_err());
    }

    #[test]
    fn a_record_is_exactly_its_fields() {
        let mut st = KeyState::default();
        // Nothing set: no windows, no sequences, counter 0, no time, no score, no open windows.
        assert_eq!(encode(&st), [0, 0, 0, 0, 0, 0]);
        st.features.max_time = Some(-2);
        assert_eq!(encode(&st), [0, 0, 0, 1, 3, 0, 0]);
        assert_eq!(KeyState::decode(&[0, 0, 0, 1, 3, 0, 0]).unwrap(), st);
        // Unknown tags are refused.
        assert!(KeyState::decode(&[0, 0, 0, 2, 0, 0]).unwrap_err().contains("unknown tag 2"));
        assert!(KeyState::decode(&[0, 0, 0, 0, 0, 7]).unwrap_err().contains("open windows: unknown tag 7"));
        // A format-2 (bincode) record is not misread as this one.
        let mut old = vec![0u8; 16];
        old.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1, 9, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(KeyState::decode(&old).is_err());
    }

    /// The reference pipeline's state after 20 events of one key in 20 minutes (the shape of
    /// the benchmarks' keys): count, sum, average and filtered count windows at 1-minute to
    /// 1-hour buckets, and a 16-action sequence.
    #[test]
    fn a_reference_pipeline_key_stays_small() {
        let w = |name: &str, aggregation, field: Option<&str>, h: u64| WindowFeature {
            name: name.into(),
            aggregation,
            field: field.map(Into::into),
            window: Duration::from_millis(h * 3_600_000),
            resolution: None,
            filter: None,
        };
        let cfg = FeaturesConfig {
            windows: vec![
                w("tx_1h", Aggregation::Count, None, 1),
                w("amount_24h", Aggregation::Sum, Some("amount"), 24),
                w("amount_avg_7d", Aggregation::Avg, Some("amount"), 168),
                w("purchases_30d", Aggregation::Count, None, 720),
            ],
            sequences: vec![SequenceFeature {
                name: "last_actions".into(),
                field: "action".into(),
                length: 16,
                lookback: Duration::from_millis(90 * 86_400_000),
                filter: None,
            }],
            ..Default::default()
        };
        let schema = Schema::of(&["amount", "action"]);
        let set = FeatureSet::new(&cfg, &schema);
        let mut st = KeyState { last_score: Some(score()), ..Default::default() };
        let mut rng = SmallRng::seed_from_u64(3);
        let mut t = 1_795_500_000_000i64;
        for _ in 0..20 {
            t += rng.gen_range(50_000..70_000);
            let action = ["view", "purchase", "ride_requested", "login", "cart"][rng.gen_range(0..5)];
            let text = format!(r#"{{"amount": {:.2}, "action": "{action}"}}"#, rng.gen_range(1.0..150.0));
            set.apply(&mut st.features, t, &schema.parse(&text).unwrap(), t - 5_000);
        }
        let bytes = encode(&st);
        // Format 2 (bincode) took 1,409 bytes for the features alone.
        assert!(bytes.len() < 480, "{} bytes", bytes.len());
        assert_eq!(KeyState::decode(&bytes).unwrap(), st);
    }
}
