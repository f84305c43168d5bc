//! The ETL's use of the row index (`crate::rerun`): before the dataflow, each Delta table with
//! an index that describes its current version has its input pre-scanned, and the lines whose
//! rows are unchanged are left out; during it, the producer tags each row with its entry,
//! which the commits journal; after the tables are finished, each table's index is rewritten
//! from the journals for the version the run left it at, or removed when the run cannot vouch
//! for the table's rows.
//!
//! Each append and MERGE also journals the tags of the rows it commits, so that a run that
//! stops early can be restarted from them (`table.rs`); a batch of keys new to the table is
//! appended ([`bundle::BundleIndex::is_new_key`]).
//!
//! Only Delta output from NDJSON input keeps an index: the other formats write into an empty
//! folder, and an i2b2 export's lines are made by the tool from CSV rows.

mod bundle;
mod table;

pub use bundle::BundleIndex;
use table::{IndexedTable, remove};

use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::deid::Codebook;
use crate::engine::RunShared;
use crate::exit::one_line;
use crate::input::InputFile;
use crate::input::bundles::WorkItem;
use crate::memory::HeldMemory;
use crate::output::delta::{CommitsSince, FinishedTable};
use crate::rerun::RowFingerprints;
use crate::rerun::index;
use crate::rerun::journals::replayed;
use crate::rerun::prescan::{Compared, Expect, ScanInput, scan};
use crate::rerun::skip::{LineSet, SkipLines};
use crate::store::ObjectLocation;
use crate::tasks::{COMPLETION_ENCOUNTERS_TABLE, Task};

/// The run's row indexes: what the pre-scan left out, and what the run wrote.
pub struct RerunIndex {
    fingerprints: RowFingerprints,
    tag: u128,
    /// The indexed tables: the tasks' (by task number), then `etl__completion_encounters`.
    tables: Vec<IndexedTable>,
    /// The completion table's place in `tables`, and the value its entries have for this
    /// export's group.
    completion: Option<(usize, u128)>,
    /// Lines whose row is unchanged.
    skip: SkipLines,
    /// Encounter lines whose completion row for this export's group is in the table.
    completed: SkipLines,
    /// Lines whose key is in no row of the table, nor on another line of the export.
    new_keys: SkipLines,
}
/// The secret the fingerprints are keyed with: derived from the codebook's salt (so as private
/// as it, and new with it), and unlike the anonymous ids not a keyed hash of some id.
fn secret(codebook: &Codebook) -> [u8; 32] {
    codebook.secret_for("cumulus-etl row index")
}

/// How the Delta commits of a run with this codebook write row journals: under the row index
/// tag ([`RowFingerprints::tag`]), with the keys' fingerprints.
pub fn row_journal(codebook: &Codebook) -> crate::output::delta::RowJournal {
    let keys = RowFingerprints::from_secret(&secret(codebook));
    crate::output::delta::RowJournal {
        tag: keys.tag(),
        keys,
    }
}

impl RerunIndex {
    /// Opens the indexes of the tasks' tables (their writers open them), and of the completion
    /// table when a task tracks encounters for the export's `group`, and pre-scans the input
    /// of each task that has a usable one on `threads` threads.
    pub fn prepare(
        shared: &RunShared,
        output: &ObjectLocation,
        tasks: &[Task],
        (files, planned): (&[InputFile], &[WorkItem]),
        codebook: &Codebook,
        (threads, group): (usize, &str),
    ) -> Result<RerunIndex> {
        let fingerprints = RowFingerprints::from_secret(&secret(codebook));
        let tag = fingerprints.tag();
        let memory = usize::try_from(shared.budget.limit() / 4).unwrap_or(usize::MAX);
        let (mut skip, mut completed) = (SkipLines::default(), SkipLines::default());
        let (mut new_keys, mut no_new_keys) = (SkipLines::default(), SkipLines::default());
        let mut tables = Vec::with_capacity(tasks.len() + 1);
        let mut readers = Vec::with_capacity(tasks.len());
        for (task, ctx) in tasks.iter().zip(&shared.work.tasks) {
            drop(shared.open_writer(&task.name, ctx)?);
            let (mut table, mut reader) = IndexedTable::open(shared, output, &task.name, tag)?;
            if !table.complete {
                // A table written by another tool or writer: its keys from its rows, so that
                // new keys are known for new (and appended), and the index saved lists them.
                reader = table.complete_from_rows(shared, reader, &fingerprints, (tag, memory));
            }
            tables.push(table);
            readers.push(reader);
        }
        let completion_value = fingerprints.line(group.as_bytes());
        let mut completion = None;
        let mut completion_reader = None;
        if let Some((_, ctx)) = tasks
            .iter()
            .zip(&shared.work.tasks)
            .find(|(t, _)| t.tracks_encounters)
        {
            drop(shared.open_writer(COMPLETION_ENCOUNTERS_TABLE, ctx)?);
            let (table, reader) =
                IndexedTable::open(shared, output, COMPLETION_ENCOUNTERS_TABLE, tag)?;
            completion = Some((tables.len(), completion_value));
            completion_reader = reader;
            tables.push(table);
        }
        if readers.iter().any(Option::is_some) || completion_reader.is_some() {
            crate::say!("Comparing the input with the tables' row indexes...");
        }
        for (number, (task, reader)) in tasks.iter().zip(readers).enumerate() {
            let mut compared = Vec::new();
            let mut skips: Vec<(&mut SkipLines, &mut SkipLines)> = Vec::new();
            let mut slots = Vec::new();
            if let Some(reader) = reader {
                let complete = reader.complete;
                compared.push(Compared {
                    entries: reader,
                    expect: Expect::SameLine,
                    complete,
                });
                skips.push((&mut skip, &mut new_keys));
                slots.push(number);
            }
            if task.tracks_encounters
                && let (Some(reader), Some((slot, value))) = (completion_reader.take(), completion)
            {
                // Keyed by encounter and group, the completion table's index is not a key set
                // of its rows: no new keys from it.
                compared.push(Compared {
                    entries: reader,
                    expect: Expect::Value(value),
                    complete: false,
                });
                skips.push((&mut completed, &mut no_new_keys));
                slots.push(slot);
            }
            if compared.is_empty() {
                continue;
            }
            let started = Instant::now();
            let task_files: Vec<InputFile> = files
                .iter()
                .filter(|f| f.resource_type == task.resource)
                .cloned()
                .collect();
            let planned = planned
                .iter()
                .filter(|item| item.file().resource_type == task.resource)
                .map(WorkItem::duplicate)
                .collect();
            let input = ScanInput {
                resource_type: &task.resource,
                files: &task_files,
                codebook,
                fingerprints: &fingerprints,
            };
            let counts = scan((&input, planned), compared, threads, memory, &mut skips)
                .with_context(|| format!("pre-scanning the input of {}", task.name))?;
            let found = counts.unchanged.iter().zip(&counts.new_keys);
            for (slot, (unchanged, new)) in slots.into_iter().zip(found) {
                let new = match new {
                    0 => String::new(),
                    n => format!(", {n} new"),
                };
                crate::say!(
                    "  {}: {unchanged} of {} rows unchanged since the last run, left out{new} ({:.1} s)",
                    tables[slot].name,
                    counts.lines,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let held = HeldMemory::default();
        held.set(skip.heap_bytes() + completed.heap_bytes() + new_keys.heap_bytes());
        shared.budget.count_held("re-run index", held);
        Ok(RerunIndex {
            fingerprints,
            tag,
            tables,
            completion,
            skip,
            completed,
            new_keys,
        })
    }

    /// The index's part in processing one bundle of `file` for task `task`.
    pub fn bundle<'a>(&'a self, task: u32, file: &str) -> BundleIndex<'a> {
        BundleIndex {
            index: self,
            task,
            skip: self.skip.file(file),
            completed: self.completed.file(file),
            new_keys: self.new_keys.file(file),
            unchanged: 0,
            completions_known: 0,
        }
    }

    /// Whether every line of `lines` of `path` (task `task`) is left out, completion rows
    /// included when the task tracks encounters; if so, they are counted as left out, and the
    /// bundle need not be read. `lines` is called only for a file with lines left out.
    pub fn leaves_out_all(
        &self,
        task: u32,
        path: &str,
        lines: &dyn Fn() -> std::ops::Range<u64>,
        tracks_encounters: bool,
    ) -> bool {
        // The completion rows' set, where the task has them (None: a file with none left out).
        let completed = match tracks_encounters {
            true => self.completed.file(path).map(Some),
            false => Some(None),
        };
        let (Some(skip), Some(completed)) = (self.skip.file(path), completed) else {
            return false;
        };
        let lines = lines();
        let all = |set: &LineSet| set.contains_all(lines.clone());
        if lines.is_empty() || !all(skip) || completed.is_some_and(|c| !all(c)) {
            return false;
        }
        let count = lines.end - lines.start;
        self.tables[task as usize]
            .unchanged
            .fetch_add(count, Ordering::Relaxed);
        if let (true, Some((slot, _))) = (tracks_encounters, self.completion) {
            self.tables[slot]
                .unchanged
                .fetch_add(count, Ordering::Relaxed);
        }
        true
    }

    /// Rows of the table `table` left out as unchanged.
    pub fn unchanged(&self, table: &str) -> u64 {
        self.tables
            .iter()
            .find(|t| t.name == table)
            .map_or(0, |t| t.unchanged.load(Ordering::Relaxed))
    }

    /// Rewrites each table's index for the version the run left it at: the index it started
    /// from, replayed with the row journals of the run's commits (which hold exactly the rows
    /// committed, deletions included). A table another writer committed to during the run, or
    /// with a commit that wrote no journal (delta-rs's MERGE or DELETE), gets none. Failures
    /// are warnings: a table without an index is only processed whole next time.
    ///
    /// Tables are saved on `threads` threads at once, those with the most rows written first
    /// (one large table's index is most of the work).
    pub fn save(&self, shared: &RunShared, threads: usize) {
        let written: Vec<u64> = {
            let stats = shared.report.stats.lock().unwrap();
            let rows = |t: &IndexedTable| stats.tables.get(&t.name).map_or(0, |s| s.success);
            self.tables.iter().map(rows).collect()
        };
        let mut order: Vec<usize> = (0..self.tables.len()).collect();
        order.sort_by_key(|&t| std::cmp::Reverse(written[t]));
        let threads = threads.clamp(1, order.len().max(1));
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    while let Some(&number) = order.get(next.fetch_add(1, Ordering::Relaxed)) {
                        self.save_table(shared, number);
                    }
                });
            }
        });
    }

    /// Rewrites the index of table `number` (`save`).
    fn save_table(&self, shared: &RunShared, number: usize) {
        let table = &self.tables[number];
        let finished = shared.outputs.finished(&table.name);
        let (version, journals) = match finished {
            Some(f) if !f.since_opened.only_this_run => {
                remove(
                    table,
                    Some("another writer committed to the table during the run"),
                );
                return;
            }
            Some(FinishedTable {
                version: Some(version),
                since_opened:
                    CommitsSince {
                        journals: Some(journals),
                        ..
                    },
            }) => (version, journals),
            Some(FinishedTable { version: None, .. }) => return,
            Some(_) => {
                remove(table, Some("a commit of the run wrote no row journal"));
                return;
            }
            None => {
                remove(table, Some("the table was not finished"));
                return;
            }
        };
        if journals.is_empty() && table.usable_at == Some(version) && table.is_stored() {
            // Nothing committed: the index describes the table as it is.
            return;
        }
        let old = match table.usable_at {
            Some(_) => match table.reopen_old(self.tag) {
                Some(reader) => Some(reader),
                None => {
                    remove(table, Some("its old index could not be read again"));
                    return;
                }
            },
            None => None,
        };
        let Ok(Some(readers)) = table.open_journals(&journals, self.tag) else {
            remove(table, Some("a row journal of the run is missing"));
            return;
        };
        // The completion table's index is kept by encounter, not by its rows' keys.
        let complete = table.complete && Some(number) != self.completion.map(|c| c.0);
        let written = replayed(old, readers).map_err(anyhow::Error::from);
        let saved =
            written.and_then(|new| index::write(&table.dir, (self.tag, version, complete), new));
        match saved {
            // The index covers every commit: their journals are no longer needed.
            Ok(_) => table.remove_journals(),
            Err(e) => {
                crate::say!(
                    "warning: the row index of {} was not saved: {}",
                    table.name,
                    one_line(&e)
                );
                remove(table, None);
            }
        }
    }
}
