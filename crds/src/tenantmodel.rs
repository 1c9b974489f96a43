//! The `TenantModel` custom resource (`tenantmodels.streamscore.io/v1alpha1`).
//!
//! A tenant describes one scoring pipeline: the worker pipeline (the same
//! [`crate::pipeline`] types the worker reads) plus how it runs on Kubernetes
//! (parallelism, image, resources, state volume, Kafka credentials, model source,
//! upgrade strategy). The operator turns it into worker Deployments and reports in
//! `status`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::pipeline::{
    FeaturesConfig, MissingCheckpoint, ModelSignature, PostprocessConfig, SinkConfig, SourceConfig, ValidationConfig,
};

/// A tenant's model pipeline: Kafka input → streaming features → ONNX model → Kafka output,
/// run by streamscore in isolated worker pods.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "streamscore.io",
    version = "v1alpha1",
    kind = "TenantModel",
    plural = "tenantmodels",
    doc = "A tenant's model pipeline: Kafka input → streaming features per key (RocksDB, event time) → ONNX model → \
           Kafka output, run by streamscore in isolated worker pods. `kubectl explain tenantmodel.spec` for every \
           field; `kubectl get tm` shows the phase, the reason and the model version.",
    shortname = "tm",
    namespaced,
    status = "TenantModelStatus",
    scale = r#"{"specReplicasPath":".spec.parallelism","statusReplicasPath":".status.parallelism","labelSelectorPath":".status.selector"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Model","type":"string","jsonPath":".status.modelVersion"}"#,
    printcolumn = r#"{"name":"Parallelism","type":"integer","jsonPath":".status.parallelism"}"#,
    printcolumn = r#"{"name":"Operation","type":"string","jsonPath":".status.operation.message","priority":1}"#,
    printcolumn = r#"{"name":"Upgrade","type":"string","jsonPath":".status.upgrade.message","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')").message(
        "metadata.name must be a DNS-1035 label (lowercase letters, digits and '-', starting with a letter), \
         as the names of the TenantModel's Services are"
    ),
    validation = Rule::new("size(self.metadata.name) <= 52").message(
        "metadata.name must be at most 52 characters, so that every child name (<name>-pipeline, <name>-blue, …) \
         stays within 63"
    ),
    validation = Rule::new("self.spec.sink.topic != self.spec.sink.deadLetterTopic")
        .message("spec.sink.deadLetterTopic must differ from spec.sink.topic"),
    validation = Rule::new(
        "!has(self.spec.sink.featureTopic) || (self.spec.sink.featureTopic != self.spec.sink.topic && \
         self.spec.sink.featureTopic != self.spec.sink.deadLetterTopic)"
    )
    .message("spec.sink.featureTopic must differ from spec.sink.topic and spec.sink.deadLetterTopic"),
    validation = Rule::new(
        "!has(self.spec.features) || !has(self.spec.features.emitted) || size(self.spec.features.emitted) == 0 || \
         has(self.spec.sink.featureTopic)"
    )
    .message("spec.sink.featureTopic is required when spec.features.emitted is set")
)]
#[serde(rename_all = "camelCase")]
pub struct TenantModelSpec {
    /// Number of worker pods. At most the input topic's partition count is useful
    /// (the partition is the unit of work). A change (or `kubectl scale tm`) on a running
    /// TenantModel is a rescale by checkpoint-and-restart, recorded step by step in
    /// `status.operation`: every worker stops consuming, commits and checkpoints its partitions
    /// (`Draining`); the worker Deployment gets the new replica count (`Scaling`); the operator
    /// waits until every partition is owned again, restored from its checkpoint
    /// (`checkpointStore`, or rebuilt from the input: `state.missingCheckpoint`) and caught up
    /// (`Restoring`). A step that does not finish within `state.rescaleTimeout` rolls back to the
    /// previous count (`RollingBack`); the outcome is in `status.lastRescale` and an Event.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub parallelism: i32,
    /// Stops the pipeline without deleting it. `true`: every worker stops consuming, commits
    /// its offsets and (with a `checkpointStore`) checkpoints each partition, as in a rescale's
    /// `Draining` step; then the workers are removed and the phase becomes `Suspended` (Event
    /// `Suspended`). Input arriving meanwhile waits in Kafka. `false` again: `parallelism`
    /// workers start from the committed offsets with state restored from those checkpoints
    /// (or rebuilt from the input, `state.missingCheckpoint`). A blue/green upgrade in progress
    /// finishes or rolls back first. A model or feature change made while suspended is applied
    /// when it resumes, without the blue/green gates (no live workers to compare with), and
    /// `status.plan` says so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
    /// Worker container image. Defaults to the operator's configured worker image. Any other
    /// image must match the operator's allowlist (Helm value `tenantPolicy.allowedImages`,
    /// possibly pinned by digest); otherwise the TenantModel is `Degraded` (`ImageNotAllowed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), regex(pattern = r"^[a-zA-Z0-9][a-zA-Z0-9._/:@-]*$"))]
    pub image: Option<String>,
    /// CPU and memory requests and limits of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Where each worker keeps its RocksDB state.
    #[serde(default)]
    pub state: StateVolume,
    /// Object-store URI for checkpoints of the workers' state (`s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix`, `file:///path`); the operator appends
    /// `/<namespace>/<name>`. When a partition moves to another worker (scale, pod replaced,
    /// rebalance), the new owner restores the partition's newest checkpoint and replays the input
    /// from there to the committed offsets without writing outputs twice. Unset: a moved
    /// partition is rebuilt from the input topic's retained records (see
    /// `state.missingCheckpoint`). Object-store credentials come from the worker's environment.
    /// Added, moved or removed on a running TenantModel, with `upgrade.type: BlueGreen` and
    /// workers available: a blue/green upgrade of kind `CheckpointStore` (the candidate writes to
    /// the new store, starting from the old store's checkpoints when both exist, else rebuilt
    /// from the input) and a cut-over; otherwise the workers restart in place with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_store: Option<String>,
    /// Object-store credentials for `checkpointStore`: a Secret in the TenantModel's namespace
    /// whose keys are named like the store's settings (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, and for an S3-compatible server `AWS_ENDPOINT`, `AWS_REGION`,
    /// `AWS_ALLOW_HTTP`; `GOOGLE_SERVICE_ACCOUNT_KEY`; `AZURE_STORAGE_ACCOUNT_NAME`,
    /// `AZURE_STORAGE_ACCOUNT_KEY`). Mounted into the workers as files, never as environment
    /// variables. Like `kafkaSecrets`, it must carry the label
    /// `streamscore.io/tenant-access: "true"`. Unset: the workers use their cloud identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_secret: Option<SecretRef>,
    /// Kafka credentials, from Secrets in the TenantModel's namespace (at most 8). Each Secret
    /// must carry the label `streamscore.io/tenant-access: "true"`, which the platform team sets;
    /// otherwise the TenantModel is `Degraded` (`KafkaSecretNotPermitted`) and nothing mounts it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub kafka_secrets: Vec<KafkaSecretRef>,
    /// How changes of the model (or anything that changes scores) are rolled out.
    #[serde(default)]
    pub upgrade: UpgradeStrategy,
    /// Sets `parallelism` from the measured input rate, lag and worker utilization (absent:
    /// `parallelism` is set by hand). The operator writes the new count through the scale
    /// subresource, as a HorizontalPodAutoscaler does, and it is applied by the same
    /// checkpoint-and-restart rescale as `kubectl scale tm`; while autoscaling is set, the
    /// autoscaler wins: a count set by hand stands until its next decision (after
    /// `cooldown`), and one outside the bounds is brought within them then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Kafka input: topics, key, event time, watermarks.
    pub source: SourceConfig,
    /// Field checks; failing events are dead-lettered with reason `invalid`.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Streaming features kept per entity key.
    #[serde(default)]
    pub features: FeaturesConfig,
    /// The ONNX model: where it comes from, its digest and version, and its inputs and outputs.
    pub model: ModelSpec,
    /// Score → label thresholds and output fields.
    #[serde(default)]
    pub postprocess: PostprocessConfig,
    /// Output and dead-letter topics.
    pub sink: SinkConfig,
}

fn one() -> i32 {
    1
}

/// The model and where it comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.configMap) != has(self.uri)",
    "message": "exactly one of model.configMap and model.uri must be set"
}]))]
pub struct ModelSpec {
    /// A ConfigMap key (binaryData) in the TenantModel's namespace holding the `.onnx` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<ConfigMapKeyRef>,
    /// A URI of the `.onnx` file, for models too large for a ConfigMap: `s3://bucket/path`,
    /// `gs://…`, `az://…` (credentials as for checkpoints: `checkpointSecret`, or the pod's
    /// cloud identity), or `file:///…` inside the worker image. Each worker downloads the file
    /// into its state volume and checks `sha256` before it loads it; until then it is not ready
    /// (`/readyz` and the `Degraded` condition say why, e.g. a digest mismatch). At most 1 GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Lowercase hex SHA-256 of the model file. Workers refuse a file that differs.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// Version label shown in status and carried in every output record.
    #[schemars(length(min = 1, max = 63))]
    pub version: String,
    /// Model inputs (feature order) and outputs (named scores), batching and runtime.
    #[serde(flatten)]
    pub signature: ModelSignature,
}

/// A key of a ConfigMap.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// ConfigMap name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
    /// Key inside the ConfigMap (`binaryData` or `data`).
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[-._a-zA-Z0-9]+$"))]
    pub key: String,
}

/// A Secret whose keys are exposed to the worker as files under
/// `/var/run/secrets/streamscore/kafka/<name>/` (reference them in Kafka properties as
/// `${file:/var/run/secrets/streamscore/kafka/<name>/<key>}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KafkaSecretRef {
    /// Secret name in the TenantModel's namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// A Secret in the TenantModel's namespace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Secret name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub name: String,
}

/// Where a worker keeps its RocksDB state, and how it is checkpointed and restored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StateVolume {
    /// Size of the state volume (e.g. `10Gi`). An `emptyDir` with this size limit when no
    /// storage class is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<String>,
    /// Storage class of a per-pod persistent volume. Empty: an `emptyDir` (state is restored
    /// from checkpoints or rebuilt from Kafka after a pod moves).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// How often each partition's changed state is checkpointed to `checkpointStore` (also on
    /// revoke and shutdown). Default 60s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval: Option<Duration>,
    /// Complete checkpoints kept per partition (1–100, default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub retain_checkpoints: Option<u32>,
    /// When neither the local store nor a checkpoint holds a partition's state up to the
    /// committed offsets: `rebuild` (default: replay from the earliest retained record, outputs
    /// only from the committed offset on, not ready until caught up) or `fail`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_checkpoint: Option<MissingCheckpoint>,
    /// How long each step of a rescale (draining and checkpointing, restoring) may take before
    /// the rescale is rolled back to the previous parallelism. Default 5m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rescale_timeout: Option<Duration>,
}

/// Autoscaling on lag. Every ~10 s the operator reads each live worker's metrics (records
/// consumed, consumer lag, time busy) and, over the last minute, measures the input rate, the
/// lag and the records one worker processes per busy second (its capacity). It wants enough
/// workers to process the input rate and work off the lag within `targetLagSeconds` while each
/// is busy no more than `targetUtilization` of its time: `ceil((inputRate + lag /
/// targetLagSeconds) / (capacity × targetUtilization))`, within `minParallelism`..
/// `maxParallelism` and never more than the input topic's partitions. It scales out at once,
/// and in only to the largest count it wanted during the last `scaleDownStabilization` (so a
/// flapping rate does not make it oscillate). It decides nothing during a rescale, an upgrade,
/// a suspension, or for `cooldown` after a rescale ended (the restart's own lag is not load).
/// Its measurements and last decision are in `status.autoscaling`, each decision an Event
/// `Autoscaled`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.minParallelism <= self.maxParallelism",
    "message": "spec.autoscaling.minParallelism must not exceed maxParallelism"
}]))]
pub struct Autoscaling {
    /// Fewest workers. Default 1.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 1024))]
    pub min_parallelism: i32,
    /// Most workers (the input topic's partition count caps it too).
    #[schemars(range(min = 1, max = 1024))]
    pub max_parallelism: i32,
    /// Within how many seconds the workers should be able to work off the current lag, on top
    /// of keeping up with the input rate. Default 30.
    #[serde(default = "default_target_lag_seconds")]
    #[schemars(range(min = 1, max = 86400))]
    pub target_lag_seconds: i32,
    /// The share of each worker's time (0.1–1) the autoscaler plans to use: headroom for
    /// bursts and for catching up after a restart. Default 0.7.
    #[serde(default = "default_target_utilization")]
    #[schemars(range(min = 0.1, max = 1.0))]
    pub target_utilization: f64,
    /// How long a lower count must have been enough before the autoscaler scales in. Default 5m.
    #[serde(default = "default_scale_down_stabilization")]
    pub scale_down_stabilization: Duration,
    /// How long after a rescale ends before the autoscaler measures and decides again.
    /// Default 1m.
    #[serde(default = "default_autoscaling_cooldown")]
    pub cooldown: Duration,
}

fn default_target_lag_seconds() -> i32 {
    30
}

fn default_target_utilization() -> f64 {
    0.7
}

fn default_scale_down_stabilization() -> Duration {
    Duration::from_secs(300)
}

fn default_autoscaling_cooldown() -> Duration {
    Duration::from_secs(60)
}

/// What the autoscaler measured and decided last (`spec.autoscaling`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoscalingStatus {
    /// The worker count the autoscaler wants now (before stabilization).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_parallelism: Option<i32>,
    /// Records per second arriving on the input topic (consumed plus lag growth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_rate: Option<f64>,
    /// Consumer lag in records, summed over partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_records: Option<i64>,
    /// The lag as time: records behind divided by what the workers process per second at
    /// full utilization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<f64>,
    /// The workers' mean utilization (0–1): the share of time they were not waiting for input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization: Option<f64>,
    /// Why the count is what it is (or why nothing was decided: measuring, cooldown).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the autoscaler last changed `parallelism` (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_scale_time: Option<String>,
}

/// How a change of what the workers compute (the model, the features, validation or
/// post-processing) is rolled out on a running TenantModel. Other pipeline changes (batching,
/// commit interval, Kafka properties, resources, image) restart the live workers in place.
///
/// `BlueGreen`: the operator writes the plan to `status.plan`, starts the new version (the
/// candidate colour) beside the live one with its own Deployment, ConfigMap and consumer group,
/// writing to shadow topics (`<topic><shadowSuffix>` for the output, dead-letter and feature
/// topics; create them, or let the brokers auto-create them). A model-only change starts from
/// the live version's newest checkpoints (`checkpointStore`); a feature change, or one without a
/// checkpoint store, rebuilds state by reading the input from the longest window back. The
/// operator scrapes both versions' `/metrics` and checks the gates (shown in
/// `status.upgrade.gates`): candidate ready, lag within `maxLag` of the live version's,
/// dead-letter rate at most `maxErrorRate` above the live version's on the same input (reason by
/// reason, so late or malformed events both versions reject do not count), and the distribution of the main score within `maxScoreDrift`
/// (population stability index over 20 buckets of [0, 1], on at least `minScoredEvents` events
/// scored by each version after the candidate caught up). Then it cuts over at an offset
/// barrier per partition: the live version stops after offset o, the candidate writes live
/// outputs from o on, so every input has one live output. A failed gate or the `deadline`
/// rolls back: the candidate is removed, the live version was never paused, `Degraded` says
/// why and the same spec is not tried again until it changes or the annotation
/// `streamscore.io/retry-upgrade` gets a new value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStrategy {
    /// `BlueGreen` (default) or `Recreate` (replace the workers in place: they restart,
    /// restore their state when the feature definitions are unchanged, and rebuild it otherwise).
    #[serde(default, rename = "type")]
    pub kind: UpgradeType,
    /// How long the candidate has to pass its gates before it is rolled back.
    #[serde(default = "default_deadline")]
    pub deadline: Duration,
    /// Largest consumer lag (records, all partitions) the candidate may have beyond the live
    /// version's at cut-over.
    #[serde(default = "default_max_lag")]
    #[schemars(range(min = 0))]
    pub max_lag: i64,
    /// Largest share (0–1) of the candidate's input records that may be dead-lettered beyond
    /// what the live version dead-letters of the same input: per reason (`late`, `malformed`,
    /// `inference`, ...), the candidate's rate minus the live version's, summed over reasons
    /// where the candidate's is higher. Records both versions reject (late, malformed) do not
    /// count against the candidate.
    #[serde(default = "default_max_error_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub max_error_rate: f64,
    /// Largest population stability index between the candidate's and the live version's
    /// main-score distributions (0.1: minor shift, 0.25: major).
    #[serde(default = "default_max_score_drift")]
    #[schemars(range(min = 0.0))]
    pub max_score_drift: f64,
    /// Events each version must have scored since the candidate caught up before the
    /// error-rate and drift gates are judged.
    #[serde(default = "default_min_scored")]
    #[schemars(range(min = 1, max = 100000000))]
    pub min_scored_events: i64,
    /// Suffix of the shadow topics the candidate writes to before the cut-over.
    #[serde(default = "default_shadow_suffix")]
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-zA-Z0-9._-]+$"))]
    pub shadow_suffix: String,
}

impl Default for UpgradeStrategy {
    fn default() -> Self {
        Self {
            kind: UpgradeType::default(),
            deadline: default_deadline(),
            max_lag: default_max_lag(),
            max_error_rate: default_max_error_rate(),
            max_score_drift: default_max_score_drift(),
            min_scored_events: default_min_scored(),
            shadow_suffix: default_shadow_suffix(),
        }
    }
}

fn default_max_score_drift() -> f64 {
    0.2
}

fn default_min_scored() -> i64 {
    1000
}

fn default_shadow_suffix() -> String {
    ".shadow".into()
}

fn default_deadline() -> Duration {
    Duration::from_secs(600)
}

fn default_max_lag() -> i64 {
    1000
}

fn default_max_error_rate() -> f64 {
    0.01
}

/// Upgrade strategies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradeType {
    /// Blue/green with health gates and automatic rollback.
    #[default]
    BlueGreen,
    /// Replace the workers in place.
    Recreate,
}

/// Observed state, written by the operator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantModelStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Pending`, `Running`, `Progressing`, `Degraded` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Ready`, `Progressing` and `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Colour of the live worker Deployment (`blue` or `green`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_color: Option<String>,
    /// Worker pods currently running the live colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallelism: Option<i32>,
    /// Label selector of the live workers (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Model version served by the live colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// The long operation in progress (a rescale), recorded before each of its actions so
    /// that a restarted operator resumes it; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<Operation>,
    /// How the latest rescale ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rescale: Option<RescaleOutcome>,
    /// How recent the checkpoints are, as the workers report them (refreshed about every minute
    /// with `checkpointStore`): the time of the oldest partition's newest complete checkpoint,
    /// so every partition's state is checkpointed at least this recently, with the count, e.g.
    /// `2026-11-30T04:12:17.120Z (6/6 partitions)`; or how many partitions have none yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<String>,
    /// What the latest change of the spec was classified as and what the operator does about
    /// it, e.g. `model-only change v1 → v2: blue/green, green starts from blue's checkpoints`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
    /// The blue/green upgrade in progress, recorded before each of its actions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<Upgrade>,
    /// How the latest upgrade ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upgrade: Option<UpgradeOutcome>,
    /// The latest rescales (suspends included) and upgrades that ended, newest first, at most
    /// 10: what changed, how it ended and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<HistoryEntry>,
    /// The autoscaler's measurements and last decision (`spec.autoscaling`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<AutoscalingStatus>,
}

/// One ended operation in `status.history`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    /// `Rescale` or `Upgrade`.
    pub kind: String,
    /// What changed: `2→4 workers`, or the model versions `v1→v2`.
    pub change: String,
    /// `Succeeded` or `RolledBack`.
    pub result: String,
    /// Detail (for a rollback: the reason).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
}

/// A blue/green upgrade in progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Upgrade {
    /// Its id (`u<unix seconds>`): the candidate's consumer group and checkpoint prefix end with it.
    pub id: String,
    /// The candidate's colour (`blue` or `green`).
    pub candidate: String,
    /// `ModelOnly` (the candidate starts from the live version's checkpoints), `Features`
    /// (the candidate rebuilds its state from the input) or `CheckpointStore` (only
    /// `checkpointStore` changed: the candidate writes its checkpoints to the new store,
    /// starting from the old store's, or rebuilt when either has none).
    pub kind: String,
    /// `Shadow` (candidate on the shadow topics, gates checked), `CuttingOver` (offset barrier:
    /// candidate paused, live version stopped and fenced, candidate live from the barrier),
    /// `RollingBack` (candidate removed).
    pub step: String,
    /// Model version of the live workers.
    pub from_version: String,
    /// Model version of the candidate.
    pub to_version: String,
    /// Hash of what the candidate computes (the normalised pipeline, the model digest and the
    /// `streamscore.io/retry-upgrade` annotation).
    pub spec_hash: String,
    /// What is happening.
    pub message: String,
    /// When the upgrade started (RFC 3339); `upgrade.deadline` counts from here.
    pub started_at: String,
    /// When the current step started (RFC 3339).
    pub step_started_at: String,
    /// With a rebuild: the input is read from this time on (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_from_ms: Option<i64>,
    /// The gates, as last evaluated.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gates: Vec<Gate>,
    /// Cut-over: where the candidate was paused, next input offset per topic and partition
    /// (JSON, e.g. `{"tx":{"0":1830,"1":1795}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_at: Option<String>,
    /// Cut-over attempts to stop the live version at or past the candidate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence_attempt: Option<u32>,
    /// The barrier: per input topic and partition, the first input offset whose live output
    /// the candidate writes (the live version stopped there). Once set, the upgrade only goes
    /// forward. JSON, as `candidateAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_from: Option<String>,
    /// When the live version stopped (RFC 3339, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced_at: Option<String>,
    /// Why it is rolling back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// One gate of an upgrade.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Gate {
    /// `Ready`, `Lag`, `ErrorRate` or `ScoreDrift`.
    pub name: String,
    /// `Passed`, `Waiting` or `Failed`.
    pub state: String,
    /// The measured value, e.g. `0.031 (2048 events)`.
    pub value: String,
    /// The threshold, e.g. `≤ 0.2`.
    pub threshold: String,
}

/// How an upgrade ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeOutcome {
    /// Model version before.
    pub from_version: String,
    /// Model version of the candidate.
    pub to_version: String,
    /// `Succeeded` or `RolledBack`.
    pub result: String,
    /// Detail (for a rollback: the failing gate and its value).
    pub message: String,
    /// The candidate's `specHash`: a rolled-back spec is not tried again until it changes.
    pub spec_hash: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// Seconds from the live version's stop to the candidate's first live output at the
    /// cut-over, as the operator saw it (an upper bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutover_seconds: Option<f64>,
}

/// A rescale in progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// `Rescale`.
    #[serde(rename = "type")]
    pub kind: OperationKind,
    /// `Draining` (workers stop consuming, commit and checkpoint every partition), `Scaling`
    /// (the new replica count is applied), `Restoring` (waiting until every partition is owned,
    /// restored and caught up), `RollingBack` (a step failed: back to `from` workers).
    pub step: OperationStep,
    /// Workers before.
    pub from: i32,
    /// Workers asked for (`spec.parallelism`).
    pub to: i32,
    /// What is happening, e.g. `Rescaling 3→6: waiting for checkpoints 4/6`.
    pub message: String,
    /// When the rescale started (RFC 3339).
    pub started_at: String,
    /// When the current step started (RFC 3339); `state.rescaleTimeout` counts from here.
    pub step_started_at: String,
    /// When the first worker stopped consuming (RFC 3339, milliseconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_at: Option<String>,
    /// Partitions checkpointed by the drain, of how many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpointed: Option<String>,
    /// Why the rescale is rolling back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// Kinds of long operations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OperationKind {
    /// A change of the worker count.
    #[default]
    Rescale,
}

/// Steps of a rescale.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum OperationStep {
    /// Workers stop consuming, commit, and checkpoint every owned partition.
    #[default]
    Draining,
    /// The new replica count is being applied.
    Scaling,
    /// Waiting until every partition is owned by a worker, restored and caught up.
    Restoring,
    /// A step failed or timed out: back to the previous worker count.
    RollingBack,
}

/// How a rescale ended.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RescaleOutcome {
    /// Workers before.
    pub from: i32,
    /// Workers asked for.
    pub to: i32,
    /// `Succeeded` or `RolledBack`.
    pub result: String,
    /// Detail (for a rollback: the reason).
    pub message: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// When it ended (RFC 3339).
    pub finished_at: String,
    /// Seconds during which input was not consumed: from the first worker's drain until the
    /// operator saw every partition owned, restored and caught up (resolution ~1 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_seconds: Option<f64>,
    /// The `metadata.generation` the rescale was for (a rolled-back rescale is retried after
    /// the spec changes or a while later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Rolled-back attempts in a row of this worker count for this generation. Each retry
    /// waits twice as long as the one before (5, 10, 20, 40 minutes); after 5 the operator
    /// stops retrying until the spec changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
}

/// Lifecycle phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Accepted; workers not yet available.
    Pending,
    /// Every worker is available.
    Running,
    /// An operation (rollout, rescale) is in progress.
    Progressing,
    /// The spec cannot be run as it is, or workers are failing; see conditions.
    Degraded,
    /// `spec.suspend`: no workers run; offsets and checkpoints are kept for the resume.
    Suspended,
}

/// A status condition, as in Kubernetes' `metav1.Condition`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// `Ready`, `Progressing`, `Degraded`, or `StateComplete` (False with reason
    /// `InputRetention` while some partition's state was built without records the input no
    /// longer retains).
    #[serde(rename = "type")]
    pub kind: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One-word CamelCase reason.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// When `status` last changed (RFC 3339).
    pub last_transition_time: String,
    /// The generation this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Labels every child of a TenantModel carries.
pub fn child_labels(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "streamscore-worker".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), name.to_owned()),
        ("app.kubernetes.io/managed-by".to_owned(), "streamscore-operator".to_owned()),
        ("streamscore.io/tenantmodel".to_owned(), name.to_owned()),
    ])
}
