//! Arrow columns built straight from JSON rows: each row's values are appended to one builder
//! per schema field as the row's bytes are walked (or, for rows the walker does not take, from
//! the row's token tape). Decoding the rows with a general JSON reader cost about a quarter of a
//! Parquet or Delta run.
//!
//! The rules are arrow-json's (non-strict): unknown keys are ignored, a missing key or `null` is
//! a null, a struct's children are null where the struct is, integers may come as whole-valued
//! floats or numeric strings, and any other type mismatch fails the batch, naming the field.

use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow::array::builder::NullBufferBuilder;
use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, Float32Builder, Float64Builder, Int8Builder,
    Int32Builder, ListArray, StringBuilder, StructArray,
};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, FieldRef, Fields, Schema};
use arrow::record_batch::RecordBatch;

use crate::fast_hash::FastMap;
use crate::json::compact::{Cursor, NotCompact, Step};
use crate::json::{Doc, Kind, Tape};

/// Rows decoded into a record batch, and those left out because they do not fit the schema.
pub struct Decoded {
    pub batch: RecordBatch,
    /// In row order; the batch holds the other rows, in their order.
    pub unfit: Vec<Unfit>,
}

/// A row that does not fit the schema (a value of another type than its column's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfit {
    /// Its index among the rows given.
    pub index: usize,
    /// The field and the mismatch (no values).
    pub reason: String,
}

/// Decodes compact JSON rows (one object each) into one record batch of `schema`. The rows are
/// read straight from their bytes; a slice with anything the byte walker does not take (a type
/// mismatch, whitespace, a repeated key, malformed JSON) is read again through the token tape,
/// which gives the same columns or the precise error. Rows that do not fit (found, only when the
/// slice fails, by halving the parts that fail) are left out and listed, so one damaged input
/// line costs its own row, not its batch.
pub fn rows_to_record_batch(schema: Arc<Schema>, rows: &[&[u8]]) -> Result<Decoded> {
    if let Some(batch) = walk_rows(schema.clone(), rows) {
        return Ok(Decoded {
            batch,
            unfit: Vec::new(),
        });
    }
    let error = match tape_rows(schema.clone(), rows) {
        Ok(batch) => {
            return Ok(Decoded {
                batch,
                unfit: Vec::new(),
            });
        }
        Err(e) => e,
    };
    let mut fit = Vec::with_capacity(rows.len());
    let mut unfit = Vec::new();
    sort_fit_rows(&schema, rows, 0, &mut fit, &mut unfit);
    if unfit.is_empty() {
        // The rows fit in parts but not together: not a row's fault.
        return Err(error);
    }
    let batch = tape_rows(schema, &fit)?;
    Ok(Decoded { batch, unfit })
}

/// Splits `rows` (the `offset`th on) into those that fit the schema and those that do not, by
/// halving the parts that fail: a slice with one bad row costs about two decodes of it, not
/// one per row.
fn sort_fit_rows<'r>(
    schema: &Arc<Schema>,
    rows: &[&'r [u8]],
    offset: usize,
    fit: &mut Vec<&'r [u8]>,
    unfit: &mut Vec<Unfit>,
) {
    match tape_rows(schema.clone(), rows) {
        Ok(_) => fit.extend_from_slice(rows),
        Err(e) if rows.len() == 1 => unfit.push(Unfit {
            index: offset,
            // "row 1: field 'x': ..." of a one-row decode: the row's place is the index.
            reason: format!("{e:#}").trim_start_matches("row 1: ").to_string(),
        }),
        Err(_) => {
            let (left, right) = rows.split_at(rows.len() / 2);
            sort_fit_rows(schema, left, offset, fit, unfit);
            sort_fit_rows(schema, right, offset + left.len(), fit, unfit);
        }
    }
}

/// The byte walker over every row, or None where it gives up.
fn walk_rows(schema: Arc<Schema>, rows: &[&[u8]]) -> Option<RecordBatch> {
    let mut columns = StructColumns::new(schema.fields().clone(), rows.len());
    for row in rows {
        let mut walker = Cursor::new(row);
        columns.walk_entries(&mut walker).ok()?;
        if !walker.at_end() {
            return None;
        }
    }
    let children = columns.finish_children();
    let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.len()));
    RecordBatch::try_new_with_options(schema, children, &options).ok()
}

/// Each row tokenized into a tape, then appended.
fn tape_rows(schema: Arc<Schema>, rows: &[&[u8]]) -> Result<RecordBatch> {
    let mut columns = StructColumns::new(schema.fields().clone(), rows.len());
    let mut tape = Tape::default();
    for (n, row) in rows.iter().enumerate() {
        let doc = tape
            .parse(row)
            .map_err(|_| anyhow!("row {} is not valid JSON", n + 1))?;
        if doc.token(0).kind != Kind::Object {
            bail!("row {} is not a JSON object", n + 1);
        }
        columns
            .append_entries(&doc, 0)
            .with_context(|| format!("row {}", n + 1))?;
    }
    let children = columns.finish_children();
    let options = arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows.len()));
    Ok(RecordBatch::try_new_with_options(
        schema, children, &options,
    )?)
}

/// A builder for one column of any type the Cumulus schemas use.
enum Column {
    Utf8(StringBuilder),
    Int8(Int8Builder),
    Int32(Int32Builder),
    /// An NLP answer's `float` fields (as upstream's tables type them).
    Float32(Float32Builder),
    Float64(Float64Builder),
    Boolean(BooleanBuilder),
    Struct(StructColumns),
    List(Box<ListColumn>),
}

impl Column {
    /// Value buffers start small and grow: a wide schema has hundreds of mostly empty columns,
    /// and reserving a batch's row count in each would cost more than the rows themselves.
    /// `capacity` only sizes the (lazily allocated) null bitmaps.
    fn new(data_type: &DataType, capacity: usize) -> Column {
        match data_type {
            DataType::Utf8 => Column::Utf8(StringBuilder::new()),
            DataType::Int8 => Column::Int8(Int8Builder::new()),
            DataType::Int32 => Column::Int32(Int32Builder::new()),
            DataType::Float32 => Column::Float32(Float32Builder::new()),
            DataType::Float64 => Column::Float64(Float64Builder::new()),
            DataType::Boolean => Column::Boolean(BooleanBuilder::new()),
            DataType::Struct(fields) => {
                Column::Struct(StructColumns::new(fields.clone(), capacity))
            }
            DataType::List(item) => Column::List(Box::new(ListColumn::new(item.clone(), capacity))),
            other => unreachable!("the Cumulus schemas have no {other} columns"),
        }
    }

    /// Appends the value at token `i`.
    fn append(&mut self, doc: &Doc<'_>, i: usize) -> Result<()> {
        let token = doc.token(i);
        if token.kind == Kind::Null {
            self.append_null();
            return Ok(());
        }
        match (self, token.kind) {
            (Column::Utf8(b), Kind::String) => b.append_value(doc.str(i)),
            (Column::Int8(b), Kind::Number | Kind::String) => {
                b.append_value(parse_int(doc, i, i8::MIN.into(), i8::MAX.into())? as i8)
            }
            (Column::Int32(b), Kind::Number | Kind::String) => {
                b.append_value(parse_int(doc, i, i32::MIN.into(), i32::MAX.into())? as i32)
            }
            (Column::Float32(b), Kind::Number | Kind::String) => {
                b.append_value(parse_float(doc, i)? as f32)
            }
            (Column::Float64(b), Kind::Number | Kind::String) => {
                b.append_value(parse_float(doc, i)?)
            }
            (Column::Boolean(b), Kind::True | Kind::False) => {
                b.append_value(token.kind == Kind::True)
            }
            (Column::Struct(s), Kind::Object) => {
                s.nulls.append_non_null();
                s.append_entries(doc, i)?;
            }
            (Column::List(l), Kind::Array) => {
                for item in doc.items(i) {
                    l.item.append(doc, item)?;
                }
                l.close(true)?;
            }
            (column, found) => bail!("expected {}, found {}", column.expects(), describe(found)),
        }
        Ok(())
    }

    /// Appends the value the cursor is at (the byte walker).
    fn walk(&mut self, w: &mut Cursor<'_>) -> Step<()> {
        match w.peek()? {
            b'n' => {
                w.literal(b"null")?;
                self.append_null();
            }
            b'"' => {
                let text = w.string()?;
                match self {
                    Column::Utf8(b) => b.append_value(&text),
                    numeric => numeric.append_number(&text)?,
                }
            }
            c @ (b't' | b'f') => {
                let value = c == b't';
                w.literal(if value { b"true" } else { b"false" })?;
                match self {
                    Column::Boolean(b) => b.append_value(value),
                    _ => return Err(NotCompact),
                }
            }
            b'{' => match self {
                Column::Struct(s) => {
                    s.nulls.append_non_null();
                    s.walk_entries(w)?;
                }
                _ => return Err(NotCompact),
            },
            b'[' => match self {
                Column::List(l) => {
                    w.pos += 1;
                    if w.peek()? == b']' {
                        w.pos += 1;
                    } else {
                        loop {
                            l.item.walk(w)?;
                            if w.end_or_next(b']')? {
                                break;
                            }
                        }
                    }
                    l.close(true).map_err(|_| NotCompact)?;
                }
                _ => return Err(NotCompact),
            },
            _ => {
                let text = w.number()?;
                self.append_number(text)?;
            }
        }
        Ok(())
    }

    /// Appends a number given as text (a JSON number, or a numeric string) to a numeric column.
    fn append_number(&mut self, text: &str) -> Step<()> {
        match self {
            Column::Int8(b) => b.append_value(int_in(text, i8::MIN.into(), i8::MAX.into())? as i8),
            Column::Int32(b) => {
                b.append_value(int_in(text, i32::MIN.into(), i32::MAX.into())? as i32)
            }
            Column::Float32(b) => b.append_value(text.parse::<f32>().map_err(|_| NotCompact)?),
            Column::Float64(b) => b.append_value(text.parse::<f64>().map_err(|_| NotCompact)?),
            _ => return Err(NotCompact),
        }
        Ok(())
    }

    fn append_null(&mut self) {
        self.append_nulls(1);
    }

    /// Appends `n` nulls at once. A struct's children get theirs lazily (see `StructColumns`).
    fn append_nulls(&mut self, n: usize) {
        match self {
            Column::Utf8(b) => b.append_nulls(n),
            Column::Int8(b) => b.append_nulls(n),
            Column::Int32(b) => b.append_nulls(n),
            Column::Float32(b) => b.append_nulls(n),
            Column::Float64(b) => b.append_nulls(n),
            Column::Boolean(b) => b.append_nulls(n),
            Column::Struct(s) => {
                s.nulls.append_n_nulls(n);
                s.entries += n;
            }
            Column::List(l) => l.close_nulls(n).expect("empty lists always fit"),
        }
    }

    fn expects(&self) -> &'static str {
        match self {
            Column::Utf8(_) => "a string",
            Column::Int8(_) => "a small integer",
            Column::Int32(_) => "an integer",
            Column::Float32(_) | Column::Float64(_) => "a number",
            Column::Boolean(_) => "true or false",
            Column::Struct(_) => "an object",
            Column::List(_) => "a list",
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Column::Utf8(b) => Arc::new(b.finish()),
            Column::Int8(b) => Arc::new(b.finish()),
            Column::Int32(b) => Arc::new(b.finish()),
            Column::Float32(b) => Arc::new(b.finish()),
            Column::Float64(b) => Arc::new(b.finish()),
            Column::Boolean(b) => Arc::new(b.finish()),
            Column::Struct(s) => {
                let children = s.finish_children();
                Arc::new(StructArray::new(
                    s.fields.clone(),
                    children,
                    s.nulls.finish(),
                ))
            }
            Column::List(l) => {
                let offsets = std::mem::replace(&mut l.offsets, vec![0]);
                Arc::new(ListArray::new(
                    l.field.clone(),
                    OffsetBuffer::new(ScalarBuffer::from(offsets)),
                    l.item.finish(),
                    l.nulls.finish(),
                ))
            }
        }
    }
}

/// The children of a struct (or of the whole row), found by key.
struct StructColumns {
    fields: Fields,
    children: Vec<Column>,
    by_name: FastMap<String, usize>,
    /// Per child, the token of its value in the object being appended (`NONE`: absent).
    slots: Vec<usize>,
    /// Entries (objects and nulls) the struct has; each child is brought up to it lazily.
    entries: usize,
    /// Per child, the entries it has. A wide schema has hundreds of columns a row lacks, so
    /// their nulls are appended in runs when a value comes (or at the end), and an object costs
    /// only its own keys, not a pass over every column.
    filled: Vec<usize>,
    nulls: NullBufferBuilder,
    /// Per child, the `stamp` of the last object that had it (byte walker only).
    seen: Vec<u32>,
    /// Per child, the child whose key came next in the last object walked; the last place is
    /// for the first key (byte walker only). Rows of a table list their keys in much the same
    /// order, so the guess is compared in place and the key is rarely scanned and hashed.
    follows: Vec<usize>,
    /// Counts the objects walked.
    stamp: u32,
}

const NONE: usize = usize::MAX;

impl StructColumns {
    fn new(fields: Fields, capacity: usize) -> StructColumns {
        StructColumns {
            children: fields
                .iter()
                .map(|f| Column::new(f.data_type(), capacity))
                .collect(),
            by_name: fields
                .iter()
                .enumerate()
                .map(|(n, f)| (f.name().clone(), n))
                .collect(),
            slots: vec![NONE; fields.len()],
            entries: 0,
            filled: vec![0; fields.len()],
            nulls: NullBufferBuilder::new(capacity),
            seen: vec![0; fields.len()],
            follows: vec![NONE; fields.len() + 1],
            stamp: 0,
            fields,
        }
    }

    /// Appends the entries of the object at token `i` (its own null bit is the caller's).
    fn append_entries(&mut self, doc: &Doc<'_>, i: usize) -> Result<()> {
        // Rows list their keys in the schema's order more often than not: try the field after
        // the last one found before hashing the key.
        let mut next = 0;
        for (k, v) in doc.entries(i) {
            let key = doc.str(k);
            let found = match self.fields.get(next) {
                Some(f) if f.name() == key.as_ref() => Some(next),
                _ => self.by_name.get(key.as_ref()).copied(),
            };
            if let Some(n) = found {
                self.slots[n] = v;
                next = n + 1;
            }
        }
        for (n, child) in self.children.iter_mut().enumerate() {
            let slot = std::mem::replace(&mut self.slots[n], NONE);
            if slot == NONE {
                continue;
            }
            let owed = self.entries - self.filled[n];
            if owed > 0 {
                child.append_nulls(owed);
            }
            self.filled[n] = self.entries + 1;
            if let Err(e) = child.append(doc, slot) {
                self.slots.iter_mut().for_each(|s| *s = NONE);
                return Err(e.context(format!("field '{}'", self.fields[n].name())));
            }
        }
        self.entries += 1;
        Ok(())
    }

    /// Appends the entries of the object the walker is at (its own null bit is the caller's),
    /// as `append_entries` does from a tape.
    fn walk_entries(&mut self, w: &mut Cursor<'_>) -> Step<()> {
        w.eat(b'{')?;
        self.stamp = self.stamp.wrapping_add(1).max(1);
        let stamp = self.stamp;
        if w.peek()? == b'}' {
            w.pos += 1;
        } else {
            let mut previous = self.fields.len();
            loop {
                let guess = self.follows[previous];
                let found = match self.fields.get(guess) {
                    Some(f) if w.eat_key(f.name()) => Some(guess),
                    _ => {
                        let key = w.string()?;
                        w.eat(b':')?;
                        self.by_name.get(key.as_ref()).copied()
                    }
                };
                match found {
                    Some(n) => {
                        if self.seen[n] == stamp {
                            return Err(NotCompact); // a repeated key: the last one wins
                        }
                        self.seen[n] = stamp;
                        self.follows[previous] = n;
                        previous = n;
                        let owed = self.entries - self.filled[n];
                        if owed > 0 {
                            self.children[n].append_nulls(owed);
                        }
                        self.filled[n] = self.entries + 1;
                        self.children[n].walk(w)?;
                    }
                    None => w.skip_value()?,
                }
                if w.end_or_next(b'}')? {
                    break;
                }
            }
        }
        self.entries += 1;
        Ok(())
    }

    /// Appends the nulls still owed to each child, so every child has the struct's length.
    fn settle(&mut self) {
        for (child, filled) in self.children.iter_mut().zip(self.filled.iter_mut()) {
            let owed = self.entries - *filled;
            if owed > 0 {
                child.append_nulls(owed);
            }
            *filled = self.entries;
        }
    }

    fn finish_children(&mut self) -> Vec<ArrayRef> {
        self.settle();
        self.children.iter_mut().map(Column::finish).collect()
    }
}

/// A list column: item values, offsets and the list's own null bits.
struct ListColumn {
    field: FieldRef,
    item: Column,
    offsets: Vec<i32>,
    nulls: NullBufferBuilder,
}

impl ListColumn {
    fn new(field: FieldRef, capacity: usize) -> ListColumn {
        ListColumn {
            item: Column::new(field.data_type(), capacity),
            field,
            offsets: vec![0],
            nulls: NullBufferBuilder::new(capacity),
        }
    }

    /// Ends the current list at the items appended so far.
    fn close(&mut self, valid: bool) -> Result<()> {
        let len = i32::try_from(self.item.len()).map_err(|_| anyhow!("list too long"))?;
        self.offsets.push(len);
        self.nulls.append(valid);
        Ok(())
    }

    /// Appends `n` null lists.
    fn close_nulls(&mut self, n: usize) -> Result<()> {
        let len = i32::try_from(self.item.len()).map_err(|_| anyhow!("list too long"))?;
        self.offsets.extend(std::iter::repeat_n(len, n));
        self.nulls.append_n_nulls(n);
        Ok(())
    }
}

impl Column {
    fn len(&self) -> usize {
        match self {
            Column::Utf8(b) => b.len(),
            Column::Int8(b) => b.len(),
            Column::Int32(b) => b.len(),
            Column::Float32(b) => b.len(),
            Column::Float64(b) => b.len(),
            Column::Boolean(b) => b.len(),
            Column::Struct(s) => s.nulls.len(),
            Column::List(l) => l.offsets.len() - 1,
        }
    }
}

/// `parse_int` for the walker.
fn int_in(text: &str, min: i64, max: i64) -> Step<i64> {
    int_text(text, min, max).map_err(|_| NotCompact)
}

/// An integer in `[min, max]` as arrow-json reads one: exact, or a float in range truncated
/// toward zero.
fn parse_int(doc: &Doc<'_>, i: usize, min: i64, max: i64) -> Result<i64> {
    int_text(&doc.str(i), min, max)
}

fn int_text(text: &str, min: i64, max: i64) -> Result<i64> {
    match text.parse::<i64>() {
        Ok(n) if (min..=max).contains(&n) => return Ok(n),
        _ => {}
    }
    match text.parse::<f64>() {
        Ok(f) if f > min as f64 - 1.0 && f < max as f64 + 1.0 => Ok(f as i64),
        _ => bail!("cannot read {text:?} as an integer from {min} to {max}"),
    }
}

fn parse_float(doc: &Doc<'_>, i: usize) -> Result<f64> {
    let text = doc.str(i);
    text.parse::<f64>()
        .map_err(|_| anyhow!("cannot read {text:?} as a number"))
}

fn describe(kind: Kind) -> &'static str {
    match kind {
        Kind::Object => "an object",
        Kind::Array => "a list",
        Kind::String | Kind::Key => "a string",
        Kind::Number => "a number",
        Kind::True | Kind::False => "a boolean",
        Kind::Null => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::datatypes::Field;

    /// What arrow-json's reader makes of the same rows, the behaviour this module replaces.
    fn reference(schema: Arc<Schema>, rows: &[&[u8]]) -> RecordBatch {
        let mut decoder = arrow::json::ReaderBuilder::new(schema)
            .with_batch_size(rows.len())
            .build_decoder()
            .unwrap();
        for row in rows {
            decoder.decode(row).unwrap();
            decoder.decode(b"\n").unwrap();
        }
        decoder.flush().unwrap().unwrap()
    }

    fn schema() -> Arc<Schema> {
        let coding = DataType::Struct(
            vec![
                Field::new("system", DataType::Utf8, true),
                Field::new("code", DataType::Utf8, true),
            ]
            .into(),
        );
        let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
        Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, true),
            Field::new("count", DataType::Int32, true),
            Field::new("polarity", DataType::Int8, true),
            Field::new("value", DataType::Float64, true),
            Field::new("active", DataType::Boolean, true),
            Field::new(
                "code",
                DataType::Struct(
                    vec![
                        Field::new("coding", list(coding), true),
                        Field::new("text", DataType::Utf8, true),
                    ]
                    .into(),
                ),
                true,
            ),
            Field::new("names", list(DataType::Utf8), true),
        ]))
    }

    #[test]
    fn rows_decode_as_arrow_json_decodes_them() {
        let rows: Vec<&[u8]> = vec![
            br#"{"id":"a","count":3,"polarity":-1,"value":1.5,"active":true,"code":{"coding":[{"system":"s","code":"c"},{"code":"d"}],"text":"t"},"names":["x","y"]}"#,
            br#"{"names":[],"unknown":{"deep":[1,2]},"id":"b\u00e9\n","count":2.0,"value":"2.5"}"#,
            br#"{"code":null,"polarity":1.0,"active":false,"count":"7","value":1e3}"#,
            br#"{"code":{"text":"only"},"names":null,"id":null}"#,
            br#"{}"#,
        ];
        let ours = rows_to_record_batch(schema(), &rows).unwrap();
        assert!(ours.unfit.is_empty());
        assert_eq!(ours.batch, reference(schema(), &rows));
        assert_eq!(ours.batch.num_rows(), 5);
    }

    #[test]
    fn rows_that_do_not_fit_are_left_out_and_named_with_their_field() {
        let rows: Vec<&[u8]> = vec![
            br#"{"id":"a"}"#,
            br#"{"code":{"coding":[{"code":5}]}}"#,
            br#"{"id":"b","count":"many"}"#,
            br#"{"id":"c","names":["x"]}"#,
        ];
        let decoded = rows_to_record_batch(schema(), &rows).unwrap();
        let fit = [rows[0], rows[3]];
        assert_eq!(decoded.batch, reference(schema(), &fit));
        assert_eq!(decoded.unfit.len(), 2);
        assert_eq!(decoded.unfit[0].index, 1);
        assert_eq!(
            decoded.unfit[0].reason,
            "field 'code': field 'coding': field 'code': expected a string, found a number"
        );
        assert_eq!(decoded.unfit[1].index, 2);
        assert!(
            decoded.unfit[1]
                .reason
                .contains("cannot read \"many\" as an integer"),
            "{:?}",
            decoded.unfit
        );
        let none_fit = rows_to_record_batch(schema(), &[rows[2]]).unwrap();
        assert_eq!(none_fit.batch.num_rows(), 0);
        assert_eq!(none_fit.unfit.len(), 1);
    }

    /// The Synthea sample under the real wide FHIR schemas: hundreds of mostly absent columns,
    /// so long runs of owed nulls at every level.
    #[test]
    fn synthea_rows_decode_as_arrow_json_decodes_them() {
        use crate::fhir::{ElementModel, Shape, resource_schema};
        let mut checked = 0;
        for (resource_type, text) in crate::test_data::synthea_files() {
            let resource_type = resource_type.as_str();
            let rows: Vec<&[u8]> = text
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .take(300)
                .collect();
            let mut shape = Shape::default();
            let mut tape = Tape::default();
            for row in &rows {
                shape.add_row(&tape.parse(row).unwrap());
            }
            let schema = Arc::new(resource_schema(ElementModel::r4(), resource_type, &shape));
            let ours = walk_rows(schema.clone(), &rows).expect("the byte walker takes them");
            assert_eq!(ours, reference(schema, &rows), "{resource_type}");
            checked += rows.len();
        }
        assert!(checked > 1000, "{checked}");
    }

    #[test]
    fn the_byte_walker_gives_the_tapes_columns_or_steps_aside() {
        let walked: Vec<&[u8]> = vec![
            br#"{"id":"a\"b\\c","count":-3,"value":2.5e-3,"unknown":[{"x":[null,true]},"y"],"names":["\u00e9"]}"#,
            r#"{"code":{"coding":[],"text":"café"},"active":true,"polarity":"1"}"#.as_bytes(),
        ];
        let batch = walk_rows(schema(), &walked).expect("the walker takes these rows");
        assert_eq!(batch, tape_rows(schema(), &walked).unwrap());
        assert_eq!(batch, reference(schema(), &walked));
        // Whitespace, a repeated key, a type mismatch, a truncated row, a bad number: the tape.
        for row in [
            &br#"{ "id": "a" }"#[..],
            br#"{"id":"a","id":"b"}"#,
            br#"{"count":"many"}"#,
            br#"{"id":"a"#,
            br#"{"value":1.5.5}"#,
            br#"{"id":"a\"#,
        ] {
            assert!(
                walk_rows(schema(), &[row]).is_none(),
                "{}",
                String::from_utf8_lossy(row)
            );
        }
        let spaced: Vec<&[u8]> = vec![br#"{ "id": "a", "id": "b" }"#];
        let batch = rows_to_record_batch(schema(), &spaced).unwrap().batch;
        assert_eq!(batch, tape_rows(schema(), &spaced).unwrap());
    }

    #[test]
    fn an_empty_batch_has_the_schema_and_no_rows() {
        let batch = rows_to_record_batch(schema(), &[]).unwrap().batch;
        assert_eq!(batch.num_rows(), 0);
        assert_eq!(batch.schema(), schema());
    }
}
