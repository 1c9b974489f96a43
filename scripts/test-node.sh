#!/usr/bin/env bash
# The end-to-end cases on the local node (part of `make test`; scripts/node.sh): the images
# built by `make images`, imported into the node's containerd, installed with Helm; the
# operator runs in-cluster under the chart's RBAC (its ServiceAccount's token), its workers as
# runc containers in their own network namespaces on the CNI bridge, and kube-router enforces
# the NetworkPolicies the operator writes. Cases:
#  - the fraud example scores every event (the broker at its PODS listener, checkpoints in the
#    S3 gateway), its pods are containers (own network namespace, non-root, read-only root);
#  - the workers' NetworkPolicy: a worker reaches the broker, not the API server (the operator,
#    under its own policy, does);
#  - what the status says: an image that does not exist (ImagePullBackOff), a memory limit too
#    small (OOMKilled), a pod that cannot be scheduled (Pending, the scheduler's message);
#  - a worker that stops answering its liveness probe is restarted by the kubelet;
#  - a model ConfigMap edited in place: the kubelet swaps the mounted file (`..data`), the
#    running worker keeps the model it loaded, the status says the digest no longer matches,
#    and putting the ConfigMap back clears it;
#  - blue/green while events flow: a model-only change cut over (the operator drives the
#    workers' admin API across the pod network and their NetworkPolicy), a model that scores
#    NaN rolled back by its ErrorRate gate;
#  - a second tenant (the personalization example) scores its own stream in its own namespace;
#    its worker cannot reach fraud's workers, and fraud's workers reach each other's query port
#    but not their admin port;
#  - the Rust end-to-end cases of rescale (2 → 4 → 1, features exact), blue/green (good and
#    broken models, exact cut-over), the operator killed at every step, suspend/resume, a
#    candidate container restarted by the kubelet during the cut-over, and a live worker
#    stopped (SIGSTOP) through a rollback, on this node.
#
# Environment: STREAMSCORE_NODE_TEST_DIR (default .dev/node-test), STREAMSCORE_NODE_TEST_PORT_BASE
# (default 29000), NODE_TEST_KEEP=1 leaves the environment running. Needs root and the binaries
# of `cargo build` (scripts/test.sh builds them first).
. "$(dirname "$0")/lib.sh"
export STREAMSCORE_DEV_DIR="${STREAMSCORE_NODE_TEST_DIR:-$ROOT/.dev/node-test}"
export STREAMSCORE_PORT_BASE="${STREAMSCORE_NODE_TEST_PORT_BASE:-29000}"
export STREAMSCORE_NETNS=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
DEV="$STREAMSCORE_DEV_DIR"
# shellcheck source=env-vars.sh
. "$ROOT/scripts/env-vars.sh"
cd "$ROOT"
t0=$SECONDS
[[ $(id -u) -eq 0 ]] || die "scripts/test-node.sh runs as root (the node: containerd, runc, iptables)"
BIN="$CARGO_TARGET_DIR/debug"
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
failures=0
ok() { printf '[streamscore]   ok  %s\n' "$*" >&2; }
fail() {
  printf '[streamscore]   FAIL %s\n' "$*" >&2
  failures=$((failures + 1))
}

cleanup() {
  local rc=$?
  set +e
  if ((rc != 0 || failures != 0)) && [[ -f $DEV/env.sh ]]; then
    log "state at the failure:"
    kubectl get tm,deploy,pods -A -o wide >&2
    kubectl get events -A --sort-by=.lastTimestamp 2>/dev/null | tail -30 >&2
    tail -20 "$DEV/logs/kubelet.log" >&2
  fi
  if [[ -z ${NODE_TEST_KEEP:-} ]]; then bash "$ROOT/scripts/env.sh" down >/dev/null 2>&1; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ -d $DEV ]]; then bash scripts/env.sh down >/dev/null || die "could not stop the environment an earlier run left in $DEV"; fi
rm -rf "$DEV"
bash scripts/env.sh up >/dev/null
bash scripts/node.sh up
# shellcheck disable=SC1091
. "$DEV/env.sh"
mapfile -t archives < <(bash scripts/images.sh build)
((${#archives[@]} == 2)) || die "scripts/images.sh did not build both images"
bash scripts/node.sh import "${archives[@]}"
log "node and images ready in $((SECONDS - t0)) s"

kafka_tool() { java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" "$@"; }
topic() {
  kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
    --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1 >/dev/null
}
in_ns() { "${NSX[@]}" "$@"; }
ctr_() { in_ns ctr -a "$DEV/node/containerd.sock" -n k8s.io "$@"; }
# tcp_open NETNS_FILE HOST PORT: a TCP connection from that network namespace within 3 s.
tcp_open() { nsenter "--net=$1" timeout 3 bash -c "exec 3<>/dev/tcp/$2/$3" 2>/dev/null; }
# container_pid NAMESPACE POD_PREFIX CONTAINER: the host PID of that running container.
container_pid() {
  local id info
  for id in $(ctr_ containers ls -q); do
    info=$(ctr_ containers info "$id")
    if python3 -c '
import json, sys
l = json.load(sys.stdin)["Labels"]
ns, pod, c = sys.argv[1:4]
ok = l.get("io.kubernetes.pod.namespace") == ns and l.get("io.kubernetes.pod.name", "").startswith(pod) \
    and l.get("io.kubernetes.container.name") == c
sys.exit(0 if ok else 1)' "$1" "$2" "$3" <<<"$info"; then
      ctr_ tasks ls | awk -v id="$id" '$1 == id && $3 == "RUNNING" { print $2 }'
      return 0
    fi
  done
}
# tm_json NAME EXTRA_JSON: the fraud example as TenantModel NAME, its own output topics, this
# environment's addresses, EXTRA_JSON merged into its spec.
tm_json() {
  sed -e "s|kafka.kafka.svc:9092|$STREAMSCORE_KAFKA_PODS|" -e "s|s3://streamscore/|s3://$STREAMSCORE_S3_BUCKET/|" \
    examples/fraud-detection.yaml | kubectl create --dry-run=client -o json -f - | python3 -c '
import json, sys
tm = json.load(sys.stdin)
name, extra = sys.argv[1], json.loads(sys.argv[2])
tm["metadata"] = {"name": name}
if name != "fraud":
    s = tm["spec"]
    s["parallelism"] = 1
    s["sink"] = {"topic": name + "-scored", "deadLetterTopic": name + "-dlq"}
    s["features"].pop("emitted", None)
    s.pop("upgrade", None)
tm["spec"].update(extra)
print(json.dumps(tm))' "$1" "$2"
}
phase_reason() {
  kubectl -n payments get tm "$1" -o jsonpath='{.status.phase}/{.status.conditions[?(@.type=="Ready")].reason}' 2>/dev/null
}
# wait_reason NAME PHASE/REASON-REGEX TIMEOUT: until the TenantModel's phase/Ready reason matches.
wait_reason() {
  local got deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    got=$(phase_reason "$1")
    [[ $got =~ ^($2)$ ]] && { printf '%s\n' "$got"; return 0; }
    sleep 1
  done
  printf '%s\n' "$got"
  return 1
}

log "helm install (operator image, chart RBAC, workers' NetworkPolicy with egress)"
kubectl create namespace payments >/dev/null
kubectl create namespace recs >/dev/null
helm install streamscore charts/streamscore -n streamscore-system --create-namespace \
  --set image.repository=streamscore-operator --set "image.tag=$VERSION" --set image.pullPolicy=Never \
  --set workerImage.repository=streamscore-worker --set "workerImage.tag=$VERSION" \
  --set logFormat=plain --set 'watchNamespaces={payments,recs}' \
  --set 'tenantPolicy.allowedImages={streamscore-missing:*}' \
  --set "workerNetworkPolicy.egress.objectStorePorts={$S3_PORT}" \
  --set workerResources.requests.cpu=100m \
  --wait --timeout 3m >/dev/null
op_pod=$(kubectl -n streamscore-system get pods -l app.kubernetes.io/name=streamscore-operator -o jsonpath='{.items[0].metadata.name}')
sa=$(kubectl -n streamscore-system get pod "$op_pod" -o jsonpath='{.spec.serviceAccountName}')
if [[ $sa == streamscore-* ]] && ! kubectl -n streamscore-system get pod "$op_pod" -o json | grep -q KUBECONFIG; then
  ok "the operator runs in-cluster as pod $op_pod, ServiceAccount $sa (no kubeconfig)"
else
  fail "operator pod $op_pod: ServiceAccount '$sa'"
fi

for t in payments:4 payments-scored:4 payments-dlq:1 payments-features:4; do topic "${t%%:*}" "${t##*:}"; done
kubectl -n payments create configmap fraud-model --from-file=model.onnx=models/fraud-logreg.onnx >/dev/null
kubectl -n payments create secret generic checkpoint-credentials --from-literal=AWS_ENDPOINT="$STREAMSCORE_S3_PODS" \
  --from-literal=AWS_ALLOW_HTTP=true --from-literal=AWS_REGION="$AWS_REGION" \
  --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" >/dev/null
kubectl -n payments label secret checkpoint-credentials streamscore.io/tenant-access=true >/dev/null
tm_json fraud '{}' | kubectl -n payments apply -f - >/dev/null
if got=$(wait_reason fraud 'Running/[A-Za-z]*' 240) && kubectl -n payments wait --for=condition=Ready tm/fraud --timeout=60s >/dev/null; then
  ok "tm/fraud Ready on the node: $got"
else
  fail "tm/fraud not Ready: $got"
fi

N=3000
log "producing $N events"
"$BIN/streamscore-loadgen" gen --topic payments --count "$N" --users 200 --seed 7 >/dev/null
scored=$(kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --topic payments-scored --from-beginning --isolation-level read_committed --max-messages "$N" --timeout-ms 120000 \
  2>/dev/null | wc -l)
if ((scored == N)); then ok "$scored/$N events scored by the workers in containers"; else fail "$scored/$N events scored"; fi

# The worker as a container: its own network namespace (neither the host's nor the node's),
# a runc shim for parent, non-root, read-only root file system.
wpid=$(container_pid payments fraud- worker)
if [[ -n $wpid ]]; then
  host_ns=$(readlink /proc/self/ns/net)
  node_ns=$(in_ns readlink /proc/self/ns/net)
  pod_ns=$(readlink "/proc/$wpid/ns/net")
  parent=$(ps -o comm= -p "$(ps -o ppid= -p "$wpid" | tr -d ' ')")
  uid=$(awk '/^Uid:/ {print $2}' "/proc/$wpid/status")
  root_opts=$(awk '$5 == "/" {print $6}' "/proc/$wpid/mountinfo" | head -1)
  if [[ $pod_ns != "$host_ns" && $pod_ns != "$node_ns" && $parent == containerd-shim* && $uid == 65532 && $root_opts == ro* ]]; then
    ok "worker pid $wpid: network namespace $pod_ns (host $host_ns, node $node_ns), parent $parent, uid $uid, root $root_opts"
  else
    fail "worker pid $wpid: netns $pod_ns (host $host_ns, node $node_ns), parent $parent, uid $uid, root $root_opts"
  fi
else
  fail "no running worker container of tm/fraud"
fi

# NetworkPolicies, enforced by kube-router: the worker reaches the broker, not the API server
# (neither its Service address nor the node's); the operator's pod reaches the API server.
if [[ -n $wpid ]]; then
  opid=$(container_pid streamscore-system streamscore- operator)
  if tcp_open "/proc/$wpid/ns/net" "$NODE_IP" "$KAFKA_PODS_PORT"; then
    ok "worker → broker $NODE_IP:$KAFKA_PODS_PORT connects"
  else
    fail "worker → broker $NODE_IP:$KAFKA_PODS_PORT refused or dropped"
  fi
  if tcp_open "/proc/$wpid/ns/net" 10.96.0.1 443 || tcp_open "/proc/$wpid/ns/net" "$NODE_IP" "$APISERVER_PORT"; then
    fail "worker → API server connects (the workers' NetworkPolicy is not enforced)"
  else
    ok "worker → API server (10.96.0.1:443, $NODE_IP:$APISERVER_PORT) dropped by the workers' NetworkPolicy"
  fi
  if [[ -n $opid ]] && tcp_open "/proc/$opid/ns/net" 10.96.0.1 443; then
    ok "operator → API server 10.96.0.1:443 connects (kube-proxy's Service)"
  else
    fail "operator (pid '$opid') → API server 10.96.0.1:443 does not connect"
  fi
fi

# A query through any worker: the one that does not own the key forwards it to the owner, across
# the workers' NetworkPolicy (egress to their peers' query port only), and every answer names
# the same owner.
answers=()
ips=$(kubectl -n payments get pods -l streamscore.io/tenantmodel=fraud --field-selector=status.phase=Running \
  -o jsonpath='{.items[*].status.podIP}')
for ip in $ips; do
  head=$(in_ns curl -s -m 5 -o /dev/null -D - "$ip:8080/v1/entities/user-42" | tr -d '\r')
  code=$(printf '%s\n' "$head" | awk 'NR == 1 {print $2}')
  owner=$(printf '%s\n' "$head" | awk -F': ' 'tolower($1) == "x-streamscore-owner" {print $2}')
  answers+=("$ip:$code:$owner")
done
owners=$(printf '%s\n' "${answers[@]}" | awk -F: '$2 == 200 {print $3}' | sort -u)
if ((${#answers[@]} >= 2)) && [[ $(printf '%s\n' "${answers[@]}" | grep -c ':200:') == "${#answers[@]}" ]] &&
  [[ $(printf '%s\n' "$owners" | wc -l) == 1 && -n $owners ]]; then
  ok "GET /v1/entities/user-42 answered 200 by every worker (${answers[*]}), owner $owners"
else
  fail "queries through each worker: ${answers[*]:-none}"
fi

# A second tenant in its own namespace (the personalization example, another model): it scores
# its own stream beside fraud's, and the NetworkPolicies keep the tenants apart: its worker
# reaches the broker, not fraud's workers; fraud's workers reach each other's query port only.
for t in clicks:2 clicks-scored:2 clicks-dlq:1; do topic "${t%%:*}" "${t##*:}"; done
kubectl -n recs create configmap recs-model --from-file=model.onnx=models/fraud-mlp.onnx >/dev/null
sed -e "s|kafka.kafka.svc:9092|$STREAMSCORE_KAFKA_PODS|" examples/personalization.yaml | kubectl -n recs apply -f - >/dev/null
if kubectl -n recs wait --for=condition=Ready tm/propensity --timeout=180s >/dev/null; then
  "$BIN/streamscore-loadgen" gen --topic clicks --count 2000 --users 100 --seed 8 >/dev/null
  clicks=$(kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
    --topic clicks-scored --from-beginning --max-messages 2000 --timeout-ms 90000 2>/dev/null | grep -c '"propensity"')
  if ((clicks == 2000)); then ok "tm/propensity (namespace recs): 2000/2000 clicks scored by its MLP"; else fail "tm/propensity: $clicks/2000 clicks scored"; fi
else
  fail "tm/propensity not Ready: $(phase_reason propensity)"
fi
rpid=$(container_pid recs propensity- worker)
read -r -a fraud_ips <<<"$ips"
if [[ -n $rpid && -n $wpid && ${#fraud_ips[@]} -ge 2 ]]; then
  mine=$(nsenter "--net=/proc/$wpid/ns/net" ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
  peer=${fraud_ips[0]}
  [[ $peer == "$mine" ]] && peer=${fraud_ips[1]}
  if tcp_open "/proc/$rpid/ns/net" "$NODE_IP" "$KAFKA_PODS_PORT"; then ok "recs worker → broker connects"; else fail "recs worker → broker dropped"; fi
  if tcp_open "/proc/$rpid/ns/net" "$peer" 8080; then
    fail "recs worker → fraud worker $peer:8080 connects (tenants are not isolated)"
  else
    ok "recs worker → fraud worker $peer:8080 dropped (another tenant's namespace)"
  fi
  if tcp_open "/proc/$wpid/ns/net" "$peer" 8080; then
    ok "fraud worker → its peer $peer:8080 connects (query forwarding)"
  else
    fail "fraud worker → its peer $peer:8080 dropped"
  fi
  if tcp_open "/proc/$wpid/ns/net" "$peer" 8090; then
    fail "fraud worker → its peer's admin port $peer:8090 connects (only the operator may)"
  else
    ok "fraud worker → its peer's admin port $peer:8090 dropped (the operator's only)"
  fi
else
  fail "no worker containers to check tenant isolation (recs '$rpid', fraud '$wpid', fraud pods: ${fraud_ips[*]:-none})"
fi

# What the status says, from the pods the kubelet reports.
tm_json missing-image '{"image": "streamscore-missing:'"$VERSION"'"}' | kubectl -n payments apply -f - >/dev/null
tm_json oom '{"resources": {"requests": {"cpu": "50m", "memory": "12Mi"}, "limits": {"memory": "12Mi"}}}' \
  | kubectl -n payments apply -f - >/dev/null
tm_json unschedulable '{"resources": {"requests": {"cpu": "64", "memory": "64Mi"}}}' | kubectl -n payments apply -f - >/dev/null
for c in "missing-image Degraded/(ImagePullBackOff|ErrImagePull)" "oom Degraded/OOMKilled" "unschedulable Pending/Unschedulable"; do
  name=${c%% *}
  if got=$(wait_reason "$name" "${c#* }" 120); then
    msg=$(kubectl -n payments get tm "$name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].message}')
    ok "tm/$name: $got: $msg"
  else
    fail "tm/$name: phase/reason '$got', want ${c#* }"
  fi
done
if kubectl -n payments get tm -o wide | grep -q 'ImagePullBackOff\|ErrImagePull'; then
  ok "kubectl get tm shows the reason: $(kubectl -n payments get tm missing-image --no-headers | tr -s ' ')"
else
  fail "kubectl get tm has no REASON ImagePullBackOff: $(kubectl -n payments get tm missing-image --no-headers)"
fi
kubectl -n payments delete tm missing-image oom unschedulable --wait=false >/dev/null

# Liveness: a worker that stops answering (SIGSTOP) is killed by the kubelet and restarted.
if [[ -n $wpid ]]; then
  pod=$(kubectl -n payments get pods -l streamscore.io/tenantmodel=fraud -o json | python3 -c '
import json, sys
for p in json.load(sys.stdin)["items"]:
    for c in p["status"].get("containerStatuses", []):
        if c["name"] == "worker" and c.get("containerID", "").split("//")[-1]:
            print(p["metadata"]["name"], c["containerID"].split("//")[-1]); break' | while read -r p cid; do
    if [[ $(ctr_ tasks ls | awk -v id="$cid" '$1 == id {print $2}') == "$wpid" ]]; then echo "$p"; fi
  done)
  kill -STOP "$wpid"
  log "worker pid $wpid of pod $pod stopped (SIGSTOP); waiting for its liveness probe to fail (period 10 s, 6 failures)"
  # The kubelet kills it (event Killing "failed liveness probe"); SIGCONT then lets the stopped
  # process take the pending SIGTERM (a graceful stop instead of the 60 s grace period's SIGKILL).
  killed=""
  for _ in $(seq 1 180); do
    if kubectl -n payments get events --field-selector "involvedObject.name=$pod,reason=Killing" -o jsonpath='{.items[*].message}' \
      | grep -q 'failed liveness probe'; then
      killed=yes
      break
    fi
    sleep 1
  done
  kill -CONT "$wpid" 2>/dev/null
  restarted=""
  if [[ -n $killed ]]; then
    for _ in $(seq 1 120); do
      if [[ $(kubectl -n payments get pod "$pod" -o jsonpath='{.status.containerStatuses[?(@.name=="worker")].restartCount}') -ge 1 ]]; then
        restarted=yes
        break
      fi
      sleep 1
    done
  fi
  if [[ -n $restarted ]]; then
    ok "pod $pod: liveness probe failed, the kubelet killed and restarted the worker (restartCount ≥ 1)"
  else
    fail "pod $pod: not restarted by its liveness probe (killed: ${killed:-no})"
  fi
  if kubectl -n payments wait --for=condition=Ready tm/fraud --timeout=120s >/dev/null; then
    "$BIN/streamscore-loadgen" gen --topic payments --count 1000 --users 200 --seed 8 >/dev/null
    scored=$(kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
      --topic payments-scored --from-beginning --isolation-level read_committed --max-messages $((N + 1000)) \
      --timeout-ms 120000 2>/dev/null | wc -l)
    if ((scored >= N + 1000)); then ok "after the restart: $scored outputs for $((N + 1000)) events"; else fail "after the restart: $scored outputs for $((N + 1000)) events"; fi
  else
    fail "tm/fraud not Ready again after the liveness restart"
  fi
fi

# A model ConfigMap edited in place, seen through the kubelet's atomic `..data` swap.
logreg_sha=$(sha256sum models/fraud-logreg.onnx | cut -d' ' -f1)
mlp_sha=$(sha256sum models/fraud-mlp.onnx | cut -d' ' -f1)
kubectl -n payments create configmap swap-model --from-file=model.onnx=models/fraud-logreg.onnx >/dev/null
tm_json swap '{"model": {"configMap": {"name": "swap-model", "key": "model.onnx"}, "sha256": "'"$logreg_sha"'", "version": "swap-1",
  "features": ["tx_1h", "amount_24h", "rides_1h", "event.amount"], "outputs": [{"name": "fraud", "output": 0, "column": 0}]}}' \
  | kubectl -n payments apply -f - >/dev/null
if got=$(wait_reason swap 'Running/WorkersAvailable' 120); then
  spid=$(container_pid payments swap- worker)
  mounted() { sha256sum "/proc/$spid/root/etc/streamscore/model/model.onnx" 2>/dev/null | cut -d' ' -f1; }
  data_link() { readlink "/proc/$spid/root/etc/streamscore/model/..data" 2>/dev/null; }
  link0=$(data_link)
  kubectl -n payments create configmap swap-model --from-file=model.onnx=models/fraud-mlp.onnx --dry-run=client -o yaml \
    | kubectl -n payments replace -f - >/dev/null
  swapped=""
  for _ in $(seq 1 90); do
    if [[ $(mounted) == "$mlp_sha" ]]; then swapped=yes; break; fi
    sleep 1
  done
  got=$(wait_reason swap 'Degraded/ModelDigestMismatch' 60)
  if [[ -n $swapped && $(data_link) != "$link0" && $got == Degraded/ModelDigestMismatch ]] \
    && [[ $(kubectl -n payments get pods -l streamscore.io/tenantmodel=swap -o jsonpath='{.items[0].status.containerStatuses[0].ready}') == true ]] \
    && [[ -d /proc/$spid ]]; then
    ok "ConfigMap edited in place: the kubelet swapped ..data ($link0 → $(data_link)), the worker (pid $spid) runs on with its loaded model and stays ready, tm/swap $got"
  else
    fail "ConfigMap edited in place: swapped '${swapped:-no}' (..data $link0 → $(data_link)), tm/swap '$got'"
  fi
  kubectl -n payments create configmap swap-model --from-file=model.onnx=models/fraud-logreg.onnx --dry-run=client -o yaml \
    | kubectl -n payments replace -f - >/dev/null
  if got=$(wait_reason swap 'Running/WorkersAvailable' 90); then
    ok "ConfigMap put back: tm/swap $got"
  else
    fail "ConfigMap put back: tm/swap '$got'"
  fi
else
  fail "tm/swap not Running: '$got'"
fi
kubectl -n payments delete tm swap --wait=false >/dev/null

# Blue/green on the node, events flowing (300/s in the background).
"$BIN/streamscore-loadgen" gen --topic payments --count 60000 --users 200 --rate 300 --seed 9 >/dev/null 2>&1 &
gen_pid=$!
# upgrade_result VERSION TIMEOUT: status.lastUpgrade's result once its toVersion is VERSION.
upgrade_result() {
  local got deadline=$((SECONDS + $2))
  while ((SECONDS < deadline)); do
    got=$(kubectl -n payments get tm fraud -o jsonpath='{.status.lastUpgrade.toVersion} {.status.lastUpgrade.result}')
    if [[ $got == "$1 "?* ]]; then printf '%s\n' "${got#* }"; return 0; fi
    sleep 2
  done
  printf 'none (%s)\n' "$(kubectl -n payments get tm fraud -o jsonpath='{.status.upgrade.phase} {.status.operation.message}')"
}
before=$(kubectl -n payments get tm fraud -o jsonpath='{.status.activeColor}')
kubectl -n payments patch tm fraud --type merge -p '{"spec":{"model":{"version":"logreg-v2"}}}' >/dev/null
result=$(upgrade_result logreg-v2 300)
after=$(kubectl -n payments get tm fraud -o jsonpath='{.status.activeColor}')
if [[ $result == Succeeded && $after != "$before" ]]; then
  ok "blue/green logreg-2026-11 → logreg-v2: $result, live colour $before → $after ($(kubectl -n payments get tm fraud -o jsonpath='{.status.lastUpgrade.message}'))"
else
  fail "blue/green to logreg-v2: result '$result', colour $before → $after"
fi
kubectl -n payments create configmap nan-model --from-file=model.onnx=models/nan-score.onnx >/dev/null
nan_sha=$(sha256sum models/nan-score.onnx | cut -d' ' -f1)
kubectl -n payments patch tm fraud --type merge \
  -p '{"spec":{"model":{"configMap":{"name":"nan-model","key":"model.onnx"},"sha256":"'"$nan_sha"'","version":"nan-v3"}}}' >/dev/null
result=$(upgrade_result nan-v3 300)
if [[ $result == RolledBack ]] && [[ $(kubectl -n payments get tm fraud -o jsonpath='{.status.activeColor}') == "$after" ]]; then
  ok "blue/green to a NaN-scoring model: $result ($(kubectl -n payments get tm fraud -o jsonpath='{.status.lastUpgrade.message}'))"
else
  fail "blue/green to nan-v3: result '$result'"
fi
kill "$gen_pid" 2>/dev/null
wait "$gen_pid" 2>/dev/null || true
kubectl -n payments delete tm fraud --wait=false >/dev/null

# The Rust end-to-end cases (tests/tests/e2e_local.rs) on this node: the test binary runs
# inside the network namespace (pod, broker and S3 addresses are reachable there only), its
# operator out of cluster as in the node agent runs, the workers as containers of the imported
# image under the NetworkPolicies the operator writes (kube-router enforcing them).
E2E_CASES=(
  scaling_a_tenantmodel_moves_each_partition_with_its_state
  upgrading_a_model_goes_through_shadow_and_gates_to_an_exact_cut_over_or_rolls_back
  an_operator_killed_at_every_step_of_a_rescale_and_an_upgrade_loses_and_duplicates_nothing
  a_suspended_tenantmodel_stops_after_a_checkpoint_and_resumes_from_it
  a_candidate_restarted_during_the_cut_over_stays_paused_until_it_goes_live
  a_rollback_asks_a_live_worker_that_missed_its_resume_again
)
e2e_bin=$(cargo test --workspace --locked --test e2e_local --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "e2e_local" and m.get("executable"):
        print(m["executable"])')
[[ -x $e2e_bin ]] || die "the e2e_local test binary was not built"
for case in "${E2E_CASES[@]}"; do
  started=$SECONDS
  if in_ns env STREAMSCORE_E2E_NODE=real "STREAMSCORE_E2E_WORKER_IMAGE=streamscore-worker:$VERSION" \
    "KAFKA_BOOTSTRAP_SERVERS=$STREAMSCORE_KAFKA_PODS" "AWS_ENDPOINT=$STREAMSCORE_S3_PODS" \
    'STREAMSCORE_WORKER_RESOURCES={"requests":{"cpu":"100m"}}' \
    "STREAMSCORE_WORKER_EGRESS={\"objectStorePorts\":[$S3_PORT]}" \
    "$e2e_bin" --exact "$case" --test-threads 1 --nocapture >"$DEV/logs/e2e-$case.log" 2>&1; then
    ok "$case on the node ($((SECONDS - started)) s): $(grep -E '^(rescale|upgrade|operator crashed at [0-9]|v[0-9]:)' "$DEV/logs/e2e-$case.log" | tail -2 | tr '\n' ' ' | cut -c1-300)"
  else
    fail "$case on the node ($((SECONDS - started)) s):"
    grep -E 'panicked|^thread|left:|right:|timed out' "$DEV/logs/e2e-$case.log" | head -8 >&2
  fi
done

if ((failures)); then die "$failures case(s) failed on the local node"; fi
log "the local node's cases passed in $((SECONDS - t0)) s"
