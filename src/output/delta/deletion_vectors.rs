//! Rows that a data file's deletion vector removes, so that a MERGE, a deletion or a
//! compaction that rewrites the file leaves them out (PROTOCOL.md: a deletion vector's rows are
//! not in the table). Tables with deletion vectors come from Spark (`delta.enableDeletionVectors`);
//! this tool reads them but writes none: a file it changes is rewritten without the deleted rows,
//! and its remove action carries the file's deletion vector, as the protocol asks.
//!
//! The vector is read by the Delta kernel (inline, or from its file in the table), on a
//! blocking thread since the kernel's storage reads block.

use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::BooleanArray;
use arrow::compute::filter_record_batch;
use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::kernel::DeletionVectorDescriptor;
use deltalake::logstore::LogStore as _;

/// The row positions (in file order) a file's deletion vector removes, sorted.
pub type DeletedRows = Arc<[u64]>;

/// Reads the rows `descriptor` removes from a file of `table`; None without a descriptor.
pub async fn deleted_rows(
    table: &DeltaTable,
    descriptor: Option<DeletionVectorDescriptor>,
) -> Result<Option<DeletedRows>> {
    let Some(descriptor) = descriptor else {
        return Ok(None);
    };
    let log_store = table.log_store();
    let mut root = log_store.root_url().clone();
    if !root.path().ends_with('/') {
        root.set_path(&format!("{}/", root.path()));
    }
    let engine = log_store.engine(None);
    let dv: delta_kernel::actions::deletion_vector::DeletionVectorDescriptor = descriptor
        .clone()
        .try_into()
        .context("a deletion vector descriptor")?;
    let mut rows =
        tokio::task::spawn_blocking(move || dv.row_indexes(engine.storage_handler(), &root))
            .await?
            .with_context(|| {
                format!(
                    "reading the deletion vector {} of the table",
                    descriptor.path_or_inline_dv
                )
            })?;
    rows.sort_unstable();
    Ok(Some(rows.into()))
}

/// Drops from `slice` (the file's rows from position `start` on) the rows in `deleted`.
pub fn drop_deleted(slice: &RecordBatch, start: u64, deleted: &[u64]) -> Result<RecordBatch> {
    let end = start + slice.num_rows() as u64;
    let from = deleted.partition_point(|&row| row < start);
    let to = deleted.partition_point(|&row| row < end);
    if from == to {
        return Ok(slice.clone());
    }
    let mut keep = vec![true; slice.num_rows()];
    for &row in &deleted[from..to] {
        keep[(row - start) as usize] = false;
    }
    Ok(filter_record_batch(slice, &BooleanArray::from(keep))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    #[test]
    fn deleted_positions_are_dropped_slice_by_slice() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let slice = |from: i64| {
            let values: Int64Array = (from..from + 4).collect::<Vec<_>>().into();
            RecordBatch::try_new(schema.clone(), vec![Arc::new(values)]).unwrap()
        };
        let deleted = [1, 4, 5, 9];
        let values = |batch: RecordBatch| {
            let column = batch
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            column.values().to_vec()
        };
        assert_eq!(
            values(drop_deleted(&slice(0), 0, &deleted).unwrap()),
            [0, 2, 3]
        );
        assert_eq!(
            values(drop_deleted(&slice(4), 4, &deleted).unwrap()),
            [6, 7]
        );
        assert_eq!(
            values(drop_deleted(&slice(8), 8, &deleted).unwrap()),
            [8, 10, 11]
        );
        assert_eq!(
            values(drop_deleted(&slice(12), 12, &deleted).unwrap()).len(),
            4
        );
    }
}
