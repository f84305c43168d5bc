//! The ETL's hot paths on the bundled Synthea sample, one line at a time: line splitting, JSON
//! parsing (into a tree, and into the token tape the ETL uses), de-identification (scrub + codebook hashing), the whole line-to-row step, Arrow
//! conversion of a batch, and id hashing alone.

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use cumulus_etl::deid::{Codebook, ExtensionReport, Rules, Scrubber};
use cumulus_etl::engine::rows::{TableChunk, TaskContext};
use cumulus_etl::etl::rows::{BundleLines, process_bundle};
use cumulus_etl::json::Tape;
use cumulus_etl::output::{RowBatch, TableKind, arrow_rows::to_record_batch};
use serde_json::Value;

const SALT: &str = "e359591746e6ea4b7d2a9fed5e0ee3b1e3bb52e40df6a9d3e8cb28e4a6e2e1a0";

fn sample(resource: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/synthea-10")
        .join(format!("{resource}.000.ndjson"));
    std::fs::read(path).expect("the bundled Synthea sample")
}

fn scrubber() -> Scrubber {
    let codebook = Arc::new(Codebook::in_memory(SALT).unwrap());
    Scrubber::new(Rules::embedded().unwrap(), codebook, true)
}

fn context(resource: &str) -> TaskContext {
    TaskContext {
        task: 0,
        table: resource.to_lowercase(),
        resource_type: resource.to_string(),
        kind: TableKind::Fhir(resource.to_string()),
        whole_chunks: false,
        needs_shape: true,
        utf8_only: true,
        completion: None,
    }
}

fn lines_of(bytes: &[u8]) -> BundleLines<'_> {
    BundleLines {
        path: "sample.ndjson",
        bytes,
        first_line: 1,
    }
}

fn hot_paths(c: &mut Criterion) {
    for resource in ["MedicationRequest", "Encounter", "Patient"] {
        let bytes = sample(resource);
        let lines: Vec<&[u8]> = bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        let mut group = c.benchmark_group(resource);
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        group.sample_size(20);

        group.bench_function("split_lines", |b| {
            b.iter(|| memchr::memchr_iter(b'\n', &bytes).count())
        });
        group.bench_function("parse_json_value", |b| {
            b.iter(|| {
                lines
                    .iter()
                    .map(|l| serde_json::from_slice::<Value>(l).unwrap())
                    .count()
            })
        });
        let mut tape = Tape::default();
        group.bench_function("parse_json_tape", |b| {
            b.iter(|| {
                lines
                    .iter()
                    .map(|l| tape.parse(l).unwrap().token_count())
                    .sum::<usize>()
            })
        });
        let scrubber = scrubber();
        group.bench_function("parse_and_deidentify", |b| {
            let mut out = Vec::with_capacity(bytes.len());
            let mut report = ExtensionReport::default();
            b.iter(|| {
                out.clear();
                for line in &lines {
                    let doc = tape.parse(line).unwrap();
                    let _ = scrubber.scrub(&doc, &mut out, &mut report);
                }
                out.len()
            })
        });
        let ctx = context(resource);
        group.bench_function("line_to_row", |b| {
            b.iter(|| {
                let mut main = TableChunk::new(0, &ctx.table);
                let mut report = ExtensionReport::default();
                process_bundle(
                    &ctx,
                    &scrubber,
                    lines_of(&bytes),
                    (&mut main, &mut None),
                    &mut report,
                    &mut |_| {},
                );
                main.len()
            })
        });
        let mut chunk = TableChunk::new(0, &ctx.table);
        process_bundle(
            &ctx,
            &scrubber,
            lines_of(&bytes),
            (&mut chunk, &mut None),
            &mut ExtensionReport::default(),
            &mut |_| {},
        );
        let rows: Vec<&[u8]> = chunk.rows().collect();
        group.bench_function("to_arrow", |b| {
            b.iter(|| {
                to_record_batch(
                    &ctx.kind,
                    &RowBatch {
                        rows: rows.clone(),
                        shape: &chunk.shape,
                        tags: Vec::new(),
                        keys_new: false,
                    },
                )
                .unwrap()
                .batch
                .num_rows()
            })
        });
        group.finish();
    }

    let codebook = Codebook::in_memory(SALT).unwrap();
    let ids: Vec<String> = (0..10_000)
        .map(|i| format!("{i:08x}-d070-985e-b695-b5f12fffd23e"))
        .collect();
    let mut group = c.benchmark_group("hashing");
    group.throughput(Throughput::Elements(ids.len() as u64));
    group.bench_function("fake_id", |b| {
        b.iter(|| {
            ids.iter()
                .map(|id| codebook.fake_id("Condition", id, false).len())
                .sum::<usize>()
        })
    });
    group.finish();
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
