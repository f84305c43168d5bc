//! The line numbers of a memory-mapped file's slices, counted as the slices are read. A
//! message about a bad line names its number, so a slice needs the count of every line before
//! it. Counting them all in a pass before the run read the whole input before any bundle was
//! processed: an export not in the page cache was read from disk twice, and the workers waited
//! for it. Now a slice's lines are counted by the worker that processes it, as it goes through
//! them, and a slice's first line is the sum of the counts before it, worked out only when a
//! message (or a re-run's index) asks for it ([`FirstLine`]). A slice not counted yet is
//! counted by whoever needs it first (two counting at once get the same answer).
//!
//! Runs that need every count before they start (a cluster run, whose processes each take a
//! share of the slices) count them all at once with [`count_all`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::Mmap;

use crate::json::lines::count_newlines;

/// A count or line number not known yet.
const NOT_YET: u64 = u64::MAX;

/// Newlines counted in some bytes of a file, to estimate how many lines a slice holds before
/// anyone has read it. The bytes are those read anyway while the file is cut into slices (a
/// little at each cut, and its start): sampling through the map before the run made the
/// workers wait for the main thread to fault in a megabyte of every file (0.15 s on the
/// realistic 1 GB export, most of it waiting on pages the kernel had let go).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LineSample {
    pub newlines: u64,
    pub bytes: u64,
}

impl LineSample {
    /// Adds the newlines of `bytes` to the sample.
    pub fn add(&mut self, bytes: &[u8]) {
        self.newlines += count_newlines(bytes);
        self.bytes += bytes.len() as u64;
    }

    /// Newlines per byte (at least one newline is assumed, so no estimate is zero lines).
    fn density(&self) -> f64 {
        self.newlines.max(1) as f64 / self.bytes.max(1) as f64
    }
}

/// A memory-mapped file cut into slices of whole lines, and their line numbers as far as
/// they are known.
pub struct MappedFile {
    map: Mmap,
    bounds: Vec<(usize, usize)>,
    /// Newlines in each slice, or `NOT_YET`.
    newlines: Vec<AtomicU64>,
    /// The (1-based) number of each slice's first line, or `NOT_YET`.
    first_lines: Vec<AtomicU64>,
    /// Newlines per byte where the file was sampled.
    density: f64,
}

impl MappedFile {
    /// A mapped file cut at `bounds` (consecutive `(start, end)` ranges from 0), none counted;
    /// slices are estimated from `sample` until they are.
    pub fn new(map: Mmap, bounds: Vec<(usize, usize)>, sample: LineSample) -> MappedFile {
        let unknown = || (0..bounds.len()).map(|_| AtomicU64::new(NOT_YET)).collect();
        let first_lines: Vec<AtomicU64> = unknown();
        if let Some(first) = first_lines.first() {
            first.store(1, Ordering::Relaxed);
        }
        MappedFile {
            map,
            newlines: unknown(),
            first_lines,
            bounds,
            density: sample.density(),
        }
    }

    /// How many slices the file is cut into.
    pub fn slices(&self) -> usize {
        self.bounds.len()
    }

    /// The byte range of a slice.
    pub fn range(&self, slice: usize) -> (usize, usize) {
        self.bounds[slice]
    }

    /// The bytes of a slice.
    pub fn bytes(&self, slice: usize) -> &[u8] {
        let (start, end) = self.bounds[slice];
        &self.map[start..end]
    }

    /// The newlines of a slice, counted now if no one has.
    pub fn newlines(&self, slice: usize) -> u64 {
        match self.newlines[slice].load(Ordering::Relaxed) {
            NOT_YET => {
                let counted = count_newlines(self.bytes(slice));
                self.newlines[slice].store(counted, Ordering::Relaxed);
                counted
            }
            known => known,
        }
    }

    /// The number of a slice's first line: one more than the newlines of the slices before
    /// it, counting any not counted yet.
    pub fn first_line(&self, slice: usize) -> u64 {
        let known = |k: usize| self.first_lines[k].load(Ordering::Relaxed);
        let mut from = slice;
        while known(from) == NOT_YET {
            from -= 1;
        }
        let mut line = known(from);
        for k in from..slice {
            line += self.newlines(k);
            self.first_lines[k + 1].store(line, Ordering::Relaxed);
        }
        line
    }

    /// The first line of a slice its reader has just taken, for a reader that numbers every
    /// line as it goes: its own newlines are counted first, since the reader of the next slice
    /// will need them at once too (and counting brings the slice's pages in for the reading
    /// that follows).
    pub fn first_line_when_taken(&self, slice: usize) -> u64 {
        self.newlines(slice);
        self.first_line(slice)
    }

    /// Records a slice's newlines, counted by a reader that went through all its lines, so
    /// that no one counts them again.
    pub fn read_through(&self, slice: usize, newlines: u64) {
        debug_assert_eq!(newlines, count_newlines(self.bytes(slice)));
        self.newlines[slice].store(newlines, Ordering::Relaxed);
    }

    /// The lines of a slice: its newlines, and its last line if it has no line end (the end
    /// of the file).
    pub fn lines(&self, slice: usize) -> u64 {
        let bytes = self.bytes(slice);
        self.newlines(slice) + u64::from(bytes.last().is_some_and(|&b| b != b'\n'))
    }

    /// A slice's newlines if counted, otherwise an estimate from the file's sample.
    pub fn estimated_newlines(&self, slice: usize) -> u64 {
        match self.newlines[slice].load(Ordering::Relaxed) {
            NOT_YET => {
                let (start, end) = self.bounds[slice];
                ((end - start) as f64 * self.density).round() as u64
            }
            known => known,
        }
    }

    /// Asks the kernel to start reading a slice from disk, if there is one, so that its pages
    /// are in the page cache when a worker takes it (cheap when they already are).
    pub fn prefetch(&self, slice: usize) {
        if let Some(&(start, end)) = self.bounds.get(slice) {
            let _ = self
                .map
                .advise_range(memmap2::Advice::WillNeed, start, end - start);
        }
    }

    /// Drops a slice's pages from this process's resident set once read (`release_pages`).
    pub fn release(&self, slice: usize) {
        let (start, end) = self.bounds[slice];
        release_pages(&self.map, start, end);
    }
}

/// Where a bundle's lines are numbered from. Most readers name a line only in a message
/// about it, so a slice's first line is worked out only when asked for: its reader goes
/// through its lines once and records their count ([`FirstLine::read_through`]), instead of
/// counting them in a pass of their own first.
#[derive(Clone)]
pub enum FirstLine {
    /// A stream's bundle, whose reader numbers lines as it reads them.
    Known(u64),
    /// A slice of a mapped file.
    Slice(Arc<MappedFile>, usize),
}

impl FirstLine {
    /// The number of the first line, the newlines of earlier slices counted now if no one has.
    pub fn get(&self) -> u64 {
        match self {
            FirstLine::Known(line) => *line,
            FirstLine::Slice(file, slice) => file.first_line(*slice),
        }
    }

    /// The number of the first line, for a reader that numbers every line as it goes (see
    /// [`MappedFile::first_line_when_taken`]).
    pub fn get_for_every_line(&self) -> u64 {
        match self {
            FirstLine::Known(line) => *line,
            FirstLine::Slice(file, slice) => file.first_line_when_taken(*slice),
        }
    }

    /// Records the bundle's newlines, once its reader went through all its lines.
    pub fn read_through(&self, newlines: u64) {
        if let FirstLine::Slice(file, slice) = self {
            file.read_through(*slice, newlines);
        }
    }
}

/// Counts the newlines of every slice of `files` now, on every core, in shares of about equal
/// bytes, each slice's pages released once counted: without that, one read of the whole
/// input would leave its pages resident.
pub fn count_all(files: &[&MappedFile]) {
    let slices: Vec<(&MappedFile, usize)> = files
        .iter()
        .flat_map(|f| (0..f.slices()).map(move |s| (*f, s)))
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let size = |&(f, s): &(&MappedFile, usize)| f.bytes(s).len();
    let total: usize = slices.iter().map(size).sum();
    let share = total.div_ceil(threads).max(1);
    let mut parts = Vec::new();
    let (mut from, mut bytes) = (0, 0);
    for (i, slice) in slices.iter().enumerate() {
        bytes += size(slice);
        if bytes >= share {
            parts.push(&slices[from..=i]);
            (from, bytes) = (i + 1, 0);
        }
    }
    parts.push(&slices[from..]);
    std::thread::scope(|scope| {
        for part in parts {
            scope.spawn(move || {
                for &(file, slice) in part {
                    file.newlines(slice);
                    file.release(slice);
                }
            });
        }
    });
}

/// Drops a range's pages from this process's resident set once read, so RSS follows the
/// memory budget rather than the input size. The mapping is read-only and file-backed: a later
/// touch (a neighbouring slice sharing a page) reads the same bytes again from the page cache.
pub fn release_pages(map: &Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let aligned = start / PAGE * PAGE;
    // SAFETY: MADV_DONTNEED on a read-only shared file mapping never changes its contents.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, aligned, end - aligned)
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(text: &str, target: usize) -> (tempfile::NamedTempFile, MappedFile) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        // SAFETY: a private temporary file no one else writes.
        let map = unsafe { Mmap::map(file.as_file()) }.unwrap();
        let bounds = crate::json::lines::bundle_bounds(&map, target);
        let mut sample = LineSample::default();
        sample.add(&map[..map.len().min(4000)]);
        (file, MappedFile::new(map, bounds, sample))
    }

    /// Lines that hold their numbers (all as long, but for a longer one every hundred).
    fn numbered(lines: usize) -> String {
        let line = |i| match i % 100 {
            0 => format!("{{\"line\":{i:05},\"long\":\"{}\"}}\n", "x".repeat(200)),
            _ => format!("{{\"line\":{i:05}}}\n"),
        };
        (1..=lines).map(line).collect()
    }

    /// The number of the line each slice starts with, read from the line itself.
    fn true_first_lines(file: &MappedFile) -> Vec<u64> {
        (0..file.slices())
            .map(|s| {
                let text = std::str::from_utf8(file.bytes(s)).unwrap();
                let digits: String = text[8..].chars().take_while(char::is_ascii_digit).collect();
                digits.parse().unwrap()
            })
            .collect()
    }

    #[test]
    fn first_lines_are_right_in_any_order_of_asking() {
        let (_keep, file) = mapped(&numbered(500), 100);
        assert!(file.slices() > 20);
        let expected = true_first_lines(&file);
        // Late slices first, with gaps, then the rest.
        for s in (0..file.slices()).rev().step_by(3) {
            assert_eq!(file.first_line(s), expected[s], "slice {s}");
        }
        for (s, &first) in expected.iter().enumerate() {
            assert_eq!(file.first_line(s), first, "slice {s}");
        }
        let lines: u64 = (0..file.slices()).map(|s| file.lines(s)).sum();
        assert_eq!(lines, 500);
    }

    #[test]
    fn first_lines_agree_when_asked_from_several_threads_at_once() {
        let (_keep, file) = mapped(&numbered(3000), 64);
        let expected = true_first_lines(&file);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (file, expected) = (&file, &expected);
                scope.spawn(move || {
                    for s in (t..file.slices()).step_by(2) {
                        file.newlines(s);
                        assert_eq!(file.first_line(s), expected[s], "slice {s}");
                    }
                });
            }
        });
    }

    #[test]
    fn slices_counted_by_their_readers_number_the_slices_after_them() {
        let (_keep, file) = mapped(&numbered(900), 80);
        let file = Arc::new(file);
        let expected = true_first_lines(&file);
        // Readers go through every other slice, as two workers would, and record the count.
        for s in (0..file.slices()).step_by(2) {
            let newlines = crate::json::lines::split_lines(file.bytes(s)).count() - 1;
            FirstLine::Slice(file.clone(), s).read_through(newlines as u64);
        }
        for s in (1..file.slices()).step_by(2) {
            assert_eq!(file.newlines[s].load(Ordering::Relaxed), NOT_YET);
        }
        // Asked for late, the others are counted then.
        for (s, &first) in expected.iter().enumerate().rev() {
            assert_eq!(FirstLine::Slice(file.clone(), s).get(), first, "slice {s}");
        }
        assert_eq!(FirstLine::Known(42).get_for_every_line(), 42);
    }

    #[test]
    fn counting_all_at_once_gives_the_same_numbers() {
        let (_keep_a, a) = mapped(&numbered(700), 90);
        let (_keep_b, b) = mapped("{\"line\":1}\n{\"line\":2}", 4);
        count_all(&[&a, &b]);
        for file in [&a, &b] {
            let expected = true_first_lines(file);
            for (s, &first) in expected.iter().enumerate() {
                assert_ne!(file.newlines[s].load(Ordering::Relaxed), NOT_YET);
                assert_eq!(file.first_line(s), first);
            }
        }
        // The last line has no line end, and still counts.
        assert_eq!(b.lines(b.slices() - 1), 1);
        assert_eq!(b.newlines(b.slices() - 1), 0);
    }

    #[test]
    fn uncounted_slices_are_estimated_from_the_sample() {
        let (_keep, file) = mapped(&numbered(5000), 4000);
        let last = file.slices() - 1;
        let estimate = file.estimated_newlines(last - 1);
        let counted = file.newlines(last - 1);
        let off = estimate.abs_diff(counted) as f64 / counted as f64;
        assert!(off < 0.1, "estimated {estimate}, counted {counted}");
        assert_eq!(file.estimated_newlines(last - 1), counted, "a count wins");
    }
}
