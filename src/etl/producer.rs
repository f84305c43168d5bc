//! The ETL's row producer for the engine: each bundle's lines become de-identified rows of the
//! task's table (and completion rows for encounters).

use std::ops::Range;
use std::sync::Arc;

use crate::deid::ExtensionReport;
use crate::engine::RunShared;
use crate::engine::rows::{Skipped, TableChunk, TaskContext};
use crate::engine::source::{Bundle, RowProducer};

use super::rerun::RerunIndex;
use super::rows::{BundleLines, process_bundle};

/// The ETL producer: de-identified resources (and completion rows for encounters), leaving out
/// the lines a re-run's index found unchanged.
pub struct FhirRows {
    pub rerun: Option<Arc<RerunIndex>>,
}

impl RowProducer for FhirRows {
    fn leaves_out_all(
        &mut self,
        ctx: &TaskContext,
        path: &str,
        lines: &dyn Fn() -> Range<u64>,
    ) -> bool {
        let tracks_encounters = ctx.completion.is_some();
        self.rerun
            .as_ref()
            .is_some_and(|r| r.leaves_out_all(ctx.task, path, lines, tracks_encounters))
    }

    fn process(
        &mut self,
        b: Bundle<'_>,
        report: &mut ExtensionReport,
        on_skip: &mut dyn FnMut(Skipped<'_>),
    ) -> Vec<TableChunk> {
        // De-identified rows are about as long as the input or shorter: one buffer, as large
        // as the bundle.
        let recycler = b.shared.budget.recycler();
        let mut main = TableChunk::with_buffer(b.ctx.task, &b.ctx.table, b.rows, recycler);
        main.reserved = b.reserved;
        let mut completion = b
            .ctx
            .completion
            .as_ref()
            .map(|_| TableChunk::new(b.ctx.task, crate::tasks::COMPLETION_ENCOUNTERS_TABLE));
        let lines = BundleLines {
            path: b.path,
            bytes: b.bytes,
            first_line: b.first_line,
        };
        let mut index = self.rerun.as_ref().map(|r| r.bundle(b.ctx.task, b.path));
        // Cleared by the first row whose key the index does not know to be new.
        main.keys_new = index.is_some();
        process_bundle(
            b.ctx,
            &b.shared.scrubber,
            lines,
            (&mut main, &mut completion),
            report,
            on_skip,
            index.as_mut(),
        );
        let unchanged = index.as_ref().map_or(0, |i| i.unchanged_lines());
        drop(index);
        b.shared
            .report
            .progress
            .add_read(b.ctx.task, main.len() as u64 + unchanged);
        let mut out = Vec::with_capacity(2);
        out.extend(completion);
        out.push(main);
        out.iter_mut().for_each(TableChunk::shrink_to_fit);
        right_size_reservation(b.shared, &mut out);
        out
    }
}

/// Shrinks the reservation a bundle's chunks carry to what the output format reserves for the
/// bytes they hold. A bundle is reserved at its input size before it is read, but de-identified
/// rows are often much smaller (notes lose their attachments), and budget held for bytes that
/// no longer exist only makes the sinks write smaller batches under pressure.
fn right_size_reservation(shared: &RunShared, chunks: &mut [TableChunk]) {
    let reserved: u64 = chunks.iter().map(|c| c.reserved).sum();
    let held = shared
        .outputs
        .format
        .reservation(chunks.iter().map(TableChunk::held_bytes).sum());
    if held >= reserved {
        return;
    }
    shared.budget.release(reserved - held);
    let last = chunks.len() - 1;
    for (n, chunk) in chunks.iter_mut().enumerate() {
        chunk.reserved = if n == last { held } else { 0 };
    }
}
