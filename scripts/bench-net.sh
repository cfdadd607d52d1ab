#!/usr/bin/env bash
# Network benchmark: time to first byte of an HTTP fetch and the throughput
# of a 100 MiB download from a test host, through vmette's network stack
# and through passt (Debian's, over QEMU's -netdev stream, configured as
# the guest's static network is), on the same guest (the toolbox preset,
# the same kernel and agent) in one run. Every packet stays inside network
# namespaces the script makes and removes, so it needs root.
#
#   scripts/bench-net.sh [RUNS]     (default 5 fetches of each kind per stack)
#
# Prints the medians, and the ratio of vmette's throughput to passt's
# (goal >= 0.8). A third run fetches the same files by name through the
# egress allowlist (--allow-host, the HTTP Host read on the host), and its
# throughput is set against plain --net's by the same name (goal >= 0.9).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
vmette=${VMETTE:-$PWD/target/release/vmette}
[ -x "$vmette" ] || { echo "bench-net: build first (./setup.sh)" >&2; exit 125; }
[ "$(id -u)" = 0 ] || { echo "bench-net: network namespaces need root" >&2; exit 125; }
command -v passt >/dev/null || { echo "bench-net: passt is missing; run ./setup.sh --with-test-tools" >&2; exit 125; }

name=vmbench$$
vm=${name}v
world=${name}w
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    ip netns del "$vm" 2>/dev/null || true
    ip netns del "$world" 2>/dev/null || true
    rm -rf "$work" "/etc/netns/$vm"
}
trap cleanup EXIT

# The lab of the network tests (crates/vmette-cli/tests/support/netlab.rs):
# vmette's namespace routes everything to the test host's.
ip netns add "$vm"
ip netns add "$world"
ip link add "${name}a" netns "$vm" type veth peer name "${name}b" netns "$world"
ip -n "$vm" link set lo up
ip -n "$vm" link set "${name}a" up
ip -n "$vm" addr add 198.18.0.1/24 dev "${name}a"
ip -n "$vm" route add default via 198.18.0.2
ip -n "$world" link set lo up
ip -n "$world" link set "${name}b" up
ip -n "$world" addr add 198.18.0.2/24 dev "${name}b"
ip -n "$world" addr add 198.18.0.10/32 dev "${name}b"

mkdir "$work/web"
echo "hello from the test host" > "$work/web/index.html"
head -c $((100 << 20)) /dev/urandom > "$work/web/big.bin"
ip netns exec "$world" python3 -m http.server 80 --bind 198.18.0.10 --directory "$work/web" \
    > /dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
    ip netns exec "$vm" python3 -c "import socket; socket.create_connection(('198.18.0.10', 80), 1)" \
        2>/dev/null && break
    sleep 0.1
done

"$vmette" -q setup --presets toolbox

# One VM per stack; the fetches run in the guest, timed by curl there.
# The same downloads by name, through the egress allowlist: the name
# comes from the namespace's hosts file, which the stack reads.
mkdir -p "/etc/netns/$vm"
echo "198.18.0.10 bench.test" > "/etc/netns/$vm/hosts"
script_for() {
    printf '%s' "for i in \$(seq $runs); do curl -sS -o /dev/null -w 'ttfb %{time_starttransfer}\n' http://$1/index.html; done; \
for i in \$(seq $runs); do curl -sS -o /dev/null -w 'bps %{speed_download}\n' http://$1/big.bin; done"
}
script=$(script_for 198.18.0.10)

ip netns exec "$vm" "$vmette" run --net toolbox -- sh -c "$script" > "$work/vmette.out"
# By name both, so that both pay for the guest's DNS lookup.
ip netns exec "$vm" "$vmette" run --net toolbox -- sh -c "$(script_for bench.test)" \
    > "$work/by-name.out"
ip netns exec "$vm" "$vmette" run --allow-host bench.test toolbox -- sh -c "$(script_for bench.test)" \
    > "$work/allowlist.out"

# passt with the guest's static configuration: 10.0.2.15/24, gateway
# 10.0.2.2, vmette's MTU; IPv4 only, no DHCP, as the guest asks nothing.
# As root passt would become nobody, who cannot bind in the work directory.
ip netns exec "$vm" passt -f -q -4 --runas 0 -s "$work/passt.sock" -a 10.0.2.15 -n 24 -g 10.0.2.2 \
    -m 65520 --no-dhcp > "$work/passt.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/passt.sock" ] && break; sleep 0.1; done
[ -S "$work/passt.sock" ] || { cat "$work/passt.log" >&2; echo "bench-net: passt did not start" >&2; exit 1; }
VMETTE_QEMU_NETDEV="stream,server=off,addr.type=unix,addr.path=$work/passt.sock" \
    ip netns exec "$vm" "$vmette" run --net toolbox -- sh -c "$script" > "$work/passt.out"

python3 - "$work/vmette.out" "$work/passt.out" "$work/by-name.out" "$work/allowlist.out" <<'PY'
import statistics, sys

def figures(path):
    lines = [l.split() for l in open(path) if l.strip()]
    ttfb = [float(v) for k, v in lines if k == "ttfb"]
    mibs = [float(v) / (1 << 20) for k, v in lines if k == "bps"]
    if not ttfb or not mibs:
        sys.exit(f"bench-net: no figures in {path}")
    return statistics.median(ttfb) * 1000, statistics.median(mibs)

vm_ttfb, vm_mibs = figures(sys.argv[1])
passt_ttfb, passt_mibs = figures(sys.argv[2])
print(f"time to first byte, median: vmette {vm_ttfb:.1f} ms, passt {passt_ttfb:.1f} ms")
print(f"100 MiB download, median:   vmette {vm_mibs:.0f} MiB/s, passt {passt_mibs:.0f} MiB/s")
print(f"throughput ratio vmette/passt: {vm_mibs / passt_mibs:.2f} (goal >= 0.80)")
named_ttfb, named_mibs = figures(sys.argv[3])
allow_ttfb, allow_mibs = figures(sys.argv[4])
print(f"by name, median: --net {named_ttfb:.1f} ms to first byte, {named_mibs:.0f} MiB/s; "
      f"--allow-host {allow_ttfb:.1f} ms, {allow_mibs:.0f} MiB/s")
print(f"throughput ratio allowlist/--net: {allow_mibs / named_mibs:.2f} (goal >= 0.90)")
PY
