#!/usr/bin/env bash
# `make test`: install what is missing, start a private local environment
# (.dev/test, ports from 28000), run fmt, clippy and every unit and integration
# test against it, and stop the environment whatever happens.
. "$(dirname "$0")/lib.sh"
export STREAMSCORE_DEV_DIR="${STREAMSCORE_TEST_DEV_DIR:-$ROOT/.dev/test}"
export STREAMSCORE_PORT_BASE="${STREAMSCORE_TEST_PORT_BASE:-28000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"

bash "$ROOT/scripts/install-deps.sh"
# The tests of model.runtime onnxruntime load it (and so do the workers they start).
ORT_DYLIB_PATH=$(onnxruntime_lib)
export ORT_DYLIB_PATH
grep -qx "ENV ORT_DYLIB_PATH=/usr/lib/streamscore/libonnxruntime.so.$ONNXRUNTIME_VERSION" Dockerfile.worker ||
  die "Dockerfile.worker's ORT_DYLIB_PATH must name ONNX Runtime $ONNXRUNTIME_VERSION (env/versions.env)"
cleanup() { bash "$ROOT/scripts/env.sh" down || true; }
trap cleanup EXIT INT TERM

cd "$ROOT"
log "shellcheck"
shellcheck -x scripts/*.sh e2e/kind/kind.sh .ci/run
log "helm template of the kind values"
bash "$ROOT/scripts/build-k8s.sh" helm
"$HELM_BIN/helm" template streamscore charts/streamscore -f e2e/kind/values.yaml >/dev/null
log "cargo fmt --check"
cargo fmt --all -- --check
log "building (first build on a machine compiles RocksDB and librdkafka: ~25 min on 2 cores)"
cargo build --workspace --all-targets --locked
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
log "the operator and worker images (make images), run under containerd and runc"
bash "$ROOT/scripts/test-images.sh"
bash "$ROOT/scripts/env.sh" up
# shellcheck disable=SC1091
. "$STREAMSCORE_DEV_DIR/env.sh"
log "cargo test"
cargo test --workspace --locked -- --test-threads "${STREAMSCORE_TEST_THREADS:-4}"
# The local node's cases run in their own environment (.dev/node-test, ports from 29000), inside
# its network namespace; this one is stopped first (2 cores).
bash "$ROOT/scripts/env.sh" down
if [[ $(id -u) -eq 0 ]]; then
  log "the end-to-end cases on the local node: kubelet, containerd, runc, kube-proxy, kube-router"
  bash "$ROOT/scripts/test-node.sh"
else
  log "SKIPPED the local node's cases (scripts/test-node.sh): they run as root"
fi
