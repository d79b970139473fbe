#!/usr/bin/env bash
# Makes a test image with a real sudo: the busybox rootfs (make-busybox-rootfs.sh) plus the
# host's sudo (Debian package sudo, setuid root) with the libraries it loads, PAM with
# pam_permit only, and a sudoers rule letting user `app` (uid 1000) run anything without a
# password. No registry or internet access is needed.
#
#   testdata/make-sudo-rootfs.sh OUT.tar
set -euo pipefail
out=${1:?usage: make-sudo-rootfs.sh OUT.tar}
here=$(cd "$(dirname "$0")" && pwd)
for f in /usr/bin/sudo /usr/libexec/sudo/sudoers.so; do
  [ -e "$f" ] || { echo "make-sudo-rootfs.sh: $f is missing; install the sudo package" >&2; exit 1; }
done
pam_permit=""
for cand in /lib/x86_64-linux-gnu/security/pam_permit.so /usr/lib/x86_64-linux-gnu/security/pam_permit.so \
            /lib/*/security/pam_permit.so /usr/lib/*/security/pam_permit.so; do
  [ -e "$cand" ] && { pam_permit=$cand; break; }
done
[ -n "$pam_permit" ] || { echo "make-sudo-rootfs.sh: pam_permit.so not found (libpam-modules)" >&2; exit 1; }
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
bash "$here/make-busybox-rootfs.sh" "$stage/base.tar"
mkdir "$stage/root"
tar -C "$stage/root" -xf "$stage/base.tar"
rm "$stage/base.tar"
r=$stage/root
# sudo, its plugins and every library they load, at the same paths as on the host.
copy() { mkdir -p "$r$(dirname "$1")"; cp -a "$1" "$r$1"; }
files=(/usr/bin/sudo /usr/libexec/sudo/sudoers.so /usr/libexec/sudo/libsudo_util.so.0.0.0 "$pam_permit")
for f in "${files[@]}"; do
  copy "$f"
  ldd "$f" | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | while read -r lib; do
    [ -e "$r$lib" ] || { copy "$(readlink -f "$lib")"; [ "$(readlink -f "$lib")" = "$lib" ] || { mkdir -p "$r$(dirname "$lib")"; ln -sf "$(readlink -f "$lib")" "$r$lib"; }; }
  done
done
ln -sf libsudo_util.so.0.0.0 "$r/usr/libexec/sudo/libsudo_util.so.0"
chown root:root "$r/usr/bin/sudo"
chmod 4755 "$r/usr/bin/sudo"
mkdir -p "$r/etc/pam.d" "$r/etc/sudoers.d" "$r/run/sudo"
for kind in auth account session password; do
  echo "$kind sufficient pam_permit.so"
done >"$r/etc/pam.d/sudo"
printf 'Defaults !fqdn\nDefaults !syslog\nroot ALL=(ALL:ALL) ALL\napp ALL=(ALL:ALL) NOPASSWD: ALL\n' >"$r/etc/sudoers"
chmod 0440 "$r/etc/sudoers"
echo "127.0.0.1 localhost buildkitsandbox" >"$r/etc/hosts"
tar -C "$r" --sort=name --mtime='2020-01-01 00:00:00Z' --numeric-owner -cf "$out.part" .
mv "$out.part" "$out"
