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

use anyhow::{Context, Result};
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
