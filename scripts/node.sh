#!/usr/bin/env bash
# The local node: a real kubelet (same version as the control plane) with containerd's CRI,
# runc, the CNI bridge, a pause image built here, kube-proxy (iptables) for Services and
# kube-router's firewall for NetworkPolicies, all inside the network namespace of an
# environment started with STREAMSCORE_NETNS=1 (scripts/env.sh). Pods get addresses of
# $POD_CIDR on the namespace's bridge; the API server, the broker's PODS listener and the S3
# gateway answer them at the node's address $NODE_IP; nothing there routes anywhere else.
#
#   scripts/node.sh up                  build what is missing, start, wait until the node is Ready
#   scripts/node.sh import ARCHIVE...   load OCI image archives into the node's containerd
#   scripts/node.sh down                stop the node, its pods' containers, mounts and cgroups
#   scripts/node.sh status
#
# Runs as root (containerd, runc, iptables). State in $STREAMSCORE_DEV_DIR/node.
. "$(dirname "$0")/lib.sh"
# shellcheck source=env-vars.sh
. "$ROOT/scripts/env-vars.sh"
export PATH="$K8S_BIN:$HELM_BIN:$PATH"

NODE_DIR="$DEV/node"
SOCK="$NODE_DIR/containerd.sock"
CGROUP_ROOT="streamscore-$B"
NODE_PROCS=(kube-router kube-proxy kubelet containerd)
VERSION=$(sed -n '/^\[workspace\.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")
PAUSE_IMAGE="docker.io/library/streamscore-pause:$VERSION"

ctr_() { "${NSX[@]}" ctr -a "$SOCK" -n k8s.io "$@"; }
kctl() { kubectl --kubeconfig "$DEV/admin.kubeconfig" "$@"; }

require_env() {
  [[ $(id -u) -eq 0 ]] || die "scripts/node.sh runs as root (containerd, runc, iptables)"
  [[ -n $NETNS && -e /run/netns/$NETNS ]] \
    || die "no environment in a network namespace here: STREAMSCORE_NETNS=1 scripts/env.sh up first"
  [[ -f $DEV/kubelet.kubeconfig ]] || die "$DEV/kubelet.kubeconfig is missing: scripts/env.sh up writes it"
}

sysctls() {
  # Forwarding between the pods' bridge and the node's address, and bridged pod-to-pod traffic
  # through iptables (kube-proxy's DNAT back, NetworkPolicies between pods on the bridge).
  "${NSX[@]}" sysctl -qw net.ipv4.ip_forward=1
  if "${NSX[@]}" test -e /proc/sys/net/bridge/bridge-nf-call-iptables; then
    "${NSX[@]}" sysctl -qw net.bridge.bridge-nf-call-iptables=1
  fi
  # kube-proxy's DNAT of a Service to the node's own address (the API server's endpoint).
  "${NSX[@]}" sysctl -qw net.ipv4.conf.all.route_localnet=1
}

write_configs() {
  mkdir -p "$NODE_DIR"/{containerd,cni,cni-ipam,kubelet,pod-logs}
  {
    containerd_config "$NODE_DIR/containerd" "$SOCK"
    cat <<EOF
[plugins."io.containerd.internal.v1.opt"]
  path = "$NODE_DIR/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # This machine's root lacks CAP_SYS_RESOURCE: an oom_score_adj below containerd's own (the
  # pause container's -998) would fail runc's init; kept at containerd's instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$NODE_DIR/cni"
    max_conf_num = 1
EOF
  } >"$NODE_DIR/containerd.toml"
  cat >"$NODE_DIR/cni/10-streamscore.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "streamscore",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "isDefaultGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$NODE_DIR/cni-ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  # Pods resolve nothing: no cluster DNS runs here, and their own loopback answers no query.
  printf 'nameserver 127.0.0.1\noptions ndots:1\n' >"$NODE_DIR/resolv.conf"
  cat >"$NODE_DIR/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$PKI/ca.crt"}
authorization: {mode: Webhook}
containerRuntimeEndpoint: "unix://$SOCK"
cgroupDriver: cgroupfs
cgroupRoot: "/$CGROUP_ROOT"
failSwapOn: false
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
tlsCertFile: "$PKI/kubelet.crt"
tlsPrivateKeyFile: "$PKI/kubelet.key"
resolvConf: "$NODE_DIR/resolv.conf"
# No cluster DNS server runs on the local node: names do not resolve in pods (tests and the
# demo give pods IP addresses); the address only keeps pods' DNS policy ClusterFirst.
clusterDNS: ["10.96.0.10"]
clusterDomain: cluster.local
podLogsDir: "$NODE_DIR/pod-logs"
maxPods: 60
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
shutdownGracePeriod: 0s
EOF
  cat >"$NODE_DIR/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
mode: iptables
clientConnection: {kubeconfig: "$DEV/kube-proxy.kubeconfig"}
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
clusterCIDR: $POD_CIDR
metricsBindAddress: 127.0.0.1:$KUBE_PROXY_METRICS_PORT
healthzBindAddress: 127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT
nodePortAddresses: ["$NODE_IP/32"]
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false, syncPeriod: 10s, minSyncPeriod: 0s}
EOF
}

# cgroups: the kubelet's root under every v1 hierarchy (and the unified one), made here and
# removed by `down` (the kubelet requires it to exist).
cgroup_dirs() {
  local d
  for d in /sys/fs/cgroup/*/ /sys/fs/cgroup/unified/; do
    [[ -d $d && ! -L ${d%/} ]] || continue
    [[ -f ${d}cgroup.procs ]] || continue
    printf '%s\n' "$d$CGROUP_ROOT"
  done | sort -u
}

import_images() {
  local a
  for a in "$@"; do
    ctr_ images import --all-platforms "$a" >&2 || die "importing $a into the node's containerd failed"
  done
}

up() {
  require_env
  ensure_packages containerd runc containernetworking-plugins iptables ipset conntrack iproute2 util-linux umoci gcc libc6-dev
  bash "$ROOT/scripts/build-k8s.sh" node
  local t0=$SECONDS pause
  pause=$(bash "$ROOT/scripts/images.sh" pause)
  sysctls
  write_configs
  local d
  while read -r d; do mkdir -p "$d"; done < <(cgroup_dirs)
  start_in_ns containerd containerd --config "$NODE_DIR/containerd.toml"
  wait_for containerd 30 "${NSX[@]}" ctr -a "$SOCK" version
  import_images "$pause"
  start_in_ns kubelet "$K8S_BIN/kubelet" --config "$NODE_DIR/kubelet.yaml" \
    --kubeconfig "$DEV/kubelet.kubeconfig" --root-dir "$NODE_DIR/kubelet" --cert-dir "$NODE_DIR/kubelet/pki" \
    --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --v 1
  wait_for kubelet 60 "${NSX[@]}" curl -sf "http://127.0.0.1:$KUBELET_HEALTHZ_PORT/healthz"
  start_in_ns kube-proxy "$K8S_BIN/kube-proxy" --config "$NODE_DIR/kube-proxy.yaml" --v 1
  start_in_ns kube-router "$KUBE_ROUTER_BIN/kube-router" --kubeconfig "$DEV/admin.kubeconfig" \
    --run-firewall=true --run-router=false --run-service-proxy=false --run-loadbalancer=false \
    --enable-cni=false --hostname-override "$NODE_NAME" --health-port "$KUBE_ROUTER_HEALTH_PORT" \
    --metrics-port 0 -v 1
  wait_for kubelet 90 node_ready
  wait_for kube-proxy 30 "${NSX[@]}" curl -sf "http://127.0.0.1:$KUBE_PROXY_HEALTHZ_PORT/healthz"
  wait_for kube-router 60 "${NSX[@]}" curl -sf "http://127.0.0.1:$KUBE_ROUTER_HEALTH_PORT/healthz"
  log "node $NODE_NAME Ready in $((SECONDS - t0)) s (kubelet $("$K8S_BIN/kubelet" --version | awk '{print $2}'), containerd $(containerd --version | awk '{print $3}'), pods $POD_CIDR in $NETNS)"
}

start_in_ns() { local name=$1; shift; start "$name" "${NSX[@]}" "$@"; }

node_ready() {
  [[ $(kctl get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null) == True ]]
}

down() {
  [[ -n $NETNS ]] || return 0
  local name id
  stop_one kube-router
  stop_one kube-proxy
  stop_one kubelet
  if running containerd; then
    # Every container of the node (sandboxes included), then containerd.
    for id in $(ctr_ tasks ls -q 2>/dev/null); do
      ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1
    done
    sleep 0.5
    for id in $(ctr_ tasks ls -q 2>/dev/null); do ctr_ tasks rm -f "$id" >/dev/null 2>&1; done
  fi
  stop_one containerd
  # The shims of this containerd (started with -address $SOCK).
  local p
  for p in /proc/[0-9]*; do
    if { tr '\0' ' ' <"$p/cmdline"; } 2>/dev/null | grep -qF -- "-address $SOCK "; then
      kill -KILL "${p#/proc/}" 2>/dev/null || true
    fi
  done
  # Mounts under the node's directory (pod network namespaces, volumes, container roots).
  if [[ -d $NODE_DIR ]]; then
    awk -v w="$NODE_DIR/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  fi
  # The kubelet's cgroups, deepest first.
  local d
  while read -r d; do
    [[ -d $d ]] && find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null
  done < <(cgroup_dirs)
  for name in "${NODE_PROCS[@]}"; do rm -f "$PIDS/$name.pid"; done
  # Iptables rules of kube-proxy and kube-router live in the namespace and go with it.
  if [[ -d $NODE_DIR ]]; then rm -rf "$NODE_DIR"; fi
  log "node stopped"
}

status() {
  local name
  for name in "${NODE_PROCS[@]}"; do
    if running "$name"; then printf '%-24s running (pid %s)\n' "$name" "$(cat "$PIDS/$name.pid")"
    else printf '%-24s stopped\n' "$name"; fi
  done
  kctl get node -o wide 2>/dev/null || true
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  import) shift; require_env; import_images "$@" ;;
  *) die "usage: $0 up|down|status|import ARCHIVE..." ;;
esac
