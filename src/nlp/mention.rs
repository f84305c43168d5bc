//! The match shape cTAKES returns (`MatchText`), which every engine produces and the output
//! table stores in its `match` column, plus the UTF-16 offset repair cTAKES answers need.

use serde::{Deserialize, Serialize};

/// cTAKES' polarity values.
pub const POSITIVE: i8 = 0;
/// A negated mention.
pub const NEGATED: i8 = -1;

/// One concept a mention maps to (field order as cTAKES writes it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Concept {
    pub code: String,
    pub cui: String,
    #[serde(rename = "codingScheme")]
    pub coding_scheme: String,
    pub tui: String,
}

/// One mention: a span of the note (character offsets) and its concepts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mention {
    pub begin: i64,
    pub end: i64,
    pub text: String,
    pub polarity: i8,
    #[serde(rename = "conceptAttributes")]
    pub concepts: Vec<Concept>,
    #[serde(rename = "type")]
    pub mention_type: String,
}

/// The mention type of symptoms.
pub const SIGN_SYMPTOM: &str = "SignSymptomMention";

impl Mention {
    /// Concepts sorted by their JSON text, as ctakesclient orders them.
    pub fn sort_concepts(&mut self) {
        self.concepts
            .sort_by_cached_key(|c| serde_json::to_string(c).expect("concepts serialize"));
    }
}

/// Maps UTF-16 code-unit offsets (what cTAKES, a Java server, reports) to character offsets.
/// Only notes with characters outside the Basic Multilingual Plane differ.
pub struct Utf16Offsets {
    /// For each character index, the UTF-16 offset where it starts; empty when they agree.
    starts: Vec<usize>,
}

impl Utf16Offsets {
    /// The offset table of a note.
    pub fn new(text: &str) -> Utf16Offsets {
        if text.chars().all(|c| (c as u32) < 0x10000) {
            return Utf16Offsets { starts: Vec::new() };
        }
        let mut starts = Vec::with_capacity(text.len());
        let mut unit = 0;
        for c in text.chars() {
            starts.push(unit);
            unit += c.len_utf16();
        }
        starts.push(unit);
        Utf16Offsets { starts }
    }

    /// The character offset of a UTF-16 offset (the next character when it splits a pair).
    pub fn to_char(&self, utf16: i64) -> i64 {
        if self.starts.is_empty() || utf16 <= 0 {
            return utf16;
        }
        self.starts.partition_point(|&s| (s as i64) < utf16) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf16_offsets_become_character_offsets() {
        // "😷" is two UTF-16 units but one character.
        let text = "😷 fever";
        let map = Utf16Offsets::new(text);
        assert_eq!(map.to_char(3), 2);
        assert_eq!(map.to_char(8), 7);
        let chars: String = text.chars().skip(2).take(5).collect();
        assert_eq!(chars, "fever");
        assert_eq!(Utf16Offsets::new("plain").to_char(4), 4);
    }

    #[test]
    fn mention_json_matches_ctakes_field_names_and_order() {
        let m = Mention {
            begin: 1,
            end: 2,
            text: "x".into(),
            polarity: 0,
            concepts: vec![Concept {
                code: "c".into(),
                cui: "C1".into(),
                coding_scheme: "SNOMEDCT_US".into(),
                tui: "T184".into(),
            }],
            mention_type: SIGN_SYMPTOM.into(),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"begin":1,"end":2,"text":"x","polarity":0,"conceptAttributes":[{"code":"c","cui":"C1","codingScheme":"SNOMEDCT_US","tui":"T184"}],"type":"SignSymptomMention"}"#
        );
    }
}
