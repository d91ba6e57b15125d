#!/usr/bin/env bash
# Provide the `debian:bookworm-slim` base image every factorywatch image builds FROM.
#
# Where Docker Hub is reachable, `docker pull debian:bookworm-slim` is all this does. Where it
# is not (air-gapped plants, this CI), the same Debian release is made locally with
# `debootstrap --variant=minbase bookworm` and `docker import`ed under that name, so the
# Dockerfiles stay unchanged. Done once: an existing image is kept (cached).
set -euo pipefail

IMAGE=${FACTORYWATCH_BASE_IMAGE:-debian:bookworm-slim}
MIRROR=${FACTORYWATCH_DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { echo "docker-base-image: $*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    exit 0
fi
if [ "${FACTORYWATCH_BASE_PULL:-1}" = 1 ] && timeout 20 docker pull -q "$IMAGE" >/dev/null 2>&1; then
    say "pulled $IMAGE"
    exit 0
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    say "cannot pull $IMAGE and debootstrap is missing (apt-get install debootstrap)"
    exit 1
fi
root=$(mktemp -d /tmp/factorywatch-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
say "building $IMAGE with debootstrap --variant=minbase bookworm (once, ~2 min)"
debootstrap --variant=minbase bookworm "$root" "$MIRROR" >&2
# What the official slim image leaves out: apt lists, caches, docs and manuals.
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* \
    "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
APT
tar -C "$root" -c . | docker import \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$IMAGE" >/dev/null
say "imported $IMAGE ($(docker image inspect -f '{{.Size}}' "$IMAGE") bytes)"
