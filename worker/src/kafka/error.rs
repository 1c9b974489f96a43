//! Why the Kafka loop stops: each error ends the worker (it exits non-zero with the message, and
//! its pod restarts; nothing after the last commit is lost, see the module docs of `kafka`) or
//! fails one drain (the admin API reports it, and consumption goes on).

use std::sync::Arc;

use rdkafka::error::KafkaError;

use crate::checkpoint::CheckpointError;
use crate::engine::EngineError;
use crate::state::StateError;

/// An error of the Kafka loop, its committer or its rebalance callbacks. Cloneable (sources
/// behind `Arc`): the committer both reports it to the processing thread and records it as the
/// reason the worker stops.
#[derive(Clone, Debug, thiserror::Error)]
pub enum Error {
    /// A client setting is invalid: a secret reference that does not resolve, a property out of
    /// range.
    #[error("{setting}: {message}")]
    Config {
        /// The pipeline field, e.g. `source.properties.sasl.password`.
        setting: String,
        /// What is wrong.
        message: String,
    },
    /// A Kafka client call failed.
    #[error("{doing}: {source}")]
    Client {
        /// What the worker was doing.
        doing: String,
        /// librdkafka's error.
        #[source]
        source: KafkaError,
    },
    /// The exactly-once producer was fenced: another worker registered the same
    /// `transactional.id` (a second process with this pod's name).
    #[error("another worker uses this transactional.id: {0}")]
    Fenced(#[source] KafkaError),
    /// The consumer has no group metadata to commit a transaction's input offsets with.
    #[error("the consumer has no group metadata")]
    NoGroupMetadata,
    /// The engine failed: a partition's state could not be opened, a record not processed.
    #[error("{doing}: {source}")]
    Engine {
        /// What the worker was doing.
        doing: String,
        /// The engine's error.
        #[source]
        source: Arc<EngineError>,
    },
    /// The state could not be written (a full volume only at the stop signal: until then the
    /// worker waits for space).
    #[error("{doing}: {source}")]
    State {
        /// What the worker was doing.
        doing: &'static str,
        /// The store's error.
        #[source]
        source: Arc<StateError>,
    },
    /// A partition could not be checkpointed to the object store during a drain.
    #[error("checkpoint of partition {partition}: {source}")]
    Checkpoint {
        /// The input partition.
        partition: i32,
        /// The checkpoint's error.
        #[source]
        source: Arc<CheckpointError>,
    },
    /// Outputs the broker did not acknowledge (or not before the stop deadline): their inputs
    /// are processed again after the restart.
    #[error("{0}")]
    Unacknowledged(String),
    /// The committer thread could not start.
    #[error("starting the committer thread: {0}")]
    Thread(#[source] Arc<std::io::Error>),
    /// The committer thread has stopped (after an earlier error, which is the one reported).
    #[error("the committer thread stopped")]
    CommitterStopped,
    /// The committer gave up on a commit because the worker is stopping on an earlier error.
    #[error("stopping after an earlier error")]
    Stopping,
    /// Output records could not be handed to the producer.
    #[error("{0}")]
    Produce(String),
    /// An earlier error, in the step that met it.
    #[error("{doing}: {source}")]
    During {
        /// What the worker was doing.
        doing: &'static str,
        /// The error.
        #[source]
        source: Box<Error>,
    },
}

/// Reasons the worker stops with, written first in its termination message (`Reason: message`,
/// see `streamscore-worker`'s `main`): the operator names the worker's failure by it in the
/// TenantModel's conditions instead of a bare `CrashLoopBackOff`. Keep in step with
/// `WORKER_REASONS` in the operator's `pods` module.
pub const REASONS: [&str; 7] = [
    "InputPartitionsChanged",
    "InvalidPipeline",
    "MissingCheckpoint",
    "InputMisplaced",
    "TransactionalIdFenced",
    "InvalidClientConfig",
    "WorkerFailed",
];

impl Error {
    /// The CamelCase reason of this error (one of [`REASONS`]): what a user must look at.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::During { source, .. } => source.reason(),
            Error::Engine { source, .. } => match source.as_ref() {
                EngineError::PartitionsChanged { .. } => "InputPartitionsChanged",
                EngineError::MissingState { .. } => "MissingCheckpoint",
                EngineError::Misplaced { .. } => "InputMisplaced",
                _ => "WorkerFailed",
            },
            Error::Fenced(_) => "TransactionalIdFenced",
            Error::Config { .. } => "InvalidClientConfig",
            _ => "WorkerFailed",
        }
    }

    /// A failed Kafka client call.
    pub(super) fn client(doing: impl Into<String>, source: KafkaError) -> Self {
        Error::Client { doing: doing.into(), source }
    }

    /// A failed engine call.
    pub(super) fn engine(doing: impl Into<String>, source: EngineError) -> Self {
        Error::Engine { doing: doing.into(), source: Arc::new(source) }
    }

    /// A failed state write.
    pub(super) fn state(doing: &'static str, source: StateError) -> Self {
        Error::State { doing, source: Arc::new(source) }
    }

    /// For `map_err`: a failed Kafka client call while `doing`.
    pub(super) fn kafka(doing: &'static str) -> impl FnOnce(KafkaError) -> Self {
        move |source| Error::client(doing, source)
    }
}
