//! Status computation (pure): phase and conditions from what was observed.
//! Conditions keep `lastTransitionTime` while their status does not change, so an
//! unchanged world yields an identical status and no status write.

use k8s_openapi::api::apps::v1::Deployment;
use streamscore_crds::tenantmodel::{Condition, HistoryEntry, Phase, TenantModelStatus};

/// What the reconcile observed.
#[derive(Clone, Debug)]
pub enum Observed<'a> {
    /// The TenantModel cannot run (invalid spec, refused by policy, a name conflict, a child
    /// the API server refuses): reason and message.
    Invalid {
        /// CamelCase reason.
        reason: &'a str,
        /// Detail.
        message: String,
    },
    /// Children applied; the live Deployment as the API server returned it.
    Applied {
        /// Live Deployment.
        deployment: &'a Deployment,
        /// Colour.
        color: &'a str,
        /// Selector string.
        selector: String,
        /// Why workers are not ready: what the kubelet, scheduler or Deployment controller
        /// reports (CrashLoopBackOff, OOMKilled, Unschedulable, ...) or the workers say on
        /// `/readyz` (e.g. a model that does not load); None when every worker is ready or
        /// nothing needs a user's action.
        worker_problem: Option<crate::pods::Problem>,
        /// A worker not ready because it restores a partition's state by replaying its input
        /// (no usable local store or checkpoint, or a checkpoint behind the committed offsets).
        worker_restoring: Option<String>,
    },
}

/// Sets `kind` in `conds`, keeping the transition time when the status is unchanged.
pub fn set_condition(
    conds: &mut Vec<Condition>,
    kind: &str,
    status: bool,
    reason: &str,
    message: &str,
    now: &str,
    generation: Option<i64>,
) {
    let status = if status { "True" } else { "False" };
    if let Some(c) = conds.iter_mut().find(|c| c.kind == kind) {
        if c.status != status {
            c.last_transition_time = now.to_owned();
        }
        c.status = status.to_owned();
        c.reason = reason.to_owned();
        c.message = message.to_owned();
        c.observed_generation = generation;
    } else {
        conds.push(Condition {
            kind: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            last_transition_time: now.to_owned(),
            observed_generation: generation,
        });
    }
}

/// The next status.
pub fn compute(
    old: Option<&TenantModelStatus>,
    generation: Option<i64>,
    model_version: &str,
    observed: &Observed<'_>,
    now: &str,
) -> TenantModelStatus {
    let mut st = old.cloned().unwrap_or_default();
    st.observed_generation = generation;
    let conds = &mut st.conditions;
    match observed {
        Observed::Invalid { reason, message } => {
            st.phase = Some(Phase::Degraded);
            set_condition(conds, "Ready", false, reason, message, now, generation);
            set_condition(conds, "Progressing", false, reason, "blocked: see the Degraded condition", now, generation);
            set_condition(conds, "Degraded", true, reason, message, now, generation);
        }
        Observed::Applied { deployment, color, selector, worker_problem, worker_restoring } => {
            let want = deployment.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ds = deployment.status.clone().unwrap_or_default();
            let dep_gen = deployment.metadata.generation;
            let current = ds.observed_generation.is_some() && ds.observed_generation >= dep_gen;
            let updated = ds.updated_replicas.unwrap_or(0);
            let available = ds.available_replicas.unwrap_or(0);
            let ready = current && updated >= want && available >= want && ds.replicas.unwrap_or(0) == want;
            let msg = format!("{available}/{want} workers available ({updated} updated)");
            // Pods waiting for a node are not broken (a cluster autoscaler may be adding one):
            // said in the Ready message, not Degraded.
            let (worker_problem, waiting) = match worker_problem {
                Some(p) if p.reason == "Unschedulable" => (&None, Some(p)),
                p => (p, None),
            };
            match (ready, worker_problem) {
                (false, Some(problem)) => {
                    set_condition(conds, "Degraded", true, &problem.reason, &problem.message, now, generation)
                }
                _ => set_condition(conds, "Degraded", false, "AsExpected", "", now, generation),
            }
            if ready {
                st.phase = Some(Phase::Running);
                set_condition(conds, "Ready", true, "WorkersAvailable", &msg, now, generation);
                set_condition(conds, "Progressing", false, "RolloutComplete", &msg, now, generation);
            } else if let Some(problem) = worker_problem {
                st.phase = Some(Phase::Degraded);
                let msg = format!("{msg}; {}", problem.message);
                set_condition(conds, "Ready", false, &problem.reason, &msg, now, generation);
                set_condition(conds, "Progressing", false, &problem.reason, &msg, now, generation);
            } else if let Some(restoring) = worker_restoring {
                st.phase = Some(Phase::Progressing);
                let msg = format!("{msg}; {restoring}");
                set_condition(conds, "Ready", false, "RestoringState", &msg, now, generation);
                set_condition(conds, "Progressing", true, "RestoringState", &msg, now, generation);
            } else {
                st.phase = Some(if available > 0 { Phase::Progressing } else { Phase::Pending });
                // The REASON column says why they wait: Unschedulable, with the scheduler's message.
                let (reason, msg) = match waiting {
                    Some(p) => (p.reason.as_str(), format!("{msg}; {}", p.message)),
                    None => ("WorkersNotAvailable", msg),
                };
                set_condition(conds, "Ready", false, reason, &msg, now, generation);
                set_condition(conds, "Progressing", true, "RollingOut", &msg, now, generation);
            }
            st.active_color = Some((*color).to_owned());
            st.parallelism = Some(available);
            st.selector = Some(selector.clone());
            st.model_version = Some(model_version.to_owned());
        }
    }
    st
}

/// How many ended operations `status.history` keeps.
pub const HISTORY: usize = 10;

/// Adds the last rescale and the last upgrade to `status.history` unless it has them already
/// (same kind, start and end: idempotent across reconciles and restarts), newest first, at
/// most [`HISTORY`] entries.
pub fn record_history(st: &mut TenantModelStatus) {
    let mut new = Vec::new();
    if let Some(r) = &st.last_rescale {
        new.push(HistoryEntry {
            kind: "Rescale".into(),
            change: format!("{}→{} workers", r.from, r.to),
            result: r.result.clone(),
            message: r.message.clone(),
            started_at: r.started_at.clone(),
            finished_at: r.finished_at.clone(),
        });
    }
    if let Some(u) = &st.last_upgrade {
        new.push(HistoryEntry {
            kind: "Upgrade".into(),
            change: format!("{}→{}", u.from_version, u.to_version),
            result: u.result.clone(),
            message: u.message.clone(),
            started_at: u.started_at.clone(),
            finished_at: u.finished_at.clone(),
        });
    }
    for e in new {
        let known = st
            .history
            .iter()
            .any(|h| h.kind == e.kind && h.started_at == e.started_at && h.finished_at == e.finished_at);
        if !known {
            st.history.push(e);
        }
    }
    st.history.sort_by(|a, b| b.finished_at.cmp(&a.finished_at));
    st.history.truncate(HISTORY);
}

/// `spec.suspend` done (no worker runs, none is asked for): phase `Suspended`, `Ready` and
/// `Progressing` False with reason `Suspended`.
pub fn suspended(st: &mut TenantModelStatus, message: &str, now: &str, generation: Option<i64>) {
    st.phase = Some(Phase::Suspended);
    set_condition(&mut st.conditions, "Ready", false, "Suspended", message, now, generation);
    set_condition(&mut st.conditions, "Progressing", false, "Suspended", message, now, generation);
    set_condition(&mut st.conditions, "Degraded", false, "AsExpected", "", now, generation);
}

/// A rescale in progress shows as `Progressing` (unless something is wrong: `Degraded` wins),
/// with the step in the Progressing condition, as `kubectl describe tm` prints it.
pub fn with_operation(st: &mut TenantModelStatus, now: &str, generation: Option<i64>) {
    let Some(op) = st.operation.clone() else { return };
    if st.phase != Some(Phase::Degraded) {
        st.phase = Some(Phase::Progressing);
    }
    set_condition(&mut st.conditions, "Progressing", true, "Rescaling", &op.message, now, generation);
}

/// A blue/green upgrade in progress shows as `Progressing` (reason `Upgrading`, its message);
/// a rolled-back upgrade whose spec still stands (`held_back`: why) as `Degraded`, reason
/// `RolledBack`: the live workers run the previous version and the spec is not applied.
pub fn with_upgrade(st: &mut TenantModelStatus, held_back: Option<&str>, now: &str, generation: Option<i64>) {
    if let Some(up) = st.upgrade.clone() {
        if st.phase != Some(Phase::Degraded) {
            st.phase = Some(Phase::Progressing);
        }
        set_condition(&mut st.conditions, "Progressing", true, "Upgrading", &up.message, now, generation);
    }
    if let Some(why) = held_back {
        st.phase = Some(Phase::Degraded);
        set_condition(&mut st.conditions, "Degraded", true, "RolledBack", why, now, generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn dep(want: i32, available: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta { generation: Some(2), ..ObjectMeta::default() },
            spec: Some(DeploymentSpec { replicas: Some(want), ..DeploymentSpec::default() }),
            status: Some(DeploymentStatus {
                observed_generation: Some(2),
                replicas: Some(want),
                updated_replicas: Some(want),
                available_replicas: Some(available),
                ..DeploymentStatus::default()
            }),
        }
    }

    #[test]
    fn transition_time_changes_only_with_status() {
        let d = dep(2, 0);
        let obs = Observed::Applied {
            deployment: &d,
            color: "blue",
            selector: "a=b".into(),
            worker_problem: None,
            worker_restoring: None,
        };
        let s1 = compute(None, Some(1), "v1", &obs, "t1");
        assert_eq!(s1.phase, Some(Phase::Pending));
        let s2 = compute(Some(&s1), Some(1), "v1", &obs, "t2");
        assert_eq!(s1, s2, "same observation, same status (no write)");
        let d = dep(2, 2);
        let obs = Observed::Applied {
            deployment: &d,
            color: "blue",
            selector: "a=b".into(),
            worker_problem: None,
            worker_restoring: None,
        };
        let s3 = compute(Some(&s2), Some(1), "v1", &obs, "t3");
        let ready = s3.conditions.iter().find(|c| c.kind == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), ready.last_transition_time.as_str()), ("True", "t3"));
        let degraded = s3.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
        assert_eq!(degraded.last_transition_time, "t1");
        assert_eq!(s3.phase, Some(Phase::Running));
        assert_eq!(s3.parallelism, Some(2));
    }

    #[test]
    fn a_worker_restoring_state_by_replay_is_said_in_the_conditions() {
        let d = dep(2, 1);
        let why = "worker w-1: partition 3 replaying its input to restore state (in at 5 of 11)".to_owned();
        let obs = Observed::Applied {
            deployment: &d,
            color: "blue",
            selector: "a=b".into(),
            worker_problem: None,
            worker_restoring: Some(why.clone()),
        };
        let s = compute(None, Some(1), "v1", &obs, "t1");
        assert_eq!(s.phase, Some(Phase::Progressing));
        for kind in ["Ready", "Progressing"] {
            let c = s.conditions.iter().find(|c| c.kind == kind).unwrap();
            assert_eq!(c.reason, "RestoringState");
            assert!(c.message.ends_with(&why), "{}", c.message);
        }
    }

    #[test]
    fn a_pod_problem_gives_the_conditions_its_reason() {
        let d = dep(2, 1);
        let problem = crate::pods::Problem {
            reason: "CrashLoopBackOff".into(),
            message: "pod w-1: container worker CrashLoopBackOff".into(),
        };
        let obs = Observed::Applied {
            deployment: &d,
            color: "blue",
            selector: "a=b".into(),
            worker_problem: Some(problem),
            worker_restoring: None,
        };
        let s = compute(None, Some(1), "v1", &obs, "t1");
        assert_eq!(s.phase, Some(Phase::Degraded));
        for kind in ["Ready", "Degraded", "Progressing"] {
            let c = s.conditions.iter().find(|c| c.kind == kind).unwrap();
            assert_eq!(c.reason, "CrashLoopBackOff", "{kind}");
            assert!(c.message.contains("pod w-1: container worker CrashLoopBackOff"), "{}", c.message);
        }
    }

    #[test]
    fn pods_waiting_for_a_node_are_pending_with_the_schedulers_message() {
        let d = dep(2, 0);
        let problem = crate::pods::Problem {
            reason: "Unschedulable".into(),
            message: "pod w-1 cannot be scheduled: 0/3 nodes are available".into(),
        };
        let obs = Observed::Applied {
            deployment: &d,
            color: "blue",
            selector: "a=b".into(),
            worker_problem: Some(problem),
            worker_restoring: None,
        };
        let s = compute(None, Some(1), "v1", &obs, "t1");
        assert_eq!(s.phase, Some(Phase::Pending));
        let ready = s.conditions.iter().find(|c| c.kind == "Ready").unwrap();
        assert_eq!(ready.reason, "Unschedulable");
        assert!(ready.message.ends_with("0/3 nodes are available"), "{}", ready.message);
        let degraded = s.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
        assert_eq!(degraded.status, "False");
    }

    #[test]
    fn invalid_spec_is_degraded_with_the_message() {
        let s = compute(
            None,
            Some(3),
            "v1",
            &Observed::Invalid { reason: "InvalidSpec", message: "spec.x: bad".into() },
            "t",
        );
        assert_eq!(s.phase, Some(Phase::Degraded));
        let d = s.conditions.iter().find(|c| c.kind == "Degraded").unwrap();
        assert_eq!((d.status.as_str(), d.reason.as_str(), d.message.as_str()), ("True", "InvalidSpec", "spec.x: bad"));
        assert_eq!(s.observed_generation, Some(3));
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;
    use streamscore_crds::tenantmodel::{RescaleOutcome, UpgradeOutcome};

    fn rescale(from: i32, to: i32, at: &str, result: &str) -> RescaleOutcome {
        RescaleOutcome {
            from,
            to,
            result: result.into(),
            message: String::new(),
            started_at: at.into(),
            finished_at: at.into(),
            paused_seconds: None,
            generation: None,
            attempts: None,
        }
    }

    #[test]
    fn history_keeps_each_ended_operation_once_newest_first_and_bounded() {
        let mut st = TenantModelStatus {
            last_rescale: Some(rescale(2, 4, "2026-01-01T00:01:00Z", "Succeeded")),
            ..Default::default()
        };
        record_history(&mut st);
        record_history(&mut st);
        assert_eq!(st.history.len(), 1, "recorded once across reconciles");
        assert_eq!(st.history[0].change, "2→4 workers");
        st.last_upgrade = Some(UpgradeOutcome {
            from_version: "v1".into(),
            to_version: "v2".into(),
            result: "RolledBack".into(),
            message: "gate ErrorRate failed".into(),
            started_at: "2026-01-01T00:02:00Z".into(),
            finished_at: "2026-01-01T00:03:00Z".into(),
            ..Default::default()
        });
        record_history(&mut st);
        assert_eq!(
            st.history.iter().map(|h| (h.kind.as_str(), h.change.as_str(), h.result.as_str())).collect::<Vec<_>>(),
            [("Upgrade", "v1→v2", "RolledBack"), ("Rescale", "2→4 workers", "Succeeded")]
        );
        for i in 0..20 {
            st.last_rescale = Some(rescale(4, 5, &format!("2026-01-02T00:{i:02}:00Z"), "Succeeded"));
            record_history(&mut st);
        }
        assert_eq!(st.history.len(), HISTORY);
        assert_eq!(st.history[0].finished_at, "2026-01-02T00:19:00Z", "newest first");
    }
}
