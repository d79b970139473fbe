#!/usr/bin/env bash
# Makes kiln's bootstrap base image: a small busybox root filesystem as a tarball, built from the
# host's static busybox (Debian package busybox-static), so tests and the demo need no registry.
#
#   testdata/make-busybox-rootfs.sh OUT.tar [BUSYBOX]
#
# BUSYBOX is another static busybox binary to use (make-arm64-busybox-rootfs.sh passes an arm64
# one; its applet list then comes from running it under QEMU, `$BUSYBOX_RUNNER`).
#
# The output is byte-for-byte reproducible for a given busybox binary (sorted names, fixed mtime,
# numeric owners), so every run imports the same image.
set -euo pipefail
out=${1:?usage: make-busybox-rootfs.sh OUT.tar [BUSYBOX]}
bb=${2:-}
runner=${BUSYBOX_RUNNER:-}
if [ -z "$bb" ]; then
  for cand in /bin/busybox /usr/bin/busybox; do
    if [ -x "$cand" ] && "$cand" --list >/dev/null 2>&1; then bb=$cand; break; fi
  done
fi
if [ -z "$bb" ]; then
  echo "make-busybox-rootfs.sh: no busybox found; install the busybox-static package" >&2
  exit 1
fi
if [ -z "$runner" ] && ldd "$bb" >/dev/null 2>&1; then
  echo "make-busybox-rootfs.sh: $bb is dynamically linked; install busybox-static" >&2
  exit 1
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
for d in bin sbin usr usr/bin usr/sbin etc root tmp home home/app var proc sys dev; do
  mkdir -p "$stage/$d"
done
chmod 1777 "$stage/tmp"
chmod 0700 "$stage/root"
install -m 0755 "$bb" "$stage/bin/busybox"
$runner "$bb" --list | while read -r applet; do
  [ "$applet" = busybox ] || [ -e "$stage/bin/$applet" ] || ln -s busybox "$stage/bin/$applet"
done
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'daemon:x:1:1:daemon:/usr/sbin:/bin/false' \
  'nobody:x:65534:65534:nobody:/home:/bin/false' 'app:x:1000:1000:app:/home/app:/bin/sh' >"$stage/etc/passwd"
printf '%s\n' 'root:x:0:' 'daemon:x:1:' 'nogroup:x:65534:' 'app:x:1000:' >"$stage/etc/group"
echo 'hosts: files dns' >"$stage/etc/nsswitch.conf"
tar -C "$stage" --sort=name --mtime='2020-01-01 00:00:00Z' --numeric-owner --owner=0 --group=0 \
  --exclude=./home/app -cf "$out.part" .
tar -C "$stage" --mtime='2020-01-01 00:00:00Z' --numeric-owner --owner=1000 --group=1000 \
  --no-recursion -rf "$out.part" ./home/app
mv "$out.part" "$out"
