//! The index of a table version a run reached before it stopped: the last complete index (or
//! none) and the row journals of the commits after it, each the entries of the rows one commit
//! wrote. A key's rows in later commits replace its earlier ones, so for each key only the
//! entries of the last journal that has it count; the old index keeps the keys no journal
//! touched ([`super::update`]). Each journal is sorted when written (`index::encode`), so they
//! are merged as they are read, not sorted again: a sort of every entry was most of the time a
//! Delta first load spent saving its index after its last commit.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;

use super::index::{Entry, entry, entry_parts};
use super::update::updated;

/// The entries of `base` (or none) updated by `journals` (each sorted), in commit order, as a
/// sorted stream.
pub fn replayed<B, J>(
    base: Option<B>,
    journals: Vec<J>,
) -> io::Result<impl Iterator<Item = io::Result<Entry>>>
where
    B: Iterator<Item = io::Result<Entry>> + 'static,
    J: Iterator<Item = io::Result<Entry>>,
{
    let mut latest = Latest {
        heads: BinaryHeap::with_capacity(journals.len()),
        journals,
        pending: Vec::new(),
    };
    for number in 0..latest.journals.len() {
        latest.advance(number)?;
    }
    let base: Box<dyn Iterator<Item = io::Result<Entry>>> = match base {
        Some(base) => Box::new(base),
        None => Box::new(std::iter::empty()),
    };
    Ok(updated(base, latest))
}

/// For each key, the entries of the last journal that has it.
struct Latest<J> {
    journals: Vec<J>,
    /// The next entry of each journal not yet ended, as (key, journal, line): the smallest
    /// first, so a key's entries come journal by journal.
    heads: BinaryHeap<Reverse<(u64, usize, u128)>>,
    /// The entries of the key at hand still to come, the next last.
    pending: Vec<Entry>,
}

impl<J: Iterator<Item = io::Result<Entry>>> Latest<J> {
    /// Puts the next entry of journal `number` among the heads (none once it has ended).
    fn advance(&mut self, number: usize) -> io::Result<()> {
        if let Some(next) = self.journals[number].next() {
            let (key, line) = entry_parts(&next?);
            self.heads.push(Reverse((key, number, line)));
        }
        Ok(())
    }

    /// The next (key, journal, line) of the merged journals.
    fn pop(&mut self) -> Option<io::Result<(u64, usize, u128)>> {
        let Reverse(head) = self.heads.pop()?;
        Some(self.advance(head.1).map(|_| head))
    }
}

impl<J: Iterator<Item = io::Result<Entry>>> Iterator for Latest<J> {
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<io::Result<Entry>> {
        if let Some(e) = self.pending.pop() {
            return Some(Ok(e));
        }
        let (key, mut journal, line) = match self.pop()? {
            Ok(head) => head,
            Err(e) => return Some(Err(e)),
        };
        // Most keys are in one journal once.
        if self.heads.peek().is_none_or(|Reverse((k, _, _))| *k != key) {
            return Some(Ok(entry(key, line)));
        }
        // The key's lines, in reverse: the last journal's come out first.
        self.pending.push(entry(key, line));
        while let Some(Reverse((k, _, _))) = self.heads.peek()
            && *k == key
        {
            let (_, j, l) = match self.pop()? {
                Ok(head) => head,
                Err(e) => return Some(Err(e)),
            };
            if j != journal {
                journal = j;
                self.pending.clear();
            }
            // Repeats of a line are one entry; the update drops a key written from two lines.
            if self.pending.last() != Some(&entry(key, l)) {
                self.pending.push(entry(key, l));
            }
        }
        self.pending.reverse();
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

    #[test]
    fn many_journals_merge_as_a_sort_of_all_their_entries_would() {
        // Twenty journals of keys 0..50, some lines repeated, some keys on two lines.
        let mut state = 7u64;
        let mut next = |n: u64| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % n
        };
        let journals: Vec<Vec<Entry>> = (0..20)
            .map(|_| {
                let mut j: Vec<Entry> = (0..30)
                    .map(|_| entry(next(50), 1 + next(3) as u128))
                    .collect();
                j.sort_unstable();
                j
            })
            .collect();
        let mut last: std::collections::BTreeMap<u64, (usize, Vec<u128>)> = Default::default();
        for (number, journal) in journals.iter().enumerate() {
            for (key, line) in journal.iter().map(entry_parts) {
                let seen = last.entry(key).or_insert((number, Vec::new()));
                if seen.0 != number {
                    *seen = (number, Vec::new());
                }
                if !seen.1.contains(&line) {
                    seen.1.push(line);
                }
            }
        }
        let unknown = crate::rerun::update::UNKNOWN_LINE;
        let expected: Vec<Entry> = last
            .iter()
            .map(|(&key, (_, lines))| entry(key, if lines.len() == 1 { lines[0] } else { unknown }))
            .collect();
        let no_base: Option<std::vec::IntoIter<io::Result<Entry>>> = None;
        let journals = journals
            .into_iter()
            .map(|j| j.into_iter().map(Ok))
            .collect();
        let merged: Vec<Entry> = replayed(no_base, journals)
            .unwrap()
            .collect::<io::Result<_>>()
            .unwrap();
        assert_eq!(merged, expected);
    }

    #[test]
    fn a_journal_that_cannot_be_read_ends_the_replay_with_its_error() {
        let good = vec![Ok(entry(1, 10)), Ok(entry(3, 30))];
        let bad = vec![
            Ok(entry(2, 20)),
            Err(io::Error::other("journal 2: cut short")),
        ];
        let no_base: Option<std::vec::IntoIter<io::Result<Entry>>> = None;
        let errors: Vec<String> = match replayed(no_base, vec![good.into_iter(), bad.into_iter()]) {
            Ok(entries) => entries
                .filter_map(|e| e.err())
                .map(|e| e.to_string())
                .collect(),
            Err(e) => vec![e.to_string()],
        };
        assert_eq!(errors, ["journal 2: cut short"]);
    }
}
