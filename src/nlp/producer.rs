//! The NLP step of the dataflow: each worker turns a bundle of notes into result rows. An
//! in-process engine runs right on the worker; a server engine's notes are spawned on the NLP
//! runtime (many in flight, bounded by the engine) and the worker collects finished bundles on
//! later activations, so it never blocks waiting for a server.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use serde_json::Value;

use super::engine::{NoteEngine, NoteInput, NoteOutcome};
use super::note::{TextError, is_selected, note_ids, note_text};
use super::selection::{RefSelection, TextFilter};
use super::study::NoteSource;
use crate::deid::ExtensionReport;
use crate::engine::rows::{SkipReason, Skipped, TableChunk};
use crate::engine::source::{Bundle, RowProducer};
use crate::etl::rows::{classify_invalid_json, rejection_reason};
use crate::json::Tape;
use crate::json::lines::{line_content, split_lines};
use crate::panic_guard::{self, Guarded, Site};

/// Failed notes warned about one by one before the rest are only counted.
const FAILURE_WARNINGS: u64 = 20;

/// Where notes go to be analysed.
pub enum Dispatch {
    /// On the worker that read them (an engine whose answer is ready at once).
    Inline(Arc<dyn NoteEngine>),
    /// On the NLP runtime.
    Spawn(Arc<dyn NoteEngine>, tokio::runtime::Handle),
}

/// What names a note's group in the results (and in the `.ids` list of finished notes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKey {
    /// The note's (anonymous) id: the covid study's `docref_id`.
    NoteId,
    /// `<type>/<anonymous id>`: the LLM studies' `note_ref`.
    NoteRef,
}

/// Note counters for the end-of-run report.
#[derive(Debug, Default)]
pub struct NoteStats {
    /// Notes of the study's resource types read.
    pub seen: AtomicU64,
    /// ... that an earlier run finished (listed in the output's `.ids`), so left out.
    pub finished_before: AtomicU64,
    /// ... that passed the status and note-type rules.
    pub selected: AtomicU64,
    /// ... whose text could be read.
    pub with_text: AtomicU64,
    /// ... left out by `--select-by-*` or `--reject-by-*`.
    pub left_out: AtomicU64,
    /// ... that the engine analysed (their rows are written).
    pub analysed: AtomicU64,
    /// Notes sent to the errors folder (no text, no encounter, engine failure).
    pub failed: AtomicU64,
}

/// What every worker's producer shares.
pub struct NlpShared {
    /// Which notes the task reads.
    pub source: NoteSource,
    pub dispatch: Dispatch,
    pub stats: NoteStats,
    /// Groups an earlier run finished, and what names a note's group.
    finished: HashSet<String>,
    group_key: GroupKey,
    /// `--select-by-*` and `--reject-by-*`.
    text_filter: Option<Arc<TextFilter>>,
    /// `--select-by-csv` or `--select-by-anon-csv`.
    cohort: Option<Arc<RefSelection>>,
    /// `--errors-to/<task>/nlp-errors.ndjson`: the original notes that failed (PHI).
    pub errors: Option<Mutex<BufWriter<std::fs::File>>>,
    warned_remote: AtomicBool,
}

impl NlpShared {
    /// Shared NLP state of a run.
    pub fn new(source: NoteSource, dispatch: Dispatch, errors: Option<std::fs::File>) -> NlpShared {
        NlpShared {
            source,
            dispatch,
            stats: NoteStats::default(),
            finished: HashSet::new(),
            group_key: GroupKey::NoteId,
            text_filter: None,
            cohort: None,
            errors: errors.map(|f| Mutex::new(BufWriter::new(f))),
            warned_remote: AtomicBool::new(false),
        }
    }

    /// Leaves out the notes whose group is in `finished` (named by `key`).
    pub fn skipping(mut self, finished: HashSet<String>, key: GroupKey) -> NlpShared {
        self.finished = finished;
        self.group_key = key;
        self
    }

    /// Leaves out the notes whose text `filter` does not keep, and those not in `cohort`.
    pub fn filtering(
        mut self,
        filter: Option<Arc<TextFilter>>,
        cohort: Option<Arc<RefSelection>>,
    ) -> NlpShared {
        self.text_filter = filter;
        self.cohort = cohort;
        self
    }

    /// Whether `note` (original, or de-identified for an anonymous cohort) is in the cohort;
    /// true when the run has none, or it is of the other kind.
    fn in_cohort(&self, note: &Value, anonymous: bool) -> bool {
        let Some(cohort) = self.cohort.as_ref().filter(|c| c.anonymous == anonymous) else {
            return true;
        };
        let text = |pointer: &str| note.pointer(pointer).and_then(Value::as_str);
        let note_ref = format!(
            "{}/{}",
            text("/resourceType").unwrap_or_default(),
            text("/id").unwrap_or_default()
        );
        cohort.keeps(&note_ref, text("/subject/reference"))
    }

    /// Whether an earlier run finished this (de-identified) note.
    fn finished_before(&self, note: &Value) -> bool {
        if self.finished.is_empty() {
            return false;
        }
        let id = note.get("id").and_then(Value::as_str).unwrap_or_default();
        let group = match self.group_key {
            GroupKey::NoteId => id.to_string(),
            GroupKey::NoteRef => {
                let rtype = note.get("resourceType").and_then(Value::as_str);
                format!("{}/{id}", rtype.unwrap_or_default())
            }
        };
        self.finished.contains(&group)
    }

    /// Counts a failed note, warns (file and line, never the text) and keeps the original.
    fn fail(&self, path: &str, line: u64, why: &str, raw: &[u8]) {
        let failed = self.stats.failed.fetch_add(1, Ordering::Relaxed) + 1;
        if failed <= FAILURE_WARNINGS {
            crate::say!("warning: {path}:{line}: note not analysed: {why}");
        } else if failed == FAILURE_WARNINGS + 1 {
            crate::say!("warning: more notes were not analysed; they are counted in the summary");
        }
        if let Some(out) = &self.errors {
            let mut out = out.lock().unwrap();
            let _ = out
                .write_all(raw)
                .and_then(|_| out.write_all(b"\n"))
                .and_then(|_| out.flush());
        }
    }
}

/// A note waiting for its engine.
struct NoteJob {
    /// Taken when the note is sent to the NLP runtime.
    note: Option<NoteInput>,
    line: u64,
    /// The original line, kept for the errors folder.
    raw: Vec<u8>,
}

/// A bundle whose notes are still being analysed.
struct PendingBundle {
    task: u32,
    table: String,
    path: String,
    reserved: u64,
    jobs: Vec<Option<NoteJob>>,
    results: Vec<Option<Vec<(String, Value)>>>,
    remaining: usize,
}

impl PendingBundle {
    /// The bundle's rows, in note order, carrying its budget reservation to the sink.
    fn into_chunk(self) -> TableChunk {
        let mut chunk = TableChunk::new(self.task, &self.table);
        chunk.reserved = self.reserved;
        for (id, row) in self.results.into_iter().flatten().flatten() {
            chunk.push(&id, &row);
        }
        chunk
    }
}

type Outcome = (u64, usize, Result<NoteOutcome>);

/// One worker's NLP producer.
pub struct NoteRows {
    shared: Arc<NlpShared>,
    pending: HashMap<u64, PendingBundle>,
    next_bundle: u64,
    done_tx: Sender<Outcome>,
    done_rx: Receiver<Outcome>,
}

impl NoteRows {
    /// A producer over the run's shared NLP state.
    pub fn new(shared: Arc<NlpShared>) -> NoteRows {
        let (done_tx, done_rx) = channel();
        NoteRows {
            shared,
            pending: HashMap::new(),
            next_bundle: 0,
            done_tx,
            done_rx,
        }
    }

    /// Selects, de-identifies and reads the notes of a bundle. A panic on one line (a bug) skips
    /// that line as an internal error.
    fn read_notes(
        &self,
        b: &Bundle<'_>,
        report: &mut ExtensionReport,
        on_skip: &mut dyn FnMut(Skipped<'_>),
    ) -> Vec<NoteJob> {
        let mut jobs = Vec::new();
        let mut tape = Tape::default();
        let mut scrubbed = Vec::new();
        for (line, raw) in (b.first_line.get_for_every_line()..).zip(split_lines(b.bytes)) {
            let Some(raw) = line_content(raw) else {
                continue;
            };
            let mut skip = |reason, detail: String| {
                on_skip(Skipped {
                    line_no: line,
                    reason,
                    detail,
                    raw,
                })
            };
            let read = panic_guard::catch(|| {
                panic_guard::inject(Site::Line, b.path, || line);
                self.read_note(
                    b,
                    (line, raw),
                    (&mut tape, &mut scrubbed),
                    report,
                    &mut skip,
                )
            });
            match read {
                Ok(Some(job)) => jobs.push(job),
                Ok(None) => {}
                Err(panic) => {
                    tape = Tape::default();
                    skip(SkipReason::InternalError, panic.to_string());
                }
            }
        }
        jobs
    }

    /// Selects, de-identifies and reads one note (None: skipped, failed, or not selected).
    fn read_note(
        &self,
        b: &Bundle<'_>,
        (line, raw): (u64, &[u8]),
        (tape, scrubbed): (&mut Tape, &mut Vec<u8>),
        report: &mut ExtensionReport,
        skip: &mut dyn FnMut(SkipReason, String),
    ) -> Option<NoteJob> {
        let nlp = &self.shared;
        let Ok(doc) = tape.parse(raw) else {
            let (reason, detail) = classify_invalid_json(raw);
            skip(reason, detail);
            return None;
        };
        // Notes are selected and read from a tree; a lone surrogate reads as U+FFFD there.
        let note: Value = serde_json::from_slice(raw).unwrap_or_else(|_| doc.to_value(0));
        let rtype = note.get("resourceType").and_then(Value::as_str);
        let ctx = b.ctx;
        if !std::iter::once(&ctx.resource_type)
            .chain(&ctx.more_resource_types)
            .any(|r| Some(r.as_str()) == rtype)
        {
            skip(
                SkipReason::WrongResourceType,
                format!("expected {}", ctx.resource_type),
            );
            return None;
        }
        nlp.stats.seen.fetch_add(1, Ordering::Relaxed);
        if !is_selected(&nlp.source, &note) {
            return None;
        }
        if !nlp.in_cohort(&note, false) {
            nlp.stats.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        scrubbed.clear();
        if let Err(rejection) = b.shared.scrubber.scrub(&doc, scrubbed, report) {
            skip(rejection_reason(&rejection), rejection.detail());
            return None;
        }
        let note = match serde_json::from_slice::<Value>(scrubbed) {
            Ok(note) => note,
            // A lone surrogate, which serde_json's strings cannot hold.
            Err(_) => match Tape::default().parse(scrubbed) {
                Ok(doc) => doc.to_value(0),
                Err(_) => {
                    skip(SkipReason::InvalidJson, "a scrubbed note".into());
                    return None;
                }
            },
        };
        if !nlp.in_cohort(&note, true) {
            nlp.stats.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if nlp.finished_before(&note) {
            nlp.stats.finished_before.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        nlp.stats.selected.fetch_add(1, Ordering::Relaxed);
        let ids = match note_ids(&note) {
            Ok(ids) => ids,
            Err(why) => {
                nlp.fail(b.path, line, &why, raw);
                return None;
            }
        };
        let text = match note_text(&note) {
            Ok(t) => t,
            Err(TextError::RemoteOnly) => {
                if !nlp.warned_remote.swap(true, Ordering::Relaxed) {
                    crate::say!(
                        "warning: some note texts are only available by URL and are not \
                         fetched; inline them in the export first (they go to the errors folder)"
                    );
                }
                nlp.fail(b.path, line, "text only available by URL", raw);
                return None;
            }
            Err(TextError::Unreadable(why)) => {
                nlp.fail(b.path, line, &format!("text unreadable: {why}"), raw);
                return None;
            }
        };
        nlp.stats.with_text.fetch_add(1, Ordering::Relaxed);
        if nlp.text_filter.as_ref().is_some_and(|f| !f.keeps(&text)) {
            nlp.stats.left_out.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(NoteJob {
            note: Some(NoteInput { ids, text }),
            line,
            raw: raw.to_vec(),
        })
    }

    /// Stores a finished note; returns the bundle's chunk when it was the last one.
    fn finish_note(
        &mut self,
        bundle: u64,
        note: usize,
        outcome: Result<NoteOutcome>,
    ) -> Option<TableChunk> {
        let p = self.pending.get_mut(&bundle)?;
        let job = p.jobs[note].take()?;
        match outcome {
            Ok(outcome) => {
                self.shared.stats.analysed.fetch_add(1, Ordering::Relaxed);
                if let Some(problem) = &outcome.problem {
                    self.shared.fail(&p.path, job.line, problem, &job.raw);
                }
                p.results[note] = Some(outcome.rows);
            }
            Err(e) => self
                .shared
                .fail(&p.path, job.line, &format!("{e:#}"), &job.raw),
        }
        p.remaining -= 1;
        if p.remaining > 0 {
            return None;
        }
        self.pending.remove(&bundle).map(PendingBundle::into_chunk)
    }
}

impl RowProducer for NoteRows {
    fn process(
        &mut self,
        b: Bundle<'_>,
        report: &mut ExtensionReport,
        on_skip: &mut dyn FnMut(Skipped<'_>),
    ) -> Vec<TableChunk> {
        let jobs = self.read_notes(&b, report, on_skip);
        b.shared
            .report
            .progress
            .add_read(b.ctx.task, jobs.len() as u64);
        let id = self.next_bundle;
        self.next_bundle += 1;
        let count = jobs.len();
        self.pending.insert(
            id,
            PendingBundle {
                task: b.ctx.task,
                table: b.ctx.table.clone(),
                path: b.path.to_string(),
                reserved: b.reserved,
                results: (0..count).map(|_| None).collect(),
                jobs: jobs.into_iter().map(Some).collect(),
                remaining: count,
            },
        );
        if count == 0 {
            return self
                .pending
                .remove(&id)
                .map(PendingBundle::into_chunk)
                .into_iter()
                .collect();
        }
        let shared = self.shared.clone();
        match &shared.dispatch {
            Dispatch::Inline(engine) => {
                let mut out = Vec::new();
                for note in 0..count {
                    let pending = &self.pending[&id];
                    let job = pending.jobs[note].as_ref().expect("queued");
                    let input = job.note.as_ref().expect("not sent");
                    // A bug met on one note fails that note, as a server error would.
                    let outcome = panic_guard::catch(|| {
                        panic_guard::inject(Site::Note, &pending.path, || job.line);
                        futures::executor::block_on(engine.analyse(input))
                    })
                    .map_err(anyhow::Error::new)
                    .and_then(|outcome| outcome);
                    out.extend(self.finish_note(id, note, outcome));
                }
                out
            }
            Dispatch::Spawn(engine, runtime) => {
                let pending = self.pending.get_mut(&id).expect("just inserted");
                for (note, job) in pending.jobs.iter_mut().enumerate() {
                    let input = job.as_mut().expect("queued").note.take().expect("not sent");
                    let engine = engine.clone();
                    let done = self.done_tx.clone();
                    runtime.spawn(async move {
                        // A panic must still answer, or the bundle would wait forever.
                        let outcome = match Guarded::new(engine.analyse(&input)).await {
                            Ok(outcome) => outcome,
                            Err(panic) => Err(anyhow::Error::new(panic)),
                        };
                        let _ = done.send((id, note, outcome));
                    });
                }
                Vec::new()
            }
        }
    }

    fn poll(&mut self) -> Vec<TableChunk> {
        let mut out = Vec::new();
        while let Ok((bundle, note, outcome)) = self.done_rx.try_recv() {
            out.extend(self.finish_note(bundle, note, outcome));
        }
        out
    }

    fn in_flight(&self) -> bool {
        !self.pending.is_empty()
    }
}
