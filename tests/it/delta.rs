//! Delta Lake tables: the table operations on real tables in temporary folders (upsert, the
//! `meta.lastUpdated` matrix, group deletes, deleted ids, schema evolution), and whole runs.

use std::sync::Arc;

use arrow::record_batch::RecordBatch;
use cumulus_etl::fhir::Shape;
use cumulus_etl::json::Tape;
use cumulus_etl::output::delta::{CumulusTable, DeltaSettings, TableSpec};
use cumulus_etl::output::{OnWritten, OutputFormat, Outputs, RowBatch, TableKind, write_and_wait};
use cumulus_etl::store::ObjectLocation;
use serde_json::{Value, json};

use crate::support::read_delta;

fn settings() -> Arc<DeltaSettings> {
    Arc::new(DeltaSettings::new(64 << 20, "test-run"))
}

/// Rows as a record batch, with the schema arrow infers from them.
fn batch(rows: &[Value]) -> RecordBatch {
    let text: Vec<String> = rows.iter().map(|r| r.to_string()).collect();
    let schema =
        arrow::json::reader::infer_json_schema_from_iterator(rows.iter().map(|r| Ok(r.clone())))
            .unwrap();
    let mut decoder = arrow::json::ReaderBuilder::new(Arc::new(schema))
        .with_batch_size(rows.len().max(1))
        .build_decoder()
        .unwrap();
    decoder.decode(text.join("\n").as_bytes()).unwrap();
    decoder.flush().unwrap().unwrap()
}

fn fhir_spec(name: &str) -> TableSpec {
    TableSpec::for_kind(name, &TableKind::Fhir("Observation".into()))
}

/// A table under a folder, driven synchronously on its own runtime.
struct TestTable {
    rt: tokio::runtime::Runtime,
    table: CumulusTable,
}

impl TestTable {
    fn open(root: &std::path::Path, spec: &TableSpec) -> TestTable {
        TestTable::open_with(root, spec, settings())
    }

    fn open_with(
        root: &std::path::Path,
        spec: &TableSpec,
        settings: Arc<DeltaSettings>,
    ) -> TestTable {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let table = rt
            .block_on(CumulusTable::open(
                &ObjectLocation::local(root).unwrap(),
                spec.clone(),
                settings,
            ))
            .unwrap();
        TestTable { rt, table }
    }

    fn upsert(&mut self, rows: &[Value], groups: &[&str]) -> anyhow::Result<()> {
        let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
        self.rt.block_on(self.table.upsert(batch(rows), &groups))
    }

    /// Submits rows through the staging path; `log` hears "staged N", "done N" or "failed N:
    /// <rows>" for batch N.
    fn submit(&mut self, n: usize, rows: &[Value], log: &Log) {
        let (staged, done) = (log.clone(), log.clone());
        let report = OnWritten::new(move |result| {
            done.lock().unwrap().push(match result {
                Ok(()) => format!("done {n}"),
                Err(f) => {
                    let rows = f.rows.unwrap_or_default();
                    let rows: Vec<String> = rows
                        .iter()
                        .map(|r| String::from_utf8_lossy(r).into())
                        .collect();
                    format!("failed {n}: {}", rows.join(" "))
                }
            })
        })
        .on_staged(move || staged.lock().unwrap().push(format!("staged {n}")));
        self.rt
            .block_on(self.table.submit(batch(rows), Vec::new(), report));
    }

    fn flush(&mut self) {
        self.rt.block_on(self.table.flush_staged());
    }

    fn delete(&mut self, ids: &[&str]) {
        let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
        self.rt.block_on(self.table.delete_ids(&ids)).unwrap();
    }
}

type Log = Arc<std::sync::Mutex<Vec<String>>>;

/// An `observation` table under `root` holding `stored` (written by an earlier run).
fn stored_observations(
    root: &std::path::Path,
    stored: Vec<Value>,
) -> (TableSpec, std::path::PathBuf) {
    let spec = fhir_spec("observation");
    write_runs(root, &spec, &[stored]);
    (spec, root.join("observation"))
}

/// Commits in a table's log.
fn commits(table_dir: &std::path::Path) -> usize {
    std::fs::read_dir(table_dir.join("_delta_log"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .count()
}

/// Writes each batch in turn (a new table handle per run, as separate runs would).
fn write_runs(root: &std::path::Path, spec: &TableSpec, runs: &[Vec<Value>]) {
    for rows in runs {
        if let Err(e) = TestTable::open(root, spec).upsert(rows, &[]) {
            panic!("{e:#}");
        }
    }
}

#[test]
fn upsert_inserts_new_rows_and_replaces_stored_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    write_runs(
        tmp.path(),
        &spec,
        &[
            vec![
                json!({"id": "1", "status": "a"}),
                json!({"id": "2", "status": "a"}),
            ],
            vec![
                json!({"id": "2", "status": "b"}),
                json!({"id": "3", "status": "b"}),
            ],
        ],
    );
    let rows = read_delta(&tmp.path().join("observation"), "id");
    assert_eq!(rows.len(), 3);
    assert_eq!(rows["1"]["status"], "a");
    assert_eq!(rows["2"]["status"], "b");
    assert_eq!(rows["3"]["status"], "b");
}

#[test]
fn repeated_keys_within_one_run_are_merged_not_appended_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let mut table = TestTable::open(tmp.path(), &spec);
    table
        .upsert(&[json!({"id": "1", "status": "a"})], &[])
        .unwrap();
    table
        .upsert(&[json!({"id": "1", "status": "b"})], &[])
        .unwrap();
    let rows = crate::support::read_delta_rows(&tmp.path().join("observation"));
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["status"], "b");
}

#[test]
fn last_updated_matrix_follows_cumulus_etl() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let row = |id: &str, when: Option<&str>, status: &str| match when {
        Some(t) => json!({"id": id, "meta": {"lastUpdated": t}, "status": status}),
        None => json!({"id": id, "meta": {"versionId": "1"}, "status": status}),
    };
    let stored = vec![
        row("older-incoming", Some("2020-01-02T00:00:00Z"), "stored"),
        row("equal", Some("2020-01-01T00:00:00+00:00"), "stored"),
        row("newer-incoming", Some("2020-01-01T00:00:00Z"), "stored"),
        row(
            "newer-by-offset",
            Some("2020-01-01T10:00:00+00:00"),
            "stored",
        ),
        row("stored-missing", None, "stored"),
        row("incoming-missing", Some("2020-01-01T00:00:00Z"), "stored"),
    ];
    let incoming = vec![
        row("older-incoming", Some("2020-01-01T00:00:00Z"), "incoming"),
        row("equal", Some("2020-01-01T00:00:00+00:00"), "incoming"),
        row("newer-incoming", Some("2020-01-02T00:00:00Z"), "incoming"),
        row(
            "newer-by-offset",
            Some("2020-01-01T06:00:00-05:00"),
            "incoming",
        ),
        row("stored-missing", Some("2020-01-01T00:00:00Z"), "incoming"),
        row("incoming-missing", None, "incoming"),
        row("new", Some("2020-01-01T00:00:00Z"), "incoming"),
    ];
    write_runs(tmp.path(), &spec, &[stored, incoming]);
    let rows = read_delta(&tmp.path().join("observation"), "id");
    let status = |id: &str| rows[id]["status"].as_str().unwrap().to_string();
    assert_eq!(status("older-incoming"), "stored");
    assert_eq!(status("equal"), "incoming");
    assert_eq!(status("newer-incoming"), "incoming");
    assert_eq!(status("newer-by-offset"), "incoming");
    assert_eq!(status("stored-missing"), "incoming");
    assert_eq!(status("incoming-missing"), "incoming");
    assert_eq!(status("new"), "incoming");
    assert_eq!(rows.len(), 7);
}

#[test]
fn completion_encounters_keep_the_first_export_time() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = TableSpec::for_kind(
        "etl__completion_encounters",
        &TableKind::CompletionEncounters,
    );
    let row = |t: &str| json!({"encounter_id": "e1", "group_name": "g", "export_time": t});
    write_runs(tmp.path(), &spec, &[vec![row("2020")], vec![row("2021")]]);
    let rows = crate::support::read_delta_rows(&tmp.path().join("etl__completion_encounters"));
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["export_time"], "2020");
}

#[test]
fn group_field_replaces_the_rows_of_touched_groups_only() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = fhir_spec("covid_symptom__nlp_results");
    spec.group_field = Some("docref_id".into());
    let row = |id: &str, group: &str| json!({"id": id, "docref_id": group});
    let quoted = "doc'1";
    let mut table = TestTable::open(tmp.path(), &spec);
    let first = [
        row("a.0", quoted),
        row("a.1", quoted),
        row("b.0", "doc2"),
        row("c.0", "doc3"),
    ];
    table.upsert(&first, &[]).unwrap();
    // A new batch for doc'1 keeps only a.1; doc3 is touched with no rows at all.
    table
        .upsert(&[row("a.1", quoted)], &[quoted, "doc3"])
        .unwrap();
    let rows = read_delta(&tmp.path().join("covid_symptom__nlp_results"), "id");
    let ids: Vec<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(ids, ["a.1", "b.0"]);
}

#[test]
fn deleted_ids_are_removed_from_the_table() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let mut table = TestTable::open(tmp.path(), &spec);
    let rows: Vec<Value> = (0..5).map(|i| json!({"id": format!("id{i}")})).collect();
    table.upsert(&rows, &[]).unwrap();
    table.delete(&["id1", "id3", "unknown"]);
    let rows = read_delta(&tmp.path().join("observation"), "id");
    let ids: Vec<&str> = rows.keys().map(String::as_str).collect();
    assert_eq!(ids, ["id0", "id2", "id4"]);
}

#[test]
fn a_later_batch_with_new_fields_evolves_the_schema() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    write_runs(
        tmp.path(),
        &spec,
        &[
            vec![json!({"id": "1", "code": {"text": "a"}})],
            vec![
                json!({"id": "2", "code": {"text": "b", "coding": [{"code": "x"}]}, "valueInteger": 7}),
            ],
            vec![json!({"id": "1", "status": "final"})],
        ],
    );
    let rows = read_delta(&tmp.path().join("observation"), "id");
    assert_eq!(rows["2"]["code"]["coding"][0]["code"], "x");
    assert_eq!(rows["2"]["valueInteger"], 7);
    // Row 1 was replaced by its new version, which has no code.
    assert_eq!(rows["1"]["status"], "final");
    assert!(rows["1"].get("code").is_none_or(Value::is_null));
}

#[test]
fn compaction_joins_files_of_older_schemas_into_one_without_changing_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let table_dir = tmp.path().join("observation");
    // Eight runs, one file each; the fifth brings a new top-level and a new nested field,
    // and the seventh replaces a row of the first file.
    let runs: Vec<Vec<Value>> = (0..8)
        .map(|run| {
            (0..3)
                .map(|i| match run {
                    6 if i == 0 => json!({"id": "r0-0", "status": "amended"}),
                    4.. => json!({"id": format!("r{run}-{i}"), "valueInteger": run,
                                  "code": {"text": "t", "coding": [{"code": "c"}]}}),
                    _ => json!({"id": format!("r{run}-{i}"), "code": {"text": "t"}}),
                })
                .collect()
        })
        .collect();
    write_runs(tmp.path(), &spec, &runs);
    let before = read_delta(&table_dir, "id");
    assert_eq!(crate::support::delta_live_files(&table_dir).len(), 8);
    let mut table = TestTable::open(tmp.path(), &spec);
    table.rt.block_on(table.table.maintain(true)).unwrap();
    assert_eq!(crate::support::delta_live_files(&table_dir).len(), 1);
    let after = read_delta(&table_dir, "id");
    assert_eq!(after, before);
    assert_eq!(after.len(), 23, "the seventh run replaced a row");
    assert_eq!(after["r5-1"]["code"]["coding"][0]["code"], "c");
    assert_eq!(after["r0-0"]["status"], "amended");
    assert!(after["r1-1"].get("valueInteger").is_none_or(Value::is_null));
    assert!(operations(&table_dir).contains(&"OPTIMIZE".to_string()));
}

#[test]
fn a_partitioned_table_is_compacted_by_delta_rs() {
    // Partition values live in file paths, which a file-by-file read would miss: such a table
    // (written by another tool) is compacted by delta-rs's OPTIMIZE instead.
    let tmp = tempfile::tempdir().unwrap();
    let table_dir = tmp.path().join("observation");
    std::fs::create_dir_all(&table_dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = url::Url::from_directory_path(table_dir.canonicalize().unwrap()).unwrap();
        let mut table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
        for run in 0..8 {
            let rows =
                [json!({"id": format!("r{run}"), "status": "final", "valueString": "first"})];
            table = table
                .write([batch(&rows)])
                .with_partition_columns(["status"])
                .with_save_mode(deltalake::protocol::SaveMode::Append)
                .await
                .unwrap();
        }
    });
    assert_eq!(crate::support::delta_live_files(&table_dir).len(), 8);
    let mut table = TestTable::open(tmp.path(), &fhir_spec("observation"));
    table.rt.block_on(table.table.maintain(true)).unwrap();
    assert_eq!(crate::support::delta_live_files(&table_dir).len(), 1);
    assert!(operations(&table_dir).contains(&"OPTIMIZE".to_string()));
    let ids = rt.block_on(async {
        let url = url::Url::from_directory_path(table_dir.canonicalize().unwrap()).unwrap();
        let table = deltalake::DeltaTable::try_from_url(url).await.unwrap();
        let live = table.get_file_uris().unwrap().collect::<Vec<_>>();
        assert!(
            live[0].contains("status=final"),
            "still partitioned: {live:?}"
        );
        table
            .snapshot()
            .unwrap()
            .log_data()
            .iter()
            .map(|f| f.num_records().unwrap())
            .sum::<usize>()
    });
    assert_eq!(ids, 8, "every row kept");

    // A MERGE and a DELETE into it go through delta-rs too (its DataFusion plans).
    table
        .upsert(
            &[
                json!({"id": "r1", "status": "final", "valueString": "changed"}),
                json!({"id": "r9", "status": "final"}),
            ],
            &[],
        )
        .unwrap();
    table.delete(&["r2"]);
    let rows = read_delta(&table_dir, "id");
    let mut ids: Vec<&String> = rows.keys().collect();
    ids.sort();
    assert_eq!(ids, ["r0", "r1", "r3", "r4", "r5", "r6", "r7", "r9"]);
    assert_eq!(rows["r1"]["valueString"], "changed");
    let operations = operations(&table_dir);
    assert!(operations.contains(&"MERGE".to_string()), "{operations:?}");
    assert!(operations.contains(&"DELETE".to_string()), "{operations:?}");
}

#[test]
fn an_incompatible_type_change_fails_that_batch_only() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let mut table = TestTable::open(tmp.path(), &spec);
    table
        .upsert(&[json!({"id": "1", "value": "text"})], &[])
        .unwrap();
    let err = table
        .upsert(&[json!({"id": "2", "value": {"a": 1}})], &[])
        .unwrap_err();
    assert!(format!("{err:#}").contains("'value'"), "{err:#}");
    table
        .upsert(&[json!({"id": "3", "value": "more"})], &[])
        .unwrap();
    let rows = read_delta(&tmp.path().join("observation"), "id");
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["1", "3"]);
}

#[test]
fn an_unchanged_batch_rewrites_no_files_and_a_changed_row_rewrites_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let table_dir = tmp.path().join("observation");
    let rows = |status: &str| -> Vec<Value> {
        (0..50)
            .map(|i| {
                json!({"id": format!("id{i}"), "status": if i == 7 { status } else { "x" },
                            "code": {"coding": [{"code": "c", "system": "s"}]}})
            })
            .collect()
    };
    write_runs(tmp.path(), &spec, &[rows("a")]);
    let first = crate::support::delta_live_files(&table_dir);
    write_runs(tmp.path(), &spec, &[rows("a")]);
    assert_eq!(crate::support::delta_live_files(&table_dir), first);
    write_runs(tmp.path(), &spec, &[rows("b")]);
    assert_ne!(crate::support::delta_live_files(&table_dir), first);
    let stored = read_delta(&table_dir, "id");
    assert_eq!(stored.len(), 50);
    assert_eq!(stored["id7"]["status"], "b");
}

/// The operations recorded in a table's log, oldest first.
fn operations(table_dir: &std::path::Path) -> Vec<String> {
    crate::support::delta_log_actions(table_dir)
        .into_iter()
        .flatten()
        .filter_map(|a| a["commitInfo"]["operation"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_merge_rewrites_only_the_files_whose_rows_change() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let table_dir = tmp.path().join("observation");
    let rows = |range: std::ops::Range<u32>| -> Vec<Value> {
        range
            .map(|i| json!({"id": format!("id{i:03}"), "status": "stored", "n": i}))
            .collect()
    };
    // Three files of 100 rows each, one per run; the third lacks the column `n`.
    let third: Vec<Value> = (200..300)
        .map(|i| json!({"id": format!("id{i:03}"), "status": "stored"}))
        .collect();
    write_runs(tmp.path(), &spec, &[rows(0..100), rows(100..200), third]);
    let before = crate::support::delta_live_files(&table_dir);
    assert_eq!(before.len(), 3);
    let commits_before = commits(&table_dir);

    // Unchanged rows of every file: nothing to commit at all.
    write_runs(tmp.path(), &spec, &[rows(50..60)]);
    assert_eq!(commits(&table_dir), commits_before);
    assert_eq!(crate::support::delta_live_files(&table_dir), before);

    // One changed row in the second file, one in the third (which gains `n`), one new row.
    let update = vec![
        json!({"id": "id150", "status": "changed", "n": 150}),
        json!({"id": "id250", "status": "changed", "n": 250}),
        json!({"id": "id300", "status": "new", "n": 300}),
    ];
    write_runs(tmp.path(), &spec, &[update]);
    let after = crate::support::delta_live_files(&table_dir);
    let kept: Vec<_> = before.iter().filter(|f| after.contains(f)).collect();
    assert_eq!(kept.len(), 1, "only the untouched file stays: {after:?}");
    assert_eq!(after.len(), 4, "two rewritten files and one of inserts");
    assert_eq!(
        operations(&table_dir).last().map(String::as_str),
        Some("MERGE")
    );
    let stored = read_delta(&table_dir, "id");
    assert_eq!(stored.len(), 301);
    assert_eq!(stored["id150"]["status"], "changed");
    assert_eq!(stored["id250"]["status"], "changed");
    assert_eq!(stored["id250"]["n"], 250);
    assert_eq!(stored["id251"]["status"], "stored");
    assert_eq!(stored["id300"]["status"], "new");
    assert_eq!(stored["id149"]["n"], 149);
}

#[test]
fn a_group_delete_that_empties_a_file_removes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = fhir_spec("covid_symptom__nlp_results");
    spec.group_field = Some("docref_id".into());
    let table_dir = tmp.path().join("covid_symptom__nlp_results");
    let row = |id: &str, group: &str| json!({"id": id, "docref_id": group});
    write_runs(
        tmp.path(),
        &spec,
        &[
            vec![row("a.0", "doc1"), row("a.1", "doc1")],
            vec![row("b.0", "doc2")],
        ],
    );
    let before = crate::support::delta_live_files(&table_dir);
    // doc1 is touched with no rows: its file goes, and no empty file replaces it.
    let mut table = TestTable::open(tmp.path(), &spec);
    table.upsert(&[row("b.0", "doc2")], &["doc1"]).unwrap();
    let after = crate::support::delta_live_files(&table_dir);
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(before.contains(&after[0]));
    let rows = read_delta(&table_dir, "id");
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["b.0"]);
}

#[test]
fn a_merge_that_does_not_fit_the_memory_pool_loses_no_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let filler = "x".repeat(200);
    let stored: Vec<Value> = (0..30_000)
        .map(|i| json!({"id": format!("id{i:05}"), "status": "old", "note": filler}))
        .collect();
    write_runs(tmp.path(), &spec, &[stored]);
    assert_eq!(
        read_delta(&tmp.path().join("observation"), "id").len(),
        30_000
    );
    // A 1 MiB pool cannot hold the 6 MB table side of the join: the MERGE may fail, but it
    // must either apply whole or not at all.
    let tiny = Arc::new(DeltaSettings::new(1 << 20, "tiny-run"));
    let mut table = TestTable::open_with(tmp.path(), &spec, tiny);
    let update: Vec<Value> = (29_995..30_005)
        .map(|i| json!({"id": format!("id{i:05}"), "status": "new", "note": "n"}))
        .collect();
    let outcome = table.upsert(&update, &[]);
    let rows = read_delta(&tmp.path().join("observation"), "id");
    match outcome {
        Ok(()) => {
            assert_eq!(rows.len(), 30_005);
            assert_eq!(rows["id29995"]["status"], "new");
        }
        Err(e) => {
            assert!(format!("{e:#}").contains("merging"), "{e:#}");
            assert_eq!(rows.len(), 30_000);
            assert_eq!(rows["id29995"]["status"], "old");
        }
    }
    assert_eq!(rows["id29994"]["status"], "old");
}

#[test]
fn merge_batches_wait_on_disk_and_commit_as_one_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let row = |id: u32, status: &str| json!({"id": format!("id{id}"), "status": status});
    let (spec, dir) = stored_observations(tmp.path(), (0..6).map(|i| row(i, "old")).collect());
    let before = commits(&dir);
    let log = Log::default();
    let mut table = TestTable::open(tmp.path(), &spec);
    table.submit(1, &[row(1, "new"), row(7, "new")], &log);
    table.submit(2, &[row(2, "new"), json!({"id": "id8", "extra": 1})], &log);
    table.submit(3, &[row(3, "new")], &log);
    // Staged (the caller's memory is free) but not committed yet.
    assert_eq!(*log.lock().unwrap(), ["staged 1", "staged 2", "staged 3"]);
    assert_eq!(commits(&dir), before);
    table.flush();
    assert_eq!(log.lock().unwrap()[3..], ["done 1", "done 2", "done 3"]);
    assert_eq!(commits(&dir), before + 1, "one MERGE for three batches");
    let rows = read_delta(&dir, "id");
    assert_eq!(rows.len(), 8);
    for id in ["id1", "id2", "id3", "id7"] {
        assert_eq!(rows[id]["status"], "new", "{id}");
    }
    assert_eq!(rows["id0"]["status"], "old");
    assert_eq!(rows["id8"]["extra"], 1);
}

#[test]
fn a_batch_touching_staged_keys_merges_after_them_and_wins() {
    let tmp = tempfile::tempdir().unwrap();
    let (spec, dir) = stored_observations(tmp.path(), vec![json!({"id": "1", "status": "old"})]);
    let before = commits(&dir);
    let log = Log::default();
    let mut table = TestTable::open(tmp.path(), &spec);
    table.submit(1, &[json!({"id": "1", "status": "first"})], &log);
    table.submit(2, &[json!({"id": "1", "status": "second"})], &log);
    assert_eq!(*log.lock().unwrap(), ["staged 1", "done 1", "staged 2"]);
    // A type conflict with a staged batch also merges what waits first, so only it fails.
    table.submit(3, &[json!({"id": "2", "code": "text"})], &log);
    table.submit(4, &[json!({"id": "3", "code": {"text": "t"}})], &log);
    table.flush();
    let log = log.lock().unwrap();
    assert_eq!(
        log[3..7],
        ["staged 3", "done 2", "done 3", "staged 4"],
        "{log:?}"
    );
    assert!(log[7].starts_with("failed 4"), "{log:?}");
    assert_eq!(commits(&dir), before + 2);
    let rows = read_delta(&dir, "id");
    assert_eq!(rows["1"]["status"], "second");
    assert_eq!(rows["2"]["code"], "text");
    assert!(!rows.contains_key("3"));
}

/// Settings whose file-by-file MERGEs index at most `rows` staged rows (and cache as many
/// bytes of source slices as those rows' index would take).
fn merge_index_of(rows: usize) -> Arc<DeltaSettings> {
    // Each of two MERGEs at once gets an eighth of the memory limit, half of it for its index.
    let limit = rows * cumulus_etl::output::delta::MERGE_INDEX_BYTES_PER_ROW * 16;
    Arc::new(DeltaSettings::new(limit, "small-merges"))
}

#[test]
fn staged_batches_merge_once_their_index_fills_its_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    write_runs(tmp.path(), &spec, &[vec![json!({"id": "0"})]]);
    // --batch-size does not split a MERGE file by file: memory does.
    let settings = Arc::new(Arc::unwrap_or_clone(merge_index_of(4)).with_merge_rows(1));
    let mut table = TestTable::open_with(tmp.path(), &spec, settings);
    let log = Log::default();
    for n in 1..=3 {
        let rows: Vec<Value> = (0..2).map(|i| json!({"id": format!("{n}.{i}")})).collect();
        table.submit(n, &rows, &log);
    }
    assert_eq!(
        *log.lock().unwrap(),
        ["staged 1", "staged 2", "done 1", "done 2", "staged 3"]
    );
}

#[test]
fn a_merge_larger_than_its_cache_reads_source_rows_back_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = fhir_spec("observation");
    let dir = tmp.path().join("observation");
    let row = |i: u32, status: &str| json!({"id": format!("id{i:03}"), "status": status});
    let stored = |range: std::ops::Range<u32>| range.map(|i| row(i, "stored")).collect();
    write_runs(
        tmp.path(),
        &spec,
        &[stored(0..100), stored(100..200), stored(200..300)],
    );
    let before = crate::support::delta_live_files(&dir);
    let commits_before = commits(&dir);
    // Room in the index for every row, but the cache holds only a slice or two of them.
    let mut table = TestTable::open_with(tmp.path(), &spec, merge_index_of(20));
    let log = Log::default();
    table.submit(1, &[row(10, "changed"), row(305, "new")], &log);
    table.submit(2, &[row(150, "changed"), row(250, "stored")], &log);
    // A key twice in one batch: the later row wins.
    table.submit(
        3,
        &[row(251, "changed"), row(301, "first"), row(301, "second")],
        &log,
    );
    table.submit(4, &[row(20, "changed")], &log);
    table.flush();
    let log = log.lock().unwrap();
    assert_eq!(
        log[4..],
        ["done 1", "done 2", "done 3", "done 4"],
        "{log:?}"
    );
    assert_eq!(commits(&dir), commits_before + 1, "one MERGE");
    let after = crate::support::delta_live_files(&dir);
    assert!(
        after.iter().all(|f| !before.contains(f)),
        "all three rewritten"
    );
    assert_eq!(after.len(), 4, "three rewritten files and one of inserts");
    let rows = read_delta(&dir, "id");
    assert_eq!(rows.len(), 302);
    for id in ["id010", "id020", "id150", "id251"] {
        assert_eq!(rows[id]["status"], "changed", "{id}");
    }
    assert_eq!(rows["id301"]["status"], "second");
    assert_eq!(rows["id305"]["status"], "new");
    assert_eq!(rows["id250"]["status"], "stored");
    assert_eq!(rows["id011"]["status"], "stored");
}

#[test]
fn a_failed_staged_merge_hands_the_rows_back() {
    let tmp = tempfile::tempdir().unwrap();
    let (spec, dir) = stored_observations(tmp.path(), vec![json!({"id": "1", "status": "old"})]);
    let log = Log::default();
    let mut table = TestTable::open(tmp.path(), &spec);
    table.submit(
        1,
        &[json!({"id": "1", "status": "new"}), json!({"id": "2"})],
        &log,
    );
    // The storage loses the table's data file before the MERGE reads it.
    for file in crate::support::delta_live_files(&dir) {
        std::fs::remove_file(dir.join(file)).unwrap();
    }
    table.flush();
    let log = log.lock().unwrap();
    assert_eq!(log[0], "staged 1");
    assert_eq!(
        log[1], r#"failed 1: {"id":"1","status":"new"} {"id":"2"}"#,
        "{log:?}"
    );
}

/// Writes `rows` (FHIR Conditions as JSON) through a table writer of `outputs`, as a sink does.
fn write_rows(outputs: &Outputs, rows: &[Value]) {
    let text: Vec<Vec<u8>> = rows.iter().map(|r| r.to_string().into_bytes()).collect();
    let mut tape = Tape::default();
    let mut shape = Shape::default();
    for row in &text {
        shape.add_row(&tape.parse(row).unwrap());
    }
    let mut writer = outputs
        .open("condition", TableKind::Fhir("Condition".into()))
        .unwrap();
    let batch = RowBatch::of_rows(text.iter().map(Vec::as_slice).collect(), &shape);
    if let Err(e) = write_and_wait(writer.as_mut(), &batch) {
        panic!("{e:#}");
    }
}

/// Delta outputs under `root`, as a run opens them.
fn delta_outputs(root: &std::path::Path) -> Outputs {
    Outputs::new(
        OutputFormat::Deltalake,
        &ObjectLocation::local(root).unwrap(),
        DeltaSettings::new(64 << 20, "test-run"),
    )
    .unwrap()
}

#[test]
fn writers_append_their_own_files_evolve_the_schema_and_merge_repeated_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let outputs = delta_outputs(tmp.path());
    let coding = |code: &str| json!({"coding": [{"system": "s", "code": code}]});
    write_rows(
        &outputs,
        &[
            json!({"resourceType": "Condition", "id": "a", "code": coding("1")}),
            json!({"resourceType": "Condition", "id": "b", "code": coding("2")}),
        ],
    );
    // New ids with a field the table lacks (evidence.detail): appended, the schema evolves.
    write_rows(
        &outputs,
        &[
            json!({"resourceType": "Condition", "id": "c", "code": coding("3"),
                 "evidence": [{"detail": [{"reference": "Observation/x", "display": "three"}]}]}),
        ],
    );
    // A repeated id: merged, not appended twice.
    write_rows(
        &outputs,
        &[json!({"resourceType": "Condition", "id": "a", "code": coding("9")})],
    );
    assert!(outputs.finish(false).is_empty());

    let dir = tmp.path().join("condition");
    let commits = crate::support::delta_log_actions(&dir);
    let adds = |commit: &[Value]| -> Vec<Value> {
        commit
            .iter()
            .filter_map(|a| a.get("add").cloned())
            .collect()
    };
    let has = |commit: &[Value], action: &str| commit.iter().any(|a| a.get(action).is_some());
    assert!(has(&commits[0], "protocol") && has(&commits[0], "metaData"));
    let first = adds(&commits[0]);
    assert_eq!(first.len(), 1, "one data file per batch: {first:?}");
    let stats: Value = serde_json::from_str(first[0]["stats"].as_str().unwrap()).unwrap();
    assert_eq!(
        stats["numRecords"], 2,
        "file statistics are recorded: {stats}"
    );
    assert!(
        has(&commits[1], "metaData"),
        "the second batch evolves the schema"
    );
    assert!(
        commits[1][..]
            .iter()
            .filter_map(|a| a["metaData"]["schemaString"].as_str())
            .any(|s| s.contains("\"detail\"")),
        "the new schema has evidence.detail"
    );
    assert_eq!(adds(&commits[1]).len(), 1);
    for commit in &commits {
        let txn: Vec<&Value> = commit.iter().filter_map(|a| a.get("txn")).collect();
        assert_eq!(txn.len(), 1, "every data commit names the run: {commit:?}");
        assert_eq!(txn[0]["appId"], "test-run");
    }
    let rows = read_delta(&dir, "id");
    assert_eq!(rows.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(rows["a"]["code"]["coding"][0]["code"], "9");
    assert_eq!(rows["c"]["evidence"][0]["detail"][0]["display"], "three");
    // The file written for the merged batch was dropped, not left beside the table.
    let on_disk = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
        .count();
    assert_eq!(
        on_disk,
        crate::support::delta_live_files(&dir).len() + 1,
        "the live files plus the one the MERGE replaced (vacuum was not run)"
    );
}

#[test]
fn a_writer_stages_its_merge_batch_before_handing_it_to_the_committer() {
    let tmp = tempfile::tempdir().unwrap();
    let outputs = delta_outputs(tmp.path());
    let row = |code: &str| json!({"resourceType": "Condition", "id": "a", "code": {"text": code}});
    write_rows(&outputs, &[row("1")]);
    let text = row("2").to_string().into_bytes();
    let mut tape = Tape::default();
    let mut shape = Shape::default();
    shape.add_row(&tape.parse(&text).unwrap());
    let batch = RowBatch::of_rows(vec![text.as_slice()], &shape);
    let log: Log = Default::default();
    let (staged, done) = (log.clone(), log.clone());
    let report = OnWritten::new(move |result| {
        done.lock()
            .unwrap()
            .push(format!("done {}", result.is_ok()))
    })
    .on_staged(move || staged.lock().unwrap().push("staged".into()));
    let mut writer = outputs
        .open("condition", TableKind::Fhir("Condition".into()))
        .unwrap();
    writer.write_batch(&batch, report);
    // The repeated id needs a MERGE: its rows are on local disk (and the caller's memory free)
    // by the time write_batch returns, whatever the committer is doing.
    assert_eq!(
        log.lock().unwrap().first().map(String::as_str),
        Some("staged")
    );
    writer.flush();
    drop(writer);
    assert!(outputs.finish(false).is_empty());
    assert_eq!(*log.lock().unwrap(), ["staged", "done true"]);
    let rows = read_delta(&tmp.path().join("condition"), "id");
    assert_eq!(rows["a"]["code"]["text"], "2");
}
