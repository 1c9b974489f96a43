//! `streamscore-node-agent`: a development and test harness that lets the real control
//! plane run pods on this machine without a container runtime. **It is not a kubelet.**
//!
//! ```text
//!  register Node (capacity, Ready, heartbeats) ─► watch pods with spec.nodeName = this node
//!   new pod ─► pod IP 127.0.0.x ─► volumes as directories (ConfigMap/Secret keys as files,
//!              emptyDir/ephemeral as empty dirs) ─► container = local process (image → binary
//!              map), mount paths and 0.0.0.0 rewritten to the local dirs and the pod IP
//!   probes (HTTP readiness/liveness) ─► pod status (phase, IP, conditions, containerStatuses)
//!   exit ─► restart per restartPolicy with backoff, restartCount++
//!   deletion ─► SIGTERM, SIGKILL after the grace period, then the pod object is removed
//! ```
//! When the agent stops it kills every process it started.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Parser;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, ResourceExt};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::json;
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// streamscore node agent (test/dev harness, not a kubelet).
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Node name to register.
    #[arg(long, default_value = "streamscore-local")]
    node_name: String,
    /// Image → binary map: `image-prefix=/path/to/binary`, repeatable. The first prefix that
    /// matches the container image (before the tag) wins.
    #[arg(long = "image", value_parser = parse_image)]
    images: Vec<(String, PathBuf)>,
    /// Directory for pod volumes and logs.
    #[arg(long, default_value = ".dev/node")]
    work_dir: PathBuf,
    /// Pod IPs are 127.0.<subnet>.<n>.
    #[arg(long, default_value_t = 77)]
    subnet: u8,
    /// Extra environment for every container (`NAME=value`, repeatable), e.g. Kafka overrides.
    #[arg(long = "env", value_parser = parse_kv)]
    env: Vec<(String, String)>,
}

fn parse_image(s: &str) -> Result<(String, PathBuf), String> {
    let (i, p) = s.split_once('=').ok_or("expected image-prefix=/path/to/binary")?;
    Ok((i.to_owned(), PathBuf::from(p)))
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=value")?;
    Ok((k.to_owned(), v.to_owned()))
}

/// One running pod.
struct PodRun {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

struct Agent {
    client: Client,
    args: Args,
    pods: Mutex<HashMap<String, PodRun>>,
    next_ip: Mutex<u8>,
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    streamscore_telemetry::init_logging("plain");
    let mut args = Args::parse();
    args.work_dir = std::path::absolute(&args.work_dir)?;
    std::fs::create_dir_all(&args.work_dir)?;
    let client = Client::try_default().await.context("kube client (KUBECONFIG)")?;
    let agent = Arc::new(Agent { client, args, pods: Mutex::new(HashMap::new()), next_ip: Mutex::new(1) });
    agent.register_node().await?;
    let cancel = CancellationToken::new();
    let hb = agent.clone();
    let hb_cancel = cancel.clone();
    tokio::spawn(async move {
        while !hb_cancel.is_cancelled() {
            tokio::select! { _ = hb_cancel.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(10)) => {} }
            if let Err(e) = hb.heartbeat().await {
                warn!(error = %e, "node heartbeat");
            }
        }
    });
    let sig = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        sig.cancel();
    });
    let pods: Api<Pod> = Api::all(agent.client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", agent.args.node_name));
    let mut stream = watcher::watcher(pods, wc).default_backoff().boxed();
    info!(node = %agent.args.node_name, "watching pods");
    loop {
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = stream.try_next() => ev,
        };
        match ev {
            Ok(Some(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => agent.clone().on_pod(pod).await,
            Ok(Some(watcher::Event::Delete(pod))) => agent.stop_pod(&pod.uid().unwrap_or_default()).await,
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => warn!(error = %e, "pod watch"),
        }
    }
    info!("stopping every pod process");
    let uids: Vec<String> = agent.pods.lock().await.keys().cloned().collect();
    for uid in uids {
        agent.stop_pod(&uid).await;
    }
    // Remove the Node so the scheduler never places pods on a node nobody runs.
    let nodes: Api<Node> = Api::all(agent.client.clone());
    let _ = nodes.delete(&agent.args.node_name, &DeleteParams::default()).await;
    Ok(())
}

impl Agent {
    async fn register_node(&self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.args.node_name, "labels": {
                "kubernetes.io/hostname": self.args.node_name, "kubernetes.io/os": "linux",
                "streamscore.io/node-agent": "true"}},
        });
        nodes
            .patch(&self.args.node_name, &PatchParams::apply("streamscore-node-agent").force(), &Patch::Apply(&node))
            .await?;
        self.heartbeat().await
    }

    async fn heartbeat(&self) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let t = now();
        let status = json!({"status": {
            "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "50Gi"},
            "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110", "ephemeral-storage": "50Gi"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": self.args.node_name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "NodeAgentReady",
                "message": "streamscore node agent (test harness) is running pods as local processes",
                "lastHeartbeatTime": t, "lastTransitionTime": t}],
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux", "kubeletVersion": "v1.34.4",
                "kubeProxyVersion": "", "containerRuntimeVersion": "local-process://streamscore-node-agent",
                "kernelVersion": "", "osImage": "", "machineID": "", "systemUUID": "", "bootID": ""}
        }});
        nodes.patch_status(&self.args.node_name, &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(())
    }

    async fn on_pod(self: Arc<Self>, pod: Pod) {
        let uid = pod.uid().unwrap_or_default();
        if pod.metadata.deletion_timestamp.is_some() {
            self.stop_pod(&uid).await;
            let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
            let _ = api.delete(&pod.name_any(), &DeleteParams::default().grace_period(0)).await;
            return;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
        if phase == "Succeeded" || phase == "Failed" {
            return;
        }
        let mut pods = self.pods.lock().await;
        if pods.contains_key(&uid) {
            return;
        }
        let ip = {
            let mut n = self.next_ip.lock().await;
            let ip = format!("127.0.{}.{}", self.args.subnet, *n);
            *n = if *n >= 250 { 1 } else { *n + 1 };
            ip
        };
        let cancel = CancellationToken::new();
        let me = self.clone();
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = me.clone().run_pod(pod.clone(), ip, c).await {
                warn!(pod = %pod.name_any(), error = %format!("{e:#}"), "pod failed to start");
                let _ = me.set_failed(&pod, &format!("{e:#}")).await;
            }
        });
        pods.insert(uid, PodRun { cancel, task });
    }

    async fn stop_pod(&self, uid: &str) {
        let run = self.pods.lock().await.remove(uid);
        if let Some(run) = run {
            run.cancel.cancel();
            let _ = run.task.await;
        }
    }

    async fn set_failed(&self, pod: &Pod, message: &str) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let status = json!({"status": {"phase": "Pending", "conditions": [
            {"type": "Ready", "status": "False", "reason": "ContainerCreateFailed", "message": message, "lastTransitionTime": now()}
        ]}});
        api.patch_status(&pod.name_any(), &PatchParams::default(), &Patch::Merge(&status)).await?;
        Ok(())
    }

    /// Materialises volumes; returns mount path → local directory.
    async fn volumes(&self, pod: &Pod, root: &Path, ip: &str) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let ns = pod.namespace().unwrap_or_default();
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let mut dirs: HashMap<String, PathBuf> = HashMap::new();
        for v in spec.volumes.iter().flatten() {
            let dir = root.join("volumes").join(&v.name);
            std::fs::create_dir_all(&dir)?;
            let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut items: Option<Vec<(String, String)>> = None;
            if let Some(cm) = &v.config_map {
                let obj = Api::<ConfigMap>::namespaced(self.client.clone(), &ns)
                    .get(&cm.name)
                    .await
                    .with_context(|| format!("ConfigMap {} for volume {}", cm.name, v.name))?;
                for (k, s) in obj.data.unwrap_or_default() {
                    files.insert(k, s.into_bytes());
                }
                for (k, b) in obj.binary_data.unwrap_or_default() {
                    files.insert(k, b.0);
                }
                items = cm.items.as_ref().map(|i| i.iter().map(|x| (x.key.clone(), x.path.clone())).collect());
            } else if let Some(sec) = &v.secret {
                let name = sec.secret_name.clone().unwrap_or_default();
                let obj = Api::<Secret>::namespaced(self.client.clone(), &ns)
                    .get(&name)
                    .await
                    .with_context(|| format!("Secret {name} for volume {}", v.name))?;
                for (k, b) in obj.data.unwrap_or_default() {
                    files.insert(k, b.0);
                }
                items = sec.items.as_ref().map(|i| i.iter().map(|x| (x.key.clone(), x.path.clone())).collect());
            }
            let pairs: Vec<(String, String)> = match items {
                Some(i) => i,
                None => files.keys().map(|k| (k.clone(), k.clone())).collect(),
            };
            for (key, path) in pairs {
                if let Some(bytes) = files.get(&key) {
                    let f = dir.join(&path);
                    if let Some(parent) = f.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(f, bytes)?;
                }
            }
            dirs.insert(v.name.clone(), dir);
        }
        let c = &spec.containers[0];
        let mut mounts = Vec::new();
        for m in c.volume_mounts.iter().flatten() {
            let dir = dirs.get(&m.name).with_context(|| format!("volumeMount {} has no volume", m.name))?;
            mounts.push((m.mount_path.clone(), dir.clone()));
        }
        // Longest mount path first, so nested mounts rewrite correctly.
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        // Rewrite paths and the wildcard address inside text files of ConfigMap volumes.
        for (_, dir) in &mounts {
            for entry in std::fs::read_dir(dir)?.flatten() {
                let p = entry.path();
                if let Ok(text) = std::fs::read_to_string(&p) {
                    let new = rewrite(&text, &mounts, ip);
                    if new != text {
                        std::fs::write(&p, new)?;
                    }
                }
            }
        }
        Ok(mounts)
    }

    async fn run_pod(self: Arc<Self>, pod: Pod, ip: String, cancel: CancellationToken) -> anyhow::Result<()> {
        let name = pod.name_any();
        let ns = pod.namespace().unwrap_or_default();
        let uid = pod.uid().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let spec = pod.spec.clone().context("pod without spec")?;
        let c = spec.containers.first().context("pod without containers")?.clone();
        let image = c.image.clone().unwrap_or_default();
        let repo = image.rsplit_once(':').map_or(image.as_str(), |(r, _)| r).to_owned();
        let Some((_, binary)) = self.args.images.iter().find(|(prefix, _)| repo.starts_with(prefix.as_str())) else {
            bail!("no local binary for image {image:?} (map it with --image {repo}=/path/to/binary)");
        };
        let root = self.args.work_dir.join("pods").join(&uid);
        std::fs::create_dir_all(&root)?;
        let mounts = self.volumes(&pod, &root, &ip).await?;
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default().into_iter().skip(1).collect();
        argv.extend(c.args.clone().unwrap_or_default());
        let argv: Vec<String> = argv.iter().map(|a| rewrite(a, &mounts, &ip)).collect();
        let mut env: Vec<(String, String)> = Vec::new();
        for e in c.env.iter().flatten() {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => match from.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                    Some("metadata.name") => name.clone(),
                    Some("metadata.namespace") => ns.clone(),
                    Some("status.podIP") => ip.clone(),
                    _ => String::new(),
                },
                _ => String::new(),
            };
            env.push((e.name.clone(), rewrite(&v, &mounts, &ip)));
        }
        env.extend(self.args.env.iter().cloned());
        // The container's termination-message file (the kubelet bind-mounts one at
        // terminationMessagePath): a host process cannot write /dev, so the worker is told the
        // local file's path.
        let termination_log = root.join("termination-log");
        env.push(("STREAMSCORE_TERMINATION_LOG".into(), termination_log.display().to_string()));
        let started_at = now();
        let mut restarts = 0i32;
        // The last termination, kept in lastState across restarts (as the kubelet does).
        let mut last_state: Option<serde_json::Value> = None;
        let mut backoff = Duration::from_secs(1);
        let log_path = root.join("container.log");
        let readiness = c.readiness_probe.clone();
        let ports: Vec<(String, i32)> =
            c.ports.iter().flatten().map(|p| (p.name.clone().unwrap_or_default(), p.container_port)).collect();
        let liveness = c.liveness_probe.clone();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let grace = spec.termination_grace_period_seconds.unwrap_or(30).max(1) as u64;
        loop {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
            std::fs::write(&termination_log, "")?;
            let mut child: Child = Command::new(binary)
                .args(&argv)
                .envs(env.iter().cloned())
                .current_dir(&root)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {}", binary.display()))?;
            let pid = child.id().unwrap_or(0) as i32;
            info!(pod = %format!("{ns}/{name}"), %ip, pid, restarts, "container started");
            let container_started = now();
            self.patch_status(&api, &name, &ip, &started_at, &container_started, false, restarts, last_state.clone())
                .await;
            let mut ready = false;
            let mut live_failures = 0;
            let mut ready_tick = tokio::time::interval(Duration::from_secs(
                readiness.as_ref().and_then(|p| p.period_seconds).unwrap_or(5).clamp(1, 5) as u64,
            ));
            let mut live_tick = tokio::time::interval(Duration::from_secs(
                liveness.as_ref().and_then(|p| p.period_seconds).unwrap_or(10).max(1) as u64,
            ));
            live_tick.tick().await;
            let exit = loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
                        if tokio::time::timeout(Duration::from_secs(grace), child.wait()).await.is_err() {
                            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                            let _ = child.wait().await;
                        }
                        info!(pod = %format!("{ns}/{name}"), "container stopped");
                        return Ok(());
                    }
                    status = child.wait() => break status?,
                    _ = ready_tick.tick() => {
                        let ok = match &readiness { Some(p) => probe(&http, p, &ip, &ports).await, None => true };
                        if ok != ready {
                            ready = ok;
                            self.patch_status(&api, &name, &ip, &started_at, &container_started, ready, restarts, last_state.clone()).await;
                        }
                    }
                    _ = live_tick.tick() => {
                        if let Some(p) = &liveness {
                            if probe(&http, p, &ip, &ports).await { live_failures = 0 } else { live_failures += 1 }
                            if live_failures >= p.failure_threshold.unwrap_or(3) {
                                warn!(pod = %name, "liveness probe failed: restarting");
                                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                            }
                        }
                    }
                }
            };
            let code = exit.code().unwrap_or(137);
            warn!(pod = %format!("{ns}/{name}"), code, "container exited");
            let policy = spec.restart_policy.clone().unwrap_or_else(|| "Always".into());
            let restart = policy == "Always" || (policy == "OnFailure" && code != 0);
            let message =
                termination_message(&termination_log, &log_path, code, c.termination_message_policy.as_deref());
            let terminated = json!({"terminated": {"exitCode": code, "reason": if code == 0 {"Completed"} else {"Error"},
                "message": message, "startedAt": container_started, "finishedAt": now()}});
            if !restart {
                let phase = if code == 0 { "Succeeded" } else { "Failed" };
                let st = json!({"status": {"phase": phase, "containerStatuses": [{"name": c.name, "image": image,
                    "imageID": "", "ready": false, "restartCount": restarts, "state": terminated}]}});
                let _ = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&st)).await;
                return Ok(());
            }
            restarts += 1;
            // Like the kubelet: waiting in CrashLoopBackOff until the back-off ends.
            let waiting = json!({"waiting": {"reason": "CrashLoopBackOff",
                "message": format!("back-off {}s restarting failed container={} pod={name}", backoff.as_secs(), c.name)}});
            last_state = Some(terminated);
            self.patch_status(&api, &name, &ip, &started_at, &container_started, false, restarts, last_state.clone())
                .await;
            self.patch_waiting(&api, &name, waiting).await;
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(20));
        }
    }

    /// Replaces the container's current state with `waiting` (after a `patch_status`).
    async fn patch_waiting(&self, api: &Api<Pod>, name: &str, waiting: serde_json::Value) {
        let Ok(pod) = api.get_status(name).await else { return };
        let Some(mut statuses) = pod.status.and_then(|s| s.container_statuses) else { return };
        for cs in &mut statuses {
            cs.state = serde_json::from_value(waiting.clone()).ok();
            cs.started = Some(false);
        }
        let patch = json!({"status": {"containerStatuses": statuses}});
        if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            warn!(pod = name, error = %e, "status update");
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn patch_status(
        &self,
        api: &Api<Pod>,
        name: &str,
        ip: &str,
        started: &str,
        container_started: &str,
        ready: bool,
        restarts: i32,
        last: Option<serde_json::Value>,
    ) {
        let r = if ready { "True" } else { "False" };
        let t = now();
        let pod = api.get(name).await.ok();
        let (cname, image) = pod
            .as_ref()
            .and_then(|p| p.spec.as_ref())
            .map(|s| (s.containers[0].name.clone(), s.containers[0].image.clone().unwrap_or_default()))
            .unwrap_or_default();
        let mut cs = json!({"name": cname, "image": image, "imageID": format!("local://{image}"),
            "containerID": format!("local://{name}"), "ready": ready, "started": true, "restartCount": restarts,
            "state": {"running": {"startedAt": container_started}}});
        if let Some(l) = last {
            cs["lastState"] = l;
        }
        let status = json!({"status": {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": ip, "podIPs": [{"ip": ip}], "startTime": started,
            "conditions": [
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                {"type": "Initialized", "status": "True", "lastTransitionTime": started},
                {"type": "ContainersReady", "status": r, "lastTransitionTime": t},
                {"type": "Ready", "status": r, "lastTransitionTime": t}
            ],
            "containerStatuses": [cs]
        }});
        if let Err(e) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await {
            warn!(pod = name, error = %e, "status update");
        }
    }
}

/// A terminated container's message, as the kubelet makes it: the termination-message file
/// (at most 4,096 bytes), or with `FallbackToLogsOnError` and a failure, the log's last 80 lines
/// (at most 2,048 bytes) when the file is empty.
fn termination_message(file: &Path, log: &Path, code: i32, policy: Option<&str>) -> String {
    let text = std::fs::read(file).unwrap_or_default();
    let text = String::from_utf8_lossy(&text[..text.len().min(4096)]).into_owned();
    if !text.trim().is_empty() || code == 0 || policy != Some("FallbackToLogsOnError") {
        return text;
    }
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(80)..].join("\n");
    let mut start = tail.len().saturating_sub(2048);
    while !tail.is_char_boundary(start) {
        start += 1;
    }
    tail[start..].to_owned()
}

/// Rewrites container paths to local directories and the wildcard address to the pod IP.
/// One pass over the original text: a replacement is never rewritten again (a local directory
/// under `/tmp` must not match a `/tmp` mount). A mount path matches only where a path starts
/// and only when followed by `/`, the end, or a non-path character.
fn rewrite(s: &str, mounts: &[(String, PathBuf)], ip: &str) -> String {
    let s = s.replace("0.0.0.0:", &format!("{ip}:"));
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    'outer: while i < s.len() {
        let at_start = i == 0 || matches!(bytes[i - 1], b' ' | b'=' | b':' | b'"' | b'\'' | b'\n' | b',' | b'[');
        if at_start && bytes[i] == b'/' {
            for (mount, dir) in mounts {
                let end = i + mount.len();
                if s[i..].starts_with(mount.as_str())
                    && (end == s.len()
                        || !(bytes[end].is_ascii_alphanumeric() || matches!(bytes[end], b'-' | b'_' | b'.')))
                {
                    out.push_str(&dir.display().to_string());
                    i = end;
                    continue 'outer;
                }
            }
        }
        let ch = s[i..].chars().next().expect("in bounds");
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

async fn probe(
    http: &reqwest::Client,
    p: &k8s_openapi::api::core::v1::Probe,
    ip: &str,
    ports: &[(String, i32)],
) -> bool {
    let Some(g) = &p.http_get else { return true };
    let port = match &g.port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => *n,
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => {
            match ports.iter().find(|(n, _)| n == name) {
                Some((_, p)) => *p,
                None => return false,
            }
        }
    };
    let url = format!("http://{ip}:{port}{}", g.path.as_deref().unwrap_or("/"));
    http.get(url).send().await.is_ok_and(|r| r.status().is_success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrite_is_one_pass_and_respects_path_boundaries() {
        let mounts = vec![
            ("/etc/streamscore/pipeline".to_owned(), PathBuf::from("/tmp/x/volumes/pipeline")),
            ("/tmp".to_owned(), PathBuf::from("/tmp/x/volumes/tmp")),
        ];
        assert_eq!(
            rewrite("--pipeline /etc/streamscore/pipeline/pipeline.yaml", &mounts, "127.0.0.9"),
            "--pipeline /tmp/x/volumes/pipeline/pipeline.yaml"
        );
        assert_eq!(
            rewrite("dir: /tmp/a listen: 0.0.0.0:8080", &mounts, "127.0.0.9"),
            "dir: /tmp/x/volumes/tmp/a listen: 127.0.0.9:8080"
        );
        assert_eq!(rewrite("/tmpfoo", &mounts, "ip"), "/tmpfoo");
    }
}
