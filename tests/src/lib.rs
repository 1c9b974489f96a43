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

/// Reads `topic` from the beginning until `want` records arrived or `timeout` passed.
pub fn consume(topic: &str, want: usize, timeout: Duration) -> Vec<Consumed> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", unique("reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    c.subscribe(&[topic]).expect("subscribe");
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_owned(), String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()))
                        .collect()
                })
                .unwrap_or_default();
            out.push(Consumed {
                key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                value: m.payload().unwrap_or_default().to_vec(),
                headers,
                partition: m.partition(),
            });
        }
    }
    out
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

/// A binary built by `cargo build --workspace` (make test builds them first).
pub fn built_binary(name: &str) -> std::path::PathBuf {
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| repo_root().join("target"), std::path::PathBuf::from);
    let p = target.join("debug").join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first (make test does)", p.display());
    p
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

/// Runs the operator's controllers in this process for `ns` until `cancel` fires.
pub fn spawn_operator(
    client: &kube::Client,
    ns: &str,
    worker_image: &str,
    cancel: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    spawn_operator_with_policy(client, ns, worker_image, Default::default(), cancel)
}

/// [`spawn_operator`] with the platform team's tenant policy (image allowlist, digests).
pub fn spawn_operator_with_policy(
    client: &kube::Client,
    ns: &str,
    worker_image: &str,
    policy: streamscore_operator::policy::TenantPolicy,
    cancel: &tokio_util::sync::CancellationToken,
) -> tokio::task::JoinHandle<()> {
    use std::sync::Arc;
    use streamscore_operator::build::BuildContext;
    use streamscore_operator::metrics::OperatorMetrics;
    use streamscore_operator::reconcile::Context;
    let ctx = Arc::new(Context {
        client: client.clone(),
        build: BuildContext { default_image: worker_image.into(), operator_namespace: "streamscore-system".into() },
        metrics: Arc::new(OperatorMetrics::new()),
        recorder: kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter { controller: "streamscore-operator".into(), instance: None },
        ),
        policy,
    });
    let (ns, c) = (ns.to_owned(), cancel.clone());
    tokio::spawn(async move { streamscore_operator::run_controllers(ctx, &[ns], c).await })
}
