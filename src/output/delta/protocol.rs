//! The Delta protocol features this tool honours, and the gate every existing table passes
//! before anything is written to it.
//!
//! delta-rs (1.1) refuses to write any table whose writer features it does not list, which
//! includes `clustering` and `domainMetadata`: every table Cumulus ETL's Spark creates. Its
//! checker cannot be configured, so the writes of this tool are committed through its own
//! [`commit`](super::commit) path, and this gate decides instead, feature by feature, following
//! PROTOCOL.md:
//!
//! - `clustering` and `domainMetadata`: the domains are kept as they are (a commit never
//!   touches them, and checkpoints carry them), and data files get statistics for the
//!   clustering columns ([`clustering_columns`]).
//! - `deletionVectors`: rows a deletion vector removes stay removed when a file is merged into
//!   or rewritten ([`super::deletion_vectors`]); this tool itself rewrites files instead of
//!   writing deletion vectors.
//! - `appendOnly`, `invariants`, `checkConstraints`, `changeDataFeed`, `generatedColumns`,
//!   `identityColumns`: listed by any table upgraded to writer version 7; honoured while not in
//!   use (no append-only property, no invariant, constraint, generated or identity column, no
//!   change data feed), refused when in use.
//! - `v2Checkpoint`, `timestampNtz`, `vacuumProtocolCheck`: nothing to do for this tool's writes.
//! - `columnMapping`: tables that use it are merged by delta-rs (see [`super::file_merge`]).
//!
//! Any other feature (row tracking, in-commit timestamps, type widening, ...) refuses the table
//! with a message that names it, before anything is written.

use anyhow::{Result, bail};
use deltalake::logstore::LogStore as _;
use serde_json::Value;

/// Writer features a table may list for this tool to write it (subject to [`in_use`]).
const WRITER_FEATURES: &[&str] = &[
    "appendOnly",
    "invariants",
    "checkConstraints",
    "changeDataFeed",
    "generatedColumns",
    "identityColumns",
    "columnMapping",
    "deletionVectors",
    "domainMetadata",
    "clustering",
    "v2Checkpoint",
    "timestampNtz",
    "vacuumProtocolCheck",
];

/// Reader features a table may list for this tool to read it back while merging.
const READER_FEATURES: &[&str] = &[
    "columnMapping",
    "deletionVectors",
    "v2Checkpoint",
    "timestampNtz",
    "vacuumProtocolCheck",
];

/// The protocol and writer features of the tables this tool creates: what delta-spark writes
/// for `DeltaTable.createIfNotExists(...).clusterBy(...)`, so either tool carries on the other's
/// tables.
pub const CREATED_READER_VERSION: i32 = 1;
pub const CREATED_WRITER_VERSION: i32 = 7;
pub const CREATED_WRITER_FEATURES: &[&str] =
    &["appendOnly", "invariants", "domainMetadata", "clustering"];

/// The domain that names a clustered table's clustering columns.
pub const CLUSTERING_DOMAIN: &str = "delta.clustering";

/// Why this tool refuses to write a table (the whole message names the table).
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Fails, naming the feature, unless this tool can write a table of this protocol and metadata
/// (both as their log actions in JSON); the reason reads after the table's name.
pub fn check_writable(protocol: &Value, metadata: &Value) -> Result<()> {
    let reader = protocol["minReaderVersion"].as_i64().unwrap_or(1);
    let writer = protocol["minWriterVersion"].as_i64().unwrap_or(1);
    if reader > 3 {
        bail!("needs Delta reader version {reader}, newer than this tool knows");
    }
    if writer > 7 {
        bail!("needs Delta writer version {writer}, newer than this tool knows");
    }
    for (key, known) in [
        ("readerFeatures", READER_FEATURES),
        ("writerFeatures", WRITER_FEATURES),
    ] {
        let listed = protocol[key].as_array().into_iter().flatten();
        if let Some(unknown) = listed
            .filter_map(Value::as_str)
            .find(|f| !known.contains(f))
        {
            bail!("uses the Delta table feature '{unknown}', which this tool cannot write");
        }
    }
    if let Some(feature) = in_use(metadata) {
        bail!("uses the Delta table feature '{feature}', which this tool cannot write");
    }
    Ok(())
}

/// The first legacy feature the table actually uses that this tool would have to enforce (and
/// does not): an append-only table, a CHECK constraint, a change data feed, or a column with an
/// invariant, a generation expression, an identity or a default value.
fn in_use(metadata: &Value) -> Option<&'static str> {
    let config = metadata["configuration"].as_object();
    let setting = |key: &str| {
        config
            .and_then(|c| c.get(key))
            .and_then(Value::as_str)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    };
    if setting("delta.appendOnly") {
        return Some("appendOnly");
    }
    if setting("delta.enableChangeDataFeed") {
        return Some("changeDataFeed");
    }
    if config.is_some_and(|c| c.keys().any(|k| k.starts_with("delta.constraints."))) {
        return Some("checkConstraints");
    }
    let schema = metadata["schemaString"].as_str().unwrap_or_default();
    [
        ("\"delta.invariants\"", "invariants"),
        ("\"delta.generationExpression\"", "generatedColumns"),
        ("\"delta.identity.", "identityColumns"),
        ("\"CURRENT_DEFAULT\"", "allowColumnDefaults"),
    ]
    .into_iter()
    .find(|(key, _)| schema.contains(key))
    .map(|(_, feature)| feature)
}

/// The `delta.clustering` domain's configuration for the given columns.
pub fn clustering_configuration(columns: &[String]) -> String {
    let paths: Vec<Vec<&str>> = columns.iter().map(|c| vec![c.as_str()]).collect();
    serde_json::json!({"clusteringColumns": paths, "domainName": CLUSTERING_DOMAIN}).to_string()
}

/// The clustering columns of a table (dotted paths; empty when the table is not clustered),
/// read from its `delta.clustering` domain by the Delta kernel at `version`.
pub async fn clustering_columns(
    log_store: &deltalake::logstore::LogStoreRef,
    version: u64,
) -> Result<Vec<String>> {
    let engine = log_store.engine(None);
    let root = log_store.root_url().to_string();
    let columns = tokio::task::spawn_blocking(move || {
        let snapshot = delta_kernel::snapshot::Snapshot::builder_for(root)
            .at_version(version)
            .build(engine.as_ref())?;
        snapshot.get_physical_clustering_columns(engine.as_ref())
    })
    .await??;
    Ok(columns
        .into_iter()
        .flatten()
        .map(|column| column.path().join("."))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spark_protocol(extra_writer: &[&str], reader: Option<&[&str]>) -> Value {
        let mut writer: Vec<&str> = CREATED_WRITER_FEATURES.to_vec();
        writer.extend(extra_writer);
        match reader {
            Some(r) => json!({"minReaderVersion": 3, "minWriterVersion": 7,
                "readerFeatures": r, "writerFeatures": writer}),
            None => json!({"minReaderVersion": 1, "minWriterVersion": 7, "writerFeatures": writer}),
        }
    }

    fn metadata(config: Value, schema: &str) -> Value {
        json!({"configuration": config, "schemaString": schema})
    }

    #[test]
    fn spark_clustered_tables_with_or_without_deletion_vectors_are_writable() {
        let plain = metadata(json!({}), r#"{"type":"struct","fields":[]}"#);
        check_writable(&spark_protocol(&[], None), &plain).unwrap();
        let dv = spark_protocol(&["deletionVectors"], Some(&["deletionVectors"]));
        check_writable(&dv, &plain).unwrap();
        let v2 = spark_protocol(
            &["deletionVectors", "v2Checkpoint", "checkConstraints"],
            Some(&["deletionVectors", "v2Checkpoint"]),
        );
        check_writable(&v2, &plain).unwrap();
        check_writable(
            &json!({"minReaderVersion": 1, "minWriterVersion": 2}),
            &plain,
        )
        .unwrap();
    }

    #[test]
    fn features_this_tool_cannot_honour_are_refused_by_name() {
        let plain = metadata(json!({}), "{}");
        let err = check_writable(&spark_protocol(&["rowTracking"], None), &plain).unwrap_err();
        assert!(err.to_string().contains("'rowTracking'"), "{err}");
        let reader = spark_protocol(&[], Some(&["typeWidening"]));
        let err = check_writable(&reader, &plain).unwrap_err();
        assert!(err.to_string().contains("'typeWidening'"), "{err}");
        let err = check_writable(
            &json!({"minReaderVersion": 4, "minWriterVersion": 7}),
            &plain,
        )
        .unwrap_err();
        assert!(err.to_string().contains("reader version 4"), "{err}");
    }

    #[test]
    fn legacy_features_are_refused_only_when_in_use() {
        let protocol = spark_protocol(&["checkConstraints", "changeDataFeed"], None);
        let cases = [
            (json!({"delta.appendOnly": "true"}), "{}", "appendOnly"),
            (
                json!({"delta.constraints.positive": "x > 0"}),
                "{}",
                "checkConstraints",
            ),
            (
                json!({"delta.enableChangeDataFeed": "true"}),
                "{}",
                "changeDataFeed",
            ),
            (
                json!({}),
                r#"{"fields":[{"metadata":{"delta.invariants":"{}"}}]}"#,
                "invariants",
            ),
        ];
        for (config, schema, feature) in cases {
            let err = check_writable(&protocol, &metadata(config, schema)).unwrap_err();
            assert!(err.to_string().contains(&format!("'{feature}'")), "{err}");
        }
        let off = metadata(json!({"delta.appendOnly": "false"}), "{}");
        check_writable(&protocol, &off).unwrap();
    }

    #[test]
    fn clustering_domains_name_columns_as_delta_spark_does() {
        let config = clustering_configuration(&["encounter_id".into(), "group_name".into()]);
        assert_eq!(
            config,
            r#"{"clusteringColumns":[["encounter_id"],["group_name"]],"domainName":"delta.clustering"}"#
        );
    }
}
