#!/usr/bin/env bash
# Times a build for one platform (linux/amd64) against the same build for two
# (linux/amd64,linux/arm64, the arm64 RUN steps under QEMU), uncached (--no-cache), best of N.
# The Dockerfile has a `FROM --platform=$BUILDPLATFORM` stage that both targets share (it runs
# once), a per-target stage, and a final stage with a small RUN loop. Prints one row per case
# and the ratio. Needs root, qemu-user-static and dpkg's arm64 architecture (scripts/setup.sh).
#
#   build/benches/multiplatform.sh [RUNS]
#
# KILN=path/to/kiln selects the binary (default: a release build in target/).
set -euo pipefail
runs=${1:-3}
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -z "${KILN:-}" ]; then
  (cd "$here" && cargo build --release -q -p kiln)
  KILN="$here/target/release/kiln"
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$here/testdata/make-busybox-rootfs.sh" "$work/amd64.tar"
KILN_ARM64_DEB_CACHE=${KILN_ARM64_DEB_CACHE:-/var/cache/kiln-bench} \
  bash "$here/testdata/make-arm64-busybox-rootfs.sh" "$work/arm64.tar"
"$KILN" setup binfmt arm64 >/dev/null
root="$work/root"
"$KILN" --root "$root" import "$work/amd64.tar" bb:amd64 >/dev/null
"$KILN" --root "$root" import --platform linux/arm64 "$work/arm64.tar" bb:arm64 >/dev/null
mkdir -p "$work/ctx"
cat >"$work/ctx/Dockerfile" <<'DOCKERFILE'
FROM --platform=$BUILDPLATFORM bb:amd64 AS tools
RUN for i in $(seq 1 2000); do echo $i; done | md5sum > /tool

ARG TARGETARCH
FROM bb:$TARGETARCH
COPY --from=tools /tool /tool
RUN for i in $(seq 1 2000); do echo $i; done | md5sum > /sum && uname -m > /arch
DOCKERFILE

best() { # best wall time in seconds of running "$@" $runs times
  local b=""
  for _ in $(seq 1 "$runs"); do
    local s e t
    s=$(date +%s.%N)
    "$@" >/dev/null 2>&1
    e=$(date +%s.%N)
    t=$(echo "$e - $s" | bc)
    if [ -z "$b" ] || [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; fi
  done
  echo "$b"
}
one=$(best "$KILN" --root "$root" build --no-cache --platform linux/amd64 "$work/ctx")
two=$(best "$KILN" --root "$root" build --no-cache --platform linux/amd64,linux/arm64 "$work/ctx")
arm=$(best "$KILN" --root "$root" build --no-cache --platform linux/arm64 "$work/ctx")
printf '%-40s %8.3f s\n' "build linux/amd64" "$one"
printf '%-40s %8.3f s\n' "build linux/arm64 (emulated RUN)" "$arm"
printf '%-40s %8.3f s\n' "build linux/amd64,linux/arm64" "$two"
printf '%-40s %8.2fx\n' "two platforms / one" "$(echo "$two / $one" | bc -l)"
