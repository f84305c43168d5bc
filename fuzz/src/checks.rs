//! What every input must satisfy, for the fuzz targets and for the regression test of the main
//! suite (`tests/it/fuzz_regressions.rs`), which both include this file. It reaches the code
//! under test through `super::under_test` (the fuzz crate's copy of the lower layers, or the
//! main crate), and panics on a violation.

use std::sync::OnceLock;

use super::under_test::deid::{Codebook, ExtensionReport, Rules, Scrubber};
use super::under_test::json::lines::{bundle_bounds, line_content, split_lines};
use super::under_test::json::utf16::write_units;
use super::under_test::json::{Kind, Tape};

/// The token tape: it accepts exactly what serde_json accepts, but for strings with lone
/// surrogates (which only Python reads); every string decodes without a panic, to the same
/// text both ways; a string written back from its code units reads back as those units.
pub fn check_tape(data: &[u8]) {
    let mut tape = Tape::default();
    let serde_accepts = serde_json::from_slice::<serde_json::Value>(data).is_ok();
    let Ok(doc) = tape.parse(data) else {
        assert!(!serde_accepts, "the tape refuses what serde_json reads");
        return;
    };
    if !doc.has_lone_surrogate() {
        assert!(serde_accepts, "the tape reads what serde_json refuses");
    }
    let mut again = Tape::default();
    for i in 0..doc.token_count() {
        let token = doc.token(i);
        if !matches!(token.kind, Kind::String | Kind::Key) {
            continue;
        }
        let units = doc.units(i);
        let text = doc.str(i);
        // A surrogate encoded as UTF-8 bytes is a code point of its own to Python, even next
        // to its other half (it cannot be encoded back to UTF-8): flagged too.
        let encoded_surrogate = doc.raw(i).windows(2).any(|w| w[0] == 0xed && w[1] >= 0xa0);
        match String::from_utf16(&units) {
            Ok(exact) => {
                assert_eq!(token.lone_surrogate, encoded_surrogate, "a wrong flag");
                if !token.lone_surrogate {
                    assert_eq!(text, exact);
                }
            }
            Err(_) => assert!(token.lone_surrogate, "a lone surrogate not flagged"),
        }
        if token.plain {
            assert_eq!(text.as_bytes(), doc.raw(i), "a plain string is its bytes");
        }
        let mut written = Vec::new();
        write_units(&mut written, &units);
        assert!(written.is_ascii());
        let read = again.parse(&written).expect("written strings read back");
        assert_eq!(read.units(0), units, "units survive writing");
    }
}

fn scrubber() -> &'static Scrubber {
    static SCRUBBER: OnceLock<Scrubber> = OnceLock::new();
    SCRUBBER.get_or_init(|| {
        let codebook = Codebook::in_memory("f0220f0220f0220f").expect("a codebook");
        Scrubber::new(Rules::embedded().expect("the rules"), codebook.into(), true)
    })
}

/// The scrubber, on anything the tape accepts: no panic; a row it writes is compact ASCII JSON
/// the tape reads (serde_json too unless the input had a lone surrogate), and has a lone
/// surrogate only if the input had one.
pub fn check_scrub(data: &[u8]) {
    let mut tape = Tape::default();
    let Ok(doc) = tape.parse(data) else {
        return;
    };
    let mut out = b"prefix".to_vec();
    let mut report = ExtensionReport::default();
    match scrubber().scrub(&doc, &mut out, &mut report) {
        Err(_) => assert_eq!(out, b"prefix", "a rejection leaves the output as it was"),
        Ok(_) => {
            let row = &out[6..];
            assert!(row.is_ascii(), "rows are ASCII");
            let mut again = Tape::default();
            let written = again.parse(row).expect("rows are JSON the tape reads");
            assert_eq!(written.token(0).kind, Kind::Object);
            if doc.has_lone_surrogate() {
                return;
            }
            assert!(
                !written.has_lone_surrogate(),
                "a lone surrogate from nowhere"
            );
            serde_json::from_slice::<serde_json::Value>(row).expect("rows are JSON");
        }
    }
}

/// The lines of `bytes` as the sources number them: `split_lines`, less the empty tail after a
/// last newline.
fn numbered_lines(bytes: &[u8], first: usize) -> Vec<(usize, &[u8])> {
    let mut lines: Vec<(usize, &[u8])> = (first..).zip(split_lines(bytes)).collect();
    if bytes.is_empty() || bytes.ends_with(b"\n") {
        lines.pop();
    }
    lines
}

/// The line splitter and the bundle cutter (the first two bytes choose the bundle size): the
/// bundles cover the text in whole lines, and their lines, numbered from each bundle's first
/// (its first line plus the newlines before it), are the text's lines with their numbers; a
/// line's content is a part of it.
pub fn check_lines(data: &[u8]) {
    let (target, text) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])) % 512, rest),
        _ => return,
    };
    let mut numbered = Vec::new();
    let (mut at, mut first_line) = (0, 0);
    for (start, end) in bundle_bounds(text, target) {
        assert_eq!(start, at, "bundles are contiguous");
        assert!(end > start && end <= text.len(), "bundles are not empty");
        assert!(
            end == text.len() || text[end - 1] == b'\n',
            "bundles end after a newline"
        );
        let bundle = &text[start..end];
        numbered.extend(numbered_lines(bundle, first_line));
        first_line += memchr::memchr_iter(b'\n', bundle).count();
        at = end;
    }
    assert_eq!(at, text.len(), "bundles cover the text");
    let whole = text.split(|&b| b == b'\n').enumerate().collect::<Vec<_>>();
    let expected = if text.is_empty() || text.ends_with(b"\n") {
        &whole[..whole.len() - 1]
    } else {
        &whole[..]
    };
    assert_eq!(
        numbered, expected,
        "lines keep their numbers across bundles"
    );
    for (_, line) in expected {
        if let Some(content) = line_content(line) {
            let start = content.as_ptr() as usize - line.as_ptr() as usize;
            assert!(
                start + content.len() <= line.len(),
                "content is part of its line"
            );
        } else {
            assert!(
                line.iter().all(|&b| b == b'\r'),
                "only line breaks are blank"
            );
        }
    }
}
