//! Commits to a table's log, without delta-rs's protocol checker (see [`super::protocol`] for
//! what is checked instead).
//!
//! A commit is one log entry written only if its version is still free (the log store's
//! put-if-absent), at the version after the snapshot its actions were computed on. When
//! another writer took that version first, the commit fails with [`Conflict`], and nothing of
//! it is in the table: the caller reloads the table and computes its actions again (a MERGE
//! re-reads the files it would rewrite), which is always correct, however the other writer
//! changed the table. delta-rs instead checks the winning commits for conflicts with this one
//! and commits on top of them when it finds none; recomputing costs more when writers race,
//! and that is rare for an ETL that owns its tables.

use std::collections::HashMap;

use anyhow::Result;
use deltalake::kernel::transaction::CommitData;
use deltalake::kernel::transaction::TransactionError;
use deltalake::kernel::{Action, Transaction};
use deltalake::logstore::object_store::ObjectStoreExt as _;
use deltalake::logstore::{CommitOrBytes, LogStore as _, LogStoreRef};
use deltalake::protocol::DeltaOperation;
use serde_json::Value;

/// How many times a write is computed and committed again after losing its version to another
/// writer, before it fails.
pub const COMMIT_ATTEMPTS: usize = 5;

/// A commit that lost the race for its version to another writer; nothing of it was written.
#[derive(Debug)]
pub struct Conflict {
    pub version: u64,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "another writer committed version {} of the table first",
            self.version
        )
    }
}

impl std::error::Error for Conflict {}

/// True when `error` is (or wraps) a [`Conflict`].
pub fn is_conflict(error: &anyhow::Error) -> bool {
    error.chain().any(|e| e.is::<Conflict>())
}

/// What the log records about a commit beside its actions.
#[derive(Default, Clone)]
pub struct CommitMeta {
    /// The run's transaction identifier and sequence number, if it is a data commit.
    pub txn: Option<Transaction>,
    /// Extra `commitInfo` fields (such as `operationMetrics`).
    pub info: HashMap<String, Value>,
}

/// Writes `actions` as version `version` of the table (with a `commitInfo` describing
/// `operation`); fails with [`Conflict`] if that version exists.
pub async fn write(
    log_store: &LogStoreRef,
    version: u64,
    actions: Vec<Action>,
    operation: DeltaOperation,
    meta: CommitMeta,
) -> Result<()> {
    let txns = meta.txn.into_iter().collect();
    let data = CommitData::new(actions, operation, meta.info, txns);
    let bytes = data.get_bytes()?;
    let operation_id = uuid::Uuid::new_v4();
    // Stores with conditional puts take the entry itself; the others (S3 without them) rename
    // a temporary file into place, as delta-rs does.
    let entry = if ["DefaultLogStore", "LakeFSLogStore"].contains(&log_store.name().as_str()) {
        CommitOrBytes::LogBytes(bytes)
    } else {
        let path =
            deltalake::Path::from_iter(["_delta_log", &format!("_commit_{operation_id}.json.tmp")]);
        log_store
            .object_store(Some(operation_id))
            .put(&path, bytes.into())
            .await?;
        CommitOrBytes::TmpCommit(path)
    };
    let written = log_store
        .write_commit_entry(version, entry.clone(), operation_id)
        .await;
    match written {
        Ok(()) => Ok(()),
        Err(TransactionError::VersionAlreadyExists(version)) => {
            let _ = log_store
                .abort_commit_entry(version, entry, operation_id)
                .await;
            Err(Conflict { version }.into())
        }
        Err(e) => {
            let _ = log_store
                .abort_commit_entry(version, entry, operation_id)
                .await;
            Err(e.into())
        }
    }
}

/// Whether a commit file's `commitInfo` has `field` set to `value`.
pub fn carries_info(commit: &[u8], field: &str, value: &str) -> bool {
    commit
        .split(|&b| b == b'\n')
        .filter(|line| line.starts_with(b"{\"commitInfo\""))
        .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
        .any(|action| action["commitInfo"][field].as_str() == Some(value))
}

/// What a commit says about its row journal.
#[derive(Debug, PartialEq, Eq)]
pub enum Journal {
    /// Its `commitInfo` names one (in `field`).
    Named(String),
    /// It adds or removes no data (`dataChange` false or no files), and needs none.
    NoDataChange,
    /// It changes data and names none.
    Missing,
}

/// The row journal of a commit file (see [`Journal`]).
pub fn journal_of(commit: &[u8], field: &str) -> Journal {
    let mut changes_data = false;
    for line in commit.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let Ok(action) = serde_json::from_slice::<Value>(line) else {
            return Journal::Missing;
        };
        if let Some(name) = action["commitInfo"][field].as_str() {
            return Journal::Named(name.to_string());
        }
        for kind in ["add", "remove", "cdc"] {
            if action
                .get(kind)
                .is_some_and(|a| a["dataChange"] != Value::Bool(false))
            {
                changes_data = true;
            }
        }
    }
    match changes_data {
        true => Journal::Missing,
        false => Journal::NoDataChange,
    }
}
