//! Parquet tables: one file per batch, with the Cumulus schema for the batch (the FHIR R4
//! wide-shallow schema plus what the batch holds).

use anyhow::{Context, Result};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::arrow_rows::to_record_batch;
use super::{BatchedFiles, OnWritten, RowBatch, TableKind, TableWriter};

/// A table written as Parquet files.
pub struct ParquetTable {
    files: BatchedFiles,
    kind: TableKind,
}

impl ParquetTable {
    /// A writer over the table's files.
    pub fn new(files: BatchedFiles, kind: TableKind) -> ParquetTable {
        ParquetTable { files, kind }
    }
}

impl TableWriter for ParquetTable {
    fn write_batch(&mut self, batch: &RowBatch<'_>, on_written: OnWritten) {
        on_written(self.write_file(batch));
    }

    fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.files.record_deletes(ids)
    }
}

impl ParquetTable {
    fn write_file(&mut self, batch: &RowBatch<'_>) -> Result<()> {
        let record_batch = to_record_batch(&self.kind, batch)?;
        let schema = record_batch.schema();
        let path = self.files.next_path()?;
        let file =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
        writer.write(&record_batch)?;
        writer
            .close()
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}
