#!/usr/bin/env bash
# The chaos loop: kills kiln with SIGKILL at random points of build, commit, save, load, pull,
# push, prune and `run -d` on one store, and after each kill runs `kiln store verify`.
#
#   scripts/chaos.sh [--kills N] [--kiln PATH] [--seed S] [--keep]
#
# --kills N: until N kills have landed while the command ran. Defaults: 300 kills, target/release/kiln, a seed from the clock. Needs root (builds and
# containers) and Debian's docker-registry (started here on a free loopback port, as
# ../shared/peers/start-registry.sh does).
#
# After every kill: `store verify` must find no damage (exit 0). It lists leftovers (temps of the
# killed process, mounts held by its orphaned steps, unreferenced data); they are counted. Then the
# next command runs (`kiln images`), and `store verify` again must find no stale temps and no
# leftover mounts (orphaned build steps get a grace of 5 s to finish: they are not kiln's to kill
# in a plain command). Every 10th iteration runs `store verify --repair` and counts its repairs.
# Every command that finished before its kill recorded a tag; all those tags must name the same
# image at the end. Prunes here never remove tagged images (no -a on images).
#
# Prints the figures and exits 1 on damage, a lost tag or a leftover after the next command.
set -euo pipefail
cd "$(dirname "$0")/.."
kills=300
kiln=target/release/kiln
seed=$(date +%s)
keep=0
while [ $# -gt 0 ]; do
  case $1 in
    --kills) kills=$2; shift 2 ;;
    --kiln) kiln=$2; shift 2 ;;
    --seed) seed=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--kills N] [--kiln PATH] [--seed S] [--keep]" >&2; exit 2 ;;
  esac
done
kiln=$(realpath "$kiln")
[ -x "$kiln" ] || { echo "chaos: $kiln is not built (cargo build --release -p kiln)" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "chaos: needs root (namespaces, overlayfs)" >&2; exit 2; }
command -v docker-registry >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null
}
RANDOM=$seed
work=$(mktemp -d /tmp/kiln-chaos-XXXXXX)
root=$work/root
log=$work/log
mkdir -p "$log"
regpid=""
cleanup() {
  # Containers started here, then the registry; the store goes unless --keep.
  for c in $("$kiln" --root "$root" ps -aq 2>/dev/null); do
    "$kiln" --root "$root" rm -f "$c" >/dev/null 2>&1 || true
  done
  [ -n "$regpid" ] && kill "$regpid" 2>/dev/null || true
  if [ "$keep" = 0 ]; then rm -rf "$work"; else echo "chaos: store kept in $root" >&2; fi
}
trap cleanup EXIT
k() { "$kiln" --root "$root" "$@"; }

# A registry on a free loopback port.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
regdir=$work/registry
mkdir -p "$regdir"
cat >"$regdir/config.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $regdir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
setsid docker-registry serve "$regdir/config.yml" >"$regdir/log" 2>&1 </dev/null &
regpid=$!
for _ in $(seq 1 40); do
  curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && break
  sleep 0.25
done
reg=127.0.0.1:$port

# The store: busybox, a context, a first build, a base in the registry, a container to commit.
bash testdata/make-busybox-rootfs.sh "$work/busybox.tar" >/dev/null
k import "$work/busybox.tar" busybox:local >/dev/null
ctx=$work/ctx
mkdir -p "$ctx"
head -c 3000000 /dev/urandom >"$ctx/blob"
cat >"$ctx/Dockerfile" <<'EOF'
FROM busybox:local
ARG N=0
RUN dd if=/dev/urandom of=/data bs=1M count=6 2>/dev/null && echo $N > /n
COPY . /ctx
RUN --mount=type=cache,target=/cache dd if=/dev/zero of=/cache/f$N bs=1M count=1 2>/dev/null && ls /cache | wc -l > /count
EOF
k build -q -t chaos/seed:0 "$ctx" >/dev/null
k save -o "$work/seed.tar" chaos/seed:0
k tag busybox:local "$reg/chaos/base:v1"
k push -q "$reg/chaos/base:v1" >/dev/null
k run -d --name keeper busybox:local sh -c 'dd if=/dev/zero of=/d bs=1M count=3 2>/dev/null; sleep 100000' >/dev/null

# tag -> image ID of every command that finished.
declare -A expect=()
declare -A ran=() landed=()
ops=(build commit save load pull push prune run)
verify_ok=0 damage=0 repairs=0 repair_runs=0 left_temps=0 left_mounts=0 left_unref=0
orphans_seen=0 after_temps=0 after_mounts=0 after_bytes=0 lost=0 killed_bytes=0 max_killed_bytes=0
declare -A repaired_kinds=()

temp_bytes() {
  # Bytes of temps in the store and beside save destinations.
  local n=0 f s
  for f in "$root"/ingest/* "$root"/tmp/* "$root"/tmp/outside/* "$root"/snapshots/tmp/* "$root"/snapshots/tmp/.[!.]* \
           "$root"/cache/index/.tmp/* "$root"/images.json.*.tmp "$work"/.out*.kiln-*.tmp; do
    [ -e "$f" ] || continue
    [ "$f" = "$root/tmp/outside" ] && continue
    s=$(du -sb "$f" 2>/dev/null | cut -f1)
    n=$((n + ${s:-0}))
    [ -n "${TEMP_LIST:-}" ] && echo "$f ${s:-0}" >&2
  done
  echo "$n"
}

# How long each kind of command takes (ms), learnt from the ones that finish, so that the kill
# lands while it runs.
declare -A est=()
start=$(date +%s)
total_landed=0
i=0
while [ "$total_landed" -lt "$kills" ] && [ "$i" -lt $((kills * 4)) ]; do
  i=$((i + 1))
  op=${ops[$((RANDOM % ${#ops[@]}))]}
  ran[$op]=$(( ${ran[$op]:-0} + 1 ))
  tag=""
  case $op in
    build) tag=chaos/build:$i; max=1500
           cmd=(build -q --build-arg "N=$i" -t "$tag" "$ctx") ;;
    commit) tag=chaos/commit:$i; max=600; cmd=(commit keeper "$tag") ;;
    save) max=800; cmd=(save -o "$work/out$i.tar" chaos/seed:0) ;;
    load) max=800; cmd=(load -q -i "$work/seed.tar") ;;
    pull) max=600; tag=$reg/chaos/base:v1
          k rmi -f "$tag" >/dev/null 2>&1 || true
          unset "expect[$tag]"
          cmd=(pull -q "$tag") ;;
    push) max=800; k tag chaos/seed:0 "$reg/chaos/pushed:$i" >/dev/null
          cmd=(push -q "$reg/chaos/pushed:$i") ;;
    prune) max=500
           case $((RANDOM % 3)) in
             0) cmd=(image prune -f) ;;
             1) cmd=(builder prune -a -f) ;;
             *) cmd=(system prune -f) ;;
           esac ;;
    run) max=800; cmd=(run -d --name "r$i" busybox:local sh -c 'echo hi > /f; sleep 2') ;;
  esac
  [ -n "${est[$op]:-}" ] && max=${est[$op]}
  t0=$(date +%s%N)
  "$kiln" --root "$root" "${cmd[@]}" >"$log/$i.out" 2>"$log/$i.err" &
  pid=$!
  delay=$((RANDOM * 32768 + RANDOM))
  delay=$((delay % (max > 1 ? max : 1)))
  sleep "$(printf '%d.%03d' $((delay / 1000)) $((delay % 1000)))"
  if kill -0 "$pid" 2>/dev/null; then
    kill -9 "$pid" 2>/dev/null || true
    landed[$op]=$(( ${landed[$op]:-0} + 1 ))
    total_landed=$((total_landed + 1))
  fi
  status=0
  wait "$pid" 2>/dev/null || status=$?
  if [ "$status" = 0 ]; then
    took=$(( ($(date +%s%N) - t0) / 1000000 ))
    est[$op]=$(( took * 9 / 10 > 5 ? took * 9 / 10 : 5 ))
  fi
  # What the kill left, before any other command runs.
  b=$(temp_bytes)
  killed_bytes=$((killed_bytes + b))
  [ "$b" -gt "$max_killed_bytes" ] && max_killed_bytes=$b
  if [ "$status" = 0 ] && [ -n "$tag" ]; then
    expect[$tag]=$(k images -q --no-trunc "$tag" | head -1)
  elif [ "$status" != 0 ] && [ "$status" != 137 ]; then
    # A command that failed on its own (not killed): only a prune may fail by waiting... none should.
    echo "chaos: iteration $i: kiln ${cmd[*]} failed with $status:" >&2
    cat "$log/$i.err" >&2
    exit 1
  fi
  # The store right after the kill.
  if k store verify >"$log/$i.verify" 2>&1; then
    verify_ok=$((verify_ok + 1))
  else
    damage=$((damage + 1))
    echo "chaos: iteration $i ($op): store verify found damage:" >&2
    cat "$log/$i.verify" >&2
  fi
  left_temps=$((left_temps + $(grep -c '^leftover: temp' "$log/$i.verify" || true)))
  m=$(grep -c '^leftover: .* mount' "$log/$i.verify" || true)
  left_mounts=$((left_mounts + m))
  [ "$m" -gt 0 ] && orphans_seen=$((orphans_seen + 1))
  left_unref=$((left_unref + $(grep -c '^leftover: \(blob\|snapshot\)' "$log/$i.verify" || true)))
  # The next command; orphaned steps of a killed build get 5 s to finish.
  for _ in $(seq 1 50); do
    k store verify >"$log/$i.mounts" 2>&1 || true
    grep -q '^leftover: .* mount' "$log/$i.mounts" || break
    sleep 0.1
  done
  k images >/dev/null
  k store verify >"$log/$i.after" 2>&1 || { damage=$((damage + 1)); cat "$log/$i.after" >&2; }
  t=$(grep -c '^leftover: temp' "$log/$i.after" || true)
  m=$(grep -c '^leftover: .* mount' "$log/$i.after" || true)
  after_temps=$((after_temps + t))
  after_mounts=$((after_mounts + m))
  b=$(temp_bytes)
  after_bytes=$((after_bytes + b))
  if [ "$t" -gt 0 ] || [ "$m" -gt 0 ] || [ "$b" -gt 0 ]; then
    echo "chaos: iteration $i ($op): after the next command: $t temps, $m mounts, $b temp bytes" >&2
    TEMP_LIST=1 temp_bytes >/dev/null
    grep '^leftover' "$log/$i.after" >&2 || true
  fi
  if [ $((i % 10)) = 0 ]; then
    repair_runs=$((repair_runs + 1))
    k store verify --repair >"$log/$i.repair" 2>&1 || { damage=$((damage + 1)); cat "$log/$i.repair" >&2; }
    n=$(grep -c '^repaired:' "$log/$i.repair" || true)
    repairs=$((repairs + n))
    while read -r kind; do
      repaired_kinds[$kind]=$(( ${repaired_kinds[$kind]:-0} + 1 ))
    done < <(sed -n 's/^repaired: //p' "$log/$i.repair" \
             | awk '{k=$1" "$2; if ($3 !~ /^(sha256|`|\[)/ && $3 != "") k=k" "$3; print k}')
  fi
  rm -f "$work/out$i.tar"
  k rm -f "r$i" >/dev/null 2>&1 || true
done

for tag in "${!expect[@]}"; do
  id=$(k images -q --no-trunc "$tag" | head -1)
  if [ "$id" != "${expect[$tag]}" ]; then
    lost=$((lost + 1))
    echo "chaos: tag $tag of a finished command names '${id}', expected '${expect[$tag]}'" >&2
  fi
done
k store verify >"$log/final" 2>&1 || { damage=$((damage + 1)); cat "$log/final" >&2; }

echo "chaos: seed $seed, $i iterations in $(( $(date +%s) - start )) s"
for op in "${ops[@]}"; do
  printf '  %-7s %4d runs, %4d killed while running\n' "$op" "${ran[$op]:-0}" "${landed[$op]:-0}"
done
echo "  kills that landed: $total_landed"
echo "  temp bytes the kills left: $killed_bytes in all, at most $max_killed_bytes after one kill"
echo "  store verify right after each kill: $verify_ok passed, $damage found damage"
echo "  leftovers right after the kills: $left_temps stale temps, $left_mounts mounts (in $orphans_seen kills, held by orphaned steps), $left_unref unreferenced blobs/snapshots"
echo "  after the next command: $after_temps stale temps, $after_mounts leftover mounts, $after_bytes temp bytes"
echo "  tags of finished commands: ${#expect[@]} checked, $lost lost"
echo "  verify --repair: $repair_runs runs, $repairs repairs"
for kind in "${!repaired_kinds[@]}"; do
  printf '    %-30s %d\n' "$kind" "${repaired_kinds[$kind]}"
done
if [ "$damage" -gt 0 ] || [ "$lost" -gt 0 ] || [ "$after_temps" -gt 0 ] || [ "$after_mounts" -gt 0 ] || [ "$after_bytes" -gt 0 ]; then
  echo "chaos: FAILED" >&2
  exit 1
fi
echo "chaos: ok"
