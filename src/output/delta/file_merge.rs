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

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, DynComparator, RecordBatch, StructArray,
    TimestampMicrosecondArray, make_comparator,
};
use arrow::compute::{SortOptions, filter_record_batch, interleave_record_batch};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::row::{RowConverter, SortField};
use deltalake::datafile::DataFileReader;
use deltalake::datafile::reader::ParquetFileReader;
use deltalake::kernel::{Action, Add, Remove};
use futures::StreamExt;

use super::conform::conform_batch;
use super::files::TableFiles;
use super::ledger::key_columns;
use super::table::TableSpec;
use crate::output::ENCODE_SLICE_ROWS;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Why a table cannot be merged file by file, if it cannot: a raw read of its Parquet files
/// would misread it (physical column names, partition values kept in paths, or rows that a
/// deletion vector removes). Such tables use delta-rs's MERGE.
pub fn unsupported(table: &deltalake::DeltaTable) -> Result<Option<&'static str>> {
    let state = table.snapshot()?;
    let mapping = state
        .metadata()
        .configuration()
        .get("delta.columnMapping.mode");
    if mapping.is_some_and(|mode| !mode.eq_ignore_ascii_case("none")) {
        return Ok(Some("column mapping"));
    }
    if !state.metadata().partition_columns().is_empty() {
        return Ok(Some("partition columns"));
    }
    if state
        .log_data()
        .iter()
        .any(|file| file.deletion_vector_descriptor().is_some())
    {
        return Ok(Some("deletion vectors"));
    }
    Ok(None)
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

/// Merges `batches` (all of `schema`, the table's schema grown by the batches, with disjoint
/// keys) into the table's active files. Nothing is committed: the caller records the returned
/// actions. On error, files this call wrote are removed.
pub async fn merge_by_file(
    table: &deltalake::DeltaTable,
    files: &TableFiles,
    rules: MergeRules<'_>,
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
) -> Result<MergeOutcome> {
    let mut written: Vec<Add> = Vec::new();
    let result = merge_into(table, files, &rules, schema, batches, &mut written).await;
    if result.is_err() {
        files.remove(&written).await;
    }
    result
}

async fn merge_into(
    table: &deltalake::DeltaTable,
    files: &TableFiles,
    rules: &MergeRules<'_>,
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    written: &mut Vec<Add>,
) -> Result<MergeOutcome> {
    let mut source = Source::new(rules, schema, batches)?;
    let reader = ParquetFileReader::new(table.log_store().object_store(None));
    let state = table.snapshot()?;
    let mut outcome = MergeOutcome::default();
    let mut removes: Vec<Remove> = Vec::new();
    for file in state.log_data().iter() {
        let path = file.object_store_path();
        let read = || read_file(&reader, &path, schema);
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
        let mut writer = None;
        let mut slices = read().await?;
        let copied = async {
            while let Some(slice) = slices.next().await {
                let slice = slice.with_context(|| format!("reading {path}"))?;
                let fates = source.fates(&slice)?;
                if let Some(rows) = source.apply(&slice, &fates)? {
                    let writer = writer.get_or_insert_with(|| files.writer(schema));
                    writer.write(&rows).await?;
                }
            }
            anyhow::Ok(())
        }
        .await;
        if let Some(writer) = writer {
            if let Err(e) = copied {
                let _ = writer.abort().await;
                return Err(e);
            }
            written.extend(
                writer
                    .close()
                    .await
                    .context("writing a rewritten data file")?,
            );
        }
        copied?;
        removes.push(file.remove_action(true));
        outcome.files_rewritten += 1;
        outcome.rows_updated += changes.updated;
        outcome.rows_deleted += changes.deleted;
    }
    let inserts = source.unmatched()?;
    if !inserts.is_empty() {
        let mut writer = files.writer(schema);
        let encoded = async {
            for batch in &inserts {
                for start in (0..batch.num_rows()).step_by(ENCODE_SLICE_ROWS) {
                    let len = ENCODE_SLICE_ROWS.min(batch.num_rows() - start);
                    writer.write(&batch.slice(start, len)).await?;
                }
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = encoded {
            let _ = writer.abort().await;
            return Err(e);
        }
        written.extend(writer.close().await.context("writing inserted rows")?);
        outcome.rows_inserted = inserts.iter().map(RecordBatch::num_rows).sum();
    }
    outcome.actions = removes
        .into_iter()
        .map(Action::Remove)
        .chain(written.iter().cloned().map(Action::Add))
        .collect();
    Ok(outcome)
}

/// A data file's rows in slices, reshaped to `schema` (older files lack newer columns).
async fn read_file(
    reader: &ParquetFileReader,
    path: &deltalake::Path,
    schema: &SchemaRef,
) -> Result<futures::stream::BoxStream<'static, Result<RecordBatch>>> {
    let stream = reader
        .read_file(path.clone())
        .await
        .with_context(|| format!("opening {path}"))?;
    let schema = schema.clone();
    Ok(stream
        .map(move |slice| conform_batch(&slice?, &schema))
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

/// The MERGE's source rows, indexed by key, with which of them a stored row matched.
struct Source {
    batches: Vec<RecordBatch>,
    keys: RowConverter,
    key_names: Vec<String>,
    index: FastMap<Box<[u8]>, (u32, u32)>,
    matched: Vec<Vec<bool>>,
    /// Each batch's `meta.lastUpdated` as timestamps, when the schema has it.
    last_updated: Option<Vec<TimestampMicrosecondArray>>,
    update_existing: bool,
    group_field: Option<String>,
    groups: HashSet<String>,
}

impl Source {
    fn new(rules: &MergeRules<'_>, schema: &SchemaRef, batches: Vec<RecordBatch>) -> Result<Self> {
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
        let mut index = FastMap::default();
        let mut matched = Vec::with_capacity(batches.len());
        for (b, batch) in batches.iter().enumerate() {
            let columns = key_columns(batch, &key_names)?;
            let rows = keys.convert_columns(&columns)?;
            for (i, row) in rows.iter().enumerate() {
                if columns.iter().all(|c| c.is_valid(i)) {
                    // A later row of the same key wins, as the sink's dedup would have it.
                    index.insert(Box::<[u8]>::from(row.as_ref()), (b as u32, i as u32));
                }
            }
            matched.push(vec![false; batch.num_rows()]);
        }
        let last_updated = match last_updated_of(schema) {
            true => Some(
                batches
                    .iter()
                    .map(last_updated_times)
                    .collect::<Result<Vec<_>>>()?,
            ),
            false => None,
        };
        Ok(Source {
            batches,
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

    /// The fate of each row of a stored slice (conformed to the MERGE's schema); marks the
    /// source rows it matches.
    fn fates(&mut self, stored: &RecordBatch) -> Result<Vec<Fate>> {
        let columns = key_columns(stored, &self.key_names)?;
        let rows = self.keys.convert_columns(&columns)?;
        let stored_times = match &self.last_updated {
            Some(_) => Some(last_updated_times(stored)?),
            None => None,
        };
        let groups = match (&self.group_field, self.groups.is_empty()) {
            (Some(field), false) => Some(string_column(stored, field)?),
            _ => None,
        };
        // Comparators of this slice against each source batch, made when first needed.
        let mut comparators: Vec<Option<Vec<DynComparator>>> =
            (0..self.batches.len()).map(|_| None).collect();
        let mut fates = Vec::with_capacity(stored.num_rows());
        for (j, row) in rows.iter().enumerate() {
            let matched = columns
                .iter()
                .all(|c| c.is_valid(j))
                .then(|| self.index.get(row.as_ref()).copied())
                .flatten();
            let fate = match matched {
                Some((b, i)) => {
                    self.matched[b as usize][i as usize] = true;
                    let newer_stored = match (&stored_times, &self.last_updated) {
                        (Some(stored), Some(incoming)) => {
                            let incoming = &incoming[b as usize];
                            stored.is_valid(j)
                                && incoming.is_valid(i as usize)
                                && stored.value(j) > incoming.value(i as usize)
                        }
                        _ => false,
                    };
                    if !self.update_existing || newer_stored {
                        Fate::Keep
                    } else {
                        let compare = match &mut comparators[b as usize] {
                            Some(c) => c,
                            slot => {
                                slot.insert(row_comparators(stored, &self.batches[b as usize])?)
                            }
                        };
                        let differs = compare.iter().any(|c| c(j, i as usize) != Ordering::Equal);
                        if differs {
                            Fate::Replace(b, i)
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
    fn apply(&self, stored: &RecordBatch, fates: &[Fate]) -> Result<Option<RecordBatch>> {
        let indices: Vec<(usize, usize)> = fates
            .iter()
            .enumerate()
            .filter_map(|(j, fate)| match fate {
                Fate::Keep => Some((0, j)),
                Fate::Replace(b, i) => Some((*b as usize + 1, *i as usize)),
                Fate::Delete => None,
            })
            .collect();
        if indices.is_empty() {
            return Ok(None);
        }
        let mut inputs = Vec::with_capacity(self.batches.len() + 1);
        inputs.push(stored);
        inputs.extend(self.batches.iter());
        Ok(Some(interleave_record_batch(&inputs, &indices)?))
    }

    /// Source rows no stored row matched: the inserts.
    fn unmatched(&self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for (batch, matched) in self.batches.iter().zip(&self.matched) {
            let keep = BooleanArray::from(matched.iter().map(|m| !m).collect::<Vec<bool>>());
            let rows = filter_record_batch(batch, &keep)?;
            if rows.num_rows() > 0 {
                out.push(rows);
            }
        }
        Ok(out)
    }
}

/// Comparators of every column of `stored` against the same column of `incoming` (both of one
/// schema). Nulls compare equal to nulls, at any depth, as `IS NOT DISTINCT FROM` does.
fn row_comparators(stored: &RecordBatch, incoming: &RecordBatch) -> Result<Vec<DynComparator>> {
    stored
        .columns()
        .iter()
        .zip(incoming.columns())
        .map(|(a, b)| {
            Ok(make_comparator(
                a.as_ref(),
                b.as_ref(),
                SortOptions::default(),
            )?)
        })
        .collect()
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
