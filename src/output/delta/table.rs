//! One Cumulus table in Delta Lake and the operations Cumulus ETL performs on it: upsert on the
//! uniqueness fields with the `meta.lastUpdated` guard, the group-field delete, deletions by id,
//! and end-of-run maintenance. Every data commit carries a (run, sequence) transaction so a
//! retried commit is recognised instead of applied twice.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use arrow::array::{Array, StringArray};
use arrow::datatypes::{DataType, TimeUnit};
use arrow::record_batch::RecordBatch;
use deltalake::DeltaTable;
use deltalake::datafusion::common::Column;
use deltalake::datafusion::execution::context::SessionContext;
use deltalake::datafusion::execution::context::SessionState;
use deltalake::datafusion::execution::runtime_env::RuntimeEnv;
use deltalake::datafusion::functions::core::expr_fn::get_field;
use deltalake::datafusion::logical_expr::{Expr, Operator, binary_expr, cast, lit};
use deltalake::delta_datafusion::{DeltaRuntimeEnvBuilder, DeltaSessionContext};
use deltalake::kernel::Transaction;
use deltalake::kernel::transaction::CommitProperties;
use deltalake::operations::optimize::OptimizeType;
use deltalake::operations::write::SchemaMode;
use deltalake::parquet::basic::Compression;
use deltalake::parquet::file::properties::WriterProperties;
use deltalake::protocol::SaveMode;
use url::Url;

use super::conform::{conform_batch, union_schema};
use super::stage::{MergeStage, json_lines};
use crate::output::{OnWritten, TableKind};

/// Compaction rewrites the whole table, so it waits until a table has this many files: a
/// handful of batch-sized files reads as fast as one, and a first load of a large export
/// should not pay for writing its data twice.
pub const COMPACTION_MIN_FILES: usize = 8;

/// Rows per record batch of a MERGE source.
const SOURCE_SLICE_ROWS: usize = 8192;

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
        let (uniqueness, update_existing): (&[&str], bool) = match kind {
            TableKind::Fhir(_) | TableKind::NlpSymptoms { .. } => (&["id"], true),
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

/// Settings shared by all Delta tables of a run.
#[derive(Clone)]
pub struct DeltaSettings {
    /// Identifies this run in the tables' transaction log (`txn.appId`).
    pub run_id: String,
    /// One DataFusion memory pool for every table's MERGE, DELETE and OPTIMIZE, so the total
    /// stays bounded however many tables commit at once.
    runtime: Arc<RuntimeEnv>,
    /// One MERGE, DELETE or compaction at a time: they share the pool, and two joins that each
    /// need most of it would both fail.
    heavy: Arc<tokio::sync::Semaphore>,
    /// Staged MERGE rows of a table are merged once they reach this many rows (`--batch-size`)...
    merge_rows: usize,
    /// ...or this many bytes of Arrow data, a quarter of the pool the MERGE joins in.
    merge_bytes: usize,
}

impl DeltaSettings {
    /// Settings for a run under the global `--memory` budget: DataFusion gets half of it, but
    /// at least an eighth of the machine's memory (64 MiB to 2 GiB). A MERGE into an existing
    /// table builds its join over the whole table, so its memory grows with the table, not
    /// with the batch; a pool sized from a small streaming budget failed the MERGE batches of
    /// a re-run (100,000-row tables at 256 MiB). `run` names the run in the transaction log.
    pub fn for_budget(budget: u64, run: &str) -> DeltaSettings {
        let floor = (crate::engine::budget::physical_memory() / 8).clamp(64 << 20, 2 << 30);
        DeltaSettings::new(
            (budget / 2).max(floor) as usize,
            format!("cumulus-etl/{run}"),
        )
    }

    /// Settings whose DataFusion operations share `memory_limit` bytes (spilling beyond).
    pub fn new(memory_limit: usize, run_id: impl Into<String>) -> DeltaSettings {
        DeltaSettings {
            run_id: run_id.into(),
            runtime: DeltaRuntimeEnvBuilder::new()
                .with_max_spill_size(memory_limit)
                .build(),
            heavy: Arc::new(tokio::sync::Semaphore::new(1)),
            merge_rows: DEFAULT_MERGE_ROWS,
            merge_bytes: memory_limit / 4,
        }
    }

    /// Merges staged batches once they reach `rows` rows (the run's `--batch-size`, so a
    /// re-run makes as many MERGEs as Cumulus ETL, whatever `--memory` is).
    pub fn with_merge_rows(mut self, rows: usize) -> DeltaSettings {
        self.merge_rows = rows.max(1);
        self
    }
}

/// A table being written by this run.
pub struct CumulusTable {
    spec: TableSpec,
    table: DeltaTable,
    settings: Arc<DeltaSettings>,
    /// True while the table holds only rows this run appended, so new keys can be appended
    /// instead of merged.
    append_only: bool,
    /// Fingerprints of the keys (and groups) this run has written.
    written_keys: HashSet<u64>,
    /// Data commits made by this run (the transaction version of the next is this plus one).
    commits: i64,
    /// Batches waiting to be merged together.
    stage: MergeStage,
}

impl CumulusTable {
    /// Opens the table under `root`, which need not exist yet.
    pub async fn open(root: &Path, spec: TableSpec, settings: Arc<DeltaSettings>) -> Result<Self> {
        let dir = root.join(&spec.name);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let url = Url::from_directory_path(&dir)
            .map_err(|_| anyhow!("{} is not a usable table path", dir.display()))?;
        let table = DeltaTable::try_from_url(url)
            .await
            .with_context(|| format!("opening the Delta table {}", dir.display()))?;
        let append_only = match table.version() {
            None => true,
            Some(_) => table.get_file_uris()?.next().is_none(),
        };
        Ok(CumulusTable {
            spec,
            table,
            settings,
            append_only,
            written_keys: HashSet::new(),
            commits: 0,
            stage: MergeStage::default(),
        })
    }

    fn exists(&self) -> bool {
        self.table.version().is_some()
    }

    /// A DataFusion session on the shared memory pool. Hash joins are fastest but cannot
    /// spill; `hash_join = false` plans sort-merge joins, which can.
    fn session(&self, hash_join: bool) -> SessionState {
        let mut state =
            DeltaSessionContext::with_runtime_env(self.settings.runtime.clone()).state();
        state.config_mut().options_mut().optimizer.prefer_hash_join = hash_join;
        state
    }

    fn commit_properties(&mut self) -> CommitProperties {
        self.commits += 1;
        CommitProperties::default()
            .with_application_transaction(Transaction::new(&self.settings.run_id, self.commits))
    }

    /// Upserts a batch: inserts new keys; replaces stored rows unless theirs is newer
    /// (`meta.lastUpdated`); deletes stored rows of `groups` the batch no longer has. An empty
    /// batch only creates the table (with its schema) when it does not exist yet. Applied at
    /// once (after anything staged).
    pub async fn upsert(&mut self, batch: RecordBatch, groups: &[String]) -> Result<()> {
        self.flush_staged().await;
        match self.prepare(batch, groups)? {
            Prepared::Nothing => Ok(()),
            Prepared::Append(batch, keys) => self.append_keyed(batch, keys).await,
            Prepared::Merge(batch, keys) => {
                let heavy = self.settings.heavy.clone();
                let _turn = heavy.acquire().await?;
                self.merge_within_memory(vec![batch], groups).await?;
                self.append_only = false;
                self.written_keys.extend(keys);
                Ok(())
            }
        }
    }

    /// Like [`Self::upsert`], but a batch that needs a MERGE is staged on local disk (and
    /// `report` told so, which frees the caller's memory) to be merged together with the
    /// batches that follow; `report` hears the outcome once it is committed.
    pub async fn submit(&mut self, batch: RecordBatch, groups: Vec<String>, report: OnWritten) {
        let prepared = match self.prepare(batch, &groups) {
            Ok(p) => p,
            Err(e) => return report.done(Err(e)),
        };
        match prepared {
            Prepared::Nothing => report.done(Ok(())),
            Prepared::Append(batch, keys) => report.done(self.append_keyed(batch, keys).await),
            Prepared::Merge(batch, keys) => {
                if self.stage.overlaps(&keys) || !self.stage.fits(&batch.schema()) {
                    self.flush_staged().await;
                }
                match self.stage.push(&batch, &keys, &groups, report) {
                    Ok(()) => {
                        self.append_only = false;
                        self.written_keys.extend(keys);
                    }
                    Err((e, report)) => {
                        eprintln!(
                            "warning: could not stage a batch of {} ({e:#}); merging it alone",
                            self.spec.name
                        );
                        self.flush_staged().await;
                        return report.done(self.upsert(batch, &groups).await);
                    }
                }
                if self
                    .stage
                    .is_full(self.settings.merge_rows, self.settings.merge_bytes)
                {
                    self.flush_staged().await;
                }
            }
        }
    }

    /// Merges everything staged as one MERGE and reports each staged batch's outcome; a
    /// failed batch's rows go back with the error, for the errors folder.
    pub async fn flush_staged(&mut self) {
        if self.stage.is_empty() {
            return;
        }
        let staged = self.stage.take();
        if staged.batches.is_empty() {
            return;
        }
        let (batches, reports): (Vec<RecordBatch>, Vec<OnWritten>) =
            staged.batches.into_iter().unzip();
        let result = self
            .merge_staged(&batches, staged.schema, &staged.groups)
            .await;
        for (batch, report) in batches.iter().zip(reports) {
            match &result {
                Ok(()) => report.done(Ok(())),
                Err(e) => report.failed_with_rows(anyhow!("{e:#}"), json_lines(batch)),
            }
        }
    }

    async fn merge_staged(
        &mut self,
        batches: &[RecordBatch],
        staged_schema: Option<arrow::datatypes::SchemaRef>,
        groups: &[String],
    ) -> Result<()> {
        let mut schema = self.table.snapshot()?.snapshot().arrow_schema();
        if let Some(staged) = staged_schema {
            schema = union_schema(&schema, &staged)?;
        }
        let batches = batches
            .iter()
            .map(|batch| conform_batch(batch, &schema))
            .collect::<Result<Vec<_>>>()?;
        let heavy = self.settings.heavy.clone();
        let _turn = heavy.acquire().await?;
        self.merge_within_memory(batches, groups).await
    }

    /// Conforms the batch to the table and decides how it is applied.
    fn prepare(&mut self, batch: RecordBatch, groups: &[String]) -> Result<Prepared> {
        if batch.num_rows() == 0 && groups.is_empty() && self.exists() {
            return Ok(Prepared::Nothing);
        }
        let schema = match self.exists() {
            true => union_schema(
                &self.table.snapshot()?.snapshot().arrow_schema(),
                &batch.schema(),
            )?,
            false => batch.schema(),
        };
        let batch = conform_batch(&batch, &schema)?;
        let keys = self.key_fingerprints(&batch, groups)?;
        let fresh = self.append_only && keys.iter().all(|k| !self.written_keys.contains(k));
        Ok(match !self.exists() || fresh {
            true => Prepared::Append(batch, keys),
            false => Prepared::Merge(batch, keys),
        })
    }

    async fn append_keyed(&mut self, batch: RecordBatch, keys: Vec<u64>) -> Result<()> {
        self.append(batch).await?;
        self.written_keys.extend(keys);
        Ok(())
    }

    async fn append(&mut self, batch: RecordBatch) -> Result<()> {
        let props = self.commit_properties();
        let table = self
            .table
            .clone()
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_schema_mode(SchemaMode::Merge)
            .with_write_batch_size(crate::output::ENCODE_SLICE_ROWS)
            .with_table_name(&self.spec.name)
            .with_commit_properties(props)
            .await
            .with_context(|| format!("appending to {}", self.spec.name))?;
        self.table = table;
        Ok(())
    }

    /// MERGE as a hash join; if that does not fit the memory pool, again as a sort-merge join,
    /// which can spill. A failed attempt has committed nothing.
    async fn merge_within_memory(
        &mut self,
        batches: Vec<RecordBatch>,
        groups: &[String],
    ) -> Result<()> {
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

    /// One MERGE of `batches` (one schema, disjoint keys).
    async fn merge(
        &mut self,
        batches: Vec<RecordBatch>,
        groups: &[String],
        hash_join: bool,
    ) -> Result<()> {
        let props = self.commit_properties();
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

    /// Deletes rows by id (the export's deleted resources), in chunks.
    pub async fn delete_ids(&mut self, ids: &[String]) -> Result<()> {
        self.flush_staged().await;
        if !self.exists() || ids.is_empty() {
            return Ok(());
        }
        let heavy = self.settings.heavy.clone();
        let _turn = heavy.acquire().await?;
        for chunk in ids.chunks(DELETE_CHUNK) {
            let predicate = Expr::Column(Column::new_unqualified("id"))
                .in_list(chunk.iter().map(|id| lit(id.as_str())).collect(), false);
            let (table, _metrics) = self
                .table
                .clone()
                .delete()
                .with_predicate(predicate)
                .with_session_state(Arc::new(self.session(true)))
                .await
                .with_context(|| format!("deleting ids from {}", self.spec.name))?;
            self.table = table;
        }
        self.append_only = false;
        Ok(())
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
            if self.table.get_file_uris()?.count() >= COMPACTION_MIN_FILES {
                // One table at a time: compactions in parallel set the run's peak RSS at small
                // budgets (up to 424 MiB at `--memory 256MiB` on 1 GB).
                let heavy = self.settings.heavy.clone();
                let _turn = heavy.acquire().await?;
                let (table, _metrics) = self
                    .table
                    .clone()
                    .optimize()
                    .with_type(OptimizeType::Compact)
                    // Snappy like the data files: compaction should not cost more than writing.
                    .with_writer_properties(
                        WriterProperties::builder()
                            .set_compression(Compression::SNAPPY)
                            .build(),
                    )
                    .with_session_state(Arc::new(self.session(true)))
                    .await
                    .with_context(|| format!("compacting {}", self.spec.name))?;
                self.table = table;
            }
            let (table, _metrics) = self
                .table
                .clone()
                .vacuum()
                .await
                .with_context(|| format!("vacuuming {}", self.spec.name))?;
            self.table = table;
        }
        deltalake::checkpoints::create_checkpoint(&self.table, None)
            .await
            .with_context(|| format!("checkpointing {}", self.spec.name))?;
        self.table = self
            .table
            .clone()
            .generate()
            .await
            .with_context(|| format!("writing the symlink manifest of {}", self.spec.name))?;
        Ok(())
    }

    /// Fingerprints of the batch's keys and of the groups it touches.
    fn key_fingerprints(&self, batch: &RecordBatch, groups: &[String]) -> Result<Vec<u64>> {
        let columns = self
            .spec
            .uniqueness
            .iter()
            .map(|name| {
                let column = batch
                    .column_by_name(name)
                    .ok_or_else(|| anyhow!("the batch has no '{name}' column"))?;
                arrow::compute::cast(column, &DataType::Utf8)
                    .map_err(|e| anyhow!("'{name}' is not a usable key: {e}"))
            })
            .collect::<Result<Vec<_>>>()?;
        let columns: Vec<&StringArray> = columns
            .iter()
            .map(|c| c.as_any().downcast_ref::<StringArray>().expect("utf8"))
            .collect();
        let mut keys: Vec<u64> = (0..batch.num_rows())
            .map(|row| {
                let mut hasher = std::hash::DefaultHasher::new();
                for column in &columns {
                    column.is_valid(row).hash(&mut hasher);
                    column.value(row).hash(&mut hasher);
                }
                hasher.finish()
            })
            .collect();
        keys.extend(groups.iter().map(|g| {
            let mut hasher = std::hash::DefaultHasher::new();
            ("group", g).hash(&mut hasher);
            hasher.finish()
        }));
        Ok(keys)
    }
}

/// How a batch reaches the table.
enum Prepared {
    /// An empty batch for a table that exists.
    Nothing,
    /// New keys only, on a table with nothing but this run's appends.
    Append(RecordBatch, Vec<u64>),
    /// Everything else.
    Merge(RecordBatch, Vec<u64>),
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
