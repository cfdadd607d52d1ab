#!/usr/bin/env bash
# The test command (README, .ci/run). Runs the idempotent set-up first, so
# it works on a fresh machine by itself, then:
#   a shellcheck pass and a check for pipes that race under pipefail;
#   formatting and lints; the macOS engine type-checked from Linux and the
#   arm64 guest agent built; unit tests; end-to-end tests on real microVMs
#   (including runs as an unprivileged user); a check that nothing was left
#   running or lying around; and short start-up, image and network
#   benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }

./setup.sh --with-test-tools
export PATH="/usr/local/bin:$HOME/.local/bin:$PATH"

say "shellcheck and the pipefail check over every tracked script"
mapfile -t scripts < <(git ls-files '*.sh' .ci/run)
shellcheck "${scripts[@]}"
scripts/check-pipelines.sh --self-test
scripts/check-pipelines.sh "${scripts[@]}"

say "the systemd user unit (systemd-analyze verify)"
# verify exits 0 on settings it ignores, so any complaint fails the step.
unit_check=$(systemd-analyze verify contrib/vmetted.service 2>&1) || { echo "$unit_check" >&2; exit 1; }
if [ -n "$unit_check" ]; then echo "$unit_check" >&2; exit 1; fi

say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

say "cargo doc (broken doc links fail)"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --exclude vmette-guest --quiet

# Targets the tests need besides the host's and the guest's.
for target in aarch64-apple-darwin aarch64-unknown-linux-musl; do
    grep -qx "$target" <<<"$(rustup target list --installed)" || rustup target add "$target"
done

say "macOS engine: cargo clippy --target aarch64-apple-darwin"
# Checking does not link, so no Apple SDK is needed; a type error in the
# vz engine (or anything it builds on) fails here.
cargo clippy --target aarch64-apple-darwin --workspace --exclude vmette-guest \
    --all-targets --quiet -- -D warnings

say "arm64 guest agent (for Virtualization.framework guests)"
cargo build --profile release-guest --target aarch64-unknown-linux-musl -p vmette-guest --quiet

say "no objc2 in the Linux dependency trees of the core and the qemu engine"
linux_tree=$(cargo tree -p vmette-core -p vmette-qemu -p vmette \
    --target x86_64-unknown-linux-gnu -e normal,build --prefix none)
if grep '^objc2' <<<"$linux_tree"; then
    echo "objc2 leaked into the Linux build" >&2
    exit 1
fi

say "tests (unit and end-to-end on real VMs)"
# Each VM gets one vCPU under emulation; two test threads keep two cores busy.
cargo test --release --workspace -- --test-threads=2

say "arm64 guest over virtio-socket (the macOS engine's guest side, under QEMU)"
arm64_tree=$(scripts/fetch-arm64-kernel.sh "${XDG_CACHE_HOME:-$HOME/.cache}/vmette/arm64")
VMETTE_ARM64_KERNEL_TREE=$arm64_tree \
VMETTE_ARM64_AGENT="$PWD/target/aarch64-unknown-linux-musl/release-guest/vmette-guest" \
    cargo test --release -p vmette-vz --test arm64_guest -- --ignored

say "checking for leftovers"
leftovers=$(pgrep -a -f 'qemu-system|virtiofsd --socket-path|vhost-device-vsock|vmetted --socket-dir' | grep -v pgrep || true)
dirs=$(find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'vmette-*' 2>/dev/null || true)
if [ -n "$leftovers" ] || [ -n "$dirs" ]; then
    echo "left behind after the tests:" >&2
    printf '%s\n' "$leftovers" "$dirs" >&2
    exit 1
fi

say "start-up benchmark: the floor's check with a QEMU that keeps writing after the marker"
chatty=$(mktemp -d)
trap 'rm -rf "$chatty"' EXIT
cat > "$chatty/qemu" <<'STUB'
#!/bin/sh
qemu-system-x86_64 "$@" || exit
seq 1 200000
STUB
chmod +x "$chatty/qemu"
VMETTE_BENCH_QEMU="$chatty/qemu" scripts/bench.sh 1 >/dev/null

say "start-up benchmark"
scripts/bench.sh 5

say "image benchmark (short; scripts/bench-images.sh 10 for figures)"
scripts/bench-images.sh 2

say "network benchmark against passt (short; scripts/bench-net.sh 10 for figures)"
scripts/bench-net.sh 2
