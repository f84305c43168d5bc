//! Side by side with the Python Cumulus ETL on the bundled Synthea sample: every NDJSON table and
//! the cached id mappings must be equal. Ignored by default (the reference takes minutes to
//! install); run with `cargo test -- --ignored reference` once it is installed, or point
//! `CUMULUS_REFERENCE` at its `cumulus-etl` executable.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::support::{phi_with_salt, read_table, run_etl, stderr, synthea};

fn reference_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CUMULUS_REFERENCE") {
        return Some(PathBuf::from(p));
    }
    let home = std::env::var("HOME").ok()?;
    let p = PathBuf::from(home).join(".cache/reference-cumulus/venv/bin/cumulus-etl");
    p.exists().then_some(p)
}

#[test]
#[ignore = "needs the reference Python Cumulus ETL (see tests/it/reference.rs)"]
fn reference_tables_equal_ours_row_for_row() {
    let Some(reference) = reference_binary() else {
        panic!(
            "reference cumulus-etl not found: install it with ../shared/tools/reference-cumulus.sh or set CUMULUS_REFERENCE"
        );
    };
    let tmp = tempfile::tempdir().unwrap();
    let salt = "e1a5f0c1b2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9";
    let (ours_out, ours_phi) = (tmp.path().join("ours"), tmp.path().join("ours-phi"));
    let (ref_out, ref_phi) = (tmp.path().join("ref"), tmp.path().join("ref-phi"));
    phi_with_salt(&ours_phi, salt);
    phi_with_salt(&ref_phi, salt);
    let input = synthea();
    let out = run_etl(&[
        "etl",
        "--output-format=ndjson",
        input.to_str().unwrap(),
        ours_out.to_str().unwrap(),
        ours_phi.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status = Command::new(&reference)
        .args(["etl", "--output-format=ndjson", "--skip-init-checks"])
        .args([&input, &ref_out, &ref_phi])
        .status()
        .unwrap();
    assert!(status.success(), "the reference run failed");

    let mut tables: Vec<String> = std::fs::read_dir(&ref_out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "JobConfig")
        .collect();
    tables.sort();
    assert!(tables.len() >= 10, "reference wrote {tables:?}");
    let mut differences = Vec::new();
    for table in &tables {
        let key = match table.as_str() {
            "etl__completion_encounters" => "encounter_id",
            "etl__completion" => "table_name",
            _ => "id",
        };
        let mut theirs = read_table(&ref_out.join(table), key);
        let mut ours = read_table(&ours_out.join(table), key);
        if table == "etl__completion" {
            // etl_time is the clock and etl_version the tool's version: they differ by design.
            for rows in [&mut theirs, &mut ours] {
                for row in rows.values_mut() {
                    row.as_object_mut().unwrap().remove("etl_time");
                    row.as_object_mut().unwrap().remove("etl_version");
                }
            }
        }
        if theirs.len() != ours.len() {
            differences.push(format!(
                "{table}: {} rows in the reference, {} in ours",
                theirs.len(),
                ours.len()
            ));
            continue;
        }
        for (id, row) in &theirs {
            if ours.get(id) != Some(row) {
                differences.push(format!(
                    "{table} row {id} differs:\n  ref  {row}\n  ours {:?}",
                    ours.get(id)
                ));
                break;
            }
        }
    }
    let read =
        |p: PathBuf| -> Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
    let theirs = read(ref_phi.join("codebook-cached-mappings.json"));
    let ours = read(ours_phi.join("codebook-cached-mappings.json"));
    if theirs != ours {
        differences.push("codebook-cached-mappings.json differs".into());
    }
    assert!(differences.is_empty(), "{}", differences.join("\n"));
}

/// The lone-surrogate lines of `robustness`, side by side: the reference's rows must be the ones
/// that test expects of ours (and so ours), byte for byte.
#[test]
#[ignore = "needs the reference Python Cumulus ETL (see tests/it/reference.rs)"]
fn lone_surrogates_match_the_reference() {
    let Some(reference) = reference_binary() else {
        panic!("reference cumulus-etl not found: see reference_tables_equal_ours_row_for_row");
    };
    let lines = crate::robustness::LONE_SURROGATE_LINES.join("\n") + "\n";
    let written = reference_ndjson(&reference, "Condition", "condition", &lines);
    let rows: Vec<&str> = written.lines().collect();
    assert_eq!(rows, crate::robustness::REFERENCE_ROWS);
}

/// Numbers Python and serde_json read differently (`robustness::NUMBER_LINES`), side by side:
/// the reference's NDJSON rows are ours, byte for byte.
#[test]
#[ignore = "needs the reference Python Cumulus ETL (see tests/it/reference.rs)"]
fn numbers_match_the_reference() {
    let Some(reference) = reference_binary() else {
        panic!("reference cumulus-etl not found: see reference_tables_equal_ours_row_for_row");
    };
    let lines = crate::robustness::NUMBER_LINES.join("\n") + "\n";
    let theirs = reference_ndjson(&reference, "Observation", "observation", &lines);
    let file = vec![("Observation.ndjson", lines.into_bytes())];
    let ours = crate::robustness::run_on(&file, "ndjson", &["--task", "observation"], &[]);
    assert_eq!(ours.code, Some(0), "{}", ours.stderr);
    let ours =
        std::fs::read_to_string(ours.out.join("observation/observation.000.ndjson")).unwrap();
    let sorted = |text: &str| {
        let mut rows: Vec<String> = text.lines().map(str::to_string).collect();
        rows.sort();
        rows
    };
    assert_eq!(sorted(&ours), sorted(&theirs));
}

/// The NDJSON rows the reference writes for `lines` of `resource` (its `task`), with the
/// robustness tests' salt.
fn reference_ndjson(reference: &Path, resource: &str, task: &str, lines: &str) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let (input, out, phi) = (
        tmp.path().join("in"),
        tmp.path().join("out"),
        tmp.path().join("phi"),
    );
    std::fs::create_dir_all(&input).unwrap();
    std::fs::write(input.join(format!("{resource}.ndjson")), lines).unwrap();
    phi_with_salt(&phi, crate::robustness::SALT);
    let status = Command::new(reference)
        .args(["etl", "--output-format=ndjson", "--skip-init-checks"])
        .arg(format!("--task={task}"))
        .args([
            "--export-group=g",
            "--export-timestamp=2024-01-01T00:00:00Z",
        ])
        .args([&input, &out, &phi])
        .status()
        .unwrap();
    assert!(status.success(), "the reference run failed");
    std::fs::read_to_string(out.join(format!("{task}/{task}.000.ndjson"))).unwrap()
}
