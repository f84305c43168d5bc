//! Reads the bulk-export log (`log.ndjson`, bulk-data-client format) for the export's group name,
//! URL and transaction time, which the completion tables record.

use anyhow::{Result, anyhow, bail};
use serde_json::Value;

use super::discovery::Listing;
use crate::store::StoredObject;
use crate::time::PyDateTime;

/// What the export log says about the export that produced the input.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportInfo {
    pub group_name: String,
    pub export_url: String,
    pub export_time: PyDateTime,
}

/// Finds the log: `log.ndjson`, or else exactly one `log.*.ndjson` in the input root.
pub fn find_log(listing: &Listing) -> Result<StoredObject> {
    let mut found: Vec<StoredObject> = listing
        .under("")
        .map(|(object, _)| object)
        .filter(|o| !o.key().contains('/'))
        .filter(|o| o.key().starts_with("log.") && o.key().ends_with(".ndjson"))
        .collect();
    if let Some(plain) = found.iter().position(|o| o.key() == "log.ndjson") {
        return Ok(found.swap_remove(plain));
    }
    match found.len() {
        0 => bail!("no export log found"),
        1 => Ok(found.remove(0)),
        _ => bail!("more than one export log found"),
    }
}

/// Parses the log; the last kickoff decides which export is described.
pub fn read_export_log(listing: &Listing) -> Result<ExportInfo> {
    let log = find_log(listing)?;
    let bytes = log
        .read()?
        .ok_or_else(|| anyhow!("{}: gone while reading it", log.name()))?;
    let text = String::from_utf8_lossy(&bytes);
    let rows: Vec<Value> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let export_id = rows
        .iter()
        .rev()
        .find(|r| r.get("eventId").and_then(Value::as_str) == Some("kickoff"))
        .and_then(|r| r.get("exportId").cloned());
    let Some(export_id) = export_id else {
        bail!("the export log has no kickoff event")
    };
    let mut url = None;
    let mut time = None;
    for row in rows
        .iter()
        .filter(|r| r.get("exportId") == Some(&export_id))
    {
        let detail = row.get("eventDetail");
        match row.get("eventId").and_then(Value::as_str) {
            Some("kickoff") => {
                url = detail
                    .and_then(|d| d.get("exportUrl"))
                    .and_then(Value::as_str)
                    .map(String::from)
            }
            Some("status_complete") => {
                time = detail
                    .and_then(|d| d.get("transactionTime"))
                    .and_then(Value::as_str)
                    .map(String::from)
            }
            _ => {}
        }
    }
    let (Some(url), Some(time)) = (url, time) else {
        bail!("the export log is incomplete (no kickoff URL or no completion time)")
    };
    Ok(ExportInfo {
        group_name: group_from_url(&url),
        export_time: PyDateTime::parse(&time)?,
        export_url: url,
    })
}

/// The FHIR Group id in an export URL (`…/Group/<id>/$export`), or "" for a global export.
pub fn group_from_url(url: &str) -> String {
    let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let path = after_scheme
        .find('/')
        .map(|i| &after_scheme[i..])
        .unwrap_or("");
    let path = path.split(['?', '#']).next().unwrap_or("");
    let path = path.strip_suffix('/').unwrap_or(path);
    let path = path.strip_suffix("/$export").unwrap_or(path);
    let path = path.strip_suffix("/Patient").unwrap_or(path);
    let pieces: Vec<&str> = path.splitn(3, "/Group/").collect();
    if pieces.len() == 2 {
        pieces[1].to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(dir: &std::path::Path) -> Listing {
        Listing::of(&crate::store::ObjectLocation::local(dir).unwrap()).unwrap()
    }

    #[test]
    fn group_names_from_urls() {
        assert_eq!(
            group_from_url("https://h/fhir/Group/sample-10/$export"),
            "sample-10"
        );
        assert_eq!(group_from_url("https://h/root/Group/g"), "g");
        assert_eq!(group_from_url("https://h/root/$export?_type=Patient"), "");
        assert_eq!(group_from_url("https://h/root/Patient/$export"), "");
    }

    #[test]
    fn last_kickoff_wins() {
        let dir = tempfile::tempdir().unwrap();
        let log = [
            r#"{"exportId":"a","eventId":"kickoff","eventDetail":{"exportUrl":"https://h/Group/old/$export"}}"#,
            r#"{"exportId":"a","eventId":"status_complete","eventDetail":{"transactionTime":"2020-01-01T00:00:00Z"}}"#,
            r#"{"exportId":"b","eventId":"kickoff","eventDetail":{"exportUrl":"https://h/Group/new/$export"}}"#,
            r#"{"exportId":"b","eventId":"status_complete","eventDetail":{"transactionTime":"2024-08-06T18:12:57Z"}}"#,
        ];
        std::fs::write(dir.path().join("log.ndjson"), log.join("\n")).unwrap();
        let info = read_export_log(&listing(dir.path())).unwrap();
        assert_eq!(info.group_name, "new");
        assert_eq!(info.export_time.isoformat(), "2024-08-06T18:12:57+00:00");
    }

    #[test]
    fn incomplete_log_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("log.x.ndjson"), r#"{"exportId":"a","eventId":"kickoff","eventDetail":{"exportUrl":"https://h/Group/g"}}"#).unwrap();
        assert!(read_export_log(&listing(dir.path())).is_err());
    }
}
