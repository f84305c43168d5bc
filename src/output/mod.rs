//! Table outputs: a writer per table that turns batches of rows into files (NDJSON, Parquet), the
//! completion tables, and the run metadata (job config, summaries, context).

pub mod job;
pub mod json;
pub mod ndjson;
pub mod parquet;

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::fhir::Shape;

/// The output table formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Deltalake,
    Parquet,
    Ndjson,
}

impl OutputFormat {
    /// The name used on the command line and in job configs.
    pub fn name(self) -> &'static str {
        match self {
            OutputFormat::Deltalake => "deltalake",
            OutputFormat::Parquet => "parquet",
            OutputFormat::Ndjson => "ndjson",
        }
    }
}

/// What kind of rows a table holds, which decides its schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableKind {
    /// FHIR resources of one type.
    Fhir(String),
    /// `etl__completion_encounters`.
    CompletionEncounters,
    /// `etl__completion`.
    Completion,
}

/// One batch of rows to write: compact JSON lines and their combined shape.
pub struct RowBatch<'a> {
    pub rows: Vec<&'a [u8]>,
    pub shape: &'a Shape,
}

/// Writes batches of one table.
pub trait TableWriter: Send {
    /// Writes one batch as one file (an empty batch still creates the table).
    fn write_batch(&mut self, batch: &RowBatch<'_>) -> Result<()>;
    /// Records ids deleted by the export (already anonymized).
    fn delete_ids(&mut self, ids: &[String]) -> Result<()>;
}

/// Creates the writer for a table in the chosen format.
pub fn open_table(
    format: OutputFormat,
    root: &Path,
    table: &str,
    kind: TableKind,
) -> Result<Box<dyn TableWriter>> {
    let files = BatchedFiles::new(root, table, format.name());
    Ok(match format {
        OutputFormat::Ndjson => Box::new(ndjson::NdjsonTable::new(files)),
        OutputFormat::Parquet => Box::new(parquet::ParquetTable::new(files, kind)),
        OutputFormat::Deltalake => anyhow::bail!("the Delta Lake output is not available yet"),
    })
}

/// `<root>/<table>/<table>.NNN.<ext>`, numbered from the next free index.
pub struct BatchedFiles {
    pub dir: PathBuf,
    pub table: String,
    ext: &'static str,
    next_index: Option<usize>,
}

impl BatchedFiles {
    /// Files of `table` under `root`.
    pub fn new(root: &Path, table: &str, ext: &'static str) -> BatchedFiles {
        BatchedFiles {
            dir: root.join(table),
            table: table.to_string(),
            ext,
            next_index: None,
        }
    }

    /// The path for the next batch file.
    pub fn next_path(&mut self) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let index = match self.next_index {
            Some(i) => i,
            None => {
                let prefix = format!("{}.", self.table);
                let suffix = format!(".{}", self.ext);
                std::fs::read_dir(&self.dir)?
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.strip_prefix(&prefix)?
                            .strip_suffix(&suffix)?
                            .parse::<usize>()
                            .ok()
                    })
                    .map(|i| i + 1)
                    .max()
                    .unwrap_or(0)
            }
        };
        self.next_index = Some(index + 1);
        Ok(self
            .dir
            .join(format!("{}.{index:03}.{}", self.table, self.ext)))
    }

    /// Appends deleted ids to `<table>/<table>.meta`, as Cumulus ETL's file formats do.
    pub fn record_deletes(&self, ids: &[String]) -> Result<()> {
        let path = self.dir.join(format!("{}.meta", self.table));
        let mut meta: serde_json::Value = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        let mut sorted = ids.to_vec();
        sorted.sort();
        let list = meta
            .as_object_mut()
            .expect("meta is an object")
            .entry("deleted")
            .or_insert_with(|| serde_json::json!([]));
        if let Some(list) = list.as_array_mut() {
            list.extend(sorted.into_iter().map(serde_json::Value::String));
        }
        crate::store::write_atomic(&path, &serde_json::to_vec_pretty(&meta)?)
    }
}
