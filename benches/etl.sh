#!/usr/bin/env bash
# The end-to-end benchmark: grows the bundled Synthea sample to SIZE_MB (deterministically,
# ids and references consistent), runs the release binary RUNS times per output format, and
# prints input MB, resources, wall time, MB/s, resources/s, peak RSS and the memory budget.
# Where the reference Python Cumulus ETL is installed, it runs it on the same input (NDJSON
# output, the only one it can write here) and prints our throughput and RSS as ratios of its.
#
#   benches/etl.sh [SIZE_MB] [etl options, e.g. --memory 256MiB]
#
# Env: BENCH_DIR (inputs and reference timings, default ~/.cache/cumulus-etl-bench),
#      FORMATS (default "ndjson parquet deltalake deltalake-rerun"), RUNS (timed runs per
#      format, default 3: the table gives the median wall time (the lower middle one for an even
#      count) and the highest peak RSS, since single runs on a shared machine vary by a third),
#      INPUT_KIND ("synthea": the sample grown as it is, the default; "realistic": the sample
#      with Observations and DiagnosticReports added as Synthea writes them
#      (benches/add_observations.py), about 60% Observations, like a real export; "one-table":
#      only the realistic input's Observations, the one-table export),
#      COLD=1 (drop the page cache before each of our timed runs, so the input is read from
#      disk, as a large export is; needs root; the binary is read back in first, so only the
#      input is cold; the reference still runs warm),
#      REFERENCE (path of the reference `cumulus-etl`, default its venv from
#      ../shared/tools/reference-cumulus.sh; "none" skips it), REFERENCE_RERUN=1 (time it again
#      instead of reusing the cached timing for this input), BIN (a binary to run instead of
#      building this checkout's, e.g. to compare two versions run by run).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-1000}
shift || true
extra=("$@")
bench_dir=${BENCH_DIR:-$HOME/.cache/cumulus-etl-bench}
formats=${FORMATS:-"ndjson parquet deltalake deltalake-rerun"}
runs=${RUNS:-3}
reference=${REFERENCE:-$HOME/.cache/reference-cumulus/venv/bin/cumulus-etl}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

source benches/lib.sh
bench_input "$size_mb"
bench_binary
input_mb=$(du -sm --apparent-size "$input" | cut -f1)
resources=$(find "$input" -name '*.ndjson' ! -name log.ndjson -exec cat {} + | grep -c .)

printf '%-16s %8s %10s %9s %9s %12s %10s %10s\n' run "input MB" resources "wall s" "MB/s" \
    "resources/s" "peak RSS" budget
# row LABEL SECONDS KIB BUDGET: one line of the table.
row() {
    printf '%-16s %8d %10d %9.1f %9.1f %12.0f %6d MiB %10s\n' "$1" "$input_mb" "$resources" "$2" \
        "$(echo "$input_mb / $2" | bc -l)" "$(echo "$resources / $2" | bc -l)" "$(($3 / 1024))" "$4"
}

# Reads the input once, untimed, so every run (ours and the reference's) starts with it in the
# page cache: a build between runs can evict it, and a first run then also timed the disk.
warm_input() {
    find "$input" -type f -exec cat {} + >/dev/null
}

# Drops the page cache (COLD=1), then reads the binary back in, so a run reads its input from
# disk but does not time loading the binary.
cold_input() {
    sync
    echo 3 >/proc/sys/vm/drop_caches \
        || { echo "COLD=1 needs root, to write /proc/sys/vm/drop_caches" >&2; exit 2; }
    cat "$bin" >/dev/null
}

# timed_run LABEL FORMAT OUTPUT: one timed run of ours; sets $seconds, $kib, $cpu (user + system
# seconds: on a shared machine, a steadier measure of the work done than the wall time) and
# $budget.
timed_run() {
    local label=$1 format=$2 out=$3
    if [ "${COLD:-}" = 1 ]; then cold_input; else warm_input; fi
    /usr/bin/time -f '%e %M %U %S' -o "$work/time" "$bin" etl --output-format="$format" \
        --progress-interval 60 "${extra[@]}" "$input" "$out" "$work/phi" >"$work/$label.log" 2>&1 \
        || { echo "run '$label' failed:"; tail -20 "$work/$label.log"; exit 1; }
    read -r seconds kib user system <"$work/time"
    cpu=$(echo "$user + $system" | bc -l)
    budget=$(grep -o 'a [0-9.]* [KMG]iB memory budget' "$work/$label.log" | head -1 \
        | sed 's/^a //; s/ memory budget//')
}

# run LABEL FORMAT OUTPUT FRESH: $runs timed runs, into a new OUTPUT each time when FRESH is 1
# (a first load) or into the same one (a re-run); prints one row with the median wall time and
# the highest peak RSS, and sets $seconds and $kib to them.
run() {
    local label=$1 format=$2 out=$3 fresh=$4 walls=() cpus=() peak=0
    for ((i = 1; i <= runs; i++)); do
        if [ "$fresh" = 1 ]; then rm -rf "$out"; fi
        timed_run "$label" "$format" "$out"
        walls+=("$seconds")
        cpus+=("$cpu")
        if ((kib > peak)); then peak=$kib; fi
    done
    seconds=$(printf '%s\n' "${walls[@]}" | sort -n | sed -n "$(((runs + 1) / 2))p")
    kib=$peak
    row "$label" "$seconds" "$kib" "$budget"
    if ((runs > 1)); then printf '%-16s wall times: %s\n' "" "${walls[*]}"; fi
    printf '%-16s cpu s (user + system): %s\n' "" "${cpus[*]}"
}

declare -A secs rss
for f in $formats; do
    case $f in
        deltalake-rerun) run "$f" deltalake "$work/deltalake" 0 ;;
        *) run "$f" "$f" "$work/$f" 1 ;;
    esac
    secs[$f]=$seconds
    rss[$f]=$kib
done

if [ -n "${secs[deltalake]:-}" ] && [ -n "${secs[ndjson]:-}" ]; then
    printf 'delta first load / ndjson: %.2fx\n' "$(echo "${secs[deltalake]} / ${secs[ndjson]}" | bc -l)"
fi
if [ -n "${secs[deltalake-rerun]:-}" ] && [ -n "${secs[deltalake]:-}" ]; then
    printf 'delta re-run / first load: %.2fx\n' "$(echo "${secs[deltalake-rerun]} / ${secs[deltalake]}" | bc -l)"
fi

if [ "$reference" = none ]; then
    echo "reference: skipped (REFERENCE=none); no ratios"
    exit 0
elif [ ! -x "$reference" ]; then
    echo "reference: not installed (../shared/tools/reference-cumulus.sh installs it); no ratios"
    exit 0
fi
# The reference takes minutes per GB, so its timing is kept per input.
ref_file="$bench_dir/reference-$(basename "$input").time"
if [ ! -s "$ref_file" ] || [ -n "${REFERENCE_RERUN:-}" ]; then
    mkdir -p "$work/ref-phi"
    cp "$work/phi/codebook.json" "$work/ref-phi/" 2>/dev/null || true
    warm_input
    /usr/bin/time -f '%e %M' -o "$ref_file.tmp" "$reference" etl --output-format=ndjson \
        --skip-init-checks "$input" "$work/ref-out" "$work/ref-phi" >"$work/reference.log" 2>&1 \
        || { echo "the reference run failed:"; tail -20 "$work/reference.log"; exit 1; }
    mv "$ref_file.tmp" "$ref_file"
fi
read -r ref_s ref_kib <"$ref_file"
row reference "$ref_s" "$ref_kib" "-"
for f in "${!secs[@]}"; do
    printf '%-16s %6.1fx the reference throughput, %.2fx its peak RSS\n' "$f" \
        "$(echo "$ref_s / ${secs[$f]}" | bc -l)" "$(echo "${rss[$f]} / $ref_kib" | bc -l)"
done | sort
