//! The pre-scan of a re-run: every input line of a table's files is fingerprinted (its key from
//! its `id` alone, its content whole), the fingerprints are sorted by key on disk if need be,
//! and merged with the table's index in one pass. A key whose lines in this export are all one
//! line the index already names for it is unchanged: its lines are left out of the run.
//! Nothing is parsed beyond the `id`, and memory is the sort's share plus a bit per line.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Mutex;

use anyhow::Result;

use super::RowFingerprints;
use super::index::{Entry, entry_parts};
use super::skip::SkipLines;
use crate::deid::Codebook;
use crate::input::InputFile;
use crate::input::bundles::{StreamReader, WorkItem, plan};
use crate::json::lines::{line_content, split_lines};
use crate::json::top_level::top_level_str;
use crate::json::utf16::python_strip;
use crate::spill_sort::SpillSort;

/// A line's record: key fingerprint, file, line number, then line fingerprint (big-endian, so
/// records sort by key and, within a key, by place in the export).
const RECORD_BYTES: usize = 8 + 4 + 8 + 16;
type Record = [u8; RECORD_BYTES];

fn record(key: u64, file: u32, line: u64, content: u128) -> Record {
    let mut r = [0u8; RECORD_BYTES];
    r[..8].copy_from_slice(&key.to_be_bytes());
    r[8..12].copy_from_slice(&file.to_be_bytes());
    r[12..20].copy_from_slice(&line.to_be_bytes());
    r[20..].copy_from_slice(&content.to_be_bytes());
    r
}

fn record_parts(r: &Record) -> (u64, u32, u64, u128) {
    (
        u64::from_be_bytes(r[..8].try_into().unwrap()),
        u32::from_be_bytes(r[8..12].try_into().unwrap()),
        u64::from_be_bytes(r[12..20].try_into().unwrap()),
        u128::from_be_bytes(r[20..].try_into().unwrap()),
    )
}

/// What to scan: one table's input files and how their ids become keys.
pub struct ScanInput<'a> {
    pub resource_type: &'a str,
    pub files: &'a [InputFile],
    pub codebook: &'a Codebook,
    pub fingerprints: &'a RowFingerprints,
}

/// What an index must hold for a key's lines to be left out.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    /// The key's one line (all its lines in the export are the same line): its row is
    /// unchanged.
    SameLine,
    /// This value, whatever the lines (a row made from the key and the run's constants, such
    /// as an encounter's completion row for the export's group).
    Value(u128),
}

/// An index to compare the input with, and what it must hold.
pub struct Compared<I> {
    pub entries: I,
    pub expect: Expect,
    /// The index lists every key of its table ([`super::index::IndexReader::complete`]): the
    /// lines of keys it lacks are reported as new keys, when each is its key's only line.
    pub complete: bool,
}

/// What the comparison found for a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Found {
    /// Its row is in the table as this line would make it.
    Unchanged,
    /// Its key is not in the table, and no other line of this export has it: its row can be
    /// appended without a MERGE.
    NewKey,
}

/// How a scan went.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanCounts {
    /// Lines read with an id.
    pub lines: u64,
    /// Lines left out, per index compared.
    pub unchanged: Vec<u64>,
    /// Lines of new keys, per index compared.
    pub new_keys: Vec<u64>,
}

/// Scans `input` on `threads` threads, holding about `memory` bytes of fingerprints, and
/// compares it with each index (its entries in order): the lines each shows unchanged are
/// marked in the matching `skips`. A file that cannot be read is scanned no further: its lines
/// are processed, and the run reports it.
/// `planned` are the files' bundles as the run planned them (the same maps and line numbers),
/// or None to plan them here.
pub fn scan<I: Iterator<Item = io::Result<Entry>>>(
    (input, planned): (&ScanInput<'_>, Option<Vec<WorkItem>>),
    indexes: Vec<Compared<I>>,
    threads: usize,
    memory: usize,
    skips: &mut [(&mut SkipLines, &mut SkipLines)],
) -> Result<ScanCounts> {
    let work = match planned {
        Some(items) => items,
        None => plan(
            input.files,
            (memory / threads.max(1) / 4).clamp(1 << 20, 64 << 20),
        )?,
    };
    let work = Mutex::new(VecDeque::from(work));
    let numbers: HashMap<&str, u32> = (0u32..)
        .zip(input.files)
        .map(|(i, f)| (f.name(), i))
        .collect();
    let sort = Mutex::new(SpillSort::<RECORD_BYTES>::new(memory));
    let failed: Mutex<Option<io::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                while let Some(item) = work.lock().unwrap().pop_front() {
                    let file = numbers[item.file().name()];
                    if let Err(e) = scan_item(input, file, item, &sort) {
                        failed.lock().unwrap().get_or_insert(e);
                        work.lock().unwrap().clear();
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().unwrap() {
        return Err(anyhow::Error::new(e).context("sorting the input's fingerprints"));
    }
    let sort = sort.into_inner().unwrap();
    let lines = sort.len();
    let names: Vec<&str> = input.files.iter().map(InputFile::name).collect();
    let (unchanged, new_keys) = join(sort.finish()?, indexes, |found, which, file, line| {
        let (unchanged, new_keys) = &mut skips[which];
        match found {
            Found::Unchanged => unchanged.insert(names[file as usize], line),
            Found::NewKey => new_keys.insert(names[file as usize], line),
        }
    })?;
    Ok(ScanCounts {
        lines,
        unchanged,
        new_keys,
    })
}

/// Fingerprints the lines of one work item into the sort.
fn scan_item(
    input: &ScanInput<'_>,
    file: u32,
    item: WorkItem,
    sort: &Mutex<SpillSort<RECORD_BYTES>>,
) -> io::Result<()> {
    match item {
        WorkItem::Slice { mapped, slice, .. } => {
            let first_line = mapped.first_line_when_taken(slice);
            let records = fingerprint_lines(input, file, mapped.bytes(slice), first_line);
            mapped.release(slice);
            sort.lock().unwrap().extend(records)
        }
        WorkItem::Stream { file: stream } | WorkItem::Open { file: stream, .. } => {
            let Ok(mut reader) = StreamReader::open(&stream) else {
                return Ok(());
            };
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let (first_line, error) = reader.next_bundle(&mut buf, 8 << 20);
                let records = fingerprint_lines(input, file, &buf, first_line);
                sort.lock().unwrap().extend(records)?;
                if reader.finished || error.is_some() {
                    return Ok(());
                }
            }
        }
    }
}

/// The records of the lines in `bytes`, the first of which is line `first_line`. Lines without
/// a usable `id` get none: they are never left out.
fn fingerprint_lines(
    input: &ScanInput<'_>,
    file: u32,
    bytes: &[u8],
    first_line: u64,
) -> Vec<Record> {
    let mut records = Vec::new();
    for (line, raw) in (first_line..).zip(split_lines(bytes)) {
        let Some(content) = line_content(raw) else {
            continue;
        };
        let Some(id) = top_level_str(content, "id") else {
            continue;
        };
        let id = python_strip(&id);
        if id.is_empty() {
            continue;
        }
        let anonymous = input.codebook.fake_id(input.resource_type, id, false);
        let key = input.fingerprints.key(&anonymous);
        records.push(record(key, file, line, input.fingerprints.line(content)));
    }
    records
}

/// Merges the sorted records with each index's entries (sorted by key, then value); calls
/// `found` with what was found, the index's position, the file and the line of every line an
/// index shows unchanged or of a new key, and returns how many of each every index found.
fn join<I: Iterator<Item = io::Result<Entry>>>(
    records: impl Iterator<Item = io::Result<Record>>,
    indexes: Vec<Compared<I>>,
    mut found: impl FnMut(Found, usize, u32, u64),
) -> io::Result<(Vec<u64>, Vec<u64>)> {
    let mut indexes: Vec<_> = indexes
        .into_iter()
        .map(|c| (c.entries.peekable(), c.expect, c.complete))
        .collect();
    let mut new_keys = vec![0u64; indexes.len()];
    let mut records = records.peekable();
    let mut group: Vec<(u32, u64, u128)> = Vec::new();
    let mut left_out = vec![0u64; indexes.len()];
    while let Some(first) = records.next() {
        let (key, file, line, content) = record_parts(&first?);
        group.clear();
        group.push((file, line, content));
        while let Some(Ok(next)) = records.peek() {
            let (k, f, l, c) = record_parts(next);
            if k != key {
                break;
            }
            group.push((f, l, c));
            records.next();
        }
        if let Some(Err(_)) = records.peek() {
            return Err(records.next().unwrap().unwrap_err());
        }
        let one_line = group
            .iter()
            .all(|g| g.2 == group[0].2)
            .then_some(group[0].2);
        for (which, (index, expect, complete)) in indexes.iter_mut().enumerate() {
            // The index's values for this key (one, unless two keys share a fingerprint).
            let known = values_of(index, key)?;
            let wanted = match expect {
                Expect::SameLine => one_line,
                Expect::Value(v) => Some(*v),
            };
            if wanted.is_some_and(|w| known.contains(&w)) {
                for &(file, line, _) in &group {
                    found(Found::Unchanged, which, file, line);
                }
                left_out[which] += group.len() as u64;
            } else if *complete && known.is_empty() && group.len() == 1 {
                found(Found::NewKey, which, group[0].0, group[0].1);
                new_keys[which] += 1;
            }
        }
    }
    Ok((left_out, new_keys))
}

/// Takes the entries of keys up to `key` from the front of `index`; returns the values of
/// `key`'s.
fn values_of(
    index: &mut std::iter::Peekable<impl Iterator<Item = io::Result<Entry>>>,
    key: u64,
) -> io::Result<Vec<u128>> {
    let mut known = Vec::new();
    while let Some(entry) = index.peek() {
        let (k, value) = match entry {
            Ok(e) => entry_parts(e),
            Err(_) => return Err(index.next().unwrap().unwrap_err()),
        };
        if k > key {
            break;
        }
        if k == key {
            known.push(value);
        }
        index.next();
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rerun::index::entry;

    #[test]
    fn a_key_is_left_out_only_when_all_its_lines_are_the_line_the_index_names() {
        let records = vec![
            // Key 1: its one line is the indexed one.
            record(1, 0, 10, 100),
            // Key 2: the same line twice, indexed.
            record(2, 0, 11, 200),
            record(2, 1, 3, 200),
            // Key 3: a changed line.
            record(3, 0, 12, 301),
            // Key 4: the indexed line and another one.
            record(4, 0, 13, 400),
            record(4, 1, 4, 401),
            // Key 5: not in the index.
            record(5, 0, 14, 500),
            // Key 7: two index entries share the key fingerprint.
            record(7, 1, 7, 701),
        ];
        let index = vec![
            entry(0, 1),
            entry(1, 100),
            entry(2, 200),
            entry(3, 300),
            entry(4, 400),
            entry(6, 600),
            entry(7, 700),
            entry(7, 701),
            entry(9, 900),
        ];
        // The same records against a second index of constant values (an encounter's
        // completion rows for the export's group): keys 2 and 5 have theirs.
        let groups = vec![entry(2, 42), entry(3, 41), entry(5, 42)];
        let compared = vec![
            Compared {
                entries: index.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
                expect: Expect::SameLine,
                complete: true,
            },
            Compared {
                entries: groups.into_iter().map(Ok).collect::<Vec<_>>().into_iter(),
                expect: Expect::Value(42),
                complete: false,
            },
        ];
        let mut left_out = Vec::new();
        let mut new_keys = Vec::new();
        let (n, new) = join(
            records.into_iter().map(Ok),
            compared,
            |found, which, f, l| match found {
                Found::Unchanged => left_out.push((which, f, l)),
                Found::NewKey => new_keys.push((which, f, l)),
            },
        )
        .unwrap();
        // Key 5, its only line, is not in the complete index: a new key. (Key 4 is, and key 3.)
        assert_eq!(new_keys, [(0, 0, 14)]);
        assert_eq!(new, [1, 0]);
        assert_eq!(
            left_out,
            [
                (0, 0, 10),
                (0, 0, 11),
                (0, 1, 3),
                (1, 0, 11),
                (1, 1, 3),
                (1, 0, 14),
                (0, 1, 7)
            ]
        );
        assert_eq!(n, [4, 3]);
    }
}
