//! The command line of Cumulus ETL's `etl`: `cumulus-etl [etl] [OPTIONS] INPUT OUTPUT PHI`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::engine::{ClusterConfig, EngineConfig};
use crate::etl::EtlOptions;
use crate::exit::{ExitCode, Fatal};
use crate::memory::budget::{default_budget, parse_size};
use crate::nlp::http::RetryPolicy;
use crate::nlp::run::NlpOptions;
use crate::output::OutputFormat;
use crate::store::{ObjectLocation, S3Settings};

/// Subcommands Cumulus ETL knows; the first non-option argument is one of these or the input.
const SUBCOMMANDS: [&str; 8] = [
    "convert",
    "etl",
    "export",
    "init",
    "inline",
    "nlp",
    "sample",
    "upload-notes",
];

/// `cumulus-etl etl` arguments.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "cumulus-etl",
    version,
    about = "Extract, de-identify and load FHIR bulk exports into tables"
)]
pub struct EtlArgs {
    /// Input folder of the FHIR bulk export (NDJSON, optionally gzipped).
    pub input: String,
    /// Output folder for the tables.
    pub output: String,
    /// PHI folder: codebook and run context (keep it private).
    pub phi: String,
    /// Input format: a FHIR bulk export (ndjson) or i2b2 CSV files.
    #[arg(long, value_enum, default_value = "ndjson")]
    pub input_format: crate::etl::InputFormat,
    /// Output table format.
    #[arg(long, value_enum, default_value = "deltalake")]
    pub output_format: OutputFormat,
    /// Rows per output batch (a batch is one file per table).
    #[arg(long, default_value_t = 100_000)]
    pub batch_size: usize,
    /// Tasks to run, comma-separated (case-insensitive); `--task help` lists them.
    #[arg(long = "task")]
    pub task: Vec<String>,
    /// Tasks to leave out, comma-separated.
    #[arg(long = "exclude-resources")]
    pub exclude_resources: Vec<String>,
    /// Free-text comment recorded in the job config.
    #[arg(long)]
    pub comment: Option<String>,
    /// FHIR Group name of the export (overrides the export log).
    #[arg(long)]
    pub export_group: Option<String>,
    /// Export time, ISO 8601 (overrides the export log).
    #[arg(long)]
    pub export_timestamp: Option<String>,
    /// Run the selected tasks even when their input files are absent.
    #[arg(long)]
    pub allow_missing_resources: bool,
    /// Keep running: load each export folder under INPUT once its export log says it is
    /// complete, in the order they complete (Delta output; SIGTERM or Ctrl-C stops).
    #[arg(long)]
    pub watch: bool,
    /// Seconds between looks at INPUT for new exports, with --watch.
    #[arg(long, default_value_t = 30)]
    pub watch_interval: u64,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub nlp: NlpEngineArgs,
    #[command(flatten)]
    pub s3: S3Args,
}

/// S3 options, as Cumulus ETL's (credentials and endpoint come from the AWS environment).
#[derive(Debug, Clone, clap::Args)]
pub struct S3Args {
    /// Region of the S3 buckets named by s3:// locations (default: AWS_REGION, else us-east-1).
    #[arg(long)]
    pub s3_region: Option<String>,
    /// KMS key that encrypts every object written to S3 (SSE-KMS; without it, the account's
    /// default key).
    #[arg(long)]
    pub s3_kms_key: Option<String>,
}

impl S3Args {
    fn settings(&self) -> S3Settings {
        S3Settings {
            region: self.s3_region.clone(),
            kms_key: self.s3_kms_key.clone(),
            ..S3Settings::default()
        }
    }

    /// The location an argument names: a folder, or an S3 prefix (`s3://bucket/prefix`).
    fn location(&self, arg: &str) -> Result<ObjectLocation, Fatal> {
        ObjectLocation::parse(arg, &self.settings())
            .map_err(|e| Fatal::new(ExitCode::ArgsInvalid, format!("{e:#}")))
    }
}

/// Options of every run, ETL or NLP.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Folder (empty or new) that receives rejected input rows, failed batches and notes that
    /// could not be analysed. Holds PHI.
    #[arg(long)]
    pub errors_to: Option<PathBuf>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Global memory budget, e.g. 512MiB or 2GiB (default: a sixteenth of RAM, 256MiB-352MiB).
    #[arg(long)]
    pub memory: Option<String>,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5)]
    pub progress_interval: u64,
    /// Skip compaction and VACUUM of Delta tables at the end of the run.
    #[arg(long)]
    pub no_table_optimization: bool,
    /// Skip the start-up check that the NLP servers accept connections.
    #[arg(long)]
    pub skip_init_checks: bool,
    /// A cluster run: a file with one `host:port` per process (a timely hostfile); every
    /// process gets the same INPUT, OUTPUT and PHI and this file (`docs/cluster.md`).
    #[arg(long, requires = "process")]
    pub hostfile: Option<PathBuf>,
    /// This process's line of --hostfile, from 0.
    #[arg(long, requires = "hostfile")]
    pub process: Option<usize>,
    /// Seconds a cluster process waits for the others to connect.
    #[arg(long, default_value_t = 60)]
    pub connect_timeout: u64,
}

/// NLP engine options, shared by `nlp` and the 2023-style `etl --task covid_symptom__...`.
#[derive(Debug, Clone, clap::Args)]
pub struct NlpEngineArgs {
    /// NLP engine: the embedded dictionary and negation detector, or cTAKES and cNLP servers
    /// (URL_CTAKES_REST, URL_CNLP_NEGATION, URL_CNLP_TERM_EXISTS).
    #[arg(long, value_enum, default_value = "embedded")]
    pub nlp_engine: crate::nlp::run::EngineKind,
    /// Notes in flight to the NLP servers at once.
    #[arg(long, default_value_t = 32)]
    pub nlp_concurrency: usize,
    /// Retries of a server request after a timeout, a 429 or a 5xx answer.
    #[arg(long, default_value_t = 4)]
    pub nlp_retries: u32,
    /// First retry delay in milliseconds (doubles with each retry).
    #[arg(long, default_value_t = 500, hide = true)]
    pub nlp_retry_delay_ms: u64,
    /// Seconds before a server request times out.
    #[arg(long, default_value_t = 300)]
    pub nlp_timeout: u64,
    /// Milliseconds between the start-up connection checks.
    #[arg(long, default_value_t = 3000, hide = true)]
    pub init_check_interval_ms: u64,
    /// Remove the task's earlier results (every version, and its list of finished notes) from
    /// the NDJSON or Parquet output first, instead of skipping the notes they list.
    #[arg(long)]
    pub clean: bool,
    /// Only notes whose text has this word or phrase (whole, any case; repeatable).
    #[arg(long, value_name = "WORD")]
    pub select_by_word: Vec<String>,
    /// Only notes whose text matches this regex (whole words; repeatable).
    #[arg(long, value_name = "REGEX")]
    pub select_by_regex: Vec<String>,
    /// Leave out notes whose text has this word or phrase (repeatable).
    #[arg(long, value_name = "WORD")]
    pub reject_by_word: Vec<String>,
    /// Leave out notes whose text matches this regex (repeatable).
    #[arg(long, value_name = "REGEX")]
    pub reject_by_regex: Vec<String>,
    /// Only the notes (or patients' notes) listed by original id in this CSV file.
    #[arg(long, value_name = "FILE")]
    pub select_by_csv: Option<std::path::PathBuf>,
    /// Only the notes (or patients' notes) listed by anonymous id in this CSV file.
    #[arg(long, value_name = "FILE")]
    pub select_by_anon_csv: Option<std::path::PathBuf>,
    /// Only the notes (or patients' notes) whose anonymous ids an Athena table lists
    /// (`DB.TABLE`, or `TABLE` in `--athena-database`).
    #[arg(long, value_name = "DB.TABLE")]
    pub select_by_athena_table: Option<String>,
    /// The region of the Athena workgroup (default: the AWS account's, else us-east-1).
    #[arg(long, value_name = "REGION")]
    pub athena_region: Option<String>,
    /// The Athena workgroup: with `nlp INPUT PHI` (no output folder), the results go to its
    /// results location and are registered as Athena tables (upstream's Athena mode).
    #[arg(long, value_name = "GROUP")]
    pub athena_workgroup: Option<String>,
    /// The Athena database: where Athena mode registers the results tables, and where a cohort
    /// table without `DB.` is.
    #[arg(long, value_name = "DB")]
    pub athena_database: Option<String>,
    /// Accepted for upstream's command lines: this tool never asks before a large selection;
    /// an Athena cohort of more than 50,000 rows needs it.
    #[arg(long)]
    pub allow_large_selection: bool,
    /// Which service answers the LLM tasks.
    #[arg(long, value_enum, default_value = "local")]
    pub provider: crate::nlp::run::Provider,
    /// The Azure deployment to ask (the model's name by default).
    #[arg(long)]
    pub azure_deployment: Option<String>,
    /// Ask the model through its provider's batch API (Azure OpenAI; half the price, answers
    /// within a day; an interrupted run resumes its batches).
    #[arg(long)]
    pub batch: bool,
}

impl NlpEngineArgs {
    /// Where Athena is asked.
    fn athena_settings(&self) -> crate::nlp::athena::AthenaSettings {
        crate::nlp::athena::AthenaSettings {
            region: self.athena_region.clone(),
            workgroup: self.athena_workgroup.clone(),
            database: self.athena_database.clone(),
        }
    }
}

/// `cumulus-etl nlp` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "cumulus-etl nlp",
    about = "Run an NLP study (e.g. covid symptoms) on the clinical notes of a FHIR export"
)]
pub struct NlpArgs {
    /// Input folder of the FHIR bulk export (DocumentReference NDJSON).
    pub input: String,
    /// Output folder for the results table; with --athena-workgroup and no PHI folder after
    /// it, the PHI folder (the results then go to the workgroup's results location).
    pub output: String,
    /// PHI folder: codebook and NLP cache (keep it private).
    pub phi: Option<String>,
    /// NLP task(s) to run, comma-separated; `--task help` lists them.
    #[arg(long = "task", required = true)]
    pub task: Vec<String>,
    /// Output table format.
    #[arg(long, value_enum, default_value = "parquet")]
    pub output_format: OutputFormat,
    /// Rows per output batch.
    #[arg(long, default_value_t = 50_000)]
    pub batch_size: usize,
    #[command(flatten)]
    pub run: RunArgs,
    #[command(flatten)]
    pub nlp: NlpEngineArgs,
    #[command(flatten)]
    pub s3: S3Args,
}

/// `cumulus-etl init` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "cumulus-etl init",
    about = "Create empty output tables for all default tasks"
)]
pub struct InitArgs {
    /// Output folder for the tables.
    pub output: String,
    /// Output table format.
    #[arg(long, value_enum, default_value = "deltalake")]
    pub output_format: OutputFormat,
    /// Memory budget for table operations, e.g. 512MiB.
    #[arg(long)]
    pub memory: Option<String>,
    #[command(flatten)]
    pub s3: S3Args,
}

/// `cumulus-etl convert` arguments.
#[derive(Debug, Parser)]
#[command(
    name = "cumulus-etl convert",
    about = "Load an NDJSON output folder into Delta Lake tables"
)]
pub struct ConvertArgs {
    /// An output folder of an earlier `--output-format=ndjson` run.
    pub original: String,
    /// The Delta Lake output folder to load into (new or existing).
    pub target: String,
    /// Memory budget for table operations, e.g. 512MiB.
    #[arg(long)]
    pub memory: Option<String>,
    /// Skip compaction and VACUUM at the end.
    #[arg(long)]
    pub no_table_optimization: bool,
    #[command(flatten)]
    pub s3: S3Args,
}

/// Parses a command's arguments, printing clap's message and giving its exit code on failure.
fn parse<T: Parser>(args: &[String]) -> Result<T, i32> {
    T::try_parse_from(args).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() {
            ExitCode::Usage as i32
        } else {
            0
        }
    })
}

fn memory_option(memory: &Option<String>) -> Result<u64, Fatal> {
    match memory {
        Some(m) => {
            parse_size(m).map_err(|e| Fatal::new(ExitCode::ArgsInvalid, format!("--memory: {e}")))
        }
        None => Ok(default_budget()),
    }
}

fn run_init(args: &[String]) -> i32 {
    let a: InitArgs = match parse(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    finish_command(memory_option(&a.memory).and_then(|memory| {
        crate::commands::init(&a.s3.location(&a.output)?, a.output_format, memory)
    }))
}

fn run_convert(args: &[String]) -> i32 {
    let a: ConvertArgs = match parse(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    finish_command(memory_option(&a.memory).and_then(|memory| {
        crate::commands::convert(
            &a.s3.location(&a.original)?,
            &a.s3.location(&a.target)?,
            memory,
            !a.no_table_optimization,
        )
    }))
}

fn finish_command(result: Result<(), Fatal>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(fatal) => {
            crate::say!("{}", fatal.message);
            fatal.code as i32
        }
    }
}

/// Parses arguments and runs; returns the process exit code.
pub fn main_with_args(mut args: Vec<String>) -> i32 {
    // The first non-option argument may name the subcommand; `etl` is the default.
    if let Some(pos) = args
        .iter()
        .skip(1)
        .position(|a| !a.starts_with('-'))
        .map(|p| p + 1)
        && SUBCOMMANDS.contains(&args[pos].as_str())
    {
        let sub = args.remove(pos);
        match sub.as_str() {
            "init" => return run_init(&args),
            "convert" => return run_convert(&args),
            "nlp" => return run_nlp(&args),
            _ => {}
        }
        if sub != "etl" {
            let replacement = match sub.as_str() {
                "export" => Some("smart-fetch bulk"),
                "inline" => Some("smart-fetch hydrate --tasks inline"),
                _ => None,
            };
            let Some(replacement) = replacement else {
                crate::say!("The '{sub}' command is not available in this version of cumulus-etl.");
                return ExitCode::ArgsInvalid as i32;
            };
            // Cumulus ETL's words.
            crate::say!(
                "The 'cumulus-etl {sub}' command has been removed.\n\
                 Please use '{replacement}' instead.\n\
                 See https://docs.smarthealthit.org/cumulus/fetch/ for more information."
            );
            return ExitCode::FeatureRemoved as i32;
        }
    }
    let removed: Vec<&str> = REMOVED_EHR_FLAGS
        .iter()
        .chain(&REMOVED_ETL_FLAGS)
        .copied()
        .collect();
    if let Some(code) = refuse_removed_flags(&args, &removed) {
        return code;
    }
    let parsed: EtlArgs = match parse(&args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // The 2023 invocation: `etl --task covid_symptom__nlp_results` runs the NLP study.
    match crate::nlp::run::names_nlp_tasks(&parsed.task) {
        Ok(true) => {
            return finish_run(nlp_options_from_etl(parsed).and_then(|o| crate::nlp::run::run(&o)));
        }
        Ok(false) => {}
        Err(fatal) => return finish_run(Err(fatal)),
    }
    let watch = parsed
        .watch
        .then(|| Duration::from_secs(parsed.watch_interval.max(1)));
    finish_run(options_from(parsed).and_then(|o| match watch {
        Some(interval) => crate::etl::watch::watch(&o, interval),
        None => crate::etl::run(&o),
    }))
}

/// The EHR-export flags Cumulus ETL removed from `etl` and `nlp` (exporting moved to SMART
/// Fetch); they exit 59 with its pointer, as upstream does, rather than as unknown arguments.
const REMOVED_EHR_FLAGS: [&str; 7] = [
    "--smart-client-id",
    "--smart-key",
    "--basic-user",
    "--basic-passwd",
    "--bearer-token",
    "--fhir-url",
    "--smart-jwks",
];
/// The export flags removed from `etl` alone.
const REMOVED_ETL_FLAGS: [&str; 4] = ["--since", "--until", "--resume", "--export-to"];

/// Exit code 59 and Cumulus ETL's message if `args` use one of the `removed` flags.
fn refuse_removed_flags(args: &[String], removed: &[&str]) -> Option<i32> {
    let flag = args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .map(|a| a.split('=').next().unwrap_or(a))
        .find(|a| removed.contains(a))?;
    crate::say!(
        "The {flag} flag has been removed.\n\
         Please use SMART Fetch to extract FHIR data from your EHR instead:\n  \
         https://docs.smarthealthit.org/cumulus/fetch/"
    );
    Some(ExitCode::FeatureRemoved as i32)
}

fn finish_run(result: Result<ExitCode, Fatal>) -> i32 {
    match result {
        Ok(code) => code as i32,
        Err(fatal) => {
            crate::say!("{}", fatal.message);
            fatal.code as i32
        }
    }
}

fn run_nlp(args: &[String]) -> i32 {
    if let Some(code) = refuse_removed_flags(args, &REMOVED_EHR_FLAGS) {
        return code;
    }
    let a: NlpArgs = match parse(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    // Upstream's Athena mode: `nlp INPUT PHI --athena-workgroup G --athena-database D` writes
    // into the workgroup's results location and registers the tables.
    let athena_mode = a.phi.is_none();
    let located = match (&a.phi, &a.nlp.athena_workgroup) {
        (Some(_), Some(_)) => Err(Fatal::new(
            ExitCode::ArgsConflict,
            "Both an output folder and an Athena workgroup were provided. An output folder is \
             only needed in local, non-Athena mode. Otherwise, we upload directly to the \
             workgroup's results folder in S3. Please provide an output folder or a workgroup, \
             but not both.",
        )),
        (Some(phi), None) => Ok((a.output.clone(), phi.clone())),
        (None, _) if a.output_format == OutputFormat::Deltalake => Err(Fatal::new(
            ExitCode::ArgsConflict,
            "You cannot use the deltalake output format with --athena-workgroup.",
        )),
        (None, _) => crate::nlp::athena::results_location(&a.nlp.athena_settings())
            .map(|location| (location, a.output.clone())),
    };
    let (output, phi) = match located {
        Ok(folders) => folders,
        Err(fatal) => return finish_run(Err(fatal)),
    };
    let options = nlp_options(
        [&a.input, &output, &phi],
        a.output_format,
        a.batch_size,
        a.task.clone(),
        &a.run,
        &a.nlp,
        &a.s3,
    )
    .map(|o| crate::nlp::run::NlpOptions {
        athena_tables: athena_mode,
        ..o
    });
    finish_run(options.and_then(|o| crate::nlp::run::run(&o)))
}

/// The settings every run shares: engine layout, budget, table maintenance, progress.
struct RunSettings {
    engine: EngineConfig,
    memory: u64,
    optimize_tables: bool,
    progress_interval: Duration,
}

impl RunArgs {
    /// The settings of a run.
    fn settings(&self) -> Result<RunSettings, Fatal> {
        if let Some(dir) = &self.errors_to
            && dir.to_string_lossy().contains("://")
        {
            // Rejected rows are raw input lines: they stay on this machine, private.
            return Err(Fatal::new(
                ExitCode::ArgsInvalid,
                format!(
                    "--errors-to '{}': must be a local folder (it receives PHI)",
                    dir.display()
                ),
            ));
        }
        Ok(RunSettings {
            engine: EngineConfig {
                workers: self
                    .workers
                    .unwrap_or_else(EngineConfig::default_workers)
                    .max(1),
                cluster: self.cluster()?,
            },
            memory: memory_option(&self.memory)?,
            optimize_tables: !self.no_table_optimization,
            progress_interval: Duration::from_secs(self.progress_interval.max(1)),
        })
    }
}

impl RunArgs {
    /// The cluster layout `--hostfile` and `--process` give, if any.
    fn cluster(&self) -> Result<Option<ClusterConfig>, Fatal> {
        let (Some(file), Some(process)) = (&self.hostfile, self.process) else {
            return Ok(None);
        };
        let invalid = |message: String| Fatal::new(ExitCode::ArgsInvalid, message);
        let text = std::fs::read_to_string(file)
            .map_err(|e| invalid(format!("--hostfile {}: {e}", file.display())))?;
        let addresses: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        if process >= addresses.len() {
            return Err(invalid(format!(
                "--process {process}: {} lists {} processes (numbered from 0)",
                file.display(),
                addresses.len()
            )));
        }
        Ok(Some(ClusterConfig {
            addresses,
            process,
            connect_timeout: Duration::from_secs(self.connect_timeout.max(1)),
        }))
    }
}

/// The options of an NLP run, from `nlp` or from a 2023-style `etl --task covid_symptom__...`.
fn nlp_options(
    [input, output, phi]: [&str; 3],
    output_format: OutputFormat,
    batch_size: usize,
    tasks: Vec<String>,
    run: &RunArgs,
    nlp: &NlpEngineArgs,
    s3: &S3Args,
) -> Result<NlpOptions, Fatal> {
    let settings = run.settings()?;
    Ok(NlpOptions {
        input: s3.location(input)?,
        output: s3.location(output)?,
        phi: s3.location(phi)?.private(),
        output_format,
        batch_size,
        tasks,
        errors_to: run.errors_to.clone(),
        engine_kind: nlp.nlp_engine,
        concurrency: nlp.nlp_concurrency.max(1),
        retry: RetryPolicy {
            retries: nlp.nlp_retries,
            base_delay: Duration::from_millis(nlp.nlp_retry_delay_ms),
            timeout: Duration::from_secs(nlp.nlp_timeout.max(1)),
        },
        init_checks: !run.skip_init_checks,
        init_check_interval: Duration::from_millis(nlp.init_check_interval_ms),
        clean: nlp.clean,
        provider: nlp.provider,
        azure_deployment: nlp.azure_deployment.clone(),
        batch: nlp.batch,
        text_rules: crate::nlp::selection::TextRules {
            select_words: nlp.select_by_word.clone(),
            select_regexes: nlp.select_by_regex.clone(),
            reject_words: nlp.reject_by_word.clone(),
            reject_regexes: nlp.reject_by_regex.clone(),
        },
        cohort: {
            use crate::nlp::run::Cohort;
            let given = [
                nlp.select_by_csv.clone().map(Cohort::Csv),
                nlp.select_by_anon_csv.clone().map(Cohort::AnonCsv),
                nlp.select_by_athena_table.clone().map(Cohort::AthenaTable),
            ];
            let mut given = given.into_iter().flatten();
            let cohort = given.next();
            if given.next().is_some() {
                return Err(Fatal::new(
                    ExitCode::MultipleCohortArgs,
                    "Multiple CSV selection arguments provided. Please specify just one.",
                ));
            }
            cohort
        },
        athena: nlp.athena_settings(),
        athena_tables: false,
        allow_large_selection: nlp.allow_large_selection,
        engine: settings.engine,
        memory: settings.memory,
        optimize_tables: settings.optimize_tables,
        progress_interval: settings.progress_interval,
    })
}

/// The NLP options of a 2023-style `etl --task covid_symptom__...` run.
fn nlp_options_from_etl(a: EtlArgs) -> Result<NlpOptions, Fatal> {
    nlp_options(
        [&a.input, &a.output, &a.phi],
        a.output_format,
        a.batch_size,
        a.task,
        &a.run,
        &a.nlp,
        &a.s3,
    )
}

fn options_from(a: EtlArgs) -> Result<EtlOptions, Fatal> {
    let settings = a.run.settings()?;
    Ok(EtlOptions {
        input: a.s3.location(&a.input)?,
        output: a.s3.location(&a.output)?,
        phi: a.s3.location(&a.phi)?.private(),
        input_format: a.input_format,
        output_format: a.output_format,
        batch_size: a.batch_size,
        tasks: a.task,
        exclusions: a.exclude_resources,
        errors_to: a.run.errors_to,
        comment: a.comment,
        export_group: a.export_group,
        export_timestamp: a.export_timestamp,
        allow_missing_resources: a.allow_missing_resources,
        engine: settings.engine,
        memory: settings.memory,
        optimize_tables: settings.optimize_tables,
        progress_interval: settings.progress_interval,
    })
}
