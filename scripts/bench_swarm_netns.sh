#!/usr/bin/env bash
# Every decoding mode through worker processes in network namespaces joined by the user-space
# WAN emulator (needs root): for each stage count and one-way delay, one `bench swarm` run
# (plain, chain, tree, pipelined, concurrent streams), printed as a table.
#
#   sudo bash scripts/bench_swarm_netns.sh [stages...]      (default: 1 3 6; delays 0 10 25 ms)
#   SUITE=copy DRAFT=suffix sudo -E bash scripts/bench_swarm_netns.sh 4
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN=$PWD/target/release/specswarm
STAGES=${*:-1 3 6}
for n in $STAGES; do
  for l in ${DELAYS:-0 10 25}; do
    $BIN bench swarm --emulator netns --stages "$n" --latency-ms "$l" \
      --prompts "${SUITE:-chat}" --draft "${DRAFT:-suffix}" --max-tokens "${MAX_TOKENS:-32}" --streams "${STREAMS:-1}"
  done
done
