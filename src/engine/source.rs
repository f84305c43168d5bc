//! The source side of a worker: takes bundles from the shared work queue, reserves budget,
//! hands each bundle to a `RowProducer` (de-identified FHIR rows, or NLP results), and reports
//! skipped lines.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::dataflow::RunShared;
use super::rows::{SkipReason, Skipped, TableChunk, TaskContext, write_rejected};
use super::work::Taken;
use crate::deid::ExtensionReport;
use crate::input::InputFile;
use crate::input::bundles::{StreamReader, WorkItem};
use crate::input::line_numbers::FirstLine;
use crate::memory::{Reservation, human_bytes};
use crate::panic_guard::{self, Site};

/// What one activation of a source did.
pub enum Step {
    /// Produced chunks for the sinks.
    Emit(Vec<TableChunk>),
    /// Waiting for memory; try again shortly.
    Wait,
    /// No work left.
    Done,
}

/// One bundle of input lines for a task, with the budget bytes reserved for it.
pub struct Bundle<'a> {
    pub shared: &'a RunShared,
    pub ctx: &'a TaskContext,
    /// The input file, for messages.
    pub path: &'a str,
    pub bytes: &'a [u8],
    /// Where the bundle's lines are numbered from: worked out when asked for.
    pub first_line: FirstLine,
    pub reserved: u64,
    /// An empty buffer, at least as large as `bytes`, for the bundle's rows (from the run's
    /// pool, within the reservation).
    pub rows: Vec<u8>,
}

/// The buffer for the rows of a bundle of `bytes`. De-identified rows are about as long as the
/// input or shorter, but escapes and masked markers can make them a little longer, and a buffer
/// that has to grow doubles.
fn rows_capacity(bytes: usize) -> usize {
    bytes + bytes / 16
}

/// Turns bundles into table chunks, now or later. The chunks of a bundle carry its reserved
/// bytes, so the budget is released only once they are written.
pub trait RowProducer: Send {
    /// Processes a bundle; returns the chunks that are ready now.
    fn process(
        &mut self,
        bundle: Bundle<'_>,
        report: &mut ExtensionReport,
        on_skip: &mut dyn FnMut(Skipped<'_>),
    ) -> Vec<TableChunk>;

    /// Chunks finished since the last call (for producers that wait on servers).
    fn poll(&mut self) -> Vec<TableChunk> {
        Vec::new()
    }

    /// Whether some bundle is still being worked on elsewhere.
    fn in_flight(&self) -> bool {
        false
    }

    /// Whether the producer would make nothing of the bundle of `path` whose lines `lines`
    /// numbers (a re-run's unchanged lines), so it need not be read; it counts them as it
    /// would have. `lines` counts them if no one has: a producer with nothing to leave out
    /// does not call it.
    fn leaves_out_all(
        &mut self,
        _ctx: &TaskContext,
        _path: &str,
        _lines: &dyn Fn() -> Range<u64>,
    ) -> bool {
        false
    }
}

/// Per-worker reading state.
pub struct SourceState {
    shared: Arc<RunShared>,
    producer: Box<dyn RowProducer>,
    pub extensions: ExtensionReport,
    /// The file and first line of the bundle being processed, for messages.
    in_hand: Option<(String, FirstLine)>,
}

impl SourceState {
    /// A source over the run's shared work queue.
    pub fn new(shared: Arc<RunShared>, producer: Box<dyn RowProducer>) -> SourceState {
        SourceState {
            shared,
            producer,
            extensions: ExtensionReport::default(),
            in_hand: None,
        }
    }

    /// Where this source is in its input, for a message about a failure there.
    pub fn in_hand(&self) -> String {
        match &self.in_hand {
            Some((path, line)) => format!("reading {path} (the bundle from line {}):", line.get()),
            None => "reading the input:".into(),
        }
    }

    /// The run this source belongs to.
    pub fn shared_ref(&self) -> &RunShared {
        &self.shared
    }

    /// Reads and processes one bundle, if memory allows.
    pub fn step(&mut self) -> Step {
        if self.shared.stop.is_stopped() {
            return Step::Done;
        }
        let ready = self.producer.poll();
        if !ready.is_empty() {
            return Step::Emit(ready);
        }
        // Batches waiting to be written come first: they free memory, and a table's sink cuts
        // them faster than one core writes them.
        if super::sink::write_one(&self.shared) {
            return Step::Emit(Vec::new());
        }
        let budget = &self.shared.budget;
        let item = match self.shared.work.take() {
            Taken::Item(item) => item,
            Taken::Later => return Step::Wait,
            Taken::Empty if self.producer.in_flight() => return Step::Wait,
            Taken::Empty => {
                budget.close_pool();
                return Step::Done;
            }
        };
        match item {
            WorkItem::Stream { file } => match StreamReader::open(&file) {
                Ok(reader) => self.read_stream(file, Box::new(reader)),
                Err(e) => {
                    self.shared.work.stream_finished();
                    self.shared
                        .report
                        .note_unreadable(&file, 0, &format!("{e:#}"));
                    Step::Emit(Vec::new())
                }
            },
            WorkItem::Open { file, reader } => self.read_stream(file, reader),
            WorkItem::Slice {
                file,
                mapped,
                slice,
            } => {
                let size = mapped.bytes(slice).len();
                // A bundle whose lines are all left out is not read at all.
                let numbers = || {
                    let first = mapped.first_line(slice);
                    first..first + mapped.lines(slice)
                };
                if let Some(ctx) = self.shared.work.task_for(&file.resource_type)
                    && self.producer.leaves_out_all(ctx, file.name(), &numbers)
                {
                    let progress = &self.shared.report.progress;
                    progress.add_read(ctx.task, mapped.lines(slice));
                    progress
                        .bytes_read
                        .fetch_add(size as u64, Ordering::Relaxed);
                    return Step::Emit(Vec::new());
                }
                let reserved = self.shared.outputs.format.reservation(size as u64);
                match budget.try_reserve_with_buffer(reserved, rows_capacity(size)) {
                    (Reservation::Refused, _) => {
                        let item = WorkItem::Slice {
                            file,
                            mapped,
                            slice,
                        };
                        self.shared.work.give_back(item);
                        Step::Wait
                    }
                    (granted, rows) => {
                        if granted == Reservation::GrantedAlone {
                            crate::say!(
                                "note: a bundle of {} in {} is larger than the memory budget; processing it alone",
                                human_bytes(size as u64),
                                file.name()
                            );
                        }
                        let rows = rows.unwrap_or_default();
                        // The next slice is read from disk while this one is processed.
                        mapped.prefetch(slice + 1);
                        let first_line = FirstLine::Slice(mapped.clone(), slice);
                        let bytes = mapped.bytes(slice);
                        let chunks = self.process(&file, bytes, first_line, (reserved, rows));
                        mapped.release(slice);
                        self.shared
                            .report
                            .progress
                            .bytes_read
                            .fetch_add(size as u64, Ordering::Relaxed);
                        Step::Emit(chunks)
                    }
                }
            }
        }
    }

    /// Reads the next bundle of a stream, hands the stream back for another worker to read
    /// on, then processes the bundle.
    fn read_stream(&mut self, file: Arc<InputFile>, mut reader: Box<StreamReader>) -> Step {
        let bundle_bytes = self.shared.bundle_bytes;
        let reserved = self.shared.outputs.format.reservation(bundle_bytes as u64);
        let budget = &self.shared.budget;
        let capacity = bundle_bytes + 4096;
        let (Reservation::Granted | Reservation::GrantedAlone, Some(rows)) =
            budget.try_reserve_with_buffer(reserved, rows_capacity(capacity))
        else {
            self.shared.work.give_back(WorkItem::Open { file, reader });
            return Step::Wait;
        };
        let recycler = budget.recycler();
        let mut buf = budget.take_buffer(capacity);
        let (first_line, error) = reader.next_bundle(&mut buf, bundle_bytes);
        let bad_rows = std::mem::take(&mut reader.bad_rows);
        if reader.finished {
            self.shared.work.stream_finished();
        } else {
            let file = file.clone();
            self.shared.work.give_back(WorkItem::Open { file, reader });
        }
        self.note_bad_rows(&file, bad_rows);
        let first_line = FirstLine::Known(first_line);
        let chunks = self.process(&file, &buf, first_line, (reserved, rows));
        if let Some((line, message)) = error {
            self.shared.report.note_unreadable(&file, line, &message);
        }
        self.shared
            .report
            .progress
            .bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        recycler.recycle(buf);
        Step::Emit(chunks)
    }

    /// Counts and reports i2b2 rows that could not be converted (line and reason only).
    fn note_bad_rows(&self, file: &InputFile, rows: Vec<crate::input::i2b2::BadRow>) {
        if rows.is_empty() {
            return;
        }
        let path = file.name().to_string();
        let mut counts: BTreeMap<SkipReason, u64> = BTreeMap::new();
        for row in rows {
            let reason = if row.duplicate {
                SkipReason::DuplicateId
            } else {
                SkipReason::BadCsvRow
            };
            *counts.entry(reason).or_default() += 1;
            self.shared.report.warn_skip(
                &path,
                &Skipped {
                    line_no: row.line,
                    reason,
                    detail: row.reason,
                    raw: &[],
                },
            );
        }
        let mut stats = self.shared.report.stats.lock().unwrap();
        for (reason, n) in counts {
            *stats.skipped.entry(reason).or_default() += n;
        }
    }

    fn process(
        &mut self,
        file: &InputFile,
        bytes: &[u8],
        first_line: FirstLine,
        (reserved, rows): (u64, Vec<u8>),
    ) -> Vec<TableChunk> {
        let shared = &self.shared;
        let Some(ctx) = shared.work.task_for(&file.resource_type) else {
            shared.budget.release(reserved);
            return Vec::new();
        };
        let mut skipped: BTreeMap<SkipReason, u64> = BTreeMap::new();
        let path = file.name().to_string();
        self.in_hand = Some((path.clone(), first_line.clone()));
        panic_guard::inject(Site::Source, &path, || first_line.get());
        let mut on_skip = |s: Skipped<'_>| {
            *skipped.entry(s.reason).or_default() += 1;
            shared.report.warn_skip(&path, &s);
            if let Some(out) = &shared.report.rejected {
                let mut out = out.lock().unwrap();
                let _ = write_rejected(&mut *out, &path, &s).and_then(|_| out.flush());
            }
        };
        let bundle = Bundle {
            shared,
            ctx,
            path: &path,
            bytes,
            first_line,
            reserved,
            rows,
        };
        let chunks = self
            .producer
            .process(bundle, &mut self.extensions, &mut on_skip);
        if !skipped.is_empty() {
            let mut stats = shared.report.stats.lock().unwrap();
            for (reason, n) in skipped {
                *stats.skipped.entry(reason).or_default() += n;
            }
        }
        chunks
    }
}
