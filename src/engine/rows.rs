//! The rows that travel from the sources to the sinks: a table's chunk of serialized rows,
//! what a task needs to know to produce them, and the lines left out (with why), which the
//! sources count and write to the errors folder.

use std::io::Write;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::fhir::Shape;
use crate::json::{Tape, write_compact_ascii};
use crate::memory::Recycler;

/// Why an input line was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SkipReason {
    InvalidJson,
    InvalidUtf8,
    TooDeeplyNested,
    NotAnObject,
    WrongResourceType,
    MissingId,
    BadReference,
    UnknownModifierExtension,
    UnexpectedStructure,
    UnreadableFile,
    BadCsvRow,
    DuplicateId,
    UnpairedSurrogate,
    InternalError,
    UnfitForSchema,
    NonFiniteNumber,
}

impl SkipReason {
    /// How the end-of-run summary names this reason.
    pub fn label(self) -> &'static str {
        match self {
            SkipReason::InvalidJson => "unparseable JSON",
            SkipReason::InvalidUtf8 => "invalid UTF-8",
            SkipReason::TooDeeplyNested => "JSON nested too deeply",
            SkipReason::NotAnObject => "not a JSON object",
            SkipReason::WrongResourceType => "wrong or missing resourceType",
            SkipReason::MissingId => "resource without id",
            SkipReason::BadReference => "unparseable reference",
            SkipReason::UnknownModifierExtension => "unknown modifierExtension",
            SkipReason::UnexpectedStructure => "unexpected structure",
            SkipReason::UnreadableFile => "unreadable or truncated file",
            SkipReason::BadCsvRow => "i2b2 row that cannot be converted",
            SkipReason::DuplicateId => "duplicate id in an i2b2 file (first kept)",
            SkipReason::UnpairedSurrogate => "text with an unpaired surrogate escape",
            SkipReason::InternalError => "internal error (a bug: please report it)",
            SkipReason::UnfitForSchema => "value of another type than its column's",
            SkipReason::NonFiniteNumber => "NaN, Infinity or a number beyond a double",
        }
    }
}

/// Rows of one table produced from one bundle: compact JSON lines plus what the sink needs to
/// dedup and to build the Arrow schema, and the budget bytes to release once written.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TableChunk {
    pub task: u32,
    /// The worker whose sink writes the task (set by the source operator).
    pub sink: u64,
    /// On its way to a sink in another process: its reservation was returned where it was
    /// made, and is counted again where it arrives (`reserved` bytes).
    pub crossing: bool,
    pub table: String,
    /// The rows' ids, one after another: row `i`'s ends at `id_ends[i]`. One string per chunk,
    /// not one per row: a row's id was its own allocation, freed by whichever thread wrote
    /// the batch.
    ids: String,
    id_ends: Vec<usize>,
    /// A tag per row, or none (see [`crate::output::RowBatch::tags`]).
    pub tags: Vec<crate::output::RowTag>,
    /// Every row's key is new to its table and met once in the input (see
    /// [`crate::output::RowBatch::keys_new`]).
    pub keys_new: bool,
    /// Newline-terminated rows, one per id.
    #[serde(with = "super::wire::bytes")]
    pub data: Vec<u8>,
    /// Where each row's newline is in `data`, so the rows are found without reading it again.
    ends: Vec<usize>,
    pub shape: Shape,
    pub reserved: u64,
    /// Scratch space for reading rows back into the shape.
    #[serde(skip)]
    tape: Tape,
    /// Where `data` goes back to for the next bundle once the rows are written (a buffer
    /// from the run's pool).
    #[serde(skip)]
    recycler: Option<Recycler>,
}

impl Drop for TableChunk {
    fn drop(&mut self) {
        if let Some(recycler) = self.recycler.take() {
            recycler.recycle(std::mem::take(&mut self.data));
        }
    }
}

impl TableChunk {
    /// An empty chunk for a table.
    pub fn new(task: u32, table: &str) -> TableChunk {
        TableChunk {
            task,
            sink: 0,
            crossing: false,
            table: table.to_string(),
            ids: String::new(),
            id_ends: Vec::new(),
            tags: Vec::new(),
            keys_new: false,
            data: Vec::new(),
            ends: Vec::new(),
            shape: Shape::default(),
            reserved: 0,
            tape: Tape::default(),
            recycler: None,
        }
    }

    /// An empty chunk whose rows are written into `buffer`, which goes back to the pool of
    /// `recycler` when the chunk is dropped.
    pub fn with_buffer(task: u32, table: &str, buffer: Vec<u8>, recycler: Recycler) -> TableChunk {
        let mut chunk = TableChunk::new(task, table);
        chunk.data = buffer;
        chunk.recycler = Some(recycler);
        chunk
    }

    /// About the bytes the chunk takes on the wire to another process: its rows, ids, row ends
    /// and tags.
    pub fn wire_bytes(&self) -> u64 {
        let ids = self.ids.len() + self.id_ends.len() * std::mem::size_of::<usize>();
        let ends = self.ends.len() * std::mem::size_of::<usize>();
        let tags = self.tags.len() * std::mem::size_of::<crate::output::RowTag>();
        (self.data.len() + ids + ends + tags) as u64
    }

    /// Appends one row given as a JSON value (completion and NLP rows, whose tables have fixed
    /// schemas, so no shape is tracked).
    pub fn push(&mut self, id: &str, row: &Value) {
        let start = self.data.len();
        write_compact_ascii(&mut self.data, row);
        self.commit_row(id, start, false);
    }

    /// Takes the row just written at `data[start..]` (compact JSON, no newline yet): ends the
    /// line and records its id and, `with_shape`, its shape.
    pub fn commit_row(&mut self, id: &str, start: usize, with_shape: bool) {
        if with_shape && !self.shape.add_compact_row(&self.data[start..]) {
            let doc = self
                .tape
                .parse(&self.data[start..])
                .expect("rows are written as valid JSON");
            self.shape.add_row(&doc);
        }
        self.ends.push(self.data.len());
        self.data.push(b'\n');
        self.ids.push_str(id);
        self.id_ends.push(self.ids.len());
    }

    /// Row `i`'s id.
    pub fn id(&self, i: usize) -> &str {
        let start = match i {
            0 => 0,
            i => self.id_ends[i - 1],
        };
        &self.ids[start..self.id_ends[i]]
    }

    /// The rows' ids, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        (0..self.len()).map(|i| self.id(i))
    }

    /// The last row's id.
    pub fn last_id(&self) -> Option<&str> {
        self.len().checked_sub(1).map(|i| self.id(i))
    }

    /// Where the chunk ends now, to `rewind` to.
    pub fn mark(&self) -> ChunkMark {
        ChunkMark {
            data: self.data.len(),
            rows: self.len(),
        }
    }

    /// Drops what was added since `mark` (the rows of a line that failed half-way). The shape
    /// keeps any keys it gained: a wider schema is harmless.
    pub fn rewind(&mut self, mark: ChunkMark) {
        self.data.truncate(mark.data);
        self.ends.truncate(mark.rows);
        self.id_ends.truncate(mark.rows);
        self.ids.truncate(self.id_ends.last().copied().unwrap_or(0));
        self.tags.truncate(mark.rows);
    }

    /// Gives back the spare capacity of a finished chunk. Its rows wait in the sink until the
    /// batch is written, and a buffer grown by doubling is up to half empty. A pooled buffer
    /// stays whole unless its rows fill less than half of it: they are then moved to a buffer
    /// that fits (pooled too where one is), and the large one goes back to the pool at once.
    pub fn shrink_to_fit(&mut self) {
        match &self.recycler {
            Some(recycler) if self.data.len() * 2 < self.data.capacity() => {
                let mut fitted = recycler.take(self.data.len()).unwrap_or_default();
                fitted.extend_from_slice(&self.data);
                recycler.recycle(std::mem::replace(&mut self.data, fitted));
            }
            Some(_) => {}
            None => self.data.shrink_to_fit(),
        }
        self.ids.shrink_to_fit();
        self.id_ends.shrink_to_fit();
        self.ends.shrink_to_fit();
        self.tags.shrink_to_fit();
    }

    /// Heap bytes the chunk holds while it waits in the sink (rows, ids, tags, row ends).
    pub fn held_bytes(&self) -> u64 {
        let ids = self.ids.capacity() + self.id_ends.capacity() * std::mem::size_of::<usize>();
        let tags = self.tags.capacity() * std::mem::size_of::<crate::output::RowTag>();
        let ends = self.ends.capacity() * std::mem::size_of::<usize>();
        (self.data.capacity() + ids + tags + ends) as u64
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.id_ends.len()
    }

    /// Whether the chunk has no rows.
    pub fn is_empty(&self) -> bool {
        self.id_ends.is_empty()
    }

    /// Moves rows `n..` into a new chunk (same task and table). The shape is kept on both
    /// halves (a superset only widens the schema) and the budget bytes move with the tail.
    pub fn split_off(&mut self, n: usize) -> TableChunk {
        let n = n.min(self.ends.len());
        let cut = match n {
            0 => 0,
            n => self.ends[n - 1] + 1,
        };
        let mut ends = self.ends.split_off(n);
        ends.iter_mut().for_each(|end| *end -= cut);
        let id_cut = n.checked_sub(1).map_or(0, |last| self.id_ends[last]);
        let mut id_ends = self.id_ends.split_off(n);
        id_ends.iter_mut().for_each(|end| *end -= id_cut);
        let tail = TableChunk {
            task: self.task,
            sink: self.sink,
            crossing: self.crossing,
            table: self.table.clone(),
            ids: self.ids.split_off(id_cut),
            id_ends,
            tags: self.tags.split_off(n.min(self.tags.len())),
            keys_new: self.keys_new,
            data: self.data.split_off(cut),
            ends,
            shape: self.shape.clone(),
            reserved: self.reserved,
            tape: Tape::default(),
            recycler: None,
        };
        self.reserved = 0;
        tail
    }

    /// Where row `i` is in `data`, its newline included.
    pub fn line_range(&self, i: usize) -> Range<usize> {
        let start = match i {
            0 => 0,
            i => self.ends[i - 1] + 1,
        };
        start..self.ends[i] + 1
    }

    /// Iterates over the rows' JSON text.
    pub fn rows(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.ends.iter().map(|&end| end + 1));
        starts
            .zip(&self.ends)
            .map(|(start, &end)| &self.data[start..end])
    }
}

/// A position in a chunk (see `TableChunk::mark`).
#[derive(Debug, Clone, Copy)]
pub struct ChunkMark {
    data: usize,
    rows: usize,
}

/// A skipped line, for the console and the `--errors-to` folder.
pub struct Skipped<'a> {
    pub line_no: u64,
    pub reason: SkipReason,
    pub detail: String,
    pub raw: &'a [u8],
}

/// What a task needs to know to turn lines into rows.
pub struct TaskContext {
    pub task: u32,
    pub table: String,
    pub resource_type: String,
    /// Other resource types the task reads into the same table (an NLP task's notes of every
    /// type).
    pub more_resource_types: Vec<String>,
    /// The kind of the main table (its schema and keys).
    pub kind: crate::output::TableKind,
    /// Chunks hold whole groups (all rows of one note), so batches are never cut inside one.
    pub whole_chunks: bool,
    /// Rows are read back into the chunk's `Shape` (the Arrow formats need it; NDJSON does not).
    pub needs_shape: bool,
    /// Rows must be UTF-8 text (Parquet and Delta): a kept string with an unpaired surrogate
    /// escape, which NDJSON writes back as Python does, skips its line instead.
    pub utf8_only: bool,
    /// For the encounter task: the completion-row template (group, export time, exclusions).
    pub completion: Option<CompletionTemplate>,
}

/// The constant part of `etl__completion_encounters` rows.
#[derive(Clone)]
pub struct CompletionTemplate {
    pub group_name: String,
    pub export_time: String,
    pub excluded_resources: String,
}

/// Writes a skipped line to the errors folder's rejected-rows file (this file holds PHI).
pub fn write_rejected(out: &mut impl Write, file: &str, s: &Skipped<'_>) -> std::io::Result<()> {
    let row = serde_json::json!({
        "file": file,
        "line": s.line_no,
        "reason": s.reason.label(),
        "detail": s.detail,
        "row": String::from_utf8_lossy(s.raw),
    });
    serde_json::to_writer(&mut *out, &row)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBudget;
    use serde_json::json;

    fn chunk_in_pooled_buffer(budget: &MemoryBudget, capacity: usize) -> TableChunk {
        let (_, buffer) = budget.try_reserve_with_buffer(0, capacity);
        TableChunk::with_buffer(0, "t", buffer.unwrap(), budget.recycler())
    }

    #[test]
    fn a_dropped_chunk_gives_its_buffer_back_to_the_pool() {
        let budget = MemoryBudget::new(64 << 20);
        let mut chunk = chunk_in_pooled_buffer(&budget, 1 << 20);
        chunk.push("1", &json!({"id": "1"}));
        chunk.data.resize(800 << 10, b' ');
        chunk.shrink_to_fit();
        assert!(
            chunk.data.capacity() >= 1 << 20,
            "more than half full: kept"
        );
        let address = chunk.data.as_ptr();
        let split = chunk.split_off(1);
        drop(split);
        assert_eq!(budget.pooled(), 0, "a split-off tail is not pooled");
        drop(chunk);
        assert!(budget.pooled() >= 1 << 20);
        let again = chunk_in_pooled_buffer(&budget, 1 << 20);
        assert_eq!(
            again.data.as_ptr(),
            address,
            "the same memory serves the next bundle"
        );
    }

    #[test]
    fn rows_are_found_again_after_a_rewind_and_splits() {
        let row = |i: &str| json!({"id": i, "text": format!("line {i}\nand more")});
        let mut chunk = TableChunk::new(0, "t");
        for i in 0..5 {
            chunk.push(&i.to_string(), &row(&i.to_string()));
        }
        let mark = chunk.mark();
        chunk.push("x", &row("x"));
        chunk.rewind(mark);
        let text = |c: &TableChunk| -> Vec<Value> {
            c.rows()
                .map(|r| serde_json::from_slice(r).unwrap())
                .collect()
        };
        let rows = |ids: &[&str]| -> Vec<Value> { ids.iter().map(|i| row(i)).collect() };
        assert_eq!(text(&chunk), rows(&["0", "1", "2", "3", "4"]));
        let mut tail = chunk.split_off(2);
        assert_eq!(text(&chunk), rows(&["0", "1"]));
        assert_eq!(text(&tail), rows(&["2", "3", "4"]));
        assert_eq!(tail.ids().collect::<Vec<_>>(), ["2", "3", "4"]);
        assert_eq!(chunk.ids().collect::<Vec<_>>(), ["0", "1"]);
        assert_eq!(tail.last_id(), Some("4"));
        let whole = tail.split_off(0);
        assert_eq!((tail.rows().count(), tail.data.len()), (0, 0));
        assert_eq!(text(&whole), rows(&["2", "3", "4"]));
        let mut whole = whole;
        assert_eq!(whole.split_off(9).rows().count(), 0);
        assert_eq!(text(&whole), rows(&["2", "3", "4"]));
    }

    #[test]
    fn ids_are_found_again_after_a_rewind_and_a_split() {
        let mut chunk = TableChunk::new(0, "t");
        chunk.push("first", &json!({"id": "first"}));
        let mark = chunk.mark();
        chunk.push("a-much-longer-id", &json!({"id": "a-much-longer-id"}));
        chunk.rewind(mark);
        chunk.push("2nd", &json!({"id": "2nd"}));
        chunk.push("3", &json!({"id": "3"}));
        assert_eq!(chunk.ids().collect::<Vec<_>>(), ["first", "2nd", "3"]);
        assert_eq!(
            chunk.wire_bytes(),
            chunk.data.len() as u64 + 9 + 3 * 8 + 3 * 8
        );
        let tail = chunk.split_off(1);
        assert_eq!(chunk.ids().collect::<Vec<_>>(), ["first"]);
        assert_eq!(tail.ids().collect::<Vec<_>>(), ["2nd", "3"]);
        assert_eq!((chunk.last_id(), tail.id(0)), (Some("first"), "2nd"));
        assert_eq!(TableChunk::new(0, "t").last_id(), None);
    }

    #[test]
    fn rows_filling_less_than_half_a_pooled_buffer_move_out_of_it() {
        let budget = MemoryBudget::new(64 << 20);
        let mut chunk = chunk_in_pooled_buffer(&budget, 1 << 20);
        chunk.push("1", &json!({"id": "1", "note": "short"}));
        let rows = chunk.data.clone();
        chunk.shrink_to_fit();
        assert_eq!(chunk.data, rows, "the rows are unchanged");
        assert!(chunk.data.capacity() < 1 << 10, "{}", chunk.data.capacity());
        assert!(
            budget.pooled() >= 1 << 20,
            "the large buffer went back at once"
        );
    }
}
