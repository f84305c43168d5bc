//! Cumulus ETL's LLM NLP studies, as `tools/derive_llm_studies.py` derived them from the
//! reference into `dataflows/llm/` (embedded): each task definition's prompts, strict response
//! format and result type, and the models it runs on. A task is named
//! `<study>__nlp[_<name>]_<model>` (the model's id with `-` as `_`), as upstream names them.

use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, bail};
use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde::Deserialize;
use serde_json::Value;

use super::study::NoteSource;

const STUDY_FILES: [&str; 5] = [
    include_str!("../../dataflows/llm/covid_symptom.json"),
    include_str!("../../dataflows/llm/example_nlp.json"),
    include_str!("../../dataflows/llm/glioma.json"),
    include_str!("../../dataflows/llm/ibd.json"),
    include_str!("../../dataflows/llm/irae.json"),
];
const MODELS_FILE: &str = include_str!("../../dataflows/llm/models.json");

/// The type of a column of the answer, as upstream's table schema maps pydantic's types.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum ResultType {
    /// `string`, `bool`, `int32` or `float32`.
    Scalar(String),
    List {
        list: Box<ResultType>,
    },
    Struct {
        r#struct: Vec<(String, ResultType)>,
    },
}

/// One task definition of a study (run on each of its models).
#[derive(Debug, Clone, Deserialize)]
pub struct TaskDefinition {
    /// `<study>__nlp[_<name>]`, the task's name without its model.
    pub name: String,
    /// `spans` (upstream's LLM studies) or `covid_gpt` (the covid study's older format).
    pub kind: String,
    pub version: i32,
    pub system_prompt: String,
    /// The user message, with `%CLINICAL-NOTE%` where the note's text goes.
    pub user_prompt: String,
    /// The `response_format` of the request: a strict JSON schema.
    pub response_format: Value,
    /// Pydantic's JSON schema of the answer, not made strict (Bedrock's tool input schema).
    pub json_schema: Value,
    pub result: ResultType,
    pub models: Vec<String>,
}

#[derive(Deserialize)]
struct StudyFile {
    study: String,
    tasks: Vec<TaskDefinition>,
}

/// A model served by a local OpenAI-compatible server (vLLM).
#[derive(Debug, Clone, Deserialize)]
pub struct LocalModel {
    /// The model's id on the server.
    pub model: String,
    /// The environment variable that holds the server's URL, and the URL without it.
    pub url_env: String,
    pub default_url: String,
    /// Upstream's docker compose service for it.
    pub compose_service: String,
}

/// Dollars per 1,000 tokens, as of `date` (upstream's `TokenPrices`).
#[derive(Debug, Clone, Deserialize)]
pub struct TokenPrices {
    pub date: String,
    pub new_input_tokens: f64,
    pub cache_read_input_tokens: f64,
    pub cache_written_input_tokens: f64,
    pub output_tokens: f64,
    pub multiplier: f64,
}

/// A model on Azure OpenAI.
#[derive(Debug, Clone, Deserialize)]
pub struct AzureModel {
    /// The model's name on Azure (the deployment's, unless `--azure-deployment`).
    pub model: String,
    /// Whether it takes a strict JSON schema (else a JSON object is asked for).
    pub schema: bool,
    /// Whether Azure's batch API serves it (`--batch`).
    #[serde(default)]
    pub batches: bool,
    pub prices: Option<TokenPrices>,
}

/// A model and how each provider names it (`dataflows/llm/models.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub local: Option<LocalModel>,
    pub azure: Option<AzureModel>,
    pub bedrock: Option<BedrockModelInfo>,
}

/// A model on AWS Bedrock.
#[derive(Debug, Clone, Deserialize)]
pub struct BedrockModelInfo {
    /// The model id (`modelId`).
    pub model: String,
    /// Whether it caches prompts (cache points are sent) and takes a tool's input schema.
    pub cache: bool,
    pub schema: bool,
    pub prices: Option<TokenPrices>,
}

/// How a task's rows are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowFormat {
    /// Upstream's LLM studies: `note_ref`, `encounter_ref`, `subject_ref`, `generated_on`,
    /// `task_version`, `system_fingerprint` and the answer as `result`, keyed by `note_ref`.
    Result,
    /// The covid study's GPT tasks, which predate that: `id` and `docref_id` (the note's id),
    /// `encounter_id`, `subject_id`, `generated_on`, `task_version`, `system_fingerprint` and
    /// the answer as `symptoms`, keyed by `id`.
    Covid,
}

/// One LLM task: a definition on one model.
#[derive(Debug, Clone)]
pub struct LlmTask {
    /// The task's and table's name, `<study>__nlp[_<name>]_<model>`.
    pub name: String,
    pub study: String,
    pub definition: Arc<TaskDefinition>,
    pub model: Arc<ModelInfo>,
}

impl LlmTask {
    /// The cache namespace of its answers, `<task>_v<version>`, as upstream's.
    pub fn cache_namespace(&self) -> String {
        format!("{}_v{}", self.name, self.definition.version)
    }

    /// The user message for a note's text.
    pub fn user_prompt(&self, note_text: &str) -> String {
        self.definition
            .user_prompt
            .replace("%CLINICAL-NOTE%", note_text)
    }

    /// The notes an LLM task reads: DiagnosticReports and DocumentReferences whose status
    /// says they are done (upstream's note filter).
    pub fn note_source() -> NoteSource {
        let list = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();
        NoteSource {
            resources: list(&["DiagnosticReport", "DocumentReference"]),
            status: Vec::new(),
            status_by_type: [
                (
                    "DiagnosticReport".to_string(),
                    list(&["final", "amended", "corrected", "appended", "unknown"]),
                ),
                ("DocumentReference".to_string(), list(&["current"])),
            ]
            .into(),
            doc_status: list(&["final", "amended"]),
            ed_codes: Default::default(),
        }
    }

    /// Whether its rows have the covid study's older format ([`RowFormat::Covid`]).
    pub fn row_format(&self) -> RowFormat {
        match self.definition.kind.as_str() {
            "covid_gpt" => RowFormat::Covid,
            _ => RowFormat::Result,
        }
    }

    /// The answer's field names as the model writes them (pydantic's aliases, the keys of the
    /// JSON schema) and as the row stores them (the result type's), in the type's order.
    pub fn answer_fields(&self) -> Vec<(String, String)> {
        let ResultType::Struct { r#struct } = &self.definition.result else {
            return Vec::new();
        };
        let written: Vec<String> = self.definition.json_schema["properties"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default();
        r#struct
            .iter()
            .enumerate()
            .map(|(i, (name, _))| {
                (
                    written.get(i).cloned().unwrap_or(name.clone()),
                    name.clone(),
                )
            })
            .collect()
    }

    /// The results table's schema: the note's references, when and by which version and
    /// model fingerprint, and the answer (every `spans` list as [start, end] pairs); for the
    /// covid study's tasks, their older columns.
    pub fn table_schema(&self) -> Result<Schema> {
        let text = |name: &str| Field::new(name, DataType::Utf8, true);
        if self.row_format() == RowFormat::Covid {
            let mut fields = crate::output::arrow_rows::covid_row_fields();
            fields.push(text("system_fingerprint"));
            fields.push(Field::new(
                "symptoms",
                arrow_type(&self.definition.result, false)?,
                true,
            ));
            return Ok(Schema::new(fields));
        }
        Ok(Schema::new(vec![
            text("note_ref"),
            text("encounter_ref"),
            text("subject_ref"),
            text("generated_on"),
            Field::new("task_version", DataType::Int32, true),
            text("system_fingerprint"),
            Field::new("result", arrow_type(&self.definition.result, false)?, true),
        ]))
    }
}

/// The Arrow type of an answer's column; a field named `spans` holds [start, end] pairs.
fn arrow_type(result: &ResultType, spans: bool) -> Result<DataType> {
    let item = |t: DataType| Arc::new(Field::new("item", t, true));
    if spans {
        return Ok(DataType::List(item(DataType::List(item(DataType::Int32)))));
    }
    Ok(match result {
        ResultType::Scalar(name) => match name.as_str() {
            "string" => DataType::Utf8,
            "bool" => DataType::Boolean,
            "int32" => DataType::Int32,
            "float32" => DataType::Float32,
            other => bail!("unknown result type '{other}'"),
        },
        ResultType::List { list } => DataType::List(item(arrow_type(list, false)?)),
        ResultType::Struct { r#struct } => {
            let fields: Fields = r#struct
                .iter()
                .map(|(name, t)| Ok(Field::new(name, arrow_type(t, name == "spans")?, true)))
                .collect::<Result<Vec<_>>>()?
                .into();
            DataType::Struct(fields)
        }
    })
}

/// Every LLM task, in study order.
pub fn llm_tasks() -> &'static [LlmTask] {
    static TASKS: OnceLock<Vec<LlmTask>> = OnceLock::new();
    TASKS.get_or_init(|| load().expect("the embedded LLM study files are valid"))
}

/// The LLM task named `name`.
pub fn find_llm_task(name: &str) -> Option<&'static LlmTask> {
    llm_tasks().iter().find(|t| t.name == name)
}

fn load() -> Result<Vec<LlmTask>> {
    let models: Vec<ModelInfo> =
        serde_json::from_str(MODELS_FILE).context("dataflows/llm/models.json")?;
    let mut tasks = Vec::new();
    for file in STUDY_FILES {
        let study: StudyFile = serde_json::from_str(file).context("a dataflows/llm study")?;
        for definition in study.tasks {
            let definition = Arc::new(definition);
            for id in &definition.models {
                let model = models
                    .iter()
                    .find(|m| &m.id == id)
                    .with_context(|| format!("model '{id}' of {}", definition.name))?;
                tasks.push(LlmTask {
                    name: format!("{}_{}", definition.name, id.replace('-', "_")),
                    study: study.study.clone(),
                    definition: definition.clone(),
                    model: Arc::new(model.clone()),
                });
            }
        }
    }
    Ok(tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_task_names_versions_and_models() {
        let tasks = llm_tasks();
        assert!(tasks.len() > 90, "{}", tasks.len());
        let example = find_llm_task("example_nlp__nlp_gpt_oss_120b").unwrap();
        assert_eq!(example.study, "example_nlp");
        assert_eq!(example.definition.version, 1);
        assert_eq!(
            example.cache_namespace(),
            "example_nlp__nlp_gpt_oss_120b_v1"
        );
        let local = example.model.local.as_ref().unwrap();
        assert_eq!(local.model, "openai/gpt-oss-120b");
        assert_eq!(local.url_env, "CUMULUS_GPT_OSS_120B_URL");
        assert_eq!(local.default_url, "http://localhost:8086/v1");
        assert!(find_llm_task("irae__nlp_donor_llama4_scout").is_some());
        assert!(find_llm_task("glioma__nlp_gene_gpt4o").is_some());
        assert!(find_llm_task("example_nlp__nlp_nonesuch").is_none());
        // The schema is pasted into the system prompt; the note goes in the user message.
        assert!(!example.definition.system_prompt.contains("%JSON-SCHEMA%"));
        assert!(example.definition.system_prompt.contains("\"AgeMention\""));
        assert_eq!(example.user_prompt("note text"), "note text");
    }

    #[test]
    fn the_covid_studys_gpt_tasks_keep_their_older_rows_and_read_aliased_answers() {
        let gpt35 = find_llm_task("covid_symptom__nlp_results_gpt35").unwrap();
        assert!(find_llm_task("covid_symptom__nlp_results_gpt4").is_some());
        assert_eq!(gpt35.row_format(), RowFormat::Covid);
        assert_eq!(gpt35.definition.version, 3);
        assert_eq!(
            gpt35.cache_namespace(),
            "covid_symptom__nlp_results_gpt35_v3"
        );
        let schema = gpt35.table_schema().unwrap();
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names[..2], ["id", "docref_id"]);
        assert_eq!(names[7], "symptoms");
        let fields = gpt35.answer_fields();
        assert_eq!(fields.len(), 11);
        assert_eq!(
            fields[0],
            (
                "Congestion or runny nose".into(),
                "congestion_or_runny_nose".into()
            )
        );
        assert_eq!(fields[10], ("Sore throat".into(), "sore_throat".into()));
        assert!(gpt35.user_prompt("NOTE").ends_with("### Text ###\nNOTE"));
    }

    #[test]
    fn every_table_schema_converts_and_spans_become_position_pairs() {
        for task in llm_tasks() {
            task.table_schema()
                .unwrap_or_else(|e| panic!("{}: {e:#}", task.name));
        }
        let example = find_llm_task("example_nlp__nlp_gpt4o").unwrap();
        let schema = example.table_schema().unwrap();
        let DataType::Struct(result) = schema.field_with_name("result").unwrap().data_type() else {
            panic!("result is a struct");
        };
        let names: Vec<&str> = result.iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["has_mention", "spans", "age"]);
        let pairs = DataType::List(Arc::new(Field::new(
            "item",
            DataType::List(Arc::new(Field::new("item", DataType::Int32, true))),
            true,
        )));
        assert_eq!(result[1].data_type(), &pairs);
        assert_eq!(result[2].data_type(), &DataType::Int32);
    }
}
