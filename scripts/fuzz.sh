#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers that read what peers send (fuzz/fuzz_targets/), a
# bounded run fit for CI: builds every target, fuzzes each for SECONDS_PER_TARGET (default 30)
# starting from its committed seeds (fuzz/corpus/<target>/), and fails if any target crashes,
# naming the input that did and the command that replays it.
#
#   bash scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Needs cargo-fuzz (installed here if missing) and a nightly toolchain; without one, stable with
# RUSTC_BOOTSTRAP=1 (for the -Z flags cargo-fuzz passes). The corpus a run grows stays in
# fuzz/target/corpus-run/<target> (not committed), so later local runs resume from it.
# FUZZ_SANITIZER=address turns AddressSanitizer on (default none: the workspace forbids unsafe
# code, and without it a run does 2 to 4 times the executions; overflow checks stay on).
set -euo pipefail
cd "$(dirname "$0")/.."

secs="${1:-30}"
case "$secs" in '' | *[!0-9]*) echo "usage: $0 [SECONDS_PER_TARGET]" >&2; exit 64 ;; esac
sanitizer="${FUZZ_SANITIZER:-none}"
targets=(ws_decoder batch_reader agent_api_json reliable relay_http)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi

toolchain=()
if command -v rustup >/dev/null && rustup toolchain list | grep -q '^nightly'; then
    toolchain=(+nightly)
    shown="nightly"
    cargo_fuzz="cargo +nightly fuzz"
else
    export RUSTC_BOOTSTRAP=1
    shown="stable with RUSTC_BOOTSTRAP=1"
    cargo_fuzz="RUSTC_BOOTSTRAP=1 cargo fuzz"
fi
echo "fuzz: $(cargo "${toolchain[@]}" fuzz --version), $(rustc "${toolchain[@]}" --version) ($shown), sanitizer $sanitizer, ${secs}s per target"

logs=fuzz/target/fuzz-logs
mkdir -p "$logs"
if ! cargo "${toolchain[@]}" fuzz build -s "$sanitizer" >"$logs/build.log" 2>&1; then
    tail -n 40 "$logs/build.log"
    echo "fuzz: FAILED to build the fuzz targets (full log: $logs/build.log)"
    exit 1
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    corpus="fuzz/target/corpus-run/$t"
    mkdir -p "$corpus"
    cp fuzz/corpus/"$t"/* "$corpus"/
    log="$logs/$t.log"
    status=0
    cargo "${toolchain[@]}" fuzz run -s "$sanitizer" "$t" "$corpus" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1 || status=$?
    runs="$(sed -n 's/^Done \([0-9]*\) runs in.*/\1/p' "$log" | tail -n 1)"
    if [ "$status" -eq 0 ] && [ -n "$runs" ]; then
        summary+=("$(printf '%-15s %10s executions in %ss, corpus %s inputs, no crash' \
            "$t" "$runs" "$secs" "$(find "$corpus" -type f | wc -l)")")
        continue
    fi
    failed+=("$t")
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)"
    summary+=("$(printf '%-15s FAILED (exit %s)' "$t" "$status")")
    echo "---- $t failed (full log: $log):"
    # The panic message (up to its backtrace), or else the end of the log.
    awk '/panicked at/ {p = 1} /^stack backtrace:|^note: run with/ {p = 0} p' "$log" >"$log.why"
    if [ -s "$log.why" ]; then cat "$log.why"; else grep -v '^#[0-9]' "$log" | tail -n 30; fi
    if [ -n "$artifact" ]; then
        echo "---- crashing input: $artifact"
        echo "     replay: $cargo_fuzz run -s $sanitizer $t $artifact"
        echo "     shrink: $cargo_fuzz tmin -s $sanitizer $t $artifact"
    fi
done

echo "== fuzz summary"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, no crash"
