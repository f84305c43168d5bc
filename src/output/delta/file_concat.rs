//! Joins Parquet data files of one schema into one by copying their row groups' encoded column
//! chunks: no row is decoded or encoded, so joining costs about what reading and writing the
//! bytes costs. The joined file is streamed to the store as it is written (a multipart upload,
//! [`ObjectWriter::upload`]), holding one upload part at a time, and one input file when the
//! store is not local (a local one is copied from the file itself).

use anyhow::{Context, Result, anyhow};
use deltalake::logstore::ObjectStoreRef;
use deltalake::logstore::object_store::{GetResultPayload, ObjectStoreExt};
use parquet::column::writer::ColumnCloseResult;
use parquet::file::metadata::{PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader};
use parquet::file::properties::WriterProperties;
use parquet::file::reader::ChunkReader;
use parquet::file::writer::SerializedFileWriter;
use std::sync::Arc;
use tokio::runtime::Handle;

use crate::store::objects::ObjectWriter;

/// The footer of the data file at `path` (of `size` bytes).
pub async fn footer(
    store: &ObjectStoreRef,
    path: &deltalake::Path,
    size: u64,
) -> Result<ParquetMetaData> {
    // The reader delta-rs 1.1's own file reader uses (see `file_merge::read_file`).
    #[allow(deprecated)]
    let mut reader =
        parquet::arrow::async_reader::ParquetObjectReader::new(store.clone(), path.clone())
            .with_file_size(size);
    ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .load_and_finish(&mut reader, size)
        .await
        .with_context(|| format!("reading the footer of {path}"))
}

/// Whether files with these footers can be joined: the same Parquet schema, column for column.
pub fn same_schema(footers: &[ParquetMetaData]) -> bool {
    let mut schemas = footers.iter().map(|f| f.file_metadata().schema());
    match schemas.next() {
        Some(first) => schemas.all(|other| other == first),
        None => true,
    }
}

/// Writes the row groups of `inputs` (paths and their footers, all of one schema, see
/// [`same_schema`]) in order as the file `out` in `store`; returns its size in bytes. Runs on a
/// thread outside the runtime, which `runtime` names. A failure leaves no file behind.
pub fn join(
    runtime: &Handle,
    store: &ObjectStoreRef,
    inputs: &[(deltalake::Path, ParquetMetaData)],
    out: &deltalake::Path,
) -> Result<u64> {
    let first = inputs
        .first()
        .map(|(_, footer)| footer.file_metadata())
        .ok_or_else(|| anyhow!("nothing to join into {out}"))?;
    // The writer's own key-value metadata (the Arrow schema) and creator, as the inputs have them.
    let properties = WriterProperties::builder()
        .set_key_value_metadata(first.key_value_metadata().cloned())
        .set_created_by(
            first
                .created_by()
                .unwrap_or(parquet::file::properties::DEFAULT_CREATED_BY)
                .to_string(),
        )
        .build();
    let schema = first.schema_descr().root_schema_ptr();
    let sink = ObjectWriter::upload(store.clone(), out.clone());
    let mut writer = SerializedFileWriter::new(sink, schema, Arc::new(properties))?;
    for (path, footer) in inputs {
        let got = runtime
            .block_on(store.get(path))
            .with_context(|| format!("reading {path}"))?;
        // A local file is copied from the file itself, not read whole into memory first.
        let copied = match got.payload {
            GetResultPayload::File(file, _) => append_row_groups(&mut writer, &file, footer),
            GetResultPayload::Stream(_) => {
                let bytes = runtime
                    .block_on(got.bytes())
                    .with_context(|| format!("reading {path}"))?;
                append_row_groups(&mut writer, &bytes, footer)
            }
        };
        copied.with_context(|| format!("copying {path}"))?;
    }
    let sink = writer.into_inner().context("finishing the joined file")?;
    let size = sink.written();
    sink.finish().with_context(|| format!("writing {out}"))?;
    Ok(size)
}

/// Copies every row group of the file `bytes` (its contents or the file itself; its footer is
/// `footer`) into `writer`.
fn append_row_groups<W: std::io::Write + Send, R: ChunkReader>(
    writer: &mut SerializedFileWriter<W>,
    bytes: &R,
    footer: &ParquetMetaData,
) -> Result<()> {
    for (index, group) in footer.row_groups().iter().enumerate() {
        let offsets = footer.offset_index().and_then(|all| all.get(index));
        let mut out = writer.next_row_group()?;
        for (column, chunk) in group.columns().iter().enumerate() {
            let close = ColumnCloseResult {
                bytes_written: u64::try_from(chunk.compressed_size())?,
                rows_written: u64::try_from(group.num_rows())?,
                metadata: chunk.clone(),
                bloom_filter: None,
                column_index: None,
                offset_index: offsets.and_then(|row| row.get(column)).cloned(),
            };
            out.append_column(bytes, close)?;
        }
        out.close()?;
    }
    Ok(())
}
