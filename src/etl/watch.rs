//! `etl --watch EXPORTS OUTPUT PHI`: keeps running, and loads each export folder under
//! EXPORTS (a folder or an S3 prefix) once its export log has an `export_complete` event, in
//! the order the exports completed, each as one run into the same Delta tables (the row indexes
//! make each cost what changed) and one epoch of the same dataflow. Exports loaded are recorded
//! in `OUTPUT/JobConfig/watched-exports.ndjson`, so a restarted watch does not load them again.
//! SIGTERM or SIGINT lets the export in hand finish, then ends the watch with exit code 0.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::EtlOptions;
use super::run::start_engine;
use crate::exit::{ExitCode, Fatal, one_line};
use crate::output::OutputFormat;
use crate::time::PyDateTime;

/// Where the loaded exports are recorded, under OUTPUT.
pub const RECORD_KEY: &str = "JobConfig/watched-exports.ndjson";

/// Set by SIGTERM and SIGINT.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_signal: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the watch until SIGTERM or SIGINT; `interval` between looks at EXPORTS.
pub fn watch(opts: &EtlOptions, interval: Duration) -> Result<ExitCode, Fatal> {
    if opts.output_format != OutputFormat::Deltalake {
        return Err(Fatal::new(
            ExitCode::ArgsInvalid,
            "--watch loads every export into the same tables: it needs --output-format deltalake",
        ));
    }
    if opts.engine.cluster.is_some() {
        return Err(Fatal::new(
            ExitCode::ArgsInvalid,
            "--watch runs in one process: it cannot be given --hostfile",
        ));
    }
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    let handler = request_stop as extern "C" fn(libc::c_int) as *const () as libc::sighandler_t;
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    super::prepare_output(&opts.output, opts.output_format)?;
    // One set of workers and one dataflow for the whole watch: each export is an epoch of it.
    let mut engine = start_engine(&opts.engine)?;
    let mut loaded = loaded_exports(opts)?;
    let mut failed: HashSet<String> = HashSet::new();
    crate::say!(
        "Watching {} for completed exports (every {} s; SIGTERM or Ctrl-C stops)...",
        opts.input.url(),
        interval.as_secs()
    );
    while !STOP.load(Ordering::SeqCst) {
        let waiting = completed_exports(opts)
            .into_iter()
            .filter(|(name, _)| !loaded.contains(name) && !failed.contains(name));
        for (name, completed) in waiting.collect::<Vec<_>>() {
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            let started = Instant::now();
            if !engine.is_running() {
                // The last export's run stopped early, and its workers with it.
                engine = start_engine(&opts.engine)?;
            }
            crate::say!(
                "watch: loading export {name} (completed {completed}) as epoch {}",
                engine.next_epoch()
            );
            let export = EtlOptions {
                input: opts.input.join(&name),
                ..opts.clone()
            };
            match super::run_on(&export, &mut engine) {
                Ok(ran) if ran.code == ExitCode::Success => {
                    record(opts, &name, &completed)?;
                    loaded.insert(name.clone());
                    crate::say!(
                        "watch: export {name} loaded in {:.1} s: {}",
                        started.elapsed().as_secs_f64(),
                        ran.line()
                    );
                }
                Ok(super::Ran { code, .. }) => {
                    crate::say!(
                        "watch: export {name} did not load completely (exit code {}); it is \
                         tried again when the watch restarts",
                        code as i32
                    );
                    failed.insert(name);
                }
                Err(fatal) => {
                    crate::say!(
                        "watch: export {name} failed: {}; it is tried again when the watch \
                         restarts",
                        fatal.message
                    );
                    failed.insert(name);
                }
            }
        }
        let until = Instant::now() + interval;
        while Instant::now() < until && !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    crate::say!("watch: stopped ({} exports loaded)", loaded.len());
    Ok(ExitCode::Success)
}

/// The exports the record says were loaded.
fn loaded_exports(opts: &EtlOptions) -> Result<HashSet<String>, Fatal> {
    let text = opts
        .output
        .read(RECORD_KEY)
        .map_err(|e| Fatal::new(ExitCode::Failure, one_line(&e)))?
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["export"].as_str().map(str::to_string))
        .collect())
}

/// Records an export as loaded.
fn record(opts: &EtlOptions, name: &str, completed: &str) -> Result<(), Fatal> {
    let line = serde_json::json!({
        "export": name,
        "completed": completed,
        "loaded": PyDateTime::now_utc().isoformat(),
    });
    opts.output
        .append(RECORD_KEY, format!("{line}\n").as_bytes())
        .map_err(|e| Fatal::new(ExitCode::Failure, one_line(&e)))
}

/// The export folders directly under EXPORTS whose log has an `export_complete` event, with
/// its time, oldest first. A listing that fails is a warning: the next look tries again.
fn completed_exports(opts: &EtlOptions) -> Vec<(String, String)> {
    let entries = match opts.input.list() {
        Ok(entries) => entries,
        Err(e) => {
            crate::say!(
                "warning: watch: could not list {}: {}",
                opts.input.url(),
                one_line(&e)
            );
            return Vec::new();
        }
    };
    let mut found: Vec<(i64, String, String)> = entries
        .iter()
        .filter_map(|e| e.key.strip_suffix("/log.ndjson"))
        .filter(|folder| !folder.contains('/'))
        .filter_map(|folder| {
            let log = opts.input.read(&format!("{folder}/log.ndjson")).ok()??;
            let completed = String::from_utf8_lossy(&log)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| v["eventId"] == "export_complete")?["timestamp"]
                .as_str()?
                .to_string();
            let at = PyDateTime::parse(&completed).ok()?.utc_micros();
            Some((at, folder.to_string(), completed))
        })
        .collect();
    found.sort();
    found.into_iter().map(|(_, name, at)| (name, at)).collect()
}
