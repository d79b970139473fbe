#!/usr/bin/env bash
# The whole test suite, as CI runs it: lints, the differential tests against BuildKit's recorded
# results, the fuzz targets' build, then unit and integration tests (as root: real namespaces,
# overlayfs, dockerd, skopeo, umoci) and the BuildKit conformance corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
shared=${KILN_SHARED_DIR:-$(cd .. && pwd)/shared}
export KILN_CONFORMANCE_DIR=${KILN_CONFORMANCE_DIR:-$shared/conformance}
export CARGO_TERM_COLOR=never
step() { echo "==> $*" >&2; }
step "rustfmt";  cargo fmt --all -- --check
step "clippy";   cargo clippy --workspace --all-targets --release -- -D warnings
step "unused dependencies"
command -v cargo-machete >/dev/null || cargo install -q --locked cargo-machete
cargo machete
step "structure"; python3 scripts/structure.py
step "docs";     RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --release -q
step "build";    cargo build --release -p kiln
if [ -d "$shared/difftest" ]; then
  step "difftest"; bash scripts/difftest.sh
  step "difftest, every case rebuilt with --no-cache"; KILN=scripts/kiln-rebuild.sh bash scripts/difftest.sh
fi
step "fuzz targets compile"; (cd fuzz && cargo check --release -q)
step "tests";    cargo test --workspace --release --no-fail-fast
