//! A bounded property test of the per-line work (tape, checks, scrubber) on damaged lines of
//! every resource type of the sample: no line ever panics (an internal error), every line is
//! either written or skipped, every row written is JSON Python reads, and every line accepted is
//! one Python's reader accepts, and every line refused as JSON one it refuses (NaN, Infinity
//! and numbers beyond a double, which Python reads, are skipped with a reason of their own).

use std::sync::Arc;

use cumulus_etl::deid::{Codebook, ExtensionReport, Rules, Scrubber};
use cumulus_etl::engine::rows::{SkipReason, TableChunk, TaskContext};
use cumulus_etl::etl::rows::{BundleLines, process_bundle};
use cumulus_etl::input::line_numbers::FirstLine;
use cumulus_etl::output::TableKind;

use crate::mutate::{Rng, damage, python_accepts, sample_lines};

const RESOURCE_TYPES: [&str; 13] = [
    "AllergyIntolerance",
    "Condition",
    "Device",
    "DocumentReference",
    "Encounter",
    "Immunization",
    "Location",
    "MedicationRequest",
    "Organization",
    "Patient",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
];
/// Damaged lines per resource type and output kind.
const LINES_PER_TYPE: usize = 400;

/// What became of one line.
enum Fate {
    Written(Vec<u8>),
    Skipped(SkipReason, String),
}

fn process(scrubber: &Scrubber, ctx: &TaskContext, line: &[u8]) -> Fate {
    let mut main = TableChunk::new(0, &ctx.table);
    let mut skips = Vec::new();
    process_bundle(
        ctx,
        scrubber,
        BundleLines {
            path: "damaged.ndjson",
            bytes: line,
            first_line: FirstLine::Known(1),
        },
        (&mut main, &mut None),
        &mut ExtensionReport::default(),
        &mut |s| skips.push((s.reason, s.detail)),
        None,
    );
    match (main.rows().collect::<Vec<_>>().as_slice(), skips.pop()) {
        ([row], None) => Fate::Written(row.to_vec()),
        ([], Some((reason, detail))) if skips.is_empty() => Fate::Skipped(reason, detail),
        (rows, last) => panic!(
            "a line must give one row or one skip: {} rows, {:?} and {} more skips",
            rows.len(),
            last,
            skips.len()
        ),
    }
}

#[test]
fn damaged_lines_never_panic_and_agree_with_python() {
    let scrubber = Scrubber::new(
        Rules::embedded().unwrap(),
        Arc::new(Codebook::in_memory("5eed").unwrap()),
        true,
    );
    let mut rng = Rng::new(0x00c0_ffee);
    let (mut lines, mut fates) = (Vec::new(), Vec::new());
    for resource_type in RESOURCE_TYPES {
        for utf8_only in [false, true] {
            let ctx = TaskContext {
                task: 0,
                table: resource_type.to_lowercase(),
                resource_type: resource_type.to_string(),
                more_resource_types: Vec::new(),
                kind: TableKind::Fhir(resource_type.to_string()),
                whole_chunks: false,
                needs_shape: utf8_only,
                utf8_only,
                completion: None,
            };
            for (line, keep) in sample_lines(resource_type, "m", LINES_PER_TYPE) {
                // Some lines keep only a resource type, so ids and types are damaged too.
                let keep = if rng.below(4) == 0 { 2 } else { keep };
                let damaged = damage(&line, keep, &mut rng);
                fates.push(process(&scrubber, &ctx, &damaged));
                lines.push(damaged);
            }
        }
    }
    let python_reads_line = python_accepts(&lines);
    let written: Vec<Vec<u8>> = fates
        .iter()
        .filter_map(|f| match f {
            Fate::Written(row) => Some(row.clone()),
            Fate::Skipped(..) => None,
        })
        .collect();
    let python_reads_row = python_accepts(&written);

    let mut by_reason = std::collections::BTreeMap::new();
    for ((line, fate), python) in lines.iter().zip(&fates).zip(&python_reads_line) {
        let shown = String::from_utf8_lossy(line);
        match fate {
            Fate::Written(_) => assert!(python, "accepted, but Python refuses: {shown}"),
            Fate::Skipped(reason, detail) => {
                assert_ne!(*reason, SkipReason::InternalError, "{detail}: {shown}");
                let invalid = matches!(
                    reason,
                    SkipReason::InvalidJson | SkipReason::InvalidUtf8 | SkipReason::TooDeeplyNested
                );
                assert!(
                    !(invalid && *python),
                    "refused as {reason:?} ({detail}), but Python reads it: {shown}"
                );
                *by_reason.entry(format!("{reason:?}")).or_insert(0) += 1;
            }
        }
    }
    for (row, python) in written.iter().zip(&python_reads_row) {
        assert!(
            python,
            "a row Python cannot read: {}",
            String::from_utf8_lossy(row)
        );
    }
    // The damage reaches every kind of outcome, so the test can fail on each of them.
    assert!(
        written.len() > lines.len() / 10,
        "{} written",
        written.len()
    );
    for reason in ["InvalidJson", "InvalidUtf8", "UnpairedSurrogate"] {
        assert!(
            by_reason.contains_key(reason),
            "no {reason} among {by_reason:?}"
        );
    }
}
