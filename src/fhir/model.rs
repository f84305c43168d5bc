//! The FHIR R4 element model (types, their properties, cardinality), generated from the R4
//! specification by `tools/gen_fhir_r4_model.py` and embedded in the binary.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

const R4_MODEL: &str = include_str!("r4_model.tsv");

/// The type of a property.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Str,
    Bool,
    /// FHIR date/dateTime/instant/time: kept as strings, as they appear in the JSON.
    Date,
    /// A complex type or backbone element, by name.
    Struct(String),
}

/// One property of a FHIR type.
#[derive(Debug, Clone)]
pub struct Property {
    pub name: String,
    pub kind: Kind,
    pub is_list: bool,
}

/// All R4 types with their properties in specification order.
#[derive(Debug)]
pub struct ElementModel {
    types: HashMap<String, Vec<Property>>,
    resources: HashSet<String>,
}

impl ElementModel {
    /// The embedded R4 model, parsed once per process.
    pub fn r4() -> &'static ElementModel {
        static MODEL: OnceLock<ElementModel> = OnceLock::new();
        MODEL.get_or_init(|| ElementModel::parse(R4_MODEL))
    }

    fn parse(text: &str) -> ElementModel {
        let mut types: HashMap<String, Vec<Property>> = HashMap::new();
        let mut resources = HashSet::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let cols: Vec<&str> = line.split('\t').collect();
            match cols.as_slice() {
                ["R", name] => {
                    resources.insert(name.to_string());
                }
                ["F", owner, name, kind, list] => {
                    let kind = match *kind {
                        "int" => Kind::Int,
                        "float" => Kind::Float,
                        "str" => Kind::Str,
                        "bool" => Kind::Bool,
                        "date" => Kind::Date,
                        other => Kind::Struct(other.to_string()),
                    };
                    types.entry(owner.to_string()).or_default().push(Property {
                        name: name.to_string(),
                        kind,
                        is_list: *list == "1",
                    });
                }
                _ => panic!("malformed line in embedded R4 model: {line}"),
            }
        }
        ElementModel { types, resources }
    }

    /// Whether `name` is an R4 resource type.
    pub fn is_resource(&self, name: &str) -> bool {
        self.resources.contains(name)
    }

    /// The properties of a type, in specification order.
    pub fn properties(&self, type_name: &str) -> &[Property] {
        self.types.get(type_name).map(Vec::as_slice).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_knows_resources_and_properties() {
        let m = ElementModel::r4();
        assert!(m.is_resource("Patient") && m.is_resource("Observation"));
        assert!(!m.is_resource("CodeableConcept"));
        let birth = m
            .properties("Patient")
            .iter()
            .find(|p| p.name == "birthDate")
            .unwrap();
        assert_eq!(birth.kind, Kind::Date);
        let addr = m
            .properties("Patient")
            .iter()
            .find(|p| p.name == "address")
            .unwrap();
        assert!(addr.is_list && addr.kind == Kind::Struct("Address".into()));
    }
}
