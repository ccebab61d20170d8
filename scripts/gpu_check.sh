#!/usr/bin/env bash
# Every GPU check in one go, on the GPU machine (no Rust there): unpacks target/gpu/ (made by
# scripts/gpu_build.sh), runs the CUDA kernel tests, then the benchmark (benches/gpu.sh).
# Results go to $OUT (default gpu-out/): tests.txt, and the benchmark's files.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT" target/gpu-run
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for f in wildlong integration; do
  xz -dc "target/gpu/$f.xz" > "target/gpu-run/$f" && chmod +x "target/gpu-run/$f"
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
# Kernel tests: the cuda module of the integration tests, one at a time.
timeout 180 target/gpu-run/integration --test-threads 1 cuda:: 2>&1 | tee "$OUT/tests.txt"
echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"
WILDLONG_BIN=target/gpu-run/wildlong OUT="$OUT" bash benches/gpu.sh
