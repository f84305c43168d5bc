//! One NLP run (`cumulus-etl nlp`, or `etl --task covid_symptom__...`): select the study, find
//! the notes, start the engine (checking the servers first), run the dataflow with the NLP
//! producer, finish the table and report what happened to every note.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::deid::{Codebook, Rules, Scrubber};
use crate::engine::EngineConfig;
use crate::engine::dataflow::ProducerFactory;
use crate::engine::rows::TaskContext;
use crate::etl::run::{RunBuilder, finish_tables, run_to_end, start_engine};
use crate::etl::{
    bundle_size, check_run_arguments, list_input, open_codebook, open_errors_folder,
    prepare_output, print_extension_report, print_summary,
};
use crate::exit::{ExitCode, Fatal};
use crate::fhir::ElementModel;
use crate::input::{bundles, discover};
use crate::output::{OutputFormat, TableKind};
use crate::store::ObjectLocation;
use crate::time::PyDateTime;

use super::cache::NlpCache;
use super::ctakes::{CtakesSymptoms, RetryPolicy, ServerUrls, check_reachable};
use super::embedded::EmbeddedEngine;
use super::engine::EmbeddedSymptoms;
use super::producer::{Dispatch, NlpShared, NoteRows};
use super::study::{Study, all_studies, find_study};

/// Which engine analyses the notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Dictionary matching and negation detection in process (no server).
    Embedded,
    /// cTAKES REST plus cNLP transformers servers.
    Ctakes,
}

/// The options of an NLP run.
#[derive(Debug, Clone)]
pub struct NlpOptions {
    pub input: ObjectLocation,
    pub output: ObjectLocation,
    /// The PHI folder or prefix (private, see [`ObjectLocation::private`]).
    pub phi: ObjectLocation,
    pub output_format: OutputFormat,
    pub batch_size: usize,
    pub tasks: Vec<String>,
    pub errors_to: Option<PathBuf>,
    pub engine_kind: EngineKind,
    /// Notes in flight to the servers at once.
    pub concurrency: usize,
    pub retry: RetryPolicy,
    /// Check that the servers accept connections before starting (6 tries).
    pub init_checks: bool,
    pub init_check_interval: Duration,
    pub engine: EngineConfig,
    pub memory: u64,
    pub optimize_tables: bool,
    pub progress_interval: Duration,
}

/// Whether every named task is an NLP study (and at least one is named). Mixing NLP and
/// other tasks is an error, as upstream.
pub fn names_nlp_tasks(names: &[String]) -> Result<bool, Fatal> {
    let names = crate::tasks::expand_names(names);
    let nlp = names.iter().filter(|n| find_study(n).is_some()).count();
    if nlp > 0 && nlp < names.len() {
        return Err(Fatal::new(
            ExitCode::TaskMismatch,
            "NLP tasks cannot be mixed with other tasks; run them with `cumulus-etl nlp`.",
        ));
    }
    Ok(nlp > 0)
}

/// Picks the studies named by `--task`.
fn select_studies(names: &[String]) -> Result<Vec<Study>, Fatal> {
    let names = crate::tasks::expand_names(names);
    let all = all_studies();
    if names.is_empty() || names.iter().any(|n| n == "help") {
        let list: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
        let code = if names.is_empty() {
            ExitCode::ArgsInvalid
        } else {
            ExitCode::TaskHelp
        };
        return Err(Fatal::new(
            code,
            format!("Available NLP tasks:\n  {}", list.join("\n  ")),
        ));
    }
    if crate::tasks::select_tasks(&names, &[]).is_ok() {
        return Err(Fatal::new(
            ExitCode::TaskMismatch,
            "`cumulus-etl nlp` runs NLP tasks only; run FHIR tasks with `cumulus-etl etl`.",
        ));
    }
    names_nlp_tasks(&names)?;
    let mut picked = Vec::new();
    for n in &names {
        match find_study(n) {
            Some(s) if !picked.iter().any(|p: &Study| p.name == s.name) => picked.push(s),
            Some(_) => {}
            None => {
                return Err(Fatal::new(
                    ExitCode::TaskUnknown,
                    format!("Unknown task '{n}' requested. Use --task=help to list the tasks."),
                ));
            }
        }
    }
    Ok(picked)
}

/// Runs the selected NLP tasks one after the other; 0, or 19 when a note or batch failed.
pub fn run(opts: &NlpOptions) -> Result<ExitCode, Fatal> {
    let started_at = Instant::now();
    let input = &opts.input;
    let output = &opts.output;
    check_run_arguments(input, opts.batch_size)?;
    if opts.engine.cluster.is_some() {
        return Err(Fatal::new(
            ExitCode::ArgsInvalid,
            "NLP runs in one process: `nlp` cannot be given --hostfile",
        ));
    }
    let studies = select_studies(&opts.tasks)?;
    let rejected = open_errors_folder(&opts.errors_to)?;
    let wanted: HashSet<String> = studies
        .iter()
        .flat_map(|s| s.source.resources.iter().cloned())
        .collect();
    let found = discover(&list_input(input)?, Some(&wanted), ElementModel::r4())?;
    for u in &found.unreadable {
        crate::say!("warning: {}: skipped: {}", u.name, u.reason);
    }
    if found.files.is_empty() {
        return Err(Fatal::new(
            ExitCode::MissingRequestedResources,
            format!(
                "No {} files found in {}.",
                wanted.into_iter().collect::<Vec<_>>().join(" or "),
                input.url()
            ),
        ));
    }
    prepare_output(output, opts.output_format)?;
    // NLP runs never record new Patient/Encounter mappings, as upstream.
    let codebook = open_codebook(&opts.phi, output, false)?;
    codebook.save()?;
    let runtime = match opts.engine_kind {
        EngineKind::Ctakes => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("cumulus-nlp")
                .build()
                .map_err(|e| {
                    Fatal::new(ExitCode::Failure, format!("starting the NLP runtime: {e}"))
                })?,
        ),
        EngineKind::Embedded => None,
    };
    crate::say!("NLP configuration:");
    crate::say!("  Input path:  {}", opts.input.url());
    crate::say!(
        "  Output path: {} ({})",
        opts.output.url(),
        opts.output_format.name()
    );
    crate::say!("  PHI path:    {}", opts.phi.url());
    crate::say!(
        "  Engine:      {}",
        match opts.engine_kind {
            EngineKind::Embedded => "embedded (dictionary + negation detection)".to_string(),
            EngineKind::Ctakes => format!("cTAKES + cNLP, {} notes in flight", opts.concurrency),
        }
    );

    let mut failed = false;
    let mut rejected = rejected;
    for study in studies {
        let files: Vec<_> = found
            .files
            .iter()
            .filter(|f| study.source.resources.contains(&f.resource_type))
            .cloned()
            .collect();
        let outcome = run_study(
            opts,
            &study,
            &files,
            &codebook,
            runtime.as_ref(),
            rejected.take(),
        )?;
        failed |= outcome;
    }
    crate::say!("Finished in {:.1}s.", started_at.elapsed().as_secs_f64());
    if failed {
        crate::say!("🚨 One or more tasks above did not 100% complete! 🚨");
        Ok(ExitCode::TaskFailed)
    } else {
        crate::say!("⭐ All tasks completed successfully! ⭐");
        Ok(ExitCode::Success)
    }
}

/// Runs one study; returns whether anything failed.
fn run_study(
    opts: &NlpOptions,
    study: &Study,
    files: &[crate::input::InputFile],
    codebook: &Arc<Codebook>,
    runtime: Option<&tokio::runtime::Runtime>,
    rejected: Option<std::fs::File>,
) -> Result<bool, Fatal> {
    let started_at = Instant::now();
    let started = PyDateTime::now_utc();
    crate::say!("Running {}...", study.name);
    let dictionary = study.dictionary();
    let covid_cuis = Arc::new(dictionary.cuis.clone());
    let server = match runtime {
        Some(rt) => {
            let urls = ServerUrls::from_env(study.engine.polarity);
            if opts.init_checks {
                for (url, code, what) in [
                    (&urls.ctakes, ExitCode::CtakesMissing, "cTAKES"),
                    (&urls.cnlp, ExitCode::CnlpMissing, "cNLP"),
                ] {
                    rt.block_on(check_reachable(url, 6, opts.init_check_interval))
                        .map_err(|e| {
                            Fatal::new(
                                code,
                                format!("A running {what} server was not found at {url}: {e}"),
                            )
                        })?;
                }
            }
            Some(Arc::new(
                CtakesSymptoms::new(
                    urls,
                    study.engine.clone(),
                    NlpCache::new(&opts.phi),
                    covid_cuis.clone(),
                    opts.concurrency,
                    opts.retry,
                )
                .map_err(Fatal::from)?,
            ))
        }
        None => None,
    };
    let dispatch = match (&server, runtime) {
        (Some(engine), Some(rt)) => Dispatch::Spawn(engine.clone(), rt.handle().clone()),
        _ => Dispatch::Inline(EmbeddedSymptoms {
            engine: Arc::new(EmbeddedEngine::new(&dictionary)),
            covid_cuis,
            model: study.engine.polarity,
        }),
    };
    let errors = match &opts.errors_to {
        Some(dir) => {
            let dir = dir.join(&study.name);
            std::fs::create_dir_all(&dir)
                .and_then(|_| std::fs::File::create(dir.join("nlp-errors.ndjson")))
                .map(Some)
                .map_err(|e| {
                    Fatal::new(
                        ExitCode::Failure,
                        format!("creating {}: {e}", dir.display()),
                    )
                })?
        }
        None => None,
    };
    let nlp = Arc::new(NlpShared::new(
        study.clone(),
        dispatch,
        started.isoformat(),
        errors,
    ));

    let bundle_bytes = bundle_size(opts.memory, opts.engine.workers);
    let work = bundles::plan(files, bundle_bytes)?;
    let total_bytes: u64 = files.iter().map(|f| f.size).sum();
    let kind = TableKind::NlpSymptoms {
        task_version: study.task_version,
    };
    let contexts: Vec<TaskContext> = study
        .source
        .resources
        .iter()
        .enumerate()
        .map(|(i, resource)| TaskContext {
            task: i as u32,
            table: study.name.clone(),
            resource_type: resource.clone(),
            kind: kind.clone(),
            whole_chunks: true,
            needs_shape: false,
            // Result rows are built from Rust strings.
            utf8_only: false,
            completion: None,
        })
        .collect();
    let shared = RunBuilder {
        memory: opts.memory,
        format: opts.output_format,
        output: opts.output.clone(),
        run_name: started.folder_name(),
        batch_size: opts.batch_size,
        workers: opts.engine.workers,
        bundle_bytes,
        errors_to: opts.errors_to.clone(),
        rejected,
        row_journal: None,
    }
    .build(
        Scrubber::new(Rules::embedded()?, codebook.clone(), false),
        codebook,
        contexts,
        work,
    )?;
    let producer_state = nlp.clone();
    let producers: ProducerFactory =
        Arc::new(move |_| Box::new(NoteRows::new(producer_state.clone())));
    run_to_end(
        &shared,
        &mut start_engine(&opts.engine)?,
        producers,
        total_bytes,
        opts.progress_interval,
    )?;

    shared.touch_if_empty(&study.name, &shared.work.tasks[0])?;
    finish_tables(&shared, opts.optimize_tables);
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let s = &nlp.stats;
    crate::say!(
        "Notes: {} read, {} selected (ED notes with a valid status), {} with text, {} analysed, {} failed",
        n(&s.seen),
        n(&s.selected),
        n(&s.with_text),
        n(&s.analysed),
        n(&s.failed)
    );
    if let Some(server) = &server {
        crate::say!(
            "Servers: {} requests, {} retries, {} answers from the cache",
            n(&server.stats.requests),
            n(&server.stats.retries),
            n(&server.stats.cache_hits)
        );
    }
    let stats = shared.report.stats.lock().unwrap();
    print_extension_report(&stats.extensions);
    print_summary(&stats, started_at.elapsed(), total_bytes, &shared.budget);
    let failed = n(&s.failed) > 0
        || stats
            .tables
            .values()
            .any(|t| t.had_errors || t.success < t.attempt);
    Ok(failed)
}
