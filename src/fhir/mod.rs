//! The FHIR R4 element model and the Arrow schemas derived from it.

pub mod model;
pub mod schema;
mod shape_scan;

pub use model::ElementModel;
pub use schema::{Shape, resource_schema};
