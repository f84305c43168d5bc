//! Reads the ids a bulk export says were deleted: transaction Bundles under `deleted/` with
//! `DELETE Type/id` entries.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};

use anyhow::Result;
use serde_json::Value;

use super::discovery::{Listing, is_ndjson_name};

/// Resource type -> real ids to delete.
pub type DeletedIds = BTreeMap<String, BTreeSet<String>>;

/// Collects deletions from `<root>/deleted/`; unreadable lines are skipped (they are counted by
/// the caller through the returned skip count).
pub fn read_deleted_ids(listing: &Listing) -> Result<(DeletedIds, u64)> {
    let mut out = DeletedIds::new();
    let mut skipped = 0;
    for (object, _) in listing.under("deleted/") {
        if !is_ndjson_name(object.file_name()) {
            continue;
        }
        let reader = BufReader::new(object.open_decoded()?);
        for line in reader.split(b'\n') {
            let Ok(line) = line else {
                skipped += 1;
                break;
            };
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let Ok(bundle) = serde_json::from_slice::<Value>(&line) else {
                skipped += 1;
                continue;
            };
            if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle")
                || bundle.get("type").and_then(Value::as_str) != Some("transaction")
            {
                continue;
            }
            let entries = bundle
                .get("entry")
                .and_then(Value::as_array)
                .into_iter()
                .flatten();
            for entry in entries {
                let Some(request) = entry.get("request") else {
                    continue;
                };
                if request.get("method").and_then(Value::as_str) != Some("DELETE") {
                    continue;
                }
                let Some(url) = request.get("url").and_then(Value::as_str) else {
                    continue;
                };
                let mut parts = url.split('/');
                if let (Some(t), Some(id), None) = (parts.next(), parts.next(), parts.next()) {
                    out.entry(t.to_string()).or_default().insert(id.to_string());
                }
            }
        }
    }
    Ok((out, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delete_entries_of_transaction_bundles_are_collected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("deleted")).unwrap();
        let bundle = r#"{"resourceType":"Bundle","type":"transaction","entry":[
            {"request":{"method":"DELETE","url":"Patient/p1"}},
            {"request":{"method":"DELETE","url":"Patient/p2/_history/1"}},
            {"request":{"method":"PUT","url":"Patient/p3"}}]}"#
            .replace('\n', "");
        let other = r#"{"resourceType":"Bundle","type":"batch","entry":[{"request":{"method":"DELETE","url":"Condition/c"}}]}"#;
        std::fs::write(
            dir.path().join("deleted/del.ndjson"),
            format!("{bundle}\n{other}\nnot json\n"),
        )
        .unwrap();
        let root = crate::store::ObjectLocation::local(dir.path()).unwrap();
        let (ids, skipped) = read_deleted_ids(&Listing::of(&root).unwrap()).unwrap();
        assert_eq!(ids.len(), 1);
        assert_eq!(ids["Patient"].iter().collect::<Vec<_>>(), ["p1"]);
        assert_eq!(skipped, 1);
    }
}
