//! The rows a MERGE applies, held in memory or read back from their stage files a slice at a
//! time, so that a MERGE's memory is bounded by its key index and a cache, not by its rows.
//!
//! A MERGE visits its source three times: once in order to index its keys, then by slice to
//! fetch the rows that replace stored ones, then in order again to insert the rows no stored
//! row matched. Slices read from disk stay in a cache of bounded size (least recently used
//! first out): when the whole source fits, it is read once; when it does not, the stored table
//! and the source usually come in the same order (a re-run of a similar export), so replaced
//! rows come from the few slices read last.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result};
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::record_batch::RecordBatch;

use super::conform::conform_batch;

/// Where one slice of the source is.
#[derive(Clone)]
enum Slice {
    Memory(RecordBatch),
    /// Record batch `batch` of stage file `file`.
    Staged {
        file: usize,
        batch: usize,
    },
}

/// A MERGE's source rows in slices, each conformed to the MERGE's schema.
pub struct MergeSource {
    schema: SchemaRef,
    files: Vec<PathBuf>,
    slices: Vec<Slice>,
    /// Staged slices read back, most recently used last, with their Arrow size.
    cache: VecDeque<(usize, RecordBatch, usize)>,
    cached_bytes: usize,
    cache_limit: usize,
}

impl MergeSource {
    /// Batches already in memory (one slice each).
    pub fn in_memory(schema: &SchemaRef, batches: Vec<RecordBatch>) -> MergeSource {
        MergeSource {
            schema: schema.clone(),
            files: Vec::new(),
            slices: batches.into_iter().map(Slice::Memory).collect(),
            cache: VecDeque::new(),
            cached_bytes: 0,
            cache_limit: 0,
        }
    }

    /// Stage files (Arrow IPC, read only when visited), whose slices read back are cached up
    /// to `cache_limit` bytes of Arrow data.
    pub fn staged(schema: &SchemaRef, files: Vec<PathBuf>, cache_limit: usize) -> MergeSource {
        MergeSource {
            schema: schema.clone(),
            files,
            slices: Vec::new(),
            cache: VecDeque::new(),
            cached_bytes: 0,
            cache_limit,
        }
    }

    /// The same rows, to be merged again (after a commit lost its race to another writer):
    /// slices in memory are shared, stage files read again.
    pub fn again(&self) -> MergeSource {
        MergeSource {
            schema: self.schema.clone(),
            files: self.files.clone(),
            slices: self.slices.clone(),
            cache: VecDeque::new(),
            cached_bytes: 0,
            cache_limit: self.cache_limit,
        }
    }

    /// The MERGE's schema, which every slice has.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Every slice in order, numbered as [`Self::slice`] and [`Self::visit`] number them. The
    /// first visit of staged files reads them and learns their slices.
    pub fn visit(&mut self, mut each: impl FnMut(usize, &RecordBatch) -> Result<()>) -> Result<()> {
        if !self.files.is_empty() && self.slices.is_empty() {
            for file in 0..self.files.len() {
                let reader = self.open(file)?;
                for (batch, read) in reader.enumerate() {
                    let slice = self.conform(file, read?)?;
                    let n = self.slices.len();
                    self.slices.push(Slice::Staged { file, batch });
                    each(n, &slice)?;
                    self.keep(n, slice);
                }
            }
            return Ok(());
        }
        for n in 0..self.slices.len() {
            let slice = self.slice(n)?;
            each(n, &slice)?;
        }
        Ok(())
    }

    /// Slice `n` (of those [`Self::visit`] has numbered).
    pub fn slice(&mut self, n: usize) -> Result<RecordBatch> {
        let (file, batch) = match &self.slices[n] {
            Slice::Memory(slice) => return Ok(slice.clone()),
            Slice::Staged { file, batch } => (*file, *batch),
        };
        if let Some(at) = self.cache.iter().position(|(cached, ..)| *cached == n) {
            let entry = self.cache.remove(at).expect("found above");
            let slice = entry.1.clone();
            self.cache.push_back(entry);
            return Ok(slice);
        }
        let mut reader = self.open(file)?;
        reader.set_index(batch)?;
        let read = reader
            .next()
            .with_context(|| format!("{} has no batch {batch}", self.files[file].display()))?;
        let slice = self.conform(file, read?)?;
        self.keep(n, slice.clone());
        Ok(slice)
    }

    fn open(&self, file: usize) -> Result<FileReader<BufReader<File>>> {
        let path = &self.files[file];
        let opened = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        FileReader::try_new(BufReader::new(opened), None)
            .with_context(|| format!("reading {}", path.display()))
    }

    fn conform(&self, file: usize, read: RecordBatch) -> Result<RecordBatch> {
        conform_batch(&read, &self.schema)
            .with_context(|| format!("reading {} back", self.files[file].display()))
    }

    /// Caches a staged slice, dropping the least recently used beyond the limit.
    fn keep(&mut self, n: usize, slice: RecordBatch) {
        let bytes = slice.get_array_memory_size();
        self.cache.push_back((n, slice, bytes));
        self.cached_bytes += bytes;
        while self.cached_bytes > self.cache_limit {
            let Some((.., dropped)) = self.cache.pop_front() else {
                break;
            };
            self.cached_bytes -= dropped;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::delta::stage::StageDir;
    use arrow::array::{Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    fn ids(ids: &[&str]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(StringArray::from(ids.to_vec()))]).unwrap()
    }

    #[test]
    fn staged_slices_come_back_conformed_whether_cached_or_read_again() {
        let stage = StageDir::default();
        let first = stage
            .write_slices(
                &ids(&[]).schema(),
                [Ok(ids(&["a", "b"])), Ok(ids(&["c"]))].into_iter(),
            )
            .unwrap();
        let second = stage.write(&ids(&["d"])).unwrap();
        let wide = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        // A cache too small for any slice: every fetch reads the file again.
        let mut source = MergeSource::staged(&wide, vec![first.path, second.path], 1);
        let mut seen = Vec::new();
        source
            .visit(|n, slice| {
                assert_eq!(slice.schema(), wide);
                seen.push((n, slice.num_rows()));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, [(0, 2), (1, 1), (2, 1)]);
        let slice = source.slice(1).unwrap();
        let id = slice.column(0).as_any().downcast_ref::<StringArray>();
        assert_eq!(id.unwrap().value(0), "c");
        let n = slice.column(1).as_any().downcast_ref::<Int64Array>();
        assert_eq!(
            n.unwrap().null_count(),
            1,
            "the missing column comes back null"
        );
        assert_eq!(source.slice(2).unwrap().num_rows(), 1);
        // A second visit goes by the slices it learned.
        let mut again = 0;
        source
            .visit(|_, _| {
                again += 1;
                Ok(())
            })
            .unwrap();
        assert_eq!(again, 3);
    }
}
