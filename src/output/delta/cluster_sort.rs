//! An external sort of a table's rows on its clustering columns, in memory bounded by the
//! caller, for the compaction of clustered tables; both of its phases run on every core.
//!
//! Rows are taken in until they hold a run's worth of Arrow memory; each such run is sorted (on
//! the key columns' row encoding) and written to a private temporary folder as an Arrow IPC
//! file of small batches, whose first keys are kept. Several readers write runs at once, each
//! from its own share of the input files ([`RunWriter`]). The runs are then merged a key range
//! at a time ([`Runs::merge`]): the ranges, cut from the batches' first keys so they hold about
//! as many rows each ([`Runs::split`]), are merged at once, each into its own files, and a
//! range's merge starts each run at the batch where the range begins. One small batch of each
//! run is in memory per range.
//!
//! DataFusion's sort was tried first: with a pool small enough for the budget it failed its
//! merges on FHIR's wide rows, and with a larger one a 1 GB first load peaked at 743 MiB
//! against 232 MiB without clustering (`docs/performance.md`).

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result};
use arrow::array::ArrayRef;
use arrow::compute::interleave_record_batch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;
use arrow::row::{OwnedRow, Row, RowConverter, Rows, SortField};

/// Rows per batch of the sorted output: as many as the Parquet encoder takes at a time, since
/// every batch costs a walk of the (wide, deeply nested) FHIR schema in the interleave and the
/// encoder, whatever its rows.
pub const SORTED_BATCH_ROWS: usize = crate::output::ENCODE_SLICE_ROWS;

/// A sorted run on disk is cut into batches of a sixteenth of its rows for each key range
/// merged at once (within these bounds): a range's merge holds one batch of every run, so up
/// to sixteen runs merge in the memory of one, and larger batches pay the schema walk less
/// often (with 256-row batches, a 588,693-row table spent 11 s in its clustered compaction).
const RUN_BATCH_ROWS: std::ops::RangeInclusive<usize> = 256..=8192;
const RUN_BATCHES: usize = 16;

/// Writes sorted runs; several threads may write at once, each from its own rows.
pub struct RunWriter {
    keys: Arc<Keys>,
    schema: SchemaRef,
    dir: Arc<tempfile::TempDir>,
    /// Batches each run is cut into.
    batches_per_run: usize,
    next_run: AtomicUsize,
}

/// One sorted run on disk: where it is, the first key of each of its batches, and keys taken
/// at even steps through each batch with the rows each stands for.
pub struct RunFile {
    path: PathBuf,
    /// Arrow memory of one of its batches (on average).
    batch_bytes: usize,
    firsts: Vec<OwnedRow>,
    samples: Vec<(OwnedRow, usize)>,
}

/// Keys sampled per batch of a run, for cutting key ranges: a batch's rows spread from its
/// first key to the next batch's, and with one sample per batch, ranges of a small table came
/// out a fifth and three times their share.
const SAMPLES_PER_BATCH: usize = 8;

/// The sorted runs of a table's rows, to merge a key range at a time.
pub struct Runs {
    runs: Vec<RunFile>,
    keys: Arc<Keys>,
    /// Where the runs are; removed when the runs and their merges are dropped.
    _dir: Arc<tempfile::TempDir>,
}

/// Keys from `lo` (included; the first key when None) to `hi` (left out; past the last when
/// None).
#[derive(Debug, Clone, Default)]
pub struct KeyRange {
    lo: Option<OwnedRow>,
    hi: Option<OwnedRow>,
}

impl RunFile {
    /// Arrow memory of one of its batches (on average), which a merge holds.
    pub fn batch_bytes(&self) -> usize {
        self.batch_bytes
    }
}

impl RunWriter {
    /// Runs of rows of `schema` sorted on the `keys` columns, for merges of `ranges` key ranges
    /// at once (which cuts the runs into smaller batches, so the merges together hold about
    /// what one would).
    pub fn new(schema: &SchemaRef, keys: &[String], ranges: usize) -> Result<RunWriter> {
        let dir = tempfile::Builder::new()
            .prefix("cumulus-etl-cluster-")
            .tempdir()
            .context("creating a folder for the clustering sort")?;
        Ok(RunWriter {
            keys: Arc::new(Keys::new(schema, keys)?),
            schema: schema.clone(),
            dir: Arc::new(dir),
            batches_per_run: RUN_BATCHES * ranges.max(1),
            next_run: AtomicUsize::new(0),
        })
    }

    /// Writes `rows` as sorted runs of about `run_bytes` of Arrow memory each.
    pub fn write(
        &self,
        rows: impl Iterator<Item = Result<RecordBatch>>,
        run_bytes: usize,
    ) -> Result<Vec<RunFile>> {
        let mut runs = Vec::new();
        let mut held: Vec<RecordBatch> = Vec::new();
        let mut held_bytes = 0;
        for batch in rows {
            let batch = batch?;
            held_bytes += batch.get_array_memory_size();
            held.push(batch);
            if held_bytes >= run_bytes {
                runs.extend(self.write_run(std::mem::take(&mut held))?);
                held_bytes = 0;
            }
        }
        runs.extend(self.write_run(held)?);
        Ok(runs)
    }

    /// Merges `runs` a group of `fan_in` at a time into larger runs until at most `fan_in` are
    /// left, so that a merge, which holds a batch of every run, stays within memory however
    /// large the table (each pass reads and writes every row once more).
    pub fn reduce(&self, mut runs: Vec<RunFile>, fan_in: usize) -> Result<Vec<RunFile>> {
        let fan_in = fan_in.max(2);
        while runs.len() > fan_in {
            let mut merged = Vec::with_capacity(runs.len().div_ceil(fan_in));
            let mut left = runs.into_iter().peekable();
            while left.peek().is_some() {
                let group: Vec<RunFile> = left.by_ref().take(fan_in).collect();
                merged.push(match group.len() {
                    1 => group.into_iter().next().expect("one run"),
                    _ => self.merge_runs(group)?,
                });
            }
            runs = merged;
        }
        Ok(runs)
    }

    /// Merges `group` into one run of small batches and removes their files.
    fn merge_runs(&self, group: Vec<RunFile>) -> Result<RunFile> {
        let whole = KeyRange::default();
        let runs = group
            .iter()
            .map(|run| open_run(run, &whole, &self.keys))
            .collect::<Result<Vec<Run>>>()?;
        let mut sorted = SortedRows::new(runs, self.keys.clone(), None, None);
        let mut run = RunFileWriter::create(self)?;
        // Batches as small as runs have: the next merge holds one of this run's at a time.
        let batch_rows = *RUN_BATCH_ROWS.start();
        while let Some(merged) = sorted.next_batch()? {
            for start in (0..merged.num_rows()).step_by(batch_rows) {
                let batch = merged.slice(start, batch_rows.min(merged.num_rows() - start));
                // A slice counts its whole parent's memory: its share of it instead.
                let bytes = merged.get_array_memory_size() * batch.num_rows() / merged.num_rows();
                run.append(&batch, &self.keys.encode(&batch)?, bytes)?;
            }
        }
        let merged = run.finish()?;
        drop(sorted);
        for run in &group {
            let _ = std::fs::remove_file(&run.path);
        }
        Ok(merged)
    }

    /// The runs written (by every thread), to merge.
    pub fn finish(self, runs: Vec<RunFile>) -> Runs {
        Runs {
            runs,
            keys: self.keys,
            _dir: self.dir,
        }
    }

    /// Sorts `batches` on the keys and writes them as one run; None for no rows.
    fn write_run(&self, batches: Vec<RecordBatch>) -> Result<Option<RunFile>> {
        let encoded = batches
            .iter()
            .map(|batch| self.keys.encode(batch))
            .collect::<Result<Vec<Rows>>>()?;
        let mut order: Vec<(usize, usize)> = batches
            .iter()
            .enumerate()
            .flat_map(|(b, batch)| (0..batch.num_rows()).map(move |r| (b, r)))
            .collect();
        if order.is_empty() {
            return Ok(None);
        }
        order.sort_unstable_by(|x, y| encoded[x.0].row(x.1).cmp(&encoded[y.0].row(y.1)));
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        let batch_rows = (order.len() / self.batches_per_run)
            .clamp(*RUN_BATCH_ROWS.start(), *RUN_BATCH_ROWS.end());
        let bytes: usize = batches.iter().map(|b| b.get_array_memory_size()).sum();
        let batch_bytes = bytes / order.len().div_ceil(batch_rows);
        let mut run = RunFileWriter::create(self)?;
        for chunk in order.chunks(batch_rows) {
            let batch = interleave_record_batch(&refs, chunk)?;
            run.append(&batch, &self.keys.encode(&batch)?, batch_bytes)?;
        }
        Ok(Some(run.finish()?))
    }
}

/// A run being written: its Arrow IPC file, and the first key, sampled keys and memory of
/// each of its batches.
struct RunFileWriter {
    path: PathBuf,
    writer: FileWriter<BufWriter<File>>,
    firsts: Vec<OwnedRow>,
    samples: Vec<(OwnedRow, usize)>,
    bytes: usize,
    batches: usize,
}

impl RunFileWriter {
    /// A new run in the writer's folder.
    fn create(runs: &RunWriter) -> Result<RunFileWriter> {
        let n = runs.next_run.fetch_add(1, Ordering::Relaxed);
        let path = runs.dir.path().join(format!("run-{n}.arrow"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let writer = FileWriter::try_new(BufWriter::new(file), &runs.schema)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(RunFileWriter {
            path,
            writer,
            firsts: Vec::new(),
            samples: Vec::new(),
            bytes: 0,
            batches: 0,
        })
    }

    /// Appends the run's next batch (in key order, not empty): `keys` its rows' encoded keys,
    /// `bytes` the Arrow memory it stands for.
    fn append(&mut self, batch: &RecordBatch, keys: &Rows, bytes: usize) -> Result<()> {
        let rows = batch.num_rows();
        self.firsts.push(keys.row(0).owned());
        let step = rows.div_ceil(SAMPLES_PER_BATCH);
        for row in (0..rows).step_by(step) {
            self.samples
                .push((keys.row(row).owned(), step.min(rows - row)));
        }
        self.bytes += bytes;
        self.batches += 1;
        Ok(self.writer.write(batch)?)
    }

    fn finish(mut self) -> Result<RunFile> {
        self.writer
            .finish()
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(RunFile {
            batch_bytes: self.bytes / self.batches.max(1),
            path: self.path,
            firsts: self.firsts,
            samples: self.samples,
        })
    }
}

impl Runs {
    /// About the Arrow memory a merge of a key range holds: a batch of every run.
    pub fn merge_bytes(&self) -> usize {
        self.runs.iter().map(|run| run.batch_bytes).sum()
    }

    /// Cuts the keys into at most `parts` ranges of about as many rows each (as far as the
    /// runs' sampled keys tell), in key order.
    pub fn split(&self, parts: usize) -> Vec<KeyRange> {
        let mut samples: Vec<(Row<'_>, usize)> = self
            .runs
            .iter()
            .flat_map(|run| run.samples.iter().map(|(key, rows)| (key.row(), *rows)))
            .collect();
        samples.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let total: usize = samples.iter().map(|(_, rows)| rows).sum();
        let mut bounds: Vec<OwnedRow> = Vec::new();
        let mut seen = 0;
        for (key, rows) in samples {
            let wanted = total * (bounds.len() + 1) / parts.max(1);
            if bounds.len() + 1 < parts
                && seen >= wanted
                && seen > 0
                && bounds.last().is_none_or(|last| last.row() < key)
            {
                bounds.push(key.owned());
            }
            seen += rows;
        }
        let mut ranges = Vec::with_capacity(bounds.len() + 1);
        let mut lo = None;
        for bound in bounds {
            ranges.push(KeyRange {
                lo: lo.take(),
                hi: Some(bound.clone()),
            });
            lo = Some(bound);
        }
        ranges.push(KeyRange { lo, hi: None });
        ranges
    }

    /// The rows of `range`, in key order.
    pub fn merge(self: &Arc<Self>, range: &KeyRange) -> Result<SortedRows> {
        let runs = self
            .runs
            .iter()
            .map(|run| open_run(run, range, &self.keys))
            .collect::<Result<Vec<Run>>>()?;
        Ok(SortedRows::new(
            runs,
            self.keys.clone(),
            range.hi.clone(),
            Some(self.clone()),
        ))
    }
}

/// A run read from the batch where `range` starts, past its rows before the range.
fn open_run(run: &RunFile, range: &KeyRange, keys: &Keys) -> Result<Run> {
    // The batch the range starts in: the last that starts at or before its first key.
    let start = match &range.lo {
        Some(lo) => run
            .firsts
            .partition_point(|first| first.row() <= lo.row())
            .saturating_sub(1),
        None => 0,
    };
    let file = File::open(&run.path).with_context(|| format!("reading {}", run.path.display()))?;
    let mut reader = FileReader::try_new(BufReader::new(file), None)?;
    reader.set_index(start)?;
    let mut open = Run {
        reader,
        batch: None,
        keys: None,
        next: 0,
    };
    open.advance(keys)?;
    if let Some(lo) = &range.lo {
        while open.key().is_some_and(|key| key < lo.row()) {
            open.step(keys)?;
        }
    }
    Ok(open)
}

/// Rows of a key range, read back from the sorted runs in order.
pub struct SortedRows {
    runs: Vec<Run>,
    /// The runs with rows left in the range, as a binary heap on their next keys (smallest
    /// first): a linear scan cost a comparison per run for every row.
    heap: Vec<usize>,
    keys: Arc<Keys>,
    /// Where the range ends (left out).
    hi: Option<OwnedRow>,
    /// The runs' files stay while their rows are read (the writer keeps them during its own
    /// merges).
    _runs: Option<Arc<Runs>>,
}

impl SortedRows {
    fn new(
        runs: Vec<Run>,
        keys: Arc<Keys>,
        hi: Option<OwnedRow>,
        keep: Option<Arc<Runs>>,
    ) -> SortedRows {
        let mut sorted = SortedRows {
            runs,
            heap: Vec::new(),
            keys,
            hi,
            _runs: keep,
        };
        sorted.heap = (0..sorted.runs.len())
            .filter(|&r| sorted.in_range(r))
            .collect();
        for i in (0..sorted.heap.len() / 2).rev() {
            sorted.sift_down(i);
        }
        sorted
    }

    /// The next batch of up to [`SORTED_BATCH_ROWS`] rows in key order; None at the end.
    pub fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        // Batches the chosen rows come from, and (batch, row) of each chosen row.
        let mut batches: Vec<RecordBatch> = Vec::new();
        let mut slots: Vec<Option<usize>> = vec![None; self.runs.len()];
        let mut picks: Vec<(usize, usize)> = Vec::with_capacity(SORTED_BATCH_ROWS);
        while picks.len() < SORTED_BATCH_ROWS {
            let Some(&r) = self.heap.first() else { break };
            let run = &mut self.runs[r];
            let batch = run.batch.as_ref().expect("a run with a key has a batch");
            let slot = *slots[r].get_or_insert_with(|| {
                batches.push(batch.clone());
                batches.len() - 1
            });
            picks.push((slot, run.next));
            if run.next + 1 == batch.num_rows() {
                slots[r] = None;
            }
            run.step(&self.keys)?;
            if !self.in_range(r) {
                let last = self.heap.pop().expect("the run is in the heap");
                if self.heap.is_empty() {
                    continue;
                }
                self.heap[0] = last;
            }
            self.sift_down(0);
        }
        if picks.is_empty() {
            return Ok(None);
        }
        let refs: Vec<&RecordBatch> = batches.iter().collect();
        Ok(Some(interleave_record_batch(&refs, &picks)?))
    }

    /// Whether run `r` has a next row within the range.
    fn in_range(&self, r: usize) -> bool {
        self.runs[r]
            .key()
            .is_some_and(|key| self.hi.as_ref().is_none_or(|hi| key < hi.row()))
    }

    /// Whether the next key of the run at heap slot `a` is below that at slot `b`.
    fn below(&self, a: usize, b: usize) -> bool {
        self.runs[self.heap[a]].key() < self.runs[self.heap[b]].key()
    }

    /// Moves the run at heap slot `i` down to its place.
    fn sift_down(&mut self, mut i: usize) {
        loop {
            let (left, right) = (2 * i + 1, 2 * i + 2);
            let mut least = i;
            if left < self.heap.len() && self.below(left, least) {
                least = left;
            }
            if right < self.heap.len() && self.below(right, least) {
                least = right;
            }
            if least == i {
                return;
            }
            self.heap.swap(i, least);
            i = least;
        }
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

    /// Moves past the next row.
    fn step(&mut self, keys: &Keys) -> Result<()> {
        self.next += 1;
        match &self.batch {
            Some(batch) if self.next == batch.num_rows() => self.advance(keys),
            _ => Ok(()),
        }
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
pub struct Keys {
    columns: Vec<usize>,
    converter: RowConverter,
}

impl Keys {
    /// The `names` columns of `schema` (top-level ones).
    pub fn new(schema: &SchemaRef, names: &[String]) -> Result<Keys> {
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

    /// The keys of a batch of the schema's rows.
    pub fn encode(&self, batch: &RecordBatch) -> Result<Rows> {
        let columns: Vec<ArrayRef> = self
            .columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        self.encode_columns(&columns)
    }

    /// The keys of the key columns alone, in the order of the names (and of the schema's types).
    pub fn encode_columns(&self, columns: &[ArrayRef]) -> Result<Rows> {
        Ok(self.converter.convert_columns(columns)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    fn strings(batch: &RecordBatch, column: usize) -> Vec<String> {
        let values = batch
            .column(column)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        values.iter().map(|v| v.unwrap().to_string()).collect()
    }

    /// `rows` rows (`id`, and `n` naming its id) in batches of `per_batch`, ids in a scrambled
    /// order: the schema, the ids in input order, the batches.
    fn scrambled(rows: u64, per_batch: usize) -> (SchemaRef, Vec<String>, Vec<RecordBatch>) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Utf8, true),
        ]));
        let ids: Vec<String> = (0..rows)
            .map(|i| format!("{:08}", (i * 7919) % rows))
            .collect();
        let batches = ids
            .chunks(per_batch)
            .map(|chunk| {
                let id = StringArray::from_iter_values(chunk.iter());
                let n = StringArray::from_iter_values(chunk.iter().map(|i| format!("row {i}")));
                RecordBatch::try_new(schema.clone(), vec![Arc::new(id), Arc::new(n)]).unwrap()
            })
            .collect();
        (schema, ids, batches)
    }

    /// Asserts that `out` (id, n) holds every one of `ids` once, in key order, with its own row.
    fn assert_in_key_order(out: &[(String, String)], ids: &[String]) {
        let mut want = ids.to_vec();
        want.sort();
        assert_eq!(
            out.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            want
        );
        assert!(out.iter().all(|(id, n)| *n == format!("row {id}")));
    }

    #[test]
    fn key_ranges_of_runs_from_several_writers_merge_into_key_order() {
        // 5,000 rows in batches of 700, tiny runs.
        let (schema, ids, batches) = scrambled(5000, 700);
        let keys = ["id".to_string()];
        let writer = RunWriter::new(&schema, &keys, 3).unwrap();
        // Two writers, each with every other input batch.
        let mut runs = Vec::new();
        for part in 0..2 {
            let mine = batches.iter().skip(part).step_by(2).cloned().map(Ok);
            runs.extend(writer.write(mine, 20_000).unwrap());
        }
        let runs = Arc::new(writer.finish(runs));
        assert!(runs.runs.len() > 3, "{} runs", runs.runs.len());
        let ranges = runs.split(3);
        assert_eq!(ranges.len(), 3);
        let mut out: Vec<(String, String)> = Vec::new();
        let mut sizes = Vec::new();
        for range in &ranges {
            let mut sorted = runs.merge(range).unwrap();
            let before = out.len();
            while let Some(batch) = sorted.next_batch().unwrap() {
                assert!(batch.num_rows() <= SORTED_BATCH_ROWS);
                out.extend(strings(&batch, 0).into_iter().zip(strings(&batch, 1)));
            }
            sizes.push(out.len() - before);
        }
        assert_in_key_order(&out, &ids);
        // The ranges hold about a third of the rows each (as far as batch starts tell).
        assert!(
            sizes.iter().all(|&n| (1000..=2400).contains(&n)),
            "{sizes:?}"
        );
        // One range merges everything.
        let whole = runs.split(1);
        assert_eq!(whole.len(), 1);
        let mut sorted = runs.merge(&whole[0]).unwrap();
        let mut n = 0;
        while let Some(batch) = sorted.next_batch().unwrap() {
            n += batch.num_rows();
        }
        assert_eq!(n, 5000);
    }

    #[test]
    fn many_runs_are_merged_into_few_and_still_come_back_in_key_order() {
        let (schema, ids, batches) = scrambled(3000, 100);
        let keys = ["id".to_string()];
        let writer = RunWriter::new(&schema, &keys, 2).unwrap();
        // A run per input batch: 30 runs.
        let runs = writer.write(batches.into_iter().map(Ok), 1).unwrap();
        assert_eq!(runs.len(), 30);
        let runs = writer.reduce(runs, 4).unwrap();
        assert!(runs.len() <= 4, "{} runs", runs.len());
        let files = std::fs::read_dir(writer.dir.path()).unwrap().count();
        assert_eq!(files, runs.len(), "merged runs' files are removed");
        let runs = Arc::new(writer.finish(runs));
        let mut out: Vec<(String, String)> = Vec::new();
        for range in runs.split(2) {
            let mut sorted = runs.merge(&range).unwrap();
            while let Some(batch) = sorted.next_batch().unwrap() {
                out.extend(strings(&batch, 0).into_iter().zip(strings(&batch, 1)));
            }
        }
        assert_in_key_order(&out, &ids);
    }
}
