//! NDJSON tables: one file per batch, sparse compact rows, as Cumulus ETL writes them.

use std::io::Write;

use anyhow::{Context, Result};

use super::{BatchedFiles, OnWritten, RowBatch, TableWriter};

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
    fn write_batch(&mut self, batch: &RowBatch<'_>, on_written: OnWritten) {
        on_written.done(self.write_file(batch));
    }

    fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.files.record_deletes(ids)
    }
}

impl NdjsonTable {
    fn write_file(&mut self, batch: &RowBatch<'_>) -> Result<()> {
        let (mut out, name) = self.files.next_file()?;
        for row in &batch.rows {
            out.write_all(row)
                .and_then(|()| out.write_all(b"\n"))
                .with_context(|| format!("writing {name}"))?;
        }
        out.finish()
    }
}
