//! Helpers shared by the integration tests: running the real binary, reading NDJSON tables.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

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

/// Runs the binary with extra environment variables; a run still going after `limit` is
/// killed and fails the test (a hang).
pub fn run_etl_within(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_cumulus-etl"))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary runs");
    // Drained beside the wait, so a chatty run cannot block on a full pipe.
    let mut stderr = child.stderr.take().unwrap();
    let drain = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let text = drain.join().unwrap();
            panic!(
                "the run hung: still going after {limit:?}\n{}",
                String::from_utf8_lossy(&text)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = Vec::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut stdout)
        .unwrap();
    Output {
        status,
        stdout,
        stderr: drain.join().unwrap(),
    }
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

/// The actions of each commit in a Delta table's log (`_delta_log/*.json`), in order.
pub fn delta_log_actions(table: &Path) -> Vec<Vec<Value>> {
    let mut commits: Vec<PathBuf> = std::fs::read_dir(table.join("_delta_log"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    commits.sort();
    commits
        .iter()
        .map(|commit| {
            std::fs::read_to_string(commit)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect()
        })
        .collect()
}

/// The data files a Delta table's log says are live, read from `_delta_log/*.json` directly
/// (add minus remove), so the check does not trust the writer's own reader.
pub fn delta_live_files(table: &Path) -> Vec<PathBuf> {
    let mut live = std::collections::BTreeSet::new();
    for action in delta_log_actions(table).into_iter().flatten() {
        if let Some(path) = action["add"]["path"].as_str() {
            live.insert(percent_decode(path));
        }
        if let Some(path) = action["remove"]["path"].as_str() {
            live.remove(&percent_decode(path));
        }
    }
    live.into_iter().map(|p| table.join(p)).collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Every live row of a Delta table as JSON (nulls left out), in file order.
pub fn read_delta_rows(table: &Path) -> Vec<Value> {
    delta_live_files(table)
        .iter()
        .flat_map(|file| parquet_file_rows(file))
        .collect()
}

/// Every row of the Parquet files of a table folder (`*.parquet`, in name order) as JSON.
pub fn read_parquet_rows(dir: &Path) -> Vec<Value> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "parquet"))
        .flat_map(|f| parquet_file_rows(f))
        .collect()
}

/// The rows of one Parquet file as JSON (nulls left out).
pub fn parquet_file_rows(file: &Path) -> Vec<Value> {
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut rows = Vec::new();
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(file).unwrap())
        .unwrap()
        .build()
        .unwrap();
    for batch in reader {
        let batch = batch.unwrap();
        let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
        writer.write(&batch).unwrap();
        writer.finish().unwrap();
        let text = writer.into_inner();
        for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            rows.push(serde_json::from_slice(line).unwrap());
        }
    }
    rows
}

/// The live rows of a Delta table keyed by `key`; panics on a duplicate key.
pub fn read_delta(table: &Path, key: &str) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for row in read_delta_rows(table) {
        let k = row[key].as_str().expect("string key").to_string();
        assert!(
            out.insert(k.clone(), row).is_none(),
            "duplicate {key} {k} in {}",
            table.display()
        );
    }
    out
}

/// The keyed tables of an output folder (all but `etl__completion`, keyed by run time), read
/// back.
pub fn keyed_tables(root: &Path) -> BTreeMap<String, BTreeMap<String, Value>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let key = match name.as_str() {
            "etl__completion" | "JobConfig" => continue,
            "etl__completion_encounters" => "encounter_id",
            _ => "id",
        };
        out.insert(name, read_delta(&entry.path(), key));
    }
    out
}
