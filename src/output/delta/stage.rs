//! MERGE batches waiting on local disk, so that many small batches become one MERGE.
//!
//! A MERGE reads the whole target table whatever the size of its source, so a re-run that
//! merges every batch as it comes pays for the table once per batch, and the number of batches
//! grows as `--memory` shrinks. Staged batches leave memory at once (Arrow IPC files in a
//! private temporary folder), stay there while their MERGE reads them back, and are merged
//! together once the MERGE's index would fill its memory (see `CumulusTable::stage_file`), or
//! at the end of the run.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;

use super::conform::union_schema;
use crate::output::RowTag;

use crate::output::OnWritten;

/// A table's private temporary folder for staged batches, shared by the workers that stage
/// them and the committer that merges them; made when first needed, removed with the table.
#[derive(Default)]
pub struct StageDir {
    dir: Mutex<Option<tempfile::TempDir>>,
    files_made: AtomicUsize,
}

/// A batch written to the stage folder, not yet part of a MERGE.
pub struct StagedFile {
    pub path: PathBuf,
    pub schema: SchemaRef,
    pub rows: usize,
    /// Its Arrow size in memory, which it takes again when read back for the MERGE.
    pub bytes: usize,
    /// The tags of its rows (see [`crate::output::RowBatch::tags`]), or none.
    pub tags: Vec<RowTag>,
}

impl StageDir {
    /// Writes the batch as an Arrow IPC file in the folder.
    pub fn write(&self, batch: &RecordBatch) -> Result<StagedFile> {
        self.write_slices(&batch.schema(), std::iter::once(Ok(batch.clone())))
    }

    /// Writes slices of one batch (all of `schema`) as one Arrow IPC file in the folder, so
    /// that only a slice at a time needs to be in memory as Arrow.
    pub fn write_slices(
        &self,
        schema: &SchemaRef,
        slices: impl Iterator<Item = Result<RecordBatch>>,
    ) -> Result<StagedFile> {
        let dir = {
            let mut dir = self.dir.lock().unwrap();
            if dir.is_none() {
                let made = tempfile::Builder::new()
                    .prefix("cumulus-etl-merge-")
                    .tempdir()
                    .context("creating a folder for staged MERGE batches")?;
                *dir = Some(made);
            }
            dir.as_ref().expect("made above").path().to_path_buf()
        };
        let n = self.files_made.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("batch-{n:05}.arrow"));
        let (mut rows, mut bytes) = (0, 0);
        let written = (|| {
            let file = File::create(&path)?;
            let mut writer = FileWriter::try_new(BufWriter::new(file), schema)?;
            for slice in slices {
                let slice = slice?;
                rows += slice.num_rows();
                bytes += slice.get_array_memory_size();
                writer.write(&slice)?;
            }
            writer.finish()?;
            anyhow::Ok(())
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e.context(format!("staging a batch in {}", path.display())));
        }
        Ok(StagedFile {
            path,
            schema: schema.clone(),
            rows,
            bytes,
            tags: Vec::new(),
        })
    }
}

/// Batches staged for one table, with the reports to send once they are merged.
#[derive(Default)]
pub struct MergeStage {
    dir: Arc<StageDir>,
    entries: Vec<(PathBuf, OnWritten)>,
    keys: HashSet<u64>,
    groups: Vec<String>,
    rows: usize,
    bytes: usize,
    /// The union of the staged batches' schemas, which one MERGE will use.
    schema: Option<SchemaRef>,
    /// The tags of the staged rows, while every staged batch had them.
    tags: Option<Vec<RowTag>>,
}

/// Staged batches taken for one MERGE, still on disk, in the order they came, each with its
/// report.
pub struct Staged {
    pub files: Vec<(PathBuf, OnWritten)>,
    pub groups: Vec<String>,
    /// The union of their schemas.
    pub schema: Option<SchemaRef>,
    /// The tags of their rows, if every batch had them (for the MERGE's row journal).
    pub tags: Option<Vec<RowTag>>,
}

impl Staged {
    /// Reports the MERGE's outcome to each batch and removes its file; a failed batch's rows go
    /// back with the error, for the errors folder.
    pub fn report(self, result: &Result<()>) {
        for (path, report) in self.files {
            match result {
                Ok(()) => report.done(Ok(())),
                Err(e) => {
                    let rows = read_batch(&path)
                        .map(|b| json_lines(&b))
                        .unwrap_or_default();
                    report.failed_with_rows(anyhow::anyhow!("{e:#}"), rows)
                }
            }
            let _ = std::fs::remove_file(&path);
        }
    }

    /// The staged files, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.files.iter().map(|(path, _)| path.clone()).collect()
    }
}

/// Staged batches read back whole, for a MERGE that needs them in memory.
pub fn read_all(paths: &[PathBuf]) -> Result<Vec<RecordBatch>> {
    paths
        .iter()
        .map(|path| {
            read_batch(path)
                .with_context(|| format!("reading the staged batch {} back", path.display()))
        })
        .collect()
}

impl MergeStage {
    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// True when a batch with these key (and group) fingerprints touches a staged one: one
    /// MERGE cannot apply two rows to the same key in order, so the staged rows go first.
    pub fn overlaps(&self, keys: &[u64]) -> bool {
        keys.iter().any(|k| self.keys.contains(k))
    }

    /// True when a batch of this schema can join one MERGE with the staged batches (a type
    /// conflict between them would fail them all, where in turn only the later one fails).
    pub fn fits(&self, schema: &SchemaRef) -> bool {
        match &self.schema {
            Some(staged) => union_schema(staged, schema).is_ok(),
            None => true,
        }
    }

    /// True once the staged rows should be merged.
    pub fn is_full(&self, max_rows: usize, max_bytes: usize) -> bool {
        self.rows >= max_rows || self.bytes >= max_bytes
    }

    /// The folder batches are staged in, for workers that stage their own.
    pub fn dir(&self) -> Arc<StageDir> {
        self.dir.clone()
    }

    /// Takes in a batch written to the stage folder ([`StageDir::write`]) and tells the
    /// caller, if it has not been told yet, that it may free its copy.
    pub fn adopt(
        &mut self,
        file: StagedFile,
        keys: &[u64],
        groups: &[String],
        mut report: OnWritten,
    ) {
        report.staged();
        self.schema = Some(match self.schema.take() {
            Some(staged) => union_schema(&staged, &file.schema).unwrap_or(staged),
            None => file.schema.clone(),
        });
        // The first batch starts the tags; one without them ends them for this MERGE.
        let mut tags = match self.entries.is_empty() {
            true => Some(Vec::new()),
            false => self.tags.take(),
        };
        match (&mut tags, file.tags.len() == file.rows) {
            (Some(staged), true) => staged.extend(file.tags),
            _ => tags = None,
        }
        self.tags = tags;
        self.entries.push((file.path, report));
        self.keys.extend(keys);
        self.groups.extend(groups.iter().cloned());
        self.rows += file.rows;
        self.bytes += file.bytes;
    }

    /// Rows staged so far.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Everything staged (left on disk until its MERGE is reported); the stage is empty
    /// afterwards.
    pub fn take(&mut self) -> Staged {
        let mut groups = std::mem::take(&mut self.groups);
        groups.sort();
        groups.dedup();
        self.keys.clear();
        self.rows = 0;
        self.bytes = 0;
        Staged {
            files: std::mem::take(&mut self.entries),
            groups,
            schema: self.schema.take(),
            tags: self.tags.take(),
        }
    }
}

/// A staged batch read back (whole).
pub fn read_batch(path: &std::path::Path) -> Result<RecordBatch> {
    let reader = FileReader::try_new(BufReader::new(File::open(path)?), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok(arrow::compute::concat_batches(&schema, &batches)?)
}

/// A batch's rows as JSON lines (nulls left out), for the errors folder.
pub fn json_lines(batch: &RecordBatch) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
    if writer.write(batch).and_then(|()| writer.finish()).is_err() {
        return Vec::new();
    }
    out.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::{Arc, Mutex};

    fn batch(ids: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let n: Vec<Option<i64>> = (0..ids.len() as i64)
            .map(|i| (i > 0).then_some(i))
            .collect();
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(ids.to_vec())),
                Arc::new(Int64Array::from(n)),
            ],
        )
        .unwrap()
    }

    #[test]
    fn batches_come_back_in_order_after_leaving_memory() {
        let staged_count = Arc::new(Mutex::new(0));
        let done = Arc::new(Mutex::new(0));
        let mut stage = MergeStage::default();
        for (i, ids) in [&["a", "b"][..], &["c"][..]].iter().enumerate() {
            let count = staged_count.clone();
            let done = done.clone();
            let report = OnWritten::new(move |result| {
                assert!(result.is_ok());
                *done.lock().unwrap() += 1;
            })
            .on_staged(move || *count.lock().unwrap() += 1);
            let file = stage.dir().write(&batch(ids)).unwrap();
            stage.adopt(file, &[i as u64], &[format!("g{i}")], report);
        }
        assert_eq!(*staged_count.lock().unwrap(), 2);
        assert!(stage.overlaps(&[9, 1]) && !stage.overlaps(&[2]));
        assert!(stage.is_full(3, usize::MAX) && !stage.is_full(4, usize::MAX));
        let dir = stage
            .dir
            .dir
            .lock()
            .unwrap()
            .as_ref()
            .unwrap()
            .path()
            .to_path_buf();
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        let staged = stage.take();
        assert!(stage.is_empty() && !stage.overlaps(&[0]) && stage.rows() == 0);
        assert_eq!(staged.groups, ["g0", "g1"]);
        let schema = staged
            .schema
            .as_ref()
            .expect("a union of the staged schemas");
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "n"]);
        assert_eq!(
            read_all(&staged.paths()).unwrap(),
            [batch(&["a", "b"]), batch(&["c"])]
        );
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            2,
            "files stay until their MERGE is reported"
        );
        assert_eq!(*done.lock().unwrap(), 0);
        staged.report(&Ok(()));
        assert_eq!(*done.lock().unwrap(), 2, "each batch hears its outcome");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        drop(stage);
        assert!(!dir.exists(), "the folder goes with the table");
    }

    #[test]
    fn json_lines_leave_out_nulls() {
        let lines = json_lines(&batch(&["a", "b"]));
        assert_eq!(
            lines,
            [br#"{"id":"a"}"#.to_vec(), br#"{"id":"b","n":1}"#.to_vec()]
        );
    }
}
