//! Whole runs of the binary on the bundled Synthea sample: NDJSON and Parquet tables, run
//! metadata, the codebook, exit codes.

use std::fs::File;

use parquet::file::reader::{FileReader, SerializedFileReader};
use serde_json::Value;

use crate::support::{phi_with_salt, read_table, run_etl, stderr, synthea};

fn line_count(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

#[test]
fn ndjson_run_writes_every_table_with_anonymized_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    phi_with_salt(&phi, "1234");
    let run = run_etl(&[
        "--output-format",
        "ndjson",
        "--batch-size",
        "500",
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));

    // Every input row arrives once (no duplicates in Synthea), ids are 64-hex hashes.
    let input_rows = line_count(&synthea().join("Encounter.000.ndjson"));
    let encounters = read_table(&out.join("encounter"), "id");
    assert_eq!(encounters.len(), input_rows);
    assert!(
        encounters
            .keys()
            .all(|id| id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()))
    );
    // --batch-size splits the 1215 encounters into files of at most 500 rows.
    let files = std::fs::read_dir(out.join("encounter")).unwrap().count();
    assert_eq!(files, 3);
    // No PHI: the Synthea names and street lines never reach the patient table.
    let patients = std::fs::read_to_string(out.join("patient/patient.000.ndjson")).unwrap();
    assert!(
        !patients.contains("\"name\"")
            && !patients.contains("\"line\"")
            && !patients.contains("\"telecom\"")
    );
    let p: Value = serde_json::from_str(patients.lines().next().unwrap()).unwrap();
    assert_eq!(p["birthDate"].as_str().unwrap().len(), 4);

    // Completion tracking: one row per encounter, and one etl__completion row per task.
    let tracked = read_table(&out.join("etl__completion_encounters"), "encounter_id");
    assert_eq!(tracked.len(), input_rows);
    let first = tracked.values().next().unwrap();
    assert_eq!(first["group_name"], "sample-10");
    assert_eq!(first["export_time"], "2024-08-06T18:12:57+00:00");
    let completion_files = std::fs::read_dir(out.join("etl__completion"))
        .unwrap()
        .count();
    assert_eq!(completion_files, 13, "one file per task that had input");

    // Codebook: the cached mappings hold every patient and encounter id seen.
    let cached: Value =
        serde_json::from_slice(&std::fs::read(phi.join("codebook-cached-mappings.json")).unwrap())
            .unwrap();
    assert_eq!(cached["Encounter"].as_object().unwrap().len(), input_rows);
    assert!(phi.join("context.json").exists());

    // Job metadata.
    let job_dirs: Vec<_> = std::fs::read_dir(out.join("JobConfig"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(job_dirs.len(), 1);
    let config: Value =
        serde_json::from_slice(&std::fs::read(job_dirs[0].path().join("job_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["codebook_id"], "test-codebook");
    assert_eq!(config["export_group_name"], "sample-10");
    assert!(
        config["tasks"]
            .as_str()
            .unwrap()
            .starts_with("encounter,patient,")
    );
    let summary: Value =
        serde_json::from_slice(&std::fs::read(job_dirs[0].path().join("encounter.json")).unwrap())
            .unwrap();
    assert_eq!(summary["success"], input_rows as u64);

    // A second run into the same (non-empty) folder is refused, like Cumulus ETL.
    let again = run_etl(&[
        "--output-format",
        "ndjson",
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(26), "{}", stderr(&again));
}

#[test]
fn parquet_run_reads_back_with_the_same_row_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let (ndjson_out, parquet_out, phi) = (
        tmp.path().join("nd"),
        tmp.path().join("pq"),
        tmp.path().join("phi"),
    );
    phi_with_salt(&phi, "1234");
    let input = synthea();
    for (fmt, out) in [("ndjson", &ndjson_out), ("parquet", &parquet_out)] {
        let run = run_etl(&[
            "etl",
            "--output-format",
            fmt,
            "--task",
            "patient,encounter,condition,medicationrequest",
            input.to_str().unwrap(),
            out.to_str().unwrap(),
            phi.to_str().unwrap(),
        ]);
        assert!(run.status.success(), "{fmt}: {}", stderr(&run));
    }
    for table in [
        "patient",
        "encounter",
        "condition",
        "medicationrequest",
        "etl__completion_encounters",
    ] {
        let expected = read_table(
            &ndjson_out.join(table),
            if table.starts_with("etl") {
                "encounter_id"
            } else {
                "id"
            },
        )
        .len();
        let mut rows = 0;
        for entry in std::fs::read_dir(parquet_out.join(table))
            .unwrap()
            .flatten()
        {
            let reader = SerializedFileReader::new(File::open(entry.path()).unwrap()).unwrap();
            rows += reader.metadata().file_metadata().num_rows() as usize;
            let schema = reader.metadata().file_metadata().schema_descr();
            if !table.starts_with("etl") {
                // wide: every top-level R4 element is a column, e.g. `meta` and `text`
                let names: Vec<_> = schema
                    .root_schema()
                    .get_fields()
                    .iter()
                    .map(|f| f.name().to_string())
                    .collect();
                assert!(
                    names.contains(&"meta".to_string()) && names.contains(&"id".to_string()),
                    "{names:?}"
                );
            }
        }
        assert_eq!(rows, expected, "{table}");
    }
}

#[test]
fn task_help_unknown_task_and_missing_input_use_reference_exit_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    let input = synthea();
    fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["etl", "--output-format=ndjson"];
        a.extend_from_slice(extra);
        a
    }
    let mut a = args(&["--task", "help"]);
    a.extend([
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    let help = run_etl(&a);
    assert_eq!(help.status.code(), Some(35));
    assert!(stderr(&help).contains("medicationrequest"));
    let mut a = args(&["--task", "nonsense"]);
    a.extend([
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert_eq!(run_etl(&a).status.code(), Some(17));
    let mut a = args(&["--task", "observation"]);
    a.extend([
        input.to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert_eq!(
        run_etl(&a).status.code(),
        Some(36),
        "Observation is not in the sample"
    );
    let missing = run_etl(&args(&[
        "/no/such/folder",
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]));
    assert_eq!(missing.status.code(), Some(54));
    // The file formats want a fresh folder (Delta tables are updated in place).
    let used = tmp.path().join("used");
    std::fs::create_dir_all(used.join("patient")).unwrap();
    let not_empty = run_etl(&[
        "etl",
        "--output-format=ndjson",
        input.to_str().unwrap(),
        used.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert_eq!(not_empty.status.code(), Some(26), "{}", stderr(&not_empty));
    let version = run_etl(&["--version"]);
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("cumulus-etl "));
}

#[test]
fn a_small_memory_budget_still_completes_with_all_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (out, phi) = (tmp.path().join("out"), tmp.path().join("phi"));
    let run = run_etl(&[
        "--output-format=ndjson",
        "--memory",
        "16MiB",
        "--workers",
        "2",
        "--task",
        "documentreference,procedure",
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(
        read_table(&out.join("documentreference"), "id").len(),
        line_count(&synthea().join("DocumentReference.000.ndjson"))
    );
    assert_eq!(
        read_table(&out.join("procedure"), "id").len(),
        line_count(&synthea().join("Procedure.000.ndjson"))
    );
    // A fresh PHI folder gets a new codebook with a 32-byte salt.
    let cb: Value =
        serde_json::from_slice(&std::fs::read(phi.join("codebook.json")).unwrap()).unwrap();
    assert_eq!(cb["id_salt"].as_str().unwrap().len(), 64);
}

/// Options and commands Cumulus ETL removed exit 59 with its pointer to their replacement, not
/// as unknown arguments.
#[test]
fn removed_options_and_commands_exit_59_with_upstreams_pointer() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = |name: &str| tmp.path().join(name).to_str().unwrap().to_string();
    let (input, output, phi) = (dir("in"), dir("out"), dir("phi"));
    for flag in [
        "--fhir-url=http://ehr",
        "--smart-client-id=x",
        "--smart-key=k",
        "--smart-jwks=k",
        "--basic-user=u",
        "--basic-passwd=p",
        "--bearer-token=t",
        "--since=2020",
        "--until=2021",
        "--resume=url",
        "--export-to=dir",
    ] {
        let run = run_etl(&["etl", flag, &input, &output, &phi]);
        let name = flag.split('=').next().unwrap();
        assert_eq!(run.status.code(), Some(59), "{flag}: {}", stderr(&run));
        assert!(
            stderr(&run).starts_with(&format!(
                "The {name} flag has been removed.\nPlease use SMART Fetch"
            )),
            "{flag}: {}",
            stderr(&run)
        );
    }
    let nlp = run_etl(&["nlp", "--bearer-token", "t", &input, &output, &phi]);
    assert_eq!(nlp.status.code(), Some(59), "{}", stderr(&nlp));
    // `--since` never was an NLP option: an unknown argument there.
    let nlp = run_etl(&["nlp", "--since=2020", &input, &output, &phi]);
    assert_eq!(nlp.status.code(), Some(2), "{}", stderr(&nlp));
    for (command, replacement) in [
        ("export", "'smart-fetch bulk'"),
        ("inline", "'smart-fetch hydrate --tasks inline'"),
    ] {
        let run = run_etl(&[command, &input]);
        assert_eq!(run.status.code(), Some(59), "{command}");
        assert!(
            stderr(&run).contains(&format!("Please use {replacement} instead.")),
            "{command}: {}",
            stderr(&run)
        );
    }
}

/// The permission bits of a file or folder.
#[cfg(unix)]
fn mode(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn phi_files_and_rejected_rows_are_readable_by_their_owner_only() {
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    let (out, errors) = (tmp.path().join("out"), tmp.path().join("errors"));
    let run = run_etl(&[
        "--output-format=ndjson",
        "--errors-to",
        errors.to_str().unwrap(),
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(!stderr(&run).contains("can be read by other users"));
    assert_eq!(mode(&phi), 0o700);
    for file in [
        "codebook.json",
        "codebook-cached-mappings.json",
        "context.json",
    ] {
        assert_eq!(mode(&phi.join(file)), 0o600, "{file}");
    }
    assert_eq!(mode(&errors), 0o700);
    assert_eq!(mode(&errors.join("rejected-rows.ndjson")), 0o600);
    // The tables are for everyone the output folder lets in.
    let table = std::fs::read_dir(out.join("patient"))
        .unwrap()
        .next()
        .unwrap();
    assert_eq!(mode(&table.unwrap().path()) & 0o044, 0o044);
}

#[cfg(unix)]
#[test]
fn a_phi_folder_others_can_read_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    phi_with_salt(&phi, "1234");
    std::fs::set_permissions(&phi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = tmp.path().join("out");
    let run = run_etl(&[
        "--output-format=ndjson",
        synthea().to_str().unwrap(),
        out.to_str().unwrap(),
        phi.to_str().unwrap(),
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let err = stderr(&run);
    let warning = err
        .lines()
        .find(|l| l.contains("can be read by other users"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    assert!(
        warning.contains("mode 755") && warning.contains("chmod -R go-rwx"),
        "{warning}"
    );
    // Files the run writes there are private all the same.
    assert_eq!(mode(&phi.join("codebook-cached-mappings.json")), 0o600);
}
