#!/usr/bin/env bash
# The end-to-end scenario on kind, for machines with a Docker engine (not run on the
# development machines of this repository, which have none; see README).
#
#   e2e/kind/kind.sh          build images, create the cluster, run the scenario
#   e2e/kind/kind.sh down     delete the cluster
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CLUSTER="${KIND_CLUSTER:-streamscore}"
VERSION="0.1.0"

if [[ ${1:-} == down ]]; then
  kind delete cluster --name "$CLUSTER"
  exit 0
fi
for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "kind.sh needs $tool" >&2; exit 1; }
done

docker build -f "$ROOT/Dockerfile.worker" -t "streamscore-worker:$VERSION" "$ROOT"
docker build -f "$ROOT/Dockerfile.operator" -t "streamscore-operator:$VERSION" "$ROOT"
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image --name "$CLUSTER" "streamscore-worker:$VERSION" "streamscore-operator:$VERSION"

kubectl apply -f "$ROOT/e2e/kind/kafka.yaml"
kubectl -n kafka rollout status statefulset/kafka --timeout=300s
kubectl create namespace payments --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install streamscore "$ROOT/charts/streamscore" -n streamscore-system --create-namespace \
  -f "$ROOT/e2e/kind/values.yaml" --wait --timeout 5m

kafka_exec() { kubectl -n kafka exec kafka-0 -- "$@"; }
for t in payments payments-scored payments-dlq payments-features; do
  kafka_exec /opt/kafka/bin/kafka-topics.sh --bootstrap-server localhost:9092 --create --if-not-exists \
    --topic "$t" --partitions 4 --replication-factor 1
done
kubectl -n payments create configmap fraud-model --from-file=model.onnx="$ROOT/models/fraud-logreg.onnx" \
  --dry-run=client -o yaml | kubectl apply -f -
sed 's|kafka.kafka.svc:9092|kafka-0.kafka.kafka.svc:9092|' "$ROOT/examples/fraud-detection.yaml" | kubectl -n payments apply -f -
kubectl -n payments wait --for=condition=Ready tm/fraud --timeout=300s

# Produce 1000 events and require 1000 scored records.
for i in $(seq 1 1000); do
  printf 'user-%d\t{"user_id":"user-%d","ts":%d,"amount":%d,"action":"view","merchant":"m1"}\n' \
    $((i % 50)) $((i % 50)) $(( 1795500000000 + i * 1000 )) $((i % 300))
done | kafka_exec /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server localhost:9092 --topic payments \
  --property parse.key=true --property key.separator=$'\t'
n=$(kafka_exec /opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server localhost:9092 --topic payments-scored \
  --from-beginning --max-messages 1000 --timeout-ms 120000 | wc -l)
[[ $n -eq 1000 ]] || { echo "expected 1000 scored records, got $n" >&2; exit 1; }
kubectl get tm -A
echo "kind scenario passed: 1000/1000 events scored"
