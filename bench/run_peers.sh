#!/usr/bin/env bash
# Run every peer runner on one train/test pair, appending JSON lines to OUT.
#   bash bench/run_peers.sh TRAIN.tsv TEST.tsv OUT.jsonl [extra runner args...]
# Before each run it waits (up to QUIET_WAIT_S, default 180 s) for the 1-minute
# load average to drop below QUIET_LOAD (default 1.0): the dev box has 2 cores,
# and a concurrent job there easily halves the numbers.  Each JSON line records
# loadavg_1m_5m so contaminated runs can be spotted afterwards.
set -uo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TRAIN="$1"; TEST="$2"; OUT="$3"; shift 3
PEERS="${PEERS:-deepctr fuxictr torchrec}"
wait_quiet() {
  local t=0
  while awk -v q="${QUIET_LOAD:-1.0}" '{exit !($1 >= q)}' /proc/loadavg && [ $t -lt "${QUIET_WAIT_S:-180}" ]; do
    sleep 5; t=$((t + 5))
  done
}
mkdir -p "$HERE/.out"
for p in $PEERS; do
  wait_quiet
  echo "== $p (load $(cut -d' ' -f1-2 /proc/loadavg))" >&2
  "$HERE/.envs/$p/bin/python" "$HERE/peers/run_$p.py" --train "$TRAIN" --test "$TEST" --json-out "$OUT" "$@" \
      2>"$HERE/.out/run_$p.err" >/dev/null || echo "$p failed (see bench/.out/run_$p.err)" >&2
done
