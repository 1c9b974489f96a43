#!/usr/bin/env bash
# `make bench`: data-plane benchmarks (see BENCHMARKS.md for figures and method).
#   1. engine only: decode → features (RocksDB) → tract → JSON, no broker;
#   2. end to end against the local broker: pre-loaded topic → worker → acknowledged outputs;
#   3. checkpoint (full, incremental) and restore of one partition's state via the S3 gateway;
#   4. rescale gap: worker processes drained through the admin API, new ones restore.
#   5. blue/green cut-over: green workers seeded from blue's checkpoints, the barrier protocol.
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
java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" org.apache.kafka.tools.TopicCommand \
  --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --create --topic "$topic" --partitions 6 --replication-factor 1 >/dev/null
cfg="$STREAMSCORE_DEV_DIR/bench-pipeline.yaml"
sed -e "s|@BOOTSTRAP@|$KAFKA_BOOTSTRAP_SERVERS|; s|@TOPIC@|$topic|g; s|@ROOT@|$ROOT|" bench/pipeline.yaml > "$cfg"
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $(uname -r)"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-engine --pipeline "$cfg" --count "$COUNT" --users "$USERS" --partitions 6
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-kafka --pipeline "$cfg" --count "$COUNT" --users "$USERS"
# Latency at a steady input rate, on a fresh topic and consumer group.
RATE="${BENCH_RATE:-20000}"
topic2="$topic-rate"
java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" org.apache.kafka.tools.TopicCommand \
  --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --create --topic "$topic2" --partitions 6 --replication-factor 1 >/dev/null
cfg2="$STREAMSCORE_DEV_DIR/bench-pipeline-rate.yaml"
sed -e "s|@BOOTSTRAP@|$KAFKA_BOOTSTRAP_SERVERS|; s|@TOPIC@|$topic2|g; s|@ROOT@|$ROOT|" bench/pipeline.yaml > "$cfg2"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-kafka --pipeline "$cfg2" --count $((RATE * 20)) --users "$USERS" --rate "$RATE"
# Checkpoint and restore of one partition's state (1M keys by default) through the S3 gateway.
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-checkpoint --pipeline "$cfg" \
  --keys "${BENCH_CKPT_KEYS:-1000000}" --store "s3://$STREAMSCORE_S3_BUCKET"
# Rescale gap: 2 → 4 worker processes drained through the admin API, 1M keys of state.
topic3="$topic-rescale"
java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" org.apache.kafka.tools.TopicCommand \
  --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --create --topic "$topic3" --partitions 6 --replication-factor 1 >/dev/null
cfg3="$STREAMSCORE_DEV_DIR/bench-pipeline-rescale.yaml"
sed -e "s|@BOOTSTRAP@|$KAFKA_BOOTSTRAP_SERVERS|; s|@TOPIC@|$topic3|g; s|@ROOT@|$ROOT|" bench/pipeline.yaml > "$cfg3"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-rescale --pipeline "$cfg3" \
  --keys "${BENCH_RESCALE_KEYS:-1000000}" --from 2 --to 4 --store "s3://$STREAMSCORE_S3_BUCKET"
# Blue/green cut-over: green seeded from blue's checkpoints (1M keys), the barrier protocol.
topic4="$topic-cutover"
java -cp "$STREAMSCORE_KAFKA_CLASSPATH" -Dlog4j.configuration="$STREAMSCORE_KAFKA_LOG4J" org.apache.kafka.tools.TopicCommand \
  --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --create --topic "$topic4" --partitions 6 --replication-factor 1 >/dev/null
cfg4="$STREAMSCORE_DEV_DIR/bench-pipeline-cutover.yaml"
sed -e "s|@BOOTSTRAP@|$KAFKA_BOOTSTRAP_SERVERS|; s|@TOPIC@|$topic4|g; s|@ROOT@|$ROOT|" bench/pipeline.yaml > "$cfg4"
"$CARGO_TARGET_DIR/debug/streamscore-loadgen" bench-cutover --pipeline "$cfg4" \
  --keys "${BENCH_CUTOVER_KEYS:-1000000}" --workers 2 --store "s3://$STREAMSCORE_S3_BUCKET"
bash "$ROOT/scripts/bench-operator.sh"
