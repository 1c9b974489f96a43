//! The stored record of one entity key: what a partition store keeps under the key, its
//! encoding, and the version of that encoding. The only place that knows the layout.
//!
//! ```text
//!  KeyState ─┬─ features: FeatureState   (windows, sequences, max event time)   ┐ section 1
//!            ├─ last_score: LastScore     (the query API's last score)          ┘ (always)
//!            └─ open_windows: OpenWindows (emitted windows not closed yet)        section 2 (if any)
//! ```
//! Each section is bincode. A value without a second section has no open window: records
//! written before emitted windows existed load unchanged, and a reader that knows only the
//! first section still decodes a newer one. Any other change to the layout bumps [`FORMAT`];
//! a store or checkpoint in another format is refused when opened or restored (the worker
//! then rebuilds from the input instead of misreading it).

use serde::{Deserialize, Serialize};

use crate::emitted::OpenWindows;
use crate::features::FeatureState;
use crate::state::Record;

/// Layout version of [`KeyState`]'s stored form. Bump on any change to it.
pub const FORMAT: u32 = 2;

/// The last score written for a key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LastScore {
    /// Event time of the scored event.
    pub event_time: i64,
    /// Named scores.
    pub scores: Vec<(String, f64)>,
    /// Label, if a threshold matched.
    pub label: Option<String>,
    /// Model version.
    pub model_version: String,
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

/// Section 1 as written (borrowed) and as read.
#[derive(Serialize)]
struct First<'a>(&'a FeatureState, &'a Option<LastScore>);
#[derive(Deserialize)]
struct FirstOwned(FeatureState, Option<LastScore>);

impl Record for KeyState {
    const FORMAT: u32 = FORMAT;

    fn encode(&self, buf: &mut Vec<u8>) -> Result<(), String> {
        bincode::serialize_into(&mut *buf, &First(&self.features, &self.last_score)).map_err(|e| e.to_string())?;
        if !self.open_windows.is_empty() {
            bincode::serialize_into(&mut *buf, &self.open_windows).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn decode(mut bytes: &[u8]) -> Result<Self, String> {
        let FirstOwned(features, last_score) = bincode::deserialize_from(&mut bytes).map_err(|e| e.to_string())?;
        let open_windows = if bytes.is_empty() {
            OpenWindows::default()
        } else {
            bincode::deserialize_from(&mut bytes).map_err(|e| e.to_string())?
        };
        Ok(Self { features, last_score, open_windows })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agg::Scalar;
    use crate::emitted::EmittedSet;
    use streamscore_crds::pipeline::{Aggregation, EmittedWindow};

    /// The layout before emitted windows existed, written field by field.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct OldKeyState {
        windows: Vec<()>,
        sequences: Vec<()>,
        next_seq: u64,
        max_time: Option<i64>,
        last_score: Option<()>,
    }

    #[test]
    fn open_windows_are_a_second_section_and_records_without_it_still_load() {
        let old = OldKeyState { windows: vec![], sequences: vec![], next_seq: 3, max_time: Some(9), last_score: None };
        let loaded = KeyState::decode(&bincode::serialize(&old).unwrap()).unwrap();
        assert_eq!((loaded.max_time(), loaded.open_windows.len()), (Some(9), 0));

        let set = EmittedSet::new(&[EmittedWindow {
            name: "c".into(),
            aggregation: Aggregation::Count,
            field: None,
            size: streamscore_crds::Duration::from_millis(1_000),
            advance: None,
            filter: None,
        }]);
        let mut st = KeyState::default();
        st.features.max_time = Some(5);
        st.last_score = Some(LastScore {
            event_time: 5,
            scores: vec![("fraud".into(), 0.25)],
            label: None,
            model_version: "v1".into(),
        });
        set.on_event(&mut st.open_windows, 5, &[Some(Scalar::Num(1.0))]);
        let mut buf = Vec::new();
        st.encode(&mut buf).unwrap();
        assert_eq!(KeyState::decode(&buf).unwrap(), st);
        // A reader that knows only the first section still decodes it.
        let FirstOwned(features, last) = bincode::deserialize(&buf).unwrap();
        assert_eq!((features.max_time, last), (Some(5), st.last_score.clone()));
        // Without open windows there is no second section: the old layout exactly.
        let mut plain = KeyState::default();
        plain.features.max_time = Some(9);
        buf.clear();
        plain.encode(&mut buf).unwrap();
        assert_eq!(bincode::deserialize::<OldKeyState>(&buf).unwrap().max_time, Some(9));
        assert_eq!(buf.len(), bincode::serialize(&old).unwrap().len());
    }

    #[test]
    fn a_truncated_record_is_an_error_not_a_default() {
        let mut st = KeyState::default();
        st.features.max_time = Some(7);
        let mut buf = Vec::new();
        st.encode(&mut buf).unwrap();
        assert!(KeyState::decode(&buf[..buf.len() - 1]).is_err());
    }
}
