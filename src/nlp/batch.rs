//! Azure OpenAI's batch mode (`--batch`), as upstream runs it: half the price, answers within a
//! day. Before a task's notes are analysed, every note whose answer is not cached becomes a
//! line of a JSONL file of chat-completion requests (`custom_id` the SHA-256 of its text, the
//! key the cache files answers under), up to 50,000 requests or 200 MB a file. Each file is
//! uploaded and started as a batch, whose id is kept in the cache namespace's `metadata.json`
//! (`batches-azure`, upstream's key) until its answers are in the cache, so an interrupted run
//! (or the Python tool) resumes waiting for it. Batches are polled every five minutes (as
//! upstream; `CUMULUS_ETL_BATCH_POLL_SECONDS` changes it), their answers written to the cache
//! and their errors reported; the task's own pass then finds the answers there, and asks online
//! for any a batch did not give.
//!
//! Unlike upstream, a text met twice is asked once (a batch's `custom_id`s must differ). The
//! request files hold note text: they are written in a private temporary folder and removed
//! once uploaded.

use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::cache::NlpCache;
use super::engine::{NoteEngine, NoteInput, NoteOutcome};
use super::llm_engine::{CachedAnswer, LlmEngine, remove_trailing_whitespace};
use super::openai::parse_completion;

/// Azure's limits on one batch's input file.
const MAX_REQUESTS: usize = 50_000;
const MAX_BYTES: u64 = 200_000_000;

/// Where `metadata.json` lists the batches not yet read back.
const METADATA_KEY: &str = "batches-azure";

/// The statuses of a batch that is still running.
const RUNNING: [&str; 3] = ["validating", "in_progress", "finalizing"];

/// How long to wait between two looks at a running batch.
pub fn poll_interval() -> Duration {
    let seconds = std::env::var("CUMULUS_ETL_BATCH_POLL_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(seconds)
}

/// Gathers a task's notes into batch files, sending each when full.
pub struct BatchCollector {
    engine: Arc<LlmEngine>,
    folder: tempfile::TempDir,
    pending: tokio::sync::Mutex<Pending>,
}

#[derive(Default)]
struct Pending {
    file: Option<std::io::BufWriter<std::fs::File>>,
    files_made: usize,
    requests: usize,
    bytes: u64,
    /// Texts already in a batch of this run.
    seen: HashSet<String>,
    /// Batches started by this run.
    sent: Vec<String>,
    requests_sent: usize,
}

impl BatchCollector {
    pub fn new(engine: Arc<LlmEngine>) -> Result<BatchCollector> {
        let folder = tempfile::Builder::new()
            .prefix("cumulus-etl-batches-")
            .tempdir()
            .context("creating a private folder for batch files")?;
        Ok(BatchCollector {
            engine,
            folder,
            pending: tokio::sync::Mutex::new(Pending::default()),
        })
    }

    fn file_path(&self, n: usize) -> std::path::PathBuf {
        self.folder.path().join(format!("batch-{n:04}.jsonl"))
    }

    /// Adds a note's text to the current batch file, unless its answer is cached or already
    /// asked; a full file is sent first.
    async fn add(&self, text: &str) -> Result<()> {
        let namespace = self.engine.task.cache_namespace();
        let checksum = NlpCache::checksum(text);
        if self
            .engine
            .cache
            .read_checksum::<CachedAnswer>(&namespace, &checksum)
            .is_some()
        {
            return Ok(());
        }
        let mut pending = self.pending.lock().await;
        if !pending.seen.insert(checksum.clone()) {
            return Ok(());
        }
        let definition = &self.engine.task.definition;
        let row = json!({
            "custom_id": checksum,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": self.engine.client.batch_body(
                &definition.system_prompt,
                &self.engine.task.user_prompt(text),
                &definition.response_format,
            ),
        });
        // As upstream writes it (`json.dumps`), so both tools' batch files are the same.
        let mut line = Vec::new();
        crate::json::write_dumps_ascii(&mut line, &row);
        line.push(b'\n');
        let full =
            pending.requests + 1 > MAX_REQUESTS || pending.bytes + line.len() as u64 > MAX_BYTES;
        if pending.file.is_some() && full {
            self.send(&mut pending).await?;
        }
        if pending.file.is_none() {
            let path = self.file_path(pending.files_made);
            let file = std::fs::File::create(&path)
                .with_context(|| format!("creating {}", path.display()))?;
            pending.file = Some(std::io::BufWriter::new(file));
        }
        let file = pending.file.as_mut().expect("opened above");
        file.write_all(&line).context("writing a batch file")?;
        pending.requests += 1;
        pending.bytes += line.len() as u64;
        Ok(())
    }

    /// Uploads the current file and starts its batch; its id goes into `metadata.json`.
    async fn send(&self, pending: &mut Pending) -> Result<()> {
        let Some(file) = pending.file.take() else {
            return Ok(());
        };
        file.into_inner()
            .map_err(|e| e.into_error())
            .context("writing a batch file")?;
        let path = self.file_path(pending.files_made);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let client = &self.engine.client;
        let file_id = client.upload_batch_file(&name, data).await?;
        let batch_id = client.create_batch(&file_id).await?;
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        remember(&self.engine, &batch_id)?;
        crate::say!(
            "  Started batch {batch_id} of {} request{}.",
            pending.requests,
            if pending.requests == 1 { "" } else { "s" }
        );
        pending.sent.push(batch_id);
        pending.requests_sent += pending.requests;
        pending.files_made += 1;
        pending.requests = 0;
        pending.bytes = 0;
        Ok(())
    }

    /// Sends the last file; the batches this run started, and how many requests they hold.
    pub async fn finish(&self) -> Result<(Vec<String>, usize)> {
        let mut pending = self.pending.lock().await;
        self.send(&mut pending).await?;
        Ok((pending.sent.clone(), pending.requests_sent))
    }
}

impl NoteEngine for BatchCollector {
    fn analyse<'a>(&'a self, note: &'a NoteInput) -> BoxFuture<'a, Result<NoteOutcome>> {
        Box::pin(async move {
            self.add(&remove_trailing_whitespace(&note.text)).await?;
            Ok(NoteOutcome {
                rows: Vec::new(),
                problem: None,
            })
        })
    }
}

/// The batches an earlier run started and did not read back.
pub fn unfinished(engine: &LlmEngine) -> Result<Vec<String>> {
    let metadata = engine.cache.metadata(&engine.task.cache_namespace())?;
    Ok(metadata[METADATA_KEY]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_string)
        .collect())
}

fn remember(engine: &LlmEngine, batch_id: &str) -> Result<()> {
    update_metadata(engine, |ids| ids.push(json!(batch_id)))
}

fn forget(engine: &LlmEngine, batch_id: &str) -> Result<()> {
    update_metadata(engine, |ids| ids.retain(|id| id != batch_id))
}

fn update_metadata(engine: &LlmEngine, change: impl FnOnce(&mut Vec<Value>)) -> Result<()> {
    let namespace = engine.task.cache_namespace();
    let mut metadata = engine.cache.metadata(&namespace)?;
    if !metadata.is_object() {
        metadata = json!({});
    }
    let mut ids: Vec<Value> = metadata[METADATA_KEY]
        .as_array()
        .cloned()
        .unwrap_or_default();
    change(&mut ids);
    metadata[METADATA_KEY] = Value::Array(ids);
    engine.cache.write_metadata(&namespace, &metadata)
}

/// What a batch gave back.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BatchResult {
    pub answers: usize,
    pub failed: usize,
}

/// Waits for every batch, each read back into the cache as it ends.
pub async fn wait_all(engine: &LlmEngine, ids: &[String], poll: Duration) -> Result<BatchResult> {
    let results = futures::future::join_all(ids.iter().map(|id| wait(engine, id, poll))).await;
    let mut total = BatchResult::default();
    for result in results {
        let result = result?;
        total.answers += result.answers;
        total.failed += result.failed;
    }
    Ok(total)
}

/// Waits for a batch to end, writes its answers to the cache and reports its errors; then
/// forgets it.
async fn wait(engine: &LlmEngine, id: &str, poll: Duration) -> Result<BatchResult> {
    let client = &engine.client;
    let mut batch = client.batch(id).await?;
    while RUNNING.contains(&batch["status"].as_str().unwrap_or("")) {
        tokio::time::sleep(poll).await;
        batch = client.batch(id).await?;
    }
    let status = batch["status"].as_str().unwrap_or("unknown");
    if status != "completed" {
        crate::say!("warning: batch {id} did not complete, its status is '{status}'");
    }
    let mut result = BatchResult::default();
    if let Some(errors) = batch["error_file_id"].as_str() {
        let content = client.file_content(errors).await?;
        for line in content.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            result.failed += 1;
            let message = serde_json::from_slice::<Value>(line)
                .ok()
                .and_then(|l| error_message(&l));
            crate::say!(
                "warning: batch {id}: a request failed: {}",
                message.as_deref().unwrap_or("(no message)")
            );
        }
    }
    if let Some(output) = batch["output_file_id"].as_str() {
        let content = client.file_content(output).await?;
        let namespace = engine.task.cache_namespace();
        for line in content.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            match answer_of(line) {
                Ok((checksum, completion)) => {
                    engine.tokens.add(completion.usage);
                    let answer = CachedAnswer {
                        answer: completion.answer,
                        fingerprint: completion.fingerprint,
                    };
                    engine
                        .cache
                        .write_checksum(&namespace, &checksum, &answer)
                        .context("writing the NLP cache")?;
                    result.answers += 1;
                }
                Err(e) => {
                    result.failed += 1;
                    crate::say!("warning: batch {id}: an answer is unusable: {e:#}");
                }
            }
        }
    }
    forget(engine, id)?;
    crate::say!(
        "  Batch {id} ended ({status}): {} answer{} cached, {} failed.",
        result.answers,
        if result.answers == 1 { "" } else { "s" },
        result.failed
    );
    Ok(result)
}

/// The message of a line of a batch's error file (kept at `error.message.error.message`, or
/// at `error.message`).
fn error_message(line: &Value) -> Option<String> {
    let error = &line["error"];
    error
        .pointer("/message/error/message")
        .or_else(|| error.get("message"))
        .and_then(Value::as_str)
        .map(str::to_string)
}

/// The checksum and completion of a line of a batch's output file.
fn answer_of(line: &[u8]) -> Result<(String, super::openai::Completion)> {
    let line: Value = serde_json::from_slice(line).context("a line that is not JSON")?;
    if let Some(message) = error_message(&line) {
        anyhow::bail!("{message}");
    }
    let status = line
        .pointer("/response/status_code")
        .and_then(Value::as_u64)
        .unwrap_or(200);
    if status >= 300 {
        anyhow::bail!("HTTP status {status}");
    }
    let checksum = line["custom_id"]
        .as_str()
        .filter(|c| c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()))
        .context("no custom_id of ours")?;
    let body = line.pointer("/response/body").context("no response body")?;
    let completion = parse_completion(&serde_json::to_vec(body)?)?;
    Ok((checksum.to_string(), completion))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_lines_give_their_checksum_and_answer_and_errors_their_message() {
        let sum = "a".repeat(64);
        let line = json!({"custom_id": sum, "response": {"status_code": 200, "body": {
            "system_fingerprint": "fp",
            "choices": [{"finish_reason": "stop", "message": {"content": "{\"x\": 1}"}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2}}}});
        let (checksum, completion) = answer_of(line.to_string().as_bytes()).unwrap();
        assert_eq!(checksum, sum);
        assert_eq!(completion.answer, json!({"x": 1}));
        assert_eq!(completion.usage.output_tokens, 2);
        let failed = json!({"custom_id": sum, "response": {"status_code": 429, "body": {}}});
        assert!(answer_of(failed.to_string().as_bytes()).is_err());
        let error = json!({"error": {"message": {"error": {"message": "quota"}}}});
        assert_eq!(error_message(&error).as_deref(), Some("quota"));
        let foreign = json!({"custom_id": "../../x", "response": {"body": {}}});
        assert!(answer_of(foreign.to_string().as_bytes()).is_err());
    }
}
