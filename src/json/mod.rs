//! JSON in and out without trees: a validating token tape for reading, and compact ASCII-only
//! writing that matches Python's `json.dumps` as Cumulus ETL writes NDJSON.

pub mod ascii;
pub mod tape;

pub use ascii::write_compact_ascii;
pub use tape::{Doc, Kind, Tape, Token};
