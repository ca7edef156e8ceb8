#!/usr/bin/env bash
# Plain decoding through a ring with direct return across network namespaces joined by the
# user-space WAN emulator (needs root). Prints tokens/s, the measured traversal time T, and the
# ceiling 1/T computed from (N + 1)·L + Σc, with Σc measured at L = 0.
#
#   sudo bash scripts/bench_swarm_netns.sh [stages...]      (default: 1 3 6)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/specswarm
MODEL=$($BIN model pull smollm2-135m 2>/dev/null)
STAGES=${*:-1 3 6}
cleanup() { pkill -f "specswarm worker" 2>/dev/null || true; pkill -f "specswarm wan router" 2>/dev/null || true; }
trap cleanup EXIT
printf "%6s %6s %9s %9s %12s %8s\n" stages L_ms tok_s T_ms ceiling_tok_s percent
for n in $STAGES; do
  c_ms=""
  for l in 0 10 25; do
    hosts=$((n + 1))
    coproc ROUTER { exec $BIN wan router --hosts $hosts --delay-ms $l --exit-on-stdin-eof; }
    read -r _ <&"${ROUTER[0]}"
    addrs=""
    for i in $(seq 1 $n); do
      a=$((  (i - 1) * 30 / n )); b=$(( i * 30 / n ))
      ip netns exec ssw$i $BIN worker --model "$MODEL" --layers $a:$b --listen 10.77.0.$i:7000 > /dev/null 2>&1 &
      addrs="$addrs${addrs:+,}10.77.0.$i:7000"
    done
    sleep 2
    out=$(ip netns exec ssw$hosts $BIN bench ring --model "$MODEL" --workers "$addrs" --max-tokens 24)
    pkill -f "specswarm worker" || true
    exec {ROUTER[1]}>&-
    wait $ROUTER_PID 2>/dev/null || true
    python3 - "$n" "$l" "$out" "${c_ms:-}" <<'PY'
import json, sys
n, l, out, c = int(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
t = out["traversal_ms"]
c = float(c) if c else t
ceiling = 1000.0 / ((n + 1) * l + c)
print(f"{n:6d} {l:6.0f} {out['tokens_per_s']:9.1f} {t:9.1f} {ceiling:12.1f} {100 * out['tokens_per_s'] / ceiling:7.0f}%")
open("/tmp/specswarm_c_ms", "w").write(str(c))
PY
    c_ms=$(cat /tmp/specswarm_c_ms)
  done
done
