#!/usr/bin/env bash
# End-to-end runs of the release binary on a Synthea-shaped export grown to SIZE_MB: NDJSON
# output, Delta output (first load), and Delta again into the existing tables (a re-run of an
# unchanged export). Prints wall time, MB/s and peak RSS per run, and the Delta ratios.
#
#   benches/formats.sh [SIZE_MB] [extra etl options...]
#
# Inputs are cached under $BENCH_DIR (default ~/.cache/cumulus-etl-bench); outputs are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-1000}
shift || true
bench_dir=${BENCH_DIR:-$HOME/.cache/cumulus-etl-bench}
input="$bench_dir/synthea-${size_mb}mb"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ ! -d "$input" ]; then
    mkdir -p "$bench_dir"
    python3 ../shared/tools/replicate_bulk.py --target-mb "$size_mb" tests/data/synthea-10 "$input.tmp"
    mv "$input.tmp" "$input"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/cumulus-etl-target}
cargo build --release --locked --quiet
bin="$CARGO_TARGET_DIR/release/cumulus-etl"
input_mb=$(du -sm --apparent-size "$input" | cut -f1)

# run LABEL OUTPUT FORMAT: one timed run; prints a row and sets $seconds.
run() {
    local label=$1 out=$2 format=$3
    /usr/bin/time -f '%e %M' -o "$work/time" "$bin" etl --output-format="$format" \
        --progress-interval 60 "${extra[@]}" "$input" "$out" "$work/phi" >"$work/$label.log" 2>&1 \
        || { echo "run '$label' failed:"; tail -20 "$work/$label.log"; exit 1; }
    read -r seconds kib <"$work/time"
    printf '%-16s %8s MB %9.1f s %9.1f MB/s %8d MiB peak RSS\n' "$label" "$input_mb" "$seconds" \
        "$(echo "$input_mb / $seconds" | bc -l)" "$((kib / 1024))"
}
extra=("$@")

run ndjson "$work/ndjson" ndjson; ndjson_s=$seconds
run delta-first "$work/delta" deltalake; first_s=$seconds
run delta-rerun "$work/delta" deltalake; rerun_s=$seconds
printf 'delta first load / ndjson: %.2fx (target <= 1.5x)\n' "$(echo "$first_s / $ndjson_s" | bc -l)"
printf 'delta re-run / first load: %.2fx (target <= 2x)\n' "$(echo "$rerun_s / $first_s" | bc -l)"
