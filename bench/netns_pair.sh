# Sourced by the two-host scripts: two network namespaces joined by a veth pair, as two machines on one link.
#   netns_pair NS0 NS1 IF0 IF1 PREFIX     -> NS0 has PREFIX.1/24 on IF0, NS1 has PREFIX.2/24 on IF1, all links up
#   netns_remove NS0 NS1                  -> removes both (the veth pair goes with them)
netns_remove() {
  ip netns del "$1" 2>/dev/null || true
  ip netns del "$2" 2>/dev/null || true
}

netns_pair() {
  local ns0=$1 ns1=$2 if0=$3 if1=$4 prefix=$5
  netns_remove "$ns0" "$ns1"
  ip netns add "$ns0"
  ip netns add "$ns1"
  ip link add "$if0" type veth peer name "$if1"
  ip link set "$if0" netns "$ns0"
  ip link set "$if1" netns "$ns1"
  ip -n "$ns0" addr add "$prefix.1/24" dev "$if0"
  ip -n "$ns1" addr add "$prefix.2/24" dev "$if1"
  for ns in "$ns0" "$ns1"; do ip -n "$ns" link set lo up; done
  ip -n "$ns0" link set "$if0" up
  ip -n "$ns1" link set "$if1" up
}
