//! Input: finding export files, reading them in bundles, the export log and deletions.

pub mod bundles;
pub mod deleted;
pub mod discovery;
pub mod export_log;
pub mod i2b2;
mod icd10cm;
pub mod line_numbers;

pub use discovery::{Discovery, InputFile, Listing, discover};
