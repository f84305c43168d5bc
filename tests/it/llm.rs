//! LLM NLP tasks end to end, against a server speaking the OpenAI chat-completions protocol over
//! HTTP (`nlp_server`): upstream's request shape, rows and spans, the answer cache in upstream's
//! layout, a second run that asks nothing, requests that really overlap, retries, and a server
//! that is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::nlp_server::{FakeNlpServer, Seen, llm_answer};
use super::support::{read_table, stderr};
use cumulus_etl::store::ObjectLocation;

const TASK: &str = "example_nlp__nlp_gpt_oss_120b";

/// A note of either type, with its text as a base64 attachment.
fn note(resource_type: &str, id: &str, text: &str) -> String {
    let attachment = json!({"contentType": "text/plain; charset=utf-8",
        "data": base64::engine::general_purpose::STANDARD.encode(text)});
    let mut note = json!({
        "resourceType": resource_type, "id": id,
        "subject": {"reference": format!("Patient/p{id}")},
    });
    match resource_type {
        "DocumentReference" => {
            note["status"] = json!("current");
            note["context"] = json!({"encounter": [{"reference": format!("Encounter/e{id}")}]});
            note["content"] = json!([{ "attachment": attachment }]);
        }
        _ => {
            note["status"] = json!("final");
            note["encounter"] = json!({"reference": format!("Encounter/e{id}")});
            note["presentedForm"] = json!([attachment]);
        }
    }
    note.to_string()
}

/// Notes in an input folder, DocumentReferences and DiagnosticReports in their own files.
fn write_notes(dir: &Path, notes: &[(&str, &str, &str)]) -> PathBuf {
    let input = dir.join("input");
    std::fs::create_dir_all(&input).unwrap();
    for kind in ["DocumentReference", "DiagnosticReport"] {
        let lines: Vec<String> = notes
            .iter()
            .filter(|(t, _, _)| *t == kind)
            .map(|(t, id, text)| note(t, id, text))
            .collect();
        if !lines.is_empty() {
            std::fs::write(
                input.join(format!("{kind}.ndjson")),
                lines.join("\n") + "\n",
            )
            .unwrap();
        }
    }
    input
}

/// Runs `cumulus-etl nlp` on `task` with the server as the model's local server.
fn run_llm(server: &FakeNlpServer, dir: &Path, out: &str, task: &str, extra: &[&str]) -> Output {
    let (input, phi) = (dir.join("input"), dir.join("phi"));
    Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .arg("nlp")
        .args([
            input.to_str().unwrap(),
            dir.join(out).to_str().unwrap(),
            phi.to_str().unwrap(),
            &format!("--task={task}"),
        ])
        .args(extra)
        .env("CUMULUS_GPT_OSS_120B_URL", server.llm_url())
        .env("CUMULUS_LLAMA4_SCOUT_URL", server.llm_url())
        .output()
        .expect("binary runs")
}

/// Runs `cumulus-etl nlp` on `task` over the notes of `dir` into `out` (NDJSON unless `extra`
/// says otherwise) with `extra` options, and `env` set in order (a None value removes the variable).
fn run_nlp_with(
    dir: &Path,
    out: &str,
    task: &str,
    extra: &[&str],
    env: &[(&str, Option<&str>)],
) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cumulus-etl"));
    cmd.arg("nlp")
        .args([
            dir.join("input").to_str().unwrap(),
            dir.join(out).to_str().unwrap(),
            dir.join("phi").to_str().unwrap(),
            &format!("--task={task}"),
        ])
        .args(extra);
    if !extra.iter().any(|o| o.starts_with("--output-format")) {
        cmd.arg("--output-format=ndjson");
    }
    for (name, value) in env {
        match value {
            Some(value) => cmd.env(name, value),
            None => cmd.env_remove(name),
        };
    }
    cmd.output().unwrap()
}

/// [`run_llm`], which must succeed.
fn run_ok(server: &FakeNlpServer, dir: &Path, out: &str, task: &str, extra: &[&str]) -> Output {
    let run = run_llm(server, dir, out, task, extra);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    run
}

/// Rows of the example task's NDJSON output, without `generated_on`, keyed by note_ref.
fn example_rows(dir: &Path, out: &str) -> BTreeMap<String, Value> {
    read_table(
        &dir.join(out).join("example_nlp/nlp_gpt_oss_120b_v1"),
        "note_ref",
    )
    .into_iter()
    .map(|(k, mut v)| {
        assert!(v["generated_on"].as_str().is_some_and(|t| t.contains('T')));
        v.as_object_mut().unwrap().remove("generated_on");
        (k, v)
    })
    .collect()
}

fn chat_requests(server: &FakeNlpServer) -> Vec<Value> {
    server
        .requests()
        .iter()
        .filter(|r| r.path == "/v1/chat/completions")
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect()
}

#[test]
fn an_llm_task_writes_upstreams_rows_caches_answers_and_a_second_run_asks_nothing() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    let texts = [
        "Patient is 45 years old.  \nNo fever.   \n",
        "Follow-up visit, doing well",
    ];
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", texts[0]),
            ("DiagnosticReport", "2", texts[1]),
        ],
    );
    // A superseded note is not read.
    let superseded = note("DocumentReference", "3", "old").replace("current", "superseded");
    let docs = tmp.path().join("input/DocumentReference.ndjson");
    let lines = std::fs::read_to_string(&docs).unwrap() + &superseded + "\n";
    std::fs::write(&docs, lines).unwrap();

    let run = run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson"],
    );
    let err = stderr(&run);
    assert!(err.contains("Tokens: "), "{err}");

    // The requests, as upstream makes them.
    let requests = chat_requests(&server);
    assert_eq!(requests.len(), 2);
    let example = &requests
        .iter()
        .find(|r| r["messages"][1]["content"] == json!("Patient is 45 years old.\nNo fever."))
        .expect("the note's text, trailing whitespace removed, is the user message");
    assert_eq!(example["model"], "openai/gpt-oss-120b");
    assert_eq!(example["seed"], 12345);
    assert_eq!(example["temperature"], 0);
    assert_eq!(example["messages"][0]["role"], "system");
    let system = example["messages"][0]["content"].as_str().unwrap();
    assert!(
        system.starts_with("You are a clinical chart reviewer."),
        "{system}"
    );
    assert!(system.contains(r#""title": "AgeMention""#), "{system}");
    assert_eq!(example["response_format"]["type"], "json_schema");
    assert_eq!(example["response_format"]["json_schema"]["strict"], true);
    assert_eq!(
        example["response_format"]["json_schema"]["name"],
        "AgeMention"
    );
    let models = server.requests();
    assert_eq!(
        models[0].path, "/v1/models",
        "the start-up check comes first"
    );

    // The rows: references de-identified, the answer with its spans as positions.
    let rows = example_rows(tmp.path(), "out");
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (doc_ref, doc) = rows
        .iter()
        .find(|(k, _)| k.starts_with("DocumentReference/"))
        .unwrap();
    assert_ne!(doc_ref, "DocumentReference/1", "the note's id is anonymous");
    assert!(doc["subject_ref"].as_str().unwrap().starts_with("Patient/"));
    assert_ne!(doc["subject_ref"], "Patient/p1");
    assert!(
        doc["encounter_ref"]
            .as_str()
            .unwrap()
            .starts_with("Encounter/")
    );
    assert_ne!(doc["encounter_ref"], "Encounter/e1");
    assert_eq!(doc["task_version"], 1);
    assert_eq!(doc["system_fingerprint"], "fp_test");
    // "Patient is" is characters 0 to 10 of the note; 7 words.
    assert_eq!(
        doc["result"],
        json!({"has_mention": true, "spans": [[0, 10]], "age": 7})
    );
    let (_, report) = rows
        .iter()
        .find(|(k, _)| k.starts_with("DiagnosticReport/"))
        .unwrap();
    assert_eq!(
        report["result"],
        json!({"has_mention": true, "spans": [[0, 15]], "age": 4})
    );
    // The finished notes are listed beside the table.
    let ids = std::fs::read_to_string(tmp.path().join("out/example_nlp/nlp_gpt_oss_120b_v1.ids"))
        .unwrap();
    let mut listed: Vec<&str> = ids.lines().collect();
    listed.sort();
    let mut refs: Vec<&str> = rows.keys().map(String::as_str).collect();
    refs.sort();
    assert_eq!(listed, refs);

    // The cache, in upstream's layout: keyed by the text the model was sent.
    let sum = hex::encode(Sha256::digest("Patient is 45 years old.\nNo fever."));
    let cached = tmp.path().join(format!(
        "phi/nlp-cache/{TASK}_v1/{}/sha256-{sum}.cache",
        &sum[..4]
    ));
    let cached: Value = serde_json::from_slice(&std::fs::read(&cached).unwrap()).unwrap();
    assert_eq!(cached["fingerprint"], "fp_test");
    assert_eq!(
        cached["answer"],
        llm_answer(
            &example["response_format"]["json_schema"]["schema"],
            "Patient is 45 years old.\nNo fever."
        )
    );

    // A second run into a new folder asks the model nothing and writes the same rows.
    run_ok(
        &server,
        tmp.path(),
        "again",
        TASK,
        &["--output-format=ndjson"],
    );
    assert_eq!(
        chat_requests(&server).len(),
        2,
        "answers come from the cache"
    );
    assert_eq!(example_rows(tmp.path(), "again"), rows);
}

#[test]
fn requests_overlap_up_to_the_concurrency_and_failures_are_retried() {
    let server = FakeNlpServer::start(Duration::from_millis(300), vec![503, 429]);
    let tmp = tempfile::tempdir().unwrap();
    let texts: Vec<String> = (0..8).map(|i| format!("note number {i} here")).collect();
    let notes: Vec<(&str, String, &str)> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| ("DocumentReference", i.to_string(), t.as_str()))
        .collect();
    let notes: Vec<(&str, &str, &str)> =
        notes.iter().map(|(a, b, c)| (*a, b.as_str(), *c)).collect();
    write_notes(tmp.path(), &notes);
    let run = run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson", "--nlp-concurrency=4"],
    );
    assert_eq!(example_rows(tmp.path(), "out").len(), 8);
    let peak = server
        .state
        .peak_in_flight
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!((2..=4).contains(&peak), "peak in flight {peak}");
    // Eight answers and two retried failures (the first of which is the model check).
    let err = stderr(&run);
    assert!(err.contains("2 retries"), "{err}");
}

#[test]
fn a_missing_server_or_model_stops_the_run_before_any_note() {
    let tmp = tempfile::tempdir().unwrap();
    write_notes(tmp.path(), &[("DocumentReference", "1", "some text")]);
    let run = Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .arg("nlp")
        .args([
            tmp.path().join("input").to_str().unwrap(),
            tmp.path().join("out").to_str().unwrap(),
            tmp.path().join("phi").to_str().unwrap(),
            &format!("--task={TASK}"),
            "--nlp-retries=0",
        ])
        .env("CUMULUS_GPT_OSS_120B_URL", "http://127.0.0.1:9/v1")
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(33), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(err.contains("NLP server is unreachable"), "{err}");
    assert!(err.contains("docker compose up gpt-oss-120b"), "{err}");

    // A task whose model has no local server is refused by name.
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let run = run_llm(&server, tmp.path(), "out2", "example_nlp__nlp_gpt4o", &[]);
    assert_stops(&run, 23, "does not support the 'local' provider");
}

#[test]
fn a_task_of_every_study_writes_its_answers_into_a_delta_table() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[
            (
                "DocumentReference",
                "1",
                "Glioblastoma, IDH wild-type; on temozolomide.",
            ),
            ("DiagnosticReport", "2", "Colonoscopy shows mild colitis."),
        ],
    );
    for task in [
        "glioma__nlp_gene_gpt_oss_120b",
        "ibd__nlp_endoscopy_gpt_oss_120b",
        "irae__nlp_donor_llama4_scout",
    ] {
        let run = run_llm(
            &server,
            tmp.path(),
            "delta",
            task,
            &["--output-format=deltalake"],
        );
        assert_eq!(run.status.code(), Some(0), "{task}: {}", stderr(&run));
        let rows = crate::support::read_delta_rows(&tmp.path().join("delta").join(task));
        assert_eq!(rows.len(), 2, "{task}: {rows:?}");
        for row in rows {
            assert!(row["result"].is_object(), "{task}: {row}");
            assert!(row["note_ref"].as_str().unwrap().contains('/'), "{task}");
        }
    }
}

#[test]
fn a_rerun_into_the_same_output_skips_finished_notes_and_clean_starts_over() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(tmp.path(), &[("DocumentReference", "1", "first note text")]);
    run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson"],
    );
    assert_eq!(chat_requests(&server).len(), 1);

    // A new note arrives; a new PHI folder, so nothing comes from the cache.
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", "first note text"),
            ("DocumentReference", "2", "second note text"),
        ],
    );
    std::fs::rename(tmp.path().join("phi"), tmp.path().join("phi-before")).unwrap();
    std::fs::create_dir_all(tmp.path().join("phi")).unwrap();
    std::fs::copy(
        tmp.path().join("phi-before/codebook.json"),
        tmp.path().join("phi/codebook.json"),
    )
    .unwrap();
    let run = run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson"],
    );
    let err = stderr(&run);
    assert!(err.contains("1 finished by an earlier run"), "{err}");
    assert_eq!(
        chat_requests(&server).len(),
        2,
        "only the new note is asked"
    );
    let rows = example_rows(tmp.path(), "out");
    assert_eq!(rows.len(), 2, "both notes' rows, in two batch files");
    let table = tmp.path().join("out/example_nlp/nlp_gpt_oss_120b_v1");
    assert_eq!(std::fs::read_dir(&table).unwrap().count(), 2);
    let ids = tmp.path().join("out/example_nlp/nlp_gpt_oss_120b_v1.ids");
    assert_eq!(std::fs::read_to_string(&ids).unwrap().lines().count(), 2);

    // --clean removes the earlier results first: both notes are analysed again (from the
    // cache now) into one new batch file.
    let run = run_llm(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson", "--clean"],
    );
    assert_stops(&run, 0, "0 finished by an earlier run");
    assert_eq!(std::fs::read_dir(&table).unwrap().count(), 1);
    assert_eq!(example_rows(tmp.path(), "out").len(), 2);
    assert_eq!(std::fs::read_to_string(&ids).unwrap().lines().count(), 2);
}

#[test]
fn notes_are_selected_and_rejected_by_their_text() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", "A high Fever today"),
            ("DocumentReference", "2", "A dry cough"),
            (
                "DiagnosticReport",
                "3",
                "fever\nthen tested positive for COVID",
            ),
            ("DocumentReference", "4", "feverish"),
        ],
    );
    let run = run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &[
            "--output-format=ndjson",
            "--select-by-word=fever",
            "--reject-by-regex=covid(-19)?",
            "--allow-large-selection",
        ],
    );
    let asked: Vec<String> = chat_requests(&server)
        .iter()
        .map(|r| r["messages"][1]["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(asked, ["A high Fever today"]);
    let err = stderr(&run);
    assert!(
        err.contains("3 left out by --select-by/--reject-by"),
        "{err}"
    );

    // --clean has nothing to clean in a Delta table, as upstream says.
    let run = run_llm(
        &server,
        tmp.path(),
        "delta",
        TASK,
        &["--output-format=deltalake", "--clean"],
    );
    assert_stops(
        &run,
        22,
        "Cannot provide --clean with the deltalake output format.",
    );
    // A regex that does not compile is named.
    let run = run_llm(
        &server,
        tmp.path(),
        "out2",
        TASK,
        &["--select-by-regex=fever("],
    );
    assert_eq!(run.status.code(), Some(23), "{}", stderr(&run));
    assert!(stderr(&run).contains("'fever('"), "{}", stderr(&run));
}

#[test]
fn the_azure_provider_asks_the_deployment_with_its_key_and_estimates_the_cost() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[("DocumentReference", "1", "Patient is 45 years old")],
    );
    let azure = |out: &str, extra: &[&str], env: &[(&str, &str)]| {
        let mut vars = vec![
            ("AZURE_OPENAI_API_KEY", None),
            ("AZURE_OPENAI_ENDPOINT", None),
        ];
        vars.extend(env.iter().map(|(k, v)| (*k, Some(*v))));
        run_nlp_with(tmp.path(), out, "example_nlp__nlp_gpt4o", extra, &vars)
    };
    let endpoint = format!("http://{}", server.addr);
    let env = [
        ("AZURE_OPENAI_ENDPOINT", endpoint.as_str()),
        ("AZURE_OPENAI_API_KEY", "secret-key"),
    ];
    let run = azure("out", &["--provider=azure"], &env);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let seen = server.requests();
    assert_eq!(seen[0].path, "/openai/models?api-version=2024-10-21");
    assert_eq!(
        seen[1].path,
        "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    );
    assert!(seen.iter().all(|r| r.api_key == "secret-key"));
    let request: Value = serde_json::from_slice(&seen[1].body).unwrap();
    assert_eq!(request["model"], "gpt-4o");
    assert_eq!(request["response_format"]["json_schema"]["strict"], true);
    let err = stderr(&run);
    assert!(
        err.contains("Estimated cost (prices as of 2025-10-15): $"),
        "{err}"
    );

    // --azure-deployment names the deployment asked (a new PHI folder: nothing cached).
    let before = server.requests().len();
    std::fs::remove_dir_all(tmp.path().join("phi")).unwrap();
    let run = azure(
        "out2",
        &["--provider=azure", "--azure-deployment=my-gpt4o"],
        &env,
    );
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let paths: Vec<String> = server.requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        paths,
        [
            "/openai/models?api-version=2024-10-21",
            "/openai/deployments/my-gpt4o/chat/completions?api-version=2024-10-21"
        ]
    );
    // Without its settings, or with a model Bedrock does not serve, the run stops before any
    // note.
    let run = azure("out3", &["--provider=azure"], &[]);
    assert_stops(
        &run,
        23,
        "Set both AZURE_OPENAI_API_KEY & AZURE_OPENAI_ENDPOINT",
    );
    let run = azure("out4", &["--provider=bedrock"], &env);
    assert_eq!(run.status.code(), Some(23), "{}", stderr(&run));
    // A model Azure does not serve is named.
    let run = run_llm(
        &server,
        tmp.path(),
        "out5",
        "example_nlp__nlp_claude_sonnet45",
        &["--provider=azure"],
    );
    assert_stops(&run, 23, "does not support the 'azure' provider");
}

#[test]
fn the_covid_studys_gpt_tasks_ask_azure_and_write_their_older_rows() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[
            (
                "DocumentReference",
                "1",
                "Cough and fever since Monday.  \nNo headache",
            ),
            ("DiagnosticReport", "2", "Sore throat."),
        ],
    );
    let endpoint = format!("http://{}", server.addr);
    let env = [
        ("AZURE_OPENAI_ENDPOINT", Some(endpoint.as_str())),
        ("AZURE_OPENAI_API_KEY", Some("secret-key")),
    ];
    let task = "covid_symptom__nlp_results_gpt35";
    let run = run_nlp_with(tmp.path(), "out", task, &["--provider=azure"], &env);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));

    // GPT-3.5 takes no schema: a JSON object is asked for, the keys listed in the prompt.
    let seen = server.requests();
    let chat: Vec<Value> = seen
        .iter()
        .filter(|r| r.path.contains("/chat/completions"))
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert!(seen.iter().any(|r| r.path
        == "/openai/deployments/gpt-35-turbo-0125/chat/completions?api-version=2024-10-21"));
    assert_eq!(chat.len(), 2);
    let request = &chat[0];
    assert_eq!(request["response_format"], json!({"type": "json_object"}));
    assert_eq!(
        request["messages"][0]["content"],
        "You are a helpful assistant."
    );
    let user = request["messages"][1]["content"].as_str().unwrap();
    assert!(user.starts_with("### Instructions ###\n"), "{user}");
    assert!(user.contains("\"Sore throat\": boolean}"), "{user}");
    // The note's text with trailing whitespace removed from every line, as upstream sends it.
    assert!(
        chat.iter().any(|r| r["messages"][1]["content"]
            .as_str()
            .unwrap()
            .ends_with("### Text ###\nCough and fever since Monday.\nNo headache")),
        "{chat:?}"
    );

    // Rows in the older format: the note's id twice, bare encounter and subject ids, and the
    // answer's aliased keys stored under the field names.
    let rows = read_table(
        &tmp.path().join("out/covid_symptom/nlp_results_gpt35_v3"),
        "id",
    );
    assert_eq!(rows.len(), 2, "{rows:?}");
    let (docref_id, docref) = rows
        .iter()
        .find(|(id, _)| !id.starts_with("DiagnosticReport/"))
        .unwrap();
    assert_eq!(docref["docref_id"], json!(docref_id));
    assert_eq!(docref["task_version"], 3);
    assert_eq!(docref["system_fingerprint"], "fp_test");
    assert!(!docref["encounter_id"].as_str().unwrap().contains('/'));
    assert!(!docref["subject_id"].as_str().unwrap().contains('/'));
    let symptoms = docref["symptoms"].as_object().unwrap();
    let names: Vec<&str> = symptoms.keys().map(String::as_str).collect();
    assert_eq!(names.len(), 11);
    assert_eq!(names[0], "congestion_or_runny_nose");
    assert_eq!(symptoms["cough"], true);
    assert_eq!(symptoms["fever_or_chills"], true);
    assert_eq!(
        symptoms["headache"], true,
        "the fake model reads words, not negations"
    );
    assert_eq!(symptoms["diarrhea"], false);
    // A DiagnosticReport keeps its type in `id`, as upstream strips only DocumentReference/.
    let (report_id, report) = rows
        .iter()
        .find(|(id, _)| id.starts_with("DiagnosticReport/"))
        .unwrap();
    assert_eq!(report["docref_id"], json!(report_id));
    assert_eq!(report["symptoms"]["sore_throat"], true);
    assert_eq!(report["symptoms"]["cough"], false);

    // GPT-4 takes the strict schema, whose properties are the aliases; into Delta Lake.
    let run = run_nlp_with(
        tmp.path(),
        "delta",
        "covid_symptom__nlp_results_gpt4",
        &["--provider=azure", "--output-format=deltalake"],
        &env,
    );
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let request: Value = serde_json::from_slice(&server.requests().last().unwrap().body).unwrap();
    let properties = &request["response_format"]["json_schema"]["schema"]["properties"];
    assert!(
        properties["Congestion or runny nose"].is_object(),
        "{request}"
    );
    let rows =
        crate::support::read_delta_rows(&tmp.path().join("delta/covid_symptom__nlp_results_gpt4"));
    assert_eq!(rows.len(), 2, "{rows:?}");
    for row in rows {
        assert_eq!(row["symptoms"]["congestion_or_runny_nose"], true, "{row}");
        assert_eq!(row["task_version"], 3);
    }
}

#[test]
fn batch_mode_sends_uncached_notes_as_an_azure_batch_and_resumes_an_unfinished_one() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    let texts = ["Patient is 45 years old", "the model is overloaded today"];
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", texts[0]),
            ("DocumentReference", "2", texts[0]),
            ("DiagnosticReport", "3", texts[1]),
        ],
    );
    let endpoint = format!("http://{}", server.addr);
    let env = [
        ("AZURE_OPENAI_ENDPOINT", Some(endpoint.as_str())),
        ("AZURE_OPENAI_API_KEY", Some("secret-key")),
        ("CUMULUS_ETL_BATCH_POLL_SECONDS", Some("0.05")),
    ];
    let task = "example_nlp__nlp_gpt4o";
    let batch = ["--provider=azure", "--batch"];
    let run = run_nlp_with(tmp.path(), "out", task, &batch, &env);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("Started batch batch_0 of 2 requests."),
        "{err}"
    );
    assert!(err.contains("the model is overloaded"), "{err}");

    // One file of the two texts (the repeated one once), as upstream writes batch rows.
    let seen = server.requests();
    let paths: Vec<&str> = seen
        .iter()
        .map(|r| r.path.split('?').next().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/openai/models",
            "/openai/files",
            "/openai/batches",
            "/openai/batches/batch_0",
            "/openai/batches/batch_0",
            // The errors (file-2) are read first, then the answers (file-1).
            "/openai/files/file-2/content",
            "/openai/files/file-1/content",
            "/openai/deployments/gpt-4o/chat/completions",
        ]
    );
    assert!(
        seen[1]
            .content_type
            .starts_with("multipart/form-data; boundary=")
    );
    let uploaded = server.state.files.lock().unwrap()[0].clone();
    let rows: Vec<Value> = String::from_utf8(uploaded)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    let sum = |t: &str| hex::encode(Sha256::digest(t.as_bytes()));
    let mut ids: Vec<&str> = rows
        .iter()
        .map(|r| r["custom_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = [sum(texts[0]), sum(texts[1])];
    expected.sort();
    assert_eq!(ids, expected);
    let row = rows
        .iter()
        .find(|r| r["custom_id"] == sum(texts[0]))
        .unwrap();
    assert_eq!(row["method"], "POST");
    assert_eq!(row["url"], "/v1/chat/completions");
    let body = row["body"].as_object().unwrap();
    let keys: Vec<&str> = body.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "model",
            "messages",
            "seed",
            "temperature",
            "timeout",
            "response_format"
        ]
    );
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["timeout"], 120);
    assert_eq!(body["response_format"]["json_schema"]["strict"], true);
    assert_eq!(body["messages"][1]["content"], texts[0]);
    let created: Value = serde_json::from_slice(&seen[2].body).unwrap();
    assert_eq!(
        created,
        json!({"completion_window": "24h", "endpoint": "/v1/chat/completions",
               "input_file_id": "file-0"})
    );
    // The failed request was asked online; every note has its row and its cached answer.
    let rows = read_table(&tmp.path().join("out/example_nlp/nlp_gpt4o_v1"), "note_ref");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let cache = tmp.path().join("phi/nlp-cache/example_nlp__nlp_gpt4o_v1");
    for text in texts {
        let s = sum(text);
        assert!(
            cache
                .join(&s[..4])
                .join(format!("sha256-{s}.cache"))
                .exists()
        );
    }
    let metadata: Value =
        serde_json::from_slice(&std::fs::read(cache.join("metadata.json")).unwrap()).unwrap();
    assert_eq!(metadata, json!({"batches-azure": []}));

    // An interrupted run left a batch behind: the next run waits for it first, and batches
    // only what it did not answer.
    std::fs::remove_dir_all(&cache).unwrap();
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join("metadata.json"),
        json!({"batches-azure": ["batch_0"]}).to_string(),
    )
    .unwrap();
    let run = run_nlp_with(tmp.path(), "out2", task, &batch, &env);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let err = stderr(&run);
    assert!(
        err.contains("Resuming 1 batch an earlier run started."),
        "{err}"
    );
    assert!(err.contains("Started batch batch_1 of 1 request."), "{err}");
    assert_eq!(
        read_table(
            &tmp.path().join("out2/example_nlp/nlp_gpt4o_v1"),
            "note_ref"
        )
        .len(),
        3
    );

    // A model Azure does not batch, or a provider without batches, stops the run.
    let run = run_nlp_with(
        tmp.path(),
        "out3",
        "covid_symptom__nlp_results_gpt4",
        &batch,
        &env,
    );
    assert_stops(&run, 53, "Model gpt-4 does not support batching.");
}

#[test]
fn notes_are_selected_by_a_cohort_of_original_or_anonymous_ids() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", "first note"),
            ("DocumentReference", "2", "second note"),
            ("DiagnosticReport", "3", "third note"),
        ],
    );
    let csv = tmp.path().join("cohort.csv");
    std::fs::write(&csv, "DocRef_ID,comment\n1,original id\n").unwrap();
    let select = format!("--select-by-csv={}", csv.display());
    let run = run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson", &select],
    );
    let rows = example_rows(tmp.path(), "out");
    assert_eq!(rows.len(), 1, "{rows:?}");
    let anonymous = rows.keys().next().unwrap().clone();
    assert!(anonymous.starts_with("DocumentReference/") && !anonymous.ends_with("/1"));
    assert!(stderr(&run).contains("2 left out by"), "{}", stderr(&run));

    // The same note by its anonymous reference; a patient cohort picks a patient's notes.
    let anon_csv = tmp.path().join("anon.csv");
    std::fs::write(&anon_csv, format!("note_ref\n{anonymous}\n")).unwrap();
    let picked = cohort_run(
        &server,
        tmp.path(),
        "out2",
        "--select-by-anon-csv",
        &anon_csv,
    );
    assert_eq!(picked, [anonymous]);
    std::fs::write(&csv, "patient_id\np3\n").unwrap();
    let picked = cohort_run(&server, tmp.path(), "out3", "--select-by-csv", &csv);
    assert_eq!(picked.len(), 1);
    assert!(picked[0].starts_with("DiagnosticReport/"), "{picked:?}");

    // Both kinds at once, or a file without id columns, stop the run.
    let both = [
        format!("--select-by-csv={}", csv.display()),
        format!("--select-by-anon-csv={}", anon_csv.display()),
    ];
    let run = run_llm(&server, tmp.path(), "out4", TASK, &[&both[0], &both[1]]);
    assert_eq!(run.status.code(), Some(47), "{}", stderr(&run));
    std::fs::write(&csv, "name\nx\n").unwrap();
    let run = run_llm(&server, tmp.path(), "out5", TASK, &[&both[0]]);
    assert_stops(&run, 48, "No patient or note IDs found in CSV file");
}

#[test]
fn notes_are_selected_by_an_athena_table_of_anonymous_ids() {
    // The test's server answers Athena's JSON API too (moto's Athena does not speak the
    // protocol its own botocore now uses).
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", "first note"),
            ("DocumentReference", "2", "second note"),
            ("DocumentReference", "3", "third note"),
        ],
    );
    // The anonymous references of notes 1 and 3, from a run that selects them by original id.
    let csv = tmp.path().join("cohort.csv");
    std::fs::write(&csv, "docref_id\n1\n3\n").unwrap();
    let picked = cohort_run(&server, tmp.path(), "out", "--select-by-csv", &csv);
    assert_eq!(picked.len(), 2);
    let endpoint = format!("http://{}", server.addr);
    let llm_url = server.llm_url();
    let env = [
        ("CUMULUS_GPT_OSS_120B_URL", Some(llm_url.as_str())),
        ("AWS_ENDPOINT_URL_ATHENA", Some(endpoint.as_str())),
        ("AWS_ACCESS_KEY_ID", Some("testing")),
        ("AWS_SECRET_ACCESS_KEY", Some("testing")),
        ("AWS_REGION", Some("us-west-2")),
    ];
    let run = |out: &str, extra: &[&str]| run_nlp_with(tmp.path(), out, TASK, extra, &env);
    let queue = |results: Vec<Vec<Vec<&str>>>| {
        let owned = results
            .into_iter()
            .map(|rows| {
                rows.into_iter()
                    .map(|row| row.into_iter().map(str::to_string).collect())
                    .collect()
            })
            .collect();
        *server.state.athena_results.lock().unwrap() = owned;
    };
    // The count, then the rows (the column names first; three rows: two pages).
    queue(vec![
        vec![vec!["_col0"], vec!["2"]],
        vec![
            vec!["note_ref", "reason"],
            vec![&picked[0], "in the cohort"],
            vec![&picked[1], "also"],
        ],
    ]);
    let selected = run(
        "athena",
        &["--select-by-athena-table=cohort", "--athena-database=study"],
    );
    assert_eq!(selected.status.code(), Some(0), "{}", stderr(&selected));
    let rows = read_table(
        &tmp.path().join("athena/example_nlp/nlp_gpt_oss_120b_v1"),
        "note_ref",
    );
    assert_eq!(rows.into_keys().collect::<Vec<_>>(), picked);
    let athena: Vec<Seen> = server
        .requests()
        .into_iter()
        .filter(|r| !r.target.is_empty())
        .collect();
    let targets: Vec<&str> = athena.iter().map(|r| r.target.as_str()).collect();
    let query = [
        "AmazonAthena.StartQueryExecution",
        "AmazonAthena.GetQueryExecution",
        "AmazonAthena.GetQueryExecution",
        "AmazonAthena.GetQueryResults",
    ];
    let mut expected = query.to_vec();
    expected.extend(query);
    expected.push("AmazonAthena.GetQueryResults");
    assert_eq!(targets, expected);
    let start: Value = serde_json::from_slice(&athena[0].body).unwrap();
    assert_eq!(
        start,
        // No workgroup with an output folder (it would conflict): Athena uses its default.
        json!({"QueryString": "SELECT count(*) FROM \"cohort\"",
               "QueryExecutionContext": {"Database": "study"}})
    );
    let start: Value = serde_json::from_slice(&athena[4].body).unwrap();
    assert_eq!(start["QueryString"], "SELECT * FROM \"cohort\"");
    assert!(
        athena[0]
            .authorization
            .contains("/us-west-2/athena/aws4_request"),
        "{}",
        athena[0].authorization
    );

    // A table of more than 50,000 rows needs --allow-large-selection.
    queue(vec![vec![vec!["_col0"], vec!["60000"]]]);
    let large = run("large", &["--select-by-athena-table=study.cohort"]);
    assert_stops(
        &large,
        44,
        "Athena cohort in 'cohort' is very large (60,000 rows).",
    );
    queue(vec![
        vec![vec!["_col0"], vec!["60000"]],
        vec![vec!["note_ref"], vec![&picked[0]]],
    ]);
    let allowed = run(
        "allowed",
        &[
            "--select-by-athena-table=study.cohort",
            "--allow-large-selection",
        ],
    );
    assert_eq!(allowed.status.code(), Some(0), "{}", stderr(&allowed));

    // No database, a name Athena would not take as is, or two cohorts at once stop the run.
    let run_stops = |extra: &[&str], code: i32, says: &str| {
        assert_stops(&run("stopped", extra), code, says);
    };
    run_stops(
        &["--select-by-athena-table=cohort"],
        46,
        "You must provide an Athena database with --athena-database.",
    );
    run_stops(
        &["--select-by-athena-table=study.co;hort"],
        45,
        "Athena table name 'co;hort' has invalid characters.",
    );
    let both = format!("--select-by-anon-csv={}", csv.display());
    run_stops(
        &["--select-by-athena-table=study.cohort", &both],
        47,
        "Multiple CSV selection arguments provided",
    );
}

#[test]
fn athena_mode_writes_into_the_workgroups_results_bucket_and_registers_the_table() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let s3 = crate::s3_server::S3Server::start();
    s3.create_bucket("athena-results");
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[("DocumentReference", "1", "Patient is 45 years old")],
    );
    let workgroup = |encryption: Value| {
        *server.state.athena_workgroup.lock().unwrap() = json!({"Name": "cumulus",
            "Configuration": {"ResultConfiguration": {
                "OutputLocation": "s3://athena-results/query-results/",
                "EncryptionConfiguration": encryption}}});
    };
    workgroup(json!({"EncryptionOption": "SSE_S3"}));
    let athena = format!("http://{}", server.addr);
    let run = |phi: &str, extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
            .arg("nlp")
            .args([
                tmp.path().join("input").to_str().unwrap(),
                tmp.path().join(phi).to_str().unwrap(),
                &format!("--task={TASK}"),
            ])
            .args(extra)
            .env("CUMULUS_GPT_OSS_120B_URL", server.llm_url())
            .env("AWS_ENDPOINT_URL_ATHENA", &athena)
            .env("AWS_ENDPOINT_URL_S3", s3.endpoint())
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_REGION", "us-east-1")
            .output()
            .unwrap()
    };
    let athena_args = ["--athena-workgroup=cumulus", "--athena-database=study"];
    let mode = |format: &'static str| {
        let mut args = athena_args.to_vec();
        args.push(format);
        args
    };
    let done = run("phi", &mode("--output-format=ndjson"));
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));

    // The rows and the .ids list under the workgroup's results, tied to this PHI folder.
    let uploads = ObjectLocation::parse(
        "s3://athena-results/query-results/cumulus_user_uploads/study",
        &s3.settings(),
    )
    .unwrap();
    let keys: Vec<String> = uploads.list().unwrap().into_iter().map(|e| e.key).collect();
    assert!(keys.contains(&"codebook.id".to_string()), "{keys:?}");
    assert!(
        keys.contains(&"example_nlp/nlp_gpt_oss_120b_v1.ids".to_string()),
        "{keys:?}"
    );
    assert!(
        keys.iter()
            .any(|k| k.starts_with("example_nlp/nlp_gpt_oss_120b_v1/") && k.ends_with(".ndjson")),
        "{keys:?}"
    );
    // The table registered again: dropped, then created over the files.
    let queries: Vec<String> = server
        .state
        .athena_queries
        .lock()
        .unwrap()
        .iter()
        .map(|(sql, _)| sql.clone())
        .collect();
    assert_eq!(
        queries[0],
        "DROP TABLE IF EXISTS example_nlp__nlp_gpt_oss_120b"
    );
    let create = &queries[1];
    assert!(
        create.starts_with(
            "CREATE EXTERNAL TABLE example_nlp__nlp_gpt_oss_120b (\n    note_ref STRING, \
             encounter_ref STRING, subject_ref STRING, generated_on STRING, task_version INT, \
             system_fingerprint STRING, result STRUCT<"
        ),
        "{create}"
    );
    assert!(create.contains("spans: ARRAY<ARRAY<INT>>"), "{create}");
    assert!(
        create.ends_with(
            "ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'\nLOCATION \
             's3://athena-results/query-results/cumulus_user_uploads/study/example_nlp/\
             nlp_gpt_oss_120b_v1/'\n"
        ),
        "{create}"
    );

    // Parquet tables are declared as such; a second run skips the finished note.
    let done = run("phi", &mode("--output-format=parquet"));
    assert_eq!(done.status.code(), Some(0), "{}", stderr(&done));
    assert!(
        stderr(&done).contains("1 finished by an earlier run"),
        "{}",
        stderr(&done)
    );
    let queries = server.state.athena_queries.lock().unwrap().clone();
    let create = &queries.last().unwrap().0;
    assert!(
        create.contains("STORED AS PARQUET\nLOCATION")
            && create.ends_with("TBLPROPERTIES (\"parquet.compression\"=\"SNAPPY\")"),
        "{create}"
    );

    // Another PHI folder, an unencrypted workgroup, Delta Lake, a third folder or no database
    // stop the run.
    assert_stops(
        &run("other-phi", &mode("--output-format=ndjson")),
        41,
        "The Athena workgroup 'cumulus' is already associated with another PHI folder.",
    );
    assert_stops(
        &run("phi", &mode("--output-format=deltalake")),
        22,
        "You cannot use the deltalake output format with --athena-workgroup.",
    );
    let third = tmp.path().join("phi2");
    let mut args = athena_args.to_vec();
    args.insert(0, third.to_str().unwrap());
    assert_stops(
        &run("out", &args),
        22,
        "Both an output folder and an Athena workgroup were provided.",
    );
    assert_stops(
        &run("phi", &["--athena-workgroup=cumulus"]),
        23,
        "No Athena database provided.",
    );
    workgroup(Value::Null);
    assert_stops(
        &run("phi", &mode("--output-format=ndjson")),
        60,
        "The workgroup cumulus is not reporting an encrypted status.",
    );
}

/// The notes (`note_ref`) a run with the cohort `option=csv` wrote into `out`.
fn cohort_run(
    server: &FakeNlpServer,
    dir: &Path,
    out: &str,
    option: &str,
    csv: &Path,
) -> Vec<String> {
    let select = format!("{option}={}", csv.display());
    run_ok(server, dir, out, TASK, &["--output-format=ndjson", &select]);
    read_table(
        &dir.join(out).join("example_nlp/nlp_gpt_oss_120b_v1"),
        "note_ref",
    )
    .into_keys()
    .collect()
}

/// Asserts that `run` stopped with exit `code`, saying `says`.
fn assert_stops(run: &Output, code: i32, says: &str) {
    assert_eq!(run.status.code(), Some(code), "{}", stderr(run));
    assert!(stderr(run).contains(says), "{}", stderr(run));
}

#[test]
fn notes_with_the_same_text_in_flight_at_once_are_asked_once() {
    let server = FakeNlpServer::start(Duration::from_millis(400), Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[
            ("DocumentReference", "1", "the same text"),
            ("DocumentReference", "2", "the same text"),
            ("DiagnosticReport", "3", "the same text"),
            ("DocumentReference", "4", "another text"),
        ],
    );
    let run = run_ok(
        &server,
        tmp.path(),
        "out",
        TASK,
        &["--output-format=ndjson", "--nlp-concurrency=8"],
    );
    assert_eq!(
        chat_requests(&server).len(),
        2,
        "one request per distinct text"
    );
    assert_eq!(example_rows(tmp.path(), "out").len(), 4);
    let err = stderr(&run);
    assert!(err.contains("2 answers from the cache"), "{err}");
}

#[test]
fn the_bedrock_provider_asks_converse_signed_with_aws_credentials() {
    let server = FakeNlpServer::start(Duration::ZERO, Vec::new());
    let tmp = tempfile::tempdir().unwrap();
    write_notes(
        tmp.path(),
        &[("DocumentReference", "1", "Patient is 45 years old")],
    );
    let endpoint = format!("http://{}", server.addr);
    // An AWS profile file, used only where the environment names it.
    let profiles = tmp.path().join("aws-config");
    std::fs::write(
        &profiles,
        "[profile site]\nregion = eu-west-1\naws_access_key_id = AKIDPROFILE\n\
         aws_secret_access_key = secret2\n\
         [profile tool]\nregion = eu-west-1\ncredential_process = printf '{\"Version\": 1, \
         \"AccessKeyId\": \"AKIDPROCESS\", \"SecretAccessKey\": \"s\", \
         \"SessionToken\": \"t\", \"Expiration\": \"2099-01-01T00:00:00Z\"}'\n\
         [profile analyst]\nregion = eu-west-1\nrole_arn = arn:aws:iam::123456789012:role/cumulus\n\
         source_profile = site\nrole_session_name = nlp\n\
         [profile hospital]\nregion = eu-west-1\nsso_session = hospital\n\
         sso_account_id = 123456789012\nsso_role_name = cumulus\n\
         [sso-session hospital]\nsso_start_url = https://hospital.awsapps.com/start\n\
         sso_region = us-east-2\n",
    )
    .unwrap();
    let missing = tmp.path().join("no-such-file");
    let profile_env = |profile: Option<&str>| {
        let config = profile.map_or(&missing, |_| &profiles);
        vec![
            ("AWS_PROFILE", profile.map(str::to_string)),
            (
                "AWS_CONFIG_FILE",
                Some(config.to_str().unwrap().to_string()),
            ),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                Some(missing.to_str().unwrap().to_string()),
            ),
        ]
    };
    let bedrock_with = |out: &str, task: &str, region: Option<&str>, profile: Option<&str>| {
        let keys = profile.is_none().then_some(("AKIDTEST", "secret"));
        let mut env: Vec<(&str, Option<String>)> = vec![
            ("AWS_ENDPOINT_URL", Some(endpoint.clone())),
            ("AWS_ACCESS_KEY_ID", keys.map(|k| k.0.to_string())),
            ("AWS_SECRET_ACCESS_KEY", keys.map(|k| k.1.to_string())),
            ("AWS_SESSION_TOKEN", None),
            ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", None),
            ("AWS_DEFAULT_REGION", None),
            ("AWS_REGION", region.map(str::to_string)),
        ];
        env.extend(profile_env(profile));
        let env: Vec<(&str, Option<&str>)> = env.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        run_nlp_with(tmp.path(), out, task, &["--provider=bedrock"], &env)
    };
    let bedrock =
        |out: &str, task: &str, region: Option<&str>| bedrock_with(out, task, region, None);
    // Claude on Bedrock: the tool with the task's schema, and cache points.
    let run = bedrock("out", "example_nlp__nlp_claude_sonnet45", Some("us-west-2"));
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let seen = server.requests();
    assert_eq!(seen.len(), 1, "no start-up check: {seen:?}");
    assert_eq!(
        seen[0].path,
        "/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse"
    );
    let auth = &seen[0].authorization;
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST/")
            && auth.contains("/us-west-2/bedrock/aws4_request")
            && auth.contains("Signature="),
        "{auth}"
    );
    let request: Value = serde_json::from_slice(&seen[0].body).unwrap();
    assert_eq!(request["inferenceConfig"], json!({"temperature": 0}));
    assert_eq!(
        request["system"][1],
        json!({"cachePoint": {"type": "default"}})
    );
    let tool = &request["toolConfig"]["tools"][0]["toolSpec"];
    assert_eq!(tool["name"], "to_json");
    // pydantic's schema, not the strict one: its fields keep their defaults.
    assert!(
        tool["inputSchema"]["json"]
            .to_string()
            .contains("\"default\""),
        "{tool}"
    );
    assert_eq!(
        request["messages"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .rsplit("\n\n")
            .next(),
        Some("Patient is 45 years old")
    );
    let rows = read_table(
        &tmp.path().join("out/example_nlp/nlp_claude_sonnet45_v1"),
        "note_ref",
    );
    let row = rows.values().next().unwrap();
    let expected = llm_answer(&tool["inputSchema"]["json"], "Patient is 45 years old");
    assert_eq!(
        row["result"]["has_mention"], expected["has_mention"],
        "{row}"
    );
    assert!(
        row.get("system_fingerprint").is_none(),
        "left out, as upstream: {row}"
    );
    let err = stderr(&run);
    assert!(err.contains("100 written to the cache"), "{err}");
    assert!(
        err.contains("Estimated cost (prices as of 2025-10-15): $"),
        "{err}"
    );
    // Llama 4 Scout takes no schema: the answer comes as JSON in the text.
    let run = bedrock("out2", "example_nlp__nlp_llama4_scout", Some("us-east-1"));
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let request: Value = serde_json::from_slice(&server.requests()[1].body).unwrap();
    assert!(request.get("toolConfig").is_none(), "{request}");
    assert_eq!(request["system"].as_array().unwrap().len(), 1);
    // Without a region, the run stops before any note.
    let run = bedrock("out3", "example_nlp__nlp_claude_sonnet45", None);
    assert_stops(&run, 23, "Set AWS_REGION");
    // The region and keys of the AWS profile, as the S3 store reads them (the note asked
    // again: its cached answer removed).
    std::fs::remove_dir_all(tmp.path().join("phi/nlp-cache")).unwrap();
    let before = server.requests().len();
    let run = bedrock_with(
        "out4",
        "example_nlp__nlp_claude_sonnet45",
        None,
        Some("site"),
    );
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert_eq!(server.requests().len(), before + 1);
    let auth = server.requests().last().unwrap().authorization.clone();
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDPROFILE/")
            && auth.contains("/eu-west-1/bedrock/aws4_request"),
        "{auth}"
    );
    // A profile whose keys a credential_process prints, and one that assumes a role with the
    // static profile's keys (STS: moto's).
    let home = tmp.path().join("home");
    let signed_with = |out: &str, profile: &str, sts: Option<&str>| {
        std::fs::remove_dir_all(tmp.path().join("phi/nlp-cache")).unwrap();
        let mut env: Vec<(&str, Option<String>)> = vec![
            ("AWS_ENDPOINT_URL", Some(endpoint.clone())),
            ("AWS_ENDPOINT_URL_STS", sts.map(str::to_string)),
            ("AWS_ENDPOINT_URL_SSO", Some(endpoint.clone())),
            ("HOME", Some(home.to_str().unwrap().to_string())),
            ("AWS_ACCESS_KEY_ID", None),
            ("AWS_SECRET_ACCESS_KEY", None),
            ("AWS_SESSION_TOKEN", None),
            ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", None),
            ("AWS_DEFAULT_REGION", None),
            ("AWS_REGION", None),
        ];
        env.extend(profile_env(Some(profile)));
        let env: Vec<(&str, Option<&str>)> = env.iter().map(|(k, v)| (*k, v.as_deref())).collect();
        let run = run_nlp_with(
            tmp.path(),
            out,
            "example_nlp__nlp_claude_sonnet45",
            &["--provider=bedrock"],
            &env,
        );
        assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
        server.requests().last().unwrap().authorization.clone()
    };
    let auth = signed_with("out5", "tool", None);
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDPROCESS/"),
        "{auth}"
    );
    let sts = crate::s3_server::S3Server::start();
    let auth = signed_with("out6", "analyst", Some(&sts.endpoint()));
    // moto's STS hands out temporary keys (ASIA...), not the source profile's.
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=ASIA"),
        "{auth}"
    );
    // An IAM Identity Center profile: the role's keys from the portal (the test's server) for
    // the token `aws sso login` cached under the SHA-1 of the session's name.
    let cache = home.join(".aws/sso/cache");
    std::fs::create_dir_all(&cache).unwrap();
    std::fs::write(
        cache.join("2b2d005e88ce14a4112785bb266b2c0c16be7eb4.json"),
        json!({"accessToken": "sso-token", "expiresAt": "2099-01-01T00:00:00Z"}).to_string(),
    )
    .unwrap();
    let auth = signed_with("out7", "hospital", None);
    assert!(
        auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDSSO/"),
        "{auth}"
    );
}
