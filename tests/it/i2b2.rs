//! `--input-format i2b2` against Cumulus ETL's i2b2 fixture: every table, row by row.

use std::path::Path;

use serde_json::Value;

use crate::support::{read_table, run_etl, stderr};

fn fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance/i2b2")
}

/// Completion rows without the fields that depend on the clock and the tool's version.
fn completion_rows(dir: &Path) -> Vec<Value> {
    let mut rows: Vec<Value> = read_table(dir, "table_name")
        .into_values()
        .map(|mut v| {
            let m = v.as_object_mut().unwrap();
            m.remove("etl_time");
            m.remove("etl_version");
            v
        })
        .collect();
    rows.sort_by_key(|v| v.to_string());
    rows
}

#[test]
fn i2b2_fixture_converts_to_the_expected_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    std::fs::create_dir_all(&phi).unwrap();
    std::fs::copy(fixture().join("codebook.json"), phi.join("codebook.json")).unwrap();
    let run = run_etl(&[
        "--input-format",
        "i2b2",
        "--output-format",
        "ndjson",
        "--export-group",
        "test-group",
        "--export-timestamp",
        "2020-10-13T12:00:20-05:00",
        fixture().join("input").to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));

    let expected_root = fixture().join("output");
    let mut tables: Vec<String> = std::fs::read_dir(&expected_root)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    tables.sort();
    for table in &tables {
        let (want, got) = (expected_root.join(table), out.join(table));
        match table.as_str() {
            "etl__completion" => assert_eq!(completion_rows(&got), completion_rows(&want)),
            "etl__completion_encounters" => assert_eq!(
                read_table(&got, "encounter_id"),
                read_table(&want, "encounter_id")
            ),
            _ => {
                // Every row as upstream wrote it, ICD-10-CM display names included.
                let (want, got) = (read_table(&want, "id"), read_table(&got, "id"));
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    want.keys().collect::<Vec<_>>(),
                    "{table}"
                );
                for (id, row) in &want {
                    assert_eq!(&got[id], row, "{table} {id}");
                }
            }
        }
    }
    // Nothing else was written.
    let written = std::fs::read_dir(&out).unwrap().count();
    assert_eq!(
        written,
        tables.len() + 1,
        "the fixture's tables plus JobConfig"
    );
}

#[test]
fn bad_i2b2_rows_are_counted_and_missing_files_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(
        input.join("visit_dimension.csv"),
        "ENCOUNTER_NUM,PATIENT_NUM,START_DATE,END_DATE,INOUT_CD,LENGTH_OF_STAY\n\
         1,10,2020-01-01,2020-01-02,Inpatient,1\n\
         2,10,2020-01-01,2020-01-02,Inpatient,one day\n\
         1,10,2020-01-01,2020-01-02,Emergency,1\n\
         ,10,2020-01-01,2020-01-02,Inpatient,1\n\
         3,10,2020-01-01,2020-01-02,Outpatient,\n",
    )
    .unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    let run = run_etl(&[
        "--input-format=i2b2",
        "--output-format=ndjson",
        "--export-group=g",
        "--export-timestamp=2020-01-01T00:00:00+00:00",
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    let err = stderr(&run);
    assert!(run.status.success(), "{err}");
    assert!(
        err.contains("No ") && err.contains("patient_dimension.csv, skipping."),
        "{err}"
    );
    assert!(err.contains("visit_dimension.csv:3: skipped"), "{err}");
    assert!(err.contains("visit_dimension.csv:4: skipped"), "{err}");
    assert!(err.contains("visit_dimension.csv:5: skipped"), "{err}");
    // The first row with an id wins, as upstream.
    let rows = read_table(&out.join("encounter"), "id");
    assert_eq!(rows.len(), 2);
    assert!(rows.values().all(|r| r["class"]["code"] != "EMER"));
    assert!(!err.contains("one day"), "values never reach the log");
}
