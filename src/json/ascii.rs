//! Compact JSON with non-ASCII characters escaped, byte-compatible with Python's `json.dumps`
//! defaults as Cumulus ETL writes NDJSON.

use std::io;

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter};

/// ASCII-only JSON as Python writes it: compact (Cumulus ETL's NDJSON rows), or with
/// `json.dumps`'s default separators, `", "` and `": "` (`spaced`).
struct AsciiFormatter {
    spaced: bool,
}

/// Writes a string's text with every character outside printable ASCII escaped, as Python does
/// (DEL, 0x7f, included).
fn write_ascii_fragment<W: ?Sized + io::Write>(w: &mut W, fragment: &str) -> io::Result<()> {
    if fragment.is_ascii() && memchr::memchr(0x7f, fragment.as_bytes()).is_none() {
        return w.write_all(fragment.as_bytes());
    }
    let mut start = 0;
    for (i, c) in fragment.char_indices() {
        if c < '\x7f' {
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

impl Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        write_ascii_fragment(w, fragment)
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        serde_json::ser::CompactFormatter.write_char_escape(w, escape)
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.separator(w, first)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.separator(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(if self.spaced { b": " } else { b":" })
    }
}

impl AsciiFormatter {
    fn separator<W: ?Sized + io::Write>(&self, w: &mut W, first: bool) -> io::Result<()> {
        match (first, self.spaced) {
            (true, _) => Ok(()),
            (false, true) => w.write_all(b", "),
            (false, false) => w.write_all(b","),
        }
    }
}

/// Appends `value` as compact, ASCII-only JSON.
pub fn write_compact_ascii<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut ser = serde_json::Serializer::with_formatter(out, AsciiFormatter { spaced: false });
    value
        .serialize(&mut ser)
        .expect("serializing to memory cannot fail");
}

/// Appends `value` as Python's `json.dumps(value)` writes it: ASCII-only, `", "` between
/// items and `": "` after keys (upstream's NLP batch files are written so).
pub fn write_dumps_ascii<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let mut ser = serde_json::Serializer::with_formatter(out, AsciiFormatter { spaced: true });
    value
        .serialize(&mut ser)
        .expect("serializing to memory cannot fail");
}

/// Appends the string `text` as `write_compact_ascii` would, copying it as is when it needs no
/// escapes (references, ids, dates: nearly every string the scrubber writes). serde_json's
/// escaping loop cost about 700 instructions per reference.
pub fn write_str(out: &mut Vec<u8>, text: &str) {
    write_str_parts(out, &[text]);
}

/// Appends the concatenation of `parts` as one JSON string (a reference from its type, a slash
/// and an id), without building it first when no part needs escapes.
pub fn write_str_parts(out: &mut Vec<u8>, parts: &[&str]) {
    if parts.iter().any(|p| needs_escape(p)) {
        write_compact_ascii(out, &parts.concat());
    } else {
        out.reserve(parts.iter().map(|p| p.len()).sum::<usize>() + 2);
        out.push(b'"');
        parts.iter().for_each(|p| push_bytes(out, p.as_bytes()));
        out.push(b'"');
    }
}

/// Appends `bytes`, copying short ones (most keys, codes and ids) in two overlapping words
/// rather than through a `memcpy` call, whose call and size dispatch cost more than such a copy
/// (1.25 million calls of 21 instructions each for the 20 MB sample, callgrind).
#[inline]
pub fn push_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.reserve(bytes.len());
    // SAFETY: `reserve` made room for `bytes.len()` more bytes, which the copy fills exactly
    // (its reads and writes stay within `bytes` and that room), and `set_len` covers them.
    unsafe {
        let dst = out.as_mut_ptr().add(out.len());
        copy_short(bytes, dst);
        out.set_len(out.len() + bytes.len());
    }
}

/// Appends `text` (already in its JSON form) between quotes, then `after` if there is one (a
/// key's colon).
#[inline]
pub fn push_quoted(out: &mut Vec<u8>, text: &[u8], after: Option<u8>) {
    let len = text.len() + 2 + usize::from(after.is_some());
    out.reserve(len);
    // SAFETY: `reserve` made room for `len` more bytes: the quotes, `text` and `after`, each
    // written once within that room before `set_len` covers them.
    unsafe {
        let dst = out.as_mut_ptr().add(out.len());
        *dst = b'"';
        copy_short(text, dst.add(1));
        *dst.add(1 + text.len()) = b'"';
        if let Some(b) = after {
            *dst.add(2 + text.len()) = b;
        }
        out.set_len(out.len() + len);
    }
}

/// Copies `src` to `dst`: up to 16 bytes as two words that overlap where they must, longer
/// ones with `copy_nonoverlapping`.
///
/// # Safety
/// `dst` must be valid for `src.len()` bytes of writes and not overlap `src`.
#[inline(always)]
unsafe fn copy_short(src: &[u8], dst: *mut u8) {
    let (n, from) = (src.len(), src.as_ptr());
    // SAFETY (all arms): every read is within `src` and every write within the first `n`
    // bytes at `dst`, which the caller vouches for.
    unsafe {
        match n {
            8..=16 => {
                let head = std::ptr::read_unaligned(from.cast::<u64>());
                let tail = std::ptr::read_unaligned(from.add(n - 8).cast::<u64>());
                std::ptr::write_unaligned(dst.cast::<u64>(), head);
                std::ptr::write_unaligned(dst.add(n - 8).cast::<u64>(), tail);
            }
            4..8 => {
                let head = std::ptr::read_unaligned(from.cast::<u32>());
                let tail = std::ptr::read_unaligned(from.add(n - 4).cast::<u32>());
                std::ptr::write_unaligned(dst.cast::<u32>(), head);
                std::ptr::write_unaligned(dst.add(n - 4).cast::<u32>(), tail);
            }
            1..4 => {
                // The first, middle and last bytes (some the same): all of 1 to 3 bytes, as
                // three stores rather than a loop the compiler turns into a `memcpy` call.
                *dst = *from;
                *dst.add(n / 2) = *from.add(n / 2);
                *dst.add(n - 1) = *from.add(n - 1);
            }
            0 => {}
            _ => std::ptr::copy_nonoverlapping(from, dst, n),
        }
    }
}

/// Whether `text` has a character JSON escapes or that is not printable ASCII (branch free
/// over the whole string, so it vectorizes).
fn needs_escape(text: &str) -> bool {
    text.bytes().fold(false, |any, b| {
        any | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_copies_append_exactly_the_bytes() {
        let text: Vec<u8> = (0..64u8).map(|i| b'a' + i % 26).collect();
        for len in 0..=40 {
            for start in [0, 3] {
                let piece = &text[start..start + len];
                let mut out = b"[".to_vec();
                push_bytes(&mut out, piece);
                assert_eq!(&out[1..], piece, "{len}");
                let mut quoted = b"{".to_vec();
                push_quoted(&mut quoted, piece, Some(b':'));
                assert_eq!(quoted, [b"{\"", piece, b"\":"].concat(), "{len}");
                let mut bare = Vec::new();
                push_quoted(&mut bare, piece, None);
                assert_eq!(bare, [b"\"", piece, b"\""].concat(), "{len}");
            }
        }
    }

    #[test]
    fn dumps_writes_pythons_default_separators() {
        let mut out = Vec::new();
        let value = serde_json::json!({"a": [1, "\u{e9}\u{7f}", {"b": null}], "c": "x\"y"});
        write_dumps_ascii(&mut out, &value);
        // As `json.dumps` writes it (checked against Python).
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a": [1, "\u00e9\u007f", {"b": null}], "c": "x\"y"}"#
        );
    }

    #[test]
    fn strings_are_written_as_the_serializer_writes_them() {
        for text in [
            "",
            "Patient/abc",
            "a\"b",
            "back\\slash",
            "tab\t",
            "caf\u{e9}",
            "\u{7f}",
            "~ }",
        ] {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            write_str(&mut fast, text);
            write_compact_ascii(&mut slow, text);
            assert_eq!(fast, slow, "{text:?}");
        }
        for parts in [
            &["Patient", "/", "", "abc"][..],
            &["#", "x"],
            &["a\"", "/", "b"],
            &["caf\u{e9}", "/1"],
        ] {
            let (mut fast, mut slow) = (Vec::new(), Vec::new());
            write_str_parts(&mut fast, parts);
            write_compact_ascii(&mut slow, &parts.concat());
            assert_eq!(fast, slow, "{parts:?}");
        }
    }

    #[test]
    fn non_ascii_is_escaped_like_python() {
        let mut out = Vec::new();
        write_compact_ascii(
            &mut out,
            &serde_json::json!({"a": "Båt 😀", "b": "x\ny", "c": "del\u{7f} us\u{1f}"}),
        );
        // As Python's json.dumps writes it.
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"a":"B\u00e5t \ud83d\ude00","b":"x\ny","c":"del\u007f us\u001f"}"#
        );
    }
}
