#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and kubectl from
# the k8s.io/kubernetes Go module, etcd from go.etcd.io/etcd/server/v3 and helm
# from helm.sh/helm/v3 and SeaweedFS (the S3 server for checkpoints) from
# github.com/seaweedfs/seaweedfs, all at the versions pinned in env/versions.env.
# Results are cached by version under $CACHE; a second run returns at once.
. "$(dirname "$0")/lib.sh"

build_kubernetes() {
  local out="$K8S_BIN" v="$KUBERNETES_VERSION"
  if [[ -x $out/kube-apiserver && -x $out/kube-controller-manager && -x $out/kube-scheduler && -x $out/kubectl ]]; then
    return 0
  fi
  local minor="${v#*.}"; minor="${minor%%.*}"
  local mod="$CACHE/kubernetes-v$v/src"
  mkdir -p "$mod" "$out"
  log "building Kubernetes v$v control plane from the Go module proxy (about 7 min cold on 2 cores)"
  {
    echo "module streamscore.dev/localk8s"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes v$v"
    echo
    echo "replace ("
    for s in api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider \
             cluster-bootstrap code-generator component-base component-helpers controller-manager \
             cri-api cri-client csi-translation-lib dynamic-resource-allocation endpointslice \
             externaljwt kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler \
             kubectl kubelet metrics mount-utils pod-security-admission sample-apiserver \
             sample-cli-plugin sample-controller; do
      echo "	k8s.io/$s => k8s.io/$s v0.$minor.${v##*.}"
    done
    echo ")"
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kube-apiserver/app"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	_ "k8s.io/kubernetes/cmd/kube-scheduler/app"
)
GO
  k8s_go_build "$mod" "$out" k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
}

# k8s_go_build MODULE_DIR OUT PACKAGE...: go mod tidy, then the packages built into OUT with
# the version stamped as the Kubernetes release builds do.
k8s_go_build() {
  local mod=$1 out=$2 v="$KUBERNETES_VERSION"
  shift 2
  local minor="${v#*.}"; minor="${minor%%.*}"
  (
    cd "$mod"
    go mod tidy
    local vpkg=k8s.io/component-base/version
    local ld="-s -w -X $vpkg.gitVersion=v$v -X $vpkg.gitMajor=1 -X $vpkg.gitMinor=$minor -X $vpkg.gitTreeState=clean"
    ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=v$v -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    go build -ldflags "$ld" -o "$out/" "$@"
  )
}

build_etcd() {
  [[ -x $ETCD_BIN/etcd ]] && return 0
  local mod="$CACHE/etcd-v$ETCD_VERSION/src"
  mkdir -p "$mod" "$ETCD_BIN"
  log "building etcd v$ETCD_VERSION"
  printf 'module streamscore.dev/localetcd\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 v%s\n' "$ETCD_VERSION" > "$mod/go.mod"
  cat > "$mod/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  (cd "$mod" && go mod tidy && go build -ldflags "-s -w" -o "$ETCD_BIN/etcd" .)
}

build_helm() {
  [[ -x $HELM_BIN/helm ]] && return 0
  mkdir -p "$HELM_BIN"
  log "building helm v$HELM_VERSION"
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
  GOBIN="$HELM_BIN" go install -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
}

build_seaweedfs() {
  [[ -x $WEED_BIN/weed ]] && return 0
  local mod="$CACHE/seaweedfs-$SEAWEEDFS_VERSION/src"
  mkdir -p "$mod" "$WEED_BIN"
  log "building SeaweedFS $SEAWEEDFS_VERSION (S3 gateway for checkpoints; about 5 min cold on 2 cores)"
  # `go install pkg@version` refuses a module whose go.mod has replace lines: a wrapper module
  # repeats the one replace SeaweedFS needs.
  cat > "$mod/go.mod" <<MOD
module streamscore.dev/localseaweedfs

go 1.24

require github.com/seaweedfs/seaweedfs $SEAWEEDFS_VERSION

replace github.com/tyler-smith/go-bip39 => github.com/cosmos/go-bip39 v1.0.0
MOD
  cat > "$mod/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/seaweedfs/seaweedfs/weed"
GO
  (cd "$mod" && go mod tidy && GOBIN="$WEED_BIN" go install -ldflags "-s -w" github.com/seaweedfs/seaweedfs/weed)
}

# The node (scripts/node.sh): kubelet and kube-proxy from the same module and wrapper as the control plane (same
# version, same ldflags).
build_node() {
  local out="$K8S_BIN" v="$KUBERNETES_VERSION"
  [[ -x $out/kubelet && -x $out/kube-proxy ]] && return 0
  build_kubernetes
  local mod="$CACHE/kubernetes-v$v/src"
  log "building the kubelet and kube-proxy v$v (41 s on 2 cores after the control plane's build)"
  cat > "$mod/node_tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-proxy/app"
	_ "k8s.io/kubernetes/cmd/kubelet/app"
)
GO
  k8s_go_build "$mod" "$out" k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy
}

# kube-router, for its NetworkPolicy firewall on the local node (iptables + ipset).
build_kube_router() {
  local out="$CACHE/kube-router-v$KUBE_ROUTER_VERSION/bin"
  [[ -x $out/kube-router ]] && return 0
  mkdir -p "$out"
  log "building kube-router v$KUBE_ROUTER_VERSION (NetworkPolicy enforcement on the local node; about 3 min cold)"
  GOBIN="$out" go install -ldflags "-s -w" "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@v$KUBE_ROUTER_VERSION"
}

# promtool, to check and unit-test the chart's PrometheusRules (tests/tests/helm_chart.rs).
build_promtool() {
  [[ -x $PROMTOOL_BIN/promtool ]] && return 0
  mkdir -p "$PROMTOOL_BIN"
  log "building promtool ($PROMETHEUS_VERSION; about 8 min cold on 2 cores: it links every service discovery)"
  GOBIN="$PROMTOOL_BIN" go install -ldflags "-s -w" "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION"
}

case "${1:-all}" in
  kubernetes) build_kubernetes ;;
  etcd) build_etcd ;;
  helm) build_helm ;;
  seaweedfs) build_seaweedfs ;;
  node) build_node; build_kube_router ;;
  promtool) build_promtool ;;
  all) build_etcd; build_kubernetes; build_helm; build_seaweedfs; build_promtool ;;
  *) die "usage: $0 [all|kubernetes|etcd|helm|seaweedfs|promtool|node]" ;;
esac
