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
use streamscore_crds::pipeline::PipelineConfig;
use streamscore_crds::tenantmodel::{
    Operation, OperationStep, RescaleOutcome, TenantModel, TenantModelStatus, Upgrade, UpgradeOutcome, UpgradeType,
};
use tracing::{info, instrument, warn};

use crate::build::{
    build_live, colour, config_map_name, render_pipeline, selector_string, BuildContext, Children, Colour, FIRST_COLOR,
};
use crate::metrics::OperatorMetrics;
use crate::ownership::{conflict, is_controlled_by};
use crate::policy::{check_secret, TenantPolicy};
use crate::rescale::{self, Decision, Workers};
use crate::status::{compute, Observed};
use crate::upgrade::{self, ChangeKind, Verdict};
use crate::validate::validate;

/// The one field manager of every apply.
pub const FIELD_MANAGER: &str = "streamscore-operator";

/// The steps of a reconcile, in order; a failed request names the step it failed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Reading what the spec names (model ConfigMap, Secrets) and what runs (the live colour's
    /// ConfigMap and Deployment, objects in the way of the children's names).
    Observe,
    /// Deciding and recording an upgrade (blue/green) and driving its gates and cut-over.
    Upgrade,
    /// Driving a rescale (drain, checkpoint, new replica count, restore).
    Rescale,
    /// Deleting children no longer desired (the old colour after a cut-over).
    Prune,
    /// Reading the workers' state and writing status.
    Status,
}

impl Step {
    /// The step's name, the `kind` label of the errors metric.
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Observe => "Observe",
            Step::Upgrade => "Upgrade",
            Step::Rescale => "Rescale",
            Step::Prune => "Prune",
            Step::Status => "Status",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reconcile errors (transient: the reconcile is tried again with backoff). A spec that cannot
/// work is not an error: it ends in status (`Degraded`, a condition and an Event).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request in `step`.
    #[error("{step}: Kubernetes API: {source}")]
    Api {
        /// The step the request belonged to.
        step: Step,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The object lacks a namespace (cannot happen for a namespaced kind).
    #[error("TenantModel has no namespace")]
    NoNamespace,
    /// A child could not be applied for a transient reason (permanent refusals end in
    /// status, not here).
    #[error(transparent)]
    Apply(ApplyFailure),
}

impl Error {
    /// Low-cardinality kind, the `kind` label of the errors metric: the step of a failed
    /// request, `ApplyFailed`, or `NoNamespace`.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Api { step, .. } => step.as_str(),
            Error::NoNamespace => "NoNamespace",
            Error::Apply(_) => "ApplyFailed",
        }
    }

    /// Maps a client error of `step` (for `map_err`).
    fn at(step: Step) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Api { step, source }
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
    pub recorder: Events,
    /// What TenantModels may reference (images, Secrets), from the platform team.
    pub policy: TenantPolicy,
    /// The workers' admin API (rescale, upgrade).
    pub workers: Workers,
    /// Gate baselines of the upgrades in progress, by upgrade id (a restarted operator takes
    /// them again when the candidate is caught up).
    pub baselines: std::sync::Mutex<std::collections::HashMap<String, upgrade::Baseline>>,
    /// The autoscalers' samples and recommendations, by `<namespace>/<name>`.
    pub autoscalers: std::sync::Mutex<std::collections::HashMap<String, crate::autoscale::State>>,
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

/// Publishes Events: a repeat of the same reason and note for one TenantModel within a few
/// minutes becomes a count on the Event already there (a series), and another note for the
/// same reason a new Event. (`kube`'s `Recorder` alone keys its series without the note, so a
/// second `Autoscaled` or `RescaleCompleted` would only count up the first one's text.)
pub struct Events {
    client: Client,
    reporter: kube::runtime::events::Reporter,
    /// Per (TenantModel uid, reason): the last note and the recorder that holds its series.
    last: std::sync::Mutex<std::collections::HashMap<(String, String), (String, Recorder)>>,
}

impl Events {
    /// Events reported as `reporter`.
    pub fn new(client: Client, reporter: kube::runtime::events::Reporter) -> Self {
        Self { client, reporter, last: Default::default() }
    }

    /// The recorder for `note`: the one of the previous Event of this reason when its note was
    /// the same, else a new one (a new Event).
    fn for_note(&self, uid: String, reason: &str, note: &str) -> Recorder {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let key = (uid, reason.to_owned());
        match last.get(&key) {
            Some((n, r)) if n == note => r.clone(),
            _ => {
                let r = Recorder::new(self.client.clone(), self.reporter.clone());
                last.insert(key, (note.to_owned(), r.clone()));
                r
            }
        }
    }
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
    ctx.metrics.event(tm, reason);
    let recorder = ctx.recorder.for_note(tm.uid().unwrap_or_default(), reason, &note);
    let ev = Event { type_, reason: reason.into(), note: Some(note), action: "Reconcile".into(), secondary: None };
    if let Err(e) = recorder.publish(&ev, &tm.object_ref(&())).await {
        warn!(error = %e, "cannot publish event");
    }
}

async fn patch_status(
    api: &Api<TenantModel>,
    tm: &TenantModel,
    status: TenantModelStatus,
) -> Result<bool, kube::Error> {
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
    let uid = tm.uid().unwrap_or_default();
    let client = ctx.client.clone();
    let tms: Api<TenantModel> = Api::namespaced(client.clone(), &ns);
    let version = tm.spec.model.version.clone();

    // `streamscore.io/pause-reconciliation: "true"`: children, rescale and upgrade left as they are
    if paused(tm) {
        return report_paused(ctx, tm, &tms, true).await.map_err(Error::at(Step::Status));
    }
    if tm.status.as_ref().is_some_and(|s| s.conditions.iter().any(|c| c.kind == PAUSED && c.status == "True")) {
        report_paused(ctx, tm, &tms, false).await.map_err(Error::at(Step::Status))?;
    }

    // validate (pure), then what the spec names outside itself
    let mut blocked = check_spec(tm, ctx);
    if blocked.is_empty() {
        blocked = observe_references(tm, &client, &ns).await.map_err(Error::at(Step::Observe))?;
    }
    if !blocked.is_empty() {
        return report_blocked(ctx, tm, &tms, &blocked).await.map_err(Error::at(Step::Status));
    }
    // spec.suspend: the live colour's worker count goes to 0 through the rescale path (drain,
    // commit, checkpoint, then scale), unless a blue/green upgrade runs (it ends first).
    let suspended_tm;
    let tm = match suspended(tm) {
        Some(s) => {
            suspended_tm = s;
            &suspended_tm
        }
        None => tm,
    };

    // what the live colour runs (its ConfigMap), and what the spec asks for
    let build_ctx = BuildContext { kafka_prefix: ctx.policy.kafka_prefix_for(&ns), ..ctx.build.clone() };
    let Live { color: live_color, pipeline: live_pipeline, deployment: live_dep, newer_live } =
        observe_live(&client, tm).await.map_err(Error::at(Step::Observe))?;
    if let Some(other) = newer_live {
        // Nothing is applied from a status older than the children: the watch delivers the
        // newer TenantModel in a moment.
        warn!(
            active_color = %live_color,
            live = %other,
            "status.activeColor is older than the children ({other} went live, {live_color}'s ConfigMap is gone): \
             waiting for the newer TenantModel"
        );
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let desired = render_pipeline(tm, build_ctx.kafka_prefix.as_deref());
    let mut written = tm.status.clone();
    let mut up = UpgradeState {
        current: tm.status.as_ref().and_then(|s| s.upgrade.clone()),
        last: tm.status.as_ref().and_then(|s| s.last_upgrade.clone()),
        plan: tm.status.as_ref().and_then(|s| s.plan.clone()),
        completed_to: None,
    };
    let plan = plan_upgrade(
        ctx,
        tm,
        &tms,
        &mut written,
        &mut up,
        &live_color,
        live_pipeline.as_ref(),
        &desired,
        live_dep.as_ref(),
    )
    .await
    .map_err(Error::at(Step::Upgrade))?;
    // The barrier is recorded but the old colour still runs: if its fence may have lapsed
    // (the operator away longer than the hold), fence it again and raise the barrier first.
    let refencing = refence_if_lapsed(ctx, tm, &tms, &mut written, &mut up, &live_color, live_dep.as_ref())
        .await
        .map_err(Error::at(Step::Upgrade))?;
    let children = build_live(tm, &build_ctx, &live_color, plan.live_pipeline.clone());
    let blocked =
        name_conflicts(&client, &ns, &uid, &children, live_dep.as_ref()).await.map_err(Error::at(Step::Observe))?;
    if !blocked.is_empty() {
        return report_blocked(ctx, tm, &tms, &blocked).await.map_err(Error::at(Step::Status));
    }
    let old_hash = live_dep.as_ref().and_then(|d| {
        d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get("streamscore.io/config-hash").cloned()
    });

    // rescale (checkpoint-and-restart): the step decides the replica count to apply
    let mut rescale = Rescale {
        op: tm.status.as_ref().and_then(|s| s.operation.clone()),
        last: tm.status.as_ref().and_then(|s| s.last_rescale.clone()),
    };
    let replicas = if let Some(u) = up.current.as_ref() {
        upgrade_replicas(&client, tm, u, live_dep.as_ref()).await.map_err(Error::at(Step::Observe))?
    } else {
        drive_rescale(ctx, tm, &tms, &mut written, &mut rescale, live_dep.as_ref(), &live_color)
            .await
            .map_err(Error::at(Step::Rescale))?
    };
    // During an upgrade the live colour keeps its count (0 once the barrier is recorded);
    // `replicas` is the candidate's.
    let live_replicas = match (up.current.as_ref(), live_dep.as_ref().and_then(|d| d.spec.as_ref()?.replicas)) {
        (Some(_), Some(n)) => n,
        _ => replicas,
    };
    let mut children = children;
    if let Some(spec) = children.deployment.spec.as_mut() {
        spec.replicas = Some(live_replicas);
    }

    // the upgrade in progress: the candidate's children, its gates and cut-over
    let candidate = up
        .current
        .as_ref()
        .map(|u| candidate_children(tm, &build_ctx, u, live_pipeline.as_ref().unwrap_or(&desired), &desired, replicas));

    // apply
    let applied = apply_all(&client, &ns, &children, plan.apply_live, live_dep.as_ref(), candidate.as_ref()).await;
    let (live, live_candidate) = match applied {
        Ok(x) => x,
        Err(failure) if failure.is_permanent() => {
            // The API server refuses the object as built (e.g. requests above limits, or the
            // operator lacks a permission): retrying at once cannot help; say so in status.
            ctx.metrics.errors.get_or_create(&crate::metrics::KindLabel { kind: "ApplyFailed".into() }).inc();
            warn!(error = %failure, "child refused by the API server");
            return report_blocked(ctx, tm, &tms, &[Blocked::external("ApplyFailed", failure.to_string())])
                .await
                .map_err(Error::at(Step::Status));
        }
        Err(failure) => return Err(Error::Apply(failure)),
    };
    if plan.apply_live && old_hash.as_deref().is_some_and(|h| h != children.config_hash) {
        publish(ctx, tm, EventType::Normal, "RolloutStarted", format!("pipeline or model changed (model {version})"))
            .await;
    }
    let mut live_color = live_color;
    let mut live = live;
    // Once the cut-over barrier is recorded the old colour never writes again: it is stopped.
    // Its workers are fenced already; stopped, a fence that lapses while the operator is away,
    // or a replacement pod that was never fenced, cannot resume it beside the live candidate.
    if up.current.as_ref().is_some_and(|u| u.live_from.is_some())
        && !refencing
        && live.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1) != 0
    {
        let deps: Api<Deployment> = Api::namespaced(client.clone(), &ns);
        live = deps
            .patch(
                &live.name_any(),
                &PatchParams { field_manager: Some(format!("{FIELD_MANAGER}-cutover")), ..Default::default() },
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 0}})),
            )
            .await
            .map_err(Error::at(Step::Upgrade))?;
        info!(color = %live_color, "cut-over barrier recorded: the old colour's workers stopped");
    }
    let barrier_applied = candidate
        .as_ref()
        .and_then(|c| c.config_map.data.as_ref()?.get("pipeline.yaml").cloned())
        .is_some_and(|t| t.contains("liveFrom"));
    if let (Some(_), Some(cand), false) = (up.current.as_ref(), live_candidate.as_ref(), refencing) {
        drive_upgrade(ctx, tm, &tms, &mut written, &mut up, &live_color, cand, barrier_applied)
            .await
            .map_err(Error::at(Step::Upgrade))?;
        if let Some(color) = up.completed_to.clone() {
            // The candidate is the live colour now. Recorded before the old colour is removed:
            // a reconcile that fails after the removal, or one that reads the TenantModel from
            // the watch cache, must never see the old colour as live with its children gone (it
            // would create them again, consuming from its own group's offsets: duplicates).
            live_color = color;
            live = cand.clone();
            record_cutover(&tms, tm, &mut written, &up, &live_color).await.map_err(Error::at(Step::Upgrade))?;
            crate::fault::point("upgrade-recorded");
        }
    }

    // prune children that are no longer desired (the other colour after an upgrade)
    let colours: Vec<&str> =
        std::iter::once(live_color.as_str()).chain(up.current.as_ref().map(|u| u.candidate.as_str())).collect();
    prune_unwanted(&client, tm, &colours, &children).await.map_err(Error::at(Step::Prune))?;
    if up.completed_to.is_some() {
        // Services select the new live colour.
        let after = build_live(tm, &build_ctx, &live_color, plan.live_pipeline.clone());
        apply(&Api::<Service>::namespaced(client.clone(), &ns), &after.service).await.map_err(Error::Apply)?;
    }

    // status
    let held = held_back_shown(&plan, &up, &upgrade::spec_hash(&desired, upgrade::retry_token(tm)));
    let counted = if up.completed_to.is_some() { replicas } else { live_replicas };
    let Applied { mut status, available, running_version } =
        observe_applied(ctx, tm, &live, &live_color, counted, &mut rescale, &up, held.as_deref())
            .await
            .map_err(Error::at(Step::Status))?;
    let operating = rescale.op.is_some() || up.current.is_some() || tm.spec.suspend;
    status.autoscaling = autoscale(ctx, tm, &tms, &live_color, &status, operating).await;
    use streamscore_crds::tenantmodel::Phase;
    let was = tm.status.as_ref().and_then(|s| s.phase);
    let now_phase = status.phase;
    if patch_status_from(&tms, &tm.name_any(), &mut written, status).await.map_err(Error::at(Step::Status))? {
        if now_phase == Some(Phase::Running) && was != Some(Phase::Running) {
            publish(ctx, tm, EventType::Normal, "Ready", format!("all workers available, model {running_version}"))
                .await;
        }
        if now_phase == Some(Phase::Suspended) && was != Some(Phase::Suspended) {
            publish(ctx, tm, EventType::Normal, "Suspended", SUSPENDED_MESSAGE.to_owned()).await;
        }
        if was == Some(Phase::Suspended) && !tm.spec.suspend {
            let msg = format!("resuming with {} workers from the committed offsets", tm.spec.parallelism);
            publish(ctx, tm, EventType::Normal, "Resumed", msg).await;
        }
    }
    Ok(Action::requeue(next_reconcile(tm, &rescale, &up, barrier_applied, available)))
}

/// The message of a suspended TenantModel's `Ready` condition and its `Suspended` Event.
const SUSPENDED_MESSAGE: &str = "suspended (spec.suspend): no workers run; offsets are committed and, with a \
     checkpointStore, every partition checkpointed; input waits in Kafka; set spec.suspend to false to resume";

/// `tm` as the reconcile applies it while `spec.suspend` holds: no workers. None when not
/// suspended, or while a blue/green upgrade runs (suspended once it ends).
fn suspended(tm: &TenantModel) -> Option<TenantModel> {
    if !tm.spec.suspend || tm.status.as_ref().is_some_and(|s| s.upgrade.is_some()) {
        return None;
    }
    let mut s = tm.clone();
    s.spec.parallelism = 0;
    Some(s)
}

/// After the barrier is recorded and before the old colour is stopped (scaled to 0), an
/// operator away for longer than the fence's hold leaves a window: the fenced workers resume by
/// themselves and write live outputs past the barrier, which the candidate would write again.
/// So when the fence may have lapsed, the old colour is fenced again and the barrier raised to
/// where it stopped (recorded, with a new `fencedAt`, before it is stopped), and the candidate
/// goes live from there. Returns true while that fence is in progress (nothing else moves).
/// Workers that cannot answer (gone, crashed) are stopped as they are, with a Warning.
#[allow(clippy::too_many_arguments)]
async fn refence_if_lapsed(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    written: &mut Option<TenantModelStatus>,
    up: &mut UpgradeState,
    live_color: &str,
    live_dep: Option<&Deployment>,
) -> Result<bool, kube::Error> {
    let Some(mut u) = up.current.clone() else { return Ok(false) };
    let (Some(mut barrier), Some(fenced_at)) = (upgrade::parse_barrier(u.live_from.as_deref()), u.fenced_at.clone())
    else {
        return Ok(false);
    };
    if live_dep.and_then(|d| d.spec.as_ref()?.replicas).unwrap_or(0) == 0 {
        return Ok(false);
    }
    let fenced = chrono::DateTime::parse_from_rfc3339(&fenced_at).map(|t| t.with_timezone(&chrono::Utc));
    let elapsed = fenced.map(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default()).unwrap_or(Duration::MAX);
    let hold = upgrade::cutover_hold_seconds();
    if !upgrade::fence_may_have_lapsed(elapsed, hold) {
        return Ok(false);
    }
    let ns = tm.namespace().unwrap_or_default();
    let pods = worker_pods(&ctx.client, &ns, &selector_string(tm, live_color), None).await?;
    // One id per recorded fence and attempt: a restarted operator asks the same question again.
    let attempt = u.fence_attempt.unwrap_or(1);
    let digits: String = fenced_at.chars().filter(char::is_ascii_digit).collect();
    let id = format!("{}-refence-{digits}-{attempt}", u.id);
    let answers = ctx.workers.drain_with(&pods, &id, hold, false, true).await;
    let title = format!("Upgrading {}→{}", u.from_version, u.to_version);
    let moved = match upgrade::drained_positions(&answers, &id) {
        Ok(None) => {
            u.message = format!(
                "{title}: {live_color}'s fence may have lapsed ({elapsed:?} since it was placed); fencing it again"
            );
            up.current = Some(u);
            return Ok(true);
        }
        Ok(Some(at)) if !upgrade::uncovered(&at, &answers).is_empty() => {
            // A partition no worker owned at this drain (a rebalance while the fence was
            // lapsed): where it stopped is unknown; let them run and ask again.
            let missing = upgrade::uncovered(&at, &answers);
            let unresumed = ctx.workers.resume(&pods).await;
            if !unresumed.is_empty() {
                warn!(upgrade = %u.id, ?unresumed, "workers did not confirm their resume");
            }
            u.fence_attempt = Some(attempt + 1);
            u.message = format!("{title}: {live_color} fenced again without partitions {missing:?}; asking again");
            up.current = Some(u);
            record_upgrade(tms, tm, written, up).await?;
            return Ok(true);
        }
        Ok(Some(at)) => upgrade::raise_barrier(&mut barrier, &at),
        Err(e) => {
            let msg = format!(
                "{title}: {live_color}'s fence may have lapsed and a worker did not answer ({e}): it is stopped as it \
                 is; outputs it wrote past the barrier may be written again by {}",
                u.candidate
            );
            publish(ctx, tm, EventType::Warning, "UpgradeFenceLapsed", msg.clone()).await;
            warn!(upgrade = %u.id, %msg, "re-fence failed");
            Vec::new()
        }
    };
    if !moved.is_empty() {
        let msg = format!(
            "{title}: {live_color} resumed after its fence lapsed; the barrier is raised to where it stopped ({})",
            moved.join(", ")
        );
        publish(ctx, tm, EventType::Warning, "UpgradeBarrierRaised", msg.clone()).await;
        warn!(upgrade = %u.id, %msg, "barrier raised");
        u.message = msg;
    }
    u.live_from = Some(upgrade::barrier_text(&barrier));
    u.fenced_at = Some(rescale::millis_rfc3339(chrono::Utc::now().timestamp_millis()));
    up.current = Some(u);
    record_upgrade(tms, tm, written, up).await?;
    Ok(false)
}

/// The worker count during an upgrade: the live colour's, which the candidate runs too. Once
/// the barrier is recorded the old colour is scaled to 0 (below): from then on the candidate's
/// own Deployment keeps the count (read back, or the candidate would be scaled to 0 with it).
async fn upgrade_replicas(
    client: &Client,
    tm: &TenantModel,
    u: &Upgrade,
    live_dep: Option<&Deployment>,
) -> Result<i32, kube::Error> {
    let live = live_dep.and_then(|d| d.spec.as_ref()?.replicas);
    if let (None, Some(n)) = (u.live_from.as_ref(), live) {
        return Ok(n);
    }
    let deps: Api<Deployment> = Api::namespaced(client.clone(), &tm.namespace().unwrap_or_default());
    let cand = deps.get_opt(&format!("{}-{}", tm.name_any(), u.candidate)).await?;
    Ok(stopped_colour_replicas(live, cand.as_ref().and_then(|d| d.spec.as_ref()?.replicas), tm.spec.parallelism))
}

/// [`upgrade_replicas`] after the barrier: the candidate's count, else the live colour's while
/// it still has workers, else the spec's.
fn stopped_colour_replicas(live: Option<i32>, candidate: Option<i32>, spec: i32) -> i32 {
    candidate.filter(|n| *n > 0).or(live.filter(|n| *n > 0)).unwrap_or(spec)
}

/// The status after this reconcile's actions, and what it was computed from.
struct Applied {
    status: TenantModelStatus,
    /// Available workers of the live colour.
    available: i32,
    /// The model version the live pods run (their template), not the spec's.
    running_version: String,
}

/// Observes the live colour's workers (why they are not ready, their newest checkpoints) and
/// computes the status with the rescale's and the upgrade's bookkeeping (`held`: why the spec
/// is not applied after a rolled-back upgrade).
#[allow(clippy::too_many_arguments)]
async fn observe_applied(
    ctx: &Context,
    tm: &TenantModel,
    live: &Deployment,
    live_color: &str,
    replicas: i32,
    rescale: &mut Rescale,
    up: &UpgradeState,
    held: Option<&str>,
) -> Result<Applied, kube::Error> {
    let (ns, generation) = (tm.namespace().unwrap_or_default(), tm.metadata.generation);
    let selector = selector_string(tm, live_color);
    let available = live.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
    let (worker_problem, worker_restoring) = if available < replicas {
        match crate::pods::deployment_problem(live) {
            Some(p) => (Some(p), None),
            None => worker_readiness_problem(&ctx.client, &ns, &selector, None).await,
        }
    } else {
        (None, None)
    };
    let observed = Observed::Applied {
        deployment: live,
        color: live_color,
        selector: selector.clone(),
        worker_problem,
        worker_restoring,
    };
    advance_rescale_after_scaling(rescale);
    let running_version = live
        .spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref()?.annotations.as_ref()?.get("streamscore.io/model-version").cloned())
        .unwrap_or_else(|| tm.spec.model.version.clone());
    let mut status = compute(tm.status.as_ref(), generation, &running_version, &observed, &now());
    if rescale.op.is_none() && up.current.is_none() && available > 0 {
        // The workers say what their newest checkpoints are, and whether some partition's
        // state misses records the input no longer retains (admin API).
        let pods = worker_pods(&ctx.client, &ns, &selector, None).await?;
        let answers = ctx.workers.status(&pods).await;
        if tm.spec.checkpoint_store.is_some() {
            if let Some(lc) = rescale::last_checkpoint(&answers) {
                status.last_checkpoint = Some(lc);
            }
        }
        if let Some(missing) = rescale::incomplete_state(&answers) {
            note_incomplete_state(ctx, tm, &mut status, &missing).await;
        }
    }
    status.operation = rescale.op.clone();
    status.last_rescale = rescale.last.clone();
    status.upgrade = up.current.clone();
    status.last_upgrade = up.last.clone();
    status.plan = up.plan.clone();
    crate::status::with_operation(&mut status, &now(), generation);
    crate::status::with_upgrade(&mut status, held, &now(), generation);
    if up.current.is_none() {
        note_rescale_rolled_back(&mut status, tm, rescale, replicas);
    }
    crate::status::record_history(&mut status);
    let running = live.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    if tm.spec.suspend && replicas == 0 && rescale.op.is_none() && up.current.is_none() && running == 0 {
        crate::status::suspended(&mut status, SUSPENDED_MESSAGE, &now(), generation);
    }
    Ok(Applied { status, available, running_version })
}

/// The `StateComplete` condition: False (reason `InputRetention`, a Warning Event when it
/// becomes so) while some partition's state was restored or rebuilt without records the input
/// no longer retains: features whose window reaches back before them miss those events.
async fn note_incomplete_state(ctx: &Context, tm: &TenantModel, status: &mut TenantModelStatus, missing: &[String]) {
    let generation = tm.metadata.generation;
    if missing.is_empty() {
        crate::status::set_condition(
            &mut status.conditions,
            "StateComplete",
            true,
            "AllRecordsRetained",
            "every partition's state was built from every record it needs",
            &now(),
            generation,
        );
        return;
    }
    let msg = format!(
        "state built without records the input no longer retains (features whose window reaches back before them \
         miss those events; a longer retention of the input topic avoids it): {}",
        missing.join("; ")
    );
    let before = tm.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.kind == "StateComplete"));
    if before.is_none_or(|c| c.status != "False" || c.message != msg) {
        publish(ctx, tm, EventType::Warning, "InputRetention", msg.clone()).await;
    }
    crate::status::set_condition(
        &mut status.conditions,
        "StateComplete",
        false,
        "InputRetention",
        &msg,
        &now(),
        generation,
    );
}

/// What the live colour runs: its colour (`status.activeColor`), its pipeline (from its
/// ConfigMap, when this TenantModel controls it) and its Deployment.
struct Live {
    color: String,
    pipeline: Option<PipelineConfig>,
    deployment: Option<Deployment>,
    /// The other colour, when the children say that it is live and this status is older than
    /// them: `status.activeColor`'s ConfigMap is gone and the other colour's pipeline went live
    /// (a cut-over completed and was recorded, but this reconcile read the TenantModel from
    /// before that status write). Acting on such a status would recreate the removed colour.
    newer_live: Option<String>,
}

async fn observe_live(client: &Client, tm: &TenantModel) -> Result<Live, kube::Error> {
    let (ns, name, uid) = (tm.namespace().unwrap_or_default(), tm.name_any(), tm.uid().unwrap_or_default());
    let color = tm.status.as_ref().and_then(|s| s.active_color.clone()).unwrap_or_else(|| FIRST_COLOR.into());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let pipeline = match cms.get_opt(&config_map_name(&name, &color)).await? {
        Some(cm) if is_controlled_by(&cm.metadata, &uid) => {
            cm.data.as_ref().and_then(|d| d.get("pipeline.yaml")).and_then(|t| PipelineConfig::from_yaml(t).ok())
        }
        _ => None,
    };
    let mut newer_live = None;
    if pipeline.is_none() {
        let other = other_color(&color);
        if let Some(cm) = cms.get_opt(&config_map_name(&name, other)).await? {
            let went_live = is_controlled_by(&cm.metadata, &uid)
                && cm
                    .data
                    .as_ref()
                    .and_then(|d| d.get("pipeline.yaml"))
                    .and_then(|t| PipelineConfig::from_yaml(t).ok())
                    .is_some_and(|p| p.shadow.as_ref().is_none_or(|sh| sh.live_from.is_some()));
            if went_live && tm.status.as_ref().and_then(|s| s.active_color.as_ref()).is_some() {
                newer_live = Some(other.to_owned());
            }
        }
    }
    let deployment = Api::<Deployment>::namespaced(client.clone(), &ns).get_opt(&format!("{name}-{color}")).await?;
    Ok(Live { color, pipeline, deployment, newer_live })
}

/// The colour that is not `color` (as [`upgrade::start`] picks the candidate).
fn other_color(color: &str) -> &'static str {
    if color == "blue" {
        "green"
    } else {
        "blue"
    }
}

/// The candidate colour's children during an upgrade (`live` is what the live colour runs),
/// at `replicas` workers.
fn candidate_children(
    tm: &TenantModel,
    build_ctx: &BuildContext,
    u: &Upgrade,
    live: &PipelineConfig,
    desired: &PipelineConfig,
    replicas: i32,
) -> Colour {
    let pipeline = crate::upgrade::candidate_pipeline(desired, live, u, &tm.spec.upgrade);
    let mut c = colour(tm, build_ctx, &u.candidate, &pipeline);
    if let Some(spec) = c.deployment.spec.as_mut() {
        spec.replicas = Some(replicas);
    }
    c
}

/// Applies the live colour's children (its ConfigMap and Deployment only when `apply_live`),
/// then the candidate's: the live Deployment and the candidate's, as the API server stored them.
async fn apply_all(
    client: &Client,
    ns: &str,
    children: &Children,
    apply_live: bool,
    live_dep: Option<&Deployment>,
    candidate: Option<&Colour>,
) -> Result<(Deployment, Option<Deployment>), ApplyFailure> {
    let live = apply_children(client, ns, children, apply_live, live_dep).await?;
    let Some(c) = candidate else { return Ok((live, None)) };
    apply(&Api::<ConfigMap>::namespaced(client.clone(), ns), &c.config_map).await?;
    let cand = apply(&Api::<Deployment>::namespaced(client.clone(), ns), &c.deployment).await?;
    Ok((live, Some(cand)))
}

/// A rescale whose new replica count was just applied waits for its partitions from here on.
fn advance_rescale_after_scaling(rescale: &mut Rescale) {
    let Some(op) = rescale.op.as_mut().filter(|o| o.step == OperationStep::Scaling) else { return };
    crate::fault::point("rescale-scaled");
    let msg =
        format!("Rescaling {}→{}: {} workers applied; waiting for partitions to be restored", op.from, op.to, op.to);
    rescale::advance(op, OperationStep::Restoring, msg, &now());
}

/// Says in the Progressing condition that `spec.parallelism` is not applied because its rescale
/// rolled back (it is tried again later or on a spec change).
fn note_rescale_rolled_back(status: &mut TenantModelStatus, tm: &TenantModel, rescale: &Rescale, replicas: i32) {
    let Some(last) = rescale.last.as_ref().filter(|l| {
        rescale.op.is_none()
            && replicas != tm.spec.parallelism
            && l.result == "RolledBack"
            && l.to == tm.spec.parallelism
    }) else {
        return;
    };
    let attempts = last.attempts.unwrap_or(1);
    let msg = match rescale::retry_after(last) {
        Some(after) => format!(
            "spec.parallelism {} is not applied ({replicas} workers run): {}; attempt {attempts} of {}, tried again \
             {} minutes after {} or when the spec changes",
            tm.spec.parallelism,
            last.message,
            rescale::MAX_ATTEMPTS,
            after.as_secs() / 60,
            last.finished_at
        ),
        None => format!(
            "spec.parallelism {} is not applied ({replicas} workers run): {}; gave up after {attempts} attempts: \
             not tried again until the spec changes",
            tm.spec.parallelism, last.message
        ),
    };
    crate::status::set_condition(
        &mut status.conditions,
        "Progressing",
        false,
        "RescaleRolledBack",
        &msg,
        &now(),
        tm.metadata.generation,
    );
}

/// When to look again: each second during a rescale, soon during an upgrade (at once after the
/// barrier is recorded), otherwise every 10 s while workers are unavailable (pods' readiness
/// does not wake the controller), every minute with checkpoints (status.lastCheckpoint), else
/// every 5 minutes.
fn next_reconcile(
    tm: &TenantModel,
    rescale: &Rescale,
    up: &UpgradeState,
    barrier_applied: bool,
    available: i32,
) -> Duration {
    if rescale.op.is_some() {
        return Duration::from_secs(1);
    }
    if let Some(u) = &up.current {
        // The barrier was just recorded: its ConfigMap and the candidate's go-live come next,
        // at once (input is stopped meanwhile).
        let barrier_pending = u.live_from.is_some() && !barrier_applied;
        return if barrier_pending { Duration::from_millis(20) } else { Duration::from_secs(2) };
    }
    if tm.spec.autoscaling.is_some() {
        // The autoscaler samples the workers' metrics on every reconcile.
        return Duration::from_secs(10);
    }
    Duration::from_secs(if available < tm.spec.parallelism {
        10
    } else if tm.spec.checkpoint_store.is_some() {
        60
    } else {
        300
    })
}

/// The autoscaler's turn (see [`crate::autoscale`]): samples the live workers' metrics and,
/// when the measurement asks for another worker count, writes it through the scale
/// subresource (the next reconcile rescales, as after `kubectl scale tm`) and publishes an
/// Event `Autoscaled`. Returns what `status.autoscaling` shows (None without autoscaling).
async fn autoscale(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    live_color: &str,
    status: &TenantModelStatus,
    operating: bool,
) -> Option<streamscore_crds::tenantmodel::AutoscalingStatus> {
    use crate::autoscale::{
        decide, desired, measure, prune, push_sample, Decision, Sample, MIN_WINDOW_MS, SAMPLE_EVERY_MS,
    };
    use streamscore_crds::tenantmodel::{AutoscalingStatus, Phase};
    let spec = tm.spec.autoscaling.as_ref()?;
    let (ns, name) = (tm.namespace().unwrap_or_default(), tm.name_any());
    let key = format!("{ns}/{name}");
    let now_t = chrono::Utc::now();
    let now_ms = now_t.timestamp_millis();
    let previous = tm.status.as_ref().and_then(|s| s.autoscaling.clone()).unwrap_or_default();
    let mut out = AutoscalingStatus { last_scale_time: previous.last_scale_time.clone(), ..Default::default() };
    let current = tm.spec.parallelism;
    let cooling = status.last_rescale.as_ref().and_then(|l| {
        let done = chrono::DateTime::parse_from_rfc3339(&l.finished_at).ok()?.with_timezone(&chrono::Utc);
        let until = done + chrono::Duration::milliseconds(spec.cooldown.as_millis() as i64);
        (now_t < until).then(|| until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    });
    let not_now = if operating {
        Some("a rescale, upgrade or suspension is in progress".to_owned())
    } else if status.phase != Some(Phase::Running) {
        Some("waiting for every worker to be available".to_owned())
    } else {
        cooling.map(|until| format!("cooldown after the last rescale, until {until}"))
    };
    let recent = {
        let mut states = ctx.autoscalers.lock().unwrap_or_else(|e| e.into_inner());
        if not_now.is_some() {
            states.remove(&key);
        }
        states.get(&key).and_then(|st| st.samples.back()).is_some_and(|s| now_ms - s.at_ms < SAMPLE_EVERY_MS)
    };
    if let Some(why) = not_now {
        out.message = format!("not measuring: {why}");
        return Some(out);
    }
    // Sampled moments ago (this reconcile was woken by the status that sample wrote): status
    // stays as it is, and the periodic reconcile takes the next sample.
    if recent && tm.status.as_ref().is_some_and(|s| s.autoscaling.is_some()) {
        return Some(previous);
    }
    let pods = worker_pods(&ctx.client, &ns, &selector_string(tm, live_color), None).await.ok()?;
    let Some(m) = ctx.workers.metrics(&pods).await else {
        ctx.autoscalers.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
        out.message = "not measuring: a worker's metrics could not be read".to_owned();
        return Some(out);
    };
    let sample = Sample {
        at_ms: now_ms,
        workers: pods.len() as i32,
        records_in: m.records_in,
        lag: m.lag,
        busy: m.busy,
        partitions: m.partitions,
    };
    let decision = {
        let mut states = ctx.autoscalers.lock().unwrap_or_else(|e| e.into_inner());
        let st = states.entry(key.clone()).or_default();
        push_sample(&mut st.samples, sample);
        let Some(measured) = measure(&st.samples) else {
            out.message = format!("measuring (a decision needs {} s of samples)", MIN_WINDOW_MS / 1000);
            return Some(out);
        };
        let want = desired(&measured, current, spec);
        st.recommendations.push_back((now_ms, want));
        prune(&mut st.recommendations, now_ms, spec);
        out.desired_parallelism = Some(want);
        out.input_rate = Some((measured.input_rate * 10.0).round() / 10.0);
        out.lag_records = Some(measured.lag as i64);
        out.lag_seconds = measured.lag_seconds(current).map(|s| (s * 100.0).round() / 100.0);
        out.utilization = Some((measured.utilization * 1000.0).round() / 1000.0);
        let why = format!(
            "input {:.0}/s, lag {} records{}, utilization {:.2} (targets: lag {} s, utilization {:.2})",
            measured.input_rate,
            measured.lag as i64,
            measured.lag_seconds(current).map(|s| format!(" ({s:.1} s of work)")).unwrap_or_default(),
            measured.utilization,
            spec.target_lag_seconds,
            spec.target_utilization
        );
        (decide(current, want, &st.recommendations, now_ms, spec), why)
    };
    match decision {
        (Decision::Keep(keep), why) => out.message = format!("{keep}: {why}"),
        (Decision::Scale(n), why) => {
            let direction = if n > current { "out" } else { "in" };
            let msg = format!("scaling {direction} {current} → {n} workers: {why}");
            let pp = PatchParams { field_manager: Some("streamscore-autoscaler".into()), ..PatchParams::default() };
            let mut decided = out.clone();
            decided.last_scale_time = Some(now());
            decided.message = msg.clone();
            // The decision reaches status before the count does: the reconcile the new count
            // starts reads it (a status written after could be overwritten from an older read).
            let noted = Patch::Merge(serde_json::json!({"status": {"autoscaling": decided}}));
            let scaled = match tms.patch_status(&name, &pp, &noted).await {
                Ok(_) => tms.patch_scale(&name, &pp, &Patch::Merge(serde_json::json!({"spec": {"replicas": n}}))).await,
                Err(e) => Err(e),
            };
            match scaled {
                Ok(_) => {
                    info!(tm = %key, %msg, "autoscaler");
                    ctx.autoscalers.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                    out = decided;
                    publish(ctx, tm, EventType::Normal, "Autoscaled", msg).await;
                }
                Err(e) => out.message = format!("could not set parallelism to {n}: {}", api_message(&e)),
            }
        }
    }
    Some(out)
}

/// Deletes the TenantModel's Deployments, ConfigMaps and Services other than those of
/// `colours` (the live one, and the candidate during an upgrade) and the two Services of
/// `children`: the old colour after a cut-over, a candidate rolled back. The other kinds of
/// child have one object per TenantModel, never pruned (garbage-collected with it).
async fn prune_unwanted(
    client: &Client,
    tm: &TenantModel,
    colours: &[&str],
    children: &Children,
) -> Result<(), kube::Error> {
    let (ns, name, uid) = (tm.namespace().unwrap_or_default(), tm.name_any(), tm.uid().unwrap_or_default());
    let keep_dep: BTreeSet<String> = colours.iter().map(|c| format!("{name}-{c}")).collect();
    let keep_cm: BTreeSet<String> = colours.iter().map(|c| config_map_name(&name, c)).collect();
    let keep_svc = BTreeSet::from([children.service.name_any(), children.headless.name_any()]);
    prune(&Api::<Deployment>::namespaced(client.clone(), &ns), &name, &uid, &keep_dep).await?;
    prune(&Api::<ConfigMap>::namespaced(client.clone(), &ns), &name, &uid, &keep_cm).await?;
    prune(&Api::<Service>::namespaced(client.clone(), &ns), &name, &uid, &keep_svc).await?;
    Ok(())
}

/// The rescale in progress and the last one's outcome, as they go into status.
#[derive(Debug)]
struct Rescale {
    op: Option<Operation>,
    last: Option<RescaleOutcome>,
}

/// Writes `status` unless it equals `written` (the status as last written), and remembers it.
async fn patch_status_from(
    api: &Api<TenantModel>,
    name: &str,
    written: &mut Option<TenantModelStatus>,
    status: TenantModelStatus,
) -> Result<bool, kube::Error> {
    if written.as_ref() == Some(&status) {
        return Ok(false);
    }
    let patch = serde_json::json!({
        "apiVersion": "streamscore.io/v1alpha1",
        "kind": "TenantModel",
        "status": status,
    });
    api.patch_status(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch)).await?;
    *written = Some(status);
    Ok(true)
}

/// Records the rescale's step in status before its action (so a restarted operator resumes it).
async fn record_step(
    tms: &Api<TenantModel>,
    tm: &TenantModel,
    written: &mut Option<TenantModelStatus>,
    rescale: &Rescale,
) -> Result<(), kube::Error> {
    let mut st = written.clone().unwrap_or_default();
    st.operation = rescale.op.clone();
    st.last_rescale = rescale.last.clone();
    crate::status::with_operation(&mut st, &now(), tm.metadata.generation);
    patch_status_from(tms, &tm.name_any(), written, st).await.map(|_| ())
}

/// Whether `pod` is not being deleted and runs the pod template with config hash `hash` (any
/// when None): a colour's Deployment replaced (a new candidate) can leave pods of its previous
/// template running for a moment.
fn current_pod(pod: &k8s_openapi::api::core::v1::Pod, hash: Option<&str>) -> bool {
    let annotated = || pod.metadata.annotations.as_ref()?.get("streamscore.io/config-hash").map(String::as_str);
    pod.metadata.deletion_timestamp.is_none() && hash.is_none_or(|h| annotated() == Some(h))
}

/// The config hash of a Deployment's pod template.
fn template_hash(d: &Deployment) -> Option<String> {
    d.spec.as_ref()?.template.metadata.as_ref()?.annotations.as_ref()?.get("streamscore.io/config-hash").cloned()
}

/// Running worker pods of `selector` (name, IP), not being deleted, of the pod template with
/// config hash `hash` (any when None).
async fn worker_pods(
    client: &Client,
    ns: &str,
    selector: &str,
    hash: Option<&str>,
) -> Result<Vec<(String, String)>, kube::Error> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let mut out = Vec::new();
    for p in pods.list(&ListParams::default().labels(selector)).await?.items {
        if !current_pod(&p, hash) {
            continue;
        }
        let Some(st) = p.status else { continue };
        if let (Some(ip), Some("Running")) = (st.pod_ip, st.phase.as_deref()) {
            out.push((p.metadata.name.unwrap_or_default(), ip));
        }
    }
    out.sort();
    Ok(out)
}

/// Drives the rescale state machine (`crate::rescale`) one step and returns the worker count
/// to apply. Without a rescale in progress: `spec.parallelism`, except that a change on a
/// running TenantModel starts one (and keeps the current count until its checkpoints are done).
async fn drive_rescale(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    written: &mut Option<TenantModelStatus>,
    rescale: &mut Rescale,
    live_dep: Option<&Deployment>,
    color: &str,
) -> Result<i32, kube::Error> {
    let want = tm.spec.parallelism;
    let live = live_dep.and_then(|d| d.spec.as_ref()?.replicas);
    let available = live_dep.and_then(|d| d.status.as_ref()?.available_replicas).unwrap_or(0);
    let now_t = chrono::Utc::now();
    let timeout = rescale::timeout(tm);
    if rescale.op.is_none() {
        let Some(live) = live else { return Ok(want) };
        if live == want || live == 0 || available == 0 {
            return Ok(want);
        }
        if !rescale::should_start(tm, live, available, now_t) {
            // Rolled back a moment ago: keep the running count until the retry is due.
            return Ok(live);
        }
        let op = rescale::start(live, want, &now());
        info!(from = live, to = want, "rescale started");
        let msg = if want == 0 {
            format!("suspending: draining and checkpointing {live} workers, then stopping them")
        } else {
            format!("rescaling {live}→{want} workers: draining and checkpointing")
        };
        publish(ctx, tm, EventType::Normal, "RescaleStarted", msg).await;
        rescale.op = Some(op);
        record_step(tms, tm, written, rescale).await?;
    }
    let ns = tm.namespace().unwrap_or_default();
    let pods = worker_pods(&ctx.client, &ns, &selector_string(tm, color), None).await?;
    let Some(op) = rescale.op.as_mut() else { return Ok(want) };
    match op.step {
        OperationStep::Draining => {
            let answers = ctx.workers.drain(op, &pods).await;
            crate::fault::point("rescale-draining");
            match rescale::drain_decision(op, &answers, now_t, timeout) {
                Decision::Wait(msg) => {
                    op.message = msg;
                    Ok(op.from)
                }
                Decision::Done { paused_at_ms, checkpointed } => {
                    op.paused_at = paused_at_ms.map(rescale::millis_rfc3339);
                    op.checkpointed = checkpointed.clone();
                    let msg = format!(
                        "Rescaling {}→{}: checkpoints {} complete; applying {} workers",
                        op.from,
                        op.to,
                        checkpointed.unwrap_or_default(),
                        op.to
                    );
                    rescale::advance(op, OperationStep::Scaling, msg.clone(), &now());
                    let to = op.to;
                    publish(ctx, tm, EventType::Normal, "RescaleCheckpointed", msg).await;
                    record_step(tms, tm, written, rescale).await?;
                    crate::fault::point("rescale-checkpointed");
                    Ok(to)
                }
                Decision::Fail(why) => {
                    // Nothing was changed: resume the workers and record the rollback.
                    ctx.workers.resume_and_status(&pods).await;
                    let from = op.from;
                    let msg = format!("rescale {}→{} rolled back: {why}", op.from, op.to);
                    warn!(%msg, "rescale failed while draining");
                    let out = rescale::outcome(op, "RolledBack", why, now_t, tm.metadata.generation);
                    rescale.last = Some(rescale::rolled_back(out, rescale.last.as_ref()));
                    rescale.op = None;
                    publish(ctx, tm, EventType::Warning, "RescaleRolledBack", msg).await;
                    Ok(from)
                }
            }
        }
        OperationStep::Scaling => Ok(op.to),
        OperationStep::Restoring | OperationStep::RollingBack => {
            let rolling_back = op.step == OperationStep::RollingBack;
            let target = if rolling_back { op.from } else { op.to };
            // Suspending (to 0): the drained workers stop as they are, never resumed.
            let answers =
                if target == 0 { ctx.workers.status(&pods).await } else { ctx.workers.resume_and_status(&pods).await };
            match rescale::restore_decision(op, target, available, &answers, now_t, timeout) {
                Decision::Wait(msg) => {
                    op.message = msg;
                    Ok(target)
                }
                Decision::Done { .. } if !rolling_back => {
                    crate::fault::point("rescale-restored");
                    let r = rescale::outcome(op, "Succeeded", String::new(), now_t, tm.metadata.generation);
                    let msg = if op.to == 0 {
                        format!("suspended: {} workers drained, checkpointed and stopped", op.from)
                    } else {
                        format!(
                            "rescaled {}→{} workers; every partition restored; input paused {:.1}s",
                            op.from,
                            op.to,
                            r.paused_seconds.unwrap_or(0.0)
                        )
                    };
                    info!(%msg, "rescale complete");
                    rescale.last = Some(RescaleOutcome { message: msg.clone(), ..r });
                    rescale.op = None;
                    publish(ctx, tm, EventType::Normal, "RescaleCompleted", msg).await;
                    Ok(target)
                }
                Decision::Fail(why) if !rolling_back => {
                    let msg = format!("Rescaling {}→{}: rolling back to {} workers: {why}", op.from, op.to, op.from);
                    warn!(%msg, "rescale failed while restoring");
                    op.failure = Some(why);
                    rescale::advance(op, OperationStep::RollingBack, msg.clone(), &now());
                    let from = op.from;
                    publish(ctx, tm, EventType::Warning, "RescaleRollingBack", msg).await;
                    record_step(tms, tm, written, rescale).await?;
                    Ok(from)
                }
                // Rolled back (or the rollback itself timed out: the conditions say why).
                Decision::Done { .. } | Decision::Fail(_) => {
                    let why = op.failure.clone().unwrap_or_default();
                    let msg = format!("rescale {}→{} rolled back to {} workers: {why}", op.from, op.to, op.from);
                    let out = rescale::outcome(op, "RolledBack", msg.clone(), now_t, tm.metadata.generation);
                    rescale.last = Some(rescale::rolled_back(out, rescale.last.as_ref()));
                    rescale.op = None;
                    publish(ctx, tm, EventType::Warning, "RescaleRolledBack", msg).await;
                    Ok(target)
                }
            }
        }
    }
}

/// The pure checks: the platform's image policy, then the spec itself.
fn check_spec(tm: &TenantModel, ctx: &Context) -> Vec<Blocked> {
    let mut blocked = Vec::new();
    if let Err(e) = ctx.policy.check_image(tm.spec.image.as_deref(), &ctx.build.default_image) {
        blocked.push(Blocked::spec("ImageNotAllowed", e));
    }
    if let Err(problems) = validate(tm) {
        blocked.extend(problems.into_iter().map(|p| Blocked::spec("InvalidSpec", p.to_string())));
    }
    let ns = tm.namespace().unwrap_or_default();
    blocked.extend(ctx.policy.check_kafka_names(tm, &ns).into_iter().map(|e| Blocked::spec("KafkaNameNotAllowed", e)));
    blocked.extend(ctx.policy.check_resources(tm).into_iter().map(|e| Blocked::spec("ResourcesNotAllowed", e)));
    blocked
}

/// The objects the spec names in its namespace: the model ConfigMap (present, digest
/// matches) and the Kafka Secrets (present, opted in by the platform team).
async fn observe_references(tm: &TenantModel, client: &Client, ns: &str) -> Result<Vec<Blocked>, kube::Error> {
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
                if let Err(e) =
                    check_secret(&format!("spec.kafkaSecrets[{i}]"), &s.name, found.metadata.labels.as_ref())
                {
                    blocked.push(Blocked::external("KafkaSecretNotPermitted", e));
                }
            }
        }
    }
    if let Some(s) = &tm.spec.checkpoint_secret {
        match secrets.get_metadata_opt(&s.name).await? {
            None => blocked.push(Blocked::external(
                "CheckpointSecretNotFound",
                format!("spec.checkpointSecret: Secret {:?} not found in namespace {ns}", s.name),
            )),
            Some(found) => {
                if let Err(e) = check_secret("spec.checkpointSecret", &s.name, found.metadata.labels.as_ref()) {
                    blocked.push(Blocked::external("CheckpointSecretNotPermitted", e));
                }
            }
        }
    }
    Ok(blocked)
}

/// The NameConflict message of an existing object named like `child` that this TenantModel
/// does not control.
async fn foreign<K>(client: &Client, ns: &str, child: &K, uid: &str) -> Result<Option<String>, kube::Error>
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
) -> Result<Vec<Blocked>, kube::Error> {
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
async fn apply_children(
    client: &Client,
    ns: &str,
    c: &Children,
    apply_live: bool,
    live_dep: Option<&Deployment>,
) -> Result<Deployment, ApplyFailure> {
    apply(&Api::<ServiceAccount>::namespaced(client.clone(), ns), &c.service_account).await?;
    apply(&Api::<NetworkPolicy>::namespaced(client.clone(), ns), &c.network_policy).await?;
    apply(&Api::<Service>::namespaced(client.clone(), ns), &c.service).await?;
    apply(&Api::<Service>::namespaced(client.clone(), ns), &c.headless).await?;
    apply(&Api::<PodDisruptionBudget>::namespaced(client.clone(), ns), &c.pdb).await?;
    if let (false, Some(live)) = (apply_live, live_dep) {
        // The live workers keep what they run (an upgrade is in progress, queued or held back),
        // but a rescale's worker count is applied on its own: a rescale must not wait for the
        // spec (the pods' template, and so what they run, is untouched).
        let want = c.deployment.spec.as_ref().and_then(|s| s.replicas);
        if want.is_none() || want == live.spec.as_ref().and_then(|s| s.replicas) {
            return Ok(live.clone());
        }
        return Api::<Deployment>::namespaced(client.clone(), ns)
            .patch(
                &live.name_any(),
                &PatchParams { field_manager: Some(format!("{FIELD_MANAGER}-scale")), ..Default::default() },
                &Patch::Merge(serde_json::json!({"spec": {"replicas": want}})),
            )
            .await
            .map_err(|source| ApplyFailure { kind: "Deployment".into(), name: live.name_any(), source });
    }
    apply(&Api::<ConfigMap>::namespaced(client.clone(), ns), &c.config_map).await?;
    apply(&Api::<Deployment>::namespaced(client.clone(), ns), &c.deployment).await
}

/// The annotation that stops the operator from changing a TenantModel's children.
pub const PAUSE_ANNOTATION: &str = "streamscore.io/pause-reconciliation";
const PAUSED: &str = "ReconciliationPaused";

fn paused(tm: &TenantModel) -> bool {
    tm.annotations().get(PAUSE_ANNOTATION).is_some_and(|v| v == "true")
}

/// Sets the `ReconciliationPaused` condition (True while the annotation says so, with an Event
/// when it becomes so; False once it is removed); nothing else is touched while paused.
async fn report_paused(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    on: bool,
) -> Result<Action, kube::Error> {
    let mut status = tm.status.clone().unwrap_or_default();
    let (reason, message) = if on {
        (
            "PauseAnnotation",
            format!(
                "{PAUSE_ANNOTATION} is \"true\": the operator changes nothing (workers, rescale, upgrade stay as they \
                 are; drained workers resume by themselves after their hold); remove the annotation to reconcile"
            ),
        )
    } else {
        ("Resumed", "the operator reconciles this TenantModel".to_owned())
    };
    crate::status::set_condition(&mut status.conditions, PAUSED, on, reason, &message, &now(), tm.metadata.generation);
    if patch_status(tms, tm, status).await? && on {
        publish(ctx, tm, EventType::Normal, PAUSED, message).await;
    }
    Ok(Action::await_change())
}

/// Writes `Degraded` with the first problem's reason and every message, publishes a Warning
/// event when the status changed, and waits: for the spec to change, or (problems outside
/// the spec) a while.
async fn report_blocked(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    blocked: &[Blocked],
) -> Result<Action, kube::Error> {
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
/// NetworkPolicy admits the operator there). Returns the first problem a user must fix (a model
/// that does not load) and the first partition being restored by replaying its input.
async fn worker_readiness_problem(
    client: &Client,
    ns: &str,
    selector: &str,
    hash: Option<&str>,
) -> (Option<crate::pods::Problem>, Option<String>) {
    use crate::pods::{pod_problem, Problem};
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default().labels(selector)).await else { return (None, None) };
    let current: Vec<Pod> = list.items.into_iter().filter(|p| current_pod(p, hash)).collect();
    // What the kubelet and the scheduler say first: a pod that crash-loops, cannot pull its
    // image or be scheduled never answers /readyz.
    if let Some(p) = current.iter().find_map(pod_problem) {
        return (Some(p), None);
    }
    let Ok(http) = reqwest::Client::builder().timeout(Duration::from_secs(1)).build() else { return (None, None) };
    let mut restoring = None;
    for pod in current {
        let Some(status) = pod.status else { continue };
        let (Some(ip), Some("Running")) = (status.pod_ip, status.phase.as_deref()) else { continue };
        let Ok(resp) = http.get(format!("http://{ip}:{}/readyz", crate::build::WORKER_PORT)).send().await else {
            continue;
        };
        if resp.status().is_success() {
            continue;
        }
        let body = resp.text().await.unwrap_or_default();
        let msg: String = body.trim().trim_start_matches("not ready: ").chars().take(500).collect();
        let pod = pod.metadata.name.unwrap_or_default();
        // Problems a user must fix; start-up states (joining the group) are not.
        if body.contains("model not loaded") {
            let problem = Problem { reason: "ModelNotLoaded".into(), message: format!("worker {pod}: {msg}") };
            return (Some(problem), restoring);
        }
        if restoring.is_none() && body.contains("replaying its input") {
            restoring = Some(format!("worker {pod}: {msg}"));
        }
    }
    (None, restoring)
}

/// Requeue with backoff on transient errors; counts them by kind.
pub fn error_policy(tm: Arc<TenantModel>, err: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.errors.get_or_create(&crate::metrics::KindLabel { kind: err.kind().into() }).inc();
    warn!(tm = %tm.name_any(), error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// The blue/green upgrade in progress, the last one's outcome and the plan, as they go into status.
#[derive(Debug)]
struct UpgradeState {
    current: Option<Upgrade>,
    last: Option<UpgradeOutcome>,
    plan: Option<String>,
    /// Set when the cut-over completed in this reconcile: the new live colour.
    completed_to: Option<String>,
}

/// What the live colour runs after [`plan_upgrade`].
#[derive(Debug)]
struct Plan {
    /// The live colour's pipeline.
    live_pipeline: PipelineConfig,
    /// Whether to apply the live colour's ConfigMap and Deployment (not during an upgrade,
    /// nor while a rolled-back spec stands: the live workers keep what they run).
    apply_live: bool,
    /// A rolled-back upgrade's spec still stands: why it is not applied.
    held_back: Option<String>,
}

/// Writes the upgrade's state to status before its action (a restarted operator resumes it).
async fn record_upgrade(
    tms: &Api<TenantModel>,
    tm: &TenantModel,
    written: &mut Option<TenantModelStatus>,
    up: &UpgradeState,
) -> Result<(), kube::Error> {
    let mut st = written.clone().unwrap_or_default();
    st.upgrade = up.current.clone();
    st.last_upgrade = up.last.clone();
    st.plan = up.plan.clone();
    crate::status::with_upgrade(&mut st, None, &now(), tm.metadata.generation);
    patch_status_from(tms, &tm.name_any(), written, st).await.map(|_| ())
}

/// Records a completed cut-over: `color` is the live colour, no upgrade in progress.
async fn record_cutover(
    tms: &Api<TenantModel>,
    tm: &TenantModel,
    written: &mut Option<TenantModelStatus>,
    up: &UpgradeState,
    color: &str,
) -> Result<(), kube::Error> {
    let mut st = written.clone().unwrap_or_default();
    st.active_color = Some(color.to_owned());
    st.upgrade = up.current.clone();
    st.last_upgrade = up.last.clone();
    st.plan = up.plan.clone();
    crate::status::with_upgrade(&mut st, None, &now(), tm.metadata.generation);
    patch_status_from(tms, &tm.name_any(), written, st).await.map(|_| ())
}

fn upgrade_outcome(u: &Upgrade, result: &str, message: String, cutover_seconds: Option<f64>) -> UpgradeOutcome {
    UpgradeOutcome {
        from_version: u.from_version.clone(),
        to_version: u.to_version.clone(),
        result: result.into(),
        message,
        spec_hash: u.spec_hash.clone(),
        started_at: u.started_at.clone(),
        finished_at: now(),
        cutover_seconds,
    }
}

/// Why the spec is not applied, when the last upgrade of this very spec (`hash`) rolled back.
fn held_back(last: Option<&UpgradeOutcome>, hash: &str) -> Option<String> {
    let last = last.filter(|l| l.result == "RolledBack" && l.spec_hash == hash)?;
    Some(format!(
        "the upgrade to model {} was rolled back ({}); the workers run {}; change the spec, or set the annotation {} \
         to a new value, to try again",
        last.to_version,
        last.message,
        last.from_version,
        upgrade::RETRY_ANNOTATION
    ))
}

/// Why the spec is not applied, as status shows it after this reconcile: the plan's reason,
/// or, when the upgrade rolled back in this very reconcile (the plan kept the live colour
/// while it was in progress), the rollback's. Never when the plan applies the spec to the live
/// colour: then the spec runs (e.g. a rolled-back `checkpointStore` change reverted, which
/// the spec hash does not see, as it leaves the colours' store prefixes out).
fn held_back_shown(plan: &Plan, up: &UpgradeState, hash: &str) -> Option<String> {
    if plan.held_back.is_some() {
        return plan.held_back.clone();
    }
    if up.current.is_some() || plan.apply_live {
        return None;
    }
    held_back(up.last.as_ref(), hash)
}

/// Classifies the spec change against what the live colour runs, and starts, keeps or
/// abandons a blue/green upgrade (see [`crate::upgrade`]). Returns what the live colour runs.
#[allow(clippy::too_many_arguments)]
async fn plan_upgrade(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    written: &mut Option<TenantModelStatus>,
    up: &mut UpgradeState,
    live_color: &str,
    live_pipeline: Option<&PipelineConfig>,
    desired: &PipelineConfig,
    live_dep: Option<&Deployment>,
) -> Result<Plan, kube::Error> {
    let Some(live_p) = live_pipeline else {
        return Ok(Plan { live_pipeline: desired.clone(), apply_live: true, held_back: None });
    };
    let hash = upgrade::spec_hash(desired, upgrade::retry_token(tm));
    let keep = Plan { live_pipeline: live_p.clone(), apply_live: false, held_back: None };
    let ns = tm.namespace().unwrap_or_default();
    if let Some(u) = up.current.clone() {
        if u.spec_hash == hash || u.live_from.is_some() {
            return Ok(keep);
        }
        // The spec changed again before the cut-over: this candidate is abandoned (the live
        // colour may be fenced by a cut-over in progress: resume it).
        let pods = worker_pods(&ctx.client, &ns, &selector_string(tm, live_color), None).await?;
        let unresumed = ctx.workers.resume(&pods).await;
        if !unresumed.is_empty() {
            // Their fence hold ends it by itself (upgrade::cutover_hold_seconds()).
            warn!(upgrade = %u.id, ?unresumed, "superseded upgrade: live workers did not confirm their resume");
        }
        let msg = format!("upgrade {}→{} superseded by a newer spec", u.from_version, u.to_version);
        publish(ctx, tm, EventType::Normal, "UpgradeSuperseded", msg.clone()).await;
        up.last = Some(upgrade_outcome(&u, "Superseded", msg, None));
        up.current = None;
        ctx.baselines.lock().unwrap_or_else(|e| e.into_inner()).remove(&u.id);
    }
    let mut desired_live = upgrade::with_identity(desired, live_p);
    let store_changed = upgrade::store_changed(live_p, desired);
    let kind = match upgrade::classify(live_p, &desired_live) {
        ChangeKind::None if store_changed => ChangeKind::CheckpointStore,
        k => k,
    };
    if store_changed {
        // Applied in place (below), the live colour moves to the new store (no seed: its own
        // group's offsets are far past what another run's checkpoints hold).
        desired_live.state.checkpoint_store = desired.state.checkpoint_store.clone();
        desired_live.state.seed_store = None;
    }
    let strategy = &tm.spec.upgrade;
    let available = live_dep.and_then(|d| d.status.as_ref()?.available_replicas).unwrap_or(0);
    let rescaling = tm.status.as_ref().is_some_and(|s| s.operation.is_some());
    let gated = matches!(kind, ChangeKind::ModelOnly | ChangeKind::Features | ChangeKind::CheckpointStore)
        && strategy.kind == UpgradeType::BlueGreen;
    if gated && rescaling {
        // Queued, not applied ungated: the live workers keep what they run (the rescale's
        // worker count alone is applied, see `apply_children`); the blue/green upgrade starts
        // in the first reconcile after the rescale ends.
        let what = upgrade::plan_text(kind, None, live_color, strategy);
        let what = what.split(':').next().unwrap_or_default();
        let text = format!("{what}: queued: starts as a blue/green upgrade when the rescale in progress ends");
        if up.plan.as_deref() != Some(text.as_str()) {
            publish(ctx, tm, EventType::Normal, "UpgradeQueued", text.clone()).await;
        }
        up.plan = Some(text);
        return Ok(keep);
    }
    // With no live worker available there is nothing to compare a candidate with (and the
    // change may be what makes them work again): applied in place, and status.plan says so.
    let bluegreen = gated && available > 0;
    if !bluegreen {
        if kind != ChangeKind::None {
            let text = upgrade::plan_text(kind, None, live_color, strategy);
            if up.plan.as_deref() != Some(text.as_str()) {
                publish(ctx, tm, EventType::Normal, "UpgradePlanned", text.clone()).await;
            }
            up.plan = Some(text);
        }
        return Ok(Plan { live_pipeline: desired_live, apply_live: true, held_back: None });
    }
    if let Some(why) = held_back(up.last.as_ref(), &hash) {
        return Ok(Plan { held_back: Some(why), ..keep });
    }
    let from_version = live_p.model.version.clone();
    let u = upgrade::start(
        live_color,
        kind,
        &from_version,
        desired,
        hash,
        // Seeded only from a store into a store (a candidate without one cannot read a seed).
        live_p.state.checkpoint_store.is_some() && desired.state.checkpoint_store.is_some(),
        chrono::Utc::now(),
    );
    let text = upgrade::plan_text(kind, Some(&u), live_color, strategy);
    info!(plan = %text, "upgrade started");
    up.plan = Some(text.clone());
    up.current = Some(u);
    record_upgrade(tms, tm, written, up).await?;
    publish(ctx, tm, EventType::Normal, "UpgradePlanned", text).await;
    Ok(keep)
}

/// Drives the upgrade in progress one step (see [`crate::upgrade`]): gates in shadow, the
/// cut-over at an offset barrier, or the rollback. `cand` is the candidate's Deployment as applied.
async fn drive_upgrade(
    ctx: &Context,
    tm: &TenantModel,
    tms: &Api<TenantModel>,
    written: &mut Option<TenantModelStatus>,
    up: &mut UpgradeState,
    live_color: &str,
    cand: &Deployment,
    barrier_applied: bool,
) -> Result<(), kube::Error> {
    #![allow(clippy::too_many_arguments)]
    let ns = tm.namespace().unwrap_or_default();
    let Some(mut u) = up.current.clone() else { return Ok(()) };
    let strategy = &tm.spec.upgrade;
    let now_t = chrono::Utc::now();
    let started =
        chrono::DateTime::parse_from_rfc3339(&u.started_at).map(|t| t.with_timezone(&chrono::Utc)).unwrap_or(now_t);
    let overdue = (now_t - started).to_std().unwrap_or_default() > Duration::from_millis(strategy.deadline.as_millis());
    let live_pods = worker_pods(&ctx.client, &ns, &selector_string(tm, live_color), None).await?;
    // Only the candidate's current template: a previous candidate of the same colour (rolled
    // back a moment ago) may still have pods running.
    let cand_hash = template_hash(cand);
    let cand_pods = worker_pods(&ctx.client, &ns, &selector_string(tm, &u.candidate), cand_hash.as_deref()).await?;
    let want = cand.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let title = format!("Upgrading {}→{}", u.from_version, u.to_version);
    // A rollback whose live workers did not all confirm their resume goes on rolling back.
    let mut failure: Option<String> = (u.step == "RollingBack").then(|| u.failure.clone().unwrap_or_default());
    if u.step == "Shadow" {
        let ready = cand.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0);
        let cm = if cand_pods.len() as i32 == want { ctx.workers.metrics(&cand_pods).await } else { None };
        let lm = ctx.workers.metrics(&live_pods).await;
        let baseline = ctx.baselines.lock().unwrap_or_else(|e| e.into_inner()).get(&u.id).cloned();
        let (gates, verdict, take) = upgrade::evaluate_gates(&upgrade::GateInput {
            ready: (ready, want),
            candidate: cm.as_ref(),
            live: lm.as_ref(),
            baseline: baseline.as_ref(),
            strategy,
        });
        if let (true, Some(c), Some(l)) = (take, cm, lm) {
            info!(upgrade = %u.id, "candidate caught up: gate baseline taken");
            ctx.baselines
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(u.id.clone(), upgrade::Baseline { candidate: c, live: l });
        }
        let summary: Vec<String> = gates.iter().map(|g| format!("{} {}: {}", g.name, g.state, g.value)).collect();
        u.gates = gates;
        // A candidate that cannot load its model will not get ready: roll back at once, with
        // the workers' reason.
        // (A candidate that cannot be scheduled may be once capacity frees up: the deadline
        // judges it.)
        let unloadable = if ready < want {
            worker_readiness_problem(&ctx.client, &ns, &selector_string(tm, &u.candidate), cand_hash.as_deref())
                .await
                .0
                .filter(|p| p.reason != "Unschedulable")
        } else {
            None
        };
        let verdict = match unloadable {
            Some(problem) => Verdict::Fail(format!("gate Ready failed: {problem}")),
            None => verdict,
        };
        match verdict {
            Verdict::Fail(why) => failure = Some(why),
            Verdict::Wait if overdue => {
                failure = Some(format!(
                    "deadline {} passed before every gate passed ({})",
                    strategy.deadline,
                    summary.join("; ")
                ))
            }
            Verdict::Wait => u.message = format!("{title}: {} in shadow; {}", u.candidate, summary.join("; ")),
            Verdict::Pass => {
                u.step = "CuttingOver".into();
                u.step_started_at = now();
                u.message = format!("{title}: gates passed; cutting over");
                up.current = Some(u.clone());
                record_upgrade(tms, tm, written, up).await?;
                publish(ctx, tm, EventType::Normal, "UpgradeGatesPassed", format!("{title}: {}", summary.join("; ")))
                    .await;
                crate::fault::point("upgrade-gates-passed");
            }
        }
    }
    if u.step == "CuttingOver" && failure.is_none() {
        if u.candidate_at.is_none() {
            let id = format!("{}-candidate", u.id);
            // Fenced: the candidate stays paused across rebalances and container restarts until
            // it goes live (or the upgrade rolls back); resumed in shadow before the barrier, it
            // would write outputs past its position to the shadow topics only.
            let answers = ctx.workers.drain_with(&cand_pods, &id, upgrade::CANDIDATE_HOLD_SECONDS, false, true).await;
            match upgrade::drained_positions(&answers, &id) {
                _ if cand_pods.len() as i32 != want => {
                    u.message = format!("{title}: waiting for {want} candidate workers")
                }
                Err(e) => failure = Some(format!("pausing the candidate: {e}")),
                Ok(None) => u.message = format!("{title}: pausing {}", u.candidate),
                Ok(Some(at)) if !upgrade::uncovered(&at, &answers).is_empty() => {
                    // A partition no candidate worker owned at its drain (a rebalance): drain again.
                    let missing = upgrade::uncovered(&at, &answers);
                    let unresumed = ctx.workers.resume(&cand_pods).await;
                    if !unresumed.is_empty() {
                        warn!(upgrade = %u.id, ?unresumed, "candidate workers did not confirm their resume");
                    }
                    u.message = format!(
                        "{title}: {} paused without partitions {missing:?} (rebalancing); pausing it again",
                        u.candidate
                    );
                }
                Ok(Some(at)) => {
                    crate::fault::point("upgrade-candidate-paused");
                    u.candidate_at = Some(upgrade::barrier_text(&at));
                    u.message = format!("{title}: {} paused; stopping {live_color} at or past it", u.candidate);
                    up.current = Some(u.clone());
                    record_upgrade(tms, tm, written, up).await?;
                }
            }
            if failure.is_none() && u.candidate_at.is_none() && overdue {
                failure = Some(format!("deadline {} passed while pausing the candidate", strategy.deadline));
            }
        }
        let cat = upgrade::parse_barrier(u.candidate_at.as_deref());
        if let (Some(cat), None, None) = (cat, u.live_from.as_ref(), failure.as_ref()) {
            let n = u.fence_attempt.unwrap_or(1);
            let id = format!("{}-live-{n}", u.id);
            let answers = ctx.workers.drain_with(&live_pods, &id, upgrade::cutover_hold_seconds(), false, true).await;
            match upgrade::drained_positions(&answers, &id) {
                Err(e) => failure = Some(format!("stopping {live_color}: {e}")),
                Ok(None) => u.message = format!("{title}: stopping {live_color}"),
                Ok(Some(at)) if upgrade::fence_covers(&at, &cat) && upgrade::uncovered(&at, &answers).is_empty() => {
                    crate::fault::point("upgrade-live-fenced");
                    u.live_from = Some(upgrade::barrier_text(&at));
                    u.fenced_at = Some(rescale::millis_rfc3339(chrono::Utc::now().timestamp_millis()));
                    u.message = format!("{title}: {live_color} stopped; {} goes live at the barrier", u.candidate);
                    up.current = Some(u.clone());
                    // Recorded before anything acts on it: from here on the upgrade only goes forward.
                    record_upgrade(tms, tm, written, up).await?;
                    info!(upgrade = %u.id, barrier = ?u.live_from, "cut-over barrier recorded");
                    crate::fault::point("upgrade-barrier-recorded");
                }
                Ok(Some(_)) => {
                    // The live colour had not reached the candidate's position, or some partition
                    // had no owner at its drain (a rebalance): let it run and ask again.
                    let unresumed = ctx.workers.resume(&live_pods).await;
                    if !unresumed.is_empty() {
                        warn!(upgrade = %u.id, ?unresumed, "live workers did not confirm their resume");
                    }
                    u.fence_attempt = Some(n + 1);
                    u.message =
                        format!("{title}: {live_color} behind {}; stopping it again (attempt {})", u.candidate, n + 1);
                    up.current = Some(u.clone());
                    record_upgrade(tms, tm, written, up).await?;
                }
            }
            if failure.is_none() && u.live_from.is_none() && overdue {
                failure = Some(format!("deadline {} passed while stopping {live_color}", strategy.deadline));
            }
        }
        if let (Some(barrier), true) = (upgrade::parse_barrier(u.live_from.as_deref()), barrier_applied) {
            match ctx.workers.go_live(&cand_pods, &barrier).await {
                Err(e) => u.message = format!("{title}: telling {} the barrier: {e}", u.candidate),
                Ok(()) => {
                    crate::fault::point("upgrade-went-live");
                    ctx.workers.resume(&cand_pods).await;
                    let answers = ctx.workers.status(&cand_pods).await;
                    let live_everywhere = want > 0
                        && cand_pods.len() as i32 == want
                        && answers.iter().all(|(_, a)| {
                            a.as_ref().is_ok_and(|s| {
                                s.drain == rescale::DrainState::Idle
                                    && s.shadow.as_ref().and_then(|sh| sh.live_from.as_ref()) == Some(&barrier)
                            })
                        });
                    if live_everywhere {
                        crate::fault::point("upgrade-completed");
                        let fenced = u
                            .fenced_at
                            .as_deref()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                            .map(|t| {
                                (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0
                            });
                        let msg = format!(
                            "upgraded {}→{}: {} is live from the barrier {}; {live_color} removed",
                            u.from_version,
                            u.to_version,
                            u.candidate,
                            serde_json::to_string(&barrier).unwrap_or_default()
                        );
                        info!(%msg, "upgrade complete");
                        up.last = Some(upgrade_outcome(&u, "Succeeded", msg.clone(), fenced));
                        up.completed_to = Some(u.candidate.clone());
                        up.current = None;
                        ctx.baselines.lock().unwrap_or_else(|e| e.into_inner()).remove(&u.id);
                        publish(ctx, tm, EventType::Normal, "UpgradeCompleted", msg).await;
                        return Ok(());
                    }
                    u.message = format!("{title}: waiting for every {} worker to report the barrier", u.candidate);
                }
            }
        }
    }
    if let Some(why) = failure {
        // Roll back: the live colour is resumed (it was paused only if the cut-over had begun)
        // and the candidate is removed by the prune that follows. A live worker that did not
        // confirm its resume may still be fenced: asked again on every reconcile, for as long
        // as its fence can hold by itself (then it resumes on its own).
        let unresumed = ctx.workers.resume(&live_pods).await;
        let rolling_since = if u.step == "RollingBack" {
            chrono::DateTime::parse_from_rfc3339(&u.step_started_at).map(|t| t.with_timezone(&chrono::Utc)).ok()
        } else {
            None
        };
        let hold_over = rolling_since.is_some_and(|t| {
            (now_t - t).to_std().unwrap_or_default() > Duration::from_secs(upgrade::cutover_hold_seconds())
        });
        if !unresumed.is_empty() && !hold_over {
            if u.step != "RollingBack" {
                u.step = "RollingBack".into();
                u.step_started_at = now();
                u.failure = Some(why.clone());
                publish(
                    ctx,
                    tm,
                    EventType::Warning,
                    "UpgradeRollingBack",
                    format!("{title}: rolling back ({why}); live workers not resumed yet: {}", unresumed.join("; ")),
                )
                .await;
            }
            u.message =
                format!("{title}: rolling back ({why}); asking live workers to resume again: {}", unresumed.join("; "));
            warn!(upgrade = %u.id, unresumed = ?unresumed, "rollback: live workers did not confirm their resume");
            up.current = Some(u.clone());
            record_upgrade(tms, tm, written, up).await?;
            return Ok(());
        }
        let msg = format!("upgrade {}→{} rolled back: {why}", u.from_version, u.to_version);
        warn!(%msg, "upgrade failed");
        up.last = Some(upgrade_outcome(&u, "RolledBack", why, None));
        up.current = None;
        ctx.baselines.lock().unwrap_or_else(|e| e.into_inner()).remove(&u.id);
        publish(ctx, tm, EventType::Warning, "UpgradeRolledBack", msg).await;
        return Ok(());
    }
    up.current = Some(u);
    Ok(())
}

#[cfg(test)]
#[path = "reconcile_tests.rs"]
mod tests;
