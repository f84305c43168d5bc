//! The 28 de-identification fixture pairs of the reference implementation (salt bytes 0x12 0x34).

use std::path::Path;
use std::sync::Arc;

use cumulus_etl::deid::{Codebook, ExtensionReport, Rules, Scrubber};
use cumulus_etl::json::Tape;
use serde_json::Value;

#[test]
fn every_fixture_pair_matches_the_reference_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/conformance/deid");
    let codebook = Arc::new(Codebook::in_memory("1234").unwrap());
    let scrubber = Scrubber::new(Rules::embedded().unwrap(), codebook, true);
    let mut names: Vec<_> = std::fs::read_dir(root.join("input"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    names.sort();
    assert_eq!(names.len(), 28);
    let mut failures = Vec::new();
    for name in names {
        let input = std::fs::read(root.join("input").join(&name)).unwrap();
        let expected: Value =
            serde_json::from_slice(&std::fs::read(root.join("output").join(&name)).unwrap())
                .unwrap();
        let mut tape = Tape::default();
        let doc = tape.parse(&input).unwrap();
        let mut out = Vec::new();
        let mut report = ExtensionReport::default();
        match scrubber.scrub(&doc, &mut out, &mut report) {
            // Key order may differ from the reference's (tables are keyed by column name).
            Ok(_) if serde_json::from_slice::<Value>(&out).unwrap() == expected => {}
            Ok(_) => failures.push(format!(
                "{}:\n  got      {}\n  expected {}",
                name.to_string_lossy(),
                String::from_utf8_lossy(&out),
                expected
            )),
            Err(e) => failures.push(format!("{}: rejected ({e:?})", name.to_string_lossy())),
        }
    }
    assert!(
        failures.is_empty(),
        "{} fixtures differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn version0_codebook_fixture_loads_its_legacy_ids() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/conformance/codebook0/codebook.json");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&src, dir.path().join("codebook.json")).unwrap();
    let saved: Value = serde_json::from_slice(&std::fs::read(&src).unwrap()).unwrap();
    let (pid, pdata) = saved["mrn"].as_object().unwrap().iter().next().unwrap();
    let phi = cumulus_etl::store::objects::ObjectLocation::local(dir.path()).unwrap();
    let cb = Codebook::open(&phi, true).unwrap();
    assert_eq!(
        cb.fake_id("Patient", pid, true),
        pdata["deid"].as_str().unwrap()
    );
}
