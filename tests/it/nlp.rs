//! NLP runs end to end: the covid fixture through a fake cTAKES/cNLP server speaking the real
//! protocols over HTTP, request shapes, concurrency, retries, the cache, servers that are down,
//! and the embedded engine on the Synthea notes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use super::nlp_server::FakeNlpServer;
use super::support::{read_table, stderr, synthea};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance/covid")
}

/// Runs `cumulus-etl nlp` with the server's URLs in the environment.
fn run_nlp(server: Option<&FakeNlpServer>, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cumulus-etl"));
    cmd.arg("nlp").args(args);
    match server {
        Some(s) => cmd
            .env("URL_CTAKES_REST", s.ctakes_url())
            .env("URL_CNLP_NEGATION", s.negation_url())
            .env("URL_CNLP_TERM_EXISTS", s.term_exists_url()),
        None => cmd
            .env("URL_CTAKES_REST", "http://127.0.0.1:9/ctakes")
            .env("URL_CNLP_NEGATION", "http://127.0.0.1:9/negation/process"),
    };
    cmd.output().expect("binary runs")
}

fn phi_from_fixture(dir: &Path) -> PathBuf {
    let phi = dir.join("phi");
    std::fs::create_dir_all(&phi).unwrap();
    std::fs::copy(fixture().join("codebook.json"), phi.join("codebook.json")).unwrap();
    phi
}

/// Rows of an NLP NDJSON table without `generated_on`, keyed by id.
fn results(dir: &Path) -> BTreeMap<String, Value> {
    read_table(dir, "id")
        .into_iter()
        .map(|(k, mut v)| {
            v.as_object_mut().unwrap().remove("generated_on");
            (k, v)
        })
        .collect()
}

/// An emergency department note line with the given text.
fn ed_note(id: &str, text: &str) -> String {
    json!({
        "resourceType": "DocumentReference", "id": id, "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "34111-5"}]},
        "subject": {"reference": "Patient/p1"},
        "context": {"encounter": [{"reference": format!("Encounter/e{id}")}]},
        "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
            "data": base64::engine::general_purpose::STANDARD.encode(text)}}]
    })
    .to_string()
}

fn write_input(dir: &Path, lines: &[String]) -> PathBuf {
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("DocumentReference.ndjson"),
        lines.join("\n") + "\n",
    )
    .unwrap();
    input
}

/// An embedded-engine run of the covid task on `notes` (NDJSON output, the fixture's codebook,
/// `env` added), killed as hung after a minute; returns the run and its result rows.
fn embedded_run(notes: &[String], env: &[(&str, &str)]) -> (Output, BTreeMap<String, Value>) {
    let tmp = tempfile::tempdir().unwrap();
    let phi = phi_from_fixture(tmp.path());
    let input = write_input(tmp.path(), notes);
    let out = tmp.path().join("out");
    let run = crate::support::run_etl_within(
        &[
            "nlp",
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            phi.to_str().unwrap(),
            "--task=covid_symptom__nlp_results",
            "--output-format=ndjson",
        ],
        env,
        Duration::from_secs(60),
    );
    let rows = results(&out.join("covid_symptom/nlp_results_v4"));
    (run, rows)
}

/// The matched texts of result rows.
fn matched_texts(rows: &BTreeMap<String, Value>) -> Vec<&str> {
    rows.values()
        .filter_map(|r| r["match"]["text"].as_str())
        .collect()
}

/// A `--nlp-engine=ctakes` run of the covid task on `notes` in folder `tmp`, NDJSON output,
/// with `extra` options; returns the run and the folder of its result files.
fn server_run(
    server: &FakeNlpServer,
    tmp: &Path,
    notes: &[String],
    extra: &[&str],
) -> (Output, PathBuf) {
    let phi = phi_from_fixture(tmp);
    let input = write_input(tmp, notes);
    let out = tmp.join("out");
    let mut args = vec![
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--task=covid_symptom__nlp_results",
        "--nlp-engine=ctakes",
        "--output-format=ndjson",
    ];
    args.extend_from_slice(extra);
    let run = run_nlp(Some(server), &args);
    (run, out.join("covid_symptom/nlp_results_v4"))
}

#[test]
fn covid_fixture_matches_upstream_with_both_polarity_models() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    for (task, expected) in [
        ("covid_symptom__nlp_results", "output"),
        ("covid_symptom__nlp_results_term_exists", "term-exists"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let phi = phi_from_fixture(tmp.path());
        let out = tmp.path().join("out");
        let input = fixture().join("input");
        let run = run_nlp(
            Some(&server),
            &[
                input.to_str().unwrap(),
                out.to_str().unwrap(),
                phi.to_str().unwrap(),
                "--task",
                task,
                "--nlp-engine",
                "ctakes",
                "--output-format",
                "ndjson",
            ],
        );
        assert!(run.status.success(), "{task}: {}", stderr(&run));
        let short = task.trim_start_matches("covid_symptom__");
        let table = format!("{short}_v4");
        let ours = results(&out.join("covid_symptom").join(&table));
        let theirs = results(&fixture().join(expected).join("covid_symptom").join(&table));
        assert!(!theirs.is_empty());
        assert_eq!(ours, theirs, "{task}");
        let ids = |root: &Path| {
            let text =
                std::fs::read_to_string(root.join("covid_symptom").join(format!("{table}.ids")))
                    .unwrap();
            let mut v: Vec<String> = text.lines().map(str::to_string).collect();
            v.sort();
            v
        };
        assert_eq!(ids(&out), ids(&fixture().join(expected)), "{task} .ids");
    }
}

#[test]
fn requests_have_the_protocol_shapes_and_a_rerun_uses_the_cache() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    let phi = phi_from_fixture(tmp.path());
    // An astral character before the symptom: cTAKES counts UTF-16 units, rows count characters.
    let input = write_input(
        tmp.path(),
        &[ed_note("n1", "😷Patient fevers itching today")],
    );
    let run_once = |out: &Path| {
        run_nlp(
            Some(&server),
            &[
                input.to_str().unwrap(),
                out.to_str().unwrap(),
                phi.to_str().unwrap(),
                "--task",
                "covid_symptom__nlp_results",
                "--nlp-engine=ctakes",
                "--output-format=ndjson",
            ],
        )
    };
    let first = run_once(&tmp.path().join("out1"));
    assert!(first.status.success(), "{}", stderr(&first));
    let seen = server.requests();
    assert_eq!(seen.len(), 2, "one cTAKES and one cNLP request");
    assert!(seen[0].path.ends_with("/ctakes-web-rest/service/analyze"));
    assert_eq!(seen[0].content_type, "text/plain; charset=UTF-8");
    assert_eq!(seen[0].body, "😷Patient fevers itching today".as_bytes());
    assert_eq!(seen[1].path, "/negation/process");
    let cnlp: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(cnlp["doc_text"], "😷Patient fevers itching today");
    // "fevers" starts at character 9 (UTF-16 offset 10); the two covid mentions share it.
    assert_eq!(cnlp["entities"], json!([[9, 15], [9, 15]]));

    let rows = results(&tmp.path().join("out1/covid_symptom/nlp_results_v4"));
    let first_match = &rows.values().next().unwrap()["match"];
    assert_eq!(first_match["begin"], 9);
    assert_eq!(first_match["text"], "fevers");
    assert!(
        phi.join("ctakes-cache/covid_symptom_v4").is_dir()
            && phi.join("ctakes-cache/covid_symptom_v4-cnlp_v2").is_dir()
    );

    let second = run_once(&tmp.path().join("out2"));
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(server.requests().len(), 2, "the re-run asked no server");
    assert_eq!(
        results(&tmp.path().join("out2/covid_symptom/nlp_results_v4")),
        rows
    );
}

#[test]
fn many_notes_are_in_flight_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let server = FakeNlpServer::start(Duration::from_millis(150), Vec::new());
    let notes: Vec<String> = (0..24)
        .map(|i| ed_note(&format!("n{i}"), &format!("Note{i} fever itch")))
        .collect();
    let (run, table) = server_run(
        &server,
        tmp.path(),
        &notes,
        &["--nlp-concurrency=8", "--workers=1"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let peak = server
        .state
        .peak_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!((4..=8).contains(&peak), "peak in flight {peak}");
    let connections = server
        .state
        .connections
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        connections <= 16,
        "{connections} connections for 48 requests: they are reused"
    );
    assert_eq!(results(&table).len(), 48);
}

#[test]
fn failed_requests_are_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let server = FakeNlpServer::start(Duration::ZERO, vec![503, 429, 500]);
    let notes = [ed_note("n1", "Patient fever itch")];
    let (run, table) = server_run(&server, tmp.path(), &notes, &["--nlp-retry-delay-ms=10"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        server.requests().len(),
        5,
        "3 failures, then cTAKES and cNLP"
    );
    assert!(stderr(&run).contains("3 retries"), "{}", stderr(&run));
    assert_eq!(results(&table).len(), 2);
}

#[test]
fn a_request_that_times_out_is_retried() {
    let tmp = tempfile::tempdir().unwrap();
    let server = FakeNlpServer::start(Duration::ZERO, vec![0]);
    let notes = [ed_note("n1", "Patient fever itch")];
    let (run, table) = server_run(
        &server,
        tmp.path(),
        &notes,
        &["--nlp-timeout=1", "--nlp-retry-delay-ms=10"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stderr(&run).contains("1 retries"), "{}", stderr(&run));
    assert_eq!(server.requests().len(), 3, "stalled cTAKES, cTAKES, cNLP");
    assert_eq!(results(&table).len(), 2);
}

#[test]
fn parquet_results_have_the_upstream_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = phi_from_fixture(tmp.path());
    let input = write_input(
        tmp.path(),
        &[
            ed_note("a", "Fever and cough."),
            ed_note("b", "Feels well."),
        ],
    );
    let out = tmp.path().join("out");
    let run = run_nlp(
        None,
        &[
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            phi.to_str().unwrap(),
            "--task=covid_symptom__nlp_results",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let file = out.join("covid_symptom/nlp_results_v4/nlp_results_v4.000.parquet");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&file).unwrap(),
    )
    .unwrap();
    let schema = reader.schema().clone();
    let batches: Vec<_> = reader.build().unwrap().map(Result::unwrap).collect();
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 3);
    use arrow::datatypes::DataType;
    assert_eq!(
        schema.field_with_name("task_version").unwrap().data_type(),
        &DataType::Int32
    );
    let DataType::Struct(fields) = schema.field_with_name("match").unwrap().data_type() else {
        panic!("match is a struct");
    };
    let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    assert_eq!(
        names,
        [
            "begin",
            "end",
            "text",
            "polarity",
            "type",
            "conceptAttributes"
        ]
    );
    assert_eq!(fields[3].data_type(), &DataType::Int8);
    assert!(matches!(fields[5].data_type(), DataType::List(_)));
}

#[test]
fn servers_that_are_down() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = phi_from_fixture(tmp.path());
    let input = write_input(
        tmp.path(),
        &[
            ed_note("n1", "Patient fever itch"),
            ed_note("n2", "Other fever itch"),
        ],
    );
    let args = |out: &Path, errors: &Path| -> Vec<String> {
        vec![
            input.display().to_string(),
            out.display().to_string(),
            phi.display().to_string(),
            "--task=covid_symptom__nlp_results".into(),
            "--nlp-engine=ctakes".into(),
            "--nlp-retries=1".into(),
            "--nlp-retry-delay-ms=10".into(),
            "--init-check-interval-ms=10".into(),
            "--output-format=ndjson".into(),
            format!("--errors-to={}", errors.display()),
        ]
    };
    let as_str = |v: &[String]| {
        v.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\u{0}")
    };
    // The start-up check finds no cTAKES: exit 14 before reading anything.
    let a = args(&tmp.path().join("out1"), &tmp.path().join("err1"));
    let v = as_str(&a);
    let run = run_nlp(None, &v.split('\u{0}').collect::<Vec<_>>());
    assert_eq!(run.status.code(), Some(14), "{}", stderr(&run));
    assert!(stderr(&run).contains("cTAKES"));

    // Without the check, every note fails, is saved for a later retry, and the run goes on.
    let mut a = args(&tmp.path().join("out2"), &tmp.path().join("err2"));
    a.push("--skip-init-checks".into());
    let v = as_str(&a);
    let run = run_nlp(None, &v.split('\u{0}').collect::<Vec<_>>());
    assert_eq!(run.status.code(), Some(19), "{}", stderr(&run));
    assert!(stderr(&run).contains("2 failed"), "{}", stderr(&run));
    let saved = std::fs::read_to_string(
        tmp.path()
            .join("err2/covid_symptom__nlp_results/nlp-errors.ndjson"),
    )
    .unwrap();
    let mut ids: Vec<String> = saved
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["n1", "n2"], "the original notes, for a later retry");
    assert!(!stderr(&run).contains("fever"), "no note text in the log");
    assert!(
        tmp.path()
            .join("out2/covid_symptom/nlp_results_v4")
            .is_dir()
    );
}

#[test]
fn embedded_engine_on_synthea_and_negation() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = phi_from_fixture(tmp.path());
    let out = tmp.path().join("out");
    let run = run_nlp(
        None,
        &[
            synthea().to_str().unwrap(),
            out.to_str().unwrap(),
            phi.to_str().unwrap(),
            "--task=covid_symptom__nlp_results",
            "--output-format=ndjson",
        ],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let rows = results(&out.join("covid_symptom/nlp_results_v4"));
    let texts: Vec<&str> = rows
        .values()
        .filter_map(|r| r["match"]["text"].as_str())
        .collect();
    assert!(texts.contains(&"Cough"), "the chief complaint is found");
    // Most Synthea notes are superseded; two current ED notes remain.
    assert!(
        stderr(&run).contains("1215 read, 0 finished by an earlier run, 2 selected"),
        "{}",
        stderr(&run)
    );
    assert!(
        rows.keys().all(|id| !id.contains('-')),
        "anonymized ids only"
    );

    let notes = [
        ed_note(
            "a",
            "Patient denies fever. Reports a dry cough since Monday.",
        ),
        ed_note("b", "No fever, no cough."),
    ];
    let (run, rows) = embedded_run(&notes, &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let found: Vec<Option<&str>> = rows.values().map(|r| r["match"]["text"].as_str()).collect();
    assert_eq!(found.len(), 2, "{rows:?}");
    assert!(found.contains(&Some("dry cough")), "{found:?}");
    assert!(
        found.contains(&None),
        "note b has no positive symptom: {found:?}"
    );
}

#[test]
fn delta_results_replace_a_notes_earlier_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = phi_from_fixture(tmp.path());
    let out = tmp.path().join("out");
    let table = out.join("covid_symptom__nlp_results");
    let run_with = |text_a: &str| {
        let dir = tempfile::tempdir().unwrap();
        let input = write_input(
            dir.path(),
            &[ed_note("a", text_a), ed_note("b", "Sore throat.")],
        );
        // The 2023 invocation (`etl --task ...`) runs the NLP study too.
        let run = super::support::run_etl(&[
            "etl",
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            phi.to_str().unwrap(),
            "--task=covid_symptom__nlp_results",
            "--output-format=deltalake",
        ]);
        assert!(run.status.success(), "{}", stderr(&run));
        let rows = super::support::read_delta(&table, "id");
        let mut texts: Vec<(String, Option<String>)> = rows
            .values()
            .map(|r| {
                let id = r["id"].as_str().unwrap();
                (
                    id[id.len() - 2..].to_string(),
                    r["match"]["text"].as_str().map(str::to_string),
                )
            })
            .collect();
        texts.sort();
        texts
    };
    let some = |s: &str| Some(s.to_string());
    assert_eq!(
        run_with("Fever and cough."),
        [
            (".0".into(), some("Fever")),
            (".0".into(), some("Sore throat")),
            (".1".into(), some("cough"))
        ]
    );
    // Note a lost its symptoms: its two rows become one placeholder; note b is untouched.
    assert_eq!(
        run_with("Feels well."),
        [(".0".into(), None), (".0".into(), some("Sore throat"))]
    );
}

#[test]
fn nlp_and_fhir_tasks_do_not_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let run = super::support::run_etl(&[
        synthea().to_str().unwrap(),
        tmp.path().join("out").to_str().unwrap(),
        tmp.path().join("phi").to_str().unwrap(),
        "--task=patient,covid_symptom__nlp_results",
    ]);
    assert_eq!(run.status.code(), Some(43), "{}", stderr(&run));
    let run = run_nlp(
        None,
        &[
            synthea().to_str().unwrap(),
            tmp.path().join("out").to_str().unwrap(),
            tmp.path().join("phi").to_str().unwrap(),
            "--task=help",
        ],
    );
    assert_eq!(run.status.code(), Some(35));
    assert!(stderr(&run).contains("covid_symptom__nlp_results_term_exists"));
}

/// A bug met while reading one note line skips that line; one met by the engine on one note
/// fails that note; the other notes are analysed and the run ends.
#[test]
fn a_panic_on_one_note_costs_that_note_only() {
    let notes = [
        ed_note("a", "Reports a dry cough since Monday."),
        ed_note("b", "Fever and cough."),
    ];
    for (site, code) in [
        ("line:DocumentReference.ndjson:1", Some(0)),
        ("note:DocumentReference.ndjson:1", Some(19)),
    ] {
        let (run, rows) = embedded_run(&notes, &[("CUMULUS_ETL_TEST_PANIC", site)]);
        let log = stderr(&run);
        assert_eq!(run.status.code(), code, "{site}: {log}");
        let texts = matched_texts(&rows);
        assert!(
            texts.contains(&"Fever") && !texts.contains(&"dry cough"),
            "{site}: {texts:?}"
        );
        assert!(
            log.contains("internal error at src/panic_guard.rs"),
            "{site}: {log}"
        );
    }
}

/// A note with a lone surrogate escape (which Python reads) outside its text is selected and
/// analysed like any other.
#[test]
fn a_note_with_a_lone_surrogate_is_analysed() {
    let note = ed_note("a", "Reports a dry cough since Monday.");
    let marked = note.replace(
        r#""status":"current""#,
        r#""status":"current","description":"x\ud83d""#,
    );
    assert_ne!(note, marked);
    let (run, rows) = embedded_run(&[marked], &[]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(matched_texts(&rows), ["dry cough"], "{}", stderr(&run));
}
