//! One ETL run, start to finish: check the arguments and folders, find the input, run the
//! dataflow, then finish the tables (empty tables, deletions, completion rows) and report.

pub mod cluster;
pub mod producer;
pub mod progress;
pub mod rerun;
pub mod rows;
pub mod run;
pub mod watch;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::deid::{Codebook, Rules, Scrubber};
use crate::engine::rows::{CompletionTemplate, TaskContext};
use crate::engine::{Engine, EngineConfig, RunShared};
use crate::exit::{ExitCode, Fatal, one_line};
use crate::fhir::{ElementModel, Shape};
use crate::input::deleted::read_deleted_ids;
use crate::input::export_log::read_export_log;
use crate::input::i2b2::discover_i2b2;
use crate::input::{Discovery, Listing, bundles, discover};
use crate::memory::{MemoryBudget, human_bytes};
use crate::output::job::{self, JobConfig};
use crate::output::{OutputFormat, RowBatch, TableKind, write_and_wait};
use crate::store::{self, ObjectLocation};
use crate::tasks::{self, COMPLETION_TABLE, Task};
use crate::time::PyDateTime;
use rerun::RerunIndex;
use run::{RunBuilder, finish_tables, run_to_end, start_engine};

/// The options of `cumulus-etl etl`.
#[derive(Debug, Clone)]
pub struct EtlOptions {
    pub input: ObjectLocation,
    pub output: ObjectLocation,
    /// The PHI folder or prefix (private, see [`ObjectLocation::private`]).
    pub phi: ObjectLocation,
    pub input_format: InputFormat,
    pub output_format: OutputFormat,
    pub batch_size: usize,
    pub tasks: Vec<String>,
    pub exclusions: Vec<String>,
    pub errors_to: Option<PathBuf>,
    pub comment: Option<String>,
    pub export_group: Option<String>,
    pub export_timestamp: Option<String>,
    pub allow_missing_resources: bool,
    pub engine: EngineConfig,
    pub memory: u64,
    /// Compact and vacuum Delta tables at the end (`--no-table-optimization` turns it off).
    pub optimize_tables: bool,
    pub progress_interval: Duration,
}

/// The input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InputFormat {
    /// A FHIR bulk export: NDJSON files, optionally gzipped.
    Ndjson,
    /// An i2b2 warehouse export: `patient_dimension.csv`, `visit_dimension.csv`, ...
    I2b2,
}

/// Runs the ETL; the returned code is 0 or 19 (some batch failed to write).
pub fn run(opts: &EtlOptions) -> Result<ExitCode, Fatal> {
    let mut engine = start_engine(&opts.engine)?;
    let outcome = run_on(opts, &mut engine).map(|ran| ran.code);
    match engine.process() {
        // Every process of a cluster run exits with the run's code; each printed its error.
        // A run whose workers stopped (a lost process) cannot agree: each exits with its own.
        (_, processes) if processes > 1 && engine.is_running() => {
            if let Err(fatal) = &outcome {
                crate::say!("{}", fatal.message);
            }
            cluster::agree(&mut engine, &outcome)
        }
        _ => outcome,
    }
}

/// How a run ended, in a line's worth of counts (the watch prints one per export).
#[derive(Debug, Clone, Copy)]
pub struct Ran {
    pub code: ExitCode,
    /// Rows of the tasks' tables written, or left out as unchanged.
    pub rows: u64,
    /// Of those, rows left out as unchanged (re-runs).
    pub unchanged: u64,
    /// Input lines skipped (bad input).
    pub skipped: u64,
    /// Input bytes (read, or left out unread as unchanged).
    pub bytes: u64,
}

impl Ran {
    /// The counts in a few words.
    pub fn line(&self) -> String {
        format!(
            "{} rows ({} unchanged, left out), {} input lines skipped, {} of input",
            self.rows,
            self.unchanged,
            self.skipped,
            human_bytes(self.bytes)
        )
    }
}

/// Runs the ETL as the next epoch of `engine` (see [`run`]).
pub fn run_on(opts: &EtlOptions, engine: &mut Engine) -> Result<Ran, Fatal> {
    let started_at = Instant::now();
    let started = PyDateTime::now_utc();
    let input = &opts.input;
    let output = &opts.output;
    check_run_arguments(input, opts.batch_size)?;
    let mut selected = tasks::select_tasks(&opts.tasks, &opts.exclusions)?;
    print_config(opts, &started, &selected);
    let (process, processes) = engine.process();
    let cluster = processes > 1;
    if cluster {
        crate::say!("  Process:      {process} of {processes} (--hostfile)");
    }
    // Each process of a cluster run keeps its rejected rows in a folder of its own.
    let errors_to = match (&opts.errors_to, cluster) {
        (Some(dir), true) => Some(dir.join(format!("process-{process}"))),
        (dir, _) => dir.clone(),
    };
    let rejected = open_errors_folder(&errors_to)?;

    let model = ElementModel::r4();
    let wanted: HashSet<String> = selected.iter().map(|t| t.resource.clone()).collect();
    let listing = list_input(input)?;
    let found = match opts.input_format {
        InputFormat::Ndjson => discover(&listing, Some(&wanted), model)?,
        InputFormat::I2b2 => Discovery {
            files: discover_i2b2(&listing, &wanted),
            unreadable: Vec::new(),
        },
    };
    for u in &found.unreadable {
        crate::say!("warning: {}: skipped: {}", u.name, u.reason);
    }
    if !opts.allow_missing_resources {
        let present = found.resource_types();
        let explicit = !tasks::expand_names(&opts.tasks).is_empty();
        let missing: Vec<&Task> = selected
            .iter()
            .filter(|t| !present.contains(&t.resource))
            .collect();
        if explicit && !missing.is_empty() {
            let names: Vec<&str> = missing.iter().map(|t| t.resource.as_str()).collect();
            return Err(Fatal::new(
                ExitCode::MissingRequestedResources,
                format!(
                    "Required resources not found in {}: {}\nUse --allow-missing-resources to run these tasks anyway.",
                    input.url(),
                    names.join(", ")
                ),
            ));
        }
        for t in &missing {
            crate::say!("No {} files found in {}", t.resource, input.url());
        }
        selected.retain(|t| present.contains(&t.resource));
        if selected.is_empty() {
            return Err(Fatal::new(
                ExitCode::MissingRequestedResources,
                "No supported resources found.",
            ));
        }
    }

    let (deleted, bad_deleted) = match opts.input_format {
        InputFormat::Ndjson => read_deleted_ids(&listing)?,
        InputFormat::I2b2 => Default::default(),
    };
    if bad_deleted > 0 {
        crate::say!(
            "warning: {bad_deleted} unreadable lines in {}",
            input.url_of("deleted")
        );
    }

    let log = read_export_log(&listing);
    let group = opts
        .export_group
        .clone()
        .or_else(|| log.as_ref().ok().map(|l| l.group_name.clone()));
    let export_time =
        match &opts.export_timestamp {
            Some(t) => Some(PyDateTime::parse(t).map_err(|e| {
                Fatal::new(ExitCode::ArgsInvalid, format!("--export-timestamp: {e}"))
            })?),
            None => log.as_ref().ok().map(|l| l.export_time.clone()),
        };
    let export_url = log.as_ref().ok().map(|l| l.export_url.clone());
    let (group, export_time) = match (group, export_time) {
        (Some(g), Some(t)) => (g, t),
        (g, t) => {
            let message = match (g, t) {
                (None, None) => format!(
                    "Could not read export group and time from an export log in {} ({}).\n\
                     Provide them with --export-group and --export-timestamp.",
                    input.url(),
                    log.as_ref()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default()
                ),
                (None, _) => "Missing --export-group argument.".to_string(),
                _ => "Missing --export-timestamp argument.".to_string(),
            };
            return Err(Fatal::new(ExitCode::CompletionArgMissing, message));
        }
    };

    let phi = &opts.phi;
    let codebook = match cluster {
        false => {
            let codebook = open_codebook(phi, output, true)?;
            prepare_output(output, opts.output_format)?;
            codebook.save()?;
            codebook
        }
        true => cluster::open_codebook(engine, phi, output, opts.output_format)?,
    };

    let exclusions = tasks::expand_names(&opts.exclusions).join(",");
    let job_dir = job::job_dir(output, &started);
    let config = JobConfig {
        dir_input: opts.input.url().to_string(),
        dir_output: opts.output.url().to_string(),
        dir_phi: opts.phi.url().to_string(),
        path: job_dir.url_of("job_config.json"),
        input_format: match opts.input_format {
            InputFormat::Ndjson => "ndjson",
            InputFormat::I2b2 => "i2b2",
        }
        .into(),
        output_format: opts.output_format.name().into(),
        comment: opts.comment.clone(),
        batch_size: opts.batch_size,
        tasks: selected
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
        export_group_name: Some(group.clone()),
        export_timestamp: Some(export_time.isoformat()),
        export_url: export_url.clone(),
        codebook_id: codebook.codebook_id(),
        exclusions: exclusions.clone(),
    };
    if process == 0 {
        job::write_job_config(&job_dir, &config)?;
    }

    // The dataflow.
    let template = CompletionTemplate {
        group_name: group.clone(),
        export_time: export_time.isoformat(),
        excluded_resources: exclusions.clone(),
    };
    let contexts: Vec<TaskContext> = selected
        .iter()
        .enumerate()
        .map(|(i, t)| TaskContext {
            task: i as u32,
            table: t.name.clone(),
            resource_type: t.resource.clone(),
            more_resource_types: Vec::new(),
            kind: TableKind::Fhir(t.resource.clone()),
            whole_chunks: false,
            needs_shape: opts.output_format != OutputFormat::Ndjson,
            utf8_only: opts.output_format != OutputFormat::Ndjson,
            completion: t.tracks_encounters.then(|| template.clone()),
        })
        .collect();
    let bundle_bytes = bundle_size(opts.memory, opts.engine.workers);
    // A cluster run's processes each read a share of the bundles; its tables keep no row
    // index yet (the pre-scan sees every line of an export).
    let row_index = keeps_row_index(opts) && !cluster;
    let files = &found.files;
    let mut work = bundles::plan(files, bundle_bytes)?;
    if cluster {
        // A process numbers the lines of its slices without reading the other processes'.
        bundles::count_all_lines(&work);
        work = cluster::share_of(work, process, processes);
    }
    // The same bundles for a re-run's pre-scan, which reads the files before the dataflow.
    let planned: Vec<bundles::WorkItem> = match row_index {
        true => work
            .iter()
            .filter_map(bundles::WorkItem::duplicate)
            .collect(),
        false => Vec::new(),
    };
    let mut total_bytes: u64 = work.iter().map(bundles::WorkItem::bytes).sum();
    let files_read = work
        .iter()
        .map(|item| item.file().name())
        .collect::<HashSet<_>>()
        .len();
    let scrubber = Scrubber::new(Rules::embedded()?, codebook.clone(), true);
    let shared = RunBuilder {
        memory: opts.memory,
        format: opts.output_format,
        output: output.clone(),
        run_name: started.folder_name(),
        batch_size: opts.batch_size,
        workers: opts.engine.workers,
        bundle_bytes,
        errors_to: errors_to.clone(),
        rejected,
        row_journal: row_index.then(|| rerun::row_journal(&codebook)),
        optimize_tables: opts.optimize_tables,
    }
    .build(scrubber, &codebook, contexts, work)?;
    let input = (files.as_slice(), planned.as_slice());
    let rerun = match row_index {
        true => open_rerun_index(opts, &shared, &selected, input, (&codebook, &group)),
        false => None,
    };
    drop(planned);
    crate::say!(
        "Reading {} in {} files with {} workers and a {} memory budget...",
        human_bytes(total_bytes),
        files_read,
        opts.engine.workers,
        human_bytes(opts.memory)
    );
    let for_producers = rerun.clone();
    let producers: crate::engine::dataflow::ProducerFactory = Arc::new(move |_| {
        Box::new(producer::FhirRows {
            rerun: for_producers.clone(),
        })
    });
    run_to_end(
        &shared,
        engine,
        producers,
        total_bytes,
        opts.progress_interval,
    )?;

    // Finishing: tables that got no rows, deletions, completion rows, summaries.
    let completion = Completion {
        group: &group,
        export_time: &export_time,
        export_url: export_url.as_deref(),
        started: &started,
        exclusions: &exclusions,
    };
    // Each process finishes the tasks its workers wrote (all of them, alone).
    let owned: Vec<bool> = (0..selected.len()).map(|t| engine.wrote_task(t)).collect();
    for ((task, ctx), _) in selected
        .iter()
        .zip(&shared.work.tasks)
        .zip(&owned)
        .filter(|(_, owned)| **owned)
    {
        if let Some(rerun) = &rerun {
            // Rows left out as unchanged are in the table, as if written again.
            for table in task.tables() {
                let unchanged = rerun.unchanged(&table);
                if unchanged > 0 {
                    let mut stats = shared.report.stats.lock().unwrap();
                    let summary = stats.summary(&table);
                    summary.attempt += unchanged;
                    summary.success += unchanged;
                }
            }
        }
        for table in task.tables() {
            shared.touch_if_empty(&table, ctx)?;
        }
    }
    let deleted_by_task: Vec<Vec<String>> = selected
        .iter()
        .zip(&owned)
        .map(|(task, owned)| {
            let ids = deleted
                .get(&task.resource)
                .filter(|_| *owned)
                .into_iter()
                .flatten();
            ids.map(|id| codebook.fake_id(&task.resource, id, false))
                .collect()
        })
        .collect();
    // Deletions, and (Delta) the last MERGEs, of every table at once: each table has its own
    // committer, and one after the other they left all but one core idle.
    let settled: Vec<anyhow::Result<()>> = std::thread::scope(|scope| {
        let settling: Vec<_> = selected
            .iter()
            .zip(&shared.work.tasks)
            .zip(&deleted_by_task)
            .zip(&owned)
            .map(|(((task, ctx), ids), owned)| {
                let (shared, format) = (&shared, opts.output_format);
                scope.spawn(move || {
                    if !*owned {
                        return anyhow::Ok(());
                    }
                    if !ids.is_empty() {
                        shared.open_writer(&task.name, ctx)?.delete_ids(ids)?;
                    }
                    if format == OutputFormat::Deltalake {
                        // Delta commits run beside the workers: the completion row, which
                        // tells readers the task's rows are loaded, waits until they are.
                        for table in task.tables() {
                            shared.open_writer(&table, ctx)?.flush();
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        settling
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    // A committer that failed on an internal error after the dataflow ended (its commits lag
    // behind the workers) stops the run here, as it would have stopped the dataflow.
    if let Some(stopped) = shared.stop.cause() {
        return Err(run::stopped_run(&shared, stopped.into()));
    }
    for ((task, ids), outcome) in selected.iter().zip(&deleted_by_task).zip(settled) {
        outcome?;
        if !ids.is_empty() {
            crate::say!(
                "  {} ids deleted from {} (from the export's deleted/ folder)",
                ids.len(),
                task.name
            );
        }
    }
    if cluster {
        // The statistics and codebook mappings of every process meet at process 0, which
        // writes the completion rows once every process's tables hold their rows.
        let report = cluster::ProcessReport::of(
            &shared.report.stats.lock().unwrap(),
            shared.report.told(),
            total_bytes,
            &codebook,
        );
        let others = cluster::gather(engine, &report)?;
        if process != 0 {
            finish_tables(&shared, opts.optimize_tables);
            let stats = shared.report.stats.lock().unwrap();
            crate::say!(
                "Process {process}: its share is written ({} read, {} sent to the other \
                 processes); process 0 prints the run's summary",
                human_bytes(total_bytes),
                human_bytes(report.sent)
            );
            return Ok(Ran {
                code: exit_code_of(&stats),
                rows: 0,
                unchanged: 0,
                skipped: 0,
                bytes: total_bytes,
            });
        }
        let mut stats = shared.report.stats.lock().unwrap();
        let mut sent = report.sent;
        for (from, other) in others {
            let (read, sent_by_it) = other.merge_into((from, &mut stats), &codebook)?;
            total_bytes += read;
            sent += sent_by_it;
        }
        crate::say!(
            "Cluster: {processes} processes sent each other {} of rows ({} per input MB)",
            human_bytes(sent),
            human_bytes(sent * 1_000_000 / total_bytes.max(1))
        );
    }
    let mut completion_rows = Vec::new();
    for task in &selected {
        let row = completion.row(task);
        if opts.output_format == OutputFormat::Deltalake {
            completion_rows.push((task, row));
        } else {
            // Batched-file formats get a file per task, as Cumulus ETL writes them.
            write_completion_rows(&shared, &[(task, row)]);
        }
    }
    // Delta gets the run's completion rows in one commit, not one per task: fourteen one-row
    // commits cost more than the rows, and their files made every run compact the table.
    write_completion_rows(&shared, &completion_rows);
    if opts.output_format == OutputFormat::Deltalake {
        crate::say!(
            "Finishing Delta tables ({})...",
            if opts.optimize_tables {
                "compaction of tables with 8+ files, vacuum, checkpoint, manifest"
            } else {
                "checkpoint, manifest"
            }
        );
    }
    finish_tables(&shared, opts.optimize_tables);
    if let Some(rerun) = &rerun {
        rerun.save(&shared, opts.engine.workers);
    }
    codebook.save()?;
    let stats = shared.report.stats.lock().unwrap();
    for summary in stats.tables.values() {
        job::write_summary(&job_dir, summary)?;
    }
    job::write_context(phi, &started, opts.input.url(), opts.output.url())?;

    print_extension_report(&stats.extensions);
    print_summary(&stats, started_at.elapsed(), total_bytes, &shared.budget);
    let code = exit_code_of(&stats);
    if code == ExitCode::TaskFailed {
        crate::say!("🚨 One or more tasks above did not 100% complete! 🚨");
    } else {
        crate::say!("⭐ All tasks completed successfully! ⭐");
    }
    let of_tasks = |count: &dyn Fn(&str) -> u64| -> u64 {
        selected.iter().map(|task| count(&task.name)).sum()
    };
    Ok(Ran {
        code,
        rows: of_tasks(&|table| stats.tables.get(table).map_or(0, |s| s.success)),
        unchanged: of_tasks(&|table| rerun.as_ref().map_or(0, |r| r.unchanged(table))),
        skipped: stats.skipped.values().sum(),
        bytes: total_bytes,
    })
}

/// 19 if some table did not get every row it was given, else 0.
fn exit_code_of(stats: &crate::engine::report::RunStats) -> ExitCode {
    let failed = stats
        .tables
        .values()
        .any(|s| s.had_errors || s.success < s.attempt);
    match failed {
        true => ExitCode::TaskFailed,
        false => ExitCode::Success,
    }
}

/// Whether the run keeps row indexes: Delta output from NDJSON input (`etl::rerun`).
fn keeps_row_index(opts: &EtlOptions) -> bool {
    opts.output_format == OutputFormat::Deltalake && opts.input_format == InputFormat::Ndjson
}

/// The row indexes of a Delta run from NDJSON, with the unchanged lines of a re-run found
/// (`etl::rerun`); a failure there is a warning, and the run processes every line.
fn open_rerun_index(
    opts: &EtlOptions,
    shared: &RunShared,
    tasks: &[Task],
    input: (&[crate::input::InputFile], &[bundles::WorkItem]),
    (codebook, group): (&Codebook, &str),
) -> Option<Arc<RerunIndex>> {
    if !keeps_row_index(opts) {
        return None;
    }
    let run = (opts.engine.workers, group);
    match RerunIndex::prepare(shared, &opts.output, tasks, input, codebook, run) {
        Ok(index) => Some(Arc::new(index)),
        Err(e) => {
            crate::say!(
                "warning: the re-run row index is not used ({}); every line is processed",
                one_line(&e)
            );
            None
        }
    }
}

/// The checks every run starts with: the input folder exists (exit 54; on S3, some object is
/// under the prefix), batches hold rows.
pub fn check_run_arguments(input: &ObjectLocation, batch_size: usize) -> Result<(), Fatal> {
    if !input
        .exists()
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))?
    {
        return Err(Fatal::new(
            ExitCode::FolderDoesNotExist,
            format!("The input folder '{}' does not exist.", input.url()),
        ));
    }
    if batch_size == 0 {
        return Err(Fatal::new(
            ExitCode::ArgsInvalid,
            "--batch-size must be at least 1.",
        ));
    }
    Ok(())
}

/// Creates the PHI folder, opens its codebook and checks that `output` was not written with
/// another PHI folder (exit 41). `cache_ids` records new Patient/Encounter mappings (not in NLP).
pub fn open_codebook(
    phi: &ObjectLocation,
    output: &ObjectLocation,
    cache_ids: bool,
) -> Result<Arc<Codebook>, Fatal> {
    if let Some(dir) = phi.local_dir() {
        if let Some(mode) = store::open_to_others(dir) {
            crate::say!(
                "warning: the PHI folder {} can be read by other users (mode {mode:o}); \
                 `chmod -R go-rwx {}` keeps its salt and id mappings private",
                dir.display(),
                dir.display()
            );
        }
        create_folder(dir, store::Access::Private)?;
    }
    let codebook = Arc::new(Codebook::open(phi, cache_ids)?);
    if let Some(previous) = job::latest_codebook_id(output)
        && previous != codebook.codebook_id()
    {
        return Err(Fatal::new(
            ExitCode::WrongPhiFolder,
            format!(
                "The output folder '{}' is already associated with a different PHI folder. \
                 You must always use the same PHI folder for a given output folder.",
                output.url()
            ),
        ));
    }
    Ok(codebook)
}

/// Creates the output folder. Delta tables are updated in place; the file formats need a new
/// or empty folder, as upstream (exit 26).
pub fn prepare_output(output: &ObjectLocation, format: OutputFormat) -> Result<(), Fatal> {
    let empty = || {
        output
            .is_empty()
            .map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))
    };
    if format != OutputFormat::Deltalake && !empty()? {
        return Err(Fatal::new(
            ExitCode::FolderNotEmpty,
            format!(
                "The target folder '{}' already has contents. Use an empty folder for {} output, \
                 or --output-format=deltalake to update existing tables.",
                output.url(),
                format.name()
            ),
        ));
    }
    output
        .create_folder()
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))
}

/// Lists the input once (discovery, the export log and `deleted/` all read the listing).
pub fn list_input(input: &ObjectLocation) -> Result<Listing, Fatal> {
    Listing::of(input).map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))
}

fn create_folder(dir: &Path, access: store::Access) -> Result<(), Fatal> {
    store::create_dir(dir, access).map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))
}

/// Input bytes per bundle: small enough that every worker has several bundles in flight within
/// the budget.
pub fn bundle_size(memory: u64, workers: usize) -> usize {
    ((memory / (4 * workers as u64).max(1)) as usize).clamp(64 << 10, 8 << 20)
}

/// Creates the errors folder (which must be new or empty) and its rejected-rows file.
pub fn open_errors_folder(errors_to: &Option<PathBuf>) -> Result<Option<std::fs::File>, Fatal> {
    let Some(dir) = errors_to else {
        return Ok(None);
    };
    if !store::is_empty_dir(dir)? {
        return Err(Fatal::new(
            ExitCode::FolderNotEmpty,
            format!("The errors folder '{}' is not empty.", dir.display()),
        ));
    }
    // Rejected rows are raw input lines: PHI, private to this user.
    create_folder(dir, store::Access::Private)?;
    store::create_file(&dir.join("rejected-rows.ndjson"), store::Access::Private)
        .map(Some)
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))
}

/// What the run's `etl__completion` rows share.
struct Completion<'a> {
    group: &'a str,
    export_time: &'a PyDateTime,
    export_url: Option<&'a str>,
    started: &'a PyDateTime,
    exclusions: &'a str,
}

impl Completion<'_> {
    /// The completion row of a task, as compact JSON.
    fn row(&self, task: &Task) -> Vec<u8> {
        let row = json!({
            "table_name": task.name,
            "group_name": self.group,
            "export_time": self.export_time.isoformat(),
            "export_url": self.export_url,
            "etl_version": env!("CARGO_PKG_VERSION"),
            "etl_time": self.started.isoformat(),
            "excluded_resources": self.exclusions,
        });
        let mut text = Vec::new();
        crate::json::write_compact_ascii(&mut text, &strip_nulls(row));
        text
    }
}

/// Writes completion rows as one batch and waits for it; a failure is reported and flags the
/// summaries of the tasks whose rows it held.
fn write_completion_rows(shared: &RunShared, rows: &[(&Task, Vec<u8>)]) {
    if rows.is_empty() {
        return;
    }
    let written = shared
        .outputs
        .open(COMPLETION_TABLE, TableKind::Completion)
        .and_then(|mut writer| {
            write_and_wait(
                writer.as_mut(),
                &RowBatch::of_rows(
                    rows.iter().map(|(_, row)| row.as_slice()).collect(),
                    &Shape::default(),
                ),
            )
        });
    if let Err(e) = written {
        for (task, _) in rows {
            crate::say!(
                "error: could not write {COMPLETION_TABLE} for {}: {e:#}",
                task.name
            );
            shared
                .report
                .stats
                .lock()
                .unwrap()
                .summary(&task.name)
                .had_errors = true;
        }
    }
}

fn strip_nulls(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(m) = v.as_object_mut() {
        m.retain(|_, x| !x.is_null());
    }
    v
}

fn print_config(opts: &EtlOptions, started: &PyDateTime, tasks: &[Task]) {
    crate::say!("Configuration:");
    crate::say!("  Input path:   {}", opts.input.url());
    crate::say!(
        "  Output path:  {} ({})",
        opts.output.url(),
        opts.output_format.name()
    );
    crate::say!("  PHI path:     {}", opts.phi.url());
    if let Some(e) = &opts.errors_to {
        crate::say!("  Errors path:  {}", e.display());
    }
    crate::say!("  Current time: {} UTC", started.summary_format());
    crate::say!("  Batch size:   {}", opts.batch_size);
    crate::say!(
        "  Workers:      {}   Memory budget: {}",
        opts.engine.workers,
        human_bytes(opts.memory)
    );
    let ex = tasks::expand_names(&opts.exclusions);
    if !ex.is_empty() {
        crate::say!("  Excluded:     {}", ex.join(", "));
    }
    crate::say!(
        "  Tasks:        {}",
        tasks
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(c) = &opts.comment {
        crate::say!("  Comment:      {c}");
    }
}

pub fn print_extension_report(report: &crate::deid::ExtensionReport) {
    if !report.dropped.is_empty() {
        crate::say!("Unrecognized extensions dropped from resources:");
        for ((rtype, url), n) in &report.dropped {
            crate::say!(
                "  {rtype}: {url} ({n} time{})",
                if *n == 1 { "" } else { "s" }
            );
        }
    }
    if !report.skipped_modifiers.is_empty() {
        crate::say!("🚨 Resources skipped due to unrecognized modifier extensions: 🚨");
        for ((rtype, url), n) in &report.skipped_modifiers {
            crate::say!(
                "  {rtype}: {url} ({n} time{})",
                if *n == 1 { "" } else { "s" }
            );
        }
    }
}

pub fn print_summary(
    stats: &crate::engine::report::RunStats,
    elapsed: Duration,
    bytes: u64,
    budget: &MemoryBudget,
) {
    crate::say!();
    crate::say!(
        "{:<30} {:>12} {:>12} {:>8}",
        "Table",
        "Attempted",
        "Written",
        "Errors"
    );
    for s in stats.tables.values() {
        crate::say!(
            "{:<30} {:>12} {:>12} {:>8}",
            s.label,
            s.attempt,
            s.success,
            if s.had_errors { "yes" } else { "" }
        );
    }
    let skipped: u64 = stats.skipped.values().sum();
    if skipped > 0 {
        crate::say!("Skipped input ({skipped} in all):");
        for (reason, n) in &stats.skipped {
            crate::say!("  {:<40} {n:>10}", reason.label());
        }
    } else {
        crate::say!("Skipped input: none");
    }
    let secs = elapsed.as_secs_f64().max(1e-6);
    crate::say!(
        "Done in {secs:.1}s: {} read ({:.1} MB/s), peak budget use {} of {}{}",
        human_bytes(bytes),
        bytes as f64 / 1e6 / secs,
        human_bytes(budget.peak()),
        human_bytes(budget.limit()),
        match budget.oversized_count() {
            0 => String::new(),
            n => format!(", {n} oversized bundles processed alone"),
        }
    );
}
