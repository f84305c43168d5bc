//! Rows to Arrow: the Cumulus schema of a batch (the FHIR R4 wide-shallow schema plus what the
//! batch holds, or a completion table's fixed schema) and the decoding of its JSON rows.

use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::datatypes::{DataType, Field, Schema};

use super::columns::{Decoded, rows_to_record_batch};
use super::{RowBatch, TableKind};
use crate::fhir::{ElementModel, resource_schema};

/// The Arrow schema of one batch of a table.
pub fn batch_schema(kind: &TableKind, batch: &RowBatch<'_>) -> Arc<Schema> {
    Arc::new(match kind {
        TableKind::Fhir(resource_type) => {
            resource_schema(ElementModel::r4(), resource_type, batch.shape)
        }
        TableKind::NlpResults(table) => table.schema.as_ref().clone(),
        other => completion_schema(other).expect("completion table"),
    })
}

/// The columns every covid study row starts with (its cTAKES and its GPT tasks alike): the
/// note's id twice, the encounter's and subject's, when, and by which task version.
pub fn covid_row_fields() -> Vec<Field> {
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    vec![
        text("id"),
        text("docref_id"),
        text("encounter_id"),
        text("subject_id"),
        text("generated_on"),
        Field::new("task_version", DataType::Int32, true),
    ]
}

/// The schema of covid symptom results, as Cumulus ETL declares it.
pub fn nlp_symptom_schema() -> Schema {
    let text = |name: &str| Field::new(name, DataType::Utf8, true);
    let concept =
        DataType::Struct(vec![text("code"), text("codingScheme"), text("cui"), text("tui")].into());
    let matched = DataType::Struct(
        vec![
            Field::new("begin", DataType::Int32, true),
            Field::new("end", DataType::Int32, true),
            text("text"),
            Field::new("polarity", DataType::Int8, true),
            text("type"),
            Field::new(
                "conceptAttributes",
                DataType::List(Arc::new(Field::new("item", concept, true))),
                true,
            ),
        ]
        .into(),
    );
    let mut fields = covid_row_fields();
    fields.push(Field::new("match", matched, true));
    Schema::new(fields)
}

/// One batch of a table as an Arrow record batch, without the rows that do not fit its schema
/// (listed beside it).
pub fn to_record_batch(kind: &TableKind, batch: &RowBatch<'_>) -> Result<Decoded> {
    rows_to_record_batch(batch_schema(kind, batch), &batch.rows)
        .context("rows do not fit the table's FHIR schema")
}

/// The fixed schemas of the completion tables (all strings, as upstream).
pub fn completion_schema(kind: &TableKind) -> Option<Schema> {
    let names: &[&str] = match kind {
        TableKind::CompletionEncounters => &[
            "encounter_id",
            "group_name",
            "export_time",
            "excluded_resources",
        ],
        TableKind::Completion => &[
            "table_name",
            "group_name",
            "export_time",
            "export_url",
            "etl_version",
            "etl_time",
            "excluded_resources",
        ],
        TableKind::Fhir(_) | TableKind::NlpResults(_) => return None,
    };
    Some(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ))
}
