#!/usr/bin/env bash
# `make bench-compare`: the reference pipeline (bench/pipeline.yaml) on streamscore-worker and on
# the same pipeline written as a Kafka Streams application (bench/kstreams/), on the same
# pre-loaded topic, measured from outside (see BENCHMARKS.md, "streamscore against Kafka Streams").
#
#   1. a broker of its own (.dev/bench-compare, ports from 30000), stopped on exit;
#   2. one input topic, 6 partitions, BENCH_COMPARE_COUNT events (default 2,000,000) of
#      BENCH_COMPARE_USERS users (default 100,000) from `streamscore-loadgen gen --seed 11`;
#   3. BENCH_COMPARE_RUNS runs (default 3); each runs both engines one after the other (the order
#      alternates), each with its own consumer group / application.id and output topic;
#   4. per engine: wall time from its start until its output and dead-letter topics hold one
#      record per event (the generator's producer may reorder a partition on a retry: events
#      then more than 5 s behind their partition's newest are late, and dead-lettered),
#      CPU seconds of its process (utime + stime from /proc), peak RSS (VmHWM); then stopped;
#   5. an independent checker (scripts/bench-compare.py check) recomputes the features and the
#      score of BENCH_COMPARE_SAMPLE records (default 2,000) of every output topic from the input;
#   6. a table per run and a summary.
# BENCH_COMPARE_NO_BUILD=1 uses the binaries already in $CARGO_TARGET_DIR/debug as they are.
# BENCH_COMPARE_JAVA_OPTS: JVM options of the Kafka Streams application (default -Xmx1g).
. "$(dirname "$0")/lib.sh"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
export STREAMSCORE_DEV_DIR="$ROOT/.dev/bench-compare" STREAMSCORE_PORT_BASE=30000
DEV="$STREAMSCORE_DEV_DIR"
COUNT="${BENCH_COMPARE_COUNT:-2000000}"; USERS="${BENCH_COMPARE_USERS:-100000}"
RUNS="${BENCH_COMPARE_RUNS:-3}"; SAMPLE="${BENCH_COMPARE_SAMPLE:-2000}"
JAVA_OPTS="${BENCH_COMPARE_JAVA_OPTS:--Xmx1g}"
BOOTSTRAP="127.0.0.1:$((STREAMSCORE_PORT_BASE + 92))"
KS="$ROOT/bench/kstreams"
WORKER="$CARGO_TARGET_DIR/debug/streamscore-worker"
LOADGEN="$CARGO_TARGET_DIR/debug/streamscore-loadgen"
cd "$ROOT"

bash "$ROOT/scripts/install-deps.sh"
if [[ ${BENCH_COMPARE_NO_BUILD:-} != 1 ]]; then
  cargo build -q --bin streamscore-loadgen --bin streamscore-worker
fi
[[ -x $WORKER && -x $LOADGEN ]] || die "$WORKER or $LOADGEN missing (build them, or unset BENCH_COMPARE_NO_BUILD)"

# The Kafka Streams application (Maven repository: ~/.m2; offline once it is filled).
log "building bench/kstreams"
rm -rf "$KS/target/lib"
(cd "$KS" && { mvn -q -B -o package 2>/dev/null || mvn -q -B package; }) || die "building bench/kstreams failed"
KS_CP="$KS/target/classes:$KS/target/lib/*"

# The checker's virtualenv, keyed by its requirements file.
venv=$(python_venv bench-compare- "$ROOT/scripts/requirements-bench-compare.txt")
PY=("$venv/bin/python" "$ROOT/scripts/bench-compare.py")

# Only the broker is needed. A fresh one every time, stopped on exit.
bash "$ROOT/scripts/fetch-kafka.sh"
bash "$ROOT/scripts/env.sh" down >/dev/null 2>&1 || true
rm -rf "$DEV"
mkdir -p "$DEV/logs" "$DEV/state" "$DEV/bin"
# Copies of the binaries: every run measures the same build, even if the target dir is rebuilt
# meanwhile.
cp "$WORKER" "$LOADGEN" "$DEV/bin/"
log "streamscore-worker built $(date -u -r "$WORKER" +%Y-%m-%dT%H:%MZ)"
WORKER="$DEV/bin/streamscore-worker"; LOADGEN="$DEV/bin/streamscore-loadgen"
engine_pid=""
cleanup() {
  if [[ -n $engine_pid ]] && kill -0 "$engine_pid" 2>/dev/null; then kill -KILL "$engine_pid" 2>/dev/null || true; fi
  bash "$ROOT/scripts/env.sh" down
}
trap cleanup EXIT
bash "$ROOT/scripts/env.sh" kafka-start

topic="compare-$(date +%s)"
"${PY[@]}" create-topics --bootstrap "$BOOTSTRAP" --partitions 6 "$topic" "$topic-semantics"
log "pre-loading $COUNT events of $USERS users into $topic"
"$LOADGEN" gen --bootstrap "$BOOTSTRAP" --topic "$topic" --count "$COUNT" --users "$USERS" --seed 11

# The worker's pipeline: bench/pipeline.yaml on INPUT with NAME's group, output topics and
# state dir.
render_pipeline() { # input name file
  local in=$1 base=$2 file=$3
  sed -e "s|@BOOTSTRAP@|$BOOTSTRAP|; s|@ROOT@|$ROOT|" \
    -e "s|groupId: \"@TOPIC@-bench\"|groupId: \"$base\"|" \
    -e "s|sink: {topic: \"@TOPIC@-out\", deadLetterTopic: \"@TOPIC@-dlq\"}|sink: {topic: \"$base-out\", deadLetterTopic: \"$base-dlq\"}|" \
    -e "s|stateDir: /tmp/streamscore-bench-state|stateDir: $DEV/state/$base|" \
    -e "s|@TOPIC@|$in|g" bench/pipeline.yaml > "$file"
  if ! { grep -q "groupId: \"$base\"" "$file" && grep -q "topic: \"$base-out\"" "$file" \
    && grep -q "stateDir: $DEV/state/$base" "$file"; }; then
    die "bench/pipeline.yaml changed: could not set the group, sink and state dir in $file"
  fi
}

# run_engine ENGINE INPUT NAME COUNT: runs ENGINE (streamscore or kafka-streams) on INPUT with
# its own group / application.id NAME and output topics NAME-out and NAME-dlq, waits until they
# hold COUNT records together (every input handled: scored, or dead-lettered as late or
# invalid), measures the process, stops it; writes the measurement (a JSON object) to
# $DEV/measurement.json.
run_engine() {
  local engine=$1 in=$2 base=$3 count=$4 cmd
  "${PY[@]}" create-topics --bootstrap "$BOOTSTRAP" --partitions 6 "$base-out" "$base-dlq"
  if [[ $engine == streamscore ]]; then
    render_pipeline "$in" "$base" "$DEV/$base.yaml"
    cmd=("$WORKER" --pipeline "$DEV/$base.yaml")
  else
    # shellcheck disable=SC2206  # JAVA_OPTS is a list of options
    cmd=(java $JAVA_OPTS -cp "$KS_CP" -Dorg.slf4j.simpleLogger.defaultLogLevel=warn
      io.streamscore.bench.kstreams.Main --bootstrap "$BOOTSTRAP" --input "$in" --output "$base-out"
      --dead-letters "$base-dlq" --application-id "$base" --state-dir "$DEV/state/$base"
      --weights "$KS/fraud-mlp-weights.json" --model "$ROOT/models/fraud-mlp.onnx")
  fi
  local start m
  start=$(date +%s.%N)
  "${cmd[@]}" >"$DEV/logs/$base.log" 2>&1 &
  engine_pid=$!
  if ! m=$("${PY[@]}" wait --bootstrap "$BOOTSTRAP" --topic "$base-out" --topic "$base-dlq" --count "$count" \
    --pid "$engine_pid" --start "$start"); then
    tail -n 30 "$DEV/logs/$base.log" >&2
    die "$engine did not write $count records to $base-out and $base-dlq (log: $DEV/logs/$base.log)"
  fi
  kill -TERM "$engine_pid" 2>/dev/null || true
  for _ in $(seq 1 120); do kill -0 "$engine_pid" 2>/dev/null || break; sleep 0.25; done
  kill -KILL "$engine_pid" 2>/dev/null || true
  wait "$engine_pid" 2>/dev/null || true
  engine_pid=""
  rm -rf "$DEV/state/$base"
  printf '%s\n' "$m" > "$DEV/measurement.json"
}

# Semantics first: a small stream whose event times span weeks (the benchmark's span only ~30
# minutes, inside every window), with events on bucket boundaries and window edges, late and
# invalid records. Both engines' outputs are checked record by record.
log "semantics: both engines on $topic-semantics (window edges, expiry, late and invalid events)"
"${PY[@]}" gen-semantics --bootstrap "$BOOTSTRAP" --topic "$topic-semantics"
run_engine streamscore "$topic-semantics" "$topic-semantics-worker" 30000
run_engine kafka-streams "$topic-semantics" "$topic-semantics-kstreams" 30000
"${PY[@]}" check --bootstrap "$BOOTSTRAP" --input "$topic-semantics" --sample 1000000 \
  --weights "$KS/fraud-mlp-weights.json" ${BENCH_COMPARE_CHECK_PERTURB:+--perturb "$BENCH_COMPARE_CHECK_PERTURB"} \
  --outputs "streamscore=$topic-semantics-worker-out" "kafka-streams=$topic-semantics-kstreams-out"

busy=0
for p in rustc cargo cc1plus cc1 ld go; do busy=$((busy + $(pgrep -c -x "$p" || true))); done
echo "machine: $(nproc) cores, $(free -g | awk '/Mem/ {print $2}') GiB, $(uname -r); $(date -u +%Y-%m-%dT%H:%MZ);" \
  "$COUNT events, $USERS users, $RUNS runs; compiler processes running at the start: $busy;" \
  "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
outputs=()
for run in $(seq 1 "$RUNS"); do
  # The order alternates, so that neither engine always runs on a broker that just worked.
  if (( run % 2 == 1 )); then order=(streamscore kafka-streams); else order=(kafka-streams streamscore); fi
  for engine in "${order[@]}"; do
    base="$topic-$engine-$run"
    run_engine "$engine" "$topic" "$base" "$COUNT"
    m=$(cat "$DEV/measurement.json")
    echo "{\"engine\": \"$engine\", \"run\": $run, \"m\": $m}" >> "$DEV/results.jsonl"
    log "$engine run $run: $m"
    outputs+=("$engine-$run=$base-out")
    sleep 3
  done
done

"${PY[@]}" report --count "$COUNT" "$DEV/results.jsonl"
log "checking $SAMPLE sampled outputs of every output topic against the input"
"${PY[@]}" check --bootstrap "$BOOTSTRAP" --input "$topic" --sample "$SAMPLE" \
  --weights "$KS/fraud-mlp-weights.json" ${BENCH_COMPARE_CHECK_PERTURB:+--perturb "$BENCH_COMPARE_CHECK_PERTURB"} \
  --outputs "${outputs[@]}"
