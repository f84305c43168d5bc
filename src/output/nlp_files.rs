//! The file layout of NLP results (Cumulus ETL's NLP formats): `<root>/<study>/<name>_v<N>/
//! <name>_v<N>.NNN.<ext>`, plus `<name>_v<N>.ids` listing the notes (groups) whose rows are
//! written, appended after every successful batch.

use anyhow::Result;
use serde_json::Value;

use crate::store::ObjectLocation;

use std::sync::{Arc, Mutex};

use super::{
    BatchWriter, BatchedFiles, OnWritten, OutputFormat, Outputs, RowBatch, TableKind, TableWriter,
};

/// The writer of an NLP table in a file format.
pub fn open(outputs: &Outputs, table: &str, version: i32, kind: TableKind) -> Box<dyn TableWriter> {
    let (study, short) = table.split_once("__").unwrap_or((table, table));
    let name = format!("{short}_v{version}");
    let study_dir = outputs.root.join(study);
    let files = BatchedFiles::in_dir(study_dir.join(&name), &name, outputs.format.name());
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
            .filter_map(|r| {
                let row: Value = serde_json::from_slice(r).ok()?;
                Some(row.get(&*self.group_field)?.as_str()?.to_string())
            })
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
