//! Delta Lake output: one committer per table on a tokio runtime beside the timely workers.
//! Writers (on worker threads) only turn rows into Arrow and queue them; each table's committer
//! applies its queue in order (one table's commits are serial, different tables run in
//! parallel) and reports each batch once committed, which is when the sink releases its memory.

mod conform;
mod stage;
mod table;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Result, anyhow};
use arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

pub use conform::{conform_batch, union_schema};
pub use table::{COMPACTION_MIN_FILES, CumulusTable, DeltaSettings, TableSpec};

use super::arrow_rows::to_record_batch;
use super::{OnWritten, RowBatch, TableKind, TableWriter};

/// Threads of the commit runtime: commits mostly wait on storage, and Parquet encoding of
/// MERGE output should not take the workers' cores.
const COMMIT_THREADS: usize = 2;

enum Job {
    Write {
        batch: RecordBatch,
        groups: Vec<String>,
        on_written: OnWritten,
    },
    Delete {
        ids: Vec<String>,
        reply: std::sync::mpsc::Sender<Result<()>>,
    },
    /// Merge what is staged now.
    Flush { reply: std::sync::mpsc::Sender<()> },
}

struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
    done: tokio::task::JoinHandle<Option<CumulusTable>>,
}

/// The Delta tables of one run.
pub struct DeltaOutput {
    runtime: tokio::runtime::Runtime,
    root: PathBuf,
    settings: Arc<DeltaSettings>,
    committers: Mutex<BTreeMap<String, Committer>>,
}

impl DeltaOutput {
    /// Starts the commit runtime for tables under `root`.
    pub fn new(root: &Path, settings: DeltaSettings) -> Result<DeltaOutput> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(COMMIT_THREADS)
            .thread_name("delta-commit")
            .enable_all()
            .build()?;
        Ok(DeltaOutput {
            runtime,
            root: root.to_path_buf(),
            settings: Arc::new(settings),
            committers: Mutex::new(BTreeMap::new()),
        })
    }

    /// A writer that queues to the table's committer (started on first use).
    pub fn writer(&self, table: &str, kind: TableKind) -> Box<dyn TableWriter> {
        let mut committers = self.committers.lock().unwrap();
        let committer = committers.entry(table.to_string()).or_insert_with(|| {
            let (jobs, queue) = mpsc::unbounded_channel();
            let spec = TableSpec::for_kind(table, &kind);
            let done = self.runtime.spawn(commit_loop(
                self.root.clone(),
                spec,
                self.settings.clone(),
                queue,
            ));
            Committer { jobs, done }
        });
        Box::new(DeltaTableWriter {
            kind,
            jobs: committer.jobs.clone(),
        })
    }

    /// Waits for every queued commit, then maintains each table (in parallel). Returns the
    /// tables whose maintenance failed; their data is committed either way.
    pub fn finish(&self, optimize: bool) -> Vec<(String, anyhow::Error)> {
        let committers = std::mem::take(&mut *self.committers.lock().unwrap());
        self.runtime.block_on(async {
            let mut tables = Vec::new();
            for (name, committer) in committers {
                drop(committer.jobs);
                match committer.done.await {
                    Ok(Some(table)) => tables.push((name, table)),
                    Ok(None) => {}
                    Err(e) => eprintln!("error: the committer of {name} stopped: {e}"),
                }
            }
            let runs = tables
                .into_iter()
                .map(|(name, mut table)| async move { (name, table.maintain(optimize).await) });
            futures::future::join_all(runs)
                .await
                .into_iter()
                .filter_map(|(name, r)| r.err().map(|e| (name, e)))
                .collect()
        })
    }
}

/// Applies one table's jobs in order; returns the table for maintenance.
async fn commit_loop(
    root: PathBuf,
    spec: TableSpec,
    settings: Arc<DeltaSettings>,
    mut queue: mpsc::UnboundedReceiver<Job>,
) -> Option<CumulusTable> {
    let name = spec.name.clone();
    let mut table = match CumulusTable::open(&root, spec, settings).await {
        Ok(t) => Some(t),
        Err(e) => {
            let message = format!("{e:#}");
            eprintln!("error: could not open the Delta table {name}: {message}");
            None
        }
    };
    while let Some(job) = queue.recv().await {
        let Some(t) = table.as_mut() else {
            let e = anyhow!("the Delta table {name} could not be opened");
            match job {
                Job::Write { on_written, .. } => on_written.done(Err(e)),
                Job::Delete { reply, .. } => drop(reply.send(Err(e))),
                Job::Flush { reply } => {
                    let _ = reply.send(());
                }
            }
            continue;
        };
        match job {
            Job::Write {
                batch,
                groups,
                on_written,
            } => t.submit(batch, groups, on_written).await,
            Job::Delete { ids, reply } => drop(reply.send(t.delete_ids(&ids).await)),
            Job::Flush { reply } => {
                t.flush_staged().await;
                let _ = reply.send(());
            }
        }
    }
    if let Some(t) = table.as_mut() {
        t.flush_staged().await;
    }
    table
}

/// A handle on a table's committer.
struct DeltaTableWriter {
    kind: TableKind,
    jobs: mpsc::UnboundedSender<Job>,
}

impl TableWriter for DeltaTableWriter {
    fn write_batch(&mut self, batch: &RowBatch<'_>, on_written: OnWritten) {
        let batch = match to_record_batch(&self.kind, batch) {
            Ok(b) => b,
            Err(e) => return on_written.done(Err(e)),
        };
        let groups = match self.kind.group_field() {
            Some(field) => distinct_strings(&batch, field),
            None => Vec::new(),
        };
        let job = Job::Write {
            batch,
            groups,
            on_written,
        };
        if let Err(mpsc::error::SendError(job)) = self.jobs.send(job)
            && let Job::Write { on_written, .. } = job
        {
            on_written.done(Err(anyhow!("the table's committer has stopped")));
        }
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
