//! What a cluster run's processes share besides the dataflow (`docs/cluster.md`): each reads
//! its share of the input files; each finishes the tables its workers wrote; process 0 gathers
//! every process's statistics and codebook mappings, writes the completion rows, the summaries
//! and the codebook, and prints the summary; every process exits with the run's exit code.

use serde::{Deserialize, Serialize};

use crate::deid::{Codebook, ExtensionReport};
use crate::engine::report::RunStats;
use crate::engine::rows::SkipReason;
use crate::engine::{Audience, Engine};
use crate::exit::{ExitCode, Fatal, one_line};
use crate::input::bundles::WorkItem;
use crate::output::job::TableSummary;

/// This process's share of the planned bundles: in plan order, each bundle to the process
/// with the fewest bytes so far (the same on every process, which all plan the same input). A
/// file is cut between processes by bundles, so each process gets a mix of every resource type,
/// as a worker of one process does: by whole files, the cheapest types to process (large notes)
/// made one process finish in half the time of the other.
pub fn share_of(work: Vec<WorkItem>, process: usize, processes: usize) -> Vec<WorkItem> {
    let bytes: Vec<u64> = work.iter().map(WorkItem::bytes).collect();
    let mine = shares(&bytes, processes);
    work.into_iter()
        .zip(mine)
        .filter(|(_, owner)| *owner == process)
        .map(|(item, _)| item)
        .collect()
}

/// The process of each of `weights`, in order, to the one with the least weight so far.
fn shares(weights: &[u64], processes: usize) -> Vec<usize> {
    let mut totals = vec![0u64; processes.max(1)];
    weights
        .iter()
        .map(|w| {
            let lightest = (0..totals.len())
                .min_by_key(|&p| (totals[p], p))
                .expect("a process");
            totals[lightest] += (*w).max(1);
            lightest
        })
        .collect()
}

/// What one process tells process 0 at the end of its share of a run.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ProcessReport {
    pub tables: Vec<TableSummary>,
    pub skipped: Vec<(SkipReason, u64)>,
    pub extensions_dropped: Vec<(String, String, u64)>,
    pub extensions_skipped: Vec<(String, String, u64)>,
    /// Input bytes this process read.
    pub bytes: u64,
    /// Bytes of rows it sent to the other processes, on their way to their tables' sinks.
    pub sent: u64,
    /// Codebook mappings met (PHI: sent to process 0 only, which saves them).
    pub mappings: Vec<(String, String, String)>,
    /// The warnings and errors it printed.
    pub warnings: Vec<String>,
}

impl ProcessReport {
    /// A report of this process's statistics and new mappings.
    pub fn of(
        stats: &RunStats,
        warnings: Vec<String>,
        bytes: u64,
        codebook: &Codebook,
    ) -> ProcessReport {
        let flat = |m: &std::collections::BTreeMap<(String, String), u64>| {
            m.iter()
                .map(|((t, u), n)| (t.clone(), u.clone(), *n))
                .collect()
        };
        ProcessReport {
            tables: stats.tables.values().cloned().collect(),
            skipped: stats.skipped.iter().map(|(r, n)| (*r, *n)).collect(),
            extensions_dropped: flat(&stats.extensions.dropped),
            extensions_skipped: flat(&stats.extensions.skipped_modifiers),
            bytes,
            sent: crate::engine::dataflow::row_bytes_sent(),
            mappings: codebook.take_new_mappings(),
            warnings,
        }
    }

    /// Adds this report's counts into `stats` and prints its warnings (they were printed
    /// where they happened, and are gathered here); returns its bytes read and sent.
    pub fn merge_into(
        self,
        (process, stats): (usize, &mut RunStats),
        codebook: &Codebook,
    ) -> Result<(u64, u64), Fatal> {
        if !self.warnings.is_empty() {
            crate::say!("Warnings of process {process}:");
            for line in &self.warnings {
                crate::say!("  {line}");
            }
        }
        for table in self.tables {
            let summary = stats.summary(&table.label);
            summary.attempt += table.attempt;
            summary.success += table.success;
            summary.had_errors |= table.had_errors;
        }
        for (reason, n) in self.skipped {
            *stats.skipped.entry(reason).or_default() += n;
        }
        let mut extensions = ExtensionReport::default();
        for (t, u, n) in self.extensions_dropped {
            extensions.dropped.insert((t, u), n);
        }
        for (t, u, n) in self.extensions_skipped {
            extensions.skipped_modifiers.insert((t, u), n);
        }
        stats.extensions.merge(&extensions);
        codebook
            .add_mappings(self.mappings)
            .map_err(|e| Fatal::new(ExitCode::Failure, one_line(&e)))?;
        Ok((self.bytes, self.sent))
    }
}

/// Sends this process's report to process 0; there, returns every other process's, with its
/// number.
pub fn gather(
    engine: &mut Engine,
    report: &ProcessReport,
) -> Result<Vec<(usize, ProcessReport)>, Fatal> {
    let failed = |e: anyhow::Error| {
        Fatal::new(
            ExitCode::Failure,
            format!(
                "the processes of the run could not gather: {}",
                one_line(&e)
            ),
        )
    };
    let payload = serde_json::to_vec(report).map_err(|e| failed(e.into()))?;
    let (me, _) = engine.process();
    let received = engine.exchange(Audience::First, payload).map_err(failed)?;
    received
        .into_iter()
        .filter(|(from, _)| *from != me)
        .map(|(from, payload)| {
            let report = serde_json::from_slice(&payload).map_err(|e| failed(e.into()))?;
            Ok((from, report))
        })
        .collect()
}

/// The run's exit code, agreed by every process: the first process's that did not succeed
/// (process order), or success. `mine` is this process's outcome.
pub fn agree(engine: &mut Engine, mine: &Result<ExitCode, Fatal>) -> Result<ExitCode, Fatal> {
    let code = match mine {
        Ok(code) => *code as i32,
        Err(fatal) => fatal.code as i32,
    };
    let answers = engine
        .exchange(Audience::All, code.to_string().into_bytes())
        .map_err(|e| Fatal::new(ExitCode::Failure, one_line(&e)))?;
    let codes: Vec<i32> = answers
        .iter()
        .filter_map(|(_, a)| std::str::from_utf8(a).ok()?.parse().ok())
        .collect();
    Ok(codes
        .into_iter()
        .find(|&c| c != ExitCode::Success as i32)
        .and_then(ExitCode::from_code)
        .unwrap_or(ExitCode::Success))
}

/// Opens the codebook of a cluster run: process 0 opens (or creates) it and checks the output
/// folder, then tells the others, which open it as followers (process 0 writes it). The salt is
/// read by each process from the shared PHI folder, never sent between them.
pub fn open_codebook(
    engine: &mut Engine,
    phi: &crate::store::ObjectLocation,
    output: &crate::store::ObjectLocation,
    format: crate::output::OutputFormat,
) -> Result<std::sync::Arc<Codebook>, Fatal> {
    let (me, _) = engine.process();
    let round_failed = |e: anyhow::Error| {
        Fatal::new(
            ExitCode::Failure,
            format!(
                "the processes of the run could not start together: {}",
                one_line(&e)
            ),
        )
    };
    if me == 0 {
        let opened = super::open_codebook(phi, output, true).and_then(|codebook| {
            super::prepare_output(output, format)?;
            codebook.save()?;
            Ok(codebook)
        });
        let status = match &opened {
            Ok(_) => String::new(),
            Err(fatal) => fatal.message.clone(),
        };
        engine
            .exchange(Audience::All, status.into_bytes())
            .map_err(round_failed)?;
        return opened;
    }
    let answers = engine
        .exchange(Audience::All, Vec::new())
        .map_err(round_failed)?;
    if let Some((_, status)) = answers.iter().find(|(from, _)| *from == 0)
        && !status.is_empty()
    {
        return Err(Fatal::new(
            ExitCode::Failure,
            format!(
                "process 0 could not open the codebook or the output: {}",
                String::from_utf8_lossy(status)
            ),
        ));
    }
    let codebook = super::open_codebook(phi, output, true)?;
    codebook.follow();
    Ok(codebook)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundles_go_in_order_to_the_process_with_the_fewest_bytes() {
        let owners = shares(&[500, 10, 300, 300, 90, 0, 100], 3);
        assert_eq!(owners, [0, 1, 2, 1, 2, 1, 1]);
        let totals: Vec<u64> = (0..3)
            .map(|p| {
                owners
                    .iter()
                    .zip([500, 10, 300, 300, 90, 0, 100])
                    .filter(|(o, _)| **o == p)
                    .map(|(_, w)| w)
                    .sum()
            })
            .collect();
        assert_eq!(totals, [500, 410, 390]);
        assert!(shares(&[1, 2, 3], 1).iter().all(|&p| p == 0));
    }
}
