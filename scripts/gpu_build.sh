#!/usr/bin/env bash
# Builds the CUDA path here (no GPU needed) and packs what the GPU machine runs into
# target/gpu/ (< 64 MiB): the stripped `wildlong` binary and the integration-test binary
# (kernel tests), both xz-compressed. Needs scripts/cuda/setup.sh to have run once.
#
#   bash scripts/gpu_build.sh            # then on the GPU machine: bash scripts/gpu_check.sh
#
# CARGO_TARGET_DIR (default target/cuda) keeps the CUDA build apart from the CPU one; the
# first build compiles candle's kernels with nvcc (12-18 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
source "${WILDLONG_CUDA_ENV:-scripts/cuda/env.sh}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/cuda}"
cargo build --release --features cuda
test_bin=$(cargo test --release --features cuda --test integration --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import sys, json
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "integration":
        print(m["executable"])' | tail -1)
[ -n "$test_bin" ] || { echo "no integration test binary built" >&2; exit 1; }
mkdir -p target/gpu
strip -o target/gpu/wildlong "$CARGO_TARGET_DIR/release/wildlong"
strip -o target/gpu/integration "$test_bin"
rm -f target/gpu/*.xz
xz -T2 -6 target/gpu/wildlong target/gpu/integration
ls -l target/gpu
total=$(du -cb target/gpu/*.xz | tail -1 | cut -f1)
echo "packed: $((total / 1048576)) MiB in target/gpu (limit 64 MiB with the working tree)"
