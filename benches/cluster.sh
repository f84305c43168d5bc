#!/usr/bin/env bash
# Cluster mode on one machine: PROCESSES processes of WORKERS worker each (a hostfile of free
# local ports), against one process of PROCESSES x WORKERS workers, on the same grown input,
# runs alternated. Prints, per layout and format, the median wall time (the whole run: every
# process started at once, the last one's end), the highest peak RSS of one process and of all
# together, and the bytes of rows the processes sent each other per input MB.
#
#   benches/cluster.sh [SIZE_MB] [etl options]
#
# Env: PROCESSES (default 2), WORKERS (per process, default 1), FORMATS (default "ndjson
#      deltalake"), RUNS (default 3), INPUT_KIND, BENCH_DIR, BIN as for benches/etl.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-1000}
shift || true
extra=("$@")
processes=${PROCESSES:-2}
workers=${WORKERS:-1}
formats=${FORMATS:-"ndjson deltalake"}
runs=${RUNS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

source benches/lib.sh
bench_input "$size_mb"
bench_binary
input_mb=$(du -sm --apparent-size "$input" | cut -f1)

# A hostfile of $processes free ports on this machine.
python3 - "$processes" >"$work/hosts" <<'EOF'
import socket, sys
sockets = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in sockets:
    s.bind(("127.0.0.1", 0))
for s in sockets:
    print("127.0.0.1:%d" % s.getsockname()[1])
EOF

# one_process FORMAT OUT: one timed run of one process; sets $seconds, $kib, $total_kib, $sent.
one_process() {
    local format=$1 out=$2
    /usr/bin/time -f '%e %M' -o "$work/time" "$bin" etl --output-format="$format" \
        --workers $((processes * workers)) --progress-interval 60 "${extra[@]}" \
        "$input" "$out" "$work/phi" >"$work/one.log" 2>&1 \
        || { echo "one process failed:"; tail -20 "$work/one.log"; exit 1; }
    read -r seconds kib <"$work/time"
    total_kib=$kib
    sent=0
}

# cluster FORMAT OUT: one timed run of $processes processes; sets the same.
cluster() {
    local format=$1 out=$2 started pids=()
    started=$(date +%s.%N)
    for ((p = 0; p < processes; p++)); do
        /usr/bin/time -f '%e %M' -o "$work/time.$p" "$bin" etl --output-format="$format" \
            --workers "$workers" --hostfile "$work/hosts" --process "$p" \
            --progress-interval 60 "${extra[@]}" "$input" "$out" "$work/phi" \
            >"$work/process.$p.log" 2>&1 &
        pids+=($!)
    done
    for p in "${!pids[@]}"; do
        wait "${pids[$p]}" || { echo "process $p failed:"; tail -20 "$work/process.$p.log"; exit 1; }
    done
    seconds=$(echo "$(date +%s.%N) - $started" | bc -l)
    kib=0
    total_kib=0
    for ((p = 0; p < processes; p++)); do
        read -r _ k <"$work/time.$p"
        total_kib=$((total_kib + k))
        if ((k > kib)); then kib=$k; fi
    done
    sent=$(grep -o 'sent each other .* of rows' "$work/process.0.log" | sed 's/sent each other //; s/ of rows//')
}

printf '%-28s %8s %9s %12s %12s %16s\n' layout "input MB" "wall s" "RSS one" "RSS all" "rows sent"
for format in $formats; do
    declare -A walls=()
    for ((i = 1; i <= runs; i++)); do
        for layout in one cluster; do
            rm -rf "$work/out" "$work/phi"
            find "$input" -type f -exec cat {} + >/dev/null
            if [ "$layout" = one ]; then one_process "$format" "$work/out"; else cluster "$format" "$work/out"; fi
            walls[$layout]="${walls[$layout]:-} $seconds"
            eval "kib_$layout=$kib total_$layout=$total_kib sent_$layout='$sent'"
        done
    done
    for layout in one cluster; do
        median=$(printf '%s\n' ${walls[$layout]} | sort -n | sed -n "$(((runs + 1) / 2))p")
        case $layout in
            one) label="1 x $((processes * workers)) workers, $format" ;;
            cluster) label="$processes x $workers workers, $format" ;;
        esac
        k=kib_$layout t=total_$layout s=sent_$layout
        printf '%-28s %8d %9.1f %8d MiB %8d MiB %16s\n' "$label" "$input_mb" "$median" \
            "$((${!k} / 1024))" "$((${!t} / 1024))" "${!s:-0}"
        printf '%-28s wall times:%s\n' "" "${walls[$layout]}"
    done
done
