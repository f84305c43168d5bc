//! The sink side of a worker: gathers each task's rows into batches of `--batch-size`, drops
//! duplicate ids (last wins), saves the codebook, writes the batch, and releases its budget.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::dataflow::RunShared;
use super::stop::StopCause;
use super::work::WriteJob;
use crate::engine::rows::TableChunk;
use crate::exit::one_line;
use crate::fast_hash::FastSet;
use crate::fhir::Shape;
use crate::output::{BatchWriter, OnWritten, RowBatch, TableWriter};
use crate::panic_guard::{self, InternalError, Site};

/// Pending rows and open writers of the tasks routed to one worker.
pub struct SinkState {
    shared: Arc<RunShared>,
    tasks: HashMap<u32, TaskSink>,
    seen_pressure: u64,
    /// The table being written, for the message if writing it panics.
    writing: Option<String>,
}

#[derive(Default)]
struct TaskSink {
    pending: HashMap<String, Vec<TableChunk>>,
    pending_rows: usize,
    writers: HashMap<String, Box<dyn TableWriter>>,
    batches: usize,
}

impl TaskSink {
    /// Budget bytes held by the rows waiting to be written.
    fn pending_reserved(&self) -> u64 {
        self.pending.values().flatten().map(|c| c.reserved).sum()
    }
}

impl SinkState {
    /// A sink writing with the run's settings.
    pub fn new(shared: Arc<RunShared>) -> SinkState {
        SinkState {
            shared,
            tasks: HashMap::new(),
            seen_pressure: 0,
            writing: None,
        }
    }

    /// Whether the run was stopped (the sink then takes nothing more).
    pub fn stopped(&self) -> bool {
        self.shared.stop.is_stopped()
    }

    /// Stops the run after a panic in this sink, naming the table it was writing.
    pub fn stop_after(&mut self, panic: InternalError) {
        let message = match self.writing.take() {
            Some(table) => format!("writing table {table}: {panic}"),
            None => format!("batching rows for the table writers: {panic}"),
        };
        self.shared.stop.stop(StopCause::Writing, message);
    }

    /// Takes one chunk; writes a batch each time the task has `--batch-size` rows pending.
    /// A task's completion rows arrive just before the main rows they track (same ids, same
    /// order), so both are cut at the same row.
    pub fn accept(&mut self, mut chunk: TableChunk) {
        if chunk.crossing {
            self.shared.budget.count_arrived(chunk.reserved);
            chunk.crossing = false;
        }
        let task_id = chunk.task;
        let batch_size = self.shared.batch_size;
        if self.shared.work.tasks[task_id as usize].whole_chunks {
            let task = self.tasks.entry(task_id).or_default();
            task.pending_rows += chunk.len();
            task.pending
                .entry(chunk.table.clone())
                .or_default()
                .push(chunk);
            if task.pending_rows >= batch_size {
                self.flush(task_id);
            }
            return;
        }
        if chunk.table != self.shared.work.tasks[task_id as usize].table {
            let task = self.tasks.entry(task_id).or_default();
            task.pending
                .entry(chunk.table.clone())
                .or_default()
                .push(chunk);
            return;
        }
        loop {
            let task = self.tasks.entry(task_id).or_default();
            let room = batch_size - task.pending_rows.min(batch_size);
            if chunk.len() < room || (chunk.len() == room && room == 0) {
                task.pending_rows += chunk.len();
                task.pending
                    .entry(chunk.table.clone())
                    .or_default()
                    .push(chunk);
                return;
            }
            let tail = chunk.split_off(room);
            let tracked_tail = task
                .pending
                .iter_mut()
                .filter(|(table, _)| **table != chunk.table)
                .filter_map(|(_, chunks)| chunks.last_mut())
                .map(|c| c.split_off(room))
                .collect::<Vec<_>>();
            task.pending_rows += chunk.len();
            task.pending
                .entry(chunk.table.clone())
                .or_default()
                .push(chunk);
            self.flush(task_id);
            let task = self.tasks.entry(task_id).or_default();
            for t in tracked_tail {
                task.pending.entry(t.table.clone()).or_default().push(t);
            }
            chunk = tail;
            if chunk.is_empty() && chunk.reserved == 0 {
                return;
            }
        }
    }

    /// Writes early, so the budget can drain: the task holding the most budget, once a source
    /// is waiting for memory. Writing every task at once would cut all tables into small
    /// batches (small files, many Delta commits) where one large batch frees as much.
    ///
    /// Writing a task once it held a quarter of the budget, without waiting for pressure, was
    /// tried and removed: with sinks balanced by resources it no longer saved idle time
    /// (Parquet, four alternating pairs: 4.13 to 4.94 s either way), and its smaller Delta
    /// batches gave medication requests nine files, so the end of the run compacted them
    /// (1.2 s on one core; Delta, four pairs: 5.71 to 7.04 s and 8.2 to 10.1 s of user CPU
    /// without, 6.14 to 6.70 s and 9.3 to 10.6 s with).
    pub fn relieve_pressure(&mut self) {
        let pressure = self.shared.budget.pressure();
        if pressure == self.seen_pressure || self.shared.budget.mostly_writing() {
            return;
        }
        let largest = self
            .tasks
            .iter()
            .map(|(id, task)| (task.pending_reserved(), *id))
            .filter(|(reserved, _)| *reserved > 0)
            .max();
        if let Some((_, task_id)) = largest {
            self.seen_pressure = pressure;
            self.flush(task_id);
        }
    }

    /// Cuts everything pending into batches (end of input, or memory pressure).
    pub fn flush_all(&mut self) {
        let ids: Vec<u32> = self.tasks.keys().copied().collect();
        for id in ids {
            self.flush(id);
        }
    }

    /// Writes every batch still waiting for a worker (at the end of the input, when the
    /// sources that help write them have finished).
    pub fn write_remaining(&self) {
        while write_one(&self.shared) {}
    }

    fn flush(&mut self, task_id: u32) {
        let shared = self.shared.clone();
        let Some(task) = self.tasks.get_mut(&task_id) else {
            return;
        };
        if task.pending.is_empty() {
            return;
        }
        let codebook = shared.scrubber.codebook();
        if let Err(e) = codebook.save() {
            crate::say!("error: could not save the codebook: {}", one_line(&e));
        }
        shared.budget.hold_codebook(codebook.held_bytes());
        let ctx = &shared.work.tasks[task_id as usize];
        let mut tables = vec![ctx.table.clone()];
        if ctx.completion.is_some() {
            tables.insert(0, crate::tasks::COMPLETION_ENCOUNTERS_TABLE.to_string());
        }
        let batch_index = task.batches;
        task.batches += 1;
        // Cut here, in order (which fixes file numbers); written by whichever worker is free.
        let mut writes = Vec::new();
        for table in tables {
            let Some(chunks) = task.pending.remove(&table) else {
                continue;
            };
            let reserved: u64 = chunks.iter().map(|c| c.reserved).sum();
            if chunks.iter().all(|c| c.is_empty()) {
                shared.budget.release(reserved);
                continue;
            }
            shared.budget.start_writing(reserved);
            let writer = match task.writers.get_mut(&table) {
                Some(w) => Ok(w),
                None => shared
                    .open_writer(&table, ctx)
                    .map(|w| task.writers.entry(table.clone()).or_insert(w)),
            };
            self.writing = Some(table.clone());
            let writer = writer.map(|w| w.next_batch());
            self.writing = None;
            writes.push(BatchWrite {
                table,
                writer,
                chunks,
                reserved,
            });
        }
        if !writes.is_empty() {
            let job_shared = shared.clone();
            shared.writes.push(WriteJob {
                table: writes
                    .iter()
                    .map(|w| w.table.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                run: Box::new(move || {
                    for write in writes {
                        write.run(&job_shared, batch_index);
                    }
                }),
            });
        }
        task.pending.clear();
        task.pending_rows = 0;
        shared
            .report
            .progress
            .batches
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// One table's part of a batch, cut by the sink and written by a worker.
struct BatchWrite {
    table: String,
    writer: anyhow::Result<Box<dyn BatchWriter>>,
    chunks: Vec<TableChunk>,
    reserved: u64,
}

impl BatchWrite {
    /// Drops duplicate ids (last wins) and writes the rows.
    fn run(self, shared: &Arc<RunShared>, batch_index: usize) {
        let chunks = Arc::new(self.chunks);
        let (rows, tags, lines) = unique_tagged_rows(&chunks);
        let mut shape = Shape::default();
        chunks.iter().for_each(|c| shape.merge(&c.shape));
        let on_written = written_callback(
            shared.clone(),
            self.table.clone(),
            batch_index,
            chunks.clone(),
            rows.len() as u64,
            self.reserved,
        );
        match self.writer {
            Ok(writer) => {
                panic_guard::inject(Site::Writer, &self.table, || 0);
                let batch = RowBatch {
                    rows,
                    shape: &shape,
                    tags,
                    keys_new: !chunks.is_empty() && chunks.iter().all(|c| c.keys_new),
                    lines,
                };
                writer.write(&batch, on_written)
            }
            Err(e) => on_written.done(Err(e)),
        }
    }
}

/// Writes one batch cut by a sink, if one is waiting; false if none was. A panic while writing
/// stops the run, naming the table.
pub fn write_one(shared: &RunShared) -> bool {
    let Some(job) = shared.writes.take() else {
        return false;
    };
    let table = job.table;
    if let Err(panic) = panic_guard::catch(job.run) {
        let message = format!("writing table {table}: {panic}");
        shared.stop.stop(StopCause::Writing, message);
    }
    true
}

/// What happens once a batch is durable or failed: counts, the errors folder, and the release
/// of its memory: only then, so a slow commit holds back the readers, unless the writer stages
/// the rows (Delta MERGE batches on local disk), which frees them at once.
fn written_callback(
    shared: Arc<RunShared>,
    table: String,
    batch_index: usize,
    chunks: Arc<Vec<TableChunk>>,
    n: u64,
    reserved: u64,
) -> OnWritten {
    let held = Arc::new(Mutex::new(Some(chunks)));
    let (staged_held, staged_shared) = (held.clone(), shared.clone());
    let unfit = Arc::new(AtomicU64::new(0));
    let (unfit_count, unfit_shared, unfit_table) = (unfit.clone(), shared.clone(), table.clone());
    OnWritten::new(move |result| {
        let chunks = held.lock().unwrap().take();
        let mut stats = shared.report.stats.lock().unwrap();
        let summary = stats.summary(&table);
        // Rows left out for not fitting the schema are counted as skipped input instead.
        let n = n - unfit.load(Ordering::Acquire);
        summary.attempt += n;
        match result {
            Ok(()) => {
                summary.success += n;
                drop(stats);
                shared.report.progress.add_written(&table, n);
            }
            Err(failure) => {
                summary.had_errors = true;
                drop(stats);
                let e = failure.error;
                if let Some(panic) = e.downcast_ref::<InternalError>() {
                    // A writer or committer that panicked: its table's state is unknown, so the
                    // run stops.
                    let message = format!("writing table {table}: {panic}");
                    shared.stop.stop(StopCause::Writing, message);
                }
                shared.report.tell(format!(
                    "error: could not write batch {batch_index} of {table}: {}",
                    one_line(&e)
                ));
                match (&chunks, &failure.rows) {
                    (Some(chunks), _) => {
                        shared
                            .report
                            .save_failed_batch(&table, batch_index, &unique_rows(chunks))
                    }
                    (None, Some(rows)) => {
                        let rows: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
                        shared.report.save_failed_batch(&table, batch_index, &rows)
                    }
                    (None, None) => {}
                }
            }
        }
        if chunks.is_some() {
            shared.budget.release_written(reserved);
        }
    })
    .on_staged(move || {
        if staged_held.lock().unwrap().take().is_some() {
            staged_shared.budget.release_written(reserved);
        }
    })
    .on_unfit(move |rows| {
        unfit_count.store(rows.len() as u64, Ordering::Release);
        unfit_shared.report.note_unfit_rows(&unfit_table, &rows);
    })
}

/// The rows of a batch with duplicate ids removed: the last occurrence wins, order is kept.
fn unique_rows(chunks: &[TableChunk]) -> Vec<&[u8]> {
    unique_tagged_rows(chunks).0
}

/// [`unique_rows`], with the tags of the rows kept when every chunk has them (none otherwise),
/// and the kept rows as runs of lines (see [`RowBatch::lines`]).
fn unique_tagged_rows(
    chunks: &[TableChunk],
) -> (Vec<&[u8]>, Vec<crate::output::RowTag>, Vec<&[u8]>) {
    let tagged = chunks.iter().all(|c| c.tags.len() == c.len());
    let tags: Vec<&crate::output::RowTag> = match tagged {
        true => chunks.iter().flat_map(|c| &c.tags).collect(),
        false => Vec::new(),
    };
    let all: Vec<(&str, &[u8])> = chunks.iter().flat_map(|c| c.ids().zip(c.rows())).collect();
    let mut seen = FastSet::with_capacity_and_hasher(all.len(), Default::default());
    let mut kept: Vec<usize> = (0..all.len())
        .rev()
        .filter(|&i| seen.insert(all[i].0))
        .collect();
    kept.reverse();
    let rows = kept.iter().map(|&i| all[i].1).collect();
    let tags = match tags.is_empty() {
        true => Vec::new(),
        false => kept.iter().map(|&i| *tags[i]).collect(),
    };
    (rows, tags, runs_of_lines(chunks, &kept))
}

/// The lines of the rows `kept` (indexes into all the chunks' rows, in order), as few runs of
/// a chunk's text as they make.
fn runs_of_lines<'a>(chunks: &'a [TableChunk], kept: &[usize]) -> Vec<&'a [u8]> {
    let mut runs: Vec<&[u8]> = Vec::new();
    let mut kept = kept.iter().peekable();
    let mut first_row = 0;
    for chunk in chunks {
        let rows = first_row..first_row + chunk.len();
        let mut run: Option<Range<usize>> = None;
        while let Some(&i) = kept.next_if(|&&i| rows.contains(&i)) {
            let line = chunk.line_range(i - first_row);
            run = match run {
                Some(r) if r.end == line.start => Some(r.start..line.end),
                Some(r) => {
                    runs.push(&chunk.data[r]);
                    Some(line)
                }
                None => Some(line),
            };
        }
        runs.extend(run.map(|r| &chunk.data[r]));
        first_row = rows.end;
    }
    runs
}

/// Appends rows left out of a batch to `<errors>/<table>/unfit-rows.ndjson`, each with why.
pub fn write_unfit_rows(
    dir: &std::path::Path,
    table: &str,
    rows: &[crate::output::UnfitRow],
) -> std::io::Result<()> {
    let dir = dir.join(table);
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("unfit-rows.ndjson"))?;
    let mut out = Vec::new();
    for unfit in rows {
        out.extend_from_slice(b"{\"reason\":");
        crate::json::write_str(&mut out, &unfit.reason);
        out.extend_from_slice(b",\"row\":");
        out.extend_from_slice(&unfit.row);
        out.extend_from_slice(b"}\n");
    }
    f.write_all(&out)
}

/// Appends a failed batch's rows to `<errors>/<table>/write-error.NNN.ndjson`.
pub fn write_failed_batch(
    dir: &std::path::Path,
    table: &str,
    index: usize,
    rows: &[&[u8]],
) -> std::io::Result<()> {
    let dir = dir.join(table);
    std::fs::create_dir_all(&dir)?;
    let mut f = std::fs::File::create(dir.join(format!("write-error.{index:03}.ndjson")))?;
    for r in rows {
        f.write_all(r)?;
        f.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn duplicates_keep_the_last_occurrence_in_order() {
        let mut a = TableChunk::new(0, "t");
        a.push("1", &json!({"id": "1", "v": 1}));
        a.push("2", &json!({"id": "2", "v": 1}));
        let mut b = TableChunk::new(0, "t");
        b.push("1", &json!({"id": "1", "v": 2}));
        b.push("3", &json!({"id": "3", "v": 1}));
        let rows: Vec<String> = unique_rows(&[a, b])
            .iter()
            .map(|r| String::from_utf8(r.to_vec()).unwrap())
            .collect();
        assert_eq!(
            rows,
            [
                r#"{"id":"2","v":1}"#,
                r#"{"id":"1","v":2}"#,
                r#"{"id":"3","v":1}"#
            ]
        );
    }

    #[test]
    fn kept_rows_come_as_few_runs_of_lines_as_they_make() {
        let chunk = |ids: &[&str]| {
            let mut c = TableChunk::new(0, "t");
            ids.iter()
                .for_each(|&id| c.push(id, &json!({"id": id, "t": "a\nb"})));
            c
        };
        // 2 and 4 come again later: their first rows break the runs they were in.
        let chunks = [
            chunk(&["1", "2", "3"]),
            chunk(&["4", "5"]),
            chunk(&["2", "4", "6"]),
        ];
        let (rows, _, lines) = unique_tagged_rows(&chunks);
        let joined: Vec<u8> = rows
            .iter()
            .flat_map(|r| [*r, b"\n"])
            .flatten()
            .copied()
            .collect();
        assert_eq!(lines.concat(), joined);
        let ids = |run: &[u8]| -> Vec<String> {
            run.split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap()["id"].to_string())
                .collect()
        };
        let runs: Vec<Vec<String>> = lines.iter().map(|run| ids(run)).collect();
        assert_eq!(
            runs,
            [
                vec!["\"1\""],
                vec!["\"3\""],
                vec!["\"5\""],
                vec!["\"2\"", "\"4\"", "\"6\""]
            ]
        );
        // No duplicates: one run per chunk, its whole text.
        let whole = [chunk(&["1", "2"]), chunk(&["3"])];
        let (_, _, lines) = unique_tagged_rows(&whole);
        assert_eq!(lines, [whole[0].data.as_slice(), whole[1].data.as_slice()]);
    }
}
