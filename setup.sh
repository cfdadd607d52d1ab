#!/usr/bin/env bash
# Sets vmette up on Debian bookworm (x86_64):
#   1. installs the Debian packages it needs, QEMU from one suite (below),
#   2. adds the Rust musl target and installs virtiofsd,
#   3. builds vmette and the static guest agent and installs them,
#   4. fetches the cloud kernel and builds the initramfs and default image
#      (`vmette setup`).
# Every step skips what is already done. Root (or sudo) is needed only for
# step 1 and for installing into /usr/local; everything else runs as you.
# The README's first command runs a sample VM right after this.
#
#   ./setup.sh [--with-test-tools] [--list-packages]
#     --with-test-tools  also install what only the tests need: QEMU for
#                        arm64, shellcheck, tmux, vhost-device-vsock (for the
#                        test of the macOS engine's guest side), a real
#                        OCI registry with umoci and skopeo (the image
#                        tests), and from
#                        PyPI httpx, httpx-sse and websockets (the daemon's
#                        Python clients), openapi-spec-validator and
#                        schemathesis (the checks of its OpenAPI file)
#     --list-packages    print every Debian package set-up may install, one
#                        a line, and stop
#
# QEMU's suite is chosen by one rule: the suite of an installed qemu-utils
# if there is one (a fresh machine of this kind has backports' 10.0), else
# bookworm-backports if the apt sources reach it, else bookworm (QEMU 7.2,
# which vmette supports too). VMETTE_NO_BACKPORTS=1 keeps set-up from adding
# bookworm-backports. Set-up never downgrades a package: if it would have
# to, it stops and says which.
set -euo pipefail
cd "$(dirname "$0")"

if [ "$(uname -s)" = Darwin ]; then
    exec scripts/setup-macos.sh "$@"
fi

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'setup.sh: %s\n' "$*" >&2; exit 125; }

if [ "$(id -u)" -eq 0 ]; then
    as_root() { "$@"; }
    prefix=/usr/local
elif command -v sudo >/dev/null 2>&1; then
    as_root() { sudo "$@"; }
    prefix="$HOME/.local"
else
    as_root() { die "'$*' needs root; run setup.sh as root or install sudo"; }
    prefix="$HOME/.local"
fi

test_tools=no
list_packages=no
for arg in "$@"; do
    case "$arg" in
        --with-test-tools) test_tools=yes ;;
        --list-packages) list_packages=yes ;;
        *) die "unknown option $arg (see the comment at the top of setup.sh)" ;;
    esac
done

packages=(
    erofs-utils            # mkfs.erofs: the default image
    squashfs-tools         # squashfs root images
    squashfs-tools-ng      # tar2sqfs: OCI images and tarballs into roots
    e2fsprogs              # mkfs.ext4: scratch disks
    mmdebstrap             # builds the default Debian image
    uidmap                 # newuidmap: user namespaces with subordinate ids
    libseccomp-dev libcap-ng-dev   # to build virtiofsd
    musl-tools             # static guest agent
    busybox-static         # tiny root file systems in the tests
    procps time hyperfine cpio ca-certificates
    curl binutils xz-utils  # fetching the arm64 kernel for the tests
)
# All of QEMU comes from one suite in one apt-get install, so apt resolves
# the parts together instead of mixing 7.2 with a backported 10.
qemu_packages=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils)
if [ "$test_tools" = yes ]; then
    # A real registry, and the tools that build and push test images;
    # iproute2 for the network tests' namespaces, passt to compare the
    # network stack against.
    packages+=(shellcheck tmux docker-registry umoci skopeo apache2-utils iproute2 passt)
    qemu_packages+=(qemu-system-arm)
fi

if [ "$list_packages" = yes ]; then
    printf '%s\n' "${packages[@]}" "${qemu_packages[@]}" shellcheck tmux qemu-system-arm \
        docker-registry umoci skopeo apache2-utils iproute2 passt | sort -u
    exit 0
fi

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

missing=()
for p in "${packages[@]}"; do
    installed "$p" || missing+=("$p")
done
qemu_missing=no
for p in "${qemu_packages[@]}"; do
    installed "$p" || qemu_missing=yes
done

# The backports entry reuses the mirror and key of the configured bookworm
# sources rather than naming a host.
backports_list=/etc/apt/sources.list.d/vmette-backports.sources
add_backports() {
    [ -f "$backports_list" ] && return 0
    grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/ && return 0
    local uri key
    uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { for (i=1;i<=NF;i++) if ($i=="URIs:") { print $(i+1); exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    key=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { for (i=1;i<=NF;i++) if ($i=="Signed-By:") { print $(i+1); exit } }' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1=="deb" && $3=="bookworm" { print $2; exit }' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { say "no bookworm apt source found; QEMU comes from bookworm"; return 0; }
    say "adding bookworm-backports from $uri"
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        if [ -n "$key" ]; then echo "Signed-By: $key"; fi
    } | as_root tee "$backports_list" >/dev/null
}

# The suite apt offers a package's VERSION from (empty if none does).
suite_of() {
    apt-cache madison "$1" | awk -F'|' -v want="$2" '
        { gsub(/^ +| +$/, "", $2) }
        $2 == want { n = split($3, words, " "); split(words[2], suite, "/"); print suite[1]; exit }'
}

# The one rule for QEMU's suite (see the top of this file).
qemu_suite() {
    local version suite
    if installed qemu-utils; then
        version=$(dpkg-query -W -f='${Version}' qemu-utils)
        suite=$(suite_of qemu-utils "$version")
        if [ -z "$suite" ]; then
            case "$version" in
                *~bpo12*) suite=bookworm-backports ;;
                *) suite=bookworm ;;
            esac
        fi
        if [ "$suite" = bookworm-backports ] && ! backports_reached; then
            die "qemu-utils $version is from bookworm-backports, which the apt sources do not reach (VMETTE_NO_BACKPORTS is set, or no bookworm source was found), and bookworm's QEMU would downgrade it; allow backports, or purge it first (apt-get purge qemu-utils)."
        fi
        echo "$suite"
    elif backports_reached; then
        echo bookworm-backports
    else
        echo bookworm
    fi
}

backports_reached() { grep -q 'bookworm-backports/' <<<"$(apt-cache madison qemu-system-x86)"; }

# Stops, with one sentence, if installing from SUITE would downgrade anything.
refuse_downgrades() {
    local suite=$1; shift
    local plan downgrades
    plan=$(apt-get install -s --no-install-recommends -t "$suite" "$@" 2>&1) \
        || die "apt cannot install ${*} from $suite: $(tail -n 1 <<<"$plan")"
    downgrades=$(awk '$1 == "Inst" && $3 ~ /^\[/ { old = substr($3, 2, length($3) - 2); new = substr($4, 2); print $2, old, new }' <<<"$plan" |
        while read -r name old new; do
            if dpkg --compare-versions "$new" lt "$old"; then echo "$name $old -> $new"; fi
        done)
    if [ -n "$downgrades" ]; then
        die "installing QEMU from $suite would downgrade $(tr '\n' ',' <<<"$downgrades" | sed 's/,$//'); install the same suite's versions first (apt-get install -t SUITE qemu-utils) or purge the newer packages (apt-get purge qemu-utils)."
    fi
}

if [ ${#missing[@]} -gt 0 ] || [ "$qemu_missing" = yes ]; then
    [ "${VMETTE_NO_BACKPORTS:-0}" = 1 ] || add_backports
    say "updating the apt lists"
    as_root apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    if [ "$qemu_missing" = yes ]; then
        suite=$(qemu_suite)
        refuse_downgrades "$suite" "${qemu_packages[@]}"
        say "installing QEMU from $suite: ${qemu_packages[*]}"
        as_root apt-get install -y -qq --no-install-recommends -t "$suite" "${qemu_packages[@]}" >/dev/null
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi

guest_target=x86_64-unknown-linux-musl
if ! grep -qx "$guest_target" <<<"$(rustup target list --installed)"; then
    say "adding the Rust target $guest_target"
    rustup target add "$guest_target"
fi

if [ ! -x "$prefix/bin/virtiofsd" ]; then
    say "installing virtiofsd 1.14.0 into $prefix (about a minute)"
    cargo install virtiofsd --version 1.14.0 --locked --root "$prefix" --quiet
fi

# The daemon's tests drive it with Python clients that nobody here wrote.
if [ "$test_tools" = yes ] && ! python3 -c 'import httpx, httpx_sse, websockets' 2>/dev/null; then
    say "installing the Python test clients' packages (httpx, httpx-sse, websockets)"
    python3 -m pip install --quiet 'httpx==0.28.1' 'httpx-sse==0.4.3' 'websockets==15.0.1'
fi

# The daemon's OpenAPI file is checked by a validator and a fuzzer nobody
# here wrote either.
if [ "$test_tools" = yes ] && ! python3 -c 'import openapi_spec_validator, schemathesis' 2>/dev/null; then
    say "installing the OpenAPI checkers (openapi-spec-validator, schemathesis)"
    python3 -m pip install --quiet 'openapi-spec-validator==0.9.0' 'schemathesis==4.32.5'
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
install -m 0755 target/release/vmetted "$prefix/bin/vmetted"
install -m 0755 "target/$guest_target/release-guest/vmette-guest" "$prefix/lib/vmette/vmette-guest"
case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) say "add $prefix/bin to your PATH" ;;
esac

say "fetching the kernel and building the initramfs and default image"
"$prefix/bin/vmette" setup
