#!/usr/bin/env bash
# `make images`: the operator and worker images as OCI image archives (a tar of an OCI image
# layout), without Docker and without a registry, from the binaries the cargo build produced.
#
#   scripts/images.sh [build]       build both images (the binaries must exist: `make images`
#                                   runs cargo first); prints the archives' paths
#   scripts/images.sh check         env/runtime-libs.txt and the Dockerfiles against what the
#                                   built binaries load (ldd); exit 1 with the difference
#   scripts/images.sh update-libs   rewrite env/runtime-libs.txt from the built binaries
#   scripts/images.sh pause         the local node's pod sandbox image (env/pause.c, static);
#                                   prints its archive's path
#
# The base is distroless-like, assembled from this machine's Debian packages (bookworm, like
# gcr.io/distroless/cc-debian12): no shell, no package manager, only
#  - layer 1, the same in both images: CA certificates (the ca-certificates package's own),
#    tzdata, /etc/passwd and /etc/group with the user nonroot (65532), /tmp, /etc/os-release,
#    the merged-/usr links, and the packages' dpkg records (for image scanners);
#  - layer 2, the image's shared libraries: exactly what the binary (and, for the worker, ONNX
#    Runtime's library) loads, found by ldd (transitively, the dynamic loader included): the
#    ones of distroless/cc's own packages (BASE_PACKAGES) and the ones env/runtime-libs.txt
#    lists, copied by scripts/copy-runtime-libs.sh as the Dockerfiles copy them, so the
#    Dockerfiles users build cannot drift from these images (`check` fails when the list is not
#    exactly what the binaries load beyond distroless/cc);
#  - layer 3, the binary in /usr/local/bin (the entrypoint), and for the worker ONNX Runtime's
#    library in /usr/lib/streamscore with ORT_DYLIB_PATH naming it (as in Dockerfile.worker).
# Config: user 65532:65532, labels org.opencontainers.image.{title,version,revision,...}.
#
# Output: $CACHE/images/streamscore-<image>-<version>.oci.tar, tagged <version> in the layout and
# named docker.io/library/streamscore-<image>:<version> for containerd (`ctr images import FILE`
# takes that name; `skopeo copy oci-archive:FILE:<version> ...` the tag). Reproducible: the
# same binaries give the same digests (file times and `created` are the last commit's time, or
# SOURCE_DATE_EPOCH).
#
# Environment: STREAMSCORE_IMAGE_PROFILE, the cargo profile's directory under CARGO_TARGET_DIR
# (default debug; e.g. release); CARGO_TARGET_DIR (default $CACHE/cargo-target). Runs as root
# (the files' owners in the image are those on disk).
. "$(dirname "$0")/lib.sh"
shopt -s inherit_errexit

IMAGES=(operator worker)
LIBS_LIST="$ROOT/env/runtime-libs.txt"
# The Debian packages of gcr.io/distroless/cc-debian12 that hold shared libraries (its base:
# libc6, libssl3; its cc layer: libgcc-s1, libstdc++6, libgomp1): the Dockerfiles' runtime
# stage has them, so env/runtime-libs.txt lists every other library the binaries load.
BASE_PACKAGES=(libc6 libssl3 libgcc-s1 libstdc++6 libgomp1)
declare -A DESCRIPTION=(
  [operator]="streamscore operator: runs TenantModels as isolated worker Deployments"
  [worker]="streamscore worker: Kafka → event-time features (RocksDB) → ONNX scoring → Kafka"
)
PROFILE="${STREAMSCORE_IMAGE_PROFILE:-debug}"
TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
OUT="$CACHE/images"
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")
[[ -n $VERSION ]] || die "no version in $ROOT/Cargo.toml [workspace.package]"

# binary IMAGE: the built binary of IMAGE.
binary() {
  local bin="$TARGET_DIR/$PROFILE/streamscore-$1"
  [[ -x $bin ]] || die "$bin is missing: build it first (\`make images\` runs cargo build --bins before this script)"
  printf '%s\n' "$bin"
}

# canonical PATH: PATH with its directory resolved (/lib → /usr/lib on merged-/usr Debian) and
# its file name kept (the soname the loader looks up, usually a link to the versioned file).
canonical() {
  printf '%s/%s\n' "$(realpath -e -- "$(dirname -- "$1")")" "$(basename -- "$1")"
}

# closure FILE...: every shared library FILE... load, as ldd resolves them on this machine
# (transitively, the dynamic loader included; linux-vdso has no file), canonical paths, sorted.
closure() {
  local f out
  for f in "$@"; do
    out=$(ldd "$f") || die "ldd $f failed"
    if grep -q 'not found' <<<"$out"; then die "ldd $f: a library is missing here:"$'\n'"$out"; fi
    awk '$2 == "=>" && $3 ~ /^\// { print $3; next } $1 ~ /^\// { print $1 }' <<<"$out"
  done | while read -r p; do canonical "$p"; done | sort -u
}

# package_of PATH: the Debian package that holds PATH (or its merged-/usr alias).
package_of() {
  local p=$1 alias out
  case $p in
    /usr/*) alias=${p#/usr} ;;
    *) alias=/usr$p ;;
  esac
  out=$(dpkg-query -S "$p" 2>/dev/null || dpkg-query -S "$alias" 2>/dev/null) \
    || die "$p belongs to no Debian package: the images are assembled from Debian's files only"
  # "libc6:amd64: /lib/x86_64-linux-gnu/libc.so.6" (diversions have their own lines).
  grep -v '^diversion' <<<"$out" | head -n1 | cut -d: -f1
}

is_base_package() {
  local b
  for b in "${BASE_PACKAGES[@]}"; do [[ $1 == "$b" ]] && return 0; done
  return 1
}

# scan: LIBS[IMAGE] = "PACKAGE PATH" lines, every shared library IMAGE's ELF files load (its
# binary; for the worker ONNX Runtime's library too). Run in this shell (not in a pipe or a
# command substitution) so that what fails stops the script.
declare -A LIBS=()
scan() {
  local img bin ort paths p pkg lines
  for img in "${IMAGES[@]}"; do
    bin=$(binary "$img")
    if [[ $img == worker ]]; then
      ort=$(onnxruntime_lib)
      paths=$(closure "$bin" "$ort")
    else
      paths=$(closure "$bin")
    fi
    lines=""
    while read -r p; do
      pkg=$(package_of "$p")
      lines+="$pkg $p"$'\n'
    done <<<"$paths"
    LIBS[$img]=$lines
  done
}

# wanted_list: what env/runtime-libs.txt must hold ("IMAGE PATH", sorted): every library each
# image loads that is not from BASE_PACKAGES.
wanted_list() {
  local img pkg path
  for img in "${IMAGES[@]}"; do
    while read -r pkg path; do
      [[ -z $pkg ]] || is_base_package "$pkg" || printf '%s %s\n' "$img" "$path"
    done <<<"${LIBS[$img]}"
  done | LC_ALL=C sort
}

current_list() {
  [[ -f $LIBS_LIST ]] || return 0
  awk '$1 !~ /^#/ && NF { print $1, $2 }' "$LIBS_LIST" | LC_ALL=C sort
}

write_list() {
  local tmp="$LIBS_LIST.tmp"
  {
    cat <<'EOF2'
# The shared libraries the streamscore images carry beyond what gcr.io/distroless/cc-debian12
# has (Debian bookworm's libc6, libssl3, libgcc-s1, libstdc++6, libgomp1), one a line:
# IMAGE PATH, where IMAGE is worker or operator and PATH is where Debian bookworm has the file
# under the name the dynamic loader looks up (the soname).
#
# One list for every image: Dockerfile.worker and Dockerfile.operator copy exactly these files
# onto distroless/cc (scripts/copy-runtime-libs.sh in their build stage), and `make images`
# (scripts/images.sh) builds its images with them on top of distroless/cc's libraries.
# It is what ldd finds for the built binaries (for the worker with ONNX Runtime's library),
# transitively, minus distroless/cc's packages. Regenerate: scripts/images.sh update-libs.
# Checked: scripts/images.sh check (run by scripts/test-images.sh) fails when it differs.
EOF2
    wanted_list
  } >"$tmp"
  mv "$tmp" "$LIBS_LIST"
}

# check: env/runtime-libs.txt is exactly what the built binaries load beyond distroless/cc, and
# the Dockerfiles copy it and name ONNX Runtime's version of env/versions.env; dies otherwise.
check() {
  local want have ok=1 img
  want=$(wanted_list)
  have=$(current_list)
  if [[ $want != "$have" ]]; then
    log "env/runtime-libs.txt differs from what the built binaries load beyond distroless/cc"
    log "(< listed, > loaded; on Debian bookworm, regenerate it: scripts/images.sh update-libs):"
    diff <(printf '%s\n' "$have") <(printf '%s\n' "$want") >&2 || true
    ok=0
  else
    log "env/runtime-libs.txt = what the binaries load beyond distroless/cc ($(grep -c . <<<"$want") files)"
  fi
  local ort="ORT_DYLIB_PATH=/usr/lib/streamscore/libonnxruntime.so.$ONNXRUNTIME_VERSION"
  if ! grep -q "^ENV $ort\$" "$ROOT/Dockerfile.worker"; then
    log "Dockerfile.worker does not set $ort (ONNXRUNTIME_VERSION of env/versions.env)"
    ok=0
  fi
  for img in "${IMAGES[@]}"; do
    if ! grep -q "copy-runtime-libs.sh $img env/runtime-libs.txt" "$ROOT/Dockerfile.$img"; then
      log "Dockerfile.$img does not copy its libraries with scripts/copy-runtime-libs.sh $img env/runtime-libs.txt"
      ok=0
    fi
  done
  ((ok)) || die "env/runtime-libs.txt or the Dockerfiles do not match the binaries (see above)"
}

# dpkg_record DIR PKG...: the packages' status records in DIR/var/lib/dpkg/status.d/ (the
# layout distroless uses), so that image scanners see which Debian packages the files are of.
dpkg_record() {
  local dir=$1 p
  shift
  mkdir -p "$dir/var/lib/dpkg/status.d"
  for p in "$@"; do
    dpkg-query -s "$p" | grep -v '^Conffiles:\|^ /' >"$dir/var/lib/dpkg/status.d/$p"
  done
}

# common_layer DIR: the files both images share (layer 1).
common_layer() {
  local d=$1
  mkdir -p "$d"/{etc,usr/bin,usr/sbin,usr/lib,usr/lib64,usr/local/bin,usr/share,var/lib}
  ln -s usr/bin "$d/bin"
  ln -s usr/sbin "$d/sbin"
  ln -s usr/lib "$d/lib"
  ln -s usr/lib64 "$d/lib64"
  install -d -m 1777 "$d/tmp"
  install -d -m 0700 "$d/root"
  install -d -m 0700 -o 65532 -g 65532 "$d/home/nonroot"
  cat >"$d/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
  cat >"$d/etc/group" <<'EOF'
root:x:0:
nobody:x:65534:
nonroot:x:65532:
EOF
  printf 'passwd: files\ngroup: files\nshadow: files\nhosts: files dns\nnetworks: files\nprotocols: files\nservices: files\n' \
    >"$d/etc/nsswitch.conf"
  cp -L /usr/lib/os-release "$d/usr/lib/os-release"
  ln -s ../usr/lib/os-release "$d/etc/os-release"
  # The CA bundle of the ca-certificates package (Mozilla's roots), not this machine's
  # /etc/ssl/certs, which may hold local additions; OpenSSL's default paths (as Debian's
  # openssl package links them) point at it.
  mkdir -p "$d/etc/ssl/certs" "$d/usr/lib/ssl"
  dpkg-query -L ca-certificates | grep '^/usr/share/ca-certificates/.*\.crt$' | LC_ALL=C sort \
    | while read -r c; do
      cat "$c"
      [[ -z $(tail -c1 "$c") ]] || echo
    done >"$d/etc/ssl/certs/ca-certificates.crt"
  [[ -s $d/etc/ssl/certs/ca-certificates.crt ]] || die "no certificates in the ca-certificates package"
  ln -s /etc/ssl/certs "$d/usr/lib/ssl/certs"
  ln -s /etc/ssl/certs/ca-certificates.crt "$d/usr/lib/ssl/cert.pem"
  cp -a /usr/share/zoneinfo "$d/usr/share/zoneinfo"
  dpkg_record "$d" base-files ca-certificates tzdata
}

# libs_layer IMAGE DIR: IMAGE's shared libraries (layer 2): those of BASE_PACKAGES found by ldd,
# then the listed ones exactly as the Dockerfiles copy them.
libs_layer() {
  local img=$1 d=$2 pkg path pkgs=()
  while read -r pkg path; do
    [[ -n $pkg ]] || continue
    pkgs+=("$pkg")
    if is_base_package "$pkg"; then
      mkdir -p "$d$(dirname "$path")"
      cp -L "$path" "$d$path"
    fi
  done <<<"${LIBS[$img]}"
  sh "$ROOT/scripts/copy-runtime-libs.sh" "$img" "$LIBS_LIST" "$d"
  mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
  dpkg_record "$d" "${pkgs[@]}"
  # Every binary's loader is /lib64/ld-linux-x86-64.so.2 (PT_INTERP); lib64 links to usr/lib64
  # in layer 1.
  [[ -f $d/usr/lib64/ld-linux-x86-64.so.2 ]] || die "$img: no dynamic loader in its closure"
}

# app_layer IMAGE DIR: the binary, and the worker's ONNX Runtime library (layer 3).
app_layer() {
  local img=$1 d=$2
  install -D -m 0755 "$(binary "$img")" "$d/usr/local/bin/streamscore-$img"
  if [[ $img == worker ]]; then
    install -D -m 0644 "$(onnxruntime_lib)" "$d/usr/lib/streamscore/libonnxruntime.so.$ONNXRUNTIME_VERSION"
  fi
}

# build_image IMAGE WORKDIR EPOCH CREATED REVISION ARCHIVE
build_image() {
  local img=$1 work=$2 epoch=$3 created=$4 revision=$5 archive=$6 name="streamscore-$1"
  local oci="$work/oci" layers="$work/layers" n desc
  rm -rf "$oci" "$layers"
  mkdir -p "$layers"
  common_layer "$layers/1"
  libs_layer "$img" "$layers/2"
  app_layer "$img" "$layers/3"
  umoci init --layout "$oci"
  umoci new --image "$oci:$VERSION"
  umoci config --image "$oci:$VERSION" --no-history --created "$created"
  # Each layer a tar made here (sorted, numeric owners as on disk, every time the commit's) and
  # added as it is: umoci 0.4.7's own `insert` leaves out the tar end-of-archive blocks.
  for n in 1 2 3; do
    case $n in
      1) desc="base: CA certificates, tzdata, users root/nobody/nonroot (65532), /tmp" ;;
      2) desc="shared libraries (ldd closure; env/runtime-libs.txt)" ;;
      3) desc="$name $VERSION" ;;
    esac
    (cd "$layers/$n" && find . -mindepth 1 -maxdepth 1 -printf '%P\n' | LC_ALL=C sort \
      | tar --sort=name --numeric-owner --mtime="@$epoch" --format=gnu -cf "$layers/$n.tar" -T -)
    umoci raw add-layer --image "$oci:$VERSION" --history.created "$created" \
      --history.created_by "scripts/images.sh: $desc" "$layers/$n.tar"
  done
  local cfg=(
    --config.user 65532:65532
    --config.entrypoint "/usr/local/bin/$name"
    --config.workingdir /
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
    --config.env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
  )
  if [[ $img == worker ]]; then
    cfg+=(--config.env "ORT_DYLIB_PATH=/usr/lib/streamscore/libonnxruntime.so.$ONNXRUNTIME_VERSION")
    cfg+=(--config.label "io.streamscore.onnxruntime.version=$ONNXRUNTIME_VERSION")
  fi
  local label
  for label in "org.opencontainers.image.title=$name" "org.opencontainers.image.version=$VERSION" \
    "org.opencontainers.image.revision=$revision" "org.opencontainers.image.licenses=Apache-2.0" \
    "org.opencontainers.image.created=$created" \
    "org.opencontainers.image.description=${DESCRIPTION[$img]}"; do
    cfg+=(--config.label "$label" --manifest.annotation "$label")
  done
  umoci config --image "$oci:$VERSION" --created "$created" --history.created "$created" \
    --history.created_by "scripts/images.sh: config" "${cfg[@]}"
  umoci gc --layout "$oci"
  name_for_containerd "$oci/index.json" "docker.io/library/$name:$VERSION"
  touch -h -d "@$epoch" "$oci" "$oci"/* "$oci"/blobs/* "$oci"/blobs/sha256/*
  tar --sort=name --owner=0 --group=0 --numeric-owner --mode=go+rX --mtime="@$epoch" --format=gnu \
    -C "$oci" -cf "$archive.tmp" .
  mv "$archive.tmp" "$archive"
}

build() {
  [[ $(id -u) -eq 0 ]] || die "scripts/images.sh runs as root (the files' owners in the image are those on disk)"
  ensure_packages umoci
  local img epoch created revision work archive
  scan
  check
  epoch=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || date +%s)}
  created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
  revision=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)
  mkdir -p "$OUT"
  work=$(mktemp -d "$OUT/.build.XXXXXX")
  # shellcheck disable=SC2064  # $work is fixed now
  trap "rm -rf '$work'" EXIT
  for img in "${IMAGES[@]}"; do
    log "building the $img image from $(binary "$img")"
    archive="$OUT/streamscore-$img-$VERSION.oci.tar"
    build_image "$img" "$work/$img" "$epoch" "$created" "$revision" "$archive" >&2
    log "$(basename "$archive"): $(du -h "$archive" | cut -f1) (layers: $(layer_sizes "$work/$img/oci"))"
    printf '%s\n' "$archive"
  done
}

# build_pause: the sandbox image containerd's CRI starts first in every pod of the local node
# (scripts/node.sh): one static binary from env/pause.c, user 65535, named
# docker.io/library/streamscore-pause:$VERSION.
build_pause() {
  ensure_packages umoci gcc libc6-dev
  local archive="$OUT/streamscore-pause-$VERSION.oci.tar" work oci epoch created
  if [[ -f $archive && $archive -nt $ROOT/env/pause.c ]]; then
    printf '%s\n' "$archive"
    return 0
  fi
  epoch=${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct -- env/pause.c 2>/dev/null || true)}
  [[ -n $epoch ]] || epoch=$(date +%s)
  created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)
  mkdir -p "$OUT"
  work=$(mktemp -d "$OUT/.pause.XXXXXX")
  oci="$work/oci"
  mkdir -p "$work/layer"
  gcc -static -Os -s -o "$work/layer/pause" "$ROOT/env/pause.c"
  (cd "$work/layer" && tar --numeric-owner --owner=0 --group=0 --mtime="@$epoch" --format=gnu -cf "$work/layer.tar" pause)
  {
    umoci init --layout "$oci"
    umoci new --image "$oci:$VERSION"
    umoci raw add-layer --image "$oci:$VERSION" --history.created "$created" \
      --history.created_by "scripts/images.sh pause: env/pause.c" "$work/layer.tar"
    umoci config --image "$oci:$VERSION" --created "$created" --history.created "$created" \
      --config.user 65535:65535 --config.entrypoint /pause --config.workingdir / \
      --config.label "org.opencontainers.image.title=streamscore-pause"
    umoci gc --layout "$oci"
  } >&2
  name_for_containerd "$oci/index.json" "docker.io/library/streamscore-pause:$VERSION"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=gnu -C "$oci" -cf "$archive" .
  rm -rf "$work"
  printf '%s\n' "$archive"
}

# name_for_containerd INDEX REF: containerd names an imported image after this annotation (the
# tag alone would become import-<date>:<tag>); the OCI ref.name stays the plain tag.
name_for_containerd() {
  python3 - "$1" "$2" <<'EOF'
import json, sys
path, ref = sys.argv[1], sys.argv[2]
index = json.load(open(path))
for m in index["manifests"]:
    m.setdefault("annotations", {})["io.containerd.image.name"] = ref
json.dump(index, open(path, "w"), separators=(",", ":"))
EOF
}

# layer_sizes OCI: the compressed sizes of the image's layers.
layer_sizes() {
  python3 - "$1" <<'EOF'
import json, sys
oci = sys.argv[1]
index = json.load(open(oci + "/index.json"))
manifest = json.load(open(oci + "/blobs/sha256/" + index["manifests"][0]["digest"].split(":")[1]))
print(", ".join("%.1f MB" % (l["size"] / 1e6) for l in manifest["layers"]))
EOF
}

case "${1:-build}" in
  build) build ;;
  check)
    scan
    check
    ;;
  pause) build_pause ;;
  update-libs)
    scan
    write_list
    log "wrote $LIBS_LIST"
    ;;
  *) die "usage: $0 [build | check | update-libs | pause]" ;;
esac
