//! The command line of Cumulus ETL's `etl`: `cumulus-etl [etl] [OPTIONS] INPUT OUTPUT PHI`.

pub mod exit;
pub mod progress;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::engine::EngineConfig;
use crate::engine::budget::{default_budget, parse_size};
use crate::etl::EtlOptions;
use crate::output::OutputFormat;
use crate::store::Location;
use exit::{ExitCode, Fatal};

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
#[derive(Debug, Parser)]
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
    /// Folder (empty or new) that receives rejected input rows and failed batches. Holds PHI.
    #[arg(long)]
    pub errors_to: Option<PathBuf>,
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
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Global memory budget, e.g. 512MiB or 2GiB (default: a quarter of RAM, 256MiB-4GiB).
    #[arg(long)]
    pub memory: Option<String>,
    /// Seconds between progress lines.
    #[arg(long, default_value_t = 5)]
    pub progress_interval: u64,
    /// Skip compaction and VACUUM of Delta tables at the end of the run.
    #[arg(long)]
    pub no_table_optimization: bool,
    /// Accepted for compatibility; this tool needs no external checks at start.
    #[arg(long, hide = true)]
    pub skip_init_checks: bool,
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

fn local_folder(s: &str) -> Result<PathBuf, Fatal> {
    Location::parse(s)
        .map(|l| l.local_path().to_path_buf())
        .map_err(|e| Fatal::new(ExitCode::ArgsInvalid, e.to_string()))
}

fn run_init(args: &[String]) -> i32 {
    let a: InitArgs = match parse(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    finish_command(memory_option(&a.memory).and_then(|memory| {
        crate::commands::init(&local_folder(&a.output)?, a.output_format, memory)
    }))
}

fn run_convert(args: &[String]) -> i32 {
    let a: ConvertArgs = match parse(args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    finish_command(memory_option(&a.memory).and_then(|memory| {
        crate::commands::convert(
            &local_folder(&a.original)?,
            &local_folder(&a.target)?,
            memory,
            !a.no_table_optimization,
        )
    }))
}

fn finish_command(result: Result<(), Fatal>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(fatal) => {
            eprintln!("{}", fatal.message);
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
            _ => {}
        }
        if sub != "etl" {
            let code = if matches!(sub.as_str(), "export" | "inline") {
                ExitCode::FeatureRemoved
            } else {
                ExitCode::ArgsInvalid
            };
            eprintln!("The '{sub}' command is not available in this version of cumulus-etl.");
            return code as i32;
        }
    }
    let parsed: EtlArgs = match parse(&args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    match options_from(parsed).and_then(|o| crate::etl::run(&o)) {
        Ok(code) => code as i32,
        Err(fatal) => {
            eprintln!("{}", fatal.message);
            fatal.code as i32
        }
    }
}

fn options_from(a: EtlArgs) -> Result<EtlOptions, Fatal> {
    let memory = match &a.memory {
        Some(m) => parse_size(m)
            .map_err(|e| Fatal::new(ExitCode::ArgsInvalid, format!("--memory: {e}")))?,
        None => default_budget(),
    };
    let workers = a
        .workers
        .unwrap_or_else(EngineConfig::default_workers)
        .max(1);
    let loc =
        |s: &str| Location::parse(s).map_err(|e| Fatal::new(ExitCode::ArgsInvalid, e.to_string()));
    Ok(EtlOptions {
        input: loc(&a.input)?,
        output: loc(&a.output)?,
        phi: loc(&a.phi)?,
        input_format: a.input_format,
        output_format: a.output_format,
        batch_size: a.batch_size,
        tasks: a.task,
        exclusions: a.exclude_resources,
        errors_to: a.errors_to,
        comment: a.comment,
        export_group: a.export_group,
        export_timestamp: a.export_timestamp,
        allow_missing_resources: a.allow_missing_resources,
        engine: EngineConfig { workers },
        memory,
        optimize_tables: !a.no_table_optimization,
        progress_interval: Duration::from_secs(a.progress_interval.max(1)),
    })
}
