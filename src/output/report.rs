//! How a table writer reports a batch back to the caller that holds its rows and memory.
//!
//! Most writers finish a batch before `write_batch` returns. Delta may instead stage a batch on
//! local disk and commit it later together with others (one MERGE for many batches): it then
//! says so first, so the caller can free the batch's memory long before the commit, and, should
//! the commit fail, hands the rows back because the caller no longer has them.

use anyhow::Result;

/// Why a batch was not written. `rows` are the batch's rows as JSON lines when the writer had
/// taken them over (staged them), so they can still go to the errors folder.
pub struct WriteFailure {
    pub error: anyhow::Error,
    pub rows: Option<Vec<Vec<u8>>>,
}

impl From<anyhow::Error> for WriteFailure {
    fn from(error: anyhow::Error) -> Self {
        WriteFailure { error, rows: None }
    }
}

/// A row of the batch that the writer left out because it does not fit the table's schema
/// (the rest of the batch is written; the caller counts and saves this one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfitRow {
    pub row: Vec<u8>,
    pub reason: String,
}

impl UnfitRow {
    /// The rows of `rows` that a decode listed as unfit.
    pub fn from_decode(rows: &[&[u8]], unfit: &[crate::output::columns::Unfit]) -> Vec<UnfitRow> {
        unfit
            .iter()
            .map(|u| UnfitRow {
                row: rows[u.index].to_vec(),
                reason: u.reason.clone(),
            })
            .collect()
    }
}

type Done = Box<dyn FnOnce(Result<(), WriteFailure>) + Send>;
type Unfits = Box<dyn FnOnce(Vec<UnfitRow>) + Send>;

/// The report hooks of one batch: `unfit` and `staged` at most once each, then `done` exactly
/// once (`done(Ok)` covers the batch's other rows). A report
/// dropped unanswered (a writer that panicked, a queue torn down) answers itself with a
/// failure, so the batch's memory is released and its rows reach the errors folder instead of
/// holding the budget for the rest of the run.
pub struct OnWritten {
    staged: Option<Box<dyn FnOnce() + Send>>,
    unfit: Option<Unfits>,
    done: Option<Done>,
}

impl OnWritten {
    /// Hooks that learn only the outcome.
    pub fn new(done: impl FnOnce(Result<(), WriteFailure>) + Send + 'static) -> OnWritten {
        OnWritten {
            staged: None,
            unfit: None,
            done: Some(Box::new(done)),
        }
    }

    /// Adds the hook that takes the rows left out for not fitting the schema (before the
    /// outcome).
    pub fn on_unfit(mut self, unfit: impl FnOnce(Vec<UnfitRow>) + Send + 'static) -> OnWritten {
        self.unfit = Some(Box::new(unfit));
        self
    }

    /// Hands over the rows the writer left out (none: nothing is said).
    pub fn unfit(&mut self, rows: Vec<UnfitRow>) {
        if rows.is_empty() {
            return;
        }
        if let Some(unfit) = self.unfit.take() {
            unfit(rows);
        }
    }

    /// Adds the hook run when the writer has taken the rows over (before the outcome).
    pub fn on_staged(mut self, staged: impl FnOnce() + Send + 'static) -> OnWritten {
        self.staged = Some(Box::new(staged));
        self
    }

    /// Wraps the outcome, e.g. to do more work once the batch is durable; keeps `staged`.
    pub fn then(
        mut self,
        next: impl FnOnce(Result<(), WriteFailure>) -> Result<(), WriteFailure> + Send + 'static,
    ) -> OnWritten {
        let done = self.done.take();
        OnWritten {
            staged: self.staged.take(),
            unfit: self.unfit.take(),
            done: done.map(|done| -> Done { Box::new(move |result| done(next(result))) }),
        }
    }

    /// The writer now holds the rows itself; the caller may free its copy.
    pub fn staged(&mut self) {
        if let Some(staged) = self.staged.take() {
            staged();
        }
    }

    /// The batch is durable (`Ok`) or failed with the caller's rows still in its hands.
    pub fn done(mut self, result: Result<()>) {
        self.answer(result.map_err(WriteFailure::from));
    }

    /// The batch failed after it was staged: its rows come back with the error.
    pub fn failed_with_rows(mut self, error: anyhow::Error, rows: Vec<Vec<u8>>) {
        self.answer(Err(WriteFailure {
            error,
            rows: Some(rows),
        }));
    }

    fn answer(&mut self, result: Result<(), WriteFailure>) {
        if let Some(done) = self.done.take() {
            done(result);
        }
    }
}

impl Drop for OnWritten {
    fn drop(&mut self) {
        // Dropped by a writer that panicked: the panic is the reason (and stops the run).
        let error = match crate::panic_guard::unwinding() {
            Some(panic) => anyhow::Error::new(panic),
            None => anyhow::anyhow!("the table writer stopped before reporting this batch"),
        };
        self.answer(Err(WriteFailure::from(error)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn staged_runs_once_before_done_and_then_keeps_it() {
        let log = Arc::new(Mutex::new(Vec::<String>::new()));
        let (a, b, c) = (log.clone(), log.clone(), log.clone());
        let mut report = OnWritten::new(move |r| {
            a.lock().unwrap().push(format!(
                "done {}",
                r.err().map(|f| f.error.to_string()).unwrap_or_default()
            ))
        })
        .on_staged(move || b.lock().unwrap().push("staged".into()))
        .then(move |r| {
            c.lock().unwrap().push("then".into());
            r.and(Err(anyhow::anyhow!("late").into()))
        });
        report.staged();
        report.staged();
        report.done(Ok(()));
        assert_eq!(*log.lock().unwrap(), ["staged", "then", "done late"]);
    }

    #[test]
    fn a_report_dropped_unanswered_reports_a_failure_once() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        let report = OnWritten::new(move |r| {
            g.lock()
                .unwrap()
                .push(r.err().map(|f| f.error.to_string()).unwrap_or_default())
        });
        drop(report);
        assert_eq!(
            *got.lock().unwrap(),
            ["the table writer stopped before reporting this batch"]
        );
        let g = got.clone();
        OnWritten::new(move |_| g.lock().unwrap().push("answered".into())).done(Ok(()));
        assert_eq!(
            got.lock().unwrap().len(),
            2,
            "an answered report says nothing more"
        );
    }

    #[test]
    fn failed_rows_reach_the_caller() {
        let got = Arc::new(Mutex::new(None));
        let g = got.clone();
        let report = OnWritten::new(move |r| *g.lock().unwrap() = r.err().and_then(|f| f.rows));
        report.failed_with_rows(anyhow::anyhow!("merge failed"), vec![b"{}".to_vec()]);
        assert_eq!(*got.lock().unwrap(), Some(vec![b"{}".to_vec()]));
    }
}
