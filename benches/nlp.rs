//! NLP throughput: `cargo bench --bench nlp`.
//!
//! 1. The embedded engine on one thread, over the bundled Synthea notes: notes per second per
//!    core (target: at least 2,000).
//! 2. The server engine against a local fake cTAKES/cNLP server that answers after 50 ms, at
//!    1 to 16 notes in flight: notes per second should grow near-linearly with concurrency.

#[path = "../tests/it/nlp_server.rs"]
#[allow(dead_code)]
mod nlp_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use cumulus_etl::nlp::cache::NlpCache;
use cumulus_etl::nlp::ctakes::{CtakesSymptoms, ServerUrls};
use cumulus_etl::nlp::embedded::EmbeddedEngine;
use cumulus_etl::nlp::engine::{EmbeddedSymptoms, SymptomEngine};
use cumulus_etl::nlp::http::RetryPolicy;
use cumulus_etl::nlp::study::find_study;
use nlp_server::FakeNlpServer;

fn synthea_notes() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/synthea-10/DocumentReference.000.ndjson"
    );
    std::fs::read_to_string(path)
        .expect("the bundled Synthea sample")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|d| {
            let data = d
                .pointer("/content/0/attachment/data")?
                .as_str()?
                .to_string();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(data)
                .ok()?;
            String::from_utf8(bytes).ok()
        })
        .collect()
}

fn embedded(notes: &[String]) {
    let study = find_study("covid_symptom__nlp_results").unwrap();
    let dictionary = study.dictionary();
    let engine = EmbeddedSymptoms {
        engine: Arc::new(EmbeddedEngine::new(&dictionary)),
        covid_cuis: Arc::new(dictionary.cuis.clone()),
        model: study.engine.polarity,
    };
    let bytes: usize = notes.iter().map(String::len).sum();
    let rounds = 4;
    let start = Instant::now();
    let mut found = 0;
    for _ in 0..rounds {
        for n in notes {
            found += engine.find_now(n).len();
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let count = notes.len() * rounds;
    println!(
        "embedded engine, 1 thread: {count} notes ({:.1} KB average) in {secs:.2} s = {:.0} notes/s ({found} findings)",
        bytes as f64 / notes.len() as f64 / 1e3,
        count as f64 / secs
    );
}

fn concurrency(notes: &[String]) {
    let server = FakeNlpServer::start(Duration::from_millis(50), Vec::new());
    let study = find_study("covid_symptom__nlp_results").unwrap();
    let cuis = Arc::new(study.dictionary().cuis);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("server engine, fake server answering after 50 ms (cTAKES then cNLP per note):");
    let mut base = 0.0;
    for c in [1usize, 2, 4, 8, 16] {
        let cache_dir = tempfile::tempdir().unwrap();
        let urls = ServerUrls {
            ctakes: server.ctakes_url(),
            cnlp: server.negation_url(),
        };
        let engine = Arc::new(
            CtakesSymptoms::new(
                urls,
                study.engine.clone(),
                NlpCache::ctakes(
                    &cumulus_etl::store::ObjectLocation::private_folder(cache_dir.path()).unwrap(),
                ),
                cuis.clone(),
                c,
                RetryPolicy::default(),
            )
            .unwrap(),
        );
        // Distinct texts so nothing comes from the cache; the mock gives every note 2 requests.
        let count = 8 * c.max(2);
        let texts: Vec<String> = (0..count)
            .map(|i| format!("Note{i} fever itch {}", &notes[i % notes.len()][..40]))
            .collect();
        let start = Instant::now();
        runtime.block_on(async {
            let tasks: Vec<_> = texts
                .into_iter()
                .map(|t| {
                    let e = engine.clone();
                    tokio::spawn(async move { e.find(&t).await.map(|f| f.len()) })
                })
                .collect();
            for t in tasks {
                t.await.unwrap().unwrap();
            }
        });
        let rate = count as f64 / start.elapsed().as_secs_f64();
        if c == 1 {
            base = rate;
        }
        println!(
            "  concurrency {c:>2}: {count:>3} notes, {rate:>6.1} notes/s, {:.1}x concurrency 1",
            rate / base
        );
    }
}

fn main() {
    let notes = synthea_notes();
    embedded(&notes);
    concurrency(&notes);
}
