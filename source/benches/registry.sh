#!/usr/bin/env bash
# Registry transfer benchmark: `kiln push`/`kiln pull` against `docker push`/`docker pull` of the
# same 100 MB, 5-layer image (5 x 20 MB: half random, half compressible text), to and from the
# same local reference registry (/work/shared/peers/start-registry.sh), on loopback.
#
#   source/benches/registry.sh [KILN_BINARY]
#
# Prints wall time and peak RSS (`/usr/bin/time -v`) per step. For Docker the transfer runs in
# dockerd, so its RSS column is the client's only. Needs root, docker-registry, dockerd
# (/work/shared/peers/start-docker.sh) and busybox-static (testdata/make-busybox-rootfs.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
kiln=${1:-$here/target/release/kiln}
[ -x "$kiln" ] || { echo "kiln binary not found at $kiln (cargo build --release -p kiln)" >&2; exit 1; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 1; }
docker=$(bash /work/shared/peers/start-docker.sh | tail -n1)

work=$(mktemp -d /tmp/kiln-bench-XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
read -r reg_pid reg < <(bash /work/shared/peers/start-registry.sh "$port" | tail -n1)
cleanup() {
  kill "$reg_pid" 2>/dev/null || true
  "$docker" rmi -f "$reg/bench/docker:v1" kiln-bench:v1 >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

measure() { # NAME CMD...
  local name=$1; shift
  /usr/bin/time -v "$@" >"$work/out" 2>"$work/time" || { cat "$work/out" "$work/time" >&2; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$work/time")
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$work/time")
  printf '%-34s %10s %10s MB\n' "$name" "$wall" "$((rss / 1024))"
}

# The image: busybox + 5 layers of 20 MB each.
bash "$here/testdata/make-busybox-rootfs.sh" "$work/busybox.tar" >/dev/null
a="$work/a"
"$kiln" --root "$a" import "$work/busybox.tar" busybox:local >/dev/null
mkdir -p "$work/ctx"
{
  echo "FROM busybox:local"
  for i in 1 2 3 4 5; do
    echo "RUN head -c 10485760 /dev/urandom > /random$i && yes layer-$i-text | head -c 10485760 > /text$i"
  done
} >"$work/ctx/Dockerfile"
"$kiln" --root "$a" build -q -t kiln-bench:v1 "$work/ctx" >/dev/null
"$kiln" --root "$a" tag kiln-bench:v1 "$reg/bench/kiln:v1"
# The same bytes for Docker.
"$kiln" --root "$a" save kiln-bench:v1 -o "$work/image.tar"
"$docker" load -i "$work/image.tar" >/dev/null
"$docker" tag kiln-bench:v1 "$reg/bench/docker:v1"

printf '%-34s %10s %10s\n' "step" "wall" "peak RSS"
measure "kiln push (compresses 5 layers)" "$kiln" --root "$a" push -q "$reg/bench/kiln:v1"
measure "kiln push again (all HEAD-skipped)" "$kiln" --root "$a" push -q "$reg/bench/kiln:v1"
measure "docker push (compresses 5 layers)" "$docker" push "$reg/bench/docker:v1"
b="$work/b"
measure "kiln pull (fresh store)" "$kiln" --root "$b" pull -q "$reg/bench/kiln:v1"
measure "kiln pull again (up to date)" "$kiln" --root "$b" pull -q "$reg/bench/kiln:v1"
"$docker" rmi -f "$reg/bench/docker:v1" kiln-bench:v1 >/dev/null
measure "docker pull (after rmi)" "$docker" pull "$reg/bench/docker:v1"
