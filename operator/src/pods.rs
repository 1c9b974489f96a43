//! Why worker pods do not run, from what the kubelet, the scheduler and the Deployment
//! controller report (pure): the reasons a platform engineer looks for with `kubectl describe
//! pod`, turned into the TenantModel's `Degraded` condition and `kubectl get tm`'s REASON.
//!
//! | seen on | reason | from |
//! |---|---|---|
//! | a worker container waiting | the worker's reason (`InputPartitionsChanged`, `MissingCheckpoint`, ...) | `state.waiting` `CrashLoopBackOff` whose last termination message starts with `Reason: ` (the worker writes it to `/dev/termination-log` when it stops) |
//! | a container waiting | `CrashLoopBackOff` | `state.waiting`, with the last termination (exit code, reason, message) |
//! | a container waiting | `ImagePullBackOff`, `ErrImagePull`, `InvalidImageName` | `state.waiting` |
//! | a container waiting | `CreateContainerConfigError`, `CreateContainerError` | `state.waiting` (a missing ConfigMap or Secret key) |
//! | a container | `OOMKilled` | `state.terminated` or `lastState.terminated` (the memory limit) |
//! | the pod | `Unschedulable` | condition `PodScheduled` False (shown in `Ready`'s message, not `Degraded`: a node may be on its way) |
//! | the Deployment | `FailedCreate` | condition `ReplicaFailure` True (quota, admission) |
//! | the Deployment | `ProgressDeadlineExceeded` | condition `Progressing` False |

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};

/// Why workers do not run: a CamelCase reason and a message naming the pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// `CrashLoopBackOff`, `ImagePullBackOff`, `OOMKilled`, `Unschedulable`, ...
    pub reason: String,
    /// What happened, naming the pod or Deployment.
    pub message: String,
}

impl Problem {
    fn new(reason: &str, message: String) -> Self {
        let message: String = message.chars().take(600).collect();
        Self { reason: reason.to_owned(), message }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// Waiting reasons that need a user's action (not `ContainerCreating` or `PodInitializing`).
const WAITING: [&str; 6] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// The reasons a worker stops with, first in its termination message (`Reason: message`); the
/// worker's `kafka::REASONS` (a test keeps the two in step).
pub const WORKER_REASONS: [&str; 7] = [
    "InputPartitionsChanged",
    "InvalidPipeline",
    "MissingCheckpoint",
    "InputMisplaced",
    "TransactionalIdFenced",
    "InvalidClientConfig",
    "WorkerFailed",
];

/// The worker's own reason and message from the last termination of `c`, when it wrote one.
fn worker_stop(c: &ContainerStatus) -> Option<(&'static str, &str)> {
    let msg = c.last_state.as_ref()?.terminated.as_ref()?.message.as_deref()?.trim();
    let (reason, rest) = msg.split_once(": ")?;
    let reason = WORKER_REASONS.iter().find(|r| **r == reason)?;
    Some((reason, rest.trim()))
}

fn last_termination(c: &ContainerStatus) -> String {
    let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) else { return String::new() };
    let mut s = format!("; last exit code {}", t.exit_code);
    if let Some(r) = &t.reason {
        s.push_str(&format!(" ({r})"));
    }
    if let Some(m) = t.message.as_deref().map(str::trim).filter(|m| !m.is_empty()) {
        s.push_str(&format!(": {m}"));
    }
    s
}

/// The first problem of `pod` a user must fix, if any.
pub fn pod_problem(pod: &Pod) -> Option<Problem> {
    let name = pod.metadata.name.as_deref().unwrap_or("?");
    let status = pod.status.as_ref()?;
    for c in status.container_statuses.iter().flatten().chain(status.init_container_statuses.iter().flatten()) {
        let oom = |t: Option<&k8s_openapi::api::core::v1::ContainerStateTerminated>| {
            t.is_some_and(|t| t.reason.as_deref() == Some("OOMKilled"))
        };
        let state = c.state.as_ref();
        if oom(state.and_then(|s| s.terminated.as_ref()))
            || oom(c.last_state.as_ref().and_then(|s| s.terminated.as_ref()))
        {
            return Some(Problem::new(
                "OOMKilled",
                format!(
                    "pod {name}: container {} was killed for exceeding its memory limit ({} restarts); raise \
                     spec.resources.limits.memory",
                    c.name, c.restart_count
                ),
            ));
        }
        if let Some(w) = state.and_then(|s| s.waiting.as_ref()) {
            let reason = w.reason.as_deref().unwrap_or_default();
            if WAITING.contains(&reason) {
                if reason == "CrashLoopBackOff" {
                    if let Some((why, msg)) = worker_stop(c) {
                        // The worker's own words first: the message is cut at 600 characters.
                        return Some(Problem::new(
                            why,
                            format!("pod {name}: the worker stopped: {msg} ({reason}, {} restarts)", c.restart_count),
                        ));
                    }
                }
                let detail = w.message.as_deref().map(|m| format!(": {m}")).unwrap_or_default();
                let last = if reason == "CrashLoopBackOff" { last_termination(c) } else { String::new() };
                return Some(Problem::new(
                    reason,
                    format!("pod {name}: container {} {reason}{detail}{last} ({} restarts)", c.name, c.restart_count),
                ));
            }
        }
    }
    for cond in status.conditions.iter().flatten() {
        if cond.type_ == "PodScheduled" && cond.status == "False" && cond.reason.as_deref() == Some("Unschedulable") {
            return Some(Problem::new(
                "Unschedulable",
                format!("pod {name} cannot be scheduled: {}", cond.message.as_deref().unwrap_or_default()),
            ));
        }
    }
    None
}

/// What the Deployment controller says is wrong with `d`, if anything.
pub fn deployment_problem(d: &Deployment) -> Option<Problem> {
    let name = d.metadata.name.as_deref().unwrap_or("?");
    for cond in d.status.as_ref()?.conditions.iter().flatten() {
        let msg = cond.message.as_deref().unwrap_or_default();
        if cond.type_ == "ReplicaFailure" && cond.status == "True" {
            let reason = cond.reason.as_deref().unwrap_or("FailedCreate");
            return Some(Problem::new(reason, format!("deployment {name}: {msg}")));
        }
        if cond.type_ == "Progressing"
            && cond.status == "False"
            && cond.reason.as_deref() == Some("ProgressDeadlineExceeded")
        {
            return Some(Problem::new("ProgressDeadlineExceeded", format!("deployment {name}: {msg}")));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_worker_reasons_are_the_ones_the_worker_writes() {
        // The worker's list, read from its source (the operator does not link the worker).
        let src = include_str!("../../worker/src/kafka/error.rs");
        let list =
            src.split("pub const REASONS").nth(1).and_then(|s| s.split("];").next()).expect("REASONS in the worker");
        let theirs: Vec<&str> = list.split('"').skip(1).step_by(2).collect();
        assert_eq!(theirs, WORKER_REASONS, "worker/src/kafka/error.rs REASONS and pods::WORKER_REASONS differ");
    }

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "fraud-blue-7d9f-abcde"}, "status": status})).unwrap()
    }

    #[test]
    fn what_the_kubelet_reports_becomes_a_reason_and_a_message() {
        let crash = pod(json!({"containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 4,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "message": "model not loaded: digest mismatch\n"}}
        }]}));
        let p = pod_problem(&crash).unwrap();
        assert_eq!(p.reason, "CrashLoopBackOff");
        assert_eq!(
            p.message,
            "pod fraud-blue-7d9f-abcde: container worker CrashLoopBackOff: back-off 40s restarting failed container; \
             last exit code 1 (Error): model not loaded: digest mismatch (4 restarts)"
        );

        // The worker's own reason, from its termination message.
        let stopped = pod(json!({"containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 2,
            "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting failed container"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "InputPartitionsChanged: opening the state of partition 0: partition 0: the input topic has 6 partitions"}}
        }]}));
        let p = pod_problem(&stopped).unwrap();
        assert_eq!(p.reason, "InputPartitionsChanged");
        assert_eq!(
            p.message,
            "pod fraud-blue-7d9f-abcde: the worker stopped: opening the state of partition 0: partition 0: the input \
             topic has 6 partitions (CrashLoopBackOff, 2 restarts)"
        );
        // A message that only looks like one stays a CrashLoopBackOff.
        let other = pod(json!({"containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 1,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "message": "Oops: something"}}
        }]}));
        assert_eq!(pod_problem(&other).unwrap().reason, "CrashLoopBackOff");

        let pull = pod(json!({"containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"nope:1\""}}
        }]}));
        assert_eq!(pod_problem(&pull).unwrap().reason, "ImagePullBackOff");

        let oom = pod(json!({"containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": true, "restartCount": 2,
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
        }]}));
        let p = pod_problem(&oom).unwrap();
        assert_eq!(p.reason, "OOMKilled");
        assert!(p.message.contains("spec.resources.limits.memory"), "{p}");

        let pending = pod(json!({"phase": "Pending", "conditions": [{
            "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient memory."
        }]}));
        assert_eq!(
            pod_problem(&pending).unwrap().to_string(),
            "Unschedulable: pod fraud-blue-7d9f-abcde cannot be scheduled: 0/1 nodes are available: 1 Insufficient memory."
        );

        let starting = pod(json!({"containerStatuses": [{
            "name": "worker", "image": "w", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}}
        }]}));
        assert_eq!(pod_problem(&starting), None, "starting up is not a problem");
    }

    #[test]
    fn what_the_deployment_controller_reports_becomes_a_reason() {
        let d: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "fraud-blue"},
            "status": {"conditions": [
                {"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"},
                {"type": "ReplicaFailure", "status": "True", "reason": "FailedCreate",
                 "message": "pods \"fraud-blue-x\" is forbidden: exceeded quota: compute, requested: limits.memory=2Gi"}
            ]}
        }))
        .unwrap();
        let p = deployment_problem(&d).unwrap();
        assert_eq!(p.reason, "FailedCreate");
        assert!(p.message.contains("exceeded quota"), "{p}");
        let stuck: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "fraud-blue"},
            "status": {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                                       "message": "ReplicaSet \"fraud-blue-1\" has timed out progressing."}]}
        }))
        .unwrap();
        assert_eq!(deployment_problem(&stuck).unwrap().reason, "ProgressDeadlineExceeded");
    }
}
