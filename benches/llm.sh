#!/usr/bin/env bash
# The LLM NLP tasks side by side with the reference Cumulus ETL, and their throughput. Starts
# benches/llm_server.py (an OpenAI-compatible server answering after a fixed latency), then:
#   1. runs one task of each study (the covid study's two GPT tasks through the server as their
#      Azure endpoint) with this tool and with the reference on the same notes (the
#      bundled Synthea sample's DocumentReferences, NOTES of them, made current) and the same
#      codebook, and
#      compares their rows (all but `generated_on`);
#      Then Azure's batch mode (`--batch`) on GPT-4o: the same batch file uploaded and the same
#      rows written;
#   2. runs the reference again on this tool's PHI folder: it must find every answer in the
#      cache this tool wrote, and ask the server nothing;
#   3. times notes per second for the example task, ours at --nlp-concurrency 1 and 8, and the
#      reference (which asks one note after another).
#
#   BIN=target/release/cumulus-etl benches/llm.sh [NOTES] [LATENCY_SECONDS]
#
# HTML=1 turns each note into an HTML note first (headings, paragraphs, lists, a table, line
# breaks, entities, styles): both tools then convert it to text, and identical rows and a shared
# cache (keyed by the text) show they made the same text of it.
#
# The reference comes from ../shared/tools/reference-cumulus.sh (its virtualenv). Its `local`
# provider starts the `openai` client with an empty API key, which the package refuses; the
# reference is run through a wrapper that gives it a placeholder key, and nothing else changes.
set -euo pipefail
cd "$(dirname "$0")/.."

notes=${1:-40}
latency=${2:-0.1}
bin=${BIN:-target/release/cumulus-etl}
venv=${REFERENCE_VENV:-$HOME/.cache/reference-cumulus/venv}
[ -x "$bin" ] || { echo "build first: cargo build --release (or set BIN)" >&2; exit 2; }
[ -x "$venv/bin/python" ] || ../shared/tools/reference-cumulus.sh --version >/dev/null 2>&1 || true
work=$(mktemp -d)
server=
trap '[ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$work"' EXIT

port=$((20000 + RANDOM % 20000))
mkdir -p "$work/uploads"
UPLOADS_DIR="$work/uploads" python3 benches/llm_server.py "$port" "$latency" >"$work/server.out" &
server=$!
for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1 && break
    sleep 0.1
done
export CUMULUS_GPT_OSS_120B_URL="http://127.0.0.1:$port/v1"
export CUMULUS_LLAMA4_SCOUT_URL="http://127.0.0.1:$port/v1"

cat >"$work/reference.py" <<'EOF'
import sys
import openai
init = openai.AsyncOpenAI.__init__
def with_placeholder_key(self, *args, **kwargs):
    if kwargs.get("api_key") == "":
        kwargs["api_key"] = "placeholder"
    init(self, *args, **kwargs)
openai.AsyncOpenAI.__init__ = with_placeholder_key
from cumulus_etl.cli import main_cli
sys.argv[0] = "cumulus-etl"
sys.exit(main_cli())
EOF
reference() { "$venv/bin/python" "$work/reference.py" "$@"; }

mkdir -p "$work/input"
# Synthea marks its notes superseded, which both tools skip: they are made current.
python3 -c '
import json, sys
out = open(sys.argv[3], "w")
for n, line in enumerate(open(sys.argv[1])):
    if n == int(sys.argv[2]):
        break
    note = json.loads(line)
    note["status"] = "current"
    out.write(json.dumps(note) + "\n")' tests/data/synthea-10/DocumentReference.000.ndjson "$notes" \
    "$work/input/DocumentReference.ndjson"
if [ "${HTML:-0}" = 1 ]; then
    python3 benches/html_notes.py "$work/input/DocumentReference.ndjson"
fi

# rows DIR: the rows of an NLP NDJSON table, one per line, sorted, without generated_on.
rows() {
    python3 -c '
import json, sys, glob
rows = []
for f in sorted(glob.glob(sys.argv[1] + "/*.ndjson")):
    for line in open(f):
        if line.strip():
            row = json.loads(line)
            row.pop("generated_on", None)
            rows.append(json.dumps(row, sort_keys=True))
print("\n".join(sorted(rows)))' "$1"
}

# compare_rows LABEL TABLE: the rows of TABLE (a folder under each tool's output) must be the
# same and not none.
compare_rows() {
    local ours_rows ref_rows count
    ours_rows=$(rows "$work/ours/$2")
    ref_rows=$(rows "$work/ref/$2")
    count=$(printf '%s\n' "$ours_rows" | grep -c . || true)
    if [ "$ours_rows" = "$ref_rows" ] && [ "$count" -gt 0 ]; then
        echo "$1: identical rows ($count)"
    else
        echo "$1: rows DIFFER (ours $count, reference $(printf '%s\n' "$ref_rows" | grep -c . || true))"
        diff <(printf '%s\n' "$ours_rows") <(printf '%s\n' "$ref_rows") | head -6
        status=1
    fi
}

status=0
first=1
for task in example_nlp__nlp_gpt_oss_120b glioma__nlp_gene_gpt_oss_120b \
    ibd__nlp_endoscopy_gpt_oss_120b irae__nlp_donor_llama4_scout; do
    study=${task%%__*}
    table=${task#*__}
    version=$(python3 -c "
import json, sys
for t in json.load(open('dataflows/llm/$study.json'))['tasks']:
    if '$task'.startswith(t['name'] + '_'):
        print(t['version']); break")
    rm -rf "$work/ours" "$work/ref"
    mkdir -p "$work/phi-ours"
    "$bin" nlp "$work/input" "$work/ours" "$work/phi-ours" --task "$task" \
        --output-format ndjson >"$work/ours.log" 2>&1 || { cat "$work/ours.log"; status=1; continue; }
    if [ $first = 1 ]; then
        mkdir -p "$work/phi-ref"
        cp "$work/phi-ours/codebook.json" "$work/phi-ref/"
        first=0
    fi
    reference nlp "$work/input" "$work/ref" "$work/phi-ref" --task "$task" \
        --output-format ndjson >"$work/ref.log" 2>&1 || { tail -20 "$work/ref.log"; status=1; continue; }
    compare_rows "$task" "$study/${table}_v$version"
done

# The covid study's GPT tasks (upstream runs them on Azure only): both tools ask the same server
# as their Azure endpoint, and keep the study's older rows (`id`, `docref_id`, ..., `symptoms`).
for task in covid_symptom__nlp_results_gpt35 covid_symptom__nlp_results_gpt4; do
    rm -rf "$work/ours" "$work/ref"
    azure=(env AZURE_OPENAI_ENDPOINT="http://127.0.0.1:$port" AZURE_OPENAI_API_KEY=placeholder)
    "${azure[@]}" "$bin" nlp "$work/input" "$work/ours" "$work/phi-ours" --task "$task" \
        --provider azure --output-format ndjson >"$work/ours.log" 2>&1 ||
        { cat "$work/ours.log"; status=1; continue; }
    "${azure[@]}" "$venv/bin/python" "$work/reference.py" nlp "$work/input" "$work/ref" \
        "$work/phi-ref" --task "$task" --provider azure --output-format ndjson \
        >"$work/ref.log" 2>&1 || { tail -20 "$work/ref.log"; status=1; continue; }
    compare_rows "$task" "covid_symptom/${task#*__}_v3"
done

# Batch mode (Azure's batch API, `--batch`): both tools send the example task's notes on GPT-4o
# as a batch from a fresh PHI folder; the batch files they upload (sorted: the tools read notes in
# different orders) and the rows they write must be the same.
task=example_nlp__nlp_gpt4o
rm -rf "$work/ours" "$work/ref" "$work/phi-b-ours" "$work/phi-b-ref" "$work/uploads"/*
mkdir -p "$work/phi-b-ours" "$work/phi-b-ref"
cp "$work/phi-ours/codebook.json" "$work/phi-b-ours/"
cp "$work/phi-ours/codebook.json" "$work/phi-b-ref/"
azure=(env AZURE_OPENAI_ENDPOINT="http://127.0.0.1:$port" AZURE_OPENAI_API_KEY=placeholder)
"${azure[@]}" "$bin" nlp "$work/input" "$work/ours" "$work/phi-b-ours" --task "$task" \
    --provider azure --batch --output-format ndjson >"$work/ours.log" 2>&1 ||
    { cat "$work/ours.log"; status=1; }
ours_upload=$(ls "$work/uploads")
"${azure[@]}" "$venv/bin/python" "$work/reference.py" nlp "$work/input" "$work/ref" \
    "$work/phi-b-ref" --task "$task" --provider azure --batch --output-format ndjson \
    >"$work/ref.log" 2>&1 || { tail -20 "$work/ref.log"; status=1; }
ref_upload=$(ls "$work/uploads" | grep -vxF "$ours_upload" || true)
if [ -n "$ours_upload" ] && [ -n "$ref_upload" ] &&
    cmp -s <(sort "$work/uploads/$ours_upload") <(sort "$work/uploads/$ref_upload"); then
    echo "$task --batch: identical batch files ($(wc -l <"$work/uploads/$ours_upload") requests)"
else
    echo "$task --batch: batch files DIFFER (ours: ${ours_upload:-none}, reference: ${ref_upload:-none})"
    [ -n "$ours_upload" ] && [ -n "$ref_upload" ] &&
        diff <(sort "$work/uploads/$ours_upload") <(sort "$work/uploads/$ref_upload") | cut -c1-600 | head -4
    status=1
fi
compare_rows "$task --batch" example_nlp/nlp_gpt4o_v1

# The reference on our cache: every answer found, nothing asked.
asked() {
    curl -s "http://127.0.0.1:$port/stats" | python3 -c 'import json, sys; print(json.load(sys.stdin)["requests"])'
}
rm -rf "$work/ref"
cp -r "$work/phi-ours" "$work/phi-cache"
before=$(asked)
reference nlp "$work/input" "$work/ref" "$work/phi-cache" --task example_nlp__nlp_gpt_oss_120b \
    --output-format ndjson >"$work/ref.log" 2>&1 || { tail -20 "$work/ref.log"; status=1; }
after=$(asked)
echo "reference run on this tool's answer cache: $((after - before)) requests to the server"
[ "$after" = "$before" ] || status=1

# Throughput: notes per second on the example task, a fresh PHI folder (no cache) each run.
# time_run LABEL COMMAND [options after `nlp INPUT OUTPUT PHI`]
time_run() {
    local label=$1 runner=$2
    shift 2
    rm -rf "$work/t-out" "$work/t-phi"
    mkdir -p "$work/t-phi"
    cp "$work/phi-ours/codebook.json" "$work/t-phi/"
    local start end
    start=$(date +%s.%N)
    "$runner" nlp "$work/input" "$work/t-out" "$work/t-phi" \
        --task example_nlp__nlp_gpt_oss_120b --output-format ndjson "$@" >"$work/t.log" 2>&1 ||
        { tail -5 "$work/t.log"; status=1; }
    end=$(date +%s.%N)
    printf '%-26s %7.2f s %8.1f notes/s\n' "$label" "$(echo "$end - $start" | bc -l)" \
        "$(echo "$notes / ($end - $start)" | bc -l)"
}
echo "throughput, $notes notes, $latency s per request:"
time_run "ours, 1 at a time" "$bin" --nlp-concurrency 1
time_run "ours, 8 at a time" "$bin" --nlp-concurrency 8
time_run "reference" reference
exit $status
