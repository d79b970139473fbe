#!/usr/bin/env bash
# The shared peer bench run twice, kiln once as root and once rootless (as an unprivileged user),
# and the ratio rootless/rootful of kiln's time per row (goal: at most 1.3 on every row).
#
#   bash scripts/rootless-peer-bench.sh [--user kiln-rootless] [--kiln target/release/kiln] [PEER-BENCH ARGS...]
#
# Run as root. USER must exist with /etc/subuid and /etc/subgid ranges (the integration tests
# make `kiln-rootless`). Both runs go through the same wrapper (sh, setpriv, env), so its few
# milliseconds are on both sides: as root it keeps uid 0, rootless it becomes USER. The wrapper
# opens the bench's temp dir to USER (peer-bench makes it 0700) and gives USER the store
# directories it names with --root.
set -euo pipefail
cd "$(dirname "$0")/.."
user=kiln-rootless
kiln=target/release/kiln
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --user) user=$2; shift 2 ;;
    --kiln) kiln=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "rootless-peer-bench.sh: run as root" >&2; exit 1; }
id "$user" >/dev/null 2>&1 || { echo "rootless-peer-bench.sh: no user \`$user\`" >&2; exit 1; }
kiln=$(realpath "$kiln")
shared=${KILN_SHARED_DIR:-$(cd .. && pwd)/shared}
work=$(mktemp -d /tmp/kiln-rootless-peer-XXXXXX)
chmod 0755 "$work"
cp "$kiln" "$work/kiln"
chmod 0755 "$work/kiln"
trap 'rm -rf "$work"' EXIT

wrapper() { # $1: the user kiln runs as
  # Its home and ids are looked up here, not in every timed call: by name, setpriv would ask NSS
  # (systemd's userdb walk among it) for the user and its groups in each one, for the
  # unprivileged user only.
  local home uid gid
  home=$(getent passwd "$1" | cut -d: -f6)
  uid=$(id -u "$1")
  gid=$(id -g "$1")
  cat >"$work/kiln-as-$1" <<EOF
#!/bin/sh
u=$1
if [ "\$1" = --root ]; then
  top=\${2%/*}
  # Only where the store is new: chmod, mkdir and chown are programs, a fork and exec each.
  [ "\$u" = root ] || [ -d "\$2" ] || { chmod 0777 "\$top"; mkdir -p "\$2"; chown "\$u:" "\$2"; }
fi
exec setpriv --reuid=$uid --regid=$gid --clear-groups -- env HOME="$home" "$work/kiln" "\$@"
EOF
  chmod 0755 "$work/kiln-as-$1"
}
wrapper root
wrapper "$user"

for who in root "$user"; do
  echo "== kiln as $who" >&2
  python3 "$shared/bench/peer-bench.py" --kiln "$work/kiln-as-$who" "${args[@]}" | tee "$work/$who.txt" >&2
done
python3 - "$work/root.txt" "$work/$user.txt" <<'PY'
import sys
def rows(path):
    out = {}
    for line in open(path):
        f = line.split()
        if len(f) == 4 and f[0] != "scenario":
            try:
                out[f[0]] = (float(f[1]), float(f[2]))
            except ValueError:
                pass
    return out
root, rootless = rows(sys.argv[1]), rows(sys.argv[2])
print(f"{'scenario':<12} {'rootful s':>10} {'rootless s':>11} {'ratio':>6}   (BuildKit s in each run)")
worst = 0.0
for name, (r, rb) in root.items():
    if name not in rootless:
        continue
    l, lb = rootless[name]
    worst = max(worst, l / r)
    print(f"{name:<12} {r:10.3f} {l:11.3f} {l / r:6.2f}   ({rb:.3f}, {lb:.3f})")
print(f"worst ratio rootless/rootful {worst:.2f}")
PY
