//! NDJSON tables: one file per batch, sparse compact rows, as Cumulus ETL writes them.

use std::io::Write;

use anyhow::{Context, Result};

use crate::store::ObjectWriter;

use super::{BatchWriter, BatchedFiles, NextFile, OnWritten, RowBatch, TableWriter};

/// A table written as NDJSON files.
pub struct NdjsonTable {
    files: BatchedFiles,
}

impl NdjsonTable {
    /// A writer over the table's files.
    pub fn new(files: BatchedFiles) -> NdjsonTable {
        NdjsonTable { files }
    }
}

impl TableWriter for NdjsonTable {
    fn next_batch(&mut self) -> Box<dyn BatchWriter> {
        Box::new(NdjsonBatch(self.files.next_file()))
    }

    fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.files.record_deletes(ids)
    }

    fn flush(&mut self) {
        self.files.wait_for_files();
    }
}

/// One batch file of an NDJSON table.
struct NdjsonBatch(Result<NextFile>);

impl BatchWriter for NdjsonBatch {
    fn write(self: Box<Self>, batch: &RowBatch<'_>, on_written: OnWritten) {
        match self
            .0
            .and_then(|file| Ok((write_file(&file, batch)?, file)))
        {
            Ok((out, file)) => file.finish(out, on_written),
            Err(e) => on_written.done(Err(e)),
        }
    }
}

/// Bytes of a batch's text written at a time: as large as the file's buffer, so each piece
/// goes straight to the file, in writes of the size the buffer made before. Whole runs of
/// lines (a chunk's, up to 8 MiB) were measured with more system time, though not in every
/// state of the build machine (`docs/performance.md`).
const WRITE_BYTES: usize = crate::store::objects::WRITE_BUFFER_BYTES;

/// Writes the batch's lines; the file is not finished yet.
fn write_file(file: &NextFile, batch: &RowBatch<'_>) -> Result<ObjectWriter> {
    let (mut out, name) = file.create()?;
    let written = match batch.lines.is_empty() {
        true => batch
            .rows
            .iter()
            .try_for_each(|row| out.write_all(row).and_then(|()| out.write_all(b"\n"))),
        false => batch
            .lines
            .iter()
            .flat_map(|lines| lines.chunks(WRITE_BYTES))
            .try_for_each(|piece| out.write_all(piece)),
    };
    written.with_context(|| format!("writing {name}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex, mpsc};

    use super::*;
    use crate::fhir::Shape;
    use crate::store::{ObjectLocation, Syncer};

    #[test]
    fn batch_files_appear_whole_once_the_syncer_has_them_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let root = ObjectLocation::local(dir.path()).unwrap();
        let syncer = Arc::new(Syncer::new());
        let files = BatchedFiles::new(&root, "patient", "ndjson", Some(syncer.clone()));
        let mut table = NdjsonTable::new(files);
        // The syncer is kept busy, so the batch's file waits behind this job.
        let (release, gate) = mpsc::channel::<()>();
        syncer.run(move || gate.recv().unwrap());
        let reported = Arc::new(Mutex::new(None));
        let seen = reported.clone();
        let shape = Shape::default();
        let rows: Vec<&[u8]> = vec![b"{\"id\":\"a\"}", b"{\"id\":\"b\"}"];
        table.write_batch(
            &RowBatch::of_rows(rows, &shape),
            OnWritten::new(move |result| *seen.lock().unwrap() = Some(result.is_ok())),
        );
        let path = dir.path().join("patient/patient.000.ndjson");
        assert!(!path.exists(), "not in place before the syncer gets to it");
        assert_eq!(*reported.lock().unwrap(), None, "not reported before");
        release.send(()).unwrap();
        table.flush();
        assert_eq!(*reported.lock().unwrap(), Some(true));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"id\":\"a\"}\n{\"id\":\"b\"}\n");
    }
}
