//! Text spans of an LLM's answer turned into character positions in the note, as Cumulus ETL
//! computes them, so no note text reaches a results table.
//!
//! Every list under a key named `spans` (at any depth of objects, and of lists of objects) holds
//! quoted text; each quote is found in the note without regard to case, with its surrounding
//! punctuation and whitespace trimmed and any run of whitespace in it matching any run in the
//! note, and every match becomes `[start, end]` in characters (Unicode code points, as Python
//! counts them). A quote found nowhere is reported, and the note counts as failed.

use regex::RegexBuilder;
use serde_json::Value;

/// Characters trimmed from both ends of a quote: Python's `string.punctuation` and
/// `string.whitespace`.
const TRIMMED: &str = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ \t\n\r\x0b\x0c";

/// Characters Python's `re.escape` writes with a backslash that are whitespace: a run of them
/// becomes "any run of whitespace".
const ESCAPED_WHITESPACE: [char; 6] = [' ', '\t', '\n', '\r', '\x0b', '\x0c'];

/// Where `quote` occurs in `text`: the [start, end) character positions of every match, left
/// to right, none overlapping. A quote that is empty once trimmed matches the empty text at
/// every position, as Python's `re.finditer` does.
pub fn quote_positions(text: &str, quote: &str) -> Vec<[usize; 2]> {
    let trimmed = quote.trim_matches(|c| TRIMMED.contains(c));
    let pattern = literal_pattern(trimmed);
    let Ok(found) = RegexBuilder::new(&pattern)
        .case_insensitive(true)
        .size_limit(1 << 24)
        .build()
    else {
        return Vec::new();
    };
    // Byte offsets to character positions, counted once along the text.
    let mut positions = Vec::new();
    let (mut byte, mut chars) = (0, 0);
    let mut to_chars = |offset: usize| {
        chars += text[byte..offset].chars().count();
        byte = offset;
        chars
    };
    for m in found.find_iter(text) {
        let start = to_chars(m.start());
        let end = to_chars(m.end());
        positions.push([start, end]);
    }
    positions
}

/// A pattern matching `text` literally, except that each run of whitespace in it matches any
/// run of whitespace (Python's `re.escape`, then its escaped whitespace made `\s+`, as upstream
/// builds patterns from quotes and from `--select-by-word`).
pub fn literal_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() * 2);
    let mut in_space = false;
    for c in text.chars() {
        if ESCAPED_WHITESPACE.contains(&c) {
            if !in_space {
                pattern.push_str(r"\s+");
            }
            in_space = true;
            continue;
        }
        in_space = false;
        let mut buf = [0u8; 4];
        pattern.push_str(&regex::escape(c.encode_utf8(&mut buf)));
    }
    pattern
}

/// Replaces every `spans` list in `answer` by the positions of its quotes in `text`; returns
/// the quotes found nowhere.
pub fn locate_spans(answer: &mut Value, text: &str) -> Vec<String> {
    let mut missing = Vec::new();
    locate_in(answer, text, &mut missing);
    missing
}

fn locate_in(value: &mut Value, text: &str, missing: &mut Vec<String>) {
    let Value::Object(fields) = value else {
        return;
    };
    for (key, value) in fields.iter_mut() {
        if key != "spans" {
            match value {
                Value::Object(_) => locate_in(value, text, missing),
                // Lists are descended when their first item is an object, as upstream does.
                Value::Array(items) if items.first().is_some_and(Value::is_object) => {
                    for item in items {
                        locate_in(item, text, missing);
                    }
                }
                _ => {}
            }
            continue;
        }
        let quotes = match value {
            Value::Array(items) => std::mem::take(items),
            _ => Vec::new(),
        };
        let mut positions = Vec::new();
        for quote in quotes {
            let quote = match quote {
                Value::String(s) => s,
                other => other.to_string(),
            };
            let found = quote_positions(text, &quote);
            if found.is_empty() {
                missing.push(quote);
            }
            positions.extend(found.into_iter().map(|[s, e]| serde_json::json!([s, e])));
        }
        *value = Value::Array(positions);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn quotes_are_found_without_case_with_any_whitespace_and_trimmed_punctuation() {
        let text = "Patient is 45 years\nold.  Fever; FEVER again.";
        assert_eq!(quote_positions(text, "45 years old"), vec![[11, 23]]);
        assert_eq!(quote_positions(text, "fever"), vec![[26, 31], [33, 38]]);
        assert_eq!(
            quote_positions(text, "  \"Fever;\" "),
            vec![[26, 31], [33, 38]]
        );
        assert!(quote_positions(text, "chills").is_empty());
        // Special characters are literal.
        assert_eq!(quote_positions("a (b) c", "(b) c"), vec![[3, 7]]);
        assert_eq!(quote_positions("x.y xzy", "x.y"), vec![[0, 3]]);
    }

    #[test]
    fn positions_count_characters_not_bytes() {
        let text = "Température élevée: fièvre";
        assert_eq!(quote_positions(text, "FIÈVRE"), vec![[20, 26]]);
        let chars: Vec<char> = text.chars().collect();
        assert_eq!(chars[20..26].iter().collect::<String>(), "fièvre");
    }

    #[test]
    fn an_empty_quote_matches_at_every_position_as_in_python() {
        assert_eq!(quote_positions("ab", "..."), vec![[0, 0], [1, 1], [2, 2]]);
    }

    #[test]
    fn spans_at_any_depth_become_positions_and_missing_quotes_are_reported() {
        let text = "No fever. Cough since Monday.";
        let mut answer = json!({
            "has_mention": true,
            "spans": ["fever", "rash"],
            "nested": {"spans": ["cough since monday"], "other": ["fever"]},
            "items": [{"spans": ["Cough"]}, {"spans": []}],
            "strings": ["spans"],
        });
        let missing = locate_spans(&mut answer, text);
        assert_eq!(missing, ["rash"]);
        assert_eq!(
            answer,
            json!({
                "has_mention": true,
                "spans": [[3, 8]],
                "nested": {"spans": [[10, 28]], "other": ["fever"]},
                "items": [{"spans": [[10, 15]]}, {"spans": []}],
                "strings": ["spans"],
            })
        );
    }
}
