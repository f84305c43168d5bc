//! Fuzz targets for the per-line work: the token tape, the scrubber and the NDJSON line and
//! bundle cutter. The lower layers they live in (json, deid, fhir, fingerprint, fast_hash,
//! store) import nothing above them, so this crate compiles exactly those source files
//! (`#[path]`) instead of depending on the whole ETL, whose DataFusion would take most of an
//! hour to build with coverage instrumentation. The checks are shared with the main test suite.

#![allow(dead_code, clippy::all)]

#[path = "../../src/deid/mod.rs"]
pub mod deid;
#[path = "../../src/fast_hash.rs"]
pub mod fast_hash;
#[path = "../../src/fhir/mod.rs"]
pub mod fhir;
#[path = "../../src/fingerprint.rs"]
pub mod fingerprint;
#[path = "../../src/json/mod.rs"]
pub mod json;
#[path = "../../src/store/mod.rs"]
pub mod store;

/// What the checks test: this crate's copy of the lower layers.
mod under_test {
    pub use crate::{deid, json};
}

pub mod checks;
