#!/usr/bin/env bash
# vmette set-up on macOS (Apple silicon), called by setup.sh on Darwin.
#   1. adds the Rust target of the arm64 guest agent,
#   2. builds vmette and the static arm64 guest agent, signs vmette with the
#      virtualization entitlement, installs both into ~/.local,
#   3. fetches Debian's arm64 cloud kernel into the cache (no apt on macOS:
#      the package index and .deb come from a Debian mirror, unpacked with
#      ar and tar), and prepares the initramfs if a root image is available.
#      The README's first command runs the sample VM after this.
# Idempotent. Not verified on a Mac by the project's CI, which type-checks
# the engine from Linux only.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }

prefix=${VMETTE_PREFIX:-$HOME/.local}
cache=${VMETTE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmette}
guest_target=aarch64-unknown-linux-musl

if ! grep -qx "$guest_target" <<<"$(rustup target list --installed)"; then
    say "adding the Rust target $guest_target"
    rustup target add "$guest_target"
fi

say "building vmette"
cargo build --release -p vmette-cli --quiet
cargo build --profile release-guest --target "$guest_target" -p vmette-guest --quiet
scripts/macos-sign.sh target/release/vmette
install -d "$prefix/bin" "$prefix/lib/vmette"
install -m 0755 target/release/vmette "$prefix/bin/vmette"
install -m 0755 "target/$guest_target/release-guest/vmette-guest" "$prefix/lib/vmette/vmette-guest"

say "fetching Debian's arm64 cloud kernel"
scripts/fetch-arm64-kernel.sh "$cache" >/dev/null

if [ -f "$cache/images/debian-bookworm-minbase.erofs" ]; then
    "$prefix/bin/vmette" setup
else
    say "no default root image: mmdebstrap does not run on macOS. Build an arm64 image on Linux"
    say "(mmdebstrap --architectures=arm64 --variant=minbase bookworm tree && mkfs.erofs image.erofs tree)"
    say "and put it at $cache/images/debian-bookworm-minbase.erofs, or run with --rootfs DIR|IMAGE."
fi
