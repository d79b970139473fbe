#!/usr/bin/env bash
# Installs what kiln's tests and demo need on a fresh Debian 12 machine (as root) and starts the
# servers the tests use. Idempotent: a second run only checks.
set -euo pipefail
need=()
for pkg in busybox-static sudo libseccomp-dev pkg-config docker.io docker-registry skopeo umoci git apache2-utils uidmap slirp4netns fuse-overlayfs iproute2 iptables \
           bzip2 xz-utils zstd curl python3 time qemu-user-static debootstrap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
# Rootless mode's RUN network: slirp4netns opens /dev/net/tun, which Debian's udev makes 0666
# (a machine without udev may leave it 0600).
if [ -c /dev/net/tun ] && [ "$(stat -c %a /dev/net/tun)" != 666 ]; then chmod 0666 /dev/net/tun; fi
# Rootless mode's fuse-overlayfs snapshotter opens /dev/fuse, likewise 0666 under Debian's udev.
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then chmod 0666 /dev/fuse; fi
# The multi-platform tests build arm64 images from Debian's arm64 busybox-static
# (testdata/make-arm64-busybox-rootfs.sh downloads it): dpkg needs the architecture.
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  echo "setup: adding dpkg architecture arm64" >&2
  dpkg --add-architecture arm64
  # As root, apt drops to `_apt`, which cannot write a 0755 /tmp; root fetches instead.
  apt-get -o APT::Sandbox::User=root update -qq
fi
# Emulated RUN steps need QEMU's binfmt_misc handlers with the F flag. systemd-binfmt registers
# Debian's (/usr/lib/binfmt.d/qemu-*.conf) at boot; where no init did, the line is written here
# (the tests also run `kiln setup binfmt arm64`, which does the same).
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  cat /usr/lib/binfmt.d/qemu-aarch64.conf >/proc/sys/fs/binfmt_misc/register
fi
# dockerd is the reference consumer of our archives (docker load / docker run) in the tests.
if ! /usr/bin/docker info >/dev/null 2>&1; then
  setsid /usr/sbin/dockerd >/tmp/kiln-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 80); do /usr/bin/docker info >/dev/null 2>&1 && break; sleep 0.25; done
  /usr/bin/docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start (see /tmp/kiln-dockerd.log)" >&2; exit 1; }
fi
