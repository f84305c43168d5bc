//! The streaming engine: a timely dataflow of source operators (read + de-identify bundles under
//! the memory budget) feeding one sink per task (batch, dedup, write in order).

pub mod cluster;
pub mod config;
pub mod control;
pub mod dataflow;
pub mod epochs;
pub mod report;
pub mod rows;
pub mod sink;
pub mod source;
pub mod stop;
pub mod wire;
pub mod work;

pub use config::{ClusterConfig, EngineConfig};
pub use control::Audience;
pub use dataflow::{Engine, RunShared, run_dataflow};
