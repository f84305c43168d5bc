//! One Cumulus table in Delta Lake and the operations Cumulus ETL performs on it: upsert on the
//! uniqueness fields with the `meta.lastUpdated` guard, the group-field delete, deletions by id,
//! and end-of-run maintenance. Every data commit carries a (run, sequence) transaction so a
//! retried commit is recognised instead of applied twice.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use delta_kernel::table_properties::DataSkippingNumIndexedCols;
use deltalake::datafusion::common::Column;
use deltalake::datafusion::execution::context::SessionContext;
use deltalake::datafusion::execution::context::SessionState;
use deltalake::datafusion::execution::runtime_env::RuntimeEnv;
use deltalake::datafusion::functions::core::expr_fn::get_field;
use deltalake::datafusion::logical_expr::{Expr, Operator, binary_expr, cast, lit};
use deltalake::delta_datafusion::{DeltaRuntimeEnvBuilder, DeltaSessionContext};
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::{
    Action, DomainMetadata, MetadataExt, Protocol, StructType, Transaction, new_metadata,
};
use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::logstore::{DeltaIOStorageBackend, IORuntime};
use deltalake::operations::optimize::OptimizeType;
use deltalake::operations::write::WriterStatsConfig;
use deltalake::protocol::{DeltaOperation, MergePredicate, SaveMode};
use deltalake::table::config::TablePropertiesExt as _;
use deltalake::{DeltaTable, DeltaTableBuilder, DeltaTableError};

use super::commit::{self, COMMIT_ATTEMPTS, CommitMeta, is_conflict};
use super::compact;
use super::conform::{adds_fields, conform_batch, union_schema};
use super::file_merge::{self, MergeRules};
use super::files::{TableFiles, WrittenFiles};
use super::ledger::{Ledger, Route, key_fingerprints};
use super::merge_source::MergeSource;
use super::protocol;
use super::stage::{MergeStage, StageDir, StagedFile, read_all, read_batch};
use crate::memory::budget::{HeldMemory, MemoryBudget};
use crate::output::{OnWritten, RowTag, TableKind};
use crate::store::ObjectLocation;

/// Compaction rewrites the whole table, so it waits until a table has this many files (the
/// parts of a batch encoded on several threads count as one): a
/// handful of batch-sized files reads as fast as one, and a first load of a large export
/// should not pay for writing its data twice.
pub const COMPACTION_MIN_FILES: usize = 8;

/// Rows per record batch of a MERGE source.
const SOURCE_SLICE_ROWS: usize = 8192;

/// MERGEs file by file that run at once; each has its own share of memory (`merge_bytes`).
const PARALLEL_MERGES: usize = 2;

/// Rows per MERGE when a run does not say (Cumulus ETL's default `--batch-size`).
const DEFAULT_MERGE_ROWS: usize = 100_000;

/// Ids per DELETE statement; Cumulus ETL saw out-of-memory errors with much larger lists.
const DELETE_CHUNK: usize = 50_000;

/// How a table is keyed and updated, as Cumulus ETL's output tables define it.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: String,
    /// Columns that identify a row (MERGE predicate).
    pub uniqueness: Vec<String>,
    /// False keeps the first row ever written for a key (`etl__completion_encounters`).
    pub update_existing: bool,
    /// A top-level column whose touched values replace all their stored rows.
    pub group_field: Option<String>,
}

impl TableSpec {
    /// The spec of a table of the given kind.
    pub fn for_kind(name: &str, kind: &TableKind) -> TableSpec {
        let key;
        let (uniqueness, update_existing): (&[&str], bool) = match kind {
            TableKind::Fhir(_) => (&["id"], true),
            TableKind::NlpResults(table) => {
                key = [table.key.as_str()];
                (&key, true)
            }
            TableKind::CompletionEncounters => (&["encounter_id", "group_name"], false),
            TableKind::Completion => (
                &["table_name", "group_name", "export_time", "etl_time"],
                true,
            ),
        };
        TableSpec {
            name: name.to_string(),
            uniqueness: uniqueness.iter().map(|s| s.to_string()).collect(),
            update_existing,
            group_field: kind.group_field().map(str::to_string),
        }
    }
}

/// Delta's default target file size, for a table whose properties cannot be read yet.
const DEFAULT_TARGET_FILE_SIZE: u64 = 104_857_600;

/// Settings shared by all Delta tables of a run.
#[derive(Clone)]
pub struct DeltaSettings {
    /// Identifies this run in the tables' transaction log (`txn.appId`).
    pub run_id: String,
    /// Written into the `commitInfo` of every commit of this process ([`RUN_MARKER`]), so the
    /// end of the run can tell whether another writer committed in between: `run_id` names
    /// the run by its start time, which two runs may share.
    pub run_marker: String,
    /// What row journals are written under (the index tag) and how deleted keys are
    /// fingerprinted, when the run keeps row indexes.
    pub row_journal: Option<RowJournal>,
    /// One DataFusion memory pool for every table's MERGE, DELETE and OPTIMIZE, so the total
    /// stays bounded however many tables commit at once.
    runtime: Arc<RuntimeEnv>,
    /// One MERGE, DELETE or compaction at a time: they share the pool, and two joins that each
    /// need most of it would both fail.
    heavy: Arc<tokio::sync::Semaphore>,
    /// MERGEs file by file in parallel (one per commit thread): each holds its own bounded
    /// index and cache, and one at a time left a re-run's last MERGEs in a queue on one core.
    merges: Arc<tokio::sync::Semaphore>,
    /// Staged rows merged by delta-rs go in MERGEs of at most this many rows (`--batch-size`)...
    merge_rows: usize,
    /// ...or this many bytes of Arrow data, since that MERGE holds its rows in memory. A MERGE
    /// file by file holds its key index (up to half of this) and a cache of source slices
    /// (the other half) instead, whatever the number of rows.
    merge_bytes: usize,
    /// The memory of the keys every table keeps while it takes appends, for the run's budget.
    routing_keys: HeldMemory,
    /// Threads a compaction may use (the run's workers, which have finished by then).
    threads: usize,
    /// Appends to clustered tables are cut into key ranges as they are written, so the
    /// compaction at the end joins them without decoding them (`range_pieces`): set when the
    /// run compacts its tables.
    cut_appends: bool,
    /// The input bytes each table reads in this run (by table name), which size its cut.
    table_inputs: Arc<HashMap<String, u64>>,
}

/// What a table's commits after a version say ([`CumulusTable::commits_since`]).
#[derive(Debug, Clone, Default)]
pub struct CommitsSince {
    /// Every one carries this process's [`RUN_MARKER`]: no other writer committed.
    pub only_this_run: bool,
    /// Their row journals, in commit order, with those of this run's MERGEs that found nothing
    /// to change after the commit they saw last; None when one of them changes data without a
    /// journal (another writer's, or delta-rs's MERGE or DELETE), so no index can be rebuilt
    /// from them. Commits that change no data (creation, compaction, VACUUM) need none.
    pub journals: Option<Vec<String>>,
}

/// How a run's commits write row journals (`docs/delta.md`, Re-runs).
#[derive(Clone)]
pub struct RowJournal {
    /// The row index tag they are written under.
    pub tag: u128,
    /// The fingerprints of deleted keys.
    pub keys: crate::rerun::RowFingerprints,
}

/// The `commitInfo` field that names the process that made a commit.
pub const RUN_MARKER: &str = "cumulusEtlProcess";

/// The `commitInfo` field that names a commit's row journal: the tags of
/// the rows it writes ([`crate::rerun::index::JOURNAL_DIR`]), for the row index of a run that
/// stops before its end (`docs/delta.md`, Re-runs).
pub const JOURNAL_FIELD: &str = "cumulusEtlJournal";

impl DeltaSettings {
    /// Settings for a run under the global `--memory` budget. DataFusion (DELETE, compaction,
    /// and delta-rs's MERGE for tables [`file_merge`] cannot read) gets half of it, but at
    /// least an eighth of the machine's memory (64 MiB to 2 GiB): delta-rs's MERGE builds its
    /// join over the whole table, and a pool sized from a small budget failed its batches
    /// (100,000-row tables at 256 MiB). The pool is a ceiling, not a reservation. `run` names
    /// the run in the transaction log.
    pub fn for_budget(budget: u64, run: &str) -> DeltaSettings {
        let floor = (crate::memory::budget::physical_memory() / 8).clamp(64 << 20, 2 << 30);
        DeltaSettings {
            // MERGEs' indexes and caches sit beside the budget's rows in flight: a quarter of
            // the budget in all (an eighth for each of two) kept a re-run of 1 GB at
            // `--memory 256MiB` at 325 MiB peak RSS (401 MiB with half the budget).
            merge_bytes: (budget / 4) as usize / PARALLEL_MERGES,
            ..DeltaSettings::new(
                (budget / 2).max(floor) as usize,
                format!("cumulus-etl/{run}"),
            )
        }
    }

    /// Settings whose DataFusion operations share `memory_limit` bytes (spilling beyond).
    pub fn new(memory_limit: usize, run_id: impl Into<String>) -> DeltaSettings {
        DeltaSettings {
            run_id: run_id.into(),
            run_marker: uuid::Uuid::new_v4().to_string(),
            row_journal: None,
            runtime: DeltaRuntimeEnvBuilder::new()
                .with_max_spill_size(memory_limit)
                .build(),
            heavy: Arc::new(tokio::sync::Semaphore::new(1)),
            merges: Arc::new(tokio::sync::Semaphore::new(PARALLEL_MERGES)),
            merge_rows: DEFAULT_MERGE_ROWS,
            merge_bytes: memory_limit / 4 / PARALLEL_MERGES,
            routing_keys: HeldMemory::default(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cut_appends: false,
            table_inputs: Arc::default(),
        }
    }

    /// Has the run's budget count the memory of the tables' routing keys (about 8 to 20 bytes
    /// for each row appended so far), which grows with the input rather than the batch.
    pub fn count_routing_keys_in(&self, budget: &MemoryBudget) {
        budget.count_held(
            "the Delta tables' keys of appended rows",
            self.routing_keys.clone(),
        );
    }

    /// Staged batches merged by delta-rs are merged once they reach `rows` rows (the run's
    /// `--batch-size`, as Cumulus ETL would); a MERGE file by file is bounded by its memory.
    pub fn with_merge_rows(mut self, rows: usize) -> DeltaSettings {
        self.merge_rows = rows.max(1);
        self
    }

    /// Commits write row journals, when given.
    pub fn with_row_journals(mut self, journal: Option<RowJournal>) -> DeltaSettings {
        self.row_journal = journal;
        self
    }

    /// Compactions use up to `threads` threads (the machine's cores by default).
    pub fn with_threads(mut self, threads: usize) -> DeltaSettings {
        self.threads = threads.max(1);
        self
    }

    /// Appends to clustered tables are cut into key ranges as they are written, for the
    /// compaction at the end of the run (`range_pieces`); only worth it when one follows.
    /// The input bytes each table reads in this run (by table name): a large table's appends
    /// are cut into as many ranges as its compacted files, so that they too are joined.
    pub fn with_table_inputs(mut self, inputs: HashMap<String, u64>) -> DeltaSettings {
        self.table_inputs = Arc::new(inputs);
        self
    }

    pub fn with_cut_appends(mut self, cut: bool) -> DeltaSettings {
        self.cut_appends = cut;
        self
    }
}

/// A table being written by this run.
pub struct CumulusTable {
    spec: TableSpec,
    table: DeltaTable,
    settings: Arc<DeltaSettings>,
    /// How queued batches are routed (append or merge), shared with the table's writers.
    ledger: Arc<Mutex<Ledger>>,
    /// Data commits made by this run (the transaction version of the next is this plus one).
    commits: i64,
    /// Batches waiting to be merged together.
    stage: MergeStage,
    /// Why the table cannot be merged file by file (None: it can), once known.
    table_features: Option<Option<&'static str>>,
    /// The table cannot be merged file by file, and the run has said so.
    warned_unsupported: bool,
    /// Batches routed to an append may be appended: false once another writer committed to
    /// the table during the run, since its rows may then share keys with them.
    appends_safe: bool,
    /// The clustering columns of a clustered table, which data files need statistics for.
    clustering: Vec<String>,
    /// Row journals of MERGEs that found nothing to change, with the table version they saw:
    /// their rows are in the table as those lines make them, though no commit names them.
    confirmed: Vec<(Option<i64>, String)>,
}

impl CumulusTable {
    /// Opens the table under `root`, which need not exist yet.
    pub async fn open(
        root: &ObjectLocation,
        spec: TableSpec,
        settings: Arc<DeltaSettings>,
    ) -> Result<Self> {
        let table = open_table(root, &spec.name)
            .await
            .with_context(|| format!("opening the Delta table {}", root.url_of(&spec.name)))?;
        let (schema, append_only) = match table.version() {
            None => (None, true),
            Some(_) => (
                Some(table.snapshot()?.snapshot().arrow_schema()),
                table.get_file_uris()?.next().is_none(),
            ),
        };
        let ledger = Ledger::new(schema, append_only, settings.routing_keys.clone());
        let mut opened = CumulusTable {
            spec,
            table,
            settings,
            ledger: Arc::new(Mutex::new(ledger)),
            commits: 0,
            stage: MergeStage::default(),
            table_features: None,
            warned_unsupported: false,
            appends_safe: true,
            clustering: Vec::new(),
            confirmed: Vec::new(),
        };
        opened.check_protocol().await?;
        Ok(opened)
    }

    /// Refuses a table whose protocol this tool cannot honour ([`protocol::check_writable`]),
    /// and learns its clustering columns.
    async fn check_protocol(&mut self) -> Result<()> {
        if !self.exists() {
            // This run will create it, clustered by its uniqueness fields.
            self.clustering = self.spec.uniqueness.clone();
            return Ok(());
        }
        let state = self.table.snapshot()?;
        let checked = protocol::check_writable(
            &serde_json::to_value(state.protocol())?,
            &serde_json::to_value(state.metadata())?,
        );
        if let Err(reason) = checked {
            let name = &self.spec.name;
            let message = format!("the Delta table {name} {reason}; nothing was written to it");
            return Err(protocol::Refused(message).into());
        }
        self.clustering = protocol::clustering_columns(&self.table.log_store(), state.version())
            .await
            .with_context(|| format!("reading the clustering columns of {}", self.spec.name))?;
        Ok(())
    }

    /// Reads the table again after a commit lost its race to another writer, and checks it
    /// again: the other writer may have changed its protocol or schema.
    async fn reload(&mut self) -> Result<()> {
        self.table
            .update_incremental(None)
            .await
            .with_context(|| format!("reading {} again", self.spec.name))?;
        self.table_features = None;
        self.check_protocol().await
    }

    fn exists(&self) -> bool {
        self.table.version().is_some()
    }

    /// Commit properties of a delta-rs operation, with this process's [`RUN_MARKER`].
    fn marked_commit(&self) -> deltalake::kernel::transaction::CommitProperties {
        deltalake::kernel::transaction::CommitProperties::default().with_metadata([(
            RUN_MARKER.to_string(),
            serde_json::Value::from(self.settings.run_marker.clone()),
        )])
    }

    /// What the commits after version `since` (None: every commit) up to the table's version
    /// say ([`CommitsSince`]), read once for both.
    pub async fn commits_since(&mut self, since: Option<i64>) -> Result<CommitsSince> {
        let mut seen = CommitsSince {
            only_this_run: true,
            journals: Some(Vec::new()),
        };
        let Some(now) = self.table.version() else {
            return Ok(seen);
        };
        let first = since.map_or(0, |v| v as u64 + 1);
        let log_store = self.table.log_store();
        // A journal a MERGE confirmed at a version comes after that version's commit.
        let confirmed_at = |version: Option<i64>| {
            self.confirmed
                .iter()
                .filter(move |(at, _)| *at == version)
                .map(|(_, name)| name.clone())
        };
        if let Some(journals) = &mut seen.journals {
            journals.extend(confirmed_at(since));
        }
        for version in first..=now {
            let Some(commit) = log_store.read_commit_entry(version).await? else {
                return Ok(CommitsSince {
                    only_this_run: false,
                    journals: None,
                });
            };
            if !commit::carries_info(&commit, RUN_MARKER, &self.settings.run_marker) {
                seen.only_this_run = false;
            }
            match commit::journal_of(&commit, JOURNAL_FIELD) {
                commit::Journal::Named(name) => {
                    if let Some(journals) = &mut seen.journals {
                        journals.push(name);
                    }
                }
                commit::Journal::NoDataChange => {}
                commit::Journal::Missing => seen.journals = None,
            }
            if let Some(journals) = &mut seen.journals {
                journals.extend(confirmed_at(i64::try_from(version).ok()));
            }
        }
        Ok(seen)
    }

    /// Gives `each` every value of the string `column` in the table's data files
    /// ([`super::column_scan`]); returns how many.
    pub async fn for_each_value(
        &mut self,
        column: &str,
        each: &mut (dyn FnMut(&arrow::array::StringArray) -> Result<()> + Send),
    ) -> Result<u64> {
        if !self.exists() {
            return Ok(0);
        }
        super::column_scan::for_each_value(&self.table, column, each).await
    }

    /// The table's version as this run last read or committed it (None: not created yet).
    pub fn version(&self) -> Option<i64> {
        self.table.version().and_then(|v| i64::try_from(v).ok())
    }

    /// The table's routing ledger, for the writers that queue its batches.
    pub fn ledger(&self) -> Arc<Mutex<Ledger>> {
        self.ledger.clone()
    }

    /// The table's data files, for writers that encode batches themselves (`runtime` drives
    /// the uploads), with the table's statistics settings.
    pub fn files(&self, runtime: tokio::runtime::Handle) -> TableFiles {
        let stats = match self.table.snapshot() {
            Ok(state) => {
                let config = WriterStatsConfig::from_config(state.snapshot().table_configuration());
                let schema = state.snapshot().arrow_schema();
                with_stats_for(config, &schema, &self.clustering)
            }
            Err(_) => WriterStatsConfig::new(Default::default(), None),
        };
        let files = TableFiles::new(self.table.log_store().object_store(None), stats, runtime)
            .with_threads(self.settings.threads);
        if !self.settings.cut_appends {
            return files;
        }
        let target = self
            .table
            .snapshot()
            .map(|s| s.snapshot().table_properties().target_file_size().get())
            .unwrap_or(DEFAULT_TARGET_FILE_SIZE);
        let input = self.settings.table_inputs.get(&self.spec.name).copied();
        let ranges = super::range_pieces::planned_ranges(
            input.unwrap_or(0),
            target,
            self.settings.threads,
            self.settings.merge_rows,
        );
        files.with_cutting(self.clustering.clone(), ranges)
    }

    /// Routes a batch (records its keys in the ledger); returns the route and the keys.
    pub fn route(&self, batch: &RecordBatch, groups: &[String]) -> Result<(Route, Vec<u64>)> {
        let keys = key_fingerprints(&self.spec.uniqueness, batch, groups)?;
        Ok((self.ledger.lock().unwrap().route(&keys), keys))
    }

    /// A DataFusion session on the shared memory pool. Hash joins are fastest but cannot
    /// spill; `hash_join = false` plans sort-merge joins, which can.
    fn session(&self, hash_join: bool) -> SessionState {
        let mut state =
            DeltaSessionContext::with_runtime_env(self.settings.runtime.clone()).state();
        state.config_mut().options_mut().optimizer.prefer_hash_join = hash_join;
        state
    }

    /// What the log records about this run's next data commit: its transaction.
    fn data_commit(&mut self) -> CommitMeta {
        self.commits += 1;
        CommitMeta {
            txn: Some(Transaction::new(&self.settings.run_id, self.commits)),
            ..CommitMeta::default()
        }
    }

    /// Upserts a batch: inserts new keys; replaces stored rows unless theirs is newer
    /// (`meta.lastUpdated`); deletes stored rows of `groups` the batch no longer has. An empty
    /// batch only creates the table (with its schema) when it does not exist yet. Applied at
    /// once (after anything staged).
    pub async fn upsert(&mut self, batch: RecordBatch, groups: &[String]) -> Result<()> {
        self.flush_staged().await;
        let (route, _) = self.route(&batch, groups)?;
        self.apply_now(batch, groups, route).await
    }

    /// Applies a routed batch at once.
    async fn apply_now(
        &mut self,
        batch: RecordBatch,
        groups: &[String],
        route: Route,
    ) -> Result<()> {
        match self.prepare(batch, groups, route)? {
            None => Ok(()),
            Some((batch, Route::Append)) => self.append(batch).await,
            Some((batch, Route::Merge)) => {
                let heavy = self.settings.heavy.clone();
                let _turn = heavy.acquire().await?;
                self.merge_batches(vec![batch], groups).await
            }
        }
    }

    /// Like [`Self::upsert`], but a batch that needs a MERGE is staged on local disk (and
    /// `report` told so, which frees the caller's memory) to be merged together with the
    /// batches that follow; `report` hears the outcome once it is committed.
    pub async fn submit(&mut self, batch: RecordBatch, groups: Vec<String>, report: OnWritten) {
        match self.route(&batch, &groups) {
            Ok((route, keys)) => self.apply(batch, groups, route, &keys, report).await,
            Err(e) => report.done(Err(e)),
        }
    }

    /// [`Self::submit`] for a batch already routed (by its writer, when it was queued).
    pub async fn apply(
        &mut self,
        batch: RecordBatch,
        groups: Vec<String>,
        route: Route,
        keys: &[u64],
        report: OnWritten,
    ) {
        let prepared = match self.prepare(batch, &groups, route) {
            Ok(p) => p,
            Err(e) => return report.done(Err(e)),
        };
        match prepared {
            None => report.done(Ok(())),
            Some((batch, Route::Append)) => {
                self.flush_staged().await;
                report.done(self.append(batch).await)
            }
            Some((batch, Route::Merge)) => match self.stage.dir().write(&batch) {
                Ok(file) => self.stage_file(file, &groups, keys, report).await,
                Err(e) => {
                    crate::say!(
                        "warning: could not stage a batch of {} ({e:#}); merging it alone",
                        self.spec.name
                    );
                    self.flush_staged().await;
                    report.done(self.apply_now(batch, &groups, Route::Merge).await)
                }
            },
        }
    }

    /// The folder this table's MERGE batches are staged in, for writers that stage their own
    /// (and so free their memory without waiting for the committer).
    pub fn stage_dir(&self) -> Arc<StageDir> {
        self.stage.dir()
    }

    /// [`Self::apply`] for a MERGE batch a writer has staged itself.
    pub async fn apply_staged(
        &mut self,
        file: StagedFile,
        groups: Vec<String>,
        keys: &[u64],
        report: OnWritten,
    ) {
        if !self.exists() {
            // An earlier append failed, so the table is still to be created: apply it alone.
            let batch = read_batch(&file.path);
            let _ = std::fs::remove_file(&file.path);
            return match batch {
                Ok(batch) => self.apply(batch, groups, Route::Merge, keys, report).await,
                Err(e) => report.done(Err(e.context("reading a staged batch back"))),
            };
        }
        self.stage_file(file, &groups, keys, report).await
    }

    /// Adds a staged file to the next MERGE: what is staged merges first if the file's keys
    /// touch it or its types conflict with it, and the MERGE runs once the stage is full.
    async fn stage_file(
        &mut self,
        file: StagedFile,
        groups: &[String],
        keys: &[u64],
        report: OnWritten,
    ) {
        if self.stage.overlaps(keys) || !self.stage.fits(&file.schema) {
            self.flush_staged().await;
        }
        self.stage.adopt(file, keys, groups, report);
        if self.stage_is_full() {
            self.flush_staged().await;
        }
    }

    /// True once the staged rows' MERGE would fill its share of memory: the key index for a
    /// MERGE file by file, the rows themselves for delta-rs's.
    fn stage_is_full(&mut self) -> bool {
        let limit = self.settings.merge_bytes;
        match self.table_features() {
            Ok(None) => self.stage.rows() * file_merge::INDEX_BYTES_PER_ROW >= limit / 2,
            _ => self.stage.is_full(self.settings.merge_rows, limit),
        }
    }

    /// Why the table cannot be merged file by file (see [`file_merge::unsupported`]), read
    /// once: this run's own commits do not change it.
    fn table_features(&mut self) -> Result<Option<&'static str>> {
        if let Some(known) = self.table_features {
            return Ok(known);
        }
        Ok(*self
            .table_features
            .insert(file_merge::unsupported(&self.table)?))
    }

    /// Merges everything staged as one MERGE and reports each staged batch's outcome; a
    /// failed batch's rows go back with the error, for the errors folder.
    pub async fn flush_staged(&mut self) {
        if self.stage.is_empty() {
            return;
        }
        // A bounded number of MERGEs at a time across tables (one when delta-rs merges), and
        // the turn taken before anything is read back, so their memory adds up to a bound.
        let turns = match self.table_features() {
            Ok(None) => self.settings.merges.clone(),
            _ => self.settings.heavy.clone(),
        };
        let _turn = turns.acquire().await;
        let staged = self.stage.take();
        let result = self
            .merge_staged(
                staged.paths(),
                staged.schema.clone(),
                &staged.groups,
                staged.tags.clone(),
            )
            .await;
        staged.report(&result);
    }

    async fn merge_staged(
        &mut self,
        paths: Vec<PathBuf>,
        staged_schema: Option<SchemaRef>,
        groups: &[String],
        tags: Option<Vec<RowTag>>,
    ) -> Result<()> {
        let mut schema = self.table.snapshot()?.snapshot().arrow_schema();
        if let Some(staged) = &staged_schema {
            schema = union_schema(&schema, staged)?;
        }
        if self.merges_by_file()? {
            let cache = self.settings.merge_bytes / 2;
            let source = MergeSource::staged(&schema, paths, cache);
            return self.merge_by_file(source, groups, tags).await;
        }
        let batches = read_all(&paths)?
            .iter()
            .map(|batch| conform_batch(batch, &schema))
            .collect::<Result<Vec<_>>>()?;
        self.merge_batches(batches, groups).await
    }

    /// True when the table can be merged file by file; if not, says why once per run, since
    /// delta-rs's MERGE holds much more in memory.
    fn merges_by_file(&mut self) -> Result<bool> {
        let Some(reason) = self.table_features()? else {
            return Ok(true);
        };
        if !self.warned_unsupported {
            self.warned_unsupported = true;
            crate::say!(
                "note: {} uses {reason}, so it is merged by delta-rs, whose memory grows with \
                 the table",
                self.spec.name
            );
        }
        Ok(false)
    }

    /// Records files a writer has written (see [`TableFiles`]) in one commit, after anything
    /// staged: it creates the table, or evolves its schema, as the files need.
    pub async fn commit_files(&mut self, files: WrittenFiles, report: OnWritten) {
        self.flush_staged().await;
        let result = self
            .record_files(files)
            .await
            .with_context(|| format!("appending to {}", self.spec.name));
        report.done(result);
    }

    /// Commits files written for a batch routed to an append: it creates the table or grows
    /// its schema as the files need. Once another writer has committed to the table during the
    /// run (a lost race shows it), the files' rows are merged instead, and so are all later
    /// batches.
    async fn record_files(&mut self, files: WrittenFiles) -> Result<()> {
        let mut meta = self.data_commit();
        let rows: i64 = files
            .adds
            .iter()
            .filter_map(|a| Some(a.get_stats().ok()??.num_records))
            .sum();
        if files.tags.len() as i64 == rows
            && let Some(journal) = self.write_journal(files.tags.clone()).await?
        {
            meta.info.insert(JOURNAL_FIELD.into(), journal.into());
        }
        for _ in 0..COMMIT_ATTEMPTS {
            if !self.appends_safe {
                return self.merge_written(files).await;
            }
            let mut actions = match self.exists() {
                false => self.creation_actions(&files.schema)?,
                true => self.schema_change(&files.schema)?.into_iter().collect(),
            };
            actions.extend(files.adds.iter().cloned().map(Action::Add));
            let operation = match self.exists() {
                false => self.create_operation(&actions)?,
                true => DeltaOperation::Write {
                    mode: SaveMode::Append,
                    partition_by: None,
                    predicate: None,
                },
            };
            match self.commit(meta.clone(), actions, operation).await {
                Err(e) if is_conflict(&e) => {
                    self.reload().await?;
                    self.appends_safe = false;
                    self.ledger.lock().unwrap().stop_appending();
                }
                other => return other,
            }
        }
        self.merge_written(files).await
    }

    /// Writes the journal of a commit (the tags of the rows it writes, sorted), when the run
    /// keeps row indexes; returns its name, for the commit's
    /// `commitInfo` ([`JOURNAL_FIELD`]). A commit without one leaves the table's index unusable
    /// after it, which is always safe.
    async fn write_journal(&mut self, tags: Vec<RowTag>) -> Result<Option<String>> {
        let Some(tag) = self.settings.row_journal.as_ref().map(|j| j.tag) else {
            return Ok(None);
        };
        let name = uuid::Uuid::new_v4().to_string();
        let bytes = crate::rerun::index::encode(tag, -1, tags);
        let path = deltalake::Path::from(format!("{}/{name}", crate::rerun::index::JOURNAL_DIR));
        self.table
            .log_store()
            .object_store(None)
            .put(&path, bytes.into())
            .await
            .with_context(|| format!("writing a row journal of {}", self.spec.name))?;
        Ok(Some(name))
    }

    /// Merges the rows of files written for an append (not committed), then removes them.
    async fn merge_written(&mut self, files: WrittenFiles) -> Result<()> {
        let store = self.files(tokio::runtime::Handle::current());
        let reader = file_merge::SliceReader::new(self.table.log_store().object_store(None));
        let mut batches = Vec::new();
        for add in &files.adds {
            let path = deltalake::Path::from(add.path.as_str());
            let mut slices = file_merge::read_file(&reader, &path, &files.schema, None).await?;
            while let Some(slice) = futures::StreamExt::next(&mut slices).await {
                batches.push(slice?);
            }
        }
        store.remove(&files.adds).await;
        if batches.is_empty() {
            return Ok(());
        }
        self.merge_batches(batches, &[]).await
    }

    /// The actions that create the table as Cumulus ETL's Spark creates it: protocol (1, 7)
    /// with liquid clustering, clustered by the table's uniqueness fields.
    fn creation_actions(&self, schema: &SchemaRef) -> Result<Vec<Action>> {
        let schema: StructType = schema.as_ref().try_into_kernel()?;
        let metadata = new_metadata(
            &schema,
            Vec::<String>::new(),
            Vec::<(String, String)>::new(),
        )?
        .with_name(self.spec.name.clone())?;
        let protocol: Protocol = serde_json::from_value(serde_json::json!({
            "minReaderVersion": protocol::CREATED_READER_VERSION,
            "minWriterVersion": protocol::CREATED_WRITER_VERSION,
            "writerFeatures": protocol::CREATED_WRITER_FEATURES,
        }))?;
        let clustering = DomainMetadata {
            domain: protocol::CLUSTERING_DOMAIN.to_string(),
            configuration: protocol::clustering_configuration(&self.spec.uniqueness),
            removed: false,
        };
        Ok(vec![
            Action::Protocol(protocol),
            Action::Metadata(metadata),
            Action::DomainMetadata(clustering),
        ])
    }

    /// How the log describes the table's creation (from its creation actions).
    fn create_operation(&self, actions: &[Action]) -> Result<DeltaOperation> {
        let (protocol, metadata) = match actions {
            [Action::Protocol(p), Action::Metadata(m), ..] => (p.clone(), m.clone()),
            _ => anyhow::bail!("a table's creation starts with its protocol and metadata"),
        };
        Ok(DeltaOperation::Create {
            mode: SaveMode::ErrorIfExists,
            location: self.table.log_store().root_url().clone(),
            protocol,
            metadata,
        })
    }

    /// The metadata action that grows the table's schema to `schema`, if it adds fields.
    fn schema_change(&self, schema: &SchemaRef) -> Result<Option<Action>> {
        let state = self.table.snapshot()?;
        let current = state.snapshot().arrow_schema();
        if !adds_fields(current.fields(), schema.fields()) {
            return Ok(None);
        }
        let grown: StructType = union_schema(&current, schema)?.as_ref().try_into_kernel()?;
        Ok(Some(Action::Metadata(
            state.metadata().clone().with_schema(&grown)?,
        )))
    }

    /// Commits `actions` as the version after the snapshot the table holds, then moves the
    /// table to it; fails with a [`commit::Conflict`] if another writer took that version.
    async fn commit(
        &mut self,
        meta: CommitMeta,
        actions: Vec<Action>,
        operation: DeltaOperation,
    ) -> Result<()> {
        let version = self.table.version().map_or(0, |v| v + 1);
        let log_store = self.table.log_store();
        let mut meta = meta;
        meta.info
            .insert(RUN_MARKER.into(), self.settings.run_marker.clone().into());
        commit::write(&log_store, version, actions, operation, meta).await?;
        self.table
            .update_incremental(Some(version))
            .await
            .with_context(|| format!("reading {} after its commit", self.spec.name))?;
        Ok(())
    }

    /// Conforms the batch to the table; None when there is nothing to apply. A batch routed
    /// to a MERGE is appended when the table does not exist (an earlier append failed).
    fn prepare(
        &mut self,
        batch: RecordBatch,
        groups: &[String],
        route: Route,
    ) -> Result<Option<(RecordBatch, Route)>> {
        if batch.num_rows() == 0 && groups.is_empty() && self.exists() {
            return Ok(None);
        }
        let schema = match self.exists() {
            true => union_schema(
                &self.table.snapshot()?.snapshot().arrow_schema(),
                &batch.schema(),
            )?,
            false => batch.schema(),
        };
        let batch = conform_batch(&batch, &schema)?;
        let route = if self.exists() { route } else { Route::Append };
        Ok(Some((batch, route)))
    }

    /// Appends a batch held in memory: encoded as one data file, then committed as the files
    /// of a worker are.
    async fn append(&mut self, batch: RecordBatch) -> Result<()> {
        let files = self.files(tokio::runtime::Handle::current());
        let schema = batch.schema();
        let mut writer = files.writer(&schema);
        let wrote = async {
            for start in (0..batch.num_rows()).step_by(crate::output::ENCODE_SLICE_ROWS) {
                let len = crate::output::ENCODE_SLICE_ROWS.min(batch.num_rows() - start);
                writer.write(&batch.slice(start, len)).await?;
            }
            anyhow::Ok(())
        }
        .await;
        let mut adds = Vec::new();
        file_merge::close_writer(Some(writer), wrote, "writing a data file", &mut adds).await?;
        let written = WrittenFiles {
            adds,
            schema,
            keys: Vec::new(),
            unfit: Vec::new(),
            tags: Vec::new(),
        };
        self.record_files(written)
            .await
            .with_context(|| format!("appending to {}", self.spec.name))
    }

    /// Merges batches held in memory: file by file where it can, otherwise by delta-rs as a
    /// hash join and, if that does not fit the memory pool, again as a sort-merge join, which
    /// can spill. A failed attempt has committed nothing.
    async fn merge_batches(&mut self, batches: Vec<RecordBatch>, groups: &[String]) -> Result<()> {
        let schema = batches.first().context("a MERGE has a batch")?.schema();
        if self.merges_by_file()? {
            let source = MergeSource::in_memory(&schema, batches);
            return self.merge_by_file(source, groups, None).await;
        }
        let out_of_memory = |e: &anyhow::Error| {
            let text = format!("{e:#}");
            text.contains("Resources exhausted") || text.contains("Not enough memory")
        };
        match self.merge(batches.clone(), groups, true).await {
            Err(e) if out_of_memory(&e) => self
                .merge(batches, groups, false)
                .await
                .map_err(|e2| e2.context(format!("as a hash join: {e:#}"))),
            result => result,
        }
    }

    /// One MERGE of `source` (disjoint keys), file by file ([`file_merge`]); commits only if
    /// a row changed or the schema grew. A MERGE that loses its race to another writer is
    /// merged again into the table that writer left, a few times at most.
    /// A MERGE file by file, with the row journal of `tags` (the merged rows') when given.
    async fn merge_by_file(
        &mut self,
        source: MergeSource,
        groups: &[String],
        tags: Option<Vec<RowTag>>,
    ) -> Result<()> {
        let mut meta = self.data_commit();
        if let Some(tags) = tags
            && let Some(journal) = self.write_journal(tags).await?
        {
            meta.info.insert(JOURNAL_FIELD.into(), journal.into());
        }
        let mut attempt = 1;
        loop {
            match self
                .try_merge_by_file(source.again(), groups, meta.clone())
                .await
            {
                Err(e) if is_conflict(&e) && attempt < COMMIT_ATTEMPTS => self.reload().await?,
                other => return other,
            }
            attempt += 1;
        }
    }

    async fn try_merge_by_file(
        &mut self,
        source: MergeSource,
        groups: &[String],
        meta: CommitMeta,
    ) -> Result<()> {
        let schema = source.schema().clone();
        let files = self.files(tokio::runtime::Handle::current());
        let rules = MergeRules {
            spec: &self.spec,
            groups,
        };
        let outcome = file_merge::merge_by_file(&self.table, &files, rules, source)
            .await
            .with_context(|| format!("merging into {}", self.spec.name))?;
        let mut actions: Vec<Action> = self.schema_change(&schema)?.into_iter().collect();
        if actions.is_empty() && outcome.actions.is_empty() {
            // Nothing to commit: the table's rows are already what the merged rows' lines
            // make, which the index may learn from the MERGE's journal all the same.
            if let Some(journal) = meta.info.get(JOURNAL_FIELD).and_then(|j| j.as_str()) {
                self.confirmed.push((self.version(), journal.to_string()));
            }
            return Ok(());
        }
        let added = adds_of(&outcome.actions);
        actions.extend(outcome.actions);
        let operation = self.merge_operation(groups);
        let committed = self.commit(meta, actions, operation).await;
        if committed.is_err() {
            files.remove(&added).await;
        }
        committed.with_context(|| format!("committing a MERGE into {}", self.spec.name))
    }

    /// How the log describes a MERGE (as delta-rs's MERGE would have).
    fn merge_operation(&self, groups: &[String]) -> DeltaOperation {
        let predicate = self
            .spec
            .uniqueness
            .iter()
            .map(|f| format!("target.{f} = source.{f}"))
            .collect::<Vec<_>>()
            .join(" AND ");
        let clause = |action: &str| MergePredicate {
            action_type: action.to_string(),
            predicate: None,
        };
        let matched = match self.spec.update_existing {
            true => vec![clause("update")],
            false => vec![],
        };
        let by_source = match (&self.spec.group_field, groups.is_empty()) {
            (Some(field), false) => vec![MergePredicate {
                action_type: "delete".to_string(),
                predicate: Some(format!("target.{field} IN ({} groups)", groups.len())),
            }],
            _ => vec![],
        };
        DeltaOperation::Merge {
            predicate: None,
            merge_predicate: Some(predicate),
            matched_predicates: matched,
            not_matched_predicates: vec![clause("insert")],
            not_matched_by_source_predicates: by_source,
        }
    }

    /// One MERGE of `batches` (one schema, disjoint keys), by delta-rs.
    async fn merge(
        &mut self,
        batches: Vec<RecordBatch>,
        groups: &[String],
        hash_join: bool,
    ) -> Result<()> {
        self.commits += 1;
        let props = self
            .marked_commit()
            .with_application_transaction(Transaction::new(&self.settings.run_id, self.commits));
        let state = self.session(hash_join);
        let schema = batches.first().context("a MERGE has a batch")?.schema();
        let fields: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
        // Updating a row with an identical one changes nothing but still rewrites its file, so
        // only rows that differ count as updates: a re-run of an unchanged export rewrites no
        // files at all. (Not when this batch evolves the schema: old and new column types
        // cannot be compared, and the rows differ anyway.)
        let evolving = self.table.snapshot()?.snapshot().arrow_schema().fields() != schema.fields();
        let differs = fields
            .iter()
            .map(|f| {
                binary_expr(
                    qualified("target", f),
                    Operator::IsNotDistinctFrom,
                    qualified("source", f),
                )
            })
            .reduce(Expr::and)
            .filter(|_| !evolving)
            .map(|same| !same);
        let guard = match (last_updated_guard(&schema), differs) {
            (Some(g), Some(d)) => Some(g.and(d)),
            (g, d) => g.or(d),
        };
        // Small source batches let a sort spill run by run.
        let slices: Vec<RecordBatch> = batches
            .iter()
            .flat_map(|batch| {
                (0..batch.num_rows())
                    .step_by(SOURCE_SLICE_ROWS)
                    .map(|start| {
                        batch.slice(start, SOURCE_SLICE_ROWS.min(batch.num_rows() - start))
                    })
            })
            .collect();
        let source = SessionContext::new_with_state(state.clone()).read_batches(slices)?;
        let predicate = self
            .spec
            .uniqueness
            .iter()
            .map(|f| qualified("target", f).eq(qualified("source", f)))
            .reduce(Expr::and)
            .expect("a table has uniqueness fields");
        let mut builder = self
            .table
            .clone()
            .merge(source, predicate)
            .with_source_alias("source")
            .with_target_alias("target")
            .with_merge_schema(true)
            .with_session_state(Arc::new(state))
            .with_commit_properties(props);
        if self.spec.update_existing {
            builder = builder.when_matched_update(|update| {
                let update = match guard {
                    Some(guard) => update.predicate(guard),
                    None => update,
                };
                fields.iter().fold(update, |u, f| {
                    u.update(Column::new_unqualified(f), qualified("source", f))
                })
            })?;
        }
        builder = builder.when_not_matched_insert(|insert| {
            fields.iter().fold(insert, |i, f| {
                i.set(Column::new_unqualified(f), qualified("source", f))
            })
        })?;
        if let Some(group_field) = &self.spec.group_field
            && !groups.is_empty()
        {
            let touched = qualified("target", group_field)
                .in_list(groups.iter().map(|g| lit(g.as_str())).collect(), false);
            builder = builder.when_not_matched_by_source_delete(|d| d.predicate(touched))?;
        }
        let (table, _metrics) = builder
            .await
            .with_context(|| format!("merging into {}", self.spec.name))?;
        self.table = table;
        Ok(())
    }

    /// Deletes rows by id (the export's deleted resources), in chunks: file by file where the
    /// table allows, with delta-rs's DELETE where it does not.
    pub async fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.flush_staged().await;
        if !self.exists() || ids.is_empty() {
            return Ok(());
        }
        self.ledger.lock().unwrap().stop_appending();
        let heavy = self.settings.heavy.clone();
        let _turn = heavy.acquire().await?;
        for chunk in ids.chunks(DELETE_CHUNK) {
            if self.merges_by_file()? {
                self.delete_by_file(chunk).await?;
                continue;
            }
            let predicate = Expr::Column(Column::new_unqualified("id"))
                .in_list(chunk.iter().map(|id| lit(id.as_str())).collect(), false);
            let (table, _metrics) = self
                .table
                .clone()
                .delete()
                .with_predicate(predicate)
                .with_session_state(Arc::new(self.session(true)))
                .with_commit_properties(self.marked_commit())
                .await
                .with_context(|| format!("deleting ids from {}", self.spec.name))?;
            self.table = table;
        }
        Ok(())
    }

    /// One DELETE of `ids`, file by file ([`file_merge::delete_by_file`]), again after a lost
    /// race to another writer.
    async fn delete_by_file(&mut self, ids: &[String]) -> Result<()> {
        let mut meta = self.data_commit();
        // The journal of a deletion: each key with the line that says it is gone.
        if let Some(keys) = self.settings.row_journal.as_ref().map(|j| j.keys.clone()) {
            let gone = crate::rerun::update::DELETED_LINE;
            let tags = ids
                .iter()
                .map(|id| crate::rerun::index::entry(keys.key(id), gone));
            if let Some(journal) = self.write_journal(tags.collect()).await? {
                meta.info.insert(JOURNAL_FIELD.into(), journal.into());
            }
        }
        let ids: std::collections::HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut attempt = 1;
        loop {
            let files = self.files(tokio::runtime::Handle::current());
            let outcome = file_merge::delete_by_file(&self.table, &files, "id", &ids)
                .await
                .with_context(|| format!("deleting ids from {}", self.spec.name))?;
            if outcome.actions.is_empty() {
                return Ok(());
            }
            let added = adds_of(&outcome.actions);
            let operation = DeltaOperation::Delete {
                predicate: Some(format!("id IN ({} ids)", ids.len())),
            };
            let committed = self.commit(meta.clone(), outcome.actions, operation).await;
            if committed.is_err() {
                files.remove(&added).await;
            }
            match committed {
                Err(e) if is_conflict(&e) && attempt < COMMIT_ATTEMPTS => self.reload().await?,
                other => {
                    return other
                        .with_context(|| format!("committing a DELETE from {}", self.spec.name));
                }
            }
            attempt += 1;
        }
    }

    /// Bin-packs the table's small files into files of the table's target size: file by file
    /// ([`compact`]) where the table allows, with delta-rs's OPTIMIZE where it does not.
    /// With `joins_only`, only a first load's pieces are joined, if they can be (cheap: no row
    /// is decoded); nothing else is compacted.
    async fn compact(&mut self, joins_only: bool) -> Result<()> {
        if joins_only && (self.clustering.is_empty() || self.table_features()?.is_some()) {
            return Ok(());
        }
        if self.table_features()?.is_some() {
            return self.compact_with_delta_rs().await;
        }
        // Two at a time, as MERGEs file by file, each holding one slice and one row group:
        // on 4 GB, 31.8 s and 371 MiB peak, against 35.9 s and 322 MiB one at a time.
        let merges = self.settings.merges.clone();
        let _turn = merges.acquire().await?;
        let target = self
            .table
            .snapshot()?
            .snapshot()
            .table_properties()
            .target_file_size()
            .get();
        let files = Arc::new(self.files(tokio::runtime::Handle::current()));
        let clustered = match self.clustering.is_empty() {
            true => None,
            false => {
                // Runs of a quarter of a MERGE's share (two compactions run at once): Arrow's
                // count of wide FHIR rows is about half their real size, and larger runs set
                // the run's peak (docs/performance.md).
                let memory = self.settings.merge_bytes / 4;
                let threads = self.settings.threads;
                let sorted = compact::cluster_by_file(
                    &self.table,
                    &files,
                    target,
                    &self.clustering,
                    compact::Sorting {
                        memory,
                        threads,
                        joins_only,
                    },
                )
                .await;
                match sorted {
                    Ok(clustered) => clustered,
                    // Clustering only orders the files; packing them still pays.
                    Err(e) => {
                        crate::say!(
                            "note: {} was compacted without clustering: {e:#}",
                            self.spec.name
                        );
                        None
                    }
                }
            }
        };
        let compaction = match clustered {
            Some(clustered) => clustered,
            None if joins_only => return Ok(()),
            None => compact::compact_by_file(&self.table, &files, target)
                .await
                .with_context(|| format!("compacting {}", self.spec.name))?,
        };
        if compaction.actions.is_empty() {
            return Ok(());
        }
        let added = adds_of(&compaction.actions);
        let operation = DeltaOperation::Optimize {
            predicate: None,
            target_size: i64::try_from(target).unwrap_or(i64::MAX),
        };
        // Counted as delta-rs's OPTIMIZE counts them, for `DESCRIBE HISTORY`.
        let metrics = serde_json::json!({
            "numFilesAdded": compaction.files_added,
            "numFilesRemoved": compaction.files_removed,
        });
        let meta = CommitMeta {
            txn: None,
            info: [("operationMetrics".to_string(), metrics)].into(),
        };
        let committed = self.commit(meta, compaction.actions, operation).await;
        if committed.is_err() {
            files.remove(&added).await;
        }
        match committed {
            // Compaction only tidies: another writer's commit makes it wait for the next run.
            Err(e) if is_conflict(&e) => {
                crate::say!(
                    "note: {} was not compacted: another writer committed to it meanwhile",
                    self.spec.name
                );
                self.reload().await
            }
            other => {
                other.with_context(|| format!("committing the compaction of {}", self.spec.name))
            }
        }
    }

    /// VACUUM: delta-rs plans which files to delete (a dry run, which writes nothing), and the
    /// deletion is logged as delta-rs and Spark log it, between `VACUUM START` and `VACUUM END`
    /// commits.
    async fn vacuum(&mut self) -> Result<()> {
        let (_, plan) = self
            .table
            .clone()
            .vacuum()
            .with_dry_run(true)
            .await
            .with_context(|| format!("planning the VACUUM of {}", self.spec.name))?;
        if plan.files_deleted.is_empty() {
            return Ok(());
        }
        let retention = self
            .table
            .snapshot()?
            .snapshot()
            .table_properties()
            .deleted_file_retention_duration();
        let start = DeltaOperation::VacuumStart {
            retention_check_enabled: true,
            specified_retention_millis: None,
            default_retention_millis: i64::try_from(retention.as_millis()).unwrap_or(i64::MAX),
        };
        let metrics = serde_json::json!({"numFilesToDelete": plan.files_deleted.len()});
        self.commit_alone(start, metrics).await?;
        let store = self.table.log_store().object_store(None);
        let mut deleted = 0;
        for file in &plan.files_deleted {
            match store.delete(&deltalake::Path::from(file.as_str())).await {
                Ok(()) | Err(deltalake::ObjectStoreError::NotFound { .. }) => deleted += 1,
                Err(e) => crate::say!("warning: VACUUM could not delete {file}: {e}"),
            }
        }
        let end = DeltaOperation::VacuumEnd {
            status: "COMPLETED".to_string(),
        };
        let metrics = serde_json::json!({"numDeletedFiles": deleted, "numVacuumedDirectories": 0});
        self.commit_alone(end, metrics).await
    }

    /// A commit of no actions (it only logs `operation`), at the next free version.
    async fn commit_alone(
        &mut self,
        operation: DeltaOperation,
        metrics: serde_json::Value,
    ) -> Result<()> {
        let meta = CommitMeta {
            txn: None,
            info: [("operationMetrics".to_string(), metrics)].into(),
        };
        for _ in 0..COMMIT_ATTEMPTS {
            match self
                .commit(meta.clone(), Vec::new(), operation.clone())
                .await
            {
                Err(e) if is_conflict(&e) => self.reload().await?,
                other => return other,
            }
        }
        anyhow::bail!("other writers kept committing to {}", self.spec.name)
    }

    /// delta-rs's OPTIMIZE, for tables that cannot be read file by file.
    async fn compact_with_delta_rs(&mut self) -> Result<()> {
        // One table at a time: compactions in parallel set the run's peak RSS at small
        // budgets (up to 424 MiB at `--memory 256MiB` on 1 GB).
        let heavy = self.settings.heavy.clone();
        let _turn = heavy.acquire().await?;
        let (table, _metrics) = self
            .table
            .clone()
            .optimize()
            .with_type(OptimizeType::Compact)
            // The data files' settings: Snappy, so compaction costs no more than writing, and
            // bounded row groups, since a writer holds its open row group (with the default
            // million rows, a 4 GB first load peaked at 609 MiB compacting).
            .with_writer_properties(crate::output::parquet::writer_properties())
            .with_session_state(Arc::new(self.session(true)))
            .with_commit_properties(self.marked_commit())
            .await
            .with_context(|| format!("compacting {}", self.spec.name))?;
        self.table = table;
        Ok(())
    }

    /// The table's data files, the parts of one batch counted once
    /// ([`files::BATCH_TAG`](super::files::BATCH_TAG)).
    fn batch_files(&self) -> Result<BatchFiles> {
        let mut batches = std::collections::HashSet::new();
        let mut pieces = 0;
        for file in self.table.snapshot()?.log_data().iter() {
            // Deprecated in delta-rs, but the only way it shows a file's tags.
            #[allow(deprecated)]
            let tags = file.add_action().tags;
            pieces += usize::from(super::range_pieces::piece_of(tags.as_ref()).is_some());
            let batch = tags.and_then(|mut t| t.remove(super::files::BATCH_TAG).flatten());
            batches.insert(batch.unwrap_or_else(|| file.path().to_string()));
        }
        Ok(BatchFiles {
            batches: batches.len(),
            pieces,
        })
    }

    /// End-of-run maintenance: compaction and VACUUM (when `optimize` and the table has at
    /// least `COMPACTION_MIN_FILES` files), then a checkpoint and the symlink manifest Athena
    /// reads, so both describe the final files.
    pub async fn maintain(&mut self, optimize: bool) -> Result<()> {
        self.flush_staged().await;
        if !self.exists() {
            return Ok(());
        }
        if optimize {
            let files = self.batch_files()?;
            if files.batches >= COMPACTION_MIN_FILES {
                self.compact(false).await?;
            } else if files.pieces > 1 {
                // Fewer batches than are worth compacting, but their pieces join at little cost.
                self.compact(true).await?;
            }
            self.vacuum()
                .await
                .with_context(|| format!("vacuuming {}", self.spec.name))?;
        }
        deltalake::checkpoints::create_checkpoint(&self.table, None)
            .await
            .with_context(|| format!("checkpointing {}", self.spec.name))?;
        let state = self.table.snapshot()?;
        if state
            .log_data()
            .iter()
            .any(|file| file.deletion_vector_descriptor().is_some())
        {
            crate::say!(
                "note: {} has files with deletion vectors (written by Spark): the symlink manifest \
                 lists those files whole, so a reader of the manifest sees their deleted rows; \
                 Athena's Delta Lake tables and Spark do not",
                self.spec.name
            );
        }
        self.table = self
            .table
            .clone()
            .generate()
            .await
            .with_context(|| format!("writing the symlink manifest of {}", self.spec.name))?;
        Ok(())
    }
}

/// How many batches a table's files hold (the files of one batch's parts count once), and how
/// many of its files are pieces of a first load's cut (`range_pieces`).
struct BatchFiles {
    batches: usize,
    pieces: usize,
}

/// The Delta table `name` under `root`, loaded if it exists. A table on S3 goes through the
/// location's own store (its credentials, endpoint and SSE-KMS key) on the store's I/O
/// runtime, with the log store that commits by conditional put ([`super::s3_log`]).
async fn open_table(root: &ObjectLocation, name: &str) -> Result<DeltaTable> {
    let (url, store) = root.table(name)?;
    let mut builder = DeltaTableBuilder::from_url(url.clone())?;
    if let Some(store) = store {
        super::s3_log::register();
        let io = IORuntime::RT(crate::store::objects::io_handle());
        let store = Arc::new(DeltaIOStorageBackend::new(store, io));
        builder = builder.with_storage_backend(store, url);
    }
    let mut table = builder.build()?;
    match table.load().await {
        Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(table),
        Err(e) => Err(e.into()),
    }
}

/// The files a commit's actions add (to remove them again if the commit fails).
fn adds_of(actions: &[Action]) -> Vec<deltalake::kernel::Add> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Add(add) => Some(add.clone()),
            _ => None,
        })
        .collect()
}

/// `target.<name>` or `source.<name>`, case kept.
fn qualified(relation: &str, name: &str) -> Expr {
    Expr::Column(Column::new(Some(relation), name))
}

/// Cumulus ETL's rule: update unless the stored `meta.lastUpdated` is newer than the incoming
/// one; rows missing either timestamp are updated. None when the schema has no such field.
fn last_updated_guard(schema: &arrow::datatypes::Schema) -> Option<Expr> {
    let (_, meta) = schema.column_with_name("meta")?;
    let DataType::Struct(children) = meta.data_type() else {
        return None;
    };
    children.find("lastUpdated")?;
    let timestamp = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let stored = get_field(qualified("target", "meta"), "lastUpdated");
    let incoming = get_field(qualified("source", "meta"), "lastUpdated");
    Some(
        stored
            .clone()
            .is_null()
            .or(incoming.clone().is_null())
            .or(cast(stored, timestamp.clone()).lt_eq(cast(incoming, timestamp))),
    )
}

/// The table's statistics settings, widened so that data files get statistics for the
/// clustering columns (PROTOCOL.md requires them): a clustering column outside the first
/// `num_indexed_cols` leaf columns makes the statistics columns explicit (those leaves and the
/// clustering columns). Explicit settings of the table are kept as they are.
fn with_stats_for(
    config: WriterStatsConfig,
    schema: &arrow::datatypes::Schema,
    clustering: &[String],
) -> WriterStatsConfig {
    if clustering.is_empty() || config.stats_columns.is_some() {
        return config;
    }
    let leaves = leaf_paths(schema.fields(), "");
    let indexed = match config.num_indexed_cols {
        DataSkippingNumIndexedCols::NumColumns(n) => {
            leaves.len().min(usize::try_from(n).unwrap_or(usize::MAX))
        }
        DataSkippingNumIndexedCols::AllColumns => leaves.len(),
    };
    if clustering.iter().all(|c| leaves[..indexed].contains(c)) {
        return config;
    }
    let mut columns: Vec<String> = leaves[..indexed].to_vec();
    columns.extend(
        clustering
            .iter()
            .filter(|c| !columns.contains(c))
            .cloned()
            .collect::<Vec<_>>(),
    );
    WriterStatsConfig::new(config.num_indexed_cols, Some(columns))
}

/// The leaf columns of `fields` in schema order, as dotted paths (what Delta counts for
/// `delta.dataSkippingNumIndexedCols`).
fn leaf_paths(fields: &arrow::datatypes::Fields, prefix: &str) -> Vec<String> {
    let mut paths = Vec::new();
    for field in fields {
        let path = format!("{prefix}{}", field.name());
        match field.data_type() {
            DataType::Struct(children) => paths.extend(leaf_paths(children, &format!("{path}."))),
            _ => paths.push(path),
        }
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::{Field, Fields, Schema};

    fn schema(leaves_before_id: usize) -> Schema {
        let nested: Fields = (0..leaves_before_id)
            .map(|i| Field::new(format!("f{i}"), DataType::Utf8, true))
            .collect();
        Schema::new(vec![
            Field::new("meta", DataType::Struct(nested), true),
            Field::new("id", DataType::Utf8, true),
        ])
    }

    #[test]
    fn clustering_columns_past_the_indexed_leaves_get_statistics_too() {
        let config = || WriterStatsConfig::new(DataSkippingNumIndexedCols::NumColumns(32), None);
        let clustering = ["id".to_string()];
        // `id` is the 4th leaf: the table's settings already cover it.
        let kept = with_stats_for(config(), &schema(3), &clustering);
        assert_eq!(kept.stats_columns, None);
        // `id` is the 41st leaf: the first 32 leaves and `id` get statistics.
        let widened = with_stats_for(config(), &schema(40), &clustering);
        let columns = widened.stats_columns.unwrap();
        assert_eq!(columns.len(), 33);
        assert_eq!(columns[0], "meta.f0");
        assert_eq!(columns[32], "id");
        // Not clustered: left alone.
        let plain = with_stats_for(config(), &schema(40), &[]);
        assert_eq!(plain.stats_columns, None);
    }
}
