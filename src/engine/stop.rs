//! Stopping a run early, on every worker at once. A panic that escapes the per-line work (in a
//! source, a sink, a table writer, a committer, or a worker thread itself) stops the run: the
//! first cause is kept, sources stop reading, and every worker drops its dataflow instead of
//! waiting for progress that a dead peer will never send. The caller then finishes what was
//! already handed to the writers and exits with an error that names the file or the table.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// What the run was doing when it stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopCause {
    /// Reading or de-identifying input (outside a single line).
    Reading,
    /// Writing or committing a table.
    Writing,
    /// A worker thread died outside every operator.
    Worker,
    /// Another process of a cluster run stopped, or the network to it failed.
    Connection,
}

/// Why a run stopped before its input was done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunStopped {
    pub cause: StopCause,
    pub message: String,
}

impl std::fmt::Display for RunStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RunStopped {}

/// The run-wide stop flag and its first cause.
#[derive(Debug, Default)]
pub struct StopSignal {
    stopped: AtomicBool,
    first: Mutex<Option<RunStopped>>,
}

impl StopSignal {
    /// Stops the run. The first cause is printed and reported; later ones are its consequences.
    pub fn stop(&self, cause: StopCause, message: String) {
        let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            crate::say!("error: {message}; stopping the run");
            *first = Some(RunStopped { cause, message });
        }
        self.stopped.store(true, Ordering::Release);
    }

    /// Whether the run has been stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The first cause, if the run was stopped.
    pub fn cause(&self) -> Option<RunStopped> {
        self.first.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_is_kept() {
        let signal = StopSignal::default();
        assert!(!signal.is_stopped() && signal.cause().is_none());
        signal.stop(StopCause::Writing, "writing table condition: boom".into());
        signal.stop(StopCause::Worker, "a worker thread stopped".into());
        assert!(signal.is_stopped());
        assert_eq!(
            signal.cause(),
            Some(RunStopped {
                cause: StopCause::Writing,
                message: "writing table condition: boom".into()
            })
        );
    }
}
