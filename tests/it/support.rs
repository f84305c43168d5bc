//! Helpers shared by the integration tests: running the real binary, reading NDJSON tables.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The bundled Synthea sample.
pub fn synthea() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/synthea-10")
}

/// Runs the `cumulus-etl` binary built for this test run.
pub fn run_etl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .args(args)
        .output()
        .expect("binary runs")
}

/// Stderr of a run, for assertions and failure messages.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// All rows of an NDJSON table folder, keyed by `key` (every file of the table).
pub fn read_table(dir: &Path, key: &str) -> BTreeMap<String, Value> {
    let mut rows = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return rows;
    };
    let mut files: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    for f in files
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "ndjson"))
    {
        for line in std::fs::read_to_string(&f)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
        {
            let v: Value = serde_json::from_str(line).unwrap();
            let k = v[key]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string());
            rows.insert(k, v);
        }
    }
    rows
}

/// Writes a PHI folder holding a codebook with the given salt.
pub fn phi_with_salt(dir: &Path, salt: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("codebook.json"),
        format!(r#"{{"version":1,"id_salt":"{salt}","codebook_id":"test-codebook"}}"#),
    )
    .unwrap();
}
