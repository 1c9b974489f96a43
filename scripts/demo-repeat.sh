#!/usr/bin/env bash
# The newcomer path, repeated (CI runs it after `make test`): `make demo` twice in a row on the
# same machine, the second time after a plain `kubectl apply -f manifests/` (as a user who tried
# the manifests first would have done). Each run must end with its TenantModels Ready and the
# rescale done; the second must adopt what the first and the manifests left.
. "$(dirname "$0")/lib.sh"
cd "$ROOT"
# The environment between the two runs is the one make demo uses (in a network namespace when
# the demo runs its pods on the local node).
if [[ $(demo_node) == kubelet ]]; then export STREAMSCORE_NETNS=1; fi
log "make demo, first run"
bash "$ROOT/scripts/demo.sh"
log "kubectl apply -f manifests/ (the plain-YAML install), then make demo again"
bash "$ROOT/scripts/env.sh" up >/dev/null
# shellcheck disable=SC1091
. "$DEV/env.sh"
kubectl apply -f manifests/ >/dev/null
bash "$ROOT/scripts/demo.sh"
log "make demo ran twice in a row"
