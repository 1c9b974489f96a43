#!/usr/bin/env bash
# The images `make images` builds, run for real: scripts/images.sh builds them (and checks
# env/runtime-libs.txt against the binaries), then a containerd started here (its own root,
# state and socket under $DEV; Debian's containerd and runc) imports each archive and runs it
# under runc, read-only root filesystem, in its own network namespace:
#  - the image's entrypoint binary answers --version with the workspace's version;
#  - the container's spec (from the image config) runs as 65532:65532 with a read-only root;
#  - every layer is a complete tar archive (what image scanners read), and the image has no shell;
#  - the image's dynamic loader resolves every library of every ELF file in the image, inside
#    the container (`ld-linux-x86-64.so.2 --list FILE`: what ldd does, with no shell or ldd in
#    the image);
#  - the worker loads a model on each runtime inside the image: tract (fraud-mlp.onnx) and ONNX
#    Runtime (fraud-lgbm.onnx, the library from ORT_DYLIB_PATH), with the pipeline file and the
#    models mounted read-only as the operator mounts them and Kafka unreachable (the model is
#    loaded and probed before the worker connects); while it runs, its process is checked from
#    the host: uid/gid 65532, root mounted read-only, a network namespace of its own.
# Everything it started (containerd, the shims, the containers) is stopped on exit.
. "$(dirname "$0")/lib.sh"
shopt -s inherit_errexit
cd "$ROOT"
t0=$SECONDS
[[ $(id -u) -eq 0 ]] || die "scripts/test-images.sh runs as root (containerd and runc)"

ensure_packages containerd runc umoci

VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' Cargo.toml)
log "building the images (scripts/images.sh)"
mapfile -t archives < <(bash scripts/images.sh build)
((${#archives[@]} == 2)) || die "scripts/images.sh did not build both images"

WORK=$(mktemp -d "$DEV/images-test.XXXXXX")
SOCK="$WORK/containerd.sock"
NS=streamscore
containerd_pid=""
failures=0

ctr_() { ctr -a "$SOCK" -n "$NS" "$@"; }
ok() { printf '[streamscore]   ok  %s\n' "$*" >&2; }
fail() {
  printf '[streamscore]   FAIL %s\n' "$*" >&2
  failures=$((failures + 1))
}

cleanup() {
  set +e
  if [[ -n $containerd_pid ]] && kill -0 "$containerd_pid" 2>/dev/null; then
    local id
    for id in $(ctr_ containers ls -q 2>/dev/null); do
      ctr_ task kill -s SIGKILL "$id" >/dev/null 2>&1
      ctr_ task rm -f "$id" >/dev/null 2>&1
      ctr_ containers rm "$id" >/dev/null 2>&1
    done
    kill -TERM "$containerd_pid"
    for _ in $(seq 50); do kill -0 "$containerd_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$containerd_pid" 2>/dev/null
    wait "$containerd_pid" 2>/dev/null
  fi
  # The shims of this containerd (each is started with -address $SOCK): normally gone with
  # their tasks, killed here by id if one is left.
  local p
  for p in /proc/[0-9]*; do
    if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "-address $SOCK "; then
      kill -KILL "${p#/proc/}" 2>/dev/null
    fi
  done
  awk -v w="$WORK/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
    umount -l "$m"
  done
  rm -rf "$WORK"
  # What containerd and runc leave outside $WORK: their empty directories under /run/containerd
  # and the namespace's cgroup directories, removed when this run created them.
  if [[ -z $had_run_dir ]]; then find /run/containerd -depth -type d -empty -delete 2>/dev/null; fi
  if [[ -z $had_cgroups ]]; then
    for p in /sys/fs/cgroup/*/"$NS" /sys/fs/cgroup/"$NS"; do [[ -d $p ]] && rmdir "$p" 2>/dev/null; done
  fi
}
had_run_dir=""
if [[ -e /run/containerd ]]; then had_run_dir=yes; fi
had_cgroups=$(compgen -G "/sys/fs/cgroup/*/$NS" || compgen -G "/sys/fs/cgroup/$NS" || true)
trap cleanup EXIT

# A private containerd: no CRI plugin, nothing under /var/lib/containerd or /run/containerd
# except the shims' sockets (named by a hash of this socket's path).
containerd_config "$WORK" "$SOCK" io.containerd.grpc.v1.cri io.containerd.internal.v1.opt >"$WORK/config.toml"
t1=$SECONDS
containerd --config "$WORK/config.toml" </dev/null >"$WORK/containerd.log" 2>&1 &
containerd_pid=$!
for _ in $(seq 100); do
  ctr -a "$SOCK" version >/dev/null 2>&1 && break
  kill -0 "$containerd_pid" 2>/dev/null || { tail -20 "$WORK/containerd.log" >&2; die "containerd exited"; }
  sleep 0.2
done
ctr -a "$SOCK" version >/dev/null 2>&1 || { tail -20 "$WORK/containerd.log" >&2; die "containerd did not start"; }
log "containerd $(containerd --version | awk '{print $3}') started (pid $containerd_pid, $SOCK) in $((SECONDS - t1)) s"

# run_in IMAGE_REF ID ARGS...: runs ARGS in the image (read-only root), prints the output;
# returns the exit status.
run_in() {
  local ref=$1 id=$2
  shift 2
  ctr_ run --rm --read-only "$ref" "$id" "$@" </dev/null 2>&1
}

# check_spec REF IMG: the container spec containerd makes from the image config.
check_spec() {
  local ref=$1 img=$2 id="spec-$2" spec
  ctr_ containers create --read-only "$ref" "$id" >/dev/null
  spec=$(ctr_ containers info "$id")
  ctr_ containers rm "$id" >/dev/null
  local got
  got=$(python3 -c '
import json, sys
s = json.load(sys.stdin)["Spec"]
p = s["process"]
print(p["user"]["uid"], p["user"]["gid"], s["root"].get("readonly", False), " ".join(p["args"]),
      " ".join(e for e in p["env"] if e.startswith("ORT_DYLIB_PATH=")))
' <<<"$spec")
  local want="65532 65532 True /usr/local/bin/streamscore-$img"
  [[ $img == worker ]] && want+=" ORT_DYLIB_PATH=/usr/lib/streamscore/libonnxruntime.so.$ONNXRUNTIME_VERSION"
  if [[ $got == "$want"* ]]; then
    ok "$img: spec from the image config: uid gid read-only args [env] = $got"
  else
    fail "$img: spec: got '$got', want '$want'"
  fi
}

# check_libraries REF IMG ARCHIVE: every ELF file of the image, its libraries resolved by the
# image's own loader inside the container; no shell in the image.
check_libraries() {
  local ref=$1 img=$2 archive=$3 dir="$WORK/unpacked-$2" f rel out n=0 bad=0
  mkdir -p "$dir/oci"
  tar -xf "$archive" -C "$dir/oci"
  umoci raw unpack --image "$dir/oci:$VERSION" "$dir/rootfs" >"$dir/unpack.log" 2>&1 \
    || die "umoci raw unpack $archive: $(cat "$dir/unpack.log")"
  local blob layers=0
  for blob in "$dir"/oci/blobs/sha256/*; do
    gzip -t "$blob" 2>/dev/null || continue
    layers=$((layers + 1))
    tar -tzf "$blob" >/dev/null 2>"$dir/tar.log" || fail "$img: layer $(basename "$blob") is not a complete tar: $(cat "$dir/tar.log")"
  done
  ok "$img: $layers layers, each a complete tar (GNU tar reads it to its end)"
  for f in /bin/sh /usr/bin/sh /bin/bash /bin/busybox; do
    if [[ -e $dir/rootfs$f || -L $dir/rootfs$f ]]; then fail "$img: the image has $f"; fi
  done
  local owned
  owned=$(cd "$dir/rootfs" && find . \( ! -user 0 -o ! -group 0 \) -printf '%p %u:%g\n')
  if [[ $owned == "./home/nonroot 65532:65532" ]]; then
    ok "$img: no shell; every file is root's but /home/nonroot (65532)"
  else
    fail "$img: files not owned by root: $owned"
  fi
  while IFS= read -r -d '' f; do
    [[ $(head -c4 "$f") == $'\x7fELF' ]] || continue
    rel=${f#"$dir/rootfs"}
    [[ $rel == */ld-linux-x86-64.so.2 ]] && continue
    n=$((n + 1))
    if out=$(run_in "$ref" "ldd-$img-$n" /lib64/ld-linux-x86-64.so.2 --list "$rel") \
      && ! grep -q 'not found' <<<"$out"; then
      if [[ $rel == /usr/local/bin/* || $rel == /usr/lib/streamscore/* ]]; then
        log "  $rel inside the image:"
        while IFS= read -r l; do log "    $l"; done <<<"$out"
      fi
    else
      fail "$img: $rel: $out"
      bad=$((bad + 1))
    fi
  done < <(find "$dir/rootfs" -type f -print0 | sort -z)
  ((bad)) || ok "$img: the image's loader resolves every library of its $n ELF files inside the container"
}

# pipeline MODEL RUNTIME OUTPUT: a pipeline file for a worker whose model is models/MODEL.onnx,
# mounted where the operator mounts models; Kafka unreachable (nothing listens in the
# container's network namespace).
pipeline() {
  local model=$1 runtime=$2 output=$3 sha
  sha=$(sha256sum "models/$model.onnx" | cut -d' ' -f1)
  cat <<EOF
source:
  bootstrapServers: 127.0.0.1:9
  topics: [events]
  groupId: image-test
  keyField: user_id
  eventTime: {field: ts, format: epochMillis}
  maxOutOfOrderness: 5s
validation:
  fields:
    - {name: amount, type: number}
features:
  windows:
    - {name: tx_1h, aggregation: count, window: 1h}
    - {name: amount_24h, aggregation: sum, field: amount, window: 24h}
    - {name: rides_1h, aggregation: count, window: 1h, filter: {field: action, oneOf: [ride_requested]}}
model:
  path: /etc/streamscore/model/$model.onnx
  sha256: "$sha"
  version: $model-image-test
  runtime: $runtime
  features: [tx_1h, amount_24h, rides_1h, event.amount]
  outputs: [$output]
sink: {topic: scores, deadLetterTopic: scores-dlq}
runtime: {stateDir: /var/lib/streamscore/state, httpListen: "0.0.0.0:8080", shutdownTimeout: 2s}
EOF
}

# check_worker_runtime REF MODEL RUNTIME OUTPUT: the worker image loads MODEL on RUNTIME; its
# process runs as 65532 on a read-only root in its own network namespace.
check_worker_runtime() {
  local ref=$1 model=$2 runtime=$3 output=$4 id="worker-$3" cfg="$WORK/pipeline-$3" log="$WORK/worker-$3.log"
  mkdir -p "$cfg"
  pipeline "$model" "$runtime" "$output" >"$cfg/pipeline.yaml"
  ctr_ run --rm --read-only \
    --env STREAMSCORE_PIPELINE=/etc/streamscore/pipeline/pipeline.yaml --env STREAMSCORE_LOG_FORMAT=json \
    --mount "type=bind,src=$cfg,dst=/etc/streamscore/pipeline,options=rbind:ro" \
    --mount "type=bind,src=$ROOT/models,dst=/etc/streamscore/model,options=rbind:ro" \
    --mount "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777" \
    --mount "type=tmpfs,src=tmpfs,dst=/var/lib/streamscore/state,options=nosuid:nodev:mode=1777" \
    "$ref" "$id" </dev/null >"$log" 2>&1 &
  local ctr_pid=$! line="" pid=""
  for _ in $(seq 150); do
    line=$(grep -m1 -e 'model loaded and probed' -e 'model unusable' "$log" || true)
    [[ -n $line ]] && break
    kill -0 "$ctr_pid" 2>/dev/null || break
    sleep 0.2
  done
  if [[ $line == *'model loaded and probed'* && $line == *"\"runtime\":\"$runtime\""* ]]; then
    local fields=${line#*\"fields\":\{}
    ok "worker: loaded $model.onnx on $runtime inside the image: ${fields%%\}*}"
  else
    fail "worker: $model.onnx on $runtime: ${line:-no model line}; log: $(tail -c 2000 "$log")"
  fi
  pid=$(ctr_ task ls 2>/dev/null | awk -v id="$id" '$1 == id { print $2 }')
  if [[ -n $pid ]] && [[ -r /proc/$pid/status ]]; then
    local uid gid root_opts netns
    uid=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
    gid=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
    root_opts=$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo")
    netns=$(readlink "/proc/$pid/ns/net")
    if [[ $uid == "65532 65532 65532 65532" && $gid == "65532 65532 65532 65532" && $root_opts == ro,* \
      && $netns != "$(readlink /proc/self/ns/net)" ]]; then
      ok "worker ($runtime): process $pid: uid 65532, gid 65532, / mounted $root_opts, its own $netns"
    else
      fail "worker ($runtime): process $pid: uid '$uid', gid '$gid', / '$root_opts', netns $netns"
    fi
  else
    fail "worker ($runtime): no running task (log: $(tail -c 2000 "$log"))"
  fi
  ctr_ task kill -s SIGTERM "$id" >/dev/null 2>&1 || true
  for _ in $(seq 100); do kill -0 "$ctr_pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$ctr_pid" 2>/dev/null; then
    fail "worker ($runtime): still running 20 s after SIGTERM"
    ctr_ task kill -s SIGKILL "$id" >/dev/null 2>&1 || true
  fi
  local rc=0
  wait "$ctr_pid" || rc=$?
  log "  worker ($runtime): exit status $rc after SIGTERM"
}

for archive in "${archives[@]}"; do
  img=$(basename "$archive")
  img=${img#streamscore-}
  img=${img%%-"$VERSION".oci.tar}
  ref="docker.io/library/streamscore-$img:$VERSION"
  log "$img: $(basename "$archive") ($(du -h "$archive" | cut -f1))"
  ctr_ images import "$archive" >/dev/null
  if ctr_ images ls -q | grep -qxF "$ref"; then
    ok "$img: imported as $ref ($(ctr_ images ls | awk -v r="$ref" '$1 == r { print $4, $5 }'))"
  else
    fail "$img: not imported as $ref (images: $(ctr_ images ls -q | tr '\n' ' '))"
    continue
  fi
  if out=$(run_in "$ref" "version-$img" /usr/local/bin/"streamscore-$img" --version) \
    && [[ $out == "streamscore-$img $VERSION" ]]; then
    ok "$img: --version under runc: $out"
  else
    fail "$img: --version: $out"
  fi
  check_spec "$ref" "$img"
  check_libraries "$ref" "$img" "$archive"
  if [[ $img == worker ]]; then
    check_worker_runtime "$ref" fraud-mlp tract "{name: fraud}"
    check_worker_runtime "$ref" fraud-lgbm onnxruntime "{name: fraud, output: 1, column: 1}"
  fi
done

((failures == 0)) || die "$failures image checks failed"
log "images: every check passed in $((SECONDS - t0)) s"
