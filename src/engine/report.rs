//! What a run reports: counters for its progress lines and summary, warnings about skipped
//! lines and rows (a few per reason, the rest counted), and the errors folder's files.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use super::rows::{SkipReason, Skipped};
use super::sink::{write_failed_batch, write_unfit_rows};
use crate::deid::ExtensionReport;
use crate::input::InputFile;
use crate::output::job::TableSummary;

/// Warnings printed per skip reason before the rest are only counted.
const WARNINGS_PER_REASON: u64 = 10;

/// Counters the run accumulates for its summary.
#[derive(Debug, Default)]
pub struct RunStats {
    pub skipped: BTreeMap<SkipReason, u64>,
    pub tables: BTreeMap<String, TableSummary>,
    pub extensions: ExtensionReport,
}

impl RunStats {
    /// The summary of a table, created on first use.
    pub fn summary(&mut self, table: &str) -> &mut TableSummary {
        self.tables
            .entry(table.to_string())
            .or_insert_with(|| TableSummary {
                label: table.to_string(),
                ..Default::default()
            })
    }
}

/// Live counters for the progress display.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_read: AtomicU64,
    pub batches: AtomicU64,
    pub read: Mutex<BTreeMap<u32, u64>>,
    pub written: Mutex<BTreeMap<String, u64>>,
}

impl Progress {
    /// Counts rows read for a task.
    pub fn add_read(&self, task: u32, n: u64) {
        *self.read.lock().unwrap().entry(task).or_default() += n;
    }

    /// Counts rows written to a table.
    pub fn add_written(&self, table: &str, n: u64) {
        *self
            .written
            .lock()
            .unwrap()
            .entry(table.to_string())
            .or_default() += n;
    }
}

/// The run's report: its counters, its warnings, and its errors folder.
pub struct RunReport {
    pub stats: Mutex<RunStats>,
    pub progress: Progress,
    /// `--errors-to`: where failed batches and unfit rows are saved.
    pub errors_dir: Option<PathBuf>,
    /// Skipped input lines (PHI), when there is an errors folder.
    pub rejected: Option<Mutex<BufWriter<std::fs::File>>>,
    warnings: Mutex<BTreeMap<SkipReason, u64>>,
    /// The warnings and errors printed, in order.
    told: Mutex<Vec<String>>,
}

impl RunReport {
    /// A report saving into `errors_dir`, skipped input lines into `rejected`.
    pub fn new(errors_dir: Option<PathBuf>, rejected: Option<std::fs::File>) -> RunReport {
        RunReport {
            stats: Mutex::new(RunStats::default()),
            progress: Progress::default(),
            errors_dir,
            rejected: rejected.map(|f| Mutex::new(BufWriter::new(f))),
            warnings: Mutex::new(BTreeMap::new()),
            told: Mutex::new(Vec::new()),
        }
    }

    /// Prints a skipped line (file, line, reason; never its content), up to a limit per reason.
    pub fn warn_skip(&self, path: &str, s: &Skipped<'_>) {
        self.warn(&format!("{path}:{}", s.line_no), s.reason, &s.detail);
    }

    /// Prints what was skipped where (`place`: a file and line, or a table and row id), up to a
    /// limit per reason.
    pub fn warn(&self, place: &str, reason: SkipReason, detail: &str) {
        let mut warned = self.warnings.lock().unwrap();
        let n = warned.entry(reason).or_default();
        *n += 1;
        if *n <= WARNINGS_PER_REASON {
            let detail = if detail.is_empty() {
                String::new()
            } else {
                format!(" ({detail})")
            };
            self.tell(format!(
                "warning: {place}: skipped: {}{detail}",
                reason.label()
            ));
        } else if *n == WARNINGS_PER_REASON + 1 {
            self.tell(format!(
                "warning: more skipped for '{}'; they are counted in the summary",
                reason.label()
            ));
        }
    }

    /// Prints a warning or error about the run's input or output, and keeps it (a cluster
    /// run's process 0 prints every process's).
    pub fn tell(&self, line: String) {
        crate::say!("{line}");
        self.told.lock().unwrap().push(line);
    }

    /// The warnings and errors told so far.
    pub fn told(&self) -> Vec<String> {
        self.told.lock().unwrap().clone()
    }

    /// Records a file that could not be read to its end (a truncated or corrupt archive).
    pub fn note_unreadable(&self, file: &InputFile, line: u64, message: &str) {
        self.tell(format!(
            "warning: {}:{line}: stopped reading: {message}; the rest of this file was skipped",
            file.name()
        ));
        *self
            .stats
            .lock()
            .unwrap()
            .skipped
            .entry(SkipReason::UnreadableFile)
            .or_default() += 1;
    }

    /// Counts, reports and saves (in `<errors>/<table>/unfit-rows.ndjson`) the rows a writer
    /// left out of a batch of `table` because they do not fit its schema.
    pub fn note_unfit_rows(&self, table: &str, rows: &[crate::output::UnfitRow]) {
        *self
            .stats
            .lock()
            .unwrap()
            .skipped
            .entry(SkipReason::UnfitForSchema)
            .or_default() += rows.len() as u64;
        let mut tape = crate::json::Tape::default();
        for unfit in rows {
            // The row is de-identified: its id is an anonymous one.
            let id = tape
                .parse(&unfit.row)
                .ok()
                .and_then(|doc| doc.get_str(0, "id").map(|id| id.into_owned()))
                .unwrap_or_default();
            let place = format!("table {table}, row {id}");
            self.warn(&place, SkipReason::UnfitForSchema, &unfit.reason);
        }
        if let Some(dir) = &self.errors_dir
            && let Err(e) = write_unfit_rows(dir, table, rows)
        {
            crate::say!(
                "error: could not save rows of {table} to {}: {e}",
                dir.display()
            );
        }
    }

    /// Saves a batch that failed to write into the errors folder (de-identified rows).
    pub fn save_failed_batch(&self, table: &str, index: usize, rows: &[&[u8]]) {
        if let Some(dir) = &self.errors_dir
            && let Err(e) = write_failed_batch(dir, table, index, rows)
        {
            crate::say!(
                "error: could not save the failed batch to {}: {e}",
                dir.display()
            );
        }
    }
}
