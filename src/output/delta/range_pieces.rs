//! A first load's rows cut into key ranges as they are written, so that its clustering at the end
//! of the run joins each range's pieces by copying their encoded column chunks
//! ([`file_concat`]) instead of decoding and encoding every row again ([`range_cluster`]).
//!
//! The first batch large enough cuts the key space, from its first slice of keys, into one
//! range per thread (the anonymous ids are uniform hashes, so any slice of them is a fair
//! sample). From then on every batch of the table is written as one file per range (its
//! *pieces*, tagged with the cut and their range). At the end, when the table's small files are
//! all pieces of one cut and the clustered table would have no more files than the cut has
//! ranges, contiguous ranges are joined into the files of the clustered table: disjoint key
//! ranges, as [`range_cluster`] makes them. Anything else (files written before the cut, by a
//! MERGE, by an earlier run, more files than ranges) is clustered by [`range_cluster`] as
//! before; pieces whose schemas differ (the table's schema widened in between) are written
//! again by it, one range group at a time.
//!
//! [`file_concat`]: super::file_concat
//! [`range_cluster`]: super::range_cluster

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use anyhow::Result;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use super::cluster_sort::Keys;
use super::range_cluster::Ranges;

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
/// joined into `files` files of contiguous ranges of about equal bytes. None when the pieces
/// are not all of one cut, or the cut has fewer ranges than `files`.
pub fn join_plan(pieces: &[(Piece, u64)], files: usize) -> Option<Vec<Vec<usize>>> {
    let first = &pieces.first()?.0;
    let (cut, ranges) = (&first.cut, first.ranges);
    if files == 0
        || files > ranges
        || pieces
            .iter()
            .any(|(p, _)| &p.cut != cut || p.ranges != ranges)
    {
        return None;
    }
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
        // More files than ranges, or two cuts: not joinable.
        assert_eq!(join_plan(&pieces, 5), None);
        let mut mixed = pieces.clone();
        mixed.push((piece("d", 0, 4), 10));
        assert_eq!(join_plan(&mixed, 2), None);
    }
}
