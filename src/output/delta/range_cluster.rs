//! Clustering by key ranges, as Delta's own clustering does it: the keys are cut into ranges
//! from a sample of them, and every row is written to its range's file, in the order it is
//! read. Files of different ranges never overlap; a file is not sorted within (Spark's
//! OPTIMIZE of a clustered table repartitions by range and does not sort either).
//!
//! One pass: readers (one per thread) take the next file to cluster, send each of its slices'
//! rows to their ranges, and encode them into the range's open file themselves, so decoding and
//! encoding share every core and no row is written twice. Every range's file is open for the
//! whole pass; the caller uses [`cluster_sort`](super::cluster_sort) instead where that many
//! open files would not fit in memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::Result;
use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow::row::OwnedRow;
use deltalake::kernel::Add;
use deltalake::operations::write::writer::DeltaWriter;

use super::cluster_sort::Keys;
use super::column_scan;
use super::file_merge::close_writer;
use super::files::TableFiles;

/// Keys sampled at most, to cut the ranges from.
pub const MAX_SAMPLES: u64 = 16_384;

/// Key ranges and which one a row falls in.
pub struct Ranges {
    keys: Arc<Keys>,
    /// The first key of every range but the first, ascending.
    bounds: Vec<OwnedRow>,
}

impl Ranges {
    /// Up to `count` ranges holding about as many of `sample`'s keys each (fewer when keys
    /// repeat so much that two bounds would be equal).
    pub fn cut(keys: Arc<Keys>, mut sample: Vec<OwnedRow>, count: usize) -> Ranges {
        sample.sort_unstable();
        let mut bounds: Vec<OwnedRow> = Vec::new();
        for i in 1..count.max(1) {
            let Some(key) = sample.get(i * sample.len() / count) else {
                break;
            };
            if bounds.last().is_none_or(|last| last < key) && sample[0] < *key {
                bounds.push(key.clone());
            }
        }
        Ranges { keys, bounds }
    }

    /// The same ranges over rows of another schema (`keys` of the same key columns): where a
    /// table's schema widens between batches, its key columns may move.
    pub fn with_keys(&self, keys: Arc<Keys>) -> Ranges {
        Ranges {
            keys,
            bounds: self.bounds.clone(),
        }
    }

    /// How many ranges there are.
    pub fn count(&self) -> usize {
        self.bounds.len() + 1
    }

    /// For each range, the positions of `batch`'s rows that fall in it.
    pub fn route(&self, batch: &RecordBatch) -> Result<Vec<Vec<u32>>> {
        let keys = self.keys.encode(batch)?;
        let mut picks = vec![Vec::new(); self.count()];
        for (i, key) in keys.iter().enumerate() {
            let range = self.bounds.partition_point(|bound| bound.row() <= key);
            picks[range].push(u32::try_from(i)?);
        }
        Ok(picks)
    }
}

/// Every `every`th key of the `key_columns` (top-level names, typed as in `schema`) of the
/// `files` (path, size), in file order.
pub async fn sample_keys(
    store: &deltalake::logstore::ObjectStoreRef,
    files: &[(deltalake::Path, u64)],
    schema: &SchemaRef,
    key_columns: &[String],
    keys: &Keys,
    every: u64,
) -> Result<Vec<OwnedRow>> {
    let names: Vec<&str> = key_columns.iter().map(String::as_str).collect();
    let types: Vec<_> = key_columns
        .iter()
        .map(|name| Ok(schema.field_with_name(name)?.data_type().clone()))
        .collect::<Result<_>>()?;
    let every = every.max(1);
    let mut seen = 0u64;
    let mut sample = Vec::new();
    for (path, size) in files {
        column_scan::for_each_batch(store, path, *size, &names, &mut |batch| {
            let columns = batch
                .columns()
                .iter()
                .zip(&types)
                .map(|(column, to)| Ok(arrow::compute::cast(column, to)?))
                .collect::<Result<Vec<_>>>()?;
            let encoded = keys.encode_columns(&columns)?;
            let first = (every - seen % every) % every;
            for row in (first..batch.num_rows() as u64).step_by(every as usize) {
                sample.push(encoded.row(row as usize).owned());
            }
            seen += batch.num_rows() as u64;
            Ok(())
        })
        .await?;
    }
    Ok(sample)
}

/// The open file of every range, shared by the readers: a reader encodes a range's rows into
/// its file while it holds the range.
pub struct RangeFiles {
    files: Arc<TableFiles>,
    schema: SchemaRef,
    open: Vec<Mutex<Option<DeltaWriter>>>,
    /// Set when a reader fails, so the others stop.
    failed: AtomicBool,
}

impl RangeFiles {
    /// A file (opened on its first rows) for each of `ranges` ranges of rows of `schema`.
    pub fn new(files: Arc<TableFiles>, schema: SchemaRef, ranges: usize) -> RangeFiles {
        RangeFiles {
            files,
            schema,
            open: (0..ranges).map(|_| Mutex::new(None)).collect(),
            failed: AtomicBool::new(false),
        }
    }

    /// Sends the rows of every batch of `rows` to their ranges' files; `reader` is this reader's
    /// number, so readers start at different ranges. Runs on a thread outside the runtime,
    /// which drives the writers.
    pub fn write(
        &self,
        runtime: &tokio::runtime::Handle,
        ranges: &Ranges,
        rows: impl Iterator<Item = Result<RecordBatch>>,
        reader: usize,
    ) -> Result<()> {
        for batch in rows {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let batch = match batch {
                Ok(batch) => batch,
                Err(e) => return Err(self.fail(e)),
            };
            let picks = ranges.route(&batch).map_err(|e| self.fail(e))?;
            // Each range's rows are taken only once its file is held.
            let mut sources: Vec<_> = picks
                .into_iter()
                .map(|picks| {
                    let batch = &batch;
                    (!picks.is_empty()).then(|| {
                        std::iter::once_with(move || {
                            Ok(take_record_batch(batch, &UInt32Array::from(picks))?)
                        })
                    })
                })
                .collect();
            self.write_each(runtime, &mut sources, reader)?;
        }
        Ok(())
    }

    /// Writes every batch of each range's source (`sources[range]`; None for a range without
    /// rows) to that range's file, taking first the ranges no other reader holds; `reader` is
    /// this reader's number, so readers start at different ranges. Runs on a thread outside the
    /// runtime, which drives the writers.
    pub fn write_each<I>(
        &self,
        runtime: &tokio::runtime::Handle,
        sources: &mut [Option<I>],
        reader: usize,
    ) -> Result<()>
    where
        I: Iterator<Item = Result<RecordBatch>>,
    {
        let count = sources.len();
        let mut pending: Vec<usize> = (0..count)
            .map(|i| (i + reader) % count)
            .filter(|&r| sources[r].is_some())
            .collect();
        while !pending.is_empty() {
            if self.failed.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (at, mut file) = self.next_free(&pending);
            let range = pending.remove(at);
            for batch in sources[range].as_mut().into_iter().flatten() {
                let written = batch.and_then(|batch| {
                    let writer = file.get_or_insert_with(|| self.files.writer(&self.schema));
                    Ok(runtime.block_on(writer.write(&batch))?)
                });
                written.map_err(|e| self.fail(e))?;
            }
        }
        Ok(())
    }

    /// Notes that a reader failed with `error` (so the others stop), and returns it.
    fn fail(&self, error: anyhow::Error) -> anyhow::Error {
        self.failed.store(true, Ordering::Relaxed);
        error
    }

    /// The first of the `pending` ranges whose file no other reader holds, or else the first
    /// (waiting for it): its place in `pending` and its file, held.
    fn next_free(&self, pending: &[usize]) -> (usize, MutexGuard<'_, Option<DeltaWriter>>) {
        for (at, &range) in pending.iter().enumerate() {
            if let Ok(file) = self.open[range].try_lock() {
                return (at, file);
            }
        }
        let file = self.open[pending[0]]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (0, file)
    }

    /// Closes every range's file (aborting them all when `wrote` is an error), recording the
    /// files written in `written`, each with its range.
    pub async fn close(self, wrote: Result<()>, written: &mut Vec<(usize, Add)>) -> Result<()> {
        let what = "writing a clustered data file";
        let mut result = wrote;
        for (range, file) in self.open.into_iter().enumerate() {
            let writer = file
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let this = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(anyhow::anyhow!("{e:#}")),
            };
            let mut adds = Vec::new();
            let closed = close_writer(writer, this, what, &mut adds).await;
            written.extend(adds.into_iter().map(|add| (range, add)));
            if let Err(e) = closed {
                result = result.and(Err(e));
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    fn ids_batch(ids: &[String]) -> (SchemaRef, RecordBatch) {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)]));
        let column = StringArray::from_iter_values(ids.iter());
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(column)]).unwrap();
        (schema, batch)
    }

    #[test]
    fn rows_fall_in_ordered_disjoint_ranges_of_about_equal_size() {
        let ids: Vec<String> = (0..10_000u64)
            .map(|i| format!("{:08}", (i * 7919) % 10_000))
            .collect();
        let (schema, batch) = ids_batch(&ids);
        let keys = Arc::new(Keys::new(&schema, &["id".to_string()]).unwrap());
        let encoded = keys.encode(&batch).unwrap();
        // Every tenth key as the sample.
        let sample: Vec<OwnedRow> = (0..ids.len())
            .step_by(10)
            .map(|i| encoded.row(i).owned())
            .collect();
        let ranges = Ranges::cut(keys, sample, 4);
        assert_eq!(ranges.count(), 4);
        let picks = ranges.route(&batch).unwrap();
        let mut spans = Vec::new();
        let mut routed = 0;
        for pick in &picks {
            assert!((2000..=3000).contains(&pick.len()), "{}", pick.len());
            let mut mine: Vec<&str> = pick.iter().map(|&i| ids[i as usize].as_str()).collect();
            mine.sort_unstable();
            spans.push((mine[0], mine[mine.len() - 1]));
            routed += pick.len();
        }
        assert_eq!(routed, ids.len(), "every row goes to one range");
        assert!(
            spans.windows(2).all(|w| w[0].1 < w[1].0),
            "ordered, disjoint: {spans:?}"
        );
    }

    #[test]
    fn repeated_keys_make_fewer_ranges_and_one_key_stays_in_one_range() {
        let ids: Vec<String> = (0..1000).map(|i| format!("k{}", i % 2)).collect();
        let (schema, batch) = ids_batch(&ids);
        let keys = Arc::new(Keys::new(&schema, &["id".to_string()]).unwrap());
        let encoded = keys.encode(&batch).unwrap();
        let sample = (0..ids.len()).map(|i| encoded.row(i).owned()).collect();
        let ranges = Ranges::cut(keys, sample, 8);
        assert_eq!(ranges.count(), 2, "two distinct keys, two ranges");
        let picks = ranges.route(&batch).unwrap();
        let column = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        for pick in picks {
            let mut keys: Vec<&str> = pick.iter().map(|&i| column.value(i as usize)).collect();
            keys.dedup();
            assert_eq!(keys.len(), 1);
        }
        // An empty sample makes one range.
        let keys = Arc::new(Keys::new(&schema, &["id".to_string()]).unwrap());
        assert_eq!(Ranges::cut(keys, Vec::new(), 4).count(), 1);
    }
}
