//! Compact JSON with non-ASCII characters escaped, byte-compatible with Python's `json.dumps`
//! defaults as Cumulus ETL writes NDJSON.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

struct AsciiFormatter;

impl Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, c) in fragment.char_indices() {
            if c.is_ascii() {
                continue;
            }
            w.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(w, "\\u{unit:04x}")?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        serde_json::ser::CompactFormatter.write_char_escape(w, escape)
    }
}

/// Appends `value` as compact, ASCII-only JSON.
pub fn write_compact_ascii<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut ser = serde_json::Serializer::with_formatter(out, AsciiFormatter);
    value
        .serialize(&mut ser)
        .expect("serializing to memory cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_ascii_is_escaped_like_python() {
        let mut out = Vec::new();
        write_compact_ascii(&mut out, &serde_json::json!({"a": "Båt 😀", "b": "x\ny"}));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"B\u00e5t \ud83d\ude00","b":"x\ny"}"#
        );
    }
}
