//! Re-runs that cost what changed: an index per Delta table of the input lines its current rows
//! came from, and the pre-scan that uses it to leave unchanged lines out of a run.
//!
//! An entry `(key, line)` says: the table's current row for the anonymous id whose fingerprint
//! is `key` was de-identified from an input line whose fingerprint is `line`. A line always
//! gives the same row under the same codebook and rules, so a later run that meets the same
//! line for the same key has nothing to change and skips it before parsing it. Entries are
//! kept true by construction:
//! - an entry is added only for a row this tool committed, from the line it was made from:
//!   each commit journals the entries of its rows before it is made ([`journals`]), and the
//!   index is saved only after the run's last commit, naming the table version it describes
//!   ([`index`]); a table at another version is caught up from the journals of the commits
//!   since, or, when one has none (another writer's), has its index ignored;
//! - any key the run writes or deletes loses its old entry ([`update`]); a key one commit wrote
//!   from two different lines keeps an entry of unknown line, and is never skipped.
//!
//! Fingerprints are keyed with a secret derived from the codebook's salt ([`RowFingerprints`]):
//! the index sits beside the de-identified table, and an unkeyed hash of an input line would
//! let anyone holding the table test a guess at a patient's record.

pub mod complete;
pub mod index;
pub mod journals;
pub mod prescan;
pub mod skip;
pub mod update;

use siphasher::sip128::{Hasher128, SipHasher24 as SipHasher128};
use std::hash::{BuildHasher, Hasher};

/// Keyed fingerprints of rows' keys and of the input lines they come from.
#[derive(Clone)]
pub struct RowFingerprints {
    key: u64,
    line: (u64, u64),
}

impl RowFingerprints {
    /// Fingerprints keyed by a 32-byte secret (from the codebook, so a new salt starts a new
    /// index).
    pub fn from_secret(secret: &[u8; 32]) -> RowFingerprints {
        let word = |i: usize| u64::from_le_bytes(secret[i * 8..i * 8 + 8].try_into().unwrap());
        RowFingerprints {
            key: word(0),
            line: (word(1), word(2)),
        }
    }

    /// The fingerprint of a row's key (its anonymous id). Anonymous ids are keyed hashes
    /// already, and in the table for all to see: a fast seeded hash is enough here.
    pub fn key(&self, anonymous_id: &str) -> u64 {
        foldhash::quality::FixedState::with_seed(self.key).hash_one(anonymous_id)
    }

    /// The fingerprint of an input line (its content, without the line end). The line is
    /// hashed fast first and the digest keyed: a line is about a kilobyte.
    pub fn line(&self, line: &[u8]) -> u128 {
        let digest = crate::fingerprint::fingerprint128(line);
        let mut h = SipHasher128::new_with_keys(self.line.0, self.line.1);
        h.write(&digest.to_le_bytes());
        h.finish128().as_u128()
    }

    /// What an index must have been written under to be used: these keys, this tool's
    /// version and its de-identification rules (a row depends on all three).
    pub fn tag(&self) -> u128 {
        let what = format!(
            "cumulus-etl {} row index\n{}",
            env!("CARGO_PKG_VERSION"),
            crate::deid::rules::EMBEDDED_RULES
        );
        self.line(what.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_depend_on_the_secret_and_tell_inputs_apart() {
        let a = RowFingerprints::from_secret(&[1; 32]);
        let b = RowFingerprints::from_secret(&[2; 32]);
        assert_eq!(a.key("x"), a.key("x"));
        assert_ne!(a.key("x"), a.key("y"));
        assert_ne!(a.key("x"), b.key("x"));
        assert_eq!(a.line(b"{}"), a.line(b"{}"));
        assert_ne!(a.line(b"{}"), a.line(b"{ }"));
        assert_ne!(a.line(b"{}"), b.line(b"{}"));
        assert_ne!(a.tag(), b.tag());
    }
}
