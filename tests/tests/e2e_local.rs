//! End to end on this machine: the real control plane, the operator, the node agent running
//! worker pods as local processes, the real broker. Asserts on data: every produced event is
//! scored, features are answered by a pod's query API, a killed worker loses nothing, and a
//! deleted TenantModel stops its processes.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use streamscore_crds::tenantmodel::{OperationStep, Phase, TenantModel};
use streamscore_tests::{
    bootstrap, built_binary, consume, create_topics, eventually, install_crd, kube_client, namespace, produce,
    producer, repo_root, unique,
};
use tokio_util::sync::CancellationToken;

/// One test at a time runs a node agent: the scheduler places a TenantModel's pods on any Ready
/// node, so tests running side by side would run each other's pods, and a test that ends would
/// take the other's pods down with its agent. Held for a whole test (declared first, dropped
/// last, after the agent has stopped its pods and deleted its Node).
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        // SIGTERM: the agent stops its pods (each worker drains and commits) and deletes its
        // Node; SIGKILL only if that takes more than a minute.
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        for _ in 0..600 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
    }
}

fn events(users: usize, per_user: i64, start: i64) -> Vec<(String, Vec<u8>)> {
    let base = 1_795_600_000_000i64;
    let mut v = Vec::new();
    for i in start..start + per_user {
        for u in 0..users {
            let user = format!("e2e-user-{u}");
            let ev = json!({"user_id": user, "ts": base + i * 1_000 + u as i64, "amount": 20 + i, "action": "view", "merchant": "m"});
            v.push((user, ev.to_string().into_bytes()));
        }
    }
    v
}

fn ids(records: &[streamscore_tests::Consumed]) -> BTreeSet<(String, i64)> {
    records
        .iter()
        .map(|r| {
            let v = r.json();
            (v["key"].as_str().unwrap().to_owned(), v["eventTime"].as_i64().unwrap())
        })
        .collect()
}

fn input_ids(evs: &[(String, Vec<u8>)]) -> BTreeSet<(String, i64)> {
    evs.iter()
        .map(|(k, v)| {
            let j: serde_json::Value = serde_json::from_slice(v).unwrap();
            (k.clone(), j["ts"].as_i64().unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenantmodel_runs_end_to_end_on_the_local_node() {
    let _node = NODE.lock().await;
    let client = kube_client().await;
    install_crd(&client).await;
    let ns = namespace(&client, "e2e").await;
    let (input, out, dlq) = (unique("e2e-in"), unique("e2e-out"), unique("e2e-dlq"));
    create_topics(&[&input, &out, &dlq], 4).await;
    let model = std::fs::read(repo_root().join("models/fraud-logreg.onnx")).unwrap();
    let sha = streamscore_worker::model::sha256_hex(&model);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "model"}, "binaryData": {"model.onnx": k8s_openapi::ByteString(model)}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();

    // Pod volumes and logs stay in the environment's directory for post-mortems.
    let work = tempfile::Builder::new()
        .prefix("e2e-node-")
        .tempdir_in(std::env::var("STREAMSCORE_DEV_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()))
        .unwrap();
    let work = work.keep();
    let node = unique("node");
    let _agent = Agent(
        Command::new(built_binary("streamscore-node-agent"))
            .args(["--node-name", &node, "--work-dir", work.as_path().to_str().unwrap(), "--subnet", "78"])
            .arg(format!("--image=streamscore-worker={}", built_binary("streamscore-worker").display()))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.as_path().join("agent.log")).unwrap())
            .spawn()
            .expect("node agent starts"),
    );
    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, "streamscore-worker:e2e", &cancel);

    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(json!({
        "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
        "metadata": {"name": "fraud"},
        "spec": {
            "parallelism": 2,
            "source": {"bootstrapServers": bootstrap(), "topics": [input], "keyField": "user_id",
                       "eventTime": {"field": "ts"}, "maxOutOfOrderness": "5s"},
            "features": {"windows": [
                {"name": "tx_1h", "aggregation": "count", "window": "1h"},
                {"name": "amount_24h", "aggregation": "sum", "field": "amount", "window": "24h"},
                {"name": "rides_1h", "aggregation": "count", "window": "1h", "filter": {"field": "action", "oneOf": ["ride_requested"]}}
            ]},
            "model": {"configMap": {"name": "model", "key": "model.onnx"}, "sha256": sha, "version": "e2e-v1",
                      "features": ["tx_1h", "amount_24h", "rides_1h", "event.amount"], "outputs": [{"name": "fraud"}]},
            "sink": {"topic": out, "deadLetterTopic": dlq}
        }
    })).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    let log = work.as_path().join("agent.log");
    let st = eventually(Duration::from_secs(120), "TenantModel Running", || async {
        tms.get("fraud").await.ok()?.status.filter(|s| s.phase == Some(Phase::Running))
    })
    .await;
    assert_eq!(st.parallelism, Some(2), "agent log: {}", std::fs::read_to_string(&log).unwrap_or_default());

    // Every produced event is scored.
    let p = producer();
    let first = events(40, 5, 0);
    produce(&p, &input, &first).await;
    let scored = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 200, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(ids(&scored), input_ids(&first), "every event scored");
    let v = scored.iter().map(|r| r.json()).find(|v| v["key"] == "e2e-user-3" && v["features"]["tx_1h"] == json!(5.0));
    assert!(v.is_some(), "user 3's fifth event counts 5 transactions in the hour");

    // Every worker pod answers the key's features: the owner from its state, the other one by
    // forwarding the query to the owner (found from the consumer group's description), and
    // both say which worker answered.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("streamscore.io/tenantmodel=fraud");
    let ips: Vec<String> =
        pods.list(&lp).await.unwrap().items.iter().filter_map(|p| p.status.as_ref()?.pod_ip.clone()).collect();
    assert_eq!(ips.len(), 2);
    let http = reqwest::Client::new();
    let mut owners = BTreeSet::new();
    for ip in &ips {
        let (owner, body) = eventually(Duration::from_secs(20), "query answer", || async {
            let r = http.get(format!("http://{ip}:8080/v1/entities/e2e-user-3")).send().await.ok()?;
            let owner = r.headers().get("x-streamscore-owner")?.to_str().ok()?.to_owned();
            let partition = r.headers().get("x-streamscore-partition")?.to_str().ok()?.to_owned();
            let ok = r.status().as_u16() == 200;
            let j: serde_json::Value = r.json().await.ok()?;
            // 200 once the owner's state is flushed (at most one commit interval behind).
            (ok && j["features"]["tx_1h"] == json!(5.0)
                && j["partition"].as_i64().map(|p| p.to_string()) == Some(partition))
            .then_some((owner, j))
        })
        .await;
        assert_eq!(body["key"], "e2e-user-3", "{body}");
        owners.insert(owner);
    }
    assert_eq!(owners.len(), 1, "both pods name the same owner: {owners:?}");
    let owner = owners.into_iter().next().unwrap();
    assert!(ips.iter().any(|ip| owner == format!("{ip}:8080")), "the owner {owner} is one of the pods {ips:?}");

    // A second tenant whose model file is corrupt (its digest matches, so only the worker can
    // tell): Degraded with the worker's own reason, while the first tenant keeps scoring below.
    let garbage = b"definitely not an onnx model".to_vec();
    let garbage_sha = streamscore_worker::model::sha256_hex(&garbage);
    let broken_cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "broken-model"}, "binaryData": {"model.onnx": k8s_openapi::ByteString(garbage)}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &broken_cm).await.unwrap();
    let (b_in, b_out, b_dlq) = (unique("e2e-b-in"), unique("e2e-b-out"), unique("e2e-b-dlq"));
    create_topics(&[&b_in, &b_out, &b_dlq], 1).await;
    let broken: TenantModel = serde_json::from_value(json!({
        "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
        "metadata": {"name": "broken"},
        "spec": {
            "parallelism": 1,
            "source": {"bootstrapServers": bootstrap(), "topics": [b_in], "keyField": "user_id", "eventTime": {"field": "ts"}},
            "features": {"windows": [{"name": "tx_1h", "aggregation": "count", "window": "1h"}]},
            "model": {"configMap": {"name": "broken-model", "key": "model.onnx"}, "sha256": garbage_sha, "version": "bad",
                      "features": ["tx_1h"], "outputs": [{"name": "fraud"}]},
            "sink": {"topic": b_out, "deadLetterTopic": b_dlq}
        }
    }))
    .unwrap();
    tms.create(&PostParams::default(), &broken).await.unwrap();
    let st = eventually(Duration::from_secs(120), "broken tenant Degraded", || async {
        tms.get("broken").await.ok()?.status.filter(|s| s.phase == Some(Phase::Degraded))
    })
    .await;
    let cond = st.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
    assert_eq!(cond.reason, "ModelNotLoaded");
    assert!(cond.message.contains("ModelInvalid"), "{}", cond.message);

    // A third tenant whose input topic grows from 2 to 4 partitions: keys move to other
    // partitions, whose state does not hold their history. The worker refuses to score with it
    // and says why in its termination message; the TenantModel is Degraded with that reason.
    let (g_in, g_out, g_dlq) = (unique("e2e-g-in"), unique("e2e-g-out"), unique("e2e-g-dlq"));
    create_topics(&[&g_in, &g_out, &g_dlq], 2).await;
    let grown: TenantModel = serde_json::from_value(json!({
        "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
        "metadata": {"name": "grown"},
        "spec": {
            "parallelism": 1,
            // The consumer sees the new partitions within seconds (librdkafka's default: 5 min).
            "source": {"bootstrapServers": bootstrap(), "topics": [g_in], "keyField": "user_id", "eventTime": {"field": "ts"},
                       "properties": {"topic.metadata.refresh.interval.ms": "2000"}},
            "features": {"windows": [
                {"name": "tx_1h", "aggregation": "count", "window": "1h"},
                {"name": "amount_24h", "aggregation": "sum", "field": "amount", "window": "24h"},
                {"name": "rides_1h", "aggregation": "count", "window": "1h", "filter": {"field": "action", "oneOf": ["ride_requested"]}}
            ]},
            "model": {"configMap": {"name": "model", "key": "model.onnx"}, "sha256": sha, "version": "e2e-v1",
                      "features": ["tx_1h", "amount_24h", "rides_1h", "event.amount"], "outputs": [{"name": "fraud"}]},
            "sink": {"topic": g_out, "deadLetterTopic": g_dlq}
        }
    }))
    .unwrap();
    tms.create(&PostParams::default(), &grown).await.unwrap();
    eventually(Duration::from_secs(120), "grown tenant Running", || async {
        tms.get("grown").await.ok()?.status.filter(|s| s.phase == Some(Phase::Running))
    })
    .await;
    let g_events = events(10, 3, 0);
    produce(&producer(), &g_in, &g_events).await;
    let g_scored = tokio::task::spawn_blocking({
        let g_out = g_out.clone();
        move || consume(&g_out, 30, Duration::from_secs(60))
    })
    .await
    .unwrap();
    assert_eq!(ids(&g_scored), input_ids(&g_events), "the grown tenant scores before the change");
    streamscore_tests::add_partitions(&g_in, 4).await;
    let st = eventually(Duration::from_secs(180), "grown tenant Degraded (InputPartitionsChanged)", || async {
        let st = tms.get("grown").await.ok()?.status?;
        st.conditions.iter().any(|c| c.kind == "Degraded" && c.reason == "InputPartitionsChanged").then_some(st)
    })
    .await;
    let cond = st.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
    assert!(
        cond.message.contains("the input topic has 4 partitions") && cond.message.contains("when it had 2"),
        "{}",
        cond.message
    );
    assert_eq!(st.phase, Some(Phase::Degraded));
    tms.delete("grown", &DeleteParams::default()).await.unwrap();

    // Crash one worker process (SIGKILL): the agent restarts the container, and the events
    // produced below are all scored, as are the ones it was processing.
    let crashed = pods.list(&lp).await.unwrap().items[0].clone();
    let crashed_name = crashed.metadata.name.clone().unwrap();
    let uid = crashed.metadata.uid.clone().unwrap();
    assert!(streamscore_tests::kill_worker_of_pod(&uid), "no worker process for pod {uid}");
    eventually(Duration::from_secs(60), "container restart counted", || async {
        let p = pods.get(&crashed_name).await.ok()?;
        let restarts = p.status?.container_statuses?.first()?.restart_count;
        (restarts >= 1).then_some(())
    })
    .await;

    // Kill a worker pod: it is replaced and no event is lost (at-least-once).
    let victim = pods.list(&lp).await.unwrap().items[1].metadata.name.clone().unwrap();
    pods.delete(&victim, &DeleteParams::default()).await.unwrap();
    let second = events(40, 5, 5);
    produce(&p, &input, &second).await;
    let all = tokio::task::spawn_blocking({
        let out = out.clone();
        move || consume(&out, 400, Duration::from_secs(120))
    })
    .await
    .unwrap();
    let mut want = input_ids(&first);
    want.extend(input_ids(&second));
    assert_eq!(ids(&all), want, "no event lost across the pod kill");
    eventually(Duration::from_secs(90), "replacement pod running", || async {
        let items = pods.list(&lp).await.ok()?.items;
        let running = items
            .iter()
            .filter(|p| {
                p.metadata.name.as_deref() != Some(&victim)
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .count();
        (running == 2).then_some(())
    })
    .await;

    // Deleting the TenantModel stops its processes.
    tms.delete("fraud", &DeleteParams::foreground()).await.unwrap();
    eventually(Duration::from_secs(90), "worker pods gone", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    for ip in &ips {
        let r = http.get(format!("http://{ip}:8080/healthz")).send().await;
        assert!(r.is_err(), "a worker still answers on {ip}");
    }
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
}

/// The operator running in this process, stoppable (a restart loses everything it held in
/// memory; what it must resume is in status.operation).
struct Operator {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Operator {
    fn start(client: &kube::Client, ns: &str) -> Self {
        let cancel = CancellationToken::new();
        let image = streamscore_tests::e2e_worker_image("streamscore-worker:e2e");
        let task = streamscore_tests::spawn_operator(client, ns, &image, &cancel);
        Self { cancel, task }
    }

    async fn stop(self) {
        self.cancel.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// Follows status.operation until the rescale to `to` ends; with an operator, restarts it the
/// first time each step is seen. Returns the steps seen and the number of restarts.
async fn watch_rescale(
    tms: &Api<TenantModel>,
    name: &str,
    to: i32,
    mut restart: Option<(&mut Operator, &kube::Client, &str)>,
) -> (Vec<OperationStep>, usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    let mut seen: Vec<OperationStep> = Vec::new();
    let mut restarts = 0;
    loop {
        assert!(std::time::Instant::now() < deadline, "rescale to {to} did not finish; steps seen {seen:?}");
        let st = tms.get(name).await.ok().and_then(|t| t.status).unwrap_or_default();
        match &st.operation {
            Some(op) => {
                assert_eq!(op.to, to, "{op:?}");
                if !seen.contains(&op.step) {
                    seen.push(op.step);
                    eprintln!("rescale step {:?}: {}", op.step, op.message);
                    if let Some((operator, client, ns)) = restart.as_mut() {
                        let old = std::mem::replace(*operator, Operator::start(client, ns));
                        old.stop().await;
                        restarts += 1;
                    }
                }
            }
            None if st.last_rescale.as_ref().is_some_and(|l| l.to == to) => {
                let last = st.last_rescale.unwrap();
                assert_eq!(last.result, "Succeeded", "{last:?}");
                return (seen, restarts);
            }
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the checkpointing end-to-end tests share: a namespace with the model ConfigMap and the
/// S3 server's credentials in an opted-in Secret (`s3-credentials`), topics, and a node agent
/// whose pods get no AWS_* variables (only the Secret can take them to the S3 server).
struct CheckpointedEnv {
    client: kube::Client,
    ns: String,
    input: String,
    out: String,
    dlq: String,
    sha: String,
    /// None on the real node.
    _agent: Option<Agent>,
}

impl CheckpointedEnv {
    async fn start(prefix: &str, subnet: &str, partitions: i32) -> Self {
        Self::start_with(prefix, subnet, partitions, &[]).await
    }

    /// [`CheckpointedEnv::start`], with `worker_env` in every worker's environment (set by the
    /// node agent: fault injection).
    async fn start_with(prefix: &str, subnet: &str, partitions: i32, worker_env: &[(&str, &str)]) -> Self {
        let client = kube_client().await;
        install_crd(&client).await;
        let ns = namespace(&client, prefix).await;
        let (input, out, dlq) =
            (unique(&format!("{prefix}-in")), unique(&format!("{prefix}-out")), unique(&format!("{prefix}-dlq")));
        create_topics(&[&input, &out, &dlq], partitions).await;
        let model = std::fs::read(repo_root().join("models/fraud-logreg.onnx")).unwrap();
        let sha = streamscore_worker::model::sha256_hex(&model);
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "model"}, "binaryData": {"model.onnx": k8s_openapi::ByteString(model)}
        }))
        .unwrap();
        Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&PostParams::default(), &cm).await.unwrap();
        let work = tempfile::Builder::new()
            .prefix(&format!("e2e-{prefix}-"))
            .tempdir_in(
                std::env::var("STREAMSCORE_DEV_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
            )
            .unwrap()
            .keep();
        let mut creds = serde_json::Map::new();
        for var in ["AWS_ENDPOINT", "AWS_ALLOW_HTTP", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            let v = std::env::var(var)
                .unwrap_or_else(|_| panic!("{var} is not set: run `make test` (it starts the S3 server)"));
            creds.insert(var.to_owned(), json!(v));
        }
        let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
            "metadata": {"name": "s3-credentials", "labels": {"streamscore.io/tenant-access": "true"}},
            "stringData": creds,
        }))
        .unwrap();
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
        if streamscore_tests::on_real_node() {
            return Self { client, ns, input, out, dlq, sha, _agent: None };
        }
        let mut agent = Command::new(built_binary("streamscore-node-agent"));
        agent
            .args(["--node-name", &unique("node"), "--work-dir", work.as_path().to_str().unwrap(), "--subnet", subnet])
            .arg(format!("--image=streamscore-worker={}", built_binary("streamscore-worker").display()));
        for (k, v) in worker_env {
            agent.arg(format!("--env={k}={v}"));
        }
        for var in creds.keys() {
            agent.env_remove(var);
        }
        let agent = Agent(
            agent
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(work.as_path().join("agent.log")).unwrap())
                .spawn()
                .expect("node agent starts"),
        );
        Self { client, ns, input, out, dlq, sha, _agent: Some(agent) }
    }
}

impl CheckpointedEnv {
    /// The reference TenantModel these tests share: two workers, checkpoints every 2 s in the S3
    /// server (a fresh prefix), the fraud features and model at `version`, the input id passed
    /// through. Tests change what they exercise on the returned value.
    fn tenant_model(&self, name: &str, version: &str) -> serde_json::Value {
        let bucket = std::env::var("STREAMSCORE_S3_BUCKET").expect("STREAMSCORE_S3_BUCKET (make test sets it)");
        json!({
            "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
            "metadata": {"name": name},
            "spec": {
                "parallelism": 2,
                "checkpointStore": format!("s3://{bucket}/{}", unique("e2e")),
                "checkpointSecret": {"name": "s3-credentials"},
                "state": {"checkpointInterval": "2s"},
                "source": {"bootstrapServers": bootstrap(), "topics": [self.input], "keyField": "user_id",
                           "eventTime": {"field": "ts"}, "maxOutOfOrderness": "5s"},
                "validation": {"fields": [{"name": "amount", "type": "number"}, {"name": "action", "type": "string"}]},
                "features": {
                    "windows": [
                        {"name": "tx_1h", "aggregation": "count", "window": "1h", "resolution": "1s"},
                        {"name": "amount_24h", "aggregation": "sum", "field": "amount", "window": "24h", "resolution": "1s"},
                        {"name": "rides_1h", "aggregation": "count", "window": "1h", "resolution": "1s",
                         "filter": {"field": "action", "oneOf": ["ride_requested"]}}
                    ],
                    "sequences": [{"name": "last_actions", "field": "action", "length": 4, "lookback": "90d"}]
                },
                "model": self.model(version),
                "postprocess": {"passthrough": ["id"]},
                "sink": {"topic": self.out, "deadLetterTopic": self.dlq}
            }
        })
    }

    /// The fraud model (ConfigMap `model`) at `version`.
    fn model(&self, version: &str) -> serde_json::Value {
        json!({"configMap": {"name": "model", "key": "model.onnx"}, "sha256": self.sha, "version": version,
               "features": ["tx_1h", "amount_24h", "rides_1h", "event.amount"], "outputs": [{"name": "fraud"}]})
    }
}

/// A TenantModel whose model is a LightGBM tree ensemble (`models/fraud-lgbm.onnx`, 300 trees)
/// with `model.runtime: auto`: the operator carries the runtime and the output mapping (output
/// 1, column 1: P(fraud)) to the worker pods, the pods score on ONNX Runtime (tract cannot load
/// the `ai.onnx.ml` tree operators, so any score proves it), and every user's last score equals
/// LightGBM's own `predict_proba` within 1e-5, on features the test built its events for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_model_tenantmodel_scores_on_onnx_runtime_like_its_training_library() {
    let _node = NODE.lock().await;
    assert!(
        std::env::var_os("ORT_DYLIB_PATH").is_some(),
        "ORT_DYLIB_PATH must name ONNX Runtime's shared library (make test sets it; worker pods inherit it)"
    );
    let env = CheckpointedEnv::start("trees", "83", 2).await;
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let model = std::fs::read(repo_root().join("models/fraud-lgbm.onnx")).unwrap();
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("models/fraud-lgbm.reference.json")).unwrap()).unwrap();
    let sha = streamscore_worker::model::sha256_hex(&model);
    assert_eq!(reference["sha256"], json!(sha), "the reference scores are of this model file");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "trees"}, "binaryData": {"model.onnx": k8s_openapi::ByteString(model)}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&PostParams::default(), &cm).await.unwrap();
    let operator = Operator::start(&client, &ns);
    let mut spec = env.tenant_model("trees", "lgbm-v1");
    spec["spec"]["model"] = json!({
        "configMap": {"name": "trees", "key": "model.onnx"}, "sha256": sha, "version": "lgbm-v1", "runtime": "auto",
        "features": ["tx_1h", "amount_24h", "rides_1h", "event.amount"],
        "outputs": [{"name": "fraud", "output": 1, "column": 1}]
    });
    spec["spec"]["postprocess"] = json!({"passthrough": ["last"]});
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    tms.create(&PostParams::default(), &serde_json::from_value(spec).unwrap()).await.unwrap();
    eventually(Duration::from_secs(120), "TenantModel Running", || async {
        tms.get("trees").await.ok()?.status.filter(|s| s.phase == Some(Phase::Running))
    })
    .await;

    let (records, want) = streamscore_tests::tree_reference_input(&reference);
    let total = records.len();
    produce(&producer(), &env.input, &records).await;
    let scored = tokio::task::spawn_blocking({
        let out = env.out.clone();
        move || consume(&out, total, Duration::from_secs(120))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), total, "every event scored");
    streamscore_tests::check_tree_scores(&scored, &want, "lgbm-v1", "LightGBM");

    tear_down(client, &ns, "trees", operator).await;
}

/// Deletes TenantModel `name` (foreground), waits until its worker pods are gone, stops the
/// operator and deletes the namespace.
async fn tear_down(client: kube::Client, ns: &str, name: &str, operator: Operator) {
    Api::<TenantModel>::namespaced(client.clone(), ns).delete(name, &DeleteParams::foreground()).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().labels(&format!("streamscore.io/tenantmodel={name}"));
    eventually(Duration::from_secs(90), "worker pods gone", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    operator.stop().await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = nsapi.delete(ns, &DeleteParams::default()).await;
}

/// `kubectl scale tm` 2 → 4 → 1 while events flow, with checkpoints in the S3 server: each
/// rescale passes through its steps in status.operation (Draining: workers paused and
/// checkpointed through their admin API; Restoring), the operator restarted at every step of
/// the first one resumes it, pods are added and removed, partitions move between them and are
/// restored from checkpoints, no input is left without an output, every output's features equal
/// those recomputed from the raw input, and Events and status.lastRescale report the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_a_tenantmodel_moves_each_partition_with_its_state() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::{check, events as stream, metric, oracle, outputs, Ev};

    let env = CheckpointedEnv::start("scale", "79", 4).await;
    let (client, ns, input, out) = (env.client.clone(), env.ns.clone(), env.input.clone(), env.out.clone());
    let mut operator = Operator::start(&client, &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(env.tenant_model("scaled", "scale-v1")).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    let running = |n: i32| {
        let tms = tms.clone();
        async move {
            eventually(Duration::from_secs(120), &format!("TenantModel Running with {n} workers"), || async {
                let st = tms.get("scaled").await.ok()?.status?;
                (st.phase == Some(Phase::Running) && st.parallelism == Some(n)).then_some(())
            })
            .await;
        }
    };
    running(2).await;

    // 9,000 events over 4,500 keys at a steady pace while the TenantModel is scaled.
    let all = stream(0, 9_000, 4_500, 1_795_200_000_000); // in the past: see maxFutureSkew
    let want = oracle(&all);
    let producing = tokio::spawn({
        let (input, all) = (input.clone(), all.clone());
        async move {
            let p = producer();
            for chunk in all.chunks(300) {
                let recs: Vec<_> = chunk.iter().map(Ev::record).collect();
                produce(&p, &input, &recs).await;
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
        }
    });
    let scale = |n: i32| {
        let tms = tms.clone();
        async move {
            // What `kubectl scale tm scaled --replicas n` does: the scale subresource.
            tms.patch_scale("scaled", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": n}})))
                .await
                .expect("scale subresource");
        }
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    // 2 → 4 with the operator restarted at every step it is seen in: each restart resumes the
    // step recorded in status.operation.
    scale(4).await;
    let (steps, restarts) = watch_rescale(&tms, "scaled", 4, Some((&mut operator, &client, &ns))).await;
    assert!(steps.contains(&OperationStep::Draining) && steps.contains(&OperationStep::Restoring), "{steps:?}");
    assert!(restarts >= 2, "the operator was restarted during the rescale ({restarts} times, steps {steps:?})");
    running(4).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    scale(1).await;
    let (steps, _) = watch_rescale(&tms, "scaled", 1, None).await;
    assert!(steps.contains(&OperationStep::Draining), "{steps:?}");
    running(1).await;
    producing.await.unwrap();
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 9_000, Duration::from_secs(240))
    })
    .await
    .unwrap();
    check(&got, &want);

    // The one pod left owns every partition; some of them were restored from checkpoints.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("streamscore.io/tenantmodel=scaled");
    let ips: Vec<String> = pods
        .list(&lp)
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    assert_eq!(ips.len(), 1, "{ips:?}");
    // From the metrics port (9090, what the NetworkPolicy opens to scrapers).
    let m = reqwest::get(format!("http://{}:9090/metrics", ips[0])).await.unwrap().text().await.unwrap();
    assert!(metric(&m, "streamscore_worker_partitions ") >= 4.0, "{m}");
    assert!(
        metric(&m, "streamscore_worker_partition_assignments_total{source=\"checkpoint\"}") >= 1.0,
        "a moved partition was restored from a checkpoint:\n{m}"
    );
    // Each rescale said what it did: Events and status.lastRescale.
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> =
        evs.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    for r in ["RescaleStarted", "RescaleCheckpointed", "RescaleCompleted"] {
        assert!(reasons.iter().any(|x| x == r), "Event {r} published: {reasons:?}");
    }
    let last = tms.get("scaled").await.unwrap().status.unwrap().last_rescale.expect("status.lastRescale");
    assert_eq!((last.from, last.to, last.result.as_str()), (4, 1, "Succeeded"), "{last:?}");
    let paused = last.paused_seconds.expect("pausedSeconds");
    assert!(paused > 0.0 && paused < 120.0, "{last:?}");
    eprintln!("rescale 4→1: input paused {paused}s ({})", last.message);
    // status.lastCheckpoint: every partition has a checkpoint, as the workers report them.
    let lc = eventually(Duration::from_secs(90), "status.lastCheckpoint for every partition", || async {
        tms.get("scaled").await.ok()?.status?.last_checkpoint.filter(|l| l.ends_with("(4/4 partitions)"))
    })
    .await;
    eprintln!("lastCheckpoint: {lc}");
    tms.delete("scaled", &DeleteParams::foreground()).await.unwrap();
    eventually(Duration::from_secs(90), "worker pods gone", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    operator.stop().await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
}

/// `spec.suspend`: the workers drain, commit and checkpoint every partition, then stop (phase
/// `Suspended`, no pods, Event `Suspended`); input produced meanwhile waits in Kafka (no output);
/// resumed, the workers restore their partitions from those checkpoints and score everything
/// with features equal to those recomputed from the raw input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspended_tenantmodel_stops_after_a_checkpoint_and_resumes_from_it() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::{check, events as stream, metric, oracle, outputs, Ev};

    let env = CheckpointedEnv::start("suspend", "87", 2).await;
    let (client, ns, input, out) = (env.client.clone(), env.ns.clone(), env.input.clone(), env.out.clone());
    let operator = Operator::start(&client, &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(env.tenant_model("paused", "suspend-v1")).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    let phase = |want: Phase, workers: i32| {
        let tms = tms.clone();
        async move {
            eventually(Duration::from_secs(180), &format!("TenantModel {want:?} with {workers} workers"), || async {
                let st = tms.get("paused").await.ok()?.status?;
                (st.phase == Some(want) && st.parallelism == Some(workers)).then_some(st)
            })
            .await
        }
    };
    phase(Phase::Running, 2).await;
    let all = stream(0, 4_000, 400, 1_795_200_000_000);
    let want = oracle(&all);
    let (before, during) = all.split_at(2_000);
    let p = producer();
    produce(&p, &input, &before.iter().map(Ev::record).collect::<Vec<_>>()).await;
    let first = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 2_000, Duration::from_secs(120))
    })
    .await
    .unwrap();
    assert_eq!(first.len(), 2_000, "every event before the suspend scored");

    let suspend = |on: bool| {
        let tms = tms.clone();
        async move {
            tms.patch("paused", &PatchParams::default(), &Patch::Merge(json!({"spec": {"suspend": on}})))
                .await
                .unwrap();
        }
    };
    suspend(true).await;
    let st = phase(Phase::Suspended, 0).await;
    let ready = st.conditions.iter().find(|c| c.kind == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "Suspended"), "{ready:?}");
    let last = st.last_rescale.expect("status.lastRescale");
    assert_eq!((last.from, last.to, last.result.as_str()), (2, 0, "Succeeded"), "{last:?}");
    let h = &st.history[0];
    assert_eq!(
        (h.kind.as_str(), h.change.as_str(), h.result.as_str()),
        ("Rescale", "2→0 workers", "Succeeded"),
        "{h:?}"
    );
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let notes: Vec<String> = evs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("RescaleCheckpointed"))
        .filter_map(|e| e.message)
        .collect();
    assert!(notes.iter().any(|n| n.contains("checkpoints 2/2 complete")), "every partition checkpointed: {notes:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("streamscore.io/tenantmodel=paused");
    eventually(Duration::from_secs(60), "no worker pod", || async {
        pods.list(&lp).await.ok()?.items.is_empty().then_some(())
    })
    .await;
    // Input produced while suspended waits: no output for it.
    produce(&p, &input, &during.iter().map(Ev::record).collect::<Vec<_>>()).await;
    let quiet = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 2_001, Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(quiet.len(), 2_000, "nothing scored while suspended");

    suspend(false).await;
    phase(Phase::Running, 2).await;
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, 4_000, Duration::from_secs(180))
    })
    .await
    .unwrap();
    check(&got, &want);
    // The resumed workers restored their partitions from the suspend's checkpoints.
    let mut restored = 0.0;
    for pod in pods.list(&lp).await.unwrap().items.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
        let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap();
        let m = reqwest::get(format!("http://{ip}:9090/metrics")).await.unwrap().text().await.unwrap();
        restored += metric(&m, "streamscore_worker_partition_assignments_total{source=\"checkpoint\"}");
    }
    assert!(restored >= 2.0, "both partitions restored from checkpoints ({restored})");
    let reasons: Vec<String> =
        evs.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    for r in ["Suspended", "Resumed"] {
        assert!(reasons.iter().any(|x| x == r), "Event {r} published: {reasons:?}");
    }
    tear_down(client, &ns, "paused", operator).await;
}

/// A model change made while a rescale runs is queued, not applied ungated: the rescale goes
/// on with the workers' current model (its new count applied on its own), Event
/// `UpgradeQueued` and status.plan say so, and the blue/green upgrade starts once the rescale
/// has ended (the live colour still on the old model, the candidate on the new one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_change_during_a_rescale_is_queued_until_it_ends() {
    let _node = NODE.lock().await;
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};

    let env = CheckpointedEnv::start("queue", "84", 2).await;
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let operator = Operator::start(&client, &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(env.tenant_model("queued", "queue-v1")).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    eventually(Duration::from_secs(120), "TenantModel Running with 2 workers", || async {
        let st = tms.get("queued").await.ok()?.status?;
        (st.phase == Some(Phase::Running) && st.parallelism == Some(2)).then_some(())
    })
    .await;

    tms.patch_scale("queued", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .expect("scale subresource");
    eventually(Duration::from_secs(60), "the rescale to 3 in status.operation", || async {
        tms.get("queued").await.ok()?.status?.operation.filter(|o| o.to == 3)
    })
    .await;
    tms.patch("queued", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": {"version": "queue-v2"}}})))
        .await
        .unwrap();
    let plan = eventually(Duration::from_secs(30), "status.plan says the change is queued", || async {
        tms.get("queued").await.ok()?.status?.plan.filter(|p| p.contains("queued"))
    })
    .await;
    eprintln!("plan during the rescale: {plan}");
    let (steps, _) = watch_rescale(&tms, "queued", 3, None).await;
    eprintln!("rescale steps: {steps:?}");

    // The rescale ended with the old model on three workers; then the upgrade started.
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let version = |d: &Deployment| {
        d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get("streamscore.io/model-version").cloned()
    };
    let up = eventually(Duration::from_secs(60), "a blue/green upgrade to queue-v2", || async {
        tms.get("queued").await.ok()?.status?.upgrade.filter(|u| u.to_version == "queue-v2")
    })
    .await;
    let blue = deps.get("queued-blue").await.unwrap();
    assert_eq!(version(&blue).as_deref(), Some("queue-v1"), "the live colour kept its model");
    assert_eq!(blue.spec.as_ref().and_then(|s| s.replicas), Some(3), "the rescale's count was applied");
    assert_eq!((up.from_version.as_str(), up.candidate.as_str()), ("queue-v1", "green"), "{up:?}");
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> =
        evs.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    for r in ["UpgradeQueued", "RescaleCompleted", "UpgradePlanned"] {
        assert!(reasons.iter().any(|x| x == r), "Event {r} published: {reasons:?}");
    }
    tear_down(client, &ns, "queued", operator).await;
}

/// `checkpointStore` moved on a running TenantModel while events flow: a blue/green upgrade of
/// kind `CheckpointStore` whose candidate starts from the old store's checkpoints and writes
/// its own to the new store; after the cut-over the live colour's pipeline names the new store,
/// and every input has exactly one live output with the features recomputed from the raw input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_checkpoint_store_is_taken_over_by_a_blue_green_cut_over() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::{check, events as stream, oracle, outputs};

    let env = CheckpointedEnv::start("store", "86", 2).await;
    let (client, ns, out, dlq) = (env.client.clone(), env.ns.clone(), env.out.clone(), env.dlq.clone());
    create_topics(&[&format!("{out}.shadow"), &format!("{dlq}.shadow")], 2).await;
    let operator = Operator::start(&client, &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let mut tm = env.tenant_model("stored", "v1");
    tm["spec"]["upgrade"] = json!({"minScoredEvents": 300, "deadline": "4m"});
    tms.create(&PostParams::default(), &serde_json::from_value(tm).unwrap()).await.unwrap();
    eventually(Duration::from_secs(120), "TenantModel Running with 2 workers", || async {
        let st = tms.get("stored").await.ok()?.status?;
        (st.phase == Some(Phase::Running) && st.parallelism == Some(2)).then_some(())
    })
    .await;
    let all = stream(0, 200_000, 4_000, 1_795_200_000_000);
    let steady = Steady::start(&env.input, &all);
    tokio::time::sleep(Duration::from_secs(6)).await;

    let bucket = std::env::var("STREAMSCORE_S3_BUCKET").unwrap();
    let moved = format!("s3://{bucket}/{}", unique("moved"));
    tms.patch("stored", &PatchParams::default(), &Patch::Merge(json!({"spec": {"checkpointStore": moved}})))
        .await
        .unwrap();
    let up = eventually(Duration::from_secs(60), "a CheckpointStore upgrade", || async {
        tms.get("stored").await.ok()?.status?.upgrade.filter(|u| u.kind == "CheckpointStore")
    })
    .await;
    assert!(up.rebuild_from_ms.is_none(), "the candidate starts from the old store's checkpoints: {up:?}");
    let last = eventually(Duration::from_secs(240), "the store's upgrade finished", || async {
        let st = tms.get("stored").await.ok()?.status?;
        st.last_upgrade.filter(|l| st.upgrade.is_none() && l.started_at == up.started_at)
    })
    .await;
    assert_eq!(last.result, "Succeeded", "{last:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = steady.stop().await;

    // The live colour (the former candidate) writes to the new store, seeded from the old one.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let live = cms.get(&streamscore_operator::build::config_map_name("stored", &up.candidate)).await.unwrap();
    let pipeline: streamscore_crds::PipelineConfig =
        serde_yaml::from_str(&live.data.unwrap()["pipeline.yaml"]).unwrap();
    let store = pipeline.state.checkpoint_store.unwrap_or_default();
    assert!(store.starts_with(&format!("{moved}/{ns}/stored/u")), "{store}");
    let want = oracle(&all[..n]);
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || outputs(&out, n, Duration::from_secs(240))
    })
    .await
    .unwrap();
    let seen = check(&got, &want);
    let duplicated: usize = seen.values().map(|c| c - 1).sum();
    eprintln!(
        "store moved ({}); {n} inputs, {} outputs, 0 lost, {duplicated} duplicated, 0 wrong",
        last.message,
        got.len()
    );
    assert_eq!(duplicated, 0, "one live output per input across the cut-over");
    tear_down(client, &ns, "stored", operator).await;
}

/// A rescale whose checkpoints cannot be written (the store's bucket does not exist) rolls
/// back: the Deployment never changes, the drained worker resumes and scores what arrives
/// next, and the reason is in status.lastRescale, the Progressing condition and a Warning Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescale_whose_checkpoints_fail_rolls_back_and_loses_nothing() {
    let _node = NODE.lock().await;
    use k8s_openapi::api::apps::v1::Deployment;
    use kube::api::{Patch, PatchParams};

    let env = CheckpointedEnv::start("rollback", "80", 2).await;
    let operator = Operator::start(&env.client, &env.ns);
    let tms: Api<TenantModel> = Api::namespaced(env.client.clone(), &env.ns);
    let tm: TenantModel = serde_json::from_value(json!({
        "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
        "metadata": {"name": "stuck"},
        "spec": {
            "parallelism": 1,
            "checkpointStore": format!("s3://{}/x", unique("no-such-bucket")),
            "checkpointSecret": {"name": "s3-credentials"},
            "source": {"bootstrapServers": bootstrap(), "topics": [env.input], "keyField": "user_id",
                       "eventTime": {"field": "ts"}},
            "model": {"configMap": {"name": "model", "key": "model.onnx"}, "sha256": env.sha, "version": "v1",
                      "features": ["event.amount", "event.amount", "event.amount", "event.amount"],
                      "outputs": [{"name": "fraud"}]},
            "sink": {"topic": env.out, "deadLetterTopic": env.dlq}
        }
    }))
    .unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    eventually(Duration::from_secs(120), "TenantModel Running", || async {
        (tms.get("stuck").await.ok()?.status?.phase == Some(Phase::Running)).then_some(())
    })
    .await;
    let p = producer();
    produce(&p, &env.input, &events(10, 5, 0)).await;
    let out = env.out.clone();
    let first = tokio::task::spawn_blocking(move || consume(&out, 50, Duration::from_secs(60))).await.unwrap();
    assert_eq!(first.len(), 50);

    tms.patch_scale("stuck", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 2}}))).await.unwrap();
    let last = eventually(Duration::from_secs(90), "the rescale rolled back", || async {
        let st = tms.get("stuck").await.ok()?.status?;
        st.last_rescale.filter(|l| l.result == "RolledBack" && st.operation.is_none())
    })
    .await;
    assert_eq!((last.from, last.to), (1, 2));
    assert!(last.message.contains("could not drain") && last.message.contains("checkpoint of partition"), "{last:?}");
    let deps: Api<Deployment> = Api::namespaced(env.client.clone(), &env.ns);
    let replicas = deps.get("stuck-blue").await.unwrap().spec.unwrap().replicas;
    assert_eq!(replicas, Some(1), "the Deployment was never scaled");
    let st = tms.get("stuck").await.unwrap().status.unwrap();
    let progressing = st.conditions.iter().find(|c| c.kind == "Progressing").unwrap();
    assert_eq!(progressing.reason, "RescaleRolledBack", "{progressing:?}");
    assert!(progressing.message.contains("spec.parallelism 2 is not applied"), "{}", progressing.message);
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(env.client.clone(), &env.ns);
    let rolled: Vec<_> = evs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("RescaleRolledBack"))
        .collect();
    assert!(rolled.iter().any(|e| e.type_.as_deref() == Some("Warning")), "{rolled:?}");

    // The worker was drained and resumed: what arrives now is scored, nothing before was lost.
    produce(&p, &env.input, &events(10, 5, 5)).await;
    let out = env.out.clone();
    let all = tokio::task::spawn_blocking(move || consume(&out, 100, Duration::from_secs(60))).await.unwrap();
    assert_eq!(ids(&all), input_ids(&[events(10, 5, 0), events(10, 5, 5)].concat()));
    operator.stop().await;
    let _ = tms.delete("stuck", &DeleteParams::foreground()).await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.client.clone());
    let _ = nsapi.delete(&env.ns, &DeleteParams::default()).await;
}

/// Blue/green upgrades of a running TenantModel while events flow, with checkpoints in the S3
/// server. First a model that outputs NaN for most events: the candidate (green) runs in shadow,
/// its ErrorRate gate fails, it is removed, blue never stops, and the reason is in
/// status.lastUpgrade, the Degraded condition (RolledBack) and a Warning Event. Then a
/// model-only change with the operator restarted at every step: green starts from blue's
/// checkpoints, its gates pass, and the cut-over at the offset barrier switches the live
/// topic. Then a feature change (a new window): the plan says the candidate (blue again)
/// rebuilds its state from the input, and after its cut-over the new feature's values equal
/// those recomputed from the raw input. Across all of it every input has exactly one live
/// output, whose features equal those recomputed from the raw input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_a_model_goes_through_shadow_and_gates_to_an_exact_cut_over_or_rolls_back() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::{check, events as stream, metric, oracle, Ev};

    let env = CheckpointedEnv::start("upgrade", "81", 2).await;
    let (client, ns, input, out, sha) =
        (env.client.clone(), env.ns.clone(), env.input.clone(), env.out.clone(), env.sha.clone());
    let dlq = env.dlq.clone();
    let (out_shadow, dlq_shadow) = (format!("{out}.shadow"), format!("{dlq}.shadow"));
    create_topics(&[&out_shadow, &dlq_shadow], 2).await;
    let nan = std::fs::read(repo_root().join("models/nan-score.onnx")).unwrap();
    let nan_sha = streamscore_worker::model::sha256_hex(&nan);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "model-nan"}, "binaryData": {"model.onnx": k8s_openapi::ByteString(nan)}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&PostParams::default(), &cm).await.unwrap();
    let mut operator = Operator::start(&client, &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let mut tm = env.tenant_model("upgraded", "v1");
    tm["spec"]["upgrade"] = json!({"minScoredEvents": 300, "deadline": "3m"});
    let tm: TenantModel = serde_json::from_value(tm).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    eventually(Duration::from_secs(120), "TenantModel Running", || async {
        let st = tms.get("upgraded").await.ok()?.status?;
        (st.phase == Some(Phase::Running) && st.parallelism == Some(2)).then_some(())
    })
    .await;

    // 20,000 events over 2,000 keys at a steady pace (~140 s) through the three upgrades.
    const N: usize = 20_000;
    let all = stream(0, N as u64, 2_000, 1_795_200_000_000);
    let want = oracle(&all);
    let producing = tokio::spawn({
        let (input, all) = (input.clone(), all.clone());
        async move {
            let p = producer();
            for chunk in all.chunks(200) {
                let recs: Vec<_> = chunk.iter().map(Ev::record).collect();
                produce(&p, &input, &recs).await;
                tokio::time::sleep(Duration::from_millis(1_400)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(6)).await;
    let patch = |model: serde_json::Value| {
        let tms = tms.clone();
        async move {
            tms.patch("upgraded", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": model}})))
                .await
                .unwrap();
        }
    };
    // 1. A model scoring NaN for most events: rolled back by its ErrorRate gate.
    patch(json!({"configMap": {"name": "model-nan", "key": "model.onnx"}, "sha256": nan_sha, "version": "v2-nan"}))
        .await;
    let st = eventually(Duration::from_secs(30), "upgrade planned", || async {
        let st = tms.get("upgraded").await.ok()?.status?;
        st.upgrade.is_some().then_some(st)
    })
    .await;
    let up = st.upgrade.unwrap();
    assert_eq!((up.candidate.as_str(), up.kind.as_str(), up.step.as_str()), ("green", "ModelOnly", "Shadow"));
    assert!(st.plan.as_deref().is_some_and(|p| p.contains("starts from blue's newest checkpoints")), "{:?}", st.plan);
    let deps: Api<k8s_openapi::api::apps::v1::Deployment> = Api::namespaced(client.clone(), &ns);
    // The upgrade to `version` ends rolled back because of `why`, and green is removed.
    let rolled_back = |version: &'static str, why: &'static str, within: u64| {
        let (tms, deps) = (tms.clone(), deps.clone());
        async move {
            let st = eventually(Duration::from_secs(within), &format!("{version} rolled back"), || async {
                let st = tms.get("upgraded").await.ok()?.status?;
                st.last_upgrade.as_ref().is_some_and(|l| l.to_version == version).then_some(st)
            })
            .await;
            let last = st.last_upgrade.clone().unwrap();
            eprintln!("{version}: {last:?}");
            assert_eq!(last.result, "RolledBack", "{last:?}");
            assert!(last.message.contains(why), "{last:?}");
            eventually(Duration::from_secs(30), "green removed", || async {
                deps.get_opt("upgraded-green").await.ok()?.is_none().then_some(())
            })
            .await;
            st
        }
    };
    let st = rolled_back("v2-nan", "ErrorRate", 150).await;
    assert_eq!(st.active_color.as_deref(), Some("blue"));
    assert_eq!(st.model_version.as_deref(), Some("v1"), "blue still runs v1");
    let degraded = st.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "RolledBack"), "{degraded:?}");
    let dead = consume(&dlq_shadow, usize::MAX, Duration::from_secs(3));
    assert!(!dead.is_empty(), "the candidate's dead letters went to the shadow dead-letter topic");

    // 1b. A file that is not an ONNX model (its digest right): the candidate cannot load it and
    // the upgrade rolls back at once with the workers' reason.
    let junk = b"not an onnx model".to_vec();
    let junk_sha = streamscore_worker::model::sha256_hex(&junk);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "model-junk"}, "binaryData": {"model.onnx": k8s_openapi::ByteString(junk)}
    }))
    .unwrap();
    Api::<ConfigMap>::namespaced(client.clone(), &ns).create(&PostParams::default(), &cm).await.unwrap();
    patch(json!({"configMap": {"name": "model-junk", "key": "model.onnx"}, "sha256": junk_sha, "version": "v2-junk"}))
        .await;
    rolled_back("v2-junk", "model not loaded", 120).await;

    // 1c. The same model fed its inputs in another order (a deployment mistake that loads and
    // scores): the score distribution shifts, the ScoreDrift gate fails, and blue's live
    // outputs never pause meanwhile (checked on the live topic below).
    patch(json!({"configMap": {"name": "model", "key": "model.onnx"}, "sha256": sha, "version": "v2-shuffled",
                 "features": ["amount_24h", "tx_1h", "rides_1h", "event.amount"]}))
    .await;
    let st = rolled_back("v2-shuffled", "ScoreDrift", 120).await;
    let drifted = st.last_upgrade.clone().unwrap();

    // 2. A model-only change (a new version of the same model): shadow, gates, cut-over, with
    // the operator restarted the first time each step is seen (it resumes from status.upgrade).
    patch(json!({"configMap": {"name": "model", "key": "model.onnx"}, "sha256": sha, "version": "v2",
                 "features": ["tx_1h", "amount_24h", "rides_1h", "event.amount"]}))
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(150);
    let mut steps: Vec<String> = Vec::new();
    let st = loop {
        assert!(std::time::Instant::now() < deadline, "the upgrade to v2 did not finish; steps {steps:?}");
        let st = tms.get("upgraded").await.unwrap().status.unwrap_or_default();
        if let Some(u) = &st.upgrade {
            eprintln!("upgrade {}: {}", u.step, u.message);
            if !steps.contains(&u.step) {
                steps.push(u.step.clone());
                let old = std::mem::replace(&mut operator, Operator::start(&client, &ns));
                old.stop().await;
            }
        }
        if st.last_upgrade.as_ref().is_some_and(|l| l.to_version == "v2") {
            break st;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(steps.iter().any(|s| s == "Shadow") && steps.iter().any(|s| s == "CuttingOver"), "{steps:?}");
    let last = st.last_upgrade.clone().unwrap();
    eprintln!("v2: {last:?}");
    assert_eq!(last.result, "Succeeded", "{last:?}");
    assert_eq!(st.active_color.as_deref(), Some("green"));
    eventually(Duration::from_secs(60), "green Running with v2, blue removed", || async {
        let st = tms.get("upgraded").await.ok()?.status?;
        let blue = deps.get_opt("upgraded-blue").await.ok()?;
        (st.phase == Some(Phase::Running) && st.model_version.as_deref() == Some("v2") && blue.is_none()).then_some(())
    })
    .await;
    let v2_cutover = last.cutover_seconds;
    // Green started from blue's checkpoints.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let lp = ListParams::default().labels("streamscore.io/tenantmodel=upgraded,streamscore.io/color=green");
    // The operator chose to seed (model-only change), and no green partition started empty or
    // was rebuilt. Each came from blue's checkpoints (source seed), or, when a candidate pod was
    // replaced after seeding, from the checkpoint green took of that seeded state (checkpoint).
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let green_cm = cms.get("upgraded-pipeline-green").await.unwrap();
    let green_pipeline = green_cm.data.unwrap_or_default().into_values().collect::<String>();
    assert!(green_pipeline.contains("seedStore"), "the candidate seeds from blue's checkpoints:\n{green_pipeline}");
    let (mut seeded, mut restored, mut fresh) = (0.0, 0.0, 0.0);
    for p in pods.list(&lp).await.unwrap().items {
        let ip = p.status.and_then(|s| s.pod_ip).unwrap();
        let m = reqwest::get(format!("http://{ip}:8080/metrics")).await.unwrap().text().await.unwrap();
        let source = |s: &str| metric(&m, &format!("streamscore_worker_partition_assignments_total{{source=\"{s}\"}}"));
        seeded += source("seed");
        restored += source("checkpoint");
        fresh += source("rebuild") + source("empty");
    }
    assert!(
        seeded + restored >= 1.0 && fresh == 0.0,
        "green's partitions started from blue's checkpoints (seed {seeded}, checkpoint {restored}, rebuilt or empty {fresh})"
    );

    // 3. A feature change (a new 1 h sum) with model v3: blue is the candidate and rebuilds.
    tms.patch(
        "upgraded",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {
            "model": {"version": "v3"},
            "features": {"windows": [
                {"name": "tx_1h", "aggregation": "count", "window": "1h", "resolution": "1s"},
                {"name": "amount_24h", "aggregation": "sum", "field": "amount", "window": "24h", "resolution": "1s"},
                {"name": "rides_1h", "aggregation": "count", "window": "1h", "resolution": "1s",
                 "filter": {"field": "action", "oneOf": ["ride_requested"]}},
                {"name": "amount_1h", "aggregation": "sum", "field": "amount", "window": "1h", "resolution": "1s"}
            ]}
        }})),
    )
    .await
    .unwrap();
    let st = eventually(Duration::from_secs(30), "feature upgrade planned", || async {
        let st = tms.get("upgraded").await.ok()?.status?;
        st.upgrade.as_ref().is_some_and(|u| u.to_version == "v3").then_some(st)
    })
    .await;
    let up = st.upgrade.unwrap();
    assert_eq!((up.candidate.as_str(), up.kind.as_str()), ("blue", "Features"));
    assert!(st.plan.as_deref().is_some_and(|p| p.contains("rebuilds its state from the input")), "{:?}", st.plan);
    let st = eventually(Duration::from_secs(150), "the upgrade to v3 completed", || async {
        let st = tms.get("upgraded").await.ok()?.status?;
        st.last_upgrade.as_ref().is_some_and(|l| l.to_version == "v3").then_some(st)
    })
    .await;
    let last = st.last_upgrade.clone().unwrap();
    eprintln!("v3: {last:?}");
    assert_eq!((last.result.as_str(), st.active_color.as_deref()), ("Succeeded", Some("blue")), "{last:?}");

    // 4. A worker of the new live colour SIGKILLed after the cut-over: its container restarts
    // with the pipeline as mounted when the pod started (no barrier in it yet), and must still
    // write live outputs from the barrier on (it kept the barrier in its state directory).
    // (After the first v3 outputs: the switch's gap below is measured without the crash's.)
    tokio::time::sleep(Duration::from_secs(4)).await;
    let lp_blue = ListParams::default().labels("streamscore.io/tenantmodel=upgraded,streamscore.io/color=blue");
    let victim = pods.list(&lp_blue).await.unwrap().items[0].clone();
    let (victim_name, uid) = (victim.metadata.name.clone().unwrap(), victim.metadata.uid.clone().unwrap());
    assert!(streamscore_tests::kill_worker_of_pod(&uid), "no worker process for pod {uid}");
    let ip = eventually(Duration::from_secs(60), "the killed worker restarted", || async {
        let p = pods.get(&victim_name).await.ok()?;
        let st = p.status?;
        (st.container_statuses?.first()?.restart_count >= 1).then_some(st.pod_ip?)
    })
    .await;
    let admin = eventually(Duration::from_secs(60), "the restarted worker's admin API", || async {
        reqwest::get(format!("http://{ip}:8090/v1/admin/status")).await.ok()?.json::<serde_json::Value>().await.ok()
    })
    .await;
    assert!(!admin["shadow"]["liveFrom"].is_null(), "restarted live from the barrier: {admin}");
    producing.await.unwrap();

    // Every input has exactly one live output with the features recomputed from the raw input;
    // ask for more than expected so that duplicates would be seen.
    let got = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(180);
            loop {
                let recs = consume(&out, usize::MAX, Duration::from_secs(4));
                let ids: BTreeSet<u64> = recs.iter().map(|c| c.json()["fields"]["id"].as_u64().unwrap()).collect();
                if ids.len() >= N || std::time::Instant::now() > deadline {
                    return recs;
                }
            }
        }
    })
    .await
    .unwrap();
    let pairs: Vec<(u64, serde_json::Value)> =
        got.iter().map(|c| (c.json()["fields"]["id"].as_u64().unwrap(), c.json()["features"].clone())).collect();
    let seen = check(&pairs, &want);
    // Each input's live outputs come from one version: none is written by both sides of a
    // cut-over. Only the SIGKILL (at-least-once: outputs after the last commit are written
    // again on restart) may repeat an input, and only within v3.
    let mut version_of: std::collections::HashMap<u64, BTreeSet<String>> = std::collections::HashMap::new();
    for c in &got {
        let v = c.json();
        version_of
            .entry(v["fields"]["id"].as_u64().unwrap())
            .or_default()
            .insert(v["modelVersion"].as_str().unwrap_or("").to_owned());
    }
    let mixed: Vec<_> = version_of.iter().filter(|(_, vs)| vs.len() > 1).take(5).collect();
    assert!(mixed.is_empty(), "inputs with live outputs from two versions across a cut-over, e.g. {mixed:?}");
    let twice: Vec<_> = seen.iter().filter(|(id, n)| **n > 1 && !version_of[*id].contains("v3")).take(5).collect();
    assert!(twice.is_empty(), "inputs with more than one live output outside the crash replay, e.g. {twice:?}");
    eprintln!("inputs written twice after the SIGKILL: {}", seen.values().filter(|n| **n > 1).count());
    let versions: std::collections::BTreeMap<String, usize> = got.iter().fold(Default::default(), |mut m, c| {
        *m.entry(c.json()["modelVersion"].as_str().unwrap_or("").to_owned()).or_default() += 1;
        m
    });
    eprintln!("live outputs by model version: {versions:?}");
    for v in ["v1", "v2", "v3"] {
        assert!(versions.get(v).is_some_and(|n| *n > 0), "{v} wrote live outputs: {versions:?}");
    }
    assert!(
        !versions.contains_key("v2-nan") && !versions.contains_key("v2-junk") && !versions.contains_key("v2-shuffled"),
        "the rolled-back models wrote nothing live: {versions:?}"
    );
    // While the shifted model ran in shadow and was rolled back, blue's live outputs kept their
    // pace (input arrives every 1.4 s).
    let secs = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap().as_millisecond();
    let (from, to) = (secs(&drifted.started_at) - 2_000, secs(&drifted.finished_at) + 2_000);
    let mut during: Vec<i64> = got.iter().filter_map(|c| c.timestamp).filter(|t| (from..=to).contains(t)).collect();
    during.sort_unstable();
    let pause = during.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(i64::MAX);
    eprintln!("live outputs during the drift rollback: {} in {} ms, longest pause {pause} ms", during.len(), to - from);
    assert!(pause < 3_000, "blue paused {pause} ms during the rollback");
    // The new feature, written by the rebuilt candidate, recomputed from the raw input: per key,
    // the amounts of the events so far with event time in [S, t], S = (floor((t − 1h)/1s) + 1)·1s.
    let mut by_key: std::collections::HashMap<&str, Vec<&Ev>> = std::collections::HashMap::new();
    let mut amount_1h = std::collections::HashMap::new();
    for e in &all {
        let seen = by_key.entry(e.key.as_str()).or_default();
        seen.push(e);
        let start = ((e.ts - 3_600_000).div_euclid(1_000) + 1) * 1_000;
        amount_1h.insert(e.id, seen.iter().filter(|x| x.ts >= start && x.ts <= e.ts).map(|x| x.amount).sum::<f64>());
    }
    let mut checked = 0;
    for c in got.iter().map(|c| c.json()).filter(|v| v["modelVersion"] == "v3") {
        let id = c["fields"]["id"].as_u64().unwrap();
        let v = c["features"]["amount_1h"].as_f64().expect("amount_1h in a v3 output");
        assert!((v - amount_1h[&id]).abs() < 1e-6, "event {id}: amount_1h {v}, want {}", amount_1h[&id]);
        checked += 1;
    }
    assert!(checked > 0);
    // The switch on the live topic: per output partition, from the old version's last output to
    // the new one's first (record timestamps, written by the workers).
    for (from, to) in [("v1", "v2"), ("v2", "v3")] {
        let mut gap = 0i64;
        for p in 0..2 {
            let in_p: Vec<_> = got.iter().filter(|c| c.partition == p).collect();
            let last_old = in_p.iter().filter(|c| c.json()["modelVersion"] == from).filter_map(|c| c.timestamp).max();
            let first_new = in_p.iter().filter(|c| c.json()["modelVersion"] == to).filter_map(|c| c.timestamp).min();
            if let (Some(a), Some(b)) = (last_old, first_new) {
                gap = gap.max(b - a);
            }
        }
        eprintln!("live topic switch {from}→{to}: {gap} ms between the last {from} and the first {to} output");
    }
    eprintln!("cut-over v1→v2 (operator): {v2_cutover:?} s, v2→v3: {:?} s", last.cutover_seconds);
    // Green wrote to the shadow topic before the switch.
    let shadow = consume(&out_shadow, usize::MAX, Duration::from_secs(3));
    assert!(shadow.iter().any(|c| c.json()["modelVersion"] == "v2"), "green wrote to the shadow topic first");
    // Each live pod reports lag only for the partitions it owns (the Lag gate sums it): the
    // pods started one after the other, so the first one owned every partition for a moment.
    let lp_blue = ListParams::default().labels("streamscore.io/tenantmodel=upgraded,streamscore.io/color=blue");
    for p in pods.list(&lp_blue).await.unwrap().items {
        let ip = p.status.and_then(|s| s.pod_ip).unwrap();
        let m = reqwest::get(format!("http://{ip}:8080/metrics")).await.unwrap().text().await.unwrap();
        let st: serde_json::Value =
            reqwest::get(format!("http://{ip}:8090/v1/admin/status")).await.unwrap().json().await.unwrap();
        let owned: Vec<String> =
            st["partitions"].as_array().unwrap().iter().map(|p| format!("partition=\"{}\"", p)).collect();
        for line in m.lines().filter(|l| l.starts_with("streamscore_worker_consumer_lag{")) {
            assert!(owned.iter().any(|o| line.contains(o.as_str())), "lag of a partition not owned: {line} ({st})");
        }
    }
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> =
        evs.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    for r in ["UpgradePlanned", "UpgradeRolledBack", "UpgradeGatesPassed", "UpgradeCompleted"] {
        assert!(reasons.iter().any(|x| x == r), "Event {r} published: {reasons:?}");
    }
    tear_down(client, &ns, "upgraded", operator).await;
}

/// The operator binary as a process, started again whenever it exits, as its Deployment would
/// (same pod name, so it takes its Lease back at once). Crashes come from its fault injection
/// (`STREAMSCORE_CRASH_AT=each`: one abort at each step of an operation, see the operator's
/// `fault` module); any other exit fails the test.
struct SupervisedOperator {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl SupervisedOperator {
    /// Crashes once at every step, started again at once.
    fn start(ns: &str, dir: &std::path::Path) -> Self {
        Self::with(ns, dir, "each", Duration::ZERO, &[])
    }

    /// Crashes at `crash_at` (a point or `each`), started again `away` later, with `env`.
    fn with(ns: &str, dir: &std::path::Path, crash_at: &str, away: Duration, env: &[(&str, &str)]) -> Self {
        let crash_log = dir.join("operator-crashes");
        let log = dir.join("operator.log");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let spawn = {
            let (ns, crash_log, log, crash_at) = (ns.to_owned(), crash_log.clone(), log.clone(), crash_at.to_owned());
            move || {
                let listen = format!("127.0.0.1:{}", streamscore_tests::free_port());
                Command::new(built_binary("streamscore-operator"))
                    .args(["--namespaces", &ns, "--listen", &listen])
                    .args(["--worker-image", &streamscore_tests::e2e_worker_image("streamscore-worker:e2e")])
                    .args(["--operator-namespace", &ns, "--identity", "streamscore-operator-0"])
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    .env("STREAMSCORE_CRASH_AT", &crash_at)
                    .env("STREAMSCORE_CRASH_LOG", &crash_log)
                    .env("RUST_LOG", "info")
                    .stdout(Stdio::null())
                    .stderr(std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap())
                    .spawn()
                    .expect("operator binary starts")
            }
        };
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                use std::os::unix::process::ExitStatusExt;
                let mut child = spawn();
                let mut crashes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Some(st) = child.try_wait().unwrap() {
                        let text = std::fs::read_to_string(&log).unwrap_or_default();
                        let at = text.lines().rev().find_map(|l| l.split("fault injection: crashing at ").nth(1));
                        assert!(
                            st.signal() == Some(6) && at.is_some(),
                            "the operator exited other than by its fault injection: {st:?}\n{text}"
                        );
                        eprintln!("operator crashed at {}; starting it again in {away:?}", at.unwrap());
                        crashes.push(at.unwrap().to_owned());
                        std::thread::sleep(away);
                        child = spawn();
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                let _ = child.kill();
                let _ = child.wait();
                crashes
            }
        });
        Self { stop, thread: Some(thread) }
    }

    /// Stops the operator; returns the points it crashed at (in order).
    fn stop(mut self) -> Vec<String> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().expect("the supervisor saw only fault-injection crashes")
    }
}

impl Drop for SupervisedOperator {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Events produced at a steady pace (by default 200 every 500 ms at most, each acknowledged
/// before the next is sent) until stopped.
struct Steady {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    sent: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Steady {
    fn start(input: &str, all: &[streamscore_tests::oracle::Ev]) -> Self {
        Self::start_at(input, all, 200, Duration::from_millis(500), false)
    }

    /// `chunk` events every `every` until stopped; `concurrently`: each chunk's records in
    /// flight at once (else one after the other, each acknowledged first: slower than the pace
    /// asks for when a chunk is large).
    fn start_at(
        input: &str,
        all: &[streamscore_tests::oracle::Ev],
        chunk: usize,
        every: Duration,
        concurrently: bool,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sent = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let task = tokio::spawn({
            let (input, all, stop, sent) = (input.to_owned(), all.to_vec(), stop.clone(), sent.clone());
            async move {
                let p = producer();
                let mut next = tokio::time::Instant::now();
                for part in all.chunks(chunk) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let recs: Vec<_> = part.iter().map(streamscore_tests::oracle::Ev::record).collect();
                    if concurrently {
                        streamscore_tests::produce_concurrently(&p, &input, &recs).await;
                    } else {
                        produce(&p, &input, &recs).await;
                    }
                    sent.fetch_add(part.len(), Ordering::Relaxed);
                    if concurrently {
                        next += every;
                        tokio::time::sleep_until(next).await;
                    } else {
                        tokio::time::sleep(every).await;
                    }
                }
            }
        });
        Self { stop, sent, task }
    }

    /// Stops producing; returns how many events were sent (the first n of the stream).
    async fn stop(self) -> usize {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.unwrap();
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// What the operator-fault cases share: the exactly-once TenantModel `prefix` (4,000 keys'
/// stream, shadow topics created, upgrade gates on 300 scored events within 4 min), Running with
/// 2 workers under the operator binary `operator` starts (supervised: its crashes restarted).
struct ExactlyOnceCase {
    env: CheckpointedEnv,
    dir: std::path::PathBuf,
    tms: Api<TenantModel>,
    name: String,
}

impl ExactlyOnceCase {
    async fn start(
        prefix: &str,
        subnet: &str,
        partitions: i32,
        operator: impl FnOnce(&str, &std::path::Path) -> SupervisedOperator,
    ) -> (Self, SupervisedOperator) {
        let env = CheckpointedEnv::start(prefix, subnet, partitions).await;
        let (out, dlq) = (&env.out, &env.dlq);
        create_topics(&[&format!("{out}.shadow"), &format!("{dlq}.shadow")], partitions).await;
        let dir = tempfile::Builder::new()
            .prefix(&format!("e2e-{prefix}-operator-"))
            .tempdir_in(
                std::env::var("STREAMSCORE_DEV_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
            )
            .unwrap()
            .keep();
        let running = operator(&env.ns, &dir);
        let tms: Api<TenantModel> = Api::namespaced(env.client.clone(), &env.ns);
        let mut tm = env.tenant_model(prefix, "v1");
        tm["spec"]["upgrade"] = json!({"minScoredEvents": 300, "deadline": "4m"});
        tm["spec"]["sink"]["delivery"] = json!("exactlyOnce");
        tms.create(&PostParams::default(), &serde_json::from_value(tm).unwrap()).await.unwrap();
        eventually(Duration::from_secs(120), "TenantModel Running with 2 workers", || async {
            let st = tms.get(prefix).await.ok()?.status?;
            (st.phase == Some(Phase::Running) && st.parallelism == Some(2)).then_some(())
        })
        .await;
        (Self { env, dir, tms, name: prefix.to_owned() }, running)
    }

    /// Every one of the first `n` inputs of `all` has a committed output (read_committed) with
    /// the features recomputed from the raw input, read within `within`; returns the outputs
    /// and how many inputs had two.
    async fn outputs_once(&self, all: &[streamscore_tests::oracle::Ev], n: usize, within: Duration) -> (usize, usize) {
        use streamscore_tests::oracle::{check, oracle, outputs};
        let want = oracle(&all[..n]);
        let got = tokio::task::spawn_blocking({
            let out = self.env.out.clone();
            move || outputs(&out, n, within)
        })
        .await
        .unwrap();
        let seen = check(&got, &want);
        (got.len(), seen.values().map(|c| c - 1).sum())
    }

    /// Deletes the TenantModel (with an operator that never crashes) and its namespace.
    async fn tear_down(self) {
        self.tms.delete(&self.name, &DeleteParams::foreground()).await.unwrap();
        let pods: Api<Pod> = Api::namespaced(self.env.client.clone(), &self.env.ns);
        let lp = ListParams::default().labels(&format!("streamscore.io/tenantmodel={}", self.name));
        let cleanup = SupervisedOperator::with(&self.env.ns, &self.dir, "none", Duration::ZERO, &[]);
        eventually(Duration::from_secs(90), "worker pods gone", || async {
            pods.list(&lp).await.ok()?.items.is_empty().then_some(())
        })
        .await;
        drop(cleanup);
        let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(self.env.client.clone());
        let _ = nsapi.delete(&self.env.ns, &DeleteParams::default()).await;
    }
}

/// The window after the cut-over barrier is recorded and before the old colour is stopped:
/// the operator aborts right after recording the barrier and stays away longer than the
/// fence's hold (shortened to 4 s for the test), so the old colour's workers resume by
/// themselves and write live outputs past the barrier while events flow. Back, the operator
/// fences them again and raises the barrier to where they stopped (Event
/// `UpgradeBarrierRaised`); the candidate goes live from there. With exactly-once delivery,
/// every input has exactly one committed live output with the features recomputed from the
/// raw input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_away_longer_than_the_fence_hold_after_the_barrier_duplicates_nothing() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::events as stream;

    let started = std::time::Instant::now();
    let (case, operator) = ExactlyOnceCase::start("hold", "85", 2, |ns, dir| {
        SupervisedOperator::with(
            ns,
            dir,
            "upgrade-barrier-recorded",
            Duration::from_secs(12),
            &[("STREAMSCORE_CUTOVER_HOLD_SECONDS", "4")],
        )
    })
    .await;
    let tms = case.tms.clone();
    let all = stream(0, 200_000, 4_000, 1_795_200_000_000);
    let steady = Steady::start(&case.env.input, &all);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tms.patch("hold", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": case.env.model("v2")}})))
        .await
        .unwrap();
    let last = eventually(Duration::from_secs(300), "the upgrade to v2 finished", || async {
        let st = tms.get("hold").await.ok()?.status?;
        st.last_upgrade.filter(|l| l.to_version == "v2" && st.upgrade.is_none())
    })
    .await;
    assert_eq!(last.result, "Succeeded", "{last:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = steady.stop().await;
    assert_eq!(operator.stop(), ["upgrade-barrier-recorded"], "the operator crashed once, at the barrier");

    let (outputs, duplicated) = case.outputs_once(&all, n, Duration::from_secs(240)).await;
    eprintln!("{n} inputs, {outputs} outputs, 0 lost, {duplicated} duplicated, 0 wrong");
    // The path taken: the old colour resumed past the barrier and the barrier was raised.
    let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(case.env.client.clone(), &case.env.ns);
    let raised: Vec<String> = evs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("UpgradeBarrierRaised"))
        .filter_map(|e| e.message)
        .collect();
    assert_eq!(duplicated, 0, "no input has two committed live outputs");
    assert!(!raised.is_empty(), "Event UpgradeBarrierRaised: the old colour had resumed past the barrier");
    eprintln!("{}", raised.join("\n"));
    streamscore_tests::chaos_report(
        "Cut-over",
        "operator aborted after recording the barrier, away 12 s (fence hold 4 s)",
        "exactly-once",
        (n, duplicated),
        &raised.join("; "),
        started.elapsed(),
    );
    case.tear_down().await;
}

/// Fault-injection suite, operator side: with exactly-once delivery, a rescale 2 → 3 and a
/// model-only blue/green upgrade run while events flow, and the operator process aborts once
/// at every step of both (between each action and the status write that records it) and is
/// started again. Both operations complete; every input has exactly one committed output
/// (read_committed) with the features recomputed from the raw input; the crash log shows each
/// step crashed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_killed_at_every_step_of_a_rescale_and_an_upgrade_loses_and_duplicates_nothing() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::events as stream;

    let started = std::time::Instant::now();
    let (case, operator) = ExactlyOnceCase::start("opkill", "82", 4, SupervisedOperator::start).await;
    let (tms, env) = (case.tms.clone(), &case.env);

    // A steady stream (400 events/s over 4,000 keys) until both operations are over.
    let all = stream(0, 200_000, 4_000, 1_795_200_000_000);
    let steady = Steady::start(&env.input, &all);
    tokio::time::sleep(Duration::from_secs(5)).await;

    // Rescale 2 → 3 (`kubectl scale tm opkill --replicas 3`).
    tms.patch_scale("opkill", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}})))
        .await
        .expect("scale subresource");
    let last = eventually(Duration::from_secs(300), "the rescale to 3 finished", || async {
        let st = tms.get("opkill").await.ok()?.status?;
        st.last_rescale.filter(|l| l.to == 3 && st.operation.is_none())
    })
    .await;
    assert_eq!(last.result, "Succeeded", "{last:?}");
    eprintln!("rescale: {} ({:.0} s in)", last.message, started.elapsed().as_secs_f64());

    // A model-only upgrade v1 → v2: shadow, gates, cut-over.
    tms.patch("opkill", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": env.model("v2")}})))
        .await
        .unwrap();
    let last = eventually(Duration::from_secs(300), "the upgrade to v2 finished", || async {
        let st = tms.get("opkill").await.ok()?.status?;
        st.last_upgrade.filter(|l| l.to_version == "v2" && st.upgrade.is_none())
    })
    .await;
    assert_eq!(last.result, "Succeeded", "{last:?}");
    eprintln!("upgrade: {} ({:.0} s in)", last.message, started.elapsed().as_secs_f64());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = steady.stop().await;
    let crashes = operator.stop();

    // Every step crashed once.
    let want_points = [
        "rescale-draining",
        "rescale-checkpointed",
        "rescale-scaled",
        "rescale-restored",
        "upgrade-gates-passed",
        "upgrade-candidate-paused",
        "upgrade-live-fenced",
        "upgrade-barrier-recorded",
        "upgrade-went-live",
        "upgrade-completed",
        "upgrade-recorded",
    ];
    let logged = std::fs::read_to_string(case.dir.join("operator-crashes")).unwrap_or_default();
    assert_eq!(logged.lines().collect::<Vec<_>>(), want_points, "crash log");
    assert_eq!(crashes, want_points, "the supervisor saw a crash at each step");

    // Every input exactly once, with the right features (read_committed).
    let (outputs, duplicated) = case.outputs_once(&all, n, Duration::from_secs(240)).await;
    eprintln!(
        "operator crashed at {} steps; {n} inputs, {outputs} outputs, 0 lost, {duplicated} duplicated, 0 wrong ({:.0} s)",
        crashes.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(duplicated, 0, "exactly-once: no input has two committed outputs");
    streamscore_tests::chaos_report(
        "Cut-over",
        "operator aborted at every step of a rescale 2→3 and an upgrade",
        "exactly-once",
        (n, duplicated),
        &format!("crashed at {}", crashes.join(", ")),
        started.elapsed(),
    );
    case.tear_down().await;
}

/// Which pods of `tm` have the colour `color` (name, uid).
async fn colour_pods(client: &kube::Client, ns: &str, tm: &str, color: &str) -> Vec<(String, String)> {
    let lp = ListParams::default().labels(&format!("streamscore.io/tenantmodel={tm},streamscore.io/color={color}"));
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut found: Vec<(String, String)> = pods
        .list(&lp)
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.metadata.name?, p.metadata.uid?)))
        .collect();
    found.sort();
    found
}

/// Waits until the supervised operator of `dir` has crashed at `point`.
async fn crashed_at(dir: &std::path::Path, point: &str) {
    let log = dir.join("operator-crashes");
    eventually(Duration::from_secs(300), &format!("the operator crashed at {point}"), || async {
        std::fs::read_to_string(&log).ok()?.lines().any(|l| l == point).then_some(())
    })
    .await;
}

/// Issue 28 item 8, a rollback whose live worker missed its resume: the operator aborts right
/// after fencing the live colour (the barrier not recorded yet) and stays away 10 s; meanwhile
/// one live worker is stopped (SIGSTOP). Back, the operator's drain of the live colour gets no
/// answer from it, so the upgrade rolls back, and the stopped worker cannot confirm its resume
/// either: the upgrade stays `RollingBack` ("asking live workers to resume again"). Continued
/// (SIGCONT), the worker is asked again and resumes, so every input has exactly one committed
/// output within 90 s, long before its fence's hold (300 s) would have resumed it by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_asks_a_live_worker_that_missed_its_resume_again() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::events as stream;

    let started = std::time::Instant::now();
    let (case, operator) = ExactlyOnceCase::start("resume", "88", 2, |ns, dir| {
        SupervisedOperator::with(ns, dir, "upgrade-live-fenced", Duration::from_secs(10), &[])
    })
    .await;
    let tms = case.tms.clone();
    let live = tms.get("resume").await.unwrap().status.and_then(|s| s.active_color).unwrap_or_else(|| "blue".into());
    let all = stream(0, 200_000, 4_000, 1_795_200_000_000);
    let steady = Steady::start(&case.env.input, &all);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tms.patch("resume", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": case.env.model("v2")}})))
        .await
        .unwrap();
    crashed_at(&case.dir, "upgrade-live-fenced").await;
    let (victim, uid) = colour_pods(&case.env.client, &case.env.ns, "resume", &live).await.remove(0);
    assert!(streamscore_tests::signal_worker_of_pod(&uid, "STOP"), "no worker process for pod {victim}");
    eprintln!("operator crashed with {live} fenced; {victim} stopped");
    let rolling = eventually(Duration::from_secs(120), "the rollback waiting for the stopped worker", || async {
        let u = tms.get("resume").await.ok()?.status?.upgrade?;
        (u.step == "RollingBack" && u.message.contains(&victim)).then_some(u.message)
    })
    .await;
    assert!(streamscore_tests::signal_worker_of_pod(&uid, "CONT"), "no worker process for pod {victim}");
    let continued = std::time::Instant::now();
    eprintln!("{rolling}");
    assert!(rolling.contains("asking live workers to resume again"), "{rolling}");
    let last = eventually(Duration::from_secs(120), "the rollback recorded", || async {
        let st = tms.get("resume").await.ok()?.status?;
        st.last_upgrade.filter(|l| l.to_version == "v2" && st.upgrade.is_none())
    })
    .await;
    assert_eq!(last.result, "RolledBack", "{last:?}");
    assert!(last.message.contains(&format!("stopping {live}")), "{last:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = steady.stop().await;
    assert_eq!(operator.stop(), ["upgrade-live-fenced"], "the operator crashed once, with the live colour fenced");

    let (outputs, duplicated) = case.outputs_once(&all, n, Duration::from_secs(90)).await;
    let waited = continued.elapsed();
    eprintln!("{n} inputs, {outputs} outputs, 0 lost, {duplicated} duplicated, 0 wrong; all {waited:?} after SIGCONT");
    assert_eq!(duplicated, 0, "exactly-once: no input has two committed outputs");
    assert!(waited < Duration::from_secs(upgrade_hold()), "resumed by the operator, not by the fence's hold");
    streamscore_tests::chaos_report(
        "Cut-over",
        "live worker stopped while fenced; the upgrade rolled back without its resume",
        "exactly-once",
        (n, duplicated),
        &format!("{victim} resumed on a retry {:.0} s after SIGCONT", waited.as_secs_f64()),
        started.elapsed(),
    );
    case.tear_down().await;
}

/// The fence's hold the operator gives the live colour at the cut-over (its default).
fn upgrade_hold() -> u64 {
    streamscore_operator::upgrade::CUTOVER_HOLD_SECONDS
}

/// Issue 28 item 2, the candidate held paused from its drain until go-live across a container
/// restart: the operator aborts right after fencing the live colour (the candidate's position
/// recorded, the barrier not yet) and stays away 20 s; meanwhile a candidate worker is
/// SIGKILLed and its container restarts. It must come back paused: resumed in shadow, it would
/// move past the barrier while the live colour is stopped, and its outputs between the barrier
/// and where it is at go-live would reach the shadow topics only (lost from the live ones).
/// Back, the operator records the barrier and the candidate goes live: every input has exactly
/// one committed live output with the features recomputed from the raw input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_restarted_during_the_cut_over_stays_paused_until_it_goes_live() {
    let _node = NODE.lock().await;
    use kube::api::{Patch, PatchParams};
    use streamscore_tests::oracle::events as stream;

    let started = std::time::Instant::now();
    let (case, operator) = ExactlyOnceCase::start("paused", "89", 2, |ns, dir| {
        SupervisedOperator::with(ns, dir, "upgrade-live-fenced", Duration::from_secs(20), &[])
    })
    .await;
    let tms = case.tms.clone();
    let all = stream(0, 200_000, 4_000, 1_795_200_000_000);
    let steady = Steady::start(&case.env.input, &all);
    tokio::time::sleep(Duration::from_secs(3)).await;
    tms.patch("paused", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": case.env.model("v2")}})))
        .await
        .unwrap();
    crashed_at(&case.dir, "upgrade-live-fenced").await;
    let u = tms.get("paused").await.unwrap().status.and_then(|s| s.upgrade).expect("the upgrade in status");
    assert!(u.live_from.is_none(), "the crash came before the barrier was recorded: {u:?}");
    let (victim, uid) = colour_pods(&case.env.client, &case.env.ns, "paused", &u.candidate).await.remove(0);
    assert!(streamscore_tests::kill_worker_of_pod(&uid), "no worker process for pod {victim}");
    let pods: Api<Pod> = Api::namespaced(case.env.client.clone(), &case.env.ns);
    eventually(Duration::from_secs(60), "the candidate's container restarted", || async {
        let p = pods.get(&victim).await.ok()?;
        let cs = p.status?.container_statuses?;
        cs.iter().any(|c| c.restart_count >= 1 && c.ready).then_some(())
    })
    .await;
    let u = tms.get("paused").await.unwrap().status.and_then(|s| s.upgrade).expect("the upgrade in status");
    assert!(u.live_from.is_none(), "the candidate restarted before the barrier was recorded: {u:?}");
    eprintln!("operator crashed with the live colour fenced; candidate {victim} SIGKILLed and restarted");
    let last = eventually(Duration::from_secs(300), "the upgrade to v2 finished", || async {
        let st = tms.get("paused").await.ok()?.status?;
        st.last_upgrade.filter(|l| l.to_version == "v2" && st.upgrade.is_none())
    })
    .await;
    assert_eq!(last.result, "Succeeded", "{last:?}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let n = steady.stop().await;
    assert_eq!(operator.stop(), ["upgrade-live-fenced"], "the operator crashed once, with the live colour fenced");

    let (outputs, duplicated) = case.outputs_once(&all, n, Duration::from_secs(240)).await;
    eprintln!("{n} inputs, {outputs} outputs, 0 lost, {duplicated} duplicated, 0 wrong");
    assert_eq!(duplicated, 0, "exactly-once: no input has two committed live outputs");
    streamscore_tests::chaos_report(
        "Cut-over",
        "candidate worker SIGKILLed between its drain and go-live (operator away 20 s)",
        "exactly-once",
        (n, duplicated),
        &format!("{victim} restarted paused and went live from the barrier"),
        started.elapsed(),
    );
    case.tear_down().await;
}

/// Issue 32 item 4, autoscaling on lag: a TenantModel with `autoscaling {min 1, max 3,
/// targetLagSeconds 10, scaleDownStabilization 40s, cooldown 10s}` whose worker processes at most
/// about 2,000 records/s (a fault-injection delay of 500 µs per record stands in for a heavier
/// model). Events step from none to 1,600/s: one worker would be 80 % busy, above the 70 %
/// target, so the autoscaler scales out 1 → 2 through the rescale path, and stays at 2 while the
/// rate holds (one decision, no oscillation). The input stops: idle, it scales in 2 → 1 once
/// the stabilization window has passed. Every input has an output with the features recomputed
/// from the raw input; status shows the measurements; the Events are exactly the two decisions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_autoscaler_scales_out_on_load_and_back_in_when_idle() {
    let _node = NODE.lock().await;
    use streamscore_tests::oracle::{check, events as stream, oracle, outputs};

    let started = std::time::Instant::now();
    let env = CheckpointedEnv::start_with("autoscale", "90", 4, &[("STREAMSCORE_SLOW_RECORD_MICROS", "500")]).await;
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let operator = Operator::start(&client, &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let mut tm = env.tenant_model("auto", "v1");
    tm["spec"]["parallelism"] = json!(1);
    tm["spec"]["autoscaling"] = json!({"minParallelism": 1, "maxParallelism": 3, "targetLagSeconds": 10,
                                        "scaleDownStabilization": "40s", "cooldown": "10s"});
    tms.create(&PostParams::default(), &serde_json::from_value(tm).unwrap()).await.unwrap();
    let parallelism = |n: i32, within: u64| {
        let tms = tms.clone();
        async move {
            eventually(Duration::from_secs(within), &format!("Running with {n} workers"), || async {
                let st = tms.get("auto").await.ok()?.status?;
                (st.phase == Some(Phase::Running) && st.parallelism == Some(n) && st.operation.is_none()).then_some(st)
            })
            .await
        }
    };
    parallelism(1, 120).await;
    let autoscaled = || {
        let client = client.clone();
        let ns = ns.clone();
        async move {
            let evs: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client, &ns);
            let mut found: Vec<(String, String)> = evs
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some("Autoscaled"))
                .map(|e| {
                    let at = e.event_time.map(|t| t.0.to_string()).or(e.first_timestamp.map(|t| t.0.to_string()));
                    (at.unwrap_or_default(), e.message.unwrap_or_default())
                })
                .collect();
            found.sort();
            found.into_iter().map(|(_, m)| m).collect::<Vec<_>>()
        }
    };

    // 1,600 events/s (800 every 500 ms) until stopped.
    let all = stream(0, 400_000, 4_000, 1_795_200_000_000);
    let steady = Steady::start_at(&env.input, &all, 800, Duration::from_millis(500), true);
    let out2 = parallelism(2, 180).await;
    eprintln!("scaled out after {:.0} s: {:?}", started.elapsed().as_secs_f64(), autoscaled().await);
    // The rate holds for 40 s more: the count holds, and the TenantModel is written about once
    // per sample (every 10 s), not by every reconcile its own status change wakes.
    let rv = tms.get("auto").await.unwrap().metadata.resource_version.unwrap();
    let wp = kube::api::WatchParams::default().fields("metadata.name=auto").timeout(40);
    let mut watch = Box::pin(tms.watch(&wp, &rv).await.unwrap());
    let mut writes = 0;
    while let Some(ev) = futures::TryStreamExt::try_next(&mut watch).await.unwrap() {
        if matches!(ev, kube::api::WatchEvent::Modified(_)) {
            writes += 1;
        }
    }
    eprintln!("{writes} writes of the TenantModel in 40 s at a steady rate");
    assert!(writes <= 16, "{writes} writes of the TenantModel in 40 s: the autoscaler samples in a loop");
    let st = tms.get("auto").await.unwrap().status.unwrap();
    let a = st.autoscaling.clone().expect("status.autoscaling");
    eprintln!("at 1,600/s with 2 workers: {a:?}");
    assert_eq!(st.parallelism, Some(2), "{a:?}");
    assert!(a.input_rate.is_some_and(|r| r > 1000.0), "the input rate measured: {a:?}");
    assert!(a.utilization.is_some_and(|u| u > 0.2 && u < 0.7), "two workers' utilization: {a:?}");
    assert!(a.last_scale_time.is_some(), "the decision's time in status: {a:?}");
    let n = steady.stop().await;
    eprintln!("{n} events sent; idle now");

    // Idle: back to 1 after the stabilization window.
    parallelism(1, 240).await;
    let events = autoscaled().await;
    eprintln!("Autoscaled events: {events:#?}");
    assert_eq!(events.len(), 2, "one decision out, one in: {events:?}");
    assert!(events[0].starts_with("scaling out 1 → 2 workers"), "{events:?}");
    assert!(events[1].starts_with("scaling in 2 → 1 workers"), "{events:?}");
    assert_eq!(out2.last_rescale.as_ref().map(|l| (l.from, l.to, l.result.as_str())), Some((1, 2, "Succeeded")));

    let want = oracle(&all[..n]);
    let got = tokio::task::spawn_blocking({
        let out = env.out.clone();
        move || outputs(&out, n, Duration::from_secs(120))
    })
    .await
    .unwrap();
    let seen = check(&got, &want);
    eprintln!(
        "{n} inputs, {} outputs, 0 lost, {} written twice, 0 wrong ({:.0} s)",
        got.len(),
        seen.values().map(|c| c - 1).sum::<usize>(),
        started.elapsed().as_secs_f64()
    );
    operator.stop().await;
    let _ = tms.delete("auto", &DeleteParams::default()).await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
}

/// A TenantModel with a lookup table, through the operator: the CRD admits `features.lookups`,
/// the operator renders it into the workers' pipeline, the worker pods read the compacted table
/// before they take partitions, and every event's output carries its merchant's tier and a
/// window that counts high-tier merchants' events, equal to the test's own map of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenantmodel_with_a_lookup_table_scores_with_its_rows() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let _node = NODE.lock().await;
    let env = CheckpointedEnv::start("lookup", "91", 2).await;
    let (client, ns) = (env.client.clone(), env.ns.clone());
    let table = unique("lookup-merchants");
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        rdkafka::ClientConfig::new().set("bootstrap.servers", bootstrap()).create().unwrap();
    let topic = NewTopic::new(&table, 2, TopicReplication::Fixed(1)).set("cleanup.policy", "compact");
    for r in admin.create_topics(&[topic], &AdminOptions::new()).await.unwrap() {
        r.unwrap();
    }
    let tiers: Vec<&str> = vec!["high", "low", "low", "high", "low"];
    let rows: Vec<(String, Vec<u8>)> =
        tiers.iter().enumerate().map(|(m, t)| (format!("m{m}"), json!({"tier": t}).to_string().into_bytes())).collect();
    produce(&producer(), &table, &rows).await;

    let operator = Operator::start(&client, &ns);
    let mut tm = env.tenant_model("lk", "v1");
    tm["spec"]["features"]["lookups"] =
        json!([{"name": "merchants", "topic": table, "key": "merchant", "fields": ["tier"]}]);
    tm["spec"]["features"]["windows"].as_array_mut().unwrap().push(json!(
        {"name": "high_tier_1h", "aggregation": "count", "window": "1h", "resolution": "1s",
         "filter": {"field": "lookups.merchants.tier", "oneOf": ["high"]}}));
    tm["spec"]["postprocess"]["passthrough"] = json!(["id", "merchant", "lookups.merchants.tier"]);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    tms.create(&PostParams::default(), &serde_json::from_value(tm).unwrap()).await.unwrap();
    eventually(Duration::from_secs(120), "TenantModel Running", || async {
        tms.get("lk").await.ok()?.status.filter(|s| s.phase == Some(Phase::Running))
    })
    .await;

    // 6 users × 15 events, one a second, merchants m0..m5 (m5 has no row).
    let base = 1_795_600_000_000i64;
    let mut input = Vec::new();
    for i in 0..15i64 {
        for u in 0..6usize {
            let user = format!("lk-user-{u}");
            let merchant = format!("m{}", (u + i as usize) % 6);
            let ev = json!({"user_id": user, "ts": base + i * 1_000, "amount": 1, "action": "view", "merchant": merchant,
                            "id": i});
            input.push((user, ev.to_string().into_bytes()));
        }
    }
    produce(&producer(), &env.input, &input).await;
    let scored = tokio::task::spawn_blocking({
        let out = env.out.clone();
        move || consume(&out, 90, Duration::from_secs(120))
    })
    .await
    .unwrap();
    assert_eq!(scored.len(), 90, "every event scored");
    let mut by_user: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    for s in &scored {
        let v = s.json();
        by_user.entry(v["key"].as_str().unwrap().to_owned()).or_default().push(v);
    }
    for (user, mut outs) in by_user {
        outs.sort_by_key(|v| v["fields"]["id"].as_i64().unwrap());
        let mut high = 0;
        for v in outs {
            let m: usize = v["fields"]["merchant"].as_str().unwrap()[1..].parse().unwrap();
            let tier = tiers.get(m).copied();
            high += usize::from(tier == Some("high"));
            assert_eq!(v["fields"]["lookups.merchants.tier"].as_str(), tier, "{user}: {v}");
            assert_eq!(v["features"]["high_tier_1h"], json!(high as f64), "{user}: {v}");
        }
    }
    tear_down(client, &ns, "lk", operator).await;
}
