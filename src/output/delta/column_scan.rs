//! Reads one string column of every active data file of a table, and nothing else of them: the
//! `id` column, for a row index that must list every key of a table another tool wrote
//! (`etl::rerun`). A data file is read a row group at a time, so memory follows one row group
//! of one column.
//!
//! Rows a deletion vector removes are read too: what the caller gets is a superset of the live
//! values, which is what a key set that decides "this key is new, append it" needs (a key
//! wrongly thought present costs a MERGE; one wrongly thought absent would be a duplicate).

use anyhow::{Context, Result, anyhow};
use arrow::array::{Array, AsArray, StringArray};
use arrow::datatypes::DataType;
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
        #[allow(deprecated)]
        let reader = ParquetObjectReader::new(store.clone(), path.clone())
            .with_file_size(u64::try_from(file.size()).unwrap_or(0));
        let builder = ParquetRecordBatchStreamBuilder::new(reader)
            .await
            .with_context(|| format!("opening {path}"))?;
        let mask = ProjectionMask::columns(builder.parquet_schema(), [column]);
        if !builder.schema().fields().iter().any(|f| f.name() == column) {
            return Err(anyhow!("{path} has no column '{column}'"));
        }
        let mut batches = builder
            .with_projection(mask)
            .build()
            .with_context(|| format!("reading {path}"))?;
        while let Some(batch) = batches.next().await {
            let batch = batch.with_context(|| format!("reading {path}"))?;
            let column = batch.column(0);
            let column = arrow::compute::cast(column, &DataType::Utf8)?;
            let strings = column.as_string::<i32>();
            values += strings.len() as u64;
            each(strings)?;
        }
    }
    Ok(values)
}
