//! The LLM studies' engine: a note's text goes to the task's model (or comes from the answer
//! cache), and its answer becomes one row, as Cumulus ETL writes it: the note's, encounter's
//! and subject's references, when, the task version, the model's fingerprint, and the answer
//! with every quoted span made character positions in the note.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use futures::future::BoxFuture;
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::cache::NlpCache;
use super::engine::{NoteEngine, NoteInput, NoteOutcome};
use super::llm_study::{LlmTask, ResultType, RowFormat};
use super::openai::{ChatClient, Usage};
use super::spans::locate_spans;

/// An answer as the cache holds it (upstream's `PromptResponse`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub answer: Value,
    pub fingerprint: Option<String>,
}

/// Token counts of the answers asked for in this run.
#[derive(Debug, Default)]
pub struct TokenCounts {
    pub new_input: AtomicU64,
    pub cache_read_input: AtomicU64,
    pub cache_written_input: AtomicU64,
    pub output: AtomicU64,
}

impl TokenCounts {
    pub fn add(&self, usage: Usage) {
        self.new_input
            .fetch_add(usage.new_input_tokens, Ordering::Relaxed);
        self.cache_read_input
            .fetch_add(usage.cache_read_input_tokens, Ordering::Relaxed);
        self.cache_written_input
            .fetch_add(usage.cache_written_input_tokens, Ordering::Relaxed);
        self.output
            .fetch_add(usage.output_tokens, Ordering::Relaxed);
    }
}

/// One LLM task's engine.
pub struct LlmEngine {
    pub task: &'static LlmTask,
    pub client: ChatClient,
    pub cache: NlpCache,
    /// UTC time stamped on result rows.
    generated_on: String,
    pub tokens: TokenCounts,
    /// Texts being asked right now, by their cache key: a note with the same text as one in
    /// flight waits for that answer instead of asking again.
    in_flight: Mutex<HashMap<String, Arc<tokio::sync::OnceCell<CachedAnswer>>>>,
}

impl LlmEngine {
    pub fn new(
        task: &'static LlmTask,
        client: ChatClient,
        cache: NlpCache,
        generated_on: String,
    ) -> LlmEngine {
        LlmEngine {
            task,
            client,
            cache,
            generated_on,
            tokens: TokenCounts::default(),
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    /// The model's answer for a note's (trimmed) text: from the cache, from the request of a
    /// note with the same text in flight, or asked and cached.
    async fn answer(&self, text: &str) -> Result<CachedAnswer> {
        let namespace = self.task.cache_namespace();
        let hit = || {
            self.client
                .http
                .stats
                .cache_hits
                .fetch_add(1, Ordering::Relaxed)
        };
        if let Some(cached) = self.cache.read::<CachedAnswer>(&namespace, text) {
            hit();
            return Ok(cached);
        }
        let key = self.cache.key(&namespace, text);
        let cell = self
            .in_flight
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_default()
            .clone();
        let mut asked = false;
        let answer = cell
            .get_or_try_init(|| {
                asked = true;
                self.ask(&namespace, text)
            })
            .await
            .cloned();
        if !asked && answer.is_ok() {
            hit();
        }
        // Answered (and cached on disk: later notes with this text read the cache), or failed.
        let mut in_flight = self.in_flight.lock().unwrap();
        if in_flight.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            in_flight.remove(&key);
        }
        answer
    }

    /// Asks the model for `text`'s answer and caches it under `namespace`.
    async fn ask(&self, namespace: &str, text: &str) -> Result<CachedAnswer> {
        let _permit = self.client.http.permit().await?;
        let definition = &self.task.definition;
        let request = self.client.request(
            &definition.system_prompt,
            &self.task.user_prompt(text),
            &definition.response_format,
            &definition.json_schema,
        );
        let done = self.client.complete(&request).await?;
        self.tokens.add(done.usage);
        let answer = CachedAnswer {
            answer: done.answer,
            fingerprint: done.fingerprint,
        };
        self.cache
            .write(namespace, text, &answer)
            .context("writing the NLP cache")?;
        Ok(answer)
    }

    async fn analyse_note(&self, note: &NoteInput) -> Result<NoteOutcome> {
        let trimmed = remove_trailing_whitespace(&note.text);
        let answer = self.answer(&trimmed).await?;
        let definition = &self.task.definition;
        let (key, mut row, missing) = match self.task.row_format() {
            RowFormat::Result => {
                let mut result = conform(&answer.answer, &definition.result);
                let missing = locate_spans(&mut result, &note.text);
                let note_ref = note.ids.note_ref();
                let row = json!({
                    "note_ref": note_ref,
                    "encounter_ref": format!("Encounter/{}", note.ids.encounter_id),
                    "subject_ref": note.ids.subject_ref(),
                    "generated_on": self.generated_on,
                    "task_version": definition.version,
                    "system_fingerprint": answer.fingerprint,
                    "result": result,
                });
                (note_ref, row, missing)
            }
            RowFormat::Covid => {
                // Upstream strips these prefixes from the references: a DiagnosticReport's id
                // keeps its type, as does a subject that is not a Patient.
                let note_ref = note.ids.note_ref();
                let id = note_ref
                    .strip_prefix("DocumentReference/")
                    .unwrap_or(&note_ref)
                    .to_string();
                let subject_ref = note.ids.subject_ref();
                let row = json!({
                    "id": id,
                    "docref_id": id,
                    "encounter_id": note.ids.encounter_id,
                    "subject_id": subject_ref.strip_prefix("Patient/").unwrap_or(&subject_ref),
                    "generated_on": self.generated_on,
                    "task_version": definition.version,
                    "system_fingerprint": answer.fingerprint,
                    "symptoms": from_aliases(&answer.answer, &self.task.answer_fields()),
                });
                (id, row, Vec::new())
            }
        };
        // Without null fields, as upstream writes its NDJSON rows (a table's columns are null
        // where a row has no field, so the other formats are the same either way).
        drop_nulls(&mut row);
        let problem = match missing.len() {
            0 => None,
            n => Some(format!(
                "{n} passage{} the model quoted could not be found in the note",
                if n == 1 { "" } else { "s" }
            )),
        };
        Ok(NoteOutcome {
            rows: vec![(key, row)],
            problem,
        })
    }
}

impl NoteEngine for LlmEngine {
    fn analyse<'a>(&'a self, note: &'a NoteInput) -> BoxFuture<'a, Result<NoteOutcome>> {
        Box::pin(self.analyse_note(note))
    }
}

/// The note's text without trailing whitespace on any line (upstream's `\s+$`, multi-line),
/// which is what the model is sent and what the cache is keyed on.
pub fn remove_trailing_whitespace(text: &str) -> String {
    static TRAILING: OnceLock<Regex> = OnceLock::new();
    let trailing = TRAILING.get_or_init(|| Regex::new(r"(?m)\s+$").expect("a valid pattern"));
    trailing.replace_all(text, "").into_owned()
}

/// The answer in the result type's shape, as pydantic dumps the model it validated: object
/// fields in the type's order, absent ones null, others left out.
fn conform(value: &Value, shape: &ResultType) -> Value {
    match (shape, value) {
        (ResultType::Struct { r#struct }, Value::Object(fields)) => {
            let mut out = Map::new();
            for (name, field) in r#struct {
                let v = fields.get(name).map_or(Value::Null, |v| conform(v, field));
                out.insert(name.clone(), v);
            }
            Value::Object(out)
        }
        (ResultType::List { list }, Value::Array(items)) => {
            Value::Array(items.iter().map(|item| conform(item, list)).collect())
        }
        _ => value.clone(),
    }
}

/// An answer written with the model's field names (pydantic's aliases) under the row's names,
/// in the type's order, absent ones null (as pydantic dumps a model it validated by alias).
fn from_aliases(answer: &Value, fields: &[(String, String)]) -> Value {
    let object: Map<String, Value> = fields
        .iter()
        .map(|(written, stored)| {
            let value = answer.get(written).cloned().unwrap_or(Value::Null);
            (stored.clone(), value)
        })
        .collect();
    Value::Object(object)
}

/// Removes every null field of every object in `value` (upstream's `sparse_dict`; list items
/// stay, null or not).
fn drop_nulls(value: &mut Value) {
    match value {
        Value::Object(object) => {
            object.retain(|_, v| !v.is_null());
            object.values_mut().for_each(drop_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_whitespace_goes_from_every_line_as_python_removes_it() {
        assert_eq!(remove_trailing_whitespace("a  \nb\t\n"), "a\nb");
        // A blank line after trailing spaces goes with them, as Python's `\s+$` takes it.
        assert_eq!(remove_trailing_whitespace("a \n\n b\n"), "a\n b");
        assert_eq!(remove_trailing_whitespace("no change"), "no change");
    }

    #[test]
    fn answers_take_the_result_types_order_with_absent_fields_null() {
        let shape: ResultType = serde_json::from_value(json!(
            {"struct": [["has_mention", "bool"], ["spans", {"list": "string"}],
                        ["items", {"list": {"struct": [["b", "string"], ["a", "int32"]]}}],
                        ["age", "int32"]]}
        ))
        .unwrap();
        let answer = json!({"age": 45, "extra": 1, "spans": ["x"],
                            "items": [{"a": 1, "b": "y"}]});
        let conformed = conform(&answer, &shape);
        assert_eq!(
            conformed.to_string(),
            r#"{"has_mention":null,"spans":["x"],"items":[{"b":"y","a":1}],"age":45}"#
        );
    }

    #[test]
    fn null_fields_are_dropped_at_every_depth_but_list_items_stay() {
        let mut row = json!({"a": null, "b": {"c": null, "d": 1}, "e": [null, {"f": null}]});
        drop_nulls(&mut row);
        assert_eq!(row, json!({"b": {"d": 1}, "e": [null, {}]}));
    }
}
