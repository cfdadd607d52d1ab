#!/usr/bin/env bash
# Image benchmark, against floors measured in the same run:
#   1. pull + convert of a multi-layer image (about 250 MiB unpacked: a
#      busybox root, Python's standard library, /usr/share/doc and 64 MiB
#      of random bytes, one layer each) from a local docker-registry, with
#      `vmette pull`, against `skopeo copy docker://… dir:…` of the same
#      image (goal: ratio <= 1.5);
#   2. the first `vmette run IMAGE -- true` (pull, convert, boot) and the
#      second (from the store) against `vmette run -- true` on the default
#      image (goal: second <= 1.1x).
#
#   scripts/bench-images.sh [RUNS]     (default 5 runs each, after 1 warm-up)
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
vmette=${VMETTE:-$PWD/target/release/vmette}
[ -x "$vmette" ] || { echo "bench-images: build first (./setup.sh)" >&2; exit 125; }
for tool in docker-registry umoci skopeo hyperfine; do
    command -v "$tool" >/dev/null || { echo "bench-images: $tool is missing; run ./setup.sh --with-test-tools" >&2; exit 125; }
done

work=$(mktemp -d)
registry_pid=
cleanup() {
    if [ -n "$registry_pid" ]; then kill "$registry_pid" 2>/dev/null || true; wait "$registry_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# A cache of the benchmark's own for the store, sharing the kernel,
# initramfs and default image.
shared=${VMETTE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmette}
cache="$work/cache"
mkdir -p "$cache"
for sub in kernel initramfs images; do
    mkdir -p "$shared/$sub"
    ln -s "$shared/$sub" "$cache/$sub"
done
export VMETTE_CACHE_DIR="$cache"

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do
    if curl -fs "http://127.0.0.1:$port/v2/" > /dev/null; then break; fi
    sleep 0.1
done

layout="$work/oci"
umoci init --layout "$layout"
umoci new --image "$layout:bench"
add_layer() {
    local bundle="$work/bundle"
    umoci unpack --rootless --image "$layout:bench" "$bundle" > /dev/null
    "$@" "$bundle/rootfs"
    umoci repack --image "$layout:bench" "$bundle"
    rm -rf "$bundle"
}
busybox_root() {
    mkdir -p "$1/bin" "$1/etc" "$1/tmp"
    cp "$(command -v busybox)" "$1/bin/busybox"
    for applet in sh true cat ls; do ln -s busybox "$1/bin/$applet"; done
}
python_library() { mkdir -p "$1/usr/lib" && cp -r /usr/lib/python3.11 "$1/usr/lib/"; }
documentation() { mkdir -p "$1/usr/share" && cp -r /usr/share/doc "$1/usr/share/"; }
random_bytes() { mkdir -p "$1/data" && head -c 64M /dev/urandom > "$1/data/random"; }
add_layer busybox_root
add_layer python_library
add_layer documentation
add_layer random_bytes
umoci config --image "$layout:bench" --config.env PATH=/bin
reference="127.0.0.1:$port/bench/image:v1"
skopeo copy --quiet --dest-tls-verify=false "oci:$layout:bench" "docker://$reference"
unpacked=$(du -sm "$layout" | cut -f1)
echo "image: 4 layers, $unpacked MiB as stored in the OCI layout" >&2

# Each timed run starts with the previous one's writes on disk (sync), so
# that no run pays for another's write-back.
hyperfine --style basic --warmup 1 --runs "$runs" --export-json "$work/pull.json" \
    -n skopeo --prepare "rm -rf $work/skopeo; sync" \
    "skopeo copy --quiet --src-tls-verify=false docker://$reference dir:$work/skopeo" \
    -n vmette --prepare "rm -rf $cache/store; sync" \
    "$vmette --quiet pull $reference" >&2

"$vmette" run -- true
"$vmette" run "$reference" -- true
sync
hyperfine --style basic --warmup 1 --runs "$runs" --export-json "$work/run.json" \
    -n default --prepare sync "$vmette run -- true" \
    -n second --prepare sync "$vmette run $reference -- true" \
    -n first --prepare "rm -rf $cache/store; sync" "$vmette run $reference -- true" >&2

python3 - "$work/pull.json" "$work/run.json" <<'PY'
import json, sys
def medians(path):
    return {r["command"]: r["median"] for r in json.load(open(path))["results"]}
pull, run = medians(sys.argv[1]), medians(sys.argv[2])
print(f"skopeo copy docker:// dir:       : median {pull['skopeo']:.3f} s")
print(f"vmette pull (pull + convert)     : median {pull['vmette']:.3f} s")
print(f"ratio pull vmette/skopeo         : {pull['vmette'] / pull['skopeo']:.2f} (goal <= 1.5)")
print(f"vmette run -- true (default)     : median {run['default']:.3f} s")
print(f"vmette run IMAGE -- true, first  : median {run['first']:.3f} s ({run['first'] / run['default']:.2f}x)")
print(f"vmette run IMAGE -- true, second : median {run['second']:.3f} s ({run['second'] / run['default']:.2f}x, goal <= 1.1)")
PY
