//! Splits input files into bundles of whole lines, the unit of work a source reads under the
//! memory budget. Plain files are memory-mapped and cut at newlines up front, so any worker can
//! take any bundle; gzip files are streamed by one worker, a bundle at a time.

use std::io::{BufRead, BufReader, Read};
use std::sync::Arc;

use anyhow::{Context, Result};
use memmap2::Mmap;

use super::discovery::InputFile;
use super::i2b2::{BadRow, CsvToFhir, is_i2b2_csv};

/// A unit of work handed to a source.
pub enum WorkItem {
    /// Lines `[start, end)` of a memory-mapped file; `first_line` is 1-based, and `lines`
    /// counts the newlines in the slice.
    Slice {
        file: Arc<InputFile>,
        map: Arc<Mmap>,
        start: usize,
        end: usize,
        first_line: u64,
        lines: u64,
    },
    /// A compressed file, an i2b2 CSV or an S3 object, read as a stream, a bundle at a time,
    /// by whichever worker holds it.
    Stream { file: Arc<InputFile> },
    /// A stream opened and partly read.
    Open {
        file: Arc<InputFile>,
        reader: Box<StreamReader>,
    },
}

impl WorkItem {
    /// The file this item reads.
    pub fn file(&self) -> &Arc<InputFile> {
        match self {
            WorkItem::Slice { file, .. }
            | WorkItem::Stream { file }
            | WorkItem::Open { file, .. } => file,
        }
    }

    /// Whether it is read as a stream (one bundle at a time, in order).
    pub fn is_stream(&self) -> bool {
        !matches!(self, WorkItem::Slice { .. })
    }
}

/// Cuts every file into work items of about `bundle_bytes`.
pub fn plan(files: &[InputFile], bundle_bytes: usize) -> Result<Vec<WorkItem>> {
    let mut items = Vec::new();
    for f in files {
        let file = Arc::new(f.clone());
        let local = f.object.local_path();
        let streamed = f.object.is_gz() || super::i2b2::is_i2b2_csv(f.object.file_name());
        let Some(path) = local.filter(|_| !streamed) else {
            // Compressed and CSV files, and objects in S3, are read as a stream.
            if f.size > 0 {
                items.push(WorkItem::Stream { file });
            }
            continue;
        };
        let handle = std::fs::File::open(&path).with_context(|| format!("opening {}", f.name()))?;
        if handle.metadata()?.len() == 0 {
            continue;
        }
        // SAFETY: bulk-export files are not modified while the ETL reads them (documented in
        // the README); a concurrent writer would be a misuse we cannot guard against.
        let map = Arc::new(unsafe { Mmap::map(&handle) }?);
        let _ = map.advise(memmap2::Advice::Sequential);
        let bounds = crate::json::lines::bundle_bounds(&map, bundle_bytes);
        let mut line = 1u64;
        for ((start, end), lines) in bounds.iter().copied().zip(count_lines(&map, &bounds)) {
            items.push(WorkItem::Slice {
                file: file.clone(),
                map: map.clone(),
                start,
                end,
                first_line: line,
                lines,
            });
            line += lines;
        }
    }
    Ok(items)
}

/// The newlines of each slice, counted on every core (the workers start only once planning
/// is done), each slice's pages released once read: without that, planning's one read of the
/// whole file would leave its pages resident.
fn count_lines(map: &Mmap, bounds: &[(usize, usize)]) -> Vec<u64> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per_thread = bounds.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let counting: Vec<_> = bounds
            .chunks(per_thread)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|&(start, end)| {
                            let lines = memchr::memchr_iter(b'\n', &map[start..end]).count();
                            release_pages(map, start, end);
                            lines as u64
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        counting
            .into_iter()
            .flat_map(|t| t.join().expect("counting lines does not panic"))
            .collect()
    })
}

/// Drops a slice's pages from this process's resident set once read, so RSS follows the
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

/// Reads a compressed NDJSON file, or an i2b2 CSV converted to NDJSON, a bundle at a time.
pub struct StreamReader {
    reader: BufReader<Box<dyn Read + Send>>,
    csv: Option<CsvToFhir>,
    pub next_line: u64,
    pub finished: bool,
    /// CSV rows skipped while reading the last bundle.
    pub bad_rows: Vec<BadRow>,
}

impl StreamReader {
    /// Opens the file for streaming.
    pub fn open(file: &InputFile) -> Result<StreamReader> {
        let csv = if is_i2b2_csv(file.object.file_name()) {
            Some(CsvToFhir::open(file, file.object.open_decoded()?)?)
        } else {
            None
        };
        let reader = match csv {
            // The CSV reader has the file; this one is never read.
            Some(_) => Box::new(std::io::empty()),
            None => file.object.open_decoded()?,
        };
        Ok(StreamReader {
            reader: BufReader::with_capacity(1 << 20, reader),
            csv,
            next_line: 1,
            finished: false,
            bad_rows: Vec::new(),
        })
    }

    /// Appends whole lines to `buf` until it holds at least `bundle_bytes` (or the file ends).
    /// Returns the 1-based number of the first line read (for a CSV, the line of the first
    /// record). A read error (a truncated or corrupt archive) ends the stream and is returned
    /// with the line it happened on.
    pub fn next_bundle(
        &mut self,
        buf: &mut Vec<u8>,
        bundle_bytes: usize,
    ) -> (u64, Option<(u64, String)>) {
        if let Some(csv) = &mut self.csv {
            let first = csv.next_line;
            let (bad, error) = csv.next_bundle(buf, bundle_bytes);
            self.bad_rows = bad;
            self.finished = csv.finished;
            return (first, error);
        }
        let first = self.next_line;
        while buf.len() < bundle_bytes {
            match self.reader.read_until(b'\n', buf) {
                Ok(0) => {
                    self.finished = true;
                    break;
                }
                Ok(_) => self.next_line += 1,
                Err(e) => {
                    self.finished = true;
                    // Drop the partial line: it cannot be trusted.
                    if let Some(pos) = buf.iter().rposition(|&b| b == b'\n') {
                        buf.truncate(pos + 1);
                    } else {
                        buf.clear();
                    }
                    return (first, Some((self.next_line, e.to_string())));
                }
            }
        }
        (first, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_end_on_line_boundaries_and_count_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("Patient.ndjson");
        let text: String = (0..100).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let root = crate::store::ObjectLocation::local(dir.path()).unwrap();
        let f = InputFile {
            object: root.object("Patient.ndjson"),
            resource_type: "Patient".into(),
            size: text.len() as u64,
        };
        let items = plan(&[f], 64).unwrap();
        assert!(items.len() > 5);
        let mut expected_line = 1;
        let mut joined = Vec::new();
        for item in &items {
            let WorkItem::Slice {
                map,
                start,
                end,
                first_line,
                lines,
                ..
            } = item
            else {
                panic!()
            };
            assert_eq!(*first_line, expected_line);
            assert!(map[*end - 1] == b'\n');
            let newlines = map[*start..*end].iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(*lines, newlines);
            expected_line += newlines;
            joined.extend_from_slice(&map[*start..*end]);
        }
        assert_eq!(joined, text.as_bytes());
    }
}
