#!/usr/bin/env bash
# RULER throughput: samples scored per minute by `wildlong eval ruler` at one length, batch 1
# versus larger batches, on the default model. The samples are prepared once into a shared
# cache (`--prepare-only`), so each timing covers generation and scoring only. Reports the
# median of RUNS runs per batch size.
#   bash benches/ruler.sh [LENGTH=4096] [SAMPLES_PER_TASK=8] [THREADS=2] [RUNS=1] [BATCHES="1 4 8"] [TASKS=4 | all]
# (TASKS=4: niah_single_2, niah_multikey_2, vt and qa_1; all: RULER's 13.)
set -euo pipefail
cd "$(dirname "$0")/.."
LEN=${1:-4096}
N=${2:-8}
THREADS=${3:-2}
RUNS=${4:-1}
BATCHES=${5:-"1 4 8"}
case "${6:-4}" in
  all) TASKS=niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe,qa_1,qa_2 ;;
  *) TASKS=niah_single_2,niah_multikey_2,vt,qa_1 ;;
esac
cargo build --release --quiet
BIN=target/release/wildlong
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
common=(--threads "$THREADS" eval ruler --model default --lengths "$LEN" --samples "$N"
        --tasks "$TASKS" --cache-dir "$WORK/cache" --no-progress)
"$BIN" "${common[@]}" --out "$WORK/prep" --prepare-only > /dev/null
total=$(( N * $(tr ',' '\n' <<< "$TASKS" | wc -l) ))
echo "length $LEN, $total samples ($TASKS × $N), $THREADS threads, $(nproc) cores"
for b in $BATCHES; do
  times=()
  for r in $(seq "$RUNS"); do
    start=$(date +%s.%N)
    "$BIN" "${common[@]}" --batch-size "$b" --out "$WORK/b$b-$r" > /dev/null
    end=$(date +%s.%N)
    times+=("$(echo "$end - $start" | bc)")
  done
  med=$(printf '%s\n' "${times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  echo "batch $b: median ${med} s, $(echo "scale=2; $total * 60 / $med" | bc) samples/min"
done
