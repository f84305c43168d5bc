//! Finds the NDJSON files of a bulk export and works out which resource type each one holds,
//! following Cumulus ETL's rules: recursive scan, `.ndjson`/`.jsonl` (optionally `.gz`), type
//! from the file name or else from the first line.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::fhir::model::ElementModel;
use crate::store;

/// One input file and the resource type it holds.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub path: PathBuf,
    pub resource_type: String,
    pub size: u64,
}

/// A file that looked like NDJSON but could not be used, with the reason (no PHI).
#[derive(Debug, Clone)]
pub struct UnreadableFile {
    pub path: PathBuf,
    pub reason: String,
}

/// What a scan of the input folder found.
#[derive(Debug, Default)]
pub struct Discovery {
    pub files: Vec<InputFile>,
    pub unreadable: Vec<UnreadableFile>,
}

impl Discovery {
    /// The resource types present in the input.
    pub fn resource_types(&self) -> HashSet<String> {
        self.files.iter().map(|f| f.resource_type.clone()).collect()
    }
}

/// Whether a file name has an NDJSON suffix, optionally followed by `.gz`.
pub fn is_ndjson_name(path: &Path) -> bool {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let good = |s: &str| s.ends_with(".ndjson") || s.ends_with(".jsonl");
    good(&name) || name.strip_suffix(".gz").is_some_and(good)
}

/// The resource type named in a file name, when exactly one known type appears in it.
pub fn type_from_name(path: &Path, model: &ElementModel) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    let found: HashSet<&str> = name
        .split(|c: char| !c.is_ascii_alphabetic())
        .filter(|piece| !piece.is_empty() && model.is_resource(piece))
        .collect();
    if found.len() == 1 {
        found.into_iter().next().map(str::to_string)
    } else {
        None
    }
}

fn type_from_first_line(path: &Path) -> Result<Option<String>> {
    let mut reader = BufReader::new(store::open_maybe_gz(path)?);
    let mut line = Vec::new();
    // Skip blank lines; a first line longer than 16 MiB is not worth reading for its type.
    loop {
        line.clear();
        let n = reader
            .by_ref()
            .take(16 << 20)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(None);
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    let value: serde_json::Value = serde_json::from_slice(&line)?;
    Ok(value
        .get("resourceType")
        .and_then(|v| v.as_str())
        .map(str::to_string))
}

/// Scans `root` recursively for NDJSON files of the `wanted` types (all types when `None`).
pub fn discover(
    root: &Path,
    wanted: Option<&HashSet<String>>,
    model: &ElementModel,
) -> Result<Discovery> {
    let mut out = Discovery::default();
    for path in store::list_files_recursive(root)? {
        if !is_ndjson_name(&path) {
            continue;
        }
        let resource_type = match type_from_name(&path, model) {
            Some(t) => Some(t),
            None => match type_from_first_line(&path) {
                Ok(t) => t,
                Err(e) => {
                    let reason = format!("could not read its first line ({})", short_error(&e));
                    out.unreadable.push(UnreadableFile { path, reason });
                    continue;
                }
            },
        };
        let Some(resource_type) = resource_type else {
            continue;
        };
        if wanted.is_some_and(|w| !w.contains(&resource_type)) {
            continue;
        }
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        out.files.push(InputFile {
            path,
            resource_type,
            size,
        });
    }
    Ok(out)
}

/// An error's message without a chain that might quote input text.
pub fn short_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<serde_json::Error>() {
        Some(j) => format!("invalid JSON at column {}", j.column()),
        None => e.root_cause().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_follow_cumulus_rules() {
        let model = ElementModel::r4();
        assert!(is_ndjson_name(Path::new("a/Patient.000.ndjson")));
        assert!(is_ndjson_name(Path::new("x.JSONL.GZ")));
        assert!(!is_ndjson_name(Path::new("x.json")));
        assert!(!is_ndjson_name(Path::new("x.gz")));
        assert_eq!(
            type_from_name(Path::new("1.Patient.ndjson"), model).as_deref(),
            Some("Patient")
        );
        assert_eq!(
            type_from_name(Path::new("Patient-Encounter.ndjson"), model),
            None
        );
        assert_eq!(type_from_name(Path::new("data.ndjson"), model), None);
    }

    #[test]
    fn type_comes_from_first_line_when_name_has_none() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("data.ndjson"),
            "\n{\"resourceType\":\"Condition\"}\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("log.ndjson"), "{\"eventId\":\"kickoff\"}\n").unwrap();
        std::fs::write(dir.path().join("bad.ndjson"), "{nope\n").unwrap();
        let found = discover(dir.path(), None, ElementModel::r4()).unwrap();
        assert_eq!(found.files.len(), 1);
        assert_eq!(found.files[0].resource_type, "Condition");
        assert_eq!(found.unreadable.len(), 1);
    }
}
