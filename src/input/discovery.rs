//! Finds the NDJSON files of a bulk export and works out which resource type each one holds,
//! following Cumulus ETL's rules: recursive scan, `.ndjson`/`.jsonl` (optionally `.gz`), type
//! from the file name or else from the first line. The input is listed once ([`Listing`]); the
//! export log and `deleted/` are found in the same listing, which on S3 saves a listing each.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read};

use anyhow::Result;

use crate::fhir::model::ElementModel;
use crate::store::objects::ObjectEntry;
use crate::store::{ObjectLocation, StoredObject};

/// Every object under the input location, listed once.
pub struct Listing {
    pub root: ObjectLocation,
    pub entries: Vec<ObjectEntry>,
}

impl Listing {
    /// Lists `root` recursively.
    pub fn of(root: &ObjectLocation) -> Result<Listing> {
        Ok(Listing {
            root: root.clone(),
            entries: root.list()?,
        })
    }

    /// The objects whose keys start with `prefix`, with their sizes.
    pub fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (StoredObject, u64)> + 'a {
        self.entries
            .iter()
            .filter(move |e| e.key.starts_with(prefix))
            .map(|e| (self.root.object(&e.key), e.size))
    }
}

/// One input file and the resource type it holds.
#[derive(Debug, Clone)]
pub struct InputFile {
    pub object: StoredObject,
    pub resource_type: String,
    pub size: u64,
}

/// How many times a gzipped FHIR NDJSON file grows when read, at the low end (Synthea's
/// Condition and Encounter files: 10 and 14 times); sizes a table's cut from its input.
const GZIP_RATIO: u64 = 8;

impl InputFile {
    /// How messages name it: its path or URL.
    pub fn name(&self) -> &str {
        self.object.name()
    }

    /// About how many bytes of NDJSON it holds: its size, or a gzipped file's times 8.
    pub fn ndjson_bytes(&self) -> u64 {
        match self.name().ends_with(".gz") {
            true => self.size.saturating_mul(GZIP_RATIO),
            false => self.size,
        }
    }
}

/// A file that looked like NDJSON but could not be used, with the reason (no PHI).
#[derive(Debug, Clone)]
pub struct UnreadableFile {
    pub name: String,
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
pub fn is_ndjson_name(name: &str) -> bool {
    let name = name.to_lowercase();
    let good = |s: &str| s.ends_with(".ndjson") || s.ends_with(".jsonl");
    good(&name) || name.strip_suffix(".gz").is_some_and(good)
}

/// The resource type named in a file name, when exactly one known type appears in it.
pub fn type_from_name(name: &str, model: &ElementModel) -> Option<String> {
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

fn type_from_first_line(object: &StoredObject) -> Result<Option<String>> {
    let mut reader = BufReader::new(object.open_decoded()?);
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

/// The NDJSON files of the `wanted` types (all types when `None`) in a listing.
pub fn discover(
    listing: &Listing,
    wanted: Option<&HashSet<String>>,
    model: &ElementModel,
) -> Result<Discovery> {
    let mut out = Discovery::default();
    for (object, size) in listing.under("") {
        if !is_ndjson_name(object.file_name()) {
            continue;
        }
        let resource_type = match type_from_name(object.file_name(), model) {
            Some(t) => Some(t),
            None => match type_from_first_line(&object) {
                Ok(t) => t,
                Err(e) => {
                    let reason = format!("could not read its first line ({})", short_error(&e));
                    let name = object.name().to_string();
                    out.unreadable.push(UnreadableFile { name, reason });
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
        out.files.push(InputFile {
            object,
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
        assert!(is_ndjson_name("Patient.000.ndjson"));
        assert!(is_ndjson_name("x.JSONL.GZ"));
        assert!(!is_ndjson_name("x.json"));
        assert!(!is_ndjson_name("x.gz"));
        assert_eq!(
            type_from_name("1.Patient.ndjson", model).as_deref(),
            Some("Patient")
        );
        assert_eq!(type_from_name("Patient-Encounter.ndjson", model), None);
        assert_eq!(type_from_name("data.ndjson", model), None);
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
        let root = ObjectLocation::local(dir.path()).unwrap();
        let listing = Listing::of(&root).unwrap();
        let found = discover(&listing, None, ElementModel::r4()).unwrap();
        assert_eq!(found.files.len(), 1);
        assert_eq!(found.files[0].resource_type, "Condition");
        assert_eq!(found.unreadable.len(), 1);
    }
}
