//! Builds and runs the timely dataflow: on every worker a source operator (read, de-identify)
//! and a sink operator; chunks are exchanged so each task's rows meet at one sink, which writes
//! that task's tables serially.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Result, anyhow};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::generic::operator::source;

use super::config::EngineConfig;
use super::report::RunReport;
use super::sink::SinkState;
use super::source::{RowProducer, SourceState, Step};
use super::stop::{StopCause, StopSignal};
use super::work::{WorkQueue, WriteJobs};
use crate::deid::Scrubber;
use crate::engine::rows::{TableChunk, TaskContext};
use crate::input::bundles::WorkItem;
use crate::memory::MemoryBudget;
use crate::output::{Outputs, TableKind, TableWriter};
use crate::panic_guard::{self, Site};
use crate::tasks::COMPLETION_ENCOUNTERS_TABLE;

/// Everything the workers share during a run.
pub struct RunShared {
    pub scrubber: Scrubber,
    pub budget: MemoryBudget,
    /// The bundles left to read, and the tasks they belong to.
    pub work: WorkQueue,
    /// Batches cut by the sinks, waiting for a worker to write them.
    pub writes: WriteJobs,
    /// What the run has read, written and skipped, for its progress lines and summary.
    pub report: RunReport,
    pub outputs: Outputs,
    pub batch_size: usize,
    pub bundle_bytes: usize,
    /// Set when a panic outside the per-line work stops the run.
    pub stop: StopSignal,
}

impl RunShared {
    /// Shared state for a run.
    pub fn new(
        scrubber: Scrubber,
        budget: MemoryBudget,
        work: WorkQueue,
        report: RunReport,
        outputs: Outputs,
        batch_size: usize,
        bundle_bytes: usize,
    ) -> RunShared {
        RunShared {
            scrubber,
            budget,
            work,
            writes: WriteJobs::default(),
            report,
            outputs,
            batch_size,
            bundle_bytes,
            stop: StopSignal::default(),
        }
    }

    /// Opens the writer of one of a task's tables.
    pub fn open_writer(&self, table: &str, ctx: &TaskContext) -> Result<Box<dyn TableWriter>> {
        let kind = if table == COMPLETION_ENCOUNTERS_TABLE {
            TableKind::CompletionEncounters
        } else {
            ctx.kind.clone()
        };
        self.outputs.open(table, kind)
    }

    /// Creates a table that got no rows in this run (with its schema), as upstream does.
    pub fn touch_if_empty(&self, table: &str, ctx: &TaskContext) -> Result<()> {
        let has_rows = self.report.stats.lock().unwrap().tables.contains_key(table);
        if !has_rows {
            let mut writer = self.open_writer(table, ctx)?;
            crate::output::write_and_wait(
                writer.as_mut(),
                &crate::output::RowBatch {
                    rows: Vec::new(),
                    shape: &crate::fhir::Shape::default(),
                    tags: Vec::new(),
                    keys_new: false,
                },
            )?;
            self.report.stats.lock().unwrap().summary(table);
        }
        Ok(())
    }
}

/// The worker whose sink writes each task. Sinks write their tasks serially, so tasks are
/// spread by their number of resources, largest first onto the least loaded worker. Routing by
/// task id had put the three largest tables of a Synthea export on one worker, which then wrote
/// alone at the end of the run. Input bytes were the next measure, but notes lose their
/// attachments: by bytes, the notes (382 MB in, 164 MB out of 1 GB) had a worker to
/// themselves while the other wrote twice as much.
fn sink_workers(shared: &RunShared, workers: usize) -> Vec<u64> {
    let mut resources = vec![0u64; shared.work.tasks.len()];
    shared.work.for_each(|item| {
        if let Some(ctx) = shared.work.task_for(&item.file().resource_type) {
            resources[ctx.task as usize] += match item {
                WorkItem::Slice { lines, .. } => *lines,
                // Not counted before it is read: about a kilobyte per resource.
                WorkItem::Stream { file } | WorkItem::Open { file, .. } => file.size / 1024,
            };
        }
    });
    balance(&resources, workers)
}

/// Assigns each load to one of `workers` bins, largest first onto the lightest bin.
fn balance(loads: &[u64], workers: usize) -> Vec<u64> {
    let mut order: Vec<usize> = (0..loads.len()).collect();
    order.sort_by_key(|&t| (std::cmp::Reverse(loads[t]), t));
    let mut bins = vec![0u64; workers.max(1)];
    let mut assigned = vec![0u64; loads.len()];
    for t in order {
        let lightest = (0..bins.len())
            .min_by_key(|&w| (bins[w], w))
            .expect("a bin");
        bins[lightest] += loads[t];
        assigned[t] = lightest as u64;
    }
    assigned
}

/// Makes each worker's row producer (given the worker's index).
pub type ProducerFactory = Arc<dyn Fn(usize) -> Box<dyn RowProducer> + Send + Sync>;

/// How often an idle worker wakes to see whether the run was stopped.
const STOP_CHECK: Duration = Duration::from_millis(50);

/// Stops the run if the worker thread holding it unwinds (a panic outside every operator), so
/// the other workers do not wait for it forever.
struct StopOnUnwind(Arc<RunShared>, usize);

impl Drop for StopOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop.stop(
                StopCause::Worker,
                format!("worker thread {} stopped after an internal error", self.1),
            );
        }
    }
}

/// Runs the dataflow to completion on `engine.workers` threads. A run stopped early (see
/// `engine::stop`) returns its `RunStopped` cause as the error, once every worker has let go.
pub fn run_dataflow(
    shared: Arc<RunShared>,
    engine: &EngineConfig,
    producers: ProducerFactory,
) -> Result<()> {
    panic_guard::install_hook();
    let sinks = Arc::new(sink_workers(&shared, engine.workers));
    let run = shared.clone();
    let guards = timely::execute(engine.timely_config(), move |worker| {
        let shared = shared.clone();
        let _stop_on_unwind = StopOnUnwind(shared.clone(), worker.index());
        build_dataflow(worker, &shared, &sinks, producers(worker.index()));
        panic_guard::inject(Site::Worker, &worker.index().to_string(), 0);
        while worker.has_dataflows() {
            if shared.stop.is_stopped() {
                for dataflow in worker.installed_dataflows() {
                    worker.drop_dataflow(dataflow);
                }
                break;
            }
            worker.step_or_park(Some(STOP_CHECK));
        }
    })
    .map_err(|e| anyhow!("could not start the workers: {e}"))?;
    let died = guards.join().into_iter().any(|r| r.is_err());
    if let Some(stopped) = run.stop.cause() {
        return Err(stopped.into());
    }
    if died {
        return Err(anyhow!("a worker thread stopped after an internal error"));
    }
    Ok(())
}

/// Builds one worker's operators: a source that reads and de-identifies, and a sink that writes
/// the tasks routed to this worker. A panic in either stops the run with what was in hand.
fn build_dataflow(
    worker: &mut timely::worker::Worker,
    shared: &Arc<RunShared>,
    sinks: &Arc<Vec<u64>>,
    producer: Box<dyn RowProducer>,
) {
    let sinks = sinks.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        let source_shared = shared.clone();
        let chunks = source(scope, "ReadAndDeidentify", move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut cap = Some(capability);
            let mut state = SourceState::new(source_shared, producer);
            move |output| {
                let Some(c) = cap.as_mut() else { return };
                let step = panic_guard::catch(|| state.step()).unwrap_or_else(|panic| {
                    let message = format!("{} {panic}", state.in_hand());
                    state.shared_ref().stop.stop(StopCause::Reading, message);
                    Step::Done
                });
                match step {
                    Step::Emit(chunks) => {
                        let mut session = output.session(&*c);
                        for chunk in chunks {
                            session.give(chunk);
                        }
                        drop(session);
                        let next = *c.time() + 1;
                        c.downgrade(&next);
                        activator.activate();
                    }
                    Step::Wait => activator.activate_after(Duration::from_millis(2)),
                    Step::Done => {
                        let report = std::mem::take(&mut state.extensions);
                        state
                            .shared_ref()
                            .report
                            .stats
                            .lock()
                            .unwrap()
                            .extensions
                            .merge(&report);
                        cap = None;
                    }
                }
            }
        })
        .container::<Vec<TableChunk>>();

        let sink_shared = shared.clone();
        chunks.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(move |chunk: &TableChunk| sinks[chunk.task as usize]),
            "WriteTables",
            move |_capability, info| {
                sink_shared.budget.register_sink({
                    let activator = scope.worker().sync_activator_for(info.address.to_vec());
                    move || {
                        let _ = activator.activate();
                    }
                });
                let mut sink = SinkState::new(sink_shared);
                let mut finished = false;
                move |(input, frontier), _output| {
                    if sink.stopped() {
                        input.for_each(|_time, data| data.clear());
                        return;
                    }
                    let result = panic_guard::catch(|| {
                        input.for_each(|_time, data| {
                            for chunk in data.drain(..) {
                                sink.accept(chunk);
                            }
                        });
                        sink.relieve_pressure();
                        if frontier.frontier().is_empty() && !finished {
                            sink.flush_all();
                            sink.write_remaining();
                            finished = true;
                        }
                    });
                    if let Err(panic) = result {
                        sink.stop_after(panic);
                    }
                }
            },
        );
    });
}

/// Rows read per task so far (for progress lines), keyed by table.
pub fn read_by_table(shared: &RunShared) -> BTreeMap<String, u64> {
    let read = shared.report.progress.read.lock().unwrap();
    read.iter()
        .map(|(t, n)| (shared.work.tasks[*t as usize].table.clone(), *n))
        .collect()
}

/// Bytes read so far.
pub fn bytes_read(shared: &RunShared) -> u64 {
    shared.report.progress.bytes_read.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_largest_tasks_go_to_different_workers() {
        // Task ids 0, 6 and 12 are the large ones: by id parity all three met on worker 0.
        let mut loads = vec![1u64; 14];
        loads[0] = 189;
        loads[6] = 382;
        loads[12] = 189;
        loads[3] = 54;
        let sinks = balance(&loads, 2);
        assert_ne!(sinks[0], sinks[6]);
        assert_ne!(sinks[12], sinks[6]);
        let load = |w: u64| -> u64 { (0..14).filter(|&t| sinks[t] == w).map(|t| loads[t]).sum() };
        assert!(load(0).abs_diff(load(1)) <= 54, "{} {}", load(0), load(1));
        assert!(balance(&loads, 1).iter().all(|&w| w == 0));
    }
}
