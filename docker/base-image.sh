#!/usr/bin/env bash
# Builds the local base image `backhaul/base:bookworm` from Debian's package mirror with
# debootstrap, for machines that cannot pull images from a registry. It holds a minimal Debian
# plus busybox (healthchecks, the sample web service), tinyproxy (the egress proxy) and CA
# certificates; no compiler or build tools. Does nothing if the image already exists
# (FORCE=1 rebuilds it).
#
# With registry access you can skip this: build with
#   --build-arg BASE=debian:bookworm-slim --build-arg PACKAGES="busybox tinyproxy ca-certificates"
set -euo pipefail

image="${BACKHAUL_BASE_IMAGE:-backhaul/base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [ -z "${FORCE:-}" ] && docker image inspect "$image" >/dev/null 2>&1; then
    echo "base-image.sh: $image already exists (FORCE=1 to rebuild)"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    echo "base-image.sh: installing debootstrap"
    sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq debootstrap >/dev/null
fi

rootfs="$(mktemp -d -t backhaul-rootfs.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
echo "base-image.sh: debootstrap bookworm from $mirror (a few minutes)"
debootstrap --variant=minbase --include=busybox,tinyproxy,ca-certificates \
    bookworm "$rootfs" "$mirror" >/dev/null
# Trim what a runtime image never needs.
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$image" >/dev/null
echo "base-image.sh: built $image ($(docker image inspect -f '{{.Size}}' "$image") bytes)"
