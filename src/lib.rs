//! Cumulus ETL in Rust: FHIR bulk exports in, de-identified tables out, on a streaming timely
//! dataflow under one memory budget. See `docs/architecture.md`.

pub mod cli;
pub mod commands;
pub mod deid;
pub mod engine;
pub mod etl;
pub mod exit;
pub mod fast_hash;
pub mod fhir;
pub mod fingerprint;
pub mod input;
pub mod json;
pub mod memory;
pub mod nlp;
pub mod output;
pub mod panic_guard;
pub mod store;
pub mod tasks;
#[cfg(test)]
mod test_data;
pub mod time;
