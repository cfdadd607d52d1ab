#!/usr/bin/env bash
# Sets vmette up on Debian bookworm (x86_64) and checks it with a sample VM:
#   1. installs the Debian packages it needs (QEMU from bookworm-backports),
#   2. adds the Rust musl target and installs virtiofsd,
#   3. builds vmette and the static guest agent and installs them,
#   4. fetches the cloud kernel and builds the initramfs and default image
#      (`vmette setup`), then runs `vmette run -- uname -a`.
# Every step skips what is already done. Root (or sudo) is needed only for
# step 1 and for installing into /usr/local; everything else runs as you.
#
#   ./setup.sh [--no-sample] [--with-test-tools]
#     --no-sample        skip the sample run
#     --with-test-tools  also install what only the tests need: QEMU for
#                        arm64 and vhost-device-vsock (for the test of the
#                        macOS engine's guest side)
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(uname -s)" = Darwin ]; then
    exec scripts/setup-macos.sh "$@"
fi

say() { printf '==> %s\n' "$*" >&2; }

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
    prefix=/usr/local
elif command -v sudo >/dev/null 2>&1; then
    as_root() { sudo "$@"; }
    prefix="$HOME/.local"
else
    as_root() { echo "setup.sh: '$*' needs root; run setup.sh as root or install sudo" >&2; exit 125; }
    prefix="$HOME/.local"
fi

sample=yes
test_tools=no
for arg in "$@"; do
    case "$arg" in
        --no-sample) sample=no ;;
        --with-test-tools) test_tools=yes ;;
        *) echo "setup.sh: unknown option $arg (see the comment at the top)" >&2; exit 125 ;;
    esac
done

packages=(
    qemu-system-x86        # the hypervisor (from bookworm-backports, see below)
    erofs-utils            # mkfs.erofs: the default image
    squashfs-tools         # squashfs root images
    e2fsprogs              # mkfs.ext4: scratch disks
    mmdebstrap             # builds the default Debian image
    uidmap                 # newuidmap: user namespaces with subordinate ids
    libseccomp-dev libcap-ng-dev   # to build virtiofsd
    musl-tools             # static guest agent
    busybox-static         # tiny root file systems in the tests
    procps time hyperfine cpio ca-certificates
    curl binutils xz-utils  # fetching the arm64 kernel for the tests
)

if [ "$test_tools" = yes ]; then
    packages+=(qemu-system-arm)
fi

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# bookworm's QEMU 7.2 conflicts with a backported qemu-utils, and backports
# carries QEMU 10 with virtio-fs migration; vmette works with either. The
# backports entry reuses the mirror and key of the configured bookworm
# sources rather than naming a host.
add_backports() {
    local list=/etc/apt/sources.list.d/vmette-backports.sources
    [ -f "$list" ] && return 0
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
    local uri key
    uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { for (i=1;i<=NF;i++) if ($i=="URIs:") { print $(i+1); exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    key=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { for (i=1;i<=NF;i++) if ($i=="Signed-By:") { print $(i+1); exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1=="deb" && $3=="bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { say "no bookworm apt source found; keeping bookworm's own QEMU"; return 0; }
    say "adding bookworm-backports from $uri"
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -n "$key" ] && echo "Signed-By: $key"
    } | as_root tee "$list" >/dev/null
}

if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    add_backports
    as_root apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    qemu_from=()
    if apt-cache policy qemu-system-x86 | grep -q 'bookworm-backports'; then
        qemu_from=(-t bookworm-backports)
    fi
    qemu_packages=(qemu-system-x86)
    [ "$test_tools" = yes ] && qemu_packages+=(qemu-system-arm)
    as_root apt-get install -y -qq --no-install-recommends "${qemu_from[@]}" "${qemu_packages[@]}" >/dev/null
    as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

guest_target=x86_64-unknown-linux-musl
if ! rustup target list --installed | grep -qx "$guest_target"; then
    say "adding the Rust target $guest_target"
    rustup target add "$guest_target"
fi

if [ ! -x "$prefix/bin/virtiofsd" ]; then
    say "installing virtiofsd 1.14.0 into $prefix (about a minute)"
    cargo install virtiofsd --version 1.14.0 --locked --root "$prefix" --quiet
fi

if [ "$test_tools" = yes ] && [ ! -x "$prefix/bin/vhost-device-vsock" ]; then
    say "installing vhost-device-vsock 0.3.0 into $prefix (about a minute)"
    cargo install vhost-device-vsock --version 0.3.0 --locked --root "$prefix" --quiet
fi

say "building vmette"
cargo build --release --workspace --quiet
cargo build --profile release-guest --target "$guest_target" -p vmette-guest --quiet

install -d "$prefix/bin" "$prefix/lib/vmette"
install -m 0755 target/release/vmette "$prefix/bin/vmette"
install -m 0755 "target/$guest_target/release-guest/vmette-guest" "$prefix/lib/vmette/vmette-guest"
case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) say "add $prefix/bin to your PATH" ;;
esac

say "fetching the kernel and building the initramfs and default image"
"$prefix/bin/vmette" setup

if [ "$sample" = yes ]; then
    say "sample run: vmette run -- uname -a"
    "$prefix/bin/vmette" run -- uname -a
fi
