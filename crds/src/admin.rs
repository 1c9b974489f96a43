//! The worker's admin API types (`GET /v1/admin/status`, `POST /v1/admin/drain`), written by
//! the worker and read by the operator's rescale and cut-over: one definition for both sides.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A cut-over barrier: per input topic and partition, the first input offset whose outputs
/// are live.
pub type Barrier = BTreeMap<String, BTreeMap<i32, i64>>;

/// One partition as a drain left it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainedPartition {
    /// Input partition.
    pub partition: i32,
    /// Next input offset per topic held by the state (and committed).
    #[serde(default)]
    pub offsets: BTreeMap<String, i64>,
    /// Id of the checkpoint that holds the state at `offsets` (None without a checkpoint
    /// store, or for a partition that never received a record).
    #[serde(default)]
    pub manifest: Option<String>,
    /// Next input offset per topic below which every input's output has been written, by
    /// this worker or by the partition's previous owner (the committed position). Above
    /// `offsets` while the partition replays its input to restore state: those records'
    /// outputs were written before and are not written again. A cut-over barrier is made of
    /// these. Empty from workers that predate the field (`offsets` stands for it then).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output_offsets: BTreeMap<String, i64>,
}

impl DrainedPartition {
    /// [`DrainedPartition::output_offsets`], or `offsets` from a worker without them.
    pub fn output_positions(&self) -> &BTreeMap<String, i64> {
        if self.output_offsets.is_empty() {
            &self.offsets
        } else {
            &self.output_offsets
        }
    }
}

/// What a completed drain reports.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DrainReport {
    /// The id the drain was asked with.
    pub id: String,
    /// When consumption stopped (Unix milliseconds).
    pub paused_at_ms: i64,
    /// Whether checkpoints go to an object store (otherwise a moved partition is rebuilt).
    #[serde(default)]
    pub checkpoint_store: bool,
    /// Every partition owned at the drain.
    #[serde(default)]
    pub partitions: Vec<DrainedPartition>,
}

/// A worker's drain state, as its admin API shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state")]
pub enum DrainView {
    /// Consuming.
    #[default]
    Idle,
    /// Asked; the loop has not finished it.
    Draining {
        /// Its id.
        id: String,
    },
    /// Stopped, committed and checkpointed.
    Drained {
        /// The report.
        report: DrainReport,
    },
    /// The drain failed (e.g. a checkpoint upload); consuming again.
    Failed {
        /// Its id.
        id: String,
        /// Why.
        error: String,
    },
}
