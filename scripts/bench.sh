#!/usr/bin/env bash
# Start-up benchmark: `vmette run -- true` against the floor measured in
# the same run, raw QEMU booting the same kernel with a busybox init that
# powers off at once, with the same machine, accelerator and kernel
# arguments vmette uses. Prints both medians and their ratio (target <= 1.3),
# then the exec round trip of `true` in a warm session (p50, p99) and the
# write and read throughput of a file (RUNS x 10 MiB), then the exec round
# trip through the daemon and the daemon's memory.
#
#   scripts/bench.sh [RUNS]        (default 10 runs each, after 1 warm-up)
#
# VMETTE_BENCH_QEMU replaces the floor's qemu-system-x86_64 (the tests use a
# stand-in that writes more after the marker).
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-10}
qemu=${VMETTE_BENCH_QEMU:-qemu-system-x86_64}
vmette=${VMETTE:-target/release/vmette}
[ -x "$vmette" ] || { echo "bench: build first (./setup.sh)" >&2; exit 125; }
command -v hyperfine >/dev/null || { echo "bench: hyperfine is missing; run ./setup.sh" >&2; exit 125; }

cache=${VMETTE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmette}
kernel=$(printf '%s\n' "$cache"/kernel/*/boot/vmlinuz-* | sort | tail -n 1)
[ -f "$kernel" ] || { echo "bench: no kernel in $cache; run vmette setup" >&2; exit 125; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The floor's initramfs: busybox, and an init that says so and powers off.
mkdir -p "$work/initrd/bin"
cp "$(command -v busybox)" "$work/initrd/bin/busybox"
ln -s busybox "$work/initrd/bin/sh"
printf '#!/bin/sh\n/bin/busybox echo floor-ok\n/bin/busybox poweroff -f\n' > "$work/initrd/init"
chmod +x "$work/initrd/init"
(cd "$work/initrd" && find . | cpio --quiet -o -H newc > "$work/floor.cpio")

tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000 + 0.5; exit }' /proc/cpuinfo)
cmdline="console=ttyS0 quiet panic=-1 pci=off mitigations=off rdinit=/init tsc_early_khz=$tsc_khz tsc=reliable no_timer_check lpj=5000000"
floor="$qemu -M microvm -nodefaults -no-user-config -no-reboot -display none -accel tcg -smp 1 -m 512M -kernel $kernel -initrd $work/floor.cpio -append '$cmdline' -serial stdio"

# Both must really work before they are timed.
# The whole console goes to a file first: a reader that stops at the marker
# would leave QEMU writing into a closed pipe.
eval "$floor" > "$work/floor.log" || { echo "bench: the floor VM failed (exit $?)" >&2; exit 1; }
grep -q floor-ok "$work/floor.log" || { echo "bench: the floor VM did not boot" >&2; exit 1; }
"$vmette" run -- true

hyperfine --style basic --warmup 1 --runs "$runs" --export-json "$work/result.json" \
    -n floor "$floor > /dev/null" \
    -n vmette "$vmette run -- true" >&2

python3 - "$work/result.json" <<'PY'
import json, sys
results = {r["command"]: r for r in json.load(open(sys.argv[1]))["results"]}
floor, vm = results["floor"]["median"], results["vmette"]["median"]
print(f"floor  (raw QEMU, busybox init): median {floor:.3f} s")
print(f"vmette run -- true            : median {vm:.3f} s")
print(f"ratio vmette/floor            : {vm / floor:.2f} (target <= 1.30)")
PY

# Warm-session figures through the library: the exec round trip (far
# more runs than boots: each is milliseconds) and file throughput.
cargo run --release --quiet -p vmette --example session_bench -- $(( runs * 20 )) $(( runs * 10 ))

# The same exec round trip through vmetted's HTTP API, on the unix socket
# and on loopback TCP; the exec rate of four clients at once; and the
# daemon's resident memory with no session and with four idle ones.
cargo run --release --quiet -p vmetted --example daemon_bench -- $(( runs * 20 ))
