//! Table outputs: a writer per table that turns batches of rows into files (NDJSON, Parquet), the
//! completion tables, and the run metadata (job config, summaries, context).

pub mod arrow_rows;
pub mod columns;
pub mod delta;
pub mod job;
pub mod ndjson;
pub mod nlp_files;
pub mod parquet;
pub mod report;

use std::sync::Arc;

use anyhow::Result;

use crate::fhir::Shape;
use crate::store::{ObjectLocation, ObjectWriter, Syncer};

/// The output table formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Deltalake,
    Parquet,
    Ndjson,
}

impl OutputFormat {
    /// The name used on the command line and in job configs.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Deltalake => "deltalake",
            OutputFormat::Parquet => "parquet",
            OutputFormat::Ndjson => "ndjson",
        }
    }

    /// Budget bytes reserved for `bytes` of input or rows in flight. Rows written as text
    /// cost their size plus what comes with them (ids, batch shapes, allocator slack: at 1x,
    /// NDJSON's peak RSS ran 60 to 75 MiB over a 352 MiB budget on 1 GB, 416 to 427 MiB, and
    /// at 5/4 it stays near the budget, as fast). Arrow conversion, Parquet encoding and Delta
    /// commits hold several copies of a batch, which the budget must count for peak RSS to
    /// follow `--memory`. (Delta at 3x peaked at 430 to 445 MiB with a 384 MiB budget on 1 GB,
    /// at 4x at 343 to 366 MiB, as fast.)
    pub fn reservation(self, bytes: u64) -> u64 {
        let quarters = match self {
            OutputFormat::Ndjson => 5,
            OutputFormat::Parquet => 8,
            OutputFormat::Deltalake => 16,
        };
        bytes * quarters / 4
    }
}

/// What kind of rows a table holds, which decides its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableKind {
    /// FHIR resources of one type.
    Fhir(String),
    /// `etl__completion_encounters`.
    CompletionEncounters,
    /// `etl__completion`.
    Completion,
    /// The results of an NLP study's task (`<study>__<table>`), as the study declares them.
    NlpResults(Arc<NlpTable>),
}

/// An NLP results table: its schema, key and grouping come from the study.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlpTable {
    pub task_version: i32,
    pub schema: Arc<arrow::datatypes::Schema>,
    /// The column that identifies a row.
    pub key: String,
    /// The column whose touched values replace all their stored rows (a note's results).
    pub group_field: String,
}

impl TableKind {
    /// The column whose touched values replace all their stored rows (Delta MERGE).
    pub fn group_field(&self) -> Option<&str> {
        match self {
            TableKind::NlpResults(table) => Some(&table.group_field),
            _ => None,
        }
    }
}

/// One batch of rows to write: compact JSON lines and their combined shape.
pub struct RowBatch<'a> {
    pub rows: Vec<&'a [u8]>,
    pub shape: &'a Shape,
    /// A tag per row, or none: what the run's re-run index records of each row (its key's and
    /// its input line's fingerprints). Delta tables journal the tags of the rows each commit
    /// writes ([`RowTag`]); the other formats ignore them.
    pub tags: Vec<RowTag>,
    /// Every row's key is known to be new to the table, and met once in the input (the re-run
    /// index says so): a Delta table appends the batch even when it holds rows.
    pub keys_new: bool,
    /// The rows again, as runs of newline-ended lines in order, where the batch was cut from
    /// rows stored that way (a sink's chunks; rows lost to a later duplicate break a run): an
    /// NDJSON file writes them at once, without copying each row into its buffer. Empty
    /// otherwise.
    pub lines: Vec<&'a [u8]>,
}

impl<'a> RowBatch<'a> {
    /// A batch of `rows`, without tags or runs of lines.
    pub fn of_rows(rows: Vec<&'a [u8]>, shape: &'a Shape) -> RowBatch<'a> {
        RowBatch {
            rows,
            shape,
            tags: Vec::new(),
            keys_new: false,
            lines: Vec::new(),
        }
    }
}

/// A row's tag (see [`RowBatch::tags`]): 24 opaque bytes to the writers.
pub type RowTag = [u8; 24];

pub use report::{OnWritten, UnfitRow, WriteFailure};

/// Rows turned into Arrow and handed to the Parquet encoder at a time, by the Parquet output
/// and by Delta appends. Each encoder call walks every column of the (deeply nested) schema,
/// so small slices spend more on the walk than on the rows (delta-rs's default is 1,024).
pub const ENCODE_SLICE_ROWS: usize = 8192;

/// Writes batches of one table.
pub trait TableWriter: Send {
    /// The writer of the table's next batch. Writers are asked for in batch order, which fixes
    /// what depends on it (file numbers); each may then write on any thread, beside the
    /// writers of the table's other batches, so one table's batches are encoded on every core.
    fn next_batch(&mut self) -> Box<dyn BatchWriter>;
    /// Writes one batch now, on this thread; see [`BatchWriter::write`].
    fn write_batch(&mut self, batch: &RowBatch<'_>, on_written: OnWritten) {
        self.next_batch().write(batch, on_written)
    }
    /// Records ids deleted by the export (already anonymized); returns once they are applied.
    fn delete_ids(&mut self, ids: &[String]) -> Result<()>;
    /// Applies any batches the writer has staged (or whose files are being made durable) and
    /// returns once they are reported.
    fn flush(&mut self) {}
}

/// Writes one batch of a table ([`TableWriter::next_batch`]).
pub trait BatchWriter: Send {
    /// Writes the batch (an empty batch still creates the table) and reports through
    /// `on_written` once it is durable: file formats from their syncer's thread once the file
    /// is in place (`store::syncer`), Delta from its own runtime once committed. Either may
    /// come after this returns, so a caller must not hold resources (memory budget, rows for
    /// the errors folder) past the report.
    fn write(self: Box<Self>, batch: &RowBatch<'_>, on_written: OnWritten);
}

/// Writes one batch and waits until it is durable (for writes outside the dataflow).
pub fn write_and_wait(writer: &mut dyn TableWriter, batch: &RowBatch<'_>) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    writer.write_batch(
        batch,
        OnWritten::new(move |result| {
            let _ = tx.send(result.map_err(|failure| failure.error));
        }),
    );
    writer.flush();
    rx.recv()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the table writer stopped before reporting")))
}

/// Where a run's tables go: the format, the root folder or prefix, and for Delta the shared
/// committers.
pub struct Outputs {
    pub format: OutputFormat,
    pub root: ObjectLocation,
    delta: Option<Arc<delta::DeltaOutput>>,
    /// Makes the batch files of the file formats durable and puts them in place, off the
    /// workers (`store::syncer`).
    syncer: Option<Arc<Syncer>>,
}

impl Outputs {
    /// The outputs of a run; Delta starts its commit runtime here.
    pub fn new(
        format: OutputFormat,
        root: &ObjectLocation,
        delta: delta::DeltaSettings,
    ) -> Result<Outputs> {
        let delta = match format {
            OutputFormat::Deltalake => Some(Arc::new(delta::DeltaOutput::new(root, delta)?)),
            _ => None,
        };
        let syncer = match format {
            OutputFormat::Deltalake => None,
            _ => Some(Arc::new(Syncer::new())),
        };
        Ok(Outputs {
            format,
            root: root.clone(),
            delta,
            syncer,
        })
    }

    /// The writer of one table.
    pub fn open(&self, table: &str, kind: TableKind) -> Result<Box<dyn TableWriter>> {
        if let (TableKind::NlpResults(nlp), OutputFormat::Ndjson | OutputFormat::Parquet) =
            (&kind, self.format)
        {
            return Ok(nlp_files::open(self, table, nlp.task_version, kind.clone()));
        }
        let files = BatchedFiles::new(&self.root, table, self.format.name(), self.syncer.clone());
        Ok(match (self.format, &self.delta) {
            (OutputFormat::Ndjson, _) => Box::new(ndjson::NdjsonTable::new(files)),
            (OutputFormat::Parquet, _) => Box::new(parquet::ParquetTable::new(files, kind)),
            (OutputFormat::Deltalake, Some(delta)) => delta.writer(table, kind)?,
            (OutputFormat::Deltalake, None) => unreachable!("Delta outputs have a committer"),
        })
    }

    /// The syncer of the batch files (file formats only).
    pub fn syncer(&self) -> Option<Arc<Syncer>> {
        self.syncer.clone()
    }

    /// Waits for every pending commit and batch file, then runs table maintenance (Delta
    /// only).
    pub fn finish(&self, optimize: bool) -> Vec<(String, anyhow::Error)> {
        self.wait_for_files();
        match &self.delta {
            Some(delta) => delta.finish(optimize, false),
            None => Vec::new(),
        }
    }

    /// [`Outputs::finish`] after a run that stopped early, without table maintenance: what its
    /// writers queued is done, and their handles are not waited for.
    pub fn finish_stopped(&self) -> Vec<(String, anyhow::Error)> {
        self.wait_for_files();
        match &self.delta {
            Some(delta) => delta.finish(false, true),
            None => Vec::new(),
        }
    }

    /// Waits until every batch file handed to the syncer is in place (or failed).
    pub fn wait_for_files(&self) {
        if let Some(syncer) = &self.syncer {
            syncer.wait();
        }
    }

    /// The version of the Delta table `table` when this run opened it (None for other formats,
    /// a table not opened, or one that did not exist).
    pub fn opened_version(&self, table: &str) -> Option<i64> {
        self.delta.as_ref()?.opened_version(table)
    }

    /// What the commits of the Delta table `table` after version `since` say
    /// ([`delta::DeltaOutput::commits_since`]); nothing for other formats.
    pub fn commits_since(&self, table: &str, since: Option<i64>) -> Result<delta::CommitsSince> {
        match &self.delta {
            Some(delta) => delta.commits_since(table, since),
            None => Ok(delta::CommitsSince::default()),
        }
    }

    /// Every value of the string `column` in the Delta table `table`'s data files, to `each`
    /// ([`delta::DeltaOutput::for_each_value`]); nothing for other formats.
    pub fn for_each_value(&self, table: &str, column: &str, each: delta::ValueSink) -> Result<u64> {
        match &self.delta {
            Some(delta) => delta.for_each_value(table, column, each),
            None => Ok(0),
        }
    }

    /// How this run left the Delta table `table`, once finished.
    pub fn finished(&self, table: &str) -> Option<delta::FinishedTable> {
        self.delta.as_ref()?.finished(table)
    }
}

/// A batch file with its number, not yet written.
pub struct NextFile {
    dir: ObjectLocation,
    key: String,
    syncer: Option<Arc<Syncer>>,
}

impl NextFile {
    /// A writer of the file, which appears whole once finished, and its name for messages.
    pub fn create(&self) -> Result<(ObjectWriter, String)> {
        Ok((self.dir.writer(&self.key)?, self.dir.url_of(&self.key)))
    }

    /// Finishes the file written by `out`, on the table's syncer if it has one, and reports
    /// the outcome to `on_written` once the file is in place.
    pub fn finish(&self, out: ObjectWriter, on_written: OnWritten) {
        out.finish_then(self.syncer.as_deref(), move |result| {
            on_written.done(result)
        });
    }
}

/// `<root>/<table>/<table>.NNN.<ext>`, numbered from the next free index.
pub struct BatchedFiles {
    pub dir: ObjectLocation,
    pub table: String,
    ext: &'static str,
    next_index: Option<usize>,
    /// Where finished files are made durable and put in place (None: by their writers).
    syncer: Option<Arc<Syncer>>,
}

impl BatchedFiles {
    /// Files of `table` under `root`.
    pub fn new(
        root: &ObjectLocation,
        table: &str,
        ext: &'static str,
        syncer: Option<Arc<Syncer>>,
    ) -> BatchedFiles {
        BatchedFiles::in_dir(root.join(table), table, ext, syncer)
    }

    /// Files named `<name>.NNN.<ext>` in `dir`.
    pub fn in_dir(
        dir: ObjectLocation,
        name: &str,
        ext: &'static str,
        syncer: Option<Arc<Syncer>>,
    ) -> BatchedFiles {
        BatchedFiles {
            dir,
            table: name.to_string(),
            ext,
            next_index: None,
            syncer,
        }
    }

    /// Waits until every file handed to the syncer is in place (this table's and others').
    pub fn wait_for_files(&self) {
        if let Some(syncer) = &self.syncer {
            syncer.wait();
        }
    }

    /// The next batch file (numbered in the order asked for).
    pub fn next_file(&mut self) -> Result<NextFile> {
        let index = match self.next_index {
            Some(i) => i,
            None => {
                let prefix = format!("{}.", self.table);
                let suffix = format!(".{}", self.ext);
                self.dir
                    .list()?
                    .iter()
                    .filter_map(|e| {
                        e.key
                            .strip_prefix(&prefix)?
                            .strip_suffix(&suffix)?
                            .parse::<usize>()
                            .ok()
                    })
                    .map(|i| i + 1)
                    .max()
                    .unwrap_or(0)
            }
        };
        self.next_index = Some(index + 1);
        Ok(NextFile {
            dir: self.dir.clone(),
            key: format!("{}.{index:03}.{}", self.table, self.ext),
            syncer: self.syncer.clone(),
        })
    }

    /// Appends deleted ids to `<table>/<table>.meta`, as Cumulus ETL's file formats do.
    pub fn record_deletes(&self, ids: &[String]) -> Result<()> {
        let key = format!("{}.meta", self.table);
        let mut meta: serde_json::Value = self
            .dir
            .read(&key)?
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        let mut sorted = ids.to_vec();
        sorted.sort();
        let list = meta
            .as_object_mut()
            .expect("meta is an object")
            .entry("deleted")
            .or_insert_with(|| serde_json::json!([]));
        if let Some(list) = list.as_array_mut() {
            list.extend(sorted.into_iter().map(serde_json::Value::String));
        }
        self.dir
            .write(&key, serde_json::to_vec_pretty(&meta)?.into())
    }
}
