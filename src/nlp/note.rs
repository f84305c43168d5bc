//! Clinical notes: which resources a study reads (status and emergency-department codes), the
//! note text (best attachment, base64 with its charset, HTML to text) and the ids a result row
//! needs. Everything here works on the resource only; nothing is logged from its content.

use anyhow::{Result, anyhow, bail};
use base64::Engine as _;
use serde_json::Value;

use super::study::NoteSource;

/// Why a note's text could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum TextError {
    /// The text is only available by URL (it is not fetched).
    RemoteOnly,
    /// No usable attachment, bad base64, or an undecodable charset.
    Unreadable(String),
}

/// Whether the study reads this resource: type, status rules and an ED coding.
pub fn is_selected(source: &NoteSource, note: &Value) -> bool {
    let Some(rtype) = note.get("resourceType").and_then(Value::as_str) else {
        return false;
    };
    if !source.resources.iter().any(|r| r == rtype) || note.get("id").is_none() {
        return false;
    }
    let allowed = |field: &str, values: &[String]| match note.get(field).and_then(Value::as_str) {
        None => note.get(field).is_none_or(Value::is_null),
        Some(v) => values.iter().any(|a| a == v),
    };
    let status = source.status_by_type.get(rtype).unwrap_or(&source.status);
    allowed("status", status)
        && allowed("docStatus", &source.doc_status)
        && (source.ed_codes.is_empty() || is_ed_note(source, note))
}

fn is_ed_note(source: &NoteSource, note: &Value) -> bool {
    let categories = note
        .get("category")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("coding").and_then(Value::as_array))
        .flatten();
    let types = note
        .pointer("/type/coding")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    categories.chain(types).any(|coding| {
        let field = |k: &str| coding.get(k).and_then(Value::as_str);
        match (field("system"), field("code")) {
            (Some(system), Some(code)) => source
                .ed_codes
                .get(system)
                .is_some_and(|codes| codes.contains(code)),
            _ => false,
        }
    })
}

/// The note's text: the best attachment (text/plain, then HTML, then XHTML), decoded with its
/// charset; HTML becomes plain text as the reference's inscriptis makes it; trimmed.
pub fn note_text(note: &Value) -> Result<String, TextError> {
    let attachments: Vec<&Value> = match note.get("resourceType").and_then(Value::as_str) {
        Some("DiagnosticReport") => note
            .get("presentedForm")
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default(),
        _ => note
            .get("content")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("attachment"))
            .collect(),
    };
    let mut best: Option<(u8, &Value, ContentType)> = None;
    for a in attachments {
        let Some(ct) = a.get("contentType").and_then(Value::as_str) else {
            continue;
        };
        let ct = ContentType::parse(ct);
        let priority = match ct.mimetype.as_str() {
            "text/plain" => 3,
            "text/html" => 2,
            "application/xhtml+xml" => 1,
            _ => 0,
        };
        if priority > best.as_ref().map_or(0, |b| b.0) {
            best = Some((priority, a, ct));
        }
    }
    let Some((_, attachment, ct)) = best else {
        return Err(TextError::Unreadable("no textual attachment".into()));
    };
    let text = match attachment.get("data").and_then(Value::as_str) {
        Some(data) => {
            decode(data, &ct.charset).map_err(|e| TextError::Unreadable(e.to_string()))?
        }
        None if attachment.get("url").is_some() => return Err(TextError::RemoteOnly),
        None => {
            return Err(TextError::Unreadable(
                "no data or url in the attachment".into(),
            ));
        }
    };
    let text = if ct.mimetype == "text/plain" {
        text
    } else {
        super::html::html_to_text(&text)
    };
    Ok(crate::json::utf16::python_strip(&text).to_string())
}

/// A parsed `Content-Type` value.
struct ContentType {
    mimetype: String,
    charset: String,
}

impl ContentType {
    fn parse(value: &str) -> ContentType {
        let mut parts = value.split(';');
        let mimetype = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let charset = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("charset"))
            .map(|(_, v)| v.trim().trim_matches('"').to_ascii_lowercase())
            .unwrap_or_else(|| "utf-8".into());
        ContentType { mimetype, charset }
    }
}

fn decode(data: &str, charset: &str) -> Result<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| anyhow!("invalid base64 data: {e}"))?;
    match charset {
        "utf-8" | "utf8" | "us-ascii" | "ascii" => {
            String::from_utf8(bytes).map_err(|e| anyhow!("text is not valid {charset}: {e}"))
        }
        "iso-8859-1" | "latin1" | "latin-1" | "windows-1252" | "cp1252" => {
            Ok(bytes.iter().map(|&b| b as char).collect())
        }
        other => bail!("unsupported charset {other}"),
    }
}

/// The anonymized ids of a scrubbed note that a result row carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteIds {
    /// The note's resource type (DocumentReference or DiagnosticReport).
    pub note_type: String,
    pub note_id: String,
    pub encounter_id: String,
    pub subject_type: String,
    pub subject_id: String,
}

impl NoteIds {
    /// `<type>/<id>` of the note.
    pub fn note_ref(&self) -> String {
        format!("{}/{}", self.note_type, self.note_id)
    }

    /// `<type>/<id>` of the note's subject.
    pub fn subject_ref(&self) -> String {
        format!("{}/{}", self.subject_type, self.subject_id)
    }
}

/// The note's id, its first encounter and its subject (a typed reference); an error names
/// what is missing.
pub fn note_ids(note: &Value) -> Result<NoteIds, String> {
    let note_id = note
        .get("id")
        .and_then(Value::as_str)
        .ok_or("note without id")?
        .to_string();
    let note_type = note
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let encounter = note
        .pointer("/context/encounter/0/reference")
        .or_else(|| note.pointer("/encounter/reference"))
        .and_then(Value::as_str)
        .and_then(|r| r.rsplit_once('/'))
        .map(|(_, id)| id.to_string());
    let Some(encounter_id) = encounter else {
        return Err("no encounter".into());
    };
    let subject = note
        .pointer("/subject/reference")
        .and_then(Value::as_str)
        .and_then(|r| r.split_once('/'))
        .filter(|(t, id)| !t.is_empty() && !id.is_empty() && !t.starts_with('#'))
        .map(|(t, id)| {
            let id = id.rsplit('/').next().unwrap_or(id);
            let t = t.rsplit('/').next().unwrap_or(t);
            (t.to_string(), id.to_string())
        });
    let Some((subject_type, subject_id)) = subject else {
        return Err("no typed subject reference".into());
    };
    Ok(NoteIds {
        note_type,
        note_id,
        encounter_id,
        subject_type,
        subject_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(s: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn best_attachment_and_charset() {
        let note = json!({"resourceType": "DocumentReference", "content": [
            {"attachment": {"contentType": "text/html", "data": b64(b"<p>html</p>")}},
            {"attachment": {"contentType": "text/plain; charset=iso-8859-1", "data": b64(b"caf\xe9 \xbf ok ")}},
        ]});
        // `¿` stays: upstream replaces it in i2b2 notes only (where the i2b2 reader does).
        assert_eq!(note_text(&note).unwrap(), "café ¿ ok");
        let html = json!({"resourceType": "DocumentReference", "content": [
            {"attachment": {"contentType": "application/xhtml+xml", "data": b64(b"x")}},
            {"attachment": {"contentType": "text/html", "data": b64(b"<html><style>p{}</style><p>Denies&nbsp;fever</p><p>Cough &amp; cold</p></html>")}},
        ]});
        // As inscriptis: paragraphs a blank line apart, a no-break space collapsed.
        assert_eq!(note_text(&html).unwrap(), "Denies fever\n\nCough & cold");
        let remote = json!({"resourceType": "DocumentReference", "content": [
            {"attachment": {"contentType": "text/plain", "url": "http://x"}}]});
        assert_eq!(note_text(&remote), Err(TextError::RemoteOnly));
        let report = json!({"resourceType": "DiagnosticReport", "presentedForm": [
            {"contentType": "text/plain", "data": b64(b" report ")}]});
        assert_eq!(note_text(&report).unwrap(), "report");
        let bad = json!({"resourceType": "DocumentReference", "content": [
            {"attachment": {"contentType": "text/plain", "data": b64(b"\xff")}}]});
        assert!(matches!(note_text(&bad), Err(TextError::Unreadable(_))));
    }

    #[test]
    fn selection_needs_status_and_an_ed_code() {
        let study = crate::nlp::study::find_study("covid_symptom__nlp_results").unwrap();
        let mut note = json!({"resourceType": "DocumentReference", "id": "1",
            "type": {"coding": [{"system": "http://loinc.org", "code": "34111-5"}]}});
        assert!(is_selected(&study.source, &note));
        note["status"] = json!("superseded");
        assert!(!is_selected(&study.source, &note));
        note["status"] = json!("current");
        note["docStatus"] = json!("preliminary");
        assert!(!is_selected(&study.source, &note));
        let by_category = json!({"resourceType": "DocumentReference", "id": "1", "docStatus": "final",
            "category": [{"coding": [{"system": "http://cumulus.smarthealthit.org/i2b2", "code": "NOTE:3807712"}]}]});
        assert!(is_selected(&study.source, &by_category));
        let other = json!({"resourceType": "DocumentReference", "id": "1",
            "type": {"coding": [{"system": "http://loinc.org", "code": "11506-3"}]}});
        assert!(!is_selected(&study.source, &other));
    }

    #[test]
    fn ids_of_a_note() {
        let note = json!({"resourceType": "DocumentReference", "id": "d",
            "context": {"encounter": [{"reference": "Encounter/e"}]},
            "subject": {"reference": "Patient/p"}});
        let ids = note_ids(&note).unwrap();
        assert_eq!(
            ids,
            NoteIds {
                note_type: "DocumentReference".into(),
                note_id: "d".into(),
                encounter_id: "e".into(),
                subject_type: "Patient".into(),
                subject_id: "p".into()
            }
        );
        assert_eq!(ids.note_ref(), "DocumentReference/d");
        assert_eq!(ids.subject_ref(), "Patient/p");
        assert_eq!(note_ids(&json!({"id": "d"})).unwrap_err(), "no encounter");
    }
}
