//! What every run of the dataflow does, whichever command starts it (`etl`, or the NLP
//! studies): the memory budget with the codebook and the Delta tables' keys counted in it, the
//! outputs, the shared state, the dataflow with its progress lines, and the end of the tables.
//! The commands differ only in their tasks, their producers and their summaries.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::deid::{Codebook, Scrubber};
use crate::engine::dataflow::ProducerFactory;
use crate::engine::report::RunReport;
use crate::engine::rows::TaskContext;
use crate::engine::stop::{RunStopped, StopCause};
use crate::engine::work::WorkQueue;
use crate::engine::{Engine, EngineConfig, RunShared};
use crate::etl::progress::ProgressPrinter;
use crate::exit::{ExitCode, Fatal, one_line};
use crate::input::bundles::WorkItem;
use crate::memory::MemoryBudget;
use crate::output::delta::DeltaSettings;
use crate::output::{OutputFormat, Outputs};
use crate::store::ObjectLocation;

/// How a run is set up, from its options.
pub struct RunBuilder {
    /// The `--memory` budget in bytes.
    pub memory: u64,
    pub format: OutputFormat,
    pub output: ObjectLocation,
    /// Names the run in the Delta tables' log (`cumulus-etl/<name>`).
    pub run_name: String,
    pub batch_size: usize,
    /// Worker threads: also the threads of the end-of-run compactions.
    pub workers: usize,
    pub bundle_bytes: usize,
    pub errors_to: Option<PathBuf>,
    /// Where skipped input lines go (PHI), when `--errors-to` is given.
    pub rejected: Option<std::fs::File>,
    /// The row index tag Delta appends write their row journals under, when the run keeps
    /// row indexes (`etl::rerun`).
    pub row_journal: Option<crate::output::delta::RowJournal>,
    /// The run compacts its Delta tables at the end (not `--no-table-optimization`).
    pub optimize_tables: bool,
}

impl RunBuilder {
    /// The shared state of a run of `contexts` over `work`, its outputs open.
    pub fn build(
        self,
        scrubber: Scrubber,
        codebook: &Codebook,
        contexts: Vec<TaskContext>,
        work: Vec<WorkItem>,
    ) -> Result<Arc<RunShared>, Fatal> {
        let budget = MemoryBudget::new(self.memory);
        budget.hold_codebook(codebook.held_bytes());
        // What each table reads, which sizes the cut of its appends.
        let mut table_inputs = std::collections::HashMap::new();
        for item in &work {
            let kind = &item.file().resource_type;
            let reading = contexts.iter().filter(|c| {
                &c.resource_type == kind || c.more_resource_types.iter().any(|t| t == kind)
            });
            for context in reading {
                let bytes = match item {
                    WorkItem::Slice { .. } => item.bytes(),
                    _ => item.file().ndjson_bytes(),
                };
                *table_inputs.entry(context.table.clone()).or_insert(0u64) += bytes;
            }
        }
        let delta = DeltaSettings::for_budget(self.memory, &self.run_name)
            .with_merge_rows(self.batch_size)
            .with_threads(self.workers)
            .with_cut_appends(self.optimize_tables)
            .with_table_inputs(table_inputs)
            .with_row_journals(self.row_journal);
        delta.count_routing_keys_in(&budget);
        let outputs = Outputs::new(self.format, &self.output, delta)?;
        Ok(Arc::new(RunShared::new(
            scrubber,
            budget,
            WorkQueue::new(work, contexts),
            RunReport::new(self.errors_to, self.rejected),
            outputs,
            self.batch_size,
            self.bundle_bytes,
        )))
    }
}

/// Starts the workers that run the dataflow.
pub fn start_engine(config: &EngineConfig) -> Result<Engine, Fatal> {
    Engine::start(config).map_err(|e| Fatal::new(ExitCode::Failure, one_line(&e)))
}

/// Runs the dataflow on `engine` to its end, with progress lines every `interval`
/// (`total_bytes` to read); a dataflow that stopped early ends the run ([`stopped_run`]).
pub fn run_to_end(
    shared: &Arc<RunShared>,
    engine: &mut Engine,
    producers: ProducerFactory,
    total_bytes: u64,
    interval: Duration,
) -> Result<(), Fatal> {
    let progress = ProgressPrinter::start(shared.clone(), total_bytes, interval);
    let outcome = engine.run(shared.clone(), producers);
    // Batch files still being made durable are counted once in place, before the last
    // progress line and anything that reads the run's figures.
    shared.outputs.wait_for_files();
    progress.stop();
    outcome.map_err(|e| stopped_run(shared, e))
}

/// Waits for the tables' last writes and maintains them (`optimize`: Delta compaction and
/// VACUUM); a table whose maintenance failed is a warning, its data being written.
pub fn finish_tables(shared: &RunShared, optimize: bool) {
    for (table, e) in shared.outputs.finish(optimize) {
        crate::say!(
            "warning: table maintenance of {table} failed: {}",
            one_line(&e)
        );
    }
}

/// Ends a run whose dataflow stopped early (`engine::stop`): the batches already handed to the
/// writers are finished (committed or failed, without table maintenance) and the codebook is
/// saved, so a re-run completes the tables; the error names what was in hand. Writing failures
/// exit as a failed task (19), the rest as a failure (1).
pub fn stopped_run(shared: &RunShared, error: anyhow::Error) -> Fatal {
    for (table, e) in shared.outputs.finish_stopped() {
        crate::say!("warning: finishing table {table} failed: {}", one_line(&e));
    }
    if let Err(e) = shared.scrubber.codebook().save() {
        crate::say!("error: could not save the codebook: {}", one_line(&e));
    }
    let cause = error.downcast_ref::<RunStopped>().map(|s| s.cause);
    let code = match cause {
        Some(StopCause::Writing) => ExitCode::TaskFailed,
        _ => ExitCode::Failure,
    };
    // A lost process is the machine's or the network's doing, not a bug of ours.
    let report = match cause {
        Some(StopCause::Connection) => "",
        _ => " This is a bug: please report the message above.",
    };
    let again = match shared.outputs.format {
        OutputFormat::Deltalake => {
            "Tables keep the batches committed before it; a re-run completes them"
        }
        OutputFormat::Ndjson | OutputFormat::Parquet => {
            "The output folder holds part of the tables: run again into an empty one"
        }
    };
    Fatal::new(
        code,
        format!("The run stopped: {error:#}. {again}.{report}"),
    )
}
