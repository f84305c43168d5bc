//! The row index's part in processing one bundle: which of its lines to leave out, which
//! rows have keys new to the table, and the tags of the rows made.

use std::sync::atomic::Ordering;

use super::{RerunIndex, WRITTEN_BYTES, Written};
use crate::output::RowTag;
use crate::rerun::index::{self, Entry};
use crate::rerun::skip::LineSet;

/// What the index does while one bundle is processed: which of its lines to leave out, and
/// the rows made from the others.
pub struct BundleIndex<'a> {
    pub(super) index: &'a RerunIndex,
    pub(super) task: u32,
    pub(super) skip: Option<&'a LineSet>,
    pub(super) completed: Option<&'a LineSet>,
    pub(super) new_keys: Option<&'a LineSet>,
    pub(super) written: Vec<Written>,
    pub(super) unchanged: u64,
    pub(super) completions_known: u64,
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
