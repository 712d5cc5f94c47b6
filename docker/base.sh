#!/usr/bin/env bash
# Make the local base image localhost/retserve-base:bookworm (buildah, vfs storage) from a
# debootstrapped Debian bookworm (python3, python3-venv, ca-certificates), when it is not there yet.
# The machine's CA bundle goes into the base image (with a pip.conf pointing at it), so that pip in
# the Dockerfile's build reaches PyPI through whatever TLS interception this machine has.
set -euo pipefail
BASE="${RETSERVE_BASE_IMAGE:-localhost/retserve-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CA_BUNDLE="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
bah=(buildah --storage-driver vfs)

if "${bah[@]}" inspect --type image "$BASE" >/dev/null 2>&1; then
    echo "base: $BASE is cached"
    exit 0
fi
start=$(date +%s)
root=$(mktemp -d /var/tmp/retserve-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$MIRROR" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
cp "$CA_BUNDLE" "$root/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$root/etc/pip.conf"
ctr=$("${bah[@]}" from scratch)
"${bah[@]}" copy "$ctr" "$root" / >/dev/null
"${bah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$ctr"
"${bah[@]}" commit --rm -q "$ctr" "$BASE" >/dev/null
echo "base: built $BASE in $(($(date +%s) - start)) s"
