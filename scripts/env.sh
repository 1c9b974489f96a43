#!/usr/bin/env bash
# The local environment: Apache Kafka (KRaft, one node), etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and an S3-compatible object store
# (SeaweedFS, for checkpoints), all as local processes on 127.0.0.1.
#
#   scripts/env.sh up       build/fetch what is missing, start, wait until every component answers
#   scripts/env.sh down     stop every process started by `up` (and nothing else)
#   scripts/env.sh status   show each component and whether it answers
#   scripts/env.sh kafka-kill / kafka-start   a broker outage (make chaos)
#
# State lives in $STREAMSCORE_DEV_DIR (default .dev/); ports start at
# $STREAMSCORE_PORT_BASE (default 27000) so a developer's environment and a
# test run (make test uses .dev/test and 28000) never collide.
#
# With STREAMSCORE_NETNS=1 (root only), every component runs inside a network namespace the
# script creates (streamscore-<port base>), the one the local node (scripts/node.sh) runs its
# pods in: pods reach the API server, the broker (a second listener, PODS) and the S3 gateway at
# the namespace's node address ($NODE_IP), which exists nowhere else. The host reaches the same
# 127.0.0.1 ports as without it, through scripts/nsforward.py; nothing inside the namespace can
# reach any address outside it (it has no route out).
. "$(dirname "$0")/lib.sh"

# shellcheck source=env-vars.sh
. "$ROOT/scripts/env-vars.sh"
export PATH="$K8S_BIN:$HELM_BIN:$PROMTOOL_BIN:$PATH"

# start_in name command...: start, inside the network namespace when there is one.
start_in() { local name=$1; shift; start "$name" "${NSX[@]}" "$@"; }

# netns_up: the namespace, its loopback with the node's address too, and the
# host's forwarder into it (the same 127.0.0.1 ports as every component's).
netns_up() {
  [[ -n $NETNS ]] || return 0
  [[ $(id -u) -eq 0 ]] || die "STREAMSCORE_NETNS=1 needs root (ip netns add)"
  ensure_packages iproute2 util-linux
  if [[ ! -e /run/netns/$NETNS ]]; then
    ip netns add "$NETNS"
    ip -n "$NETNS" link set lo up
    ip -n "$NETNS" addr add "$NODE_IP/32" dev lo
  fi
  echo "$NETNS" >"$DEV/netns"
  local p specs=()
  for p in "$ETCD_PORT" "$APISERVER_PORT" "$KCM_PORT" "$SCHED_PORT" "$KAFKA_PORT" "$S3_PORT"; do
    specs+=("to-ns:127.0.0.1:$p=127.0.0.1:$p")
  done
  start forward python3 "$ROOT/scripts/nsforward.py" "/run/netns/$NETNS" "${specs[@]}"
}

# pki_cert name subject [sans]: a key and a certificate signed by the local CA, unless present.
pki_cert() {
  [[ -f $PKI/$1.crt ]] && return 0
  (
    cd "$PKI"
    openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
    local ext; ext=$(mktemp)
    if [[ -n ${3:-} ]]; then
      printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n' "$3" > "$ext"
    else
      printf 'extendedKeyUsage=clientAuth\n' > "$ext"
    fi
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 -extfile "$ext" 2>/dev/null
    rm -f "$ext" "$1.csr"
  )
}

gen_pki() {
  command -v openssl >/dev/null || die "openssl is required"
  mkdir -p "$PKI"
  if [[ ! -f $PKI/ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$PKI/ca.key" -out "$PKI/ca.crt" -days 3650 -subj "/CN=streamscore-local-ca" 2>/dev/null
    openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
    openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null
  fi
  pki_cert apiserver "/CN=kube-apiserver" "IP:127.0.0.1,IP:10.96.0.1,IP:$NODE_IP,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  pki_cert admin "/O=system:masters/CN=streamscore-admin"
  pki_cert controller-manager "/CN=system:kube-controller-manager"
  pki_cert scheduler "/CN=system:kube-scheduler"
  # The API server's client certificate towards kubelets (logs, exec), and the local node's.
  pki_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client"
  pki_cert kubelet "/O=system:nodes/CN=system:node:$NODE_NAME" "IP:$NODE_IP,DNS:$NODE_NAME"
  pki_cert kube-proxy "/CN=system:kube-proxy"
}

kubeconfig() { # file user
  cat > "$1" <<KC
apiVersion: v1
kind: Config
clusters:
- name: streamscore-local
  cluster:
    server: https://127.0.0.1:$APISERVER_PORT
    certificate-authority: $PKI/ca.crt
users:
- name: $2
  user:
    client-certificate: $PKI/$2.crt
    client-key: $PKI/$2.key
contexts:
- name: streamscore-local
  context: {cluster: streamscore-local, user: $2, namespace: default}
current-context: streamscore-local
KC
}

kafka_cp() { echo "$KAFKA_LIBS/*"; }

kafka_answers() {
  java -cp "$(kafka_cp)" -Dlog4j.configuration="file:$DEV/kafka/tools-log4j.properties" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "127.0.0.1:$KAFKA_PORT" --list
}

start_kafka() {
  local dir="$DEV/kafka"; mkdir -p "$dir" "$DATA/kafka" "$LOGS"
  local pods_listener=""
  if [[ -n $NETNS ]]; then pods_listener=",PODS://$NODE_IP:$KAFKA_PODS_PORT"; fi
  cat > "$dir/server.properties" <<P
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT$pods_listener
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT$pods_listener
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,PODS:PLAINTEXT
log.dirs=$DATA/kafka
num.partitions=4
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
log.flush.interval.messages=9223372036854775807
P
  cat > "$dir/log4j.properties" <<'P'
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka=INFO
log4j.logger.org.apache.kafka=INFO
P
  # Command-line tools (topic admin, console consumer) log warnings only.
  printf 'log4j.rootLogger=WARN, stderr\nlog4j.appender.stderr=org.apache.log4j.ConsoleAppender\nlog4j.appender.stderr.Target=System.err\nlog4j.appender.stderr.layout=org.apache.log4j.PatternLayout\nlog4j.appender.stderr.layout.ConversionPattern=[%%d] %%p %%m (%%c)%%n\n' > "$dir/tools-log4j.properties"
  if [[ ! -f $DATA/kafka/meta.properties ]]; then
    local id; id=$(java -cp "$(kafka_cp)" kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n1)
    java -cp "$(kafka_cp)" -Dlog4j.configuration="file:$dir/log4j.properties" \
      kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" >"$LOGS/kafka-format.log" 2>&1 \
      || { cat "$LOGS/kafka-format.log" >&2; die "formatting Kafka storage failed"; }
  fi
  start_in kafka java -Xms256m -Xmx768m -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j.configuration="file:$dir/log4j.properties" -cp "$(kafka_cp)" kafka.Kafka "$dir/server.properties"
}

start_seaweedfs() {
  mkdir -p "$DATA/seaweedfs"
  local bind=127.0.0.1
  if [[ -n $NETNS ]]; then bind=0.0.0.0; fi
  # Without the caller's AWS_* variables: the S3 gateway would make them an admin identity
  # and refuse anonymous requests (403), where the tests and the demo expect any key to work.
  start_in seaweedfs env -u AWS_ACCESS_KEY_ID -u AWS_SECRET_ACCESS_KEY -u AWS_SESSION_TOKEN \
    "$WEED_BIN/weed" server -dir="$DATA/seaweedfs" -ip=127.0.0.1 -ip.bind="$bind" \
    -master.port="$WEED_MASTER_PORT" -master.port.grpc="$WEED_MASTER_GRPC" \
    -volume.port="$WEED_VOLUME_PORT" -volume.port.grpc="$WEED_VOLUME_GRPC" \
    -filer.port="$WEED_FILER_PORT" -filer.port.grpc="$WEED_FILER_GRPC" \
    -s3 -s3.port="$S3_PORT" -s3.port.grpc="$S3_GRPC" -volume.max=0 -master.volumeSizeLimitMB=256
}

s3_answers() { curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$S3_PORT/" | grep -qE '^(200|403)$'; }

# The bucket the tests and the demo keep checkpoints in (an existing one answers 409).
S3_BUCKET=streamscore
create_bucket() {
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -X PUT "http://127.0.0.1:$S3_PORT/$S3_BUCKET")
  [[ $code == 200 || $code == 409 ]] || die "creating bucket $S3_BUCKET on the S3 gateway answered HTTP $code"
}

start_control_plane() {
  gen_pki
  kubeconfig "$DEV/admin.kubeconfig" admin
  kubeconfig "$DEV/controller-manager.kubeconfig" controller-manager
  kubeconfig "$DEV/scheduler.kubeconfig" scheduler
  kubeconfig "$DEV/kubelet.kubeconfig" kubelet
  kubeconfig "$DEV/kube-proxy.kubeconfig" kube-proxy
  mkdir -p "$DATA/etcd"
  start_in etcd "$ETCD_BIN/etcd" --name local --data-dir "$DATA/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync --log-level warn
  wait_for etcd 30 curl -sf "http://127.0.0.1:$ETCD_PORT/health"
  # In the namespace: every address of it (the node's too), and the kubernetes Service's endpoint
  # is the node's address.
  local bind=127.0.0.1 advertise=127.0.0.1
  if [[ -n $NETNS ]]; then bind=0.0.0.0; advertise=$NODE_IP; fi
  start_in kube-apiserver "$K8S_BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
    --bind-address "$bind" --advertise-address "$advertise" --secure-port "$APISERVER_PORT" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-preferred-address-types InternalIP \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range "$SERVICE_CIDR" --authorization-mode Node,RBAC \
    --allow-privileged=true --profiling=false --cert-dir "$DEV/apiserver-certs" --v 1
  wait_for kube-apiserver 90 curl -sf --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" \
    "https://127.0.0.1:$APISERVER_PORT/readyz"
  start_in kube-controller-manager "$K8S_BIN/kube-controller-manager" \
    --kubeconfig "$DEV/controller-manager.kubeconfig" \
    --authentication-kubeconfig "$DEV/controller-manager.kubeconfig" \
    --authorization-kubeconfig "$DEV/controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --use-service-account-credentials --controllers '*' --cert-dir "$DEV/kcm-certs" --v 1
  start_in kube-scheduler "$K8S_BIN/kube-scheduler" --kubeconfig "$DEV/scheduler.kubeconfig" \
    --authentication-kubeconfig "$DEV/scheduler.kubeconfig" \
    --authorization-kubeconfig "$DEV/scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --v 1
  wait_for kube-controller-manager 60 curl -skf "https://127.0.0.1:$KCM_PORT/healthz"
  wait_for kube-scheduler 60 curl -skf "https://127.0.0.1:$SCHED_PORT/healthz"
}

write_env_file() {
  cat > "$DEV/env.sh" <<E
# streamscore local environment (written by scripts/env.sh up). Use: . $DEV/env.sh
export STREAMSCORE_DEV_DIR="$DEV"
export KUBECONFIG="$DEV/admin.kubeconfig"
export KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:$KAFKA_PORT"
export STREAMSCORE_KAFKA_CLASSPATH="$KAFKA_LIBS/*"
export STREAMSCORE_KAFKA_LOG4J="file:$DEV/kafka/tools-log4j.properties"
export STREAMSCORE_APISERVER="https://127.0.0.1:$APISERVER_PORT"
export STREAMSCORE_PORT_BASE="$B"
export ORT_DYLIB_PATH="$(onnxruntime_lib)"
# The S3 gateway (SeaweedFS; any access key works) for checkpoint tests and the demo.
export STREAMSCORE_S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
export STREAMSCORE_S3_BUCKET="$S3_BUCKET"
export AWS_ENDPOINT="http://127.0.0.1:$S3_PORT"
export AWS_ALLOW_HTTP=true
export AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=streamscore
export AWS_SECRET_ACCESS_KEY=streamscore
export PATH="$K8S_BIN:$HELM_BIN:$PROMTOOL_BIN:\$PATH"
E
  if [[ -n $NETNS ]]; then
    cat >> "$DEV/env.sh" <<E
# The network namespace every component runs in (scripts/node.sh runs the node's pods there);
# the addresses pods use for the broker and the S3 gateway.
export STREAMSCORE_NETNS_NAME="$NETNS"
export STREAMSCORE_NODE_IP="$NODE_IP"
export STREAMSCORE_KAFKA_PODS="$NODE_IP:$KAFKA_PODS_PORT"
export STREAMSCORE_S3_PODS="http://$NODE_IP:$S3_PORT"
E
  fi
}

up() {
  bash "$ROOT/scripts/build-k8s.sh" all
  bash "$ROOT/scripts/fetch-kafka.sh"
  local t0=$SECONDS
  if [[ -n $NETNS && ! -f $DEV/netns ]] && running kube-apiserver; then
    die "an environment outside a network namespace runs in $DEV: stop it first (make env-down)"
  fi
  netns_up
  start_kafka
  start_seaweedfs
  start_control_plane
  wait_for kafka 90 kafka_answers
  wait_for seaweedfs 60 s3_answers
  create_bucket
  write_env_file
  log "environment up in $((SECONDS - t0))s (state in $DEV)"
  cat >&2 <<M
  Kafka:          127.0.0.1:$KAFKA_PORT (KRaft, one node)
  S3 (SeaweedFS): http://127.0.0.1:$S3_PORT (checkpoints; any access key)
  kube-apiserver: https://127.0.0.1:$APISERVER_PORT (+ etcd, controller-manager, scheduler; no kubelet)
  Use it:         . $DEV/env.sh && kubectl get ns
  Stop it:        make env-down
M
}

down() {
  local name
  if [[ -f $PIDS/kubelet.pid || -f $PIDS/containerd.pid ]]; then
    bash "$ROOT/scripts/node.sh" down || log "stopping the node failed; stopping the rest"
  fi
  for name in kube-scheduler kube-controller-manager kube-apiserver etcd kafka seaweedfs forward; do
    stop_one "$name"
  done
  if [[ -n $NETNS && -e /run/netns/$NETNS ]]; then
    ip netns del "$NETNS"
    log "removed the network namespace $NETNS"
  fi
  rm -f "$DEV/netns"
}

status() {
  local rc=0 name
  for name in kafka seaweedfs etcd kube-apiserver kube-controller-manager kube-scheduler; do
    if running "$name"; then printf '%-24s running (pid %s)\n' "$name" "$(cat "$PIDS/$name.pid")"
    else printf '%-24s stopped\n' "$name"; rc=1; fi
  done
  if running kube-apiserver; then
    printf '%-24s %s\n' "apiserver /readyz" "$(curl -s --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "https://127.0.0.1:$APISERVER_PORT/readyz" || echo unreachable)"
  fi
  [[ -f $DEV/env.sh ]] && echo "env file: $DEV/env.sh"
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  # The chaos suite's broker outage: kill the broker (no clean shutdown), later start it again.
  kafka-kill) stop_one kafka KILL ;;
  kafka-start) start_kafka; wait_for kafka 90 kafka_answers ;;
  *) die "usage: $0 up|down|status|kafka-kill|kafka-start" ;;
esac
