#!/usr/bin/env bash
# Two "hosts" on one machine: network namespaces deepfm-h0 and deepfm-h1 joined by a veth pair
# (10.231.0.1 <-> 10.231.0.2, addresses that exist only inside these namespaces). One torchrun node in each,
# rendezvous over that link, one rank per node, gloo. Needs root (ip netns). Removes the namespaces on exit.
#
#   bash bench/distributed_two_hosts.sh CONFIG OUTPUT_DIR     (PYTHON=path/to/python to choose the interpreter)
set -euo pipefail
config=${1:?usage: distributed_two_hosts.sh CONFIG OUTPUT_DIR}
output=${2:?usage: distributed_two_hosts.sh CONFIG OUTPUT_DIR}
python=${PYTHON:-python3}
port=${PORT:-29531}
h0=deepfm-h0; h1=deepfm-h1

cleanup() {
  ip netns del "$h0" 2>/dev/null || true
  ip netns del "$h1" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$h0"
ip netns add "$h1"
ip link add dfm-veth0 type veth peer name dfm-veth1
ip link set dfm-veth0 netns "$h0"
ip link set dfm-veth1 netns "$h1"
ip -n "$h0" addr add 10.231.0.1/24 dev dfm-veth0
ip -n "$h1" addr add 10.231.0.2/24 dev dfm-veth1
for ns in "$h0" "$h1"; do ip -n "$ns" link set lo up; done
ip -n "$h0" link set dfm-veth0 up
ip -n "$h1" link set dfm-veth1 up

run_node() {  # namespace, node rank, interface, whether this node hosts the rendezvous store, its address
  # --local-addr: both namespaces share one hostname, so each node must say which address is its own
  ip netns exec "$1" env GLOO_SOCKET_IFNAME="$3" OMP_NUM_THREADS=1 timeout -k 10 200 \
    "$python" -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --node-rank "$2" --local-addr "$5" \
      --rdzv-backend c10d --rdzv-endpoint "10.231.0.1:$port" --rdzv-id deepfm-two-hosts \
      --rdzv-conf "is_host=$4,join_timeout=60" --max-restarts 0 \
      -m deepfm train "$config" --output "$output" --no-progress
}
run_node "$h0" 0 dfm-veth0 true 10.231.0.1 > "$output.node0.log" 2>&1 &
pid0=$!
sleep 1
run_node "$h1" 1 dfm-veth1 false 10.231.0.2 > "$output.node1.log" 2>&1 &
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
