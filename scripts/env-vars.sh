# shellcheck shell=bash disable=SC2034
# The local environment's ports and addresses, sourced (after lib.sh) by scripts/env.sh and
# scripts/node.sh. Ports start at $STREAMSCORE_PORT_BASE (default 27000).
B="${STREAMSCORE_PORT_BASE:-27000}"
ETCD_PORT=$((B + 79)); ETCD_PEER_PORT=$((B + 80))
APISERVER_PORT=$((B + 43)); KCM_PORT=$((B + 57)); SCHED_PORT=$((B + 59))
KAFKA_PORT=$((B + 92)); KAFKA_CONTROLLER_PORT=$((B + 93))
# SeaweedFS: master, volume, filer, S3 gateway, and their gRPC ports (all in this range).
WEED_MASTER_PORT=$((B + 33)); WEED_VOLUME_PORT=$((B + 34)); WEED_FILER_PORT=$((B + 35)); S3_PORT=$((B + 36))
WEED_MASTER_GRPC=$((B + 37)); WEED_VOLUME_GRPC=$((B + 38)); WEED_FILER_GRPC=$((B + 39)); S3_GRPC=$((B + 40))
PKI="$DEV/pki"; DATA="$DEV/data"
SERVICE_CIDR=10.96.0.0/16
# The network namespace (STREAMSCORE_NETNS=1) and the node's address inside it.
NETNS=""
if [[ ${STREAMSCORE_NETNS:-0} == 1 || -f $DEV/netns ]]; then NETNS="streamscore-$B"; fi
NODE_IP=10.201.0.1
NODE_NAME=streamscore-node
KAFKA_PODS_PORT=$((B + 94))
# The local node (scripts/node.sh): its pods' addresses, the kubelet's and kube-proxy's ports.
POD_CIDR=10.202.0.0/24
KUBELET_PORT=$((B + 50)); KUBELET_HEALTHZ_PORT=$((B + 51))
KUBE_PROXY_METRICS_PORT=$((B + 52)); KUBE_PROXY_HEALTHZ_PORT=$((B + 53)); KUBE_ROUTER_HEALTH_PORT=$((B + 54))
# NSX command...: runs the command inside the network namespace when there is one.
NSX=()
if [[ -n $NETNS ]]; then NSX=(nsenter "--net=/run/netns/$NETNS"); fi
