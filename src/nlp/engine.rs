//! What turns a note into result rows ([`NoteEngine`]): the covid study's symptom engines
//! (behind [`SymptomEngine`], with the selection they share: positive SignSymptom mentions
//! whose concepts include a covid CUI, sorted by begin then first code, then a polarity check
//! that keeps the mentions that are positive, made rows by [`CovidRows`]) and the LLM studies'
//! engine (`llm_engine`).

use std::collections::HashSet;
use std::sync::Arc;

use anyhow::Result;
use futures::future::BoxFuture;
use serde_json::{Value, json};

use super::embedded::EmbeddedEngine;
use super::mention::{Mention, POSITIVE, SIGN_SYMPTOM};
use super::note::NoteIds;
use super::study::PolarityModel;

/// A note as an engine sees it: its de-identified ids and its text.
#[derive(Debug, Clone)]
pub struct NoteInput {
    pub ids: NoteIds,
    pub text: String,
}

/// What an engine made of a note: its result rows (key, row), and a problem that sends the
/// note to the errors folder although its rows are kept (say, an LLM's quote found nowhere in
/// the note).
#[derive(Debug, Default)]
pub struct NoteOutcome {
    pub rows: Vec<(String, Value)>,
    pub problem: Option<String>,
}

/// Turns a note into result rows, or an error that sends the note to the errors folder.
/// Engines may call servers; a server engine's future runs on the NLP runtime, never on a
/// dataflow worker.
pub trait NoteEngine: Send + Sync {
    fn analyse<'a>(&'a self, note: &'a NoteInput) -> BoxFuture<'a, Result<NoteOutcome>>;
}

/// The covid study's rows from a symptom engine: one per positive finding, or a placeholder
/// `<id>.0` with no match so downstream queries know the note was processed.
pub struct CovidRows<E> {
    pub engine: E,
    /// UTC time stamped on result rows.
    pub generated_on: String,
    pub task_version: i32,
}

impl<E> CovidRows<E> {
    /// The rows of a note with `findings`.
    pub fn rows(&self, ids: &NoteIds, findings: &[Finding]) -> Vec<(String, Value)> {
        let row = |index: usize, matched: Option<&Mention>| {
            let id = format!("{}.{index}", ids.note_id);
            let mut value = json!({
                "id": id,
                "docref_id": ids.note_id,
                "encounter_id": ids.encounter_id,
                "subject_id": ids.subject_id,
                "generated_on": self.generated_on,
                "task_version": self.task_version,
            });
            if let Some(m) = matched {
                value["match"] = serde_json::to_value(m).expect("mentions serialize");
            }
            (id, value)
        };
        if findings.is_empty() {
            return vec![row(0, None)];
        }
        findings
            .iter()
            .map(|f| row(f.index, Some(&f.mention)))
            .collect()
    }
}

impl<E: SymptomEngine> NoteEngine for CovidRows<E> {
    fn analyse<'a>(&'a self, note: &'a NoteInput) -> BoxFuture<'a, Result<NoteOutcome>> {
        Box::pin(async move {
            let findings = self.engine.find(&note.text).await?;
            Ok(NoteOutcome {
                rows: self.rows(&note.ids, &findings),
                problem: None,
            })
        })
    }
}

impl<E: SymptomEngine + ?Sized> SymptomEngine for Arc<E> {
    fn find<'a>(&'a self, note: &'a str) -> BoxFuture<'a, Result<Vec<Finding>>> {
        self.as_ref().find(note)
    }
}

/// A positive covid symptom mention and its index among the candidate mentions (the row id
/// suffix; indices of mentions that were not positive are skipped, as upstream).
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub index: usize,
    pub mention: Mention,
}

/// Finds the positive covid symptoms of a note. Engines may call servers; the returned future
/// runs on the NLP runtime, never on a dataflow worker.
pub trait SymptomEngine: Send + Sync {
    /// The note's findings, or an error that sends the note to the errors folder.
    fn find<'a>(&'a self, note: &'a str) -> BoxFuture<'a, Result<Vec<Finding>>>;
}

/// The candidate mentions: positive SignSymptom mentions with a covid CUI, sorted by begin,
/// ties by the first concept's code.
pub fn covid_candidates(mentions: Vec<Mention>, covid_cuis: &HashSet<String>) -> Vec<Mention> {
    let mut out: Vec<Mention> = mentions
        .into_iter()
        .filter(|m| m.mention_type == SIGN_SYMPTOM && m.polarity == POSITIVE)
        .filter(|m| m.concepts.iter().any(|c| covid_cuis.contains(&c.cui)))
        .collect();
    out.sort_by(|a, b| {
        let code = |m: &Mention| m.concepts.first().map(|c| c.code.clone());
        a.begin.cmp(&b.begin).then_with(|| code(a).cmp(&code(b)))
    });
    out
}

/// Keeps the candidates whose polarity check said positive.
pub fn positive_findings(candidates: Vec<Mention>, positive: &[bool]) -> Vec<Finding> {
    candidates
        .into_iter()
        .enumerate()
        .zip(positive)
        .filter(|(_, p)| **p)
        .map(|((index, mention), _)| Finding { index, mention })
        .collect()
}

/// The embedded engine as a `SymptomEngine`: its negation detector both sets the mention
/// polarity (as cTAKES does) and is the polarity check (as cNLP is).
pub struct EmbeddedSymptoms {
    pub engine: Arc<EmbeddedEngine>,
    pub covid_cuis: Arc<HashSet<String>>,
    pub model: PolarityModel,
}

impl EmbeddedSymptoms {
    /// The findings of one note, computed on the calling thread.
    pub fn find_now(&self, note: &str) -> Vec<Finding> {
        let mentions = self.engine.mentions(note, self.model);
        let candidates = covid_candidates(mentions, &self.covid_cuis);
        let all = vec![true; candidates.len()];
        positive_findings(candidates, &all)
    }
}

impl SymptomEngine for EmbeddedSymptoms {
    fn find<'a>(&'a self, note: &'a str) -> BoxFuture<'a, Result<Vec<Finding>>> {
        Box::pin(async move { Ok(self.find_now(note)) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nlp::dictionary::Dictionary;
    use crate::nlp::mention::Concept;

    fn mention(begin: i64, code: &str, cui: &str, polarity: i8) -> Mention {
        Mention {
            begin,
            end: begin + 1,
            text: "x".into(),
            polarity,
            concepts: vec![Concept {
                code: code.into(),
                cui: cui.into(),
                coding_scheme: "SNOMEDCT_US".into(),
                tui: "T184".into(),
            }],
            mention_type: SIGN_SYMPTOM.into(),
        }
    }

    #[test]
    fn candidates_are_covid_positive_and_sorted() {
        let cuis: HashSet<String> = ["C1".to_string(), "C2".to_string()].into();
        let picked = covid_candidates(
            vec![
                mention(5, "b", "C1", 0),
                mention(5, "a", "C2", 0),
                mention(1, "z", "C1", 0),
                mention(0, "n", "C1", -1),
                mention(0, "o", "C9", 0),
            ],
            &cuis,
        );
        let order: Vec<(i64, &str)> = picked
            .iter()
            .map(|m| (m.begin, m.concepts[0].code.as_str()))
            .collect();
        assert_eq!(order, [(1, "z"), (5, "a"), (5, "b")]);
        let found = positive_findings(picked, &[true, false, true]);
        assert_eq!(found.iter().map(|f| f.index).collect::<Vec<_>>(), [0, 2]);
    }

    #[test]
    fn embedded_engine_skips_negated_symptoms() {
        let d = Dictionary::covid();
        let e = EmbeddedSymptoms {
            engine: Arc::new(EmbeddedEngine::new(&d)),
            covid_cuis: Arc::new(d.cuis.clone()),
            model: PolarityModel::Negation,
        };
        let found = e.find_now("Denies fever. Has a cough.");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].mention.text, "cough");
        assert_eq!(found[0].index, 0);
    }
}
