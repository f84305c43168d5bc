//! The codebook: the salt that makes anonymous ids, plus the reversible Patient/Encounter
//! mappings, stored in the PHI folder in the same files Cumulus ETL uses.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use anyhow::{Context, Result, bail};
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use super::rules::FastMap;
use super::sorted_mappings::SortedMappings;
use crate::{json, store};

const CODEBOOK_FILE: &str = "codebook.json";
const CACHED_MAPPINGS_FILE: &str = "codebook-cached-mappings.json";

/// Resource types whose real-to-fake id mappings are kept so a site can trace a finding back.
const REVERSIBLE_TYPES: [&str; 2] = ["Patient", "Encounter"];

/// Slots of the per-thread memo of reference ids (about 2 MiB per thread when full).
const RECENT_SLOTS: usize = 1 << 14;

/// Numbers codebooks, so a thread's memo never answers for another codebook (another salt).
static NEXT_INSTANCE: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Recently made anonymous ids of references, per thread. References repeat throughout an
    /// export (the same practitioners, organizations and locations), and HMAC is the costliest
    /// step of de-identifying one.
    static RECENT: RefCell<RecentIds> = RefCell::new(RecentIds::default());
}

/// A direct-mapped memo: each (type slot, real id) has one place, and a newcomer replaces
/// what was there, so it stays small and needs no sweeping.
#[derive(Default)]
struct RecentIds {
    instance: u64,
    entries: Vec<Option<RecentId>>,
}

#[derive(Clone)]
struct RecentId {
    slot: usize,
    real_id: Box<str>,
    fake: Box<str>,
}

impl RecentIds {
    fn place(slot: usize, real_id: &str) -> usize {
        use std::hash::BuildHasher;
        foldhash::fast::FixedState::with_seed(0).hash_one((slot, real_id)) as usize
            & (RECENT_SLOTS - 1)
    }
}

/// Maps real ids to anonymous ids; shared by all workers of a run.
pub struct Codebook {
    instance: u64,
    dir: Option<PathBuf>,
    settings: Mutex<Map<String, Value>>,
    /// HMAC state keyed with the salt, cloned per hash rather than re-keyed.
    keyed: Hmac<Sha256>,
    legacy: [HashMap<String, String>; 2],
    /// Real id -> anonymous id per reversible type, looked up for every Patient and Encounter
    /// reference (foldhash, randomly seeded: much cheaper than SipHash on short ids). An entry
    /// marked checked was hashed in this run, so later references reuse it without hashing.
    cached: Option<RwLock<[FastMap<String, Mapping>; 2]>>,
    settings_modified: AtomicBool,
    mappings_modified: AtomicBool,
    /// Real ids whose cached mapping was added or corrected since the last save, per type.
    unsaved: Mutex<[Vec<String>; 2]>,
    /// The cached mappings as last saved, sorted, per type; locked through a save, so saves
    /// are written in turn and the last one written is the newest.
    saved: Mutex<[SortedMappings; 2]>,
    /// Text bytes of the id mappings held (legacy and cached), for `held_bytes`.
    mapping_text: AtomicU64,
}

/// Heap bytes an id mapping takes beyond its text: two string allocations and a hash map slot.
const MAPPING_OVERHEAD: u64 = 96;

/// Heap bytes one id mapping holds.
fn mapping_bytes(real_id: &str, fake: &str) -> u64 {
    (real_id.len() + fake.len()) as u64 + MAPPING_OVERHEAD
}

impl Codebook {
    /// Opens (or starts) the codebook of a PHI folder. With `cache_ids`, new Patient/Encounter
    /// mappings are recorded in `codebook-cached-mappings.json`.
    pub fn open(dir: &Path, cache_ids: bool) -> Result<Codebook> {
        let path = dir.join(CODEBOOK_FILE);
        let saved = if path.exists() {
            let text =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            Some(
                serde_json::from_slice::<Value>(&text)
                    .with_context(|| format!("{} is not valid JSON", path.display()))?,
            )
        } else {
            None
        };
        let cached = if cache_ids {
            let mpath = dir.join(CACHED_MAPPINGS_FILE);
            let m = if mpath.exists() {
                let text = std::fs::read(&mpath)?;
                serde_json::from_slice::<Value>(&text)
                    .with_context(|| format!("{} is not valid JSON", mpath.display()))?
            } else {
                json!({})
            };
            Some(split_by_type(&m))
        } else {
            None
        };
        Codebook::build(Some(dir.to_path_buf()), saved, cached)
    }

    /// A codebook that lives only in memory with the given salt (tests, fixture checks).
    pub fn in_memory(salt_hex: &str) -> Result<Codebook> {
        let saved = json!({"version": 1, "id_salt": salt_hex, "codebook_id": "in-memory"});
        Codebook::build(None, Some(saved), Some(Default::default()))
    }

    fn build(
        dir: Option<PathBuf>,
        saved: Option<Value>,
        cached: Option<[FastMap<String, Mapping>; 2]>,
    ) -> Result<Codebook> {
        let mut settings = Map::new();
        settings.insert("version".into(), json!(1));
        if let Some(saved) = saved {
            let Value::Object(saved) = saved else {
                bail!("codebook.json is not a JSON object")
            };
            match saved.get("version").and_then(Value::as_i64).unwrap_or(0) {
                0 => settings.extend(convert_v0(&saved)?),
                1 => settings = saved,
                v => bail!("Unknown codebook version: \"{v}\""),
            }
        }
        let mut settings_modified = false;
        if !settings.contains_key("codebook_id") {
            settings.insert("codebook_id".into(), json!(uuid4()));
            settings_modified = true;
        }
        if !settings.contains_key("id_salt") {
            let mut salt = [0u8; 32];
            getrandom::fill(&mut salt).map_err(|e| anyhow::anyhow!("no random source: {e}"))?;
            settings.insert("id_salt".into(), json!(hex::encode(salt)));
            settings_modified = true;
        }
        let salt_hex = settings["id_salt"]
            .as_str()
            .context("codebook id_salt is not a string")?;
        let salt = hex::decode(salt_hex).context("codebook id_salt is not valid hex")?;
        let keyed = Hmac::<Sha256>::new_from_slice(&salt).expect("HMAC takes any key length");
        let legacy = REVERSIBLE_TYPES.map(|t| {
            settings
                .get(t)
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default()
        });
        // Mappings read from the file go into the first save, which sorts them all once (the
        // file may come from Cumulus ETL, which keeps them in the order it met them).
        let unsaved = cached
            .as_ref()
            .map(|maps| maps.each_ref().map(|ids| ids.keys().cloned().collect()))
            .unwrap_or_default();
        let legacy_ids = legacy.iter().flatten();
        let cached_ids = cached.iter().flatten().flatten().map(|(k, m)| (k, &m.fake));
        let mapping_text = legacy_ids
            .chain(cached_ids)
            .map(|(k, fake)| mapping_bytes(k, fake))
            .sum();
        Ok(Codebook {
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            dir,
            settings: Mutex::new(settings),
            keyed,
            legacy,
            cached: cached.map(RwLock::new),
            settings_modified: AtomicBool::new(settings_modified),
            mappings_modified: AtomicBool::new(false),
            unsaved: Mutex::new(unsaved),
            saved: Mutex::default(),
            mapping_text: AtomicU64::new(mapping_text),
        })
    }

    /// The codebook's public fingerprint, recorded in each run's job config.
    pub fn codebook_id(&self) -> String {
        self.settings.lock().unwrap()["codebook_id"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// HMAC-SHA256 of the id under the salt, as 64 lowercase hex characters (the key state is
    /// computed once and cloned per id).
    pub fn hash(&self, real_id: &str) -> String {
        let mut mac = self.keyed.clone();
        mac.update(real_id.as_bytes());
        lower_hex(&mac.finalize().into_bytes())
    }

    /// The anonymous id for the target of a reference, as `fake_id(.., true)`, remembered per
    /// thread for the references that follow.
    pub fn fake_ref_id(&self, resource_type: &str, real_id: &str) -> String {
        self.with_fake_ref_id(resource_type, real_id, str::to_string)
    }

    /// As `fake_ref_id`, handing the id to `use_it` instead of copying it out of the memo (the
    /// scrubber writes it straight into the row).
    pub fn with_fake_ref_id<R>(
        &self,
        resource_type: &str,
        real_id: &str,
        use_it: impl FnOnce(&str) -> R,
    ) -> R {
        let slot = REVERSIBLE_TYPES
            .iter()
            .position(|t| *t == resource_type)
            .unwrap_or(REVERSIBLE_TYPES.len());
        let place = RecentIds::place(slot, real_id);
        let mut use_it = Some(use_it);
        let hit = RECENT.with_borrow(|recent| match recent.entries.get(place) {
            Some(Some(known))
                if recent.instance == self.instance
                    && known.slot == slot
                    && *known.real_id == *real_id =>
            {
                use_it.take().map(|f| f(&known.fake))
            }
            _ => None,
        });
        if let Some(result) = hit {
            return result;
        }
        let fake = self.fake_id(resource_type, real_id, true);
        RECENT.with_borrow_mut(|recent| {
            if recent.instance != self.instance || recent.entries.is_empty() {
                recent.entries = vec![None; RECENT_SLOTS];
                recent.instance = self.instance;
            }
            recent.entries[place] = Some(RecentId {
                slot,
                real_id: real_id.into(),
                fake: fake.as_str().into(),
            });
        });
        (use_it.take().expect("not used on a miss"))(&fake)
    }

    /// The anonymous id for a resource id. Patient and Encounter ids use a legacy mapping when
    /// the codebook has one, and otherwise record their mapping (if `cache` is allowed).
    pub fn fake_id(&self, resource_type: &str, real_id: &str, cache: bool) -> String {
        let Some(slot) = REVERSIBLE_TYPES.iter().position(|t| *t == resource_type) else {
            return self.hash(real_id);
        };
        if let Some(fake) = self.legacy[slot].get(real_id) {
            return fake.clone();
        }
        let (true, Some(cached)) = (cache, &self.cached) else {
            return self.hash(real_id);
        };
        if let Some(Mapping {
            fake,
            checked: true,
        }) = cached.read().unwrap()[slot].get(real_id)
        {
            return fake.clone();
        }
        // First time this run: hash, and check (or record) the saved mapping.
        let fake = self.hash(real_id);
        let mut guard = cached.write().unwrap();
        match guard[slot].get_mut(real_id) {
            Some(saved) if saved.fake == fake => saved.checked = true,
            _ => {
                let mapping = Mapping {
                    fake: fake.clone(),
                    checked: true,
                };
                if guard[slot].insert(real_id.to_string(), mapping).is_none() {
                    let bytes = mapping_bytes(real_id, &fake);
                    self.mapping_text.fetch_add(bytes, Ordering::Relaxed);
                }
                self.unsaved.lock().unwrap()[slot].push(real_id.to_string());
                self.mappings_modified.store(true, Ordering::Release);
            }
        }
        fake
    }

    /// Memory the codebook holds for the whole run: its Patient and Encounter id mappings, and
    /// about as much again for their sorted text kept for saves and the copy a save builds. It
    /// grows with the number of patients and encounters, not with the batch, so the memory
    /// budget counts it apart (a million encounters take about 200 MiB).
    pub fn held_bytes(&self) -> u64 {
        2 * self.mapping_text.load(Ordering::Relaxed)
    }

    /// Writes whatever changed since the last save. Called before every batch write, so the
    /// codebook on disk is never behind the data.
    pub fn save(&self) -> Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        if self.settings_modified.swap(false, Ordering::AcqRel) {
            let text = serde_json::to_vec(&*self.settings.lock().unwrap())?;
            store::write_atomic(&dir.join(CODEBOOK_FILE), &text)?;
        }
        if self.mappings_modified.swap(false, Ordering::AcqRel)
            && let Some(cached) = &self.cached
        {
            let mut saved = self.saved.lock().unwrap();
            let unsaved = std::mem::take(&mut *self.unsaved.lock().unwrap());
            {
                let maps = cached.read().unwrap();
                for (slot, ids) in unsaved.iter().enumerate() {
                    let new = ids
                        .iter()
                        .filter_map(|id| maps[slot].get_key_value(id.as_str()))
                        .map(|(real, m)| (real.as_str(), m.fake.as_str()));
                    saved[slot].add(new.collect());
                }
            }
            let parts = mappings_json(&saved);
            let parts: Vec<&[u8]> = parts.iter().map(AsRef::as_ref).collect();
            if let Err(e) = store::write_atomic_parts(&dir.join(CACHED_MAPPINGS_FILE), &parts) {
                // The merged mappings stay in memory; the next save writes them again.
                self.mappings_modified.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }
}

/// `codebook-cached-mappings.json` in pieces: `{type: {real: fake}}`, types and ids sorted, so
/// the file does not depend on which worker saw an id first. The sorted mappings are written as
/// they are kept, not copied into one buffer.
fn mappings_json(saved: &[SortedMappings; 2]) -> Vec<Cow<'_, [u8]>> {
    let mut types: Vec<(&str, &SortedMappings)> = REVERSIBLE_TYPES
        .iter()
        .copied()
        .zip(saved)
        .filter(|(_, ids)| !ids.is_empty())
        .collect();
    types.sort_unstable_by_key(|(t, _)| *t);
    let mut parts = Vec::new();
    for (n, (resource_type, ids)) in types.into_iter().enumerate() {
        let mut head = vec![if n == 0 { b'{' } else { b',' }];
        json::write_str(&mut head, resource_type);
        head.extend_from_slice(b":{");
        parts.push(Cow::Owned(head));
        parts.push(Cow::Borrowed(ids.body()));
        parts.push(Cow::Borrowed(&b"}"[..]));
    }
    parts.push(Cow::Borrowed(if parts.is_empty() {
        &b"{}"[..]
    } else {
        &b"}"[..]
    }));
    parts
}

/// One saved Patient/Encounter mapping.
struct Mapping {
    fake: String,
    /// Hashed again in this run and found equal (or recorded in this run).
    checked: bool,
}

fn split_by_type(m: &Value) -> [FastMap<String, Mapping>; 2] {
    REVERSIBLE_TYPES.map(|t| {
        m.get(t)
            .and_then(Value::as_object)
            .map(|ids| {
                ids.iter()
                    .filter_map(|(k, v)| {
                        let fake = v.as_str()?.to_string();
                        Some((
                            k.clone(),
                            Mapping {
                                fake,
                                checked: false,
                            },
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default()
    })
}

/// Version 0 kept `{"mrn": {patient: {"deid": fake, "encounter": {enc: {"deid": fake}}}}}`.
fn convert_v0(saved: &Map<String, Value>) -> Result<Map<String, Value>> {
    let mut patients = Map::new();
    let mut encounters = Map::new();
    if let Some(mrn) = saved.get("mrn").and_then(Value::as_object) {
        for (pid, pdata) in mrn {
            if let Some(deid) = pdata.get("deid") {
                patients.insert(pid.clone(), deid.clone());
            }
            if let Some(encs) = pdata.get("encounter").and_then(Value::as_object) {
                for (eid, edata) in encs {
                    if let Some(deid) = edata.get("deid") {
                        encounters.insert(eid.clone(), deid.clone());
                    }
                }
            }
        }
    } else {
        bail!("version 0 codebook has no \"mrn\" table");
    }
    let mut out = Map::new();
    out.insert("Patient".into(), Value::Object(patients));
    out.insert("Encounter".into(), Value::Object(encounters));
    Ok(out)
}

/// A random (version 4) UUID, the codebook's public fingerprint.
fn uuid4() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("random source");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Lowercase hex in one allocation; `hex::encode` goes through a char iterator, which a profile
/// showed costing twice the SHA-256 itself.
fn lower_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize]);
        out.push(DIGITS[(b & 0xf) as usize]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn hash_matches_reference_vector() {
        // From the reference's i2b2 fixture: HMAC(0x9876, "323456").
        let cb = Codebook::in_memory("9876").unwrap();
        let h = cb.hash("323456");
        assert!(h.starts_with("49fbb06b") && h.ends_with("4764a7"), "{h}");
    }

    #[test]
    fn saved_mappings_are_checked_once_and_corrected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CODEBOOK_FILE),
            r#"{"version":1,"id_salt":"1234","codebook_id":"x"}"#,
        )
        .unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        let good = cb.hash("good");
        std::fs::write(
            dir.path().join(CACHED_MAPPINGS_FILE),
            json!({"Encounter": {"good": good, "bad": "not-its-hash"}}).to_string(),
        )
        .unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        for _ in 0..2 {
            assert_eq!(cb.fake_id("Encounter", "good", true), good);
            assert_eq!(cb.fake_id("Encounter", "bad", true), cb.hash("bad"));
        }
        cb.save().unwrap();
        let cached: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CACHED_MAPPINGS_FILE)).unwrap())
                .unwrap();
        assert_eq!(
            cached,
            json!({"Encounter": {"good": good, "bad": cb.hash("bad")}})
        );
    }

    #[test]
    fn held_bytes_count_each_mapping_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        assert_eq!(cb.held_bytes(), 0);
        cb.fake_id("Encounter", "e1", true);
        let one = cb.held_bytes();
        assert_eq!(one, 2 * ("e1".len() as u64 + 64 + MAPPING_OVERHEAD));
        cb.fake_id("Encounter", "e1", true);
        cb.fake_id("Condition", "c1", true); // not a reversible type: nothing kept
        cb.fake_id("Patient", "p1", false); // not cached
        assert_eq!(cb.held_bytes(), one);
        cb.fake_id("Patient", "p1", true);
        assert_eq!(cb.held_bytes(), 2 * one);
        cb.save().unwrap();
        assert_eq!(
            Codebook::open(dir.path(), true).unwrap().held_bytes(),
            2 * one
        );
    }

    #[test]
    fn saved_mappings_are_sorted_by_type_and_id_like_a_sorted_map() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        // Ids that tie on the 8-byte sort prefix, are shorter than it, or are its prefix.
        let ids = [
            "p-b",
            "abcdefgh2",
            "abcdefgh",
            "abcdefgh10",
            "abc",
            "ab",
            "b",
            "a",
        ];
        let mut expected: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
        for (n, id) in ids.iter().enumerate() {
            let resource_type = if n % 3 == 0 { "Patient" } else { "Encounter" };
            let fake = cb.fake_id(resource_type, id, true);
            expected
                .entry(resource_type)
                .or_default()
                .insert(id.to_string(), fake);
        }
        cb.save().unwrap();
        let saved = std::fs::read(dir.path().join(CACHED_MAPPINGS_FILE)).unwrap();
        assert_eq!(
            String::from_utf8(saved).unwrap(),
            serde_json::to_string(&expected).unwrap()
        );
    }

    #[test]
    fn saves_merge_new_mappings_into_a_file_kept_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        // As Cumulus ETL leaves it: ids in the order they were met.
        std::fs::write(
            dir.path().join(CACHED_MAPPINGS_FILE),
            r#"{"Patient":{"z":"fz","a":"fa"}}"#,
        )
        .unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        let mut expected: BTreeMap<&str, BTreeMap<String, String>> = BTreeMap::new();
        expected.insert(
            "Patient",
            [("z", "fz"), ("a", "fa")]
                .map(|(k, v)| (k.into(), v.into()))
                .into(),
        );
        for round in [&["m", "b"][..], &["zz", "a0"][..], &["c"][..]] {
            for id in round {
                let fake = cb.fake_id("Patient", id, true);
                expected
                    .get_mut("Patient")
                    .unwrap()
                    .insert(id.to_string(), fake);
            }
            let encounter = cb.fake_id("Encounter", &format!("e-{}", round[0]), true);
            expected
                .entry("Encounter")
                .or_default()
                .insert(format!("e-{}", round[0]), encounter);
            cb.save().unwrap();
            let saved = std::fs::read_to_string(dir.path().join(CACHED_MAPPINGS_FILE)).unwrap();
            assert_eq!(saved, serde_json::to_string(&expected).unwrap());
        }
    }

    #[test]
    fn legacy_mapping_wins_and_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CODEBOOK_FILE),
            r#"{"version":1,"id_salt":"1234","Patient":{"p1":"legacy-p1"}}"#,
        )
        .unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        assert_eq!(cb.fake_id("Patient", "p1", true), "legacy-p1");
        let p2 = cb.fake_id("Patient", "p2", true);
        assert_eq!(p2, cb.hash("p2"));
        cb.fake_id("Encounter", "e1", false); // deleted ids are never cached
        cb.save().unwrap();
        let cached: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CACHED_MAPPINGS_FILE)).unwrap())
                .unwrap();
        assert_eq!(cached, json!({"Patient": {"p2": p2}}));
        // codebook_id was missing, so the codebook was rewritten with one and the legacy map kept
        let saved: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CODEBOOK_FILE)).unwrap())
                .unwrap();
        assert_eq!(saved["Patient"]["p1"], "legacy-p1");
        assert_eq!(saved["id_salt"], "1234");
        assert!(saved["codebook_id"].as_str().unwrap().len() == 36);
    }

    #[test]
    fn version0_codebook_is_read_as_legacy_maps() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CODEBOOK_FILE),
            r#"{"id_salt":"abcd","mrn":{"p":{"deid":"P","encounter":{"e":{"deid":"E"}}}}}"#,
        )
        .unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        assert_eq!(cb.fake_id("Patient", "p", true), "P");
        assert_eq!(cb.fake_id("Encounter", "e", true), "E");
    }

    #[test]
    fn new_phi_folder_gets_a_fresh_32_byte_salt() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        cb.save().unwrap();
        let saved: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CODEBOOK_FILE)).unwrap())
                .unwrap();
        assert_eq!(saved["version"], 1);
        assert_eq!(saved["id_salt"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn unknown_version_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CODEBOOK_FILE), r#"{"version":7}"#).unwrap();
        let err = Codebook::open(dir.path(), true).err().unwrap().to_string();
        assert!(err.contains("Unknown codebook version"), "{err}");
    }

    #[test]
    fn remembered_ids_belong_to_their_codebook_and_never_skip_a_recording() {
        let (a, b) = (
            Codebook::in_memory("01").unwrap(),
            Codebook::in_memory("02").unwrap(),
        );
        assert_ne!(a.hash("x"), b.hash("x"));
        for _ in 0..2 {
            assert_eq!(a.fake_ref_id("Practitioner", "x"), a.hash("x"));
            assert_eq!(b.fake_ref_id("Practitioner", "x"), b.hash("x"));
        }
        // Ids that share a place replace each other; answers stay the same.
        for round in 0..2 {
            for i in 0..RECENT_SLOTS * 2 {
                let id = i.to_string();
                assert_eq!(a.fake_ref_id("Location", &id), a.hash(&id), "{round}");
            }
        }
        // A call that must not record (a deleted id) does not spare a reference its recording.
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(dir.path(), true).unwrap();
        cb.fake_id("Encounter", "e1", false);
        cb.fake_ref_id("Encounter", "e1");
        cb.save().unwrap();
        let cached: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(CACHED_MAPPINGS_FILE)).unwrap())
                .unwrap();
        assert_eq!(cached, json!({"Encounter": {"e1": cb.hash("e1")}}));
    }

    #[test]
    fn lower_hex_matches_the_hex_crate() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(lower_hex(&bytes), hex::encode(&bytes));
    }
}
