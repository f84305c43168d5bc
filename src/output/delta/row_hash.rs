//! Fingerprints of whole rows, for a MERGE to tell a changed row from an unchanged one without
//! comparing them column by column. Each column is hashed whole, nested columns in place (a
//! struct's children, a list's values, once each for the whole batch), and a row's hashes are
//! folded together. Equal rows hash alike; unequal ones collide with a chance of about 2^-64,
//! except that a null list and an empty one (or a null struct and one of nulls) differ only by
//! their null flag, which is hashed too.

use std::hash::BuildHasher;

use anyhow::{Result, anyhow};
use arrow::array::{Array, ArrayRef, AsArray, GenericListArray, OffsetSizeTrait, RecordBatch};
use arrow::datatypes::{ArrowPrimitiveType, DataType};

/// The seed of every hash here (a run's fingerprints must agree with each other only).
const SEED: u64 = 0xa409_3822_299f_31d0;

/// What a null hashes to, beside the values.
const NULL: u64 = 0x9e37_79b9_7f4a_7c15;

fn hash_bytes(bytes: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(SEED).hash_one(bytes)
}

/// Folds `value` into `acc`: order matters, so (a, b) and (b, a) differ.
fn fold(acc: u64, value: u64) -> u64 {
    let mixed = u128::from(acc ^ value.rotate_left(23)) * 0xff51_afd7_ed55_8ccd_u128;
    ((mixed >> 64) as u64) ^ (mixed as u64) ^ acc.rotate_left(31)
}

/// A fingerprint of every row of `batch`.
pub fn row_fingerprints(batch: &RecordBatch) -> Result<Vec<u64>> {
    let mut rows = vec![SEED; batch.num_rows()];
    for column in batch.columns() {
        let hashes = column_hashes(column)?;
        rows.iter_mut()
            .zip(hashes)
            .for_each(|(row, h)| *row = fold(*row, h));
    }
    Ok(rows)
}

/// A hash of every value of `array` (nulls included).
fn column_hashes(array: &ArrayRef) -> Result<Vec<u64>> {
    let mut hashes: Vec<u64> = match array.data_type() {
        DataType::Null => vec![NULL; array.len()],
        DataType::Utf8 => strings(array.as_string::<i32>().iter()),
        DataType::LargeUtf8 => strings(array.as_string::<i64>().iter()),
        DataType::Utf8View => strings(array.as_string_view().iter()),
        DataType::Binary => byte_strings(array.as_binary::<i32>().iter()),
        DataType::LargeBinary => byte_strings(array.as_binary::<i64>().iter()),
        DataType::Boolean => array
            .as_boolean()
            .iter()
            .map(|v| v.map_or(NULL, |b| hash_bytes(&[u8::from(b)])))
            .collect(),
        DataType::Int8 => primitive::<arrow::datatypes::Int8Type>(array),
        DataType::Int16 => primitive::<arrow::datatypes::Int16Type>(array),
        DataType::Int32 => primitive::<arrow::datatypes::Int32Type>(array),
        DataType::Int64 => primitive::<arrow::datatypes::Int64Type>(array),
        DataType::Float32 => primitive::<arrow::datatypes::Float32Type>(array),
        DataType::Float64 => primitive::<arrow::datatypes::Float64Type>(array),
        DataType::Date32 => primitive::<arrow::datatypes::Date32Type>(array),
        DataType::Timestamp(_, _) => {
            // Every unit is an i64 count; the column's type is the same for both sides.
            let values = arrow::compute::cast(array, &DataType::Int64)?;
            primitive::<arrow::datatypes::Int64Type>(&values)
        }
        DataType::Struct(_) => {
            let strukt = array.as_struct();
            let mut rows = vec![SEED; array.len()];
            for child in strukt.columns() {
                let child = column_hashes(child)?;
                rows.iter_mut()
                    .zip(child)
                    .for_each(|(row, h)| *row = fold(*row, h));
            }
            rows
        }
        DataType::List(_) => lists(array.as_list::<i32>())?,
        DataType::LargeList(_) => lists(array.as_list::<i64>())?,
        _ => {
            // Anything else a table from another tool holds: compared as its text.
            let text = arrow::compute::cast(array, &DataType::Utf8).map_err(|e| {
                anyhow!(
                    "a column of type {} cannot be compared: {e}",
                    array.data_type()
                )
            })?;
            strings(text.as_string::<i32>().iter())
        }
    };
    // A null is told from any value, and from an empty or all-null nested value.
    if let Some(nulls) = array.logical_nulls() {
        hashes
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| nulls.is_null(*i))
            .for_each(|(_, h)| *h = NULL);
    }
    Ok(hashes)
}

fn strings<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Vec<u64> {
    values
        .map(|v| v.map_or(NULL, |s| hash_bytes(s.as_bytes())))
        .collect()
}

fn byte_strings<'a>(values: impl Iterator<Item = Option<&'a [u8]>>) -> Vec<u64> {
    values.map(|v| v.map_or(NULL, hash_bytes)).collect()
}

fn primitive<T: ArrowPrimitiveType>(array: &ArrayRef) -> Vec<u64>
where
    T::Native: Bits,
{
    array
        .as_primitive::<T>()
        .iter()
        .map(|v| v.map_or(NULL, |v| hash_bytes(&v.bits().to_le_bytes())))
        .collect()
}

/// A list's hash: its length and its values' hashes, in order.
fn lists<O: OffsetSizeTrait>(list: &GenericListArray<O>) -> Result<Vec<u64>> {
    let values = column_hashes(list.values())?;
    let offsets = list.value_offsets();
    Ok(offsets
        .windows(2)
        .map(|w| {
            let (start, end) = (w[0].as_usize(), w[1].as_usize());
            values[start..end]
                .iter()
                .fold(fold(SEED, (end - start) as u64), |acc, h| fold(acc, *h))
        })
        .collect())
}

/// A primitive value's bits, as a `u64`.
trait Bits {
    fn bits(&self) -> u64;
}

macro_rules! int_bits {
    ($($t:ty),*) => {
        $(impl Bits for $t {
            fn bits(&self) -> u64 {
                i64::from(*self) as u64
            }
        })*
    };
}

int_bits!(i8, i16, i32, i64);

impl Bits for f32 {
    fn bits(&self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl Bits for f64 {
    fn bits(&self) -> u64 {
        self.to_bits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, ListArray, StringArray, StructArray};
    use arrow::datatypes::{Field, Int64Type};
    use std::sync::Arc;

    fn batch(ids: &[Option<&str>], codes: Vec<Option<Vec<Option<i64>>>>) -> RecordBatch {
        let id: ArrayRef = Arc::new(StringArray::from(ids.to_vec()));
        let codes: ArrayRef = Arc::new(ListArray::from_iter_primitive::<Int64Type, _, _>(codes));
        let nested: ArrayRef = Arc::new(StructArray::from(vec![(
            Arc::new(Field::new("n", DataType::Int64, true)),
            Arc::new(Int64Array::from(vec![Some(1); ids.len()])) as ArrayRef,
        )]));
        RecordBatch::try_from_iter([("id", id), ("codes", codes), ("s", nested)]).unwrap()
    }

    #[test]
    fn equal_rows_hash_alike_and_any_difference_shows() {
        let rows = batch(
            &[Some("a"), Some("a"), Some("a"), Some("b"), None, Some("a")],
            vec![
                Some(vec![Some(1), Some(2)]),
                Some(vec![Some(1), Some(2)]),
                Some(vec![Some(2), Some(1)]),
                Some(vec![Some(1), Some(2)]),
                Some(vec![Some(1), Some(2)]),
                Some(vec![]),
            ],
        );
        let h = row_fingerprints(&rows).unwrap();
        assert_eq!(h[0], h[1]);
        let mut distinct = h[1..].to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 5, "{h:?}");
        // A null list is not an empty one.
        let empty_or_null = batch(&[Some("a"), Some("a")], vec![Some(vec![]), None]);
        let h = row_fingerprints(&empty_or_null).unwrap();
        assert_ne!(h[0], h[1]);
    }
}
