//! Operator metrics (one registry, passed in; bounded labels).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use streamscore_crds::tenantmodel::TenantModel;
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

/// One TenantModel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct TenantModelLabel {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub tenantmodel: String,
}

/// One condition of one TenantModel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConditionLabel {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub tenantmodel: String,
    /// `Ready`, `Progressing`, `Degraded`, `StateComplete`.
    pub condition: String,
}

/// One Event reason of one TenantModel.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub tenantmodel: String,
    /// The Event's reason (`UpgradeRolledBack`, `RescaleCompleted`, ...).
    pub reason: String,
}

/// The conditions exported (each while the TenantModel's status has it).
pub const CONDITIONS: [&str; 4] = ["Ready", "Progressing", "Degraded", "StateComplete"];

/// Event reasons exported at 0 from a TenantModel's first sight, so that the first one counts
/// in `increase()` (a counter series born at 1 shows no increase).
pub const COUNTED_EVENTS: [&str; 4] =
    ["UpgradeCompleted", "UpgradeRolledBack", "RescaleCompleted", "RescaleRolledBack"];

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
    /// 1 while a TenantModel's condition is True, 0 otherwise.
    pub condition: Family<ConditionLabel, Gauge>,
    /// Workers available, from status.parallelism.
    pub parallelism: Family<TenantModelLabel, Gauge>,
    /// Workers asked for, spec.parallelism.
    pub desired_parallelism: Family<TenantModelLabel, Gauge>,
    /// 1 while a rescale runs.
    pub rescaling: Family<TenantModelLabel, Gauge>,
    /// 1 while a blue/green upgrade runs.
    pub upgrading: Family<TenantModelLabel, Gauge>,
    /// Events published, by TenantModel and reason.
    pub events: Family<EventLabel, Counter>,
    /// The TenantModels exported last time (their series go when they do).
    exported: std::sync::Mutex<std::collections::BTreeSet<TenantModelLabel>>,
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
            condition: Family::default(),
            parallelism: Family::default(),
            desired_parallelism: Family::default(),
            rescaling: Family::default(),
            upgrading: Family::default(),
            events: Family::default(),
            exported: Default::default(),
        };
        m.registry = MetricsRegistry::new("streamscore_operator", |r| {
            r.register("reconciles", "Reconciles started", m.reconciles.clone());
            r.register("reconcile_duration_seconds", "Reconcile duration", m.duration.clone());
            r.register("reconcile_errors", "Reconcile errors by kind", m.errors.clone());
            r.register("tenantmodels", "TenantModels by phase", m.tenantmodels.clone());
            r.register("leader", "1 while this replica holds the leader lease", m.leader.clone());
            r.register(
                "tenantmodel_condition",
                "1 while the TenantModel's condition (Ready, Progressing, Degraded, StateComplete) is True, 0 while False; absent while the status has no such condition",
                m.condition.clone(),
            );
            r.register("tenantmodel_parallelism", "Workers available (status.parallelism)", m.parallelism.clone());
            r.register(
                "tenantmodel_desired_parallelism",
                "Workers asked for (spec.parallelism)",
                m.desired_parallelism.clone(),
            );
            r.register("tenantmodel_rescaling", "1 while a rescale runs", m.rescaling.clone());
            r.register("tenantmodel_upgrading", "1 while a blue/green upgrade runs", m.upgrading.clone());
            r.register(
                "tenantmodel_events",
                "Events the operator published about the TenantModel, by reason",
                m.events.clone(),
            );
        });
        m
    }

    /// Sets the per-TenantModel series from what the watch caches hold (status as last written)
    /// and the phase counts; drops the series of TenantModels that are gone.
    pub fn observe<'a>(&self, tms: impl IntoIterator<Item = &'a TenantModel>) {
        let mut counts = std::collections::BTreeMap::<String, i64>::new();
        let mut seen = std::collections::BTreeSet::new();
        for tm in tms {
            let l = TenantModelLabel {
                namespace: tm.metadata.namespace.clone().unwrap_or_default(),
                tenantmodel: tm.metadata.name.clone().unwrap_or_default(),
            };
            let st = tm.status.clone().unwrap_or_default();
            let phase = st.phase.map_or("Unknown".to_owned(), |p| format!("{p:?}"));
            *counts.entry(phase).or_default() += 1;
            for c in CONDITIONS {
                match st.conditions.iter().find(|x| x.kind == c) {
                    Some(x) => {
                        self.condition.get_or_create(&cond_label(&l, c)).set(i64::from(x.status == "True"));
                    }
                    None => {
                        self.condition.remove(&cond_label(&l, c));
                    }
                }
            }
            self.parallelism.get_or_create(&l).set(i64::from(st.parallelism.unwrap_or(0)));
            self.desired_parallelism.get_or_create(&l).set(i64::from(tm.spec.parallelism));
            self.rescaling.get_or_create(&l).set(i64::from(st.operation.is_some()));
            self.upgrading.get_or_create(&l).set(i64::from(st.upgrade.is_some()));
            for reason in COUNTED_EVENTS {
                let _ = self.events.get_or_create(&event_label(&l, reason));
            }
            seen.insert(l);
        }
        for p in ["Pending", "Running", "Progressing", "Degraded", "Suspended", "Unknown"] {
            self.tenantmodels.get_or_create(&PhaseLabel { phase: p.into() }).set(counts.get(p).copied().unwrap_or(0));
        }
        let mut exported = self.exported.lock().unwrap_or_else(|e| e.into_inner());
        for gone in exported.difference(&seen) {
            for c in CONDITIONS {
                self.condition.remove(&cond_label(gone, c));
            }
            self.parallelism.remove(gone);
            self.desired_parallelism.remove(gone);
            self.rescaling.remove(gone);
            self.upgrading.remove(gone);
            for reason in COUNTED_EVENTS {
                self.events.remove(&event_label(gone, reason));
            }
        }
        *exported = seen;
    }

    /// Counts an Event published about `tm`.
    pub fn event(&self, tm: &TenantModel, reason: &str) {
        let l = TenantModelLabel {
            namespace: tm.metadata.namespace.clone().unwrap_or_default(),
            tenantmodel: tm.metadata.name.clone().unwrap_or_default(),
        };
        self.events.get_or_create(&event_label(&l, reason)).inc();
    }

    /// Prometheus text.
    pub fn encode(&self) -> String {
        self.registry.encode()
    }
}

fn cond_label(l: &TenantModelLabel, condition: &str) -> ConditionLabel {
    ConditionLabel { namespace: l.namespace.clone(), tenantmodel: l.tenantmodel.clone(), condition: condition.into() }
}

fn event_label(l: &TenantModelLabel, reason: &str) -> EventLabel {
    EventLabel { namespace: l.namespace.clone(), tenantmodel: l.tenantmodel.clone(), reason: reason.into() }
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tm(ns: &str, name: &str, status: serde_json::Value) -> TenantModel {
        let mut tm: TenantModel = serde_json::from_value(serde_json::json!({
            "apiVersion": "streamscore.io/v1alpha1", "kind": "TenantModel",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"parallelism": 3, "source": {"bootstrapServers": "k:9092", "topics": ["in"], "keyField": "k", "eventTime": {"field": "ts"}},
                     "model": {"uri": "file:///m", "sha256": "00", "version": "v1", "features": [], "outputs": [{"name": "s"}]},
                     "sink": {"topic": "out", "deadLetterTopic": "dlq"}}
        }))
        .unwrap();
        tm.status = serde_json::from_value(status).unwrap();
        tm
    }

    #[test]
    fn each_tenantmodel_has_its_series_until_it_is_gone() {
        let m = OperatorMetrics::new();
        let a = tm(
            "t1",
            "fraud",
            serde_json::json!({"phase": "Running", "parallelism": 3, "conditions": [
            {"type": "Ready", "status": "True", "reason": "WorkersAvailable", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Degraded", "status": "False", "reason": "AsExpected", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        let b = tm(
            "t2",
            "recs",
            serde_json::json!({"phase": "Degraded", "parallelism": 0, "conditions": [
            {"type": "Degraded", "status": "True", "reason": "CrashLoopBackOff", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        m.observe([&a, &b]);
        m.event(&b, "UpgradeRolledBack");
        let text = m.encode();
        for line in [
            r#"streamscore_operator_tenantmodel_condition{namespace="t1",tenantmodel="fraud",condition="Ready"} 1"#,
            r#"streamscore_operator_tenantmodel_condition{namespace="t2",tenantmodel="recs",condition="Degraded"} 1"#,
            r#"streamscore_operator_tenantmodel_condition{namespace="t1",tenantmodel="fraud",condition="Degraded"} 0"#,
            r#"streamscore_operator_tenantmodel_parallelism{namespace="t1",tenantmodel="fraud"} 3"#,
            r#"streamscore_operator_tenantmodel_desired_parallelism{namespace="t2",tenantmodel="recs"} 3"#,
            r#"streamscore_operator_tenantmodel_events_total{namespace="t2",tenantmodel="recs",reason="UpgradeRolledBack"} 1"#,
            r#"streamscore_operator_tenantmodel_events_total{namespace="t1",tenantmodel="fraud",reason="UpgradeRolledBack"} 0"#,
            r#"streamscore_operator_tenantmodels{phase="Running"} 1"#,
            r#"streamscore_operator_tenantmodels{phase="Degraded"} 1"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains(r#"tenantmodel="recs",condition="Ready""#), "a condition the status lacks: {text}");
        m.observe([&a]);
        let text = m.encode();
        assert!(!text.contains(r#"tenantmodel="recs""#), "a deleted TenantModel's series stay:\n{text}");
        assert!(text.contains(r#"streamscore_operator_tenantmodels{phase="Degraded"} 0"#), "{text}");
    }
}
