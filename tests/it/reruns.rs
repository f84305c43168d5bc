//! Re-runs into Delta tables with the row index (`src/rerun`, `src/etl/rerun.rs`): an
//! unchanged export leaves every line out and adds no data file, a changed one (rows changed,
//! added, deleted, a key twice) leaves the tables of a clean load, and an index that another
//! writer made stale is not used. Python `deltalake` and DuckDB read the tables with the index
//! beside them, and VACUUM leaves it alone.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::readers::{read_both, run_script};
use crate::support::{delta_live_files, keyed_tables, phi_with_salt, run_etl, stderr, synthea};

const INDEX: &str = "_cumulus_etl/row-index";

/// The live data files of every resource table.
fn data_files(root: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    std::fs::read_dir(root)
        .unwrap()
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            !name.starts_with("etl__") && name != "JobConfig"
        })
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            (name, delta_live_files(&e.path()))
        })
        .collect()
}

fn etl(input: &Path, out: &Path, phi: &Path) -> String {
    etl_with(input, out, phi, &[])
}

fn etl_with(input: &Path, out: &Path, phi: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--batch-size",
        "400",
    ];
    args.extend(extra);
    let run = run_etl(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    stderr(&run)
}

/// The line `etl` printed for `table`'s pre-scan: (unchanged, of).
fn unchanged(log: &str, table: &str) -> Option<(u64, u64)> {
    let line = log
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{table}: ")) && l.contains("unchanged"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    Some((words[1].parse().unwrap(), words[3].parse().unwrap()))
}

/// A copy of the bundled sample.
fn copy_of_sample(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(synthea()).unwrap().flatten() {
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn lines_of(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn write_lines(file: &Path, rows: &[Value]) {
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(file, text).unwrap();
}

#[test]
fn an_unchanged_rerun_leaves_every_line_out_and_adds_no_data_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (phi, out) = (tmp.path().join("phi"), tmp.path().join("out"));
    phi_with_salt(&phi, "1234");
    let first_log = etl(&synthea(), &out, &phi);
    assert!(unchanged(&first_log, "patient").is_none(), "{first_log}");
    let (tables, files) = (keyed_tables(&out), data_files(&out));
    for table in files.keys() {
        assert!(
            out.join(table).join(INDEX).is_file(),
            "{table} has no index"
        );
    }

    let log = etl(&synthea(), &out, &phi);
    for (table, rows) in &tables {
        assert_eq!(
            unchanged(&log, table),
            Some((rows.len() as u64, rows.len() as u64)),
            "{table}: {log}"
        );
    }
    assert_eq!(data_files(&out), files);
    assert_eq!(keyed_tables(&out), tables);
    let summary = log.lines().find(|l| l.starts_with("condition ")).unwrap();
    let n = tables["condition"].len().to_string();
    assert_eq!(
        summary.split_whitespace().collect::<Vec<_>>(),
        ["condition", &n, &n]
    );

    // The same export under another group: the encounters are unchanged, but they get this
    // group's completion rows.
    let log = etl_with(&synthea(), &out, &phi, &["--export-group", "another"]);
    let encounters = tables["encounter"].len() as u64;
    assert_eq!(unchanged(&log, "encounter"), Some((encounters, encounters)));
    assert_eq!(
        unchanged(&log, "etl__completion_encounters"),
        Some((0, encounters)),
        "{log}"
    );
    let completion = crate::support::read_delta_rows(&out.join("etl__completion_encounters"));
    let another = completion
        .iter()
        .filter(|r| r["group_name"] == "another")
        .count();
    assert_eq!(
        (completion.len(), another),
        (2 * encounters as usize, encounters as usize)
    );
    let log = etl_with(&synthea(), &out, &phi, &["--export-group", "another"]);
    assert_eq!(
        unchanged(&log, "etl__completion_encounters"),
        Some((encounters, encounters)),
        "{log}"
    );
}

#[test]
fn a_changed_export_rerun_gives_the_tables_of_a_clean_load() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let (rerun, clean) = (tmp.path().join("rerun"), tmp.path().join("clean"));
    etl(&synthea(), &rerun, &phi);
    let before = keyed_tables(&rerun);

    // The next export: 2% of conditions changed, 1% deleted (listed in deleted/ and gone from
    // the files), one new; a procedure twice, the second time changed.
    let export = tmp.path().join("export");
    copy_of_sample(&export);
    let conditions = export.join("Condition.000.ndjson");
    let mut rows = lines_of(&conditions);
    let total = rows.len();
    let mut deleted = Vec::new();
    let mut kept = Vec::new();
    for (i, mut row) in rows.drain(..).enumerate() {
        match i % 100 {
            0 => deleted.push(row["id"].as_str().unwrap().to_string()),
            1 | 2 => {
                row["recordedDate"] = Value::from("2001-02-03");
                kept.push(row);
            }
            _ => kept.push(row),
        }
    }
    let mut new = kept[5].clone();
    new["id"] = Value::from("a-brand-new-condition");
    kept.push(new);
    write_lines(&conditions, &kept);
    let bundle = serde_json::json!({
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": deleted
            .iter()
            .map(|id| serde_json::json!({"request": {"method": "DELETE", "url": format!("Condition/{id}")}}))
            .collect::<Vec<_>>(),
    });
    std::fs::create_dir_all(export.join("deleted")).unwrap();
    write_lines(&export.join("deleted/Condition.ndjson"), &[bundle]);
    let procedures = export.join("Procedure.000.ndjson");
    let mut rows = lines_of(&procedures);
    let mut twice = rows[3].clone();
    twice["status"] = Value::from("entered-in-error");
    // Next to the first, so both are in one batch of the clean load, and the second wins.
    rows.insert(4, twice);
    let procedure_lines = rows.len() as u64;
    write_lines(&procedures, &rows);

    let log = etl(&export, &rerun, &phi);
    // Its MERGE and its DELETE named row journals (the restart of a run killed before its end
    // reads them).
    let merges: Vec<Value> = crate::support::delta_log_actions(&rerun.join("condition"))
        .into_iter()
        .flatten()
        .filter(|a| {
            ["MERGE", "DELETE"].contains(&a["commitInfo"]["operation"].as_str().unwrap_or(""))
        })
        .collect();
    assert_eq!(merges.len(), 2, "{merges:?}");
    assert!(
        merges
            .iter()
            .all(|m| m["commitInfo"]["cumulusEtlJournal"].is_string()),
        "{merges:?}"
    );
    let changed = 2 * total.div_ceil(100) as u64;
    let lines = kept.len() as u64;
    // Changed rows and the new one are processed; the rest are left out.
    let (left_out, of) = unchanged(&log, "condition").unwrap();
    assert_eq!(of, lines);
    assert!(left_out == lines - changed - 1, "{log}");
    // The new condition's key is in no row: the index lists every key of a table it made.
    assert!(log.contains("left out, 1 new ("), "{log}");
    assert_eq!(
        unchanged(&log, "procedure"),
        Some((procedure_lines - 2, procedure_lines)),
        "{log}"
    );
    etl(&export, &clean, &phi);
    let after = keyed_tables(&rerun);
    assert_eq!(after, keyed_tables(&clean));
    assert_ne!(after["condition"], before["condition"]);
    assert_eq!(
        after["condition"].len(),
        before["condition"].len() - deleted.len() + 1
    );

    // Once more: only the procedure met twice is processed again.
    let log = etl(&export, &rerun, &phi);
    assert_eq!(unchanged(&log, "condition"), Some((lines, lines)), "{log}");
    assert_eq!(
        unchanged(&log, "procedure"),
        Some((procedure_lines - 2, procedure_lines)),
        "{log}"
    );
    assert_eq!(keyed_tables(&rerun), after);
}

const VACUUM: &str = r#"
import json, os, sys
import deltalake
table = deltalake.DeltaTable(sys.argv[1])
# A dry run of a full VACUUM (every file not in the log): the files it would delete (deleting commits VACUUM START and END, which this
# deltalake refuses on clustered tables; delta-rs's own VACUUM, the tool's, plans the same).
deleted = table.vacuum(retention_hours=0, enforce_retention_duration=False, dry_run=True, full=True)
print(json.dumps(sorted(deleted)), flush=True)
os._exit(0)
"#;

/// Commits the removal of one of the table's data files, as another writer would delete its
/// rows; returns the file's path in the table.
fn remove_a_file_as_another_writer(table: &Path) -> String {
    let live = delta_live_files(table);
    let file = live[0]
        .strip_prefix(table)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let versions = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .count();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let commit = [
        serde_json::json!({"commitInfo": {"timestamp": now, "operation": "DELETE"}}),
        serde_json::json!({"remove": {"path": file, "deletionTimestamp": now, "dataChange": true}}),
    ];
    write_lines(
        &table.join(format!("_delta_log/{versions:020}.json")),
        &commit,
    );
    file
}

#[test]
fn an_index_another_writer_made_stale_is_not_used_and_vacuum_and_readers_leave_it_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let (phi, out) = (tmp.path().join("phi"), tmp.path().join("out"));
    phi_with_salt(&phi, "1234");
    etl(&synthea(), &out, &phi);
    let before = keyed_tables(&out);
    let patient = out.join("patient");
    let index = std::fs::read(patient.join(INDEX)).unwrap();

    // Readers see the rows and nothing of the index.
    let read = read_both(&patient, &["id"], true);
    assert_eq!(read.duckdb.len(), before["patient"].len());
    assert_eq!(read.deltalake.unwrap().len(), before["patient"].len());

    // Another writer removes the rows of a file, and VACUUM with no retention would delete
    // that file and a stray one, and leave the index.
    let removed = remove_a_file_as_another_writer(&patient);
    std::fs::write(patient.join("stray.parquet"), b"not referenced").unwrap();
    let vacuumed = run_script(VACUUM, &[patient.to_str().unwrap()]);
    let vacuumed: Vec<&str> = vacuumed
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(vacuumed, [removed.as_str(), "stray.parquet"]);
    assert_eq!(std::fs::read(patient.join(INDEX)).unwrap(), index);
    assert!(crate::support::read_delta_rows(&patient).is_empty());

    let log = etl(&synthea(), &out, &phi);
    assert!(
        log.contains("patient: its row index is not used (it describes version 0"),
        "{log}"
    );
    // The index is made again from the table's rows (none left): every patient is new.
    assert!(
        log.contains("patient: row index completed with the keys of the table's 0 rows"),
        "{log}"
    );
    let patients = before["patient"].len() as u64;
    assert_eq!(unchanged(&log, "patient"), Some((0, patients)), "{log}");
    assert!(log.contains(&format!(", {patients} new (")), "{log}");
    // Other tables still use theirs.
    let conditions = before["condition"].len() as u64;
    assert_eq!(unchanged(&log, "condition"), Some((conditions, conditions)));
    // Processed again, the rows are back, and the new index is used next time.
    assert_eq!(keyed_tables(&out), before);
    let log = etl(&synthea(), &out, &phi);
    assert_eq!(
        unchanged(&log, "patient"),
        Some((patients, patients)),
        "{log}"
    );
}

#[test]
fn a_run_another_writer_committed_into_keeps_no_index_of_that_table() {
    let tmp = tempfile::tempdir().unwrap();
    let (phi, out) = (tmp.path().join("phi"), tmp.path().join("out"));
    phi_with_salt(&phi, "1234");
    let condition = out.join("condition");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .args([synthea(), out.clone(), phi].map(|p| p.to_str().unwrap().to_string()))
        .args(["--batch-size", "10", "--task", "condition,patient"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Once the run has made a few commits, another writer commits (an empty commit, in the
    // next free version: never over one of the run's).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !condition
        .join("_delta_log/00000000000000000003.json")
        .exists()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the run made no commits"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let commit = r#"{"commitInfo":{"timestamp":1,"operation":"WRITE"}}"#;
    let written = (4..).find(|v| {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(condition.join(format!("_delta_log/{v:020}.json")))
            .and_then(|mut f| std::io::Write::write_all(&mut f, commit.as_bytes()))
            .is_ok()
    });
    let out_run = run.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out_run.stderr);
    assert!(out_run.status.success(), "{log}");
    assert!(written.is_some());
    assert!(
        log.contains(
            "condition: no row index kept: another writer committed to the table during the run"
        ),
        "{log}"
    );
    assert!(!condition.join(INDEX).exists());
    // The other table keeps its index.
    assert!(out.join("patient").join(INDEX).is_file(), "{log}");
}

#[test]
fn a_killed_first_load_restarted_leaves_out_the_rows_it_had_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let (clean, killed) = (tmp.path().join("clean"), tmp.path().join("killed"));
    let extra = ["--memory", "16MiB", "--no-table-optimization"];
    etl_with(&synthea(), &clean, &phi, &extra);

    // Killed once some table has five commits, each an append with its row journal.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .args([synthea(), killed.clone(), phi.clone()].map(|p| p.to_str().unwrap().to_string()))
        .args(["--batch-size", "150"])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let fifth = "_delta_log/00000000000000000004.json";
    let tables = || -> Vec<PathBuf> {
        let entries = std::fs::read_dir(&killed).into_iter().flatten().flatten();
        entries.map(|e| e.path()).collect()
    };
    while !tables().iter().any(|t| t.join(fifth).exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no table got five commits"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    assert!(
        !child.wait().unwrap().success(),
        "the run ended before it was killed"
    );
    let journaled: Vec<PathBuf> = tables()
        .into_iter()
        .filter(|t| t.join("_cumulus_etl/journal").is_dir())
        .collect();
    assert!(!journaled.is_empty());

    let log = etl_with(&synthea(), &killed, &phi, &extra);
    assert!(log.contains("row index rebuilt from"), "{log}");
    let left_out: u64 = journaled
        .iter()
        .filter_map(|t| unchanged(&log, t.file_name().unwrap().to_str().unwrap()))
        .map(|(n, _)| n)
        .sum();
    assert!(left_out >= 5 * 150 / 2, "{log}");
    assert_eq!(keyed_tables(&killed), keyed_tables(&clean));
    // The rows the killed run had not committed have keys new to their tables (the rebuilt
    // indexes list every key): they were appended, with no MERGE.
    assert!(log.contains(" new ("), "{log}");
    let delta_tables = tables()
        .into_iter()
        .filter(|t| t.join("_delta_log").is_dir());
    for table in delta_tables.filter(|t| !t.ends_with("etl__completion")) {
        let operations: Vec<String> = crate::support::delta_log_actions(&table)
            .into_iter()
            .flatten()
            .filter_map(|a| a["commitInfo"]["operation"].as_str().map(str::to_string))
            .collect();
        assert!(
            !operations.iter().any(|o| o == "MERGE"),
            "{}: {operations:?}",
            table.display()
        );
    }
    // The run's index covers every commit: the journals are gone, and a run again leaves every
    // line out.
    for table in &journaled {
        assert!(table.join(INDEX).is_file());
        let left = std::fs::read_dir(table.join("_cumulus_etl/journal"))
            .unwrap()
            .count();
        assert_eq!(left, 0, "{}", table.display());
    }
    let log = etl_with(&synthea(), &killed, &phi, &extra);
    let conditions = keyed_tables(&clean)["condition"].len() as u64;
    assert_eq!(
        unchanged(&log, "condition"),
        Some((conditions, conditions)),
        "{log}"
    );
}

#[test]
fn a_table_another_tool_wrote_gets_an_index_of_every_key_from_its_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    let (out, clean, export) = (
        tmp.path().join("out"),
        tmp.path().join("clean"),
        tmp.path().join("export"),
    );
    // Tables as another tool leaves them: the same rows, and no index or journal of ours.
    etl(&synthea(), &out, &phi);
    for table in std::fs::read_dir(&out).unwrap().flatten() {
        let ours = table.path().join("_cumulus_etl");
        if ours.is_dir() {
            std::fs::remove_dir_all(ours).unwrap();
        }
    }
    // The same export again: no line is known, every key is, and nothing changes; the
    // MERGEs commit nothing, and their journals still tell the index each row's line.
    let files = data_files(&out);
    let log = etl(&synthea(), &out, &phi);
    assert_eq!(data_files(&out), files);
    let known = keyed_tables(&out)["procedure"].len() as u64;
    assert!(
        log.contains(&format!(
            "procedure: row index completed with the keys of the table's {known} rows"
        )),
        "{log}"
    );
    assert_eq!(unchanged(&log, "procedure"), Some((0, known)), "{log}");
    let log = etl(&synthea(), &out, &phi);
    assert_eq!(unchanged(&log, "procedure"), Some((known, known)), "{log}");

    // The next export has every procedure again, one of them changed, and three new ones.
    copy_of_sample(&export);
    let procedures = export.join("Procedure.000.ndjson");
    let mut rows = lines_of(&procedures);
    rows[0]["status"] = Value::from("entered-in-error");
    for n in 0..3 {
        let mut new = rows[1].clone();
        new["id"] = Value::from(format!("a-new-procedure-{n}"));
        rows.push(new);
    }
    write_lines(&procedures, &rows);
    let log = etl(&export, &out, &phi);
    // Only the three new keys are new.
    assert_eq!(
        unchanged(&log, "procedure"),
        Some((known - 1, known + 3)),
        "{log}"
    );
    assert!(log.contains(", 3 new ("), "{log}");
    etl(&export, &clean, &phi);
    assert_eq!(keyed_tables(&out), keyed_tables(&clean));
    // The index the run saved lists every row's line: a run again leaves every line out.
    let log = etl(&export, &out, &phi);
    assert_eq!(
        unchanged(&log, "procedure"),
        Some((known + 3, known + 3)),
        "{log}"
    );
    assert!(!log.contains("row index completed"), "{log}");
    assert!(!log.contains("its row index is not used"), "{log}");
}

/// Sets the time of the `export_complete` event in an export's log.
fn completed_at(export: &Path, time: &str) {
    let log = export.join("log.ndjson");
    let mut events = lines_of(&log);
    for event in &mut events {
        if event["eventId"] == "export_complete" {
            event["timestamp"] = Value::from(time);
        }
    }
    write_lines(&log, &events);
}

/// Waits until `file` has `n` lines; past two minutes, stops the watch and fails with what it
/// said.
fn wait_for_lines(file: &Path, n: usize, watch: Watch) -> Watch {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let lines = std::fs::read_to_string(file).map_or(0, |t| t.lines().count());
        if lines >= n {
            return watch;
        }
        if std::time::Instant::now() >= deadline {
            let (code, log) = stop_watch(watch);
            panic!(
                "{} has {lines} lines; the watch (exit {code:?}) said:\n{log}",
                file.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn start_watch(exports: &Path, out: &Path, phi: &Path) -> Watch {
    start_watch_with(exports, out, phi, &[])
}

/// A running watch and the reader of its messages: they are read as they come, so that a
/// long message (a panic's backtrace) never fills the pipe and blocks the watch.
struct Watch {
    child: std::process::Child,
    log: std::thread::JoinHandle<String>,
}

fn start_watch_with(exports: &Path, out: &Path, phi: &Path, env: &[(&str, &str)]) -> Watch {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .envs(env.iter().copied())
        .args([
            "etl",
            "--watch",
            "--watch-interval",
            "1",
            "--batch-size",
            "400",
        ])
        .args([exports, out, phi].map(|p| p.to_str().unwrap()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
        text
    });
    Watch { child, log }
}

/// Sends SIGTERM and returns the watch's exit code and messages.
fn stop_watch(mut watch: Watch) -> (Option<i32>, String) {
    // SAFETY: a signal to the child this test started.
    unsafe { libc::kill(watch.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = watch.child.wait().unwrap();
    (status.code(), watch.log.join().unwrap())
}

/// A temporary folder with the paths of a watch test: a PHI folder (with a salt), the exports'
/// folder, the watch's output and a clean run's output.
fn watch_folders() -> (tempfile::TempDir, [PathBuf; 4]) {
    let tmp = tempfile::tempdir().unwrap();
    let paths = ["phi", "exports", "out", "clean"].map(|name| tmp.path().join(name));
    phi_with_salt(&paths[0], "1234");
    (tmp, paths)
}

#[test]
fn watch_loads_exports_as_they_complete_in_their_order_and_stops_on_sigterm() {
    let (_tmp, [phi, exports, out, clean]) = watch_folders();
    // Two exports at the first look: "b" completed an hour before "a", though neither their
    // names nor their times as written say so.
    let (early, late) = (exports.join("b-first"), exports.join("a-second"));
    copy_of_sample(&early);
    completed_at(&early, "2025-01-01T16:00:00+00:00");
    copy_of_sample(&late);
    completed_at(&late, "2025-01-01T12:00:00-05:00");
    let conditions = late.join("Condition.000.ndjson");
    let mut rows = lines_of(&conditions);
    rows.iter_mut()
        .for_each(|r| r["recordedDate"] = Value::from("2001-02-03"));
    write_lines(&conditions, &rows);

    let watch = start_watch(&exports, &out, &phi);
    let record = out.join("JobConfig/watched-exports.ndjson");
    let watch = wait_for_lines(&record, 2, watch);
    // A third export placed while the watch runs.
    let third = exports.join("c-third");
    copy_of_sample(&third);
    completed_at(&third, "2025-01-02T00:00:00Z");
    let watch = wait_for_lines(&record, 3, watch);
    let (code, log) = stop_watch(watch);
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("watch: stopped (3 exports loaded)"), "{log}");
    let loaded: Vec<String> = lines_of(&record)
        .iter()
        .map(|r| r["export"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(loaded, ["b-first", "a-second", "c-third"]);
    // One dataflow: each export is the next epoch of it.
    let epochs: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix("watch: loading export "))
        .collect();
    assert_eq!(epochs.len(), 3, "{log}");
    for (epoch, line) in epochs.iter().enumerate() {
        assert!(line.ends_with(&format!("as epoch {epoch}")), "{log}");
    }
    // The tables are those of the last export loaded.
    etl(&third, &clean, &phi);
    assert_eq!(
        keyed_tables(&out)["condition"],
        keyed_tables(&clean)["condition"]
    );
    // A line per export says what it did: the first wrote every row; the second, whose
    // conditions changed, left the rest out as unchanged.
    let rows: usize = keyed_tables(&clean)
        .iter()
        .filter(|(table, _)| *table != "etl__completion_encounters")
        .map(|(_, rows)| rows.len())
        .sum();
    let conditions = keyed_tables(&clean)["condition"].len();
    let loaded_line = |name: &str| {
        log.lines()
            .find(|l| l.starts_with(&format!("watch: export {name} loaded in ")))
            .unwrap_or_else(|| panic!("{log}"))
            .to_string()
    };
    assert!(
        loaded_line("b-first").ends_with(&format!(
            "s: {rows} rows (0 unchanged, left out), 0 input lines skipped, 10.0 MiB of input"
        )),
        "{log}"
    );
    assert!(
        loaded_line("a-second").contains(&format!(
            "s: {rows} rows ({} unchanged, left out)",
            rows - conditions
        )),
        "{log}"
    );

    // Started again, the watch loads nothing it has loaded.
    let watch = start_watch(&exports, &out, &phi);
    std::thread::sleep(std::time::Duration::from_secs(3));
    let (code, log) = stop_watch(watch);
    assert_eq!(code, Some(0), "{log}");
    assert!(!log.contains("watch: loading"), "{log}");
    assert!(log.contains("watch: stopped (3 exports loaded)"), "{log}");
}

#[test]
fn an_export_whose_run_stops_leaves_the_watch_running_on_new_workers() {
    let (_tmp, [phi, exports, out, clean]) = watch_folders();
    // The first export has a file whose reading panics (a test hook): its run stops, and its
    // workers with it.
    let (broken, good) = (exports.join("a-broken"), exports.join("b-good"));
    copy_of_sample(&broken);
    completed_at(&broken, "2025-01-01T10:00:00Z");
    std::fs::rename(
        broken.join("Condition.000.ndjson"),
        broken.join("Condition.broken.ndjson"),
    )
    .unwrap();
    copy_of_sample(&good);
    completed_at(&good, "2025-01-01T11:00:00Z");

    let env = [("CUMULUS_ETL_TEST_PANIC", "source:Condition.broken.ndjson")];
    let watch = start_watch_with(&exports, &out, &phi, &env);
    let record = out.join("JobConfig/watched-exports.ndjson");
    let watch = wait_for_lines(&record, 1, watch);
    let (code, log) = stop_watch(watch);
    assert_eq!(code, Some(0), "{log}");
    let loaded: Vec<String> = lines_of(&record)
        .iter()
        .map(|r| r["export"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(loaded, ["b-good"], "{log}");
    assert!(
        log.contains("watch: export a-broken failed: The run stopped: reading "),
        "{log}"
    );
    // The next export ran on new workers, as their first epoch.
    assert!(
        log.contains("watch: loading export b-good (completed 2025-01-01T11:00:00Z) as epoch 0"),
        "{log}"
    );
    assert!(log.contains("watch: stopped (1 exports loaded)"), "{log}");
    etl(&good, &clean, &phi);
    let (ours, theirs) = (keyed_tables(&out), keyed_tables(&clean));
    for table in ["condition", "patient", "encounter"] {
        assert_eq!(ours[table], theirs[table], "{table}");
    }
}

#[test]
fn a_key_met_again_in_a_later_batch_of_a_first_load_keeps_the_tables_index() {
    let tmp = tempfile::tempdir().unwrap();
    let (phi, out) = (tmp.path().join("phi"), tmp.path().join("out"));
    phi_with_salt(&phi, "1234");
    let export = tmp.path().join("export");
    copy_of_sample(&export);
    // The first procedure again at the end, changed: a later batch merges it.
    let procedures = export.join("Procedure.000.ndjson");
    let mut rows = lines_of(&procedures);
    let mut again = rows[0].clone();
    again["status"] = Value::from("entered-in-error");
    rows.push(again);
    let lines = rows.len() as u64;
    write_lines(&procedures, &rows);

    let log = etl(&export, &out, &phi);
    assert!(!log.contains("no row index kept"), "{log}");
    assert!(out.join("procedure").join(INDEX).is_file());
    // Every procedure but the key met twice is left out next time.
    let log = etl(&export, &out, &phi);
    assert_eq!(
        unchanged(&log, "procedure"),
        Some((lines - 2, lines)),
        "{log}"
    );
}
