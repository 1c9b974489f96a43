//! Operator metrics (one registry, passed in; bounded labels).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use streamscore_telemetry::MetricsRegistry;

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
    registry: MetricsRegistry,
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
        let mut m = Self {
            registry: MetricsRegistry::default(),
            reconciles: Counter::default(),
            duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            errors: Family::default(),
            tenantmodels: Family::default(),
            leader: Gauge::default(),
        };
        m.registry = MetricsRegistry::new("streamscore_operator", |r| {
            r.register("reconciles", "Reconciles started", m.reconciles.clone());
            r.register("reconcile_duration_seconds", "Reconcile duration", m.duration.clone());
            r.register("reconcile_errors", "Reconcile errors by kind", m.errors.clone());
            r.register("tenantmodels", "TenantModels by phase", m.tenantmodels.clone());
            r.register("leader", "1 while this replica holds the leader lease", m.leader.clone());
        });
        m
    }

    /// Prometheus text.
    pub fn encode(&self) -> String {
        self.registry.encode()
    }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}
