#!/usr/bin/env bash
# Measures wildlong and its peers on the same GGUF, same machine, same run, and prints ratios.
#   bash benches/peers.sh [threads=2] [peer venv=peers] [HF venv=same] [weights=exact]
# The venv holds the peers (torch, transformers, peft, gguf, llama-cpp-python: see benches/README.md):
#   python3 -m venv peers && CMAKE_ARGS="-DGGML_NATIVE=ON" peers/bin/pip install llama-cpp-python==0.3.36 torch transformers gguf accelerate
# Run it on a quiet machine: candle's and llama.cpp's thread pools both spin.
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
venv="${2:-peers}"
hf_venv="${3:-$venv}"
weights="${4:-exact}"
source benches/common.sh
./target/release/wildlong bench --threads "$threads" --runs 3 --weights "$weights" --json "$out/wildlong.json" >/dev/null
# llama.cpp three times; the run with the median decode speed is kept.
for i in 1 2 3; do "$venv/bin/python" "$peers_dir/llamacpp_bench.py" "$model" "$threads" 512 128 | tail -1; done > "$out/llamacpp.runs"
python3 -c "import json,sys; r=sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda d: d['decode_tok_s']); print(json.dumps(r[1]))" "$out/llamacpp.runs" > "$out/llamacpp.json"
# llama.cpp's own parallel decoding of 16 sequences (the batched peer), median of three.
for i in 1 2 3; do "$venv/bin/python" "$peers_dir/llamacpp_batched_bench.py" "$model" "$threads" 16 128 128 | tail -1; done > "$out/llamacpp_batched.runs"
python3 -c "import json,sys; r=sorted((json.loads(l) for l in open(sys.argv[1])), key=lambda d: d['batch_decode_tok_s']); print(json.dumps(r[1]))" "$out/llamacpp_batched.runs" > "$out/llamacpp_batched.json"
if "$hf_venv/bin/python" -c "import transformers, torch" 2>/dev/null; then
  "$hf_venv/bin/python" "$peers_dir/hf_cpu_baseline.py" "$model" "$threads" 1024 2>/dev/null | grep '"generate"' > "$out/hf.json" || true
fi
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
w = json.load(open(f"{out}/wildlong.json")); l = json.load(open(f"{out}/llamacpp.json"))
lb = json.load(open(f"{out}/llamacpp_batched.json"))
h = json.load(open(f"{out}/hf.json")) if os.path.exists(f"{out}/hf.json") and os.path.getsize(f"{out}/hf.json") else None
best_prefill = max(l["prefill_tok_s"], h["prefill_tok_s"] if h else 0)
print(json.dumps({"wildlong": w, "llama.cpp": l, "llama.cpp parallel": lb, "hf": h}, indent=1))
print(f"prefill  wildlong {w['prefill_tok_s']:.0f} tok/s vs best peer {best_prefill:.0f}: {w['prefill_tok_s'] / best_prefill:.2f}x")
print(f"decode   wildlong {w['decode_tok_s']:.1f} tok/s vs llama.cpp {l['decode_tok_s']:.1f}: {w['decode_tok_s'] / l['decode_tok_s']:.2f}x")
print(f"batch-{w['batch']} aggregate decode {w['batch_decode_tok_s']:.0f} tok/s vs llama.cpp single stream: {w['batch_decode_tok_s'] / l['decode_tok_s']:.2f}x")
print(f"batch-{w['batch']} aggregate decode vs llama.cpp's {lb['streams']} parallel sequences ({lb['batch_decode_tok_s']:.0f} tok/s): {w['batch_decode_tok_s'] / lb['batch_decode_tok_s']:.2f}x")
if w.get("shared_prefix"):
    s = w["shared_prefix"]
    print(f"shared prefix: {s['continuations']} continuations of a {s['document_tokens']}-token document {s['speedup']:.2f}x faster than independent requests")
PY
