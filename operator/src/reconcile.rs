//! Reconcile of one TenantModel, as a pipeline of small steps:
//!
//! ```text
//!  validate (pure: spec, image policy) ─► observe (model ConfigMap, Kafka Secrets' opt-in)
//!  ─► build (pure) ─► ownership (every child name free or ours) ─► apply (SSA, one field
//!  manager, owner refs; the Deployment last) ─► prune (children no longer
//!  desired that we control) ─► status (only if changed)
//! ```
//! Whatever stops a TenantModel from running — an invalid spec, an image outside the
//! allowlist, a Secret without the opt-in, a name taken by someone else's object, a child the
//! API server refuses — ends `Degraded` with a reason, the message and a Warning event, and
//! waits for a change (no hot loop). Other API errors are transient and requeue with backoff.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::{Digest, Sha256};
use streamscore_crds::tenantmodel::{TenantModel, TenantModelStatus};
use tracing::{info, instrument, warn};

use crate::build::{build, selector_string, BuildContext, Children, COLOR};
use crate::metrics::OperatorMetrics;
use crate::ownership::{conflict, is_controlled_by};
use crate::policy::{check_secret, TenantPolicy};
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
    /// A child could not be applied for a transient reason (permanent refusals end in
    /// status, not here).
    #[error(transparent)]
    Apply(ApplyFailure),
}

impl Error {
    /// Low-cardinality kind, the `kind` label of the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(_)) => "ApiError",
            Error::Kube(_) => "ClientError",
            Error::NoNamespace => "NoNamespace",
            Error::Apply(_) => "ApplyFailed",
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
    /// What TenantModels may reference (images, Secrets), from the platform team.
    pub policy: TenantPolicy,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("build", &self.build).field("policy", &self.policy).finish_non_exhaustive()
    }
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A child the API server did not accept.
#[derive(Debug, thiserror::Error)]
#[error("applying {kind} {name:?}: {}", api_message(.source))]
pub struct ApplyFailure {
    kind: String,
    name: String,
    #[source]
    source: kube::Error,
}

impl ApplyFailure {
    /// The API server refused the object itself (invalid, forbidden): a retry cannot help
    /// until something changes. Conflicts, throttling, server and network errors are transient.
    pub fn is_permanent(&self) -> bool {
        matches!(&self.source, kube::Error::Api(s) if (400..500).contains(&s.code) && s.code != 409 && s.code != 429)
    }
}

fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        e => e.to_string(),
    }
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, ApplyFailure>
where
    K: Resource<DynamicType = ()> + Serialize + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(|source| ApplyFailure { kind: K::kind(&()).into_owned(), name, source })
}

/// Deletes the objects of kind `K` labelled for `tm` and controlled by it (`uid`) whose names
/// are not in `keep`. An object that merely carries the label is left alone.
async fn prune<K>(api: &Api<K>, tm: &str, uid: &str, keep: &BTreeSet<String>) -> Result<usize, kube::Error>
where
    K: Resource + DeserializeOwned + Clone + std::fmt::Debug,
{
    let lp = ListParams::default().labels(&format!("streamscore.io/tenantmodel={tm}"));
    let mut n = 0;
    for o in api.list_metadata(&lp).await? {
        let name = o.name_any();
        if !keep.contains(&name) && is_controlled_by(&o.metadata, uid) {
            api.delete(&name, &DeleteParams::background()).await?;
            n += 1;
        }
    }
    Ok(n)
}

async fn publish(ctx: &Context, tm: &TenantModel, type_: EventType, reason: &str, note: String) {
    // The API server refuses notes above 1 kB; the full text is in the status condition.
    let note = if note.len() > 1000 {
        let mut end = 990;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        format!("{} …", &note[..end])
    } else {
        note
    };
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

/// Why a TenantModel cannot run as it is: the reason (condition and Event), the message, and
/// whether a change outside the spec can clear it (a ConfigMap or Secret appears or is
/// labelled, a conflicting object goes away): then the operator looks again periodically;
/// otherwise it waits for the spec to change.
#[derive(Clone, Debug)]
struct Blocked {
    reason: &'static str,
    message: String,
    external: bool,
}

impl Blocked {
    fn spec(reason: &'static str, message: String) -> Self {
        Self { reason, message, external: false }
    }

    fn external(reason: &'static str, message: String) -> Self {
        Self { reason, message, external: true }
    }
}

async fn reconcile_inner(tm: &TenantModel, ctx: &Context) -> Result<Action, Error> {
    let ns = tm.namespace().ok_or(Error::NoNamespace)?;
    let name = tm.name_any();
    let uid = tm.uid().unwrap_or_default();
    let client = ctx.client.clone();
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let generation = tm.metadata.generation;
    let version = tm.spec.model.version.clone();

    // validate (pure), then what the spec names outside itself
    let mut blocked = check_spec(tm, ctx);
    if blocked.is_empty() {
        blocked = observe_references(tm, &client, &ns).await?;
    }
    if !blocked.is_empty() {
        return report_blocked(ctx, tm, &tms, &blocked).await;
    }

    // build (pure); every child name must be free or already ours
    let children = build(tm, &ctx.build);
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let live_dep = deps.get_opt(&children.deployment.name_any()).await?;
    let blocked = name_conflicts(&client, &ns, &uid, &children, live_dep.as_ref()).await?;
    if !blocked.is_empty() {
        return report_blocked(ctx, tm, &tms, &blocked).await;
    }
    let old_hash =
        live_dep.and_then(|d| d.spec?.template.metadata?.annotations?.get("streamscore.io/config-hash").cloned());

    // apply
    let live = match apply_children(&client, &ns, &children).await {
        Ok(live) => live,
        Err(failure) if failure.is_permanent() => {
            // The API server refuses the object as built (e.g. requests above limits, or the
            // operator lacks a permission): retrying at once cannot help; say so in status.
            ctx.metrics.errors.get_or_create(&crate::metrics::KindLabel { kind: "ApplyFailed".into() }).inc();
            warn!(error = %failure, "child refused by the API server");
            return report_blocked(ctx, tm, &tms, &[Blocked::external("ApplyFailed", failure.to_string())]).await;
        }
        Err(failure) => return Err(Error::Apply(failure)),
    };
    if old_hash.as_deref().is_some_and(|h| h != children.config_hash) {
        publish(ctx, tm, EventType::Normal, "RolloutStarted", format!("pipeline or model changed (model {version})"))
            .await;
    }

    // prune children that are no longer desired (e.g. the other colour after an upgrade)
    let keep_dep = BTreeSet::from([children.deployment.name_any()]);
    prune(&deps, &name, &uid, &keep_dep).await?;
    let keep_cm = BTreeSet::from([children.config_map.name_any()]);
    prune(&Api::<ConfigMap>::namespaced(client.clone(), &ns), &name, &uid, &keep_cm).await?;
    let keep_svc = BTreeSet::from([children.service.name_any(), children.headless.name_any()]);
    prune(&Api::<Service>::namespaced(client.clone(), &ns), &name, &uid, &keep_svc).await?;

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

/// The pure checks: the platform's image policy, then the spec itself.
fn check_spec(tm: &TenantModel, ctx: &Context) -> Vec<Blocked> {
    let mut blocked = Vec::new();
    if let Err(e) = ctx.policy.check_image(tm.spec.image.as_deref(), &ctx.build.default_image) {
        blocked.push(Blocked::spec("ImageNotAllowed", e));
    }
    if let Err(errs) = validate(tm) {
        blocked.extend(errs.into_iter().map(|e| Blocked::spec("InvalidSpec", e)));
    }
    blocked
}

/// The objects the spec names in its namespace: the model ConfigMap (present, digest
/// matches) and the Kafka Secrets (present, opted in by the platform team).
async fn observe_references(tm: &TenantModel, client: &Client, ns: &str) -> Result<Vec<Blocked>, Error> {
    let mut blocked = Vec::new();
    if let Some(cm) = &tm.spec.model.config_map {
        let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
        match cms.get_opt(&cm.name).await? {
            None => blocked.push(Blocked::external(
                "ModelNotFound",
                format!("spec.model.configMap: ConfigMap {:?} not found in namespace {ns}", cm.name),
            )),
            Some(found) => {
                let bytes = found
                    .binary_data
                    .as_ref()
                    .and_then(|d| d.get(&cm.key).map(|b| b.0.clone()))
                    .or_else(|| found.data.as_ref().and_then(|d| d.get(&cm.key).map(|t| t.clone().into_bytes())));
                match bytes {
                    None => blocked.push(Blocked::external(
                        "ModelNotFound",
                        format!("spec.model.configMap: ConfigMap {:?} has no key {:?}", cm.name, cm.key),
                    )),
                    // Checked here too, so a wrong digest shows in status at once instead of
                    // as workers that never become ready.
                    Some(b) => {
                        let actual = hex::encode(Sha256::digest(&b));
                        if actual != tm.spec.model.sha256 {
                            blocked.push(Blocked::external(
                                "ModelDigestMismatch",
                                format!(
                                    "spec.model.sha256: {} does not match ConfigMap {:?} key {:?} (sha256 {actual})",
                                    tm.spec.model.sha256, cm.name, cm.key
                                ),
                            ));
                        }
                    }
                }
            }
        }
    }
    // Only the Secrets' metadata is read: the operator never sees their values.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for (i, s) in tm.spec.kafka_secrets.iter().enumerate() {
        match secrets.get_metadata_opt(&s.name).await? {
            None => blocked.push(Blocked::external(
                "KafkaSecretNotFound",
                format!("spec.kafkaSecrets[{i}]: Secret {:?} not found in namespace {ns}", s.name),
            )),
            Some(found) => {
                if let Err(e) = check_secret(i, &s.name, found.metadata.labels.as_ref()) {
                    blocked.push(Blocked::external("KafkaSecretNotPermitted", e));
                }
            }
        }
    }
    Ok(blocked)
}

/// The NameConflict message of an existing object named like `child` that this TenantModel
/// does not control.
async fn foreign<K>(client: &Client, ns: &str, child: &K, uid: &str) -> Result<Option<String>, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()> + DeserializeOwned + Clone + std::fmt::Debug,
{
    let name = child.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    Ok(api.get_metadata_opt(&name).await?.and_then(|m| conflict(&K::kind(&()), &name, &m.metadata, uid)))
}

/// Children whose names are taken by objects this TenantModel does not control.
async fn name_conflicts(
    client: &Client,
    ns: &str,
    uid: &str,
    c: &Children,
    live_dep: Option<&Deployment>,
) -> Result<Vec<Blocked>, Error> {
    let found = [
        foreign(client, ns, &c.service_account, uid).await?,
        foreign(client, ns, &c.network_policy, uid).await?,
        foreign(client, ns, &c.config_map, uid).await?,
        live_dep.and_then(|d| conflict("Deployment", &d.name_any(), &d.metadata, uid)),
        foreign(client, ns, &c.service, uid).await?,
        foreign(client, ns, &c.headless, uid).await?,
        foreign(client, ns, &c.pdb, uid).await?,
    ];
    Ok(found.into_iter().flatten().map(|m| Blocked::external("NameConflict", m)).collect())
}

/// Applies every child, the Deployment last: workers never run without their NetworkPolicy,
/// ServiceAccount, configuration, Services and disruption budget. Returns the live Deployment.
async fn apply_children(client: &Client, ns: &str, c: &Children) -> Result<Deployment, ApplyFailure> {
    apply(&Api::<ServiceAccount>::namespaced(client.clone(), ns), &c.service_account).await?;
    apply(&Api::<NetworkPolicy>::namespaced(client.clone(), ns), &c.network_policy).await?;
    apply(&Api::<ConfigMap>::namespaced(client.clone(), ns), &c.config_map).await?;
    apply(&Api::<Service>::namespaced(client.clone(), ns), &c.service).await?;
    apply(&Api::<Service>::namespaced(client.clone(), ns), &c.headless).await?;
    apply(&Api::<PodDisruptionBudget>::namespaced(client.clone(), ns), &c.pdb).await?;
    apply(&Api::<Deployment>::namespaced(client.clone(), ns), &c.deployment).await
}

/// Writes `Degraded` with the first problem's reason and every message, publishes a Warning
/// event when the status changed, and waits: for the spec to change, or (problems outside
/// the spec) a while.
async fn report_blocked(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    blocked: &[Blocked],
) -> Result<Action, Error> {
    let reason = blocked.first().map_or("InvalidSpec", |b| b.reason);
    let message = blocked.iter().map(|b| b.message.as_str()).collect::<Vec<_>>().join("; ");
    let observed = Observed::Invalid { reason, message: message.clone() };
    let status = compute(tm.status.as_ref(), tm.metadata.generation, &tm.spec.model.version, &observed, &now());
    if patch_status(tms, tm, status).await? {
        publish(ctx, tm, EventType::Warning, reason, message.clone()).await;
    }
    info!(reason, %message, "TenantModel cannot run");
    Ok(if blocked.iter().any(|b| b.external) {
        Action::requeue(Duration::from_secs(30))
    } else {
        Action::await_change()
    })
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
