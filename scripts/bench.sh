#!/usr/bin/env bash
# Measures backhaul next to direct TCP on this machine and records the results:
# docs/bench-latest.json (all figures) and docs/benchmarks.svg (the chart drawn from it).
# Extra arguments go to backhaul-bench (see `target/release/backhaul-bench --help`), e.g.
#   scripts/bench.sh --gib 0.25 --idle 1000      (a quicker run)
# Benchmarks are not tests: nothing here passes or fails on a number.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
target/release/backhaul-bench --json docs/bench-latest.json "$@"
target/release/backhaul-bench --chart docs/bench-latest.json docs/benchmarks.svg
echo "chart written to docs/benchmarks.svg"
