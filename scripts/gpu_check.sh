#!/usr/bin/env bash
# Every GPU check, on the GPU machine (no Rust there): unpacks target/gpu/ (made here by
# scripts/gpu_build.sh), runs the CUDA kernel tests (< 2 min), then the benchmark
# benches/gpu.sh (< 8 min). `tests` or `bench` as the argument runs one part (a device
# command may run at most 10 minutes: run the two parts as two commands there).
# Results go to $OUT (default gpu-out/): gpu.txt, tests.txt and the benchmark's files.
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-all}"
OUT="${OUT:-gpu-out}"
mkdir -p "$OUT" target/gpu-run
export LD_LIBRARY_PATH="/usr/local/cuda-13.0/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
for f in wildlong integration; do
  [ -x "target/gpu-run/$f" ] || { xz -dc "target/gpu/$f.xz" > "target/gpu-run/$f" && chmod +x "target/gpu-run/$f"; }
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
if [ "$part" = all ] || [ "$part" = tests ]; then
  # The cuda module of the integration tests, one test at a time.
  timeout 150 target/gpu-run/integration --test-threads 1 cuda:: 2>&1 | tee "$OUT/tests.txt"
  echo "tests exit: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.txt"
fi
if [ "$part" = all ] || [ "$part" = bench ]; then
  WILDLONG_BIN=target/gpu-run/wildlong OUT="$OUT" bash benches/gpu.sh
fi
