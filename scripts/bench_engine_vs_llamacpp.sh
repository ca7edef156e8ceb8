#!/usr/bin/env bash
# Engine speed next to llama.cpp's llama-bench, same GGUF, same thread count, same sitting.
#
#   bash scripts/bench_engine_vs_llamacpp.sh /path/to/llama-bench [threads] [runs]
#
# llama-bench is built by you, outside this repository (for example from the llama.cpp copy
# vendored in llama-cpp-python's source distribution). Prints both sides and the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
LLAMA_BENCH=${1:?path to llama-bench}
THREADS=${2:-2}
RUNS=${3:-5}
cargo build --release --quiet
BIN=./target/release/specswarm
printf "%-14s %8s %10s %10s %8s\n" model test specswarm llama.cpp ratio
for name in smollm2-135m gemma3-270m; do
  path=$($BIN model pull "$name" 2>/dev/null)
  ours=$($BIN bench engine --model "$path" --threads "$THREADS" --runs "$RUNS" --json)
  theirs=$("$LLAMA_BENCH" -m "$path" -t "$THREADS" -p 128,512 -n 128 -r "$RUNS" -o json 2>/dev/null)
  python3 - "$name" "$ours" "$theirs" <<'PY'
import json, sys
name, ours, theirs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ref = {}
for row in theirs:
    key = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
    ref[key] = row["avg_ts"]
mine = {"pp128": ours["prefill_128_tokens_per_s"], "pp512": ours["prefill_512_tokens_per_s"], "tg128": ours["decode_tokens_per_s"]}
for k in ("pp128", "pp512", "tg128"):
    print(f"{name:<14} {k:>8} {mine[k]:10.1f} {ref[k]:10.1f} {mine[k] / ref[k]:7.2f}x")
PY
done
