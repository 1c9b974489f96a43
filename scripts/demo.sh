#!/usr/bin/env bash
# `make demo`: the most complete streamscore that runs on this machine today.
#
#  1. starts the local environment (Kafka + Kubernetes control plane) and builds streamscore;
#  2. installs the TenantModel CRD, runs the operator against the local API server and applies
#     two tenants' TenantModels (fraud detection, personalization);
#  3. runs each tenant's worker as a local process from the pipeline ConfigMap the operator
#     rendered (there is no kubelet here yet, so the worker pods themselves stay Pending);
#  4. produces a realistic event stream with some malformed records and shows: `kubectl get tm`,
#     scored records, dead letters with reasons, a query API answer and worker metrics.
#
# DEMO_KEEP=1 keeps everything running until Ctrl-C; otherwise it stops what it started.
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
cd "$ROOT"
t0=$SECONDS
"$ROOT/scripts/install-deps.sh"
"$ROOT/scripts/env.sh" up
# shellcheck disable=SC1091
. "$DEV/env.sh"
log "building streamscore (cold: ~25 min; warm: seconds)"
cargo build -q --bins
BIN="$CARGO_TARGET_DIR/debug"
DEMO="$DEV/demo"; rm -rf "$DEMO"; mkdir -p "$DEMO"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  if [[ -z ${DEMO_KEEP:-} ]]; then "$ROOT/scripts/env.sh" down; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

kafka_tool() { java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" "$@"; }
topic() { kafka_tool org.apache.kafka.tools.TopicCommand --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --create --if-not-exists --topic "$1" --partitions "$2" --replication-factor 1 >/dev/null; }

log "installing the CRD and starting the operator"
kubectl apply --server-side -f charts/streamscore/files/crds/tenantmodels.yaml >/dev/null
kubectl wait --for condition=established crd/tenantmodels.streamscore.io --timeout=30s >/dev/null
"$BIN/streamscore-operator" --listen 127.0.0.1:0 --leader-elect=false --worker-image streamscore-worker:demo \
  > "$DEMO/operator.log" 2>&1 &
pids+=($!)

declare -A MODEL=([payments]=fraud-logreg [recs]=fraud-mlp)
declare -A TM=([payments]=fraud [recs]=propensity)
declare -A CM=([payments]=fraud-model [recs]=recs-model)
declare -A EX=([payments]=fraud-detection [recs]=personalization)
declare -A IN=([payments]=payments [recs]=clicks)
declare -A PORT=([payments]=$((STREAMSCORE_PORT_BASE + 180)) [recs]=$((STREAMSCORE_PORT_BASE + 181)))
for ns in payments recs; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n "$ns" create configmap "${CM[$ns]}" --from-file=model.onnx="models/${MODEL[$ns]}.onnx" \
    --dry-run=client -o yaml | kubectl apply --server-side -f - >/dev/null
  kubectl -n "$ns" apply -f "examples/${EX[$ns]}.yaml" >/dev/null
done
for ns in payments recs; do
  for _ in $(seq 1 60); do
    kubectl -n "$ns" get configmap "${TM[$ns]}-pipeline" -o jsonpath='{.data.pipeline\.yaml}' > "$DEMO/$ns.yaml" 2>/dev/null && [[ -s $DEMO/$ns.yaml ]] && break
    sleep 0.5
  done
  [[ -s $DEMO/$ns.yaml ]] || die "the operator did not render ${TM[$ns]}-pipeline (see $DEMO/operator.log)"
  in=${IN[$ns]}
  topic "$in" 4; topic "$in-scored" 4; topic "${in}-dlq" 1
  STREAMSCORE_PIPELINE="$DEMO/$ns.yaml" STREAMSCORE_BOOTSTRAP_SERVERS="$KAFKA_BOOTSTRAP_SERVERS" \
    STREAMSCORE_STATE_DIR="$DEMO/state-$ns" STREAMSCORE_HTTP_LISTEN="127.0.0.1:${PORT[$ns]}" \
    STREAMSCORE_MODEL_PATH="$ROOT/models/${MODEL[$ns]}.onnx" \
    "$BIN/streamscore-worker" > "$DEMO/worker-$ns.log" 2>&1 &
  pids+=($!)
done
for ns in payments recs; do
  for _ in $(seq 1 120); do curl -sf "127.0.0.1:${PORT[$ns]}/readyz" >/dev/null && break; sleep 0.5; done
  curl -sf "127.0.0.1:${PORT[$ns]}/readyz" >/dev/null || { tail "$DEMO/worker-$ns.log"; die "worker of $ns not ready"; }
done

log "producing events: 20000 payments (1 in 1000 malformed), 20000 clicks"
"$BIN/streamscore-loadgen" gen --topic payments --count 20000 --users 500 --malformed-every 1000 --seed 1
"$BIN/streamscore-loadgen" gen --topic clicks --count 20000 --users 500 --seed 2
for ns in payments recs; do
  want=20000
  for _ in $(seq 1 120); do
    got=$(curl -s "127.0.0.1:${PORT[$ns]}/metrics" | awk '/^streamscore_worker_records_in_total/ {print $2}')
    [[ ${got%.*} -ge $want ]] && break; sleep 0.5
  done
done
sleep 1

echo; echo "== kubectl get tm -A   (worker pods stay Pending: no kubelet on this machine)"
kubectl get tm -A
echo; echo "== scored records (payments-scored, first 3)"
kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --topic payments-scored --from-beginning --max-messages 3 2>/dev/null
echo; echo "== dead-lettered records (payments-dlq, with headers)"
kafka_tool org.apache.kafka.tools.consumer.ConsoleConsumer --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" \
  --topic payments-dlq --from-beginning --max-messages 3 --property print.headers=true 2>/dev/null
echo; echo "== query API: GET /v1/entities/user-42 on the recs worker"
curl -s "127.0.0.1:${PORT[recs]}/v1/entities/user-42"; echo
echo; echo "== worker metrics (payments)"
curl -s "127.0.0.1:${PORT[payments]}/metrics" | grep -E '^streamscore_worker_(records_(in|out)_total|dead_letters_total\{reason="malformed"|commits_total)'
log "demo finished in $((SECONDS - t0))s"
if [[ -n ${DEMO_KEEP:-} ]]; then
  log "DEMO_KEEP set: everything keeps running (. $DEV/env.sh); Ctrl-C stops it"
  wait
fi
