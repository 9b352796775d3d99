#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/, its own workspace) in turn for SECONDS each and
# prints, per target, the executions, coverage and features from libFuzzer's final
# "#N DONE cov: X ft: Y ... exec/s: Z" line, and whether it crashed.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, every target
#   scripts/fuzz.sh --minimize [SECONDS] [TARGET...]     then fold the new inputs into the
#                                                        checked-in corpus with cargo fuzz cmin
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); stable Rust works with `-s none`
# (no sanitizer: the targets check their invariants with assertions, and allocation is
# bounded by -malloc_limit_mb). Builds into fuzz/target. Each run starts from the seeds
# (written by tests/fuzz_corpus.rs), the checked-in corpus fuzz/corpus/TARGET and the
# inputs that once crashed (fuzz/regressions/TARGET, never minimized away), and
# writes new inputs to fuzz/corpus-raw/TARGET (not checked in); crashes land in
# fuzz/artifacts/TARGET/ and logs in fuzz/logs/TARGET.log. Record the figures in
# docs/testing.md ("Fuzzing").
set -euo pipefail
cd "$(dirname "$0")/.."

minimize=0
if [ "${1:-}" = "--minimize" ]; then
    minimize=1
    shift
fi
seconds=${1:-60}
case "$seconds" in
    ''|*[!0-9]*) echo "usage: $0 [--minimize] [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;;
esac
shift || true

# Only the fuzz build goes to fuzz/target (the seeds come from the main crate's tests).
fuzz=(env CARGO_TARGET_DIR="$PWD/fuzz/target" cargo +stable fuzz)
if ! cargo +stable fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is missing: cargo install cargo-fuzz --locked" >&2
    exit 1
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <("${fuzz[@]}" list --fuzz-dir fuzz)
fi

echo "== building ${#targets[@]} fuzz targets (cargo fuzz build -s none)"
"${fuzz[@]}" build -s none --fuzz-dir fuzz >/dev/null

echo "== seeds"
seeds="$PWD/fuzz/corpus-raw/.seeds"
rm -rf "$seeds"
CRYPTVOL_WRITE_FUZZ_SEEDS="$seeds" cargo test --quiet --test fuzz_corpus every_seed >/dev/null

mkdir -p fuzz/logs
printf '%-20s %14s %8s %8s %10s  %s\n' target executions cov ft exec/s result
total=0
failed=0
for t in "${targets[@]}"; do
    raw="fuzz/corpus-raw/$t"
    mkdir -p "$raw" "fuzz/corpus/$t"
    cp -n "$seeds/$t"/* "$raw/" 2>/dev/null || true
    log="fuzz/logs/$t.log"
    result=ok
    dirs=("$raw" "fuzz/corpus/$t")
    if [ -d "fuzz/regressions/$t" ]; then
        dirs+=("fuzz/regressions/$t")
    fi
    if ! "${fuzz[@]}" run -s none --fuzz-dir fuzz "$t" "${dirs[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=512 -malloc_limit_mb=256 \
        -print_final_stats=1 >"$log" 2>&1; then
        result="CRASH (see $log, fuzz/artifacts/$t/)"
        failed=$((failed + 1))
    fi
    # "#123456	DONE   cov: 812 ft: 2345 corp: 120/3456b lim: 4096 exec/s: 20576 rss: 87Mb"
    line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    if [ -z "$line" ]; then
        line=$(grep -E '^#[0-9]+[[:space:]]' "$log" | tail -1 || true)
    fi
    execs=$(sed -nE 's/^#([0-9]+).*/\1/p' <<<"$line")
    cov=$(sed -nE 's/.* cov: ([0-9]+).*/\1/p' <<<"$line")
    ft=$(sed -nE 's/.* ft: ([0-9]+).*/\1/p' <<<"$line")
    rate=$(sed -nE 's/.* exec\/s: ([0-9]+).*/\1/p' <<<"$line")
    total=$((total + ${execs:-0}))
    printf '%-20s %14s %8s %8s %10s  %s\n' "$t" "${execs:--}" "${cov:--}" "${ft:--}" "${rate:--}" "$result"
    if [ "$minimize" = 1 ]; then
        cp -n "$raw"/* "fuzz/corpus/$t/" 2>/dev/null || true
        # Every covered edge kept; inputs that only add hit-count or comparison features
        # dropped (keeps the checked-in corpus to a few hundred small files per target).
        "${fuzz[@]}" cmin -s none --fuzz-dir fuzz "$t" "fuzz/corpus/$t" -- \
            -set_cover_merge=1 -use_counters=0 -use_cmp=0 >>"$log" 2>&1
    fi
done
printf '%-20s %14s\n' total "$total"
if [ "$failed" -gt 0 ]; then
    echo "fuzz.sh: $failed target(s) crashed" >&2
    exit 1
fi
