//! Whole runs into Delta Lake: the bundled Synthea sample against an NDJSON run, a second
//! identical run, a run killed midway and started again, `init`, `convert`, and a read-back with
//! the Python `deltalake` package.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    delta_live_files, phi_with_salt, read_delta, read_table, run_etl, stderr, synthea,
};

/// The key column of a table, or None for `etl__completion` (compared by count).
fn key_of(table: &str) -> Option<&'static str> {
    match table {
        "etl__completion" => None,
        "etl__completion_encounters" => Some("encounter_id"),
        _ => Some("id"),
    }
}

fn table_dirs(root: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && !p.ends_with("JobConfig"))
        .collect();
    dirs.sort();
    dirs
}

fn name(dir: &Path) -> String {
    dir.file_name().unwrap().to_string_lossy().into_owned()
}

/// Every keyed Delta table of an output folder, read back.
fn delta_tables(root: &Path) -> BTreeMap<String, BTreeMap<String, Value>> {
    table_dirs(root)
        .iter()
        .filter_map(|d| key_of(&name(d)).map(|k| (name(d), read_delta(d, k))))
        .collect()
}

fn etl_args<'a>(input: &'a Path, out: &'a Path, phi: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = extra.to_vec();
    args.extend([
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    args
}

#[test]
fn synthea_into_delta_matches_ndjson_and_a_second_run_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let (nd, dl) = (tmp.path().join("ndjson"), tmp.path().join("delta"));
    let run = run_etl(&etl_args(
        &synthea(),
        &nd,
        &phi,
        &["--output-format", "ndjson"],
    ));
    assert!(run.status.success(), "{}", stderr(&run));
    // Delta is the default output format.
    let run = run_etl(&etl_args(&synthea(), &dl, &phi, &["--batch-size", "400"]));
    assert!(run.status.success(), "{}", stderr(&run));

    let first = delta_tables(&dl);
    assert_eq!(first.len() + 1, table_dirs(&nd).len());
    for dir in table_dirs(&nd) {
        let table = name(&dir);
        let Some(key) = key_of(&table) else { continue };
        let expected = read_table(&dir, key);
        let got = &first[&table];
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            expected.keys().collect::<Vec<_>>(),
            "{table}"
        );
        // Every top-level primitive value made it through Arrow and Parquet unchanged.
        for (k, row) in &expected {
            for (field, value) in row.as_object().unwrap() {
                if !value.is_object() && !value.is_array() {
                    assert_eq!(&got[k][field], value, "{table} {k} {field}");
                }
            }
        }
    }
    let patient = dl.join("patient");
    let manifest = std::fs::read_to_string(patient.join("_symlink_format_manifest/manifest"))
        .expect("symlink manifest");
    assert_eq!(manifest.lines().count(), delta_live_files(&patient).len());
    assert!(patient.join("_delta_log/_last_checkpoint").exists());
    let completion_rows = || crate::support::read_delta_rows(&dl.join("etl__completion")).len();
    // One completion row per task (every table but the etl__ ones), committed together.
    let mut logged: Vec<String> = crate::support::read_delta_rows(&dl.join("etl__completion"))
        .iter()
        .map(|row| row["table_name"].as_str().unwrap().to_string())
        .collect();
    logged.sort();
    let task_tables: Vec<&String> = first.keys().filter(|t| !t.starts_with("etl__")).collect();
    assert_eq!(logged.iter().collect::<Vec<_>>(), task_tables);
    assert_eq!(delta_live_files(&dl.join("etl__completion")).len(), 1);
    let tasks = completion_rows();

    // The same export again: every table keeps its rows and their content.
    let run = run_etl(&etl_args(&synthea(), &dl, &phi, &["--batch-size", "400"]));
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(delta_tables(&dl), first);
    // etl__completion logs each run (its key includes the run time), as upstream.
    assert_eq!(completion_rows(), 2 * tasks);
}

#[test]
fn a_run_killed_midway_and_started_again_gives_the_same_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let (clean, killed) = (tmp.path().join("clean"), tmp.path().join("killed"));
    let extra = [
        "--batch-size",
        "150",
        "--memory",
        "16MiB",
        "--no-table-optimization",
    ];

    let run = run_etl(&etl_args(&synthea(), &clean, &phi, &extra));
    assert!(run.status.success(), "{}", stderr(&run));

    // Kill the second run once a few batches of some table are committed.
    let mut child = Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .args(etl_args(&synthea(), &killed, &phi, &extra))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let commit = "_delta_log/00000000000000000003.json";
    loop {
        let committed =
            killed.is_dir() && table_dirs(&killed).iter().any(|d| d.join(commit).exists());
        if committed || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );

    let run = run_etl(&etl_args(&synthea(), &killed, &phi, &extra));
    assert!(run.status.success(), "{}", stderr(&run));
    // Same keys and the same content in every table, no key twice (read_delta checks).
    assert_eq!(delta_tables(&killed), delta_tables(&clean));
}

#[test]
fn init_creates_every_default_table_and_convert_loads_an_ndjson_output() {
    let tmp = tempfile::tempdir().unwrap();
    let init = tmp.path().join("init");
    let run = run_etl(&["init", init.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    for table in [
        "patient",
        "encounter",
        "etl__completion",
        "etl__completion_encounters",
    ] {
        let dir = init.join(table);
        assert!(
            dir.join("_delta_log/00000000000000000000.json").exists(),
            "{table}"
        );
        assert!(read_delta(&dir, key_of(table).unwrap_or("table_name")).is_empty());
    }
    assert!(init.join("JobConfig").is_dir());

    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let nd = tmp.path().join("ndjson");
    let run = run_etl(&etl_args(
        &synthea(),
        &nd,
        &phi,
        &["--output-format", "ndjson", "--batch-size", "500"],
    ));
    assert!(run.status.success(), "{}", stderr(&run));
    // A deletion recorded in the NDJSON output is replayed by convert.
    let patients = read_table(&nd.join("patient"), "id");
    let gone = patients.keys().next().unwrap().clone();
    std::fs::write(
        nd.join("patient/patient.meta"),
        serde_json::json!({"deleted": [gone]}).to_string(),
    )
    .unwrap();

    let target = tmp.path().join("converted");
    let run = run_etl(&["convert", nd.to_str().unwrap(), target.to_str().unwrap()]);
    assert!(run.status.success(), "{}", stderr(&run));
    let converted = read_delta(&target.join("patient"), "id");
    assert_eq!(converted.len(), patients.len() - 1);
    assert!(!converted.contains_key(&gone));
    let encounters = read_table(&nd.join("encounter"), "id");
    assert_eq!(
        read_delta(&target.join("encounter"), "id").len(),
        encounters.len()
    );
    assert!(target.join("JobConfig").read_dir().unwrap().count() > 0);

    let run = run_etl(&[
        "convert",
        tmp.path().join("nothing").to_str().unwrap(),
        target.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(54), "{}", stderr(&run));
}

#[test]
fn python_deltalake_reads_the_tables_with_the_right_row_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let dl = tmp.path().join("delta");
    let run = run_etl(&etl_args(&synthea(), &dl, &phi, &[]));
    assert!(run.status.success(), "{}", stderr(&run));
    let script = r#"
import json, os, sys, deltalake
out = {}
for path in sys.argv[1:]:
    table = deltalake.DeltaTable(path)
    data = table.to_pyarrow_table()
    key = "id" if "id" in data.column_names else data.column_names[0]
    out[path.rsplit("/", 1)[-1]] = [data.num_rows, len(set(data.column(key).to_pylist()))]
print(json.dumps(out), flush=True)
os._exit(0)  # skip interpreter teardown while the reader's threads may still run
"#;
    let dirs = table_dirs(&dl);
    let args: Vec<&str> = dirs.iter().map(|d| d.to_str().unwrap()).collect();
    let out = crate::readers::run_script(script, &args);
    let counts: BTreeMap<String, (usize, usize)> = serde_json::from_value(out).unwrap();
    assert_eq!(counts.len(), dirs.len());
    for dir in &dirs {
        let table = name(dir);
        let rows = crate::support::read_delta_rows(dir).len();
        let (python_rows, distinct_keys) = counts[&table];
        assert_eq!(python_rows, rows, "{table}");
        if key_of(&table) == Some("id") {
            assert_eq!(distinct_keys, rows, "{table}: an id is there twice");
        }
    }
    let input = std::fs::read_to_string(synthea().join("Encounter.000.ndjson")).unwrap();
    assert_eq!(counts["encounter"].0, input.lines().count());
}

#[test]
fn only_tables_with_many_files_are_compacted() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let out = tmp.path().join("delta");
    // 50-row batches: encounter (1,215 rows) gets 25 files, immunization (161 rows) 4.
    let extra = ["--batch-size", "50", "--task", "encounter,immunization"];
    let run = run_etl(&etl_args(&synthea(), &out, &phi, &extra));
    assert!(run.status.success(), "{}", stderr(&run));
    let live = |table: &str| crate::support::delta_live_files(&out.join(table)).len();
    let min = cumulus_etl::output::delta::COMPACTION_MIN_FILES;
    assert_eq!(live("encounter"), 1, "compacted into one file");
    let few = live("immunization");
    assert!((2..min).contains(&few), "left as written: {few} files");
    assert_eq!(
        crate::support::read_delta_rows(&out.join("immunization")).len(),
        161
    );
    // The compacted table holds the rows the batch files held, value for value.
    let plain = tmp.path().join("plain");
    let extra = [&extra[..], &["--no-table-optimization"]].concat();
    let run = run_etl(&etl_args(&synthea(), &plain, &phi, &extra));
    assert!(run.status.success(), "{}", stderr(&run));
    let plain_files = crate::support::delta_live_files(&plain.join("encounter"));
    assert_eq!(plain_files.len(), 25);
    let compacted = crate::support::read_delta(&out.join("encounter"), "id");
    assert_eq!(compacted.len(), 1215);
    assert_eq!(
        compacted,
        crate::support::read_delta(&plain.join("encounter"), "id")
    );
    // One OPTIMIZE commit, which changes no data: it removes the 25 batch files and adds one.
    let log = crate::support::delta_log_actions(&out.join("encounter"));
    let optimize: Vec<_> = log
        .iter()
        .filter(|c| c.iter().any(|a| a["commitInfo"]["operation"] == "OPTIMIZE"))
        .collect();
    assert_eq!(optimize.len(), 1);
    let info = optimize[0]
        .iter()
        .find(|a| a.get("commitInfo").is_some())
        .unwrap();
    let metrics = &info["commitInfo"]["operationMetrics"];
    assert_eq!(
        (&metrics["numFilesAdded"], &metrics["numFilesRemoved"]),
        (&1.into(), &25.into())
    );
    let (adds, removes): (Vec<_>, Vec<_>) = optimize[0]
        .iter()
        .filter(|a| a.get("add").is_some() || a.get("remove").is_some())
        .partition(|a| a.get("add").is_some());
    assert_eq!((adds.len(), removes.len()), (1, 25));
    for action in adds
        .iter()
        .map(|a| &a["add"])
        .chain(removes.iter().map(|a| &a["remove"]))
    {
        assert_eq!(action["dataChange"], false, "{action}");
    }
    assert!(
        adds[0]["add"]["stats"]
            .as_str()
            .unwrap()
            .contains("\"numRecords\":1215")
    );
}
