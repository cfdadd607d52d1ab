#!/usr/bin/env bash
# Rehearses a fresh machine: puts this one back into the state of a new
# machine of this project's kind for everything set-up installs, then runs
# the README's two commands exactly as the README writes them, in a fresh
# clone of HEAD, and prints how long each took.
#
# What it undoes: the Debian packages set-up installed that a fresh machine
# does not have (scripts/fresh-packages.txt lists what it has; those stay),
# and the dependencies they pulled in; the Python packages set-up installed;
# set-up's bookworm-backports source;
# what set-up put under /usr/local and ~/.local; the Rust targets set-up and
# the tests add; vmette's cache; the tests' unprivileged user.
#
#   scripts/rehearse-fresh.sh                 # the normal fresh machine
#   scripts/rehearse-fresh.sh --plain-bookworm
#
# --plain-bookworm also purges qemu-utils and sets VMETTE_NO_BACKPORTS=1,
# so set-up installs bookworm's QEMU 7.2; it runs the README's first
# command and `vmette run -- true`. Afterwards it puts the machine back as
# a fresh one is (backports' qemu-utils reinstalled) and runs the normal
# set-up again.
#
# It purges packages: run it by hand, as root, never in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

plain=no
case "${1:-}" in
    "") ;;
    --plain-bookworm) plain=yes ;;
    *) echo "rehearse-fresh.sh: unknown option $1 (see the comment at the top)" >&2; exit 125 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "rehearse-fresh.sh: run it as root; it purges packages" >&2; exit 125; }
[ -z "${CI:-}" ] || { echo "rehearse-fresh.sh: not in CI; it purges packages" >&2; exit 125; }

say() { printf '\n### rehearse: %s\n' "$*"; }
export DEBIAN_FRONTEND=noninteractive
backports_list=/etc/apt/sources.list.d/vmette-backports.sources

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
fresh() { grep -qx "$1" scripts/fresh-packages.txt; }

# Purges set-up's packages (and EXTRA) that a fresh machine lacks, then what
# they pulled in and nothing else needs, again only beyond the fresh set.
purge_setup_packages() {
    local extra=("$@") doomed=() p
    for p in $(./setup.sh --list-packages); do
        if installed "$p" && ! fresh "$p"; then doomed+=("$p"); fi
    done
    for p in "${extra[@]}"; do
        if installed "$p"; then doomed+=("$p"); fi
    done
    if [ ${#doomed[@]} -gt 0 ]; then
        echo "purging: ${doomed[*]}"
        apt-get purge -y -qq "${doomed[@]}" >/dev/null
    fi
    local round orphans
    for round in 1 2 3; do
        mapfile -t orphans < <(apt-get -s autoremove | awk '$1 == "Remv" { print $2 }' |
            while read -r p; do fresh "$p" || echo "$p"; done)
        [ ${#orphans[@]} -gt 0 ] || break
        echo "purging what they pulled in (round $round): ${orphans[*]}"
        apt-get purge -y -qq "${orphans[@]}" >/dev/null
    done
}

remove_setup_files() {
    local prefix
    for prefix in /usr/local "$HOME/.local"; do
        rm -f "$prefix"/bin/{vmette,vmetted,virtiofsd,vhost-device-vsock} "$prefix"/.crates.toml "$prefix"/.crates2.json
        rm -rf "$prefix/lib/vmette"
    done
    local target
    for target in x86_64-unknown-linux-musl aarch64-unknown-linux-musl aarch64-apple-darwin; do
        if grep -qx "$target" <<<"$(rustup target list --installed)"; then
            rustup target remove "$target" >/dev/null 2>&1
        fi
    done
    # Set-up's Python test clients and checkers, and what they pulled in
    # beyond a fresh machine's packages (certifi, idna, sniffio and
    # typing_extensions are on one already).
    python3 -m pip uninstall --quiet --yes httpx httpx-sse httpcore h11 anyio websockets \
        openapi-spec-validator openapi-schema-validator schemathesis hypothesis 2>/dev/null || true
    rm -rf "${XDG_CACHE_HOME:-$HOME/.cache}/vmette"
    if id -u vmette-e2e >/dev/null 2>&1; then userdel -r vmette-e2e 2>/dev/null || true; fi
}

# The README's two commands: the first line of each of the first two sh
# blocks under "## Two commands".
mapfile -t readme < <(awk '/^## Two commands/ { on = 1 } on && /^```sh/ { getline; print; n++ } n == 2 { exit }' README.md)
[ ${#readme[@]} -eq 2 ] || { echo "rehearse-fresh.sh: cannot find the README's two commands" >&2; exit 1; }

say "back to a fresh machine$([ "$plain" = yes ] && echo ', plain bookworm (no QEMU at all)')"
if [ "$plain" = yes ]; then purge_setup_packages qemu-utils; else purge_setup_packages; fi
if [ -f "$backports_list" ]; then rm -f "$backports_list"; fi
apt-get update -qq
remove_setup_files

work=$(mktemp -d /tmp/rehearse-XXXXXX)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/vmette"
cd "$work/vmette"
echo "fresh clone of $(git rev-parse --short HEAD) in $work/vmette"

timed() {
    local label=$1 cmd=$2 start status
    start=$(date +%s)
    say "$label: $cmd"
    set +e
    bash -c "$cmd" 2>&1 | tee "$work/$label.log"
    status=${PIPESTATUS[0]}
    set -e
    timings+=("$label: '$cmd' exited $status after $(( $(date +%s) - start )) s")
    return "$status"
}
timings=()
result=0

if [ "$plain" = yes ]; then
    export VMETTE_NO_BACKPORTS=1
    timed first "${readme[0]}" || result=1
    timed true "vmette run -- true" || result=1
    qemu_version=$(qemu-system-x86_64 --version 2>/dev/null | awk 'NR == 1 { print $4 }')
    timings+=("QEMU installed on plain bookworm: ${qemu_version:-none}")
    case "$qemu_version" in 7.2*) ;; *) result=1 ;; esac
    unset VMETTE_NO_BACKPORTS

    say "putting the machine back as a fresh one is (backports' qemu-utils), then the normal set-up"
    cd "$repo"
    purge_setup_packages
    uri=$(awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm([ \n]|$)/ && !/security/ { for (i=1;i<=NF;i++) if ($i=="URIs:") { print $(i+1); exit } }' /etc/apt/sources.list.d/*.sources)
    printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" > "$work/backports.sources"
    cp "$work/backports.sources" "$backports_list"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-utils >/dev/null
    rm -f "$backports_list"
    apt-get update -qq
    remove_setup_files
    cd "$work/vmette"
    timed restore "./setup.sh --with-test-tools" || result=1
else
    timed first "${readme[0]}" || result=1
    timed test "${readme[1]}" || result=1
fi

if [ -f "$work/first.log" ]; then
    unames=$(grep -c '^Linux vmette ' "$work/first.log" || true)
    timings+=("the guest's uname -a appeared $unames time(s) after the first command")
    [ "$unames" = 1 ] || result=1
fi

say "summary"
printf '%s\n' "${timings[@]}"
[ "$result" = 0 ] && echo "rehearsal passed" || echo "rehearsal FAILED"
exit "$result"
