//! Arrow schemas for FHIR tables, built the way Cumulus ETL builds them: every top-level element
//! of the resource (wide), deeper fields only where the batch has them (shallow), full
//! CodeableConcept/Coding/Period/Reference once any part is present, `_field` extension siblings
//! when present, and one merged struct for all contained resources.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Fields, Schema};
use serde::{Deserialize, Serialize};

use super::model::{ElementModel, Kind as ModelKind, Property};
use crate::fast_hash::{FastMap, Name, NameRef};
use crate::json::{Doc, Kind};

const LEVEL_INCLUSION: usize = 1;
const FULL_SCHEMA_TYPES: [&str; 4] = ["CodeableConcept", "Coding", "Period", "Reference"];

/// The union of keys over a batch of rows and list items: which fields the batch really has.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shape {
    /// Looked up for every key of every row (foldhash: cheaper than ordered string compares).
    pub children: FastMap<Name, Shape>,
    /// Resource types of contained resources, tracked at the top level only.
    pub contained_types: BTreeSet<String>,
}

impl Shape {
    /// Adds one row (a resource, as a parsed JSON document) to the shape.
    pub fn add_row(&mut self, row: &Doc<'_>) {
        self.add(row, 0);
        let Some(contained) = row.get(0, "contained") else {
            return;
        };
        if row.token(contained).kind != Kind::Array {
            return;
        }
        for c in row.items(contained) {
            if row.token(c).kind == Kind::Object
                && let Some(t) = row.get_str(c, "resourceType")
            {
                self.contained_types.insert(t.into_owned());
            }
        }
    }

    fn add(&mut self, doc: &Doc<'_>, i: usize) {
        match doc.token(i).kind {
            Kind::Array => doc.items(i).for_each(|item| self.add(doc, item)),
            Kind::Object => {
                for (k, v) in doc.entries(i) {
                    let key = doc.str(k);
                    // Look up before inserting: most keys are already known, and `entry` would
                    // allocate a copy of every key of every row.
                    match self.children.get_mut(NameRef::new(&key)) {
                        Some(child) => child.add(doc, v),
                        None => self
                            .children
                            .entry(key.into_owned().into())
                            .or_default()
                            .add(doc, v),
                    }
                }
            }
            _ => {}
        }
    }

    /// Merges another shape into this one.
    pub fn merge(&mut self, other: &Shape) {
        for (k, v) in &other.children {
            self.children.entry(k.clone()).or_default().merge(v);
        }
        self.contained_types
            .extend(other.contained_types.iter().cloned());
    }
}

/// The schema of a batch of `resource_type` rows with the given shape.
pub fn resource_schema(model: &ElementModel, resource_type: &str, shape: &Shape) -> Schema {
    let mut fields = vec![Field::new("resourceType", DataType::Utf8, true)];
    fields.extend(type_fields(model, resource_type, Some(shape), 0));
    if !shape.contained_types.is_empty()
        && let Some(pos) = fields.iter().position(|f| f.name() == "contained")
    {
        let contained_shape = shape.children.get("contained");
        let mut merged: BTreeMap<String, Field> = BTreeMap::new();
        for ctype in &shape.contained_types {
            if !model.is_resource(ctype) {
                continue;
            }
            merged.insert(
                "resourceType".into(),
                Field::new("resourceType", DataType::Utf8, true),
            );
            for f in type_fields(model, ctype, contained_shape, 2) {
                merged.insert(f.name().clone(), f);
            }
        }
        let item = DataType::Struct(Fields::from(merged.into_values().collect::<Vec<_>>()));
        fields[pos] = Field::new("contained", list_of(item), true);
    }
    Schema::new(fields)
}

fn type_fields(
    model: &ElementModel,
    type_name: &str,
    shape: Option<&Shape>,
    level: usize,
) -> Vec<Field> {
    let inside_full = FULL_SCHEMA_TYPES.contains(&type_name);
    let mut out = Vec::new();
    for prop in model.properties(type_name) {
        if let Some(f) = property_field(model, prop, inside_full, shape, level) {
            out.push(f);
        }
        let sunder = format!("_{}", prop.name);
        if let Some(sub) = shape.and_then(|s| s.children.get(sunder.as_str())) {
            let element = Property {
                name: sunder.clone(),
                kind: ModelKind::Struct("Element".into()),
                is_list: prop.is_list,
            };
            let mut holder = Shape::default();
            holder.children.insert(sunder.into(), sub.clone());
            if let Some(f) = property_field(model, &element, false, Some(&holder), LEVEL_INCLUSION)
            {
                out.push(f);
            }
        }
    }
    out
}

fn property_field(
    model: &ElementModel,
    prop: &Property,
    inside_full: bool,
    parent_shape: Option<&Shape>,
    level: usize,
) -> Option<Field> {
    let shape = parent_shape.and_then(|s| s.children.get(prop.name.as_str()));
    let is_extension = prop.kind == ModelKind::Struct("Extension".into());
    let include = shape.is_some() || (inside_full && !is_extension);
    let data_type = match &prop.kind {
        ModelKind::Struct(type_name) => {
            if level >= LEVEL_INCLUSION && !include {
                return None;
            }
            let children = type_fields(model, type_name, shape, level + 1);
            if children.is_empty() {
                return None;
            }
            DataType::Struct(Fields::from(children))
        }
        primitive => {
            if level > LEVEL_INCLUSION && !include {
                return None;
            }
            match primitive {
                ModelKind::Int => DataType::Int32,
                ModelKind::Float => DataType::Float64,
                ModelKind::Bool => DataType::Boolean,
                _ => DataType::Utf8,
            }
        }
    };
    let data_type = if prop.is_list {
        list_of(data_type)
    } else {
        data_type
    };
    Some(Field::new(&prop.name, data_type, true))
}

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::Tape;
    use serde_json::json;

    #[test]
    fn schema_is_wide_at_top_and_shallow_below() {
        let model = ElementModel::r4();
        let mut shape = Shape::default();
        let row = json!({"resourceType": "Patient", "id": "x",
            "maritalStatus": {"coding": [{"code": "M"}]},
            "address": [{"postalCode": "021", "_postalCode": {"extension": [{"url": "u"}]}}]})
        .to_string();
        shape.add_row(&Tape::default().parse(row.as_bytes()).unwrap());
        let schema = resource_schema(model, "Patient", &shape);
        // every top-level element is present
        for name in [
            "resourceType",
            "id",
            "gender",
            "birthDate",
            "telecom",
            "link",
            "text",
        ] {
            assert!(schema.field_with_name(name).is_ok(), "{name}");
        }
        // a touched CodeableConcept is complete
        let DataType::Struct(cc) = schema.field_with_name("maritalStatus").unwrap().data_type()
        else {
            panic!()
        };
        assert!(cc.find("text").is_some() && cc.find("coding").is_some());
        // the sunder sibling is present because the batch has it
        let DataType::List(addr) = schema.field_with_name("address").unwrap().data_type() else {
            panic!()
        };
        let DataType::Struct(addr) = addr.data_type() else {
            panic!()
        };
        assert!(addr.find("_postalCode").is_some());
        assert!(
            addr.find("city").is_some(),
            "primitive children of a top-level struct are wide"
        );
        assert!(
            addr.find("period").is_none(),
            "struct children only when present"
        );
    }
}
