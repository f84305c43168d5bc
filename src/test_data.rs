//! The bundled Synthea sample, for unit tests that run every resource type through a step.

use std::path::Path;

/// Each `<Type>.000.ndjson` file of `tests/data/synthea-10`: its resource type and its bytes.
pub fn synthea_files() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/synthea-10");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("the bundled sample")
        .map(|entry| entry.expect("a sample file").path())
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let resource_type = name.strip_suffix(".000.ndjson")?.to_string();
            Some((
                resource_type,
                std::fs::read(&path).expect("a readable sample"),
            ))
        })
        .collect();
    files.sort();
    files
}
