#!/usr/bin/env bash
# The S3 benchmark: the same export read from local files and from an S3-compatible server on
# this machine (moto's, from the test virtualenv), with the server's own throughput for a plain
# concurrent download of the same objects, so the figures say what limits an S3 run.
#
#   benches/s3.sh [SIZE_MB] [etl options, e.g. --memory 256MiB]
#
# Env: BIN (the binary; default: this checkout's release build), INPUT_KIND (as for
#      benches/etl.sh), RUNS (timed runs per case,
#      default 1), FORMAT (output format, default ndjson: the output stays local so the input
#      side is what differs; "deltalake" writes the tables to S3 too), BENCH_DIR (inputs,
#      default ~/.cache/cumulus-etl-bench), VENV (a virtualenv with moto_server, default the
#      tests' ~/.cache/cumulus-etl-test-venv; `cargo test s3_` installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

size_mb=${1:-1000}
shift || true
extra=("$@")
runs=${RUNS:-1}
format=${FORMAT:-ndjson}
venv=${VENV:-$HOME/.cache/cumulus-etl-test-venv}
work=$(mktemp -d)
server_pid=
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

source benches/lib.sh
bench_input "$size_mb"
bench_binary
[ -x "$venv/bin/moto_server" ] || { echo "no moto_server in $venv (run: cargo test s3_)" >&2; exit 2; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
endpoint="http://127.0.0.1:$port"
"$venv/bin/moto_server" -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
server_pid=$!
until curl -s -o /dev/null "$endpoint"; do sleep 0.2; done
# upload|download: every input file into s3://bench/input/, or every object read back at once
# (as many at a time as there are cores, bodies discarded), with boto3.
objects() {
    "$venv/bin/python" - "$1" "$endpoint" "$input" "$(nproc)" <<'PY'
import os, sys, boto3
from concurrent.futures import ThreadPoolExecutor
action, endpoint, folder, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                  aws_access_key_id="bench", aws_secret_access_key="bench")
names = sorted(os.listdir(folder))
if action == "upload":
    s3.create_bucket(Bucket="bench")
    for name in names:
        s3.upload_file(os.path.join(folder, name), "bench", f"input/{name}")
else:
    def read(name):
        body = s3.get_object(Bucket="bench", Key=f"input/{name}")["Body"]
        while body.read(1 << 20):
            pass
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, names))
PY
}
objects upload
export AWS_ENDPOINT_URL=$endpoint AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1

input_mb=$(du -sm --apparent-size "$input" | cut -f1)
echo "output: $format, $([ "$format" = deltalake ] && echo "in S3" || echo "a local folder")"
printf '%-30s %8s %9s %9s %10s\n' case "input MB" "wall s" "MB/s" "peak RSS"
row() { # LABEL SECONDS KIB
    printf '%-30s %8s %9.1f %9.1f %7d MiB\n' "$1" "$input_mb" "$2" \
        "$(echo "$input_mb / $2" | bc -l)" "$(($3 / 1024))"
}

# The server alone: every object downloaded at once.
started=$(date +%s.%N)
objects download
row "server: plain download" "$(echo "$(date +%s.%N) - $started" | bc -l)" 0

# timed LABEL INPUT: runs of the ETL on INPUT into a new output (local, or S3 for Delta),
# each with its wall time and peak RSS.
timed() {
    local label=$1 source=$2
    for i in $(seq "$runs"); do
        local output="$work/out-$i"
        [ "$format" = deltalake ] && output="s3://bench/output-$RANDOM-$i"
        rm -rf "$work/out-$i" "$work/phi"
        /usr/bin/time -f '%e %M' -o "$work/time" "$bin" etl "$source" "$output" "$work/phi" \
            "${extra[@]}" --output-format "$format" >"$work/log" 2>&1 || { cat "$work/log" >&2; exit 1; }
        read -r seconds kib <"$work/time"
        row "$label" "$seconds" "$kib"
        rm -rf "$work/out-$i"
    done
}
timed "etl: local input" "$input"
timed "etl: S3 input" s3://bench/input
