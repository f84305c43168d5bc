//! The row index file of one table, `<table>/_cumulus_etl/row-index`: a header naming what it
//! was written under (the fingerprints' tag) and the table version it describes, the entries
//! sorted, and a trailer with their count. Delta readers read only the files the log names,
//! and VACUUM leaves folders whose names start with `_` alone (both checked by the tests).
//!
//! It is written whole or not at all (a local file by rename, an S3 object by a completed
//! upload), and read as a stream: an index over a hundred million rows is 2.4 GB, read once
//! per run in order, never held.

use std::io::{self, BufRead, BufReader, Read, Write};

use anyhow::{Context, Result, anyhow, bail};

use crate::store::ObjectLocation;

/// Where a table's index is, under its folder.
pub const INDEX_KEY: &str = "_cumulus_etl/row-index";

const MAGIC: &[u8; 8] = b"CETLRIX2";
const END: &[u8; 8] = b"CETLEND1";
const HEADER_BYTES: usize = 8 + 16 + 8 + 8;

/// The header's flag: the index has an entry for every key of the table (see
/// [`IndexReader::complete`]).
const COMPLETE: u64 = 1;

/// One entry: a row key's fingerprint, then its line's, big-endian (so entries sort by key).
pub type Entry = [u8; ENTRY_BYTES];
pub const ENTRY_BYTES: usize = 24;

/// The entry for a key and a line.
pub fn entry(key: u64, line: u128) -> Entry {
    let mut e = [0u8; ENTRY_BYTES];
    e[..8].copy_from_slice(&key.to_be_bytes());
    e[8..].copy_from_slice(&line.to_be_bytes());
    e
}

/// An entry's key and line fingerprints.
pub fn entry_parts(e: &Entry) -> (u64, u128) {
    (
        u64::from_be_bytes(e[..8].try_into().unwrap()),
        u128::from_be_bytes(e[8..].try_into().unwrap()),
    )
}

/// Why a stored index is not used.
#[derive(Debug, PartialEq, Eq)]
pub enum Unusable {
    Missing,
    /// Written under another codebook, tool version or rules.
    OtherTag,
    /// Describes another version of the table.
    OtherVersion(i64),
}

impl Unusable {
    /// Why, for a message.
    pub fn reason(&self) -> String {
        match self {
            Unusable::Missing => "none yet".into(),
            Unusable::OtherTag => "written under another codebook, tool version or rules".into(),
            Unusable::OtherVersion(v) => {
                format!("it describes version {v} of the table, which has changed since")
            }
        }
    }
}

/// A stored index's entries, in order, as they are read.
pub struct IndexReader {
    /// Every key of the table has an entry (a key whose line is not known has the line 0,
    /// which no line has): a key without one is not in the table. True for the index of a
    /// table this tool created and kept an index of since.
    pub complete: bool,
    input: BufReader<Box<dyn Read + Send>>,
    url: String,
    read: u64,
    ended: bool,
}

/// Where Delta commits' row journals are, under the table's folder: index files of the rows
/// each commit writes, written before it and named in its `commitInfo`, so that the index of
/// a version a run reached before it stopped can be rebuilt (`docs/delta.md`, Re-runs).
pub const JOURNAL_DIR: &str = "_cumulus_etl/journal";

/// Opens the index of the table in `table_dir` if it was written under `tag` for `version`.
pub fn open(
    table_dir: &ObjectLocation,
    tag: u128,
    version: i64,
) -> Result<Result<IndexReader, Unusable>> {
    open_file(table_dir, INDEX_KEY, tag, Some(version)).map(|r| r.map(|(reader, _)| reader))
}

/// Opens an index file (`key` under `dir`) written under `tag`, for `version` if given;
/// returns it with the version it describes.
pub fn open_file(
    dir: &ObjectLocation,
    key: &str,
    tag: u128,
    version: Option<i64>,
) -> Result<Result<(IndexReader, i64), Unusable>> {
    let Some(input) = dir.open_if_exists(key)? else {
        return Ok(Err(Unusable::Missing));
    };
    let url = dir.url_of(key);
    let mut input = BufReader::with_capacity(1 << 20, input);
    let mut header = [0u8; HEADER_BYTES];
    input
        .read_exact(&mut header)
        .with_context(|| format!("{url}: the header is cut short"))?;
    if &header[..8] != MAGIC {
        bail!("{url}: not a row index of this tool");
    }
    if u128::from_be_bytes(header[8..24].try_into().unwrap()) != tag {
        return Ok(Err(Unusable::OtherTag));
    }
    let written_for = i64::from_be_bytes(header[24..32].try_into().unwrap());
    if version.is_some_and(|v| v != written_for) {
        return Ok(Err(Unusable::OtherVersion(written_for)));
    }
    let flags = u64::from_be_bytes(header[32..40].try_into().unwrap());
    let reader = IndexReader {
        complete: flags & COMPLETE != 0,
        input,
        url,
        read: 0,
        ended: false,
    };
    Ok(Ok((reader, written_for)))
}

impl Iterator for IndexReader {
    type Item = io::Result<Entry>;

    /// The next entry; at the end, the trailer is checked (a cut or altered file is an error).
    fn next(&mut self) -> Option<io::Result<Entry>> {
        if self.ended {
            return None;
        }
        let mut e = [0u8; ENTRY_BYTES];
        if let Err(err) = self.input.read_exact(&mut e[..16]) {
            self.ended = true;
            return Some(Err(io::Error::other(format!(
                "{}: cut short: {err}",
                self.url
            ))));
        }
        // The trailer is the last 16 bytes (an entry may start the same way, once in 2^64).
        if &e[8..16] == END && matches!(self.input.fill_buf(), Ok([])) {
            self.ended = true;
            let count = u64::from_be_bytes(e[..8].try_into().unwrap());
            if count != self.read {
                return Some(Err(io::Error::other(format!(
                    "{}: the trailer does not match the entries",
                    self.url
                ))));
            }
            return None;
        }
        if let Err(err) = self.input.read_exact(&mut e[16..]) {
            self.ended = true;
            return Some(Err(io::Error::other(format!(
                "{}: cut short: {err}",
                self.url
            ))));
        }
        self.read += 1;
        Some(Ok(e))
    }
}

/// The bytes of an index file written under `tag` for `version`, of `entries` (sorted here):
/// what a Delta commit's journal holds (`docs/delta.md`, Re-runs).
pub fn encode(tag: u128, version: i64, mut entries: Vec<Entry>) -> Vec<u8> {
    // The entries' byte order is their numbers' (big-endian): compared as numbers, not by
    // a call to memcmp per comparison.
    entries.sort_unstable_by_key(entry_parts);
    let mut out = Vec::with_capacity(HEADER_BYTES + entries.len() * ENTRY_BYTES + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&tag.to_be_bytes());
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&0u64.to_be_bytes());
    entries.iter().for_each(|e| out.extend_from_slice(e));
    out.extend_from_slice(&(entries.len() as u64).to_be_bytes());
    out.extend_from_slice(END);
    out
}

/// Writes the index of the table in `table_dir` for `version`, from entries in order (checked:
/// out of order is an error and nothing is written). Returns how many were written.
pub fn write(
    table_dir: &ObjectLocation,
    (tag, version, complete): (u128, i64, bool),
    entries: impl Iterator<Item = io::Result<Entry>>,
) -> Result<u64> {
    let url = table_dir.url_of(INDEX_KEY);
    let mut out = table_dir.writer(INDEX_KEY)?;
    out.write_all(MAGIC)?;
    out.write_all(&tag.to_be_bytes())?;
    out.write_all(&version.to_be_bytes())?;
    let flags = if complete { COMPLETE } else { 0 };
    out.write_all(&flags.to_be_bytes())?;
    let mut count = 0u64;
    let mut last: Option<Entry> = None;
    for e in entries {
        let e = e.with_context(|| format!("building {url}"))?;
        if last.is_some_and(|l| l > e) {
            return Err(anyhow!("{url}: entries out of order (a bug)"));
        }
        out.write_all(&e)?;
        last = Some(e);
        count += 1;
    }
    out.write_all(&count.to_be_bytes())?;
    out.write_all(END)?;
    out.finish()?;
    Ok(count)
}

/// Removes the table's index (a table this run could not keep one for).
pub fn remove(table_dir: &ObjectLocation) -> Result<()> {
    table_dir.delete(INDEX_KEY)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u64) -> Vec<Entry> {
        (0..n).map(|i| entry(i * 3, u128::from(i) << 70)).collect()
    }

    #[test]
    fn an_index_reads_back_only_for_its_tag_and_version_and_a_cut_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let table = ObjectLocation::local(dir.path()).unwrap();
        assert_eq!(open(&table, 7, 3).unwrap().err(), Some(Unusable::Missing));
        let written = write(&table, (7, 3, true), entries(1000).into_iter().map(Ok)).unwrap();
        assert_eq!(written, 1000);
        let reader = open(&table, 7, 3).unwrap().unwrap();
        assert!(reader.complete);
        let back: Vec<Entry> = reader.collect::<io::Result<_>>().unwrap();
        assert_eq!(back, entries(1000));
        assert_eq!(entry_parts(&back[5]), (15, 5u128 << 70));
        assert_eq!(open(&table, 8, 3).unwrap().err(), Some(Unusable::OtherTag));
        assert_eq!(
            open(&table, 7, 4).unwrap().err(),
            Some(Unusable::OtherVersion(3))
        );

        let path = dir.path().join(INDEX_KEY);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 40]).unwrap();
        let cut: io::Result<Vec<Entry>> = open(&table, 7, 3).unwrap().unwrap().collect();
        assert!(cut.is_err());

        let unsorted = vec![entry(2, 0), entry(1, 0)];
        assert!(write(&table, (7, 5, false), unsorted.into_iter().map(Ok)).is_err());
        remove(&table).unwrap();
        assert_eq!(open(&table, 7, 3).unwrap().err(), Some(Unusable::Missing));
    }

    #[test]
    fn an_encoded_journal_holds_its_entries_in_byte_order() {
        // Keys and lines whose bytes differ high and low, given out of order.
        let mut given: Vec<Entry> = (0..500u64)
            .map(|i| {
                let key = (i * 7919 % 500) << 56 | (i % 3);
                entry(key, u128::from(i % 5) << 120 | u128::from(i))
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let table = ObjectLocation::local(dir.path()).unwrap();
        let bytes = encode(7, -1, given.clone());
        table.write("journal", bytes.into()).unwrap();
        let (reader, _) = open_file(&table, "journal", 7, Some(-1)).unwrap().unwrap();
        let back: Vec<Entry> = reader.collect::<io::Result<_>>().unwrap();
        given.sort_unstable();
        assert_eq!(back, given);
    }
}
