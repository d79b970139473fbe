#!/usr/bin/env bash
# Builds kiln, bootstraps a busybox base image from the host (no registry needed), builds the demo
# image in testdata/demo and runs it. Needs root (namespaces, overlayfs).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v busybox >/dev/null 2>&1 && ! ldd "$(command -v busybox)" >/dev/null 2>&1 || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null; }
cargo build --release -q -p kiln
kiln=target/release/kiln
root=${KILN_ROOT:-/var/lib/kiln}
tar=$(mktemp --suffix=.tar)
trap 'rm -f "$tar"' EXIT
bash testdata/make-busybox-rootfs.sh "$tar"
$kiln --root "$root" import "$tar" busybox:local >/dev/null
$kiln --root "$root" build -t kiln-demo testdata/demo
$kiln --root "$root" run --rm kiln-demo
