#!/usr/bin/env bash
# Signs vmette with the entitlement Virtualization.framework requires
# (com.apple.security.virtualization); without it, starting a VM fails.
#
#   scripts/macos-sign.sh [BINARY...]      (default: target/release/vmette)
#
# Signs ad hoc unless VMETTE_SIGN_IDENTITY names a signing identity.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(uname -s)" = Darwin ] || { echo "macos-sign.sh: codesign exists only on macOS" >&2; exit 125; }
[ $# -gt 0 ] || set -- target/release/vmette
for binary in "$@"; do
    codesign --force --sign "${VMETTE_SIGN_IDENTITY:--}" \
        --entitlements macos/vmette.entitlements "$binary"
done
