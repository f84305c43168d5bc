//! Splits input files into bundles of whole lines, the unit of work a source reads under the
//! memory budget. Plain files are memory-mapped and cut at newlines up front, so any worker can
//! take any bundle; gzip files are streamed by one worker, a bundle at a time.

use std::io::Read;
use std::sync::Arc;

use anyhow::{Context, Result};
use memmap2::Mmap;

use super::discovery::InputFile;
use super::i2b2::{BadRow, CsvToFhir, is_i2b2_csv};
use super::line_numbers::{self, LineSample, MappedFile};

/// A unit of work handed to a source.
pub enum WorkItem {
    /// One slice of whole lines of a memory-mapped file (its lines numbered as they are read:
    /// `line_numbers`).
    Slice {
        file: Arc<InputFile>,
        mapped: Arc<MappedFile>,
        slice: usize,
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

    /// Input bytes of the item: its slice, or the whole file of a stream.
    pub fn bytes(&self) -> u64 {
        match self {
            WorkItem::Slice { mapped, slice, .. } => mapped.bytes(*slice).len() as u64,
            WorkItem::Stream { file } | WorkItem::Open { file, .. } => file.size,
        }
    }

    /// Another item for the same bundle (the same map, or the stream from its start), for a
    /// second reader such as a re-run's pre-scan; None for a stream already being read.
    pub fn duplicate(&self) -> Option<WorkItem> {
        match self {
            WorkItem::Slice {
                file,
                mapped,
                slice,
            } => Some(WorkItem::Slice {
                file: file.clone(),
                mapped: mapped.clone(),
                slice: *slice,
            }),
            WorkItem::Stream { file } => Some(WorkItem::Stream { file: file.clone() }),
            WorkItem::Open { .. } => None,
        }
    }

    /// Whether it is read as a stream (one bundle at a time, in order).
    pub fn is_stream(&self) -> bool {
        !matches!(self, WorkItem::Slice { .. })
    }
}

/// Cuts every file into work items of about `bundle_bytes`. A mapped file's lines are counted
/// as its slices are read (`line_numbers`), or all at once by [`count_all_lines`].
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
        let map = unsafe { Mmap::map(&handle) }?;
        let _ = map.advise(memmap2::Advice::Sequential);
        let (bounds, sample) = cut_file(&handle, map.len(), bundle_bytes)
            .with_context(|| format!("reading {}", f.name()))?;
        let mapped = Arc::new(MappedFile::new(map, bounds, sample));
        items.extend((0..mapped.slices()).map(|slice| WorkItem::Slice {
            file: file.clone(),
            mapped: mapped.clone(),
            slice,
        }));
    }
    Ok(items)
}

/// Bytes read at the start of a file to sample its lines (`LineSample`), beside those read at
/// its cuts: a small file is counted whole.
const START_SAMPLE_BYTES: usize = 16 << 10;

/// Cuts a file into slices of whole lines of about `target` bytes, reading a little at each
/// cut to find its line end. Not through the map: a page fault there waits for a readahead
/// of megabytes (0.6 s for the cuts of the realistic 1 GB when it is not in the page cache),
/// and the kernel maps a whole large folio at a time, which stays resident until its slices
/// are processed. The newlines of every byte read, and of the file's start, are its sample.
fn cut_file(
    file: &std::fs::File,
    len: usize,
    target: usize,
) -> std::io::Result<(Vec<(usize, usize)>, LineSample)> {
    use std::os::unix::fs::FileExt;
    let mut sample = LineSample::default();
    let mut buf = vec![0u8; START_SAMPLE_BYTES];
    let start = len.min(START_SAMPLE_BYTES);
    file.read_exact_at(&mut buf[..start], 0)?;
    sample.add(&buf[..start]);
    buf.truncate(4096);
    let bounds =
        crate::json::lines::cut_at_newlines(len, target, |mut from| -> std::io::Result<_> {
            while from < len {
                let read = file.read_at(&mut buf, from as u64)?;
                if read == 0 {
                    break;
                }
                sample.add(&buf[..read]);
                if let Some(at) = memchr::memchr(b'\n', &buf[..read]) {
                    return Ok(Some(from + at));
                }
                from += read;
            }
            Ok(None)
        })?;
    Ok((bounds, sample))
}

/// Counts the lines of every mapped file among `items` now (`line_numbers::count_all`), for a
/// run that needs every slice's line numbers before it starts.
pub fn count_all_lines(items: &[WorkItem]) {
    let mut files: Vec<&MappedFile> = Vec::new();
    for item in items {
        if let WorkItem::Slice { mapped, .. } = item
            && !files
                .last()
                .is_some_and(|f| std::ptr::eq(*f, mapped.as_ref()))
        {
            files.push(mapped);
        }
    }
    line_numbers::count_all(&files);
}

/// Bytes asked of a stream at a time once a bundle is full but has no line end yet.
const READ_BYTES: usize = 64 << 10;

/// Reads a compressed NDJSON file, an S3 object, or an i2b2 CSV converted to NDJSON, a bundle
/// at a time. Bytes are read in large blocks straight into the bundle, which is then cut after
/// its last line end (the rest starts the next bundle): no copy per line.
pub struct StreamReader {
    reader: Box<dyn Read + Send>,
    /// The start of a line read past the end of the last bundle (it holds no line end).
    carry: Vec<u8>,
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
        Ok(StreamReader::over(reader, csv))
    }

    fn over(reader: Box<dyn Read + Send>, csv: Option<CsvToFhir>) -> StreamReader {
        StreamReader {
            reader,
            carry: Vec::new(),
            csv,
            next_line: 1,
            finished: false,
            bad_rows: Vec::new(),
        }
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
        buf.extend_from_slice(&self.carry);
        self.carry.clear();
        // Read until the bundle is full and holds a line end (a line longer than a bundle is
        // read whole), or the stream ends.
        let (mut has_line_end, mut ended, mut error) = (false, false, None);
        while !(has_line_end && buf.len() >= bundle_bytes) {
            let start = buf.len();
            let want = bundle_bytes.saturating_sub(start).max(READ_BYTES);
            buf.resize(start + want, 0);
            match self.reader.read(&mut buf[start..]) {
                Ok(0) => {
                    buf.truncate(start);
                    ended = true;
                    break;
                }
                Ok(n) => {
                    buf.truncate(start + n);
                    has_line_end |= memchr::memchr(b'\n', &buf[start..]).is_some();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => buf.truncate(start),
                Err(e) => {
                    buf.truncate(start);
                    ended = true;
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        let whole_lines = memchr::memrchr(b'\n', buf).map_or(0, |end| end + 1);
        if !ended {
            self.carry.extend_from_slice(&buf[whole_lines..]);
        }
        if !ended || error.is_some() {
            // A partial line after a read error cannot be trusted: it is dropped.
            buf.truncate(whole_lines);
        }
        let mut lines = crate::json::lines::count_newlines(buf);
        if !buf.is_empty() && !buf.ends_with(b"\n") {
            lines += 1; // the last line of the stream, without a line end
        }
        self.next_line += lines;
        self.finished = ended;
        (first, error.map(|e| (self.next_line, e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Gives its data a few bytes at a time, then fails if asked to.
    struct Trickle {
        data: Vec<u8>,
        at: usize,
        step: usize,
        fail_at_end: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
            if self.at == self.data.len() && self.fail_at_end {
                return Err(std::io::Error::other("unexpected end of archive"));
            }
            let n = out.len().min(self.step).min(self.data.len() - self.at);
            out[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn bundles_of(text: &str, step: usize, bundle: usize, fail: bool) -> Vec<(u64, Vec<u8>)> {
        let reader = Trickle {
            data: text.as_bytes().to_vec(),
            at: 0,
            step,
            fail_at_end: fail,
        };
        let mut stream = StreamReader::over(Box::new(reader), None);
        let mut out = Vec::new();
        while !stream.finished {
            let mut buf = Vec::new();
            let (first, error) = stream.next_bundle(&mut buf, bundle);
            if let Some((line, _)) = error {
                out.push((line, b"ERROR".to_vec()));
            }
            out.push((first, buf));
        }
        out
    }

    #[test]
    fn streamed_bundles_hold_whole_lines_with_their_numbers() {
        let text: String = (1..=50).map(|i| format!("{{\"line\":{i}}}\n")).collect();
        for (step, bundle) in [(1, 1), (7, 40), (1000, 64), (3, 10_000)] {
            let bundles = bundles_of(&text, step, bundle, false);
            let mut joined = Vec::new();
            let mut line = 1;
            for (first, bytes) in &bundles {
                assert_eq!(*first, line, "step {step}, bundle {bundle}");
                assert!(bytes.is_empty() || bytes.ends_with(b"\n"));
                line += bytes.iter().filter(|&&b| b == b'\n').count() as u64;
                joined.extend_from_slice(bytes);
            }
            assert_eq!(joined, text.as_bytes(), "step {step}, bundle {bundle}");
        }
        // The last line needs no line end; a line longer than a bundle comes whole.
        let bundles = bundles_of(
            "{\"a\":1}\n{\"long\":\"xxxxxxxxxx\"}\n{\"b\":2}",
            4,
            5,
            false,
        );
        let texts: Vec<&[u8]> = bundles.iter().map(|(_, b)| b.as_slice()).collect();
        assert_eq!(
            texts,
            [
                &b"{\"a\":1}\n"[..],
                b"{\"long\":\"xxxxxxxxxx\"}\n",
                b"{\"b\":2}"
            ]
        );
        assert_eq!(bundles[2].0, 3);
    }

    #[test]
    fn a_read_error_keeps_the_whole_lines_and_names_the_broken_one() {
        let bundles = bundles_of("{\"a\":1}\n{\"b\":2}\n{\"c\":", 5, 1 << 20, true);
        assert_eq!(bundles[0], (3, b"ERROR".to_vec()));
        assert_eq!(bundles[1], (1, b"{\"a\":1}\n{\"b\":2}\n".to_vec()));
    }

    #[test]
    fn a_file_is_cut_where_the_text_in_memory_would_be() {
        // Lines longer than a read at a cut, a last line without an end, and lines of one byte.
        let long = "y".repeat(10_000);
        let text = format!("a\n{long}\nb\n\n{long}{long}\nc\nd");
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        for target in [1, 2, 100, 4096, 10_001, 30_000, 100_000] {
            let (cut, _) = cut_file(file.as_file(), text.len(), target).unwrap();
            let expected = crate::json::lines::bundle_bounds(text.as_bytes(), target);
            assert_eq!(cut, expected, "target {target}");
        }
    }

    #[test]
    fn the_bytes_read_while_cutting_sample_the_lines() {
        let write = |text: &str| {
            let mut file = tempfile::NamedTempFile::new().unwrap();
            std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
            file
        };
        // A small file is counted whole.
        let small = "{}\n".repeat(1000) + "{}";
        let file = write(&small);
        let (_, sample) = cut_file(file.as_file(), small.len(), 1 << 20).unwrap();
        assert_eq!((sample.newlines, sample.bytes), (1000, small.len() as u64));
        // A large one, from its start and its cuts: lines of 100 bytes at the start, of 1,000
        // beyond, so the cuts' reads pull the estimate towards the file's own density.
        let line = |len: usize| format!("{}\n", "x".repeat(len - 1));
        let large = line(100).repeat(200) + &line(1000).repeat(20_000);
        let file = write(&large);
        let (bounds, sample) = cut_file(file.as_file(), large.len(), 64 << 10).unwrap();
        assert!(bounds.len() > 300, "{} slices", bounds.len());
        let density = sample.newlines as f64 / sample.bytes as f64;
        let whole = 20_200.0 / large.len() as f64;
        assert!(
            (density / whole - 1.0).abs() < 0.15,
            "{density} against {whole}"
        );
    }

    #[test]
    fn slices_end_on_line_boundaries_and_number_lines_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::store::ObjectLocation::local(dir.path()).unwrap();
        let mut files = Vec::new();
        let mut texts = Vec::new();
        // Each file's numbers start at 1, and a stream keeps its place among them.
        for (name, rows) in [
            ("Patient.ndjson", 100),
            ("Condition.ndjson.gz", 3),
            ("Encounter.ndjson", 37),
            ("Device.ndjson", 1),
        ] {
            let text: String = (0..rows).map(|i| format!("{{\"n\":{i}}}\n")).collect();
            std::fs::write(dir.path().join(name), &text).unwrap();
            files.push(InputFile {
                object: root.object(name),
                resource_type: name.split('.').next().unwrap().into(),
                size: text.len() as u64,
            });
            texts.push(text);
        }
        let items = plan(&files, 64).unwrap();
        assert!(items.len() > 10);
        let mut names = Vec::new();
        let mut joined: HashMap<String, (Vec<u8>, u64)> = HashMap::new();
        for item in &items {
            let name = item.file().name().to_string();
            if names.last() != Some(&name) {
                names.push(name.clone());
            }
            let WorkItem::Slice { mapped, slice, .. } = item else {
                assert!(matches!(item, WorkItem::Stream { .. }), "{name}");
                continue;
            };
            let (text, next_line) = joined.entry(name).or_insert_with(|| (Vec::new(), 1));
            let bytes = mapped.bytes(*slice);
            assert_eq!(mapped.first_line(*slice), *next_line);
            assert!(bytes.ends_with(b"\n"));
            let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
            assert_eq!(mapped.newlines(*slice), newlines);
            *next_line += newlines;
            text.extend_from_slice(bytes);
        }
        let in_order: Vec<&str> = files.iter().map(|f| f.name()).collect();
        assert_eq!(names, in_order);
        for (f, text) in files.iter().zip(&texts) {
            if let Some((joined, _)) = joined.get(f.name()) {
                assert_eq!(joined, text.as_bytes(), "{}", f.name());
            }
        }
        assert_eq!(joined.len(), 3, "every mapped file was cut");
    }
}
