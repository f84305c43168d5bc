//! Strings as Python holds them: sequences of UTF-16 code units, in which an unpaired surrogate
//! (`\ud800` to `\udfff` escaped alone) is a valid character. Python's `json` reads such
//! escapes and `json.dumps` writes them back as they were; a Rust `str` cannot hold them. The
//! rare strings that have one are decoded here into code units, trimmed as Python's
//! `str.strip()` trims, and written back in `json.dumps`'s ASCII form, so a kept value leaves
//! exactly as the Python tool would write it.

use super::tape::hex_unit;

/// Python's `str.isspace()`: Unicode's White_Space plus the four ASCII separators
/// `\x1c` to `\x1f`, which `str.strip()` also removes.
pub fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// `text` without leading and trailing whitespace, as Python's `str.strip()` removes it.
pub fn python_strip(text: &str) -> &str {
    // Most kept strings (codes, ids, dates) start and end with an ASCII character that is not
    // a space: nothing to decode at either end.
    let kept = |b: u8| b.is_ascii() && !is_python_space(char::from(b));
    match text.as_bytes() {
        [first, .., last] if kept(*first) && kept(*last) => text,
        [only] if kept(*only) => text,
        _ => text.trim_matches(is_python_space),
    }
}

/// Decodes the text of a JSON string (between its quotes, already validated) into UTF-16 code
/// units, appended to `units`; an escaped surrogate pair gives its two units, a lone one its
/// one unit.
pub fn decode_units(raw: &[u8], units: &mut Vec<u16>) {
    let mut at = 0;
    while at < raw.len() {
        match raw[at] {
            b'\\' => {
                let escaped = raw.get(at + 1).copied().unwrap_or(b'\\');
                at += 2;
                let unit = match escaped {
                    b'b' => 0x08,
                    b'f' => 0x0c,
                    b'n' => b'\n' as u16,
                    b'r' => b'\r' as u16,
                    b't' => b'\t' as u16,
                    b'u' => {
                        let unit = hex_unit(raw, at).unwrap_or(0xfffd);
                        at += 4;
                        unit
                    }
                    other => other as u16,
                };
                units.push(unit);
            }
            b if b < 0x80 => {
                units.push(b as u16);
                at += 1;
            }
            _ => {
                // A validated span: the bytes from here to the next ASCII byte are UTF-8, or
                // surrogates encoded as UTF-8 would encode them.
                let end = raw[at..]
                    .iter()
                    .position(u8::is_ascii)
                    .map_or(raw.len(), |n| at + n);
                push_utf8_units(&raw[at..end], units);
                at = end;
            }
        }
    }
}

/// The three bytes UTF-8's pattern gives a surrogate (`ED A0 80` to `ED BF BF`), as its unit.
fn encoded_surrogate(bytes: &[u8]) -> Option<u16> {
    match *bytes {
        [0xed, b1 @ 0xa0..=0xbf, b2 @ 0x80..=0xbf, ..] => {
            Some(0xd000 | u16::from(b1 & 0x3f) << 6 | u16::from(b2 & 0x3f))
        }
        _ => None,
    }
}

/// Whether `bytes` are UTF-8 once surrogates encoded in UTF-8's pattern are allowed (what
/// Python's `surrogatepass` decodes; strict UTF-8 refuses them).
pub fn is_utf8_with_surrogates(mut bytes: &[u8]) -> bool {
    loop {
        match std::str::from_utf8(bytes) {
            Ok(_) => return true,
            Err(e) => {
                let rest = &bytes[e.valid_up_to()..];
                if encoded_surrogate(rest).is_none() {
                    return false;
                }
                bytes = &rest[3..];
            }
        }
    }
}

/// Appends the units of UTF-8 bytes (surrogates encoded in UTF-8's pattern included; anything
/// else invalid becomes U+FFFD).
fn push_utf8_units(mut bytes: &[u8], units: &mut Vec<u16>) {
    while !bytes.is_empty() {
        let (valid, rest) = match std::str::from_utf8(bytes) {
            Ok(text) => (text, &[][..]),
            Err(e) => {
                let (valid, rest) = bytes.split_at(e.valid_up_to());
                // SAFETY: from_utf8 vouched for these bytes.
                (unsafe { std::str::from_utf8_unchecked(valid) }, rest)
            }
        };
        units.extend(valid.encode_utf16());
        if rest.is_empty() {
            break;
        }
        match encoded_surrogate(rest) {
            Some(unit) => {
                units.push(unit);
                bytes = &rest[3..];
            }
            None => {
                units.push(0xfffd);
                bytes = &rest[1..];
            }
        }
    }
}

/// `units` without leading and trailing whitespace (Python's `str.strip()`; surrogates are not
/// whitespace, and no whitespace character is outside the Basic Multilingual Plane).
pub fn strip_units(units: &[u16]) -> &[u16] {
    let space = |u: &u16| char::from_u32(u32::from(*u)).is_some_and(is_python_space);
    let start = units.iter().position(|u| !space(u)).unwrap_or(units.len());
    let end = units
        .iter()
        .rposition(|u| !space(u))
        .map_or(start, |e| e + 1);
    &units[start..end]
}

/// Appends `units` as a quoted JSON string in `json.dumps`'s default (ASCII) form: printable
/// ASCII as it is, the short escapes for quote, backslash and `\b \f \n \r \t`, and every other
/// code unit as `\uxxxx` (pairs as their two halves, lone surrogates alone).
pub fn write_units(out: &mut Vec<u8>, units: &[u16]) {
    out.push(b'"');
    write_units_unquoted(out, units);
    out.push(b'"');
}

/// As `write_units`, without the quotes.
pub fn write_units_unquoted(out: &mut Vec<u8>, units: &[u16]) {
    for &unit in units {
        match unit {
            0x22 => out.extend_from_slice(b"\\\""),
            0x5c => out.extend_from_slice(b"\\\\"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0d => out.extend_from_slice(b"\\r"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x20..=0x7e => out.push(unit as u8),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[usize::from(unit >> shift & 0xf)]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn units_of(json_text: &str) -> Vec<u16> {
        let mut units = Vec::new();
        decode_units(json_text.as_bytes(), &mut units);
        units
    }

    #[test]
    fn strings_decode_to_the_units_python_holds() {
        assert_eq!(
            units_of(r"pain \ud83d then"),
            "pain "
                .encode_utf16()
                .chain([0xd83d])
                .chain(" then".encode_utf16())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            units_of(r"\uD83D\uDE00é\/\n"),
            "😀é/\n".encode_utf16().collect::<Vec<_>>()
        );
        assert_eq!(units_of(r"\ude00\ud83d"), [0xde00, 0xd83d]);
        // Surrogates encoded as UTF-8 bytes, as Python's surrogatepass reads them.
        let mut units = Vec::new();
        decode_units(b"a\xed\xa0\xbd\xed\xb8\x80\xc3\xa9", &mut units);
        assert_eq!(units, [b'a' as u16, 0xd83d, 0xde00, 0xe9]);
        assert!(is_utf8_with_surrogates(b"a\xed\xbf\xbf\xc3\xa9"));
        assert!(!is_utf8_with_surrogates(b"a\xed\x9f"));
        assert!(!is_utf8_with_surrogates(b"\xff"));
    }

    /// Written as Python's `json.dumps` writes the same code units (checked against it).
    #[test]
    fn units_are_written_as_json_dumps_writes_them() {
        for (text, python) in [
            (r"pain \ud83d then", r#""pain \ud83d then""#),
            (r"\uDE00\uD83D", r#""\ude00\ud83d""#),
            (
                r"\uD83D\uDE00 \u00e9 \u007f \u001f",
                r#""\ud83d\ude00 \u00e9 \u007f \u001f""#,
            ),
            (r#"q\" b\\ \/ \b\f\n\r\t"#, r#""q\" b\\ / \b\f\n\r\t""#),
            ("é", r#""\u00e9""#),
        ] {
            let mut out = Vec::new();
            write_units(&mut out, &units_of(text));
            assert_eq!(String::from_utf8(out).unwrap(), python, "{text}");
        }
    }

    #[test]
    fn strip_removes_what_python_strips() {
        let mut units: Vec<u16> = "\u{1c} \u{a0}a".encode_utf16().collect();
        units.push(0xd83d);
        units.extend("\u{2028}\t\u{1f}".encode_utf16());
        assert_eq!(strip_units(&units), [b'a' as u16, 0xd83d]);
        assert_eq!(strip_units(&[0x20, 0x0b]), [] as [u16; 0]);
        assert_eq!(python_strip("\u{1f} x\u{200b} \u{3000}"), "x\u{200b}");
        // Strings whose ends need no look at a whole character, and those that do.
        for (text, stripped) in [
            ("", ""),
            ("a", "a"),
            (" ", ""),
            ("\u{1c}", ""),
            ("final", "final"),
            ("a b", "a b"),
            ("a ", "a"),
            ("\ta", "a"),
            ("a\u{1f}", "a"),
            ("a\u{a0}", "a"),
            ("\u{3000}a", "a"),
            ("é", "é"),
            ("aé", "aé"),
            ("a\u{85}", "a"),
        ] {
            assert_eq!(python_strip(text), stripped, "{text:?}");
        }
    }
}
