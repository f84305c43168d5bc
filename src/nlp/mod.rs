//! NLP studies on clinical notes: the covid symptom study with an embedded engine or cTAKES and
//! cNLP servers, declared in `dataflows/covid_symptom*.toml`, and upstream's LLM studies against
//! OpenAI-compatible servers, derived into `dataflows/llm/`. See `docs/nlp.md`.

pub mod athena;
pub mod batch;
pub mod bedrock;
pub mod cache;
pub mod ctakes;
pub mod dictionary;
pub mod embedded;
pub mod engine;
pub mod html;
pub mod http;
pub mod llm_engine;
pub mod llm_study;
pub mod mention;
pub mod note;
pub mod openai;
pub mod producer;
pub mod run;
pub mod selection;
pub mod spans;
pub mod study;
