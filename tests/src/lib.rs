//! Helpers for streamscore's integration tests. They run against the real Kafka broker and
//! the real kube-apiserver of the local environment (`make env-up` / `make test`), found
//! through `KAFKA_BOOTSTRAP_SERVERS` and `KUBECONFIG`. A missing component fails the test
//! with a message saying how to start it; nothing is skipped silently.

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Bootstrap servers of the local broker.
pub fn bootstrap() -> String {
    std::env::var("KAFKA_BOOTSTRAP_SERVERS")
        .expect("KAFKA_BOOTSTRAP_SERVERS is not set: run `make test`, or `make env-up && . .dev/env.sh` first")
}

/// A unique name for this test run.
pub fn unique(prefix: &str) -> String {
    let n: u32 = rand::random();
    format!("{prefix}-{n:08x}")
}

/// Creates topics (partitions each), waiting until they exist.
pub async fn create_topics(names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap()).create().expect("admin client");
    let topics: Vec<NewTopic<'_>> =
        names.iter().map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1))).collect();
    let res = admin
        .create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))))
        .await
        .expect("create_topics request (is Kafka running?)");
    for r in res {
        r.expect("topic created");
    }
}

/// Raises `topic`'s partition count to `total` (keys move to other partitions).
pub async fn add_partitions(topic: &str, total: usize) {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap()).create().expect("admin client");
    let res = admin
        .create_partitions(
            &[rdkafka::admin::NewPartitions::new(topic, total)],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("create_partitions request");
    for r in res {
        r.expect("partitions added");
    }
}

/// A producer with the Java clients' partitioner.
pub fn producer() -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "5")
        .create()
        .expect("producer")
}

/// Produces `(key, value)` records and waits for every acknowledgement.
pub async fn produce(p: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) {
    let futs: Vec<_> = records
        .iter()
        .map(|(k, v)| p.send(FutureRecord::to(topic).key(k).payload(v), Duration::from_secs(10)))
        .collect();
    for f in futs {
        f.await.expect("record acknowledged");
    }
}

/// [`produce`] with every record in flight at once (the enqueue of one does not wait for the
/// acknowledgement of the one before): thousands of records per second from one task.
pub async fn produce_concurrently(p: &FutureProducer, topic: &str, records: &[(String, Vec<u8>)]) {
    let futs = records.iter().map(|(k, v)| p.send(FutureRecord::to(topic).key(k).payload(v), Duration::from_secs(10)));
    for r in futures::future::join_all(futs).await {
        r.expect("record acknowledged");
    }
}

/// A consumed record.
#[derive(Debug, Clone)]
pub struct Consumed {
    /// Key as text.
    pub key: String,
    /// Value bytes.
    pub value: Vec<u8>,
    /// Headers as text.
    pub headers: Vec<(String, String)>,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record timestamp (ms).
    pub timestamp: Option<i64>,
}

impl Consumed {
    /// The value as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.value).expect("JSON value")
    }

    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// Reads `topic` from the beginning until `want` records arrived or `timeout` passed (only
/// committed records of transactional producers: librdkafka's `read_committed` default).
pub fn consume(topic: &str, want: usize, timeout: Duration) -> Vec<Consumed> {
    consume_with(topic, want, timeout, "read_committed")
}

/// As [`consume`], with `isolation.level` `isolation` (`read_uncommitted` also returns the
/// records of aborted and open transactions).
pub fn consume_with(topic: &str, want: usize, timeout: Duration, isolation: &str) -> Vec<Consumed> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", isolation)
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            out.push(Consumed::from_message(&m));
        }
    }
    out
}

impl Consumed {
    /// Copies a consumed message.
    pub fn from_message(m: &rdkafka::message::BorrowedMessage<'_>) -> Self {
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|x| (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Consumed {
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            value: m.payload().unwrap_or_default().to_vec(),
            headers,
            partition: m.partition(),
            offset: m.offset(),
            timestamp: m.timestamp().to_millis(),
        }
    }
}

/// Polls `f` until it returns Some or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A client for the local kube-apiserver.
pub async fn kube_client() -> kube::Client {
    assert!(
        std::env::var("KUBECONFIG").is_ok(),
        "KUBECONFIG is not set: run `make test`, or `make env-up && . .dev/env.sh` first"
    );
    kube::Client::try_default().await.expect("kube client from KUBECONFIG")
}

/// Creates a fresh namespace and returns its name.
pub async fn namespace(client: &kube::Client, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    let name = unique(prefix);
    let api: kube::Api<Namespace> = kube::Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("ns");
    api.create(&Default::default(), &ns).await.expect("create namespace (is kube-apiserver running?)");
    name
}

/// Repository root (for models and fixtures).
pub fn repo_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// A binary built by `cargo build --workspace` (make test builds them first). Refused when any
/// source file of the binaries' crates is newer than it: a test must not run a stale build.
pub fn built_binary(name: &str) -> std::path::PathBuf {
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| repo_root().join("target"), std::path::PathBuf::from);
    let p = target.join("debug").join(name);
    let built = std::fs::metadata(&p).and_then(|m| m.modified()).unwrap_or_else(|_| {
        panic!("{} is missing: run `cargo build --workspace --bins` first (make test does)", p.display())
    });
    // The workspace crates each binary is built from.
    let crates: &[&str] = match name {
        "streamscore-worker" => &["crds", "telemetry", "worker"],
        "streamscore-operator" => &["crds", "telemetry", "operator"],
        "streamscore-node-agent" => &["telemetry", "e2e/node-agent"],
        _ => &[],
    };
    let root = repo_root();
    let newest = crates
        .iter()
        .flat_map(|c| [root.join(c).join("src"), root.join(c).join("Cargo.toml")])
        .filter_map(|dir| newest_file(&dir))
        .max_by_key(|(t, _)| *t);
    if let Some((t, source)) = newest {
        assert!(
            t <= built,
            "{} is older than {}: run `cargo build --workspace --bins` first (make test does)",
            p.display(),
            source.display()
        );
    }
    p
}

/// The most recently modified file at or below `path`, with its time.
fn newest_file(path: &std::path::Path) -> Option<(std::time::SystemTime, std::path::PathBuf)> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.is_file() {
        return Some((meta.modified().ok()?, path.to_path_buf()));
    }
    std::fs::read_dir(path).ok()?.filter_map(|e| newest_file(&e.ok()?.path())).max_by_key(|(t, _)| *t)
}

/// Installs (server-side applies) the TenantModel CRD and waits until it is established.
pub async fn install_crd(client: &kube::Client) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Patch, PatchParams};
    use kube::CustomResourceExt;
    let crds: kube::Api<CustomResourceDefinition> = kube::Api::all(client.clone());
    crds.patch(
        "tenantmodels.streamscore.io",
        &PatchParams::apply("streamscore-tests").force(),
        &Patch::Apply(streamscore_crds::TenantModel::crd()),
    )
    .await
    .expect("CRD applied");
    eventually(Duration::from_secs(30), "CRD established", || async {
        let c = crds.get("tenantmodels.streamscore.io").await.ok()?;
        c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
    })
    .await;
}

/// A fresh namespace (name starting with `prefix`) holding the fraud model in ConfigMap
/// `fraud-model` (key `model.onnx`), with the CRD installed; returns it and the model's digest.
pub async fn namespace_with_model(client: &kube::Client, prefix: &str) -> (String, String) {
    use k8s_openapi::api::core::v1::ConfigMap;
    install_crd(client).await;
    let ns = namespace(client, prefix).await;
    let model = std::fs::read(repo_root().join("models/fraud-logreg.onnx")).unwrap();
    let sha = streamscore_worker::model::sha256_hex(&model);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "fraud-model"},
        "binaryData": {"model.onnx": k8s_openapi::ByteString(model)}
    }))
    .unwrap();
    kube::Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&Default::default(), &cm).await.unwrap();
    (ns, sha)
}

/// The smallest TenantModel of the operator tests, as JSON (tests change one field of it): one
/// window feature, the fraud model from ConfigMap `fraud-model` with digest `sha`.
pub fn minimal_tenant_model(name: &str, sha: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "streamscore.io/v1alpha1",
        "kind": "TenantModel",
        "metadata": {"name": name},
        "spec": {
            "source": {
                "bootstrapServers": "kafka:9092",
                "topics": ["payments"],
                "keyField": "user_id",
                "eventTime": {"field": "ts"}
            },
            "features": {"windows": [{"name": "tx_1h", "aggregation": "count", "window": "1h"}]},
            "model": {
                "configMap": {"name": "fraud-model", "key": "model.onnx"},
                "sha256": sha,
                "version": "v1",
                "features": ["tx_1h", "event.amount"],
                "outputs": [{"name": "fraud"}]
            },
            "sink": {"topic": "scores", "deadLetterTopic": "scores-dlq"}
        }
    })
}

/// Runs the operator's controllers in this process for `ns` until `cancel` fires.
pub fn spawn_operator(
    client: &kube::Client,
    ns: &str,
    worker_image: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_operator_with_policy(client, ns, worker_image, Default::default(), cancel)
}

/// Appends a row of the fault-injection table (`make chaos`) to `chaos-report.md` in the
/// environment's directory and prints it: the fault, the delivery mode, the inputs and how many
/// had two outputs (`counts`; none lost and none wrong, or the test failed before), the
/// evidence that the fault's path was taken, and how long it took.
pub fn chaos_report(
    section: &str,
    fault: &str,
    delivery: &str,
    counts: (usize, usize),
    evidence: &str,
    took: std::time::Duration,
) {
    use std::io::Write as _;
    let (inputs, duplicated) = counts;
    let text = format!(
        "## {section}\n\n| fault | delivery | inputs | lost | duplicated | wrong | evidence | took |\n\
         |---|---|---|---|---|---|---|---|\n| {fault} | {delivery} | {inputs} | 0 | {duplicated} | 0 | {evidence} | {:.0} s |\n",
        took.as_secs_f64()
    );
    eprintln!("{text}");
    let dir = std::env::var("STREAMSCORE_DEV_DIR").map_or_else(|_| std::env::temp_dir(), std::path::PathBuf::from);
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("chaos-report.md")) {
        let _ = f.write_all(text.as_bytes());
    }
}

/// Whether the end-to-end tests run on the real node (`scripts/test-node.sh` runs them inside
/// its network namespace with `STREAMSCORE_E2E_NODE=real`: kubelet, containerd, runc, the
/// workers' image) rather than on the node agent.
pub fn on_real_node() -> bool {
    std::env::var("STREAMSCORE_E2E_NODE").is_ok_and(|v| v == "real")
}

/// The worker image the end-to-end operator gives TenantModels: `STREAMSCORE_E2E_WORKER_IMAGE`
/// (the image imported into the real node's containerd), else `default` (a name the node agent
/// maps to the built binary).
pub fn e2e_worker_image(default: &str) -> String {
    std::env::var("STREAMSCORE_E2E_WORKER_IMAGE").unwrap_or_else(|_| default.to_owned())
}

/// SIGKILLs the worker process of the pod with this uid; false when there is none.
pub fn kill_worker_of_pod(uid: &str) -> bool {
    signal_worker_of_pod(uid, "KILL")
}

/// Sends `signal` (a `kill -s` name: `KILL`, `STOP`, `CONT`) to the worker process of the pod
/// with this uid; false when there is none. On the node agent the process's command line names
/// the pod; on the real node the process is in the pod's cgroup (`.../pod<uid>/<container>`,
/// the kubelet's cgroupfs layout) and is the worker binary (the pause process of the sandbox is
/// left alone).
pub fn signal_worker_of_pod(uid: &str, signal: &str) -> bool {
    if !on_real_node() {
        return std::process::Command::new("pkill")
            .args([&format!("-{signal}"), "-f", uid])
            .status()
            .is_ok_and(|s| s.success());
    }
    let mut sent = false;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if cgroup.contains(&format!("pod{uid}/")) && comm.starts_with("streamscore-wor") {
            sent |= std::process::Command::new("kill")
                .args(["-s", signal, &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
        }
    }
    sent
}

/// [`spawn_operator`] with the platform team's tenant policy (image allowlist, digests).
pub fn spawn_operator_with_policy(
    client: &kube::Client,
    ns: &str,
    worker_image: &str,
    policy: streamscore_operator::policy::TenantPolicy,
    cancel: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_operator_observed(client, ns, worker_image, policy, cancel).0
}

/// [`spawn_operator_with_policy`], also returning the operator's metrics (e.g. to wait for
/// completed reconciles: [`reconciles_done`]).
pub fn spawn_operator_observed(
    client: &kube::Client,
    ns: &str,
    worker_image: &str,
    policy: streamscore_operator::policy::TenantPolicy,
    cancel: &tokio_util::sync::CancellationToken,
) -> (tokio::task::JoinHandle<()>, std::sync::Arc<streamscore_operator::metrics::OperatorMetrics>) {
    spawn_operator_with_build(client, ns, build_context(worker_image), policy, cancel)
}

/// The operator's settings as the chart passes them (the operator binary's flags of the same
/// names, as JSON, from the environment): on the real node, workers request less CPU than the
/// default and the object store's port is opened to them.
pub fn build_context(worker_image: &str) -> streamscore_operator::build::BuildContext {
    streamscore_operator::build::BuildContext {
        default_image: worker_image.into(),
        operator_namespace: "streamscore-system".into(),
        kafka_prefix: None,
        default_resources: std::env::var("STREAMSCORE_WORKER_RESOURCES")
            .ok()
            .map(|v| serde_json::from_str(&v).expect("STREAMSCORE_WORKER_RESOURCES is a ResourceRequirements")),
        // As the chart's default: the e2e tests apply the egress rules (the local node agent
        // does not enforce NetworkPolicies, the real node does).
        worker_egress: Some(std::env::var("STREAMSCORE_WORKER_EGRESS").map_or_else(
            |_| Default::default(),
            |v| serde_json::from_str(&v).expect("STREAMSCORE_WORKER_EGRESS is a WorkerEgress"),
        )),
        metrics_from: None,
        worker_pod_template: Default::default(),
    }
}

/// [`spawn_operator_observed`] with these settings.
pub fn spawn_operator_with_build(
    client: &kube::Client,
    ns: &str,
    build: streamscore_operator::build::BuildContext,
    policy: streamscore_operator::policy::TenantPolicy,
    cancel: &tokio_util::sync::CancellationToken,
) -> (tokio::task::JoinHandle<()>, std::sync::Arc<streamscore_operator::metrics::OperatorMetrics>) {
    use std::sync::Arc;
    use streamscore_operator::metrics::OperatorMetrics;
    use streamscore_operator::reconcile::Context;
    let metrics = Arc::new(OperatorMetrics::new());
    let ctx = Arc::new(Context {
        client: client.clone(),
        build,
        metrics: metrics.clone(),
        recorder: streamscore_operator::reconcile::Events::new(
            client.clone(),
            kube::runtime::events::Reporter { controller: "streamscore-operator".into(), instance: None },
        ),
        policy,
        workers: Default::default(),
        baselines: Default::default(),
        autoscalers: Default::default(),
    });
    let (ns, c) = (ns.to_owned(), cancel.clone());
    (tokio::spawn(async move { streamscore_operator::run_controllers(ctx, &[ns], c).await }), metrics)
}

/// Reconciles the operator has finished (its duration histogram's count).
pub fn reconciles_done(metrics: &streamscore_operator::metrics::OperatorMetrics) -> u64 {
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("streamscore_operator_reconcile_duration_seconds_count ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// A worker (the library's Kafka loop) running on a thread of the test process.
pub struct RunningWorker {
    /// Stops it (drain, commit, checkpoint).
    pub cancel: tokio_util::sync::CancellationToken,
    /// The loop's thread.
    pub thread: std::thread::JoinHandle<Result<(), String>>,
    /// Owned partitions' state, for the query API.
    pub readers: streamscore_worker::engine::Readers,
    /// Readiness facts.
    pub health: std::sync::Arc<streamscore_worker::kafka::Health>,
    /// Its metrics.
    pub metrics: std::sync::Arc<streamscore_worker::metrics::Metrics>,
}

/// Starts the worker's Kafka loop for `cfg` on a thread (with checkpoints when `cfg.state`
/// names a store).
pub fn start_worker(cfg: &streamscore_crds::PipelineConfig) -> RunningWorker {
    use std::sync::Arc;
    use streamscore_worker::engine::Engine;
    use streamscore_worker::kafka::{self, Health};
    use streamscore_worker::metrics::Metrics;
    use streamscore_worker::model::Model;
    use streamscore_worker::state::StoreEnv;
    let cfg = Arc::new(cfg.clone());
    let model = Arc::new(Model::load(&cfg.model).expect("model loads"));
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    *health.model.write().unwrap() = Some(Ok(cfg.model.version.clone()));
    let stores = StoreEnv::new(&cfg.runtime.state_dir, 8 << 20, 10_000);
    let engine = Engine::from_config(cfg.clone(), model, stores, metrics.clone()).expect("checkpoint store opens");
    let readers = engine.readers();
    let cancel = tokio_util::sync::CancellationToken::new();
    let (c, m, h) = (cancel.clone(), metrics.clone(), health.clone());
    let thread = std::thread::spawn(move || kafka::run(cfg, engine, m, h, c).map_err(|e| e.to_string()));
    RunningWorker { cancel, thread, readers, health, metrics }
}

impl RunningWorker {
    /// Stops it and waits; panics when it did not exit cleanly.
    pub fn stop(self) {
        self.cancel.cancel();
        self.thread.join().expect("worker thread").expect("worker exits cleanly");
    }

    /// Stops it and returns how the loop ended.
    pub fn join(self) -> Result<(), String> {
        self.cancel.cancel();
        self.thread.join().expect("worker thread")
    }
}

/// Streams of events with unique ids and the feature values a pipeline must compute for them,
/// recomputed from the raw input with plain code (never with the worker's functions).
/// The pipeline they fit: `tx_1h` (count, 1h), `amount_24h` (sum of `amount`, 24h), `rides_1h`
/// (count of `action == ride_requested`, 1h), all at 1 s resolution, and `last_actions` (last 4
/// `action`s, 90 days), with `id` passed through.
pub mod oracle {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use serde_json::json;

    use crate::consume;

    const HOUR: i64 = 3_600_000;
    /// Bucket resolution of the windows (1 s).
    pub const RESOLUTION: i64 = 1_000;

    /// One input event.
    #[derive(Clone, Debug)]
    pub struct Ev {
        /// Unique id, passed through to the output (`fields.id`).
        pub id: u64,
        /// Entity key.
        pub key: String,
        /// Event time (ms).
        pub ts: i64,
        /// Amount.
        pub amount: f64,
        /// Action.
        pub action: &'static str,
    }

    impl Ev {
        /// The Kafka record (key, JSON value).
        pub fn record(&self) -> (String, Vec<u8>) {
            let v = json!({"id": self.id, "user_id": self.key, "ts": self.ts, "amount": self.amount, "action": self.action});
            (self.key.clone(), v.to_string().into_bytes())
        }
    }

    /// `n` events from id `first` on, over `keys` keys, 100 ms apart plus up to 2 s of disorder
    /// (within the 5 s allowed: none is late).
    pub fn events(first: u64, n: u64, keys: u64, base: i64) -> Vec<Ev> {
        (first..first + n)
            .map(|id| {
                let mix = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17;
                Ev {
                    id,
                    key: format!("u{}", mix % keys),
                    ts: base + id as i64 * 100 + (mix % 2_000) as i64,
                    amount: (id % 17) as f64 * 0.5,
                    action: match id % 5 {
                        0 => "ride_requested",
                        1 => "purchase",
                        _ => "view",
                    },
                }
            })
            .collect()
    }

    /// Expected feature values of every event, from the raw input: per key, in the order the
    /// events were produced (a key's events share a partition, so this is the processing order),
    /// over the events up to and including this one with event time in the window [S, t], S =
    /// (floor((t − W)/r) + 1)·r (README, "Feature semantics"), and the 90-day sequence.
    pub fn oracle(all: &[Ev]) -> HashMap<u64, serde_json::Value> {
        let mut by_key: HashMap<&str, Vec<&Ev>> = HashMap::new();
        for e in all {
            by_key.entry(&e.key).or_default().push(e);
        }
        let mut want = HashMap::new();
        for evs in by_key.values() {
            for (j, e) in evs.iter().enumerate() {
                let seen = &evs[..=j];
                // The documented rule at resolution r: event times in [S, t], S = (floor((t − W)/r) + 1)·r.
                let within = |w: i64| {
                    let start = ((e.ts - w).div_euclid(RESOLUTION) + 1) * RESOLUTION;
                    seen.iter().filter(move |x| x.ts >= start && x.ts <= e.ts)
                };
                let mut seq: Vec<(i64, usize, &str)> = seen
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.ts > e.ts - 90 * 24 * HOUR && x.ts <= e.ts)
                    .map(|(i, x)| (x.ts, i, x.action))
                    .collect();
                seq.sort_unstable();
                let last: Vec<&str> = seq.iter().rev().take(4).rev().map(|x| x.2).collect();
                want.insert(
                    e.id,
                    json!({
                        "tx_1h": within(HOUR).count() as f64,
                        "amount_24h": within(24 * HOUR).map(|x| x.amount).sum::<f64>(),
                        "rides_1h": within(HOUR).filter(|x| x.action == "ride_requested").count() as f64,
                        "last_actions": last,
                    }),
                );
            }
        }
        want
    }

    /// Reads the output topic until every id of `want_ids` has an output (or `timeout`); returns
    /// (id, features) of every output, duplicates included.
    pub fn outputs(topic: &str, want_ids: usize, timeout: Duration) -> Vec<(u64, serde_json::Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            let got: Vec<(u64, serde_json::Value)> = consume(topic, usize::MAX, Duration::from_secs(4))
                .iter()
                .map(|c| {
                    let v = c.json();
                    (v["fields"]["id"].as_u64().expect("id passed through"), v["features"].clone())
                })
                .collect();
            let distinct: std::collections::HashSet<u64> = got.iter().map(|g| g.0).collect();
            if distinct.len() >= want_ids || Instant::now() > deadline {
                return got;
            }
        }
    }

    /// Asserts that every output carries the expected features and every id has one; returns the
    /// number of outputs per id.
    pub fn check(got: &[(u64, serde_json::Value)], want: &HashMap<u64, serde_json::Value>) -> HashMap<u64, usize> {
        let mut seen: HashMap<u64, usize> = HashMap::new();
        let mut wrong = Vec::new();
        for (id, features) in got {
            *seen.entry(*id).or_default() += 1;
            let w = &want[id];
            let ok = ["tx_1h", "rides_1h", "last_actions"].iter().all(|f| features[f] == w[f])
                && (features["amount_24h"].as_f64().unwrap() - w["amount_24h"].as_f64().unwrap()).abs() < 1e-6;
            if !ok {
                wrong.push(format!("event {id}: got {features}, want {w}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} outputs with wrong features, e.g.:\n{}",
            wrong.len(),
            wrong[..wrong.len().min(5)].join("\n")
        );
        let missing: Vec<_> = want.keys().filter(|id| !seen.contains_key(id)).take(5).collect();
        assert!(missing.is_empty(), "{} inputs without output, e.g. {missing:?}", want.len() - seen.len());
        seen
    }

    /// The sum of the samples of a metric (name with or without labels) in a Prometheus text.
    pub fn metric(text: &str, name: &str) -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

/// An input record (key, JSON) with its event time.
pub type Timed = (i64, (String, Vec<u8>));

/// The events of `user` that make the reference pipeline's features of its last event (tagged
/// `"last": true`) exactly the tree models' reference row `[tx_1h, amount_24h, rides_1h,
/// amount]`: one event 2 h earlier carries `amount_24h − amount` (inside the 24 h window,
/// outside the 1 h ones), `tx_1h − 1` events of amount 0 in the last hour, `rides_1h` of them
/// (or of them and the last) `ride_requested`. None for a row no events can make (fractional
/// counts, more rides than events). `n` (the user's number) keeps users' event times apart.
pub fn tree_reference_events(user: &str, row: &[f64], base: i64, n: i64) -> Option<Vec<Timed>> {
    let (tx, a24, rides, amount) = (row[0] as i64, row[1], row[2] as i64, row[3]);
    if tx < 1 || rides > tx || row[0].fract() != 0.0 || row[2].fract() != 0.0 {
        return None;
    }
    let ev = |ts: i64, amount: f64, action: &str, last: bool| {
        let v = serde_json::json!({"user_id": user, "ts": ts, "amount": amount, "action": action, "merchant": "m", "last": last});
        (ts, (user.to_owned(), v.to_string().into_bytes()))
    };
    let mut out = vec![ev(base + n, a24 - amount, "view", false)];
    // The last event counts itself in tx_1h and, if it is a ride, in rides_1h.
    let last_is_ride = rides == tx;
    let prior_rides = if last_is_ride { rides - 1 } else { rides };
    for j in 0..tx - 1 {
        let action = if j < prior_rides { "ride_requested" } else { "view" };
        out.push(ev(base + 7_200_000 + j * 1_000 + n, 0.0, action, false));
    }
    out.push(ev(base + 7_200_000 + 1_800_000 + n, amount, if last_is_ride { "ride_requested" } else { "view" }, true));
    Some(out)
}

/// The input for a tree model's reference rows (`models/<name>.reference.json`): every feasible
/// row becomes a user `u<row>` with [`tree_reference_events`], all events in event-time order.
/// Returns the records and, per user, the row and the training library's score.
#[allow(clippy::type_complexity)]
pub fn tree_reference_input(
    reference: &serde_json::Value,
) -> (Vec<(String, Vec<u8>)>, std::collections::HashMap<String, (Vec<f64>, f64)>) {
    let base = 1_795_900_000_000i64;
    let mut want = std::collections::HashMap::new();
    let mut events = Vec::new();
    for (i, (row, score)) in
        reference["inputs"].as_array().unwrap().iter().zip(reference["scores"].as_array().unwrap()).enumerate()
    {
        let row: Vec<f64> = row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let user = format!("u{i}");
        if let Some(evs) = tree_reference_events(&user, &row, base, i as i64) {
            want.insert(user, (row, score.as_f64().unwrap()));
            events.extend(evs);
        }
    }
    assert!(want.len() > 150, "{} feasible reference rows", want.len());
    events.sort_by_key(|(ts, _)| *ts);
    (events.into_iter().map(|(_, r)| r).collect(), want)
}

/// Checks the outputs of [`tree_reference_input`]'s records: each user's last event has the
/// reference row's features and model `version`, and a score within 1e-5 of the training
/// library's (`what` names the model in messages).
pub fn check_tree_scores(
    scored: &[Consumed],
    want: &std::collections::HashMap<String, (Vec<f64>, f64)>,
    version: &str,
    what: &str,
) {
    let mut checked = 0;
    for s in scored {
        let v = s.json();
        if v["fields"]["last"] != serde_json::json!(true) {
            continue;
        }
        let (row, score) = &want[v["key"].as_str().unwrap()];
        let f = &v["features"];
        let got_row = [&f["tx_1h"], &f["amount_24h"], &f["rides_1h"]].map(|x| x.as_f64().unwrap());
        assert_eq!(got_row, [row[0], row[1], row[2]], "{what} {}: features", v["key"]);
        assert_eq!(v["modelVersion"], version);
        let got = v["scores"]["fraud"].as_f64().unwrap();
        assert!((got - score).abs() < 1e-5, "{what} {}: score {got}, the training library's {score}", v["key"]);
        checked += 1;
    }
    assert_eq!(checked, want.len(), "{what}: one last event per user");
}

/// The reference pipeline (the fraud example's features and logistic-regression model) reading
/// `input` and writing `out` and `dlq`, validated.
pub fn reference_pipeline(
    input: &str,
    out: &str,
    dlq: &str,
    group: &str,
    state: &str,
) -> streamscore_crds::PipelineConfig {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("models/fraud-logreg.reference.json")).unwrap())
            .unwrap();
    let yaml = format!(
        r#"
source:
  bootstrapServers: "{bs}"
  topics: [{input}]
  groupId: {group}
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
  path: {model}
  sha256: "{sha}"
  version: logreg-v1
  features: [tx_1h, amount_24h, rides_1h, event.amount]
  outputs: [{{name: fraud, output: 0, column: 0}}]
  batch: {{maxSize: 32, maxDelay: 2ms}}
postprocess:
  labels: [{{label: review, minScore: 0.5}}, {{label: block, minScore: 0.9}}]
  passthrough: [merchant]
sink: {{topic: {out}, deadLetterTopic: {dlq}}}
runtime: {{stateDir: "{state}", httpListen: "127.0.0.1:0", commitInterval: 200ms}}
"#,
        bs = bootstrap(),
        model = repo_root().join("models/fraud-logreg.onnx").display(),
        sha = reference["sha256"].as_str().unwrap(),
    );
    let cfg = streamscore_crds::PipelineConfig::from_yaml(&yaml).unwrap();
    cfg.validate().unwrap();
    cfg
}

/// A worker process (the real binary) with its own state directory, HTTP port and log file.
/// Dropping it kills it (SIGKILL).
pub struct WorkerProcess {
    /// The process.
    pub child: std::process::Child,
    /// Its `runtime.httpListen` port on 127.0.0.1.
    pub port: u16,
    /// Its stdout and stderr.
    pub log: std::path::PathBuf,
}

impl WorkerProcess {
    /// Starts the worker binary on the pipeline in `file`, with `state` as its state directory.
    pub fn spawn(file: &std::path::Path, state: &std::path::Path, log: std::path::PathBuf) -> Self {
        let port = free_port();
        let child = std::process::Command::new(built_binary("streamscore-worker"))
            .args(["--pipeline", file.to_str().unwrap()])
            .env("STREAMSCORE_STATE_DIR", state)
            .env("STREAMSCORE_HTTP_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
            .spawn()
            .expect("worker binary starts");
        Self { child, port, log }
    }

    /// Its `/metrics` text (panics with its log when it does not answer).
    pub async fn metrics(&self) -> String {
        let url = format!("http://127.0.0.1:{}/metrics", self.port);
        match reqwest::get(&url).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("{url}: {e}; log:\n{}", std::fs::read_to_string(&self.log).unwrap_or_default()),
        }
    }

    /// Its `/metrics` text, or None while it does not answer (starting).
    pub async fn try_metrics(&self) -> Option<String> {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port)).await.ok()?.text().await.ok()
    }

    /// SIGKILL, and waits for the process to end.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pipeline of the test oracle ([`oracle::oracle`]): the reference pipeline's features at a
/// 1 s bucket resolution, the input's `id` passed through (outputs are matched to inputs by it),
/// no labels.
pub fn oracle_pipeline(
    input: &str,
    out: &str,
    dlq: &str,
    group: &str,
    state: &str,
) -> streamscore_crds::PipelineConfig {
    let mut cfg = reference_pipeline(input, out, dlq, group, state);
    for w in &mut cfg.features.windows {
        w.resolution = Some(streamscore_crds::Duration::from_secs(1));
    }
    cfg.model.signature.batch.max_size = 64;
    cfg.postprocess.passthrough = vec!["id".into()];
    cfg.postprocess.labels.clear();
    cfg.validate().unwrap();
    cfg
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a worker's `runtime.httpListen`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}
