//! De-identification: the allow-list rules, the scrubber that applies them, and the codebook
//! that turns real ids into anonymous ones.

pub mod codebook;
pub mod rules;
pub mod scrubber;
mod sorted_mappings;

pub use codebook::Codebook;
pub use rules::Rules;
pub use scrubber::{ExtensionReport, Rejection, Scrubbed, Scrubber};
