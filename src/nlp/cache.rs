//! The NLP response caches in the PHI folder, file-compatible with Cumulus ETL's: a cTAKES or
//! cNLP response is stored at `ctakes-cache/<namespace>/<sha256[0:4]>/sha256-<sha256>.json`, an
//! LLM's at `nlp-cache/<task>_v<version>/<sha256[0:4]>/sha256-<sha256>.cache`, keyed by the
//! SHA-256 of the note text, so a site's existing cache is reused (answers it paid for with the
//! Python tool included) and a re-run asks no server.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::store::ObjectLocation;

/// The cache under one PHI folder.
#[derive(Debug, Clone)]
pub struct NlpCache {
    root: ObjectLocation,
    /// The file name extension of an entry.
    extension: &'static str,
}

impl NlpCache {
    /// The cTAKES and cNLP cache of a PHI folder (or prefix).
    pub fn ctakes(phi: &ObjectLocation) -> NlpCache {
        NlpCache {
            root: phi.join("ctakes-cache"),
            extension: "json",
        }
    }

    /// The LLM answer cache of a PHI folder (or prefix).
    pub fn llm(phi: &ObjectLocation) -> NlpCache {
        NlpCache {
            root: phi.join("nlp-cache"),
            extension: "cache",
        }
    }

    /// The checksum a note's answer is filed under: the SHA-256 of its text, in hex.
    pub fn checksum(text: &str) -> String {
        hex::encode(Sha256::digest(text.as_bytes()))
    }

    /// The key of the answer for `text` in `namespace`.
    pub fn key(&self, namespace: &str, text: &str) -> String {
        self.checksum_key(namespace, &Self::checksum(text))
    }

    fn checksum_key(&self, namespace: &str, sum: &str) -> String {
        let prefix = sum.get(..4).unwrap_or(sum);
        format!("{namespace}/{prefix}/sha256-{sum}.{}", self.extension)
    }

    /// The cached answer, if there is a readable one (anything else means: ask again).
    pub fn read<T: DeserializeOwned>(&self, namespace: &str, text: &str) -> Option<T> {
        self.read_checksum(namespace, &Self::checksum(text))
    }

    /// [`NlpCache::read`] by the text's checksum.
    pub fn read_checksum<T: DeserializeOwned>(&self, namespace: &str, sum: &str) -> Option<T> {
        let bytes = self.root.read(&self.checksum_key(namespace, sum)).ok()??;
        serde_json::from_slice(&bytes).ok()
    }

    /// Stores an answer (atomically, so a crash never leaves half a file).
    pub fn write<T: Serialize>(
        &self,
        namespace: &str,
        text: &str,
        value: &T,
    ) -> anyhow::Result<()> {
        self.write_checksum(namespace, &Self::checksum(text), value)
    }

    /// [`NlpCache::write`] by the text's checksum (a batch's answers come back with it alone).
    pub fn write_checksum<T: Serialize>(
        &self,
        namespace: &str,
        sum: &str,
        value: &T,
    ) -> anyhow::Result<()> {
        // Answers hold the note's text and what was found in it: PHI, in the PHI location
        // (whose local files are private to this user).
        let data = serde_json::to_vec(value)?;
        self.root
            .write(&self.checksum_key(namespace, sum), data.into())
    }

    /// The namespace's `metadata.json` (upstream keeps unfinished batches there), or `{}`.
    pub fn metadata(&self, namespace: &str) -> anyhow::Result<serde_json::Value> {
        let key = format!("{namespace}/metadata.json");
        Ok(match self.root.read(&key)? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{key} in the NLP cache: {e}"))?,
            None => serde_json::json!({}),
        })
    }

    /// Replaces the namespace's `metadata.json`.
    pub fn write_metadata(
        &self,
        namespace: &str,
        metadata: &serde_json::Value,
    ) -> anyhow::Result<()> {
        let data = serde_json::to_vec_pretty(metadata)?;
        self.root
            .write(&format!("{namespace}/metadata.json"), data.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_scheme_matches_cumulus_etl() {
        let phi = ObjectLocation::private_folder(std::path::Path::new("/phi")).unwrap();
        let cache = NlpCache::ctakes(&phi);
        // sha256("hello") = 2cf24dba...
        assert_eq!(
            cache.root.url_of(&cache.key("covid_symptom_v4", "hello")),
            "/phi/ctakes-cache/covid_symptom_v4/2cf2/sha256-2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824.json"
        );
        let llm = NlpCache::llm(&phi);
        assert_eq!(
            llm.root
                .url_of(&llm.key("example_nlp__nlp_gpt_oss_120b_v1", "hello")),
            "/phi/nlp-cache/example_nlp__nlp_gpt_oss_120b_v1/2cf2/sha256-2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824.cache"
        );
    }

    #[test]
    fn round_trip_and_unreadable_entries() {
        let dir = tempfile::tempdir().unwrap();
        let cache = NlpCache::ctakes(&ObjectLocation::private_folder(dir.path()).unwrap());
        assert_eq!(cache.read::<Vec<i8>>("ns", "note"), None);
        cache.write("ns", "note", &vec![0i8, -1]).unwrap();
        assert_eq!(cache.read::<Vec<i8>>("ns", "note"), Some(vec![0, -1]));
        let key = cache.key("ns", "note");
        std::fs::write(dir.path().join("ctakes-cache").join(key), b"{broken").unwrap();
        assert_eq!(cache.read::<Vec<i8>>("ns", "note"), None);
    }
}
