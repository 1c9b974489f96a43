//! Leader election with a `coordination.k8s.io/v1` Lease, so two operator replicas are safe:
//! only the holder reconciles. The holder renews every `renew`; another replica takes the
//! Lease over when it has not been renewed for `duration`. Writes are conditional on the
//! Lease's resourceVersion, so two candidates never both win.
//!
//! Expiry is judged without comparing clocks: a candidate notes, on its own monotonic clock,
//! when it last saw the Lease's record change (holder, renew time) and takes it over only
//! `duration` after that; the holder gives leadership up when it has not renewed for
//! [`LeaseLock::renew_deadline`] (two thirds of `duration`) on its own clock, before any other
//! replica may take over.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, PostParams};
use serde_json::json;

/// A Lease-based lock.
#[derive(Clone)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The Lease record last seen (holder, renew time) and when it was first seen so.
    observed: Arc<Mutex<Option<(String, Instant)>>>,
    /// When this replica last wrote the Lease as its holder.
    renewed: Arc<Mutex<Option<Instant>>>,
}

impl std::fmt::Debug for LeaseLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseLock").field("name", &self.name).field("identity", &self.identity).finish()
    }
}

fn now_micro() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

impl LeaseLock {
    /// A lock on Lease `name` in `api`'s namespace, held as `identity`.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
            observed: Arc::default(),
            renewed: Arc::default(),
        }
    }

    /// How long the holder keeps leading without a successful renewal: two thirds of the
    /// Lease duration, so it stops before another replica may take over.
    pub fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }

    /// Whether this replica renewed the Lease within [`LeaseLock::renew_deadline`].
    pub fn still_leading(&self) -> bool {
        self.renewed.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| t.elapsed() < self.renew_deadline())
    }

    /// Whether a Lease whose record is `record` (holder and renew time) has gone unchanged for
    /// `duration` as this replica has watched it (its own clock, never the holder's).
    fn unchanged_for(&self, record: &str, duration: Duration) -> bool {
        let mut seen = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match seen.as_ref() {
            Some((r, at)) if r == record => at.elapsed() > duration,
            _ => {
                *seen = Some((record.to_owned(), Instant::now()));
                false
            }
        }
    }

    fn mark_renewed(&self, at: Instant) {
        *self.renewed.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
    }

    /// Acquires the Lease if free or expired, renews it if held. Returns whether we hold it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let secs = self.duration.as_secs().max(1);
        let Some(current) = self.api.get_opt(&self.name).await? else {
            let lease: Lease = serde_json::from_value(json!({
                "metadata": {"name": self.name},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": secs,
                    "acquireTime": now_micro(),
                    "renewTime": now_micro(),
                    "leaseTransitions": 0
                }
            }))
            .map_err(kube::Error::SerdeError)?;
            let attempt = Instant::now();
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.mark_renewed(attempt);
                    Ok(true)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = serde_json::to_value(current.spec.clone().unwrap_or_default()).map_err(kube::Error::SerdeError)?;
        let holder = spec.get("holderIdentity").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let renew_time = spec.get("renewTime").and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        let duration = spec.get("leaseDurationSeconds").and_then(serde_json::Value::as_i64).unwrap_or(secs as i64);
        let record = format!("{holder}@{renew_time}");
        let expired = self.unchanged_for(&record, Duration::from_secs(duration.max(1) as u64));
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(false);
        }
        let transitions = spec.get("leaseTransitions").and_then(serde_json::Value::as_i64).unwrap_or(0);
        let mut next = spec.clone();
        next["holderIdentity"] = json!(self.identity);
        next["leaseDurationSeconds"] = json!(secs);
        next["renewTime"] = json!(now_micro());
        if holder != self.identity {
            next["acquireTime"] = json!(now_micro());
            next["leaseTransitions"] = json!(transitions + 1);
        }
        let mut lease = current;
        lease.spec = Some(serde_json::from_value(next).map_err(kube::Error::SerdeError)?);
        // Conditional on resourceVersion: a concurrent writer makes this fail with 409.
        let attempt = Instant::now();
        match self.api.replace(&self.name, &PostParams::default(), &lease).await {
            Ok(_) => {
                self.mark_renewed(attempt);
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) -> Result<(), kube::Error> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await? {
            let mut spec =
                serde_json::to_value(lease.spec.clone().unwrap_or_default()).map_err(kube::Error::SerdeError)?;
            if spec.get("holderIdentity").and_then(|v| v.as_str()) == Some(&self.identity) {
                spec["holderIdentity"] = json!("");
                lease.spec = Some(serde_json::from_value(spec).map_err(kube::Error::SerdeError)?);
                self.api.replace(&self.name, &PostParams::default(), &lease).await?;
            }
        }
        Ok(())
    }
}
