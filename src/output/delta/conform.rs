//! Schema evolution for Delta tables: the union of the table's schema and a batch's schema, and
//! the batch reshaped to that union (missing fields as nulls, widened types cast), so that every
//! MERGE and append sees one schema on both sides.

use std::sync::Arc;

use anyhow::{Result, anyhow, bail};
use arrow::array::{Array, ArrayRef, ListArray, StructArray, new_null_array};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

/// Casts that fail on overflow instead of writing nulls.
const STRICT_CAST: arrow::compute::CastOptions<'static> = arrow::compute::CastOptions {
    safe: false,
    format_options: arrow::util::display::FormatOptions::new(),
};

/// The union of two schemas: the table's fields first in their order, then the batch's new ones.
/// Nested structs are merged the same way; a type change is allowed only when it widens.
pub fn union_schema(table: &Schema, batch: &Schema) -> Result<SchemaRef> {
    let fields = union_fields(table.fields(), batch.fields(), "")?;
    Ok(Arc::new(Schema::new(fields)))
}

fn union_fields(old: &Fields, new: &Fields, path: &str) -> Result<Fields> {
    let mut out: Vec<FieldRef> = Vec::with_capacity(old.len() + new.len());
    for field in old.iter() {
        match new.find(field.name()) {
            Some((_, other)) => {
                let name = join(path, field.name());
                let data_type = union_type(field.data_type(), other.data_type(), &name)?;
                out.push(Arc::new(Field::new(field.name(), data_type, true)));
            }
            None => out.push(field.clone()),
        }
    }
    for field in new.iter() {
        if old.find(field.name()).is_none() {
            out.push(Arc::new(field.as_ref().clone().with_nullable(true)));
        }
    }
    Ok(out.into())
}

fn union_type(old: &DataType, new: &DataType, path: &str) -> Result<DataType> {
    use DataType::*;
    Ok(match (old, new) {
        (a, b) if a == b => a.clone(),
        (Struct(a), Struct(b)) => Struct(union_fields(a, b, path)?),
        (List(a), List(b)) => {
            let item = union_type(a.data_type(), b.data_type(), path)?;
            List(Arc::new(Field::new(a.name(), item, true)))
        }
        (Null, b) => b.clone(),
        (a, Null) => a.clone(),
        // The stored integer type wins, as in Cumulus ETL (values that overflow it fail the
        // batch); a float column accepts integers.
        (Int64, Int32) | (Int32, Int64) | (Float64, Int32) | (Float64, Int64) => old.clone(),
        (a, b) => bail!("column '{path}' changes type from {a} to {b}, which cannot be merged"),
    })
}

/// True when `batch` has a field (at any depth) that `table` lacks, or gives a column of the
/// null type a real one: the table's schema must then evolve. Types that differ otherwise are
/// not new fields ([`union_schema`] keeps the stored type).
pub fn adds_fields(table: &Fields, batch: &Fields) -> bool {
    batch.iter().any(|field| match table.find(field.name()) {
        None => true,
        Some((_, stored)) => type_adds_fields(stored.data_type(), field.data_type()),
    })
}

fn type_adds_fields(stored: &DataType, new: &DataType) -> bool {
    match (stored, new) {
        (DataType::Struct(a), DataType::Struct(b)) => adds_fields(a, b),
        (DataType::List(a), DataType::List(b)) => type_adds_fields(a.data_type(), b.data_type()),
        (DataType::Null, other) => *other != DataType::Null,
        _ => false,
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_string()
    } else {
        format!("{path}.{name}")
    }
}

/// Reshapes `batch` to `schema` (a superset of its fields, by name): missing fields become
/// nulls, nested structs and lists are reshaped the same way, other types are cast.
pub fn conform_batch(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().as_ref() == schema.as_ref() {
        return Ok(batch.clone());
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) => conform_array(column, field.data_type(), field.name()),
            None => Ok(new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Result<Vec<_>>>()?;
    let options =
        arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(batch.num_rows()));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &options,
    )?)
}

fn conform_array(array: &ArrayRef, target: &DataType, path: &str) -> Result<ArrayRef> {
    if array.data_type() == target {
        return Ok(array.clone());
    }
    match (array.data_type(), target) {
        (DataType::Struct(_), DataType::Struct(fields)) => {
            let source = array
                .as_any()
                .downcast_ref::<StructArray>()
                .expect("a struct array");
            let children = fields
                .iter()
                .map(|f| match source.column_by_name(f.name()) {
                    Some(child) => conform_array(child, f.data_type(), &join(path, f.name())),
                    None => Ok(new_null_array(f.data_type(), source.len())),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Arc::new(StructArray::try_new(
                fields.clone(),
                children,
                source.nulls().cloned(),
            )?))
        }
        (DataType::List(_), DataType::List(item)) => {
            let source = array
                .as_any()
                .downcast_ref::<ListArray>()
                .expect("a list array");
            let values = conform_array(source.values(), item.data_type(), path)?;
            Ok(Arc::new(ListArray::try_new(
                item.clone(),
                source.offsets().clone(),
                values,
                source.nulls().cloned(),
            )?))
        }
        (from, to) => arrow::compute::cast_with_options(array, to, &STRICT_CAST)
            .map_err(|e| anyhow!("column '{path}' cannot be cast from {from} to {to}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int32Array, StringArray};

    fn schema(fields: Vec<Field>) -> Schema {
        Schema::new(fields)
    }

    #[test]
    fn new_fields_are_found_at_any_depth_and_narrower_types_are_not_new() {
        let item = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
        let coding = |names: &[&str]| {
            DataType::Struct(
                names
                    .iter()
                    .map(|n| Field::new(*n, DataType::Utf8, true))
                    .collect::<Vec<_>>()
                    .into(),
            )
        };
        let table = schema(vec![
            Field::new("n", DataType::Int64, true),
            Field::new("code", item(coding(&["system", "code"])), false),
        ]);
        let same = schema(vec![
            Field::new("n", DataType::Int32, true),
            Field::new("code", item(coding(&["code"])), true),
        ]);
        assert!(!adds_fields(table.fields(), same.fields()));
        let deeper = schema(vec![Field::new(
            "code",
            item(coding(&["code", "display"])),
            true,
        )]);
        assert!(adds_fields(table.fields(), deeper.fields()));
        let wider = schema(vec![Field::new("status", DataType::Utf8, true)]);
        assert!(adds_fields(table.fields(), wider.fields()));
    }

    #[test]
    fn union_keeps_table_order_and_adds_new_fields_nested() {
        let meta_old = DataType::Struct(vec![Field::new("versionId", DataType::Utf8, true)].into());
        let meta_new =
            DataType::Struct(vec![Field::new("lastUpdated", DataType::Utf8, true)].into());
        let table = schema(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("meta", meta_old, true),
        ]);
        let batch = schema(vec![
            Field::new("meta", meta_new, true),
            Field::new("gender", DataType::Utf8, true),
        ]);
        let union = union_schema(&table, &batch).unwrap();
        let names: Vec<&str> = union.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["id", "meta", "gender"]);
        let DataType::Struct(meta) = union.field(1).data_type() else {
            panic!("meta is a struct")
        };
        let names: Vec<&str> = meta.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["versionId", "lastUpdated"]);
    }

    #[test]
    fn incompatible_type_change_is_an_error_naming_the_column() {
        let table = schema(vec![Field::new("value", DataType::Utf8, true)]);
        let batch = schema(vec![Field::new("value", DataType::Boolean, true)]);
        let err = union_schema(&table, &batch).unwrap_err().to_string();
        assert!(err.contains("'value'"), "{err}");
    }

    #[test]
    fn stored_integer_type_wins_and_overflow_fails() {
        let table = schema(vec![Field::new("n", DataType::Int32, true)]);
        let incoming = Arc::new(schema(vec![Field::new("n", DataType::Int64, true)]));
        let union = union_schema(&table, &incoming).unwrap();
        assert_eq!(union.field(0).data_type(), &DataType::Int32);
        let batch = RecordBatch::try_new(
            incoming,
            vec![Arc::new(arrow::array::Int64Array::from(vec![1, i64::MAX]))],
        )
        .unwrap();
        let err = conform_batch(&batch, &union).unwrap_err().to_string();
        assert!(err.contains("'n'"), "{err}");
    }

    #[test]
    fn conform_fills_missing_fields_with_nulls_and_widens() {
        let batch = RecordBatch::try_new(
            Arc::new(schema(vec![
                Field::new("id", DataType::Utf8, true),
                Field::new("n", DataType::Int32, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])),
                Arc::new(Int32Array::from(vec![1, 2])),
            ],
        )
        .unwrap();
        let target = Arc::new(schema(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
            Field::new("extra", DataType::Utf8, true),
        ]));
        let out = conform_batch(&batch, &target).unwrap();
        assert_eq!(out.schema(), target);
        assert_eq!(out.column(2).null_count(), 2);
        assert_eq!(out.column(1).data_type(), &DataType::Int64);
    }
}
