//! The allow-list rules, loaded once from the embedded `allow_list.toml` and flattened so the
//! scrubber never walks inheritance chains on the hot path.

use crate::fast_hash::{FastMap, FastSet, Name, NameRef};
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

/// The rules file compiled into the binary, so every run of a given version de-identifies alike.
pub const EMBEDDED_RULES: &str = include_str!("allow_list.toml");

/// What happens to one field of a node.
#[derive(Debug, Clone)]
pub enum Treatment {
    /// Copy the value.
    Keep,
    /// Drop it, leaving a data-absent "masked" marker in `_field`.
    Mask,
    /// Mask, except when clinical notes are being processed (NLP).
    MaskNote,
    /// Hash an id.
    AnonId,
    /// Rewrite a reference.
    AnonRef,
    /// Keep the first four characters.
    Year,
    /// Three-digit zip.
    Zip,
    /// Keep free text (the hook for an optional text scrubber).
    FreeText,
    /// Apply the Epic custom-code check first, then the inner treatment.
    Coded(Box<Treatment>),
    /// Recurse into a structure with the rules of a named type, optionally filtered.
    Nested {
        type_name: Arc<str>,
        /// The type's field table (`Rules::table`), resolved once the rules are loaded.
        table: usize,
        filter: Option<Filter>,
    },
    /// Recurse as a full resource (contained resources).
    Resource,
}

impl Treatment {
    /// Leaf treatments apply to primitive values; the others to JSON objects.
    pub fn is_leaf(&self) -> bool {
        !matches!(self, Treatment::Nested { .. } | Treatment::Resource)
    }
}

/// Keeps only list elements whose `field` is one of `values` (e.g. NPI identifiers).
#[derive(Debug, Clone)]
pub struct Filter {
    pub field: String,
    pub values: FastSet<String>,
}

/// A nested type's table before the rules are all read.
const UNRESOLVED: usize = usize::MAX;

/// The flattened field table of one type (its own fields plus everything inherited).
pub type FieldRules = FastMap<Name, Treatment>;

/// All rules: per-type field tables and the extension URL lists.
#[derive(Debug)]
pub struct Rules {
    /// Each type's place in `tables`.
    types: FastMap<Name, usize>,
    tables: Vec<FieldRules>,
    pub allowed_extensions: FastSet<String>,
    pub ignored_extensions: FastSet<String>,
    pub allowed_modifier_extensions: FastSet<String>,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "type")]
    types: HashMap<String, RawType>,
    extensions: RawExtensions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawType {
    base: Option<String>,
    #[serde(default)]
    keep: Vec<String>,
    #[serde(default)]
    mask: Vec<String>,
    #[serde(default)]
    mask_note: Vec<String>,
    #[serde(default)]
    anon_id: Vec<String>,
    #[serde(default)]
    anon_ref: Vec<String>,
    #[serde(default)]
    year: Vec<String>,
    #[serde(default)]
    zip: Vec<String>,
    #[serde(default)]
    free_text: Vec<String>,
    #[serde(default)]
    coded: Vec<String>,
    #[serde(default)]
    coded_free_text: Vec<String>,
    #[serde(default)]
    types: HashMap<String, String>,
}

#[derive(Deserialize)]
struct RawExtensions {
    allowed: Vec<String>,
    ignored: Vec<String>,
    modifier_allowed: Vec<String>,
}

impl Rules {
    /// The built-in rules.
    pub fn embedded() -> Result<Rules> {
        Rules::parse(EMBEDDED_RULES)
    }

    /// Parses and flattens a rules file, failing on any reference to an undefined type.
    pub fn parse(text: &str) -> Result<Rules> {
        let raw: RawFile = toml::from_str(text).context("invalid de-identification rules file")?;
        let mut own: HashMap<String, (Option<String>, FieldRules)> = HashMap::new();
        for (name, t) in &raw.types {
            let mut fields = FieldRules::default();
            let leafs: [(&Vec<String>, Treatment); 10] = [
                (&t.keep, Treatment::Keep),
                (&t.mask, Treatment::Mask),
                (&t.mask_note, Treatment::MaskNote),
                (&t.anon_id, Treatment::AnonId),
                (&t.anon_ref, Treatment::AnonRef),
                (&t.year, Treatment::Year),
                (&t.zip, Treatment::Zip),
                (&t.free_text, Treatment::FreeText),
                (&t.coded, Treatment::Coded(Box::new(Treatment::Keep))),
                (
                    &t.coded_free_text,
                    Treatment::Coded(Box::new(Treatment::FreeText)),
                ),
            ];
            for (list, treatment) in leafs {
                for field in list {
                    if fields
                        .insert(field.as_str().into(), treatment.clone())
                        .is_some()
                    {
                        bail!("field {name}.{field} is listed twice in the rules");
                    }
                }
            }
            for (field, spec) in &t.types {
                if fields
                    .insert(field.as_str().into(), parse_nested(spec)?)
                    .is_some()
                {
                    bail!("field {name}.{field} is listed twice in the rules");
                }
            }
            let base = match (&t.base, name.contains('.')) {
                (Some(b), _) => Some(b.clone()),
                (None, true) => Some("BackboneElement".to_string()),
                (None, false) => None,
            };
            own.insert(name.clone(), (base, fields));
        }
        // Attach each backbone type "Parent.child" as field `child` of Parent.
        let backbones: Vec<String> = own.keys().filter(|n| n.contains('.')).cloned().collect();
        for name in backbones {
            let (parent, child) = name.rsplit_once('.').expect("dotted name");
            let entry = own
                .get_mut(parent)
                .ok_or_else(|| anyhow!("backbone {name} has no parent type {parent}"))?;
            let nested = Treatment::Nested {
                type_name: Arc::from(name.as_str()),
                table: UNRESOLVED,
                filter: None,
            };
            if entry.1.insert(child.into(), nested).is_some() {
                bail!("field {parent}.{child} is listed twice in the rules");
            }
        }
        let mut types: FastMap<Name, usize> = FastMap::default();
        let mut tables = Vec::with_capacity(own.len());
        for name in own.keys() {
            let mut flat = FieldRules::default();
            let mut current = Some(name.clone());
            let mut depth = 0;
            while let Some(n) = current {
                let (base, fields) = own
                    .get(&n)
                    .ok_or_else(|| anyhow!("unknown base type {n}"))?;
                for (k, v) in fields {
                    flat.entry(k.clone()).or_insert_with(|| v.clone());
                }
                current = base.clone();
                depth += 1;
                if depth > 16 {
                    bail!("type {name} has a cyclic base chain");
                }
            }
            types.insert(name.as_str().into(), tables.len());
            tables.push((name, flat));
        }
        // Nested types resolved to their tables once, not looked up by name per value.
        let tables = tables
            .into_iter()
            .map(|(name, mut fields)| {
                for (field, t) in fields.iter_mut() {
                    if let Treatment::Nested {
                        type_name, table, ..
                    } = t
                    {
                        *table = *types.get(type_name.as_ref()).ok_or_else(|| {
                            anyhow!("{name}.{field} refers to undefined type {type_name}")
                        })?;
                    }
                }
                Ok(fields)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Rules {
            types,
            tables,
            allowed_extensions: raw.extensions.allowed.into_iter().collect(),
            ignored_extensions: raw.extensions.ignored.into_iter().collect(),
            allowed_modifier_extensions: raw.extensions.modifier_allowed.into_iter().collect(),
        })
    }

    /// The field table for a type, if the rules know it.
    pub fn fields(&self, type_name: &str) -> Option<&FieldRules> {
        let table = *self.types.get(NameRef::new(type_name))?;
        Some(&self.tables[table])
    }

    /// The field table a resolved [`Treatment::Nested`] names.
    pub fn table(&self, table: usize) -> &FieldRules {
        &self.tables[table]
    }

    /// Recursion into the named type with its rules, if the rules know it.
    pub fn nested(&self, type_name: &str) -> Option<Treatment> {
        Some(Treatment::Nested {
            type_name: Arc::from(type_name),
            table: *self.types.get(NameRef::new(type_name))?,
            filter: None,
        })
    }

    /// Field table for a resource type; unknown resource types get the bare `Resource` rules.
    pub fn resource_fields(&self, resource_type: &str) -> (&str, &FieldRules) {
        match self.types.get_key_value(NameRef::new(resource_type)) {
            Some((k, &table)) if !k.contains('.') => (k, &self.tables[table]),
            _ => ("Resource", &self.tables[self.types["Resource"]]),
        }
    }
}

fn parse_nested(spec: &str) -> Result<Treatment> {
    if spec == "Resource" {
        return Ok(Treatment::Resource);
    }
    let Some((type_name, rest)) = spec.split_once('[') else {
        return Ok(Treatment::Nested {
            type_name: Arc::from(spec),
            table: UNRESOLVED,
            filter: None,
        });
    };
    let cond = rest
        .strip_suffix(']')
        .ok_or_else(|| anyhow!("bad type filter {spec:?}: missing ]"))?;
    let (field, values) = cond
        .split_once('=')
        .ok_or_else(|| anyhow!("bad type filter {spec:?}: expected field=value"))?;
    Ok(Treatment::Nested {
        type_name: Arc::from(type_name),
        table: UNRESOLVED,
        filter: Some(Filter {
            field: field.to_string(),
            values: values.split('|').map(str::to_string).collect(),
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_rules_flatten_inheritance_and_backbones() {
        let rules = Rules::embedded().unwrap();
        let patient = rules.fields("Patient").unwrap();
        assert!(matches!(patient["id"], Treatment::AnonId));
        assert!(matches!(patient["birthDate"], Treatment::Year));
        assert!(matches!(patient["contact"], Treatment::Nested { .. }));
        assert!(!patient.contains_key("name"));
        let contact = rules.fields("Patient.contact").unwrap();
        assert!(contact.contains_key("modifierExtension"));
        assert!(contact.contains_key("extension"));
        let (name, unknown) = rules.resource_fields("Basic");
        assert_eq!(name, "Resource");
        assert!(unknown.contains_key("meta") && !unknown.contains_key("extension"));
        assert_eq!(rules.allowed_extensions.len(), 86);
        assert_eq!(rules.ignored_extensions.len(), 18);
    }

    #[test]
    fn undefined_types_are_rejected() {
        let text = "[type.A]\ntypes = { x = \"Nope\" }\n[extensions]\nallowed=[]\nignored=[]\nmodifier_allowed=[]\n";
        let err = Rules::parse(text).unwrap_err().to_string();
        assert!(err.contains("undefined type Nope"), "{err}");
    }
}
