//! One table on every worker: a one-table export (the sample's Procedures) written by two
//! workers holds the same rows as with one, in every output format, and a batch drops
//! duplicate ids however the workers shared its bundles.

use std::path::Path;

use serde_json::Value;

use crate::support::{phi_with_salt, read_delta_rows, read_parquet_rows, run_etl, stderr, synthea};

/// Every row of the table `procedure` of a run's output, as sorted JSON texts.
fn procedure_rows(output: &Path, format: &str) -> Vec<String> {
    let table = output.join("procedure");
    let rows: Vec<Value> = match format {
        "ndjson" => {
            let mut files: Vec<_> = std::fs::read_dir(&table)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "ndjson"))
                .collect();
            files.sort();
            files
                .iter()
                .flat_map(|f| {
                    let text = std::fs::read_to_string(f).unwrap();
                    let lines: Vec<Value> = text
                        .lines()
                        .map(|l| serde_json::from_str(l).unwrap())
                        .collect();
                    lines
                })
                .collect()
        }
        "parquet" => read_parquet_rows(&table),
        _ => read_delta_rows(&table),
    };
    let mut texts: Vec<String> = rows.iter().map(Value::to_string).collect();
    texts.sort();
    texts
}

/// Copies of the sample's Procedures with new ids: enough for several bundles per worker, and
/// for a Delta batch large enough to be encoded in parts on two threads (41,120 rows).
const COPIES: usize = 20;

/// A one-table export: the sample's Procedures in `COPIES` copies (ids made unique), with every
/// tenth line of the first copy repeated at the end (far from its first copy, so in another
/// bundle, often on another worker). Returns the number of distinct ids.
fn one_table_export(dir: &Path) -> usize {
    let text = std::fs::read_to_string(synthea().join("Procedure.000.ndjson")).unwrap();
    let mut lines = Vec::new();
    for copy in 0..COPIES {
        for line in text.lines() {
            let mut resource: Value = serde_json::from_str(line).unwrap();
            let id = format!("{}-c{copy}", resource["id"].as_str().unwrap());
            resource["id"] = Value::String(id);
            lines.push(resource.to_string());
        }
    }
    let distinct = lines.len();
    let mut out = lines.join("\n");
    out.push('\n');
    for line in lines.iter().step_by(10).take(text.lines().count() / 10) {
        out.push_str(line);
        out.push('\n');
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("Procedure.000.ndjson"), out).unwrap();
    std::fs::copy(synthea().join("log.ndjson"), dir.join("log.ndjson")).unwrap();
    distinct
}

/// The output of a run of the export with `workers` and `batch_size`.
fn output_of(tmp: &Path, format: &str, workers: usize, batch_size: usize) -> std::path::PathBuf {
    tmp.join(format!("{format}-{workers}-{batch_size}"))
}

/// Runs the export into a new output with `workers` and `batch_size`; its procedure rows.
fn run(input: &Path, tmp: &Path, format: &str, workers: usize, batch_size: usize) -> Vec<String> {
    let name = format!("{format}-{workers}-{batch_size}");
    let output = output_of(tmp, format, workers, batch_size);
    let phi = tmp.join(format!("{name}-phi"));
    phi_with_salt(&phi, "e359591c");
    let out = run_etl(&[
        input.to_str().unwrap(),
        output.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--task=procedure",
        &format!("--output-format={format}"),
        &format!("--workers={workers}"),
        &format!("--batch-size={batch_size}"),
        // Bundles of 8 MiB (the file is shared by both workers), and room for one batch.
        "--memory=256MiB",
    ]);
    assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
    procedure_rows(&output, format)
}

#[test]
fn a_one_table_export_on_two_workers_gives_the_tables_of_one_worker_in_every_format() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    let procedures = one_table_export(&input);
    for format in ["ndjson", "parquet", "deltalake"] {
        // One batch: the repeated ids are dropped, whichever worker read which copy.
        let one = run(&input, tmp.path(), format, 1, 100_000);
        let two = run(&input, tmp.path(), format, 2, 100_000);
        assert_eq!(one.len(), procedures, "{format}");
        assert_eq!(two, one, "{format}");
        if format == "deltalake" {
            // The one batch was encoded in two parts at once, a file each (one per key range),
            // on two workers, and the two joined into one file at the end.
            let files = |workers| {
                let table = output_of(tmp.path(), format, workers, 100_000).join("procedure");
                crate::support::delta_live_files(&table).len()
            };
            assert_eq!((files(1), files(2)), (1, 1));
            // Tagged as one batch, which compaction counts once.
            let table = output_of(tmp.path(), format, 2, 100_000).join("procedure");
            let tags: Vec<serde_json::Value> = crate::support::delta_log_actions(&table)
                .into_iter()
                .flatten()
                .filter_map(|a| {
                    a.get("add")
                        .map(|add| add["tags"]["cumulusEtlBatch"].clone())
                })
                .filter(|tag| !tag.is_null())
                .collect();
            assert_eq!(tags.len(), 2, "{tags:?}");
            assert!(tags[0].is_string() && tags[0] == tags[1], "{tags:?}");
        }
        // Batches of 3,000 rows: a batch is still cut at 3,000 rows whoever writes it; Delta
        // keeps each id once across batches too.
        let small = run(&input, tmp.path(), format, 2, 3000);
        let mut distinct = small.clone();
        distinct.dedup();
        assert_eq!(distinct, one, "{format}");
        if format == "deltalake" {
            assert_eq!(small.len(), procedures, "{format}");
        }
    }
}
