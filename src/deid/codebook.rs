//! The codebook: the salt that makes anonymous ids, plus the reversible Patient/Encounter
//! mappings, stored in the PHI folder in the same files Cumulus ETL uses.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};

use anyhow::{Context, Result, anyhow, bail};
use hmac::{Hmac, Mac};
use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use super::sorted_mappings::SortedMappings;
use crate::fast_hash::FastMap;
use crate::fingerprint::fingerprint128;
use crate::json;
use crate::store::objects::ObjectLocation;

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

/// Strings, not boxed strings: a newcomer is copied into the place's strings (which rarely
/// need to grow) instead of freeing the ones there, long out of the cache.
#[derive(Clone)]
struct RecentId {
    slot: usize,
    real_id: String,
    fake: String,
}

impl RecentId {
    /// The slot of a place that answers for no id.
    const NONE: usize = usize::MAX;

    fn none() -> RecentId {
        RecentId {
            slot: RecentId::NONE,
            real_id: String::new(),
            fake: String::new(),
        }
    }
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
    /// The PHI folder the codebook is saved in (None: in memory only).
    phi: Option<ObjectLocation>,
    settings: Mutex<Map<String, Value>>,
    /// HMAC state keyed with the salt, cloned per hash rather than re-keyed.
    keyed: Hmac<Sha256>,
    /// HMAC state keyed with the salt's SHA-256, for secrets derived from the salt
    /// ([`Codebook::secret_for`]): no anonymous id is a value of it.
    secrets: Hmac<Sha256>,
    legacy: [HashMap<String, String>; 2],
    /// The Patient and Encounter ids met in this run, per type, looked up for every reference
    /// to one (None when ids are not cached).
    seen: Option<RwLock<[SeenIds; 2]>>,
    settings_modified: AtomicBool,
    mappings_modified: AtomicBool,
    /// Mappings met since the last save, per type: the next save merges them into `saved`.
    unsaved: Mutex<[Vec<MetId>; 2]>,
    /// The cached mappings as the file holds them, locked through a save, so saves are written
    /// in turn and the last one written is the newest.
    saved: Mutex<SavedMappings>,
    /// Heap bytes held for the whole run, for `held_bytes`: legacy mappings, `seen`, and the
    /// saved mappings' text (a save merges new mappings into it in place).
    held: AtomicU64,
    /// Another process writes the codebook (a cluster run's process 0): this one does not, and
    /// hands its new mappings to it ([`Codebook::take_new_mappings`]).
    follower: AtomicBool,
}

/// An anonymous id as its HMAC-SHA256 bytes (half the size of its hex text).
type Mac32 = [u8; 32];

/// A real id met in this run, and its anonymous id.
type MetId = (Box<str>, Mac32);

/// A fingerprint of each real id met in this run to its anonymous id: 48 bytes a mapping where
/// two strings took about 250 (a 4 GB export has 470,000 encounters). Foldhash, randomly
/// seeded, is much cheaper than SipHash on the 16-byte keys.
type SeenIds = FastMap<u128, Mac32>;

/// Heap bytes one `SeenIds` entry takes, with the hash table's slack.
const SEEN_ENTRY_BYTES: u64 = 72;

/// Heap bytes a legacy mapping takes beyond its text: two string allocations and a map slot.
const LEGACY_MAPPING_OVERHEAD: u64 = 96;

/// The saved mappings of both reversible types, and whether the file is behind them (a save
/// that failed to write, or merged changes).
#[derive(Default)]
struct SavedMappings {
    types: [SortedMappings; 2],
    stale: bool,
}

impl SavedMappings {
    fn text_bytes(&self) -> u64 {
        self.types.iter().map(|m| m.body().len() as u64).sum()
    }
}

impl Codebook {
    /// Opens (or starts) the codebook of a PHI folder. With `cache_ids`, new Patient/Encounter
    /// mappings are recorded in `codebook-cached-mappings.json`.
    pub fn open(phi: &ObjectLocation, cache_ids: bool) -> Result<Codebook> {
        let saved = match phi.read(CODEBOOK_FILE)? {
            Some(text) => Some(
                serde_json::from_slice::<Value>(&text)
                    .with_context(|| format!("{} is not valid JSON", phi.url_of(CODEBOOK_FILE)))?,
            ),
            None => None,
        };
        let cached = if cache_ids {
            let mut saved = SavedMappings::default();
            if let Some(text) = phi.read(CACHED_MAPPINGS_FILE)? {
                let file: CachedFile = serde_json::from_slice(&text).with_context(|| {
                    format!(
                        "{} is not a codebook mapping file",
                        phi.url_of(CACHED_MAPPINGS_FILE)
                    )
                })?;
                for (sorted, pairs) in saved.types.iter_mut().zip(&file.0) {
                    sorted.add(
                        pairs
                            .iter()
                            .map(|(r, f)| (r.as_ref(), f.as_ref()))
                            .collect(),
                    );
                }
            }
            Some(saved)
        } else {
            None
        };
        Codebook::build(Some(phi.clone()), saved, cached)
    }

    /// A codebook that lives only in memory with the given salt (tests, fixture checks).
    pub fn in_memory(salt_hex: &str) -> Result<Codebook> {
        let saved = json!({"version": 1, "id_salt": salt_hex, "codebook_id": "in-memory"});
        Codebook::build(None, Some(saved), Some(SavedMappings::default()))
    }

    /// `cached`: the saved Patient/Encounter mappings, when ids are cached.
    fn build(
        phi: Option<ObjectLocation>,
        saved: Option<Value>,
        cached: Option<SavedMappings>,
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
        let secrets = Hmac::<Sha256>::new_from_slice(&<Sha256 as sha2::Digest>::digest(&salt))
            .expect("HMAC takes any key length");
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
        let legacy_bytes: u64 = legacy
            .iter()
            .flatten()
            .map(|(k, fake): (&String, &String)| {
                (k.len() + fake.len()) as u64 + LEGACY_MAPPING_OVERHEAD
            })
            .sum();
        let seen = cached.as_ref().map(|_| RwLock::default());
        let saved = cached.unwrap_or_default();
        let held = legacy_bytes + saved.text_bytes();
        Ok(Codebook {
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            phi,
            settings: Mutex::new(settings),
            keyed,
            secrets,
            legacy,
            seen,
            settings_modified: AtomicBool::new(settings_modified),
            mappings_modified: AtomicBool::new(false),
            unsaved: Mutex::default(),
            saved: Mutex::new(saved),
            held: AtomicU64::new(held),
            follower: AtomicBool::new(false),
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
        lower_hex(&self.mac(real_id))
    }

    /// Appends [`Codebook::hash`] of `real_id` to `out`.
    fn push_hash(&self, real_id: &str, out: &mut String) {
        push_lower_hex(out, &self.mac(real_id));
    }

    fn mac(&self, real_id: &str) -> Mac32 {
        let mut mac = self.keyed.clone();
        mac.update(real_id.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// A secret for `purpose`, as private as the salt and changing with it. Anonymous ids are
    /// keyed hashes of ids under the salt itself, so a secret made the same way would be the
    /// anonymous id of the id that spells `purpose`, for all to see in the tables: this one
    /// is keyed with the salt's SHA-256 instead.
    pub fn secret_for(&self, purpose: &str) -> [u8; 32] {
        let mut mac = self.secrets.clone();
        mac.update(purpose.as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// The anonymous id for the target of a reference, as `fake_id(.., true)`, remembered per
    /// thread for the references that follow.
    pub fn fake_ref_id(&self, resource_type: &str, real_id: &str) -> String {
        self.with_fake_ref_id(resource_type, real_id, str::to_string)
    }

    /// As `fake_ref_id`, handing the id to `use_it` instead of copying it out of the memo (the
    /// scrubber writes it straight into the row). `use_it` runs while the memo is borrowed, so
    /// it must not ask for another reference's id.
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
        RECENT.with_borrow_mut(|recent| {
            if recent.instance != self.instance || recent.entries.is_empty() {
                recent.entries = vec![None; RECENT_SLOTS];
                recent.instance = self.instance;
            }
            let known = recent.entries[place].get_or_insert_with(RecentId::none);
            if known.slot != slot || known.real_id != real_id {
                // Unusable until whole, should making the id fail half-way.
                known.slot = RecentId::NONE;
                known.fake.clear();
                self.push_fake_id(resource_type, real_id, true, &mut known.fake);
                known.real_id.clear();
                known.real_id.push_str(real_id);
                known.slot = slot;
            }
            use_it(&known.fake)
        })
    }

    /// The anonymous id for a resource id. Patient and Encounter ids use a legacy mapping when
    /// the codebook has one, and otherwise record their mapping (if `cache` is allowed).
    pub fn fake_id(&self, resource_type: &str, real_id: &str, cache: bool) -> String {
        let mut fake = String::with_capacity(64);
        self.push_fake_id(resource_type, real_id, cache, &mut fake);
        fake
    }

    /// Appends [`Codebook::fake_id`] to `out` (a buffer the caller keeps, not a new string
    /// per id).
    pub fn push_fake_id(&self, resource_type: &str, real_id: &str, cache: bool, out: &mut String) {
        let Some(slot) = REVERSIBLE_TYPES.iter().position(|t| *t == resource_type) else {
            return self.push_hash(real_id, out);
        };
        if let Some(fake) = self.legacy[slot].get(real_id) {
            return out.push_str(fake);
        }
        let (true, Some(seen)) = (cache, &self.seen) else {
            return self.push_hash(real_id, out);
        };
        let key = fingerprint128(real_id.as_bytes());
        if let Some(mac) = seen.read().unwrap()[slot].get(&key) {
            return push_lower_hex(out, mac);
        }
        // First time this run: hash, and have the next save check (or record) the mapping.
        let mac = self.mac(real_id);
        if seen.write().unwrap()[slot].insert(key, mac).is_none() {
            self.held.fetch_add(SEEN_ENTRY_BYTES, Ordering::Relaxed);
            self.unsaved.lock().unwrap()[slot].push((real_id.into(), mac));
            self.mappings_modified.store(true, Ordering::Release);
        }
        push_lower_hex(out, &mac)
    }

    /// Memory the codebook holds for the whole run: the Patient and Encounter ids met in it,
    /// and the saved mappings' text (about 106 bytes each). It grows with the number of
    /// patients and encounters, not with the batch, so the memory budget counts it apart (a
    /// million encounters take about 170 MiB).
    pub fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// Writes whatever changed since the last save. Called before every batch write, so the
    /// codebook on disk is never behind the data.
    pub fn save(&self) -> Result<()> {
        let Some(phi) = &self.phi else { return Ok(()) };
        if self.follower.load(Ordering::Acquire) {
            return Ok(());
        }
        if self.settings_modified.swap(false, Ordering::AcqRel) {
            let text = serde_json::to_vec(&*self.settings.lock().unwrap())?;
            phi.write(CODEBOOK_FILE, text.into())?;
        }
        if self.mappings_modified.swap(false, Ordering::AcqRel) && self.seen.is_some() {
            let mut saved = self.saved.lock().unwrap();
            let unsaved = std::mem::take(&mut *self.unsaved.lock().unwrap());
            let before = saved.text_bytes();
            let mut changed = false;
            for (sorted, met) in saved.types.iter_mut().zip(&unsaved) {
                let fakes: Vec<String> = met.iter().map(|(_, mac)| lower_hex(mac)).collect();
                let pairs = met.iter().zip(&fakes).map(|((r, _), f)| (&**r, f.as_str()));
                // A mapping the file already holds, unchanged, changes nothing.
                changed |= sorted.add(pairs.collect());
            }
            saved.stale |= changed;
            let after = saved.text_bytes();
            self.held
                .fetch_add(after.saturating_sub(before), Ordering::Relaxed);
            if saved.stale {
                let parts = mappings_json(&saved.types);
                let parts: Vec<&[u8]> = parts.iter().map(AsRef::as_ref).collect();
                if let Err(e) = phi.write_parts(CACHED_MAPPINGS_FILE, &parts) {
                    // The merged mappings stay in memory; the next save writes them again.
                    self.mappings_modified.store(true, Ordering::Release);
                    return Err(e);
                }
                saved.stale = false;
            }
        }
        Ok(())
    }
}

impl Codebook {
    /// Leaves the writing of the codebook to another process (a cluster run's process 0);
    /// this one's new mappings are taken with [`Codebook::take_new_mappings`] for it.
    pub fn follow(&self) {
        self.follower.store(true, Ordering::Release);
    }

    /// The mappings met since the last save (or take): (resource type, real id, anonymous
    /// id). PHI: they go only to the process that saves the codebook.
    pub fn take_new_mappings(&self) -> Vec<(String, String, String)> {
        let unsaved = std::mem::take(&mut *self.unsaved.lock().unwrap());
        REVERSIBLE_TYPES
            .iter()
            .zip(unsaved)
            .flat_map(|(t, met)| {
                met.into_iter()
                    .map(move |(real, mac)| (t.to_string(), real.into(), lower_hex(&mac)))
            })
            .collect()
    }

    /// Adds mappings another process met (from [`Codebook::take_new_mappings`]), for the next
    /// save; a mapping that is not this codebook's (another salt, a bad id) is an error.
    pub fn add_mappings(&self, mappings: Vec<(String, String, String)>) -> Result<()> {
        let mut unsaved = self.unsaved.lock().unwrap();
        for (resource_type, real, fake) in mappings {
            let slot = REVERSIBLE_TYPES
                .iter()
                .position(|t| *t == resource_type)
                .ok_or_else(|| anyhow!("a mapping of an unexpected type {resource_type}"))?;
            let mac = self.mac(&real);
            if lower_hex(&mac) != fake {
                return Err(anyhow!(
                    "a {resource_type} mapping was made under another salt"
                ));
            }
            unsaved[slot].push((real.into(), mac));
        }
        self.mappings_modified.store(true, Ordering::Release);
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

/// `codebook-cached-mappings.json` as read: each reversible type's `(real, fake)` pairs, in
/// file order, borrowed from the file's text where they have no escapes. Read without a
/// `Value` tree, which for 470,000 encounters took 300 MB on the way to 50 MB of mappings.
#[derive(Default)]
struct CachedFile<'a>([Vec<(Cow<'a, str>, Cow<'a, str>)>; 2]);

impl<'de> Deserialize<'de> for CachedFile<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(CachedFileVisitor)
    }
}

struct CachedFileVisitor;

impl<'de> Visitor<'de> for CachedFileVisitor {
    type Value = CachedFile<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object of id mappings by resource type")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut file = CachedFile::default();
        while let Some(Text(resource_type)) = map.next_key()? {
            match REVERSIBLE_TYPES.iter().position(|t| *t == resource_type) {
                Some(slot) => file.0[slot] = map.next_value::<IdPairs>()?.0,
                None => drop(map.next_value::<IgnoredAny>()?),
            }
        }
        Ok(file)
    }
}

/// One type's `{real: fake}` object, as pairs.
struct IdPairs<'a>(Vec<(Cow<'a, str>, Cow<'a, str>)>);

impl<'de> Deserialize<'de> for IdPairs<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PairsVisitor;
        impl<'de> Visitor<'de> for PairsVisitor {
            type Value = IdPairs<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of real ids to anonymous ids")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((Text(real), Text(fake))) = map.next_entry()? {
                    pairs.push((real, fake));
                }
                Ok(IdPairs(pairs))
            }
        }
        d.deserialize_map(PairsVisitor)
    }
}

/// A JSON string, borrowed when it has no escapes (serde's own `Cow<str>` always copies).
struct Text<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct TextVisitor;
        impl<'de> Visitor<'de> for TextVisitor {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(TextVisitor)
    }
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
    let mut out = String::with_capacity(bytes.len() * 2);
    push_lower_hex(&mut out, bytes);
    out
}

/// Appends `bytes` in lowercase hex to `out`.
fn push_lower_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    // Filled on the stack a MAC at a time: one digit pair per byte, without a capacity check
    // per digit.
    for part in bytes.chunks(32) {
        let mut digits = [0u8; 64];
        for (pair, b) in digits.chunks_exact_mut(2).zip(part) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        out.push_str(std::str::from_utf8(&digits[..part.len() * 2]).expect("hex digits are ASCII"));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// The PHI folder at `dir`.
    fn phi(dir: &std::path::Path) -> ObjectLocation {
        ObjectLocation::local(dir).unwrap()
    }

    #[test]
    fn derived_secrets_are_no_anonymous_id_and_follow_the_salt() {
        let a = Codebook::in_memory("1234").unwrap();
        let b = Codebook::in_memory("5678").unwrap();
        let purpose = "cumulus-etl row index";
        assert_ne!(hex::encode(a.secret_for(purpose)), a.hash(purpose));
        assert_ne!(a.secret_for(purpose), b.secret_for(purpose));
        assert_eq!(a.secret_for(purpose), a.secret_for(purpose));
        assert_ne!(a.secret_for(purpose), a.secret_for("another purpose"));
    }

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
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
        let good = cb.hash("good");
        std::fs::write(
            dir.path().join(CACHED_MAPPINGS_FILE),
            json!({"Encounter": {"good": good, "bad": "not-its-hash"}}).to_string(),
        )
        .unwrap();
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
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
    fn held_bytes_count_ids_met_and_saved_text_once() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
        assert_eq!(cb.held_bytes(), 0);
        cb.fake_id("Encounter", "e1", true);
        assert_eq!(cb.held_bytes(), SEEN_ENTRY_BYTES);
        cb.fake_id("Encounter", "e1", true);
        cb.fake_id("Condition", "c1", true); // not a reversible type: nothing kept
        cb.fake_id("Patient", "p1", false); // not cached
        assert_eq!(cb.held_bytes(), SEEN_ENTRY_BYTES);
        cb.fake_id("Patient", "p1", true);
        assert_eq!(cb.held_bytes(), 2 * SEEN_ENTRY_BYTES);
        cb.save().unwrap();
        // Each saved entry is `"e1":"<64 hex digits>"`, and a comma between entries.
        let text = 2 * (4 + 1 + 66);
        assert_eq!(cb.held_bytes(), 2 * SEEN_ENTRY_BYTES + text);
        assert_eq!(
            Codebook::open(&phi(dir.path()), true).unwrap().held_bytes(),
            text
        );
    }

    #[test]
    fn a_run_that_meets_only_saved_mappings_leaves_the_file_alone() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::in_memory("1234").unwrap();
        let (p, e) = (cb.hash("p"), cb.hash("e"));
        std::fs::write(
            dir.path().join(CODEBOOK_FILE),
            r#"{"version":1,"id_salt":"1234","codebook_id":"x"}"#,
        )
        .unwrap();
        // As Cumulus ETL might leave it: spaced out, in the order it met the ids.
        let file = format!(
            "{{\n  \"Patient\": {{\"p\": \"{p}\"}},\n  \"Encounter\": {{\"e\": \"{e}\"}}\n}}"
        );
        let path = dir.path().join(CACHED_MAPPINGS_FILE);
        std::fs::write(&path, &file).unwrap();
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
        assert_eq!(cb.fake_id("Patient", "p", true), p);
        assert_eq!(cb.fake_id("Encounter", "e", true), e);
        cb.save().unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), file);
    }

    #[test]
    fn a_mapping_file_of_the_wrong_shape_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CACHED_MAPPINGS_FILE),
            "{\"Patient\": {\"p\": 7}}",
        )
        .unwrap();
        let err = format!(
            "{:#}",
            Codebook::open(&phi(dir.path()), true).err().unwrap()
        );
        assert!(err.contains(CACHED_MAPPINGS_FILE), "{err}");
        assert!(err.contains("line 1"), "{err}");
        // Other resource types are not ours to read, whatever they hold.
        std::fs::write(
            dir.path().join(CACHED_MAPPINGS_FILE),
            "{\"Other\": [1, {\"x\": null}], \"Patient\": {}}",
        )
        .unwrap();
        assert!(Codebook::open(&phi(dir.path()), true).is_ok());
    }

    #[test]
    fn saved_mappings_are_sorted_by_type_and_id_like_a_sorted_map() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
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
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
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
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
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
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
        assert_eq!(cb.fake_id("Patient", "p", true), "P");
        assert_eq!(cb.fake_id("Encounter", "e", true), "E");
    }

    #[test]
    fn new_phi_folder_gets_a_fresh_32_byte_salt() {
        let dir = tempfile::tempdir().unwrap();
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
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
        let err = Codebook::open(&phi(dir.path()), true)
            .err()
            .unwrap()
            .to_string();
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
        let cb = Codebook::open(&phi(dir.path()), true).unwrap();
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
