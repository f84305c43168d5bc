//! NDJSON framing, as Cumulus ETL reads it: a file is cut at `\n` into lines, a line that holds
//! only line breaks is passed over, and any other line is one JSON document for Python's
//! `json.loads` on its bytes: a UTF-8 byte order mark may lead it and JSON whitespace
//! (space, tab, CR, LF) surround it. A line of other whitespace is not blank: it is refused as
//! JSON and counted, as the reference warns about it.

/// The UTF-8 byte order mark, which `json.loads` on bytes skips.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// The lines of `bytes` without their newlines (a last line without one included), found
/// with memchr rather than byte by byte.
pub fn split_lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    let mut ends = memchr::memchr_iter(b'\n', bytes);
    std::iter::from_fn(move || {
        if start > bytes.len() {
            return None;
        }
        let end = ends.next().unwrap_or(bytes.len());
        let line = &bytes[start..end];
        start = end + 1;
        Some(line)
    })
}

/// The JSON text of a line (without a leading byte order mark and surrounding JSON
/// whitespace), or None for a line of nothing but line breaks.
pub fn line_content(line: &[u8]) -> Option<&[u8]> {
    if line.iter().all(|&b| b == b'\r' || b == b'\n') {
        return None;
    }
    let line = line.strip_prefix(BOM).unwrap_or(line);
    let json_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\r' | b'\n');
    let start = line
        .iter()
        .position(|b| !json_space(b))
        .unwrap_or(line.len());
    let end = line
        .iter()
        .rposition(|b| !json_space(b))
        .map_or(start, |e| e + 1);
    Some(&line[start..end])
}

/// The line ends in `bytes`.
pub fn count_newlines(bytes: &[u8]) -> u64 {
    memchr::memchr_iter(b'\n', bytes).count() as u64
}

/// Cuts `bytes` into bundles of whole lines of about `target` bytes each (a bundle ends just
/// after a newline, or at the end of the text): `(start, end)` ranges that cover the text in
/// order: [`cut_at_newlines`] over text in memory (the input is cut without reading it whole;
/// the tests and fuzz checks compare the two).
pub fn bundle_bounds(bytes: &[u8], target: usize) -> Vec<(usize, usize)> {
    let newline_from = |from: usize| {
        let found = memchr::memchr(b'\n', &bytes[from..]).map(|at| from + at);
        Ok::<_, std::convert::Infallible>(found)
    };
    match cut_at_newlines(bytes.len(), target, newline_from) {
        Ok(bounds) => bounds,
    }
}

/// Cuts `len` bytes into bundles of whole lines of about `target` bytes each (a bundle ends
/// just after a newline, or at the end): `(start, end)` ranges that cover them in order. The
/// first newline at or after an offset is found with `newline_from` (None: none up to the
/// end), so the text need not be in memory.
pub fn cut_at_newlines<E>(
    len: usize,
    target: usize,
    mut newline_from: impl FnMut(usize) -> Result<Option<usize>, E>,
) -> Result<Vec<(usize, usize)>, E> {
    let target = target.max(1);
    let mut bounds = Vec::new();
    let mut start = 0;
    while start < len {
        let want = (start + target).min(len);
        let end = if want == len {
            len
        } else {
            newline_from(want - 1)?.map_or(len, |at| at + 1)
        };
        bounds.push((start, end));
        start = end;
    }
    Ok(bounds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_lines_matches_splitting_on_newlines() {
        for text in [&b""[..], b"a", b"a\n", b"\n\nb\nc", b"a\nb\n\n"] {
            let ours: Vec<&[u8]> = split_lines(text).collect();
            let std: Vec<&[u8]> = text.split(|&b| b == b'\n').collect();
            assert_eq!(ours, std, "{:?}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn line_content_is_what_json_loads_reads() {
        assert_eq!(line_content(b""), None);
        assert_eq!(line_content(b"\r"), None);
        assert_eq!(line_content(b" \t{} \r"), Some(&b"{}"[..]));
        assert_eq!(line_content(b"\xef\xbb\xbf{}"), Some(&b"{}"[..]));
        // Not JSON whitespace: left for the parser to refuse, as json.loads refuses it.
        assert_eq!(line_content(b"\x0c{}"), Some(&b"\x0c{}"[..]));
        assert_eq!(line_content(b"   "), Some(&b""[..]));
    }

    #[test]
    fn bundles_are_whole_lines_that_cover_the_text() {
        let text = b"one\ntwo two\n\nthree\nfour";
        for target in [0, 1, 3, 4, 5, 8, 100] {
            let bounds = bundle_bounds(text, target);
            let mut at = 0;
            for &(start, end) in &bounds {
                assert_eq!(start, at, "{target}");
                assert!(end > start, "{target}");
                assert!(end == text.len() || text[end - 1] == b'\n', "{target}");
                at = end;
            }
            assert_eq!(at, text.len(), "{target}");
        }
        assert!(bundle_bounds(b"", 10).is_empty());
    }
}
