#!/usr/bin/env bash
# Operator benchmark (part of `make bench`): N TenantModels (default 500) applied at once; the
# time until every one has its children and a written status, the operator's peak RSS, and
# reconciles per second. Needs the environment of scripts/bench.sh (sourced env file).
. "$(dirname "$0")/lib.sh"
N="${BENCH_TENANTMODELS:-500}"
BIN="${CARGO_TARGET_DIR:-$CACHE/cargo-target}/debug"
ns="bench-op-$(date +%s)"
kubectl create namespace "$ns" >/dev/null
kubectl apply --server-side -f "$ROOT/charts/streamscore/files/crds/tenantmodels.yaml" >/dev/null
kubectl wait --for condition=established crd/tenantmodels.streamscore.io --timeout=60s >/dev/null
kubectl -n "$ns" create configmap model --from-file=model.onnx="$ROOT/models/fraud-mlp.onnx" >/dev/null
sha=$(sha256sum "$ROOT/models/fraud-mlp.onnx" | cut -d' ' -f1)
file="$STREAMSCORE_DEV_DIR/bench-tenantmodels.yaml"
for i in $(seq 1 "$N"); do
  cat <<Y
---
apiVersion: streamscore.io/v1alpha1
kind: TenantModel
metadata: {name: tm-$i}
spec:
  source: {bootstrapServers: "kafka:9092", topics: [in-$i], keyField: user_id, eventTime: {field: ts}}
  features: {windows: [{name: tx_1h, aggregation: count, window: 1h}]}
  model: {configMap: {name: model, key: model.onnx}, sha256: $sha, version: v1, features: [tx_1h], outputs: [{name: s}]}
  sink: {topic: out-$i, deadLetterTopic: dlq-$i}
Y
done > "$file"
port=$((STREAMSCORE_PORT_BASE + 181))
"$BIN/streamscore-operator" --namespaces "$ns" --leader-elect=false --listen "127.0.0.1:$port" > "$STREAMSCORE_DEV_DIR/bench-operator.log" 2>&1 &
op=$!
trap 'kill $op 2>/dev/null || true; kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 100); do curl -sf "127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
t0=$(date +%s.%N)
kubectl -n "$ns" apply --server-side -f "$file" >/dev/null
t_applied=$(date +%s.%N)
while :; do
  done_n=$(kubectl -n "$ns" get tm -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -c . || true)
  cms=$(kubectl -n "$ns" get configmap -l app.kubernetes.io/managed-by=streamscore-operator -o name | wc -l)
  deps=$(kubectl -n "$ns" get deployment -o name | wc -l)
  if [[ $done_n -ge $N && $cms -ge $N && $deps -ge $N ]]; then break; fi
  if (( $(date +%s) - ${t0%.*} > 600 )); then die "timed out: $done_n statuses, $cms ConfigMaps, $deps Deployments"; fi
  sleep 1
done
t1=$(date +%s.%N)
rss=$(awk '/VmHWM/ {print $2}' "/proc/$op/status")
reconciles=$(curl -s "127.0.0.1:$port/metrics" | awk '/^streamscore_operator_reconciles_total/ {print $2}')
awk -v n="$N" -v t0="$t0" -v ta="$t_applied" -v t1="$t1" -v rss="$rss" -v r="$reconciles" 'BEGIN {
  printf "bench-operator: %d TenantModels: all children + status in %.1f s after apply started (apply took %.1f s); %d reconciles (%.0f/s); operator peak RSS %.1f MB\n",
    n, t1 - t0, ta - t0, r, r / (t1 - t0), rss / 1024 }'
