//! Data files encoded by the worker that queues a batch. Its rows are decoded a slice at a time
//! and streamed into a Parquet file of the table; the committer then only records the file in
//! the log (an `Add` action). Encoding so runs on the workers' cores under their own
//! back-pressure, a batch is never decoded whole, and no query is planned per batch.

use anyhow::{Context, Result};
use arrow::datatypes::SchemaRef;
use deltalake::kernel::Add;
use deltalake::logstore::ObjectStoreRef;
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::operations::write::WriterStatsConfig;
use deltalake::operations::write::writer::{DeltaWriter, WriterConfig};

use super::conform::conform_batch;
use super::ledger::key_fingerprints;
use crate::output::ENCODE_SLICE_ROWS;
use crate::output::columns::rows_to_record_batch;
use crate::output::{RowTag, UnfitRow};

/// Where a table's data files go and how they are written.
pub struct TableFiles {
    store: ObjectStoreRef,
    stats: WriterStatsConfig,
    runtime: tokio::runtime::Handle,
    /// Threads a large batch is encoded on, a part (and a file) each.
    threads: usize,
}

/// The tag on the files of a batch encoded in parts (`add.tags`), naming the batch by its first
/// file; readers ignore tags.
pub const BATCH_TAG: &str = "cumulusEtlBatch";

/// Rows a part of a batch has at least: smaller batches are encoded as one file.
const MIN_PART_ROWS: usize = 2 * ENCODE_SLICE_ROWS;

/// The tags of the rows a decode kept (all but its unfit ones, which are in row order).
pub fn fit_tags<'a>(
    tags: &'a [RowTag],
    unfit: &'a [crate::output::columns::Unfit],
) -> impl Iterator<Item = RowTag> + 'a {
    let mut unfit = unfit.iter().map(|u| u.index).peekable();
    tags.iter().enumerate().filter_map(move |(i, tag)| {
        if unfit.peek() == Some(&i) {
            unfit.next();
            None
        } else {
            Some(*tag)
        }
    })
}

/// Files written for one batch, not yet in the table's log.
pub struct WrittenFiles {
    pub adds: Vec<Add>,
    /// The schema the files were written with (the table's, grown by the batch).
    pub schema: SchemaRef,
    /// Fingerprints of the rows' keys.
    pub keys: Vec<u64>,
    /// Rows left out because they do not fit the schema (the files hold the others).
    pub unfit: Vec<UnfitRow>,
    /// The tags of the rows the files hold (none when the batch had none).
    pub tags: Vec<RowTag>,
}

impl TableFiles {
    /// Files in the table behind `store`, with the table's statistics settings; `runtime`
    /// drives the store's uploads.
    pub fn new(
        store: ObjectStoreRef,
        stats: WriterStatsConfig,
        runtime: tokio::runtime::Handle,
    ) -> TableFiles {
        TableFiles {
            store,
            stats,
            runtime,
            threads: 1,
        }
    }

    /// Encodes large batches on up to `threads` threads.
    pub fn with_threads(mut self, threads: usize) -> TableFiles {
        self.threads = threads.max(1);
        self
    }

    /// Decodes `rows` (of `schema`) a slice at a time, reshapes them to `target` and writes
    /// them as files (one per part of the rows, the parts encoded at once on up to the
    /// table's threads: a table whose batches are most of the memory budget is otherwise
    /// encoded by one worker while the others wait for memory); keys are fingerprinted on
    /// `uniqueness`. Must not be called from within an async runtime. A failure leaves no file
    /// behind.
    pub fn write(
        &self,
        (rows, tags): (&[&[u8]], &[RowTag]),
        schema: &SchemaRef,
        target: &SchemaRef,
        uniqueness: &[String],
    ) -> Result<WrittenFiles> {
        let parts = (rows.len() / MIN_PART_ROWS).clamp(1, self.threads);
        if parts == 1 {
            return self.write_part((rows, tags), schema, target, uniqueness);
        }
        let part_rows = rows.len().div_ceil(parts);
        let tags_of = |i: usize| match tags.is_empty() {
            true => &[][..],
            false => &tags[i * part_rows..((i + 1) * part_rows).min(tags.len())],
        };
        let written: Vec<Result<WrittenFiles>> = std::thread::scope(|scope| {
            let others: Vec<_> = rows
                .chunks(part_rows)
                .enumerate()
                .skip(1)
                .map(|(i, part)| {
                    let part = (part, tags_of(i));
                    scope.spawn(move || self.write_part(part, schema, target, uniqueness))
                })
                .collect();
            let first = (&rows[..part_rows], tags_of(0));
            let first = self.write_part(first, schema, target, uniqueness);
            std::iter::once(first)
                .chain(others.into_iter().map(|other| {
                    // A panic is the worker's, as if it had encoded the part itself.
                    other
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                }))
                .collect()
        });
        let mut all = WrittenFiles {
            adds: Vec::new(),
            schema: target.clone(),
            keys: Vec::with_capacity(rows.len()),
            unfit: Vec::new(),
            tags: Vec::with_capacity(tags.len()),
        };
        let mut failed = None;
        for part in written {
            match part {
                Ok(part) => {
                    all.adds.extend(part.adds);
                    all.keys.extend(part.keys);
                    all.unfit.extend(part.unfit);
                    all.tags.extend(part.tags);
                }
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let Some(e) = failed {
            self.discard(&all);
            return Err(e);
        }
        // The parts are one batch: compaction counts them as one file.
        let batch = all.adds.first().map(|add| add.path.clone());
        for add in &mut all.adds {
            add.tags
                .get_or_insert_default()
                .insert(BATCH_TAG.to_string(), batch.clone());
        }
        Ok(all)
    }

    /// Writes `rows` as one file (see [`TableFiles::write`]).
    fn write_part(
        &self,
        (rows, tags): (&[&[u8]], &[RowTag]),
        schema: &SchemaRef,
        target: &SchemaRef,
        uniqueness: &[String],
    ) -> Result<WrittenFiles> {
        let mut writer = self.writer(target);
        let mut keys = Vec::with_capacity(rows.len());
        let mut unfit = Vec::new();
        let mut kept_tags = Vec::with_capacity(tags.len());
        let encoded = self.runtime.block_on(async {
            for (i, slice) in rows.chunks(ENCODE_SLICE_ROWS).enumerate() {
                let decoded = rows_to_record_batch(schema.clone(), slice)
                    .context("rows do not fit the table's FHIR schema")?;
                unfit.extend(UnfitRow::from_decode(slice, &decoded.unfit));
                if !tags.is_empty() {
                    let start = i * ENCODE_SLICE_ROWS;
                    let slice_tags = &tags[start..start + slice.len()];
                    kept_tags.extend(fit_tags(slice_tags, &decoded.unfit));
                }
                keys.extend(key_fingerprints(uniqueness, &decoded.batch, &[])?);
                writer
                    .write(&conform_batch(&decoded.batch, target)?)
                    .await?;
            }
            anyhow::Ok(())
        });
        if let Err(e) = encoded {
            let _ = self.runtime.block_on(writer.abort());
            return Err(e);
        }
        let adds = self
            .runtime
            .block_on(writer.close())
            .context("writing a data file")?;
        Ok(WrittenFiles {
            adds,
            schema: target.clone(),
            keys,
            unfit,
            tags: kept_tags,
        })
    }

    /// A writer of data files of `schema` for this table (one file until it is closed), with
    /// the table's statistics settings and this project's Parquet settings.
    pub fn writer(&self, schema: &SchemaRef) -> DeltaWriter {
        let config = WriterConfig::new(
            schema.clone(),
            Vec::new(),
            Some(crate::output::parquet::writer_properties()),
            None,
            Some(ENCODE_SLICE_ROWS),
            self.stats.num_indexed_cols,
            self.stats.stats_columns.clone(),
        );
        DeltaWriter::new(self.store.clone(), config)
    }

    /// Removes files that will not be committed (their batch is merged instead).
    pub fn discard(&self, files: &WrittenFiles) {
        self.runtime.block_on(self.remove(&files.adds));
    }

    /// Removes written files that will not be committed; a file that cannot be removed is
    /// only reported (it is not in the table, and VACUUM removes it later).
    pub async fn remove(&self, adds: &[Add]) {
        for add in adds {
            let path = deltalake::Path::from(add.path.as_str());
            if let Err(e) = self.store.delete(&path).await {
                crate::say!("warning: could not remove the unused data file {path}: {e}");
            }
        }
    }
}
