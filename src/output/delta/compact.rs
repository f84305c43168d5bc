//! Compaction file by file: a table's small data files are read back a slice at a time and
//! written into files of about the table's target size, so compaction holds one slice and one
//! open row group, whatever the size of the table.
//!
//! A clustered table is compacted by clustering instead ([`cluster_by_file`]): its small files
//! that no other clustering implementation claims are read back and written as files of about
//! the target size, each holding a narrow key range of the clustering columns, disjoint from
//! the others, and tagged as clustered by this tool (`clusteringProvider`, as PROTOCOL.md asks).
//! Where every range's file can be open at once in memory, rows go straight to their range's
//! file ([`range_cluster`], one pass, as Spark's clustering repartitions by range); otherwise
//! they are sorted first by an external sort ([`cluster_sort`]), whose memory does not grow
//! with the table. Both run on every thread the run has.
//!
//! delta-rs's OPTIMIZE (1.1) reads each bin through a DataFusion scan and writes it with its own
//! writer; finishing a 4 GB first load, its compactions were the run's peak (450 to 609 MiB
//! against 395 MiB while reading). Tables that cannot be read file by file
//! ([`file_merge::unsupported`](super::file_merge::unsupported)) still use it.

use anyhow::{Context, Result};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::{Action, Add, Remove};
use futures::StreamExt;
use futures::stream::BoxStream;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::cluster_sort;
use super::deletion_vectors::{DeletedRows, deleted_rows};
use super::file_merge::{SliceReader, close_writer, read_file};
use super::files::TableFiles;
use super::range_cluster;
use super::range_pieces;
use super::{file_concat, stats_merge};
use crate::output::ENCODE_SLICE_ROWS;

/// What a compaction did: the log's actions (removes of the small files, then adds of the files
/// that replace them, none of them changing data) and how many files each way.
#[derive(Debug, Default)]
pub struct Compaction {
    pub actions: Vec<Action>,
    pub files_removed: usize,
    pub files_added: usize,
}

impl Compaction {
    /// The compaction that replaces `removes` with `written`, which change no data (and were
    /// clustered by `provider`, if any).
    fn of(removes: Vec<Remove>, written: Vec<Add>, provider: Option<&str>) -> Compaction {
        let (files_removed, files_added) = (removes.len(), written.len());
        let adds = written.into_iter().map(|mut add| {
            add.data_change = false;
            add.clustering_provider = provider.map(str::to_string);
            Action::Add(add)
        });
        Compaction {
            actions: removes
                .into_iter()
                .map(Action::Remove)
                .chain(adds)
                .collect(),
            files_removed,
            files_added,
        }
    }
}

/// Packs the files (by size, in the log's order) smaller than `target` bytes into bins of at
/// most `target` bytes, as delta-rs plans them; a bin of one file is left out, since rewriting
/// it alone gains nothing. Returns each bin's file positions.
pub fn plan_bins(sizes: &[u64], target: u64) -> Vec<Vec<usize>> {
    let mut bins: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut bytes = 0;
    for (i, &size) in sizes.iter().enumerate().filter(|(_, s)| **s < target) {
        if !current.is_empty() && bytes + size > target {
            bins.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(i);
    }
    bins.push(current);
    bins.retain(|bin| bin.len() > 1);
    bins
}

/// Compacts the table's active files into files of about `target` bytes. Nothing is
/// committed: the caller records the returned actions. On error, files this call wrote are
/// removed.
pub async fn compact_by_file(
    table: &DeltaTable,
    files: &TableFiles,
    target: u64,
) -> Result<Compaction> {
    let state = table.snapshot()?;
    let schema = state.snapshot().arrow_schema();
    let stored: Vec<(deltalake::Path, u64, Remove)> = state
        .log_data()
        .iter()
        .map(|f| {
            let size = u64::try_from(f.size()).unwrap_or(0);
            (f.object_store_path(), size, f.remove_action(false))
        })
        .collect();
    let sizes: Vec<u64> = stored.iter().map(|(_, size, _)| *size).collect();
    let reader = SliceReader::new(table.log_store().object_store(None));
    let mut written: Vec<Add> = Vec::new();
    let mut removes: Vec<Remove> = Vec::new();
    let rewritten = async {
        for bin in plan_bins(&sizes, target) {
            let mut writer = files.writer(&schema);
            let copied = async {
                for &i in &bin {
                    let (path, _, remove) = &stored[i];
                    let deleted = deleted_rows(table, remove.deletion_vector.clone()).await?;
                    let mut slices = read_file(&reader, path, &schema, deleted).await?;
                    while let Some(slice) = slices.next().await {
                        let slice = slice.with_context(|| format!("reading {path}"))?;
                        writer.write(&slice).await?;
                    }
                }
                anyhow::Ok(())
            }
            .await;
            let what = "writing a compacted data file";
            close_writer(Some(writer), copied, what, &mut written).await?;
            removes.extend(bin.iter().map(|&i| stored[i].2.clone()));
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(e) = rewritten {
        files.remove(&written).await;
        return Err(e);
    }
    Ok(Compaction::of(removes, written, None))
}

/// The `clusteringProvider` of the files this tool clusters.
pub const CLUSTERING_PROVIDER: &str = "cumulus-etl";

/// Clusters the table's active files smaller than `target` bytes that are unclustered or
/// clustered by this tool (files another implementation clustered are left to it): their rows
/// are written as files of about `target` bytes, each of its own range of the `clustering`
/// columns' keys, on up to `threads` threads: straight to their range's file where the open
/// files fit in `sort_bytes` times [`MERGE_MEMORY`], else through an external sort
/// ([`cluster_sort`], holding about `sort_bytes` of rows at a time). Nothing is committed: the caller
/// records the returned actions. On error, files this call wrote are removed. None when the
/// clustering columns are not top-level columns of the table.
pub async fn cluster_by_file(
    table: &DeltaTable,
    files: &Arc<TableFiles>,
    target: u64,
    clustering: &[String],
    sorting: Sorting,
) -> Result<Option<Compaction>> {
    let Sorting {
        memory: sort_bytes,
        threads,
        joins_only,
    } = sorting;
    let state = table.snapshot()?;
    let schema = state.snapshot().arrow_schema();
    if clustering
        .iter()
        .any(|c| schema.column_with_name(c).is_none())
    {
        return Ok(None);
    }
    let mut stored = Vec::new();
    let mut removes = Vec::new();
    // The files as pieces of a first load's cut, while every one is ([`range_pieces`]).
    let mut pieces = Some(Vec::new());
    let (mut bytes, mut row_count) = (0u64, 0u64);
    for file in state.log_data().iter() {
        let size = u64::try_from(file.size()).unwrap_or(0);
        // Deprecated in delta-rs, but the only way it shows a file's clustering provider.
        #[allow(deprecated)]
        let add = file.add_action();
        let provider = add.clustering_provider.as_deref();
        if size >= target || provider.is_some_and(|p| p != CLUSTERING_PROVIDER) {
            continue;
        }
        let piece = match file.deletion_vector_descriptor() {
            None => range_pieces::piece_of(add.tags.as_ref()),
            Some(_) => None,
        };
        pieces = match (pieces, piece) {
            (Some(mut all), Some(piece)) => {
                all.push(JoinInput {
                    piece,
                    path: file.object_store_path(),
                    size,
                    stats: add.stats.clone(),
                });
                Some(all)
            }
            _ => None,
        };
        let vector = file.deletion_vector_descriptor();
        let deleted = vector.as_ref().map_or(0, |v| v.cardinality);
        let records = file.num_records().map_or(0, |n| n as i64 - deleted);
        bytes += size;
        row_count += u64::try_from(records).unwrap_or(0);
        stored.push((file.object_store_path(), vector, size));
        removes.push(file.remove_action(false));
    }
    if stored.len() < 2 {
        return Ok(Some(Compaction::default()));
    }
    // The largest files first, so the readers, which take the next file when done with one,
    // finish together.
    stored.sort_by_key(|(_, _, size)| std::cmp::Reverse(*size));
    let sizes: Vec<(deltalake::Path, u64)> = stored
        .iter()
        .map(|(path, _, size)| (path.clone(), *size))
        .collect();
    let mut inputs = Vec::with_capacity(stored.len());
    for (path, vector, _) in stored {
        inputs.push((path, deleted_rows(table, vector).await?));
    }
    // Files of about the target size: as many rows each as the small files held per target's
    // worth of bytes.
    let rows_per_file = match bytes {
        0 => u64::MAX,
        _ => (row_count.saturating_mul(target) / bytes).max(1),
    };
    let store = table.log_store().object_store(None);
    let ranges = range_count(row_count, rows_per_file, threads);
    if let Some(pieces) = pieces {
        let joined = join_pieces(&store, files, &schema, clustering, pieces, ranges).await?;
        if let Some(written) = joined {
            return Ok(Some(Compaction::of(
                removes,
                written,
                Some(CLUSTERING_PROVIDER),
            )));
        }
    }
    if joins_only {
        return Ok(Some(Compaction::default()));
    }
    let written = if ranges * open_file_bytes(bytes, row_count, ranges) <= sort_bytes * MERGE_MEMORY
    {
        let every = row_count.div_ceil(range_cluster::MAX_SAMPLES);
        let keys = Arc::new(cluster_sort::Keys::new(&schema, clustering)?);
        let sample =
            range_cluster::sample_keys(&store, &sizes, &schema, clustering, &keys, every).await?;
        let ranges = range_cluster::Ranges::cut(keys, sample, ranges);
        write_ranges(store, files, &schema, inputs, ranges, threads).await?
    } else {
        let plan = SortPlan {
            sort_bytes,
            parts: key_ranges(row_count, rows_per_file, threads),
            rows_per_file,
        };
        sort_and_write(store, files, &schema, clustering, inputs, plan).await?
    };
    Ok(Some(Compaction::of(
        removes,
        written,
        Some(CLUSTERING_PROVIDER),
    )))
}

/// Clusters by key ranges ([`range_cluster`]): `threads` readers send the rows of `inputs` to
/// the files of their `ranges`. Returns the files written; on error, none is left.
async fn write_ranges(
    store: deltalake::logstore::ObjectStoreRef,
    files: &Arc<TableFiles>,
    schema: &SchemaRef,
    inputs: Vec<(deltalake::Path, Option<DeletedRows>)>,
    ranges: range_cluster::Ranges,
    threads: usize,
) -> Result<Vec<Add>> {
    let ranges = Arc::new(ranges);
    let out = Arc::new(range_cluster::RangeFiles::new(
        files.clone(),
        schema.clone(),
        ranges.count(),
    ));
    let readers = threads.min(inputs.len()).max(1);
    let queue = Arc::new(Mutex::new(VecDeque::from(inputs)));
    let tasks: Vec<_> = (0..readers)
        .map(|number| {
            let (out, ranges, store, schema) =
                (out.clone(), ranges.clone(), store.clone(), schema.clone());
            let (runtime, queue) = (tokio::runtime::Handle::current(), queue.clone());
            tokio::task::spawn_blocking(move || {
                // Slices as large as the encoder takes: each range's share of a slice is
                // written at once, and every write walks the wide schema.
                let reader = SliceReader::new(store).with_slice_rows(ENCODE_SLICE_ROWS);
                let rows = LiveRows::new(runtime.clone(), reader, schema, queue);
                out.write(&runtime, &ranges, rows, number)
            })
        })
        .collect();
    let mut wrote = Ok(());
    for task in tasks {
        let done = match task.await {
            Ok(done) => done,
            Err(e) => Err(anyhow::anyhow!("clustering rows stopped: {e}")),
        };
        wrote = wrote.and(done);
    }
    let out = Arc::into_inner(out).expect("the readers have ended");
    let mut written = Vec::new();
    let closed = out.close(wrote, &mut written).await;
    let written: Vec<Add> = written.into_iter().map(|(_, add)| add).collect();
    if let Err(e) = closed {
        files.remove(&written).await;
        return Err(e);
    }
    Ok(written)
}

/// How [`cluster_by_file`] may cluster: holding about `memory` bytes of rows at a time (when it
/// sorts), on up to `threads` threads; with `joins_only`, only by joining a first load's pieces
/// ([`range_pieces`]), and otherwise not at all.
pub struct Sorting {
    pub memory: usize,
    pub threads: usize,
    pub joins_only: bool,
}

/// A piece of a first load's cut, to join ([`range_pieces`]).
struct JoinInput {
    piece: range_pieces::Piece,
    path: deltalake::Path,
    size: u64,
    stats: Option<String>,
}

/// Joins `pieces` (the small files of a first load, all pieces of its cut) into `count` files of
/// contiguous key ranges by copying their column chunks, the files at once; a file whose pieces
/// do not share one schema is written by reading them instead. None when the pieces cannot make
/// `count` files ([`range_pieces::join_plan`]). On error, no file written is left.
async fn join_pieces(
    store: &deltalake::logstore::ObjectStoreRef,
    files: &Arc<TableFiles>,
    schema: &SchemaRef,
    clustering: &[String],
    pieces: Vec<JoinInput>,
    count: usize,
) -> Result<Option<Vec<Add>>> {
    let planned: Vec<(range_pieces::Piece, u64)> =
        pieces.iter().map(|p| (p.piece.clone(), p.size)).collect();
    let Some(groups) = range_pieces::join_plan(&planned, count) else {
        return Ok(None);
    };
    let pieces = Arc::new(pieces);
    let tasks: Vec<_> = groups
        .into_iter()
        .map(|group| {
            let (store, files, schema, pieces) =
                (store.clone(), files.clone(), schema.clone(), pieces.clone());
            let clustering = clustering.to_vec();
            tokio::spawn(async move {
                let group: Vec<&JoinInput> = group.iter().map(|&i| &pieces[i]).collect();
                join_group(&store, &files, &schema, &clustering, &group).await
            })
        })
        .collect();
    let mut written = Vec::new();
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(adds)) => written.extend(adds),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(anyhow::anyhow!("joining pieces stopped: {e}"))),
        }
    }
    if let Some(e) = failed {
        files.remove(&written).await;
        return Err(e);
    }
    Ok(Some(written))
}

/// Joins one file's pieces ([`join_pieces`]); returns the files written.
async fn join_group(
    store: &deltalake::logstore::ObjectStoreRef,
    files: &Arc<TableFiles>,
    schema: &SchemaRef,
    clustering: &[String],
    group: &[&JoinInput],
) -> Result<Vec<Add>> {
    let mut footers = Vec::with_capacity(group.len());
    for piece in group {
        footers.push(file_concat::footer(store, &piece.path, piece.size).await?);
    }
    if !file_concat::same_schema(&footers) {
        let inputs = group.iter().map(|p| (p.path.clone(), None)).collect();
        let keys = Arc::new(cluster_sort::Keys::new(schema, clustering)?);
        let one = range_cluster::Ranges::cut(keys, Vec::new(), 1);
        return write_ranges(store.clone(), files, schema, inputs, one, 1).await;
    }
    let inputs: Vec<(deltalake::Path, _)> =
        group.iter().map(|p| p.path.clone()).zip(footers).collect();
    let name = format!("part-00000-{}-c000.snappy.parquet", uuid::Uuid::new_v4());
    let out = deltalake::Path::from(name.as_str());
    let (runtime, copy_store, copy_out) = (
        tokio::runtime::Handle::current(),
        store.clone(),
        out.clone(),
    );
    let size = tokio::task::spawn_blocking(move || {
        file_concat::join(&runtime, &copy_store, &inputs, &copy_out)
    })
    .await
    .map_err(|e| anyhow::anyhow!("joining pieces stopped: {e}"))??;
    let stats: Vec<Option<&str>> = group.iter().map(|p| p.stats.as_deref()).collect();
    Ok(vec![Add {
        path: name,
        size: i64::try_from(size)?,
        modification_time: chrono::Utc::now().timestamp_millis(),
        data_change: false,
        stats: stats_merge::merge(&stats),
        ..Default::default()
    }])
}

/// How an external sort clusters: holding about `sort_bytes` of rows at a time, merging
/// `parts` key ranges at once into files of `rows_per_file` rows.
struct SortPlan {
    sort_bytes: usize,
    parts: usize,
    rows_per_file: u64,
}

/// Clusters by an external sort ([`cluster_sort`]) of the rows of `inputs`, as `plan` says.
/// Returns the files written; on error, none is left.
async fn sort_and_write(
    store: deltalake::logstore::ObjectStoreRef,
    files: &Arc<TableFiles>,
    schema: &SchemaRef,
    clustering: &[String],
    inputs: Vec<(deltalake::Path, Option<DeletedRows>)>,
    plan: SortPlan,
) -> Result<Vec<Add>> {
    let SortPlan {
        sort_bytes,
        parts,
        rows_per_file,
    } = plan;
    let runs = write_runs(store, schema, clustering, inputs, sort_bytes, parts).await?;
    // As many merges at once as memory allows: each holds a batch of every run (19 to 21 MB
    // of Arrow memory per merge on a 500 MB to 1 GB first load, at either budget).
    let by_memory = sort_bytes * MERGE_MEMORY / runs.merge_bytes().max(1);
    let parts = parts.min(by_memory.max(1));
    let merges: Vec<_> = runs
        .split(parts)
        .into_iter()
        .map(|range| {
            let (runs, files, schema) = (runs.clone(), files.clone(), schema.clone());
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let mut written = Vec::new();
                let merged = runs.merge(&range).and_then(|sorted| {
                    write_sorted(
                        &runtime,
                        &files,
                        &schema,
                        sorted,
                        rows_per_file,
                        &mut written,
                    )
                });
                (written, merged)
            })
        })
        .collect();
    let mut written: Vec<Add> = Vec::new();
    let mut failed = None;
    for merge in merges {
        match merge.await {
            Ok((files, merged)) => {
                written.extend(files);
                failed = failed.or(merged.err());
            }
            Err(e) => failed = failed.or(Some(anyhow::anyhow!("merging sorted rows stopped: {e}"))),
        }
    }
    if let Some(e) = failed {
        files.remove(&written).await;
        return Err(e);
    }
    Ok(written)
}

/// Key ranges to cluster into by ranges: one per file of `rows_per_file` rows, so no two files
/// overlap, and at least one per thread (as [`key_ranges`] counts them).
fn range_count(rows: u64, rows_per_file: u64, threads: usize) -> usize {
    let files = usize::try_from(rows.div_ceil(rows_per_file.max(1))).unwrap_or(usize::MAX);
    files.max(key_ranges(rows, rows_per_file, threads))
}

/// About the memory an open file of one of `ranges` ranges holds while it is written: a row
/// group's encoded bytes (as many as the files' rows took on average), or the range's share of
/// them, and an allowance for the column writers of a wide FHIR schema.
fn open_file_bytes(bytes: u64, rows: u64, ranges: usize) -> usize {
    let row_group = bytes
        .saturating_mul(crate::output::parquet::ROW_GROUP_ROWS as u64)
        .checked_div(rows)
        .unwrap_or(0);
    let share = bytes / ranges.max(1) as u64;
    usize::try_from(row_group.min(share)).unwrap_or(usize::MAX) + OPEN_FILE_ALLOWANCE
}

/// See [`open_file_bytes`].
const OPEN_FILE_ALLOWANCE: usize = 1 << 20;

/// Key ranges to merge at once, each into its own files: one per thread, as long as each
/// range fills a file of `rows_per_file` rows or holds [`MIN_RANGE_ROWS`] (fewer rows merge
/// about as fast in one range, and each range ends in a file of its own).
fn key_ranges(rows: u64, rows_per_file: u64, threads: usize) -> usize {
    let files = rows.div_ceil(rows_per_file.max(1));
    let ranges = files.max(rows / MIN_RANGE_ROWS);
    usize::try_from(ranges)
        .unwrap_or(usize::MAX)
        .clamp(1, threads.max(1))
}

/// See [`key_ranges`].
const MIN_RANGE_ROWS: u64 = 65_536;

/// The merges of a compaction together, or its open range files, hold up to this many times
/// the sort's share of memory (the rows of the run are written by then; two compactions run at
/// once).
const MERGE_MEMORY: usize = 6;

/// Writes the live rows of `inputs` (path, rows their deletion vector removes) as sorted runs
/// for merges of `parts` key ranges: `parts` threads each take the next file left (in the
/// order given) until none is, holding about twice `sort_bytes` of rows between them.
async fn write_runs(
    store: deltalake::logstore::ObjectStoreRef,
    schema: &SchemaRef,
    clustering: &[String],
    inputs: Vec<(deltalake::Path, Option<DeletedRows>)>,
    sort_bytes: usize,
    parts: usize,
) -> Result<Arc<cluster_sort::Runs>> {
    let writer = Arc::new(cluster_sort::RunWriter::new(schema, clustering, parts)?);
    let readers = parts.min(inputs.len()).max(1);
    // Each reader holds a run: twice the sort's share between them, so runs on two cores are
    // as large as one core's were. Smaller runs (half each) made twice as many, and the merges
    // that hold a batch of each peaked at 371 MiB against 292 to 302 at `--memory 256MiB`.
    let run_bytes = sort_bytes * 2 / readers;
    let files = Arc::new(Mutex::new(VecDeque::from(inputs)));
    let tasks: Vec<_> = (0..readers)
        .map(|_| {
            let (writer, store, schema) = (writer.clone(), store.clone(), schema.clone());
            let (runtime, files) = (tokio::runtime::Handle::current(), files.clone());
            tokio::task::spawn_blocking(move || {
                let rows = LiveRows::new(runtime, SliceReader::new(store), schema, files);
                writer.write(rows, run_bytes)
            })
        })
        .collect();
    let mut runs = Vec::new();
    let mut failed = None;
    for task in tasks {
        match task.await {
            Ok(Ok(written)) => runs.extend(written),
            Ok(Err(e)) => failed = failed.or(Some(e)),
            Err(e) => failed = failed.or(Some(anyhow::anyhow!("sorting rows stopped: {e}"))),
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    let writer = Arc::into_inner(writer).expect("the sort's threads have ended");
    // A merge holds a batch of every run: more runs than memory holds batches of are first
    // merged into fewer, larger ones.
    let batch_bytes = runs.iter().map(|r| r.batch_bytes()).sum::<usize>() / runs.len().max(1);
    let fan_in = sort_bytes * MERGE_MEMORY / batch_bytes.max(1);
    let reduced = tokio::task::spawn_blocking(move || {
        let runs = writer.reduce(runs, fan_in)?;
        anyhow::Ok(writer.finish(runs))
    })
    .await
    .map_err(|e| anyhow::anyhow!("merging sorted runs stopped: {e}"))??;
    Ok(Arc::new(reduced))
}

/// Writes sorted rows as files of `rows_per_file` rows (the last one fewer), recording them in
/// `written`; runs on a thread outside the runtime, which drives the writer.
fn write_sorted(
    runtime: &tokio::runtime::Handle,
    files: &TableFiles,
    schema: &SchemaRef,
    mut sorted: cluster_sort::SortedRows,
    rows_per_file: u64,
    written: &mut Vec<Add>,
) -> Result<()> {
    let what = "writing a clustered data file";
    let mut writer = None;
    let mut in_file = 0u64;
    let copied = (|| {
        while let Some(mut batch) = sorted.next_batch()? {
            while batch.num_rows() > 0 {
                if in_file == rows_per_file {
                    runtime.block_on(close_writer(writer.take(), Ok(()), what, written))?;
                    in_file = 0;
                }
                let room = usize::try_from(rows_per_file - in_file).unwrap_or(usize::MAX);
                let take = room.min(batch.num_rows());
                let open = writer.get_or_insert_with(|| files.writer(schema));
                runtime.block_on(open.write(&batch.slice(0, take)))?;
                in_file += take as u64;
                batch = batch.slice(take, batch.num_rows() - take);
            }
        }
        anyhow::Ok(())
    })();
    runtime.block_on(close_writer(writer, copied, what, written))
}

/// Files left to read (path, rows their deletion vector removes), shared by the readers.
type FileQueue = Arc<Mutex<VecDeque<(deltalake::Path, Option<DeletedRows>)>>>;

/// The live rows of the files taken from a queue, one file after the other, conformed to
/// `schema`; read on a thread outside the runtime, which drives the reads.
struct LiveRows {
    runtime: tokio::runtime::Handle,
    reader: SliceReader,
    schema: SchemaRef,
    files: FileQueue,
    current: Option<BoxStream<'static, Result<RecordBatch>>>,
}

impl LiveRows {
    fn new(
        runtime: tokio::runtime::Handle,
        reader: SliceReader,
        schema: SchemaRef,
        files: FileQueue,
    ) -> LiveRows {
        LiveRows {
            runtime,
            reader,
            schema,
            files,
            current: None,
        }
    }
}

impl Iterator for LiveRows {
    type Item = Result<RecordBatch>;

    fn next(&mut self) -> Option<Result<RecordBatch>> {
        loop {
            if let Some(stream) = &mut self.current {
                match self.runtime.block_on(stream.next()) {
                    Some(slice) => return Some(slice),
                    None => self.current = None,
                }
            }
            let (path, deleted) = self.files.lock().unwrap().pop_front()?;
            let opened =
                self.runtime
                    .block_on(read_file(&self.reader, &path, &self.schema, deleted));
            match opened {
                Ok(stream) => {
                    let named =
                        stream.map(move |slice| slice.with_context(|| format!("reading {path}")));
                    self.current = Some(named.boxed());
                }
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_ranges_follow_threads_but_each_fills_a_file_or_holds_enough_rows() {
        // A table under one file merges on every thread once it has enough rows...
        assert_eq!(key_ranges(588_693, 1_400_000, 2), 2);
        assert_eq!(key_ranges(588_693, 1_400_000, 16), 8);
        // ...or fills several files.
        assert_eq!(key_ranges(1_250, 400, 2), 2);
        assert_eq!(key_ranges(1_250, 400, 16), 4);
        // A small table in one file, and one thread, merge as one range.
        assert_eq!(key_ranges(20_000, 1_000_000, 16), 1);
        assert_eq!(key_ranges(10_000_000, 100_000, 1), 1);
        assert_eq!(key_ranges(0, u64::MAX, 4), 1);
    }

    #[test]
    fn range_clustering_makes_a_range_per_file_and_per_thread() {
        // 588,693 rows, a million per target-sized file: one range per thread.
        assert_eq!(range_count(588_693, 1_000_000, 2), 2);
        // 5,000 rows, 400 per file: 13 ranges, one per file, whatever the threads.
        assert_eq!(range_count(5_000, 400, 2), 13);
        assert_eq!(range_count(5_000, 400, 16), 13);
        // An open file holds a row group's bytes (100 bytes a row here), or its range's share
        // of a small table, and the allowance.
        assert_eq!(
            open_file_bytes(100_000_000, 1_000_000, 2),
            6_553_600 + OPEN_FILE_ALLOWANCE
        );
        assert_eq!(open_file_bytes(1_000, 10, 4), 250 + OPEN_FILE_ALLOWANCE);
        assert_eq!(open_file_bytes(0, 0, 1), OPEN_FILE_ALLOWANCE);
    }

    #[test]
    fn small_files_pack_into_bins_up_to_the_target_and_lone_files_stay() {
        // Target 100: the 120-byte file is left alone, a bin closes before it would pass 100,
        // and bins of one file (50, 60, 90) are not rewritten.
        let sizes = [30, 40, 120, 20, 50, 60, 90];
        assert_eq!(plan_bins(&sizes, 100), vec![vec![0, 1, 3]]);
        assert_eq!(
            plan_bins(&[10, 10, 10, 10], 25),
            vec![vec![0, 1], vec![2, 3]]
        );
        assert!(plan_bins(&[], 100).is_empty());
        assert!(plan_bins(&[200, 300], 100).is_empty());
    }
}
