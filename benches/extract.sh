#!/usr/bin/env bash
# Stage 1 extraction throughput: queries extracted per minute by `wildlong extract` on the
# default model over the built-in sample queries, batch 1 versus larger batches. The filter
# runs once up front (`--filter-only`); each timing is the extraction command's own
# generation time (model load excluded). Reports the median of RUNS runs per batch size.
#   bash benches/extract.sh [QUERIES=32] [THREADS=2] [RUNS=1] [BATCHES="1 4 8 16"] [WEIGHTS=exact]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-32}
THREADS=${2:-2}
RUNS=${3:-1}
BATCHES=${4:-"1 4 8 16"}
WEIGHTS=${5:-exact}
cargo build --release --quiet
BIN=target/release/wildlong
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "$N sample queries, $THREADS threads, $(nproc) cores, weights $WEIGHTS"
for b in $BATCHES; do
  rates=()
  for r in $(seq "$RUNS"); do
    "$BIN" --threads "$THREADS" extract --run "$WORK/b$b-$r" --filter-only > /dev/null
    out=$("$BIN" --threads "$THREADS" extract --model default --run "$WORK/b$b-$r" --limit "$N" \
          --batch-size "$b" --weights "$WEIGHTS" --no-progress)
    rates+=("$(grep -o '[0-9.]* queries/min' <<< "$out" | cut -d' ' -f1)")
  done
  med=$(printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "batch $b: median ${med} queries/min (runs: ${rates[*]})"
done
