//! Data files encoded by the worker that queues a batch. Its rows are decoded a slice at a time
//! and streamed into a Parquet file of the table; the committer then only records the file in
//! the log (an `Add` action). Encoding so runs on the workers' cores under their own
//! back-pressure, a batch is never decoded whole, and no query is planned per batch.

use anyhow::{Context, Result};
use arrow::datatypes::SchemaRef;
use deltalake::kernel::Add;
use deltalake::logstore::ObjectStoreRef;
use deltalake::logstore::object_store::ObjectStoreExt;
use deltalake::operations::write::WriterStatsConfig;
use deltalake::operations::write::writer::{DeltaWriter, WriterConfig};

use super::conform::conform_batch;
use super::ledger::key_fingerprints;
use crate::output::ENCODE_SLICE_ROWS;
use crate::output::UnfitRow;
use crate::output::columns::rows_to_record_batch;

/// Where a table's data files go and how they are written.
pub struct TableFiles {
    store: ObjectStoreRef,
    stats: WriterStatsConfig,
    runtime: tokio::runtime::Handle,
}

/// Files written for one batch, not yet in the table's log.
pub struct WrittenFiles {
    pub adds: Vec<Add>,
    /// The schema the files were written with (the table's, grown by the batch).
    pub schema: SchemaRef,
    /// Fingerprints of the rows' keys.
    pub keys: Vec<u64>,
    /// Rows left out because they do not fit the schema (the files hold the others).
    pub unfit: Vec<UnfitRow>,
}

impl TableFiles {
    /// Files in the table behind `store`, with the table's statistics settings; `runtime`
    /// drives the store's uploads.
    pub fn new(
        store: ObjectStoreRef,
        stats: WriterStatsConfig,
        runtime: tokio::runtime::Handle,
    ) -> TableFiles {
        TableFiles {
            store,
            stats,
            runtime,
        }
    }

    /// Decodes `rows` (of `schema`) a slice at a time, reshapes them to `target` and writes
    /// them as one file; keys are fingerprinted on `uniqueness`. Must not be called from
    /// within an async runtime. A failure leaves no file behind.
    pub fn write(
        &self,
        rows: &[&[u8]],
        schema: &SchemaRef,
        target: &SchemaRef,
        uniqueness: &[String],
    ) -> Result<WrittenFiles> {
        let mut writer = self.writer(target);
        let mut keys = Vec::with_capacity(rows.len());
        let mut unfit = Vec::new();
        let encoded = self.runtime.block_on(async {
            for slice in rows.chunks(ENCODE_SLICE_ROWS) {
                let decoded = rows_to_record_batch(schema.clone(), slice)
                    .context("rows do not fit the table's FHIR schema")?;
                unfit.extend(UnfitRow::from_decode(slice, &decoded.unfit));
                keys.extend(key_fingerprints(uniqueness, &decoded.batch, &[])?);
                writer
                    .write(&conform_batch(&decoded.batch, target)?)
                    .await?;
            }
            anyhow::Ok(())
        });
        if let Err(e) = encoded {
            let _ = self.runtime.block_on(writer.abort());
            return Err(e);
        }
        let adds = self
            .runtime
            .block_on(writer.close())
            .context("writing a data file")?;
        Ok(WrittenFiles {
            adds,
            schema: target.clone(),
            keys,
            unfit,
        })
    }

    /// A writer of data files of `schema` for this table (one file until it is closed), with
    /// the table's statistics settings and this project's Parquet settings.
    pub fn writer(&self, schema: &SchemaRef) -> DeltaWriter {
        let config = WriterConfig::new(
            schema.clone(),
            Vec::new(),
            Some(crate::output::parquet::writer_properties()),
            None,
            Some(ENCODE_SLICE_ROWS),
            self.stats.num_indexed_cols,
            self.stats.stats_columns.clone(),
        );
        DeltaWriter::new(self.store.clone(), config)
    }

    /// Removes files that will not be committed (their batch is merged instead).
    pub fn discard(&self, files: &WrittenFiles) {
        self.runtime.block_on(self.remove(&files.adds));
    }

    /// Removes written files that will not be committed; a file that cannot be removed is
    /// only reported (it is not in the table, and VACUUM removes it later).
    pub async fn remove(&self, adds: &[Add]) {
        for add in adds {
            let path = deltalake::Path::from(add.path.as_str());
            if let Err(e) = self.store.delete(&path).await {
                crate::say!("warning: could not remove the unused data file {path}: {e}");
            }
        }
    }
}
