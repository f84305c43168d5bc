//! The covid symptom dictionary (`CUI|TUI|CODE|SAB|STR|PREF`, the file cTAKES is restarted
//! with): which concepts count as covid symptoms, and which phrases the embedded engine looks for.

use std::collections::{BTreeMap, HashSet};

use anyhow::{Result, bail};

use super::mention::Concept;

/// The dictionary shipped with the covid symptom study.
pub const COVID_SYMPTOMS_BSV: &str = include_str!("../../dataflows/covid_symptoms.bsv");

/// A parsed symptom dictionary.
#[derive(Debug, Clone)]
pub struct Dictionary {
    /// Normalized phrase (lower-case words joined by one space) to its concepts, in file order.
    pub phrases: BTreeMap<String, Vec<Concept>>,
    /// Every CUI of the dictionary: a cTAKES match is a covid symptom when it has one of them.
    pub cuis: HashSet<String>,
}

impl Dictionary {
    /// The built-in covid symptom dictionary.
    pub fn covid() -> Dictionary {
        Dictionary::parse(COVID_SYMPTOMS_BSV).expect("the embedded dictionary is valid")
    }

    /// Parses BSV text; `#` lines and blank lines are comments.
    pub fn parse(text: &str) -> Result<Dictionary> {
        let mut phrases: BTreeMap<String, Vec<Concept>> = BTreeMap::new();
        let mut cuis = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let cols: Vec<&str> = line.split('|').map(str::trim).collect();
            if cols.len() != 6 {
                bail!(
                    "dictionary line {}: expected 6 columns, found {}",
                    n + 1,
                    cols.len()
                );
            }
            let concept = Concept {
                code: cols[2].to_string(),
                cui: cols[0].to_string(),
                coding_scheme: cols[3].to_string(),
                tui: cols[1].to_string(),
            };
            cuis.insert(concept.cui.clone());
            let key = normalize_phrase(cols[4]);
            let list = phrases.entry(key).or_default();
            if !list.contains(&concept) {
                list.push(concept);
            }
        }
        Ok(Dictionary { phrases, cuis })
    }
}

/// Lower-case words of a phrase joined by single spaces (punctuation separates words).
pub fn normalize_phrase(phrase: &str) -> String {
    phrase
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covid_dictionary_has_the_study_concepts() {
        let d = Dictionary::covid();
        assert!(d.cuis.contains("C0015967"), "fever");
        assert!(d.cuis.contains("C0010200"), "cough");
        assert!(d.phrases.contains_key("stuffed up nose"));
        assert!(d.phrases["cough"].iter().any(|c| c.cui == "C0010200"));
    }

    #[test]
    fn bad_lines_are_named() {
        let e = Dictionary::parse("C1|T1|x\n").unwrap_err();
        assert!(e.to_string().contains("line 1"));
    }
}
