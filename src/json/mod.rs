//! JSON in and out without trees: a validating token tape for reading, a cursor over the compact
//! rows we wrote, and compact ASCII-only
//! writing that matches Python's `json.dumps` as Cumulus ETL writes NDJSON.

pub mod ascii;
pub mod compact;
pub mod lines;
pub mod tape;
pub mod top_level;
pub mod utf16;

pub use ascii::{write_compact_ascii, write_dumps_ascii, write_str, write_str_parts};
pub use tape::{Doc, Kind, Tape, Token};
