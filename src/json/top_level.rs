//! One top-level string field of a JSON object, found without parsing the rest: a re-run reads
//! every input line's `id` before deciding which lines to process, and FHIR resources put
//! `resourceType` and `id` first, so the scan stops after a few dozen bytes. Nested values
//! before the field are skipped over, strings by their quotes; anything escaped falls back to
//! the validating tape.

use std::borrow::Cow;

use super::Tape;

/// The string value of the first top-level field `name` of the object `line` (None when the
/// line is not an object, lacks the field, or holds something else there). A malformed line
/// may still give a value: callers must not take it as proof the line is valid JSON.
pub fn top_level_str<'a>(line: &'a [u8], name: &str) -> Option<Cow<'a, str>> {
    let mut at = skip_space(line, 0);
    if line.get(at) != Some(&b'{') {
        return None;
    }
    at += 1;
    loop {
        at = skip_space(line, at);
        if line.get(at) != Some(&b'"') {
            return None;
        }
        let (key_end, key_escaped) = string_end(line, at + 1)?;
        let key = &line[at + 1..key_end];
        at = skip_space(line, key_end + 1);
        if line.get(at) != Some(&b':') {
            return None;
        }
        at = skip_space(line, at + 1);
        if key_escaped {
            // The key may spell `name` with escapes.
            return from_tape(line, name);
        }
        if key == name.as_bytes() {
            if line.get(at) != Some(&b'"') {
                return None;
            }
            let (end, escaped) = string_end(line, at + 1)?;
            if escaped {
                return from_tape(line, name);
            }
            return std::str::from_utf8(&line[at + 1..end])
                .ok()
                .map(Cow::Borrowed);
        }
        at = skip_space(line, skip_value(line, at)?);
        if line.get(at) != Some(&b',') {
            return None;
        }
        at += 1;
    }
}

/// The slow path: the whole line parsed and checked.
fn from_tape<'a>(line: &'a [u8], name: &str) -> Option<Cow<'a, str>> {
    let mut tape = Tape::default();
    let doc = tape.parse(line).ok()?;
    doc.get_str(0, name).map(|s| Cow::Owned(s.into_owned()))
}

fn skip_space(line: &[u8], mut at: usize) -> usize {
    while matches!(line.get(at), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        at += 1;
    }
    at
}

/// The position of the quote that ends the string whose text starts at `at`, and whether the
/// text holds an escape.
fn string_end(line: &[u8], mut at: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    loop {
        at += memchr::memchr2(b'"', b'\\', &line[at.min(line.len())..])?;
        if line[at] == b'"' {
            return Some((at, escaped));
        }
        escaped = true;
        at += 2;
    }
}

/// The position just past the value that starts at `at`.
fn skip_value(line: &[u8], at: usize) -> Option<usize> {
    match *line.get(at)? {
        b'"' => string_end(line, at + 1).map(|(end, _)| end + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match *line.get(i)? {
                    b'"' => i = string_end(line, i + 1)?.0,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let rest = &line[at..];
            let len = rest
                .iter()
                .position(|b| matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\r' | b'\n'))
                .unwrap_or(rest.len());
            (len > 0).then_some(at + len)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(line: &str) -> Option<String> {
        top_level_str(line.as_bytes(), "id").map(Cow::into_owned)
    }

    #[test]
    fn finds_the_field_after_nested_values_and_strings_with_quotes_and_braces() {
        assert_eq!(
            id(r#"{"resourceType":"Patient","id":"p1"}"#).as_deref(),
            Some("p1")
        );
        let line = r#" { "meta" : {"tag":[{"code":"}]\"{"}, [1, {"id":"no"}]]}, "n": -1.5e3, "ok": true, "x": null, "id" : "p 2" } "#;
        assert_eq!(id(line).as_deref(), Some("p 2"));
        // Only the top level counts.
        assert_eq!(id(r#"{"subject":{"id":"inner"}}"#), None);
        assert_eq!(id(r#"{"resourceType":"Patient"}"#), None);
    }

    #[test]
    fn escapes_are_decoded_by_the_tape_and_non_strings_and_non_objects_give_none() {
        assert_eq!(id(r#"{"id":"a\u0062c"}"#).as_deref(), Some("abc"));
        assert_eq!(id(r#"{"i\u0064":"xyz"}"#).as_deref(), Some("xyz"));
        assert_eq!(
            id(r#"{"note":"say \"hi\"","id":"q"}"#).as_deref(),
            Some("q")
        );
        assert_eq!(id(r#"{"id":7}"#), None);
        assert_eq!(id(r#"["id","x"]"#), None);
        assert_eq!(id(r#"{"id":"unterminated}"#), None);
        assert_eq!(id(""), None);
    }
}
