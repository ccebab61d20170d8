#!/usr/bin/env bash
# The GPU benchmark (issue "GPU path"), on an H100/H200 in one run, < 8 minutes:
# wildlong on a Llama-3.1-8B-shaped model with random bf16 weights made on the GPU (prefill
# 8K and 32K tokens; generate at batch 1 and 16 with 512-token prompts and 128 new tokens;
# LoRA r16 on all projections at 8K and 32K tokens with peak memory), then HF transformers +
# PEFT on the same shape (benches/peers/hf_gpu_baseline.py), then both side by side.
# Every line of every output is JSON.
#
#   WILDLONG_BIN=target/release/wildlong bash benches/gpu.sh    # binary built --features cuda
#
# Outputs in $OUT (default gpu-out/): wildlong.jsonl, hf.jsonl, side_by_side.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
BIN="${WILDLONG_BIN:-target/release/wildlong}"
# The peer script, the project's own.
HF="${HF_BASELINE:-benches/peers/hf_gpu_baseline.py}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
start=$(date +%s)
# wildlong: about 3 minutes on an H200 (16 GB of random weights, then the measurements).
timeout 190 "$BIN" bench --synthetic llama-3.1-8b --device cuda \
  --prompt-tokens 512 --new-tokens 128 --batch 16 --runs 2 \
  --prefill-lengths 8192,32768 --train-lengths 8192,32768 --json "$OUT/wildlong.jsonl" \
  2> "$OUT/wildlong.err"
echo "{\"script\":\"gpu.sh\",\"wildlong_exit\":$?,\"s\":$(( $(date +%s) - start ))}"
# HF transformers + PEFT: the peer, same machine, same run.
if [ -f "$HF" ]; then
  timeout 270 python3 "$HF" > "$OUT/hf.jsonl" 2> "$OUT/hf.err"
  echo "{\"script\":\"gpu.sh\",\"hf_exit\":$?,\"s\":$(( $(date +%s) - start ))}"
else
  echo "{\"script\":\"gpu.sh\",\"error\":\"no HF baseline at $HF (set HF_BASELINE)\"}"
fi
python3 - "$OUT" <<'PY' | tee "$OUT/side_by_side.jsonl"
import json, sys, os
out = sys.argv[1]
def load(name):
    p = os.path.join(out, name)
    rows = []
    if os.path.exists(p):
        for line in open(p):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows
ours, hf = load("wildlong.jsonl"), load("hf.jsonl")
def key(r):
    s = r.get("step")
    if s == "prefill" or s == "lora_train":
        return (s, r.get("tokens"))
    if s in ("generate", "generate_static_compiled"):
        return (s, r.get("batch"))
    return (s,)
hf_by = {key(r): r for r in hf}
for r in ours:
    k = key(r)
    line = {"measure": k[0], "size": k[1] if len(k) > 1 else None, "wildlong": r}
    peers = [hf_by.get(k)] + ([hf_by.get(("generate_static_compiled", k[1]))] if k[0] == "generate" else [])
    for p in peers:
        if p is None or "tok_s" not in p or "tok_s" not in r:
            continue
        name = "hf_" + p["step"]
        line[name] = p
        line[name + "_ratio"] = round(r["tok_s"] / p["tok_s"], 2) if p["tok_s"] else None
        if k[0] == "lora_train" and r.get("peak_gib") and p.get("peak_gib"):
            line["memory_ratio"] = round(r["peak_gib"] / p["peak_gib"], 2)
    print(json.dumps(line))
PY
echo "{\"script\":\"gpu.sh\",\"done\":true,\"s\":$(( $(date +%s) - start ))}"
