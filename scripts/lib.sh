#!/usr/bin/env bash
# Shared helpers for streamscore's development scripts.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=../env/versions.env
. "$ROOT/env/versions.env"
CACHE="${STREAMSCORE_CACHE:-$HOME/.cache/streamscore}"
DEV="${STREAMSCORE_DEV_DIR:-$ROOT/.dev}"
export GOPATH="${GOPATH:-$HOME/.cache/streamscore/go}"
export GOMODCACHE="${GOMODCACHE:-$GOPATH/pkg/mod}"
export GOCACHE="${GOCACHE:-$HOME/.cache/streamscore/go-build}"
export GOFLAGS="${GOFLAGS:--mod=mod}"
mkdir -p "$CACHE" "$DEV"

log() { printf '[streamscore] %s\n' "$*" >&2; }
die() { printf '[streamscore] error: %s\n' "$*" >&2; exit 1; }

# python_venv PREFIX REQUIREMENTS [PROGRAM]: a virtualenv under $CACHE named venv-PREFIX<digest of
# the requirements file>, created (and the requirements installed from PyPI) when bin/PROGRAM
# (default python) is missing; prints its path.
python_venv() {
  local req=$2 program=${3:-python} venv
  venv="$CACHE/venv-$1$(sha256sum "$2" | cut -c1-12)"
  if [[ ! -x $venv/bin/$program ]]; then
    log "creating Python virtualenv $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
  fi
  printf '%s\n' "$venv"
}

# onnxruntime_lib: ONNX Runtime's shared library, taken from PyPI's onnxruntime wheel (no
# dependencies, nothing else of it is used) into $CACHE once; prints the versioned file, the
# value of ORT_DYLIB_PATH.
onnxruntime_lib() {
  local dir="$CACHE/onnxruntime-$ONNXRUNTIME_VERSION"
  local lib="$dir/onnxruntime/capi/libonnxruntime.so.$ONNXRUNTIME_VERSION"
  if [[ ! -f $lib ]]; then
    log "fetching ONNX Runtime $ONNXRUNTIME_VERSION (PyPI wheel)"
    rm -rf "$dir" "$dir.pip"
    # A virtualenv only for its pip (the one python_venv relies on too), removed afterwards.
    python3 -m venv "$dir.pip" >&2
    "$dir.pip/bin/pip" install -q --disable-pip-version-check --no-deps --target "$dir" \
      "onnxruntime==$ONNXRUNTIME_VERSION" >&2
    rm -rf "$dir.pip"
    [[ -f $lib ]] || die "the onnxruntime $ONNXRUNTIME_VERSION wheel has no $lib"
  fi
  printf '%s\n' "$lib"
}

# shellcheck disable=SC2034  # used by the scripts that source this file
K8S_BIN="$CACHE/kubernetes-v$KUBERNETES_VERSION/bin"
# shellcheck disable=SC2034
ETCD_BIN="$CACHE/etcd-v$ETCD_VERSION/bin"
# shellcheck disable=SC2034
HELM_BIN="$CACHE/helm-v$HELM_VERSION/bin"
# shellcheck disable=SC2034
PROMTOOL_BIN="$CACHE/prometheus-$PROMETHEUS_VERSION/bin"
# shellcheck disable=SC2034
KAFKA_LIBS="$CACHE/kafka-$KAFKA_VERSION/libs"
# shellcheck disable=SC2034
KUBE_ROUTER_BIN="$CACHE/kube-router-v$KUBE_ROUTER_VERSION/bin"
# shellcheck disable=SC2034
WEED_BIN="$CACHE/seaweedfs-$SEAWEEDFS_VERSION/bin"

# ensure_packages PKG...: installs the Debian packages that are missing (as install-deps.sh does).
ensure_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  local sudo=""
  [[ $(id -u) -ne 0 ]] && sudo=sudo
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
    $sudo apt-get update >/dev/null
    $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null
  }
}

# The local environment's processes (scripts/env.sh, scripts/node.sh): each started in its own
# session with its log in $LOGS/<name>.log and its pid in $PIDS/<name>.pid.
LOGS="$DEV/logs"; PIDS="$DEV/pids"

running() { local f="$PIDS/$1.pid"; [[ -f $f ]] && kill -0 "$(cat "$f")" 2>/dev/null; }

start() { # name command...
  local name=$1; shift
  if running "$name"; then return 0; fi
  mkdir -p "$LOGS" "$PIDS"
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$PIDS/$name.pid"
}

wait_for() { # name timeout-seconds check-command...
  local name=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if ! running "$name"; then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$name exited during start-up (log: $LOGS/$name.log)"
    fi
    if (( SECONDS > deadline )); then
      tail -n 30 "$LOGS/$name.log" >&2 || true
      die "$name did not answer within ${timeout}s (log: $LOGS/$name.log)"
    fi
    sleep 0.5
  done
}

stop_one() { # name [signal]
  local name=$1 sig=${2:-TERM} pid
  [[ -f $PIDS/$name.pid ]] || return 0
  pid=$(cat "$PIDS/$name.pid")
  if kill -0 "$pid" 2>/dev/null; then
    kill "-$sig" -- "-$pid" 2>/dev/null || kill "-$sig" "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$PIDS/$name.pid"
}

# demo_node: what runs the demo's pods: "kubelet" (the local node, scripts/node.sh) as root
# where a network namespace can be made, otherwise the node agent ("agent (why)");
# STREAMSCORE_DEMO_NODE=agent chooses the node agent.
demo_node() {
  if [[ ${STREAMSCORE_DEMO_NODE:-} == agent ]]; then echo "agent (STREAMSCORE_DEMO_NODE=agent)"; return; fi
  if [[ $(id -u) -ne 0 ]]; then echo "agent (the local node needs root)"; return; fi
  if ! unshare --net true 2>/dev/null; then echo "agent (no network namespaces here)"; return; fi
  echo kubelet
}

# containerd_config DIR SOCKET [PLUGIN...]: the start of a private containerd's config.toml: its
# root and state under DIR, its socket, no debug or metrics endpoint, the snapshotters and
# tracing this machine has no use for disabled, and the PLUGINs too.
containerd_config() {
  local dir=$1 sock=$2 p disabled=""
  shift 2
  for p in "$@" io.containerd.tracing.processor.v1.otlp io.containerd.internal.v1.tracing \
    io.containerd.snapshotter.v1.aufs io.containerd.snapshotter.v1.btrfs \
    io.containerd.snapshotter.v1.devmapper io.containerd.snapshotter.v1.zfs; do
    disabled+="${disabled:+, }\"$p\""
  done
  cat <<EOF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = [$disabled]
[grpc]
  address = "$sock"
[debug]
  address = ""
[metrics]
  address = ""
EOF
}
