#!/usr/bin/env bash
# Builds kiln, bootstraps a busybox base image from the host (no registry needed), builds the demo
# image in testdata/demo and runs it. Needs root (namespaces, overlayfs).
set -euo pipefail
cd "$(dirname "$0")/.."
# What kiln needs on Debian (see the README): libseccomp to build, iptables for the bridge
# network's NAT, a static busybox for the base image.
need=()
for pkg in busybox-static libseccomp-dev iptables; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release -q -p kiln
kiln=target/release/kiln
root=${KILN_ROOT:-/var/lib/kiln}
tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT
bash testdata/make-busybox-rootfs.sh "$tar"
$kiln --root "$root" import "$tar" busybox:local >/dev/null
$kiln --root "$root" build -t kiln-demo testdata/demo
$kiln --root "$root" run --rm kiln-demo
