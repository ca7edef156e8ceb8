#!/usr/bin/env bash
# specswarm vs llama.cpp RPC, same model, same number of stages, same WAN emulation (network
# namespaces joined by specswarm's user-space TUN router, L ms one way per link), same sitting.
# Needs root. llama.cpp is NOT part of this repository: pass the folder of binaries you built
# yourself (llama-bench and ggml-rpc-server, built with GGML_RPC=ON).
#
#   sudo bash scripts/bench_vs_llamacpp_rpc.sh LLAMA_BIN_DIR [stages] [delay_ms] [suite] [drafter]
#   sudo bash scripts/bench_vs_llamacpp_rpc.sh /tmp/llama-build/bin 4 25 copy suffix
#
# llama.cpp: `llama-bench -n 32 -p 0 --rpc host1,...,hostN -ngl 99` in the client namespace,
# one `ggml-rpc-server` per stage namespace (layers split across the RPC devices), best of
# 1 and 2 threads per server. specswarm: `specswarm bench swarm --emulator netns` (every mode).
set -euo pipefail
LLAMA=${1:?usage: $0 LLAMA_BIN_DIR [stages] [delay_ms] [suite] [drafter]}
N=${2:-4}
L=${3:-25}
SUITE=${4:-copy}
DRAFT=${5:-suffix}
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/specswarm
MODEL=$($BIN model pull smollm2-135m 2>/dev/null)
cleanup() { pkill -f ggml-rpc-server 2>/dev/null || true; pkill -f "specswarm wan router" 2>/dev/null || true; }
trap cleanup EXIT

best=0
for threads in 1 2; do
  coproc ROUTER { exec "$BIN" wan router --hosts $((N + 1)) --delay-ms "$L" --exit-on-stdin-eof; }
  read -r _ <&"${ROUTER[0]}"
  servers=""
  for i in $(seq 1 "$N"); do
    ip netns exec "ssw$i" "$LLAMA/ggml-rpc-server" -H "10.77.0.$i" -p 50052 -t "$threads" >/dev/null 2>&1 &
    servers="$servers${servers:+,}10.77.0.$i:50052"
  done
  sleep 2
  out=$(ip netns exec "ssw$((N + 1))" "$LLAMA/llama-bench" -m "$MODEL" --rpc "$servers" -ngl 99 -p 0 -n 32 -r 2 -o json 2>/dev/null || true)
  tps=$(python3 -c 'import json,sys
try:
    rows = json.loads(sys.argv[1]); print(max(r["avg_ts"] for r in rows if r.get("n_gen", 0) > 0))
except Exception:
    print(0)' "$out")
  echo "llama.cpp RPC: $N servers x $threads threads, $L ms one way: $tps tok/s"
  best=$(python3 -c "print(max($best, $tps))")
  pkill -f ggml-rpc-server || true
  exec {ROUTER[1]}>&-
  wait "$ROUTER_PID" 2>/dev/null || true
done

json=$("$BIN" bench swarm --emulator netns --stages "$N" --latency-ms "$L" --prompts "$SUITE" --draft "$DRAFT" --max-tokens 32 --streams 1 --json)
python3 - "$json" "$best" "$N" "$L" <<'PY'
import json, sys
r, llama, n, l = json.loads(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
print(f"{n} stages, {l} ms one way, SmolLM2-135M, suite {r['prompts']}, drafter {r.get('draft', '?')}")
print(f"{'':<22} {'tok/s':>8} {'vs llama.cpp RPC':>18}")
print(f"{'llama.cpp RPC (best)':<22} {llama:>8.1f} {1.0:>17.2f}x")
for name, m in r["modes"].items():
    print(f"{'specswarm ' + name:<22} {m['tokens_per_s']:>8.1f} {m['tokens_per_s'] / max(llama, 1e-9):>17.2f}x")
PY
