#!/usr/bin/env bash
# Installs what microVM execution needs on Debian 12 (as root), idempotently:
#   - QEMU, qemu-utils, e2fsprogs, debootstrap, the Debian docker-registry (tests)
#   - the Debian cloud kernel (linux-image-cloud-amd64's current image package),
#     unpacked under $HEARTH_DEPS/kernel: vmlinuz, modules/, release
#   - the default guest image: Debian bookworm (minbase) with docker.io, iptables,
#     ca-certificates and kmod, plus the guest kernel's modules, as an ext4 disk
#     image at $HEARTH_DEPS/images/default.ext4
set -euo pipefail
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"
DEPS=${HEARTH_DEPS:-/opt/hearth-deps}
export DEBIAN_FRONTEND=noninteractive

pkgs=(qemu-system-x86 qemu-utils e2fsprogs debootstrap docker-registry ca-certificates cpio slirp4netns iproute2 util-linux lz4 file busybox-static)
apt_install_missing "${pkgs[@]}"
# The registry package starts a system service; tests run their own instances.
systemctl disable --now docker-registry >/dev/null 2>&1 || true

# --- guest kernel ------------------------------------------------------------
kdir=$DEPS/kernel
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
if [ -z "$kpkg" ]; then
    apt-get update
    kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
fi
release=${kpkg#linux-image-}
if [ "$(cat "$kdir/release" 2>/dev/null)" != "$release" ] || [ ! -f "$kdir/vmlinux" ]; then
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download "$kpkg")
    dpkg -x "$tmp"/"$kpkg"_*.deb "$tmp/x"
    rm -rf "$kdir.new" && mkdir -p "$kdir.new/modules"
    cp "$tmp/x/boot/vmlinuz-$release" "$kdir.new/vmlinuz"
    # The uncompressed kernel (an ELF with a PVH entry point) boots ~0.3 s
    # faster under emulation: cut the LZ4 payload out of the bzImage.
    off=$(grep -obUaP '\x02\x21\x4c\x18' "$kdir.new/vmlinuz" | head -n1 | cut -d: -f1)
    if [ -n "$off" ]; then
        tail -c +$((off + 1)) "$kdir.new/vmlinuz" | lz4 -dc > "$kdir.new/vmlinux" 2>/dev/null || true
        file "$kdir.new/vmlinux" 2>/dev/null | grep -q ELF || rm -f "$kdir.new/vmlinux"
    fi
    cp -a "$tmp/x/lib/modules/$release" "$kdir.new/modules/"
    echo "$release" > "$kdir.new/release"
    rm -rf "$kdir" && mv "$kdir.new" "$kdir"
    rm -rf "$tmp"
fi
echo "guest kernel: $kdir/vmlinuz ($release)"

# --- default image -----------------------------------------------------------
# Bump when the recipe below changes, so existing machines rebuild.
recipe="1 $release"
idir=$DEPS/images
img=$idir/default.ext4
if [ "$(cat "$idir/default.recipe" 2>/dev/null)" != "$recipe" ] || [ ! -f "$img" ]; then
    mkdir -p "$idir"
    # The Debian mirror apt already uses.
    mirror=$(grep -rhoE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$mirror" ] || mirror=$(grep -hoE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}' | head -n1 || true)
    [ -n "$mirror" ] || { echo "install-vm: no Debian mirror found in apt sources" >&2; exit 1; }
    root=$(mktemp -d "$idir/rootfs.XXXX")
    debootstrap --variant=minbase --include=docker.io,iptables,ca-certificates,kmod,procps bookworm "$root" "$mirror"
    mkdir -p "$root/lib/modules"
    cp -a "$kdir/modules/$release" "$root/lib/modules/"
    chroot "$root" depmod "$release" || true
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    used=$(du -sm "$root" | cut -f1)
    size=$(( used * 12 / 10 + 256 ))M
    mkfs.ext4 -q -F -L hearth-default -d "$root" "$img.tmp" "$size"
    mv "$img.tmp" "$img"
    rm -rf "$root"
    echo "$recipe" > "$idir/default.recipe"
fi
echo "default image: $img"
