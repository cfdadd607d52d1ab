#!/usr/bin/env bash
# vmette set-up on macOS (Apple silicon), called by setup.sh on Darwin.
#   1. adds the Rust target of the arm64 guest agent,
#   2. builds vmette and the static arm64 guest agent, signs vmette with the
#      virtualization entitlement, installs both into ~/.local,
#   3. fetches Debian's arm64 cloud kernel into the cache (no apt on macOS:
#      the package index and .deb come from a Debian mirror, unpacked with
#      ar and tar), then runs a sample VM if a root image is available.
# Idempotent. Not verified on a Mac by the project's CI, which type-checks
# the engine from Linux only.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*" >&2; }

mirror=${VMETTE_DEBIAN_MIRROR:-https://deb.debian.org/debian}
prefix=${VMETTE_PREFIX:-$HOME/.local}
cache=${VMETTE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/vmette}
guest_target=aarch64-unknown-linux-musl

if ! rustup target list --installed | grep -qx "$guest_target"; then
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

if ! ls "$cache"/kernel/*/.complete >/dev/null 2>&1; then
    say "fetching Debian's arm64 cloud kernel from $mirror"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    curl -fsSL "$mirror/dists/bookworm/main/binary-arm64/Packages.gz" | gunzip > "$work/Packages"
    package=$(awk -F': ' '$1=="Package"{p=$2} p=="linux-image-cloud-arm64" && $1=="Depends"{print $2; exit}' "$work/Packages" | tr ',' '\n' | grep -o 'linux-image-[^ ]*' | head -n 1)
    file=$(awk -F': ' -v want="$package" '$1=="Package"{p=$2} p==want && $1=="Filename"{print $2; exit}' "$work/Packages")
    [ -n "$package" ] && [ -n "$file" ] || { echo "setup-macos.sh: no arm64 cloud kernel in the index" >&2; exit 1; }
    curl -fsSL -o "$work/kernel.deb" "$mirror/$file"
    (cd "$work" && ar -x kernel.deb && mkdir tree && tar -xf data.tar.* -C tree)
    # Virtualization.framework boots an uncompressed arm64 Image.
    for image in "$work"/tree/boot/vmlinuz-*; do
        if [ "$(head -c 2 "$image" | od -An -tx1 | tr -d ' ')" = "1f8b" ]; then
            gunzip -c "$image" > "$image.raw" && mv "$image.raw" "$image"
        fi
    done
    echo "$package" > "$work/tree/.complete"
    mkdir -p "$cache/kernel"
    rm -rf "${cache:?}/kernel/$package"
    mv "$work/tree" "$cache/kernel/$package"
fi

if [ -f "$cache/images/debian-bookworm-minbase.erofs" ]; then
    "$prefix/bin/vmette" setup
    if [ "${1:-}" != "--no-sample" ]; then
        say "sample run: vmette run -- uname -a"
        "$prefix/bin/vmette" run -- uname -a
    fi
else
    say "no default root image: mmdebstrap does not run on macOS. Build an arm64 image on Linux"
    say "(mmdebstrap --architectures=arm64 --variant=minbase bookworm tree && mkfs.erofs image.erofs tree)"
    say "and put it at $cache/images/debian-bookworm-minbase.erofs, or run with --rootfs DIR|IMAGE."
fi
