//! The row index's part in processing one bundle: which of its lines to leave out, which
//! rows have keys new to the table, and the tags of the rows made.

use std::sync::atomic::Ordering;

use super::RerunIndex;
use crate::output::RowTag;
use crate::rerun::index;
use crate::rerun::skip::LineSet;

/// What the index does while one bundle is processed: which of its lines to leave out, and
/// the rows made from the others.
pub struct BundleIndex<'a> {
    pub(super) index: &'a RerunIndex,
    pub(super) task: u32,
    pub(super) skip: Option<&'a LineSet>,
    pub(super) completed: Option<&'a LineSet>,
    pub(super) new_keys: Option<&'a LineSet>,
    pub(super) unchanged: u64,
    pub(super) completions_known: u64,
}

impl BundleIndex<'_> {
    /// Whether line `line` is left out as unchanged (counted).
    pub fn leaves_out(&mut self, line: impl FnOnce() -> u64) -> bool {
        let out = self.skip.is_some_and(|s| s.contains(line()));
        self.unchanged += u64::from(out);
        out
    }

    /// Whether the completion row of the encounter on line `line` is in the table already
    /// (counted).
    pub fn completion_known(&mut self, line: impl FnOnce() -> u64) -> bool {
        let known = self.completed.is_some_and(|s| s.contains(line()));
        self.completions_known += u64::from(known);
        known
    }

    /// Whether the row of line `line` has a key no row of the table has, nor another line.
    pub fn is_new_key(&self, line: impl FnOnce() -> u64) -> bool {
        self.new_keys.is_some_and(|s| s.contains(line()))
    }

    /// Whether the index looks any line of this file up (so every line's number is needed); a
    /// first load's index does not.
    pub fn looks_up_lines(&self) -> bool {
        self.skip.is_some() || self.completed.is_some() || self.new_keys.is_some()
    }

    /// Lines left out so far.
    pub fn unchanged_lines(&self) -> u64 {
        self.unchanged
    }

    /// The tag of the row with `anonymous_id` made from `line` (its index entry), for the
    /// chunk that holds the row: the commit that writes the row journals it.
    pub fn made(&self, anonymous_id: &str, line: &[u8]) -> RowTag {
        let fp = &self.index.fingerprints;
        index::entry(fp.key(anonymous_id), fp.line(line))
    }

    /// The tag of the completion row of the encounter `anonymous_id`.
    pub fn completed(&self, anonymous_id: &str) -> RowTag {
        let (_, value) = self
            .index
            .completion
            .expect("a task that tracks encounters");
        index::entry(self.index.fingerprints.key(anonymous_id), value)
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
    }
}
