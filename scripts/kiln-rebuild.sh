#!/usr/bin/env bash
# A kiln that builds twice: once as asked, then again with --no-cache, the second result being
# the one tagged. Run under the difftest (scripts/difftest.sh with KILN=scripts/kiln-rebuild.sh),
# every case is then judged on a rebuild: COPY steps link from the first build's results and may
# find their tree equal to it (ARCHITECTURE.md, "Linked copies").
set -uo pipefail
kiln=${KILN_REAL:-$(cd "$(dirname "$0")/.." && pwd)/target/release/kiln}
args=("$@")
for i in "${!args[@]}"; do
  if [ "${args[$i]}" = build ]; then
    "$kiln" "${args[@]}" >/dev/null 2>&1
    exec "$kiln" "${args[@]:0:$((i + 1))}" --no-cache "${args[@]:$((i + 1))}"
  fi
done
exec "$kiln" "$@"
