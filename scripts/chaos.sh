#!/usr/bin/env bash
# `make chaos`: the long form of the fault-injection suite (tests/tests/chaos.rs) in a private
# environment (.dev/chaos, ports from 30000), because it kills and restarts the broker. The
# table is appended to .dev/chaos/chaos-report.md and printed. The short form runs in make test.
. "$(dirname "$0")/lib.sh"
export STREAMSCORE_DEV_DIR="${STREAMSCORE_CHAOS_DEV_DIR:-$ROOT/.dev/chaos}"
export STREAMSCORE_PORT_BASE="${STREAMSCORE_CHAOS_PORT_BASE:-30000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"

bash "$ROOT/scripts/install-deps.sh"
cleanup() { bash "$ROOT/scripts/env.sh" down || true; }
trap cleanup EXIT INT TERM

cd "$ROOT"
cargo build --workspace --all-targets --locked
bash "$ROOT/scripts/env.sh" up
# shellcheck disable=SC1091
. "$STREAMSCORE_DEV_DIR/env.sh"
rm -f "$STREAMSCORE_DEV_DIR/chaos-report.md"
log "fault-injection suite, long form (about 30 min)"
cargo test --workspace --test chaos --locked -- --ignored --nocapture chaos_long
log "handoffs without local state, 20 runs each (about 15 min)"
STREAMSCORE_HANDOFF_RUNS=20 cargo test --workspace --test rebuild_handoff --locked -- --nocapture --test-threads 1
log "cut-over: the operator aborted at every step, away longer than the fence hold, a live worker stopped, a candidate killed (about 8 min)"
cargo test --workspace --test e2e_local --locked -- --nocapture --test-threads 1 \
  an_operator_killed_at_every_step an_operator_away_longer_than_the_fence_hold \
  a_rollback_asks_a_live_worker_that_missed_its_resume_again a_candidate_restarted_during_the_cut_over_stays_paused
cat "$STREAMSCORE_DEV_DIR/chaos-report.md"
