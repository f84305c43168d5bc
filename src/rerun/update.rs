//! The index a run leaves: the old entries of keys it did not touch, and an entry for each key
//! it wrote from one line; a key it wrote from two different lines keeps an entry of unknown
//! line, and a key it deleted (written with [`DELETED_LINE`]) none. Both inputs are read in
//! key order, so the new index is written as it is merged.

use std::collections::VecDeque;
use std::io;
use std::iter::Peekable;

use super::index::{Entry, entry, entry_parts};

/// The line of a key whose line is not known: no line's fingerprint (but once in 2^128).
pub const UNKNOWN_LINE: u128 = 0;

/// The line of a deleted key, in a deletion's journal: the key is gone.
pub const DELETED_LINE: u128 = u128::MAX;

/// The new index's entries, in order.
pub struct Updated<O, W>
where
    O: Iterator<Item = io::Result<Entry>>,
    W: Iterator<Item = io::Result<Entry>>,
{
    old: Peekable<O>,
    written: Peekable<W>,
    pending: VecDeque<Entry>,
    /// The old and the written lines of the key at hand (kept, not allocated per key).
    lines: (Vec<u128>, Vec<u128>),
}

/// Merges `old` (the index the run started from, or nothing) and `written` (an entry per row
/// the run committed, from the line it came from, or deleted), both sorted.
pub fn updated<O, W>(old: O, written: W) -> Updated<O, W>
where
    O: Iterator<Item = io::Result<Entry>>,
    W: Iterator<Item = io::Result<Entry>>,
{
    Updated {
        old: old.peekable(),
        written: written.peekable(),
        pending: VecDeque::new(),
        lines: (Vec::new(), Vec::new()),
    }
}

/// The key of the next entry, or the error in its place.
pub(super) fn peek_key(
    entries: &mut Peekable<impl Iterator<Item = io::Result<Entry>>>,
) -> io::Result<Option<u64>> {
    match entries.peek() {
        None => Ok(None),
        Some(Ok(e)) => Ok(Some(entry_parts(e).0)),
        Some(Err(_)) => Err(entries.next().unwrap().unwrap_err()),
    }
}

/// Takes the entries of `key` (at the front) and returns their lines.
fn take_key(
    entries: &mut Peekable<impl Iterator<Item = io::Result<Entry>>>,
    key: u64,
    lines: &mut Vec<u128>,
) -> io::Result<()> {
    lines.clear();
    while peek_key(entries)? == Some(key) {
        lines.push(entry_parts(&entries.next().unwrap()?).1);
    }
    Ok(())
}

impl<O, W> Updated<O, W>
where
    O: Iterator<Item = io::Result<Entry>>,
    W: Iterator<Item = io::Result<Entry>>,
{
    fn step(&mut self) -> io::Result<Option<()>> {
        let key = match (peek_key(&mut self.old)?, peek_key(&mut self.written)?) {
            (None, None) => return Ok(None),
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
        };
        let (old, written) = &mut self.lines;
        take_key(&mut self.old, key, old)?;
        take_key(&mut self.written, key, written)?;
        written.dedup();
        if *written == [DELETED_LINE] {
            return Ok(Some(()));
        }
        match written.as_slice() {
            [] => self
                .pending
                .extend(old.iter().map(|&line| entry(key, line))),
            [line] => self.pending.push_back(entry(key, *line)),
            // Two different lines in one export: which row won is not the index's to say. The
            // key stays, with the line 0 (no line's), so the index still lists every key.
            _ => self.pending.push_back(entry(key, UNKNOWN_LINE)),
        }
        Ok(Some(()))
    }
}

impl<O, W> Iterator for Updated<O, W>
where
    O: Iterator<Item = io::Result<Entry>>,
    W: Iterator<Item = io::Result<Entry>>,
{
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<io::Result<Entry>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(Ok(e));
            }
            match self.step() {
                Ok(Some(())) => {}
                Ok(None) => return None,
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn untouched_keys_keep_their_entries_and_written_or_deleted_ones_are_replaced() {
        let old = vec![
            entry(1, 10),
            entry(2, 20),
            entry(3, 30),
            entry(5, 50),
            entry(5, 51),
        ];
        // Key 2 rewritten, key 3 deleted, key 4 new, key 6 written from two different lines
        // (kept, its line unknown), key 7 twice from the same line, keys 8 and 9 (not in the
        // index) deleted.
        let written = vec![
            entry(2, 21),
            entry(3, DELETED_LINE),
            entry(4, 40),
            entry(6, 60),
            entry(6, 61),
            entry(7, 70),
            entry(7, 70),
            entry(8, DELETED_LINE),
            entry(9, DELETED_LINE),
        ];
        let new: Vec<Entry> = updated(old.into_iter().map(Ok), written.into_iter().map(Ok))
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(
            new,
            [
                entry(1, 10),
                entry(2, 21),
                entry(4, 40),
                entry(5, 50),
                entry(5, 51),
                entry(6, UNKNOWN_LINE),
                entry(7, 70)
            ]
        );
    }
}
