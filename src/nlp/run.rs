//! One NLP run (`cumulus-etl nlp`, or `etl --task covid_symptom__...`): select the study, find
//! the notes, start the engine (checking the servers first), run the dataflow with the NLP
//! producer, finish the table and report what happened to every note.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::deid::{Codebook, Rules, Scrubber};
use crate::engine::dataflow::ProducerFactory;
use crate::engine::rows::TaskContext;
use crate::engine::{EngineConfig, RunShared};
use crate::etl::run::{RunBuilder, finish_tables, run_to_end, start_engine};
use crate::etl::{
    bundle_size, check_run_arguments, list_input, open_codebook, open_errors_folder,
    prepare_output, print_extension_report, print_summary,
};
use crate::exit::{ExitCode, Fatal};
use crate::fhir::ElementModel;
use crate::input::{bundles, discover};
use crate::output::arrow_rows::nlp_symptom_schema;
use crate::output::{NlpTable, OutputFormat, TableKind, nlp_files};
use crate::store::ObjectLocation;
use crate::time::PyDateTime;

use super::athena::{self, AthenaSettings};
use super::batch::{self, BatchCollector};
use super::bedrock::BedrockModel;
use super::cache::NlpCache;
use super::ctakes::{CtakesSymptoms, ServerUrls, check_reachable};
use super::embedded::EmbeddedEngine;
use super::engine::{CovidRows, EmbeddedSymptoms};
use super::http::{Http, RetryPolicy};
use super::llm_engine::LlmEngine;
use super::llm_study::{LlmTask, RowFormat, find_llm_task, llm_tasks};
use super::openai::{ChatClient, Endpoint};
use super::producer::{Dispatch, GroupKey, NlpShared, NoteRows};
use super::selection::{RefSelection, TextFilter, TextRules};
use super::study::{NoteSource, Study, all_studies, find_study};

/// Which engine analyses the notes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// Dictionary matching and negation detection in process (no server).
    Embedded,
    /// cTAKES REST plus cNLP transformers servers.
    Ctakes,
}

/// The notes' cohort: a CSV file of original or anonymous ids, or an Athena table of
/// anonymous ones.
#[derive(Debug, Clone)]
pub enum Cohort {
    Csv(PathBuf),
    AnonCsv(PathBuf),
    AthenaTable(String),
}

/// Which service answers the LLM tasks (`--provider`), as upstream names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provider {
    /// A local OpenAI-compatible server (vLLM), its URL from `CUMULUS_<MODEL>_URL`.
    Local,
    /// Azure OpenAI (`AZURE_OPENAI_API_KEY`, `AZURE_OPENAI_ENDPOINT`).
    Azure,
    /// AWS Bedrock (not supported yet).
    Bedrock,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Local => "local",
            Provider::Azure => "azure",
            Provider::Bedrock => "bedrock",
        }
    }
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
    /// Remove the task's earlier results from a file-format output first (`--clean`).
    pub clean: bool,
    /// `--select-by-*` and `--reject-by-*` on the notes' text.
    pub text_rules: TextRules,
    /// `--select-by-csv` (false) or `--select-by-anon-csv` (true): a cohort file.
    pub cohort: Option<Cohort>,
    /// Where an Athena cohort table is queried.
    pub athena: AthenaSettings,
    /// An Athena cohort may have more than 50,000 rows.
    pub allow_large_selection: bool,
    /// Upstream's Athena mode: the output is the workgroup's results location, tied to one PHI
    /// folder (`codebook.id`), and each results table is registered in the Athena database.
    pub athena_tables: bool,
    /// Where the LLM tasks' models are asked (`--provider`).
    pub provider: Provider,
    /// The Azure deployment to ask (`--azure-deployment`; the model's name by default).
    pub azure_deployment: Option<String>,
    /// Ask through the provider's batch API first (`--batch`).
    pub batch: bool,
    pub engine: EngineConfig,
    pub memory: u64,
    pub optimize_tables: bool,
    pub progress_interval: Duration,
}

/// An NLP task: the covid study's (a dictionary and symptom engines) or an LLM study's.
#[derive(Debug, Clone)]
pub enum NlpTask {
    Covid(Box<Study>),
    Llm(&'static LlmTask),
}

impl NlpTask {
    /// The task's (and its table's) name.
    pub fn name(&self) -> &str {
        match self {
            NlpTask::Covid(study) => &study.name,
            NlpTask::Llm(task) => &task.name,
        }
    }

    /// Which notes it reads.
    fn source(&self) -> NoteSource {
        match self {
            NlpTask::Covid(study) => study.source.clone(),
            NlpTask::Llm(_) => LlmTask::note_source(),
        }
    }
}

/// The NLP task named `name`.
fn find_task(name: &str) -> Option<NlpTask> {
    find_study(name)
        .map(|study| NlpTask::Covid(Box::new(study)))
        .or_else(|| find_llm_task(name).map(NlpTask::Llm))
}

/// Whether every named task is an NLP task (and at least one is named). Mixing NLP and
/// other tasks is an error, as upstream.
pub fn names_nlp_tasks(names: &[String]) -> Result<bool, Fatal> {
    let names = crate::tasks::expand_names(names);
    let nlp = names.iter().filter(|n| find_task(n).is_some()).count();
    if nlp > 0 && nlp < names.len() {
        return Err(Fatal::new(
            ExitCode::TaskMismatch,
            "NLP tasks cannot be mixed with other tasks; run them with `cumulus-etl nlp`.",
        ));
    }
    Ok(nlp > 0)
}

/// Picks the tasks named by `--task`.
fn select_tasks(names: &[String]) -> Result<Vec<NlpTask>, Fatal> {
    let names = crate::tasks::expand_names(names);
    if names.is_empty() || names.iter().any(|n| n == "help") {
        let covid = all_studies();
        let list: Vec<&str> = covid
            .iter()
            .map(|s| s.name.as_str())
            .chain(llm_tasks().iter().map(|t| t.name.as_str()))
            .collect();
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
        match find_task(n) {
            Some(t) if !picked.iter().any(|p: &NlpTask| p.name() == t.name()) => picked.push(t),
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
    let tasks = select_tasks(&opts.tasks)?;
    if opts.clean && opts.output_format == OutputFormat::Deltalake {
        return Err(Fatal::new(
            ExitCode::ArgsConflict,
            "Cannot provide --clean with the deltalake output format.",
        ));
    }
    let text_filter = TextFilter::new(&opts.text_rules)
        .map_err(|e| Fatal::new(ExitCode::ArgsInvalid, format!("{e:#}")))?
        .map(Arc::new);
    let not_found = |e: anyhow::Error| Fatal::new(ExitCode::CohortNotFound, format!("{e:#}"));
    let cohort = match &opts.cohort {
        Some(Cohort::Csv(path)) => Some(RefSelection::from_csv(path, false).map_err(not_found)?),
        Some(Cohort::AnonCsv(path)) => Some(RefSelection::from_csv(path, true).map_err(not_found)?),
        Some(Cohort::AthenaTable(table)) => {
            let csv = athena::cohort_csv(table, &opts.athena, opts.allow_large_selection)?;
            Some(RefSelection::from_reader(csv.as_bytes(), table, true).map_err(not_found)?)
        }
        None => None,
    }
    .map(Arc::new);
    let rejected = open_errors_folder(&opts.errors_to)?;
    let wanted: HashSet<String> = tasks.iter().flat_map(|t| t.source().resources).collect();
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
    // NLP results go beside earlier ones, as upstream's: a file-format output need not be
    // empty (the notes an earlier run finished are left out, or removed first by --clean).
    match opts.output_format {
        OutputFormat::Deltalake => prepare_output(output, opts.output_format)?,
        _ => output
            .create_folder()
            .map_err(|e| Fatal::new(ExitCode::Failure, format!("{e:#}")))?,
    }
    // NLP runs never record new Patient/Encounter mappings, as upstream.
    let codebook = open_codebook(&opts.phi, output, false)?;
    codebook.save()?;
    if opts.athena_tables {
        tie_to_phi_folder(output, &codebook.codebook_id(), &opts.athena)?;
    }
    let servers = opts.engine_kind == EngineKind::Ctakes
        || tasks.iter().any(|t| matches!(t, NlpTask::Llm(_)));
    let runtime = match servers {
        true => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .thread_name("cumulus-nlp")
                .build()
                .map_err(|e| {
                    Fatal::new(ExitCode::Failure, format!("starting the NLP runtime: {e}"))
                })?,
        ),
        false => None,
    };
    crate::say!("NLP configuration:");
    crate::say!("  Input path:  {}", opts.input.url());
    crate::say!(
        "  Output path: {} ({})",
        opts.output.url(),
        opts.output_format.name()
    );
    crate::say!("  PHI path:    {}", opts.phi.url());
    let llm = tasks.iter().any(|t| matches!(t, NlpTask::Llm(_)));
    let covid = tasks.iter().any(|t| matches!(t, NlpTask::Covid(_)));
    if covid {
        crate::say!(
            "  Engine:      {}",
            match opts.engine_kind {
                EngineKind::Embedded => "embedded (dictionary + negation detection)".to_string(),
                EngineKind::Ctakes =>
                    format!("cTAKES + cNLP, {} notes in flight", opts.concurrency),
            }
        );
    }
    if llm {
        crate::say!(
            "  Models:      the {} provider, {} notes in flight",
            opts.provider.name(),
            opts.concurrency
        );
    }

    let mut failed = false;
    let mut rejected = rejected;
    for task in tasks {
        let resources = task.source().resources;
        let files: Vec<_> = found
            .files
            .iter()
            .filter(|f| resources.contains(&f.resource_type))
            .cloned()
            .collect();
        let outcome = run_task(
            opts,
            &task,
            &files,
            &codebook,
            (runtime.as_ref(), text_filter.clone(), cohort.clone()),
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

/// What runs a task's notes, and what it reports at the end.
struct TaskEngine {
    dispatch: Dispatch,
    kind: TableKind,
    servers: Option<Arc<CtakesSymptoms>>,
    llm: Option<Arc<LlmEngine>>,
}

/// The covid study's engine: the embedded one, or cTAKES and cNLP (checked first).
fn covid_engine(
    opts: &NlpOptions,
    study: &Study,
    runtime: Option<&tokio::runtime::Runtime>,
    generated_on: String,
) -> Result<TaskEngine, Fatal> {
    let dictionary = study.dictionary();
    let covid_cuis = Arc::new(dictionary.cuis.clone());
    let kind = TableKind::NlpResults(Arc::new(NlpTable {
        task_version: study.task_version,
        schema: Arc::new(nlp_symptom_schema()),
        key: "id".into(),
        group_field: study.group_field.clone(),
    }));
    let (Some(rt), EngineKind::Ctakes) = (runtime, opts.engine_kind) else {
        let engine = CovidRows {
            engine: EmbeddedSymptoms {
                engine: Arc::new(EmbeddedEngine::new(&dictionary)),
                covid_cuis,
                model: study.engine.polarity,
            },
            generated_on,
            task_version: study.task_version,
        };
        return Ok(TaskEngine {
            dispatch: Dispatch::Inline(Arc::new(engine)),
            kind,
            servers: None,
            llm: None,
        });
    };
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
    let servers = Arc::new(
        CtakesSymptoms::new(
            urls,
            study.engine.clone(),
            NlpCache::ctakes(&opts.phi),
            covid_cuis,
            opts.concurrency,
            opts.retry,
        )
        .map_err(Fatal::from)?,
    );
    let engine = CovidRows {
        engine: servers.clone(),
        generated_on,
        task_version: study.task_version,
    };
    Ok(TaskEngine {
        dispatch: Dispatch::Spawn(Arc::new(engine), rt.handle().clone()),
        kind,
        servers: Some(servers),
        llm: None,
    })
}

/// An LLM task's engine, on the model's local server (its URL from the environment, as
/// upstream reads it), checked first unless `--skip-init-checks`.
fn llm_engine(
    opts: &NlpOptions,
    task: &'static LlmTask,
    rt: &tokio::runtime::Runtime,
    generated_on: String,
) -> Result<TaskEngine, Fatal> {
    let unsupported = || {
        Fatal::new(
            ExitCode::ArgsInvalid,
            format!(
                "{} ({}) does not support the '{}' provider.",
                task.name,
                task.model.id,
                opts.provider.name()
            ),
        )
    };
    let http = Http::new(opts.concurrency, opts.retry).map_err(Fatal::from)?;
    let (client, listed, hint) = match opts.provider {
        Provider::Local => {
            let local = task.model.local.as_ref().ok_or_else(unsupported)?;
            let url = std::env::var(&local.url_env).unwrap_or_else(|_| local.default_url.clone());
            let client =
                ChatClient::new(http, Endpoint::Local { base_url: url }, &local.model, true);
            let hint = format!(
                "\nTry running 'docker compose up {} --wait', or set {} to the server's URL.",
                local.compose_service, local.url_env
            );
            (client, local.model.clone(), hint)
        }
        Provider::Azure => {
            let azure = task.model.azure.as_ref().ok_or_else(unsupported)?;
            let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
            let (Some(api_key), Some(endpoint)) =
                (env("AZURE_OPENAI_API_KEY"), env("AZURE_OPENAI_ENDPOINT"))
            else {
                return Err(Fatal::new(
                    ExitCode::ArgsInvalid,
                    "Missing Azure environment variables. Set both AZURE_OPENAI_API_KEY & \
                     AZURE_OPENAI_ENDPOINT.",
                ));
            };
            let deployment = opts
                .azure_deployment
                .clone()
                .unwrap_or_else(|| azure.model.clone());
            let endpoint = Endpoint::Azure {
                endpoint,
                api_key,
                deployment,
            };
            let client = ChatClient::new(http, endpoint, &azure.model, azure.schema);
            (client, azure.model.clone(), String::new())
        }
        Provider::Bedrock => {
            let bedrock = task.model.bedrock.as_ref().ok_or_else(unsupported)?;
            // The account as the S3 store finds it: the environment, the shared files'
            // profile, web identity, ECS or instance roles.
            let (credentials, region) = crate::store::objects::aws_account().map_err(|e| {
                Fatal::new(ExitCode::ArgsInvalid, format!("AWS for Bedrock: {e:#}"))
            })?;
            let Some(region) = region else {
                return Err(Fatal::new(
                    ExitCode::ArgsInvalid,
                    "Missing AWS region for Bedrock. Set AWS_REGION (or AWS_DEFAULT_REGION), \
                     or a region in the AWS profile.",
                ));
            };
            let model = BedrockModel {
                base_url: BedrockModel::base_url_from_env(&region),
                region,
                model: bedrock.model.clone(),
                schema: bedrock.schema,
                cache: bedrock.cache,
            };
            let endpoint = Endpoint::Bedrock { model, credentials };
            let client = ChatClient::new(http, endpoint, &bedrock.model, bedrock.schema);
            (client, bedrock.model.clone(), String::new())
        }
    };
    if opts.init_checks && client.checks_model() {
        rt.block_on(client.check_model(&listed))
            .map_err(|e| Fatal::new(ExitCode::ServiceMissing, format!("{e}{hint}")))?;
    }
    let batches =
        opts.provider == Provider::Azure && task.model.azure.as_ref().is_some_and(|a| a.batches);
    if opts.batch && !batches {
        return Err(Fatal::new(
            ExitCode::NlpBatchingUnsupported,
            format!("Model {listed} does not support batching."),
        ));
    }
    let schema = task.table_schema().map_err(Fatal::from)?;
    // A row per note: keyed by the note's reference, or by its id in the covid study's format.
    let key = match task.row_format() {
        RowFormat::Result => "note_ref",
        RowFormat::Covid => "id",
    };
    let engine = Arc::new(LlmEngine::new(
        task,
        client,
        NlpCache::llm(&opts.phi),
        generated_on,
    ));
    Ok(TaskEngine {
        dispatch: Dispatch::Spawn(engine.clone(), rt.handle().clone()),
        kind: TableKind::NlpResults(Arc::new(NlpTable {
            task_version: task.definition.version,
            schema: Arc::new(schema),
            key: key.into(),
            group_field: key.into(),
        })),
        servers: None,
        llm: Some(engine),
    })
}

/// One pass of a task over the input's notes: read, select, de-identify, analyse with an
/// engine, and write what it gives into an output.
struct NotePass<'a> {
    opts: &'a NlpOptions,
    task: &'a NlpTask,
    files: &'a [crate::input::InputFile],
    codebook: &'a Arc<Codebook>,
    run_name: String,
    /// Notes an earlier run finished (in the output's `.ids` lists), skipped.
    finished: &'a HashSet<String>,
    group_key: GroupKey,
    filters: (Option<Arc<TextFilter>>, Option<Arc<RefSelection>>),
}

impl NotePass<'_> {
    fn run(
        &self,
        dispatch: Dispatch,
        kind: TableKind,
        errors: Option<std::fs::File>,
        (output, format): (ObjectLocation, OutputFormat),
        rejected: Option<std::fs::File>,
    ) -> Result<(Arc<RunShared>, Arc<NlpShared>), Fatal> {
        let opts = self.opts;
        let source = self.task.source();
        let nlp = Arc::new(
            NlpShared::new(source.clone(), dispatch, errors)
                .skipping(self.finished.clone(), self.group_key)
                .filtering(self.filters.0.clone(), self.filters.1.clone()),
        );
        let bundle_bytes = bundle_size(opts.memory, opts.engine.workers);
        let work = bundles::plan(self.files, bundle_bytes)?;
        let total_bytes: u64 = self.files.iter().map(|f| f.size).sum();
        // One task (one sink, one table writer) reads the notes of every type.
        let contexts = vec![TaskContext {
            task: 0,
            table: self.task.name().to_string(),
            resource_type: source.resources[0].clone(),
            more_resource_types: source.resources[1..].to_vec(),
            kind,
            whole_chunks: true,
            needs_shape: false,
            // Result rows are built from Rust strings.
            utf8_only: false,
            completion: None,
        }];
        let shared = RunBuilder {
            memory: opts.memory,
            format,
            output,
            run_name: self.run_name.clone(),
            batch_size: opts.batch_size,
            workers: opts.engine.workers,
            bundle_bytes,
            errors_to: opts.errors_to.clone(),
            rejected,
            row_journal: None,
            optimize_tables: opts.optimize_tables,
        }
        .build(
            Scrubber::new(Rules::embedded()?, self.codebook.clone(), false),
            self.codebook,
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
        Ok((shared, nlp))
    }
}

/// `--batch`: resumes the batches an earlier run left, gathers the notes whose answers are not
/// cached into new batches (a pass over the notes that writes nothing), and waits for them all;
/// their answers land in the cache, where the task's own pass finds them.
fn ask_in_batches(
    pass: &NotePass<'_>,
    (llm, kind): (&Arc<LlmEngine>, &TableKind),
    rt: &tokio::runtime::Runtime,
) -> Result<(), Fatal> {
    let poll = batch::poll_interval();
    let earlier = batch::unfinished(llm).map_err(Fatal::from)?;
    if !earlier.is_empty() {
        crate::say!(
            "Resuming {} batch{} an earlier run started.",
            earlier.len(),
            if earlier.len() == 1 { "" } else { "es" }
        );
        rt.block_on(batch::wait_all(llm, &earlier, poll))
            .map_err(Fatal::from)?;
    }
    crate::say!("Gathering the notes to ask in batches...");
    let collector = Arc::new(BatchCollector::new(llm.clone()).map_err(Fatal::from)?);
    // The pass writes nothing anyone keeps: NDJSON into a private folder, removed after.
    let scratch = tempfile::Builder::new()
        .prefix("cumulus-etl-batch-pass-")
        .tempdir()
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("a temporary folder: {e}")))?;
    let scratch_output = ObjectLocation::local(scratch.path()).map_err(Fatal::from)?;
    pass.run(
        Dispatch::Spawn(collector.clone(), rt.handle().clone()),
        kind.clone(),
        None,
        (scratch_output, OutputFormat::Ndjson),
        None,
    )?;
    let (sent, requests) = rt.block_on(collector.finish()).map_err(Fatal::from)?;
    if sent.is_empty() {
        crate::say!("Every answer is cached: no batch to send.");
        return Ok(());
    }
    crate::say!(
        "Waiting for {} batch{} of {requests} request{} (may take up to a day; an interrupted run resumes them; polling every {}).",
        sent.len(),
        if sent.len() == 1 { "" } else { "es" },
        if requests == 1 { "" } else { "s" },
        format!("{} s", poll.as_secs_f64())
    );
    let result = rt
        .block_on(batch::wait_all(llm, &sent, poll))
        .map_err(Fatal::from)?;
    crate::say!(
        "Batches done: {} answer{} cached, {} failed (asked again one by one).",
        result.answers,
        if result.answers == 1 { "" } else { "s" },
        result.failed
    );
    Ok(())
}

/// Registers a results table in the Athena database (its files' folder, its schema).
fn register_in_athena(
    opts: &NlpOptions,
    name: &str,
    version: i32,
    kind: &TableKind,
) -> Result<(), Fatal> {
    let schema = match kind {
        TableKind::NlpResults(table) => table.schema.clone(),
        _ => return Ok(()),
    };
    let folder = nlp_files::table_folder(&opts.output, name, version);
    athena::register_table(
        &opts.athena,
        name,
        &schema,
        (folder.url(), opts.output_format),
    )?;
    crate::say!("Registered the Athena table {name} ({}).", folder.url());
    Ok(())
}

/// In Athena mode, the results location belongs to one PHI folder (its codebook's id in
/// `codebook.id` there, written by the first run), or anonymous ids would not match.
fn tie_to_phi_folder(
    output: &ObjectLocation,
    codebook_id: &str,
    athena: &AthenaSettings,
) -> Result<(), Fatal> {
    let failed = |e: anyhow::Error| Fatal::new(ExitCode::Failure, format!("{e:#}"));
    match output.read("codebook.id").map_err(failed)? {
        Some(saved) if String::from_utf8_lossy(&saved).trim() != codebook_id => Err(Fatal::new(
            ExitCode::WrongPhiFolder,
            format!(
                "The Athena workgroup '{}' is already associated with another PHI folder. You \
                 must always use the same PHI folder for a given Athena workgroup.",
                athena.workgroup.as_deref().unwrap_or_default()
            ),
        )),
        Some(_) => Ok(()),
        None => output
            .write("codebook.id", codebook_id.as_bytes().to_vec().into())
            .map_err(failed),
    }
}

/// Runs one task; returns whether anything failed.
fn run_task(
    opts: &NlpOptions,
    task: &NlpTask,
    files: &[crate::input::InputFile],
    codebook: &Arc<Codebook>,
    (runtime, text_filter, cohort): (
        Option<&tokio::runtime::Runtime>,
        Option<Arc<TextFilter>>,
        Option<Arc<RefSelection>>,
    ),
    rejected: Option<std::fs::File>,
) -> Result<bool, Fatal> {
    let started_at = Instant::now();
    let started = PyDateTime::now_utc();
    let name = task.name().to_string();
    crate::say!("Running {name}...");
    let generated_on = started.isoformat();
    let engine = match task {
        NlpTask::Covid(study) => covid_engine(opts, study, runtime, generated_on)?,
        NlpTask::Llm(llm) => {
            let rt = runtime.expect("LLM tasks start the NLP runtime");
            llm_engine(opts, llm, rt, generated_on)?
        }
    };
    let errors = match &opts.errors_to {
        Some(dir) => {
            let dir = dir.join(&name);
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
    let (version, group_key) = match task {
        NlpTask::Covid(study) => (study.task_version, GroupKey::NoteId),
        NlpTask::Llm(llm) => (llm.definition.version, GroupKey::NoteRef),
    };
    let finished = match opts.output_format {
        OutputFormat::Deltalake => HashSet::new(),
        _ => {
            if opts.clean {
                let removed = nlp_files::clean(&opts.output, &name).map_err(Fatal::from)?;
                crate::say!("Removed {removed} files of earlier {name} results (--clean).");
            }
            nlp_files::finished_groups(&opts.output, &name, version).map_err(Fatal::from)?
        }
    };
    let pass = NotePass {
        opts,
        task,
        files,
        codebook,
        run_name: started.folder_name(),
        finished: &finished,
        group_key,
        filters: (text_filter, cohort),
    };
    if let (true, Some(llm), Some(rt)) = (opts.batch, &engine.llm, runtime) {
        ask_in_batches(&pass, (llm, &engine.kind), rt)?;
    }
    let (shared, nlp) = pass.run(
        engine.dispatch,
        engine.kind.clone(),
        errors,
        (opts.output.clone(), opts.output_format),
        rejected,
    )?;
    let total_bytes: u64 = files.iter().map(|f| f.size).sum();
    shared.touch_if_empty(&name, &shared.work.tasks[0])?;
    finish_tables(&shared, opts.optimize_tables);
    if opts.athena_tables {
        register_in_athena(opts, &name, version, &engine.kind)?;
    }
    let n = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let s = &nlp.stats;
    let selected = match task {
        NlpTask::Covid(_) => "ED notes with a valid status",
        NlpTask::Llm(_) => "notes with a valid status",
    };
    crate::say!(
        "Notes: {} read, {} finished by an earlier run, {} selected ({selected}), {} with text, {} left out by --select-by/--reject-by, {} analysed, {} failed",
        n(&s.seen),
        n(&s.finished_before),
        n(&s.selected),
        n(&s.with_text),
        n(&s.left_out),
        n(&s.analysed),
        n(&s.failed)
    );
    let http = engine
        .servers
        .as_ref()
        .map(|servers| &servers.http)
        .or(engine.llm.as_ref().map(|llm| &llm.client.http));
    if let Some(http) = http {
        crate::say!(
            "Servers: {} requests, {} retries, {} answers from the cache",
            n(&http.stats.requests),
            n(&http.stats.retries),
            n(&http.stats.cache_hits)
        );
    }
    if let Some(llm) = &engine.llm {
        let written = n(&llm.tokens.cache_written_input);
        crate::say!(
            "Tokens: {} new input, {} cached input, {}{} output",
            n(&llm.tokens.new_input),
            n(&llm.tokens.cache_read_input),
            // Only Bedrock counts these.
            match written {
                0 => String::new(),
                _ => format!("{written} written to the cache, "),
            },
            n(&llm.tokens.output)
        );
        let prices = match (opts.provider, task) {
            (Provider::Azure, NlpTask::Llm(t)) => {
                t.model.azure.as_ref().and_then(|a| a.prices.as_ref())
            }
            (Provider::Bedrock, NlpTask::Llm(t)) => {
                t.model.bedrock.as_ref().and_then(|b| b.prices.as_ref())
            }
            _ => None,
        };
        if let Some(prices) = prices {
            let cost = (n(&llm.tokens.new_input) as f64 * prices.new_input_tokens
                + n(&llm.tokens.cache_read_input) as f64 * prices.cache_read_input_tokens
                + written as f64 * prices.cache_written_input_tokens
                + n(&llm.tokens.output) as f64 * prices.output_tokens)
                / 1000.0
                * prices.multiplier
                // Azure bills batches at half price, as upstream counts them.
                * if opts.batch { 0.5 } else { 1.0 };
            crate::say!("Estimated cost (prices as of {}): ${cost:.2}", prices.date);
        }
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
