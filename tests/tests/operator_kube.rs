//! The operator against the real kube-apiserver + controller-manager: children, owner
//! references, hashes, scale, no-op reconciles, validation by the API server and by the
//! operator, garbage collection.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;
use serde_json::json;
use streamscore_crds::tenantmodel::{Phase, TenantModel};
use streamscore_tests::{eventually, kube_client, minimal_tenant_model, namespace_with_model};
use tokio_util::sync::CancellationToken;

/// The shared minimal TenantModel with two workers.
fn tenant_model(name: &str, sha: &str) -> serde_json::Value {
    let mut tm = minimal_tenant_model(name, sha);
    tm["spec"]["parallelism"] = json!(2);
    tm
}

async fn dep(api: &Api<Deployment>, name: &str) -> Deployment {
    eventually(Duration::from_secs(30), name, || async { api.get_opt(name).await.ok().flatten() }).await
}

fn hash(d: &Deployment) -> String {
    d.spec.as_ref().unwrap().template.metadata.as_ref().unwrap().annotations.as_ref().unwrap()
        ["streamscore.io/config-hash"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenantmodel_lifecycle_against_the_real_api_server() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "op").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);

    let cancel = CancellationToken::new();
    let (op, op_metrics) = streamscore_tests::spawn_operator_observed(
        &client,
        &ns,
        "streamscore-worker:test",
        Default::default(),
        &cancel,
    );

    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(tenant_model("fraud", &sha)).unwrap();
    let tm = tms.create(&PostParams::default(), &tm).await.expect("valid TenantModel accepted");
    let uid = tm.uid().unwrap();

    // Children with owner references and the expected fields.
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = dep(&deps, "fraud-blue").await;
    let owner = &d.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.uid.as_str(), owner.controller), ("TenantModel", uid.as_str(), Some(true)));
    let spec = d.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(2));
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.automount_service_account_token, Some(false));
    assert_eq!(pod.security_context.as_ref().unwrap().seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!((sc.run_as_non_root, sc.read_only_root_filesystem), (Some(true), Some(true)));
    assert_eq!(sc.capabilities.as_ref().unwrap().drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(c.image.as_deref(), Some("streamscore-worker:test"));
    assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
    let pipeline = cms.get("fraud-pipeline").await.unwrap();
    let rendered: streamscore_crds::PipelineConfig =
        serde_yaml::from_str(&pipeline.data.unwrap()["pipeline.yaml"]).unwrap();
    assert_eq!(rendered.source.group_id, format!("streamscore.{ns}.fraud"));
    assert_eq!(rendered.model.path, "/etc/streamscore/model/model.onnx");
    let sa: ServiceAccount = Api::namespaced(client.clone(), &ns).get("fraud-worker").await.unwrap();
    assert_eq!(sa.automount_service_account_token, Some(false));
    let svcs: Api<Service> = Api::namespaced(client.clone(), &ns);
    assert_eq!(svcs.get("fraud-pods").await.unwrap().spec.unwrap().cluster_ip.as_deref(), Some("None"));
    svcs.get("fraud").await.unwrap();
    let _: PodDisruptionBudget = Api::namespaced(client.clone(), &ns).get("fraud").await.unwrap();
    let np: NetworkPolicy = Api::namespaced(client.clone(), &ns).get("fraud").await.unwrap();
    let np = np.spec.unwrap();
    let ingress = np.ingress.unwrap();
    assert_eq!(ingress.len(), 3);
    // The metrics port, open to scrapers (any namespace by default); the query API is not.
    let metrics = &ingress[2];
    assert_eq!(format!("{:?}", metrics.ports.as_ref().unwrap()[0].port), "Some(Int(9090))");
    assert!(metrics.from.as_ref().unwrap()[0].namespace_selector.is_some());
    // Egress as the API server stored it: DNS, then the bootstrap servers' port, nothing else.
    let kafka_port: i32 = rendered.source.bootstrap_servers.rsplit_once(':').unwrap().1.parse().unwrap();
    let egress: Vec<Vec<(String, String)>> = np
        .egress
        .unwrap()
        .iter()
        .map(|r| {
            r.ports
                .iter()
                .flatten()
                .map(|p| (format!("{:?}", p.port), p.protocol.clone().unwrap_or_default()))
                .collect()
        })
        .collect();
    let port = |n: i32, proto: &str| {
        (format!("{:?}", Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n))), proto.to_owned())
    };
    assert_eq!(egress[0], [port(53, "UDP"), port(53, "TCP")], "{egress:?}");
    assert_eq!(egress[1], [port(kafka_port, "TCP")], "{egress:?}");
    assert_eq!(egress[2], [port(8080, "TCP")], "the peers' query port (forwarded queries): {egress:?}");
    assert_eq!(egress.len(), 3, "no object store here, nothing else: {egress:?}");
    assert_eq!(np.policy_types.unwrap(), ["Ingress", "Egress"]);

    // A child deleted by hand is put back at once (every child kind is watched), well before
    // the periodic reconcile of a TenantModel whose workers are unavailable (10 s).
    let nps: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &ns);
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let old_uids = (
        nps.get("fraud").await.unwrap().uid(),
        pdbs.get("fraud").await.unwrap().uid(),
        sas.get("fraud-worker").await.unwrap().uid(),
    );
    nps.delete("fraud", &DeleteParams::default()).await.unwrap();
    pdbs.delete("fraud", &DeleteParams::default()).await.unwrap();
    sas.delete("fraud-worker", &DeleteParams::default()).await.unwrap();
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(20), "the deleted children recreated", || async {
        let uids = (
            nps.get_opt("fraud").await.ok()??.uid(),
            pdbs.get_opt("fraud").await.ok()??.uid(),
            sas.get_opt("fraud-worker").await.ok()??.uid(),
        );
        (uids.0 != old_uids.0 && uids.1 != old_uids.1 && uids.2 != old_uids.2).then_some(())
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "recreated after {:?}: by a periodic reconcile, not by the watch",
        started.elapsed()
    );

    // Status: no kubelet here, so the workers are not available.
    let st = eventually(Duration::from_secs(30), "status", || async {
        tms.get("fraud").await.ok()?.status.filter(|s| s.phase.is_some())
    })
    .await;
    assert_eq!(st.phase, Some(Phase::Pending));
    assert_eq!(st.model_version.as_deref(), Some("v1"));
    let ready = st.conditions.iter().find(|c| c.kind == "Ready").unwrap();
    // Unschedulable once the scheduler has marked the pods (0 nodes), before that not available.
    assert_eq!(ready.status, "False");
    assert!(["WorkersNotAvailable", "Unschedulable"].contains(&ready.reason.as_str()), "{}", ready.reason);

    // kubectl prints the columns.
    let out = std::process::Command::new("kubectl").args(["get", "tm", "-n", &ns]).output().expect("kubectl on PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap_or_default();
    for col in ["NAME", "PHASE", "READY", "MODEL", "PARALLELISM", "AGE"] {
        assert!(header.contains(col), "{col} missing from {header:?}");
    }
    assert!(text.contains("Pending") && text.contains("v1"), "{text}");

    // An unchanged object: a reconcile makes no write. First let the status settle (the
    // controller-manager is still creating the ReplicaSet and Pods, whose progress the status
    // reports), so that only the poke below can trigger a reconcile.
    let mut last = tms.get("fraud").await.unwrap().metadata.resource_version;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = tms.get("fraud").await.unwrap().metadata.resource_version;
        if now == last {
            break;
        }
        last = now;
    }
    let rv = |d: &Deployment| d.metadata.resource_version.clone().unwrap();
    let before = rv(&deps.get("fraud-blue").await.unwrap());
    let cm_before = cms.get("fraud-pipeline").await.unwrap().metadata.resource_version;
    let done = streamscore_tests::reconciles_done(&op_metrics);
    let patched = tms
        .patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"annotations": {"poke": "1"}}})))
        .await
        .unwrap();
    // The poke's reconcile finished (not merely a pause that may have seen none).
    eventually(Duration::from_secs(30), "a reconcile after the poke", || async {
        (streamscore_tests::reconciles_done(&op_metrics) > done).then_some(())
    })
    .await;
    assert_eq!(rv(&deps.get("fraud-blue").await.unwrap()), before, "Deployment rewritten by a no-op reconcile");
    assert_eq!(cms.get("fraud-pipeline").await.unwrap().metadata.resource_version, cm_before);
    assert_eq!(
        tms.get("fraud").await.unwrap().metadata.resource_version,
        patched.metadata.resource_version,
        "status rewritten by a no-op reconcile"
    );

    // An operator restart is idempotent: the new operator's first reconciles write nothing.
    let tm_rv = tms.get("fraud").await.unwrap().metadata.resource_version;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
    let cancel = CancellationToken::new();
    let (op, op_metrics) = streamscore_tests::spawn_operator_observed(
        &client,
        &ns,
        "streamscore-worker:test",
        Default::default(),
        &cancel,
    );
    // The new operator's first reconcile finished.
    eventually(Duration::from_secs(30), "the restarted operator's first reconcile", || async {
        (streamscore_tests::reconciles_done(&op_metrics) > 0).then_some(())
    })
    .await;
    assert_eq!(rv(&deps.get("fraud-blue").await.unwrap()), before, "restart rewrote the Deployment");
    assert_eq!(cms.get("fraud-pipeline").await.unwrap().metadata.resource_version, cm_before);
    assert_eq!(tms.get("fraud").await.unwrap().metadata.resource_version, tm_rv, "restart rewrote the status");

    // Scale subresource and parallelism → replicas.
    let h1 = hash(&deps.get("fraud-blue").await.unwrap());
    tms.patch_scale("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 3}}))).await.unwrap();
    eventually(Duration::from_secs(30), "3 replicas", || async {
        (deps.get("fraud-blue").await.ok()?.spec?.replicas == Some(3)).then_some(())
    })
    .await;
    // A model change changes the pod template hash.
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": {"version": "v2"}}})))
        .await
        .unwrap();
    let h2 = eventually(Duration::from_secs(30), "new config hash", || async {
        let h = hash(&deps.get("fraud-blue").await.ok()?);
        (h != h1).then_some(h)
    })
    .await;
    assert_ne!(h1, h2);

    // The API server rejects what the schema and CEL rules forbid, with readable messages.
    let mut bad = tenant_model("bad1", &sha);
    bad["spec"]["parallelism"] = json!(0);
    let err = tms.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("spec.parallelism"), "{err}");
    let mut bad = tenant_model("bad2", &sha);
    bad["spec"]["sink"]["deadLetterTopic"] = json!("scores");
    let err = tms.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("deadLetterTopic must differ"), "{err}");
    let mut bad = tenant_model("bad4", &sha);
    bad["spec"]["features"]["emitted"] =
        json!([{"name": "spend_1h", "aggregation": "sum", "field": "amount", "size": "1h"}]);
    let err = tms.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("featureTopic is required"), "{err}");
    let mut bad = tenant_model("bad5", &sha);
    bad["spec"]["sink"]["featureTopic"] = json!("scores");
    let err = tms.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("featureTopic must differ"), "{err}");
    let mut bad = tenant_model("bad3", "not-a-digest");
    bad["spec"]["model"]["sha256"] = json!("xyz");
    let err = tms.create(&PostParams::default(), &serde_json::from_value(bad).unwrap()).await.unwrap_err().to_string();
    assert!(err.contains("sha256"), "{err}");

    // What only the operator can judge ends Degraded with the reason, and no children.
    let mut judged = tenant_model("judged", &sha);
    judged["spec"]["model"]["features"] = json!(["tx_1h", "no_such_feature"]);
    tms.create(&PostParams::default(), &serde_json::from_value(judged).unwrap()).await.unwrap();
    let st = eventually(Duration::from_secs(30), "Degraded", || async {
        tms.get("judged").await.ok()?.status.filter(|s| s.phase == Some(Phase::Degraded))
    })
    .await;
    let cond = st.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
    assert_eq!(cond.reason, "InvalidSpec");
    assert!(cond.message.contains("no_such_feature"), "{}", cond.message);
    assert!(deps.get_opt("judged-blue").await.unwrap().is_none());

    // A model ConfigMap whose bytes do not match the digest: Degraded at once, with both digests.
    let wrong = tenant_model("wrongdigest", &"0".repeat(64));
    tms.create(&PostParams::default(), &serde_json::from_value(wrong).unwrap()).await.unwrap();
    let st = eventually(Duration::from_secs(30), "Degraded (digest)", || async {
        tms.get("wrongdigest").await.ok()?.status.filter(|s| s.phase == Some(Phase::Degraded))
    })
    .await;
    let cond = st.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
    assert_eq!(cond.reason, "ModelDigestMismatch");
    assert!(cond.message.contains(&sha), "{}", cond.message);

    // Deleting the TenantModel garbage-collects every child.
    tms.delete("fraud", &DeleteParams::foreground()).await.unwrap();
    eventually(Duration::from_secs(60), "children garbage-collected", || async {
        let d = deps.get_opt("fraud-blue").await.ok()?;
        let c = cms.get_opt("fraud-pipeline").await.ok()?;
        let s = svcs.get_opt("fraud").await.ok()?;
        (d.is_none() && c.is_none() && s.is_none()).then_some(())
    })
    .await;

    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
    let nsapi: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client);
    let _ = nsapi.delete(&ns, &DeleteParams::default()).await;
}

/// Creates the two-worker TenantModel `name`, lets an operator apply it (blue is live) and
/// stops that operator.
async fn applied_as_blue(client: &kube::Client, ns: &str, name: &str, sha: &str) -> TenantModel {
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), ns);
    let cancel = CancellationToken::new();
    let (op, _metrics) =
        streamscore_tests::spawn_operator_observed(client, ns, "streamscore-worker:test", Default::default(), &cancel);
    let tm: TenantModel = serde_json::from_value(tenant_model(name, sha)).unwrap();
    let tm = tms.create(&PostParams::default(), &tm).await.unwrap();
    dep(&Api::namespaced(client.clone(), ns), &format!("{name}-blue")).await;
    eventually(Duration::from_secs(30), "status.activeColor blue", || async {
        (tms.get(name).await.ok()?.status?.active_color.as_deref() == Some("blue")).then_some(())
    })
    .await;
    cancel.cancel();
    op.await.unwrap();
    tm
}

/// An upgrade whose cut-over barrier is recorded: the operator has scaled the old colour
/// (blue) to 0 and the candidate (green) goes live. A reconcile in that state (the operator
/// restarted, or the candidate still confirming the barrier) must keep green's worker count:
/// taken from blue's Deployment, now 0, it would stop the candidate that is about to be live
/// (and complete the cut-over to a colour without workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_cut_over_barrier_the_candidate_keeps_its_workers() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "barrier").await;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    applied_as_blue(&client, &ns, "bar", &sha).await;

    // What the operator leaves once the barrier is recorded: green (the candidate, model v2)
    // with blue's two workers, blue scaled to 0, status.upgrade with liveFrom.
    tms.patch("bar", &PatchParams::default(), &Patch::Merge(json!({"spec": {"model": {"version": "v2"}}})))
        .await
        .unwrap();
    let mut green = deps.get("bar-blue").await.unwrap();
    green.metadata = kube::api::ObjectMeta {
        name: Some("bar-green".into()),
        labels: green.metadata.labels.clone(),
        owner_references: green.metadata.owner_references.clone(),
        ..Default::default()
    };
    green.status = None;
    let spec = green.spec.as_mut().unwrap();
    spec.replicas = Some(2);
    for labels in [spec.selector.match_labels.as_mut(), spec.template.metadata.as_mut().and_then(|m| m.labels.as_mut())]
        .into_iter()
        .flatten()
    {
        labels.insert("streamscore.io/color".into(), "green".into());
    }
    deps.create(&PostParams::default(), &green).await.unwrap();
    deps.patch("bar-blue", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 0}}))).await.unwrap();
    let mut st = tms.get_status("bar").await.unwrap().status.unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let t = streamscore_operator::rescale::millis_rfc3339(now_ms);
    st.upgrade = Some(
        serde_json::from_value(json!({
            "id": "u1-test", "candidate": "green", "kind": "ModelOnly", "step": "CuttingOver",
            "fromVersion": "v1", "toVersion": "v2", "specHash": "recorded", "message": "",
            "startedAt": t, "stepStartedAt": t,
            "candidateAt": r#"{"payments":{"0":10}}"#, "liveFrom": r#"{"payments":{"0":10}}"#, "fencedAt": t,
        }))
        .unwrap(),
    );
    tms.patch_status(
        "bar",
        &PatchParams::apply("streamscore-operator").force(),
        &Patch::Apply(json!({"apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel", "status": st})),
    )
    .await
    .unwrap();

    let cancel = CancellationToken::new();
    let (op, metrics) = streamscore_tests::spawn_operator_observed(
        &client,
        &ns,
        "streamscore-worker:test",
        Default::default(),
        &cancel,
    );
    eventually(Duration::from_secs(30), "three reconciles", || async {
        (streamscore_tests::reconciles_done(&metrics) >= 3).then_some(())
    })
    .await;
    let st = tms.get_status("bar").await.unwrap().status.unwrap();
    assert!(
        st.upgrade.as_ref().is_some_and(|u| u.live_from.is_some()),
        "the cut-over waits for green's two workers to confirm the barrier: {:?}, last {:?}",
        st.upgrade,
        st.last_upgrade
    );
    let replicas = |d: Option<Deployment>| d.map(|d| d.spec.and_then(|s| s.replicas));
    assert_eq!(replicas(deps.get_opt("bar-green").await.unwrap()), Some(Some(2)), "the candidate kept its two workers");
    assert_eq!(replicas(deps.get_opt("bar-blue").await.unwrap()), Some(Some(0)), "the old colour stays stopped");
    cancel.cancel();
    op.await.unwrap();
}

/// A TenantModel read with a status older than its children: a cut-over to green completed
/// (green's pipeline went live, blue's ConfigMap and Deployment were removed), but the
/// TenantModel the operator reads still says `activeColor: blue` (a watch cache behind the
/// status write, or a status write that failed after the removal). The operator must not
/// recreate blue (its workers would consume again from blue's group offsets: duplicate live
/// outputs); once the status says green, green is the live colour and blue stays gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_older_than_a_completed_cut_over_never_resurrects_the_old_colour() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "stale").await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);

    let tm = applied_as_blue(&client, &ns, "cut", &sha).await;

    // What a completed cut-over leaves: green's pipeline live from a barrier, blue removed.
    let blue = cms.get("cut-pipeline").await.unwrap();
    let mut pipeline: streamscore_crds::PipelineConfig =
        serde_yaml::from_str(&blue.data.as_ref().unwrap()["pipeline.yaml"]).unwrap();
    pipeline.shadow = Some(streamscore_crds::pipeline::ShadowConfig {
        topic: "scores.shadow".into(),
        dead_letter_topic: "scores-dlq.shadow".into(),
        feature_topic: None,
        live_from: Some([("payments".to_owned(), [(0, 10)].into())].into()),
    });
    let green: ConfigMap = serde_json::from_value(json!({
        "metadata": {
            "name": "cut-pipeline-green",
            "ownerReferences": [{
                "apiVersion": "streamscore.io/v1alpha1",
                "kind": "TenantModel",
                "name": "cut",
                "uid": tm.uid().unwrap(),
                "controller": true,
                "blockOwnerDeletion": true,
            }],
        },
        "data": {"pipeline.yaml": serde_yaml::to_string(&pipeline).unwrap()},
    }))
    .unwrap();
    cms.create(&PostParams::default(), &green).await.unwrap();
    cms.delete("cut-pipeline", &DeleteParams::default()).await.unwrap();
    deps.delete("cut-blue", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(30), "blue's Deployment gone", || async {
        deps.get_opt("cut-blue").await.ok()?.is_none().then_some(())
    })
    .await;

    // The operator reads activeColor blue: it waits, and recreates nothing of blue.
    let cancel = CancellationToken::new();
    let (op, op_metrics2) = streamscore_tests::spawn_operator_observed(
        &client,
        &ns,
        "streamscore-worker:test",
        Default::default(),
        &cancel,
    );
    eventually(Duration::from_secs(30), "three reconciles", || async {
        (streamscore_tests::reconciles_done(&op_metrics2) >= 3).then_some(())
    })
    .await;
    assert!(deps.get_opt("cut-blue").await.unwrap().is_none(), "blue's Deployment was recreated");
    assert!(cms.get_opt("cut-pipeline").await.unwrap().is_none(), "blue's ConfigMap was recreated");

    // The status catches up: green is live, blue stays gone.
    let mut st = tms.get_status("cut").await.unwrap().status.unwrap();
    st.active_color = Some("green".into());
    tms.patch_status(
        "cut",
        &PatchParams::apply("streamscore-operator").force(),
        &Patch::Apply(json!({"apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel", "status": st})),
    )
    .await
    .unwrap();
    dep(&deps, "cut-green").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(deps.get_opt("cut-blue").await.unwrap().is_none(), "blue's Deployment was recreated");
    cancel.cancel();
    op.await.unwrap();
}

/// Leader election judges expiry on the candidate's own clock, never by comparing the holder's
/// `renewTime` with it, against the real API server: a holder whose clock runs an hour ahead
/// and that stopped renewing is taken over once the Lease has gone unchanged for its duration
/// (compared with the candidate's clock, its renewTime would look valid for an hour); a holder
/// whose clock runs an hour behind and that keeps renewing is never taken over (compared, it
/// would look expired at once: two leaders). The holder itself stops leading once it has not
/// renewed for two thirds of the duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_expires_on_the_candidates_clock_not_on_the_holders() {
    use k8s_openapi::api::coordination::v1::Lease;
    use streamscore_operator::lease::LeaseLock;
    let client = kube_client().await;
    let ns = streamscore_tests::namespace(&client, "lease").await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let at = |offset_s: i64| {
        let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        // MicroTime: RFC 3339 with microseconds.
        streamscore_operator::rescale::millis_rfc3339(ms + offset_s * 1000).replace('Z', "000Z")
    };
    let lease = |name: &str, renew: String| -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"holderIdentity": "other", "leaseDurationSeconds": 2, "acquireTime": renew, "renewTime": renew}
        }))
        .unwrap()
    };

    // Ahead by an hour, not renewing: taken over after 2 s of no change.
    leases.create(&PostParams::default(), &lease("ahead", at(3600))).await.unwrap();
    let me = LeaseLock::new(leases.clone(), "ahead", "me", Duration::from_secs(2));
    assert!(!me.try_acquire_or_renew().await.unwrap(), "a Lease just seen is not expired");
    let t0 = std::time::Instant::now();
    eventually(Duration::from_secs(10), "the unchanged Lease taken over", || async {
        me.try_acquire_or_renew().await.unwrap().then_some(())
    })
    .await;
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_secs(2), "taken over after {waited:?}, before the Lease's duration");
    assert!(me.still_leading());
    let holder = leases.get("ahead").await.unwrap().spec.unwrap().holder_identity;
    assert_eq!(holder.as_deref(), Some("me"));
    tokio::time::sleep(me.renew_deadline() + Duration::from_millis(200)).await;
    assert!(!me.still_leading(), "no renewal for two thirds of the duration: no longer leading");

    // Behind by an hour, renewing every 500 ms: never taken over.
    leases.create(&PostParams::default(), &lease("behind", at(-3600))).await.unwrap();
    let renewing = tokio::spawn({
        let leases = leases.clone();
        async move {
            for i in 0..12 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let mut l = leases.get("behind").await.unwrap();
                let spec = l.spec.as_mut().unwrap();
                spec.renew_time = Some(serde_json::from_value(json!(at(-3600 + i))).unwrap());
                leases.replace("behind", &PostParams::default(), &l).await.unwrap();
            }
        }
    });
    let candidate = LeaseLock::new(leases.clone(), "behind", "me", Duration::from_secs(2));
    for _ in 0..16 {
        assert!(!candidate.try_acquire_or_renew().await.unwrap(), "a Lease renewed by its holder was taken over");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    renewing.await.unwrap();
}

/// The platform's `workerPodTemplate` (Helm values → `--worker-pod-template`) reaches every
/// worker pod through the real API server: scheduling, priority, pull secrets, extra labels and
/// annotations (never replacing the operator's), a spread constraint selecting the
/// TenantModel's own workers, and per-tenant workload identity on the ServiceAccount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_platforms_pod_template_reaches_every_worker() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "podtpl").await;
    let mut build = streamscore_tests::build_context("streamscore-worker:test");
    build.worker_pod_template = serde_json::from_value(json!({
        "nodeSelector": {"pool": "streamscore"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "streamscore", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway"}],
        "priorityClassName": "streamscore-workers",
        "imagePullSecrets": [{"name": "registry"}],
        "serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/ss-{namespace}-{name}"},
        "podAnnotations": {"cost-center": "ml-{name}", "streamscore.io/model-version": "not-mine"},
        "podLabels": {"team": "risk", "streamscore.io/tenantmodel": "someone-else"}
    }))
    .expect("a WorkerPodTemplate");
    let cancel = CancellationToken::new();
    let (op, _) = streamscore_tests::spawn_operator_with_build(&client, &ns, build, Default::default(), &cancel);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(tenant_model("fraud", &sha)).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();

    let d = dep(&Api::namespaced(client.clone(), &ns), "fraud-blue").await;
    let template = d.spec.unwrap().template;
    let meta = template.metadata.unwrap();
    let labels = meta.labels.unwrap();
    assert_eq!(labels["team"], "risk");
    assert_eq!(labels["streamscore.io/tenantmodel"], "fraud", "the operator's labels win");
    let annotations = meta.annotations.unwrap();
    assert_eq!(annotations["cost-center"], "ml-fraud");
    assert_eq!(annotations["streamscore.io/model-version"], "v1", "the operator's annotations win");
    let pod = template.spec.unwrap();
    assert_eq!(pod.node_selector.unwrap()["pool"], "streamscore");
    let t = &pod.tolerations.unwrap()[0];
    assert_eq!((t.key.as_deref(), t.effect.as_deref()), (Some("dedicated"), Some("NoSchedule")));
    assert!(pod.affinity.unwrap().node_affinity.is_some());
    assert_eq!(pod.priority_class_name.as_deref(), Some("streamscore-workers"));
    assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "registry");
    let spread = &pod.topology_spread_constraints.unwrap()[0];
    assert_eq!(spread.topology_key, "topology.kubernetes.io/zone");
    let sel = spread.label_selector.as_ref().unwrap().match_labels.as_ref().unwrap();
    assert_eq!(
        (sel["streamscore.io/tenantmodel"].as_str(), sel["streamscore.io/color"].as_str()),
        ("fraud", "blue"),
        "a constraint without a selector spreads this TenantModel's workers"
    );
    let sa: ServiceAccount = Api::namespaced(client.clone(), &ns).get("fraud-worker").await.unwrap();
    assert_eq!(
        sa.metadata.annotations.unwrap()["eks.amazonaws.com/role-arn"],
        format!("arn:aws:iam::123456789012:role/ss-{ns}-fraud")
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
}

/// `streamscore.io/pause-reconciliation: "true"`: a spec change is not applied while the
/// annotation stands (condition `ReconciliationPaused` True says why), and is applied once it
/// is removed (the condition turns False).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_tenantmodel_is_left_alone_until_the_annotation_goes() {
    let client = kube_client().await;
    let (ns, sha) = namespace_with_model(&client, "pause").await;
    let cancel = CancellationToken::new();
    let op = streamscore_tests::spawn_operator(&client, &ns, "streamscore-worker:test", &cancel);
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let tm: TenantModel = serde_json::from_value(tenant_model("fraud", &sha)).unwrap();
    tms.create(&PostParams::default(), &tm).await.unwrap();
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let replicas = |d: Deployment| d.spec.and_then(|s| s.replicas);
    assert_eq!(replicas(dep(&deps, "fraud-blue").await), Some(2));

    let annotate = |v: serde_json::Value| {
        let tms = tms.clone();
        async move {
            let patch = json!({"metadata": {"annotations": {"streamscore.io/pause-reconciliation": v}}});
            tms.patch("fraud", &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
        }
    };
    let paused_condition = |want: &'static str| {
        let tms = tms.clone();
        async move {
            eventually(Duration::from_secs(30), &format!("ReconciliationPaused {want}"), || async {
                let st = tms.get("fraud").await.ok()?.status?;
                st.conditions.into_iter().find(|c| c.kind == "ReconciliationPaused" && c.status == want)
            })
            .await
        }
    };
    annotate(json!("true")).await;
    let c = paused_condition("True").await;
    assert!(c.message.contains("changes nothing"), "{c:?}");
    tms.patch("fraud", &PatchParams::default(), &Patch::Merge(json!({"spec": {"parallelism": 3}}))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(replicas(deps.get("fraud-blue").await.unwrap()), Some(2), "applied while paused");

    annotate(serde_json::Value::Null).await;
    paused_condition("False").await;
    eventually(Duration::from_secs(30), "parallelism 3 applied", || async {
        (replicas(deps.get("fraud-blue").await.ok()?) == Some(3)).then_some(())
    })
    .await;
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), op).await;
}
