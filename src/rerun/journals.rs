//! The index of a table version a run reached before it stopped: the last complete index (or
//! none) and the row journals of the commits after it, each the entries of the rows one commit
//! wrote. A key's rows in later commits replace its earlier ones, so for each key only the
//! entries of the last journal that has it count; the old index keeps the keys no journal
//! touched ([`super::update`]). Journals are sorted together on disk beyond `memory`.

use std::io;
use std::iter::Peekable;

use super::index::{Entry, entry, entry_parts};
use super::update::updated;
use crate::spill_sort::{Sorted, SpillSort};

/// A journal entry with its journal's place: key, journal, line (big-endian).
const RECORD_BYTES: usize = 8 + 4 + 16;

/// The entries of `base` (or none) updated by `journals`, in commit order, as a sorted stream.
pub fn replayed<B, J>(
    base: Option<B>,
    journals: Vec<J>,
    memory: usize,
) -> io::Result<impl Iterator<Item = io::Result<Entry>>>
where
    B: Iterator<Item = io::Result<Entry>> + 'static,
    J: Iterator<Item = io::Result<Entry>>,
{
    let mut sort = SpillSort::<RECORD_BYTES>::new(memory);
    for (number, journal) in journals.into_iter().enumerate() {
        let number = u32::try_from(number).unwrap_or(u32::MAX);
        let mut records = Vec::new();
        for e in journal {
            let (key, line) = entry_parts(&e?);
            let mut r = [0u8; RECORD_BYTES];
            r[..8].copy_from_slice(&key.to_be_bytes());
            r[8..12].copy_from_slice(&number.to_be_bytes());
            r[12..].copy_from_slice(&line.to_be_bytes());
            records.push(r);
        }
        sort.extend(records)?;
    }
    let latest = Latest {
        records: sort.finish()?.peekable(),
        pending: Vec::new(),
    };
    let base: Box<dyn Iterator<Item = io::Result<Entry>>> = match base {
        Some(base) => Box::new(base),
        None => Box::new(std::iter::empty()),
    };
    Ok(updated(base, latest))
}

/// For each key, the entries of the last journal that has it.
struct Latest {
    records: Peekable<Sorted<RECORD_BYTES>>,
    pending: Vec<Entry>,
}

fn parts(r: &[u8; RECORD_BYTES]) -> (u64, u32, u128) {
    (
        u64::from_be_bytes(r[..8].try_into().unwrap()),
        u32::from_be_bytes(r[8..12].try_into().unwrap()),
        u128::from_be_bytes(r[12..].try_into().unwrap()),
    )
}

impl Iterator for Latest {
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<io::Result<Entry>> {
        if let Some(e) = self.pending.pop() {
            return Some(Ok(e));
        }
        let first = match self.records.next()? {
            Ok(r) => parts(&r),
            Err(e) => return Some(Err(e)),
        };
        let (key, mut journal, line) = first;
        let mut lines = vec![line];
        while let Some(Ok(next)) = self.records.peek() {
            let (k, j, l) = parts(next);
            if k != key {
                break;
            }
            if j != journal {
                journal = j;
                lines.clear();
            }
            lines.push(l);
            self.records.next();
        }
        if let Some(Err(_)) = self.records.peek() {
            return Some(Err(self.records.next()?.unwrap_err()));
        }
        // Repeats of a line are one entry; the update drops a key written from two lines.
        lines.dedup();
        self.pending = lines.into_iter().rev().map(|l| entry(key, l)).collect();
        self.pending.pop().map(Ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_takes_its_last_journals_lines_and_the_others_keep_the_base() {
        let base = vec![entry(1, 10), entry(2, 20), entry(3, 30)];
        let deleted = crate::rerun::update::DELETED_LINE;
        let journals = vec![
            vec![entry(2, 21), entry(4, 40), entry(5, 50)],
            vec![
                entry(2, 22),
                entry(5, 51),
                entry(5, 52),
                entry(6, 60),
                entry(6, 60),
            ],
            // A deletion's journal: key 3 (in the base) and key 4 (written since) are gone.
            vec![entry(3, deleted), entry(4, deleted)],
        ];
        let replayed: Vec<Entry> = replayed(
            Some(base.into_iter().map(Ok)),
            journals
                .into_iter()
                .map(|j| j.into_iter().map(Ok))
                .collect(),
            0,
        )
        .unwrap()
        .collect::<io::Result<_>>()
        .unwrap();
        // Key 5 was written from two lines by its last commit: its line is not known.
        let unknown = crate::rerun::update::UNKNOWN_LINE;
        assert_eq!(
            replayed,
            [entry(1, 10), entry(2, 22), entry(5, unknown), entry(6, 60)]
        );
    }
}
