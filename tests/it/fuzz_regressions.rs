//! The fuzz targets' checks (`fuzz/src/checks.rs`) in the main suite: on every input the fuzzers
//! ever failed on (`fuzz/regressions/<target>/`, kept as found), and on the seeds they start
//! from (every line and file of the bundled sample).

use std::path::Path;

/// What the checks test: the ETL itself.
mod under_test {
    pub use cumulus_etl::{deid, json};
}

#[path = "../../fuzz/src/checks.rs"]
mod checks;

/// The inputs kept for a target, by file name.
fn regressions(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    (name, std::fs::read(e.path()).unwrap())
                })
                .filter(|(name, _)| name != "README.md")
                .collect()
        })
        .unwrap_or_default();
    inputs.sort();
    inputs
}

/// Every line of the bundled sample, and every sample file whole.
fn seeds() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (mut lines, mut files) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(crate::support::synthea())
        .unwrap()
        .flatten()
    {
        let text = std::fs::read(entry.path()).unwrap();
        lines.extend(text.split(|&b| b == b'\n').map(<[u8]>::to_vec));
        files.push(text);
    }
    (lines, files)
}

fn run_all(target: &str, check: fn(&[u8]), seeds: &[Vec<u8>]) {
    for (name, input) in regressions(target) {
        if let Err(panic) = std::panic::catch_unwind(|| check(&input)) {
            std::panic::resume_unwind(Box::new(format!("{target}/{name}: {panic:?}")));
        }
    }
    seeds.iter().for_each(|seed| check(seed));
}

#[test]
fn the_tape_passes_its_fuzz_checks() {
    run_all("tape", checks::check_tape, &seeds().0);
}

#[test]
fn the_scrubber_passes_its_fuzz_checks() {
    run_all("scrub", checks::check_scrub, &seeds().0);
}

#[test]
fn the_line_and_bundle_cutter_pass_their_fuzz_checks() {
    let sized: Vec<Vec<u8>> = seeds()
        .1
        .iter()
        .flat_map(|file| [0u16, 1, 7, 300].map(|size| [&size.to_le_bytes()[..], file].concat()))
        .collect();
    run_all("lines", checks::check_lines, &sized);
}
