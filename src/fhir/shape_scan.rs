//! Reads the keys of a row the scrubber wrote into a batch `Shape`, straight from its bytes.
//! The rows are compact JSON we produced ourselves (no whitespace, valid, ASCII-escaped), so
//! they need no tokenizing or validation: tokenizing every written row again cost about an
//! eighth of a Parquet run. Anything unexpected makes the scan give up, and the caller falls
//! back to the tape (`Shape::add_row`), so the shape is the same either way.

use super::schema::Shape;
use crate::fast_hash::NameRef;
use crate::json::compact::{Cursor, Step};

impl Shape {
    /// Adds one compact row to the shape, as `add_row` would. Returns false if the row is not
    /// the compact JSON object the scrubber writes (or has a key with escapes); the shape may
    /// then hold some of the row's keys already, and the caller adds the row with `add_row`.
    pub fn add_compact_row(&mut self, row: &[u8]) -> bool {
        let mut scanner = Scanner {
            at: Cursor::new(row),
            contained_types: Vec::new(),
        };
        if scanner.at.peek().ok() != Some(b'{')
            || scanner.value(self, Place::Top).is_err()
            || !scanner.at.at_end()
        {
            return false;
        }
        let types = scanner.contained_types.iter().map(|t| t.to_string());
        self.contained_types.extend(types);
        true
    }
}

/// Where a value sits: the resource, its `contained` list, an item of that list (whose
/// `resourceType` is recorded), or anywhere else.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Top,
    ContainedList,
    ContainedItem,
    Nested,
}

struct Scanner<'a> {
    at: Cursor<'a>,
    /// `resourceType` of each object in the resource's `contained` list.
    contained_types: Vec<&'a str>,
}

impl<'a> Scanner<'a> {
    /// A value at `place` into `shape` (a list's items share the list's shape).
    fn value(&mut self, shape: &mut Shape, place: Place) -> Step<()> {
        match self.at.peek()? {
            b'{' => self.object(shape, place),
            b'[' => {
                self.at.pos += 1;
                if self.at.peek()? == b']' {
                    self.at.pos += 1;
                    return Ok(());
                }
                let items = match place {
                    Place::ContainedList => Place::ContainedItem,
                    _ => Place::Nested,
                };
                loop {
                    self.value(shape, items)?;
                    if self.at.end_or_next(b']')? {
                        return Ok(());
                    }
                }
            }
            // Strings, numbers and literals add nothing to the shape.
            _ => self.at.skip_value(),
        }
    }

    /// An object's entries into `shape`. The resource's `contained` list is scanned as such;
    /// a contained object's `resourceType` (the last one, as a JSON reader keeps it) is
    /// recorded when it is a string. Keys with escapes stop the scan.
    fn object(&mut self, shape: &mut Shape, place: Place) -> Step<()> {
        self.at.eat(b'{')?;
        if self.at.peek()? == b'}' {
            self.at.pos += 1;
            return Ok(());
        }
        let mut resource_type = None;
        loop {
            let key = self.at.plain_string()?;
            self.at.eat(b':')?;
            if place == Place::ContainedItem && key == "resourceType" {
                resource_type = None;
                if self.at.peek()? == b'"' {
                    with_child(shape, key, |_| ());
                    resource_type = Some(self.at.plain_string()?);
                    if self.at.end_or_next(b'}')? {
                        break;
                    }
                    continue;
                }
            }
            let inner = match (place, key) {
                (Place::Top, "contained") if self.at.peek()? == b'[' => Place::ContainedList,
                _ => Place::Nested,
            };
            with_child(shape, key, |child| self.value(child, inner))?;
            if self.at.end_or_next(b'}')? {
                break;
            }
        }
        self.contained_types.extend(resource_type);
        Ok(())
    }
}

/// Runs `f` on the child shape for `key`, created on first sight (looked up before inserting,
/// so known keys are not copied).
fn with_child<R>(shape: &mut Shape, key: &str, f: impl FnOnce(&mut Shape) -> R) -> R {
    match shape.children.get_mut(NameRef::new(key)) {
        Some(child) => f(child),
        None => f(shape.children.entry(key.into()).or_default()),
    }
}

#[cfg(test)]
mod tests {
    use crate::json::Tape;

    use super::*;

    fn by_tape(rows: &[&[u8]]) -> Shape {
        let mut shape = Shape::default();
        let mut tape = Tape::default();
        for row in rows {
            shape.add_row(&tape.parse(row).unwrap());
        }
        shape
    }

    fn by_scan(rows: &[&[u8]]) -> (Shape, usize) {
        let mut shape = Shape::default();
        let mut tape = Tape::default();
        let mut fallbacks = 0;
        for row in rows {
            if !shape.add_compact_row(row) {
                fallbacks += 1;
                shape.add_row(&tape.parse(row).unwrap());
            }
        }
        (shape, fallbacks)
    }

    #[test]
    fn scanning_gives_the_shape_tokenizing_gives() {
        let rows: Vec<&[u8]> = vec![
            br#"{"resourceType":"Observation","id":"a","code":{"coding":[{"system":"s","code":"1"}]},"valueQuantity":{"value":1.5e3},"component":[],"x":[[1,2],[{"y":true}]],"z":null}"#,
            br#"{"resourceType":"Condition","contained":[{"resourceType":"Patient","id":"p","name":[{"family":"F"}]},{"resourceType":"Practitioner","active":false},"odd",[{"resourceType":"Device"}]],"note":[{"text":"caf\u00e9"}]}"#,
            br#"{}"#,
            br#"{"_status":{"extension":[{"url":"u","valueCode":"masked"}]},"a\"b":1}"#,
        ];
        let (scanned, fallbacks) = by_scan(&rows);
        assert_eq!(scanned, by_tape(&rows));
        // Only the row with an escaped key was tokenized instead.
        assert_eq!(fallbacks, 1);
        assert!(scanned.contained_types.contains("Patient"));
        // Only the list's own items count as contained resources, as with the tape.
        assert!(!scanned.contained_types.contains("Device"));
        assert!(scanned.children["contained"].children.contains_key("name"));
    }

    #[test]
    fn rows_that_are_not_compact_objects_are_refused() {
        let mut shape = Shape::default();
        for row in [
            &b"[1]"[..],
            b"{\"a\":1",
            b"{\"a\" :1}",
            b"{\"a\":1}x",
            b"{\"a\":}",
        ] {
            assert!(
                !shape.add_compact_row(row),
                "{}",
                String::from_utf8_lossy(row)
            );
        }
        assert!(shape.add_compact_row(b"{\"a\":[1,{\"b\":\"\\\"\"}]}"));
        assert!(shape.children["a"].children.contains_key("b"));
    }

    #[test]
    fn the_synthea_sample_scans_as_it_tokenizes() {
        let mut rows = Vec::new();
        for (_, text) in crate::test_data::synthea_files() {
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                // Compact it as the scrubber writes rows.
                let value: serde_json::Value = serde_json::from_slice(line).unwrap();
                rows.push(serde_json::to_vec(&value).unwrap());
            }
        }
        let rows: Vec<&[u8]> = rows.iter().map(Vec::as_slice).collect();
        assert!(rows.len() > 1000);
        let (scanned, _) = by_scan(&rows);
        assert_eq!(scanned, by_tape(&rows));
    }
}
