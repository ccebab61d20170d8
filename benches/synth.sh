#!/usr/bin/env bash
# Stage 2 synthesis speed on the default model (CPU):
#  1. samples (pairs) per minute of `wildlong synth` over the built-in corpus: CONTEXTS
#     contexts at BUCKET tokens, INSTRUCTIONS each (rewrite + answer + closed-book check);
#     the timing is synthesis alone (model load, reading and assembly excluded), fresh store;
#     with it, the share of each document's tokens the prefix cache served after the first
#     request over it;
#  2. the shared-prefix speed-up: 8 instructions over one document of PREFIX tokens continuing
#     one prefill, versus 8 independent requests that each prefill the document
#     (`wildlong bench`, median of 3).
#   bash benches/synth.sh [THREADS=2] [BUCKET=4096] [CONTEXTS=4] [PREFIX=3072] [INSTRUCTIONS=4]
# BIN=path/to/wildlong measures another build (an older version, say) on the same settings.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
BUCKET=${2:-4096}
CONTEXTS=${3:-4}
PREFIX=${4:-3072}
INSTRUCTIONS=${5:-4}
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/wildlong
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
# Four blueprints for each document type of the corpus.
python3 - "$WORK/blueprints.jsonl" <<'PY'
import json, sys
asks = {
    "novel": ["Summarize what happens in this passage and who takes part.",
              "Describe the main character's state of mind in this passage, with examples.",
              "List the places where this passage is set and what happens at each.",
              "Write three questions a reader might ask after this passage, and answer them."],
    "legal contract": ["List the obligations this licence places on someone who distributes the work.",
                       "Explain what this licence says about warranties and liability.",
                       "Summarize when this licence ends and what happens then.",
                       "Explain in plain words what this licence lets a user do with the work."],
    "technical manual": ["Explain the main concepts this documentation covers, with an example of each.",
                         "Write a short how-to guide based on this documentation.",
                         "List the options or settings this documentation describes and what each does.",
                         "Explain which problems this documentation warns about and how to avoid them."],
    "source code": ["Explain what the main functions in this code do.",
                    "Point out possible bugs or edge cases in this code.",
                    "Describe the data structures this code uses and why.",
                    "Write documentation comments for the public functions in this code."],
}
with open(sys.argv[1], "w") as f:
    for t, xs in asks.items():
        for i, x in enumerate(xs):
            f.write(json.dumps({"id": f"bench-{t}-{i}", "document_type": t,
                "path": [{"field": "task", "value": x}], "instruction": x,
                "provenance": {"model": "hand", "prompt_version": "bench", "seed": 0,
                    "conversation_ids": [], "weighting": "count"}}) + "\n")
PY
echo "$(nproc) cores, $THREADS threads; bucket $BUCKET, $CONTEXTS contexts, $INSTRUCTIONS instructions each"
start=$(date +%s.%N)
"$BIN" --threads "$THREADS" synth --model default --run "$WORK/run" --blueprints "$WORK/blueprints.jsonl" \
  --set "assemble.buckets=[$BUCKET]" --set "assemble.per_bucket=$CONTEXTS" \
  --set "generate.instructions_per_context=$INSTRUCTIONS" | tee "$WORK/synth.out"
echo "wall (model load and assembly included): $(echo "$(date +%s.%N) - $start" | bc) s"
python3 - "$WORK/run/stage2/synth_stats.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print("synth stats:", json.dumps({k: s.get(k) for k in ("contexts", "pairs", "generated", "prefix_cache", "document_cache")}))
PY
[ "$PREFIX" -gt 0 ] || exit 0  # PREFIX=0: the synthesis alone
"$BIN" --threads "$THREADS" bench --model default --prompt-tokens 128 --new-tokens 8 --batch 1 \
  --prefix-tokens "$PREFIX" --continuations 8 --runs 3 --json "$WORK/bench.json" > /dev/null
python3 - "$WORK/bench.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["shared_prefix"]
print(f"shared prefix: {s['continuations']} instructions x {s['new_tokens']} new tokens over a "
      f"{s['document_tokens']}-token document: {s['shared_s']:.1f} s shared vs "
      f"{s['independent_s']:.1f} s independent = {s['speedup']:.2f}x")
PY
