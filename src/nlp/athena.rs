//! A cohort from an Athena table (`--select-by-athena-table [DB.]TABLE`), as upstream selects
//! it: the table's rows are anonymous note or patient ids, read like an anonymous cohort CSV
//! file (`--select-by-anon-csv`). The table name must be letters, digits and `_`; a table of
//! more than 50,000 rows stops the run unless `--allow-large-selection` (upstream asks, and
//! stops when it cannot). Queries go to Athena's API (`StartQueryExecution` in the workgroup
//! and database given, polled with `GetQueryExecution`, rows read with `GetQueryResults`),
//! signed for the AWS account the S3 store finds, at `--athena-region` (else the account's
//! region, else us-east-1), or `AWS_ENDPOINT_URL_ATHENA` / `AWS_ENDPOINT_URL`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::exit::{ExitCode, Fatal};
use crate::store::aws_api::{SignedPost, service_url};

/// Where Athena is asked (`--athena-region`, `--athena-workgroup`, `--athena-database`).
#[derive(Debug, Clone, Default)]
pub struct AthenaSettings {
    pub region: Option<String>,
    pub workgroup: Option<String>,
    pub database: Option<String>,
}

/// Rows beyond which a cohort table needs `--allow-large-selection`.
const LARGE_COHORT: u64 = 50_000;

/// The cohort table's rows as CSV text (a header, then the rows).
pub fn cohort_csv(
    table: &str,
    settings: &AthenaSettings,
    allow_large: bool,
) -> Result<String, Fatal> {
    let (database, table) = match table.split_once('.') {
        Some((database, table)) => (Some(database.to_string()), table.to_string()),
        None => (settings.database.clone(), table.to_string()),
    };
    let Some(database) = database.filter(|d| !d.is_empty()) else {
        return Err(Fatal::new(
            ExitCode::AthenaDatabaseMissing,
            "You must provide an Athena database with --athena-database.",
        ));
    };
    if table.is_empty()
        || !table
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(Fatal::new(
            ExitCode::AthenaTableNameInvalid,
            format!("Athena table name '{table}' has invalid characters."),
        ));
    }
    let athena = Athena::new(settings, database).map_err(Fatal::from)?;
    let count_rows = blocking(athena.query(&format!("SELECT count(*) FROM \"{table}\"")))
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("Athena: {e:#}")))?;
    let count: u64 = count_rows
        .get(1)
        .and_then(|row| row.first())
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Fatal::new(ExitCode::Failure, "Athena: no row count for the cohort"))?;
    if count > LARGE_COHORT && !allow_large {
        return Err(Fatal::new(
            ExitCode::AthenaTableTooBig,
            format!(
                "Athena cohort in '{table}' is very large ({} rows).\nIf you want to use it \
                 anyway, pass --allow-large-selection",
                with_thousands(count)
            ),
        ));
    }
    let rows = blocking(athena.query(&format!("SELECT * FROM \"{table}\"")))
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("Athena: {e:#}")))?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    for row in &rows {
        csv.write_record(row).map_err(anyhow::Error::from)?;
    }
    let bytes = csv.into_inner().map_err(|e| anyhow!("{e}"))?;
    Ok(String::from_utf8(bytes).map_err(anyhow::Error::from)?)
}

/// `n` with a comma every three digits, as Python's `{n:,}` writes it.
fn with_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Athena's API in one region, for queries in one database.
pub struct Athena {
    http: reqwest::Client,
    url: String,
    region: String,
    credentials: object_store::aws::AwsCredentialProvider,
    workgroup: Option<String>,
    database: String,
}

impl Athena {
    pub fn new(settings: &AthenaSettings, database: String) -> Result<Athena> {
        let (credentials, account_region) = crate::store::objects::aws_account()?;
        let region = settings
            .region
            .clone()
            .or(account_region)
            .unwrap_or_else(|| "us-east-1".into());
        let url = service_url(
            "AWS_ENDPOINT_URL_ATHENA",
            format!("https://athena.{region}.amazonaws.com"),
        );
        Ok(Athena {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?,
            url,
            region,
            credentials,
            workgroup: settings.workgroup.clone(),
            database,
        })
    }

    /// Calls an operation of Athena's JSON API.
    pub async fn call(&self, operation: &str, body: &Value) -> Result<Value> {
        let body = serde_json::to_vec(body)?;
        let credential = self
            .credentials
            .get_credential()
            .await
            .context("finding AWS credentials for Athena")?;
        let url = format!("{}/", self.url);
        let post = SignedPost {
            service: "athena",
            region: &self.region,
            url: &url,
            content_type: "application/x-amz-json-1.1",
            extra: Some(("X-Amz-Target", format!("AmazonAthena.{operation}"))),
        };
        let what = format!("{operation} at {}", self.url);
        let (status, answer) = post.send(&self.http, &credential, body, &what).await?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&answer)
                .ok()
                .and_then(|v| {
                    v.get("message")
                        .or_else(|| v.get("Message"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_else(|| format!("HTTP status {status}"));
            bail!("{operation}: {message}");
        }
        serde_json::from_slice(&answer).with_context(|| format!("{operation}'s answer"))
    }

    /// Runs a query to its end; its rows (Athena gives the column names as the first).
    pub async fn query(&self, sql: &str) -> Result<Vec<Vec<String>>> {
        let mut start = json!({
            "QueryString": sql,
            "QueryExecutionContext": {"Database": self.database},
        });
        if let Some(workgroup) = &self.workgroup {
            start["WorkGroup"] = json!(workgroup);
        }
        let started = self.call("StartQueryExecution", &start).await?;
        let id = started["QueryExecutionId"]
            .as_str()
            .context("StartQueryExecution gave no id")?
            .to_string();
        let mut delay = Duration::from_millis(200);
        loop {
            let execution = self
                .call("GetQueryExecution", &json!({"QueryExecutionId": id}))
                .await?;
            let status = &execution["QueryExecution"]["Status"];
            match status["State"].as_str().unwrap_or("") {
                "SUCCEEDED" => break,
                state @ ("FAILED" | "CANCELLED") => bail!(
                    "the query {state}: {}",
                    status["StateChangeReason"]
                        .as_str()
                        .unwrap_or("no reason given")
                ),
                _ => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut rows = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut ask = json!({"QueryExecutionId": id, "MaxResults": 1000});
            if let Some(token) = &next {
                ask["NextToken"] = json!(token);
            }
            let page = self.call("GetQueryResults", &ask).await?;
            for row in page["ResultSet"]["Rows"].as_array().into_iter().flatten() {
                let cells = row["Data"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|c| c["VarCharValue"].as_str().unwrap_or("").to_string())
                    .collect();
                rows.push(cells);
            }
            next = page["NextToken"].as_str().map(str::to_string);
            if next.is_none() {
                return Ok(rows);
            }
        }
    }
}

/// Runs `call` to its end on a runtime of its own (the NLP run's is not started yet, or busy).
fn blocking<T>(call: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(call)
}

/// Upstream's Athena mode (`nlp INPUT PHI --athena-workgroup GROUP --athena-database DB`): the
/// results go to the workgroup's results location, under `cumulus_user_uploads/<DB>/`, which
/// must be encrypted; each results table is registered in the database.
pub fn results_location(settings: &AthenaSettings) -> Result<String, Fatal> {
    let Some(workgroup) = settings.workgroup.clone() else {
        return Err(Fatal::new(
            ExitCode::ArgsInvalid,
            "No Athena workgroup provided. Please pass --athena-workgroup with the name of your \
             Athena workgroup (and also --athena-database).",
        ));
    };
    let Some(database) = settings.database.clone() else {
        return Err(Fatal::new(
            ExitCode::ArgsInvalid,
            "No Athena database provided. Please pass --athena-database with the name of your \
             Athena database.",
        ));
    };
    let athena = Athena::new(settings, database.clone()).map_err(Fatal::from)?;
    let group = blocking(athena.call("GetWorkGroup", &json!({"WorkGroup": workgroup})))
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("Athena: {e:#}")))?;
    let results = &group["WorkGroup"]["Configuration"]["ResultConfiguration"];
    let Some(location) = results["OutputLocation"].as_str() else {
        return Err(Fatal::new(
            ExitCode::Failure,
            format!("The workgroup {workgroup} has no results location."),
        ));
    };
    if results["EncryptionConfiguration"]["EncryptionOption"].is_null() {
        let bucket = location.split('/').nth(2).unwrap_or(location);
        return Err(Fatal::new(
            ExitCode::AthenaNotEncrypted,
            format!(
                "The workgroup {workgroup} is not reporting an encrypted status. Either bucket \
                 {bucket} is not encrypted, or the workgroup is overriding the bucket's default \
                 encryption. Please confirm the encryption status of both. Cumulus requires \
                 encryption as part of ensuring safety for limited data sets"
            ),
        ));
    }
    Ok(format!("{location}cumulus_user_uploads/{database}"))
}

/// Registers NLP results table `name` (rows of `schema`, files of `format` under `location`,
/// an `s3://` URL) in the database, replacing its earlier definition, as upstream does.
pub fn register_table(
    settings: &AthenaSettings,
    name: &str,
    schema: &arrow::datatypes::Schema,
    (location, format): (&str, crate::output::OutputFormat),
) -> Result<(), Fatal> {
    let database = settings.database.clone().unwrap_or_default();
    let athena = Athena::new(settings, database).map_err(Fatal::from)?;
    let failed = |e: anyhow::Error| Fatal::new(ExitCode::Failure, format!("Athena: {e:#}"));
    if let Err(e) = blocking(athena.query(&format!("DROP TABLE IF EXISTS {name}"))) {
        if format!("{e:#}").contains("DROP TABLE not supported for Delta Lake") {
            return Err(Fatal::new(
                ExitCode::AthenaTableStillCrawler,
                format!(
                    "The {name} table is still being defined by a Glue crawler. Please manually \
                     remove its crawler definition from your AWS Glue config. Or use \
                     --output-format=deltalake which will still work for a little bit."
                ),
            ));
        }
        return Err(failed(e));
    }
    let columns = athena_columns(schema.fields(), Nesting::Table).map_err(failed)?;
    let (before, after) = match format {
        crate::output::OutputFormat::Parquet => (
            "STORED AS PARQUET",
            "TBLPROPERTIES (\"parquet.compression\"=\"SNAPPY\")",
        ),
        _ => ("ROW FORMAT SERDE 'org.openx.data.jsonserde.JsonSerDe'", ""),
    };
    let location = location.trim_end_matches('/');
    let create = format!(
        "CREATE EXTERNAL TABLE {name} (\n    {columns}\n)\n{before}\nLOCATION '{location}/'\n{after}"
    );
    blocking(athena.query(&create)).map_err(failed)?;
    Ok(())
}

/// Where a list of fields stands: a table's columns, a struct's fields, a list's items.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Nesting {
    Table,
    Struct,
    List,
}

/// The Athena (Hive) column list of `fields`, as upstream maps Arrow types.
fn athena_columns(fields: &arrow::datatypes::Fields, nesting: Nesting) -> Result<String> {
    use arrow::datatypes::DataType;
    let mut columns = Vec::new();
    for field in fields {
        let kind = match field.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "STRING".to_string(),
            t if t.is_integer() => "INT".to_string(),
            t if t.is_floating() => "DOUBLE".to_string(),
            DataType::Boolean => "BOOLEAN".to_string(),
            DataType::Timestamp(..) => "TIMESTAMP".to_string(),
            DataType::List(item) | DataType::LargeList(item) | DataType::FixedSizeList(item, _) => {
                let items: arrow::datatypes::Fields = vec![item.clone()].into();
                format!("ARRAY<{}>", athena_columns(&items, Nesting::List)?)
            }
            DataType::Struct(inner) => {
                format!("STRUCT<{}>", athena_columns(inner, Nesting::Struct)?)
            }
            other => bail!("Unsupported type {other} found."),
        };
        columns.push(match nesting {
            Nesting::List => kind,
            Nesting::Struct => format!("{}: {kind}", field.name()),
            Nesting::Table => format!("{} {kind}", field.name()),
        });
    }
    Ok(columns.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_declared_as_upstream_maps_arrow_types() {
        use arrow::datatypes::{DataType, Field, Fields};
        let item = |t| std::sync::Arc::new(Field::new("item", t, true));
        let spans = DataType::List(item(DataType::List(item(DataType::Int32))));
        let result = DataType::Struct(Fields::from(vec![
            Field::new("has_mention", DataType::Boolean, true),
            Field::new("spans", spans, true),
            Field::new("score", DataType::Float32, true),
        ]));
        let fields = Fields::from(vec![
            Field::new("note_ref", DataType::Utf8, true),
            Field::new("task_version", DataType::Int32, true),
            Field::new("result", result, true),
        ]);
        assert_eq!(
            athena_columns(&fields, Nesting::Table).unwrap(),
            "note_ref STRING, task_version INT, result STRUCT<has_mention: BOOLEAN, \
             spans: ARRAY<ARRAY<INT>>, score: DOUBLE>"
        );
    }

    #[test]
    fn counts_are_written_with_thousands_separators() {
        assert_eq!(with_thousands(7), "7");
        assert_eq!(with_thousands(50_001), "50,001");
        assert_eq!(with_thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn a_table_needs_a_database_and_a_plain_name() {
        let settings = AthenaSettings::default();
        let missing = cohort_csv("cohort", &settings, false).unwrap_err();
        assert_eq!(missing.code, ExitCode::AthenaDatabaseMissing);
        let invalid = cohort_csv("db.co-hort", &settings, false).unwrap_err();
        assert_eq!(invalid.code, ExitCode::AthenaTableNameInvalid);
        assert!(invalid.message.contains("'co-hort'"), "{}", invalid.message);
    }
}
