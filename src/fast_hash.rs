//! Hash maps and sets with a fast, non-cryptographic hasher, for the hot paths (field rules,
//! schemas, column builders, the sink's id sets). Keys here are not chosen by an attacker who
//! could aim at collisions: they are field names, and ids already hashed with the run's salt.
//!
//! Field and type names are looked up several times for every key of every row. std's string
//! equality calls libc's `memcmp`, whose call and size dispatch cost more than the few bytes a
//! name has: [`Name`] keys are compared inline ([`bytes_eq`]) when looked up by [`NameRef`].

use std::borrow::Borrow;
use std::fmt;

pub type FastMap<K, V> = foldhash::HashMap<K, V>;

pub type FastSet<T> = foldhash::HashSet<T>;

/// Whether two byte strings are equal, compared a word at a time inline (for the short names
/// of a schema: no call, a branch or two).
#[inline(always)]
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap());
    let half = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    match n {
        8.. => {
            let mut at = 0;
            while at + 8 < n {
                if word(a, at) != word(b, at) {
                    return false;
                }
                at += 8;
            }
            word(a, n - 8) == word(b, n - 8)
        }
        4..8 => half(a, 0) == half(b, 0) && half(a, n - 4) == half(b, n - 4),
        _ => (0..n).all(|i| a[i] == b[i]),
    }
}

/// A field or type name as a map key: hashed, compared and ordered as its text, and compared
/// inline when looked up by a [`NameRef`] (`map.get(NameRef::new(key))`); a `&str` lookup works
/// too. Names of up to 22 bytes (all but a few FHIR field names) are held in the key itself, so
/// comparing one reads the hash table's own memory instead of following a pointer elsewhere.
#[derive(Clone)]
pub struct Name(Repr);

/// Bytes a [`Name`] holds in place.
const INLINE: usize = 22;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<str>),
}

impl Name {
    /// The name's text.
    #[inline]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Repr::Inline { len, bytes } => {
                // SAFETY: the bytes were copied whole from a `str` (see `From<&str>`).
                unsafe { std::str::from_utf8_unchecked(&bytes[..usize::from(*len)]) }
            }
            Repr::Heap(name) => name,
        }
    }
}

impl Default for Name {
    fn default() -> Name {
        Name::from("")
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        bytes_eq(self.as_bytes(), other.as_bytes())
    }
}

impl Eq for Name {}

impl std::hash::Hash for Name {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the text hashes: lookups by `&str` and by `NameRef` find it.
        self.as_str().hash(state)
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Name) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Name) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl serde::Serialize for Name {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Name {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Name, D::Error> {
        String::deserialize(deserializer).map(Name::from)
    }
}

/// A borrowed name to look a [`Name`] up by, compared with [`bytes_eq`].
#[repr(transparent)]
pub struct NameRef(str);

impl NameRef {
    /// `name` as a lookup key.
    #[inline]
    pub fn new(name: &str) -> &NameRef {
        // SAFETY: `NameRef` is a `repr(transparent)` wrapper of `str`, so the two references
        // have the same layout and the same lifetime.
        unsafe { &*(name as *const str as *const NameRef) }
    }
}

impl PartialEq for NameRef {
    #[inline(always)]
    fn eq(&self, other: &NameRef) -> bool {
        bytes_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for NameRef {}

impl std::hash::Hash for NameRef {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the text hashes, and so as a `Name` does.
        self.0.hash(state)
    }
}

impl Borrow<NameRef> for Name {
    #[inline]
    fn borrow(&self) -> &NameRef {
        NameRef::new(self.as_str())
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    #[inline]
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Name {
    fn from(name: &str) -> Name {
        let text = name.as_bytes();
        Name(match u8::try_from(text.len()) {
            Ok(len) if text.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                bytes[..text.len()].copy_from_slice(text);
                Repr::Inline { len, bytes }
            }
            _ => Repr::Heap(name.into()),
        })
    }
}

impl From<String> for Name {
    fn from(name: String) -> Name {
        Name::from(name.as_str())
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_equal_exactly_when_they_are_at_every_length() {
        let text: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for n in 0..text.len() {
            let a = &text[..n];
            let copy = a.to_vec();
            assert!(bytes_eq(a, &copy), "{n}");
            for at in 0..n {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!bytes_eq(a, &b), "{n} differing at {at}");
            }
            assert!(!bytes_eq(a, &text[..n + 1]), "{n}: lengths differ");
        }
    }

    #[test]
    fn names_are_found_by_name_ref_and_by_str_alike() {
        let mut map: FastMap<Name, u32> = FastMap::default();
        for (i, name) in ["id", "status", "valueCodeableConcept", "x"]
            .iter()
            .enumerate()
        {
            map.insert(Name::from(*name), i as u32);
        }
        assert_eq!(map.get(NameRef::new("valueCodeableConcept")), Some(&2));
        assert_eq!(map.get("valueCodeableConcept"), Some(&2));
        assert_eq!(map.get(NameRef::new("valueCodeableConcepT")), None);
        assert_eq!(map.get(NameRef::new("x")), Some(&3));
        assert_eq!(map.get(NameRef::new("")), None);
        let (key, _) = map.get_key_value(NameRef::new("status")).unwrap();
        assert_eq!(&**key, "status");
        // Held in place up to 22 bytes, elsewhere beyond: the same either way.
        let long = "modifierExtensionOfAVeryLongName";
        map.insert(Name::from(long), 9);
        assert_eq!(map.get(NameRef::new(long)), Some(&9));
        assert_eq!(map.get(long), Some(&9));
        for name in [
            "",
            "a",
            "exactly22bytesxxxxxxxx",
            "exactly23bytesxxxxxxxxx",
            long,
        ] {
            let n = Name::from(name);
            assert_eq!(n.as_str(), name);
            assert_eq!(n, Name::from(name.to_string()));
            assert_eq!(serde_json::to_string(&n).unwrap(), format!("\"{name}\""));
            let back: Name = serde_json::from_str(&format!("\"{name}\"")).unwrap();
            assert_eq!(back, n);
        }
        assert!(Name::from("a") < Name::from("b") && Name::from("ab") > Name::from("a"));
        assert_eq!(std::mem::size_of::<Name>(), std::mem::size_of::<String>());
    }
}
