//! Integration tests (one binary to keep link times low).

mod bad_input;
mod cluster;
mod console;
mod deid_fixtures;
mod delta;
mod delta_runs;
mod etl_runs;
mod fuzz_regressions;
mod html_text;
mod i2b2;
mod llm;
mod mutate;
mod mutations;
mod nlp;
mod nlp_server;
mod parallel_writes;
mod readers;
mod reference;
mod reruns;
mod robustness;
mod s3_runs;
mod s3_server;
mod spark_tables;
mod store;
mod support;
