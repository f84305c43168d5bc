//! A first load's rows cut into key ranges as they are written, so that its clustering at the end
//! of the run joins each range's pieces by copying their encoded column chunks
//! ([`file_concat`]) instead of decoding and encoding every row again ([`range_cluster`]).
//!
//! The first batch large enough cuts the key space, from its first slice of keys, into one
//! range per thread, or, for a table whose input promises more compacted files than threads,
//! one per such file (up to ranges of 8,192 rows a batch; [`planned_ranges`]); the anonymous
//! ids are uniform hashes, so any slice of them is a fair sample. From then on every batch of
//! the table is written as one file per range (its *pieces*, tagged with the cut and their
//! range). At the end, when the table's small files are all pieces of one cut and the clustered
//! table would have no more than twice as many files as the cut has ranges, contiguous ranges
//! are joined into the files of the clustered table: disjoint key ranges, as [`range_cluster`]
//! makes them. Anything else (files written before the cut, by a MERGE, by an earlier run, more
//! files than that) is clustered by [`range_cluster`] as before; pieces whose schemas differ
//! (the table's schema widened in between) are written again by it, one range group at a time.
//!
//! [`file_concat`]: super::file_concat
//! [`range_cluster`]: super::range_cluster

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result};
use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

use super::cluster_sort::Keys;
use super::conform::conform_batch;
use super::range_cluster::Ranges;
use crate::json::compact::project_entries;
use crate::output::RowTag;
use crate::output::columns::rows_to_record_batch;

/// Input bytes per byte of the compacted table, low (FHIR NDJSON compresses 8 to 9 times
/// into Parquet), so a table is given rather too many ranges than too few.
const INPUT_PER_TABLE_BYTE: u64 = 6;

/// Rows a range gets per batch, at least, when a large table is cut into more ranges than
/// threads: its row groups in the joined files are this small.
const MIN_RANGE_ROWS: usize = 8192;

/// How many ranges a table's batches are cut into: one per thread, or, for a table whose
/// input promises more compacted files of `target` bytes than threads, one per such file (as
/// many as batches of `batch_rows` rows give ranges of [`MIN_RANGE_ROWS`]).
pub fn planned_ranges(input_bytes: u64, target: u64, threads: usize, batch_rows: usize) -> usize {
    let files = (input_bytes / INPUT_PER_TABLE_BYTE).div_ceil(target.max(1));
    let files = usize::try_from(files).unwrap_or(usize::MAX);
    let most = (batch_rows / MIN_RANGE_ROWS).max(threads);
    files.clamp(threads.max(1), most.max(1))
}

/// The tag on a piece (`add.tags`): `<cut> <range> <ranges>`. Readers ignore tags.
pub const RANGE_TAG: &str = "cumulusEtlRange";

/// Rows each range of a batch gets at least, on average, for the batch to cut the key space: a
/// small table is not cut into files too small to be worth it.
const MIN_PIECE_ROWS: usize = 2048;

/// How a table's batches are cut into pieces: the clustering columns and the number of ranges,
/// and the cut once a batch has made it.
pub struct Cutting {
    clustering: Vec<String>,
    ranges: usize,
    cut: OnceLock<Arc<Cut>>,
}

/// The key ranges a run's batches of one table are cut into.
pub struct Cut {
    /// Names the cut in the pieces' tags.
    id: String,
    ranges: Ranges,
}

/// Where a piece belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub cut: String,
    pub range: usize,
    pub ranges: usize,
}

impl Cutting {
    /// Cuts batches on the `clustering` columns into `ranges` ranges.
    pub fn new(clustering: Vec<String>, ranges: usize) -> Cutting {
        Cutting {
            clustering,
            ranges: ranges.max(1),
            cut: OnceLock::new(),
        }
    }

    /// Whether a batch of `rows` rows is cut: every batch once a cut is made, and a batch
    /// large enough to make it.
    pub fn cuts(&self, rows: usize) -> bool {
        self.cut.get().is_some() || rows >= self.ranges * MIN_PIECE_ROWS
    }

    /// The cut, or one made from the keys of `first_slice` (rows of `schema`; called only when
    /// there is no cut yet). None when there is no cut and the slice has no rows.
    pub fn cut(
        &self,
        schema: &SchemaRef,
        first_slice: impl FnOnce() -> Option<Result<RecordBatch>>,
    ) -> Result<Option<Arc<Cut>>> {
        if let Some(cut) = self.cut.get() {
            return Ok(Some(cut.clone()));
        }
        let Some(slice) = first_slice() else {
            return Ok(None);
        };
        let keys = Arc::new(Keys::new(schema, &self.clustering)?);
        let encoded = keys.encode(&slice?)?;
        let sample = (0..encoded.num_rows())
            .map(|i| encoded.row(i).owned())
            .collect();
        let made = Arc::new(Cut {
            id: uuid::Uuid::new_v4().simple().to_string(),
            ranges: Ranges::cut(keys, sample, self.ranges),
        });
        // Two batches may make one at once: the first set is everyone's.
        Ok(Some(self.cut.get_or_init(|| made).clone()))
    }

    /// The clustering columns.
    pub fn clustering(&self) -> &[String] {
        &self.clustering
    }
}

impl Cut {
    /// The ranges, over rows of `schema`.
    pub fn ranges_for(&self, schema: &SchemaRef, clustering: &[String]) -> Result<Ranges> {
        Ok(self
            .ranges
            .with_keys(Arc::new(Keys::new(schema, clustering)?)))
    }

    /// How many ranges there are.
    pub fn count(&self) -> usize {
        self.ranges.count()
    }

    /// The tag value of this cut's `range`.
    pub fn tag(&self, range: usize) -> String {
        format!("{} {range} {}", self.id, self.count())
    }
}

/// A range's rows of a batch, with their tags (none when the batch has none).
pub type RangeRows<'r> = (Vec<&'r [u8]>, Vec<RowTag>);

/// Sends a batch's JSON rows to the ranges of a cut by decoding their clustering entries alone
/// (read from the start of each row up to the last of them: `id` comes second in a FHIR row), so
/// that each range's rows are then decoded and encoded by themselves: taking a range's rows out
/// of a decoded batch copies every nested column once more.
pub struct RowRouter {
    /// The clustering columns the batch's schema has, typed as there.
    source: SchemaRef,
    /// The clustering columns, typed as in the table.
    target: SchemaRef,
    ranges: Ranges,
}

impl RowRouter {
    /// Routes rows of `schema` to the ranges of `cut` over the table's schema `target` (which
    /// has every clustering column).
    pub fn new(
        cut: &Cut,
        schema: &SchemaRef,
        target: &SchemaRef,
        clustering: &[String],
    ) -> Result<RowRouter> {
        let project = |schema: &Schema| {
            let fields = clustering
                .iter()
                .filter_map(|name| schema.field_with_name(name).ok().cloned());
            Arc::new(Schema::new(fields.collect::<Vec<_>>()))
        };
        let target = project(target);
        let ranges = cut.ranges_for(&target, clustering)?;
        Ok(RowRouter {
            source: project(schema),
            target,
            ranges,
        })
    }

    /// How many ranges there are.
    pub fn count(&self) -> usize {
        self.ranges.count()
    }

    /// The rows of `rows` (with their tags, if any) in each range, in row order. A row whose
    /// keys do not decode goes to the first range, whose decode leaves it out and reports it.
    pub fn split<'r>(&self, (rows, tags): (&[&'r [u8]], &[RowTag])) -> Result<Vec<RangeRows<'r>>> {
        // Each row's key entries alone (or the whole row, where the cursor stops), decoded.
        let names: Vec<&str> = self
            .source
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        let mut entries = Vec::with_capacity(rows.len() * 64);
        let mut ends = Vec::with_capacity(rows.len());
        for row in rows {
            if project_entries(row, &names, &mut entries).is_err() {
                entries.extend_from_slice(row);
            }
            ends.push(entries.len());
        }
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let key_rows: Vec<&[u8]> = starts.zip(&ends).map(|(a, &b)| &entries[a..b]).collect();
        let decoded = rows_to_record_batch(self.source.clone(), &key_rows)
            .context("rows do not fit the table's FHIR schema")?;
        let keys = conform_batch(&decoded.batch, &self.target)?;
        let mut unfit = decoded.unfit.iter().map(|u| u.index).peekable();
        let fit_rows: Vec<usize> = (0..rows.len())
            .filter(|i| {
                let left_out = unfit.peek() == Some(i);
                if left_out {
                    unfit.next();
                }
                !left_out
            })
            .collect();
        let mut range_of = vec![0; rows.len()];
        for (range, picks) in self.ranges.route(&keys)?.into_iter().enumerate() {
            for pick in picks {
                range_of[fit_rows[pick as usize]] = range;
            }
        }
        let mut split: Vec<RangeRows> = (0..self.count()).map(|_| Default::default()).collect();
        for (i, &range) in range_of.iter().enumerate() {
            split[range].0.push(rows[i]);
            if let Some(tag) = tags.get(i) {
                split[range].1.push(*tag);
            }
        }
        Ok(split)
    }
}

/// The piece a file's tags name, if any.
pub fn piece_of(tags: Option<&HashMap<String, Option<String>>>) -> Option<Piece> {
    let tag = tags?.get(RANGE_TAG)?.as_deref()?;
    let mut parts = tag.split(' ');
    let cut = parts.next()?.to_string();
    let range = parts.next()?.parse().ok()?;
    let ranges = parts.next()?.parse().ok()?;
    (parts.next().is_none() && range < ranges).then_some(Piece { cut, range, ranges })
}

/// Which pieces to join into each file: `pieces` (each with its size in bytes), all of one cut,
/// joined into `files` files of contiguous ranges of about equal bytes (one per range when the
/// cut has fewer than twice as many ranges). None when the pieces are not all of one cut, or
/// the cut has fewer than half as many ranges as `files`.
pub fn join_plan(pieces: &[(Piece, u64)], files: usize) -> Option<Vec<Vec<usize>>> {
    let first = &pieces.first()?.0;
    let (cut, ranges) = (&first.cut, first.ranges);
    // A table needing up to twice as many files as the cut has ranges gets one per range, each
    // up to twice the target size, rather than decoding every row again.
    if files == 0
        || files > ranges * 2
        || pieces
            .iter()
            .any(|(p, _)| &p.cut != cut || p.ranges != ranges)
    {
        return None;
    }
    // Fewer than twice as many ranges as files: one file per range, each at least half the
    // target size, rather than files of one and of two ranges.
    let files = if ranges < files * 2 { ranges } else { files };
    let mut range_bytes = vec![0u64; ranges];
    for (piece, bytes) in pieces {
        range_bytes[piece.range] += bytes;
    }
    let total: u64 = range_bytes.iter().sum();
    // Range r goes to the group its middle byte falls in.
    let mut group_of = Vec::with_capacity(ranges);
    let mut before = 0u64;
    for bytes in &range_bytes {
        let middle = before + bytes / 2;
        let group = match total {
            0 => 0,
            _ => (u128::from(middle) * files as u128 / u128::from(total)) as usize,
        };
        group_of.push(group.min(files - 1));
        before += bytes;
    }
    let mut groups = vec![Vec::new(); files];
    for (i, (piece, _)) in pieces.iter().enumerate() {
        groups[group_of[piece.range]].push(i);
    }
    groups.retain(|g| !g.is_empty());
    // Within a file, pieces in range order (then as given).
    for group in &mut groups {
        group.sort_by_key(|&i| pieces[i].0.range);
    }
    Some(groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;
    use arrow::datatypes::{DataType, Field, Schema};

    fn piece(cut: &str, range: usize, ranges: usize) -> Piece {
        Piece {
            cut: cut.into(),
            range,
            ranges,
        }
    }

    #[test]
    fn tags_name_their_piece_and_nothing_else_reads_as_one() {
        let schema: SchemaRef = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)]));
        let ids = StringArray::from_iter_values((0..100).map(|i| format!("{i:03}")));
        let slice = RecordBatch::try_new(schema.clone(), vec![Arc::new(ids)]).unwrap();
        let cutting = Cutting::new(vec!["id".into()], 4);
        assert!(!cutting.cuts(4 * MIN_PIECE_ROWS - 1), "too small to cut");
        assert!(cutting.cuts(4 * MIN_PIECE_ROWS));
        assert!(
            cutting.cut(&schema, || None).unwrap().is_none(),
            "no rows, no cut"
        );
        let cut = cutting.cut(&schema, || Some(Ok(slice))).unwrap().unwrap();
        assert!(cutting.cuts(1), "once cut, every batch is");
        assert_eq!(cut.count(), 4);
        let again = cutting
            .cut(&schema, || panic!("not decoded again"))
            .unwrap()
            .unwrap();
        assert!(Arc::ptr_eq(&cut, &again), "one cut per table");
        let tags: HashMap<String, Option<String>> =
            [(RANGE_TAG.to_string(), Some(cut.tag(2)))].into();
        let read = piece_of(Some(&tags)).unwrap();
        assert_eq!((read.range, read.ranges), (2, 4));
        assert_eq!(read.cut, cut.id);
        for bad in ["x 4 4", "x 1", "x a 4", "x 1 4 y"] {
            let tags = [(RANGE_TAG.to_string(), Some(bad.to_string()))].into();
            assert_eq!(piece_of(Some(&tags)), None, "{bad}");
        }
        assert_eq!(piece_of(None), None);
    }

    #[test]
    fn rows_go_to_their_keys_ranges_with_their_tags_and_rows_without_readable_keys_to_the_first() {
        let field = |name: &str, t: DataType| Field::new(name, t, true);
        let target: SchemaRef = Arc::new(Schema::new(vec![
            field("resourceType", DataType::Utf8),
            field("id", DataType::Utf8),
            field("n", DataType::Int64),
        ]));
        let ids = StringArray::from_iter_values((0..100).map(|i| format!("{i:03}")));
        let slice = RecordBatch::try_new(
            Arc::new(Schema::new(vec![field("id", DataType::Utf8)])),
            vec![Arc::new(ids)],
        )
        .unwrap();
        let cutting = Cutting::new(vec!["id".into()], 4);
        let cut = cutting
            .cut(&slice.schema(), || Some(Ok(slice.clone())))
            .unwrap()
            .unwrap();
        // The batch's own schema lacks `n`: its key columns are read as the batch has them.
        let schema: SchemaRef = Arc::new(Schema::new(vec![
            field("resourceType", DataType::Utf8),
            field("id", DataType::Utf8),
        ]));
        let router = RowRouter::new(&cut, &schema, &target, &["id".into()]).unwrap();
        assert_eq!(router.count(), 4);
        let rows: Vec<&[u8]> = vec![
            br#"{"resourceType":"Patient","id":"099","name":[{"text":"x"}]}"#,
            br#"{"resourceType":"Patient","id":"000"}"#,
            br#"{"resourceType":"Patient","id":"050","extra":{"id":"999"}}"#,
            // Whitespace stops the cursor: the whole row is decoded for its key.
            br#"{"resourceType": "Patient", "id": "098"}"#,
            // No id (a null key) and an id that is no string (left out by the decode).
            br#"{"resourceType":"Patient"}"#,
            br#"{"resourceType":"Patient","id":[1]}"#,
            br#"{"resourceType":"Patient","id":"001"}"#,
        ];
        let tags: Vec<RowTag> = (0..rows.len() as u8).map(|i| [i; 24]).collect();
        let split = router.split((&rows, &tags)).unwrap();
        let range_of = |id: &str| {
            let batch = RecordBatch::try_new(
                Arc::new(Schema::new(vec![field("id", DataType::Utf8)])),
                vec![Arc::new(StringArray::from(vec![id]))],
            )
            .unwrap();
            let picks = cut
                .ranges_for(&batch.schema(), &["id".into()])
                .unwrap()
                .route(&batch)
                .unwrap();
            picks.iter().position(|p| !p.is_empty()).unwrap()
        };
        let mut expected: Vec<Vec<usize>> = vec![Vec::new(); 4];
        for (i, id) in ["099", "000", "050", "098"].iter().enumerate() {
            expected[range_of(id)].push(i);
        }
        expected[0].extend([4, 5]);
        expected[range_of("001")].push(6);
        for list in &mut expected {
            list.sort();
        }
        assert_eq!(range_of("000"), 0);
        assert_eq!(range_of("099"), 3);
        for (range, (got_rows, got_tags)) in split.iter().enumerate() {
            let want: Vec<&[u8]> = expected[range].iter().map(|&i| rows[i]).collect();
            assert_eq!(got_rows, &want, "range {range}");
            let want: Vec<RowTag> = expected[range].iter().map(|&i| tags[i]).collect();
            assert_eq!(got_tags, &want, "range {range}");
        }
        // Without tags, none.
        let split = router.split((&rows, &[])).unwrap();
        assert!(split.iter().all(|(_, tags)| tags.is_empty()));
        assert_eq!(
            split.iter().map(|(r, _)| r.len()).sum::<usize>(),
            rows.len()
        );
    }

    #[test]
    fn a_large_tables_appends_are_cut_into_as_many_ranges_as_its_files() {
        const MB: u64 = 1_000_000;
        let target = 100 * MB;
        // A table of less than the threads' worth of files: one range per thread.
        assert_eq!(planned_ranges(500 * MB, target, 2, 100_000), 2);
        assert_eq!(planned_ranges(0, target, 4, 100_000), 4);
        // 3 GB of input promise 5 files; 10 GB 17, as many as 100,000-row batches cut into
        // ranges of 8,192 rows allow (12).
        assert_eq!(planned_ranges(3_000 * MB, target, 2, 100_000), 5);
        assert_eq!(planned_ranges(10_000 * MB, target, 2, 100_000), 12);
        // Small batches never give fewer ranges than threads.
        assert_eq!(planned_ranges(10_000 * MB, target, 8, 10_000), 8);
    }

    #[test]
    fn contiguous_ranges_of_about_equal_bytes_make_each_file() {
        let pieces = vec![
            (piece("c", 0, 4), 10),
            (piece("c", 1, 4), 10),
            (piece("c", 2, 4), 10),
            (piece("c", 3, 4), 10),
            (piece("c", 0, 4), 10),
            (piece("c", 3, 4), 10),
        ];
        // Ranges of 20, 10, 10, 20 bytes into two files: ranges 0-1 and 2-3.
        let groups = join_plan(&pieces, 2).unwrap();
        assert_eq!(groups, vec![vec![0, 4, 1], vec![2, 3, 5]]);
        // As many files as ranges: one range each.
        assert_eq!(join_plan(&pieces, 4).unwrap().len(), 4);
        assert_eq!(join_plan(&pieces, 1).unwrap(), vec![vec![0, 4, 1, 2, 3, 5]]);
        // Up to twice as many files as ranges: one file per range (larger than the target).
        assert_eq!(
            join_plan(&pieces, 8).unwrap(),
            join_plan(&pieces, 4).unwrap()
        );
        // More than that, or two cuts: not joinable.
        assert_eq!(join_plan(&pieces, 9), None);
        let mut mixed = pieces.clone();
        mixed.push((piece("d", 0, 4), 10));
        assert_eq!(join_plan(&mixed, 2), None);
    }
}
