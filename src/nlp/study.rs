//! NLP studies declared in `dataflows/*.toml` (embedded): which notes they read, which engine
//! chain they run, and the table they write.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Context, Result, anyhow};
use serde::Deserialize;

use super::dictionary::{COVID_SYMPTOMS_BSV, Dictionary};

const STUDY_FILES: [&str; 2] = [
    include_str!("../../dataflows/covid_symptom.toml"),
    include_str!("../../dataflows/covid_symptom_term_exists.toml"),
];

/// How the polarity of a mention is checked after matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolarityModel {
    /// Is the mention negated? (cNLP negation: -1 positive, 1 negated)
    Negation,
    /// Does the symptom exist? (cNLP termexists: 1 positive, -1 negative)
    TermExists,
}

/// Which notes a study reads: resource types, the `status` and `docStatus` values allowed
/// (absent is always allowed), and, if any are listed, the codings that make a note an
/// emergency department note (one of them is required).
#[derive(Debug, Clone, Deserialize)]
pub struct NoteSource {
    pub resources: Vec<String>,
    pub status: Vec<String>,
    /// `status` values allowed for a resource type, in place of `status`.
    #[serde(default)]
    pub status_by_type: BTreeMap<String, Vec<String>>,
    pub doc_status: Vec<String>,
    #[serde(default)]
    pub ed_codes: BTreeMap<String, HashSet<String>>,
}

/// The engine chain's settings.
#[derive(Debug, Clone, Deserialize)]
pub struct EngineSettings {
    pub polarity: PolarityModel,
    pub ctakes_namespace: String,
    pub cnlp_namespace: String,
}

#[derive(Deserialize)]
struct StudyFile {
    name: String,
    extends: Option<String>,
    group_field: Option<String>,
    task_version: Option<i32>,
    dictionary: Option<String>,
    source: Option<NoteSource>,
    engine: EngineSettings,
}

/// One NLP task, fully resolved.
#[derive(Debug, Clone)]
pub struct Study {
    /// Task and table name, `<study>__<table>`.
    pub name: String,
    pub group_field: String,
    pub task_version: i32,
    pub source: NoteSource,
    pub engine: EngineSettings,
    /// The dictionary's BSV text.
    pub dictionary_bsv: &'static str,
}

impl Study {
    /// The study prefix (`covid_symptom`), the folder of the file formats' layout.
    pub fn study_prefix(&self) -> &str {
        self.name.split_once("__").map_or(&self.name, |(s, _)| s)
    }

    /// The table name without the study prefix (`nlp_results`).
    pub fn short_table(&self) -> &str {
        self.name.split_once("__").map_or(&self.name, |(_, t)| t)
    }

    /// The parsed dictionary.
    pub fn dictionary(&self) -> Dictionary {
        Dictionary::parse(self.dictionary_bsv).expect("embedded dictionaries are valid")
    }
}

/// All NLP studies, resolved.
pub fn all_studies() -> Vec<Study> {
    let files: Vec<StudyFile> = STUDY_FILES
        .iter()
        .map(|t| toml::from_str(t).expect("embedded study files are valid"))
        .collect();
    files
        .iter()
        .map(|f| resolve(f, &files).expect("embedded study files resolve"))
        .collect()
}

/// The study named `name` (case-insensitive), if any.
pub fn find_study(name: &str) -> Option<Study> {
    all_studies()
        .into_iter()
        .find(|s| s.name.eq_ignore_ascii_case(name))
}

fn resolve(file: &StudyFile, all: &[StudyFile]) -> Result<Study> {
    let base = match &file.extends {
        Some(parent) => Some(
            all.iter()
                .find(|f| &f.name == parent)
                .ok_or_else(|| anyhow!("{} extends unknown study {parent}", file.name))?,
        ),
        None => None,
    };
    let pick = |f: fn(&StudyFile) -> Option<String>| f(file).or_else(|| base.and_then(f));
    let dictionary = pick(|f| f.dictionary.clone()).context("no dictionary")?;
    let dictionary_bsv = match dictionary.as_str() {
        "covid_symptoms.bsv" => COVID_SYMPTOMS_BSV,
        other => return Err(anyhow!("unknown dictionary {other}")),
    };
    Ok(Study {
        name: file.name.clone(),
        group_field: pick(|f| f.group_field.clone()).context("no group_field")?,
        task_version: file
            .task_version
            .or_else(|| base.and_then(|b| b.task_version))
            .context("no task_version")?,
        source: file
            .source
            .clone()
            .or_else(|| base.and_then(|b| b.source.clone()))
            .context("no source")?,
        engine: file.engine.clone(),
        dictionary_bsv,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_covid_studies_resolve() {
        let all = all_studies();
        assert_eq!(all.len(), 2);
        let main = find_study("COVID_SYMPTOM__NLP_RESULTS").unwrap();
        assert_eq!(main.task_version, 4);
        assert_eq!(main.group_field, "docref_id");
        assert_eq!(main.study_prefix(), "covid_symptom");
        assert_eq!(main.short_table(), "nlp_results");
        assert!(main.source.ed_codes["http://loinc.org"].contains("34111-5"));
        let te = find_study("covid_symptom__nlp_results_term_exists").unwrap();
        assert_eq!(te.engine.polarity, PolarityModel::TermExists);
        assert_eq!(
            te.engine.cnlp_namespace,
            "covid_symptom_v4-cnlp_term_exists_v1"
        );
        assert_eq!(te.source.ed_codes.len(), 3);
    }
}
