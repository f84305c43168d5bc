//! Console progress for long runs: a line per table whose counts moved, every few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::RunShared;
use crate::engine::dataflow::{bytes_read, read_by_table};
use crate::memory::human_bytes;

/// Prints progress until stopped.
pub struct ProgressPrinter {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl ProgressPrinter {
    /// Starts printing every `interval`; `total_bytes` is the input size.
    pub fn start(shared: Arc<RunShared>, total_bytes: u64, interval: Duration) -> ProgressPrinter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            let mut next = started + interval;
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if Instant::now() < next {
                    continue;
                }
                next += interval;
                let read = bytes_read(&shared);
                let pct = if total_bytes == 0 {
                    100.0
                } else {
                    100.0 * read as f64 / total_bytes as f64
                };
                eprintln!(
                    "  [{:>5.0}s] read {} of {} ({pct:.0}%), memory in use {}",
                    started.elapsed().as_secs_f64(),
                    human_bytes(read),
                    human_bytes(total_bytes),
                    human_bytes(shared.budget.used())
                );
                let reads = read_by_table(&shared);
                let written = shared.report.progress.written.lock().unwrap().clone();
                for (table, r) in &reads {
                    let w = written.get(table).copied().unwrap_or(0);
                    if last.get(table) != Some(&(*r, w)) {
                        eprintln!("    {table}: {r} read, {w} written");
                        last.insert(table.clone(), (*r, w));
                    }
                }
            }
        });
        ProgressPrinter {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops the printer.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
