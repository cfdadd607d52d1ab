#!/usr/bin/env bash
# Fetches Debian's arm64 cloud kernel into a vmette cache without apt: the
# package index and the .deb come from a Debian mirror and are unpacked with
# ar and tar, so this works on macOS as well as on Linux. Prints the
# unpacked tree. Skips the download when the cache already has it.
#
#   scripts/fetch-arm64-kernel.sh CACHE_DIR
set -euo pipefail

cache=${1:?usage: fetch-arm64-kernel.sh CACHE_DIR}
mirror=${VMETTE_DEBIAN_MIRROR:-https://deb.debian.org/debian}

existing=$(printf '%s\n' "$cache"/kernel/*-cloud-arm64 | sort | tail -n 1)
if [ -f "$existing/.complete" ]; then
    echo "$existing"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
curl -fsSL "$mirror/dists/bookworm/main/binary-arm64/Packages.gz" | gunzip > "$work/Packages"
# The metapackage's first dependency names the real kernel package.
package=$(awk -F': ' '$1=="Package"{p=$2} p=="linux-image-cloud-arm64" && $1=="Depends"{
        if (match($2, /linux-image-[^ ,]*/)) print substr($2, RSTART, RLENGTH); exit }' "$work/Packages")
file=$(awk -F': ' -v want="$package" '$1=="Package"{p=$2} p==want && $1=="Filename"{print $2; exit}' "$work/Packages")
if [ -z "$package" ] || [ -z "$file" ]; then
    echo "fetch-arm64-kernel.sh: no arm64 cloud kernel in the index at $mirror" >&2
    exit 1
fi
curl -fsSL -o "$work/kernel.deb" "$mirror/$file"
(cd "$work" && ar -x kernel.deb && mkdir tree && tar -xf data.tar.* -C tree)
# Virtualization.framework boots a raw arm64 Image; some builds ship it gzipped.
for image in "$work"/tree/boot/vmlinuz-*; do
    if [ "$(head -c 2 "$image" | od -An -tx1 | tr -d ' ')" = "1f8b" ]; then
        gunzip -c "$image" > "$image.raw" && mv "$image.raw" "$image"
    fi
done
echo "$package" > "$work/tree/.complete"
mkdir -p "$cache/kernel"
rm -rf "${cache:?}/kernel/$package"
mv "$work/tree" "$cache/kernel/$package"
echo "$cache/kernel/$package"
