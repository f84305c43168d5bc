//! The ETL tasks (one per FHIR resource table), declared in `dataflows/*.toml` and embedded, and
//! the `--task` / `--exclude-resources` selection rules of Cumulus ETL.

use serde::Deserialize;

use crate::exit::{ExitCode, Fatal};

const FHIR_TABLES: &str = include_str!("../dataflows/fhir_tables.toml");

/// Table that records, per encounter, the export that delivered it.
pub const COMPLETION_ENCOUNTERS_TABLE: &str = "etl__completion_encounters";
/// Table that logs which tables each run loaded from which export.
pub const COMPLETION_TABLE: &str = "etl__completion";

/// One task: read a resource type, write its table.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Task {
    pub name: String,
    pub resource: String,
    #[serde(default)]
    pub tracks_encounters: bool,
}

impl Task {
    /// The tables this task writes, in write order (completion rows before the rows they track).
    pub fn tables(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.tracks_encounters {
            out.push(COMPLETION_ENCOUNTERS_TABLE.to_string());
        }
        out.push(self.name.clone());
        out
    }
}

#[derive(Deserialize)]
struct TaskFile {
    task: Vec<Task>,
}

/// All built-in tasks in run order.
pub fn all_tasks() -> Vec<Task> {
    toml::from_str::<TaskFile>(FHIR_TABLES)
        .expect("embedded task list is valid")
        .task
}

/// Splits repeated, comma-separated, case-insensitive name arguments.
pub fn expand_names(args: &[String]) -> Vec<String> {
    args.iter()
        .flat_map(|a| a.split(','))
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Picks the tasks to run, always in run order, whatever order the user named them in.
pub fn select_tasks(names: &[String], exclusions: &[String]) -> Result<Vec<Task>, Fatal> {
    let all = all_tasks();
    let names = expand_names(names);
    let exclusions = expand_names(exclusions);
    if names.iter().any(|n| n == "help") {
        let list: Vec<&str> = all.iter().map(|t| t.name.as_str()).collect();
        return Err(Fatal::new(
            ExitCode::TaskHelp,
            format!("Available tasks:\n  {}", list.join("\n  ")),
        ));
    }
    for n in names.iter().chain(exclusions.iter()) {
        if !all.iter().any(|t| &t.name == n) {
            return Err(Fatal::new(
                ExitCode::TaskUnknown,
                format!("Unknown task '{n}' requested. Use --task=help to list the tasks."),
            ));
        }
    }
    Ok(all
        .into_iter()
        .filter(|t| names.is_empty() || names.contains(&t.name))
        .filter(|t| !exclusions.contains(&t.name))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twenty_tasks_encounter_and_patient_first() {
        let all = all_tasks();
        assert_eq!(all.len(), 20);
        assert_eq!(all[0].name, "encounter");
        assert_eq!(all[1].name, "patient");
        assert_eq!(all[0].tables(), ["etl__completion_encounters", "encounter"]);
    }

    #[test]
    fn selection_is_case_insensitive_and_in_run_order() {
        let picked = select_tasks(&["Condition,PATIENT".into()], &[]).unwrap();
        let names: Vec<_> = picked.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["patient", "condition"]);
        let rest = select_tasks(&[], &["device".into()]).unwrap();
        assert_eq!(rest.len(), 19);
        assert_eq!(
            select_tasks(&["nope".into()], &[]).unwrap_err().code,
            ExitCode::TaskUnknown
        );
        assert_eq!(
            select_tasks(&["help".into()], &[]).unwrap_err().code,
            ExitCode::TaskHelp
        );
    }
}
