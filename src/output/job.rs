//! Run metadata: `JobConfig/<time>/job_config.json` and per-table summaries in the output folder,
//! and `context.json` in the PHI folder, in Cumulus ETL's layouts.

use anyhow::Result;
use serde::Serialize;
use serde_json::{Value, json};

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
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
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
/// `<output>/JobConfig/<run>`: where a run's job config and summaries go.
pub fn job_dir(output: &ObjectLocation, started: &PyDateTime) -> ObjectLocation {
    output.join("JobConfig").join(&started.folder_name())
}

pub fn write_job_config(dir: &ObjectLocation, config: &JobConfig) -> Result<()> {
    dir.write("job_config.json", serde_json::to_vec_pretty(config)?.into())
}

pub fn write_summary(dir: &ObjectLocation, summary: &TableSummary) -> Result<()> {
    let now = PyDateTime::now_utc().summary_format();
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let json = serde_json::to_vec_pretty(&summary.to_json(&now, &host))?;
    dir.write(&format!("{}.json", summary.label), json.into())
}

/// The codebook id of the output's latest job config, if any.
pub fn latest_codebook_id(output: &ObjectLocation) -> Option<String> {
    let configs = output.join("JobConfig");
    let latest = configs
        .list()
        .ok()?
        .into_iter()
        .filter(|e| e.key.ends_with("/job_config.json") && e.key.matches('/').count() == 1)
        .map(|e| e.key)
        .max()?;
    let config: Value = serde_json::from_slice(&configs.read(&latest).ok()??).ok()?;
    config.get("codebook_id")?.as_str().map(str::to_string)
}

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
