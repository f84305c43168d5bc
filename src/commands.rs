//! The table-management subcommands of Cumulus ETL: `init` (empty tables for every default task)
//! and `convert` (an NDJSON output folder into Delta tables).

use anyhow::{Context, Result, anyhow};

use crate::exit::{ExitCode, Fatal, one_line};
use crate::fhir::Shape;
use crate::json::Tape;
use crate::output::delta::DeltaSettings;
use crate::output::job::latest_codebook_id;
use crate::output::{OutputFormat, Outputs, RowBatch, TableKind, write_and_wait};
use crate::store::ObjectLocation;
use crate::tasks::{self, COMPLETION_ENCOUNTERS_TABLE, COMPLETION_TABLE};

/// The kind of a known output table, or None for tables this tool does not produce.
pub fn table_kind(table: &str) -> Option<TableKind> {
    match table {
        COMPLETION_TABLE => Some(TableKind::Completion),
        COMPLETION_ENCOUNTERS_TABLE => Some(TableKind::CompletionEncounters),
        _ => tasks::all_tasks()
            .into_iter()
            .find(|t| t.name == table)
            .map(|t| TableKind::Fhir(t.resource)),
    }
}

/// `init OUTPUT`: creates every default task's tables (and the completion table) empty, with
/// their schemas, plus an empty `JobConfig/` folder.
pub fn init(output: &ObjectLocation, format: OutputFormat, memory: u64) -> Result<(), Fatal> {
    output.join("JobConfig").create_folder().map_err(failure)?;
    let outputs = Outputs::new(format, output, DeltaSettings::for_budget(memory, "init"))?;
    let mut tables: Vec<String> = tasks::select_tasks(&[], &[])?
        .iter()
        .flat_map(|t| t.tables())
        .collect();
    tables.push(COMPLETION_TABLE.to_string());
    tables.dedup();
    for table in &tables {
        let kind = table_kind(table).expect("a default table");
        let mut writer = outputs.open(table, kind)?;
        write_and_wait(writer.as_mut(), &empty_batch(&Shape::default()))
            .with_context(|| format!("creating {table}"))?;
        crate::say!("Created {table}");
    }
    for (table, e) in outputs.finish(false) {
        crate::say!("warning: finishing {table} failed: {}", one_line(&e));
    }
    Ok(())
}

fn failure(e: anyhow::Error) -> Fatal {
    Fatal::new(ExitCode::Failure, format!("{e:#}"))
}

fn empty_batch(shape: &Shape) -> RowBatch<'_> {
    RowBatch::of_rows(Vec::new(), shape)
}

/// `convert ORIGINAL TARGET`: loads every table of an NDJSON output folder into Delta tables
/// under TARGET, file by file in batch order, then replays the recorded deletions and copies
/// the job configs. The two folders must belong to the same PHI folder.
pub fn convert(
    original: &ObjectLocation,
    target: &ObjectLocation,
    memory: u64,
    optimize: bool,
) -> Result<(), Fatal> {
    let keys: Vec<String> = original
        .list()
        .map_err(failure)?
        .into_iter()
        .map(|e| e.key)
        .collect();
    if !keys.iter().any(|k| k.starts_with("JobConfig/")) {
        return Err(Fatal::new(
            ExitCode::FolderDoesNotExist,
            format!(
                "'{}' is not a Cumulus ETL output folder (it has no JobConfig).",
                original.url()
            ),
        ));
    }
    if let (Some(a), Some(b)) = (latest_codebook_id(original), latest_codebook_id(target))
        && a != b
    {
        return Err(Fatal::new(
            ExitCode::WrongPhiFolder,
            "The two output folders were made with different PHI folders.",
        ));
    }
    target.create_folder().map_err(failure)?;
    let outputs = Outputs::new(
        OutputFormat::Deltalake,
        target,
        DeltaSettings::for_budget(memory, "convert"),
    )?;
    let mut failed = false;
    let mut folders: Vec<&str> = keys
        .iter()
        .filter_map(|k| Some(k.split_once('/')?.0))
        .collect();
    folders.dedup();
    for table in folders {
        if table == "JobConfig" {
            continue;
        }
        let Some(kind) = table_kind(table) else {
            crate::say!(
                "warning: {}: not a table this tool knows; skipped",
                original.url_of(table)
            );
            continue;
        };
        match convert_table(&outputs, original, &keys, table, kind) {
            Ok(rows) => crate::say!("Converted {table}: {rows} rows"),
            Err(e) => {
                failed = true;
                crate::say!("error: converting {table}: {}", one_line(&e));
            }
        }
    }
    copy_job_configs(original, &keys, target).map_err(failure)?;
    for (table, e) in outputs.finish(optimize) {
        crate::say!(
            "warning: table maintenance of {table} failed: {}",
            one_line(&e)
        );
    }
    if failed {
        return Err(Fatal::new(
            ExitCode::TaskFailed,
            "Some tables could not be converted.",
        ));
    }
    Ok(())
}

fn convert_table(
    outputs: &Outputs,
    original: &ObjectLocation,
    keys: &[String],
    table: &str,
    kind: TableKind,
) -> Result<u64> {
    let mut writer = outputs.open(table, kind)?;
    let mut total = 0;
    let prefix = format!("{table}/{table}.");
    let files: Vec<&String> = keys
        .iter()
        .filter(|k| k.starts_with(&prefix) && k.ends_with(".ndjson"))
        .filter(|k| !k[table.len() + 1..].contains('/'))
        .collect();
    for key in &files {
        let name = original.url_of(key);
        let text = original
            .read(key)?
            .ok_or_else(|| anyhow!("{name}: gone while converting"))?;
        let mut shape = Shape::default();
        let mut tape = Tape::default();
        let mut rows = Vec::new();
        for (i, line) in crate::json::lines::split_lines(&text).enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let doc = tape
                .parse(line)
                .map_err(|_| anyhow!("{name}:{}: not JSON", i + 1))?;
            shape.add_row(&doc);
            rows.push(line);
        }
        total += rows.len() as u64;
        write_and_wait(writer.as_mut(), &RowBatch::of_rows(rows, &shape))
            .with_context(|| format!("loading {name}"))?;
    }
    if files.is_empty() {
        write_and_wait(writer.as_mut(), &empty_batch(&Shape::default()))?;
    }
    let meta = format!("{table}/{table}.meta");
    if let Some(bytes) = original.read(&meta)? {
        let meta: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not JSON", original.url_of(&meta)))?;
        let ids: Vec<String> = meta["deleted"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        writer.delete_ids(&ids)?;
    }
    Ok(total)
}

/// Copies `JobConfig/<run>/<file>` from one output to the other.
fn copy_job_configs(
    original: &ObjectLocation,
    keys: &[String],
    target: &ObjectLocation,
) -> Result<()> {
    for key in keys.iter().filter(|k| k.starts_with("JobConfig/")) {
        if key.matches('/').count() != 2 {
            continue;
        }
        if let Some(bytes) = original.read(key)? {
            target.write(key, bytes)?;
        }
    }
    Ok(())
}
