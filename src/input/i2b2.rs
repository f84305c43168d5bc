//! i2b2 warehouse exports (CSV files) as FHIR, mapped as Cumulus ETL's i2b2 loader maps them.
//! Each CSV is streamed by one source worker: records become FHIR resources serialized as
//! NDJSON lines in memory, which then go through the same de-identification and sinks as a
//! bulk export. Nothing is written to disk in between.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Read;

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use super::discovery::{InputFile, Listing};

/// The i2b2 code system for codes without a standard one.
const I2B2_SYSTEM: &str = "http://cumulus.smarthealthit.org/i2b2";
const US_CORE: &str = "http://hl7.org/fhir/us/core/StructureDefinition/";
const RACE_SYSTEM: &str = "urn:oid:2.16.840.1.113883.6.238";

/// The CSV files of an i2b2 export, in the order Cumulus ETL reads them, and their resources.
pub const I2B2_FILES: [(&str, &str); 7] = [
    ("patient_dimension.csv", "Patient"),
    ("visit_dimension.csv", "Encounter"),
    ("observation_fact_diagnosis.csv", "Condition"),
    ("observation_fact_lab_views.csv", "Observation"),
    ("observation_fact_vitals.csv", "Observation"),
    ("observation_fact_medications.csv", "MedicationRequest"),
    ("observation_fact_notes.csv", "DocumentReference"),
];

/// The CSVs present at the top of the input; a missing one is reported and skipped, as
/// upstream.
pub fn discover_i2b2(listing: &Listing, wanted: &HashSet<String>) -> Vec<InputFile> {
    let mut files = Vec::new();
    for (name, resource) in I2B2_FILES {
        if !wanted.contains(resource) {
            continue;
        }
        match listing.under(name).find(|(object, _)| object.key() == name) {
            Some((object, size)) => files.push(InputFile {
                object,
                resource_type: resource.to_string(),
                size,
            }),
            None => crate::say!("No {}, skipping.", listing.root.url_of(name)),
        }
    }
    files
}

/// True for the CSV files this module reads.
pub fn is_i2b2_csv(file_name: &str) -> bool {
    I2B2_FILES.iter().any(|(f, _)| *f == file_name)
}

/// A CSV row that could not be converted: its line and why (never its values).
#[derive(Debug, Clone, PartialEq)]
pub struct BadRow {
    pub line: u64,
    pub reason: String,
    pub duplicate: bool,
}

/// Reads an i2b2 CSV a bundle at a time, yielding FHIR resources as NDJSON lines.
pub struct CsvToFhir {
    records: csv::StringRecordsIntoIter<Box<dyn Read + Send>>,
    header: Vec<String>,
    kind: &'static str,
    /// Fingerprints of the ids written so far: the first row with an id wins, as upstream.
    seen: HashSet<u64>,
    pub finished: bool,
    /// The CSV line of the next record (1-based, the header is line 1).
    pub next_line: u64,
}

impl CsvToFhir {
    /// Opens a CSV of the given resource type.
    pub fn open(file: &InputFile, reader: Box<dyn Read + Send>) -> Result<CsvToFhir> {
        let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
        let header = csv
            .headers()
            .with_context(|| format!("{}: reading the CSV header", file.name()))?
            .iter()
            .map(|h| h.trim().to_uppercase())
            .collect();
        let file_name = file.object.file_name();
        let kind = I2B2_FILES
            .iter()
            .find(|(f, _)| *f == file_name)
            .map(|(f, _)| *f)
            .unwrap_or("");
        Ok(CsvToFhir {
            records: csv.into_records(),
            header,
            kind,
            seen: HashSet::new(),
            finished: false,
            next_line: 2,
        })
    }

    /// Appends NDJSON lines to `buf` until it holds `bundle_bytes` or the file ends. Returns the
    /// rows that were skipped, and a read error that ended the file, if any.
    pub fn next_bundle(
        &mut self,
        buf: &mut Vec<u8>,
        bundle_bytes: usize,
    ) -> (Vec<BadRow>, Option<(u64, String)>) {
        let mut bad = Vec::new();
        while buf.len() < bundle_bytes {
            let Some(record) = self.records.next() else {
                self.finished = true;
                break;
            };
            let record = match record {
                Ok(r) => r,
                Err(e) => {
                    self.finished = true;
                    let line = e.position().map(|p| p.line()).unwrap_or(self.next_line);
                    return (
                        bad,
                        Some((line, format!("not readable as CSV: {}", csv_error_kind(&e)))),
                    );
                }
            };
            let line = record
                .position()
                .map(|p| p.line())
                .unwrap_or(self.next_line);
            self.next_line = line + 1;
            let row = Row {
                header: &self.header,
                record: &record,
            };
            match convert(self.kind, &row) {
                Ok(resource) => {
                    let id = resource["id"].as_str().unwrap_or_default();
                    let mut hasher = std::hash::DefaultHasher::new();
                    id.hash(&mut hasher);
                    if !self.seen.insert(hasher.finish()) {
                        bad.push(BadRow {
                            line,
                            reason: "an earlier row has the same id".into(),
                            duplicate: true,
                        });
                        continue;
                    }
                    serde_json::to_writer(&mut *buf, &resource).expect("JSON to memory");
                    buf.push(b'\n');
                }
                Err(reason) => bad.push(BadRow {
                    line,
                    reason,
                    duplicate: false,
                }),
            }
        }
        (bad, None)
    }
}

/// A short, value-free description of a CSV read error.
fn csv_error_kind(e: &csv::Error) -> &'static str {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "invalid UTF-8",
        csv::ErrorKind::Io(_) => "read error",
        _ => "malformed record",
    }
}

/// One CSV record with its header.
struct Row<'a> {
    header: &'a [String],
    record: &'a csv::StringRecord,
}

impl Row<'_> {
    /// The cell of a column, trimmed; empty cells (and missing columns) are None.
    fn get(&self, column: &str) -> Option<&str> {
        let i = self.header.iter().position(|h| h == column)?;
        let v = self.record.get(i)?.trim();
        (!v.is_empty()).then_some(v)
    }

    fn require(&self, column: &str) -> Result<&str, String> {
        self.get(column).ok_or_else(|| format!("missing {column}"))
    }

    /// The date part of a datetime cell (its first 10 characters).
    fn date(&self, column: &str) -> Option<String> {
        self.get(column).map(|d| d.chars().take(10).collect())
    }

    fn patient_ref(&self) -> Result<Value, String> {
        Ok(json!({"reference": format!("Patient/{}", self.require("PATIENT_NUM")?)}))
    }

    fn encounter_ref(&self) -> Result<Value, String> {
        Ok(json!({"reference": format!("Encounter/{}", self.require("ENCOUNTER_NUM")?)}))
    }
}

/// A CodeableConcept with one coding; the display is left out when absent, as upstream now does.
fn concept(code: &str, system: &str, display: Option<&str>) -> Value {
    let mut coding = Map::new();
    coding.insert("code".into(), code.into());
    coding.insert("system".into(), system.into());
    if let Some(d) = display {
        coding.insert("display".into(), d.into());
    }
    json!({"coding": [coding]})
}

fn profile(name: &str) -> Value {
    json!({"profile": [format!("{US_CORE}{name}")]})
}

fn convert(kind: &str, row: &Row<'_>) -> Result<Value, String> {
    match kind {
        "patient_dimension.csv" => patient(row),
        "visit_dimension.csv" => encounter(row),
        "observation_fact_diagnosis.csv" => condition(row),
        "observation_fact_lab_views.csv" => lab(row),
        "observation_fact_vitals.csv" => vital(row),
        "observation_fact_medications.csv" => medication_request(row),
        "observation_fact_notes.csv" => document_reference(row),
        other => Err(format!("no mapping for {other}")),
    }
}

fn insert_some(resource: &mut Map<String, Value>, key: &str, value: Option<impl Into<Value>>) {
    if let Some(v) = value {
        resource.insert(key.into(), v.into());
    }
}

fn patient(row: &Row<'_>) -> Result<Value, String> {
    let mut p = Map::new();
    p.insert("resourceType".into(), "Patient".into());
    p.insert("id".into(), row.require("PATIENT_NUM")?.into());
    p.insert("meta".into(), profile("us-core-patient"));
    insert_some(&mut p, "birthDate", row.date("BIRTH_DATE"));
    insert_some(&mut p, "deceasedDateTime", row.date("DEATH_DATE"));
    let gender = match row.get("SEX_CD") {
        Some("F") => "female",
        Some("M") => "male",
        Some("U") => "unknown",
        _ => "other",
    };
    p.insert("gender".into(), gender.into());
    let mut address = Map::new();
    address.insert("country".into(), "US".into());
    insert_some(&mut address, "postalCode", row.get("ZIP_CD"));
    p.insert("address".into(), json!([address]));
    if let Some(race) = row.get("RACE_CD") {
        let category = |url: &str, code: &str, system: &str| {
            json!([{
                "url": format!("{US_CORE}{url}"),
                "extension": [{"url": "ombCategory",
                               "valueCoding": {"system": system, "code": code, "display": race}}]
            }])
        };
        let null_flavor = "http://terminology.hl7.org/CodeSystem/v3-NullFlavor";
        // Ethnicity replaces race for the values in both maps, as upstream.
        let ethnicity = match race {
            "Hispanic or Latino" => Some(("2135-2", RACE_SYSTEM)),
            "Not Hispanic or Latino" => Some(("2186-5", RACE_SYSTEM)),
            "Declined to Answer" | "Unable to Answer" => Some(("ASKU", null_flavor)),
            "Unknown" => Some(("UNK", null_flavor)),
            _ => None,
        };
        let race_code = match race {
            "White" => Some(("2106-3", RACE_SYSTEM)),
            "Black or African American" => Some(("2054-5", RACE_SYSTEM)),
            "American Indian or Alaska Native" => Some(("1002-5", RACE_SYSTEM)),
            "Asian" => Some(("2028-9", RACE_SYSTEM)),
            "Native Hawaiian or Other Pacific Islander" => Some(("2076-8", RACE_SYSTEM)),
            "Other" => Some(("2131-1", RACE_SYSTEM)),
            _ => None,
        };
        if let Some((code, system)) = ethnicity {
            p.insert(
                "extension".into(),
                category("us-core-ethnicity", code, system),
            );
        } else if let Some((code, system)) = race_code {
            p.insert("extension".into(), category("us-core-race", code, system));
        }
    }
    Ok(Value::Object(p))
}

fn encounter(row: &Row<'_>) -> Result<Value, String> {
    let mut e = Map::new();
    e.insert("resourceType".into(), "Encounter".into());
    e.insert("id".into(), row.require("ENCOUNTER_NUM")?.into());
    e.insert("subject".into(), row.patient_ref()?);
    e.insert("meta".into(), profile("us-core-encounter"));
    e.insert("status".into(), "unknown".into());
    let mut period = Map::new();
    insert_some(&mut period, "start", row.date("START_DATE"));
    insert_some(&mut period, "end", row.date("END_DATE"));
    e.insert("period".into(), Value::Object(period));
    e.insert(
        "type".into(),
        json!([concept(
            "308335008",
            "http://snomed.info/sct",
            Some("Patient encounter procedure")
        )]),
    );
    if let Some(days) = row.get("LENGTH_OF_STAY") {
        let value: f64 = days
            .parse()
            .map_err(|_| "LENGTH_OF_STAY is not a number".to_string())?;
        e.insert("length".into(), json!({"unit": "d", "value": value}));
    }
    let class = match row.get("INOUT_CD") {
        Some("Day Surgery" | "Outpatient" | "Recurring Outpatient Series") => "AMB",
        Some("Emergency") => "EMER",
        Some("Inpatient") => "IMP",
        Some("Observation") => "OBSENC",
        _ => "?",
    };
    e.insert(
        "class".into(),
        json!({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": class}),
    );
    Ok(Value::Object(e))
}

fn condition(row: &Row<'_>) -> Result<Value, String> {
    let concept_cd = row.require("CONCEPT_CD")?;
    let mut parts = concept_cd.split(':');
    let (Some(prefix), Some(code), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err("CONCEPT_CD must have exactly one colon".into());
    };
    let system = match prefix {
        "ICD10" | "ICD-10" => Some("http://hl7.org/fhir/sid/icd-10-cm"),
        "ICD10PROC" => Some("http://hl7.org/fhir/sid/icd-10-pcs"),
        "ICD9" | "ICD-9" => Some("http://hl7.org/fhir/sid/icd-9-cm"),
        "ICD9PROC" => Some("http://hl7.org/fhir/sid/icd-9-pcs"),
        "SNOMED" | "SNOMED-CT" | "SNOMEDCT" | "SCT" => Some("http://snomed.info/sct"),
        _ => None,
    };
    let code = match system {
        // Upstream names ICD-10-CM and ICD-9-CM codes from its own table; this tool has the
        // ICD-10-CM one only (docs/i2b2.md).
        Some(system @ "http://hl7.org/fhir/sid/icd-10-cm") => {
            concept(code, system, Some(super::icd10cm::display(code)))
        }
        Some(system) => concept(code, system, None),
        None => concept(concept_cd, I2B2_SYSTEM, None),
    };
    let mut c = Map::new();
    c.insert("resourceType".into(), "Condition".into());
    c.insert("id".into(), row.require("INSTANCE_NUM")?.into());
    c.insert("subject".into(), row.patient_ref()?);
    c.insert("encounter".into(), row.encounter_ref()?);
    c.insert("meta".into(), profile("us-core-condition"));
    c.insert(
        "category".into(),
        json!([concept(
            "encounter-diagnosis",
            "http://terminology.hl7.org/CodeSystem/condition-category",
            Some("Encounter Diagnosis")
        )]),
    );
    insert_some(&mut c, "recordedDate", row.date("START_DATE"));
    c.insert(
        "clinicalStatus".into(),
        concept(
            "active",
            "http://terminology.hl7.org/CodeSystem/condition-clinical",
            None,
        ),
    );
    c.insert(
        "verificationStatus".into(),
        concept(
            "unconfirmed",
            "http://terminology.hl7.org/CodeSystem/condition-ver-status",
            None,
        ),
    );
    c.insert("code".into(), code);
    Ok(Value::Object(c))
}

fn observation_base(row: &Row<'_>, category: &str) -> Result<Map<String, Value>, String> {
    let mut o = Map::new();
    o.insert("resourceType".into(), "Observation".into());
    o.insert("id".into(), row.require("INSTANCE_NUM")?.into());
    o.insert("subject".into(), row.patient_ref()?);
    o.insert("encounter".into(), row.encounter_ref()?);
    o.insert(
        "category".into(),
        json!([concept(
            category,
            "http://terminology.hl7.org/CodeSystem/observation-category",
            None
        )]),
    );
    insert_some(&mut o, "effectiveDateTime", row.date("START_DATE"));
    o.insert("status".into(), "unknown".into());
    Ok(o)
}

fn lab(row: &Row<'_>) -> Result<Value, String> {
    let mut o = observation_base(row, "laboratory")?;
    let concept_cd = row.require("CONCEPT_CD")?;
    let loinc = match concept_cd {
        "LAB:1043473617" => Some("94500-6"),
        "LAB:1044804335" => Some("94309-2"),
        "LAB:1044704735" => Some("94531-1"),
        "LAB:1134792565" => Some("95406-5"),
        "LAB:1148457675" => Some("94306-8"),
        "LAB:467288722" => Some("85477-8"),
        "LAB:152831642" => Some("85476-0"),
        "LAB:467288694" => Some("85478-6"),
        "LAB:467288700" => Some("85479-4"),
        "LAB:13815125" => Some("62462-7"),
        _ => None,
    };
    o.insert(
        "code".into(),
        match loinc {
            Some(code) => concept(code, "http://loinc.org", None),
            None => concept(concept_cd, I2B2_SYSTEM, None),
        },
    );
    if let Some(value) = row.get("TVAL_CHAR") {
        let snomed = match value.to_lowercase().as_str() {
            "positive" => Some("10828004"),
            "negative" => Some("260385009"),
            "absent" => Some("272519000"),
            _ => None,
        };
        let system = snomed.map_or(I2B2_SYSTEM, |_| "http://snomed.info/sct");
        o.insert(
            "valueCodeableConcept".into(),
            concept(snomed.unwrap_or(value), system, Some(value)),
        );
    }
    Ok(Value::Object(o))
}

fn vital(row: &Row<'_>) -> Result<Value, String> {
    let mut o = observation_base(row, "vital-signs")?;
    o.insert(
        "code".into(),
        concept(row.require("CONCEPT_CD")?, I2B2_SYSTEM, None),
    );
    match row.get("VALTYPE_CD") {
        Some("T") => insert_some(
            &mut o,
            "valueCodeableConcept",
            row.get("TVAL_CHAR").map(|v| concept(v, I2B2_SYSTEM, None)),
        ),
        Some("B") => insert_some(
            &mut o,
            "valueCodeableConcept",
            row.get("OBSERVATION_BLOB")
                .map(|v| concept(v, I2B2_SYSTEM, None)),
        ),
        Some("N") => {
            let comparator = match row.get("TVAL_CHAR") {
                Some("L") => Some(Some("<")),
                Some("LE") => Some(Some("<=")),
                Some("GE") => Some(Some(">=")),
                Some("G") => Some(Some(">")),
                Some("E") | None => Some(None),
                Some(_) => None,
            };
            // An unknown comparator drops the whole value, as upstream.
            if let Some(comparator) = comparator {
                let value: f64 = row
                    .require("NVAL_NUM")?
                    .parse()
                    .map_err(|_| "NVAL_NUM is not a number".to_string())?;
                let mut quantity = Map::new();
                quantity.insert("value".into(), value.into());
                if let Some(unit) = row.get("UNITS_CD") {
                    quantity.insert("unit".into(), unit.into());
                    if let Some(code) = ucum(unit) {
                        quantity.insert("system".into(), "http://unitsofmeasure.org".into());
                        quantity.insert("code".into(), code.into());
                    }
                }
                insert_some(&mut quantity, "comparator", comparator);
                o.insert("valueQuantity".into(), Value::Object(quantity));
            }
        }
        _ => {}
    }
    Ok(Value::Object(o))
}

/// The UCUM code of an i2b2 vital-signs unit.
fn ucum(unit: &str) -> Option<&'static str> {
    Some(match unit {
        "%" => "%",
        "bpm" | "br/min" => "/min",
        "cm" => "cm",
        "DegC" => "Cel",
        "DegF" => "[degF]",
        "in" => "[in_i]",
        "kg" => "kg",
        "kg/m2" => "kg/m2",
        "lb" => "[lb_av]",
        "mmHg" => "mm[Hg]",
        _ => return None,
    })
}

fn medication_request(row: &Row<'_>) -> Result<Value, String> {
    let concept_cd = row.require("CONCEPT_CD")?;
    let mut m = Map::new();
    m.insert("resourceType".into(), "MedicationRequest".into());
    m.insert("id".into(), row.require("INSTANCE_NUM")?.into());
    m.insert("status".into(), "unknown".into());
    m.insert("intent".into(), "order".into());
    m.insert(
        "medicationCodeableConcept".into(),
        concept(concept_cd, I2B2_SYSTEM, Some(concept_cd)),
    );
    m.insert("subject".into(), row.patient_ref()?);
    m.insert("encounter".into(), row.encounter_ref()?);
    insert_some(&mut m, "authoredOn", row.date("START_DATE"));
    Ok(Value::Object(m))
}

fn document_reference(row: &Row<'_>) -> Result<Value, String> {
    use base64::Engine;
    let text = row.get("OBSERVATION_BLOB").unwrap_or("").replace('¿', " ");
    let mut period = Map::new();
    insert_some(&mut period, "start", row.date("START_DATE"));
    insert_some(&mut period, "end", row.date("END_DATE"));
    let mut d = Map::new();
    d.insert("resourceType".into(), "DocumentReference".into());
    d.insert("id".into(), row.require("INSTANCE_NUM")?.into());
    d.insert("subject".into(), row.patient_ref()?);
    d.insert(
        "context".into(),
        json!({"encounter": [row.encounter_ref()?], "period": period}),
    );
    d.insert(
        "type".into(),
        concept(
            row.require("CONCEPT_CD")?,
            I2B2_SYSTEM,
            row.get("TVAL_CHAR"),
        ),
    );
    d.insert("status".into(), "current".into());
    d.insert(
        "content".into(),
        json!([{"attachment": {
            "contentType": "text/plain",
            "data": base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
        }}]),
    );
    Ok(Value::Object(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_csv(kind: &str, text: &str) -> (Vec<Value>, Vec<BadRow>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(kind);
        std::fs::write(&path, text).unwrap();
        let root = crate::store::ObjectLocation::local(dir.path()).unwrap();
        let file = InputFile {
            object: root.object(kind),
            resource_type: "x".into(),
            size: 0,
        };
        let mut reader =
            CsvToFhir::open(&file, Box::new(std::fs::File::open(&path).unwrap())).unwrap();
        let mut buf = Vec::new();
        let (bad, error) = reader.next_bundle(&mut buf, 1 << 20);
        assert!(error.is_none());
        let rows = buf
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect();
        (rows, bad)
    }

    #[test]
    fn bad_rows_are_reported_with_their_line_and_the_rest_converted() {
        let (rows, bad) = convert_csv(
            "observation_fact_diagnosis.csv",
            "INSTANCE_NUM,PATIENT_NUM,ENCOUNTER_NUM,CONCEPT_CD,START_DATE\n\
             1,10,20,ICD10:A00,2020-01-01\n\
             2,10,20,ICD10:A:00,2020-01-01\n\
             ,10,20,ICD10:A00,2020-01-01\n\
             1,10,20,ICD10:B00,2020-01-01\n\
             \"3\",10,20,\"SNOMED:123\",2020-01-01 10:00:00\n",
        );
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[1]["code"]["coding"][0]["system"],
            "http://snomed.info/sct"
        );
        let lines: Vec<(u64, bool)> = bad.iter().map(|b| (b.line, b.duplicate)).collect();
        assert_eq!(lines, [(3, false), (4, false), (5, true)]);
        assert!(bad[0].reason.contains("colon"));
        assert!(bad[1].reason.contains("INSTANCE_NUM"));
    }

    #[test]
    fn quoted_notes_with_newlines_stay_one_record() {
        let (rows, bad) = convert_csv(
            "observation_fact_notes.csv",
            "INSTANCE_NUM,PATIENT_NUM,ENCOUNTER_NUM,CONCEPT_CD,START_DATE,TVAL_CHAR,OBSERVATION_BLOB\n\
             7,1,2,NOTE:1,2020-01-01,Note,\"line one\nline ¿two\"\n",
        );
        assert!(bad.is_empty());
        let data = rows[0]["content"][0]["attachment"]["data"]
            .as_str()
            .unwrap();
        use base64::Engine;
        let text = base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap();
        assert_eq!(String::from_utf8(text).unwrap(), "line one\nline  two");
    }
}
