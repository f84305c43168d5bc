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

    /// Merges `new` mappings, sorted by real id and without repeats, into the body; a new
    /// mapping replaces a saved one of the same real id.
    pub fn merge(&mut self, new: &[(&str, &str)]) {
        if new.is_empty() {
            return;
        }
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
            if next_saved
                .as_ref()
                .is_some_and(|(_, saved_real)| saved_real == real)
            {
                next_saved = saved.next();
            }
            push_entry(&mut out, &mut len, |out| {
                json::write_str(out, real);
                out.push(b':');
                json::write_str(out, fake);
            });
        }
        while let Some((entry, _)) = next_saved {
            push_entry(&mut out, &mut len, |out| out.extend_from_slice(entry));
            next_saved = saved.next();
        }
        self.body = out;
        self.len = len;
    }
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
    fn merging_keeps_the_body_sorted_and_lets_new_mappings_win() {
        let mut saved = SortedMappings::default();
        let mut expected = BTreeMap::new();
        let rounds: [&[(&str, &str)]; 4] = [
            &[("b", "1"), ("d", "2")],
            &[("a", "3"), ("c", "4"), ("e", "5")],
            // Escaped ids sort by their text, not by their escapes.
            &[("b", "6"), ("q\"x", "7"), ("q\\x", "8")],
            &[],
        ];
        for round in rounds {
            saved.merge(round);
            expected.extend(round.iter().copied());
            assert_eq!(object(&saved), serde_json::to_string(&expected).unwrap());
            assert_eq!(saved.is_empty(), expected.is_empty());
        }
    }
}
