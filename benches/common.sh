# Sourced by the benchmark scripts: the default model, the peers' scripts, the output folder,
# and a release build with the model fetched.
model="models/SmolLM2-135M-Instruct.Q4_1.gguf"
peers_dir="${WILDLONG_PEERS_DIR:-benches/peers}"
out="${WILDLONG_BENCH_OUT:-runs/bench}"
mkdir -p "$out"
cargo build --release --quiet
./target/release/wildlong models fetch >/dev/null
