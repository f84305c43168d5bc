//! The ETL's use of the row index (`crate::rerun`): before the dataflow, each Delta table with
//! an index that describes its current version has its input pre-scanned, and the lines whose
//! rows are unchanged are left out; during it, the producer records the line each row came
//! from; after the tables are finished, each table's index is rewritten for the version the
//! run left it at, or removed when the run could not vouch for the table's rows.
//!
//! Only Delta output from NDJSON input keeps an index: the other formats write into an empty
//! folder, and an i2b2 export's lines are made by the tool from CSV rows.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};

use crate::deid::Codebook;
use crate::engine::RunShared;
use crate::exit::one_line;
use crate::input::InputFile;
use crate::input::bundles::WorkItem;
use crate::memory::HeldMemory;
use crate::output::RowTag;
use crate::rerun::RowFingerprints;
use crate::rerun::index::{self, Entry, INDEX_KEY, IndexReader};
use crate::rerun::journals::replayed;
use crate::rerun::prescan::{Compared, Expect, ScanInput, scan};
use crate::rerun::skip::{LineSet, SkipLines};
use crate::rerun::update::updated;
use crate::spill_sort::{Sorted, SpillSort};
use crate::store::ObjectLocation;
use crate::tasks::{COMPLETION_ENCOUNTERS_TABLE, Task};

/// A written row's record: its task's number, then its index entry.
pub const WRITTEN_BYTES: usize = 4 + index::ENTRY_BYTES;
type Written = [u8; WRITTEN_BYTES];

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
    written: Mutex<SpillSort<WRITTEN_BYTES>>,
    /// Some written row was not recorded (its record could not be stored): no index is saved.
    lost: AtomicBool,
    held: HeldMemory,
}

struct IndexedTable {
    name: String,
    dir: ObjectLocation,
    /// The table's version when the run started, if an index of it could be had.
    usable_at: Option<i64>,
    /// Where that index is: beside the table, or rebuilt from journals into a private folder.
    old: Option<OldIndex>,
    /// The run starts from an index that lists every key of the table (or from no table).
    complete: bool,
    /// Rows left out as unchanged.
    unchanged: AtomicU64,
}

/// The index a run started from.
enum OldIndex {
    /// The table's own, of the version the run opened.
    Stored,
    /// The table's last index (if any) and the row journals of the commits after it, merged
    /// into a private folder (removed with it).
    Rebuilt {
        _folder: tempfile::TempDir,
        location: ObjectLocation,
    },
}

impl IndexedTable {
    /// The table's index if it describes the version the run opened the table at, or can be
    /// rebuilt for it from the row journals of the commits since; says why not otherwise
    /// (nothing when there is none). Rebuilding holds about `memory` bytes.
    fn open(
        shared: &RunShared,
        output: &ObjectLocation,
        name: &str,
        (tag, memory): (u128, usize),
    ) -> Result<(IndexedTable, Option<IndexReader>)> {
        let mut table = IndexedTable {
            name: name.to_string(),
            dir: output.join(name),
            usable_at: None,
            old: None,
            complete: false,
            unchanged: AtomicU64::new(0),
        };
        let Some(version) = shared.outputs.opened_version(name) else {
            // A new table: the index this run leaves lists every key.
            table.complete = true;
            return Ok((table, None));
        };
        let (base, since) = match index::open_file(&table.dir, INDEX_KEY, tag, None)? {
            Ok((reader, at)) if at == version => {
                table.usable_at = Some(version);
                table.old = Some(OldIndex::Stored);
                table.complete = reader.complete;
                return Ok((table, Some(reader)));
            }
            Ok((reader, at)) if at < version => (Some(reader), Some(at)),
            Ok(_) | Err(index::Unusable::OtherTag) => {
                let why =
                    "written under another codebook, tool version or rules, or for another table";
                crate::say!("  {name}: its row index is not used ({why}); every row is processed");
                return Ok((table, None));
            }
            Err(_) => (None, None),
        };
        let journals = match shared.outputs.journals_since(name, since)? {
            Some(journals) if !journals.is_empty() => journals,
            _ => {
                if let Some(at) = since {
                    let why = index::Unusable::OtherVersion(at).reason();
                    crate::say!(
                        "  {name}: its row index is not used ({why}); every row is processed"
                    );
                }
                return Ok((table, None));
            }
        };
        let journal_dir = table.dir.join(index::JOURNAL_DIR);
        let mut readers = Vec::with_capacity(journals.len());
        for journal in &journals {
            match index::open_file(&journal_dir, journal, tag, Some(-1))? {
                Ok((reader, _)) => readers.push(reader),
                Err(_) => {
                    crate::say!(
                        "  {name}: its row index is not used (a commit's row journal is missing); \
                         every row is processed"
                    );
                    return Ok((table, None));
                }
            }
        }
        // Journals since the table's first commit list every key it has; after an index,
        // every key if the index did.
        let complete = base.as_ref().is_none_or(|b| b.complete);
        let temp = tempfile::Builder::new()
            .prefix("cumulus-etl-index-")
            .tempdir()?;
        let location = ObjectLocation::local(temp.path())?;
        let replayed = replayed(base, readers, memory)?;
        index::write(&location, (tag, version, complete), replayed)?;
        let reader = index::open(&location, tag, version)?
            .map_err(|u| anyhow::anyhow!("a rebuilt row index: {}", u.reason()))?;
        crate::say!(
            "  {name}: row index rebuilt from {} commits' journals{}",
            journals.len(),
            since.map_or(String::new(), |at| format!(" after version {at}"))
        );
        table.usable_at = Some(version);
        table.complete = complete;
        table.old = Some(OldIndex::Rebuilt {
            _folder: temp,
            location,
        });
        Ok((table, Some(reader)))
    }

    /// The index the run started from, again.
    fn reopen_old(&self, tag: u128) -> Option<IndexReader> {
        let at = self.usable_at?;
        let location = match self.old.as_ref()? {
            OldIndex::Stored => &self.dir,
            OldIndex::Rebuilt { location, .. } => location,
        };
        index::open(location, tag, at).ok()?.ok()
    }

    /// Removes the row journals of the table's commits, once an index covers them.
    fn remove_journals(&self) {
        let journals = self.dir.join(index::JOURNAL_DIR);
        let Ok(entries) = journals.list() else {
            return;
        };
        for entry in entries {
            if let Err(e) = journals.delete(&entry.key) {
                crate::say!(
                    "warning: could not remove a row journal of {}: {}",
                    self.name,
                    one_line(&e)
                );
            }
        }
    }
}

/// The secret the fingerprints are keyed with: the codebook's own keyed hash of a fixed text,
/// so it is as private as the salt and changes with it.
fn secret(codebook: &Codebook) -> [u8; 32] {
    let hex = codebook.hash("cumulus-etl row index");
    let mut secret = [0u8; 32];
    hex::decode_to_slice(hex, &mut secret).expect("the codebook's hashes are 64 hex digits");
    secret
}

/// The tag row indexes and journals are written under with this codebook (see
/// [`RowFingerprints::tag`]).
pub fn index_tag(codebook: &Codebook) -> u128 {
    RowFingerprints::from_secret(&secret(codebook)).tag()
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
            let (table, reader) = IndexedTable::open(shared, output, &task.name, (tag, memory))?;
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
            let opened = (tag, memory);
            let (table, reader) =
                IndexedTable::open(shared, output, COMPLETION_ENCOUNTERS_TABLE, opened)?;
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
        shared.budget.count_held("re-run index", held.clone());
        Ok(RerunIndex {
            fingerprints,
            tag,
            tables,
            completion,
            skip,
            completed,
            new_keys,
            written: Mutex::new(SpillSort::new(memory / 4)),
            lost: AtomicBool::new(false),
            held,
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
            written: Vec::new(),
            unchanged: 0,
            completions_known: 0,
        }
    }

    /// Whether every line of `lines` of `path` (task `task`) is left out, completion rows
    /// included when the task tracks encounters; if so, they are counted as left out, and the
    /// bundle need not be read.
    pub fn leaves_out_all(
        &self,
        task: u32,
        path: &str,
        lines: std::ops::Range<u64>,
        tracks_encounters: bool,
    ) -> bool {
        let all = |set: &SkipLines| {
            set.file(path)
                .is_some_and(|s| s.contains_all(lines.clone()))
        };
        if lines.is_empty() || !all(&self.skip) || (tracks_encounters && !all(&self.completed)) {
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

    /// Starts sorting the records of the rows the run wrote, on a thread of its own: the
    /// dataflow has ended, and the sort overlaps the tables' maintenance. [`RerunIndex::save`]
    /// takes the result.
    pub fn sort_written(&self) -> std::thread::JoinHandle<std::io::Result<Sorted<WRITTEN_BYTES>>> {
        let written = std::mem::replace(&mut *self.written.lock().unwrap(), SpillSort::new(0));
        let lost = self.lost.load(Ordering::Relaxed);
        std::thread::spawn(move || match lost {
            true => Err(std::io::Error::other(
                "rows were written that it could not record",
            )),
            false => written.finish(),
        })
    }

    /// Rewrites each table's index for the version the run left it at, from the index it
    /// started with, the rows it wrote (`written`, from [`RerunIndex::sort_written`]) and the
    /// ids it deleted (`deleted`, by task number); a table with failed batches or rows left
    /// out gets none. Failures are warnings: a table without an index is only processed whole
    /// next time.
    pub fn save(
        &self,
        shared: &RunShared,
        written: std::thread::JoinHandle<std::io::Result<Sorted<WRITTEN_BYTES>>>,
        deleted: &[Vec<String>],
    ) {
        let stats = shared.report.stats.lock().unwrap();
        let trusted: Vec<bool> = self
            .tables
            .iter()
            .map(|t| {
                let summary = stats.tables.get(&t.name);
                let failed = summary.is_some_and(|s| s.had_errors || s.success < s.attempt);
                !failed && !stats.unfit_tables.contains(&t.name)
            })
            .collect();
        drop(stats);
        let sorted = written
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("sorting its records failed")));
        let mut written = match sorted {
            Ok(sorted) => sorted.peekable(),
            Err(e) => {
                crate::say!("warning: the row indexes were not saved: {e}");
                self.tables.iter().for_each(|t| remove(t, None));
                return;
            }
        };
        for (number, table) in self.tables.iter().enumerate() {
            let task = number as u32;
            let mut rows = std::iter::from_fn(|| {
                let next = written.peek()?;
                match next {
                    Ok(r) if task_of(r) != task => None,
                    _ => written.next().map(|r| r.map(|r| entry_of(&r))),
                }
            });
            let finished = shared.outputs.finished(&table.name);
            let why = match finished {
                _ if !trusted[number] => Some("the run could not write all of its rows"),
                Some(f) if !f.only_this_run => {
                    Some("another writer committed to the table during the run")
                }
                Some(f) if f.version.is_some() => None,
                _ => Some("the table was not finished"),
            };
            if let Some(why) = why {
                rows.for_each(drop);
                remove(table, Some(why));
                continue;
            }
            let version = finished.and_then(|f| f.version).expect("checked above");
            let mut gone: Vec<u64> = deleted
                .get(number)
                .into_iter()
                .flatten()
                .map(|id| self.fingerprints.key(id))
                .collect();
            gone.sort_unstable();
            let old: Box<dyn Iterator<Item = std::io::Result<Entry>>> = match table.usable_at {
                Some(_) => match table.reopen_old(self.tag) {
                    Some(reader) => Box::new(reader),
                    None => {
                        rows.for_each(drop);
                        remove(table, Some("its old index could not be read again"));
                        continue;
                    }
                },
                None => Box::new(std::iter::empty()),
            };
            let new = updated(old, &mut rows, gone.into_iter());
            // The completion table's index is kept by encounter, not by its rows' keys.
            let complete = table.complete && Some(number) != self.completion.map(|c| c.0);
            match index::write(&table.dir, (self.tag, version, complete), new) {
                // The index covers every commit: their journals are no longer needed.
                Ok(_) => table.remove_journals(),
                Err(e) => {
                    rows.for_each(drop);
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
}

/// Removes a table's index, saying why when there is a reason worth telling.
fn remove(table: &IndexedTable, why: Option<&str>) {
    if let Err(e) = index::remove(&table.dir) {
        crate::say!(
            "warning: the stale row index of {} could not be removed ({}); the next run will \
             not use it, as it describes another version",
            table.name,
            one_line(&e)
        );
    } else if let Some(why) = why {
        crate::say!("  {}: no row index kept: {why}", table.name);
    }
}

fn task_of(record: &Written) -> u32 {
    u32::from_be_bytes(record[..4].try_into().unwrap())
}

fn entry_of(record: &Written) -> Entry {
    record[4..].try_into().unwrap()
}

/// What the index does while one bundle is processed: which of its lines to leave out, and
/// the rows made from the others.
pub struct BundleIndex<'a> {
    index: &'a RerunIndex,
    task: u32,
    skip: Option<&'a LineSet>,
    completed: Option<&'a LineSet>,
    new_keys: Option<&'a LineSet>,
    written: Vec<Written>,
    unchanged: u64,
    completions_known: u64,
}

impl BundleIndex<'_> {
    /// Whether line `line` is left out as unchanged (counted).
    pub fn leaves_out(&mut self, line: u64) -> bool {
        let out = self.skip.is_some_and(|s| s.contains(line));
        self.unchanged += u64::from(out);
        out
    }

    /// Whether the completion row of the encounter on line `line` is in the table already
    /// (counted).
    pub fn completion_known(&mut self, line: u64) -> bool {
        let known = self.completed.is_some_and(|s| s.contains(line));
        self.completions_known += u64::from(known);
        known
    }

    /// Whether the row of line `line` has a key no row of the table has, nor another line.
    pub fn is_new_key(&self, line: u64) -> bool {
        self.new_keys.is_some_and(|s| s.contains(line))
    }

    /// Lines left out so far.
    pub fn unchanged_lines(&self) -> u64 {
        self.unchanged
    }

    /// Records that the row with `anonymous_id` was made from `line`; returns its tag (its
    /// index entry), for the chunk that holds the row.
    pub fn made(&mut self, anonymous_id: &str, line: &[u8]) -> RowTag {
        let fp = &self.index.fingerprints;
        let entry = index::entry(fp.key(anonymous_id), fp.line(line));
        self.record(self.task, entry);
        entry
    }

    /// Records that the completion row of the encounter `anonymous_id` was made; returns its
    /// tag.
    pub fn completed(&mut self, anonymous_id: &str) -> RowTag {
        let (slot, value) = self
            .index
            .completion
            .expect("a task that tracks encounters");
        let entry = index::entry(self.index.fingerprints.key(anonymous_id), value);
        self.record(slot as u32, entry);
        entry
    }

    fn record(&mut self, slot: u32, entry: Entry) {
        let mut record = [0u8; WRITTEN_BYTES];
        record[..4].copy_from_slice(&slot.to_be_bytes());
        record[4..].copy_from_slice(&entry);
        self.written.push(record);
    }
}

impl Drop for BundleIndex<'_> {
    fn drop(&mut self) {
        let tables = &self.index.tables;
        tables[self.task as usize]
            .unchanged
            .fetch_add(self.unchanged, Ordering::Relaxed);
        if let Some((slot, _)) = self.index.completion {
            tables[slot]
                .unchanged
                .fetch_add(self.completions_known, Ordering::Relaxed);
        }
        if self.written.is_empty() {
            return;
        }
        let mut written = self.index.written.lock().unwrap();
        let before = written.held_bytes();
        if let Err(e) = written.extend(self.written.drain(..)) {
            self.index.lost.store(true, Ordering::Relaxed);
            crate::say!("warning: the row indexes will not be saved: {e}");
        }
        self.index.held.change(before, written.held_bytes());
    }
}
