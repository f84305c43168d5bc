//! The saved Patient/Encounter mappings of one type, kept as the sorted body of the JSON object
//! that `codebook-cached-mappings.json` holds for it.
//!
//! The codebook is saved before every batch write and the file holds every mapping of the run,
//! so sorting and writing all of them at each save grew with the square of the export (on
//! 1 GB, 5% of a run's CPU time, mostly cache misses on ids scattered over the heap). A save
//! now sorts only the mappings added since the last one and merges them into this body in one
//! sequential pass, in place: the body is the largest thing the codebook holds (50 MB for
//! 470,000 encounters), and a merged copy built beside it held it twice during every save.

use std::borrow::Cow;
use std::ops::Range;

use crate::json::{self, tape::scan_string};

/// `"real":"fake"` entries, comma-separated, sorted by real id (as decoded text).
#[derive(Default)]
pub struct SortedMappings {
    body: Vec<u8>,
    len: usize,
}

impl SortedMappings {
    /// The entries, ready to sit between the braces of a JSON object.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds `(real, fake)` mappings in any order, repeats allowed; a new mapping replaces a
    /// saved one of the same real id. True when that changed the body: a saved run meets most
    /// of its ids again, and then has no file to write. Sorting on an 8-byte prefix held in
    /// the vector touches each id's own memory only on ties.
    pub fn add(&mut self, new: Vec<(&str, &str)>) -> bool {
        let mut sorted: Vec<(u64, &str, &str)> = new
            .into_iter()
            .map(|(real, fake)| (sort_prefix(real), real, fake))
            .collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
        sorted.dedup_by(|a, b| a.1 == b.1);
        let sorted: Vec<(&str, &str)> = sorted.into_iter().map(|(_, r, f)| (r, f)).collect();
        self.merge(&sorted)
    }

    /// Merges `new` mappings, sorted by real id and without repeats, into the body; true when
    /// the body changed. The body grows in place: the entries after each new one move up once,
    /// from the end down, and a replaced entry is written over (mappings keep their length: a
    /// real id's entry differs only in its 64-digit anonymous id).
    fn merge(&mut self, new: &[(&str, &str)]) -> bool {
        if new.is_empty() {
            return false;
        }
        if self.body.is_empty() {
            return self.merge_by_copy(new);
        }
        let edits = Edits::plan(&self.body, new);
        if edits.inserts.is_empty() && edits.replaces.is_empty() {
            return false;
        }
        if edits
            .replaces
            .iter()
            .any(|(old, text)| old.len() != text.len())
        {
            return self.merge_by_copy(new);
        }
        for (old, text) in &edits.replaces {
            self.body[old.clone()].copy_from_slice(&edits.texts[text.clone()]);
        }
        let saved_len = self.body.len();
        let growth: usize = edits.inserts.iter().map(|(_, text)| text.len() + 1).sum();
        self.body.reserve_exact(growth);
        self.body.resize(saved_len + growth, 0);
        let (mut from, mut to) = (saved_len, saved_len + growth);
        for (at, text) in edits.inserts.iter().rev() {
            let moved = from - at;
            self.body.copy_within(*at..from, to - moved);
            (from, to) = (*at, to - moved);
            let text = &edits.texts[text.clone()];
            let start = to - text.len() - 1;
            // Before a saved entry: the entry, then a comma; after the last: a comma first.
            let (comma, entry) = match *at == saved_len {
                true => (start, start + 1),
                false => (to - 1, start),
            };
            self.body[entry..entry + text.len()].copy_from_slice(text);
            self.body[comma] = b',';
            to = start;
        }
        debug_assert_eq!(from, to, "every saved entry moved by what went before it");
        self.len += edits.inserts.len();
        true
    }

    /// [`merge`](Self::merge) into a new body: for the first mappings, and for a replaced entry
    /// of another length (a file written with other escapes).
    fn merge_by_copy(&mut self, new: &[(&str, &str)]) -> bool {
        let mut changed = false;
        let mut out =
            Vec::with_capacity(self.body.len() + new.iter().map(entry_len).sum::<usize>());
        let mut len = 0;
        let mut saved = Entries {
            body: &self.body,
            at: 0,
        };
        let mut next_saved = saved.next();
        for &(real, fake) in new {
            while let Some((entry, saved_real)) = &next_saved {
                if saved_real.as_ref() >= real {
                    break;
                }
                push_entry(&mut out, &mut len, |out| out.extend_from_slice(entry));
                next_saved = saved.next();
            }
            let replaced = match &next_saved {
                Some((entry, saved_real)) if saved_real == real => Some(*entry),
                _ => None,
            };
            if replaced.is_some() {
                next_saved = saved.next();
            }
            let start = out.len() + usize::from(len > 0);
            push_entry(&mut out, &mut len, |out| {
                json::write_str(out, real);
                out.push(b':');
                json::write_str(out, fake);
            });
            changed |= replaced != Some(&out[start..]);
        }
        while let Some((entry, _)) = next_saved {
            push_entry(&mut out, &mut len, |out| out.extend_from_slice(entry));
            next_saved = saved.next();
        }
        self.body = out;
        self.len = len;
        changed
    }
}

/// How new mappings change a body: entries inserted before the saved entry at a byte offset
/// (the body's length: after the last), and saved entries replaced, with the new entries' text.
struct Edits {
    texts: Vec<u8>,
    inserts: Vec<(usize, Range<usize>)>,
    replaces: Vec<(Range<usize>, Range<usize>)>,
}

impl Edits {
    /// Walks the body once beside `new` (sorted, without repeats); a mapping saved as it is
    /// makes no edit.
    fn plan(body: &[u8], new: &[(&str, &str)]) -> Edits {
        let mut edits = Edits {
            texts: Vec::new(),
            inserts: Vec::new(),
            replaces: Vec::new(),
        };
        let mut saved = Entries { body, at: 0 };
        let mut next_saved = saved.next_at();
        for &(real, fake) in new {
            while let Some((_, _, saved_real)) = &next_saved {
                if saved_real.as_ref() >= real {
                    break;
                }
                next_saved = saved.next_at();
            }
            let start = edits.texts.len();
            json::write_str(&mut edits.texts, real);
            edits.texts.push(b':');
            json::write_str(&mut edits.texts, fake);
            let text = start..edits.texts.len();
            match &next_saved {
                Some((at, entry, saved_real)) if saved_real == real => {
                    if *entry == &edits.texts[text.clone()] {
                        edits.texts.truncate(start);
                    } else {
                        edits.replaces.push((*at..*at + entry.len(), text));
                    }
                    next_saved = saved.next_at();
                }
                Some((at, _, _)) => edits.inserts.push((*at, text)),
                None => edits.inserts.push((body.len(), text)),
            }
        }
        edits
    }
}

/// The first 8 bytes of `text`, zero-padded, as a big-endian number: ordering by it and then
/// by the whole text is the same as ordering by the text.
fn sort_prefix(text: &str) -> u64 {
    let mut prefix = [0u8; 8];
    let head = &text.as_bytes()[..text.len().min(8)];
    prefix[..head.len()].copy_from_slice(head);
    u64::from_be_bytes(prefix)
}

/// Bytes an entry takes at most when written (ids without escapes; a guess for sizing only).
fn entry_len((real, fake): &(&str, &str)) -> usize {
    real.len() + fake.len() + 6
}

fn push_entry(out: &mut Vec<u8>, len: &mut usize, write: impl FnOnce(&mut Vec<u8>)) {
    if *len > 0 {
        out.push(b',');
    }
    write(out);
    *len += 1;
}

/// The body's entries in order: each entry's bytes and its decoded real id.
struct Entries<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Entries<'a> {
    /// The next entry with its offset in the body.
    fn next_at(&mut self) -> Option<(usize, &'a [u8], Cow<'a, str>)> {
        let at = self.at;
        self.next().map(|(entry, real)| (at, entry, real))
    }

    fn next(&mut self) -> Option<(&'a [u8], Cow<'a, str>)> {
        if self.at >= self.body.len() {
            return None;
        }
        let start = self.at;
        // The body is our own output: a string, a colon, a string, then a comma or the end.
        let key = scan_string(self.body, start + 1).expect("saved mappings are valid JSON");
        let value = scan_string(self.body, key.end + 3).expect("saved mappings are valid JSON");
        let end = value.end + 1;
        self.at = end + 1;
        let raw_key = &self.body[start..=key.end];
        // A key no Rust string holds (a lone surrogate) reads as U+FFFD: no id we hash has one.
        let text = &raw_key[1..raw_key.len() - 1];
        let real = match (key.escaped, std::str::from_utf8(text)) {
            (false, Ok(text)) => Cow::Borrowed(text),
            _ => serde_json::from_slice::<String>(raw_key)
                .map(Cow::Owned)
                .unwrap_or_else(|_| {
                    let mut units = Vec::new();
                    json::utf16::decode_units(text, &mut units);
                    Cow::Owned(String::from_utf16_lossy(&units))
                }),
        };
        Some((&self.body[start..end], real))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn object(m: &SortedMappings) -> String {
        format!("{{{}}}", String::from_utf8(m.body().to_vec()).unwrap())
    }

    #[test]
    fn sort_prefix_orders_like_the_text() {
        let mut texts = [
            "",
            "a",
            "a\0",
            "ab",
            "aa\u{ff}",
            "abcdefgh",
            "abcdefgg\u{ff}",
            "b",
        ];
        let mut by_prefix = texts;
        by_prefix.sort_by(|a, b| sort_prefix(a).cmp(&sort_prefix(b)).then_with(|| a.cmp(b)));
        texts.sort();
        assert_eq!(by_prefix, texts);
    }

    #[test]
    fn merging_keeps_the_body_sorted_and_lets_new_mappings_win() {
        let mut saved = SortedMappings::default();
        let mut expected = BTreeMap::new();
        let rounds: [&[(&str, &str)]; 5] = [
            &[("d", "2"), ("b", "1"), ("d", "2")],
            &[("e", "5"), ("a", "3"), ("c", "4")],
            // Escaped ids sort by their text, not by their escapes.
            &[("b", "6"), ("q\"x", "7"), ("q\\x", "8")],
            // Mappings already saved, unchanged: nothing to write.
            &[("q\"x", "7"), ("a", "3")],
            &[],
        ];
        for round in rounds {
            let before = expected.clone();
            let changed = saved.add(round.to_vec());
            expected.extend(round.iter().copied());
            assert_eq!(changed, expected != before);
            assert_eq!(object(&saved), serde_json::to_string(&expected).unwrap());
            assert_eq!(saved.is_empty(), expected.is_empty());
        }
    }

    #[test]
    fn merging_in_place_matches_a_sorted_map_over_many_saves() {
        // A small deterministic generator: ids collide often, so saves insert at the start, in
        // the middle and at the end, replace entries (same and other lengths), and repeat them.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut saved = SortedMappings::default();
        let mut expected = BTreeMap::new();
        for _ in 0..60 {
            let count = (next() % 12) as usize;
            let round: Vec<(String, String)> = (0..count)
                .map(|_| {
                    let real = format!("id{}", next() % 200);
                    let fake = match next() % 10 {
                        0 => format!("short{}", next() % 10),
                        _ => format!("{:064x}", next() % 3),
                    };
                    (real, fake)
                })
                .collect();
            let before = expected.clone();
            let pairs: Vec<(&str, &str)> = round
                .iter()
                .map(|(r, f)| (r.as_str(), f.as_str()))
                .collect();
            let changed = saved.add(pairs.clone());
            // `add` keeps the first of repeated ids in one save.
            let mut first = BTreeMap::new();
            for (r, f) in pairs {
                first.entry(r.to_string()).or_insert(f.to_string());
            }
            expected.extend(first);
            assert_eq!(changed, expected != before);
            assert_eq!(object(&saved), serde_json::to_string(&expected).unwrap());
        }
        assert!(expected.len() > 100, "the rounds filled the body");
    }
}
