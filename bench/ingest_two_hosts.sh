#!/usr/bin/env bash
# Two "hosts" that share no data: network namespaces deepfm-i-h0 and deepfm-i-h1 joined by a veth pair
# (10.232.0.1 <-> 10.232.0.2, addresses that exist only inside these namespaces). An S3 server (SeaweedFS,
# tests/s3server.py) runs in h0 and listens on 10.232.0.1 only, never on the machine's outside addresses; the
# bundled Criteo sample is uploaded to it as gzip'ed parts of a day partition. One torchrun node per namespace,
# one rank each, data.prepare_on: every_rank: each rank reads its share of the parts from the store, the
# vocabularies are merged over the link, each rank keeps its rows in its own cache folder and trains on them.
# Each node has its own cache and output folder (OUTPUT/node0, OUTPUT/node1): nothing is read from the other's.
# Needs root (ip netns). Removes the namespaces and stops the server (by PID) on exit.
# INTERRUPT_AT_STEP=N: the job (batch 64, a checkpoint every N steps) is stopped as a lost machine would stop it,
# once node 0 holds its first checkpoint, then run again with --resume: node 0 holds the checkpoint, node 1
# gets it over the link and each node reuses its own prepared rows (node*.interrupted.log: the first run's logs).
#
#   bash bench/ingest_two_hosts.sh OUTPUT_DIR [DEEPFM TRAIN OPTIONS...]
# PYTHON=path/to/python chooses the interpreter; TAG=x names the namespaces deepfm-x-h0 ... (two runs at once).
set -euo pipefail
output=${1:?usage: ingest_two_hosts.sh OUTPUT_DIR [OPTIONS]}
shift 1
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
port=${PORT:-29541}
tag=${TAG:-i}
h0=deepfm-$tag-h0; h1=deepfm-$tag-h1
v0=dfi${tag:0:6}v0; v1=dfi${tag:0:6}v1
mkdir -p "$output/node0" "$output/node1" "$output/upload/criteo/dt=2026-12-05"
output=$(cd "$output" && pwd)
server_pid=

. "$here/bench/netns_pair.sh"
cleanup() {
  if [ -n "$server_pid" ]; then kill -TERM "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  netns_remove "$h0" "$h1"
}
trap cleanup EXIT
netns_pair "$h0" "$h1" "$v0" "$v1" 10.232.0

# the day's logs: the sample's training rows as 4 gzip'ed parts, and its dev / test files
day="$output/upload/criteo/dt=2026-12-05"
split -n l/4 -d --additional-suffix=.tsv "$here/examples/criteo/data/train.tsv" "$day/part-"
gzip -f "$day"/part-*.tsv
cp "$here/examples/criteo/data/dev.tsv" "$here/examples/criteo/data/test.tsv" "$output/upload/"

# the store, in h0, on the link's address only; its first line says where it listens
ip netns exec "$h0" "$python" "$here/tests/s3server.py" --dir "$output/s3" --ip 10.232.0.1 \
  --upload "$output/upload" logs > "$output/s3.out" 2> "$output/s3.err" &
server_pid=$!
for _ in $(seq 600); do grep -q endpoint "$output/s3.out" 2>/dev/null && break; sleep 0.2; done
endpoint=$("$python" -c 'import json,sys; print(json.loads(open(sys.argv[1]).readline())["endpoint"])' "$output/s3.out")
eval "$(PYTHONPATH="$here/tests" "$python" -c 'import s3server; print(" ".join(f"{k}={v}" for k, v in
  {"key": s3server.ACCESS_KEY, "secret": s3server.SECRET_KEY}.items()))')"

run_node() {  # namespace, node rank, interface, whether this node hosts the rendezvous store, its address, options
  local ns=$1 node=$2 ifname=$3 is_host=$4 addr=$5
  shift 5
  exec ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifname" OMP_NUM_THREADS=1 AWS_ENDPOINT_URL="$endpoint" \
    AWS_ACCESS_KEY_ID="$key" AWS_SECRET_ACCESS_KEY="$secret" AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true \
    timeout -k 10 300 "$python" -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank "$node" \
      --local-addr "$addr" --rdzv-backend c10d --rdzv-endpoint "10.232.0.1:$port" --rdzv-id deepfm-ingest-two-hosts \
      --rdzv-conf "is_host=$is_host,join_timeout=60" --max-restarts 0 \
      -m deepfm train "$here/examples/criteo/config.yaml" --output "$output/node$node/model" --no-progress \
      --set data.prepare_on=every_rank --set "data.train=s3://logs/criteo/" \
      --set data.valid=s3://logs/dev.tsv --set data.test=s3://logs/test.tsv \
      --set "data.cache_dir=$output/node$node/cache" "$@"
}
start_job() {  # both nodes in the background (pid0, pid1), logs in node0.log / node1.log
  run_node "$h0" 0 "$v0" true 10.232.0.1 "$@" > "$output/node0.log" 2>&1 &
  pid0=$!
  sleep 1
  run_node "$h1" 1 "$v1" false 10.232.0.2 "$@" > "$output/node1.log" 2>&1 &
  pid1=$!
}
resume=()
if [ -n "${INTERRUPT_AT_STEP:-}" ]; then
  every=(--set train.batch_size=64 --set "train.checkpoint_every_steps=$INTERRUPT_AT_STEP")
  start_job "${every[@]}" "$@"
  state="$output/node0/.model.run/last/state.json"
  while kill -0 "$pid0" 2>/dev/null && ! [ -f "$state" ]; do sleep 0.05; done
  kill -TERM "$pid0" "$pid1" 2>/dev/null || true  # timeout passes it on to torchrun, which stops its rank
  wait "$pid0" || true
  wait "$pid1" || true
  if ! [ -f "$state" ] || [ -f "$output/node0/model/metrics.json" ]; then
    echo "the job was not stopped mid-run (no checkpoint, or it had finished): see $output/node0.log"; exit 1
  fi
  echo "stopped after the checkpoint of step $("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$state"); resuming"
  for node in 0 1; do mv "$output/node$node.log" "$output/node$node.interrupted.log"; done
  resume=("${every[@]}" --resume)
fi
start_job "${resume[@]}" "$@"
status=0
wait "$pid0" || status=$?
wait "$pid1" || status=$?
tail -n 6 "$output/node0.log"
if [ "$status" -ne 0 ]; then
  echo "--- node 1 log:"; tail -n 20 "$output/node1.log"
  echo "--- server:"; tail -n 5 "$output/s3.err"
  exit "$status"
fi
echo "two hosts trained from the S3 store, each on its own files: $output/node0/model"
