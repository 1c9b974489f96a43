//! `streamscore-operator`: leader election, then one controller per watched namespace
//! (or one for all), plus `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::Reporter;
use kube::{Api, Client};
use streamscore_operator::build::BuildContext;
use streamscore_operator::lease::LeaseLock;
use streamscore_operator::metrics::OperatorMetrics;
use streamscore_operator::policy::{ImagePattern, TenantPolicy};
use streamscore_operator::reconcile::Context;
use streamscore_operator::run_controllers;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// streamscore operator: runs TenantModels as isolated worker Deployments.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Namespaces to watch (comma-separated). Empty: all namespaces.
    #[arg(long, env = "STREAMSCORE_WATCH_NAMESPACES", value_delimiter = ',', default_value = "")]
    namespaces: Vec<String>,
    /// Worker image used when a TenantModel names none.
    #[arg(long, env = "STREAMSCORE_WORKER_IMAGE", default_value = "streamscore-worker:0.1.0")]
    worker_image: String,
    /// Images TenantModels may name in `spec.image` besides the worker image (comma-separated):
    /// exact references, or prefixes ending in `/*`, `:*` or `@*`. Empty: only the worker image.
    #[arg(long, env = "STREAMSCORE_ALLOWED_IMAGES", value_delimiter = ',', default_value = "")]
    allowed_images: Vec<String>,
    /// Require `spec.image` to be pinned by digest (`…@sha256:<hex>`).
    #[arg(long, env = "STREAMSCORE_REQUIRE_IMAGE_DIGEST", default_value_t = false, action = clap::ArgAction::Set)]
    require_image_digest: bool,
    /// Prefix every Kafka topic and consumer group of a TenantModel must start with;
    /// `{namespace}` stands for its namespace (e.g. `{namespace}.`). Empty: no restriction.
    #[arg(long, env = "STREAMSCORE_KAFKA_PREFIX", default_value = "")]
    kafka_prefix: String,
    /// Requests and limits of a worker container whose TenantModel sets none (JSON of a
    /// Kubernetes ResourceRequirements, e.g. `{"requests":{"cpu":"500m"}}`). Empty: none.
    #[arg(long, env = "STREAMSCORE_WORKER_RESOURCES", default_value = "")]
    worker_resources: String,
    /// The most a worker may request or be limited to, per resource (JSON map, e.g.
    /// `{"cpu":"8","memory":"32Gi"}`). Empty: no maximum.
    #[arg(long, env = "STREAMSCORE_MAX_WORKER_RESOURCES", default_value = "")]
    max_worker_resources: String,
    /// Egress the workers' NetworkPolicy allows (JSON of `WorkerEgress`, e.g.
    /// `{"kafkaCIDRs":["10.0.0.0/8"],"objectStorePorts":[443]}`); `off`: no egress rules.
    #[arg(long, env = "STREAMSCORE_WORKER_EGRESS", default_value = "{}")]
    worker_egress: String,
    /// Who may scrape the workers' metrics port 9090 (JSON list of NetworkPolicyPeers, e.g.
    /// `[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]`).
    /// Empty: any pod in any namespace.
    #[arg(long, env = "STREAMSCORE_WORKER_METRICS_FROM", default_value = "")]
    worker_metrics_from: String,
    /// What every worker pod gets from the platform (JSON, Helm `workerPodTemplate`):
    /// nodeSelector, tolerations, affinity, topologySpreadConstraints, priorityClassName,
    /// imagePullSecrets, serviceAccountAnnotations, podAnnotations, podLabels.
    #[arg(long, env = "STREAMSCORE_WORKER_POD_TEMPLATE", default_value = "")]
    worker_pod_template: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "STREAMSCORE_LISTEN", default_value = "0.0.0.0:8081")]
    listen: SocketAddr,
    /// Log format.
    #[arg(long, env = "STREAMSCORE_LOG_FORMAT", value_parser = streamscore_telemetry::LOG_FORMATS, default_value = "plain")]
    log_format: String,
    /// Namespace the operator runs in (its Lease lives there).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    operator_namespace: String,
    /// Identity in the leader Lease.
    #[arg(long, env = "POD_NAME", default_value = "")]
    identity: String,
    /// Leader election (disable only for a single replica).
    #[arg(long, env = "STREAMSCORE_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader Lease.
    #[arg(long, default_value = "streamscore-operator")]
    lease_name: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    streamscore_telemetry::init_logging(&args.log_format);
    let policy = TenantPolicy {
        allowed_images: args
            .allowed_images
            .iter()
            .filter(|p| !p.trim().is_empty())
            .map(|p| p.parse::<ImagePattern>().map_err(anyhow::Error::msg))
            .collect::<anyhow::Result<_>>()?,
        require_image_digest: args.require_image_digest,
        kafka_prefix: Some(args.kafka_prefix.clone()).filter(|p| !p.is_empty()),
        max_resources: if args.max_worker_resources.trim().is_empty() {
            Default::default()
        } else {
            // Values may be JSON strings or numbers (`cpu: 8` in Helm values).
            serde_json::from_str::<std::collections::BTreeMap<String, serde_json::Value>>(&args.max_worker_resources)
                .map_err(|e| anyhow::anyhow!("--max-worker-resources: {e}"))?
                .into_iter()
                .map(|(k, v)| (k, v.as_str().map_or_else(|| v.to_string(), str::to_owned)))
                .collect()
        },
    };
    for (name, q) in &policy.max_resources {
        anyhow::ensure!(
            streamscore_operator::policy::parse_quantity(q).is_some(),
            "--max-worker-resources: {name}: {q:?} is not a quantity"
        );
    }
    let metrics_from = match args.worker_metrics_from.trim() {
        "" | "[]" => None,
        json => Some(serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--worker-metrics-from: {e}"))?),
    };
    let worker_egress = match args.worker_egress.trim() {
        "off" => None,
        "" => Some(Default::default()),
        json => Some(serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--worker-egress: {e}"))?),
    };
    let worker_pod_template = match args.worker_pod_template.trim() {
        "" | "{}" => Default::default(),
        json => serde_json::from_str(json).map_err(|e| anyhow::anyhow!("--worker-pod-template: {e}"))?,
    };
    let default_resources = if args.worker_resources.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&args.worker_resources).map_err(|e| anyhow::anyhow!("--worker-resources: {e}"))?)
    };
    info!(?policy, "tenant policy");
    let client = Client::try_default().await?;
    let metrics = Arc::new(OperatorMetrics::new());
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();

    let m = metrics.clone();
    let r = ready.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let r = r.clone();
                async move {
                    if r.load(Ordering::Relaxed) {
                        (axum::http::StatusCode::OK, "ok\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "not leading yet\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { m.encode() }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    info!(listen = %args.listen, "HTTP listening");
    let http_cancel = cancel.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { http_cancel.cancelled().await }).await;
    });
    let sig = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        info!("shutting down");
        sig.cancel();
    });

    let identity =
        if args.identity.is_empty() { format!("{}-{}", hostname(), std::process::id()) } else { args.identity.clone() };
    let lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &args.operator_namespace),
        &args.lease_name,
        &identity,
        Duration::from_secs(15),
    );
    if args.leader_elect {
        info!(%identity, lease = %args.lease_name, "waiting for leadership");
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = lock.try_acquire_or_renew() => match r {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => warn!(error = %e, "lease"),
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        info!("leading");
        metrics.leader.set(1);
        let lock2 = lock.clone();
        let lost = cancel.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                // A renewal that hangs counts as failed once the deadline has passed.
                let r = tokio::time::timeout(lock2.renew_deadline(), lock2.try_acquire_or_renew())
                    .await
                    .unwrap_or_else(|_| Err(kube::Error::Service("lease renewal timed out".into())));
                match r {
                    Ok(true) => {}
                    Ok(false) => {
                        error!("leadership lost: stopping");
                        lost.cancel();
                        return;
                    }
                    Err(e) if lock2.still_leading() => warn!(error = %e, "lease renewal failed; retrying"),
                    Err(e) => {
                        // Another replica may take the Lease over soon: stop before it can.
                        error!(
                            error = %e,
                            deadline = ?lock2.renew_deadline(),
                            "lease not renewed within the renew deadline: giving up leadership"
                        );
                        lost.cancel();
                        return;
                    }
                }
            }
        });
    }
    ready.store(true, Ordering::Relaxed);

    let reporter = Reporter { controller: "streamscore-operator".into(), instance: Some(identity.clone()) };
    let ctx = Arc::new(Context {
        client: client.clone(),
        build: BuildContext {
            default_image: args.worker_image.clone(),
            operator_namespace: args.operator_namespace.clone(),
            kafka_prefix: None,
            default_resources,
            worker_egress,
            metrics_from,
            worker_pod_template,
        },
        metrics: metrics.clone(),
        recorder: streamscore_operator::reconcile::Events::new(client.clone(), reporter),
        policy,
        workers: Default::default(),
        baselines: Default::default(),
        autoscalers: Default::default(),
    });
    let namespaces: Vec<String> = args.namespaces.iter().filter(|n| !n.is_empty()).cloned().collect();
    run_controllers(ctx, &namespaces, cancel.clone()).await;
    if args.leader_elect {
        let _ = lock.release().await;
    }
    cancel.cancel();
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "streamscore-operator".into())
}
