//! Reconcile of one TenantModel, as a pipeline of small steps:
//!
//! ```text
//!  observe (model ConfigMap) ─► validate (pure) ─► build (pure) ─► apply (SSA, one field
//!  manager, owner refs) ─► prune (children no longer desired, by label) ─► status (only if changed)
//! ```
//! Invalid specs end `Degraded` with a Warning event and wait for a change (no hot loop);
//! API errors are transient and requeue with backoff.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use streamscore_crds::tenantmodel::{TenantModel, TenantModelStatus};
use tracing::{info, instrument, warn};

use crate::build::{build, selector_string, BuildContext, COLOR};
use crate::metrics::OperatorMetrics;
use crate::status::{compute, Observed};
use crate::validate::validate;

/// The one field manager of every apply.
pub const FIELD_MANAGER: &str = "streamscore-operator";

/// Reconcile errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request (transient).
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The object lacks a namespace (cannot happen for a namespaced kind).
    #[error("TenantModel has no namespace")]
    NoNamespace,
}

impl Error {
    /// Low-cardinality kind, the `kind` label of the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ClientError",
            Error::NoNamespace => "NoNamespace",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Operator settings that shape children.
    pub build: BuildContext,
    /// Metrics.
    pub metrics: Arc<OperatorMetrics>,
    /// Event recorder.
    pub recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("build", &self.build).finish_non_exhaustive()
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, kube::Error>
where
    K: Resource + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj)).await
}

/// Deletes the objects of kind `K` labelled for `tm` whose names are not in `keep`.
async fn prune<K>(api: &Api<K>, tm: &str, keep: &BTreeSet<String>) -> Result<usize, kube::Error>
where
    K: Resource + DeserializeOwned + Clone + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&format!("streamscore.io/tenantmodel={tm}"));
    let mut n = 0;
    for o in api.list_metadata(&lp).await? {
        let name = o.name_any();
        if !keep.contains(&name) {
            api.delete(&name, &DeleteParams::background()).await?;
            n += 1;
        }
    }
    Ok(n)
}

async fn publish(ctx: &Context, tm: &TenantModel, type_: EventType, reason: &str, note: String) {
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = ctx.recorder.publish(&ev, &tm.object_ref(&())).await {
        warn!(error = %e, "cannot publish event");
    }
}

async fn patch_status(api: &Api<TenantModel>, tm: &TenantModel, status: TenantModelStatus) -> Result<bool, Error> {
    if tm.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": "streamscore.io/v1alpha1",
        "kind": "TenantModel",
        "status": status,
    });
    api.patch_status(&tm.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    Ok(true)
}

/// Reconciles one TenantModel.
#[instrument(skip_all, fields(tm = %tm.name_any(), ns = tm.namespace().unwrap_or_default()))]
pub async fn reconcile(tm: Arc<TenantModel>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&tm, &ctx).await;
    ctx.metrics.duration.observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(tm: &TenantModel, ctx: &Context) -> Result<Action, Error> {
    let ns = tm.namespace().ok_or(Error::NoNamespace)?;
    let name = tm.name_any();
    let client = ctx.client.clone();
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let generation = tm.metadata.generation;
    let version = tm.spec.model.version.clone();

    // observe
    let mut problems = match validate(tm) {
        Ok(()) => Vec::new(),
        Err(e) => e,
    };
    let mut reason = "InvalidSpec";
    if problems.is_empty() {
        if let Some(cm) = &tm.spec.model.config_map {
            let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
            match cms.get_opt(&cm.name).await? {
                None => {
                    reason = "ModelNotFound";
                    problems.push(format!("spec.model.configMap: ConfigMap {:?} not found in namespace {ns}", cm.name));
                }
                Some(found) => {
                    let bytes =
                        found.binary_data.as_ref().and_then(|d| d.get(&cm.key).map(|b| b.0.clone())).or_else(|| {
                            found.data.as_ref().and_then(|d| d.get(&cm.key).map(|t| t.clone().into_bytes()))
                        });
                    match bytes {
                        None => {
                            reason = "ModelNotFound";
                            problems
                                .push(format!("spec.model.configMap: ConfigMap {:?} has no key {:?}", cm.name, cm.key));
                        }
                        // Checked here too, so a wrong digest shows in status at once instead of
                        // as workers that never become ready.
                        Some(b) => {
                            let actual = hex::encode(Sha256::digest(&b));
                            if actual != tm.spec.model.sha256 {
                                reason = "ModelDigestMismatch";
                                problems.push(format!(
                                    "spec.model.sha256: {} does not match ConfigMap {:?} key {:?} (sha256 {actual})",
                                    tm.spec.model.sha256, cm.name, cm.key
                                ));
                            }
                        }
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        let message = problems.join("; ");
        let status = compute(
            tm.status.as_ref(),
            generation,
            &version,
            &Observed::Invalid { reason, message: message.clone() },
            &now(),
        );
        if patch_status(&tms, tm, status).await? {
            publish(ctx, tm, EventType::Warning, reason, message.clone()).await;
        }
        info!(%message, "spec cannot run");
        // A ConfigMap may appear or be fixed later; a bad spec only changes with the spec.
        return Ok(if reason == "ModelNotFound" {
            Action::requeue(Duration::from_secs(30))
        } else {
            Action::await_change()
        });
    }

    // build + apply
    let children = build(tm, &ctx.build);
    apply(&Api::<ServiceAccount>::namespaced(client.clone(), &ns), &children.service_account).await?;
    apply(&Api::<ConfigMap>::namespaced(client.clone(), &ns), &children.config_map).await?;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let old_hash = deps
        .get_opt(&format!("{name}-{COLOR}"))
        .await?
        .and_then(|d| d.spec?.template.metadata?.annotations?.get("streamscore.io/config-hash").cloned());
    let live = apply(&deps, &children.deployment).await?;
    apply(&Api::<Service>::namespaced(client.clone(), &ns), &children.service).await?;
    apply(&Api::<Service>::namespaced(client.clone(), &ns), &children.headless).await?;
    apply(&Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns), &children.pdb).await?;
    apply(&Api::<NetworkPolicy>::namespaced(client.clone(), &ns), &children.network_policy).await?;
    if old_hash.as_deref().is_some_and(|h| h != children.config_hash) {
        publish(ctx, tm, EventType::Normal, "RolloutStarted", format!("pipeline or model changed (model {version})"))
            .await;
    }

    // prune children that are no longer desired (e.g. the other colour after an upgrade)
    let keep_dep = BTreeSet::from([children.deployment.name_any()]);
    prune(&deps, &name, &keep_dep).await?;
    let keep_cm = BTreeSet::from([children.config_map.name_any()]);
    prune(&Api::<ConfigMap>::namespaced(client.clone(), &ns), &name, &keep_cm).await?;
    let keep_svc = BTreeSet::from([children.service.name_any(), children.headless.name_any()]);
    prune(&Api::<Service>::namespaced(client.clone(), &ns), &name, &keep_svc).await?;

    // status
    let available = live.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
    let worker_problem = if available < tm.spec.parallelism {
        worker_readiness_problem(&client, &ns, &selector_string(tm, COLOR)).await
    } else {
        None
    };
    let observed = Observed::Applied {
        deployment: &live,
        color: COLOR,
        selector: selector_string(tm, COLOR),
        worker_problem: worker_problem.clone(),
    };
    let status = compute(tm.status.as_ref(), generation, &version, &observed, &now());
    let was_ready = tm.status.as_ref().is_some_and(|s| s.phase == Some(streamscore_crds::tenantmodel::Phase::Running));
    let ready = status.phase == Some(streamscore_crds::tenantmodel::Phase::Running);
    if patch_status(&tms, tm, status).await? && ready && !was_ready {
        publish(ctx, tm, EventType::Normal, "Ready", format!("all workers available, model {version}")).await;
    }
    // Not all workers available: look again soon (pods' readiness does not wake the controller).
    Ok(Action::requeue(Duration::from_secs(if available < tm.spec.parallelism { 10 } else { 300 })))
}

/// Asks the running, not-ready worker pods why (`/readyz` on the worker port; the
/// NetworkPolicy admits the operator there). Returns the first reason a worker gives.
async fn worker_readiness_problem(client: &Client, ns: &str, selector: &str) -> Option<String> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let list = pods.list(&ListParams::default().labels(selector)).await.ok()?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().ok()?;
    for pod in list.items {
        let Some(status) = pod.status else { continue };
        let (Some(ip), Some("Running")) = (status.pod_ip, status.phase.as_deref()) else { continue };
        let Ok(resp) = http.get(format!("http://{ip}:{}/readyz", crate::build::WORKER_PORT)).send().await else {
            continue;
        };
        if resp.status().is_success() {
            continue;
        }
        let body = resp.text().await.unwrap_or_default();
        // Only problems a user must fix; start-up states (joining the group) are not.
        if body.contains("model not loaded") {
            let msg: String = body.trim().trim_start_matches("not ready: ").chars().take(500).collect();
            return Some(format!("worker {}: {msg}", pod.metadata.name.unwrap_or_default()));
        }
    }
    None
}

/// Requeue with backoff on transient errors; counts them by kind.
pub fn error_policy(tm: Arc<TenantModel>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.get_or_create(&crate::metrics::KindLabel { kind: err.kind().into() }).inc();
    warn!(tm = %tm.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
