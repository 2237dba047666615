#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces deepfm-h0 and deepfm-h1 joined by a veth pair
# (10.231.0.1 <-> 10.231.0.2, addresses that exist only inside these namespaces). One torchrun node in each,
# rendezvous over that link, one rank per node, gloo. Needs root (ip netns). Removes the namespaces on exit.
#
#   bash bench/distributed_two_hosts.sh CONFIG OUTPUT_DIR [DEEPFM TRAIN OPTIONS...]
#   e.g. ... CONFIG OUT --set train.embedding_sharding=row     (the table row-sharded across the two hosts)
# PYTHON=path/to/python chooses the interpreter; TAG=x names the namespaces and links deepfm-x-h0 ..., so that
# two runs at once on one machine do not meet.
set -euo pipefail
config=${1:?usage: distributed_two_hosts.sh CONFIG OUTPUT_DIR [OPTIONS]}
output=${2:?usage: distributed_two_hosts.sh CONFIG OUTPUT_DIR [OPTIONS]}
shift 2
python=${PYTHON:-python3}
port=${PORT:-29531}
tag=${TAG:-}
h0=deepfm-${tag:+$tag-}h0; h1=deepfm-${tag:+$tag-}h1
v0=dfm${tag:0:6}v0; v1=dfm${tag:0:6}v1

. "$(dirname "$0")/netns_pair.sh"
cleanup() { netns_remove "$h0" "$h1"; }
trap cleanup EXIT
netns_pair "$h0" "$h1" "$v0" "$v1" 10.231.0

run_node() {  # namespace, node rank, interface, whether this node hosts the rendezvous store, its address, options
  local ns=$1 node=$2 ifname=$3 is_host=$4 addr=$5
  shift 5
  # --local-addr: both namespaces share one hostname, so each node must say which address is its own
  ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifname" OMP_NUM_THREADS=1 timeout -k 10 200 \
    "$python" -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank "$node" --local-addr "$addr" \
      --rdzv-backend c10d --rdzv-endpoint "10.231.0.1:$port" --rdzv-id deepfm-two-hosts \
      --rdzv-conf "is_host=$is_host,join_timeout=60" --max-restarts 0 \
      -m deepfm train "$config" --output "$output" --no-progress "$@"
}
run_node "$h0" 0 "$v0" true 10.231.0.1 "$@" > "$output.node0.log" 2>&1 &
pid0=$!
sleep 1
run_node "$h1" 1 "$v1" false 10.231.0.2 "$@" > "$output.node1.log" 2>&1 &
pid1=$!
status=0
wait "$pid0" || status=$?
wait "$pid1" || status=$?
tail -n 6 "$output.node0.log"
if [ "$status" -ne 0 ]; then
  echo "--- node 1 log:"; tail -n 20 "$output.node1.log"
  exit "$status"
fi
echo "two-host training over the veth pair finished: $output"
