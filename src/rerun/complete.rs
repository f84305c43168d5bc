//! An index made to list every key of its table, for a table this tool's journals do not fully
//! describe (written by another tool, or by another writer since the last index): every key of
//! the table's rows that the index lacks joins it with an unknown line. Such a key is never left
//! out (its line is not known), but it is no longer taken for a new one: with every key listed,
//! a batch of keys absent from the index can be appended instead of merged.

use std::io;
use std::iter::Peekable;

use super::index::{Entry, entry};
use super::update::{UNKNOWN_LINE, peek_key};

/// The entries of an index and the keys of its table, merged.
pub struct Completed<E, K>
where
    E: Iterator<Item = io::Result<Entry>>,
    K: Iterator<Item = io::Result<u64>>,
{
    entries: Peekable<E>,
    keys: Peekable<K>,
}

/// `entries` (sorted, as an index holds them) with an unknown-line entry for each of `keys`
/// (sorted, repeats allowed) that none of them has.
pub fn completed<E, K>(entries: E, keys: K) -> Completed<E, K>
where
    E: Iterator<Item = io::Result<Entry>>,
    K: Iterator<Item = io::Result<u64>>,
{
    Completed {
        entries: entries.peekable(),
        keys: keys.peekable(),
    }
}

impl<E, K> Completed<E, K>
where
    E: Iterator<Item = io::Result<Entry>>,
    K: Iterator<Item = io::Result<u64>>,
{
    fn next_key(&mut self) -> io::Result<Option<u64>> {
        match self.keys.peek() {
            None => Ok(None),
            Some(Ok(k)) => Ok(Some(*k)),
            Some(Err(_)) => Err(self.keys.next().unwrap().unwrap_err()),
        }
    }

    /// Drops the keys up to `key`.
    fn skip_keys_through(&mut self, key: u64) -> io::Result<()> {
        while self.next_key()?.is_some_and(|k| k <= key) {
            self.keys.next();
        }
        Ok(())
    }

    fn step(&mut self) -> io::Result<Option<Entry>> {
        let listed = peek_key(&mut self.entries)?;
        let key = self.next_key()?;
        match (listed, key) {
            (None, None) => Ok(None),
            (Some(listed), key) if key.is_none_or(|k| listed <= k) => {
                self.skip_keys_through(listed)?;
                self.entries.next().transpose()
            }
            (_, Some(key)) => {
                self.skip_keys_through(key)?;
                Ok(Some(entry(key, UNKNOWN_LINE)))
            }
            (Some(_), None) => unreachable!("matched above"),
        }
    }
}

impl<E, K> Iterator for Completed<E, K>
where
    E: Iterator<Item = io::Result<Entry>>,
    K: Iterator<Item = io::Result<u64>>,
{
    type Item = io::Result<Entry>;

    fn next(&mut self) -> Option<io::Result<Entry>> {
        self.step().transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_the_index_lacks_join_it_with_an_unknown_line_and_its_own_entries_stay() {
        let entries = vec![entry(2, 20), entry(5, 50), entry(9, 90)];
        let keys = vec![1, 1, 2, 3, 5, 7, 7, 10];
        let merged: Vec<Entry> = completed(entries.into_iter().map(Ok), keys.into_iter().map(Ok))
            .collect::<io::Result<_>>()
            .unwrap();
        let unknown = UNKNOWN_LINE;
        assert_eq!(
            merged,
            [
                entry(1, unknown),
                entry(2, 20),
                entry(3, unknown),
                entry(5, 50),
                entry(7, unknown),
                entry(9, 90),
                entry(10, unknown),
            ]
        );
        let none: Vec<Entry> = completed(std::iter::empty(), std::iter::empty())
            .collect::<io::Result<_>>()
            .unwrap();
        assert!(none.is_empty());
    }
}
