//! `streamscore-worker`: runs one TenantModel pipeline.
//!
//! Start-up: config (validated) → HTTP server (health answers at once) → model (digest,
//! load, probe; on failure: not ready with the reason, nothing consumed) → Kafka loop.
//! SIGTERM/SIGINT: stop consuming, drain outputs, flush state, commit, exit 0.

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use streamscore_worker::decode::Schema;
use streamscore_worker::engine::Engine;
use streamscore_worker::features::FeatureSet;
use streamscore_worker::http::{admin_router, metrics_router, router, AppState};
use streamscore_worker::kafka::{self, Health};
use streamscore_worker::metrics::Metrics;
use streamscore_worker::model::Model;
use streamscore_worker::state::StoreEnv;
use streamscore_worker::{config, engine};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

// mimalloc: the data plane allocates many small, short-lived objects per event (keys, feature
// values, output buffers); glibc malloc spent ~40% of the engine's time on them (perf,
// BENCHMARKS.md). See `tune_allocator` for its one option. mimalloc 2 (the crate's `v2`
// feature), not 3: on the reference pipeline 3 took ~5% more CPU per event (7 of 7 interleaved
// runs), recycling full pages through its abandoned-page lists (300k per million events).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// streamscore worker: Kafka → event-time features (RocksDB) → ONNX scoring → Kafka.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Pipeline configuration file (YAML), as rendered by the operator.
    #[arg(long, env = "STREAMSCORE_PIPELINE", default_value = "/etc/streamscore/pipeline.yaml")]
    pipeline: PathBuf,
    /// Log format.
    #[arg(long, env = "STREAMSCORE_LOG_FORMAT", value_parser = streamscore_telemetry::LOG_FORMATS, default_value = "plain")]
    log_format: String,
    /// Block cache shared by every state store, MiB.
    #[arg(long, env = "STREAMSCORE_BLOCK_CACHE_MB", default_value_t = 64)]
    block_cache_mb: usize,
    /// Keys kept in the write-back cache per partition; above it, clean (durable) entries are
    /// dropped when a checkpoint starts.
    #[arg(long, env = "STREAMSCORE_CACHE_KEYS", default_value_t = 200_000)]
    cache_keys: usize,
}

fn main() -> std::process::ExitCode {
    streamscore_worker::tune_allocator();
    let args = Args::parse();
    streamscore_telemetry::init_logging(&args.log_format);
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(Stop { reason, message }) => {
            error!(reason, "{message}");
            eprintln!("streamscore-worker: {message}");
            write_termination_message(reason, &message);
            std::process::ExitCode::FAILURE
        }
    }
}

/// Why the worker stops: a reason (one of `kafka::REASONS`) and what happened.
struct Stop {
    reason: &'static str,
    message: String,
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        Stop { reason: "WorkerFailed", message }
    }
}

/// Writes `Reason: message` to the container's termination-message file (the kubelet mounts
/// `/dev/termination-log`; `STREAMSCORE_TERMINATION_LOG` names another), when it exists: the
/// kubelet puts it in the pod's `lastState.terminated.message`, and the operator names the
/// failure by its reason in the TenantModel's conditions. At most 4,096 bytes are kept.
fn write_termination_message(reason: &str, message: &str) {
    let path = std::env::var_os("STREAMSCORE_TERMINATION_LOG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/dev/termination-log".into());
    if !path.exists() {
        return;
    }
    let mut text = format!("{reason}: {message}");
    let mut end = text.len().min(4096);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    if let Err(e) = std::fs::write(&path, text) {
        warn!(path = %path.display(), error = %e, "cannot write the termination message");
    }
}

fn run(args: Args) -> Result<(), Stop> {
    let cfg = Arc::new(config::load(&args.pipeline).map_err(|message| Stop { reason: "InvalidPipeline", message })?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("streamscore-http")
        .build()
        .map_err(|e| e.to_string())?;
    let cancel = CancellationToken::new();
    let health = Arc::new(Health::default());
    let metrics = Arc::new(Metrics::new());
    let features = Arc::new(FeatureSet::new(&cfg.features, &Schema::new(&cfg)));
    let readers: engine::Readers = Arc::default();
    // Before the admin API answers: a restarted live colour reports (and keeps) its barrier,
    // a restarted fenced worker its fence, and neither overwrites an operator's request.
    health.admin.restore_after_restart(cfg.shadow.clone(), std::path::Path::new(&cfg.runtime.state_dir));
    // Queries for keys another worker owns are forwarded to it (an owner map from the group).
    let owners = kafka::owners(&cfg).map_err(|e| Stop { reason: e.reason(), message: e.to_string() })?.map(Arc::new);
    let state =
        AppState { health: health.clone(), metrics: metrics.clone(), readers: readers.clone(), features, owners };
    // The admin and metrics listeners are optional; the HTTP one (health, entities) is not.
    if let Some(listen) = &cfg.runtime.admin_listen {
        serve(&rt, listen, "runtime.adminListen", admin_router(state.clone()), &cancel)?;
    }
    if let Some(listen) = &cfg.runtime.metrics_listen {
        serve(&rt, listen, "runtime.metricsListen", metrics_router(state.clone()), &cancel)?;
    }
    serve(&rt, &cfg.runtime.http_listen, "runtime.httpListen", router(state), &cancel)?;
    let sig_cancel = cancel.clone();
    rt.spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: draining"),
        }
        sig_cancel.cancel();
    });

    let mut model_cfg = cfg.model.clone();
    if streamscore_worker::model::is_remote(&model_cfg.path) {
        // Not ready ("model loading", then the download's error) until it is here and verified.
        let dir = std::path::Path::new(&cfg.runtime.state_dir).join(".model");
        loop {
            match streamscore_worker::model::fetch(&model_cfg, cfg.state.credentials_dir.as_deref(), &dir) {
                Ok(p) => {
                    info!(uri = %model_cfg.path, path = %p.display(), "model downloaded and verified");
                    model_cfg.path = p.display().to_string();
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "cannot download the model; retrying in 10 s");
                    *health.model.write().unwrap_or_else(|x| x.into_inner()) =
                        Some(Err(format!("downloading the model: {e}")));
                    let wait = rt.block_on(async {
                        tokio::select! {
                            _ = cancel.cancelled() => true,
                            _ = tokio::time::sleep(std::time::Duration::from_secs(10)) => false,
                        }
                    });
                    if wait {
                        return Ok(());
                    }
                }
            }
        }
    }
    let model = match Model::load(&model_cfg) {
        Ok(m) => {
            info!(version = m.version(), runtime = m.runtime().as_str(), path = %cfg.model.path, "model loaded and probed");
            *health.model.write().unwrap_or_else(|e| e.into_inner()) = Some(Ok(m.version().to_owned()));
            Arc::new(m)
        }
        Err(e) => {
            // Not ready with the reason; consume nothing; stay up so the reason is visible.
            error!(kind = e.kind(), error = %e, "model unusable: not consuming");
            *health.model.write().unwrap_or_else(|x| x.into_inner()) = Some(Err(format!("{}: {e}", e.kind())));
            rt.block_on(cancel.cancelled());
            return Ok(());
        }
    };
    let stores = StoreEnv::new(&cfg.runtime.state_dir, args.block_cache_mb << 20, args.cache_keys);
    // The query API reads the same partition stores the engine owns.
    let engine = Engine::from_config(cfg.clone(), model, stores, metrics.clone())
        .map_err(|e| e.to_string())?
        .with_readers(readers);
    let result = kafka::run(cfg, engine, metrics, health, cancel.clone());
    cancel.cancel();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    result.map_err(|e| Stop { reason: e.reason(), message: e.to_string() })
}

/// Binds `listen` (the setting `setting` names it) and serves `app` on `rt` until `cancel`.
fn serve(
    rt: &tokio::runtime::Runtime,
    listen: &str,
    setting: &'static str,
    app: axum::Router,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(|e| format!("cannot listen on {listen} ({setting}): {e}"))?;
    info!(%listen, setting, "HTTP listening");
    let cancel = cancel.clone();
    rt.spawn(async move {
        let shutdown = async move { cancel.cancelled().await };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            error!(error = %e, setting, "HTTP server failed");
        }
    });
    Ok(())
}
