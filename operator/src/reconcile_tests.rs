//! The reconcile against a scripted API server (no network): each test lists the requests the
//! API answers and asserts which requests the reconcile made and what it returned. The real
//! API server tests (`tests/tests/operator_*.rs`) cover the same paths end to end.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};

use super::*;
use crate::build::BuildContext;
use crate::metrics::OperatorMetrics;

/// One request as the API server saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    path: String,
    body: Value,
}

/// A route: method, exact path, and the status and body to answer with (`None`: echo the
/// request's body back, as an apply or create does).
type Route = (Method, &'static str, u16, Option<Value>);

/// A client whose requests `routes` answer (anything else: 404), and the requests it made.
fn scripted(routes: Vec<Route>) -> (Client, Arc<Mutex<Vec<Seen>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (routes, log) = (Arc::new(routes), seen.clone());
    let service = tower::service_fn(move |req: Request<Body>| {
        let (routes, log) = (routes.clone(), log.clone());
        async move {
            let (parts, body) = req.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let path = parts.uri.path().to_owned();
            log.lock().unwrap().push(Seen { method: parts.method.clone(), path: path.clone(), body: body.clone() });
            let (status, answer) = routes
                .iter()
                .find(|(m, p, ..)| *m == parts.method && *p == path)
                .map_or_else(
                    || (404, json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})),
                    |(_, _, status, answer)| (*status, answer.clone().unwrap_or(body)),
                );
            Ok::<_, std::convert::Infallible>(
                Response::builder().status(status).body(Body::from(serde_json::to_vec(&answer).unwrap())).unwrap(),
            )
        }
    });
    (Client::new(service, "payments"), seen)
}

fn context(client: Client) -> Arc<Context> {
    Arc::new(Context {
        client: client.clone(),
        build: BuildContext {
            default_image: "streamscore-worker:0.1.0".into(),
            operator_namespace: "streamscore-system".into(),
            kafka_prefix: None,
            default_resources: None,
            worker_egress: None,
            metrics_from: None,
            worker_pod_template: Default::default(),
        },
        metrics: Arc::new(OperatorMetrics::new()),
        recorder: crate::reconcile::Events::new(
            client,
            kube::runtime::events::Reporter { controller: "streamscore-operator".into(), instance: None },
        ),
        policy: Default::default(),
        workers: Default::default(),
        baselines: Default::default(),
        autoscalers: Default::default(),
    })
}

/// The fraud example in namespace `payments`, as the API server would hand it over.
fn fraud() -> TenantModel {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/fraud-detection.yaml");
    let mut tm: TenantModel = serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    tm.metadata.namespace = Some("payments".into());
    tm.metadata.uid = Some("0c5b7a1e-0000-4000-8000-000000000001".into());
    tm.metadata.generation = Some(1);
    tm
}

const STATUS_PATH: &str = "/apis/streamscore.io/v1alpha1/namespaces/payments/tenantmodels/fraud/status";

#[tokio::test]
async fn an_invalid_spec_is_reported_in_status_and_an_event_and_nothing_is_applied() {
    let mut tm = fraud();
    tm.spec.model.config_map = None;
    tm.spec.model.uri = Some("https://models.example.com/fraud.onnx".into());
    let (client, seen) = scripted(vec![
        (Method::PATCH, STATUS_PATH, 200, Some(serde_json::to_value(&tm).unwrap())),
        (Method::POST, "/apis/events.k8s.io/v1/namespaces/payments/events", 201, None),
    ]);
    let ctx = context(client);
    let action = reconcile(Arc::new(tm), ctx.clone()).await.expect("a bad spec is not a reconcile error");
    assert_eq!(action, Action::await_change(), "nothing outside the spec can fix it");

    let seen = seen.lock().unwrap().clone();
    let status = seen.iter().find(|s| s.path == STATUS_PATH).expect("status written");
    assert_eq!(status.body["status"]["phase"], json!("Degraded"), "{}", status.body);
    let ready = status.body["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .expect("a Ready condition")
        .clone();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("InvalidSpec")), "{ready}");
    assert!(ready["message"].as_str().unwrap().starts_with("spec.model.uri: "), "{ready}");
    let event = seen.iter().find(|s| s.path.ends_with("/events")).expect("an Event");
    assert_eq!((event.body["type"].as_str(), event.body["reason"].as_str()), (Some("Warning"), Some("InvalidSpec")));
    let others: Vec<_> = seen.iter().filter(|s| s.path != STATUS_PATH && !s.path.ends_with("/events")).collect();
    assert!(others.is_empty(), "no child read or applied for a spec that cannot run: {others:?}");
}

#[tokio::test]
async fn an_api_failure_names_the_step_it_failed_in_and_applies_nothing() {
    // The model ConfigMap cannot be read (the API server fails): the Observe step.
    let (client, seen) = scripted(vec![(
        Method::GET,
        "/api/v1/namespaces/payments/configmaps/fraud-model",
        500,
        Some(
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "etcd timeout", "code": 500}),
        ),
    )]);
    let ctx = context(client);
    let err = reconcile(Arc::new(fraud()), ctx.clone()).await.expect_err("the API failed");
    assert!(matches!(err, Error::Api { step: Step::Observe, .. }), "{err:?}");
    assert_eq!(err.kind(), "Observe");
    assert!(err.to_string().starts_with("Observe: Kubernetes API: "), "{err}");
    let writes: Vec<_> = seen.lock().unwrap().iter().filter(|s| s.method != Method::GET).cloned().collect();
    assert!(writes.is_empty(), "nothing written after a failed read: {writes:?}");
    // The errors metric carries the step.
    error_policy(Arc::new(fraud()), &err, ctx.clone());
    assert!(
        ctx.metrics.encode().contains(r#"streamscore_operator_reconcile_errors_total{kind="Observe"} 1"#),
        "{}",
        ctx.metrics.encode()
    );
}

#[test]
fn after_the_barrier_the_candidate_keeps_its_own_worker_count() {
    // The old colour was scaled to 0: never the candidate's count.
    assert_eq!(stopped_colour_replicas(Some(0), Some(3), 2), 3);
    // The candidate's Deployment not read back yet: the live count while it has workers.
    assert_eq!(stopped_colour_replicas(Some(4), None, 2), 4);
    assert_eq!(stopped_colour_replicas(Some(0), None, 2), 2);
    assert_eq!(stopped_colour_replicas(Some(0), Some(0), 5), 5);
}

#[test]
fn a_rolled_back_spec_is_shown_held_back_only_while_it_stands() {
    let pipeline = render_pipeline(&fraud(), None);
    let rolled_back = |hash: &str| UpgradeState {
        current: None,
        last: Some(UpgradeOutcome {
            from_version: "v1".into(),
            to_version: "v1".into(),
            result: "RolledBack".into(),
            message: "gate Ready failed".into(),
            spec_hash: hash.into(),
            ..Default::default()
        }),
        plan: None,
        completed_to: None,
    };
    let plan = |apply_live: bool, held_back: Option<&str>| Plan {
        live_pipeline: pipeline.clone(),
        apply_live,
        held_back: held_back.map(str::to_owned),
    };
    // The plan's own reason.
    assert_eq!(held_back_shown(&plan(false, Some("why")), &rolled_back("h"), "h").as_deref(), Some("why"));
    // Rolled back in this reconcile (the plan kept the live colour): the rollback's reason.
    let shown = held_back_shown(&plan(false, None), &rolled_back("h"), "h").unwrap_or_default();
    assert!(shown.contains("rolled back (gate Ready failed)"), "{shown}");
    // Another spec since: nothing held back.
    assert_eq!(held_back_shown(&plan(false, None), &rolled_back("other"), "h"), None);
    // The spec runs (e.g. a rolled-back checkpointStore change reverted: the same hash, as the
    // hash leaves stores out): nothing held back, though the hash still matches.
    assert_eq!(held_back_shown(&plan(true, None), &rolled_back("h"), "h"), None);
}
