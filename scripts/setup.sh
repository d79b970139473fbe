#!/usr/bin/env bash
# Installs what kiln's tests and demo need on a fresh Debian 12 machine (as root) and starts the
# servers the tests use. Idempotent: a second run only checks.
set -euo pipefail
need=()
for pkg in busybox-static sudo libseccomp-dev pkg-config docker.io docker-registry skopeo umoci git apache2-utils uidmap slirp4netns iproute2 iptables \
           bzip2 xz-utils zstd curl python3 time; do
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
# dockerd is the reference consumer of our archives (docker load / docker run) in the tests.
if ! /usr/bin/docker info >/dev/null 2>&1; then
  setsid /usr/sbin/dockerd >/tmp/kiln-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 1 80); do /usr/bin/docker info >/dev/null 2>&1 && break; sleep 0.25; done
  /usr/bin/docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start (see /tmp/kiln-dockerd.log)" >&2; exit 1; }
fi
