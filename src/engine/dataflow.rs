//! Builds and runs the timely dataflow: on every worker a source operator (read, de-identify)
//! and a sink operator; chunks are exchanged so each task's rows meet at one sink, which writes
//! that task's tables serially.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Result, anyhow};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::generic::operator::source;

use super::config::EngineConfig;
use super::control::{self, Audience, Rounds};
use super::epochs::{Epoch, Feed, Offer, Outcome};
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
                &crate::output::RowBatch::of_rows(Vec::new(), &crate::fhir::Shape::default()),
            )?;
            self.report.stats.lock().unwrap().summary(table);
        }
        Ok(())
    }
}

/// How much each task has to write, to choose the worker whose sink writes it (`balance`).
/// Sinks write their tasks serially, so tasks are spread by their number of resources, largest
/// first onto the least loaded worker. Routing by task id had put the three largest tables of a
/// Synthea export on one worker, which then wrote alone at the end of the run. Input bytes
/// were the next measure, but notes lose their attachments: by bytes, the notes (382 MB in, 164
/// MB out of 1 GB) had a worker to themselves while the other wrote twice as much. A slice's
/// lines are counted as it is read, so until then they are estimated from the lines sampled
/// when its file was cut (`LineSample`: the main thread must not read input while the workers
/// wait for this).
fn task_loads(shared: &RunShared) -> Vec<u64> {
    let mut resources = vec![0u64; shared.work.tasks.len()];
    shared.work.for_each(|item| {
        if let Some(ctx) = shared.work.task_for(&item.file().resource_type) {
            resources[ctx.task as usize] += match item {
                WorkItem::Slice { mapped, slice, .. } => mapped.estimated_newlines(*slice),
                // Not counted before it is read: about a kilobyte per resource.
                WorkItem::Stream { file } | WorkItem::Open { file, .. } => file.size / 1024,
            };
        }
    });
    resources
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

/// How often a source between epochs looks for the next one.
const EPOCH_CHECK: Duration = Duration::from_millis(5);

/// Stops the current run if the worker thread holding it unwinds (a panic outside every
/// operator), so the other workers do not wait for it forever.
struct StopOnUnwind(Arc<Feed>, usize);

impl Drop for StopOnUnwind {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.stop(
                StopCause::Worker,
                format!("worker thread {} stopped after an internal error", self.1),
            );
        }
    }
}

/// Timely workers running one dataflow for their whole life, to which runs are given one after
/// the other, each as an epoch (`engine::epochs`): `etl --watch` loads every export through the
/// same workers and operators. A run that stops early ends the workers; start another engine.
/// In a cluster run every process has one, and their drivers exchange messages in rounds
/// (`engine::control`).
pub struct Engine {
    feed: Arc<Feed>,
    rounds: Arc<Rounds>,
    /// Worker threads in this process.
    workers: usize,
    /// This process's index, and how many processes run.
    process: usize,
    processes: usize,
    next_epoch: u64,
    next_round: u64,
    /// The worker whose sink wrote each task in the last run.
    sinks: Vec<u64>,
    /// Joins the worker threads, then tells the feed; yields whether one of them died.
    joiner: Option<std::thread::JoinHandle<bool>>,
}

impl Engine {
    /// Starts the workers (in a cluster run, once every process is connected), waiting for
    /// their first epoch.
    pub fn start(config: &EngineConfig) -> Result<Engine> {
        panic_guard::install_hook();
        let feed = Arc::new(Feed::default());
        let rounds = Arc::new(Rounds::default());
        let threads = config.workers.max(1);
        let (process, processes) = config.process();
        let (allocators, connections) = config.allocators()?;
        let (worker_feed, worker_rounds) = (feed.clone(), rounds.clone());
        let guards = timely::execute::execute_from(
            allocators,
            connections,
            timely::WorkerConfig::default(),
            move |worker| {
                let feed = worker_feed.clone();
                let _stop_on_unwind = StopOnUnwind(feed.clone(), worker.index());
                build_dataflow(worker, &feed, threads);
                control::build(worker, &worker_rounds, threads);
                panic_guard::inject(Site::Worker, &worker.index().to_string(), || 0);
                while worker.has_dataflows() {
                    if feed.is_stopped() {
                        for dataflow in worker.installed_dataflows() {
                            worker.drop_dataflow(dataflow);
                        }
                        break;
                    }
                    worker.step_or_park(Some(STOP_CHECK));
                }
            },
        )
        .map_err(|e| anyhow!("could not start the workers: {e}"))?;
        // A lost connection to another process stops the run, rather than leave the workers
        // waiting for progress that process will never send.
        let watched = Arc::downgrade(&feed);
        panic_guard::on_connection_lost(move |message| {
            if let Some(feed) = watched.upgrade() {
                feed.stop(StopCause::Connection, message.to_string());
            }
        });
        let (joiner_feed, joiner_rounds) = (feed.clone(), rounds.clone());
        let joiner = std::thread::spawn(move || {
            // Joining panics when a connection's thread did (a lost process): the workers are
            // gone all the same.
            let joined = panic_guard::catch(|| guards.join().into_iter().any(|r| r.is_err()));
            joiner_feed.workers_ended();
            joiner_rounds.workers_ended();
            joined.unwrap_or(true)
        });
        Ok(Engine {
            feed,
            rounds,
            workers: threads,
            process,
            processes,
            next_epoch: 0,
            next_round: 0,
            sinks: Vec::new(),
            joiner: Some(joiner),
        })
    }

    /// The number the next run's epoch gets (runs are numbered from 0).
    pub fn next_epoch(&self) -> u64 {
        self.next_epoch
    }

    /// This process's index in a cluster run, and how many processes run (0 and 1 alone).
    pub fn process(&self) -> (usize, usize) {
        (self.process, self.processes)
    }

    /// Whether this process's workers wrote task `task` in the last run (its sink worker is
    /// one of them): the tasks whose tables this process finishes.
    pub fn wrote_task(&self, task: usize) -> bool {
        self.sinks
            .get(task)
            .is_some_and(|&w| w as usize / self.workers == self.process)
    }

    /// Whether the workers can take another run (they exit after a run that stopped early).
    pub fn is_running(&self) -> bool {
        !self.feed.has_ended()
    }

    /// Sends `payload` to `audience` and returns what this process received in the same
    /// round, from each process that sent it something (process, payload), in process order.
    /// Every process must call it as often, in the same order.
    pub fn exchange(
        &mut self,
        audience: Audience,
        payload: Vec<u8>,
    ) -> Result<Vec<(usize, Vec<u8>)>> {
        let round = self.next_round;
        self.next_round += 1;
        let layout = (self.workers, self.processes);
        self.rounds
            .post(round, self.process, layout, audience, payload);
        let received = self
            .rounds
            .wait(round)
            .ok_or_else(|| anyhow!("the workers stopped before the other processes answered"))?;
        Ok(received
            .into_iter()
            .map(|m| (m.from as usize, m.payload))
            .collect())
    }

    /// Runs one run to its end, as the next epoch. A run stopped early (see `engine::stop`)
    /// returns its `RunStopped` cause as the error, once every worker has let go; so does a run
    /// given to workers that had stopped before it (a worker thread that died between runs).
    /// In a cluster run, each process gives the engine its share of the input, and the tasks'
    /// sink workers are chosen from the loads of all of them.
    pub fn run(&mut self, shared: Arc<RunShared>, producers: ProducerFactory) -> Result<()> {
        let number = self.next_epoch;
        self.next_epoch += 1;
        let mut loads = task_loads(&shared);
        if self.processes > 1 {
            // Every process's loads, this one's included, summed the same way everywhere.
            let all = self.exchange(Audience::All, serde_json::to_vec(&loads)?)?;
            if all.len() != self.processes {
                return Err(anyhow!(
                    "{} of {} processes sent their loads",
                    all.len(),
                    self.processes
                ));
            }
            let mut total = vec![0u64; loads.len()];
            for (_, theirs) in all {
                let theirs: Vec<u64> = serde_json::from_slice(&theirs)?;
                if theirs.len() != total.len() {
                    return Err(anyhow!("the processes of the run have different tasks"));
                }
                total.iter_mut().zip(theirs).for_each(|(l, t)| *l += t);
            }
            loads = total;
        }
        let sinks = balance(&loads, self.workers * self.processes);
        self.sinks = sinks.clone();
        self.feed.offer(Arc::new(Epoch {
            number,
            shared: shared.clone(),
            producers,
            sinks,
        }));
        let outcome = self.feed.wait(self.workers);
        if let Some(stopped) = shared.stop.cause() {
            self.join();
            return Err(stopped.into());
        }
        match outcome {
            Outcome::Finished => Ok(()),
            Outcome::WorkersEnded => match self.join() {
                true => Err(anyhow!("a worker thread stopped after an internal error")),
                false => Err(anyhow!("the workers stopped before the run ended")),
            },
        }
    }

    /// Lets the workers end; true if one of them died.
    fn join(&mut self) -> bool {
        self.feed.close();
        self.rounds.close();
        self.joiner
            .take()
            .map(|joiner| joiner.join().unwrap_or(true))
            .unwrap_or(false)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.join();
    }
}

/// Bytes of rows this process's sources sent to sinks in other processes of a cluster run.
static ROW_BYTES_SENT: AtomicU64 = AtomicU64::new(0);

/// Bytes of rows this process has sent to other processes of a cluster run so far (the rows,
/// ids and tags of the chunks; timely adds its headers).
pub fn row_bytes_sent() -> u64 {
    ROW_BYTES_SENT.load(Ordering::Relaxed)
}

/// Timestamps are `epoch << EPOCH_SHIFT | sequence`: a source's sequence counts its outputs
/// within the epoch (far fewer than 2^40), and the next epoch starts above every one of them.
const EPOCH_SHIFT: u32 = 40;

fn epoch_start(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT
}

fn epoch_of(time: u64) -> u64 {
    time >> EPOCH_SHIFT
}

/// Runs one run on workers of its own, to its end (see [`Engine::run`]).
pub fn run_dataflow(
    shared: Arc<RunShared>,
    engine: &EngineConfig,
    producers: ProducerFactory,
) -> Result<()> {
    Engine::start(engine)?.run(shared, producers)
}

/// Builds one worker's operators: a source that reads and de-identifies, and a sink that writes
/// the tasks routed to this worker, for every epoch the feed offers. A panic in either stops
/// the run with what was in hand.
fn build_dataflow(worker: &mut timely::worker::Worker, feed: &Arc<Feed>, threads: usize) {
    let index = worker.index();
    worker.dataflow::<u64, _, _>(|scope| {
        let source_feed = feed.clone();
        let chunks = source(scope, "ReadAndDeidentify", move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut cap = Some(capability);
            let mut epoch = 0;
            let mut reading: Option<(SourceState, Arc<Epoch>)> = None;
            move |output| {
                let Some(c) = cap.as_mut() else { return };
                if reading.is_none() {
                    match source_feed.offered(epoch) {
                        Offer::Start(offered) => {
                            let producer = (offered.producers)(index);
                            let state = SourceState::new(offered.shared.clone(), producer);
                            reading = Some((state, offered));
                        }
                        Offer::NotYet => return activator.activate_after(EPOCH_CHECK),
                        Offer::Closed => {
                            cap = None;
                            return;
                        }
                    }
                }
                let (state, offered) = reading.as_mut().expect("an epoch in hand");
                let step = panic_guard::catch(|| state.step()).unwrap_or_else(|panic| {
                    let message = format!("{} {panic}", state.in_hand());
                    state.shared_ref().stop.stop(StopCause::Reading, message);
                    Step::Done
                });
                match step {
                    Step::Emit(chunks) => {
                        let mut session = output.session(&*c);
                        for mut chunk in chunks {
                            chunk.sink = offered.sinks[chunk.task as usize];
                            if chunk.sink as usize / threads != index / threads {
                                // Its memory is given back here once sent, and counted where
                                // it arrives: a budget is one process's.
                                ROW_BYTES_SENT.fetch_add(chunk.wire_bytes(), Ordering::Relaxed);
                                offered.shared.budget.release(chunk.reserved);
                                chunk.crossing = true;
                            }
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
                        reading = None;
                        epoch += 1;
                        c.downgrade(&epoch_start(epoch));
                        activator.activate();
                    }
                }
            }
        })
        .container::<Vec<TableChunk>>();

        let sink_feed = feed.clone();
        chunks.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
            Exchange::new(|chunk: &TableChunk| chunk.sink),
            "WriteTables",
            move |_capability, info| {
                let activator = scope.worker().sync_activator_for(info.address.to_vec());
                // The epoch this sink finishes next, and its state once rows of it arrived.
                let mut epoch = 0;
                let mut sink: Option<SinkState> = None;
                let open = move |number: u64| {
                    let offered = sink_feed.epoch(number)?;
                    let activator = activator.clone();
                    offered.shared.budget.register_sink(move || {
                        let _ = activator.activate();
                    });
                    Some(SinkState::new(offered.shared.clone()))
                };
                let feed = feed.clone();
                move |(input, frontier), _output| {
                    if sink.as_ref().is_some_and(SinkState::stopped) {
                        input.for_each(|_time, data| data.clear());
                        return;
                    }
                    let result = panic_guard::catch(|| {
                        input.for_each(|time, data| {
                            if sink.is_none() {
                                sink = open(time.least().map_or(epoch, |t| epoch_of(*t)));
                            }
                            let Some(sink) = sink.as_mut() else {
                                return data.clear();
                            };
                            for chunk in data.drain(..) {
                                sink.accept(chunk);
                            }
                        });
                        if let Some(sink) = sink.as_mut() {
                            sink.relieve_pressure();
                        }
                        // Every source has moved past the epoch: write what is left of it.
                        while !frontier
                            .frontier()
                            .less_equal(&(epoch_start(epoch + 1) - 1))
                        {
                            let Some(mut finishing) = sink.take().or_else(|| open(epoch)) else {
                                break;
                            };
                            finishing.flush_all();
                            finishing.write_remaining();
                            feed.sink_finished(epoch);
                            epoch += 1;
                        }
                    });
                    if let Err(panic) = result
                        && let Some(sink) = sink.as_mut()
                    {
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
