#!/usr/bin/env bash
# Install the Debian packages otaflow needs and that are not installed yet.
#
#   deploy/install-system-packages.sh [--lab] [--browser]
#
# Always: mosquitto (the MQTT broker of the local stack). Its Debian package
# may start a system broker on port 1883. The stack's own broker listens on
# OTAFLOW_MQTT_PORT (1884 by default), so both can run.
#   --lab      QEMU system emulators, to boot the U-Boot test images
#   --browser  Chromium, for the portal's browser tests
#
# Runs apt-get through sudo when not root, and prints nothing when every
# package is installed already.
set -euo pipefail

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0"
}

packages=(mosquitto)
for argument in "$@"; do
    case "$argument" in
        --lab) packages+=(qemu-system-arm qemu-system-misc qemu-system-x86) ;;
        --browser) packages+=(chromium) ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "error: unknown option '$argument'; expected --lab or --browser" >&2
            exit 2
            ;;
    esac
done

is_installed() {
    dpkg-query --show --showformat='${Status}' "$1" 2>/dev/null |
        grep --quiet '^install ok installed$'
}

has_candidate() {
    local policy
    policy=$(apt-cache policy "$1" 2>/dev/null)
    [[ -n "$policy" && "$policy" != *"Candidate: (none)"* ]]
}

missing=()
for package in "${packages[@]}"; do
    is_installed "$package" || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
    exit 0
fi

if ((EUID == 0)); then
    as_root=()
elif command -v sudo >/dev/null; then
    as_root=(sudo)
else
    echo "error: installing ${missing[*]} needs root, and sudo is not installed;" \
        "run this script as root" >&2
    exit 1
fi

# A fresh machine has empty package lists, so update them, but only then.
for package in "${missing[@]}"; do
    if ! has_candidate "$package"; then
        echo "Updating the apt package lists"
        "${as_root[@]}" apt-get update -qq
        break
    fi
done

echo "Installing ${missing[*]}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install --yes -qq "${missing[@]}" >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: apt-get install ${missing[*]} failed (output above)" >&2
    exit 1
fi
