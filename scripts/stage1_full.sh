#!/usr/bin/env bash
# Stage 1 over every shipped sample query (303) on the default model: extract, graph, sample.
# The test suite runs the same end-to-end test on a fixed 24-query subset
# (stage1::end_to_end_on_the_default_model_over_the_sample_queries); this script is the full
# run, whose figures (records parsed against the schema, document types, time) go in notes.
#   bash scripts/stage1_full.sh [THREADS=2] [BATCH=4]
# WILDLONG_BIN=path uses that binary instead of building the release one.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
BATCH=${2:-4}
BIN=${WILDLONG_BIN:-target/release/wildlong}
[ -n "${WILDLONG_BIN:-}" ] || cargo build --release --quiet
"$BIN" models fetch
RUN=$(mktemp -d)
trap 'rm -rf "$RUN"' EXIT
t0=$SECONDS
"$BIN" --threads "$THREADS" extract --model default --run "$RUN" --batch-size "$BATCH" --no-progress
"$BIN" --threads "$THREADS" graph --run "$RUN"
"$BIN" --threads "$THREADS" sample --model default --run "$RUN" --per-type 2 --batch-size "$BATCH" \
  --no-progress
records=$(wc -l < "$RUN/stage1/meta.jsonl")
rejects=0
[ -f "$RUN/stage1/rejects.jsonl" ] && rejects=$(wc -l < "$RUN/stage1/rejects.jsonl")
blueprints=$(wc -l < "$RUN/stage1/blueprints.jsonl")
echo "records: $records (rejected: $rejects), blueprints: $blueprints," \
  "$((SECONDS - t0)) s at $THREADS threads, batch $BATCH"
if [ "$records" -ne 303 ] || [ "$rejects" -ne 0 ]; then
  echo "expected all 303 sample queries to parse against the schema" >&2
  exit 1
fi
