//! One table's row index as a run finds it: the stored index of the version the run opened,
//! or one rebuilt from the last index and the row journals of the commits after it, and
//! whether it lists every key of the table.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use anyhow::Result;

use crate::engine::RunShared;
use crate::exit::one_line;
use crate::output::delta::ValueSink;
use crate::rerun::RowFingerprints;
use crate::rerun::complete::completed;
use crate::rerun::index::{self, INDEX_KEY, IndexReader};
use crate::rerun::journals::replayed;
use crate::spill_sort::SpillSort;
use crate::store::ObjectLocation;

pub(super) struct IndexedTable {
    pub(super) name: String,
    pub(super) dir: ObjectLocation,
    /// The table's version when the run started, if an index of it could be had.
    pub(super) usable_at: Option<i64>,
    /// Where that index is: beside the table, or rebuilt from journals into a private folder.
    pub(super) old: Option<OldIndex>,
    /// The run starts from an index that lists every key of the table (or from no table).
    pub(super) complete: bool,
    /// Rows left out as unchanged.
    pub(super) unchanged: AtomicU64,
}

/// The index a run started from.
pub(super) enum OldIndex {
    /// The table's own, of the version the run opened.
    Stored,
    /// The table's last index (if any) and the row journals of the commits after it, merged
    /// into a private folder (removed with it).
    Rebuilt {
        _folder: tempfile::TempDir,
        location: ObjectLocation,
    },
}

impl IndexedTable {
    /// The table's index if it describes the version the run opened the table at, or can be
    /// rebuilt for it from the row journals of the commits since; says why not otherwise
    /// (nothing when there is none).
    pub(super) fn open(
        shared: &RunShared,
        output: &ObjectLocation,
        name: &str,
        tag: u128,
    ) -> Result<(IndexedTable, Option<IndexReader>)> {
        let mut table = IndexedTable {
            name: name.to_string(),
            dir: output.join(name),
            usable_at: None,
            old: None,
            complete: false,
            unchanged: AtomicU64::new(0),
        };
        let Some(version) = shared.outputs.opened_version(name) else {
            // A new table: the index this run leaves lists every key.
            table.complete = true;
            return Ok((table, None));
        };
        let (base, since) = match index::open_file(&table.dir, INDEX_KEY, tag, None)? {
            Ok((reader, at)) if at == version => {
                table.usable_at = Some(version);
                table.old = Some(OldIndex::Stored);
                table.complete = reader.complete;
                return Ok((table, Some(reader)));
            }
            Ok((reader, at)) if at < version => (Some(reader), Some(at)),
            Ok(_) | Err(index::Unusable::OtherTag) => {
                let why =
                    "written under another codebook, tool version or rules, or for another table";
                crate::say!("  {name}: its row index is not used ({why}); every row is processed");
                return Ok((table, None));
            }
            Err(_) => (None, None),
        };
        let journals = match shared.outputs.commits_since(name, since)?.journals {
            Some(journals) if !journals.is_empty() => journals,
            _ => {
                if let Some(at) = since {
                    let why = index::Unusable::OtherVersion(at).reason();
                    crate::say!(
                        "  {name}: its row index is not used ({why}); every row is processed"
                    );
                }
                return Ok((table, None));
            }
        };
        let Some(readers) = table.open_journals(&journals, tag)? else {
            crate::say!(
                "  {name}: its row index is not used (a commit's row journal is missing); \
                 every row is processed"
            );
            return Ok((table, None));
        };
        // Journals since the table's first commit list every key it has; after an index,
        // every key if the index did.
        let complete = base.as_ref().is_none_or(|b| b.complete);
        let temp = tempfile::Builder::new()
            .prefix("cumulus-etl-index-")
            .tempdir()?;
        let location = ObjectLocation::local(temp.path())?;
        let replayed = replayed(base, readers)?;
        index::write(&location, (tag, version, complete), replayed)?;
        let reader = index::open(&location, tag, version)?
            .map_err(|u| anyhow::anyhow!("a rebuilt row index: {}", u.reason()))?;
        crate::say!(
            "  {name}: row index rebuilt from {} commits' journals{}",
            journals.len(),
            since.map_or(String::new(), |at| format!(" after version {at}"))
        );
        table.usable_at = Some(version);
        table.complete = complete;
        table.old = Some(OldIndex::Rebuilt {
            _folder: temp,
            location,
        });
        Ok((table, Some(reader)))
    }

    /// Makes the index the run starts from (`reader`, or none) list every key of the table: the
    /// keys of its `id` column that the index lacks join it with an unknown line
    /// (`rerun::complete`), in a private folder. Returns the completed index; on failure, the
    /// index as it was, with a note (the run then merges keys it cannot know to be new).
    pub(super) fn complete_from_rows(
        &mut self,
        shared: &RunShared,
        reader: Option<IndexReader>,
        fingerprints: &RowFingerprints,
        (tag, memory): (u128, usize),
    ) -> Option<IndexReader> {
        let Some(version) = shared.outputs.opened_version(&self.name) else {
            return reader;
        };
        let started = std::time::Instant::now();
        let completed = self.completed(shared, reader, fingerprints, (tag, version, memory));
        match completed {
            Ok((reader, keys)) => {
                crate::say!(
                    "  {}: row index completed with the keys of the table's {keys} rows ({:.1} s)",
                    self.name,
                    started.elapsed().as_secs_f64()
                );
                Some(reader)
            }
            Err(e) => {
                crate::say!(
                    "  {}: the row index does not list every key of the table ({}); rows                      are merged",
                    self.name,
                    one_line(&e)
                );
                self.reopen_old(tag)
            }
        }
    }

    fn completed(
        &mut self,
        shared: &RunShared,
        reader: Option<IndexReader>,
        fingerprints: &RowFingerprints,
        (tag, version, memory): (u128, i64, usize),
    ) -> Result<(IndexReader, u64)> {
        let sort = Arc::new(Mutex::new(Some(SpillSort::<8>::new(memory))));
        let (into, keyed) = (sort.clone(), fingerprints.clone());
        let each: ValueSink = Box::new(move |ids| {
            let keys = ids.iter().flatten().map(|id| keyed.key(id).to_be_bytes());
            let mut sort = into.lock().unwrap();
            sort.as_mut().expect("a key sort").extend(keys)?;
            Ok(())
        });
        let rows = shared.outputs.for_each_value(&self.name, "id", each)?;
        let sort = sort.lock().unwrap().take().expect("a key sort");
        let keys = sort.finish()?.map(|k| k.map(u64::from_be_bytes));
        let entries: Box<dyn Iterator<Item = std::io::Result<index::Entry>>> = match reader {
            Some(reader) => Box::new(reader),
            None => Box::new(std::iter::empty()),
        };
        let temp = tempfile::Builder::new()
            .prefix("cumulus-etl-index-")
            .tempdir()?;
        let location = ObjectLocation::local(temp.path())?;
        index::write(&location, (tag, version, true), completed(entries, keys))?;
        let reader = index::open(&location, tag, version)?
            .map_err(|u| anyhow::anyhow!("a completed row index: {}", u.reason()))?;
        self.usable_at = Some(version);
        self.complete = true;
        self.old = Some(OldIndex::Rebuilt {
            _folder: temp,
            location,
        });
        Ok((reader, rows))
    }

    /// The named row journals of the table's commits, opened; None when one is missing (or
    /// was written under another tag).
    pub(super) fn open_journals(
        &self,
        journals: &[String],
        tag: u128,
    ) -> Result<Option<Vec<IndexReader>>> {
        let folder = self.dir.join(index::JOURNAL_DIR);
        let mut readers = Vec::with_capacity(journals.len());
        for journal in journals {
            match index::open_file(&folder, journal, tag, Some(-1))? {
                Ok((reader, _)) => readers.push(reader),
                Err(_) => return Ok(None),
            }
        }
        Ok(Some(readers))
    }

    /// Whether the run started from the index stored beside the table.
    pub(super) fn is_stored(&self) -> bool {
        matches!(self.old, Some(OldIndex::Stored))
    }

    /// The index the run started from, again.
    pub(super) fn reopen_old(&self, tag: u128) -> Option<IndexReader> {
        let at = self.usable_at?;
        let location = match self.old.as_ref()? {
            OldIndex::Stored => &self.dir,
            OldIndex::Rebuilt { location, .. } => location,
        };
        index::open(location, tag, at).ok()?.ok()
    }

    /// Removes the row journals of the table's commits, once an index covers them.
    pub(super) fn remove_journals(&self) {
        let journals = self.dir.join(index::JOURNAL_DIR);
        let Ok(entries) = journals.list() else {
            return;
        };
        for entry in entries {
            if let Err(e) = journals.delete(&entry.key) {
                crate::say!(
                    "warning: could not remove a row journal of {}: {}",
                    self.name,
                    one_line(&e)
                );
            }
        }
    }
}

/// Removes a table's index, saying why when there is a reason worth telling.
pub(super) fn remove(table: &IndexedTable, why: Option<&str>) {
    if let Err(e) = index::remove(&table.dir) {
        crate::say!(
            "warning: the stale row index of {} could not be removed ({}); the next run will \
             not use it, as it describes another version",
            table.name,
            one_line(&e)
        );
    } else if let Some(why) = why {
        crate::say!("  {}: no row index kept: {why}", table.name);
    }
}
