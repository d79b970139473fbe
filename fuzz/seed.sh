#!/usr/bin/env bash
# Fills fuzz/corpus/<target> with seeds made from the repository's own test data and ../shared:
# BuildKit's parser test files and real-world Dockerfiles (parse, lower), the .dockerignore
# conformance patterns (dockerignore), and the hostile corpus's layers and archives built on a
# one-file base (apply, load). Nothing binary is committed; run it before `cargo fuzz run`.
# Usage: fuzz/seed.sh [SHARED_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
shared=${1:-${KILN_SHARED_DIR:-$(cd "$here/../.." && pwd)/shared}}
corpus=$here/corpus
mkdir -p "$corpus"/{parse,lower,dockerignore,apply,load}

# Dockerfiles: every test file of BuildKit's parser and the real-world set.
n=0
while IFS= read -r -d '' f; do
  n=$((n + 1))
  cp "$f" "$corpus/parse/df-$n"
  cp "$f" "$corpus/lower/df-$n"
done < <(find "$shared/conformance/buildkit-parser" "$shared/conformance/real-world" \
           -type f \( -name Dockerfile -o -name '*.dockerfile' -o -name 'Dockerfile.*' \) -print0)

# .dockerignore: each conformance row's patterns, a NUL, then its path (the target's format).
python3 - "$shared/conformance/dockerignore/matches.tsv" "$corpus/dockerignore" <<'PY'
import sys, os
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1], encoding="utf-8")][1:]
for i, r in enumerate(rows):
    if len(r) < 5:
        continue
    path, patterns = r[4], r[5:]
    data = "\n".join(patterns).encode() + b"\0" + path.encode()
    with open(os.path.join(sys.argv[2], "row-%d" % i), "wb") as f:
        f.write(data)
PY

# Layers and archives: the hostile corpus on a base of one small file (no bombs: libFuzzer
# mutates small inputs best).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/base/bin" "$tmp/canary"
echo hi > "$tmp/base/bin/sh"
tar --numeric-owner -C "$tmp/base" -cf "$tmp/base.tar" bin
python3 "$here/../testdata/hostile/gen.py" "$tmp/out" --canary "$tmp/canary" --base "$tmp/base.tar" \
  --bomb-mib 1 >/dev/null
for f in "$tmp"/out/layers/*.tar; do
  name=$(basename "$f" .tar)
  # The apply target's first byte picks the whiteout mode: seed both.
  { printf '\0'; cat "$f"; } > "$corpus/apply/$name-overlay"
  { printf '\1'; cat "$f"; } > "$corpus/apply/$name-delete"
done
cp "$tmp"/out/load/*.tar "$corpus/load/" 2>/dev/null || true
find "$corpus" -type f -size +1M -delete
for t in parse lower dockerignore apply load; do
  echo "$t: $(find "$corpus/$t" -type f | wc -l) seeds"
done
