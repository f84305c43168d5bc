//! What a run has decided about one Delta table so far, shared by the workers that queue its
//! batches and the committer that applies them in queue order.
//!
//! A batch is routed (appended or merged) when it is queued, not when it is committed: workers
//! encode appended batches into data files themselves, so the decision must be made before the
//! committer sees the batch, and every later decision must see it.

use std::hash::{Hash, Hasher};

use anyhow::{Result, anyhow};
use arrow::array::{Array, ArrayRef, StringArray};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::conform::union_schema;
use crate::memory::budget::HeldMemory;

/// Shards of the key set. Each grows on its own, so a growth copies a sixty-fourth of the keys
/// rather than all of them beside a table twice the size.
const KEY_SHARDS: usize = 64;

/// Heap bytes of a hash table slot holding a key: the key and its control byte.
const KEY_SLOT_BYTES: u64 = 9;

/// How a batch reaches the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// New keys only, on a table that holds nothing but this run's appends.
    Append,
    /// Everything else: a MERGE on the table's keys.
    Merge,
}

/// The run's view of one table: its schema grown by every queued batch, whether plain appends
/// are still safe, and, while they are, the keys queued so far.
pub struct Ledger {
    schema: Option<SchemaRef>,
    append_only: bool,
    queued_keys: KeySet,
    /// Where the key set's memory is counted (shared by the run's tables).
    held: HeldMemory,
}

impl Ledger {
    /// A table with `schema` (None: it does not exist yet); `append_only` when it holds no rows.
    /// The keys it keeps are counted in `held`.
    pub fn new(schema: Option<SchemaRef>, append_only: bool, held: HeldMemory) -> Ledger {
        Ledger {
            schema,
            append_only,
            queued_keys: KeySet::default(),
            held,
        }
    }

    /// The schema a batch is written with: the table's, grown by the batch's new fields (an
    /// incompatible type change fails the batch). Later batches start from it.
    pub fn widen(&mut self, batch: &SchemaRef) -> Result<SchemaRef> {
        let schema = match &self.schema {
            Some(known) => union_schema(known, batch)?,
            None => batch.clone(),
        };
        self.schema = Some(schema.clone());
        Ok(schema)
    }

    /// Routes a batch with these key fingerprints, recording them while the table takes
    /// appends. Once a batch is merged the table no longer holds only this run's fresh rows, so
    /// every later batch merges too, and the keys are no longer needed.
    pub fn route(&mut self, keys: &[u64]) -> Route {
        if self.append_only && keys.iter().all(|k| !self.queued_keys.contains(*k)) {
            let before = self.queued_keys.heap_bytes();
            keys.iter().for_each(|k| self.queued_keys.insert(*k));
            self.held.change(before, self.queued_keys.heap_bytes());
            Route::Append
        } else {
            self.stop_appending();
            Route::Merge
        }
    }

    /// Rows were deleted from the table, or a batch merged: later batches must merge.
    pub fn stop_appending(&mut self) {
        if std::mem::replace(&mut self.append_only, false) {
            let keys = std::mem::take(&mut self.queued_keys);
            self.held.change(keys.heap_bytes(), 0);
        }
    }

    /// True while batches are still appended (so writing their files ahead pays).
    pub fn appending(&self) -> bool {
        self.append_only
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        self.held.change(self.queued_keys.heap_bytes(), 0);
    }
}

/// The key fingerprints queued to a table that takes appends, in shards.
struct KeySet {
    shards: Vec<foldhash::HashSet<u64>>,
}

impl Default for KeySet {
    fn default() -> KeySet {
        KeySet {
            shards: (0..KEY_SHARDS).map(|_| Default::default()).collect(),
        }
    }
}

impl KeySet {
    /// The shard of a key: its top bits (the shard's hash table places keys by other bits).
    fn shard(key: u64) -> usize {
        (key >> (64 - KEY_SHARDS.trailing_zeros())) as usize
    }

    fn contains(&self, key: u64) -> bool {
        self.shards[Self::shard(key)].contains(&key)
    }

    fn insert(&mut self, key: u64) {
        self.shards[Self::shard(key)].insert(key);
    }

    /// Heap bytes of the shards' tables (a table of capacity `c` has `c * 8 / 7` slots).
    fn heap_bytes(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.capacity() as u64 * 8 / 7 * KEY_SLOT_BYTES)
            .sum()
    }
}

/// A batch's key columns (`uniqueness`, top-level), or an error naming the one it lacks.
pub fn key_columns(batch: &RecordBatch, uniqueness: &[String]) -> Result<Vec<ArrayRef>> {
    uniqueness
        .iter()
        .map(|name| {
            batch
                .column_by_name(name)
                .cloned()
                .ok_or_else(|| anyhow!("the batch has no '{name}' column"))
        })
        .collect()
}

/// Fingerprints of a batch's keys (its `uniqueness` columns) and of the groups it touches.
pub fn key_fingerprints(
    uniqueness: &[String],
    batch: &RecordBatch,
    groups: &[String],
) -> Result<Vec<u64>> {
    let columns = key_columns(batch, uniqueness)?
        .iter()
        .zip(uniqueness)
        .map(|(column, name)| {
            arrow::compute::cast(column, &DataType::Utf8)
                .map_err(|e| anyhow!("'{name}' is not a usable key: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let columns: Vec<&StringArray> = columns
        .iter()
        .map(|c| c.as_any().downcast_ref::<StringArray>().expect("utf8"))
        .collect();
    let mut keys: Vec<u64> = (0..batch.num_rows())
        .map(|row| {
            let mut hasher = std::hash::DefaultHasher::new();
            for column in &columns {
                column.is_valid(row).hash(&mut hasher);
                column.value(row).hash(&mut hasher);
            }
            hasher.finish()
        })
        .collect();
    keys.extend(groups.iter().map(|g| {
        let mut hasher = std::hash::DefaultHasher::new();
        ("group", g).hash(&mut hasher);
        hasher.finish()
    }));
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    fn schema(fields: &[(&str, DataType)]) -> SchemaRef {
        Arc::new(Schema::new(
            fields
                .iter()
                .map(|(n, t)| Field::new(*n, t.clone(), true))
                .collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn fresh_keys_append_until_one_repeats_then_everything_merges() {
        let held = HeldMemory::default();
        let mut ledger = Ledger::new(None, true, held.clone());
        let high = u64::MAX - 1; // another shard than the small keys
        assert_eq!(ledger.route(&[1, 2, high]), Route::Append);
        assert_eq!(ledger.route(&[3]), Route::Append);
        assert!(held.bytes() > 0, "the keys of appended batches are counted");
        assert_eq!(ledger.route(&[4, high]), Route::Merge);
        assert_eq!(ledger.route(&[5]), Route::Merge, "no appends after a merge");
        assert!(!ledger.appending());
        assert_eq!(held.bytes(), 0, "keys are let go once the table merges");
    }

    #[test]
    fn a_table_with_rows_or_deletes_merges_and_keeps_no_keys() {
        let held = HeldMemory::default();
        let mut stored = Ledger::new(None, false, held.clone());
        assert_eq!(stored.route(&[1]), Route::Merge);
        assert_eq!(held.bytes(), 0);
        let mut ledger = Ledger::new(None, true, held.clone());
        assert_eq!(
            ledger.route(&[1]),
            Route::Append,
            "another table's keys are its own"
        );
        ledger.stop_appending();
        assert_eq!(ledger.route(&[2]), Route::Merge);
        assert_eq!(held.bytes(), 0);
    }

    #[test]
    fn tables_share_one_count_of_held_keys() {
        let held = HeldMemory::default();
        let mut a = Ledger::new(None, true, held.clone());
        let mut b = Ledger::new(None, true, held.clone());
        let keys: Vec<u64> = (0..10_000u64)
            .map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        assert_eq!(a.route(&keys), Route::Append);
        let one = held.bytes();
        assert!(one >= 10_000 * KEY_SLOT_BYTES, "{one}");
        assert_eq!(b.route(&keys), Route::Append);
        assert_eq!(held.bytes(), 2 * one);
        drop(a);
        assert_eq!(
            held.bytes(),
            one,
            "a closed table gives its keys' memory back"
        );
    }

    #[test]
    fn the_schema_grows_with_each_batch_and_keeps_stored_types() {
        let stored = schema(&[("id", DataType::Utf8), ("n", DataType::Int64)]);
        let mut ledger = Ledger::new(Some(stored), true, HeldMemory::default());
        let first = ledger
            .widen(&schema(&[("n", DataType::Int32), ("a", DataType::Utf8)]))
            .unwrap();
        let names: Vec<_> = first.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "n", "a"]);
        assert_eq!(first.field(1).data_type(), &DataType::Int64);
        let second = ledger.widen(&schema(&[("b", DataType::Utf8)])).unwrap();
        assert_eq!(second.fields().len(), 4, "{second:?}");
        assert!(
            ledger.widen(&schema(&[("id", DataType::Boolean)])).is_err(),
            "an incompatible type fails the batch"
        );
    }

    #[test]
    fn keys_differ_by_value_and_groups_by_name() {
        let batch = RecordBatch::try_new(
            schema(&[("id", DataType::Utf8)]),
            vec![Arc::new(StringArray::from(vec![
                Some("a"),
                Some("b"),
                None,
            ]))],
        )
        .unwrap();
        let keys = key_fingerprints(&["id".into()], &batch, &["a".into()]).unwrap();
        assert_eq!(keys.len(), 4);
        let distinct: std::collections::HashSet<u64> = keys.iter().copied().collect();
        assert_eq!(distinct.len(), 4, "a group named like a key is another key");
        assert!(key_fingerprints(&["missing".into()], &batch, &[]).is_err());
    }
}
