//! Compaction file by file: a table's small data files are read back a slice at a time and
//! written into files of about the table's target size, so compaction holds one slice and one
//! open row group, whatever the size of the table.
//!
//! A clustered table is compacted by clustering instead ([`cluster_by_file`]): its small files
//! that no other clustering implementation claims are read back, sorted on the clustering
//! columns by DataFusion (whose sort spills to disk beyond its share of the memory pool), and
//! written as files of the target size, each so holding a narrow key range, tagged as clustered
//! by this tool (`clusteringProvider`, as PROTOCOL.md asks).
//!
//! delta-rs's OPTIMIZE (1.1) reads each bin through a DataFusion scan and writes it with its own
//! writer; finishing a 4 GB first load, its compactions were the run's peak (450 to 609 MiB
//! against 395 MiB while reading). Tables that cannot be read file by file
//! ([`file_merge::unsupported`](super::file_merge::unsupported)) still use it.

use anyhow::{Context, Result};
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::datafile::reader::ParquetFileReader;
use deltalake::kernel::{Action, Add, Remove};
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::cluster_sort;
use super::deletion_vectors::{DeletedRows, deleted_rows};
use super::file_merge::{close_writer, read_file};
use super::files::TableFiles;

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
    let reader = ParquetFileReader::new(table.log_store().object_store(None));
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
/// clustered by this tool (files another implementation clustered are left to it): their rows,
/// sorted on the `clustering` columns ([`cluster_sort`], holding about `sort_bytes` of rows at
/// a time), are written as files of about `target` bytes. Nothing is committed: the caller
/// records the returned actions. On error, files this call wrote are removed. None when the
/// clustering columns are not top-level columns of the table.
pub async fn cluster_by_file(
    table: &DeltaTable,
    files: &TableFiles,
    target: u64,
    clustering: &[String],
    sort_bytes: usize,
) -> Result<Option<Compaction>> {
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
    let (mut bytes, mut row_count) = (0u64, 0u64);
    for file in state.log_data().iter() {
        let size = u64::try_from(file.size()).unwrap_or(0);
        // Deprecated in delta-rs, but the only way it shows a file's clustering provider.
        #[allow(deprecated)]
        let provider = file.add_action().clustering_provider;
        if size >= target || provider.is_some_and(|p| p.as_str() != CLUSTERING_PROVIDER) {
            continue;
        }
        let vector = file.deletion_vector_descriptor();
        let deleted = vector.as_ref().map_or(0, |v| v.cardinality);
        let records = file.num_records().map_or(0, |n| n as i64 - deleted);
        bytes += size;
        row_count += u64::try_from(records).unwrap_or(0);
        stored.push((file.object_store_path(), vector));
        removes.push(file.remove_action(false));
    }
    if stored.len() < 2 {
        return Ok(Some(Compaction::default()));
    }
    let mut inputs = Vec::with_capacity(stored.len());
    for (path, vector) in stored {
        inputs.push((path, deleted_rows(table, vector).await?));
    }
    let rows = live_rows(table.log_store().object_store(None), &schema, inputs);
    let sorted = cluster_sort::sort_rows(rows, &schema, clustering, sort_bytes).await?;
    // The merge of the sorted runs and the encoding of the files each take a core: the merge
    // runs on a thread of its own, a couple of batches ahead of the writer.
    let (merged, mut batches) = tokio::sync::mpsc::channel::<Result<RecordBatch>>(2);
    let merging = tokio::task::spawn_blocking(move || {
        let mut sorted = sorted;
        loop {
            let next = sorted.next_batch().transpose();
            let last = !matches!(next, Some(Ok(_)));
            if let Some(batch) = next
                && merged.blocking_send(batch).is_err()
            {
                return;
            }
            if last {
                return;
            }
        }
    });
    // Files of about the target size: as many rows each as the small files held per target's
    // worth of bytes.
    let rows_per_file = match bytes {
        0 => u64::MAX,
        _ => (row_count.saturating_mul(target) / bytes).max(1),
    };
    let mut written: Vec<Add> = Vec::new();
    let mut writer = files.writer(&schema);
    let mut in_file = 0u64;
    let copied = async {
        while let Some(batch) = batches.recv().await {
            let mut batch = batch?;
            while batch.num_rows() > 0 {
                if in_file == rows_per_file {
                    let full = std::mem::replace(&mut writer, files.writer(&schema));
                    written.extend(
                        full.close()
                            .await
                            .context("writing a clustered data file")?,
                    );
                    in_file = 0;
                }
                let room = usize::try_from(rows_per_file - in_file).unwrap_or(usize::MAX);
                let take = room.min(batch.num_rows());
                writer.write(&batch.slice(0, take)).await?;
                in_file += take as u64;
                batch = batch.slice(take, batch.num_rows() - take);
            }
        }
        anyhow::Ok(())
    }
    .await;
    drop(batches);
    let copied = match merging.await {
        Ok(()) => copied,
        Err(e) => copied.and(Err(anyhow::anyhow!("merging the sorted rows stopped: {e}"))),
    };
    let what = "writing a clustered data file";
    if let Err(e) = close_writer(Some(writer), copied, what, &mut written).await {
        files.remove(&written).await;
        return Err(e);
    }
    Ok(Some(Compaction::of(
        removes,
        written,
        Some(CLUSTERING_PROVIDER),
    )))
}

/// The live rows of the given files (path, rows their deletion vector removes), one file
/// after the other, conformed to `schema`.
fn live_rows(
    store: deltalake::logstore::ObjectStoreRef,
    schema: &SchemaRef,
    files: Vec<(deltalake::Path, Option<DeletedRows>)>,
) -> BoxStream<'static, Result<RecordBatch>> {
    let schema = schema.clone();
    futures::stream::iter(files)
        .then(move |(path, deleted)| {
            let (store, schema) = (store.clone(), schema.clone());
            async move { read_file(&ParquetFileReader::new(store), &path, &schema, deleted).await }
        })
        .try_flatten()
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

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
