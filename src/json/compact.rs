//! A cursor over one compact JSON row (no whitespace), read in place without a tape. The batch
//! shape scanner and the Arrow column walker read the rows the scrubber wrote with it; anything
//! it does not take stops it, and those callers read the row through the tape instead.

use std::borrow::Cow;

use super::tape::scan_string;

/// The row is not compact JSON as the cursor reads it.
#[derive(Debug)]
pub struct NotCompact;

/// A step of reading.
pub type Step<T> = Result<T, NotCompact>;

/// Where the string whose text starts at `start` ends (its closing quote) and whether it has
/// escapes, when everything up to that quote is printable ASCII, as in the rows the scrubber
/// writes; None otherwise, or too near the end of `bytes` (the caller then checks the string
/// as the tape does, with `scan_string`). An escape's next byte is skipped unread: the text
/// stays ASCII, and whoever decodes the escapes checks them. Inline and without the tape's
/// checks: for Parquet and Delta, each row's strings are read once more to decode them into
/// columns, and the call to `scan_string` cost 139 instructions a string (callgrind).
#[inline]
fn ascii_string_end(bytes: &[u8], start: usize) -> Option<(usize, bool)> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let (mut at, mut escaped) = (start, false);
        loop {
            let block = bytes.get(at..)?.first_chunk::<16>()?;
            // SAFETY: SSE2 is part of the x86-64 baseline, and the unaligned load reads exactly
            // the 16 bytes of the array.
            let (stops, bad) = unsafe {
                let v = _mm_loadu_si128(block.as_ptr().cast::<__m128i>());
                let quotes = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslashes = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                // Signed: below a space, and from 0x80; then DEL.
                let low = _mm_cmplt_epi8(v, _mm_set1_epi8(0x20));
                let delete = _mm_cmpeq_epi8(v, _mm_set1_epi8(0x7f));
                (
                    _mm_movemask_epi8(_mm_or_si128(quotes, backslashes)) as u32,
                    _mm_movemask_epi8(_mm_or_si128(low, delete)) as u32,
                )
            };
            let first = stops.trailing_zeros().min(16);
            if bad & ((1u32 << first) - 1) != 0 {
                return None;
            }
            if first == 16 {
                at += 16;
                continue;
            }
            let stop = at + first as usize;
            match bytes[stop] {
                b'"' => return Some((stop, escaped)),
                _ => {
                    // A backslash and the byte it escapes, which must be printable ASCII.
                    let next = *bytes.get(stop + 1)?;
                    if !(0x20..0x7f).contains(&next) {
                        return None;
                    }
                    escaped = true;
                    at = stop + 2;
                }
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (bytes, start);
        None
    }
}

/// A position in a compact JSON row.
pub struct Cursor<'a> {
    pub bytes: &'a [u8],
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Cursor<'a> {
        Cursor { bytes, pos: 0 }
    }

    /// True once every byte is read.
    pub fn at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// The next byte, unread.
    pub fn peek(&self) -> Step<u8> {
        self.bytes.get(self.pos).copied().ok_or(NotCompact)
    }

    /// Reads `byte`.
    pub fn eat(&mut self, byte: u8) -> Step<()> {
        if self.peek()? != byte {
            return Err(NotCompact);
        }
        self.pos += 1;
        Ok(())
    }

    /// Reads `text` (`null`, `true`, `false`).
    pub fn literal(&mut self, text: &[u8]) -> Step<()> {
        if !self.bytes[self.pos..].starts_with(text) {
            return Err(NotCompact);
        }
        self.pos += text.len();
        Ok(())
    }

    /// After an entry or item: true at the container's end (`close`), false before the next.
    pub fn end_or_next(&mut self, close: u8) -> Step<bool> {
        match self.peek()? {
            b',' => {
                self.pos += 1;
                Ok(false)
            }
            c if c == close => {
                self.pos += 1;
                Ok(true)
            }
            _ => Err(NotCompact),
        }
    }

    /// A string, checked as the tape checks one; returns its raw text and whether it has
    /// escapes.
    #[inline]
    fn raw_string(&mut self) -> Step<(&'a str, bool)> {
        let bytes: &'a [u8] = self.bytes;
        self.eat(b'"')?;
        let start = self.pos;
        if let Some((end, escaped)) = ascii_string_end(bytes, start) {
            self.pos = end + 1;
            // SAFETY: `ascii_string_end` found only printable ASCII before `end`.
            let raw = unsafe { std::str::from_utf8_unchecked(&bytes[start..end]) };
            return Ok((raw, escaped));
        }
        let scan = scan_string(bytes, start).map_err(|_| NotCompact)?;
        if scan.lone_surrogate {
            // No `str` holds it (rows we write never have one raw; the tape reads escaped ones).
            return Err(NotCompact);
        }
        self.pos = scan.end + 1;
        // SAFETY: `scan_string` checked the span to be UTF-8 where a byte is above ASCII, and
        // it has no surrogate encoded as UTF-8 bytes.
        let raw = unsafe { std::str::from_utf8_unchecked(&bytes[start..scan.end]) };
        Ok((raw, scan.escaped))
    }

    /// A string, escapes decoded as a JSON reader decodes them.
    pub fn string(&mut self) -> Step<Cow<'a, str>> {
        let start = self.pos;
        match self.raw_string()? {
            (raw, false) => Ok(Cow::Borrowed(raw)),
            (_, true) => serde_json::from_slice::<String>(&self.bytes[start..self.pos])
                .map(Cow::Owned)
                .map_err(|_| NotCompact),
        }
    }

    /// Reads `"name":` if the next key is exactly `name` (which has no quotes or backslashes,
    /// as field names do not), comparing bytes without scanning the key; leaves the cursor
    /// where it was otherwise.
    pub fn eat_key(&mut self, name: &str) -> bool {
        let (rest, n) = (&self.bytes[self.pos..], name.len());
        let matches = rest.len() > n + 2
            && rest[0] == b'"'
            && crate::fast_hash::bytes_eq(&rest[1..=n], name.as_bytes())
            && rest[n + 1] == b'"'
            && rest[n + 2] == b':';
        if matches {
            self.pos += n + 3;
        }
        matches
    }

    /// A string without escapes (keys, in practice); one with escapes stops the cursor.
    pub fn plain_string(&mut self) -> Step<&'a str> {
        match self.raw_string()? {
            (raw, false) => Ok(raw),
            (_, true) => Err(NotCompact),
        }
    }

    /// Any string, unread and unchecked (rows we wrote hold valid strings): a search for its
    /// closing quote, hopping over escapes (`\u` is followed by plain hex).
    pub fn skip_string(&mut self) -> Step<()> {
        self.eat(b'"')?;
        loop {
            let rest = &self.bytes[self.pos..];
            let at = memchr::memchr2(b'"', b'\\', rest).ok_or(NotCompact)?;
            if rest[at] == b'"' {
                self.pos += at + 1;
                return Ok(());
            }
            if self.pos + at + 2 > self.bytes.len() {
                return Err(NotCompact);
            }
            self.pos += at + 2;
        }
    }

    /// A number's text, up to the next delimiter (JSON's characters only).
    pub fn number(&mut self) -> Step<&'a str> {
        let bytes: &'a [u8] = self.bytes;
        let rest = &bytes[self.pos..];
        let len = rest
            .iter()
            .position(|b| matches!(b, b',' | b'}' | b']'))
            .unwrap_or(rest.len());
        let text = &rest[..len];
        let json_number = text
            .first()
            .is_some_and(|&b| b == b'-' || b.is_ascii_digit())
            && text.last().is_some_and(u8::is_ascii_digit)
            && text
                .iter()
                .all(|&b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
        if !json_number {
            return Err(NotCompact);
        }
        self.pos += len;
        Ok(std::str::from_utf8(text).expect("ASCII"))
    }

    /// Any value, unread.
    pub fn skip_value(&mut self) -> Step<()> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'n' => self.literal(b"null"),
            b't' => self.literal(b"true"),
            b'f' => self.literal(b"false"),
            open @ (b'{' | b'[') => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.pos += 1;
                if self.peek()? == close {
                    self.pos += 1;
                    return Ok(());
                }
                loop {
                    if open == b'{' {
                        self.skip_string()?;
                        self.eat(b':')?;
                    }
                    self.skip_value()?;
                    if self.end_or_next(close)? {
                        return Ok(());
                    }
                }
            }
            _ => self.number().map(drop),
        }
    }
}

/// Appends to `out` the compact object of `row`'s top-level entries named in `names`, as they
/// are written, reading the row only until each name is found (the first entry of a name
/// counts: rows we write repeat no key). On a row the cursor does not take, `out` is left as it
/// was.
pub fn project_entries(row: &[u8], names: &[&str], out: &mut Vec<u8>) -> Step<()> {
    let start = out.len();
    let projected = (|| {
        let mut cursor = Cursor::new(row);
        cursor.eat(b'{')?;
        out.push(b'{');
        // A bit per name, not a vector per row (this runs for every row a first load routes).
        assert!(names.len() <= 64, "at most 64 names are projected");
        let mut found = 0u64;
        let mut left = names.len();
        if cursor.peek()? != b'}' {
            while left > 0 {
                let entry_start = cursor.pos;
                let key = cursor.plain_string()?;
                cursor.eat(b':')?;
                cursor.skip_value()?;
                if let Some(n) = names.iter().position(|name| *name == key)
                    && found & (1 << n) == 0
                {
                    found |= 1 << n;
                    if left < names.len() {
                        out.push(b',');
                    }
                    out.extend_from_slice(&row[entry_start..cursor.pos]);
                    left -= 1;
                }
                if cursor.end_or_next(b'}')? {
                    break;
                }
            }
        }
        out.push(b'}');
        Ok(())
    })();
    if projected.is_err() {
        out.truncate(start);
    }
    projected
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_read_fast_are_read_as_the_tape_reads_them() {
        let long = "a".repeat(40);
        let texts = [
            String::new(),
            "x".into(),
            "Observation/abc-123".into(),
            long.clone(),
            format!("{long}\\\"q\\n{long}"),
            "\\u00e5 and \\u0000".into(),
            "\\ud83d\\ude00".into(),
            "\\ud800 alone".into(),
            "caf\u{e9} raw".into(),
            format!("{long}\u{e9}"),
            "tab\there".into(),
            "del\u{7f}".into(),
            "ends with a backslash\\\\".into(),
        ];
        for text in texts {
            // Near the end of the row (the slow path) and far from it (the fast one).
            for tail in ["", ",\"pad\":\"0123456789abcdef0123456789\"}"] {
                let row = format!("\"{text}\"{tail}");
                let mut cursor = Cursor::new(row.as_bytes());
                let ours = cursor.string().ok().map(|s| (s.into_owned(), cursor.pos));
                let mut tape = crate::json::Tape::default();
                let expected = tape
                    .parse(format!("\"{text}\"").as_bytes())
                    .ok()
                    .filter(|doc| !doc.has_lone_surrogate())
                    .map(|doc| (doc.str(0).into_owned(), text.len() + 2));
                assert_eq!(ours, expected, "{row}");
            }
        }
    }

    #[test]
    fn projected_entries_are_the_first_of_each_name_and_reading_stops_once_all_are_found() {
        let project = |row: &[u8], names: &[&str]| {
            let mut out = b"kept".to_vec();
            let result = project_entries(row, names, &mut out).map(|()| out[4..].to_vec());
            (result.ok(), out.starts_with(b"kept"))
        };
        let row = br#"{"resourceType":"Observation","id":"a\"b","n":[1,{"id":"inner"}],"x":2,"id":"later"}"#;
        let (got, _) = project(row, &["id"]);
        assert_eq!(got.unwrap(), br#"{"id":"a\"b"}"#);
        let (got, _) = project(row, &["x", "n"]);
        assert_eq!(got.unwrap(), br#"{"n":[1,{"id":"inner"}],"x":2}"#);
        assert_eq!(project(row, &["absent"]).0.unwrap(), b"{}");
        assert_eq!(project(b"{}", &["id"]).0.unwrap(), b"{}");
        // Reading stops at the names found: what follows them is not read.
        assert_eq!(
            project(br#"{"id":"a", oops"#, &["id"]).0.unwrap(),
            br#"{"id":"a"}"#
        );
        // A row the cursor does not take leaves the buffer as it was.
        for bad in [&b"[1]"[..], b"{ \"id\":1}", b"{\"i\\u0064\":1}", b"{\"id\""] {
            let (got, intact) = project(bad, &["id"]);
            assert!(got.is_none() && intact, "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn values_are_read_and_skipped_as_json_has_them() {
        let row = br#"{"a\"b":"x\u00e9","n":-1.5e3,"l":[true,false,null,{"k":[]}],"p":"plain"}"#;
        let mut c = Cursor::new(row);
        c.eat(b'{').unwrap();
        assert!(c.plain_string().is_err(), "a key with escapes stops it");
        let mut c = Cursor::new(row);
        c.eat(b'{').unwrap();
        assert_eq!(c.string().unwrap(), "a\"b");
        c.eat(b':').unwrap();
        assert_eq!(c.string().unwrap(), "x\u{e9}");
        assert!(!c.end_or_next(b'}').unwrap());
        assert_eq!(c.plain_string().unwrap(), "n");
        c.eat(b':').unwrap();
        assert_eq!(c.number().unwrap(), "-1.5e3");
        assert!(!c.end_or_next(b'}').unwrap());
        c.skip_string().unwrap();
        c.eat(b':').unwrap();
        c.skip_value().unwrap();
        assert!(!c.end_or_next(b'}').unwrap());
        c.skip_string().unwrap();
        c.eat(b':').unwrap();
        c.skip_value().unwrap();
        assert!(c.end_or_next(b'}').unwrap());
        assert!(c.at_end());
        let mut c = Cursor::new(br#""identifier":1,"id":2,"i\u0064":3,"id""#);
        assert!(!c.eat_key("id"), "a longer key is not the name");
        assert!(c.eat_key("identifier"));
        assert_eq!(c.number().unwrap(), "1");
        c.eat(b',').unwrap();
        assert!(c.eat_key("id"));
        assert_eq!(c.number().unwrap(), "2");
        c.eat(b',').unwrap();
        assert!(!c.eat_key("id"), "a key with escapes is left to be read");
        assert_eq!(c.string().unwrap(), "id");
        c.pos += 3;
        assert!(!c.eat_key("id"), "a key without its colon is not taken");
        assert_eq!(c.pos, 34);
        for bad in [&b"1.5.x"[..], b"+1", b"1.", b"\"open", b"\"a\\"] {
            assert!(Cursor::new(bad).skip_value().is_err(), "{bad:?}");
        }
    }
}
