//! Messages between the drivers of a run's processes, carried by the workers' own dataflow
//! (timely's connections, no channel of our own): in a round, each process's driver posts its
//! message for some processes; the round's messages reach each process's first worker, which
//! hands them to its driver once every process has posted (the round's frontier has passed).
//! A cluster run uses rounds to agree on the tables' sink workers, to bring its statistics,
//! warnings and codebook mappings to process 0, and to share its exit code. Every process
//! takes part in every round, in the same order.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::generic::operator::source;

/// One driver's message to one process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Message {
    /// The worker that receives it: the first of its process.
    to: u64,
    /// The process that sent it.
    pub from: u32,
    pub payload: Vec<u8>,
}

#[derive(Default)]
struct State {
    /// Messages this process posted, by round, until its first worker sends them.
    posted: BTreeMap<u64, Vec<Message>>,
    /// Rounds this process has posted.
    rounds_posted: u64,
    /// Messages received, by round, once the round is complete.
    delivered: BTreeMap<u64, Vec<Message>>,
    closed: bool,
    ended: bool,
}

/// The rounds of one process: shared by its driver and its workers.
#[derive(Default)]
pub struct Rounds {
    state: Mutex<State>,
    changed: Condvar,
}

/// Who a message is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Every process.
    All,
    /// Process 0 alone.
    First,
}

impl Rounds {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Posts this process's message of round `round` for `audience`; `threads` workers each
    /// in `processes` processes.
    pub fn post(
        &self,
        round: u64,
        me: usize,
        (threads, processes): (usize, usize),
        to: Audience,
        payload: Vec<u8>,
    ) {
        let targets = match to {
            Audience::All => processes,
            Audience::First => 1,
        };
        let messages = (0..targets)
            .map(|p| Message {
                to: (p * threads) as u64,
                from: me as u32,
                payload: payload.clone(),
            })
            .collect();
        let mut state = self.state();
        state.posted.insert(round, messages);
        state.rounds_posted = state.rounds_posted.max(round + 1);
        self.changed.notify_all();
    }

    /// The messages this process received in `round`, from the processes that sent it one,
    /// in process order; None if the workers ended first.
    pub fn wait(&self, round: u64) -> Option<Vec<Message>> {
        let mut state = self
            .changed
            .wait_while(self.state(), |s| {
                !s.delivered.contains_key(&round) && !s.ended
            })
            .unwrap_or_else(|p| p.into_inner());
        let mut messages = state.delivered.remove(&round)?;
        messages.sort_by_key(|m| m.from);
        Some(messages)
    }

    /// No more rounds.
    pub fn close(&self) {
        self.state().closed = true;
    }

    /// The workers have exited.
    pub fn workers_ended(&self) {
        self.state().ended = true;
        self.changed.notify_all();
    }
}

/// How often a worker between rounds looks for the next one.
const ROUND_CHECK: Duration = Duration::from_millis(5);

/// Builds one worker's part of the rounds: a source that sends what the driver posted (the
/// process's first worker sends, the others only follow the rounds), and a sink that gathers
/// each round's messages and, on a process's first worker, hands them to the driver.
pub fn build(worker: &mut timely::worker::Worker, rounds: &Arc<Rounds>, threads: usize) {
    let first = worker.index().is_multiple_of(threads);
    worker.dataflow::<u64, _, _>(|scope| {
        let posting = rounds.clone();
        let messages = source(scope, "PostRounds", move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut cap = Some(capability);
            let mut round = 0u64;
            move |output| {
                let Some(c) = cap.as_mut() else { return };
                let mut state = posting.state();
                if state.rounds_posted > round {
                    // The process's first worker sends them; the others only follow.
                    if first && let Some(messages) = state.posted.remove(&round) {
                        output.session(&*c).give_iterator(messages.into_iter());
                    }
                    round += 1;
                    c.downgrade(&round);
                    activator.activate();
                } else if state.closed {
                    cap = None;
                } else {
                    activator.activate_after(ROUND_CHECK);
                }
            }
        })
        .container::<Vec<Message>>();
        let delivering = rounds.clone();
        let mut stash: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
        let mut next = 0u64;
        messages.sink(
            Exchange::new(|m: &Message| m.to),
            "DeliverRounds",
            move |(input, frontier)| {
                input.for_each(|time, data| {
                    let round = time.least().copied().unwrap_or_default();
                    stash.entry(round).or_default().append(data);
                });
                if !first {
                    return;
                }
                // A round is complete once every process's source has moved past it.
                let mut state = delivering.state();
                while next < state.rounds_posted && !frontier.less_equal(&next) {
                    let messages = stash.remove(&next).unwrap_or_default();
                    state.delivered.insert(next, messages);
                    next += 1;
                    delivering.changed.notify_all();
                }
            },
        );
    });
}
