#!/usr/bin/env bash
# Measures `kiln save` and `kiln load` of a ~100 MB single-layer image against the I/O-bound
# baselines the issue names: `tar -c` of the same files plus sha256 (save), and `tar -x` plus
# sha256 of the extracted blobs (load). Prints the best of N runs and the ratios.
#
#   cache/benches/save_load.sh [SIZE_MB] [RUNS]
#
# KILN=path/to/kiln selects the binary (default: a release build in target-cache).
set -euo pipefail
size_mb=${1:-100}
runs=${2:-3}
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${KILN:-}" ]; then
  (cd "$here" && CARGO_TARGET_DIR="$here/target-cache" cargo build --release -q -p kiln)
  KILN="$here/target-cache/release/kiln"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# ~SIZE_MB of incompressible files in a few directories.
mkdir -p "$work/rootfs"
for i in $(seq 1 "$size_mb"); do
  d="$work/rootfs/d$((i % 8))"
  mkdir -p "$d"
  head -c 1048576 /dev/urandom >"$d/f$i"
done
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
root="$work/root"
"$KILN" --root "$root" import "$work/rootfs.tar" bench:1 >/dev/null

best() { # best wall time in seconds of running "$@" $runs times
  local b=""
  for _ in $(seq 1 "$runs"); do
    local s e t
    s=$(date +%s.%N)
    "$@" >/dev/null
    e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc)
    if [ -z "$b" ] || [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; fi
  done
  echo "$b"
}

base_save() { tar -C "$work/rootfs" -cf "$work/base.tar" . && sha256sum "$work/base.tar"; }
kiln_save() { "$KILN" --root "$root" save -o "$work/saved.tar" bench:1; }
base_load() {
  rm -rf "$work/x" && mkdir "$work/x" && tar -C "$work/x" -xf "$work/saved.tar" && sha256sum "$work"/x/blobs/sha256/*
}
kiln_load() { rm -rf "$work/root2" && "$KILN" --root "$work/root2" load -i "$work/saved.tar"; }

t_base_save=$(best base_save)
t_kiln_save=$(best kiln_save)
t_base_load=$(best base_load)
t_kiln_load=$(best kiln_load)
printf 'image: %s MB, best of %s runs\n' "$size_mb" "$runs"
printf 'save: kiln %.3fs  tar -c + sha256 %.3fs  ratio %.2f\n' "$t_kiln_save" "$t_base_save" "$(echo "$t_kiln_save / $t_base_save" | bc -l)"
printf 'load: kiln %.3fs  tar -x + sha256 %.3fs  ratio %.2f\n' "$t_kiln_load" "$t_base_load" "$(echo "$t_kiln_load / $t_base_load" | bc -l)"

# The same image through Docker, side by side, when a daemon is reachable.
if /usr/bin/docker info >/dev/null 2>&1; then
  ref="kiln-bench-$$:1"
  /usr/bin/docker import "$work/rootfs.tar" "$ref" >/dev/null
  docker_save() { /usr/bin/docker save -o "$work/docker.tar" "$ref"; }
  docker_load() { /usr/bin/docker rmi "$ref" >/dev/null && /usr/bin/docker load -i "$work/docker.tar"; }
  t_docker_save=$(best docker_save)
  t_docker_load=$(best docker_load)
  /usr/bin/docker rmi "$ref" >/dev/null 2>&1 || true
  printf 'docker save %.3fs (kiln %.2fx faster)  docker load %.3fs (kiln %.2fx faster)\n' \
    "$t_docker_save" "$(echo "$t_docker_save / $t_kiln_save" | bc -l)" \
    "$t_docker_load" "$(echo "$t_docker_load / $t_kiln_load" | bc -l)"
fi
