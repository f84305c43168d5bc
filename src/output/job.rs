//! Run metadata: `JobConfig/<time>/job_config.json` and per-table summaries in the output folder,
//! and `context.json` in the PHI folder, in Cumulus ETL's layouts.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use serde_json::{Value, json};

use crate::store;
use crate::store::objects::ObjectLocation;
use crate::time::PyDateTime;

/// The settings of one run, as recorded in `job_config.json`.
#[derive(Debug, Clone, Serialize)]
pub struct JobConfig {
    pub dir_input: String,
    pub dir_output: String,
    pub dir_phi: String,
    pub path: String,
    pub input_format: String,
    pub output_format: String,
    pub comment: Option<String>,
    pub batch_size: usize,
    pub tasks: String,
    pub export_group_name: Option<String>,
    pub export_timestamp: Option<String>,
    pub export_url: Option<String>,
    pub codebook_id: String,
    pub exclusions: String,
}

/// Per-table outcome counts, written as `<table>.json` next to the job config.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TableSummary {
    pub label: String,
    pub attempt: u64,
    pub success: u64,
    pub had_errors: bool,
}

impl TableSummary {
    /// The JSON Cumulus ETL writes for a summary.
    pub fn to_json(&self, timestamp: &str, hostname: &str) -> Value {
        let rate = if self.attempt == 0 {
            1.0
        } else {
            self.success as f64 / self.attempt as f64
        };
        json!({
            "label": self.label,
            "attempt": self.attempt,
            "success": self.success,
            "success_rate": rate,
            "had_errors": self.had_errors,
            "timestamp": timestamp,
            "hostname": hostname,
        })
    }
}

/// The folder of this run's metadata: `<output>/JobConfig/<YYYY-MM-DD__HH.MM.SS>`.
pub fn job_dir(output: &Path, started: &PyDateTime) -> std::path::PathBuf {
    output.join("JobConfig").join(started.folder_name())
}

/// Writes `job_config.json` (indented, as upstream).
pub fn write_job_config(dir: &Path, config: &JobConfig) -> Result<()> {
    store::write_atomic(
        &dir.join("job_config.json"),
        &serde_json::to_vec_pretty(config)?,
    )
}

/// Writes one table summary.
pub fn write_summary(dir: &Path, summary: &TableSummary) -> Result<()> {
    let now = PyDateTime::now_utc().summary_format();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let path = dir.join(format!("{}.json", summary.label));
    store::write_atomic(
        &path,
        &serde_json::to_vec_pretty(&summary.to_json(&now, &host))?,
    )
}

/// The codebook id of the most recent run into this output folder, if any.
pub fn latest_codebook_id(output: &Path) -> Option<String> {
    let root = output.join("JobConfig");
    let mut dirs: Vec<_> = std::fs::read_dir(root)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .collect();
    dirs.sort();
    let latest = dirs.pop()?;
    let config: Value =
        serde_json::from_slice(&std::fs::read(latest.join("job_config.json")).ok()?).ok()?;
    config.get("codebook_id")?.as_str().map(str::to_string)
}

/// Records the last successful run in the PHI folder's `context.json` (informational).
pub fn write_context(
    phi: &ObjectLocation,
    when: &PyDateTime,
    input: &str,
    output: &str,
) -> Result<()> {
    let mut ctx: Value = phi
        .read(CONTEXT_FILE)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({}));
    ctx["last_successful_datetime"] = json!(when.isoformat());
    ctx["last_successful_input_dir"] = json!(input);
    ctx["last_successful_output_dir"] = json!(output);
    phi.write(CONTEXT_FILE, serde_json::to_vec_pretty(&ctx)?.into())
}

/// The PHI folder's record of the last successful run.
const CONTEXT_FILE: &str = "context.json";
