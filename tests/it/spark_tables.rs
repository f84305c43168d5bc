//! Tables that Cumulus ETL's Spark created (liquid clustering, domain metadata, deletion
//! vectors) are carried on, and ours are created the same way. No Spark runs here: fixtures
//! are our own tables with their first commit rewritten as delta-spark writes it, and a real
//! deletion vector written with the Delta kernel's writer, committed as Spark's DELETE does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::readers::read_both;
use crate::support::{
    delta_live_files, delta_log_actions, parquet_file_rows, phi_with_salt, run_etl, stderr, synthea,
};

const SALT: &str = "1234";

/// The clustering domain line delta-spark writes for a table clustered by `id`.
const SPARK_CLUSTERING_DOMAIN: &str = r#"{"domainMetadata":{"domain":"delta.clustering","configuration":"{\"clusteringColumns\":[[\"id\"]],\"domainName\":\"delta.clustering\"}","removed":false}}"#;

/// The tables Spark creates, by its settings.
#[derive(Clone, Copy, PartialEq)]
enum Spark {
    Clustered,
    /// `delta.enableDeletionVectors`.
    DeletionVectors,
    /// Deletion vectors and `delta.checkpointPolicy = v2`.
    V2Checkpoints,
}

fn spark_protocol(spark: Spark) -> Value {
    match spark {
        Spark::Clustered => json!({"protocol": {"minReaderVersion": 1, "minWriterVersion": 7,
            "writerFeatures": ["appendOnly", "invariants", "clustering", "domainMetadata"]}}),
        Spark::DeletionVectors => json!({"protocol": {"minReaderVersion": 3,
            "minWriterVersion": 7, "readerFeatures": ["deletionVectors"],
            "writerFeatures": ["appendOnly", "invariants", "clustering", "domainMetadata",
                "deletionVectors"]}}),
        Spark::V2Checkpoints => json!({"protocol": {"minReaderVersion": 3,
            "minWriterVersion": 7, "readerFeatures": ["deletionVectors", "v2Checkpoint"],
            "writerFeatures": ["appendOnly", "invariants", "clustering", "domainMetadata",
                "deletionVectors", "v2Checkpoint"]}}),
    }
}

fn etl(input: &Path, out: &Path, phi: &Path) -> std::process::Output {
    run_etl(&[
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ])
}

/// The synthea sample loaded into `out` (Delta), with the PHI folder it used.
fn loaded(tmp: &Path) -> (PathBuf, PathBuf) {
    let phi = tmp.join("phi");
    phi_with_salt(&phi, SALT);
    let out = tmp.join("out");
    let run = etl(&synthea(), &out, &phi);
    assert!(run.status.success(), "{}", stderr(&run));
    (out, phi)
}

fn log_file(table: &Path, version: u64) -> PathBuf {
    table.join(format!("_delta_log/{version:020}.json"))
}

/// Rewrites the table's first commit as delta-spark writes a clustered table's (its protocol
/// line, its clustering domain, the table properties of its features), and removes checkpoints
/// so readers replay the rewritten log.
fn make_spark_style(table: &Path, spark: Spark) {
    let first = log_file(table, 0);
    let text = std::fs::read_to_string(&first).unwrap();
    let mut domains = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let mut action: Value = serde_json::from_str(line).unwrap();
            if action.get("protocol").is_some() {
                return spark_protocol(spark).to_string();
            }
            if action.get("domainMetadata").is_some() {
                domains += 1;
                return SPARK_CLUSTERING_DOMAIN.to_string();
            }
            if let Some(metadata) = action.get_mut("metaData") {
                let config = &mut metadata["configuration"];
                if spark != Spark::Clustered {
                    config["delta.enableDeletionVectors"] = json!("true");
                }
                if spark == Spark::V2Checkpoints {
                    config["delta.checkpointPolicy"] = json!("v2");
                }
            }
            line.to_string()
        })
        .collect();
    assert_eq!(domains, 1, "our table carries its clustering domain");
    std::fs::write(&first, lines.join("\n")).unwrap();
    drop_checkpoints(table);
}

/// Removes the table's checkpoints, so that readers replay its (rewritten) JSON log.
fn drop_checkpoints(table: &Path) {
    let log = std::fs::read_dir(table.join("_delta_log")).unwrap();
    for entry in log.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains(".checkpoint.") || name == "_last_checkpoint" {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
}

/// Deletes the rows with the given ids from the one data file that holds them all, as Spark's
/// DELETE does on a table with deletion vectors: a deletion vector file (written by the Delta
/// kernel's writer) and a commit that removes the file and adds it back with the vector.
fn delete_with_a_deletion_vector(table: &Path, ids: &[String]) {
    use delta_kernel::actions::deletion_vector_writer::{
        KernelDeletionVector, StreamingDeletionVectorWriter,
    };
    let (file, positions) = delta_live_files(table)
        .into_iter()
        .find_map(|file| {
            let rows = parquet_file_rows(&file);
            let positions: Vec<u64> = ids
                .iter()
                .filter_map(|id| rows.iter().position(|r| r["id"] == json!(id)))
                .map(|p| p as u64)
                .collect();
            (positions.len() == ids.len()).then_some((file, positions))
        })
        .expect("one data file holds every row to delete");
    let mut vector = KernelDeletionVector::new();
    vector.add_deleted_row_indexes(positions.iter().copied());
    let mut bytes = Vec::new();
    let mut writer = StreamingDeletionVectorWriter::new(&mut bytes);
    let written = writer.write_deletion_vector(vector).unwrap();
    writer.finalize().unwrap();
    let uuid = uuid::Uuid::new_v4();
    std::fs::write(table.join(format!("deletion_vector_{uuid}.bin")), bytes).unwrap();
    let descriptor = json!({
        "storageType": "u",
        "pathOrInlineDv": z85::encode(uuid.as_bytes()),
        "offset": written.offset,
        "sizeInBytes": written.size_in_bytes,
        "cardinality": written.cardinality,
    });
    let name = file.file_name().unwrap().to_str().unwrap();
    let add = delta_log_actions(table)
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("add").cloned())
        .rfind(|add| add["path"] == json!(name))
        .unwrap();
    let mut with_vector = add.clone();
    with_vector["deletionVector"] = descriptor;
    let remove = json!({"path": name, "deletionTimestamp": 1, "dataChange": true,
        "extendedFileMetadata": true, "partitionValues": {}, "size": add["size"]});
    let version = delta_log_actions(table).len() as u64;
    let commit = [
        json!({"commitInfo": {"timestamp": 1, "operation": "DELETE",
            "operationParameters": {"predicate": "[\"id IN (...)\"]"}}}),
        json!({"remove": remove}),
        json!({"add": with_vector}),
    ]
    .map(|a| a.to_string())
    .join("\n");
    std::fs::write(log_file(table, version), commit).unwrap();
}

/// The sample export with its Patient file changed: the patients in `dropped` left out,
/// `changed` (if any) flipped to another gender, and a `deleted/` bundle deleting the patients in
/// `deleted` (left out of the Patient file too).
fn changed_export(
    dir: &Path,
    dropped: &[usize],
    changed: Option<usize>,
    deleted: &[usize],
) -> PathBuf {
    let export = dir.join("changed-export");
    std::fs::create_dir_all(export.join("deleted")).unwrap();
    for entry in std::fs::read_dir(synthea()).unwrap().flatten() {
        std::fs::copy(entry.path(), export.join(entry.file_name())).unwrap();
    }
    let patients = std::fs::read_to_string(synthea().join("Patient.000.ndjson")).unwrap();
    let mut deletions = Vec::new();
    let lines: Vec<String> = patients
        .lines()
        .enumerate()
        .filter(|(i, line)| {
            if deleted.contains(i) {
                let patient: Value = serde_json::from_str(line).unwrap();
                let url = format!("Patient/{}", patient["id"].as_str().unwrap());
                deletions.push(json!({"request": {"method": "DELETE", "url": url}}));
            }
            !dropped.contains(i) && !deleted.contains(i)
        })
        .map(|(i, line)| {
            if Some(i) != changed {
                return line.to_string();
            }
            let mut patient: Value = serde_json::from_str(line).unwrap();
            let flipped = if patient["gender"] == "male" {
                "female"
            } else {
                "male"
            };
            patient["gender"] = json!(flipped);
            patient.to_string()
        })
        .collect();
    std::fs::write(export.join("Patient.000.ndjson"), lines.join("\n") + "\n").unwrap();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": deletions});
    std::fs::write(
        export.join("deleted/deletions.ndjson"),
        bundle.to_string() + "\n",
    )
    .unwrap();
    export
}

/// The anonymous ids and genders of the sample's patients, in file order.
fn sample_patients() -> Vec<(String, String)> {
    let codebook = cumulus_etl::deid::codebook::Codebook::in_memory(SALT).unwrap();
    std::fs::read_to_string(synthea().join("Patient.000.ndjson"))
        .unwrap()
        .lines()
        .map(|line| {
            let patient: Value = serde_json::from_str(line).unwrap();
            let id = codebook.fake_id("Patient", patient["id"].as_str().unwrap(), false);
            (id, patient["gender"].as_str().unwrap().to_string())
        })
        .collect()
}

/// Every protocol and domain metadata action of the table's log, in order.
fn protocol_and_domains(table: &Path) -> (Vec<Value>, Vec<Value>) {
    let actions: Vec<Value> = delta_log_actions(table).into_iter().flatten().collect();
    let pick = |key: &str| {
        actions
            .iter()
            .filter_map(|a| a.get(key).cloned())
            .collect::<Vec<_>>()
    };
    (pick("protocol"), pick("domainMetadata"))
}

/// Checks a reader's patient rows: the expected ids, each once, with the expected genders.
fn assert_patients(reader: &str, rows: &[Value], expected: &[(String, String)]) {
    let mut seen = BTreeSet::new();
    for row in rows {
        let id = row["id"].as_str().unwrap();
        assert!(seen.insert(id.to_string()), "{reader}: id {id} twice");
    }
    let want: BTreeSet<String> = expected.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(seen, want, "{reader}: the patients");
    for (id, gender) in expected {
        let row = rows.iter().find(|r| r["id"] == json!(id)).unwrap();
        assert_eq!(row["gender"], json!(gender), "{reader}: gender of {id}");
    }
}

/// A changed export run into a Spark-style table: exit 0, the changes visible to both readers,
/// protocol and clustering domain as they were, no key twice.
fn carry_on_a_spark_table(spark: Spark) {
    let deletion_vectors = spark != Spark::Clustered;
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = loaded(tmp.path());
    let patient = out.join("patient");
    make_spark_style(&patient, spark);
    let sample = sample_patients();
    let dropped: Vec<usize> = if deletion_vectors {
        // Spark deleted two patients; the new export no longer has them either, so they must
        // stay deleted when their file is rewritten.
        let ids = [sample[0].0.clone(), sample[2].0.clone()];
        delete_with_a_deletion_vector(&patient, &ids);
        let before = read_both(&patient, &["id", "gender"], true);
        let mut left = sample.clone();
        left.retain(|(id, _)| !ids.contains(id));
        assert_patients("duckdb (the fixture)", &before.duckdb, &left);
        let deltalake = before.deltalake.unwrap();
        assert_patients("deltalake (the fixture)", &deltalake, &left);
        vec![0, 2]
    } else {
        Vec::new()
    };
    // One patient changes, and the export's deleted/ folder deletes another.
    // With deletion vectors alone, no row of the vector's file changes, so it is the deletion
    // that rewrites the file; otherwise the MERGE does.
    let changed = (spark != Spark::DeletionVectors).then_some(1);
    let deleted = 5;
    let export = changed_export(tmp.path(), &dropped, changed, &[deleted]);
    let expected: Vec<(String, String)> = sample
        .iter()
        .enumerate()
        .filter(|(i, _)| !dropped.contains(i) && *i != deleted)
        .map(
            |(i, (id, gender))| match (Some(i) == changed, gender.as_str()) {
                (true, "male") => (id.clone(), "female".to_string()),
                (true, _) => (id.clone(), "male".to_string()),
                (false, _) => (id.clone(), gender.clone()),
            },
        )
        .collect();
    let (protocols_before, domains_before) = protocol_and_domains(&patient);

    let run = etl(&export, &out, &phi);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));

    let (protocols, domains) = protocol_and_domains(&patient);
    assert_eq!(protocols, protocols_before, "the protocol is left as it is");
    assert_eq!(domains, domains_before, "the domains are left as they are");
    let read = read_both(&patient, &["id", "gender"], true);
    assert_patients("duckdb", &read.duckdb, &expected);
    assert_patients("deltalake", read.deltalake.as_ref().unwrap(), &expected);
    let mut want = spark_protocol(spark)["protocol"].clone();
    if !deletion_vectors {
        want["readerFeatures"] = Value::Null;
    }
    assert_eq!(
        read.protocol.unwrap(),
        want,
        "the protocol, read from the checkpoint"
    );
    if spark == Spark::V2Checkpoints {
        let log = std::fs::read_dir(patient.join("_delta_log")).unwrap();
        let checkpoints: Vec<PathBuf> = log
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".checkpoint.parquet"))
            .collect();
        assert!(!checkpoints.is_empty(), "a checkpoint was written");
        let rows = parquet_file_rows(&checkpoints[0]);
        assert!(
            rows.iter().any(|r| r.get("checkpointMetadata").is_some()),
            "it follows the V2 spec"
        );
    }
    if deletion_vectors {
        let removed_vector = delta_log_actions(&patient)
            .into_iter()
            .flatten()
            .filter_map(|a| a.get("remove").cloned())
            .any(|r| r.get("deletionVector").is_some());
        assert!(
            removed_vector,
            "the rewritten file's remove carries its deletion vector"
        );
    }
}

#[test]
fn a_changed_export_goes_into_a_spark_clustered_table() {
    carry_on_a_spark_table(Spark::Clustered);
}

#[test]
fn a_changed_export_goes_into_a_spark_table_whose_file_has_a_deletion_vector() {
    carry_on_a_spark_table(Spark::DeletionVectors);
}

#[test]
fn a_changed_export_goes_into_a_spark_table_with_v2_checkpoints() {
    carry_on_a_spark_table(Spark::V2Checkpoints);
}

#[test]
fn new_tables_are_clustered_by_their_uniqueness_fields_and_both_readers_read_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, _) = loaded(tmp.path());
    let cases = [
        ("patient", vec!["id"]),
        ("encounter", vec!["id"]),
        (
            "etl__completion_encounters",
            vec!["encounter_id", "group_name"],
        ),
        (
            "etl__completion",
            vec!["table_name", "group_name", "export_time", "etl_time"],
        ),
    ];
    for (name, columns) in cases {
        let table = out.join(name);
        let (protocols, domains) = protocol_and_domains(&table);
        assert_eq!(
            protocols,
            vec![json!({"minReaderVersion": 1, "minWriterVersion": 7,
                "writerFeatures": ["appendOnly", "invariants", "domainMetadata", "clustering"]})],
            "{name}"
        );
        let paths: Vec<Value> = columns.iter().map(|c| json!([c])).collect();
        let config = json!({"clusteringColumns": paths, "domainName": "delta.clustering"});
        assert_eq!(domains.len(), 1, "{name}");
        assert_eq!(domains[0]["domain"], "delta.clustering", "{name}");
        let stored: Value =
            serde_json::from_str(domains[0]["configuration"].as_str().unwrap()).unwrap();
        assert_eq!(stored, config, "{name}");
        // Every data file has statistics for the clustering columns.
        for add in delta_log_actions(&table)
            .into_iter()
            .flatten()
            .filter_map(|a| a.get("add").cloned())
        {
            let stats: Value = serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
            for column in &columns {
                assert!(
                    stats["minValues"].get(column).is_some(),
                    "{name}: no statistics for {column} in {stats}"
                );
            }
        }
        let read = read_both(&table, &columns, true);
        let rows = crate::support::read_delta_rows(&table).len();
        assert!(rows > 0, "{name}");
        assert_eq!(read.duckdb.len(), rows, "{name}: duckdb");
        assert_eq!(read.deltalake.unwrap().len(), rows, "{name}: deltalake");
    }
}

#[test]
fn a_table_with_a_feature_this_tool_cannot_write_is_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = loaded(tmp.path());
    let patient = out.join("patient");
    let first = log_file(&patient, 0);
    let text = std::fs::read_to_string(&first).unwrap();
    let text = text.replace("\"clustering\"]", "\"clustering\",\"rowTracking\"]");
    assert!(text.contains("rowTracking"));
    std::fs::write(&first, text).unwrap();
    drop_checkpoints(&patient);
    let commits = delta_log_actions(&patient).len();
    let run = etl(&changed_export(tmp.path(), &[], Some(1), &[]), &out, &phi);
    assert_ne!(run.status.code(), Some(0));
    let err = stderr(&run);
    assert!(
        err.contains("patient") && err.contains("'rowTracking'"),
        "{err}"
    );
    assert_eq!(
        delta_log_actions(&patient).len(),
        commits,
        "nothing was written"
    );
}

#[test]
fn two_runs_into_the_same_output_at_once_both_succeed_and_leave_one_runs_tables() {
    let tmp = tempfile::tempdir().unwrap();
    let (single, phi) = loaded(tmp.path());
    let both = tmp.path().join("both");
    let start = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
            .args([
                synthea().to_str().unwrap(),
                both.to_str().unwrap(),
                phi.to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (first, second) = (start(), start());
    for run in [first, second] {
        let out = run.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{err}");
        assert!(!err.contains("error"), "{err}");
    }
    for entry in std::fs::read_dir(&single).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = match name.as_str() {
            "JobConfig" | "etl__completion" => continue,
            "etl__completion_encounters" => "encounter_id",
            _ => "id",
        };
        let mine = crate::support::read_delta(&both.join(&name), key);
        let theirs = crate::support::read_delta(&entry.path(), key);
        assert_eq!(mine.len(), theirs.len(), "{name}");
        if key == "id" {
            assert_eq!(mine, theirs, "{name}");
        }
    }
}

#[test]
fn compaction_clusters_rows_by_id_into_narrow_disjoint_files_and_leaves_other_providers_files() {
    // Every range's file open at once: rows go straight to their range, unsorted within it.
    compaction_clusters_into_disjoint_files(None);
}

#[test]
fn a_compaction_whose_range_files_do_not_fit_in_memory_sorts_the_rows_first() {
    // A budget too small to hold every range's open file: the rows are sorted first, which
    // leaves every file sorted by id.
    compaction_clusters_into_disjoint_files(Some("16MiB"));
}

/// Compacts a table of small files with a small target size (and one file another
/// implementation clustered) at `memory`, and checks that the files hold disjoint ranges of
/// ids, each sorted within where the compaction had to sort (a small `memory`).
fn compaction_clusters_into_disjoint_files(memory: Option<&'static str>) {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, SALT);
    let out = tmp.path().join("out");
    let args = |optimize: bool| {
        let mut args = vec!["--batch-size", "50", "--task", "encounter"];
        if let Some(memory) = memory {
            args.extend(["--memory", memory]);
        }
        if !optimize {
            args.push("--no-table-optimization");
        }
        args.extend([
            synthea().to_str().unwrap().to_string().leak() as &str,
            out.to_str().unwrap().to_string().leak(),
            phi.to_str().unwrap().to_string().leak(),
        ]);
        args
    };
    let run = run_etl(&args(false));
    assert!(run.status.success(), "{}", stderr(&run));
    let table = out.join("encounter");
    let rows_before = crate::support::read_delta(&table, "id");
    let files = delta_live_files(&table);
    assert_eq!(files.len(), 25);
    // Small target files, and one batch file that another implementation (Spark) clustered.
    let others = files[3].file_name().unwrap().to_str().unwrap().to_string();
    for version in 0..delta_log_actions(&table).len() as u64 {
        let path = log_file(&table, version);
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|line| {
                let mut action: Value = serde_json::from_str(line).unwrap();
                if let Some(metadata) = action.get_mut("metaData") {
                    metadata["configuration"]["delta.targetFileSize"] = json!("300000");
                }
                if let Some(add) = action.get_mut("add")
                    && add["path"] == json!(others)
                {
                    add["clusteringProvider"] = json!("liquid");
                }
                action.to_string()
            })
            .collect();
        std::fs::write(&path, lines.join("\n")).unwrap();
    }
    drop_checkpoints(&table);

    let run = run_etl(&args(true));
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(crate::support::read_delta(&table, "id"), rows_before);
    let live = delta_live_files(&table);
    assert!(
        live.iter().any(|f| f.ends_with(&others)),
        "the file another implementation clustered is left to it"
    );
    let adds = add_actions(&table);
    let mut ranges = Vec::new();
    for file in live.iter().filter(|f| !f.ends_with(&others)) {
        let name = file.file_name().unwrap().to_str().unwrap();
        let add = adds.iter().rfind(|a| a["path"] == json!(name)).unwrap();
        assert_eq!(add["clusteringProvider"], json!("cumulus-etl"), "{name}");
        let ids: Vec<String> = parquet_file_rows(file)
            .iter()
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect();
        let sorted = ids.windows(2).all(|w| w[0] <= w[1]);
        assert_eq!(
            sorted,
            memory.is_some(),
            "{name} is sorted where it had to be"
        );
        let (lo, hi) = (ids.iter().min().unwrap(), ids.iter().max().unwrap());
        ranges.push((lo.clone(), hi.clone()));
    }
    assert!(ranges.len() > 2, "several target-sized files: {ranges:?}");
    ranges.sort();
    assert!(
        ranges.windows(2).all(|w| w[0].1 < w[1].0),
        "disjoint key ranges: {ranges:?}"
    );
}

/// How many rows a Parquet file has.
fn ids_in_file(file: &Path) -> usize {
    let reader =
        parquet::file::reader::SerializedFileReader::new(std::fs::File::open(file).unwrap())
            .unwrap();
    let rows = parquet::file::reader::FileReader::metadata(&reader)
        .file_metadata()
        .num_rows();
    usize::try_from(rows).unwrap()
}

/// An export of `count` small Patients (ids `p0`, `p1`, ...) in `dir`; those from `speaking_from`
/// on have a language, a nested column, and come in a second file: the table's schema (made
/// from each file's rows) grows by it once the second file's rows are written.
fn many_patients(dir: &Path, count: usize, speaking_from: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = [String::new(), String::new()];
    for i in 0..count {
        let gender = ["female", "male"][i % 2];
        let born = 1930 + i % 80;
        let speaks = match i >= speaking_from {
            true => r#","communication":[{"language":{"coding":[{"code":"en"}]}}]"#,
            false => "",
        };
        let text = &mut files[usize::from(i >= speaking_from)];
        text.push_str(&format!(
            r#"{{"resourceType":"Patient","id":"p{i}","gender":"{gender}","birthDate":"{born}-01-01"{speaks}}}"#
        ));
        text.push('\n');
    }
    for (i, text) in files.iter().enumerate().filter(|(_, t)| !t.is_empty()) {
        std::fs::write(dir.join(format!("Patient.00{i}.ndjson")), text).unwrap();
    }
    std::fs::copy(synthea().join("log.ndjson"), dir.join("log.ndjson")).unwrap();
}

#[test]
fn a_first_load_is_cut_into_key_ranges_as_written_and_compaction_joins_them_without_encoding() {
    // Every batch of the same schema: each range's pieces are joined as they are.
    cut_and_joined(PATIENTS);
}

#[test]
fn pieces_whose_schemas_differ_are_written_again_into_their_ranges_file() {
    // The schema grows in the last batches: the pieces of a range cannot be joined as they are.
    cut_and_joined(PATIENTS - 15_000);
}

#[test]
fn a_large_tables_first_load_is_cut_into_as_many_ranges_as_its_input_promises_files() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    many_patients(&input, PATIENTS, PATIENTS);
    // The table made first, with a small target file size (as a site's table may have), so
    // that 12 MB of Patients promise more compacted files than the two threads.
    let out = tmp.path().join("out");
    let init = run_etl(&["init", out.to_str().unwrap()]);
    assert!(init.status.success(), "{}", stderr(&init));
    let table = out.join("patient");
    // A commit that changes the table's metadata alone, as a property change writes it.
    let log = table.join("_delta_log");
    let first = std::fs::read_to_string(log.join("00000000000000000000.json")).unwrap();
    let mut metadata: Value = first
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|a| a.get("metaData").is_some())
        .unwrap();
    metadata["metaData"]["configuration"]["delta.targetFileSize"] = json!("400000");
    std::fs::write(
        log.join("00000000000000000001.json"),
        format!("{metadata}\n"),
    )
    .unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, SALT);
    let run = run_etl(&[
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
        "--task=patient",
        "--workers=2",
        "--batch-size=50000",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let adds = add_actions(&table);
    let tags: Vec<&str> = adds
        .iter()
        .filter_map(|a| a["tags"]["cumulusEtlRange"].as_str())
        .collect();
    // Each batch cut into as many ranges as the input promises files (a sixth of its bytes
    // over 400 kB), as far as 50,000-row batches give ranges of 8,192 rows (six).
    let bytes = std::fs::metadata(input.join("Patient.000.ndjson"))
        .unwrap()
        .len();
    let promised = (bytes / 6).div_ceil(400_000) as usize;
    assert!(promised > 2, "{bytes} input bytes");
    let expected = promised.min(6);
    let ranges: BTreeSet<&str> = tags.iter().map(|t| t.rsplit(' ').next().unwrap()).collect();
    assert_eq!(
        ranges,
        BTreeSet::from([expected.to_string().as_str()]),
        "{tags:?}"
    );
    assert_eq!(tags.len(), expected * PATIENTS.div_ceil(50_000));
    // Small rows compress little (about 1:1 here, 8:1 for real FHIR), so these pieces make
    // more files than the join takes; with three batches the table keeps them as they are
    // (the join itself is tested with two ranges above, and its plan with more in unit tests).
    let read = read_both(&table, &["id", "gender"], true);
    assert_eq!(read.duckdb.len(), PATIENTS);
    assert_eq!(read.deltalake.unwrap().len(), PATIENTS);
}

/// Every `add` action of a table's log, oldest first.
fn add_actions(table: &Path) -> Vec<Value> {
    delta_log_actions(table)
        .into_iter()
        .flatten()
        .filter_map(|a| a.get("add").cloned())
        .collect()
}

const PATIENTS: usize = 140_000;

/// Loads `PATIENTS` patients (those from `speaking_from` on with a language) into a new
/// Delta table in batches cut into key ranges, and checks the compaction that joins them.
fn cut_and_joined(speaking_from: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    many_patients(&input, PATIENTS, speaking_from);
    // Batches of 10,000 rows on two workers, each cut into two key ranges as it is written;
    // and the same export written without compaction (and so without cutting), to compare.
    let load = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let phi = tmp.path().join(format!("{name}-phi"));
        phi_with_salt(&phi, SALT);
        let mut args = vec![
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            phi.to_str().unwrap(),
            "--task=patient",
            "--workers=2",
            "--batch-size=10000",
        ];
        args.extend(extra);
        let run = run_etl(&args);
        assert!(run.status.success(), "{}", stderr(&run));
        out.join("patient")
    };
    let uncut = load("uncut", &["--no-table-optimization"]);
    let table = load("cut", &[]);
    assert_eq!(
        crate::support::read_delta(&table, "id"),
        crate::support::read_delta(&uncut, "id")
    );
    let adds = add_actions(&table);
    // Every batch was written as pieces: a file per key range, tagged with the cut and range.
    let pieces: Vec<&Value> = adds
        .iter()
        .filter(|a| a["tags"]["cumulusEtlRange"].is_string())
        .collect();
    let batches: BTreeSet<&str> = pieces
        .iter()
        .map(|a| a["tags"]["cumulusEtlBatch"].as_str().unwrap())
        .collect();
    assert_eq!(batches.len(), PATIENTS / 10_000);
    assert_eq!(pieces.len(), 2 * batches.len(), "two ranges per batch");
    let cuts: BTreeSet<&str> = pieces
        .iter()
        .map(|a| a["tags"]["cumulusEtlRange"].as_str().unwrap())
        .map(|tag| tag.split(' ').next().unwrap())
        .collect();
    assert_eq!(cuts.len(), 1, "one cut for the run");
    // Compaction joined each range's pieces into a file of their row groups, copied as written.
    let live = delta_live_files(&table);
    assert_eq!(live.len(), 2, "{live:?}");
    let mut ranges = Vec::new();
    for file in &live {
        let name = file.file_name().unwrap().to_str().unwrap();
        let add = adds.iter().rfind(|a| a["path"] == name).unwrap();
        assert_eq!(add["clusteringProvider"], "cumulus-etl", "{name}");
        assert!(
            add["tags"].get("cumulusEtlRange").is_none(),
            "{name}: {add}"
        );
        let reader =
            parquet::file::reader::SerializedFileReader::new(std::fs::File::open(file).unwrap())
                .unwrap();
        let groups = parquet::file::reader::FileReader::metadata(&reader).num_row_groups();
        match speaking_from < PATIENTS {
            false => assert_eq!(groups, batches.len(), "{name}: a row group per piece"),
            // Decoded and encoded again, in row groups of 65,536 rows.
            true => assert_eq!(groups, ids_in_file(file).div_ceil(65_536), "{name}"),
        }
        let rows = parquet_file_rows(file);
        let ids: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
        let (lo, hi) = (*ids.iter().min().unwrap(), *ids.iter().max().unwrap());
        // The joined file's statistics are its rows'.
        let stats: Value = serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
        assert_eq!(stats["numRecords"], ids.len(), "{name}");
        assert_eq!(stats["minValues"]["id"], lo, "{name}");
        assert_eq!(stats["maxValues"]["id"], hi, "{name}");
        assert_eq!(stats["nullCount"]["id"], 0, "{name}");
        let genders: BTreeSet<&str> = rows.iter().map(|r| r["gender"].as_str().unwrap()).collect();
        assert_eq!(
            stats["minValues"]["gender"],
            *genders.first().unwrap(),
            "{name}"
        );
        ranges.push((lo.to_string(), hi.to_string(), ids.len()));
    }
    ranges.sort();
    assert!(ranges[0].1 < ranges[1].0, "disjoint key ranges: {ranges:?}");
    assert!(
        ranges.iter().all(|r| r.2 > PATIENTS / 4),
        "about equal ranges: {ranges:?}"
    );
    // Other readers read the joined files.
    let read = read_both(&table, &["id", "gender"], true);
    assert_eq!(read.duckdb.len(), PATIENTS);
    assert_eq!(read.deltalake.unwrap().len(), PATIENTS);
}

#[test]
fn an_unchanged_export_leaves_a_deletion_vector_in_place_and_says_what_the_manifest_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = loaded(tmp.path());
    let patient = out.join("patient");
    make_spark_style(&patient, Spark::DeletionVectors);
    let sample = sample_patients();
    let ids = [sample[0].0.clone(), sample[2].0.clone()];
    delete_with_a_deletion_vector(&patient, &ids);
    let commits = delta_log_actions(&patient).len();
    // The export without the deleted patients: nothing changes.
    let export = changed_export(tmp.path(), &[0, 2], None, &[]);
    let run = etl(&export, &out, &phi);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let data_commits = delta_log_actions(&patient)[commits..]
        .iter()
        .flatten()
        .filter(|a| a.get("add").is_some() || a.get("remove").is_some())
        .count();
    assert_eq!(data_commits, 0, "the file with the vector is left as it is");
    let err = stderr(&run);
    assert!(
        err.contains("note: patient has files with deletion vectors"),
        "{err}"
    );
    let mut left = sample.clone();
    left.retain(|(id, _)| !ids.contains(id));
    let read = read_both(&patient, &["id", "gender"], true);
    assert_patients("duckdb", &read.duckdb, &left);
    assert_patients("deltalake", read.deltalake.as_ref().unwrap(), &left);
}
