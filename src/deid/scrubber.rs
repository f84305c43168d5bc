//! Applies the allow-list rules to one resource, in place: drops what is not allowed, hashes ids
//! and references, generalizes dates and zips, masks notes, and rejects resources it cannot
//! safely understand.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use super::codebook::Codebook;
use super::rules::{FieldRules, Filter, Rules, Treatment};

const DATA_ABSENT_URL: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
const EPIC_CUSTOM_SYSTEM_PREFIX: &str = "urn:oid:1.2.840.114350.";
const RESTRICTED_ZIP_PREFIXES: [&str; 14] = [
    "036", "059", "102", "203", "205", "369", "556", "692", "821", "823", "878", "879", "884",
    "893",
];

/// Why a whole resource was left out of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Not a JSON object with a resourceType (or nothing left after scrubbing).
    NotAResource,
    /// A modifierExtension we do not understand changes the meaning of the resource.
    UnknownModifierExtension(String),
    /// A field's shape does not match the FHIR type the rules expect.
    StructureMismatch(String),
    /// A reference that is neither relative, contained, nor typed.
    BadReference(String),
}

impl Rejection {
    /// A short, PHI-free reason used for counting and messages.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotAResource => "not a FHIR resource",
            Rejection::UnknownModifierExtension(_) => "unknown modifierExtension",
            Rejection::StructureMismatch(_) => "unexpected structure",
            Rejection::BadReference(_) => "unparseable reference",
        }
    }

    /// Detail safe to log: field names and extension URLs, never values.
    pub fn detail(&self) -> String {
        match self {
            Rejection::NotAResource => String::new(),
            Rejection::UnknownModifierExtension(url) => url.clone(),
            Rejection::StructureMismatch(field) => format!("field {field}"),
            Rejection::BadReference(field) => format!("field {field}"),
        }
    }
}

/// Extensions seen during scrubbing, for the end-of-run report (resource type, url) -> count.
#[derive(Debug, Default, Clone)]
pub struct ExtensionReport {
    pub dropped: BTreeMap<(String, String), u64>,
    pub skipped_modifiers: BTreeMap<(String, String), u64>,
}

impl ExtensionReport {
    /// Adds another worker's counts into this one.
    pub fn merge(&mut self, other: &ExtensionReport) {
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.skipped_modifiers {
            *self.skipped_modifiers.entry(k.clone()).or_default() += v;
        }
    }
}

/// Shared by all workers; per-call state lives in the `ExtensionReport` passed in.
pub struct Scrubber {
    rules: Rules,
    codebook: Arc<Codebook>,
    mask_notes: bool,
    backbone: Treatment,
}

enum Skip {
    /// Drop this value.
    Value,
    /// Drop this value and mark its `_field` as masked.
    Mask,
    /// Drop this value and mark the parent element as masked (Epic custom codes).
    MarkParent,
    /// Drop the whole resource.
    Resource(Rejection),
}

impl Scrubber {
    /// `mask_notes` is true for the ETL and false for NLP, which needs the note text.
    pub fn new(rules: Rules, codebook: Arc<Codebook>, mask_notes: bool) -> Scrubber {
        let backbone = Treatment::Nested {
            type_name: Arc::from("BackboneElement"),
            filter: None,
        };
        Scrubber {
            rules,
            codebook,
            mask_notes,
            backbone,
        }
    }

    /// The codebook ids are drawn from.
    pub fn codebook(&self) -> &Arc<Codebook> {
        &self.codebook
    }

    /// De-identifies `resource` in place, or says why it must be left out.
    pub fn scrub(
        &self,
        resource: &mut Value,
        report: &mut ExtensionReport,
    ) -> Result<(), Rejection> {
        match self.scrub_resource(resource, report) {
            Ok(()) => Ok(()),
            Err(Skip::Resource(r)) => Err(r),
            Err(_) => Err(Rejection::NotAResource),
        }
    }

    fn scrub_resource(&self, node: &mut Value, report: &mut ExtensionReport) -> Result<(), Skip> {
        let Value::Object(map) = node else {
            return Err(Skip::Value);
        };
        let resource_type = match map.get("resourceType") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(v) if is_truthy(v) => return Err(Skip::Resource(mismatch("resourceType"))),
            _ => return Err(Skip::Value),
        };
        let (rtype, fields) = self.rules.resource_fields(&resource_type);
        let rtype = rtype.to_string();
        self.scrub_node(&rtype, fields, map, None, false, report)
    }

    fn scrub_node(
        &self,
        rtype: &str,
        fields: &FieldRules,
        node: &mut Map<String, Value>,
        filter: Option<&Filter>,
        inside_extension: bool,
        report: &mut ExtensionReport,
    ) -> Result<(), Skip> {
        if let Some(filter) = filter {
            let matches = match node.get(&filter.field) {
                Some(Value::String(s)) => filter.values.contains(s),
                _ => false,
            };
            if !matches {
                return Err(Skip::Value);
            }
        }
        let keys: Vec<String> = node.keys().cloned().collect();
        for key in keys {
            let Some(slot) = node.get_mut(&key) else {
                continue;
            };
            let value = std::mem::take(slot);
            if value.is_null() {
                node.shift_remove(&key);
                continue;
            }
            let treatment = match key.strip_prefix('_') {
                Some(base) if fields.contains_key(base) => Some(&self.backbone),
                Some(_) => None,
                None => fields.get(&key),
            };
            let Some(treatment) = treatment else {
                node.shift_remove(&key);
                continue;
            };
            let (is_list, items) = match value {
                Value::Array(items) => (true, items),
                other => (false, vec![other]),
            };
            let mut kept = Vec::with_capacity(items.len());
            for item in items {
                let outcome =
                    self.scrub_value(rtype, treatment, node, &key, item, inside_extension, report);
                match outcome {
                    Ok(v) => kept.push(v),
                    Err(Skip::Value) => {}
                    Err(Skip::Mask) => {
                        let marker = node.entry(format!("_{key}")).or_insert_with(|| json!({}));
                        if let Value::Object(m) = marker {
                            add_data_absent_extension(m);
                        }
                    }
                    Err(Skip::MarkParent) => add_data_absent_extension(node),
                    Err(skip @ Skip::Resource(_)) => return Err(skip),
                }
            }
            if kept.is_empty() {
                node.shift_remove(&key);
            } else if let Some(slot) = node.get_mut(&key) {
                *slot = if is_list {
                    Value::Array(kept)
                } else {
                    kept.pop().expect("one value")
                };
            }
        }
        if node.is_empty() {
            Err(Skip::Value)
        } else {
            Ok(())
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn scrub_value(
        &self,
        rtype: &str,
        treatment: &Treatment,
        parent: &Map<String, Value>,
        key: &str,
        mut value: Value,
        inside_extension: bool,
        report: &mut ExtensionReport,
    ) -> Result<Value, Skip> {
        let is_node = value.is_object();
        if treatment.is_leaf() == is_node {
            return Err(Skip::Resource(mismatch(key)));
        }
        if treatment.is_leaf() {
            let mut treatment = treatment;
            if let Treatment::Coded(inner) = treatment {
                if !system_allows(key, &value, parent) {
                    return Err(Skip::MarkParent);
                }
                treatment = inner;
            }
            let raw = value.clone();
            if let Value::String(s) = &mut value {
                let trimmed = s.trim();
                if trimmed.is_empty() {
                    return Err(Skip::Value);
                }
                if trimmed.len() != s.len() {
                    *s = trimmed.to_string();
                }
            }
            return match treatment {
                Treatment::Keep | Treatment::FreeText => Ok(value),
                Treatment::Mask => Err(Skip::Mask),
                Treatment::MaskNote if self.mask_notes => Err(Skip::Mask),
                Treatment::MaskNote => Ok(value),
                Treatment::AnonId => {
                    let id = value
                        .as_str()
                        .ok_or_else(|| Skip::Resource(mismatch(key)))?;
                    Ok(Value::String(self.codebook.fake_id(rtype, id, true)))
                }
                Treatment::AnonRef => self.anon_ref(&raw, parent, key).map(Value::String),
                Treatment::Year => {
                    let s = value
                        .as_str()
                        .ok_or_else(|| Skip::Resource(mismatch(key)))?;
                    Ok(Value::String(s.chars().take(4).collect()))
                }
                Treatment::Zip => {
                    let s = value
                        .as_str()
                        .ok_or_else(|| Skip::Resource(mismatch(key)))?;
                    Ok(Value::String(generalize_zip(s)))
                }
                Treatment::Coded(_) | Treatment::Nested { .. } | Treatment::Resource => {
                    Err(Skip::Resource(mismatch(key)))
                }
            };
        }
        match treatment {
            Treatment::Resource => {
                self.scrub_resource(&mut value, report)?;
                Ok(value)
            }
            Treatment::Nested { type_name, filter } => {
                let fields = self
                    .rules
                    .fields(type_name)
                    .expect("rules validated at load");
                let Value::Object(map) = &mut value else {
                    unreachable!("checked is_node")
                };
                let mut inside = inside_extension;
                if type_name.as_ref() == "Extension" && !inside_extension {
                    self.check_extension(rtype, key, map, report)?;
                    inside = true;
                }
                self.scrub_node(rtype, fields, map, filter.as_ref(), inside, report)?;
                Ok(value)
            }
            _ => Err(Skip::Resource(mismatch(key))),
        }
    }

    /// Only the outermost extension of a chain is checked against the URL lists.
    fn check_extension(
        &self,
        rtype: &str,
        key: &str,
        ext: &Map<String, Value>,
        report: &mut ExtensionReport,
    ) -> Result<(), Skip> {
        let url = ext.get("url").and_then(Value::as_str).unwrap_or("");
        let count_key = (rtype.to_string(), url.to_string());
        if key == "modifierExtension" {
            if !self.rules.allowed_modifier_extensions.contains(url) {
                *report.skipped_modifiers.entry(count_key).or_default() += 1;
                return Err(Skip::Resource(Rejection::UnknownModifierExtension(
                    url.to_string(),
                )));
            }
        } else if !self.rules.allowed_extensions.contains(url) {
            if !self.rules.ignored_extensions.contains(url) {
                *report.dropped.entry(count_key).or_default() += 1;
            }
            return Err(Skip::Value);
        }
        Ok(())
    }

    /// `Type/id`, `Type?query`, `#contained`, or a bare id with a sibling `type`.
    fn anon_ref(
        &self,
        raw: &Value,
        parent: &Map<String, Value>,
        key: &str,
    ) -> Result<String, Skip> {
        let bad = || Skip::Resource(Rejection::BadReference(key.to_string()));
        let reference = raw.as_str().ok_or_else(bad)?;
        if let Some(contained) = reference.strip_prefix('#') {
            if contained.is_empty() {
                return Err(bad());
            }
            return Ok(format!("#{}", self.codebook.hash(contained)));
        }
        let sibling_type = match parent.get("type") {
            Some(Value::String(s)) if !s.is_empty() => Some(s.as_str()),
            _ => None,
        };
        if !is_relative_reference(reference) && sibling_type.is_none() {
            return Err(bad());
        }
        let (ref_type, real_id) = match reference.find(['/', '?']) {
            Some(at) => (Some(&reference[..at]), &reference[at + 1..]),
            None => (sibling_type, reference),
        };
        let (prefix, real_id) = match real_id.strip_prefix('#') {
            Some(rest) => ("#", rest),
            None => ("", real_id),
        };
        if real_id.is_empty() {
            return Err(bad());
        }
        let fake = match ref_type {
            Some(t) => self.codebook.fake_id(t, real_id, true),
            None => self.codebook.hash(real_id),
        };
        Ok(match ref_type {
            Some(t) => format!("{t}/{prefix}{fake}"),
            None => format!("{prefix}{fake}"),
        })
    }
}

fn mismatch(key: &str) -> Rejection {
    Rejection::StructureMismatch(key.to_string())
}

fn is_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
    }
}

/// Matches `[A-Za-z]+[/?].+` at the start of the string.
fn is_relative_reference(s: &str) -> bool {
    let letters = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    letters > 0 && matches!(s.as_bytes().get(letters), Some(b'/' | b'?')) && s.len() > letters + 1
}

fn add_data_absent_extension(node: &mut Map<String, Value>) {
    let list = node.entry("extension").or_insert_with(|| json!([]));
    let Value::Array(list) = list else { return };
    let present = list
        .iter()
        .any(|e| e.get("url").and_then(Value::as_str) == Some(DATA_ABSENT_URL));
    if !present {
        list.push(json!({"url": DATA_ABSENT_URL, "valueCode": "masked"}));
    }
}

/// Epic lets sites add free-text codes to its own code systems; such codes or displays can carry
/// PHI. Returns false when this `code`/`display` must be dropped.
/// `value` is the field being checked: its slot in `parent` is empty while it is scrubbed.
fn system_allows(key: &str, value: &Value, parent: &Map<String, Value>) -> bool {
    let system = parent.get("system").and_then(Value::as_str).unwrap_or("");
    if !system.starts_with(EPIC_CUSTOM_SYSTEM_PREFIX) {
        return true;
    }
    let sibling = |name: &str| {
        if key == name {
            Some(value)
        } else {
            parent.get(name)
        }
    };
    let code = sibling("code").filter(|v| is_truthy(v));
    let display = sibling("display").filter(|v| is_truthy(v));
    let (code_ok, display_ok) = match code {
        None => (true, display.is_none()),
        Some(Value::String(c)) if c == "0" && display.is_some() => (true, false),
        Some(Value::String(c)) if c.trim().parse::<i64>().is_err() => (false, false),
        Some(Value::String(_)) | Some(Value::Number(_)) => (true, true),
        Some(_) => (false, false),
    };
    match key {
        "code" => code_ok,
        "display" => display_ok,
        _ => true,
    }
}

/// Three-digit zip: restricted low-population prefixes become 000, later digits become 0.
pub fn generalize_zip(zip: &str) -> String {
    let first: String = zip.chars().take(3).collect();
    let rest = zip
        .chars()
        .skip(3)
        .map(|c| if ('1'..='9').contains(&c) { '0' } else { c });
    let prefix = if RESTRICTED_ZIP_PREFIXES.contains(&first.as_str()) {
        "000".to_string()
    } else {
        first
    };
    prefix.chars().chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubber() -> Scrubber {
        let cb = Arc::new(Codebook::in_memory("1234").unwrap());
        Scrubber::new(Rules::embedded().unwrap(), cb, true)
    }

    #[test]
    fn zip_generalization_matches_reference_examples() {
        assert_eq!(generalize_zip("02139"), "02100");
        assert_eq!(generalize_zip("69212"), "00000");
        assert_eq!(generalize_zip("9991 Båtsfjord"), "9990 Båtsfjord");
        assert_eq!(generalize_zip("9105 PZ"), "9100 PZ");
        assert_eq!(generalize_zip("3999"), "3990");
    }

    #[test]
    fn references_are_rewritten_or_rejected() {
        let s = scrubber();
        let mut r = ExtensionReport::default();
        let mut ok = json!({"resourceType": "Condition", "id": "c",
            "subject": {"reference": "Patient?identifier=x"},
            "encounter": {"reference": "123", "type": "Encounter"}});
        s.scrub(&mut ok, &mut r).unwrap();
        let cb = s.codebook();
        assert_eq!(
            ok["subject"]["reference"],
            format!("Patient/{}", cb.hash("identifier=x"))
        );
        assert_eq!(
            ok["encounter"]["reference"],
            format!("Encounter/{}", cb.hash("123"))
        );
        for bad in ["http://x.org/Patient/1", "1234"] {
            let mut v =
                json!({"resourceType": "Condition", "id": "c", "subject": {"reference": bad}});
            assert!(
                matches!(s.scrub(&mut v, &mut r), Err(Rejection::BadReference(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_modifier_extension_rejects_and_counts() {
        let s = scrubber();
        let mut r = ExtensionReport::default();
        let mut v = json!({"resourceType": "Patient", "id": "p",
            "modifierExtension": [{"url": "http://example.com/weird", "valueBoolean": true}]});
        let err = s.scrub(&mut v, &mut r).unwrap_err();
        assert_eq!(
            err,
            Rejection::UnknownModifierExtension("http://example.com/weird".into())
        );
        assert_eq!(
            r.skipped_modifiers[&("Patient".into(), "http://example.com/weird".into())],
            1
        );
    }

    #[test]
    fn epic_custom_codes_are_masked_on_the_coding() {
        let s = scrubber();
        let mut r = ExtensionReport::default();
        let mut v = json!({"resourceType": "Encounter", "id": "e", "class":
            {"system": "urn:oid:1.2.840.114350.1", "code": "Dr. Smith", "display": "Dr. Smith"}});
        s.scrub(&mut v, &mut r).unwrap();
        assert_eq!(
            v["class"],
            json!({"system": "urn:oid:1.2.840.114350.1", "extension":
            [{"url": DATA_ABSENT_URL, "valueCode": "masked"}]})
        );
    }

    #[test]
    fn empty_containers_and_nulls_are_removed() {
        let s = scrubber();
        let mut r = ExtensionReport::default();
        let mut v = json!({"resourceType": "Patient", "id": "p", "active": null,
            "maritalStatus": {"text": "  "}, "address": [{"city": "Boston"}]});
        s.scrub(&mut v, &mut r).unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["resourceType", "id"]
        );
    }
}
