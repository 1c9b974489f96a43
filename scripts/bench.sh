#!/usr/bin/env bash
# `make bench`: data-plane benchmarks (see BENCHMARKS.md for figures and method).
#   1. engine only: decode → features (RocksDB) → tract → JSON, no broker;
#   2. end to end against the local broker: pre-loaded topic → worker → acknowledged outputs,
#      at-least-once and exactly-once;
#   3. checkpoint (full, incremental) and restore of one partition's state via the S3 gateway;
#   4. rescale gap: worker processes drained through the admin API, new ones restore.
#   5. blue/green cut-over: green workers seeded from blue's checkpoints, the barrier protocol.
#   6. a tree model (LightGBM, 300 trees of depth 6) on ONNX Runtime, engine only and end to end.
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
export STREAMSCORE_DEV_DIR="$ROOT/.dev/bench" STREAMSCORE_PORT_BASE=29000
COUNT="${BENCH_COUNT:-1000000}"; USERS="${BENCH_USERS:-100000}"
cd "$ROOT"
bash "$ROOT/scripts/install-deps.sh"
cargo build -q --bin streamscore-loadgen --bin streamscore-operator --bin streamscore-worker
trap 'bash "$ROOT/scripts/env.sh" down' EXIT
# A fresh environment every run: state left by an earlier run (e.g. the operator benchmark's 500
# TenantModels and their children) would keep the control plane busy and skew every figure.
bash "$ROOT/scripts/env.sh" down >/dev/null 2>&1 || true
rm -rf "$STREAMSCORE_DEV_DIR"
bash "$ROOT/scripts/env.sh" up
# shellcheck disable=SC1091
. "$STREAMSCORE_DEV_DIR/env.sh"
topic="bench-$(date +%s)"
# pipeline_on TOPIC FILE [SED]: creates TOPIC and its output and dead-letter topics (6 partitions
# each: outputs go to existing topics, as in a deployment, not to topics the broker creates on the
# first record) and writes the bench pipeline reading it to FILE (SED: an extra sed expression).
pipeline_on() {
  local t
  for t in "$1" "$1-out" "$1-dlq"; do
    java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" org.apache.kafka.tools.TopicCommand \
      --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --create --topic "$t" --partitions 6 --replication-factor 1 >/dev/null
  done
  sed -e "s|@BOOTSTRAP@|$KAFKA_BOOTSTRAP_SERVERS|; s|@TOPIC@|$1|g; s|@ROOT@|$ROOT|" -e "${3:-}" bench/pipeline.yaml > "$2"
}
cfg="$STREAMSCORE_DEV_DIR/bench-pipeline.yaml"
pipeline_on "$topic" "$cfg"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $(uname -r)"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-engine --pipeline "$cfg" --count "$COUNT" --users "$USERS" --partitions 6
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-kafka --pipeline "$cfg" --count "$COUNT" --users "$USERS"
# The same with sink.delivery exactlyOnce (a Kafka transaction per commitInterval): its cost.
cfg5="$STREAMSCORE_DEV_DIR/bench-pipeline-eos.yaml"
pipeline_on "$topic-eos" "$cfg5" 's|deadLetterTopic: "\([^"]*\)"}|deadLetterTopic: "\1", delivery: exactlyOnce}|'
grep -q 'delivery: exactlyOnce' "$cfg5" || die "bench-pipeline-eos.yaml: sink.delivery not set"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-kafka --pipeline "$cfg5" --count "$COUNT" --users "$USERS"
# Latency at a steady input rate, on a fresh topic and consumer group.
RATE="${BENCH_RATE:-20000}"
cfg2="$STREAMSCORE_DEV_DIR/bench-pipeline-rate.yaml"
pipeline_on "$topic-rate" "$cfg2"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-kafka --pipeline "$cfg2" --count $((RATE * 20)) --users "$USERS" --rate "$RATE"
# Checkpoint and restore of one partition's state (1M keys by default) through the S3 gateway.
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-checkpoint --pipeline "$cfg" \
  --keys "${BENCH_CKPT_KEYS:-1000000}" --store "s3://$STREAMSCORE_S3_BUCKET"
# Rescale gap: 2 → 4 worker processes drained through the admin API, 1M keys of state.
cfg3="$STREAMSCORE_DEV_DIR/bench-pipeline-rescale.yaml"
pipeline_on "$topic-rescale" "$cfg3"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-rescale --pipeline "$cfg3" \
  --keys "${BENCH_RESCALE_KEYS:-1000000}" --from 2 --to 4 --store "s3://$STREAMSCORE_S3_BUCKET"
# Blue/green cut-over: green seeded from blue's checkpoints (1M keys), the barrier protocol.
cfg4="$STREAMSCORE_DEV_DIR/bench-pipeline-cutover.yaml"
pipeline_on "$topic-cutover" "$cfg4"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-cutover --pipeline "$cfg4" \
  --keys "${BENCH_CUTOVER_KEYS:-1000000}" --workers 2 --store "s3://$STREAMSCORE_S3_BUCKET"
# The tree model: 300 trees of depth 6 (LightGBM, trained here; make_models.py --bench-tree),
# `runtime: auto` → ONNX Runtime, output #1 column 1 (P(fraud)).
trees="$STREAMSCORE_DEV_DIR/bench-trees.onnx"
"$CACHE/venv/bin/python" models/make_models.py --bench-tree "$trees"
cfg6="$STREAMSCORE_DEV_DIR/bench-pipeline-trees.yaml"
pipeline_on "$topic-trees" "$cfg6" "s|path: \"$ROOT/models/fraud-mlp.onnx\"|path: \"$trees\"|; \
s|sha256: .*|sha256: $(sha256sum "$trees" | cut -d' ' -f1)|; s|version: mlp-bench|version: trees-bench\n  runtime: auto|; \
s|outputs: \[{name: fraud}\]|outputs: [{name: fraud, output: 1, column: 1}]|"
grep -q 'runtime: auto' "$cfg6" || die "bench-pipeline-trees.yaml: model.runtime not set"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-engine --pipeline "$cfg6" --count "$COUNT" --users "$USERS" --partitions 6
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-kafka --pipeline "$cfg6" --count "$COUNT" --users "$USERS"
bash "$ROOT/scripts/bench-operator.sh"
