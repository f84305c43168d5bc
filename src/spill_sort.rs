//! An external sort of fixed-size records: records are kept in memory up to a byte limit,
//! sorted and written to a private temporary folder as a run when the limit is reached, and
//! read back merged, in order. Memory stays at the limit plus one read buffer per run, however
//! many records pass through, so indexes over hundreds of millions of rows fit any budget.
//!
//! Records are byte arrays compared as bytes: callers encode their fields big-endian, most
//! significant first, so byte order is the order they want.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};

/// Bytes read ahead from each run during the merge.
const RUN_READ_BYTES: usize = 64 << 10;

/// Records of `N` bytes taken in any order, handed back sorted.
pub struct SpillSort<const N: usize> {
    buffer: Vec<[u8; N]>,
    /// Records the buffer holds before it is written as a run.
    capacity: usize,
    runs: Vec<File>,
    dir: Option<tempfile::TempDir>,
    len: u64,
}

impl<const N: usize> SpillSort<N> {
    /// A sort that holds about `memory` bytes of records at a time (at least a thousand).
    pub fn new(memory: usize) -> SpillSort<N> {
        SpillSort {
            buffer: Vec::new(),
            capacity: (memory / N).max(1024),
            runs: Vec::new(),
            dir: None,
            len: 0,
        }
    }

    /// Records taken so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether none were taken.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Takes records; a full buffer is written out as a sorted run.
    pub fn extend(&mut self, records: impl IntoIterator<Item = [u8; N]>) -> io::Result<()> {
        for record in records {
            if self.buffer.len() == self.capacity {
                self.spill()?;
            }
            self.buffer.push(record);
            self.len += 1;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        self.buffer.sort_unstable();
        if self.dir.is_none() {
            self.dir = Some(
                tempfile::Builder::new()
                    .prefix("cumulus-etl-sort-")
                    .tempdir()?,
            );
        }
        let dir = self.dir.as_ref().expect("created above");
        let mut file = tempfile::tempfile_in(dir.path())?;
        {
            let mut out = BufWriter::with_capacity(RUN_READ_BYTES, &mut file);
            for record in &self.buffer {
                out.write_all(record)?;
            }
            out.flush()?;
        }
        use std::io::Seek;
        file.rewind()?;
        self.runs.push(file);
        self.buffer.clear();
        Ok(())
    }

    /// The records in order (repeats kept).
    pub fn finish(mut self) -> io::Result<Sorted<N>> {
        self.buffer.sort_unstable();
        if self.runs.is_empty() {
            return Ok(Sorted {
                source: Source::Memory(std::mem::take(&mut self.buffer).into_iter()),
                _dir: None,
            });
        }
        if !self.buffer.is_empty() {
            self.spill()?;
        }
        self.buffer = Vec::new();
        let mut readers: Vec<BufReader<File>> = self
            .runs
            .drain(..)
            .map(|f| BufReader::with_capacity(RUN_READ_BYTES, f))
            .collect();
        let mut heads = BinaryHeap::with_capacity(readers.len());
        for (i, reader) in readers.iter_mut().enumerate() {
            if let Some(record) = read_record(reader)? {
                heads.push(Reverse((record, i)));
            }
        }
        Ok(Sorted {
            source: Source::Runs { readers, heads },
            _dir: self.dir.take(),
        })
    }
}

/// Reads the next record of a run; None at its end.
fn read_record<const N: usize>(reader: &mut impl Read) -> io::Result<Option<[u8; N]>> {
    let mut record = [0u8; N];
    match reader.read_exact(&mut record) {
        Ok(()) => Ok(Some(record)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Sorted records, read from memory or merged from the runs on disk (removed when dropped).
pub struct Sorted<const N: usize> {
    source: Source<N>,
    _dir: Option<tempfile::TempDir>,
}

enum Source<const N: usize> {
    Memory(std::vec::IntoIter<[u8; N]>),
    Runs {
        readers: Vec<BufReader<File>>,
        heads: BinaryHeap<Reverse<([u8; N], usize)>>,
    },
}

impl<const N: usize> Iterator for Sorted<N> {
    type Item = io::Result<[u8; N]>;

    fn next(&mut self) -> Option<io::Result<[u8; N]>> {
        match &mut self.source {
            Source::Memory(records) => records.next().map(Ok),
            Source::Runs { readers, heads } => {
                let Reverse((record, run)) = heads.pop()?;
                match read_record(&mut readers[run]) {
                    Ok(Some(next)) => heads.push(Reverse((next, run))),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e)),
                }
                Some(Ok(record))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(values: &[u32]) -> Vec<[u8; 4]> {
        values.iter().map(|v| v.to_be_bytes()).collect()
    }

    fn sorted(sort: SpillSort<4>) -> Vec<u32> {
        sort.finish()
            .unwrap()
            .map(|r| u32::from_be_bytes(r.unwrap()))
            .collect()
    }

    #[test]
    fn records_come_back_in_order_from_memory_and_from_runs_on_disk() {
        // A pseudo-random sequence with repeats, larger than several buffers.
        let values: Vec<u32> = (0..10_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761) % 3_000)
            .collect();
        let mut expected = values.clone();
        expected.sort_unstable();

        let mut in_memory = SpillSort::<4>::new(1 << 20);
        in_memory.extend(records(&values)).unwrap();
        assert!(in_memory.runs.is_empty());
        assert_eq!(sorted(in_memory), expected);

        // The smallest buffer (1,024 records) spills ten runs.
        let mut spilled = SpillSort::<4>::new(0);
        spilled.extend(records(&values)).unwrap();
        assert_eq!(spilled.runs.len(), 9);
        assert_eq!(spilled.len(), 10_000);
        assert_eq!(sorted(spilled), expected);

        assert!(sorted(SpillSort::<4>::new(0)).is_empty());
    }
}
