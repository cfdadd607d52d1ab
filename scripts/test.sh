#!/usr/bin/env bash
# The test command (README, .ci/run). Runs the idempotent set-up first, so
# it works on a fresh machine by itself, then:
#   formatting and lints, unit tests, end-to-end tests on real microVMs
#   (including runs as an unprivileged user), a check that nothing was left
#   running or lying around, and a short start-up benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }

./setup.sh --no-sample

say "cargo fmt --check"
cargo fmt --all --check

say "cargo clippy"
cargo clippy --release --workspace --all-targets --quiet -- -D warnings

say "tests (unit and end-to-end on real VMs)"
# Each VM gets one vCPU under emulation; two test threads keep two cores busy.
cargo test --release --workspace -- --test-threads=2

say "checking for leftovers"
leftovers=$(pgrep -a -f 'qemu-system|virtiofsd --socket-path' | grep -v pgrep || true)
dirs=$(find "${TMPDIR:-/tmp}" -maxdepth 1 -name 'vmette-*' 2>/dev/null || true)
if [ -n "$leftovers" ] || [ -n "$dirs" ]; then
    echo "left behind after the tests:" >&2
    printf '%s\n' "$leftovers" "$dirs" >&2
    exit 1
fi

say "start-up benchmark"
scripts/bench.sh 5
