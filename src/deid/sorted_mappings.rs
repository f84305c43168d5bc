//! The saved Patient/Encounter mappings of one type, kept as the sorted body of the JSON object
//! that `codebook-cached-mappings.json` holds for it.
//!
//! The codebook is saved before every batch write and the file holds every mapping of the run,
//! so sorting and writing all of them at each save grew with the square of the export (on
//! 1 GB, 5% of a run's CPU time, mostly cache misses on ids scattered over the heap). A save
//! now sorts only the mappings added since the last one and merges them into this body in one
//! sequential pass.

use std::borrow::Cow;

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
    /// the body changed.
    fn merge(&mut self, new: &[(&str, &str)]) -> bool {
        if new.is_empty() {
            return false;
        }
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
        let real = if key.escaped {
            Cow::Owned(serde_json::from_slice::<String>(raw_key).expect("a valid JSON string"))
        } else {
            Cow::Borrowed(std::str::from_utf8(&raw_key[1..raw_key.len() - 1]).expect("ASCII"))
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
}
