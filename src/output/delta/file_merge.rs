//! MERGE by copy-on-write, one data file at a time, so that its memory follows the batch and
//! one slice of one file rather than the table.
//!
//! delta-rs's MERGE (1.1) holds every scanned file's decoded rows until it sees a change in that
//! file, and every file is scanned (ids are random hashes), so an unchanged re-run held the whole
//! table in memory, outside DataFusion's pool. Here each active file is read twice at most, in
//! slices: once to learn whether any of its rows change (and which source rows it matches), and,
//! only if one does, again to write its replacement. Source rows no file matched are inserted as
//! a new file. The removes and adds then go in as one commit.
//!
//! The rules are Cumulus ETL's, as the SQL MERGE expressed them: a matched row is replaced
//! unless the stored `meta.lastUpdated` is newer, and only if some column differs; a stored row
//! of a touched group that the source no longer has is deleted; `update_existing = false`
//! keeps matched rows as stored.

use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, RecordBatch, StructArray, TimestampMicrosecondArray,
};
use arrow::compute::{filter_record_batch, interleave_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use deltalake::datafusion::common::hash_utils::{QualityRandomState, create_hashes};
use deltalake::kernel::{Action, Add, Remove};
use deltalake::operations::write::writer::DeltaWriter;
use futures::StreamExt;
#[allow(deprecated)]
use parquet::arrow::async_reader::{ParquetObjectReader, ParquetRecordBatchStreamBuilder};

use super::conform::conform_batch;
use super::deletion_vectors::{DeletedRows, deleted_rows, drop_deleted};
use super::files::TableFiles;
use super::ledger::key_columns;
use super::merge_source::MergeSource;
use super::table::TableSpec;
use crate::fingerprint::fingerprint128;
use crate::output::ENCODE_SLICE_ROWS;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Why a table cannot be merged file by file, if it cannot: a raw read of its Parquet files
/// would misread it (physical column names, or partition values kept in paths). Such tables
/// use delta-rs's MERGE.
pub fn unsupported(table: &deltalake::DeltaTable) -> Result<Option<&'static str>> {
    let state = table.snapshot()?;
    if maps_columns(state) {
        return Ok(Some("column mapping"));
    }
    if !state.metadata().partition_columns().is_empty() {
        return Ok(Some("partition columns"));
    }
    Ok(None)
}

/// Whether the table's data files name their columns by column mapping (physical names), so
/// that reading them raw by the schema's names would misread them.
pub fn maps_columns(state: &deltalake::table::state::DeltaTableState) -> bool {
    state
        .metadata()
        .configuration()
        .get("delta.columnMapping.mode")
        .is_some_and(|mode| !mode.eq_ignore_ascii_case("none"))
}

/// What a MERGE did, in the log's actions and in counts for its report.
#[derive(Debug, Default)]
pub struct MergeOutcome {
    /// Removes of the rewritten files, then adds of their replacements and of the inserts.
    pub actions: Vec<Action>,
    pub files_rewritten: usize,
    pub rows_updated: usize,
    pub rows_deleted: usize,
    pub rows_inserted: usize,
}

/// How a MERGE treats stored rows.
pub struct MergeRules<'a> {
    pub spec: &'a TableSpec,
    /// Groups the source touches (for the group-field delete).
    pub groups: &'a [String],
}

/// Merges `source` (of the table's schema grown by the source, with disjoint keys) into the
/// table's active files. Nothing is committed: the caller records the returned actions. On
/// error, files this call wrote are removed.
pub async fn merge_by_file(
    table: &deltalake::DeltaTable,
    files: &TableFiles,
    rules: MergeRules<'_>,
    source: MergeSource,
) -> Result<MergeOutcome> {
    let mut written: Vec<Add> = Vec::new();
    let result = merge_into(table, files, &rules, source, &mut written).await;
    if result.is_err() {
        files.remove(&written).await;
    }
    result
}

async fn merge_into(
    table: &deltalake::DeltaTable,
    files: &TableFiles,
    rules: &MergeRules<'_>,
    source: MergeSource,
    written: &mut Vec<Add>,
) -> Result<MergeOutcome> {
    let schema = source.schema().clone();
    let mut source = Source::new(rules, source)?;
    let reader = SliceReader::new(table.log_store().object_store(None));
    let state = table.snapshot()?;
    let mut outcome = MergeOutcome::default();
    let mut removes: Vec<Remove> = Vec::new();
    for file in state.log_data().iter() {
        let path = file.object_store_path();
        let deleted = deleted_rows(table, file.deletion_vector_descriptor()).await?;
        let read = || read_file(&reader, &path, &schema, deleted.clone());
        // First pass: does any row of this file change?
        let mut changes = Changes::default();
        let mut slices = read().await?;
        while let Some(slice) = slices.next().await {
            let slice = slice.with_context(|| format!("reading {path}"))?;
            changes.add(&source.fates(&slice)?);
        }
        if !changes.any() {
            continue;
        }
        // Second pass: write the file again without its deleted rows and with its updates
        // (no file at all when every row is deleted).
        rewrite_file(read().await?, &path, files, &schema, written, |slice| {
            let fates = source.fates(slice)?;
            source.apply(slice, &fates)
        })
        .await?;
        removes.push(file.remove_action(true));
        outcome.files_rewritten += 1;
        outcome.rows_updated += changes.updated;
        outcome.rows_deleted += changes.deleted;
    }
    // Source rows no stored row matched, a slice at a time: the inserts.
    let mut inserts: Option<DeltaWriter> = None;
    let encoded = async {
        for n in 0..source.slice_count() {
            let Some(rows) = source.unmatched(n)? else {
                continue;
            };
            outcome.rows_inserted += rows.num_rows();
            let writer = inserts.get_or_insert_with(|| files.writer(&schema));
            for start in (0..rows.num_rows()).step_by(ENCODE_SLICE_ROWS) {
                let len = ENCODE_SLICE_ROWS.min(rows.num_rows() - start);
                writer.write(&rows.slice(start, len)).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    close_writer(inserts, encoded, "writing inserted rows", written).await?;
    outcome.actions = file_actions(removes, written);
    Ok(outcome)
}

/// Deletes the rows whose `column` (a string column) is one of `ids` from the table's active
/// files: each file holding one is written again without them (or removed, if none is left).
/// Nothing is committed: the caller records the returned actions. On error, files this call
/// wrote are removed.
pub async fn delete_by_file(
    table: &deltalake::DeltaTable,
    files: &TableFiles,
    column: &str,
    ids: &HashSet<&str>,
) -> Result<MergeOutcome> {
    let mut written: Vec<Add> = Vec::new();
    let result = delete_from(table, files, column, ids, &mut written).await;
    if result.is_err() {
        files.remove(&written).await;
    }
    result
}

async fn delete_from(
    table: &deltalake::DeltaTable,
    files: &TableFiles,
    column: &str,
    ids: &HashSet<&str>,
    written: &mut Vec<Add>,
) -> Result<MergeOutcome> {
    let state = table.snapshot()?;
    let schema = state.snapshot().arrow_schema();
    let reader = SliceReader::new(table.log_store().object_store(None));
    let kept = |slice: &RecordBatch| -> Result<BooleanArray> {
        let values = slice
            .column_by_name(column)
            .with_context(|| format!("the column '{column}'"))?;
        let values = arrow::compute::cast(values, &DataType::Utf8)?;
        Ok(values
            .as_string::<i32>()
            .iter()
            .map(|id| Some(!id.is_some_and(|id| ids.contains(id))))
            .collect())
    };
    let mut outcome = MergeOutcome::default();
    let mut removes: Vec<Remove> = Vec::new();
    for file in state.log_data().iter() {
        let path = file.object_store_path();
        let deleted = deleted_rows(table, file.deletion_vector_descriptor()).await?;
        let read = || read_file(&reader, &path, &schema, deleted.clone());
        let mut hits = 0;
        let mut slices = read().await?;
        while let Some(slice) = slices.next().await {
            let slice = slice.with_context(|| format!("reading {path}"))?;
            hits += kept(&slice)?.false_count();
        }
        if hits == 0 {
            continue;
        }
        rewrite_file(read().await?, &path, files, &schema, written, |slice| {
            Ok(Some(filter_record_batch(slice, &kept(slice)?)?))
        })
        .await?;
        removes.push(file.remove_action(true));
        outcome.files_rewritten += 1;
        outcome.rows_deleted += hits;
    }
    outcome.actions = file_actions(removes, written);
    Ok(outcome)
}

/// Writes a stored file's slices again as `rewrite` leaves each (None or no rows: nothing of
/// it) into one new file, recorded in `written`; no file at all when nothing is left.
async fn rewrite_file(
    mut slices: futures::stream::BoxStream<'static, Result<RecordBatch>>,
    path: &deltalake::Path,
    files: &TableFiles,
    schema: &SchemaRef,
    written: &mut Vec<Add>,
    mut rewrite: impl FnMut(&RecordBatch) -> Result<Option<RecordBatch>>,
) -> Result<()> {
    let mut writer = None;
    let copied = async {
        while let Some(slice) = slices.next().await {
            let slice = slice.with_context(|| format!("reading {path}"))?;
            if let Some(rows) = rewrite(&slice)?.filter(|rows| rows.num_rows() > 0) {
                let writer = writer.get_or_insert_with(|| files.writer(schema));
                writer.write(&rows).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    close_writer(writer, copied, "writing a rewritten data file", written).await
}

/// A commit's file actions: the removes, then the adds of the files written.
fn file_actions(removes: Vec<Remove>, written: &[Add]) -> Vec<Action> {
    removes
        .into_iter()
        .map(Action::Remove)
        .chain(written.iter().cloned().map(Action::Add))
        .collect()
}

/// Closes a writer once its rows are in, recording its files in `written`, or aborts it if
/// writing them failed; with no writer (no rows), just passes the outcome on.
pub async fn close_writer(
    writer: Option<DeltaWriter>,
    wrote: Result<()>,
    what: &'static str,
    written: &mut Vec<Add>,
) -> Result<()> {
    if let Some(writer) = writer {
        if let Err(e) = wrote {
            let _ = writer.abort().await;
            return Err(e);
        }
        written.extend(writer.close().await.context(what)?);
    }
    wrote
}

/// Reads a table's data files a slice of rows at a time.
#[derive(Clone)]
pub struct SliceReader {
    store: deltalake::logstore::ObjectStoreRef,
    slice_rows: usize,
}

/// Rows per slice unless told otherwise: Parquet's reader's default, which delta-rs's file
/// reader keeps, and what the memory of a MERGE file by file was measured with.
const SLICE_ROWS: usize = 1024;

impl SliceReader {
    /// Reads the data files in `store` in slices of 1,024 rows.
    pub fn new(store: deltalake::logstore::ObjectStoreRef) -> SliceReader {
        SliceReader {
            store,
            slice_rows: SLICE_ROWS,
        }
    }

    /// Reads in slices of `rows` rows instead.
    pub fn with_slice_rows(mut self, rows: usize) -> SliceReader {
        self.slice_rows = rows.max(1);
        self
    }
}

/// A data file's rows in slices, reshaped to `schema` (older files lack newer columns),
/// without the rows its deletion vector removes (`deleted`).
pub async fn read_file(
    reader: &SliceReader,
    path: &deltalake::Path,
    schema: &SchemaRef,
    deleted: Option<DeletedRows>,
) -> Result<futures::stream::BoxStream<'static, Result<RecordBatch>>> {
    // The reader delta-rs 1.1's own file reader uses; parquet 59.3 deprecates it in favour of
    // an object-store adapter of one's own, which would be the same code.
    #[allow(deprecated)]
    let file = ParquetObjectReader::new(reader.store.clone(), path.clone());
    let stream = ParquetRecordBatchStreamBuilder::new(file)
        .await
        .and_then(|builder| builder.with_batch_size(reader.slice_rows).build())
        .with_context(|| format!("opening {path}"))?;
    let schema = schema.clone();
    let mut position = 0u64;
    Ok(stream
        .map(move |slice| {
            let slice = slice?;
            let start = position;
            position += slice.num_rows() as u64;
            let live = match &deleted {
                Some(deleted) => drop_deleted(&slice, start, deleted)?,
                None => slice,
            };
            conform_batch(&live, &schema)
        })
        .boxed())
}

/// What becomes of one stored row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    /// Replaced by this source row (batch, row).
    Replace(u32, u32),
    Delete,
}

/// Counts of a file's changing rows.
#[derive(Default)]
struct Changes {
    updated: usize,
    deleted: usize,
}

impl Changes {
    fn add(&mut self, fates: &[Fate]) {
        for fate in fates {
            match fate {
                Fate::Keep => {}
                Fate::Replace(..) => self.updated += 1,
                Fate::Delete => self.deleted += 1,
            }
        }
    }

    fn any(&self) -> bool {
        self.updated + self.deleted > 0
    }
}

/// A source row's place in the index: where it is, and what a stored row is compared with.
struct Entry {
    slice: u32,
    row: u32,
    /// Fingerprint of the whole row ([`row_fingerprints`]).
    content: u64,
    /// `meta.lastUpdated` in UTC microseconds, [`NO_TIME`] when it is missing.
    last_updated: i64,
}

/// Stands for a missing `meta.lastUpdated` in the index.
const NO_TIME: i64 = i64::MIN;

/// Memory the index takes per source row (an [`Entry`] under a 128-bit key in a hash table
/// sized for the source, and its matched flag), for callers sizing a MERGE.
pub const INDEX_BYTES_PER_ROW: usize = 96;

/// The MERGE's source rows, indexed by key, with which of them a stored row matched. Only the
/// index is in memory for sure: the rows themselves come from [`MergeSource`] when needed.
struct Source {
    rows: MergeSource,
    keys: RowConverter,
    key_names: Vec<String>,
    index: FastMap<u128, Entry>,
    /// Per slice, per row: matched by a stored row, or superseded by a later source row of
    /// the same key; either way not an insert.
    matched: Vec<Vec<bool>>,
    /// The schema has `meta.lastUpdated`.
    last_updated: bool,
    update_existing: bool,
    group_field: Option<String>,
    groups: HashSet<String>,
}

impl Source {
    fn new(rules: &MergeRules<'_>, mut rows: MergeSource) -> Result<Self> {
        let schema = rows.schema().clone();
        let key_names = rules.spec.uniqueness.clone();
        let fields = key_names
            .iter()
            .map(|name| {
                let field = schema
                    .field_with_name(name)
                    .with_context(|| format!("the MERGE key column '{name}'"))?;
                Ok(SortField::new(field.data_type().clone()))
            })
            .collect::<Result<Vec<_>>>()?;
        let keys = RowConverter::new(fields)?;
        let last_updated = last_updated_of(&schema);
        let mut index: FastMap<u128, Entry> = FastMap::default();
        let mut matched: Vec<Vec<bool>> = Vec::new();
        rows.visit(|n, slice| {
            let columns = key_columns(slice, &key_names)?;
            let key_rows = keys.convert_columns(&columns)?;
            let contents = row_fingerprints(slice)?;
            let times = match last_updated {
                true => Some(last_updated_times(slice)?),
                false => None,
            };
            index.reserve(slice.num_rows());
            matched.push(vec![false; slice.num_rows()]);
            for (i, key) in key_rows.iter().enumerate() {
                if !columns.iter().all(|c| c.is_valid(i)) {
                    continue;
                }
                let entry = Entry {
                    slice: n as u32,
                    row: i as u32,
                    content: contents[i],
                    last_updated: time_at(times.as_ref(), i),
                };
                // A later row of the same key wins, as the sink's dedup would have it.
                if let Some(earlier) = index.insert(fingerprint128(key.as_ref()), entry) {
                    matched[earlier.slice as usize][earlier.row as usize] = true;
                }
            }
            Ok(())
        })?;
        Ok(Source {
            rows,
            keys,
            key_names,
            index,
            matched,
            last_updated,
            update_existing: rules.spec.update_existing,
            group_field: rules.spec.group_field.clone(),
            groups: rules.groups.iter().cloned().collect(),
        })
    }

    /// How many slices the source has.
    fn slice_count(&self) -> usize {
        self.matched.len()
    }

    /// The fate of each row of a stored slice (conformed to the MERGE's schema); marks the
    /// source rows it matches.
    fn fates(&mut self, stored: &RecordBatch) -> Result<Vec<Fate>> {
        let columns = key_columns(stored, &self.key_names)?;
        let rows = self.keys.convert_columns(&columns)?;
        let stored_times = match self.last_updated {
            true => Some(last_updated_times(stored)?),
            false => None,
        };
        let groups = match (&self.group_field, self.groups.is_empty()) {
            (Some(field), false) => Some(string_column(stored, field)?),
            _ => None,
        };
        // The stored rows' fingerprints, made when a first row needs comparing.
        let mut contents: Option<Vec<u64>> = None;
        let mut fates = Vec::with_capacity(stored.num_rows());
        for (j, row) in rows.iter().enumerate() {
            let matched = columns
                .iter()
                .all(|c| c.is_valid(j))
                .then(|| self.index.get(&fingerprint128(row.as_ref())))
                .flatten();
            let fate = match matched {
                Some(entry) => {
                    self.matched[entry.slice as usize][entry.row as usize] = true;
                    let stored_time = time_at(stored_times.as_ref(), j);
                    let newer_stored = stored_time != NO_TIME
                        && entry.last_updated != NO_TIME
                        && stored_time > entry.last_updated;
                    if !self.update_existing || newer_stored {
                        Fate::Keep
                    } else {
                        let contents = match &mut contents {
                            Some(c) => c,
                            slot => slot.insert(row_fingerprints(stored)?),
                        };
                        if contents[j] != entry.content {
                            Fate::Replace(entry.slice, entry.row)
                        } else {
                            Fate::Keep
                        }
                    }
                }
                None => match &groups {
                    Some(values) if values.is_valid(j) && self.groups.contains(values.value(j)) => {
                        Fate::Delete
                    }
                    _ => Fate::Keep,
                },
            };
            fates.push(fate);
        }
        Ok(fates)
    }

    /// The slice as it is after the MERGE (None when every row is deleted).
    fn apply(&mut self, stored: &RecordBatch, fates: &[Fate]) -> Result<Option<RecordBatch>> {
        // The source slices this stored slice takes rows from, each fetched once.
        let mut inputs = vec![stored.clone()];
        let mut input_of: FastMap<u32, usize> = FastMap::default();
        let mut indices: Vec<(usize, usize)> = Vec::with_capacity(fates.len());
        for (j, fate) in fates.iter().enumerate() {
            match *fate {
                Fate::Keep => indices.push((0, j)),
                Fate::Replace(slice, row) => {
                    let input = match input_of.get(&slice) {
                        Some(&input) => input,
                        None => {
                            inputs.push(self.rows.slice(slice as usize)?);
                            input_of.insert(slice, inputs.len() - 1);
                            inputs.len() - 1
                        }
                    };
                    indices.push((input, row as usize));
                }
                Fate::Delete => {}
            }
        }
        if indices.is_empty() {
            return Ok(None);
        }
        let inputs: Vec<&RecordBatch> = inputs.iter().collect();
        Ok(Some(interleave_record_batch(&inputs, &indices)?))
    }

    /// Rows of source slice `n` no stored row matched (None if there are none): inserts.
    fn unmatched(&mut self, n: usize) -> Result<Option<RecordBatch>> {
        let matched = &self.matched[n];
        if matched.iter().all(|&m| m) {
            return Ok(None);
        }
        let keep = BooleanArray::from(matched.iter().map(|m| !m).collect::<Vec<bool>>());
        let slice = self.rows.slice(n)?;
        Ok(Some(filter_record_batch(&slice, &keep)?))
    }
}

/// Fingerprints of whole rows (DataFusion's row hashes, which walk nested columns in place:
/// the row encoding allocated megabytes per slice and took half again as long). Equal rows
/// hash alike; unequal ones collide with a chance of about 2^-64, except that a null list and
/// an empty one (or a null struct and one of nulls) hash alike, which FHIR's JSON, having no
/// empty arrays, does not tell apart anyway.
fn row_fingerprints(batch: &RecordBatch) -> Result<Vec<u64>> {
    let mut hashes = vec![0u64; batch.num_rows()];
    let state = QualityRandomState::with_seed(0xa409_3822_299f_31d0);
    create_hashes(batch.columns(), &state, &mut hashes)?;
    Ok(hashes)
}

fn time_at(times: Option<&TimestampMicrosecondArray>, i: usize) -> i64 {
    match times {
        Some(times) if times.is_valid(i) => times.value(i),
        _ => NO_TIME,
    }
}

fn last_updated_of(schema: &SchemaRef) -> bool {
    matches!(
        schema.column_with_name("meta").map(|(_, f)| f.data_type()),
        Some(DataType::Struct(children)) if children.find("lastUpdated").is_some()
    )
}

/// `meta.lastUpdated` as UTC microseconds (time zones respected); null where it is missing,
/// and where it is not a timestamp, since rows missing the timestamp are updated.
fn last_updated_times(batch: &RecordBatch) -> Result<TimestampMicrosecondArray> {
    let meta = batch
        .column_by_name("meta")
        .context("a batch lacks the meta column")?;
    let meta: &StructArray = meta.as_struct();
    let value = meta
        .column_by_name("lastUpdated")
        .context("meta lacks lastUpdated")?;
    // A null meta nulls its lastUpdated.
    let value: ArrayRef = match meta.nulls() {
        Some(nulls) if nulls.null_count() > 0 => {
            let both = arrow::buffer::NullBuffer::union(Some(nulls), value.nulls());
            arrow::array::make_array(value.to_data().into_builder().nulls(both).build()?)
        }
        _ => value.clone(),
    };
    let timestamp = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let cast = arrow::compute::cast(&value, &timestamp)?;
    Ok(cast.as_primitive().clone())
}

/// A top-level column as strings (the group field).
fn string_column(batch: &RecordBatch, name: &str) -> Result<arrow::array::StringArray> {
    let column = batch
        .column_by_name(name)
        .with_context(|| format!("a batch lacks the group column '{name}'"))?;
    let strings = arrow::compute::cast(column, &DataType::Utf8)?;
    Ok(strings.as_string::<i32>().clone())
}
