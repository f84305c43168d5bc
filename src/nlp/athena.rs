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
use crate::store::aws_api::{service_url, signed_post};

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
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("a runtime for Athena: {e}")))?;
    let athena = Athena::new(settings, database).map_err(Fatal::from)?;
    let count_rows = runtime
        .block_on(athena.query(&format!("SELECT count(*) FROM \"{table}\"")))
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
    let rows = runtime
        .block_on(athena.query(&format!("SELECT * FROM \"{table}\"")))
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
struct Athena {
    http: reqwest::Client,
    url: String,
    region: String,
    credentials: object_store::aws::AwsCredentialProvider,
    workgroup: Option<String>,
    database: String,
}

impl Athena {
    fn new(settings: &AthenaSettings, database: String) -> Result<Athena> {
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
    async fn call(&self, operation: &str, body: &Value) -> Result<Value> {
        let body = serde_json::to_vec(body)?;
        let credential = self
            .credentials
            .get_credential()
            .await
            .context("finding AWS credentials for Athena")?;
        let url = format!("{}/", self.url);
        let content_type = "application/x-amz-json-1.1";
        let headers = signed_post(
            &credential,
            ("athena", &self.region),
            &url,
            content_type,
            &body,
        )?;
        let response = self
            .http
            .post(&url)
            .headers(headers)
            .header("X-Amz-Target", format!("AmazonAthena.{operation}"))
            .body(body)
            .send()
            .await
            .with_context(|| format!("{operation} at {}", self.url))?;
        let status = response.status();
        let answer = response.bytes().await?;
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
    async fn query(&self, sql: &str) -> Result<Vec<Vec<String>>> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
