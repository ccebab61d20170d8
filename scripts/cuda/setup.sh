#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain on a machine without a GPU, from NVIDIA's wheels on the
# Python package registry, so that `cargo build --features cuda` works here and the binary runs
# on an H100/H200 with driver 580 (CUDA 13.0). Idempotent; about 1.2 GB; ~1 minute.
#
#   bash scripts/cuda/setup.sh          # then:  source scripts/cuda/env.sh
#
# Why 13.0 exactly: PTX written by a newer nvcc (13.1+) is refused by the 580 driver.
# libcuda.so (the driver API) ships with no wheel; candle links it dynamically, so a link-time
# stub is built from the symbols cudarc declares. The stub must never be shipped or put on
# LD_LIBRARY_PATH on the GPU machine: there the real libcuda.so.1 comes from the driver.
set -euo pipefail
CUDA_PIP="${CUDA_PIP:-${XDG_CACHE_HOME:-$HOME/.cache}/cuda-13.0-wheels}"
CUDA_HOME="${CUDA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/cuda-13.0}"

if [ ! -x "$CUDA_PIP/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install -q --no-deps --target "$CUDA_PIP" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85" "nvidia-cublas==13.1.0.3" \
    "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88"
fi
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  rm -rf "$CUDA_HOME"
  cp -al "$CUDA_PIP/nvidia/cu13" "$CUDA_HOME"
fi
ln -sfn lib "$CUDA_HOME/lib64"
for l in cudart cublas cublasLt nvrtc; do ln -sf "lib$l.so.13" "$CUDA_HOME/lib/lib$l.so"; done
ln -sf libcurand.so.10 "$CUDA_HOME/lib/libcurand.so"

# Link-time stub of libcuda.so.1: every cu* function that some cudarc version in the cargo
# registry declares (run `cargo fetch --features cuda` in the project first).
src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys 2>/dev/null | tail -1 || true)
if [ -z "$src" ]; then
  echo "cudarc sources not found: run 'cargo fetch' in a project that enables the cuda feature, then rerun" >&2
  exit 2
fi
mkdir -p "$CUDA_HOME/lib/stubs"
stub=$(mktemp --suffix=.c)
grep -ohE '^ *pub unsafe fn cu[A-Za-z0-9_]+' "$src"/*.rs | awk '{print $NF}' | sort -u \
  | sed 's/.*/int &(void){return 999;}/' > "$stub"
gcc -shared -fPIC -O0 -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" "$stub"
rm -f "$stub"
"$CUDA_HOME/bin/nvcc" --version | tail -2
echo "ok: now 'source $(dirname "$(readlink -f "$0")")/env.sh' and build with --features cuda"
