//! Cumulus ETL in Rust: FHIR bulk exports in, de-identified tables out, on a streaming timely
//! dataflow under one memory budget. See `docs/architecture.md`.

/// Prints a message line for people on standard error, below any live progress display
/// ([`console::say`]); the crate's messages all go through it.
#[macro_export]
macro_rules! say {
    () => {
        $crate::console::say(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::console::say(format_args!($($arg)*))
    };
}

pub mod cli;
pub mod commands;
pub mod console;
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
pub mod rerun;
pub mod spill_sort;
pub mod store;
pub mod tasks;
#[cfg(test)]
mod test_data;
pub mod time;
