//! Hash maps and sets with a fast, non-cryptographic hasher, for the hot paths (field rules,
//! schemas, column builders, the sink's id sets). Keys here are not chosen by an attacker who
//! could aim at collisions: they are field names, and ids already hashed with the run's salt.

pub type FastMap<K, V> = foldhash::HashMap<K, V>;

pub type FastSet<T> = foldhash::HashSet<T>;
