//! HTML character references (`&amp;`, `&#233;`, `&copy` without its semicolon) decoded as
//! HTML5 and Python's `html.unescape` decode them. The reference decodes a note's text twice:
//! once when lxml parses the HTML and once more when inscriptis writes each piece of text, so
//! `&amp;lt;` ends as `<`; [`super::html_to_text`] does the same with this one decoder.

use std::collections::HashMap;
use std::sync::OnceLock;

/// The HTML5 named references: name (with its `;`, or without for the legacy ones that may
/// omit it) and the code points it stands for. Derived by `tools/derive_html_rules.py`.
const ENTITIES: &str = include_str!("entities.tsv");

/// The longest name a reference can have, as Python's decoder reads them.
const MAX_NAME: usize = 32;

fn entities() -> &'static HashMap<&'static str, String> {
    static TABLE: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        ENTITIES
            .lines()
            .filter_map(|line| {
                let (name, points) = line.split_once('\t')?;
                let text = points
                    .split(' ')
                    .filter_map(|p| u32::from_str_radix(p, 16).ok())
                    .filter_map(char::from_u32)
                    .collect();
                Some((name, text))
            })
            .collect()
    })
}

/// `text` with every character reference decoded.
pub fn unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        let after = &rest[amp + 1..];
        match reference(after) {
            Some((decoded, used)) => {
                out.push_str(&decoded);
                rest = &after[used..];
            }
            None => {
                out.push('&');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The text of the reference at the start of `s` (what follows an `&`), and how many bytes of
/// `s` it took; None where `s` starts no reference.
fn reference(s: &str) -> Option<(String, usize)> {
    if let Some(number) = s.strip_prefix('#') {
        return numeric(number).map(|(text, used)| (text, used + 1));
    }
    // A name: up to 32 characters other than tab, newline, form feed, space, <, &, # and ;.
    let name_len = s
        .char_indices()
        .take_while(|&(_, c)| !matches!(c, '\t' | '\n' | '\x0c' | ' ' | '<' | '&' | '#' | ';'))
        .take(MAX_NAME)
        .last()
        .map_or(0, |(i, c)| i + c.len_utf8());
    if name_len == 0 {
        return None;
    }
    let with_semicolon = s[name_len..].starts_with(';');
    let whole = &s[..name_len + usize::from(with_semicolon)];
    let table = entities();
    if let Some(text) = table.get(whole) {
        return Some((text.clone(), whole.len()));
    }
    // The longest name that is a prefix of it (only names that may omit `;` can be), the rest
    // kept as it is.
    let boundaries: Vec<usize> = whole.char_indices().map(|(i, _)| i).skip(2).collect();
    boundaries
        .into_iter()
        .rev()
        .find_map(|end| table.get(&whole[..end]).map(|text| (text.clone(), end)))
}

/// A numeric reference after its `#`: decimal digits, or `x` and hex digits, and an optional
/// `;`; the code points HTML5 forbids are replaced as Python replaces them.
fn numeric(s: &str) -> Option<(String, usize)> {
    let (digits_from, radix) = match s.as_bytes().first() {
        Some(b'x' | b'X') => (1, 16),
        _ => (0, 10),
    };
    let digits = s[digits_from..]
        .bytes()
        .take_while(|b| {
            if radix == 16 {
                b.is_ascii_hexdigit()
            } else {
                b.is_ascii_digit()
            }
        })
        .count();
    if digits == 0 {
        return None;
    }
    let end = digits_from + digits;
    let used = end + usize::from(s[end..].starts_with(';'));
    // Too many digits for a u32 is beyond Unicode anyway.
    let number = u32::from_str_radix(&s[digits_from..end], radix).unwrap_or(u32::MAX);
    Some((code_point_text(number), used))
}

/// What a numeric reference to `number` stands for.
fn code_point_text(number: u32) -> String {
    if let Some(c) = windows_1252(number) {
        return c.to_string();
    }
    match number {
        0 => "\u{fffd}".into(),
        0x0d => "\r".into(),
        0xd800..=0xdfff => "\u{fffd}".into(),
        n if n > 0x10ffff => "\u{fffd}".into(),
        n if is_dropped(n) => String::new(),
        n => char::from_u32(n).map(String::from).unwrap_or_default(),
    }
}

/// Control characters and noncharacters: a reference to one stands for nothing.
fn is_dropped(n: u32) -> bool {
    matches!(n, 0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f..=0x9f | 0xfdd0..=0xfdef)
        || n & 0xfffe == 0xfffe
}

/// The C1 range read as Windows-1252, as HTML5 reads `&#128;` to `&#159;`; the five codes
/// Windows-1252 leaves unassigned stand for themselves.
fn windows_1252(n: u32) -> Option<char> {
    const HIGH: [u32; 32] = [
        0x20ac, 0x81, 0x201a, 0x192, 0x201e, 0x2026, 0x2020, 0x2021, 0x2c6, 0x2030, 0x160, 0x2039,
        0x152, 0x8d, 0x17d, 0x8f, 0x90, 0x2018, 0x2019, 0x201c, 0x201d, 0x2022, 0x2013, 0x2014,
        0x2dc, 0x2122, 0x161, 0x203a, 0x153, 0x9d, 0x17e, 0x178,
    ];
    (0x80..=0x9f)
        .contains(&n)
        .then(|| char::from_u32(HIGH[(n - 0x80) as usize]))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_numeric_and_legacy_references() {
        assert_eq!(unescape("a &amp; b &lt;c&gt;"), "a & b <c>");
        assert_eq!(unescape("&copy &lt"), "© <");
        assert_eq!(unescape("x &notit; y"), "x ¬it; y");
        assert_eq!(unescape("&#233;&#xE9;&#X41"), "ééA");
        assert_eq!(
            unescape("&#128;&#0;&#1;&#xD800;&#99999999999"),
            "€\u{fffd}\u{fffd}\u{fffd}"
        );
        assert_eq!(unescape("AT&T & &unknown; &#; &"), "AT&T & &unknown; &#; &");
        assert_eq!(unescape("&NotNestedGreaterGreater;"), "\u{2aa2}\u{338}");
    }
}
