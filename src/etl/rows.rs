//! Turns raw NDJSON lines into de-identified table rows: parse, check, scrub, serialize. Bad
//! lines are reported with file and line and never stop the run.

use serde_json::Value;

use crate::deid::scrubber::ScrubScratch;
use crate::deid::{ExtensionReport, Scrubbed, Scrubber};
use crate::engine::rows::{SkipReason, Skipped, TableChunk, TaskContext};
use crate::etl::rerun::BundleIndex;
use crate::input::line_numbers::FirstLine;
use crate::json::lines::{line_content, split_lines};
use crate::json::top_level::top_level_str;
use crate::json::utf16::python_strip;
use crate::json::{Kind, Tape};
use crate::panic_guard::{self, Site};

/// The reason a resource the scrubber rejected is skipped.
pub fn rejection_reason(rejection: &crate::deid::Rejection) -> SkipReason {
    match rejection {
        crate::deid::Rejection::NotAResource => SkipReason::NotAnObject,
        crate::deid::Rejection::UnknownModifierExtension(_) => SkipReason::UnknownModifierExtension,
        crate::deid::Rejection::StructureMismatch(_) => SkipReason::UnexpectedStructure,
        crate::deid::Rejection::BadReference(_) => SkipReason::BadReference,
        crate::deid::Rejection::UnpairedSurrogate(_) => SkipReason::UnpairedSurrogate,
    }
}

/// The lines of one bundle and where they come from.
pub struct BundleLines<'a> {
    /// The input file, for messages.
    pub path: &'a str,
    pub bytes: &'a [u8],
    /// Where the lines are numbered from: worked out only for a message or a re-run's index.
    pub first_line: FirstLine,
}

/// Processes every line of a bundle, appending rows to `main` (and `completion`), and calling
/// `on_skip` for each line left out. A panic while a line is processed (a bug) skips that line
/// as an internal error; the rows of the lines around it are kept.
pub fn process_bundle(
    ctx: &TaskContext,
    scrubber: &Scrubber,
    lines: BundleLines<'_>,
    (main, completion): (&mut TableChunk, &mut Option<TableChunk>),
    report: &mut ExtensionReport,
    on_skip: &mut dyn FnMut(Skipped<'_>),
    mut index: Option<&mut BundleIndex<'_>>,
) {
    let mut tape = Tape::default();
    let mut scratch = ScrubScratch::default();
    // Worked out when first needed: by a re-run's index, which then looks every line up by
    // its number (only for a file it has lines of), or by a message about a bad line.
    let every_line = index.as_ref().is_some_and(|i| i.looks_up_lines());
    let first_line = std::cell::OnceCell::new();
    let line_number = |offset: u64| {
        let first = first_line.get_or_init(|| match every_line {
            true => lines.first_line.get_for_every_line(),
            false => lines.first_line.get(),
        });
        first + offset
    };
    let mut newlines = 0;
    for (offset, raw) in (0..).zip(split_lines(lines.bytes)) {
        newlines = offset;
        let Some(trimmed) = line_content(raw) else {
            continue;
        };
        if let Some(index) = index.as_deref_mut()
            && index.leaves_out(|| line_number(offset))
        {
            // Unchanged since the last run; an encounter still gets this export's completion
            // row, unless the table has it.
            if completion.is_some()
                && !index.completion_known(|| line_number(offset))
                && let Some(id) = top_level_str(trimmed, "id")
            {
                let id = scrubber
                    .codebook()
                    .fake_id(&ctx.resource_type, python_strip(&id), true);
                let tag = index.completed(&id);
                push_completion(ctx, completion, &id, Some(tag));
            }
            continue;
        }
        let marks = (main.mark(), completion.as_ref().map(TableChunk::mark));
        let outcome = panic_guard::catch(|| {
            panic_guard::inject(Site::Line, lines.path, || line_number(offset));
            let room = (&mut tape, &mut scratch);
            process_line(ctx, scrubber, trimmed, room, main, report)
        });
        let (reason, detail) = match outcome {
            Ok(Ok(())) => {
                match index.as_deref_mut() {
                    Some(index) => {
                        let tag = index.made(main.last_id().expect("a row was made"), trimmed);
                        main.tags.push(tag);
                        main.keys_new &= index.is_new_key(|| line_number(offset));
                        if completion.is_some() && !index.completion_known(|| line_number(offset)) {
                            let id = main.last_id().expect("a row was made");
                            let tag = index.completed(id);
                            push_completion(ctx, completion, id, Some(tag));
                        }
                    }
                    None => push_completion(
                        ctx,
                        completion,
                        main.last_id().expect("a row was made"),
                        None,
                    ),
                }
                continue;
            }
            Ok(Err(skip)) => skip,
            Err(panic) => {
                main.rewind(marks.0);
                if let (Some(chunk), Some(mark)) = (completion.as_mut(), marks.1) {
                    chunk.rewind(mark);
                }
                tape = Tape::default();
                (SkipReason::InternalError, panic.to_string())
            }
        };
        on_skip(Skipped {
            line_no: line_number(offset),
            reason,
            detail,
            raw: trimmed,
        });
    }
    lines.first_line.read_through(newlines);
}

/// Turns one line into rows, or says why it is skipped (the chunks are left as they were).
fn process_line<'s>(
    ctx: &TaskContext,
    scrubber: &'s Scrubber,
    line: &[u8],
    (tape, scratch): (&mut Tape, &mut ScrubScratch<'s>),
    main: &mut TableChunk,
    report: &mut ExtensionReport,
) -> Result<(), (SkipReason, String)> {
    let doc = tape.parse(line).map_err(|_| classify_invalid_json(line))?;
    if doc.token(0).kind != Kind::Object {
        return Err((SkipReason::NotAnObject, String::new()));
    }
    if doc.get_str(0, "resourceType").as_deref() != Some(ctx.resource_type.as_str()) {
        return Err((
            SkipReason::WrongResourceType,
            format!("expected {}", ctx.resource_type),
        ));
    }
    let start = main.data.len();
    let known = ctx.needs_shape.then_some(&main.shape);
    let (id, novel) = match scrubber.scrub_within(&doc, &mut main.data, report, known, scratch) {
        Ok(Scrubbed {
            id: Some(id),
            novel,
        }) => (id, novel),
        Ok(Scrubbed { id: None, .. }) => {
            main.data.truncate(start);
            return Err((SkipReason::MissingId, String::new()));
        }
        Err(rejection) => {
            return Err((rejection_reason(&rejection), rejection.detail()));
        }
    };
    if ctx.utf8_only && doc.has_lone_surrogate() && has_lone_surrogate(&main.data[start..]) {
        main.data.truncate(start);
        return Err((
            SkipReason::UnpairedSurrogate,
            "a kept text value; Parquet and Delta hold only UTF-8 text (NDJSON output keeps it)"
                .into(),
        ));
    }
    // A row whose keys the shape already has would add nothing to it.
    main.commit_row(id, start, ctx.needs_shape && novel);
    Ok(())
}

/// Adds the encounter `id`'s completion row (with its re-run index tag, if any), for the task
/// that tracks encounters.
fn push_completion(
    ctx: &TaskContext,
    completion: &mut Option<TableChunk>,
    id: &str,
    tag: Option<crate::output::RowTag>,
) {
    if let (Some(tpl), Some(chunk)) = (&ctx.completion, completion.as_mut()) {
        let row = serde_json::json!({
            "encounter_id": id,
            "group_name": tpl.group_name,
            "export_time": tpl.export_time,
            "excluded_resources": tpl.excluded_resources,
        });
        chunk.push(id, &row);
        chunk.tags.extend(tag);
    }
}

/// Whether a row we wrote keeps a string or key with an unpaired surrogate escape.
fn has_lone_surrogate(row: &[u8]) -> bool {
    let mut tape = Tape::default();
    tape.parse(row)
        .map(|doc| (0..doc.token_count()).any(|i| doc.token(i).lone_surrogate))
        .unwrap_or(true)
}

/// Why a line the tape refused is not valid JSON, in serde_json's words (a rare path: the
/// message is worth a second parse).
pub fn classify_invalid_json(raw: &[u8]) -> (SkipReason, String) {
    match serde_json::from_slice::<Value>(raw) {
        Err(e) => classify_json_error(raw, &e),
        Ok(_) => (
            SkipReason::InvalidJson,
            "JSON the reader does not support".into(),
        ),
    }
}

pub fn classify_json_error(raw: &[u8], e: &serde_json::Error) -> (SkipReason, String) {
    let msg = e.to_string();
    let at = format!("column {}", e.column());
    if msg.contains("recursion limit") {
        (SkipReason::TooDeeplyNested, at)
    } else if msg.starts_with("number out of range") || is_python_only_number(raw, e.column()) {
        // Python reads these (as nan and inf) and writes them back as no JSON reader reads.
        (SkipReason::NonFiniteNumber, at)
    } else if std::str::from_utf8(raw).is_err() {
        (SkipReason::InvalidUtf8, at)
    } else {
        // serde's message names the problem (e.g. "EOF while parsing"), never the content.
        let kind = msg
            .split(" at line")
            .next()
            .unwrap_or("invalid JSON")
            .to_string();
        (SkipReason::InvalidJson, format!("{kind} at {at}"))
    }
}

/// Whether the value where serde_json stopped (1-based `column`) is one of the number words
/// Python's reader takes and JSON lacks: `NaN`, `Infinity`, `-Infinity`.
fn is_python_only_number(raw: &[u8], column: usize) -> bool {
    let at = column.saturating_sub(1);
    [at.saturating_sub(1), at].iter().any(|&from| {
        let rest = raw.get(from..).unwrap_or_default();
        [&b"NaN"[..], b"Infinity", b"-Infinity"]
            .iter()
            .any(|word| rest.starts_with(word))
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::deid::{Codebook, Rules};
    use crate::fhir::Shape;
    use crate::json::Tape;

    /// Processes `bytes` with shapes tracked and checks the chunk's shape against one read
    /// from every row it holds (rows the scrubber found known are not read into it).
    fn assert_shape_is_complete(resource_type: &str, bytes: &[u8]) -> usize {
        let codebook = Arc::new(Codebook::in_memory("1234").unwrap());
        let scrubber = Scrubber::new(Rules::embedded().unwrap(), codebook, true);
        let ctx = TaskContext {
            task: 0,
            table: resource_type.to_lowercase(),
            resource_type: resource_type.to_string(),
            more_resource_types: Vec::new(),
            kind: crate::output::TableKind::Fhir(resource_type.to_string()),
            whole_chunks: false,
            needs_shape: true,
            utf8_only: true,
            completion: None,
        };
        let mut main = TableChunk::new(0, &ctx.table);
        let mut report = ExtensionReport::default();
        let mut skipped = 0;
        let lines = BundleLines {
            path: "test.ndjson",
            bytes,
            first_line: FirstLine::Known(1),
        };
        process_bundle(
            &ctx,
            &scrubber,
            lines,
            (&mut main, &mut None),
            &mut report,
            &mut |_| skipped += 1,
            None,
        );
        assert_eq!(skipped, 0, "{resource_type}");
        let mut read = Shape::default();
        let mut tape = Tape::default();
        for row in main.rows() {
            read.add_row(&tape.parse(row).unwrap());
        }
        assert_eq!(main.shape, read, "{resource_type}");
        main.len()
    }

    #[test]
    fn the_shape_has_every_key_of_the_synthea_sample() {
        let rows: usize = crate::test_data::synthea_files()
            .iter()
            .map(|(resource_type, bytes)| assert_shape_is_complete(resource_type, bytes))
            .sum();
        assert!(rows > 1000);
    }

    #[test]
    fn markers_contained_resources_and_dropped_values_keep_the_shape_complete() {
        let lines = [
            r#"{"resourceType":"DocumentReference","id":"1","status":"current"}"#,
            r#"{"resourceType":"DocumentReference","id":"2","status":"current"}"#,
            // An appended `_data` marker, then a `_url` one whose key is known but not below.
            r#"{"resourceType":"DocumentReference","id":"3","content":[{"attachment":{"data":"eA=="}}]}"#,
            r#"{"resourceType":"DocumentReference","id":"4","content":[{"attachment":{"_url":{"id":"u"},"url":"x"}}]}"#,
            // A marker added to an existing extension list.
            r#"{"resourceType":"DocumentReference","id":"5","content":[{"attachment":{"_url":{"extension":[{"url":"http://x","valueString":"y"}]},"url":"x"}}]}"#,
            // A value dropped after its keys were written (an unknown extension).
            r#"{"resourceType":"DocumentReference","id":"6","context":{"extension":[{"url":"http://unknown","valueString":"z"}]}}"#,
            r#"{"resourceType":"DocumentReference","id":"7","contained":[{"resourceType":"Practitioner","id":"p","gender":"other"}]}"#,
            // Only the contained resource's type is new.
            r#"{"resourceType":"DocumentReference","id":"8","contained":[{"resourceType":"Patient","id":"p","gender":"other"}]}"#,
            r#"{"resourceType":"DocumentReference","id":"9","status":"current"}"#,
        ];
        let text = lines.join("\n");
        assert_eq!(
            assert_shape_is_complete("DocumentReference", text.as_bytes()),
            9
        );
        // An extension list whose items are known without `valueCode`, then the marker added
        // to it: only the marker's `valueCode` is new.
        let extension = r#"{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/annotationType","valueString":"v"}]}"#;
        let lines = [
            format!(
                r#"{{"resourceType":"DocumentReference","id":"1","content":[{{"attachment":{{"_url":{extension}}}}}]}}"#
            ),
            format!(
                r#"{{"resourceType":"DocumentReference","id":"2","content":[{{"attachment":{{"url":"x","_url":{extension}}}}}]}}"#
            ),
        ];
        let text = lines.join("\n");
        assert_eq!(
            assert_shape_is_complete("DocumentReference", text.as_bytes()),
            2
        );
    }

    #[test]
    fn numbers_python_reads_and_json_lacks_are_named() {
        for line in [
            &br#"{"a":NaN}"#[..],
            br#"{"a":-Infinity}"#,
            br#"[1,Infinity]"#,
            br#"{"a":1e400}"#,
        ] {
            let (reason, _) = classify_invalid_json(line);
            assert_eq!(
                reason,
                SkipReason::NonFiniteNumber,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let (reason, _) = classify_invalid_json(br#"{"a":Nope}"#);
        assert_eq!(reason, SkipReason::InvalidJson);
    }
}
