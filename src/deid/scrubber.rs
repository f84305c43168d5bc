//! Applies the allow-list rules to one resource while copying it from its JSON text to compact
//! ASCII JSON: drops what is not allowed, hashes ids and references, generalizes dates and zips,
//! masks notes, and rejects resources it cannot safely understand. It walks a token tape of the
//! input, so kept values are copied as they are and no tree is built.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::codebook::Codebook;
use super::rules::{FieldRules, Filter, Rules, Treatment};
use crate::fast_hash::NameRef;
use crate::fhir::Shape;
use crate::json::ascii::push_quoted;
use crate::json::utf16::{python_strip, strip_units, write_units, write_units_unquoted};
use crate::json::{Doc, Kind, write_compact_ascii, write_str, write_str_parts};

const DATA_ABSENT_URL: &str = "http://hl7.org/fhir/StructureDefinition/data-absent-reason";
/// The marker left where a value was masked, as compact JSON.
const MASKED_EXTENSION: &[u8] =
    br#"{"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"masked"}"#;
const EPIC_CUSTOM_SYSTEM_PREFIX: &str = "urn:oid:1.2.840.114350.";
const RESTRICTED_ZIP_PREFIXES: [&str; 14] = [
    "036", "059", "102", "203", "205", "369", "556", "692", "821", "823", "878", "879", "884",
    "893",
];

/// Why a whole resource was left out of the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// Not a JSON object with a resourceType (or nothing left after scrubbing).
    NotAResource,
    /// A modifierExtension we do not understand changes the meaning of the resource.
    UnknownModifierExtension(String),
    /// A field's shape does not match the FHIR type the rules expect.
    StructureMismatch(String),
    /// A reference that is neither relative, contained, nor typed.
    BadReference(String),
    /// An id, reference, date or zip escapes an unpaired UTF-16 surrogate: it cannot be hashed
    /// or cut as text (Python's tool fails on it too).
    UnpairedSurrogate(String),
}

impl Rejection {
    /// A short, PHI-free reason used for counting and messages.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NotAResource => "not a FHIR resource",
            Rejection::UnknownModifierExtension(_) => "unknown modifierExtension",
            Rejection::StructureMismatch(_) => "unexpected structure",
            Rejection::BadReference(_) => "unparseable reference",
            Rejection::UnpairedSurrogate(_) => "unpaired surrogate escape",
        }
    }

    /// Detail safe to log: field names and extension URLs, never values.
    pub fn detail(&self) -> String {
        match self {
            Rejection::NotAResource => String::new(),
            Rejection::UnknownModifierExtension(url) => url.clone(),
            Rejection::StructureMismatch(field) => format!("field {field}"),
            Rejection::BadReference(field) => format!("field {field}"),
            Rejection::UnpairedSurrogate(field) => {
                format!("field {field}, whose value is hashed or cut and must be text")
            }
        }
    }
}

/// Extensions seen during scrubbing, for the end-of-run report (resource type, url) -> count.
#[derive(Debug, Default, Clone)]
pub struct ExtensionReport {
    pub dropped: BTreeMap<(String, String), u64>,
    pub skipped_modifiers: BTreeMap<(String, String), u64>,
}

impl ExtensionReport {
    /// Adds another worker's counts into this one.
    pub fn merge(&mut self, other: &ExtensionReport) {
        for (k, v) in &other.dropped {
            *self.dropped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.skipped_modifiers {
            *self.skipped_modifiers.entry(k.clone()).or_default() += v;
        }
    }
}

/// Shared by all workers; per-call state lives in the `ExtensionReport` passed in.
pub struct Scrubber {
    rules: Rules,
    codebook: Arc<Codebook>,
    mask_notes: bool,
    backbone: Treatment,
}

/// Why a value was left out; only `Resource` leaves out the whole resource.
enum Skip {
    /// Drop this value (masked values and Epic custom codes too: their markers are planned
    /// before the node is written).
    Value,
    /// Drop the whole resource.
    Resource(Rejection),
}

impl From<Rejection> for Skip {
    fn from(r: Rejection) -> Skip {
        Skip::Resource(r)
    }
}

/// Room for the entries of one resource's nodes, innermost last. Started empty, the stack grew
/// four times per Synthea resource (2.4% of the instructions of an NDJSON run, callgrind).
const ENTRIES_PER_RESOURCE: usize = 64;

/// What scrubbing a resource works in, kept from one resource to the next by a caller that
/// scrubs many (a bundle's lines): the entries' stack (allocated per resource, it was a malloc
/// and a free of a few kilobytes per line, too large for the allocator's per-thread cache) and
/// the strings anonymous ids are written into.
#[derive(Default)]
pub struct ScrubScratch<'s> {
    entries: Vec<Entry<'s>>,
    /// The resource's anonymous id, and another value's (written in place, not a new string
    /// per id).
    ids: (String, String),
}

/// State of one `scrub` call.
struct Pass<'r, 's> {
    report: &'r mut ExtensionReport,
    /// Room for the resource's anonymous id and for another value's.
    ids: (String, String),
    /// The resource's anonymous id was written (into `ids.0`).
    has_id: bool,
    /// The entries of the nodes being written, innermost last (one allocation per resource,
    /// not one per node).
    entries: Vec<Entry<'s>>,
    /// A key was written that the known shape lacks (or something the check does not follow).
    novel: bool,
}

/// A resource as the scrubber wrote it.
pub struct Scrubbed<'a> {
    /// Its anonymous id (None if it has none).
    pub id: Option<&'a str>,
    /// Whether the row may have keys the `known` shape lacks, and must be read into it.
    pub novel: bool,
}

/// One field of a node being written: where its key and value are, and what to do with it.
#[derive(Clone, Copy)]
struct Entry<'t> {
    key: usize,
    value: usize,
    treatment: &'t Treatment,
    /// Identifies the rule (and so the key) for duplicate detection.
    slot: (usize, bool),
    /// The value must end up carrying the masked marker (`_field` of a masked field).
    marked: bool,
    /// The key is `extension` (asked twice per node when markers are planned).
    extension: bool,
}

/// Keys added after a node's own fields, in the order the tree of the reference gains them.
enum Appended {
    /// `_field` for a masked field without one.
    Sunder(usize),
    /// `extension` for an Epic custom code on a node without extensions.
    Extension,
}

impl Scrubber {
    /// `mask_notes` is true for the ETL and false for NLP, which needs the note text.
    pub fn new(rules: Rules, codebook: Arc<Codebook>, mask_notes: bool) -> Scrubber {
        let backbone = rules
            .nested("BackboneElement")
            .expect("the rules define BackboneElement");
        Scrubber {
            rules,
            codebook,
            mask_notes,
            backbone,
        }
    }

    /// The codebook ids are drawn from.
    pub fn codebook(&self) -> &Arc<Codebook> {
        &self.codebook
    }

    /// De-identifies the resource at the root of `doc`, appending it to `out` as compact ASCII
    /// JSON, and returns its anonymous id (None if it has none). On a rejection `out` is left
    /// as it was.
    pub fn scrub(
        &self,
        doc: &Doc<'_>,
        out: &mut Vec<u8>,
        report: &mut ExtensionReport,
    ) -> Result<Option<String>, Rejection> {
        let mut scratch = ScrubScratch::default();
        self.scrub_within(doc, out, report, None, &mut scratch)
            .map(|s| s.id.map(str::to_string))
    }

    /// As `scrub`, and also says whether every key written is already in the `known` shape (a
    /// batch's shape so far). Such a row adds nothing to the shape, and reading it back into
    /// the shape (a tenth of a Parquet run) is skipped. The check may only err towards novel:
    /// contained resources and lists in lists always count as novel.
    pub fn scrub_within<'s, 'x>(
        &'s self,
        doc: &Doc<'_>,
        out: &mut Vec<u8>,
        report: &mut ExtensionReport,
        known: Option<&Shape>,
        scratch: &'x mut ScrubScratch<'s>,
    ) -> Result<Scrubbed<'x>, Rejection> {
        let start = out.len();
        let mut entries = std::mem::take(&mut scratch.entries);
        entries.clear();
        entries.reserve(ENTRIES_PER_RESOURCE);
        let mut pass = Pass {
            report,
            ids: std::mem::take(&mut scratch.ids),
            has_id: false,
            entries,
            novel: known.is_none(),
        };
        let result = if doc.token(0).kind == Kind::Object {
            self.resource(doc, 0, true, known, out, &mut pass)
        } else {
            Err(Skip::Value)
        };
        scratch.entries = std::mem::take(&mut pass.entries);
        scratch.ids = std::mem::take(&mut pass.ids);
        match result {
            Ok(()) => Ok(Scrubbed {
                id: pass.has_id.then_some(scratch.ids.0.as_str()),
                novel: pass.novel,
            }),
            Err(skip) => {
                out.truncate(start);
                Err(match skip {
                    Skip::Resource(r) => r,
                    Skip::Value => Rejection::NotAResource,
                })
            }
        }
    }

    fn resource<'s>(
        &'s self,
        doc: &Doc<'_>,
        node: usize,
        top: bool,
        shape: Option<&Shape>,
        out: &mut Vec<u8>,
        pass: &mut Pass<'_, 's>,
    ) -> Result<(), Skip> {
        let resource_type = match doc.get(node, "resourceType") {
            Some(v) if doc.token(v).kind == Kind::String && doc.raw(v).is_empty() => {
                return Err(Skip::Value);
            }
            Some(v) if doc.token(v).kind == Kind::String => doc.str(v),
            Some(v) if doc.is_truthy(v) => return Err(mismatch("resourceType").into()),
            _ => return Err(Skip::Value),
        };
        let (rtype, fields) = self.rules.resource_fields(&resource_type);
        let frame = Frame {
            inside_extension: false,
            marked: false,
            top,
            shape,
        };
        self.node(doc, node, rtype, fields, None, frame, out, pass)
    }

    /// Writes one object with the rules of its type. `marked` asks for the masked marker in its
    /// `extension` list; `top` says it is the resource itself (whose id is kept).
    #[allow(clippy::too_many_arguments)]
    fn node<'s>(
        &'s self,
        doc: &Doc<'_>,
        node: usize,
        rtype: &str,
        fields: &'s FieldRules,
        filter: Option<&Filter>,
        frame: Frame<'_>,
        out: &mut Vec<u8>,
        pass: &mut Pass<'_, 's>,
    ) -> Result<(), Skip> {
        if let Some(filter) = filter {
            let matches = doc
                .get_str(node, &filter.field)
                .is_some_and(|v| filter.values.contains(v.as_ref()));
            if !matches {
                return Err(Skip::Value);
            }
        }
        let base = pass.entries.len();
        self.push_entries(doc, node, fields, &mut pass.entries);
        let epic = self.epic_verdict(doc, node, &pass.entries[base..]);
        let (appended, needs_marker) =
            self.plan_markers(doc, &mut pass.entries[base..], epic, frame.marked);
        let result = self.write_node(
            doc,
            node,
            rtype,
            base,
            frame,
            epic,
            (appended, needs_marker),
            out,
            pass,
        );
        pass.entries.truncate(base);
        result
    }

    /// Writes the node whose planned entries start at `pass.entries[base]`.
    #[allow(clippy::too_many_arguments)]
    fn write_node<'s>(
        &'s self,
        doc: &Doc<'_>,
        node: usize,
        rtype: &str,
        base: usize,
        frame: Frame<'_>,
        epic: Option<EpicVerdict>,
        (appended, needs_marker): (Vec<Appended>, bool),
        out: &mut Vec<u8>,
        pass: &mut Pass<'_, 's>,
    ) -> Result<(), Skip> {
        let count = pass.entries.len() - base;
        let start = out.len();
        out.push(b'{');
        let mut written = 0;
        for n in 0..count {
            let entry = pass.entries[base + n];
            let mark = out.len();
            if written > 0 {
                out.push(b',');
            }
            write_key(doc, entry.key, out);
            let key = doc.str(entry.key);
            let is_list = doc.token(entry.value).kind == Kind::Array;
            let add_marker = needs_marker && entry.extension && is_list;
            let shape = pass.known_child(frame.shape, &key);
            if add_marker {
                pass.note_marker(shape);
            }
            let ctx = ValueCtx {
                rtype,
                node,
                key: &key,
                inside_extension: frame.inside_extension,
                marked: entry.marked,
                epic,
                // The resource's own id is a single value of the top node.
                top: frame.top && !is_list,
                shape,
            };
            let kept = if is_list {
                out.push(b'[');
                let mut items = 0;
                for item in doc.items(entry.value) {
                    let item_mark = out.len();
                    if items > 0 {
                        out.push(b',');
                    }
                    match self.value(doc, &ctx, entry.treatment, item, out, pass) {
                        Ok(()) => items += 1,
                        Err(Skip::Value) => out.truncate(item_mark),
                        Err(skip) => return Err(skip),
                    }
                }
                if add_marker && !has_masked_marker(doc, entry.value) {
                    if items > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(MASKED_EXTENSION);
                    items += 1;
                }
                out.push(b']');
                items > 0
            } else {
                match self.value(doc, &ctx, entry.treatment, entry.value, out, pass) {
                    Ok(()) => true,
                    Err(Skip::Value) => false,
                    Err(skip) => return Err(skip),
                }
            };
            if kept {
                written += 1;
                pass.note_kept(frame.shape, shape);
            } else {
                out.truncate(mark);
            }
        }
        for key in appended {
            if written > 0 {
                out.push(b',');
            }
            written += 1;
            match key {
                Appended::Sunder(k) => {
                    if !pass.novel {
                        let sunder = pass.note_key(frame.shape, &format!("_{}", doc.str(k)));
                        let extension = pass.note_key(sunder, "extension");
                        pass.note_marker(extension);
                    }
                    out.extend_from_slice(b"\"_");
                    write_key_text(doc, k, out);
                    out.extend_from_slice(b"\":{\"extension\":[");
                    out.extend_from_slice(MASKED_EXTENSION);
                    out.extend_from_slice(b"]}");
                }
                Appended::Extension => {
                    let extension = pass.note_key(frame.shape, "extension");
                    pass.note_marker(extension);
                    out.extend_from_slice(b"\"extension\":[");
                    out.extend_from_slice(MASKED_EXTENSION);
                    out.push(b']');
                }
            }
        }
        if written == 0 {
            out.truncate(start);
            return Err(Skip::Value);
        }
        out.push(b'}');
        Ok(())
    }

    /// Pushes the fields of `node` the rules know, non-null, one per key (the last value wins
    /// and takes the first one's place, as a JSON object read by Python or serde_json does).
    fn push_entries<'s>(
        &'s self,
        doc: &Doc<'_>,
        node: usize,
        fields: &'s FieldRules,
        stack: &mut Vec<Entry<'s>>,
    ) {
        let base = stack.len();
        for (key, value) in doc.entries(node) {
            let name = doc.str(key);
            let found = match name.strip_prefix('_') {
                Some(base) => fields
                    .get_key_value(NameRef::new(base))
                    .map(|(k, _)| (k.as_ptr() as usize, true, &self.backbone)),
                None => fields
                    .get_key_value(NameRef::new(&name))
                    .map(|(k, t)| (k.as_ptr() as usize, false, t)),
            };
            let Some((ptr, sunder, treatment)) = found else {
                continue;
            };
            let slot = (ptr, sunder);
            if let Some(earlier) = stack[base..].iter_mut().find(|e| e.slot == slot) {
                earlier.value = value;
                continue;
            }
            stack.push(Entry {
                key,
                value,
                treatment,
                slot,
                marked: false,
                extension: name == "extension",
            });
        }
        let mut kept = base;
        for i in base..stack.len() {
            if doc.token(stack[i].value).kind != Kind::Null {
                stack[kept] = stack[i];
                kept += 1;
            }
        }
        stack.truncate(kept);
    }

    /// Decides which masked markers this node gets: existing `_field` siblings are marked,
    /// missing ones appended; an Epic custom code marks the node itself. Returns the keys to
    /// append and whether the node's own `extension` list needs the marker.
    fn plan_markers(
        &self,
        doc: &Doc<'_>,
        entries: &mut [Entry<'_>],
        epic: Option<EpicVerdict>,
        marked: bool,
    ) -> (Vec<Appended>, bool) {
        let mut appended = Vec::new();
        let mut needs_marker = marked;
        for i in 0..entries.len() {
            let entry = &entries[i];
            if entry.slot.1 {
                continue;
            }
            if self.masks(doc, entry) {
                let sunder = (entry.slot.0, true);
                match entries.iter_mut().find(|e| e.slot == sunder) {
                    Some(s) if doc.token(s.value).kind == Kind::Object => s.marked = true,
                    Some(_) => {}
                    None => appended.push(Appended::Sunder(entries[i].key)),
                }
            } else if let (Some(epic), Treatment::Coded(_)) = (epic, entry.treatment) {
                let has_items = doc.token(entry.value).kind != Kind::Array
                    || doc.items(entry.value).next().is_some();
                if has_items && !epic.allows(&doc.str(entry.key)) {
                    needs_marker = true;
                }
            }
        }
        let has_extension_list = entries
            .iter()
            .any(|e| e.extension && doc.token(e.value).kind == Kind::Array);
        let has_extension = entries.iter().any(|e| e.extension);
        if needs_marker && !has_extension {
            appended.push(Appended::Extension);
            needs_marker = false;
        } else if !has_extension_list {
            needs_marker = false;
        }
        (appended, needs_marker)
    }

    /// Whether this field's value is dropped and replaced by the masked marker.
    fn masks(&self, doc: &Doc<'_>, entry: &Entry<'_>) -> bool {
        let masked = match entry.treatment {
            Treatment::Mask => true,
            Treatment::MaskNote => self.mask_notes,
            _ => false,
        };
        if !masked {
            return false;
        }
        let maskable = |i: usize| match doc.token(i).kind {
            Kind::String => !python_strip(&doc.str(i)).is_empty(),
            _ => true,
        };
        match doc.token(entry.value).kind {
            Kind::Array => doc.items(entry.value).any(maskable),
            _ => maskable(entry.value),
        }
    }

    /// For a coding in an Epic custom-code system, which of code and display may be kept.
    fn epic_verdict(
        &self,
        doc: &Doc<'_>,
        node: usize,
        entries: &[Entry<'_>],
    ) -> Option<EpicVerdict> {
        if !entries
            .iter()
            .any(|e| matches!(e.treatment, Treatment::Coded(_)))
        {
            return None;
        }
        let system = doc.get_str(node, "system")?;
        if !python_strip(&system).starts_with(EPIC_CUSTOM_SYSTEM_PREFIX) {
            return None;
        }
        let code = doc.get(node, "code").filter(|&v| doc.is_truthy(v));
        let display = doc.get(node, "display").filter(|&v| doc.is_truthy(v));
        let (code_ok, display_ok) = match code {
            None => (true, display.is_none()),
            Some(c) if doc.token(c).kind == Kind::String => {
                let text = doc.str(c);
                if text == "0" && display.is_some() {
                    (true, false)
                } else if python_strip(&text).parse::<i64>().is_err() {
                    (false, false)
                } else {
                    (true, true)
                }
            }
            Some(c) if doc.token(c).kind == Kind::Number => (true, true),
            Some(_) => (false, false),
        };
        Some(EpicVerdict {
            code_ok,
            display_ok,
        })
    }

    /// Writes one value (a field's value or one list item) under `treatment`.
    fn value<'s>(
        &'s self,
        doc: &Doc<'_>,
        ctx: &ValueCtx<'_>,
        treatment: &'s Treatment,
        item: usize,
        out: &mut Vec<u8>,
        pass: &mut Pass<'_, 's>,
    ) -> Result<(), Skip> {
        let token = doc.token(item);
        let is_node = token.kind == Kind::Object;
        if treatment.is_leaf() == is_node {
            return Err(mismatch(ctx.key).into());
        }
        if !treatment.is_leaf() {
            return match treatment {
                Treatment::Resource => {
                    // Contained resources: their types are recorded by reading the row.
                    pass.novel = true;
                    self.resource(doc, item, false, None, out, pass)
                }
                Treatment::Nested {
                    type_name,
                    table,
                    filter,
                } => {
                    let fields = self.rules.table(*table);
                    let mut inside = ctx.inside_extension;
                    if type_name.as_ref() == "Extension" && !ctx.inside_extension {
                        self.check_extension(doc, ctx.rtype, ctx.key, item, pass.report)?;
                        inside = true;
                    }
                    let frame = Frame {
                        inside_extension: inside,
                        marked: ctx.marked,
                        top: false,
                        shape: ctx.shape,
                    };
                    self.node(
                        doc,
                        item,
                        ctx.rtype,
                        fields,
                        filter.as_ref(),
                        frame,
                        out,
                        pass,
                    )
                }
                _ => Err(mismatch(ctx.key).into()),
            };
        }
        let mut treatment = treatment;
        if let Treatment::Coded(inner) = treatment {
            if ctx.epic.is_some_and(|e| !e.allows(ctx.key)) {
                return Err(Skip::Value);
            }
            treatment = inner;
        }
        if token.kind == Kind::Array {
            // A list in a list, written as it is: its objects' keys are not followed.
            pass.novel = true;
        }
        let text = (token.kind == Kind::String).then(|| doc.str(item));
        let trimmed = text.as_deref().map(python_strip);
        if trimmed == Some("") {
            return Err(Skip::Value);
        }
        let transformed = matches!(
            treatment,
            Treatment::AnonId | Treatment::AnonRef | Treatment::Year | Treatment::Zip
        );
        if transformed && token.lone_surrogate {
            return Err(Rejection::UnpairedSurrogate(ctx.key.to_string()).into());
        }
        let need_str = || trimmed.ok_or_else(|| Skip::from(mismatch(ctx.key)));
        match treatment {
            Treatment::Keep | Treatment::FreeText => write_kept(doc, item, trimmed, out),
            Treatment::Mask => return Err(Skip::Value),
            Treatment::MaskNote if self.mask_notes => return Err(Skip::Value),
            Treatment::MaskNote => write_kept(doc, item, trimmed, out),
            Treatment::AnonId => {
                let real = need_str()?;
                let is_resource_id = ctx.top && ctx.key == "id";
                pass.has_id |= is_resource_id;
                let id = match is_resource_id {
                    true => &mut pass.ids.0,
                    false => &mut pass.ids.1,
                };
                id.clear();
                self.codebook.push_fake_id(ctx.rtype, real, true, id);
                write_str(out, id);
            }
            Treatment::AnonRef => self.write_anon_ref(doc, ctx, text.as_deref(), out)?,
            Treatment::Year => {
                let year: String = need_str()?.chars().take(4).collect();
                write_str(out, &year);
            }
            Treatment::Zip => write_str(out, &generalize_zip(need_str()?)),
            Treatment::Coded(_) | Treatment::Nested { .. } | Treatment::Resource => {
                return Err(mismatch(ctx.key).into());
            }
        }
        Ok(())
    }

    /// Only the outermost extension of a chain is checked against the URL lists.
    fn check_extension(
        &self,
        doc: &Doc<'_>,
        rtype: &str,
        key: &str,
        ext: usize,
        report: &mut ExtensionReport,
    ) -> Result<(), Skip> {
        let url = doc.get_str(ext, "url").unwrap_or_default();
        let count_key = || (rtype.to_string(), url.to_string());
        if key == "modifierExtension" {
            if !self
                .rules
                .allowed_modifier_extensions
                .contains(url.as_ref())
            {
                *report.skipped_modifiers.entry(count_key()).or_default() += 1;
                return Err(Rejection::UnknownModifierExtension(url.to_string()).into());
            }
        } else if !self.rules.allowed_extensions.contains(url.as_ref()) {
            if !self.rules.ignored_extensions.contains(url.as_ref()) {
                *report.dropped.entry(count_key()).or_default() += 1;
            }
            return Err(Skip::Value);
        }
        Ok(())
    }

    /// Writes the anonymous form of a reference: `Type/id`, `Type?query`, `#contained`, or a
    /// bare id with a sibling `type`.
    fn write_anon_ref(
        &self,
        doc: &Doc<'_>,
        ctx: &ValueCtx<'_>,
        raw: Option<&str>,
        out: &mut Vec<u8>,
    ) -> Result<(), Skip> {
        let bad = || Skip::Resource(Rejection::BadReference(ctx.key.to_string()));
        let reference = raw.ok_or_else(bad)?;
        if let Some(contained) = reference.strip_prefix('#') {
            if contained.is_empty() {
                return Err(bad());
            }
            write_str_parts(out, &["#", &self.codebook.hash(contained)]);
            return Ok(());
        }
        let sibling_type = doc.get_str(ctx.node, "type");
        let sibling_type = sibling_type
            .as_deref()
            .map(python_strip)
            .filter(|t| !t.is_empty());
        if !is_relative_reference(reference) && sibling_type.is_none() {
            return Err(bad());
        }
        let (ref_type, real_id) = match reference.find(['/', '?']) {
            Some(at) => (Some(&reference[..at]), &reference[at + 1..]),
            None => (sibling_type, reference),
        };
        let (prefix, real_id) = match real_id.strip_prefix('#') {
            Some(rest) => ("#", rest),
            None => ("", real_id),
        };
        if real_id.is_empty() {
            return Err(bad());
        }
        match ref_type {
            Some(t) => self.codebook.with_fake_ref_id(t, real_id, |fake| {
                write_str_parts(out, &[t, "/", prefix, fake]);
            }),
            None => write_str_parts(out, &[prefix, &self.codebook.hash(real_id)]),
        }
        Ok(())
    }
}

/// Where a node sits: what its writing needs from the levels above.
#[derive(Clone, Copy)]
struct Frame<'k> {
    inside_extension: bool,
    /// Its `extension` list must carry the masked marker.
    marked: bool,
    /// It is the resource itself (whose id is kept).
    top: bool,
    /// The known shape at this node (None once a novel key was written, or if not tracked).
    shape: Option<&'k Shape>,
}

impl Pass<'_, '_> {
    /// The known shape under `key` of a known `shape` (None once the row is novel).
    fn known_child<'k>(&self, shape: Option<&'k Shape>, key: &str) -> Option<&'k Shape> {
        if self.novel {
            return None;
        }
        shape?.children.get(NameRef::new(key))
    }

    /// A key kept under a known `parent` that lacks it (`child` is None) makes the row novel.
    /// Keys of values dropped later do not count; under an unknown parent, the parent's own
    /// key decides.
    fn note_kept(&mut self, parent: Option<&Shape>, child: Option<&Shape>) {
        if parent.is_some() && child.is_none() {
            self.novel = true;
        }
    }

    /// Notes the masked marker's keys, kept under an `extension` list.
    fn note_marker(&mut self, extension: Option<&Shape>) {
        for key in ["url", "valueCode"] {
            let child = self.known_child(extension, key);
            self.note_kept(extension, child);
        }
    }

    /// Notes a key kept under `parent` and returns its known shape.
    fn note_key<'k>(&mut self, parent: Option<&'k Shape>, key: &str) -> Option<&'k Shape> {
        let child = self.known_child(parent, key);
        self.note_kept(parent, child);
        child
    }
}

/// What a value's treatment needs to know about where it sits.
struct ValueCtx<'k> {
    rtype: &'k str,
    /// The object holding the field (for sibling lookups).
    node: usize,
    key: &'k str,
    inside_extension: bool,
    /// The value (an object) must carry the masked marker.
    marked: bool,
    epic: Option<EpicVerdict>,
    /// The field belongs to the resource itself.
    top: bool,
    /// The known shape under the field's key.
    shape: Option<&'k Shape>,
}

/// Epic lets sites add free-text codes to its own code systems; such codes or displays can carry
/// PHI. Which of the coding's `code` and `display` may stay.
#[derive(Clone, Copy)]
struct EpicVerdict {
    code_ok: bool,
    display_ok: bool,
}

impl EpicVerdict {
    fn allows(self, key: &str) -> bool {
        match key {
            "code" => self.code_ok,
            "display" => self.display_ok,
            _ => true,
        }
    }
}

fn mismatch(key: &str) -> Rejection {
    Rejection::StructureMismatch(key.to_string())
}

/// Whether an extension list already holds a data-absent-reason extension.
fn has_masked_marker(doc: &Doc<'_>, list: usize) -> bool {
    doc.items(list).any(|item| {
        doc.token(item).kind == Kind::Object
            && doc.get_str(item, "url").as_deref() == Some(DATA_ABSENT_URL)
    })
}

/// Writes `"key":`.
fn write_key(doc: &Doc<'_>, key: usize, out: &mut Vec<u8>) {
    if doc.token(key).plain {
        push_quoted(out, doc.raw(key), Some(b':'));
    } else {
        write_string(doc, key, out);
        out.push(b':');
    }
}

/// Writes a string or key token as it is (Python's form, lone surrogates included).
fn write_string(doc: &Doc<'_>, i: usize, out: &mut Vec<u8>) {
    let token = doc.token(i);
    if token.plain {
        push_quoted(out, doc.raw(i), None);
    } else if token.lone_surrogate {
        write_units(out, &doc.units(i));
    } else {
        write_str(out, &doc.str(i));
    }
}

/// Writes a key's text escaped but without quotes (to build `_key`).
fn write_key_text(doc: &Doc<'_>, key: usize, out: &mut Vec<u8>) {
    if doc.token(key).plain {
        out.extend_from_slice(doc.raw(key));
    } else if doc.token(key).lone_surrogate {
        write_units_unquoted(out, &doc.units(key));
    } else {
        let mut quoted = Vec::new();
        write_str(&mut quoted, &doc.str(key));
        out.extend_from_slice(&quoted[1..quoted.len() - 1]);
    }
}

/// Writes a kept primitive: strings trimmed, other values as serde_json would print them.
fn write_kept(doc: &Doc<'_>, item: usize, trimmed: Option<&str>, out: &mut Vec<u8>) {
    let token = doc.token(item);
    match (token.kind, trimmed) {
        (Kind::String, Some(t)) if token.plain && t.len() == doc.raw(item).len() => {
            push_quoted(out, doc.raw(item), None)
        }
        (Kind::String, _) if token.lone_surrogate => {
            write_units(out, strip_units(&doc.units(item)))
        }
        (Kind::String, Some(t)) => write_str(out, t),
        _ => write_verbatim(doc, item, out),
    }
}

/// Writes any value unchanged in meaning, in serde_json's compact form (nested lists kept by a
/// `keep` rule, numbers, literals).
fn write_verbatim(doc: &Doc<'_>, i: usize, out: &mut Vec<u8>) {
    let token = doc.token(i);
    match token.kind {
        Kind::Object => {
            out.push(b'{');
            for (n, (k, v)) in doc.entries(i).enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_key(doc, k, out);
                write_verbatim(doc, v, out);
            }
            out.push(b'}');
        }
        Kind::Array => {
            out.push(b'[');
            for (n, item) in doc.items(i).enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                write_verbatim(doc, item, out);
            }
            out.push(b']');
        }
        Kind::String | Kind::Key => write_string(doc, i, out),
        Kind::Number if token.plain => out.extend_from_slice(doc.raw(i)),
        // Python reads `-0` as the integer 0 (serde_json as the float -0.0).
        Kind::Number if doc.raw(i) == b"-0" => out.push(b'0'),
        Kind::Number => match serde_json::from_slice::<serde_json::Number>(doc.raw(i)) {
            Ok(number) => write_compact_ascii(out, &number),
            // The tape refuses what serde_json refuses; written as read if that ever changes.
            Err(_) => out.extend_from_slice(doc.raw(i)),
        },
        Kind::True | Kind::False | Kind::Null => out.extend_from_slice(doc.raw(i)),
    }
}

/// Matches `[A-Za-z]+[/?].+` at the start of the string.
fn is_relative_reference(s: &str) -> bool {
    let letters = s.bytes().take_while(u8::is_ascii_alphabetic).count();
    letters > 0 && matches!(s.as_bytes().get(letters), Some(b'/' | b'?')) && s.len() > letters + 1
}

/// Three-digit zip: restricted low-population prefixes become 000, later digits become 0.
pub fn generalize_zip(zip: &str) -> String {
    let first: String = zip.chars().take(3).collect();
    let rest = zip
        .chars()
        .skip(3)
        .map(|c| if ('1'..='9').contains(&c) { '0' } else { c });
    let prefix = if RESTRICTED_ZIP_PREFIXES.contains(&first.as_str()) {
        "000".to_string()
    } else {
        first
    };
    prefix.chars().chain(rest).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::json::Tape;
    use serde_json::{Value, json};

    fn scrubber() -> Scrubber {
        let cb = Arc::new(Codebook::in_memory("1234").unwrap());
        Scrubber::new(Rules::embedded().unwrap(), cb, true)
    }

    /// Scrubs `resource`, returning the output as a value and the resource id.
    fn scrub(s: &Scrubber, resource: &Value) -> Result<(Value, Option<String>), Rejection> {
        let text = resource.to_string();
        let mut tape = Tape::default();
        let doc = tape.parse(text.as_bytes()).unwrap();
        let mut out = b"prefix".to_vec();
        let mut report = ExtensionReport::default();
        let result = s.scrub(&doc, &mut out, &mut report);
        if result.is_err() {
            assert_eq!(out, b"prefix", "a rejection leaves the output as it was");
        }
        let id = result?;
        Ok((serde_json::from_slice(&out[6..]).unwrap(), id))
    }

    #[test]
    fn numbers_are_written_as_python_writes_them_integers_of_any_size_exactly() {
        // Each input number, and how Python's json.dumps(json.loads(...)) writes it back.
        let cases = [
            ("123456789012345678901234", "123456789012345678901234"),
            ("-123456789012345678901230", "-123456789012345678901230"),
            ("18446744073709551616", "18446744073709551616"),
            ("-9223372036854775809", "-9223372036854775809"),
            ("-10", "-10"),
            ("-0", "0"),
            ("-0.0", "-0.0"),
            ("1.5E+3", "1500.0"),
            ("1e2", "100.0"),
            ("12345678901234567890123456789.0", "1.2345678901234568e+28"),
        ];
        let s = scrubber();
        for (input, python) in cases {
            let line = format!(
                r#"{{"resourceType":"Observation","id":"o","valueQuantity":{{"value":{input}}}}}"#
            );
            let mut tape = Tape::default();
            let doc = tape.parse(line.as_bytes()).unwrap();
            let mut out = Vec::new();
            s.scrub(&doc, &mut out, &mut ExtensionReport::default())
                .unwrap();
            let text = String::from_utf8(out).unwrap();
            let expected = format!(r#""valueQuantity":{{"value":{python}}}"#);
            assert!(text.contains(&expected), "{input}: {text}");
        }
    }

    #[test]
    fn zip_generalization_matches_reference_examples() {
        assert_eq!(generalize_zip("02139"), "02100");
        assert_eq!(generalize_zip("69212"), "00000");
        assert_eq!(generalize_zip("9991 Båtsfjord"), "9990 Båtsfjord");
        assert_eq!(generalize_zip("9105 PZ"), "9100 PZ");
        assert_eq!(generalize_zip("3999"), "3990");
    }

    #[test]
    fn references_are_rewritten_or_rejected() {
        let s = scrubber();
        let (ok, id) = scrub(
            &s,
            &json!({"resourceType": "Condition", "id": "c",
                "subject": {"reference": "Patient?identifier=x"},
                "encounter": {"reference": "123", "type": "Encounter"}}),
        )
        .unwrap();
        let cb = s.codebook();
        assert_eq!(id.unwrap(), cb.fake_id("Condition", "c", true));
        assert_eq!(
            ok["subject"]["reference"],
            format!("Patient/{}", cb.hash("identifier=x"))
        );
        assert_eq!(
            ok["encounter"]["reference"],
            format!("Encounter/{}", cb.hash("123"))
        );
        for bad in ["http://x.org/Patient/1", "1234"] {
            let v = json!({"resourceType": "Condition", "id": "c", "subject": {"reference": bad}});
            assert!(
                matches!(scrub(&s, &v), Err(Rejection::BadReference(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn unknown_modifier_extension_rejects_and_counts() {
        let s = scrubber();
        let text = json!({"resourceType": "Patient", "id": "p",
            "modifierExtension": [{"url": "http://example.com/weird", "valueBoolean": true}]})
        .to_string();
        let mut tape = Tape::default();
        let mut report = ExtensionReport::default();
        let err = s
            .scrub(
                &tape.parse(text.as_bytes()).unwrap(),
                &mut Vec::new(),
                &mut report,
            )
            .unwrap_err();
        assert_eq!(
            err,
            Rejection::UnknownModifierExtension("http://example.com/weird".into())
        );
        assert_eq!(
            report.skipped_modifiers[&("Patient".into(), "http://example.com/weird".into())],
            1
        );
    }

    #[test]
    fn epic_custom_codes_are_masked_on_the_coding() {
        let s = scrubber();
        let (v, _) = scrub(
            &s,
            &json!({"resourceType": "Encounter", "id": "e", "class":
                {"system": "urn:oid:1.2.840.114350.1", "code": "Dr. Smith", "display": "Dr. Smith"}}),
        )
        .unwrap();
        assert_eq!(
            v["class"],
            json!({"system": "urn:oid:1.2.840.114350.1", "extension":
            [{"url": DATA_ABSENT_URL, "valueCode": "masked"}]})
        );
    }

    #[test]
    fn masked_fields_leave_one_marker_in_their_sunder_sibling() {
        let s = scrubber();
        let (v, _) = scrub(
            &s,
            &json!({"resourceType": "DocumentReference", "id": "d", "content": [
                {"attachment": {"_data": {"extension": [{"url": DATA_ABSENT_URL, "valueCode": "masked"}]}, "data": "c2VjcmV0"}},
                {"attachment": {"url": "http://notes/1", "contentType": "text/plain"}}]}),
        )
        .unwrap();
        let marker = json!([{"url": DATA_ABSENT_URL, "valueCode": "masked"}]);
        assert_eq!(
            v["content"][0]["attachment"],
            json!({"_data": {"extension": marker}})
        );
        assert_eq!(
            v["content"][1]["attachment"],
            json!({"contentType": "text/plain", "_url": {"extension": marker}})
        );
    }

    #[test]
    fn the_resource_id_is_its_own_when_other_ids_are_anonymized_and_scratch_is_reused() {
        let s = scrubber();
        let url = "http://hl7.org/fhir/StructureDefinition/patient-proficiency";
        let mut scratch = ScrubScratch::default();
        let mut tape = Tape::default();
        for (n, resource) in [
            json!({"resourceType": "Observation", "id": "o1",
                   "extension": [{"url": url, "valueId": "other"}]}),
            json!({"resourceType": "Observation",
                   "extension": [{"url": url, "valueId": "other2"}], "id": "o2"}),
            json!({"resourceType": "Observation", "status": "final"}),
        ]
        .iter()
        .enumerate()
        {
            let text = resource.to_string();
            let doc = tape.parse(text.as_bytes()).unwrap();
            let mut out = Vec::new();
            let report = &mut ExtensionReport::default();
            let scrubbed = s
                .scrub_within(&doc, &mut out, report, None, &mut scratch)
                .unwrap();
            let written: Value = serde_json::from_slice(&out).unwrap();
            let id = scrubbed.id.map(str::to_string);
            let (alone, alone_id) = scrub(&s, resource).unwrap();
            assert_eq!((&written, &id), (&alone, &alone_id), "resource {n}");
            match n {
                2 => assert_eq!(id, None, "no id, none from the line before"),
                _ => {
                    assert_eq!(written["id"].as_str(), id.as_deref());
                    let other = written["extension"][0]["valueId"].as_str().unwrap();
                    assert_ne!(Some(other), id.as_deref());
                }
            }
        }
    }

    #[test]
    fn rows_whose_keys_the_shape_has_are_not_novel() {
        let s = scrubber();
        let mut tape = Tape::default();
        let mut known = Shape::default();
        let mut novel = |text: &str, known: &mut Shape| {
            let mut out = Vec::new();
            let doc = tape.parse(text.as_bytes()).unwrap();
            let mut scratch = ScrubScratch::default();
            let scrubbed = s
                .scrub_within(
                    &doc,
                    &mut out,
                    &mut ExtensionReport::default(),
                    Some(known),
                    &mut scratch,
                )
                .unwrap();
            assert!(known.add_compact_row(&out));
            scrubbed.novel
        };
        let plain =
            r#"{"resourceType":"Observation","id":"a","status":"final","code":{"text":"x"}}"#;
        let masked =
            r#"{"resourceType":"Observation","id":"b","status":"final","valueString":"secret"}"#;
        assert!(novel(plain, &mut known));
        assert!(!novel(plain, &mut known));
        // Its `_valueString` marker is new, then known.
        assert!(novel(masked, &mut known));
        assert!(!novel(masked, &mut known));
        assert!(!novel(plain, &mut known));
        // Without a known shape every row is novel.
        let mut out = Vec::new();
        let doc = tape.parse(plain.as_bytes()).unwrap();
        let scratch = &mut ScrubScratch::default();
        let scrubbed = s.scrub_within(
            &doc,
            &mut out,
            &mut ExtensionReport::default(),
            None,
            scratch,
        );
        assert!(scrubbed.unwrap().novel);
    }

    #[test]
    fn duplicate_keys_keep_the_last_value_in_the_first_place() {
        let s = scrubber();
        let text = br#"{"resourceType":"Patient","gender":"male","id":"p","gender":"female"}"#;
        let mut tape = Tape::default();
        let mut out = Vec::new();
        s.scrub(
            &tape.parse(text).unwrap(),
            &mut out,
            &mut ExtensionReport::default(),
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(
            out.starts_with(r#"{"resourceType":"Patient","gender":"female","id":""#),
            "{out}"
        );
    }

    #[test]
    fn values_are_copied_in_serde_json_form() {
        let s = scrubber();
        let text = r#"{"resourceType":"Observation","id":"o","status":" final ","valueQuantity":{"value":1.50,"comparator":"\u003c","unit":"B\u00e5t"},"valueInteger":-0}"#;
        let mut tape = Tape::default();
        let mut out = Vec::new();
        s.scrub(
            &tape.parse(text.as_bytes()).unwrap(),
            &mut out,
            &mut ExtensionReport::default(),
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.contains(r#""status":"final""#), "{out}");
        assert!(
            out.contains(r#""valueQuantity":{"value":1.5,"comparator":"<","unit":"B\u00e5t"}"#),
            "{out}"
        );
        // Python reads `-0` as the integer 0 (serde_json alone would write -0.0).
        assert!(out.contains(r#""valueInteger":0}"#), "{out}");
    }

    #[test]
    fn empty_containers_and_nulls_are_removed() {
        let s = scrubber();
        let (v, _) = scrub(
            &s,
            &json!({"resourceType": "Patient", "id": "p", "active": null,
                "maritalStatus": {"text": "  "}, "address": [{"city": "Boston"}]}),
        )
        .unwrap();
        assert_eq!(
            v.as_object().unwrap().keys().collect::<Vec<_>>(),
            ["resourceType", "id"]
        );
    }
}
