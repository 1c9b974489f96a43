//! Operator metrics (one registry, passed in; bounded labels).

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// `kind` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// Error kind.
    pub kind: String,
}

/// `phase` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    /// TenantModel phase.
    pub phase: String,
}

/// Every operator metric.
#[derive(Debug)]
pub struct OperatorMetrics {
    registry: Mutex<Registry>,
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconcile duration, seconds.
    pub duration: Histogram,
    /// Reconcile errors by kind.
    pub errors: Family<KindLabel, Counter>,
    /// TenantModels by phase.
    pub tenantmodels: Family<PhaseLabel, Gauge>,
    /// 1 while this replica leads.
    pub leader: Gauge,
}

impl OperatorMetrics {
    /// Builds and registers.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("streamscore_operator");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            reconciles: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            errors: Family::default(),
            tenantmodels: Family::default(),
            leader: Gauge::default(),
        };
        r.register("reconciles", "Reconciles started", m.reconciles.clone());
        r.register("reconcile_duration_seconds", "Reconcile duration", m.duration.clone());
        r.register("reconcile_errors", "Reconcile errors by kind", m.errors.clone());
        r.register("tenantmodels", "TenantModels by phase", m.tenantmodels.clone());
        r.register("leader", "1 while this replica holds the leader lease", m.leader.clone());
        *m.registry.lock().expect("fresh") = r;
        m
    }

    /// Prometheus text.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        prometheus_client::encoding::text::encode(&mut s, &r).expect("String write");
        s
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
