//! An external sort of a table's rows on its clustering columns, in memory bounded by the
//! caller, for the compaction of clustered tables.
//!
//! Rows are taken in until they hold `run_bytes` of Arrow memory; each such run is sorted (on
//! the key columns' row encoding) and written to a private temporary folder as an Arrow IPC
//! file of small batches. The runs are then merged: one small batch of each run is in memory
//! at a time. DataFusion's sort was tried first: with a pool small enough for the budget it
//! failed its merges on FHIR's wide rows, and with a larger one a 1 GB first load peaked at
//! 743 MiB against 232 MiB without clustering (`docs/performance.md`).

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;

use anyhow::{Context, Result};
use arrow::array::ArrayRef;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;
use arrow::row::{Row, RowConverter, Rows, SortField};
use futures::{Stream, StreamExt};

/// Rows per batch of the sorted output: as many as the Parquet encoder takes at a time, since
/// every batch costs a walk of the (wide, deeply nested) FHIR schema in the interleave and the
/// encoder, whatever its rows.
pub const SORTED_BATCH_ROWS: usize = crate::output::ENCODE_SLICE_ROWS;

/// A sorted run on disk is cut into batches of a sixteenth of its rows (within these bounds):
/// the merge holds one batch of every run, so up to sixteen runs merge in the memory of one,
/// and larger batches pay the schema walk less often (with 256-row batches, a 588,693-row
/// table spent 11 s in its clustered compaction).
const RUN_BATCH_ROWS: std::ops::RangeInclusive<usize> = 256..=8192;
const RUN_BATCHES: usize = 16;

/// Rows sorted on their key columns, read back from the sorted runs in order.
pub struct SortedRows {
    runs: Vec<Run>,
    keys: Keys,
    /// Where the runs are; removed when the rows are dropped.
    _dir: tempfile::TempDir,
}

/// Sorts `rows` (all of `schema`) on the `keys` columns, holding about `run_bytes` of rows in
/// memory at a time.
pub async fn sort_rows(
    rows: impl Stream<Item = Result<RecordBatch>>,
    schema: &SchemaRef,
    keys: &[String],
    run_bytes: usize,
) -> Result<SortedRows> {
    let keys = Keys::new(schema, keys)?;
    let dir = tempfile::Builder::new()
        .prefix("cumulus-etl-cluster-")
        .tempdir()
        .context("creating a folder for the clustering sort")?;
    let mut paths = Vec::new();
    let mut held: Vec<RecordBatch> = Vec::new();
    let mut held_bytes = 0;
    let mut rows = std::pin::pin!(rows);
    while let Some(batch) = rows.next().await {
        let batch = batch?;
        held_bytes += batch.get_array_memory_size();
        held.push(batch);
        if held_bytes >= run_bytes {
            paths.push(write_run(
                &dir,
                paths.len(),
                &keys,
                std::mem::take(&mut held),
            )?);
            held_bytes = 0;
        }
    }
    if !held.is_empty() {
        paths.push(write_run(&dir, paths.len(), &keys, held)?);
    }
    let mut runs = Vec::with_capacity(paths.len());
    for path in paths {
        let reader = FileReader::try_new(BufReader::new(File::open(&path)?), None)?;
        let mut run = Run {
            reader,
            batch: None,
            keys: None,
            next: 0,
        };
        run.advance(&keys)?;
        runs.push(run);
    }
    Ok(SortedRows {
        runs,
        keys,
        _dir: dir,
    })
}

impl SortedRows {
    /// The next batch of up to [`SORTED_BATCH_ROWS`] rows in key order; None at the end.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        // Batches the chosen rows come from, and (batch, row) of each chosen row.
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut slots: Vec<Option<usize>> = vec![None; self.runs.len()];
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(SORTED_BATCH_ROWS);
        while picks.len() < SORTED_BATCH_ROWS {
            // The run with the smallest next key (runs are few: a linear scan).
            let mut smallest: Option<(usize, Row<'_>)> = None;
            for (r, run) in self.runs.iter().enumerate() {
                if let Some(key) = run.key()
                    && smallest.as_ref().is_none_or(|(_, least)| key < *least)
                {
                    smallest = Some((r, key));
                }
            }
            let Some((r, _)) = smallest else { break };
            let run = &mut self.runs[r];
            let batch = run.batch.as_ref().expect("a run with a key has a batch");
            let slot = *slots[r].get_or_insert_with(|| {
                batches.push(batch.clone());
                batches.len() - 1
            });
            picks.push((slot, run.next));
            run.next += 1;
            if run.next == batch.num_rows() {
                slots[r] = None;
                run.advance(&self.keys)?;
            }
        }
        if picks.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        Ok(Some(interleave_record_batch(&refs, &picks)?))
    }
}

/// One sorted run, read a batch at a time.
struct Run {
    reader: FileReader<BufReader<File>>,
    batch: Option<RecordBatch>,
    /// The encoded keys of the batch's rows.
    keys: Option<Rows>,
    /// The batch's next row.
    next: usize,
}

impl Run {
    /// The encoded key of the run's next row; None at its end.
    fn key(&self) -> Option<Row<'_>> {
        self.batch.as_ref()?;
        Some(self.keys.as_ref()?.row(self.next))
    }

    /// Moves to the run's next batch (to its end after the last).
    fn advance(&mut self, keys: &Keys) -> Result<()> {
        loop {
            let Some(batch) = self.reader.next().transpose()? else {
                self.batch = None;
                self.keys = None;
                return Ok(());
            };
            if batch.num_rows() == 0 {
                continue;
            }
            self.keys = Some(keys.encode(&batch)?);
            self.batch = Some(batch);
            self.next = 0;
            return Ok(());
        }
    }
}

/// The key columns and their order-preserving byte encoding.
struct Keys {
    columns: Vec<usize>,
    converter: RowConverter,
}

impl Keys {
    fn new(schema: &SchemaRef, names: &[String]) -> Result<Keys> {
        let mut columns = Vec::new();
        let mut fields = Vec::new();
        for name in names {
            let (i, field) = schema
                .column_with_name(name)
                .with_context(|| format!("the clustering column '{name}'"))?;
            columns.push(i);
            fields.push(SortField::new(field.data_type().clone()));
        }
        Ok(Keys {
            columns,
            converter: RowConverter::new(fields)?,
        })
    }

    fn encode(&self, batch: &RecordBatch) -> Result<Rows> {
        let columns: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        Ok(self.converter.convert_columns(&columns)?)
    }
}

/// Sorts `batches` on the keys and writes them as run number `n`.
fn write_run(
    dir: &tempfile::TempDir,
    n: usize,
    keys: &Keys,
    batches: Vec<RecordBatch>,
) -> Result<PathBuf> {
    let encoded = batches
        .iter()
        .map(|batch| keys.encode(batch))
        .collect::<Result<Vec<Rows>>>()?;
    let mut order: Vec<(usize, usize)> = batches
        .iter()
        .enumerate()
        .flat_map(|(b, batch)| (0..batch.num_rows()).map(move |r| (b, r)))
        .collect();
    order.sort_unstable_by(|x, y| encoded[x.0].row(x.1).cmp(&encoded[y.0].row(y.1)));
    let path = dir.path().join(format!("run-{n}.arrow"));
    let schema = batches[0].schema();
    let mut writer = FileWriter::try_new(File::create(&path)?, &schema)
        .with_context(|| format!("writing {}", path.display()))?;
    let refs: Vec<&RecordBatch> = batches.iter().collect();
    let batch_rows =
        (order.len() / RUN_BATCHES).clamp(*RUN_BATCH_ROWS.start(), *RUN_BATCH_ROWS.end());
    for chunk in order.chunks(batch_rows) {
        writer.write(&interleave_record_batch(&refs, chunk)?)?;
    }
    writer.finish()?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;

    #[tokio::test]
    async fn rows_come_back_in_key_order_across_many_runs() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Utf8, true),
        ]));
        // 5,000 rows in batches of 700, keys in a scrambled order, tiny runs.
        let ids: Vec<String> = (0..5000u64)
            .map(|i| format!("{:08}", (i * 7919) % 5000))
            .collect();
        let batches: Vec<Result<RecordBatch>> = ids
            .chunks(700)
            .map(|chunk| {
                let id = StringArray::from_iter_values(chunk.iter());
                let n = StringArray::from_iter_values(chunk.iter().map(|i| format!("row {i}")));
                Ok(RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(id), Arc::new(n)],
                )?)
            })
            .collect();
        let keys = ["id".to_string()];
        let mut sorted = sort_rows(futures::stream::iter(batches), &schema, &keys, 20_000)
            .await
            .unwrap();
        assert!(sorted.runs.len() > 3, "{} runs", sorted.runs.len());
        let mut out: Vec<(String, String)> = Vec::new();
        while let Some(batch) = sorted.next_batch().unwrap() {
            assert!(batch.num_rows() <= SORTED_BATCH_ROWS);
            let id = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            let n = batch
                .column(1)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            for i in 0..batch.num_rows() {
                out.push((id.value(i).to_string(), n.value(i).to_string()));
            }
        }
        let mut want = ids.clone();
        want.sort();
        assert_eq!(
            out.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            want
        );
        assert!(out.iter().all(|(id, n)| *n == format!("row {id}")));
    }
}
