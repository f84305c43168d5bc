//! The file layout of NLP results (Cumulus ETL's NLP formats): `<root>/<study>/<name>_v<N>/
//! <name>_v<N>.NNN.<ext>`, plus `<name>_v<N>.ids` listing the notes (groups) whose rows are
//! written, appended after every successful batch.

use anyhow::Result;

use crate::json::top_level::top_level_str;
use crate::store::ObjectLocation;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use super::{
    BatchWriter, BatchedFiles, OnWritten, OutputFormat, Outputs, RowBatch, TableKind, TableWriter,
};

/// The study folder of NLP table `table` (`<study>__<name>`) under `root`, and the table's
/// name in it.
fn study_folder(root: &ObjectLocation, table: &str) -> (ObjectLocation, String) {
    let (study, short) = table.split_once("__").unwrap_or((table, table));
    (root.join(study), short.to_string())
}

/// The folder of NLP table `table` at `version` under `root` (`<study>/<name>_v<version>`).
pub fn table_folder(root: &ObjectLocation, table: &str, version: i32) -> ObjectLocation {
    let (dir, short) = study_folder(root, table);
    dir.join(&format!("{short}_v{version}"))
}

/// The notes (groups) an earlier run of `table` at `version` finished, from its `.ids` list;
/// none when there is no list.
pub fn finished_groups(
    root: &ObjectLocation,
    table: &str,
    version: i32,
) -> Result<HashSet<String>> {
    let (dir, short) = study_folder(root, table);
    let Some(text) = dir.read(&format!("{short}_v{version}.ids"))? else {
        return Ok(HashSet::new());
    };
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// Removes every earlier result of `table` (every version's folder and `.ids` list), as
/// upstream's `--clean` does; returns how many objects went.
pub fn clean(root: &ObjectLocation, table: &str) -> Result<usize> {
    let (dir, short) = study_folder(root, table);
    let prefix = format!("{short}_v");
    let mut removed = 0;
    for entry in dir.list()? {
        let Some(rest) = entry.key.strip_prefix(&prefix) else {
            continue;
        };
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let after = &rest[digits..];
        if digits > 0 && (after == ".ids" || after.starts_with('/')) {
            dir.delete(&entry.key)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// The writer of an NLP table in a file format.
pub fn open(outputs: &Outputs, table: &str, version: i32, kind: TableKind) -> Box<dyn TableWriter> {
    let (study_dir, short) = study_folder(&outputs.root, table);
    let name = format!("{short}_v{version}");
    let files = BatchedFiles::in_dir(
        study_dir.join(&name),
        &name,
        outputs.format.name(),
        outputs.syncer(),
    );
    let group_field: Arc<str> = kind.group_field().unwrap_or("id").into();
    let inner: Box<dyn TableWriter> = match outputs.format {
        OutputFormat::Parquet => Box::new(super::parquet::ParquetTable::new(files, kind)),
        _ => Box::new(super::ndjson::NdjsonTable::new(files)),
    };
    Box::new(GroupIdsWriter {
        inner,
        ids: Arc::new(Mutex::new((study_dir, format!("{name}.ids")))),
        group_field,
    })
}

/// Records the groups of each written batch next to the table.
struct GroupIdsWriter {
    inner: Box<dyn TableWriter>,
    /// The study folder and the key of the ids file in it; batches written at once add their
    /// groups one after the other.
    ids: Arc<Mutex<(ObjectLocation, String)>>,
    /// The column naming a row's group (its note).
    group_field: Arc<str>,
}

/// One batch of an NLP table and its groups.
struct GroupIdsBatch {
    inner: Box<dyn BatchWriter>,
    ids: Arc<Mutex<(ObjectLocation, String)>>,
    group_field: Arc<str>,
}

impl TableWriter for GroupIdsWriter {
    fn next_batch(&mut self) -> Box<dyn BatchWriter> {
        Box::new(GroupIdsBatch {
            inner: self.inner.next_batch(),
            ids: self.ids.clone(),
            group_field: self.group_field.clone(),
        })
    }

    fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.inner.delete_ids(ids)
    }

    fn flush(&mut self) {
        self.inner.flush()
    }
}

impl BatchWriter for GroupIdsBatch {
    fn write(self: Box<Self>, batch: &RowBatch<'_>, on_written: OnWritten) {
        let mut groups: Vec<String> = batch
            .rows
            .iter()
            .filter_map(|r| top_level_str(r, &self.group_field).map(|g| g.into_owned()))
            .collect();
        groups.sort();
        groups.dedup();
        let ids = self.ids;
        self.inner.write(
            batch,
            on_written.then(move |result| {
                result.and_then(|()| {
                    let ids = ids.lock().unwrap();
                    Ok(append_groups(&ids.0, &ids.1, &groups)?)
                })
            }),
        );
    }
}

/// Adds groups to the ids file.
fn append_groups(dir: &ObjectLocation, key: &str, groups: &[String]) -> Result<()> {
    if groups.is_empty() {
        return Ok(());
    }
    let mut text = groups.join("\n");
    text.push('\n');
    dir.append(key, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_notes_are_read_and_clean_removes_every_version_of_the_table_only() {
        let dir = tempfile::tempdir().unwrap();
        let root = ObjectLocation::local(dir.path()).unwrap();
        let study = root.join("example_nlp");
        for key in [
            "nlp_gpt4o_v1/nlp_gpt4o_v1.000.ndjson",
            "nlp_gpt4o_v1.ids",
            "nlp_gpt4o_v2/nlp_gpt4o_v2.000.ndjson",
            "nlp_gpt4o_vx.ids",
            "nlp_gpt4o_mini_v1.ids",
        ] {
            study
                .write(
                    key,
                    bytes::Bytes::from_static(b"DocumentReference/a\n\nDocumentReference/b\n"),
                )
                .unwrap();
        }
        let done = finished_groups(&root, "example_nlp__nlp_gpt4o", 1).unwrap();
        assert_eq!(done.len(), 2);
        assert!(done.contains("DocumentReference/b"));
        assert!(
            finished_groups(&root, "example_nlp__nlp_gpt4o", 3)
                .unwrap()
                .is_empty()
        );
        assert_eq!(clean(&root, "example_nlp__nlp_gpt4o").unwrap(), 3);
        let left: Vec<String> = study.list().unwrap().into_iter().map(|e| e.key).collect();
        assert_eq!(left, ["nlp_gpt4o_mini_v1.ids", "nlp_gpt4o_vx.ids"]);
    }
}
