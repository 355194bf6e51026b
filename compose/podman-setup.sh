#!/usr/bin/env bash
# Prepare this machine to build and run compose/compose.yaml with rootful podman and no image
# registry: install podman, podman-compose, runc and debootstrap from Debian, and import a Debian
# bookworm base image built by debootstrap from the mirror apt already uses. Every step is
# skipped when it is already done, so CI can run this before every test run.
#
# tests/test_compose.py then builds the stack's images on that base (BASE_IMAGE=localhost/debian:bookworm)
# with CONTAINERS_CONF=compose/podman/containers.conf.
set -euo pipefail
cd "$(dirname "$0")"

BASE_IMAGE=${ENCLAVEQ_COMPOSE_BASE_IMAGE:-localhost/debian:bookworm}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/podman/containers.conf}

if [ "$(id -u)" != 0 ]; then
  echo "podman-setup: not root; skipping (the compose test skips without a usable podman)" >&2
  exit 0
fi

missing=()
for tool in podman podman-compose runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "podman-setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq podman podman-compose runc debootstrap >/dev/null
fi

if ! podman image exists "$BASE_IMAGE"; then
  # The mirror apt is configured with (deb822 sources first, then the one-line format).
  mirror=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null \
           | grep -v security | head -1 || true)
  if [ -z "$mirror" ]; then
    mirror=$(awk '$1 == "deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  fi
  mirror=${mirror:-http://deb.debian.org/debian}
  rootfs=$(mktemp -d /var/tmp/enclaveq-rootfs.XXXXXX)
  trap 'rm -rf "$rootfs"' EXIT
  echo "podman-setup: debootstrap bookworm from $mirror -> $BASE_IMAGE"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
  # Containers built on it use the same mirror.
  echo "deb $mirror bookworm main" > "$rootfs/etc/apt/sources.list"
  tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
fi
echo "podman-setup: podman $(podman version --format '{{.Client.Version}}'), base image $BASE_IMAGE ready"
