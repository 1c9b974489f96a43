#!/usr/bin/env bash
# `make demo`: streamscore end to end on this machine:
#
#  1. starts the local environment (Kafka + Kubernetes control plane) and builds streamscore;
#  2. as root (where a network namespace can be made): starts the local node (scripts/node.sh:
#     kubelet, containerd, runc, kube-proxy, kube-router) inside the environment's network
#     namespace and imports the images `make images` builds; otherwise (or with
#     STREAMSCORE_DEMO_NODE=agent) the node agent, a test/dev harness that runs the pods
#     scheduled to it as local processes, mapping the images to the binaries just built. It
#     says which;
#  3. installs streamscore with Helm: the CRD, RBAC and the operator Deployment, whose pod the
#     node runs;
#  4. applies two tenants' TenantModels (fraud detection, personalization); the operator
#     creates their worker Deployments, whose pods the agent runs;
#  5. produces a realistic event stream (users, actions, amounts, fraud-like bursts, malformed
#     records) and shows `kubectl get tm`, scored records, dead letters with reasons, a query
#     API answer and worker metrics;
#  6. scales the fraud TenantModel 2 → 3 and follows the rescale's steps (status.operation).
#
# DEMO_KEEP=1 keeps everything running until Ctrl-C; otherwise it stops what it started.
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
cd "$ROOT"
t0=$SECONDS
NODE=$(demo_node)
if [[ $NODE == kubelet ]]; then export STREAMSCORE_NETNS=1; fi
# shellcheck source=env-vars.sh
. "$ROOT/scripts/env-vars.sh"
bash "$ROOT/scripts/install-deps.sh"
bash "$ROOT/scripts/env.sh" up
# shellcheck disable=SC1091
. "$DEV/env.sh"
log "building streamscore (cold: ~25 min; warm: seconds)"
cargo build -q --bins
BIN="$CARGO_TARGET_DIR/debug"
# Where pods reach the broker and the S3 gateway.
PODS_KAFKA=$KAFKA_BOOTSTRAP_SERVERS
PODS_S3=$AWS_ENDPOINT
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
DEMO="$DEV/demo"; rm -rf "$DEMO"; mkdir -p "$DEMO"
agent_pid=""
# The tenants' namespaces are deleted while the node agent still runs: their pods are only
# gone once the agent (the kubelet's part) has stopped them, and a namespace stays Terminating
# until then, where the next run could not create anything.
cleanup() {
  set +e
  helm uninstall streamscore -n streamscore-system --wait --timeout 60s >/dev/null 2>&1
  kubectl delete ns payments recs --ignore-not-found --timeout=120s >/dev/null 2>&1 \
    || log "the tenants' namespaces are still terminating; the next make demo waits for them"
  if [[ -n $agent_pid ]]; then kill -TERM "$agent_pid" 2>/dev/null; wait "$agent_pid" 2>/dev/null; fi
  if [[ $NODE == kubelet && -z ${DEMO_KEEP:-} ]]; then bash "$ROOT/scripts/node.sh" down >/dev/null; fi
  if [[ -z ${DEMO_KEEP:-} ]]; then bash "$ROOT/scripts/env.sh" down; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kafka_tool() { java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" "$@"; }
topic() { kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1 >/dev/null; }

helm_node=()
if [[ $NODE == kubelet ]]; then
  log "the local node: a kubelet, containerd and runc run the pods, in the network namespace $NETNS"
  bash "$ROOT/scripts/node.sh" up
  mapfile -t archives < <(bash "$ROOT/scripts/images.sh" build)
  bash "$ROOT/scripts/node.sh" import "${archives[@]}"
  PODS_KAFKA=$STREAMSCORE_KAFKA_PODS
  PODS_S3=$STREAMSCORE_S3_PODS
  # The node has this machine's 2 CPUs: workers request 100m (not 500m) so that the rescale to
  # 3 fits beside the other tenant.
  helm_node=(--set "image.tag=$VERSION" --set "workerNetworkPolicy.egress.objectStorePorts={$S3_PORT}"
    --set workerResources.requests.cpu=100m)
else
  log "the node agent (no kubelet: pods run as local processes on 127.0.77.x; $NODE)"
  "$BIN/streamscore-node-agent" --node-name streamscore-demo --work-dir "$DEMO/node" --subnet 77 \
    --image "streamscore-worker=$BIN/streamscore-worker" --image "streamscore-operator=$BIN/streamscore-operator" \
    --env "KUBECONFIG=$KUBECONFIG" > "$DEMO/node-agent.log" 2>&1 &
  agent_pid=$!
  helm_node=(--set image.tag=demo)
fi

# Namespaces an interrupted earlier run left Terminating: the agent now runs and stops their
# pods, then they go.
for ns in payments recs; do
  if [[ $(kubectl get ns "$ns" -o jsonpath='{.status.phase}' 2>/dev/null) == Terminating ]]; then
    log "waiting for namespace $ns (left by an earlier run) to be deleted"
    kubectl wait --for=delete "ns/$ns" --timeout=180s >/dev/null || die "namespace $ns is stuck terminating"
  fi
done

log "helm install streamscore (CRD, RBAC, operator)"
for ns in streamscore-system payments recs; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
done
# Objects of an earlier `kubectl apply -f manifests/` (the chart rendered with this release's
# name and namespace) or the CRD left by `make test`: the Helm release adopts them.
adopt() { # kind/name [namespace]
  local ns=(); [[ -n ${2:-} ]] && ns=(-n "$2")
  kubectl "${ns[@]}" label "$1" app.kubernetes.io/managed-by=Helm --overwrite >/dev/null
  kubectl "${ns[@]}" annotate "$1" meta.helm.sh/release-name=streamscore \
    meta.helm.sh/release-namespace=streamscore-system --overwrite >/dev/null
}
if ! helm status streamscore -n streamscore-system >/dev/null 2>&1; then
  while read -r obj ns; do
    if [[ -n $obj && $obj != Namespace/* ]]; then adopt "$obj" "$ns"; fi
  done < <(kubectl get -f manifests/streamscore.yaml --ignore-not-found \
    -o jsonpath='{range .items[*]}{.kind}/{.metadata.name} {.metadata.namespace}{"\n"}{end}' 2>/dev/null)
  if kubectl get crd tenantmodels.streamscore.io >/dev/null 2>&1; then adopt crd/tenantmodels.streamscore.io; fi
fi
helm upgrade --install streamscore charts/streamscore -n streamscore-system \
  --set image.repository=streamscore-operator "${helm_node[@]}" --set logFormat=plain \
  --set 'watchNamespaces={payments,recs}' >/dev/null
kubectl wait --for condition=established crd/tenantmodels.streamscore.io --timeout=60s >/dev/null
kubectl -n streamscore-system rollout status deployment/streamscore-streamscore-operator --timeout=120s

declare -A MODEL=([payments]=fraud-logreg [recs]=fraud-mlp)
declare -A TM=([payments]=fraud [recs]=propensity)
declare -A CM=([payments]=fraud-model [recs]=recs-model)
declare -A EX=([payments]=fraud-detection [recs]=personalization)
declare -A IN=([payments]=payments [recs]=clicks)
for ns in payments recs; do
  in=${IN[$ns]}
  topic "$in" 4; topic "$in-scored" 4; topic "$in-dlq" 1
  if [[ $ns == payments ]]; then topic payments-features 4; fi
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n "$ns" create configmap "${CM[$ns]}" --from-file=model.onnx="models/${MODEL[$ns]}.onnx" \
    --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null
  # The S3 gateway's endpoint and keys for spec.checkpointSecret, opted in by the platform team.
  kubectl -n "$ns" create secret generic checkpoint-credentials --from-literal=AWS_ENDPOINT="$PODS_S3" \
    --from-literal=AWS_ALLOW_HTTP=true --from-literal=AWS_REGION="$AWS_REGION" \
    --from-literal=AWS_ACCESS_KEY_ID="$AWS_ACCESS_KEY_ID" --from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY" \
    --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null
  kubectl -n "$ns" label secret checkpoint-credentials streamscore.io/tenant-access=true --overwrite >/dev/null
  sed -e "s|kafka.kafka.svc:9092|$PODS_KAFKA|" -e "s|s3://streamscore/|s3://$STREAMSCORE_S3_BUCKET/|" \
    "examples/${EX[$ns]}.yaml" | kubectl -n "$ns" apply -f - >/dev/null
done
log "waiting for both TenantModels to be Ready"
for ns in payments recs; do
  kubectl -n "$ns" wait --for=condition=Ready "tm/${TM[$ns]}" --timeout=180s >/dev/null \
    || { kubectl get tm -A; tail -20 "$DEMO/node-agent.log" 2>/dev/null; die "tm/${TM[$ns]} did not become Ready"; }
done

log "producing events: 20000 payments (1 in 1000 malformed), 20000 clicks"
"$BIN/streamscore-loadgen" gen --topic payments --count 20000 --users 500 --malformed-every 1000 --seed 1
"$BIN/streamscore-loadgen" gen --topic clicks --count 20000 --users 500 --seed 2
pod_ips() { kubectl -n "$1" get pods -l "streamscore.io/tenantmodel=$2" -o jsonpath='{.items[*].status.podIP}'; }
for ns in payments recs; do
  for _ in $(seq 1 120); do
    total=0
    for ip in $(pod_ips "$ns" "${TM[$ns]}"); do
      n=$("${NSX[@]}" curl -s "$ip:8080/metrics" | awk '/^streamscore_worker_records_in_total/ {print $2}')
      total=$((total + ${n%.*}))
    done
    [[ $total -ge 20000 ]] && break; sleep 0.5
  done
done
sleep 1

echo; echo "== kubectl get tm -A"
kubectl get tm -A
if [[ $NODE == kubelet ]]; then
  echo; echo "== worker pods (runc containers on the local node $NODE_NAME)"
else
  echo; echo "== worker pods (run by the node agent as local processes)"
fi
kubectl get pods -n payments -o wide; kubectl get pods -n recs -o wide
echo; echo "== scored records (payments-scored, first 3)"
kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --topic payments-scored --from-beginning --max-messages 3 2>/dev/null
echo; echo "== dead-lettered records (payments-dlq, with headers)"
kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --topic payments-dlq --from-beginning --max-messages 3 --property print.headers=true 2>/dev/null
echo; echo "== query API: GET /v1/entities/user-42 (recs) through every pod; one that does not own the key forwards to its owner"
for ip in $(pod_ips recs propensity); do
  printf '%s → ' "$ip"
  "${NSX[@]}" curl -s -D - "$ip:8080/v1/entities/user-42" | tr -d '\r' | awk 'tolower($1) == "x-streamscore-owner:" {printf "owner %s: ", $2} /^\{/ {print}'
done
echo; echo "== worker metrics (payments)"
for ip in $(pod_ips payments fraud); do
  "${NSX[@]}" curl -s "$ip:8080/metrics" | grep -E '^streamscore_worker_(records_(in|out)_total|dead_letters_total\{reason="malformed"|commits_total)'
done
echo; echo "== kubectl scale tm fraud --replicas 3 (payments): drain + checkpoint, new count, restore"
kubectl -n payments scale tm fraud --replicas 3 >/dev/null
for _ in $(seq 1 240); do
  step=$(kubectl -n payments get tm fraud -o jsonpath='{.status.operation.message}')
  [[ -n $step && $step != "${last_step:-}" ]] && echo "  $step" && last_step=$step
  [[ $(kubectl -n payments get tm fraud -o jsonpath='{.status.lastRescale.to}') == 3 ]] && break
  sleep 0.5
done
kubectl -n payments get tm fraud -o jsonpath='  lastRescale: {.status.lastRescale}{"\n"}'
kubectl -n payments wait --for=condition=Ready tm/fraud --timeout=60s >/dev/null
kubectl -n payments get tm fraud -o wide
log "demo finished in $((SECONDS - t0))s"
if [[ -n ${DEMO_KEEP:-} ]]; then
  log "DEMO_KEEP set: everything keeps running (. $DEV/env.sh); Ctrl-C stops it"
  if [[ -n $agent_pid ]]; then wait "$agent_pid"; else sleep infinity; fi
fi
