//! Hostile or careless TenantModels against the real kube-apiserver + controller-manager:
//! a TenantModel author gains nothing the platform team did not grant (Secrets need the
//! opt-in label, images the allowlist), never takes over or deletes objects the operator did
//! not create, cannot pick names that make children invalid, and sees in status when the
//! API server refuses a child.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use streamscore_crds::tenantmodel::{Condition, Phase, TenantModel};
use streamscore_operator::policy::TenantPolicy;
use streamscore_tests::{eventually, kube_client, minimal_tenant_model, namespace_with_model, repo_root};
use tokio_util::sync::CancellationToken;

const WORKER_IMAGE: &str = "streamscore-worker:test";

/// A change to a TenantModel's JSON.
type SpecEdit = Box<dyn Fn(&mut serde_json::Value)>;

async fn create(tms: &Api<TenantModel>, tm: serde_json::Value) -> Result<TenantModel, kube::Error> {
    tms.create(&PostParams::default(), &serde_json::from_value(tm).unwrap()).await
}

/// Waits until the TenantModel is Degraded with `reason`; returns the Degraded condition.
async fn degraded(tms: &Api<TenantModel>, name: &str, reason: &str) -> Condition {
    eventually(Duration::from_secs(30), &format!("{name} Degraded with {reason}"), || async {
        let st = tms.get(name).await.ok()?.status?;
        let c = st.conditions.into_iter().find(|c| c.kind == "Degraded" && c.status == "True")?;
        (st.phase == Some(Phase::Degraded) && c.reason == reason).then_some(c)
    })
    .await
}

/// Waits for a Warning event about `name` with `reason`.
async fn warning_event(client: &kube::Client, ns: &str, name: &str, reason: &str) -> Event {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(Duration::from_secs(30), &format!("Warning event {reason}"), || async {
        events.list(&ListParams::default()).await.ok()?.items.into_iter().find(|e| {
            e.type_.as_deref() == Some("Warning")
                && e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
    })
    .await
}

/// Touches the TenantModel so the operator reconciles it now.
async fn poke(tms: &Api<TenantModel>, name: &str, n: u32) {
    let patch = json!({"metadata": {"annotations": {"test/poke": n.to_string()}}});
    tms.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
}

async fn cleanup(client: kube::Client, ns: &str, cancel: CancellationToken, op: tokio::task::JoinHandle<()>) {
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
    let _ = Api::<Namespace>::all(client).delete(ns, &DeleteParams::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_secrets_need_the_platform_teams_opt_in_label() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-secret").await;
    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, WORKER_IMAGE, &cancel);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "db-password"},
        "stringData": {"password": "hunter2"}
    }))
    .unwrap();
    secrets.create(&PostParams::default(), &secret).await.unwrap();
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    // A Secret without the label: refused, nothing mounts it.
    let mut tm = minimal_tenant_model("fraud", &sha);
    tm["spec"]["kafkaSecrets"] = json!([{"name": "db-password"}]);
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "fraud", "KafkaSecretNotPermitted").await;
    assert!(
        cond.message.contains("\"db-password\"") && cond.message.contains("streamscore.io/tenant-access=true"),
        "{}",
        cond.message
    );
    let ev = warning_event(&client, &ns, "fraud", "KafkaSecretNotPermitted").await;
    assert!(ev.note.unwrap_or_default().contains("db-password"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(deps.get_opt("fraud-blue").await.unwrap().is_none(), "a Deployment would mount the Secret");

    // A Secret that does not exist: its own reason.
    let mut tm = minimal_tenant_model("ghost", &sha);
    tm["spec"]["kafkaSecrets"] = json!([{"name": "no-such-secret"}]);
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "ghost", "KafkaSecretNotFound").await;
    assert!(cond.message.contains("no-such-secret"), "{}", cond.message);

    // The checkpoint store's credentials follow the same rule.
    let mut tm = minimal_tenant_model("ckpt", &sha);
    tm["spec"]["checkpointStore"] = json!("s3://checkpoints/tenants");
    tm["spec"]["checkpointSecret"] = json!({"name": "db-password"});
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "ckpt", "CheckpointSecretNotPermitted").await;
    assert!(cond.message.starts_with("spec.checkpointSecret: Secret \"db-password\""), "{}", cond.message);
    assert!(deps.get_opt("ckpt-blue").await.unwrap().is_none());

    // The platform team opts the Secret in: the workers get it.
    let label = json!({"metadata": {"labels": {"streamscore.io/tenant-access": "true"}}});
    secrets.patch("db-password", &PatchParams::default(), &Patch::Merge(label)).await.unwrap();
    poke(&tms, "ckpt", 1).await;
    let d = eventually(Duration::from_secs(30), "checkpoint Deployment after the opt-in", || async {
        deps.get_opt("ckpt-blue").await.ok().flatten()
    })
    .await;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert!(pod
        .volumes
        .unwrap()
        .iter()
        .any(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some("db-password")));
    let mounts = pod.containers[0].volume_mounts.clone().unwrap();
    assert!(
        mounts.iter().any(|m| m.mount_path == "/var/run/secrets/streamscore/checkpoint" && m.read_only == Some(true)),
        "{mounts:?}"
    );
    let env: Vec<String> = pod.containers[0].env.clone().unwrap_or_default().into_iter().map(|e| e.name).collect();
    assert!(!env.iter().any(|e| e.starts_with("AWS_")), "credentials are files, not variables: {env:?}");
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns).get("ckpt-pipeline").await.unwrap();
    let pipeline = &cm.data.unwrap()["pipeline.yaml"];
    assert!(pipeline.contains("credentialsDir: /var/run/secrets/streamscore/checkpoint"), "{pipeline}");
    poke(&tms, "fraud", 1).await;
    let d = eventually(Duration::from_secs(30), "Deployment after the opt-in", || async {
        deps.get_opt("fraud-blue").await.ok().flatten()
    })
    .await;
    let pod = d.spec.unwrap().template.spec.unwrap();
    let mounted: Vec<String> =
        pod.volumes.unwrap().into_iter().filter_map(|v| v.secret.and_then(|s| s.secret_name)).collect();
    assert_eq!(mounted, ["db-password"]);

    cleanup(client, &ns, cancel, op).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_must_match_the_operators_allowlist() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-image").await;
    let cancel = CancellationToken::new();
    let policy = TenantPolicy {
        allowed_images: vec!["registry.example.com/streamscore/*".parse().unwrap()],
        require_image_digest: false,
        kafka_prefix: None,
        max_resources: Default::default(),
    };
    let op = streamscore_tests::spawn_operator_with_policy(&client, &ns, WORKER_IMAGE, policy, &cancel);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    let mut tm = minimal_tenant_model("fraud", &sha);
    tm["spec"]["image"] = json!("evil.example.com/miner:latest");
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "fraud", "ImageNotAllowed").await;
    assert!(
        cond.message.contains("evil.example.com/miner:latest")
            && cond.message.contains("registry.example.com/streamscore/*"),
        "{}",
        cond.message
    );
    warning_event(&client, &ns, "fraud", "ImageNotAllowed").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(deps.get_opt("fraud-blue").await.unwrap().is_none(), "workers would run the image");

    // An allowed image runs.
    let patch = json!({"spec": {"image": "registry.example.com/streamscore/worker:2"}});
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let d = eventually(Duration::from_secs(30), "Deployment with the allowed image", || async {
        deps.get_opt("fraud-blue").await.ok().flatten()
    })
    .await;
    let image = d.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("registry.example.com/streamscore/worker:2"));

    // Changing back to a refused image leaves the running workers' image as it was.
    let patch = json!({"spec": {"image": "registry.example.com/streamscore-evil/worker:2"}});
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    degraded(&tms, "fraud", "ImageNotAllowed").await;
    let d = deps.get("fraud-blue").await.unwrap();
    let image = d.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(image.as_deref(), Some("registry.example.com/streamscore/worker:2"));

    cleanup(client, &ns, cancel, op).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_the_operator_did_not_create_are_never_taken_over_or_deleted() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-owner").await;
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // A user's Service with a child's name, and a user's ConfigMap carrying the children's labels.
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "fraud-pods", "labels": {"team": "payments"}},
        "spec": {"selector": {"app": "ledger"}, "ports": [{"name": "pg", "port": 5432}]}
    }))
    .unwrap();
    let theirs = svcs.create(&PostParams::default(), &theirs).await.unwrap();
    let labelled: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "fraud-notes", "labels": {
            "streamscore.io/tenantmodel": "fraud",
            "app.kubernetes.io/managed-by": "streamscore-operator"
        }},
        "data": {"notes": "not the operator's"}
    }))
    .unwrap();
    let labelled = cms.create(&PostParams::default(), &labelled).await.unwrap();

    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, WORKER_IMAGE, &cancel);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    create(&tms, minimal_tenant_model("fraud", &sha)).await.unwrap();
    let cond = degraded(&tms, "fraud", "NameConflict").await;
    assert!(cond.message.contains("Service \"fraud-pods\" already exists"), "{}", cond.message);
    warning_event(&client, &ns, "fraud", "NameConflict").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let now = svcs.get("fraud-pods").await.unwrap();
    assert_eq!(now.resource_version(), theirs.resource_version(), "the user's Service was changed");
    assert!(now.owner_references().is_empty());
    assert!(deps.get_opt("fraud-blue").await.unwrap().is_none());

    // Deleting the TenantModel leaves the user's objects alone.
    tms.delete("fraud", &DeleteParams::foreground()).await.unwrap();
    eventually(Duration::from_secs(30), "TenantModel gone", || async {
        tms.get_opt("fraud").await.ok()?.is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(svcs.get("fraud-pods").await.unwrap().resource_version(), theirs.resource_version());

    // Once the name is free the TenantModel runs, and pruning its children spares the user's
    // labelled ConfigMap; deleting the TenantModel later does too.
    svcs.delete("fraud-pods", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), "user's Service gone", || async {
        svcs.get_opt("fraud-pods").await.ok()?.is_none().then_some(())
    })
    .await;
    create(&tms, minimal_tenant_model("fraud", &sha)).await.unwrap();
    eventually(Duration::from_secs(30), "children", || async {
        let d = deps.get_opt("fraud-blue").await.ok()??;
        let s = svcs.get_opt("fraud-pods").await.ok()??;
        (!d.owner_references().is_empty() && !s.owner_references().is_empty()).then_some(())
    })
    .await;
    let st = eventually(Duration::from_secs(30), "status after apply", || async {
        tms.get("fraud").await.ok()?.status.filter(|s| s.phase == Some(Phase::Pending))
    })
    .await;
    assert!(st.conditions.iter().any(|c| c.kind == "Degraded" && c.status == "False"));
    poke(&tms, "fraud", 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let notes = cms.get_opt("fraud-notes").await.unwrap().expect("the user's ConfigMap was pruned");
    assert_eq!(notes.resource_version(), labelled.resource_version());
    tms.delete("fraud", &DeleteParams::foreground()).await.unwrap();
    eventually(Duration::from_secs(60), "children garbage-collected", || async {
        (deps.get_opt("fraud-blue").await.ok()?.is_none() && svcs.get_opt("fraud-pods").await.ok()?.is_none())
            .then_some(())
    })
    .await;
    assert!(cms.get_opt("fraud-notes").await.unwrap().is_some(), "the user's ConfigMap was deleted");

    cleanup(client, &ns, cancel, op).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crd_bounds_names_lists_and_sizes() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-crd").await;
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let refused = |name: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut tm = minimal_tenant_model(name, &sha);
        f(&mut tm);
        tm
    };

    // Names: DNS-1035 labels of at most 52 characters.
    let long = format!("a{}", "b".repeat(69));
    assert_eq!(long.len(), 70);
    let err = create(&tms, minimal_tenant_model(&long, &sha)).await.unwrap_err().to_string();
    assert!(err.contains("at most 52 characters"), "{err}");
    let err = create(&tms, minimal_tenant_model(&"c".repeat(53), &sha)).await.unwrap_err().to_string();
    assert!(err.contains("at most 52 characters"), "{err}");
    for bad in ["1fraud", "fraud.v2"] {
        let err = create(&tms, minimal_tenant_model(bad, &sha)).await.unwrap_err().to_string();
        assert!(err.contains("DNS-1035"), "{bad}: {err}");
    }

    // Lists, sizes and names inside the spec.
    let cases: Vec<(&str, SpecEdit)> = vec![
        (
            "kafkaSecrets",
            Box::new(|tm| {
                tm["spec"]["kafkaSecrets"] = json!((0..9).map(|i| json!({"name": format!("s{i}")})).collect::<Vec<_>>())
            }),
        ),
        (
            "source.topics",
            Box::new(|tm| tm["spec"]["source"]["topics"] = json!((0..65).map(|i| format!("t{i}")).collect::<Vec<_>>())),
        ),
        (
            "features.windows",
            Box::new(|tm| {
                tm["spec"]["features"]["windows"] = json!((0..257)
                    .map(|i| json!({"name": format!("w{i}"), "aggregation": "count", "window": "1h"}))
                    .collect::<Vec<_>>())
            }),
        ),
        ("maxRecordBytes", Box::new(|tm| tm["spec"]["source"]["maxRecordBytes"] = json!(20 * 1024 * 1024))),
        ("topics[0]", Box::new(|tm| tm["spec"]["source"]["topics"] = json!(["../etc"]))),
        ("sink.topic", Box::new(|tm| tm["spec"]["sink"]["topic"] = json!("scores out"))),
        ("kafkaSecrets[0].name", Box::new(|tm| tm["spec"]["kafkaSecrets"] = json!([{"name": "../../etc"}]))),
        ("image", Box::new(|tm| tm["spec"]["image"] = json!("worker:1 --privileged"))),
        // A secret Kafka property inline (the message names the rule, not the value).
        (
            "source.properties.never inline values",
            Box::new(|tm| tm["spec"]["source"]["properties"] = json!({"sasl.password": "hunter2"})),
        ),
        (
            "sink.properties.never inline values",
            Box::new(|tm| tm["spec"]["sink"]["properties"] = json!({"ssl.key.password": "hunter2"})),
        ),
        // Autoscaling bounds.
        (
            "autoscaling.must not exceed maxParallelism",
            Box::new(|tm| tm["spec"]["autoscaling"] = json!({"minParallelism": 3, "maxParallelism": 2})),
        ),
        (
            "autoscaling.targetUtilization",
            Box::new(|tm| tm["spec"]["autoscaling"] = json!({"maxParallelism": 2, "targetUtilization": 1.5})),
        ),
        (
            "source.properties.at most 64",
            Box::new(|tm| {
                tm["spec"]["source"]["properties"] =
                    json!((0..65).map(|i| (format!("p{i}"), json!("v"))).collect::<serde_json::Map<_, _>>())
            }),
        ),
    ];
    for (i, (field, f)) in cases.iter().enumerate() {
        let tm = refused(&format!("bad{i}"), f.as_ref());
        let err = create(&tms, tm).await.expect_err(field).to_string();
        let last = field.rsplit('.').next().unwrap().split('[').next().unwrap();
        assert!(err.contains(last), "{field}: {err}");
    }
    assert_eq!(
        streamscore_crds::pipeline::MAX_RECORD_BYTES,
        16 * 1024 * 1024,
        "the test's oversized value must exceed the maximum"
    );

    // The longest name is accepted and every child of it is valid.
    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, WORKER_IMAGE, &cancel);
    let longest = format!("f{}", "x".repeat(51));
    create(&tms, minimal_tenant_model(&longest, &sha)).await.expect("a 52-character name is accepted");
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually(Duration::from_secs(30), "children of the longest name", || async {
        deps.get_opt(&format!("{longest}-blue")).await.ok()??;
        svcs.get_opt(&format!("{longest}-pods")).await.ok()??;
        cms.get_opt(&format!("{longest}-pipeline")).await.ok()??;
        let st = tms.get(&longest).await.ok()?.status?;
        (st.phase == Some(Phase::Pending)).then_some(())
    })
    .await;

    cleanup(client, &ns, cancel, op).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_the_api_server_refuses_shows_in_status() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-apply").await;
    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, WORKER_IMAGE, &cancel);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    // Requests above limits: the CRD cannot tell, the Deployment's validation refuses it.
    let mut tm = minimal_tenant_model("fraud", &sha);
    tm["spec"]["resources"] = json!({"requests": {"cpu": "2"}, "limits": {"cpu": "1"}});
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "fraud", "ApplyFailed").await;
    assert!(
        cond.message.contains("Deployment \"fraud-blue\"") && cond.message.contains("less than or equal to cpu limit"),
        "{}",
        cond.message
    );
    warning_event(&client, &ns, "fraud", "ApplyFailed").await;
    // Everything else went first: the NetworkPolicy and Services exist, the Deployment does not.
    let nps: Api<k8s_openapi::api::networking::v1::NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    assert!(nps.get_opt("fraud").await.unwrap().is_some());
    assert!(Api::<Service>::namespaced(client.clone(), &ns).get_opt("fraud-pods").await.unwrap().is_some());
    assert!(Api::<Deployment>::namespaced(client.clone(), &ns).get_opt("fraud-blue").await.unwrap().is_none());

    // Fixing the spec clears it.
    let patch = json!({"spec": {"resources": {"requests": {"cpu": "500m"}, "limits": {"cpu": "1"}}}});
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let st = eventually(Duration::from_secs(30), "applied after the fix", || async {
        tms.get("fraud").await.ok()?.status.filter(|s| s.phase == Some(Phase::Pending))
    })
    .await;
    let d = st.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
    assert_eq!(d.status, "False");

    cleanup(client, &ns, cancel, op).await;
}

/// The operator as the chart installs it: the chart's ServiceAccount and namespaced RBAC
/// (`watchNamespaces`), not the test's cluster-admin. Every step of a reconcile must be
/// allowed: reading Secret metadata and the model, applying and pruning children, pods for
/// workers' readiness, status, events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_works_under_the_charts_rbac() {
    let admin = kube_client().await;
    let (ns, sha) = namespace_with_model(&admin, "iso-rbac").await;
    let release = "rbac";
    let out = std::process::Command::new("helm")
        .args(["template", release, "charts/streamscore", "-n", &ns, "--set", "crds.install=false"])
        .args(["--set", &format!("watchNamespaces={{{ns}}}")])
        .args(["--show-only", "templates/rbac.yaml", "--show-only", "templates/serviceaccount.yaml"])
        .current_dir(repo_root())
        .output()
        .expect("helm on PATH");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &out.stdout).unwrap();
    let applied = std::process::Command::new("kubectl")
        .args(["apply", "-n", &ns, "-f", file.path().to_str().unwrap()])
        .output()
        .expect("kubectl on PATH");
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    let mut config = kube::Config::infer().await.unwrap();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{release}-streamscore-operator"));
    let client = kube::Client::try_from(config).unwrap();
    // What the status code needs, besides what the reconcile below exercises.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &ns);
    pods.list(&ListParams::default()).await.expect("the chart lets the operator list pods");

    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "kafka", "labels": {"streamscore.io/tenant-access": "true"}},
        "stringData": {"password": "p"}
    }))
    .unwrap();
    Api::<Secret>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &secret).await.unwrap();
    let theirs: Service = serde_json::from_value(json!({
        "metadata": {"name": "taken"}, "spec": {"ports": [{"port": 80}]}
    }))
    .unwrap();
    Api::<Service>::namespaced(admin.clone(), &ns).create(&PostParams::default(), &theirs).await.unwrap();

    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, WORKER_IMAGE, &cancel);
    let tms: Api<TenantModel> = Api::namespaced(admin.clone(), &ns);
    let mut tm = minimal_tenant_model("fraud", &sha);
    tm["spec"]["kafkaSecrets"] = json!([{"name": "kafka"}]);
    create(&tms, tm).await.unwrap();
    create(&tms, minimal_tenant_model("taken", &sha)).await.unwrap();
    let st = eventually(Duration::from_secs(30), "fraud applied under the chart's RBAC", || async {
        tms.get("fraud").await.ok()?.status.filter(|s| s.phase == Some(Phase::Pending))
    })
    .await;
    assert!(st.conditions.iter().any(|c| c.kind == "Degraded" && c.status == "False"), "{st:?}");
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
    assert!(deps.get_opt("fraud-blue").await.unwrap().is_some());
    degraded(&tms, "taken", "NameConflict").await;
    warning_event(&admin, &ns, "taken", "NameConflict").await;
    // A model change rolls out (Normal event) and the Deployment is updated.
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": {"version": "v2"}}})))
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "rollout under the chart's RBAC", || async {
        let d = deps.get("fraud-blue").await.ok()?;
        let ann = d.spec?.template.metadata?.annotations?;
        (ann.get("streamscore.io/model-version").map(String::as_str) == Some("v2")).then_some(())
    })
    .await;

    cleanup(admin, &ns, cancel, op).await;
}

/// With a per-namespace Kafka prefix, a TenantModel naming another namespace's topic is
/// refused with the field and the prefix; one within its prefix runs, in a consumer group that
/// starts with the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_names_are_confined_to_the_namespaces_prefix() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-prefix").await;
    let cancel = CancellationToken::new();
    let policy = TenantPolicy { kafka_prefix: Some("{namespace}.".into()), ..TenantPolicy::default() };
    let op = streamscore_tests::spawn_operator_with_policy(&client, &ns, WORKER_IMAGE, policy, &cancel);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let mut tm = minimal_tenant_model("fraud", &sha);
    tm["spec"]["source"]["topics"] = json!(["someone-else.payments"]);
    tm["spec"]["sink"] = json!({"topic": format!("{ns}.scores"), "deadLetterTopic": format!("{ns}.dlq")});
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "fraud", "KafkaNameNotAllowed").await;
    assert!(
        cond.message
            .starts_with(&format!("spec.source.topics[0]: \"someone-else.payments\" must start with \"{ns}.\"")),
        "{}",
        cond.message
    );
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(deps.get_opt("fraud-blue").await.unwrap().is_none());
    let patch = json!({"spec": {"source": {"topics": [format!("{ns}.payments")]}}});
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
    let cm = eventually(Duration::from_secs(30), "pipeline ConfigMap within the prefix", || async {
        Api::<ConfigMap>::namespaced(client.clone(), &ns).get_opt("fraud-pipeline").await.ok().flatten()
    })
    .await;
    let pipeline = &cm.data.unwrap()["pipeline.yaml"];
    assert!(pipeline.contains(&format!("groupId: {ns}.streamscore.fraud")), "{pipeline}");
    cleanup(client, &ns, cancel, op).await;
}

/// The platform's maximum per worker refuses a TenantModel asking for more; one that sets no
/// resources gets the platform's defaults, and every emptyDir has a size limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_resources_have_platform_defaults_and_a_maximum() {
    use std::sync::Arc;
    use streamscore_operator::build::BuildContext;
    use streamscore_operator::metrics::OperatorMetrics;
    use streamscore_operator::reconcile::Context;
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "iso-res").await;
    let policy = TenantPolicy {
        max_resources: [("cpu".to_owned(), "2".to_owned()), ("memory".to_owned(), "4Gi".to_owned())].into(),
        ..TenantPolicy::default()
    };
    let defaults: k8s_openapi::api::core::v1::ResourceRequirements =
        serde_json::from_value(json!({"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}))
            .unwrap();
    let ctx = Arc::new(Context {
        client: client.clone(),
        build: BuildContext {
            default_image: WORKER_IMAGE.into(),
            operator_namespace: "streamscore-system".into(),
            kafka_prefix: None,
            default_resources: Some(defaults.clone()),
            worker_egress: Some(Default::default()),
            metrics_from: None,
            worker_pod_template: Default::default(),
        },
        metrics: Arc::new(OperatorMetrics::new()),
        recorder: streamscore_operator::reconcile::Events::new(
            client.clone(),
            kube::runtime::events::Reporter { controller: "streamscore-operator".into(), instance: None },
        ),
        policy,
        workers: Default::default(),
        baselines: Default::default(),
        autoscalers: Default::default(),
    });
    let cancel = CancellationToken::new();
    let op = tokio::spawn({
        let (ns, c) = (ns.clone(), cancel.clone());
        async move { streamscore_operator::run_controllers(ctx, &[ns], c).await }
    });
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    let mut tm = minimal_tenant_model("greedy", &sha);
    tm["spec"]["resources"] = json!({"requests": {"cpu": "16"}, "limits": {"memory": "64Gi"}});
    create(&tms, tm).await.unwrap();
    let cond = degraded(&tms, "greedy", "ResourcesNotAllowed").await;
    assert!(
        cond.message.contains("spec.resources.requests.cpu: 16 is above the platform's maximum per worker (2)"),
        "{}",
        cond.message
    );
    assert!(cond.message.contains("spec.resources.limits.memory: 64Gi"), "{}", cond.message);
    assert!(deps.get_opt("greedy-blue").await.unwrap().is_none());

    create(&tms, minimal_tenant_model("modest", &sha)).await.unwrap();
    let d = eventually(Duration::from_secs(30), "Deployment with the default resources", || async {
        deps.get_opt("modest-blue").await.ok().flatten()
    })
    .await;
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.containers[0].resources.as_ref(), Some(&defaults));
    for v in pod.volumes.unwrap() {
        if let Some(e) = v.empty_dir {
            assert!(e.size_limit.is_some(), "emptyDir {} has no size limit", v.name);
        }
    }
    cleanup(client, &ns, cancel, op).await;
}
