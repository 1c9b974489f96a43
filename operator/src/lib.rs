//! streamscore operator: reconciles `TenantModel`s into isolated worker Deployments.
//!
//! ```text
//!  watch TenantModel (+ owned children) ─► reconcile::reconcile
//!     validate::validate + policy (pure) ─► observe ─► build::build (pure) ─► ownership ─► SSA apply
//!     ─► prune ─► status::compute
//!  a change of spec.parallelism on a running TenantModel: rescale (drain + checkpoint via the
//!  workers' admin API ─► new replica count ─► restored), step by step in status.operation
//! ```
//! [`lease`] keeps two replicas safe; [`metrics`] is the Prometheus registry.

pub mod autoscale;
pub mod build;
pub mod fault;
pub mod lease;
pub mod metrics;
pub mod ownership;
pub mod pods;
pub mod policy;
pub mod reconcile;
pub mod rescale;
pub mod status;
pub mod upgrade;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client};
use streamscore_crds::tenantmodel::TenantModel;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::reconcile::{error_policy, reconcile, Context};

/// Runs one controller per namespace in `namespaces` (all namespaces when empty) until
/// `cancel` fires.
pub async fn run_controllers(ctx: Arc<Context>, namespaces: &[String], cancel: CancellationToken) {
    let client = ctx.client.clone();
    let scopes: Vec<Option<String>> =
        if namespaces.is_empty() { vec![None] } else { namespaces.iter().cloned().map(Some).collect() };
    let mut tasks = Vec::new();
    let mut stores = Vec::new();
    for ns in scopes {
        let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=streamscore-operator");
        // Every kind of child is watched: one changed or deleted by hand is put back at once
        // (the NetworkPolicy and the PodDisruptionBudget are the tenant's isolation and its
        // availability), not at the next periodic reconcile.
        let controller = Controller::new(scoped::<TenantModel>(&client, &ns), watcher::Config::default())
            .owns(scoped::<Deployment>(&client, &ns), owned.clone())
            .owns(scoped::<ConfigMap>(&client, &ns), owned.clone())
            .owns(scoped::<Service>(&client, &ns), owned.clone())
            .owns(scoped::<ServiceAccount>(&client, &ns), owned.clone())
            .owns(scoped::<PodDisruptionBudget>(&client, &ns), owned.clone())
            .owns(scoped::<NetworkPolicy>(&client, &ns), owned)
            .graceful_shutdown_on(cancel.clone().cancelled_owned());
        stores.push(controller.store());
        let ctx = ctx.clone();
        tasks.push(tokio::spawn(async move {
            controller
                .run(reconcile, error_policy, ctx)
                .for_each(|r| async move {
                    if let Err(e) = r {
                        warn!(error = %e, "controller");
                    }
                })
                .await;
        }));
    }
    // The per-TenantModel metrics and the phase counts, from every watched namespace's cache.
    let m = ctx.metrics.clone();
    let c = cancel.clone();
    tokio::spawn(async move {
        while !c.is_cancelled() {
            let all: Vec<_> = stores.iter().flat_map(|s| s.state()).collect();
            m.observe(all.iter().map(|tm| tm.as_ref()));
            tokio::select! { _ = c.cancelled() => {}, _ = tokio::time::sleep(Duration::from_secs(10)) => {} }
        }
    });
    for t in tasks {
        let _ = t.await;
    }
}

/// The API of kind `K` in namespace `ns`, or in every namespace.
fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match ns {
        Some(n) => Api::namespaced(client.clone(), n),
        None => Api::all(client.clone()),
    }
}
