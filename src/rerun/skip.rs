//! The input lines a run leaves out, a bit per line of each file that has any: a hundred
//! million lines take 12.5 MB.

use std::collections::HashMap;

/// Line numbers (1-based) of one file.
#[derive(Default)]
pub struct LineSet {
    words: Vec<u64>,
    len: u64,
}

impl LineSet {
    pub fn insert(&mut self, line: u64) {
        let (word, bit) = ((line / 64) as usize, line % 64);
        if word >= self.words.len() {
            self.words.resize(word + 1, 0);
        }
        if self.words[word] & (1 << bit) == 0 {
            self.words[word] |= 1 << bit;
            self.len += 1;
        }
    }

    pub fn contains(&self, line: u64) -> bool {
        let (word, bit) = ((line / 64) as usize, line % 64);
        self.words.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether every line of `lines` is in the set.
    pub fn contains_all(&self, lines: std::ops::Range<u64>) -> bool {
        lines.into_iter().all(|line| self.contains(line))
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Lines to leave out, by input file (as [`crate::input::InputFile::name`] gives it).
#[derive(Default)]
pub struct SkipLines {
    files: HashMap<String, LineSet>,
}

impl SkipLines {
    pub fn insert(&mut self, file: &str, line: u64) {
        if let Some(set) = self.files.get_mut(file) {
            set.insert(line);
        } else {
            let mut set = LineSet::default();
            set.insert(line);
            self.files.insert(file.to_string(), set);
        }
    }

    /// The lines to leave out of `file`, if any.
    pub fn file(&self, file: &str) -> Option<&LineSet> {
        self.files.get(file)
    }

    /// Lines left out in all.
    pub fn len(&self) -> u64 {
        self.files.values().map(LineSet::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> u64 {
        self.files
            .iter()
            .map(|(name, set)| (name.len() + set.words.len() * 8) as u64)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_per_file() {
        let mut skip = SkipLines::default();
        for line in [1, 64, 65, 1_000_000, 64] {
            skip.insert("a.ndjson", line);
        }
        skip.insert("b.ndjson", 3);
        let a = skip.file("a.ndjson").unwrap();
        assert!(a.contains(1) && a.contains(64) && a.contains(65) && a.contains(1_000_000));
        assert!(!a.contains(2) && !a.contains(3) && !a.contains(2_000_000));
        assert_eq!(a.len(), 4);
        assert!(a.contains_all(64..66) && a.contains_all(5..5));
        assert!(!a.contains_all(63..66));
        assert_eq!(skip.len(), 5);
        assert!(skip.file("c.ndjson").is_none());
        assert!(skip.heap_bytes() >= 1_000_000 / 8);
    }
}
