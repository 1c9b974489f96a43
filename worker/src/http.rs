//! The worker's HTTP surface: `/healthz`, `/readyz`, `/metrics` and the query API
//! `GET /v1/entities/{key}` (feature values and last score of a key this worker owns).
//!
//! Query answers come from the state flushed at the last commit (at most one commit
//! interval old). A key another worker owns is answered by that worker: the request is
//! forwarded to it (`crate::owners` finds it from the consumer group's description), and the
//! answer says which worker and partition answered (headers `x-streamscore-owner`,
//! `x-streamscore-partition`). Without an owner map (the pod's IP unknown), or while the
//! partition has no owner (a rebalance), 409 or 503 name the partition.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::engine::Readers;
use crate::features::FeatureSet;
use crate::kafka::{partition_for, Health};
use crate::metrics::Metrics;
use crate::record::KeyState;

/// What the handlers need.
#[derive(Clone)]
pub struct AppState {
    /// Readiness facts.
    pub health: Arc<Health>,
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// Owned partitions' state (empty until the engine exists).
    pub readers: Readers,
    /// Feature definitions.
    pub features: Arc<FeatureSet>,
    /// Who owns which partition (a query for a key another worker owns is forwarded there);
    /// None when this worker does not know its own address.
    pub owners: Option<Arc<crate::owners::Owners>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AppState")
    }
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/entities/{key}", get(entity))
        .with_state(state)
}

/// `/metrics` alone, on its own listener (`runtime.metricsListen`), so that a NetworkPolicy can
/// open it to a metrics scraper without opening the query API.
pub fn metrics_router(state: AppState) -> Router {
    Router::new().route("/metrics", get(metrics)).with_state(state)
}

/// The admin API, on its own listener (`runtime.adminListen`) so that a NetworkPolicy can
/// admit only the operator: `POST /v1/admin/drain?id=..&holdSeconds=..`,
/// `POST /v1/admin/resume`, `GET /v1/admin/status` (see [`crate::admin`]).
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route("/v1/admin/drain", post(drain))
        .route("/v1/admin/resume", post(resume))
        .route("/v1/admin/golive", post(go_live))
        .route("/v1/admin/status", get(admin_status))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DrainParams {
    id: String,
    #[serde(default = "default_hold")]
    hold_seconds: u64,
    /// Checkpoint every partition to the object store (default true).
    #[serde(default = "yes")]
    checkpoint: bool,
    /// Keep partitions assigned during the drain paused too (a blue/green cut-over).
    #[serde(default)]
    fence: bool,
}

fn yes() -> bool {
    true
}

fn default_hold() -> u64 {
    60
}

async fn drain(State(s): State<AppState>, Query(q): Query<DrainParams>) -> Response {
    if q.id.is_empty() || q.id.len() > 128 {
        return (StatusCode::BAD_REQUEST, Json(json!({"error": "id must be 1-128 characters"}))).into_response();
    }
    let hold = std::time::Duration::from_secs(q.hold_seconds.clamp(1, 3600));
    let opts = crate::admin::DrainOptions { checkpoint: q.checkpoint, fence: q.fence };
    Json(s.health.admin.request_drain_with(&q.id, hold, opts)).into_response()
}

/// Body of `POST /v1/admin/golive`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GoLive {
    live_from: crate::admin::Barrier,
}

/// Sets the cut-over barrier of a worker in shadow mode (see [`crate::admin`]).
async fn go_live(State(s): State<AppState>, Json(body): Json<GoLive>) -> Response {
    match s.health.admin.go_live(&body.live_from) {
        Ok(()) => Json(json!({"liveFrom": body.live_from})).into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(json!({"error": e}))).into_response(),
    }
}

async fn resume(State(s): State<AppState>) -> Response {
    Json(s.health.admin.resume()).into_response()
}

async fn admin_status(State(s): State<AppState>) -> Response {
    Json(admin_status_body(&s.health)).into_response()
}

/// The body of `GET /v1/admin/status`: drain state, readiness, owned partitions, how many
/// replay, the input topic's partition count, and owned partitions whose state misses records
/// the input no longer retains (`incomplete`).
pub fn admin_status_body(health: &Health) -> Value {
    let (ready, not_ready) = match health.readiness() {
        Ok(()) => (true, Vec::new()),
        Err(why) => (false, why),
    };
    let partitions = health.partitions.read().unwrap_or_else(|e| e.into_inner()).clone();
    let checkpoints: Vec<Value> = health
        .checkpointer
        .get()
        .map(|cp| {
            partitions
                .iter()
                .filter_map(|p| cp.newest(*p).map(|(id, at)| json!({"partition": p, "manifest": id, "atMs": at})))
                .collect()
        })
        .unwrap_or_default();
    let shadow = health.admin.shadow().as_ref().map(|s| json!({"topic": s.topic, "liveFrom": s.live_from}));
    let incomplete: Vec<String> = health
        .incomplete
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|(p, _)| partitions.contains(p))
        .map(|(_, what)| what.clone())
        .collect();
    json!({
        "incomplete": incomplete,
        "drain": health.admin.view(),
        "shadow": shadow,
        "checkpoints": checkpoints,
        "ready": ready,
        "notReady": not_ready,
        "partitions": partitions,
        "replaying": health.replaying.read().unwrap_or_else(|e| e.into_inner()).len(),
        "inputPartitions": health.input_partitions.load(Ordering::Relaxed),
    })
}

/// Liveness: fails once the processing loop is stalled (see [`crate::kafka::Heartbeat`]).
async fn healthz(State(s): State<AppState>) -> Response {
    match s.health.liveness() {
        Ok(()) => "ok\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")).into_response(),
    }
}

async fn readyz(State(s): State<AppState>) -> Response {
    match s.health.readiness() {
        Ok(()) => (StatusCode::OK, format!("ok: {} partitions assigned\n", s.health.assigned.load(Ordering::Relaxed)))
            .into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", why.join("; "))).into_response(),
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], s.metrics.encode())
        .into_response()
}

/// Marks a forwarded query: its receiver answers from its own state or says it does not own
/// the key, never forwards again.
const FORWARDED: &str = "x-streamscore-forwarded";
/// The query address of the worker that answered.
const OWNER: &str = "x-streamscore-owner";
/// The key's input partition.
const PARTITION: &str = "x-streamscore-partition";

async fn entity(State(s): State<AppState>, Path(key): Path<String>, headers: HeaderMap) -> Response {
    let n = s.health.input_partitions.load(Ordering::Relaxed);
    if n == 0 {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"error": "input topic metadata not known yet"})))
            .into_response();
    }
    let partition = partition_for(key.as_bytes(), n);
    let me = s.owners.as_ref().map(|o| o.me.clone()).unwrap_or_default();
    let mut resp = entity_here(&s, &key, partition);
    if resp.status() == StatusCode::CONFLICT && !headers.contains_key(FORWARDED) {
        if let Some(owners) = s.owners.clone() {
            resp = forward(owners, &key, partition).await;
        }
    } else if let Ok(v) = HeaderValue::from_str(&me) {
        resp.headers_mut().insert(OWNER, v);
    }
    resp.headers_mut().insert(PARTITION, HeaderValue::from(partition));
    resp
}

/// Asks the worker that owns `partition` for `key`.
async fn forward(owners: Arc<crate::owners::Owners>, key: &str, partition: i32) -> Response {
    let unowned = |why: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            Json(
                json!({"error": format!("partition {partition} of key {key:?}: {why}; retry"), "partition": partition}),
            ),
        )
            .into_response()
    };
    let o = owners.clone();
    let owner = tokio::task::spawn_blocking(move || o.owner(partition)).await.ok().flatten();
    let Some(owner) = owner.filter(|a| *a != owners.me) else {
        return unowned("no worker owns it right now (a rebalance or a state move)".into());
    };
    let Ok(mut url) = reqwest::Url::parse(&format!("http://{owner}/v1/entities/")) else {
        return unowned(format!("owner address {owner:?} is not usable"));
    };
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().push(key);
    }
    let answer = match owners.http.get(url).header(FORWARDED, owners.me.as_str()).send().await {
        Ok(a) => a,
        Err(e) => return unowned(format!("its owner {owner} did not answer: {e}")),
    };
    let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    if status == StatusCode::CONFLICT {
        // The group's description was older than the move.
        owners.forget();
        return unowned(format!("{owner} no longer owns it"));
    }
    let body = answer.bytes().await.unwrap_or_default();
    let mut resp = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Ok(v) = HeaderValue::from_str(&owner) {
        resp.headers_mut().insert(OWNER, v);
    }
    resp
}

/// The answer from this worker's own state (409 when it does not own `partition`).
fn entity_here(s: &AppState, key: &str, partition: i32) -> Response {
    let reader = s.readers.read().unwrap_or_else(|e| e.into_inner()).get(&partition).cloned();
    let Some(reader) = reader else {
        return (
            StatusCode::CONFLICT,
            Json(json!({
                "error": format!("key {key:?} belongs to partition {partition}, which this worker does not own"),
                "partition": partition,
            })),
        )
            .into_response();
    };
    let Some(state) = reader.get::<KeyState>(key) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no state for key {key:?}"), "partition": partition})),
        )
            .into_response();
    };
    let as_of = state.max_time().unwrap_or(0);
    let mut features = Map::new();
    for (name, v) in s.features.names().iter().zip(s.features.evaluate(&state.features, as_of)) {
        features.insert(name.clone(), v.to_json());
    }
    let last = state.last_score.map(|l| {
        json!({
            "eventTime": l.event_time,
            "scores": l.scores.into_iter().map(|(k, v)| (k.into_string(), json!(v))).collect::<Map<String, Value>>(),
            "label": l.label,
            "modelVersion": l.model_version,
        })
    });
    Json(json!({"key": key, "partition": partition, "asOf": as_of, "features": features, "lastScore": last}))
        .into_response()
}
