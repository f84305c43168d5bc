//! NLP studies on clinical notes: the covid symptom study with an embedded engine or cTAKES and
//! cNLP servers, declared in `dataflows/covid_symptom*.toml`. See `docs/nlp.md`.

pub mod cache;
pub mod ctakes;
pub mod dictionary;
pub mod embedded;
pub mod engine;
pub mod mention;
pub mod note;
pub mod producer;
pub mod run;
pub mod study;
