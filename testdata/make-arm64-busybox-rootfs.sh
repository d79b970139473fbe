#!/usr/bin/env bash
# Makes an arm64 busybox root filesystem tarball from Debian's busybox-static:arm64 package, for
# the multi-platform tests (import it with `kiln import --platform linux/arm64 OUT.tar NAME`).
#
#   testdata/make-arm64-busybox-rootfs.sh OUT.tar
#
# Needs the arm64 architecture in dpkg (`dpkg --add-architecture arm64 && apt-get update`, which
# scripts/setup.sh does) and qemu-user-static (the applet list comes from running the binary).
# The .deb is kept in $KILN_ARM64_DEB_CACHE (default: the directory of OUT.tar) so later runs
# work offline. The tarball is reproducible for a given package version.
set -euo pipefail
out=${1:?usage: make-arm64-busybox-rootfs.sh OUT.tar}
here=$(cd "$(dirname "$0")" && pwd)
cache=${KILN_ARM64_DEB_CACHE:-$(dirname "$out")}
mkdir -p "$cache"
deb=$(ls "$cache"/busybox-static_*_arm64.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    echo "make-arm64-busybox-rootfs.sh: dpkg has no arm64 architecture: run 'dpkg --add-architecture arm64 && apt-get update'" >&2
    exit 1
  fi
  # As root, apt drops to `_apt` for downloads, which needs a writable cache dir.
  (cd "$cache" && apt-get -o APT::Sandbox::User=root download busybox-static:arm64 >/dev/null)
  deb=$(ls "$cache"/busybox-static_*_arm64.deb | head -n1)
fi
qemu=""
for cand in /usr/bin/qemu-aarch64-static /usr/bin/qemu-aarch64; do
  if [ -x "$cand" ]; then qemu=$cand; break; fi
done
if [ -z "$qemu" ]; then
  echo "make-arm64-busybox-rootfs.sh: no qemu-aarch64-static; install qemu-user-static" >&2
  exit 1
fi
x=$(mktemp -d)
trap 'rm -rf "$x"' EXIT
dpkg-deb -x "$deb" "$x"
bb=$x/bin/busybox
[ -x "$bb" ] || { echo "make-arm64-busybox-rootfs.sh: $deb has no bin/busybox" >&2; exit 1; }
if ! file -b "$bb" 2>/dev/null | grep -q 'aarch64' && ! head -c 20 "$bb" | od -An -tx1 | tr -d ' \n' | grep -q 'b700$'; then
  echo "make-arm64-busybox-rootfs.sh: $bb is not an arm64 ELF" >&2
  exit 1
fi
BUSYBOX_RUNNER=$qemu "$here/make-busybox-rootfs.sh" "$out" "$bb"
