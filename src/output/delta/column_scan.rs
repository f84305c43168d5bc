//! Reads a few columns of data files and nothing else of them: the `id` column of every active
//! file, for a row index that must list every key of a table another tool wrote (`etl::rerun`),
//! and the clustering columns of the files a compaction clusters, to cut their key ranges
//! (`range_cluster`). A data file is read a row group at a time, so memory follows one row group
//! of those columns.
//!
//! Rows a deletion vector removes are read too: what the caller gets is a superset of the live
//! values, which is what a key set that decides "this key is new, append it" needs (a key
//! wrongly thought present costs a MERGE; one wrongly thought absent would be a duplicate).

use anyhow::{Context, Result, anyhow};
use arrow::array::{Array, AsArray, StringArray};
use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use futures::StreamExt;
use parquet::arrow::ProjectionMask;
// The reader delta-rs 1.1's own file reader uses; parquet 59.3 deprecates it in favour of an
// object-store adapter of one's own, which would be the same code.
#[allow(deprecated)]
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};

/// Gives `each` the values of `column` in every active data file of `table`, file after file;
/// returns how many values it gave. A table whose files name their columns otherwise (column
/// mapping) is refused.
pub async fn for_each_value(
    table: &deltalake::DeltaTable,
    column: &str,
    each: &mut (dyn FnMut(&StringArray) -> Result<()> + Send),
) -> Result<u64> {
    let state = table.snapshot()?;
    if super::file_merge::maps_columns(state) {
        return Err(anyhow!(
            "its data files name their columns by column mapping"
        ));
    }
    let store = table.log_store().object_store(None);
    let mut values = 0u64;
    for file in state.log_data().iter() {
        let path = file.object_store_path();
        let size = u64::try_from(file.size()).unwrap_or(0);
        for_each_batch(&store, &path, size, &[column], &mut |batch| {
            let column = arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
            let strings = column.as_string::<i32>();
            values += strings.len() as u64;
            each(strings)
        })
        .await?;
    }
    Ok(values)
}

/// Gives `each` the `columns` (top-level ones, in that order) of the data file at `path` (of
/// `size` bytes), a row group at a time.
pub async fn for_each_batch(
    store: &deltalake::logstore::ObjectStoreRef,
    path: &deltalake::Path,
    size: u64,
    columns: &[&str],
    each: &mut (dyn FnMut(&RecordBatch) -> Result<()> + Send),
) -> Result<()> {
    #[allow(deprecated)]
    let reader = ParquetObjectReader::new(store.clone(), path.clone()).with_file_size(size);
    let builder = ParquetRecordBatchStreamBuilder::new(reader)
        .await
        .with_context(|| format!("opening {path}"))?;
    let fields = builder.schema().fields().clone();
    for column in columns {
        if !fields.iter().any(|f| f.name() == column) {
            return Err(anyhow!("{path} has no column '{column}'"));
        }
    }
    let mask = ProjectionMask::columns(builder.parquet_schema(), columns.iter().copied());
    let mut batches = builder
        .with_projection(mask)
        .build()
        .with_context(|| format!("reading {path}"))?;
    while let Some(batch) = batches.next().await {
        let batch = batch.with_context(|| format!("reading {path}"))?;
        // The projection keeps the file's column order: put it in the caller's.
        let schema = batch.schema();
        let ordered = columns
            .iter()
            .map(|name| {
                let (i, _) = schema
                    .column_with_name(name)
                    .with_context(|| format!("{path} has no column '{name}'"))?;
                Ok(batch.column(i).clone())
            })
            .collect::<Result<Vec<_>>>()?;
        let fields: Vec<_> = columns
            .iter()
            .map(|name| schema.field_with_name(name).cloned())
            .collect::<Result<Vec<_>, _>>()?;
        let ordered = RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(fields)),
            ordered,
        )?;
        each(&ordered)?;
    }
    Ok(())
}
