//! The hand-off between the thread that drives an engine and its timely workers. The workers
//! keep one dataflow for the engine's life; each run given to it is one epoch of that dataflow
//! (timestamps `(epoch, sequence)`). The driver offers an epoch's shared state and producers,
//! the sources read it and move their capabilities to the next epoch, the sinks write what the
//! epoch left once their frontier has passed it, and the driver is told when every worker's
//! sink is done. Epochs do not overlap: the next is offered after the driver has finished the
//! last (a re-run's pre-scan must see what the last epoch committed).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::dataflow::{ProducerFactory, RunShared};
use super::stop::StopCause;

/// One run's work, as the workers see it.
pub struct Epoch {
    pub number: u64,
    pub shared: Arc<RunShared>,
    pub producers: ProducerFactory,
    /// The worker whose sink writes each task (by task index).
    pub sinks: Vec<u64>,
}

/// What a source waiting for `epoch` should do.
pub enum Offer {
    Start(Arc<Epoch>),
    /// Not offered yet: look again shortly.
    NotYet,
    /// The engine is closing: no more epochs.
    Closed,
}

/// How an epoch ended, for the driver.
pub enum Outcome {
    /// Every worker's sink finished it.
    Finished,
    /// The workers exited first (a stopped run, or a worker that died).
    WorkersEnded,
}

#[derive(Default)]
struct State {
    current: Option<Arc<Epoch>>,
    /// Workers whose sink finished the current epoch.
    sinks_finished: usize,
    closed: bool,
    /// Every worker thread has exited.
    ended: bool,
    /// A stop between epochs (a worker thread died), for the next epoch offered.
    stop_between: Option<(StopCause, String)>,
}

/// Shared by the driver and the workers of one engine.
#[derive(Default)]
pub struct Feed {
    state: Mutex<State>,
    changed: Condvar,
}

impl Feed {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Offers the next epoch to the workers.
    pub fn offer(&self, epoch: Arc<Epoch>) {
        let mut state = self.state();
        if let Some((cause, message)) = state.stop_between.take() {
            epoch.shared.stop.stop(cause, message);
        }
        state.current = Some(epoch);
        state.sinks_finished = 0;
        self.changed.notify_all();
    }

    /// What a source waiting for epoch `number` does.
    pub fn offered(&self, number: u64) -> Offer {
        let state = self.state();
        match &state.current {
            Some(epoch) if epoch.number == number => Offer::Start(epoch.clone()),
            _ if state.closed => Offer::Closed,
            _ => Offer::NotYet,
        }
    }

    /// The epoch `number`, if it is the current one (for a sink finishing it).
    pub fn epoch(&self, number: u64) -> Option<Arc<Epoch>> {
        self.state()
            .current
            .clone()
            .filter(|epoch| epoch.number == number)
    }

    /// A worker's sink has written everything of epoch `number`.
    pub fn sink_finished(&self, number: u64) {
        let mut state = self.state();
        if state.current.as_ref().is_some_and(|e| e.number == number) {
            state.sinks_finished += 1;
            self.changed.notify_all();
        }
    }

    /// Waits until every one of `workers` sinks has finished the current epoch, or the workers
    /// have exited.
    pub fn wait(&self, workers: usize) -> Outcome {
        let state = self
            .changed
            .wait_while(self.state(), |s| s.sinks_finished < workers && !s.ended)
            .unwrap_or_else(|p| p.into_inner());
        match state.sinks_finished >= workers {
            true => Outcome::Finished,
            false => Outcome::WorkersEnded,
        }
    }

    /// No more epochs: sources waiting for one let the dataflow end.
    pub fn close(&self) {
        self.state().closed = true;
        self.changed.notify_all();
    }

    /// Every worker thread has exited.
    pub fn workers_ended(&self) {
        self.state().ended = true;
        self.changed.notify_all();
    }

    /// Whether the workers have exited.
    pub fn has_ended(&self) -> bool {
        self.state().ended
    }

    /// Whether the current epoch's run was stopped (the workers then drop the dataflow).
    pub fn is_stopped(&self) -> bool {
        let state = self.state();
        state.stop_between.is_some()
            || state
                .current
                .as_ref()
                .is_some_and(|epoch| epoch.shared.stop.is_stopped())
    }

    /// Stops the current epoch's run, or the next one offered (a worker thread unwinding).
    pub fn stop(&self, cause: StopCause, message: String) {
        let mut state = self.state();
        match state.current.clone() {
            Some(epoch) => {
                drop(state);
                epoch.shared.stop.stop(cause, message);
            }
            None => state.stop_between = Some((cause, message)),
        }
    }
}
