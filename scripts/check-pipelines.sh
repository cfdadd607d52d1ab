#!/usr/bin/env bash
# Fails when a script that sets `pipefail` feeds a pipe into a reader that
# may exit early (grep -q/-l/-m, head, a lone read): the writer then dies of
# SIGPIPE whenever it writes after the reader has gone, the pipeline's
# status is 141, and whatever the pipeline decided comes out wrong at
# random. shellcheck does not catch this. Capture the output first
# (`grep -q x <<<"$(cmd)"`) or let the reader read everything (awk).
#
#   scripts/check-pipelines.sh [FILE...]   (default: every tracked script)
#   scripts/check-pipelines.sh --self-test (the check catches what it must)
set -euo pipefail
cd "$(dirname "$0")/.."

early_reader='(^|[^|])\|[[:space:]]*(grep[[:space:]]+([^|]*[[:space:]])?(-[a-zA-Z]*[qlm]|--quiet|--silent|--max-count|--files-with-matches)|head([[:space:]]|$)|read([[:space:]]|$))'

check() {
    local found=0 file
    for file in "$@"; do
        # This script's own fixtures are the pattern, as strings.
        [ "$file" -ef "${BASH_SOURCE[0]}" ] && continue
        grep -q 'pipefail' "$file" || continue
        # Comment lines are prose, not pipelines.
        if grep -nE "$early_reader" "$file" | grep -vE '^[0-9]+:[[:space:]]*#' >&2; then
            echo "check-pipelines: $file: a pipe into an early-exiting reader under pipefail (see this script's header)" >&2
            found=1
        fi
    done
    return "$found"
}

if [ "${1:-}" = --self-test ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    printf '#!/bin/sh\nset -o pipefail\n' > "$work/base"
    for bad in 'apt-cache policy x | grep -q y' 'ls | head -n 1' 'cmd |grep -qx y' \
        'cmd | grep -E -q y' 'cmd | grep --quiet y' 'cmd | read -r first'; do
        { cat "$work/base"; echo "$bad"; } > "$work/bad.sh"
        if check "$work/bad.sh" 2>/dev/null; then
            echo "check-pipelines: the check missed: $bad" >&2
            exit 1
        fi
    done
    # shellcheck disable=SC2016 # these are scripts' text, not to expand here
    for good in 'grep -q y <<<"$(cmd)"' 'cmd | awk "{ print }"' 'cmd | while read -r x; do :; done' \
        'a || head -c 1 f' '# ls | head'; do
        { cat "$work/base"; echo "$good"; } > "$work/good.sh"
        check "$work/good.sh" || { echo "check-pipelines: a false alarm on: $good" >&2; exit 1; }
    done
    echo "check-pipelines: self-test passed"
    exit 0
fi

if [ $# -eq 0 ]; then
    mapfile -t files < <(git ls-files '*.sh' .ci/run setup.sh)
    set -- "${files[@]}"
fi
check "$@"
