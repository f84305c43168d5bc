//! Delta Lake output: one committer per table on a tokio runtime beside the timely workers.
//! Writers (on worker threads) route each batch when they queue it: a batch appended to a table
//! holding only this run's fresh rows (a first load) is encoded into a data file by the writer
//! itself and queued as that file; anything else is turned into Arrow, staged on local disk by
//! the writer (so its memory is free at once) and queued for a MERGE.
//! Each table's committer applies its queue in order (one table's commits are serial, different
//! tables run in parallel) and reports each batch once committed, which is when the sink
//! releases its memory.

mod cluster_sort;
mod column_scan;
mod commit;
mod compact;
mod conform;
mod deletion_vectors;
mod file_concat;
mod file_merge;
mod files;
mod ledger;
mod merge_source;
mod protocol;
mod range_cluster;
mod range_pieces;
mod s3_log;
mod stage;
mod stats_merge;
mod table;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

pub use conform::{conform_batch, union_schema};
pub use file_merge::INDEX_BYTES_PER_ROW as MERGE_INDEX_BYTES_PER_ROW;
pub use ledger::Route;
pub use table::{
    COMPACTION_MIN_FILES, CommitsSince, CumulusTable, DeltaSettings, RowJournal, TableSpec,
};

use anyhow::Context;
use files::{TableFiles, WrittenFiles};
use ledger::{Ledger, key_fingerprints};
use stage::{StageDir, StagedFile};

use super::ENCODE_SLICE_ROWS;
use super::arrow_rows::{batch_schema, to_record_batch};
use super::columns::rows_to_record_batch;
use super::{BatchWriter, OnWritten, RowBatch, TableKind, TableWriter, UnfitRow};
use crate::panic_guard::{self, Guarded, InternalError, Site};
use crate::store::ObjectLocation;

/// Threads of the commit runtime: commits mostly wait on storage, and Parquet encoding of
/// MERGE output should not take the workers' cores.
const COMMIT_THREADS: usize = 2;

enum Job {
    /// A batch for the committer to conform and apply, routed when it was queued.
    Write {
        batch: RecordBatch,
        groups: Vec<String>,
        route: Route,
        keys: Vec<u64>,
        on_written: OnWritten,
    },
    /// A MERGE batch its writer has staged on local disk, to merge with the others.
    Staged {
        file: StagedFile,
        groups: Vec<String>,
        keys: Vec<u64>,
        on_written: OnWritten,
    },
    /// Data files a writer has written, to record in the log.
    Commit {
        files: WrittenFiles,
        on_written: OnWritten,
    },
    Delete {
        ids: Vec<String>,
        reply: std::sync::mpsc::Sender<Result<()>>,
    },
    /// Merge what is staged now.
    Flush { reply: std::sync::mpsc::Sender<()> },
    /// What the commits after a version say ([`CumulusTable::commits_since`]).
    Journals {
        since: Option<i64>,
        reply: std::sync::mpsc::Sender<Result<CommitsSince>>,
    },
    /// Every value of a string column in the table's data files ([`column_scan`]).
    Values {
        column: String,
        each: ValueSink,
        reply: std::sync::mpsc::Sender<Result<u64>>,
    },
    /// A stopped run is finishing: what was queued before is done, and the committer ends,
    /// though a writer of the run may still hold a handle on its queue.
    Close,
}

/// Where a column's values go, a batch at a time.
pub type ValueSink = Box<dyn FnMut(&arrow::array::StringArray) -> Result<()> + Send>;

struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
    done: tokio::task::JoinHandle<Result<CumulusTable, InternalError>>,
    ledger: Arc<Mutex<Ledger>>,
    files: Arc<TableFiles>,
    stage: Arc<StageDir>,
    uniqueness: Arc<[String]>,
    /// The table's version when it was opened (None: it did not exist).
    opened_at: Option<i64>,
}

/// The Delta tables of one run.
pub struct DeltaOutput {
    runtime: tokio::runtime::Runtime,
    root: ObjectLocation,
    settings: Arc<DeltaSettings>,
    committers: Mutex<BTreeMap<String, Committer>>,
    /// How the tables were left, once finished.
    finished_at: Mutex<BTreeMap<String, FinishedTable>>,
}

/// How a run left a table.
#[derive(Debug, Clone)]
pub struct FinishedTable {
    /// Its version (None: never created).
    pub version: Option<i64>,
    /// What its commits since the run opened it say (the run's own only? their journals?).
    pub since_opened: CommitsSince,
}

impl DeltaOutput {
    /// Starts the commit runtime for tables under `root`.
    pub fn new(root: &ObjectLocation, settings: DeltaSettings) -> Result<DeltaOutput> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(COMMIT_THREADS)
            .thread_name("delta-commit")
            .enable_all()
            .build()?;
        Ok(DeltaOutput {
            runtime,
            root: root.clone(),
            settings: Arc::new(settings),
            committers: Mutex::new(BTreeMap::new()),
            finished_at: Mutex::new(BTreeMap::new()),
        })
    }

    /// The version of `table` when this run opened it (None: not opened, or it did not
    /// exist).
    pub fn opened_version(&self, table: &str) -> Option<i64> {
        self.committers.lock().unwrap().get(table)?.opened_at
    }

    /// What the commits of `table` after version `since` (None: all of them) say
    /// ([`CumulusTable::commits_since`]). The table must be open.
    pub fn commits_since(&self, table: &str, since: Option<i64>) -> Result<CommitsSince> {
        let (reply, answer) = std::sync::mpsc::channel();
        let jobs = match self.committers.lock().unwrap().get(table) {
            Some(committer) => committer.jobs.clone(),
            None => return Err(anyhow!("the table {table} is not open")),
        };
        jobs.send(Job::Journals { since, reply })
            .map_err(|_| anyhow!("the committer of {table} has stopped"))?;
        answer
            .recv()
            .map_err(|_| anyhow!("the committer of {table} stopped"))?
    }

    /// Gives `each` every value of the string `column` in the data files of `table` as this
    /// run opened it, a batch at a time ([`column_scan`]: deleted rows included); returns how
    /// many. The table must be open.
    pub fn for_each_value(&self, table: &str, column: &str, each: ValueSink) -> Result<u64> {
        let (reply, answer) = std::sync::mpsc::channel();
        let jobs = match self.committers.lock().unwrap().get(table) {
            Some(committer) => committer.jobs.clone(),
            None => return Err(anyhow!("the table {table} is not open")),
        };
        let column = column.to_string();
        jobs.send(Job::Values {
            column,
            each,
            reply,
        })
        .map_err(|_| anyhow!("the committer of {table} has stopped"))?;
        answer
            .recv()
            .map_err(|_| anyhow!("the committer of {table} stopped"))?
    }

    /// How [`DeltaOutput::finish`] left `table` (None: not finished).
    pub fn finished(&self, table: &str) -> Option<FinishedTable> {
        self.finished_at.lock().unwrap().get(table).cloned()
    }

    /// A writer that queues to the table's committer. The first writer of a table opens it
    /// (reads its log) and starts the committer; it must not be asked for from within an
    /// async runtime.
    pub fn writer(&self, table: &str, kind: TableKind) -> Result<Box<dyn TableWriter>> {
        let mut committers = self.committers.lock().unwrap();
        if !committers.contains_key(table) {
            let spec = TableSpec::for_kind(table, &kind);
            let uniqueness: Arc<[String]> = spec.uniqueness.clone().into();
            let opened = self
                .runtime
                .block_on(CumulusTable::open(&self.root, spec, self.settings.clone()))
                .map_err(|e| match e.is::<protocol::Refused>() {
                    true => e,
                    false => e.context(format!("could not open the Delta table {table}")),
                })?;
            let ledger = opened.ledger();
            let opened_at = opened.version();
            let files = Arc::new(opened.files(self.runtime.handle().clone()));
            let stage = opened.stage_dir();
            let (jobs, queue) = mpsc::unbounded_channel();
            let done = self
                .runtime
                .spawn(commit_loop(table.to_string(), opened, queue));
            let committer = Committer {
                jobs,
                done,
                ledger,
                files,
                stage,
                uniqueness,
                opened_at,
            };
            committers.insert(table.to_string(), committer);
        }
        let committer = &committers[table];
        Ok(Box::new(DeltaTableWriter {
            kind,
            jobs: committer.jobs.clone(),
            ledger: committer.ledger.clone(),
            files: committer.files.clone(),
            stage: committer.stage.clone(),
            uniqueness: committer.uniqueness.clone(),
        }))
    }

    /// Waits for every queued commit, then maintains each table (in parallel). Returns the
    /// tables whose maintenance failed; their data is committed either way. A committer ends
    /// when the last handle on its queue goes, or, after a run that `stopped` (whose writers may
    /// outlive it: a watch waited for them forever), once what was queued before now is done.
    pub fn finish(&self, optimize: bool, stopped: bool) -> Vec<(String, anyhow::Error)> {
        let committers = std::mem::take(&mut *self.committers.lock().unwrap());
        self.runtime.block_on(async {
            let mut tables = Vec::new();
            for (name, committer) in committers {
                if stopped {
                    let _ = committer.jobs.send(Job::Close);
                }
                drop(committer.jobs);
                match committer.done.await {
                    Ok(Ok(table)) => tables.push((name, table, committer.opened_at)),
                    Ok(Err(e)) => crate::say!("error: the committer of {name} stopped: {e}"),
                    Err(e) => crate::say!("error: the committer of {name} stopped: {e}"),
                }
            }
            // Spawned, so tables are maintained on the runtime's threads at once (polled here,
            // a file-by-file compaction read and encoded on this one thread alone).
            let runs: Vec<_> = tables
                .into_iter()
                .map(|(name, mut table, opened_at)| {
                    let maintained = tokio::spawn(async move {
                        let outcome = table.maintain(optimize).await;
                        let since_opened = table.commits_since(opened_at).await;
                        let finished = FinishedTable {
                            version: table.version(),
                            since_opened: since_opened.unwrap_or_default(),
                        };
                        (outcome, finished)
                    });
                    (name, maintained)
                })
                .collect();
            let mut failed = Vec::new();
            for (name, run) in runs {
                match run.await {
                    Ok((outcome, finished)) => {
                        self.finished_at
                            .lock()
                            .unwrap()
                            .insert(name.clone(), finished);
                        if let Err(e) = outcome {
                            failed.push((name, e));
                        }
                    }
                    Err(e) => failed.push((name, anyhow!("its maintenance stopped: {e}"))),
                }
            }
            failed
        })
    }
}

/// Applies one table's jobs in order; returns the table for maintenance. A job that panics
/// leaves the table's state unknown: that job and every later one fail with the panic (which
/// stops the run), and the table is not maintained.
async fn commit_loop(
    name: String,
    mut table: CumulusTable,
    mut queue: mpsc::UnboundedReceiver<Job>,
) -> Result<CumulusTable, InternalError> {
    while let Some(job) = queue.recv().await {
        if matches!(job, Job::Close) {
            break;
        }
        let applied = Guarded::new(async {
            panic_guard::inject(Site::Committer, &name, || 0);
            apply_job(&mut table, job).await
        })
        .await;
        if let Err(panic) = applied {
            queue.close();
            while let Some(job) = queue.recv().await {
                fail_job(job, &panic);
            }
            return Err(panic);
        }
    }
    Guarded::new(table.flush_staged()).await?;
    Ok(table)
}

async fn apply_job(table: &mut CumulusTable, job: Job) {
    match job {
        Job::Write {
            batch,
            groups,
            route,
            keys,
            on_written,
        } => table.apply(batch, groups, route, &keys, on_written).await,
        Job::Staged {
            file,
            groups,
            keys,
            on_written,
        } => table.apply_staged(file, groups, &keys, on_written).await,
        Job::Commit { files, on_written } => table.commit_files(files, on_written).await,
        Job::Delete { ids, reply } => drop(reply.send(table.delete_ids(&ids).await)),
        Job::Flush { reply } => {
            table.flush_staged().await;
            let _ = reply.send(());
        }
        Job::Journals { since, reply } => drop(reply.send(table.commits_since(since).await)),
        Job::Values {
            column,
            mut each,
            reply,
        } => drop(reply.send(table.for_each_value(&column, &mut *each).await)),
        Job::Close => {}
    }
}

/// Answers a job that will not be applied, with the panic that stopped its committer.
fn fail_job(job: Job, panic: &InternalError) {
    let error = || anyhow::Error::new(panic.clone());
    match job {
        Job::Write { on_written, .. }
        | Job::Staged { on_written, .. }
        | Job::Commit { on_written, .. } => on_written.done(Err(error())),
        Job::Delete { reply, .. } => drop(reply.send(Err(error()))),
        Job::Flush { reply } => drop(reply.send(())),
        Job::Journals { reply, .. } => drop(reply.send(Err(error()))),
        Job::Values { reply, .. } => drop(reply.send(Err(error()))),
        Job::Close => {}
    }
}

/// A handle on a table's committer (each batch gets a copy, which may write on any thread).
#[derive(Clone)]
struct DeltaTableWriter {
    kind: TableKind,
    jobs: mpsc::UnboundedSender<Job>,
    ledger: Arc<Mutex<Ledger>>,
    files: Arc<TableFiles>,
    stage: Arc<StageDir>,
    uniqueness: Arc<[String]>,
}

impl DeltaTableWriter {
    /// Queues a job, or fails its batch when the committer has stopped.
    fn send(&self, job: Job) {
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job) {
            let on_written = match job {
                Job::Write { on_written, .. }
                | Job::Staged { on_written, .. }
                | Job::Commit { on_written, .. } => on_written,
                Job::Delete { .. }
                | Job::Flush { .. }
                | Job::Journals { .. }
                | Job::Values { .. }
                | Job::Close => return,
            };
            on_written.done(Err(anyhow!("the table's committer has stopped")));
        }
    }

    /// Encodes the batch into a data file here, then queues the file; a batch whose keys turn
    /// out to need a MERGE (a repeated key) drops its file and is queued as rows instead.
    fn write_files(&self, batch: &RowBatch<'_>, mut on_written: OnWritten) {
        let schema = batch_schema(&self.kind, batch);
        let target = match self.ledger.lock().unwrap().widen(&schema) {
            Ok(target) => target,
            Err(e) => return on_written.done(Err(e)),
        };
        let rows = (batch.rows.as_slice(), batch.tags.as_slice());
        let mut files = match self.files.write(rows, &schema, &target, &self.uniqueness) {
            Ok(files) => files,
            Err(e) => return on_written.done(Err(e)),
        };
        let mut ledger = self.ledger.lock().unwrap();
        // Keys new to a table that holds rows (the re-run index knows) need no MERGE.
        let route = match batch.keys_new && !ledger.appending() {
            true => Route::Append,
            false => ledger.route(&files.keys),
        };
        match route {
            // Queued under the ledger's lock, so the committer sees batches in routing order.
            Route::Append => {
                on_written.unfit(std::mem::take(&mut files.unfit));
                self.send(Job::Commit { files, on_written })
            }
            Route::Merge => {
                drop(ledger);
                self.files.discard(&files);
                // Decoded again there, which leaves out (and reports) the same rows.
                self.queue_rows(batch, Some(files.keys), on_written);
            }
        }
    }

    /// Stages a batch bound for a MERGE (the table no longer takes plain appends) on local
    /// disk, decoded a slice at a time, so neither its rows nor a whole Arrow copy of them stay
    /// in memory; if that fails, it is queued as Arrow rows instead.
    fn stage_rows(&self, batch: &RowBatch<'_>, mut on_written: OnWritten) {
        let schema = batch_schema(&self.kind, batch);
        let mut keys = Vec::with_capacity(batch.rows.len());
        let mut failed = None;
        let mut unfit_rows = Vec::new();
        let mut tags = Vec::with_capacity(batch.tags.len());
        let mut slice_tags = batch.tags.chunks(ENCODE_SLICE_ROWS);
        let slices = batch.rows.chunks(ENCODE_SLICE_ROWS).map_while(|rows| {
            let these_tags = slice_tags.next().unwrap_or_default();
            let slice = rows_to_record_batch(schema.clone(), rows)
                .context("rows do not fit the table's FHIR schema")
                .and_then(|decoded| {
                    unfit_rows.extend(UnfitRow::from_decode(rows, &decoded.unfit));
                    tags.extend(files::fit_tags(these_tags, &decoded.unfit));
                    keys.extend(key_fingerprints(&self.uniqueness, &decoded.batch, &[])?);
                    Ok(decoded.batch)
                });
            match slice {
                Ok(slice) => Some(Ok(slice)),
                Err(e) => {
                    failed = Some(e);
                    None
                }
            }
        });
        let staged = self.stage.write_slices(&schema, slices);
        if let Some(e) = failed {
            if let Ok(file) = staged {
                let _ = std::fs::remove_file(&file.path);
            }
            return on_written.done(Err(e));
        }
        let mut file = match staged {
            Ok(file) => file,
            Err(e) => {
                staging_failed(&e);
                // Decoded again there, which leaves out (and reports) the same rows.
                return self.queue_rows(batch, None, on_written);
            }
        };
        file.tags = tags;
        on_written.unfit(unfit_rows);
        // Routed (a MERGE, since appends have stopped) and queued under the ledger's lock, so
        // the committer sees batches in routing order.
        let mut ledger = self.ledger.lock().unwrap();
        let route = ledger.route(&keys);
        debug_assert_eq!(route, Route::Merge);
        self.send_staged(file, Vec::new(), keys, on_written);
    }

    /// Tells the caller its batch is on disk (its memory may go) and queues the file.
    fn send_staged(
        &self,
        file: StagedFile,
        groups: Vec<String>,
        keys: Vec<u64>,
        mut on_written: OnWritten,
    ) {
        on_written.staged();
        self.send(Job::Staged {
            file,
            groups,
            keys,
            on_written,
        });
    }

    /// Queues the batch as Arrow rows for the committer: routed here, or a MERGE already
    /// routed (with these keys) when its data file was dropped.
    fn queue_rows(&self, rows: &RowBatch<'_>, merged: Option<Vec<u64>>, mut on_written: OnWritten) {
        let (batch, tags) = match to_record_batch(&self.kind, rows) {
            Ok(decoded) => {
                on_written.unfit(UnfitRow::from_decode(&rows.rows, &decoded.unfit));
                let tags = files::fit_tags(&rows.tags, &decoded.unfit).collect();
                (decoded.batch, tags)
            }
            Err(e) => return on_written.done(Err(e)),
        };
        let groups = match self.kind.group_field() {
            Some(field) => distinct_strings(&batch, field),
            None => Vec::new(),
        };
        let (keys, already_merged) = match merged {
            Some(keys) => (keys, true),
            None => match key_fingerprints(&self.uniqueness, &batch, &groups) {
                Ok(keys) => (keys, false),
                Err(e) => return on_written.done(Err(e)),
            },
        };
        // Routed and queued under the ledger's lock, so the committer sees batches in routing
        // order.
        let mut ledger = self.ledger.lock().unwrap();
        let route = if already_merged {
            Route::Merge
        } else {
            ledger.route(&keys)
        };
        if route == Route::Merge && batch.num_rows() > 0 {
            // Staged here, the batch leaves memory now, rather than waiting in the queue (as
            // rows and as Arrow) while the committer merges what came before.
            match self.stage.write(&batch) {
                Ok(file) => {
                    let file = StagedFile { tags, ..file };
                    return self.send_staged(file, groups, keys, on_written);
                }
                Err(e) => staging_failed(&e),
            }
        }
        self.send(Job::Write {
            batch,
            groups,
            route,
            keys,
            on_written,
        });
    }
}

impl TableWriter for DeltaTableWriter {
    fn next_batch(&mut self) -> Box<dyn BatchWriter> {
        Box::new(self.clone())
    }

    fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.jobs
            .send(Job::Delete {
                ids: ids.to_vec(),
                reply,
            })
            .map_err(|_| anyhow!("the table's committer has stopped"))?;
        answer
            .recv()
            .map_err(|_| anyhow!("the table's committer stopped before deleting"))?
    }

    fn flush(&mut self) {
        let (reply, answer) = std::sync::mpsc::channel();
        if self.jobs.send(Job::Flush { reply }).is_ok() {
            let _ = answer.recv();
        }
    }
}

impl BatchWriter for DeltaTableWriter {
    fn write(self: Box<Self>, batch: &RowBatch<'_>, on_written: OnWritten) {
        // Rows of a table without groups are encoded here: into a data file while the table
        // takes appends, into a staged MERGE batch once it does not.
        let plain = self.kind.group_field().is_none() && !batch.rows.is_empty();
        let appending = self.ledger.lock().unwrap().appending() || batch.keys_new;
        match (plain, plain && appending) {
            (true, true) => self.write_files(batch, on_written),
            (true, false) => self.stage_rows(batch, on_written),
            (false, _) => self.queue_rows(batch, None, on_written),
        }
    }
}

/// A MERGE batch could not be written to local disk: it is queued in memory instead.
fn staging_failed(e: &anyhow::Error) {
    crate::say!("warning: could not stage a MERGE batch on local disk ({e:#}); it waits in memory");
}

/// The distinct values of a string column (the groups a batch touches).
fn distinct_strings(batch: &arrow::record_batch::RecordBatch, column: &str) -> Vec<String> {
    let Some(values) = batch
        .column_by_name(column)
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
    else {
        return Vec::new();
    };
    let set: std::collections::BTreeSet<&str> = values.iter().flatten().collect();
    set.into_iter().map(str::to_string).collect()
}
