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

use std::sync::Arc;

use super::conform::conform_batch;
use super::ledger::key_fingerprints;
use super::range_cluster::RangeFiles;
use super::range_pieces::{Cutting, RANGE_TAG, RowRouter};
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
    /// How batches are cut into key ranges, a file each, for a first load's clustering.
    cutting: Option<Cutting>,
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

impl WrittenFiles {
    /// No files, of `schema`.
    fn empty(schema: &SchemaRef) -> WrittenFiles {
        WrittenFiles {
            adds: Vec::new(),
            schema: schema.clone(),
            keys: Vec::new(),
            unfit: Vec::new(),
            tags: Vec::new(),
        }
    }

    /// Adds the files of another part of the same batch.
    fn absorb(&mut self, part: WrittenFiles) {
        self.adds.extend(part.adds);
        self.keys.extend(part.keys);
        self.unfit.extend(part.unfit);
        self.tags.extend(part.tags);
    }
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
            cutting: None,
        }
    }

    /// Cuts batches into `ranges` key ranges of the `clustering` columns, a file each
    /// ([`range_pieces`](super::range_pieces)).
    pub fn with_cutting(mut self, clustering: Vec<String>, ranges: usize) -> TableFiles {
        if !clustering.is_empty() {
            self.cutting = Some(Cutting::new(clustering, ranges));
        }
        self
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
        self: &Arc<Self>,
        (rows, tags): (&[&[u8]], &[RowTag]),
        schema: &SchemaRef,
        target: &SchemaRef,
        uniqueness: &[String],
    ) -> Result<WrittenFiles> {
        if let Some(cutting) = &self.cutting
            && cutting.cuts(rows.len())
            && let Some(written) =
                self.write_cut(cutting, (rows, tags), schema, target, uniqueness)?
        {
            return Ok(written);
        }
        if rows.len() < 2 * MIN_PART_ROWS || self.threads == 1 {
            return self.write_part((rows, tags), schema, target, uniqueness);
        }
        let written = self.in_parts((rows, tags), |_, part| {
            self.write_part(part, schema, target, uniqueness)
        });
        self.gather(target, written)
    }

    /// Runs `each` on every part of a batch's rows (with the part's number), as many parts as
    /// the rows make of at least [`MIN_PART_ROWS`], up to the table's threads: the first on
    /// this thread, the others on scoped threads at once. Their results, in part order.
    fn in_parts<'a, T: Send>(
        &self,
        (rows, tags): (&'a [&'a [u8]], &'a [RowTag]),
        each: impl Fn(usize, (&'a [&'a [u8]], &'a [RowTag])) -> Result<T> + Sync,
    ) -> Vec<Result<T>> {
        let parts = (rows.len() / MIN_PART_ROWS).clamp(1, self.threads);
        let part_rows = rows.len().div_ceil(parts).max(1);
        let tags_of = |i: usize| match tags.is_empty() {
            true => &[][..],
            false => &tags[i * part_rows..((i + 1) * part_rows).min(tags.len())],
        };
        let each = &each;
        std::thread::scope(|scope| {
            let others: Vec<_> = rows
                .chunks(part_rows)
                .enumerate()
                .skip(1)
                .map(|(i, part)| {
                    let part = (part, tags_of(i));
                    scope.spawn(move || each(i, part))
                })
                .collect();
            let first = each(0, (&rows[..part_rows.min(rows.len())], tags_of(0)));
            std::iter::once(first)
                .chain(others.into_iter().map(|other| {
                    // A panic is the worker's, as if it had encoded the part itself.
                    other
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                }))
                .collect()
        })
    }

    /// The files of a batch's parts together (none, if a part failed), tagged as one batch.
    fn gather(
        &self,
        target: &SchemaRef,
        written: impl IntoIterator<Item = Result<WrittenFiles>>,
    ) -> Result<WrittenFiles> {
        let mut all = WrittenFiles::empty(target);
        let mut failed = None;
        for part in written {
            match part {
                Ok(part) => all.absorb(part),
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

    /// Writes `rows` as one file per key range of the table's cut (made from this batch's first
    /// slice if none is yet): the batch's parts are split by range on up to the table's threads
    /// ([`RowRouter`]), and each range's rows of a part decoded into its file ([`RangeFiles`]).
    /// None (nothing written) when
    /// the clustering columns are not top-level columns of the table.
    fn write_cut(
        self: &Arc<Self>,
        cutting: &Cutting,
        (rows, tags): (&[&[u8]], &[RowTag]),
        schema: &SchemaRef,
        target: &SchemaRef,
        uniqueness: &[String],
    ) -> Result<Option<WrittenFiles>> {
        let clustering = cutting.clustering();
        if clustering
            .iter()
            .any(|c| target.column_with_name(c).is_none())
        {
            return Ok(None);
        }
        // The table's cut, or one made from this batch's first slice of keys.
        let first = &rows[..rows.len().min(ENCODE_SLICE_ROWS)];
        let first_slice = || Decoded::new((first, &[]), schema, target, uniqueness).next();
        let Some(cut) = cutting.cut(target, first_slice)? else {
            return self.gather(target, []).map(Some);
        };
        let router = RowRouter::new(&cut, schema, target, clustering)?;
        let range_files = RangeFiles::new(self.clone(), target.clone(), router.count());
        let (out, router) = (&range_files, &router);
        let decoded = self.in_parts((rows, tags), |i, part| {
            let split = router.split(part)?;
            let mut sources: Vec<Option<Decoded>> = split
                .iter()
                .map(|(rows, tags)| {
                    let range = (rows.as_slice(), tags.as_slice());
                    (!rows.is_empty()).then(|| Decoded::new(range, schema, target, uniqueness))
                })
                .collect();
            out.write_each(&self.runtime, &mut sources, i)?;
            let mut files = WrittenFiles::empty(target);
            for range in sources.into_iter().flatten() {
                files.absorb(range.into_files());
            }
            Ok(files)
        });
        let wrote = decoded
            .iter()
            .find_map(|part| part.as_ref().err())
            .map_or(Ok(()), |e| Err(anyhow::anyhow!("{e:#}")));
        let mut written = Vec::new();
        let closed = self
            .runtime
            .block_on(range_files.close(wrote, &mut written));
        let adds = written.into_iter().map(|(range, mut add)| {
            add.tags
                .get_or_insert_default()
                .insert(RANGE_TAG.to_string(), Some(cut.tag(range)));
            add
        });
        let files = WrittenFiles {
            adds: adds.collect(),
            ..WrittenFiles::empty(target)
        };
        if let Err(e) = closed {
            self.discard(&files);
            return Err(e);
        }
        self.gather(target, std::iter::once(Ok(files)).chain(decoded))
            .map(Some)
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
        let mut decoded = Decoded::new((rows, tags), schema, target, uniqueness);
        let encoded = self.runtime.block_on(async {
            for slice in &mut decoded {
                writer.write(&slice?).await?;
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
        let mut files = decoded.into_files();
        files.adds = adds;
        Ok(files)
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

/// A batch's rows decoded a slice at a time and reshaped to the table's schema, keeping what
/// the written files must report: the rows' key fingerprints, the rows left out and the tags of
/// the rows kept.
struct Decoded<'a> {
    slices: std::iter::Enumerate<std::slice::Chunks<'a, &'a [u8]>>,
    tags: &'a [RowTag],
    schema: &'a SchemaRef,
    target: &'a SchemaRef,
    uniqueness: &'a [String],
    keys: Vec<u64>,
    unfit: Vec<UnfitRow>,
    kept_tags: Vec<RowTag>,
}

impl<'a> Decoded<'a> {
    fn new(
        (rows, tags): (&'a [&'a [u8]], &'a [RowTag]),
        schema: &'a SchemaRef,
        target: &'a SchemaRef,
        uniqueness: &'a [String],
    ) -> Decoded<'a> {
        Decoded {
            slices: rows.chunks(ENCODE_SLICE_ROWS).enumerate(),
            tags,
            schema,
            target,
            uniqueness,
            keys: Vec::with_capacity(rows.len()),
            unfit: Vec::new(),
            kept_tags: Vec::with_capacity(tags.len()),
        }
    }

    fn decode(&mut self, i: usize, slice: &[&[u8]]) -> Result<arrow::record_batch::RecordBatch> {
        let decoded = rows_to_record_batch(self.schema.clone(), slice)
            .context("rows do not fit the table's FHIR schema")?;
        self.unfit
            .extend(UnfitRow::from_decode(slice, &decoded.unfit));
        if !self.tags.is_empty() {
            let start = i * ENCODE_SLICE_ROWS;
            let slice_tags = &self.tags[start..start + slice.len()];
            self.kept_tags.extend(fit_tags(slice_tags, &decoded.unfit));
        }
        self.keys
            .extend(key_fingerprints(self.uniqueness, &decoded.batch, &[])?);
        conform_batch(&decoded.batch, self.target)
    }

    /// What the files of the rows decoded must report (their adds to be filled in).
    fn into_files(self) -> WrittenFiles {
        WrittenFiles {
            keys: self.keys,
            unfit: self.unfit,
            tags: self.kept_tags,
            ..WrittenFiles::empty(self.target)
        }
    }
}

impl Iterator for Decoded<'_> {
    type Item = Result<arrow::record_batch::RecordBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        let (i, slice) = self.slices.next()?;
        Some(self.decode(i, slice))
    }
}
