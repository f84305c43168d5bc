//! Note selection by text, as upstream's options ask for it: `--select-by-word` and
//! `--select-by-regex` keep only notes whose text matches one of them, `--reject-by-word` and
//! `--reject-by-regex` leave out notes whose text matches one of them. Matching ignores case; a
//! term must stand on its own (a non-word character, or the start or end of the text, on each
//! side), and a word's spaces match any run of whitespace, so "severe cough" matches across a
//! line break.
//!
//! Upstream joins the terms into one Python pattern with look-aheads that `.` cannot carry past
//! a line break, so its rejections (and selections combined with them) look only at a note's
//! first line; here every term is looked for in the whole text, as the options describe.
//!
//! Notes can also be selected by a cohort in a CSV file ([`RefSelection`]): `--select-by-csv`
//! with the original ids of notes or patients, `--select-by-anon-csv` with anonymous ones, in
//! the columns upstream looks for (`note_ref`, `docref_id`, `patient_id`, `subject_ref`, ...).

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use regex::{Regex, RegexBuilder};

use super::spans::literal_pattern;

/// The text rules of a run; `keeps` says whether a note's text passes them.
#[derive(Debug)]
pub struct TextFilter {
    select: Option<Regex>,
    reject: Option<Regex>,
}

/// The terms of the four options.
#[derive(Debug, Clone, Default)]
pub struct TextRules {
    pub select_words: Vec<String>,
    pub select_regexes: Vec<String>,
    pub reject_words: Vec<String>,
    pub reject_regexes: Vec<String>,
}

impl TextFilter {
    /// The filter of `rules`; None when there are none. An invalid regex is an error that
    /// names it.
    pub fn new(rules: &TextRules) -> Result<Option<TextFilter>> {
        let select = combine(&rules.select_words, &rules.select_regexes)?;
        let reject = combine(&rules.reject_words, &rules.reject_regexes)?;
        if select.is_none() && reject.is_none() {
            return Ok(None);
        }
        Ok(Some(TextFilter { select, reject }))
    }

    /// Whether a note with this text is kept.
    pub fn keeps(&self, text: &str) -> bool {
        self.reject.as_ref().is_none_or(|r| !r.is_match(text))
            && self.select.as_ref().is_none_or(|s| s.is_match(text))
    }
}

/// One pattern matching any of the words or regexes, each standing on its own.
fn combine(words: &[String], regexes: &[String]) -> Result<Option<Regex>> {
    let mut parts = Vec::new();
    for regex in regexes {
        // Each alone first, so an invalid one is named.
        RegexBuilder::new(regex)
            .build()
            .with_context(|| format!("the note selection regex '{regex}' is not valid"))?;
        parts.push(standing_alone(regex));
    }
    for word in words {
        parts.push(standing_alone(&literal_pattern(word)));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let pattern = parts.join("|");
    Ok(Some(
        RegexBuilder::new(&pattern)
            .case_insensitive(true)
            .size_limit(1 << 26)
            .build()
            .context("the note selection terms")?,
    ))
}

/// `term` with a non-word character or an end of the text on each side (upstream's own `\b`,
/// which also lets a term start or end with a non-word character).
fn standing_alone(term: &str) -> String {
    format!(r"(?:\W|^|$)(?:{term})(?:\W|^|$)")
}

/// The notes of a cohort: note references, or, where a file names no notes, patients.
#[derive(Debug, Default)]
pub struct RefSelection {
    notes: HashSet<String>,
    patients: HashSet<String>,
    /// The file holds anonymous ids (compared with de-identified notes).
    pub anonymous: bool,
}

impl RefSelection {
    /// The cohort in the CSV file at `path`, read as upstream reads it: per row, a
    /// DiagnosticReport id or reference, else a DocumentReference one, and patients only when
    /// the file has no note columns. Columns are matched without case; `anonymous` files may
    /// also name them `anon_<column>` (preferred).
    pub fn from_csv(path: &Path, anonymous: bool) -> Result<RefSelection> {
        let file =
            std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
        Self::from_reader(file, &path.display().to_string(), anonymous)
    }

    /// [`RefSelection::from_csv`] from CSV text read from `input`, which messages call `name`.
    pub fn from_reader(
        input: impl std::io::Read,
        name: &str,
        anonymous: bool,
    ) -> Result<RefSelection> {
        let mut reader = csv::Reader::from_reader(input);
        let headers: Vec<String> = reader
            .headers()
            .with_context(|| format!("reading {name}"))?
            .iter()
            .map(str::to_lowercase)
            .collect();
        let report = Column::find(&headers, "DiagnosticReport", anonymous);
        let document = Column::find(&headers, "DocumentReference", anonymous);
        let patient = match (&report, &document) {
            (None, None) => Column::find(&headers, "Patient", anonymous),
            _ => None,
        };
        if report.is_none() && document.is_none() && patient.is_none() {
            return Err(anyhow!(
                "No patient or note IDs found in CSV file '{name}'."
            ));
        }
        let mut selection = RefSelection {
            anonymous,
            ..Default::default()
        };
        for row in reader.records() {
            let row = row.with_context(|| format!("reading {name}"))?;
            let cell = |c: &Option<Column>| c.as_ref().and_then(|c| c.reference(&row));
            if let Some(note) = cell(&report).or_else(|| cell(&document)) {
                selection.notes.insert(note);
            } else if let Some(subject) = cell(&patient) {
                selection.patients.insert(subject);
            }
        }
        Ok(selection)
    }

    /// Whether the note `note_ref` of the patient `subject_ref` is in the cohort.
    pub fn keeps(&self, note_ref: &str, subject_ref: Option<&str>) -> bool {
        (self.patients.is_empty() || subject_ref.is_some_and(|s| self.patients.contains(s)))
            && (self.notes.is_empty() || self.notes.contains(note_ref))
    }
}

/// The CSV column holding a resource type's ids or references.
struct Column {
    index: usize,
    resource_type: &'static str,
    /// The column holds whole references (`<type>/<id>`), not ids.
    references: bool,
}

impl Column {
    /// The first of upstream's column names for `resource_type` among `headers` (ids before
    /// references).
    fn find(headers: &[String], resource_type: &'static str, anonymous: bool) -> Option<Column> {
        let folded = resource_type.to_lowercase();
        let mut ids = vec![format!("{folded}_id")];
        let mut refs = vec![format!("{folded}_ref")];
        match resource_type {
            "DocumentReference" => {
                refs.extend(["document_ref".into(), "note_ref".into()]);
                ids.push("docref_id".into());
            }
            "DiagnosticReport" => refs.extend(["document_ref".into(), "note_ref".into()]),
            _ => {
                ids.push("subject_id".into());
                refs.push("subject_ref".into());
            }
        }
        if anonymous {
            ids = ids
                .iter()
                .map(|n| format!("anon_{n}"))
                .chain(ids.clone())
                .collect();
            refs = refs
                .iter()
                .map(|n| format!("anon_{n}"))
                .chain(refs.clone())
                .collect();
        }
        let position = |names: &[String]| {
            names
                .iter()
                .find_map(|n| headers.iter().position(|h| h == n))
        };
        if let Some(index) = position(&ids) {
            return Some(Column {
                index,
                resource_type,
                references: false,
            });
        }
        position(&refs).map(|index| Column {
            index,
            resource_type,
            references: true,
        })
    }

    /// The reference in this column of `row`, if it holds one of the column's type.
    fn reference(&self, row: &csv::StringRecord) -> Option<String> {
        let value = row.get(self.index).filter(|v| !v.is_empty())?;
        match self.references {
            false => Some(format!("{}/{value}", self.resource_type)),
            true => value
                .strip_prefix(self.resource_type)
                .filter(|rest| rest.starts_with('/'))
                .map(|_| value.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(rules: TextRules) -> TextFilter {
        TextFilter::new(&rules).unwrap().unwrap()
    }

    fn words(list: &[&str]) -> Vec<String> {
        list.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn words_are_whole_case_blind_and_may_cross_lines() {
        let f = filter(TextRules {
            select_words: words(&["severe cough", "a+"]),
            ..Default::default()
        });
        assert!(f.keeps("Has a SEVERE\n  cough today"));
        assert!(!f.keeps("severe coughing"));
        assert!(f.keeps("grade a+ result"));
        assert!(f.keeps("a+"));
        assert!(!f.keeps("no match here"));
    }

    #[test]
    fn rejections_win_over_selections_anywhere_in_the_note() {
        let f = filter(TextRules {
            select_regexes: words(&["fever(s)?"]),
            reject_words: words(&["covid"]),
            ..Default::default()
        });
        assert!(f.keeps("Two fevers this week."));
        assert!(!f.keeps("Fever.\nLater: positive for COVID."));
        assert!(!f.keeps("No symptoms."));
        let only_reject = filter(TextRules {
            reject_words: words(&["draft"]),
            ..Default::default()
        });
        assert!(only_reject.keeps("final note"));
        assert!(!only_reject.keeps("line one\nDRAFT"));
    }

    #[test]
    fn no_rules_no_filter_and_a_bad_regex_is_named() {
        assert!(TextFilter::new(&TextRules::default()).unwrap().is_none());
        let bad = TextRules {
            select_regexes: words(&["fever("]),
            ..Default::default()
        };
        let e = TextFilter::new(&bad).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the note selection regex 'fever(' is not valid"
        );
    }
}

#[cfg(test)]
mod cohort_tests {
    use super::*;

    fn cohort(text: &str, anonymous: bool) -> Result<RefSelection> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cohort.csv");
        std::fs::write(&path, text).unwrap();
        RefSelection::from_csv(&path, anonymous)
    }

    #[test]
    fn notes_are_read_from_upstreams_columns_and_patients_only_without_them() {
        let notes = cohort(
            "Patient_ID,note_ref,DocRef_ID\np1,DiagnosticReport/r1,d9\np2,Patient/x,d2\n",
            false,
        )
        .unwrap();
        // Per row, a DiagnosticReport first (note_ref holds one in row 1), then a
        // DocumentReference (docref_id); patients are not looked at when notes are named.
        assert!(notes.keeps("DiagnosticReport/r1", Some("Patient/other")));
        assert!(!notes.keeps("DocumentReference/d9", None));
        assert!(notes.keeps("DocumentReference/d2", None));
        let patients = cohort("subject_ref\nPatient/p1\nGroup/g\n", false).unwrap();
        assert!(patients.keeps("DocumentReference/any", Some("Patient/p1")));
        assert!(!patients.keeps("DocumentReference/any", Some("Patient/p2")));
        assert!(!patients.keeps("DocumentReference/any", Some("Group/g")));
        let anon = cohort("docref_id,anon_docref_id\nraw,hashed\n", true).unwrap();
        assert!(anon.keeps("DocumentReference/hashed", None));
        assert!(!anon.keeps("DocumentReference/raw", None));
        let e = cohort("name,age\nx,1\n", false).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("No patient or note IDs found in CSV file"),
            "{e}"
        );
    }
}
