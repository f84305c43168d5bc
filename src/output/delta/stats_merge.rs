//! The Delta statistics of a file joined from others ([`super::file_concat`]), from theirs: the
//! rows and null counts add up, the bounds are the lowest minimum and the highest maximum. A
//! bound is kept only where every file either has it or holds nulls alone in that column, so
//! the joined file's bounds hold for every row it has (a reader skips files by them).

use serde_json::{Map, Value};
use std::cmp::Ordering;

/// The statistics (Delta's `add.stats` JSON) of the join of files with `stats`; None when a
/// file has none or they cannot be read (a reader then reads the file whatever it filters on).
pub fn merge(stats: &[Option<&str>]) -> Option<String> {
    let parsed: Vec<Map<String, Value>> = stats
        .iter()
        .map(|s| {
            serde_json::from_str::<Value>((*s)?)
                .ok()?
                .as_object()
                .cloned()
        })
        .collect::<Option<_>>()?;
    let first = parsed.first()?;
    let mut out = Map::new();
    let records: Vec<u64> = parsed
        .iter()
        .map(|s| s.get("numRecords")?.as_u64())
        .collect::<Option<_>>()?;
    out.insert(
        "numRecords".into(),
        Value::from(records.iter().sum::<u64>()),
    );
    let nulls: Vec<Option<&Value>> = parsed.iter().map(|s| s.get("nullCount")).collect();
    let mins: Vec<Option<&Value>> = parsed.iter().map(|s| s.get("minValues")).collect();
    let maxes: Vec<Option<&Value>> = parsed.iter().map(|s| s.get("maxValues")).collect();
    let files: Vec<FileStats> = (0..parsed.len())
        .map(|i| FileStats {
            records: records[i],
            nulls: nulls[i],
        })
        .collect();
    if let Some(min) = bound(&files, &mins, Ordering::Less) {
        out.insert("minValues".into(), min);
    }
    if let Some(max) = bound(&files, &maxes, Ordering::Greater) {
        out.insert("maxValues".into(), max);
    }
    if let Some(count) = null_counts(&nulls) {
        out.insert("nullCount".into(), count);
    }
    // Bounds are tight when none of the files has rows deleted by a deletion vector; joined
    // files never have one.
    if first.contains_key("tightBounds") {
        out.insert("tightBounds".into(), Value::Bool(true));
    }
    serde_json::to_string(&Value::Object(out)).ok()
}

/// What the bounds of one file need from the rest of its statistics.
struct FileStats<'a> {
    records: u64,
    /// Its `nullCount` object (or, deeper down, the part of it at the same path as the bounds).
    nulls: Option<&'a Value>,
}

/// The bound of each column over all files (`keep` the one ordered so against the others): an
/// object of the same shape as the files' bounds, holding the columns every file bounds or holds
/// only nulls in.
fn bound(files: &[FileStats<'_>], bounds: &[Option<&Value>], keep: Ordering) -> Option<Value> {
    let mut names: Vec<&String> = Vec::new();
    for object in bounds.iter().flatten().filter_map(|b| b.as_object()) {
        for name in object.keys() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    let mut out = Map::new();
    for name in names {
        let mut nested = Vec::new();
        let mut values = Vec::new();
        let mut usable = true;
        let mut below = Vec::new();
        for (file, bound) in files.iter().zip(bounds) {
            let value = bound.and_then(|b| b.get(name));
            let nulls = file.nulls.and_then(|n| n.get(name));
            match value {
                Some(Value::Object(_)) => {
                    nested.push(value);
                    below.push(FileStats {
                        records: file.records,
                        nulls,
                    });
                }
                Some(Value::Null) | None => {
                    if nulls.and_then(Value::as_u64) != Some(file.records) {
                        // A nested struct with no bounds in this file: its fields decide.
                        if nulls.is_some_and(Value::is_object) {
                            nested.push(None);
                            below.push(FileStats {
                                records: file.records,
                                nulls,
                            });
                        } else {
                            usable = false;
                        }
                    }
                }
                Some(scalar) => values.push(scalar),
            }
        }
        if !usable {
            continue;
        }
        if !nested.is_empty() && values.is_empty() {
            if let Some(inner) = bound(&below, &nested, keep)
                && inner.as_object().is_some_and(|o| !o.is_empty())
            {
                out.insert(name.clone(), inner);
            }
        } else if nested.is_empty()
            && let Some(best) = extreme(&values, keep)
        {
            out.insert(name.clone(), best.clone());
        }
    }
    Some(Value::Object(out))
}

/// The value ordered `keep` against all the others; None when two cannot be compared.
fn extreme<'a>(values: &[&'a Value], keep: Ordering) -> Option<&'a Value> {
    let mut best = *values.first()?;
    for value in &values[1..] {
        if compare(value, best)? == keep {
            best = value;
        }
    }
    Some(best)
}

/// Orders two bounds of one column: numbers by value, strings (text, dates and timestamps as
/// Delta writes them, all of one format within a column) by their bytes, as Parquet orders them.
fn compare(a: &Value, b: &Value) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => match (a.as_i64(), b.as_i64()) {
            (Some(a), Some(b)) => Some(a.cmp(&b)),
            _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
        },
        (Value::String(a), Value::String(b)) => Some(a.as_bytes().cmp(b.as_bytes())),
        (Value::Bool(a), Value::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// The null counts of all files added up, column by column; a column some file does not count
/// is left out.
fn null_counts(counts: &[Option<&Value>]) -> Option<Value> {
    let first = counts.first()?.as_ref()?;
    match first {
        Value::Number(_) => {
            let sum = counts
                .iter()
                .map(|c| c.and_then(Value::as_u64))
                .sum::<Option<u64>>()?;
            Some(Value::from(sum))
        }
        Value::Object(object) => {
            let mut out = Map::new();
            for name in object.keys() {
                let inner: Vec<Option<&Value>> =
                    counts.iter().map(|c| c.and_then(|c| c.get(name))).collect();
                if let Some(sum) = null_counts(&inner) {
                    out.insert(name.clone(), sum);
                }
            }
            Some(Value::Object(out))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn merged(stats: &[Value]) -> Value {
        let strings: Vec<String> = stats.iter().map(Value::to_string).collect();
        let refs: Vec<Option<&str>> = strings.iter().map(|s| Some(s.as_str())).collect();
        serde_json::from_str(&merge(&refs).unwrap()).unwrap()
    }

    #[test]
    fn rows_and_nulls_add_up_and_bounds_widen() {
        let a = json!({"numRecords": 3,
            "minValues": {"id": "b", "n": 5, "when": "2020-01-02T00:00:00.000Z", "s": {"x": 1.5}},
            "maxValues": {"id": "d", "n": 9, "when": "2020-03-01T00:00:00.000Z", "s": {"x": 2.5}},
            "nullCount": {"id": 0, "n": 1, "when": 0, "s": {"x": 0}}});
        let b = json!({"numRecords": 2,
            "minValues": {"id": "a", "n": 7, "when": "2019-12-31T00:00:00.000Z", "s": {"x": -1.0}},
            "maxValues": {"id": "c", "n": 12, "when": "2020-01-01T00:00:00.000Z", "s": {"x": 0.5}},
            "nullCount": {"id": 0, "n": 0, "when": 1, "s": {"x": 1}}});
        assert_eq!(
            merged(&[a, b]),
            json!({"numRecords": 5,
                "minValues": {"id": "a", "n": 5, "when": "2019-12-31T00:00:00.000Z", "s": {"x": -1.0}},
                "maxValues": {"id": "d", "n": 12, "when": "2020-03-01T00:00:00.000Z", "s": {"x": 2.5}},
                "nullCount": {"id": 0, "n": 1, "when": 1, "s": {"x": 1}}})
        );
    }

    #[test]
    fn a_column_only_null_in_a_file_keeps_the_others_bounds_and_an_unbounded_one_drops_it() {
        let a = json!({"numRecords": 2,
            "minValues": {"id": "b", "note": "x"}, "maxValues": {"id": "c", "note": "y"},
            "nullCount": {"id": 0, "note": 0}});
        // All null in `note`: no bounds, which says nothing against a's.
        let b = json!({"numRecords": 2,
            "minValues": {"id": "a"}, "maxValues": {"id": "b"},
            "nullCount": {"id": 0, "note": 2}});
        let joined = merged(&[a.clone(), b]);
        assert_eq!(joined["minValues"], json!({"id": "a", "note": "x"}));
        assert_eq!(joined["maxValues"], json!({"id": "c", "note": "y"}));
        // Values but no bounds (not counted, or cut off): the joined file has none either.
        let c = json!({"numRecords": 2,
            "minValues": {"id": "a"}, "maxValues": {"id": "b"},
            "nullCount": {"id": 0, "note": 1}});
        let joined = merged(&[a, c]);
        assert_eq!(joined["minValues"], json!({"id": "a"}));
        assert_eq!(joined["nullCount"], json!({"id": 0, "note": 1}));
    }

    #[test]
    fn a_file_without_statistics_leaves_the_join_without() {
        assert_eq!(merge(&[Some(r#"{"numRecords": 1}"#), None]), None);
    }
}
