//! A flat token tape of one JSON document: validated once, then walked by index without building
//! a tree. Strings stay as spans of the input, so the scrubber copies most values as they are
//! instead of decoding and re-encoding them.

use std::borrow::Cow;

/// Nesting deeper than this is refused, as serde_json refuses it.
pub const MAX_DEPTH: usize = 128;

/// What a token is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Object,
    Array,
    Key,
    String,
    Number,
    True,
    False,
    Null,
}

/// One token. Containers store the index just past their last token in `end` and their entry
/// count in `start`; strings, keys and numbers store their byte span (strings without quotes).
#[derive(Debug, Clone, Copy)]
pub struct Token {
    pub kind: Kind,
    /// Strings and keys: printable ASCII without escapes, so the raw bytes are the value.
    /// Numbers: a plain integer that prints back unchanged.
    pub plain: bool,
    /// Strings and keys: an escape of an unpaired UTF-16 surrogate (`\\ud800` to `\\udfff`),
    /// or a surrogate encoded as UTF-8 bytes (a code point of its own to Python, even beside
    /// its other half), which Python reads and writes back but Rust strings cannot hold.
    pub lone_surrogate: bool,
    pub start: u32,
    pub end: u32,
}

/// Why a document is not JSON the tape accepts (the caller asks serde_json for the message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid;

/// The tokens of one document and the text they point into.
#[derive(Debug, Default, Clone)]
pub struct Tape {
    tokens: Vec<Token>,
}

/// What the parser learns about a document beside its tokens.
#[derive(Debug, Default, Clone, Copy)]
struct Found {
    /// Some string or key escapes an unpaired surrogate.
    lone_surrogate: bool,
}

/// A borrowed view of a tape and its text.
#[derive(Clone, Copy)]
pub struct Doc<'a> {
    /// Private: only `Tape::parse` makes a `Doc`, so its spans are known to be valid UTF-8.
    text: &'a [u8],
    tokens: &'a [Token],
    found: Found,
}

impl Tape {
    /// Tokenizes `text`, which must hold exactly one JSON value (surrounding whitespace allowed).
    pub fn parse<'a>(&'a mut self, text: &'a [u8]) -> Result<Doc<'a>, Invalid> {
        self.tokens.clear();
        if text.len() >= u32::MAX as usize {
            return Err(Invalid);
        }
        let mut parser = Parser {
            text,
            pos: 0,
            tokens: &mut self.tokens,
            found: Found::default(),
        };
        parser.value(0)?;
        parser.skip_ws();
        if parser.pos != text.len() {
            return Err(Invalid);
        }
        let found = parser.found;
        Ok(Doc {
            text,
            tokens: &self.tokens,
            found,
        })
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;
const QUOTES: u64 = ONES * b'"' as u64;
const BACKSLASHES: u64 = ONES * b'\\' as u64;
const DELETES: u64 = ONES * 0x7f;
const LETTERS: u64 = ONES * b'a' as u64;

/// Marks the zero bytes of `x` by their high bit. Only bytes above a marked byte can be
/// marked wrongly, so the lowest mark is exact.
fn zero_bytes(x: u64) -> u64 {
    x.wrapping_sub(ONES) & !x & HIGHS
}

/// Blocks checked one by one before a string counts as long.
const LONG_STRING_BLOCKS: usize = 4;

/// The bytes of a string block before its first quote or backslash (all of them if it has
/// none), and what they hold.
struct Block {
    len: usize,
    stopped: bool,
    control: bool,
    /// Bytes above printable ASCII (DEL included).
    high: bool,
}

/// Reads the next block of a string from `rest`: 16 bytes with SSE2 (part of every x86-64
/// CPU), else a word of 8; None when fewer than 8 bytes are left.
fn read_block(rest: &[u8]) -> Option<Block> {
    #[cfg(target_arch = "x86_64")]
    if let Some(bytes) = rest.first_chunk::<16>() {
        return Some(read_sse2(bytes));
    }
    rest.first_chunk::<8>().map(read_word)
}

/// Reads 16 bytes of a string with SSE2 compares.
#[cfg(target_arch = "x86_64")]
fn read_sse2(bytes: &[u8; 16]) -> Block {
    use std::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86-64 baseline, and the unaligned load reads exactly the 16
    // bytes of the array.
    let (stops, high, deletes, below_space) = unsafe {
        let v = _mm_loadu_si128(bytes.as_ptr().cast::<__m128i>());
        let quotes = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslashes = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        (
            _mm_movemask_epi8(_mm_or_si128(quotes, backslashes)) as u32,
            // The sign bit: bytes from 0x80.
            _mm_movemask_epi8(v) as u32,
            _mm_movemask_epi8(_mm_cmpeq_epi8(v, _mm_set1_epi8(0x7f))) as u32,
            // A signed compare: bytes below 0x20, and those from 0x80 (taken out below).
            _mm_movemask_epi8(_mm_cmplt_epi8(v, _mm_set1_epi8(0x20))) as u32,
        )
    };
    let len = stops.trailing_zeros().min(16);
    let before = (1u32 << len) - 1;
    Block {
        len: len as usize,
        stopped: stops != 0,
        control: below_space & !high & before != 0,
        high: (high | deletes) & before != 0,
    }
}

/// Reads 8 bytes of a string as one 64-bit word (SWAR).
fn read_word(bytes: &[u8; 8]) -> Block {
    let x = u64::from_le_bytes(*bytes);
    let stops = zero_bytes(x ^ QUOTES) | zero_bytes(x ^ BACKSLASHES);
    let n = (stops.trailing_zeros() / 8).min(8);
    // The bytes before the stop, the rest filled with a harmless letter.
    let before = if n == 8 {
        u64::MAX
    } else {
        (1u64 << (n * 8)) - 1
    };
    let x = (x & before) | (LETTERS & !before);
    Block {
        len: n as usize,
        stopped: stops != 0,
        control: bytes_below(x, 0x20),
        high: x & HIGHS != 0 || zero_bytes(x ^ DELETES) != 0,
    }
}

/// Whether `span` has control characters, and bytes above printable ASCII (branch free, so it
/// vectorizes).
fn scan_span(span: &[u8]) -> (bool, bool) {
    let (mut control, mut high) = (0u8, 0u8);
    for &b in span {
        control |= u8::from(b < 0x20);
        high |= u8::from(b > 0x7e);
    }
    (control != 0, high != 0)
}

/// Whether some byte of `x` is below `n` (at most 128).
fn bytes_below(x: u64, n: u8) -> bool {
    x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0
}

/// A JSON string whose text starts at `start` (just past its opening quote), checked.
pub struct StringScan {
    /// Where its closing quote is.
    pub end: usize,
    /// No escapes and only printable ASCII: the bytes are the text.
    pub plain: bool,
    /// It has escapes (to decode).
    pub escaped: bool,
    /// One of its escapes is an unpaired surrogate.
    pub lone_surrogate: bool,
}

/// Finds the end of the string starting at `start` and checks it as JSON requires: no control
/// characters, valid escapes, and UTF-8 where a byte is above ASCII. (Outside strings the grammar
/// only accepts ASCII, so these checks are all a document needs.) Most strings are short keys and
/// codes: eight bytes are checked at a time, in one pass, without a search call per string.
pub fn scan_string(text: &[u8], start: usize) -> Result<StringScan, Invalid> {
    let mut at = start;
    let (mut escaped, mut control, mut high, mut lone) = (false, false, false, false);
    loop {
        let mut blocks = 0;
        while let Some(block) = read_block(&text[at..]) {
            control |= block.control;
            high |= block.high;
            at += block.len;
            if block.stopped {
                break;
            }
            blocks += 1;
            if blocks == LONG_STRING_BLOCKS {
                // A long string (note text, attachment data): a vectorized search for its
                // end, then one vectorized pass over what it skipped.
                let rel = memchr::memchr2(b'"', b'\\', &text[at..]).ok_or(Invalid)?;
                let (c, h) = scan_span(&text[at..at + rel]);
                control |= c;
                high |= h;
                at += rel;
                break;
            }
        }
        match *text.get(at).ok_or(Invalid)? {
            b'"' => break,
            b'\\' => {
                escaped = true;
                let (end, unpaired) = escape_end(text, at)?;
                lone |= unpaired;
                at = end;
            }
            b => {
                control |= b < 0x20;
                high |= b > 0x7e;
                at += 1;
            }
        }
    }
    if control {
        return Err(Invalid);
    }
    if high && std::str::from_utf8(&text[start..at]).is_err() {
        // Python reads lines as bytes, decoded with "surrogatepass": a surrogate encoded in
        // UTF-8 bytes is a lone surrogate to it, like an escaped one.
        if !super::utf16::is_utf8_with_surrogates(&text[start..at]) {
            return Err(Invalid);
        }
        lone = true;
    }
    Ok(StringScan {
        end: at,
        plain: !escaped && !high,
        escaped,
        lone_surrogate: lone,
    })
}

/// Checks the escape at `at` (a backslash) and returns the position after it (after both
/// halves of an escaped surrogate pair), and whether it was an unpaired surrogate.
fn escape_end(text: &[u8], at: usize) -> Result<(usize, bool), Invalid> {
    match text.get(at + 1).ok_or(Invalid)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Ok((at + 2, false)),
        b'u' => {
            let unit = hex_unit(text, at + 2).ok_or(Invalid)?;
            match unit {
                0xd800..=0xdbff => match low_surrogate_after(text, at + 6) {
                    Some(_) => Ok((at + 12, false)),
                    None => Ok((at + 6, true)),
                },
                0xdc00..=0xdfff => Ok((at + 6, true)),
                _ => Ok((at + 6, false)),
            }
        }
        _ => Err(Invalid),
    }
}

/// The four hex digits at `at`, as a UTF-16 code unit.
pub(crate) fn hex_unit(text: &[u8], at: usize) -> Option<u16> {
    let hex = text.get(at..at + 4)?;
    hex.iter().try_fold(0u16, |unit, &b| {
        let digit = (b as char).to_digit(16)?;
        Some(unit << 4 | digit as u16)
    })
}

/// The low surrogate escaped at `at` (`\\udc00` to `\\udfff`), if one is there.
pub(crate) fn low_surrogate_after(text: &[u8], at: usize) -> Option<u16> {
    if text.get(at..at + 2)? != b"\\u" {
        return None;
    }
    hex_unit(text, at + 2).filter(|u| (0xdc00..=0xdfff).contains(u))
}

struct Parser<'a, 't> {
    text: &'a [u8],
    pos: usize,
    tokens: &'t mut Vec<Token>,
    found: Found,
}

impl Parser<'_, '_> {
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.text.get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.skip_ws();
        self.text.get(self.pos).copied()
    }

    fn push(&mut self, kind: Kind, plain: bool, start: usize, end: usize) -> usize {
        self.push_token(kind, plain, false, start, end)
    }

    #[inline]
    fn push_token(
        &mut self,
        kind: Kind,
        plain: bool,
        lone_surrogate: bool,
        start: usize,
        end: usize,
    ) -> usize {
        self.tokens.push(Token {
            kind,
            plain,
            lone_surrogate,
            start: start as u32,
            end: end as u32,
        });
        self.tokens.len() - 1
    }

    fn value(&mut self, depth: usize) -> Result<(), Invalid> {
        match self.peek().ok_or(Invalid)? {
            b'{' => self.container(depth, Kind::Object),
            b'[' => self.container(depth, Kind::Array),
            b'"' => self.string(Kind::String),
            b't' => self.literal(b"true", Kind::True),
            b'f' => self.literal(b"false", Kind::False),
            b'n' => self.literal(b"null", Kind::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => Err(Invalid),
        }
    }

    fn container(&mut self, depth: usize, kind: Kind) -> Result<(), Invalid> {
        if depth >= MAX_DEPTH {
            return Err(Invalid);
        }
        let close = if kind == Kind::Object { b'}' } else { b']' };
        let at = self.push(kind, false, 0, 0);
        self.pos += 1;
        let mut count = 0u32;
        if self.peek() == Some(close) {
            self.pos += 1;
        } else {
            loop {
                if kind == Kind::Object {
                    if self.peek() != Some(b'"') {
                        return Err(Invalid);
                    }
                    self.string(Kind::Key)?;
                    if self.peek() != Some(b':') {
                        return Err(Invalid);
                    }
                    self.pos += 1;
                }
                // Most values are strings: parsed here, without the call through `value`.
                match self.peek() {
                    Some(b'"') => self.string(Kind::String)?,
                    _ => self.value(depth + 1)?,
                }
                count += 1;
                match self.peek() {
                    Some(b',') => self.pos += 1,
                    Some(c) if c == close => {
                        self.pos += 1;
                        break;
                    }
                    _ => return Err(Invalid),
                }
            }
        }
        let end = self.tokens.len() as u32;
        self.tokens[at].start = count;
        self.tokens[at].end = end;
        Ok(())
    }

    #[inline]
    fn string(&mut self, kind: Kind) -> Result<(), Invalid> {
        let scan = scan_string(self.text, self.pos + 1)?;
        let (start, lone) = (self.pos + 1, scan.lone_surrogate);
        self.push_token(kind, scan.plain, lone, start, scan.end);
        self.found.lone_surrogate |= lone;
        self.pos = scan.end + 1;
        Ok(())
    }

    fn literal(&mut self, word: &[u8], kind: Kind) -> Result<(), Invalid> {
        if !self.text[self.pos..].starts_with(word) {
            return Err(Invalid);
        }
        let start = self.pos;
        self.pos += word.len();
        self.push(kind, true, start, self.pos);
        Ok(())
    }

    fn number(&mut self) -> Result<(), Invalid> {
        let text = self.text;
        let start = self.pos;
        let mut at = start;
        let negative = text[at] == b'-';
        if negative {
            at += 1;
        }
        let digits = |mut at: usize| {
            while text.get(at).is_some_and(u8::is_ascii_digit) {
                at += 1;
            }
            at
        };
        let int_end = match text.get(at) {
            Some(b'0') => at + 1,
            Some(b'1'..=b'9') => digits(at + 1),
            _ => return Err(Invalid),
        };
        let int_digits = int_end - at;
        at = int_end;
        let mut integer = true;
        if text.get(at) == Some(&b'.') {
            let end = digits(at + 1);
            if end == at + 1 {
                return Err(Invalid);
            }
            at = end;
            integer = false;
        }
        let has_exponent = matches!(text.get(at), Some(b'e' | b'E'));
        if has_exponent {
            at += 1;
            if let Some(b'+' | b'-') = text.get(at) {
                at += 1;
            }
            let end = digits(at);
            if end == at {
                return Err(Invalid);
            }
            at = end;
            integer = false;
        }
        // Integers print back as written, whatever their size, as Python keeps them (it reads
        // `-0` as the integer 0, so that one goes through serde_json). Other numbers are floats:
        // serde_json writes them as Python does. Numbers out of f64's range are refused as
        // serde_json refuses them (only possible with an exponent or hundreds of digits: an
        // integer of more than 300 digits is refused too, where Python would keep it).
        let negative_zero = negative && int_digits == 1 && text[int_end - 1] == b'0';
        let plain = integer && !negative_zero;
        if (has_exponent || at - start > 300)
            && serde_json::from_slice::<serde_json::Number>(&text[start..at]).is_err()
        {
            return Err(Invalid);
        }
        self.push(Kind::Number, plain, start, at);
        self.pos = at;
        Ok(())
    }
}

impl<'a> Doc<'a> {
    /// Whether some string or key of the document escapes an unpaired surrogate (which only
    /// Python's string type can hold).
    pub fn has_lone_surrogate(&self) -> bool {
        self.found.lone_surrogate
    }

    /// How many tokens the document has.
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// The token at `i`.
    #[inline]
    pub fn token(&self, i: usize) -> Token {
        self.tokens[i]
    }

    /// The index just past the value starting at `i`.
    pub fn skip(&self, i: usize) -> usize {
        let t = self.tokens[i];
        match t.kind {
            Kind::Object | Kind::Array => t.end as usize,
            _ => i + 1,
        }
    }

    /// The raw bytes of a string, key or number token (strings without quotes).
    #[inline]
    pub fn raw(&self, i: usize) -> &'a [u8] {
        let t = self.tokens[i];
        &self.text[t.start as usize..t.end as usize]
    }

    /// The decoded text of a string or key token, or a number token as written. Inlined for
    /// the plain text of most keys and codes (called several times for every key the
    /// scrubber reads, the call itself cost more than the work); the rest out of line.
    #[inline]
    pub fn str(&self, i: usize) -> Cow<'a, str> {
        let t = self.tokens[i];
        if t.plain {
            // SAFETY: a plain span is printable ASCII (`StringScan::plain`).
            return Cow::Borrowed(unsafe {
                std::str::from_utf8_unchecked(&self.text[t.start as usize..t.end as usize])
            });
        }
        self.decoded(i)
    }

    /// [`Doc::str`] of a token that is not plain.
    #[inline(never)]
    fn decoded(&self, i: usize) -> Cow<'a, str> {
        let t = self.tokens[i];
        let raw = self.raw(i);
        if !t.lone_surrogate && !raw.contains(&b'\\') {
            // SAFETY: `Tape::parse` checked every string span with non-ASCII bytes to be UTF-8
            // (or flagged it `lone_surrogate`, for surrogates encoded as UTF-8 would encode
            // them), and the other spans are ASCII.
            return Cow::Borrowed(unsafe { std::str::from_utf8_unchecked(raw) });
        }
        if !t.lone_surrogate {
            let quoted = &self.text[t.start as usize - 1..t.end as usize + 1];
            if let Ok(text) = serde_json::from_slice::<String>(quoted) {
                return Cow::Owned(text);
            }
        }
        Cow::Owned(self.lossy(i))
    }

    /// A string a Rust `str` cannot hold: U+FFFD stands for each lone surrogate, which equals
    /// no name the rules look for (values that are written out or hashed check
    /// `lone_surrogate` first). Out of line, so `str` stays small where it is inlined.
    #[cold]
    #[inline(never)]
    fn lossy(&self, i: usize) -> String {
        String::from_utf16_lossy(&self.units(i))
    }

    /// The UTF-16 code units of a string or key token, as Python holds the string.
    pub fn units(&self, i: usize) -> Vec<u16> {
        let mut units = Vec::with_capacity(self.raw(i).len());
        super::utf16::decode_units(self.raw(i), &mut units);
        units
    }

    /// The value at `i` as a `serde_json::Value`, for the rare reader that needs a tree of a
    /// document serde_json itself refuses: lone surrogates read as U+FFFD (see `str`).
    pub fn to_value(&self, i: usize) -> serde_json::Value {
        use serde_json::Value;
        let t = self.tokens[i];
        match t.kind {
            Kind::Object => Value::Object(
                self.entries(i)
                    .map(|(k, v)| (self.str(k).into_owned(), self.to_value(v)))
                    .collect(),
            ),
            Kind::Array => Value::Array(self.items(i).map(|v| self.to_value(v)).collect()),
            Kind::String | Kind::Key => Value::String(self.str(i).into_owned()),
            Kind::Number => serde_json::from_slice(self.raw(i)).unwrap_or(Value::Null),
            Kind::True => Value::Bool(true),
            Kind::False => Value::Bool(false),
            Kind::Null => Value::Null,
        }
    }

    /// Whether key token `i` is exactly `name`.
    #[inline]
    pub fn key_is(&self, i: usize, name: &str) -> bool {
        let t = self.tokens[i];
        if t.plain {
            crate::fast_hash::bytes_eq(self.raw(i), name.as_bytes())
        } else {
            self.str(i) == name
        }
    }

    /// The entries of the object at `i`: (key token, value token), in document order.
    pub fn entries(&self, i: usize) -> Entries<'a> {
        let t = self.tokens[i];
        debug_assert_eq!(t.kind, Kind::Object);
        Entries {
            doc: *self,
            at: i + 1,
            end: t.end as usize,
        }
    }

    /// The items of the array at `i`.
    pub fn items(&self, i: usize) -> Items<'a> {
        let t = self.tokens[i];
        debug_assert_eq!(t.kind, Kind::Array);
        Items {
            doc: *self,
            at: i + 1,
            end: t.end as usize,
        }
    }

    /// The value of the last entry named `name` in the object at `i` (last wins, as in serde_json
    /// and Python).
    pub fn get(&self, i: usize, name: &str) -> Option<usize> {
        self.entries(i)
            .filter(|&(k, _)| self.key_is(k, name))
            .last()
            .map(|(_, v)| v)
    }

    /// The string value of entry `name`, if it is a string.
    pub fn get_str(&self, i: usize, name: &str) -> Option<Cow<'a, str>> {
        let v = self.get(i, name)?;
        (self.tokens[v].kind == Kind::String).then(|| self.str(v))
    }

    /// Python's truthiness of the value at `i`.
    pub fn is_truthy(&self, i: usize) -> bool {
        let t = self.tokens[i];
        match t.kind {
            Kind::Null | Kind::False => false,
            Kind::True => true,
            Kind::String => t.end > t.start,
            Kind::Object | Kind::Array => t.start > 0,
            Kind::Number => std::str::from_utf8(self.raw(i))
                .ok()
                .and_then(|n| n.parse::<f64>().ok())
                .is_none_or(|n| n != 0.0),
            Kind::Key => true,
        }
    }
}

/// Iterator over an object's entries.
pub struct Entries<'a> {
    doc: Doc<'a>,
    at: usize,
    end: usize,
}

impl Iterator for Entries<'_> {
    type Item = (usize, usize);
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.at >= self.end {
            return None;
        }
        let key = self.at;
        let value = key + 1;
        self.at = self.doc.skip(value);
        Some((key, value))
    }
}

/// Iterator over an array's items.
pub struct Items<'a> {
    doc: Doc<'a>,
    at: usize,
    end: usize,
}

impl Iterator for Items<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        if self.at >= self.end {
            return None;
        }
        let item = self.at;
        self.at = self.doc.skip(item);
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(text: &str) -> usize {
        let mut tape = Tape::default();
        tape.parse(text.as_bytes())
            .map(|d| d.token_count())
            .unwrap()
    }

    #[test]
    fn accepts_what_serde_json_accepts() {
        for ok in [
            r#"{"a":[1,-2.5e3,true,false,null,"x\"\u00e5"],"b":{}}"#,
            " [ ] ",
            "0",
            r#""\/\b\f\n\r\t""#,
            "-0.0E+1",
            "1e300",
        ] {
            parse_ok(ok);
            serde_json::from_str::<serde_json::Value>(ok).unwrap();
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        let deep = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        for bad in [
            "{",
            "[1,]",
            "{\"a\" 1}",
            "01",
            "1.",
            "-",
            "1e",
            "tru",
            "\"a\tb\"",
            "\"\\x\"",
            "\"\\u12\"",
            "{} x",
            "",
            "{\"a\":1,}",
            "1e400",
            &deep,
        ] {
            let mut tape = Tape::default();
            assert!(tape.parse(bad.as_bytes()).is_err(), "{bad}");
            assert!(
                serde_json::from_str::<serde_json::Value>(bad).is_err(),
                "{bad}"
            );
        }
        let mut tape = Tape::default();
        assert!(tape.parse(b"\"\xff\"").is_err());
    }

    /// Every kind of string content at every offset around the eight-byte steps, against
    /// serde_json: validity, decoded value and whether the raw bytes are the value.
    #[test]
    fn strings_scan_alike_at_every_offset() {
        let specials = [
            "\"",
            "\\\\",
            "\\u00e9",
            "\\n",
            "\t",
            "\u{1}",
            "é",
            "\u{7f}",
            "\u{10348}",
            "x",
        ];
        let mut tape = Tape::default();
        let pads = [
            0, 1, 5, 7, 8, 9, 15, 16, 17, 24, 31, 32, 33, 40, 41, 47, 48, 49, 63, 64, 65, 80, 100,
        ];
        // Alone (the string ends the text) and followed by more text, so blocks both run out
        // and reach past the closing quote.
        let wrappings = [("", "", 0), ("[", r#","0123456789abcdefghij"]"#, 1)];
        for (pad, (open, close, token)) in pads.into_iter().flat_map(|p| wrappings.map(|w| (p, w)))
        {
            for special in specials {
                for tail in [0, 1, 7, 8, 9, 15, 16] {
                    let body = format!("{}{special}{}", "a".repeat(pad), "b".repeat(tail));
                    let text = format!("{open}\"{body}\"{close}");
                    let ours = tape.parse(text.as_bytes()).map(|d| {
                        let t = d.token(token);
                        (d.str(token).into_owned(), t.plain)
                    });
                    match serde_json::from_str::<String>(&format!("\"{body}\"")) {
                        Ok(value) => {
                            let (decoded, plain) = ours.expect(&text);
                            assert_eq!(decoded, value, "{text}");
                            let printable = value.bytes().all(|b| (0x20..0x7f).contains(&b));
                            assert_eq!(plain, printable && !body.contains('\\'), "{text}");
                        }
                        Err(_) => assert!(ours.is_err(), "{text}"),
                    }
                }
            }
        }
    }

    #[test]
    fn lone_surrogates_are_accepted_and_flagged_and_pairs_are_not() {
        let mut tape = Tape::default();
        for (text, lone) in [
            (r"a\ud83d", true),
            (r"\ude00", true),
            (r"\ude00\ud83d", true),
            (r"\ud83d\ude00", false),
            (r"\uD83D\uDE00", false),
            (r"\ud83d\n", true),
            (r"\ud83d\ud83d\ude00", true),
            (r"\\ud83d", false),
            (r"plain", false),
            (r"caf\u00e9", false),
        ] {
            let json = format!(r#"{{"{text}":"{text}"}}"#);
            let doc = tape.parse(json.as_bytes()).expect(&json);
            assert_eq!(doc.token(1).lone_surrogate, lone, "{text}");
            assert_eq!(doc.token(2).lone_surrogate, lone, "{text}");
            // Never a panic: a lone surrogate reads as U+FFFD where a Rust string is needed.
            let decoded = doc.str(2);
            assert_eq!(decoded.contains('\u{fffd}'), lone, "{text}");
            if !lone {
                assert_eq!(
                    decoded,
                    serde_json::from_str::<String>(&format!("\"{text}\"")).unwrap()
                );
            }
        }
    }

    #[test]
    fn a_tree_of_any_document_the_tape_reads() {
        let text = r#"{"a":[1,-2.5,true,null,"x\ud83d"],"b":{"c":"\u00e9"},"a":0}"#;
        let mut tape = Tape::default();
        let value = tape.parse(text.as_bytes()).unwrap().to_value(0);
        assert_eq!(value, serde_json::json!({"a": 0, "b": {"c": "é"}}));
        let value = tape
            .parse(br#"[1,-2.5,true,null,"x\ud83d"]"#)
            .unwrap()
            .to_value(0);
        assert_eq!(value, serde_json::json!([1, -2.5, true, null, "x\u{fffd}"]));
    }

    #[test]
    fn surrogates_encoded_as_utf8_bytes_read_as_lone_surrogates() {
        let mut tape = Tape::default();
        let doc = tape.parse(b"[\"a\xed\xa0\xbdb\",\"\xc3\xa9\"]").unwrap();
        assert!(doc.has_lone_surrogate());
        assert!(doc.token(1).lone_surrogate && !doc.token(2).lone_surrogate);
        assert_eq!(doc.str(1), "a\u{fffd}b");
        assert_eq!(doc.units(1), [b'a' as u16, 0xd83d, b'b' as u16]);
        assert_eq!(doc.str(2), "\u{e9}");
        // Other invalid UTF-8 is still refused.
        assert!(tape.parse(b"\"\xed\x9f\"").is_err());
        assert!(tape.parse(b"\"\xc3\"").is_err());
    }

    #[test]
    fn walks_entries_with_last_key_winning() {
        let mut tape = Tape::default();
        let doc = tape
            .parse(br#"{"a":{"x":[1,2]},"b":"\u0062","a":"last","c":0.0}"#)
            .unwrap();
        let keys: Vec<String> = doc.entries(0).map(|(k, _)| doc.str(k).into()).collect();
        assert_eq!(keys, ["a", "b", "a", "c"]);
        assert_eq!(doc.get_str(0, "a").unwrap(), "last");
        assert_eq!(doc.get_str(0, "b").unwrap(), "b");
        assert!(!doc.token(doc.get(0, "b").unwrap()).plain);
        assert!(!doc.is_truthy(doc.get(0, "c").unwrap()));
        let first_a = doc.entries(0).next().unwrap().1;
        let x = doc.get(first_a, "x").unwrap();
        assert_eq!(doc.items(x).count(), 2);
    }
}
