# What the benchmark scripts share; sourced from the project root. Sets $input (the grown
# export, made once and cached) and $bin (the binary to time).
#
#   bench_input SIZE_MB   # uses INPUT_KIND (synthea, realistic, one-table), BENCH_DIR and $work
#   bench_binary          # BIN, else this checkout's release build

bench_input() {
    local size_mb=$1 bench_dir=${BENCH_DIR:-$HOME/.cache/cumulus-etl-bench}
    local kind=${INPUT_KIND:-synthea}
    case $kind in
        synthea | realistic | one-table) input="$bench_dir/$kind-${size_mb}mb" ;;
        *) echo "INPUT_KIND must be synthea, realistic or one-table" >&2; exit 2 ;;
    esac
    [ -d "$input" ] && return
    mkdir -p "$bench_dir"
    local seed=tests/data/synthea-10
    if [ "$kind" != synthea ]; then
        python3 benches/add_observations.py tests/data/synthea-10 "$work/seed"
        seed="$work/seed"
        if [ "$kind" = one-table ]; then
            find "$seed" -name '*.ndjson' ! -name 'Observation.*' ! -name log.ndjson -delete
        fi
    fi
    python3 ../shared/tools/replicate_bulk.py --target-mb "$size_mb" "$seed" "$input.tmp"
    mv "$input.tmp" "$input"
}

bench_binary() {
    if [ -n "${BIN:-}" ]; then
        bin=$BIN
    else
        export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/cumulus-etl-target}
        cargo build --release --locked --quiet
        bin="$CARGO_TARGET_DIR/release/cumulus-etl"
    fi
}
