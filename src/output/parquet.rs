//! Parquet tables: one file per batch, with the Cumulus schema for the batch (the FHIR R4
//! wide-shallow schema plus what the batch holds).

use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::json::ReaderBuilder;
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use super::{BatchedFiles, RowBatch, TableKind, TableWriter};
use crate::fhir::{ElementModel, resource_schema};

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

/// The fixed schemas of the completion tables (all strings, as upstream).
pub fn completion_schema(kind: &TableKind) -> Option<Schema> {
    let names: &[&str] = match kind {
        TableKind::CompletionEncounters => &[
            "encounter_id",
            "group_name",
            "export_time",
            "excluded_resources",
        ],
        TableKind::Completion => &[
            "table_name",
            "group_name",
            "export_time",
            "export_url",
            "etl_version",
            "etl_time",
            "excluded_resources",
        ],
        TableKind::Fhir(_) => return None,
    };
    Some(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}

/// Decodes compact JSON rows into one record batch of `schema`.
pub fn rows_to_record_batch(schema: Arc<Schema>, rows: &[&[u8]]) -> Result<RecordBatch> {
    let mut decoder = ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len().max(1))
        .build_decoder()?;
    let mut batches = Vec::new();
    for row in rows {
        let mut buf: &[u8] = row;
        while !buf.is_empty() {
            let used = decoder.decode(buf)?;
            if used == 0 {
                if let Some(b) = decoder.flush()? {
                    batches.push(b);
                }
                continue;
            }
            buf = &buf[used..];
        }
        decoder.decode(b"\n")?;
    }
    if let Some(b) = decoder.flush()? {
        batches.push(b);
    }
    if batches.is_empty() {
        return Ok(RecordBatch::new_empty(schema));
    }
    arrow::compute::concat_batches(&schema, &batches).map_err(|e| anyhow!(e))
}

impl TableWriter for ParquetTable {
    fn write_batch(&mut self, batch: &RowBatch<'_>) -> Result<()> {
        let schema = Arc::new(match &self.kind {
            TableKind::Fhir(resource_type) => {
                resource_schema(ElementModel::r4(), resource_type, batch.shape)
            }
            other => completion_schema(other).expect("completion table"),
        });
        let record_batch = rows_to_record_batch(schema.clone(), &batch.rows)
            .context("rows do not fit the table's FHIR schema")?;
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

    fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.files.record_deletes(ids)
    }
}
