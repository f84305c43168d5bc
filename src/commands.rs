//! The table-management subcommands of Cumulus ETL: `init` (empty tables for every default task)
//! and `convert` (an NDJSON output folder into Delta tables).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};

use crate::exit::{ExitCode, Fatal};
use crate::fhir::Shape;
use crate::json::Tape;
use crate::output::delta::DeltaSettings;
use crate::output::job::latest_codebook_id;
use crate::output::{OutputFormat, Outputs, RowBatch, TableKind, write_and_wait};
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
pub fn init(output: &Path, format: OutputFormat, memory: u64) -> Result<(), Fatal> {
    std::fs::create_dir_all(output.join("JobConfig")).map_err(|e| {
        Fatal::new(
            ExitCode::Failure,
            format!("creating {}: {e}", output.display()),
        )
    })?;
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
        eprintln!("Created {table}");
    }
    for (table, e) in outputs.finish(false) {
        eprintln!("warning: finishing {table} failed: {e:#}");
    }
    Ok(())
}

fn empty_batch(shape: &Shape) -> RowBatch<'_> {
    RowBatch {
        rows: Vec::new(),
        shape,
    }
}

/// `convert ORIGINAL TARGET`: loads every table of an NDJSON output folder into Delta tables
/// under TARGET, file by file in batch order, then replays the recorded deletions and copies
/// the job configs. The two folders must belong to the same PHI folder.
pub fn convert(original: &Path, target: &Path, memory: u64, optimize: bool) -> Result<(), Fatal> {
    if !original.join("JobConfig").is_dir() {
        return Err(Fatal::new(
            ExitCode::FolderDoesNotExist,
            format!(
                "'{}' is not a Cumulus ETL output folder (it has no JobConfig).",
                original.display()
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
    std::fs::create_dir_all(target).map_err(|e| {
        Fatal::new(
            ExitCode::Failure,
            format!("creating {}: {e}", target.display()),
        )
    })?;
    let outputs = Outputs::new(
        OutputFormat::Deltalake,
        target,
        DeltaSettings::for_budget(memory, "convert"),
    )?;
    let mut failed = false;
    for dir in sorted_entries(original)?.into_iter().filter(|p| p.is_dir()) {
        let table = dir.file_name().unwrap().to_string_lossy().into_owned();
        if table == "JobConfig" {
            continue;
        }
        let Some(kind) = table_kind(&table) else {
            eprintln!(
                "warning: {}: not a table this tool knows; skipped",
                dir.display()
            );
            continue;
        };
        match convert_table(&outputs, &dir, &table, kind) {
            Ok(rows) => eprintln!("Converted {table}: {rows} rows"),
            Err(e) => {
                failed = true;
                eprintln!("error: converting {table}: {e:#}");
            }
        }
    }
    copy_job_configs(original, target)?;
    for (table, e) in outputs.finish(optimize) {
        eprintln!("warning: table maintenance of {table} failed: {e:#}");
    }
    if failed {
        return Err(Fatal::new(
            ExitCode::TaskFailed,
            "Some tables could not be converted.",
        ));
    }
    Ok(())
}

fn convert_table(outputs: &Outputs, dir: &Path, table: &str, kind: TableKind) -> Result<u64> {
    let mut writer = outputs.open(table, kind)?;
    let mut total = 0;
    let prefix = format!("{table}.");
    let files: Vec<PathBuf> = sorted_entries(dir)?
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.starts_with(&prefix) && name.ends_with(".ndjson")
        })
        .collect();
    for file in &files {
        let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let mut shape = Shape::default();
        let mut tape = Tape::default();
        let mut rows = Vec::new();
        for (i, line) in crate::json::lines::split_lines(&text).enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let doc = tape
                .parse(line)
                .map_err(|_| anyhow!("{}:{}: not JSON", file.display(), i + 1))?;
            shape.add_row(&doc);
            rows.push(line);
        }
        total += rows.len() as u64;
        write_and_wait(
            writer.as_mut(),
            &RowBatch {
                rows,
                shape: &shape,
            },
        )
        .with_context(|| format!("loading {}", file.display()))?;
    }
    if files.is_empty() {
        write_and_wait(writer.as_mut(), &empty_batch(&Shape::default()))?;
    }
    let meta = dir.join(format!("{table}.meta"));
    if let Ok(bytes) = std::fs::read(&meta) {
        let meta: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}: not JSON", meta.display()))?;
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

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, Fatal> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Fatal::new(ExitCode::Failure, format!("reading {}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    Ok(entries)
}

fn copy_job_configs(original: &Path, target: &Path) -> Result<(), Fatal> {
    for run in sorted_entries(&original.join("JobConfig"))? {
        let dest = target.join("JobConfig").join(run.file_name().unwrap());
        std::fs::create_dir_all(&dest).map_err(|e| {
            Fatal::new(
                ExitCode::Failure,
                format!("creating {}: {e}", dest.display()),
            )
        })?;
        for file in sorted_entries(&run)?.into_iter().filter(|p| p.is_file()) {
            std::fs::copy(&file, dest.join(file.file_name().unwrap())).map_err(|e| {
                Fatal::new(
                    ExitCode::Failure,
                    format!("copying {}: {e}", file.display()),
                )
            })?;
        }
    }
    Ok(())
}
