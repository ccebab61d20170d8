#!/usr/bin/env bash
# LoRA training on the default model, wildlong beside PyTorch + PEFT, same machine, same run:
# r = 16 on all seven projections, one row of SEQ tokens, every token counted, AdamW, f32.
#   bash benches/train.sh [threads=2] [seq=1024] [HF venv=peers] [rounds=3]
# The venv holds torch, transformers, peft and gguf (see benches/README.md). Rounds
# alternate the engines; each prints JSON lines; medians and ratios come last. Quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
seq="${2:-1024}"
venv="${3:-peers}"
rounds="${4:-3}"
source benches/common.sh
: > "$out/train.jsonl"
for i in $(seq "$rounds"); do
  ./target/release/wildlong --threads "$threads" bench --model default --train-seq "$seq" | tee -a "$out/train.jsonl"
  ./target/release/wildlong --threads "$threads" bench --model default --train-seq "$seq" --checkpoint-layers | tee -a "$out/train.jsonl"
  "$venv/bin/python" "$peers_dir/hf_cpu_baseline.py" "$model" "$threads" "$seq" 2>/dev/null | grep '"lora_train"' | tee -a "$out/train.jsonl"
done
python3 - "$out/train.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(engine, ck, key):
    v = [r[key] for r in rows if r["engine"] == engine and r.get("checkpoint_layers", False) == ck]
    return statistics.median(v)
hf_tok, hf_mem = med("hf-transformers", False, "tok_s"), med("hf-transformers", False, "peak_rss_mib")
for ck in (False, True):
    tok, mem = med("wildlong", ck, "tok_s"), med("wildlong", ck, "peak_rss_mib")
    plan = med("wildlong", ck, "plan_peak_mib")
    print(json.dumps({"wildlong_checkpoint_layers": ck, "tok_s": tok, "peak_rss_mib": mem,
        "plan_peak_mib": plan, "hf_peft_tok_s": hf_tok, "hf_peft_peak_rss_mib": hf_mem,
        "speed_ratio": round(tok / hf_tok, 3), "memory_ratio": round(mem / hf_mem, 3)}))
PY
