#!/usr/bin/env bash
# Fuzzes one target with cargo-fuzz (libFuzzer, AddressSanitizer, debug assertions; the nightly
# toolchain, which cargo-fuzz needs) for SECONDS, from a corpus seeded with the bundled sample's
# lines, and copies every input it fails on into fuzz/regressions/TARGET/, where the main test
# suite (tests/it/fuzz_regressions.rs) runs it from then on.
#
#   fuzz/run.sh tape|scrub|lines [SECONDS, default 600] [more libFuzzer options]
#
# cargo-fuzz is installed from crates.io on first use. The corpus grows in fuzz/corpus/TARGET
# (not committed); a run starts from where the last one left it.
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh tape|scrub|lines [SECONDS] [libFuzzer options]}
seconds=${2:-600}
shift $(($# >= 2 ? 2 : 1))
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

corpus="corpus/$target"
if [ ! -d "$corpus" ]; then
    mkdir -p "$corpus"
    python3 - "$target" "$corpus" ../tests/data/synthea-10 <<'PY'
import hashlib, pathlib, sys
target, corpus, sample = sys.argv[1], pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
def keep(data):
    (corpus / hashlib.sha1(data).hexdigest()).write_bytes(data)
for path in sorted(sample.glob("*.ndjson")):
    text = path.read_bytes()
    if target == "lines":
        for size in (0, 7, 300):
            keep(size.to_bytes(2, "little") + text[:4096])
    else:
        for line in text.split(b"\n"):
            if 0 < len(line) <= 16384:
                keep(line)
PY
fi

mkdir -p "regressions/$target"
status=0
cargo +nightly fuzz run --debug-assertions "$target" "$corpus" -- \
    -max_total_time="$seconds" -max_len=16384 -print_final_stats=1 "$@" || status=$?
# Failures only: a "slow-unit" is a report, not a failure (and a paused fuzzer writes one).
for found in artifacts/"$target"/{crash,oom,timeout,leak}-*; do
    [ -e "$found" ] || continue
    cp -n "$found" "regressions/$target/"
    echo "kept $(basename "$found") in fuzz/regressions/$target/" >&2
done
exit $status
