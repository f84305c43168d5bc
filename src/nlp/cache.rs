//! The NLP response cache in the PHI folder, file-compatible with Cumulus ETL's: a response is
//! stored at `ctakes-cache/<namespace>/<sha256[0:4]>/sha256-<sha256>.json`, keyed by the
//! SHA-256 of the note text, so a site's existing cache is reused and a re-run asks no server.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

/// The cache under one PHI folder.
#[derive(Debug, Clone)]
pub struct NlpCache {
    root: PathBuf,
}

impl NlpCache {
    /// The cache of a PHI folder.
    pub fn new(phi: &Path) -> NlpCache {
        NlpCache {
            root: phi.join("ctakes-cache"),
        }
    }

    /// Where the answer for `text` in `namespace` lives.
    pub fn path(&self, namespace: &str, text: &str) -> PathBuf {
        let sum = hex::encode(Sha256::digest(text.as_bytes()));
        self.root
            .join(namespace)
            .join(&sum[..4])
            .join(format!("sha256-{sum}.json"))
    }

    /// The cached answer, if there is a readable one (anything else means: ask again).
    pub fn read<T: DeserializeOwned>(&self, namespace: &str, text: &str) -> Option<T> {
        let bytes = std::fs::read(self.path(namespace, text)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores an answer (atomically, so a crash never leaves half a file).
    pub fn write<T: Serialize>(
        &self,
        namespace: &str,
        text: &str,
        value: &T,
    ) -> anyhow::Result<()> {
        // Answers hold the note's text and what was found in it: PHI, private to this user.
        let path = self.path(namespace, text);
        let data = serde_json::to_vec(value)?;
        crate::store::write_atomic_parts(&path, &[&data], crate::store::Access::Private)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_scheme_matches_cumulus_etl() {
        let cache = NlpCache::new(Path::new("/phi"));
        // sha256("hello") = 2cf24dba...
        assert_eq!(
            cache.path("covid_symptom_v4", "hello"),
            Path::new(
                "/phi/ctakes-cache/covid_symptom_v4/2cf2/sha256-2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824.json"
            )
        );
    }

    #[test]
    fn round_trip_and_unreadable_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NlpCache::new(dir.path());
        assert_eq!(cache.read::<Vec<i8>>("ns", "note"), None);
        cache.write("ns", "note", &vec![0i8, -1]).unwrap();
        assert_eq!(cache.read::<Vec<i8>>("ns", "note"), Some(vec![0, -1]));
        std::fs::write(cache.path("ns", "note"), b"{broken").unwrap();
        assert_eq!(cache.read::<Vec<i8>>("ns", "note"), None);
    }
}
